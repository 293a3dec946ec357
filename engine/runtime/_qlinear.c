/* Linear layers of our T5 runtime on CPU: out[M, N] = x[M, K] . W[N, K]^T / scale[N].

Why this exists (see engine/runtime/qlinear.py for the Python side): a contrastive step multiplies
only B*k rows (4 at batch 1) by every weight matrix. numpy has no int8 (or float16) product, so
the runtime used to dequantize int8 weights to float32 and call OpenBLAS, which reads 4x the
bytes CTranslate2 reads and packs the weights on every call; measured, 4-row products ran at about
8 GB/s, a third of this machine's bandwidth. Here the weights stay int8 (or float32) as
CTranslate2 stores them, and the kernel takes every row count for int8 models, the encoder's too.

The modes (py_linear):
  0, 1  float32 activations x float32 weights, or int8 weights converted to float32 in registers
        (weight-only quantization: x . (W / scale) up to the order of the float sums). A tile of
        MR (<= 4) activation rows x 4 weight rows keeps 16 AVX-512 accumulators.
  2     int8 weights x int16 activations (AVX512-VNNI VPDPWSSD, 32 products an instruction; each
        row quantized with its own scale, max |x| -> 32767), the weights packed as for mode 4: the
        products where int8 activations cost agreement with float32 (qlinear.Linear.from_stored
        says which).
  3     int8 weights x int8 activations with AMX (Sapphire Rapids and later; TDPBSSD).
  4     int8 weights x int8 activations with AVX512-VNNI (VPDPBUSD, 64 products an instruction, no
        widening of the weights, no horizontal sums): the weights packed once in AMX's layout.
In modes 3 and 4 each activation row is quantized to int8 with its own scale (max |x| -> 127, as
CTranslate2's int8 GEMMs), the products are summed exactly in int32, and a row's result depends on
that row alone. Work is split by groups of outputs over the pool of _pool.c (the caller does the
work of a thread that is not on a core; with AMX, OpenMP's threads). Built with AVX-512 (and
VNNI, AMX) target attributes and dispatched at run time: `available()`, `vnni_available()`,
`amx_available()` say what the CPU (and kernel, compiler) can run; without AVX-512 the Python side
keeps numpy. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_pool.h"
#include "_simd.h"
#include "_qlinear.h"
#include "_t5ops.h"
#include "_choose.h"

#define NR 4
/* Software prefetch distance, in weight rows ahead of the tile being computed. A tile reads 4 short
   rows (512 bytes for d_model 512), and hardware prefetchers stop at each 4 KiB page: measured in a
   real step (weights not in cache), small matrices streamed at about 5 GB/s without this. */
#ifndef PF_ROWS
#define PF_ROWS 16
#endif

#define TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))

TARGET static inline __m512 load_w16(const void *w, int is_int8, Py_ssize_t k, __mmask16 mask) {
    if (is_int8) {
        __m128i q = _mm_maskz_loadu_epi8(mask, (const int8_t *)w + k);
        return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q));
    }
    return _mm512_maskz_loadu_ps(mask, (const float *)w + k);
}

/* One tile: MR activation rows (a compile-time constant after inlining) x NR weight rows. */
TARGET static inline __attribute__((always_inline)) void tile(
    const int MR, const float *x, Py_ssize_t K, const char *w, Py_ssize_t w_row_bytes, int is_int8,
    Py_ssize_t nr, const float *scale, float *out, Py_ssize_t ldo) {
    __m512 acc[4][NR];
    const char *wr[NR];
    for (int r = 0; r < NR; r++) {
        wr[r] = w + (r < nr ? r : nr - 1) * w_row_bytes; /* a short tile repeats its last row */
        for (int i = 0; i < MR; i++) acc[i][r] = _mm512_setzero_ps();
    }
    Py_ssize_t k = 0;
    const Py_ssize_t pf = PF_ROWS * w_row_bytes;
    for (; k + 16 <= K; k += 16) {
        __m512 wf[NR];
        for (int r = 0; r < NR; r++) {
            _mm_prefetch(wr[r] + pf + k * (is_int8 ? 1 : 4), _MM_HINT_T0);
            wf[r] = load_w16(wr[r], is_int8, k, 0xFFFF);
        }
        for (int i = 0; i < MR; i++) {
            __m512 xv = _mm512_loadu_ps(x + i * K + k);
            for (int r = 0; r < NR; r++) acc[i][r] = _mm512_fmadd_ps(xv, wf[r], acc[i][r]);
        }
    }
    if (k < K) {
        __mmask16 mask = (__mmask16)((1u << (K - k)) - 1u);
        __m512 wf[NR];
        for (int r = 0; r < NR; r++) wf[r] = load_w16(wr[r], is_int8, k, mask);
        for (int i = 0; i < MR; i++) {
            __m512 xv = _mm512_maskz_loadu_ps(mask, x + i * K + k);
            for (int r = 0; r < NR; r++) acc[i][r] = _mm512_fmadd_ps(xv, wf[r], acc[i][r]);
        }
    }
    for (int i = 0; i < MR; i++)
        for (int r = 0; r < nr; r++) {
            float s = _mm512_reduce_add_ps(acc[i][r]);
            out[i * ldo + r] = scale ? s / scale[r] : s;
        }
}

typedef struct {
    const float *x;
    Py_ssize_t M, K, N, tiles, tasks, row_bytes;
    const char *w;
    int is_int8;
    const float *scale;
    float *out;
} float_job;

/* Contiguous runs of outputs per thread, for every product on the pool: one run a thread (each
   streams its share of the weights in order, as OpenMP's static schedule did; a late helper's run
   is taken by the caller) measured faster than 2 or 4 (benchmarks/RESULTS.md, "A pool whose
   caller does the work"). */
#ifndef POOL_RUNS
#define POOL_RUNS 1
#endif

/* How many tasks (contiguous runs) `units` units of output make on nt threads. */
static inline Py_ssize_t pool_tasks(Py_ssize_t units, int nt) {
    return nt > 1 ? (units < POOL_RUNS * nt ? units : POOL_RUNS * nt) : 1;
}

