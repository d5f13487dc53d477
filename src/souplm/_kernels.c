/*
 * souplm._kernels: fused one-pass CPU kernels for weight merging (CPython C API only, no NumPy C API).
 *
 * Every element of a merged tensor is computed in a single pass over the stored bytes: convert the
 * inputs (float32, float16 or bfloat16) to float32, subtract the base, trim (TIES), drop and rescale
 * (DARE), weigh, elect the sign, divide, add the base, round to the output dtype, and check every value
 * read for NaN/Inf. The work is done in blocks of a few hundred elements: each block is converted into
 * float32 scratch arrays that stay in L1, then a handful of simple loops the compiler vectorizes run
 * over them. Arithmetic is plain float32, one rounding per operation, in a fixed order (the module is
 * built with -ffp-contract=off, so no multiply-add is fused), which makes the result bit-identical to a
 * NumPy statement of the same formula, and independent of how a tensor is split into ranges.
 *
 * Every function releases the GIL while it computes, so Python threads can run disjoint ranges of one
 * tensor in parallel.
 *
 * On x86-64 compiled by GCC or Clang a second copy of the kernels is built for AVX2 + F16C and chosen at
 * import when the CPU has both; otherwise (and on other compilers or CPUs) the portable copy runs.
 * Both compute the same bits.
 *
 * Dtype codes: 0 = float32, 1 = float16 (IEEE binary16), 2 = bfloat16.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__GNUC__) || defined(__clang__)
#define SOUP_INLINE static inline __attribute__((always_inline))
#define SOUP_RESTRICT __restrict__
#define SOUP_NOINLINE __attribute__((noinline))
#elif defined(_MSC_VER)
#define SOUP_INLINE static __forceinline
#define SOUP_RESTRICT __restrict
#define SOUP_NOINLINE __declspec(noinline)
#else
#define SOUP_INLINE static inline
#define SOUP_RESTRICT
#define SOUP_NOINLINE
#endif

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(SOUP_NO_X86)
#define SOUP_X86 1
#include <immintrin.h>
#define SOUP_TARGET_AVX2 __attribute__((target("avx2,f16c")))
/* AVX-512 copies: GCC vectorizes them 512 bits wide when asked (1.15-1.35x the AVX2 copy on the Program
 * kernel, measured on a Xeon); clang takes the features and picks its own width */
#if defined(__clang__)
#define SOUP_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c")))
#else
#define SOUP_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,prefer-vector-width=512")))
#endif
#else
#define SOUP_X86 0
#endif

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
enum { MODE_SUM = 0, MODE_ELECT = 1 };
#define N_LEVELS 65536u

static const char *const DTYPE_NAMES[3] = {"float32", "float16", "bfloat16"};

static int dtype_size(int code) { return code == DT_F32 ? 4 : 2; }

/* 1 when the AVX2 + F16C copy of the kernels runs (chosen at import; tests may force the portable one). */
enum { ISA_GENERIC, ISA_AVX2, ISA_AVX512 };
static const char *const ISA_NAMES[3] = {"generic", "avx2", "avx512"};
static int isa = ISA_GENERIC; /* the best copy of the kernels this CPU runs (detect_isa), or a test's choice */

/* ------------------------------------------------------------------------------------------------ */
/* Scalar conversions (exact; round-to-nearest-even on the way down)                                */
/* ------------------------------------------------------------------------------------------------ */

SOUP_INLINE float bits_to_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, 4);
    return f;
}

SOUP_INLINE uint32_t f32_to_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

SOUP_INLINE uint16_t load_u16(const unsigned char *p)
{
    uint16_t h;
    memcpy(&h, p, 2);
    return h;
}

SOUP_INLINE uint32_t load_u32(const unsigned char *p)
{
    uint32_t u;
    memcpy(&u, p, 4);
    return u;
}

/* All ones where cond holds, else 0. */
SOUP_INLINE uint32_t mask_if(int cond) { return 0u - (uint32_t)(cond != 0); }

/* float16 bits -> float32 bits. Normal numbers rebias the exponent (+112), Inf/NaN get an all-ones
 * exponent (+112 twice), subnormals (m * 2^-24, m < 1024) are an exact int-to-float conversion times a
 * power of two. Written with masks instead of branches so that it vectorizes. */
SOUP_INLINE uint32_t f16_to_f32_bits(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    int32_t em = h & 0x7FFF;
    uint32_t shifted = (uint32_t)em << 13;
    uint32_t normal = shifted + 0x38000000u + (0x38000000u & mask_if(em >= 0x7C00));
    uint32_t sub = f32_to_bits((float)em * 5.9604644775390625e-8f); /* em * 2^-24 */
    uint32_t is_sub = mask_if(em < 0x0400);
    return sign | (sub & is_sub) | (normal & ~is_sub);
}

/* float32 bits -> float16 bits, round to nearest even; overflow gives Inf, NaN stays a (quiet) NaN. */
SOUP_INLINE uint16_t f32_bits_to_f16(uint32_t u)
{
    uint32_t sign = (u >> 16) & 0x8000u;
    int32_t a = (int32_t)(u & 0x7FFFFFFFu);
    /* normal results (|x| >= 2^-14): drop 13 mantissa bits with RNE, carries run into the exponent */
    uint32_t normal = ((uint32_t)a + 0x0FFFu + (((uint32_t)a >> 13) & 1u) - 0x38000000u) >> 13;
    /* subnormal results: 0.5 + |x| rounds |x| to a multiple of 2^-24 (the float32 ulp at 0.5), RNE */
    uint32_t sub = f32_to_bits(bits_to_f32((uint32_t)a) + 0.5f) - 0x3F000000u;
    uint32_t is_nan = mask_if(a > 0x7F800000);
    uint32_t is_big = mask_if(a >= 0x477FF000); /* >= 65520 rounds to Inf */
    uint32_t is_normal = mask_if(a >= 0x38800000);
    uint32_t mag = (sub & ~is_normal) | (normal & is_normal & ~is_big) | (0x7C00u & is_big & ~is_nan) |
                   (0x7E00u & is_nan);
    return (uint16_t)(sign | mag);
}

/* float32 bits -> bfloat16 bits, round to nearest even (Inf stays Inf, NaN becomes the quiet NaN). */
SOUP_INLINE uint16_t f32_bits_to_bf16(uint32_t u)
{
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    uint32_t is_nan = mask_if((int32_t)(u & 0x7FFFFFFFu) > 0x7F800000);
    return (uint16_t)((r & ~is_nan) | (0x7FC0u & is_nan));
}

/* ------------------------------------------------------------------------------------------------ */
/* Block conversions                                                                                 */
/* ------------------------------------------------------------------------------------------------ */

/* n values of dtype `code` at p -> float32 dst; returns nonzero when any of them is NaN or Inf. */
SOUP_INLINE uint32_t load_f32_block(const unsigned char *SOUP_RESTRICT p, float *SOUP_RESTRICT dst, int n)
{
    uint32_t bad = 0;
    for (int k = 0; k < n; k++) {
        uint32_t u = load_u32(p + 4 * (size_t)k);
        bad |= (u & 0x7F800000u) == 0x7F800000u;
        dst[k] = bits_to_f32(u);
    }
    return bad;
}

SOUP_INLINE uint32_t load_bf16_block(const unsigned char *SOUP_RESTRICT p, float *SOUP_RESTRICT dst, int n)
{
    uint32_t bad = 0;
    for (int k = 0; k < n; k++) {
        uint32_t h = load_u16(p + 2 * (size_t)k);
        bad |= (h & 0x7F80u) == 0x7F80u;
        dst[k] = bits_to_f32(h << 16);
    }
    return bad;
}

SOUP_INLINE uint32_t load_f16_block_soft(const unsigned char *SOUP_RESTRICT p, float *SOUP_RESTRICT dst, int n)
{
    uint32_t bad = 0;
    for (int k = 0; k < n; k++) {
        uint16_t h = load_u16(p + 2 * (size_t)k);
        bad |= (h & 0x7C00u) == 0x7C00u;
        dst[k] = bits_to_f32(f16_to_f32_bits(h));
    }
    return bad;
}

SOUP_INLINE void store_f32_block(const float *SOUP_RESTRICT src, unsigned char *SOUP_RESTRICT p, int n)
{
    for (int k = 0; k < n; k++) {
        uint32_t u = f32_to_bits(src[k]);
        memcpy(p + 4 * (size_t)k, &u, 4);
    }
}

SOUP_INLINE void store_bf16_block(const float *SOUP_RESTRICT src, unsigned char *SOUP_RESTRICT p, int n)
{
    for (int k = 0; k < n; k++) {
        uint16_t h = f32_bits_to_bf16(f32_to_bits(src[k]));
        memcpy(p + 2 * (size_t)k, &h, 2);
    }
}

SOUP_INLINE void store_f16_block_soft(const float *SOUP_RESTRICT src, unsigned char *SOUP_RESTRICT p, int n)
{
    for (int k = 0; k < n; k++) {
        uint16_t h = f32_bits_to_f16(f32_to_bits(src[k]));
        memcpy(p + 2 * (size_t)k, &h, 2);
    }
}

#if SOUP_X86
/* float16 with the F16C instructions (8 at a time; the tail uses the exact software conversion). */
SOUP_TARGET_AVX2 static uint32_t load_f16_block_f16c(const unsigned char *SOUP_RESTRICT p,
                                                     float *SOUP_RESTRICT dst, int n)
{
    const __m128i expo = _mm_set1_epi16(0x7C00);
    __m128i bad8 = _mm_setzero_si128();
    int k = 0;
    for (; k + 8 <= n; k += 8) {
        __m128i h = _mm_loadu_si128((const __m128i *)(const void *)(p + 2 * (size_t)k));
        bad8 = _mm_or_si128(bad8, _mm_cmpeq_epi16(_mm_and_si128(h, expo), expo));
        _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(h));
    }
    uint32_t bad = !_mm_testz_si128(bad8, bad8);
    if (k < n)
        bad |= load_f16_block_soft(p + 2 * (size_t)k, dst + k, n - k);
    return bad;
}

SOUP_TARGET_AVX2 static void store_f16_block_f16c(const float *SOUP_RESTRICT src, unsigned char *SOUP_RESTRICT p,
                                                  int n)
{
    int k = 0;
    for (; k + 8 <= n; k += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(void *)(p + 2 * (size_t)k), h);
    }
    if (k < n)
        store_f16_block_soft(src + k, p + 2 * (size_t)k, n - k);
}
#endif

SOUP_INLINE uint32_t load_block(int code, const unsigned char *p, float *dst, int n, int f16c)
{
    if (code == DT_BF16)
        return load_bf16_block(p, dst, n);
    if (code == DT_F32)
        return load_f32_block(p, dst, n);
#if SOUP_X86
    if (f16c)
        return load_f16_block_f16c(p, dst, n);
#endif
    (void)f16c;
    return load_f16_block_soft(p, dst, n);
}

SOUP_INLINE void store_block(int code, const float *src, unsigned char *p, int n, int f16c)
{
    if (code == DT_BF16) {
        store_bf16_block(src, p, n);
        return;
    }
    if (code == DT_F32) {
        store_f32_block(src, p, n);
        return;
    }
#if SOUP_X86
    if (f16c) {
        store_f16_block_f16c(src, p, n);
        return;
    }
#endif
    (void)f16c;
    store_f16_block_soft(src, p, n);
}

/* ------------------------------------------------------------------------------------------------ */
/* Ask for the next `len` bytes after the `len` at p (no further than `left` bytes from p) to be brought into
 * the cache: the hardware prefetcher stops at each 4 KiB page, and the inputs are several streams of mapped
 * page cache, so a block's loads would otherwise wait on memory at every page. */
SOUP_INLINE void prefetch_ahead(const unsigned char *p, size_t len, size_t left)
{
#if defined(__GNUC__) || defined(__clang__)
    size_t end = 2 * len < left ? 2 * len : left;
    for (size_t off = len; off < end; off += 64)
        __builtin_prefetch(p + off, 0, 3);
#else
    (void)p, (void)len, (void)left;
#endif
}

/* x where cond holds, else +0 (a bit mask rather than a branch: vectorizes under any FP flags) */
SOUP_INLINE float keep_if(int cond, float x)
{
    return bits_to_f32(f32_to_bits(x) & mask_if(cond));
}

/* x rounded to the compute dtype and back (round to nearest even): the rounding a torch op in bfloat16 or
 * float16 does after each operation (mergekit computes task-vector methods in the tensors' dtype). */
