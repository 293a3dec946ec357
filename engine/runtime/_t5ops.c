/* The rest of a T5 layer in the compiled kernel: attention, RMS norm, the feed-forward's activation.

Why this exists (engine/runtime/t5ops.py is the Python side): with the products in _qlinear.c, a
contrastive step at batch 8 (32 rows) was bound by numpy's attention and element-wise work, about
sixty numpy calls a decoder layer, each with its temporaries and its dispatch overhead. Here a
layer's attention is one call (scores, the relative position bias, softmax, the weighted values,
written straight into the layout the output projection reads), the norm one call, the gated
activation one call. The numpy code in engine/runtime/t5.py stays the reference and the fallback:
tests/test_t5ops.py holds each function equal to it within float32 rounding (sums in another
order, a polynomial exp good to about 2 ulp).

Attention here is one routine, `attend`, over one (sequence, head): rows of queries against n
keys, with an additive bias read through a pointer and two strides (so that the decoder's
bias-by-distance table, the encoder's [H, S, S] bias and cross-attention's padding row are the
same code), and optionally each row's own extra key (the decoder's new position, which is not in
the cache yet); it takes the rows four at a time, so that each key and value is read once for four
rows (attend_rows). (sequence, head) pairs are split over the pool of _pool.c. All functions need
AVX-512F; the module's `available()` says whether the CPU has it. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <time.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_pool.h"
#include "_qlinear.h"
#include "_t5ops.h"
#include "_simd.h"

#define TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))
/* Work (multiply-adds of scores and values, counted over the cache's capacity) from which a call
   splits its (sequence, head) pairs over threads. Every parallel region waits for its last thread:
   on a loaded machine (2 cores shared by several processes) a woken thread waited for a scheduler
   slice, and 2-thread regions took 8 ms where one thread took under 1 ms (measured ad hoc for
   products, load average 4-12), so this was 4 M (the encoder of a batch only). But a decoder
   step's attention at batch 8 reads its keys and values from memory (cross-attention: 2.4 MB a
   layer), and one core reads at about half the machine's bandwidth: from 64 K, the step's
   cross-attention at batch 8 fell from 0.75 to 0.39 ms, the whole step from 2.8 to 2.4 ms (one
   row a sequence; quiet machine, 2-core EPYC, issue 15 sixth session); batch 1 with one row
   (38 K) stays on one thread. */
#define PARALLEL_MIN_WORK (1 << 16)
/* Attention heads up to this width (T5's d_kv is 64): q, the output row and one key are held in
   registers, 16 floats each. */
#define MAX_D 256

/* ---------------------------------------------------------------- RMS norm
   out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * gamma, as T5LayerNorm (no mean, no bias). */
TARGET static void rms_norm(const float *x, const float *gamma, float *out, Py_ssize_t rows, Py_ssize_t d,
                            float eps) {
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *xr = x + r * d;
        __m512 acc = _mm512_setzero_ps();
        for (Py_ssize_t k = 0; k < d; k += 16) {
            const __m512 v = _mm512_maskz_loadu_ps(tail_mask(d - k), xr + k);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        const __m512 s = _mm512_set1_ps(sqrtf(_mm512_reduce_add_ps(acc) / (float)d + eps));
        for (Py_ssize_t k = 0; k < d; k += 16) {
            const __mmask16 m = tail_mask(d - k);
            const __m512 v = _mm512_div_ps(_mm512_maskz_loadu_ps(m, xr + k), s);
            _mm512_mask_storeu_ps(out + r * d + k, m, _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, gamma + k)));
        }
    }
}

/* ---------------------------------------------------------------- feed-forward activation
   h [rows, (gated ? 2 : 1) * f] -> out [rows, f]: act(h[:, :f]) (* h[:, f:2f] when gated).
   act 0: ReLU; 1: gelu_new, 0.5 x (1 + tanh(c (x + 0.044715 x^3))) = x / (1 + e^(-2 c (...))). */
TARGET static void activation(const float *h, float *out, Py_ssize_t rows, Py_ssize_t f, int gated, int act) {
    const Py_ssize_t ld = gated ? 2 * f : f;
    const __m512 c = _mm512_set1_ps(-2.0f * 0.7978845608028654f), a = _mm512_set1_ps(0.044715f);
    const __m512 one = _mm512_set1_ps(1.0f);
    for (Py_ssize_t r = 0; r < rows; r++) {
        const float *hr = h + r * ld;
        for (Py_ssize_t k = 0; k < f; k += 16) {
            const __mmask16 m = tail_mask(f - k);
            const __m512 x = _mm512_maskz_loadu_ps(m, hr + k);
            __m512 y;
            if (act == 0) {
                y = _mm512_max_ps(x, _mm512_setzero_ps());
            } else {
                const __m512 u = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_mul_ps(x, x), x), a, x);
                y = _mm512_div_ps(x, _mm512_add_ps(one, exp16(_mm512_mul_ps(c, u))));
            }
            if (gated) y = _mm512_mul_ps(y, _mm512_maskz_loadu_ps(m, hr + f + k));
            _mm512_mask_storeu_ps(out + r * f + k, m, y);
        }
    }
}

/* ---------------------------------------------------------------- attention
   One (sequence, head): `rows` queries q[r] (row stride ldq) against keys k[t], values v[t]
   (t < n, row stride ldkv), scores q . k + bias[r * bias_row + t * bias_key] (no 1/sqrt(d): T5),
   plus when own_k is set each row's own key own_k[r] / value own_v[r] (stride ld_own) with bias
   own_bias. out[r] (stride ldo) = softmax-weighted sum of the values. scores: n + 1 floats. */
typedef struct {
    const float *q, *k, *v, *own_k, *own_v, *bias;
    float *out;
    Py_ssize_t rows, n, d, ldq, ldkv, ld_own, ldo, bias_row, bias_key;
    float own_bias;
    /* prefetch (prefetch_stream): while the scores run, this head's values; while the values run, the
       next (sequence, head)'s keys, next_bytes of them (NULL: none). Only where keys and values are
       contiguous rows (ldkv == d: the decoder's caches and cross-attention). */
    const char *next_k;
    Py_ssize_t next_bytes;
} attend_args;

TARGET static inline float dot(const float *a, const float *b, Py_ssize_t d) {
    __m512 acc = _mm512_setzero_ps();
    for (Py_ssize_t k = 0; k < d; k += 16) {
        const __mmask16 m = tail_mask(d - k);
        acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + k), _mm512_maskz_loadu_ps(m, b + k), acc);
    }
    return _mm512_reduce_add_ps(acc);
}

/* hsum4 of four groups at once: a[g][c] -> lane 4g + c holds sum(a[g][c]), each sum in hsum4's order
   (the same bits): the pairs within blocks as hsum4, then the blocks of the four groups together. */