/* One task of linear_avx512: a contiguous run of tiles of 4 outputs, for every row. */
TARGET static void float_tiles(void *ctx, long task) {
    const float_job *j = ctx;
    const Py_ssize_t M = j->M, K = j->K, N = j->N, row_bytes = j->row_bytes;
    const Py_ssize_t t1 = (task + 1) * j->tiles / j->tasks;
    for (Py_ssize_t t = task * j->tiles / j->tasks; t < t1; t++) {
        const Py_ssize_t n0 = t * NR;
        const Py_ssize_t nr = N - n0 < NR ? N - n0 : NR;
        const char *wt = j->w + n0 * row_bytes;
        const float *st = j->scale ? j->scale + n0 : NULL;
        const float *x = j->x;
        float *out = j->out;
        Py_ssize_t m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) tile(4, x + m0 * K, K, wt, row_bytes, j->is_int8, nr, st, out + m0 * N + n0, N);
        switch (M - m0) {
            case 3: tile(3, x + m0 * K, K, wt, row_bytes, j->is_int8, nr, st, out + m0 * N + n0, N); break;
            case 2: tile(2, x + m0 * K, K, wt, row_bytes, j->is_int8, nr, st, out + m0 * N + n0, N); break;
            case 1: tile(1, x + m0 * K, K, wt, row_bytes, j->is_int8, nr, st, out + m0 * N + n0, N); break;
            default: break;
        }
    }
}

TARGET static void linear_avx512(const float *x, Py_ssize_t M, Py_ssize_t K, const char *w, int is_int8,
                                 Py_ssize_t N, const float *scale, float *out, int threads) {
    const Py_ssize_t tiles = (N + NR - 1) / NR;
    /* Threads only pay off on work that outlasts waking them (~several microseconds). */
    const int nt = (M * N * K >= (1 << 21) && threads > 1) ? threads : 1;
    const Py_ssize_t tasks = pool_tasks(tiles, nt);
    float_job job = {x, M, K, N, tiles, tasks, K * (is_int8 ? 1 : 4), w, is_int8, scale, out};
    pool_run((long)tasks, nt, float_tiles, &job);
}


#define VNNI_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni,fma")))

/* The largest |x| of a row, and 16 of the row's values at k (zeros beyond K: the padding). */
TARGET static inline float row_absmax(const float *row, Py_ssize_t K) {
    const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
    __m512 vmax = _mm512_setzero_ps();
    for (Py_ssize_t k = 0; k < K; k += 16) {
        const __mmask16 mask = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1u);
        vmax = _mm512_max_ps(vmax, _mm512_and_ps(_mm512_maskz_loadu_ps(mask, row + k), absmask));
    }
    return _mm512_reduce_max_ps(vmax);
}

TARGET static inline __m512i scaled16(const float *row, Py_ssize_t K, Py_ssize_t k, __m512 inv) {
    const Py_ssize_t left = K - k;
    const __mmask16 mask = left >= 16 ? (__mmask16)0xFFFF : left > 0 ? (__mmask16)((1u << left) - 1u) : 0;
    return _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mask, row + k), inv));
}

/* A row's quantization scale (max |x| -> qmax; 1 for a row of zeros, which then quantizes to 0). */
TARGET static inline float row_scale(const float *row, Py_ssize_t K, float qmax) {
    const float amax = row_absmax(row, K);
    return amax > 0.0f ? amax / qmax : 1.0f;
}

/* Rows of x quantized to int16 with a scale each (max |x| -> 32767: steps of 1/32767 of the row's
   largest value, against int8's 1/127), into rows of Kp (zeros beyond K). Rounds to nearest even
   (the default MXCSR mode, as lrintf), saturating. */
VNNI_TARGET static void quantize_rows(const float *x, Py_ssize_t M, Py_ssize_t K, Py_ssize_t Kp, int16_t *xq,
                                      float *sx) {
    /* each 4 inputs stored as (x0, x2, x1, x3): tile_vnni16's pairs (words 0 and 2 of a weight dword,
       then 1 and 3) */
    const __m256i order = _mm256_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15, 0, 1, 4, 5, 2, 3,
                                           6, 7, 8, 9, 12, 13, 10, 11, 14, 15);
    for (Py_ssize_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        const float s = row_scale(row, K, 32767.0f);
        const __m512 inv = _mm512_set1_ps(1.0f / s);
        for (Py_ssize_t k = 0; k < Kp; k += 16)
            _mm256_storeu_si256((__m256i *)(xq + m * Kp + k),
                                _mm256_shuffle_epi8(_mm512_cvtsepi32_epi16(scaled16(row, K, k, inv)), order));
        sx[m] = s;
    }
}

/* Rows of x quantized to int8 with a scale each (max |x| -> 127, as CTranslate2's int8 GEMMs), into
   rows of Kp (zeros beyond K), plus `offset` (0: signed int8 for AMX; 128: the same values as
   unsigned bytes for VPDPBUSD, whose first operand is unsigned). Rounds to nearest even, saturating. */
TARGET static void quantize_rows_i8(const float *x, Py_ssize_t M, Py_ssize_t K, Py_ssize_t Kp, int8_t *xq,
                                    float *sx, int offset) {
    const __m128i off = _mm_set1_epi8((char)offset);
    for (Py_ssize_t m = 0; m < M; m++) {
        const float *row = x + m * K;
        const float s = row_scale(row, K, 127.0f);
        const __m512 inv = _mm512_set1_ps(1.0f / s);
        for (Py_ssize_t k = 0; k < Kp; k += 16)
            _mm_storeu_si128((__m128i *)(xq + m * Kp + k),
                             _mm_add_epi8(_mm512_cvtsepi32_epi8(scaled16(row, K, k, inv)), off));
        sx[m] = s;
    }
}

