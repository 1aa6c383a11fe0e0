/* A layer's experts over several threads: shardmesh_expert_ffn_many. Included by expert_ffn.c (one
 * library; expert_activations, linear_columns and LANES come from there), not compiled alone.
 *
 * Handing whole experts to Python threads (shardmesh.compute_pool) costs a wake-up and two GIL
 * hand-offs per layer and leaves a thread idle when the experts do not divide evenly. Here every
 * expert is cut into units of ~unit_bytes of weights: "activation" units (a range of gate and up
 * rows, then silu on those columns) and "down" units (a range of w2 rows, i.e. of output
 * columns), each a set of whole dot products. The calling thread and up to threads - 1 helper
 * threads (started once, asleep between calls) take units in order from one atomic counter, so
 * a helper that wakes late, or not at all on a busy host, only takes fewer units. A down unit
 * of an expert waits for that expert's activation units (the order below puts another expert's
 * units between them, so it rarely does).
 *
 * Every output element is the dot product expert_ffn computes, summed in the same order, and silu
 * takes the same path per column (activation units start at multiples of LANES): the result is
 * bit-identical to shardmesh_expert_ffn per expert, whichever thread took which unit. */

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <unistd.h>

#define TEAM_MAX_HELPERS 15

/* One expert's rows: x [n, H], w1/w3 [I, H], w2 [H, I], scratch [2, n, I], out [n, H] (n >= 1). */
struct shardmesh_expert_task {
    long n;
    const float *x, *w1, *w3, *w2;
    float *scratch, *out;
};

struct team_job {
    long count, H, I;
    const struct shardmesh_expert_task *tasks;
    long activation_rows, down_rows;   /* rows of w1/w3 (a multiple of LANES) and of w2 (even) per unit */
    long activation_units, down_units; /* per expert */
    long total;                        /* units in all */
    int helpers_wanted, helpers_in;    /* helpers_in under team.lock */
    atomic_long next;                  /* the next unit to take */
    atomic_int inside;                 /* helpers working on this job (changed under team.lock) */
    atomic_long helper_units;          /* units the helpers computed */
    atomic_long *activations_done;     /* [count] activation units finished, per expert */
};

/* Units in order: activations of expert 0; then for e = 1..count-1 the activations of e and the
 * down units of e - 1; then the down units of count - 1. */
static void run_unit(struct team_job *job, long unit) {
    long A = job->activation_units, D = job->down_units, expert, index;
    int down;
    if (unit < A) {
        expert = 0, index = unit, down = 0;
    } else {
        long rest = unit - A, block = rest / (A + D) + 1, within = rest % (A + D);
        if (block < job->count && within < A) expert = block, index = within, down = 0;
        else if (block < job->count) expert = block - 1, index = within - A, down = 1;
        else expert = job->count - 1, index = within, down = 1;
    }
    const struct shardmesh_expert_task *task = &job->tasks[expert];
    long n = task->n, H = job->H, I = job->I;
    float *gate = task->scratch, *up = task->scratch + n * I; /* [n, I] each */
    if (!down) {
        long i0 = index * job->activation_rows, i1 = i0 + job->activation_rows < I ? i0 + job->activation_rows : I;
        expert_activations(n, H, I, task->x, task->w1, task->w3, gate, up, i0, i1);
        atomic_fetch_add_explicit(&job->activations_done[expert], 1, memory_order_release);
        return;
    }
    /* Wait for the expert's last activation units, which other threads are computing now (every
     * unit before this one in the order has been taken): a few microseconds at most, unless the
     * host deschedules that thread, and then the yield lets it run. */
    for (long spins = 0; atomic_load_explicit(&job->activations_done[expert], memory_order_acquire) < job->activation_units; spins++) {
        if (spins < 2000) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        } else {
            sched_yield();
        }
    }
    long m0 = index * job->down_rows, m1 = m0 + job->down_rows < H ? m0 + job->down_rows : H;
    linear_columns(n, I, H, gate, task->w2, task->out, m0, m1);
}

/* Take units until none is left; returns how many this thread computed. */
static long run_units(struct team_job *job) {
    long done = 0;
    for (long unit; (unit = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed)) < job->total; done++)
        run_unit(job, unit);
    return done;
}

/* The helpers: asleep on `wake` until a caller posts a job (a new generation). One caller at a
 * time (`busy`); a second, concurrent caller computes alone. Reset in a forked child (`pid`),
 * which has none of its parent's helpers. */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake, left;
    unsigned long generation;
    struct team_job *job;
    int helpers;
    pid_t pid;
    atomic_int busy;
} team = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER};

