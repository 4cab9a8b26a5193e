/* LoraBranch: the LoRA branch of one projection for every row of a run, reading each row's
 * factors where the adapter keeps them (no copy into per-run feeds).
 *
 *   y = base + (x @ A[row]) @ B[row] + bias[row]
 *
 * Inputs (domain "ortmux", CPU):
 *   x     float [rows, ..., in]  the projection's activation (tokens between rows and in)
 *   base  float [..., out]       the projection's output, rows x tokens x out elements
 *   table int64 [rows or 1, 4]   per row: address of A [in, rank], address of B [rank, out],
 *                                rank, address of the bias delta [out] (0: none); a row whose
 *                                A address is 0 (or rank 0) takes no branch. One table row serves
 *                                every row (an activation shared by the whole run).
 * Output: float, the shape of base.
 *
 * The addresses are process-internal: the worker builds the table from the resident adapters'
 * arrays and keeps them alive for the run; clients cannot feed it.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ortmux_api.h"

enum { BLOCK_TOKENS = 16 };

typedef struct {
    const float *x;
    const float *base;
    float *y;
    const int64_t *table;
    const int64_t *order; /* the rows, those of one adapter side by side */
    int64_t table_rows, rows, tokens, in, out, blocks;
    int failed; /* a task could not allocate its scratch: the run fails, the process lives */
} Work;

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define CLONES
#endif

/* 16 floats, at any float-aligned address (GCC lowers it to the machine's vectors). */
typedef float v16 __attribute__((vector_size(64), aligned(4)));
enum { LANES = 16, GROUP = 4 };

/* xa [n, rank] = x [n, in] @ A [in, rank] for rank a multiple of 16: four tokens at a time, each
 * 16 columns of A read once for the four, the sums held in registers. */
CLONES static void down_wide(const float *x, int64_t in, const float *A, int64_t rank, int64_t n, float *xa) {
    for (int64_t t0 = 0; t0 < n; t0 += GROUP) {
        const int64_t m = n - t0 < GROUP ? n - t0 : GROUP;
        const float *x0 = x + t0 * in, *x1 = m > 1 ? x0 + in : x0;
        const float *x2 = m > 2 ? x0 + 2 * in : x0, *x3 = m > 3 ? x0 + 3 * in : x0;
        for (int64_t r0 = 0; r0 < rank; r0 += LANES) {
            v16 s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
            for (int64_t i = 0; i < in; ++i) {
                const v16 a = *(const v16 *)(A + i * rank + r0);
                s0 += x0[i] * a, s1 += x1[i] * a, s2 += x2[i] * a, s3 += x3[i] * a;
            }
            const v16 sums[GROUP] = {s0, s1, s2, s3};
            for (int64_t k = 0; k < m; ++k) *(v16 *)(xa + (t0 + k) * rank + r0) = sums[k];
        }
    }
}

/* y [n, out] = base + xa [n, rank] @ B [rank, out] + bias: four tokens at a time, each 16 columns
 * of B read once for the four; one pass over y (no separate copy of base). */
CLONES static void up_wide(const float *xa, int64_t rank, const float *B, const float *bias, const float *base,
                           float *y, int64_t out, int64_t n) {
    const int64_t wide = out - out % LANES;
    for (int64_t t0 = 0; t0 < n; t0 += GROUP) {
        const int64_t m = n - t0 < GROUP ? n - t0 : GROUP;
        const float *c[GROUP];
        for (int64_t k = 0; k < GROUP; ++k) c[k] = xa + (t0 + (k < m ? k : 0)) * rank;
        for (int64_t o0 = 0; o0 < wide; o0 += LANES) {
            v16 s[GROUP];
            for (int64_t k = 0; k < GROUP; ++k) s[k] = *(const v16 *)(base + (t0 + (k < m ? k : 0)) * out + o0);
            for (int64_t r = 0; r < rank; ++r) {
                const v16 b = *(const v16 *)(B + r * out + o0);
                s[0] += c[0][r] * b, s[1] += c[1][r] * b, s[2] += c[2][r] * b, s[3] += c[3][r] * b;
            }
            if (bias != NULL)
                for (int64_t k = 0; k < GROUP; ++k) s[k] += *(const v16 *)(bias + o0);
            for (int64_t k = 0; k < m; ++k) *(v16 *)(y + (t0 + k) * out + o0) = s[k];
        }
        for (int64_t k = 0; k < m; ++k) /* the columns past the last 16 */
            for (int64_t o = wide; o < out; ++o) {
                float v = base[(t0 + k) * out + o];
                for (int64_t r = 0; r < rank; ++r) v += c[k][r] * B[r * out + o];
                y[(t0 + k) * out + o] = v + (bias != NULL ? bias[o] : 0.0f);
            }
    }
}