/* ---- int8 weights x int8 activations with AVX512-VNNI (VPDPBUSD: 64 products per instruction) ----
   Activations are quantized per row as for AMX (quantize_rows_i8) and stored +128 as unsigned bytes,
   since VPDPBUSD multiplies unsigned by signed bytes; sum_k (x_k + 128) w_k = sum_k x_k w_k +
   128 sum_k w_k, so each output subtracts 128 times its weight row's sum (computed once, by
   pack_vnni). The weights are packed once in AMX's layout (pack_amx: blocks of 16 outputs, each
   64-byte line holding 4 consecutive inputs of the 16 outputs), so one VPDPBUSD of a line with a
   broadcast dword of 4 activations adds 4 products to each of 16 outputs: an accumulator holds 16
   finished outputs, and nothing is reduced across lanes. A tile is MR activation rows by the 64
   outputs of a group (4 accumulators a row). Exact in int32: a lane adds Kp products of at most
   255 * 128 in magnitude, and the products stop (ValueError) beyond VNNI8_MAX_K = 65536 inputs
   (255 * 128 * 65536 < 2^31); the sums of the weights are at most 128 * 65536 in magnitude. */
#define VNNI8_MAX_K 65536
#ifndef VNNI8_PF_CHUNKS
#define VNNI8_PF_CHUNKS 4 /* prefetch distance in 4 KiB chunks of a group, as AMX_PF_CHUNKS */
#endif
/* A packed tile's prefetches at chunk kb: with `own`, its own `bytes` of the group VNNI8_PF_CHUNKS
   chunks ahead (into L1); with `ahead`, its slice of the next group (packed_group, into L2). */
static inline __attribute__((always_inline)) void prefetch_chunk(int own, const int8_t *chunk, int bytes,
                                                                 const char *ahead, Py_ssize_t ahead_step,
                                                                 Py_ssize_t kb) {
    if (own)
        for (int line = 0; line < bytes; line += 64)
            _mm_prefetch((const char *)(chunk + VNNI8_PF_CHUNKS * 4096 + line), _MM_HINT_T0);
    if (ahead)
        for (Py_ssize_t line = 0; line < ahead_step; line += 64) _mm_prefetch(ahead + kb * ahead_step + line, _MM_HINT_T1);
}

/* Rows a tile. Measured on the 2-core EPYC (two threads, weights in cache): 4 rows (16
   accumulators) ran 800 x 512 by 512 x 1536 at 1850 GOP/s, 5 rows at 990 and 6 at 720 (the
   compiler spills their accumulators), against 520 for the int16 path. */
#define VNNI8_MR 4

VNNI_TARGET static inline __attribute__((always_inline)) void tile_vnni8(
    const int MR, const uint8_t *xq, Py_ssize_t Kp, const float *sx, const int8_t *wg, const int32_t *wsum,
    const float *scale, Py_ssize_t n0, Py_ssize_t N, int prefetch, const char *ahead, Py_ssize_t ahead_step,
    float *out, Py_ssize_t ldo) {
    __m512i acc[4][4];
    for (int i = 0; i < MR; i++)
        for (int b = 0; b < 4; b++) acc[i][b] = _mm512_setzero_si512();
    const Py_ssize_t KB = Kp / 64;
    for (Py_ssize_t kb = 0; kb < KB; kb++) {
        const int8_t *chunk = wg + kb * 4096;
        prefetch_chunk(prefetch && kb + VNNI8_PF_CHUNKS < KB, chunk, 4096, ahead, ahead_step, kb);
        const uint8_t *xk = xq + kb * 64;
        for (int r = 0; r < 16; r++) {
            __m512i wv[4];
            for (int b = 0; b < 4; b++) wv[b] = _mm512_loadu_si512((const void *)(chunk + b * 1024 + r * 64));
            for (int i = 0; i < MR; i++) {
                int32_t quad;
                memcpy(&quad, xk + i * Kp + 4 * r, 4);
                const __m512i xb = _mm512_set1_epi32(quad);
                for (int b = 0; b < 4; b++) acc[i][b] = _mm512_dpbusd_epi32(acc[i][b], xb, wv[b]);
            }
        }
    }
    for (int b = 0; b < 4; b++) {
        const Py_ssize_t n = n0 + 16 * b;
        if (n >= N) break;
        const __mmask16 mask = N - n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1u);
        const __m512i corr = _mm512_slli_epi32(_mm512_loadu_si512((const void *)(wsum + n)), 7);
        const __m512 sc = _mm512_maskz_loadu_ps(mask, scale + n);
        for (int i = 0; i < MR; i++) {
            const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][b], corr));
            _mm512_mask_storeu_ps(out + i * ldo + n, mask, _mm512_div_ps(_mm512_mul_ps(v, _mm512_set1_ps(sx[i])), sc));
        }
    }
}

/* ---- int8 weights x int16 activations with AVX512-VNNI (VPDPWSSD: 32 products per instruction) ----
   For the products where int8 activations cost agreement with float32 (qlinear.Linear.from_stored
   says which): each row quantized to int16 (quantize_rows), the same packed weights as mode 4 (or
   AMX's, without the sums). A 64-byte line (16 outputs x 4 inputs w0..w3) read as 16-bit words
   (w1:w0, w3:w2) gives, by two shifts, 16 outputs x (w0, w2) and by one shift 16 outputs x
   (w1, w3), sign-extended to int16 in place; quantize_rows stores each 4 activations in the
   matching order (x0, x2, x1, x3), so two VPDPWSSD with a broadcast dword each add the 4 products
   to each output's own lane. A tile is MR rows by the group's 64 outputs (16 accumulators, as
   mode 4's). Before (the sixth and seventh sessions), a line was widened into two registers of 8
   outputs x 4 inputs, with a 64-bit broadcast the row's four activations, and each output's two
   lanes added once per chunk: 1.2-1.3x slower at 8-32 rows (RESULTS.md, issue 15 eighth
   session); every integer sum is the same. Exact in int32 per chunk: an output's lane adds 4
   products of at most 32767 x 128 in magnitude per 4 inputs, and is flushed to float every
   VNNI16_CHUNK_KB x 64 = 512 inputs (512 products: 2,147,418,112 < 2^31). Before that, this path
   took the weights row by row and ended each output with a horizontal sum: 2.4x-3.4x slower at
   8-32 rows (RESULTS.md, issue 15 sixth session). */
#define VNNI16_CHUNK_KB 8

