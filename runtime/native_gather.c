/* CLADA decode-step gather kernel (CPU): threshold selection and weighted row sum in one call.
 * Built and loaded by runtime/native.py; the runtime falls back to embedding_bag where it is unavailable.
 *
 * out (rows, width), for each token row r:
 *     out[r, :] = sum over channels c with |x[r, c]| * scale[r * sld + c] > thr[r] of x[r, c] * w[c, :]
 * x: (rows, channels) row-major; scale: float32, (channels,) shared by every row (sld = 0) or one row of channels per
 * token row (sld = channels: a prompt prior per sequence); thr: (rows,) float32;
 * w: (channels, width) with row stride ld (the weight stored as (in_features, out_features) rows);
 * x and w share one element type: float32 (clada_gather_f32), bfloat16 (clada_gather_bf16) or float16
 * (clada_gather_f16, only where the CPU has F16C: converting halves one by one is slower than the dense
 * product). Sums are float32; out is float32.
 *
 * Reads: every weight row needed by at least one token row is read from memory once per call, whatever the
 * number of token rows; the rows no token row keeps are never read. Rows are read eight at a time (eight sequential
 * streams per thread), and each accumulator vector is loaded and stored once per eight rows; 2-byte rows for one
 * token row four at a time, with the next four prefetched alongside. (float32, one token row, AMD EPYC Zen 3, one
 * thread, SmolLM2's down projection, 1536 rows of 576: eight streams read 10% faster than four; 2-byte rows are
 * short and gain more from the prefetch.)
 *
 * Summation order, fixed so that a token row's result depends on nothing but its own inputs (not on the other
 * rows of the call, nor on the thread count): channels are cut into blocks of BLOCK by index; within a block a
 * row's kept channels are added in ascending order into a partial sum (channels another row keeps add an exact
 * zero), and the partials are added in block order.
 *
 * Threads: built with -fopenmp (runtime/native.py's first choice), the work items run on an OpenMP team of the
 * runtime torch has loaded, so torch's threads, often still spinning after the attention's products, take them
 * at once. Otherwise a small pool of its own: the calling thread posts the blocks as work items and takes items
 * itself at once; idle workers (woken, or spinning briefly after their last item) take the others, and the caller
 * waits only for items a worker has started. Beside torch's spinning OpenMP threads that pool's worker competes
 * for the cores (on 2 cores a decode step of SmolLM2 took a fifth longer than with the shared team).
 * The comparison is the one the masked reference makes (the activation widened to float32 exactly, a float32
 * product, then '>'), so both keep exactly the same channels.
 *
 * Returns the number of kept (row, channel) pairs, -1 if rows > 64, -2 if scratch memory is unavailable.
 */
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__F16C__) || defined(__AVX512F__)
#define HAVE_F16 1
#endif

#define BLOCK 64                 /* channels per partial sum (the fixed summation order) */
#define MAX_GROUP 8              /* channels added per accumulator pass */
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

/* a + b * c with one rounding where the CPU has FMA. Spelled out because the file is built with -ffp-contract=off:
 * left to the compiler, a product was fused in one code path and rounded twice in another (on an AVX2 CPU a row's
 * dense product differed in its last bit between one and several token rows). */
INLINE vf madd(vf a, vf b, vf c) {
#if VW == 16
    return (vf)_mm512_fmadd_ps((__m512)b, (__m512)c, (__m512)a);
#elif VW == 8 && defined(__FMA__)
    return (vf)_mm256_fmadd_ps((__m256)b, (__m256)c, (__m256)a);
#else
    return a + b * c;
#endif
}