SOUP_INLINE float round_to(int code, float x)
{
    if (code == DT_BF16) { /* round to nearest even in the high half. Inf stays Inf; a NaN the arithmetic
                              makes (the default NaN, mantissa 0x400000) stays a NaN. Only a NaN payload with
                              its top 16 mantissa bits set could carry into the sign, and such a NaN can only
                              come from an input, which the loads have flagged (the result is then refused) */
        uint32_t u = f32_to_bits(x);
        return bits_to_f32((u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u);
    }
    if (code == DT_F16)
        return bits_to_f32(f16_to_f32_bits(f32_bits_to_f16(f32_to_bits(x))));
    return x;
}

/* The DARE stream: SplitMix64 output for counter j >> 2, 16 bits per element                      */
/* ------------------------------------------------------------------------------------------------ */

#define SM_GAMMA 0x9E3779B97F4A7C15ull
#define SM_MIX1 0xBF58476D1CE4E5B9ull
#define SM_MIX2 0x94D049BB133111EBull

SOUP_INLINE uint64_t sm_mix(uint64_t z)
{
    z = (z ^ (z >> 30)) * SM_MIX1;
    z = (z ^ (z >> 27)) * SM_MIX2;
    return z ^ (z >> 31);
}

/* The draws of elements j0 .. j0+n-1 into buf (which holds n + 3 values); returns where j0's draw is. */
SOUP_INLINE const uint16_t *gen_draws(uint64_t key, uint64_t j0, int n, uint16_t *SOUP_RESTRICT buf)
{
    int off = (int)(j0 & 3u);
    int words = (off + n + 3) >> 2;
    uint64_t z = key + ((j0 >> 2) + 1u) * SM_GAMMA;
    for (int q = 0; q < words; q++, z += SM_GAMMA) {
        uint64_t r = sm_mix(z);
        buf[4 * q + 0] = (uint16_t)r;
        buf[4 * q + 1] = (uint16_t)(r >> 16);
        buf[4 * q + 2] = (uint16_t)(r >> 32);
        buf[4 * q + 3] = (uint16_t)(r >> 48);
    }
    return buf + off;
}

/* |x - base| of elements j .. j+n-1 into xs (|x| when base is NULL; bs: n floats of scratch), each input,
 * the difference and so the magnitude rounded to the compute dtype as combine rounds them. */
SOUP_INLINE void load_abs_delta(int x_code, const unsigned char *x, int base_code, const unsigned char *base,
                                Py_ssize_t j, int n, float *SOUP_RESTRICT xs, float *SOUP_RESTRICT bs, int f16c,
                                const int cc)
{
    load_block(x_code, x + (size_t)j * dtype_size(x_code), xs, n, f16c);
    if (cc != DT_F32 && x_code != cc) /* (values stored in the compute dtype are already rounded) */
        for (int k = 0; k < n; k++)
            xs[k] = round_to(cc, xs[k]);
    if (base) {
        load_block(base_code, base + (size_t)j * dtype_size(base_code), bs, n, f16c);
        if (cc != DT_F32 && base_code != cc)
            for (int k = 0; k < n; k++)
                bs[k] = round_to(cc, bs[k]);
        for (int k = 0; k < n; k++)
            xs[k] = fabsf(round_to(cc, xs[k] - bs[k]));
    } else
        for (int k = 0; k < n; k++)
            xs[k] = fabsf(xs[k]);
}

/* ------------------------------------------------------------------------------------------------ */
/* combine                                                                                          */
/* ------------------------------------------------------------------------------------------------ */

typedef struct {
    unsigned char *out;
    int out_code;
    int n; /* number of models */
    const unsigned char **in;
    const int *in_code;
    const unsigned char *base; /* NULL: no base */
    int base_code;
    const float *w; /* [n][R] */
    Py_ssize_t R, row_len;
    Py_ssize_t start, stop;
    int mode;
    float lam;
    int normalize;
    int compute_code;        /* DT_F32: plain float32; DT_BF16 / DT_F16: every step rounded to that dtype */
    const float *thr;        /* NULL or [n]: the trim keeps thr[i] <= |d| (TIES; breadcrumbs' lower cut) */
    const float *thr_hi;     /* NULL or [n]: ... and |d| <= thr_hi[i] (breadcrumbs' upper cut) */
    const int64_t *quota;    /* NULL or [n][4]: of the entries tied with thr[i], skip the first [0], keep the next
                                [1]; of those tied with thr_hi[i] (and not with thr[i]), skip [2], keep [3]; in
                                index order within this range; [1] == -1: no tie limit for model i */
    int64_t *qleft;          /* [n][4] scratch: the counts left */
    const uint64_t *keys;    /* NULL or [n] (with levels and scales) */
    const uint32_t *levels;  /* [n] */
    const unsigned char *const *masks; /* NULL or [n] byte masks of the whole tensor (DELLA): kept where != 0 */
    const float *scales;     /* [n] */
    int block;               /* elements per block */
    float *scratch;          /* block * (2n + 4) floats */
    uint16_t *draw_buf;      /* block + 8 */
    unsigned char *bad;      /* n + 2 flags: which sources held a NaN/Inf; [n + 1]: the output did */
} combine_args;

/* cc, the compute dtype, is a compile-time constant in each copy below: in the float32 copies every
 * round_to folds away and the loops vectorize as before. */
/* One copy per compute dtype (a compile-time constant, so the float32 copies vectorize as if it were absent),
 * and per instruction set: portable, AVX2 + F16C, and AVX-512 (the same C, vectorized 16 lanes wide; the
 * arithmetic is the same, so every copy writes the same bits). */
#define SOUP_BY_COMPUTE(name, args_t, impl)                                                            \
    SOUP_NOINLINE static void name##_f32(args_t *a) { impl(a, 0, DT_F32); }                           \
    SOUP_NOINLINE static void name##_bf16(args_t *a) { impl(a, 0, DT_BF16); }                         \
    SOUP_NOINLINE static void name##_f16(args_t *a) { impl(a, 0, DT_F16); }                           \
    SOUP_BY_COMPUTE_X86(name, args_t, impl, avx2, SOUP_TARGET_AVX2)                                   \
    SOUP_BY_COMPUTE_X86(name, args_t, impl, avx512, SOUP_TARGET_AVX512)                               \
    static void name##_run(args_t *a)                                                                 \
    {                                                                                                 \
        const int cc = a->compute_code;                                                               \
        SOUP_BY_COMPUTE_X86_RUN(name, avx512, ISA_AVX512)                                             \
        SOUP_BY_COMPUTE_X86_RUN(name, avx2, ISA_AVX2)                                                 \
        if (cc == DT_BF16)                                                                            \
            name##_bf16(a);                                                                           \
        else if (cc == DT_F16)                                                                        \
            name##_f16(a);                                                                            \
        else                                                                                          \
            name##_f32(a);                                                                            \
    }
#if SOUP_X86
#define SOUP_BY_COMPUTE_X86(name, args_t, impl, set, target)                                           \
    target SOUP_NOINLINE static void name##_##set##_f32(args_t *a) { impl(a, 1, DT_F32); }            \
    target SOUP_NOINLINE static void name##_##set##_bf16(args_t *a) { impl(a, 1, DT_BF16); }          \
    target SOUP_NOINLINE static void name##_##set##_f16(args_t *a) { impl(a, 1, DT_F16); }
#define SOUP_BY_COMPUTE_X86_RUN(name, set, level)                                                      \
    if (isa >= level) {                                                                               \
        if (cc == DT_BF16)                                                                            \
            name##_##set##_bf16(a);                                                                   \
        else if (cc == DT_F16)                                                                        \
            name##_##set##_f16(a);                                                                    \
        else                                                                                          \
            name##_##set##_f32(a);                                                                    \
        return;                                                                                       \
    }
#else
#define SOUP_BY_COMPUTE_X86(name, args_t, impl, set, target)
#define SOUP_BY_COMPUTE_X86_RUN(name, set, level)
#endif

SOUP_INLINE void combine_impl(const combine_args *a, int f16c, const int cc)
{
    const int N = a->n, B = a->block;
    float *SOUP_RESTRICT bb = a->scratch;  /* base block */
    float *SOUP_RESTRICT acc = bb + B;     /* sum / t, then the result */
    float *SOUP_RESTRICT sgn = acc + B;    /* elected sign */
    float *SOUP_RESTRICT mass = sgn + B;   /* agreeing weight mass */
    float *dd = mass + B;                  /* [N][B] deltas, then products */
    float *ww = dd + (size_t)N * B;        /* [N][B] weights */
    const int osz = dtype_size(a->out_code), bsz = dtype_size(a->base_code);
    /* bits of the least |x| that stores as Inf: float32's Inf; float16's 65520.0f and bfloat16's 0x7F7F8000 round up */
    const uint32_t out_lim = a->out_code == 1 ? 0x477FF000u : (a->out_code == 2 ? 0x7F7F8000u : 0x7F800000u);

    if (a->R == 1) { /* one weight per model: fill the weight rows once */
        for (int i = 0; i < N; i++) {
            float wi = a->w[i];
            float *SOUP_RESTRICT wr = ww + (size_t)i * B;
            for (int k = 0; k < B; k++)
                wr[k] = wi;
        }
    }

    for (Py_ssize_t j0 = a->start; j0 < a->stop; j0 += B) {
        const int n = (int)(a->stop - j0 < B ? a->stop - j0 : B);

        if (a->R > 1) { /* one weight per output row: runs of row_len elements */
            Py_ssize_t row = j0 / a->row_len, left = a->row_len - j0 % a->row_len;
            int k = 0;
            while (k < n) {
                int len = (int)(left < n - k ? left : n - k);
                for (int i = 0; i < N; i++) {
                    float wi = a->w[(size_t)i * a->R + row];
                    float *SOUP_RESTRICT wr = ww + (size_t)i * B + k;
                    for (int q = 0; q < len; q++)
                        wr[q] = wi;
                }
                k += len;
                row++;
                left = a->row_len;
            }
        }

        if (a->base) {
            a->bad[N] |= (unsigned char)(load_block(a->base_code, a->base + (size_t)j0 * bsz, bb, n, f16c) != 0);
            if (cc != DT_F32 && a->base_code != cc) /* (values stored in the compute dtype are already rounded) */
                for (int k = 0; k < n; k++)
                    bb[k] = round_to(cc, bb[k]);
        }

        for (int i = 0; i < N; i++) {
            float *SOUP_RESTRICT d = dd + (size_t)i * B;
            const float *SOUP_RESTRICT w = ww + (size_t)i * B;
            const int isz = dtype_size(a->in_code[i]);
            a->bad[i] |= (unsigned char)(load_block(a->in_code[i], a->in[i] + (size_t)j0 * isz, d, n, f16c) != 0);
            if (cc != DT_F32 && a->in_code[i] != cc)
                for (int k = 0; k < n; k++)
                    d[k] = round_to(cc, d[k]);
            if (a->base)
                for (int k = 0; k < n; k++)
                    d[k] = round_to(cc, d[k] - bb[k]);
            if (a->thr) {
                const float th = a->thr[i], hi = a->thr_hi ? a->thr_hi[i] : INFINITY;
                if (a->quota && a->quota[4 * i + 1] >= 0) { /* exact counts: which tied entries survive */
                    int64_t *SOUP_RESTRICT q = a->qleft + 4 * i;
                    for (int k = 0; k < n; k++) {
                        const float m = fabsf(d[k]);
                        int keep = m > th && m < hi;
                        if (m == th || m == hi) {
                            int64_t *c = m == th ? q : q + 2; /* [skip, keep] of this cut */
                            if (c[0] > 0)
                                c[0]--;
                            else if (c[1] > 0) {
                                c[1]--;
                                keep = 1;
                            }
                        }
                        d[k] = keep_if(keep, d[k]);
                    }
                } else if (a->thr_hi)
                    for (int k = 0; k < n; k++) {
                        const float m = fabsf(d[k]);
                        d[k] = keep_if(m >= th && m <= hi, d[k]);
                    }
                else
                    for (int k = 0; k < n; k++)
                        d[k] = keep_if(fabsf(d[k]) >= th, d[k]);
            }
            if (a->keys) {
                const uint16_t *SOUP_RESTRICT r = gen_draws(a->keys[i], (uint64_t)j0, n, a->draw_buf);
                const uint32_t level = a->levels[i];
                const float scale = a->scales[i];
                for (int k = 0; k < n; k++)
                    d[k] = keep_if((uint32_t)r[k] < level, round_to(cc, d[k] * scale));
            } else if (a->masks) {
                const unsigned char *SOUP_RESTRICT mk = a->masks[i] + j0;
                const float scale = a->scales[i];
                for (int k = 0; k < n; k++)
                    d[k] = keep_if(mk[k] != 0, round_to(cc, d[k] * scale));
            } else if (a->scales) { /* a trim's survivors rescaled (breadcrumbs' rescale) */
                const float scale = a->scales[i];
                for (int k = 0; k < n; k++)
                    d[k] = round_to(cc, d[k] * scale);
            }
            if (a->mode == MODE_SUM) {
                if (i == 0)
                    for (int k = 0; k < n; k++)
                        acc[k] = round_to(cc, d[k] * w[k]);
                else
                    for (int k = 0; k < n; k++)
                        acc[k] = acc[k] + round_to(cc, d[k] * w[k]);
            } else { /* keep the products for the second pass; acc holds t */
                if (i == 0)
                    for (int k = 0; k < n; k++) {
                        d[k] = round_to(cc, d[k] * w[k]);
                        acc[k] = d[k];
                    }
                else
                    for (int k = 0; k < n; k++) {
                        d[k] = round_to(cc, d[k] * w[k]);
                        acc[k] = acc[k] + d[k];
                    }
            }
        }

        if (a->mode == MODE_SUM) {
            /* the models' sum is one reduction: float32 accumulation, one rounding; normalize divides by the
               weights' sum (a sum below 1e-8 in magnitude divides by 1) */
            if (cc != DT_F32)
                for (int k = 0; k < n; k++)
                    acc[k] = round_to(cc, acc[k]);
            if (a->normalize && a->R == 1) { /* one weight per model: one divisor */
                float m = a->w[0];
                for (int i = 1; i < N; i++)
                    m = m + a->w[i];
                m = round_to(cc, m);
                m = fabsf(m) < 1e-8f ? 1.0f : m;
                for (int k = 0; k < n; k++)
                    acc[k] = round_to(cc, acc[k] / m);
            } else if (a->normalize) {
                for (int k = 0; k < n; k++)
                    mass[k] = ww[k];
                for (int i = 1; i < N; i++)
                    for (int k = 0; k < n; k++)
                        mass[k] = mass[k] + ww[(size_t)i * B + k];
                for (int k = 0; k < n; k++) {
                    float m = round_to(cc, mass[k]);
                    m = keep_if(fabsf(m) >= 1e-8f, m) + keep_if(fabsf(m) < 1e-8f, 1.0f);
                    acc[k] = round_to(cc, acc[k] / m);
                }
            }
        } else {
            for (int k = 0; k < n; k++) { /* +1 where the weighted sum is >= 0 (+-0 included), else -1 */
                sgn[k] = 1.0f - keep_if(acc[k] < 0.0f, 2.0f);
            }
            for (int i = 0; i < N; i++) {
                const float *SOUP_RESTRICT p = dd + (size_t)i * B;
                const float *SOUP_RESTRICT w = ww + (size_t)i * B;
                if (i == 0)
                    for (int k = 0; k < n; k++) {
                        float x = p[k] * sgn[k];
                        float v = keep_if(x > 0.0f, x);
                        acc[k] = v * sgn[k];
                        mass[k] = keep_if(v > 0.0f, w[k]);
                    }
                else
                    for (int k = 0; k < n; k++) {
                        float x = p[k] * sgn[k];
                        float v = keep_if(x > 0.0f, x);
                        acc[k] = acc[k] + v * sgn[k];
                        mass[k] = mass[k] + keep_if(v > 0.0f, w[k]);
                    }
            }
            if (cc != DT_F32)
                for (int k = 0; k < n; k++) {
                    acc[k] = round_to(cc, acc[k]);
                    mass[k] = round_to(cc, mass[k]);
                }
            if (a->normalize)
                for (int k = 0; k < n; k++) {
                    float m = mass[k];
                    float one = keep_if(m == 0.0f, 1.0f); /* divide by 1 where the mass is 0 */
                    acc[k] = keep_if(m != 0.0f, round_to(cc, acc[k] / (m + one)));
                }
        }

        if (a->base) {
            const float lam = a->lam;
            for (int k = 0; k < n; k++)
                acc[k] = round_to(cc, round_to(cc, acc[k] * lam) + bb[k]);
        }
        /* the written values too: finite inputs can overflow (3e38 + 3e38), or round to Inf in the output
           dtype: the bits of |x| below the dtype's limit (NaN's bits lie above Inf's) say the stored value is finite */
        uint32_t over = 0;
        for (int k = 0; k < n; k++)
            over |= (uint32_t)((f32_to_bits(acc[k]) & 0x7FFFFFFFu) >= out_lim);
        a->bad[N + 1] |= (unsigned char)(over != 0);
        store_block(a->out_code, acc, a->out + (size_t)j0 * osz, n, f16c);
    }
}

SOUP_BY_COMPUTE(combine, const combine_args, combine_impl)

/* ------------------------------------------------------------------------------------------------ */
/* abs_delta_histogram                                                                              */
/* ------------------------------------------------------------------------------------------------ */

typedef struct {
    const unsigned char *x;
    int x_code;
    const unsigned char *base;
    int base_code;
    Py_ssize_t start, stop;
    uint32_t *hist;
    long prefix;
    uint32_t *hist2; /* NULL, or (prefix >= 0) the low 16 bits of the keys whose high 16 bits are prefix2 */
    long prefix2;
    int compute_code;
    int block;
    float *scratch; /* 2 * block floats */
    uint32_t *keys; /* block */
    int sign;       /* 1: keys of the signed values x (base NULL), ordered as the values are */
    uint32_t *spare; /* NULL, or 3 more zeroed 65536-bin histograms for the top-16-bit count (summed into hist) */
} hist_args;

SOUP_INLINE void hist_impl(const hist_args *a, int f16c, const int cc)
{
    const int B = a->block;
    float *SOUP_RESTRICT xs = a->scratch;
    float *SOUP_RESTRICT bs = xs + B;
    uint32_t *SOUP_RESTRICT keys = a->keys;
    uint32_t *SOUP_RESTRICT hist = a->hist;
    for (Py_ssize_t j0 = a->start; j0 < a->stop; j0 += B) {
        const int n = (int)(a->stop - j0 < B ? a->stop - j0 : B);
        if (a->sign) { /* the float bits made monotone: negatives complemented, non-negatives above them */
            load_block(a->x_code, a->x + (size_t)j0 * dtype_size(a->x_code), xs, n, f16c);
            for (int k = 0; k < n; k++) {
                const uint32_t u = f32_to_bits(cc != DT_F32 && a->x_code != cc ? round_to(cc, xs[k]) : xs[k]);
                keys[k] = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
            }
        } else {
            load_abs_delta(a->x_code, a->x, a->base_code, a->base, j0, n, xs, bs, f16c, cc);
            for (int k = 0; k < n; k++)
                keys[k] = f32_to_bits(xs[k]);
        }
        if (a->prefix < 0 && a->spare) {
            /* four interleaved counts: a run of equal keys (values cluster in a few bins) would otherwise
             * wait on each increment's store before the next one's load */
            uint32_t *SOUP_RESTRICT h1 = a->spare, *SOUP_RESTRICT h2 = h1 + 65536, *SOUP_RESTRICT h3 = h2 + 65536;
            int k = 0;
            for (; k + 4 <= n; k += 4) {
                hist[keys[k] >> 16]++;
                h1[keys[k + 1] >> 16]++;
                h2[keys[k + 2] >> 16]++;
                h3[keys[k + 3] >> 16]++;
            }
            for (; k < n; k++)
                hist[keys[k] >> 16]++;
        } else if (a->prefix < 0) {
            for (int k = 0; k < n; k++)
                hist[keys[k] >> 16]++;
        } else if (a->hist2) { /* two cuts of one tensor in one pass (breadcrumbs) */
            const uint32_t pre = (uint32_t)a->prefix, pre2 = (uint32_t)a->prefix2;
            uint32_t *SOUP_RESTRICT hist2 = a->hist2;
            for (int k = 0; k < n; k++) {
                if ((keys[k] >> 16) == pre)
                    hist[keys[k] & 0xFFFFu]++;
                if ((keys[k] >> 16) == pre2)
                    hist2[keys[k] & 0xFFFFu]++;
            }
        } else {
            const uint32_t pre = (uint32_t)a->prefix;
            for (int k = 0; k < n; k++)
                if ((keys[k] >> 16) == pre)
                    hist[keys[k] & 0xFFFFu]++;
        }
    }
    if (a->prefix < 0 && a->spare)
        for (int b = 0; b < 65536; b++)
            hist[b] += a->spare[b] + a->spare[65536 + b] + a->spare[2 * 65536 + b];
}

SOUP_BY_COMPUTE(hist, const hist_args, hist_impl)

/* ------------------------------------------------------------------------------------------------ */
/* Argument handling                                                                                */
/* ------------------------------------------------------------------------------------------------ */

/* A C-contiguous buffer of obj (writable when asked); on failure a TypeError/ValueError naming `what`. */
static int get_buffer(PyObject *obj, Py_buffer *view, const char *fn, const char *what, int writable)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_RECORDS_RO) < 0) {
        if (PyErr_ExceptionMatches(PyExc_TypeError) || PyErr_ExceptionMatches(PyExc_BufferError)) {
            PyErr_Clear();
            if (!PyObject_CheckBuffer(obj)) {
                PyErr_Format(PyExc_TypeError, "%s: %s must be a bytes-like object (buffer protocol), not %.100s",
                             fn, what, Py_TYPE(obj)->tp_name);
                return -1;
            }
            PyErr_Format(PyExc_ValueError, "%s: %s does not export a plain buffer", fn, what);
        }
        return -1;
    }
    if (!PyBuffer_IsContiguous(view, 'C')) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "%s: %s must be C-contiguous", fn, what);
        return -1;
    }
    if (writable && view->readonly) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_TypeError, "%s: %s must be writable (got a read-only buffer)", fn, what);
        return -1;
    }
    return 0;
}

