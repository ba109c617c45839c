/* Fused CPU kernels for inference forwards: RMSNorm, SwiGLU's activation, RoPE with the KV-cache
 * write, attention.
 *
 * Contract (model/cpu_kernels.py builds and calls these): every output row is computed by
 * the same sequence of float operations whatever the number of rows, the batch, the span of
 * the cache or the thread that computes it. Reductions accumulate in sixteen lanes in a fixed
 * order, masked keys are skipped (not added as zeros), and the library is built
 * with -ffp-contract=off so that only the explicit fmaf calls fuse. A row computed in a
 * 33-token verify pass is therefore bit for bit the row a one-token step computes, which is
 * what keeps the speculative modes lossless (SPEC section 3).
 *
 * Tensors are bf16 (dtype 1, stored as uint16) or float32 (dtype 0); all arithmetic is float32.
 * bf16 results are rounded to nearest even, as PyTorch rounds. bf16 attention on a CPU with AMX
 * runs its products on the tile unit (cpu_bf16.c), under the same contract.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

/* n elements of an array from `offset` on, widened to float32 */
static void load_row(const void *p, int64_t offset, int64_t n, int dtype, float *out) {
    if (dtype) {
        const uint16_t *h = (const uint16_t *)p + offset;
        for (int64_t j = 0; j < n; j++) out[j] = bf16_to_float(h[j]);
    } else {
        memcpy(out, (const float *)p + offset, n * sizeof(float));
    }
}

/* exp(x) to about 2 ulp: Cody-Waite reduction by ln 2 and a polynomial (Cephes' expf), 0 below
 * -87 and infinity above 88; elementwise arithmetic only, so vector and scalar code agree */
static inline float exp_approx(float x) {
    if (x < -87.0f) return 0.0f;
    if (x > 88.0f) return INFINITY;
    float n = floorf(fmaf(x, 1.44269504088896341f, 0.5f));
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r) + 1.0f;
    union { uint32_t u; float f; } scale = { (uint32_t)((int32_t)n + 127) << 23 };
    return p * scale.f;
}

#if defined(__AVX2__) && defined(__FMA__)
#define SIMD 1
/* eight elements from i on, widened to float32 */
static inline __m256 load8(const void *p, int64_t i, int dtype) {
    if (dtype) {
        __m128i half = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(half), 16));
    }
    return _mm256_loadu_ps((const float *)p + i);
}

/* float_to_bf16 on eight lanes: round to nearest even (NaN excepted), as 32-bit patterns */
static inline __m256i bf16_bits8(__m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i bits = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(bits, _mm256_set1_epi32(0x7FC0), nan);
}

/* x rounded to bf16, kept as float32 */
static inline __m256 round8_bf16(__m256 x) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(x), 16));
}

/* eight elements stored from i on in the dtype */
static inline void store8(void *p, int64_t i, __m256 x, int dtype) {
    if (!dtype) {
        _mm256_storeu_ps((float *)p + i, x);
        return;
    }
    const __m256i bits = bf16_bits8(x);  /* each 32-bit lane holds a 16-bit result */
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
    _mm_storeu_si128((__m128i *)((uint16_t *)p + i), packed);
}

/* the sixteen lanes of `dot` summed in its tree: l + l+8, then l + l+4, l + l+2, l + l+1 */
static inline float tree_sum(__m256 even, __m256 odd) {
    __m256 eight = _mm256_add_ps(even, odd);
    __m128 four = _mm_add_ps(_mm256_castps256_ps128(eight), _mm256_extractf128_ps(eight, 1));
    __m128 two = _mm_add_ps(four, _mm_movehl_ps(four, four));
    return _mm_cvtss_f32(_mm_add_ss(two, _mm_shuffle_ps(two, two, 1)));
}