TARGET static inline __m512 hsum16(const __m512 a[4][4]) {
    __m512 u[4];
    for (int g = 0; g < 4; g++) {
        const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a[g][0], a[g][1]), _mm512_unpackhi_ps(a[g][0], a[g][1]));
        const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a[g][2], a[g][3]), _mm512_unpackhi_ps(a[g][2], a[g][3]));
        const __m512d p01 = _mm512_castps_pd(t01), p23 = _mm512_castps_pd(t23);
        u[g] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p01, p23)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(p01, p23)));
    }
    /* blocks (b0 + b2, b1 + b3) of groups 0-1 and 2-3, then (b0 + b2) + (b1 + b3) of each group */
    const __m512 v01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], 0x44), _mm512_shuffle_f32x4(u[0], u[1], 0xEE));
    const __m512 v23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], 0x44), _mm512_shuffle_f32x4(u[2], u[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(v01, v23, 0x88), _mm512_shuffle_f32x4(v01, v23, 0xDD));
}

/* Rows of one (sequence, head) taken together: each key and value is read once for up to
   ATTEND_ROWS query rows. A cross-attention's keys and values (S x D floats a head, 8 layers of
   them per step) come from L3 or memory at batch 8, and were read once per row: a contrastive step
   (4 rows a sequence) spent 4x a greedy step's time in cross-attention. Each row's arithmetic is
   unchanged (the same sums in the same order as one row alone). */
#define ATTEND_ROWS 4

/* A prefetch of `bytes` from `base` spread over `steps` calls of prefetch_next: each fetches the
   next `per` lines (into L2: the loop that reads them comes later), none past the end. */
typedef struct {
    const char *at, *end;
    Py_ssize_t per;
} prefetch_stream;

static inline prefetch_stream prefetch_start(const char *base, Py_ssize_t bytes, Py_ssize_t steps) {
    const Py_ssize_t lines = (bytes + 63) / 64;
    prefetch_stream p = {base, base + 64 * lines, steps > 0 ? (lines + steps - 1) / steps : 0};
    if (!base) p.at = p.end = NULL;
    return p;
}

static inline __attribute__((always_inline)) void prefetch_next(prefetch_stream *p) {
    for (Py_ssize_t l = 0; l < p->per && p->at < p->end; l++, p->at += 64) _mm_prefetch(p->at, _MM_HINT_T1);
}

/* R rows (a compile-time constant after inlining) from r0; NV: vectors of 16 a head holds, a
   constant (4 for T5's d_kv 64, else MAX_D / 16 with the rest skipped) so that the value
   accumulators stay in registers. scores: ATTEND_ROWS rows of n + 16 floats. */
