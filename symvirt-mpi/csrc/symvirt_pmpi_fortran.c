/* SymVirt transparent mode, Open MPI's Fortran entry points: part of libsymvirt_pmpi_openmpi.so
 * (see symvirt_pmpi.c for the layer itself).
 *
 * Open MPI's Fortran bindings (mpif.h and `use mpi`) call PMPI_* directly, so the layer's C
 * wrappers never see Fortran traffic: this file wraps the gfortran symbols (mpi_send_ ...) and
 * forwards to the C wrappers, converting handles, statuses and the special buffers. MPICH's
 * Fortran bindings call the C MPI_* functions, which are already wrapped (wrapping them again
 * would count twice): for MPICH this file is empty. The mpi_f08 bindings are not covered. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>

#ifdef SYMVIRT_MPI_IMPL_OPENMPI

static void die(const char *what)
{
    fprintf(stderr, "symvirt-pmpi: %s\n", what);
    fflush(stderr);
    PMPI_Abort(MPI_COMM_WORLD, 70);
}

static MPI_Status *statuses(int n)
{
    MPI_Status *s = malloc((size_t)(n > 0 ? n : 1) * sizeof *s);
    if (s == NULL)
        die("out of memory");
    return s;
}

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


void mpi_comm_split_(MPI_Fint *comm, MPI_Fint *color, MPI_Fint *key, MPI_Fint *newcomm,
                     MPI_Fint *ierr)
{
    MPI_Comm c;
    *ierr = MPI_Comm_split(PMPI_Comm_f2c(*comm), *color, *key, &c);
    if (*ierr == MPI_SUCCESS)
        *newcomm = PMPI_Comm_c2f(c);
}

void mpi_comm_create_(MPI_Fint *comm, MPI_Fint *group, MPI_Fint *newcomm, MPI_Fint *ierr)
{
    MPI_Comm c;
    *ierr = MPI_Comm_create(PMPI_Comm_f2c(*comm), PMPI_Group_f2c(*group), &c);
    if (*ierr == MPI_SUCCESS)
        *newcomm = PMPI_Comm_c2f(c);
}

void mpi_cart_create_(MPI_Fint *comm, MPI_Fint *ndims, MPI_Fint *dims, MPI_Fint *periods,
                      MPI_Fint *reorder, MPI_Fint *newcomm, MPI_Fint *ierr)
{
    int n = *ndims, d[64], p[64];
    if (n < 0 || n > 64) {
        *ierr = MPI_ERR_DIMS;
        return;
    }
    for (int i = 0; i < n; i++) {
        d[i] = dims[i];
        p[i] = periods[i] != 0;
    }
    MPI_Comm c;
    *ierr = MPI_Cart_create(PMPI_Comm_f2c(*comm), n, d, p, *reorder != 0, &c);
    if (*ierr == MPI_SUCCESS)
        *newcomm = PMPI_Comm_c2f(c);
}

#define FPINIT(fname, cname)                                                                   \
    void fname(void *buf, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *peer, MPI_Fint *tag,        \
               MPI_Fint *comm, MPI_Fint *req, MPI_Fint *ierr)                                  \
    {                                                                                          \
        MPI_Request r;                                                                         \
        *ierr = cname(fbuf(buf), *count, PMPI_Type_f2c(*dt), *peer, *tag,                      \
                      PMPI_Comm_f2c(*comm), &r);                                               \
        if (*ierr == MPI_SUCCESS)                                                              \
            *req = PMPI_Request_c2f(r);                                                        \
    }
FPINIT(mpi_send_init_, MPI_Send_init)
FPINIT(mpi_ssend_init_, MPI_Ssend_init)
FPINIT(mpi_rsend_init_, MPI_Rsend_init)
FPINIT(mpi_bsend_init_, MPI_Bsend_init)
FPINIT(mpi_recv_init_, MPI_Recv_init)

void mpi_start_(MPI_Fint *req, MPI_Fint *ierr)
{
    MPI_Request r = PMPI_Request_f2c(*req);
    *ierr = MPI_Start(&r);
    *req = PMPI_Request_c2f(r);
}

void mpi_startall_(MPI_Fint *n, MPI_Fint *reqs, MPI_Fint *ierr)
{
    MPI_Request *r = creqs(*n, reqs);
    *ierr = MPI_Startall(*n, r);
    freqs(*n, r, reqs);
    free(r);
}

void mpi_cancel_(MPI_Fint *req, MPI_Fint *ierr)
{
    MPI_Request r = PMPI_Request_f2c(*req);
    *ierr = MPI_Cancel(&r);
}

void mpi_testany_(MPI_Fint *n, MPI_Fint *reqs, MPI_Fint *idx, MPI_Fint *flag, MPI_Fint *status,
                  MPI_Fint *ierr)
{
    MPI_Request *r = creqs(*n, reqs);
    MPI_Status c;
    int i = 0, f = 0;
    *ierr = MPI_Testany(*n, r, &i, &f, FSTATUS(status, &c));
    freqs(*n, r, reqs);
    *flag = f;
    *idx = i == MPI_UNDEFINED ? MPI_UNDEFINED : i + 1;
    if (*ierr == MPI_SUCCESS && f && i != MPI_UNDEFINED)
        status_out(&c, status);
    free(r);
}

#define FSOME(fname, cname)                                                                    \
    void fname(MPI_Fint *n, MPI_Fint *reqs, MPI_Fint *outcount, MPI_Fint *idx, MPI_Fint *sts,  \
               MPI_Fint *ierr)                                                                 \
    {                                                                                          \
        MPI_Request *r = creqs(*n, reqs);                                                      \
        MPI_Status *c = statuses(*n);                                                          \
        int *ci = malloc((size_t)(*n > 0 ? *n : 1) * sizeof(int));                             \
        int out = 0;                                                                           \
        if (ci == NULL)                                                                        \
            die("out of memory");                                                              \
        *ierr = cname(*n, r, &out, ci, c);                                                     \
        freqs(*n, r, reqs);                                                                    \
        *outcount = out;                                                                       \
        for (int i = 0; out != MPI_UNDEFINED && i < out; i++) {                                \
            idx[i] = ci[i] + 1;                                                                \
            if (!statuses_ignored(sts))                                                        \
                PMPI_Status_c2f(&c[i], &sts[i * (int)(sizeof(MPI_Status) / sizeof(int))]);     \
        }                                                                                      \
        free(r);                                                                               \
        free(c);                                                                               \
        free(ci);                                                                              \
    }
FSOME(mpi_testsome_, MPI_Testsome)
FSOME(mpi_waitsome_, MPI_Waitsome)

void mpi_improbe_(MPI_Fint *src, MPI_Fint *tag, MPI_Fint *comm, MPI_Fint *flag,
                  MPI_Fint *msg, MPI_Fint *status, MPI_Fint *ierr)
{
    MPI_Status c;
    MPI_Message m;
    int f = 0;
    *ierr = MPI_Improbe(*src, *tag, PMPI_Comm_f2c(*comm), &f, &m, FSTATUS(status, &c));
    *flag = f;
    if (*ierr == MPI_SUCCESS && f) {
        *msg = PMPI_Message_c2f(m);
        status_out(&c, status);
    }
}

void mpi_mprobe_(MPI_Fint *src, MPI_Fint *tag, MPI_Fint *comm, MPI_Fint *msg, MPI_Fint *status,
                 MPI_Fint *ierr)
{
    MPI_Status c;
    MPI_Message m;
    *ierr = MPI_Mprobe(*src, *tag, PMPI_Comm_f2c(*comm), &m, FSTATUS(status, &c));
    if (*ierr == MPI_SUCCESS) {
        *msg = PMPI_Message_c2f(m);
        status_out(&c, status);
    }
}

void mpi_mrecv_(void *buf, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *msg, MPI_Fint *status,
                MPI_Fint *ierr)
{
    MPI_Status c;
    MPI_Message m = PMPI_Message_f2c(*msg);
    *ierr = MPI_Mrecv(fbuf(buf), *count, PMPI_Type_f2c(*dt), &m, FSTATUS(status, &c));
    if (*ierr == MPI_SUCCESS) {
        *msg = PMPI_Message_c2f(m);
        status_out(&c, status);
    }
}

void mpi_imrecv_(void *buf, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *msg, MPI_Fint *req,
                 MPI_Fint *ierr)
{
    MPI_Request r;
    MPI_Message m = PMPI_Message_f2c(*msg);
    *ierr = MPI_Imrecv(fbuf(buf), *count, PMPI_Type_f2c(*dt), &m, &r);
    if (*ierr == MPI_SUCCESS) {
        *msg = PMPI_Message_c2f(m);
        *req = PMPI_Request_c2f(r);
    }
}

void mpi_ibarrier_(MPI_Fint *comm, MPI_Fint *req, MPI_Fint *ierr)
{
    MPI_Request r;
    *ierr = MPI_Ibarrier(PMPI_Comm_f2c(*comm), &r);
    if (*ierr == MPI_SUCCESS)
        *req = PMPI_Request_c2f(r);
}

void mpi_ibcast_(void *buf, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *root, MPI_Fint *comm,
                 MPI_Fint *req, MPI_Fint *ierr)
{
    MPI_Request r;
    *ierr = MPI_Ibcast(fbuf(buf), *count, PMPI_Type_f2c(*dt), *root, PMPI_Comm_f2c(*comm), &r);
    if (*ierr == MPI_SUCCESS)
        *req = PMPI_Request_c2f(r);
}

void mpi_iallreduce_(void *s, void *r, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *op,
                     MPI_Fint *comm, MPI_Fint *req, MPI_Fint *ierr)
{
    MPI_Request q;
    *ierr = MPI_Iallreduce(fbuf(s), fbuf(r), *count, PMPI_Type_f2c(*dt), PMPI_Op_f2c(*op),
                           PMPI_Comm_f2c(*comm), &q);
    if (*ierr == MPI_SUCCESS)
        *req = PMPI_Request_c2f(q);
}

void mpi_sendrecv_replace_(void *buf, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *dest,
                           MPI_Fint *stag, MPI_Fint *src, MPI_Fint *rtag, MPI_Fint *comm,
                           MPI_Fint *status, MPI_Fint *ierr)
{
    MPI_Status c;
    *ierr = MPI_Sendrecv_replace(fbuf(buf), *count, PMPI_Type_f2c(*dt), *dest, *stag, *src,
                                 *rtag, PMPI_Comm_f2c(*comm), FSTATUS(status, &c));
    if (*ierr == MPI_SUCCESS)
        status_out(&c, status);
}

void mpi_alltoallv_(void *s, MPI_Fint *sc, MPI_Fint *sd, MPI_Fint *sdt, void *r, MPI_Fint *rc,
                    MPI_Fint *rd, MPI_Fint *rdt, MPI_Fint *comm, MPI_Fint *ierr)
{
    /* MPI_Fint is int with gfortran's default integer: the count arrays pass through. */
    *ierr = MPI_Alltoallv(fbuf(s), sc, sd, PMPI_Type_f2c(*sdt), fbuf(r), rc, rd,
                          PMPI_Type_f2c(*rdt), PMPI_Comm_f2c(*comm));
}

