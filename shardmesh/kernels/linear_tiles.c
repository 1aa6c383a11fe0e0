/* The dot-product form on AVX2 (LANES 8, 16 vector registers): linear_columns' and
 * expert_activations' products in register tiles of 2 or 3 weight rows by up to TILE_ROWS rows of x.
 * Included by expert_ffn.c (one library; vec, LANES, load, lane_sum and pair_tail come from there)
 * where LANES is 8, not compiled alone; AVX-512 and narrower builds keep pair_dots.
 *
 * On an AMD Zen 1 core (the bench machine of this path) a 256-bit multiply-add issues once per
 * cycle and so does a 256-bit load. pair_dots at 4 rows asks per step of 8 floats for 8 multiply-adds
 * and, as GCC compiles it, 2 weight loads, each x row loaded twice (as a memory operand of both its
 * multiply-adds) and two prefetches: 12 loads, so the loads, not the arithmetic, set the pace. Here
 * every weight and x vector is loaded once into a register (IN_REGISTER), the next weight rows are
 * fetched meanwhile, and above 6 rows the weight rows go in threes: 3 weight + 4 x loads for 12
 * multiply-adds (12 accumulators + 3 weights + 1 x: the 16 registers).
 *
 * Each output is the dot product summed as pair_dots sums it (LANES partial sums over k in order,
 * lane_sum's sequential sum of the lanes from 0, then pair_tail's scalar tail in order), so it has
 * pair_dots' bits whatever tile, block of rows or thread computes it (tests/test_linear_rows.py).
 *
 * Shapes as in expert_ffn.c: K input features, x rows of stride ldx, out rows of stride ldo.
 */

#define TILE_ROWS 6   /* most x rows in a tile: 2 x 6 accumulators + 2 weights + 1 x in 16 registers */
#define TRIPLE_ROWS 4 /* x rows per tile of three weight rows: 3 x 4 + 3 + 1 */

/* v unchanged, but held in a register from here: GCC would otherwise reload it from memory as an
 * operand of each multiply-add that uses it. */
#define IN_REGISTER(v) __asm__("" : "+x"(v))

#include <immintrin.h>

/* {lane_sum(a), lane_sum(b), lane_sum(c), lane_sum(d)}, bit for bit: lane_sum adds 0 + v[0] + v[1] +
 * ... + v[7] in order; here the four vectors' lanes are transposed (the 128-bit halves, 4 x 4 each)
 * so that each of those eight additions runs for the four at once. SSE/AVX intrinsics (any GCC;
 * __builtin_shufflevector needs 12), vextractf128 for the high halves (GCC makes a shuffle of them a
 * vperm2f128, 8 micro-ops on Zen 1). */
static inline __m128 lane_sums4(vec a, vec b, vec c, vec d) {
    __m128 sum = _mm_setzero_ps();
    for (int half = 0; half < 2; half++) {
        __m128 qa = half ? _mm256_extractf128_ps((__m256)a, 1) : _mm256_castps256_ps128((__m256)a);
        __m128 qb = half ? _mm256_extractf128_ps((__m256)b, 1) : _mm256_castps256_ps128((__m256)b);
        __m128 qc = half ? _mm256_extractf128_ps((__m256)c, 1) : _mm256_castps256_ps128((__m256)c);
        __m128 qd = half ? _mm256_extractf128_ps((__m256)d, 1) : _mm256_castps256_ps128((__m256)d);
        __m128 ab_low = _mm_unpacklo_ps(qa, qb), ab_high = _mm_unpackhi_ps(qa, qb); /* a0 b0 a1 b1, a2 b2 a3 b3 */
        __m128 cd_low = _mm_unpacklo_ps(qc, qd), cd_high = _mm_unpackhi_ps(qc, qd);
        sum = _mm_add_ps(sum, _mm_movelh_ps(ab_low, cd_low));   /* lane 4 half + 0 of each */
        sum = _mm_add_ps(sum, _mm_movehl_ps(cd_low, ab_low));   /* lane 4 half + 1 */
        sum = _mm_add_ps(sum, _mm_movelh_ps(ab_high, cd_high)); /* lane 4 half + 2 */
        sum = _mm_add_ps(sum, _mm_movehl_ps(cd_high, ab_high)); /* lane 4 half + 3 */
    }
    return sum;
}

/* dots[j][r] = w[j] . x[r] for j < WR (2 or 3), r < R (<= TILE_ROWS, WR * R <= 12; both constants
 * after inlining). The next weight rows pf0 and pf1 (none when pf0 is NULL) are fetched into L1
 * meanwhile, at the pace the tile reads its own. */
