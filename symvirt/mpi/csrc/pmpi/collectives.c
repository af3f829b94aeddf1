/* ---- collectives: aligned first on their communicator ------------------------------------
 * Blocking ones are aligned, then run (svp_align). Non-blocking ones: started once every
 * member has called them (see deferred.c), then watched: a cut waits until they complete.
 * Neighborhood collectives (on cartesian and graph communicators) are aligned among all the
 * communicator's members like any collective.
 *
 * Every collective but the barrier comes in a blocking and a non-blocking form with the same
 * parameters (the latter adds the request), and in MPI 4 in persistent (_init) and
 * large-count (_c) forms too, so all wrappers and run functions are generated from one table,
 * COLLECTIVES: each row names the call, its non-blocking form, and its shape. A shape is the
 * parameters before the communicator, named as mpi.h names them and as the record (coll)
 * names its fields, written three ways: as parameters (P_), read back from the record (C_),
 * and as the record's initializer (I_); each takes the kind of counts, I (int, with int
 * displacements) or L (large: MPI_Count counts, MPI_Aint displacements, in the record's _c
 * and _aint fields). A shape is named after the first call in the table that has it. */
#include "pmpi_internal.h"

#define COUNT_I int
#define COUNT_L MPI_Count
#define DISPL_I int
#define DISPL_L MPI_Aint
/* The record's field for a count (F_) or a displacement (D_) of each kind. */
#define F_I(field) field
#define F_L(field) field##_c
#define D_I(field) field
#define D_L(field) field##_aint

#define P_BCAST(K) void *buffer, COUNT_##K count, MPI_Datatype datatype, int root
#define C_BCAST(K) c->buffer, c->F_##K(count), c->datatype, c->root
#define I_BCAST(K) .buffer = buffer, .F_##K(count) = count, .datatype = datatype, .root = root

#define P_REDUCE(K)                                                                            \
    const void *sendbuf, void *recvbuf, COUNT_##K count, MPI_Datatype datatype, MPI_Op op
#define C_REDUCE(K) c->sendbuf, c->recvbuf, c->F_##K(count), c->datatype, c->op
#define I_REDUCE(K)                                                                            \
    .sendbuf = sendbuf, .recvbuf = recvbuf, .F_##K(count) = count, .datatype = datatype,       \
    .op = op

#define P_REDUCE_ROOT(K) P_REDUCE(K), int root
#define C_REDUCE_ROOT(K) C_REDUCE(K), c->root
#define I_REDUCE_ROOT(K) I_REDUCE(K), .root = root

#define P_REDUCE_SCATTER_BLOCK(K)                                                              \
    const void *sendbuf, void *recvbuf, COUNT_##K recvcount, MPI_Datatype datatype, MPI_Op op
#define C_REDUCE_SCATTER_BLOCK(K) c->sendbuf, c->recvbuf, c->F_##K(recvcount), c->datatype, c->op
#define I_REDUCE_SCATTER_BLOCK(K)                                                              \
    .sendbuf = sendbuf, .recvbuf = recvbuf, .F_##K(recvcount) = recvcount,                     \
    .datatype = datatype, .op = op

#define P_REDUCE_SCATTER(K)                                                                    \
    const void *sendbuf, void *recvbuf, const COUNT_##K recvcounts[], MPI_Datatype datatype,   \
        MPI_Op op
#define C_REDUCE_SCATTER(K) c->sendbuf, c->recvbuf, c->F_##K(recvcounts), c->datatype, c->op
#define I_REDUCE_SCATTER(K)                                                                    \
    .sendbuf = sendbuf, .recvbuf = recvbuf, .F_##K(recvcounts) = recvcounts,                   \
    .datatype = datatype, .op = op

#define P_ALLGATHER(K)                                                                         \
    const void *sendbuf, COUNT_##K sendcount, MPI_Datatype sendtype, void *recvbuf,            \
        COUNT_##K recvcount, MPI_Datatype recvtype
#define C_ALLGATHER(K)                                                                         \
    c->sendbuf, c->F_##K(sendcount), c->sendtype, c->recvbuf, c->F_##K(recvcount), c->recvtype
#define I_ALLGATHER(K)                                                                         \
    .sendbuf = sendbuf, .F_##K(sendcount) = sendcount, .sendtype = sendtype,                   \
    .recvbuf = recvbuf, .F_##K(recvcount) = recvcount, .recvtype = recvtype

#define P_GATHER(K) P_ALLGATHER(K), int root
#define C_GATHER(K) C_ALLGATHER(K), c->root
#define I_GATHER(K) I_ALLGATHER(K), .root = root

#define P_ALLGATHERV(K)                                                                        \
    const void *sendbuf, COUNT_##K sendcount, MPI_Datatype sendtype, void *recvbuf,            \
        const COUNT_##K recvcounts[], const DISPL_##K displs[], MPI_Datatype recvtype
