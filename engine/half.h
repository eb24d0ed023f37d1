/*
 * half.h: 16-bit float conversions (IEEE fp16 and bfloat16), scalar and exact.
 *
 * Both directions are exact for every finite value when widening; narrowing
 * (float -> fp16 / bf16) rounds to nearest even, as torch does. Header-only
 * so that C and CUDA host code can share the one definition.
 */
#ifndef LIGHTMOE_HALF_H
#define LIGHTMOE_HALF_H

#include <stdint.h>
#include <string.h>

static inline float half_bits_to_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static inline uint32_t half_float_to_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

/* bfloat16 -> float: the upper half of a float32. */
static inline float bf16_to_float(uint16_t h) { return half_bits_to_float((uint32_t)h << 16); }

/* float -> bfloat16, round to nearest even (NaN stays NaN). */
static inline uint16_t float_to_bf16(float f)
{
    uint32_t u = half_float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* IEEE fp16 -> float, exact (subnormals included). */
static inline float fp16_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t man = h & 0x3ffu;
    uint32_t u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalise */
            int e = -1;
            do {
                e++;
                man <<= 1;
            } while (!(man & 0x400u));
            u = sign | ((uint32_t)(127 - 15 - e) << 23) | ((man & 0x3ffu) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    return half_bits_to_float(u);
}

/* float -> IEEE fp16, round to nearest even, overflow to inf. */
static inline uint16_t float_to_fp16(float f)
{
    uint32_t u = half_float_to_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u)
        return (uint16_t)(sign | 0x7e00u);
    if (a >= 0x477ff000u) /* rounds to >= 65520: inf */
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) { /* below the smallest normal fp16: subnormal or zero */
        if (a < 0x33000000u)
            return (uint16_t)sign;
        uint32_t man = (a & 0x7fffffu) | 0x800000u;
        int shift = 126 - (int)(a >> 23); /* 14..24 */
        uint32_t r = man >> shift;
        uint32_t rem = man & ((1u << shift) - 1u);
        uint32_t half = 1u << (shift - 1);
        if (rem > half || (rem == half && (r & 1u)))
            r++;
        return (uint16_t)(sign | r);
    }
    uint32_t r = a - 0x38000000u; /* rebias exponent 127 -> 15 */
    uint32_t out = r >> 13;
    uint32_t rem = r & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (out & 1u)))
        out++;
    return (uint16_t)(sign | out);
}

#endif