/* VW consecutive weights of a row, widened to float32 */
INLINE vf loadv(enum kind kind, const void *row, int64_t j) {
    if (kind == BF16) {  /* widen to 32 bits, shift into the high half: two instructions on AVX-512 / AVX2 */
        const uint16_t *p = (const uint16_t *)row + j;
        vf f;
#if VW == 16
        const __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
        memcpy(&f, &u, sizeof f);
#elif VW == 8 && defined(__AVX2__)
        const __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16);
        memcpy(&f, &u, sizeof f);
#else
        f = (vf)(__builtin_convertvector(*(const vh *)p, vu) << 16);
#endif
        return f;
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

/* One token row, eight float32 weight rows: acc[j] += v[0]*r[0][j] + ... + v[7]*r[7][j], added one at a time in
 * that order, as axpy does. A function of its own, not inlined, so that its loop has the registers to itself:
 * inlined into the block loop, GCC kept the row pointers on the stack and reloaded them every vector, and the loop
 * streamed 10-20% slower (AMD EPYC Zen 3, one thread, SmolLM2's down projection). */
__attribute__((noinline)) static void axpy8_f32(float *restrict acc, const float *v, const void *const *r,
                                                int64_t width) {
    const float *r0 = r[0], *r1 = r[1], *r2 = r[2], *r3 = r[3], *r4 = r[4], *r5 = r[5], *r6 = r[6], *r7 = r[7];
    const vf a0 = (vf){} + v[0], a1 = (vf){} + v[1], a2 = (vf){} + v[2], a3 = (vf){} + v[3];
    const vf a4 = (vf){} + v[4], a5 = (vf){} + v[5], a6 = (vf){} + v[6], a7 = (vf){} + v[7];
    int64_t j = 0;
    for (; j + VW <= width; j += VW) {
        vf s = *(vf *)(acc + j);
        s = madd(s, a0, *(const vf *)(r0 + j));
        s = madd(s, a1, *(const vf *)(r1 + j));
        s = madd(s, a2, *(const vf *)(r2 + j));
        s = madd(s, a3, *(const vf *)(r3 + j));
        s = madd(s, a4, *(const vf *)(r4 + j));
        s = madd(s, a5, *(const vf *)(r5 + j));
        s = madd(s, a6, *(const vf *)(r6 + j));
        s = madd(s, a7, *(const vf *)(r7 + j));
        *(vf *)(acc + j) = s;
    }
    for (; j < width; j++) {
        float s = acc[j];
        s += v[0] * r0[j]; s += v[1] * r1[j]; s += v[2] * r2[j]; s += v[3] * r3[j];
        s += v[4] * r4[j]; s += v[5] * r5[j]; s += v[6] * r6[j]; s += v[7] * r7[j];
        acc[j] = s;
    }
}

/* For each token row t with live[t]: acc[t*width + j] += v[t][0]*r0[j] + ... + v[t][g-1]*r{g-1}[j], the g products
 * added one at a time in that order (a fixed order: exact zeros where a row skips a channel). The g weight vectors
 * are loaded once for all token rows; with one row its g activations stay in registers. ``g`` is a constant at
 * each (inlined) call site. */
INLINE void axpy(enum kind kind, const int g, float *restrict acc, int64_t rows, const uint8_t *live,
                 const float (*v)[MAX_GROUP], const void *const *r, const void *const *next, int64_t width) {
    if (kind == F32 && rows == 1 && g == 8) {  /* the common float32 decode call */
        if (live[0]) axpy8_f32(acc, v[0], r, width);
        return;
    }
    int64_t j = 0;
    if (rows == 1 && g == 4) {  /* one token row of 2-byte rows, written out: the activations stay in registers */
        const vf a0 = (vf){} + v[0][0], a1 = (vf){} + v[0][1], a2 = (vf){} + v[0][2], a3 = (vf){} + v[0][3];
        for (; j + VW <= width; j += VW) {
            if (kind != F32)  /* 2-byte rows are short: fetch the next group's rows alongside (+35-60%) */
                for (int i = 0; i < 4; i++) __builtin_prefetch((const uint16_t *)next[i] + j, 0, 0);
            vf s = *(vf *)(acc + j);
            s = madd(s, a0, loadv(kind, r[0], j));
            s = madd(s, a1, loadv(kind, r[1], j));
            s = madd(s, a2, loadv(kind, r[2], j));
            s = madd(s, a3, loadv(kind, r[3], j));
            *(vf *)(acc + j) = s;
        }
    }
    for (; j + VW <= width; j += VW) {
        vf w[MAX_GROUP];
        for (int i = 0; i < g; i++) w[i] = loadv(kind, r[i], j);
        for (int64_t t = 0; t < rows; t++) {
            if (!live[t]) continue;
            vf s = *(vf *)(acc + t * width + j);
            for (int i = 0; i < g; i++) s = madd(s, (vf){} + v[t][i], w[i]);
            *(vf *)(acc + t * width + j) = s;
        }
    }
    for (; j < width; j++) {
        for (int64_t t = 0; t < rows; t++) {
            if (!live[t]) continue;
            float s = acc[t * width + j];
            for (int i = 0; i < g; i++) s += v[t][i] * load(kind, r[i], j);
            acc[t * width + j] = s;
        }
    }
}

/* Scratch memory per calling thread, grown as needed (calls from several threads stay apart): ``scratch`` for the
 * gather and the dense product, ``step_scratch`` for the predictor's step, which calls both. */
static _Thread_local void *scratch_mem, *step_mem;
static _Thread_local size_t scratch_size, step_size;

static void *grown(void **mem, size_t *size, size_t bytes) {
    if (bytes > *size) {
        free(*mem);
        *mem = malloc(bytes);
        *size = *mem ? bytes : 0;
    }
    return *mem;
}

static void *scratch(size_t bytes) { return grown(&scratch_mem, &scratch_size, bytes); }
static void *step_scratch(size_t bytes) { return grown(&step_mem, &step_size, bytes); }

/* --- the thread pool -------------------------------------------------------------------------------------------
 * One job at a time: ``word`` packs the job's generation (24 bits), item count (20) and next unclaimed item (20);
 * a thread claims an item by compare-and-swap, so a worker that wakes after its job is over claims nothing. Items
 * claimed are finished before ``done`` counts them, and the caller returns once ``done`` reaches the count. */
typedef void (*item_fn)(void *arg, int64_t item);

#define MAX_WORKERS 63
#define SPIN 4000                /* pause instructions a worker spins for the next job before sleeping */
#define CHUNK 1024               /* floats per reduction item */
static pthread_mutex_t job_lock = PTHREAD_MUTEX_INITIALIZER;  /* one caller at a time uses the pool */
static pthread_mutex_t wake_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t wake = PTHREAD_COND_INITIALIZER;
static _Atomic uint64_t word;
static _Atomic int64_t done;
static item_fn job_fn;
static void *job_arg;
static int workers, sleepers;

static inline void pause_cpu(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static int claim(uint64_t gen, int64_t *item) {
    uint64_t cur = atomic_load(&word);
    for (;;) {
        const uint64_t items = cur >> 20 & 0xFFFFF, next = cur & 0xFFFFF;
        if (cur >> 40 != gen || next >= items) return 0;
        if (atomic_compare_exchange_weak(&word, &cur, cur + 1)) { *item = (int64_t)next; return 1; }
    }
}

static void work(uint64_t gen) {
    int64_t item;
    while (claim(gen, &item)) {
        job_fn(job_arg, item);
        atomic_fetch_add(&done, 1);
    }
}

static void *worker_main(void *unused) {
    (void)unused;
    uint64_t seen = atomic_load(&word) >> 40;
    for (;;) {
        for (int i = 0; i < SPIN && atomic_load(&word) >> 40 == seen; i++) pause_cpu();
        if (atomic_load(&word) >> 40 == seen) {
            pthread_mutex_lock(&wake_lock);
            sleepers++;
            while (atomic_load(&word) >> 40 == seen) pthread_cond_wait(&wake, &wake_lock);
            sleepers--;
            pthread_mutex_unlock(&wake_lock);
        }
        seen = atomic_load(&word) >> 40;
        work(seen);
    }
    return NULL;
}

static void forget_workers(void) {  /* in a forked child: the workers are gone */
    pthread_mutex_init(&job_lock, NULL);
    pthread_mutex_init(&wake_lock, NULL);
    pthread_cond_init(&wake, NULL);
    workers = sleepers = 0;
}

static void watch_forks(void) { pthread_atfork(NULL, NULL, forget_workers); }

#ifdef _OPENMP
/* Built with OpenMP: the items run on the OpenMP runtime's team, which in a process that loaded torch first is
 * torch's own (the same libgomp.so.1, loaded once): the threads that just ran torch's product, and may still be
 * spinning for more work, take the kernel's items at once instead of competing with a second pool for the cores. */
#include <omp.h>
/* A forked child inherits the runtime's team state but not its threads (a parallel region there can hang, as
 * torch's own do): calls in a forked child run on the calling thread alone. */
static volatile int forked_child;
static void mark_forked_child(void) { forked_child = 1; }
__attribute__((constructor)) static void watch_forks_openmp(void) { pthread_atfork(NULL, NULL, mark_forked_child); }

static void run(item_fn fn, void *arg, int64_t items, int64_t threads) {
    if (items <= 0) return;
    if (threads <= 1 || items == 1 || forked_child || omp_in_parallel()) {
        for (int64_t i = 0; i < items; i++) fn(arg, i);
        return;
    }
    const int team = (int)(threads < items ? threads : items);
#pragma omp parallel for num_threads(team) schedule(dynamic, 1)
    for (int64_t i = 0; i < items; i++) fn(arg, i);
}
#else
/* Run fn(arg, i) for i in [0, items) on the calling thread and up to threads - 1 workers. */
static void run(item_fn fn, void *arg, int64_t items, int64_t threads) {
    if (items <= 0) return;
    if (threads <= 1 || items == 1 || items > 0xFFFFF || pthread_mutex_trylock(&job_lock) != 0) {
        for (int64_t i = 0; i < items; i++) fn(arg, i);  /* alone (or the pool is busy with another caller) */
        return;
    }
    static pthread_once_t once = PTHREAD_ONCE_INIT;
    pthread_once(&once, watch_forks);
    while (workers < threads - 1 && workers < MAX_WORKERS) {
        pthread_t t;
        if (pthread_create(&t, NULL, worker_main, NULL) != 0) break;
        pthread_detach(t);
        workers++;
    }
    job_fn = fn;
    job_arg = arg;
    atomic_store(&done, 0);
    const uint64_t gen = ((atomic_load(&word) >> 40) + 1) & 0xFFFFFF;
    atomic_store(&word, gen << 40 | (uint64_t)items << 20);
    pthread_mutex_lock(&wake_lock);
    if (sleepers) pthread_cond_broadcast(&wake);
    pthread_mutex_unlock(&wake_lock);
    work(gen);
    for (int spins = 0; atomic_load(&done) < items; spins++) {
        if (spins < SPIN) pause_cpu(); else sched_yield();
    }
    pthread_mutex_unlock(&job_lock);
}
#endif

/* What one call's work items need. */
struct call {
    enum kind kind;
    size_t elem;
    const void *x;
    int64_t rows, channels;
    const void *w;
    int64_t ld, width;
    const int32_t *idx;
    const uint64_t *who;
    const int64_t *start, *used;
    int64_t n;
    float *part, *out;
    int64_t nused, size;
};

/* The channels k0..k1 of the union (one block) added into acc, g at a time in ascending order. */
INLINE void add_channels(enum kind kind, const int g, const struct call *c, float *acc, int64_t k0, int64_t k1) {
    const int64_t rows = c->rows;
    const int32_t *idx = c->idx;
    for (int64_t k = k0; k < k1; k += g) {
        const void *rg[MAX_GROUP];
        float v[64][MAX_GROUP];
        uint8_t live[64];
        uint64_t mask[MAX_GROUP];
        int32_t col[MAX_GROUP];
        for (int i = 0; i < g; i++) {  /* past the block's end: its last row again, with weight 0 */
            mask[i] = k + i < k1 ? c->who[k + i] : 0;
            col[i] = idx[k + i < k1 ? k + i : k1 - 1];
            rg[i] = (const char *)c->w + (size_t)col[i] * (size_t)c->ld * c->elem;
        }
        for (int64_t r = 0; r < rows; r++) {  /* branch-free: which rows keep which channel is random */
            uint8_t any = 0;
            for (int i = 0; i < g; i++) {
                const uint8_t keeps = mask[i] >> r & 1;
                const float value = load(kind, c->x, r * c->channels + col[i]);
                v[r][i] = keeps ? value : 0.0f;
                any |= keeps;
            }
            live[r] = any;
        }
        const void *next[MAX_GROUP];  /* the rows of the next group (prefetched while these are summed) */
        for (int i = 0; i < g; i++)
            next[i] = (const char *)c->w + (size_t)idx[k + g + i < k1 ? k + g + i : k1 - 1] * (size_t)c->ld * c->elem;
        axpy(kind, g, acc, rows, live, (const float (*)[MAX_GROUP])v, rg, next, c->width);
    }
}

/* Work item u: the partial sum of the u-th block with an active channel, zeroed, then its channels added in
 * ascending order: eight at a time (eight weight streams; each accumulator load and store serves eight rows'
 * products), or four for one token row of 2-byte rows (the prefetching loop in axpy). The result is the same
 * either way. */
INLINE void sum_block(enum kind kind, const struct call *c, int64_t u) {
    const int64_t b = c->used[u], k0 = c->start[b], k1 = c->start[b + 1];
    float *acc = c->part + u * c->size;
    memset(acc, 0, (size_t)c->size * sizeof(float));
    if (c->rows == 1 && kind != F32) add_channels(kind, 4, c, acc, k0, k1);
    else add_channels(kind, MAX_GROUP, c, acc, k0, k1);
}

/* one entry point per element type, so that each is compiled with its kind a constant */
static void block_f32(void *c, int64_t u) { sum_block(F32, c, u); }
static void block_bf16(void *c, int64_t u) { sum_block(BF16, c, u); }
static void block_f16(void *c, int64_t u) { sum_block(F16, c, u); }

/* Work item i: out[i*CHUNK ...] = the partials added in block order. */
static void add_partials(void *arg, int64_t i) {
    const struct call *c = arg;
    const int64_t a = i * CHUNK, e = a + CHUNK < c->size ? a + CHUNK : c->size;
    if (c->nused == 0) {
        memset(c->out + a, 0, (size_t)(e - a) * sizeof(float));
        return;
    }
    memcpy(c->out + a, c->part + a, (size_t)(e - a) * sizeof(float));
    for (int64_t u = 1; u < c->nused; u++) {
        const float *src = c->part + u * c->size;
        for (int64_t j = a; j < e; j++) c->out[j] += src[j];
    }
}

INLINE int64_t gather(enum kind kind, size_t elem, const void *x, int64_t rows, int64_t channels,
                      const float *scale, int64_t sld, const float *thr, const void *w, int64_t width, int64_t ld,
                      float *out, int64_t nthreads) {
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
                if (fabsf(load(kind, x, r * channels + c)) * scale[r * sld + c] > thr[r]) { mask |= (uint64_t)1 << r; kept++; }
            }
            if (mask) { idx[n] = (int32_t)c; who[n] = mask; n++; }
        }
        if (n > start[b]) used[nused++] = b;
    }
    start[nblocks] = n;

    struct call c = {kind, elem, x, rows, channels, w, ld, width, idx, who, start, used, n, part, out, nused, size};
    static const item_fn blocks[] = {[F32] = block_f32, [BF16] = block_bf16, [F16] = block_f16};
    const int64_t threads = nthreads < 1 ? 1 : nthreads > 1 + n / MIN_CHANNELS_PER_THREAD ? 1 + n / MIN_CHANNELS_PER_THREAD
                                                                                         : nthreads;
    run(blocks[kind], &c, nused, threads);
    run(add_partials, &c, (size + CHUNK - 1) / CHUNK, threads);
    return kept;
}

