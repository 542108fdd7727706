/* Quantized expert matmuls for x86-64 CPUs, reading the stored formats directly.
 *
 * y[t, o] = sum_i x[t, i] * W[o, i] for a weight W stored as
 *   nf4:   qweight [O*I/2] uint8 (two codes per byte, first element in the high nibble),
 *          block absmax double-quantized: absmax[b] = dyn[scales[b]] * sabs[b / 256] + offset
 *   int8:  qweight [O, I] int8, scales [O, I/gs] float32
 *   dense: W [O, I] float32, bfloat16 or float16 (computed in float32: a GEMV for few tokens).
 *
 * Technique (as llama.cpp's q4_0 / IQ4_NL dot products): the activations are quantized to int8
 * in blocks of 32 with one float scale each; nf4 codes are mapped to int8 levels through a
 * 16-entry byte shuffle; products are summed in int32 with maddubs/madd and scaled in float.
 * The nf4 activation blocks follow the nibble order: within every 64 elements, the 32 even
 * elements (high nibbles) form one block and the 32 odd ones (low nibbles) the next.
 *
 * One decode step's grouped-query attention (mx_attn_decode) reads the KV cache (float32, bfloat16 or
 * float16) where it lies and computes scores, softmax and the weighted sum in float32.
 *
 * A SwiGLU expert (mx_swiglu) is one call: x is quantized once for w1 and w3, silu(w1 x) * (w3 x) is
 * formed in float32 and quantized as the activations of w2.
 *
 * The small steps of a decode step are here too, so that no run of torch ops surrounds the products:
 * RMSNorm (mx_rms_norm), the rotary embedding (mx_rope) and the MoE router (mx_route). Every entry
 * point takes activations and gives results as float32, bfloat16 or float16 (converted here, rounded
 * to nearest even as torch rounds) and computes in float32.
 *
 * Every product and the attention kernel have a portable scalar variant and an AVX2+FMA variant
 * compiled with per-function target attributes (no -march flags), chosen at run time by the caller;
 * the conversions, RMSNorm and the rotary embedding are single portable loops (memory-bound, written
 * so that the compiler vectorizes them for the baseline instruction set). Work is split over a
 * small pthread pool in chunks of rows (attention: kv heads) taken from an atomic counter, so a descheduled thread
 * delays only the chunk it holds. Callers release the GIL (ctypes does).
 */
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define QBLOCK 32      /* activation elements per int8 scale (int8 weights) */
#define NF4_QBLOCK 64  /* activation elements per int8 scale (nf4 weights: one nibble-ordered group) */
#define ROWS_CHUNK 16  /* output rows per unit of work, at least */
#define CHUNK_BYTES 65536 /* weight bytes per unit of work, about (short rows) */
#define TOK_TILE 4     /* tokens sharing one weight decode */
/* nf4 levels are round(code * 63): as u = level + 63 in [0, 126] they are maddubs' unsigned operand,
 * and a pair of products u * x stays within int16 (2 * 126 * 127 = 32004). */
#define NF4_LEVEL_SCALE 63

enum { ISA_SCALAR = 0, ISA_AVX2 = 1 };
enum { FMT_NF4 = 0, FMT_INT8 = 1, FMT_NF4_DEQUANT = 2, FMT_DENSE = 3, FMT_QUANT_NF4 = 4, FMT_QUANT_INT8 = 5 };
enum { W_F32 = 0, W_BF16 = 1, W_F16 = 2 };

int mx_cpu_has_avx2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}

/* ---- activation quantization -------------------------------------------------------------- */

/* Quantize T rows of n floats into int8 blocks of `bs` elements with one scale each (q [T, n],
 * d [T, n/bs]). With `deinterleave64`, each 64-element group is stored as its 32 even elements
 * then its 32 odd ones (the nf4 nibble order). The AVX2 clone gives the same bytes (max, one product
 * and round-half-even per element). */
__attribute__((target_clones("avx2", "default"))) static void quantize_act(const float *x, int T, int n, int bs,
                                                                           int deinterleave64, int8_t *q, float *d) {
    float tmp[64];
    for (int t = 0; t < T; t++) {
        const float *xr = x + (size_t)t * n;
        int8_t *qr = q + (size_t)t * n;
        float *dr = d + (size_t)t * (n / bs);
        for (int b = 0; b < n / bs; b++) {
            const float *src = xr + (size_t)b * bs;
            if (deinterleave64) {
                for (int k = 0; k < 32; k++) {
                    tmp[k] = src[2 * k];
                    tmp[32 + k] = src[2 * k + 1];
                }
                src = tmp;
            }
            float amax = 0.f;
            for (int k = 0; k < bs; k++) {
                const float a = fabsf(src[k]);
                amax = a > amax ? a : amax;  /* fmaxf's result (NaN skipped), but inlined and vectorized */
            }
            float inv = amax > 0.f ? 127.f / amax : 0.f;
            dr[b] = amax / 127.f;
            for (int k = 0; k < bs; k++) qr[(size_t)b * bs + k] = (int8_t)lrintf(src[k] * inv);
        }
    }
}

/* ---- job description ---------------------------------------------------------------------- */

typedef struct {
    int fmt, isa;
    int T, O, I, gs;
    const uint8_t *qweight;    /* nf4 packed codes, or int8 weights */
    const uint8_t *scales;     /* nf4: absmax code indices; int8: float32 [O, I/gs] */
    const float *sabs;         /* nf4: second-level absmax [blocks/256] */
    float offset;              /* nf4: absmax offset */
    const float *dyn;          /* nf4: 256-entry dynamic code table */
    const int8_t *levels;      /* nf4: 16 int8 levels, round(code * NF4_LEVEL_SCALE) */
    const float *codes;        /* nf4: 16 float codes (dequantize) */
    const int8_t *xq;          /* [T, I] quantized activations */
    const float *xd;           /* [T, I/32] activation scales (nf4: [T, I/64]) */
    const float *xs;           /* nf4: [T, I/64] xd times the sum of each 64-chunk's int8 activations */
    const int8_t *xa;          /* int8: [T, I] |xq| */
    const float *xf;           /* dense: [T, I] float32 activations */
    int wtype;                 /* dense, quantize: W_F32, W_BF16 or W_F16 */
    uint8_t *qout;             /* quantize: nf4 packed codes or int8 codes */
    const float *mids;         /* quantize nf4: the 15 midpoints between the nf4 codes */
    float *y;                  /* [T, O] float32, or the dequantized [O, I] float32 */
} job_t;

static inline float nf4_absmax(const job_t *j, size_t b) {
    return j->dyn[j->scales[b]] * j->sabs[b / 256] + j->offset;
}

/* ---- scalar kernels (portable reference of the same arithmetic) ---------------------------- */

static void nf4_rows_scalar(const job_t *j, int r0, int r1) {
    const int I = j->I, nch = I / 64, cpb = j->gs / 64;
    for (int r = r0; r < r1; r++) {
        for (int t = 0; t < j->T; t++) {
            const int8_t *xq = j->xq + (size_t)t * I;
            const float *xd = j->xd + (size_t)t * (I / NF4_QBLOCK);
            float acc = 0.f, am = 0.f;
            for (int c = 0; c < nch; c++) {
                if (c % cpb == 0) am = nf4_absmax(j, ((size_t)r * I) / j->gs + c / cpb);
                const uint8_t *q = j->qweight + ((size_t)r * I + (size_t)c * 64) / 2;
                int32_t se = 0, so = 0;
                for (int k = 0; k < 32; k++) {
                    se += (int32_t)j->levels[q[k] >> 4] * xq[c * 64 + k];
                    so += (int32_t)j->levels[q[k] & 15] * xq[c * 64 + 32 + k];
                }
                acc += (float)(se + so) * (xd[c] * am);
            }
            j->y[(size_t)t * j->O + r] = acc * (1.f / NF4_LEVEL_SCALE);
        }
    }
}

static void int8_rows_scalar(const job_t *j, int r0, int r1) {
    const int I = j->I, G = I / j->gs, bpg = j->gs / QBLOCK;
    const float *scales = (const float *)j->scales;
    for (int r = r0; r < r1; r++) {
        const int8_t *w = (const int8_t *)j->qweight + (size_t)r * I;
        for (int t = 0; t < j->T; t++) {
            const int8_t *xq = j->xq + (size_t)t * I;
            const float *xd = j->xd + (size_t)t * (I / QBLOCK);
            float acc = 0.f;
            for (int g = 0; g < G; g++) {
                const float s = scales[(size_t)r * G + g];
                for (int b = g * bpg; b < (g + 1) * bpg; b++) {
                    int32_t sum = 0;
                    for (int k = 0; k < QBLOCK; k++) sum += (int32_t)w[b * QBLOCK + k] * xq[b * QBLOCK + k];
                    acc += (float)sum * (xd[b] * s);
                }
            }
            j->y[(size_t)t * j->O + r] = acc;
        }
    }
}

