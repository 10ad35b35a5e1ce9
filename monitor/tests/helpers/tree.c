/* Test workload for drover-monitor: a process tree with known resource use.
 *
 *   tree NPROCS MEM_MB DISK_DIR DISK_MB HOLD_MS PIDFILE
 *
 * The root forks NPROCS workers; worker 0 double-forks (its intermediate
 * parent exits at once, so the worker is orphaned). Each worker appends its
 * pid to PIDFILE, touches MEM_MB/NPROCS MB of fresh anonymous memory, writes
 * DISK_MB MB into DISK_DIR/wN (1 MB every 10 ms; "-" for none), then holds
 * for HOLD_MS ms (-1: forever). The root waits for every worker, including
 * the orphan, through a pipe they all hold open.
 *
 *   tree busy NTHREADS SECONDS   -- NTHREADS threads each spinning until it
 *                                   has had SECONDS of CPU (not of wall time,
 *                                   so a loaded machine stretches the run
 *                                   instead of shrinking what is measured).
 *   tree cow MEM_MB NCHILD HOLD_MS -- touches MEM_MB, then forks NCHILD
 *                                     children that share it copy-on-write.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>

static double thread_cpu(void) {
    struct timespec t;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static double busy_secs;
static void *spin(void *arg) {
    volatile unsigned long x = 0;
    (void)arg;
    while (thread_cpu() < busy_secs)
        for (int i = 0; i < 100000; i++) x++;
    return NULL;
}

static void record_pid(const char *pidfile) {
    char line[32];
    int fd = open(pidfile, O_WRONLY | O_APPEND | O_CREAT, 0644);
    int n = snprintf(line, sizeof line, "%d\n", (int)getpid());
    if (fd >= 0) { if (write(fd, line, n) != n) _exit(3); close(fd); }
}

static void work(int idx, size_t mem_mb, const char *dir, long disk_mb, long hold_ms, const char *pidfile) {
    record_pid(pidfile);
    if (mem_mb > 0) {
        size_t len = mem_mb << 20;
        char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) _exit(2);
        for (size_t i = 0; i < len; i += 4096) p[i] = 1;
    }
    if (strcmp(dir, "-") != 0 && disk_mb != 0) {
        char path[4096], buf[1 << 20];
        memset(buf, 7, sizeof buf);
        snprintf(path, sizeof path, "%s/w%d", dir, idx);
        int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
        if (fd < 0) _exit(4);
        for (long i = 0; disk_mb < 0 || i < disk_mb; i++) {
            if (write(fd, buf, sizeof buf) != (ssize_t)sizeof buf) _exit(5);
            usleep(10000);
        }
        close(fd);
    }
    if (hold_ms < 0) for (;;) pause();
    usleep(hold_ms * 1000);
}

int main(int argc, char **argv) {
    if (argc == 4 && strcmp(argv[1], "busy") == 0) {
        int n = atoi(argv[2]);
        pthread_t t[64];
        busy_secs = atof(argv[3]);
        for (int i = 0; i < n && i < 64; i++) pthread_create(&t[i], NULL, spin, NULL);
        for (int i = 0; i < n && i < 64; i++) pthread_join(t[i], NULL);
        return 0;
    }
    if (argc == 5 && strcmp(argv[1], "cow") == 0) {
        size_t len = (size_t)atol(argv[2]) << 20;
        int n = atoi(argv[3]);
        long hold_ms = atol(argv[4]);
        char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return 2;
        for (size_t i = 0; i < len; i += 4096) p[i] = 1;
        for (int i = 0; i < n; i++)
            if (fork() == 0) { usleep(hold_ms * 1000); _exit(0); }
        usleep(hold_ms * 1000);
        while (wait(NULL) > 0) {}
        return 0;
    }
    if (argc != 7) {
        fprintf(stderr, "usage: tree NPROCS MEM_MB DISK_DIR DISK_MB HOLD_MS PIDFILE\n");
        return 64;
    }
    int nprocs = atoi(argv[1]);
    size_t mem_each = (size_t)atol(argv[2]) / nprocs;
    const char *dir = argv[3];
    long disk_mb = atol(argv[4]), hold_ms = atol(argv[5]);
    const char *pidfile = argv[6];
    int pfd[2];
    if (pipe(pfd) != 0) return 1;
    record_pid(pidfile);
    for (int i = 0; i < nprocs; i++) {
        pid_t pid = fork();
        if (pid < 0) return 1;
        if (pid == 0) {
            close(pfd[0]);
            if (i == 0) {
                pid_t g = fork();
                if (g < 0) _exit(1);
                if (g > 0) _exit(0);
            }
            work(i, mem_each, dir, disk_mb, hold_ms, pidfile);
            _exit(0);
        }
    }
    close(pfd[1]);
    char c;
    while (read(pfd[0], &c, 1) > 0) {}
    while (wait(NULL) > 0) {}
    return 0;
}
