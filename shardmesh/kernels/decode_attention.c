/* Attention of a decode step's one-token sequences, all in one call: shardmesh_decode_attention.
 * Compiled with expert_ffn.c into the same library (shardmesh/kernels/__init__.py).
 *
 * Per sequence and layer, torch's path costs ~45 us of per-op overhead (a cache copy, views, one SDPA
 * call) for a few microseconds of arithmetic: at batch 16 that is most of a stage's attention time.
 * Here, for each sequence s (its new token at row rows[s] of the step's packed tensors):
 *   - its new query and key heads are rotated (RoPE, as layers.apply_rotary: x * cos + roll(x, D/2) *
 *     signed_sin, the two products and the sum each rounded, never fused: the same bits as torch);
 *   - its new key and value (G heads of D) are written into its cache at slot lengths[s] - 1;
 *   - each query head a (of A; GQA: head a reads KV head a / (A / G)) attends to slots [0, lengths[s]):
 *     scores_j = scale * q . k_j, p = softmax(scores) (max subtracted, fp32), out = sum_j p_j v_j.
 * Each sequence is computed alone, in a fixed order: its result does not depend on which other
 * sequences share the call. Nothing here is threaded: decode_layer.c runs shardmesh_decode_attention_head,
 * one (sequence, key/value head) at a time, on its team.
 *
 * A sequence's cache is one buffer [layers, 2, G, capacity, D] (shardmesh/kv_cache.py): the layer's
 * keys start at base + layer * 2 * G * capacity * D, its values G * capacity * D after them. */

#include <math.h>
#include <string.h>

#if defined(__AVX512F__)
#define ATTN_LANES 16
#elif defined(__AVX__)
#define ATTN_LANES 8
#else
#define ATTN_LANES 4
#endif

typedef float attn_vec __attribute__((vector_size(ATTN_LANES * 4), aligned(4))); /* unaligned loads */

#if ATTN_LANES == 16 && (defined(__clang__) || __GNUC__ >= 12) /* halving sums: 4 shuffles and adds */
typedef float attn_vec8 __attribute__((vector_size(32)));
typedef float attn_vec4 __attribute__((vector_size(16)));
static inline float attn_lane_sum(attn_vec v) {
    attn_vec8 half = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
                   + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    attn_vec4 quarter = __builtin_shufflevector(half, half, 0, 1, 2, 3) + __builtin_shufflevector(half, half, 4, 5, 6, 7);
    quarter += __builtin_shufflevector(quarter, quarter, 2, 3, 0, 1);
    return quarter[0] + quarter[1];
}
#else
static inline float attn_lane_sum(attn_vec v) {
    float sum = 0.0f;
    for (int lane = 0; lane < ATTN_LANES; lane++) sum += v[lane];
    return sum;
}
#endif

/* scores[j] = scale * q . k_j for j < length (k_j: D floats, rows D apart), four keys at a time
 * (independent accumulators); each score is the same sum, in the same order, wherever j falls. */
static void attn_scores(const float *restrict q, const float *restrict k, long length, long D, float scale,
                        float *restrict scores) {
    long vector_end = D - D % ATTN_LANES, j = 0;
    for (; j + 4 <= length; j += 4) {
        attn_vec sum[4] = {{0}, {0}, {0}, {0}};
        for (long d = 0; d < vector_end; d += ATTN_LANES) {
            attn_vec qv = *(const attn_vec *)(q + d);
            for (int i = 0; i < 4; i++) sum[i] += qv * *(const attn_vec *)(k + (j + i) * D + d);
        }
        for (int i = 0; i < 4; i++) {
            float total = attn_lane_sum(sum[i]);
            for (long d = vector_end; d < D; d++) total += q[d] * k[(j + i) * D + d];
            scores[j + i] = scale * total;
        }
    }
    for (; j < length; j++) {
        attn_vec sum = {0};
        for (long d = 0; d < vector_end; d += ATTN_LANES) sum += *(const attn_vec *)(q + d) * *(const attn_vec *)(k + j * D + d);
        float total = attn_lane_sum(sum);
        for (long d = vector_end; d < D; d++) total += q[d] * k[j * D + d];
        scores[j] = scale * total;
    }
}