static void nf4_dequant_rows_scalar(const job_t *j, int r0, int r1) {
    const int I = j->I;
    for (int r = r0; r < r1; r++) {
        float *out = j->y + (size_t)r * I;
        const uint8_t *q = j->qweight + (size_t)r * I / 2;
        float am = 0.f;
        for (int i = 0; i < I; i += 2) {
            if (i % j->gs == 0) am = nf4_absmax(j, ((size_t)r * I + i) / j->gs);
            out[i] = j->codes[q[i / 2] >> 4] * am;
            out[i + 1] = j->codes[q[i / 2] & 15] * am;
        }
    }
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, man = h & 1023;
    uint32_t u;
    if (exp == 31) {
        u = sign | 0x7F800000u | (man << 13);
    } else if (exp == 0) {
        float f = ldexpf((float)man, -24);
        return sign ? -f : f;
    } else {
        u = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Element i of a float32 (W_F32), bfloat16 (W_BF16) or float16 (W_F16) array, as float32. */
static inline float elem_f32(const void *base, int wtype, size_t i) {
    if (wtype == W_F32) return ((const float *)base)[i];
    const uint16_t h = ((const uint16_t *)base)[i];
    return wtype == W_BF16 ? bf16_to_f32(h) : f16_to_f32(h);
}

static inline float dense_w(const job_t *j, size_t i) { return elem_f32(j->qweight, j->wtype, i); }

/* float32 -> bfloat16, rounding to nearest even; NaN -> 0x7FC0 (torch's conversion, bit for bit). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)(((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC00000u : u + 0x7FFFu + ((u >> 16) & 1)) >> 16);  /* branch-free: vectorizes */
}

/* float32 -> IEEE float16, rounding to nearest even (NaN keeps its sign as 0x7E00, overflow -> inf). */
static inline uint16_t f32_to_f16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    const uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return sign | 0x7E00;
    if (a >= 0x477FF000u) return sign | 0x7C00;  /* >= 65520 rounds to infinity */
    if (a < 0x38800000u) {                        /* below 2^-14: a subnormal (or zero) half */
        float v;
        memcpy(&v, &a, 4);
        return sign | (uint16_t)lrintf(v * 16777216.f);  /* units of 2^-24; 1024 is the smallest normal */
    }
    return sign | (uint16_t)((a - 0x38000000u + 0xFFFu + ((a >> 13) & 1)) >> 13);  /* rebias, round 13 bits */
}

/* float32 rounded to bfloat16 / float16 precision, as float32. */
static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); }

static inline float round_f16(float f) { return f16_to_f32(f32_to_f16(f)); }

/* out [n] float32 = elements i0 .. i0+n-1 of src (type W_F32, W_BF16 or W_F16); one loop per type, so
 * each vectorizes. */
static inline void load_f32(int type, const void *src, size_t i0, size_t n, float *out) {
    if (type == W_F32) {
        memcpy(out, (const float *)src + i0, n * sizeof(float));
    } else if (type == W_BF16) {
        const uint16_t *h = (const uint16_t *)src + i0;
        uint32_t *u = (uint32_t *)out;
        for (size_t k = 0; k < n; k++) u[k] = (uint32_t)h[k] << 16;
    } else {
        const uint16_t *h = (const uint16_t *)src + i0;
        for (size_t k = 0; k < n; k++) out[k] = f16_to_f32(h[k]);
    }
}

/* Elements i0 .. i0+n-1 of dst (type W_F32, W_BF16 or W_F16) = in [n], rounded to nearest even. */
static inline void store_f32(int type, const float *in, void *dst, size_t i0, size_t n) {
    if (type == W_F32) {
        memcpy((float *)dst + i0, in, n * sizeof(float));
    } else if (type == W_BF16) {
        uint16_t *h = (uint16_t *)dst + i0;
        for (size_t k = 0; k < n; k++) h[k] = f32_to_bf16(in[k]);
    } else {
        uint16_t *h = (uint16_t *)dst + i0;
        for (size_t k = 0; k < n; k++) h[k] = f32_to_f16(in[k]);
    }
}

#define CONVERT_BLOCK 256

typedef void (*task_fn)(const void *, int, int);  /* units [u0, u1) of a task */
static void run_task(task_fn fn, const void *arg, int n, int chunk);

typedef struct {
    int stype, dtype;
    const void *src;
    void *dst;
    size_t n;
} convert_t;

static void convert_blocks(const void *arg, int b0, int b1) {
    const convert_t *c = arg;
    float buf[CONVERT_BLOCK];
    for (size_t i = (size_t)b0 * CONVERT_BLOCK; i < (size_t)b1 * CONVERT_BLOCK && i < c->n; i += CONVERT_BLOCK) {
        const size_t m = c->n - i < CONVERT_BLOCK ? c->n - i : CONVERT_BLOCK;
        load_f32(c->stype, c->src, i, m, buf);
        store_f32(c->dtype, buf, c->dst, i, m);
    }
}

/* dst [n] of type `dtype` = src [n] of type `stype` (W_F32, W_BF16, W_F16), through float32, on the pool
 * in chunks of 64 blocks (a prefill chunk's activations are ~10^6 elements). */
static void convert(int stype, const void *src, int dtype, void *dst, size_t n) {
    if (stype == dtype) {
        memmove(dst, src, n * (stype == W_F32 ? 4 : 2));
        return;
    }
    const convert_t c = {stype, dtype, src, dst, n};
    run_task(convert_blocks, &c, (int)((n + CONVERT_BLOCK - 1) / CONVERT_BLOCK), 64);
}

/* The entry points take activations and give results as float32, bfloat16 or float16 (the W_ codes)
 * and compute in float32: f32_in gives the input as float32 (a converted copy in *owned, to free),
 * f32_out a float32 buffer for the result and f32_done stores it in the caller's type. */
static const float *f32_in(int type, const void *x, size_t n, float **owned) {
    *owned = NULL;
    if (type == W_F32) return x;
    if (!(*owned = malloc(n * sizeof(float)))) return NULL;
    convert(type, x, W_F32, *owned, n);
    return *owned;
}

static float *f32_out(int type, void *y, size_t n, float **owned) {
    *owned = NULL;
    if (type == W_F32) return y;
    return *owned = malloc(n * sizeof(float));
}

static void f32_done(int type, float *owned, void *y, size_t n) {
    if (owned) convert(W_F32, owned, type, y, n);
    free(owned);
}

static inline int bad_type(int type) { return type < W_F32 || type > W_F16; }

static void dense_rows_scalar(const job_t *j, int r0, int r1) {
    const int I = j->I;
    for (int r = r0; r < r1; r++)
        for (int t = 0; t < j->T; t++) {
            const float *x = j->xf + (size_t)t * I;
            float acc = 0.f;
            for (int i = 0; i < I; i++) acc += dense_w(j, (size_t)r * I + i) * x[i];
            j->y[(size_t)t * j->O + r] = acc;
        }
}

/* Quantizers, bit for bit the arithmetic of mixtral_cli/kernels/formats.py (and so of bitsandbytes for nf4):
 * nf4: v = clamp(x * (1 / max(absmax, 1e-38)), -1, 1), code = number of midpoints below v;
 * int8: s = absmax / 127, q = round-half-even(x / max(s, 1e-30)), clamped to [-127, 127].
 * Written as plain loops over one block that the compiler vectorizes (an AVX2 clone is picked at load
 * time: the result is the same bit for bit on every instruction set). */
/* max |v|: on the bit patterns (for non-NaN floats, |x| orders like its bits), which vectorizes. */
static inline float absmax_of(const float *v, int n) {
    const uint32_t *u = (const uint32_t *)v;
    uint32_t m = 0;
    for (int k = 0; k < n; k++) {
        const uint32_t a = u[k] & 0x7FFFFFFFu;
        m = a > m ? a : m;
    }
    float f;
    memcpy(&f, &m, 4);
    return f;
}

__attribute__((target_clones("avx2", "default"))) static void quant_nf4_rows(const job_t *j, int r0, int r1) {
    const int I = j->I, bs = j->gs;
    float v[4096];
    uint8_t code[4096];
    float mids[15];
    memcpy(mids, j->mids, sizeof mids);
    for (int r = r0; r < r1; r++)
        for (int b0 = 0; b0 < I; b0 += bs) {
            const size_t base = (size_t)r * I + b0;
            load_f32(j->wtype, j->qweight, base, bs, v);
            const float amax = absmax_of(v, bs);
            j->y[base / bs] = amax;
            const float inv = 1.0f / (amax > 1e-38f ? amax : 1e-38f);
            for (int k = 0; k < bs; k++) {
                float x = v[k] * inv;
                x = x < -1.f ? -1.f : x > 1.f ? 1.f : x;
                uint8_t c = 0;
                for (int m = 0; m < 15; m++) c += x > mids[m];
                code[k] = c;
            }
            uint8_t *out = j->qout + base / 2;
            for (int k = 0; k < bs / 2; k++) out[k] = (uint8_t)(code[2 * k] << 4 | code[2 * k + 1]);
        }
}

__attribute__((target_clones("avx2", "default"))) static void quant_int8_rows(const job_t *j, int r0, int r1) {
    const int I = j->I, gs = j->gs;
    float v[4096];
    for (int r = r0; r < r1; r++)
        for (int b0 = 0; b0 < I; b0 += gs) {
            const size_t base = (size_t)r * I + b0;
            const int n = gs < 4096 ? gs : 4096;
            float amax = 0.f;  /* blocks wider than the buffer are read in parts */
            for (int k0 = 0; k0 < gs; k0 += n) {
                const int len = gs - k0 < n ? gs - k0 : n;
                load_f32(j->wtype, j->qweight, base + k0, len, v);
                const float a = absmax_of(v, len);
                amax = a > amax ? a : amax;
            }
            const float sc = amax / 127.f, div = sc > 1e-30f ? sc : 1e-30f;
            j->y[base / gs] = sc;
            for (int k0 = 0; k0 < gs; k0 += n) {
                const int len = gs - k0 < n ? gs - k0 : n;
                load_f32(j->wtype, j->qweight, base + k0, len, v);
                int8_t *out = (int8_t *)j->qout + base + k0;
                for (int k = 0; k < len; k++) {
                    float q = rintf(v[k] / div);
                    q = q < -127.f ? -127.f : q > 127.f ? 127.f : q;
                    out[k] = (int8_t)q;
                }
            }
        }
}

