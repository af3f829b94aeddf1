/* SymVirt transparent mode: a PMPI interposition library (LD_PRELOAD) that brings an
 * unmodified MPI application to a consistent cut when the guest agent asks for one.
 *
 * Counting is per MPI_COMM_WORLD peer, whatever the communicator: every communicator the
 * application uses has a slot with its ranks translated to WORLD ranks once (remote group for
 * intercommunicators). Slots are made when a communicator is created through a wrapped call
 * (MPI_Comm_dup/_with_info, split, split_type, create, create_group, Cart_create, Cart_sub,
 * Graph_create, Dist_graph_create(_adjacent), Intercomm_create/_merge), or on first use for
 * any other; an attribute's delete callback releases the slot when the communicator is freed,
 * by any path. Every send counts sent[world peer] when it is started; every receive counts
 * received[world peer] when it completes (or, during a drain, when MPI_Request_get_status
 * sees it complete, without freeing the application's request).
 *
 * The cut for epoch E, entered from any wrapper's progress loop when the agent requested E
 * (watcher thread, one atomic load) or when a peer's COUNTS message arrives:
 *   1. send COUNTS{E, sent[p]} to every peer p (private communicator);
 *   2. until every peer's COUNTS arrived and received[p] == its sent count, and every
 *      non-blocking collective this rank started has completed: complete the application's
 *      pending receives (get_status), receive every unexpected message on every communicator
 *      into the layer's buffer (delivered later, in arrival order, exactly once: a receive,
 *      probe, matched probe, Irecv or a persistent receive's Start first looks in the buffer,
 *      honouring MPI matching rules: ANY_SOURCE, ANY_TAG, and non-overtaking per source), and
 *      receive into it too the messages a matched probe (MPI_Mprobe) handed to the
 *      application but that it has not received yet;
 *   3. report quiesced through the agent, wait for resume or abort, run the transport hook,
 *      report resumed, barrier.
 * Blocking receives, probes, waits and collectives are turned into non-blocking ones plus a
 * progress loop that serves cuts, so no rank sits in an MPI call that a quiescing peer would
 * have to complete. Blocking sends stay blocking: a peer in a cut completes them by draining
 * (see send_counted).
 *
 * Blocking collectives (and communicator creation and free) are aligned first among their
 * communicator's members: a maximum of "cut requested" (point to point, over a private
 * duplicate of MPI_COMM_WORLD: see agreement; an MPI_Iallreduce on an intercommunicator
 * itself, twice, so both groups agree), whose progress loop answers cuts started by peers
 * that are not in the collective yet. When the agreed value asks for a cut, every member
 * makes it before entering the real collective; otherwise every member is at the collective
 * and enters it. A member that answers a peer's cut while its alignment is pending may learn
 * inside that cut that the members agreed on the collective (others may already be in it,
 * waiting for this rank): it then runs the collective there (a record of its arguments, see
 * coll).
 * Non-blocking collectives return at once with a request of the layer's; the real one starts
 * once every member has called it (see deferred), so every real non-blocking collective in
 * flight was started by all its members and completes while they drain, and a rank never
 * waits at the start of one (the NBX pattern works).
 * MPI_Finalize is aligned the same way, then the agent connection is closed (a request
 * that arrives later fails the epoch at the agent: a clear error for the host, never a hang).
 *
 * Persistent requests: a send counts at each MPI_Start; a receive's Start is served from the
 * buffer when a drained message matches (the request then completes in the test/wait call
 * with that message's status), else it is a pending receive like an Irecv.
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
 * Not covered (documented limits, also in symvirt-mpi/README.md): one-sided operations
 * (see above; PSCW and passive-target synchronization are not aligned); MPI_Comm_create_group and intercommunicator creation are not aligned (their communicators
 * are tracked); non-blocking collectives on intercommunicators are aligned at their start
 * like blocking ones (a rank waits there for its peers); persistent collectives (MPI 4);
 * Open MPI Fortran entry points other than those in symvirt_pmpi_fortran.c; the mpi_f08
 * bindings; processes outside MPI_COMM_WORLD (spawn); MPI_THREAD_MULTIPLE.
 *
 * Environment: SYMVIRT_AGENT_SOCKET (agent's rank socket), SYMVIRT_CUT_LOG (a directory: each
 * rank writes cut-E-R with its per-peer sent and received counts at the cut, and resumed-E-R),
 * SYMVIRT_CONNECT_TIMEOUT_MS, SYMVIRT_QUIESCE_TIMEOUT_MS, SYMVIRT_VERBS_DEVICE_DIR (test hook: a
 * directory standing in for /dev/infiniband/). */
#include "symvirt_core.h"

#include <mpi.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef SYMVIRT_MPI_IMPL_OPENMPI
/* Open MPI's own headers (shipped by its -dev package, on mpicc's include path): the blocking
 * waits poll a request's completion flag between progress turns, as Open MPI's own MPI_Wait
 * does, instead of paying MPI_Test's argument checks and bookkeeping every turn. The library
 * is built against the installed Open MPI, so the layout matches. */
#include "ompi/request/request.h"
#include "opal/runtime/opal_progress.h"
#endif

#define MAX_COMMS 256
#define TAG_COUNTS 1
#define TAG_HOLD 2    /* zero-byte self messages that stand for held (drained) messages */
#define TAG_DRAINED 8 /* the post-drain barrier on the COUNTS communicator (rounds add) */
#define TAG_ALIGN 64  /* alignments on the private MPI_COMM_WORLD duplicate (see agreement) */

/* A runtime may define this to re-select its transport after a migration (transparent mode's
 * resume hook); it runs on every rank before the rank reports resumed. */
void symvirt_transport_reselect(const symvirt_interconnect *ic) __attribute__((weak));

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
} tracked_comm;

/* A request the layer watches until it completes. */
enum { REQ_RECV, REQ_COLL };
typedef struct {
    MPI_Request req;
    int cid;
    int kind;    /* REQ_RECV: counted on completion; REQ_COLL: a cut waits for it */
    int counted; /* completed (and counted) during a cut, not yet seen by the application */
} tracked_req;

/* A persistent request on a tracked communicator. */
typedef struct {
    MPI_Request req;
    int cid, is_recv, peer, tag, count;
    void *buf;
    MPI_Datatype dt;
} persistent;