static inline __attribute__((always_inline)) void tile_dots(const float *const w[3], int WR, const float *x, long ldx,
                                                           long K, int R, float dots[3][TILE_ROWS],
                                                           const float *pf0, const float *pf1) {
    vec acc[3][TILE_ROWS];
    for (int j = 0; j < WR; j++)
        for (int r = 0; r < R; r++) acc[j][r] = (vec){0};
    long k = 0;
    for (long step = 0; k + LANES <= K; k += LANES, step++) {
        vec wv[3];
        for (int j = 0; j < WR; j++) {
            wv[j] = load(w[j] + k);
            IN_REGISTER(wv[j]);
        }
        if (pf0) { /* LANES floats: half a 64-byte line, so every line twice (alternating rows: 1.1-1.2x slower) */
            __builtin_prefetch(pf0 + k, 0, 3);
            __builtin_prefetch(pf1 + k, 0, 3);
        }
        for (int r = 0; r < R; r++) {
            vec xr = load(x + r * ldx + k);
            IN_REGISTER(xr);
            for (int j = 0; j < WR; j++) acc[j][r] += wv[j] * xr;
        }
    }
    vec *flat[12]; /* the WR * R accumulators, then the last again up to a multiple of 4 */
    int count = 0;
    for (int j = 0; j < WR; j++)
        for (int r = 0; r < R; r++) flat[count++] = &acc[j][r];
    for (int i = count; i < 12; i++) flat[i] = flat[count - 1];
    float sums[12];
    for (int i = 0; i < count; i += 4) {
        _mm_storeu_ps(sums + i, lane_sums4(*flat[i], *flat[i + 1], *flat[i + 2], *flat[i + 3]));
    }
    if (k == K) { /* no tail (K a multiple of LANES, as in the models) */
        for (int j = 0; j < WR; j++)
            for (int r = 0; r < R; r++) dots[j][r] = sums[j * R + r];
        return;
    }
    for (int j = 0; j < WR; j += 2) { /* the tails in pairs, as pair_dots takes them (a third row with itself) */
        int other = j + 1 < WR ? j + 1 : j;
        for (int r = 0; r < R; r++) {
            float a = sums[j * R + r], b = sums[other * R + r];
            pair_tail(w[j], w[other], x + r * ldx, k, K, &a, &b);
            dots[j][r] = a;
            dots[other][r] = b;
        }
    }
}

/* tile_dots for any WR (2, 3) and rows (1..TILE_ROWS for 2, 1..TRIPLE_ROWS for 3), each its own
 * unrolled copy. */
static void tile_dots_any(const float *const w[3], int WR, const float *x, long ldx, long K, int rows,
                          float dots[3][TILE_ROWS], const float *pf0, const float *pf1) {
    switch (WR * 8 + rows) {
#define CASE(W, R) case W * 8 + R: tile_dots(w, W, x, ldx, K, R, dots, pf0, pf1); return;
        CASE(2, 1) CASE(2, 2) CASE(2, 3) CASE(2, 4) CASE(2, 5) CASE(2, 6)
        CASE(3, 1) CASE(3, 2) CASE(3, 3) CASE(3, 4)
#undef CASE
    }
}

/* out[j][r * ldo] = w[j] . x[r] for j < outputs (<= WR; a lone row is w[0] == w[1], written once),
 * r < n: one pass over WR weight rows, x's rows in blocks (TRIPLE_ROWS for three weight rows, else
 * TILE_ROWS), the weight rows next[j] fetched meanwhile: the first two during the first block, a
 * third during the second. */
static void tile_pass(const float *const w[3], int WR, int outputs, long n, long K, const float *x,
                      float *const out[3], long ldo, const float *const next[3]) {
    float dots[3][TILE_ROWS];
    int block = WR == 3 ? TRIPLE_ROWS : TILE_ROWS;
    for (long r0 = 0; r0 < n; r0 += block) {
        int rows = n - r0 < block ? (int)(n - r0) : block;
        const float *pf0 = r0 == 0 ? next[0] : r0 == block && WR == 3 ? next[2] : NULL;
        tile_dots_any(w, WR, x + r0 * K, K, K, rows, dots, pf0, r0 == 0 ? next[1] : next[2]);
        for (int j = 0; j < outputs; j++)
            for (int r = 0; r < rows; r++) out[j][(r0 + r) * ldo] = dots[j][r];
    }
}

/* linear_columns on AVX2: out[r, m] = x[r] . W[m] for m in [m0, m1), r < n (<= 16), W [M, K]: above
 * TILE_ROWS rows the weight rows in threes (a count of them that leaves the rest even; at 8 rows 1.1-1.15x
 * faster than pairs over 6 + 2 rows, at 16 1.03x), the rest in pairs (one block up to 6 rows), a lone
 * last row paired with itself. */
static void tile_columns(long n, long K, long M, const float *x, const float *weight, float *out, long m0, long m1) {
    long triples = n > TILE_ROWS ? (m1 - m0) / 3 : 0;
    if ((m1 - m0 - 3 * triples) % 2 && triples) triples--;
    for (long m = m0; m < m1;) {
        int WR = m < m0 + 3 * triples ? 3 : 2, outputs = m + WR <= m1 ? WR : 1;
        const float *row = weight + m * K;
        const float *w[3] = {row, outputs > 1 ? row + K : row, row + 2 * K};
        const float *next[3] = {row + WR * K, row + (WR + 1) * K, row + (WR + 2) * K};
        float *const columns[3] = {out + m, out + m + 1, out + m + 2};
        tile_pass(w, WR, outputs, n, K, x, columns, M, next);
        m += WR;
    }
}
