/* ---- persistent requests ----------------------------------------------------------------
 * A send counts at each MPI_Start; a receive's Start is served from the buffer when a drained
 * message matches (a substitute: the next test or wait returns its status), else it is a
 * pending receive like an Irecv. A persistent collective's Start (MPI 4) is deferred until
 * every member has called it (deferred.c). Also MPI_Request_free (a pending receive is held
 * until it completes, see tracked_req) and MPI_Cancel. */
#include "pmpi_internal.h"

/* ---- persistent requests served from the buffer ------------------------------------------ */

int svp_take_substitute(MPI_Request h, MPI_Status *st, int *err)
{
    for (int i = 0; i < svp.subst.n; i++)
        if (svp.subst.v[i].req == h) {
            substitute s = svp.subst.v[i];
            svp.subst.v[i] = svp.subst.v[--svp.subst.n];
            if (st != MPI_STATUS_IGNORE)
                *st = s.st;
            if (err != NULL)
                *err = svp_raised(s.comm, s.st.MPI_ERROR);
            return 1;
        }
    return 0;
}

int svp_find_substitute(int n, const MPI_Request *reqs)
{
    if (svp.subst.n == 0)
        return -1;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < svp.subst.n; j++)
            if (reqs[i] != MPI_REQUEST_NULL && reqs[i] == svp.subst.v[j].req)
                return i;
    return -1;
}

static int find_persistent(MPI_Request h)
{
    for (int i = 0; i < svp.pers.n; i++)
        if (svp.pers.v[i].req == h)
            return i;
    return -1;
}

/* ---- the wrappers ------------------------------------------------------------------------ */

static void add_persistent(MPI_Request r, int cid, int is_recv, int peer, int tag, void *buf,
                           int count, MPI_Datatype dt)
{
    GROW(svp.pers);
    svp.pers.v[svp.pers.n++] = (persistent){.req = r, .cid = cid, .is_recv = is_recv,
                                            .peer = peer, .tag = tag, .count = count,
                                            .buf = buf, .dt = dt};
}

void svp_add_uncovered(MPI_Request r, int cid, const char *call)
{
    GROW(svp.pers);
    svp.pers.v[svp.pers.n++] = (persistent){.req = r, .cid = cid, .uncovered = call};
}

int svp_npcoll;

static int find_pcoll(MPI_Request h)
{
    int p = h == MPI_REQUEST_NULL ? -1 : find_persistent(h);
    return p >= 0 && svp.pers.v[p].collective ? p : -1;
}

int svp_pcoll_state(MPI_Request h)
{
    int p = find_pcoll(h);
    if (p < 0)
        return PCOLL_NOT;
    if (!svp.pers.v[p].active)
        return PCOLL_INACTIVE;
    if (svp.pers.v[p].start_err != MPI_SUCCESS)
        return PCOLL_FAILED;
    return svp_ndeferred && svp_start_pending(h) ? PCOLL_UNSTARTED : PCOLL_STARTED;
}

int svp_any_pcoll(int n, const MPI_Request *reqs)
{
    for (int i = 0; i < n && svp_npcoll; i++)
        if (find_pcoll(reqs[i]) >= 0)
            return 1;
    return 0;
}

void svp_pcoll_completed(MPI_Request h)
{
    int p = find_pcoll(h);
    if (p >= 0)
        svp.pers.v[p].active = 0;
}

void svp_pcoll_start_failed(MPI_Request h, int rc)
{
    int p = find_pcoll(h);
    if (p >= 0)
        svp.pers.v[p].start_err = rc;
}

int svp_pcoll_take_error(MPI_Request h, MPI_Status *st, int keep)
{
    int p = find_pcoll(h);
    if (p < 0)
        return MPI_SUCCESS;
    persistent *x = &svp.pers.v[p];
    int rc = x->start_err;
    if (st != MPI_STATUS_IGNORE) {
        memset(st, 0, sizeof *st);
        st->MPI_SOURCE = MPI_ANY_SOURCE;
        st->MPI_TAG = MPI_ANY_TAG;
        st->MPI_ERROR = rc;
    }
    if (keep)
        return MPI_SUCCESS;
    x->start_err = MPI_SUCCESS;
    x->active = 0;
    PMPI_Comm_call_errhandler(x->comm, rc);
    return rc;
}

int svp_persistent_collective(coll *c, const char *call)
{
    c->cid = svp_cid(c->comm);
    c->makes_persistent = 1;
    MPI_Request *req = c->req;
    int rc = svp_align(c->cid, c);
    if (rc == MPI_SUCCESS && svp.ready && !svp.closed) {
        if (c->cid < 0 || svp.comms[c->cid].inter) {
            svp_add_uncovered(*req, c->cid, call);
        } else {
            GROW(svp.pers);
            svp.pers.v[svp.pers.n++] = (persistent){
                .req = *req, .cid = c->cid, .collective = 1, .comm = c->comm,
                .ordinal = svp.comms[c->cid].pcolls++}; /* the _init calls keep their order */
            svp_npcoll++;
        }
    }
    return rc;
}