/* A persistent receive served from the buffer: the next test/wait returns this status. */
typedef struct {
    MPI_Request req;
    MPI_Status st;
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

#define LIST(type, name)                                                                       \
    struct {                                                                                   \
        type *v;                                                                               \
        int n, cap;                                                                            \
    } name

static struct {
    int ready, closed;
    int me, np;
    MPI_Comm ctl;   /* COUNTS messages, post-drain and post-resume barriers */
    MPI_Comm align; /* alignment reductions on MPI_COMM_WORLD */
    MPI_Comm self;  /* held messages (see matched) */
    int keyval;     /* attribute whose delete callback releases a communicator's slot */
    int ncomms;     /* slots in use are below this */
    uint64_t *sent, *recv; /* per WORLD peer */
    LIST(tracked_req, reqs);
    LIST(persistent, pers);
    LIST(substitute, subst);
    LIST(matched, matches);
    buffered *head, **tail;
    uint64_t served;  /* last epoch a cut was made for */
    uint64_t drained; /* messages taken into the buffer during the current cut */
    /* Last: the hot fields above share a few cache lines. */
    tracked_comm comms[MAX_COMMS];
} g = {.tail = &g.head};

/* Per peer: the last COUNTS message received {epoch, sent to me}, and whether it is there. */
static uint64_t *early;
static int *have_early;
static const char *log_dir;
static uint64_t quiesce_timeout_ms;

#define GROW(list)                                                                             \
    do {                                                                                       \
        if ((list).n == (list).cap) {                                                          \
            (list).cap = (list).cap ? 2 * (list).cap : 32;                                     \
            void *p_ = realloc((list).v, (size_t)(list).cap * sizeof *(list).v);               \
            if (p_ == NULL)                                                                    \
                die("out of memory");                                                          \
            (list).v = p_;                                                                     \
        }                                                                                      \
    } while (0)

static uint64_t env_ms(const char *name, uint64_t fallback)
{
    const char *v = getenv(name);
    if (v == NULL || *v == '\0')
        return fallback;
    char *end = NULL;
    unsigned long long ms = strtoull(v, &end, 10);
    return (end != NULL && *end == '\0') ? (uint64_t)ms : fallback;
}

static void die(const char *what)
{
    fprintf(stderr, "symvirt-pmpi rank %d: %s\n", g.me, what);
    fflush(stderr);
    PMPI_Abort(MPI_COMM_WORLD, 70);
}

/* Refuses a call the layer cannot make correct: a clear error at the call, raised through
 * comm's error handler as MPI raises its own (fatal unless the program chose to get codes). */
static int refuse(MPI_Comm comm, const char *call, const char *why)
{
    fprintf(stderr, "symvirt-pmpi rank %d: %s refused: %s\n", g.me, call, why);
    fflush(stderr);
    PMPI_Comm_call_errhandler(comm, MPI_ERR_UNSUPPORTED_OPERATION);
    return MPI_ERR_UNSUPPORTED_OPERATION;
}

/* ---- communicators ---------------------------------------------------------------------- */

static void untrack_slot(int cid);

static int on_comm_delete(MPI_Comm c, int keyval, void *val, void *extra)
{
    (void)c;
    (void)keyval;
    (void)extra;
    untrack_slot((int)(intptr_t)val);
    return MPI_SUCCESS;
}

static int deferred_names(int cid);

/* Whether a pending request still names slot cid (then its table must stay). */
static int slot_referenced(int cid)
{
    for (int i = 0; i < g.reqs.n; i++)
        if (g.reqs.v[i].cid == cid)
            return 1;
    for (int i = 0; i < g.pers.n; i++)
        if (g.pers.v[i].cid == cid)
            return 1;
    for (int i = 0; i < g.matches.n; i++)
        if (g.matches.v[i].cid == cid)
            return 1;
    return deferred_names(cid);
}

static uint32_t hash_ranks(const int *ranks, int n)
{
    uint32_t h = 2166136261u;
    for (int i = 0; i < n; i++)
        h = (h ^ (uint32_t)ranks[i]) * 16777619u;
    return h;
}

/* The hash of the WORLD ranks of c's local group. */
static uint32_t hash_group(MPI_Comm c)
{
    MPI_Group grp, wgrp;
    PMPI_Comm_group(c, &grp);
    PMPI_Comm_group(MPI_COMM_WORLD, &wgrp);
    int size = 0;
    PMPI_Group_size(grp, &size);
    int *ranks = malloc((size_t)(size > 0 ? size : 1) * 2 * sizeof(int));
    if (ranks == NULL)
        die("out of memory");
    for (int i = 0; i < size; i++)
        ranks[i] = i;
    PMPI_Group_translate_ranks(grp, size, ranks, wgrp, ranks + size);
    uint32_t h = hash_ranks(ranks + size, size);
    free(ranks);
    PMPI_Group_free(&grp);
    PMPI_Group_free(&wgrp);
    return h;
}

/* Starts observing c: its ranks translated to WORLD ranks once. Returns its slot, or -1 (a
 * communicator reaching outside MPI_COMM_WORLD, or the table is full: warned once). */
static int track_comm(MPI_Comm c)
{
    if (c == MPI_COMM_NULL)
        return -1;
    for (int i = 0; i < g.ncomms; i++)
        if (g.comms[i].comm == c)
            return i;
    int cid = -1;
    for (int i = 0; i < g.ncomms && cid < 0; i++)
        if (g.comms[i].comm == MPI_COMM_NULL && !slot_referenced(i))
            cid = i;
    if (cid < 0) {
        static int warned;
        if (g.ncomms == MAX_COMMS) {
            if (!warned++)
                fprintf(stderr, "symvirt-pmpi rank %d: more than %d communicators at once; "
                                "the others pass through unobserved\n", g.me, MAX_COMMS);
            return -1;
        }
        cid = g.ncomms++;
    }
    tracked_comm *t = &g.comms[cid];
    free(t->world);
    int inter = 0;
    PMPI_Comm_test_inter(c, &inter);
    MPI_Group grp, wgrp;
    if (inter)
        PMPI_Comm_remote_group(c, &grp);
    else
        PMPI_Comm_group(c, &grp);
    PMPI_Comm_group(MPI_COMM_WORLD, &wgrp);
    int size = 0;
    PMPI_Group_size(grp, &size);
    int *ranks = malloc((size_t)(size > 0 ? size : 1) * sizeof(int));
    t->world = malloc((size_t)(size > 0 ? size : 1) * sizeof(int));
    if (ranks == NULL || t->world == NULL)
        die("out of memory");
    for (int i = 0; i < size; i++)
        ranks[i] = i;
    PMPI_Group_translate_ranks(grp, size, ranks, wgrp, t->world);
    free(ranks);
    PMPI_Group_free(&grp);
    PMPI_Group_free(&wgrp);
    for (int i = 0; i < size; i++)
        if (t->world[i] == MPI_UNDEFINED) {
            static int warned;
            if (!warned++)
                fprintf(stderr, "symvirt-pmpi rank %d: a communicator reaches processes "
                                "outside MPI_COMM_WORLD; it passes through unobserved\n", g.me);
            if (cid == g.ncomms - 1)
                g.ncomms--;
            return -1;
        }
    t->size = size;
    t->inter = inter;
    PMPI_Comm_rank(c, &t->me);
    /* Until perform() names it from its parent: from the members' WORLD ranks (FNV-1a), for
     * an intercommunicator both groups' (combined alike on both sides). */
    t->id = hash_ranks(t->world, size);
    if (inter)
        t->id ^= hash_group(c);
    t->children = t->seq = 0;
    t->comm = c;
    PMPI_Comm_set_attr(c, g.keyval, (void *)(intptr_t)cid);
    return cid;
}

/* The slot of c, made on first use for communicators created by unwrapped calls. */
static int comm_id(MPI_Comm c)
{
    for (int i = 0; i < g.ncomms; i++)
        if (g.comms[i].comm == c)
            return i;
    return track_comm(c);
}

#define CID(comm) (g.ready && !g.closed ? comm_id(comm) : -1)

static void count_send(int cid, int dest)
{
    if (cid >= 0 && dest >= 0 && dest < g.comms[cid].size)
        g.sent[g.comms[cid].world[dest]]++;
}

static void count_recv(int cid, const MPI_Status *st)
{
    if (st->MPI_SOURCE >= 0 && st->MPI_SOURCE < g.comms[cid].size)
        g.recv[g.comms[cid].world[st->MPI_SOURCE]]++;
}

/* ---- pending requests ------------------------------------------------------------------- */

static void track_req(MPI_Request r, int cid, int kind)
{
    GROW(g.reqs);
    g.reqs.v[g.reqs.n++] = (tracked_req){r, cid, kind, 0};
}

/* The request that was `handle` completed with `st`: count it unless already counted. */
static void completed(MPI_Request handle, const MPI_Status *st)
{
    /* Newest first: a blocking call's own request is the last one tracked. */
    for (int i = g.reqs.n - 1; i >= 0; i--) {
        tracked_req *t = &g.reqs.v[i];
        if (t->req != handle)
            continue;
        int cancelled = 0;
        PMPI_Test_cancelled(st, &cancelled);
        if (t->kind == REQ_RECV && !t->counted && !cancelled)
            count_recv(t->cid, st);
        *t = g.reqs.v[--g.reqs.n];
        return;
    }
}

/* The request of the blocking receive in progress (MPI_Recv): the application never sees it,
 * so it is neither cancelled nor looked up, and a slot of its own keeps the list above off
 * the latency path. A cut counts it if it completes meanwhile. */
static struct {
    MPI_Request req; /* MPI_REQUEST_NULL when no blocking receive waits */
    int cid, counted;
} blocking;

/* During a drain: counts pending receives that have completed, without freeing them.
 * Returns how many watched requests (receives and collectives) are still incomplete. */
static int poll_pending(void)
{
    int open = 0;
    if (blocking.req != MPI_REQUEST_NULL && !blocking.counted) {
        int flag = 0;
        MPI_Status st;
        PMPI_Request_get_status(blocking.req, &flag, &st);
        if (flag) {
            count_recv(blocking.cid, &st);
            blocking.counted = 1;
        }
    }
    for (int i = 0; i < g.reqs.n; i++) {
        tracked_req *t = &g.reqs.v[i];
        if (t->counted)
            continue;
        int flag = 0;
        MPI_Status st;
        PMPI_Request_get_status(t->req, &flag, &st);
        if (!flag) {
            open += t->kind == REQ_COLL;
            continue;
        }
        int cancelled = 0;
        PMPI_Test_cancelled(&st, &cancelled);
        if (t->kind == REQ_RECV && !cancelled)
            count_recv(t->cid, &st);
        t->counted = 1;
    }
    return open;
}

static void forget_req(MPI_Request handle)
{
    for (int i = 0; i < g.reqs.n; i++)
        if (g.reqs.v[i].req == handle) {
            g.reqs.v[i] = g.reqs.v[--g.reqs.n];
            return;
        }
}

/* ---- the layer's buffer of drained messages --------------------------------------------- */

static buffered *find_buffered(int cid, int src, int tag, buffered ***link)
{
    for (buffered **l = &g.head; *l != NULL; l = &(*l)->next) {
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

static buffered *new_buffered(int cid, int src, int tag, int nbytes)
{
    buffered *m = malloc(sizeof *m + (size_t)nbytes);
    if (m == NULL)
        die("out of memory for a drained message");
    *m = (buffered){NULL, cid, src, tag, nbytes};
    return m;
}

static void drain_one(int cid, const MPI_Status *probed)
{
    int nbytes = 0;
    PMPI_Get_count(probed, MPI_BYTE, &nbytes);
    buffered *m = new_buffered(cid, probed->MPI_SOURCE, probed->MPI_TAG, nbytes);
    MPI_Status st;
    if (PMPI_Recv(m->data, nbytes, MPI_BYTE, m->src, m->tag, g.comms[cid].comm, &st) !=
        MPI_SUCCESS)
        die("draining a message failed");
    count_recv(cid, &st);
    g.drained++;
    *g.tail = m;
    g.tail = &m->next;
}

/* Takes a buffered message out of the list (the caller owns it). */
static buffered *unlink_buffered(buffered **link)
{
    buffered *m = *link;
    *link = m->next;
    if (g.tail == &m->next)
        g.tail = link;
    return m;
}

static void fill_status(MPI_Status *st, const buffered *m, MPI_Datatype dt, int elems, int err)
{
    st->MPI_SOURCE = m->src;
    st->MPI_TAG = m->tag;
    st->MPI_ERROR = err;
    PMPI_Status_set_elements(st, dt, elems);
    PMPI_Status_set_cancelled(st, 0);
}

/* Copies a buffered message into the application's buffer and frees it. */
static int deliver_msg(buffered *m, void *buf, int count, MPI_Datatype dt, MPI_Status *st)
{
    int tsize = 0, rc = MPI_SUCCESS;
    PMPI_Type_size(dt, &tsize);
    int elems = tsize > 0 ? m->nbytes / tsize : 0;
    if (elems > count) {
        elems = count;
        rc = MPI_ERR_TRUNCATE;
    }
    int pos = 0;
    if (elems > 0)
        PMPI_Unpack(m->data, m->nbytes, &pos, buf, elems, dt, MPI_COMM_SELF);
    MPI_Status local;
    fill_status(st == MPI_STATUS_IGNORE ? &local : st, m, dt, elems, rc);
    free(m);
    return rc;
}

static int deliver(buffered **link, void *buf, int count, MPI_Datatype dt, MPI_Status *st)
{
    return deliver_msg(unlink_buffered(link), buf, count, dt, st);
}

/* A slot's communicator was freed: drop what it can no longer deliver. */
static void untrack_slot(int cid)
{
    if (cid < 0 || cid >= g.ncomms || g.comms[cid].comm == MPI_COMM_NULL)
        return;
    g.comms[cid].comm = MPI_COMM_NULL;
    int dropped = 0;
    for (buffered **l = &g.head; *l != NULL;) {
        if ((*l)->cid == cid) {
            free(unlink_buffered(l));
            dropped++;
        } else {
            l = &(*l)->next;
        }
    }
    if (dropped)
        fprintf(stderr, "symvirt-pmpi rank %d: a communicator was freed with %d drained "
                        "messages the application never received; dropped\n", g.me, dropped);
}

/* A generalized request that is already complete, carrying a status (Irecv from the buffer). */
static int gq_query(void *extra, MPI_Status *st)
{
    *st = *(MPI_Status *)extra;
    return MPI_SUCCESS;
}
static int gq_free(void *extra)
{
    free(extra);
    return MPI_SUCCESS;
}
static int gq_cancel(void *extra, int complete)
{
    (void)extra;
    (void)complete;
    return MPI_SUCCESS;
}

/* Delivers a buffered message and returns a complete generalized request for it. */
static int deliver_request(buffered *m, void *buf, int count, MPI_Datatype dt, MPI_Request *req)
{
    MPI_Status *st = malloc(sizeof *st);
    if (st == NULL)
        die("out of memory");
    deliver_msg(m, buf, count, dt, st);
    int rc = PMPI_Grequest_start(gq_query, gq_free, gq_cancel, st, req);
    if (rc == MPI_SUCCESS)
        rc = PMPI_Grequest_complete(*req);
    return rc;
}

/* ---- held messages (matched probes) ----------------------------------------------------- */

/* A live zero-byte message to self: its handle stands for a buffered message. */
static MPI_Message hold_handle(void)
{
    MPI_Message h;
    MPI_Request r;
    /* Non-blocking: MPICH's send to self over UCX completes only when it is received. */
    PMPI_Isend(NULL, 0, MPI_BYTE, 0, TAG_HOLD, g.self, &r);
    PMPI_Mprobe(0, TAG_HOLD, g.self, &h, MPI_STATUS_IGNORE);
    PMPI_Request_free(&r);
    return h;
}

static int find_match(MPI_Message msg)
{
    for (int i = 0; i < g.matches.n; i++)
        if (g.matches.v[i].key == msg)
            return i;
    return -1;
}

/* A stand-in handle the application does not hold already: MPI may reuse the value of a
 * handle whose message the layer received while the application still holds it. Handles
 * tried meanwhile stay live, so each try differs; at most one try per held handle fails. */
static MPI_Message fresh_standin(void)
{
    MPI_Message spare[8], k;
    int n = 0;
    while (find_match(k = hold_handle()) >= 0) {
        if (n == 8) {
            for (int i = 0; i < n; i++)
                PMPI_Mrecv(NULL, 0, MPI_BYTE, &spare[i], MPI_STATUS_IGNORE);
            n = 0;
        }
        spare[n++] = k;
    }
    for (int i = 0; i < n; i++)
        PMPI_Mrecv(NULL, 0, MPI_BYTE, &spare[i], MPI_STATUS_IGNORE);
    return k;
}

static void add_match(MPI_Message key, MPI_Message standin, int cid, buffered *m,
                      const MPI_Status *st)
{
    GROW(g.matches);
    matched x = {key, standin, cid, m, 0, 0, 0};
    if (st != NULL) {
        PMPI_Get_count(st, MPI_BYTE, &x.nbytes);
        x.src = st->MPI_SOURCE;
        x.tag = st->MPI_TAG;
    }
    g.matches.v[g.matches.n++] = x;
}

/* Receives the real message of a match into a buffered one (counted as drained). */
static buffered *receive_matched(MPI_Message *msg, int cid, const MPI_Status *probed)
{
    int nbytes = 0;
    PMPI_Get_count(probed, MPI_BYTE, &nbytes);
    buffered *m = new_buffered(cid, probed->MPI_SOURCE, probed->MPI_TAG, nbytes);
    MPI_Status st;
    if (PMPI_Mrecv(m->data, nbytes, MPI_BYTE, msg, &st) != MPI_SUCCESS)
        die("receiving a matched message failed");
    count_recv(cid, &st);
    return m;
}

/* During a cut: messages matched by the application's Mprobe but not received yet are
 * received into the buffer; the application's handle keeps naming them. */
static void drain_matched(void)
{
    for (int i = 0; i < g.matches.n; i++) {
        matched *x = &g.matches.v[i];
        if (x->m != NULL)
            continue;
        MPI_Status probed;
        probed.MPI_SOURCE = x->src;
        probed.MPI_TAG = x->tag;
        PMPI_Status_set_elements(&probed, MPI_BYTE, x->nbytes);
        MPI_Message h = x->key;
        x->m = receive_matched(&h, x->cid, &probed);
        g.drained++;
    }
}

/* ---- persistent requests served from the buffer ------------------------------------------ */

static int take_substitute(MPI_Request h, MPI_Status *st)
{
    for (int i = 0; i < g.subst.n; i++)
        if (g.subst.v[i].req == h) {
            if (st != MPI_STATUS_IGNORE)
                *st = g.subst.v[i].st;
            g.subst.v[i] = g.subst.v[--g.subst.n];
            return 1;
        }
    return 0;
}

static int find_substitute(int n, const MPI_Request *reqs)
{
    if (g.subst.n == 0)
        return -1;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < g.subst.n; j++)
            if (reqs[i] != MPI_REQUEST_NULL && reqs[i] == g.subst.v[j].req)
                return i;
    return -1;
}

static int find_persistent(MPI_Request h)
{
    for (int i = 0; i < g.pers.n; i++)
        if (g.pers.v[i].req == h)
            return i;
    return -1;
}

/* ---- the cut ---------------------------------------------------------------------------- */

static void write_log(const char *kind, uint64_t epoch, const char *text)
{
    if (log_dir == NULL)
        return;
    char path[4096], tmp[4200];
    snprintf(path, sizeof path, "%s/%s-%llu-%d", log_dir, kind, (unsigned long long)epoch, g.me);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (f == NULL)
        return;
    fputs(text, f);
    fclose(f);
    rename(tmp, path);
}

static void log_cut(uint64_t epoch)
{
    size_t cap = (size_t)g.np * 48 + 96;
    char *text = malloc(cap);
    if (text == NULL)
        return;
    size_t n = 0;
    for (int pass = 0; pass < 2; pass++) {
        n += (size_t)snprintf(text + n, cap - n, pass == 0 ? "sent" : "received");
        for (int p = 0; p < g.np; p++)
            n += (size_t)snprintf(text + n, cap - n, " %llu",
                                  (unsigned long long)(pass == 0 ? g.sent[p] : g.recv[p]));
        n += (size_t)snprintf(text + n, cap - n, "\n");
    }
    n += (size_t)snprintf(text + n, cap - n, "drained %llu\n", (unsigned long long)g.drained);
    write_log("cut", epoch, text);
    free(text);
}

/* The last COUNTS message from peer p: {epoch, messages p sent to this rank}. */
static uint64_t *early_slot(int p)
{
    return &early[(size_t)p * 2];
}

/* Receives one COUNTS message (already probed) into the early slot of its sender. */
static void take_counts(const MPI_Status *probed)
{
    int p = probed->MPI_SOURCE;
    PMPI_Recv(early_slot(p), 2, MPI_UINT64_T, p, TAG_COUNTS, g.ctl, MPI_STATUS_IGNORE);
    have_early[p] = 1;
}

static void cut(uint64_t epoch);
static void finish_alignment(void);

/* Answers cuts started by peers (a COUNTS message is waiting). */
static void serve_peers(void)
{
    int flag = 0;
    MPI_Status st;
    PMPI_Iprobe(MPI_ANY_SOURCE, TAG_COUNTS, g.ctl, &flag, &st);
    if (!flag)
        return;
    take_counts(&st);
    uint64_t epoch = early_slot(st.MPI_SOURCE)[0];
    if (epoch > g.served)
        cut(epoch);
    else
        have_early[st.MPI_SOURCE] = 0; /* stale */
}

/* One idle turn of a wait loop. Cheap on the fast path, which is most turns of a receive that
 * waits a microsecond: the agent's request (an atomic load) is looked at every 8 turns and
 * peers' COUNTS probed every 64; the CPU is yielded only after a while (ranks may share
 * cores), so a message that arrives soon is seen at full speed. */
static void idle_check(unsigned long t);

/* Non-blocking collectives the application called that have not completed (see deferred). */
static int ndeferred;
static void progress_deferred(void);

static inline void idle(unsigned long *turns)
{
    unsigned long t = ++*turns;
    if ((t & 7) == 0)
        idle_check(t);
}

static __attribute__((noinline)) void idle_check(unsigned long t)
{
    if (t > 4096)
        sched_yield();
    if (!g.ready || g.closed)
        return;
    if (ndeferred)
        progress_deferred();
    uint64_t e = symvirt_ctl_requested();
    if (e > g.served)
        cut(e);
    else if ((t & 63) == 0)
        serve_peers();
}

/* For single-shot Test calls that found nothing: the same, with a process-wide turn count. */
static void idle_test(void)
{
    static unsigned long turns;
    idle(&turns);
    if (turns > 4096)
        turns = 0; /* no yield inside an application's own polling loop */
}

/* ---- agreement among a communicator's members, point to point ------------------------------
 * The maximum of one value per member, by dissemination: in round k each member sends what it
 * knows to the member 2^k above it and takes the maximum with what the member 2^k below it
 * sent; after ceil(log2 n) rounds every member knows the maximum of all. Messages go over
 * the layer's private communicators (g.align, g.ctl) to the members' ranks there, so
 * nothing of the application's can match them. Not MPI_Iallreduce: Open MPI hooks its
 * non-blocking collective engine into the progress loop on a communicator's first
 * non-blocking collective and keeps it there, which every later MPI call of the application
 * would pay (about 20 instructions a progress turn). */
typedef struct {
    MPI_Comm comm;    /* g.align or g.ctl */
    const int *world; /* member -> rank in comm; NULL: the members are comm's ranks */
    int n, me, tag, round, posted;
    uint64_t value, out, in;
    MPI_Request sreq, rreq;
} agreement;

static agreement agreement_of(MPI_Comm comm, const int *world, int n, int me, int tag,
                              uint64_t value)
{
    return (agreement){.comm = comm, .world = world, .n = n, .me = me, .tag = tag,
                       .value = value, .sreq = MPI_REQUEST_NULL, .rreq = MPI_REQUEST_NULL};
}

/* Bits of a communicator's identity in its alignment tags: as many as MPI_TAG_UB leaves. */
static uint32_t id_mask;

/* The next alignment among t's members, over g.align. Its tag names the communicator and the
 * alignment's number on it (both the same on every member), with 5 bits left for the round:
 * alignments in flight at once (non-blocking collectives, several communicators, in any
 * order across communicators) never take each other's messages, unless 32 are in flight on
 * one communicator or two communicators' identities share their low bits. */
static agreement alignment_of(tracked_comm *t, uint64_t value)
{
    unsigned seq = t->seq++;
    int tag = TAG_ALIGN + (int)(((t->id & id_mask) << 10) | ((seq & 31u) << 5));
    return agreement_of(g.align, t->world, t->size, t->me, tag, value);
}

/* Advances a; 1 once a.value is the maximum over all members. */
static int agree_step(agreement *a)
{
    for (;;) {
        if ((1L << a->round) >= a->n)
            return 1;
        if (!a->posted) {
            int dist = 1 << a->round;
            int to = (a->me + dist) % a->n, from = (a->me - dist % a->n + a->n) % a->n;
            if (a->world != NULL) {
                to = a->world[to];
                from = a->world[from];
            }
            a->out = a->value;
            PMPI_Irecv(&a->in, 1, MPI_UINT64_T, from, a->tag + a->round, a->comm, &a->rreq);
            PMPI_Isend(&a->out, 1, MPI_UINT64_T, to, a->tag + a->round, a->comm, &a->sreq);
            a->posted = 1;
        }
        int done = 0;
        if (a->rreq != MPI_REQUEST_NULL)
            PMPI_Test(&a->rreq, &done, MPI_STATUS_IGNORE);
        if (a->sreq != MPI_REQUEST_NULL)
            PMPI_Test(&a->sreq, &done, MPI_STATUS_IGNORE);
        if (a->rreq != MPI_REQUEST_NULL || a->sreq != MPI_REQUEST_NULL)
            return 0;
        if (a->in > a->value)
            a->value = a->in;
        a->round++;
        a->posted = 0;
    }
}

/* Diagnostics for a drain that does not finish (printed once per cut, to stderr). */
static void dump_drain(uint64_t epoch, const int *have, int open_colls)
{
    fprintf(stderr,
            "symvirt-pmpi rank %d: epoch %llu drain still waiting; %d pending requests, %d "
            "non-blocking collectives open\n",
            g.me, (unsigned long long)epoch, g.reqs.n, open_colls);
    for (int p = 0; p < g.np; p++)
        fprintf(stderr, "  peer %d: counts %s, want %llu, received %llu\n", p,
                have[p] ? "in" : "missing",
                (unsigned long long)(p == g.me ? g.sent[g.me] : early_slot(p)[1]),
                (unsigned long long)g.recv[p]);
    fflush(stderr);
}

/* Windows for one-sided communication that are alive, with the slot of the communicator they
 * were made on (MPI_Win_free is collective over it). While there is one, cuts are refused. */
typedef struct {
    MPI_Win win;
    int cid;
    MPI_Comm comm; /* to see that the slot still holds it */
} window;
static LIST(window, windows);

static void cut(uint64_t epoch)
{
    /* 1. my counts to every peer */
    uint64_t *out = malloc((size_t)g.np * 2 * sizeof(uint64_t));
    MPI_Request *rq = malloc((size_t)g.np * sizeof(MPI_Request));
    int *have = calloc((size_t)g.np, sizeof(int));
    if (out == NULL || rq == NULL || have == NULL)
        die("out of memory");
    int nrq = 0;
    for (int p = 0; p < g.np; p++) {
        if (p == g.me)
            continue;
        out[2 * p] = epoch;
        out[2 * p + 1] = g.sent[p];
        PMPI_Isend(&out[2 * p], 2, MPI_UINT64_T, p, TAG_COUNTS, g.ctl, &rq[nrq++]);
    }
    /* 2. drain until every peer's count is met and my collectives are complete */
    have[g.me] = 1;
    g.drained = 0;
    drain_matched();
    unsigned long spins = 0;
    for (;;) {
        for (int p = 0; p < g.np; p++) {
            if (have[p] || !have_early[p])
                continue;
            uint64_t *e = early_slot(p);
            have_early[p] = 0;
            if (e[0] == epoch)
                have[p] = 1;
            else if (e[0] < epoch)
                continue; /* stale */
            else
                die("COUNTS for a later epoch during a cut");
            have_early[p] = 1; /* keep the counts in the slot for the check below */
        }
        finish_alignment();
        if (ndeferred)
            progress_deferred();
        int open_colls = poll_pending();
        for (int c = 0; c < g.ncomms; c++) {
            for (;;) {
                int flag = 0;
                MPI_Status st;
                if (g.comms[c].comm == MPI_COMM_NULL)
                    break; /* freed */
                PMPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, g.comms[c].comm, &flag, &st);
                if (!flag)
                    break;
                drain_one(c, &st);
            }
        }
        int done = open_colls == 0;
        for (int p = 0; p < g.np; p++) {
            if (!have[p]) {
                done = 0;
                continue;
            }
            uint64_t want = p == g.me ? g.sent[g.me] : early_slot(p)[1];
            if (g.recv[p] < want)
                done = 0;
            else if (g.recv[p] > want)
                die("received more messages than were sent: counting is broken");
        }
        if (done)
            break;
        if (++spins == 2000000)
            dump_drain(epoch, have, open_colls);
        int flag = 0;
        MPI_Status st;
        PMPI_Iprobe(MPI_ANY_SOURCE, TAG_COUNTS, g.ctl, &flag, &st);
        if (flag)
            take_counts(&st);
        else
            sched_yield();
    }
    for (int p = 0; p < g.np; p++)
        have_early[p] = 0;
    /* Keep progressing until every rank has drained: a receiver may still need this rank's
     * help to finish a large (rendezvous) transfer it has already matched. */
    agreement drained = agreement_of(g.ctl, NULL, g.np, g.me, TAG_DRAINED, 0);
    while (!agree_step(&drained)) {
        finish_alignment();
        if (ndeferred)
            progress_deferred();
        poll_pending();
        sched_yield();
    }
    PMPI_Waitall(nrq, rq, MPI_STATUSES_IGNORE);
    free(out);
    free(rq);
    free(have);
    g.served = epoch;

    /* 3. report, wait, resume */
    log_cut(epoch);
    symvirt_interconnect ic;
    memset(&ic, 0, sizeof ic);
    int r;
    if (windows.n > 0) {
        /* One-sided operations are not counted: a cut with a window open may leave some in
         * flight, so this rank tells the agent it cannot be migrated (the host sees the epoch
         * fail, with this reason, and keeps the job where it is). */
        char why[200];
        snprintf(why, sizeof why,
                 "MPI one-sided communication is not covered by the transparent layer (%d "
                 "window%s open)",
                 windows.n, windows.n == 1 ? "" : "s");
        r = symvirt_ctl_unable(epoch, why, quiesce_timeout_ms, &ic);
    } else {
        r = symvirt_ctl_quiesce(epoch, quiesce_timeout_ms, &ic);
    }
    char text[1200];
    if (r == SYMVIRT_RESUMED) {
        if (symvirt_transport_reselect)
            symvirt_transport_reselect(&ic);
        symvirt_ctl_resumed(epoch);
        snprintf(text, sizeof text, "resumed %s\n", ic.json);
    } else if (r == SYMVIRT_ABORTED) {
        snprintf(text, sizeof text, "aborted\n");
    } else {
        snprintf(text, sizeof text, "error %d %s\n", r, symvirt_last_error());
        fprintf(stderr, "symvirt-pmpi rank %d: epoch %llu: %s", g.me, (unsigned long long)epoch,
                text);
    }
    write_log("resumed", epoch, text);
    /* Nobody sends on the (possibly new) transport before every rank is back. On the COUNTS
     * communicator: an alignment reduction may be pending (cut served from align). */
    PMPI_Barrier(g.ctl);
}

#ifdef SYMVIRT_MPI_IMPL_OPENMPI
/* Open MPI's own wait loop (progress until the request's completion flag is set), serving
 * cuts between turns. */
static void progress_until_complete(ompi_request_t *r)
{
    unsigned long turns = 0;
    while (!REQUEST_COMPLETE(r)) {
        opal_progress();
        idle(&turns);
    }
}
#endif

/* Waits for one request, serving cuts meanwhile: each implementation's own wait loop, plus
 * one turn of idle(). */
static int wait_serving(MPI_Request *req, MPI_Status *st)
{
#if defined(SYMVIRT_MPI_IMPL_OPENMPI)
    /* An inactive persistent request, or the null request, completes at once in PMPI_Wait. */
    ompi_request_t *r = *req;
    if (r != MPI_REQUEST_NULL && r->req_state != OMPI_REQUEST_INACTIVE)
        progress_until_complete(r);
    return PMPI_Wait(req, st);
#elif defined(SYMVIRT_MPI_IMPL_MPICH)
    unsigned long turns = 0;
    /* MPICH's MPI_Test runs its progress engine even for a complete request (~470
     * instructions, more than a whole blocking send); MPI_Request_get_status looks first,
     * and MPI_Wait frees a complete request without progress. */
    for (;;) {
        int flag = 0;
        int rc = PMPI_Request_get_status(*req, &flag, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS)
            return rc;
        if (flag)
            return PMPI_Wait(req, st);
        idle(&turns);
    }
#else
    unsigned long turns = 0;
    for (;;) {
        int flag = 0;
        int rc = PMPI_Test(req, &flag, st);
        if (rc != MPI_SUCCESS || flag)
            return rc;
        idle(&turns);
    }
#endif
}

#ifdef SYMVIRT_MPI_IMPL_MPICH
/* Complete requests of the layer's own receives, not freed yet (see wait_own_receive). */
#define SPENT_BATCH 64
static struct {
    MPI_Request v[SPENT_BATCH];
    int n;
} spent;

static void free_spent(void)
{
    if (spent.n > 0)
        PMPI_Waitall(spent.n, spent.v, MPI_STATUSES_IGNORE);
    spent.n = 0;
}
#endif

/* Waits for the layer's own receive request (the blocking receive's, a plain point-to-point
 * receive that is neither persistent nor generalized) and frees it. */
static int wait_own_receive(MPI_Request *req, MPI_Status *st)
{
#if defined(SYMVIRT_MPI_IMPL_OPENMPI)
    /* What Open MPI's MPI_Wait does for such a request once complete, without its argument
     * checks and dispatch (about 80 instructions a message); an error still goes through
     * PMPI_Wait, which raises it through the communicator's error handler. */
    ompi_request_t *r = *req;
    progress_until_complete(r);
    if (r->req_status.MPI_ERROR != MPI_SUCCESS)
        return PMPI_Wait(req, st);
    *st = r->req_status;
    return ompi_request_free(req);
#elif defined(SYMVIRT_MPI_IMPL_MPICH)
    /* MPI_Request_get_status gives a complete request's status (an error as its return code)
     * without freeing it, and MPICH 4.0's MPI_Wait on it then costs about 200 instructions:
     * complete requests are freed in batches, by one MPI_Waitall (see free_spent). An error
     * goes through PMPI_Wait, which raises it and frees the request. */
    unsigned long turns = 0;
    for (;;) {
        int flag = 0;
        if (PMPI_Request_get_status(*req, &flag, st) != MPI_SUCCESS)
            return PMPI_Wait(req, st);
        if (flag)
            break;
        idle(&turns);
    }
    spent.v[spent.n++] = *req;
    *req = MPI_REQUEST_NULL;
    if (spent.n == SPENT_BATCH)
        free_spent();
    return MPI_SUCCESS;
#else
    return wait_serving(req, st);
#endif
}

/* A collective (or communicator creation or free) to run once its members agreed: its
 * arguments and a function that calls PMPI with them. It may run inside a cut (see align). */
typedef struct coll {
    int (*run)(struct coll *);
    int cid; /* its communicator's slot */
    const void *s;
    void *r;
    int i1, i2, i3, root;
    MPI_Datatype t1, t2;
    MPI_Op op;
    const int *v1, *v2, *v3, *v4;
    const MPI_Datatype *w1, *w2; /* per-peer datatypes (the w variants) */
    const MPI_Aint *a1, *a2;     /* byte displacements (neighborhood w variants) */
    MPI_Comm comm, *newcomm; /* newcomm: a communicator it makes (tracked), or frees */
    MPI_Info info;
    MPI_Group group;
    MPI_Request *req; /* non-blocking: watched once started */
    uint32_t child_id; /* MPI_Comm_idup: the identity its communicator gets on completion */
    MPI_Aint size;      /* window creation */
    void *baseptr;
    MPI_Win *win; /* a window it makes, or frees */
} coll;

/* Runs c and observes what it made: a communicator, or a collective a cut must wait for. */
static int run_free(coll *c);

/* Starts observing a communicator made from slot parent (-1: not observed) under identity id
 * (see tracked_comm). */
static void adopt(MPI_Comm made, int parent, uint32_t id)
{
    int nc = track_comm(made);
    if (nc >= 0 && parent >= 0)
        g.comms[nc].id = id;
}

static int perform(coll *c)
{
    /* Every member of the parent counts the child when the call starts, also one that gets
     * MPI_COMM_NULL, so the members of a new communicator name it alike. */
    int makes = c->newcomm != NULL && c->run != run_free;
    uint32_t id = 0;
    if (makes && c->cid >= 0) {
        tracked_comm *parent = &g.comms[c->cid];
        id = (parent->id * 16777619u) ^ (2654435761u * ++parent->children);
    }
    int rc = c->run(c);
    if (rc != MPI_SUCCESS || !g.ready || g.closed)
        return rc;
    if (makes && c->req == NULL)
        adopt(*c->newcomm, c->cid, id);
    else if (makes)
        c->child_id = id; /* MPI_Comm_idup: the communicator exists once the request completes */
    if (c->req != NULL && c->cid >= 0)
        track_req(*c->req, c->cid, REQ_COLL);
    return rc;
}

/* The alignment in progress on this rank (at most one: collectives are called one at a time),
 * so that a cut answered while it is pending can finish it: when the members agree on "no
 * cut" during the cut, some may already be inside the collective, so this rank runs it there
 * (its members all agreed, so all of them run it, inside the cut or not). */
typedef struct {
    agreement a;      /* intracommunicators */
    MPI_Request req;  /* intercommunicators: MPI_Iallreduce on the communicator itself */
    MPI_Comm comm;
    int inter, round, resolved, ran, rc;
    uint64_t mine, second, agreed;
    coll *c;
} pending_align;

static pending_align *aligning;

/* Advances an alignment; 1 once its agreed value is known. */
static int align_step(pending_align *p)
{
    if (p->resolved)
        return 1;
    if (!p->inter) {
        if (!agree_step(&p->a))
            return 0;
        p->agreed = p->a.value;
        p->resolved = 1;
        return 1;
    }
    int flag = 0;
    PMPI_Test(&p->req, &flag, MPI_STATUS_IGNORE);
    if (!flag)
        return 0;
    /* On an intercommunicator each group gets the other's maximum: a second round gives both
     * groups the maximum of all. */
    if (p->inter && p->round == 1) {
        p->round = 2;
        p->second = p->agreed > p->mine ? p->agreed : p->mine;
        PMPI_Iallreduce(&p->second, &p->agreed, 1, MPI_UINT64_T, MPI_MAX, p->comm, &p->req);
        return 0;
    }
    p->resolved = 1;
    return 1;
}

/* Inside a cut: finishes the pending alignment's collective if its members agreed on it. */
static void finish_alignment(void)
{
    pending_align *p = aligning;
    if (p == NULL || p->ran || !align_step(p) || p->agreed != 0 || p->c == NULL)
        return;
    p->ran = 1;
    p->rc = perform(p->c);
}

static void start_deferred_on(int cid);

/* Agreement before a collective (or finalize: c NULL) on the communicator in slot cid, then
 * the collective; see the top. */
static int align(int cid, coll *c)
{
    if (cid < 0)
        return c != NULL ? perform(c) : MPI_SUCCESS;
    if (aligning != NULL)
        die("collective called while another one is being aligned (threads?)");
    start_deferred_on(cid);
    for (;;) {
        tracked_comm *t = &g.comms[cid];
        pending_align p = {.comm = t->comm, .inter = t->inter, .round = 1, .c = c};
        uint64_t want = symvirt_ctl_requested();
        p.mine = want > g.served ? want : 0;
        if (t->inter)
            PMPI_Iallreduce(&p.mine, &p.agreed, 1, MPI_UINT64_T, MPI_MAX, p.comm, &p.req);
        else
            p.a = alignment_of(t, p.mine);
        aligning = &p;
        for (unsigned long turns = 1; !align_step(&p); turns++) {
            /* Never start a cut here (peers may already be past this point); answer one. A
             * peer may be waiting for a non-blocking collective this rank has to start. */
            progress_deferred();
            if ((turns & 63) == 0)
                serve_peers();
            if (turns > 4096)
                sched_yield();
        }
        aligning = NULL;
        if (p.ran)
            return p.rc;
        /* Decide from the agreed value alone: identical on every member. A rank may already
         * have made this cut (answering a peer while its reduction was pending); every member
         * then aligns again, so all leave through the same round. */
        if (p.agreed == 0)
            return c != NULL ? perform(c) : MPI_SUCCESS;
        if (p.agreed > g.served)
            cut(p.agreed);
    }
}

/* ---- non-blocking collectives: started once every member has called them -----------------
 * A non-blocking collective on an intracommunicator returns at once with a generalized
 * request. The layer starts the real collective when every member has called it (an
 * alignment with nothing to agree on, progressed wherever the layer progresses: wait loops,
 * test calls, alignments, cuts), in the order the members called collectives on that
 * communicator, and completes the application's request with the real one's status. So no
 * rank waits at the start of a non-blocking collective (a program may keep receiving while
 * it is pending: the NBX pattern), and a cut only ever waits for collectives that every
 * member has started: each member in a cut starts those that became ready. */
typedef struct deferred {
    struct deferred *next; /* in the order the application called them */
    coll c;                /* its arguments; c.req points at real once started */
    MPI_Request app;       /* the generalized request the application holds */
    MPI_Request real;
    MPI_Status *st;        /* the real one's status, for the application's request */
    agreement a;
    int started;
} deferred;

static deferred *deferred_head;
static deferred **deferred_tail = &deferred_head;

static int deferred_query(void *extra, MPI_Status *st)
{
    *st = *(MPI_Status *)extra;
    return st->MPI_ERROR;
}

/* Whether a non-blocking collective called on slot cid before d (or at all, d NULL) has not
 * started yet. */
static int unstarted_before(int cid, const deferred *d)
{
    for (const deferred *e = deferred_head; e != NULL && e != d; e = e->next)
        if (!e->started && e->c.cid == cid)
            return 1;
    return 0;
}

static void finish_deferred(deferred *d, int err)
{
    d->st->MPI_ERROR = err;
    PMPI_Grequest_complete(d->app);
}

/* Starts the collectives every member has called, completes those MPI has completed. */
static void progress_deferred(void)
{
    static int busy; /* perform() and PMPI calls never come back here; be sure */
    if (busy)
        return;
    busy = 1;
    deferred **link = &deferred_head;
    while (*link != NULL) {
        deferred *d = *link;
        if (!d->started && agree_step(&d->a) && !unstarted_before(d->c.cid, d)) {
            d->started = 1;
            d->c.req = &d->real;
            int rc = perform(&d->c);
            if (rc != MPI_SUCCESS) {
                d->real = MPI_REQUEST_NULL;
                finish_deferred(d, rc);
            }
        }
        if (d->started && d->real != MPI_REQUEST_NULL) {
            int flag = 0;
            MPI_Request h = d->real;
            int rc = PMPI_Test(&d->real, &flag, d->st);
            if (rc != MPI_SUCCESS || flag) {
                forget_req(h);
                d->real = MPI_REQUEST_NULL;
                if (rc == MPI_SUCCESS && d->c.newcomm != NULL)
                    adopt(*d->c.newcomm, d->c.cid, d->c.child_id); /* before the app sees it */
                finish_deferred(d, rc != MPI_SUCCESS ? rc : d->st->MPI_ERROR);
            }
        }
        if (d->started && d->real == MPI_REQUEST_NULL) {
            *link = d->next;
            if (deferred_tail == &d->next)
                deferred_tail = link;
            free(d);
            ndeferred--;
            continue;
        }
        link = &d->next;
    }
    busy = 0;
}

static int deferred_names(int cid)
{
    for (const deferred *d = deferred_head; d != NULL; d = d->next)
        if (d->c.cid == cid)
            return 1;
    return 0;
}

static int is_deferred(MPI_Request h)
{
    for (const deferred *d = deferred_head; d != NULL; d = d->next)
        if (d->app == h)
            return 1;
    return 0;
}

/* A non-blocking collective: deferred on a tracked intracommunicator, else aligned and started
 * at once (intercommunicators, communicators the layer does not observe). */
static int nonblocking(coll *c, MPI_Request *req)
{
    c->cid = CID(c->comm);
    if (c->cid < 0 || g.comms[c->cid].inter) {
        c->req = req;
        return align(c->cid, c);
    }
    deferred *d = calloc(1, sizeof *d);
    MPI_Status *st = calloc(1, sizeof *st);
    if (d == NULL || st == NULL)
        die("out of memory");
    d->c = *c;
    d->real = MPI_REQUEST_NULL;
    d->st = st;
    d->a = alignment_of(&g.comms[c->cid], 0);
    int rc = PMPI_Grequest_start(deferred_query, gq_free, gq_cancel, st, &d->app);
    if (rc != MPI_SUCCESS) {
        free(d);
        free(st);
        return rc;
    }
    *req = d->app;
    *deferred_tail = d;
    deferred_tail = &d->next;
    ndeferred++;
    progress_deferred();
    return MPI_SUCCESS;
}

/* Before a blocking collective on slot cid: the non-blocking ones called on it earlier start
 * first (collectives start in the same order on every member). Answers cuts meanwhile. */
static void start_deferred_on(int cid)
{
    for (unsigned long turns = 1; unstarted_before(cid, NULL); turns++) {
        progress_deferred();
        if ((turns & 63) == 0)
            serve_peers();
        if (turns > 4096)
            sched_yield();
    }
}

/* ---- init and finalize ------------------------------------------------------------------ */

static void setup(void)
{
    PMPI_Comm_rank(MPI_COMM_WORLD, &g.me);
    PMPI_Comm_size(MPI_COMM_WORLD, &g.np);
    /* The private communicators span MPI_COMM_WORLD. Made with MPI_Comm_create_group, not
     * MPI_Comm_dup: Open MPI's dup agrees on the new context with a non-blocking allreduce on
     * MPI_COMM_WORLD, which hooks its non-blocking collective engine into every later
     * progress turn of the application (about 20 instructions each); create_group agrees
     * point to point. Its tag cannot meet the application's messages: none exist yet. */
    MPI_Group world;
    PMPI_Comm_group(MPI_COMM_WORLD, &world);
    PMPI_Comm_create_group(MPI_COMM_WORLD, world, 1, &g.ctl);
    PMPI_Comm_create_group(MPI_COMM_WORLD, world, 2, &g.align);
    PMPI_Group_free(&world);
    PMPI_Comm_dup(MPI_COMM_SELF, &g.self);
    PMPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, on_comm_delete, &g.keyval, NULL);
    blocking.req = MPI_REQUEST_NULL;
    g.sent = calloc((size_t)g.np, sizeof(uint64_t));
    g.recv = calloc((size_t)g.np, sizeof(uint64_t));
    early = calloc((size_t)g.np * 2, sizeof(uint64_t));
    have_early = calloc((size_t)g.np, sizeof(int));
    if (g.sent == NULL || g.recv == NULL || early == NULL || have_early == NULL)
        die("out of memory");
    if (track_comm(MPI_COMM_WORLD) != 0)
        die("cannot track MPI_COMM_WORLD");
    g.comms[0].id = 1;
    int *tag_ub = NULL, has_ub = 0;
    PMPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &tag_ub, &has_ub);
    long ub = has_ub && tag_ub != NULL ? *tag_ub : 32767;
    id_mask = 0;
    while (TAG_ALIGN + (((long)id_mask << 1 | 1) << 10) + 1023 <= ub && id_mask < 0xffffu)
        id_mask = id_mask << 1 | 1;
    log_dir = getenv("SYMVIRT_CUT_LOG");
    quiesce_timeout_ms = env_ms("SYMVIRT_QUIESCE_TIMEOUT_MS", 600000);
    int rc = symvirt_ctl_open((uint32_t)g.me, NULL, env_ms("SYMVIRT_CONNECT_TIMEOUT_MS", 10000));
    if (rc != SYMVIRT_CONTINUE)
        fprintf(stderr, "symvirt-pmpi rank %d: no guest agent (%s); running without migration\n",
                g.me, symvirt_last_error());
    g.ready = 1;
}