TARGET static inline __attribute__((always_inline)) void attend_rows(const int R, const int NV, const attend_args *a,
                                                                     Py_ssize_t r0, float *scores) {
    const Py_ssize_t n = a->n, d = a->d, nv = (d + 15) / 16, lds = n + 16;
    const float *q[ATTEND_ROWS];
    float top[ATTEND_ROWS], own[ATTEND_ROWS], own_p[ATTEND_ROWS], denom[ATTEND_ROWS];
    for (int i = 0; i < R; i++) {
        q[i] = a->q + (r0 + i) * a->ldq;
        top[i] = -INFINITY;
        own[i] = own_p[i] = 0.0f;
    }
    /* the scores, four keys at a time: each row's four sums end in one transposing reduction
       (hsum4; with four rows, hsum16 for all of them) instead of four horizontal sums, the same
       additions for a key in any place */
    __m128 vtop[ATTEND_ROWS];
    for (int i = 0; i < R; i++) vtop[i] = _mm_set1_ps(-INFINITY);
    __m512 vtop16 = _mm512_set1_ps(-INFINITY); /* R == 4: row i's four in block i */
    /* memory reads ahead of the arithmetic (first row group only: later ones find them cached) */
    const int fetch = r0 == 0 && a->ldkv == a->d;
    prefetch_stream values = prefetch_start(fetch ? (const char *)a->v : NULL, n * d * (Py_ssize_t)sizeof(float),
                                            (n + 3) / 4);
    prefetch_stream keys = prefetch_start(fetch ? a->next_k : NULL, a->next_bytes, n);
    for (Py_ssize_t t = 0; t < n; t += 4) {
        const Py_ssize_t valid = n - t < 4 ? n - t : 4;
        const __mmask8 keep = (__mmask8)((1u << valid) - 1u);
        prefetch_next(&values);
        const float *kt[4];
        for (int c = 0; c < 4; c++) kt[c] = a->k + (t + (c < valid ? c : valid - 1)) * a->ldkv;
        /* a bias shared by every row (decoder and cross-attention: bias_row 0), read once per four
           keys, as one vector where its keys are consecutive (no scalar stores read back as a
           vector, which stall the load on the stores) */
        __m128 shared_bias = _mm_setzero_ps();
        if (a->bias && a->bias_row == 0) {
            const float *b = a->bias + t * a->bias_key;
            shared_bias = a->bias_key == 1 ? _mm_maskz_loadu_ps(keep, b)
                                           : _mm_maskz_mov_ps(keep, _mm_setr_ps(b[0], b[valid > 1 ? a->bias_key : 0],
                                                                               b[valid > 2 ? 2 * a->bias_key : 0],
                                                                               b[valid > 3 ? 3 * a->bias_key : 0]));
        }
        __m512 acc[ATTEND_ROWS][4];
        for (int i = 0; i < R; i++)
            for (int c = 0; c < 4; c++) acc[i][c] = _mm512_setzero_ps();
        for (int j = 0; j < NV && j < nv; j++) {
            const __mmask16 m = tail_mask(d - 16 * j);
            __m512 kv[4];
            for (int c = 0; c < 4; c++) kv[c] = _mm512_maskz_loadu_ps(m, kt[c] + 16 * j);
            for (int i = 0; i < R; i++) {
                const __m512 qv = _mm512_maskz_loadu_ps(m, q[i] + 16 * j);
                for (int c = 0; c < 4; c++) acc[i][c] = _mm512_fmadd_ps(qv, kv[c], acc[i][c]);
            }
        }
        if (R == ATTEND_ROWS && (!a->bias || a->bias_row == 0 || a->bias_key == 1)) {
            /* four rows' sums in one register (hsum16), their biases added and their maxima kept
               there too: a row's four scores are block i */
            __m512 s16 = hsum16((const __m512(*)[4])acc);
            if (a->bias && a->bias_row == 0) {
                s16 = _mm512_add_ps(s16, _mm512_broadcast_f32x4(shared_bias));
            } else if (a->bias) {
                __m512 b16 = _mm512_setzero_ps();
                for (int i = 0; i < R; i++) {
                    const __m128 b4 = _mm_maskz_loadu_ps(keep, a->bias + (r0 + i) * a->bias_row + t);
                    b16 = i == 0   ? _mm512_insertf32x4(b16, b4, 0)
                          : i == 1 ? _mm512_insertf32x4(b16, b4, 1)
                          : i == 2 ? _mm512_insertf32x4(b16, b4, 2)
                                   : _mm512_insertf32x4(b16, b4, 3);
                }
                s16 = _mm512_add_ps(s16, b16);
            }
            const __mmask16 keep16 = (__mmask16)(keep * 0x1111u);
            _mm_mask_storeu_ps(scores + t, keep, _mm512_castps512_ps128(s16));
            _mm_mask_storeu_ps(scores + lds + t, keep, _mm512_extractf32x4_ps(s16, 1));
            _mm_mask_storeu_ps(scores + 2 * lds + t, keep, _mm512_extractf32x4_ps(s16, 2));
            _mm_mask_storeu_ps(scores + 3 * lds + t, keep, _mm512_extractf32x4_ps(s16, 3));
            vtop16 = _mm512_mask_max_ps(vtop16, keep16, vtop16, s16);
            continue;
        }
        for (int i = 0; i < R; i++) {
            __m128 s4 = hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]);
            if (a->bias && a->bias_row == 0) {
                s4 = _mm_add_ps(s4, shared_bias);
            } else if (a->bias) {
                const float *b = a->bias + (r0 + i) * a->bias_row + t * a->bias_key;
                float bias4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
                for (Py_ssize_t c = 0; c < valid; c++) bias4[c] = b[c * a->bias_key];
                s4 = _mm_add_ps(s4, _mm_loadu_ps(bias4));
            }
            _mm_mask_storeu_ps(scores + i * lds + t, keep, s4);
            vtop[i] = _mm_mask_max_ps(vtop[i], keep, vtop[i], s4);
        }
    }
    if (R == ATTEND_ROWS) { /* rows whose maxima are in vtop16 (which stayed -inf otherwise) */
        vtop[0] = _mm_max_ps(vtop[0], _mm512_castps512_ps128(vtop16));
        vtop[1] = _mm_max_ps(vtop[1], _mm512_extractf32x4_ps(vtop16, 1));
        vtop[2] = _mm_max_ps(vtop[2], _mm512_extractf32x4_ps(vtop16, 2));
        vtop[3] = _mm_max_ps(vtop[3], _mm512_extractf32x4_ps(vtop16, 3));
    }
    for (int i = 0; i < R; i++) {
        float four[4];
        _mm_storeu_ps(four, vtop[i]);
        for (int c = 0; c < 4; c++) top[i] = four[c] > top[i] ? four[c] : top[i];
    }
    for (int i = 0; i < R; i++) {
        float *sc = scores + i * lds;
        if (a->own_k) {
            own[i] = dot(q[i], a->own_k + (r0 + i) * a->ld_own, d) + a->own_bias;
            top[i] = own[i] > top[i] ? own[i] : top[i];
        }
        /* e^(s - top), summed */
        const __m512 vtop = _mm512_set1_ps(top[i]);
        __m512 vsum = _mm512_setzero_ps();
        for (Py_ssize_t t = 0; t < n; t += 16) {
            const __mmask16 m = tail_mask(n - t);
            const __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sc + t), vtop)));
            _mm512_mask_storeu_ps(sc + t, m, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        denom[i] = _mm512_reduce_add_ps(vsum);
        if (a->own_k) {
            float tmp[16];
            _mm512_storeu_ps(tmp, exp16(_mm512_set1_ps(own[i] - top[i])));
            own_p[i] = tmp[0];
            denom[i] += own_p[i];
        }
    }
    /* the weighted values, accumulated in registers 16 floats at a time */
    __m512 acc[ATTEND_ROWS][MAX_D / 16];
    for (int i = 0; i < R; i++)
        for (int j = 0; j < NV; j++) acc[i][j] = _mm512_setzero_ps();
    for (Py_ssize_t t = 0; t < n; t++) {
        prefetch_next(&keys);
        const float *vt = a->v + t * a->ldkv;
        for (int j = 0; j < NV && j < nv; j++) {
            const __m512 vv = _mm512_maskz_loadu_ps(tail_mask(d - 16 * j), vt + 16 * j);
            for (int i = 0; i < R; i++) acc[i][j] = _mm512_fmadd_ps(_mm512_set1_ps(scores[i * lds + t]), vv, acc[i][j]);
        }
    }
    for (int i = 0; i < R; i++) {
        if (a->own_k) {
            const __m512 p = _mm512_set1_ps(own_p[i]);
            const float *vo = a->own_v + (r0 + i) * a->ld_own;
            for (int j = 0; j < NV && j < nv; j++)
                acc[i][j] = _mm512_fmadd_ps(p, _mm512_maskz_loadu_ps(tail_mask(d - 16 * j), vo + 16 * j), acc[i][j]);
        }
        const __m512 inv = _mm512_set1_ps(denom[i]);
        float *o = a->out + (r0 + i) * a->ldo;
        for (int j = 0; j < NV && j < nv; j++)
            _mm512_mask_storeu_ps(o + 16 * j, tail_mask(d - 16 * j), _mm512_div_ps(acc[i][j], inv));
    }
}

#define ATTEND_CASES(NV)                                                  \
    switch (R) {                                                          \
        case 4: attend_rows(4, NV, a, r0, scores); break;                 \
        case 3: attend_rows(3, NV, a, r0, scores); break;                 \
        case 2: attend_rows(2, NV, a, r0, scores); break;                 \
        default: attend_rows(1, NV, a, r0, scores); break;                \
    }

TARGET static void attend(const attend_args *a, float *scores) {
    for (Py_ssize_t r0 = 0; r0 < a->rows; r0 += ATTEND_ROWS) {
        const int R = a->rows - r0 < ATTEND_ROWS ? (int)(a->rows - r0) : ATTEND_ROWS;
        if (a->d == 64) {
            ATTEND_CASES(4)
        } else {
            ATTEND_CASES(MAX_D / 16)
        }
    }
}

/* The three attentions of T5, each over B sequences x H heads (the parallel loop).
   kind 0, decoder self-attention: qkv [B*m, 3, H, D] (the fused projection's output); cache K/V of
     this layer [B, H, cap, D] with lengths[b] positions filled; table [n_dist, H] the bias by
     distance (a key t < L at distance L - t; the row's own key at distance 0). Also writes the
     new K/V rows into new_k/new_v [B*m, H, D].
   kind 1, cross-attention: q [B*m, H, D]; K/V [B, H, S, D]; bias [B, S] (0 or the mask value).
   kind 2, encoder self-attention: qkv [B*S, 3, H, D]; bias [H, S, S]; keys t < lengths[b].
   out: [B*m, H, D] (m = S for the encoder). */
typedef struct {
    int kind;
    const float *q, *k, *v, *bias;
    const int64_t *lengths;
    float *out, *new_k, *new_v;
    Py_ssize_t B, m, H, D, cap, n_dist;
} attention_args;

/* Per-thread scratch for the scores (pool threads live as long as the process). */
static __thread float *scratch;
static __thread size_t scratch_floats;

