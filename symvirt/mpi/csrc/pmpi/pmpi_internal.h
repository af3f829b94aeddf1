/* SymVirt transparent mode: a PMPI interposition library (LD_PRELOAD) that brings an
 * unmodified MPI application to a consistent cut when the guest agent asks for one.
 *
 * Counting is per MPI_COMM_WORLD peer, and per communicator: every communicator the
 * application uses has a slot with its ranks translated to WORLD ranks once (remote group for
 * intercommunicators) and its own counts per rank. Slots are made when a communicator is created through a wrapped call
 * (MPI_Comm_dup/_with_info, split, split_type, create, create_group, Cart_create, Cart_sub,
 * Graph_create, Dist_graph_create(_adjacent), Intercomm_create/_merge), or on first use for
 * any other; an attribute's delete callback releases the slot when the communicator is freed,
 * by any path. Every send counts sent[rank] on its slot when it is started; every receive
 * counts received[rank] on its slot when it completes (or, during a drain, when
 * MPI_Request_get_status sees it complete, without freeing the application's request). A cut
 * adds them up per WORLD peer (with the counts of slots reused since: svp_sum_counts).
 *
 * The cut for epoch E, entered from any wrapper's progress loop when the agent requested E
 * (watcher thread, one atomic load) or when a peer's COUNTS message arrives:
 *   1. send COUNTS{E, sent[p], and per communicator: its identity, sent there} to every peer
 *      p (private communicator);
 *   2. until every peer's COUNTS arrived and received[p] == its sent count, and every
 *      non-blocking collective this rank started has completed: complete the application's
 *      pending receives (get_status), receive the unexpected messages into the layer's buffer
 *      (from a peer that counted, only on the communicators where it sent more than arrived:
 *      a message it did not count is not the program's, see drainable() in cut.c; from one
 *      that has not, any) (delivered later, in arrival order, exactly once: a receive,
 *      probe, matched probe, Irecv or a persistent receive's Start first looks in the buffer,
 *      honouring MPI matching rules: ANY_SOURCE, ANY_TAG, and non-overtaking per source), and
 *      receive into it too the messages a matched probe (MPI_Mprobe) handed to the
 *      application but that it has not received yet;
 *   3. report quiesced through the agent, wait for resume or abort, run the transport hook,
 *      report resumed, barrier.
 * A drain that cannot finish is given up (SYMVIRT_DRAIN_TIMEOUT_MS, before the agent's
 * deadline, or after its abort: see "a cut given up" in cut.c): every rank learns it from the
 * post-drain agreement and reports unable instead of quiesced; the job goes on where it is.
 * Blocking receives, probes, waits and collectives are turned into non-blocking ones plus a
 * progress loop that serves cuts, so no rank sits in an MPI call that a quiescing peer would
 * have to complete. Blocking sends stay blocking: a peer in a cut completes them by draining
 * (see the blocking sends in p2p.c), unless a deferred collective is pending (then they wait
 * in the layer's loop, which moves it).
 *
 * A rank outside MPI (computing for seconds between calls) is brought into a cut at once by
 * the layer's progress thread (init.c), not at its next MPI call. The thread sleeps on a
 * futex until the agent (or SIGUSR1) requests a cut; it costs the normal run nothing else.
 * The application's thread marks itself inside every wrapped call (the gate, svp_gate); the
 * progress thread shuts the gate and waits until the application's thread is outside, which
 * it then stays (a call it makes waits at its start while the gate is shut). It then makes the
 * cut exactly as a wait loop of the layer would (steps 1 to 3 above, svp_cut), with the same
 * state: the application's pending requests are the layer's watched requests, completed with
 * MPI_Request_get_status (the application still owns them), a large Isend it left
 * outstanding progresses because the thread makes MPI progress while draining, and the gate
 * stays shut until resume, so an application call made meanwhile waits until the cut is over
 * (the application itself may go on computing). The application's thread never makes a cut
 * itself while the progress thread runs: where its wait loops would enter one (its own
 * request, a peer's COUNTS, an agreed alignment) it hands the cut over (svp_make_cut: asks
 * for it locally and parks), and a wait loop that finds the gate shut steps aside until the
 * cut is made (svp_step_aside); alignments and deferred starts, which only answer cuts, look
 * for peers' COUNTS every turn while the gate is shut. So every cut is made by a thread that
 * sleeps between its turns (svp_pause) instead of yielding behind computing threads, with
 * Open MPI's own yield off (see make_cut). Where ranks share cores unbound and each rank is a
 * scheduling group of its own (MPICH's launcher gives every rank a session, the kernel an
 * autogroup per session), the kernel may leave a woken progress thread unrun for 50-130 ms
 * while another rank's threads hold the core; bound ranks do not see it (symvirt/mpi/README.md).
 * Rank 0 says so at start when its placement allows it (symvirt_warn_placement).
 * Safe for both MPIs because MPI is initialised at MPI_THREAD_SERIALIZED (the program's
 * MPI_Init asks for it; an MPI_Init_thread for less is raised to it): two threads may call
 * MPI, never at once, which the gate ensures; neither Open MPI nor MPICH takes locks below
 * MPI_THREAD_MULTIPLE. The normal run pays a load and a store at the entry and the exit of a
 * wrapped call and a load of the gate (a mutex, tried first, cost Open MPI's 0.165 us
 * ping-pong 21%): the store-load ordering the handshake needs is forced by membarrier(2)
 * from the progress thread, once per cut. What the whole layer costs an 8-byte ping-pong,
 * measured in one process against PMPI_Send and PMPI_Recv (benches/mpi_overhead.rs
 * latency_ratio_in_process, 21 launches): Open MPI 4.5 % when its ping-pong takes 0.13 us,
 * 2 % at 0.36 us; MPICH 6.5 % at 0.165 us (about 11 ns: the send wrapper, and a blocking
 * receive made of MPI_Irecv and an MPI_Test loop), and 5 % less than PMPI_Recv at 0.66 us,
 * where MPICH's own blocking wait is the slower loop.
 * The thread is on unless SYMVIRT_PROGRESS_THREAD=0.
 * Not covered: programs that ask for MPI_THREAD_MULTIPLE (no gate, no thread: their threads
 * would be serialised), the thread switched off, and ranks with a window or
 * an MPI-IO file open: the application's thread may be inside a one-sided or MPI-IO call the
 * layer does not wrap, so it makes the cut itself at its next wrapped call, as without the
 * thread (see svp_unwrapped_calls_possible). Other calls the layer does not wrap run outside
 * the gate: safe for local calls that touch no request or communicator a cut works on
 * (MPI_Comm_rank, MPI_Wtime, datatype and attribute calls). MPI 4's partitioned requests
 * (and persistent collectives on intercommunicators) are wrapped (inside the gate) and
 * observed, not covered: a rank that holds one answers cuts "unable" until it frees it
 * (persistent.c).
 *
 * Requests of both kinds at once (the agent's epoch E and SIGUSR1's F, counted apart: see
 * symvirt_served): a rank may start its cut for E while a peer starts its cut for F. Every
 * rank sends its COUNTS once per cut, for the epoch it started with, and what they count does
 * not change until the cut is over (the application sends nothing meanwhile: its thread makes
 * the cut or waits at the gate; collectives a cut runs are not counted), so a peer's COUNTS
 * for either epoch hold for the other: any COUNTS of an epoch not yet made is the peer's one
 * COUNTS of this cut, and its epoch joins the cut's. Every rank takes every peer's COUNTS
 * before its drain ends, so all end with the same epochs (the highest of each kind that some
 * rank started with): one cut serves them all, reported to the agent for E (resume,
 * transport hook), then held for F's releasing signal. An epoch no rank started with stays
 * pending for the next cut. The same holds for two of the agent's epochs (a new host asked
 * for E+1 while ranks were cutting for the E its dead predecessor asked for): the cut serves
 * E+1.
 *
 * Blocking collectives (and communicator creation and free) are aligned first among their
 * communicator's members: a maximum of "cut requested" (point to point, over a private
 * duplicate of MPI_COMM_WORLD: see agreement.c; an MPI_Iallreduce on an intercommunicator
 * itself, twice, so both groups agree), whose progress loop answers cuts started by peers
 * that are not in the collective yet. When the agreed value asks for a cut, every member
 * makes it before entering the real collective; otherwise every member is at the collective
 * and enters it. A member that answers a peer's cut while its alignment is pending may learn
 * inside that cut that the members agreed on the collective (others may already be in it,
 * waiting for this rank): it then runs the collective there (a record of its arguments, see
 * coll below), except MPI_Comm_free, which waits for no member: it runs after the cut, so
 * that a collective its delete callbacks call aligns like any other. MPI_Comm_create_group
 * and MPI_Intercomm_create, collective over members no communicator holds together, are
 * aligned the same way over a stand-in for one (see comm_create.c).
 * Non-blocking collectives return at once with a request of the layer's; the real one starts
 * once every member has called it (see deferred.c), so every real non-blocking collective in
 * flight was started by all its members and completes while they drain, and a rank never
 * waits at the start of one (the NBX pattern works).
 * MPI_Finalize is aligned the same way, then the agent connection is closed (a request
 * that arrives later fails the epoch at the agent: a clear error for the host, never a hang).
 *
 * Persistent requests: a send counts at each MPI_Start; a receive's Start is served from the
 * buffer when a drained message matches (the request then completes in the test/wait call
 * with that message's status), else it is a pending receive like an Irecv. A persistent
 * collective's MPI_Start (MPI 4) is deferred until every member has started that request
 * (deferred.c; agreed per request, since members may start them in different orders).
 * A pending receive the application frees (MPI_Request_free) is held by the layer until it
 * completes: its message, counted by its sender, is counted when it lands.
 * Matched probes: a drained message is handed out through a real message handle (a zero-byte
 * message to self on a private communicator, held until MPI_Mrecv/Imrecv); a message the
 * application matched but has not received at a cut is received into the buffer and its
 * handle keeps naming it (should MPI hand out the same handle value again for another message
 * meanwhile, that message too goes through the buffer under a fresh handle).
 * MPI_Cancel: a receive is cancelled only if MPI says so (a message served from the buffer is
 * already complete and is delivered); cancelling a send is refused (its count could not be
 * taken back). Refusals print why and raise MPI_ERR_UNSUPPORTED_OPERATION through the error
 * handler, as MPI raises its own errors.
 *
 * One-sided communication is not covered: its operations are not counted. Windows are
 * observed (creation, MPI_Win_fence and MPI_Win_free aligned like collectives), and while one
 * is open the rank answers a cut with "unable" (symvirt_ctl_unable): the agent fails the
 * epoch with that reason and the host keeps the job where it is. So does a rank whose MPI uses
 * RDMA verbs (a verbs device open), checked by symvirt_ctl_quiesce at the cut (Rust core,
 * src/verbs.rs), nowhere on the MPI calls' paths.
 *
 * Not covered (documented limits, also in symvirt/mpi/README.md): one-sided operations
 * (see above; PSCW and passive-target synchronization are not aligned);
 * non-blocking collectives on intercommunicators are aligned at their start like blocking
 * ones (a rank waits there for its peers); partitioned communication and persistent
 * collectives on intercommunicators (MPI 4), refused while held; Open MPI Fortran
 * entry points other than those in ../symvirt_pmpi_fortran.c; the mpi_f08 bindings; processes
 * outside MPI_COMM_WORLD (spawn); MPI_THREAD_MULTIPLE.
 *
 * Environment: SYMVIRT_AGENT_SOCKET (agent's rank socket), SYMVIRT_CUT_LOG (a directory: each
 * rank writes cut-E-R with its per-peer sent and received counts at the cut and the epochs
 * the cut served, one record for each of them, and resumed-E-R),
 * SYMVIRT_PROGRESS_THREAD (0: no progress thread, see above), SYMVIRT_CONNECT_TIMEOUT_MS,
 * SYMVIRT_QUIESCE_TIMEOUT_MS, SYMVIRT_DRAIN_TIMEOUT_MS, SYMVIRT_VERBS_DEVICE_DIR (test hook: a
 * directory standing in for /dev/infiniband/).
 *
 * The files (one room each; this header declares what they share):
 *   comms.c        the layer's state, errors, communicators (slots, WORLD ranks, identities)
 *   requests.c     pending requests the layer watches, and its waits for one request
 *   buffer.c       the layer's buffer of drained messages, and delivering from it
 *   cut.c          the cut, and the idle turns of every wait loop that enter or answer one
 *   agreement.c    agreement among a communicator's members; collectives aligned, then run
 *   deferred.c     non-blocking collectives, started once every member has called them
 *                  (datatypes and operations freed meanwhile held until then); compounds
 *                  (MPI_Isendrecv: a receive and a send as one request)
 *   init.c         MPI_Init(_thread), MPI_Finalize, the progress thread and the rank's lock
 *   comm_create.c  communicator creation, MPI_Comm_free and MPI_Comm_disconnect
 *   onesided.c     windows (observed, not their operations)
 *   files.c        MPI-IO: open files observed, collective calls aligned
 *   p2p.c          sends, receives, Sendrecv(_replace), MPI 4's Isendrecv(_replace); their
 *                  large-count (_c) forms
 *   persistent.c   persistent requests, MPI_Request_free, MPI_Cancel; MPI 4's persistent
 *                  collectives and partitioned requests (observed, not covered)
 *   probes.c       probes, matched probes and the held messages behind them
 *   completion.c   the test and wait families
 *   collectives.c  blocking, non-blocking, persistent and large-count collectives (generated
 *                  from one table)
 *
 * Everything the files share is declared below, hidden: internal to the library, neither
 * exported from it nor bound to a symbol of the application's (prefix svp_). Everything else
 * is static to its file. The MPI_* wrappers are the library's interface (declared by mpi.h). */
