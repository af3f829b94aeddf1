/* Agreement among a communicator's members, and collectives aligned by it before they run
 * (see the top of pmpi_internal.h). */
#include "pmpi_internal.h"

/* ---- agreement among a communicator's members, point to point ------------------------------
 * The maximum of one value per member, by dissemination: in round k each member sends what it
 * knows to the member 2^k above it and takes the maximum with what the member 2^k below it
 * sent; after ceil(log2 n) rounds every member knows the maximum of all. Messages go over
 * the layer's private communicators (svp.align, svp.ctl) to the members' ranks there, so
 * nothing of the application's can match them. Not MPI_Iallreduce: Open MPI hooks its
 * non-blocking collective engine into the progress loop on a communicator's first
 * non-blocking collective and keeps it there, which every later MPI call of the application
 * would pay (about 20 instructions a progress turn). */

agreement svp_agreement_of(MPI_Comm comm, const int *world, int n, int me, int tag,
                           uint64_t value)
{
    return (agreement){.comm = comm, .world = world, .n = n, .me = me, .tag = tag,
                       .value = value, .sreq = MPI_REQUEST_NULL, .rreq = MPI_REQUEST_NULL};
}

/* Bits of a communicator's identity in its alignment tags, and in its persistent
 * collectives' start tags: as many as MPI_TAG_UB leaves. */
static uint32_t id_mask, start_id_mask;

/* Test hook (SYMVIRT_TEST_SLOW_ALIGN_RANK): this rank leaves the last round of each of its
 * alignments on an intracommunicator unread for 20 ms, answering peers' cuts at every turn
 * meanwhile, as a rank whose last agreement message comes late would: the other members are
 * then inside the call while this rank is still aligning it, in a cut if one comes. */
static int slow_align;
/* A start tag: the communicator's identity, the request's ordinal on it (8 bits), the round
 * (5 bits). */
#define START_ORDINAL_BITS 8
#define START_LOW_BITS (START_ORDINAL_BITS + 5)

void svp_agreement_setup(void)
{
    const char *slow = getenv("SYMVIRT_TEST_SLOW_ALIGN_RANK");
    slow_align = slow != NULL && *slow != '\0' && atoi(slow) == svp.me;
    int *tag_ub = NULL, has_ub = 0;
    PMPI_Comm_get_attr(MPI_COMM_WORLD, MPI_TAG_UB, &tag_ub, &has_ub);
    long ub = has_ub && tag_ub != NULL ? *tag_ub : 32767;
    id_mask = 0;
    while (TAG_ALIGN + (((long)id_mask << 1 | 1) << 10) + 1023 <= ub && id_mask < 0xffffu)
        id_mask = id_mask << 1 | 1;
    start_id_mask = 0;
    while ((((long)start_id_mask << 1 | 1) << START_LOW_BITS) + (1L << START_LOW_BITS) - 1 <=
               ub &&
           start_id_mask < 0xffffu)
        start_id_mask = start_id_mask << 1 | 1;
}

/* Its tag names the communicator and the alignment's number on it (both the same on every
 * member), with 5 bits left for the round: alignments in flight at once (non-blocking
 * collectives, several communicators, in any order across communicators) never take each
 * other's messages, unless 32 are in flight on one communicator or two communicators'
 * identities share their low bits. */
agreement svp_alignment_of(tracked_comm *t, uint64_t value)
{
    unsigned seq = t->seq++;
    int tag = TAG_ALIGN + (int)(((t->id & id_mask) << 10) | ((seq & 31u) << 5));
    return svp_agreement_of(svp.align, t->world, t->size, t->me, tag, value);
}

/* Each start of one request is agreed under the same tag: a member starts it again only once
 * its last start completed, and messages between two members with one tag arrive in order, so
 * the k-th starts pair up. Requests whose ordinals share their low 8 bits on one communicator
 * (or communicators whose identities share their low bits), started in different orders on
 * different members, could take each other's messages. */
