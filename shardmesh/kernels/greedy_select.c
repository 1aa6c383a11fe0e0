/* The greedy LM head's selection, on any CPU: the int8 copy's layout (shardmesh_greedy_pack), the rows'
 * two int8 levels and the error bound, the candidates and their fp32 refinement (steps 1 and 3-5 of
 * lm_head_amx.c's header, which derives the bound and proves the selection). Included by lm_head_amx.c, not compiled alone;
 * shardmesh_greedy_select runs it on a product given from outside (tests, on any machine),
 * shardmesh_greedy_head on AMX's.
 *
 * Shape legend: as lm_head_amx.c's. */

#include <stdint.h>

#define GREEDY_GROUP 64          /* vocab columns per group (of maxima): 2 AMX blocks of 32 */
#define GREEDY_ROWS 16           /* a tile's rows: the most x rows */
#define GREEDY_CANDIDATES 64     /* per row; more and the caller falls back (the bound is too loose there) */

/* packed [G * 2 * Kp / 64 * 2048] int8 <- head [V, K] (zeros past V and K), in the order the AMX kernel
 * streams it: blocks of 32 columns, each [Kp / 64][2 tiles][16 quads of k][16 columns][4 k];
 * columns [3, Vp]: norms ||w_i||, residuals ||w_i - s_i q_i|| (both in double, rounded up; 0 past V)
 * and scales s_i = fl(max_j |w_ij| / 127) (0 for a zero row). q_ij = round(w_ij / s_i) (to nearest,
 * in double; in [-127, 127]). Returns 1 if a weight is not finite (the greedy head must stay off). */
int shardmesh_greedy_pack(long V, long K, const float *head, int8_t *packed, float *columns) {
    long Kp = (K + 63) / 64 * 64, groups = (V + GREEDY_GROUP - 1) / GREEDY_GROUP, Vp = groups * GREEDY_GROUP;
    float *norms = columns, *residuals = columns + Vp, *scales = columns + 2 * Vp;
    for (long i = 0; i < Vp; i++) {
        double squares = 0, largest = 0, misses = 0;
        for (long k = 0; k < K && i < V; k++) {
            float w = head[i * K + k];
            if (!isfinite(w)) return 1;
            squares += (double)w * w;
            largest = fabs(w) > largest ? fabs(w) : largest;
        }
        float scale = (float)(largest / 127);
        for (long k = 0; k < Kp; k++) {
            double w = i < V && k < K ? head[i * K + k] : 0, q = scale > 0 ? nearbyint(w / scale) : 0;
            q = q > 127 ? 127 : q < -127 ? -127 : q;
            misses += (w - q * scale) * (w - q * scale); /* q scale exact in double (7 + 24 bits) */
            int8_t *block = packed + ((i / 32 * (Kp / 64) + k / 64) * 2 + i % 32 / 16) * 1024;
            block[(k % 64 / 4) * 64 + i % 16 * 4 + k % 4] = (int8_t)q;
        }
        norms[i] = (float)(sqrt(squares) * (1 + 0x1p-20));
        residuals[i] = (float)(sqrt(misses) * (1 + 0x1p-20));
        scales[i] = scale;
    }
    return 0;
}

/* The rows' x [n, K] quantized in two int8 levels, x'_s = t_s (256 p_s + p'_s) (t_s = fl(max |x_s| /
 * 32512), p = round(x / 256 t), p' = round((x - 256 t p) / t), each clamped to [-127, 127]), into
 * levels [2, n, Kp] (p, then p'; zeros past K) and t [n]; and the bound e[s, i] = a[s] norms[i] +
 * c[s] residuals[i] + b[s] of lm_head_amx.c's header, its slack in. Returns 1 when a premise fails
 * (K > 1040, x not finite or all zero, t underflows to 0, ||x|| max_norm >= 2^100), else 0. */