const char *svp_uncovered_alive(void)
{
    for (int i = 0; i < svp.pers.n; i++)
        if (svp.pers.v[i].uncovered != NULL)
            return svp.pers.v[i].uncovered;
    return NULL;
}

#define SEND_INIT(name, pname)                                                                 \
    int name(const void *buf, int count, MPI_Datatype dt, int dest, int tag, MPI_Comm comm,    \
             MPI_Request *req)                                                                 \
    {                                                                                          \
        GUARD();                                                                               \
        int cid = svp_cid(comm);                                                               \
        int rc = pname(buf, count, dt, dest, tag, comm, req);                                  \
        if (rc == MPI_SUCCESS && cid >= 0)                                                     \
            add_persistent(*req, cid, 0, dest, tag, (void *)buf, count, dt);                   \
        return rc;                                                                             \
    }
SEND_INIT(MPI_Send_init, PMPI_Send_init)
SEND_INIT(MPI_Ssend_init, PMPI_Ssend_init)
SEND_INIT(MPI_Rsend_init, PMPI_Rsend_init)
SEND_INIT(MPI_Bsend_init, PMPI_Bsend_init)

#if MPI_VERSION >= 4
/* MPI 4's large-count forms: through the int ones (the layer serves a persistent receive from
 * its buffer with the count it was made with); a count beyond an int is refused. */
