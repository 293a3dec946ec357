/* A model of the packed int8 products' memory overlap, apart from everything else a step does: the
   kernel's 4-row VNNI tile (as engine/runtime/_qlinear.c's tile_vnni8, on 64-output groups of 512
   inputs, 32 KB each) over 22 MB of weights (FLAN-T5-small's decoder, int8) on two threads, each
   streaming its half of the groups in order, with the weights read from memory (four 22 MB buffers
   in turn, so that the 32 MB L3 keeps none of them between passes). Printed, per row count (8:
   greedy at batch 8; 32: contrastive, k = 4): the pass with the weights in cache (the arithmetic
   alone: one group over and over), without fetching ahead, and with the kernel's look-ahead (the
   tiles after a group's first fetch the next group in slices: into L2 with T1, as the kernel does,
   or with T0 or T2, or two groups ahead), also with a product boundary every 7 groups (a step's
   48 products: no look-ahead past a product's last group). Measures where a step's products lose
   time: what this model does not have (quantizing the activations, the pool's hand-off, the float
   epilogue, the int16 wo) is the rest (benchmarks/RESULTS.md, issue 15 ninth session). Needs
   AVX512-VNNI.

       gcc -O3 -mavx512f -mavx512bw -mavx512vl -mavx512vnni -pthread benchmarks/overlap_model.c \
           -o /tmp/overlap_model && /tmp/overlap_model
*/
#include <immintrin.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define KB 8 /* chunks of 64 inputs: K = 512 */
#define GROUP (KB * 4096)
#define BUFFERS 4
#define PASSES 12

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static __m512i dp(__m512i acc, __m512i x, __m512i w) {
    __asm__("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(x), "v"(w));
    return acc;
}

/* how the later tiles of a group fetch ahead: none, or _mm_prefetch with this hint */
enum { AHEAD_NONE, AHEAD_T1, AHEAD_T0, AHEAD_T2 };
static const char *const ahead_names[] = {"no look-ahead", "look-ahead T1", "look-ahead T0", "look-ahead T2"};

typedef struct {
    const int8_t *w;
    int groups, rows, ahead, distance, product, cached;
    const uint8_t *x;
    int32_t *out;
    double seconds;
} job;

static inline __attribute__((always_inline)) void fetch(const char *p, int hint) {
    if (hint == AHEAD_T1)
        _mm_prefetch(p, _MM_HINT_T1);
    else if (hint == AHEAD_T0)
        _mm_prefetch(p, _MM_HINT_T0);
    else
        _mm_prefetch(p, _MM_HINT_T2);
}

/* one tile: 4 rows x a group's 64 outputs; the first tile of a group prefetches its own chunks four
   ahead (as the kernel's), a later one a slice of `ahead` (astep bytes a chunk) */
static void tile(const int8_t *wg, const uint8_t *x, int own, const char *ahead, int astep, int hint, int32_t *out) {
    __m512i acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int b = 0; b < 4; b++) acc[i][b] = _mm512_setzero_si512();
    for (int kb = 0; kb < KB; kb++) {
        const int8_t *chunk = wg + kb * 4096;
        if (own && kb + 4 < KB)
            for (int line = 0; line < 4096; line += 64) _mm_prefetch((const char *)chunk + 4 * 4096 + line, _MM_HINT_T0);
        if (ahead)
            for (int line = 0; line < astep; line += 64) fetch(ahead + kb * astep + line, hint);
        const uint8_t *xk = x + kb * 64;
        for (int r = 0; r < 16; r++) {
            __m512i wv[4];
            for (int b = 0; b < 4; b++) wv[b] = _mm512_loadu_si512(chunk + b * 1024 + r * 64);
            for (int i = 0; i < 4; i++) {
                int32_t quad;
                memcpy(&quad, xk + i * 512 + 4 * r, 4);
                const __m512i xb = _mm512_set1_epi32(quad);
                for (int b = 0; b < 4; b++) acc[i][b] = dp(acc[i][b], xb, wv[b]);
            }
        }
    }
    for (int i = 0; i < 4; i++)
        for (int b = 0; b < 4; b++) _mm512_storeu_si512(out + i * 64 + b * 16, acc[i][b]);
}