static float *scores_buffer(size_t floats) {
    if (floats > scratch_floats) {
        free(scratch);
        scratch = malloc(floats * sizeof(float));
        scratch_floats = scratch ? floats : 0;
    }
    return scratch;
}

typedef struct {
    const attention_args *g;
    Py_ssize_t tasks;
    int failed; /* a task could not get its scratch (out of memory) */
} attention_job;

/* The arguments of (sequence, head) `job`. */
static void head_args(const attention_args *g, Py_ssize_t job, attend_args *a) {
    const Py_ssize_t m = g->m, H = g->H, D = g->D, inner = H * D;
    const Py_ssize_t b = job / H, h = job % H;
    memset(a, 0, sizeof *a);
    a->rows = m;
    a->d = D;
    a->ldo = inner;
    a->out = g->out + b * m * inner + h * D;
    if (g->kind == 0) {
        const Py_ssize_t L = g->lengths[b];
        a->q = g->q + b * m * 3 * inner + h * D;
        a->ldq = 3 * inner;
        a->k = g->k + (b * H + h) * g->cap * D;
        a->v = g->v + (b * H + h) * g->cap * D;
        a->ldkv = D;
        a->n = L;
        a->own_k = a->q + inner;
        a->own_v = a->q + 2 * inner;
        a->ld_own = 3 * inner;
        a->own_bias = g->bias[h];
        a->bias = g->bias + L * H + h; /* key t: distance L - t */
        a->bias_row = 0;
        a->bias_key = -H;
    } else if (g->kind == 1) {
        a->q = g->q + b * m * inner + h * D;
        a->ldq = inner;
        a->k = g->k + (b * H + h) * g->cap * D;
        a->v = g->v + (b * H + h) * g->cap * D;
        a->ldkv = D;
        a->n = g->cap;
        a->bias = g->bias + b * g->cap;
        a->bias_row = 0;
        a->bias_key = 1;
    } else {
        a->q = g->q + b * m * 3 * inner + h * D;
        a->ldq = 3 * inner;
        a->k = a->q + inner;
        a->v = a->q + 2 * inner;
        a->ldkv = 3 * inner;
        a->n = g->lengths[b];
        a->bias = g->bias + h * m * m;
        a->bias_row = m;
        a->bias_key = 1;
    }
}

/* One task: a contiguous run of (sequence, head) pairs, each fetching the next one's keys while it
   computes (attend_args.next_k). A run, not a pair a task: a thread then knows which pair it takes
   next. */
TARGET static void attention_task(void *ctx, long task) {
    attention_job *t = ctx;
    const attention_args *g = t->g;
    float *scores = scores_buffer((size_t)(ATTEND_ROWS * (g->cap + 16)));
    if (!scores) {
        t->failed = 1;
        return;
    }
    const Py_ssize_t pairs = g->B * g->H, j1 = (task + 1) * pairs / t->tasks;
    attend_args a, next;
    Py_ssize_t j = task * pairs / t->tasks;
    if (j < j1) head_args(g, j, &next);
    for (; j < j1; j++) {
        a = next;
        if (j + 1 < j1) {
            head_args(g, j + 1, &next);
            a.next_k = (const char *)next.k;
            a.next_bytes = next.ldkv == next.d ? next.n * next.d * (Py_ssize_t)sizeof(float) : 0;
        }
        attend(&a, scores);
    }
}

/* Returns 0, or -1 when scratch memory ran out. */
TARGET static int attention(const attention_args *g, int threads) {
    const Py_ssize_t B = g->B, m = g->m, H = g->H, D = g->D, inner = H * D;
    const Py_ssize_t work = B * H * m * g->cap * D;
    const int nt = (work >= PARALLEL_MIN_WORK && threads > 1) ? threads : 1;
    if (g->kind == 0)
        for (Py_ssize_t r = 0; r < B * m; r++) {
            memcpy(g->new_k + r * inner, g->q + (r * 3 + 1) * inner, (size_t)inner * sizeof(float));
            memcpy(g->new_v + r * inner, g->q + (r * 3 + 2) * inner, (size_t)inner * sizeof(float));
        }
    attention_job t = {g, nt > 1 ? (B * H < nt ? B * H : nt) : 1, 0};
    pool_run((long)t.tasks, nt, attention_task, &t);
    return t.failed ? -1 : 0;
}

/* ---------------------------------------------------------------- Python entry points
   The buffers' dtypes, shapes and contiguity are checked by engine/runtime/t5ops.py; the sizes are
   checked again here against the bytes, so that a wrong call raises instead of reading past. */

#define CHECK(cond, msg)                                \
    do {                                                \
        if (!(cond)) {                                  \
            PyErr_SetString(PyExc_ValueError, (msg));   \
            goto fail;                                  \
        }                                               \
    } while (0)

static int need_cpu(void) {
    if (avx512_ok()) return 1;
    PyErr_SetString(PyExc_RuntimeError, "this CPU lacks AVX-512 F/BW/DQ/VL");
    return 0;
}

/* rms_norm(x, gamma, out, rows, d, eps) */
PyObject *t5ops_rms_norm(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer x = {0}, gamma = {0}, out = {0};
    Py_ssize_t rows, d;
    float eps;
    if (!PyArg_ParseTuple(args, "y*y*w*nnf", &x, &gamma, &out, &rows, &d, &eps)) return NULL;
    if (!need_cpu()) goto fail;
    CHECK(rows >= 0 && d > 0 && x.len == rows * d * 4 && out.len == x.len && gamma.len == d * 4,
          "rms_norm: buffer sizes do not match rows, d");
    Py_BEGIN_ALLOW_THREADS rms_norm(x.buf, gamma.buf, out.buf, rows, d, eps);
    Py_END_ALLOW_THREADS PyBuffer_Release(&x);
    PyBuffer_Release(&gamma);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&x);
    PyBuffer_Release(&gamma);
    PyBuffer_Release(&out);
    return NULL;
}

/* activation(h, out, rows, f, gated, act) */
PyObject *t5ops_activation(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer h = {0}, out = {0};
    Py_ssize_t rows, f;
    int gated, act;
    if (!PyArg_ParseTuple(args, "y*w*nnpi", &h, &out, &rows, &f, &gated, &act)) return NULL;
    if (!need_cpu()) goto fail;
    CHECK(rows >= 0 && f > 0 && (act == 0 || act == 1) && h.len == rows * f * (gated ? 2 : 1) * 4 &&
              out.len == rows * f * 4,
          "activation: buffer sizes do not match rows, f (or act is not 0 or 1)");
    Py_BEGIN_ALLOW_THREADS activation(h.buf, out.buf, rows, f, gated, act);
    Py_END_ALLOW_THREADS PyBuffer_Release(&h);
    PyBuffer_Release(&out);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&h);
    PyBuffer_Release(&out);
    return NULL;
}