#define C_ALLGATHERV(K)                                                                        \
    c->sendbuf, c->F_##K(sendcount), c->sendtype, c->recvbuf, c->F_##K(recvcounts),            \
        c->D_##K(displs), c->recvtype
#define I_ALLGATHERV(K)                                                                        \
    .sendbuf = sendbuf, .F_##K(sendcount) = sendcount, .sendtype = sendtype,                   \
    .recvbuf = recvbuf, .F_##K(recvcounts) = recvcounts, .D_##K(displs) = displs,              \
    .recvtype = recvtype

#define P_GATHERV(K) P_ALLGATHERV(K), int root
#define C_GATHERV(K) C_ALLGATHERV(K), c->root
#define I_GATHERV(K) I_ALLGATHERV(K), .root = root

#define P_SCATTERV(K)                                                                          \
    const void *sendbuf, const COUNT_##K sendcounts[], const DISPL_##K displs[],               \
        MPI_Datatype sendtype, void *recvbuf, COUNT_##K recvcount, MPI_Datatype recvtype,      \
        int root
#define C_SCATTERV(K)                                                                          \
    c->sendbuf, c->F_##K(sendcounts), c->D_##K(displs), c->sendtype, c->recvbuf,               \
        c->F_##K(recvcount), c->recvtype, c->root
#define I_SCATTERV(K)                                                                          \
    .sendbuf = sendbuf, .F_##K(sendcounts) = sendcounts, .D_##K(displs) = displs,              \
    .sendtype = sendtype, .recvbuf = recvbuf, .F_##K(recvcount) = recvcount,                   \
    .recvtype = recvtype, .root = root

#define P_ALLTOALLV(K)                                                                         \
    const void *sendbuf, const COUNT_##K sendcounts[], const DISPL_##K sdispls[],              \
        MPI_Datatype sendtype, void *recvbuf, const COUNT_##K recvcounts[],                    \
        const DISPL_##K rdispls[], MPI_Datatype recvtype
#define C_ALLTOALLV(K)                                                                         \
    c->sendbuf, c->F_##K(sendcounts), c->D_##K(sdispls), c->sendtype, c->recvbuf,              \
        c->F_##K(recvcounts), c->D_##K(rdispls), c->recvtype
#define I_ALLTOALLV(K)                                                                         \
    .sendbuf = sendbuf, .F_##K(sendcounts) = sendcounts, .D_##K(sdispls) = sdispls,            \
    .sendtype = sendtype, .recvbuf = recvbuf, .F_##K(recvcounts) = recvcounts,                 \
    .D_##K(rdispls) = rdispls, .recvtype = recvtype

/* The w variants: displacements of the displacement kind (Alltoallw), or always in MPI_Aint
 * (Neighbor_alltoallw; NW_ names the record's fields). */
#define P_W(K, DISPL)                                                                          \
    const void *sendbuf, const COUNT_##K sendcounts[], const DISPL sdispls[],                  \
        const MPI_Datatype sendtypes[], void *recvbuf, const COUNT_##K recvcounts[],           \
        const DISPL rdispls[], const MPI_Datatype recvtypes[]
#define C_W(K, D)                                                                              \
    c->sendbuf, c->F_##K(sendcounts), c->D(sdispls), c->sendtypes, c->recvbuf,                 \
        c->F_##K(recvcounts), c->D(rdispls), c->recvtypes
#define I_W(K, D)                                                                              \
    .sendbuf = sendbuf, .F_##K(sendcounts) = sendcounts, .D(sdispls) = sdispls,                \
    .sendtypes = sendtypes, .recvbuf = recvbuf, .F_##K(recvcounts) = recvcounts,               \
    .D(rdispls) = rdispls, .recvtypes = recvtypes

#define P_ALLTOALLW(K) P_W(K, DISPL_##K)
#define C_ALLTOALLW(K) C_W(K, D_##K)
#define I_ALLTOALLW(K) I_W(K, D_##K)

#define P_NEIGHBOR_ALLTOALLW(K) P_W(K, MPI_Aint)
#define C_NEIGHBOR_ALLTOALLW(K) C_W(K, D_L)
#define I_NEIGHBOR_ALLTOALLW(K) I_W(K, D_L)