/* out[d] = sum_j weights[j] * v[j, d] (v rows D apart), summed over j in order. */
static void attn_mix(const float *restrict weights, const float *restrict v, long length, long D, float *restrict out) {
    for (long d = 0; d < D; d++) out[d] = 0.0f;
    for (long j = 0; j < length; j++) {
        float p = weights[j];
        const float *restrict vj = v + j * D;
        for (long d = 0; d < D; d++) out[d] += p * vj[d];
    }
}

/* out = x * cos + roll(x, D/2) * signed_sin (D even), without fused multiply-adds (torch rounds each
 * product and the sum: so do we, and the cached keys are torch's bits). */
#if defined(__clang__)
static void attn_rotate(const float *restrict x, const float *restrict cos, const float *restrict signed_sin, long D,
                        float *restrict out) {
#pragma clang fp contract(off)
#else
__attribute__((optimize("fp-contract=off")))
static void attn_rotate(const float *restrict x, const float *restrict cos, const float *restrict signed_sin, long D,
                        float *restrict out) {
#endif
    long half = D / 2;
    for (long d = 0; d < half; d++) out[d] = x[d] * cos[d] + x[d + half] * signed_sin[d];
    for (long d = half; d < D; d++) out[d] = x[d] * cos[d] + x[d - half] * signed_sin[d];
}

/* One sequence's key/value head g of a decode step, and the query heads that read it: its new key rotated and
 * written with its new value into the cache, then attention of query heads [g * A / G, (g + 1) * A / G).
 * entry: the sequence's table row (4 longs: row in the packed batch, cache buffer address, capacity, length
 * after this token); row_cos, row_sin: its token's RoPE rows [D]; the other arguments as
 * shardmesh_decode_attention's. A head's result does not depend on which other heads or sequences run, or
 * in which order (decode_layer.c runs these on several threads). */
void shardmesh_decode_attention_head(long A, long G, long D, long layer, float scale, const long *entry,
                                     const float *qkv, const float *row_cos, const float *row_sin, float *scratch,
                                     float *out, long g) {
    long group = A / G, row_stride = (A + 2 * G) * D;
    long row = entry[0], capacity = entry[2], length = entry[3];
    float *cache_keys = (float *)entry[1] + layer * 2 * G * capacity * D; /* [G, capacity, D] */
    float *cache_values = cache_keys + G * capacity * D;
    const float *new = qkv + row * row_stride;
    float *q = scratch, *scores = scratch + D;
    attn_rotate(new + (A + g) * D, row_cos, row_sin, D, cache_keys + (g * capacity + length - 1) * D);
    memcpy(cache_values + (g * capacity + length - 1) * D, new + (A + G + g) * D, D * sizeof(float));
    const float *k = cache_keys + g * capacity * D, *v = cache_values + g * capacity * D;
    for (long a = g * group; a < (g + 1) * group; a++) {
        attn_rotate(new + a * D, row_cos, row_sin, D, q);
        attn_scores(q, k, length, D, scale, scores);
        float top = -INFINITY, total = 0.0f;
        for (long j = 0; j < length; j++) top = scores[j] > top ? scores[j] : top;
        for (long j = 0; j < length; j++) total += scores[j] = expf(scores[j] - top);
        float inverse = 1.0f / total;
        for (long j = 0; j < length; j++) scores[j] *= inverse;
        attn_mix(scores, v, length, D, out + (row * A + a) * D);
    }
}

/* table: S rows of 4 longs (row in the packed batch, cache buffer address, capacity, length after this
 * token). qkv: the step's new q (A heads), k, v (G heads each) of each packed row before RoPE, [N, A + 2G, D];
 * cos, signed_sin: [N, D] (layers.RotaryEmbedding). out: [N, A, D], rows of the S sequences written.
 * scratch: at least max(length) + D floats. */
void shardmesh_decode_attention(long S, long A, long G, long D, long layer, float scale, const long *table,
                                const float *qkv, const float *cos, const float *signed_sin, float *scratch,
                                float *out) {
    for (long s = 0; s < S; s++)
        for (long g = 0; g < G; g++)
            shardmesh_decode_attention_head(A, G, D, layer, scale, table + 4 * s, qkv, cos + table[4 * s] * D,
                                            signed_sin + table[4 * s] * D, scratch, out, g);
}
