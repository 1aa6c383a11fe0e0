/* The greedy LM head: each row's argmax of L = x W^T (what shardmesh_linear_team computes, then
 * numpy's argmax), from a bf16 copy of W on AMX and a rigorous error bound, refined in fp32.
 * Included by expert_ffn.c (one library: vec, LANES, pair_dots_any, team_run, units_of, unit_end
 * come from there), not compiled alone. shardmesh/greedy_head.py wraps it.
 *
 * Shape legend: n rows (<= 16), K hidden, V vocab, Kp = K rounded up to 32, Vp = V rounded up to
 * GREEDY_GROUP, G = Vp / GREEDY_GROUP groups.
 *
 * 1. A[s, i] = x'_s . w'_i summed in fp32 by TDPBF16PS, x' = bf16(x), w' = bf16(w) (round to nearest
 *    even; |v| < 2^-126 flushed to 0, as AMX treats bf16 denormals).
 * 2. e[s, i] >= |L[s, i] - A[s, i]|. With u = 2^-8, t = 2^-126 and S, S' the exact sums of x_j w_j
 *    and x'_j w'_j: |x - x'| <= u|x| + t (likewise w), so |x w - x' w'| <= (2u + u^2)|x||w| +
 *    t(|w| + (1 + u)|x|); summed, with sum |x_j||w_j| <= ||x|| ||w|| (Cauchy-Schwarz) and ||v||_1 <=
 *    sqrt(K) ||v||: |S - S'| <= (2u + u^2) ||x|| ||w|| + t sqrt(K) (||w|| + (1 + u) ||x||). Our fp32
 *    kernel's L (any summation order, with or without FMA) errs from S by <= gamma_K sum |x_j w_j|
 *    (gamma_K = K 2^-24 / (1 - K 2^-24)) plus <= t per operation where results underflow (2K
 *    operations); AMX's A errs from S' by <= gamma'_2K sum |x'_j w'_j| (gamma' with 2^-23: its
 *    rounding is not documented to be to nearest; 2K roundings per output bound any pairing),
 *    sum |x'_j w'_j| <= (1 + u)^2 ||x|| ||w||, plus t per flushed product or sum (3K). Should the
 *    fp32 kernel run with denormal inputs read as zero (MXCSR.DAZ, torch.set_flush_denormal), L
 *    loses at most t (||w||_1 + ||x||_1) more. So
 *        e = c ||x|| ||w|| + t (2 sqrt(K) ||w|| + 3 sqrt(K) ||x|| + 16 K),
 *        c = 2u + u^2 + gamma_K + gamma'_2K (1 + u)^2,
 *    evaluated as a_s ||w_i|| + b_s in fp32, a_s and b_s (from doubles) and ||w_i|| (greedy_pack:
 *    double, times 1 + 2^-20) carrying a relative slack of 2^-10: it covers the fp32 roundings of
 *    a_s ||w_i|| + b_s and of A +- e (|A| <= ~2^7 e, so those err by < 2^-16 e). The premises:
 *    x and w finite, ||x|| max ||w|| < 2^100 (no partial sum can overflow), A finite; else the
 *    caller falls back to the full head.
 * 3. m_s = max_i (A - e); candidates C_s = {i : A + e >= m_s}. If L_k = max L, then L_k >= L_j >=
 *    A_j - e_j = m_s for the j giving m_s, and A_k + e_k >= L_k >= m_s: k is in C_s.
 * 4. L[s, i] for i in C_s by pair_dots_any (the dot product shardmesh_linear sums, in its order:
 *    the same bits as the full head's element); the token is the smallest index of C_s with the
 *    largest L, which is numpy's argmax (the first maximum; L has no NaN under the premises).
 *
 * The bf16 copy (greedy_pack) costs V K 2 bytes (32.8 MB for 32000 x 512) next to the fp32 head,
 * laid out for AMX's B tiles in the order the kernel streams it: [G][Kp / 32][4][16 pairs of k]
 * [16 columns][2]. */

#include <stdint.h>
#include <sys/syscall.h>

#define GREEDY_GROUP 64          /* vocab columns per group: 4 tiles of 16 (4 C tiles + 1 A + 3 B of the 8) */
#define GREEDY_ROWS 16           /* a tile's rows: the most x rows */
#define GREEDY_CANDIDATES 64     /* per row; more and the caller falls back (the bound is too loose there) */
#define GREEDY_AHEAD 4           /* k-steps (4 KiB each) fetched ahead: 16 KiB. One thread, from memory, load
                                  * 2.5: 3.29 ms a call vs 3.67 at 32 KiB, 3.68 at 64 KiB, 3.40 with none */

