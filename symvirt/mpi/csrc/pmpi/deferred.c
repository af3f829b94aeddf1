/* ---- non-blocking collectives: started once every member has called them -----------------
 * A non-blocking collective on an intracommunicator returns at once with a generalized
 * request. The layer starts the real collective when every member has called it (an
 * alignment with nothing to agree on, progressed wherever the layer progresses: wait loops,
 * test calls, alignments, cuts), in the order the members called collectives on that
 * communicator, and completes the application's request with the real one's status. So no
 * rank waits at the start of a non-blocking collective (a program may keep receiving while
 * it is pending: the NBX pattern), and a cut only ever waits for collectives that every
 * member has started: each member in a cut starts those that became ready.
 *
 * The same list carries compounds (MPI 4's MPI_Isendrecv and _replace): an application's
 * request made of the layer's own receive and send, started at once, completed with the
 * receive's status when both parts have, progressed in the same places.
 *
 * And the starts of MPI 4's persistent collectives (MPI_Start of an MPI_Allreduce_init's
 * request...): deferred until every member has started that request as often, so a
 * persistent collective is in flight only once every member has started it, and a cut waits
 * only for such ones. MPI 4 lets members start persistent collectives in any order, so each
 * start has its own agreement (svp_start_agreement: the request's ordinal on its
 * communicator, not the order of calls) and waits for no other collective, nor another for
 * it. The application holds MPI's own request: until its deferred start is made, the
 * completion calls take it as incomplete (MPI would take an inactive one as complete:
 * svp_start_pending); once made it is watched like a started collective (svp_perform), and
 * completes through MPI. */
#include "pmpi_internal.h"

typedef struct deferred {
    struct deferred *next; /* in the order the application called them */
    coll c;                /* its arguments; c.req points at real once started */
    MPI_Request app;       /* the generalized request the application holds */
    MPI_Request real;
    MPI_Status work;       /* the real one's status (a compound's: its receive's) */
    MPI_Status *st;        /* the application's request's, copied from work at completion */
    int detached;          /* the application freed its request (MPI_Request_free): MPICH
                            * freed st then; the request is still completed, st untouched */
    agreement a;
    int started;
    /* A compound's: its send part (real is its receive), and what turns the receive's status
     * into the application's once both completed (NULL: nothing); MPI_REQUEST_NULL and NULL
     * for a collective. */
    MPI_Request send;
    void (*finish)(const coll *c, MPI_Status *st);
    int err;        /* a compound's first failed part */
    int compound;   /* a compound, not a collective */
    int persistent; /* the start of a persistent collective: app is MPI's own request */
} deferred;

static deferred *deferred_head;
static deferred **deferred_tail = &deferred_head;
int svp_ndeferred;

static int deferred_query(void *extra, MPI_Status *st)
{
    *st = *(MPI_Status *)extra;
    return st->MPI_ERROR;
}

/* Whether a non-blocking collective called on slot cid before d (or at all, d NULL) has not
 * started yet (persistent collectives' starts do not count: they keep no order). */
static int unstarted_before(int cid, const deferred *d)
{
    for (const deferred *e = deferred_head; e != NULL && e != d; e = e->next)
        if (!e->started && !e->persistent && e->c.cid == cid)
            return 1;
    return 0;
}

static void finish_deferred(deferred *d, int err)
{
    if (!d->detached) {
        *d->st = d->work;
        d->st->MPI_ERROR = err;
    }
    PMPI_Grequest_complete(d->app);
}

/* One turn of a compound: tests the parts still open; once both completed, completes the
 * application's request. Returns whether it is done. */
static int progress_compound(deferred *d)
{
    if (d->real != MPI_REQUEST_NULL) {
        int flag = 0;
        MPI_Request h = d->real;
        int rc = PMPI_Test(&d->real, &flag, &d->work);
        if (rc != MPI_SUCCESS || flag) {
            svp_completed(h, &d->work); /* counts the receive, as MPI_Test would */
            d->real = MPI_REQUEST_NULL;
            if (d->err == MPI_SUCCESS)
                d->err = rc != MPI_SUCCESS ? rc : d->work.MPI_ERROR;
        }
    }
    if (d->send != MPI_REQUEST_NULL) {
        int flag = 0;
        MPI_Status st;
        int rc = PMPI_Test(&d->send, &flag, &st);
        if (rc != MPI_SUCCESS || flag) {
            d->send = MPI_REQUEST_NULL;
            if (d->err == MPI_SUCCESS && rc != MPI_SUCCESS)
                d->err = rc;
        }
    }
    if (d->real != MPI_REQUEST_NULL || d->send != MPI_REQUEST_NULL)
        return 0;
    if (d->finish != NULL)
        d->finish(&d->c, &d->work);
    finish_deferred(d, d->err);
    return 1;
}

