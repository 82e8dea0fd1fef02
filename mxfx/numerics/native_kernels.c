/* mxfx native CPU kernels: MX quantize, fake-quantize and dequantize along the last axis of a
 * contiguous (rows, n) array, bit for bit the reference math of mxfx/numerics/reference.py
 * (OCP MX v1.0 §6.3), written so that GCC/Clang vectorize the per-element loops.
 *
 * Why C and not Inductor's generated code: the quantizer's element loop is bit manipulation
 * (exponent fields, per-block scale codes), which Inductor's CPU backend runs through scalar
 * loops, and its blocks of 32 leave the vectorized loop two vectors long around scalar per-block
 * work. Plain C with no torch headers builds in about a second with the compiler Inductor already
 * needs, and is loaded through ctypes (mxfx/numerics/native.py). The reference stays the source
 * of truth: the tests compare these kernels with it over every code point.
 *
 * Scope: scale modes floor/ceil/even/rceil, roundings even/away/toward_zero, flush_subnormals,
 * inputs and outputs fp32/bf16/fp16, any block size up to MXFX_MAX_BLOCK. Everything else
 * (mse scales, stochastic rounding) stays on the reference path.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MXFX_MAX_BLOCK 4096

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };
enum { SM_FLOOR = 0, SM_CEIL = 1, SM_EVEN = 2, SM_RCEIL = 3 };
enum { RD_EVEN = 0, RD_AWAY = 1, RD_TOWARD_ZERO = 2 };

typedef struct {
    int32_t bits, mbits, bias, emin, emax, is_int, max_code;
    float max_normal;
} mx_format;

static inline uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* bf16 -> fp32 is exact (the upper half of the bits); fp16 -> fp32 is exact. */
static inline void load_row(const void *src, int dtype, int64_t offset, int64_t count, float *dst, int flush) {
    if (dtype == DT_F32) {
        memcpy(dst, (const float *)src + offset, (size_t)count * 4);
    } else if (dtype == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src + offset;
        for (int64_t i = 0; i < count; i++) dst[i] = u2f((uint32_t)s[i] << 16);
    } else {
        const _Float16 *s = (const _Float16 *)src + offset;
        for (int64_t i = 0; i < count; i++) dst[i] = (float)s[i];
    }
    if (flush) {  /* |x| < 2^-126 -> x * 0.0 (keeps the sign of zero) */
        for (int64_t i = 0; i < count; i++) {
            float v = dst[i];
            dst[i] = (f2u(v) & 0x7FFFFFFFu) < 0x00800000u ? v * 0.0f : v;
        }
    }
}

