/* Decode GEMV / small-GEMM kernels for AVX2 + FMA CPUs (fastvlm/kernels/__init__.py).
 *
 * All compute y (M, N) fp32 = x (M, K) fp32 @ W^T (+ bias) for small M, reading each weight
 * element once per block of up to 8 rows of x: a tile of NB weight rows is streamed through
 * registers while MM x rows (L1/L2 resident) are multiplied against it.  The fp32 kernels (any
 * M) and the AVX-512 int8 / int4 M = 1 kernels give each OpenMP thread one contiguous range of
 * W's rows (static split: one stream per core, which the hardware prefetcher follows end to
 * end; it beat dynamic chunks, see docs/kernels.md).  The other
 * int8 / int4 paths still hand out chunks of 16 tiles dynamically.  Every pointer is
 * contiguous row-major; the caller checks shapes and dtypes.
 *
 *   fp32: W float (N, K).
 *   int8: W int8 (N, K), scales float (N,):          y = scale[n] * sum_k q[n,k] x[m,k].
 *   int4: W uint8 (N, K/2), low nibble = even column; scales, zb float (N, K/G) with
 *         zb = zero - 8 * scale, so w = q * scale + zb (tinygemm's (q - 8) * scale + zero).
 *         M <= 4: y = sum_g scale_g * dot_g(q, x) + sum_g zb_g * sum_g(x) (raw nibbles, one
 *         convert per weight); M = 5..8: w dequantized in registers, shared by all rows.
 *         x is permuted once per call into the nibble order of 16-column blocks.
 *   act_q (int8 and int4, the modules' default): x quantized per call (int16 for int8
 *         weights, int8 for int4) and integer dot products; see the sections below.  The
 *         exact fp32 paths above stay for act_q = 0 and K % 64 != 0.
 */
#ifndef FVK_I4Q_BODY /* the whole file, except the act_q int4 tiles at the end */
#include <immintrin.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define INL static inline __attribute__((always_inline))
#define MAXM 8
#ifndef FVK_PF
#define FVK_PF 2048 /* fp32 software prefetch distance in bytes (0: off) */
#endif
#ifndef FVK_PF4
#define FVK_PF4 12288 /* int4 (act_q) software prefetch distance in bytes (0: off) */
#endif
#ifndef FVK_PF8
#define FVK_PF8 16384 /* int8 software prefetch distance in bytes (0: off) */
#endif

INL float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* e^x for 8 floats: Cody-Waite range reduction and Cephes' degree-6 polynomial (~1 ulp over
 * the clamped range).  Inputs are clamped to [-87, 88.37]: below, e^x returns ~1.6e-38 where
 * expf gives a denormal or 0 (both vanish next to the softmax's max term, or in SiLU's x * e^x);
 * above, ~2.4e38 instead of inf (SiLU: x / (1 + e^-x) is then -0, as with inf).  Used by the
 * fused decode's softmax and SiLU, where scalar expf was a visible share of the step. */
INL __m256 exp256(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* g[i] = silu(g[i]) * u[i] = g / (1 + e^-g) * u, i in [0, n) */
static void silu_mul(float *g, const float *u, int64_t n) {
    int64_t i = 0;
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 v = _mm256_loadu_ps(g + i);
        __m256 d = _mm256_add_ps(one, exp256(_mm256_sub_ps(_mm256_setzero_ps(), v)));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(v, d), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* AVX-512 (F, BW, VNNI) paths, picked at run time where the CPU has them (fvk_set_isa). */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define FVK_HAVE_512 1
#else
#define FVK_HAVE_512 0
#endif
static int fvk_avx512 = -1; /* -1: not probed; 0: off (AVX2); 1: AVX-512 F + BW + VNNI */

static int probe_avx512(void) {
#if FVK_HAVE_512
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vnni");
#else
    return 0;
#endif
}

/* Whether the AVX-512 paths run (probed on first use; fvk_set_isa can switch them off). */
INL int use512(void) {
    if (fvk_avx512 < 0) fvk_avx512 = probe_avx512();
    return fvk_avx512 == 1;
}

/* ------------------------------------------------------------------ fp32 */
/* One fp32 tile body for both ISAs: MM rows of x against NB consecutive weight rows starting at
 * row n, one vector of K per step.  Software prefetch FVK_PF bytes ahead from M >= PF_MIN_M. */
#define F32_TILE_FN(NAME, ATTR, VT, W, ZERO, LOAD, FMA, REDUCE, PF_MIN_M)                        \
    ATTR void NAME(const float *x, const float *w, const float *bias, float *y, int64_t n,      \
                   int64_t K, int64_t N, const int MM, const int NB) {                          \
        VT acc[4][MAXM];                                                                         \
        _Pragma("GCC unroll 4") for (int j = 0; j < NB; j++)                                     \
            _Pragma("GCC unroll 8") for (int m = 0; m < MM; m++) acc[j][m] = ZERO();            \
        const float *wr = w + n * K;                                                             \
        int64_t k = 0;                                                                           \
        for (; k + W <= K; k += W) {                                                             \
            VT wv[4];                                                                            \
            _Pragma("GCC unroll 4") for (int j = 0; j < NB; j++) {                               \
                if (FVK_PF && MM >= PF_MIN_M)                                                    \
                    _mm_prefetch((const char *)(wr + j * K + k) + FVK_PF, _MM_HINT_T0);          \
                wv[j] = LOAD(wr + j * K + k);                                                    \
            }                                                                                    \
            _Pragma("GCC unroll 8") for (int m = 0; m < MM; m++) {                               \
                VT xv = LOAD(x + m * K + k);                                                     \
                _Pragma("GCC unroll 4") for (int j = 0; j < NB; j++) acc[j][m] =                 \
                    FMA(wv[j], xv, acc[j][m]);                                                   \
            }                                                                                    \
        }                                                                                        \
        _Pragma("GCC unroll 4") for (int j = 0; j < NB; j++)                                     \
            _Pragma("GCC unroll 8") for (int m = 0; m < MM; m++) {                               \
                float s = REDUCE(acc[j][m]);                                                     \
                for (int64_t t = k; t < K; t++) s += wr[j * K + t] * x[m * K + t];               \
                y[m * N + n + j] = s + (bias ? bias[n + j] : 0.0f);                              \
            }                                                                                    \
    }

/* AVX2: prefetch helps M >= 3 from DRAM and hurts M = 1 (docs/kernels.md). */
F32_TILE_FN(f32_tile, INL, __m256, 8, _mm256_setzero_ps, _mm256_loadu_ps, _mm256_fmadd_ps, hsum, 3)

/* Rows [n0, n1) of y (MM, N) = x @ W^T (+ bias) on the calling thread, NB weight rows a tile. */
#define F32_RANGE(TILE, MM, NB)                                                               \
    case MM: {                                                                                \
        int64_t n = n0;                                                                       \
        for (; n + NB <= n1; n += NB) TILE(x, w, bias, y, n, K, N, MM, NB);                   \
        for (; n < n1; n++) TILE(x, w, bias, y, n, K, N, MM, 1);                              \
        break;                                                                                \
    }

static void f32_range2(const float *x, const float *w, const float *bias, float *y, int64_t M,
                       int64_t N, int64_t K, int64_t n0, int64_t n1) {
    switch (M) {
        F32_RANGE(f32_tile, 2, 4)
        F32_RANGE(f32_tile, 3, 2)
        F32_RANGE(f32_tile, 4, 2)
        F32_RANGE(f32_tile, 5, 1)
        F32_RANGE(f32_tile, 6, 1)
        F32_RANGE(f32_tile, 7, 1)
        F32_RANGE(f32_tile, 8, 1)
    }
}

/* M = 1 (single-stream decode): one weight row at a time, four accumulators; the rows split
 * statically, so each thread streams ONE contiguous range (N / nt rows) the hardware prefetcher
 * follows from start to end; no software prefetch by default (the A/B of chunking and prefetch
 * distances is in docs/kernels.md).  FVK_PF1 (bytes, 0: off) keeps it as a build option. */
#ifndef FVK_PF1
#define FVK_PF1 0
#endif
INL float f32_row(const float *x, const float *r, int64_t K) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        if (FVK_PF1) {
            _mm_prefetch((const char *)(r + k) + FVK_PF1, _MM_HINT_T0);
            _mm_prefetch((const char *)(r + k) + FVK_PF1 + 64, _MM_HINT_T0);
        }
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k + 8), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k + 16), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= K; k += 8)
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(r + k), _mm256_loadu_ps(x + k), a0);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < K; k++) s += r[k] * x[k];
    return s;
}

/* This thread's share [*a, *b) of `rows`, split statically into contiguous ranges (called
 * inside a parallel region; the whole range without OpenMP). */
