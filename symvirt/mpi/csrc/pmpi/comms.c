/* The layer's state, its errors, and the communicators it observes: a slot each, with the
 * members' WORLD ranks and the identity their alignments are named by. */
#include "pmpi_internal.h"

svp_state svp = {.tail = &svp.head};

void svp_die(const char *what)
{
    fprintf(stderr, "symvirt-pmpi rank %d: %s\n", svp.me, what);
    fflush(stderr);
    PMPI_Abort(MPI_COMM_WORLD, 70);
}

int svp_refuse(MPI_Comm comm, const char *call, const char *why)
{
    fprintf(stderr, "symvirt-pmpi rank %d: %s refused: %s\n", svp.me, call, why);
    fflush(stderr);
    PMPI_Comm_call_errhandler(comm, MPI_ERR_UNSUPPORTED_OPERATION);
    return MPI_ERR_UNSUPPORTED_OPERATION;
}

int svp_raised(MPI_Comm comm, int rc)
{
    if (rc != MPI_SUCCESS)
        PMPI_Comm_call_errhandler(comm, rc);
    return rc;
}

/* ---- communicators ---------------------------------------------------------------------- */

int svp_on_comm_delete(MPI_Comm c, int keyval, void *val, void *extra)
{
    (void)c;
    (void)keyval;
    (void)extra;
    svp_untrack_slot((int)(intptr_t)val);
    return MPI_SUCCESS;
}

/* Whether a pending request still names slot cid (then its table must stay). */
static int slot_referenced(int cid)
{
    for (int i = 0; i < svp.reqs.n; i++)
        if (svp.reqs.v[i].cid == cid)
            return 1;
    for (int i = 0; i < svp.pers.n; i++)
        if (svp.pers.v[i].cid == cid)
            return 1;
    for (int i = 0; i < svp.matches.n; i++)
        if (svp.matches.v[i].cid == cid)
            return 1;
    return svp_deferred_names(cid);
}

uint32_t svp_hash_ranks(const int *ranks, int n)
{
    uint32_t h = 2166136261u;
    for (int i = 0; i < n; i++)
        h = (h ^ (uint32_t)ranks[i]) * 16777619u;
    return h;
}

int *svp_world_ranks(MPI_Group grp, int *size)
{
    MPI_Group wgrp;
    PMPI_Comm_group(MPI_COMM_WORLD, &wgrp);
    *size = 0;
    PMPI_Group_size(grp, size);
    int n = *size > 0 ? *size : 1;
    int *ranks = malloc((size_t)n * sizeof(int)), *world = malloc((size_t)n * sizeof(int));
    if (ranks == NULL || world == NULL)
        svp_die("out of memory");
    for (int i = 0; i < *size; i++)
        ranks[i] = i;
    PMPI_Group_translate_ranks(grp, *size, ranks, wgrp, world);
    free(ranks);
    PMPI_Group_free(&wgrp);
    return world;
}

/* The hash of the WORLD ranks of c's local group. */
static uint32_t hash_group(MPI_Comm c)
{
    MPI_Group grp;
    PMPI_Comm_group(c, &grp);
    int size = 0;
    int *world = svp_world_ranks(grp, &size);
    uint32_t h = svp_hash_ranks(world, size);
    free(world);
    PMPI_Group_free(&grp);
    return h;
}

void svp_sum_counts(void)
{
    memcpy(svp.sent, svp.retired_sent, (size_t)svp.np * sizeof(uint64_t));
    memcpy(svp.recv, svp.retired_recv, (size_t)svp.np * sizeof(uint64_t));
    for (int c = 0; c < svp.ncomms; c++) {
        const tracked_comm *t = &svp.comms[c];
        for (int r = 0; t->sent != NULL && r < t->size; r++) {
            svp.sent[t->world[r]] += t->sent[r];
            svp.recv[t->world[r]] += t->recv[r];
        }
    }
}

int svp_track_comm(MPI_Comm c)
{
    if (c == MPI_COMM_NULL)
        return -1;
    for (int i = 0; i < svp.ncomms; i++)
        if (svp.comms[i].comm == c)
            return i;
    int cid = -1;
    for (int i = 0; i < svp.ncomms && cid < 0; i++)
        if (svp.comms[i].comm == MPI_COMM_NULL && !slot_referenced(i))
            cid = i;
    if (cid < 0) {
        static int warned;
        if (svp.ncomms == MAX_COMMS) {
            if (!warned++)
                fprintf(stderr, "symvirt-pmpi rank %d: more than %d communicators at once; "
                                "the others pass through unobserved\n", svp.me, MAX_COMMS);
            return -1;
        }
        cid = svp.ncomms++;
    }
    svp_drop_buffered(cid); /* a freed communicator's that a persistent receive kept */
    tracked_comm *t = &svp.comms[cid];
    /* The slot's counts stay in the totals. */
    for (int r = 0; t->sent != NULL && r < t->size; r++) {
        if (t->sent[r] > 0)
            svp.retired_sent[t->world[r]] += t->sent[r];
        if (t->recv[r] > 0)
            svp.retired_recv[t->world[r]] += t->recv[r];
    }
    free(t->world);
    free(t->sent);
    free(t->recv);
    int inter = 0;
    PMPI_Comm_test_inter(c, &inter);
    MPI_Group grp;
    if (inter)
        PMPI_Comm_remote_group(c, &grp);
    else
        PMPI_Comm_group(c, &grp);
    int size = 0;
    t->world = svp_world_ranks(grp, &size);
    PMPI_Group_free(&grp);
    t->sent = calloc((size_t)(size > 0 ? size : 1), sizeof(uint64_t));
    t->recv = calloc((size_t)(size > 0 ? size : 1), sizeof(uint64_t));
    if (t->sent == NULL || t->recv == NULL)
        svp_die("out of memory");
    for (int i = 0; i < size; i++)
        if (t->world[i] == MPI_UNDEFINED) {
            static int warned;
            if (!warned++)
                fprintf(stderr, "symvirt-pmpi rank %d: a communicator reaches processes "
                                "outside MPI_COMM_WORLD; it passes through unobserved\n", svp.me);
            t->size = 0; /* nothing counted on it */
            if (cid == svp.ncomms - 1)
                svp.ncomms--;
            return -1;
        }
    t->size = size;
    t->inter = inter;
    PMPI_Comm_rank(c, &t->me);
    /* Until perform() names it from its parent: from the members' WORLD ranks (FNV-1a), for
     * an intercommunicator both groups' (combined alike on both sides). */
    t->id = svp_hash_ranks(t->world, size);
    if (inter)
        t->id ^= hash_group(c);
    t->children = t->seq = t->pcolls = 0;
    t->comm = c;
    PMPI_Comm_set_attr(c, svp.keyval, (void *)(intptr_t)cid);
    return cid;
}
