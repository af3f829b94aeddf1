/* SymVirt transparent mode, Open MPI's Fortran entry points: part of libsymvirt_pmpi_openmpi.so
 * (see pmpi/pmpi_internal.h for the layer itself).
 *
 * Open MPI's Fortran bindings (mpif.h and `use mpi`) call PMPI_* directly, so the layer's C
 * wrappers never see Fortran traffic: this file wraps the gfortran symbols (mpi_send_ ...) and
 * forwards to the C wrappers, converting handles, statuses and the special buffers. MPICH's
 * Fortran bindings call the C MPI_* functions, which are already wrapped (wrapping them again
 * would count twice): for MPICH this file is empty. The mpi_f08 bindings are not covered.
 *
 * Conventions: ierr is always set; handles made by a call (communicators, requests) are
 * converted back only on success; choice buffers go through fbuf (MPI_IN_PLACE, MPI_BOTTOM);
 * MPI_STATUS(ES)_IGNORE are recognised by address. gfortran's default INTEGER and LOGICAL are
 * MPI_Fint-sized (LOGICAL true is 1), so integer arrays pass through as int arrays, and
 * INTEGER(KIND=MPI_ADDRESS_KIND) arrays as MPI_Aint arrays. What a non-blocking call's C
 * arguments need beyond the Fortran ones (converted datatype arrays, MPI_Comm_idup's new
 * communicator) lives until its request completes: the layer starts the real collective later
 * (see pmpi/deferred.c), so it cannot live on the wrapper's stack (see held). */
#include "pmpi/pmpi_internal.h"

#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#ifdef SYMVIRT_MPI_IMPL_OPENMPI

_Static_assert(sizeof(MPI_Fint) == sizeof(int), "Fortran INTEGER arrays pass as int arrays");

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
extern char mpi_fortran_unweighted_[];
extern char mpi_fortran_weights_empty_[];

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

/* MPI_UNWEIGHTED and MPI_WEIGHTS_EMPTY as Fortran passes them (by address, like fbuf's). */
static const int *fweights(MPI_Fint *w)
{
    if ((char *)w == mpi_fortran_unweighted_)
        return MPI_UNWEIGHTED;
    if ((char *)w == mpi_fortran_weights_empty_)
        return MPI_WEIGHTS_EMPTY;
    return w;
}

/* A request a call (q_) started, back to Fortran (req) on success; ierr set. */
#define REQ_OUT(call)                                                                          \
    do {                                                                                       \
        MPI_Request q_;                                                                        \
        *ierr = call;                                                                          \
        if (*ierr == MPI_SUCCESS)                                                              \
            *req = PMPI_Request_c2f(q_);                                                       \
    } while (0)

/* A communicator a call made, back to Fortran on success. */
static void comm_out(MPI_Fint ierr, MPI_Comm c, MPI_Fint *f)
{
    if (ierr == MPI_SUCCESS)
        *f = PMPI_Comm_c2f(c);
}

/* A Fortran LOGICAL array as C ints (n < 0 is left to MPI to report: an empty array). */
static int *logicals(const MPI_Fint *f, int n)
{
    int *c = malloc((size_t)(n > 0 ? n : 1) * sizeof *c);
    if (c == NULL)
        die("out of memory");
    for (int i = 0; i < n; i++)
        c[i] = f[i] != 0;
    return c;
}

/* A w variant's datatype arrays converted, in one block the caller frees: ns send types, then
 * nr receive types at [ns]. sf NULL (the send buffer is MPI_IN_PLACE): no send types (MPI
 * does not read them, and Fortran may pass anything). */
static MPI_Datatype *types_in(const MPI_Fint *sf, int ns, const MPI_Fint *rf, int nr)
{
    ns = sf != NULL && ns > 0 ? ns : 0;
    nr = nr > 0 ? nr : 0;
    MPI_Datatype *t = malloc((size_t)(ns + nr > 0 ? ns + nr : 1) * sizeof *t);
    if (t == NULL)
        die("out of memory");
    for (int i = 0; i < ns; i++)
        t[i] = PMPI_Type_f2c(sf[i]);
    for (int i = 0; i < nr; i++)
        t[ns + i] = PMPI_Type_f2c(rf[i]);
    return t;
}

/* How many peers a w variant's arrays describe: sends and receives. The group's size (the
 * remote group's for an intercommunicator); for the neighborhood ones, the topology's out-
 * and in-degree. An invalid communicator gives 0 (MPI reports it at the call). */
static void peers(MPI_Comm c, int neighborhood, int *nsend, int *nrecv)
{
    int n = 0, inter = 0, topo = MPI_UNDEFINED, me = 0, weighted = 0;
    *nsend = *nrecv = 0;
    if (c == MPI_COMM_NULL)
        return;
    if (!neighborhood) {
        PMPI_Comm_test_inter(c, &inter);
        if (inter)
            PMPI_Comm_remote_size(c, &n);
        else
            PMPI_Comm_size(c, &n);
        *nsend = *nrecv = n;
        return;
    }
    PMPI_Topo_test(c, &topo);
    if (topo == MPI_CART) {
        PMPI_Cartdim_get(c, &n);
        *nsend = *nrecv = 2 * n;
    } else if (topo == MPI_GRAPH) {
        PMPI_Comm_rank(c, &me);
        PMPI_Graph_neighbors_count(c, me, &n);
        *nsend = *nrecv = n;
    } else if (topo == MPI_DIST_GRAPH) {
        PMPI_Dist_graph_neighbors_count(c, nrecv, nsend, &weighted);
    }
}

/* ---- what a Fortran request holds until it completes --------------------------------------
 * Kept in a list by the Fortran request's handle; released when a wrapper sees the request
 * complete (converted back as MPI_REQUEST_NULL, or MPI_Request_get_status's flag). */
typedef struct held {
    struct held *next;
    MPI_Fint req;
    MPI_Comm comm;     /* MPI_Comm_idup: the layer writes it when the real call starts */
    MPI_Fint *newcomm; /* where comm goes in Fortran on completion; NULL: none */
    void *owned;       /* freed on completion */
} held;

