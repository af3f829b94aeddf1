/* ---- point to point ---------------------------------------------------------------------
 * Sends are counted when they start; receives when they complete, after looking in the
 * layer's buffer first. */
#include <limits.h>

#include "pmpi_internal.h"

/* The sends: one wrapper per (MPI call, PMPI function it goes out through). A blocking send
 * stays blocking (no request, no progress loop: the layer's cost on the latency path). It
 * cannot hold up a cut: it only waits for its receiver to match it, and a receiver in a cut
 * receives every unexpected message on every communicator into the buffer (step 2 of the
 * cut), which completes the send; the sender then joins the cut at its next MPI call, as it
 * would had the request come while it computed. MPI_Bsend completes locally. MPI_Rsend goes
 * out as a standard send (PMPI_Send), which MPI allows for a ready send.
 * Except while a non-blocking or persistent collective of the layer's is deferred: MPI
 * progresses a collective inside any blocking call, and a program may rely on that (start a
 * collective, send to a peer that receives only after completing it), but only the layer
 * moves a deferred one towards its start. The send then goes out non-blocking (the matching
 * PMPI_I call) and waits in the layer's loop, which does. */
#define SENDS(X)                                                                               \
    X(Send, PMPI_Send, PMPI_Isend)                                                             \
    X(Ssend, PMPI_Ssend, PMPI_Issend)                                                          \
    X(Rsend, PMPI_Send, PMPI_Isend)                                                            \
    X(Bsend, PMPI_Bsend, PMPI_Ibsend)

#define ISENDS(X)                                                                              \
    X(Isend, PMPI_Isend)                                                                       \
    X(Issend, PMPI_Issend)                                                                     \
    X(Irsend, PMPI_Irsend)                                                                     \
    X(Ibsend, PMPI_Ibsend)

typedef int (*isend_fn)(const void *, int, MPI_Datatype, int, int, MPI_Comm, MPI_Request *);

/* A blocking send while a deferred collective is pending (out of line: the latency path keeps
 * its small frame). */
static __attribute__((noinline)) int send_progressing(isend_fn isend, int cid,
                                                      const void *buf, int count,
                                                      MPI_Datatype dt, int dest, int tag,
                                                      MPI_Comm comm)
{
    MPI_Request r;
    int rc = svp_send_started(cid, dest, isend(buf, count, dt, dest, tag, comm, &r));
    return rc != MPI_SUCCESS ? rc : svp_wait_serving(&r, MPI_STATUS_IGNORE);
}

#define SEND_WRAPPER(name, pmpi, ipmpi)                                                        \
    int MPI_##name(const void *buf, int count, MPI_Datatype dt, int dest, int tag,             \
                   MPI_Comm comm)                                                              \
    {                                                                                          \
        GUARD();                                                                               \
        int cid = svp_cid(comm);                                                               \
        svp_count_send(cid, dest);                                                             \
        if (__builtin_expect(svp_ndeferred != 0, 0))                                           \
            return send_progressing(ipmpi, cid, buf, count, dt, dest, tag, comm);              \
        return svp_send_started(cid, dest, pmpi(buf, count, dt, dest, tag, comm));             \
    }

#define ISEND_WRAPPER(name, pmpi)                                                              \
    int MPI_##name(const void *buf, int count, MPI_Datatype dt, int dest, int tag,             \
                   MPI_Comm comm, MPI_Request *req)                                            \
    {                                                                                          \
        GUARD();                                                                               \
        int cid = svp_cid(comm);                                                               \
        svp_count_send(cid, dest);                                                             \
        return svp_send_started(cid, dest, pmpi(buf, count, dt, dest, tag, comm, req));        \
    }

SENDS(SEND_WRAPPER)
ISENDS(ISEND_WRAPPER)

/* MPI_Buffer_detach waits, progressing, until the buffered sends still using the buffer are
 * done: inside the gate, so the progress thread makes no cut while this thread is in MPI (it
 * did, unwrapped). A receiver in a cut drains those messages, so the call returns, and this
 * rank joins the cut at its next call, as after a blocking send. */
int MPI_Buffer_detach(void *buf, int *size)
{
    GUARD();
    return PMPI_Buffer_detach(buf, size);
}

#if MPI_VERSION >= 4
int MPI_Buffer_detach_c(void *buf, MPI_Count *size)
{
    GUARD();
    return PMPI_Buffer_detach_c(buf, size);
}
#endif

/* The receives' bodies serve the int calls and MPI 4's large-count (_c) ones alike: an int
 * count goes out through the int PMPI call (the compiler drops the other branch). */
