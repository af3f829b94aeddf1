/* Explicit safe points: the MPI glue of the safe-point state machine (Rust core, see
 * src/safepoint.rs). Compiled once per MPI implementation. Uses PMPI_* so that the layer's own
 * traffic is never counted or intercepted by a PMPI tool, and private duplicates of the
 * user's communicator so it never matches the application's messages.
 *
 * Quiet phases (symvirt_quiet_begin/end, contract in symvirt.h) are run by one leader, rank 0
 * of the communicator, which sends every other rank verdicts {phase, epoch, stage} for the
 * current phase: for each cut, "prepare the cut for epoch" (epoch > 0, stage PREPARE) and then
 * "cut now" (stage NOW); after any number of cuts, one "go on" (epoch 0). The others send the
 * leader reports {phase, kind}: "ready for cut k" (kind k > 0) for each cut that finds them
 * before their phase's end, and "ended" (kind 0) once, at their phase's end.
 * The leader sends "prepare" whenever a request is pending while it is inside the phase (at
 * its begin, from its thread, or at its end), "cut now" once every rank has reported ready for
 * that cut or ended, and "go on" once every rank has ended the phase. A rank leaves the phase
 * only with "go on" in hand, so every rank stays inside it until the last one ends it (the
 * phase's end is a barrier), and a "prepare" finds every rank inside it or stops a rank there
 * on arriving. The requests a rank declared outstanding across its phase
 * (symvirt_quiet_begin_requests) are complete before it reports ready or ended: the library
 * drives them with MPI_Request_get_status, which makes progress without freeing them, so the
 * application's own MPI_Wait after the phase still completes them with their statuses. By the
 * contract every message of the program is then received. Between "ready" and "cut now" the
 * rank goes on making progress: a peer's request may still need this rank's MPI (the
 * acknowledgement of a large message this rank has already received), and no rank stops until
 * every rank's requests are complete. The leader makes its own cut after sending "cut now",
 * and the others after receiving it: no message of the protocol is in flight either (a rank
 * sends nothing more until it is through the cut). The cut is consistent, and any number of
 * them can fall in one phase.
 *
 * Who makes the cut: the rank's quiet thread (started at the first quiet phase when MPI gives
 * MPI_THREAD_SERIALIZED or more) while the application computes inside the phase; otherwise
 * the application's thread at the phase's begin (verdict already there) or end. The thread
 * wakes on this rank's request, and inside a phase also every 5 ms to look for a verdict (a
 * rank's request may come late, or not at all when only rank 0's agent asks). It
 * calls MPI only while the application is inside a quiet phase (no MPI call there, by the
 * contract) and under `lock`, which symvirt_quiet_end and symvirt_safe_point also take: the two
 * threads never call MPI at once. A cut holds `lock` until the resume, so the application
 * waits in symvirt_quiet_end. No deadlock: every rank the leader waits for has finished the
 * exchange before the phase (by the contract it needs nothing from a rank inside the phase),
 * and a rank waiting for its verdict has reported. Inside a phase the thread also drives the
 * phase's outstanding requests every millisecond until they are complete (MPI moves a large
 * message only inside its calls), so a cut usually finds them complete and the transfer
 * overlaps the computation. A failure of the protocol's own messages aborts the job
 * (protocol_failed): the other ranks would wait forever. */
#include "symvirt.h"

#include <dlfcn.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define VERDICT_TAG 1 /* leader -> rank: {phase, epoch (0: go on), stage} */
#define REPORT_TAG 2  /* rank -> leader: {phase, ready for cut k (k > 0) or ended (0)} */
#define LEADER 0
#define PREPARE 0 /* verdict stages */
#define NOW 1

