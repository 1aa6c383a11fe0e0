/* A layer's experts over several threads: shardmesh_expert_ffn_many. Included by expert_ffn.c (one
 * library; expert_activations, linear_columns and LANES come from there, team_run from team.c), not
 * compiled alone.
 *
 * Handing whole experts to Python threads (shardmesh.compute_pool) costs a wake-up and two GIL
 * hand-offs per layer and leaves a thread idle when the experts do not divide evenly. Here every
 * expert is cut into units of ~unit_bytes of weights: "activation" units (a range of gate and up
 * rows, then silu on those columns) and "down" units (a range of w2 rows, i.e. of output
 * columns), each a set of whole dot products, run as one phase of a team job (team.c: the calling
 * thread and helpers asleep between calls take units in order, so a helper that wakes late, or not
 * at all on a busy host, only takes fewer units). A down unit of an expert waits for that expert's
 * activation units (the order below puts another expert's units between them, so it rarely does).
 *
 * Every output element is the dot product expert_ffn computes, summed in the same order, and silu
 * takes the same path per column (activation units start at multiples of LANES): the result is
 * bit-identical to shardmesh_expert_ffn per expert, whichever thread took which unit. */

#include <stdlib.h>

/* One expert's rows: x [n, H], w1/w3 [I, H], w2 [H, I], scratch [2, n, I], out [n, H] (n >= 1). */
struct shardmesh_expert_task {
    long n;
    const float *x, *w1, *w3, *w2;
    float *scratch, *out;
};

struct experts_call {
    long count, H, I;
    const struct shardmesh_expert_task *tasks;
    long activation_rows, down_rows;   /* rows of w1/w3 (a multiple of LANES) and of w2 (even) per unit */
    long activation_units, down_units; /* per expert */
    atomic_long *activations_done;     /* [count] activation units finished, per expert */
};

/* Units in order: activations of expert 0; then for e = 1..count-1 the activations of e and the
 * down units of e - 1; then the down units of count - 1. */
static void experts_unit(void *context, int phase, long unit, int worker) {
    const struct experts_call *call = context;
    long A = call->activation_units, D = call->down_units, expert, index;
    int down;
    (void)phase;
    if (unit < A) {
        expert = 0, index = unit, down = 0;
    } else {
        long rest = unit - A, block = rest / (A + D) + 1, within = rest % (A + D);
        if (block < call->count && within < A) expert = block, index = within, down = 0;
        else if (block < call->count) expert = block - 1, index = within - A, down = 1;
        else expert = call->count - 1, index = within, down = 1;
    }
    const struct shardmesh_expert_task *task = &call->tasks[expert];
    long n = task->n, H = call->H, I = call->I;
    float *gate = task->scratch, *up = task->scratch + n * I; /* [n, I] each */
    if (!down) {
        long i0 = index * call->activation_rows, i1 = i0 + call->activation_rows < I ? i0 + call->activation_rows : I;
        expert_activations(n, H, I, task->x, task->w1, task->w3, gate, up, i0, i1);
        atomic_fetch_add_explicit(&call->activations_done[expert], 1, memory_order_release);
        return;
    }
    /* Wait for the expert's last activation units, which other threads are computing now (every
     * unit before this one in the order has been taken): a few microseconds at most, unless the
     * host deschedules that thread, and then the yield lets it run. */
    team_wait_until(&call->activations_done[expert], A, worker);
    long m0 = index * call->down_rows, m1 = m0 + call->down_rows < H ? m0 + call->down_rows : H;
    linear_columns(n, I, H, gate, task->w2, task->out, m0, m1);
}

/* Each of count experts on its rows (shardmesh_expert_ffn of each task), on the calling thread and
 * up to threads - 1 helpers, in units of about unit_bytes of weights (the Python wrapper's default:
 * 256 KiB, ~20 us at the ~13 GB/s of one thread; tests pass small ones to cut small experts). Every task has the same H and I and n >= 1; outputs are
 * bit-identical to shardmesh_expert_ffn's for any threads. Returns how many units the helpers
 * computed (0 when this thread did all), or -1 when out of memory (nothing computed). */
int shardmesh_expert_ffn_many(long count, long H, long I, const struct shardmesh_expert_task *tasks, int threads,
                              long unit_bytes) {
    if (count <= 0) return 0;
    struct experts_call call = {.count = count, .H = H, .I = I, .tasks = tasks};
    long rows = unit_bytes / (2 * H * 4) / LANES * LANES;
    call.activation_rows = rows > LANES ? rows : LANES;
    rows = unit_bytes / (I * 4) / 2 * 2;
    call.down_rows = rows > 2 ? rows : 2;
    call.activation_units = (I + call.activation_rows - 1) / call.activation_rows;
    call.down_units = (H + call.down_rows - 1) / call.down_rows;
    call.activations_done = calloc(count, sizeof *call.activations_done);
    if (call.activations_done == NULL) return -1;
    struct phased_job job = {.phases = 1, .run = experts_unit, .context = &call};
    job.ends[0] = count * (call.activation_units + call.down_units);
    long by_helpers = team_run(&job, threads);
    free(call.activations_done);
    return (int)by_helpers;
}

/* shardmesh_expert_ffn_many over one packed tensor, the tasks' w1, w3, w2 set already (an
 * ExpertTable's): n, x, scratch and out are filled here, counts[e] rows (each >= 1) per task, rows
 * of x [N, H] and out [N, H] in task order, each task's scratch [2, n, I] next in scratch
 * [2 N I]. The Python wrapper sets nothing per task (a ctypes field costs ~0.5 us cold). */
int shardmesh_expert_ffn_packed(long count, long H, long I, struct shardmesh_expert_task *tasks,
                                const long *counts, const float *x, float *scratch, float *out, int threads,
                                long unit_bytes) {
    for (long e = 0; e < count; e++) {
        long n = counts[e];
        tasks[e].n = n, tasks[e].x = x, tasks[e].scratch = scratch, tasks[e].out = out;
        x += n * H, out += n * H, scratch += 2 * n * I;
    }
    return shardmesh_expert_ffn_many(count, H, I, tasks, threads, unit_bytes);
}