/* exp_approx on eight lanes, operation for operation */
static inline __m256 exp8(__m256 x) {
    const __m256 underflow = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
    const __m256 overflow = _mm256_cmp_ps(x, _mm256_set1_ps(88.0f), _CMP_GT_OQ);
    x = _mm256_min_ps(_mm256_set1_ps(88.0f), x);  /* a NaN x stays NaN (min returns its second operand), as in exp_approx */
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fmadd_ps(n, _mm256_set1_ps(-0.693359375f), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    const __m256 y = _mm256_andnot_ps(underflow, _mm256_mul_ps(p, _mm256_castsi256_ps(bits)));
    return _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY), overflow);
}
#else
#define SIMD 0
#endif
#if SIMD && defined(__AVX512F__)
#define SIMD512 1
/* exp_approx on sixteen lanes, operation for operation (exp8's twin) */
static inline __m512 exp16(__m512 x) {
    const __mmask16 underflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
    const __mmask16 overflow = _mm512_cmp_ps_mask(x, _mm512_set1_ps(88.0f), _CMP_GT_OQ);
    x = _mm512_min_ps(_mm512_set1_ps(88.0f), x);  /* a NaN x stays NaN */
    __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fmadd_ps(n, _mm512_set1_ps(-0.693359375f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
    const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    const __m512 y = _mm512_maskz_mov_ps(~underflow, _mm512_mul_ps(p, _mm512_castsi512_ps(bits)));
    return _mm512_mask_mov_ps(y, overflow, _mm512_set1_ps(INFINITY));
}
#else
#define SIMD512 0
#endif

/* whether this build has the vector code (AVX2 and FMA): without it, fmaf is a library call and
 * the portable loops run several times slower than PyTorch's own ops */
int bd_vectorized(void) { return SIMD; }

/* sum of a[j] * b[j] in sixteen lanes (lane j % 16), then the lanes in a fixed tree: one order
 * for every call, the vector code's and the portable code's alike */
static inline float dot(const float *a, const float *b, int64_t n) {
#if SIMD
    if (n % 16 == 0) {
        __m256 even = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
        for (int64_t j = 0; j < n; j += 16) {
            even = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), even);
            odd = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), odd);
        }
        return tree_sum(even, odd);
    }
#endif
    float lanes[16] = {0};
    int64_t j = 0;
    for (; j + 16 <= n; j += 16)
        for (int l = 0; l < 16; l++) lanes[l] = fmaf(a[j + l], b[j + l], lanes[l]);
    for (int l = 0; j < n; j++, l++) lanes[l] = fmaf(a[j], b[j], lanes[l]);
    for (int width = 8; width > 0; width /= 2)
        for (int l = 0; l < width; l++) lanes[l] += lanes[l + width];
    return lanes[0];
}

/* out[r] = RMSNorm(x[r]) * weight for `rows` rows of `dim` values. float32: x * rsqrt(mean(x^2)
 * + eps) * weight; bf16: the normalised row rounded to bf16, then scaled by the bf16 weight and
 * rounded (the reference models' order). */
void bd_rms_norm(const void *x, const void *weight, void *out, int64_t rows, int64_t dim, float eps, int dtype) {
#pragma omp parallel if (rows >= 4)
    {
        float *row = malloc(dim * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; r++) {
            load_row(x, r * dim, dim, dtype, row);
            float inv = 1.0f / sqrtf(dot(row, row, dim) / (float)dim + eps);
            int64_t j = 0;
#if SIMD
            for (; j + 8 <= dim; j += 8) {
                const __m256 normed = _mm256_mul_ps(_mm256_loadu_ps(row + j), _mm256_set1_ps(inv));
                __m256 y = _mm256_mul_ps(dtype ? round8_bf16(normed) : normed, load8(weight, j, dtype));
                store8(out, r * dim + j, y, dtype);
            }
#endif
            for (; j < dim; j++) {
                float w = load(weight, j, dtype);
                float y = dtype ? rounded(row[j] * inv, 1) * w : row[j] * inv * w;
                store(out, r * dim + j, y, dtype);
            }
        }
        free(row);
    }
}

/* out[r] = silu(gate) * up for rows of [gate | up] pairs of `dim` values each (a fused gate/up
 * product's output): silu(x) = x / (1 + exp(-x)), rounded to the dtype before the product, as
 * PyTorch's silu and mul round. */
void bd_silu_mul(const void *gate_up, void *out, int64_t rows, int64_t dim, int dtype) {
#pragma omp parallel for schedule(static) if (rows >= 4)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t in = r * 2 * dim;
        int64_t j = 0;
#if SIMD512
        for (; j + 16 <= dim; j += 16) {
            const __m512 g = load16(gate_up, in + j, dtype), u = load16(gate_up, in + dim + j, dtype);
            __m512 silu = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
            if (dtype) silu = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16_bits16(silu)), 16));
            store16(out, r * dim + j, _mm512_mul_ps(silu, u), dtype);
        }