/* Datatypes and operations the application freed while a non-blocking collective it called
 * had not started (MPI lets a program free them as soon as the call returned, and the real
 * collective may use them when it starts): freed for real once no collective is left
 * unstarted. */
static LIST(MPI_Datatype, held_types);
static LIST(MPI_Op, held_ops);

static int any_unstarted(void)
{
    for (const deferred *d = deferred_head; d != NULL; d = d->next)
        if (!d->started)
            return 1;
    return 0;
}

static void release_held(void)
{
    if ((held_types.n == 0 && held_ops.n == 0) || any_unstarted())
        return;
    for (int i = 0; i < held_types.n; i++)
        PMPI_Type_free(&held_types.v[i]);
    for (int i = 0; i < held_ops.n; i++)
        PMPI_Op_free(&held_ops.v[i]);
    held_types.n = held_ops.n = 0;
}

int MPI_Type_free(MPI_Datatype *t)
{
    GUARD();
    int ni = 0, na = 0, nd = 0, combiner = MPI_COMBINER_NAMED;
    if (svp_ndeferred && any_unstarted() && *t != MPI_DATATYPE_NULL &&
        PMPI_Type_get_envelope(*t, &ni, &na, &nd, &combiner) == MPI_SUCCESS &&
        combiner != MPI_COMBINER_NAMED) {
        GROW(held_types);
        held_types.v[held_types.n++] = *t;
        *t = MPI_DATATYPE_NULL;
        return MPI_SUCCESS;
    }
    return PMPI_Type_free(t);
}

int MPI_Op_free(MPI_Op *op)
{
    GUARD();
    if (svp_ndeferred && any_unstarted() && *op != MPI_OP_NULL) {
        GROW(held_ops);
        held_ops.v[held_ops.n++] = *op;
        *op = MPI_OP_NULL;
        return MPI_SUCCESS;
    }
    return PMPI_Op_free(op);
}

void svp_progress_deferred(void)
{
    static int busy; /* perform() and PMPI calls never come back here; be sure */
    if (busy)
        return;
    busy = 1;
    deferred **link = &deferred_head;
    while (*link != NULL) {
        deferred *d = *link;
        int done;
        if (d->compound) {
            done = progress_compound(d);
        } else {
            if (!d->started && svp_agree_step(&d->a) &&
                (d->persistent || !unstarted_before(d->c.cid, d))) {
                d->started = 1;
                d->c.req = &d->real;
                int rc = svp_perform(&d->c);
                if (rc != MPI_SUCCESS && d->persistent) {
                    svp_pcoll_start_failed(d->app, rc); /* its next completion says so */
                } else if (rc != MPI_SUCCESS) {
                    d->real = MPI_REQUEST_NULL;
                    finish_deferred(d, rc);
                }
            }
            if (d->started && d->real != MPI_REQUEST_NULL && !d->persistent) {
                int flag = 0;
                MPI_Request h = d->real;
                int rc = PMPI_Test(&d->real, &flag, &d->work);
                if (rc != MPI_SUCCESS || flag) {
                    svp_forget_req(h);
                    d->real = MPI_REQUEST_NULL;
                    if (rc == MPI_SUCCESS && d->c.newcomm != NULL)
                        svp_adopt(*d->c.newcomm, d->c.cid, d->c.child_id); /* before the app sees it */
                    finish_deferred(d, rc != MPI_SUCCESS ? rc : d->work.MPI_ERROR);
                }
            }
            /* A persistent one, once started, is watched by svp_perform's tracking and
             * completed by the application through MPI. */
            done = d->started && (d->persistent || d->real == MPI_REQUEST_NULL);
        }
        if (done) {
            *link = d->next;
            if (deferred_tail == &d->next)
                deferred_tail = link;
            free(d);
            svp_ndeferred--;
            continue;
        }
        link = &d->next;
    }
    release_held();
    busy = 0;
}