/* acc + the pairwise products of a and b's int16 words (VPDPWSSD), in acc's own register. Written
   in asm because with the intrinsic, two updates of an accumulator a line made the compiler copy
   every accumulator to another register and spill some inside the inner loop (28 moves and stores
   a line of 32 VPDPWSSD, and the 4-row tile 1.2-1.3x slower). */
VNNI_TARGET static inline __attribute__((always_inline)) __m512i dpwssd_in_place(__m512i acc, __m512i a, __m512i b) {
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b));
    return acc;
}

VNNI_TARGET static inline __attribute__((always_inline)) void tile_vnni16(
    const int MR, const int16_t *xq, Py_ssize_t Kp, const float *sx, const int8_t *wg, const float *scale,
    Py_ssize_t n0, Py_ssize_t N, int prefetch, const char *ahead, Py_ssize_t ahead_step, float *out,
    Py_ssize_t ldo) {
    __m512 total[4][4];
    for (int i = 0; i < MR; i++)
        for (int b = 0; b < 4; b++) total[i][b] = _mm512_setzero_ps();
    const Py_ssize_t KB = Kp / 64;
    for (Py_ssize_t c0 = 0; c0 < KB; c0 += VNNI16_CHUNK_KB) {
        const Py_ssize_t c1 = c0 + VNNI16_CHUNK_KB < KB ? c0 + VNNI16_CHUNK_KB : KB;
        __m512i acc[4][4];
        for (int i = 0; i < MR; i++)
            for (int b = 0; b < 4; b++) acc[i][b] = _mm512_setzero_si512();
        for (Py_ssize_t kb = c0; kb < c1; kb++) {
            const int8_t *chunk = wg + kb * 4096;
            prefetch_chunk(prefetch && kb + VNNI8_PF_CHUNKS < KB, chunk, 4096, ahead, ahead_step, kb);
            const int16_t *xk = xq + kb * 64;
            for (int r = 0; r < 16; r++) {
                /* a line: 16 outputs x bytes (w0, w1, w2, w3); as words (w1:w0, w3:w2), so the low
                   bytes sign-extended are (w0, w2) and the high bytes (w1, w3) */
                __m512i lo[4], hi[4];
                for (int b = 0; b < 4; b++) {
                    const __m512i line = _mm512_loadu_si512((const void *)(chunk + b * 1024 + r * 64));
                    lo[b] = _mm512_srai_epi16(_mm512_slli_epi16(line, 8), 8);
                    hi[b] = _mm512_srai_epi16(line, 8);
                }
                for (int i = 0; i < MR; i++) {
                    int32_t even, odd; /* (x0, x2) and (x1, x3): quantize_rows' order */
                    memcpy(&even, xk + i * Kp + 4 * r, 4);
                    memcpy(&odd, xk + i * Kp + 4 * r + 2, 4);
                    const __m512i xe = _mm512_set1_epi32(even), xo = _mm512_set1_epi32(odd);
                    for (int b = 0; b < 4; b++) {
                        acc[i][b] = dpwssd_in_place(acc[i][b], xe, lo[b]);
                        acc[i][b] = dpwssd_in_place(acc[i][b], xo, hi[b]);
                    }
                }
            }
        }
        for (int i = 0; i < MR; i++)
            for (int b = 0; b < 4; b++) total[i][b] = _mm512_add_ps(total[i][b], _mm512_cvtepi32_ps(acc[i][b]));
    }
    for (int b = 0; b < 4; b++) {
        const Py_ssize_t n = n0 + 16 * b;
        if (n >= N) break;
        const __mmask16 mask = N - n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (N - n)) - 1u);
        const __m512 sc = _mm512_maskz_loadu_ps(mask, scale + n);
        for (int i = 0; i < MR; i++)
            _mm512_mask_storeu_ps(out + i * ldo + n, mask,
                                  _mm512_div_ps(_mm512_mul_ps(total[i][b], _mm512_set1_ps(sx[i])), sc));
    }
}

/* One tile of R rows by a group's 64 outputs: int8 activations (wide 0) or int16 (wide 1: two
   tiles of 32 outputs). */
VNNI_TARGET static inline __attribute__((always_inline)) void packed_tile(
    const int R, int wide, const void *x, Py_ssize_t Kp, const float *sx, const int8_t *wg, const int32_t *wsum,
    const float *scale, Py_ssize_t n0, Py_ssize_t N, int prefetch, const char *ahead, Py_ssize_t ahead_step,
    float *out) {
    if (wide) {
        tile_vnni16(R, x, Kp, sx, wg, scale, n0, N, prefetch, ahead, ahead_step, out, N);
    } else {
        tile_vnni8(R, x, Kp, sx, wg, wsum, scale, n0, N, prefetch, ahead, ahead_step, out, N);
    }
}

/* Rows per block: a block's activations (128 KiB for K = 512) stay in L2 while every group of
   weights passes over them (as VNNI_BLOCK_ROWS for the int16 path). A multiple of VNNI8_MR. */
#ifndef VNNI8_BLOCK_ROWS
#define VNNI8_BLOCK_ROWS 256
#endif

/* xq: M rows of Kp (K rounded up to 64) activations: int8 + 128 (wide 0, mode 4) or int16 (wide 1,
   mode 2); wp: the packed weights (pack_vnni's buffer: then the int32 sum of each of the Np = N
   rounded up to 64 weight rows, which mode 4 needs; mode 2 also takes pack_amx's). */
typedef struct {
    int wide;
    const void *xq;
    Py_ssize_t Kp, KB, rows, m0, N, row_bytes, groups, tasks;
    const float *sx, *scale;
    const int8_t *wp;
    const int32_t *wsum;
    float *out;
} packed_job;

/* Whether the tiles after a group's first fetch the next group into L2 while they compute (on by
   default; `packed_ahead(False)` turns it off for benchmarks/bench_step_products.py's side by side). */
static int packed_ahead = 1;

/* One group of 64 outputs for the block's rows. The first tile reads the group from memory
   (prefetched a few chunks ahead, into L1); the others read it from cache, and with PACKED_AHEAD
   fetch the next group of this task (`next`, NULL for the last) into L2 in equal slices, so that
   its memory reads overlap their arithmetic instead of waiting for the next first tile: one pass
   over FLAN-T5-small's decoder products took 15-20% less time at 8 and 32 rows (the lm_head at 8
   rows 20% less), and the same at one row, which has a single tile (RESULTS.md, issue 15 seventh
   session). */