static int check_dtype(long code, const char *fn, const char *what)
{
    if (code < 0 || code > 2) {
        PyErr_Format(PyExc_ValueError, "%s: %s must be 0 (float32), 1 (float16) or 2 (bfloat16), got %ld", fn, what,
                     code);
        return -1;
    }
    return 0;
}

/* The buffer holds at least `stop` elements of dtype code. */
static int check_length(const Py_buffer *view, int code, Py_ssize_t stop, const char *fn, const char *what)
{
    Py_ssize_t elems = view->len / dtype_size(code);
    if (elems < stop) {
        PyErr_Format(PyExc_ValueError, "%s: %s holds %zd %s elements (%zd bytes), fewer than stop=%zd", fn, what,
                     elems, DTYPE_NAMES[code], view->len, stop);
        return -1;
    }
    return 0;
}

/* The optional base tensor: None (base_code becomes float32, nothing held), or a buffer of at least `stop`
 * elements of base_code (held: *have is set so the caller releases it). */
static int get_base(PyObject *obj, int *code, Py_buffer *view, int *have, Py_ssize_t stop, const char *fn)
{
    if (obj == Py_None) {
        *code = DT_F32;
        return 0;
    }
    if (check_dtype(*code, fn, "base_dtype") < 0 || get_buffer(obj, view, fn, "base", 0) < 0)
        return -1;
    *have = 1;
    return check_length(view, *code, stop, fn, "base");
}

static int check_range(Py_ssize_t start, Py_ssize_t stop, const char *fn)
{
    if (start < 0 || stop < start) {
        PyErr_Format(PyExc_ValueError, "%s: need 0 <= start <= stop, got start=%zd stop=%zd", fn, start, stop);
        return -1;
    }
    return 0;
}

/* A small per-model parameter buffer of exactly n items of `itemsize` bytes, copied into dst (aligned). */
static int get_params(PyObject *obj, void *dst, Py_ssize_t n, int itemsize, const char *fn, const char *what,
                      const char *type)
{
    Py_buffer view;
    if (get_buffer(obj, &view, fn, what, 0) < 0)
        return -1;
    if (view.len != n * itemsize) {
        PyErr_Format(PyExc_ValueError, "%s: %s must hold %zd %s values (%zd bytes), got %zd bytes", fn, what, n, type,
                     n * itemsize, view.len);
        PyBuffer_Release(&view);
        return -1;
    }
    memcpy(dst, view.buf, (size_t)n * itemsize);
    PyBuffer_Release(&view);
    return 0;
}

/* The N input buffers and their dtype codes, each checked to hold `stop` elements; *n_views counts the
 * buffers acquired (the caller releases them). */
static int get_inputs(PyObject *inputs_fast, PyObject *codes_fast, Py_ssize_t N, Py_ssize_t stop, const char *fn,
                      Py_buffer *views, const unsigned char **ptrs, int *codes, Py_ssize_t *n_views)
{
    for (Py_ssize_t i = 0; i < N; i++) {
        char what[64];
        long code = PyLong_AsLong(PySequence_Fast_GET_ITEM(codes_fast, i));
        if (code == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "%s: in_dtypes[%zd] must be an int", fn, i);
            return -1;
        }
        PyOS_snprintf(what, sizeof what, "in_dtypes[%zd]", i);
        if (check_dtype(code, fn, what) < 0)
            return -1;
        codes[i] = (int)code;
        PyOS_snprintf(what, sizeof what, "inputs[%zd]", i);
        if (get_buffer(PySequence_Fast_GET_ITEM(inputs_fast, i), &views[i], fn, what, 0) < 0)
            return -1;
        *n_views = i + 1;
        if (check_length(&views[i], codes[i], stop, fn, what) < 0)
            return -1;
        ptrs[i] = views[i].buf;
    }
    return 0;
}

/* The `inputs` and `in_dtypes` sequences of a kernel over 1 to 4096 same-length inputs: each input's buffer
 * (read-only, at least `stop` values of its dtype), its pointer and its dtype code. */
typedef struct {
    PyObject *fast, *codes_fast;
    Py_buffer *views;
    const unsigned char **ptrs;
    int *codes;
    Py_ssize_t n, n_views;
} input_set;

static int open_inputs(input_set *s, PyObject *inputs_obj, PyObject *codes_obj, Py_ssize_t stop, const char *fn)
{
    memset(s, 0, sizeof *s);
    s->fast = PySequence_Fast(inputs_obj, "inputs must be a sequence of buffers");
    if (!s->fast)
        return -1;
    s->codes_fast = PySequence_Fast(codes_obj, "in_dtypes must be a sequence of ints");
    if (!s->codes_fast)
        return -1;
    s->n = PySequence_Fast_GET_SIZE(s->fast);
    if (s->n < 1 || s->n > 4096 || PySequence_Fast_GET_SIZE(s->codes_fast) != s->n) {
        PyErr_Format(PyExc_ValueError, "%s: need 1 to 4096 inputs and one dtype code each", fn);
        return -1;
    }
    s->views = PyMem_Calloc((size_t)s->n, sizeof(Py_buffer));
    s->ptrs = PyMem_Calloc((size_t)s->n, sizeof(*s->ptrs));
    s->codes = PyMem_Calloc((size_t)s->n, sizeof(int));
    if (!s->views || !s->ptrs || !s->codes) {
        PyErr_NoMemory();
        return -1;
    }
    return get_inputs(s->fast, s->codes_fast, s->n, stop, fn, s->views, s->ptrs, s->codes, &s->n_views);
}

static void close_inputs(input_set *s)
{
    for (Py_ssize_t i = 0; i < s->n_views; i++)
        PyBuffer_Release(&s->views[i]);
    PyMem_Free(s->views);
    PyMem_Free(s->ptrs);
    PyMem_Free(s->codes);
    Py_XDECREF(s->fast);
    Py_XDECREF(s->codes_fast);
}

/* A kernel without compute-dtype copies, in a generic, an AVX2 and an AVX-512 copy; name##_run picks one. */
#if SOUP_X86
#define SOUP_BY_ISA(name, args_t, impl)                                                                \
    SOUP_NOINLINE static void name##_generic(args_t *a) { impl(a, 0); }                               \
    SOUP_TARGET_AVX2 SOUP_NOINLINE static void name##_avx2(args_t *a) { impl(a, 1); }                 \
    SOUP_TARGET_AVX512 SOUP_NOINLINE static void name##_avx512(args_t *a) { impl(a, 1); }             \
    static void name##_run(args_t *a)                                                                 \
    {                                                                                                 \
        if (isa >= ISA_AVX512)                                                                        \
            name##_avx512(a);                                                                         \
        else if (isa >= ISA_AVX2)                                                                     \
            name##_avx2(a);                                                                           \
        else                                                                                          \
            name##_generic(a);                                                                        \
    }
#else
#define SOUP_BY_ISA(name, args_t, impl)                                                                \
    SOUP_NOINLINE static void name##_generic(args_t *a) { impl(a, 0); }                               \
    static void name##_run(args_t *a) { name##_generic(a); }
#endif

static int block_for(int n_models)
{
    /* the scratch of one block (2N + 4 float rows) around 12 KiB: it stays in L1 beside the streams
     * (measured: 12 KiB beat 6, 8, 16, 24 and 48 KiB on a Zen 4 core) */
    int b = 3072 / (2 * n_models + 4);
    b &= ~63;
    if (b < 64)
        b = 64;
    if (b > 1024)
        b = 1024;
    return b;
}

PyDoc_STRVAR(combine_doc,
"combine(out, out_dtype, inputs, in_dtypes, base, base_dtype, weights, row_len, start, stop, mode, lam,\n"
"        normalize, thresholds, dare_keys, keep_levels, scales, tie_quota=None, compute_dtype=0,\n"
"        upper=None, masks=None) -> int\n"
"\n"
"Write elements [start, stop) of the merge of `inputs` into `out` (float32 arithmetic, fixed order):\n"
"  d_i = x_i - base (or x_i); trimmed to 0 where |d_i| < thresholds[i]; DARE: kept (times scales[i])\n"
"  where draw(dare_keys[i], j) < keep_levels[i], else 0; mode 0 (sum): acc = sum_i d_i * w_i, divided by\n"
"  sum_i w_i when normalize (by 1 where that sum is below 1e-8 in magnitude);\n"
"  upper (float32 [N] or None): also zeroed where |d_i| > upper[i] (a two-sided trim);\n"
"  tie_quota (int64 [N] or [N][4], or None): [N]: of the entries with |d_i| == thresholds[i], keep only the\n"
"  first tie_quota[i] of the range (-1: all); [N][4]: of those tied with thresholds[i], skip the first [0] and\n"
"  keep the next [1]; of those tied with upper[i], skip [2], keep [3] ([1] == -1: all ties kept);\n"
"  masks (N byte buffers of >= stop bytes, or None; with scales, without dare_keys and keep_levels): kept\n"
"  (times scales[i]) where masks[i][j] != 0, else 0 (DELLA's drop, drawn beforehand by magprune_mask);\n"
"  mode 1 (elect): s = +1 if sum_i d_i w_i >= 0 else -1, v_i = max(d_i w_i s, 0), acc = sum_i v_i s, divided by\n"
"  the mass sum_i [v_i > 0] w_i when normalize (0 where the mass is 0); result = acc * lam + base (or acc).\n"
"compute_dtype 1 or 2: the inputs, each difference, product, sum, quotient and the result are rounded to\n"
"float16 or bfloat16 as torch does in that dtype (sums over models accumulate in float32, then round).\n"
"Dtype codes: 0 float32, 1 float16, 2 bfloat16. weights: float32 [N][R]; R == 1 one weight per model,\n"
"else element j uses row j // row_len. thresholds: float32 [N] or None; dare_keys uint64 [N], keep_levels\n"
"uint32 [N] (0..65536), scales float32 [N]: all three or none; scales with masks; or scales alone (with\n"
"thresholds): the trim's survivors times scales[i], rounded to the compute dtype.\n"
"Returns -1 when every value read was finite, else the lowest index of an input holding a NaN/Inf in the\n"
"range (N for the base), or N + 1 when the inputs were finite but a written value is not (overflow, or\n"
"a float16 output past 65504); `out` is then unspecified.");