int shardmesh_greedy_quantize_rows(long n, long K, const float *x, float max_norm, float *a, float *b, float *c,
                                   float *t, int8_t *levels) {
    const double u = 0x1p-24, tiny = 0x1p-126, up = 1 + 0x1p-20, slack = 1 + 0x1p-10;
    long Kp = (K + 63) / 64 * 64;
    if (K > 1040) return 1; /* |P| <= K 127^2 < 2^24: the int32 sums convert to fp32 exactly */
    double gamma = K * u / (1 - K * u), chain = 3 * u * (1 + 0x1p-20), root = sqrt((double)K);
    for (long s = 0; s < n; s++) {
        const float *row = x + s * K;
        double largest = 0, squares = 0;
        for (long k = 0; k < K; k++) {
            if (!isfinite(row[k])) return 1;
            largest = fabs(row[k]) > largest ? fabs(row[k]) : largest;
            squares += (double)row[k] * row[k];
        }
        float step = (float)(largest / 32512);
        double norm = sqrt(squares) * up, misses = 0, kept = 0;
        if (!(step > 0) || norm * max_norm >= 0x1p100) return 1;
        int8_t *coarse = levels + s * Kp, *fine = levels + (n + s) * Kp;
        for (long k = 0; k < Kp; k++) {
            double v = k < K ? row[k] : 0, p = nearbyint(v / (256.0 * step)), q;
            p = p > 127 ? 127 : p < -127 ? -127 : p;
            q = nearbyint((v - 256.0 * step * p) / step);
            q = q > 127 ? 127 : q < -127 ? -127 : q;
            double quantized = step * (256 * p + q); /* exact in double */
            misses += (v - quantized) * (v - quantized);
            kept += quantized * quantized;
            coarse[k] = (int8_t)p, fine[k] = (int8_t)q;
        }
        double error = sqrt(misses) * up, quantized_norm = sqrt(kept) * up;
        a[s] = (float)((error + gamma * norm + (chain + 0x1p-22) * quantized_norm + tiny * root) * slack);
        c[s] = (float)((1 + chain + 0x1p-22) * quantized_norm * slack);
        b[s] = (float)((tiny * (root * norm + 2.0 * K) + 0x1p-149 * (norm + 2)) * slack);
        t[s] = step;
    }
    return 0;
}

struct greedy_call {
    long n, K, Kp, V, Vp, groups, groups_per_unit;
    const int8_t *levels, *packed;     /* [2, n, Kp]; shardmesh_greedy_pack's layout */
    const float *norms, *residuals, *scales, *a, *b, *c, *t; /* [Vp] x 3, [n] x 4 */
    float *scores;                     /* A [n, Vp] */
    float *low_max, *high_max;         /* [G, 16] each: per group and row, max (A - e), max (A + e) */
    atomic_int bad;                    /* an A was not finite */
};

/* e[s, i] (the header's bound, in fp32). */
static inline float greedy_bound(const struct greedy_call *call, long s, float norm, float residual) {
    return call->a[s] * norm + call->c[s] * residual + call->b[s];
}

/* Per row, bounds over group g's columns below V: low_max = max A - e(top) <= A_k - e_k <= L_k for
 * the k with the largest A, high_max = max A + e(top) >= A_i + e_i for every i (e grows with ||w||:
 * a >= 0, and rounding is monotone), top the group's largest norm. One max per element instead of
 * an e each: the whole head at 16 rows, cold, 2 threads, 2.04 -> 1.93 ms (load 2). Flags a
 * non-finite A. Vectors over whole groups (the compares written out: fmaxf's NaN rule keeps GCC
 * from vectorising it; a NaN or inf A is caught by `poison` instead), scalars on the last group's
 * columns past V. */
static inline vec greedy_max(vec a, vec b) {
    typedef int ivec __attribute__((vector_size(LANES * 4)));
    ivec bigger = a > b, a_bits, b_bits; /* -1 where a > b */
    memcpy(&a_bits, &a, sizeof a);
    memcpy(&b_bits, &b, sizeof b);
    a_bits = (a_bits & bigger) | (b_bits & ~bigger);
    memcpy(&a, &a_bits, sizeof a);
    return a;
}

static void greedy_group_maxima(struct greedy_call *call, long g) {
    long start = g * GREEDY_GROUP, end = start + GREEDY_GROUP < call->V ? start + GREEDY_GROUP : call->V;
    float top = 0, top_residual = 0;
    for (long i = start; i < end; i++) {
        top = call->norms[i] > top ? call->norms[i] : top;
        top_residual = call->residuals[i] > top_residual ? call->residuals[i] : top_residual;
    }
    for (long s = 0; s < call->n; s++) {
        const float *scores = call->scores + s * call->Vp;
        vec best = (vec){0} - INFINITY, poison = (vec){0}; /* poison: NaN when an A is inf or NaN */
        long i = start;
        for (; i + LANES <= end; i += LANES) {
            vec score = load(scores + i);
            best = greedy_max(score, best);
            poison += score * 0.0f;
        }
        float largest = best[0], poisoned = 0;
        for (int lane = 0; lane < LANES; lane++) {
            largest = best[lane] > largest ? best[lane] : largest;
            poisoned += poison[lane];
        }
        for (; i < end; i++) {
            largest = scores[i] > largest ? scores[i] : largest;
            poisoned += scores[i] * 0.0f;
        }
        float e = greedy_bound(call, s, top, top_residual);
        if (poisoned != 0 || !isfinite(largest) || !isfinite(largest - e) || !isfinite(largest + e))
            atomic_store(&call->bad, 1);
        call->low_max[g * GREEDY_ROWS + s] = largest - e;
        call->high_max[g * GREEDY_ROWS + s] = largest + e;
    }
}

