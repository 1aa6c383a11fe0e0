/* The attention half of one decoder layer for a step of one-token sequences, in one call on a team of
 * threads: shardmesh_decode_layer; and a linear on the team (the LM head): shardmesh_linear_team.
 * Included by expert_ffn.c (one library: LANES, vec, load, lane_sum and linear_columns come from
 * there, team_run from team.c, wide_pack and wide_columns from linear_wide.c; the attention of one head from
 * decode_attention.c), not compiled alone.
 *
 * torch's path runs a decode layer's attention half as ~10 ops (two RMSNorms, the q/k/v product, the
 * attention kernel, o_proj, the residual add) on one thread, each with tens of microseconds of
 * overhead; here they are the phases of one team job (team.c), each cut into units by what it
 * writes, never inside a dot product:
 *   0. normed = rmsnorm(hidden, input_norm)            units: blocks of NORM_ROWS rows
 *   1. (wide form only) normed packed for it           one unit
 *   2. qkv = normed W_qkv^T                            units: ranges of output features (weight rows)
 *   3. RoPE, cache write, attention                    units: (sequence, key/value head)
 *   4. (wide form only) attended packed                one unit
 *   5. residual = hidden + attended W_o^T              units: ranges of output features
 *   6. normed2 = rmsnorm(residual, post_norm)          units: blocks of NORM_ROWS rows
 * Every output element is computed by one unit, in one order that depends neither on the other rows
 * nor on the cut. The products take the form the torch path's models/matmul.linear takes for this
 * many rows, with its bits: the dot-product form (linear_columns, shardmesh_linear's) at 1-16 rows,
 * the outer-product form (wide_columns, shardmesh_linear_wide's) at 17-64 (step->wide); so a row's
 * result is the same bits alone or inside any batch of the same form, on any number of threads.
 * The attention is decode_attention.c's.
 *
 * Shape legend: S sequences = rows (one new token each), H hidden, A query heads, G key/value
 * heads, D head_dim, M output features. */

#define NORM_ROWS 4

/* One layer's weights (the Python side builds it once per layer). */
struct shardmesh_decode_weights {
    long H, A, G, D;
    const float *input_norm, *qkv, *o, *post_norm; /* [H], [(A + 2G) D, H], [H, A D], [H] */
    float input_eps, post_eps, scale;              /* the norms' epsilons, the attention's 1/sqrt(D) */
};

/* One step's sequences and scratch (built once per step, used by every layer). */
struct shardmesh_decode_step {
    long S;
    const long *table;                    /* [S, 4]: decode_attention.c's table (row s of the batch is table[4s]) */
    const float *cos, *signed_sin;        /* [S, D] each: row s for row s; by_position: [P, D], row p for position p */
    float *normed, *qkv, *attended;       /* [S, H], [S, (A + 2G) D], [S, A D] */
    float *scratch;                       /* [threads, scratch_stride]: the attention's query and scores */
    float *packed;                        /* wide: [max(H, A D), 64], 64-byte aligned (wide_pack's x^T); else unused */
    long scratch_stride;                  /* >= max(length) + D */
    long unit_bytes;                      /* weight bytes per unit of the products */
    int threads;
    int wide;                             /* 1: the outer-product form (17-64 rows), 0: dot products (any rows) */
    int by_position;                      /* 1: cos/signed_sin are tables by position (a row's: its length - 1) */
};

struct decode_layer_call {
    const struct shardmesh_decode_weights *w;
    const struct shardmesh_decode_step *step;
    long layer;                           /* the index within the sequences' cache buffers */
    const float *hidden;                  /* [S, H] */
    float *residual, *normed2;            /* [S, H] each */
    long qkv_rows, o_rows;                /* weight rows per unit (even) */
};

void shardmesh_decode_attention_head(long A, long G, long D, long layer, float scale, const long *entry,
                                     const float *qkv, const float *row_cos, const float *row_sin, float *scratch,
                                     float *out, long g);

/* out[r] = x[r] * (1 / sqrt(mean(x[r]^2) + eps)) * weight for r in [r0, r1), each rounded as torch
 * rounds x * rsqrt(...) then * weight (the mean of squares summed in LANES partial sums). */
static void rms_norm_rows(long r0, long r1, long H, const float *x, const float *weight, float eps, float *out) {
    for (long r = r0; r < r1; r++) {
        const float *row = x + r * H;
        vec acc = {0};
        long k = 0;
        for (; k + LANES <= H; k += LANES) {
            vec v = load(row + k);
            acc += v * v;
        }
        float sum = lane_sum(acc);
        for (; k < H; k++) sum += row[k] * row[k];
        float inverse = 1.0f / sqrtf(sum / (float)H + eps);
        for (k = 0; k < H; k++) out[r * H + k] = row[k] * inverse * weight[k];
    }
}

static long units_of(long count, long per_unit) { return (count + per_unit - 1) / per_unit; }

/* The end of unit `index`'s range of `per_unit` items out of `count` (its start: index * per_unit). */
static long unit_end(long index, long per_unit, long count) {
    return (index + 1) * per_unit < count ? (index + 1) * per_unit : count;
}

static long even_rows(long unit_bytes, long row_bytes) {
    long rows = unit_bytes / row_bytes / 2 * 2;
    return rows > 2 ? rows : 2;
}

