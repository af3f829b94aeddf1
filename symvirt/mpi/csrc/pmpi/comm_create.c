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

/* ---- collectives over members no communicator holds together ------------------------------
 * MPI_Comm_create_group is collective over a group of comm, MPI_Intercomm_create over two
 * groups (a leader of each talking on the peer communicator). They are aligned like the other
 * creations, over a stand-in for a communicator of their members (align_over): the members'
 * WORLD ranks, in an order each member builds alike, named by their hash. Without it a cut
 * requested while some members were inside the call, and another was held by the cut before
 * reaching it, waited for the call and the call for the cut, for good. An MPI_Intercomm_create
 * first learns the other group: its leader sends the leader of the other group this group's
 * WORLD ranks, and forwards theirs to its members (svp.ctl, TAG_GROUP; waits that make or
 * answer cuts). */

RUN(run_create_group, PMPI_Comm_create_group(c->comm, c->group, c->tag, c->newcomm))
RUN(run_intercomm, PMPI_Intercomm_create(c->comm, c->lleader, c->peer, c->rleader, c->tag,
                                         c->newcomm))

/* A communicator made over members rather than from a parent is first named by its members
 * alone (svp_track_comm), so two made over one group would share their name, and their
 * alignments' and persistent collectives' tags. It is renamed from its members, the call
 * (kind), its tag, and how many such communicators this rank made before with those: members
 * make them in the same order, so every member names each alike. */
typedef struct {
    uint32_t key;
    unsigned made;
} made_over;
static LIST(made_over, made_before);

static void name_made_over(MPI_Comm made, const int *world, int n, uint32_t kind, int tag)
{
    if (made == MPI_COMM_NULL)
        return;
    uint32_t key = svp_hash_ranks(world, n) ^ kind ^ ((uint32_t)tag * 2654435761u);
    int i = 0;
    while (i < made_before.n && made_before.v[i].key != key)
        i++;
    if (i == made_before.n) {
        GROW(made_before);
        made_before.v[made_before.n++] = (made_over){key, 0};
    }
    unsigned before = made_before.v[i].made++;
    int nc = svp_cid(made);
    if (nc >= 0)
        svp.comms[nc].id = (key * 16777619u) ^ (before * 2246822519u);
}

/* Aligns c over the n members with these WORLD ranks, then runs it. */
static int align_over(const int *world, int n, uint32_t kind, coll *c)
{
    tracked_comm u = {.comm = MPI_COMM_NULL, .size = n, .world = (int *)world, .me = -1};
    for (int i = 0; i < n; i++)
        if (world[i] == svp.me)
            u.me = i;
    if (u.me < 0)
        return svp_perform(c); /* not a member: MPI reports the error */
    u.id = svp_hash_ranks(world, n) ^ kind;
    return svp_align_on(&u, c);
}

/* Runs c, which makes a communicator over group's members, aligned over them (unaligned when
 * one is outside MPI_COMM_WORLD), after the collectives deferred on its parent's slot (-1:
 * none); the new communicator is named from the members, kind and tag. */
static int make_over_group(coll *c, MPI_Group group, int parent, uint32_t kind, int tag)
{
    int n = 0;
    if (!svp.ready || svp.closed || PMPI_Group_size(group, &n) != MPI_SUCCESS || n <= 0)
        return c->run(c);
    int *world = svp_world_ranks(group, &n), outside = 0;
    for (int i = 0; i < n; i++)
        outside |= world[i] == MPI_UNDEFINED;
    if (parent >= 0)
        svp_start_deferred_on(parent);
    int rc = outside ? svp_perform(c) : align_over(world, n, kind, c);
    if (rc == MPI_SUCCESS && !outside)
        name_made_over(*c->newcomm, world, n, kind, tag);
    free(world);
    return rc;
}

int MPI_Comm_create_group(MPI_Comm comm, MPI_Group group, int tag, MPI_Comm *newcomm)
{
    GUARD();
    coll c = {.run = run_create_group, .cid = -1, .comm = comm, .group = group, .tag = tag,
              .newcomm = newcomm, .tagged_comm = comm, .tagged = 1};
    return make_over_group(&c, group, svp_cid(comm), 0x47524f55u, tag);
}

