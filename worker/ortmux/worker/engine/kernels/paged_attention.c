/* PagedAttention: one layer's attention over a KV cache held in fixed-size blocks, each row over
 * its own length only. The run's new keys and values are written into the row's blocks first;
 * then every new query attends causally over its row's positions up to its own.
 *
 * Inputs (domain "ortmux", CPU):
 *   q       float [rows, heads, tokens, head_dim]     the queries (after rotary, unscaled)
 *   k, v    float [rows, kv_heads, tokens, head_dim]  the new keys and values
 *   pools   int64 [layers, 3]    per layer: address of the key pool, of the value pool (each
 *                                float [blocks, kv_heads, BLOCK_TOKENS, head_dim]), blocks
 *   tables  int64 [rows, width]  each row's block ids, in position order
 *   lens    int64 [rows, 2]      each row's past length and how many of its tokens are real
 *                                (the rest are padding: not written, their output is zero)
 *   params  float [3]            scale, sliding window (0: none), layer
 * Output: float [rows, heads, tokens, head_dim].
 *
 * Heads share a key/value head in groups (heads / kv_heads each). The addresses are
 * process-internal, as LoraBranch's are: the worker owns the pools and models holding the
 * worker's domain are refused at load. Every block id and length is checked against the pool.
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ortmux_api.h"

enum { BLOCK_TOKENS = 16, QUERIES = 4 };

typedef struct {
    const float *q, *k, *v;
    float *out;
    const int64_t *tables, *lens;
    float *kpool, *vpool;
    int64_t rows, heads, kv_heads, tokens, dim, width, blocks, window;
    float scale;
    int64_t chunks; /* query chunks per (row, head) */
    int failed;
} Work;

/* Where position ``pos`` of row ``row``, kv head ``h`` lies in a pool. */
static inline float *slot(const Work *w, float *pool, int64_t row, int64_t h, int64_t pos) {
    const int64_t block = w->tables[row * w->width + pos / BLOCK_TOKENS];
    return pool + ((block * w->kv_heads + h) * BLOCK_TOKENS + pos % BLOCK_TOKENS) * w->dim;
}

static void write_task(void *data, size_t task) {
    const Work *w = (const Work *)data;
    const int64_t row = (int64_t)task / w->kv_heads, h = (int64_t)task % w->kv_heads;
    const int64_t past = w->lens[2 * row], real = w->lens[2 * row + 1];
    for (int64_t t = 0; t < real; ++t) {
        const size_t at = (size_t)(((row * w->kv_heads + h) * w->tokens + t) * w->dim);
        memcpy(slot(w, w->kpool, row, h, past + t), w->k + at, (size_t)w->dim * sizeof(float));
        memcpy(slot(w, w->vpool, row, h, past + t), w->v + at, (size_t)w->dim * sizeof(float));
    }
}

static inline float dot(const float *a, const float *b, int64_t n) {
    float s[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int k = 0; k < 8; ++k) s[k] += a[i + k] * b[i + k];
    float total = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
    for (; i < n; ++i) total += a[i] * b[i];
    return total;
}

/* Queries [t0, t1) of one row and head: scores over each one's span, softmax, values summed. */
CLONES static void attend(const Work *w, int64_t row, int64_t head, int64_t t0, int64_t t1, float *scores) {
    const int64_t dim = w->dim, h = head / (w->heads / w->kv_heads);
    const int64_t past = w->lens[2 * row];
    const int64_t last = past + t1 - 1; /* the last position any of these queries sees */
    for (int64_t t = t0; t < t1; ++t) {
        const int64_t pos = past + t;
        const int64_t first = w->window > 0 && pos - w->window + 1 > 0 ? pos - w->window + 1 : 0;
        const float *q = w->q + ((row * w->heads + head) * w->tokens + t) * dim;
        float *s = scores + (t - t0) * (last + 1);
        float top = -INFINITY;
        for (int64_t p = first; p <= pos; ++p) {
            s[p] = dot(q, slot(w, w->kpool, row, h, p), dim) * w->scale;
            if (s[p] > top) top = s[p];
        }
        float sum = 0.0f;
        for (int64_t p = first; p <= pos; ++p) {
            s[p] = expf(s[p] - top);
            sum += s[p];
        }
        float *o = w->out + ((row * w->heads + head) * w->tokens + t) * dim;
        memset(o, 0, (size_t)dim * sizeof(float));
        const float inv = 1.0f / sum;
        for (int64_t p = first; p <= pos; ++p) {
            const float c = s[p] * inv;
            const float *value = slot(w, w->vpool, row, h, p);
            for (int64_t d = 0; d < dim; ++d) o[d] += c * value[d];
        }
    }
}

