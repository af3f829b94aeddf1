/* ---- init and finalize, and the progress thread ------------------------------------------ */
#include "pmpi_internal.h"

#ifdef SYMVIRT_MPI_IMPL_OPENMPI
#include "ompi_config.h"
#include "opal/runtime/opal_progress.h" /* see make_cut */
#include "opal/threads/thread_usage.h"  /* see setup_threads */
#endif

#include <linux/futex.h>
#include <linux/membarrier.h>
#include <pthread.h>
#include <signal.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

svp_gate_t svp_gate;
int svp_gated;
int svp_fenced;
__thread int svp_in_progress_thread __attribute__((tls_model("initial-exec")));

static pthread_t progress;
static int progress_stop;
static int progress_ended;

static void futex_wake(int *word)
{
    syscall(SYS_futex, word, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

static void futex_wait_ms(int *word, int value, long ms)
{
    const struct timespec t = {ms / 1000, (ms % 1000) * 1000000};
    syscall(SYS_futex, word, FUTEX_WAIT_PRIVATE, value, &t, NULL, 0);
}

/* Both step out at any depth of wrapped calls, and in again at the same depth. */
void svp_wait_gate(void)
{
    int depth = __atomic_load_n(&svp_gate.in, __ATOMIC_RELAXED);
    do {
        __atomic_store_n(&svp_gate.in, 0, __ATOMIC_RELEASE);
        while (__atomic_load_n(&svp_gate.shut, __ATOMIC_ACQUIRE))
            futex_wait_ms(&svp_gate.shut, 1, 100);
    } while (svp_step_in());
    __atomic_store_n(&svp_gate.in, depth, __ATOMIC_RELAXED);
}

void svp_park(uint64_t epoch)
{
    int depth = __atomic_load_n(&svp_gate.in, __ATOMIC_RELAXED);
    __atomic_store_n(&svp_gate.in, 0, __ATOMIC_RELEASE);
    for (;;) {
        int cuts = __atomic_load_n(&svp_gate.cuts, __ATOMIC_ACQUIRE);
        if (symvirt_served_covers(&svp.served, epoch))
            break;
        futex_wait_ms(&svp_gate.cuts, cuts, 100);
    }
    if (svp_step_in())
        svp_wait_gate();
    __atomic_store_n(&svp_gate.in, depth, __ATOMIC_RELAXED);
}

static void open_gate(void)
{
    __atomic_store_n(&svp_gate.shut, 0, __ATOMIC_RELEASE);
    futex_wake(&svp_gate.shut);
    __atomic_fetch_add(&svp_gate.cuts, 1, __ATOMIC_RELEASE);
    futex_wake(&svp_gate.cuts);
}

/* Whether the cut of epoch e no longer needs making now: made (by the application's thread
 * inside a call), no longer requested (aborted), or another is pending first. */
static int settled(uint64_t e)
{
    return symvirt_ctl_pending(&svp.served) != e;
}

/* Shuts the gate and waits until the application's thread is outside every wrapped call: 1.
 * 0 (gate open again) if the cut of epoch e was settled meanwhile. */
static int shut_gate(uint64_t e)
{
    __atomic_store_n(&svp_gate.shut, 1, __ATOMIC_SEQ_CST);
    /* After this, the application's thread either is seen inside (its store of `in` is
     * visible here) or sees the gate shut at its next entry. */
    if (!svp_fenced)
        syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0);
    const struct timespec pause = {0, 200000};
    while (__atomic_load_n(&svp_gate.in, __ATOMIC_SEQ_CST)) {
        if (settled(e)) {
            open_gate();
            return 0;
        }
        nanosleep(&pause, NULL);
    }
    return 1;
}

/* The progress thread's cut. Open MPI, when it runs oversubscribed, yields the CPU in every
 * progress turn that finds nothing; behind computing threads each yield costs a time slice
 * (measured: 10 ms per turn of the drain loop, 4 computing ranks on 2 cores, 53 ms per cut).
 * The progress thread sleeps between its turns instead (svp_pause), so Open MPI's yield is
 * off while it makes the cut: the application's thread is outside MPI meanwhile. */
static void make_cut(uint64_t epoch)
{
#ifdef SYMVIRT_MPI_IMPL_OPENMPI
    bool yielding = opal_progress_set_yield_when_idle(false);
    svp_cut(epoch);
    opal_progress_set_yield_when_idle(yielding);
#else
    svp_cut(epoch);
#endif
}

/* The progress thread (see "A rank outside MPI" at the top of pmpi_internal.h): sleeps until
 * the agent (or SIGUSR1) requests a cut, then shuts the gate. Once the application's thread
 * is outside every wrapped call, and the cut is still to be made (the application's thread
 * may have made it inside a call meanwhile), it makes it exactly as a wait loop of the layer
 * would: counts, drain, report, wait for resume; then opens the gate. */
static void *progress_main(void *unused)
{
    (void)unused;
    svp_in_progress_thread = 1;
    uint64_t skip = 0; /* an epoch left to the application's thread */
    int closed = 0;
    while (!closed && !__atomic_load_n(&progress_stop, __ATOMIC_ACQUIRE)) {
        uint64_t e = symvirt_ctl_wait_requested(&svp.served, skip, 1000);
        if (e != 0 && shut_gate(e)) {
            closed = svp.closed;
            uint64_t now = symvirt_ctl_pending(&svp.served);
            /* With a window or a file open the application may be inside a call the layer
             * does not wrap (PSCW, locks, MPI-IO): its thread makes the cut (or, with a
             * window, answers "unable": see onesided.c) at its next wrapped call, as without
             * a progress thread. */
            int unwrapped = svp_unwrapped_calls_possible();
            if (!closed && !unwrapped && now != 0)
                make_cut(now);
            open_gate();
            if (unwrapped) {
                skip = e; /* not this epoch again */
                continue;
            }
        }
        skip = 0;
    }
    __atomic_store_n(&progress_ended, 1, __ATOMIC_RELEASE);
    return NULL;
}

/* Starts the progress thread, with every signal blocked in it (they stay the application's). */
static void start_progress(void)
{
    /* Without membarrier(2) every entry pays a full fence instead. */
    svp_fenced = syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0, 0) != 0;
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    int rc = pthread_create(&progress, NULL, progress_main, NULL);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        fprintf(stderr,
                "symvirt-pmpi: no progress thread (%s): a rank joins a cut at its next MPI call\n",
                strerror(rc));
        return;
    }
    svp_gated = 1;
    if (svp.me == 0)
        symvirt_warn_placement(); /* launchers place every rank alike: once for the job */
}

