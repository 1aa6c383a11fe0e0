/* Streaming fp32 kernels for the few-row products of a decode step (shardmesh/kernels/__init__.py).
 *
 * At 1-16 rows a product x W^T reads every weight once and does little arithmetic per weight, so
 * it runs at the speed weights come from memory, if they are read only once. These kernels keep
 * every weight row in the dot-product orientation (W row-major as loaded, [out, in]) and, for each
 * pair of weight rows, take the dot products with up to ROWS_BLOCK rows of x at once, register-
 * blocked: the two weight rows are read from memory once and from L1 for further blocks of x.
 * Vectorised with GCC vector extensions (AVX-512 with -march=native on the bench machines, AVX or
 * SSE elsewhere, from one source); lengths that are not a multiple of the vector width finish in a
 * scalar tail. On AVX2 (8 lanes, 16 registers) linear_tiles.c's register tiles take the products
 * from 2 rows, with pair_dots' bits.
 *
 * Shape legend: n rows (tokens), H hidden, I intermediate, K input features, M output features.
 * Every matrix is row-major and contiguous; nothing here allocates or keeps state.
 */

#define _GNU_SOURCE /* team.c: pthread_attr_setaffinity_np, pthread_setaffinity_np */
#include <math.h>
#include <stddef.h>
#include <string.h>

#if defined(__AVX512F__)
#define LANES 16
#define ROWS_BLOCK 8 /* 2 x 8 accumulators + 3 operands of 32 vector registers */
#elif defined(__AVX__)
#define LANES 8
#define ROWS_BLOCK 4 /* 16 vector registers */
#else
#define LANES 4
#define ROWS_BLOCK 4
#endif

typedef float vec __attribute__((vector_size(LANES * 4)));
typedef float vec_unaligned __attribute__((vector_size(LANES * 4), aligned(4)));

static inline vec load(const float *p) { return *(const vec_unaligned *)p; }

#if LANES == 16 && (defined(__clang__) || __GNUC__ >= 12) /* halving sums: 4 shuffles and adds, not 15 extractions */
typedef float vec8 __attribute__((vector_size(32)));
typedef float vec4 __attribute__((vector_size(16)));
static inline float lane_sum(vec v) {
    vec8 half = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7)
              + __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
    vec4 quarter = __builtin_shufflevector(half, half, 0, 1, 2, 3) + __builtin_shufflevector(half, half, 4, 5, 6, 7);
    quarter += __builtin_shufflevector(quarter, quarter, 2, 3, 0, 1);
    return quarter[0] + quarter[1];
}
#else
static inline float lane_sum(vec v) {
    float sum = 0.0f;
    for (int lane = 0; lane < LANES; lane++) sum += v[lane];
    return sum;
}
#endif

/* *a += wa[t] * x[t], *b += wb[t] * x[t] for t = k..K-1 in order: the scalar tail of a pair's dot
 * products (K - k < LANES), one source for pair_dots and linear_tiles.c's tiles on AVX2. GCC compiles
 * it with some products rounded before their addition and some fused; which, it decides from what it
 * knows of wa and wb (a row paired with itself, seen as such, shares its products): hidden from it
 * here, so every call site compiles to the same code and the same bits. */
static inline __attribute__((always_inline)) void pair_tail(const float *wa, const float *wb, const float *x, long k,
                                                           long K, float *a, float *b) {
    __asm__("" : "+r"(wa), "+r"(wb), "+r"(x));
    float sum_a = *a, sum_b = *b;
    for (long t = k; t < K; t++) {
        sum_a += wa[t] * x[t];
        sum_b += wb[t] * x[t];
    }
    *a = sum_a;
    *b = sum_b;
}

/* dots_a[r] = wa . x[r], dots_b[r] = wb . x[r] for r < rows (rows <= ROWS_BLOCK, a constant after
 * inlining so the accumulators live in registers). wa, wb: [K]; x: rows rows of stride ldx.
 * next_a, next_b (or NULL): the weight rows of the next call, fetched into the caches one line per
 * step meanwhile: without it the core computes on one pair of rows, then waits for the next
 * (1.1-1.3x at 2-16 rows on the bench machine: bench/expert_matmul.py). Prefetches never fault,
 * so past the last row they are harmless. to_l2 (a constant after inlining): fetch them into L2
 * only (prefetcht1), not L1 (prefetcht0): see linear_columns for when. */