/* attention(kind, q, k, v, bias, lengths_or_None, out, new_k_or_None, new_v_or_None,
             B, m, H, D, cap, n_dist, threads); see attention_args for each kind's shapes. */
PyObject *t5ops_attention(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer q = {0}, k = {0}, v = {0}, bias = {0}, lengths = {0}, out = {0}, nk = {0}, nv = {0};
    PyObject *lengths_obj, *nk_obj, *nv_obj, *result = NULL;
    attention_args g = {0};
    int threads;
    if (!PyArg_ParseTuple(args, "iy*y*y*y*Ow*OOnnnnnni", &g.kind, &q, &k, &v, &bias, &lengths_obj, &out,
                          &nk_obj, &nv_obj, &g.B, &g.m, &g.H, &g.D, &g.cap, &g.n_dist, &threads))
        return NULL;
    if (lengths_obj != Py_None && PyObject_GetBuffer(lengths_obj, &lengths, PyBUF_SIMPLE) < 0) goto fail;
    if (nk_obj != Py_None && PyObject_GetBuffer(nk_obj, &nk, PyBUF_WRITABLE) < 0) goto fail;
    if (nv_obj != Py_None && PyObject_GetBuffer(nv_obj, &nv, PyBUF_WRITABLE) < 0) goto fail;
    if (!need_cpu()) goto fail;
    const Py_ssize_t B = g.B, m = g.m, H = g.H, D = g.D, cap = g.cap, inner = H * D;
    CHECK(B >= 0 && m > 0 && H > 0 && D > 0 && D <= MAX_D && cap >= 0, "attention: bad sizes");
    CHECK(out.len == B * m * inner * 4, "attention: out is not [B*m, H*D] float32");
    if (g.kind == 0) {
        CHECK(q.len == B * m * 3 * inner * 4, "attention: qkv is not [B*m, 3*H*D] float32");
        CHECK(k.len == B * H * cap * D * 4 && v.len == k.len, "attention: cache K/V is not [B, H, cap, D]");
        CHECK(bias.len == g.n_dist * H * 4 && g.n_dist > 0, "attention: the bias table is not [n_dist, H]");
        CHECK(lengths.buf && lengths.len == B * 8, "attention: lengths is not int64 [B]");
        CHECK(nk.buf && nv.buf && nk.len == B * m * inner * 4 && nv.len == nk.len,
              "attention: new_k/new_v are not [B*m, H*D] float32");
        for (Py_ssize_t b = 0; b < B; b++) {
            const int64_t L = ((const int64_t *)lengths.buf)[b];
            CHECK(L >= 0 && L <= cap && L < g.n_dist, "attention: a length is past the cache or the bias table");
        }
    } else if (g.kind == 1) {
        CHECK(q.len == B * m * inner * 4, "attention: q is not [B*m, H*D] float32");
        CHECK(k.len == B * H * cap * D * 4 && v.len == k.len, "attention: cross K/V is not [B, H, S, D]");
        CHECK(bias.len == B * cap * 4, "attention: the cross bias is not [B, S]");
    } else if (g.kind == 2) {
        CHECK(cap == m, "attention: the encoder's cap is its length");
        CHECK(q.len == B * m * 3 * inner * 4, "attention: qkv is not [B*S, 3*H*D] float32");
        CHECK(bias.len == H * m * m * 4, "attention: the encoder bias is not [H, S, S]");
        CHECK(lengths.buf && lengths.len == B * 8, "attention: lengths is not int64 [B]");
        for (Py_ssize_t b = 0; b < B; b++) {
            const int64_t L = ((const int64_t *)lengths.buf)[b];
            CHECK(L > 0 && L <= m, "attention: a prompt length is not in 1..S");
        }
    } else {
        CHECK(0, "attention: kind must be 0 (decoder self), 1 (cross) or 2 (encoder)");
    }
    g.q = q.buf;
    g.k = k.buf;
    g.v = v.buf;
    g.bias = bias.buf;
    g.lengths = lengths.buf;
    g.out = out.buf;
    g.new_k = nk.buf;
    g.new_v = nv.buf;
    int status;
    Py_BEGIN_ALLOW_THREADS status = attention(&g, threads);
    Py_END_ALLOW_THREADS if (status != 0) {
        PyErr_NoMemory();
        goto fail;
    }
    result = Py_None;
    Py_INCREF(result);
fail:
    PyBuffer_Release(&q);
    PyBuffer_Release(&k);
    PyBuffer_Release(&v);
    PyBuffer_Release(&bias);
    PyBuffer_Release(&out);
    if (lengths.obj) PyBuffer_Release(&lengths);
    if (nk.obj) PyBuffer_Release(&nk);
    if (nv.obj) PyBuffer_Release(&nv);
    return result;
}

/* ---------------------------------------------------------------- a decoder's layers in one call
   t5_fused.decoder_layer's sequence (norm, fused Q/K/V product, self-attention, output product and
   residual; norm, cross Q product, cross-attention, output product and residual; norm, wi product,
   activation, wo product and residual) for every layer, in C: the same functions in the same order
   on the same threads, so the same bits. Why: a layer from Python made about fifteen calls, each
   checking and wrapping its arrays, about 300 us of a batch-1 step's 1.1 ms (issue 15, seventh
   session). The weights are taken once into a plan (decoder_plan: a capsule holding their
   buffers); each step passes only what changes. */

enum { P_QKV, P_SELF_OUT, P_CROSS_Q, P_CROSS_OUT, P_WI, P_WO, P_LINEARS };

typedef struct {
    Py_buffer w, scale; /* scale.obj NULL: none (float32 weights) */
    int mode;
    Py_ssize_t N, K;
} plan_linear;

typedef struct {
    plan_linear lin[P_LINEARS];
    Py_buffer gamma[3]; /* self-attention, cross-attention, feed-forward norms */
} plan_layer;

typedef struct {
    Py_ssize_t L, d, H, D, d_ff, wide; /* wide: the widest product a step keeps (qkv's or wi's outputs) */
    int gated, act;
    float eps;
    plan_layer *layers;
} decoder_plan;

#define PLAN_CAPSULE "engine.runtime._qlinear.decoder_plan"

static void plan_free(decoder_plan *p) {
    if (!p) return;
    for (Py_ssize_t l = 0; p->layers && l < p->L; l++) {
        plan_layer *y = &p->layers[l];
        for (int i = 0; i < P_LINEARS; i++) {
            if (y->lin[i].w.obj) PyBuffer_Release(&y->lin[i].w);
            if (y->lin[i].scale.obj) PyBuffer_Release(&y->lin[i].scale);
        }
        for (int i = 0; i < 3; i++)
            if (y->gamma[i].obj) PyBuffer_Release(&y->gamma[i]);
    }
    free(p->layers);
    free(p);
}

static void plan_capsule_free(PyObject *capsule) { plan_free(PyCapsule_GetPointer(capsule, PLAN_CAPSULE)); }