#define INIT_C(name, buf_type)                                                                 \
    int MPI_##name##_c(buf_type buf, MPI_Count count, MPI_Datatype dt, int peer, int tag,      \
                       MPI_Comm comm, MPI_Request *req)                                        \
    {                                                                                          \
        GUARD();                                                                               \
        if (!svp_fits_int(count))                                                              \
            return svp_refuse(comm, "MPI_" #name "_c", SVP_COUNT_ABOVE_INT);                  \
        return MPI_##name(buf, (int)count, dt, peer, tag, comm, req);                          \
    }

INIT_C(Send_init, const void *)
INIT_C(Ssend_init, const void *)
INIT_C(Rsend_init, const void *)
INIT_C(Bsend_init, const void *)
INIT_C(Recv_init, void *)
#endif

int MPI_Recv_init(void *buf, int count, MPI_Datatype dt, int src, int tag, MPI_Comm comm,
                  MPI_Request *req)
{
    GUARD();
    int cid = svp_cid(comm);
    int rc = PMPI_Recv_init(buf, count, dt, src, tag, comm, req);
    if (rc == MPI_SUCCESS && cid >= 0)
        add_persistent(*req, cid, 1, src, tag, buf, count, dt);
    return rc;
}

#if MPI_VERSION >= 4
/* MPI 4's partitioned communication (MPICH 4): observed, not covered, like persistent
 * collectives (see svp_add_uncovered); the calls that move partitions are wrapped so that
 * they, too, run inside the gate (never while the progress thread makes a cut). */
#define PARTITIONED_INIT(name, buf_type)                                                        \
    int MPI_##name(buf_type buf, int partitions, MPI_Count count, MPI_Datatype dt, int peer,   \
                   int tag, MPI_Comm comm, MPI_Info info, MPI_Request *req)                    \
    {                                                                                          \
        GUARD();                                                                               \
        int cid = svp_cid(comm);                                                               \
        int rc = PMPI_##name(buf, partitions, count, dt, peer, tag, comm, info, req);          \
        if (rc == MPI_SUCCESS && svp.ready && !svp.closed)                                     \
            svp_add_uncovered(*req, cid, "MPI_" #name);                                        \
        return rc;                                                                             \
    }

PARTITIONED_INIT(Psend_init, const void *)
PARTITIONED_INIT(Precv_init, void *)

int MPI_Pready(int partition, MPI_Request req)
{
    GUARD();
    return PMPI_Pready(partition, req);
}

int MPI_Pready_range(int low, int high, MPI_Request req)
{
    GUARD();
    return PMPI_Pready_range(low, high, req);
}

int MPI_Pready_list(int length, int partitions[], MPI_Request req)
{
    GUARD();
    return PMPI_Pready_list(length, partitions, req);
}

int MPI_Parrived(MPI_Request req, int partition, int *flag)
{
    GUARD();
    return PMPI_Parrived(req, partition, flag);
}
#endif

int MPI_Start(MPI_Request *req)
{
    GUARD();
    int i = svp.ready && !svp.closed ? find_persistent(*req) : -1;
    if (i < 0)
        return PMPI_Start(req);
    persistent *p = &svp.pers.v[i];
    if (p->uncovered != NULL)
        return PMPI_Start(req);
#if MPI_VERSION >= 4
    if (p->collective) {
        p->active = 1;
        return svp_start_persistent(p->cid, *req, p->ordinal);
    }
#endif
    if (!p->is_recv) {
        svp_count_send(p->cid, p->peer);
        return svp_send_started(p->cid, p->peer, PMPI_Start(req));
    }
    buffered **link;
    if (p->peer != MPI_PROC_NULL && svp_find_buffered(p->cid, p->peer, p->tag, &link) != NULL) {
        /* Served from the buffer: the real request stays inactive; the next test or wait on
         * it returns this message's status. */
        GROW(svp.subst);
        substitute *s = &svp.subst.v[svp.subst.n++];
        s->req = *req;
        s->comm = svp.comms[p->cid].comm;
        if (s->comm == MPI_COMM_NULL)
            s->comm = MPI_COMM_SELF; /* freed: MPI 4 raises errors without one there */
        svp_deliver(link, p->buf, p->count, p->dt, &s->st);
        return MPI_SUCCESS;
    }
    int rc = PMPI_Start(req);
    if (rc == MPI_SUCCESS)
        svp_track_req(*req, p->cid, REQ_RECV);
    return rc;
}

int MPI_Startall(int n, MPI_Request reqs[])
{
    GUARD();
    for (int i = 0; i < n; i++) {
        int rc = MPI_Start(&reqs[i]);
        if (rc != MPI_SUCCESS)
            return rc;
    }
    return MPI_SUCCESS;
}

int MPI_Request_free(MPI_Request *req)
{
    GUARD();
    MPI_Request handle = *req;
    if (svp_ndeferred && svp_start_pending(handle))
        return svp_refuse(MPI_COMM_SELF, "MPI_Request_free",
                          "a started persistent collective cannot be freed before it completes");
    if (svp_ndeferred)
        svp_detach_deferred(handle); /* a compound's (see deferred.c) */
    svp_take_substitute(handle, MPI_STATUS_IGNORE, NULL);
    int i = find_persistent(handle);
    if (i >= 0) {
        svp_npcoll -= svp.pers.v[i].collective;
        svp.pers.v[i] = svp.pers.v[--svp.pers.n];
    }
    /* A pending receive still takes its message, which its sender counted: the layer keeps
     * watching it (a cut counts it when it completes) and frees it then. */
    if (svp_hold_freed(handle)) {
        *req = MPI_REQUEST_NULL;
        return MPI_SUCCESS;
    }
    svp_forget_req(handle);
    return PMPI_Request_free(req);
}

#define SEND_CANCEL "cancelling a send is not supported (its count was taken when it started)"

int MPI_Cancel(MPI_Request *req)
{
    GUARD();
    /* A receive served from the buffer is already complete: cancelling it has no effect and
     * the message is delivered. A real pending receive is cancelled only if MPI says so in
     * its status (then it is not counted). A send's count cannot be taken back. */
    MPI_Request h = *req;
    for (int i = 0; i < svp.subst.n; i++)
        if (svp.subst.v[i].req == h)
            return MPI_SUCCESS;
    int deferred = svp_ndeferred ? svp_is_deferred(h) : 0;
    if (deferred == DEFERRED_COMPOUND)
        return svp_refuse(MPI_COMM_SELF, "MPI_Cancel",
                          "cancelling MPI_Isendrecv is not supported (its send was counted "
                          "when it started)");
    if (deferred)
        return svp_refuse(MPI_COMM_SELF, "MPI_Cancel",
                          "a non-blocking collective cannot be cancelled");
    for (int i = 0; i < svp.reqs.n; i++)
        if (svp.reqs.v[i].req == h)
            return svp.reqs.v[i].kind == REQ_RECV
                       ? PMPI_Cancel(req)
                       : svp_refuse(MPI_COMM_SELF, "MPI_Cancel",
                                    "a non-blocking collective cannot be cancelled");
    int p = find_persistent(h);
    if (p >= 0 && (svp.pers.v[p].is_recv || svp.pers.v[p].uncovered != NULL ||
                   svp.pers.v[p].collective)) /* a started collective is deferred or tracked */
        return PMPI_Cancel(req); /* inactive, or not the layer's to refuse: MPI decides */
    if (p >= 0)
        return svp_refuse(MPI_COMM_SELF, "MPI_Cancel", SEND_CANCEL);
    if (!svp.ready || svp.closed)
        return PMPI_Cancel(req);
    /* Unknown to the layer: a send (counted when started), a complete generalized request
     * from the buffer, or a request on a communicator that is not observed. */
    int flag = 0;
    PMPI_Request_get_status(h, &flag, MPI_STATUS_IGNORE);
    if (flag)
        return MPI_SUCCESS; /* complete: nothing to cancel */
    return svp_refuse(MPI_COMM_SELF, "MPI_Cancel", SEND_CANCEL);
}