INL void thread_range(int64_t rows, int64_t *a, int64_t *b) {
#ifdef _OPENMP
    const int64_t t = omp_get_thread_num(), T = omp_get_num_threads();
#else
    const int64_t t = 0, T = 1;
#endif
    *a = rows * t / T;
    *b = rows * (t + 1) / T;
}

/* y[n] = W[n] . x + bias[n] for rows n in [n0, n1) of one thread.  AVX2 even where the CPU
 * has AVX-512: a 16-lane version won in one bandwidth phase of the test VM and lost in the
 * other (docs/kernels.md), so the AVX2 loop, the steadier of the two. */
static void f32_rows(const float *x, const float *w, const float *bias, float *y, int64_t n0,
                     int64_t n1, int64_t K) {
    for (int64_t n = n0; n < n1; n++) y[n] = f32_row(x, w + n * K, K) + (bias ? bias[n] : 0.0f);
}

#if FVK_HAVE_512
/* M = 2..8 with AVX-512: 16-lane tiles over one weight row (two for M = 7, 8: registers; four
 * where x spills L1, see f32_range512), each thread on its own contiguous row range; one-row
 * tiles beat multi-row ones (docs/kernels.md). */
F32_TILE_FN(f32_tile512, static inline __attribute__((always_inline, target("avx512f"))), __m512,
            16, _mm512_setzero_ps, _mm512_loadu_ps, _mm512_fmadd_ps, _mm512_reduce_add_ps, 1)

/* MM rows of x against ONE weight row, two accumulators per x row (even / odd 16-float
 * blocks): the one-accumulator tile's loop-carried FMA latency (4 cycles per 64 bytes of W per
 * chain) made M = 2..6 compute-bound below memory speed. */
static inline __attribute__((always_inline, target("avx512f"))) void
f32_tile512k2(const float *x, const float *w, const float *bias, float *y, int64_t n, int64_t K,
              int64_t N, const int MM, const int NB) {
    (void)NB; /* one weight row */
    __m512 a0[MAXM], a1[MAXM];
    _Pragma("GCC unroll 8") for (int m = 0; m < MM; m++) a0[m] = a1[m] = _mm512_setzero_ps();
    const float *wr = w + n * K;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m512 w0 = _mm512_loadu_ps(wr + k), w1 = _mm512_loadu_ps(wr + k + 16);
        _Pragma("GCC unroll 8") for (int m = 0; m < MM; m++) {
            a0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + k), a0[m]);
            a1[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * K + k + 16), a1[m]);
        }
    }
    for (; k + 16 <= K; k += 16) {
        const __m512 w0 = _mm512_loadu_ps(wr + k);
        _Pragma("GCC unroll 8") for (int m = 0; m < MM; m++)
            a0[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * K + k), a0[m]);
    }
    _Pragma("GCC unroll 8") for (int m = 0; m < MM; m++) {
        float s = _mm512_reduce_add_ps(_mm512_add_ps(a0[m], a1[m]));
        for (int64_t t = k; t < K; t++) s += wr[t] * x[m * K + t];
        y[m * N + n] = s + (bias ? bias[n] : 0.0f);
    }
}

__attribute__((target("avx512f"))) static void f32_range512(const float *x, const float *w,
                                                             const float *bias, float *y,
                                                             int64_t M, int64_t N, int64_t K,
                                                             int64_t n0, int64_t n1) {
    if (M * K * (int64_t)sizeof(float) > 32768) {
        /* x no longer fits L1 (e.g. down_proj's K = 4864 at M >= 2): four weight rows per x
         * load, so each x vector streamed from L2 feeds four FMAs (gain: docs/kernels.md). */
        switch (M) {
            F32_RANGE(f32_tile512, 2, 4)
            F32_RANGE(f32_tile512, 3, 4)
            F32_RANGE(f32_tile512, 4, 4)
            F32_RANGE(f32_tile512, 5, 4)
            F32_RANGE(f32_tile512, 6, 4)
            F32_RANGE(f32_tile512, 7, 2)
            F32_RANGE(f32_tile512, 8, 2)
        }
        return;
    }
    switch (M) {
        F32_RANGE(f32_tile512k2, 2, 1)
        F32_RANGE(f32_tile512k2, 3, 1)
        F32_RANGE(f32_tile512k2, 4, 1)
        F32_RANGE(f32_tile512k2, 5, 1)
        F32_RANGE(f32_tile512k2, 6, 1)
        F32_RANGE(f32_tile512, 7, 2)
        F32_RANGE(f32_tile512, 8, 2)
    }
}
#endif

/* Rows [n0, n1) of y (M, N) = x (M, K) @ w (N, K)^T + bias, M = 1..8, on the calling thread. */
static void f32_range(const float *x, const float *w, const float *bias, float *y, int64_t M,
                      int64_t N, int64_t K, int64_t n0, int64_t n1) {
    if (M == 1) {
        f32_rows(x, w, bias, y, n0, n1, K);
        return;
    }
#if FVK_HAVE_512
    if (use512()) {
        f32_range512(x, w, bias, y, M, N, K, n0, n1);
        return;
    }
#endif
    f32_range2(x, w, bias, y, M, N, K, n0, n1);
}

/* y (M, N) = x (M, K) @ w (N, K)^T + bias; rows of x in blocks of 8, each block one parallel
 * region whose threads take contiguous row ranges of w (as at M = 1: one stream per thread,
 * which beat dynamic 256-row chunks). */
void fvk_linear_f32(const float *x, const float *w, const float *bias, float *y, int64_t M,
                    int64_t N, int64_t K, int nt) {
    for (int64_t m0 = 0; m0 < M; m0 += MAXM) {
        const int64_t mm = M - m0 < MAXM ? M - m0 : MAXM;
        const float *xm = x + m0 * K;
        float *ym = y + m0 * N;
#pragma omp parallel num_threads(nt) if (nt > 1)
        {
            int64_t a, b;
            thread_range(N, &a, &b);
            f32_range(xm, w, bias, ym, mm, N, K, a, b);
        }
    }
}

/* ------------------------------------------------------------------ int8 */
INL void i8_tile(const float *x, const int8_t *w, const float *scales, const float *bias,
                 float *y, int64_t n, int64_t K, int64_t N, const int MM, const int NB) {
    __m256 acc[8][MAXM];
#pragma GCC unroll 8
    for (int j = 0; j < NB; j++)
#pragma GCC unroll 8
        for (int m = 0; m < MM; m++) acc[j][m] = _mm256_setzero_ps();
    const int8_t *wr = w + n * K;
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
#pragma GCC unroll 8
        for (int j = 0; j < NB; j++) {
            const int8_t *p = wr + j * K + k;
            if (FVK_PF8 && (k & 63) == 0) _mm_prefetch((const char *)p + FVK_PF8, _MM_HINT_T0);
            __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
            __m256 w1 = _mm256_cvtepi32_ps(
                _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p + 8))));
#pragma GCC unroll 8
            for (int m = 0; m < MM; m++) {
                acc[j][m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x + m * K + k), acc[j][m]);
                acc[j][m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x + m * K + k + 8), acc[j][m]);
            }
        }
    }
#pragma GCC unroll 8
    for (int j = 0; j < NB; j++)
#pragma GCC unroll 8
        for (int m = 0; m < MM; m++) {
            float s = hsum(acc[j][m]);
            for (int64_t t = k; t < K; t++) s += (float)wr[j * K + t] * x[m * K + t];
            y[m * N + n + j] = s * scales[n + j] + (bias ? bias[n + j] : 0.0f);
        }
}

#define I8_CASE(MM, NB)                                                                       \
    case MM: {                                                                                \
        int64_t nblk = N / NB;                                                                \
        _Pragma("omp parallel for num_threads(nt) schedule(dynamic, 16) if(nt > 1)")                          \
        for (int64_t b = 0; b < nblk; b++)                                                    \
            i8_tile(x, w, scales, bias, y, b * NB, K, N, MM, NB);                             \
        for (int64_t n = nblk * NB; n < N; n++) i8_tile(x, w, scales, bias, y, n, K, N, MM, 1); \
        break;                                                                                \
    }

static void i8_block(const float *x, const int8_t *w, const float *scales, const float *bias,
                     float *y, int64_t M, int64_t N, int64_t K, int nt) {
    switch (M) {
        I8_CASE(1, 8)
        I8_CASE(2, 4)
        I8_CASE(3, 2)
        I8_CASE(4, 2)
        I8_CASE(5, 1)
        I8_CASE(6, 1)
        I8_CASE(7, 1)
        I8_CASE(8, 1)
    }
}

