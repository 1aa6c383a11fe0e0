/* A team of helper pthreads that runs one job's units in phases: team_run. Included by
 * expert_ffn.c (one library) ahead of its users, expert_team.c (a layer's experts) and
 * decode_layer.c (a decode layer's attention half, the LM head); not compiled alone.
 *
 * A job is a sequence of phases, each
 * a number of units; the calling thread and up to threads - 1 helpers (started once, asleep on a
 * condition variable between jobs) take units in order from one atomic counter, and a unit of
 * phase p first waits until every unit of the phases before p has finished (the barrier between
 * phases; a phase may have no units). Every unit before p was taken before any unit of p, so that wait lasts one unit's time at
 * most, unless the host deschedules the thread computing it (then the waiter yields). A helper
 * that wakes late, or not at all on a busy host, only takes fewer units: the caller alone can
 * run every unit. Each unit gets the index of the thread running it (0: the caller, 1..: helpers
 * in the order they joined, always < threads), for per-thread scratch.
 *
 * Units must not depend on which thread runs them or in which order the units of one phase run:
 * then the job's result is the same bits for any thread count.
 *
 * On a busy host (more runnable threads than cores) a helper is sometimes descheduled while it
 * holds a unit, and the caller then waits at the next barrier, or at the end, for the scheduler
 * to run it again: milliseconds, where the whole job takes a fraction of one (bench/stage_parts.py
 * at load 5 on 2 cores: a stage's decode step at batch 16 took 63 ms with a team of 2 against 40
 * alone). So when the caller has waited longer than TEAM_SLOW_WAIT_NS in TEAM_SLOW_JOBS of the last
 * 64 jobs it ran with helpers, it runs the next TEAM_ALONE_JOBS jobs alone, then tries the helpers
 * again. One slow job is not enough: on a quiet 2-core host a mesh's other processes (the router
 * streaming tokens, an event loop waking) take a helper's core now and then, and going alone for 64
 * jobs (~8 decode steps) after each such wait cost a 1-stage mesh 1.15x at batch 16 there
 * (bench/tree_ab.py); a host that is really oversubscribed makes most jobs slow and still goes alone
 * (never going alone was 1.15x slower at load 5). */

#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <time.h>
#include <unistd.h>

#define TEAM_PHASES_MAX 8
#define TEAM_HELPERS_MAX 15
#define TEAM_SLOW_WAIT_NS 300000L /* a unit takes ~10-20 us: a wait this long is a descheduled helper */
#define TEAM_ALONE_JOBS 64        /* ~8 decode steps of an 8-layer stage */
#ifndef TEAM_SLOW_JOBS
#define TEAM_SLOW_JOBS 3          /* slow jobs among the last 64 with helpers that send the next ones alone */
#endif

static atomic_long team_alone_jobs; /* jobs the next callers run alone (callers waited too long) */
static atomic_int team_job_slow;    /* the running job's caller waited too long (one caller at a time) */
static atomic_ulong team_recent_jobs; /* bit i: the (i + 1)-th last job with helpers was slow */
atomic_long shardmesh_team_slow_waits; /* how often a caller waited too long in this process (tests, benches) */

static long team_now_ns(void) {
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return now.tv_sec * 1000000000L + now.tv_nsec;
}

/* After a wait of the caller (worker 0) that began at `start` (ns): too long, and its job counts as slow. */
static void team_note_wait(long start) {
    if (team_now_ns() - start > TEAM_SLOW_WAIT_NS) {
        atomic_store(&team_job_slow, 1);
        atomic_fetch_add(&shardmesh_team_slow_waits, 1);
    }
}

/* At the end of a job run with helpers: TEAM_SLOW_JOBS slow ones among the last 64 send the next
 * TEAM_ALONE_JOBS jobs alone (and the count starts afresh after them). */
static void team_note_job(void) {
    unsigned long recent = atomic_load(&team_recent_jobs) << 1 | (unsigned long)atomic_exchange(&team_job_slow, 0);
    if (__builtin_popcountl(recent) >= TEAM_SLOW_JOBS) {
        atomic_store(&team_alone_jobs, TEAM_ALONE_JOBS);
        recent = 0;
    }
    atomic_store(&team_recent_jobs, recent);
}