/* One product of a layer: (weights, scale or None, mode, N, K), with the N and K it must have. */
static int plan_take_linear(PyObject *item, plan_linear *lin, Py_ssize_t N, Py_ssize_t K) {
    PyObject *w, *scale;
    if (!PyArg_ParseTuple(item, "OOinn", &w, &scale, &lin->mode, &lin->N, &lin->K)) return -1;
    if (lin->N != N || lin->K != K) {
        PyErr_Format(PyExc_ValueError, "decoder_plan: a product is %zd x %zd, the shape says %zd x %zd", lin->N,
                     lin->K, N, K);
        return -1;
    }
    if (PyObject_GetBuffer(w, &lin->w, PyBUF_SIMPLE) < 0) return -1;
    if (scale != Py_None && PyObject_GetBuffer(scale, &lin->scale, PyBUF_SIMPLE) < 0) return -1;
    return qlinear_check(lin->mode, N, K, lin->w.len, lin->scale.obj ? lin->scale.len : -1);
}

/* decoder_plan(layers, d, H, D, d_ff, gated, act, eps) -> capsule; layers: per layer a tuple of the
   six products (qkv, self_out, cross_q, cross_out, wi, wo; each (w, scale, mode, N, K)) and the
   three norms' gammas. */
PyObject *t5ops_decoder_plan(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *layers;
    decoder_plan *p = calloc(1, sizeof *p);
    if (!p) return PyErr_NoMemory();
    if (!PyArg_ParseTuple(args, "Onnnnpif", &layers, &p->d, &p->H, &p->D, &p->d_ff, &p->gated, &p->act, &p->eps))
        goto fail;
    if (!need_cpu()) goto fail;
    CHECK(PySequence_Check(layers), "decoder_plan: layers must be a sequence");
    CHECK(p->d > 0 && p->H > 0 && p->D > 0 && p->D <= MAX_D && p->d_ff > 0 && (p->act == 0 || p->act == 1),
          "decoder_plan: bad sizes");
    p->L = PySequence_Size(layers);
    CHECK(p->L > 0, "decoder_plan: no layers");
    p->layers = calloc((size_t)p->L, sizeof *p->layers);
    if (!p->layers) {
        PyErr_NoMemory();
        goto fail;
    }
    const Py_ssize_t d = p->d, inner = p->H * p->D;
    const Py_ssize_t wi = (p->gated ? 2 : 1) * p->d_ff;
    p->wide = 3 * inner > wi ? 3 * inner : wi;
    const Py_ssize_t shapes[P_LINEARS][2] = {{3 * inner, d}, {d, inner}, {inner, d}, {d, inner}, {wi, d}, {d, p->d_ff}};
    for (Py_ssize_t l = 0; l < p->L; l++) {
        PyObject *layer = PySequence_GetItem(layers, l);
        if (!layer) goto fail;
        int ok = PyTuple_Check(layer) && PyTuple_GET_SIZE(layer) == P_LINEARS + 3;
        for (int i = 0; ok && i < P_LINEARS; i++)
            ok = plan_take_linear(PyTuple_GET_ITEM(layer, i), &p->layers[l].lin[i], shapes[i][0], shapes[i][1]) == 0;
        for (int i = 0; ok && i < 3; i++) {
            Py_buffer *g = &p->layers[l].gamma[i];
            ok = PyObject_GetBuffer(PyTuple_GET_ITEM(layer, P_LINEARS + i), g, PyBUF_SIMPLE) == 0;
            if (ok && g->len != d * 4) {
                PyErr_SetString(PyExc_ValueError, "decoder_plan: a norm's gamma is not float32 [d]");
                ok = 0;
            }
        }
        if (!ok && !PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "decoder_plan: a layer is not a tuple of six products and three gammas");
        Py_DECREF(layer);
        if (!ok) goto fail;
    }
    PyObject *capsule = PyCapsule_New(p, PLAN_CAPSULE, plan_capsule_free);
    if (!capsule) goto fail;
    return capsule;
fail:
    plan_free(p);
    return NULL;
}

TARGET static void add_rows(float *x, const float *y, Py_ssize_t n) {
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(x + i, _mm512_add_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i)));
    for (; i < n; i++) x[i] += y[i];
}

typedef struct {
    const decoder_plan *p;
    float *x, *new_k, *new_v;
    const float *self_k, *self_v, *table, *cross_k, *cross_v, *cross_bias;
    const int64_t *lengths;
    Py_ssize_t B, m, cap, S, n_dist;
} layers_args;

static int product(const plan_linear *lin, const float *x, Py_ssize_t rows, float *out, int threads) {
    return qlinear_compute(lin->mode, x, rows, lin->K, lin->w.buf, lin->scale.obj ? lin->scale.buf : NULL, lin->N,
                           out, threads);
}

/* Timers of run_layers' parts, for benchmarks/profile_step.py (layers_timing): off by default,
   when a part costs one untaken branch. "norms" includes the residual add before each norm (and the
   next product's quantization where they are split over the threads: norm_product), "activation"
   wo's quantization where split (feed_forward_act); "residual_adds" is the last layer's add. On, each part's seconds add up over calls (a clock read
   between parts); the totals are process-wide and not synchronized, so they are meant for one
   decoding thread at a time, as a benchmark runs. */
enum { T_NORMS, T_ADDS, T_QKV, T_SELF_ATTN, T_SELF_OUT, T_CROSS_Q, T_CROSS_ATTN, T_CROSS_OUT, T_WI, T_ACT, T_WO, T_PARTS };
static const char *const timing_names[T_PARTS] = {"norms",        "residual_adds", "qkv",       "self_attention",
                                                  "self_out",     "cross_q",       "cross_attention",
                                                  "cross_out",    "wi",            "activation", "wo"};
static int timing_on;
static double timing_s[T_PARTS];

static double clock_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* the time since *t0 to part i (when timing is on) */
static inline void lap(int i, double *t0) {
    if (!timing_on) return;
    const double t = clock_s();
    timing_s[i] += t - *t0;
    *t0 = t;
}

/* The feed-forward's activation and wo's quantization of its rows, split by rows over the pool's
   tasks (where wo takes quantized rows): on the caller's thread alone they were the largest serial
   part of a step at 32 rows (contrastive at batch 8), and wo's product then read every row from
   the caller's cache. Each row's bytes are those of activation() then the product's own
   quantization (rows are independent). */
typedef struct {
    const float *h;
    float *act;
    void *xq;
    float *sx;
    Py_ssize_t rows, f, row_bytes, tasks;
    int gated, act_kind, mode;
} act_quantize_job;

static void act_quantize_task(void *ctx, long task) {
    const act_quantize_job *j = ctx;
    const Py_ssize_t r0 = task * j->rows / j->tasks, r1 = (task + 1) * j->rows / j->tasks, n = r1 - r0;
    const Py_ssize_t ld = (j->gated ? 2 : 1) * j->f;
    activation(j->h + r0 * ld, j->act + r0 * j->f, n, j->f, j->gated, j->act_kind);
    qlinear_quantize(j->mode, j->act + r0 * j->f, n, j->f, (char *)j->xq + r0 * j->row_bytes, j->sx + r0);
}

