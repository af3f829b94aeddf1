/* SymVirt stress program: point-to-point and collective traffic with checked payloads.
 *
 *   stress MODES DIR MIN_ITERS
 *
 * MODES: comma-separated list run in every iteration, in order:
 *   ring       blocking send/recv around a ring (even ranks send first)
 *   ring_nb    Irecv/Isend around a ring, completed by Waitall or a Test loop
 *   alltoall   Irecv/Isend with every peer, completed by Waitany / Testsome
 *   anysource  every rank sends to every peer, receives with MPI_ANY_SOURCE (Recv, Probe+Recv,
 *              Iprobe+Recv, Irecv+Wait)
 *   collective Allreduce, Bcast, Alltoall, Reduce, Allgather, Barrier, all checked
 *   handoff    once (iteration 3): rank 0 sends three messages (tags 40, 41, 42) that rank 1
 *              receives only after a barrier; with STRESS_RAISE_SIGUSR1 set (transparent mode
 *              only: the layer's handler must be installed) every rank passes a barrier, then
 *              raises SIGUSR1, so the cut falls before the second barrier and the messages are
 *              drained into the layer's buffer; rank 1 then checks probe order, tag matching and payloads from it;
 *              four more small ones check what a receive from the buffer writes and reports:
 *              a last element in part (3 ints into pairs of ints), a derived type's count
 *              (4 ints as one quadruple, Irecv + Wait), and truncation (MPI_ERR_TRUNCATE
 *              through Recv and through Irecv + Wait, each raised once through the handler);
 *              with MPI 4, one more on a communicator made from a group (MPI_Comm_create_from_group)
 *              that rank 1 has not used before the cut
 *   stall      one rank (rotating) computes for 20 ms while the others wait in a blocking
 *              receive from it, then everyone waits in a barrier: migration requests then
 *              land while ranks sit in a receive, in a collective, or between MPI calls
 *   split      MPI_Comm_split into two halves (remade every 4 iterations, sometimes from a
 *              duplicate; the old halves freed, or disconnected every 8): a ring on each half
 *              (blocking, then ANY_SOURCE Irecv + Waitall), an Allreduce and a Bcast on the
 *              halves
 *   persist    persistent sends and receives to both ring neighbours (Send_init, Recv_init,
 *              Startall; sometimes a barrier between starting the sends and the receives;
 *              completed by Waitall, Testall or Waitany)
 *   mprobe     every rank sends to every peer; received with ANY_SOURCE/ANY_TAG through
 *              Mprobe+Mrecv, Improbe+Imrecv+Wait, or Mprobe, other MPI calls, then Mrecv
 *   nbcoll     Iallreduce on WORLD, Ibcast on a half and Comm_idup of WORLD completed after ring
 *              traffic; a ring on the new communicator, then it is freed; Ibarrier
 *   nbx        dynamic sparse data exchange (the NBX pattern): Issend to a varying subset of
 *              peers, receive whatever arrives (Iprobe ANY_SOURCE + Recv) until the own sends
 *              are matched, then Ibarrier and go on receiving until it completes; no rank
 *              knows how many messages it gets, so a rank must not wait at its Ibarrier
 *   vcoll      on a periodic 1-D cartesian communicator: Neighbor_allgather, Neighbor_alltoall
 *              (blocking), Ineighbor_alltoall; on WORLD: Ialltoallv, Iallgatherv, Igatherv,
 *              Iscatterv, Ireduce_scatter, Iexscan; the non-blocking ones completed by one
 *              Waitall after ring traffic; every result checked
 *   nbfree     rank 0 calls Ibcast with a derived datatype and Iallreduce with an operation
 *              of its own, frees both at once, and only then lets the other ranks call theirs
 *              (a message each): its collectives cannot have started when it freed them (MPI
 *              allows the free); results checked
 *   cancel     a receive nothing matches is cancelled; a message sent before a barrier is
 *              received by an Irecv that is then cancelled: delivered, or received again
 *   replace    MPI_Sendrecv_replace around the ring
 *   pcoll      (MPI 4) persistent collectives made once (MPI_Allreduce_init and MPI_Barrier_init
 *              on WORLD, MPI_Bcast_init of a large message on a duplicate of it), started
 *              every iteration, one rank (rotating) computing for 20 ms first so the others'
 *              starts wait for it, in different orders on different ranks (MPI 4 allows it):
 *              odd ranks start the Bcast before the Allreduce (MPI_Startall), the slow rank
 *              starts the Barrier_init's request after a blocking MPI_Barrier, the others
 *              before it; then completed together with a ring receive, by Waitall, a Testall
 *              loop, Waitany (four calls, then a fifth finds none active), a Waitsome loop or
 *              Test loops in turn, with statuses (the receive's checked); results checked.
 *              And a persistent barrier on each of two communicators MPI_Comm_create_group
 *              made over all ranks with one tag: even ranks start both, odd ranks start the
 *              second, wait for it, then start the first
 *   pinit      (MPI 4) persistent collectives made, started, completed and freed every
 *              iteration (MPI_Barrier_init and MPI_Allreduce_init on WORLD; the result
 *              checked): cuts land while some ranks are still agreeing on an _init and others
 *              already wait for its start
 *   nbsend     a collective in flight across a blocking send that needs it: even ranks start an
 *              Iallreduce (and, with MPI 4, a persistent Allreduce_init's request), then
 *              MPI_Send a large (rendezvous) message to the right neighbour, then wait for
 *              the collective; odd ranks start it, wait for it, and only then receive. Legal:
 *              MPI progresses the collective inside the send (the layer must too, or the
 *              job deadlocks)
 *   attrfree   two duplicates of MPI_COMM_WORLD with a ring on each; the first is freed by the
 *              delete callback of an attribute on the second when the second is freed (a
 *              collective called inside another, as libraries with inner communicators do)
 *   bsend      a large buffered send (MPI_Bsend) to the right neighbour through a buffer
 *              attached for it, then MPI_Buffer_detach, which waits until the neighbour has
 *              taken the message (even ranks send first, odd ranks receive first)
 *   freerecv   a receive from the left neighbour freed at once (MPI_Request_free: its message
 *              still lands), the message sent after a barrier, a second one with the same tag
 *              taken by a blocking receive (the freed one matched the first: MPI matches in
 *              order); the freed receive's payload checked once it has landed. Every cut
 *              after one is made with the freed receive's message counted or not yet sent
 *   isendrecv  (MPI 4) around the ring: a message sent before a barrier that the right
 *              neighbour receives after it through MPI_Isendrecv (a cut in the barrier drains it
 *              into the layer's buffer; with STRESS_RAISE_SIGUSR1 set, at iteration 3 every
 *              rank raises SIGUSR1 after a first barrier, so the cut falls there), an Irecv
 *              for that Isendrecv's own send, completed by Waitall, a Testall loop or Waitany;
 *              then MPI_Isendrecv_replace (large messages every other iteration), completed by
 *              Wait or a Test loop, through a datatype freed while it is pending; an Isendrecv
 *              used as a send whose request is freed at once; then a ring on a communicator
 *              MPI_Comm_idup_with_info made while ring traffic went on (its info freed at
 *              once). MPICH 4.0's own MPI_Isendrecv leaves its status empty; the layer's gives
 *              the receive's, as MPI 4 says, and the mode checks it
 *   large_count (MPI 4) the large-count (_c) forms: a ring through Send_c and Recv (even
 *              ranks, sending first) and Recv_c and Send (odd ranks), Isend_c/Irecv_c, Sendrecv_c and Isendrecv_c; a message received
 *              through Mprobe + Mrecv_c; Allreduce_c, Bcast_c, Alltoallv_c and Iallgatherv_c,
 *              every result checked
 *   compute    every rank computes for about STRESS_COMPUTE_MS (default 5000; rank and iteration
 *              vary it between 2/3 and 4/3 of that) without calling MPI, then calls MPI_Iprobe
 *              on a communicator nobody sends on, timing it (see DIR/entries-R below)
 *   compute_nb Irecv from the left and Isend of a large (rendezvous) message to the right,
 *              the same compute phase with both outstanding, then Waitall and checks
 *   inter      an intercommunicator between the halves (Intercomm_create, remade every 4
 *              iterations from halves made by Comm_split or Comm_create_group, merged each
 *              time): a message to the remote rank with the same index, ANY_SOURCE receive, an
 *              Allreduce and a Barrier on it
 *   cgroup     MPI_Comm_create_group over every rank but the last (tag 7, on WORLD), an
 *              Allreduce on the new communicator (checked), then MPI_Comm_free; the last rank
 *              waits meanwhile in a receive from rank 0, sent after the free: cuts it starts
 *              there land while the members are inside the call, or still agreeing on it
 *   io         an MPI-IO file (DIR/io.dat, opened at the first iteration, closed at the end):
 *              every rank writes its block with MPI_File_write_at_all, the file is synced, and
 *              every rank reads its right neighbour's block back with MPI_File_read_at_all
 *              and checks it; every 4th iteration through a view (MPI_File_set_view,
 *              MPI_File_write_all)
 * Every message carries (source, destination, per-pair sequence number, tag) and a payload
 * derived from them; the receiver checks all of it: a lost, duplicated, reordered or corrupted
 * message fails the run. Some messages are large (rendezvous protocol).
 * Runs at least MIN_ITERS iterations, then until DIR/stop exists (all ranks agree; looked at
 * every 8 iterations, every iteration when a compute mode is in MODES).
 * After each compute phase every rank appends "ENTER RETURN" to DIR/entries-R: the
 * CLOCK_MONOTONIC nanoseconds at which its first MPI call after the phase was entered and
 * returned (ENTER is written before the call: a call entered while a cut holds the rank
 * returns after the resume).
 *
 * With -DSYMVIRT_EXPLICIT the program initialises MPI at MPI_THREAD_SERIALIZED and calls
 * symvirt_safe_point every iteration; with STRESS_QUIET=1 too, each compute phase is a quiet
 * phase (symvirt_quiet_begin before it, symvirt_quiet_end as its first call after it). Its
 * quiesce hook writes DIR/cut-E-R ("iteration sent received WHERE BY": WHERE quiet or
 * safe_point, BY main or thread, the thread the hook ran on) and after a resume it writes
 * DIR/resumed-E-R (the interconnect's JSON).
 * Prints "stress OK rank R iterations N sent S received V agent_errors A cuts C" and exits 0 on
 * success (an agent that went away is reported by the safe point and counted in A).
 * With STRESS_HOLD_OPEN=PATH every rank opens PATH before MPI_Init and keeps it open (a STAND-IN
 * for the verbs device node an MPI over InfiniBand holds open, see src/verbs.rs). */
#include <fcntl.h>
#include <mpi.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#ifdef SYMVIRT_EXPLICIT
#include <pthread.h>
#include "symvirt.h"
#endif

#define SMALL 4
#define LARGE (32 * 1024) /* 256 KiB: beyond the eager limit of both implementations */
#define MAXP 64

static int me, np;
static const char *dir;
static uint64_t *next_seq_to;   /* per destination */
static uint64_t *next_seq_from; /* per source */
static uint64_t sent, received, iteration, cuts, agent_errors;
/* ANY_SOURCE/ANY_TAG traffic has its own communicator so it never takes another mode's
 * message (peers may be an iteration ahead). */
static MPI_Comm any_comm;
/* The NBX mode's own communicator, for the same reason (it probes with ANY_SOURCE). */
static MPI_Comm nbx_comm;

static void fail(const char *what, int peer)
{
    fprintf(stderr, "stress FAIL rank %d iteration %llu: %s (peer %d)\n", me,
            (unsigned long long)iteration, what, peer);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 3);
}

static uint64_t word(uint64_t src, uint64_t dst, uint64_t seq, uint64_t i)
{
    uint64_t x = (src << 48) ^ (dst << 40) ^ (seq << 8) ^ i;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return x;
}

static int len_for(uint64_t seq)
{
    return (seq % 7 == 3) ? LARGE : SMALL;
}

/* Fills a message to dst; returns its length in words. */
static int fill(uint64_t *buf, int dst, int tag)
{
    uint64_t seq = next_seq_to[dst]++;
    int n = len_for(seq) + 4;
    buf[0] = (uint64_t)me;
    buf[1] = (uint64_t)dst;
    buf[2] = seq;
    buf[3] = (uint64_t)tag;
    for (int i = 4; i < n; i++)
        buf[i] = word((uint64_t)me, (uint64_t)dst, seq, (uint64_t)i);
    sent++;
    return n;
}