/* fp32 -> bf16 as torch's vectorized conversion: round half to even, NaN -> 0xFFFF. */
static inline uint16_t f2bf(float f) {
    uint32_t u = f2u(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0xFFFFu;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

static inline void store_row(void *dst, int dtype, int64_t offset, int64_t count, const float *src) {
    if (dtype == DT_F32) {
        memcpy((float *)dst + offset, src, (size_t)count * 4);
    } else if (dtype == DT_BF16) {
        uint16_t *d = (uint16_t *)dst + offset;
        for (int64_t i = 0; i < count; i++) d[i] = f2bf(src[i]);
    } else {
        _Float16 *d = (_Float16 *)dst + offset;
        for (int64_t i = 0; i < count; i++) d[i] = (_Float16)src[i];
    }
}

/* ceil(log2(v)) of non-negative finite fp32 bits, exact; below -127 reads as -127. */
static inline int32_t ceil_log2_bits(uint32_t bits) {
    int32_t efield = (int32_t)((bits >> 23) & 0xFF);
    uint32_t mant = bits & 0x7FFFFFu;
    if (efield == 0) return mant > 0x400000u ? -126 : -127;
    return efield - 127 + (mant != 0);
}

/* The block's E8M0 scale code from the bits of max|V| (reference.shared_exponent). */
static inline uint8_t scale_code(uint32_t amax_bits, const mx_format *f, int mode) {
    int32_t efield = (int32_t)((amax_bits >> 23) & 0xFF);
    if (efield == 0xFF) return 0xFF; /* NaN or Inf in the block: the NaN scale */
    int32_t exp;
    if (mode == SM_FLOOR) {
        exp = efield - 127 - f->emax;
    } else if (mode == SM_CEIL) {
        exp = ceil_log2_bits(amax_bits) - f->emax;
    } else if (mode == SM_EVEN) {
        uint32_t rounded = (amax_bits + (1u << (22 - f->mbits))) & 0x7F800000u;
        exp = (efield == 0 ? 0 : (int32_t)(rounded >> 23)) - 127 - f->emax;
    } else {
        float quotient = u2f(amax_bits) / f->max_normal;
        exp = ceil_log2_bits(f2u(quotient));
    }
    exp = exp < -127 ? -127 : (exp > 127 ? 127 : exp);
    return (uint8_t)(exp + 127);
}

/* 2^k in fp32 for integer k in [-149, 127] (reference._pow2). */
static inline float pow2(int32_t k) {
    if (k >= -126) return u2f((uint32_t)(k + 127) << 23);
    int32_t s = k + 149;
    s = s < 0 ? 0 : (s > 22 ? 22 : s);
    return u2f(1u << s);
}

static inline float round_multiple(float m, int rounding) {
    if (rounding == RD_EVEN) return rintf(m);       /* the default rounding mode: half to even */
    if (rounding == RD_TOWARD_ZERO) return truncf(m);
    return roundf(m);                               /* half away from zero */
}

/* One block: max|V| and its scale code; `v` holds the block (zero-padded to `len`). */
static inline uint8_t block_scale(const float *v, int64_t len, const mx_format *f, int mode, int *finite) {
    uint32_t amax = 0;
    for (int64_t i = 0; i < len; i++) {  /* integer max of |x| bits: NaN bits exceed Inf's */
        uint32_t a = f2u(v[i]) & 0x7FFFFFFFu;
        amax = a > amax ? a : amax;
    }
    *finite = amax < 0x7F800000u;
    return scale_code(amax, f, mode);
}

/* Codes of one block's scaled values V/X (reference.encode_elements). */
static inline void encode_block(const float *v, int64_t len, float inverse, const mx_format *f, int rounding,
                                uint8_t *codes) {
    if (f->is_int) {
        for (int64_t i = 0; i < len; i++) {
            float m = round_multiple(v[i] * inverse * 64.0f, rounding);
            m = m < -127.0f ? -127.0f : (m > 127.0f ? 127.0f : m);
            int32_t c = (int32_t)m;
            codes[i] = (uint8_t)(c < 0 ? c + 256 : c);
        }
        return;
    }
    const int32_t lo = f->emin + 127, hi = f->emax + 1 + 127, mb = f->mbits;
    const int32_t offset = mb + f->bias - 1 - 127, max_code = f->max_code, sign_bit = 1 << (f->bits - 1);
    for (int64_t i = 0; i < len; i++) {
        float s = v[i] * inverse;
        int32_t ef = (int32_t)((f2u(s) >> 23) & 0xFF);
        ef = ef < lo ? lo : (ef > hi ? hi : ef);
        int32_t qe = ef - mb; /* the quantum 2^(e - mbits), a normal fp32 power of two */
        float m = round_multiple(s * u2f((uint32_t)(254 - qe) << 23), rounding);
        int32_t magnitude = (int32_t)fabsf(m) + ((qe + offset) << mb);
        magnitude = magnitude > max_code ? max_code : magnitude;
        codes[i] = (uint8_t)(magnitude + ((f2u(m) >> 31) ? sign_bit : 0));
    }
}

/* Values of one block's scaled values V/X times X (reference.round_elements * scale). */
static inline void fake_block(float *v, int64_t len, float inverse, float scale, const mx_format *f, int rounding) {
    const float maxn = f->max_normal;
    if (f->is_int) {
        for (int64_t i = 0; i < len; i++) {
            float m = round_multiple(v[i] * inverse * 64.0f, rounding);
            float q = m * 0.015625f;
            q = q < -maxn ? -maxn : (q > maxn ? maxn : q);
            v[i] = (m == 0.0f ? 0.0f : q) * scale;
        }
        return;
    }
    const int32_t lo = f->emin + 127, hi = f->emax + 1 + 127, mb = f->mbits;
    for (int64_t i = 0; i < len; i++) {
        float s = v[i] * inverse;
        int32_t ef = (int32_t)((f2u(s) >> 23) & 0xFF);
        ef = ef < lo ? lo : (ef > hi ? hi : ef);
        int32_t qe = ef - mb;
        float m = round_multiple(s * u2f((uint32_t)(254 - qe) << 23), rounding);
        float q = m * u2f((uint32_t)qe << 23);
        q = q < -maxn ? -maxn : (q > maxn ? maxn : q);
        v[i] = q * scale;
    }
}

/* Block b of row r of x (n per row) into v, zero-padded to `block` (a partial block: zeros, which
 * never change max|V|); returns its length and sets its scale code and whether max|V| is finite. */
static inline int64_t load_block(const void *x, int dtype, int64_t r, int64_t b, int64_t n, int64_t block,
                                 int flush, const mx_format *f, int mode, float *v, uint8_t *code, int *finite) {
    int64_t start = b * block, len = n - start < block ? n - start : block;
    load_row(x, dtype, r * n + start, len, v, flush);
    for (int64_t i = len; i < block; i++) v[i] = 0.0f;
    *code = block_scale(v, block, f, mode, finite);
    return len;
}

static void pack_row(const uint8_t *codes, int64_t count, int bits, uint8_t *out) {
    if (bits == 8) {
        memcpy(out, codes, (size_t)count);
    } else if (bits == 4) { /* two per byte, the first in the low nibble */
        for (int64_t i = 0; i < count / 2; i++) out[i] = (uint8_t)(codes[2 * i] | (codes[2 * i + 1] << 4));
    } else { /* four per three bytes, a little-endian 24-bit word, the first in the low bits */
        for (int64_t i = 0; i < count / 4; i++) {
            uint32_t w = (uint32_t)codes[4 * i] | ((uint32_t)codes[4 * i + 1] << 6) |
                         ((uint32_t)codes[4 * i + 2] << 12) | ((uint32_t)codes[4 * i + 3] << 18);
            out[3 * i] = (uint8_t)w;
            out[3 * i + 1] = (uint8_t)(w >> 8);
            out[3 * i + 2] = (uint8_t)(w >> 16);
        }
    }
}

static void unpack_row(const uint8_t *packed, int64_t count, int bits, uint8_t *codes) {
    if (bits == 8) {
        memcpy(codes, packed, (size_t)count);
    } else if (bits == 4) {
        for (int64_t i = 0; i < count / 2; i++) {
            codes[2 * i] = packed[i] & 0xF;
            codes[2 * i + 1] = packed[i] >> 4;
        }
    } else {
        for (int64_t i = 0; i < count / 4; i++) {
            uint32_t w = (uint32_t)packed[3 * i] | ((uint32_t)packed[3 * i + 1] << 8) | ((uint32_t)packed[3 * i + 2] << 16);
            codes[4 * i] = w & 0x3F;
            codes[4 * i + 1] = (w >> 6) & 0x3F;
            codes[4 * i + 2] = (w >> 12) & 0x3F;
            codes[4 * i + 3] = (w >> 18) & 0x3F;
        }
    }
}

static inline int64_t group_of(int bits) { return bits == 4 ? 2 : (bits == 6 ? 4 : 1); }

/* codes: rows x packed bytes of ceil(n / block) * block codes padded to the packing group;
 * scales: rows x ceil(n / block). Returns 0, or -1 where a buffer cannot be allocated. */
int mxfx_quantize(const void *x, int dtype, int64_t rows, int64_t n, int64_t block, const mx_format *f,
                  int scale_mode, int rounding, int flush, uint8_t *codes, uint8_t *scales, int threads) {
    const int64_t n_blocks = (n + block - 1) / block, group = group_of(f->bits);
    const int64_t padded = (n_blocks * block + group - 1) / group * group;
    const int64_t row_bytes = padded * f->bits / 8;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *v = malloc((size_t)block * 4);
        uint8_t *c = malloc((size_t)padded);
        if (v == NULL || c == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                for (int64_t b = 0; b < n_blocks; b++) {
                    int64_t start = b * block;
                    int finite;
                    uint8_t code;
                    load_block(x, dtype, r, b, n, block, flush, f, scale_mode, v, &code, &finite);
                    scales[r * n_blocks + b] = code;
                    if (finite) encode_block(v, block, pow2(127 - (int32_t)code), f, rounding, c + start);
                    else memset(c + start, 0, (size_t)block); /* NaN scale: codes 0 (§6.3) */
                }
                for (int64_t i = n_blocks * block; i < padded; i++) c[i] = 0;
                pack_row(c, padded, f->bits, codes + r * row_bytes);
            }
        }
        free(v);
        free(c);
    }
    return failed ? -1 : 0;
}