/* MPI name, its non-blocking form's, shape. */
#define COLLECTIVES(X)                                                                         \
    X(Bcast, Ibcast, BCAST)                                                                    \
    X(Reduce, Ireduce, REDUCE_ROOT)                                                            \
    X(Allreduce, Iallreduce, REDUCE)                                                           \
    X(Scan, Iscan, REDUCE)                                                                     \
    X(Exscan, Iexscan, REDUCE)                                                                 \
    X(Reduce_scatter_block, Ireduce_scatter_block, REDUCE_SCATTER_BLOCK)                       \
    X(Reduce_scatter, Ireduce_scatter, REDUCE_SCATTER)                                         \
    X(Allgather, Iallgather, ALLGATHER)                                                        \
    X(Alltoall, Ialltoall, ALLGATHER)                                                          \
    X(Gather, Igather, GATHER)                                                                 \
    X(Scatter, Iscatter, GATHER)                                                               \
    X(Allgatherv, Iallgatherv, ALLGATHERV)                                                     \
    X(Gatherv, Igatherv, GATHERV)                                                              \
    X(Scatterv, Iscatterv, SCATTERV)                                                           \
    X(Alltoallv, Ialltoallv, ALLTOALLV)                                                        \
    X(Alltoallw, Ialltoallw, ALLTOALLW)                                                        \
    X(Neighbor_allgather, Ineighbor_allgather, ALLGATHER)                                      \
    X(Neighbor_alltoall, Ineighbor_alltoall, ALLGATHER)                                        \
    X(Neighbor_allgatherv, Ineighbor_allgatherv, ALLGATHERV)                                   \
    X(Neighbor_alltoallv, Ineighbor_alltoallv, ALLTOALLV)                                      \
    X(Neighbor_alltoallw, Ineighbor_alltoallw, NEIGHBOR_ALLTOALLW)

/* MPI_<name> and MPI_<iname>, with their run functions. */
#define WRAPPERS(name, iname, shape)                                                           \
    RUN(run_##name, PMPI_##name(C_##shape(I), c->comm))                                        \
    RUN(run_##iname, PMPI_##iname(C_##shape(I), c->comm, c->req))                              \
    int MPI_##name(P_##shape(I), MPI_Comm comm)                                                \
    {                                                                                          \
        GUARD();                                                                               \
        COLLECTIVE(comm, run_##name, I_##shape(I));                                            \
    }                                                                                          \
    int MPI_##iname(P_##shape(I), MPI_Comm comm, MPI_Request *req)                             \
    {                                                                                          \
        GUARD();                                                                               \
        NONBLOCKING(comm, req, run_##iname, I_##shape(I));                                    \
    }

COLLECTIVES(WRAPPERS)

RUN(run_barrier, PMPI_Barrier(c->comm))
RUN(run_ibarrier, PMPI_Ibarrier(c->comm, c->req))

int MPI_Barrier(MPI_Comm comm)
{
    GUARD();
    COLLECTIVE(comm, run_barrier);
}

int MPI_Ibarrier(MPI_Comm comm, MPI_Request *req)
{
    GUARD();
    NONBLOCKING(comm, req, run_ibarrier);
}

#if MPI_VERSION >= 4
/* MPI 4 (MPICH 4; Open MPI 4.1 has none of these). The large-count forms (_c) are wrapped like
 * the int ones. Persistent collectives (_init, _init_c): the initialization is collective, so
 * aligned like a blocking collective (the request it makes is inactive: nothing for a cut to
 * wait for, even when a rank makes it inside one); each MPI_Start of it is deferred until
 * every member has started it (deferred.c). On an intercommunicator, or one the layer does
 * not track, the collective is observed, not covered: while the rank holds the request, a cut
 * is answered "unable" with the call's name (see persistent.c). */
#define PERSISTENT_WRAPPER(name, suffix, K, shape)                                             \
    RUN(run_##name##suffix, PMPI_##name##suffix(C_##shape(K), c->comm, c->info, c->req))       \
    int MPI_##name##suffix(P_##shape(K), MPI_Comm comm, MPI_Info info, MPI_Request *req)       \
    {                                                                                          \
        GUARD();                                                                               \
        coll c = {.run = run_##name##suffix, .comm = comm, .info = info, .req = req,           \
                  I_##shape(K)};                                                               \
        return svp_persistent_collective(&c, "MPI_" #name #suffix);                           \
    }

#define MPI4_WRAPPERS(name, iname, shape)                                                      \
    RUN(run_##name##_c, PMPI_##name##_c(C_##shape(L), c->comm))                                \
    RUN(run_##iname##_c, PMPI_##iname##_c(C_##shape(L), c->comm, c->req))                      \
    int MPI_##name##_c(P_##shape(L), MPI_Comm comm)                                            \
    {                                                                                          \
        GUARD();                                                                               \
        COLLECTIVE(comm, run_##name##_c, I_##shape(L));                                        \
    }                                                                                          \
    int MPI_##iname##_c(P_##shape(L), MPI_Comm comm, MPI_Request *req)                         \
    {                                                                                          \
        GUARD();                                                                               \
        NONBLOCKING(comm, req, run_##iname##_c, I_##shape(L));                                 \
    }                                                                                          \
    PERSISTENT_WRAPPER(name, _init, I, shape)                                                  \
    PERSISTENT_WRAPPER(name, _init_c, L, shape)

COLLECTIVES(MPI4_WRAPPERS)

RUN(run_barrier_init, PMPI_Barrier_init(c->comm, c->info, c->req))

int MPI_Barrier_init(MPI_Comm comm, MPI_Info info, MPI_Request *req)
{
    GUARD();
    coll c = {.run = run_barrier_init, .comm = comm, .info = info, .req = req};
    return svp_persistent_collective(&c, "MPI_Barrier_init");
}
#endif
