/* Products with 4-bit weights and 8-bit activations ("w4a8"): the arithmetic of llama.cpp's
 * Q4_1 x Q8_1 dot product, for a model's linear layers on the CPU.
 *
 * Weights: each output's inputs form groups of 32 with codes q in 0..15 and w = q * d + m, d and
 * m float16 per (output, group). Activations: each row's groups of 32 are scaled so that the
 * largest magnitude becomes 127 and rounded to nearest int8, a = rint(x * (127 / amax)), with
 * s = amax / 127. An output is, over its groups in order, two fused multiply-adds a group:
 *     y = fma(isum, d * s, y);  y = fma(m, s * sum(a), y)
 * where isum = sum(q * a) is an exact integer. Nothing depends on the other rows, the thread
 * split or the code path (AVX-512 VNNI, AVX2, portable), so a row's result is the same at every
 * width, bit for bit, which keeps the speculative modes lossless.
 *
 * Layout (model/quantize.py packs it): outputs in tiles of 16. For each group a tile has four
 * 64-byte chunks; chunk c holds, in bytes 4j..4j+3, output j's codes of the group's inputs
 * 8c..8c+3 in the low nibbles and 8c+4..8c+7 in the high ones: the VNNI layout, four consecutive
 * inputs per 32-bit lane. d and m: per tile, per group, 16 float16 values.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_kernels.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define W4A8_AVX2 1
#else
#define W4A8_AVX2 0
#endif
#if W4A8_AVX2 && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define W4A8_VNNI 1
#else
#define W4A8_VNNI 0
#endif

#define GROUP 32
#define TILE 16
#ifndef ROW_BLOCK
#define ROW_BLOCK 4  /* rows a tile's codes are unpacked for at once (at most 8) */
#endif
#define CHUNK 64  /* bytes of one tile's codes for 8 inputs */
#ifndef PREFETCH
#define PREFETCH 16  /* groups ahead: 4 KB of codes */
#endif

static inline float half_to_float(uint16_t h) {
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 0x1Fu, mantissa = h & 0x3FFu;
    union { uint32_t u; float f; } v;
    if (exponent == 0) {  /* zero or subnormal: mantissa * 2^-24, exact in float32 */
        const float f = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    v.u = sign | (exponent == 31 ? 0x7F800000u : (exponent + 112) << 23) | mantissa << 13;
    return v.f;
}

/* one group of 32 activations -> int8 codes, their scale s and s * sum(codes) */
static void quantize_group(const void *x, int64_t at, int dtype, int8_t *codes, float *scale, float *scaled_sum) {
    float v[GROUP], amax = 0.0f;
    for (int i = 0; i < GROUP; i++) {
        v[i] = load(x, at + i, dtype);
        amax = fmaxf(amax, fabsf(v[i]));
    }
    const float inverse = amax > 0.0f ? 127.0f / amax : 0.0f;
    int32_t sum = 0;
    for (int i = 0; i < GROUP; i++) {
        int32_t c = (int32_t)lrintf(v[i] * inverse);  /* to nearest even, as cvtps2dq rounds */
        c = c > 127 ? 127 : c < -127 ? -127 : c;
        codes[i] = (int8_t)c;
        sum += c;
    }
    *scale = amax / 127.0f;
    *scaled_sum = *scale * (float)sum;
}

/* A tile's 16 outputs for `rows` (1..ROW_BLOCK) rows of quantized activations -> y (rows, 16).
 * a: the rows' codes, `in` apart; s, ss: their scales and scaled sums, `groups` apart. */
static inline __attribute__((always_inline)) void tile_portable(
        const uint8_t *codes, const uint16_t *d, const uint16_t *m, int64_t groups, int64_t in,
        const int8_t *a, const float *s, const float *ss, int rows, float *y) {
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < TILE; j++) {
            float acc = 0.0f;
            for (int64_t g = 0; g < groups; g++) {
                const uint8_t *chunks = codes + g * 4 * CHUNK + 4 * j;
                const int8_t *ag = a + r * in + g * GROUP;
                int32_t isum = 0;
                for (int c = 0; c < 4; c++)
                    for (int i = 0; i < 4; i++) {
                        const uint8_t byte = chunks[c * CHUNK + i];
                        isum += (byte & 0x0F) * ag[8 * c + i] + (byte >> 4) * ag[8 * c + 4 + i];
                    }
                const float dg = half_to_float(d[g * TILE + j]), mg = half_to_float(m[g * TILE + j]);
                acc = fmaf((float)isum, dg * s[r * groups + g], acc);
                acc = fmaf(mg, ss[r * groups + g], acc);
            }
            y[r * TILE + j] = acc;
        }
}