static PyObject *py_combine(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"out", "out_dtype", "inputs", "in_dtypes", "base", "base_dtype", "weights",
                             "row_len", "start", "stop", "mode", "lam", "normalize", "thresholds",
                             "dare_keys", "keep_levels", "scales", "tie_quota", "compute_dtype", "upper",
                             "masks", NULL};
    static const char *fn = "combine";
    PyObject *out_obj, *inputs_obj, *in_dtypes_obj, *base_obj, *weights_obj, *thr_obj, *keys_obj, *levels_obj,
        *scales_obj, *quota_obj = Py_None, *upper_obj = Py_None, *masks_obj = Py_None;
    int out_code, base_code, mode, normalize, compute_code = DT_F32;
    Py_ssize_t row_len, start, stop;
    double lam;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiOOOiOnnnidpOOOO|OiOO:combine", kwlist, &out_obj, &out_code,
                                     &inputs_obj, &in_dtypes_obj, &base_obj, &base_code, &weights_obj, &row_len,
                                     &start, &stop, &mode, &lam, &normalize, &thr_obj, &keys_obj, &levels_obj,
                                     &scales_obj, &quota_obj, &compute_code, &upper_obj, &masks_obj))
        return NULL;

    PyObject *result = NULL, *inputs_fast = NULL, *codes_fast = NULL, *masks_fast = NULL;
    Py_buffer out_view, base_view, w_view;
    Py_buffer *in_views = NULL, *mask_views = NULL;
    Py_ssize_t n_masks = 0;
    const unsigned char **mask_ptrs = NULL;
    float *thr_hi = NULL;
    int have_out = 0, have_base = 0, have_w = 0;
    Py_ssize_t n_views = 0;
    const unsigned char **in_ptrs = NULL;
    int *in_codes = NULL;
    float *thr = NULL, *scales = NULL, *wcopy = NULL, *scratch = NULL;
    uint64_t *keys = NULL;
    int64_t *quota = NULL, *qleft = NULL;
    uint32_t *levels = NULL;
    uint16_t *draw_buf = NULL;
    unsigned char *bad = NULL;

    if (check_dtype(out_code, fn, "out_dtype") < 0 || check_dtype(compute_code, fn, "compute_dtype") < 0 ||
        check_range(start, stop, fn) < 0)
        return NULL;
    if (mode != MODE_SUM && mode != MODE_ELECT) {
        PyErr_Format(PyExc_ValueError, "%s: mode must be 0 (sum) or 1 (elect), got %d", fn, mode);
        return NULL;
    }
    if (row_len < 1) {
        PyErr_Format(PyExc_ValueError, "%s: row_len must be >= 1, got %zd", fn, row_len);
        return NULL;
    }

    inputs_fast = PySequence_Fast(inputs_obj, "combine: inputs must be a sequence of buffers");
    if (!inputs_fast)
        goto done;
    codes_fast = PySequence_Fast(in_dtypes_obj, "combine: in_dtypes must be a sequence of ints");
    if (!codes_fast)
        goto done;
    const Py_ssize_t N = PySequence_Fast_GET_SIZE(inputs_fast);
    if (N < 1) {
        PyErr_SetString(PyExc_ValueError, "combine: inputs must hold at least one buffer");
        goto done;
    }
    if (N > 1000000) {
        PyErr_SetString(PyExc_ValueError, "combine: too many inputs");
        goto done;
    }
    if (PySequence_Fast_GET_SIZE(codes_fast) != N) {
        PyErr_Format(PyExc_ValueError, "combine: in_dtypes has %zd codes for %zd inputs",
                     PySequence_Fast_GET_SIZE(codes_fast), N);
        goto done;
    }

    in_views = PyMem_Calloc((size_t)N, sizeof(Py_buffer));
    in_ptrs = PyMem_Calloc((size_t)N, sizeof(*in_ptrs));
    in_codes = PyMem_Calloc((size_t)N, sizeof(int));
    thr = PyMem_Calloc((size_t)N, sizeof(float));
    thr_hi = PyMem_Calloc((size_t)N, sizeof(float));
    mask_views = PyMem_Calloc((size_t)N, sizeof(Py_buffer));
    mask_ptrs = PyMem_Calloc((size_t)N, sizeof(*mask_ptrs));
    scales = PyMem_Calloc((size_t)N, sizeof(float));
    keys = PyMem_Calloc((size_t)N, sizeof(uint64_t));
    levels = PyMem_Calloc((size_t)N, sizeof(uint32_t));
    quota = PyMem_Calloc((size_t)N * 4, sizeof(int64_t));
    qleft = PyMem_Calloc((size_t)N * 4, sizeof(int64_t));
    bad = PyMem_Calloc((size_t)N + 2, 1);
    if (!in_views || !in_ptrs || !in_codes || !thr || !thr_hi || !mask_views || !mask_ptrs || !scales || !keys ||
        !levels || !quota || !qleft || !bad) {
        PyErr_NoMemory();
        goto done;
    }

    if (get_buffer(out_obj, &out_view, fn, "out", 1) < 0)
        goto done;
    have_out = 1;
    if (check_length(&out_view, out_code, stop, fn, "out") < 0)
        goto done;

    if (get_inputs(inputs_fast, codes_fast, N, stop, fn, in_views, in_ptrs, in_codes, &n_views) < 0)
        goto done;

    if (get_base(base_obj, &base_code, &base_view, &have_base, stop, fn) < 0)
        goto done;

    if (get_buffer(weights_obj, &w_view, fn, "weights", 0) < 0)
        goto done;
    have_w = 1;
    if (w_view.len % 4 != 0 || w_view.len / 4 < N || (w_view.len / 4) % N != 0) {
        PyErr_Format(PyExc_ValueError,
                     "combine: weights must be float32 [N][R] with N=%zd (a multiple of %zd values), got %zd bytes",
                     N, N, w_view.len);
        goto done;
    }
    const Py_ssize_t R = w_view.len / 4 / N;
    if (R > 1 && stop > start && (stop - 1) / row_len >= R) {
        PyErr_Format(PyExc_ValueError,
                     "combine: weights has %zd rows per model, but element %zd lies in row %zd (row_len=%zd)", R,
                     stop - 1, (stop - 1) / row_len, row_len);
        goto done;
    }
    wcopy = PyMem_Malloc((size_t)w_view.len);
    if (!wcopy) {
        PyErr_NoMemory();
        goto done;
    }
    memcpy(wcopy, w_view.buf, (size_t)w_view.len);

    int use_thr = thr_obj != Py_None;
    if (use_thr && get_params(thr_obj, thr, N, 4, fn, "thresholds", "float32") < 0)
        goto done;
    int use_quota = quota_obj != Py_None;
    if (use_quota && !use_thr) {
        PyErr_SetString(PyExc_ValueError, "combine: tie_quota needs thresholds");
        goto done;
    }
    if (use_quota) {
        Py_buffer qv;
        if (get_buffer(quota_obj, &qv, fn, "tie_quota", 0) < 0)
            goto done;
        Py_ssize_t qlen = qv.len;
        PyBuffer_Release(&qv);
        if (qlen == N * 8) { /* [N]: the first tie_quota[i] ties of the lower cut */
            if (get_params(quota_obj, qleft, N, 8, fn, "tie_quota", "int64") < 0)
                goto done;
            for (Py_ssize_t i = 0; i < N; i++) {
                quota[4 * i] = 0;
                quota[4 * i + 1] = qleft[i];
                quota[4 * i + 2] = quota[4 * i + 3] = 0;
            }
        } else if (get_params(quota_obj, quota, 4 * N, 8, fn, "tie_quota", "int64") < 0)
            goto done;
        memcpy(qleft, quota, sizeof(int64_t) * 4 * (size_t)N);
    }
    int use_upper = upper_obj != Py_None;
    if (use_upper && !use_thr) {
        PyErr_SetString(PyExc_ValueError, "combine: upper needs thresholds");
        goto done;
    }
    if (use_upper && get_params(upper_obj, thr_hi, N, 4, fn, "upper", "float32") < 0)
        goto done;
    int use_masks = masks_obj != Py_None;
    int n_dare = (keys_obj != Py_None) + (levels_obj != Py_None) + (scales_obj != Py_None);
    int scales_only = !use_masks && n_dare == 1 && scales_obj != Py_None;
    if (scales_only && !use_thr) {
        PyErr_SetString(PyExc_ValueError, "combine: scales alone rescale a trim's survivors: they need thresholds");
        goto done;
    }
    if (use_masks ? (n_dare != 1 || scales_obj == Py_None) : (n_dare != 0 && n_dare != 3 && !scales_only)) {
        PyErr_SetString(PyExc_ValueError, use_masks ? "combine: masks take scales, and no dare_keys or keep_levels"
                        : "combine: dare_keys, keep_levels and scales must all be given or all None");
        goto done;
    }
    if (scales_only && get_params(scales_obj, scales, N, 4, fn, "scales", "float32") < 0)
        goto done;
    if (use_masks) {
        masks_fast = PySequence_Fast(masks_obj, "combine: masks must be a sequence of buffers");
        if (!masks_fast)
            goto done;
        if (PySequence_Fast_GET_SIZE(masks_fast) != N) {
            PyErr_Format(PyExc_ValueError, "combine: masks has %zd buffers for %zd inputs",
                         PySequence_Fast_GET_SIZE(masks_fast), N);
            goto done;
        }
        for (Py_ssize_t i = 0; i < N; i++) {
            if (get_buffer(PySequence_Fast_GET_ITEM(masks_fast, i), &mask_views[i], fn, "masks[i]", 0) < 0)
                goto done;
            n_masks = i + 1;
            if (mask_views[i].len < stop) {
                PyErr_Format(PyExc_ValueError, "combine: masks[%zd] holds %zd bytes, fewer than stop=%zd", i,
                             mask_views[i].len, stop);
                goto done;
            }
            mask_ptrs[i] = mask_views[i].buf;
        }
        if (get_params(scales_obj, scales, N, 4, fn, "scales", "float32") < 0)
            goto done;
    }
    int use_dare = n_dare == 3;
    if (use_dare) {
        if (get_params(keys_obj, keys, N, 8, fn, "dare_keys", "uint64") < 0 ||
            get_params(levels_obj, levels, N, 4, fn, "keep_levels", "uint32") < 0 ||
            get_params(scales_obj, scales, N, 4, fn, "scales", "float32") < 0)
            goto done;
        for (Py_ssize_t i = 0; i < N; i++)
            if (levels[i] > N_LEVELS) {
                PyErr_Format(PyExc_ValueError, "combine: keep_levels[%zd] = %lu is above 65536", i,
                             (unsigned long)levels[i]);
                goto done;
            }
    }

    const int B = block_for((int)(N < 100000 ? N : 100000));
    scratch = PyMem_RawMalloc(sizeof(float) * (size_t)B * (2 * (size_t)N + 4));
    draw_buf = PyMem_RawMalloc(sizeof(uint16_t) * ((size_t)B + 8));
    if (!scratch || !draw_buf) {
        PyErr_NoMemory();
        goto done;
    }

    combine_args a;
    a.out = out_view.buf;
    a.out_code = out_code;
    a.n = (int)N;
    a.in = in_ptrs;
    a.in_code = in_codes;
    a.base = have_base ? base_view.buf : NULL;
    a.base_code = base_code;
    a.w = wcopy;
    a.R = R;
    a.row_len = row_len;
    a.start = start;
    a.stop = stop;
    a.mode = mode;
    a.lam = (float)lam;
    a.normalize = normalize;
    a.compute_code = compute_code;
    a.thr = use_thr ? thr : NULL;
    a.thr_hi = use_upper ? thr_hi : NULL;
    a.masks = use_masks ? mask_ptrs : NULL;
    a.quota = use_quota ? quota : NULL;
    a.qleft = qleft;
    a.keys = use_dare ? keys : NULL;
    a.levels = levels;
    a.scales = (use_dare || use_masks || scales_only) ? scales : NULL;
    a.block = B;
    a.scratch = scratch;
    a.draw_buf = draw_buf;
    a.bad = bad;

    if (stop > start) {
        Py_BEGIN_ALLOW_THREADS
        combine_run(&a);
        Py_END_ALLOW_THREADS
    }

    long first_bad = -1;
    for (Py_ssize_t i = 0; i <= N + 1; i++)
        if (bad[i]) {
            first_bad = (long)i;
            break;
        }
    result = PyLong_FromLong(first_bad);

done:
    if (have_out)
        PyBuffer_Release(&out_view);
    if (have_base)
        PyBuffer_Release(&base_view);
    if (have_w)
        PyBuffer_Release(&w_view);
    for (Py_ssize_t i = 0; i < n_views; i++)
        PyBuffer_Release(&in_views[i]);
    for (Py_ssize_t i = 0; i < n_masks; i++)
        PyBuffer_Release(&mask_views[i]);
    PyMem_Free(in_views);
    PyMem_Free(mask_views);
    PyMem_Free(mask_ptrs);
    PyMem_Free(in_ptrs);
    PyMem_Free(in_codes);
    PyMem_Free(thr);
    PyMem_Free(thr_hi);
    PyMem_Free(scales);
    PyMem_Free(keys);
    PyMem_Free(levels);
    PyMem_Free(quota);
    PyMem_Free(qleft);
    PyMem_Free(bad);
    PyMem_Free(wcopy);
    PyMem_RawFree(scratch);
    PyMem_RawFree(draw_buf);
    Py_XDECREF(inputs_fast);
    Py_XDECREF(codes_fast);
    Py_XDECREF(masks_fast);
    return result;
}

PyDoc_STRVAR(hist_doc,
"abs_delta_histogram(x, x_dtype, base, base_dtype, start, stop, hist, prefix, compute_dtype=0, hist2=None,\n"
"                    prefix2=0, signed=False) -> None\n"
"\n"
"Count key = bits of |x[j] - base[j]| (|x[j]| when base is None) as uint32, for j in [start, stop), into\n"
"hist (65536 uint32 counters, accumulated, not zeroed): prefix < 0 counts key >> 16; prefix >= 0 counts\n"
"key & 0xFFFF of the keys with key >> 16 == prefix. Needs stop - start < 2**32. compute_dtype 1 or 2:\n"
"x, base and their difference rounded to float16 / bfloat16 first (as combine does). hist2, prefix2 (with\n"
"prefix >= 0; a buffer like hist): the same pass also counts, into hist2, key & 0xFFFF of the keys with\n"
"key >> 16 == prefix2. signed=1 (base None): key = the bits of x[j] made monotone in its value (negative:\n"
"all bits flipped; non-negative: the sign bit set), so the histograms order signed values.");

