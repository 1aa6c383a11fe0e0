/* The outer-product form of shardmesh_linear for 17-64 rows: shardmesh_linear_wide. Included by
 * expert_ffn.c (one library; vec, LANES and load come from there), not compiled alone.
 * Above ~16 rows the dot-product form (expert_ffn.c) is bound by its per-(row, weight row)
 * horizontal sums and x loads. Here x is packed once per call, transposed into xt [K, V * LANES] (V = ceil(n /
 * LANES) vectors of token rows, zero-padded), and each weight element W[m, k] is broadcast against
 * those vectors: acc[m][v] += W[m, k] * xt[k, v], accumulators [MB weight rows x V vectors]
 * in registers, no horizontal sums, the weights read in their loaded layout (no packed copy kept).
 * Every output sums its K products in the same order (k = 0..K-1 within each WIDE_CHUNK, then the
 * chunks), one fused multiply-add each, whatever n and whichever lane it sits in: a row's result
 * does not depend on how the batch is cut. */

#define WIDE_MAX_VECTORS 4 /* up to 4 * LANES rows per pass over the weights */
/* Products are summed in chunks of WIDE_CHUNK (a multiple of 16) in order, the chunk sums then added
 * in order: the rounding error grows with WIDE_CHUNK + K / WIDE_CHUNK terms, not K (one chain over
 * K = 4096 erred by 2e-6 of the largest output, 5x torch's blocked sums; chunked 3e-7). */
#define WIDE_CHUNK 128
#ifndef WIDE_PREFETCH
#define WIDE_PREFETCH 64
#endif

#include <immintrin.h>
#if LANES == 16
/* *p in every lane, as a memory operand of the multiply-add ({1to16}): a load-port micro-op, not a
 * shuffle-port broadcast from a register (which bounds the loop at one weight per cycle). */
static inline vec broadcast(const float *p) { return (vec)_mm512_set1_ps(*p); }
#else
static inline vec broadcast(const float *p) { return (vec){0} + *p; }
#endif

/* acc + a * b rounded once wherever the CPU has a fused multiply-add: by the instruction, not left
 * to the compiler's contraction of `acc += a * b`, which GCC 12 fuses at every accumulator here but
 * another compiler or version may leave unfused at some (V, MB) and not others, and then a row's
 * bits would depend on how many rows share its pass. */
static inline vec fused_multiply_add(vec a, vec b, vec acc) {
#if LANES == 16
    return (vec)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)acc);
#elif LANES == 8 && defined(__FMA__)
    return (vec)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)acc);
#else
    return acc + a * b; /* no FMA instruction: no contraction either */
#endif
}

/* out[r, m0 + i] for i < MB, r < rows (rows of this pass, starting at x's row r0 already applied):
 * MB weight rows from w (stride K) against V vectors of xt (stride ldt). */
static inline __attribute__((always_inline)) void wide_block(const float *w, long K, const float *xt, long ldt,
                                                            int MB, int V, long rows, float *out, long M) {
    vec acc[24][WIDE_MAX_VECTORS], total[24][WIDE_MAX_VECTORS]; /* MB <= 24 */
    for (int i = 0; i < MB; i++)
        for (int v = 0; v < V; v++) total[i][v] = acc[i][v] = (vec){0};
    for (long k0 = 0; k0 < K; k0 += 16) { /* 16 floats: one 64-byte line of each weight row */
        if (k0 % WIDE_CHUNK == 0) {
            if (k0)
                for (int i = 0; i < MB; i++)
                    for (int v = 0; v < V; v++) total[i][v] += acc[i][v];
            for (int i = 0; i < MB; i++)
                for (int v = 0; v < V; v++) acc[i][v] = (vec){0};
        }
        /* the MB weight rows are MB streams the hardware prefetcher serves too late: fetch each row
         * WIDE_PREFETCH floats ahead (past a row's end: the next rows, harmless) */
        for (int i = 0; i < MB; i++) __builtin_prefetch(w + i * K + k0 + WIDE_PREFETCH, 0, 3);
        long k_end = k0 + 16 < K ? k0 + 16 : K;
        for (long k = k0; k < k_end; k++) {
            vec xv[WIDE_MAX_VECTORS];
            for (int v = 0; v < V; v++) xv[v] = *(const vec *)(xt + k * ldt + v * LANES); /* aligned: see wide_pack */
            for (int i = 0; i < MB; i++) {
                vec wv = broadcast(w + i * K + k);
                for (int v = 0; v < V; v++) acc[i][v] = fused_multiply_add(wv, xv[v], acc[i][v]);
            }
        }
    }
    for (int i = 0; i < MB; i++)
        for (int v = 0; v < V; v++) total[i][v] += acc[i][v];
    for (int i = 0; i < MB; i++)
        for (int v = 0; v < V; v++)
            for (int lane = 0; lane < LANES; lane++) {
                long r = (long)v * LANES + lane;
                if (r < rows) out[r * M + i] = total[i][v][lane];
            }
}