int MPI_Init(int *argc, char ***argv)
{
    int rc = PMPI_Init(argc, argv);
    if (rc == MPI_SUCCESS)
        setup();
    return rc;
}

int MPI_Init_thread(int *argc, char ***argv, int required, int *provided)
{
    int rc = PMPI_Init_thread(argc, argv, required, provided);
    if (rc == MPI_SUCCESS)
        setup();
    return rc;
}

int MPI_Finalize(void)
{
    if (g.ready && !g.closed) {
        align(0, NULL);
#ifdef SYMVIRT_MPI_IMPL_MPICH
        free_spent();
#endif
        /* From here no rank serves cuts: a request now fails the epoch at the agent. */
        g.closed = 1;
        symvirt_ctl_close();
        PMPI_Comm_free(&g.ctl);
        PMPI_Comm_free(&g.align);
        PMPI_Comm_free(&g.self);
    }
    return PMPI_Finalize();
}

/* ---- communicator creation: aligned on the parent, the new one tracked at once ------------
 * At once, so a message sent on it is drained even before this rank first uses it. */

#define RUN(name, expr)                                                                        \
    static int name(coll *c)                                                                   \
    {                                                                                          \
        return expr;                                                                           \
    }

/* A non-blocking collective on comm (see deferred), its request returned in req. */
#define NONBLOCKING(comm_, ...)                                                                \
    do {                                                                                       \
        coll c_ = {.run = __VA_ARGS__, .comm = comm_};                                         \
        return nonblocking(&c_, req);                                                          \
    } while (0)