static struct {
    MPI_Comm comm; /* private duplicate: the safe points' agreement */
    MPI_Request req[SYMVIRT_SLOTS];
    uint64_t send[SYMVIRT_SLOTS];
    uint64_t recv[SYMVIRT_SLOTS];
    symvirt_sp *sp;
    /* Quiet phases. */
    MPI_Comm qcomm; /* private duplicate: the verdicts */
    int qrank, qsize;
    int thread_level; /* what MPI provides */
    pthread_mutex_t lock;
    pthread_t thread;
    int have_thread;
    atomic_int stop;
    int thread_ended; /* set (atomically) by the quiet thread as it returns */
    uint64_t phase; /* quiet phases begun */
    int inside;     /* between symvirt_quiet_begin and symvirt_quiet_end */
    MPI_Request *reqs; /* the phase's outstanding requests (copies of the handles) */
    int nreqs, reqs_cap;
    int reqs_done;      /* how many of them are known complete */
    uint64_t complete_timeout_ms;
    /* The others, for `phase`: */
    int ended;         /* reported its end */
    int go_on;         /* "go on" received */
    uint64_t cut_due;  /* a "prepare" received, its cut not made yet: its epoch */
    int ready;         /* ... and this rank is ready for it */
    int cut_now;       /* ... and "cut now" received */
    uint64_t cuts_told; /* "prepare" verdicts received */
    /* The leader, for `phase`: */
    int *rank_ended;       /* per rank */
    uint64_t *rank_in_cut; /* per rank: the last cut it reported going into */
    int nended;
    uint64_t cuts_decided;
    /* Both: the last cut made in `phase`. */
    int cuts;
    int cut_by_thread;
    int cut_rc;
    symvirt_interconnect cut_ic;
} g = {.comm = MPI_COMM_NULL, .qcomm = MPI_COMM_NULL, .lock = PTHREAD_MUTEX_INITIALIZER};

/* Open MPI, when it runs oversubscribed, yields the CPU in every progress turn that finds
 * nothing; behind computing threads each yield costs a time slice, and the protocol's waits
 * (an Iprobe for a verdict or a report, a request's status, the cut's barrier) are such
 * turns. The protocol sleeps between its turns instead (pause_us), so Open MPI's yield is off
 * while it runs: the application is inside the phase, outside MPI, or waits in
 * symvirt_quiet_end. Found at run time (Open MPI's libopen-pal, loaded with libmpi), so that
 * the library links as before; NULL with MPICH. */
static bool (*set_yield_when_idle)(bool);

static bool yield_off(void)
{
    return set_yield_when_idle != NULL && set_yield_when_idle(false);
}

static void yield_restore(bool was)
{
    if (set_yield_when_idle != NULL)
        set_yield_when_idle(was);
}

static int op_start(void *ctx, int slot, uint64_t value)
{
    (void)ctx;
    g.send[slot] = value;
    return PMPI_Iallreduce(&g.send[slot], &g.recv[slot], 1, MPI_UINT64_T, MPI_MAX, g.comm,
                           &g.req[slot]);
}

static int op_finish(void *ctx, int slot, uint64_t *result)
{
    (void)ctx;
    int rc = PMPI_Wait(&g.req[slot], MPI_STATUS_IGNORE);
    *result = g.recv[slot];
    return rc;
}

static int op_barrier(void *ctx)
{
    (void)ctx;
    return PMPI_Barrier(g.comm);
}

static const symvirt_agreement_ops OPS = {op_start, op_finish, op_barrier};

