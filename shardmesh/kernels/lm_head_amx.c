/* The greedy LM head: each row's argmax of L = x W^T (what shardmesh_linear_team computes, then
 * numpy's argmax), from an int8 copy of W on AMX and a rigorous error bound, refined in fp32.
 * Included by expert_ffn.c (one library: vec, LANES, load, pair_dots_any, team_run, units_of, unit_end
 * come from there), not compiled alone. shardmesh/greedy_head.py wraps it.
 *
 * Shape legend: n rows (<= 16), K hidden (<= 1040), V vocab, Kp = K rounded up to 64, Vp = V rounded
 * up to GREEDY_GROUP, G = Vp / GREEDY_GROUP groups.
 *
 * 1. Quantized operands (greedy_select.c). Per vocab row i: s_i = fl(max_j |w_ij| / 127) (any positive
 *    float would do: the bound uses the residual below, not a step size), q_ij = round(w_ij / s_i) in
 *    [-127, 127], w'_i = s_i q_i; stored, computed in double and rounded up, n_i >= ||w_i|| and
 *    r_i >= ||w_i - w'_i||. Per row s, two levels: t_s = fl(max_j |x_sj| / 32512), p_s =
 *    round(x_s / 256 t_s), p'_s = round((x_s - 256 t_s p_s) / t_s), both clamped to [-127, 127]
 *    (x' = t_s (256 p_s + p'_s) then misses x by <= t_s / 2 an entry, about max |x| 2^-16: one level
 *    misses by 128 times that, and left ~14 candidates a row on the bench checkpoint against ~4.6);
 *    in double, rounded up: ||x_s - x'_s||, ||x'_s||, ||x_s||.
 * 2. A[s, i] = fl(fl(fl(256 P + P') s_i) t_s), P = p_s . q_i and P' = p'_s . q_i summed exactly in
 *    int32 by TDPBSSD (|P| <= K 127^2 < 2^24 for K <= 1040: exact in fp32 too, 256 P as well), so A
 *    is x'_s . w'_i = t_s s_i (256 P + P') after three roundings: |A - x'.w'| <= ((1 + u)^3 - 1)
 *    |x'.w'| + 2^-150 (t_s (1 + u) + 1) (u = 2^-24; the 2^-150: underflow of the last two products).
 * 3. e[s, i] >= |L[s, i] - A[s, i]|. With S = x.w exact: |S - x'.w'| <= |(x - x').w| + |x'.(w - w')|
 *    <= ||x - x'|| ||w|| + ||x'|| r (Cauchy-Schwarz). Our fp32 kernel's L (any summation order, with
 *    or without FMA) errs from S by <= gamma_K sum |x_j w_j| <= gamma_K ||x|| ||w|| (gamma_K = K u /
 *    (1 - K u)) plus <= tiny = 2^-126 per operation where results underflow (2K operations); should
 *    it run with denormal inputs read as zero (MXCSR.DAZ, torch.set_flush_denormal), L loses at most
 *    tiny (||w||_1 + ||x||_1) <= tiny sqrt(K) (||w|| + ||x||) more. |x'.w'| <= ||x'|| (||w|| + r).
 *    Computing A - e and A + e in fp32 errs by <= u (|A| + e) + 2^-150: an extra 2^-22 ||x'|| (||w|| +
 *    r) >= 2u |A| covers the first part. So, with chain = (1 + u)^3 - 1 <= 3u (1 + 2^-20),
 *        e = a ||w|| + c r + b,
 *        a = ||x - x'|| + gamma_K ||x|| + (chain + 2^-22) ||x'|| + tiny sqrt(K),
 *        c = (1 + chain + 2^-22) ||x'||,
 *        b = tiny (sqrt(K) ||x|| + 2K) + 2^-149 (||x|| + 2)    (t_s <= ||x||),
 *    each from doubles and times a slack of 1 + 2^-10, which covers a, b, c rounded to fp32, e's own
 *    fp32 evaluation (nonnegative terms: <= 4 roundings), the u e of A +- e, and its underflows (all
 *    <= 2^-145, against b's slack >= 2^-136). The premises: K <= 1040, x finite, t_s > 0 (x not all
 *    zero nor all below ~2^-134), ||x|| max ||w|| < 2^100 (no partial sum can overflow), A finite;
 *    else the caller falls back to the full head.
 * 4. m_s <= max_i (A - e) (greedy_group_maxima: per group of columns, its largest A less e at its
 *    largest ||w|| and largest r, <= that column's A - e); candidates C_s = {i : A + e >= m_s}. If L_k
 *    = max L, then L_k >= L_j >= A_j - e_j >= m_s for the j giving m_s, and A_k + e_k >= L_k >= m_s:
 *    k is in C_s.
 * 5. L[s, i] for i in C_s by pair_dots_any (the dot product shardmesh_linear sums, in its order:
 *    the same bits as the full head's element); the token is the smallest index of C_s with the
 *    largest L, which is numpy's argmax (the first maximum; L has no NaN under the premises).
 *
 * The int8 copy (shardmesh_greedy_pack) costs Vp Kp bytes (16.4 MB for 32000 x 512, half the bf16 copy
 * this replaced: b16 from memory 1.39 ms a call against 1.94, see bench/greedy_head_ab.py) and 12 Vp
 * bytes of columns (norms, residuals, scales), laid out for AMX's B tiles in the order the kernel
 * streams it: blocks of 32 columns, each [Kp / 64][2 tiles][16 quads of k][16 columns][4 k]. */

