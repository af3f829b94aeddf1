/* Probes and matched probes, and the held messages that stand for buffered messages a matched
 * probe hands out. */
#include "pmpi_internal.h"

/* ---- probes ----------------------------------------------------------------------------- */

int MPI_Iprobe(int src, int tag, MPI_Comm comm, int *flag, MPI_Status *status)
{
    GUARD();
    int cid = svp_cid(comm);
    if (cid >= 0 && src != MPI_PROC_NULL) {
        buffered *m = svp_find_buffered(cid, src, tag, NULL);
        if (m != NULL) {
            *flag = 1;
            if (status != MPI_STATUS_IGNORE)
                svp_fill_status(status, m, MPI_BYTE, m->nbytes, MPI_SUCCESS);
            return MPI_SUCCESS;
        }
    }
    int rc = PMPI_Iprobe(src, tag, comm, flag, status);
    if (rc == MPI_SUCCESS && !*flag && cid >= 0)
        svp_idle_test();
    return rc;
}

int MPI_Probe(int src, int tag, MPI_Comm comm, MPI_Status *status)
{
    GUARD();
    int cid = svp_cid(comm);
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

/* ---- held messages (matched probes) ----------------------------------------------------- */

/* A live zero-byte message to self: its handle stands for a buffered message. */
static MPI_Message hold_handle(void)
{
    MPI_Message h;
    MPI_Request r;
    /* Non-blocking: MPICH's send to self over UCX completes only when it is received. */
    PMPI_Isend(NULL, 0, MPI_BYTE, 0, TAG_HOLD, svp.self, &r);
    PMPI_Mprobe(0, TAG_HOLD, svp.self, &h, MPI_STATUS_IGNORE);
    PMPI_Request_free(&r);
    return h;
}

static int find_match(MPI_Message msg)
{
    for (int i = 0; i < svp.matches.n; i++)
        if (svp.matches.v[i].key == msg)
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
    GROW(svp.matches);
    matched x = {key, standin, cid, m, 0, 0, 0};
    if (st != NULL) {
        PMPI_Get_count(st, MPI_BYTE, &x.nbytes);
        x.src = st->MPI_SOURCE;
        x.tag = st->MPI_TAG;
    }
    svp.matches.v[svp.matches.n++] = x;
}

/* Receives the real message of a match into a buffered one (counted as drained). */
static buffered *receive_matched(MPI_Message *msg, int cid, const MPI_Status *probed)
{
    int nbytes = 0;
    PMPI_Get_count(probed, MPI_BYTE, &nbytes);
    buffered *m = svp_new_buffered(cid, probed->MPI_SOURCE, probed->MPI_TAG, nbytes);
    MPI_Status st;
    if (PMPI_Mrecv(m->data, nbytes, MPI_BYTE, msg, &st) != MPI_SUCCESS)
        svp_die("receiving a matched message failed");
    svp_count_recv(cid, &st);
    return m;
}

int svp_drain_matched(void)
{
    int too_large = -1;
    for (int i = 0; i < svp.matches.n; i++) {
        matched *x = &svp.matches.v[i];
        if (x->m != NULL)
            continue;
        if (x->nbytes < 0) { /* MPI_UNDEFINED: over INT_MAX bytes, more than the buffer holds */
            too_large = svp.comms[x->cid].world[x->src];
            continue;
        }
        MPI_Status probed;
        probed.MPI_SOURCE = x->src;
        probed.MPI_TAG = x->tag;
        PMPI_Status_set_elements(&probed, MPI_BYTE, x->nbytes);
        MPI_Message h = x->key;
        x->m = receive_matched(&h, x->cid, &probed);
        svp.drained++;
    }
    return too_large;
}

/* ---- matched probes --------------------------------------------------------------------- */

/* One attempt: a buffered message first, else MPI's. */
static int improbe(int cid, int src, int tag, MPI_Comm comm, int *flag, MPI_Message *msg,
                   MPI_Status *status)
{
    buffered **link;
    buffered *m = svp_find_buffered(cid, src, tag, &link);
    if (m != NULL) {
        svp_unlink_buffered(link);
        *msg = fresh_standin();
        add_match(*msg, *msg, cid, m, NULL);
        *flag = 1;
        if (status != MPI_STATUS_IGNORE)
            svp_fill_status(status, m, MPI_BYTE, m->nbytes, MPI_SUCCESS);
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
    GUARD();
    int cid = svp_cid(comm);
    if (cid < 0 || src == MPI_PROC_NULL)
        return PMPI_Improbe(src, tag, comm, flag, msg, status);
    int rc = improbe(cid, src, tag, comm, flag, msg, status);
    if (rc == MPI_SUCCESS && !*flag)
        svp_idle_test();
    return rc;
}

int MPI_Mprobe(int src, int tag, MPI_Comm comm, MPI_Message *msg, MPI_Status *status)
{
    GUARD();
    int cid = svp_cid(comm);
    if (cid < 0 || src == MPI_PROC_NULL)
        return PMPI_Mprobe(src, tag, comm, msg, status);
    unsigned long turns = 0;
    for (;;) {
        /* A cut served inside may have buffered the message: look there again each time. */
        int flag = 0;
        int rc = improbe(cid, src, tag, comm, &flag, msg, status);
        if (rc != MPI_SUCCESS || flag)
            return rc;
        svp_idle(&turns);
    }
}

int MPI_Imrecv(void *buf, int count, MPI_Datatype dt, MPI_Message *msg, MPI_Request *req)
{
    GUARD();
    int i = find_match(*msg);
    if (i < 0)
        return PMPI_Imrecv(buf, count, dt, msg, req);
    matched x = svp.matches.v[i];
    svp.matches.v[i] = svp.matches.v[--svp.matches.n];
    if (x.m != NULL) {
        if (x.standin != MPI_MESSAGE_NULL)
            PMPI_Mrecv(NULL, 0, MPI_BYTE, &x.standin, MPI_STATUS_IGNORE);
        *msg = MPI_MESSAGE_NULL;
        return svp_deliver_request(x.m, buf, count, dt, req);
    }
    int rc = PMPI_Imrecv(buf, count, dt, msg, req);
    if (rc == MPI_SUCCESS)
        svp_track_req(*req, x.cid, REQ_RECV);
    return rc;
}

int MPI_Mrecv(void *buf, int count, MPI_Datatype dt, MPI_Message *msg, MPI_Status *status)
{
    GUARD();
    int i = find_match(*msg);
    if (i < 0)
        return PMPI_Mrecv(buf, count, dt, msg, status);
    if (svp.matches.v[i].m != NULL) {
        matched x = svp.matches.v[i];
        svp.matches.v[i] = svp.matches.v[--svp.matches.n];
        if (x.standin != MPI_MESSAGE_NULL)
            PMPI_Mrecv(NULL, 0, MPI_BYTE, &x.standin, MPI_STATUS_IGNORE);
        *msg = MPI_MESSAGE_NULL;
        MPI_Comm comm = x.cid >= 0 ? svp.comms[x.cid].comm : MPI_COMM_NULL; /* freed: NULL */
        return svp_raised(comm != MPI_COMM_NULL ? comm : MPI_COMM_WORLD,
                          svp_deliver_msg(x.m, buf, count, dt, status));
    }
    MPI_Request r;
    int rc = MPI_Imrecv(buf, count, dt, msg, &r);
    if (rc != MPI_SUCCESS)
        return rc;
    MPI_Request handle = r;
    MPI_Status local;
    rc = svp_wait_serving(&r, &local);
    svp_completed(handle, &local);
    if (status != MPI_STATUS_IGNORE)
        *status = local;
    return rc;
}

#if MPI_VERSION >= 4
/* MPI 4's large-count forms: through the int ones (a matched message may be one the layer's
 * buffer holds, which stays below INT_MAX bytes); a count beyond an int is refused. */
int MPI_Imrecv_c(void *buf, MPI_Count count, MPI_Datatype dt, MPI_Message *msg,
                 MPI_Request *req)
{
    GUARD();
    if (!svp_fits_int(count))
        return svp_refuse(MPI_COMM_SELF, "MPI_Imrecv_c", SVP_COUNT_ABOVE_INT);
    return MPI_Imrecv(buf, (int)count, dt, msg, req);
}

int MPI_Mrecv_c(void *buf, MPI_Count count, MPI_Datatype dt, MPI_Message *msg,
                MPI_Status *status)
{
    GUARD();
    if (!svp_fits_int(count))
        return svp_refuse(MPI_COMM_SELF, "MPI_Mrecv_c", SVP_COUNT_ABOVE_INT);
    return MPI_Mrecv(buf, (int)count, dt, msg, status);
}
#endif
