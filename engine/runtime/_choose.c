/* Contrastive search's candidates in the compiled kernel: the top k of a row's softmax, in one call;
and their degeneration penalty (the max cosine with the context, at the end of this file).

Why this exists (engine/runtime/choose_ops.py is the Python side): a contrastive step takes, for
every sequence, the k most likely next tokens and their probabilities. In numpy that was a float32
softmax over the whole vocabulary (max, subtract, exp, sum, divide: about 29 us at 32,128 entries)
and then k argmax passes over a copy (about 18 us at k = 4): about 53 us a sequence a step, some
27 ms of a 305 ms contrastive call at batch 8 with 64 new tokens (2-core AMD EPYC, issue 15). Here
it is two passes over the logits: their maximum, then exp(x - max) summed while the top k are
picked by logit; only the candidates' probabilities are divided out. engine/runtime/choosers.py's
softmax_rows and top_k stay the reference and the fallback (tests/test_choose_ops.py).

What it returns, exactly: p_i = e_i / s in float32 with e_i = exp(x_i - m) (x_i - m rounded to
float32, then _simd.h's exp16, within 1.25 ulp), m the row's maximum and s the sum of every e_i
(sixteen lanes, then the lanes: another order than numpy's pairwise sum, so s and p differ from
numpy's in the last bits); the ids are the first k by p, largest first, equal p by lower index (torch.topk's
order on CPU, choosers.top_k's). The ids are picked on the logits, which is the same order except
where rounding makes different logits give equal probabilities (then the lower index comes first,
not the larger logit) or, by a last-bit wobble of exp, reversed ones. So the selection keeps every
entry whose logit lies within a band below the k-th largest where that can happen (BAND below; it
is almost always just the k), computes the probabilities of those and orders them by (p, index):
the result is the first k by (p, index) over the whole row, the same as computing every p (the
`exact` path, which the tests compare it with bit for bit). Where the bound behind the band does
not hold (a candidate's probability is zero or subnormal: fewer than k tokens not masked, or
logits more than ~87 apart) or the band outgrows its room, the call takes the exact path. A row
with a NaN, or whose maximum is +-inf, has NaN probabilities in numpy and its ids are 0..k-1 there
(argmax returns the first NaN): the same here.

Needs AVX-512F (and BW/DQ/VL, as the rest of the module); `available()` says whether the CPU has it. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "_choose.h"
#include "_pool.h"
#include "_simd.h"

#define TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma")))

/* The selection on logits keeps at most k + BAND_ROOM entries (k up to FAST_MAX_K); beyond, and for
   larger k, the exact path. */
#define FAST_MAX_K 256
#define BAND_ROOM 64
/* Two logits x_i > x_j can give p_j >= p_i only if x_i - x_j <= 2^-19 + 2^-23 (m - x_j): the
   subtraction x - m is off by at most 2^-24 |x - m|, exp16 by 1.25 ulp (< 2^-22 relative; 2^-21
   allowed), the division by 2^-24, all while the probabilities are normal floats. An entry more
   than BAND * (1 + m - K) below the k-th largest logit K is therefore below all k of them in
   probability (BAND leaves a factor of 8 over that bound). */
#define BAND 0x1p-16

/* The row's maximum into *m; 0 when the row has a NaN or its maximum is not finite. */
TARGET static int row_max(const float *x, Py_ssize_t n, float *m) {
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    __m512 m0 = ninf, m1 = ninf;
    __mmask16 nan = 0;
    Py_ssize_t j = 0;
    for (; j + 32 <= n; j += 32) {
        const __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + 16);
        nan |= _mm512_cmp_ps_mask(a, b, _CMP_UNORD_Q);
        m0 = _mm512_max_ps(m0, a);
        m1 = _mm512_max_ps(m1, b);
    }
    for (; j < n; j += 16) {
        const __m512 a = _mm512_mask_loadu_ps(ninf, tail_mask(n - j), x + j);
        nan |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q);
        m0 = _mm512_max_ps(m0, a);
    }
    *m = _mm512_reduce_max_ps(_mm512_max_ps(m0, m1));
    return !nan && isfinite(*m);
}