VNNI_TARGET static inline void packed_group(const packed_job *j, Py_ssize_t g, int has_next) {
    const int8_t *wg = j->wp + g * j->KB * 4096;
    const Py_ssize_t tiles = (j->rows + VNNI8_MR - 1) / VNNI8_MR;
    const char *next = packed_ahead && has_next && tiles > 1 ? (const char *)(wg + j->KB * 4096) : NULL;
    /* bytes of the next group each later tile fetches per chunk of 64 inputs, in whole lines */
    const Py_ssize_t step = next ? (4096 + 64 * (tiles - 1) - 1) / (64 * (tiles - 1)) * 64 : 0;
    for (Py_ssize_t t = 0; t < tiles; t++) {
        const Py_ssize_t i = t * VNNI8_MR, m = j->m0 + i;
        const void *x = (const char *)j->xq + m * j->row_bytes;
        const float *s = j->sx + m;
        float *o = j->out + m * j->N;
        const int wide = j->wide, first = t == 0;
        const char *ahead = t > 0 && next ? next + (t - 1) * step * j->KB : NULL;
        const Py_ssize_t Kp = j->Kp, N = j->N, n0 = g * 64;
        const int8_t *w = wg;
        const int32_t *ws = j->wsum;
        const float *sc = j->scale;
        switch (j->rows - i < VNNI8_MR ? j->rows - i : VNNI8_MR) {
            case 4: packed_tile(4, wide, x, Kp, s, w, ws, sc, n0, N, first, ahead, step, o); break;
            case 3: packed_tile(3, wide, x, Kp, s, w, ws, sc, n0, N, first, ahead, step, o); break;
            case 2: packed_tile(2, wide, x, Kp, s, w, ws, sc, n0, N, first, ahead, step, o); break;
            default: packed_tile(1, wide, x, Kp, s, w, ws, sc, n0, N, first, ahead, step, o); break;
        }
    }
}


/* One task of linear_packed: a contiguous run of groups (each thread streams its share of the
   weights in order, as OpenMP's static schedule did). */
VNNI_TARGET static void packed_groups(void *ctx, long task) {
    const packed_job *j = ctx;
    const Py_ssize_t g1 = (task + 1) * j->groups / j->tasks;
    for (Py_ssize_t g = task * j->groups / j->tasks; g < g1; g++) packed_group(j, g, g + 1 < g1);
}

/* Products from this many multiply-adds take a second thread (pool_run: the caller never waits
   for a helper that is not on a core, so even one row's product may share its groups). */
#ifndef PACKED_PARALLEL_MIN_WORK
#define PACKED_PARALLEL_MIN_WORK (1 << 18)
#endif

/* xq: M rows of Kp (K rounded up to 64) activations: int8 + 128 (wide 0, mode 4) or int16 (wide 1,
   mode 2); wp: the packed weights (pack_vnni's buffer: then the int32 sum of each of the Np = N
   rounded up to 64 weight rows, which mode 4 needs; mode 2 also takes pack_amx's). */
VNNI_TARGET static void linear_packed(int wide, const void *xq, Py_ssize_t Kp, const float *sx, Py_ssize_t M,
                                      const int8_t *wp, Py_ssize_t N, const float *scale, float *out, int threads) {
    const Py_ssize_t KB = Kp / 64, groups = (N + 63) / 64;
    packed_job job = {wide, xq, Kp, KB, 0, 0, N, Kp * (wide ? 2 : 1), groups, 1, sx, scale, wp,
                      (const int32_t *)(wp + groups * KB * 4096), out};
    for (Py_ssize_t m0 = 0; m0 < M; m0 += VNNI8_BLOCK_ROWS) {
        job.m0 = m0;
        job.rows = M - m0 < VNNI8_BLOCK_ROWS ? M - m0 : VNNI8_BLOCK_ROWS;
        const int nt = (job.rows * N * Kp >= PACKED_PARALLEL_MIN_WORK && threads > 1) ? threads : 1;
        job.tasks = pool_tasks(groups, nt);
        pool_run((long)job.tasks, nt, packed_groups, &job);
    }
}

static int vnni_ok(void) { return avx512_ok() && __builtin_cpu_supports("avx512vnni"); }


/* ---- int8 weights x int8 activations with AMX (TDPBSSD: 16x16x64 products per instruction) ----
   Sapphire Rapids and later. Each activation row is quantized to int8 with its own scale (max |x|
   -> 127, as CTranslate2's int8 GEMMs do), the products accumulate exactly in int32, and a row's
   result depends on that row alone. The weights are packed once (pack_amx) into AMX's layout: a
   tile is a block of 16 outputs by 64 inputs, 16 lines of 64 bytes where line r holds, for each of
   the 16 outputs n, inputs 4r..4r+3 (W[n0 + n][k0 + 4r + i] at byte 4n + i). Tiles are ordered
   [group of 64 outputs][64 inputs][4 blocks of 16 outputs], so that a group's product reads one
   sequential stream; N is padded to 64 and K to 64 with zeros. Measured on the 2-core Xeon: a 32 x 512 by 512 x 2048 product in 35 us on one
   core (948 GMAC/s), against 340 us on two cores for VNNI. Linux needs the process to ask for the
   AMX state once (arch_prctl); amx_ok() does, and says no if the CPU, the kernel or the compiler
   cannot. */
#if (defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11) || (defined(__clang__) && __clang_major__ >= 12)
#define HAVE_AMX 1
#include <sys/syscall.h>
#include <unistd.h>
#include <cpuid.h>
#define AMX_TARGET __attribute__((target("amx-tile,amx-int8,avx512f,avx512bw,avx512dq,avx512vl,fma")))
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef struct {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((packed)) amx_config;

static int amx_state = -1; /* -1: not asked yet; 0: no; 1: yes */

static int amx_ok(void) {
    if (amx_state >= 0) return amx_state;
    unsigned a, b, c, d;
    amx_state = 0;
    if (!avx512_ok() || !__get_cpuid_count(7, 0, &a, &b, &c, &d)) return 0;
    if (!((d >> 24) & 1) || !((d >> 25) & 1)) return 0; /* AMX-TILE, AMX-INT8 */
    if (syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) != 0) return 0;
    amx_state = 1;
    pool_use_openmp(1); /* AMX's products run on OpenMP threads: everything else joins them */
    return 1;
}