/* out[:, m0:m1) = x W^T in the step's form (x: [S, K], packed into step->packed first when wide). */
static void step_columns(const struct shardmesh_decode_step *step, long K, long M, const float *x,
                         const float *weight, float *out, long m0, long m1) {
    if (step->wide) wide_columns(step->S, K, M, step->packed, weight, out, m0, m1);
    else linear_columns(step->S, K, M, x, weight, out, m0, m1);
}

static void decode_layer_unit(void *context, int phase, long index, int worker) {
    const struct decode_layer_call *call = context;
    const struct shardmesh_decode_weights *w = call->w;
    const struct shardmesh_decode_step *step = call->step;
    long S = step->S, H = w->H, qkv_features = (w->A + 2 * w->G) * w->D, attended_features = w->A * w->D;
    long r0 = index * NORM_ROWS, r1 = unit_end(index, NORM_ROWS, S);
    int V = (int)((S + LANES - 1) / LANES);
    switch (phase) {
    case 0:
        rms_norm_rows(r0, r1, H, call->hidden, w->input_norm, w->input_eps, step->normed);
        break;
    case 1:
        wide_pack(step->normed, H, S, V, step->packed);
        break;
    case 2:
        step_columns(step, H, qkv_features, step->normed, w->qkv, step->qkv, index * call->qkv_rows,
                     unit_end(index, call->qkv_rows, qkv_features));
        break;
    case 3: {
        const long *entry = step->table + 4 * (index / w->G);
        long rope = (step->by_position ? entry[3] - 1 : entry[0]) * w->D; /* the token's RoPE row */
        shardmesh_decode_attention_head(w->A, w->G, w->D, call->layer, w->scale, entry, step->qkv, step->cos + rope,
                                        step->signed_sin + rope, step->scratch + worker * step->scratch_stride,
                                        step->attended, index % w->G);
        break;
    }
    case 4:
        wide_pack(step->attended, attended_features, S, V, step->packed);
        break;
    case 5: {
        long m0 = index * call->o_rows, m1 = unit_end(index, call->o_rows, H);
        step_columns(step, attended_features, H, step->attended, w->o, call->residual, m0, m1);
        for (long r = 0; r < S; r++)
            for (long m = m0; m < m1; m++) call->residual[r * H + m] += call->hidden[r * H + m];
        break;
    }
    default:
        rms_norm_rows(r0, r1, H, call->residual, w->post_norm, w->post_eps, call->normed2);
    }
}

/* residual = hidden + attention(rmsnorm(hidden, input_norm)) W_o^T and normed2 = rmsnorm(residual,
 * post_norm) for the step's S one-token sequences (rows 0..S-1 of hidden, in table order; S <= 64
 * when wide), writing each sequence's new key and value into its cache at layer `layer`. hidden,
 * residual, normed2: [S, H]. Returns how many units the helper threads computed. */
long shardmesh_decode_layer(const struct shardmesh_decode_weights *w, const struct shardmesh_decode_step *step,
                            long layer, const float *hidden, float *residual, float *normed2) {
    struct decode_layer_call call = {.w = w, .step = step, .layer = layer, .hidden = hidden,
                                     .residual = residual, .normed2 = normed2};
    call.qkv_rows = even_rows(step->unit_bytes, w->H * 4);
    call.o_rows = even_rows(step->unit_bytes, w->A * w->D * 4);
    long norm_units = units_of(step->S, NORM_ROWS), pack_units = step->wide ? 1 : 0;
    long counts[7] = {norm_units, pack_units, units_of((w->A + 2 * w->G) * w->D, call.qkv_rows), step->S * w->G,
                      pack_units, units_of(w->H, call.o_rows), norm_units};
    struct phased_job job = {.phases = 7, .run = decode_layer_unit, .context = &call};
    for (int p = 0; p < 7; p++) job.ends[p] = (p ? job.ends[p - 1] : 0) + counts[p];
    return team_run(&job, step->threads);
}

/* out [S, H] = rmsnorm(x [S, H], weight [H], eps): the decode layer's norm, on this thread (a stage's
 * final norm of a decode step, where the torch op's overhead on cold caches is most of its cost). */
void shardmesh_rms_norm(long S, long H, const float *x, const float *weight, float eps, float *out) {
    rms_norm_rows(0, S, H, x, weight, eps, out);
}

struct linear_team_call {
    long n, K, M, rows;
    const float *x, *weight;
    float *out;
};

static void linear_team_unit(void *context, int phase, long index, int worker) {
    const struct linear_team_call *call = context;
    (void)phase, (void)worker;
    linear_columns(call->n, call->K, call->M, call->x, call->weight, call->out, index * call->rows,
                   unit_end(index, call->rows, call->M));
}

/* out [n, M] = x [n, K] W^T (W [M, K]) on this thread and up to threads - 1 helpers, in ranges of
 * output features of ~unit_bytes of weights: the bits of shardmesh_linear for any threads and cut.
 * Returns how many units the helpers computed. */
long shardmesh_linear_team(long n, long K, long M, const float *x, const float *weight, float *out, int threads,
                           long unit_bytes) {
    struct linear_team_call call = {.n = n, .K = K, .M = M, .rows = even_rows(unit_bytes, K * 4), .x = x,
                                    .weight = weight, .out = out};
    struct phased_job job = {.phases = 1, .run = linear_team_unit, .context = &call};
    job.ends[0] = units_of(M, call.rows);
    return team_run(&job, threads);
}