int symvirt_init(MPI_Comm comm)
{
    if (g.sp != NULL)
        return SYMVIRT_ERR_STATE;
    int rank = 0;
    if (PMPI_Comm_rank(MPI_COMM_WORLD, &rank) != MPI_SUCCESS)
        return SYMVIRT_ERR_MPI;
    if (PMPI_Comm_dup(comm, &g.comm) != MPI_SUCCESS)
        return SYMVIRT_ERR_MPI;
    PMPI_Comm_set_errhandler(g.comm, MPI_ERRORS_RETURN);
    if (PMPI_Comm_dup(comm, &g.qcomm) != MPI_SUCCESS)
        return SYMVIRT_ERR_MPI;
    PMPI_Comm_set_errhandler(g.qcomm, MPI_ERRORS_RETURN);
    PMPI_Comm_rank(g.qcomm, &g.qrank);
    PMPI_Comm_size(g.qcomm, &g.qsize);
    PMPI_Query_thread(&g.thread_level);
    *(void **)&set_yield_when_idle = dlsym(RTLD_DEFAULT, "opal_progress_set_yield_when_idle");
    g.phase = 0;
    g.complete_timeout_ms = symvirt_env_ms("SYMVIRT_QUIESCE_TIMEOUT_MS", 600000);
    g.rank_ended = calloc((size_t)g.qsize, sizeof *g.rank_ended);
    g.rank_in_cut = calloc((size_t)g.qsize, sizeof *g.rank_in_cut);
    if (g.rank_ended == NULL || g.rank_in_cut == NULL)
        return SYMVIRT_ERR_STATE;
    /* Connecting may fail (no agent): the safe point is set up anyway so that every rank
     * takes part in the same collectives. */
    int agent = symvirt_ctl_open((uint32_t)rank, NULL,
                                 symvirt_env_ms("SYMVIRT_CONNECT_TIMEOUT_MS", 10000));
    g.sp = symvirt_sp_new(&OPS, NULL, symvirt_env_ms("SYMVIRT_QUIESCE_TIMEOUT_MS", 600000));
    if (g.sp == NULL)
        return SYMVIRT_ERR_STATE;
    return agent < 0 ? agent : SYMVIRT_CONTINUE;
}

int symvirt_safe_point(MPI_Comm comm, symvirt_interconnect *ic)
{
    (void)comm; /* the private duplicate made at init carries the agreement */
    if (g.sp == NULL)
        return SYMVIRT_ERR_STATE;
    pthread_mutex_lock(&g.lock);
    int rc = g.inside ? SYMVIRT_ERR_STATE : symvirt_sp_poll(g.sp, ic);
    pthread_mutex_unlock(&g.lock);
    return rc;
}

/* Quiet phases: see the top. The functions below run with g.lock held. */

/* The protocol cannot go on (an MPI call failed, or the ranks' quiet phases are out of step:
 * the contract was broken): every other rank would wait forever, so the job ends here. */
static void protocol_failed(const char *where, int rc)
{
    fprintf(stderr,
            "symvirt: rank %d: quiet phase %llu: %s failed (%s): aborting the job, its ranks "
            "would otherwise wait for each other forever\n",
            g.qrank, (unsigned long long)g.phase, where,
            rc == SYMVIRT_ERR_STATE     ? "ranks out of step: quiet phases must be collective"
            : rc == SYMVIRT_ERR_TIMEOUT ? "the phase's outstanding requests did not complete "
                                          "within SYMVIRT_QUIESCE_TIMEOUT_MS: each needs a "
                                          "call made after the phase began"
                                        : "an MPI call");
    PMPI_Abort(MPI_COMM_WORLD, 70);
}

static void pause_us(long us)
{
    struct timespec t = {0, us * 1000};
    nanosleep(&t, NULL);
}

static uint64_t monotonic_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000 + (uint64_t)t.tv_nsec / 1000000;
}

/* One pass over the phase's outstanding requests (each call makes progress): whether all are
 * complete. They stay the application's: nothing is freed. */
static int requests_complete(int *rc)
{
    while (g.reqs_done < g.nreqs) {
        int flag = 0;
        if (PMPI_Request_get_status(g.reqs[g.reqs_done], &flag, MPI_STATUS_IGNORE) !=
            MPI_SUCCESS) {
            *rc = SYMVIRT_ERR_MPI;
            return 0;
        }
        if (!flag)
            return 0;
        g.reqs_done++;
    }
    return 1;
}

/* Drives the phase's outstanding requests until all are complete (the contract: nothing else
 * they need is still to be posted), or SYMVIRT_ERR_TIMEOUT. */
static int complete_requests(void)
{
    uint64_t until = monotonic_ms() + g.complete_timeout_ms;
    int rc = SYMVIRT_CONTINUE;
    while (!requests_complete(&rc)) {
        if (rc != SYMVIRT_CONTINUE)
            return rc;
        if (monotonic_ms() >= until)
            return SYMVIRT_ERR_TIMEOUT;
        pause_us(50); /* the peers are computing or on their way: yield the core */
    }
    return rc;
}

static void make_cut(uint64_t epoch, int by_thread)
{
    memset(&g.cut_ic, 0, sizeof g.cut_ic);
    g.cut_rc = symvirt_sp_cut(g.sp, epoch, &g.cut_ic);
    g.cuts++;
    g.cut_by_thread = by_thread;
}

