/* SymVirt transparent mode: a PMPI interposition library (LD_PRELOAD) that brings an
 * unmodified MPI application to a consistent cut when the guest agent asks for one.
 *
 * Counting: every send on a tracked communicator (MPI_COMM_WORLD and its duplicates) counts
 * sent[comm][dest] when it is started; every receive counts received[comm][source] when it
 * completes (or, during a drain, when MPI_Request_get_status sees it complete, without freeing
 * the application's request).
 *
 * The cut for epoch E, entered from any wrapper's progress loop when the agent requested E
 * (watcher thread, one atomic load) or when a peer's COUNTS message arrives:
 *   1. send COUNTS{E, sent[c][p] for every tracked c} to every peer p (private communicator);
 *   2. until every peer's COUNTS arrived and received[c][p] == its sent count: complete the
 *      application's pending receives (get_status), and receive every unexpected message on the
 *      tracked communicators into the layer's buffer (delivered later, in arrival order, exactly
 *      once: a receive, probe or Irecv first looks in the buffer, honouring MPI matching rules:
 *      ANY_SOURCE, ANY_TAG, and non-overtaking per source);
 *   3. report quiesced through the agent, wait for resume or abort, run the transport hook,
 *      report resumed, barrier.
 * Blocking calls are turned into non-blocking ones plus a progress loop that serves cuts, so no
 * rank sits in an MPI call that a quiescing peer would have to complete.
 *
 * Collectives on tracked communicators are aligned first: an MPI_Iallreduce(MAX) of "cut
 * requested" on a private communicator, whose progress loop answers cuts started by peers that
 * are not in the collective yet. When the agreed value asks for a cut, every rank makes it
 * before entering the real collective; otherwise every rank is at the collective and enters it.
 * MPI_Finalize is aligned the same way, then the agent connection is closed (a request that
 * arrives later fails the epoch at the agent: a clear error for the host, never a hang).
 *
 * Not covered (documented limits): communicators other than MPI_COMM_WORLD duplicates
 * (messages and collectives there pass through unobserved), matched probes (MPI_Mprobe),
 * persistent requests, non-blocking collectives, one-sided communication.
 *
 * Environment: SYMVIRT_AGENT_SOCKET (agent's rank socket), SYMVIRT_CUT_LOG (a directory: each
 * rank writes cut-E-R with its per-peer sent and received counts at the cut, and resumed-E-R),
 * SYMVIRT_CONNECT_TIMEOUT_MS, SYMVIRT_QUIESCE_TIMEOUT_MS. */
#include "symvirt_core.h"

#include <mpi.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define MAX_COMMS 32
#define TAG_COUNTS 1

/* A runtime may define this to re-select its transport after a migration (transparent mode's
 * resume hook); it runs on every rank before the rank reports resumed. */
void symvirt_transport_reselect(const symvirt_interconnect *ic) __attribute__((weak));

typedef struct {
    MPI_Comm comm;
    uint64_t *sent; /* per peer (rank in comm) */
    uint64_t *recv;
} tracked_comm;

typedef struct {
    MPI_Request req;
    int cid;
    int counted;
} tracked_recv;

typedef struct buffered {
    struct buffered *next;
    int cid, src, tag, nbytes;
    char data[];
} buffered;

static struct {
    int ready, closed;
    int me, np;
    MPI_Comm ctl;   /* COUNTS messages */
    MPI_Comm align; /* alignment reductions and the post-resume barrier */
    tracked_comm comms[MAX_COMMS];
    int ncomms;
    tracked_recv *recvs;
    int nrecvs, caprecvs;
    buffered *head, **tail;
    uint64_t served; /* last epoch a cut was made for */
    uint64_t drained; /* messages taken into the buffer during the current cut */
    uint64_t *early; /* per peer: a COUNTS message received before its cut: epoch, counts... */
    int *have_early;
    const char *log_dir;
    uint64_t quiesce_timeout_ms;
} g = {.tail = &g.head};

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

static int comm_id(MPI_Comm c)
{
    for (int i = 0; i < g.ncomms; i++)
        if (g.comms[i].comm == c)
            return i;
    return -1;
}

static void track_comm(MPI_Comm c)
{
    if (g.ncomms == MAX_COMMS)
        return; /* passes through unobserved; documented */
    tracked_comm *t = &g.comms[g.ncomms++];
    t->comm = c;
    t->sent = calloc((size_t)g.np, sizeof(uint64_t));
    t->recv = calloc((size_t)g.np, sizeof(uint64_t));
    if (t->sent == NULL || t->recv == NULL)
        die("out of memory");
}

/* ---- pending receives ------------------------------------------------------------------ */

static void track_recv(MPI_Request r, int cid)
{
    if (g.nrecvs == g.caprecvs) {
        g.caprecvs = g.caprecvs ? 2 * g.caprecvs : 64;
        g.recvs = realloc(g.recvs, (size_t)g.caprecvs * sizeof *g.recvs);
        if (g.recvs == NULL)
            die("out of memory");
    }
    g.recvs[g.nrecvs++] = (tracked_recv){r, cid, 0};
}