/* ---------------------------------------------------------------- the selection on logits
   `top` holds candidates sorted by logit, largest first, equal logits by index (every entry added
   has a higher index than those before). An entry is dropped, or not taken, only when k others
   come before it by (p, index) whatever the rounding: k earlier entries with the same logit (so
   the same probability and a lower index), or k entries more than the band above it. */
typedef struct {
    float x, p;
    Py_ssize_t i;
} cand;

typedef struct {
    cand *top;
    int n, k, room;
    double m;
    double floor; /* entries below it are out: BAND below the k-th logit (-inf until k are in) */
} selection;

static void set_floor(selection *s) {
    if (s->n < s->k) return;
    const double kth = s->top[s->k - 1].x;
    s->floor = kth - BAND * (1.0 + (s->m - kth)); /* -inf when kth is */
    while (s->n > s->k && (double)s->top[s->n - 1].x < s->floor) s->n--;
}

/* Offer entry i (logit xi): 0, or -1 when the band outgrew its room. */
static int offer(selection *s, Py_ssize_t i, float xi) {
    if ((double)xi < s->floor) return 0;
    int at = s->n;
    while (at > 0 && !(s->top[at - 1].x >= xi)) at--;
    int same = 0;
    for (int r = at - 1; r >= 0 && s->top[r].x == xi; r--) same++;
    if (same >= s->k) return 0;
    if (s->n == s->room) return -1;
    memmove(s->top + at + 1, s->top + at, (size_t)(s->n - at) * sizeof(cand));
    s->top[at] = (cand){xi, 0.0f, i};
    s->n++;
    set_floor(s);
    return 0;
}

/* The float below which the vector test lets nothing through (rounded down: it lets through a
   superset of what `offer` takes). */
static float floor_f(const selection *s) {
    const float f = (float)s->floor;
    return (double)f > s->floor ? nextafterf(f, -INFINITY) : f;
}

/* s = the sum of exp(x - m) over the row, in one fixed order (both paths compute it here, so their
   probabilities are the same floats); with `sel`, the entries are offered to it on the way.
   Returns 0, or -1 when the selection outgrew its room (the sum is then not finished). */
TARGET static int sum_and_select(const float *x, Py_ssize_t n, float m, selection *sel, float *sum) {
    const __m512 vm = _mm512_set1_ps(m), ninf = _mm512_set1_ps(-INFINITY);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    __m512 lo = _mm512_set1_ps(sel ? floor_f(sel) : INFINITY);
    Py_ssize_t j = 0;
#define OFFER(v, base, mask)                                                                 \
    do {                                                                                     \
        __mmask16 hit = _mm512_mask_cmp_ps_mask((mask), (v), lo, _CMP_GE_OQ);                \
        while (hit) {                                                                        \
            const int l = __builtin_ctz(hit);                                                \
            hit &= (__mmask16)(hit - 1);                                                     \
            if (offer(sel, (base) + l, x[(base) + l]) < 0) return -1;                        \
            lo = _mm512_set1_ps(floor_f(sel));                                               \
        }                                                                                    \
    } while (0)
    for (; j + 32 <= n; j += 32) {
        const __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + 16);
        acc0 = _mm512_add_ps(acc0, exp16(_mm512_sub_ps(a, vm)));
        acc1 = _mm512_add_ps(acc1, exp16(_mm512_sub_ps(b, vm)));
        if (sel) {
            OFFER(a, j, (__mmask16)0xFFFF);
            OFFER(b, j + 16, (__mmask16)0xFFFF);
        }
    }
    for (; j < n; j += 16) {
        const __mmask16 t = tail_mask(n - j);
        const __m512 a = _mm512_mask_loadu_ps(ninf, t, x + j);
        acc0 = _mm512_add_ps(acc0, exp16(_mm512_sub_ps(a, vm)));
        if (sel) OFFER(a, j, t);
    }
#undef OFFER
    *sum = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
    return 0;
}

/* e = exp(x - m) for up to 16 logits (the same exp16, lane for lane, as the sum's). */
TARGET static void exps(const float *xs, int count, float m, float *out) {
    const __mmask16 t = tail_mask(count);
    const __m512 v = _mm512_maskz_loadu_ps(t, xs);
    _mm512_mask_storeu_ps(out, t, exp16(_mm512_sub_ps(v, _mm512_set1_ps(m))));
}

