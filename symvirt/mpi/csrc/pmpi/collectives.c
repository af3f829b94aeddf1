/* ---- collectives: aligned first on their communicator ------------------------------------
 * Blocking ones are aligned, then run (svp_align). Non-blocking ones: started once every
 * member has called them (see deferred.c), then watched: a cut waits until they complete.
 * Neighborhood collectives (on cartesian and graph communicators) are aligned among all the
 * communicator's members like any collective.
 *
 * Every collective but the barrier comes in a blocking and a non-blocking form with the same
 * parameters (the latter adds the request), so both wrappers and both run functions are
 * generated from one table, COLLECTIVES: each row names the call, its non-blocking form, and
 * its shape. A shape is the parameters before the communicator, named as mpi.h names them and
 * as the record (coll) names its fields, written three ways: as parameters (P_), read back from
 * the record (C_), and as the record's initializer (I_). It is named after the first call in
 * the table that has those parameters. */
#include "pmpi_internal.h"

#define P_BCAST void *buffer, int count, MPI_Datatype datatype, int root
#define C_BCAST c->buffer, c->count, c->datatype, c->root
#define I_BCAST .buffer = buffer, .count = count, .datatype = datatype, .root = root

#define P_REDUCE const void *sendbuf, void *recvbuf, int count, MPI_Datatype datatype, MPI_Op op
#define C_REDUCE c->sendbuf, c->recvbuf, c->count, c->datatype, c->op
#define I_REDUCE                                                                               \
    .sendbuf = sendbuf, .recvbuf = recvbuf, .count = count, .datatype = datatype, .op = op

#define P_REDUCE_ROOT P_REDUCE, int root
#define C_REDUCE_ROOT C_REDUCE, c->root
#define I_REDUCE_ROOT I_REDUCE, .root = root

#define P_REDUCE_SCATTER_BLOCK                                                                 \
    const void *sendbuf, void *recvbuf, int recvcount, MPI_Datatype datatype, MPI_Op op
#define C_REDUCE_SCATTER_BLOCK c->sendbuf, c->recvbuf, c->recvcount, c->datatype, c->op
#define I_REDUCE_SCATTER_BLOCK                                                                 \
    .sendbuf = sendbuf, .recvbuf = recvbuf, .recvcount = recvcount, .datatype = datatype,      \
    .op = op

#define P_REDUCE_SCATTER                                                                       \
    const void *sendbuf, void *recvbuf, const int recvcounts[], MPI_Datatype datatype, MPI_Op op
#define C_REDUCE_SCATTER c->sendbuf, c->recvbuf, c->recvcounts, c->datatype, c->op
#define I_REDUCE_SCATTER                                                                       \
    .sendbuf = sendbuf, .recvbuf = recvbuf, .recvcounts = recvcounts, .datatype = datatype,    \
    .op = op

#define P_ALLGATHER                                                                            \
    const void *sendbuf, int sendcount, MPI_Datatype sendtype, void *recvbuf, int recvcount,   \
        MPI_Datatype recvtype
#define C_ALLGATHER c->sendbuf, c->sendcount, c->sendtype, c->recvbuf, c->recvcount, c->recvtype
#define I_ALLGATHER                                                                            \
    .sendbuf = sendbuf, .sendcount = sendcount, .sendtype = sendtype, .recvbuf = recvbuf,      \
    .recvcount = recvcount, .recvtype = recvtype

#define P_GATHER P_ALLGATHER, int root
#define C_GATHER C_ALLGATHER, c->root
#define I_GATHER I_ALLGATHER, .root = root

#define P_ALLGATHERV                                                                           \
    const void *sendbuf, int sendcount, MPI_Datatype sendtype, void *recvbuf,                  \
        const int recvcounts[], const int displs[], MPI_Datatype recvtype
#define C_ALLGATHERV                                                                           \
    c->sendbuf, c->sendcount, c->sendtype, c->recvbuf, c->recvcounts, c->displs, c->recvtype
#define I_ALLGATHERV                                                                           \
    .sendbuf = sendbuf, .sendcount = sendcount, .sendtype = sendtype, .recvbuf = recvbuf,      \
    .recvcounts = recvcounts, .displs = displs, .recvtype = recvtype

#define P_GATHERV P_ALLGATHERV, int root
#define C_GATHERV C_ALLGATHERV, c->root
#define I_GATHERV I_ALLGATHERV, .root = root

#define P_SCATTERV                                                                             \
    const void *sendbuf, const int sendcounts[], const int displs[], MPI_Datatype sendtype,    \
        void *recvbuf, int recvcount, MPI_Datatype recvtype, int root
#define C_SCATTERV                                                                             \
    c->sendbuf, c->sendcounts, c->displs, c->sendtype, c->recvbuf, c->recvcount, c->recvtype,  \
        c->root
