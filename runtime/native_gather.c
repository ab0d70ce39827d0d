/* CLADA decode-step gather kernel (CPU): threshold selection and weighted row sum in one call.
 * Built and loaded by runtime/native.py; the runtime falls back to embedding_bag where it is unavailable.
 *
 * out (rows, width), for each token row r:
 *     out[r, :] = sum over channels c with |x[r, c]| * scale[c] > thr[r] of x[r, c] * w[c, :]
 * x: (rows, channels) row-major float32; scale: (channels,); thr: (rows,);
 * w: (channels, width) float32 with row stride ld (the weight stored as (in_features, out_features) rows).
 *
 * Every weight row needed by at least one token row is read from memory once per call, whatever the number of
 * token rows (embedding_bag reads it once per token row). Threads split the union of active channels into
 * contiguous ranges (sequential reads that the hardware prefetchers follow), each summing into its own buffer;
 * the buffers are added at the end. The comparison is the one the masked reference makes (a float32 product,
 * then '>'), so both keep exactly the same channels.
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

#define MIN_CHANNELS_PER_THREAD 32

int64_t clada_gather_f32(const float *x, int64_t rows, int64_t channels, const float *scale, const float *thr,
                         const float *w, int64_t width, int64_t ld, float *out, int64_t nthreads) {
    if (rows > 64) return -1;
    int32_t *idx = malloc((size_t)channels * sizeof(int32_t));
    uint64_t *who = malloc((size_t)channels * sizeof(uint64_t));
    if (!idx || !who) { free(idx); free(who); return -2; }

    int64_t n = 0, kept = 0;  /* n: channels active in at least one row; who[k]: bit r set if row r keeps idx[k] */
    for (int64_t c = 0; c < channels; c++) {
        uint64_t mask = 0;
        for (int64_t r = 0; r < rows; r++) {
            if (fabsf(x[r * channels + c]) * scale[c] > thr[r]) { mask |= (uint64_t)1 << r; kept++; }
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
            const float *row = w + (int64_t)idx[k] * ld;
            const uint64_t mask = who[k];
            for (int64_t r = 0; r < rows; r++) {
                if (!(mask >> r & 1)) continue;
                const float v = x[r * channels + idx[k]];
                float *o = acc + r * width;
#ifdef _OPENMP
#pragma omp simd
#endif
                for (int64_t j = 0; j < width; j++) o[j] += v * row[j];
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