/* Aligns on comm, then runs `run` with the arguments set in the initializer list. */
#define COLLECTIVE(comm_, run_, ...)                                                           \
    do {                                                                                       \
        coll c_ = {.run = run_, .comm = comm_, __VA_ARGS__};                                   \
        c_.cid = CID(comm_);                                                                   \
        return align(c_.cid, &c_);                                                             \
    } while (0)

RUN(run_dup, PMPI_Comm_dup(c->comm, c->newcomm))
RUN(run_dup_info, PMPI_Comm_dup_with_info(c->comm, c->info, c->newcomm))
RUN(run_split, PMPI_Comm_split(c->comm, c->i1, c->i2, c->newcomm))
RUN(run_split_type, PMPI_Comm_split_type(c->comm, c->i1, c->i2, c->info, c->newcomm))
RUN(run_create, PMPI_Comm_create(c->comm, c->group, c->newcomm))
RUN(run_cart, PMPI_Cart_create(c->comm, c->i1, c->v1, c->v2, c->i2, c->newcomm))
RUN(run_cart_sub, PMPI_Cart_sub(c->comm, c->v1, c->newcomm))
RUN(run_graph, PMPI_Graph_create(c->comm, c->i1, c->v1, c->v2, c->i2, c->newcomm))
RUN(run_dist_adj, PMPI_Dist_graph_create_adjacent(c->comm, c->i1, c->v1, c->v2, c->i2, c->v3,
                                                  c->v4, c->info, c->i3, c->newcomm))
