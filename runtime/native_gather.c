/* CLADA decode-step gather kernel (CPU): threshold selection and weighted row sum in one call.
 * Built and loaded by runtime/native.py; the runtime falls back to embedding_bag where it is unavailable.
 *
 * out (rows, width), for each token row r:
 *     out[r, :] = sum over channels c with |x[r, c]| * scale[c] > thr[r] of x[r, c] * w[c, :]
 * x: (rows, channels) row-major; scale: (channels,) float32; thr: (rows,) float32;
 * w: (channels, width) with row stride ld (the weight stored as (in_features, out_features) rows);
 * x and w share one element type: float32 (clada_gather_f32), bfloat16 (clada_gather_bf16) or float16
 * (clada_gather_f16, only where the CPU has F16C: converting halves one by one is slower than the dense
 * product). Sums are float32; out is float32.
 *
 * Reads: every weight row needed by at least one token row is read from memory once per call, whatever the
 * number of token rows; the rows no token row keeps are never read. Rows are read four at a time (four
 * sequential streams per thread), and each accumulator vector is loaded and stored once per four rows.
 *
 * Summation order, fixed so that a token row's result depends on nothing but its own inputs (not on the other
 * rows of the call, nor on the thread count): channels are cut into blocks of BLOCK by index; within a block a
 * row's kept channels are added in ascending order into a partial sum (channels another row keeps add an exact
 * zero), and the partials are added in block order. Threads take contiguous ranges of blocks.
 * The comparison is the one the masked reference makes (the activation widened to float32 exactly, a float32
 * product, then '>'), so both keep exactly the same channels.
 *
 * Returns the number of kept (row, channel) pairs, -1 if rows > 64, -2 if scratch memory is unavailable.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#define HAVE_F16 1
#endif

#define BLOCK 64                 /* channels per partial sum (the fixed summation order) */
#define MIN_CHANNELS_PER_THREAD 64
#if defined(__AVX512F__)
#define VW 16                    /* floats per vector */
#elif defined(__AVX__)
#define VW 8
#else
#define VW 4
#endif

typedef float vf __attribute__((vector_size(VW * 4), aligned(4), may_alias));
typedef uint16_t vh __attribute__((vector_size(VW * 2), aligned(2), may_alias));
typedef uint32_t vu __attribute__((vector_size(VW * 4)));

#define INLINE static inline __attribute__((always_inline))

enum kind { F32, BF16, F16 };

INLINE float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

INLINE float load(enum kind kind, const void *p, int64_t i) {
    switch (kind) {
    case BF16: return bf16_to_f32(((const uint16_t *)p)[i]);
#ifdef HAVE_F16
    case F16: return _cvtsh_ss(((const uint16_t *)p)[i]);
#endif
    default: return ((const float *)p)[i];
    }
}

/* VW consecutive weights of a row, widened to float32 */
INLINE vf loadv(enum kind kind, const void *row, int64_t j) {
    if (kind == BF16) {
        vu u = __builtin_convertvector(*(const vh *)((const uint16_t *)row + j), vu) << 16;
        return (vf)u;
    }
#ifdef HAVE_F16
    if (kind == F16) {
        const uint16_t *p = (const uint16_t *)row + j;
        vf f;
#if VW == 16
        __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
#else
        __m256 v = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#endif
        memcpy(&f, &v, sizeof f);
        return f;
    }
#endif
    return *(const vf *)((const float *)row + j);
}

/* For each token row r with live[r]: acc[r*width + j] += v[r][0]*r0[j] + ... + v[r][3]*r3[j], the four products
 * added one at a time in that order (a fixed order: exact zeros where a row skips a channel). The four weight
 * vectors are loaded once for all token rows. */
