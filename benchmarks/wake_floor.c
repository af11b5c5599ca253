/*
 * wake_floor: how fast can this machine wake a process that sleeps on a futex
 * in shared memory?  The floor under shmcast's wake-up latency, with no Python
 * and no message: one process sleeps on a word, the other stores a new value
 * after an idle period and wakes it, each taking CLOCK_MONOTONIC.
 *
 *     cc -O2 -o wake_floor benchmarks/wake_floor.c && ./wake_floor [idle_s] [reps]
 *
 * Prints, per repetition, the time from the store to the sleeper running
 * again, and the time the waker spent in the FUTEX_WAKE call.  Linux only.
 */
#define _GNU_SOURCE
#include <linux/futex.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define MAX_REPS 1000

struct shared {
    uint32_t word;
    double woke[MAX_REPS];
};

static double
now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

int
main(int argc, char **argv)
{
    double idle = argc > 1 ? atof(argv[1]) : 2.0;
    int reps = argc > 2 ? atoi(argv[2]) : 10;
    if (reps < 1 || reps > MAX_REPS || !(idle >= 0.0)) {
        fprintf(stderr, "usage: %s [idle_seconds >= 0] [repetitions 1..%d]\n", argv[0], MAX_REPS);
        return 2;
    }
    struct shared *sh = mmap(NULL, sizeof *sh, PROT_READ | PROT_WRITE,
                             MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (sh == MAP_FAILED) {
        perror("mmap");
        return 1;
    }
    pid_t child = fork();
    if (child < 0) {
        perror("fork");
        return 1;
    }
    if (child == 0) {
        for (int i = 0; i < reps; i++) {
            while (__atomic_load_n(&sh->word, __ATOMIC_ACQUIRE) == (uint32_t)i)
                syscall(SYS_futex, &sh->word, FUTEX_WAIT, (uint32_t)i, NULL, NULL, 0);
            sh->woke[i] = now();
        }
        _exit(0);
    }
    double stored[MAX_REPS], in_wake[MAX_REPS];
    struct timespec nap = {(time_t)idle, (long)((idle - (double)(time_t)idle) * 1e9)};
    for (int i = 0; i < reps; i++) {
        nanosleep(&nap, NULL);
        stored[i] = now();
        __atomic_store_n(&sh->word, (uint32_t)(i + 1), __ATOMIC_RELEASE);
        syscall(SYS_futex, &sh->word, FUTEX_WAKE, 1, NULL, NULL, 0);
        in_wake[i] = now() - stored[i];
    }
    waitpid(child, NULL, 0);
    printf("idle %.3f s, %d repetitions (microseconds)\n", idle, reps);
    printf("store to sleeper running:");
    for (int i = 0; i < reps; i++)
        printf(" %.1f", (sh->woke[i] - stored[i]) * 1e6);
    printf("\nFUTEX_WAKE call:         ");
    for (int i = 0; i < reps; i++)
        printf(" %.1f", in_wake[i] * 1e6);
    printf("\n");
    return 0;
}