static void count_recv(int cid, const MPI_Status *st)
{
    if (st->MPI_SOURCE >= 0 && st->MPI_SOURCE < g.np)
        g.comms[cid].recv[st->MPI_SOURCE]++;
}

/* The request that was `handle` completed with `st`: count it unless already counted. */
static void completed(MPI_Request handle, const MPI_Status *st)
{
    for (int i = 0; i < g.nrecvs; i++) {
        if (g.recvs[i].req != handle)
            continue;
        int cancelled = 0;
        PMPI_Test_cancelled(st, &cancelled);
        if (!g.recvs[i].counted && !cancelled)
            count_recv(g.recvs[i].cid, st);
        g.recvs[i] = g.recvs[--g.nrecvs];
        return;
    }
}

/* During a drain: counts pending receives that have completed, without freeing them. */
static void count_finished_recvs(void)
{
    for (int i = 0; i < g.nrecvs; i++) {
        if (g.recvs[i].counted)
            continue;
        int flag = 0;
        MPI_Status st;
        PMPI_Request_get_status(g.recvs[i].req, &flag, &st);
        if (flag) {
            int cancelled = 0;
            PMPI_Test_cancelled(&st, &cancelled);
            if (!cancelled)
                count_recv(g.recvs[i].cid, &st);
            g.recvs[i].counted = 1;
        }
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

static void drain_one(int cid, const MPI_Status *probed)
{
    int nbytes = 0;
    PMPI_Get_count(probed, MPI_BYTE, &nbytes);
    buffered *m = malloc(sizeof *m + (size_t)nbytes);
    if (m == NULL)
        die("out of memory for a drained message");
    m->next = NULL;
    m->cid = cid;
    m->src = probed->MPI_SOURCE;
    m->tag = probed->MPI_TAG;
    m->nbytes = nbytes;
    MPI_Status st;
    if (PMPI_Recv(m->data, nbytes, MPI_BYTE, m->src, m->tag, g.comms[cid].comm, &st) !=
        MPI_SUCCESS)
        die("draining a message failed");
    count_recv(cid, &st);
    g.drained++;
    *g.tail = m;
    g.tail = &m->next;
}

static void unlink_buffered(buffered **link)
{
    buffered *m = *link;
    *link = m->next;
    if (g.tail == &m->next)
        g.tail = link;
    free(m);
}

static void fill_status(MPI_Status *st, const buffered *m, MPI_Datatype dt, int elems, int err)
{
    st->MPI_SOURCE = m->src;
    st->MPI_TAG = m->tag;
    st->MPI_ERROR = err;
    PMPI_Status_set_elements(st, dt, elems);
    PMPI_Status_set_cancelled(st, 0);
}

/* Copies a buffered message into the application's buffer and removes it. */
static int deliver(buffered **link, void *buf, int count, MPI_Datatype dt, MPI_Status *st)
{
    buffered *m = *link;
    int tsize = 0, rc = MPI_SUCCESS;
    PMPI_Type_size(dt, &tsize);
    int elems = tsize > 0 ? m->nbytes / tsize : 0;
    if (elems > count) {
        elems = count;
        rc = MPI_ERR_TRUNCATE;
    }
    int pos = 0;
    if (elems > 0)
        PMPI_Unpack(m->data, m->nbytes, &pos, buf, elems, dt, g.comms[m->cid].comm);
    MPI_Status local;
    fill_status(st == MPI_STATUS_IGNORE ? &local : st, m, dt, elems, rc);
    unlink_buffered(link);
    return rc;
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

/* ---- the cut ---------------------------------------------------------------------------- */

static void write_log(const char *kind, uint64_t epoch, const char *text)
{
    if (g.log_dir == NULL)
        return;
    char path[4096], tmp[4200];
    snprintf(path, sizeof path, "%s/%s-%llu-%d", g.log_dir, kind, (unsigned long long)epoch, g.me);
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
        for (int p = 0; p < g.np; p++) {
            uint64_t v = 0;
            for (int c = 0; c < g.ncomms; c++)
                v += pass == 0 ? g.comms[c].sent[p] : g.comms[c].recv[p];
            n += (size_t)snprintf(text + n, cap - n, " %llu", (unsigned long long)v);
        }
        n += (size_t)snprintf(text + n, cap - n, "\n");
    }
    n += (size_t)snprintf(text + n, cap - n, "drained %llu\n", (unsigned long long)g.drained);
    write_log("cut", epoch, text);
    free(text);
}

static size_t counts_len(void)
{
    return 2 + (size_t)g.ncomms;
}

/* The slot holding the last COUNTS message from peer p (fixed stride: comms may be added). */
static uint64_t *early_slot(int p)
{
    return &g.early[(size_t)p * (2 + MAX_COMMS)];
}

/* Receives one COUNTS message (already probed) into the early slot of its sender. */
static void take_counts(const MPI_Status *probed)
{
    int p = probed->MPI_SOURCE;
    PMPI_Recv(early_slot(p), 2 + MAX_COMMS, MPI_UINT64_T, p, TAG_COUNTS, g.ctl,
              MPI_STATUS_IGNORE);
    g.have_early[p] = 1;
}

static void cut(uint64_t epoch);

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
        g.have_early[st.MPI_SOURCE] = 0; /* stale */
}

/* Serves whatever is pending: a local request or a peer's cut. */
static void serve(void)
{
    if (!g.ready || g.closed)
        return;
    uint64_t e = symvirt_ctl_requested();
    if (e > g.served) {
        cut(e);
        return;
    }
    serve_peers();
}

/* One idle turn of a wait loop. Cheap on the fast path: the local request is one atomic
 * load; peers' COUNTS are probed every 64 turns; the CPU is yielded only after a while (ranks
 * may share cores), so a message that arrives soon is seen at full speed. */
static void idle(unsigned long *turns)
{
    ++*turns;
    if (!g.ready || g.closed) {
        if (*turns > 4096)
            sched_yield();
        return;
    }
    uint64_t e = symvirt_ctl_requested();
    if (e > g.served) {
        cut(e);
        return;
    }
    if ((*turns & 63) == 0)
        serve_peers();
    if (*turns > 4096)
        sched_yield();
}

/* For single-shot Test calls that found nothing: the same, with a process-wide turn count. */
static void idle_test(void)
{
    static unsigned long turns;
    idle(&turns);
    if (turns > 4096)
        turns = 0; /* no yield inside an application's own polling loop */
}

/* Diagnostics for a drain that does not finish (printed once per cut, to stderr). */
static void dump_drain(uint64_t epoch, const int *have)
{
    fprintf(stderr, "symvirt-pmpi rank %d: epoch %llu drain still waiting; %d pending receives\n",
            g.me, (unsigned long long)epoch, g.nrecvs);
    for (int p = 0; p < g.np; p++)
        for (int c = 0; c < g.ncomms; c++)
            fprintf(stderr, "  peer %d comm %d: counts %s, want %llu, received %llu\n", p, c,
                    have[p] ? "in" : "missing",
                    (unsigned long long)(p == g.me ? g.comms[c].sent[g.me] : early_slot(p)[2 + c]),
                    (unsigned long long)g.comms[c].recv[p]);
    fflush(stderr);
}

static void cut(uint64_t epoch)
{
    size_t len = counts_len();
    /* 1. my counts to every peer */
    uint64_t *out = malloc((size_t)g.np * len * sizeof(uint64_t));
    MPI_Request *rq = malloc((size_t)g.np * sizeof(MPI_Request));
    int *have = calloc((size_t)g.np, sizeof(int));
    if (out == NULL || rq == NULL || have == NULL)
        die("out of memory");
    int nrq = 0;
    for (int p = 0; p < g.np; p++) {
        if (p == g.me)
            continue;
        uint64_t *o = &out[(size_t)p * len];
        o[0] = epoch;
        o[1] = (uint64_t)g.ncomms;
        for (int c = 0; c < g.ncomms; c++)
            o[2 + c] = g.comms[c].sent[p];
        PMPI_Isend(o, (int)len, MPI_UINT64_T, p, TAG_COUNTS, g.ctl, &rq[nrq++]);
    }
    /* 2. drain until every peer's count is met */
    have[g.me] = 1;
    g.drained = 0;
    unsigned long spins = 0;
    for (;;) {
        for (int p = 0; p < g.np; p++) {
            if (have[p] || !g.have_early[p])
                continue;
            uint64_t *e = early_slot(p);
            g.have_early[p] = 0;
            if (e[0] == epoch)
                have[p] = 1;
            else if (e[0] < epoch)
                continue; /* stale */
            else
                die("COUNTS for a later epoch during a cut");
            if (e[1] != (uint64_t)g.ncomms)
                die("ranks track different communicators");
            g.have_early[p] = 1; /* keep the counts in the slot for the check below */
        }
        count_finished_recvs();
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
        int done = 1;
        for (int p = 0; p < g.np && done; p++) {
            if (!have[p]) {
                done = 0;
                break;
            }
            for (int c = 0; c < g.ncomms; c++) {
                uint64_t want = p == g.me ? g.comms[c].sent[g.me] : early_slot(p)[2 + c];
                if (g.comms[c].recv[p] < want)
                    done = 0;
                else if (g.comms[c].recv[p] > want)
                    die("received more messages than were sent: counting is broken");
            }
        }
        if (done)
            break;
        if (++spins == 2000000)
            dump_drain(epoch, have);
        int flag = 0;
        MPI_Status st;
        PMPI_Iprobe(MPI_ANY_SOURCE, TAG_COUNTS, g.ctl, &flag, &st);
        if (flag)
            take_counts(&st);
        else
            sched_yield();
    }
    for (int p = 0; p < g.np; p++)
        g.have_early[p] = 0;
    /* Keep progressing until every rank has drained: a receiver may still need this rank's
     * help to finish a large (rendezvous) transfer it has already matched. */
    MPI_Request drained;
    PMPI_Ibarrier(g.ctl, &drained);
    for (;;) {
        int flag = 0;
        PMPI_Test(&drained, &flag, MPI_STATUS_IGNORE);
        if (flag)
            break;
        count_finished_recvs();
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
    int r = symvirt_ctl_quiesce(epoch, g.quiesce_timeout_ms, &ic);
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
     * communicator: an alignment reduction may be pending on g.align (cut served from align). */
    PMPI_Barrier(g.ctl);
}

/* Waits for one request, serving cuts meanwhile. */
static int wait_serving(MPI_Request *req, MPI_Status *st)
{
    unsigned long turns = 0;
    for (;;) {
        int flag = 0;
        int rc = PMPI_Test(req, &flag, st);
        if (rc != MPI_SUCCESS || flag)
            return rc;
        idle(&turns);
    }
}

/* Agreement before a collective (or finalize) on a tracked communicator; see the top. */
static void align(void)
{
    for (;;) {
        uint64_t want = symvirt_ctl_requested();
        uint64_t mine = want > g.served ? want : 0, agreed = 0;
        MPI_Request r;
        PMPI_Iallreduce(&mine, &agreed, 1, MPI_UINT64_T, MPI_MAX, g.align, &r);
        for (unsigned long turns = 1;; turns++) {
            int flag = 0;
            PMPI_Test(&r, &flag, MPI_STATUS_IGNORE);
            if (flag)
                break;
            /* Never start a cut here (peers may already be past this point); answer one. */
            if ((turns & 63) == 0)
                serve_peers();
            if (turns > 4096)
                sched_yield();
        }
        /* Decide from the agreed value alone: identical on every rank. A rank may already
         * have made this cut (answering a peer while its reduction was pending); every rank
         * then aligns again, so all leave through the same round. */
        if (agreed == 0)
            return;
        if (agreed > g.served)
            cut(agreed);
    }
}

/* ---- init and finalize ------------------------------------------------------------------ */

static void setup(void)
{
    PMPI_Comm_rank(MPI_COMM_WORLD, &g.me);
    PMPI_Comm_size(MPI_COMM_WORLD, &g.np);
    PMPI_Comm_dup(MPI_COMM_WORLD, &g.ctl);
    PMPI_Comm_dup(MPI_COMM_WORLD, &g.align);
    track_comm(MPI_COMM_WORLD);
    g.early = calloc((size_t)g.np * (2 + MAX_COMMS), sizeof(uint64_t));
    g.have_early = calloc((size_t)g.np, sizeof(int));
    if (g.early == NULL || g.have_early == NULL)
        die("out of memory");
    g.log_dir = getenv("SYMVIRT_CUT_LOG");
    g.quiesce_timeout_ms = env_ms("SYMVIRT_QUIESCE_TIMEOUT_MS", 600000);
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
        align();
        /* From here no rank serves cuts: a request now fails the epoch at the agent. */
        g.closed = 1;
        symvirt_ctl_close();
        PMPI_Comm_free(&g.ctl);
        PMPI_Comm_free(&g.align);
    }
    return PMPI_Finalize();
}

int MPI_Comm_dup(MPI_Comm comm, MPI_Comm *newcomm)
{
    int tracked = g.ready && comm_id(comm) >= 0;
    if (tracked)
        align(); /* collective */
    int rc = PMPI_Comm_dup(comm, newcomm);
    if (rc == MPI_SUCCESS && tracked)
        track_comm(*newcomm);
    return rc;
}

int MPI_Comm_free(MPI_Comm *comm)
{
    int cid = g.ready ? comm_id(*comm) : -1;
    if (cid > 0) {
        /* Its counts stay (ranks free it collectively, so they stay comparable); it is no
         * longer drained. */
        align();
        g.comms[cid].comm = MPI_COMM_NULL;
    }
    return PMPI_Comm_free(comm);
}

/* ---- point to point --------------------------------------------------------------------- */

static void count_send(int cid, int dest)
{
    if (cid >= 0 && dest >= 0 && dest < g.np)
        g.comms[cid].sent[dest]++;
}

#define CID(comm) (g.ready && !g.closed ? comm_id(comm) : -1)

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

static int send_serving(const void *buf, int count, MPI_Datatype dt, int dest, int tag,
                        MPI_Comm comm, int synchronous)
{
    int cid = CID(comm);
    if (cid < 0)
        return synchronous ? PMPI_Ssend(buf, count, dt, dest, tag, comm)
                           : PMPI_Send(buf, count, dt, dest, tag, comm);
    count_send(cid, dest);
    MPI_Request r;
    int rc = synchronous ? PMPI_Issend(buf, count, dt, dest, tag, comm, &r)
                         : PMPI_Isend(buf, count, dt, dest, tag, comm, &r);
    if (rc != MPI_SUCCESS)
        return rc;
    return wait_serving(&r, MPI_STATUS_IGNORE);
}

int MPI_Send(const void *buf, int count, MPI_Datatype dt, int dest, int tag, MPI_Comm comm)
{
    return send_serving(buf, count, dt, dest, tag, comm, 0);
}

int MPI_Ssend(const void *buf, int count, MPI_Datatype dt, int dest, int tag, MPI_Comm comm)
{
    return send_serving(buf, count, dt, dest, tag, comm, 1);
}

int MPI_Rsend(const void *buf, int count, MPI_Datatype dt, int dest, int tag, MPI_Comm comm)
{
    return send_serving(buf, count, dt, dest, tag, comm, 0);
}

int MPI_Irecv(void *buf, int count, MPI_Datatype dt, int src, int tag, MPI_Comm comm,
              MPI_Request *req)
{
    int cid = CID(comm);
    if (cid < 0 || src == MPI_PROC_NULL)
        return PMPI_Irecv(buf, count, dt, src, tag, comm, req);
    buffered **link;
    if (find_buffered(cid, src, tag, &link) != NULL) {
        MPI_Status *st = malloc(sizeof *st);
        if (st == NULL)
            die("out of memory");
        deliver(link, buf, count, dt, st);
        int rc = PMPI_Grequest_start(gq_query, gq_free, gq_cancel, st, req);
        if (rc == MPI_SUCCESS)
            rc = PMPI_Grequest_complete(*req);
        return rc;
    }
    int rc = PMPI_Irecv(buf, count, dt, src, tag, comm, req);
    if (rc == MPI_SUCCESS)
        track_recv(*req, cid);
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
    track_recv(r, cid);
    MPI_Request handle = r;
    MPI_Status local;
    rc = wait_serving(&r, &local);
    completed(handle, &local);
    if (status != MPI_STATUS_IGNORE)
        *status = local;
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

/* ---- completion: test and wait families -------------------------------------------------- */

int MPI_Test(MPI_Request *req, int *flag, MPI_Status *status)
{
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
    MPI_Request handle = *req;
    MPI_Status local;
    int rc = wait_serving(req, &local);
    completed(handle, &local);
    if (status != MPI_STATUS_IGNORE)
        *status = local;
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

static int testall(int n, MPI_Request *reqs, int *flag, MPI_Status *sts)
{
    MPI_Request *h = snapshot(n, reqs);
    MPI_Status *local = statuses(n);
    int rc = PMPI_Testall(n, reqs, flag, local);
    if (*flag || rc == MPI_ERR_IN_STATUS)
        for (int i = 0; i < n; i++)
            if (reqs[i] == MPI_REQUEST_NULL && h[i] != MPI_REQUEST_NULL)
                completed(h[i], &local[i]);
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

int MPI_Request_free(MPI_Request *req)
{
    /* A freed receive can no longer be observed; stop tracking it (documented: it is then
     * not counted, so freeing a pending receive makes a cut wait for its deadline). */
    MPI_Request handle = *req;
    for (int i = 0; i < g.nrecvs; i++)
        if (g.recvs[i].req == handle) {
            g.recvs[i] = g.recvs[--g.nrecvs];
            break;
        }
    return PMPI_Request_free(req);
}

/* ---- collectives: aligned first on tracked communicators --------------------------------- */

#define ALIGNED(comm, call)                                                                    \
    do {                                                                                       \
        if (CID(comm) >= 0)                                                                    \
            align();                                                                           \
        return call;                                                                           \
    } while (0)

int MPI_Barrier(MPI_Comm comm)
{
    ALIGNED(comm, PMPI_Barrier(comm));
}

int MPI_Bcast(void *buf, int count, MPI_Datatype dt, int root, MPI_Comm comm)
{
    ALIGNED(comm, PMPI_Bcast(buf, count, dt, root, comm));
}

int MPI_Reduce(const void *s, void *r, int count, MPI_Datatype dt, MPI_Op op, int root,
               MPI_Comm comm)
{
    ALIGNED(comm, PMPI_Reduce(s, r, count, dt, op, root, comm));
}

int MPI_Allreduce(const void *s, void *r, int count, MPI_Datatype dt, MPI_Op op, MPI_Comm comm)
{
    ALIGNED(comm, PMPI_Allreduce(s, r, count, dt, op, comm));
}

int MPI_Alltoall(const void *s, int sc, MPI_Datatype sdt, void *r, int rc, MPI_Datatype rdt,
                 MPI_Comm comm)
{
    ALIGNED(comm, PMPI_Alltoall(s, sc, sdt, r, rc, rdt, comm));
}

int MPI_Alltoallv(const void *s, const int sc[], const int sd[], MPI_Datatype sdt, void *r,
                  const int rc[], const int rd[], MPI_Datatype rdt, MPI_Comm comm)
{
    ALIGNED(comm, PMPI_Alltoallv(s, sc, sd, sdt, r, rc, rd, rdt, comm));
}

int MPI_Allgather(const void *s, int sc, MPI_Datatype sdt, void *r, int rc, MPI_Datatype rdt,
                  MPI_Comm comm)
{
    ALIGNED(comm, PMPI_Allgather(s, sc, sdt, r, rc, rdt, comm));
}

int MPI_Allgatherv(const void *s, int sc, MPI_Datatype sdt, void *r, const int rc[],
                   const int rd[], MPI_Datatype rdt, MPI_Comm comm)
{
    ALIGNED(comm, PMPI_Allgatherv(s, sc, sdt, r, rc, rd, rdt, comm));
}

int MPI_Gather(const void *s, int sc, MPI_Datatype sdt, void *r, int rc, MPI_Datatype rdt,
               int root, MPI_Comm comm)
{
    ALIGNED(comm, PMPI_Gather(s, sc, sdt, r, rc, rdt, root, comm));
}

int MPI_Gatherv(const void *s, int sc, MPI_Datatype sdt, void *r, const int rc[],
                const int rd[], MPI_Datatype rdt, int root, MPI_Comm comm)
{
    ALIGNED(comm, PMPI_Gatherv(s, sc, sdt, r, rc, rd, rdt, root, comm));
}

int MPI_Scatter(const void *s, int sc, MPI_Datatype sdt, void *r, int rc, MPI_Datatype rdt,
                int root, MPI_Comm comm)
{
    ALIGNED(comm, PMPI_Scatter(s, sc, sdt, r, rc, rdt, root, comm));
}

int MPI_Scatterv(const void *s, const int sc[], const int sd[], MPI_Datatype sdt, void *r,
                 int rc, MPI_Datatype rdt, int root, MPI_Comm comm)
{
    ALIGNED(comm, PMPI_Scatterv(s, sc, sd, sdt, r, rc, rdt, root, comm));
}

int MPI_Reduce_scatter_block(const void *s, void *r, int rc, MPI_Datatype dt, MPI_Op op,
                             MPI_Comm comm)
{
    ALIGNED(comm, PMPI_Reduce_scatter_block(s, r, rc, dt, op, comm));
}

int MPI_Scan(const void *s, void *r, int count, MPI_Datatype dt, MPI_Op op, MPI_Comm comm)
{
    ALIGNED(comm, PMPI_Scan(s, r, count, dt, op, comm));
}

/* ---- Fortran entry points (Open MPI) ------------------------------------------------------
 * Open MPI's Fortran bindings (mpif.h and `use mpi`) call PMPI_* directly, so the C wrappers
 * above never see Fortran traffic: wrap the gfortran symbols (mpi_send_ ...) and forward to
 * them. MPICH's Fortran bindings call the C MPI_* functions, which are already wrapped; wrapping
 * them again would count twice. The mpi_f08 bindings are not covered. */
#ifdef SYMVIRT_MPI_IMPL_OPENMPI

extern char mpi_fortran_status_ignore_[];
extern char mpi_fortran_statuses_ignore_[];
extern char mpi_fortran_in_place_[];
extern char mpi_fortran_bottom_[];

static void *fbuf(void *b)
{
    if (b == (void *)mpi_fortran_in_place_)
        return MPI_IN_PLACE;
    if (b == (void *)mpi_fortran_bottom_)
        return MPI_BOTTOM;
    return b;
}

static int status_ignored(MPI_Fint *f)
{
    return (char *)f == mpi_fortran_status_ignore_;
}

static void status_out(const MPI_Status *c, MPI_Fint *f)
{
    if (!status_ignored(f))
        PMPI_Status_c2f(c, f);
}

#define FSTATUS(f, c) (status_ignored(f) ? MPI_STATUS_IGNORE : (c))

void mpi_init_(MPI_Fint *ierr)
{
    *ierr = MPI_Init(NULL, NULL);
}

void mpi_init_thread_(MPI_Fint *required, MPI_Fint *provided, MPI_Fint *ierr)
{
    int p = 0;
    *ierr = MPI_Init_thread(NULL, NULL, *required, &p);
    *provided = p;
}

void mpi_finalize_(MPI_Fint *ierr)
{
    *ierr = MPI_Finalize();
}

void mpi_comm_dup_(MPI_Fint *comm, MPI_Fint *newcomm, MPI_Fint *ierr)
{
    MPI_Comm c;
    *ierr = MPI_Comm_dup(PMPI_Comm_f2c(*comm), &c);
    if (*ierr == MPI_SUCCESS)
        *newcomm = PMPI_Comm_c2f(c);
}

void mpi_comm_free_(MPI_Fint *comm, MPI_Fint *ierr)
{
    MPI_Comm c = PMPI_Comm_f2c(*comm);
    *ierr = MPI_Comm_free(&c);
    if (*ierr == MPI_SUCCESS)
        *comm = PMPI_Comm_c2f(c);
}

#define FSEND(fname, cname)                                                                    \
    void fname(void *buf, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *dest, MPI_Fint *tag,        \
               MPI_Fint *comm, MPI_Fint *ierr)                                                 \
    {                                                                                          \
        *ierr = cname(fbuf(buf), *count, PMPI_Type_f2c(*dt), *dest, *tag,                     \
                      PMPI_Comm_f2c(*comm));                                                  \
    }
FSEND(mpi_send_, MPI_Send)
FSEND(mpi_ssend_, MPI_Ssend)
FSEND(mpi_rsend_, MPI_Rsend)
FSEND(mpi_bsend_, MPI_Bsend)

#define FISEND(fname, cname)                                                                   \
    void fname(void *buf, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *dest, MPI_Fint *tag,        \
               MPI_Fint *comm, MPI_Fint *req, MPI_Fint *ierr)                                  \
    {                                                                                          \
        MPI_Request r;                                                                         \
        *ierr = cname(fbuf(buf), *count, PMPI_Type_f2c(*dt), *dest, *tag,                     \
                      PMPI_Comm_f2c(*comm), &r);                                              \
        if (*ierr == MPI_SUCCESS)                                                              \
            *req = PMPI_Request_c2f(r);                                                        \
    }
FISEND(mpi_isend_, MPI_Isend)
FISEND(mpi_issend_, MPI_Issend)
FISEND(mpi_irsend_, MPI_Irsend)
FISEND(mpi_ibsend_, MPI_Ibsend)
FISEND(mpi_irecv_, MPI_Irecv)

void mpi_recv_(void *buf, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *src, MPI_Fint *tag,
               MPI_Fint *comm, MPI_Fint *status, MPI_Fint *ierr)
{
    MPI_Status c;
    *ierr = MPI_Recv(fbuf(buf), *count, PMPI_Type_f2c(*dt), *src, *tag, PMPI_Comm_f2c(*comm),
                     FSTATUS(status, &c));
    if (*ierr == MPI_SUCCESS)
        status_out(&c, status);
}

void mpi_sendrecv_(void *sbuf, MPI_Fint *scount, MPI_Fint *sdt, MPI_Fint *dest, MPI_Fint *stag,
                   void *rbuf, MPI_Fint *rcount, MPI_Fint *rdt, MPI_Fint *src, MPI_Fint *rtag,
                   MPI_Fint *comm, MPI_Fint *status, MPI_Fint *ierr)
{
    MPI_Status c;
    *ierr = MPI_Sendrecv(fbuf(sbuf), *scount, PMPI_Type_f2c(*sdt), *dest, *stag, fbuf(rbuf),
                         *rcount, PMPI_Type_f2c(*rdt), *src, *rtag, PMPI_Comm_f2c(*comm),
                         FSTATUS(status, &c));
    if (*ierr == MPI_SUCCESS)
        status_out(&c, status);
}

void mpi_probe_(MPI_Fint *src, MPI_Fint *tag, MPI_Fint *comm, MPI_Fint *status, MPI_Fint *ierr)
{
    MPI_Status c;
    *ierr = MPI_Probe(*src, *tag, PMPI_Comm_f2c(*comm), FSTATUS(status, &c));
    if (*ierr == MPI_SUCCESS)
        status_out(&c, status);
}

void mpi_iprobe_(MPI_Fint *src, MPI_Fint *tag, MPI_Fint *comm, MPI_Fint *flag, MPI_Fint *status,
                 MPI_Fint *ierr)
{
    MPI_Status c;
    int f = 0;
    *ierr = MPI_Iprobe(*src, *tag, PMPI_Comm_f2c(*comm), &f, FSTATUS(status, &c));
    *flag = f;
    if (*ierr == MPI_SUCCESS && f)
        status_out(&c, status);
}

void mpi_wait_(MPI_Fint *req, MPI_Fint *status, MPI_Fint *ierr)
{
    MPI_Request r = PMPI_Request_f2c(*req);
    MPI_Status c;
    *ierr = MPI_Wait(&r, FSTATUS(status, &c));
    if (*ierr == MPI_SUCCESS) {
        *req = PMPI_Request_c2f(r);
        status_out(&c, status);
    }
}

void mpi_test_(MPI_Fint *req, MPI_Fint *flag, MPI_Fint *status, MPI_Fint *ierr)
{
    MPI_Request r = PMPI_Request_f2c(*req);
    MPI_Status c;
    int f = 0;
    *ierr = MPI_Test(&r, &f, FSTATUS(status, &c));
    *flag = f;
    if (*ierr == MPI_SUCCESS && f) {
        *req = PMPI_Request_c2f(r);
        status_out(&c, status);
    }
}

/* Converts a Fortran request array; statuses are converted back by the caller. */
static MPI_Request *creqs(int n, const MPI_Fint *f)
{
    MPI_Request *r = malloc((size_t)(n > 0 ? n : 1) * sizeof *r);
    if (r == NULL)
        die("out of memory");
    for (int i = 0; i < n; i++)
        r[i] = PMPI_Request_f2c(f[i]);
    return r;
}

static void freqs(int n, const MPI_Request *r, MPI_Fint *f)
{
    for (int i = 0; i < n; i++)
        f[i] = PMPI_Request_c2f(r[i]);
}

static int statuses_ignored(MPI_Fint *f)
{
    return (char *)f == mpi_fortran_statuses_ignore_;
}

void mpi_waitall_(MPI_Fint *n, MPI_Fint *reqs, MPI_Fint *sts, MPI_Fint *ierr)
{
    MPI_Request *r = creqs(*n, reqs);
    MPI_Status *c = statuses(*n);
    *ierr = MPI_Waitall(*n, r, c);
    freqs(*n, r, reqs);
    if (!statuses_ignored(sts))
        for (int i = 0; i < *n; i++)
            PMPI_Status_c2f(&c[i], &sts[i * (int)(sizeof(MPI_Status) / sizeof(int))]);
    free(r);
    free(c);
}

void mpi_testall_(MPI_Fint *n, MPI_Fint *reqs, MPI_Fint *flag, MPI_Fint *sts, MPI_Fint *ierr)
{
    MPI_Request *r = creqs(*n, reqs);
    MPI_Status *c = statuses(*n);
    int f = 0;
    *ierr = MPI_Testall(*n, r, &f, c);
    *flag = f;
    freqs(*n, r, reqs);
    if (f && !statuses_ignored(sts))
        for (int i = 0; i < *n; i++)
            PMPI_Status_c2f(&c[i], &sts[i * (int)(sizeof(MPI_Status) / sizeof(int))]);
    free(r);
    free(c);
}

void mpi_waitany_(MPI_Fint *n, MPI_Fint *reqs, MPI_Fint *idx, MPI_Fint *status, MPI_Fint *ierr)
{
    MPI_Request *r = creqs(*n, reqs);
    MPI_Status c;
    int i = 0;
    *ierr = MPI_Waitany(*n, r, &i, FSTATUS(status, &c));
    freqs(*n, r, reqs);
    *idx = i == MPI_UNDEFINED ? MPI_UNDEFINED : i + 1; /* Fortran indices start at 1 */
    if (*ierr == MPI_SUCCESS)
        status_out(&c, status);
    free(r);
}

void mpi_request_free_(MPI_Fint *req, MPI_Fint *ierr)
{
    MPI_Request r = PMPI_Request_f2c(*req);
    *ierr = MPI_Request_free(&r);
    if (*ierr == MPI_SUCCESS)
        *req = PMPI_Request_c2f(r);
}

void mpi_barrier_(MPI_Fint *comm, MPI_Fint *ierr)
{
    *ierr = MPI_Barrier(PMPI_Comm_f2c(*comm));
}

void mpi_bcast_(void *buf, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *root, MPI_Fint *comm,
                MPI_Fint *ierr)
{
    *ierr = MPI_Bcast(fbuf(buf), *count, PMPI_Type_f2c(*dt), *root, PMPI_Comm_f2c(*comm));
}

void mpi_reduce_(void *s, void *r, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *op, MPI_Fint *root,
                 MPI_Fint *comm, MPI_Fint *ierr)
{
    *ierr = MPI_Reduce(fbuf(s), fbuf(r), *count, PMPI_Type_f2c(*dt), PMPI_Op_f2c(*op), *root,
                       PMPI_Comm_f2c(*comm));
}

void mpi_allreduce_(void *s, void *r, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *op,
                    MPI_Fint *comm, MPI_Fint *ierr)
{
    *ierr = MPI_Allreduce(fbuf(s), fbuf(r), *count, PMPI_Type_f2c(*dt), PMPI_Op_f2c(*op),
                          PMPI_Comm_f2c(*comm));
}

#define FGATHERLIKE(fname, cname)                                                              \
    void fname(void *s, MPI_Fint *sc, MPI_Fint *sdt, void *r, MPI_Fint *rc, MPI_Fint *rdt,     \
               MPI_Fint *comm, MPI_Fint *ierr)                                                 \
    {                                                                                          \
        *ierr = cname(fbuf(s), *sc, PMPI_Type_f2c(*sdt), fbuf(r), *rc, PMPI_Type_f2c(*rdt),    \
                      PMPI_Comm_f2c(*comm));                                                  \
    }
FGATHERLIKE(mpi_alltoall_, MPI_Alltoall)
FGATHERLIKE(mpi_allgather_, MPI_Allgather)

#define FROOTED(fname, cname)                                                                  \
    void fname(void *s, MPI_Fint *sc, MPI_Fint *sdt, void *r, MPI_Fint *rc, MPI_Fint *rdt,     \
               MPI_Fint *root, MPI_Fint *comm, MPI_Fint *ierr)                                 \
    {                                                                                          \
        *ierr = cname(fbuf(s), *sc, PMPI_Type_f2c(*sdt), fbuf(r), *rc, PMPI_Type_f2c(*rdt),    \
                      *root, PMPI_Comm_f2c(*comm));                                           \
    }
FROOTED(mpi_gather_, MPI_Gather)
FROOTED(mpi_scatter_, MPI_Scatter)

#endif /* SYMVIRT_MPI_IMPL_OPENMPI */