#ifndef SYMVIRT_PMPI_INTERNAL_H
#define SYMVIRT_PMPI_INTERNAL_H

#include "symvirt_core.h"

#include <mpi.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#pragma GCC visibility push(hidden)

#define MAX_COMMS 1024
#define TAG_COUNTS 1
#define TAG_HOLD 2    /* zero-byte self messages that stand for held (drained) messages */
#define TAG_GROUP 3   /* an MPI_Intercomm_create's groups, leader to leader to members */
#define TAG_UNPACK 4  /* a drained message to self, received as the application receives it */
#define TAG_DRAINED 8 /* the post-drain barrier on the COUNTS communicator (rounds add) */
#define TAG_ALIGN 64  /* alignments on the private MPI_COMM_WORLD duplicate (see agreement) */

/* ---- the layer's state ------------------------------------------------------------------ */

/* A communicator the layer observes. */
typedef struct {
    MPI_Comm comm; /* MPI_COMM_NULL: free, or freed while requests still name the slot */
    int size;      /* ranks point-to-point calls address (the remote group's, for inter) */
    int *world;    /* rank in comm (remote group) -> rank in MPI_COMM_WORLD */
    int inter;
    int me;        /* this rank in comm (local group) */
    /* Its alignments' messages (see agreement): an identity the members share, the same on
     * every member (from the parent's for a communicator made through a wrapped call,
     * else from the members), how many communicators were made from it, how many
     * alignments it had. */
    uint32_t id;
    unsigned children, seq;
    unsigned pcolls; /* persistent collectives made on it: their ordinals (see persistent.c) */
    /* Messages counted on it, per rank in comm (remote group): a cut's drain takes from a peer
     * only on the communicators where that peer sent more than arrived (see cut.c). */
    uint64_t *sent, *recv;
} tracked_comm;