/* One block of 16 activation rows by one group of 64 outputs (4 blocks of 16): C tiles 0..3, A in
   tile 4, B in tiles 5..7 (the fourth B reuses 5). The group's tiles for the next AMX_PF_CHUNKS
   chunks of inputs are prefetched: without it a tile load waits on memory (6-13 GB/s measured). */
#ifndef AMX_PF_CHUNKS
#define AMX_PF_CHUNKS 4 /* prefetch distance, in 4 KiB chunks (one per 64 inputs) of a group */
#endif
AMX_TARGET static inline void amx_block(const int8_t *xq, Py_ssize_t Kp, const int8_t *wp, Py_ssize_t KB,
                                        int32_t *acc /* [16][64] */) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    const int8_t *end = wp + KB * 4096;
    for (Py_ssize_t kb = 0; kb < KB; kb++) {
        const int8_t *b = wp + kb * 4096;
        const int8_t *pf = b + AMX_PF_CHUNKS * 4096;
        if (pf < end)
            for (int line = 0; line < 4096; line += 64) _mm_prefetch((const char *)(pf + line), _MM_HINT_T0);
        _tile_loadd(4, xq + kb * 64, Kp);
        _tile_loadd(5, b, 64);
        _tile_dpbssd(0, 4, 5);
        _tile_loadd(6, b + 1024, 64);
        _tile_dpbssd(1, 4, 6);
        _tile_loadd(7, b + 2048, 64);
        _tile_dpbssd(2, 4, 7);
        _tile_loadd(5, b + 3072, 64);
        _tile_dpbssd(3, 4, 5);
    }
    _tile_stored(0, acc, 256);
    _tile_stored(1, acc + 16, 256);
    _tile_stored(2, acc + 32, 256);
    _tile_stored(3, acc + 48, 256);
}

AMX_TARGET static void linear_amx(const int8_t *xq, Py_ssize_t Mp, Py_ssize_t Kp, const float *sx, Py_ssize_t M,
                                  const int8_t *wp, Py_ssize_t N, const float *scale, float *out, int threads) {
    const Py_ssize_t KB = Kp / 64, groups = (N + 63) / 64, mblocks = Mp / 16;
    const Py_ssize_t jobs = groups * mblocks;
    /* Few rows are bound by reading the weights, which two cores do faster than one. */
    const int nt = (Mp * N * Kp >= (1 << 21) && threads > 1) ? threads : 1;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        amx_config cfg;
        memset(&cfg, 0, sizeof cfg);
        cfg.palette_id = 1;
        for (int t = 0; t < 8; t++) {
            cfg.rows[t] = 16;
            cfg.colsb[t] = 64;
        }
        _tile_loadconfig(&cfg);
        int32_t acc[16 * 64] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (Py_ssize_t job = 0; job < jobs; job++) {
            /* a group's m-blocks one after the other: its weights are read from memory once */
            const Py_ssize_t g = job / mblocks, mb = job % mblocks;
            amx_block(xq + mb * 16 * Kp, Kp, wp + g * KB * 4096, KB, acc);
            const Py_ssize_t m0 = mb * 16, n0 = g * 64;
            for (Py_ssize_t i = 0; i < 16 && m0 + i < M; i++) {
                const float si = sx[m0 + i];
                for (Py_ssize_t j = 0; j < 64 && n0 + j < N; j++)
                    out[(m0 + i) * N + n0 + j] = (float)acc[i * 64 + j] * si / scale[n0 + j];
            }
        }
        _tile_release();
    }
}
#else
static int amx_ok(void) { return 0; }
#endif

static PyObject *py_available(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyBool_FromLong(avx512_ok());
}

static PyObject *py_vnni_available(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyBool_FromLong(vnni_ok());
}

static PyObject *py_amx_available(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    return PyBool_FromLong(amx_ok());
}

/* The int8 weights [N, K] in AMX's tile layout (see linear_amx; zero padded), into dst. */
static void pack_tiles(const int8_t *src, Py_ssize_t N, Py_ssize_t K, int8_t *dst) {
    const Py_ssize_t NB = (N + 63) / 64 * 4, KB = (K + 63) / 64;
    memset(dst, 0, (size_t)(NB * KB * 1024));
    for (Py_ssize_t nb = 0; nb < NB; nb++)
        for (Py_ssize_t kb = 0; kb < KB; kb++)
            for (int r = 0; r < 16; r++)
                for (int n = 0; n < 16; n++)
                    for (int i = 0; i < 4; i++) {
                        const Py_ssize_t row = nb * 16 + n, col = kb * 64 + 4 * r + i;
                        /* tile (group nb / 4, inputs kb, block nb % 4) */
                        const Py_ssize_t tile = ((nb / 4) * KB + kb) * 4 + nb % 4;
                        if (row < N && col < K) dst[tile * 1024 + r * 64 + n * 4 + i] = src[row * K + col];
                    }
}

/* Bytes of the packed tiles, and of pack_vnni's buffer (the tiles, then an int32 sum per padded row). */
static Py_ssize_t tiles_len(Py_ssize_t N, Py_ssize_t K) { return (N + 63) / 64 * 4 * ((K + 63) / 64) * 1024; }
static Py_ssize_t vnni8_len(Py_ssize_t N, Py_ssize_t K) { return tiles_len(N, K) + (N + 63) / 64 * 64 * 4; }

/* pack_amx(w, N, K) -> bytes: int8 weights [N, K] in AMX's layout (mode 3); pack_vnni(w, N, K) ->
   bytes: the same, then each weight row's sum as int32 (mode 4's +128 correction). */