#if MPI_VERSION >= 4
typedef MPI_Count count_t;
#define PMPI_COUNTED(call, count, ...)                                                         \
    ((count) == (int)(count) ? call(__VA_ARGS__) : call##_c(__VA_ARGS__))
#else
typedef int count_t;
#define PMPI_COUNTED(call, count, ...) call(__VA_ARGS__)
#endif
#define POST_IRECV(buf, count, dt, src, tag, comm, req)                                        \
    PMPI_COUNTED(PMPI_Irecv, count, buf, count, dt, src, tag, comm, req)

/* A message from the buffer is shorter than INT_MAX bytes: INT_MAX elements hold it. */
static inline int buffered_count(count_t count)
{
#if MPI_VERSION >= 4
    return count > INT_MAX ? INT_MAX : (int)count;
#else
    return count;
#endif
}

/* MPI_Irecv and MPI_Irecv_c (inlined in each: the latency path takes no extra call). */
static inline __attribute__((always_inline)) int irecv(void *buf, count_t count,
                                                       MPI_Datatype dt, int src, int tag,
                                                       MPI_Comm comm, MPI_Request *req)
{
    int cid = svp_cid(comm);
    if (cid < 0 || src == MPI_PROC_NULL)
        return POST_IRECV(buf, count, dt, src, tag, comm, req);
    buffered **link;
    if (svp_find_buffered(cid, src, tag, &link) != NULL)
        return svp_deliver_request(svp_unlink_buffered(link), buf, buffered_count(count), dt,
                                   req);
    int rc = POST_IRECV(buf, count, dt, src, tag, comm, req);
    if (rc == MPI_SUCCESS)
        svp_track_req(*req, cid, REQ_RECV);
    return rc;
}

int MPI_Irecv(void *buf, int count, MPI_Datatype dt, int src, int tag, MPI_Comm comm,
              MPI_Request *req)
{
    GUARD();
    return irecv(buf, count, dt, src, tag, comm, req);
}

/* Whether a receive's error left its message taken (MPI_ERR_TRUNCATE): counted then. */
static int truncated(int rc)
{
    int class = MPI_SUCCESS;
    PMPI_Error_class(rc, &class);
    return class == MPI_ERR_TRUNCATE;
}

/* MPI_Recv and MPI_Recv_c (inlined in each, as irecv). */
static inline __attribute__((always_inline)) int recv(void *buf, count_t count,
                                                      MPI_Datatype dt, int src, int tag,
                                                      MPI_Comm comm, MPI_Status *status)
{
    int cid = svp_cid(comm);
    if (cid < 0 || src == MPI_PROC_NULL)
        return PMPI_COUNTED(PMPI_Recv, count, buf, count, dt, src, tag, comm, status);
    buffered **link;
    if (svp_find_buffered(cid, src, tag, &link) != NULL)
        return svp_raised(comm, svp_deliver(link, buf, buffered_count(count), dt, status));
    MPI_Request r;
    int rc = POST_IRECV(buf, count, dt, src, tag, comm, &r);
    if (rc != MPI_SUCCESS)
        return rc;
    if (svp_blocking.req != MPI_REQUEST_NULL)
        svp_die("blocking receive called while another one waits (threads?)");
    svp_blocking.req = r;
    svp_blocking.cid = cid;
    svp_blocking.counted = 0;
    MPI_Status local;
    MPI_Status *st = status == MPI_STATUS_IGNORE ? &local : status;
    rc = svp_wait_own_receive(&r, st);
    if (!svp_blocking.counted && (rc == MPI_SUCCESS || truncated(rc)))
        svp_count_recv(cid, st); /* a truncated message was taken too */
    svp_blocking.req = MPI_REQUEST_NULL;
    return rc;
}

int MPI_Recv(void *buf, int count, MPI_Datatype dt, int src, int tag, MPI_Comm comm,
             MPI_Status *status)
{
    GUARD();
    return recv(buf, count, dt, src, tag, comm, status);
}

/* The send could not start: the receive is taken back. One that completed meanwhile keeps its
 * message (finish, if not NULL, unpacks it into the application's buffer); the call fails. */
static int undo_receive(MPI_Request *recv, void (*finish)(const coll *c, MPI_Status *st),
                        const coll *c, int rc)
{
    MPI_Status st;
    int cancelled = 0;
    MPI_Cancel(recv);
    MPI_Wait(recv, &st);
    PMPI_Test_cancelled(&st, &cancelled);
    if (cancelled)
        PMPI_Status_set_elements(&st, MPI_BYTE, 0); /* nothing arrived */
    if (finish != NULL)
        finish(c, &st);
    return rc;
}

/* Completes the receive (rq[0]) and the send (rq[1]) of a Sendrecv: both, even when one
 * fails (a receive still pending is cancelled), so that no part outlives the call; returns the
 * first part's error, as MPI_Sendrecv reports it (not MPI_ERR_IN_STATUS). */
static int waitall_parts(MPI_Request rq[2], MPI_Status st[2])
{
    int rc = MPI_Waitall(2, rq, st);
    if (rc != MPI_ERR_IN_STATUS)
        return rc;
    if (rq[0] != MPI_REQUEST_NULL)
        MPI_Cancel(&rq[0]);
    for (int i = 0; i < 2; i++)
        if (rq[i] != MPI_REQUEST_NULL)
            MPI_Wait(&rq[i], &st[i]);
    return st[0].MPI_ERROR != MPI_SUCCESS ? st[0].MPI_ERROR : st[1].MPI_ERROR;
}

/* The receive and the send of a Sendrecv or an Isendrecv, the layer's own (counted; the
 * receive served from the buffer first); nothing is left started if either fails. */
static int start_sendrecv(const void *sbuf, count_t scount, MPI_Datatype sdt, int dest,
                          int stag, void *rbuf, count_t rcount, MPI_Datatype rdt, int src,
                          int rtag, MPI_Comm comm, MPI_Request rq[2])
{
    int rc = irecv(rbuf, rcount, rdt, src, rtag, comm, &rq[0]);
    if (rc != MPI_SUCCESS)
        return rc;
    int cid = svp_cid(comm);
    svp_count_send(cid, dest);
    rc = svp_send_started(
        cid, dest, PMPI_COUNTED(PMPI_Isend, scount, sbuf, scount, sdt, dest, stag, comm, &rq[1]));
    if (rc != MPI_SUCCESS)
        return undo_receive(&rq[0], NULL, NULL, rc);
    return rc;
}

/* MPI_Sendrecv and MPI_Sendrecv_c. */
static int sendrecv(const void *sbuf, count_t scount, MPI_Datatype sdt, int dest, int stag,
                    void *rbuf, count_t rcount, MPI_Datatype rdt, int src, int rtag,
                    MPI_Comm comm, MPI_Status *status)
{
    if (svp_cid(comm) < 0)
        return PMPI_COUNTED(PMPI_Sendrecv, scount > rcount ? scount : rcount, sbuf, scount, sdt,
                            dest, stag, rbuf, rcount, rdt, src, rtag, comm, status);
    MPI_Request rq[2];
    MPI_Status st[2];
    int rc = start_sendrecv(sbuf, scount, sdt, dest, stag, rbuf, rcount, rdt, src, rtag, comm, rq);
    if (rc != MPI_SUCCESS)
        return rc;
    rc = waitall_parts(rq, st);
    if (status != MPI_STATUS_IGNORE)
        *status = st[0];
    return rc;
}

int MPI_Sendrecv(const void *sbuf, int scount, MPI_Datatype sdt, int dest, int stag, void *rbuf,
                 int rcount, MPI_Datatype rdt, int src, int rtag, MPI_Comm comm,
                 MPI_Status *status)
{
    GUARD();
    return sendrecv(sbuf, scount, sdt, dest, stag, rbuf, rcount, rdt, src, rtag, comm, status);
}

/* Sendrecv_replace (blocking or not) goes through a copy: its receive arrives as bytes in
 * c->recvbuf, a buffer of the layer's, so that the send may still read the application's.
 * Once both completed they are unpacked into c->buffer, the status counting elements of
 * c->datatype (the layer's duplicate: the application may free its own while an
 * Isendrecv_replace is pending), and the copy and the duplicate are freed. */
static void release_replace(coll *c)
{
    free(c->recvbuf);
    PMPI_Type_free(&c->datatype);
}

static void unpack_replaced(const coll *c, MPI_Status *st)
{
    if (st->MPI_SOURCE != MPI_PROC_NULL) {
        int nbytes = 0;
        PMPI_Get_count(st, MPI_BYTE, &nbytes);
        MPI_Status got; /* counts what arrived in c->datatype */
        svp_unpack_received(c->recvbuf, nbytes, c->buffer, c->count, c->datatype, &got);
        got.MPI_SOURCE = st->MPI_SOURCE;
        got.MPI_TAG = st->MPI_TAG;
        got.MPI_ERROR = st->MPI_ERROR;
        *st = got;
    }
    coll done = *c;
    release_replace(&done);
}

/* A Sendrecv_replace's receive, into a buffer of the layer's, then its send (see
 * unpack_replaced, which releases what this takes); nothing is left started if either fails. */
static int start_replace(coll *c, int dest, int stag, int src, int rtag, MPI_Request rq[2])
{
    int psize = 0;
    PMPI_Pack_size(c->count, c->datatype, c->comm, &psize);
    c->recvbuf = malloc((size_t)(psize > 0 ? psize : 1));
    if (c->recvbuf == NULL)
        svp_die("out of memory");
    int rc = PMPI_Type_dup(c->datatype, &c->datatype);
    if (rc != MPI_SUCCESS) {
        free(c->recvbuf);
        return rc;
    }
    rc = MPI_Irecv(c->recvbuf, psize, MPI_BYTE, src, rtag, c->comm, &rq[0]);
    if (rc != MPI_SUCCESS) {
        release_replace(c);
        return rc;
    }
    rc = MPI_Isend(c->buffer, c->count, c->datatype, dest, stag, c->comm, &rq[1]);
    if (rc != MPI_SUCCESS)
        return undo_receive(&rq[0], unpack_replaced, c, rc);
    return rc;
}

int MPI_Sendrecv_replace(void *buf, int count, MPI_Datatype dt, int dest, int stag, int src,
                         int rtag, MPI_Comm comm, MPI_Status *status)
{
    GUARD();
    if (svp_cid(comm) < 0)
        return PMPI_Sendrecv_replace(buf, count, dt, dest, stag, src, rtag, comm, status);
    coll c = {.comm = comm, .buffer = buf, .count = count, .datatype = dt};
    MPI_Request rq[2];
    MPI_Status st[2];
    int rc = start_replace(&c, dest, stag, src, rtag, rq);
    if (rc != MPI_SUCCESS)
        return rc;
    rc = waitall_parts(rq, st);
    if (rc != MPI_SUCCESS) {
        release_replace(&c);
        return rc;
    }
    unpack_replaced(&c, &st[0]);
    if (status != MPI_STATUS_IGNORE)
        *status = st[0];
    return rc;
}

#if MPI_VERSION >= 4
/* MPI 4's non-blocking MPI_Sendrecv(_replace) (MPICH 4; Open MPI 4.1 has neither): made of
 * the layer's own receive (which looks in the buffer first, and is counted when it completes)
 * and send (counted when it starts), completed together as one request (a compound, see
 * deferred.c). A PMPI_Isendrecv would neither be counted nor find a message a cut drained. */
static int isendrecv(const void *sbuf, count_t scount, MPI_Datatype sdt, int dest, int stag,
                     void *rbuf, count_t rcount, MPI_Datatype rdt, int src, int rtag,
                     MPI_Comm comm, MPI_Request *req)
{
    coll c = {.comm = comm, .cid = svp_cid(comm)};
    if (c.cid < 0)
        return PMPI_COUNTED(PMPI_Isendrecv, scount > rcount ? scount : rcount, sbuf, scount,
                            sdt, dest, stag, rbuf, rcount, rdt, src, rtag, comm, req);
    MPI_Request rq[2];
    int rc = start_sendrecv(sbuf, scount, sdt, dest, stag, rbuf, rcount, rdt, src, rtag, comm, rq);
    if (rc != MPI_SUCCESS)
        return rc;
    return svp_compound(rq[0], rq[1], NULL, &c, req);
}

int MPI_Isendrecv(const void *sbuf, int scount, MPI_Datatype sdt, int dest, int stag,
                  void *rbuf, int rcount, MPI_Datatype rdt, int src, int rtag, MPI_Comm comm,
                  MPI_Request *req)
{
    GUARD();
    return isendrecv(sbuf, scount, sdt, dest, stag, rbuf, rcount, rdt, src, rtag, comm, req);
}

int MPI_Isendrecv_replace(void *buf, int count, MPI_Datatype dt, int dest, int stag, int src,
                          int rtag, MPI_Comm comm, MPI_Request *req)
{
    GUARD();
    coll c = {.comm = comm, .cid = svp_cid(comm), .buffer = buf, .count = count, .datatype = dt};
    if (c.cid < 0)
        return PMPI_Isendrecv_replace(buf, count, dt, dest, stag, src, rtag, comm, req);
    MPI_Request rq[2];
    int rc = start_replace(&c, dest, stag, src, rtag, rq);
    if (rc != MPI_SUCCESS)
        return rc;
    return svp_compound(rq[0], rq[1], unpack_replaced, &c, req);
}

/* ---- MPI 4's large-count point-to-point calls (the _c forms) --------------------------------
 * The same wrappers' work with MPI_Count counts. The replacing forms copy through a packed
 * buffer of int size, so a count above INT_MAX is refused there (nothing is started). */
#define SEND_C_WRAPPER(name, pmpi, ipmpi)                                                      \
    int MPI_##name##_c(const void *buf, MPI_Count count, MPI_Datatype dt, int dest, int tag,   \
                       MPI_Comm comm)                                                          \
    {                                                                                          \
        GUARD();                                                                               \
        int cid = svp_cid(comm);                                                               \
        svp_count_send(cid, dest);                                                             \
        if (svp_ndeferred != 0) { /* as the int forms (see SENDS) */                           \
            MPI_Request r;                                                                     \
            int rc = ipmpi##_c(buf, count, dt, dest, tag, comm, &r);                           \
            rc = svp_send_started(cid, dest, rc);                                              \
            return rc != MPI_SUCCESS ? rc : svp_wait_serving(&r, MPI_STATUS_IGNORE);           \
        }                                                                                      \
        return svp_send_started(cid, dest, pmpi##_c(buf, count, dt, dest, tag, comm));         \
    }

#define ISEND_C_WRAPPER(name, pmpi)                                                            \
    int MPI_##name##_c(const void *buf, MPI_Count count, MPI_Datatype dt, int dest, int tag,   \
                       MPI_Comm comm, MPI_Request *req)                                        \
    {                                                                                          \
        GUARD();                                                                               \
        int cid = svp_cid(comm);                                                               \
        svp_count_send(cid, dest);                                                             \
        return svp_send_started(cid, dest, pmpi##_c(buf, count, dt, dest, tag, comm, req));    \
    }

SENDS(SEND_C_WRAPPER)
ISENDS(ISEND_C_WRAPPER)

int MPI_Irecv_c(void *buf, MPI_Count count, MPI_Datatype dt, int src, int tag, MPI_Comm comm,
                MPI_Request *req)
{
    GUARD();
    return irecv(buf, count, dt, src, tag, comm, req);
}

int MPI_Recv_c(void *buf, MPI_Count count, MPI_Datatype dt, int src, int tag, MPI_Comm comm,
               MPI_Status *status)
{
    GUARD();
    return recv(buf, count, dt, src, tag, comm, status);
}

int MPI_Sendrecv_c(const void *sbuf, MPI_Count scount, MPI_Datatype sdt, int dest, int stag,
                   void *rbuf, MPI_Count rcount, MPI_Datatype rdt, int src, int rtag,
                   MPI_Comm comm, MPI_Status *status)
{
    GUARD();
    return sendrecv(sbuf, scount, sdt, dest, stag, rbuf, rcount, rdt, src, rtag, comm, status);
}

int MPI_Isendrecv_c(const void *sbuf, MPI_Count scount, MPI_Datatype sdt, int dest, int stag,
                    void *rbuf, MPI_Count rcount, MPI_Datatype rdt, int src, int rtag,
                    MPI_Comm comm, MPI_Request *req)
{
    GUARD();
    return isendrecv(sbuf, scount, sdt, dest, stag, rbuf, rcount, rdt, src, rtag, comm, req);
}

int MPI_Sendrecv_replace_c(void *buf, MPI_Count count, MPI_Datatype dt, int dest, int stag,
                           int src, int rtag, MPI_Comm comm, MPI_Status *status)
{
    GUARD();
    if (!svp_fits_int(count))
        return svp_refuse(comm, "MPI_Sendrecv_replace_c", SVP_COUNT_ABOVE_INT);
    return MPI_Sendrecv_replace(buf, (int)count, dt, dest, stag, src, rtag, comm, status);
}

int MPI_Isendrecv_replace_c(void *buf, MPI_Count count, MPI_Datatype dt, int dest, int stag,
                            int src, int rtag, MPI_Comm comm, MPI_Request *req)
{
    GUARD();
    if (!svp_fits_int(count))
        return svp_refuse(comm, "MPI_Isendrecv_replace_c", SVP_COUNT_ABOVE_INT);
    return MPI_Isendrecv_replace(buf, (int)count, dt, dest, stag, src, rtag, comm, req);
}
#endif