agreement svp_start_agreement(tracked_comm *t, unsigned ordinal)
{
    unsigned low = (ordinal & ((1u << START_ORDINAL_BITS) - 1)) << 5;
    int tag = (int)(((t->id & start_id_mask) << START_LOW_BITS) | low);
    return svp_agreement_of(svp.starts, t->world, t->size, t->me, tag, 0);
}

int svp_agree_step(agreement *a)
{
    if (a->held_at != 0 && svp_now_ms() - a->held_at < 20)
        return 0; /* the test hook (slow_align) */
    a->held_at = 0;
    for (;;) {
        if ((1L << a->round) >= a->n)
            return 1;
        if (!a->posted) {
            int dist = 1 << a->round;
            int to = (a->me + dist) % a->n, from = (a->me - dist % a->n + a->n) % a->n;
            if (a->world != NULL) {
                to = a->world[to];
                from = a->world[from];
            }
            a->out = a->value;
            PMPI_Irecv(&a->in, 1, MPI_UINT64_T, from, a->tag + a->round, a->comm, &a->rreq);
            PMPI_Isend(&a->out, 1, MPI_UINT64_T, to, a->tag + a->round, a->comm, &a->sreq);
            a->posted = 1;
            if (a->hold && (1L << (a->round + 1)) >= a->n) {
                a->hold = 0;
                a->held_at = svp_now_ms();
                return 0;
            }
        }
        int done = 0;
        if (a->rreq != MPI_REQUEST_NULL)
            PMPI_Test(&a->rreq, &done, MPI_STATUS_IGNORE);
        if (a->sreq != MPI_REQUEST_NULL)
            PMPI_Test(&a->sreq, &done, MPI_STATUS_IGNORE);
        if (a->rreq != MPI_REQUEST_NULL || a->sreq != MPI_REQUEST_NULL)
            return 0;
        if (a->in > a->value)
            a->value = a->in;
        a->round++;
        a->posted = 0;
    }
}

/* ---- collectives aligned, then run ---------------------------------------------------------- */

void svp_adopt(MPI_Comm made, int parent, uint32_t id)
{
    int nc = svp_track_comm(made);
    if (nc >= 0 && parent >= 0)
        svp.comms[nc].id = id;
}

int svp_perform(coll *c)
{
    /* Every member of the parent counts the child when the call starts, also one that gets
     * MPI_COMM_NULL, so the members of a new communicator name it alike. */
    int makes = c->newcomm != NULL && !c->frees;
    uint32_t id = 0;
    if (makes && c->cid >= 0) {
        tracked_comm *parent = &svp.comms[c->cid];
        id = (parent->id * 16777619u) ^ (2654435761u * ++parent->children);
    }
    int rc = c->run(c);
    if (rc != MPI_SUCCESS || !svp.ready || svp.closed)
        return rc;
    if (makes && c->req == NULL)
        svp_adopt(*c->newcomm, c->cid, id);
    else if (makes)
        c->child_id = id; /* MPI_Comm_idup: the communicator exists once the request completes */
    if (c->req != NULL && c->cid >= 0 && !c->makes_persistent)
        svp_track_req(*c->req, c->cid, REQ_COLL);
    return rc;
}

/* The alignment in progress on this rank (at most one: collectives are called one at a time),
 * so that a cut answered while it is pending can finish it: when the members agree on "no
 * cut" during the cut, some may already be inside the collective, so this rank runs it there
 * (its members all agreed, so all of them run it, inside the cut or not). */
typedef struct {
    agreement a;      /* intracommunicators */
    MPI_Request req;  /* intercommunicators: MPI_Iallreduce on the communicator itself */
    MPI_Comm comm;
    int inter, round, resolved, ran, rc;
    uint64_t mine, second, agreed;
    coll *c;
} pending_align;

static pending_align *aligning;