/* ------------------------------------------------------------------ int8 x int16 (act_q)
 * The fast int8 path: each row of x is quantized per call to int16 in blocks of 64 columns
 * (d = absmax / 32767, xs = round(x / d)); weights are sign-extended to int16
 * (_mm256_cvtepi8_epi16, shared by all MM rows of x) and multiplied with _mm256_madd_epi16
 * (16 multiply-adds per instruction, pairs summed into int32: |sum| <= 8 * 2 * 127 * 32767
 * per lane and block, no overflow).  Per block one int32 -> float convert and one FMA with d;
 * the per-row weight scale is applied at the end.  ~2x fewer vector instructions than the fp32
 * path (whose FMA ports are the limit at M >= 2), and the added error is ~1e-5 relative
 * (|x - d * xs| <= d / 2 = absmax / 65534), far below the int8 weight rounding (1/254).
 * Requires K % 64 == 0 (else the exact fp32 path runs). */
static void prep_xs(const float *x, int16_t *xs, float *dx, int64_t M, int64_t K) {
    const int64_t nb = K / 64;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t m = 0; m < M; m++)
        for (int64_t b = 0; b < nb; b++) {
            const float *s = x + m * K + b * 64;
            __m256 am = _mm256_setzero_ps();
            for (int i = 0; i < 64; i += 8)
                am = _mm256_max_ps(am, _mm256_andnot_ps(sign, _mm256_loadu_ps(s + i)));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(am), _mm256_extractf128_ps(am, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            float amax = _mm_cvtss_f32(h);
            dx[m * nb + b] = amax / 32767.0f;
            const __m256 iv = _mm256_set1_ps(amax > 0.0f ? 32767.0f / amax : 0.0f);
            for (int i = 0; i < 64; i += 16) {
                __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(s + i), iv));
                __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(s + i + 8), iv));
                /* packs works per 128-bit lane: [a0-3 c0-3 | a4-7 c4-7] -> fix the order */
                __m256i p = _mm256_permute4x64_epi64(_mm256_packs_epi32(a, c), 0xD8);
                _mm256_store_si256((__m256i *)(xs + m * K + b * 64 + i), p);
            }
        }
}

INL void i8q_tile(const int16_t *xs, const float *dx, const int8_t *w, const float *scales,
                  const float *bias, float *y, int64_t n, int64_t K, int64_t N, const int MM,
                  const int NB) {
    __m256 acc[4][MAXM];
#pragma GCC unroll 4
    for (int j = 0; j < NB; j++)
#pragma GCC unroll 8
        for (int m = 0; m < MM; m++) acc[j][m] = _mm256_setzero_ps();
    const int64_t nb = K / 64;
    const int8_t *wr = w + n * K;
    for (int64_t b = 0; b < nb; b++) {
#pragma GCC unroll 4
        for (int j = 0; j < NB; j++) {
            const int8_t *p = wr + j * K + b * 64;
            if (FVK_PF8) _mm_prefetch((const char *)p + FVK_PF8, _MM_HINT_T0);
            __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
            __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 16)));
            __m256i w2 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 32)));
            __m256i w3 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(p + 48)));
#pragma GCC unroll 8
            for (int m = 0; m < MM; m++) {
                const __m256i *xv = (const __m256i *)(xs + m * K + b * 64);
                __m256i s01 = _mm256_add_epi32(_mm256_madd_epi16(w0, _mm256_load_si256(xv)),
                                               _mm256_madd_epi16(w1, _mm256_load_si256(xv + 1)));
                __m256i s23 = _mm256_add_epi32(_mm256_madd_epi16(w2, _mm256_load_si256(xv + 2)),
                                               _mm256_madd_epi16(w3, _mm256_load_si256(xv + 3)));
                acc[j][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(s01, s23)),
                                            _mm256_broadcast_ss(dx + m * nb + b), acc[j][m]);
            }
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < NB; j++)
#pragma GCC unroll 8
        for (int m = 0; m < MM; m++)
            y[m * N + n + j] = hsum(acc[j][m]) * scales[n + j] + (bias ? bias[n + j] : 0.0f);
}

#define I8Q_CASE(MM, NB)                                                                      \
    case MM: {                                                                                \
        int64_t nblk = N / NB;                                                                \
        _Pragma("omp parallel for num_threads(nt) schedule(dynamic, 16) if(nt > 1)")          \
        for (int64_t b = 0; b < nblk; b++)                                                    \
            i8q_tile(xs, dx, w, scales, bias, y, b * NB, K, N, MM, NB);                       \
        for (int64_t n = nblk * NB; n < N; n++) i8q_tile(xs, dx, w, scales, bias, y, n, K, N, MM, 1); \
        break;                                                                                \
    }

/* M = 1 on CPUs with AVX-512 BW + VNNI (e.g. Zen 4/5, Ice Lake and later): one weight row at
 * a time, 64 columns per step as two 32-lane int16 halves and `vpdpwssd` (int16 pairs
 * multiplied and summed into int32 in one instruction) — a third of the AVX2 tile's vector
 * instructions, which had made this path compute-bound below memory speed.  Same integer block
 * sums as the AVX2 tile, so the same error bound; only the float accumulation order differs.
 * Rows split statically (one contiguous range per thread), as for fp32, for the same reason;
 * likewise i4q_gemv1_512 (docs/kernels.md). */
#if FVK_HAVE_512
__attribute__((target("avx512f,avx512bw,avx512vnni"))) static void
i8q_gemv1_512(const int16_t *xs, const float *dx, const int8_t *w, const float *scales,
              const float *bias, float *y, int64_t N, int64_t K, int nt) {
    const int64_t nb = K / 64;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1) /* see f32_rows */
    for (int64_t n = 0; n < N; n++) {
        const int8_t *wr = w + n * K;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t b = 0; b < nb; b++) {
            const int8_t *p = wr + b * 64;
            if (FVK_PF8) _mm_prefetch((const char *)p + FVK_PF8, _MM_HINT_T0);
            __m512i w0 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)p));
            __m512i w1 = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(p + 32)));
            const __m512i *xv = (const __m512i *)(xs + b * 64);
            __m512i s = _mm512_dpwssd_epi32(_mm512_setzero_si512(), w0, _mm512_load_si512(xv));
            s = _mm512_dpwssd_epi32(s, w1, _mm512_load_si512(xv + 1));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(dx[b]), acc);
        }
        y[n] = _mm512_reduce_add_ps(acc) * scales[n] + (bias ? bias[n] : 0.0f);
    }
}
#endif

static void i8q_block(const int16_t *xs, const float *dx, const int8_t *w, const float *scales,
                      const float *bias, float *y, int64_t M, int64_t N, int64_t K, int nt) {
#if FVK_HAVE_512
    if (M == 1 && use512()) {
        i8q_gemv1_512(xs, dx, w, scales, bias, y, N, K, nt);
        return;
    }
#endif
    switch (M) {
        I8Q_CASE(1, 4)
        I8Q_CASE(2, 4)
        I8Q_CASE(3, 2)
        I8Q_CASE(4, 2)
        I8Q_CASE(5, 1)
        I8Q_CASE(6, 1)
        I8Q_CASE(7, 1)
        I8Q_CASE(8, 1)
    }
}

/* act_q != 0 (and K % 64 == 0): the int16-activation path above; else exact fp32.
 * Returns 0, or -2 when out of memory. */
int fvk_linear_i8(const float *x, const int8_t *w, const float *scales, const float *bias,
                  float *y, int64_t M, int64_t N, int64_t K, int nt, int act_q) {
    if (act_q && K % 64 == 0) {
        int64_t mb = M < MAXM ? M : MAXM;
        size_t bytes = (size_t)(mb * K) * 2 + (size_t)(mb * (K / 64)) * sizeof(float);
        int16_t *xs = (int16_t *)aligned_alloc(64, (bytes + 63) / 64 * 64);
        if (!xs) return -2;
        float *dx = (float *)(xs + mb * K);
        for (int64_t m0 = 0; m0 < M; m0 += MAXM) {
            int64_t mm = M - m0 < MAXM ? M - m0 : MAXM;
            prep_xs(x + m0 * K, xs, dx, mm, K);
            i8q_block(xs, dx, w, scales, bias, y + m0 * N, mm, N, K, nt);
        }
        free(xs);
        return 0;
    }
    for (int64_t m0 = 0; m0 < M; m0 += MAXM) {
        int64_t mm = M - m0 < MAXM ? M - m0 : MAXM;
        i8_block(x + m0 * K, w, scales, bias, y + m0 * N, mm, N, K, nt);
    }
    return 0;
}

