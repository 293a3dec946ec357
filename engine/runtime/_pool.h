/* A work-sharing thread pool whose caller does the work of threads that have not started (_pool.c). */
#ifndef ENGINE_POOL_H
#define ENGINE_POOL_H

typedef void (*pool_task_fn)(void *ctx, long task);

/* Run fn(ctx, 0..n-1) on the calling thread and up to threads - 1 helpers; returns when all ran.
   Tasks must be independent. Callers are serialized. */
void pool_run(long n, int threads, pool_task_fn fn, void *ctx);

/* From now on pool_run runs its tasks on OpenMP threads (on = 1) or its own (0) (where AMX's products, which need each
   thread's tile configuration, run on OpenMP: one kind of thread spinning per process). */
void pool_use_openmp(int on);

#endif