static int by_probability(const void *a, const void *b) {
    const cand *u = a, *v = b;
    if (u->p != v->p) return u->p > v->p ? -1 : 1;
    return (u->i > v->i) - (u->i < v->i);
}

/* The fast path: 0 when it gave the answer, -1 when the exact path must. */
TARGET static int fast_top_k(const float *x, Py_ssize_t n, float m, int k, int64_t *ids, float *probs) {
    cand top[FAST_MAX_K + BAND_ROOM];
    selection sel = {top, 0, k, k + BAND_ROOM, m, -INFINITY};
    float sum;
    if (sum_and_select(x, n, m, &sel, &sum) < 0) return -1;
    float xs[16], es[16];
    for (int r = 0; r < sel.n; r += 16) {
        const int c = sel.n - r < 16 ? sel.n - r : 16;
        for (int l = 0; l < c; l++) xs[l] = top[r + l].x;
        exps(xs, c, m, es);
        for (int l = 0; l < c; l++) top[r + l].p = es[l] / sum;
    }
    /* The band's bound holds for normal floats: the k largest logits' probabilities must be. */
    for (int r = 0; r < k; r++)
        if (!(top[r].p >= FLT_MIN)) return -1;
    qsort(top, (size_t)sel.n, sizeof(cand), by_probability);
    for (int r = 0; r < k; r++) {
        ids[r] = top[r].i;
        probs[r] = top[r].p;
    }
    return 0;
}

/* The exact path: every probability, sorted by (p, index). -1 when out of memory. */
TARGET static int exact_top_k(const float *x, Py_ssize_t n, float m, Py_ssize_t k, int64_t *ids, float *probs) {
    float sum;
    sum_and_select(x, n, m, NULL, &sum);
    cand *all = malloc((size_t)n * sizeof(cand));
    if (!all) return -1;
    const __m512 vm = _mm512_set1_ps(m), vs = _mm512_set1_ps(sum);
    float p[16];
    for (Py_ssize_t j = 0; j < n; j += 16) {
        const __mmask16 t = tail_mask(n - j);
        const __m512 v = _mm512_maskz_loadu_ps(t, x + j);
        _mm512_storeu_ps(p, _mm512_div_ps(exp16(_mm512_sub_ps(v, vm)), vs));
        for (int l = 0; l < 16 && j + l < n; l++) all[j + l] = (cand){x[j + l], p[l], j + l};
    }
    qsort(all, (size_t)n, sizeof(cand), by_probability);
    for (Py_ssize_t r = 0; r < k; r++) {
        ids[r] = all[r].i;
        probs[r] = all[r].p;
    }
    free(all);
    return 0;
}

/* ---------------------------------------------------------------- Python entry points */

/* One row's answer: which path answered (0 fast, 1 exact, 2 a NaN or an infinite maximum), or -1
   out of memory. */
TARGET static int top_k_row(const float *xs, Py_ssize_t n, Py_ssize_t k, int exact, int64_t *ids, float *probs) {
    float m;
    if (!row_max(xs, n, &m)) {
        for (Py_ssize_t r = 0; r < k; r++) {
            ids[r] = r;
            probs[r] = NAN;
        }
        return 2;
    }
    if (!exact && k <= FAST_MAX_K && fast_top_k(xs, n, m, (int)k, ids, probs) == 0) return 0;
    return exact_top_k(xs, n, m, k, ids, probs) < 0 ? -1 : 1;
}

/* top_k_softmax(x, k, ids, probs, exact) -> path: x float32 [n] (C-contiguous), 1 <= k <= n; writes
   ids int64 [k] and probs float32 [k]. exact: compute every probability (the reference the fast path
   is tested against). Returns which path answered: 0 fast, 1 exact, 2 a row with a NaN or an
   infinite maximum. Dtypes and shapes are checked by engine/runtime/choose_ops.py, the sizes again
   here. */