/* ------------------------------------------------------------------ int4 */
/* 8 bytes (16 columns) are zero-extended to 8 int32 lanes; lane i holds columns 2i (low nibble,
 * `& 15`) and 2i+1 (high nibble, `>> 4`).  xp holds x in that order per 16 columns:
 * [x0 x2 .. x14 | x1 x3 .. x15].  sx[m, g] = sum of x[m] over group g. */
static void prep_x(const float *x, float *xp, float *sx, int64_t M, int64_t K, int64_t G) {
    for (int64_t m = 0; m < M; m++) {
        for (int64_t k0 = 0; k0 < K; k0 += 16) {
            const float *s = x + m * K + k0;
            float *d = xp + m * K + k0;
            for (int i = 0; i < 8; i++) {
                d[i] = s[2 * i];
                d[8 + i] = s[2 * i + 1];
            }
        }
        for (int64_t g = 0; g < K / G; g++) {
            float t = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) t += x[m * K + k];
            sx[m * (K / G) + g] = t;
        }
    }
}

/* 16 weights (8 bytes) as two float vectors of raw nibble values q (lo = even columns). */
INL void nib16(const uint8_t *p, __m256 *lo, __m256 *hi) {
    __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    *lo = _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(15)));
    *hi = _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4));
}

/* Small M (MM * NB <= 4): per group, gacc = dot(q, x) over raw nibbles, then
 * acc += scale * gacc; the offsets add sum_g zb[g] * sx[m, g] at the end.  One convert per
 * weight, no per-weight dequantization. */
INL void i4_tile_dot(const float *xp, const float *sx, const uint8_t *w, const float *scales,
                     const float *zb, const float *bias, float *y, int64_t n, int64_t K,
                     int64_t N, int64_t G, const int MM, const int NB) {
    __m256 acc[4][4];
#pragma GCC unroll 4
    for (int j = 0; j < NB; j++)
#pragma GCC unroll 4
        for (int m = 0; m < MM; m++) acc[j][m] = _mm256_setzero_ps();
    const int64_t ng = K / G, K2 = K / 2;
    for (int64_t g = 0; g < ng; g++) {
        __m256 ga[4][4];
#pragma GCC unroll 4
        for (int j = 0; j < NB; j++)
#pragma GCC unroll 4
            for (int m = 0; m < MM; m++) ga[j][m] = _mm256_setzero_ps();
        for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
#pragma GCC unroll 4
            for (int j = 0; j < NB; j++) {
                __m256 lo, hi;
                nib16(w + (n + j) * K2 + k / 2, &lo, &hi);
#pragma GCC unroll 4
                for (int m = 0; m < MM; m++) {
                    ga[j][m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xp + m * K + k), ga[j][m]);
                    ga[j][m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xp + m * K + k + 8), ga[j][m]);
                }
            }
        }
#pragma GCC unroll 4
        for (int j = 0; j < NB; j++) {
            __m256 sv = _mm256_broadcast_ss(scales + (n + j) * ng + g);
#pragma GCC unroll 4
            for (int m = 0; m < MM; m++) acc[j][m] = _mm256_fmadd_ps(ga[j][m], sv, acc[j][m]);
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < NB; j++)
#pragma GCC unroll 4
        for (int m = 0; m < MM; m++) {
            const float *z = zb + (n + j) * ng, *sm = sx + m * ng;
            float t = hsum(acc[j][m]);
            for (int64_t g = 0; g < ng; g++) t += z[g] * sm[g];
            y[m * N + n + j] = t + (bias ? bias[n + j] : 0.0f);
        }
}

/* Larger M: dequantize 16 weights in registers (w = q * scale + zb, shared by all MM rows),
 * then one FMA per row. */
INL void i4_tile_deq(const float *xp, const uint8_t *w, const float *scales, const float *zb,
                     const float *bias, float *y, int64_t n, int64_t K, int64_t N, int64_t G,
                     const int MM) {
    __m256 acc[MAXM];
#pragma GCC unroll 8
    for (int m = 0; m < MM; m++) acc[m] = _mm256_setzero_ps();
    const int64_t ng = K / G, K2 = K / 2;
    const uint8_t *wr = w + n * K2;
    for (int64_t g = 0; g < ng; g++) {
        __m256 sv = _mm256_broadcast_ss(scales + n * ng + g);
        __m256 zv = _mm256_broadcast_ss(zb + n * ng + g);
        for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
            __m256 lo, hi;
            nib16(wr + k / 2, &lo, &hi);
            lo = _mm256_fmadd_ps(lo, sv, zv);
            hi = _mm256_fmadd_ps(hi, sv, zv);
#pragma GCC unroll 8
            for (int m = 0; m < MM; m++) {
                acc[m] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(xp + m * K + k), acc[m]);
                acc[m] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(xp + m * K + k + 8), acc[m]);
            }
        }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MM; m++) y[m * N + n] = hsum(acc[m]) + (bias ? bias[n] : 0.0f);
}

#define I4_DOT_CASE(MM, NB)                                                                   \
    case MM: {                                                                                \
        int64_t nblk = N / NB;                                                                \
        _Pragma("omp parallel for num_threads(nt) schedule(dynamic, 16) if(nt > 1)")                     \
        for (int64_t b = 0; b < nblk; b++)                                                    \
            i4_tile_dot(xp, sx, w, scales, zb, bias, y, b * NB, K, N, G, MM, NB);             \
        for (int64_t n = nblk * NB; n < N; n++)                                               \
            i4_tile_dot(xp, sx, w, scales, zb, bias, y, n, K, N, G, MM, 1);                   \
        break;                                                                                \
    }
#define I4_DEQ_CASE(MM)                                                                       \
    case MM: {                                                                                \
        _Pragma("omp parallel for num_threads(nt) schedule(dynamic, 16) if(nt > 1)")                     \
        for (int64_t n = 0; n < N; n++) i4_tile_deq(xp, w, scales, zb, bias, y, n, K, N, G, MM); \
        break;                                                                                \
    }

static void i4_block(const float *xp, const float *sx, const uint8_t *w, const float *scales,
                     const float *zb, const float *bias, float *y, int64_t M, int64_t N,
                     int64_t K, int64_t G, int nt) {
    switch (M) {
        I4_DOT_CASE(1, 4)
        I4_DOT_CASE(2, 2)
        I4_DOT_CASE(3, 1)
        I4_DOT_CASE(4, 1)
        I4_DEQ_CASE(5)
        I4_DEQ_CASE(6)
        I4_DEQ_CASE(7)
        I4_DEQ_CASE(8)
    }
}

/* ------------------------------------------------------------------ int4 x int8 (act_q)
 * The fast int4 path (llama.cpp's Q4 x Q8, ONNX Runtime MatMulNBits accuracy_level=4): each
 * row of x is quantized per call to int8 (d = absmax / 127 per block, xq = round(x / d)), and
 * a chunk of 64 weights (32 bytes) is multiplied as integers: two _mm256_maddubs_epi16
 * (unsigned nibble 0..15 x signed xq; |pair sum| <= 2 * 15 * 127, no saturation) + one
 * _mm256_madd_epi16, or two AVX-VNNI vpdpbusd, give 8 int32 lanes; lane u holds columns
 * 8u..8u+7 of the chunk.  The x blocks follow those lanes: block (span, u) = lane u of the S
 * chunks of one weight group (S = G / 64, 1 for G = 32), i.e. 8 columns for G <= 64, 16 for
 * G = 128, 32 for G = 256.  So a whole group accumulates in integer registers and is converted
 * and scaled (d_block * scale_group per lane) once per group, not per chunk.  ~0.15 vector
 * instructions per weight instead of ~0.6 for the fp32 path: M = 1 becomes memory-bound.  The
 * offset term sum_g zb_g * sum_g(x) uses the exact fp32 group sums of x.
 * Error (vs exact fp32 math): |x - d * xq| <= d / 2 per element, so per output
 * |dy| <= sum_k d_b(k) / 2 * |q_k * scale_g(k)|; relative to |y| that is ~1e-3, an order of
 * magnitude below the int4 weight rounding itself (scale / 2 per weight).
 *
 * Layouts: xq per row and chunk c: 32 bytes of x at even columns, then 32 at odd columns (the
 * nibble order of a 32-byte weight chunk); dv[m, span] = the 8 lanes' d. */
/* chunks of 64 columns per x block span: one weight group (G = 64..256), 1 for G = 32 */
static inline int64_t xq_span(int64_t G) { return G <= 64 ? 1 : G / 64; }