/* The policy above on its own, for tests (tests/test_team_alone.py): `reset` bit 0 clears the history,
 * bit 1 the jobs to run alone; then a job run with helpers is noted, slow or not. Returns the jobs the
 * next callers run alone. Not for use while jobs run. */
long shardmesh_team_note_job(int slow, int reset) {
    if (reset & 1) atomic_store(&team_recent_jobs, 0);
    if (reset & 2) atomic_store(&team_alone_jobs, 0);
    atomic_store(&team_job_slow, slow != 0);
    team_note_job();
    return atomic_load(&team_alone_jobs);
}

struct phased_job {
    int phases;                          /* <= TEAM_PHASES_MAX */
    long ends[TEAM_PHASES_MAX];          /* phase p is units [ends[p - 1], ends[p]) (ends[-1] = 0) */
    void (*run)(void *context, int phase, long index, int worker); /* index within the phase */
    void *context;
    int helpers_wanted, helpers_in;      /* helpers_in under team_state.lock */
    atomic_long next;                    /* the next unit to take */
    atomic_long done[TEAM_PHASES_MAX];   /* units finished, per phase */
    atomic_int inside;                   /* helpers working on this job (changed under team_state.lock) */
    atomic_long helper_units;            /* units the helpers computed */
};

/* Wait until *counter >= target, another thread's units finishing: spin a little, then yield (the
 * thread computing them may be descheduled); a long wait of the caller (worker 0) is noted. */
static void team_wait_until(atomic_long *counter, long target, int worker) {
    long start = 0;
    for (long spins = 0; atomic_load_explicit(counter, memory_order_acquire) < target; spins++) {
        if (spins < 2000) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        } else {
            if (worker == 0 && start == 0) start = team_now_ns();
            sched_yield();
        }
    }
    if (start) team_note_wait(start);
}

static void team_wait_for_phase(struct phased_job *job, int phase, int worker) {
    team_wait_until(&job->done[phase], job->ends[phase] - (phase ? job->ends[phase - 1] : 0), worker);
}

/* Take units until none is left; returns how many this thread computed. */
static long team_run_units(struct phased_job *job, int worker) {
    long done = 0, total = job->ends[job->phases - 1];
    int phase = 0;
    for (long unit; (unit = atomic_fetch_add_explicit(&job->next, 1, memory_order_relaxed)) < total; done++) {
        while (unit >= job->ends[phase]) phase++;
        for (int earlier = 0; earlier < phase; earlier++) team_wait_for_phase(job, earlier, worker); /* phases may be empty */
        job->run(job->context, phase, unit - (phase ? job->ends[phase - 1] : 0), worker);
        atomic_fetch_add_explicit(&job->done[phase], 1, memory_order_release);
    }
    return done;
}

/* The helpers: asleep on `wake` until a caller posts a job (a new generation). One caller at a
 * time (`busy`); a second, concurrent caller computes alone. Reset in a forked child (`pid`). */
static struct {
    pthread_mutex_t lock;
    pthread_cond_t wake, left;
    unsigned long generation;
    struct phased_job *job;
    int helpers;
    pid_t pid;
    atomic_int busy;
    pthread_t threads[TEAM_HELPERS_MAX]; /* the helpers started in this process */
    cpu_set_t cpus;                      /* where they run (shardmesh_team_pin_helpers); */
    int pinned;                          /* 0: wherever they were started */
} team_state = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, PTHREAD_COND_INITIALIZER};

/* Under team_state.lock: at first use, or in a forked child (the parent's helpers are not there), no
 * helpers started in this process yet. */
static void team_claim_process(void) {
    if (team_state.pid != getpid()) {
        team_state.pid = getpid();
        team_state.helpers = 0;
    }
}

/* Run the helpers, those started and those to come, on CPUs cpus[0..count) only (shardmesh/loop_cpu.py:
 * the calling service's event-loop thread keeps a CPU of its own). Returns 0, or the errno of the
 * first helper that could not be moved. */