/* M outputs (weight rows) for one pass of rows, into out (rows `stride` apart): blocks of MB weight rows
 * (accumulators MB x V <= 24 of the 32 AVX-512 registers), the last M % MB one at a time. */
static inline __attribute__((always_inline)) void wide_pass(const float *weight, long K, long M, const float *xt,
                                                           long ldt, int MB, int V, long rows, float *out,
                                                           long stride) {
    long m = 0;
    for (; m + MB <= M; m += MB) wide_block(weight + m * K, K, xt, ldt, MB, V, rows, out + m, stride);
    for (; m < M; m++) wide_block(weight + m * K, K, xt, ldt, 1, V, rows, out + m, stride);
}

/* xt [K, V * LANES] <- x rows [rows, K] (stride K) transposed, zero beyond rows. */
static void wide_pack(const float *x, long K, long rows, int V, float *xt) {
    long ldt = (long)V * LANES;
    for (long k = 0; k < K; k++)
        for (long r = 0; r < ldt; r++) xt[k * ldt + r] = r < rows ? x[r * K + k] : 0.0f;
}

#if defined(WIDE_MB1)
/* set on the command line (bench sweeps) */
#elif LANES == 16
#define WIDE_MB1 16
#define WIDE_MB2 12
#define WIDE_MB3 8
#define WIDE_MB4 6
#elif LANES == 8
#define WIDE_MB1 8
#define WIDE_MB2 6
#define WIDE_MB3 4
#define WIDE_MB4 3
#else
#define WIDE_MB1 8
#define WIDE_MB2 4
#define WIDE_MB3 3
#define WIDE_MB4 2
#endif

/* out[r, m] = x[r] . W[m] for r < rows and m in [m0, m1): x's rows packed by wide_pack into xt
 * (ceil(rows / LANES) vectors, any number), W [M, K], out [rows, M]; in passes of up to
 * WIDE_MAX_VECTORS vectors (with LANES 8, 64 rows are two passes of 32). A weight row's accumulators
 * do not depend on the rows beside it in a block or a pass: any cut of [0, M) or of the rows gives
 * the same bits (shardmesh_linear_wide's, which packs and calls this one pass at a time). */
static void wide_columns(long rows, long K, long M, const float *xt, const float *weight, float *out, long m0,
                         long m1) {
    int V = (int)((rows + LANES - 1) / LANES);
    long ldt = (long)V * LANES;
    const float *w = weight + m0 * K;
    for (int v0 = 0; v0 < V; v0 += WIDE_MAX_VECTORS) {
        int pass = V - v0 < WIDE_MAX_VECTORS ? V - v0 : WIDE_MAX_VECTORS;
        long first = (long)v0 * LANES, pass_rows = rows - first < pass * LANES ? rows - first : pass * LANES;
        const float *x = xt + first; /* aligned as xt: first is a multiple of WIDE_MAX_VECTORS * LANES floats */
        float *o = out + first * M + m0;
        switch (pass) {
        case 1: wide_pass(w, K, m1 - m0, x, ldt, WIDE_MB1, 1, pass_rows, o, M); break;
        case 2: wide_pass(w, K, m1 - m0, x, ldt, WIDE_MB2, 2, pass_rows, o, M); break;
        case 3: wide_pass(w, K, m1 - m0, x, ldt, WIDE_MB3, 3, pass_rows, o, M); break;
        default: wide_pass(w, K, m1 - m0, x, ldt, WIDE_MB4, 4, pass_rows, o, M); break;
        }
    }
}

/* out [n, M] = x [n, K] W^T, W [M, K], in passes of up to WIDE_MAX_VECTORS * LANES rows, each packed
 * then taken by wide_columns (one pass of it). scratch: K * WIDE_MAX_VECTORS * LANES floats, aligned to
 * 64 bytes (the packed x). */
void shardmesh_linear_wide(long n, long K, long M, const float *x, const float *weight, float *out, float *scratch) {
    for (long r0 = 0; r0 < n; r0 += WIDE_MAX_VECTORS * LANES) {
        long rows = n - r0 < WIDE_MAX_VECTORS * LANES ? n - r0 : WIDE_MAX_VECTORS * LANES;
        wide_pack(x + r0 * K, K, rows, (int)((rows + LANES - 1) / LANES), scratch);
        wide_columns(rows, K, M, scratch, weight, out + r0 * M, 0, M);
    }
}