RUN(run_dist, PMPI_Dist_graph_create(c->comm, c->i1, c->v1, c->v2, c->v3, c->v4, c->info, c->i2,
                                     c->newcomm))
RUN(run_merge, PMPI_Intercomm_merge(c->comm, c->i1, c->newcomm))

int MPI_Comm_dup(MPI_Comm comm, MPI_Comm *newcomm)
{
    COLLECTIVE(comm, run_dup, .newcomm = newcomm);
}

int MPI_Comm_dup_with_info(MPI_Comm comm, MPI_Info info, MPI_Comm *newcomm)
{
    COLLECTIVE(comm, run_dup_info, .info = info, .newcomm = newcomm);
}

int MPI_Comm_split(MPI_Comm comm, int color, int key, MPI_Comm *newcomm)
{
    COLLECTIVE(comm, run_split, .i1 = color, .i2 = key, .newcomm = newcomm);
}

int MPI_Comm_split_type(MPI_Comm comm, int type, int key, MPI_Info info, MPI_Comm *newcomm)
{
    COLLECTIVE(comm, run_split_type, .i1 = type, .i2 = key, .info = info, .newcomm = newcomm);
}

int MPI_Comm_create(MPI_Comm comm, MPI_Group group, MPI_Comm *newcomm)
{
    COLLECTIVE(comm, run_create, .group = group, .newcomm = newcomm);
}

int MPI_Cart_create(MPI_Comm comm, int ndims, const int dims[], const int periods[],
                    int reorder, MPI_Comm *newcomm)
{
    COLLECTIVE(comm, run_cart, .i1 = ndims, .v1 = dims, .v2 = periods, .i2 = reorder,
               .newcomm = newcomm);
}

int MPI_Cart_sub(MPI_Comm comm, const int remain[], MPI_Comm *newcomm)
{
    COLLECTIVE(comm, run_cart_sub, .v1 = remain, .newcomm = newcomm);
}

int MPI_Graph_create(MPI_Comm comm, int nnodes, const int index[], const int edges[],
                     int reorder, MPI_Comm *newcomm)
{
    COLLECTIVE(comm, run_graph, .i1 = nnodes, .v1 = index, .v2 = edges, .i2 = reorder,
               .newcomm = newcomm);
}

int MPI_Dist_graph_create_adjacent(MPI_Comm comm, int indeg, const int srcs[],
                                   const int sw[], int outdeg, const int dsts[],
                                   const int dw[], MPI_Info info, int reorder,
                                   MPI_Comm *newcomm)
{
    COLLECTIVE(comm, run_dist_adj, .i1 = indeg, .v1 = srcs, .v2 = sw, .i2 = outdeg,
               .v3 = dsts, .v4 = dw, .info = info, .i3 = reorder, .newcomm = newcomm);
}

int MPI_Dist_graph_create(MPI_Comm comm, int n, const int srcs[], const int degrees[],
                          const int dsts[], const int weights[], MPI_Info info, int reorder,
                          MPI_Comm *newcomm)
{
    COLLECTIVE(comm, run_dist, .i1 = n, .v1 = srcs, .v2 = degrees, .v3 = dsts, .v4 = weights,
               .info = info, .i2 = reorder, .newcomm = newcomm);
}

int MPI_Intercomm_merge(MPI_Comm comm, int high, MPI_Comm *newcomm)
{
    COLLECTIVE(comm, run_merge, .i1 = high, .newcomm = newcomm);
}

/* Collective over a group only, or over two groups: not aligned (documented). */
int MPI_Comm_create_group(MPI_Comm comm, MPI_Group group, int tag, MPI_Comm *newcomm)
{
    int rc = PMPI_Comm_create_group(comm, group, tag, newcomm);
    if (rc == MPI_SUCCESS && g.ready && !g.closed)
        track_comm(*newcomm);
    return rc;
}

int MPI_Intercomm_create(MPI_Comm local, int lleader, MPI_Comm peer, int rleader, int tag,
                         MPI_Comm *newcomm)
{
    int rc = PMPI_Intercomm_create(local, lleader, peer, rleader, tag, newcomm);
    if (rc == MPI_SUCCESS && g.ready && !g.closed)
        track_comm(*newcomm);
    return rc;
}

RUN(run_idup, PMPI_Comm_idup(c->comm, c->newcomm, c->req))

/* Non-blocking like the collectives (see deferred); the communicator is observed once the
 * request completes, before the application can use it. */
int MPI_Comm_idup(MPI_Comm comm, MPI_Comm *newcomm, MPI_Request *req)
{
    NONBLOCKING(comm, run_idup, .newcomm = newcomm);
}

static int run_free(coll *c)
{
    return PMPI_Comm_free(c->newcomm);
}

/* ---- one-sided communication: windows are observed, not their operations -----------------
 * Creating and freeing a window and MPI_Win_fence are collective, so aligned like other
 * collectives (a rank never waits in one for a peer that is in a cut); while a window is alive
 * this rank refuses cuts (see cut). */

/* Where win is in the list, -1 if the layer did not see it made. */
static int window_index(MPI_Win win)
{
    for (int i = 0; i < windows.n; i++)
        if (windows.v[i].win == win)
            return i;
    return -1;
}

/* The slot a known window's collectives align on: its communicator's, while that one is
 * observed (else -1: not aligned). */
static int window_slot(int index)
{
    const window *w = &windows.v[index];
    return w->cid >= 0 && g.comms[w->cid].comm == w->comm ? w->cid : -1;
}

static int make_window(coll *c)
{
    int rc = align(c->cid, c);
    if (rc == MPI_SUCCESS && *c->win != MPI_WIN_NULL && g.ready && !g.closed) {
        GROW(windows);
        windows.v[windows.n++] = (window){*c->win, c->cid, c->comm};
    }
    return rc;
}

RUN(run_win_create, PMPI_Win_create(c->r, c->size, c->i1, c->info, c->comm, c->win))
RUN(run_win_allocate, PMPI_Win_allocate(c->size, c->i1, c->info, c->comm, c->baseptr, c->win))
RUN(run_win_allocate_shared,
    PMPI_Win_allocate_shared(c->size, c->i1, c->info, c->comm, c->baseptr, c->win))
RUN(run_win_create_dynamic, PMPI_Win_create_dynamic(c->info, c->comm, c->win))
RUN(run_win_free, PMPI_Win_free(c->win))
RUN(run_win_fence, PMPI_Win_fence(c->i1, *c->win))

int MPI_Win_create(void *base, MPI_Aint size, int disp_unit, MPI_Info info, MPI_Comm comm,
                   MPI_Win *win)
{
    coll c = {.run = run_win_create, .comm = comm, .r = base, .size = size, .i1 = disp_unit,
              .info = info, .win = win};
    c.cid = CID(comm);
    return make_window(&c);
}

int MPI_Win_allocate(MPI_Aint size, int disp_unit, MPI_Info info, MPI_Comm comm, void *baseptr,
                     MPI_Win *win)
{
    coll c = {.run = run_win_allocate, .comm = comm, .size = size, .i1 = disp_unit,
              .info = info, .baseptr = baseptr, .win = win};
    c.cid = CID(comm);
    return make_window(&c);
}

int MPI_Win_allocate_shared(MPI_Aint size, int disp_unit, MPI_Info info, MPI_Comm comm,
                            void *baseptr, MPI_Win *win)
{
    coll c = {.run = run_win_allocate_shared, .comm = comm, .size = size, .i1 = disp_unit,
              .info = info, .baseptr = baseptr, .win = win};
    c.cid = CID(comm);
    return make_window(&c);
}

int MPI_Win_create_dynamic(MPI_Info info, MPI_Comm comm, MPI_Win *win)
{
    coll c = {.run = run_win_create_dynamic, .comm = comm, .info = info, .win = win};
    c.cid = CID(comm);
    return make_window(&c);
}

int MPI_Win_free(MPI_Win *win)
{
    MPI_Win freed = *win;
    int i = window_index(freed);
    if (i < 0)
        return PMPI_Win_free(win);
    coll c = {.run = run_win_free, .win = win, .cid = window_slot(i)};
    int rc = align(c.cid, &c); /* a cut meanwhile still sees the window open */
    i = window_index(freed);
    if (rc == MPI_SUCCESS && i >= 0)
        windows.v[i] = windows.v[--windows.n];
    return rc;
}

int MPI_Win_fence(int assert_, MPI_Win win)
{
    int i = window_index(win);
    coll c = {.run = run_win_fence, .win = &win, .i1 = assert_, .cid = i < 0 ? -1 : window_slot(i)};
    return align(c.cid, &c);
}

int MPI_Comm_free(MPI_Comm *comm)
{
    /* Collective: aligned (but not on WORLD, which cannot be freed: MPI reports that). The
     * slot is released by the attribute's delete callback (which also runs when the
     * communicator is freed by a path that is not wrapped). */
    coll c = {.run = run_free, .comm = *comm, .newcomm = comm};
    c.cid = CID(*comm);
    return align(c.cid > 0 ? c.cid : -1, &c);
}

/* ---- point to point --------------------------------------------------------------------- */

int MPI_Isend(const void *buf, int count, MPI_Datatype dt, int dest, int tag, MPI_Comm comm,
              MPI_Request *req)
{
    count_send(CID(comm), dest);
    return PMPI_Isend(buf, count, dt, dest, tag, comm, req);
}

int MPI_Issend(const void *buf, int count, MPI_Datatype dt, int dest, int tag, MPI_Comm comm,
               MPI_Request *req)
{
    count_send(CID(comm), dest);
    return PMPI_Issend(buf, count, dt, dest, tag, comm, req);
}

int MPI_Irsend(const void *buf, int count, MPI_Datatype dt, int dest, int tag, MPI_Comm comm,
               MPI_Request *req)
{
    count_send(CID(comm), dest);
    return PMPI_Irsend(buf, count, dt, dest, tag, comm, req);
}

int MPI_Ibsend(const void *buf, int count, MPI_Datatype dt, int dest, int tag, MPI_Comm comm,
               MPI_Request *req)
{
    count_send(CID(comm), dest);
    return PMPI_Ibsend(buf, count, dt, dest, tag, comm, req);
}

int MPI_Bsend(const void *buf, int count, MPI_Datatype dt, int dest, int tag, MPI_Comm comm)
{
    count_send(CID(comm), dest);
    return PMPI_Bsend(buf, count, dt, dest, tag, comm); /* completes locally */
}

/* A blocking send stays blocking (no request, no progress loop: the layer's cost on the
 * latency path). It cannot hold up a cut: it only waits for its receiver to match it, and a
 * receiver in a cut receives every unexpected message on every communicator into the buffer
 * (step 2 above), which completes the send; the sender then joins the cut at its next MPI
 * call, as it would had the request come while it computed. */
static int send_counted(const void *buf, int count, MPI_Datatype dt, int dest, int tag,
                        MPI_Comm comm, int synchronous)
{
    count_send(CID(comm), dest);
    return synchronous ? PMPI_Ssend(buf, count, dt, dest, tag, comm)
                       : PMPI_Send(buf, count, dt, dest, tag, comm);
}

int MPI_Send(const void *buf, int count, MPI_Datatype dt, int dest, int tag, MPI_Comm comm)
{
    return send_counted(buf, count, dt, dest, tag, comm, 0);
}

int MPI_Ssend(const void *buf, int count, MPI_Datatype dt, int dest, int tag, MPI_Comm comm)
{
    return send_counted(buf, count, dt, dest, tag, comm, 1);
}

int MPI_Rsend(const void *buf, int count, MPI_Datatype dt, int dest, int tag, MPI_Comm comm)
{
    return send_counted(buf, count, dt, dest, tag, comm, 0);
}

int MPI_Irecv(void *buf, int count, MPI_Datatype dt, int src, int tag, MPI_Comm comm,
              MPI_Request *req)
{
    int cid = CID(comm);
    if (cid < 0 || src == MPI_PROC_NULL)
        return PMPI_Irecv(buf, count, dt, src, tag, comm, req);
    buffered **link;
    if (find_buffered(cid, src, tag, &link) != NULL)
        return deliver_request(unlink_buffered(link), buf, count, dt, req);
    int rc = PMPI_Irecv(buf, count, dt, src, tag, comm, req);
    if (rc == MPI_SUCCESS)
        track_req(*req, cid, REQ_RECV);
    return rc;
}

int MPI_Recv(void *buf, int count, MPI_Datatype dt, int src, int tag, MPI_Comm comm,
             MPI_Status *status)
{
    int cid = CID(comm);
    if (cid < 0 || src == MPI_PROC_NULL)
        return PMPI_Recv(buf, count, dt, src, tag, comm, status);
    buffered **link;
    if (find_buffered(cid, src, tag, &link) != NULL)
        return deliver(link, buf, count, dt, status);
    MPI_Request r;
    int rc = PMPI_Irecv(buf, count, dt, src, tag, comm, &r);
    if (rc != MPI_SUCCESS)
        return rc;
    if (blocking.req != MPI_REQUEST_NULL)
        die("blocking receive called while another one waits (threads?)");
    blocking.req = r;
    blocking.cid = cid;
    blocking.counted = 0;
    MPI_Status local;
    MPI_Status *st = status == MPI_STATUS_IGNORE ? &local : status;
    rc = wait_own_receive(&r, st);
    if (rc == MPI_SUCCESS && !blocking.counted)
        count_recv(cid, st);
    blocking.req = MPI_REQUEST_NULL;
    return rc;
}