/* Rows from which the activation or a norm and the next product's quantization are split over the
   threads, and from which a quantization alone is (the attention outputs': at 8 rows the split
   cost greedy at batch 8 about 0.4 ms a call in those two products, and gained contrastive's 32
   rows 0.6-1 ms; profile_step.py, ninth session). */
#ifndef ACT_SPLIT_MIN_ROWS
#define ACT_SPLIT_MIN_ROWS 4
#endif
#ifndef QUANTIZE_SPLIT_MIN_ROWS
#define QUANTIZE_SPLIT_MIN_ROWS 16
#endif

/* act(h) into act, and (split) its quantized rows into xq/sx: 1 when wo is then to multiply xq. */
static int feed_forward_act(const decoder_plan *p, const plan_linear *wo, const float *h, float *act, void *xq,
                            float *sx, Py_ssize_t R, int threads) {
    if (!qlinear_takes_quantized(wo->mode) || threads < 2 || R < ACT_SPLIT_MIN_ROWS) {
        activation(h, act, R, p->d_ff, p->gated, p->act);
        return 0;
    }
    act_quantize_job job = {h,         act, xq, sx, R, p->d_ff, qlinear_quantized_row_bytes(wo->mode, p->d_ff),
                            2,         p->gated, p->act, wo->mode};
    pool_run((long)job.tasks, threads, act_quantize_task, &job);
    return 1;
}

/* run_layers' temporaries, in floats: h, big (p->wide), attn, tmp, act, and a split product's row
   scales and quantized rows (its input as wide as d, inner or d_ff; int16 at most: mode 2),
   64-byte aligned. */
static Py_ssize_t run_layers_floats(const decoder_plan *p, Py_ssize_t R) {
    const Py_ssize_t inner = p->H * p->D;
    /* the widest input quantized this way: d (the normed products), inner (the attention outputs') or d_ff (wo) */
    const Py_ssize_t k = p->d_ff > p->d ? (p->d_ff > inner ? p->d_ff : inner) : (p->d > inner ? p->d : inner);
    return R * (2 * p->d + p->wide + inner + p->d_ff) + R + (R * qlinear_quantized_row_bytes(2, k)) / 4 + 16;
}

/* The residual add of the previous product's output (y, or NULL), the norm of the sum, and the
   norm's rows quantized for the next product, split by rows over the pool's tasks as
   act_quantize_job: x += y, h = norm(x) * gamma, xq/sx = h quantized, each row's bytes as the add,
   rms_norm() and the product's own quantization make them. */
typedef struct {
    float *x;
    const float *y, *gamma;
    float *h;
    void *xq;
    float *sx;
    Py_ssize_t rows, d, row_bytes, tasks;
    float eps;
    int mode;
} norm_quantize_job;

static void norm_quantize_task(void *ctx, long task) {
    const norm_quantize_job *j = ctx;
    const Py_ssize_t r0 = task * j->rows / j->tasks, r1 = (task + 1) * j->rows / j->tasks, n = r1 - r0;
    if (j->y) add_rows(j->x + r0 * j->d, j->y + r0 * j->d, n * j->d);
    if (j->gamma) rms_norm(j->x + r0 * j->d, j->gamma, j->h + r0 * j->d, n, j->d, j->eps);
    const float *rows = j->gamma ? j->h : j->x; /* without a norm: x's rows themselves */
    qlinear_quantize(j->mode, rows + r0 * j->d, n, j->d, (char *)j->xq + r0 * j->row_bytes, j->sx + r0);
}

/* x += y (y NULL: nothing to add), then lin . norm(x) into out (gamma NULL: lin . x, no norm; x
   has lin's K columns): the add, norm and quantization split over the threads where lin takes
   quantized rows (as feed_forward_act), else on this one. Times the first part as "norms" (with
   a norm) and the product as `part`. */
static int norm_product(const decoder_plan *p, const plan_linear *lin, float *x, const float *y, const float *gamma,
                        float *h, void *xq, float *sx, Py_ssize_t R, float *out, int threads, int part, double *t0) {
    const Py_ssize_t d = lin->K;
    /* the quantization alone pays for the split from more rows than with a norm before it */
    const Py_ssize_t min_rows = gamma || y ? ACT_SPLIT_MIN_ROWS : QUANTIZE_SPLIT_MIN_ROWS;
    if (!qlinear_takes_quantized(lin->mode) || threads < 2 || R < min_rows) {
        if (y) add_rows(x, y, R * d);
        if (gamma) {
            rms_norm(x, gamma, h, R, d, p->eps);
            lap(T_NORMS, t0);
        }
        const int status = product(lin, gamma ? h : x, R, out, threads);
        lap(part, t0);
        return status;
    }
    norm_quantize_job job = {x, y, gamma, h, xq, sx, R, d, qlinear_quantized_row_bytes(lin->mode, d), 2, p->eps,
                             lin->mode};
    pool_run((long)job.tasks, threads, norm_quantize_task, &job);
    if (gamma) lap(T_NORMS, t0);
    qlinear_product_quantized(lin->mode, xq, sx, R, lin->K, lin->w.buf, lin->scale.obj ? lin->scale.buf : NULL, lin->N,
                              out, threads);
    lap(part, t0);
    return 0;
}

/* Every layer on x [B*m, d] in place; scratch: run_layers_floats of temporaries. A product's output
   joins the residual stream x in the next norm's pass (pending), the last one after the loop.
   0, or -1 out of memory. */