static void attend_task(void *data, size_t task) {
    const Work *w = (const Work *)data;
    const int64_t chunk = (int64_t)task % w->chunks, pair = (int64_t)task / w->chunks;
    const int64_t row = pair / w->heads, head = pair % w->heads;
    const int64_t real = w->lens[2 * row + 1];
    const int64_t t0 = chunk * QUERIES, t1 = t0 + QUERIES < real ? t0 + QUERIES : real;
    if (t0 >= t1) return;
    const int64_t span = w->lens[2 * row] + t1;
    float stack[QUERIES * 1024];
    float *scores = span <= 1024 ? stack : (float *)malloc((size_t)(QUERIES * span) * sizeof(float));
    if (scores == NULL) {
        __atomic_store_n(&((Work *)data)->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    attend(w, row, head, t0, t1, scores);
    if (scores != stack) free(scores);
}

static int64_t dims_of(const void *value, int64_t *dims, int64_t *elements) {
    const int64_t rank = shape_of(value, dims);
    *elements = 1;
    for (int64_t d = 0; d < rank; ++d) *elements *= dims[d];
    return rank;
}

Status paged_attention_compute(void *kernel, void *context) {
    (void)kernel;
    enum { INPUTS = 7 };
    const void *values[INPUTS];
    void *data[INPUTS];
    int64_t dims[INPUTS][MAX_DIMS], ranks[INPUTS], elements[INPUTS];
    for (size_t i = 0; i < INPUTS; ++i) {
        if (CALL(GetInputFn, API_KernelContext_GetInput)(context, i, &values[i]) != NULL || values[i] == NULL)
            return fail("PagedAttention: missing input");
        ranks[i] = dims_of(values[i], dims[i], &elements[i]);
        if (ranks[i] < 1) return fail("PagedAttention: an input has no shape or too many dimensions");
        if (CALL(GetTensorMutableDataFn, API_GetTensorMutableData)((void *)values[i], &data[i]) != NULL)
            return fail("PagedAttention: unreadable input");
    }
    Work w;
    if (ranks[0] != 4 || ranks[1] != 4 || ranks[2] != 4)
        return fail("PagedAttention: q, k and v must be [rows, heads, tokens, head_dim]");
    w.rows = dims[0][0], w.heads = dims[0][1], w.tokens = dims[0][2], w.dim = dims[0][3];
    w.kv_heads = dims[1][1];
    for (int i = 1; i < 3; ++i)
        if (dims[i][0] != w.rows || dims[i][1] != w.kv_heads || dims[i][2] != w.tokens || dims[i][3] != w.dim)
            return fail("PagedAttention: k and v must be [rows, kv_heads, tokens, head_dim] like q");
    if (w.kv_heads < 1 || w.heads % w.kv_heads != 0)
        return fail("PagedAttention: heads must be a multiple of kv_heads");
    if (ranks[3] != 2 || dims[3][1] != 3 || ranks[4] != 2 || dims[4][0] != w.rows || ranks[5] != 2 ||
        dims[5][0] != w.rows || dims[5][1] != 2 || elements[6] != 3)
        return fail("PagedAttention: pools [layers, 3], tables [rows, width], lens [rows, 2], params [3]");
    const float *params = (const float *)data[6];
    const int64_t layer = (int64_t)params[2];
    if (layer < 0 || layer >= dims[3][0]) return fail("PagedAttention: no pool for this layer");
    const int64_t *pool = (const int64_t *)data[3] + 3 * layer;
    w.kpool = (float *)(intptr_t)pool[0], w.vpool = (float *)(intptr_t)pool[1], w.blocks = pool[2];
    w.scale = params[0], w.window = (int64_t)params[1];
    w.tables = (const int64_t *)data[4], w.lens = (const int64_t *)data[5], w.width = dims[4][1];
    if (w.kpool == NULL || w.vpool == NULL) return fail("PagedAttention: the layer has no pool");
    for (int64_t r = 0; r < w.rows; ++r) {
        const int64_t past = w.lens[2 * r], real = w.lens[2 * r + 1];
        if (past < 0 || real < 0 || real > w.tokens) return fail("PagedAttention: a row's lengths are out of range");
        const int64_t used = (past + real + BLOCK_TOKENS - 1) / BLOCK_TOKENS;
        if (used > w.width) return fail("PagedAttention: a row's block table is too short for its length");
        for (int64_t b = 0; b < used; ++b) {
            const int64_t id = w.tables[r * w.width + b];
            if (id < 0 || id >= w.blocks) return fail("PagedAttention: a block id is out of the pool");
        }
    }
    void *output = NULL;
    if (CALL(GetOutputFn, API_KernelContext_GetOutput)(context, 0, dims[0], 4, &output) != NULL ||
        CALL(GetTensorMutableDataFn, API_GetTensorMutableData)(output, (void **)&w.out) != NULL)
        return fail("PagedAttention: no output");
    if (elements[0] == 0) return NULL;
    memset(w.out, 0, (size_t)elements[0] * sizeof(float));
    w.q = data[0], w.k = data[1], w.v = data[2];
    w.failed = 0;
    Status status = CALL(ParallelForFn, API_KernelContext_ParallelFor)(
        context, write_task, (size_t)(w.rows * w.kv_heads), 0, &w);
    if (status != NULL) return status;
    w.chunks = (w.tokens + QUERIES - 1) / QUERIES;
    status = CALL(ParallelForFn, API_KernelContext_ParallelFor)(
        context, attend_task, (size_t)(w.rows * w.heads * w.chunks), 0, &w);
    if (status == NULL && __atomic_load_n(&w.failed, __ATOMIC_RELAXED)) return out_of_memory("PagedAttention");
    return status;
}