static inline __attribute__((always_inline)) void pair_dots(const float *wa, const float *wb, const float *x,
                                                           long ldx, long K, int rows, float *dots_a, float *dots_b,
                                                           const float *next_a, const float *next_b, int to_l2) {
    vec acc_a[ROWS_BLOCK], acc_b[ROWS_BLOCK];
    for (int r = 0; r < rows; r++) acc_a[r] = acc_b[r] = (vec){0};
    long k = 0;
    for (; k + LANES <= K; k += LANES) {
        vec va = load(wa + k), vb = load(wb + k);
        if (next_a) { /* LANES floats: one 64-byte line per step with AVX-512 (two with narrower vectors) */
            if (to_l2) {
                __builtin_prefetch(next_a + k, 0, 2);
                __builtin_prefetch(next_b + k, 0, 2);
            } else {
                __builtin_prefetch(next_a + k, 0, 3);
                __builtin_prefetch(next_b + k, 0, 3);
            }
        }
        for (int r = 0; r < rows; r++) {
            vec xr = load(x + r * ldx + k);
            acc_a[r] += va * xr;
            acc_b[r] += vb * xr;
        }
    }
    for (int r = 0; r < rows; r++) {
        float a = lane_sum(acc_a[r]), b = lane_sum(acc_b[r]);
#if LANES == 8 /* the tail linear_tiles.c's tiles take: one source, one compiled form, the same bits */
        pair_tail(wa, wb, x + r * ldx, k, K, &a, &b);
#else
        for (long t = k; t < K; t++) {
            a += wa[t] * x[r * ldx + t];
            b += wb[t] * x[r * ldx + t];
        }
#endif
        dots_a[r] = a;
        dots_b[r] = b;
    }
}

/* pair_dots for any rows <= ROWS_BLOCK, each count its own fully unrolled copy. */
static void pair_dots_any(const float *wa, const float *wb, const float *x, long ldx, long K, int rows,
                          float *dots_a, float *dots_b, const float *next_a, const float *next_b, int to_l2) {
    switch (rows) {
#define CASE(R) case R: \
        if (next_a && to_l2) pair_dots(wa, wb, x, ldx, K, R, dots_a, dots_b, next_a, next_b, 1); \
        else if (next_a) pair_dots(wa, wb, x, ldx, K, R, dots_a, dots_b, next_a, next_b, 0); \
        else pair_dots(wa, wb, x, ldx, K, R, dots_a, dots_b, NULL, NULL, 0); \
        return;
        CASE(1) CASE(2) CASE(3) CASE(4)
#if ROWS_BLOCK > 4
        CASE(5) CASE(6) CASE(7) CASE(8)
#endif
#undef CASE
    }
}

#include "linear_triple.c" /* linear_columns at 9-16 rows: weight rows in threes (pair_dots' bits) */
#if LANES == 8
#include "linear_tiles.c" /* linear_columns and expert_activations on AVX2: register tiles (pair_dots' bits) */
#endif

/* out[r, m] = x[r] . W[m] for m in [m0, m1), r < n: out [n, M] = x [n, K] W^T, W [M, K], its
 * columns m0..m1-1 only; each pair (at 9-16 rows with AVX-512: triple) of weight rows streamed once
 * for all n rows. Every output is one dot product summed in one order, so any cut of [0, M) into
 * ranges gives the same bits. linear_columns, except on AVX2 (linear_tiles.c). */