#endif
#if SIMD
        for (; j + 8 <= dim; j += 8) {
            const __m256 g = load8(gate_up, in + j, dtype), u = load8(gate_up, in + dim + j, dtype);
            __m256 silu = _mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
            if (dtype) silu = round8_bf16(silu);
            store8(out, r * dim + j, _mm256_mul_ps(silu, u), dtype);
        }
#endif
        for (; j < dim; j++) {
            const float g = load(gate_up, in + j, dtype), u = load(gate_up, in + dim + j, dtype);
            store(out, r * dim + j, rounded(g / (1.0f + exp_approx(-g)), dtype) * u, dtype);
        }
    }
}

/* Rotary embedding of the query and key heads of a fused q/k/v product, and the cache write.
 * qkv: (B*T, (H + 2*Hkv) * D) with query heads, key heads, value heads in that order; cos and
 * sin: (B*T, D) in the model dtype (sin sign-folded, model/rope.py); q_out: (B*T, H*D). Token t
 * of row b goes to cache slot starts[b] + t of k_cache / v_cache, whose row b, head h, slot s
 * starts at b * batch_stride + h * head_stride + s * D. Each product is rounded as PyTorch's
 * x * cos + roll(x, D/2) * sin rounds it. */
void bd_rope_store(const void *qkv, const void *cos, const void *sin, void *q_out, void *k_cache, void *v_cache,
                   const int64_t *starts, int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t D,
                   int64_t batch_stride, int64_t head_stride, int dtype) {
    int64_t width = (H + 2 * Hkv) * D, half = D / 2;
#pragma omp parallel for schedule(static) if (B * T >= 4)
    for (int64_t token = 0; token < B * T; token++) {
        const int64_t b = token / T, t = token % T, slot = starts[b] + t;
        for (int64_t h = 0; h < H + 2 * Hkv; h++) {
            const int64_t in = token * width + h * D;
            void *dst;
            int64_t at;
            if (h < H) { dst = q_out; at = token * H * D + h * D; }
            else if (h < H + Hkv) { dst = k_cache; at = b * batch_stride + (h - H) * head_stride + slot * D; }
            else { dst = v_cache; at = b * batch_stride + (h - H - Hkv) * head_stride + slot * D; }
            if (h >= H + Hkv) {  /* values: copied */
                if (dtype) memcpy((uint16_t *)dst + at, (const uint16_t *)qkv + in, D * sizeof(uint16_t));
                else memcpy((float *)dst + at, (const float *)qkv + in, D * sizeof(float));
                continue;
            }
            int64_t d = 0;
#if SIMD
            if (half % 8 == 0)
                for (; d < D; d += 8) {
                    const __m256 x = load8(qkv, in + d, dtype), turned = load8(qkv, in + (d + half) % D, dtype);
                    __m256 straight = _mm256_mul_ps(x, load8(cos, token * D + d, dtype));
                    __m256 rotated = _mm256_mul_ps(turned, load8(sin, token * D + d, dtype));
                    if (dtype) straight = round8_bf16(straight), rotated = round8_bf16(rotated);
                    store8(dst, at + d, _mm256_add_ps(straight, rotated), dtype);
                }
#endif
            for (; d < D; d++) {
                float x = load(qkv, in + d, dtype), turned = load(qkv, in + (d + half) % D, dtype);
                float y = rounded(x * load(cos, token * D + d, dtype), dtype)
                        + rounded(turned * load(sin, token * D + d, dtype), dtype);
                store(dst, at + d, y, dtype);
            }
        }
    }
}

/* row[0..n) -> exp(row - max(row)), in place; returns their sum, in eight lanes, then a tree */
float bd_shifted_exp(float *row, int64_t n) {
    float top = -INFINITY, lanes[8] = {0};
    int64_t j = 0;
#if SIMD
    __m256 most = _mm256_set1_ps(-INFINITY);
    for (; j + 8 <= n; j += 8) most = _mm256_max_ps(most, _mm256_loadu_ps(row + j));
    _mm256_storeu_ps(lanes, most);
    for (int l = 0; l < 8; l++) top = lanes[l] > top ? lanes[l] : top;
#endif
    for (; j < n; j++) top = row[j] > top ? row[j] : top;  /* a maximum is the same in any order */
    memset(lanes, 0, sizeof lanes);
    j = 0;
#if SIMD
    __m256 sum = _mm256_setzero_ps();
#if SIMD512
    for (; j + 16 <= n; j += 16) {  /* elements j..j+7, then j+8..j+15, into the eight lanes */
        const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(row + j), _mm512_set1_ps(top)));
        _mm512_storeu_ps(row + j, e);
        sum = _mm256_add_ps(sum, _mm512_castps512_ps256(e));
        sum = _mm256_add_ps(sum, _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(e), 1)));
    }
