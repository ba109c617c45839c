/* Scalar helpers shared by the kernel sources: bf16 (dtype 1, stored as uint16) and float32
 * (dtype 0) elements, widened to float32 and rounded back to nearest even as PyTorch rounds. */
#ifndef BLOCKDIFF_CPU_KERNELS_H
#define BLOCKDIFF_CPU_KERNELS_H
#include <stdint.h>

static inline float bf16_to_float(uint16_t h) {
    union { uint32_t u; float f; } v = { (uint32_t)h << 16 };
    return v.f;
}

static inline uint16_t float_to_bf16(float f) {
    union { float f; uint32_t u; } v = { f };
    if (f != f) return 0x7FC0;
    return (uint16_t)((v.u + 0x7FFFu + ((v.u >> 16) & 1u)) >> 16);
}

/* element i of a bf16 (dtype 1) or float32 (dtype 0) array */
static inline float load(const void *p, int64_t i, int dtype) {
    return dtype ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store(void *p, int64_t i, float x, int dtype) {
    if (dtype) ((uint16_t *)p)[i] = float_to_bf16(x);
    else ((float *)p)[i] = x;
}

/* a value as the tensor's dtype holds it: bf16 rounding, or none */
static inline float rounded(float x, int dtype) {
    return dtype ? bf16_to_float(float_to_bf16(x)) : x;
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* float_to_bf16 on sixteen lanes, NaN included */
static inline __m256i bf16_bits16(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i bits = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
    bits = _mm512_mask_mov_epi32(bits, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
    return _mm512_cvtepi32_epi16(bits);
}

/* sixteen elements from i on, widened to float32 */
static inline __m512 load16(const void *p, int64_t i, int dtype) {
    if (dtype) {
        const __m256i half = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(half), 16));
    }
    return _mm512_loadu_ps((const float *)p + i);
}

/* sixteen elements stored from i on in the dtype */
static inline void store16(void *p, int64_t i, __m512 x, int dtype) {
    if (dtype) _mm256_storeu_si256((__m256i *)((uint16_t *)p + i), bf16_bits16(x));
    else _mm512_storeu_ps((float *)p + i, x);
}
#endif

#endif
