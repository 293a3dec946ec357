/* The core's peak rate of the instructions the kernel's products and attention run on: VPDPBUSD
   (int8 x uint8, 64 multiply-adds), VPDPWSSD (int16, 32) and VFMADD231PS (float32, 16), each as 12
   independent chains of zmm registers on one core, and VPDPBUSD beside shifts and beside integer
   adds (whether they take its ports). The ceiling against which benchmarks/RESULTS.md sets the
   products' measured GOP/s (issue 15, eighth session). Needs AVX512-VNNI.

       gcc -O3 -funroll-loops benchmarks/peak_vnni.c -o /tmp/peak_vnni && /tmp/peak_vnni
*/
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define N 100000000L
#define TARGET __attribute__((target("avx512f,avx512bw,avx512vnni"), noinline))

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

static int sink;

TARGET static double dp(int kind) {
    __m512i a[12], s[6];
    for (int i = 0; i < 12; i++) a[i] = _mm512_set1_epi32(i);
    for (int i = 0; i < 6; i++) s[i] = _mm512_set1_epi32(7 * i);
    __m512i x = _mm512_set1_epi32(3), w = _mm512_set1_epi32(5);
    const double t = now();
    for (long n = 0; n < N / 12; n++) {
        for (int i = 0; i < 12; i++)
            a[i] = kind == 1 ? _mm512_dpwssd_epi32(a[i], x, w) : _mm512_dpbusd_epi32(a[i], x, w);
        if (kind == 2)
            for (int i = 0; i < 6; i++) s[i] = _mm512_srai_epi16(s[i], 1);
        if (kind == 3)
            for (int i = 0; i < 6; i++) s[i] = _mm512_add_epi32(s[i], x);
        __asm__ volatile("" : "+v"(x), "+v"(w));
    }
    const double seconds = now() - t;
    for (int i = 0; i < 12; i++) sink += _mm512_reduce_add_epi32(a[i]);
    for (int i = 0; i < 6; i++) sink += _mm512_reduce_add_epi32(s[i]);
    return N / seconds / 1e9;
}

TARGET static double fma_rate(void) {
    __m512 f[12];
    for (int i = 0; i < 12; i++) f[i] = _mm512_set1_ps((float)i);
    __m512 x = _mm512_set1_ps(1.0001f);
    const double t = now();
    for (long n = 0; n < N / 12; n++) {
        for (int i = 0; i < 12; i++) f[i] = _mm512_fmadd_ps(f[i], x, x);
        __asm__ volatile("" : "+v"(x));
    }
    const double seconds = now() - t;
    for (int i = 0; i < 12; i++) sink += (int)_mm512_reduce_add_ps(f[i]);
    return N / seconds / 1e9;
}

int main(void) {
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512vnni")) {
        fprintf(stderr, "this CPU lacks AVX512-VNNI\n");
        return 1;
    }
    const double busd = dp(0), wssd = dp(1), shifts = dp(2), adds = dp(3), f = fma_rate();
    printf("one core, billions of zmm instructions a second (12 independent chains):\n");
    printf("  VPDPBUSD    %.2f  (%.0f GOP/s int8: 64 multiply-adds each)\n", busd, busd * 128);
    printf("  VPDPWSSD    %.2f  (%.0f GOP/s int16: 32 each)\n", wssd, wssd * 64);
    printf("  VFMADD231PS %.2f  (%.0f GFLOP/s float32: 16 each)\n", f, f * 32);
    printf("  VPDPBUSD with 6 shifts per 12 beside it: %.2f; with 6 integer adds: %.2f\n", shifts, adds);
    return sink == 42;
}