static held *helds;

static held *held_new(void *owned)
{
    held *h = calloc(1, sizeof *h);
    if (h == NULL)
        die("out of memory");
    h->comm = MPI_COMM_NULL;
    h->owned = owned;
    return h;
}

/* After the call that started request r (ierr its result): kept until r completes, or
 * released now if it did not start. */
static void held_keep(held *h, MPI_Fint ierr, MPI_Request r, MPI_Fint *req)
{
    if (ierr != MPI_SUCCESS) {
        free(h->owned);
        free(h);
        return;
    }
    *req = PMPI_Request_c2f(r);
    h->req = *req;
    h->next = helds;
    helds = h;
}

/* The Fortran request req has completed: its communicator out, its memory freed. */
static void held_release(MPI_Fint req)
{
    for (held **link = &helds; *link != NULL; link = &(*link)->next) {
        held *h = *link;
        if (h->req != req)
            continue;
        if (h->newcomm != NULL)
            *h->newcomm = PMPI_Comm_c2f(h->comm);
        *link = h->next;
        free(h->owned);
        free(h);
        return;
    }
}

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
    GUARD();
    MPI_Comm c;
    *ierr = MPI_Comm_dup(PMPI_Comm_f2c(*comm), &c);
    comm_out(*ierr, c, newcomm);
}

void mpi_comm_free_(MPI_Fint *comm, MPI_Fint *ierr)
{
    GUARD();
    MPI_Comm c = PMPI_Comm_f2c(*comm);
    *ierr = MPI_Comm_free(&c);
    if (*ierr == MPI_SUCCESS)
        *comm = PMPI_Comm_c2f(c);
}

/* As Open MPI's binding: Fortran gets the size, not the buffer's address. */
void mpi_buffer_detach_(void *buffer, MPI_Fint *size, MPI_Fint *ierr)
{
    (void)buffer;
    GUARD();
    void *attached = NULL;
    int n = 0;
    *ierr = MPI_Buffer_detach(&attached, &n);
    if (*ierr == MPI_SUCCESS)
        *size = n;
}

/* Unwrapped, Open MPI's binding ran PMPI_Comm_disconnect (a barrier) outside the gate, where
 * the progress thread could make a cut while this thread was inside MPI. */
void mpi_comm_disconnect_(MPI_Fint *comm, MPI_Fint *ierr)
{
    GUARD();
    MPI_Comm c = PMPI_Comm_f2c(*comm);
    *ierr = MPI_Comm_disconnect(&c);
    if (*ierr == MPI_SUCCESS)
        *comm = PMPI_Comm_c2f(c);
}

/* One-sided (see pmpi/onesided.c): the calls that make, fence and free a window, so that a
 * Fortran program's open window is seen (a cut is answered "unable" for it, and the progress
 * thread steps back) and those collective calls are aligned. Unwrapped until session 27: the
 * window went unseen, and the progress thread could make a cut while this thread was inside
 * a fence. The baseptr of the allocating calls (an address-sized INTEGER, or a C_PTR through
 * the _cptr_ entry points) receives the window's memory, as in Open MPI's own bindings. */
void mpi_win_create_(void *base, MPI_Aint *size, MPI_Fint *disp_unit, MPI_Fint *info,
                     MPI_Fint *comm, MPI_Fint *win, MPI_Fint *ierr)
{
    GUARD();
    MPI_Win w;
    *ierr = MPI_Win_create(base, *size, *disp_unit, PMPI_Info_f2c(*info), PMPI_Comm_f2c(*comm),
                           &w);
    if (*ierr == MPI_SUCCESS)
        *win = PMPI_Win_c2f(w);
}

void mpi_win_allocate_(MPI_Aint *size, MPI_Fint *disp_unit, MPI_Fint *info, MPI_Fint *comm,
                       void *baseptr, MPI_Fint *win, MPI_Fint *ierr)
{
    GUARD();
    MPI_Win w;
    *ierr = MPI_Win_allocate(*size, *disp_unit, PMPI_Info_f2c(*info), PMPI_Comm_f2c(*comm),
                             baseptr, &w);
    if (*ierr == MPI_SUCCESS)
        *win = PMPI_Win_c2f(w);
}

void mpi_win_allocate_cptr_(MPI_Aint *size, MPI_Fint *disp_unit, MPI_Fint *info,
                            MPI_Fint *comm, void *baseptr, MPI_Fint *win, MPI_Fint *ierr)
{
    mpi_win_allocate_(size, disp_unit, info, comm, baseptr, win, ierr);
}

void mpi_win_allocate_shared_(MPI_Aint *size, MPI_Fint *disp_unit, MPI_Fint *info,
                              MPI_Fint *comm, void *baseptr, MPI_Fint *win, MPI_Fint *ierr)
{
    GUARD();
    MPI_Win w;
    *ierr = MPI_Win_allocate_shared(*size, *disp_unit, PMPI_Info_f2c(*info),
                                    PMPI_Comm_f2c(*comm), baseptr, &w);
    if (*ierr == MPI_SUCCESS)
        *win = PMPI_Win_c2f(w);
}

void mpi_win_allocate_shared_cptr_(MPI_Aint *size, MPI_Fint *disp_unit, MPI_Fint *info,
                                   MPI_Fint *comm, void *baseptr, MPI_Fint *win,
                                   MPI_Fint *ierr)
{
    mpi_win_allocate_shared_(size, disp_unit, info, comm, baseptr, win, ierr);
}

void mpi_win_create_dynamic_(MPI_Fint *info, MPI_Fint *comm, MPI_Fint *win, MPI_Fint *ierr)
{
    GUARD();
    MPI_Win w;
    *ierr = MPI_Win_create_dynamic(PMPI_Info_f2c(*info), PMPI_Comm_f2c(*comm), &w);
    if (*ierr == MPI_SUCCESS)
        *win = PMPI_Win_c2f(w);
}

void mpi_win_fence_(MPI_Fint *assert_, MPI_Fint *win, MPI_Fint *ierr)
{
    GUARD();
    *ierr = MPI_Win_fence(*assert_, PMPI_Win_f2c(*win));
}

