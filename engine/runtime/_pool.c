/* A work-sharing pool whose caller never waits for a thread that has not started.

Why not OpenMP here: an OpenMP region ends at a barrier that every thread of the team must reach,
so when a second thread is not on a core (another process holds it, a container's CPU quota ran
out) the caller waits for a scheduler slice: measured on a loaded 2-core machine, a decoder step of
1-2 ms took 200-580 ms with two-thread products (benchmarks/RESULTS.md, issue 15, sixth session).

Here the caller publishes a job of n tasks and takes tasks itself; helper threads take tasks when
they run. A task is claimed with one compare-and-swap on a 64-bit word holding the job's
generation, its task count and the next task, so a helper that wakes late finds the job taken
(or a newer one) and claims nothing. The caller then waits only for tasks that a helper claimed
and is running, never for a helper to arrive. Helpers spin for POOL_SPIN_NS after each job (a
decoder step calls about a hundred products back to back) and then sleep on a condition variable.
*/

#include "_pool.h"

#include <immintrin.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <time.h>

#define POOL_MAX_HELPERS 63
#ifndef POOL_SPIN_NS
#define POOL_SPIN_NS 200000 /* 0.2 ms */
#endif

/* state: generation (16 bits) | task count (24 bits) | next task (24 bits) */
#define GEN_SHIFT 48
#define COUNT_SHIFT 24
#define FIELD_MASK 0xFFFFFFull

/* Each on a cache line of its own: the helpers poll `state` while spinning, and a write to a
   neighbour (the job's function and context, the count of finished tasks) would take the line from
   them and back on every poll. */
static _Alignas(64) _Atomic uint64_t state;
static _Alignas(64) pool_task_fn job_fn;
static void *job_ctx;
static _Alignas(64) _Atomic long job_done;

static pthread_mutex_t caller_lock = PTHREAD_MUTEX_INITIALIZER; /* one job at a time */
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static int helpers;              /* started so far; under caller_lock */
static _Atomic int openmp;       /* pool_use_openmp() was called */

void pool_use_openmp(int on) { atomic_store(&openmp, on ? 1 : 0); }

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* Claim and run tasks of the job whose generation is gen; returns when none is left to claim. */
static void work(uint64_t gen) {
    for (;;) {
        uint64_t s = atomic_load_explicit(&state, memory_order_acquire);
        if ((s >> GEN_SHIFT) != gen) return;
        const uint64_t count = (s >> COUNT_SHIFT) & FIELD_MASK, next = s & FIELD_MASK;
        if (next >= count) return;
        if (!atomic_compare_exchange_weak_explicit(&state, &s, s + 1, memory_order_acq_rel, memory_order_acquire))
            continue;
        /* Claimed task `next` of this generation: the caller is still waiting for it, so the job's
           function and context are this generation's. */
        job_fn(job_ctx, (long)next);
        atomic_fetch_add_explicit(&job_done, 1, memory_order_release);
    }
}

static void *helper_main(void *arg) {
    (void)arg;
    uint64_t seen = 0;
    for (;;) {
        uint64_t gen = atomic_load_explicit(&state, memory_order_acquire) >> GEN_SHIFT;
        if (gen != seen) {
            seen = gen;
            work(gen);
            continue;
        }
        /* Spin a little for the next job, then sleep until a caller wakes us. The job's word is
           read after every pause (the clock every 64): read every 64 pauses, a helper came to a
           new job about 0.5-1 us late on average, and the caller of a small product (a decoder
           step calls 48, most of a few microseconds) did more of it alone or waited for the
           helper's share (benchmarks/bench_handoff.py; RESULTS.md, issue 15 ninth session). */
        const uint64_t until = now_ns() + POOL_SPIN_NS;
        int found = 0;
        while (!found && now_ns() < until) {
            for (int i = 0; i < 64; i++) {
                _mm_pause();
                if ((atomic_load_explicit(&state, memory_order_relaxed) >> GEN_SHIFT) != seen) {
                    found = 1;
                    break;
                }
            }
        }
        if (found) continue;
        pthread_mutex_lock(&wake_lock);
        while ((atomic_load_explicit(&state, memory_order_acquire) >> GEN_SHIFT) == seen)
            pthread_cond_wait(&wake, &wake_lock);
        pthread_mutex_unlock(&wake_lock);
    }
    return NULL;
}

/* A child of fork() has none of the parent's helper threads (and maybe a lock some other thread
   held): it starts its own pool. */
static void after_fork_in_child(void) {
    pthread_mutex_init(&caller_lock, NULL);
    pthread_mutex_init(&wake_lock, NULL);
    pthread_cond_init(&wake, NULL);
    helpers = 0;
}

static void ensure_helpers(int wanted) {
    static int registered;
    if (!registered) {
        pthread_atfork(NULL, NULL, after_fork_in_child);
        registered = 1;
    }
    if (wanted > POOL_MAX_HELPERS) wanted = POOL_MAX_HELPERS;
    while (helpers < wanted) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        const int failed = pthread_create(&t, &attr, helper_main, NULL);
        pthread_attr_destroy(&attr);
        if (failed) break; /* fewer helpers: the caller does their share */
        helpers++;
    }
}

void pool_run(long n, int threads, pool_task_fn fn, void *ctx) {
    if (n <= 0) return;
    if (threads <= 1 || n == 1 || n > (long)FIELD_MASK) {
        for (long i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    if (atomic_load(&openmp)) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (long i = 0; i < n; i++) fn(ctx, i);
        return;
    }
    pthread_mutex_lock(&caller_lock);
    ensure_helpers(threads - 1);
    job_fn = fn;
    job_ctx = ctx;
    atomic_store_explicit(&job_done, 0, memory_order_relaxed);
    const uint64_t old = atomic_load_explicit(&state, memory_order_relaxed);
    const uint64_t gen = ((old >> GEN_SHIFT) + 1) & 0xFFFFull;
    atomic_store_explicit(&state, (gen << GEN_SHIFT) | ((uint64_t)n << COUNT_SHIFT), memory_order_release);
    pthread_mutex_lock(&wake_lock);
    pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&wake_lock);
    work(gen);
    /* Every task is claimed; wait for those that helpers are running. */
    for (int spins = 0; atomic_load_explicit(&job_done, memory_order_acquire) < n; spins++) {
        if (spins < 4096)
            _mm_pause();
        else
            sched_yield();
    }
    pthread_mutex_unlock(&caller_lock);
}