static PyObject *py_abs_delta_histogram(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"x", "x_dtype", "base", "base_dtype", "start", "stop", "hist", "prefix", "compute_dtype",
                             "hist2", "prefix2", "signed", NULL};
    static const char *fn = "abs_delta_histogram";
    PyObject *x_obj, *base_obj, *hist_obj, *hist2_obj = Py_None;
    int x_code, base_code, compute_code = DT_F32;
    Py_ssize_t start, stop;
    long prefix, prefix2 = 0;
    int sign = 0;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiOinnOl|iOlp:abs_delta_histogram", kwlist, &x_obj, &x_code,
                                     &base_obj, &base_code, &start, &stop, &hist_obj, &prefix, &compute_code,
                                     &hist2_obj, &prefix2, &sign))
        return NULL;
    if (sign && base_obj != Py_None) {
        PyErr_Format(PyExc_ValueError, "%s: signed keys are of x alone: base must be None", fn);
        return NULL;
    }
    if (hist2_obj != Py_None && (prefix < 0 || prefix2 < 0 || prefix2 > 0xFFFF)) {
        PyErr_Format(PyExc_ValueError, "%s: hist2 needs prefix and prefix2 in [0, 65535], got %ld and %ld", fn, prefix,
                     prefix2);
        return NULL;
    }
    if (check_dtype(x_code, fn, "x_dtype") < 0 || check_dtype(compute_code, fn, "compute_dtype") < 0 || check_range(start, stop, fn) < 0)
        return NULL;
    if ((uint64_t)(stop - start) >= ((uint64_t)1 << 32)) {
        PyErr_Format(PyExc_ValueError, "%s: the range must hold fewer than 2**32 elements, got %zd", fn,
                     stop - start);
        return NULL;
    }
    if (prefix > 0xFFFF) {
        PyErr_Format(PyExc_ValueError, "%s: prefix must be < 0 or in [0, 65535], got %ld", fn, prefix);
        return NULL;
    }

    PyObject *result = NULL;
    Py_buffer x_view, base_view, hist_view, hist2_view;
    int have_x = 0, have_base = 0, have_hist = 0, have_hist2 = 0;
    float *scratch = NULL;
    uint32_t *keys = NULL, *local = NULL, *local2 = NULL, *spare = NULL;

    if (get_buffer(x_obj, &x_view, fn, "x", 0) < 0)
        goto done;
    have_x = 1;
    if (check_length(&x_view, x_code, stop, fn, "x") < 0)
        goto done;
    if (get_base(base_obj, &base_code, &base_view, &have_base, stop, fn) < 0)
        goto done;
    if (get_buffer(hist_obj, &hist_view, fn, "hist", 1) < 0)
        goto done;
    have_hist = 1;
    if (hist_view.len != 65536 * 4) {
        PyErr_Format(PyExc_ValueError, "%s: hist must hold 65536 uint32 counters (262144 bytes), got %zd bytes", fn,
                     hist_view.len);
        goto done;
    }

    if (hist2_obj != Py_None) {
        if (get_buffer(hist2_obj, &hist2_view, fn, "hist2", 1) < 0)
            goto done;
        have_hist2 = 1;
        if (hist2_view.len != 65536 * 4) {
            PyErr_Format(PyExc_ValueError, "%s: hist2 must hold 65536 uint32 counters (262144 bytes), got %zd bytes",
                         fn, hist2_view.len);
            goto done;
        }
    }

    const int B = 1024;
    scratch = PyMem_RawMalloc(sizeof(float) * 2 * B);
    keys = PyMem_RawMalloc(sizeof(uint32_t) * B);
    int aligned = ((uintptr_t)hist_view.buf % sizeof(uint32_t)) == 0 &&
                  (!have_hist2 || ((uintptr_t)hist2_view.buf % sizeof(uint32_t)) == 0);
    if (!aligned) {
        local = PyMem_RawCalloc(65536, sizeof(uint32_t));
        local2 = PyMem_RawCalloc(65536, sizeof(uint32_t));
    }
    /* the interleaved counts pay for their zeroing and summing (3 x 65536 bins) from about 2^18 entries */
    const int interleave = prefix < 0 && stop - start >= ((Py_ssize_t)1 << 18);
    if (interleave)
        spare = PyMem_RawCalloc(3 * 65536, sizeof(uint32_t));
    if (!scratch || !keys || (!aligned && (!local || !local2)) || (interleave && !spare)) {
        PyErr_NoMemory();
        goto done;
    }

    hist_args a;
    a.x = x_view.buf;
    a.x_code = x_code;
    a.base = have_base ? base_view.buf : NULL;
    a.base_code = base_code;
    a.start = start;
    a.stop = stop;
    a.hist = aligned ? (uint32_t *)hist_view.buf : local;
    a.prefix = prefix;
    a.hist2 = have_hist2 ? (aligned ? (uint32_t *)hist2_view.buf : local2) : NULL;
    a.prefix2 = prefix2;
    a.compute_code = compute_code;
    a.block = B;
    a.scratch = scratch;
    a.keys = keys;
    a.sign = sign;
    a.spare = spare;

    if (stop > start) {
        Py_BEGIN_ALLOW_THREADS
        hist_run(&a);
        if (!aligned)
            for (int which = 0; which < 1 + have_hist2; which++) {
                unsigned char *h = which ? hist2_view.buf : hist_view.buf;
                const uint32_t *l = which ? local2 : local;
                for (size_t i = 0; i < 65536; i++) {
                    uint32_t c;
                    memcpy(&c, h + 4 * i, 4);
                    c += l[i];
                    memcpy(h + 4 * i, &c, 4);
                }
            }
        Py_END_ALLOW_THREADS
    }
    result = Py_NewRef(Py_None);

done:
    if (have_x)
        PyBuffer_Release(&x_view);
    if (have_base)
        PyBuffer_Release(&base_view);
    if (have_hist)
        PyBuffer_Release(&hist_view);
    if (have_hist2)
        PyBuffer_Release(&hist2_view);
    PyMem_RawFree(scratch);
    PyMem_RawFree(keys);
    PyMem_RawFree(local);
    PyMem_RawFree(spare);
    PyMem_RawFree(local2);
    return result;
}

/* A DARE draw key: a Python int in [0, 2**64). */
static int get_key(PyObject *obj, unsigned long long *key, const char *fn)
{
    if (!PyLong_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s: key must be an int, not %.100s", fn, Py_TYPE(obj)->tp_name);
        return -1;
    }
    *key = PyLong_AsUnsignedLongLong(obj);
    if (*key == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        PyErr_Format(PyExc_ValueError, "%s: key must be in [0, 2**64)", fn);
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(draws_doc,
"dare_draws(key, start, stop, out) -> None\n"
"\n"
"Write the DARE draws of elements [start, stop) under `key` (an int in [0, 2**64)) into out, a writable\n"
"uint16 buffer of at least stop - start values (out[0] is element start's draw). Draw j is bits\n"
"16 * (j % 4) .. +15 of SplitMix64's output for the state key + (j // 4 + 1) * 0x9E3779B97F4A7C15.");

static PyObject *py_dare_draws(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"key", "start", "stop", "out", NULL};
    static const char *fn = "dare_draws";
    PyObject *key_obj, *out_obj;
    Py_ssize_t start, stop;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OnnO:dare_draws", kwlist, &key_obj, &start, &stop, &out_obj))
        return NULL;
    unsigned long long key;
    if (get_key(key_obj, &key, fn) < 0)
        return NULL;
    if (check_range(start, stop, fn) < 0)
        return NULL;
    Py_buffer view;
    if (get_buffer(out_obj, &view, fn, "out", 1) < 0)
        return NULL;
    if (view.len / 2 < stop - start) {
        PyErr_Format(PyExc_ValueError, "%s: out holds %zd uint16 values, fewer than stop - start = %zd", fn,
                     view.len / 2, stop - start);
        PyBuffer_Release(&view);
        return NULL;
    }
    const int B = 1024;
    uint16_t *buf = PyMem_RawMalloc(sizeof(uint16_t) * (B + 8));
    if (!buf) {
        PyBuffer_Release(&view);
        return PyErr_NoMemory();
    }
    unsigned char *dst = view.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t j0 = start; j0 < stop; j0 += B) {
        int n = (int)(stop - j0 < B ? stop - j0 : B);
        const uint16_t *r = gen_draws((uint64_t)key, (uint64_t)j0, n, buf);
        memcpy(dst + 2 * (size_t)(j0 - start), r, 2 * (size_t)n);
    }
    Py_END_ALLOW_THREADS
    PyMem_RawFree(buf);
    PyBuffer_Release(&view);
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------------ */
/* dare_abs_sums: the two L1 norms of DARE's norm-keeping rescale                                    */
/* ------------------------------------------------------------------------------------------------ */

typedef struct {
    const unsigned char *x;
    int x_code;
    const unsigned char *base;
    int base_code;
    Py_ssize_t start, stop;
    uint64_t key;
    uint32_t level;
    float lower, upper; /* kept only where lower < |d| < upper too (breadcrumbs' window, ties left out) */
    int compute_code;
    float *scratch;  /* 2 * 1024 floats */
    uint16_t *draws; /* 1024 + 8 */
    double all, kept;
} sums_args;

SOUP_INLINE void sums_impl(sums_args *a, int f16c, const int cc)
{
    const int B = 1024;
    float *SOUP_RESTRICT xs = a->scratch;
    float *SOUP_RESTRICT bs = xs + B;
    double all = 0.0, kept = 0.0;
    for (Py_ssize_t j0 = a->start; j0 < a->stop; j0 += B) {
        const int n = (int)(a->stop - j0 < B ? a->stop - j0 : B);
        load_abs_delta(a->x_code, a->x, a->base_code, a->base, j0, n, xs, bs, f16c, cc);
        const float lower = a->lower, upper = a->upper;
        if (a->level >= N_LEVELS) /* no draws: every entry inside the window */
            for (int k = 0; k < n; k++) {
                all += (double)xs[k];
                kept += (double)keep_if(xs[k] > lower && xs[k] < upper, xs[k]);
            }
        else {
            const uint16_t *SOUP_RESTRICT r = gen_draws(a->key, (uint64_t)j0, n, a->draws);
            for (int k = 0; k < n; k++) { /* float64 sums: any split of the tensor gives the same norms */
                all += (double)xs[k];
                kept += (double)keep_if((uint32_t)r[k] < a->level && xs[k] > lower && xs[k] < upper, xs[k]);
            }
        }
    }
    a->all = all;
    a->kept = kept;
}

SOUP_BY_COMPUTE(sums, sums_args, sums_impl)

PyDoc_STRVAR(sums_doc,
"dare_abs_sums(x, x_dtype, base, base_dtype, start, stop, key, keep_level, compute_dtype=0, lower=-1.0,\n"
"              upper=inf) -> (float, float)\n"
"\n"
"Over j in [start, stop), with d_j = x[j] - base[j] (x[j] when base is None) in float32: the sum of |d_j|\n"
"and the sum of |d_j| over the entries DARE keeps (dare_draws(key, j) < keep_level; 65536: all) that lie\n"
"strictly inside (lower, upper), in float64.");

static PyObject *py_dare_abs_sums(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"x", "x_dtype", "base", "base_dtype", "start", "stop", "key", "keep_level",
                             "compute_dtype", "lower", "upper", NULL};
    static const char *fn = "dare_abs_sums";
    PyObject *x_obj, *base_obj, *key_obj;
    int x_code, base_code, compute_code = DT_F32;
    Py_ssize_t start, stop;
    unsigned long level;
    double lower = -1.0, upper = INFINITY;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiOinnOk|idd:dare_abs_sums", kwlist, &x_obj, &x_code, &base_obj,
                                     &base_code, &start, &stop, &key_obj, &level, &compute_code, &lower, &upper))
        return NULL;
    if (check_dtype(x_code, fn, "x_dtype") < 0 || check_dtype(compute_code, fn, "compute_dtype") < 0 || check_range(start, stop, fn) < 0)
        return NULL;
    unsigned long long key;
    if (get_key(key_obj, &key, fn) < 0)
        return NULL;
    if (level > N_LEVELS) {
        PyErr_Format(PyExc_ValueError, "%s: keep_level = %lu is above 65536", fn, level);
        return NULL;
    }
    PyObject *result = NULL;
    Py_buffer x_view, base_view;
    int have_x = 0, have_base = 0;
    float *scratch = NULL;
    uint16_t *draws = NULL;
    if (get_buffer(x_obj, &x_view, fn, "x", 0) < 0)
        goto done;
    have_x = 1;
    if (check_length(&x_view, x_code, stop, fn, "x") < 0)
        goto done;
    if (get_base(base_obj, &base_code, &base_view, &have_base, stop, fn) < 0)
        goto done;
    scratch = PyMem_RawMalloc(sizeof(float) * 2 * 1024);
    draws = PyMem_RawMalloc(sizeof(uint16_t) * (1024 + 8));
    if (!scratch || !draws) {
        PyErr_NoMemory();
        goto done;
    }
    sums_args a;
    a.x = x_view.buf;
    a.x_code = x_code;
    a.base = have_base ? base_view.buf : NULL;
    a.base_code = base_code;
    a.start = start;
    a.stop = stop;
    a.key = (uint64_t)key;
    a.level = (uint32_t)level;
    a.lower = (float)lower;
    a.upper = (float)upper;
    a.compute_code = compute_code;
    a.scratch = scratch;
    a.draws = draws;
    a.all = a.kept = 0.0;
    Py_BEGIN_ALLOW_THREADS
    sums_run(&a);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(dd)", a.all, a.kept);
done:
    if (have_x)
        PyBuffer_Release(&x_view);
    if (have_base)
        PyBuffer_Release(&base_view);
    PyMem_RawFree(scratch);
    PyMem_RawFree(draws);
    return result;
}

/* ------------------------------------------------------------------------------------------------ */
/* magprune_mask: DELLA's drop, by magnitude rank within each row                                    */
/* ------------------------------------------------------------------------------------------------ */

typedef struct {
    const unsigned char *x;
    int x_code;
    const unsigned char *base;
    int base_code;
    Py_ssize_t m, inner;            /* row length; distance between a row's entries, in elements */
    Py_ssize_t row_start, row_stop; /* rows numbered outer * inner + c */
    const uint32_t *levels;         /* [m]: the keep level of ascending rank r */
    uint64_t key;
    unsigned char *mask; /* the whole tensor's mask */
    int compute_code;
    float *mag;                              /* m */
    uint32_t *keys, *idx, *tkeys, *tidx, *lev; /* m each */
    float *bs;                               /* 1024 */
    uint16_t *draws;                         /* 1024 + 8 */
    double all, kept;
} prune_args;

SOUP_INLINE void prune_impl(prune_args *a, int f16c, const int cc)
{
    const Py_ssize_t m = a->m, inner = a->inner;
    float *SOUP_RESTRICT mag = a->mag;
    uint32_t *SOUP_RESTRICT lev = a->lev;
    double all = 0.0, kept = 0.0;
    for (Py_ssize_t row = a->row_start; row < a->row_stop; row++) {
        const Py_ssize_t j0 = (row / inner) * m * inner + row % inner; /* the row's entry 0 */
        if (inner == 1)
            for (Py_ssize_t k0 = 0; k0 < m; k0 += 1024) {
                const int n = (int)(m - k0 < 1024 ? m - k0 : 1024);
                load_abs_delta(a->x_code, a->x, a->base_code, a->base, j0 + k0, n, mag + k0, a->bs, f16c, cc);
            }
        else
            for (Py_ssize_t r = 0; r < m; r++)
                load_abs_delta(a->x_code, a->x, a->base_code, a->base, j0 + r * inner, 1, mag + r, a->bs, f16c, cc);

        /* ranks: a stable LSD radix sort of the magnitudes' bits (non-negative floats order as their
           bits), a byte at a time; a byte every entry shares is skipped (bf16 values' low two bytes) */
        uint32_t count[4][256];
        memset(count, 0, sizeof count);
        for (Py_ssize_t r = 0; r < m; r++) {
            const uint32_t k = f32_to_bits(mag[r]);
            a->keys[r] = k;
            a->idx[r] = (uint32_t)r;
            count[0][k & 255]++;
            count[1][(k >> 8) & 255]++;
            count[2][(k >> 16) & 255]++;
            count[3][k >> 24]++;
        }
        uint32_t *src_k = a->keys, *src_i = a->idx, *dst_k = a->tkeys, *dst_i = a->tidx;
        for (int pass = 0; pass < 4; pass++) {
            const int shift = 8 * pass;
            if (count[pass][(src_k[0] >> shift) & 255] == (uint32_t)m)
                continue;
            uint32_t offset[256], total = 0;
            for (int b = 0; b < 256; b++) {
                offset[b] = total;
                total += count[pass][b];
            }
            for (Py_ssize_t r = 0; r < m; r++) {
                const uint32_t o = offset[(src_k[r] >> shift) & 255]++;
                dst_k[o] = src_k[r];
                dst_i[o] = src_i[r];
            }
            uint32_t *t = src_k;
            src_k = dst_k;
            dst_k = t;
            t = src_i;
            src_i = dst_i;
            dst_i = t;
        }
        for (Py_ssize_t r = 0; r < m; r++) /* the entry of ascending rank r (ties: lower index first) */
            lev[src_i[r]] = a->levels[r];

        if (inner == 1)
            for (Py_ssize_t k0 = 0; k0 < m; k0 += 1024) {
                const int n = (int)(m - k0 < 1024 ? m - k0 : 1024);
                const uint16_t *SOUP_RESTRICT r = gen_draws(a->key, (uint64_t)(j0 + k0), n, a->draws);
                unsigned char *SOUP_RESTRICT out = a->mask + j0 + k0;
                for (int k = 0; k < n; k++) {
                    const int keep = (uint32_t)r[k] < lev[k0 + k];
                    out[k] = (unsigned char)keep;
                    all += (double)mag[k0 + k];
                    kept += (double)keep_if(keep, mag[k0 + k]);
                }
            }
        else
            for (Py_ssize_t r = 0; r < m; r++) {
                const uint64_t j = (uint64_t)(j0 + r * inner);
                const int keep = (uint32_t)gen_draws(a->key, j, 1, a->draws)[0] < lev[r];
                a->mask[j] = (unsigned char)keep;
                all += (double)mag[r];
                kept += (double)keep_if(keep, mag[r]);
            }
    }
    a->all = all;
    a->kept = kept;
}