int mxfx_fake_quantize(const void *x, int dtype, int64_t rows, int64_t n, int64_t block, const mx_format *f,
                       int scale_mode, int rounding, int flush, void *out, int threads) {
    const int64_t n_blocks = (n + block - 1) / block;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *v = malloc((size_t)block * 4);
        if (v == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                for (int64_t b = 0; b < n_blocks; b++) {
                    int finite;
                    uint8_t code;
                    int64_t len = load_block(x, dtype, r, b, n, block, flush, f, scale_mode, v, &code, &finite);
                    if (finite) {
                        fake_block(v, len, pow2(127 - (int32_t)code), pow2((int32_t)code - 127), f, rounding);
                    } else { /* the NaN scale, bit for bit (reference.decode_scales) */
                        for (int64_t i = 0; i < len; i++) v[i] = u2f(0x7FC00000u);
                    }
                    store_row(out, dtype, r * n + b * block, len, v);
                }
            }
        }
        free(v);
    }
    return failed ? -1 : 0;
}

/* table: the 2^bits fp32 values of the format's codes (reference.decode_elements of each code). */
int mxfx_dequantize(const uint8_t *codes, const uint8_t *scales, int64_t rows, int64_t n, int64_t block, int bits,
                    int64_t row_bytes, int64_t n_blocks, const float *table, void *out, int dtype, int threads) {
    const int64_t codes_per_row = row_bytes * 8 / bits;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        uint8_t *c = malloc((size_t)codes_per_row);
        float *v = malloc((size_t)block * 4);
        if (c == NULL || v == NULL) {
#pragma omp atomic write
            failed = 1;
        } else {
#pragma omp for schedule(static)
            for (int64_t r = 0; r < rows; r++) {
                unpack_row(codes + r * row_bytes, codes_per_row, bits, c);
                for (int64_t b = 0; b < n_blocks; b++) {
                    int64_t start = b * block, len = n - start < block ? n - start : block;
                    uint8_t s = scales[r * n_blocks + b];
                    float scale = s == 0xFF ? u2f(0x7FC00000u) : pow2((int32_t)s - 127);
                    if (s == 0xFF) { /* the NaN scale's NaN, whatever the element (as the reference) */
                        for (int64_t i = 0; i < len; i++) v[i] = scale;
                    } else {
                        for (int64_t i = 0; i < len; i++) v[i] = table[c[start + i]] * scale;
                    }
                    store_row(out, dtype, r * n + start, len, v);
                }
            }
        }
        free(c);
        free(v);
    }
    return failed ? -1 : 0;
}