/* A request the layer watches until it completes. */
enum { REQ_RECV, REQ_COLL };
typedef struct {
    MPI_Request req;
    int cid;
    int kind;    /* REQ_RECV: counted on completion; REQ_COLL: a cut waits for it */
    int counted; /* completed (and counted) during a cut, not yet seen by the application */
    int freed;   /* a receive the application freed while pending (MPI_Request_free): the
                  * layer holds the handle, counts it when it completes, then frees it */
} tracked_req;

/* A persistent request on a tracked communicator: point to point, or an MPI 4 persistent
 * collective on an intracommunicator (its starts deferred, see deferred.c); or one the layer
 * does not cover (uncovered: the call that made it: a partitioned request, a persistent
 * collective on an intercommunicator), whose traffic it neither counts nor drains: while one
 * exists, cuts are answered "unable". */
typedef struct {
    MPI_Request req;
    int cid, is_recv, peer, tag, count;
    void *buf;
    MPI_Datatype dt;
    const char *uncovered;
    int collective;   /* a persistent collective on a tracked intracommunicator (covered) */
    unsigned ordinal; /* a collective's: made the ordinal-th on its communicator */
    int active;       /* a collective's: started by the application, not completed yet */
    int start_err;    /* a collective's: its deferred start failed with this code */
    MPI_Comm comm;    /* a collective's: its communicator (whose error handler raises that) */
} persistent;

/* A persistent receive served from the buffer: the next test/wait returns this status. */
typedef struct {
    MPI_Request req;
    MPI_Status st;
    MPI_Comm comm; /* the request's, whose error handler raises a truncation */
} substitute;

typedef struct buffered {
    struct buffered *next;
    int cid, src, tag, nbytes;
    char data[];
} buffered;

/* A message handed out by a matched probe, under the handle the application holds (key):
 * a real message on an application communicator (m == NULL), or a message in the layer's
 * buffer (m != NULL: served from the buffer, or received by a cut or to avoid a clash of
 * handles), then standin is a live zero-byte self message whose handle the application was
 * given (MPI_MESSAGE_NULL when the application holds the handle of a message received since). */
typedef struct {
    MPI_Message key, standin;
    int cid;
    buffered *m;
    int nbytes, src, tag; /* of a real message (for receiving it into the buffer) */
} matched;