int64_t clada_gather_f32(const float *x, int64_t rows, int64_t channels, const float *scale, int64_t sld,
                          const float *thr,
                         const float *w, int64_t width, int64_t ld, float *out, int64_t nthreads) {
    return gather(F32, sizeof(float), x, rows, channels, scale, sld, thr, w, width, ld, out, nthreads);
}

int64_t clada_gather_bf16(const uint16_t *x, int64_t rows, int64_t channels, const float *scale, int64_t sld,
                          const float *thr,
                          const uint16_t *w, int64_t width, int64_t ld, float *out, int64_t nthreads) {
    return gather(BF16, sizeof(uint16_t), x, rows, channels, scale, sld, thr, w, width, ld, out, nthreads);
}

#ifdef HAVE_F16
int64_t clada_gather_f16(const uint16_t *x, int64_t rows, int64_t channels, const float *scale, int64_t sld,
                          const float *thr,
                         const uint16_t *w, int64_t width, int64_t ld, float *out, int64_t nthreads) {
    return gather(F16, sizeof(uint16_t), x, rows, channels, scale, sld, thr, w, width, ld, out, nthreads);
}
#endif

/* --- dense product on the original layout (clada_gemv_*) ----------------------------------------------------------
 * out (rows, nout) float32 = x (rows, nin) times w^T, w (nout, nin) with row stride ld: the product of a projection
 * a decode step leaves dense (attention projections an artifact does not sparsify, the LM head), on the weight as
 * the model holds it (no copy, no layout change). Every weight row is read once per call for all token rows.
 * Output rows are cut into items of GEMV_ITEM rows run on the same thread team as the gather; within an item, four
 * weight rows at a time (four sequential streams) are dotted with up to four token rows, two with up to eight.
 * Each output is a float32 sum: per vector lane in ascending channel order, then the lanes added in
 * order, then the tail channels: it depends on nothing but its own inputs (not on thread count or other rows).
 * With ``idx`` (the predictor's step) output j is weight row idx[j]: only the rows named are read.
 * Returns 0, -1 if rows > 8, -2 if scratch memory is unavailable. */
