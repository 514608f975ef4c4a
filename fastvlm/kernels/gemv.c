/* Decode GEMV / small-GEMM kernels for AVX2 + FMA CPUs (fastvlm/kernels/__init__.py).
 *
 * All compute y (M, N) fp32 = x (M, K) fp32 @ W^T (+ bias) for small M, reading each weight
 * element once per block of up to 8 rows of x: a tile of NB weight rows is streamed through
 * registers while MM x rows (L1/L2 resident) are multiplied against it.  OpenMP splits the
 * output rows statically, so each thread streams one contiguous slice of W (hardware prefetch
 * friendly).  Every pointer is contiguous row-major; the caller checks shapes and dtypes.
 *
 *   fp32: W float (N, K).
 *   int8: W int8 (N, K), scales float (N,):          y = scale[n] * sum_k q[n,k] x[m,k].
 *   int4: W uint8 (N, K/2), low nibble = even column; scales, zb float (N, K/G) with
 *         zb = zero - 8 * scale, so w = q * scale + zb (tinygemm's (q - 8) * scale + zero).
 *         The weight is dequantized in registers (one FMA per 8 weights, shared by all M rows);
 *         x is permuted once per call into the nibble order of a 32-column block.
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define INL static inline __attribute__((always_inline))
#define MAXM 8

INL float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* ------------------------------------------------------------------ fp32 */
INL void f32_tile(const float *x, const float *w, const float *bias, float *y, int64_t n,
                  int64_t K, int64_t N, const int MM, const int NB) {
    __m256 acc[4][MAXM];
#pragma GCC unroll 4
    for (int j = 0; j < NB; j++)
#pragma GCC unroll 8
        for (int m = 0; m < MM; m++) acc[j][m] = _mm256_setzero_ps();
    const float *wr = w + n * K;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        __m256 wv[4];
#pragma GCC unroll 4
        for (int j = 0; j < NB; j++) wv[j] = _mm256_loadu_ps(wr + j * K + k);
#pragma GCC unroll 8
        for (int m = 0; m < MM; m++) {
            __m256 xv = _mm256_loadu_ps(x + m * K + k);
#pragma GCC unroll 4
            for (int j = 0; j < NB; j++) acc[j][m] = _mm256_fmadd_ps(wv[j], xv, acc[j][m]);
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < NB; j++)
#pragma GCC unroll 8
        for (int m = 0; m < MM; m++) {
            float s = hsum(acc[j][m]);
            for (int64_t t = k; t < K; t++) s += wr[j * K + t] * x[m * K + t];
            y[m * N + n + j] = s + (bias ? bias[n + j] : 0.0f);
        }
}

#define F32_CASE(MM, NB)                                                                      \
    case MM: {                                                                                \
        int64_t nblk = N / NB;                                                                \
        _Pragma("omp parallel for num_threads(nt) schedule(dynamic, 16)")                          \
        for (int64_t b = 0; b < nblk; b++) f32_tile(x, w, bias, y, b * NB, K, N, MM, NB);   \
        for (int64_t n = nblk * NB; n < N; n++) f32_tile(x, w, bias, y, n, K, N, MM, 1);     \
        break;                                                                                \
    }

static void f32_block(const float *x, const float *w, const float *bias, float *y, int64_t M,
                      int64_t N, int64_t K, int nt) {
    switch (M) {
        F32_CASE(1, 4)
        F32_CASE(2, 4)
        F32_CASE(3, 2)
        F32_CASE(4, 2)
        F32_CASE(5, 1)
        F32_CASE(6, 1)
        F32_CASE(7, 1)
        F32_CASE(8, 1)
    }
}