static void stop_progress(void)
{
    __atomic_store_n(&progress_stop, 1, __ATOMIC_RELEASE);
    symvirt_ctl_wake_until(&progress_ended);
    pthread_join(progress, NULL);
    svp_gated = 0;
}

/* The thread level the layer initialises MPI at for a program that asked for `required`:
 * with the progress thread (the default; SYMVIRT_PROGRESS_THREAD=0 turns it off),
 * MPI_THREAD_SERIALIZED at least, so that it may call MPI while the application's thread is
 * outside it; otherwise, or for MPI_THREAD_MULTIPLE (not covered: the gate would serialise the
 * program's threads), what the program asked. */
static int progress_off(void)
{
    const char *env = getenv("SYMVIRT_PROGRESS_THREAD");
    return env != NULL && strcmp(env, "0") == 0;
}

static int wanted_level(int required)
{
    return progress_off() || required >= MPI_THREAD_SERIALIZED ? required : MPI_THREAD_SERIALIZED;
}

static void setup(void)
{
    PMPI_Comm_rank(MPI_COMM_WORLD, &svp.me);
    PMPI_Comm_size(MPI_COMM_WORLD, &svp.np);
    /* The private communicators span MPI_COMM_WORLD. Made with MPI_Comm_create_group, not
     * MPI_Comm_dup: Open MPI's dup agrees on the new context with a non-blocking allreduce on
     * MPI_COMM_WORLD, which hooks its non-blocking collective engine into every later
     * progress turn of the application (about 20 instructions each); create_group agrees
     * point to point. Its tag cannot meet the application's messages: none exist yet. */
    MPI_Group world;
    PMPI_Comm_group(MPI_COMM_WORLD, &world);
    PMPI_Comm_create_group(MPI_COMM_WORLD, world, 1, &svp.ctl);
    PMPI_Comm_create_group(MPI_COMM_WORLD, world, 2, &svp.align);
    PMPI_Comm_create_group(MPI_COMM_WORLD, world, 3, &svp.starts);
    PMPI_Group_free(&world);
    PMPI_Comm_dup(MPI_COMM_SELF, &svp.self);
    PMPI_Comm_set_errhandler(svp.self, MPI_ERRORS_RETURN); /* svp_unpack_received's errors */
    PMPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, svp_on_comm_delete, &svp.keyval, NULL);
    svp_blocking.req = MPI_REQUEST_NULL;
    svp.sent = calloc((size_t)svp.np, sizeof(uint64_t));
    svp.recv = calloc((size_t)svp.np, sizeof(uint64_t));
    svp.retired_sent = calloc((size_t)svp.np, sizeof(uint64_t));
    svp.retired_recv = calloc((size_t)svp.np, sizeof(uint64_t));
    if (svp.sent == NULL || svp.recv == NULL || svp.retired_sent == NULL ||
        svp.retired_recv == NULL)
        svp_die("out of memory");
    svp_cut_setup();
    if (svp_track_comm(MPI_COMM_WORLD) != 0)
        svp_die("cannot track MPI_COMM_WORLD");
    svp.comms[0].id = 1;
    svp_agreement_setup();
    int rc = symvirt_ctl_open((uint32_t)svp.me, NULL,
                              symvirt_env_ms("SYMVIRT_CONNECT_TIMEOUT_MS", 10000));
    if (rc != SYMVIRT_CONTINUE)
        fprintf(stderr, "symvirt-pmpi rank %d: no guest agent (%s): the job cannot be migrated%s\n",
                svp.me, symvirt_last_error(),
                symvirt_ctl_signal_cuts() ? "; SIGUSR1 through the launcher still takes cuts"
                                          : " or cut");
    svp.ready = 1;
}