static void prep_xq(const float *x, int8_t *xq, float *dv, float *sx, int64_t M, int64_t K,
                    int64_t G) {
    const int64_t nc = K / 64, S = xq_span(G), ns = nc / S;
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t m = 0; m < M; m++) {
        for (int64_t sp = 0; sp < ns; sp++) {
            const float *s0 = x + m * K + sp * S * 64;
            __m256 mx[8];
            for (int u = 0; u < 8; u++) mx[u] = _mm256_setzero_ps();
            for (int64_t c = 0; c < S; c++)
                for (int u = 0; u < 8; u++)
                    mx[u] = _mm256_max_ps(mx[u], _mm256_andnot_ps(sign, _mm256_loadu_ps(s0 + c * 64 + 8 * u)));
            float id[8];
            for (int u = 0; u < 8; u++) {
                __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx[u]), _mm256_extractf128_ps(mx[u], 1));
                h = _mm_max_ps(h, _mm_movehl_ps(h, h));
                h = _mm_max_ss(h, _mm_movehdup_ps(h));
                float amax = _mm_cvtss_f32(h);
                dv[(m * ns + sp) * 8 + u] = amax / 127.0f;
                id[u] = amax > 0.0f ? 127.0f / amax : 0.0f;
            }
            for (int64_t c = 0; c < S; c++) {
                int32_t qi[64];
                for (int u = 0; u < 8; u++)
                    _mm256_storeu_si256((__m256i *)(qi + 8 * u),
                                        _mm256_cvtps_epi32(_mm256_mul_ps(
                                            _mm256_loadu_ps(s0 + c * 64 + 8 * u), _mm256_set1_ps(id[u]))));
                int8_t *d = xq + m * K + (sp * S + c) * 64;
                for (int i = 0; i < 32; i++) {
                    d[i] = (int8_t)qi[2 * i];
                    d[32 + i] = (int8_t)qi[2 * i + 1];
                }
            }
        }
        for (int64_t g = 0; g < K / G; g++) {
            float t = 0.0f;
            for (int64_t k = g * G; k < (g + 1) * G; k++) t += x[m * K + k];
            sx[m * (K / G) + g] = t;
        }
    }
}

INL float dot_f32(const float *a, const float *b, int64_t n) {
    __m256 s = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s);
    float t = hsum(s);
    for (; i < n; i++) t += a[i] * b[i];
    return t;
}

/* The act_q int4 tiles are compiled twice (this file includes itself): with AVX2 only, and,
 * where the compiler knows it (GCC), with AVX-VNNI (_mm256_dpbusd_avx_epi32: the u8 x s8 dot
 * of 4 pairs accumulated into int32 in one instruction, replacing maddubs + add + madd), picked
 * at run time by CPUID (`fvk_set_isa` can force AVX2, for tests and A/B measurements). */
#define FVK_I4Q_BODY
#define SFX(name) name##_avx2
/* ACC4: acc += the 64 products of a chunk (lo/hi nibbles x even/odd xq); FIN4: acc as int32 */
#define ACC4(acc, lo, hi, xl, xh)                                                             \
    _mm256_add_epi16(acc,                                                                     \
        _mm256_add_epi16(_mm256_maddubs_epi16(lo, xl), _mm256_maddubs_epi16(hi, xh)))
#define FIN4(acc) _mm256_madd_epi16(acc, _mm256_set1_epi16(1))
#define DOT4(lo, hi, xl, xh) FIN4(ACC4(_mm256_setzero_si256(), lo, hi, xl, xh))
#include "gemv.c" /* this file (always built under that name) */
#undef SFX
#undef ACC4
#undef FIN4
#undef DOT4
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define FVK_HAVE_VNNI 1
#pragma GCC push_options
#pragma GCC target("avxvnni")
#define SFX(name) name##_vnni
#define ACC4(acc, lo, hi, xl, xh)                                                             \
    _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(acc, lo, xl), hi, xh)
#define FIN4(acc) (acc)
#define DOT4(lo, hi, xl, xh) ACC4(_mm256_setzero_si256(), lo, hi, xl, xh)
#include "gemv.c" /* this file (always built under that name) */
#undef SFX
#undef ACC4
#undef FIN4
#undef DOT4
#pragma GCC pop_options
#else
#define FVK_HAVE_VNNI 0
#endif

static int fvk_isa = -1; /* -1: not probed yet; 0: AVX2; 1: AVX-VNNI */

/* 0: force AVX2; 1: use AVX-VNNI when the CPU has it. Returns the ISA now in use (0 or 1). */
int fvk_set_isa(int want) {
    fvk_avx512 = want ? probe_avx512() : 0;
    int vnni = 0;
#if FVK_HAVE_VNNI
    __builtin_cpu_init();
    vnni = __builtin_cpu_supports("avxvnni") != 0;
#endif
    fvk_isa = want && vnni;
    return fvk_isa;
}

#if FVK_HAVE_512
/* M = 1, G >= 64, AVX-512 BW + VNNI: a 64-column chunk is 32 bytes of nibbles; broadcast to
 * both 256-bit halves, the upper half shifted right by 4 (`vpsrlvq`), masked: [even columns |
 * odd columns] as u8, exactly the layout prep_xq gives the chunk's 64 int8 x values, so one
 * `vpdpbusd` does the whole chunk (the AVX2 / AVX-VNNI tiles need two, plus the unpacking).
 * Lane L of either half sums x block u = L (8 natural columns), so the per-group scaling is dv
 * broadcast to both halves.  Same integer group sums as SFX(i4q_tile_ga); only the float
 * accumulation order differs. */
__attribute__((target("avx512f,avx512bw,avx512vnni,avx512dq"))) static void
i4q_gemv1_512(const int8_t *xq, const float *dv, const float *sx, const uint8_t *w,
              const float *scales, const float *zb, const float *bias, float *y, int64_t N,
              int64_t K, int64_t G, int nt) {
    const int64_t K2 = K / 2, ng = K / G, cpg = G / 64;
    const __m512i m4 = _mm512_set1_epi8(15);
    const __m512i sh = _mm512_setr_epi64(0, 0, 0, 0, 4, 4, 4, 4);
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1) /* see f32_rows */
    for (int64_t n = 0; n < N; n++) {
        const uint8_t *wr = w + n * K2;
        __m512 acc = _mm512_setzero_ps();
        for (int64_t g = 0; g < ng; g++) {
            __m512i ia = _mm512_setzero_si512();
            for (int64_t c = g * cpg; c < (g + 1) * cpg; c++) {
                if (FVK_PF4 && (c & 1) == 0)
                    _mm_prefetch((const char *)(wr + c * 32) + FVK_PF4, _MM_HINT_T0);
                __m512i b = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(wr + c * 32)));
                __m512i wv = _mm512_and_si512(_mm512_srlv_epi64(b, sh), m4);
                ia = _mm512_dpbusd_epi32(ia, wv, _mm512_load_si512((const __m512i *)(xq + c * 64)));
            }
            __m512 f = _mm512_mul_ps(_mm512_broadcast_f32x8(_mm256_load_ps(dv + g * 8)),
                                     _mm512_set1_ps(scales[n * ng + g]));
            acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ia), f, acc);
        }
        y[n] = _mm512_reduce_add_ps(acc) + dot_f32(zb + n * ng, sx, ng) + (bias ? bias[n] : 0.0f);
    }
}
#endif

static void i4q_block(const int8_t *xq, const float *dv, const float *sx, const uint8_t *w,
                      const float *scales, const float *zb, const float *bias, float *y,
                      int64_t M, int64_t N, int64_t K, int64_t G, int nt) {
    if (fvk_isa < 0) fvk_set_isa(1);
#if FVK_HAVE_512
    if (M == 1 && G >= 64 && use512()) {
        i4q_gemv1_512(xq, dv, sx, w, scales, zb, bias, y, N, K, G, nt);
        return;
    }
#endif
#if FVK_HAVE_VNNI
    if (fvk_isa == 1) {
        i4q_block_vnni(xq, dv, sx, w, scales, zb, bias, y, M, N, K, G, nt);
        return;
    }
#endif
    i4q_block_avx2(xq, dv, sx, w, scales, zb, bias, y, M, N, K, G, nt);
}

/* act_q != 0 (and K % 64 == 0): the int8-activation path above; else exact fp32.
 * Returns 0, or -1 when K is not a multiple of 16 and G, or -2 when out of memory. */
