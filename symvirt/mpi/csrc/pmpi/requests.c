/* Requests the layer watches until they complete (receives are counted on completion, a cut
 * waits for collectives), and the layer's waits for one request. */
#include "pmpi_internal.h"

#ifdef SYMVIRT_MPI_IMPL_OPENMPI
/* Open MPI's own headers (shipped by its -dev package, on mpicc's include path): the blocking
 * waits poll a request's completion flag between progress turns, as Open MPI's own MPI_Wait
 * does, instead of paying MPI_Test's argument checks and bookkeeping every turn. The library
 * is built against the installed Open MPI, so the layout matches. */
#include "ompi/request/request.h"
#include "opal/runtime/opal_progress.h"
#endif

/* ---- pending requests ------------------------------------------------------------------- */

/* Counts tracked request t, complete with st, if it is a receive that took its message. */
static void count_completed(const tracked_req *t, const MPI_Status *st)
{
    int cancelled = 0;
    PMPI_Test_cancelled(st, &cancelled);
    if (t->kind == REQ_RECV && !cancelled)
        svp_count_recv(t->cid, st);
}

void svp_completed(MPI_Request handle, const MPI_Status *st)
{
    if (svp_npcoll)
        svp_pcoll_completed(handle);
    /* Newest first: a blocking call's own request is the last one tracked. */
    for (int i = svp.reqs.n - 1; i >= 0; i--) {
        tracked_req *t = &svp.reqs.v[i];
        if (t->req != handle)
            continue;
        if (!t->counted)
            count_completed(t, st);
        *t = svp.reqs.v[--svp.reqs.n];
        return;
    }
}

blocking_recv svp_blocking;

/* Receives held since the application freed them (tracked_req.freed). */
static int nheld;

/* Gives held receive i back to MPI (the application freed it; counted already if it
 * completed) and drops it from the list, whose last entry takes its place. */
static void release_held(int i)
{
    PMPI_Request_free(&svp.reqs.v[i].req);
    svp.reqs.v[i] = svp.reqs.v[--svp.reqs.n];
    nheld--;
}

int svp_poll_pending(void)
{
    int open = 0;
    if (svp_blocking.req != MPI_REQUEST_NULL && !svp_blocking.counted) {
        int flag = 0;
        MPI_Status st;
        PMPI_Request_get_status(svp_blocking.req, &flag, &st);
        if (flag) {
            svp_count_recv(svp_blocking.cid, &st);
            svp_blocking.counted = 1;
        }
    }
    for (int i = 0; i < svp.reqs.n; i++) {
        tracked_req *t = &svp.reqs.v[i];
        if (t->counted)
            continue;
        int flag = 0;
        MPI_Status st;
        PMPI_Request_get_status(t->req, &flag, &st);
        if (!flag) {
            open += t->kind == REQ_COLL;
            continue;
        }
        count_completed(t, &st);
        t->counted = 1;
        if (t->freed)
            release_held(i--); /* nobody waits for it: MPI may have it, as the program asked */
    }
    return open;
}

void svp_report_open_colls(FILE *to)
{
    for (int i = 0; i < svp.reqs.n; i++) {
        const tracked_req *t = &svp.reqs.v[i];
        if (t->kind != REQ_COLL || t->counted)
            continue;
        int flag = 0;
        PMPI_Request_get_status(t->req, &flag, MPI_STATUS_IGNORE);
        if (flag)
            continue;
        const tracked_comm *c = t->cid >= 0 ? &svp.comms[t->cid] : NULL;
        fprintf(to, "  collective open: %s on slot %d (communicator %#x)\n",
                svp_npcoll && svp_pcoll_state(t->req) != PCOLL_NOT ? "a persistent one"
                                                                   : "a non-blocking one",
                t->cid, c != NULL ? c->id : 0u);
    }
}

/* Counts and frees the held receives that have completed. */
static void sweep_held(void)
{
    for (int i = svp.reqs.n - 1; i >= 0 && nheld > 0; i--) {
        tracked_req *t = &svp.reqs.v[i];
        if (!t->freed)
            continue;
        int flag = 0;
        MPI_Status st;
        PMPI_Request_get_status(t->req, &flag, &st);
        if (!flag)
            continue;
        count_completed(t, &st); /* not counted yet: the drain frees what it counts */
        release_held(i);
    }
}