static void *run(void *arg) {
    job *j = arg;
    const double t0 = now();
    const int tiles = j->rows / 4;
    for (int g = 0; g < j->groups; g++) {
        const int8_t *wg = j->cached ? j->w : j->w + (size_t)g * GROUP;
        const int last_of_product = j->product && (g + 1) % j->product == 0;
        const char *next = !j->cached && j->ahead != AHEAD_NONE && g + j->distance < j->groups && tiles > 1 &&
                                   !last_of_product
                               ? (const char *)(j->w + (size_t)(g + j->distance) * GROUP)
                               : NULL;
        const int step = next ? (4096 + 64 * (tiles - 1) - 1) / (64 * (tiles - 1)) * 64 : 0;
        for (int t = 0; t < tiles; t++) {
            const char *ahead = t > 0 && next ? next + (t - 1) * step * KB : NULL;
            tile(wg, j->x + t * 4 * 512, t == 0 && !j->cached, ahead, step, j->ahead, j->out + t * 256);
        }
    }
    j->seconds = now() - t0;
    return NULL;
}

/* the best of PASSES two-thread passes, microseconds */
static double pass(const int8_t *w, size_t bytes, const uint8_t *x, int32_t *out, int rows, int ahead, int distance,
                   int product, int cached) {
    const int groups = (int)(bytes / GROUP);
    double best = 1e30;
    for (int p = 0; p < PASSES; p++) {
        pthread_t threads[2];
        job jobs[2];
        const int8_t *base = w + (size_t)(p % BUFFERS) * bytes;
        for (int i = 0; i < 2; i++) {
            jobs[i] = (job){base + (size_t)i * (groups / 2) * GROUP, groups / 2, rows, ahead, distance, product, cached,
                            x, out + i * 32 * 64 * 8, 0.0};
            pthread_create(&threads[i], NULL, run, &jobs[i]);
        }
        double slowest = 0.0;
        for (int i = 0; i < 2; i++) {
            pthread_join(threads[i], NULL);
            if (jobs[i].seconds > slowest) slowest = jobs[i].seconds;
        }
        if (slowest < best) best = slowest;
    }
    return best * 1e6;
}

int main(void) {
    const size_t bytes = (size_t)22 << 20;
    int8_t *w = aligned_alloc(4096, bytes * BUFFERS);
    uint8_t *x = aligned_alloc(64, 32 * 512);
    int32_t *out = aligned_alloc(64, 2 * 32 * 64 * 8 * sizeof(int32_t));
    if (!w || !x || !out) return 1;
    for (size_t i = 0; i < bytes * BUFFERS; i++) w[i] = (int8_t)(i * 7);
    for (int i = 0; i < 32 * 512; i++) x[i] = (uint8_t)i;
    printf("a pass over 22 MB of int8 weights on two threads, best of %d, microseconds\n", PASSES);
    for (int rows = 8; rows <= 32; rows *= 4) {
        printf("rows %d, weights in cache (arithmetic only): %.0f\n", rows, pass(w, bytes, x, out, rows, 0, 1, 0, 1));
        printf("rows %d, %s: %.0f\n", rows, ahead_names[AHEAD_NONE], pass(w, bytes, x, out, rows, AHEAD_NONE, 1, 0, 0));
        for (int ahead = AHEAD_T1; ahead <= AHEAD_T2; ahead++)
            for (int distance = 1; distance <= 2; distance++)
                printf("rows %d, %s, %d group%s ahead: %.0f\n", rows, ahead_names[ahead], distance,
                       distance > 1 ? "s" : "", pass(w, bytes, x, out, rows, ahead, distance, 0, 0));
        printf("rows %d, look-ahead T1, a product boundary every 7 groups: %.0f\n", rows,
               pass(w, bytes, x, out, rows, AHEAD_T1, 1, 7, 0));
    }
    free(w);
    free(x);
    free(out);
    return 0;
}