/* ---- AVX2 kernels -------------------------------------------------------------------------- */

__attribute__((target("avx2,fma"))) static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* int32x8 lane sums of w . x for 32 int8 pairs, given ax = |x| (computed once per call): ax is
 * maddubs' unsigned operand and w carries x's sign (no saturation since |x|, |w| <= 127). */
__attribute__((target("avx2,fma"))) static inline __m256i int8_dot32(__m256i w, __m256i x, __m256i ax) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w, x)), _mm256_set1_epi16(1));
}

/* out[i] = dyn[codes[i]] (n a multiple of 4) with plain loads: the empty asm statement keeps the
 * vectoriser from turning the loop into AVX2 gathers, which made the whole nf4 product ~7% slower
 * on Zen 3. */
static inline void dyn_lookup(const float *dyn, const uint8_t *codes, int n, float *out) {
    for (int i = 0; i < n; i += 4) {
        out[i] = dyn[codes[i]];
        out[i + 1] = dyn[codes[i + 1]];
        out[i + 2] = dyn[codes[i + 2]];
        out[i + 3] = dyn[codes[i + 3]];
        __asm__ volatile("" ::: "memory");
    }
}

/* Whether each 64-weight chunk has its own absmax and 8 blocks of a row never straddle a 256-block
 * sabs group: the case where a row's absmax is its looked-up codes scaled as one vector pass. */
static inline int nf4_one_block_per_chunk(const job_t *j) { return j->gs == 64 && (j->I / 64) % 8 == 0; }

/* am[b] = am[b] * sabs + offset for the codes of row r already looked up in am (one block per chunk). */
__attribute__((target("avx2,fma"))) static inline void nf4_absmax_scale(const job_t *j, int r, float *am) {
    const int nblk = j->I / 64;
    const size_t b0 = (size_t)r * nblk;
    const __m256 off = _mm256_set1_ps(j->offset);
    for (int b = 0; b < nblk; b += 8)
        _mm256_storeu_ps(am + b, _mm256_fmadd_ps(_mm256_loadu_ps(am + b), _mm256_set1_ps(j->sabs[(b0 + b) / 256]), off));
}

/* Absmax of each 64-weight chunk of row r, in am[I/64]. */
__attribute__((target("avx2,fma"))) static inline void nf4_chunk_absmax(const job_t *j, int r, float *am) {
    const int cpb = j->gs / 64, nblk = j->I / j->gs;
    const size_t b0 = (size_t)r * nblk;
    if (nf4_one_block_per_chunk(j)) {
        dyn_lookup(j->dyn, j->scales + b0, nblk, am);
        nf4_absmax_scale(j, r, am);
        return;
    }
    for (int b = 0, c = 0; b < nblk; b++) {
        const float v = nf4_absmax(j, b0 + b);
        for (int k = 0; k < cpb; k++) am[c++] = v;
    }
}

/* sum_c am[c] * xs[c]: the offset correction of the unsigned levels for one token of one row. */
__attribute__((target("avx2,fma"))) static inline float nf4_offset_correction(const float *am, const float *xs, int nch) {
    __m256 acc = _mm256_setzero_ps();
    int c = 0;
    for (; c + 8 <= nch; c += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(am + c), _mm256_loadu_ps(xs + c), acc);
    float sum = hsum256(acc);
    for (; c < nch; c++) sum += am[c] * xs[c];
    return sum;
}

/* The 64 unsigned levels (u = level + 63, table) of one nf4 chunk of 32 packed bytes at q: high
 * nibbles (even elements) in *uh, low nibbles (odd elements) in *ul. */
__attribute__((target("avx2,fma"))) static inline void nf4_unpack(const uint8_t *q, __m256i table, __m256i *uh, __m256i *ul) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), b = _mm256_loadu_si256((const __m256i *)q);
    *uh = _mm256_shuffle_epi8(table, _mm256_and_si256(_mm256_srli_epi16(b, 4), low4));
    *ul = _mm256_shuffle_epi8(table, _mm256_and_si256(b, low4));
}

/* int32x8 lane sums of one unpacked chunk with its 64 nibble-ordered int8 activations at xq. */
__attribute__((target("avx2,fma"))) static inline __m256i nf4_dot_u(__m256i uh, __m256i ul, const int8_t *xq) {
    const __m256i ones = _mm256_set1_epi16(1);
    return _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(uh, _mm256_loadu_si256((const __m256i *)xq)), ones),
                            _mm256_madd_epi16(_mm256_maddubs_epi16(ul, _mm256_loadu_si256((const __m256i *)(xq + 32))), ones));
}

/* float32x8 lane sums of one 64-weight nf4 chunk (32 packed bytes at q) with its activations at xq. */
__attribute__((target("avx2,fma"))) static inline __m256 nf4_chunk_u(const uint8_t *q, const int8_t *xq, __m256i table) {
    __m256i uh, ul;
    nf4_unpack(q, table, &uh, &ul);
    return _mm256_cvtepi32_ps(nf4_dot_u(uh, ul, xq));
}

/* One token (decode). Levels as unsigned bytes u = level + 63, so maddubs(u, x) needs no sign
 * trick: sum(level * x) = sum(u * x) - 63 * sum(x), the second term folded in per row from the
 * activation sums. Two accumulators in registers keep the FMA latency out of the loop. With one
 * absmax per chunk, the next row's absmax codes are looked up inside this row's chunk loop: the
 * scalar table loads ride along the vector work instead of stalling between rows. */
__attribute__((target("avx2,fma"))) static void nf4_rows1_avx2(const job_t *j, int r0, int r1) {
    const int I = j->I, nch = I / 64, piped = nf4_one_block_per_chunk(j);
    const __m256i table = _mm256_add_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)j->levels)),
                                          _mm256_set1_epi8(NF4_LEVEL_SCALE));
    float *am = __builtin_alloca((size_t)nch * sizeof(float)), *s = __builtin_alloca((size_t)nch * sizeof(float));
    float *next = __builtin_alloca((size_t)nch * sizeof(float));
    if (piped) dyn_lookup(j->dyn, j->scales + (size_t)r0 * nch, nch, next);
    for (int r = r0; r < r1; r++) {
        const uint8_t *q = j->qweight + (size_t)r * I / 2;
        const int8_t *xq = j->xq;
        if (piped) {
            float *t = am;
            am = next, next = t;
            nf4_absmax_scale(j, r, am);
        } else {
            nf4_chunk_absmax(j, r, am);
        }
        for (int c = 0; c < nch; c++) s[c] = am[c] * j->xd[c];
        const float corr = nf4_offset_correction(am, j->xs, nch);
        const uint8_t *codes = j->scales + (size_t)(r + 1 < r1 ? r + 1 : r) * nch;  /* the last row: its own, unused */
        __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
        int c = 0;
        for (; c + 2 <= nch; c += 2) {
            acc0 = _mm256_fmadd_ps(nf4_chunk_u(q + (size_t)c * 32, xq + (size_t)c * 64, table), _mm256_broadcast_ss(s + c), acc0);
            acc1 = _mm256_fmadd_ps(nf4_chunk_u(q + (size_t)c * 32 + 32, xq + (size_t)c * 64 + 64, table),
                                   _mm256_broadcast_ss(s + c + 1), acc1);
            if (piped) {
                next[c] = j->dyn[codes[c]];
                next[c + 1] = j->dyn[codes[c + 1]];
            }
        }
        if (c < nch)
            acc0 = _mm256_fmadd_ps(nf4_chunk_u(q + (size_t)c * 32, xq + (size_t)c * 64, table), _mm256_broadcast_ss(s + c), acc0);
        j->y[r] = hsum256(_mm256_add_ps(acc0, acc1)) * (1.f / NF4_LEVEL_SCALE) - corr;
    }
}

/* NT tokens (a compile-time constant after inlining, so the accumulators live in registers) through
 * row r, whose chunk absmax values are am[]: the weight chunk is decoded once for all NT tokens. */
__attribute__((target("avx2,fma"), always_inline)) static inline void nf4_tile(const job_t *j, int r, int t0, const int NT,
                                                                              const float *am) {
    const int I = j->I, nch = I / 64;
    const __m256i table = _mm256_add_epi8(_mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)j->levels)),
                                          _mm256_set1_epi8(NF4_LEVEL_SCALE));
    __m256 acc[TOK_TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    const uint8_t *q = j->qweight + (size_t)r * I / 2;
    for (int c = 0; c < nch; c++, q += 32) {
        __m256i uh, ul;
        nf4_unpack(q, table, &uh, &ul);
        const __m256 a = _mm256_broadcast_ss(am + c);
        for (int t = 0; t < NT; t++) {
            const __m256i p = nf4_dot_u(uh, ul, j->xq + (size_t)(t0 + t) * I + (size_t)c * 64);
            const __m256 sc = _mm256_mul_ps(a, _mm256_broadcast_ss(j->xd + (size_t)(t0 + t) * nch + c));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), sc, acc[t]);
        }
    }
    for (int t = 0; t < NT; t++)
        j->y[(size_t)(t0 + t) * j->O + r] = hsum256(acc[t]) * (1.f / NF4_LEVEL_SCALE)
                                             - nf4_offset_correction(am, j->xs + (size_t)(t0 + t) * nch, nch);
}