static int run_layers(const layers_args *a, float *scratch, int threads) {
    const decoder_plan *p = a->p;
    const Py_ssize_t R = a->B * a->m, d = p->d, H = p->H, D = p->D, inner = H * D;
    float *h = scratch, *big = h + R * d, *attn = big + R * p->wide, *tmp = attn + R * inner, *act = tmp + R * d;
    float *sx = act + R * p->d_ff;
    void *xq = (void *)(((uintptr_t)(sx + R) + 63) & ~(uintptr_t)63);
    const float *pending = NULL;
    double t0 = timing_on ? clock_s() : 0.0;
    for (Py_ssize_t l = 0; l < p->L; l++) {
        const plan_layer *y = &p->layers[l];
        const Py_ssize_t self_at = l * a->B * H * a->cap * D, cross_at = l * a->B * H * a->S * D;
        if (norm_product(p, &y->lin[P_QKV], a->x, pending, y->gamma[0].buf, h, xq, sx, R, big, threads, T_QKV, &t0))
            return -1;
        attention_args g = {0, big, a->self_k + self_at, a->self_v + self_at, a->table, a->lengths, attn,
                            a->new_k + l * R * inner, a->new_v + l * R * inner, a->B, a->m, H, D, a->cap, a->n_dist};
        if (attention(&g, threads)) return -1;
        lap(T_SELF_ATTN, &t0);
        if (norm_product(p, &y->lin[P_SELF_OUT], attn, NULL, NULL, h, xq, sx, R, tmp, threads, T_SELF_OUT, &t0))
            return -1;
        if (norm_product(p, &y->lin[P_CROSS_Q], a->x, tmp, y->gamma[1].buf, h, xq, sx, R, big, threads, T_CROSS_Q,
                         &t0))
            return -1;
        attention_args c = {1, big, a->cross_k + cross_at, a->cross_v + cross_at, a->cross_bias, NULL, attn,
                            NULL, NULL, a->B, a->m, H, D, a->S, 1};
        if (attention(&c, threads)) return -1;
        lap(T_CROSS_ATTN, &t0);
        if (norm_product(p, &y->lin[P_CROSS_OUT], attn, NULL, NULL, h, xq, sx, R, tmp, threads, T_CROSS_OUT, &t0))
            return -1;
        if (norm_product(p, &y->lin[P_WI], a->x, tmp, y->gamma[2].buf, h, xq, sx, R, big, threads, T_WI, &t0))
            return -1;
        const plan_linear *wo = &y->lin[P_WO];
        const int quantized = feed_forward_act(p, wo, big, act, xq, sx, R, threads);
        lap(T_ACT, &t0);
        if (quantized)
            qlinear_product_quantized(wo->mode, xq, sx, R, wo->K, wo->w.buf, wo->scale.obj ? wo->scale.buf : NULL,
                                      wo->N, tmp, threads);
        else if (product(wo, act, R, tmp, threads))
            return -1;
        lap(T_WO, &t0);
        pending = tmp;
    }
    if (pending) add_rows(a->x, pending, R * d);
    lap(T_ADDS, &t0);
    return 0;
}

/* layers_timing(on): the timers on or off, their totals zeroed. */
PyObject *t5ops_layers_timing(PyObject *self, PyObject *args) {
    (void)self;
    int on;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    memset(timing_s, 0, sizeof timing_s);
    timing_on = on;
    Py_RETURN_NONE;
}

/* layers_timing_read() -> {part: seconds} since layers_timing was last called. */
PyObject *t5ops_layers_timing_read(PyObject *self, PyObject *args) {
    (void)self;
    (void)args;
    PyObject *out = PyDict_New();
    for (int i = 0; out && i < T_PARTS; i++) {
        PyObject *v = PyFloat_FromDouble(timing_s[i]);
        if (!v || PyDict_SetItemString(out, timing_names[i], v) < 0) {
            Py_XDECREF(v);
            Py_CLEAR(out);
            break;
        }
        Py_DECREF(v);
    }
    return out;
}

/* decoder_layers(plan, x, self_k, self_v, lengths, table, cross_k, cross_v, cross_bias, new_k, new_v,
                  B, m, cap, S, threads): x [B*m, d] in place; self K/V [L, B, H, cap, D] with
   lengths[b] positions filled; table [n_dist, H] the bias by distance; cross K/V [L, B, H, S, D] and
   cross_bias [B, S]; new_k/new_v [L, B*m, H*D] written (each row's new key and value). */
PyObject *t5ops_decoder_layers(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *capsule, *result = NULL;
    Py_buffer x = {0}, sk = {0}, sv = {0}, lengths = {0}, table = {0}, ck = {0}, cv = {0}, cb = {0}, nk = {0},
              nv = {0};
    layers_args a = {0};
    int threads;
    if (!PyArg_ParseTuple(args, "Ow*y*y*y*y*y*y*y*w*w*nnnni", &capsule, &x, &sk, &sv, &lengths, &table, &ck, &cv, &cb,
                          &nk, &nv, &a.B, &a.m, &a.cap, &a.S, &threads))
        return NULL;
    const decoder_plan *p = PyCapsule_GetPointer(capsule, PLAN_CAPSULE);
    if (!p) goto fail;
    const Py_ssize_t B = a.B, m = a.m, R = B * m, L = p->L, H = p->H, D = p->D, inner = H * D;
    CHECK(B > 0 && m > 0 && a.cap >= 0 && a.S > 0, "decoder_layers: bad sizes");
    CHECK(x.len == R * p->d * 4, "decoder_layers: x is not float32 [B*m, d]");
    CHECK(sk.len == L * B * H * a.cap * D * 4 && sv.len == sk.len, "decoder_layers: self K/V are not [L, B, H, cap, D]");
    CHECK(lengths.len == B * 8, "decoder_layers: lengths is not int64 [B]");
    CHECK(table.len > 0 && table.len % (H * 4) == 0, "decoder_layers: the bias table is not float32 [n_dist, H]");
    a.n_dist = table.len / (H * 4);
    CHECK(ck.len == L * B * H * a.S * D * 4 && cv.len == ck.len, "decoder_layers: cross K/V are not [L, B, H, S, D]");
    CHECK(cb.len == B * a.S * 4, "decoder_layers: the cross bias is not float32 [B, S]");
    CHECK(nk.len == L * R * inner * 4 && nv.len == nk.len, "decoder_layers: new K/V are not [L, B*m, H*D]");
    for (Py_ssize_t b = 0; b < B; b++) {
        const int64_t n = ((const int64_t *)lengths.buf)[b];
        CHECK(n >= 0 && n <= a.cap && n < a.n_dist, "decoder_layers: a length is past the cache or the bias table");
    }
    a.p = p;
    a.x = x.buf;
    a.self_k = sk.buf;
    a.self_v = sv.buf;
    a.lengths = lengths.buf;
    a.table = table.buf;
    a.cross_k = ck.buf;
    a.cross_v = cv.buf;
    a.cross_bias = cb.buf;
    a.new_k = nk.buf;
    a.new_v = nv.buf;
    float *scratch = malloc((size_t)run_layers_floats(p, R) * sizeof(float));
    if (!scratch) {
        PyErr_NoMemory();
        goto fail;
    }
    int status;
    Py_BEGIN_ALLOW_THREADS status = run_layers(&a, scratch, threads);
    Py_END_ALLOW_THREADS free(scratch);
    if (status) {
        PyErr_NoMemory();
        goto fail;
    }
    result = Py_None;
    Py_INCREF(result);
fail:
    if (x.obj) PyBuffer_Release(&x);
    if (sk.obj) PyBuffer_Release(&sk);
    if (sv.obj) PyBuffer_Release(&sv);
    if (lengths.obj) PyBuffer_Release(&lengths);
    if (table.obj) PyBuffer_Release(&table);
    if (ck.obj) PyBuffer_Release(&ck);
    if (cv.obj) PyBuffer_Release(&cv);
    if (cb.obj) PyBuffer_Release(&cb);
    if (nk.obj) PyBuffer_Release(&nk);
    if (nv.obj) PyBuffer_Release(&nv);
    return result;
}