/* A window for one-sided communication that is alive, with the slot of the communicator it
 * was made on (MPI_Win_free is collective over it). While there is one, cuts are refused. */
typedef struct {
    MPI_Win win;
    int cid;
    MPI_Comm comm; /* to see that the slot still holds it */
} window;

/* An MPI-IO file that is open, with the slot of the communicator it was opened on
 * (MPI_File_close is collective over it). While there is one, the progress thread makes no
 * cut (see files.c). */
typedef struct {
    MPI_File fh;
    int cid;
    MPI_Comm comm; /* to see that the slot still holds it */
} open_file;

#define LIST(type, name)                                                                       \
    struct {                                                                                   \
        type *v;                                                                               \
        int n, cap;                                                                            \
    } name

typedef struct {
    int ready, closed;
    int me, np;
    MPI_Comm ctl;   /* COUNTS messages, post-drain and post-resume barriers */
    MPI_Comm align; /* alignment reductions on MPI_COMM_WORLD */
    MPI_Comm starts; /* the agreements of persistent collectives' starts (MPI 4) */
    MPI_Comm self;  /* held messages (see matched) */
    int keyval;     /* attribute whose delete callback releases a communicator's slot */
    int ncomms;     /* slots in use are below this */
    /* Per WORLD peer: what slots counted before they were reused (comms.c), and the totals
     * with the slots' counts added (svp_sum_counts: the cut's). */
    uint64_t *retired_sent, *retired_recv, *sent, *recv;
    LIST(tracked_req, reqs);
    LIST(persistent, pers);
    LIST(substitute, subst);
    LIST(matched, matches);
    buffered *head, **tail;
    symvirt_served served; /* the last cut made, per kind of request */
    uint64_t drained; /* messages taken into the buffer during the current cut */
    LIST(window, windows); /* alive (see onesided.c) */
    LIST(open_file, files); /* open (see files.c) */
    /* Last: the hot fields above share a few cache lines. */
    tracked_comm comms[MAX_COMMS];
} svp_state;

extern svp_state svp; /* comms.c */

/* ---- the rank's MPI gate (init.c; see "A rank outside MPI" at the top) -------------------- */

/* The application's thread marks itself inside a wrapped call (C and Fortran) with `in`, the
 * depth of its wrapped calls (nested ones count once more); the progress thread shuts the
 * gate (`shut`) before it makes a cut on the rank's behalf, and makes it only once it sees
 * `in` clear: the application's thread is then outside every wrapped call, and a call it
 * makes meanwhile waits at its start (slow path) until the gate opens after the cut. So the
 * two threads never call MPI at once (MPI_THREAD_SERIALIZED). The fast path is plain loads
 * and stores of `in` and a load of `shut`: the ordering a Dekker-style handshake needs (the
 * application's store of `in` before its load of `shut`) is forced from the progress
 * thread's side by membarrier(2), at each cut, not on every call; where membarrier is
 * missing, the entry store is a full fence instead (svp_fenced). */
typedef struct {
    int in;   /* written by the application's thread only; the progress thread reads 0 or not */
    int shut; /* written by the progress thread only; a futex word */
    int cuts; /* bumped by the progress thread after each cut it made; a futex word */
} svp_gate_t;
extern svp_gate_t svp_gate;
/* Set at MPI_Init when the progress thread runs (never for MPI_THREAD_MULTIPLE programs). */
extern int svp_gated;
extern int svp_fenced;
/* The gate was shut at entry: step out, wait for it to open, step in again. */
void svp_wait_gate(void);
/* The application's thread, inside a wrapped call, hands the cut of `epoch` to the progress
 * thread: steps out of the gate, waits until the cut is made, steps in again. */
void svp_park(uint64_t epoch);

/* Marks the application's thread inside; returns whether the gate is shut. */
static inline int svp_step_in(void)
{
    if (svp_fenced) {
        /* Both sequentially consistent: C11 orders a seq_cst store before a later load only
         * if that load is seq_cst too (an acquire load may pass it on POWER or ARM). */
        __atomic_store_n(&svp_gate.in, 1, __ATOMIC_SEQ_CST);
        return __atomic_load_n(&svp_gate.shut, __ATOMIC_SEQ_CST);
    } else {
        __atomic_store_n(&svp_gate.in, 1, __ATOMIC_RELAXED);
        __atomic_signal_fence(__ATOMIC_SEQ_CST); /* the CPU's order: membarrier's job */
    }
    return __atomic_load_n(&svp_gate.shut, __ATOMIC_ACQUIRE);
}

/* The depth is kept in `in` itself, not in a thread-local counter: one load fewer on every
 * call, and the program's threads call MPI one at a time (MPI_THREAD_MULTIPLE is not gated). */
static inline void svp_enter(void)
{
    if (!svp_gated)
        return;
    int depth = __atomic_load_n(&svp_gate.in, __ATOMIC_RELAXED);
    if (depth > 0)
        __atomic_store_n(&svp_gate.in, depth + 1, __ATOMIC_RELAXED);
    else if (svp_step_in())
        svp_wait_gate();
}

static inline void svp_leave(int *scope)
{
    (void)scope;
    if (svp_gated)
        __atomic_store_n(&svp_gate.in, __atomic_load_n(&svp_gate.in, __ATOMIC_RELAXED) - 1,
                         __ATOMIC_RELEASE);
}

/* Whether the progress thread has shut the gate to make a cut. */
static inline int svp_cut_waiting(void)
{
    return __atomic_load_n(&svp_gate.shut, __ATOMIC_RELAXED);
}

/* A turn of a wait loop of the application's thread where a cut may start (svp_idle): if the
 * progress thread shut the gate to make one, step out until it is made, as this thread would
 * have made it here. Not in alignments and deferred starts, which only answer cuts (see
 * agreement.c): there the progress thread waits until the call returns or a peer's cut is
 * answered (handed to it). */
static inline void svp_step_aside(void)
{
    if (svp_cut_waiting())
        svp_wait_gate();
}

/* First statement of every wrapper: in at the gate, out when the wrapper returns. */
#define GUARD() int svp_guard_ __attribute__((cleanup(svp_leave), unused)) = (svp_enter(), 0)