void mpi_win_free_(MPI_Fint *win, MPI_Fint *ierr)
{
    GUARD();
    MPI_Win w = PMPI_Win_f2c(*win);
    *ierr = MPI_Win_free(&w);
    if (*ierr == MPI_SUCCESS)
        *win = PMPI_Win_c2f(w);
}

/* MPI-IO (see pmpi/files.c): open, close, and the collective calls below. */

/* A Fortran string (blank-padded; gfortran passes its length after the other arguments) as a
 * C string the caller frees. */
static char *c_string(const char *f, size_t len)
{
    while (len > 0 && f[len - 1] == ' ')
        len--;
    char *s = malloc(len + 1);
    if (s == NULL)
        die("out of memory");
    memcpy(s, f, len);
    s[len] = '\0';
    return s;
}

void mpi_file_open_(MPI_Fint *comm, const char *name, MPI_Fint *amode, MPI_Fint *info,
                    MPI_Fint *fh, MPI_Fint *ierr, size_t name_len)
{
    GUARD();
    char *path = c_string(name, name_len);
    MPI_File f = MPI_FILE_NULL;
    *ierr = MPI_File_open(PMPI_Comm_f2c(*comm), path, *amode, PMPI_Info_f2c(*info), &f);
    free(path);
    if (*ierr == MPI_SUCCESS)
        *fh = PMPI_File_c2f(f);
}

void mpi_file_close_(MPI_Fint *fh, MPI_Fint *ierr)
{
    GUARD();
    MPI_File f = PMPI_File_f2c(*fh);
    *ierr = MPI_File_close(&f);
    if (*ierr == MPI_SUCCESS)
        *fh = PMPI_File_c2f(f);
}

/* The collective reads and writes of an open file: (fh, [offset,] buf, count, datatype,
 * status); at_param and at_arg are empty, or the offset's (INTEGER(KIND=MPI_OFFSET_KIND)). */
#define FFILE_DATA(fname, cname, at_param, at_arg)                                             \
    void fname(MPI_Fint *fh, at_param void *buf, MPI_Fint *count, MPI_Fint *dt,                \
               MPI_Fint *status, MPI_Fint *ierr)                                               \
    {                                                                                          \
        GUARD();                                                                               \
        MPI_Status c;                                                                          \
        *ierr = cname(PMPI_File_f2c(*fh), at_arg fbuf(buf), *count, PMPI_Type_f2c(*dt),       \
                      FSTATUS(status, &c));                                                    \
        if (*ierr == MPI_SUCCESS)                                                              \
            status_out(&c, status);                                                            \
    }
FFILE_DATA(mpi_file_write_all_, MPI_File_write_all, , )
FFILE_DATA(mpi_file_read_all_, MPI_File_read_all, , )
FFILE_DATA(mpi_file_write_ordered_, MPI_File_write_ordered, , )
FFILE_DATA(mpi_file_read_ordered_, MPI_File_read_ordered, , )
#define OFFSET_PARAM MPI_Offset *offset,
#define OFFSET_ARG *offset,
FFILE_DATA(mpi_file_write_at_all_, MPI_File_write_at_all, OFFSET_PARAM, OFFSET_ARG)
FFILE_DATA(mpi_file_read_at_all_, MPI_File_read_at_all, OFFSET_PARAM, OFFSET_ARG)

void mpi_file_set_view_(MPI_Fint *fh, MPI_Offset *disp, MPI_Fint *etype, MPI_Fint *filetype,
                        const char *datarep, MPI_Fint *info, MPI_Fint *ierr, size_t datarep_len)
{
    GUARD();
    char *rep = c_string(datarep, datarep_len);
    *ierr = MPI_File_set_view(PMPI_File_f2c(*fh), *disp, PMPI_Type_f2c(*etype),
                              PMPI_Type_f2c(*filetype), rep, PMPI_Info_f2c(*info));
    free(rep);
}

void mpi_file_sync_(MPI_Fint *fh, MPI_Fint *ierr)
{
    GUARD();
    *ierr = MPI_File_sync(PMPI_File_f2c(*fh));
}

#define FSEND(fname, cname)                                                                    \
    void fname(void *buf, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *dest, MPI_Fint *tag,        \
               MPI_Fint *comm, MPI_Fint *ierr)                                                 \
    {                                                                                          \
        GUARD();                                                                               \
        *ierr = cname(fbuf(buf), *count, PMPI_Type_f2c(*dt), *dest, *tag,                     \
                      PMPI_Comm_f2c(*comm));                                                  \
    }
FSEND(mpi_send_, MPI_Send)
FSEND(mpi_ssend_, MPI_Ssend)
FSEND(mpi_rsend_, MPI_Rsend)
FSEND(mpi_bsend_, MPI_Bsend)

/* Calls shaped (buf, count, datatype, peer, tag, comm, request): the non-blocking sends and
 * receive, and the persistent ones. */
#define FISEND(fname, cname)                                                                   \
    void fname(void *buf, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *dest, MPI_Fint *tag,        \
               MPI_Fint *comm, MPI_Fint *req, MPI_Fint *ierr)                                  \
    {                                                                                          \
        GUARD();                                                                               \
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
    GUARD();
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
    GUARD();
    MPI_Status c;
    *ierr = MPI_Sendrecv(fbuf(sbuf), *scount, PMPI_Type_f2c(*sdt), *dest, *stag, fbuf(rbuf),
                         *rcount, PMPI_Type_f2c(*rdt), *src, *rtag, PMPI_Comm_f2c(*comm),
                         FSTATUS(status, &c));
    if (*ierr == MPI_SUCCESS)
        status_out(&c, status);
}

void mpi_probe_(MPI_Fint *src, MPI_Fint *tag, MPI_Fint *comm, MPI_Fint *status, MPI_Fint *ierr)
{
    GUARD();
    MPI_Status c;
    *ierr = MPI_Probe(*src, *tag, PMPI_Comm_f2c(*comm), FSTATUS(status, &c));
    if (*ierr == MPI_SUCCESS)
        status_out(&c, status);
}

