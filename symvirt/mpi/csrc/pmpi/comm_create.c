/* ---- communicator creation: aligned on the parent, the new one tracked at once ------------
 * At once, so a message sent on it is drained even before this rank first uses it. */
#include "pmpi_internal.h"

RUN(run_dup, PMPI_Comm_dup(c->comm, c->newcomm))
RUN(run_dup_info, PMPI_Comm_dup_with_info(c->comm, c->info, c->newcomm))
RUN(run_split, PMPI_Comm_split(c->comm, c->color, c->key, c->newcomm))
RUN(run_split_type, PMPI_Comm_split_type(c->comm, c->split_type, c->key, c->info, c->newcomm))
RUN(run_create, PMPI_Comm_create(c->comm, c->group, c->newcomm))
RUN(run_cart, PMPI_Cart_create(c->comm, c->ndims, c->dims, c->periods, c->reorder, c->newcomm))
RUN(run_cart_sub, PMPI_Cart_sub(c->comm, c->remain_dims, c->newcomm))
RUN(run_graph, PMPI_Graph_create(c->comm, c->nnodes, c->index, c->edges, c->reorder, c->newcomm))
RUN(run_dist_adj,
    PMPI_Dist_graph_create_adjacent(c->comm, c->indegree, c->sources, c->sourceweights,
                                    c->outdegree, c->destinations, c->destweights, c->info,
                                    c->reorder, c->newcomm))
RUN(run_dist, PMPI_Dist_graph_create(c->comm, c->n, c->sources, c->degrees, c->destinations,
                                     c->weights, c->info, c->reorder, c->newcomm))
RUN(run_merge, PMPI_Intercomm_merge(c->comm, c->high, c->newcomm))

int MPI_Comm_dup(MPI_Comm comm, MPI_Comm *newcomm)
{
    GUARD();
    COLLECTIVE(comm, run_dup, .newcomm = newcomm);
}

int MPI_Comm_dup_with_info(MPI_Comm comm, MPI_Info info, MPI_Comm *newcomm)
{
    GUARD();
    COLLECTIVE(comm, run_dup_info, .info = info, .newcomm = newcomm);
}

int MPI_Comm_split(MPI_Comm comm, int color, int key, MPI_Comm *newcomm)
{
    GUARD();
    COLLECTIVE(comm, run_split, .color = color, .key = key, .newcomm = newcomm);
}

int MPI_Comm_split_type(MPI_Comm comm, int split_type, int key, MPI_Info info,
                        MPI_Comm *newcomm)
{
    GUARD();
    COLLECTIVE(comm, run_split_type, .split_type = split_type, .key = key, .info = info,
               .newcomm = newcomm);
}

int MPI_Comm_create(MPI_Comm comm, MPI_Group group, MPI_Comm *newcomm)
{
    GUARD();
    COLLECTIVE(comm, run_create, .group = group, .newcomm = newcomm);
}

int MPI_Cart_create(MPI_Comm comm, int ndims, const int dims[], const int periods[],
                    int reorder, MPI_Comm *newcomm)
{
    GUARD();
    COLLECTIVE(comm, run_cart, .ndims = ndims, .dims = dims, .periods = periods,
               .reorder = reorder, .newcomm = newcomm);
}

int MPI_Cart_sub(MPI_Comm comm, const int remain_dims[], MPI_Comm *newcomm)
{
    GUARD();
    COLLECTIVE(comm, run_cart_sub, .remain_dims = remain_dims, .newcomm = newcomm);
}

int MPI_Graph_create(MPI_Comm comm, int nnodes, const int index[], const int edges[],
                     int reorder, MPI_Comm *newcomm)
{
    GUARD();
    COLLECTIVE(comm, run_graph, .nnodes = nnodes, .index = index, .edges = edges,
               .reorder = reorder, .newcomm = newcomm);
}

int MPI_Dist_graph_create_adjacent(MPI_Comm comm, int indegree, const int sources[],
                                   const int sourceweights[], int outdegree,
                                   const int destinations[], const int destweights[],
                                   MPI_Info info, int reorder, MPI_Comm *newcomm)
{
    GUARD();
    COLLECTIVE(comm, run_dist_adj, .indegree = indegree, .sources = sources,
               .sourceweights = sourceweights, .outdegree = outdegree,
               .destinations = destinations, .destweights = destweights, .info = info,
               .reorder = reorder, .newcomm = newcomm);
}

int MPI_Dist_graph_create(MPI_Comm comm, int n, const int sources[], const int degrees[],
                          const int destinations[], const int weights[], MPI_Info info,
                          int reorder, MPI_Comm *newcomm)
{
    GUARD();
    COLLECTIVE(comm, run_dist, .n = n, .sources = sources, .degrees = degrees,
               .destinations = destinations, .weights = weights, .info = info,
               .reorder = reorder, .newcomm = newcomm);
}

int MPI_Intercomm_merge(MPI_Comm comm, int high, MPI_Comm *newcomm)
{
    GUARD();
    COLLECTIVE(comm, run_merge, .high = high, .newcomm = newcomm);
}

/* Collective over a group only, or over two groups: not aligned (documented); they get
 * through a shut gate (GUARD_PASSAGE). */
int MPI_Comm_create_group(MPI_Comm comm, MPI_Group group, int tag, MPI_Comm *newcomm)
{
    GUARD_PASSAGE();
    int rc = PMPI_Comm_create_group(comm, group, tag, newcomm);
    if (rc == MPI_SUCCESS && svp.ready && !svp.closed)
        svp_track_comm(*newcomm);
    return rc;
}

int MPI_Intercomm_create(MPI_Comm local, int lleader, MPI_Comm peer, int rleader, int tag,
                         MPI_Comm *newcomm)
{
    GUARD_PASSAGE();
    int rc = PMPI_Intercomm_create(local, lleader, peer, rleader, tag, newcomm);
    if (rc == MPI_SUCCESS && svp.ready && !svp.closed)
        svp_track_comm(*newcomm);
    return rc;
}

RUN(run_idup, PMPI_Comm_idup(c->comm, c->newcomm, c->req))

/* Non-blocking like the collectives (see deferred.c); the communicator is observed once the
 * request completes, before the application can use it. */
int MPI_Comm_idup(MPI_Comm comm, MPI_Comm *newcomm, MPI_Request *req)
{
    GUARD();
    NONBLOCKING(comm, req, run_idup, .newcomm = newcomm);
}

int svp_run_comm_free(coll *c)
{
    return PMPI_Comm_free(c->newcomm);
}

int MPI_Comm_free(MPI_Comm *comm)
{
    GUARD();
    /* Collective: aligned (but not on WORLD, which cannot be freed: MPI reports that). The
     * slot is released by the attribute's delete callback (which also runs when the
     * communicator is freed by a path that is not wrapped). */
    coll c = {.run = svp_run_comm_free, .comm = *comm, .newcomm = comm};
    c.cid = CID(*comm);
    return svp_align(c.cid > 0 ? c.cid : -1, &c);
}