INLINE void axpy4(enum kind kind, float *restrict acc, int64_t rows, const uint8_t *live, const float (*v)[4],
                  const void *const r[4], int64_t width) {
    int64_t j = 0;
    if (rows == 1) {  /* the common decode call: the four activations stay in registers */
        const vf a0 = (vf){} + v[0][0], a1 = (vf){} + v[0][1], a2 = (vf){} + v[0][2], a3 = (vf){} + v[0][3];
        for (; j + VW <= width; j += VW) {
            vf s = *(vf *)(acc + j);
            s += a0 * loadv(kind, r[0], j);
            s += a1 * loadv(kind, r[1], j);
            s += a2 * loadv(kind, r[2], j);
            s += a3 * loadv(kind, r[3], j);
            *(vf *)(acc + j) = s;
        }
    }
    for (; j + VW <= width; j += VW) {
        const vf w0 = loadv(kind, r[0], j), w1 = loadv(kind, r[1], j), w2 = loadv(kind, r[2], j),
                 w3 = loadv(kind, r[3], j);
        for (int64_t t = 0; t < rows; t++) {
            if (!live[t]) continue;
            vf s = *(vf *)(acc + t * width + j);
            s += v[t][0] * w0;
            s += v[t][1] * w1;
            s += v[t][2] * w2;
            s += v[t][3] * w3;
            *(vf *)(acc + t * width + j) = s;
        }
    }
    for (; j < width; j++) {
        for (int64_t t = 0; t < rows; t++) {
            if (!live[t]) continue;
            float s = acc[t * width + j];
            for (int i = 0; i < 4; i++) s += v[t][i] * load(kind, r[i], j);
            acc[t * width + j] = s;
        }
    }
}

/* Scratch memory per calling thread, grown as needed (calls from several threads stay apart). */
static _Thread_local void *scratch_mem;
static _Thread_local size_t scratch_size;

static void *scratch(size_t bytes) {
    if (bytes > scratch_size) {
        free(scratch_mem);
        scratch_mem = malloc(bytes);
        scratch_size = scratch_mem ? bytes : 0;
    }
    return scratch_mem;
}

/* Thread t of nt: the partial sums of its blocks (those whose first active channel falls in its share of the
 * union of active channels), each zeroed, then its channels added four at a time in ascending order. */
INLINE void sum_blocks(enum kind kind, size_t elem, const void *x, int64_t rows, int64_t channels, const void *w,
                       int64_t ld, int64_t width, const int32_t *idx, const uint64_t *who, const int64_t *start,
                       const int64_t *used, int64_t nused, int64_t n, float *part, int64_t t, int64_t nt) {
    const int64_t size = rows * width;
    for (int64_t u = 0; u < nused; u++) {
        const int64_t b = used[u], k0 = start[b], k1 = start[b + 1];
        if (k0 * nt / n != t) continue;
        float *acc = part + u * size;
        memset(acc, 0, (size_t)size * sizeof(float));
        for (int64_t k = k0; k < k1; k += 4) {
            const void *r4[4];
            float v[64][4];
            uint8_t live[64];
            for (int i = 0; i < 4; i++)  /* past the block's end: its last row again, with weight 0 */
                r4[i] = (const char *)w + (size_t)idx[k + i < k1 ? k + i : k1 - 1] * (size_t)ld * elem;
            for (int64_t r = 0; r < rows; r++) {
                live[r] = 0;
                for (int i = 0; i < 4; i++) {
                    const int keeps = k + i < k1 && (who[k + i] >> r & 1);
                    v[r][i] = keeps ? load(kind, x, r * channels + idx[k + i]) : 0.0f;
                    live[r] |= keeps;
                }
            }
            axpy4(kind, acc, rows, live, (const float (*)[4])v, r4, width);
        }
    }
}