static PyObject *pack(PyObject *args, int with_sums) {
    Py_buffer w;
    Py_ssize_t N, K;
    if (!PyArg_ParseTuple(args, "y*nn", &w, &N, &K)) return NULL;
    if (N <= 0 || K <= 0 || w.len != N * K) {
        PyBuffer_Release(&w);
        PyErr_SetString(PyExc_ValueError, "pack: the buffer is not N x K int8");
        return NULL;
    }
    PyObject *packed = PyBytes_FromStringAndSize(NULL, with_sums ? vnni8_len(N, K) : tiles_len(N, K));
    if (!packed) {
        PyBuffer_Release(&w);
        return NULL;
    }
    int8_t *dst = (int8_t *)PyBytes_AS_STRING(packed);
    const int8_t *src = (const int8_t *)w.buf;
    pack_tiles(src, N, K, dst);
    if (with_sums) {
        int32_t *sums = (int32_t *)(dst + tiles_len(N, K));
        for (Py_ssize_t n = 0; n < (N + 63) / 64 * 64; n++) {
            int32_t total = 0;
            for (Py_ssize_t k = 0; n < N && k < K; k++) total += src[n * K + k];
            memcpy(sums + n, &total, sizeof total); /* the bytes object's data need not be aligned */
        }
    }
    PyBuffer_Release(&w);
    return packed;
}

static PyObject *py_pack_amx(PyObject *self, PyObject *args) {
    (void)self;
    return pack(args, 0);
}

static PyObject *py_pack_vnni(PyObject *self, PyObject *args) {
    (void)self;
    return pack(args, 1);
}

/* linear(x, w, scale_or_None, out, M, K, N, mode, threads): buffers are C-contiguous, checked
   (dtypes and shapes) by engine/runtime/qlinear.py; sizes are re-checked here against the bytes.
   mode 0: float32 weights; 1: int8 weights converted to float; 2: int8 weights packed by pack_vnni
   or pack_amx (w is that buffer) x int16 activations with VNNI; 3: int8 weights packed by pack_amx
   x int8 activations with AMX; 4: int8 weights packed by pack_vnni x int8 activations with VNNI. */
/* Whether `mode` can run here and w (w_len bytes) and the scale (scale_len bytes, -1: none) fit
   N x K weights in it: 0, or -1 with a Python error set (the GIL held). */
int qlinear_check(int mode, Py_ssize_t N, Py_ssize_t K, Py_ssize_t w_len, Py_ssize_t scale_len) {
    const int is_int8 = mode != 0, has_scale = scale_len >= 0;
    if (mode < 0 || mode > 4 || (is_int8 && !has_scale)) {
        PyErr_SetString(PyExc_ValueError, "qlinear: mode must be 0 (float32) or 1 to 4 (int8, with a scale)");
        return -1;
    }
    if (mode == 4 && (K + 63) / 64 * 64 > VNNI8_MAX_K) {
        PyErr_SetString(PyExc_ValueError, "qlinear: mode 4 takes at most 65536 inputs (int32 sums)");
        return -1;
    }
    if (!(mode == 3 ? amx_ok() : mode == 2 || mode == 4 ? vnni_ok() : avx512_ok())) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU lacks the extensions this mode needs");
        return -1;
    }
    if (K <= 0 || N <= 0) {
        PyErr_SetString(PyExc_ValueError, "qlinear: K and N must be positive");
        return -1;
    }
    const Py_ssize_t want = mode == 3 ? tiles_len(N, K) : mode == 4 ? vnni8_len(N, K) : N * K * (is_int8 ? 1 : 4);
    const int w_ok = mode == 2 ? w_len == vnni8_len(N, K) || w_len == tiles_len(N, K) : w_len == want;
    if (!w_ok || (has_scale && scale_len != N * 4)) {
        PyErr_SetString(PyExc_ValueError, "qlinear: buffer sizes do not match M, K, N");
        return -1;
    }
    return 0;
}

/* out[M, N] = x[M, K] . w^T (/ scale) in `mode`, checked by qlinear_check: the one entry of every
   product, Python's (py_linear) and C's (_t5ops.c's decoder_layers). Modes 2-4 quantize the
   activations first (rows of Kp values; Mp rows: AMX's 16-row tiles). No Python calls: it runs
   without the GIL. Returns 0, or -1 when memory for the quantized activations ran out. */
int qlinear_compute(int mode, const float *x, Py_ssize_t M, Py_ssize_t K, const void *w, const float *scale,
                    Py_ssize_t N, float *out, int threads) {
    const Py_ssize_t Kp = (K + 63) / 64 * 64;
    const Py_ssize_t Mp = mode == 3 ? (M + 15) / 16 * 16 : M;
    void *xq = NULL;
    float *sx = NULL;
    if (mode >= 2) {
        const size_t bytes = (size_t)(Mp * Kp * (mode == 2 ? 2 : 1));
        xq = aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
        sx = malloc((size_t)(M > 0 ? M : 1) * sizeof(float));
        if (!xq || !sx) {
            free(xq);
            free(sx);
            return -1;
        }
        if (mode == 3) memset(xq, 0, bytes);
    }
#ifdef HAVE_AMX
    if (mode == 3) {
        quantize_rows_i8(x, M, K, Kp, xq, sx, 0);
        if (M > 0) linear_amx(xq, Mp, Kp, sx, M, w, N, scale, out, threads);
    } else
#endif
    if (qlinear_takes_quantized(mode)) {
        qlinear_quantize(mode, x, M, K, xq, sx);
        qlinear_product_quantized(mode, xq, sx, M, K, w, scale, N, out, threads);
    } else {
        linear_avx512(x, M, K, w, mode != 0, N, scale, out, threads);
    }
    free(xq);
    free(sx);
    return 0;
}

/* The packed VNNI modes' two halves, for callers that quantize rows themselves (_t5ops.c splits
   the feed-forward's activation and its quantization over the pool's threads by rows). */
int qlinear_takes_quantized(int mode) { return mode == 2 || mode == 4; }

Py_ssize_t qlinear_quantized_row_bytes(int mode, Py_ssize_t K) { return (K + 63) / 64 * 64 * (mode == 2 ? 2 : 1); }