static void pair_columns(long n, long K, long M, const float *x, const float *weight, float *out, long m0, long m1) {
    float dots_a[ROWS_BLOCK], dots_b[ROWS_BLOCK];
#if LANES == 16
    if (n > ROWS_BLOCK && n <= 2 * ROWS_BLOCK) m0 = triple_columns(n, K, M, x, weight, out, m0, m1);
#endif
    for (long m = m0; m < m1; m += 2) {
        const float *wa = weight + m * K;
        const float *wb = m + 1 < m1 ? wa + K : wa; /* an odd last row pairs with itself; stored once */
        for (long r0 = 0; r0 < n; r0 += ROWS_BLOCK) {
            int rows = n - r0 < ROWS_BLOCK ? (int)(n - r0) : ROWS_BLOCK;
            /* the next pair fetched meanwhile: both rows during a lone block; over more blocks its
             * first row during the first, its second during the second (the stream spread over the
             * pass). Into L2 only for a lone block more than half full (5-8 rows with AVX-512) over
             * weight rows of <= 512 floats: the LM head (K 512) at 8 rows from memory 1.2-1.25x
             * faster, from L3 1.0-1.05x slower. Into L1 as before elsewhere: into L2 was 1.03-1.07x
             * slower at 1-4 rows from L3 (a stage's weights at batch 1 may stay there), at K 1024
             * (experts' w2) and at 16 rows. */
            const float *next_a = r0 == 0 ? weight + (m + 2) * K : r0 == ROWS_BLOCK ? weight + (m + 3) * K : NULL;
            const float *next_b = n <= ROWS_BLOCK ? weight + (m + 3) * K : next_a;
            pair_dots_any(wa, wb, x + r0 * K, K, K, rows, dots_a, dots_b, next_a, next_a ? next_b : NULL,
                          n > ROWS_BLOCK / 2 && n <= ROWS_BLOCK && K <= 512);
            for (int r = 0; r < rows; r++) {
                out[(r0 + r) * M + m] = dots_a[r];
                if (m + 1 < m1) out[(r0 + r) * M + m + 1] = dots_b[r];
            }
        }
    }
}

static void linear_columns(long n, long K, long M, const float *x, const float *weight, float *out, long m0, long m1) {
#if LANES == 8 /* linear_tiles.c from 2 rows; at 1 row the pairs were 1.04-1.1x faster (bench/kernel_tree_ab.py) */
    if (n > 1) {
        tile_columns(n, K, M, x, weight, out, m0, m1);
        return;
    }
#endif
    pair_columns(n, K, M, x, weight, out, m0, m1);
}

/* out [n, M] = x [n, K] W^T, W [M, K]. */
void shardmesh_linear(long n, long K, long M, const float *x, const float *weight, float *out) {
    linear_columns(n, K, M, x, weight, out, 0, M);
}

/* shardmesh_linear by pair_columns (pair_dots), whatever form linear_columns takes here: the
 * reference whose bits tests hold the other forms to (tests/test_linear_rows.py). */
void shardmesh_linear_pairs(long n, long K, long M, const float *x, const float *weight, float *out) {
    pair_columns(n, K, M, x, weight, out, 0, M);
}

/* exp(v) for |v| < ~87 (silu's argument is clamped below), about 2 ulp: 2^j * p(f) with
 * v = (j + f) ln 2, |f| <= 1/2, p a degree-6 polynomial (Cephes expf's coefficients). */