int fvk_linear_i4(const float *x, const uint8_t *w, const float *scales, const float *zb,
                  const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t G,
                  int nt, int act_q) {
    if (K % 16 || G % 16 || K % G) return -1;
    int64_t mb = M < MAXM ? M : MAXM;
    if (act_q && K % 64 == 0 && G % 32 == 0) {
        /* xq (mb K bytes) | dv (mb K/8 floats) | sx (mb K/G floats), 32-byte aligned */
        size_t bytes = (size_t)(mb * K) + (size_t)(mb * (K / 8) + mb * (K / G)) * sizeof(float);
        int8_t *xq = (int8_t *)aligned_alloc(64, (bytes + 63) / 64 * 64);
        if (!xq) return -2;
        float *dv = (float *)(xq + mb * K), *sx = dv + mb * (K / 8);
        for (int64_t m0 = 0; m0 < M; m0 += MAXM) {
            int64_t mm = M - m0 < MAXM ? M - m0 : MAXM;
            prep_xq(x + m0 * K, xq, dv, sx, mm, K, G);
            i4q_block(xq, dv, sx, w, scales, zb, bias, y + m0 * N, mm, N, K, G, nt);
        }
        free(xq);
        return 0;
    }
    size_t bytes = (size_t)(mb * K + mb * (K / G)) * sizeof(float);
    float *xp = (float *)aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!xp) return -2;
    float *sx = xp + mb * K;
    for (int64_t m0 = 0; m0 < M; m0 += MAXM) {
        int64_t mm = M - m0 < MAXM ? M - m0 : MAXM;
        prep_x(x + m0 * K, xp, sx, mm, K, G);
        i4_block(xp, sx, w, scales, zb, bias, y + m0 * N, mm, N, K, G, nt);
    }
    free(xp);
    return 0;
}

/* ------------------------------------------------------------------ fused decode
 * All decoder layers of one decode step in one call (fastvlm/kernels/fused.py): per layer
 * RMSNorm -> q/k/v (+bias) -> rotate-half RoPE -> K/V written to the static cache at each row's
 * position -> attention over cache positions [0, lim[m]] (GQA, fp32 softmax) -> o_proj ->
 * residual -> RMSNorm -> gate/up -> SiLU * up -> down -> residual.  The projections are the
 * GEMV kernels above (fp32 / int8 / int4, per linear).  What this saves is not bandwidth but
 * the ~40 framework ops per layer between the GEMVs.
 * For up to 8 rows with fp32 projections q/k/v run as one parallel region and gate/up + SiLU as
 * another (f32_cat, f32_gateup): 5 regions per layer instead of 8, since each fork / join costs
 * (history: docs/kernels.md). */
typedef struct {
    int32_t kind; /* 0 fp32 (N, K); 1 int8 (N, K) + scales (N,); 2 int4 nibbles + scales, zb */
    int32_t act_q;
    int64_t n, k, g;
    const void *w;
    const float *scales, *zb, *bias;
} fvk_lin;

typedef struct {
    fvk_lin q, k, v, o, gate, up, down;
    const float *ln1, *ln2; /* RMSNorm weights (H,) */
    float *kc, *vc;         /* this layer's cache, (slots, kv_heads, max_len, hd), at slot 0 */
} fvk_layer;

static int run_lin(const fvk_lin *L, const float *x, float *y, int64_t M, int nt) {
    switch (L->kind) {
    case 0:
        fvk_linear_f32(x, (const float *)L->w, L->bias, y, M, L->n, L->k, nt);
        return 0;
    case 1:
        return fvk_linear_i8(x, (const int8_t *)L->w, L->scales, L->bias, y, M, L->n, L->k, nt,
                             L->act_q);
    case 2:
        return fvk_linear_i4(x, (const uint8_t *)L->w, L->scales, L->zb, L->bias, y, M, L->n,
                             L->k, L->g, nt, L->act_q);
    }
    return -1;
}

/* M <= 8 decode rows (x: (M, K)) through fp32 q, k and v in ONE parallel region: their rows split
 * statically as if the three matrices were concatenated, so each thread streams one contiguous
 * range (the k/v matrices of the 0.5B shape are 0.46 MB: alone, each is mostly fork/join and
 * prefetcher ramp-up). */
static void f32_cat(const float *x, int64_t M, const fvk_lin *const *L, float *const *y, int nl,
                    int nt) {
    int64_t tot = 0;
    for (int i = 0; i < nl; i++) tot += L[i]->n;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t a, b, off = 0;
        thread_range(tot, &a, &b);
        for (int i = 0; i < nl; off += L[i]->n, i++) {
            const int64_t n0 = a > off ? a - off : 0, n1 = b - off < L[i]->n ? b - off : L[i]->n;
            if (n0 < n1)
                f32_range(x, (const float *)L[i]->w, L[i]->bias, y[i], M, L[i]->n, L[i]->k, n0, n1);
        }
    }
}

/* M <= 8 decode rows through fp32 gate and up, then g = silu(g) * u, in ONE parallel region: each
 * thread takes the same contiguous range of intermediate rows in both matrices (gate's, then
 * up's) and applies SiLU to its own rows, so no second region and no separate SiLU pass. */
static void f32_gateup(const float *x, int64_t M, const fvk_lin *G, const fvk_lin *U, float *g,
                       float *u, int nt) {
    const int64_t K = G->k;
    const float *wg = (const float *)G->w, *wu = (const float *)U->w;
#pragma omp parallel num_threads(nt) if (nt > 1)
    {
        int64_t a, b;
        thread_range(G->n, &a, &b);
        f32_range(x, wg, G->bias, g, M, G->n, K, a, b);
        f32_range(x, wu, U->bias, u, M, G->n, K, a, b);
        for (int64_t m = 0; m < M; m++) silu_mul(g + m * G->n + a, u + m * G->n + a, b - a);
    }
}

static void rmsnorm(const float *x, const float *w, float *y, int64_t M, int64_t H, float eps) {
    for (int64_t m = 0; m < M; m++) {
        const float *xr = x + m * H;
        double ss = 0.0;
        for (int64_t i = 0; i < H; i++) ss += (double)xr[i] * xr[i];
        float r = 1.0f / sqrtf((float)(ss / (double)H) + eps);
        for (int64_t i = 0; i < H; i++) y[m * H + i] = w[i] * (xr[i] * r);
    }
}

/* rotate-half RoPE in place on `nh` heads of one row: x*cos + rotate_half(x)*sin */
static void rope(float *x, const float *cs, const float *sn, int64_t nh, int64_t hd) {
    int64_t h2 = hd / 2;
    for (int64_t h = 0; h < nh; h++) {
        float *v = x + h * hd;
        for (int64_t i = 0; i < h2; i++) {
            float a = v[i], b = v[i + h2];
            v[i] = a * cs[i] - b * sn[i];
            v[i + h2] = b * cs[i + h2] + a * sn[i + h2];
        }
    }
}

