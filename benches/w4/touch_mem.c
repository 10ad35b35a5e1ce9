/* W4's task: allocate X MB, write every page (so it is resident), sleep T s.
 * Usage: touch_mem X_MB T_S */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s MB SECONDS\n", argv[0]);
        return 2;
    }
    long mb = atol(argv[1]);
    double secs = atof(argv[2]);
    if (mb < 0 || secs < 0) {
        fprintf(stderr, "negative size or time\n");
        return 2;
    }
    size_t n = (size_t)mb << 20;
    char *p = malloc(n ? n : 1);
    if (!p) {
        perror("malloc");
        return 1;
    }
    long page = sysconf(_SC_PAGESIZE);
    for (size_t i = 0; i < n; i += (size_t)page)
        p[i] = (char)i;
    struct timespec ts = {(time_t)secs, (long)((secs - (double)(time_t)secs) * 1e9)};
    nanosleep(&ts, NULL);
    /* Read the memory back so the compiler cannot drop the writes. */
    unsigned s = 0;
    for (size_t i = 0; i < n; i += (size_t)page)
        s += (unsigned char)p[i];
    printf("%ld %u\n", mb, s);
    return 0;
}