#define GEMV_ROWS 8
#define GEMV_ITEM 64

struct gemv {
    enum kind kind;
    size_t elem;
    const float *x;  /* (rows, nin) widened to float32 */
    int64_t rows, nin, nout, ld;
    const void *w;
    float *out;
    const int32_t *idx;  /* output j is weight row idx[j] (the predictor's step), or row j where NULL */
};

INLINE float hsum(vf v) {
    float s = 0.0f;
    for (int i = 0; i < VW; i++) s += v[i];
    return s;
}

/* Outputs j..j+G-1 of T token rows (G, T constants at each inlined call site): every weight vector loaded once serves
 * the T token rows, every activation vector the G weight rows. */
INLINE void dot_group(enum kind kind, const struct gemv *c, int64_t j, const int G, const int T) {
    const int64_t nin = c->nin, vend = nin - nin % VW;
    const size_t stride = (size_t)c->ld * c->elem;
    const void *r[4];
    for (int g = 0; g < G; g++) r[g] = (const char *)c->w + (size_t)(c->idx ? c->idx[j + g] : j + g) * stride;
    vf a[4][GEMV_ROWS];
    for (int g = 0; g < G; g++)
        for (int t = 0; t < T; t++) a[g][t] = (vf){};
    for (int64_t k = 0; k < vend; k += VW) {
        vf wv[4];
        for (int g = 0; g < G; g++) wv[g] = loadv(kind, r[g], k);
        for (int t = 0; t < T; t++) {
            const vf xv = *(const vf *)(c->x + t * nin + k);
            for (int g = 0; g < G; g++) a[g][t] = madd(a[g][t], xv, wv[g]);
        }
    }
    for (int g = 0; g < G; g++)
        for (int t = 0; t < T; t++) {
            float s = hsum(a[g][t]);
            for (int64_t k = vend; k < nin; k++) s += c->x[t * nin + k] * load(kind, r[g], k);
            c->out[t * c->nout + j + g] = s;
        }
}