#define I_SCATTERV                                                                             \
    .sendbuf = sendbuf, .sendcounts = sendcounts, .displs = displs, .sendtype = sendtype,      \
    .recvbuf = recvbuf, .recvcount = recvcount, .recvtype = recvtype, .root = root

#define P_ALLTOALLV                                                                            \
    const void *sendbuf, const int sendcounts[], const int sdispls[], MPI_Datatype sendtype,   \
        void *recvbuf, const int recvcounts[], const int rdispls[], MPI_Datatype recvtype
#define C_ALLTOALLV                                                                            \
    c->sendbuf, c->sendcounts, c->sdispls, c->sendtype, c->recvbuf, c->recvcounts, c->rdispls, \
        c->recvtype
#define I_ALLTOALLV                                                                            \
    .sendbuf = sendbuf, .sendcounts = sendcounts, .sdispls = sdispls, .sendtype = sendtype,    \
    .recvbuf = recvbuf, .recvcounts = recvcounts, .rdispls = rdispls, .recvtype = recvtype

#define P_ALLTOALLW                                                                            \
    const void *sendbuf, const int sendcounts[], const int sdispls[],                          \
        const MPI_Datatype sendtypes[], void *recvbuf, const int recvcounts[],                 \
        const int rdispls[], const MPI_Datatype recvtypes[]
#define C_ALLTOALLW                                                                            \
    c->sendbuf, c->sendcounts, c->sdispls, c->sendtypes, c->recvbuf, c->recvcounts,            \
        c->rdispls, c->recvtypes
#define I_ALLTOALLW                                                                            \
    .sendbuf = sendbuf, .sendcounts = sendcounts, .sdispls = sdispls, .sendtypes = sendtypes,  \
    .recvbuf = recvbuf, .recvcounts = recvcounts, .rdispls = rdispls, .recvtypes = recvtypes

/* Alltoallw's, with displacements in MPI_Aint. */
#define P_NEIGHBOR_ALLTOALLW                                                                   \
    const void *sendbuf, const int sendcounts[], const MPI_Aint sdispls[],                     \
        const MPI_Datatype sendtypes[], void *recvbuf, const int recvcounts[],                 \
        const MPI_Aint rdispls[], const MPI_Datatype recvtypes[]
#define C_NEIGHBOR_ALLTOALLW                                                                   \
    c->sendbuf, c->sendcounts, c->sdispls_aint, c->sendtypes, c->recvbuf, c->recvcounts,       \
        c->rdispls_aint, c->recvtypes
#define I_NEIGHBOR_ALLTOALLW                                                                   \
    .sendbuf = sendbuf, .sendcounts = sendcounts, .sdispls_aint = sdispls,                     \
    .sendtypes = sendtypes, .recvbuf = recvbuf, .recvcounts = recvcounts,                      \
    .rdispls_aint = rdispls, .recvtypes = recvtypes

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
    RUN(run_##name, PMPI_##name(C_##shape, c->comm))                                           \
    RUN(run_##iname, PMPI_##iname(C_##shape, c->comm, c->req))                                 \
    int MPI_##name(P_##shape, MPI_Comm comm)                                                   \
    {                                                                                          \
        GUARD();                                                                               \
        COLLECTIVE(comm, run_##name, I_##shape);                                               \
    }                                                                                          \
    int MPI_##iname(P_##shape, MPI_Comm comm, MPI_Request *req)                                \
    {                                                                                          \
        GUARD();                                                                               \
        NONBLOCKING(comm, req, run_##iname, I_##shape);                                        \
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
/* MPI 4's persistent collectives (MPICH 4; Open MPI 4.1 has none): the initialization is
 * collective, so aligned like a blocking collective; the collective itself is observed, not
 * covered (its traffic is neither counted nor drained): while one this rank started has not
 * completed, a cut is answered "unable" with the call's name (see persistent.c). */
#define PERSISTENT_WRAPPER(name, iname, shape)                                                 \
    RUN(run_##name##_init, PMPI_##name##_init(C_##shape, c->comm, c->info, c->req))            \
    int MPI_##name##_init(P_##shape, MPI_Comm comm, MPI_Info info, MPI_Request *req)           \
    {                                                                                          \
        GUARD();                                                                               \
        coll c = {.run = run_##name##_init, .comm = comm, .info = info, .req = req, I_##shape}; \
        return svp_persistent_collective(&c, "MPI_" #name "_init");                           \
    }

COLLECTIVES(PERSISTENT_WRAPPER)

RUN(run_barrier_init, PMPI_Barrier_init(c->comm, c->info, c->req))

int MPI_Barrier_init(MPI_Comm comm, MPI_Info info, MPI_Request *req)
{
    GUARD();
    coll c = {.run = run_barrier_init, .comm = comm, .info = info, .req = req};
    return svp_persistent_collective(&c, "MPI_Barrier_init");
}
#endif