/* Advances an alignment; 1 once its agreed value is known. */
static int align_step(pending_align *p)
{
    if (p->resolved)
        return 1;
    if (!p->inter) {
        if (!svp_agree_step(&p->a))
            return 0;
        p->agreed = p->a.value;
        p->resolved = 1;
        return 1;
    }
    int flag = 0;
    PMPI_Test(&p->req, &flag, MPI_STATUS_IGNORE);
    if (!flag)
        return 0;
    /* On an intercommunicator each group gets the other's maximum: a second round gives both
     * groups the maximum of all. */
    if (p->inter && p->round == 1) {
        p->round = 2;
        p->second = p->agreed > p->mine ? p->agreed : p->mine;
        PMPI_Iallreduce(&p->second, &p->agreed, 1, MPI_UINT64_T, MPI_MAX, p->comm, &p->req);
        return 0;
    }
    p->resolved = 1;
    return 1;
}

void svp_finish_alignment(void)
{
    pending_align *p = aligning;
    if (p == NULL || p->ran || !align_step(p) || p->agreed != 0 || p->c == NULL)
        return;
    /* MPI_Comm_free waits for no member, so none is held in it: it runs once the cut is over,
     * at the top of its wrapper, where a collective called by its attributes' delete
     * callbacks (a library freeing its inner communicator) is aligned like any other. Run
     * here, that collective's alignment nested in this one: the rank aborted, or, the cut
     * made by the progress thread, waited at its own gate for good. */
    if (p->c->local)
        return;
    p->ran = 1;
    p->rc = svp_perform(p->c);
}

/* A member already inside such a call (its alignment done) may have sent this rank its part:
 * drained into the layer's buffer, it would be lost to the call, which then waits for it for
 * ever, here (run inside the cut) and on the members it holds. */
int svp_withheld(MPI_Comm comm, int src, int tag)
{
#ifndef SYMVIRT_MPI_IMPL_OPENMPI
    /* MPICH sends those messages on the communicator's collective context, out of a probe's
     * reach. */
    (void)comm;
    (void)src;
    (void)tag;
    return 0;
#else
    const pending_align *p = aligning;
    /* Agreed on a cut: nobody runs the call this round. */
    if (p == NULL || p->ran || p->c == NULL || !p->c->tagged || tag != p->c->tag ||
        comm != p->c->tagged_comm || (p->resolved && p->agreed != 0))
        return 0;
    for (int i = 0; i < p->a.n; i++)
        if ((p->a.world != NULL ? p->a.world[i] : i) == src)
            return 1;
    return 0;
#endif
}

int svp_align(int cid, coll *c)
{
    if (cid < 0)
        return c != NULL ? svp_perform(c) : MPI_SUCCESS;
    if (aligning != NULL)
        svp_die("collective called while another one is being aligned (threads?)");
    svp_start_deferred_on(cid);
    return svp_align_on(&svp.comms[cid], c);
}

int svp_align_on(tracked_comm *t, coll *c)
{
    if (aligning != NULL)
        svp_die("collective called while another one is being aligned (threads?)");
    for (;;) {
        pending_align p = {.comm = t->comm, .inter = t->inter, .round = 1, .c = c};
        p.mine = symvirt_ctl_pending(&svp.served);
        if (t->inter)
            PMPI_Iallreduce(&p.mine, &p.agreed, 1, MPI_UINT64_T, MPI_MAX, p.comm, &p.req);
        else
            p.a = svp_alignment_of(t, p.mine);
        p.a.hold = slow_align && !t->inter;
        aligning = &p;
        for (unsigned long turns = 1; !align_step(&p); turns++) {
            /* Never start a cut here (peers may already be past this point); answer one. A
             * peer may be waiting for a non-blocking collective this rank has to start. While
             * the progress thread waits to make a cut, peers' cuts are looked for every turn. */
            svp_progress_deferred();
            if ((turns & 63) == 0 || svp_cut_waiting() || slow_align)
                svp_serve_peers();
            if (turns > 4096)
                sched_yield();
        }
        aligning = NULL;
        if (p.ran)
            return p.rc;
        /* Decide from the agreed value alone: identical on every member. A rank may already
         * have made this cut (answering a peer while its reduction was pending); every member
         * then aligns again, so all leave through the same round. */
        if (p.agreed == 0)
            return c != NULL ? svp_perform(c) : MPI_SUCCESS;
        if (!symvirt_served_covers(&svp.served, p.agreed))
            svp_make_cut(p.agreed);
    }
}