/* Output rows [j, j1) of T token rows: G = 4 weight rows at a time up to 4 token rows, 2 beyond; then one by one. */
INLINE void dot_rows(enum kind kind, const struct gemv *c, int64_t j, int64_t j1, const int T) {
    const int G = T <= 4 ? 4 : 2;
    for (; j + G <= j1; j += G) dot_group(kind, c, j, G, T);
    for (; j < j1; j++) dot_group(kind, c, j, 1, T);
}

INLINE void gemv_item(enum kind kind, const struct gemv *c, int64_t item) {
    const int64_t j0 = item * GEMV_ITEM, j1 = j0 + GEMV_ITEM < c->nout ? j0 + GEMV_ITEM : c->nout;
    switch (c->rows) {  /* the token-row count a compile-time constant in each case */
    case 1: dot_rows(kind, c, j0, j1, 1); break;
    case 2: dot_rows(kind, c, j0, j1, 2); break;
    case 3: dot_rows(kind, c, j0, j1, 3); break;
    case 4: dot_rows(kind, c, j0, j1, 4); break;
    case 5: dot_rows(kind, c, j0, j1, 5); break;
    case 6: dot_rows(kind, c, j0, j1, 6); break;
    case 7: dot_rows(kind, c, j0, j1, 7); break;
    default: dot_rows(kind, c, j0, j1, 8); break;
    }
}

static void gemv_f32(void *c, int64_t i) { gemv_item(F32, c, i); }
static void gemv_bf16(void *c, int64_t i) { gemv_item(BF16, c, i); }
static void gemv_f16(void *c, int64_t i) { gemv_item(F16, c, i); }

static int64_t gemv(enum kind kind, size_t elem, const void *x, int64_t rows, int64_t nin, const void *w,
                    int64_t nout, int64_t ld, float *out, int64_t nthreads, const int32_t *idx) {
    if (rows > GEMV_ROWS) return -1;
    void *mem = scratch((size_t)rows * nin * sizeof(float) + 64);
    if (!mem) return -2;
    float *xf = (float *)(((uintptr_t)mem + 63) & ~(uintptr_t)63);
    for (int64_t i = 0; i < rows * nin; i++) xf[i] = load(kind, x, i);
    struct gemv c = {kind, elem, xf, rows, nin, nout, ld, w, out, idx};
    static const item_fn items[] = {[F32] = gemv_f32, [BF16] = gemv_bf16, [F16] = gemv_f16};
    run(items[kind], &c, (nout + GEMV_ITEM - 1) / GEMV_ITEM, nthreads < 1 ? 1 : nthreads);
    return 0;
}