/* After a successful PMPI_Init_thread that asked `asked` and got `provided`, for a program
 * that asked for `required`. */
static void setup_threads(int required, int asked, int provided)
{
    if (progress_off() || asked != MPI_THREAD_SERIALIZED || provided < MPI_THREAD_SERIALIZED)
        return;
#ifdef SYMVIRT_MPI_IMPL_OPENMPI
    /* Open MPI 4.1 turns its internal locks and atomics on for every level above
     * MPI_THREAD_SINGLE, which cost its 0.16 us shared-memory ping-pong 5 to 8 % here. The
     * gate keeps the two threads out of MPI at the same time (and orders their memory
     * accesses), so for a program that asked for MPI_THREAD_SINGLE they go back off, as they
     * would have been without the layer (and stay off if the thread cannot start: the
     * program then has one thread in MPI). Before the thread starts: it may make a cut at
     * once (a request already waiting), inside Open MPI. */
    if (required == MPI_THREAD_SINGLE)
        opal_set_using_threads(false);
#else
    (void)required;
#endif
    start_progress();
}

int MPI_Init(int *argc, char ***argv)
{
    int asked = wanted_level(MPI_THREAD_SINGLE), provided = MPI_THREAD_SINGLE;
    int rc = asked == MPI_THREAD_SINGLE ? PMPI_Init(argc, argv)
                                        : PMPI_Init_thread(argc, argv, asked, &provided);
    if (rc == MPI_SUCCESS) {
        setup();
        setup_threads(MPI_THREAD_SINGLE, asked, provided);
    }
    return rc;
}

int MPI_Init_thread(int *argc, char ***argv, int required, int *provided)
{
    int asked = wanted_level(required);
    int rc = PMPI_Init_thread(argc, argv, asked, provided);
    if (rc == MPI_SUCCESS) {
        setup();
        setup_threads(required, asked, *provided);
    }
    return rc;
}

int MPI_Finalize(void)
{
    if (svp.ready && !svp.closed) {
        svp_enter();
        svp_align(0, NULL);
        /* From here no rank serves cuts: a request now fails the epoch at the agent. */
        svp.closed = 1;
        svp_free_held();
        symvirt_ctl_close();
        PMPI_Comm_free(&svp.ctl);
        PMPI_Comm_free(&svp.align);
        PMPI_Comm_free(&svp.starts);
        PMPI_Comm_free(&svp.self);
        svp_leave(NULL);
    }
    if (svp_gated)
        stop_progress();
    return PMPI_Finalize();
}