INL float dot_hd(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
    if (n >= 8) {
        __m256 acc = _mm256_setzero_ps();
        for (; i + 8 <= n; i += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
        s = hsum(acc);
    }
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* q . K[i] for the 8 keys K[0..8) (rows of hd floats, hd % 8 == 0): eight accumulators, then
 * one transposing reduction (hadd / permute) into the 8 lanes of the result. */
INL __m256 dot8(const float *q, const float *K, int64_t hd) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
    for (int64_t d = 0; d < hd; d += 8) {
        const __m256 qv = _mm256_loadu_ps(q + d);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(K + d), qv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(K + hd + d), qv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(K + 2 * hd + d), qv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(K + 3 * hd + d), qv, a3);
        a4 = _mm256_fmadd_ps(_mm256_loadu_ps(K + 4 * hd + d), qv, a4);
        a5 = _mm256_fmadd_ps(_mm256_loadu_ps(K + 5 * hd + d), qv, a5);
        a6 = _mm256_fmadd_ps(_mm256_loadu_ps(K + 6 * hd + d), qv, a6);
        a7 = _mm256_fmadd_ps(_mm256_loadu_ps(K + 7 * hd + d), qv, a7);
    }
    /* u0 = [a0..a3 over lanes 0-3 | a0..a3 over lanes 4-7], u1 likewise for a4..a7 */
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* out (hd) = softmax(q . K[0..len) * scale) @ V[0..len); sc: len floats of scratch.  For
 * hd % 8 == 0 (every Qwen2 shape): scores 8 keys at a time (dot8), exp256, and the output one
 * 8-float block at a time over all values (four accumulators, no store per key).  Attention
 * math is not the bottleneck; the layers' fork / join and cache misses on the K / V rows are. */
static void attend(const float *q, const float *K, const float *V, float *out, float *sc,
                   int64_t len, int64_t hd, float scale) {
    float mx = -INFINITY;
    int64_t s = 0;
    if (hd % 8 == 0) {
        __m256 vmx = _mm256_set1_ps(-INFINITY);
        const __m256 vs = _mm256_set1_ps(scale);
        for (; s + 8 <= len; s += 8) {
            const __m256 v = _mm256_mul_ps(dot8(q, K + s * hd, hd), vs);
            _mm256_storeu_ps(sc + s, v);
            vmx = _mm256_max_ps(vmx, v);
        }
        float m8[8];
        _mm256_storeu_ps(m8, vmx);
        for (int i = 0; i < 8; i++) mx = m8[i] > mx ? m8[i] : mx;
    }
    for (; s < len; s++) {
        sc[s] = dot_hd(q, K + s * hd, hd) * scale;
        if (sc[s] > mx) mx = sc[s];
    }
    int64_t i = 0;
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= len; i += 8) {
        __m256 e = exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + i), _mm256_set1_ps(mx)));
        _mm256_storeu_ps(sc + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float tot = hsum(acc);
    for (; i < len; i++) {
        sc[i] = expf(sc[i] - mx);
        tot += sc[i];
    }
    const float inv = 1.0f / tot;
    if (hd % 8 == 0) {
        for (int64_t d = 0; d < hd; d += 8) {
            __m256 o0 = _mm256_setzero_ps(), o1 = o0, o2 = o0, o3 = o0;
            const float *vd = V + d;
            int64_t t = 0;
            for (; t + 4 <= len; t += 4) {
                o0 = _mm256_fmadd_ps(_mm256_set1_ps(sc[t]), _mm256_loadu_ps(vd + t * hd), o0);
                o1 = _mm256_fmadd_ps(_mm256_set1_ps(sc[t + 1]), _mm256_loadu_ps(vd + (t + 1) * hd), o1);
                o2 = _mm256_fmadd_ps(_mm256_set1_ps(sc[t + 2]), _mm256_loadu_ps(vd + (t + 2) * hd), o2);
                o3 = _mm256_fmadd_ps(_mm256_set1_ps(sc[t + 3]), _mm256_loadu_ps(vd + (t + 3) * hd), o3);
            }
            for (; t < len; t++)
                o0 = _mm256_fmadd_ps(_mm256_set1_ps(sc[t]), _mm256_loadu_ps(vd + t * hd), o0);
            const __m256 o = _mm256_add_ps(_mm256_add_ps(o0, o1), _mm256_add_ps(o2, o3));
            _mm256_storeu_ps(out + d, _mm256_mul_ps(o, _mm256_set1_ps(inv)));
        }
        return;
    }
    for (int64_t d = 0; d < hd; d++) out[d] = 0.0f;
    for (int64_t t = 0; t < len; t++) {
        const float p = sc[t] * inv;
        const float *vr = V + t * hd;
        for (int64_t d = 0; d < hd; d++) out[d] += p * vr[d];
    }
}

/* x (M, H): the residual stream of M decode rows (cache slots lo .. lo+M-1), updated in place
 * through all `nl` layers (the LM head stays with the caller).  pos[m]: where row m's new K/V
 * go; lim[m]: it attends cache positions 0..lim[m].  cs, sn: RoPE cos / sin, (M, hd) rows per
 * decode row, or with rope_table (max_len, hd) tables indexed by pos[m].  tok (nullable): fill
 * x first with rows tok[m] of emb (vocab, H).  final_norm (nullable): apply the model's final
 * RMSNorm to x at the end.  (Both save a torch op per step whose dispatch is slow with the
 * caches cold after streaming the weights.)  scratch: at least
 * fvk_decode_scratch(...) floats.  Returns 0, -1 (bad shape or token id), -2 (OOM). */
int64_t fvk_decode_scratch(int64_t M, int64_t H, int64_t heads, int64_t kvh, int64_t hd,
                           int64_t inter, int64_t max_len) {
    return M * (2 * H + 2 * heads * hd + 2 * kvh * hd + 2 * inter + heads * max_len) + 64;
}

int fvk_decode(int nl, const fvk_layer *layers, float *x, int64_t M, int64_t H, int64_t heads,
               int64_t kvh, int64_t hd, int64_t inter, int64_t max_len, int64_t lo,
               const int64_t *pos, const int64_t *lim, const float *cs, const float *sn,
               int rope_table, const int64_t *tok, const float *emb, int64_t vocab,
               const float *final_norm, float eps, float *scratch, int nt) {
    if (heads % kvh || M < 1) return -1;
    for (int64_t m = 0; m < M; m++)
        if (pos[m] < 0 || pos[m] >= max_len || lim[m] < 0 || lim[m] >= max_len) return -1;
    if (tok) { /* x = the tokens' embedding rows */
        for (int64_t m = 0; m < M; m++)
            if (tok[m] < 0 || tok[m] >= vocab) return -1;
        for (int64_t m = 0; m < M; m++) memcpy(x + m * H, emb + tok[m] * H, H * sizeof(float));
    }
    float *xn = scratch, *t = xn + M * H, *q = t + M * H, *att = q + M * heads * hd;
    float *kk = att + M * heads * hd, *vv = kk + M * kvh * hd, *gg = vv + M * kvh * hd;
    float *uu = gg + M * inter, *sc = uu + M * inter;
    const int64_t grp = heads / kvh, slot = kvh * max_len * hd;
    const float scale = 1.0f / sqrtf((float)hd);
    int rc = 0;
    for (int l = 0; l < nl; l++) {
        const fvk_layer *L = layers + l;
        rmsnorm(x, L->ln1, xn, M, H, eps);
        if (M <= MAXM && !L->q.kind && !L->k.kind && !L->v.kind && L->q.k == H &&
            L->k.k == H && L->v.k == H) {
            const fvk_lin *qkv[3] = {&L->q, &L->k, &L->v};
            float *out[3] = {q, kk, vv};
            f32_cat(xn, M, qkv, out, 3, nt);
        } else if ((rc = run_lin(&L->q, xn, q, M, nt)) || (rc = run_lin(&L->k, xn, kk, M, nt)) ||
                   (rc = run_lin(&L->v, xn, vv, M, nt))) {
            return rc;
        }
        for (int64_t m = 0; m < M; m++) {
            const int64_t r = (rope_table ? pos[m] : m) * hd; /* table row, or row m */
            rope(q + m * heads * hd, cs + r, sn + r, heads, hd);
            rope(kk + m * kvh * hd, cs + r, sn + r, kvh, hd);
            for (int64_t j = 0; j < kvh; j++) {
                int64_t off = (lo + m) * slot + j * max_len * hd + pos[m] * hd;
                memcpy(L->kc + off, kk + (m * kvh + j) * hd, hd * sizeof(float));
                memcpy(L->vc + off, vv + (m * kvh + j) * hd, hd * sizeof(float));
            }
        }
        int64_t pairs = M * heads, work = 0;
        for (int64_t m = 0; m < M; m++) work += (lim[m] + 1) * heads * hd;
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && work > 65536)
        for (int64_t p = 0; p < pairs; p++) {
            int64_t m = p / heads, h = p % heads, j = h / grp;
            int64_t base = (lo + m) * slot + j * max_len * hd;
            attend(q + p * hd, L->kc + base, L->vc + base, att + p * hd, sc + p * max_len,
                   lim[m] + 1, hd, scale);
        }
        if ((rc = run_lin(&L->o, att, t, M, nt))) return rc;
        for (int64_t i = 0; i < M * H; i++) x[i] += t[i];
        rmsnorm(x, L->ln2, xn, M, H, eps);
        if (M <= MAXM && !L->gate.kind && !L->up.kind && L->gate.n == inter &&
            L->up.n == inter && L->gate.k == H && L->up.k == H) {
            f32_gateup(xn, M, &L->gate, &L->up, gg, uu, nt);
        } else {
            if ((rc = run_lin(&L->gate, xn, gg, M, nt)) || (rc = run_lin(&L->up, xn, uu, M, nt)))
                return rc;
            silu_mul(gg, uu, M * inter);
        }
        if ((rc = run_lin(&L->down, gg, t, M, nt))) return rc;
        for (int64_t i = 0; i < M * H; i++) x[i] += t[i];
    }
    if (final_norm) { /* the model's final RMSNorm, in place (row by row: xn is scratch) */
        rmsnorm(x, final_norm, xn, M, H, eps);
        memcpy(x, xn, M * H * sizeof(float));
    }
    return 0;
}

int fvk_abi_version(void) { return 9; }

#else /* FVK_I4Q_BODY: the act_q int4 tiles, included twice from above */
/* G32: groups of 32 (two per chunk: scale vector [s_2c x4, s_2c+1 x4]); else G = 64 << gsh. */
/* Both int4 act_q tiles end alike: y = hsum(acc) + zb · Σx per group (the offset term, exact
 * fp32 sums of x) + bias, for the tile's NB output rows and MM input rows. */