#endif
    for (; j + 8 <= n; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), _mm256_set1_ps(top)));
        _mm256_storeu_ps(row + j, e);
        sum = _mm256_add_ps(sum, e);
    }
    _mm256_storeu_ps(lanes, sum);
#else
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) lanes[l] += row[j + l] = exp_approx(row[j + l] - top);
#endif
    for (int l = 0; j < n; j++, l++) lanes[l] += row[j] = exp_approx(row[j] - top);
    for (int width = 4; width > 0; width /= 2)
        for (int l = 0; l < width; l++) lanes[l] += lanes[l + width];
    return lanes[0];
}

/* row[0..n) -> softmax(row), in place */
static void softmax(float *row, int64_t n) {
    const float sum = bd_shifted_exp(row, n);
    for (int64_t j = 0; j < n; j++) row[j] /= sum;
}

/* scores[i * n + j] = scale * (query i . keys[at[j]]) for G queries that see the same keys,
 * each dot as `dot` sums it; a key is read once for all G queries */
static void group_scores(const float *queries, const float *keys, const int64_t *at, int64_t n, int64_t G,
                         int64_t D, float scale, float *scores) {
#if SIMD512
    if (D % 16 == 0 && G <= 8) {
        for (int64_t j = 0; j < n; j++) {
            const float *key = keys + at[j] * D;
            __m512 acc[8];
            for (int64_t i = 0; i < G; i++) acc[i] = _mm512_setzero_ps();
            for (int64_t d = 0; d < D; d += 16) {
                const __m512 k = _mm512_loadu_ps(key + d);
                for (int64_t i = 0; i < G; i++) acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(queries + i * D + d), k, acc[i]);
            }
            for (int64_t i = 0; i < G; i++)  /* lanes 0-7 and 8-15: dot's even and odd halves */
                scores[i * n + j] = tree_sum(_mm512_castps512_ps256(acc[i]),
                                             _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[i]), 1))) * scale;
        }
        return;
    }
#endif
    for (int64_t j = 0; j < n; j++)
        for (int64_t i = 0; i < G; i++) scores[i * n + j] = dot(queries + i * D, keys + at[j] * D, D) * scale;
}

/* acc[i * D + d] = sum over j of probs[i * n + j] * values[at[j]][d] for G queries that see the
 * same keys: one fused multiply-add per key in key order; a value is read once for all G */
static void group_values(const float *probs, const float *values, const int64_t *at, int64_t n, int64_t G,
                         int64_t D, float *acc) {
#if SIMD512
    if (D % 64 == 0 && G <= 4) {  /* G * 4 accumulators in registers */
        for (int64_t d = 0; d < D; d += 64) {
            __m512 a[4][4];
            for (int64_t i = 0; i < G; i++)
                for (int k = 0; k < 4; k++) a[i][k] = _mm512_setzero_ps();
            for (int64_t j = 0; j < n; j++) {
                const float *value = values + at[j] * D + d;
                const __m512 v0 = _mm512_loadu_ps(value), v1 = _mm512_loadu_ps(value + 16);
                const __m512 v2 = _mm512_loadu_ps(value + 32), v3 = _mm512_loadu_ps(value + 48);
                for (int64_t i = 0; i < G; i++) {
                    const __m512 p = _mm512_set1_ps(probs[i * n + j]);
                    a[i][0] = _mm512_fmadd_ps(p, v0, a[i][0]);
                    a[i][1] = _mm512_fmadd_ps(p, v1, a[i][1]);
                    a[i][2] = _mm512_fmadd_ps(p, v2, a[i][2]);
                    a[i][3] = _mm512_fmadd_ps(p, v3, a[i][3]);
                }
            }
            for (int64_t i = 0; i < G; i++)
                for (int k = 0; k < 4; k++) _mm512_storeu_ps(acc + i * D + d + 16 * k, a[i][k]);
        }
        return;
    }
#endif
#if SIMD
    if (D % 64 == 0) {  /* eight independent accumulators: the multiply-adds overlap */
        for (int64_t i = 0; i < G; i++)
            for (int64_t d = 0; d < D; d += 64) {
                __m256 a[8];
                for (int k = 0; k < 8; k++) a[k] = _mm256_setzero_ps();
                for (int64_t j = 0; j < n; j++) {
                    const __m256 p = _mm256_set1_ps(probs[i * n + j]);
                    const float *value = values + at[j] * D + d;
                    for (int k = 0; k < 8; k++) a[k] = _mm256_fmadd_ps(p, _mm256_loadu_ps(value + 8 * k), a[k]);
                }
                for (int k = 0; k < 8; k++) _mm256_storeu_ps(acc + i * D + d + 8 * k, a[k]);
            }
        return;
    }
#endif
    memset(acc, 0, G * D * sizeof(float));
    for (int64_t i = 0; i < G; i++)
        for (int64_t j = 0; j < n; j++)
            for (int64_t d = 0; d < D; d++) acc[i * D + d] = fmaf(probs[i * n + j], values[at[j] * D + d], acc[i * D + d]);
}