#include <sys/syscall.h>

#include "greedy_select.c" /* pack, quantized rows and bound, selection, refinement (steps 1, 3-5) */

static int greedy_amx_ready; /* shardmesh_greedy_amx_enable succeeded in this process */

/* Ask the kernel for AMX tile data (per process: the team's helpers, started before or after, get it
 * too). Returns 1 when AMX code may run, 0 when not (not compiled in, or the kernel refused). */
int shardmesh_greedy_amx_enable(void) {
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
    if (!greedy_amx_ready) greedy_amx_ready = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */,
                                                      18 /* XFEATURE_XTILEDATA */) == 0;
#endif
    return greedy_amx_ready;
}

#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#include <immintrin.h>

struct greedy_tiles { /* LDTILECFG's 64 bytes, palette 1 */
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
};

#define GREEDY_AHEAD 8 /* k-steps (2 KiB each) fetched ahead: 16 KiB (the bf16 kernel this replaced measured
                        * 16 KiB best of none, 16, 32, 64) */

/* One unit: groups [index * groups_per_unit, ...), each as two blocks of 32 columns:
 * P = p . q and P' = p' . q by TDPBSSD (tiles 0-3: C, int32 n x 16: block columns 0-15 by p, by p',
 * 16-31 by p, by p'; 4, 5: p and p' (n rows of 64 bytes); 6, 7: B (16 quads x 16 columns)), then
 * A = fl(fl(fl(256 P + P') s_i) t_s) (P, P' exact in fp32: |P| < 2^24), then the group's maxima.
 * The bytes GREEDY_AHEAD k-steps on (the stream runs on into the next block) are fetched meanwhile,
 * a line per 64 bytes read: the hardware prefetchers did little on the 2-vCPU VM (the fp32 head
 * needed per-line software prefetch too). */