/* Checks a message received with status st on a communicator whose ranks map to WORLD ranks
 * through `world` (NULL: WORLD itself); want_src is a WORLD rank or MPI_ANY_SOURCE. */
static void check_on(const uint64_t *buf, MPI_Status *st, int want_src, const int *world)
{
    int count = 0;
    MPI_Get_count(st, MPI_UINT64_T, &count);
    int src = world != NULL ? world[st->MPI_SOURCE] : st->MPI_SOURCE;
    if (want_src != MPI_ANY_SOURCE && src != want_src)
        fail("message from the wrong source", src);
    if (count < 4 || buf[0] != (uint64_t)src || buf[1] != (uint64_t)me)
        fail("bad header", src);
    if (buf[3] != (uint64_t)st->MPI_TAG)
        fail("tag mismatch", src);
    uint64_t seq = buf[2];
    if (seq != next_seq_from[src])
        fail(seq < next_seq_from[src] ? "duplicated or reordered message" : "lost message", src);
    next_seq_from[src]++;
    if (count != len_for(seq) + 4)
        fail("bad length", src);
    for (int i = 4; i < count; i++)
        if (buf[i] != word((uint64_t)src, (uint64_t)me, seq, (uint64_t)i))
            fail("corrupted payload", src);
    received++;
}

/* Checks a message received on MPI_COMM_WORLD or a duplicate of it. */
static void check(const uint64_t *buf, MPI_Status *st, int want_src)
{
    check_on(buf, st, want_src, NULL);
}

static uint64_t *bufs[2 * MAXP];

static void ring(void)
{
    int right = (me + 1) % np, left = (me + np - 1) % np;
    MPI_Status st;
    if (me % 2 == 0) {
        int n = fill(bufs[0], right, 10);
        MPI_Send(bufs[0], n, MPI_UINT64_T, right, 10, MPI_COMM_WORLD);
        MPI_Recv(bufs[1], LARGE + 4, MPI_UINT64_T, left, 10, MPI_COMM_WORLD, &st);
        check(bufs[1], &st, left);
    } else {
        MPI_Recv(bufs[1], LARGE + 4, MPI_UINT64_T, left, 10, MPI_COMM_WORLD, &st);
        check(bufs[1], &st, left);
        int n = fill(bufs[0], right, 10);
        MPI_Send(bufs[0], n, MPI_UINT64_T, right, 10, MPI_COMM_WORLD);
    }
}

/* Irecv/Isend around the ring on comm (a duplicate of WORLD's ranks), tag. */
static void ring_nb_on(MPI_Comm comm, int tag)
{
    int right = (me + 1) % np, left = (me + np - 1) % np;
    MPI_Request rq[2];
    MPI_Status st[2];
    MPI_Irecv(bufs[1], LARGE + 4, MPI_UINT64_T, left, tag, comm, &rq[0]);
    int n = fill(bufs[0], right, tag);
    MPI_Isend(bufs[0], n, MPI_UINT64_T, right, tag, comm, &rq[1]);
    if (iteration % 2 == 0) {
        MPI_Waitall(2, rq, st);
    } else {
        int done = 0;
        while (!done)
            MPI_Testall(2, rq, &done, st);
    }
    check(bufs[1], &st[0], left);
}

static void ring_nb(void)
{
    ring_nb_on(MPI_COMM_WORLD, 11);
}

static void alltoall(void)
{
    MPI_Request rq[2 * MAXP];
    MPI_Status st[2 * MAXP];
    int k = 0;
    for (int p = 0; p < np; p++)
        if (p != me)
            MPI_Irecv(bufs[np + p], LARGE + 4, MPI_UINT64_T, p, 12, MPI_COMM_WORLD, &rq[k++]);
    int nrecv = k;
    for (int p = 0; p < np; p++)
        if (p != me) {
            int n = fill(bufs[p], p, 12);
            MPI_Isend(bufs[p], n, MPI_UINT64_T, p, 12, MPI_COMM_WORLD, &rq[k++]);
        }
    /* Receives are checked as they complete; per-pair order is checked by sequence. */
    int left = k;
    if (iteration % 2 == 0) {
        while (left > 0) {
            int idx;
            MPI_Status s;
            MPI_Waitany(k, rq, &idx, &s);
            if (idx == MPI_UNDEFINED)
                break;
            if (idx < nrecv)
                check(bufs[np + s.MPI_SOURCE], &s, s.MPI_SOURCE);
            left--;
        }
    } else {
        int idx[2 * MAXP];
        while (left > 0) {
            int outcount = 0;
            MPI_Testsome(k, rq, &outcount, idx, st);
            if (outcount == MPI_UNDEFINED)
                break;
            for (int i = 0; i < outcount; i++) {
                if (idx[i] < nrecv)
                    check(bufs[np + st[i].MPI_SOURCE], &st[i], st[i].MPI_SOURCE);
            }
            left -= outcount;
        }
    }
}

static void anysource(void)
{
    enum { PER_PEER = 3 };
    MPI_Request rq[PER_PEER * MAXP];
    uint64_t *out[PER_PEER * MAXP];
    int k = 0;
    for (int r = 0; r < PER_PEER; r++)
        for (int p = 0; p < np; p++)
            if (p != me) {
                out[k] = malloc((LARGE + 4) * sizeof(uint64_t));
                int n = fill(out[k], p, 20 + r);
                MPI_Isend(out[k], n, MPI_UINT64_T, p, 20 + r, any_comm, &rq[k]);
                k++;
            }
    uint64_t *in = bufs[1];
    for (int m = 0; m < PER_PEER * (np - 1); m++) {
        MPI_Status st;
        switch ((iteration + (uint64_t)m) % 4) {
        case 0:
            MPI_Recv(in, LARGE + 4, MPI_UINT64_T, MPI_ANY_SOURCE, MPI_ANY_TAG, any_comm, &st);
            break;
        case 1: {
            int count;
            MPI_Probe(MPI_ANY_SOURCE, MPI_ANY_TAG, any_comm, &st);
            MPI_Get_count(&st, MPI_UINT64_T, &count);
            MPI_Recv(in, count, MPI_UINT64_T, st.MPI_SOURCE, st.MPI_TAG, any_comm, &st);
            break;
        }
        case 2: {
            int flag = 0;
            while (!flag)
                MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, any_comm, &flag, &st);
            MPI_Recv(in, LARGE + 4, MPI_UINT64_T, st.MPI_SOURCE, st.MPI_TAG, any_comm, &st);
            break;
        }
        default: {
            MPI_Request r;
            MPI_Irecv(in, LARGE + 4, MPI_UINT64_T, MPI_ANY_SOURCE, MPI_ANY_TAG, any_comm, &r);
            MPI_Wait(&r, &st);
            break;
        }
        }
        check(in, &st, MPI_ANY_SOURCE);
    }
    MPI_Waitall(k, rq, MPI_STATUSES_IGNORE);
    for (int i = 0; i < k; i++)
        free(out[i]);
}

static int handled; /* calls of the counting error handler */

static void count_error(MPI_Comm *comm, int *code, ...)
{
    (void)comm;
    (void)code;
    handled++;
}

static void expect_truncated(int rc, const char *what)
{
    int klass = MPI_SUCCESS;
    MPI_Error_class(rc, &klass);
    if (klass != MPI_ERR_TRUNCATE || handled != 1) {
        fprintf(stderr, "stress: %s: error class %d, handler called %d times\n", what, klass,
                handled);
        fail(what, 0);
    }
}

/* Rank 1's receives of handoff's small messages (tags 43 to 46, ints 10 * tag + i). */
static void handoff_small(void)
{
    MPI_Datatype pair, quad;
    MPI_Type_contiguous(2, MPI_INT, &pair);
    MPI_Type_commit(&pair);
    MPI_Type_contiguous(4, MPI_INT, &quad);
    MPI_Type_commit(&quad);
    MPI_Status st;
    int got[8] = {0}, n = 0, elems = 0;
    /* 3 ints into 2 pairs: MPI writes all 3; the count is undefined, the elements 3. */
    MPI_Recv(got, 2, pair, 0, 43, MPI_COMM_WORLD, &st);
    MPI_Get_count(&st, pair, &n);
    MPI_Get_elements(&st, pair, &elems);
    if (got[0] != 430 || got[1] != 431 || got[2] != 432 || got[3] != 0 || n != MPI_UNDEFINED ||
        elems != 3)
        fail("a message ending in part of an element", 0);
    MPI_Request r;
    MPI_Irecv(got, 1, quad, 0, 44, MPI_COMM_WORLD, &r);
    MPI_Wait(&r, &st);
    MPI_Get_count(&st, quad, &n);
    MPI_Get_elements(&st, quad, &elems);
    if (got[0] != 440 || got[3] != 443 || n != 1 || elems != 4)
        fail("a message of a derived type: its count", 0);
    MPI_Errhandler counting;
    MPI_Comm_create_errhandler(count_error, &counting);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, counting);
    handled = 0;
    expect_truncated(MPI_Recv(got, 2, MPI_INT, 0, 45, MPI_COMM_WORLD, &st), "truncated Recv");
    MPI_Irecv(got, 2, MPI_INT, 0, 46, MPI_COMM_WORLD, &r);
    handled = 0;
    expect_truncated(MPI_Wait(&r, &st), "truncated Irecv + Wait");
    if (got[0] != 460 || got[1] != 461)
        fail("a truncated message's first ints", 0);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_ARE_FATAL);
    MPI_Errhandler_free(&counting);
    MPI_Type_free(&pair);
    MPI_Type_free(&quad);
}

