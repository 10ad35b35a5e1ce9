/* W4's task: allocate X MB, write every page (so it is resident), then wait
 * T s: asleep, or with C threads spinning when C is given (so a task's cores
 * are real, for the workloads where cores vary).
 * Usage: touch_mem X_MB T_S [C] */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static double spin_until;

static void *spin(void *arg) {
    volatile unsigned long n = 0;
    (void)arg;
    /* Checking the clock only every 2^16 turns keeps the thread on the CPU. */
    while (now_s() < spin_until)
        for (int i = 0; i < 65536; i++)
            n++;
    return NULL;
}

int main(int argc, char **argv) {
    if (argc != 3 && argc != 4) {
        fprintf(stderr, "usage: %s MB SECONDS [CORES]\n", argv[0]);
        return 2;
    }
    long mb = atol(argv[1]);
    double secs = atof(argv[2]);
    long cores = argc == 4 ? atol(argv[3]) : 0;
    if (mb < 0 || secs < 0 || cores < 0 || cores > 1024) {
        fprintf(stderr, "size, time or cores out of range\n");
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
    if (cores == 0) {
        struct timespec ts = {(time_t)secs, (long)((secs - (double)(time_t)secs) * 1e9)};
        nanosleep(&ts, NULL);
    } else {
        spin_until = now_s() + secs;
        pthread_t *t = calloc((size_t)cores, sizeof *t);
        if (!t) {
            perror("calloc");
            return 1;
        }
        for (long i = 1; i < cores; i++)
            if (pthread_create(&t[i], NULL, spin, NULL) != 0) {
                fprintf(stderr, "pthread_create failed\n");
                return 1;
            }
        spin(NULL);
        for (long i = 1; i < cores; i++)
            pthread_join(t[i], NULL);
        free(t);
    }
    /* Read the memory back so the compiler cannot drop the writes. */
    unsigned s = 0;
    for (size_t i = 0; i < n; i += (size_t)page)
        s += (unsigned char)p[i];
    printf("%ld %u\n", mb, s);
    return 0;
}