static int verdict_to_all(uint64_t epoch, uint64_t stage)
{
    uint64_t msg[3] = {g.phase, epoch, stage};
    for (int r = 0; r < g.qsize; r++)
        if (r != LEADER &&
            PMPI_Send(msg, 3, MPI_UINT64_T, r, VERDICT_TAG, g.qcomm) != MPI_SUCCESS)
            return SYMVIRT_ERR_MPI;
    return SYMVIRT_CONTINUE;
}

/* The leader: takes the reports that have arrived. */
static int take_reports(void)
{
    for (;;) {
        int arrived = 0;
        MPI_Status st;
        if (PMPI_Iprobe(MPI_ANY_SOURCE, REPORT_TAG, g.qcomm, &arrived, &st) != MPI_SUCCESS)
            return SYMVIRT_ERR_MPI;
        if (!arrived)
            return SYMVIRT_CONTINUE;
        uint64_t msg[2];
        int r = st.MPI_SOURCE;
        if (PMPI_Recv(msg, 2, MPI_UINT64_T, r, REPORT_TAG, g.qcomm, MPI_STATUS_IGNORE) !=
            MPI_SUCCESS)
            return SYMVIRT_ERR_MPI;
        if (msg[0] != g.phase)
            return SYMVIRT_ERR_STATE; /* the ranks' quiet phases are out of step */
        if (msg[1] != 0)
            g.rank_in_cut[r] = msg[1];
        else if (!g.rank_ended[r]) {
            g.rank_ended[r] = 1;
            g.nended++;
        }
    }
}

/* The leader, inside the phase with a request pending: "prepare"; once its own requests are
 * complete and every rank has reported ready or ended, "cut now" and its own cut (see the
 * top). */
static int leader_cut(uint64_t epoch, int by_thread)
{
    int rc = verdict_to_all(epoch, PREPARE);
    g.cuts_decided++;
    uint64_t until = monotonic_ms() + g.complete_timeout_ms;
    int mine = 0;
    for (int r = 0; rc == SYMVIRT_CONTINUE && (r < g.qsize || !mine);) {
        mine = mine || requests_complete(&rc);
        if (r < g.qsize &&
            (r == LEADER || g.rank_ended[r] || g.rank_in_cut[r] == g.cuts_decided)) {
            r++;
            continue;
        }
        if (rc == SYMVIRT_CONTINUE)
            rc = take_reports();
        if (rc == SYMVIRT_CONTINUE && !mine && monotonic_ms() >= until)
            rc = SYMVIRT_ERR_TIMEOUT;
        if (rc == SYMVIRT_CONTINUE)
            pause_us(50); /* ranks computing: their threads answer within a turn */
    }
    if (rc == SYMVIRT_CONTINUE)
        rc = verdict_to_all(epoch, NOW);
    if (rc == SYMVIRT_CONTINUE)
        make_cut(epoch, by_thread);
    return rc;
}

/* The leader at its phase's end: until every rank has ended it, cutting for the requests that
 * come meanwhile; then "go on". */
static int leader_end(void)
{
    for (;;) {
        int rc = take_reports();
        uint64_t pending = symvirt_sp_pending(g.sp);
        if (rc == SYMVIRT_CONTINUE && pending != 0)
            rc = leader_cut(pending, 0);
        if (rc != SYMVIRT_CONTINUE)
            return rc;
        if (pending == 0 && g.nended == g.qsize - 1)
            return verdict_to_all(0, PREPARE);
        if (pending == 0)
            pause_us(50); /* up to the slowest rank's phase: yield the core */
    }
}

static int report(uint64_t kind)
{
    uint64_t msg[2] = {g.phase, kind};
    return PMPI_Send(msg, 2, MPI_UINT64_T, LEADER, REPORT_TAG, g.qcomm) == MPI_SUCCESS
               ? SYMVIRT_CONTINUE
               : SYMVIRT_ERR_MPI;
}