SOUP_BY_COMPUTE(prune, prune_args, prune_impl)

PyDoc_STRVAR(prune_doc,
"magprune_mask(x, x_dtype, base, base_dtype, row_len, inner, row_start, row_stop, levels, key, mask,\n"
"              compute_dtype=0) -> (float, float)\n"
"\n"
"DELLA's drop for rows [row_start, row_stop) of a tensor viewed as [outer, row_len, inner] (row\n"
"outer * inner + c holds the entries outer * row_len * inner + r * inner + c, r < row_len): rank each row's\n"
"|d| = |x - base| (|x| when base is None; rounded to the compute dtype as combine does) ascending, ties in\n"
"index order, and write mask[j] = 1 where dare_draws(key, j) < levels[rank of j] (levels: uint32\n"
"[row_len], each <= 65536), else 0. Returns the float64 sums of |d| and of the kept |d| over those rows.");

static PyObject *py_magprune_mask(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"x", "x_dtype", "base", "base_dtype", "row_len", "inner", "row_start", "row_stop",
                             "levels", "key", "mask", "compute_dtype", NULL};
    static const char *fn = "magprune_mask";
    PyObject *x_obj, *base_obj, *levels_obj, *key_obj, *mask_obj;
    int x_code, base_code, compute_code = DT_F32;
    Py_ssize_t m, inner, row_start, row_stop;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiOinnnnOOO|i:magprune_mask", kwlist, &x_obj, &x_code, &base_obj,
                                     &base_code, &m, &inner, &row_start, &row_stop, &levels_obj, &key_obj, &mask_obj,
                                     &compute_code))
        return NULL;
    if (check_dtype(x_code, fn, "x_dtype") < 0 || check_dtype(compute_code, fn, "compute_dtype") < 0 ||
        check_range(row_start, row_stop, fn) < 0)
        return NULL;
    if (m < 1 || inner < 1 || m >= ((Py_ssize_t)1 << 31)) {
        PyErr_Format(PyExc_ValueError, "%s: need 1 <= row_len < 2**31 and inner >= 1, got %zd and %zd", fn, m, inner);
        return NULL;
    }
    unsigned long long key;
    if (get_key(key_obj, &key, fn) < 0)
        return NULL;
    const Py_ssize_t need = row_stop > 0 ? ((row_stop - 1) / inner + 1) * m * inner : 0;
    PyObject *result = NULL;
    Py_buffer x_view, base_view, mask_view;
    int have_x = 0, have_base = 0, have_mask = 0;
    uint32_t *levels = NULL, *work = NULL;
    float *fwork = NULL;
    uint16_t *draws = NULL;
    if (get_buffer(x_obj, &x_view, fn, "x", 0) < 0)
        goto done;
    have_x = 1;
    if (check_length(&x_view, x_code, need, fn, "x") < 0)
        goto done;
    if (get_base(base_obj, &base_code, &base_view, &have_base, need, fn) < 0)
        goto done;
    if (get_buffer(mask_obj, &mask_view, fn, "mask", 1) < 0)
        goto done;
    have_mask = 1;
    if (mask_view.len < need) {
        PyErr_Format(PyExc_ValueError, "%s: mask holds %zd bytes, fewer than the %zd these rows reach", fn,
                     mask_view.len, need);
        goto done;
    }
    levels = PyMem_RawMalloc(sizeof(uint32_t) * (size_t)m);
    work = PyMem_RawMalloc(sizeof(uint32_t) * 5 * (size_t)m);
    fwork = PyMem_RawMalloc(sizeof(float) * ((size_t)m + 1024));
    draws = PyMem_RawMalloc(sizeof(uint16_t) * (1024 + 8));
    if (!levels || !work || !fwork || !draws) {
        PyErr_NoMemory();
        goto done;
    }
    if (get_params(levels_obj, levels, m, 4, fn, "levels", "uint32") < 0)
        goto done;
    for (Py_ssize_t r = 0; r < m; r++)
        if (levels[r] > N_LEVELS) {
            PyErr_Format(PyExc_ValueError, "%s: levels[%zd] = %lu is above 65536", fn, r, (unsigned long)levels[r]);
            goto done;
        }
    prune_args a;
    a.x = x_view.buf;
    a.x_code = x_code;
    a.base = have_base ? base_view.buf : NULL;
    a.base_code = base_code;
    a.m = m;
    a.inner = inner;
    a.row_start = row_start;
    a.row_stop = row_stop;
    a.levels = levels;
    a.key = (uint64_t)key;
    a.mask = mask_view.buf;
    a.compute_code = compute_code;
    a.mag = fwork;
    a.bs = fwork + m;
    a.keys = work;
    a.idx = work + m;
    a.tkeys = work + 2 * m;
    a.tidx = work + 3 * m;
    a.lev = work + 4 * m;
    a.draws = draws;
    a.all = a.kept = 0.0;
    Py_BEGIN_ALLOW_THREADS
    prune_run(&a);
    Py_END_ALLOW_THREADS
    result = Py_BuildValue("(dd)", a.all, a.kept);
done:
    if (have_x)
        PyBuffer_Release(&x_view);
    if (have_base)
        PyBuffer_Release(&base_view);
    if (have_mask)
        PyBuffer_Release(&mask_view);
    PyMem_RawFree(levels);
    PyMem_RawFree(work);
    PyMem_RawFree(fwork);
    PyMem_RawFree(draws);
    return result;
}

/* ------------------------------------------------------------------------------------------------ */
/* gram: the Gram matrix of the (task-vector) inputs, for SLERP and the other angle-based methods     */
/* ------------------------------------------------------------------------------------------------ */

typedef struct {
    int n;
    const unsigned char **in;
    const int *in_code;
    const unsigned char *base;
    int base_code;
    Py_ssize_t start, stop;
    float *scratch; /* (n + 1) * 512 floats */
    double *g;      /* n * n */
} gram_args;

#if defined(__GNUC__) || defined(__clang__)
typedef double soup_v4d __attribute__((vector_size(32)));
#endif

/* sum_k x[k] y[k] in float64 (y == NULL: sum_k x[k]): 32 interleaved partial sums (lane l takes k = l mod 32),
 * so that it vectorizes and four chains of additions are in flight instead of waiting on one (1.2x on a
 * Program's three sums), folded to 8 lanes, which then take the last multiples of 8, and added in a fixed
 * order; the last n mod 8 terms one by one. Every copy (vector or portable) adds in this order. */
#define DOT_TERM(k) (y ? (double)x[k] * (double)y[k] : (double)x[k])
SOUP_INLINE double dot_sum(const float *SOUP_RESTRICT x, const float *SOUP_RESTRICT y, int n)
{
    int k = 0;
#if defined(__GNUC__) || defined(__clang__)
    soup_v4d acc[8] = {{0.0}}; /* acc[q]: lanes 4q .. 4q + 3 */
    for (; k + 32 <= n; k += 32)
        for (int q = 0; q < 8; q++) {
            const int j = k + 4 * q;
            soup_v4d a = {x[j], x[j + 1], x[j + 2], x[j + 3]};
            if (y) {
                soup_v4d c = {y[j], y[j + 1], y[j + 2], y[j + 3]};
                a *= c;
            }
            acc[q] += a;
        }
    soup_v4d lo = (acc[0] + acc[2]) + (acc[4] + acc[6]), hi = (acc[1] + acc[3]) + (acc[5] + acc[7]);
    for (; k + 8 <= n; k += 8) {
        soup_v4d a = {x[k], x[k + 1], x[k + 2], x[k + 3]}, b = {x[k + 4], x[k + 5], x[k + 6], x[k + 7]};
        if (y) {
            soup_v4d c = {y[k], y[k + 1], y[k + 2], y[k + 3]}, d = {y[k + 4], y[k + 5], y[k + 6], y[k + 7]};
            a *= c;
            b *= d;
        }
        lo += a;
        hi += b;
    }
    double lane[8] = {lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]};
#else
    double wide[32] = {0.0};
    for (; k + 32 <= n; k += 32)
        for (int l = 0; l < 32; l++)
            wide[l] += DOT_TERM(k + l);
    double lane[8];
    for (int l = 0; l < 8; l++)
        lane[l] = (wide[l] + wide[l + 8]) + (wide[l + 16] + wide[l + 24]);
    for (; k + 8 <= n; k += 8)
        for (int l = 0; l < 8; l++)
            lane[l] += DOT_TERM(k + l);
#endif
    double s = ((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]));
    for (; k < n; k++)
        s += DOT_TERM(k);
    return s;
}
#undef DOT_TERM

SOUP_INLINE void gram_impl(gram_args *a, int f16c)
{
    const int N = a->n, B = 512;
    float *bb = a->scratch, *dd = a->scratch + B;
    const int bsz = dtype_size(a->base_code);
    for (Py_ssize_t j0 = a->start; j0 < a->stop; j0 += B) {
        const int n = (int)(a->stop - j0 < B ? a->stop - j0 : B);
        if (a->base)
            load_block(a->base_code, a->base + (size_t)j0 * bsz, bb, n, f16c);
        for (int i = 0; i < N; i++) {
            float *SOUP_RESTRICT d = dd + (size_t)i * B;
            load_block(a->in_code[i], a->in[i] + (size_t)j0 * dtype_size(a->in_code[i]), d, n, f16c);
            if (a->base)
                for (int k = 0; k < n; k++)
                    d[k] = d[k] - bb[k];
        }
        for (int i = 0; i < N; i++)
            for (int j = i; j < N; j++) {
                const float *SOUP_RESTRICT x = dd + (size_t)i * B, *SOUP_RESTRICT y = dd + (size_t)j * B;
                /* float64 products (exact) and sums: any split gives the same matrix to ~1e-16 */
                a->g[i * N + j] += dot_sum(x, y, n);
            }
    }
}

SOUP_BY_ISA(gram, gram_args, gram_impl)

PyDoc_STRVAR(gram_doc,
"gram(inputs, in_dtypes, base, base_dtype, start, stop) -> tuple\n"
"\n"
"G[i][j] = sum over j in [start, stop) of d_i * d_j, d_i = inputs[i] - base (inputs[i] when base is None)\n"
"in float32, the products and sums in float64; returned row by row as N*N floats (symmetric).");

static PyObject *py_gram(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"inputs", "in_dtypes", "base", "base_dtype", "start", "stop", NULL};
    static const char *fn = "gram";
    PyObject *inputs_obj, *codes_obj, *base_obj;
    int base_code;
    Py_ssize_t start, stop;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOinn:gram", kwlist, &inputs_obj, &codes_obj, &base_obj,
                                     &base_code, &start, &stop))
        return NULL;
    if (check_range(start, stop, fn) < 0)
        return NULL;
    PyObject *result = NULL;
    input_set in;
    Py_buffer base_view;
    int have_base = 0;
    float *scratch = NULL;
    double *g = NULL;
    if (open_inputs(&in, inputs_obj, codes_obj, stop, fn) < 0)
        goto done;
    const Py_ssize_t N = in.n;
    g = PyMem_Calloc((size_t)N * (size_t)N, sizeof(double));
    scratch = PyMem_RawMalloc(sizeof(float) * 512 * ((size_t)N + 1));
    if (!g || !scratch) {
        PyErr_NoMemory();
        goto done;
    }
    if (get_base(base_obj, &base_code, &base_view, &have_base, stop, fn) < 0)
        goto done;
    gram_args a;
    a.n = (int)N;
    a.in = in.ptrs;
    a.in_code = in.codes;
    a.base = have_base ? base_view.buf : NULL;
    a.base_code = base_code;
    a.start = start;
    a.stop = stop;
    a.scratch = scratch;
    a.g = g;
    Py_BEGIN_ALLOW_THREADS
    gram_run(&a);
    Py_END_ALLOW_THREADS
    result = PyTuple_New(N * N);
    if (!result)
        goto done;
    for (Py_ssize_t i = 0; i < N; i++)
        for (Py_ssize_t j = 0; j < N; j++) {
            double v = j >= i ? g[i * N + j] : g[j * N + i];
            PyTuple_SET_ITEM(result, i * N + j, PyFloat_FromDouble(v));
        }
done:
    close_inputs(&in);
    if (have_base)
        PyBuffer_Release(&base_view);
    PyMem_Free(g);
    PyMem_RawFree(scratch);
    return result;
}

/* ------------------------------------------------------------------------------------------------ */
/* The population variance across inputs (SCE's selection): torch.var(stacked, dim=0, unbiased=False)     */
/* ------------------------------------------------------------------------------------------------ */

typedef struct {
    int n;
    const unsigned char **in;
    const int *in_code;
    unsigned char *out;
    int out_code;
    Py_ssize_t start, stop;
    float *scratch; /* VAR_BLOCK floats */
    double *acc;    /* 2 * VAR_BLOCK doubles: mean, m2 */
} variance_args;

#define VAR_BLOCK 1024

/* torch's Welford update in float64 (WelfordOps: delta = x - mean, mean += delta / k, m2 += delta (x - mean)),
 * m2 / N converted to float32 and then to the output dtype, as torch's copy from float64 converts. */
SOUP_INLINE void variance_impl(variance_args *a, int f16c)
{
    float *SOUP_RESTRICT xs = a->scratch;
    double *SOUP_RESTRICT mean = a->acc, *SOUP_RESTRICT m2 = a->acc + VAR_BLOCK;
    const int osz = dtype_size(a->out_code);
    for (Py_ssize_t j0 = a->start; j0 < a->stop; j0 += VAR_BLOCK) {
        const int n = (int)(a->stop - j0 < VAR_BLOCK ? a->stop - j0 : VAR_BLOCK);
        for (int k = 0; k < n; k++)
            mean[k] = m2[k] = 0.0;
        for (int i = 0; i < a->n; i++) {
            const int code = a->in_code[i];
            load_block(code, a->in[i] + (size_t)j0 * dtype_size(code), xs, n, f16c);
            const double count = (double)(i + 1);
            for (int k = 0; k < n; k++) {
                const double x = (double)xs[k], delta = x - mean[k];
                mean[k] += delta / count;
                m2[k] += delta * (x - mean[k]);
            }
        }
        const double total = (double)a->n;
        for (int k = 0; k < n; k++)
            xs[k] = (float)(m2[k] / total);
        store_block(a->out_code, xs, a->out + (size_t)j0 * osz, n, f16c);
    }
}

SOUP_BY_ISA(variance, variance_args, variance_impl)

PyDoc_STRVAR(variance_doc,
"variance(out, out_dtype, inputs, in_dtypes, start, stop) -> None\n"
"\n"
"out[j] = the population variance of inputs[0][j] .. inputs[N-1][j] for j in [start, stop), as\n"
"torch.var(stacked, dim=0, unbiased=False) computes it: Welford's update in float64, m2 / N converted to\n"
"float32 and then to out_dtype (round to nearest even).");

