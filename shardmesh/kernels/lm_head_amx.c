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
 * 3. m_s <= max_i (A - e) (greedy_group_maxima: per group of columns, its largest A less e at its
 *    largest ||w||, <= that column's A - e); candidates C_s = {i : A + e >= m_s}. If L_k = max L,
 *    then L_k >= L_j >= A_j - e_j >= m_s for the j giving m_s, and A_k + e_k >= L_k >= m_s: k is in C_s.
 * 4. L[s, i] for i in C_s by pair_dots_any (the dot product shardmesh_linear sums, in its order:
 *    the same bits as the full head's element); the token is the smallest index of C_s with the
 *    largest L, which is numpy's argmax (the first maximum; L has no NaN under the premises).
 *
 * The bf16 copy (greedy_pack) costs V K 2 bytes (32.8 MB for 32000 x 512) next to the fp32 head,
 * laid out for AMX's B tiles in the order the kernel streams it: [G][Kp / 32][4][16 pairs of k]
 * [16 columns][2]. */

#include <sys/syscall.h>

#include "greedy_select.c" /* pack, bound, selection, refinement (steps 2-4) */

#define GREEDY_AHEAD 4 /* k-steps (4 KiB each) fetched ahead: 16 KiB. One thread, from memory, load 2.5:
                        * 3.29 ms a call vs 3.67 at 32 KiB, 3.68 at 64 KiB, 3.40 with none */

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

#if defined(__AMX_TILE__)
#include <immintrin.h>

struct greedy_tiles { /* LDTILECFG's 64 bytes, palette 1 */
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
};
#endif
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)

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

#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#define GREEDY_AHEAD_INT8 8 /* k-steps (2 KiB each) fetched ahead: 16 KiB, as the bf16 kernel */

/* One unit of the int8 head: groups [index * groups_per_unit, ...), each as two blocks of 32 columns:
 * P = p . q and P' = p' . q by TDPBSSD (tiles 0-3: C, int32 n x 16: block columns 0-15 by p, by p',
 * 16-31 by p, by p'; 4, 5: p and p' (n rows of 64 bytes); 6, 7: B (16 quads x 16 columns)), then
 * A = fl(fl(fl(256 P + P') s_i) t_s) (P, P' exact in fp32: |P| < 2^24), then the group's maxima. */
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
            const int8_t *block = call->packed_int8 + (g * 2 + half) * steps * 2048;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (long k = 0; k < steps; k++, block += 2048) {
                for (int line = 0; line < 32; line++)
                    __builtin_prefetch(block + GREEDY_AHEAD_INT8 * 2048 + line * 64, 0, 3);
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

/* The greedy head on AMX-INT8: as shardmesh_greedy_head, from shardmesh_greedy_pack_int8's packed copy
 * and columns [3, Vp] (norms, residuals, scales). scratch: floats for A [n, Vp], low_max and high_max
 * [G, 16] each, the levels [2, 16, Kp] int8 (Vp n + 32 G + 8 Kp). Returns 0, or why the caller must
 * fall back: 1 (a premise on x or K), 2 (an A not finite), 3 (too many candidates), 4 (no AMX). */
long shardmesh_greedy_head_int8(long n, long K, long V, const float *x, const float *head, const int8_t *packed,
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
                               .packed_int8 = packed, .norms = columns, .residuals = columns + Vp,
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
