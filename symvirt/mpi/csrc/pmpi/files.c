/* ---- MPI-IO: open files observed, collective calls aligned --------------------------------
 * A blocking MPI-IO call does its communication among the file's group inside the call, on
 * MPI's own communicators: nothing of it is in flight once it returns. The collective ones
 * (opening, closing, the _all and _ordered reads and writes, set_view, sync, ...) are aligned
 * on the file's communicator like other collectives, so a rank never waits in one for a peer
 * that is in a cut. The independent ones are not wrapped: while a file is open the
 * application's thread may be inside one, where the progress thread must not call MPI (the
 * thread level is MPI_THREAD_SERIALIZED), so the progress thread makes no cut and the
 * application's thread makes it at its next wrapped call (see svp_unwrapped_calls_possible).
 * Not covered: non-blocking MPI-IO (MPI_File_iwrite_all, split collectives) outstanding at a
 * cut, and the shared file pointer's independent calls (MPI_File_write_shared), which
 * ROMIO serialises with a lock file the cut does not see. */
#include "pmpi_internal.h"

/* Where fh is in the list, -1 if the layer did not see it opened. */
static int file_index(MPI_File fh)
{
    for (int i = 0; i < svp.files.n; i++)
        if (svp.files.v[i].fh == fh)
            return i;
    return -1;
}

RUN(run_file_open, PMPI_File_open(c->comm, c->filename, c->amode, c->info, c->fh))
RUN(run_file_close, PMPI_File_close(c->fh))

int MPI_File_open(MPI_Comm comm, const char *filename, int amode, MPI_Info info, MPI_File *fh)
{
    GUARD();
    coll c = {.run = run_file_open, .comm = comm, .filename = filename, .amode = amode,
              .info = info, .fh = fh, .cid = svp_cid(comm)};
    int rc = svp_align(c.cid, &c);
    if (rc == MPI_SUCCESS && *fh != MPI_FILE_NULL && svp.ready && !svp.closed) {
        GROW(svp.files);
        svp.files.v[svp.files.n++] = (open_file){*fh, c.cid, comm};
    }
    return rc;
}

int MPI_File_close(MPI_File *fh)
{
    GUARD();
    MPI_File closed = *fh;
    int i = file_index(closed);
    if (i < 0)
        return PMPI_File_close(fh);
    const open_file *f = &svp.files.v[i];
    coll c = {.run = run_file_close, .fh = fh, .cid = svp_slot_holding(f->cid, f->comm)};
    int rc = svp_align(c.cid, &c); /* a cut meanwhile still sees the file open */
    i = file_index(closed);
    if (rc == MPI_SUCCESS && i >= 0)
        svp.files.v[i] = svp.files.v[--svp.files.n];
    return rc;
}

/* The slot a known file's collectives align on (-1: not aligned). */
static int file_slot(MPI_File fh)
{
    int i = file_index(fh);
    return i < 0 ? -1 : svp_slot_holding(svp.files.v[i].cid, svp.files.v[i].comm);
}

/* Collective calls on an open file, generated from one table as in collectives.c: a shape is
 * the parameters after the file handle, as parameters (P_), read back from the record (C_),
 * and as the record's initializer (I_). */
#define P_WRITE const void *buf, int count, MPI_Datatype datatype, MPI_Status *status
#define P_READ void *buf, int count, MPI_Datatype datatype, MPI_Status *status
#define C_WRITE c->buffer, c->count, c->datatype, c->status
#define C_READ C_WRITE
#define I_WRITE .buffer = (void *)buf, .count = count, .datatype = datatype, .status = status
#define I_READ I_WRITE
#define P_WRITE_AT MPI_Offset offset, P_WRITE
#define P_READ_AT MPI_Offset offset, P_READ
#define C_WRITE_AT c->offset, C_WRITE
#define C_READ_AT C_WRITE_AT
#define I_WRITE_AT .offset = offset, I_WRITE
#define I_READ_AT I_WRITE_AT
#define P_VIEW                                                                                 \
    MPI_Offset disp, MPI_Datatype etype, MPI_Datatype filetype, const char *datarep,           \
        MPI_Info info
