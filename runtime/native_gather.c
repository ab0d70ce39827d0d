/* CLADA decode-step gather kernel (CPU): threshold selection and weighted row sum in one call.
 * Built and loaded by runtime/native.py; the runtime falls back to embedding_bag where it is unavailable.
 *
 * out (rows, width), for each token row r:
 *     out[r, :] = sum over channels c with |x[r, c]| * scale[c] > thr[r] of x[r, c] * w[c, :]
 * x: (rows, channels) row-major; scale: (channels,) float32; thr: (rows,) float32;
 * w: (channels, width) with row stride ld (the weight stored as (in_features, out_features) rows);
 * x and w share one element type: float32 (clada_gather_f32), bfloat16 (clada_gather_bf16) or float16
 * (clada_gather_f16, only where the CPU has F16C and AVX2: converting halves one by one is slower than the
 * dense product). Sums are float32; out is float32.
 *
 * Every weight row needed by at least one token row is read from memory once per call, whatever the number of
 * token rows (embedding_bag reads it once per token row). Threads split the union of active channels into
 * contiguous ranges (sequential reads that the hardware prefetchers follow), each summing into its own buffer;
 * the buffers are added at the end. The comparison is the one the masked reference makes (the activation
 * widened to float32 exactly, a float32 product, then '>'), so both keep exactly the same channels.
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
#if defined(__F16C__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_F16 1
#endif

#define MIN_CHANNELS_PER_THREAD 32

enum kind { F32, BF16, F16 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float load(enum kind kind, const void *p, int64_t i) {
    switch (kind) {
    case BF16: return bf16_to_f32(((const uint16_t *)p)[i]);
#ifdef HAVE_F16
    case F16: return _cvtsh_ss(((const uint16_t *)p)[i]);
#endif
    default: return ((const float *)p)[i];
    }
}

/* o[0:width] += v * row[0:width], row of element type kind */
static inline void axpy(enum kind kind, float *restrict o, float v, const void *row, int64_t width) {
    if (kind == BF16) {
        const uint16_t *r = row;
#ifdef _OPENMP
#pragma omp simd
#endif
        for (int64_t j = 0; j < width; j++) o[j] += v * bf16_to_f32(r[j]);
#ifdef HAVE_F16
    } else if (kind == F16) {
        const uint16_t *r = row;
        const __m256 vv = _mm256_set1_ps(v);
        int64_t j = 0;
        for (; j + 8 <= width; j += 8) {
            const __m256 w8 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + j)));
            _mm256_storeu_ps(o + j, _mm256_fmadd_ps(vv, w8, _mm256_loadu_ps(o + j)));
        }
        for (; j < width; j++) o[j] += v * _cvtsh_ss(r[j]);
#endif
    } else {
        const float *r = row;
#ifdef _OPENMP
#pragma omp simd
#endif
        for (int64_t j = 0; j < width; j++) o[j] += v * r[j];
    }
}

static int64_t gather(enum kind kind, size_t elem, const void *x, int64_t rows, int64_t channels,
                      const float *scale, const float *thr, const void *w, int64_t width, int64_t ld, float *out,
                      int64_t nthreads) {
    if (rows > 64) return -1;
    int32_t *idx = malloc((size_t)channels * sizeof(int32_t));
    uint64_t *who = malloc((size_t)channels * sizeof(uint64_t));
    if (!idx || !who) { free(idx); free(who); return -2; }

    int64_t n = 0, kept = 0;  /* n: channels active in at least one row; who[k]: bit r set if row r keeps idx[k] */
    for (int64_t c = 0; c < channels; c++) {
        uint64_t mask = 0;
        for (int64_t r = 0; r < rows; r++) {
            if (fabsf(load(kind, x, r * channels + c)) * scale[c] > thr[r]) { mask |= (uint64_t)1 << r; kept++; }
        }
        if (mask) { idx[n] = (int32_t)c; who[n] = mask; n++; }
    }

#ifdef _OPENMP
    int64_t threads = nthreads < 1 ? 1 : nthreads;
#else
    int64_t threads = 1;
#endif
    if (threads > 1 + n / MIN_CHANNELS_PER_THREAD) threads = 1 + n / MIN_CHANNELS_PER_THREAD;
    const int64_t size = rows * width;
    float *scratch = threads > 1 ? malloc((size_t)(threads - 1) * size * sizeof(float)) : NULL;
    if (threads > 1 && !scratch) threads = 1;

#ifdef _OPENMP
#pragma omp parallel num_threads((int)threads)
#endif
    {
#ifdef _OPENMP
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
        const int64_t t = 0, nt = 1;
#endif
        const int64_t per = (n + nt - 1) / nt, k0 = t * per, k1 = k0 + per < n ? k0 + per : n;
        float *acc = t == 0 ? out : scratch + (t - 1) * size;
        memset(acc, 0, (size_t)size * sizeof(float));
        for (int64_t k = k0; k < k1; k++) {
            const char *row = (const char *)w + (size_t)idx[k] * (size_t)ld * elem;
            const uint64_t mask = who[k];
            for (int64_t r = 0; r < rows; r++) {
                if (mask >> r & 1) axpy(kind, acc + r * width, load(kind, x, r * channels + idx[k]), row, width);
            }
        }
#ifdef _OPENMP
#pragma omp barrier
#endif
        if (nt > 1) {  /* each thread adds the other buffers into its share of out */
            const int64_t part = ((size + nt - 1) / nt + 15) / 16 * 16;
            const int64_t a = t * part, b = a + part < size ? a + part : size;
            for (int64_t s = 1; s < nt; s++) {
                const float *src = scratch + (s - 1) * size;
                for (int64_t j = a; j < b; j++) out[j] += src[j];
            }
        }
    }
    free(scratch);
    free(idx);
    free(who);
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