static int greedy_amx_ready; /* shardmesh_greedy_amx_enable succeeded in this process */

/* bf16 of f, rounded to nearest even; |f| < 2^-126 flushed to a signed zero (AMX reads bf16 denormals as 0). */
static inline uint16_t greedy_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7F800000u) == 0) return (uint16_t)((bits >> 16) & 0x8000u);
    return (uint16_t)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16); /* finite inputs only (callers check) */
}

/* Ask the kernel for AMX tile data (per process: the team's helpers, started before or after, get it
 * too). Returns 1 when AMX code may run, 0 when not (not compiled in, or the kernel refused). */
int shardmesh_greedy_amx_enable(void) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (!greedy_amx_ready) greedy_amx_ready = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                                      18 /* XFEATURE_XTILEDATA */) == 0;
#endif
    return greedy_amx_ready;
}

/* packed [G * Kp / 32 * 4 * 512] bf16 <- head [V, K] (zeros past V and K); norms [Vp] <- ||w_i||
 * rounded up (0 past V). Returns 1 if a weight is not finite (the greedy head must stay off), else 0. */
int shardmesh_greedy_pack(long V, long K, const float *head, uint16_t *packed, float *norms) {
    long Kp = (K + 31) / 32 * 32, groups = (V + GREEDY_GROUP - 1) / GREEDY_GROUP;
    for (long i = 0; i < groups * GREEDY_GROUP; i++) {
        double squares = 0;
        for (long k = 0; k < K && i < V; k++) {
            float w = head[i * K + k];
            if (!isfinite(w)) return 1;
            squares += (double)w * w;
        }
        norms[i] = (float)(sqrt(squares) * (1 + 0x1p-20));
        long group = i / GREEDY_GROUP, tile = i % GREEDY_GROUP / 16, column = i % 16;
        for (long k = 0; k < Kp; k++) {
            uint16_t *block = packed + ((group * (Kp / 32) + k / 32) * 4 + tile) * 512;
            block[(k % 32 / 2) * 32 + column * 2 + k % 2] = i < V && k < K ? greedy_bf16(head[i * K + k]) : 0;
        }
    }
    return 0;
}

/* e[s, i] = a[s] norms[i] + b[s] for the rows' x [n, K] (the bound of the header, its slack in).
 * Returns 1 when a premise fails (x not finite, or ||x|| max_norm >= 2^100), else 0. */
int shardmesh_greedy_row_bounds(long n, long K, const float *x, float max_norm, float *a, float *b) {
    const double u = 0x1p-8, t = 0x1p-126, slack = 1 + 0x1p-10;
    double gamma = K * 0x1p-24 / (1 - K * 0x1p-24), gamma_amx = 2 * K * 0x1p-23 / (1 - 2 * K * 0x1p-23);
    double c = 2 * u + u * u + gamma + gamma_amx * (1 + u) * (1 + u), root = sqrt((double)K);
    for (long s = 0; s < n; s++) {
        double squares = 0;
        for (long k = 0; k < K; k++) {
            if (!isfinite(x[s * K + k])) return 1;
            squares += (double)x[s * K + k] * x[s * K + k];
        }
        double norm = sqrt(squares) * (1 + 0x1p-20);
        if (norm * max_norm >= 0x1p100) return 1;
        a[s] = (float)((c * norm + 2 * t * root) * slack);
        b[s] = (float)(t * (3 * root * norm + 16.0 * K) * slack);
    }
    return 0;
}

struct greedy_call {
    long n, K, Kp, V, Vp, groups, groups_per_unit;
    const uint16_t *x_bf16, *packed;   /* [n, Kp]; the layout above */
    const float *norms, *a, *b;        /* [Vp], [n], [n] */
    float *scores;                     /* A [n, Vp] */
    float *low_max, *high_max;         /* [G, 16] each: per group and row, max (A - e), max (A + e) */
    atomic_int bad;                    /* an A was not finite */
};