/* Each row's token from A (call->scores) and the bound: tokens [n]; candidates [n] the sizes of C_s;
 * values [n] (or NULL) the token's fp32 logit (tests: the full head's bits). x [n, K], head [V, K]
 * fp32. Returns 0, or 3 when a row has more than GREEDY_CANDIDATES. */
static int greedy_select(const struct greedy_call *call, const float *x, const float *head, long *tokens,
                         long *candidates, float *values) {
    long K = call->K;
    for (long s = 0; s < call->n; s++) {
        const float *scores = call->scores + s * call->Vp;
        float floor = -INFINITY; /* m_s */
        for (long g = 0; g < call->groups; g++) floor = fmaxf(floor, call->low_max[g * GREEDY_ROWS + s]);
        long chosen[GREEDY_CANDIDATES + 1], count = 0;
        for (long g = 0; g < call->groups; g++) {
            if (call->high_max[g * GREEDY_ROWS + s] < floor) continue;
            long end = (g + 1) * GREEDY_GROUP < call->V ? (g + 1) * GREEDY_GROUP : call->V;
            for (long i = g * GREEDY_GROUP; i < end; i++) {
                if (scores[i] + greedy_bound(call, s, call->norms[i], call->residuals[i]) < floor) continue;
                if (count == GREEDY_CANDIDATES) return 3;
                chosen[count++] = i;
            }
        }
        if (count == 0) return 3; /* not under the premises (m_s comes from a column whose A + e >= A - e) */
        chosen[count] = chosen[count - 1]; /* an odd last candidate pairs with itself */
        long best = -1;
        float best_logit = 0;
        for (long j = 0; j < count; j += 2) { /* in index order: the first maximum wins ties */
            float logits[2];
            pair_dots_any(head + chosen[j] * K, head + chosen[j + 1] * K, x + s * K, K, K, 1, &logits[0],
                          &logits[1], NULL, NULL, 0);
            for (int q = 0; q < 2 && j + q < count; q++)
                if (best < 0 || logits[q] > best_logit) best = chosen[j + q], best_logit = logits[q];
        }
        tokens[s] = best;
        candidates[s] = count;
        if (values) values[s] = best_logit;
    }
    return 0;
}

/* Without AMX (tests, any machine): tokens (and candidates, values) from A given as scores [n, Vp]
 * (only columns < V read) standing for the int8 product, x [n, K], head [V, K], columns [3, Vp]
 * (shardmesh_greedy_pack's); low_max, high_max [G, 16] scratch. Returns 0, or the premise that
 * failed: 1 (x / ||x|| / K), 2 (an A not finite), 3 (too many candidates). */
int shardmesh_greedy_select(long n, long K, long V, const float *x, const float *head, const float *columns,
                            float max_norm, float *scores, float *low_max, float *high_max, long *tokens,
                            long *candidates, float *values) {
    float a[GREEDY_ROWS], b[GREEDY_ROWS], c[GREEDY_ROWS], t[GREEDY_ROWS];
    static _Thread_local int8_t levels[2 * GREEDY_ROWS * 1088]; /* [2, n, Kp], K <= 1040 */
    long groups = (V + GREEDY_GROUP - 1) / GREEDY_GROUP, Vp = groups * GREEDY_GROUP;
    if (n < 1 || n > GREEDY_ROWS || shardmesh_greedy_quantize_rows(n, K, x, max_norm, a, b, c, t, levels)) return 1;
    struct greedy_call call = {.n = n, .K = K, .V = V, .Vp = Vp, .groups = groups, .norms = columns,
                               .residuals = columns + Vp, .a = a, .b = b, .c = c, .scores = scores,
                               .low_max = low_max, .high_max = high_max};
    for (long g = 0; g < groups; g++) greedy_group_maxima(&call, g);
    if (atomic_load(&call.bad)) return 2;
    return greedy_select(&call, x, head, tokens, candidates, values);
}