int MPI_Iprobe(int src, int tag, MPI_Comm comm, int *flag, MPI_Status *status)
{
    int cid = CID(comm);
    if (cid >= 0 && src != MPI_PROC_NULL) {
        buffered *m = find_buffered(cid, src, tag, NULL);
        if (m != NULL) {
            *flag = 1;
            if (status != MPI_STATUS_IGNORE)
                fill_status(status, m, MPI_BYTE, m->nbytes, MPI_SUCCESS);
            return MPI_SUCCESS;
        }
    }
    int rc = PMPI_Iprobe(src, tag, comm, flag, status);
    if (rc == MPI_SUCCESS && !*flag && cid >= 0)
        idle_test();
    return rc;
}

int MPI_Probe(int src, int tag, MPI_Comm comm, MPI_Status *status)
{
    int cid = CID(comm);
    if (cid < 0 || src == MPI_PROC_NULL)
        return PMPI_Probe(src, tag, comm, status);
    for (;;) {
        int flag = 0;
        /* A cut served inside may have buffered the message: look there again each time. */
        int rc = MPI_Iprobe(src, tag, comm, &flag, status);
        if (rc != MPI_SUCCESS || flag)
            return rc;
    }
}

int MPI_Sendrecv(const void *sbuf, int scount, MPI_Datatype sdt, int dest, int stag, void *rbuf,
                 int rcount, MPI_Datatype rdt, int src, int rtag, MPI_Comm comm,
                 MPI_Status *status)
{
    if (CID(comm) < 0)
        return PMPI_Sendrecv(sbuf, scount, sdt, dest, stag, rbuf, rcount, rdt, src, rtag, comm,
                             status);
    MPI_Request rq[2];
    MPI_Status st[2];
    int rc = MPI_Irecv(rbuf, rcount, rdt, src, rtag, comm, &rq[0]);
    if (rc == MPI_SUCCESS)
        rc = MPI_Isend(sbuf, scount, sdt, dest, stag, comm, &rq[1]);
    if (rc == MPI_SUCCESS)
        rc = MPI_Waitall(2, rq, st);
    if (status != MPI_STATUS_IGNORE)
        *status = st[0];
    return rc;
}

/* Through a packed copy of the incoming message, so the send may leave buf first. */
int MPI_Sendrecv_replace(void *buf, int count, MPI_Datatype dt, int dest, int stag, int src,
                         int rtag, MPI_Comm comm, MPI_Status *status)
{
    if (CID(comm) < 0)
        return PMPI_Sendrecv_replace(buf, count, dt, dest, stag, src, rtag, comm, status);
    int psize = 0, tsize = 0;
    PMPI_Pack_size(count, dt, comm, &psize);
    PMPI_Type_size(dt, &tsize);
    char *tmp = malloc((size_t)(psize > 0 ? psize : 1));
    if (tmp == NULL)
        die("out of memory");
    MPI_Request rq[2];
    MPI_Status st[2];
    int rc = MPI_Irecv(tmp, psize, MPI_BYTE, src, rtag, comm, &rq[0]);
    if (rc == MPI_SUCCESS)
        rc = MPI_Isend(buf, count, dt, dest, stag, comm, &rq[1]);
    if (rc == MPI_SUCCESS)
        rc = MPI_Waitall(2, rq, st);
    if (rc == MPI_SUCCESS) {
        int nbytes = 0, pos = 0;
        PMPI_Get_count(&st[0], MPI_BYTE, &nbytes);
        int elems = tsize > 0 ? nbytes / tsize : 0;
        if (elems > 0 && src != MPI_PROC_NULL)
            PMPI_Unpack(tmp, nbytes, &pos, buf, elems, dt, comm);
        if (status != MPI_STATUS_IGNORE) {
            *status = st[0];
            PMPI_Status_set_elements(status, dt, elems);
        }
    }
    free(tmp);
    return rc;
}


/* ---- persistent requests ---------------------------------------------------------------- */

static void add_persistent(MPI_Request r, int cid, int is_recv, int peer, int tag, void *buf,
                           int count, MPI_Datatype dt)
{
    GROW(g.pers);
    g.pers.v[g.pers.n++] = (persistent){r, cid, is_recv, peer, tag, count, buf, dt};
}

#define SEND_INIT(name, pname)                                                                 \
    int name(const void *buf, int count, MPI_Datatype dt, int dest, int tag, MPI_Comm comm,    \
             MPI_Request *req)                                                                 \
    {                                                                                          \
        int cid = CID(comm);                                                                   \
        int rc = pname(buf, count, dt, dest, tag, comm, req);                                  \
        if (rc == MPI_SUCCESS && cid >= 0)                                                     \
            add_persistent(*req, cid, 0, dest, tag, (void *)buf, count, dt);                   \
        return rc;                                                                             \
    }
SEND_INIT(MPI_Send_init, PMPI_Send_init)
SEND_INIT(MPI_Ssend_init, PMPI_Ssend_init)
SEND_INIT(MPI_Rsend_init, PMPI_Rsend_init)
SEND_INIT(MPI_Bsend_init, PMPI_Bsend_init)

int MPI_Recv_init(void *buf, int count, MPI_Datatype dt, int src, int tag, MPI_Comm comm,
                  MPI_Request *req)
{
    int cid = CID(comm);
    int rc = PMPI_Recv_init(buf, count, dt, src, tag, comm, req);
    if (rc == MPI_SUCCESS && cid >= 0)
        add_persistent(*req, cid, 1, src, tag, buf, count, dt);
    return rc;
}

int MPI_Start(MPI_Request *req)
{
    int i = g.ready && !g.closed ? find_persistent(*req) : -1;
    if (i < 0)
        return PMPI_Start(req);
    persistent *p = &g.pers.v[i];
    if (!p->is_recv) {
        count_send(p->cid, p->peer);
        return PMPI_Start(req);
    }
    buffered **link;
    if (p->peer != MPI_PROC_NULL && find_buffered(p->cid, p->peer, p->tag, &link) != NULL) {
        /* Served from the buffer: the real request stays inactive; the next test or wait on
         * it returns this message's status. */
        GROW(g.subst);
        substitute *s = &g.subst.v[g.subst.n++];
        s->req = *req;
        deliver(link, p->buf, p->count, p->dt, &s->st);
        return MPI_SUCCESS;
    }
    int rc = PMPI_Start(req);
    if (rc == MPI_SUCCESS)
        track_req(*req, p->cid, REQ_RECV);
    return rc;
}

int MPI_Startall(int n, MPI_Request reqs[])
{
    for (int i = 0; i < n; i++) {
        int rc = MPI_Start(&reqs[i]);
        if (rc != MPI_SUCCESS)
            return rc;
    }
    return MPI_SUCCESS;
}

int MPI_Request_free(MPI_Request *req)
{
    /* A freed receive can no longer be observed; stop tracking it (documented: it is then
     * not counted, so freeing a pending receive makes a cut wait for its deadline). */
    MPI_Request handle = *req;
    forget_req(handle);
    take_substitute(handle, MPI_STATUS_IGNORE);
    int i = find_persistent(handle);
    if (i >= 0)
        g.pers.v[i] = g.pers.v[--g.pers.n];
    return PMPI_Request_free(req);
}

#define SEND_CANCEL "cancelling a send is not supported (its count was taken when it started)"

int MPI_Cancel(MPI_Request *req)
{
    /* A receive served from the buffer is already complete: cancelling it has no effect and
     * the message is delivered. A real pending receive is cancelled only if MPI says so in
     * its status (then it is not counted). A send's count cannot be taken back. */
    MPI_Request h = *req;
    for (int i = 0; i < g.subst.n; i++)
        if (g.subst.v[i].req == h)
            return MPI_SUCCESS;
    if (ndeferred && is_deferred(h))
        return refuse(MPI_COMM_SELF, "MPI_Cancel", "a non-blocking collective cannot be cancelled");
    for (int i = 0; i < g.reqs.n; i++)
        if (g.reqs.v[i].req == h)
            return g.reqs.v[i].kind == REQ_RECV
                       ? PMPI_Cancel(req)
                       : refuse(MPI_COMM_SELF, "MPI_Cancel",
                                "a non-blocking collective cannot be cancelled");
    int p = find_persistent(h);
    if (p >= 0 && g.pers.v[p].is_recv)
        return PMPI_Cancel(req); /* inactive: MPI decides */
    if (p >= 0)
        return refuse(MPI_COMM_SELF, "MPI_Cancel", SEND_CANCEL);
    if (!g.ready || g.closed)
        return PMPI_Cancel(req);
    /* Unknown to the layer: a send (counted when started), a complete generalized request
     * from the buffer, or a request on a communicator that is not observed. */
    int flag = 0;
    PMPI_Request_get_status(h, &flag, MPI_STATUS_IGNORE);
    if (flag)
        return MPI_SUCCESS; /* complete: nothing to cancel */
    return refuse(MPI_COMM_SELF, "MPI_Cancel", SEND_CANCEL);
}

/* ---- matched probes --------------------------------------------------------------------- */

/* One attempt: a buffered message first, else MPI's. */
static int improbe(int cid, int src, int tag, MPI_Comm comm, int *flag, MPI_Message *msg,
                   MPI_Status *status)
{
    buffered **link;
    buffered *m = find_buffered(cid, src, tag, &link);
    if (m != NULL) {
        unlink_buffered(link);
        *msg = fresh_standin();
        add_match(*msg, *msg, cid, m, NULL);
        *flag = 1;
        if (status != MPI_STATUS_IGNORE)
            fill_status(status, m, MPI_BYTE, m->nbytes, MPI_SUCCESS);
        return MPI_SUCCESS;
    }
    MPI_Status local;
    int rc = PMPI_Improbe(src, tag, comm, flag, msg, &local);
    if (rc == MPI_SUCCESS && *flag) {
        if (find_match(*msg) >= 0) {
            /* MPI reused the value of a handle the application still holds (its message is
             * in the buffer): take this one into the buffer too, under a fresh handle. */
            m = receive_matched(msg, cid, &local);
            *msg = fresh_standin();
            add_match(*msg, *msg, cid, m, NULL);
        } else {
            add_match(*msg, MPI_MESSAGE_NULL, cid, NULL, &local);
        }
        if (status != MPI_STATUS_IGNORE)
            *status = local;
    }
    return rc;
}

int MPI_Improbe(int src, int tag, MPI_Comm comm, int *flag, MPI_Message *msg,
                MPI_Status *status)
{
    int cid = CID(comm);
    if (cid < 0 || src == MPI_PROC_NULL)
        return PMPI_Improbe(src, tag, comm, flag, msg, status);
    int rc = improbe(cid, src, tag, comm, flag, msg, status);
    if (rc == MPI_SUCCESS && !*flag)
        idle_test();
    return rc;
}

int MPI_Mprobe(int src, int tag, MPI_Comm comm, MPI_Message *msg, MPI_Status *status)
{
    int cid = CID(comm);
    if (cid < 0 || src == MPI_PROC_NULL)
        return PMPI_Mprobe(src, tag, comm, msg, status);
    unsigned long turns = 0;
    for (;;) {
        /* A cut served inside may have buffered the message: look there again each time. */
        int flag = 0;
        int rc = improbe(cid, src, tag, comm, &flag, msg, status);
        if (rc != MPI_SUCCESS || flag)
            return rc;
        idle(&turns);
    }
}

int MPI_Imrecv(void *buf, int count, MPI_Datatype dt, MPI_Message *msg, MPI_Request *req)
{
    int i = find_match(*msg);
    if (i < 0)
        return PMPI_Imrecv(buf, count, dt, msg, req);
    matched x = g.matches.v[i];
    g.matches.v[i] = g.matches.v[--g.matches.n];
    if (x.m != NULL) {
        if (x.standin != MPI_MESSAGE_NULL)
            PMPI_Mrecv(NULL, 0, MPI_BYTE, &x.standin, MPI_STATUS_IGNORE);
        *msg = MPI_MESSAGE_NULL;
        return deliver_request(x.m, buf, count, dt, req);
    }
    int rc = PMPI_Imrecv(buf, count, dt, msg, req);
    if (rc == MPI_SUCCESS)
        track_req(*req, x.cid, REQ_RECV);
    return rc;
}

int MPI_Mrecv(void *buf, int count, MPI_Datatype dt, MPI_Message *msg, MPI_Status *status)
{
    int i = find_match(*msg);
    if (i < 0)
        return PMPI_Mrecv(buf, count, dt, msg, status);
    if (g.matches.v[i].m != NULL) {
        matched x = g.matches.v[i];
        g.matches.v[i] = g.matches.v[--g.matches.n];
        if (x.standin != MPI_MESSAGE_NULL)
            PMPI_Mrecv(NULL, 0, MPI_BYTE, &x.standin, MPI_STATUS_IGNORE);
        *msg = MPI_MESSAGE_NULL;
        return deliver_msg(x.m, buf, count, dt, status);
    }
    MPI_Request r;
    int rc = MPI_Imrecv(buf, count, dt, msg, &r);
    if (rc != MPI_SUCCESS)
        return rc;
    MPI_Request handle = r;
    MPI_Status local;
    rc = wait_serving(&r, &local);
    completed(handle, &local);
    if (status != MPI_STATUS_IGNORE)
        *status = local;
    return rc;
}

/* ---- completion: test and wait families --------------------------------------------------
 * Persistent receives served from the buffer (substitutes) complete here without MPI. */

int MPI_Test(MPI_Request *req, int *flag, MPI_Status *status)
{
    if (ndeferred)
        progress_deferred();
    if (g.subst.n && take_substitute(*req, status)) {
        *flag = 1;
        return MPI_SUCCESS;
    }
    MPI_Request handle = *req;
    MPI_Status local;
    int rc = PMPI_Test(req, flag, &local);
    if (*flag)
        completed(handle, &local);
    else
        idle_test();
    if (status != MPI_STATUS_IGNORE)
        *status = local;
    return rc;
}

int MPI_Wait(MPI_Request *req, MPI_Status *status)
{
    if (g.subst.n && take_substitute(*req, status))
        return MPI_SUCCESS;
    MPI_Request handle = *req;
    MPI_Status local;
    int rc = wait_serving(req, &local);
    completed(handle, &local);
    if (status != MPI_STATUS_IGNORE)
        *status = local;
    return rc;
}