/* Several tokens (small prefill chunks, grouped expert calls): tiles of TOK_TILE tokens per row. */
__attribute__((target("avx2,fma"))) static void nf4_rows_avx2(const job_t *j, int r0, int r1) {
    float *am = __builtin_alloca((size_t)(j->I / 64) * sizeof(float));
    for (int r = r0; r < r1; r++) {
        nf4_chunk_absmax(j, r, am);
        for (int t0 = 0; t0 < j->T; t0 += TOK_TILE) {
            switch (j->T - t0) {
            case 1: nf4_tile(j, r, t0, 1, am); break;
            case 2: nf4_tile(j, r, t0, 2, am); break;
            case 3: nf4_tile(j, r, t0, 3, am); break;
            default: nf4_tile(j, r, t0, TOK_TILE, am);
            }
        }
    }
}

/* One token (decode), NR rows at a time (NR compile-time after inlining): NR weight streams in
 * flight per core (one sequential stream reads well below the memory bandwidth: 4 rows read ~30%
 * faster on Zen 3) and each activation block loaded once for NR rows. |x| is computed once per call
 * (xa), so each 32-byte block costs one sign, one maddubs, one madd and one FMA against its
 * activation scale; the weight group's scale multiplies the group's partial sum once. */
__attribute__((target("avx2,fma"), always_inline)) static inline void int8_rows1_tile(const job_t *j, int r, const int NR) {
    const int I = j->I, G = I / j->gs, bpg = j->gs / QBLOCK;
    const float *scales = (const float *)j->scales;
    const int8_t *w = (const int8_t *)j->qweight + (size_t)r * I;
    __m256 acc[4];
    for (int i = 0; i < NR; i++) acc[i] = _mm256_setzero_ps();
    for (int g = 0, b = 0; g < G; g++) {
        __m256 part[4];
        for (int i = 0; i < NR; i++) part[i] = _mm256_setzero_ps();
        for (int k = 0; k < bpg; k++, b++) {
            const __m256i x = _mm256_loadu_si256((const __m256i *)(j->xq + (size_t)b * QBLOCK));
            const __m256i ax = _mm256_loadu_si256((const __m256i *)(j->xa + (size_t)b * QBLOCK));
            const __m256 xd = _mm256_broadcast_ss(j->xd + b);
            for (int i = 0; i < NR; i++) {
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + (size_t)i * I + (size_t)b * QBLOCK));
                part[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(int8_dot32(wv, x, ax)), xd, part[i]);
            }
        }
        for (int i = 0; i < NR; i++) acc[i] = _mm256_fmadd_ps(part[i], _mm256_set1_ps(scales[(size_t)(r + i) * G + g]), acc[i]);
    }
    for (int i = 0; i < NR; i++) j->y[r + i] = hsum256(acc[i]);
}

__attribute__((target("avx2,fma"))) static void int8_rows1_avx2(const job_t *j, int r0, int r1) {
    int r = r0;
    for (; r + 4 <= r1; r += 4) int8_rows1_tile(j, r, 4);
    for (; r < r1; r++) int8_rows1_tile(j, r, 1);
}

/* NT tokens (compile-time after inlining: accumulators in registers) through row r of int8 W. */
__attribute__((target("avx2,fma"), always_inline)) static inline void int8_tile(const job_t *j, int r, int t0, const int NT) {
    const int I = j->I, G = I / j->gs, bpg = j->gs / QBLOCK, nb = I / QBLOCK;
    const int8_t *wrow = (const int8_t *)j->qweight + (size_t)r * I;
    __m256 acc[TOK_TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int g = 0, b = 0; g < G; g++) {
        __m256 part[TOK_TILE];
        for (int t = 0; t < NT; t++) part[t] = _mm256_setzero_ps();
        for (int k = 0; k < bpg; k++, b++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(wrow + (size_t)b * QBLOCK));
            for (int t = 0; t < NT; t++) {
                const size_t at = (size_t)(t0 + t) * I + (size_t)b * QBLOCK;
                const __m256i x = _mm256_loadu_si256((const __m256i *)(j->xq + at));
                const __m256i ax = _mm256_loadu_si256((const __m256i *)(j->xa + at));
                const __m256i p = int8_dot32(w, x, ax);
                part[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(p), _mm256_broadcast_ss(j->xd + (size_t)(t0 + t) * nb + b), part[t]);
            }
        }
        const __m256 sg = _mm256_broadcast_ss((const float *)j->scales + (size_t)r * G + g);
        for (int t = 0; t < NT; t++) acc[t] = _mm256_fmadd_ps(part[t], sg, acc[t]);
    }
    for (int t = 0; t < NT; t++) j->y[(size_t)(t0 + t) * j->O + r] = hsum256(acc[t]);
}

__attribute__((target("avx2,fma"))) static void int8_rows_avx2(const job_t *j, int r0, int r1) {
    for (int r = r0; r < r1; r++)
        for (int t0 = 0; t0 < j->T; t0 += TOK_TILE) {
            switch (j->T - t0) {
            case 1: int8_tile(j, r, t0, 1); break;
            case 2: int8_tile(j, r, t0, 2); break;
            case 3: int8_tile(j, r, t0, 3); break;
            default: int8_tile(j, r, t0, TOK_TILE);
            }
        }
}

__attribute__((target("avx2,fma"))) static void nf4_dequant_rows_avx2(const job_t *j, int r0, int r1) {
    const int I = j->I;
    const __m256 codes_lo = _mm256_loadu_ps(j->codes), codes_hi = _mm256_loadu_ps(j->codes + 8);
    const __m256i seven = _mm256_set1_epi32(7), low4 = _mm256_set1_epi32(15);
    const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3), shifts = _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0);
    for (int r = r0; r < r1; r++) {
        float *out = j->y + (size_t)r * I;
        const uint8_t *q = j->qweight + (size_t)r * I / 2;
        for (int i = 0; i < I; i += 8) {
            const __m256 am = _mm256_set1_ps(nf4_absmax(j, ((size_t)r * I + i) / j->gs));
            int32_t four;
            memcpy(&four, q + i / 2, 4);
            /* 4 bytes -> 8 codes in element order: high nibble, low nibble, ... */
            const __m256i b = _mm256_permutevar8x32_epi32(_mm256_cvtepu8_epi32(_mm_cvtsi32_si128(four)), dup);
            const __m256i e = _mm256_and_si256(_mm256_srlv_epi32(b, shifts), low4);
            const __m256 lo = _mm256_permutevar8x32_ps(codes_lo, e), hi = _mm256_permutevar8x32_ps(codes_hi, e);
            const __m256 mask = _mm256_castsi256_ps(_mm256_cmpgt_epi32(e, seven));
            _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_blendv_ps(lo, hi, mask), am));
        }
    }
}