/* Posts sending this rank's n ints to WORLD rank to on svp.ctl. */
static MPI_Request send_ranks(const int *v, int n, int to)
{
    MPI_Request r;
    PMPI_Isend(v, n, MPI_INT, to, TAG_GROUP, svp.ctl, &r);
    return r;
}

/* Receives at most svp.np ints from WORLD rank from on svp.ctl into v, making or answering
 * cuts meanwhile; returns how many. */
static int receive_ranks(int *v, int from)
{
    MPI_Request r;
    MPI_Status st;
    int n = 0;
    PMPI_Irecv(v, svp.np, MPI_INT, from, TAG_GROUP, svp.ctl, &r);
    svp_wait_serving(&r, &st);
    PMPI_Get_count(&st, MPI_INT, &n);
    return n;
}

int MPI_Intercomm_create(MPI_Comm local, int lleader, MPI_Comm peer, int rleader, int tag,
                         MPI_Comm *newcomm)
{
    GUARD();
    coll c = {.run = run_intercomm, .cid = -1, .comm = local, .lleader = lleader,
              .peer = peer, .rleader = rleader, .tag = tag, .newcomm = newcomm};
    int lc = svp_cid(local);
    if (lc < 0 || svp.comms[lc].inter || lleader < 0 || lleader >= svp.comms[lc].size)
        return c.run(&c); /* not observed, or erroneous: MPI reports it */
    svp_start_deferred_on(lc);
    const tracked_comm *l = &svp.comms[lc];
    int nl = l->size, *mine = malloc((size_t)nl * sizeof(int));
    int *theirs = malloc((size_t)svp.np * sizeof(int));
    if (mine == NULL || theirs == NULL)
        svp_die("out of memory");
    memcpy(mine, l->world, (size_t)nl * sizeof(int)); /* the slot may move while cuts run */
    int nr = 0;
    if (l->me == lleader) {
        c.tagged_comm = peer; /* the leaders' exchange: significant only here */
        c.tagged = 1;
        int pc = svp_cid(peer);
        if (pc < 0 || rleader < 0 || rleader >= svp.comms[pc].size)
            svp_die("MPI_Intercomm_create: the remote leader is not in an observed peer "
                    "communicator");
        MPI_Request sent = send_ranks(mine, nl, svp.comms[pc].world[rleader]);
        nr = receive_ranks(theirs, svp.comms[pc].world[rleader]);
        svp_wait_serving(&sent, MPI_STATUS_IGNORE);
        MPI_Request *fwd = malloc((size_t)nl * sizeof(MPI_Request));
        if (fwd == NULL)
            svp_die("out of memory");
        for (int i = 0; i < nl; i++)
            fwd[i] = i == lleader ? MPI_REQUEST_NULL : send_ranks(theirs, nr, mine[i]);
        for (int i = 0; i < nl; i++)
            svp_wait_serving(&fwd[i], MPI_STATUS_IGNORE);
        free(fwd);
    } else {
        nr = receive_ranks(theirs, mine[lleader]);
    }
    /* Both groups in one list: the one holding the lower WORLD rank first. */
    int *all = malloc((size_t)(nl + nr) * sizeof(int));
    if (all == NULL)
        svp_die("out of memory");
    int low_mine = svp.np, low_theirs = svp.np;
    for (int i = 0; i < nl; i++)
        low_mine = mine[i] < low_mine ? mine[i] : low_mine;
    for (int i = 0; i < nr; i++)
        low_theirs = theirs[i] < low_theirs ? theirs[i] : low_theirs;
    const int *first = low_mine < low_theirs ? mine : theirs;
    const int *second = low_mine < low_theirs ? theirs : mine;
    int nfirst = low_mine < low_theirs ? nl : nr;
    memcpy(all, first, (size_t)nfirst * sizeof(int));
    memcpy(all + nfirst, second, (size_t)(nl + nr - nfirst) * sizeof(int));
    int rc = align_over(all, nl + nr, 0x494e5452u, &c);
    if (rc == MPI_SUCCESS)
        name_made_over(*newcomm, all, nl + nr, 0x494e5452u, tag);
    free(all);
    free(mine);
    free(theirs);
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

#if MPI_VERSION >= 4
/* The real call may start after the application freed its info (legal once the call
 * returned): it takes the layer's copy, freed once started. */
static int run_idup_info(coll *c)
{
    int rc = PMPI_Comm_idup_with_info(c->comm, c->info, c->newcomm, c->req);
    if (c->info != MPI_INFO_NULL)
        PMPI_Info_free(&c->info);
    return rc;
}

/* MPI 4's communicators made from groups (MPICH 4; Open MPI 4.1 does not have them), tracked
 * as soon as they are made on every member: made at first use, a slot was missing on a member
 * that had not used the communicator yet when a cut came, and its drain, which looks only at
 * the slots it has, waited for ever for a message a peer had sent there.
 * MPI_Comm_create_from_group is aligned over its group's members, as MPI_Comm_create_group,
 * and named from them and its string tag. MPI_Intercomm_create_from_groups is not aligned: a
 * cut that comes while some members are inside it and others are not fails at its deadline
 * (the job goes on). */
static int run_from_group(coll *c)
{
    return PMPI_Comm_create_from_group(c->group, c->stringtag, c->info, c->errhandler,
                                       c->newcomm);
}

int MPI_Comm_create_from_group(MPI_Group group, const char *stringtag, MPI_Info info,
                               MPI_Errhandler errhandler, MPI_Comm *newcomm)
{
    GUARD();
    coll c = {.run = run_from_group, .cid = -1, .group = group, .stringtag = stringtag,
              .info = info, .errhandler = errhandler, .newcomm = newcomm};
    uint32_t tag = 2166136261u; /* FNV-1a of the string tag: the same on every member */
    for (const char *p = stringtag; p != NULL && *p != '\0'; p++)
        tag = (tag ^ (unsigned char)*p) * 16777619u;
    return make_over_group(&c, group, -1, 0x46524f4du, (int)(tag & 0x7fffffff));
}

int MPI_Intercomm_create_from_groups(MPI_Group local_group, int local_leader,
                                     MPI_Group remote_group, int remote_leader,
                                     const char *stringtag, MPI_Info info,
                                     MPI_Errhandler errhandler, MPI_Comm *newintercomm)
{
    GUARD();
    int rc = PMPI_Intercomm_create_from_groups(local_group, local_leader, remote_group,
                                               remote_leader, stringtag, info, errhandler,
                                               newintercomm);
    if (rc == MPI_SUCCESS && svp.ready && !svp.closed)
        svp_track_comm(*newintercomm);
    return rc;
}

/* MPI 4's (MPICH 4; Open MPI 4.1 does not have it): as MPI_Comm_idup. */
int MPI_Comm_idup_with_info(MPI_Comm comm, MPI_Info info, MPI_Comm *newcomm, MPI_Request *req)
{
    GUARD();
    MPI_Info copy = MPI_INFO_NULL;
    if (info != MPI_INFO_NULL) {
        int rc = PMPI_Info_dup(info, &copy);
        if (rc != MPI_SUCCESS)
            return rc;
    }
    NONBLOCKING(comm, req, run_idup_info, .info = copy, .newcomm = newcomm);
}
#endif

RUN(run_comm_free, PMPI_Comm_free(c->newcomm))

int MPI_Comm_free(MPI_Comm *comm)
{
    GUARD();
    /* Collective: aligned (but not on WORLD, which cannot be freed: MPI reports that). The
     * slot is released by the attribute's delete callback (which also runs when the
     * communicator is freed by a path that is not wrapped). */
    coll c = {.run = run_comm_free, .comm = *comm, .newcomm = comm, .frees = 1, .local = 1};
    c.cid = svp_cid(*comm);
    return svp_align(c.cid > 0 ? c.cid : -1, &c);
}

RUN(run_comm_disconnect, PMPI_Comm_disconnect(c->newcomm))

/* Collective, and it waits for the communicator's pending traffic: aligned as MPI_Comm_free
 * (unwrapped, it ran outside the gate, so the progress thread could make a cut while the
 * application's thread was inside it). */
int MPI_Comm_disconnect(MPI_Comm *comm)
{
    GUARD();
    coll c = {.run = run_comm_disconnect, .comm = *comm, .newcomm = comm, .frees = 1};
    c.cid = svp_cid(*comm);
    return svp_align(c.cid > 0 ? c.cid : -1, &c);
}