static PyObject *py_variance(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"out", "out_dtype", "inputs", "in_dtypes", "start", "stop", NULL};
    static const char *fn = "variance";
    PyObject *out_obj, *inputs_obj, *codes_obj;
    int out_code;
    Py_ssize_t start, stop;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiOOnn:variance", kwlist, &out_obj, &out_code, &inputs_obj,
                                     &codes_obj, &start, &stop))
        return NULL;
    if (check_range(start, stop, fn) < 0 || check_dtype(out_code, fn, "out_dtype") < 0)
        return NULL;
    PyObject *result = NULL;
    input_set in;
    Py_buffer out_view;
    int have_out = 0;
    float *scratch = PyMem_RawMalloc(sizeof(float) * VAR_BLOCK);
    double *acc = PyMem_RawMalloc(sizeof(double) * 2 * VAR_BLOCK);
    if (open_inputs(&in, inputs_obj, codes_obj, stop, fn) < 0)
        goto done;
    if (!scratch || !acc) {
        PyErr_NoMemory();
        goto done;
    }
    if (get_buffer(out_obj, &out_view, fn, "out", 1) < 0)
        goto done;
    have_out = 1;
    if (check_length(&out_view, out_code, stop, fn, "out") < 0)
        goto done;
    variance_args a = {(int)in.n, in.ptrs, in.codes, out_view.buf, out_code, start, stop, scratch, acc};
    Py_BEGIN_ALLOW_THREADS
    variance_run(&a);
    Py_END_ALLOW_THREADS
    result = Py_NewRef(Py_None);
done:
    close_inputs(&in);
    if (have_out)
        PyBuffer_Release(&out_view);
    PyMem_RawFree(scratch);
    PyMem_RawFree(acc);
    return result;
}

/* ------------------------------------------------------------------------------------------------ */
/* The k largest of n values, as torch.topk chooses them on the CPU (SCE's selection)                 */
/* ------------------------------------------------------------------------------------------------ */
/* torch's CPU topk pairs each value with its index and, with "larger first" as the order, runs libstdc++'s
 * std::nth_element for k * 64 > n (introselect: a median-of-three quicksort partition, a heap selection past
 * a depth of 2 log2 n, an insertion sort below four elements) or std::partial_sort otherwise (a heap
 * selection, then a sort of the k kept, which does not change which they are); it takes the first k pairs.
 * Which entries tied with the k-th it keeps follows from that algorithm's exact sequence of comparisons
 * and swaps, so this is the same algorithm, step for step, on (value key << 32 | index) words: the same
 * comparisons (of the keys alone) give the same swaps and the same kept set. mergekit's SCE keeps torch's
 * choice, and so must souplm to give its results on ties (there are thousands of them at a bfloat16 cut). */

typedef uint64_t sel_t;
#define SEL_BEFORE(x, y) (((x) >> 32) > ((y) >> 32)) /* torch's comparator for `largest`: x.value > y.value */

static void sel_swap(sel_t *a, sel_t *b)
{
    sel_t t = *a;
    *a = *b;
    *b = t;
}

static void sel_push_heap(sel_t *first, Py_ssize_t hole, Py_ssize_t top, sel_t value)
{
    Py_ssize_t parent = (hole - 1) / 2;
    while (hole > top && SEL_BEFORE(first[parent], value)) {
        first[hole] = first[parent];
        hole = parent;
        parent = (hole - 1) / 2;
    }
    first[hole] = value;
}

static void sel_adjust_heap(sel_t *first, Py_ssize_t hole, Py_ssize_t len, sel_t value)
{
    const Py_ssize_t top = hole;
    Py_ssize_t child = hole;
    while (child < (len - 1) / 2) {
        child = 2 * (child + 1);
        if (SEL_BEFORE(first[child], first[child - 1]))
            child--;
        first[hole] = first[child];
        hole = child;
    }
    if ((len & 1) == 0 && child == (len - 2) / 2) {
        child = 2 * (child + 1);
        first[hole] = first[child - 1];
        hole = child - 1;
    }
    sel_push_heap(first, hole, top, value);
}

static void sel_heap_select(sel_t *first, sel_t *middle, sel_t *last)
{
    const Py_ssize_t len = middle - first;
    if (len >= 2)
        for (Py_ssize_t parent = (len - 2) / 2;; parent--) {
            sel_adjust_heap(first, parent, len, first[parent]);
            if (parent == 0)
                break;
        }
    for (sel_t *i = middle; i < last; i++)
        if (SEL_BEFORE(*i, *first)) {
            sel_t value = *i;
            *i = *first;
            sel_adjust_heap(first, 0, len, value);
        }
}

static void sel_insertion_sort(sel_t *first, sel_t *last)
{
    if (first == last)
        return;
    for (sel_t *i = first + 1; i != last; i++) {
        sel_t value = *i;
        if (SEL_BEFORE(value, *first)) {
            memmove(first + 1, first, sizeof(sel_t) * (size_t)(i - first));
            *first = value;
        } else {
            sel_t *hole = i, *next = i - 1;
            while (SEL_BEFORE(value, *next)) {
                *hole = *next;
                hole = next;
                next--;
            }
            *hole = value;
        }
    }
}

static void sel_median_to_first(sel_t *result, sel_t *a, sel_t *b, sel_t *c)
{
    if (SEL_BEFORE(*a, *b)) {
        if (SEL_BEFORE(*b, *c))
            sel_swap(result, b);
        else if (SEL_BEFORE(*a, *c))
            sel_swap(result, c);
        else
            sel_swap(result, a);
    } else if (SEL_BEFORE(*a, *c))
        sel_swap(result, a);
    else if (SEL_BEFORE(*b, *c))
        sel_swap(result, c);
    else
        sel_swap(result, b);
}

static sel_t *sel_partition(sel_t *first, sel_t *last, const sel_t *pivot)
{
    for (;;) {
        while (SEL_BEFORE(*first, *pivot))
            first++;
        last--;
        while (SEL_BEFORE(*pivot, *last))
            last--;
        if (!(first < last))
            return first;
        sel_swap(first, last);
        first++;
    }
}

static void sel_nth(sel_t *first, sel_t *nth, sel_t *last)
{
    if (first == last || nth == last)
        return;
    int depth = 0;
    for (Py_ssize_t len = last - first; len > 1; len >>= 1)
        depth++;
    depth *= 2;
    while (last - first > 3) {
        if (depth == 0) {
            sel_heap_select(first, nth + 1, last);
            sel_swap(first, nth);
            return;
        }
        depth--;
        sel_t *mid = first + (last - first) / 2;
        sel_median_to_first(first, first + 1, mid, last - 1);
        sel_t *cut = sel_partition(first + 1, last, first);
        if (cut <= nth)
            first = cut;
        else
            last = cut;
    }
    sel_insertion_sort(first, last);
}

PyDoc_STRVAR(topk_mask_doc,
"topk_mask(mask, keys, k) -> None\n"
"\n"
"mask[j] = 1 (uint8) for the k entries torch.topk(values, k) returns on the CPU, else 0: keys holds n\n"
"uint32 keys ordered as the values (for non-negative floats, their bits), n < 2**32. The same selection as\n"
"libstdc++'s std::nth_element (k * 64 > n) or std::partial_sort (k * 64 <= n), which torch's CPU topk calls,\n"
"so ties at the k-th are kept as torch keeps them.");

static PyObject *py_topk_mask(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"mask", "keys", "k", NULL};
    static const char *fn = "topk_mask";
    PyObject *mask_obj, *keys_obj;
    Py_ssize_t k;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOn:topk_mask", kwlist, &mask_obj, &keys_obj, &k))
        return NULL;
    Py_buffer mask_view, keys_view;
    if (get_buffer(keys_obj, &keys_view, fn, "keys", 0) < 0)
        return NULL;
    if (get_buffer(mask_obj, &mask_view, fn, "mask", 1) < 0) {
        PyBuffer_Release(&keys_view);
        return NULL;
    }
    PyObject *result = NULL;
    const Py_ssize_t n = keys_view.len / 4;
    sel_t *work = NULL;
    if (keys_view.len != n * 4 || mask_view.len != n || n >= ((Py_ssize_t)1 << 32) || k < 1 || k > n) {
        PyErr_Format(PyExc_ValueError, "%s: need n uint32 keys and n mask bytes (n < 2**32), 1 <= k <= n", fn);
        goto done;
    }
    work = PyMem_RawMalloc(sizeof(sel_t) * (size_t)n);
    if (!work) {
        PyErr_NoMemory();
        goto done;
    }
    const uint32_t *keys = keys_view.buf;
    unsigned char *mask = mask_view.buf;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t j = 0; j < n; j++)
        work[j] = ((sel_t)keys[j] << 32) | (sel_t)j;
    if (k * 64 <= n) /* torch's std::partial_sort: a heap selection, then a sort of the k kept */
        sel_heap_select(work, work + k, work + n);
    else
        sel_nth(work, work + k - 1, work + n);
    memset(mask, 0, (size_t)n);
    for (Py_ssize_t j = 0; j < k; j++)
        mask[work[j] & 0xFFFFFFFFu] = 1;
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    PyMem_RawFree(work);
    PyBuffer_Release(&keys_view);
    PyBuffer_Release(&mask_view);
    return result;
}

/* ------------------------------------------------------------------------------------------------ */
/* Programs: a method stated as a short list of entrywise operations (methods/program.py)          */
/* ------------------------------------------------------------------------------------------------ */

/* Each instruction is six int32 words: op, dst, a, b, c, round. Registers are float32 rows of one block;
 * an operation computes in float32 and, where `round` is set, rounds its result to the compute dtype (the
 * rounding a torch op in that dtype does). The opcodes and their meaning are stated in methods/program.py. */
enum {
    OP_LOAD = 0,  /* dst = inputs[a] (converted; NaN/Inf flagged) */
    OP_FILL,      /* dst = table[a] (b == 0), or table[a + row] per row (b == 1) */
    OP_ADD,       /* dst = a + b */
    OP_SUB,       /* dst = a - b */
    OP_MUL,       /* dst = a * b */
    OP_DIV,       /* dst = a / b */
    OP_ABS,       /* dst = |a| */
    OP_NEG,       /* dst = -a */
    OP_RECIP,     /* dst = 1 / a */
    OP_MAX,       /* dst = a > b ? a : b */
    OP_MIN,       /* dst = a < b ? a : b */
    OP_GT,        /* dst = a > b ? 1 : 0 */
    OP_EQ,        /* dst = a == b ? 1 : 0 */
    OP_WHERE,     /* dst = a != 0 ? b : c */
    OP_SUM,       /* sums[b] += a over the range (float64; per row when row sums are asked for) */
    OP_STORE,     /* out = a (converted to the output dtype; overflow flagged) */
    N_OPS
};
#define PROGRAM_WORDS 6
#define PROGRAM_MAX_REGS 64

typedef struct {
    unsigned char *out; /* NULL: nothing stored */
    int out_code;
    int n_in;
    const unsigned char **in;
    const int *in_code;
    const int32_t *code;
    int n_code;
    const float *table;
    int n_regs;
    Py_ssize_t row_len;
    Py_ssize_t start, stop;
    int compute_code;
    int axis;         /* 0: whole sums; 1: per row, sums[slot][row - start / row_len]; 2: per column (row_len of
                         them), sums[slot][column]. Per-vector constants follow the same axis */
    Py_ssize_t n_vec; /* sums per slot: 1, the rows in [start, stop), or row_len */
    double *sums;
    int block;
    float *scratch;   /* n_regs * block */
    unsigned char *bad; /* n_in + 1 flags: which inputs held a NaN/Inf; [n_in]: a stored value is not finite */
} program_args;

/* One elementwise loop; with `rnd` each result rounded to the compute dtype in the same loop. */
#define PROGRAM_EW(expr)                                                                               \
    do {                                                                                               \
        if (rnd && cc != DT_F32) {                                                                     \
            for (int k = 0; k < n; k++)                                                                \
                d[k] = round_to(cc, (expr));                                                           \
        } else {                                                                                       \
            for (int k = 0; k < n; k++)                                                                \
                d[k] = (expr);                                                                         \
        }                                                                                              \
    } while (0)

/* A register of one row constant per row, for the elements of block [j0, j0 + n). */
SOUP_INLINE void program_fill_vectors(const program_args *a, const int32_t *ins, float *SOUP_RESTRICT d,
                                      Py_ssize_t j0, int n)
{
    if (a->axis == 2) { /* per column: runs of consecutive columns */
        Py_ssize_t col = j0 % a->row_len;
        int k = 0;
        while (k < n) {
            const int len = (int)(a->row_len - col < n - k ? a->row_len - col : n - k);
            memcpy(d + k, a->table + ins[2] + col, sizeof(float) * (size_t)len);
            k += len;
            col = 0;
        }
        return;
    }
    Py_ssize_t row = j0 / a->row_len, left = a->row_len - j0 % a->row_len;
    int k = 0;
    while (k < n) {
        const int len = (int)(left < n - k ? left : n - k);
        const float v = a->table[ins[2] + row];
        for (int q = 0; q < len; q++)
            d[k + q] = v;
        k += len;
        row++;
        left = a->row_len;
    }
}

SOUP_INLINE void program_impl(const program_args *a, int f16c, const int cc)
{
    const int B = a->block;
    const int osz = a->out ? dtype_size(a->out_code) : 0;
    const uint32_t out_lim = a->out_code == 1 ? 0x477FF000u : (a->out_code == 2 ? 0x7F7F8000u : 0x7F800000u);
    const Py_ssize_t row0 = a->start / a->row_len;
    /* the numbers are the same in every block: filled once */
    for (int pc = 0; pc < a->n_code; pc++) {
        const int32_t *ins = a->code + (size_t)pc * PROGRAM_WORDS;
        if (ins[0] == OP_FILL && (!ins[3] || a->axis == 0)) { /* (a whole tensor is one vector) */
            float *SOUP_RESTRICT d = a->scratch + (size_t)ins[1] * B;
            const float v = a->table[ins[2]];
            for (int k = 0; k < B; k++)
                d[k] = v;
        }
    }
    for (Py_ssize_t j0 = a->start; j0 < a->stop; j0 += B) {
        const int n = (int)(a->stop - j0 < B ? a->stop - j0 : B);
        for (int pc = 0; pc < a->n_code; pc++) {
            const int32_t *ins = a->code + (size_t)pc * PROGRAM_WORDS;
            float *SOUP_RESTRICT d = a->scratch + (size_t)ins[1] * B;
            const float *SOUP_RESTRICT x = a->scratch + (size_t)ins[2] * B;
            const float *SOUP_RESTRICT y = a->scratch + (size_t)ins[3] * B;
            const float *SOUP_RESTRICT z = a->scratch + (size_t)ins[4] * B;
            const int rnd = ins[5];
            switch (ins[0]) {
            case OP_LOAD: {
                const int k0 = ins[2], code = a->in_code[k0];
                const unsigned char *src = a->in[k0] + (size_t)j0 * dtype_size(code);
                prefetch_ahead(src, (size_t)n * dtype_size(code), (size_t)(a->stop - j0) * dtype_size(code));
                a->bad[k0] |= (unsigned char)(load_block(code, src, d, n, f16c) != 0);
                if (rnd && cc != DT_F32 && code != cc) /* (values stored in the compute dtype are already rounded) */
                    for (int k = 0; k < n; k++)
                        d[k] = round_to(cc, d[k]);
                break;
            }
            case OP_FILL:
                if (ins[3] && a->axis != 0)
                    program_fill_vectors(a, ins, d, j0, n);
                break;
            case OP_ADD:
                PROGRAM_EW(x[k] + y[k]);
                break;
            case OP_SUB:
                PROGRAM_EW(x[k] - y[k]);
                break;
            case OP_MUL:
                PROGRAM_EW(x[k] * y[k]);
                break;
            case OP_DIV:
                PROGRAM_EW(x[k] / y[k]);
                break;
            case OP_ABS:
                PROGRAM_EW(fabsf(x[k]));
                break;
            case OP_NEG:
                PROGRAM_EW(-x[k]);
                break;
            case OP_RECIP:
                PROGRAM_EW(1.0f / x[k]);
                break;
            case OP_MAX:
                PROGRAM_EW(x[k] > y[k] ? x[k] : y[k]);
                break;
            case OP_MIN:
                PROGRAM_EW(x[k] < y[k] ? x[k] : y[k]);
                break;
            case OP_GT:
                PROGRAM_EW(x[k] > y[k] ? 1.0f : 0.0f);
                break;
            case OP_EQ:
                PROGRAM_EW(x[k] == y[k] ? 1.0f : 0.0f);
                break;
            case OP_WHERE:
                PROGRAM_EW(x[k] != 0.0f ? y[k] : z[k]);
                break;
            case OP_SUM:
                if (a->axis == 0) {
                    a->sums[ins[3]] += dot_sum(x, NULL, n);
                } else if (a->axis == 2) { /* per column: each column's sum in its own float64 */
                    double *SOUP_RESTRICT col_sums = a->sums + (size_t)ins[3] * a->n_vec;
                    Py_ssize_t col = j0 % a->row_len;
                    int k = 0;
                    while (k < n) {
                        const int len = (int)(a->row_len - col < n - k ? a->row_len - col : n - k);
                        for (int q = 0; q < len; q++)
                            col_sums[col + q] += (double)x[k + q];
                        k += len;
                        col = 0;
                    }
                } else {
                    Py_ssize_t row = j0 / a->row_len, left = a->row_len - j0 % a->row_len;
                    int k = 0;
                    while (k < n) {
                        const int len = (int)(left < n - k ? left : n - k);
                        a->sums[(size_t)ins[3] * a->n_vec + (row - row0)] += dot_sum(x + k, NULL, len);
                        k += len;
                        row++;
                        left = a->row_len;
                    }
                }
                break;
            case OP_STORE: {
                uint32_t over = 0;
                for (int k = 0; k < n; k++)
                    over |= (uint32_t)((f32_to_bits(x[k]) & 0x7FFFFFFFu) >= out_lim);
                a->bad[a->n_in] |= (unsigned char)(over != 0);
                store_block(a->out_code, x, a->out + (size_t)j0 * osz, n, f16c);
                break;
            }
            }
        }
    }
}