/* The request of the blocking receive in progress (MPI_Recv): the application never sees it,
 * so it is neither cancelled nor looked up, and a slot of its own keeps the list of pending
 * requests off the latency path. A cut counts it if it completes meanwhile. */
typedef struct {
    MPI_Request req; /* MPI_REQUEST_NULL when no blocking receive waits */
    int cid, counted;
} blocking_recv;

extern blocking_recv svp_blocking; /* requests.c */

/* Non-blocking collectives the application called that have not completed (deferred.c). */
extern int svp_ndeferred;

#define GROW(list)                                                                             \
    do {                                                                                       \
        if ((list).n == (list).cap) {                                                          \
            (list).cap = (list).cap ? 2 * (list).cap : 32;                                     \
            void *p_ = realloc((list).v, (size_t)(list).cap * sizeof *(list).v);               \
            if (p_ == NULL)                                                                    \
                svp_die("out of memory");                                                      \
            (list).v = p_;                                                                     \
        }                                                                                      \
    } while (0)

/* ---- comms.c: errors and communicators --------------------------------------------------- */

void svp_die(const char *what);
/* Refuses a call the layer cannot make correct: a clear error at the call, raised through
 * comm's error handler as MPI raises its own (fatal unless the program chose to get codes). */
int svp_refuse(MPI_Comm comm, const char *call, const char *why);
/* rc, raised first through comm's error handler if it is an error (as MPI raises its own). */
int svp_raised(MPI_Comm comm, int rc);
#if MPI_VERSION >= 4
/* A large-count (_c) call the layer serves through its int form, refused beyond an int. */
#define SVP_COUNT_ABOVE_INT "a count beyond an int is not supported by the transparent layer here"
static inline int svp_fits_int(MPI_Count n)
{
    return n == (int)n; /* a negative one too: the int form reports it */
}
#endif
/* The delete callback of the attribute svp.keyval: releases the communicator's slot. */
int svp_on_comm_delete(MPI_Comm c, int keyval, void *val, void *extra);
/* Starts observing c: its ranks translated to WORLD ranks once. Returns its slot, or -1 (a
 * communicator reaching outside MPI_COMM_WORLD, or the table is full: warned once). */
int svp_track_comm(MPI_Comm c);
/* svp.sent and svp.recv, per WORLD peer: the retired counts plus every slot's. */
void svp_sum_counts(void);
/* The WORLD rank of each member of grp (MPI_UNDEFINED: outside MPI_COMM_WORLD), malloc'd;
 * *size gets how many. */
int *svp_world_ranks(MPI_Group grp, int *size);
/* A hash of n WORLD ranks (FNV-1a), in their order. */
uint32_t svp_hash_ranks(const int *ranks, int n);

/* The wrappers' fast path (every call looks up its communicator, every message is counted):
 * inline, as it was when the layer was one file. */

/* The slot of c, made on first use for communicators created by unwrapped calls. */
static inline int svp_comm_id(MPI_Comm c)
{
    if (c == MPI_COMM_NULL)
        return -1; /* not a freed slot's: MPI reports the error */
    for (int i = 0; i < svp.ncomms; i++)
        if (svp.comms[i].comm == c)
            return i;
    return svp_track_comm(c);
}

/* The slot of comm, -1 if untracked or before MPI_Init's setup or after MPI_Finalize. */
static inline int svp_cid(MPI_Comm comm)
{
    if (!svp.ready || svp.closed)
        return -1;
    return svp.comms[0].comm == comm ? 0 : svp_comm_id(comm); /* slot 0: MPI_COMM_WORLD */
}

#define svp_cid(comm) svp_cid(comm)

/* cid if that slot still holds comm (an object made on comm aligns its collectives there),
 * else -1: not aligned. */
static inline int svp_slot_holding(int cid, MPI_Comm comm)
{
    return cid >= 0 && svp.comms[cid].comm == comm ? cid : -1;
}

/* The application's thread may be inside a call the layer does not wrap (a one-sided
 * operation on a live window, an MPI-IO call on an open file): the progress thread then makes
 * no cut, the application's thread makes it at its next wrapped call. */
static inline int svp_unwrapped_calls_possible(void)
{
    return svp.windows.n > 0 || svp.files.n > 0;
}

static inline void svp_count_send(int cid, int dest)
{
    if (cid >= 0 && dest >= 0 && dest < svp.comms[cid].size) {
        svp.comms[cid].sent[dest]++;
    }
}

/* A send MPI refused when it was called (rc not MPI_SUCCESS: its arguments, under
 * MPI_ERRORS_RETURN) sent nothing: its count is taken back, or every later cut would wait for
 * it. Returns rc. A blocking send that fails once its message left means the job's
 * communication failed; no cut can succeed then either way. */
static inline int svp_send_started(int cid, int dest, int rc)
{
    if (__builtin_expect(rc != MPI_SUCCESS, 0) && cid >= 0 && dest >= 0 &&
        dest < svp.comms[cid].size)
        svp.comms[cid].sent[dest]--;
    return rc;
}

static inline void svp_count_recv(int cid, const MPI_Status *st)
{
    if (st->MPI_SOURCE >= 0 && st->MPI_SOURCE < svp.comms[cid].size) {
        svp.comms[cid].recv[st->MPI_SOURCE]++;
    }
}

/* ---- requests.c: pending requests, and waiting for one ------------------------------------ */

static inline void svp_track_req(MPI_Request r, int cid, int kind)
{
    GROW(svp.reqs);
    svp.reqs.v[svp.reqs.n++] = (tracked_req){r, cid, kind, 0, 0};
}

/* The request that was `handle` completed with `st`: count it unless already counted. */
void svp_completed(MPI_Request handle, const MPI_Status *st);
/* During a drain: counts pending receives that have completed, without freeing them.
 * Returns how many watched requests (receives and collectives) are still incomplete. */
int svp_poll_pending(void);
/* Names, one line each, the watched collectives MPI has not completed (a drain given up).
 */
