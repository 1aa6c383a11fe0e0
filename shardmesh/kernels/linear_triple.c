/* linear_columns (expert_ffn.c) at 9-16 rows with AVX-512: the weight rows taken in threes, not
 * pairs. Included by expert_ffn.c (one library; vec, LANES, ROWS_BLOCK, load and lane_sum come from
 * there), not compiled alone.
 *
 * At 16 rows a pass over a pair of weight rows is two blocks of 8 rows, each step 2 weight + 8 x
 * loads for 16 multiply-adds; three rows take 3 + 8 loads for 24, fewer instructions per weight,
 * so the arithmetic runs 1.05-1.07x faster (LM head rows, weights from L3, one thread: 0.073 ->
 * 0.070 ms per 510 rows at 16 rows; all 32000 from L3 on 2 threads: 2.68 -> 2.57 ms). Each dot
 * product is summed as pair_dots sums it (LANES partial sums over k in order, lane_sum, the scalar
 * tail in order), so every output has pair_dots' bits, and a row's result does not depend on the
 * batch it is in.
 */

#if LANES == 16
#include <immintrin.h>
#if defined(__clang__) || __GNUC__ >= 12 /* lane_sum's halving form (expert_ffn.c) */
#define LANE_SUMS16 1
/* sums[i] = lane_sum(a[i]), sums[8 + i] = lane_sum(b[i]) for i < 8, bit for bit. lane_sum adds v[l] +
 * v[l + 8] (l < 8), then h[l] + h[l + 4] (l < 4), then q[0] + q[2] and q[1] + q[3], then those two;
 * here each of those steps runs for several vectors at once, their lanes gathered by shuffles: the
 * same pairs of operands added in the same order (float addition is commutative), 30 shuffles and
 * 15 additions for 16 sums where lane_sum takes ~4 shuffles and 4 additions per sum. */
static inline void lane_sums16(const vec a[ROWS_BLOCK], const vec b[ROWS_BLOCK], float sums[16]) {
    __m512 h[8], q[4], r[2];
    for (int p = 0; p < 8; p++) { /* [halves of v[2p] | halves of v[2p + 1]], v = a then b */
        __m512 low = (__m512)(p < 4 ? a[2 * p] : b[2 * p - 8]), high = (__m512)(p < 4 ? a[2 * p + 1] : b[2 * p - 7]);
        h[p] = _mm512_add_ps(_mm512_shuffle_f32x4(low, high, 0x44), _mm512_shuffle_f32x4(low, high, 0xEE));
    }
    for (int p = 0; p < 4; p++) /* the quarters of v[4p + c] in 128-bit block c */
        q[p] = _mm512_add_ps(_mm512_shuffle_f32x4(h[2 * p], h[2 * p + 1], 0x88),
                             _mm512_shuffle_f32x4(h[2 * p], h[2 * p + 1], 0xDD));
    for (int p = 0; p < 2; p++) /* block c: (q0 + q2, q1 + q3) of v[8p + c], then of v[8p + 4 + c] */
        r[p] = _mm512_add_ps(_mm512_shuffle_ps(q[2 * p], q[2 * p + 1], 0x44),
                             _mm512_shuffle_ps(q[2 * p], q[2 * p + 1], 0xEE));
    float lanes[16]; /* block c: the sums of v[c], v[4 + c], v[8 + c], v[12 + c] */
    _mm512_storeu_ps(lanes, _mm512_add_ps(_mm512_shuffle_ps(r[0], r[1], 0x88), _mm512_shuffle_ps(r[0], r[1], 0xDD)));
    for (int i = 0; i < 16; i++) sums[i] = lanes[i % 4 * 4 + i / 4];
}
#endif
/* dots[j][r] = w[j] . x[r] for j < 3, r < rows (<= 8, a constant after inlining): three weight rows
 * (stride K) at once, 3 x 8 accumulators + 3 weight vectors + 1 of x in the 32 registers. The next
 * three rows (next, stride K) are fetched into L1 meanwhile, spread over the two blocks of a pass:
 * rows 0 and 1 during the first (second = 0), row 2 during the second. */