int MPI_Request_get_status(MPI_Request req, int *flag, MPI_Status *status)
{
    if (ndeferred)
        progress_deferred();
    for (int i = 0; i < g.subst.n; i++)
        if (g.subst.v[i].req == req) {
            *flag = 1;
            if (status != MPI_STATUS_IGNORE)
                *status = g.subst.v[i].st;
            return MPI_SUCCESS;
        }
    int rc = PMPI_Request_get_status(req, flag, status);
    if (rc == MPI_SUCCESS && !*flag)
        idle_test();
    return rc;
}

/* Runs a Test* call on a copy of the handles and accounts for what completed. */
static MPI_Request *snapshot(int n, const MPI_Request *reqs)
{
    MPI_Request *h = malloc((size_t)(n > 0 ? n : 1) * sizeof *h);
    if (h == NULL)
        die("out of memory");
    memcpy(h, reqs, (size_t)n * sizeof *h);
    return h;
}

static MPI_Status *statuses(int n)
{
    MPI_Status *s = malloc((size_t)(n > 0 ? n : 1) * sizeof *s);
    if (s == NULL)
        die("out of memory");
    return s;
}

static int is_substitute(MPI_Request h)
{
    for (int j = 0; j < g.subst.n; j++)
        if (h != MPI_REQUEST_NULL && h == g.subst.v[j].req)
            return 1;
    return 0;
}

static int testall(int n, MPI_Request *reqs, int *flag, MPI_Status *sts)
{
    if (ndeferred)
        progress_deferred();
    MPI_Request *h = snapshot(n, reqs);
    MPI_Status *local = statuses(n);
    /* Substitutes are complete: MPI tests the others (their slots read as null). */
    int nsub = 0;
    if (find_substitute(n, reqs) >= 0)
        for (int i = 0; i < n; i++)
            if (is_substitute(reqs[i])) {
                reqs[i] = MPI_REQUEST_NULL;
                nsub++;
            }
    int rc = PMPI_Testall(n, reqs, flag, local);
    for (int i = 0; i < n; i++) {
        if (h[i] == MPI_REQUEST_NULL)
            continue;
        if (nsub && is_substitute(h[i])) {
            reqs[i] = h[i]; /* persistent: the handle stays */
            if (*flag)
                take_substitute(h[i], &local[i]);
        } else if (*flag || (rc == MPI_ERR_IN_STATUS && reqs[i] == MPI_REQUEST_NULL)) {
            completed(h[i], &local[i]); /* persistent handles stay non-null */
        }
    }
    if (sts != MPI_STATUSES_IGNORE)
        memcpy(sts, local, (size_t)n * sizeof *local);
    free(h);
    free(local);
    return rc;
}

int MPI_Testall(int n, MPI_Request *reqs, int *flag, MPI_Status *sts)
{
    int rc = testall(n, reqs, flag, sts);
    if (!*flag)
        idle_test();
    return rc;
}

int MPI_Waitall(int n, MPI_Request *reqs, MPI_Status *sts)
{
    unsigned long turns = 0;
    for (;;) {
        int flag = 0;
        int rc = testall(n, reqs, &flag, sts);
        if (rc != MPI_SUCCESS || flag)
            return rc;
        idle(&turns);
    }
}

static int testany(int n, MPI_Request *reqs, int *idx, int *flag, MPI_Status *status)
{
    if (ndeferred)
        progress_deferred();
    int s = find_substitute(n, reqs);
    if (s >= 0) {
        *idx = s;
        *flag = 1;
        take_substitute(reqs[s], status);
        return MPI_SUCCESS;
    }
    MPI_Request *h = snapshot(n, reqs);
    MPI_Status local;
    int rc = PMPI_Testany(n, reqs, idx, flag, &local);
    if (*flag && *idx != MPI_UNDEFINED)
        completed(h[*idx], &local);
    if (status != MPI_STATUS_IGNORE)
        *status = local;
    free(h);
    return rc;
}

int MPI_Testany(int n, MPI_Request *reqs, int *idx, int *flag, MPI_Status *status)
{
    int rc = testany(n, reqs, idx, flag, status);
    if (!*flag)
        idle_test();
    return rc;
}

int MPI_Waitany(int n, MPI_Request *reqs, int *idx, MPI_Status *status)
{
    unsigned long turns = 0;
    for (;;) {
        int flag = 0;
        int rc = testany(n, reqs, idx, &flag, status);
        if (rc != MPI_SUCCESS || flag)
            return rc;
        idle(&turns);
    }
}

static int testsome(int n, MPI_Request *reqs, int *outcount, int *idx, MPI_Status *sts)
{
    if (ndeferred)
        progress_deferred();
    if (find_substitute(n, reqs) >= 0) {
        int k = 0;
        for (int i = 0; i < n; i++)
            if (is_substitute(reqs[i])) {
                idx[k] = i;
                take_substitute(reqs[i], sts == MPI_STATUSES_IGNORE ? MPI_STATUS_IGNORE
                                                                    : &sts[k]);
                k++;
            }
        *outcount = k;
        return MPI_SUCCESS;
    }
    MPI_Request *h = snapshot(n, reqs);
    MPI_Status *local = statuses(n);
    int rc = PMPI_Testsome(n, reqs, outcount, idx, local);
    if (*outcount != MPI_UNDEFINED)
        for (int i = 0; i < *outcount; i++)
            completed(h[idx[i]], &local[i]);
    if (sts != MPI_STATUSES_IGNORE && *outcount != MPI_UNDEFINED)
        memcpy(sts, local, (size_t)*outcount * sizeof *local);
    free(h);
    free(local);
    return rc;
}

int MPI_Testsome(int n, MPI_Request *reqs, int *outcount, int *idx, MPI_Status *sts)
{
    int rc = testsome(n, reqs, outcount, idx, sts);
    if (*outcount == 0)
        idle_test();
    return rc;
}

int MPI_Waitsome(int n, MPI_Request *reqs, int *outcount, int *idx, MPI_Status *sts)
{
    unsigned long turns = 0;
    for (;;) {
        int rc = testsome(n, reqs, outcount, idx, sts);
        if (rc != MPI_SUCCESS || *outcount != 0)
            return rc;
        idle(&turns);
    }
}

/* ---- collectives: aligned first on their communicator ------------------------------------
 * Non-blocking ones: started once every member has called them (see deferred), then
 * watched: a cut waits until they complete. */

RUN(run_ibarrier, PMPI_Ibarrier(c->comm, c->req))
RUN(run_ibcast, PMPI_Ibcast(c->r, c->i1, c->t1, c->root, c->comm, c->req))
RUN(run_iallreduce, PMPI_Iallreduce(c->s, c->r, c->i1, c->t1, c->op, c->comm, c->req))
RUN(run_ireduce, PMPI_Ireduce(c->s, c->r, c->i1, c->t1, c->op, c->root, c->comm, c->req))
RUN(run_iallgather,
    PMPI_Iallgather(c->s, c->i1, c->t1, c->r, c->i2, c->t2, c->comm, c->req))
RUN(run_ialltoall, PMPI_Ialltoall(c->s, c->i1, c->t1, c->r, c->i2, c->t2, c->comm, c->req))
RUN(run_igather,
    PMPI_Igather(c->s, c->i1, c->t1, c->r, c->i2, c->t2, c->root, c->comm, c->req))
RUN(run_iscatter,
    PMPI_Iscatter(c->s, c->i1, c->t1, c->r, c->i2, c->t2, c->root, c->comm, c->req))
RUN(run_iscan, PMPI_Iscan(c->s, c->r, c->i1, c->t1, c->op, c->comm, c->req))
RUN(run_ireduce_scatter_block,
    PMPI_Ireduce_scatter_block(c->s, c->r, c->i1, c->t1, c->op, c->comm, c->req))

int MPI_Ibarrier(MPI_Comm comm, MPI_Request *req)
{
    NONBLOCKING(comm, run_ibarrier);
}

int MPI_Ibcast(void *buf, int count, MPI_Datatype dt, int root, MPI_Comm comm,
               MPI_Request *req)
{
    NONBLOCKING(comm, run_ibcast, .r = buf, .i1 = count, .t1 = dt, .root = root);
}

int MPI_Iallreduce(const void *s, void *r, int count, MPI_Datatype dt, MPI_Op op,
                   MPI_Comm comm, MPI_Request *req)
{
    NONBLOCKING(comm, run_iallreduce, .s = s, .r = r, .i1 = count, .t1 = dt, .op = op);
}

int MPI_Ireduce(const void *s, void *r, int count, MPI_Datatype dt, MPI_Op op, int root,
                MPI_Comm comm, MPI_Request *req)
{
    NONBLOCKING(comm, run_ireduce, .s = s, .r = r, .i1 = count, .t1 = dt, .op = op,
               .root = root);
}

int MPI_Iallgather(const void *s, int sc, MPI_Datatype sdt, void *r, int rc,
                   MPI_Datatype rdt, MPI_Comm comm, MPI_Request *req)
{
    NONBLOCKING(comm, run_iallgather, .s = s, .i1 = sc, .t1 = sdt, .r = r, .i2 = rc, .t2 = rdt);
}

int MPI_Ialltoall(const void *s, int sc, MPI_Datatype sdt, void *r, int rc, MPI_Datatype rdt,
                  MPI_Comm comm, MPI_Request *req)
{
    NONBLOCKING(comm, run_ialltoall, .s = s, .i1 = sc, .t1 = sdt, .r = r, .i2 = rc, .t2 = rdt);
}

int MPI_Igather(const void *s, int sc, MPI_Datatype sdt, void *r, int rc, MPI_Datatype rdt,
                int root, MPI_Comm comm, MPI_Request *req)
{
    NONBLOCKING(comm, run_igather, .s = s, .i1 = sc, .t1 = sdt, .r = r, .i2 = rc, .t2 = rdt,
               .root = root);
}

int MPI_Iscatter(const void *s, int sc, MPI_Datatype sdt, void *r, int rc, MPI_Datatype rdt,
                 int root, MPI_Comm comm, MPI_Request *req)
{
    NONBLOCKING(comm, run_iscatter, .s = s, .i1 = sc, .t1 = sdt, .r = r, .i2 = rc, .t2 = rdt,
               .root = root);
}

int MPI_Iscan(const void *s, void *r, int count, MPI_Datatype dt, MPI_Op op, MPI_Comm comm,
              MPI_Request *req)
{
    NONBLOCKING(comm, run_iscan, .s = s, .r = r, .i1 = count, .t1 = dt, .op = op);
}

int MPI_Ireduce_scatter_block(const void *s, void *r, int rc, MPI_Datatype dt, MPI_Op op,
                              MPI_Comm comm, MPI_Request *req)
{
    NONBLOCKING(comm, run_ireduce_scatter_block, .s = s, .r = r, .i1 = rc, .t1 = dt, .op = op);
}

RUN(run_barrier, PMPI_Barrier(c->comm))
RUN(run_bcast, PMPI_Bcast(c->r, c->i1, c->t1, c->root, c->comm))
RUN(run_reduce, PMPI_Reduce(c->s, c->r, c->i1, c->t1, c->op, c->root, c->comm))
RUN(run_allreduce, PMPI_Allreduce(c->s, c->r, c->i1, c->t1, c->op, c->comm))
RUN(run_alltoall, PMPI_Alltoall(c->s, c->i1, c->t1, c->r, c->i2, c->t2, c->comm))
RUN(run_alltoallv,
    PMPI_Alltoallv(c->s, c->v1, c->v2, c->t1, c->r, c->v3, c->v4, c->t2, c->comm))
RUN(run_allgather, PMPI_Allgather(c->s, c->i1, c->t1, c->r, c->i2, c->t2, c->comm))
RUN(run_allgatherv, PMPI_Allgatherv(c->s, c->i1, c->t1, c->r, c->v1, c->v2, c->t2, c->comm))
RUN(run_gather, PMPI_Gather(c->s, c->i1, c->t1, c->r, c->i2, c->t2, c->root, c->comm))
RUN(run_gatherv,
    PMPI_Gatherv(c->s, c->i1, c->t1, c->r, c->v1, c->v2, c->t2, c->root, c->comm))
RUN(run_scatter, PMPI_Scatter(c->s, c->i1, c->t1, c->r, c->i2, c->t2, c->root, c->comm))
RUN(run_scatterv,
    PMPI_Scatterv(c->s, c->v1, c->v2, c->t1, c->r, c->i2, c->t2, c->root, c->comm))
RUN(run_reduce_scatter_block,
    PMPI_Reduce_scatter_block(c->s, c->r, c->i1, c->t1, c->op, c->comm))
RUN(run_scan, PMPI_Scan(c->s, c->r, c->i1, c->t1, c->op, c->comm))

int MPI_Barrier(MPI_Comm comm)
{
    COLLECTIVE(comm, run_barrier);
}

int MPI_Bcast(void *buf, int count, MPI_Datatype dt, int root, MPI_Comm comm)
{
    COLLECTIVE(comm, run_bcast, .r = buf, .i1 = count, .t1 = dt, .root = root);
}

int MPI_Reduce(const void *s, void *r, int count, MPI_Datatype dt, MPI_Op op, int root,
               MPI_Comm comm)
{
    COLLECTIVE(comm, run_reduce, .s = s, .r = r, .i1 = count, .t1 = dt, .op = op, .root = root);
}

int MPI_Allreduce(const void *s, void *r, int count, MPI_Datatype dt, MPI_Op op, MPI_Comm comm)
{
    COLLECTIVE(comm, run_allreduce, .s = s, .r = r, .i1 = count, .t1 = dt, .op = op);
}

int MPI_Alltoall(const void *s, int sc, MPI_Datatype sdt, void *r, int rc, MPI_Datatype rdt,
                 MPI_Comm comm)
{
    COLLECTIVE(comm, run_alltoall, .s = s, .i1 = sc, .t1 = sdt, .r = r, .i2 = rc, .t2 = rdt);
}

int MPI_Alltoallv(const void *s, const int sc[], const int sd[], MPI_Datatype sdt, void *r,
                  const int rc[], const int rd[], MPI_Datatype rdt, MPI_Comm comm)
{
    COLLECTIVE(comm, run_alltoallv, .s = s, .v1 = sc, .v2 = sd, .t1 = sdt, .r = r, .v3 = rc,
               .v4 = rd, .t2 = rdt);
}