void svp_report_open_colls(FILE *to);
void svp_forget_req(MPI_Request handle);
/* MPI_Request_free of `handle`: a pending receive is held instead (see tracked_req.freed);
 * returns whether it was. */
int svp_hold_freed(MPI_Request handle);
/* Hands every held receive to MPI_Request_free (at MPI_Finalize). */
void svp_free_held(void);
/* Waits for one request, serving cuts meanwhile. */
int svp_wait_serving(MPI_Request *req, MPI_Status *st);
/* Waits for the layer's own receive request (the blocking receive's, a plain point-to-point
 * receive that is neither persistent nor generalized) and frees it. */
int svp_wait_own_receive(MPI_Request *req, MPI_Status *st);

/* ---- buffer.c: the layer's buffer of drained messages ------------------------------------- */

/* The oldest buffered message on slot cid that a receive of (src, tag) matches, and the link
 * that holds it. Inline: every receive and probe looks here first. */
static inline buffered *svp_find_buffered(int cid, int src, int tag, buffered ***link)
{
    for (buffered **l = &svp.head; *l != NULL; l = &(*l)->next) {
        buffered *m = *l;
        if (m->cid == cid && (src == MPI_ANY_SOURCE || src == m->src) &&
            (tag == MPI_ANY_TAG || tag == m->tag)) {
            if (link)
                *link = l;
            return m;
        }
    }
    return NULL;
}

buffered *svp_new_buffered(int cid, int src, int tag, int nbytes);
/* Receives a probed message on slot cid into the buffer (counted, and counted as drained);
 * returns 0, taking nothing, for one the buffer cannot hold (over INT_MAX bytes). */
int svp_drain_one(int cid, const MPI_Status *probed);
/* Takes a buffered message out of the list (the caller owns it). */
buffered *svp_unlink_buffered(buffered **link);
void svp_fill_status(MPI_Status *st, const buffered *m, MPI_Datatype dt, int elems, int err);
/* Receives nbytes of a message taken as bytes into (buf, count, dt) as the original receive
 * would have: whole elements that fit are unpacked; otherwise through MPI (a message to self
 * on svp.self, whose errors return), which writes a last element in part; truncation is
 * MPI_ERR_TRUNCATE. st counts what arrived, for any datatype. */
int svp_unpack_received(const void *data, int nbytes, void *buf, int count, MPI_Datatype dt,
                        MPI_Status *st);
/* Copies a buffered message into the application's buffer (svp_unpack_received) and frees
 * it; the status names its source and tag. */
int svp_deliver_msg(buffered *m, void *buf, int count, MPI_Datatype dt, MPI_Status *st);
/* The same for the message at link, which it unlinks. */
int svp_deliver(buffered **link, void *buf, int count, MPI_Datatype dt, MPI_Status *st);
/* Delivers a buffered message and returns a complete generalized request for it. */
int svp_deliver_request(buffered *m, void *buf, int count, MPI_Datatype dt, MPI_Request *req);
/* A slot's communicator was freed: drop what it can no longer deliver. */
void svp_untrack_slot(int cid);
/* Drops the drained messages of slot cid, a freed communicator's, saying how many. */
void svp_drop_buffered(int cid);
/* Generalized requests' free and cancel functions: the extra state is a malloc'd status. */
int svp_gq_free(void *extra);
int svp_gq_cancel(void *extra, int complete);

/* ---- cut.c: the cut, and the idle turns of wait loops ------------------------------------- */

/* Milliseconds on the monotonic clock. */
uint64_t svp_now_ms(void);

/* At MPI_Init: the per-peer COUNTS slots, the cut log directory and the quiesce timeout. */
void svp_cut_setup(void);
void svp_cut(uint64_t epoch);
/* Where a wait loop of the application's thread enters a cut: with a progress thread, the cut
 * is handed to it (see "A rank outside MPI" at the top); else made here. */
void svp_make_cut(uint64_t epoch);
/* Answers cuts started by peers (a COUNTS message is waiting). */
void svp_serve_peers(void);
/* The slow part of idle(): a requested cut, peers' COUNTS, deferred collectives, yielding. */
void svp_idle_check(unsigned long t);
/* For single-shot Test calls that found nothing: idle() with a process-wide turn count. */
void svp_idle_test(void);

/* Set in the progress thread (init.c). */
extern __thread int svp_in_progress_thread __attribute__((tls_model("initial-exec")));

/* Lets others run while a cut waits for peers. The application's thread yields; the progress
 * thread sleeps 50 us instead: it makes cuts while the application's threads compute, and a
 * yield would put it behind them for a whole time slice (milliseconds) at every turn, where a
 * sleeper is run again as soon as it wakes. */
static inline void svp_pause(void)
{
    if (svp_in_progress_thread) {
        const struct timespec t = {0, 50000};
        nanosleep(&t, NULL);
    } else {
        sched_yield();
    }
}

/* One idle turn of a wait loop. Cheap on the fast path, which is most turns of a receive that
 * waits a microsecond: a load of the gate (the progress thread's cut) every turn; the agent's
 * request and peers' COUNTS every 64 turns (microseconds), or every 8 while the application
 * has non-blocking collectives the layer must start; the CPU is yielded only after a while
 * (ranks may share cores), so a message that arrives soon is seen at full speed. Looking at
 * the request every 8 turns instead cost MPICH's 8-byte ping-pong 0.6 to 3 % (measured in
 * one process against PMPI_Recv, benches/mpi_overhead.rs; launches differ by about 1 %). */
static inline void svp_idle(unsigned long *turns)
{
    unsigned long t = ++*turns;
    svp_step_aside();
    if ((t & 63) == 0 || ((t & 7) == 0 && svp_ndeferred))
        svp_idle_check(t);
}

/* ---- agreement.c: agreement among members; collectives aligned, then run ------------------- */