int svp_hold_freed(MPI_Request handle)
{
    if (nheld > 0)
        sweep_held(); /* a program that frees every receive it posts holds few */
    for (int i = 0; i < svp.reqs.n; i++) {
        tracked_req *t = &svp.reqs.v[i];
        if (t->req != handle)
            continue;
        if (t->kind != REQ_RECV || t->counted)
            return 0;
        int flag = 0;
        MPI_Status st;
        PMPI_Request_get_status(handle, &flag, &st);
        if (flag) {
            svp_completed(handle, &st); /* complete already: counted, freed by MPI now */
            return 0;
        }
        t->freed = 1;
        nheld++;
        return 1;
    }
    return 0;
}

void svp_free_held(void)
{
    for (int i = svp.reqs.n - 1; i >= 0 && nheld > 0; i--)
        if (svp.reqs.v[i].freed)
            release_held(i);
}

void svp_forget_req(MPI_Request handle)
{
    for (int i = 0; i < svp.reqs.n; i++)
        if (svp.reqs.v[i].req == handle) {
            svp.reqs.v[i] = svp.reqs.v[--svp.reqs.n];
            return;
        }
}

/* ---- waiting for one request ------------------------------------------------------------ */

#ifdef SYMVIRT_MPI_IMPL_OPENMPI
/* Open MPI's own wait loop (progress until the request's completion flag is set), serving
 * cuts between turns. */
static void progress_until_complete(ompi_request_t *r)
{
    unsigned long turns = 0;
    while (!REQUEST_COMPLETE(r)) {
        opal_progress();
        svp_idle(&turns);
    }
}
#endif

#ifndef SYMVIRT_MPI_IMPL_OPENMPI
/* A request complete with an error that MPI_Request_get_status raised already: finished by
 * MPI_Wait while the error handler MPICH raises it through (MPI_COMM_WORLD's: the call takes
 * no communicator) returns, so the program's handler runs once, as for MPI_Wait alone. */
static int wait_quietly(MPI_Request *req, MPI_Status *st)
{
    MPI_Errhandler eh;
    PMPI_Comm_get_errhandler(MPI_COMM_WORLD, &eh);
    PMPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    int rc = PMPI_Wait(req, st);
    PMPI_Comm_set_errhandler(MPI_COMM_WORLD, eh);
    PMPI_Errhandler_free(&eh);
    return rc;
}
#endif

/* Each implementation's own wait loop, plus one turn of svp_idle(). */
int svp_wait_serving(MPI_Request *req, MPI_Status *st)
{
#if defined(SYMVIRT_MPI_IMPL_OPENMPI)
    /* An inactive persistent request, or the null request, completes at once in PMPI_Wait. */
    ompi_request_t *r = *req;
    if (r != MPI_REQUEST_NULL && r->req_state != OMPI_REQUEST_INACTIVE)
        progress_until_complete(r);
    return PMPI_Wait(req, st);
#else
    /* MPICH: MPI_Test, which frees the request once complete. Measured in one process,
     * ping-pong rounds interleaved: as fast as a blocking MPI_Recv, where a loop of
     * MPI_Request_get_status (then freeing the requests in batches) was 7-10 % slower.
     * But MPICH 4's MPI_Test progresses before it looks at the request, and
     * MPI_Request_get_status looks first: a request complete already (a message that arrived
     * before its receive was posted) is finished by PMPI_Wait, which then does not progress
     * either (instructions counted: 493 for MPI_Test, 108 + 206 for the two). */
    int flag = 0;
    int rc = PMPI_Request_get_status(*req, &flag, st);
    if (flag)
        return rc == MPI_SUCCESS ? PMPI_Wait(req, st) : wait_quietly(req, st);
    unsigned long turns = 0;
    for (;;) {
        rc = PMPI_Test(req, &flag, st);
        if (rc != MPI_SUCCESS || flag)
            return rc;
        svp_idle(&turns);
    }
#endif
}

int svp_wait_own_receive(MPI_Request *req, MPI_Status *st)
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
#else
    return svp_wait_serving(req, st);
#endif
}
