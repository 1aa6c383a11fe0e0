/* A stage's MoE glue in two C calls per layer (shardmesh/models/moe_kernel.py wraps them):
 * shardmesh_moe_dispatch (gate logits, Mixtral's routing, the tokens gathered in expert order into
 * the one packed tensor a ComputeExperts call carries) and shardmesh_moe_combine (residual + the
 * weighted sum of a token's expert outputs, in one pass). Included at the end of expert_ffn.c
 * (vec, LANES, load, lane_sum from there).
 *
 * Torch's path spends ~150-400 us of per-op overhead per layer on these few kilobytes (gate linear,
 * softmax, topk, sort, index_select, split, cat, mul, index_add, add); here it is a few microseconds.
 * Each token is computed alone in a fixed order: its routing and its combined row are the same bits
 * whatever the other tokens of the call.
 *
 * Shape legend: T tokens, H hidden, E experts, K experts per token. The int64 table (`ints`) is laid
 * out as: counts [E] | offsets [E] (first packed row of each expert) | topk_idx [T, K] (descending
 * probability) | token_experts [T, K] (the same experts, ascending) | token_rows [T, K] (the packed
 * row of each of those) | row_tokens [T*K] (the token of each packed row). */

/* logits [E] = gate_w [E, H] . x [H], each a vector dot product in a fixed order. */
static void moe_gate_logits(long H, long E, const float *x, const float *gate_w, float *logits) {
    for (long e0 = 0; e0 < E; e0 += 8) {
        int block = E - e0 < 8 ? (int)(E - e0) : 8;
        vec acc[8];
        for (int j = 0; j < block; j++) acc[j] = (vec){0};
        long h = 0;
        for (; h + LANES <= H; h += LANES) {
            vec xv = load(x + h);
            for (int j = 0; j < block; j++) acc[j] += load(gate_w + (e0 + j) * H + h) * xv;
        }
        for (int j = 0; j < block; j++) {
            float dot = lane_sum(acc[j]);
            for (long t = h; t < H; t++) dot += gate_w[(e0 + j) * H + t] * x[t];
            logits[e0 + j] = dot;
        }
    }
}

/* probs [E] = softmax(logits) (max subtracted); topk [K] = the K largest, descending, the lower
 * expert first among equals. Returns 1 when the chosen set is ambiguous (a probability outside it
 * equals the K-th, or a NaN): the caller then picks as torch.topk does and calls again. */
static int moe_route_token(long E, long K, const float *logits, float *probs, long *topk) {
    float max = logits[0];
    for (long e = 1; e < E; e++) max = logits[e] > max ? logits[e] : max;
    float sum = 0.0f;
    for (long e = 0; e < E; e++) sum += probs[e] = expf(logits[e] - max);
    int ambiguous = 0;
    for (long e = 0; e < E; e++) {
        probs[e] /= sum;
        ambiguous |= probs[e] != probs[e];
    }
    for (long k = 0; k < K; k++) {
        long best = -1;
        for (long e = 0; e < E; e++) {
            int taken = 0;
            for (long j = 0; j < k; j++) taken |= topk[j] == e;
            if (!taken && (best < 0 || probs[e] > probs[best])) best = e;
        }
        topk[k] = best;
    }
    for (long e = 0; e < E && K < E; e++) {
        int taken = 0;
        for (long j = 0; j < K; j++) taken |= topk[j] == e;
        ambiguous |= !taken && probs[e] == probs[topk[K - 1]];
    }
    return ambiguous;
}

/* Route and gather. x [T, H], gate_w [E, H]; probs [T, E] (out, or in when given_topk); ints: the
 * table above (topk_idx in when given_topk, the rest out); weights [T*K] (out: each packed row's
 * routing weight, the K of a token renormalised to sum 1); packed [T*K, H] (out: each expert's
 * tokens in token order, experts ascending). given_topk = 0: computes logits, probs and topk_idx,
 * and returns the number of tokens whose set is ambiguous without gathering anything when it is not
 * 0. given_topk = 1: takes probs and topk_idx as they are (torch's picks) and gathers; returns 0. */