SOUP_BY_COMPUTE(program, const program_args, program_impl)

PyDoc_STRVAR(program_doc,
"program(out, out_dtype, inputs, in_dtypes, code, table, n_regs, row_len, start, stop, compute_dtype=0,\n"
"        sums=None, axis=0) -> int\n"
"\n"
"Run a program (methods/program.py) over elements [start, stop) of the inputs: `code` holds int32\n"
"instructions of six words (op, dst, a, b, c, round), `table` the float32 constants FILL reads (per row:\n"
"element j reads table[a + j // row_len]). Each operation computes in float32; with `round` set its result\n"
"is rounded to compute_dtype (1 float16, 2 bfloat16; 0 float32: no rounding). SUM adds a register's values\n"
"into sums[b] (float64, a writable buffer); axis 1: into sums[b][row - start // row_len] (start and stop\n"
"then on row boundaries); axis 2: into sums[b][j % row_len] (per column). FILL with b == 1 reads one constant\n"
"per row (axis 1: table[a + j // row_len]) or per column (axis 2: table[a + j % row_len]); stop then on\n"
"row boundaries\n"
"stop then on row boundaries); STORE converts a register to out_dtype into `out` (None when no STORE).\n"
"Returns -1 when every value read was finite, else the lowest index of an input holding a NaN/Inf in the\n"
"range, or len(inputs) when a stored value is not finite (overflow); `out` is then unspecified.");

static PyObject *py_program(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"out", "out_dtype", "inputs", "in_dtypes", "code", "table", "n_regs", "row_len",
                             "start", "stop", "compute_dtype", "sums", "axis", NULL};
    static const char *fn = "program";
    PyObject *out_obj, *inputs_obj, *codes_obj, *code_obj, *table_obj, *sums_obj = Py_None;
    int out_code, n_regs, compute_code = 0, axis = 0;
    Py_ssize_t row_len, start, stop;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OiOOOOinnn|iOi:program", kwlist, &out_obj, &out_code,
                                     &inputs_obj, &codes_obj, &code_obj, &table_obj, &n_regs, &row_len, &start,
                                     &stop, &compute_code, &sums_obj, &axis))
        return NULL;
    if (check_range(start, stop, fn) < 0 || check_dtype(compute_code, fn, "compute_dtype") < 0)
        return NULL;
    if (n_regs < 1 || n_regs > PROGRAM_MAX_REGS || row_len < 1) {
        PyErr_Format(PyExc_ValueError, "%s: need 1 <= n_regs <= %d and row_len >= 1", fn, PROGRAM_MAX_REGS);
        return NULL;
    }
    if (axis < 0 || axis > 2) {
        PyErr_Format(PyExc_ValueError, "%s: axis must be 0 (whole), 1 (rows) or 2 (columns), got %d", fn, axis);
        return NULL;
    }
    if (axis && (start % row_len || stop % row_len)) {
        PyErr_Format(PyExc_ValueError, "%s: sums per row or column need start and stop on row boundaries", fn);
        return NULL;
    }
    PyObject *result = NULL, *inputs_fast = NULL, *codes_fast = NULL;
    Py_buffer *views = NULL, out_view, code_view, table_view, sums_view;
    int have_out = 0, have_code = 0, have_table = 0, have_sums = 0;
    Py_ssize_t n_views = 0;
    const unsigned char **ptrs = NULL;
    int *codes = NULL;
    float *scratch = NULL;
    unsigned char *bad = NULL;
    inputs_fast = PySequence_Fast(inputs_obj, "program: inputs must be a sequence of buffers");
    if (!inputs_fast)
        goto done;
    codes_fast = PySequence_Fast(codes_obj, "program: in_dtypes must be a sequence of ints");
    if (!codes_fast)
        goto done;
    const Py_ssize_t N = PySequence_Fast_GET_SIZE(inputs_fast);
    if (N < 1 || N > 4096 || PySequence_Fast_GET_SIZE(codes_fast) != N) {
        PyErr_SetString(PyExc_ValueError, "program: need 1 to 4096 inputs and one dtype code each");
        goto done;
    }
    views = PyMem_Calloc((size_t)N, sizeof(Py_buffer));
    ptrs = PyMem_Calloc((size_t)N, sizeof(*ptrs));
    codes = PyMem_Calloc((size_t)N, sizeof(int));
    bad = PyMem_Calloc((size_t)N + 1, 1);
    if (!views || !ptrs || !codes || !bad) {
        PyErr_NoMemory();
        goto done;
    }
    if (get_inputs(inputs_fast, codes_fast, N, stop, fn, views, ptrs, codes, &n_views) < 0)
        goto done;
    if (get_buffer(code_obj, &code_view, fn, "code", 0) < 0)
        goto done;
    have_code = 1;
    if (get_buffer(table_obj, &table_view, fn, "table", 0) < 0)
        goto done;
    have_table = 1;
    const Py_ssize_t n_code = code_view.len / (Py_ssize_t)(PROGRAM_WORDS * sizeof(int32_t));
    const Py_ssize_t n_table = table_view.len / (Py_ssize_t)sizeof(float);
    if (code_view.len != n_code * (Py_ssize_t)(PROGRAM_WORDS * sizeof(int32_t))) {
        PyErr_Format(PyExc_ValueError, "%s: code must hold whole instructions of %d int32 words", fn, PROGRAM_WORDS);
        goto done;
    }
    const Py_ssize_t n_vec = axis == 1 ? (stop - start) / row_len : (axis == 2 ? row_len : 1);
    Py_ssize_t n_sums = 0;
    if (sums_obj != Py_None) {
        if (get_buffer(sums_obj, &sums_view, fn, "sums", 1) < 0)
            goto done;
        have_sums = 1;
        n_sums = n_vec > 0 ? sums_view.len / (Py_ssize_t)sizeof(double) / n_vec : 0;
    }
    const int32_t *code = code_view.buf;
    for (Py_ssize_t pc = 0; pc < n_code; pc++) { /* every index checked before the loop runs unchecked */
        const int32_t *ins = code + pc * PROGRAM_WORDS;
        const int op = ins[0];
        int ok = op >= 0 && op < N_OPS && ins[1] >= 0 && ins[1] < n_regs && ins[2] >= 0 && ins[3] >= 0 &&
                 ins[4] >= 0 && ins[4] < n_regs;
        if (ok && op == OP_LOAD)
            ok = ins[2] < N;
        else if (ok && op == OP_FILL)
            ok = (!ins[3] || axis == 0) ? ins[2] < n_table /* a whole tensor is one vector */
                 : axis == 2 ? ins[2] + row_len <= n_table
                             : (stop == start || ins[2] + (stop - 1) / row_len < n_table);
        else if (ok && op == OP_SUM)
            ok = ins[2] < n_regs && ins[3] < n_sums;
        else if (ok)
            ok = ins[2] < n_regs && ins[3] < n_regs;
        if (ok && op == OP_STORE)
            ok = out_obj != Py_None;
        if (!ok) {
            PyErr_Format(PyExc_ValueError, "%s: instruction %zd (%d %d %d %d %d) is out of range (n_regs=%d, "
                         "%zd inputs, %zd table values, %zd sums, out %s)", fn, pc, op, ins[1], ins[2], ins[3], ins[4],
                         n_regs, N, n_table, n_sums, out_obj == Py_None ? "None" : "given");
            goto done;
        }
    }
    if (out_obj != Py_None) {
        if (check_dtype(out_code, fn, "out_dtype") < 0 || get_buffer(out_obj, &out_view, fn, "out", 1) < 0)
            goto done;
        have_out = 1;
        if (check_length(&out_view, out_code, stop, fn, "out") < 0)
            goto done;
    }
    int block = 4096 / n_regs; /* 16 KiB of registers: a third of L1 beside the streams (measured: 4-13% faster
                                  than 32 KiB on a model_stock pass, on a Xeon with 48 KiB of L1) */
    block &= ~63;
    block = block < 64 ? 64 : (block > 1024 ? 1024 : block);
    scratch = PyMem_RawMalloc(sizeof(float) * (size_t)block * (size_t)n_regs);
    if (!scratch) {
        PyErr_NoMemory();
        goto done;
    }
    program_args a;
    a.out = have_out ? out_view.buf : NULL;
    a.out_code = out_code;
    a.n_in = (int)N;
    a.in = ptrs;
    a.in_code = codes;
    a.code = code;
    a.n_code = (int)n_code;
    a.table = table_view.buf;
    a.n_regs = n_regs;
    a.row_len = row_len;
    a.start = start;
    a.stop = stop;
    a.compute_code = compute_code;
    a.axis = axis;
    a.n_vec = n_vec;
    a.sums = have_sums ? sums_view.buf : NULL;
    a.block = block;
    a.scratch = scratch;
    a.bad = bad;
    Py_BEGIN_ALLOW_THREADS
    program_run(&a);
    Py_END_ALLOW_THREADS
    long first = -1;
    for (Py_ssize_t i = 0; i <= N && first < 0; i++)
        if (bad[i])
            first = (long)i;
    result = PyLong_FromLong(first);
done:
    for (Py_ssize_t i = 0; i < n_views; i++)
        PyBuffer_Release(&views[i]);
    if (have_out)
        PyBuffer_Release(&out_view);
    if (have_code)
        PyBuffer_Release(&code_view);
    if (have_table)
        PyBuffer_Release(&table_view);
    if (have_sums)
        PyBuffer_Release(&sums_view);
    PyMem_Free(views);
    PyMem_Free(ptrs);
    PyMem_Free(codes);
    PyMem_Free(bad);
    PyMem_RawFree(scratch);
    Py_XDECREF(inputs_fast);
    Py_XDECREF(codes_fast);
    return result;
}

/* Private, for the tests: which copy of the kernels runs ("avx512", "avx2" or "generic"); _set_isa(name)
 * forces that copy (one this CPU runs), _set_isa("auto") returns to the choice made at import. */
static int detect_isa(void)
{
#if SOUP_X86
    __builtin_cpu_init(); /* (its AVX-512 bits also require the OS to save the registers: XCR0) */
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("f16c"))
        return ISA_GENERIC;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
        return ISA_AVX512;
    return ISA_AVX2;
#else
    return ISA_GENERIC;
#endif
}

static PyObject *py_isa(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyUnicode_FromString(ISA_NAMES[isa]);
}

static PyObject *py_set_isa(PyObject *self, PyObject *arg)
{
    (void)self;
    const char *name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
    const int best = detect_isa();
    int level = -1;
    if (name && strcmp(name, "auto") == 0)
        level = best;
    for (int k = 0; name && level < 0 && k <= best; k++)
        if (strcmp(name, ISA_NAMES[k]) == 0)
            level = k;
    if (level < 0) {
        PyErr_Format(PyExc_ValueError, "_set_isa: expected 'auto' or one of this CPU's: %s%s%s",
                     ISA_NAMES[0], best >= ISA_AVX2 ? ", avx2" : "", best >= ISA_AVX512 ? ", avx512" : "");
        return NULL;
    }
    isa = level;
    return PyUnicode_FromString(ISA_NAMES[isa]);
}

static PyMethodDef kernel_methods[] = {
    {"combine", (PyCFunction)(void (*)(void))py_combine, METH_VARARGS | METH_KEYWORDS, combine_doc},
    {"abs_delta_histogram", (PyCFunction)(void (*)(void))py_abs_delta_histogram, METH_VARARGS | METH_KEYWORDS,
     hist_doc},
    {"dare_draws", (PyCFunction)(void (*)(void))py_dare_draws, METH_VARARGS | METH_KEYWORDS, draws_doc},
    {"dare_abs_sums", (PyCFunction)(void (*)(void))py_dare_abs_sums, METH_VARARGS | METH_KEYWORDS, sums_doc},
    {"magprune_mask", (PyCFunction)(void (*)(void))py_magprune_mask, METH_VARARGS | METH_KEYWORDS, prune_doc},
    {"gram", (PyCFunction)(void (*)(void))py_gram, METH_VARARGS | METH_KEYWORDS, gram_doc},
    {"program", (PyCFunction)(void (*)(void))py_program, METH_VARARGS | METH_KEYWORDS, program_doc},
    {"variance", (PyCFunction)(void (*)(void))py_variance, METH_VARARGS | METH_KEYWORDS, variance_doc},
    {"topk_mask", (PyCFunction)(void (*)(void))py_topk_mask, METH_VARARGS | METH_KEYWORDS, topk_mask_doc},
    {"isa", py_isa, METH_NOARGS, "isa() -> str: which copy of the kernels runs, 'avx2' or 'generic'."},
    {"_set_isa", py_set_isa, METH_O, "_set_isa(name): 'generic' forces the portable kernels, 'auto' re-detects."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef kernel_module = {
    PyModuleDef_HEAD_INIT,
    "souplm._kernels",
    "Fused one-pass CPU kernels for weight merging (float32/float16/bfloat16, GIL released).",
    -1,
    kernel_methods,
    NULL,
    NULL,
    NULL,
    NULL,
};

PyMODINIT_FUNC PyInit__kernels(void)
{
    isa = detect_isa();
    PyObject *m = PyModule_Create(&kernel_module);
    if (!m)
        return NULL;
    if (PyModule_AddIntConstant(m, "F32", DT_F32) < 0 || PyModule_AddIntConstant(m, "F16", DT_F16) < 0 ||
        PyModule_AddIntConstant(m, "BF16", DT_BF16) < 0 || PyModule_AddIntConstant(m, "SUM", MODE_SUM) < 0 ||
        PyModule_AddIntConstant(m, "ELECT", MODE_ELECT) < 0 || PyModule_AddIntConstant(m, "LEVELS", N_LEVELS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
