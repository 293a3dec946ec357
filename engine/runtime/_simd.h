/* The AVX-512 helpers every C file of the kernel shares: whether the CPU can run it, the mask of a
   loop's last vector, exp16, and hsum4 (four vectors' sums at once).

   exp16: e^x for 16 floats, the one exp of the compiled kernel (_t5ops.c's softmax and GELU, _choose.c's
   softmax): Cephes' expf polynomial on r = x - n ln 2 (|r| <= ln 2 / 2, n ln 2 in two parts), then
   scaled by 2^n. Within 1.25 ulp of float64's exp where the result is a normal float (measured on
   every fifth float of [-87.3, 0] with a throwaway harness); 0 for x below about -104 and for -inf
   (the masked scores give exactly 0 as numpy's exp does); x is clamped to 88.72 above. */
#ifndef ENGINE_SIMD_H
#define ENGINE_SIMD_H
#include <Python.h>
#include <immintrin.h>

/* Whether this CPU has the AVX-512 subsets every kernel needs (F, BW, DQ, VL). */
static inline int avx512_ok(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
}

/* The first min(left, 16) lanes: the mask of a loop's vector at `left` elements from its end. */
static inline __mmask16 tail_mask(Py_ssize_t left) {
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
}

__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma"))) static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-110.0f)), _mm512_set1_ps(88.72f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    return _mm512_scalef_ps(p, n);
}

/* The sums of four vectors' lanes, [sum(a0), sum(a1), sum(a2), sum(a3)]: pairs of lanes, then pairs
   of pairs within each 128-bit block, then the blocks, in the same order for each of the four. */
__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,fma"))) static inline __m128 hsum4(__m512 a0, __m512 a1,
                                                                                       __m512 a2, __m512 a3) {
    const __m512 t01 = _mm512_add_ps(_mm512_unpacklo_ps(a0, a1), _mm512_unpackhi_ps(a0, a1));
    const __m512 t23 = _mm512_add_ps(_mm512_unpacklo_ps(a2, a3), _mm512_unpackhi_ps(a2, a3));
    const __m512d p01 = _mm512_castps_pd(t01), p23 = _mm512_castps_pd(t23);
    const __m512 u = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p01, p23)),
                                   _mm512_castpd_ps(_mm512_unpackhi_pd(p01, p23)));
    const __m256 v = _mm256_add_ps(_mm512_castps512_ps256(u), _mm512_extractf32x8_ps(u, 1));
    return _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
}

#endif