#if W4A8_VNNI
static inline __attribute__((always_inline)) void tile_vnni(
        const uint8_t *codes, const uint16_t *d, const uint16_t *m, int64_t groups, int64_t in,
        const int8_t *a, const float *s, const float *ss, int rows, float *y) {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    __m512 acc[8];
    for (int r = 0; r < rows; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        if (PREFETCH) {  /* codes run on into the next tile */
            for (int c = 0; c < 4; c++) _mm_prefetch((const char *)(codes + ((g + PREFETCH) * 4 + c) * CHUNK), _MM_HINT_T0);
            _mm_prefetch((const char *)(d + (g + PREFETCH) * TILE), _MM_HINT_T0);
            _mm_prefetch((const char *)(m + (g + PREFETCH) * TILE), _MM_HINT_T0);
        }
        const __m512 dg = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d + g * TILE)));
        const __m512 mg = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(m + g * TILE)));
        __m512i w[8];  /* w[i]: each output's codes of inputs 4i..4i+3 */
        for (int c = 0; c < 4; c++) {
            const __m512i bytes = _mm512_loadu_si512(codes + (g * 4 + c) * CHUNK);
            w[2 * c] = _mm512_and_si512(bytes, nibble);
            w[2 * c + 1] = _mm512_and_si512(_mm512_srli_epi16(bytes, 4), nibble);
        }
        for (int r = 0; r < rows; r++) {
            const int32_t *quads = (const int32_t *)(a + r * in + g * GROUP);
            __m512i isum = _mm512_setzero_si512();
            for (int i = 0; i < 8; i++) isum = _mm512_dpbusd_epi32(isum, w[i], _mm512_set1_epi32(quads[i]));
            const __m512 ds = _mm512_mul_ps(dg, _mm512_set1_ps(s[r * groups + g]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), ds, acc[r]);
            acc[r] = _mm512_fmadd_ps(mg, _mm512_set1_ps(ss[r * groups + g]), acc[r]);
        }
    }
    for (int r = 0; r < rows; r++) _mm512_storeu_ps(y + r * TILE, acc[r]);
}
#endif

#if W4A8_AVX2
/* maddubs sums code * activation pairs in 16 bits (at most 2 * 15 * 127 in magnitude, eight
 * of them 30480 < 32767: no saturation), madd then sums the pairs' pairs to 32 bits */