/* y (M, N) = x (M, K) @ w (N, K)^T + bias; rows of x in blocks of 8. */
void fvk_linear_f32(const float *x, const float *w, const float *bias, float *y, int64_t M,
                    int64_t N, int64_t K, int nt) {
    for (int64_t m0 = 0; m0 < M; m0 += MAXM) {
        int64_t mm = M - m0 < MAXM ? M - m0 : MAXM;
        f32_block(x + m0 * K, w, bias, y + m0 * N, mm, N, K, nt);
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
            __m128i v = _mm_loadu_si128((const __m128i *)(wr + j * K + k));
            __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
            __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
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
        _Pragma("omp parallel for num_threads(nt) schedule(dynamic, 16)")                          \
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

void fvk_linear_i8(const float *x, const int8_t *w, const float *scales, const float *bias,
                   float *y, int64_t M, int64_t N, int64_t K, int nt) {
    for (int64_t m0 = 0; m0 < M; m0 += MAXM) {
        int64_t mm = M - m0 < MAXM ? M - m0 : MAXM;
        i8_block(x + m0 * K, w, scales, bias, y + m0 * N, mm, N, K, nt);
    }
}

/* ------------------------------------------------------------------ int4 */
/* Nibble order of one 32-column block (16 bytes): lo nibbles of bytes 0..7 are columns
 * 0,2,..,14; of bytes 8..15 columns 16,..,30; hi nibbles the odd columns.  xp holds x in that
 * order: [x0 x2 .. x14 | x16 .. x30 | x1 x3 .. x15 | x17 .. x31] per block. */
static void permute_x(const float *x, float *xp, int64_t M, int64_t K) {
    for (int64_t m = 0; m < M; m++)
        for (int64_t k0 = 0; k0 < K; k0 += 32) {
            const float *s = x + m * K + k0;
            float *d = xp + m * K + k0;
            for (int i = 0; i < 16; i++) {
                d[i] = s[2 * i];
                d[16 + i] = s[2 * i + 1];
            }
        }
}

INL void i4_tile(const float *xp, const uint8_t *w, const float *scales, const float *zb,
                 const float *bias, float *y, int64_t n, int64_t K, int64_t N, int64_t G,
                 const int MM, const int NB) {
    __m256 acc[4][MAXM];
#pragma GCC unroll 4
    for (int j = 0; j < NB; j++)
#pragma GCC unroll 8
        for (int m = 0; m < MM; m++) acc[j][m] = _mm256_setzero_ps();
    const int64_t ng = K / G, K2 = K / 2;
    const __m128i lomask = _mm_set1_epi8(0x0F);
    for (int64_t g = 0; g < ng; g++) {
        __m256 sv[4], zv[4];
#pragma GCC unroll 4
        for (int j = 0; j < NB; j++) {
            sv[j] = _mm256_broadcast_ss(scales + (n + j) * ng + g);
            zv[j] = _mm256_broadcast_ss(zb + (n + j) * ng + g);
        }
        for (int64_t k = g * G; k < (g + 1) * G; k += 32) {
#pragma GCC unroll 4
            for (int j = 0; j < NB; j++) {
                __m128i v = _mm_loadu_si128((const __m128i *)(w + (n + j) * K2 + k / 2));
                __m128i lo = _mm_and_si128(v, lomask);
                __m128i hi = _mm_and_si128(_mm_srli_epi16(v, 4), lomask);
                __m256 w0 = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), sv[j], zv[j]);
                __m256 w1 = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8))), sv[j], zv[j]);
                __m256 w2 = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), sv[j], zv[j]);
                __m256 w3 = _mm256_fmadd_ps(
                    _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8))), sv[j], zv[j]);
#pragma GCC unroll 8
                for (int m = 0; m < MM; m++) {
                    const float *xm = xp + m * K + k;
                    if (MM > 2) { /* enough independent accumulators: plain FMA chain */
                        __m256 a = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xm), acc[j][m]);
                        a = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xm + 8), a);
                        a = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), a);
                        acc[j][m] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), a);
                        continue;
                    }
                    __m256 a = _mm256_mul_ps(w0, _mm256_loadu_ps(xm));
                    __m256 b = _mm256_mul_ps(w1, _mm256_loadu_ps(xm + 8));
                    a = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xm + 16), a);
                    b = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xm + 24), b);
                    acc[j][m] = _mm256_add_ps(acc[j][m], _mm256_add_ps(a, b));
                }
            }
        }
    }
#pragma GCC unroll 4
    for (int j = 0; j < NB; j++)
#pragma GCC unroll 8
        for (int m = 0; m < MM; m++) y[m * N + n + j] = hsum(acc[j][m]) + (bias ? bias[n + j] : 0.0f);
}

#define I4_CASE(MM, NB)                                                                       \
    case MM: {                                                                                \
        int64_t nblk = N / NB;                                                                \
        _Pragma("omp parallel for num_threads(nt) schedule(dynamic, 16)")                          \
        for (int64_t b = 0; b < nblk; b++)                                                    \
            i4_tile(xp, w, scales, zb, bias, y, b * NB, K, N, G, MM, NB);                     \
        for (int64_t n = nblk * NB; n < N; n++)                                               \
            i4_tile(xp, w, scales, zb, bias, y, n, K, N, G, MM, 1);                           \
        break;                                                                                \
    }

static void i4_block(const float *xp, const uint8_t *w, const float *scales, const float *zb,
                     const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t G,
                     int nt) {
    switch (M) {
        I4_CASE(1, 4)
        I4_CASE(2, 4)
        I4_CASE(3, 2)
        I4_CASE(4, 2)
        I4_CASE(5, 1)
        I4_CASE(6, 1)
        I4_CASE(7, 1)
        I4_CASE(8, 1)
    }
}

/* Returns 0, or -1 when K is not a multiple of 32 and G, or -2 when out of memory. */
int fvk_linear_i4(const float *x, const uint8_t *w, const float *scales, const float *zb,
                  const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t G,
                  int nt) {
    if (K % 32 || G % 32 || K % G) return -1;
    int64_t mb = M < MAXM ? M : MAXM;
    float *xp = (float *)aligned_alloc(64, (size_t)(mb * K * sizeof(float) + 63) / 64 * 64);
    if (!xp) return -2;
    for (int64_t m0 = 0; m0 < M; m0 += MAXM) {
        int64_t mm = M - m0 < MAXM ? M - m0 : MAXM;
        permute_x(x + m0 * K, xp, mm, K);
        i4_block(xp, w, scales, zb, bias, y + m0 * N, mm, N, K, G, nt);
    }
    free(xp);
    return 0;
}

int fvk_abi_version(void) { return 1; }