/* The maxima of A -+ e over group g's columns below V, per row; flags a non-finite A. Vectors over
 * whole groups (the compares are written out: fmaxf's NaN rule keeps GCC from vectorising it; a NaN
 * or inf A is caught by `poison` instead), scalars on the last group's columns past V. */
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
    for (long s = 0; s < call->n; s++) {
        const float *scores = call->scores + s * call->Vp, a = call->a[s], b = call->b[s];
        vec low = (vec){0} - INFINITY, high = low, poison = (vec){0}; /* poison: NaN when an A is inf or NaN */
        long i = start;
        for (; i + LANES <= end; i += LANES) {
            vec score = load(scores + i), e = a * load(call->norms + i) + b, down = score - e, up = score + e;
            low = greedy_max(down, low);
            high = greedy_max(up, high);
            poison += score * 0.0f;
        }
        float lowest = low[0], highest = high[0], poisoned = 0;
        for (int lane = 0; lane < LANES; lane++) {
            lowest = low[lane] > lowest ? low[lane] : lowest;
            highest = high[lane] > highest ? high[lane] : highest;
            poisoned += poison[lane];
        }
        for (; i < end; i++) {
            float e = a * call->norms[i] + b;
            lowest = scores[i] - e > lowest ? scores[i] - e : lowest;
            highest = scores[i] + e > highest ? scores[i] + e : highest;
            poisoned += scores[i] * 0.0f;
        }
        if (poisoned != 0 || !isfinite(lowest) || !isfinite(highest)) atomic_store(&call->bad, 1);
        call->low_max[g * GREEDY_ROWS + s] = lowest;
        call->high_max[g * GREEDY_ROWS + s] = highest;
    }
}

/* Each row's token from A (call->scores) and the bound: tokens [n]; candidates [n] the sizes of C_s;
 * values [n] (or NULL) the token's fp32 logit (tests: the full head's bits). x [n, K], head [V, K]
 * fp32. Returns 0, or 3 when a row has more than GREEDY_CANDIDATES. */