/* dst += c * src, along contiguous memory (it vectorizes; each element's sum keeps its order). */
static inline void axpy(float *dst, const float *src, float c, int64_t count) {
    for (int64_t k = 0; k < count; ++k) dst[k] += c * src[k];
}

/* Tokens [t0, t1) of one row: xa = x @ A (A's rows read once for the block), then y = base +
 * xa @ B + bias. The loops run along contiguous memory, so they vectorize without reordering
 * any sum: each row's result is the same whatever else the run holds. Ranks that are a multiple
 * of 16 (every bucket from 16 up) take the register-blocked paths above. */
CLONES static void branch_block(const Work *w, const int64_t *entry, int64_t row, int64_t t0, int64_t t1,
                                float *xa) {
    const int64_t in = w->in, out = w->out, rank = entry[2], n = t1 - t0;
    const float *A = (const float *)(intptr_t)entry[0];
    const float *B = (const float *)(intptr_t)entry[1];
    const float *bias = (const float *)(intptr_t)entry[3];
    const float *x = w->x + (row * w->tokens + t0) * in;
    const float *base = w->base + (row * w->tokens + t0) * out;
    float *y = w->y + (row * w->tokens + t0) * out;
    if (A != NULL && B != NULL && rank > 0 && rank % LANES == 0) {
        down_wide(x, in, A, rank, n, xa);
        up_wide(xa, rank, B, bias, base, y, out, n);
        return;
    }
    memcpy(y, base, (size_t)(n * out) * sizeof(float));
    if (A != NULL && B != NULL && rank > 0) {
        memset(xa, 0, (size_t)(n * rank) * sizeof(float));
        for (int64_t i = 0; i < in; ++i)
            for (int64_t t = 0; t < n; ++t) axpy(xa + t * rank, A + i * rank, x[t * in + i], rank);
        for (int64_t r = 0; r < rank; ++r)
            for (int64_t t = 0; t < n; ++t) axpy(y + t * out, B + r * out, xa[t * rank + r], out);
    }
    if (bias != NULL)
        for (int64_t t = 0; t < n; ++t) axpy(y + t * out, bias, 1.0f, out);
}

static void run_task(void *data, size_t task) {
    const Work *w = (const Work *)data;
    const int64_t row = w->order[(int64_t)task / w->blocks], block = (int64_t)task % w->blocks;
    const int64_t t0 = block * BLOCK_TOKENS;
    const int64_t t1 = t0 + BLOCK_TOKENS < w->tokens ? t0 + BLOCK_TOKENS : w->tokens;
    const int64_t *entry = w->table + 4 * (w->table_rows == 1 ? 0 : row);
    const int64_t rank = entry[0] != 0 ? entry[2] : 0;
    float stack[BLOCK_TOKENS * 64];
    float *xa = stack;
    if (rank > 64) {
        xa = (float *)malloc((size_t)(BLOCK_TOKENS * rank) * sizeof(float));
        if (xa == NULL) {
            __atomic_store_n(&((Work *)data)->failed, 1, __ATOMIC_RELAXED);
            return;
        }
    }
    branch_block(w, entry, row, t0, t1, xa);
    if (xa != stack) free(xa);
}

typedef struct {
    int64_t key, row;
} Keyed;

static int by_key(const void *left, const void *right) {
    const Keyed *a = (const Keyed *)left, *b = (const Keyed *)right;
    if (a->key != b->key) return a->key < b->key ? -1 : 1;
    return (a->row > b->row) - (a->row < b->row);
}