/* The others: follows the verdicts that have arrived, making the cuts they call for when
 * `may_cut`; `wait`: until "go on". Once ready for a cut, waits for its "cut now" whatever
 * `wait` says (the leader sends it once the last rank is ready). */
static int follow(int wait, int may_cut, int by_thread)
{
    while (!g.go_on) {
        if (g.cut_due != 0 && !may_cut)
            return SYMVIRT_CONTINUE;
        if (g.cut_due != 0 && !g.ready) {
            /* An ended rank's requests were completed at its end; it reports nothing more. */
            int rc = g.ended ? SYMVIRT_CONTINUE : complete_requests();
            if (rc == SYMVIRT_CONTINUE && !g.ended)
                rc = report(g.cuts_told);
            if (rc != SYMVIRT_CONTINUE)
                return rc;
            g.ready = 1;
        }
        if (g.cut_due != 0 && g.cut_now) {
            make_cut(g.cut_due, by_thread);
            g.cut_due = 0;
            g.ready = g.cut_now = 0;
            continue;
        }
        int arrived = 0;
        if (PMPI_Iprobe(LEADER, VERDICT_TAG, g.qcomm, &arrived, MPI_STATUS_IGNORE) !=
            MPI_SUCCESS)
            return SYMVIRT_ERR_MPI;
        if (!arrived) {
            if (!wait && !g.ready)
                return SYMVIRT_CONTINUE;
            pause_us(50); /* up to the slowest rank's phase: yield the core */
            continue;
        }
        uint64_t msg[3];
        if (PMPI_Recv(msg, 3, MPI_UINT64_T, LEADER, VERDICT_TAG, g.qcomm, MPI_STATUS_IGNORE) !=
            MPI_SUCCESS)
            return SYMVIRT_ERR_MPI;
        if (msg[0] != g.phase)
            return SYMVIRT_ERR_STATE; /* the ranks' quiet phases are out of step */
        if (msg[1] == 0) {
            g.go_on = 1;
        } else if (msg[2] == NOW) {
            if (msg[1] != g.cut_due || !g.ready)
                return SYMVIRT_ERR_STATE;
            g.cut_now = 1;
        } else {
            g.cuts_told++;
            g.cut_due = msg[1];
            /* The leader's request may come before this rank's own: wake the quiet thread. */
            symvirt_ctl_request_locally(msg[1]);
        }
    }
    return SYMVIRT_CONTINUE;
}

static void *quiet_thread(void *arg)
{
    (void)arg;
    while (!atomic_load(&g.stop)) {
        pthread_mutex_lock(&g.lock);
        uint64_t pending = symvirt_sp_pending(g.sp);
        int rc = SYMVIRT_CONTINUE;
        bool yielding = g.inside && yield_off();
        if (g.inside && g.qrank == LEADER && pending != 0)
            rc = leader_cut(pending, 1);
        else if (g.inside && g.qrank != LEADER)
            rc = follow(0, 1, 1); /* a verdict may come before this rank's own request */
        /* Inside a phase, drives its outstanding requests on the application's behalf (MPI
         * moves a large message only inside its calls): a cut then finds them complete, and
         * the transfer overlaps the computation. */
        int driving = g.inside && rc == SYMVIRT_CONTINUE && !requests_complete(&rc);
        if (g.inside)
            yield_restore(yielding);
        if (rc != SYMVIRT_CONTINUE)
            protocol_failed("the quiet thread", rc);
        pending = symvirt_sp_pending(g.sp);
        /* A copy: the wait returns at once for a request published after it. */
        symvirt_served served;
        symvirt_sp_served(g.sp, &served);
        /* Inside a phase the others look for a verdict every few milliseconds anyway. */
        uint64_t wait_ms = driving ? 1 : g.inside && g.qrank != LEADER ? 5 : 1000;
        pthread_mutex_unlock(&g.lock);
        if (pending != 0)
            pause_us(200); /* until the application enters a quiet phase, or the verdict comes */
        else /* every request served: sleep until another is asked */
            symvirt_ctl_wait_requested(&served, 0, wait_ms);
    }
    __atomic_store_n(&g.thread_ended, 1, __ATOMIC_RELEASE);
    return NULL;
}