void mpi_allgatherv_(void *s, MPI_Fint *sc, MPI_Fint *sdt, void *r, MPI_Fint *rc, MPI_Fint *rd,
                     MPI_Fint *rdt, MPI_Fint *comm, MPI_Fint *ierr)
{
    *ierr = MPI_Allgatherv(fbuf(s), *sc, PMPI_Type_f2c(*sdt), fbuf(r), rc, rd,
                           PMPI_Type_f2c(*rdt), PMPI_Comm_f2c(*comm));
}

void mpi_gatherv_(void *s, MPI_Fint *sc, MPI_Fint *sdt, void *r, MPI_Fint *rc, MPI_Fint *rd,
                  MPI_Fint *rdt, MPI_Fint *root, MPI_Fint *comm, MPI_Fint *ierr)
{
    *ierr = MPI_Gatherv(fbuf(s), *sc, PMPI_Type_f2c(*sdt), fbuf(r), rc, rd, PMPI_Type_f2c(*rdt),
                        *root, PMPI_Comm_f2c(*comm));
}

void mpi_scatterv_(void *s, MPI_Fint *sc, MPI_Fint *sd, MPI_Fint *sdt, void *r, MPI_Fint *rc,
                   MPI_Fint *rdt, MPI_Fint *root, MPI_Fint *comm, MPI_Fint *ierr)
{
    *ierr = MPI_Scatterv(fbuf(s), sc, sd, PMPI_Type_f2c(*sdt), fbuf(r), *rc, PMPI_Type_f2c(*rdt),
                         *root, PMPI_Comm_f2c(*comm));
}

void mpi_scan_(void *s, void *r, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *op, MPI_Fint *comm,
               MPI_Fint *ierr)
{
    *ierr = MPI_Scan(fbuf(s), fbuf(r), *count, PMPI_Type_f2c(*dt), PMPI_Op_f2c(*op),
                     PMPI_Comm_f2c(*comm));
}

void mpi_reduce_scatter_(void *s, void *r, MPI_Fint *rc, MPI_Fint *dt, MPI_Fint *op,
                         MPI_Fint *comm, MPI_Fint *ierr)
{
    *ierr = MPI_Reduce_scatter(fbuf(s), fbuf(r), rc, PMPI_Type_f2c(*dt), PMPI_Op_f2c(*op),
                               PMPI_Comm_f2c(*comm));
}

#endif /* SYMVIRT_MPI_IMPL_OPENMPI */