/* The maximum of one value per member, point to point (see agreement.c). */
typedef struct {
    MPI_Comm comm;    /* svp.align or svp.ctl */
    const int *world; /* member -> rank in comm; NULL: the members are comm's ranks */
    int n, me, tag, round, posted;
    uint64_t value, out, in;
    MPI_Request sreq, rreq;
    /* Test hook (agreement.c, slow_align): leave the last round unread for 20 ms once posted
     * (hold), since held_at. */
    int hold;
    uint64_t held_at;
} agreement;

/* A collective (or communicator creation or free, or a window's collective) to run once its
 * members agreed: its arguments, each field named after the MPI parameter it holds, and a
 * function that calls PMPI with them. It may run inside a cut (see svp_align). Fields a call
 * does not take stay zero. */
typedef struct coll {
    int (*run)(struct coll *);
    int cid; /* its communicator's slot */
    MPI_Comm comm;
    MPI_Request *req; /* non-blocking: watched once started */
    int makes_persistent; /* an _init call: *req is an inactive persistent request, not
                           * a started collective to watch (MPICH never calls it complete) */
    /* Collectives. */
    const void *sendbuf;
    void *recvbuf;
    void *buffer; /* MPI_Bcast's */
    int count, sendcount, recvcount, root;
    MPI_Datatype datatype, sendtype, recvtype;
    MPI_Op op;
    const int *sendcounts, *recvcounts; /* per peer: the v and w variants, Reduce_scatter */
    const int *displs;                  /* Allgatherv, Gatherv, Scatterv */
    const int *sdispls, *rdispls;       /* Alltoallv, Alltoallw, Neighbor_alltoallv */
    const MPI_Aint *sdispls_aint, *rdispls_aint; /* Neighbor_alltoallw's (bytes, MPI_Aint) */
    const MPI_Datatype *sendtypes, *recvtypes;   /* per peer: the w variants */
#if MPI_VERSION >= 4
    /* MPI 4's large-count forms (the _c calls): their counts, and the v variants' byte
     * displacements (the w variants' are sdispls_aint and rdispls_aint). */
    MPI_Count count_c, sendcount_c, recvcount_c; /* also the MPI-IO data calls' count_c */
    const MPI_Count *sendcounts_c, *recvcounts_c;
    const MPI_Aint *displs_aint;
    MPI_Aint disp_unit_c; /* the window calls' */
#endif
    /* Communicator creation and free. */
    MPI_Comm *newcomm;  /* a communicator it makes (tracked), or frees (frees set) */
    int frees;          /* MPI_Comm_free, MPI_Comm_disconnect */
    int local;          /* MPI_Comm_free: MPI runs it without waiting for the other members */
    uint32_t child_id;  /* MPI_Comm_idup: the identity its communicator gets on completion */
    MPI_Info info;      /* also window creation's */
    MPI_Group group;    /* MPI_Comm_create, MPI_Comm_create_from_group */
    const char *stringtag;     /* MPI_Comm_create_from_group */
    MPI_Errhandler errhandler; /* MPI_Comm_create_from_group */
    int color, key;     /* MPI_Comm_split(_type) */
    int tag;            /* MPI_Comm_create_group, MPI_Intercomm_create */
    /* The communicator on which the call's MPI may send messages of its own with the program's
     * tag (Open MPI: MPI_Comm_create_group on its parent, MPI_Intercomm_create between the
     * leaders on the peer communicator); a cut's drain leaves them in place while the call
     * is aligned (svp_withheld). Only where tagged is set. */
    MPI_Comm tagged_comm;
    int tagged;
    int lleader, rleader; /* MPI_Intercomm_create (comm is its local communicator) */
    MPI_Comm peer;
    int split_type;     /* MPI_Comm_split_type */
    int high;           /* MPI_Intercomm_merge */
    int reorder;        /* the topology constructors */
    int ndims;          /* MPI_Cart_create */
    const int *dims, *periods;
    const int *remain_dims; /* MPI_Cart_sub */
    int nnodes;         /* MPI_Graph_create */
    const int *index, *edges;
    int n, indegree, outdegree; /* MPI_Dist_graph_create, _adjacent */
    const int *sources, *degrees, *destinations, *weights, *sourceweights, *destweights;
    /* Windows. */
    void *base;      /* MPI_Win_create */
    MPI_Aint size;
    int disp_unit;
    void *baseptr;   /* MPI_Win_allocate(_shared) */
    int assert_;     /* MPI_Win_fence's assert */
    MPI_Win *win;    /* a window it makes, frees or fences */
    /* Files. */
    const char *filename; /* MPI_File_open */
    int amode;
    MPI_File *fh;         /* a file it opens or closes */
    MPI_File file;        /* the file of a collective data or view call */
    MPI_Offset offset;    /* also MPI_File_set_view's disp, set_size's and preallocate's size */
    MPI_Status *status;
    MPI_Datatype filetype; /* MPI_File_set_view (its etype is datatype) */
    const char *datarep;
    int flag;             /* MPI_File_set_atomicity */
} coll;

/* At MPI_Init: how many bits of a communicator's identity alignment tags can hold. */
void svp_agreement_setup(void);
agreement svp_agreement_of(MPI_Comm comm, const int *world, int n, int me, int tag,
                           uint64_t value);
/* The next alignment among t's members, over svp.align. */
agreement svp_alignment_of(tracked_comm *t, uint64_t value);
/* The agreement of a start of the ordinal-th persistent collective made on t (svp.starts). */
agreement svp_start_agreement(tracked_comm *t, unsigned ordinal);
/* Advances a; 1 once a.value is the maximum over all members. */
int svp_agree_step(agreement *a);
/* Starts observing a communicator made from slot parent (-1: not observed) under identity id
 * (see tracked_comm). */
void svp_adopt(MPI_Comm made, int parent, uint32_t id);
/* Runs c and observes what it made: a communicator, or a collective a cut must wait for. */
int svp_perform(coll *c);
/* Inside a cut: finishes the pending alignment's collective if its members agreed on it. */
void svp_finish_alignment(void);
/* Whether a cut's drain leaves a message on comm from WORLD rank src with this tag where it
 * is: one the call this rank is aligning may be waiting for (see coll.tagged_comm). */