PyObject *choose_top_k_softmax(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer x = {0}, ids = {0}, probs = {0};
    Py_ssize_t k;
    int exact, path = 0, failed = 0;
    if (!PyArg_ParseTuple(args, "y*nw*w*p", &x, &k, &ids, &probs, &exact)) return NULL;
    const Py_ssize_t n = x.len / (Py_ssize_t)sizeof(float);
    if (!avx512_ok()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU lacks AVX-512 F/BW/DQ/VL");
        goto fail;
    }
    if (x.len % (Py_ssize_t)sizeof(float) || n < 1 || k < 1 || k > n || ids.len != k * 8 || probs.len != k * 4) {
        PyErr_SetString(PyExc_ValueError, "top_k_softmax: need 1 <= k <= len(x), ids int64 [k], probs float32 [k]");
        goto fail;
    }
    Py_BEGIN_ALLOW_THREADS;
    path = top_k_row(x.buf, n, k, exact, ids.buf, probs.buf);
    Py_END_ALLOW_THREADS;
    failed = path < 0;
    if (failed) {
        PyErr_NoMemory();
        goto fail;
    }
    PyBuffer_Release(&x);
    PyBuffer_Release(&ids);
    PyBuffer_Release(&probs);
    return PyLong_FromLong(path);
fail:
    PyBuffer_Release(&x);
    PyBuffer_Release(&ids);
    PyBuffer_Release(&probs);
    return NULL;
}

/* ---------------------------------------------------------------- the degeneration penalty
   Contrastive search's max cosine similarity of each candidate with its sequence's context: the
   candidates' and the context's hidden states are unit-normalized already (kv_cache.StepOutput,
   DecoderCache.context), so each cosine is a dot product. unit [B, m, d], context [B, cap, d],
   lengths [B] (positions t < lengths[b] are b's context), out [B, m]: max_t unit[b, i] . context[b, t],
   -inf for an empty context, NaN where a dot product is NaN (numpy's max). Each dot product sums
   16 lanes of products over d, then the lanes: another order than numpy's matmul (BLAS), so within
   float32 rounding of choosers.degeneration_penalty, its reference and fallback. Four candidates
   at a time read each context row once. */
/* R (at most 4) candidates of sequence b from row i0, R a compile-time constant: with R read at run
   time the accumulators were indexed by it and lived on the stack (a load and a store beside every
   multiply-add). */
TARGET static inline __attribute__((always_inline)) void degeneration_rows(
    const int R, const float *unit, const float *context, const int64_t *lengths, float *out, Py_ssize_t B,
    Py_ssize_t m, Py_ssize_t cap, Py_ssize_t d, Py_ssize_t b, Py_ssize_t i0) {
    const Py_ssize_t n = lengths[b];
    const float *ctx = context + b * cap * d;
    const float *u = unit + (b * m + i0) * d;
    __m128 best[4], nan[4];
    for (int r = 0; r < 4; r++) {
        best[r] = _mm_set1_ps(-INFINITY);
        nan[r] = _mm_setzero_ps();
    }
    /* four context rows at a time (16 independent sums: four candidates by four rows) */
    for (Py_ssize_t t = 0; t < n; t += 4) {
        const int valid = n - t < 4 ? (int)(n - t) : 4;
        const __mmask8 keep = (__mmask8)((1u << valid) - 1u);
        const float *c[4];
        for (int j = 0; j < 4; j++) c[j] = ctx + (t + (j < valid ? j : valid - 1)) * d;
        __m512 acc[4][4];
        for (int r = 0; r < R; r++)
            for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
        /* the context comes from memory after a step's layers (a cold read ran at about 4 GB/s):
           the four rows eight ahead (past the last, the next sequence's first) are fetched
           while these are multiplied, a line per chunk of 16 per row */
        const float *ahead = t + 8 < n                                    ? ctx + (t + 8) * d
                             : b + 1 < B && i0 + 4 >= m && t + 8 - n < cap ? context + ((b + 1) * cap + t + 8 - n) * d
                                                                          : NULL;
        for (Py_ssize_t k = 0; k < d; k += 16) {
            const __mmask16 mask = tail_mask(d - k);
            if (ahead)
                for (int j = 0; j < 4; j++) _mm_prefetch((const char *)(ahead + j * d + k), _MM_HINT_T0);
            __m512 cv[4];
            for (int j = 0; j < 4; j++) cv[j] = _mm512_maskz_loadu_ps(mask, c[j] + k);
            for (int r = 0; r < R; r++) {
                const __m512 uv = _mm512_maskz_loadu_ps(mask, u + r * d + k);
                for (int j = 0; j < 4; j++) acc[r][j] = _mm512_fmadd_ps(uv, cv[j], acc[r][j]);
            }
        }
        for (int r = 0; r < R; r++) {
            const __m128 dots = hsum4(acc[r][0], acc[r][1], acc[r][2], acc[r][3]);
            nan[r] = _mm_or_ps(nan[r], _mm_maskz_mov_ps(keep, _mm_cmp_ps(dots, dots, _CMP_UNORD_Q)));
            best[r] = _mm_mask_max_ps(best[r], keep, best[r], dots);
        }
    }
    for (int r = 0; r < R; r++) {
        float four[4], flags[4];
        _mm_storeu_ps(four, best[r]);
        _mm_storeu_ps(flags, nan[r]);
        float top = -INFINITY;
        int any_nan = 0;
        for (int j = 0; j < 4; j++) {
            top = four[j] > top ? four[j] : top;
            any_nan |= flags[j] != 0.0f;
        }
        out[b * m + i0 + r] = any_nan ? NAN : top;
    }
}