static inline __attribute__((always_inline)) void triple_dots(const float *w, const float *x, long ldx, long K,
                                                             int rows, float dots[3][ROWS_BLOCK],
                                                             const float *next, int second) {
    vec acc[3][ROWS_BLOCK];
    for (int j = 0; j < 3; j++)
        for (int r = 0; r < rows; r++) acc[j][r] = (vec){0};
    long k = 0;
    for (; k + LANES <= K; k += LANES) {
        vec w0 = load(w + k), w1 = load(w + K + k), w2 = load(w + 2 * K + k);
        if (second) {
            __builtin_prefetch(next + 2 * K + k, 0, 3);
        } else {
            __builtin_prefetch(next + k, 0, 3);
            __builtin_prefetch(next + K + k, 0, 3);
        }
        for (int r = 0; r < rows; r++) {
            vec xr = load(x + r * ldx + k);
            acc[0][r] += w0 * xr;
            acc[1][r] += w1 * xr;
            acc[2][r] += w2 * xr;
        }
    }
    float sums[3][ROWS_BLOCK];
#ifdef LANE_SUMS16
    if (rows == ROWS_BLOCK) { /* a whole block: 24 sums in 16 + 8 (the 8 twice; 1.09x faster at 16 rows) */
        float first[16], last[16];
        lane_sums16(acc[0], acc[1], first);
        lane_sums16(acc[2], acc[2], last);
        for (int r = 0; r < ROWS_BLOCK; r++)
            sums[0][r] = first[r], sums[1][r] = first[ROWS_BLOCK + r], sums[2][r] = last[r];
    } else
#endif
        for (int j = 0; j < 3; j++)
            for (int r = 0; r < rows; r++) sums[j][r] = lane_sum(acc[j][r]);
    for (int j = 0; j < 3; j++)
        for (int r = 0; r < rows; r++) {
            float dot = sums[j][r];
            for (long t = k; t < K; t++) dot += w[j * K + t] * x[r * ldx + t];
            dots[j][r] = dot;
        }
}

/* The second block of a pass (rows = n - ROWS_BLOCK, 1..8), each count its own unrolled copy. */
static void triple_dots_second(const float *w, const float *x, long ldx, long K, int rows,
                               float dots[3][ROWS_BLOCK], const float *next) {
    switch (rows) {
#define CASE(R) case R: triple_dots(w, x, ldx, K, R, dots, next, 1); return;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
    }
}

/* linear_columns for 9-16 rows (two blocks) over weight rows in threes from m0: returns where it
 * stopped, leaving an even count (or none) of [m0, m1) to the pairs (a lone last row would pair
 * with itself and be computed twice). */
static long triple_columns(long n, long K, long M, const float *x, const float *weight, float *out, long m0,
                           long m1) {
    long triples = (m1 - m0) / 3;
    if ((m1 - m0 - 3 * triples) % 2 && triples) triples--;
    float dots[3][ROWS_BLOCK];
    for (long m = m0; m < m0 + 3 * triples; m += 3) {
        const float *w = weight + m * K, *next = w + 3 * K;
        triple_dots(w, x, K, K, ROWS_BLOCK, dots, next, 0);
        for (int r = 0; r < ROWS_BLOCK; r++)
            for (int j = 0; j < 3; j++) out[r * M + m + j] = dots[j][r];
        triple_dots_second(w, x + ROWS_BLOCK * K, K, K, (int)n - ROWS_BLOCK, dots, next);
        for (int r = 0; r < n - ROWS_BLOCK; r++)
            for (int j = 0; j < 3; j++) out[(ROWS_BLOCK + r) * M + m + j] = dots[j][r];
    }
    return m0 + 3 * triples;
}
#endif