#define C_VIEW c->offset, c->datatype, c->filetype, c->datarep, c->info
#define I_VIEW                                                                                 \
    .offset = disp, .datatype = etype, .filetype = filetype, .datarep = datarep, .info = info
#define P_SIZE MPI_Offset size
#define C_SIZE c->offset
#define I_SIZE .offset = size
#define P_FLAG int flag
#define C_FLAG c->flag
#define I_FLAG .flag = flag
#define P_INFO MPI_Info info
#define C_INFO c->info
#define I_INFO .info = info
#define P_SEEK MPI_Offset offset, int whence
#define C_SEEK c->offset, c->flag
#define I_SEEK .offset = offset, .flag = whence

/* MPI name (after MPI_File_), shape. */
#define FILE_COLLECTIVES(X)                                                                    \
    X(write_all, WRITE)                                                                        \
    X(read_all, READ)                                                                          \
    X(write_at_all, WRITE_AT)                                                                  \
    X(read_at_all, READ_AT)                                                                    \
    X(write_ordered, WRITE)                                                                    \
    X(read_ordered, READ)                                                                      \
    X(set_view, VIEW)                                                                          \
    X(set_size, SIZE)                                                                          \
    X(preallocate, SIZE)                                                                       \
    X(set_atomicity, FLAG)                                                                     \
    X(set_info, INFO)                                                                          \
    X(seek_shared, SEEK)

#define FILE_WRAPPER(name, shape)                                                              \
    RUN(run_file_##name, PMPI_File_##name(c->file, C_##shape))                                 \
    int MPI_File_##name(MPI_File fh, P_##shape)                                                \
    {                                                                                          \
        GUARD();                                                                               \
        coll c = {.run = run_file_##name, .file = fh, .cid = file_slot(fh), I_##shape};        \
        return svp_align(c.cid, &c);                                                           \
    }

FILE_COLLECTIVES(FILE_WRAPPER)

#if MPI_VERSION >= 4
/* MPI 4's large-count forms of the data calls (MPICH 4), aligned alike. */
#define P_WRITE_C const void *buf, MPI_Count count, MPI_Datatype datatype, MPI_Status *status
#define P_READ_C void *buf, MPI_Count count, MPI_Datatype datatype, MPI_Status *status
#define C_WRITE_C c->buffer, c->count_c, c->datatype, c->status
#define C_READ_C C_WRITE_C
#define I_WRITE_C .buffer = (void *)buf, .count_c = count, .datatype = datatype, .status = status
#define I_READ_C I_WRITE_C
#define P_WRITE_AT_C MPI_Offset offset, P_WRITE_C
#define P_READ_AT_C MPI_Offset offset, P_READ_C
#define C_WRITE_AT_C c->offset, C_WRITE_C
#define C_READ_AT_C C_WRITE_AT_C
#define I_WRITE_AT_C .offset = offset, I_WRITE_C
#define I_READ_AT_C I_WRITE_AT_C

#define FILE_COLLECTIVES_C(X)                                                                  \
    X(write_all_c, WRITE_C)                                                                    \
    X(read_all_c, READ_C)                                                                      \
    X(write_at_all_c, WRITE_AT_C)                                                              \
    X(read_at_all_c, READ_AT_C)                                                                \
    X(write_ordered_c, WRITE_C)                                                                \
    X(read_ordered_c, READ_C)

FILE_COLLECTIVES_C(FILE_WRAPPER)
#endif

RUN(run_file_sync, PMPI_File_sync(c->file))

int MPI_File_sync(MPI_File fh)
{
    GUARD();
    coll c = {.run = run_file_sync, .file = fh, .cid = file_slot(fh)};
    return svp_align(c.cid, &c);
}