int64_t clada_gemv_f32(const float *x, int64_t rows, int64_t nin, const float *w, int64_t nout, int64_t ld,
                       float *out, int64_t nthreads) {
    return gemv(F32, sizeof(float), x, rows, nin, w, nout, ld, out, nthreads, NULL);
}

int64_t clada_gemv_bf16(const uint16_t *x, int64_t rows, int64_t nin, const uint16_t *w, int64_t nout, int64_t ld,
                        float *out, int64_t nthreads) {
    return gemv(BF16, sizeof(uint16_t), x, rows, nin, w, nout, ld, out, nthreads, NULL);
}

#ifdef HAVE_F16
int64_t clada_gemv_f16(const uint16_t *x, int64_t rows, int64_t nin, const uint16_t *w, int64_t nout, int64_t ld,
                       float *out, int64_t nthreads) {
    return gemv(F16, sizeof(uint16_t), x, rows, nin, w, nout, ld, out, nthreads, NULL);
}
#endif

/* --- the predictor's step (clada_q4_estimate, clada_predictor_step_*) --------------------------------------------
 * The 4-bit copy of gate and up (runtime/predictor.py), blocked by 64 outputs so that each work item streams one
 * contiguous run of memory: codes (width / 64, channels, 32) bytes, a channel's 32 bytes eight little-endian 32-bit
 * words, nibble k of word l holding code + 8 of output 8k + l of the block (codes in [-8, 7]); scales (width / 64,
 * channels / 32, 64) float16, one per 32 input channels and output. channels: a multiple of 32; width: of 64.
 *
 * estimate (width,) float32: est[j] = sum over channels c with |x[c]| * w_in[c] > thr_in of x[c] * (code[c, j] - 8) * s[c / 32, j]:
 * the copy's rows of the kept input channels read, the rest never. Per block, groups of 32 channels in order: the kept
 * channels' x * (1 + n / 16) summed in ascending order (n, the nibble, becomes a float by its bits alone), then
 * (16 * partial - 24 * sum of x) * scale added: a fixed order (no dependence on threads). */
#define Q4_BLOCK 64
#define Q4_GROUP 32

struct q4 {
    const float *x;
    const int32_t *idx;        /* kept channels, ascending */
    const int64_t *gstart;     /* gstart[g]: first entry of group g in idx; gstart[ngroups] = kept */
    int64_t channels, ngroups;
    const uint8_t *codes;
    const uint16_t *scales;
    float *out;
};

INLINE float f16_to_f32(uint16_t h) {
#ifdef HAVE_F16
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    float f;
    if (exp == 0) {
        f = ldexpf((float)man, -24);
    } else if (exp == 31) {
        uint32_t bits = sign | 0x7F800000u | (man << 13);
        memcpy(&f, &bits, sizeof f);
        return f;
    } else {
        uint32_t bits = ((exp + 112) << 23) | (man << 13);
        memcpy(&f, &bits, sizeof f);
    }
    return sign ? -f : f;
#endif
}

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
/* nibble k of every 32-bit lane of v, as the float 1 + n / 16 (its bits: exponent of 1, n in the top mantissa bits) */
#define Q4_NIBBLE(v, k) _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256( \
    (k) <= 4 ? _mm256_slli_epi32((v), 19 - 4 * (k)) : _mm256_srli_epi32((v), 4 * (k) - 19), nib), one))
#endif

static void q4_block(void *arg, int64_t b) {
    const struct q4 *c = arg;
    const uint8_t *codes = c->codes + (size_t)b * c->channels * (Q4_BLOCK / 2);
    const uint16_t *scales = c->scales + (size_t)b * c->ngroups * Q4_BLOCK;
    float *out = c->out + b * Q4_BLOCK;
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    __m256 t[8];
    for (int i = 0; i < 8; i++) t[i] = _mm256_setzero_ps();
    const __m256i nib = _mm256_set1_epi32(0x0F << 19), one = _mm256_set1_epi32(0x3F800000);
    for (int64_t g = 0; g < c->ngroups; g++) {
        const int64_t k0 = c->gstart[g], k1 = c->gstart[g + 1];
        if (k0 == k1) continue;
        __m256 p0 = _mm256_setzero_ps(), p1 = p0, p2 = p0, p3 = p0, p4 = p0, p5 = p0, p6 = p0, p7 = p0;
        float sx = 0.0f;
        for (int64_t k = k0; k < k1; k++) {
            const int32_t ch = c->idx[k];
            const float xv = c->x[ch];
            sx += xv;
            const __m256 a = _mm256_set1_ps(xv);
            const __m256i v = _mm256_loadu_si256((const __m256i *)(codes + (size_t)ch * (Q4_BLOCK / 2)));
            p0 = _mm256_fmadd_ps(a, Q4_NIBBLE(v, 0), p0);
            p1 = _mm256_fmadd_ps(a, Q4_NIBBLE(v, 1), p1);
            p2 = _mm256_fmadd_ps(a, Q4_NIBBLE(v, 2), p2);
            p3 = _mm256_fmadd_ps(a, Q4_NIBBLE(v, 3), p3);
            p4 = _mm256_fmadd_ps(a, Q4_NIBBLE(v, 4), p4);
            p5 = _mm256_fmadd_ps(a, Q4_NIBBLE(v, 5), p5);
            p6 = _mm256_fmadd_ps(a, Q4_NIBBLE(v, 6), p6);
            p7 = _mm256_fmadd_ps(a, Q4_NIBBLE(v, 7), p7);
        }
        const __m256 p[8] = {p0, p1, p2, p3, p4, p5, p6, p7};
        const __m256 sixteen = _mm256_set1_ps(16.0f), offset = _mm256_set1_ps(24.0f * sx);
        for (int i = 0; i < 8; i++) {
            const __m256 s = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(scales + g * Q4_BLOCK + 8 * i)));
            t[i] = _mm256_fmadd_ps(_mm256_fmsub_ps(p[i], sixteen, offset), s, t[i]);
        }
    }
    for (int i = 0; i < 8; i++) _mm256_storeu_ps(out + 8 * i, t[i]);