INL void SFX(i4q_store)(__m256 acc[4][MAXM], const float *sx, const float *zb, const float *bias,
                        float *y, int64_t n, int64_t N, int64_t ng, const int MM, const int NB) {
#pragma GCC unroll 4
    for (int j = 0; j < NB; j++)
#pragma GCC unroll 8
        for (int m = 0; m < MM; m++) {
            float t = hsum(acc[j][m]) + dot_f32(zb + (n + j) * ng, sx + m * ng, ng);
            y[m * N + n + j] = t + (bias ? bias[n + j] : 0.0f);
        }
}

INL void SFX(i4q_tile)(const int8_t *xq, const float *dv, const float *sx, const uint8_t *w,
                  const float *scales, const float *zb, const float *bias, float *y, int64_t n,
                  int64_t K, int64_t N, int gsh, const int MM, const int NB, const int G32) {
    __m256 acc[4][MAXM];
#pragma GCC unroll 4
    for (int j = 0; j < NB; j++)
#pragma GCC unroll 8
        for (int m = 0; m < MM; m++) acc[j][m] = _mm256_setzero_ps();
    const int64_t nc = K / 64, K2 = K / 2, ng = G32 ? K / 32 : K >> (6 + gsh);
    const int ssh = G32 ? 0 : gsh; /* x block span = 1 << ssh chunks */
    const int64_t ns = nc >> ssh;
    const __m256i m4 = _mm256_set1_epi8(15);
    const __m256i pair = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    const uint8_t *wr = w + n * K2;
    for (int64_t c = 0; c < nc; c++) {
#pragma GCC unroll 4
        for (int j = 0; j < NB; j++) {
            __m256 sv;
            if (G32) {
                __m128 two = _mm_castpd_ps(_mm_load_sd((const double *)(scales + (n + j) * ng + 2 * c)));
                sv = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(two), pair);
            } else {
                sv = _mm256_broadcast_ss(scales + (n + j) * ng + (c >> gsh));
            }
            if (FVK_PF4 && (c & 1) == 0)
                _mm_prefetch((const char *)(wr + j * K2 + c * 32) + FVK_PF4, _MM_HINT_T0);
            __m256i b = _mm256_loadu_si256((const __m256i *)(wr + j * K2 + c * 32));
            __m256i lo = _mm256_and_si256(b, m4);
            __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);
#pragma GCC unroll 8
            for (int m = 0; m < MM; m++) {
                const int8_t *xc = xq + m * K + c * 64;
                __m256i d32 = DOT4(lo, hi, _mm256_load_si256((const __m256i *)xc),
                                   _mm256_load_si256((const __m256i *)(xc + 32)));
                __m256 f = _mm256_mul_ps(_mm256_load_ps(dv + (m * ns + (c >> ssh)) * 8), sv);
                acc[j][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d32), f, acc[j][m]);
            }
        }
    }
    SFX(i4q_store)(acc, sx, zb, bias, y, n, N, ng, MM, NB);
}

/* G >= 64, small MM * NB: a weight group is exactly one x block span, so the integer dot
 * products of a whole group accumulate in integer registers (AVX2: int16 lanes, at most
 * 4 chunks * 2 * 2 * 15 * 127 = 30480 < 32767; VNNI: int32) and are converted and scaled
 * (d_block * scale_group) once per group, not per chunk. */
INL void SFX(i4q_tile_ga)(const int8_t *xq, const float *dv, const float *sx, const uint8_t *w,
                     const float *scales, const float *zb, const float *bias, float *y,
                     int64_t n, int64_t K, int64_t N, int gsh, const int MM, const int NB) {
    __m256 acc[4][MAXM];
#pragma GCC unroll 4
    for (int j = 0; j < NB; j++)
#pragma GCC unroll 4
        for (int m = 0; m < MM; m++) acc[j][m] = _mm256_setzero_ps();
    const int64_t K2 = K / 2, ng = K >> (6 + gsh), cpg = 1 << gsh;
    const __m256i m4 = _mm256_set1_epi8(15);
    const uint8_t *wr = w + n * K2;
    for (int64_t g = 0; g < ng; g++) {
        __m256i ia[4][MAXM];
#pragma GCC unroll 4
        for (int j = 0; j < NB; j++)
#pragma GCC unroll 8
            for (int m = 0; m < MM; m++) ia[j][m] = _mm256_setzero_si256();
        for (int64_t c = g * cpg; c < (g + 1) * cpg; c++) {
#pragma GCC unroll 4
            for (int j = 0; j < NB; j++) {
                if (FVK_PF4 && (c & 1) == 0)
                    _mm_prefetch((const char *)(wr + j * K2 + c * 32) + FVK_PF4, _MM_HINT_T0);
                __m256i b = _mm256_loadu_si256((const __m256i *)(wr + j * K2 + c * 32));
                __m256i lo = _mm256_and_si256(b, m4);
                __m256i hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m4);
#pragma GCC unroll 4
                for (int m = 0; m < MM; m++) {
                    const int8_t *xc = xq + m * K + c * 64;
                    ia[j][m] = ACC4(ia[j][m], lo, hi, _mm256_load_si256((const __m256i *)xc),
                                    _mm256_load_si256((const __m256i *)(xc + 32)));
                }
            }
        }
#pragma GCC unroll 4
        for (int j = 0; j < NB; j++) {
            __m256 sv = _mm256_broadcast_ss(scales + (n + j) * ng + g);
#pragma GCC unroll 4
            for (int m = 0; m < MM; m++)
                acc[j][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(FIN4(ia[j][m])),
                                            _mm256_mul_ps(_mm256_load_ps(dv + (m * ng + g) * 8), sv),
                                            acc[j][m]);
        }
    }
    SFX(i4q_store)(acc, sx, zb, bias, y, n, N, ng, MM, NB);
}

#ifndef FVK_I4GA
#define FVK_I4GA 1
#endif
/* NB: rows per tile for the per-chunk-scale tile (G = 32, or MM > 4); NBG: rows per tile for
 * the per-group tile SFX(i4q_tile_ga) (0: not used for this MM). */
#define I4Q_CASE(MM, NB, NBG)                                                                 \
    case MM: {                                                                                \
        if (!g32 && NBG && FVK_I4GA) {                                                        \
            const int nbg = NBG ? NBG : 1;                                                    \
            int64_t nblk = N / nbg;                                                           \
            _Pragma("omp parallel for num_threads(nt) schedule(dynamic, 16) if(nt > 1)")      \
            for (int64_t b = 0; b < nblk; b++)                                                \
                SFX(i4q_tile_ga)(xq, dv, sx, w, scales, zb, bias, y, b * nbg, K, N, gsh, MM, nbg); \
            for (int64_t n = nblk * nbg; n < N; n++)                                          \
                SFX(i4q_tile_ga)(xq, dv, sx, w, scales, zb, bias, y, n, K, N, gsh, MM, 1);         \
            break;                                                                            \
        }                                                                                     \
        int64_t nblk = N / NB;                                                                \
        if (g32) {                                                                            \
            _Pragma("omp parallel for num_threads(nt) schedule(dynamic, 16) if(nt > 1)")      \
            for (int64_t b = 0; b < nblk; b++)                                                \
                SFX(i4q_tile)(xq, dv, sx, w, scales, zb, bias, y, b * NB, K, N, 0, MM, NB, 1);     \
            for (int64_t n = nblk * NB; n < N; n++)                                           \
                SFX(i4q_tile)(xq, dv, sx, w, scales, zb, bias, y, n, K, N, 0, MM, 1, 1);           \
        } else {                                                                              \
            _Pragma("omp parallel for num_threads(nt) schedule(dynamic, 16) if(nt > 1)")      \
            for (int64_t b = 0; b < nblk; b++)                                                \
                SFX(i4q_tile)(xq, dv, sx, w, scales, zb, bias, y, b * NB, K, N, gsh, MM, NB, 0);   \
            for (int64_t n = nblk * NB; n < N; n++)                                           \
                SFX(i4q_tile)(xq, dv, sx, w, scales, zb, bias, y, n, K, N, gsh, MM, 1, 0);         \
        }                                                                                     \
        break;                                                                                \
    }

static void SFX(i4q_block)(const int8_t *xq, const float *dv, const float *sx, const uint8_t *w,
                      const float *scales, const float *zb, const float *bias, float *y,
                      int64_t M, int64_t N, int64_t K, int64_t G, int nt) {
    const int g32 = G == 32;
    int gsh = 0;
    while ((64 << gsh) < G) gsh++;
    switch (M) {
        I4Q_CASE(1, 4, 4)
        I4Q_CASE(2, 4, 2)
        I4Q_CASE(3, 2, 1)
        I4Q_CASE(4, 2, 1)
        I4Q_CASE(5, 1, 0)
        I4Q_CASE(6, 1, 0)
        I4Q_CASE(7, 1, 0)
        I4Q_CASE(8, 1, 0)
    }
}

#endif