int bd_bf16_amx(void);
void bd_bf16_tile_attention(const uint16_t *queries, int64_t rows, const int64_t *seen, const uint16_t *k_head,
                            const uint16_t *v_head, const int64_t *slots, int64_t keys, int64_t D, float scale,
                            float *out);

/* One work item on the tile unit (cpu_bf16.c): the tile's queries together where each sees a
 * prefix of the keys any of them sees (causal and block patterns), else each query alone over
 * its own keys, so that a query's result is a function of its own keys either way. */
static void tile_item(const uint16_t *q, const uint16_t *k_head, const uint16_t *v_head, uint16_t *out,
                      const int64_t *slots, const int64_t *at, const int64_t *seen, int64_t count, int64_t union_size,
                      int64_t span, int64_t G, int64_t D, int64_t query_stride, float scale) {
    int together = 1;
    for (int64_t t = 0; t < count; t++) together &= !seen[t] || at[t * span + seen[t] - 1] == seen[t] - 1;
    const int64_t step = together ? count : 1, rows = step * G;  /* queries, query heads a call */
    uint16_t *queries = malloc(rows * D * sizeof(uint16_t));
    int64_t *row_seen = malloc(rows * sizeof(int64_t)), *own = malloc(span * sizeof(int64_t));
    float *acc = malloc(rows * D * sizeof(float));
    for (int64_t t = 0; t < count; t += step) {
        for (int64_t i = 0; i < step; i++) {
            memcpy(queries + i * G * D, q + (t + i) * query_stride, G * D * sizeof(uint16_t));
            for (int64_t h = 0; h < G; h++) row_seen[i * G + h] = seen[t + i];
        }
        if (together) {
            bd_bf16_tile_attention(queries, rows, row_seen, k_head, v_head, slots, union_size, D, scale, acc);
        } else {
            for (int64_t m = 0; m < seen[t]; m++) own[m] = slots[at[t * span + m]];
            bd_bf16_tile_attention(queries, rows, row_seen, k_head, v_head, own, seen[t], D, scale, acc);
        }
        for (int64_t i = 0; i < step; i++)
            for (int64_t j = 0; j < G * D; j++) store(out + (t + i) * query_stride, j, acc[i * G * D + j], 1);
    }
    free(queries); free(row_seen); free(own); free(acc);
}

/* Attention of T new queries per row over a span of cached keys, grouped as HF's repeat_kv
 * groups them (query head h reads key head h / (H / Hkv)).
 * q: (B, T, H, D); k_cache, v_cache: as in bd_rope_store; visible: (B, T, span) bytes, nonzero
 * where a query sees a key, or NULL when every query sees all `span` keys; out: (B, T, H*D).
 * A query that sees no key gets zeros.
 * Work items are a row, a key head and up to QUERY_TILE consecutive queries: the keys and
 * values any of them sees are widened to float32 once, then each query's G heads go through
 * its own keys in slot order, as they would alone. In bf16 on a CPU with AMX (head size a
 * multiple of 32) the item's products run on the tile unit instead (tile_item). */