static void *team_helper(void *start_generation) {
    unsigned long seen = (unsigned long)start_generation;
    pthread_mutex_lock(&team.lock);
    for (;;) {
        while (team.generation == seen) pthread_cond_wait(&team.wake, &team.lock);
        seen = team.generation;
        struct team_job *job = team.job;
        if (job == NULL || job->helpers_in >= job->helpers_wanted) continue; /* finished already, or enough */
        job->helpers_in++;
        atomic_fetch_add(&job->inside, 1);
        pthread_mutex_unlock(&team.lock);
        atomic_fetch_add(&job->helper_units, run_units(job));
        pthread_mutex_lock(&team.lock);
        if (atomic_fetch_sub(&job->inside, 1) == 1) pthread_cond_broadcast(&team.left);
    }
    return NULL;
}

/* Start helpers up to `wanted` (under team.lock), with every signal blocked: signals stay with
 * the process's own threads (Python handles them on its main thread). */
static void team_grow(int wanted) {
    sigset_t all, saved;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    pthread_attr_t attributes;
    pthread_attr_init(&attributes);
    pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
    while (team.helpers < wanted && team.helpers < TEAM_MAX_HELPERS) {
        pthread_t thread;
        if (pthread_create(&thread, &attributes, team_helper, (void *)team.generation) != 0) break; /* fewer helpers */
        team.helpers++;
    }
    pthread_attr_destroy(&attributes);
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
}

/* Each of count experts on its rows (shardmesh_expert_ffn of each task), on the calling thread and
 * up to threads - 1 helpers, in units of about unit_bytes of weights (the Python wrapper's default:
 * 256 KiB, ~20 us at the ~13 GB/s of one thread; tests pass small ones to cut small experts). Every task has the same H and I and n >= 1; outputs are
 * bit-identical to shardmesh_expert_ffn's for any threads. Returns how many units the helpers
 * computed (0 when this thread did all), or -1 when out of memory (nothing computed). */
int shardmesh_expert_ffn_many(long count, long H, long I, const struct shardmesh_expert_task *tasks, int threads,
                              long unit_bytes) {
    if (count <= 0) return 0;
    struct team_job job = {.count = count, .H = H, .I = I, .tasks = tasks};
    long rows = unit_bytes / (2 * H * 4) / LANES * LANES;
    job.activation_rows = rows > LANES ? rows : LANES;
    rows = unit_bytes / (I * 4) / 2 * 2;
    job.down_rows = rows > 2 ? rows : 2;
    job.activation_units = (I + job.activation_rows - 1) / job.activation_rows;
    job.down_units = (H + job.down_rows - 1) / job.down_rows;
    job.total = count * (job.activation_units + job.down_units);
    job.activations_done = calloc(count, sizeof *job.activations_done);
    if (job.activations_done == NULL) return -1;
    atomic_init(&job.next, 0);
    atomic_init(&job.inside, 0);
    atomic_init(&job.helper_units, 0);
    int expected = 0;
    job.helpers_wanted = threads - 1 < job.total - 1 ? threads - 1 : (int)(job.total - 1);
    if (job.helpers_wanted < 1 || !atomic_compare_exchange_strong(&team.busy, &expected, 1)) {
        run_units(&job); /* alone: one thread wanted, or another caller has the helpers */
        free(job.activations_done);
        return 0;
    }
    pthread_mutex_lock(&team.lock);
    if (team.pid != getpid()) { /* first use, or a forked child: no helpers here yet */
        team.pid = getpid();
        team.helpers = 0;
    }
    team_grow(job.helpers_wanted);
    team.job = &job;
    team.generation++;
    pthread_cond_broadcast(&team.wake);
    pthread_mutex_unlock(&team.lock);

    run_units(&job);
    /* Every unit is taken; helpers finish theirs (a unit's time at most) and leave. */
    for (int spins = 0; spins < 2000 && atomic_load(&job.inside) > 0; spins++) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
    pthread_mutex_lock(&team.lock);
    team.job = NULL; /* a helper waking from now on finds nothing to do */
    while (atomic_load(&job.inside) > 0) pthread_cond_wait(&team.left, &team.lock);
    pthread_mutex_unlock(&team.lock);
    atomic_store(&team.busy, 0);
    free(job.activations_done);
    return atomic_load(&job.helper_units);
}