static inline __attribute__((always_inline)) void tile_avx2(
        const uint8_t *codes, const uint16_t *d, const uint16_t *m, int64_t groups, int64_t in,
        const int8_t *a, const float *s, const float *ss, int rows, float *y) {
    const __m256i nibble = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int half = 0; half < 2; half++) {  /* outputs 8 * half .. 8 * half + 7 */
        __m256 acc[8];
        for (int r = 0; r < rows; r++) acc[r] = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; g++) {
            const __m256 dg = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d + g * TILE + 8 * half)));
            const __m256 mg = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(m + g * TILE + 8 * half)));
            __m256i w[8];
            for (int c = 0; c < 4; c++) {
                const __m256i bytes = _mm256_loadu_si256((const __m256i *)(codes + (g * 4 + c) * CHUNK + 32 * half));
                w[2 * c] = _mm256_and_si256(bytes, nibble);
                w[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
            }
            for (int r = 0; r < rows; r++) {
                const int32_t *quads = (const int32_t *)(a + r * in + g * GROUP);
                __m256i pairs = _mm256_setzero_si256();
                for (int i = 0; i < 8; i++)
                    pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(w[i], _mm256_set1_epi32(quads[i])));
                const __m256i isum = _mm256_madd_epi16(pairs, ones);
                const __m256 ds = _mm256_mul_ps(dg, _mm256_set1_ps(s[r * groups + g]));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), ds, acc[r]);
                acc[r] = _mm256_fmadd_ps(mg, _mm256_set1_ps(ss[r * groups + g]), acc[r]);
            }
        }
        for (int r = 0; r < rows; r++) _mm256_storeu_ps(y + r * TILE + 8 * half, acc[r]);
    }
}
#endif

static inline __attribute__((always_inline)) void tile(
        const uint8_t *codes, const uint16_t *d, const uint16_t *m, int64_t groups, int64_t in,
        const int8_t *a, const float *s, const float *ss, int rows, float *y) {
#if W4A8_VNNI
    tile_vnni(codes, d, m, groups, in, a, s, ss, rows, y);
#elif W4A8_AVX2
    tile_avx2(codes, d, m, groups, in, a, s, ss, rows, y);
#else
    tile_portable(codes, d, m, groups, in, a, s, ss, rows, y);
#endif
}

/* which code path this build runs: 2 AVX-512 VNNI, 1 AVX2, 0 portable */
int bd_w4a8_path(void) { return W4A8_VNNI ? 2 : W4A8_AVX2; }

/* x: (rows, in) bf16 or float32 -> out: (rows, outs) in the same dtype; in a multiple of 32,
 * outs of 16; codes, d, m: the packed weight described at the top */
void bd_w4a8_linear(const void *x, const uint8_t *codes, const uint16_t *d, const uint16_t *m, void *out,
                    int64_t rows, int64_t in, int64_t outs, int dtype) {
    const int64_t groups = in / GROUP, tiles = outs / TILE;
    int8_t *a = malloc(rows * in);
    float *s = malloc(rows * groups * sizeof(float)), *ss = malloc(rows * groups * sizeof(float));
    const int parallel = tiles > 1 && rows * in * outs >= (1 << 16);
#pragma omp parallel if (parallel)
    {
#pragma omp for schedule(static)
        for (int64_t k = 0; k < rows * groups; k++) quantize_group(x, k * GROUP, dtype, a + k * GROUP, s + k, ss + k);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tiles; t++) {
            const uint8_t *tile_codes = codes + t * groups * 4 * CHUNK;
            const uint16_t *tile_d = d + t * groups * TILE, *tile_m = m + t * groups * TILE;
            for (int64_t first = 0; first < rows; first += ROW_BLOCK) {
                const int n = rows - first < ROW_BLOCK ? (int)(rows - first) : ROW_BLOCK;
                const int8_t *ra = a + first * in;
                const float *rs = s + first * groups, *rss = ss + first * groups;
                float y[ROW_BLOCK * TILE];
#define ROWS(k) case k: tile(tile_codes, tile_d, tile_m, groups, in, ra, rs, rss, k, y); break;
                switch (n) {  /* a constant row count per call, so the accumulators stay in registers */
                    ROWS(1) ROWS(2) ROWS(3) ROWS(4) ROWS(5) ROWS(6) ROWS(7) ROWS(8)
                }
#undef ROWS
                for (int r = 0; r < n; r++)
                    for (int j = 0; j < TILE; j++) store(out, (first + r) * outs + t * TILE + j, y[r * TILE + j], dtype);
            }
        }
    }
    free(a); free(s); free(ss);
}