/* The rows in an order that puts the rows of one adapter side by side (by A's address): the pool
 * hands each thread a contiguous range of tasks, so a thread reads an adapter's factors once for
 * all its rows there, not once per row. 0 when out of memory. */
static int row_order(const Work *w, int64_t *order) {
    Keyed *keyed = (Keyed *)malloc((size_t)w->rows * sizeof(Keyed));
    if (keyed == NULL) return 0;
    for (int64_t i = 0; i < w->rows; ++i) {
        keyed[i].key = w->table_rows == 1 ? 0 : w->table[4 * i];
        keyed[i].row = i;
    }
    qsort(keyed, (size_t)w->rows, sizeof(Keyed), by_key);
    for (int64_t i = 0; i < w->rows; ++i) order[i] = keyed[i].row;
    free(keyed);
    return 1;
}

Status lora_branch_compute(void *kernel, void *context) {
    (void)kernel;
    const void *values[3];
    int64_t dims[3][MAX_DIMS], ranks[3], elements[3];
    for (size_t i = 0; i < 3; ++i) {
        if (CALL(GetInputFn, API_KernelContext_GetInput)(context, i, &values[i]) != NULL || values[i] == NULL)
            return fail("LoraBranch: missing input");
        ranks[i] = shape_of(values[i], dims[i]);
        if (ranks[i] < 1) return fail("LoraBranch: an input has no shape or too many dimensions");
        elements[i] = 1;
        for (int64_t d = 0; d < ranks[i]; ++d) elements[i] *= dims[i][d];
    }
    Work w;
    w.in = dims[0][ranks[0] - 1];
    w.out = dims[1][ranks[1] - 1];
    w.rows = dims[0][0];
    const int64_t tokens = w.in > 0 ? elements[0] / w.in : 0;
    w.tokens = w.rows > 0 ? tokens / w.rows : 0;
    w.table_rows = dims[2][0];
    if (ranks[0] < 2 || ranks[2] != 2 || dims[2][1] != 4)
        return fail("LoraBranch: x must be [rows, ..., in] and the table [rows, 4]");
    if (elements[1] != tokens * w.out)
        return fail("LoraBranch: base does not hold one output per token of x");
    if (w.table_rows != 1 && w.table_rows != w.rows)
        return fail("LoraBranch: the table must have one row per row of x, or one for all");
    void *output = NULL;
    if (CALL(GetOutputFn, API_KernelContext_GetOutput)(context, 0, dims[1], (size_t)ranks[1], &output) != NULL)
        return fail("LoraBranch: no output");
    if (tokens == 0) return NULL;
    void *data[4];
    for (size_t i = 0; i < 3; ++i)
        if (CALL(GetTensorMutableDataFn, API_GetTensorMutableData)((void *)values[i], &data[i]) != NULL)
            return fail("LoraBranch: unreadable input");
    if (CALL(GetTensorMutableDataFn, API_GetTensorMutableData)(output, &data[3]) != NULL)
        return fail("LoraBranch: unwritable output");
    w.x = data[0];
    w.base = data[1];
    w.table = data[2];
    w.y = data[3];
    for (int64_t r = 0; r < w.table_rows; ++r) {
        const int64_t *entry = w.table + 4 * r;
        if (entry[0] != 0 && (entry[1] == 0 || entry[2] < 0 || entry[2] > (1 << 16)))
            return fail("LoraBranch: a table row names A without B or a rank out of range");
    }
    w.blocks = (w.tokens + BLOCK_TOKENS - 1) / BLOCK_TOKENS;
    const size_t total = (size_t)(w.rows * w.blocks);
    int64_t *order = (int64_t *)malloc((size_t)w.rows * sizeof(int64_t));
    if (order == NULL || !row_order(&w, order)) {
        free(order);
        return out_of_memory("LoraBranch");
    }
    w.order = order;
    w.failed = 0;
    Status status = NULL;
    if (total == 1)
        run_task(&w, 0);
    else
        status = CALL(ParallelForFn, API_KernelContext_ParallelFor)(context, run_task, total, 0, &w);
    free(order);
    if (status == NULL && __atomic_load_n(&w.failed, __ATOMIC_RELAXED)) return out_of_memory("LoraBranch");
    return status;
}