int MPI_Allgather(const void *s, int sc, MPI_Datatype sdt, void *r, int rc, MPI_Datatype rdt,
                  MPI_Comm comm)
{
    COLLECTIVE(comm, run_allgather, .s = s, .i1 = sc, .t1 = sdt, .r = r, .i2 = rc, .t2 = rdt);
}

int MPI_Allgatherv(const void *s, int sc, MPI_Datatype sdt, void *r, const int rc[],
                   const int rd[], MPI_Datatype rdt, MPI_Comm comm)
{
    COLLECTIVE(comm, run_allgatherv, .s = s, .i1 = sc, .t1 = sdt, .r = r, .v1 = rc, .v2 = rd,
               .t2 = rdt);
}

int MPI_Gather(const void *s, int sc, MPI_Datatype sdt, void *r, int rc, MPI_Datatype rdt,
               int root, MPI_Comm comm)
{
    COLLECTIVE(comm, run_gather, .s = s, .i1 = sc, .t1 = sdt, .r = r, .i2 = rc, .t2 = rdt,
               .root = root);
}

int MPI_Gatherv(const void *s, int sc, MPI_Datatype sdt, void *r, const int rc[],
                const int rd[], MPI_Datatype rdt, int root, MPI_Comm comm)
{
    COLLECTIVE(comm, run_gatherv, .s = s, .i1 = sc, .t1 = sdt, .r = r, .v1 = rc, .v2 = rd,
               .t2 = rdt, .root = root);
}

int MPI_Scatter(const void *s, int sc, MPI_Datatype sdt, void *r, int rc, MPI_Datatype rdt,
                int root, MPI_Comm comm)
{
    COLLECTIVE(comm, run_scatter, .s = s, .i1 = sc, .t1 = sdt, .r = r, .i2 = rc, .t2 = rdt,
               .root = root);
}

int MPI_Scatterv(const void *s, const int sc[], const int sd[], MPI_Datatype sdt, void *r,
                 int rc, MPI_Datatype rdt, int root, MPI_Comm comm)
{
    COLLECTIVE(comm, run_scatterv, .s = s, .v1 = sc, .v2 = sd, .t1 = sdt, .r = r, .i2 = rc,
               .t2 = rdt, .root = root);
}

int MPI_Reduce_scatter_block(const void *s, void *r, int rc, MPI_Datatype dt, MPI_Op op,
                             MPI_Comm comm)
{
    COLLECTIVE(comm, run_reduce_scatter_block, .s = s, .r = r, .i1 = rc, .t1 = dt, .op = op);
}

int MPI_Scan(const void *s, void *r, int count, MPI_Datatype dt, MPI_Op op, MPI_Comm comm)
{
    COLLECTIVE(comm, run_scan, .s = s, .r = r, .i1 = count, .t1 = dt, .op = op);
}

RUN(run_exscan, PMPI_Exscan(c->s, c->r, c->i1, c->t1, c->op, c->comm))
RUN(run_reduce_scatter, PMPI_Reduce_scatter(c->s, c->r, c->v1, c->t1, c->op, c->comm))

int MPI_Exscan(const void *s, void *r, int count, MPI_Datatype dt, MPI_Op op, MPI_Comm comm)
{
    COLLECTIVE(comm, run_exscan, .s = s, .r = r, .i1 = count, .t1 = dt, .op = op);
}

int MPI_Reduce_scatter(const void *s, void *r, const int rcounts[], MPI_Datatype dt, MPI_Op op,
                       MPI_Comm comm)
{
    COLLECTIVE(comm, run_reduce_scatter, .s = s, .r = r, .v1 = rcounts, .t1 = dt, .op = op);
}

RUN(run_alltoallw,
    PMPI_Alltoallw(c->s, c->v1, c->v2, c->w1, c->r, c->v3, c->v4, c->w2, c->comm))

int MPI_Alltoallw(const void *s, const int sc[], const int sd[], const MPI_Datatype st[],
                  void *r, const int rc[], const int rd[], const MPI_Datatype rt[],
                  MPI_Comm comm)
{
    COLLECTIVE(comm, run_alltoallw, .s = s, .v1 = sc, .v2 = sd, .w1 = st, .r = r, .v3 = rc,
               .v4 = rd, .w2 = rt);
}

/* Neighborhood collectives (on cartesian and graph communicators): aligned among all the
 * communicator's members like any collective. */
RUN(run_nb_allgather,
    PMPI_Neighbor_allgather(c->s, c->i1, c->t1, c->r, c->i2, c->t2, c->comm))
RUN(run_nb_allgatherv,
    PMPI_Neighbor_allgatherv(c->s, c->i1, c->t1, c->r, c->v1, c->v2, c->t2, c->comm))
RUN(run_nb_alltoall, PMPI_Neighbor_alltoall(c->s, c->i1, c->t1, c->r, c->i2, c->t2, c->comm))
RUN(run_nb_alltoallv, PMPI_Neighbor_alltoallv(c->s, c->v1, c->v2, c->t1, c->r, c->v3, c->v4,
                                              c->t2, c->comm))
RUN(run_nb_alltoallw, PMPI_Neighbor_alltoallw(c->s, c->v1, c->a1, c->w1, c->r, c->v3, c->a2,
                                              c->w2, c->comm))

int MPI_Neighbor_allgather(const void *s, int sc, MPI_Datatype sdt, void *r, int rc,
                           MPI_Datatype rdt, MPI_Comm comm)
{
    COLLECTIVE(comm, run_nb_allgather, .s = s, .i1 = sc, .t1 = sdt, .r = r, .i2 = rc,
               .t2 = rdt);
}

int MPI_Neighbor_allgatherv(const void *s, int sc, MPI_Datatype sdt, void *r, const int rc[],
                            const int rd[], MPI_Datatype rdt, MPI_Comm comm)
{
    COLLECTIVE(comm, run_nb_allgatherv, .s = s, .i1 = sc, .t1 = sdt, .r = r, .v1 = rc,
               .v2 = rd, .t2 = rdt);
}

int MPI_Neighbor_alltoall(const void *s, int sc, MPI_Datatype sdt, void *r, int rc,
                          MPI_Datatype rdt, MPI_Comm comm)
{
    COLLECTIVE(comm, run_nb_alltoall, .s = s, .i1 = sc, .t1 = sdt, .r = r, .i2 = rc,
               .t2 = rdt);
}

int MPI_Neighbor_alltoallv(const void *s, const int sc[], const int sd[], MPI_Datatype sdt,
                           void *r, const int rc[], const int rd[], MPI_Datatype rdt,
                           MPI_Comm comm)
{
    COLLECTIVE(comm, run_nb_alltoallv, .s = s, .v1 = sc, .v2 = sd, .t1 = sdt, .r = r, .v3 = rc,
               .v4 = rd, .t2 = rdt);
}

int MPI_Neighbor_alltoallw(const void *s, const int sc[], const MPI_Aint sd[],
                           const MPI_Datatype st[], void *r, const int rc[],
                           const MPI_Aint rd[], const MPI_Datatype rt[], MPI_Comm comm)
{
    COLLECTIVE(comm, run_nb_alltoallw, .s = s, .v1 = sc, .a1 = sd, .w1 = st, .r = r, .v3 = rc,
               .a2 = rd, .w2 = rt);
}

/* The v/w non-blocking collectives, Iexscan and the non-blocking neighborhood collectives:
 * deferred like the others (see deferred). */
RUN(run_ialltoallv, PMPI_Ialltoallv(c->s, c->v1, c->v2, c->t1, c->r, c->v3, c->v4, c->t2,
                                    c->comm, c->req))
RUN(run_ialltoallw, PMPI_Ialltoallw(c->s, c->v1, c->v2, c->w1, c->r, c->v3, c->v4, c->w2,
                                    c->comm, c->req))
RUN(run_iallgatherv, PMPI_Iallgatherv(c->s, c->i1, c->t1, c->r, c->v1, c->v2, c->t2, c->comm,
                                      c->req))
RUN(run_igatherv, PMPI_Igatherv(c->s, c->i1, c->t1, c->r, c->v1, c->v2, c->t2, c->root,
                                c->comm, c->req))
RUN(run_iscatterv, PMPI_Iscatterv(c->s, c->v1, c->v2, c->t1, c->r, c->i2, c->t2, c->root,
                                  c->comm, c->req))
RUN(run_ireduce_scatter,
    PMPI_Ireduce_scatter(c->s, c->r, c->v1, c->t1, c->op, c->comm, c->req))
RUN(run_iexscan, PMPI_Iexscan(c->s, c->r, c->i1, c->t1, c->op, c->comm, c->req))
RUN(run_inb_allgather, PMPI_Ineighbor_allgather(c->s, c->i1, c->t1, c->r, c->i2, c->t2,
                                                c->comm, c->req))
RUN(run_inb_allgatherv, PMPI_Ineighbor_allgatherv(c->s, c->i1, c->t1, c->r, c->v1, c->v2,
                                                  c->t2, c->comm, c->req))
RUN(run_inb_alltoall, PMPI_Ineighbor_alltoall(c->s, c->i1, c->t1, c->r, c->i2, c->t2, c->comm,
                                              c->req))
RUN(run_inb_alltoallv, PMPI_Ineighbor_alltoallv(c->s, c->v1, c->v2, c->t1, c->r, c->v3, c->v4,
                                                c->t2, c->comm, c->req))
RUN(run_inb_alltoallw, PMPI_Ineighbor_alltoallw(c->s, c->v1, c->a1, c->w1, c->r, c->v3, c->a2,
                                                c->w2, c->comm, c->req))

int MPI_Ialltoallv(const void *s, const int sc[], const int sd[], MPI_Datatype sdt, void *r,
                   const int rc[], const int rd[], MPI_Datatype rdt, MPI_Comm comm,
                   MPI_Request *req)
{
    NONBLOCKING(comm, run_ialltoallv, .s = s, .v1 = sc, .v2 = sd, .t1 = sdt, .r = r, .v3 = rc,
                .v4 = rd, .t2 = rdt);
}

int MPI_Ialltoallw(const void *s, const int sc[], const int sd[], const MPI_Datatype st[],
                   void *r, const int rc[], const int rd[], const MPI_Datatype rt[],
                   MPI_Comm comm, MPI_Request *req)
{
    NONBLOCKING(comm, run_ialltoallw, .s = s, .v1 = sc, .v2 = sd, .w1 = st, .r = r, .v3 = rc,
                .v4 = rd, .w2 = rt);
}

int MPI_Iallgatherv(const void *s, int sc, MPI_Datatype sdt, void *r, const int rc[],
                    const int rd[], MPI_Datatype rdt, MPI_Comm comm, MPI_Request *req)
{
    NONBLOCKING(comm, run_iallgatherv, .s = s, .i1 = sc, .t1 = sdt, .r = r, .v1 = rc, .v2 = rd,
                .t2 = rdt);
}

int MPI_Igatherv(const void *s, int sc, MPI_Datatype sdt, void *r, const int rc[],
                 const int rd[], MPI_Datatype rdt, int root, MPI_Comm comm, MPI_Request *req)
{
    NONBLOCKING(comm, run_igatherv, .s = s, .i1 = sc, .t1 = sdt, .r = r, .v1 = rc, .v2 = rd,
                .t2 = rdt, .root = root);
}

int MPI_Iscatterv(const void *s, const int sc[], const int sd[], MPI_Datatype sdt, void *r,
                  int rc, MPI_Datatype rdt, int root, MPI_Comm comm, MPI_Request *req)
{
    NONBLOCKING(comm, run_iscatterv, .s = s, .v1 = sc, .v2 = sd, .t1 = sdt, .r = r, .i2 = rc,
                .t2 = rdt, .root = root);
}

int MPI_Ireduce_scatter(const void *s, void *r, const int rcounts[], MPI_Datatype dt,
                        MPI_Op op, MPI_Comm comm, MPI_Request *req)
{
    NONBLOCKING(comm, run_ireduce_scatter, .s = s, .r = r, .v1 = rcounts, .t1 = dt, .op = op);
}

int MPI_Iexscan(const void *s, void *r, int count, MPI_Datatype dt, MPI_Op op, MPI_Comm comm,
                MPI_Request *req)
{
    NONBLOCKING(comm, run_iexscan, .s = s, .r = r, .i1 = count, .t1 = dt, .op = op);
}

int MPI_Ineighbor_allgather(const void *s, int sc, MPI_Datatype sdt, void *r, int rc,
                            MPI_Datatype rdt, MPI_Comm comm, MPI_Request *req)
{
    NONBLOCKING(comm, run_inb_allgather, .s = s, .i1 = sc, .t1 = sdt, .r = r, .i2 = rc,
                .t2 = rdt);
}

int MPI_Ineighbor_allgatherv(const void *s, int sc, MPI_Datatype sdt, void *r, const int rc[],
                             const int rd[], MPI_Datatype rdt, MPI_Comm comm, MPI_Request *req)
{
    NONBLOCKING(comm, run_inb_allgatherv, .s = s, .i1 = sc, .t1 = sdt, .r = r, .v1 = rc,
                .v2 = rd, .t2 = rdt);
}

int MPI_Ineighbor_alltoall(const void *s, int sc, MPI_Datatype sdt, void *r, int rc,
                           MPI_Datatype rdt, MPI_Comm comm, MPI_Request *req)
{
    NONBLOCKING(comm, run_inb_alltoall, .s = s, .i1 = sc, .t1 = sdt, .r = r, .i2 = rc,
                .t2 = rdt);
}

int MPI_Ineighbor_alltoallv(const void *s, const int sc[], const int sd[], MPI_Datatype sdt,
                            void *r, const int rc[], const int rd[], MPI_Datatype rdt,
                            MPI_Comm comm, MPI_Request *req)
{
    NONBLOCKING(comm, run_inb_alltoallv, .s = s, .v1 = sc, .v2 = sd, .t1 = sdt, .r = r,
                .v3 = rc, .v4 = rd, .t2 = rdt);
}

int MPI_Ineighbor_alltoallw(const void *s, const int sc[], const MPI_Aint sd[],
                            const MPI_Datatype st[], void *r, const int rc[],
                            const MPI_Aint rd[], const MPI_Datatype rt[], MPI_Comm comm,
                            MPI_Request *req)
{
    NONBLOCKING(comm, run_inb_alltoallw, .s = s, .v1 = sc, .a1 = sd, .w1 = st, .r = r,
                .v3 = rc, .a2 = rd, .w2 = rt);
}