void mpi_iprobe_(MPI_Fint *src, MPI_Fint *tag, MPI_Fint *comm, MPI_Fint *flag, MPI_Fint *status,
                 MPI_Fint *ierr)
{
    GUARD();
    MPI_Status c;
    int f = 0;
    *ierr = MPI_Iprobe(*src, *tag, PMPI_Comm_f2c(*comm), &f, FSTATUS(status, &c));
    *flag = f;
    if (*ierr == MPI_SUCCESS && f)
        status_out(&c, status);
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

/* Requests back to Fortran. One that became MPI_REQUEST_NULL has completed (only
 * non-persistent requests are held): what it held is released first. */
static void freqs(int n, const MPI_Request *r, MPI_Fint *f)
{
    for (int i = 0; i < n; i++) {
        if (helds != NULL && r[i] == MPI_REQUEST_NULL)
            held_release(f[i]);
        f[i] = PMPI_Request_c2f(r[i]);
    }
}

void mpi_wait_(MPI_Fint *req, MPI_Fint *status, MPI_Fint *ierr)
{
    GUARD();
    MPI_Request r = PMPI_Request_f2c(*req);
    MPI_Status c;
    *ierr = MPI_Wait(&r, FSTATUS(status, &c));
    if (*ierr == MPI_SUCCESS) {
        freqs(1, &r, req);
        status_out(&c, status);
    }
}

void mpi_test_(MPI_Fint *req, MPI_Fint *flag, MPI_Fint *status, MPI_Fint *ierr)
{
    GUARD();
    MPI_Request r = PMPI_Request_f2c(*req);
    MPI_Status c;
    int f = 0;
    *ierr = MPI_Test(&r, &f, FSTATUS(status, &c));
    *flag = f;
    if (*ierr == MPI_SUCCESS && f) {
        freqs(1, &r, req);
        status_out(&c, status);
    }
}

static int statuses_ignored(MPI_Fint *f)
{
    return (char *)f == mpi_fortran_statuses_ignore_;
}

void mpi_waitall_(MPI_Fint *n, MPI_Fint *reqs, MPI_Fint *sts, MPI_Fint *ierr)
{
    GUARD();
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
    GUARD();
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
    GUARD();
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

/* A datatype or operation a non-blocking collective may still use (see MPI_Type_free). */
void mpi_type_free_(MPI_Fint *dt, MPI_Fint *ierr)
{
    GUARD();
    MPI_Datatype t = PMPI_Type_f2c(*dt);
    *ierr = MPI_Type_free(&t);
    if (*ierr == MPI_SUCCESS)
        *dt = PMPI_Type_c2f(t);
}

void mpi_op_free_(MPI_Fint *op, MPI_Fint *ierr)
{
    GUARD();
    MPI_Op o = PMPI_Op_f2c(*op);
    *ierr = MPI_Op_free(&o);
    if (*ierr == MPI_SUCCESS)
        *op = PMPI_Op_c2f(o);
}

void mpi_request_free_(MPI_Fint *req, MPI_Fint *ierr)
{
    GUARD();
    MPI_Request r = PMPI_Request_f2c(*req);
    *ierr = MPI_Request_free(&r);
    if (*ierr == MPI_SUCCESS)
        *req = PMPI_Request_c2f(r);
}

void mpi_barrier_(MPI_Fint *comm, MPI_Fint *ierr)
{
    GUARD();
    *ierr = MPI_Barrier(PMPI_Comm_f2c(*comm));
}

void mpi_bcast_(void *buf, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *root, MPI_Fint *comm,
                MPI_Fint *ierr)
{
    GUARD();
    *ierr = MPI_Bcast(fbuf(buf), *count, PMPI_Type_f2c(*dt), *root, PMPI_Comm_f2c(*comm));
}

void mpi_reduce_(void *s, void *r, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *op, MPI_Fint *root,
                 MPI_Fint *comm, MPI_Fint *ierr)
{
    GUARD();
    *ierr = MPI_Reduce(fbuf(s), fbuf(r), *count, PMPI_Type_f2c(*dt), PMPI_Op_f2c(*op), *root,
                       PMPI_Comm_f2c(*comm));
}

/* (sbuf, rbuf, count, type, op, comm): Allreduce, Scan, Exscan, Reduce_scatter_block. */
#define FREDUCELIKE(fname, cname)                                                              \
    void fname(void *s, void *r, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *op, MPI_Fint *comm,  \
               MPI_Fint *ierr)                                                                 \
    {                                                                                          \
        GUARD();                                                                               \
        *ierr = cname(fbuf(s), fbuf(r), *count, PMPI_Type_f2c(*dt), PMPI_Op_f2c(*op),          \
                      PMPI_Comm_f2c(*comm));                                                   \
    }
FREDUCELIKE(mpi_allreduce_, MPI_Allreduce)
FREDUCELIKE(mpi_scan_, MPI_Scan)
FREDUCELIKE(mpi_exscan_, MPI_Exscan)
FREDUCELIKE(mpi_reduce_scatter_block_, MPI_Reduce_scatter_block)

#define FGATHERLIKE(fname, cname)                                                              \
    void fname(void *s, MPI_Fint *sc, MPI_Fint *sdt, void *r, MPI_Fint *rc, MPI_Fint *rdt,     \
               MPI_Fint *comm, MPI_Fint *ierr)                                                 \
    {                                                                                          \
        GUARD();                                                                               \
        *ierr = cname(fbuf(s), *sc, PMPI_Type_f2c(*sdt), fbuf(r), *rc, PMPI_Type_f2c(*rdt),    \
                      PMPI_Comm_f2c(*comm));                                                  \
    }
FGATHERLIKE(mpi_alltoall_, MPI_Alltoall)
FGATHERLIKE(mpi_allgather_, MPI_Allgather)
FGATHERLIKE(mpi_neighbor_allgather_, MPI_Neighbor_allgather)
FGATHERLIKE(mpi_neighbor_alltoall_, MPI_Neighbor_alltoall)

#define FROOTED(fname, cname)                                                                  \
    void fname(void *s, MPI_Fint *sc, MPI_Fint *sdt, void *r, MPI_Fint *rc, MPI_Fint *rdt,     \
               MPI_Fint *root, MPI_Fint *comm, MPI_Fint *ierr)                                 \
    {                                                                                          \
        GUARD();                                                                               \
        *ierr = cname(fbuf(s), *sc, PMPI_Type_f2c(*sdt), fbuf(r), *rc, PMPI_Type_f2c(*rdt),    \
                      *root, PMPI_Comm_f2c(*comm));                                           \
    }
FROOTED(mpi_gather_, MPI_Gather)
FROOTED(mpi_scatter_, MPI_Scatter)


void mpi_comm_split_(MPI_Fint *comm, MPI_Fint *color, MPI_Fint *key, MPI_Fint *newcomm,
                     MPI_Fint *ierr)
{
    GUARD();
    MPI_Comm c;
    *ierr = MPI_Comm_split(PMPI_Comm_f2c(*comm), *color, *key, &c);
    comm_out(*ierr, c, newcomm);
}

void mpi_comm_create_(MPI_Fint *comm, MPI_Fint *group, MPI_Fint *newcomm, MPI_Fint *ierr)
{
    GUARD();
    MPI_Comm c;
    *ierr = MPI_Comm_create(PMPI_Comm_f2c(*comm), PMPI_Group_f2c(*group), &c);
    comm_out(*ierr, c, newcomm);
}

void mpi_cart_create_(MPI_Fint *comm, MPI_Fint *ndims, MPI_Fint *dims, MPI_Fint *periods,
                      MPI_Fint *reorder, MPI_Fint *newcomm, MPI_Fint *ierr)
{
    GUARD();
    int *p = logicals(periods, *ndims);
    MPI_Comm c;
    *ierr = MPI_Cart_create(PMPI_Comm_f2c(*comm), *ndims, dims, p, *reorder != 0, &c);
    comm_out(*ierr, c, newcomm);
    free(p);
}

FISEND(mpi_send_init_, MPI_Send_init)
FISEND(mpi_ssend_init_, MPI_Ssend_init)
FISEND(mpi_rsend_init_, MPI_Rsend_init)
FISEND(mpi_bsend_init_, MPI_Bsend_init)
FISEND(mpi_recv_init_, MPI_Recv_init)

void mpi_start_(MPI_Fint *req, MPI_Fint *ierr)
{
    GUARD();
    MPI_Request r = PMPI_Request_f2c(*req);
    *ierr = MPI_Start(&r);
    *req = PMPI_Request_c2f(r);
}

void mpi_startall_(MPI_Fint *n, MPI_Fint *reqs, MPI_Fint *ierr)
{
    GUARD();
    MPI_Request *r = creqs(*n, reqs);
    *ierr = MPI_Startall(*n, r);
    freqs(*n, r, reqs);
    free(r);
}

void mpi_cancel_(MPI_Fint *req, MPI_Fint *ierr)
{
    GUARD();
    MPI_Request r = PMPI_Request_f2c(*req);
    *ierr = MPI_Cancel(&r);
}

void mpi_testany_(MPI_Fint *n, MPI_Fint *reqs, MPI_Fint *idx, MPI_Fint *flag, MPI_Fint *status,
                  MPI_Fint *ierr)
{
    GUARD();
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
        GUARD();                                                                               \
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
    GUARD();
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
    GUARD();
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
    GUARD();
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
    GUARD();
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
    GUARD();
    REQ_OUT(MPI_Ibarrier(PMPI_Comm_f2c(*comm), &q_));
}

void mpi_ibcast_(void *buf, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *root, MPI_Fint *comm,
                 MPI_Fint *req, MPI_Fint *ierr)
{
    GUARD();
    REQ_OUT(MPI_Ibcast(fbuf(buf), *count, PMPI_Type_f2c(*dt), *root, PMPI_Comm_f2c(*comm),
                       &q_));
}

#define FIREDUCELIKE(fname, cname)                                                             \
    void fname(void *s, void *r, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *op, MPI_Fint *comm,  \
               MPI_Fint *req, MPI_Fint *ierr)                                                  \
    {                                                                                          \
        GUARD();                                                                               \
        REQ_OUT(cname(fbuf(s), fbuf(r), *count, PMPI_Type_f2c(*dt), PMPI_Op_f2c(*op),          \
                      PMPI_Comm_f2c(*comm), &q_));                                             \
    }
FIREDUCELIKE(mpi_iallreduce_, MPI_Iallreduce)
FIREDUCELIKE(mpi_iscan_, MPI_Iscan)
FIREDUCELIKE(mpi_iexscan_, MPI_Iexscan)
FIREDUCELIKE(mpi_ireduce_scatter_block_, MPI_Ireduce_scatter_block)

void mpi_sendrecv_replace_(void *buf, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *dest,
                           MPI_Fint *stag, MPI_Fint *src, MPI_Fint *rtag, MPI_Fint *comm,
                           MPI_Fint *status, MPI_Fint *ierr)
{
    GUARD();
    MPI_Status c;
    *ierr = MPI_Sendrecv_replace(fbuf(buf), *count, PMPI_Type_f2c(*dt), *dest, *stag, *src,
                                 *rtag, PMPI_Comm_f2c(*comm), FSTATUS(status, &c));
    if (*ierr == MPI_SUCCESS)
        status_out(&c, status);
}

void mpi_gatherv_(void *s, MPI_Fint *sc, MPI_Fint *sdt, void *r, MPI_Fint *rc, MPI_Fint *rd,
                  MPI_Fint *rdt, MPI_Fint *root, MPI_Fint *comm, MPI_Fint *ierr)
{
    GUARD();
    *ierr = MPI_Gatherv(fbuf(s), *sc, PMPI_Type_f2c(*sdt), fbuf(r), rc, rd, PMPI_Type_f2c(*rdt),
                        *root, PMPI_Comm_f2c(*comm));
}

void mpi_scatterv_(void *s, MPI_Fint *sc, MPI_Fint *sd, MPI_Fint *sdt, void *r, MPI_Fint *rc,
                   MPI_Fint *rdt, MPI_Fint *root, MPI_Fint *comm, MPI_Fint *ierr)
{
    GUARD();
    *ierr = MPI_Scatterv(fbuf(s), sc, sd, PMPI_Type_f2c(*sdt), fbuf(r), *rc, PMPI_Type_f2c(*rdt),
                         *root, PMPI_Comm_f2c(*comm));
}

void mpi_reduce_scatter_(void *s, void *r, MPI_Fint *rc, MPI_Fint *dt, MPI_Fint *op,
                         MPI_Fint *comm, MPI_Fint *ierr)
{
    GUARD();
    *ierr = MPI_Reduce_scatter(fbuf(s), fbuf(r), rc, PMPI_Type_f2c(*dt), PMPI_Op_f2c(*op),
                               PMPI_Comm_f2c(*comm));
}

void mpi_ireduce_(void *s, void *r, MPI_Fint *count, MPI_Fint *dt, MPI_Fint *op, MPI_Fint *root,
                  MPI_Fint *comm, MPI_Fint *req, MPI_Fint *ierr)
{
    GUARD();
    REQ_OUT(MPI_Ireduce(fbuf(s), fbuf(r), *count, PMPI_Type_f2c(*dt), PMPI_Op_f2c(*op), *root,
                        PMPI_Comm_f2c(*comm), &q_));
}

void mpi_ireduce_scatter_(void *s, void *r, MPI_Fint *rc, MPI_Fint *dt, MPI_Fint *op,
                          MPI_Fint *comm, MPI_Fint *req, MPI_Fint *ierr)
{
    GUARD();
    REQ_OUT(MPI_Ireduce_scatter(fbuf(s), fbuf(r), rc, PMPI_Type_f2c(*dt), PMPI_Op_f2c(*op),
                                PMPI_Comm_f2c(*comm), &q_));
}

#define FIGATHERLIKE(fname, cname)                                                             \
    void fname(void *s, MPI_Fint *sc, MPI_Fint *sdt, void *r, MPI_Fint *rc, MPI_Fint *rdt,     \
               MPI_Fint *comm, MPI_Fint *req, MPI_Fint *ierr)                                  \
    {                                                                                          \
        GUARD();                                                                               \
        REQ_OUT(cname(fbuf(s), *sc, PMPI_Type_f2c(*sdt), fbuf(r), *rc, PMPI_Type_f2c(*rdt),    \
                      PMPI_Comm_f2c(*comm), &q_));                                             \
    }
FIGATHERLIKE(mpi_ialltoall_, MPI_Ialltoall)
FIGATHERLIKE(mpi_iallgather_, MPI_Iallgather)
FIGATHERLIKE(mpi_ineighbor_allgather_, MPI_Ineighbor_allgather)
FIGATHERLIKE(mpi_ineighbor_alltoall_, MPI_Ineighbor_alltoall)

#define FIROOTED(fname, cname)                                                                 \
    void fname(void *s, MPI_Fint *sc, MPI_Fint *sdt, void *r, MPI_Fint *rc, MPI_Fint *rdt,     \
               MPI_Fint *root, MPI_Fint *comm, MPI_Fint *req, MPI_Fint *ierr)                  \
    {                                                                                          \
        GUARD();                                                                               \
        REQ_OUT(cname(fbuf(s), *sc, PMPI_Type_f2c(*sdt), fbuf(r), *rc, PMPI_Type_f2c(*rdt),    \
                      *root, PMPI_Comm_f2c(*comm), &q_));                                      \
    }
FIROOTED(mpi_igather_, MPI_Igather)
FIROOTED(mpi_iscatter_, MPI_Iscatter)

/* (sbuf, count, type, rbuf, counts[], displs[], type, comm): Allgatherv and Neighbor_allgatherv,
 * and their non-blocking forms. */
#define FGATHERV(fname, cname)                                                                 \
    void fname(void *s, MPI_Fint *sc, MPI_Fint *sdt, void *r, MPI_Fint *rc, MPI_Fint *rd,      \
               MPI_Fint *rdt, MPI_Fint *comm, MPI_Fint *ierr)                                  \
    {                                                                                          \
        GUARD();                                                                               \
        *ierr = cname(fbuf(s), *sc, PMPI_Type_f2c(*sdt), fbuf(r), rc, rd, PMPI_Type_f2c(*rdt), \
                      PMPI_Comm_f2c(*comm));                                                   \
    }
#define FIGATHERV(fname, cname)                                                                \
    void fname(void *s, MPI_Fint *sc, MPI_Fint *sdt, void *r, MPI_Fint *rc, MPI_Fint *rd,      \
               MPI_Fint *rdt, MPI_Fint *comm, MPI_Fint *req, MPI_Fint *ierr)                   \
    {                                                                                          \
        GUARD();                                                                               \
        REQ_OUT(cname(fbuf(s), *sc, PMPI_Type_f2c(*sdt), fbuf(r), rc, rd, PMPI_Type_f2c(*rdt), \
                      PMPI_Comm_f2c(*comm), &q_));                                             \
    }
FGATHERV(mpi_allgatherv_, MPI_Allgatherv)
FGATHERV(mpi_neighbor_allgatherv_, MPI_Neighbor_allgatherv)
FIGATHERV(mpi_iallgatherv_, MPI_Iallgatherv)
FIGATHERV(mpi_ineighbor_allgatherv_, MPI_Ineighbor_allgatherv)

/* (sbuf, counts[], displs[], type, rbuf, counts[], displs[], type, comm): Alltoallv and
 * Neighbor_alltoallv, and their non-blocking forms. */
/* MPI_Fint is int with gfortran's default integer: the count arrays pass through. */
#define FALLTOALLV(fname, cname)                                                               \
    void fname(void *s, MPI_Fint *sc, MPI_Fint *sd, MPI_Fint *sdt, void *r, MPI_Fint *rc,      \
               MPI_Fint *rd, MPI_Fint *rdt, MPI_Fint *comm, MPI_Fint *ierr)                    \
    {                                                                                          \
        GUARD();                                                                               \
        *ierr = cname(fbuf(s), sc, sd, PMPI_Type_f2c(*sdt), fbuf(r), rc, rd,                   \
                      PMPI_Type_f2c(*rdt), PMPI_Comm_f2c(*comm));                              \
    }
#define FIALLTOALLV(fname, cname)                                                              \
    void fname(void *s, MPI_Fint *sc, MPI_Fint *sd, MPI_Fint *sdt, void *r, MPI_Fint *rc,      \
               MPI_Fint *rd, MPI_Fint *rdt, MPI_Fint *comm, MPI_Fint *req, MPI_Fint *ierr)     \
    {                                                                                          \
        GUARD();                                                                               \
        REQ_OUT(cname(fbuf(s), sc, sd, PMPI_Type_f2c(*sdt), fbuf(r), rc, rd,                   \
                      PMPI_Type_f2c(*rdt), PMPI_Comm_f2c(*comm), &q_));                        \
    }
FALLTOALLV(mpi_alltoallv_, MPI_Alltoallv)
FALLTOALLV(mpi_neighbor_alltoallv_, MPI_Neighbor_alltoallv)
FIALLTOALLV(mpi_ialltoallv_, MPI_Ialltoallv)
FIALLTOALLV(mpi_ineighbor_alltoallv_, MPI_Ineighbor_alltoallv)

void mpi_igatherv_(void *s, MPI_Fint *sc, MPI_Fint *sdt, void *r, MPI_Fint *rc, MPI_Fint *rd,
                   MPI_Fint *rdt, MPI_Fint *root, MPI_Fint *comm, MPI_Fint *req, MPI_Fint *ierr)
{
    GUARD();
    REQ_OUT(MPI_Igatherv(fbuf(s), *sc, PMPI_Type_f2c(*sdt), fbuf(r), rc, rd,
                         PMPI_Type_f2c(*rdt), *root, PMPI_Comm_f2c(*comm), &q_));
}

void mpi_iscatterv_(void *s, MPI_Fint *sc, MPI_Fint *sd, MPI_Fint *sdt, void *r, MPI_Fint *rc,
                    MPI_Fint *rdt, MPI_Fint *root, MPI_Fint *comm, MPI_Fint *req,
                    MPI_Fint *ierr)
{
    GUARD();
    REQ_OUT(MPI_Iscatterv(fbuf(s), sc, sd, PMPI_Type_f2c(*sdt), fbuf(r), *rc,
                          PMPI_Type_f2c(*rdt), *root, PMPI_Comm_f2c(*comm), &q_));
}

/* The w variants: per-peer datatypes converted (types_in); the neighborhood ones take byte
 * displacements as INTEGER(KIND=MPI_ADDRESS_KIND), which are MPI_Aint. The non-blocking ones
 * hold the converted types until their request completes. */
void mpi_alltoallw_(void *s, MPI_Fint *sc, MPI_Fint *sd, MPI_Fint *st, void *r, MPI_Fint *rc,
                    MPI_Fint *rd, MPI_Fint *rt, MPI_Fint *comm, MPI_Fint *ierr)
{
    GUARD();
    MPI_Comm c = PMPI_Comm_f2c(*comm);
    void *sb = fbuf(s);
    int ns, nr;
    peers(c, 0, &ns, &nr);
    MPI_Datatype *t = types_in(sb == MPI_IN_PLACE ? NULL : st, ns, rt, nr);
    int skip = sb == MPI_IN_PLACE ? 0 : ns;
    *ierr = MPI_Alltoallw(sb, sc, sd, t, fbuf(r), rc, rd, t + skip, c);
    free(t);
}

void mpi_ialltoallw_(void *s, MPI_Fint *sc, MPI_Fint *sd, MPI_Fint *st, void *r, MPI_Fint *rc,
                     MPI_Fint *rd, MPI_Fint *rt, MPI_Fint *comm, MPI_Fint *req, MPI_Fint *ierr)
{
    GUARD();
    MPI_Comm c = PMPI_Comm_f2c(*comm);
    void *sb = fbuf(s);
    int ns, nr;
    peers(c, 0, &ns, &nr);
    MPI_Datatype *t = types_in(sb == MPI_IN_PLACE ? NULL : st, ns, rt, nr);
    int skip = sb == MPI_IN_PLACE ? 0 : ns;
    held *h = held_new(t);
    MPI_Request q;
    *ierr = MPI_Ialltoallw(sb, sc, sd, t, fbuf(r), rc, rd, t + skip, c, &q);
    held_keep(h, *ierr, q, req);
}

void mpi_neighbor_alltoallw_(void *s, MPI_Fint *sc, MPI_Aint *sd, MPI_Fint *st, void *r,
                             MPI_Fint *rc, MPI_Aint *rd, MPI_Fint *rt, MPI_Fint *comm,
                             MPI_Fint *ierr)
{
    GUARD();
    MPI_Comm c = PMPI_Comm_f2c(*comm);
    int ns, nr;
    peers(c, 1, &ns, &nr);
    MPI_Datatype *t = types_in(st, ns, rt, nr);
    *ierr = MPI_Neighbor_alltoallw(fbuf(s), sc, sd, t, fbuf(r), rc, rd, t + ns, c);
    free(t);
}

void mpi_ineighbor_alltoallw_(void *s, MPI_Fint *sc, MPI_Aint *sd, MPI_Fint *st, void *r,
                              MPI_Fint *rc, MPI_Aint *rd, MPI_Fint *rt, MPI_Fint *comm,
                              MPI_Fint *req, MPI_Fint *ierr)
{
    GUARD();
    MPI_Comm c = PMPI_Comm_f2c(*comm);
    int ns, nr;
    peers(c, 1, &ns, &nr);
    MPI_Datatype *t = types_in(st, ns, rt, nr);
    held *h = held_new(t);
    MPI_Request q;
    *ierr = MPI_Ineighbor_alltoallw(fbuf(s), sc, sd, t, fbuf(r), rc, rd, t + ns, c, &q);
    held_keep(h, *ierr, q, req);
}

void mpi_request_get_status_(MPI_Fint *req, MPI_Fint *flag, MPI_Fint *status, MPI_Fint *ierr)
{
    GUARD();
    MPI_Status c;
    int f = 0;
    *ierr = MPI_Request_get_status(PMPI_Request_f2c(*req), &f, FSTATUS(status, &c));
    *flag = f;
    if (*ierr == MPI_SUCCESS && f) {
        if (helds != NULL)
            held_release(*req); /* complete: its communicator is usable now */
        status_out(&c, status);
    }
}

/* ---- communicator creation ---------------------------------------------------------------- */

void mpi_comm_dup_with_info_(MPI_Fint *comm, MPI_Fint *info, MPI_Fint *newcomm, MPI_Fint *ierr)
{
    GUARD();
    MPI_Comm c;
    *ierr = MPI_Comm_dup_with_info(PMPI_Comm_f2c(*comm), PMPI_Info_f2c(*info), &c);
    comm_out(*ierr, c, newcomm);
}

/* The new communicator exists once the layer starts the real MPI_Comm_idup (when every
 * member has called it): its Fortran handle is written when the request completes. */
void mpi_comm_idup_(MPI_Fint *comm, MPI_Fint *newcomm, MPI_Fint *req, MPI_Fint *ierr)
{
    GUARD();
    held *h = held_new(NULL);
    h->newcomm = newcomm;
    MPI_Request q;
    *ierr = MPI_Comm_idup(PMPI_Comm_f2c(*comm), &h->comm, &q);
    held_keep(h, *ierr, q, req);
}

void mpi_comm_split_type_(MPI_Fint *comm, MPI_Fint *type, MPI_Fint *key, MPI_Fint *info,
                          MPI_Fint *newcomm, MPI_Fint *ierr)
{
    GUARD();
    MPI_Comm c;
    *ierr = MPI_Comm_split_type(PMPI_Comm_f2c(*comm), *type, *key, PMPI_Info_f2c(*info), &c);
    comm_out(*ierr, c, newcomm);
}

void mpi_comm_create_group_(MPI_Fint *comm, MPI_Fint *group, MPI_Fint *tag, MPI_Fint *newcomm,
                            MPI_Fint *ierr)
{
    GUARD();
    MPI_Comm c;
    *ierr = MPI_Comm_create_group(PMPI_Comm_f2c(*comm), PMPI_Group_f2c(*group), *tag, &c);
    comm_out(*ierr, c, newcomm);
}

void mpi_cart_sub_(MPI_Fint *comm, MPI_Fint *remain, MPI_Fint *newcomm, MPI_Fint *ierr)
{
    GUARD();
    MPI_Comm parent = PMPI_Comm_f2c(*comm), c;
    int ndims = 0, topo = MPI_UNDEFINED;
    if (parent != MPI_COMM_NULL)
        PMPI_Topo_test(parent, &topo);
    if (topo == MPI_CART)
        PMPI_Cartdim_get(parent, &ndims);
    int *keep = logicals(remain, ndims); /* not a cartesian communicator: MPI reports it */
    *ierr = MPI_Cart_sub(parent, keep, &c);
    comm_out(*ierr, c, newcomm);
    free(keep);
}

void mpi_graph_create_(MPI_Fint *comm, MPI_Fint *nnodes, MPI_Fint *index, MPI_Fint *edges,
                       MPI_Fint *reorder, MPI_Fint *newcomm, MPI_Fint *ierr)
{
    GUARD();
    MPI_Comm c;
    *ierr = MPI_Graph_create(PMPI_Comm_f2c(*comm), *nnodes, index, edges, *reorder != 0, &c);
    comm_out(*ierr, c, newcomm);
}

void mpi_dist_graph_create_adjacent_(MPI_Fint *comm, MPI_Fint *indeg, MPI_Fint *srcs,
                                     MPI_Fint *sw, MPI_Fint *outdeg, MPI_Fint *dsts,
                                     MPI_Fint *dw, MPI_Fint *info, MPI_Fint *reorder,
                                     MPI_Fint *newcomm, MPI_Fint *ierr)
{
    GUARD();
    MPI_Comm c;
    *ierr = MPI_Dist_graph_create_adjacent(PMPI_Comm_f2c(*comm), *indeg, srcs, fweights(sw),
                                           *outdeg, dsts, fweights(dw), PMPI_Info_f2c(*info),
                                           *reorder != 0, &c);
    comm_out(*ierr, c, newcomm);
}

void mpi_dist_graph_create_(MPI_Fint *comm, MPI_Fint *n, MPI_Fint *srcs, MPI_Fint *degrees,
                            MPI_Fint *dsts, MPI_Fint *weights, MPI_Fint *info,
                            MPI_Fint *reorder, MPI_Fint *newcomm, MPI_Fint *ierr)
{
    GUARD();
    MPI_Comm c;
    *ierr = MPI_Dist_graph_create(PMPI_Comm_f2c(*comm), *n, srcs, degrees, dsts,
                                  fweights(weights), PMPI_Info_f2c(*info), *reorder != 0, &c);
    comm_out(*ierr, c, newcomm);
}

void mpi_intercomm_create_(MPI_Fint *local, MPI_Fint *lleader, MPI_Fint *peer,
                           MPI_Fint *rleader, MPI_Fint *tag, MPI_Fint *newcomm, MPI_Fint *ierr)
{
    GUARD();
    MPI_Comm c;
    *ierr = MPI_Intercomm_create(PMPI_Comm_f2c(*local), *lleader, PMPI_Comm_f2c(*peer),
                                 *rleader, *tag, &c);
    comm_out(*ierr, c, newcomm);
}

void mpi_intercomm_merge_(MPI_Fint *comm, MPI_Fint *high, MPI_Fint *newcomm, MPI_Fint *ierr)
{
    GUARD();
    MPI_Comm c;
    *ierr = MPI_Intercomm_merge(PMPI_Comm_f2c(*comm), *high != 0, &c);
    comm_out(*ierr, c, newcomm);
}

#endif /* SYMVIRT_MPI_IMPL_OPENMPI */