int symvirt_quiet_begin(MPI_Comm comm)
{
    return symvirt_quiet_begin_requests(comm, 0, NULL);
}

int symvirt_quiet_begin_requests(MPI_Comm comm, int count, const MPI_Request requests[])
{
    (void)comm; /* the private duplicate made at init carries the protocol */
    if (g.sp == NULL || count < 0 || (count > 0 && requests == NULL))
        return SYMVIRT_ERR_STATE;
    pthread_mutex_lock(&g.lock);
    int rc = SYMVIRT_ERR_STATE;
    if (!g.inside && count > g.reqs_cap) {
        MPI_Request *grown = realloc(g.reqs, (size_t)count * sizeof *grown);
        if (grown != NULL) {
            g.reqs = grown;
            g.reqs_cap = count;
        }
    }
    if (!g.inside && count <= g.reqs_cap) {
        if (count > 0)
            memcpy(g.reqs, requests, (size_t)count * sizeof *g.reqs);
        g.nreqs = count;
        g.reqs_done = 0;
        g.phase++;
        g.inside = 1;
        g.ended = g.go_on = 0;
        g.cut_due = g.cuts_told = 0;
        g.ready = g.cut_now = 0;
        memset(g.rank_ended, 0, (size_t)g.qsize * sizeof *g.rank_ended);
        memset(g.rank_in_cut, 0, (size_t)g.qsize * sizeof *g.rank_in_cut);
        g.nended = 0;
        g.cuts_decided = 0;
        g.cuts = 0;
        const char *off = getenv("SYMVIRT_PROGRESS_THREAD");
        if (!g.have_thread && g.thread_level >= MPI_THREAD_SERIALIZED &&
            (off == NULL || strcmp(off, "0") != 0)) {
            g.thread_ended = 0;
            g.have_thread = pthread_create(&g.thread, NULL, quiet_thread, NULL) == 0;
            int world_rank = -1;
            PMPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
            if (g.have_thread && world_rank == 0)
                symvirt_warn_placement(); /* launchers place every rank alike: once a job */
        }
        /* With a thread the cut is its job: the application goes on computing meanwhile. */
        uint64_t pending = symvirt_sp_pending(g.sp);
        bool yielding = yield_off();
        if (g.qrank != LEADER)
            rc = follow(0, !g.have_thread, 0);
        else if (pending != 0 && !g.have_thread)
            rc = leader_cut(pending, 0);
        else
            rc = SYMVIRT_CONTINUE;
        yield_restore(yielding);
        if (rc != SYMVIRT_CONTINUE)
            protocol_failed("symvirt_quiet_begin", rc);
    }
    pthread_mutex_unlock(&g.lock);
    return rc;
}

int symvirt_quiet_end(MPI_Comm comm, symvirt_interconnect *ic)
{
    (void)comm;
    if (g.sp == NULL)
        return SYMVIRT_ERR_STATE;
    pthread_mutex_lock(&g.lock); /* held by a cut the quiet thread is making: until resume */
    if (!g.inside) {
        pthread_mutex_unlock(&g.lock);
        return SYMVIRT_ERR_STATE;
    }
    int rc;
    bool yielding = yield_off();
    if (g.qrank == LEADER) {
        rc = leader_end();
    } else {
        rc = follow(0, 1, 0); /* a cut already due is made before the end is reported */
        if (rc == SYMVIRT_CONTINUE)
            rc = complete_requests(); /* an ended rank is ready for any cut */
        if (rc == SYMVIRT_CONTINUE) {
            g.ended = 1;
            rc = report(0);
        }
        if (rc == SYMVIRT_CONTINUE)
            rc = follow(1, 1, 0);
    }
    yield_restore(yielding);
    if (rc != SYMVIRT_CONTINUE)
        protocol_failed("symvirt_quiet_end", rc);
    g.inside = 0;
    g.nreqs = 0; /* the application completes them now */
    if (g.cuts > 0) {
        rc = g.cut_rc;
        if (ic != NULL)
            *ic = g.cut_ic;
        if (rc < 0 && g.cut_by_thread)
            symvirt_sp_raise(g.sp);
    }
    pthread_mutex_unlock(&g.lock);
    return rc;
}