void qlinear_quantize(int mode, const float *x, Py_ssize_t M, Py_ssize_t K, void *xq, float *sx) {
    const Py_ssize_t Kp = (K + 63) / 64 * 64;
    if (mode == 2)
        quantize_rows(x, M, K, Kp, xq, sx);
    else
        quantize_rows_i8(x, M, K, Kp, xq, sx, 128);
}

void qlinear_product_quantized(int mode, const void *xq, const float *sx, Py_ssize_t M, Py_ssize_t K, const void *w,
                               const float *scale, Py_ssize_t N, float *out, int threads) {
    linear_packed(mode == 2, xq, (K + 63) / 64 * 64, sx, M, w, N, scale, out, threads);
}

static PyObject *py_linear(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer x, w, out, scale = {0};
    PyObject *scale_obj;
    Py_ssize_t M, K, N;
    int mode, threads;
    if (!PyArg_ParseTuple(args, "y*y*Ow*nnnii", &x, &w, &scale_obj, &out, &M, &K, &N, &mode, &threads))
        return NULL;
    int has_scale = scale_obj != Py_None, status;
    if (has_scale && PyObject_GetBuffer(scale_obj, &scale, PyBUF_SIMPLE) < 0) goto fail;
    if (qlinear_check(mode, N, K, w.len, has_scale ? scale.len : -1) < 0) goto fail;
    if (M < 0 || x.len != M * K * 4 || out.len != M * N * 4) {
        PyErr_SetString(PyExc_ValueError, "qlinear: buffer sizes do not match M, K, N");
        goto fail;
    }
    Py_BEGIN_ALLOW_THREADS status = qlinear_compute(mode, x.buf, M, K, w.buf, has_scale ? scale.buf : NULL, N,
                                                    out.buf, threads);
    Py_END_ALLOW_THREADS if (status < 0) {
        PyErr_NoMemory();
        goto fail;
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&w);
    PyBuffer_Release(&out);
    if (has_scale) PyBuffer_Release(&scale);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&x);
    PyBuffer_Release(&w);
    PyBuffer_Release(&out);
    if (has_scale && scale.obj) PyBuffer_Release(&scale);
    return NULL;
}

static PyObject *py_pool_openmp(PyObject *self, PyObject *args) {
    (void)self;
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    if (amx_ok() && !on) {
        PyErr_SetString(PyExc_ValueError, "with AMX the kernel's threads are OpenMP's (AMX tiles are configured per thread)");
        return NULL;
    }
    pool_use_openmp(on);
    Py_RETURN_NONE;
}

static PyObject *py_packed_ahead(PyObject *self, PyObject *args) {
    (void)self;
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    packed_ahead = on;
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"available", py_available, METH_NOARGS, "Whether this CPU can run the kernels (AVX-512F/BW/DQ/VL)."},
    {"vnni_available", py_vnni_available, METH_NOARGS, "Whether this CPU has AVX512-VNNI too (mode 2)."},
    {"amx_available", py_amx_available, METH_NOARGS, "Whether AMX-INT8 can run here (mode 3): CPU, kernel, compiler."},
    {"pack_amx", py_pack_amx, METH_VARARGS, "int8 weights [N, K] -> bytes in AMX's tile layout (mode 3)."},
    {"pack_vnni", py_pack_vnni, METH_VARARGS, "int8 weights [N, K] -> bytes: AMX's layout + row sums (mode 4)."},
    {"pool_openmp", py_pool_openmp, METH_VARARGS,
     "Run the kernel's parallel work on OpenMP's threads (True) or on its own pool (False, the default "
     "without AMX): for benchmarks/bench_pool.py's side-by-side timing."},
    {"packed_ahead", py_packed_ahead, METH_VARARGS,
     "Whether a packed product's later tiles fetch the next group of weights into L2 (True, the "
     "default): for benchmarks/bench_step_products.py's side-by-side timing."},
    {"linear", py_linear, METH_VARARGS, "out[M, N] = x[M, K] . w[N, K]^T (/ scale[N]); see qlinear.py."},
    /* the rest of a T5 layer: _t5ops.c, engine/runtime/t5ops.py */
    {"rms_norm", t5ops_rms_norm, METH_VARARGS, "T5's RMS norm of rows; see t5ops.py."},
    {"activation", t5ops_activation, METH_VARARGS, "The feed-forward's (gated) ReLU or GELU; see t5ops.py."},
    {"attention", t5ops_attention, METH_VARARGS, "One layer's attention over B sequences x H heads; see t5ops.py."},
    {"decoder_plan", t5ops_decoder_plan, METH_VARARGS, "A decoder's weights taken once for decoder_layers; see t5ops.py."},
    {"decoder_layers", t5ops_decoder_layers, METH_VARARGS, "Every decoder layer of a step in one call; see t5ops.py."},
    {"layers_timing", t5ops_layers_timing, METH_VARARGS,
     "Timers of decoder_layers' parts on or off, totals zeroed: for benchmarks/profile_step.py."},
    {"layers_timing_read", t5ops_layers_timing_read, METH_NOARGS, "decoder_layers' seconds by part; see t5ops.py."},
    {"top_k_softmax", choose_top_k_softmax, METH_VARARGS, "A row's top k by softmax (_choose.c); see choose_ops.py."},
    {"top_k_softmax_rows", choose_top_k_softmax_rows, METH_VARARGS,
     "Many rows' top k by softmax, over the pool's threads (_choose.c); see choose_ops.py."},
    {"degeneration_penalty", choose_degeneration_penalty, METH_VARARGS,
     "Contrastive search's max cosine per candidate (_choose.c); see choose_ops.py."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_qlinear", NULL, -1, methods, NULL, NULL, NULL, NULL};

/* LAYOUT: which weights modes 2 and 4 take. 2: both the packed buffer (pack_vnni). Builds without it
   (before packing, or with mode 4 packed and mode 2 on the weights as stored) are told apart by
   engine/runtime/qlinear.py, which then runs mode 2 on the stored weights. */
#define LAYOUT 2

PyMODINIT_FUNC PyInit__qlinear(void) {
    PyObject *m = PyModule_Create(&module);
    if (m && PyModule_AddIntConstant(m, "LAYOUT", LAYOUT) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
