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

#endif