#define QUERY_TILE 16
void bd_attention(const void *q, const void *k_cache, const void *v_cache, const uint8_t *visible, void *out,
                  int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t D, int64_t span,
                  int64_t batch_stride, int64_t head_stride, float scale, int dtype) {
    const int64_t G = H / Hkv, tiles = (T + QUERY_TILE - 1) / QUERY_TILE, items = B * Hkv * tiles;
    const int parallel = items > 1 && items * span * G * D >= 32768;
    const int on_tiles = dtype == 1 && D % 32 == 0 && bd_bf16_amx();
#pragma omp parallel if (parallel)
    {
        /* the float32 copies the vector code reads; the tile unit packs its own */
        float *keys = on_tiles ? NULL : malloc(span * D * sizeof(float));
        float *values = on_tiles ? NULL : malloc(span * D * sizeof(float));
        float *scores = on_tiles ? NULL : malloc(G * span * sizeof(float));
        float *queries = on_tiles ? NULL : malloc(G * D * sizeof(float)), *acc = on_tiles ? NULL : malloc(G * D * sizeof(float));
        int64_t *slots = malloc(span * sizeof(int64_t)), *at = malloc(QUERY_TILE * span * sizeof(int64_t));
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; item++) {
            const int64_t b = item / (Hkv * tiles), g = item / tiles % Hkv, first = item % tiles * QUERY_TILE;
            const int64_t count = T - first < QUERY_TILE ? T - first : QUERY_TILE;
            const uint8_t *mask = visible ? visible + (b * T + first) * span : NULL;
            /* the keys any query of the tile sees, and each query's own, as places among them */
            int64_t union_size = 0, seen[QUERY_TILE] = {0};
            for (int64_t s = 0; s < span; s++) {
                int any = 0;
                for (int64_t t = 0; t < count; t++) any |= !mask || mask[t * span + s];
                if (!any) continue;
                for (int64_t t = 0; t < count; t++)
                    if (!mask || mask[t * span + s]) at[t * span + seen[t]++] = union_size;
                slots[union_size++] = s;
            }
            const int64_t cache_at = b * batch_stride + g * head_stride;
            if (on_tiles) {
                const int64_t heads = ((b * T + first) * H + g * G) * D;
                tile_item((const uint16_t *)q + heads, (const uint16_t *)k_cache + cache_at,
                          (const uint16_t *)v_cache + cache_at, (uint16_t *)out + heads, slots, at, seen, count,
                          union_size, span, G, D, H * D, scale);
                continue;
            }
            for (int64_t j = 0; j < union_size; j++) {
                load_row(k_cache, cache_at + slots[j] * D, D, dtype, keys + j * D);
                load_row(v_cache, cache_at + slots[j] * D, D, dtype, values + j * D);
            }
            for (int64_t t = 0; t < count; t++) {
                const int64_t n = seen[t], *own = at + t * span, heads = ((b * T + first + t) * H + g * G) * D;
                load_row(q, heads, G * D, dtype, queries);
                group_scores(queries, keys, own, n, G, D, scale, scores);
                for (int64_t i = 0; i < G; i++) softmax(scores + i * n, n);
                group_values(scores, values, own, n, G, D, acc);
                for (int64_t j = 0; j < G * D; j++) store(out, heads + j, acc[j], dtype);
            }
        }
        free(keys); free(values); free(scores); free(queries); free(acc); free(slots); free(at);
    }
}

/* out (rows, outs) = x (rows, in) . w^T for small products (a LoRA adapter's), each output
 * rounded to the dtype and summed in `dot`'s fixed order, so a row's result does not depend on
 * the other rows or the threads. w: (outs, in). */
void bd_rows_linear(const void *x, const void *w, void *out, int64_t rows, int64_t in, int64_t outs, int dtype) {
    float *inputs = malloc(rows * in * sizeof(float));
    for (int64_t r = 0; r < rows; r++) load_row(x, r * in, in, dtype, inputs + r * in);
#pragma omp parallel if (rows * in * outs >= 32768)
    {
        float *row = malloc(in * sizeof(float));
#pragma omp for schedule(static)
        for (int64_t j = 0; j < outs; j++) {
            load_row(w, j * in, in, dtype, row);
            for (int64_t r = 0; r < rows; r++) store(out, r * outs + j, dot(row, inputs + r * in, in), dtype);
        }
        free(row);
    }
    free(inputs);
}