INLINE int64_t gather(enum kind kind, size_t elem, const void *x, int64_t rows, int64_t channels,
                      const float *scale, const float *thr, const void *w, int64_t width, int64_t ld, float *out,
                      int64_t nthreads) {
    if (rows > 64) return -1;
    const int64_t nblocks = (channels + BLOCK - 1) / BLOCK, size = rows * width;
    /* idx/who: the union of active channels and which rows keep each; start[b]: its first entry in block b;
       used[u]: the u-th block with an active channel; part: one partial sum (rows, width) per used block */
    size_t need = (size_t)channels * (sizeof(int32_t) + sizeof(uint64_t)) + (size_t)(2 * nblocks + 2) * sizeof(int64_t);
    char *mem = scratch(need + 64 + (size_t)nblocks * size * sizeof(float));
    if (!mem) return -2;
    int32_t *idx = (int32_t *)mem;
    uint64_t *who = (uint64_t *)(idx + channels);
    int64_t *start = (int64_t *)(who + channels), *used = start + nblocks + 1;
    float *part = (float *)(((uintptr_t)(used + nblocks) + 63) & ~(uintptr_t)63);

    int64_t n = 0, kept = 0, nused = 0;
    for (int64_t b = 0; b < nblocks; b++) {
        start[b] = n;
        const int64_t end = (b + 1) * BLOCK < channels ? (b + 1) * BLOCK : channels;
        for (int64_t c = b * BLOCK; c < end; c++) {
            uint64_t mask = 0;
            for (int64_t r = 0; r < rows; r++) {
                if (fabsf(load(kind, x, r * channels + c)) * scale[c] > thr[r]) { mask |= (uint64_t)1 << r; kept++; }
            }
            if (mask) { idx[n] = (int32_t)c; who[n] = mask; n++; }
        }
        if (n > start[b]) used[nused++] = b;
    }
    start[nblocks] = n;

#ifdef _OPENMP
    int64_t threads = nthreads < 1 ? 1 : nthreads;
#else
    int64_t threads = 1;
#endif
    if (threads > 1 + n / MIN_CHANNELS_PER_THREAD) threads = 1 + n / MIN_CHANNELS_PER_THREAD;

#ifdef _OPENMP
#pragma omp parallel num_threads((int)threads)
#endif
    {
#ifdef _OPENMP
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int64_t t = 0, nt = 1;
#endif
        /* one call per element type, so that each is compiled with its kind a constant */
        switch (kind) {
        case BF16: sum_blocks(BF16, elem, x, rows, channels, w, ld, width, idx, who, start, used, nused, n, part, t, nt); break;
        case F16: sum_blocks(F16, elem, x, rows, channels, w, ld, width, idx, who, start, used, nused, n, part, t, nt); break;
        default: sum_blocks(F32, elem, x, rows, channels, w, ld, width, idx, who, start, used, nused, n, part, t, nt);
        }
#ifdef _OPENMP
#pragma omp barrier
#endif
        /* out = partials added in block order; each thread a share of the elements */
        const int64_t per = ((size + nt - 1) / nt + 15) / 16 * 16;
        const int64_t a = t * per < size ? t * per : size, e = a + per < size ? a + per : size;
        if (nused == 0) {
            memset(out + a, 0, (size_t)(e - a) * sizeof(float));
        } else {
            memcpy(out + a, part + a, (size_t)(e - a) * sizeof(float));
            for (int64_t u = 1; u < nused; u++) {
                const float *src = part + u * size;
                for (int64_t j = a; j < e; j++) out[j] += src[j];
            }
        }
    }
    return kept;
}

int64_t clada_gather_f32(const float *x, int64_t rows, int64_t channels, const float *scale, const float *thr,
                         const float *w, int64_t width, int64_t ld, float *out, int64_t nthreads) {
    return gather(F32, sizeof(float), x, rows, channels, scale, thr, w, width, ld, out, nthreads);
}

int64_t clada_gather_bf16(const uint16_t *x, int64_t rows, int64_t channels, const float *scale, const float *thr,
                          const uint16_t *w, int64_t width, int64_t ld, float *out, int64_t nthreads) {
    return gather(BF16, sizeof(uint16_t), x, rows, channels, scale, thr, w, width, ld, out, nthreads);
}

#ifdef HAVE_F16
int64_t clada_gather_f16(const uint16_t *x, int64_t rows, int64_t channels, const float *scale, const float *thr,
                         const uint16_t *w, int64_t width, int64_t ld, float *out, int64_t nthreads) {
    return gather(F16, sizeof(uint16_t), x, rows, channels, scale, thr, w, width, ld, out, nthreads);
}
#endif