static int greedy_select(const struct greedy_call *call, const float *x, const float *head, long *tokens,
                         long *candidates, float *values) {
    long K = call->K;
    for (long s = 0; s < call->n; s++) {
        const float *scores = call->scores + s * call->Vp, a = call->a[s], b = call->b[s];
        float floor = -INFINITY; /* m_s */
        for (long g = 0; g < call->groups; g++) floor = fmaxf(floor, call->low_max[g * GREEDY_ROWS + s]);
        long chosen[GREEDY_CANDIDATES + 1], count = 0;
        for (long g = 0; g < call->groups; g++) {
            if (call->high_max[g * GREEDY_ROWS + s] < floor) continue;
            long end = (g + 1) * GREEDY_GROUP < call->V ? (g + 1) * GREEDY_GROUP : call->V;
            for (long i = g * GREEDY_GROUP; i < end; i++) {
                if (scores[i] + (a * call->norms[i] + b) < floor) continue;
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
 * (only columns < V read), x [n, K], head [V, K], norms [Vp]; low_max, high_max [G, 16] scratch.
 * Returns 0, or the premise that failed: 1 (x / ||x||), 2 (an A not finite), 3 (too many candidates). */
int shardmesh_greedy_select(long n, long K, long V, const float *x, const float *head, const float *norms,
                            float max_norm, float *scores, float *low_max, float *high_max, long *tokens,
                            long *candidates, float *values) {
    float a[GREEDY_ROWS], b[GREEDY_ROWS];
    long groups = (V + GREEDY_GROUP - 1) / GREEDY_GROUP;
    if (n < 1 || n > GREEDY_ROWS || shardmesh_greedy_row_bounds(n, K, x, max_norm, a, b)) return 1;
    struct greedy_call call = {.n = n, .K = K, .V = V, .Vp = groups * GREEDY_GROUP, .groups = groups,
                               .norms = norms, .a = a, .b = b, .scores = scores, .low_max = low_max,
                               .high_max = high_max};
    for (long g = 0; g < groups; g++) greedy_group_maxima(&call, g);
    if (atomic_load(&call.bad)) return 2;
    return greedy_select(&call, x, head, tokens, candidates, values);
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>

struct greedy_tiles { /* LDTILECFG's 64 bytes, palette 1 */
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
};

/* One unit: groups [index * groups_per_unit, ...): A by tiles, then their maxima. Tiles 0-3: C (n x
 * 16 fp32, the group's 4 blocks of columns), 4: A (n rows of 32 bf16 of x'), 5-7: B (16 pairs x 16
 * columns). The bytes GREEDY_AHEAD k-steps on (the stream runs on into the next group) are fetched
 * meanwhile, a line per 64 bytes read: the hardware prefetchers do little on this VM (the fp32 head
 * needed per-line software prefetch too). */
static void greedy_amx_unit(void *context, int phase, long index, int worker) {
    struct greedy_call *call = context;
    (void)phase, (void)worker;
    struct greedy_tiles tiles = {.palette = 1};
    for (int t = 0; t < 8; t++) tiles.bytes_per_row[t] = 64, tiles.rows[t] = t < 5 ? (uint8_t)call->n : 16;
    _tile_loadconfig(&tiles);
    long steps = call->Kp / 32, group_halves = steps * 4 * 512; /* bf16 per group */
    long first = index * call->groups_per_unit, last = unit_end(index, call->groups_per_unit, call->groups);
    for (long g = first; g < last; g++) {
        const uint16_t *block = call->packed + g * group_halves;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (long k = 0; k < steps; k++, block += 4 * 512) {
            for (int line = 0; line < 64; line++) __builtin_prefetch(block + GREEDY_AHEAD * 2048 + line * 32, 0, 3);
            _tile_loadd(4, call->x_bf16 + k * 32, call->Kp * 2);
            _tile_loadd(5, block, 64);
            _tile_dpbf16ps(0, 4, 5);
            _tile_loadd(6, block + 512, 64);
            _tile_dpbf16ps(1, 4, 6);
            _tile_loadd(7, block + 1024, 64);
            _tile_dpbf16ps(2, 4, 7);
            _tile_loadd(5, block + 1536, 64);
            _tile_dpbf16ps(3, 4, 5);
        }
        float *out = call->scores + g * GREEDY_GROUP;
        long stride = call->Vp * 4;
        _tile_stored(0, out, stride);
        _tile_stored(1, out + 16, stride);
        _tile_stored(2, out + 32, stride);
        _tile_stored(3, out + 48, stride);
        greedy_group_maxima(call, g);
    }
    _tile_release(); /* no tile state kept: a context switch saves none */
}
#endif

/* The greedy head on AMX: tokens [n] (and candidates [n], the sizes of C_s) for x [n, K] against
 * head [V, K] (fp32) and its packed copy and norms (shardmesh_greedy_pack). scratch: floats for
 * A [n, Vp], low_max and high_max [G, 16] each, x' [16, Kp] bf16 (Vp n + 32 G + 8 Kp). On this
 * thread and threads - 1 of the team, groups_per_unit groups a unit. Returns 0, or why the caller
 * must fall back: 1 (x / ||x||), 2 (an A not finite), 3 (too many candidates), 4 (no AMX). */
long shardmesh_greedy_head(long n, long K, long V, const float *x, const float *head, const uint16_t *packed,
                           const float *norms, float max_norm, float *scratch, long *tokens, long *candidates,
                           int threads, long groups_per_unit) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    float a[GREEDY_ROWS], b[GREEDY_ROWS];
    if (!greedy_amx_ready) return 4;
    if (n < 1 || n > GREEDY_ROWS || shardmesh_greedy_row_bounds(n, K, x, max_norm, a, b)) return 1;
    long Kp = (K + 31) / 32 * 32, groups = (V + GREEDY_GROUP - 1) / GREEDY_GROUP, Vp = groups * GREEDY_GROUP;
    struct greedy_call call = {.n = n, .K = K, .Kp = Kp, .V = V, .Vp = Vp, .groups = groups,
                               .groups_per_unit = groups_per_unit > 0 ? groups_per_unit : 1, .packed = packed,
                               .norms = norms, .a = a, .b = b, .scores = scratch,
                               .low_max = scratch + n * Vp, .high_max = scratch + n * Vp + GREEDY_ROWS * groups};
    uint16_t *x_bf16 = (uint16_t *)(scratch + n * Vp + 2 * GREEDY_ROWS * groups); /* [n, Kp] */
    for (long s = 0; s < n; s++)
        for (long k = 0; k < Kp; k++) x_bf16[s * Kp + k] = k < K ? greedy_bf16(x[s * K + k]) : 0;
    call.x_bf16 = x_bf16;
    struct phased_job job = {.phases = 1, .run = greedy_amx_unit, .context = &call};
    job.ends[0] = units_of(groups, call.groups_per_unit);
    team_run(&job, threads);
    if (atomic_load(&call.bad)) return 2;
    return greedy_select(&call, x, head, tokens, candidates, NULL);
#else
    (void)n, (void)K, (void)V, (void)x, (void)head, (void)packed, (void)norms, (void)max_norm, (void)scratch;
    (void)tokens, (void)candidates, (void)threads, (void)groups_per_unit;
    return 4;
#endif
}