int svp_withheld(MPI_Comm comm, int src, int tag);
/* Agreement before a collective (or finalize: c NULL) on the communicator in slot cid, then
 * the collective; see the top. */
int svp_align(int cid, coll *c);
/* The same among t's members (t->world, size, me, id, seq; an intracommunicator's slot, or a
 * stand-in for members no communicator holds together: see comm_create.c). */
int svp_align_on(tracked_comm *t, coll *c);

/* ---- deferred.c: non-blocking collectives and compounds --------------------------------------- */

/* Starts the collectives every member has called, completes those MPI has completed, and the
 * compounds whose parts have. */
void svp_progress_deferred(void);
/* Names, one line each, the collectives whose start waits for the other members. */
void svp_report_deferred(FILE *to);
/* Whether a non-blocking collective or compound not yet completed names slot cid. */
int svp_deferred_names(int cid);
enum { DEFERRED_COLLECTIVE = 1, DEFERRED_COMPOUND };
/* What h is the request of, if a non-blocking collective or compound not yet completed (0:
 * neither). */
int svp_is_deferred(MPI_Request h);
/* Whether h is a persistent collective's request whose MPI_Start the layer has deferred and
 * not made yet: incomplete, whatever MPI would say of the still inactive request. */
int svp_start_pending(MPI_Request h);
/* MPI_Start of a persistent collective's request, made the ordinal-th on tracked
 * intracommunicator slot cid: deferred until every member has started that request as often
 * (MPI 4 lets members start persistent collectives in different orders, so each request has
 * its own agreement, svp_start_agreement, and waits for no other collective). */
int svp_start_persistent(int cid, MPI_Request req, unsigned ordinal);
/* The application freed h (MPI_Request_free), legal for a compound: its operation still
 * completes, and the request's status is no longer written. */
void svp_detach_deferred(MPI_Request h);
/* A compound (MPI_Isendrecv and _replace): an application's request, returned in req, that
 * completes when both recv (a receive made through the layer's MPI_Irecv) and send (through
 * its MPI_Isend) have, with recv's status, passed first to finish (with c) if not NULL. */
int svp_compound(MPI_Request recv, MPI_Request send, void (*finish)(const coll *c, MPI_Status *st),
                 const coll *c, MPI_Request *req);
/* A non-blocking collective: deferred on a tracked intracommunicator, else aligned and started
 * at once (intercommunicators, communicators the layer does not observe). */
int svp_nonblocking(coll *c, MPI_Request *req);
/* Before a blocking collective on slot cid: the non-blocking ones called on it earlier start
 * first. Answers cuts meanwhile. */
void svp_start_deferred_on(int cid);

/* ---- the wrappers' shared pieces ----------------------------------------------------------- */

/* persistent.c: MPI 4 persistent collectives and partitioned requests. A persistent
 * collective's initialization is collective, so aligned like one (c: its record; call: its
 * name); on a tracked intracommunicator its starts are then deferred (svp_start_persistent),
 * elsewhere it is uncovered. */
int svp_persistent_collective(coll *c, const char *call);
/* Covered persistent collectives (see completion.c: the layer completes them itself in the
 * array calls), and the state of one's request h as the application sees it. */
extern int svp_npcoll;
enum { PCOLL_NOT, PCOLL_INACTIVE, PCOLL_UNSTARTED, PCOLL_STARTED, PCOLL_FAILED };
int svp_pcoll_state(MPI_Request h);
/* The persistent collective h completed (a completion call returned it): inactive again. */
void svp_pcoll_completed(MPI_Request h);
/* Whether reqs hold a covered persistent collective's request. */
int svp_any_pcoll(int n, const MPI_Request *reqs);
/* A deferred start of h failed with rc: its next completion returns rc (PCOLL_FAILED). */
void svp_pcoll_start_failed(MPI_Request h, int rc);
/* Completes a PCOLL_FAILED h: its code (raised through its communicator's error handler, as
 * MPI raises a failed completion's), with st (if not MPI_STATUS_IGNORE) empty but for it;
 * with keep, only reports it (MPI_Request_get_status). */
int svp_pcoll_take_error(MPI_Request h, MPI_Status *st, int keep);
/* Watches the persistent request r (made by call) that the layer does not cover. */
void svp_add_uncovered(MPI_Request r, int cid, const char *call);
/* The call that made an uncovered request this rank holds (made, not freed yet), or NULL: a
 * cut is answered "unable" while there is one. Not only while one is started: a member's part
 * may complete while another's has not started, with its messages in flight. */
const char *svp_uncovered_alive(void);
/* persistent.c: persistent receives served from the buffer (substitutes). */
int svp_take_substitute(MPI_Request h, MPI_Status *st, int *err);
int svp_find_substitute(int n, const MPI_Request *reqs);
/* probes.c: during a cut, messages matched by the application's Mprobe but not received yet
 * are received into the buffer; the application's handle keeps naming them. One of over
 * INT_MAX bytes stays MPI's: returns the WORLD rank that sent it (the cut cannot be made),
 * else -1. */
int svp_drain_matched(void);

/* A run function: calls PMPI with the record's fields. */
#define RUN(name, expr)                                                                        \
    static int name(coll *c)                                                                   \
    {                                                                                          \
        return expr;                                                                           \
    }

/* A non-blocking collective on comm (see deferred.c), its request returned in req_: run_ with
 * the arguments set in the initializer list. */
#define NONBLOCKING(comm_, req_, run_, ...)                                                    \
    do {                                                                                       \
        coll c_ = {.run = run_, .comm = comm_, __VA_ARGS__};                                   \
        return svp_nonblocking(&c_, req_);                                                     \
    } while (0)

/* Aligns on comm, then runs `run` with the arguments set in the initializer list. */
#define COLLECTIVE(comm_, run_, ...)                                                           \
    do {                                                                                       \
        coll c_ = {.run = run_, .comm = comm_, __VA_ARGS__};                                   \
        c_.cid = svp_cid(comm_);                                                               \
        return svp_align(c_.cid, &c_);                                                         \
    } while (0)

#pragma GCC visibility pop

#endif