/* Elements i .. i+7 of a float32/bfloat16/float16 array as float32 (WT compile-time after inlining). */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline __m256 load8_f32(const void *base, size_t i, const int WT) {
    if (WT == W_F32) return _mm256_loadu_ps((const float *)base + i);
    const __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
    if (WT == W_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* One token, four rows at a time: four weight streams in flight (memory-level parallelism: one
 * sequential stream per core reads well below the memory bandwidth) and one activation load per
 * four FMAs; one loop per weight type, so the conversion is not a branch in the hot loop.
 * y[r..r+3] for rows r..r+3 (all valid). */
#define DENSE_DOT4(NAME, WT)                                                                        \
    __attribute__((target("avx2,fma,f16c"))) static void NAME(const job_t *j, int r, const float *x, float *y) { \
        const int I = j->I, main8 = I & ~7;                                                         \
        const size_t b0 = (size_t)r * I, b1 = b0 + I, b2 = b1 + I, b3 = b2 + I;                   \
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;                                 \
        int i = 0;                                                                                  \
        for (; i < main8; i += 8) {                                                                 \
            const __m256 xv = _mm256_loadu_ps(x + i);                                               \
            a0 = _mm256_fmadd_ps(load8_f32(j->qweight, b0 + i, WT), xv, a0);                      \
            a1 = _mm256_fmadd_ps(load8_f32(j->qweight, b1 + i, WT), xv, a1);                      \
            a2 = _mm256_fmadd_ps(load8_f32(j->qweight, b2 + i, WT), xv, a2);                      \
            a3 = _mm256_fmadd_ps(load8_f32(j->qweight, b3 + i, WT), xv, a3);                      \
        }                                                                                           \
        float s0 = hsum256(a0), s1 = hsum256(a1), s2 = hsum256(a2), s3 = hsum256(a3);               \
        for (; i < I; i++) {                                                                        \
            s0 += dense_w(j, b0 + i) * x[i];                                                        \
            s1 += dense_w(j, b1 + i) * x[i];                                                        \
            s2 += dense_w(j, b2 + i) * x[i];                                                        \
            s3 += dense_w(j, b3 + i) * x[i];                                                        \
        }                                                                                           \
        y[r] = s0, y[r + 1] = s1, y[r + 2] = s2, y[r + 3] = s3;                                     \
    }
DENSE_DOT4(dense_dot4_f32, W_F32)
DENSE_DOT4(dense_dot4_bf16, W_BF16)
DENSE_DOT4(dense_dot4_f16, W_F16)

/* NT tokens through row r of a dense W of weight type WT (both compile-time after inlining: the
 * accumulators live in registers and the conversion is not a branch in the loop). */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void dense_tile(const job_t *j, int r, int t0,
                                                                                     const int NT, const int WT) {
    const int I = j->I, main = I & ~7;
    const size_t base = (size_t)r * I;
    __m256 acc[TOK_TILE];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (int i = 0; i < main; i += 8) {
        const __m256 w = load8_f32(j->qweight, base + i, WT);
        for (int t = 0; t < NT; t++) acc[t] = _mm256_fmadd_ps(w, _mm256_loadu_ps(j->xf + (size_t)(t0 + t) * I + i), acc[t]);
    }
    for (int t = 0; t < NT; t++) {
        float sum = hsum256(acc[t]);
        for (int i = main; i < I; i++) sum += dense_w(j, base + i) * j->xf[(size_t)(t0 + t) * I + i];
        j->y[(size_t)(t0 + t) * j->O + r] = sum;
    }
}

#define DENSE_TILES(WT)                                                 \
    switch (j->T - t0) {                                                \
    case 1: dense_tile(j, r, t0, 1, WT); break;                         \
    case 2: dense_tile(j, r, t0, 2, WT); break;                         \
    case 3: dense_tile(j, r, t0, 3, WT); break;                         \
    default: dense_tile(j, r, t0, TOK_TILE, WT);                        \
    }

__attribute__((target("avx2,fma,f16c"))) static void dense_rows_avx2(const job_t *j, int r0, int r1) {
    for (int r = r0; r < r1; r++) {
        if (j->T == 1 && r + 4 <= r1) {
            (j->wtype == W_BF16 ? dense_dot4_bf16 : j->wtype == W_F16 ? dense_dot4_f16 : dense_dot4_f32)(j, r, j->xf, j->y);
            r += 3;
            continue;
        }
        for (int t0 = 0; t0 < j->T; t0 += TOK_TILE) {
            if (j->wtype == W_BF16) {
                DENSE_TILES(W_BF16)
            } else if (j->wtype == W_F16) {
                DENSE_TILES(W_F16)
            } else {
                DENSE_TILES(W_F32)
            }
        }
    }
}

/* ---- attention of one query token --------------------------------------------------------- */

/* Grouped-query attention of one query token over cached keys and values: query heads
 * h*G .. h*G+G-1 (G = H / K) share kv head h. Scores, softmax and the weighted sum in float32. */
typedef struct {
    int H, K, S, s0, D, wtype; /* keys s0 .. S-1 are attended; wtype: W_F32, W_BF16 or W_F16 */
    size_t hstride;            /* elements between kv heads in k and v; positions are D apart */
    const void *k, *v;
    const float *q;            /* [H, D] */
    float scale;
    float *p;                  /* [H, S] scratch: scores, then unnormalised probabilities */
    float *y;                  /* [H, D] */
} attn_t;

/* p[s] = exp(p[s] - max p) for s in [s0, S); returns their sum. */
static float softmax_unnormalised(float *p, int s0, int S) {
    float m = -INFINITY, sum = 0.f;
    for (int s = s0; s < S; s++) m = p[s] > m ? p[s] : m;
    for (int s = s0; s < S; s++) {
        p[s] = expf(p[s] - m);
        sum += p[s];
    }
    return sum;
}

static void attn_heads_scalar(const attn_t *a, int h0, int h1) {
    const int G = a->H / a->K, D = a->D;
    for (int h = h0; h < h1; h++) {
        const size_t base = (size_t)h * a->hstride;
        for (int qh = h * G; qh < (h + 1) * G; qh++) {
            const float *q = a->q + (size_t)qh * D;
            float *p = a->p + (size_t)qh * a->S, *y = a->y + (size_t)qh * D;
            for (int s = a->s0; s < a->S; s++) {
                float dot = 0.f;
                for (int d = 0; d < D; d++) dot += q[d] * elem_f32(a->k, a->wtype, base + (size_t)s * D + d);
                p[s] = dot * a->scale;
            }
            const float inv = 1.f / softmax_unnormalised(p, a->s0, a->S);
            for (int d = 0; d < D; d++) y[d] = 0.f;
            for (int s = a->s0; s < a->S; s++)
                for (int d = 0; d < D; d++) y[d] += p[s] * elem_f32(a->v, a->wtype, base + (size_t)s * D + d);
            for (int d = 0; d < D; d++) y[d] *= inv;
        }
    }
}

/* e^x for x <= 0 (softmax after subtracting the maximum), 8 at a time: x = n ln2 + r with |r| <= ln2/2,
 * e^r from its degree-7 Taylor-like polynomial (Cephes' expf coefficients), times 2^n built in the
 * exponent bits. Relative error ~2e-7; below -87 (e^x < 2e-38, nothing next to the maximum's 1) it
 * returns e^-87. */
__attribute__((target("avx2,fma"))) static inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 poly = _mm256_set1_ps(1.9875691500e-4f);
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.3981999507e-3f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(8.3334519073e-3f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(4.1665795894e-2f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(1.6666665459e-1f));
    poly = _mm256_fmadd_ps(poly, r, _mm256_set1_ps(5.0000001201e-1f));
    poly = _mm256_add_ps(_mm256_fmadd_ps(poly, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(poly, _mm256_castsi256_ps(e));
}

/* softmax_unnormalised with the maximum, the exponentials and their sum 8 at a time. */
__attribute__((target("avx2,fma"))) static float softmax_unnormalised_avx2(float *p, int s0, int S) {
    float m = -INFINITY;
    int s = s0;
    __m256 mv = _mm256_set1_ps(-INFINITY);
    for (; s + 8 <= S; s += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(p + s));
    for (; s < S; s++) m = p[s] > m ? p[s] : m;
    float lanes[8];
    _mm256_storeu_ps(lanes, mv);
    for (int i = 0; i < 8; i++) m = lanes[i] > m ? lanes[i] : m;
    const __m256 mb = _mm256_set1_ps(m);
    __m256 sum = _mm256_setzero_ps();
    for (s = s0; s + 8 <= S; s += 8) {
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(p + s), mb));
        _mm256_storeu_ps(p + s, e);
        sum = _mm256_add_ps(sum, e);
    }
    float total = hsum256(sum);
    for (; s < S; s++) {
        p[s] = expf(p[s] - m);
        total += p[s];
    }
    return total;
}

/* Query heads qh0 .. qh0+NG-1 (NG <= 4, compile-time after inlining) of kv head h, D a multiple of 8.
 * Scores: each key row is converted once, 8 floats at a time, for all NG heads (two accumulators
 * per head keep the FMA latency off the critical path). Output: 16 floats of every head at a time
 * over all positions, each value row converted once per block. */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void attn_group_avx2(const attn_t *a, int h, int qh0,
                                                                                          const int NG, const int WT) {
    const int D = a->D, S = a->S;
    const size_t base = (size_t)h * a->hstride;
    const float *q = a->q + (size_t)qh0 * D;
    float *p = a->p + (size_t)qh0 * S;
    for (int s = a->s0; s < S; s++) {
        const size_t row = base + (size_t)s * D;
        __m256 acc[4][2];
        for (int g = 0; g < NG; g++) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
        for (int d = 0; d < D; d += 8) {
            const __m256 k8 = load8_f32(a->k, row + d, WT);
            for (int g = 0; g < NG; g++)
                acc[g][(d >> 3) & 1] = _mm256_fmadd_ps(k8, _mm256_loadu_ps(q + (size_t)g * D + d), acc[g][(d >> 3) & 1]);
        }
        for (int g = 0; g < NG; g++) p[(size_t)g * S + s] = hsum256(_mm256_add_ps(acc[g][0], acc[g][1])) * a->scale;
    }
    float inv[4];
    for (int g = 0; g < NG; g++) inv[g] = 1.f / softmax_unnormalised_avx2(p + (size_t)g * S, a->s0, S);
    for (int d0 = 0; d0 < D; d0 += 16) {
        const int two = d0 + 16 <= D;  /* else the last 8 floats */
        __m256 acc[4][2];
        for (int g = 0; g < NG; g++) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
        for (int s = a->s0; s < S; s++) {
            const size_t row = base + (size_t)s * D + d0;
            const __m256 v0 = load8_f32(a->v, row, WT), v1 = two ? load8_f32(a->v, row + 8, WT) : _mm256_setzero_ps();
            for (int g = 0; g < NG; g++) {
                const __m256 w = _mm256_broadcast_ss(p + (size_t)g * S + s);
                acc[g][0] = _mm256_fmadd_ps(w, v0, acc[g][0]);
                acc[g][1] = _mm256_fmadd_ps(w, v1, acc[g][1]);
            }
        }
        for (int g = 0; g < NG; g++) {
            float *y = a->y + (size_t)(qh0 + g) * D + d0;
            const __m256 ig = _mm256_set1_ps(inv[g]);
            _mm256_storeu_ps(y, _mm256_mul_ps(acc[g][0], ig));
            if (two) _mm256_storeu_ps(y + 8, _mm256_mul_ps(acc[g][1], ig));
        }
    }
}

/* kv head h: its query heads in groups of up to 4. */
__attribute__((target("avx2,fma,f16c"), always_inline)) static inline void attn_head_avx2(const attn_t *a, int h, const int WT) {
    const int G = a->H / a->K;
    for (int g0 = 0; g0 < G; g0 += 4) {
        const int qh0 = h * G + g0;
        switch (G - g0) {
        case 1: attn_group_avx2(a, h, qh0, 1, WT); break;
        case 2: attn_group_avx2(a, h, qh0, 2, WT); break;
        case 3: attn_group_avx2(a, h, qh0, 3, WT); break;
        default: attn_group_avx2(a, h, qh0, 4, WT);
        }
    }
}

__attribute__((target("avx2,fma,f16c"))) static void attn_heads_avx2(const attn_t *a, int h0, int h1) {
    for (int h = h0; h < h1; h++) {
        if (a->wtype == W_BF16)
            attn_head_avx2(a, h, W_BF16);
        else if (a->wtype == W_F16)
            attn_head_avx2(a, h, W_F16);
        else
            attn_head_avx2(a, h, W_F32);
    }
}

static void attn_task_scalar(const void *arg, int h0, int h1) { attn_heads_scalar(arg, h0, h1); }
static void attn_task_avx2(const void *arg, int h0, int h1) { attn_heads_avx2(arg, h0, h1); }

/* ---- thread pool --------------------------------------------------------------------------- */

typedef void (*rows_fn)(const job_t *, int, int);

static rows_fn pick(const job_t *j) {
    if (j->fmt == FMT_NF4) return j->isa != ISA_AVX2 ? nf4_rows_scalar : j->T == 1 ? nf4_rows1_avx2 : nf4_rows_avx2;
    if (j->fmt == FMT_INT8) return j->isa != ISA_AVX2 ? int8_rows_scalar : j->T == 1 ? int8_rows1_avx2 : int8_rows_avx2;
    if (j->fmt == FMT_DENSE) return j->isa == ISA_AVX2 ? dense_rows_avx2 : dense_rows_scalar;
    if (j->fmt == FMT_QUANT_NF4) return quant_nf4_rows;
    if (j->fmt == FMT_QUANT_INT8) return quant_int8_rows;
    return j->isa == ISA_AVX2 ? nf4_dequant_rows_avx2 : nf4_dequant_rows_scalar;
}

#define MAX_THREADS 256

static struct {
    pthread_mutex_t mu;
    pthread_cond_t wake;
    int n_workers;                 /* threads besides the caller */
    task_fn fn;                    /* the task, valid while its chunks are not all done */
    const void *arg;
    int n_units, chunk, n_chunks;
    _Atomic uint64_t next;         /* generation << 32 | next chunk */
    _Atomic int done;              /* chunks finished in the current generation */
    _Atomic uint32_t generation;
    pthread_mutex_t call_mu;       /* one job at a time */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 0, NULL, NULL, 0, 0, 0, 0, 0, 0, PTHREAD_MUTEX_INITIALIZER};

/* Take and run chunks of generation `gen` until none are left. */
static void work(uint32_t gen) {
    for (;;) {
        uint64_t v = atomic_load(&pool.next);
        if ((uint32_t)(v >> 32) != gen || (int)(uint32_t)v >= pool.n_chunks) return;
        if (!atomic_compare_exchange_weak(&pool.next, &v, v + 1)) continue;
        const int c = (int)(uint32_t)v;
        const int u0 = c * pool.chunk, u1 = u0 + pool.chunk < pool.n_units ? u0 + pool.chunk : pool.n_units;
        pool.fn(pool.arg, u0, u1);
        atomic_fetch_add(&pool.done, 1);
    }
}

static void *worker(void *arg) {
    (void)arg;
    uint32_t seen = 0;
    for (;;) {
        /* a short spin catches back-to-back calls; then sleep, so an idle pool costs nothing */
        uint32_t gen = seen;
        for (int spin = 0; spin < 4000 && gen == seen; spin++) {
            _mm_pause();
            gen = atomic_load(&pool.generation);
        }
        if (gen == seen) {
            pthread_mutex_lock(&pool.mu);
            while ((gen = atomic_load(&pool.generation)) == seen) pthread_cond_wait(&pool.wake, &pool.mu);
            pthread_mutex_unlock(&pool.mu);
        }
        seen = gen;
        work(gen);
    }
    return NULL;
}

/* Total threads, the caller included. Workers are started on demand and never stopped. */
int mx_set_threads(int n) {
    if (n < 1) n = 1;
    if (n > MAX_THREADS) n = MAX_THREADS;
    pthread_mutex_lock(&pool.call_mu);
    while (pool.n_workers < n - 1) {
        pthread_t th;
        if (pthread_create(&th, NULL, worker, NULL) != 0) break;
        pthread_detach(th);
        pool.n_workers++;
    }
    pthread_mutex_unlock(&pool.call_mu);
    return pool.n_workers + 1;
}

static int active_threads = 1;

int mx_use_threads(int n) {
    int have = mx_set_threads(n);
    active_threads = n < have ? (n < 1 ? 1 : n) : have;
    return active_threads;
}

/* fn(arg, u0, u1) over units [0, n) in chunks of `chunk` units, on the pool's threads. */
static void run_task(task_fn fn, const void *arg, int n, int chunk) {
    const int n_chunks = (n + chunk - 1) / chunk;
    if (active_threads <= 1 || n_chunks <= 1) {
        fn(arg, 0, n);
        return;
    }
    pthread_mutex_lock(&pool.call_mu);
    pool.fn = fn;
    pool.arg = arg;
    pool.n_units = n;
    pool.chunk = chunk;
    pool.n_chunks = n_chunks;
    atomic_store(&pool.done, 0);
    const uint32_t gen = atomic_load(&pool.generation) + 1;
    atomic_store(&pool.next, (uint64_t)gen << 32);
    pthread_mutex_lock(&pool.mu);
    atomic_store(&pool.generation, gen);
    pthread_cond_broadcast(&pool.wake);
    pthread_mutex_unlock(&pool.mu);
    work(gen);
    while (atomic_load(&pool.done) < n_chunks) sched_yield();  /* only chunks still in other hands */
    pthread_mutex_unlock(&pool.call_mu);
}

static void job_rows(const void *arg, int r0, int r1) {
    const job_t *j = arg;
    pick(j)(j, r0, r1);
}

/* Weight bytes of one row of a matmul-like job. */
static size_t row_bytes(const job_t *j) {
    if (j->fmt == FMT_NF4 || j->fmt == FMT_NF4_DEQUANT) return (size_t)j->I / 2;
    if (j->fmt == FMT_INT8) return (size_t)j->I;
    return (size_t)j->I * (j->wtype == W_F32 ? 4 : 2);
}

/* A matmul-like job: its O rows in chunks of at least ROWS_CHUNK rows and about CHUNK_BYTES of
 * weights (a multiple of 4 rows): short rows in 16-row chunks were too short a stream for the
 * hardware prefetcher (a `mini` nf4 expert, 512-byte rows: ~730 -> ~530 us per call). */
static void run_job(const job_t *j) {
    int chunk = ROWS_CHUNK;
    if (j->fmt != FMT_QUANT_NF4 && j->fmt != FMT_QUANT_INT8) {
        const size_t want = CHUNK_BYTES / row_bytes(j);
        if (want > (size_t)chunk) chunk = (int)(want / 4 * 4);
    }
    run_task(job_rows, j, j->O, chunk);
}

/* ---- entry points ------------------------------------------------------------------------- */

/* Quantized activations of T rows of n floats for a product with nf4 (fmt FMT_NF4) or int8 weights:
 * xq and xd always; nf4: xs, the scaled sum of each 64-chunk (nibble order); int8: xa = |xq|. */
typedef struct {
    int8_t *xq, *xa;
    float *xd, *xs;
} act_t;

static void act_free(act_t *a) {
    free(a->xq);
    free(a->xa);
    free(a->xd);
    free(a->xs);
    memset(a, 0, sizeof *a);
}

static int act_prepare(int fmt, const float *x, int T, int n, act_t *a) {
    const int bs = fmt == FMT_NF4 ? NF4_QBLOCK : QBLOCK;
    const size_t nb = (size_t)T * (n / bs);
    memset(a, 0, sizeof *a);
    a->xq = malloc((size_t)T * n);
    a->xd = malloc(nb * sizeof(float));
    if (fmt == FMT_NF4) a->xs = malloc(nb * sizeof(float));
    else a->xa = malloc((size_t)T * n);
    if (!a->xq || !a->xd || !(a->xs || a->xa)) { act_free(a); return -2; }
    quantize_act(x, T, n, bs, fmt == FMT_NF4, a->xq, a->xd);
    if (fmt == FMT_NF4) {
        for (size_t c = 0; c < nb; c++) {
            int32_t sum = 0;
            for (int k = 0; k < NF4_QBLOCK; k++) sum += a->xq[c * NF4_QBLOCK + k];
            a->xs[c] = a->xd[c] * (float)sum;
        }
    } else {
        for (size_t i = 0; i < (size_t)T * n; i++) a->xa[i] = (int8_t)abs(a->xq[i]);
    }
    return 0;
}

/* One quantized weight [O, I] as the entry points receive it (nf4 or int8, see the header). */
typedef struct {
    const uint8_t *qweight;
    const void *scales;
    const float *sabs;
    float offset;
} qmat_t;

/* y [T, O] = the quantized activations a [T, I] @ W.T. */
static void run_quant(int fmt, int isa, const act_t *a, int T, int O, int I, int gs, const qmat_t *w,
                      const float *dyn, const int8_t *levels, float *y) {
    job_t j = {.fmt = fmt, .isa = isa, .T = T, .O = O, .I = I, .gs = gs, .qweight = w->qweight,
               .scales = (const uint8_t *)w->scales, .sabs = w->sabs, .offset = w->offset, .dyn = dyn,
               .levels = levels, .xq = a->xq, .xd = a->xd, .xs = a->xs, .xa = a->xa, .y = y};
    run_job(&j);
}

/* y [T, O] = x [T, I] @ W for a quantized W in fmt FMT_NF4 or FMT_INT8, x of type xtype and y of type
 * ytype (W_F32, W_BF16, W_F16). */
static int quant_matmul(int fmt, int isa, int xtype, const void *x, int T, int O, int I, int gs, const qmat_t *w,
                        const float *dyn, const int8_t *levels, int ytype, void *y) {
    if (T < 1 || bad_type(xtype) || bad_type(ytype)) return -1;
    if (fmt == FMT_NF4 ? gs % 64 || I % 64 : gs % QBLOCK || I % gs) return -1;
    float *xo, *yo;
    const float *xf = f32_in(xtype, x, (size_t)T * I, &xo);
    float *yf = f32_out(ytype, y, (size_t)T * O, &yo);
    act_t a;
    int rc = -2;
    if (xf && yf && !act_prepare(fmt, xf, T, I, &a)) {
        run_quant(fmt, isa, &a, T, O, I, gs, w, dyn, levels, yf);
        act_free(&a);
        rc = 0;
    }
    free(xo);
    if (rc == 0) f32_done(ytype, yo, y, (size_t)T * O);
    else free(yo);
    return rc;
}

/* y [T, O] = x [T, I] @ W.T for nf4 W (gs a multiple of 64, I a multiple of 64). Returns 0 on success. */
int mx_nf4_matmul(int isa, int xtype, const void *x, int T, int O, int I, int gs, const uint8_t *qweight,
                  const uint8_t *scales, const float *sabs, float offset, const float *dyn,
                  const int8_t *levels, int ytype, void *y) {
    const qmat_t w = {qweight, scales, sabs, offset};
    return quant_matmul(FMT_NF4, isa, xtype, x, T, O, I, gs, &w, dyn, levels, ytype, y);
}

/* y [T, O] = x [T, I] @ W.T for block-wise int8 W (gs a multiple of 32). */
int mx_int8_matmul(int isa, int xtype, const void *x, int T, int O, int I, int gs, const int8_t *qweight,
                   const float *scales, int ytype, void *y) {
    const qmat_t w = {(const uint8_t *)qweight, scales, NULL, 0.f};
    return quant_matmul(FMT_INT8, isa, xtype, x, T, O, I, gs, &w, NULL, NULL, ytype, y);
}

/* The SwiGLU expert y [T, D] = w2(silu(w1 x) * (w3 x)) for x [T, D], w1, w3 [I, D] and w2 [D, I], all
 * nf4 (fmt 0) or all int8 (fmt 1) with one group size (the layouts and limits of mx_nf4_matmul and
 * mx_int8_matmul). x is quantized once for w1 and w3; h = silu(h1) * h3 is computed in float32 and
 * quantized as w2's activations, exactly as two separate calls would. sabs/offset/dyn/levels: nf4 only.
 * x and y: types xtype and ytype, as for mx_nf4_matmul. */
int mx_swiglu(int fmt, int isa, int xtype, const void *x, int T, int D, int I, int gs,
              const uint8_t *q1, const void *s1, const float *sabs1, float off1,
              const uint8_t *q3, const void *s3, const float *sabs3, float off3,
              const uint8_t *q2, const void *s2, const float *sabs2, float off2,
              const float *dyn, const int8_t *levels, int ytype, void *y) {
    const int f = fmt == 0 ? FMT_NF4 : FMT_INT8;
    if (T < 1 || (fmt != 0 && fmt != 1) || bad_type(xtype) || bad_type(ytype)) return -1;
    if (f == FMT_NF4 ? gs % 64 || D % 64 || I % 64 : gs % QBLOCK || D % gs || I % gs) return -1;
    const qmat_t w1 = {q1, s1, sabs1, off1}, w3 = {q3, s3, sabs3, off3}, w2 = {q2, s2, sabs2, off2};
    float *h1 = malloc((size_t)T * I * sizeof(float)), *h3 = malloc((size_t)T * I * sizeof(float)), *xo, *yo;
    const float *xf = f32_in(xtype, x, (size_t)T * D, &xo);
    act_t a;
    if (!h1 || !h3 || !xf || act_prepare(f, xf, T, D, &a)) { free(h1); free(h3); free(xo); return -2; }
    free(xo);
    run_quant(f, isa, &a, T, I, D, gs, &w1, dyn, levels, h1);
    run_quant(f, isa, &a, T, I, D, gs, &w3, dyn, levels, h3);
    act_free(&a);
    for (size_t i = 0; i < (size_t)T * I; i++) h1[i] = h1[i] / (1.f + expf(-h1[i])) * h3[i];
    free(h3);
    float *yf = f32_out(ytype, y, (size_t)T * D, &yo);
    if (!yf || act_prepare(f, h1, T, I, &a)) { free(h1); free(yo); return -2; }
    free(h1);
    run_quant(f, isa, &a, T, D, I, gs, &w2, dyn, levels, yf);
    act_free(&a);
    f32_done(ytype, yo, y, (size_t)T * D);
    return 0;
}

/* out [O, I] float32 = the exact dequantized nf4 weight (I even, gs even). */
int mx_nf4_dequant(int isa, int O, int I, int gs, const uint8_t *qweight, const uint8_t *scales,
                   const float *sabs, float offset, const float *dyn, const float *codes, float *out) {
    if (gs % 8 || I % 8) isa = ISA_SCALAR;
    job_t j = {.fmt = FMT_NF4_DEQUANT, .isa = isa, .T = 1, .O = O, .I = I, .gs = gs, .qweight = qweight,
               .scales = scales, .sabs = sabs, .offset = offset, .dyn = dyn, .codes = codes, .y = out};
    run_job(&j);
    return 0;
}

/* y [T, O] = x [T, I] @ W.T for a dense W [O, I] of float32, bfloat16 or float16 (wtype 0, 1, 2); x and
 * y of types xtype and ytype (the same codes). */
int mx_dense_matmul(int isa, int xtype, const void *x, int T, int O, int I, int wtype, const void *w, int ytype,
                    void *y) {
    if (T < 1 || bad_type(wtype) || bad_type(xtype) || bad_type(ytype)) return -1;
    float *xo, *yo;
    const float *xf = f32_in(xtype, x, (size_t)T * I, &xo);
    float *yf = f32_out(ytype, y, (size_t)T * O, &yo);
    if (!xf || !yf) { free(xo); free(yo); return -2; }
    job_t j = {.fmt = FMT_DENSE, .isa = isa, .T = T, .O = O, .I = I, .qweight = (const uint8_t *)w, .xf = xf,
               .wtype = wtype, .y = yf};
    run_job(&j);
    free(xo);
    f32_done(ytype, yo, y, (size_t)T * O);
    return 0;
}

/* Quantize a [O, I] weight (wtype as for mx_dense_matmul) block-wise along I.
 * nf4 (fmt 0): codes [O*I/2] packed, high nibble first; absmax [O*I/gs]; gs <= 4096, even.
 * int8 (fmt 1): codes [O, I] int8; scales [O*I/gs]. */
int mx_quantize(int fmt, int O, int I, int gs, int wtype, const void *w, const float *mids, uint8_t *codes,
                float *scales) {
    if (gs < 2 || gs % 2 || I % gs || (fmt == 0 && gs > 4096) || wtype < 0 || wtype > 2) return -1;
    job_t j = {.fmt = fmt == 0 ? FMT_QUANT_NF4 : FMT_QUANT_INT8, .O = O, .I = I, .gs = gs, .qweight = (const uint8_t *)w,
               .wtype = wtype, .mids = mids, .qout = codes, .y = scales};
    run_job(&j);
    return 0;
}

/* Attention of one query token: y [H, D] = softmax(scale * q k^T) v per query head, over the keys and
 * values of positions s0 .. S-1 of kv head h = query head / (H / K). k and v: element type wtype
 * (0 float32, 1 bfloat16, 2 float16), kv head h at element h * hstride, position s at s * D after it;
 * q and y: types qtype and ytype (the same codes). */
int mx_attn_decode(int isa, int qtype, const void *q, int H, int K, int D, const void *k, const void *v,
                   size_t hstride, int wtype, int s0, int S, float scale, int ytype, void *y) {
    if (H < 1 || K < 1 || H % K || D < 1 || S < 1 || s0 < 0 || s0 >= S || bad_type(wtype) || bad_type(qtype)
        || bad_type(ytype))
        return -1;
    float *p = malloc((size_t)H * S * sizeof(float)), *qo, *yo;
    const float *qf = f32_in(qtype, q, (size_t)H * D, &qo);
    float *yf = f32_out(ytype, y, (size_t)H * D, &yo);
    if (!p || !qf || !yf) { free(p); free(qo); free(yo); return -2; }
    const attn_t a = {.H = H, .K = K, .S = S, .s0 = s0, .D = D, .wtype = wtype, .hstride = hstride, .k = k, .v = v,
                      .q = qf, .scale = scale, .p = p, .y = yf};
    run_task(isa == ISA_AVX2 && D % 8 == 0 ? attn_task_avx2 : attn_task_scalar, &a, K, 1);
    free(p);
    free(qo);
    f32_done(ytype, yo, y, (size_t)H * D);
    return 0;
}

/* dst [n] of type dtype = src [n] of type stype (W_F32, W_BF16, W_F16), rounding to nearest even. */
int mx_convert(int stype, const void *src, int dtype, void *dst, size_t n) {
    if (bad_type(stype) || bad_type(dtype)) return -1;
    convert(stype, src, dtype, dst, n);
    return 0;
}

/* RMSNorm of T rows of n elements, all of one type (W_F32, W_BF16, W_F16), the reference's steps and
 * roundings: r = x / sqrt(mean(x^2) + eps) in float32 (the sum of squares in double), rounded to the
 * type, then y = w * r rounded to the type. Rows are spread over the pool. */
typedef struct {
    int type, n;
    float eps;
    const void *x, *w;
    void *y;
} norm_t;

static void norm_rows(const void *arg, int t0, int t1) {
    const norm_t *a = arg;
    const int n = a->n;
    float xb[CONVERT_BLOCK], wb[CONVERT_BLOCK];
    for (int t = t0; t < t1; t++) {
        const size_t base = (size_t)t * n;
        double ss[4] = {0., 0., 0., 0.};
        for (int i = 0; i < n; i += CONVERT_BLOCK) {
            const int m = n - i < CONVERT_BLOCK ? n - i : CONVERT_BLOCK;
            load_f32(a->type, a->x, base + i, m, xb);
            for (int k = 0; k < m; k++) ss[k & 3] += (double)xb[k] * xb[k];
        }
        const float inv = 1.f / sqrtf((float)((ss[0] + ss[1]) + (ss[2] + ss[3])) / (float)n + a->eps);
        for (int i = 0; i < n; i += CONVERT_BLOCK) {
            const int m = n - i < CONVERT_BLOCK ? n - i : CONVERT_BLOCK;
            load_f32(a->type, a->x, base + i, m, xb);
            load_f32(a->type, a->w, i, m, wb);
            if (a->type == W_BF16)
                for (int k = 0; k < m; k++) xb[k] = wb[k] * round_bf16(xb[k] * inv);
            else if (a->type == W_F16)
                for (int k = 0; k < m; k++) xb[k] = wb[k] * round_f16(xb[k] * inv);
            else
                for (int k = 0; k < m; k++) xb[k] = wb[k] * (xb[k] * inv);
            store_f32(a->type, xb, a->y, base + i, m);
        }
    }
}

int mx_rms_norm(int type, const void *x, int T, int n, float eps, const void *w, void *y) {
    if (T < 0 || n < 1 || bad_type(type)) return -1;
    const norm_t a = {.type = type, .n = n, .eps = eps, .x = x, .w = w, .y = y};
    if (T > 0) run_task(norm_rows, &a, T, 1 + 16384 / n);
    return 0;
}

/* Rotary embedding in place (half-split convention), with the reference's roundings: each product and
 * the sum rounded to the type. x: H heads of T positions of Hd elements, element (h, t, d) at
 * h * hs + t * ts + d; cos, sin [T, Hd] contiguous; all of one type. For d < Hd/2:
 * x[d] <- x[d] cos[d] - x[d + Hd/2] sin[d], x[d + Hd/2] <- x[d + Hd/2] cos[d + Hd/2] + x[d] sin[d + Hd/2].
 * Rows (h, t) are spread over the pool. */
typedef struct {
    int type, T, Hd;
    size_t hs, ts;
    void *x;
    const void *cos, *sin;
} rope_t;

#define ROPE_BLOCK 64

static void rope_rows(const void *arg, int r0, int r1) {
    const rope_t *a = arg;
    const int half = a->Hd / 2;
    float lo[ROPE_BLOCK], hi[ROPE_BLOCK], c1[ROPE_BLOCK], s1[ROPE_BLOCK], c2[ROPE_BLOCK], s2[ROPE_BLOCK];
    for (int r = r0; r < r1; r++) {
        const int h = r / a->T, t = r % a->T;
        const size_t base = (size_t)h * a->hs + (size_t)t * a->ts, cs = (size_t)t * a->Hd;
        for (int d = 0; d < half; d += ROPE_BLOCK) {
            const int m = half - d < ROPE_BLOCK ? half - d : ROPE_BLOCK;
            load_f32(a->type, a->x, base + d, m, lo);         /* x[d..]: the first half */
            load_f32(a->type, a->x, base + half + d, m, hi);  /* x[half + d..]: the second */
            load_f32(a->type, a->cos, cs + d, m, c1);
            load_f32(a->type, a->sin, cs + d, m, s1);
            load_f32(a->type, a->cos, cs + half + d, m, c2);
            load_f32(a->type, a->sin, cs + half + d, m, s2);
            if (a->type == W_BF16) {
                for (int k = 0; k < m; k++) {
                    const float x1 = lo[k], x2 = hi[k];
                    lo[k] = round_bf16(x1 * c1[k]) + round_bf16(-x2 * s1[k]);
                    hi[k] = round_bf16(x2 * c2[k]) + round_bf16(x1 * s2[k]);
                }
            } else if (a->type == W_F16) {
                for (int k = 0; k < m; k++) {
                    const float x1 = lo[k], x2 = hi[k];
                    lo[k] = round_f16(x1 * c1[k]) + round_f16(-x2 * s1[k]);
                    hi[k] = round_f16(x2 * c2[k]) + round_f16(x1 * s2[k]);
                }
            } else {
                for (int k = 0; k < m; k++) {
                    const float x1 = lo[k], x2 = hi[k];
                    lo[k] = x1 * c1[k] + -x2 * s1[k];
                    hi[k] = x2 * c2[k] + x1 * s2[k];
                }
            }
            store_f32(a->type, lo, a->x, base + d, m);  /* the sums are rounded here */
            store_f32(a->type, hi, a->x, base + half + d, m);
        }
    }
}

int mx_rope(int type, void *x, int H, int T, int Hd, size_t hs, size_t ts, const void *cos, const void *sin) {
    if (H < 0 || T < 0 || Hd < 2 || Hd % 2 || bad_type(type)) return -1;
    const rope_t a = {.type = type, .T = T, .Hd = Hd, .hs = hs, .ts = ts, .x = x, .cos = cos, .sin = sin};
    if (H > 0 && T > 0) run_task(rope_rows, &a, H * T, 1 + 8192 / Hd);
    return 0;
}

/* The MoE router for T tokens x [T, D] (type xtype) over E experts with gate weights w [E, D] (type wtype):
 * logits = x w^T in float32, rounded to xtype (the reference's linear layer gives them in the compute
 * type), softmax in float32, the k largest probabilities (ties: the lower index first), divided by their
 * sum. weights [T, k] float32, ids [T, k]. */
int mx_route(int isa, int xtype, const void *x, int T, int D, int E, int wtype, const void *w, int k, float *weights,
             int64_t *ids) {
    if (T < 1 || E < 1 || k < 1 || k > E || bad_type(xtype) || bad_type(wtype)) return -1;
    float *xo, *p = malloc((size_t)T * E * sizeof(float));
    const float *xf = f32_in(xtype, x, (size_t)T * D, &xo);
    if (!p || !xf) { free(p); free(xo); return -2; }
    job_t j = {.fmt = FMT_DENSE, .isa = isa, .T = T, .O = E, .I = D, .qweight = w, .xf = xf, .wtype = wtype, .y = p};
    run_job(&j);
    free(xo);
    for (int t = 0; t < T; t++) {
        float *pt = p + (size_t)t * E, m = -INFINITY, sum = 0.f, picked = 0.f;
        for (int e = 0; e < E; e++) {
            pt[e] = xtype == W_BF16 ? round_bf16(pt[e]) : xtype == W_F16 ? round_f16(pt[e]) : pt[e];
            m = pt[e] > m ? pt[e] : m;
        }
        for (int e = 0; e < E; e++) sum += pt[e] = expf(pt[e] - m);
        for (int e = 0; e < E; e++) pt[e] /= sum;
        for (int a = 0; a < k; a++) {
            int best = -1;
            for (int e = 0; e < E; e++)
                if (pt[e] != -INFINITY && (best < 0 || pt[e] > pt[best])) best = e;
            ids[(size_t)t * k + a] = best;
            weights[(size_t)t * k + a] = pt[best];
            picked += pt[best];
            pt[best] = -INFINITY;  /* taken (a NaN is taken in index order) */
        }
        for (int a = 0; a < k; a++) weights[(size_t)t * k + a] /= picked;
    }
    free(p);
    return 0;
}