static inline vec vexp(vec v) {
    const vec log2e = (vec){0} + 1.44269504088896341f, ln2_hi = (vec){0} + 0.693359375f,
              ln2_lo = (vec){0} + -2.12194440e-4f;
    vec j = v * log2e;
    j = j + ((vec){0} + 12582912.0f) - ((vec){0} + 12582912.0f); /* round to nearest (|j| < 2^22) */
    vec f = v - j * ln2_hi - j * ln2_lo;
    vec p = (vec){0} + 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * f * f + f + 1.0f;
    typedef int ivec __attribute__((vector_size(LANES * 4)));
    ivec bits = (__builtin_convertvector(j, ivec) + 127) << 23; /* 2^j as a float's bits */
    vec scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* v limited to [-80, 80], where vexp is exact to a few ulp and finite (NaN stays NaN): silu(g)
 * = g / (1 + exp(-g)) is g to float precision for g >= 80 and below 1e-33 for g <= -80. */
static inline vec clamp80(vec v) {
    typedef int ivec __attribute__((vector_size(LANES * 4)));
    const vec limit = (vec){0} + 80.0f;
    ivec bits, limit_bits, over = v > limit, under = v < -limit;
    memcpy(&bits, &v, sizeof v);
    memcpy(&limit_bits, &limit, sizeof v);
    ivec negative_limit_bits = limit_bits | ((ivec){0} + (-2147483647 - 1)); /* -80: the sign bit set */
    bits = (bits & ~(over | under)) | (limit_bits & over) | (negative_limit_bits & under);
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* gate [count] <- silu(gate) * up, in place. */
static void silu_mul(float *gate, const float *up, long count) {
    long i = 0;
    for (; i + LANES <= count; i += LANES) {
        vec g = load(gate + i);
        vec h = g / (1.0f + vexp(clamp80(-g))) * load(up + i);
        memcpy(gate + i, &h, sizeof h);
    }
    for (; i < count; i++) gate[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* The activations of one SwiGLU expert in columns [i0, i1) of I (i0 a multiple of LANES; i1 one too,
 * or I): gate[r, i] = silu(w1[i] . x[r]) * (w3[i] . x[r]), up[r, i] = w3[i] . x[r], for r < n.
 * x [n, H]; w1, w3 [I, H]; gate, up [n, I]. The gate and up rows i are read together, once from
 * memory. silu takes its vector path on whole groups of LANES columns counted from column 0 and
 * the scalar path on the tail past the last whole group, so any cut of [0, I) at multiples of
 * LANES gives every column the same path, and the same bits, as the whole range. */
static void expert_activations(long n, long H, long I, const float *x, const float *w1, const float *w3,
                               float *gate, float *up, long i0, long i1) {
    float dots_a[ROWS_BLOCK], dots_b[ROWS_BLOCK];
    for (long i = i0; i < i1; i++) {
#if LANES == 8 /* linear_tiles.c from 2 rows: the gate and up rows as a pair of weight rows */
        if (n > 1) {
            const float *w[3] = {w1 + i * H, w3 + i * H}, *next[3] = {w1 + (i + 1) * H, w3 + (i + 1) * H};
            float *const columns[3] = {gate + i, up + i};
            tile_pass(w, 2, 2, n, H, x, columns, I, next);
            continue;
        }
#endif
        for (long r0 = 0; r0 < n; r0 += ROWS_BLOCK) {
            int rows = n - r0 < ROWS_BLOCK ? (int)(n - r0) : ROWS_BLOCK;
            int first = r0 == 0; /* the next gate and up rows, during the first block */
            pair_dots_any(w1 + i * H, w3 + i * H, x + r0 * H, H, H, rows, dots_a, dots_b,
                          first ? w1 + (i + 1) * H : NULL, first ? w3 + (i + 1) * H : NULL, 0);
            for (int r = 0; r < rows; r++) {
                gate[(r0 + r) * I + i] = dots_a[r];
                up[(r0 + r) * I + i] = dots_b[r];
            }
        }
    }
    for (long r = 0; r < n; r++) silu_mul(gate + r * I + i0, up + r * I + i0, i1 - i0); /* row by row */
}

/* One SwiGLU expert on its n rows: out [n, H] = w2 (silu(w1 x) * (w3 x)).
 * x [n, H]; w1, w3 [I, H]; w2 [H, I]; scratch [2, n, I] (gate then up); out [n, H].
 * Each row's output is the same bits whatever the other rows and n: every dot product sums in the
 * same order for any block of rows, and silu takes the vector or scalar path by column, not by
 * position in the batch. So a group of tokens cut into pieces over replicas (stage_server/
 * remote_experts.py) gets the answer it would get whole. */
void shardmesh_expert_ffn(long n, long H, long I, const float *x, const float *w1, const float *w3,
                          const float *w2, float *scratch, float *out) {
    float *gate = scratch, *up = scratch + n * I; /* [n, I] each */
    expert_activations(n, H, I, x, w1, w3, gate, up, 0, I);
    linear_columns(n, I, H, gate, w2, out, 0, H);
}

#include "linear_wide.c" /* the outer-product form for 17-64 rows (vec, LANES, load from above) */
#include "team.c" /* a team of helper threads that runs a job's units in phases */
#include "expert_team.c" /* a layer's experts over several threads (on the team) */
#include "decode_layer.c" /* a decode layer's attention half, and a linear, on a team of threads (team.c) */
#include "moe_routing.c" /* the stage's MoE gate, routing, dispatch and combine */
#include "lm_head_amx.c" /* the greedy LM head: argmax by a bf16 AMX product, its error bound and fp32 refinement */