/* Sequences [b0, b1) of the penalty (B in all). */
TARGET static void degeneration(const float *unit, const float *context, const int64_t *lengths, float *out,
                                Py_ssize_t B, Py_ssize_t m, Py_ssize_t cap, Py_ssize_t d, Py_ssize_t b0, Py_ssize_t b1) {
    for (Py_ssize_t b = b0; b < b1; b++)
        for (Py_ssize_t i0 = 0; i0 < m; i0 += 4) switch (m - i0 < 4 ? m - i0 : 4) {
                case 4: degeneration_rows(4, unit, context, lengths, out, B, m, cap, d, b, i0); break;
                case 3: degeneration_rows(3, unit, context, lengths, out, B, m, cap, d, b, i0); break;
                case 2: degeneration_rows(2, unit, context, lengths, out, B, m, cap, d, b, i0); break;
                default: degeneration_rows(1, unit, context, lengths, out, B, m, cap, d, b, i0); break;
            }
}

/* The penalty's sequences in contiguous runs over the pool's tasks (each sequence's answer is the
   same whichever task computes it). */
typedef struct {
    const float *unit, *context;
    const int64_t *lengths;
    float *out;
    Py_ssize_t B, m, cap, d, tasks;
} degeneration_job;

static void degeneration_task(void *ctx, long task) {
    const degeneration_job *j = ctx;
    degeneration(j->unit, j->context, j->lengths, j->out, j->B, j->m, j->cap, j->d, task * j->B / j->tasks,
                 (task + 1) * j->B / j->tasks);
}

/* degeneration_penalty(unit, context, lengths, out, B, m, cap, d[, threads]): see degeneration. Dtypes and
   shapes are checked by engine/runtime/choose_ops.py, the sizes again here. */
PyObject *choose_degeneration_penalty(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer unit = {0}, context = {0}, lengths = {0}, out = {0};
    Py_ssize_t B, m, cap, d;
    int threads = 1;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*y*y*w*nnnn|i", &unit, &context, &lengths, &out, &B, &m, &cap, &d, &threads))
        return NULL;
    if (!avx512_ok()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU lacks AVX-512 F/BW/DQ/VL");
        goto fail;
    }
    if (B < 0 || m < 1 || cap < 0 || d < 1 || unit.len != B * m * d * 4 || context.len != B * cap * d * 4 ||
        lengths.len != B * 8 || out.len != B * m * 4) {
        PyErr_SetString(PyExc_ValueError,
                        "degeneration_penalty: need unit float32 [B, m, d], context [B, cap, d], lengths int64 [B], "
                        "out float32 [B, m]");
        goto fail;
    }
    for (Py_ssize_t b = 0; b < B; b++) {
        const int64_t n = ((const int64_t *)lengths.buf)[b];
        if (n < 0 || n > cap) {
            PyErr_SetString(PyExc_ValueError, "degeneration_penalty: a length is outside the context");
            goto fail;
        }
    }
    degeneration_job job = {unit.buf, context.buf, lengths.buf, out.buf, B, m, cap, d,
                            threads > 1 && B > 1 ? (threads < B ? threads : B) : 1};
    Py_BEGIN_ALLOW_THREADS;
    if (B > 0) pool_run((long)job.tasks, (int)job.tasks, degeneration_task, &job);
    Py_END_ALLOW_THREADS;
    result = Py_None;
    Py_INCREF(result);
fail:
    PyBuffer_Release(&unit);
    PyBuffer_Release(&context);
    PyBuffer_Release(&lengths);
    PyBuffer_Release(&out);
    return result;
}