#else
    float t[Q4_BLOCK] = {0};
    for (int64_t g = 0; g < c->ngroups; g++) {
        const int64_t k0 = c->gstart[g], k1 = c->gstart[g + 1];
        if (k0 == k1) continue;
        float p[Q4_BLOCK] = {0}, sx = 0.0f;
        for (int64_t k = k0; k < k1; k++) {
            const int32_t ch = c->idx[k];
            const float xv = c->x[ch];
            const uint8_t *row = codes + (size_t)ch * (Q4_BLOCK / 2);
            sx += xv;
            for (int j = 0; j < Q4_BLOCK; j++) {
                uint32_t word;
                memcpy(&word, row + 4 * (j % 8), sizeof word);
                p[j] += xv * (1.0f + (float)((word >> (4 * (j / 8))) & 0x0F) / 16.0f);
            }
        }
        for (int j = 0; j < Q4_BLOCK; j++) t[j] += (16.0f * p[j] - 24.0f * sx) * f16_to_f32(scales[g * Q4_BLOCK + j]);
    }
    memcpy(out, t, sizeof t);
#endif
}

/* The kept input channels of x (float32) by group of 32 into idx / gstart (scratch of the caller); returns their number */
static int64_t q4_select(const float *x, int64_t channels, const float *scale, float thr, int32_t *idx, int64_t *gstart) {
    const int64_t ngroups = channels / Q4_GROUP;
    int64_t n = 0;
    for (int64_t g = 0; g < ngroups; g++) {
        gstart[g] = n;
        for (int64_t ch = g * Q4_GROUP; ch < (g + 1) * Q4_GROUP; ch++)
            if (fabsf(x[ch]) * scale[ch] > thr) idx[n++] = (int32_t)ch;
    }
    gstart[ngroups] = n;
    return n;
}

int64_t clada_q4_estimate(const float *x, int64_t channels, const float *scale, float thr, const uint8_t *codes,
                          const uint16_t *scales, int64_t width, float *out, int64_t nthreads) {
    const int64_t ngroups = channels / Q4_GROUP;
    char *mem = step_scratch((size_t)(ngroups + 1) * sizeof(int64_t) + (size_t)channels * sizeof(int32_t));
    if (!mem) return -2;
    int64_t *gstart = (int64_t *)mem;
    int32_t *idx = (int32_t *)(gstart + ngroups + 1);
    const int64_t n = q4_select(x, channels, scale, thr, idx, gstart);
    struct q4 c = {x, idx, gstart, channels, ngroups, codes, scales, out};
    run(q4_block, &c, width / Q4_BLOCK, nthreads < 1 ? 1 : nthreads);
    return n;
}

enum act { ACT_SILU = 0, ACT_GELU_TANH = 1 };