void svp_report_deferred(FILE *to)
{
    for (const deferred *d = deferred_head; d != NULL; d = d->next) {
        if (d->compound || d->started)
            continue;
        fprintf(to,
                "  collective not started: %s on slot %d (communicator %#x), its agreement "
                "in round %d of %d%s\n",
                d->persistent ? "a persistent collective's start" : "a non-blocking collective",
                d->c.cid, d->c.cid >= 0 ? svp.comms[d->c.cid].id : 0u, d->a.round, d->a.n,
                !d->persistent && unstarted_before(d->c.cid, d) ? ", after an earlier one" : "");
    }
}

int svp_deferred_names(int cid)
{
    for (const deferred *d = deferred_head; d != NULL; d = d->next)
        if (d->c.cid == cid)
            return 1;
    return 0;
}

void svp_detach_deferred(MPI_Request h)
{
    for (deferred *d = deferred_head; d != NULL; d = d->next)
        if (d->app == h)
            d->detached = 1;
}

int svp_is_deferred(MPI_Request h)
{
    for (const deferred *d = deferred_head; d != NULL; d = d->next)
        if (d->app == h)
            return d->compound ? DEFERRED_COMPOUND : DEFERRED_COLLECTIVE;
    return 0;
}

int svp_start_pending(MPI_Request h)
{
    for (const deferred *d = deferred_head; d != NULL; d = d->next)
        if (d->persistent && !d->started && d->app == h && h != MPI_REQUEST_NULL)
            return 1;
    return 0;
}

/* A new entry at the end of the list, its application's request returned in req; NULL if
 * MPI refused the generalized request (its code in *rc). */
static deferred *append(const coll *c, MPI_Request *req, int *rc)
{
    deferred *d = calloc(1, sizeof *d);
    MPI_Status *st = calloc(1, sizeof *st);
    if (d == NULL || st == NULL)
        svp_die("out of memory");
    d->c = *c;
    d->real = MPI_REQUEST_NULL;
    d->send = MPI_REQUEST_NULL;
    d->st = st;
    *rc = PMPI_Grequest_start(deferred_query, svp_gq_free, svp_gq_cancel, st, &d->app);
    if (*rc != MPI_SUCCESS) {
        free(d);
        free(st);
        return NULL;
    }
    *req = d->app;
    *deferred_tail = d;
    deferred_tail = &d->next;
    svp_ndeferred++;
    return d;
}

int svp_nonblocking(coll *c, MPI_Request *req)
{
    c->cid = svp_cid(c->comm);
    if (c->cid < 0 || svp.comms[c->cid].inter) {
        c->req = req;
        return svp_align(c->cid, c);
    }
    int rc;
    deferred *d = append(c, req, &rc);
    if (d == NULL)
        return rc;
    d->a = svp_alignment_of(&svp.comms[c->cid], 0);
    svp_progress_deferred();
    return MPI_SUCCESS;
}

int svp_compound(MPI_Request recv, MPI_Request send, void (*finish)(const coll *c, MPI_Status *st),
                 const coll *c, MPI_Request *req)
{
    int rc;
    deferred *d = append(c, req, &rc);
    if (d == NULL)
        return rc;
    d->compound = 1;
    d->started = 1;
    d->real = recv;
    d->send = send;
    d->finish = finish;
    svp_progress_deferred();
    return MPI_SUCCESS;
}

#if MPI_VERSION >= 4
static int run_start(coll *c)
{
    return PMPI_Start(c->req);
}

int svp_start_persistent(int cid, MPI_Request req, unsigned ordinal)
{
    deferred *d = calloc(1, sizeof *d);
    if (d == NULL)
        svp_die("out of memory");
    d->c = (coll){.run = run_start, .cid = cid, .comm = svp.comms[cid].comm};
    d->app = d->real = req;
    d->send = MPI_REQUEST_NULL;
    d->persistent = 1;
    d->a = svp_start_agreement(&svp.comms[cid], ordinal);
    *deferred_tail = d;
    deferred_tail = &d->next;
    svp_ndeferred++;
    svp_progress_deferred();
    return MPI_SUCCESS;
}
#endif

/* Collectives start in the same order on every member. */
void svp_start_deferred_on(int cid)
{
    for (unsigned long turns = 1; unstarted_before(cid, NULL); turns++) {
        svp_progress_deferred();
        if ((turns & 63) == 0 || svp_cut_waiting())
            svp_serve_peers();
        if (turns > 4096)
            sched_yield();
    }
}