/* ---------------------------------------------------------------- many rows at once
   top_k_softmax_rows(rows, k, ids, probs, threads): rows a sequence of float32 [n] buffers (each
   C-contiguous, any n >= k), ids int64 [len(rows), k] and probs float32 [len(rows), k] written; each
   row's answer is top_k_softmax's (the same function), the rows split over the pool's threads. A
   contrastive step at batch 8 made eight calls of about 9 us each, one after another. */
typedef struct {
    const float *const *rows;
    const Py_ssize_t *lens;
    Py_ssize_t count, k, tasks;
    int64_t *ids;
    float *probs;
    int failed;
} rows_job;

TARGET static void rows_task(void *ctx, long task) {
    rows_job *j = ctx;
    const Py_ssize_t r1 = (task + 1) * j->count / j->tasks;
    for (Py_ssize_t r = task * j->count / j->tasks; r < r1; r++)
        if (top_k_row(j->rows[r], j->lens[r], j->k, 0, j->ids + r * j->k, j->probs + r * j->k) < 0) j->failed = 1;
}

PyObject *choose_top_k_softmax_rows(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *seq, *fast = NULL, *result = NULL;
    Py_buffer ids = {0}, probs = {0}, *bufs = NULL;
    const float **rows = NULL;
    Py_ssize_t k, count = 0, taken = 0, *lens = NULL;
    int threads;
    if (!PyArg_ParseTuple(args, "Onw*w*i", &seq, &k, &ids, &probs, &threads)) return NULL;
    if (!avx512_ok()) {
        PyErr_SetString(PyExc_RuntimeError, "this CPU lacks AVX-512 F/BW/DQ/VL");
        goto fail;
    }
    fast = PySequence_Fast(seq, "top_k_softmax_rows: rows must be a sequence of float32 arrays");
    if (!fast) goto fail;
    count = PySequence_Fast_GET_SIZE(fast);
    if (k < 1 || ids.len != count * k * 8 || probs.len != count * k * 4) {
        PyErr_SetString(PyExc_ValueError, "top_k_softmax_rows: need k >= 1, ids int64 [rows, k], probs float32 [rows, k]");
        goto fail;
    }
    bufs = calloc((size_t)(count > 0 ? count : 1), sizeof *bufs);
    rows = calloc((size_t)(count > 0 ? count : 1), sizeof *rows);
    lens = calloc((size_t)(count > 0 ? count : 1), sizeof *lens);
    if (!bufs || !rows || !lens) {
        PyErr_NoMemory();
        goto fail;
    }
    for (; taken < count; taken++) {
        Py_buffer *b = &bufs[taken];
        if (PyObject_GetBuffer(PySequence_Fast_GET_ITEM(fast, taken), b, PyBUF_C_CONTIGUOUS) < 0) goto fail;
        lens[taken] = b->len / (Py_ssize_t)sizeof(float);
        rows[taken] = b->buf;
        if (b->len % (Py_ssize_t)sizeof(float) || lens[taken] < k) {
            taken++;
            PyErr_SetString(PyExc_ValueError, "top_k_softmax_rows: every row needs at least k float32 entries");
            goto fail;
        }
    }
    rows_job job = {rows, lens, count, k, threads > 1 && count > 1 ? (count < threads ? count : threads) : 1,
                    ids.buf, probs.buf, 0};
    Py_BEGIN_ALLOW_THREADS;
    if (count > 0) pool_run((long)job.tasks, (int)job.tasks, rows_task, &job);
    Py_END_ALLOW_THREADS;
    if (job.failed) {
        PyErr_NoMemory();
        goto fail;
    }
    result = Py_None;
    Py_INCREF(result);
fail:
    for (Py_ssize_t r = 0; r < taken; r++)
        if (bufs[r].obj) PyBuffer_Release(&bufs[r]);
    free(bufs);
    free(rows);
    free(lens);
    Py_XDECREF(fast);
    PyBuffer_Release(&ids);
    PyBuffer_Release(&probs);
    return result;
}