INLINE float activation(int act, float v) {
    if (act == ACT_GELU_TANH) return 0.5f * v * (1.0f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
    return v / (1.0f + expf(-v));
}

INLINE void store(enum kind kind, void *p, int64_t i, float v) {
    if (kind == BF16) {  /* round to nearest even */
        uint32_t bits;
        memcpy(&bits, &v, sizeof bits);
        ((uint16_t *)p)[i] = (uint16_t)((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
    }
#ifdef HAVE_F16
    else if (kind == F16) ((uint16_t *)p)[i] = _cvtss_sh(v, 0);
#endif
    else ((float *)p)[i] = v;
}

/* v rounded to the element type (float32: v) */
INLINE float rounded(enum kind kind, float v) {
    if (kind == F32) return v;
    uint16_t t;
    store(kind, &t, 0, v);
    return load(kind, &t, 0);
}

/* One decode step of a gated MLP under the predictor rule, one token row (runtime/predictor_step.py):
 * 1. est = the 4-bit estimate of gate(x) | up(x) (width = 2 I) over the input channels |x| * w_in > thr_in;
 * 2. the kept neurons j: |act(est[j]) * est[I + j]| * w_mid[j] > thr_mid, ascending;
 * 3. their gate and up rows (wg, wu: (I, channels), row stride ld_in, x's element type) dotted with x (as clada_gemv_*),
 *    h_j = act(gate_j) * up_j, each product rounded to x's type as the masked reference's are;
 * 4. out (out_width,) float32 = sum over kept j of h_j * wd[j, :] (wd: down stored as (I, out_width) rows of stride
 *    ld_out), by the gather kernel (which keeps h's nonzero entries).
 * act: 0 SiLU, 1 GELU (tanh approximation). counts[0], counts[1]: the kept input channels and neurons. Returns 0, or
 * -2 if scratch memory is unavailable. */
static int64_t predictor_step(enum kind kind, size_t elem, const void *x, int64_t channels, const float *w_in,
                              float thr_in, const uint8_t *codes, const uint16_t *scales, int64_t width,
                              const float *w_mid, float thr_mid, int64_t act, const void *wg, const void *wu,
                              int64_t ld_in, const void *wd, int64_t ld_out, int64_t out_width, float *out,
                              int64_t *counts, int64_t nthreads) {
    const int64_t ngroups = channels / Q4_GROUP, neurons = width / 2, threads = nthreads < 1 ? 1 : nthreads;
    char *mem = step_scratch((size_t)channels * (sizeof(float) + sizeof(int32_t))
                             + (size_t)(ngroups + 1) * sizeof(int64_t) + (size_t)width * sizeof(float)
                             + (size_t)neurons * (sizeof(int32_t) + 4 * sizeof(float)));
    if (!mem) return -2;
    float *xf = (float *)mem, *est = xf + channels, *g = est + width, *u = g + neurons, *unit = u + neurons;
    float *h = unit + neurons;  /* x's element type, all I neurons */
    int64_t *gstart = (int64_t *)(h + neurons);
    int32_t *idx_in = (int32_t *)(gstart + ngroups + 1), *idx_mid = idx_in + channels;
    for (int64_t i = 0; i < channels; i++) xf[i] = load(kind, x, i);
    counts[0] = q4_select(xf, channels, w_in, thr_in, idx_in, gstart);
    struct q4 c = {xf, idx_in, gstart, channels, ngroups, codes, scales, est};
    run(q4_block, &c, width / Q4_BLOCK, threads);
    int64_t kept = 0;
    for (int64_t j = 0; j < neurons; j++)
        if (fabsf(activation((int)act, est[j]) * est[neurons + j]) * w_mid[j] > thr_mid) idx_mid[kept++] = (int32_t)j;
    counts[1] = kept;
    if (kept) {
        int64_t code = gemv(kind, elem, x, 1, channels, wg, kept, ld_in, g, threads, idx_mid);
        if (code == 0) code = gemv(kind, elem, x, 1, channels, wu, kept, ld_in, u, threads, idx_mid);
        if (code < 0) return code;
    }
    memset(h, 0, (size_t)neurons * elem);
    for (int64_t k = 0; k < kept; k++) {
        const float a = rounded(kind, activation((int)act, rounded(kind, g[k])));
        store(kind, h, idx_mid[k], a * rounded(kind, u[k]));
    }
    for (int64_t j = 0; j < neurons; j++) unit[j] = 1.0f;
    const float zero = 0.0f;
    const int64_t code = gather(kind, elem, h, 1, neurons, unit, 0, &zero, wd, out_width, ld_out, out, threads);
    return code < 0 ? code : 0;
}

int64_t clada_predictor_step_f32(const float *x, int64_t channels, const float *w_in, float thr_in,
                                 const uint8_t *codes, const uint16_t *scales, int64_t width, const float *w_mid,
                                 float thr_mid, int64_t act, const float *wg, const float *wu, int64_t ld_in,
                                 const float *wd, int64_t ld_out, int64_t out_width, float *out, int64_t *counts,
                                 int64_t nthreads) {
    return predictor_step(F32, sizeof(float), x, channels, w_in, thr_in, codes, scales, width, w_mid, thr_mid, act,
                          wg, wu, ld_in, wd, ld_out, out_width, out, counts, nthreads);
}

int64_t clada_predictor_step_bf16(const uint16_t *x, int64_t channels, const float *w_in, float thr_in,
                                  const uint8_t *codes, const uint16_t *scales, int64_t width, const float *w_mid,
                                  float thr_mid, int64_t act, const uint16_t *wg, const uint16_t *wu, int64_t ld_in,
                                  const uint16_t *wd, int64_t ld_out, int64_t out_width, float *out, int64_t *counts,
                                  int64_t nthreads) {
    return predictor_step(BF16, sizeof(uint16_t), x, channels, w_in, thr_in, codes, scales, width, w_mid, thr_mid,
                          act, wg, wu, ld_in, wd, ld_out, out_width, out, counts, nthreads);
}

#ifdef HAVE_F16
int64_t clada_predictor_step_f16(const uint16_t *x, int64_t channels, const float *w_in, float thr_in,
                                 const uint8_t *codes, const uint16_t *scales, int64_t width, const float *w_mid,
                                 float thr_mid, int64_t act, const uint16_t *wg, const uint16_t *wu, int64_t ld_in,
                                 const uint16_t *wd, int64_t ld_out, int64_t out_width, float *out, int64_t *counts,
                                 int64_t nthreads) {
    return predictor_step(F16, sizeof(uint16_t), x, channels, w_in, thr_in, codes, scales, width, w_mid, thr_mid,
                          act, wg, wu, ld_in, wd, ld_out, out_width, out, counts, nthreads);
}
#endif
