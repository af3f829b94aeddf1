/* The layer's buffer of drained messages: filled by cuts, in arrival order, and delivered
 * later, exactly once, to the receives, probes and matched probes that match them (the lookup,
 * svp_find_buffered, is inline in pmpi_internal.h). */
#include "pmpi_internal.h"

buffered *svp_new_buffered(int cid, int src, int tag, int nbytes)
{
    buffered *m = malloc(sizeof *m + (size_t)nbytes);
    if (m == NULL)
        svp_die("out of memory for a drained message");
    *m = (buffered){NULL, cid, src, tag, nbytes};
    return m;
}

int svp_drain_one(int cid, const MPI_Status *probed)
{
    int nbytes = 0;
    PMPI_Get_count(probed, MPI_BYTE, &nbytes);
    if (nbytes < 0)
        return 0; /* MPI_UNDEFINED: over INT_MAX bytes */
    buffered *m = svp_new_buffered(cid, probed->MPI_SOURCE, probed->MPI_TAG, nbytes);
    MPI_Status st;
    if (PMPI_Recv(m->data, nbytes, MPI_BYTE, m->src, m->tag, svp.comms[cid].comm, &st) !=
        MPI_SUCCESS)
        svp_die("draining a message failed");
    svp_count_recv(cid, &st);
    svp.drained++;
    *svp.tail = m;
    svp.tail = &m->next;
    return 1;
}

buffered *svp_unlink_buffered(buffered **link)
{
    buffered *m = *link;
    *link = m->next;
    if (svp.tail == &m->next)
        svp.tail = link;
    return m;
}

void svp_fill_status(MPI_Status *st, const buffered *m, MPI_Datatype dt, int elems, int err)
{
    st->MPI_SOURCE = m->src;
    st->MPI_TAG = m->tag;
    st->MPI_ERROR = err;
    PMPI_Status_set_elements(st, dt, elems);
    PMPI_Status_set_cancelled(st, 0);
}

int svp_unpack_received(const void *data, int nbytes, void *buf, int count, MPI_Datatype dt,
                        MPI_Status *st)
{
    int tsize = 0;
    PMPI_Type_size(dt, &tsize);
    long room = (long)count * tsize;
    if (tsize > 0 && nbytes % tsize == 0 && nbytes <= room) {
        /* Whole elements that fit (the common case, and every MPI_Sendrecv_replace's): no
         * message, an unpack; the status counts bytes, which MPI turns into any datatype's
         * count and elements. */
        int pos = 0;
        if (nbytes > 0)
            PMPI_Unpack(data, nbytes, &pos, buf, nbytes / tsize, dt, MPI_COMM_SELF);
        if (st != MPI_STATUS_IGNORE) {
            PMPI_Status_set_elements(st, MPI_BYTE, nbytes);
            PMPI_Status_set_cancelled(st, 0);
        }
        return MPI_SUCCESS;
    }
    /* Truncation is the layer's to find: Open MPI 4.1 reports none on a message to self (a
     * 16-byte message into 2 ints completes with MPI_SUCCESS). What fits is sent. */
    int sent = nbytes > room ? (int)room : nbytes;
    int rc = PMPI_Sendrecv(data, sent, MPI_PACKED, 0, TAG_UNPACK, buf, count, dt, 0, TAG_UNPACK,
                           svp.self, st);
    return rc == MPI_SUCCESS && sent < nbytes ? MPI_ERR_TRUNCATE : rc;
}

int svp_deliver_msg(buffered *m, void *buf, int count, MPI_Datatype dt, MPI_Status *st)
{
    MPI_Status local;
    MPI_Status *out = st == MPI_STATUS_IGNORE ? &local : st;
    int rc = svp_unpack_received(m->data, m->nbytes, buf, count, dt, out);
    out->MPI_SOURCE = m->src;
    out->MPI_TAG = m->tag;
    out->MPI_ERROR = rc;
    free(m);
    return rc;
}

int svp_deliver(buffered **link, void *buf, int count, MPI_Datatype dt, MPI_Status *st)
{
    return svp_deliver_msg(svp_unlink_buffered(link), buf, count, dt, st);
}

/* Whether a persistent receive names slot cid: MPI keeps a communicator for the persistent
 * requests made on it after MPI_Comm_free, and the program may start them again. */
static int persistent_receive_on(int cid)
{
    for (int i = 0; i < svp.pers.n; i++)
        if (svp.pers.v[i].cid == cid && svp.pers.v[i].is_recv)
            return 1;
    return 0;
}

void svp_untrack_slot(int cid)
{
    if (cid < 0 || cid >= svp.ncomms || svp.comms[cid].comm == MPI_COMM_NULL)
        return;
    svp.comms[cid].comm = MPI_COMM_NULL;
    /* Kept for the receive's next start (the slot is not reused meanwhile). */
    if (!persistent_receive_on(cid))
        svp_drop_buffered(cid);
}

void svp_drop_buffered(int cid)
{
    int dropped = 0;
    for (buffered **l = &svp.head; *l != NULL;) {
        if ((*l)->cid == cid) {
            free(svp_unlink_buffered(l));
            dropped++;
        } else {
            l = &(*l)->next;
        }
    }
    if (dropped)
        fprintf(stderr, "symvirt-pmpi rank %d: a communicator was freed with %d drained "
                        "messages the application never received; dropped\n", svp.me, dropped);
}

/* A generalized request that is already complete, carrying a status (Irecv from the buffer);
 * its error (a truncated message) is the completing call's. */
static int gq_query(void *extra, MPI_Status *st)
{
    *st = *(MPI_Status *)extra;
    return st->MPI_ERROR;
}
int svp_gq_free(void *extra)
{
    free(extra);
    return MPI_SUCCESS;
}
int svp_gq_cancel(void *extra, int complete)
{
    (void)extra;
    (void)complete;
    return MPI_SUCCESS;
}

int svp_deliver_request(buffered *m, void *buf, int count, MPI_Datatype dt, MPI_Request *req)
{
    MPI_Status *st = malloc(sizeof *st);
    if (st == NULL)
        svp_die("out of memory");
    svp_deliver_msg(m, buf, count, dt, st);
    int rc = PMPI_Grequest_start(gq_query, svp_gq_free, svp_gq_cancel, st, req);
    if (rc == MPI_SUCCESS)
        rc = PMPI_Grequest_complete(*req);
    return rc;
}