static void handoff(void)
{
    if (iteration != 3 || np < 2)
        return;
    MPI_Request rq[3], small_rq[4];
    uint64_t *out[3] = {0};
    int small[4][4];
    if (me == 0) {
        for (int t = 0; t < 3; t++) {
            out[t] = malloc((LARGE + 4) * sizeof(uint64_t));
            int n = fill(out[t], 1, 40 + t);
            MPI_Isend(out[t], n, MPI_UINT64_T, 1, 40 + t, MPI_COMM_WORLD, &rq[t]);
        }
        for (int t = 0; t < 4; t++) {
            for (int i = 0; i < 4; i++)
                small[t][i] = 10 * (43 + t) + i;
            MPI_Isend(small[t], t == 0 ? 3 : 4, MPI_INT, 1, 43 + t, MPI_COMM_WORLD, &small_rq[t]);
        }
    }
#if MPI_VERSION >= 4
    /* MPI 4: a communicator made from a group, on which rank 0 sends before rank 1 has used
     * it (the cut must still drain it). */
    MPI_Group world_group;
    MPI_Comm from_group;
    MPI_Comm_group(MPI_COMM_WORLD, &world_group);
    MPI_Comm_create_from_group(world_group, "stress.handoff", MPI_INFO_NULL, MPI_ERRORS_ARE_FATAL,
                               &from_group);
    MPI_Group_free(&world_group);
    MPI_Request group_rq = MPI_REQUEST_NULL;
    int group_word = 4747;
    if (me == 0)
        MPI_Isend(&group_word, 1, MPI_INT, 1, 47, from_group, &group_rq);
#endif
    if (getenv("STRESS_RAISE_SIGUSR1") != NULL) {
        /* Every rank past its earlier traffic and rank 0's sends posted before any rank asks
         * for the cut: the layer's progress thread makes it at once, so it falls here. */
        MPI_Barrier(MPI_COMM_WORLD);
        raise(SIGUSR1);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    if (me == 1) {
        MPI_Status st;
        int flag = 0;
        /* Non-overtaking: the first message from rank 0 is tag 40. */
        MPI_Probe(0, MPI_ANY_TAG, MPI_COMM_WORLD, &st);
        if (st.MPI_TAG != 40)
            fail("probe did not report the first message", 0);
        while (!flag)
            MPI_Iprobe(0, 42, MPI_COMM_WORLD, &flag, &st);
        if (st.MPI_TAG != 42)
            fail("iprobe did not find tag 42", 0);
        MPI_Request r;
        MPI_Irecv(bufs[1], LARGE + 4, MPI_UINT64_T, 0, 40, MPI_COMM_WORLD, &r);
        MPI_Wait(&r, &st);
        check(bufs[1], &st, 0);
        MPI_Recv(bufs[1], LARGE + 4, MPI_UINT64_T, 0, MPI_ANY_TAG, MPI_COMM_WORLD, &st);
        if (st.MPI_TAG != 41)
            fail("ANY_TAG receive overtook", 0);
        check(bufs[1], &st, 0);
        MPI_Recv(bufs[1], LARGE + 4, MPI_UINT64_T, MPI_ANY_SOURCE, 42, MPI_COMM_WORLD, &st);
        check(bufs[1], &st, 0);
        handoff_small();
#if MPI_VERSION >= 4
        group_word = 0;
        MPI_Recv(&group_word, 1, MPI_INT, 0, 47, from_group, &st);
        if (group_word != 4747)
            fail("the message on a communicator made from a group", 0);
#endif
    }
#if MPI_VERSION >= 4
    MPI_Wait(&group_rq, MPI_STATUS_IGNORE);
    MPI_Comm_free(&from_group);
#endif
    if (me == 0) {
        MPI_Waitall(4, small_rq, MPI_STATUSES_IGNORE);
        MPI_Waitall(3, rq, MPI_STATUSES_IGNORE);
        for (int t = 0; t < 3; t++)
            free(out[t]);
    }
}

static void stall(void)
{
    int slow = (int)(iteration % (uint64_t)np);
    MPI_Status st;
    if (me == slow) {
        usleep(20000);
        for (int p = 0; p < np; p++)
            if (p != me) {
                int n = fill(bufs[0], p, 30);
                MPI_Send(bufs[0], n, MPI_UINT64_T, p, 30, MPI_COMM_WORLD);
            }
    } else {
        MPI_Recv(bufs[1], LARGE + 4, MPI_UINT64_T, slow, 30, MPI_COMM_WORLD, &st);
        check(bufs[1], &st, slow);
    }
    if (me == (slow + 1) % np)
        usleep(20000);
    MPI_Barrier(MPI_COMM_WORLD);
}

static void collective(void)
{
    enum { N = 64 };
    uint64_t v[N], r[N], a[N * MAXP], b[N * MAXP];
    for (int i = 0; i < N; i++)
        v[i] = word((uint64_t)me, 0, iteration, (uint64_t)i) >> 8;
    MPI_Allreduce(v, r, N, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
    for (int i = 0; i < N; i++) {
        uint64_t want = 0;
        for (int p = 0; p < np; p++)
            want += word((uint64_t)p, 0, iteration, (uint64_t)i) >> 8;
        if (r[i] != want)
            fail("Allreduce result", -1);
    }
    int root = (int)(iteration % (uint64_t)np);
    for (int i = 0; i < N; i++)
        r[i] = me == root ? word(99, (uint64_t)root, iteration, (uint64_t)i) : 0;
    MPI_Bcast(r, N, MPI_UINT64_T, root, MPI_COMM_WORLD);
    for (int i = 0; i < N; i++)
        if (r[i] != word(99, (uint64_t)root, iteration, (uint64_t)i))
            fail("Bcast result", root);
    for (int p = 0; p < np; p++)
        for (int i = 0; i < 4; i++)
            a[p * 4 + i] = word((uint64_t)me, (uint64_t)p, iteration, (uint64_t)i);
    MPI_Alltoall(a, 4, MPI_UINT64_T, b, 4, MPI_UINT64_T, MPI_COMM_WORLD);
    for (int p = 0; p < np; p++)
        for (int i = 0; i < 4; i++)
            if (b[p * 4 + i] != word((uint64_t)p, (uint64_t)me, iteration, (uint64_t)i))
                fail("Alltoall result", p);
    uint64_t one = (uint64_t)me + 1, sum = 0;
    MPI_Reduce(&one, &sum, 1, MPI_UINT64_T, MPI_SUM, root, MPI_COMM_WORLD);
    if (me == root && sum != (uint64_t)np * (uint64_t)(np + 1) / 2)
        fail("Reduce result", root);
    MPI_Allgather(&one, 1, MPI_UINT64_T, a, 1, MPI_UINT64_T, MPI_COMM_WORLD);
    for (int p = 0; p < np; p++)
        if (a[p] != (uint64_t)p + 1)
            fail("Allgather result", p);
    MPI_Barrier(MPI_COMM_WORLD);
}

/* ---- sub-communicators, persistent requests, matched probes, non-blocking collectives,
 * cancel: the transparent layer's wider coverage ------------------------------------------ */

static MPI_Comm half = MPI_COMM_NULL; /* MPI_Comm_split into two halves, remade now and then */
static int half_world[MAXP], half_rank, half_size;

static void make_half(void)
{
    /* Freed, or every other time disconnected (collective too, and it waits for the
     * communicator's traffic). */
    if (half != MPI_COMM_NULL && iteration % 8 == 0)
        MPI_Comm_disconnect(&half);
    else if (half != MPI_COMM_NULL)
        MPI_Comm_free(&half);
    MPI_Comm parent;
    /* Sometimes split a duplicate (a communicator made from a tracked one), sometimes WORLD. */
    if (iteration % 8 == 4) {
        MPI_Comm_dup(MPI_COMM_WORLD, &parent);
    } else {
        parent = MPI_COMM_WORLD;
    }
    MPI_Comm_split(parent, me < np / 2, me, &half);
    if (parent != MPI_COMM_WORLD)
        MPI_Comm_free(&parent);
    MPI_Comm_rank(half, &half_rank);
    MPI_Comm_size(half, &half_size);
    MPI_Group hg, wg;
    MPI_Comm_group(half, &hg);
    MPI_Comm_group(MPI_COMM_WORLD, &wg);
    int ranks[MAXP];
    for (int i = 0; i < half_size; i++)
        ranks[i] = i;
    MPI_Group_translate_ranks(hg, half_size, ranks, wg, half_world);
    MPI_Group_free(&hg);
    MPI_Group_free(&wg);
}

/* split: a ring on each half (blocking, then Irecv/Isend/Waitall), an Allreduce and a Bcast
 * on the halves; the halves are remade (freed and split again) every 4 iterations. */
static void split(void)
{
    if (half == MPI_COMM_NULL || iteration % 4 == 0)
        make_half();
    int right = (half_rank + 1) % half_size, left = (half_rank + half_size - 1) % half_size;
    MPI_Status st;
    if (half_size > 1) {
        if (half_rank % 2 == 0) {
            int n = fill(bufs[0], half_world[right], 50);
            MPI_Send(bufs[0], n, MPI_UINT64_T, right, 50, half);
            MPI_Recv(bufs[1], LARGE + 4, MPI_UINT64_T, left, 50, half, &st);
        } else {
            MPI_Recv(bufs[1], LARGE + 4, MPI_UINT64_T, left, 50, half, &st);
            int n = fill(bufs[0], half_world[right], 50);
            MPI_Send(bufs[0], n, MPI_UINT64_T, right, 50, half);
        }
        check_on(bufs[1], &st, half_world[left], half_world);
        MPI_Request rq[2];
        MPI_Status sts[2];
        MPI_Irecv(bufs[1], LARGE + 4, MPI_UINT64_T, MPI_ANY_SOURCE, 51, half, &rq[0]);
        int n = fill(bufs[0], half_world[right], 51);
        MPI_Isend(bufs[0], n, MPI_UINT64_T, right, 51, half, &rq[1]);
        MPI_Waitall(2, rq, sts);
        check_on(bufs[1], &sts[0], half_world[left], half_world);
    }
    uint64_t mine = (uint64_t)me + 1 + iteration, sum = 0, want = 0;
    MPI_Allreduce(&mine, &sum, 1, MPI_UINT64_T, MPI_SUM, half);
    for (int i = 0; i < half_size; i++)
        want += (uint64_t)half_world[i] + 1 + iteration;
    if (sum != want)
        fail("Allreduce on a half", -1);
    uint64_t b = half_rank == 0 ? word(7, (uint64_t)half_world[0], iteration, 1) : 0;
    MPI_Bcast(&b, 1, MPI_UINT64_T, 0, half);
    if (b != word(7, (uint64_t)half_world[0], iteration, 1))
        fail("Bcast on a half", half_world[0]);
}

/* A message of a fixed length (`words`, header included) to dst, for calls whose count the
 * sender and the receiver fix in advance (persistent requests, Sendrecv_replace). */
static void fill_fixed(uint64_t *b, int dst, int tag, int words)
{
    uint64_t seq = next_seq_to[dst]++;
    b[0] = (uint64_t)me;
    b[1] = (uint64_t)dst;
    b[2] = seq;
    b[3] = (uint64_t)tag;
    for (int i = 4; i < words; i++)
        b[i] = word((uint64_t)me, (uint64_t)dst, seq, (uint64_t)i);
    sent++;
}

static void check_fixed(const uint64_t *b, MPI_Status *st, int src, int tag, int words)
{
    int count = 0;
    MPI_Get_count(st, MPI_UINT64_T, &count);
    if (st->MPI_SOURCE != src || st->MPI_TAG != tag || count != words)
        fail("receive status", src);
    if (b[0] != (uint64_t)src || b[1] != (uint64_t)me || b[3] != (uint64_t)tag)
        fail("bad header", src);
    if (b[2] != next_seq_from[src])
        fail(b[2] < next_seq_from[src] ? "duplicated or reordered message" : "lost message", src);
    next_seq_from[src]++;
    for (int i = 4; i < words; i++)
        if (b[i] != word((uint64_t)src, (uint64_t)me, b[2], (uint64_t)i))
            fail("corrupted payload", src);
    received++;
}

/* compute and compute_nb: long phases without MPI calls (see the top). */
static double compute_ms = 5000;
static MPI_Comm quiet_comm; /* nobody sends on it: an MPI_Iprobe there never waits for a peer */
static double sink;

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

#ifdef SYMVIRT_EXPLICIT
static int quiet;                  /* STRESS_QUIET=1: compute phases are quiet phases */
static volatile int in_quiet;      /* inside one (read by the quiesce hook) */
static pthread_t main_thread;
/* compute_nb's receive, outstanding across the quiet phase: its buffer and sender. */
static const uint64_t *quiet_recv;
static int quiet_recv_from;
static void after_cut_point(int rc, const symvirt_interconnect *ic, const char *call);
#endif

/* Computes (no MPI call) for 2/3 to 4/3 of compute_ms, then times its first MPI call. `rq`:
 * the `nrq` requests outstanding across the phase (declared to a quiet phase). */
static void compute_phase(MPI_Request *rq, int nrq)
{
#ifdef SYMVIRT_EXPLICIT
    if (quiet) {
        in_quiet = 1; /* before: the library's thread may cut as soon as the phase begins */
        after_cut_point(symvirt_quiet_begin_requests(MPI_COMM_WORLD, nrq, rq), NULL,
                        "symvirt_quiet_begin_requests");
    }
#else
    (void)rq;
    (void)nrq;
#endif
    double ms = compute_ms * (double)(2 + (me + iteration) % 3) / 3.0;
    uint64_t until = now_ns() + (uint64_t)(ms * 1e6);
    double x = 1.0 + me;
    while (now_ns() < until)
        for (int i = 0; i < 20000; i++)
            x = x * 1.0000001 + 1e-9;
    sink += x;
    char path[4096];
    snprintf(path, sizeof path, "%s/entries-%d", dir, me);
    FILE *f = fopen(path, "a");
    if (f == NULL)
        fail("cannot write entries", -1);
    /* ENTER is on disk before the call: a test can see a rank inside a call a cut holds. */
    int flag = 0;
    fprintf(f, "%llu ", (unsigned long long)now_ns());
    fflush(f);
#ifdef SYMVIRT_EXPLICIT
    if (quiet) {
        symvirt_interconnect ic;
        int rc = symvirt_quiet_end(MPI_COMM_WORLD, &ic);
        in_quiet = 0;
        after_cut_point(rc, &ic, "symvirt_quiet_end");
    }
#endif
    MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, quiet_comm, &flag, MPI_STATUS_IGNORE);
    fprintf(f, "%llu\n", (unsigned long long)now_ns());
    fclose(f);
    if (flag)
        fail("a message on the quiet communicator", -1);
}

static void compute(void)
{
    compute_phase(NULL, 0);
}

static void compute_nb(void)
{
    int right = (me + 1) % np, left = (me + np - 1) % np;
    MPI_Request rq[2];
    MPI_Status st[2];
    MPI_Irecv(bufs[3], LARGE + 4, MPI_UINT64_T, left, 60, MPI_COMM_WORLD, &rq[0]);
    fill_fixed(bufs[2], right, 60, LARGE + 4);
    MPI_Isend(bufs[2], LARGE + 4, MPI_UINT64_T, right, 60, MPI_COMM_WORLD, &rq[1]);
#ifdef SYMVIRT_EXPLICIT
    quiet_recv = bufs[3];
    quiet_recv_from = left;
#endif
    compute_phase(rq, 2);
#ifdef SYMVIRT_EXPLICIT
    quiet_recv = NULL;
#endif
    MPI_Waitall(2, rq, st);
    check_fixed(bufs[3], &st[0], left, 60, LARGE + 4);
}

/* io: see the top. Collective MPI-IO calls, which communicate among the ranks inside the
 * call, with the file open across compute phases. */
#define IO_WORDS 4096
static MPI_File io_file = MPI_FILE_NULL;

static void io(void)
{
    static uint64_t block[IO_WORDS], back[IO_WORDS];
    if (io_file == MPI_FILE_NULL) {
        char path[4096];
        snprintf(path, sizeof path, "%s/io.dat", dir);
        if (MPI_File_open(MPI_COMM_WORLD, path, MPI_MODE_CREATE | MPI_MODE_RDWR, MPI_INFO_NULL,
                          &io_file) != MPI_SUCCESS)
            fail("MPI_File_open", -1);
    }
    int right = (me + 1) % np;
    for (int i = 0; i < IO_WORDS; i++)
        block[i] = word((uint64_t)me, (uint64_t)me, iteration, (uint64_t)i);
    const MPI_Offset bytes = IO_WORDS * sizeof(uint64_t);
    MPI_Status st;
    int rc;
    if (iteration % 4 == 3) {
        /* Each rank's view starts at its block: a plain write lands there. */
        rc = MPI_File_set_view(io_file, me * bytes, MPI_UINT64_T, MPI_UINT64_T, "native",
                               MPI_INFO_NULL);
        if (rc == MPI_SUCCESS)
            rc = MPI_File_write_all(io_file, block, IO_WORDS, MPI_UINT64_T, &st);
        if (rc == MPI_SUCCESS)
            rc = MPI_File_set_view(io_file, 0, MPI_BYTE, MPI_BYTE, "native", MPI_INFO_NULL);
    } else {
        rc = MPI_File_write_at_all(io_file, me * bytes, block, IO_WORDS, MPI_UINT64_T, &st);
    }
    /* sync, barrier, sync: the neighbour's writes are visible to this rank's reads. */
    if (rc == MPI_SUCCESS)
        rc = MPI_File_sync(io_file);
    if (rc == MPI_SUCCESS)
        rc = MPI_Barrier(MPI_COMM_WORLD);
    if (rc == MPI_SUCCESS)
        rc = MPI_File_sync(io_file);
    if (rc == MPI_SUCCESS)
        rc = MPI_File_read_at_all(io_file, right * bytes, back, IO_WORDS, MPI_UINT64_T, &st);
    if (rc != MPI_SUCCESS)
        fail("MPI-IO call failed", -1);
    for (int i = 0; i < IO_WORDS; i++)
        if (back[i] != word((uint64_t)right, (uint64_t)right, iteration, (uint64_t)i))
            fail("MPI-IO read back another block than the neighbour wrote", right);
}

/* replace: MPI_Sendrecv_replace around the ring (large messages every other iteration). */
static void replace(void)
{
    int right = (me + 1) % np, left = (me + np - 1) % np;
    int words = iteration % 2 ? LARGE + 4 : SMALL + 4;
    MPI_Status st;
    fill_fixed(bufs[2], right, 53, words);
    MPI_Sendrecv_replace(bufs[2], words, MPI_UINT64_T, right, 53, left, 53, MPI_COMM_WORLD, &st);
    check_fixed(bufs[2], &st, left, 53, words);
}

/* isendrecv: MPI 4's non-blocking Sendrecv and Sendrecv_replace (see the top). */
static void isendrecv(void)
{
#if MPI_VERSION >= 4
    int right = (me + 1) % np, left = (me + np - 1) % np;
    MPI_Request rq[3];
    MPI_Status st[3];
    int n = fill(bufs[0], right, 56);
    MPI_Isend(bufs[0], n, MPI_UINT64_T, right, 56, MPI_COMM_WORLD, &rq[0]);
    if (iteration == 3 && getenv("STRESS_RAISE_SIGUSR1") != NULL) {
        MPI_Barrier(MPI_COMM_WORLD); /* every rank's message to the right is out */
        raise(SIGUSR1);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    n = fill(bufs[2], right, 57);
    MPI_Isendrecv(bufs[2], n, MPI_UINT64_T, right, 57, bufs[1], LARGE + 4, MPI_UINT64_T, left, 56,
                  MPI_COMM_WORLD, &rq[1]);
    MPI_Irecv(bufs[3], LARGE + 4, MPI_UINT64_T, left, 57, MPI_COMM_WORLD, &rq[2]);
    if (iteration % 3 == 0) {
        MPI_Waitall(3, rq, st);
    } else if (iteration % 3 == 1) {
        int done = 0;
        while (!done)
            MPI_Testall(3, rq, &done, st);
    } else {
        for (int k = 0; k < 3; k++) {
            int i;
            MPI_Status one;
            MPI_Waitany(3, rq, &i, &one);
            st[i] = one;
        }
    }
    if (st[1].MPI_TAG != 56)
        fail("MPI_Isendrecv's status is not its receive's", left);
    check(bufs[1], &st[1], left);
    check(bufs[3], &st[2], left);
    /* Through a datatype of the program's, freed while the call is pending (legal). */
    int words = iteration % 2 ? LARGE + 4 : SMALL + 4;
    MPI_Request r;
    MPI_Datatype block;
    MPI_Type_contiguous(words, MPI_UINT64_T, &block);
    MPI_Type_commit(&block);
    fill_fixed(bufs[4], right, 58, words);
    MPI_Isendrecv_replace(bufs[4], 1, block, right, 58, left, 58, MPI_COMM_WORLD, &r);
    MPI_Type_free(&block);
    if (iteration % 2 == 0) {
        MPI_Wait(&r, &st[0]);
    } else {
        int done = 0;
        while (!done)
            MPI_Test(&r, &done, &st[0]);
    }
    check_fixed(bufs[4], &st[0], left, 58, words);
    /* An Isendrecv used as a send (its receive from MPI_PROC_NULL) whose request the program
     * frees at once (legal: it still completes); the neighbour receives the message. */
    n = fill(bufs[5], right, 59);
    MPI_Isendrecv(bufs[5], n, MPI_UINT64_T, right, 59, NULL, 0, MPI_UINT64_T, MPI_PROC_NULL, 59,
                  MPI_COMM_WORLD, &r);
    MPI_Request_free(&r);
    MPI_Recv(bufs[6], LARGE + 4, MPI_UINT64_T, left, 59, MPI_COMM_WORLD, &st[0]);
    check(bufs[6], &st[0], left);
    MPI_Barrier(MPI_COMM_WORLD); /* every freed send has been received: bufs[5] is free */
    /* A communicator from MPI_Comm_idup_with_info, made while ring traffic goes on, carries
     * counted, checked messages like any other; the program frees its info at once. */
    MPI_Comm dup;
    MPI_Request made;
    MPI_Info info;
    MPI_Info_create(&info);
    MPI_Info_set(info, "mpi_assert_no_any_tag", "false");
    MPI_Comm_idup_with_info(MPI_COMM_WORLD, info, &dup, &made);
    MPI_Info_free(&info);
    ring_nb();
    MPI_Wait(&made, MPI_STATUS_IGNORE);
    ring_nb_on(dup, 13);
    MPI_Comm_free(&dup);
#else
    fail("mode isendrecv needs MPI 4 (MPI_Isendrecv)", -1);
#endif
}

/* large_count: MPI 4's _c forms (see the top). */
static void large_count(void)
{
#if MPI_VERSION >= 4
    int right = (me + 1) % np, left = (me + np - 1) % np;
    MPI_Status st[2];
    MPI_Request rq[2];
    MPI_Count n;
    /* Even ranks send with MPI_Send_c and receive with MPI_Recv, odd ranks the other way
     * round: every message goes between a _c call and an int one, so counting either alone
     * would not balance. */
    if (me % 2 == 0) {
        n = fill(bufs[0], right, 60);
        MPI_Send_c(bufs[0], n, MPI_UINT64_T, right, 60, MPI_COMM_WORLD);
        MPI_Recv(bufs[1], LARGE + 4, MPI_UINT64_T, left, 60, MPI_COMM_WORLD, &st[0]);
    } else {
        MPI_Recv_c(bufs[1], LARGE + 4, MPI_UINT64_T, left, 60, MPI_COMM_WORLD, &st[0]);
        n = fill(bufs[0], right, 60);
        MPI_Send(bufs[0], (int)n, MPI_UINT64_T, right, 60, MPI_COMM_WORLD);
    }
    check(bufs[1], &st[0], left);
    MPI_Irecv_c(bufs[1], LARGE + 4, MPI_UINT64_T, left, 61, MPI_COMM_WORLD, &rq[0]);
    n = fill(bufs[0], right, 61);
    MPI_Isend_c(bufs[0], n, MPI_UINT64_T, right, 61, MPI_COMM_WORLD, &rq[1]);
    MPI_Waitall(2, rq, st);
    check(bufs[1], &st[0], left);
    n = fill(bufs[0], right, 62);
    MPI_Sendrecv_c(bufs[0], n, MPI_UINT64_T, right, 62, bufs[1], LARGE + 4, MPI_UINT64_T, left,
                   62, MPI_COMM_WORLD, &st[0]);
    check(bufs[1], &st[0], left);
    n = fill(bufs[0], right, 63);
    MPI_Isendrecv_c(bufs[0], n, MPI_UINT64_T, right, 63, bufs[1], LARGE + 4, MPI_UINT64_T, left,
                    63, MPI_COMM_WORLD, &rq[0]);
    MPI_Wait(&rq[0], &st[0]);
    check(bufs[1], &st[0], left);
    MPI_Message msg;
    n = fill(bufs[0], right, 64);
    MPI_Isend_c(bufs[0], n, MPI_UINT64_T, right, 64, MPI_COMM_WORLD, &rq[1]);
    MPI_Mprobe(left, 64, MPI_COMM_WORLD, &msg, &st[0]);
    MPI_Mrecv_c(bufs[1], LARGE + 4, MPI_UINT64_T, &msg, &st[0]);
    MPI_Wait(&rq[1], MPI_STATUS_IGNORE);
    check(bufs[1], &st[0], left);

    enum { N = 16 };
    uint64_t v[N], r[N], a[MAXP * 2], b[MAXP * 2], g[MAXP * 3];
    for (int i = 0; i < N; i++)
        v[i] = word((uint64_t)me, 5, iteration, (uint64_t)i) >> 8;
    MPI_Allreduce_c(v, r, N, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
    for (int i = 0; i < N; i++) {
        uint64_t want = 0;
        for (int p = 0; p < np; p++)
            want += word((uint64_t)p, 5, iteration, (uint64_t)i) >> 8;
        if (r[i] != want)
            fail("Allreduce_c result", -1);
    }
    int root = (int)(iteration % (uint64_t)np);
    for (int i = 0; i < N; i++)
        r[i] = me == root ? word(98, (uint64_t)root, iteration, (uint64_t)i) : 0;
    MPI_Bcast_c(r, N, MPI_UINT64_T, root, MPI_COMM_WORLD);
    for (int i = 0; i < N; i++)
        if (r[i] != word(98, (uint64_t)root, iteration, (uint64_t)i))
            fail("Bcast_c result", root);
    /* Alltoallv_c: two words to every peer; Iallgatherv_c: rank p gives p % 3 + 1 words. */
    MPI_Count sc[MAXP], rc_[MAXP], gc[MAXP];
    MPI_Aint sd[MAXP], rd[MAXP], gd[MAXP];
    MPI_Aint at = 0;
    for (int p = 0; p < np; p++) {
        sc[p] = rc_[p] = 2;
        sd[p] = rd[p] = 2 * p;
        a[2 * p] = word((uint64_t)me, (uint64_t)p, iteration, 7);
        a[2 * p + 1] = word((uint64_t)me, (uint64_t)p, iteration, 8);
        gc[p] = p % 3 + 1;
        gd[p] = at;
        at += gc[p];
    }
    MPI_Alltoallv_c(a, sc, sd, MPI_UINT64_T, b, rc_, rd, MPI_UINT64_T, MPI_COMM_WORLD);
    for (int p = 0; p < np; p++)
        if (b[2 * p] != word((uint64_t)p, (uint64_t)me, iteration, 7) ||
            b[2 * p + 1] != word((uint64_t)p, (uint64_t)me, iteration, 8))
            fail("Alltoallv_c result", p);
    uint64_t mine[3];
    for (int i = 0; i < 3; i++)
        mine[i] = word((uint64_t)me, 9, iteration, (uint64_t)i);
    MPI_Request gr;
    MPI_Iallgatherv_c(mine, gc[me], MPI_UINT64_T, g, gc, gd, MPI_UINT64_T, MPI_COMM_WORLD, &gr);
    MPI_Wait(&gr, MPI_STATUS_IGNORE);
    for (int p = 0; p < np; p++)
        for (int i = 0; i < gc[p]; i++)
            if (g[gd[p] + i] != word((uint64_t)p, 9, iteration, (uint64_t)i))
                fail("Iallgatherv_c result", p);
#else
    fail("mode large_count needs MPI 4 (the _c calls)", -1);
#endif
}

/* persist: persistent sends and receives to both ring neighbours, made once on a duplicate of
 * WORLD; each iteration starts the sends, sometimes waits in a barrier (a cut there drains
 * the neighbours' messages, so the receives' Start must find them in the layer's buffer),
 * starts the receives, completes all with Waitall, Testall, Waitany or Wait. */
static MPI_Comm pers_comm;
static MPI_Request pers_req[4];
static uint64_t *pers_buf[4];

static void persist(void)
{
    int right = (me + 1) % np, left = (me + np - 1) % np;
    int peer[2] = {left, right};
    if (pers_buf[0] == NULL) {
        MPI_Comm_dup(MPI_COMM_WORLD, &pers_comm);
        for (int i = 0; i < 4; i++)
            pers_buf[i] = malloc((LARGE + 4) * sizeof(uint64_t));
        /* receives 0, 1 from left and right (tag 60 + direction); sends 2, 3 to them */
        for (int d = 0; d < 2; d++) {
            MPI_Recv_init(pers_buf[d], LARGE + 4, MPI_UINT64_T, peer[d], 60 + d, pers_comm,
                          &pers_req[d]);
            MPI_Send_init(pers_buf[2 + d], LARGE + 4, MPI_UINT64_T, peer[d], 61 - d, pers_comm,
                          &pers_req[2 + d]);
        }
    }
    /* A persistent send always sends its full count: the payload's length is fixed here. */
    for (int d = 0; d < 2; d++)
        fill_fixed(pers_buf[2 + d], peer[d], 61 - d, LARGE + 4);
    MPI_Startall(2, &pers_req[2]);
    if (iteration % 2 == 0)
        MPI_Barrier(MPI_COMM_WORLD);
    MPI_Startall(2, &pers_req[0]);
    MPI_Status st[4];
    switch (iteration % 4) {
    case 0:
    case 1:
        MPI_Waitall(4, pers_req, st);
        break;
    case 2: {
        int done = 0;
        while (!done)
            MPI_Testall(4, pers_req, &done, st);
        break;
    }
    default:
        for (int k = 0; k < 4; k++) {
            int idx;
            MPI_Status s;
            MPI_Waitany(4, pers_req, &idx, &s);
            if (idx == MPI_UNDEFINED)
                fail("Waitany found no active persistent request", -1);
            st[idx] = s;
        }
    }
    for (int d = 0; d < 2; d++)
        check_fixed(pers_buf[d], &st[d], peer[d], 60 + d, LARGE + 4);
}

static void persist_free(void)
{
    if (pers_buf[0] == NULL)
        return;
    for (int i = 0; i < 4; i++) {
        MPI_Request_free(&pers_req[i]);
        free(pers_buf[i]);
    }
    MPI_Comm_free(&pers_comm);
}

/* mprobe: every rank sends to every peer (tags 70..72), receives with ANY_SOURCE/ANY_TAG
 * through Mprobe+Mrecv, Improbe+Imrecv+Wait, or Mprobe, another MPI call (where a cut may
 * land: the matched message is then drained under its handle), Mrecv. */
static MPI_Comm mp_comm;

static void mprobe(void)
{
    enum { PER_PEER = 3 };
    if (mp_comm == MPI_COMM_NULL)
        MPI_Comm_dup(MPI_COMM_WORLD, &mp_comm);
    MPI_Request rq[PER_PEER * MAXP];
    uint64_t *out[PER_PEER * MAXP];
    int k = 0;
    for (int r = 0; r < PER_PEER; r++)
        for (int p = 0; p < np; p++)
            if (p != me) {
                out[k] = malloc((LARGE + 4) * sizeof(uint64_t));
                int n = fill(out[k], p, 70 + r);
                MPI_Isend(out[k], n, MPI_UINT64_T, p, 70 + r, mp_comm, &rq[k]);
                k++;
            }
    uint64_t *in = bufs[1];
    for (int m = 0; m < PER_PEER * (np - 1); m++) {
        MPI_Status st;
        MPI_Message msg;
        int count = 0;
        switch ((iteration + (uint64_t)m) % 3) {
        case 0:
            MPI_Mprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, mp_comm, &msg, &st);
            MPI_Get_count(&st, MPI_UINT64_T, &count);
            MPI_Mrecv(in, count, MPI_UINT64_T, &msg, &st);
            break;
        case 1: {
            int flag = 0;
            while (!flag)
                MPI_Improbe(MPI_ANY_SOURCE, MPI_ANY_TAG, mp_comm, &flag, &msg, &st);
            MPI_Request r;
            MPI_Imrecv(in, LARGE + 4, MPI_UINT64_T, &msg, &r);
            MPI_Wait(&r, &st);
            break;
        }
        default: {
            MPI_Mprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, mp_comm, &msg, &st);
            int src = st.MPI_SOURCE, tag = st.MPI_TAG;
            /* progress calls between the probe and the receive; a cut may land here */
            for (int i = 0; i < 50; i++) {
                int flag = 0;
                MPI_Iprobe(MPI_ANY_SOURCE, 99, MPI_COMM_WORLD, &flag, MPI_STATUS_IGNORE);
                if (flag)
                    fail("a message nobody sent", -1);
            }
            MPI_Mrecv(in, LARGE + 4, MPI_UINT64_T, &msg, &st);
            if (st.MPI_SOURCE != src || st.MPI_TAG != tag)
                fail("Mrecv received another message than Mprobe matched", src);
            if (msg != MPI_MESSAGE_NULL)
                fail("Mrecv left the message handle set", src);
        }
        }
        check_on(in, &st, MPI_ANY_SOURCE, NULL);
    }
    MPI_Waitall(k, rq, MPI_STATUSES_IGNORE);
    for (int i = 0; i < k; i++)
        free(out[i]);
}

/* nbcoll: Iallreduce on WORLD and Ibcast on a half, completed while ring traffic goes on;
 * Ibarrier completed by a Test loop. */
static void nbcoll(void)
{
    if (half == MPI_COMM_NULL)
        make_half();
    uint64_t v = word((uint64_t)me, 1, iteration, 2) >> 8, sum = 0, want = 0;
    MPI_Request c[3];
    MPI_Iallreduce(&v, &sum, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD, &c[0]);
    uint64_t b = half_rank == 0 ? word(8, (uint64_t)half_world[0], iteration, 3) : 0;
    MPI_Ibcast(&b, 1, MPI_UINT64_T, 0, half, &c[1]);
    MPI_Comm dup;
    MPI_Comm_idup(MPI_COMM_WORLD, &dup, &c[2]);
    ring_nb();
    MPI_Waitall(3, c, MPI_STATUSES_IGNORE);
    /* The new communicator carries counted, checked messages like any other. */
    ring_nb_on(dup, 12);
    MPI_Comm_free(&dup);
    for (int p = 0; p < np; p++)
        want += word((uint64_t)p, 1, iteration, 2) >> 8;
    if (sum != want)
        fail("Iallreduce result", -1);
    if (b != word(8, (uint64_t)half_world[0], iteration, 3))
        fail("Ibcast result", half_world[0]);
    MPI_Request r;
    int done = 0;
    MPI_Ibarrier(MPI_COMM_WORLD, &r);
    while (!done)
        MPI_Test(&r, &done, MPI_STATUS_IGNORE);
}

/* nbfree's operation: a sum. */
static void sum_words(void *in, void *inout, int *len, MPI_Datatype *dt)
{
    (void)dt;
    for (int i = 0; i < *len; i++)
        ((uint64_t *)inout)[i] += ((const uint64_t *)in)[i];
}

/* nbfree: see the top. */
static void nbfree(void)
{
    enum { N = 8 };
    uint64_t b[N], v = (uint64_t)me + iteration, sum = 0, want = 0;
    for (int i = 0; i < N; i++)
        b[i] = me == 0 ? word(97, 0, iteration, (uint64_t)i) : 0;
    MPI_Datatype block;
    MPI_Op op;
    MPI_Request rq[2];
    MPI_Type_contiguous(N, MPI_UINT64_T, &block);
    MPI_Type_commit(&block);
    MPI_Op_create(sum_words, 1, &op);
    if (me != 0)
        MPI_Recv(NULL, 0, MPI_BYTE, 0, 70, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    MPI_Ibcast(b, 1, block, 0, MPI_COMM_WORLD, &rq[0]);
    MPI_Iallreduce(&v, &sum, 1, MPI_UINT64_T, op, MPI_COMM_WORLD, &rq[1]);
    MPI_Type_free(&block);
    MPI_Op_free(&op);
    if (block != MPI_DATATYPE_NULL || op != MPI_OP_NULL)
        fail("a freed handle was not set to null", -1);
    if (me == 0)
        for (int p = 1; p < np; p++)
            MPI_Send(NULL, 0, MPI_BYTE, p, 70, MPI_COMM_WORLD);
    MPI_Waitall(2, rq, MPI_STATUSES_IGNORE);
    for (int i = 0; i < N; i++)
        if (b[i] != word(97, 0, iteration, (uint64_t)i))
            fail("Ibcast result through a freed datatype", 0);
    for (int p = 0; p < np; p++)
        want += (uint64_t)p + iteration;
    if (sum != want)
        fail("Iallreduce result through a freed operation", -1);
}

/* nbx: see the top. Every NBX message is received before any rank leaves the Ibarrier, but a
 * rank may start the next exchange while a peer is still in another mode: nbx_comm. */
static void nbx(void)
{
    MPI_Request sends[MAXP];
    uint64_t *out[MAXP];
    int k = 0;
    for (int p = 0; p < np; p++)
        if (p != me && word((uint64_t)me, (uint64_t)p, iteration, 9) % 3 != 0) {
            out[k] = malloc((LARGE + 4) * sizeof(uint64_t));
            int n = fill(out[k], p, 50);
            MPI_Issend(out[k], n, MPI_UINT64_T, p, 50, nbx_comm, &sends[k]);
            k++;
        }
    uint64_t *in = bufs[1];
    MPI_Request barrier = MPI_REQUEST_NULL;
    int in_barrier = 0, done = 0;
    while (!done) {
        int flag = 0;
        MPI_Status st;
        MPI_Iprobe(MPI_ANY_SOURCE, 50, nbx_comm, &flag, &st);
        if (flag) {
            MPI_Recv(in, LARGE + 4, MPI_UINT64_T, st.MPI_SOURCE, 50, nbx_comm, &st);
            check(in, &st, st.MPI_SOURCE);
        }
        if (in_barrier) {
            MPI_Test(&barrier, &done, MPI_STATUS_IGNORE);
        } else {
            int all = 0;
            MPI_Testall(k, sends, &all, MPI_STATUSES_IGNORE);
            if (all) {
                MPI_Ibarrier(nbx_comm, &barrier);
                in_barrier = 1;
            }
        }
    }
    for (int i = 0; i < k; i++)
        free(out[i]);
}

/* vcoll: see the top. Values are word(source, destination or kind, iteration, k) so every
 * rank can compute what it must receive. */
static MPI_Comm cart = MPI_COMM_NULL;

static uint64_t val(int src, int dst, int k)
{
    return word((uint64_t)src, (uint64_t)dst, iteration, (uint64_t)k) >> 8;
}

static void expect(uint64_t got, uint64_t want, const char *what, int peer)
{
    if (got != want)
        fail(what, peer);
}

static void vcoll(void)
{
    if (cart == MPI_COMM_NULL) {
        int dims[1] = {np}, periods[1] = {1};
        MPI_Cart_create(MPI_COMM_WORLD, 1, dims, periods, 0, &cart);
    }
    int left = (me + np - 1) % np, right = (me + 1) % np; /* no reordering: WORLD ranks */
    /* Neighbors of a 1-D cartesian communicator: left (-1) first, then right (+1). */
    uint64_t mine = val(me, 0, 1), got[2];
    MPI_Neighbor_allgather(&mine, 1, MPI_UINT64_T, got, 1, MPI_UINT64_T, cart);
    expect(got[0], val(left, 0, 1), "Neighbor_allgather from the left", left);
    expect(got[1], val(right, 0, 1), "Neighbor_allgather from the right", right);
    uint64_t out[2] = {val(me, 0, 2), val(me, 1, 2)}, in[2];
    MPI_Neighbor_alltoall(out, 1, MPI_UINT64_T, in, 1, MPI_UINT64_T, cart);
    expect(in[0], val(left, 1, 2), "Neighbor_alltoall from the left", left);
    expect(in[1], val(right, 0, 2), "Neighbor_alltoall from the right", right);

    enum { K = 7 };
    MPI_Request rq[K];
    uint64_t nout[2] = {val(me, 0, 3), val(me, 1, 3)}, nin[2];
    MPI_Ineighbor_alltoall(nout, 1, MPI_UINT64_T, nin, 1, MPI_UINT64_T, cart, &rq[0]);
    /* Ialltoallv: 1 or 2 words between each pair */
    int sc[MAXP], sd[MAXP], rc[MAXP], rd[MAXP], n_out = 0, n_in = 0;
    for (int p = 0; p < np; p++) {
        sc[p] = rc[p] = 1 + (me + p) % 2;
        sd[p] = n_out;
        rd[p] = n_in;
        n_out += sc[p];
        n_in += rc[p];
    }
    uint64_t a_out[2 * MAXP], a_in[2 * MAXP];
    for (int p = 0; p < np; p++)
        for (int j = 0; j < sc[p]; j++)
            a_out[sd[p] + j] = val(me, p, 10 + j);
    MPI_Ialltoallv(a_out, sc, sd, MPI_UINT64_T, a_in, rc, rd, MPI_UINT64_T, MPI_COMM_WORLD,
                   &rq[1]);
    /* Iallgatherv: rank p gives p % 3 + 1 words */
    int gc[MAXP], gd[MAXP], total = 0;
    for (int p = 0; p < np; p++) {
        gc[p] = p % 3 + 1;
        gd[p] = total;
        total += gc[p];
    }
    uint64_t g_out[3], g_in[3 * MAXP];
    for (int j = 0; j < gc[me]; j++)
        g_out[j] = val(me, 0, 20 + j);
    MPI_Iallgatherv(g_out, gc[me], MPI_UINT64_T, g_in, gc, gd, MPI_UINT64_T, MPI_COMM_WORLD,
                    &rq[2]);
    /* Igatherv to rank 0 and Iscatterv from rank np - 1, same layout */
    uint64_t v_in[3 * MAXP];
    MPI_Igatherv(g_out, gc[me], MPI_UINT64_T, v_in, gc, gd, MPI_UINT64_T, 0, MPI_COMM_WORLD,
                 &rq[3]);
    uint64_t s_out[3 * MAXP], s_in[3];
    if (me == np - 1)
        for (int p = 0; p < np; p++)
            for (int j = 0; j < gc[p]; j++)
                s_out[gd[p] + j] = val(me, p, 30 + j);
    MPI_Iscatterv(s_out, gc, gd, MPI_UINT64_T, s_in, gc[me], MPI_UINT64_T, np - 1,
                  MPI_COMM_WORLD, &rq[4]);
    /* Ireduce_scatter: one word per rank, summed; Iexscan: sum over lower ranks */
    int ones[MAXP];
    uint64_t r_out[MAXP], r_in, x_out = val(me, 0, 40), x_in = 0;
    for (int p = 0; p < np; p++) {
        ones[p] = 1;
        r_out[p] = val(me, p, 41);
    }
    MPI_Ireduce_scatter(r_out, &r_in, ones, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD, &rq[5]);
    MPI_Iexscan(&x_out, &x_in, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD, &rq[6]);
    ring_nb();
    MPI_Waitall(K, rq, MPI_STATUSES_IGNORE);

    expect(nin[0], val(left, 1, 3), "Ineighbor_alltoall from the left", left);
    expect(nin[1], val(right, 0, 3), "Ineighbor_alltoall from the right", right);
    for (int p = 0; p < np; p++)
        for (int j = 0; j < rc[p]; j++)
            expect(a_in[rd[p] + j], val(p, me, 10 + j), "Ialltoallv", p);
    for (int p = 0; p < np; p++)
        for (int j = 0; j < gc[p]; j++) {
            expect(g_in[gd[p] + j], val(p, 0, 20 + j), "Iallgatherv", p);
            if (me == 0)
                expect(v_in[gd[p] + j], val(p, 0, 20 + j), "Igatherv", p);
        }
    for (int j = 0; j < gc[me]; j++)
        expect(s_in[j], val(np - 1, me, 30 + j), "Iscatterv", np - 1);
    uint64_t sum = 0, below = 0;
    for (int p = 0; p < np; p++) {
        sum += val(p, me, 41);
        if (p < me)
            below += val(p, 0, 40);
    }
    expect(r_in, sum, "Ireduce_scatter", -1);
    if (me > 0)
        expect(x_in, below, "Iexscan", -1);
}

/* cancel: a receive that nothing matches is cancelled (MPI_Test_cancelled says so); a message
 * sent before a barrier (a cut there drains it) is received by an Irecv that is then cancelled:
 * it is either delivered (not cancelled) or received again, never lost or duplicated. */
static void cancel(void)
{
    int right = (me + 1) % np, left = (me + np - 1) % np;
    MPI_Request r;
    MPI_Status st;
    int cancelled = 0;
    MPI_Irecv(bufs[1], 4, MPI_UINT64_T, left, 81, MPI_COMM_WORLD, &r);
    MPI_Cancel(&r);
    MPI_Wait(&r, &st);
    MPI_Test_cancelled(&st, &cancelled);
    if (!cancelled)
        fail("a receive nothing matches was not cancelled", left);
    int n = fill(bufs[0], right, 80);
    MPI_Request s;
    MPI_Isend(bufs[0], n, MPI_UINT64_T, right, 80, MPI_COMM_WORLD, &s);
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Irecv(bufs[1], LARGE + 4, MPI_UINT64_T, left, 80, MPI_COMM_WORLD, &r);
    MPI_Cancel(&r);
    MPI_Wait(&r, &st);
    MPI_Test_cancelled(&st, &cancelled);
    if (cancelled)
        MPI_Recv(bufs[1], LARGE + 4, MPI_UINT64_T, left, 80, MPI_COMM_WORLD, &st);
    check(bufs[1], &st, left);
    MPI_Wait(&s, MPI_STATUS_IGNORE);
}

static MPI_Request pcoll_req[3] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL, MPI_REQUEST_NULL};
static MPI_Comm pcoll_comm = MPI_COMM_NULL;
static uint64_t *pcoll_bcast;
/* Two communicators made by MPI_Comm_create_group over all of WORLD with one tag, and a
 * persistent barrier on each (see pcoll). */
static MPI_Comm pcoll_group_comm[2] = {MPI_COMM_NULL, MPI_COMM_NULL};
static MPI_Request pcoll_group_req[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};

static void pcoll(void)
{
#if MPI_VERSION >= 4
    enum { WORDS = LARGE + 4, N = 4 };
    static uint64_t pcoll_in[4], pcoll_out[4]; /* the requests name them */
    int root = 1 % np, slow = (int)(iteration % (uint64_t)np);
    int right = (me + 1) % np, left = (me + np - 1) % np;
    if (pcoll_comm == MPI_COMM_NULL) {
        MPI_Comm_dup(MPI_COMM_WORLD, &pcoll_comm);
        pcoll_bcast = malloc(WORDS * sizeof *pcoll_bcast);
        MPI_Allreduce_init(pcoll_in, pcoll_out, 4, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD,
                           MPI_INFO_NULL, &pcoll_req[0]);
        MPI_Bcast_init(pcoll_bcast, WORDS, MPI_UINT64_T, root, pcoll_comm, MPI_INFO_NULL,
                       &pcoll_req[1]);
        MPI_Barrier_init(MPI_COMM_WORLD, MPI_INFO_NULL, &pcoll_req[2]);
        MPI_Group all;
        MPI_Comm_group(MPI_COMM_WORLD, &all);
        for (int k = 0; k < 2; k++) {
            MPI_Comm_create_group(MPI_COMM_WORLD, all, 95, &pcoll_group_comm[k]);
            MPI_Barrier_init(pcoll_group_comm[k], MPI_INFO_NULL, &pcoll_group_req[k]);
        }
        MPI_Group_free(&all);
    }
    /* Even ranks start both; odd ranks start the second, wait for it, then start the first
     * (legal: the even ranks started both). */
    if (me % 2 == 0) {
        MPI_Start(&pcoll_group_req[0]);
        MPI_Start(&pcoll_group_req[1]);
    } else {
        MPI_Start(&pcoll_group_req[1]);
        MPI_Wait(&pcoll_group_req[1], MPI_STATUS_IGNORE);
        MPI_Start(&pcoll_group_req[0]);
    }
    for (int i = 0; i < 4; i++)
        pcoll_in[i] = (uint64_t)me * 1000 + iteration + (uint64_t)i;
    for (int i = 0; i < WORDS; i++)
        pcoll_bcast[i] = me == root ? word((uint64_t)root, 99, iteration, (uint64_t)i) : 0;
    if (me == slow)
        usleep(20000);
    /* MPI 4 lets ranks start persistent collectives in different orders: odd ranks start
     * the Bcast first; the slow rank starts the Barrier_init's request after a blocking
     * barrier on WORLD, the others before it. */
    if (me % 2 == 0) {
        MPI_Start(&pcoll_req[0]);
        MPI_Start(&pcoll_req[1]);
    } else {
        MPI_Startall(2, (MPI_Request[]){pcoll_req[1], pcoll_req[0]});
    }
    if (me != slow)
        MPI_Start(&pcoll_req[2]);
    MPI_Barrier(MPI_COMM_WORLD);
    if (me == slow)
        MPI_Start(&pcoll_req[2]);
    /* With a receive and its send in the same completion calls (statuses checked). */
    MPI_Request rq[N] = {pcoll_req[0], pcoll_req[1], pcoll_req[2]}, send;
    MPI_Irecv(bufs[1], LARGE + 4, MPI_UINT64_T, left, 87, MPI_COMM_WORLD, &rq[3]);
    int n = fill(bufs[0], right, 87);
    MPI_Isend(bufs[0], n, MPI_UINT64_T, right, 87, MPI_COMM_WORLD, &send);
    MPI_Status st[N], recv_st;
    int seen[N] = {0, 0, 0, 0}, idx[N], done = 0, flag = 0;
    switch (iteration % 5) {
    case 0:
        MPI_Waitall(N, rq, st);
        recv_st = st[3];
        break;
    case 1:
        while (!flag)
            MPI_Testall(N, rq, &flag, st);
        recv_st = st[3];
        break;
    case 2:
        for (int k = 0; k <= N; k++) {
            int i;
            MPI_Status one;
            MPI_Waitany(N, rq, &i, &one);
            if (k == N ? i != MPI_UNDEFINED : i < 0 || i >= N || seen[i]++)
                fail("MPI_Waitany over persistent collectives and a receive", i);
            if (i == 3)
                recv_st = one;
        }
        break;
    case 3:
        while (done < N) {
            int got = 0;
            MPI_Waitsome(N, rq, &got, idx, st);
            if (got == MPI_UNDEFINED || got < 1)
                fail("MPI_Waitsome over persistent collectives and a receive", got);
            for (int k = 0; k < got; k++) {
                if (idx[k] < 0 || idx[k] >= N || seen[idx[k]]++)
                    fail("MPI_Waitsome index", idx[k]);
                if (idx[k] == 3)
                    recv_st = st[k];
            }
            done += got;
        }
        break;
    default:
        for (int k = N - 1; k >= 0; k--)
            for (flag = 0; !flag;)
                MPI_Test(&rq[k], &flag, k == 3 ? &recv_st : MPI_STATUS_IGNORE);
    }
    for (int i = 0; i < 3; i++)
        if (rq[i] != pcoll_req[i])
            fail("a persistent request's handle changed", i);
    MPI_Waitall(2, pcoll_group_req, MPI_STATUSES_IGNORE);
    if (rq[3] != MPI_REQUEST_NULL)
        fail("a completed receive's handle is not null", left);
    check(bufs[1], &recv_st, left);
    MPI_Wait(&send, MPI_STATUS_IGNORE);
    for (int i = 0; i < 4; i++) {
        uint64_t want = 0;
        for (int p = 0; p < np; p++)
            want += (uint64_t)p * 1000 + iteration + (uint64_t)i;
        expect(pcoll_out[i], want, "persistent Allreduce", -1);
    }
    for (int i = 0; i < WORDS; i++)
        if (pcoll_bcast[i] != word((uint64_t)root, 99, iteration, (uint64_t)i))
            fail("persistent Bcast payload", root);
#else
    fail("mode pcoll needs MPI 4 (persistent collectives)", -1);
#endif
}

static void pcoll_free(void)
{
    if (pcoll_comm == MPI_COMM_NULL)
        return;
    for (int i = 0; i < 3; i++)
        MPI_Request_free(&pcoll_req[i]);
    MPI_Comm_free(&pcoll_comm);
    for (int k = 0; k < 2; k++) {
        MPI_Request_free(&pcoll_group_req[k]);
        MPI_Comm_free(&pcoll_group_comm[k]);
    }
    free(pcoll_bcast);
}

static void cgroup(void)
{
    if (np < 3)
        fail("cgroup needs 3 ranks or more", np);
    int last = np - 1;
    MPI_Status st;
    if (me == last) {
        MPI_Recv(bufs[1], LARGE + 4, MPI_UINT64_T, 0, 11, MPI_COMM_WORLD, &st);
        check(bufs[1], &st, 0);
        return;
    }
    MPI_Group world, members;
    MPI_Comm_group(MPI_COMM_WORLD, &world);
    int range[1][3] = {{0, last - 1, 1}};
    MPI_Group_range_incl(world, 1, range, &members);
    MPI_Comm made;
    MPI_Comm_create_group(MPI_COMM_WORLD, members, 7, &made);
    uint64_t in = (uint64_t)me + iteration, out = 0, want = 0;
    MPI_Allreduce(&in, &out, 1, MPI_UINT64_T, MPI_SUM, made);
    for (int p = 0; p < last; p++)
        want += (uint64_t)p + iteration;
    if (out != want)
        fail("an Allreduce on a communicator MPI_Comm_create_group made", -1);
    MPI_Comm_free(&made);
    MPI_Group_free(&members);
    MPI_Group_free(&world);
    if (me == 0) {
        int n = fill(bufs[0], last, 11);
        MPI_Send(bufs[0], n, MPI_UINT64_T, last, 11, MPI_COMM_WORLD);
    }
}

static void pinit(void)
{
#if MPI_VERSION >= 4
    MPI_Request r[2];
    uint64_t in = (uint64_t)me + iteration, out = 0, want = 0;
    MPI_Barrier_init(MPI_COMM_WORLD, MPI_INFO_NULL, &r[0]);
    MPI_Allreduce_init(&in, &out, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD, MPI_INFO_NULL,
                       &r[1]);
    MPI_Startall(2, r);
    MPI_Waitall(2, r, MPI_STATUSES_IGNORE);
    for (int p = 0; p < np; p++)
        want += (uint64_t)p + iteration;
    if (out != want)
        fail("a persistent Allreduce_init's result", -1);
    MPI_Request_free(&r[0]);
    MPI_Request_free(&r[1]);
#else
    fail("pinit needs MPI 4", -1);
#endif
}

static void nbsend(void)
{
    if (np % 2 != 0)
        fail("nbsend needs an even number of ranks", np);
    int partner = me % 2 == 0 ? me + 1 : me - 1;
    uint64_t in = (uint64_t)me + iteration, sum = 0, want = 0;
    for (int p = 0; p < np; p++)
        want += (uint64_t)p + iteration;
    MPI_Request r[2] = {MPI_REQUEST_NULL, MPI_REQUEST_NULL};
    MPI_Iallreduce(&in, &sum, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD, &r[0]);
#if MPI_VERSION >= 4
    static MPI_Request persistent = MPI_REQUEST_NULL;
    static uint64_t p_in, p_sum;
    if (persistent == MPI_REQUEST_NULL)
        MPI_Allreduce_init(&p_in, &p_sum, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD,
                           MPI_INFO_NULL, &persistent);
    p_in = in;
    r[1] = persistent;
    MPI_Start(&r[1]);
#endif
    MPI_Status st;
    if (me % 2 == 0) {
        fill_fixed(bufs[0], partner, 88, LARGE + 4);
        MPI_Send(bufs[0], LARGE + 4, MPI_UINT64_T, partner, 88, MPI_COMM_WORLD);
        MPI_Waitall(2, r, MPI_STATUSES_IGNORE);
    } else {
        MPI_Waitall(2, r, MPI_STATUSES_IGNORE);
        MPI_Recv(bufs[1], LARGE + 4, MPI_UINT64_T, partner, 88, MPI_COMM_WORLD, &st);
        check_fixed(bufs[1], &st, partner, 88, LARGE + 4);
    }
    expect(sum, want, "Iallreduce across a blocking send", -1);
#if MPI_VERSION >= 4
    expect(p_sum, want, "persistent Allreduce across a blocking send", -1);
#endif
}

/* attrfree: the delete callback of an attribute on one duplicate of MPI_COMM_WORLD frees
 * another (as libraries that keep an inner communicator per user communicator do), so a
 * collective runs inside the layer's MPI_Comm_free. */
static int free_inner(MPI_Comm comm, int keyval, void *value, void *extra)
{
    (void)comm;
    (void)keyval;
    (void)extra;
    return MPI_Comm_free((MPI_Comm *)value);
}

static void attrfree(void)
{
    static int keyval = MPI_KEYVAL_INVALID;
    static MPI_Comm inner;
    if (keyval == MPI_KEYVAL_INVALID)
        MPI_Comm_create_keyval(MPI_COMM_NULL_COPY_FN, free_inner, &keyval, NULL);
    MPI_Comm outer;
    MPI_Comm_dup(MPI_COMM_WORLD, &inner);
    MPI_Comm_dup(MPI_COMM_WORLD, &outer);
    MPI_Comm_set_attr(outer, keyval, &inner);
    int right = (me + 1) % np, left = (me + np - 1) % np;
    MPI_Status st;
    MPI_Comm on[2] = {inner, outer};
    for (int k = 0; k < 2; k++) {
        MPI_Request r;
        MPI_Irecv(bufs[1], LARGE + 4, MPI_UINT64_T, left, 90 + k, on[k], &r);
        int n = fill(bufs[0], right, 90 + k);
        MPI_Send(bufs[0], n, MPI_UINT64_T, right, 90 + k, on[k]);
        MPI_Wait(&r, &st);
        check(bufs[1], &st, left);
    }
    MPI_Comm_free(&outer);
    if (inner != MPI_COMM_NULL)
        fail("the attribute's delete callback did not free the inner communicator", -1);
}

/* Buffered sends around the ring through a buffer attached for the iteration: a large
 * (rendezvous) message, so MPI_Buffer_detach waits for the right neighbour to take it. Even
 * ranks send, detach, then receive; odd ranks receive first. */
static void bsend(void)
{
    enum { WORDS = LARGE + 4, TAG = 89 };
    int right = (me + 1) % np, left = (me + np - 1) % np, size = 0;
    int space = WORDS * (int)sizeof(uint64_t) + MPI_BSEND_OVERHEAD;
    char *attached = malloc((size_t)space);
    void *detached = NULL;
    MPI_Status st;
    if (attached == NULL)
        fail("out of memory", space);
    if (me % 2 != 0) {
        MPI_Recv(bufs[1], WORDS, MPI_UINT64_T, left, TAG, MPI_COMM_WORLD, &st);
        check_fixed(bufs[1], &st, left, TAG, WORDS);
    }
    MPI_Buffer_attach(attached, space);
    fill_fixed(bufs[0], right, TAG, WORDS);
    MPI_Bsend(bufs[0], WORDS, MPI_UINT64_T, right, TAG, MPI_COMM_WORLD);
    MPI_Buffer_detach(&detached, &size);
    if (detached != attached || size != space)
        fail("MPI_Buffer_detach returned another buffer", size);
    free(attached);
    if (me % 2 == 0) {
        MPI_Recv(bufs[1], WORDS, MPI_UINT64_T, left, TAG, MPI_COMM_WORLD, &st);
        check_fixed(bufs[1], &st, left, TAG, WORDS);
    }
}

static void freerecv(void)
{
    enum { WORDS = SMALL + 4, TAG = 85 };
    int right = (me + 1) % np, left = (me + np - 1) % np;
    volatile uint64_t *freed = bufs[2];
    for (int i = 0; i < WORDS; i++)
        freed[i] = UINT64_MAX;
    MPI_Request r;
    MPI_Irecv(bufs[2], WORDS, MPI_UINT64_T, left, TAG, MPI_COMM_WORLD, &r);
    MPI_Request_free(&r);
    if (r != MPI_REQUEST_NULL)
        fail("MPI_Request_free left the handle", left);
    MPI_Barrier(MPI_COMM_WORLD);
    for (int k = 0; k < 2; k++) {
        fill_fixed(bufs[0], right, TAG, WORDS);
        MPI_Send(bufs[0], WORDS, MPI_UINT64_T, right, TAG, MPI_COMM_WORLD);
    }
    MPI_Status second;
    MPI_Recv(bufs[1], WORDS, MPI_UINT64_T, left, TAG, MPI_COMM_WORLD, &second);
    /* Nothing says when a freed receive's data has landed: MPI progress until it has. */
    struct timespec t0, t;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    while (freed[WORDS - 1] == UINT64_MAX) { /* until the message has landed */
        int flag;
        MPI_Iprobe(MPI_ANY_SOURCE, 999, nbx_comm, &flag, MPI_STATUS_IGNORE);
        clock_gettime(CLOCK_MONOTONIC, &t);
        if (t.tv_sec - t0.tv_sec > 20)
            fail("a freed receive's message never landed", left);
    }
    MPI_Status first = second; /* what the freed receive's status would say */
    MPI_Status_set_elements(&first, MPI_UINT64_T, WORDS);
    check_fixed(bufs[2], &first, left, TAG, WORDS);
    check_fixed(bufs[1], &second, left, TAG, WORDS);
}

/* inter: an intercommunicator between the two halves (remade every 4 iterations, its local
 * halves made with MPI_Comm_split or, every other time, MPI_Comm_create_group; merged each
 * time): each rank sends to the remote rank with its own index and receives with ANY_SOURCE;
 * an Allreduce (each group gets the other's sum) and a Barrier on the intercommunicator. */
static MPI_Comm inter = MPI_COMM_NULL, inter_local;
static int inter_remote[MAXP], inter_rsize, inter_lrank, inter_made;

static void intercomm(void)
{
    if (np % 2 != 0)
        fail("inter needs an even number of ranks", np);
    if (inter != MPI_COMM_NULL && iteration % 4 == 0) {
        /* The half last: a call over one half only, right before the next creation, lets the
         * other half go ahead into it (a cut must not then wait for the creation, nor the
         * creation for the cut). */
        MPI_Comm_free(&inter);
        MPI_Comm_free(&inter_local);
    }
    if (inter == MPI_COMM_NULL) {
        if (inter_made++ % 2 == 0) {
            MPI_Comm_split(MPI_COMM_WORLD, me < np / 2, me, &inter_local);
        } else {
            MPI_Group wg, half;
            int range[1][3] = {{me < np / 2 ? 0 : np / 2, me < np / 2 ? np / 2 - 1 : np - 1, 1}};
            MPI_Comm_group(MPI_COMM_WORLD, &wg);
            MPI_Group_range_incl(wg, 1, range, &half);
            MPI_Comm_create_group(MPI_COMM_WORLD, half, 92, &inter_local);
            MPI_Group_free(&half);
            MPI_Group_free(&wg);
        }
        MPI_Comm_rank(inter_local, &inter_lrank);
        MPI_Intercomm_create(inter_local, 0, MPI_COMM_WORLD, me < np / 2 ? np / 2 : 0, 90,
                             &inter);
        MPI_Comm_remote_size(inter, &inter_rsize);
        MPI_Group rg, wg;
        MPI_Comm_remote_group(inter, &rg);
        MPI_Comm_group(MPI_COMM_WORLD, &wg);
        int ranks[MAXP];
        for (int i = 0; i < inter_rsize; i++)
            ranks[i] = i;
        MPI_Group_translate_ranks(rg, inter_rsize, ranks, wg, inter_remote);
        MPI_Group_free(&rg);
        MPI_Group_free(&wg);
        /* merged: the low half first */
        MPI_Comm merged;
        int mrank = -1, one = 1, sum = 0;
        MPI_Intercomm_merge(inter, me >= np / 2, &merged);
        MPI_Comm_rank(merged, &mrank);
        if (mrank != me)
            fail("Intercomm_merge order", mrank);
        MPI_Allreduce(&one, &sum, 1, MPI_INT, MPI_SUM, merged);
        if (sum != np)
            fail("Allreduce on the merged communicator", sum);
        MPI_Comm_free(&merged);
    }
    MPI_Request s;
    MPI_Status st;
    int peer = inter_lrank % inter_rsize;
    int n = fill(bufs[0], inter_remote[peer], 91);
    MPI_Isend(bufs[0], n, MPI_UINT64_T, peer, 91, inter, &s);
    MPI_Recv(bufs[1], LARGE + 4, MPI_UINT64_T, MPI_ANY_SOURCE, 91, inter, &st);
    check_on(bufs[1], &st, MPI_ANY_SOURCE, inter_remote);
    MPI_Wait(&s, MPI_STATUS_IGNORE);
    uint64_t mine = (uint64_t)me + 1 + iteration, sum = 0, want = 0;
    MPI_Allreduce(&mine, &sum, 1, MPI_UINT64_T, MPI_SUM, inter);
    for (int i = 0; i < inter_rsize; i++)
        want += (uint64_t)inter_remote[i] + 1 + iteration;
    if (sum != want)
        fail("Allreduce on the intercommunicator", -1);
    MPI_Barrier(inter);
}

#ifdef SYMVIRT_EXPLICIT
/* Whether compute_nb's outstanding receive holds its message (the one expected next from
 * its sender, payload intact): the library completed it before the cut. */
static int quiet_recv_arrived(void)
{
    const uint64_t *b = quiet_recv;
    int src = quiet_recv_from;
    if (b[0] != (uint64_t)src || b[1] != (uint64_t)me || b[2] != next_seq_from[src] || b[3] != 60)
        return 0;
    for (int i = 4; i < LARGE + 4; i++)
        if (b[i] != word((uint64_t)src, (uint64_t)me, b[2], (uint64_t)i))
            return 0;
    return 1;
}

static void at_cut(uint64_t epoch, void *ctx)
{
    (void)ctx;
    /* A message of a request outstanding across the phase counts once it is in the buffer. */
    uint64_t got = received + (in_quiet && quiet_recv != NULL && quiet_recv_arrived());
    char path[4096];
    snprintf(path, sizeof path, "%s/cut-%llu-%d", dir, (unsigned long long)epoch, me);
    FILE *f = fopen(path, "w");
    if (f == NULL)
        fail("cannot write cut record", -1);
    fprintf(f, "%llu %llu %llu %s %s\n", (unsigned long long)iteration,
            (unsigned long long)sent, (unsigned long long)got, in_quiet ? "quiet" : "safe_point",
            pthread_equal(pthread_self(), main_thread) ? "main" : "thread");
    fclose(f);
}

/* After a safe point or a quiet phase's begin or end: counts a cut and records its outcome. */
static void after_cut_point(int rc, const symvirt_interconnect *ic, const char *call)
{
    if (rc == SYMVIRT_ERR_AGENT) {
        /* The agent went away: the safe point goes on as a no-op; so does the program. */
        fprintf(stderr, "rank %d: %s: %s\n", me, call, symvirt_last_error());
        agent_errors++;
    } else if (rc < 0) {
        fprintf(stderr, "%s: %d %s\n", call, rc, symvirt_last_error());
        MPI_Abort(MPI_COMM_WORLD, 5);
    }
    if ((rc == SYMVIRT_RESUMED || rc == SYMVIRT_ABORTED) && ic != NULL) {
        cuts++;
        char path[4096];
        snprintf(path, sizeof path, "%s/resumed-%llu-%d", dir, (unsigned long long)ic->epoch, me);
        FILE *f = fopen(path, "w");
        if (f == NULL)
            fail("cannot write resume record", -1);
        fprintf(f, "%s %llu %s\n", rc == SYMVIRT_RESUMED ? "resumed" : "aborted",
                (unsigned long long)iteration, ic->json);
        fclose(f);
    }
}
#endif

static int stop_requested(void)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/stop", dir);
    int mine = (me == 0 && access(path, F_OK) == 0), all = 0;
    MPI_Allreduce(&mine, &all, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    return all;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: stress MODES DIR MIN_ITERS\n");
        return 2;
    }
    const char *hold = getenv("STRESS_HOLD_OPEN");
    if (hold != NULL && open(hold, O_RDONLY | O_CLOEXEC) < 0) {
        perror(hold);
        return 3;
    }
#ifdef SYMVIRT_EXPLICIT
    /* Quiet phases' cuts are made by the library's thread, which calls MPI. */
    int provided;
    MPI_Init_thread(&argc, &argv, MPI_THREAD_SERIALIZED, &provided);
    main_thread = pthread_self();
    quiet = getenv("STRESS_QUIET") != NULL && strcmp(getenv("STRESS_QUIET"), "1") == 0;
#else
    MPI_Init(&argc, &argv);
#endif
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    MPI_Comm_size(MPI_COMM_WORLD, &np);
    if (np > MAXP || np < 2)
        fail("need 2..64 ranks", np);
    dir = argv[2];
    MPI_Comm_dup(MPI_COMM_WORLD, &any_comm);
    MPI_Comm_dup(MPI_COMM_WORLD, &nbx_comm);
    MPI_Comm_dup(MPI_COMM_WORLD, &quiet_comm);
    const char *cms = getenv("STRESS_COMPUTE_MS");
    if (cms != NULL)
        compute_ms = atof(cms);
    int stop_every = strstr(argv[1], "compute") != NULL ? 1 : 8;
    mp_comm = MPI_COMM_NULL;
    uint64_t min_iters = strtoull(argv[3], NULL, 10);
    next_seq_to = calloc((size_t)np, sizeof(uint64_t));
    next_seq_from = calloc((size_t)np, sizeof(uint64_t));
    for (int i = 0; i < 2 * np || i < 8; i++) /* modes use up to 8, alltoall 2 per rank */
        bufs[i] = malloc((LARGE + 4) * sizeof(uint64_t));
#ifdef SYMVIRT_EXPLICIT
    int rc = symvirt_init(MPI_COMM_WORLD);
    if (rc == SYMVIRT_ERR_AGENT) {
        /* No agent: the safe point still works (SIGUSR1 fallback trigger). */
        fprintf(stderr, "rank %d: symvirt_init: %s\n", me, symvirt_last_error());
    } else if (rc != SYMVIRT_CONTINUE) {
        fprintf(stderr, "symvirt_init: %d %s\n", rc, symvirt_last_error());
        MPI_Abort(MPI_COMM_WORLD, 4);
    }
    symvirt_on_quiesce(at_cut, NULL);
#endif
    for (iteration = 0;; iteration++) {
        char modes[256];
        snprintf(modes, sizeof modes, "%s", argv[1]);
        for (char *save = NULL, *m = strtok_r(modes, ",", &save); m; m = strtok_r(NULL, ",", &save)) {
            if (strcmp(m, "ring") == 0)
                ring();
            else if (strcmp(m, "ring_nb") == 0)
                ring_nb();
            else if (strcmp(m, "alltoall") == 0)
                alltoall();
            else if (strcmp(m, "anysource") == 0)
                anysource();
            else if (strcmp(m, "collective") == 0)
                collective();
            else if (strcmp(m, "stall") == 0)
                stall();
            else if (strcmp(m, "handoff") == 0)
                handoff();
            else if (strcmp(m, "split") == 0)
                split();
            else if (strcmp(m, "persist") == 0)
                persist();
            else if (strcmp(m, "mprobe") == 0)
                mprobe();
            else if (strcmp(m, "nbcoll") == 0)
                nbcoll();
            else if (strcmp(m, "vcoll") == 0)
                vcoll();
            else if (strcmp(m, "nbx") == 0)
                nbx();
            else if (strcmp(m, "nbfree") == 0)
                nbfree();
            else if (strcmp(m, "cancel") == 0)
                cancel();
            else if (strcmp(m, "inter") == 0)
                intercomm();
            else if (strcmp(m, "replace") == 0)
                replace();
            else if (strcmp(m, "freerecv") == 0)
                freerecv();
            else if (strcmp(m, "nbsend") == 0)
                nbsend();
            else if (strcmp(m, "bsend") == 0)
                bsend();
            else if (strcmp(m, "attrfree") == 0)
                attrfree();
            else if (strcmp(m, "pcoll") == 0)
                pcoll();
            else if (strcmp(m, "pinit") == 0)
                pinit();
            else if (strcmp(m, "cgroup") == 0)
                cgroup();
            else if (strcmp(m, "isendrecv") == 0)
                isendrecv();
            else if (strcmp(m, "large_count") == 0)
                large_count();
            else if (strcmp(m, "compute") == 0)
                compute();
            else if (strcmp(m, "compute_nb") == 0)
                compute_nb();
            else if (strcmp(m, "io") == 0)
                io();
            else
                fail("unknown mode", -1);
        }
#ifdef SYMVIRT_EXPLICIT
        symvirt_interconnect ic;
        after_cut_point(symvirt_safe_point(MPI_COMM_WORLD, &ic), &ic, "symvirt_safe_point");
#endif
        if (iteration + 1 >= min_iters && iteration % stop_every == (uint64_t)stop_every - 1 &&
            stop_requested())
            break;
    }
    /* Everything sent was received: totals agree across ranks. */
    uint64_t tot[2] = {sent, received}, all[2];
    MPI_Allreduce(tot, all, 2, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
    if (all[0] != all[1])
        fail("global sent != received at the end", -1);
#ifdef SYMVIRT_EXPLICIT
    rc = symvirt_finalize();
    if (rc != SYMVIRT_CONTINUE)
        fprintf(stderr, "symvirt_finalize: %d %s\n", rc, symvirt_last_error());
#endif
    if (io_file != MPI_FILE_NULL && MPI_File_close(&io_file) != MPI_SUCCESS)
        fail("MPI_File_close", -1);
    MPI_Comm_free(&any_comm);
    MPI_Comm_free(&nbx_comm);
    MPI_Comm_free(&quiet_comm);
    if (cart != MPI_COMM_NULL)
        MPI_Comm_free(&cart);
    persist_free();
    pcoll_free();
    if (mp_comm != MPI_COMM_NULL)
        MPI_Comm_free(&mp_comm);
    if (half != MPI_COMM_NULL)
        MPI_Comm_free(&half);
    if (inter != MPI_COMM_NULL) {
        MPI_Comm_free(&inter);
        MPI_Comm_free(&inter_local);
    }
    printf("stress OK rank %d iterations %llu sent %llu received %llu agent_errors %llu cuts %llu\n",
           me, (unsigned long long)iteration + 1, (unsigned long long)sent,
           (unsigned long long)received, (unsigned long long)agent_errors,
           (unsigned long long)cuts);
    fflush(stdout);
    MPI_Finalize();
    return 0;
}