static void greedy_int8_unit(void *context, int phase, long index, int worker) {
    struct greedy_call *call = context;
    (void)phase, (void)worker;
    struct greedy_tiles tiles = {.palette = 1};
    for (int t = 0; t < 8; t++) tiles.bytes_per_row[t] = 64, tiles.rows[t] = t < 6 ? (uint8_t)call->n : 16;
    _tile_loadconfig(&tiles);
    typedef int ivec __attribute__((vector_size(LANES * 4)));
    int32_t sums[4][16][16] __attribute__((aligned(64))); /* the C tiles of a block: [tile][row][column] */
    long steps = call->Kp / 64, n = call->n;
    const int8_t *coarse = call->levels, *fine = call->levels + n * call->Kp;
    long first = index * call->groups_per_unit, last = unit_end(index, call->groups_per_unit, call->groups);
    for (long g = first; g < last; g++) {
        for (long half = 0; half < 2; half++) {
            const int8_t *block = call->packed + (g * 2 + half) * steps * 2048;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (long k = 0; k < steps; k++, block += 2048) {
                for (int line = 0; line < 32; line++)
                    __builtin_prefetch(block + GREEDY_AHEAD * 2048 + line * 64, 0, 3);
                _tile_loadd(4, coarse + k * 64, call->Kp);
                _tile_loadd(5, fine + k * 64, call->Kp);
                _tile_loadd(6, block, 64);
                _tile_dpbssd(0, 4, 6);
                _tile_dpbssd(1, 5, 6);
                _tile_loadd(7, block + 1024, 64);
                _tile_dpbssd(2, 4, 7);
                _tile_dpbssd(3, 5, 7);
            }
            _tile_stored(0, sums[0], 64); /* tile numbers are immediates */
            _tile_stored(1, sums[1], 64);
            _tile_stored(2, sums[2], 64);
            _tile_stored(3, sums[3], 64);
            long column = g * GREEDY_GROUP + half * 32;
            for (long s = 0; s < n; s++)
                for (int j = 0; j < 2; j++)
                    for (int lane = 0; lane < 16; lane += LANES) {
                        ivec p, q;
                        memcpy(&p, &sums[2 * j][s][lane], sizeof p);
                        memcpy(&q, &sums[2 * j + 1][s][lane], sizeof q);
                        long i = column + j * 16 + lane;
                        vec sum = __builtin_convertvector(p, vec) * 256.0f + __builtin_convertvector(q, vec);
                        vec score = sum * load(call->scales + i) * call->t[s];
                        memcpy(call->scores + s * call->Vp + i, &score, sizeof score);
                    }
        }
        greedy_group_maxima(call, g);
    }
    _tile_release();
}
#endif

/* The greedy head on AMX: tokens [n] (and candidates [n], the sizes of C_s) for x [n, K] against
 * head [V, K] (fp32) and its packed copy and columns [3, Vp] (norms, residuals, scales:
 * shardmesh_greedy_pack). scratch: floats for A [n, Vp], low_max and high_max [G, 16] each, the levels
 * [2, 16, Kp] int8 (Vp n + 32 G + 8 Kp). On this thread and threads - 1 of the team, groups_per_unit
 * groups a unit. Returns 0, or why the caller must fall back: 1 (a premise on x or K), 2 (an A not
 * finite), 3 (too many candidates), 4 (no AMX). */
long shardmesh_greedy_head(long n, long K, long V, const float *x, const float *head, const int8_t *packed,
                           const float *columns, float max_norm, float *scratch, long *tokens, long *candidates,
                           int threads, long groups_per_unit) {
#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
    float a[GREEDY_ROWS], b[GREEDY_ROWS], c[GREEDY_ROWS], t[GREEDY_ROWS];
    if (!greedy_amx_ready) return 4;
    long Kp = (K + 63) / 64 * 64, groups = (V + GREEDY_GROUP - 1) / GREEDY_GROUP, Vp = groups * GREEDY_GROUP;
    int8_t *levels = (int8_t *)(scratch + n * Vp + 2 * GREEDY_ROWS * groups); /* [2, n, Kp] */
    if (n < 1 || n > GREEDY_ROWS || shardmesh_greedy_quantize_rows(n, K, x, max_norm, a, b, c, t, levels)) return 1;
    struct greedy_call call = {.n = n, .K = K, .Kp = Kp, .V = V, .Vp = Vp, .groups = groups,
                               .groups_per_unit = groups_per_unit > 0 ? groups_per_unit : 1, .levels = levels,
                               .packed = packed, .norms = columns, .residuals = columns + Vp,
                               .scales = columns + 2 * Vp, .a = a, .b = b, .c = c, .t = t, .scores = scratch,
                               .low_max = scratch + n * Vp, .high_max = scratch + n * Vp + GREEDY_ROWS * groups};
    struct phased_job job = {.phases = 1, .run = greedy_int8_unit, .context = &call};
    job.ends[0] = units_of(groups, call.groups_per_unit);
    team_run(&job, threads);
    if (atomic_load(&call.bad)) return 2;
    return greedy_select(&call, x, head, tokens, candidates, NULL);
#else
    (void)n, (void)K, (void)V, (void)x, (void)head, (void)packed, (void)columns, (void)max_norm, (void)scratch;
    (void)tokens, (void)candidates, (void)threads, (void)groups_per_unit;
    return 4;
#endif
}