long shardmesh_moe_dispatch(long T, long H, long E, long K, const float *x, const float *gate_w, int given_topk,
                            float *probs, long *ints, float *weights, float *packed) {
    long *counts = ints, *offsets = ints + E, *topk_idx = ints + 2 * E;
    long *token_experts = topk_idx + T * K, *token_rows = token_experts + T * K, *row_tokens = token_rows + T * K;
    if (!given_topk) {
        float logits[E];
        long ambiguous = 0;
        for (long t = 0; t < T; t++) {
            moe_gate_logits(H, E, x + t * H, gate_w, logits);
            ambiguous += moe_route_token(E, K, logits, probs + t * E, topk_idx + t * K);
        }
        if (ambiguous) return ambiguous;
    }
    for (long e = 0; e < E; e++) counts[e] = 0;
    for (long i = 0; i < T * K; i++) counts[topk_idx[i]]++;
    long cursor[E];
    for (long e = 0, row = 0; e < E; row += counts[e], e++) offsets[e] = cursor[e] = row;
    for (long t = 0; t < T; t++) {
        const long *chosen = topk_idx + t * K;
        const float *p = probs + t * E;
        float sum = 0.0f;
        for (long k = 0; k < K; k++) sum += p[chosen[k]];
        long *experts = token_experts + t * K;
        for (long k = 0; k < K; k++) { /* insertion sort: ascending expert ids */
            long e = chosen[k], j = k;
            for (; j > 0 && experts[j - 1] > e; j--) experts[j] = experts[j - 1];
            experts[j] = e;
        }
        for (long k = 0; k < K; k++) {
            long e = experts[k], row = cursor[e]++;
            token_rows[t * K + k] = row;
            row_tokens[row] = t;
            weights[row] = p[e] / sum;
            memcpy(packed + row * H, x + t * H, H * sizeof(float));
        }
    }
    return 0;
}

/* out [T, H] = residual (or 0 when NULL) + sum over the token's experts, ascending, of weight * output,
 * in fp32 as torch's combine does it (each product rounded, then added to a sum that starts at +0,
 * then the residual added: never fused, so the bits are torch's for the same weights and outputs).
 * outputs[e]: expert e's output rows [counts[e], H] (any address; NULL for an expert with no rows);
 * offsets, token_experts, token_rows, weights: from shardmesh_moe_dispatch. */
__attribute__((optimize("fp-contract=off")))
void shardmesh_moe_combine(long T, long H, long K, const float *const *outputs, const long *offsets,
                           const long *token_experts, const long *token_rows, const float *weights,
                           const float *residual, float *out) {
    for (long t = 0; t < T; t++) {
        const float *rows[K];
        float scale[K];
        for (long k = 0; k < K; k++) {
            long e = token_experts[t * K + k], row = token_rows[t * K + k];
            rows[k] = outputs[e] + (row - offsets[e]) * H;
            scale[k] = weights[row];
        }
        float *destination = out + t * H;
        const float *before = residual ? residual + t * H : NULL;
        long h = 0;
        for (; h + LANES <= H; h += LANES) {
            vec acc = (vec){0};
            for (long k = 0; k < K; k++) {
                vec product = load(rows[k] + h) * scale[k];
                acc = acc + product;
            }
            if (before) acc = load(before + h) + acc;
            *(vec_unaligned *)(destination + h) = acc;
        }
        for (; h < H; h++) {
            float acc = 0.0f;
            for (long k = 0; k < K; k++) {
                float product = rows[k][h] * scale[k];
                acc = acc + product;
            }
            destination[h] = before ? before[h] + acc : acc;
        }
    }
}

/* shardmesh_moe_combine of a packed answer: every expert's output rows back to back in packed [T*K, H],
 * as the dispatch packed its rows (expert e's at offsets[e]). */
void shardmesh_moe_combine_packed(long T, long H, long E, long K, const float *packed, const long *offsets,
                                  const long *token_experts, const long *token_rows, const float *weights,
                                  const float *residual, float *out) {
    const float *outputs[E];
    for (long e = 0; e < E; e++) outputs[e] = packed + offsets[e] * H;
    shardmesh_moe_combine(T, H, K, outputs, offsets, token_experts, token_rows, weights, residual, out);
}