int symvirt_on_quiesce(void (*hook)(uint64_t epoch, void *ctx), void *ctx)
{
    if (g.sp == NULL)
        return SYMVIRT_ERR_STATE;
    pthread_mutex_lock(&g.lock); /* the quiet thread may be using the safe point */
    int rc = symvirt_sp_on_quiesce(g.sp, hook, ctx);
    pthread_mutex_unlock(&g.lock);
    return rc;
}

int symvirt_on_resume(void (*hook)(const symvirt_interconnect *ic, void *ctx), void *ctx)
{
    if (g.sp == NULL)
        return SYMVIRT_ERR_STATE;
    pthread_mutex_lock(&g.lock);
    int rc = symvirt_sp_on_resume(g.sp, hook, ctx);
    pthread_mutex_unlock(&g.lock);
    return rc;
}

int symvirt_finalize(void)
{
    if (g.sp == NULL || g.inside)
        return SYMVIRT_ERR_STATE;
    if (g.have_thread) {
        atomic_store(&g.stop, 1);
        symvirt_ctl_wake_until(&g.thread_ended);
        pthread_join(g.thread, NULL);
        g.have_thread = 0;
        atomic_store(&g.stop, 0);
    }
    int rc = symvirt_sp_free(g.sp);
    g.sp = NULL;
    if (g.comm != MPI_COMM_NULL)
        PMPI_Comm_free(&g.comm);
    if (g.qcomm != MPI_COMM_NULL)
        PMPI_Comm_free(&g.qcomm);
    free(g.rank_ended);
    free(g.rank_in_cut);
    free(g.reqs);
    g.reqs = NULL;
    g.reqs_cap = 0;
    g.rank_ended = NULL;
    g.rank_in_cut = NULL;
    return rc;
}

void symvirt_init_f_(MPI_Fint *comm, MPI_Fint *ierr)
{
    *ierr = symvirt_init(MPI_Comm_f2c(*comm));
}

/* A result and its interconnect's epoch as the Fortran calls return them. */
static void fortran_result(int r, const symvirt_interconnect *ic, MPI_Fint *result,
                           int64_t *epoch, MPI_Fint *ierr)
{
    *result = r < 0 ? 0 : r;
    *epoch = (int64_t)ic->epoch;
    *ierr = r < 0 ? r : 0;
}

void symvirt_safe_point_f_(MPI_Fint *comm, MPI_Fint *result, int64_t *epoch, MPI_Fint *ierr)
{
    symvirt_interconnect ic;
    memset(&ic, 0, sizeof ic);
    fortran_result(symvirt_safe_point(MPI_Comm_f2c(*comm), &ic), &ic, result, epoch, ierr);
}

void symvirt_finalize_f_(MPI_Fint *ierr)
{
    *ierr = symvirt_finalize();
}

void symvirt_quiet_begin_f_(MPI_Fint *comm, MPI_Fint *ierr)
{
    *ierr = symvirt_quiet_begin(MPI_Comm_f2c(*comm));
}

void symvirt_quiet_begin_requests_f_(MPI_Fint *comm, MPI_Fint *count, MPI_Fint *requests,
                                     MPI_Fint *ierr)
{
    int n = *count < 0 ? 0 : (int)*count;
    MPI_Request *c = malloc((size_t)(n > 0 ? n : 1) * sizeof *c);
    if (c == NULL) {
        *ierr = SYMVIRT_ERR_STATE;
        return;
    }
    for (int i = 0; i < n; i++)
        c[i] = MPI_Request_f2c(requests[i]);
    *ierr = *count < 0 ? SYMVIRT_ERR_STATE
                       : symvirt_quiet_begin_requests(MPI_Comm_f2c(*comm), n, c);
    free(c);
}

void symvirt_quiet_end_f_(MPI_Fint *comm, MPI_Fint *result, int64_t *epoch, MPI_Fint *ierr)
{
    symvirt_interconnect ic;
    memset(&ic, 0, sizeof ic);
    fortran_result(symvirt_quiet_end(MPI_Comm_f2c(*comm), &ic), &ic, result, epoch, ierr);
}