int shardmesh_team_pin_helpers(const int *cpus, int count) {
    int failed = 0;
    pthread_mutex_lock(&team_state.lock);
    team_claim_process();
    CPU_ZERO(&team_state.cpus);
    for (int i = 0; i < count; i++) CPU_SET(cpus[i], &team_state.cpus);
    team_state.pinned = 1;
    for (int i = 0; i < team_state.helpers && !failed; i++)
        failed = pthread_setaffinity_np(team_state.threads[i], sizeof(cpu_set_t), &team_state.cpus);
    pthread_mutex_unlock(&team_state.lock);
    return failed;
}

static void *team_helper_main(void *start_generation) {
    unsigned long seen = (unsigned long)start_generation;
    pthread_mutex_lock(&team_state.lock);
    for (;;) {
        while (team_state.generation == seen) pthread_cond_wait(&team_state.wake, &team_state.lock);
        seen = team_state.generation;
        struct phased_job *job = team_state.job;
        if (job == NULL || job->helpers_in >= job->helpers_wanted) continue; /* finished already, or enough */
        int worker = ++job->helpers_in;
        atomic_fetch_add(&job->inside, 1);
        pthread_mutex_unlock(&team_state.lock);
        atomic_fetch_add(&job->helper_units, team_run_units(job, worker));
        pthread_mutex_lock(&team_state.lock);
        if (atomic_fetch_sub(&job->inside, 1) == 1) pthread_cond_broadcast(&team_state.left);
    }
    return NULL;
}

/* Start helpers up to `wanted` (under team_state.lock), every signal blocked in them. */
static void team_start_helpers(int wanted) {
    sigset_t all, saved;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &saved);
    pthread_attr_t attributes;
    pthread_attr_init(&attributes);
    pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
    if (team_state.pinned) pthread_attr_setaffinity_np(&attributes, sizeof(cpu_set_t), &team_state.cpus);
    while (team_state.helpers < wanted && team_state.helpers < TEAM_HELPERS_MAX) {
        pthread_t *thread = &team_state.threads[team_state.helpers];
        if (pthread_create(thread, &attributes, team_helper_main, (void *)team_state.generation) != 0) break;
        team_state.helpers++;
    }
    pthread_attr_destroy(&attributes);
    pthread_sigmask(SIG_SETMASK, &saved, NULL);
}

/* Run every unit of `job` (phases, ends, run and context set; the rest zeroed) on this thread and up
 * to threads - 1 helpers; returns how many units the helpers computed. */
static long team_run(struct phased_job *job, int threads) {
    long total = job->ends[job->phases - 1];
    int expected = 0;
    job->helpers_wanted = threads - 1 < total - 1 ? threads - 1 : (int)(total - 1);
    if (job->helpers_wanted > TEAM_HELPERS_MAX) job->helpers_wanted = TEAM_HELPERS_MAX;
    if (job->helpers_wanted >= 1 && atomic_load(&team_alone_jobs) > 0) {
        atomic_fetch_sub(&team_alone_jobs, 1); /* a recent wait was too long: alone for a while */
        job->helpers_wanted = 0;
    }
    if (job->helpers_wanted < 1 || !atomic_compare_exchange_strong(&team_state.busy, &expected, 1)) {
        team_run_units(job, 0); /* alone: one thread wanted, or another caller has the helpers */
        return 0;
    }
    pthread_mutex_lock(&team_state.lock);
    team_claim_process();
    team_start_helpers(job->helpers_wanted);
    team_state.job = job;
    team_state.generation++;
    pthread_cond_broadcast(&team_state.wake);
    pthread_mutex_unlock(&team_state.lock);

    team_run_units(job, 0);
    /* Every unit is taken; helpers finish theirs (a unit's time at most) and leave. */
    for (int spins = 0; spins < 2000 && atomic_load(&job->inside) > 0; spins++) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
    }
    long start = atomic_load(&job->inside) > 0 ? team_now_ns() : 0;
    pthread_mutex_lock(&team_state.lock);
    team_state.job = NULL; /* a helper waking from now on finds nothing to do */
    while (atomic_load(&job->inside) > 0) pthread_cond_wait(&team_state.left, &team_state.lock);
    pthread_mutex_unlock(&team_state.lock);
    if (start) team_note_wait(start);
    team_note_job();
    atomic_store(&team_state.busy, 0);
    return atomic_load(&job->helper_units);
}
