/* What a cut counts at two edges of point-to-point traffic.
 *
 *   count_edges DIR refused_send|persistent_after_free
 *
 * refused_send: every rank returns errors instead of aborting (MPI_ERRORS_RETURN on
 * MPI_COMM_WORLD); rank 0 calls MPI_Send, MPI_Isend and MPI_Ssend to rank 1 with a negative
 * tag, which MPI refuses (each must fail), then every rank passes a barrier, rank 0 creates
 * DIR/ready and every rank waits, outside MPI, until DIR/go exists. A cut meanwhile must
 * find every pair even: no message of the refused sends exists.
 *
 * persistent_after_free: the ranks duplicate MPI_COMM_WORLD (C); rank 0 sends rank 1 one
 * message on C (tag 7) through a persistent send; rank 1 has a persistent receive for it
 * (MPI_Recv_init) that it has not started, and probes until the message has arrived; every
 * rank passes a barrier, rank 0 creates DIR/ready and every rank waits, outside MPI, until
 * DIR/go exists (a cut meanwhile takes the message into rank 1's buffer). Then every rank
 * frees C, and rank 1 starts its persistent receive and waits for it: MPI keeps a
 * communicator for its persistent requests, so the message must arrive (checked: payload,
 * source, tag).
 *
 * Then, in both modes, the ranks pass 20 rounds of ring traffic (checked) and every rank
 * prints "count_edges OK rank R". */
#include <mpi.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "work_dir.h"

static int me, np;

static void fail(const char *what, long long got)
{
    fprintf(stderr, "count_edges FAIL rank %d: %s (%lld)\n", me, what, got);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 3);
}

static void wait_for(const char *dir, const char *name)
{
    while (!exists(dir, name))
        usleep(1000);
}

static void refused_sends(void)
{
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    if (me != 0)
        return;
    int x = 1;
    MPI_Request r = MPI_REQUEST_NULL;
    if (MPI_Send(&x, 1, MPI_INT, 1, -5, MPI_COMM_WORLD) == MPI_SUCCESS)
        fail("MPI_Send with a negative tag succeeded", 0);
    if (MPI_Isend(&x, 1, MPI_INT, 1, -5, MPI_COMM_WORLD, &r) == MPI_SUCCESS)
        fail("MPI_Isend with a negative tag succeeded", 0);
    if (MPI_Ssend(&x, 1, MPI_INT, 1, -5, MPI_COMM_WORLD) == MPI_SUCCESS)
        fail("MPI_Ssend with a negative tag succeeded", 0);
}

enum { WORDS = 64 };

/* Before the cut: the message on C is at rank 1, its persistent receive not started. */
static void persistent_before(MPI_Comm *c, MPI_Request *recv, long long *in)
{
    static long long out[WORDS];
    MPI_Comm_dup(MPI_COMM_WORLD, c);
    if (me == 0) {
        for (int i = 0; i < WORDS; i++)
            out[i] = 1000 + i;
        MPI_Request send;
        MPI_Send_init(out, WORDS, MPI_LONG_LONG, 1, 7, *c, &send);
        MPI_Start(&send);
        MPI_Wait(&send, MPI_STATUS_IGNORE);
        MPI_Request_free(&send);
    } else if (me == 1) {
        MPI_Recv_init(in, WORDS, MPI_LONG_LONG, 0, 7, *c, recv);
        int flag = 0;
        while (!flag)
            MPI_Iprobe(0, 7, *c, &flag, MPI_STATUS_IGNORE);
    }
}

/* After the cut: C freed, then the persistent receive started. */
static void persistent_after(MPI_Comm *c, MPI_Request *recv, long long *in)
{
    MPI_Comm_free(c);
    if (me != 1)
        return;
    MPI_Status st;
    MPI_Start(recv);
    MPI_Wait(recv, &st);
    MPI_Request_free(recv);
    if (st.MPI_SOURCE != 0 || st.MPI_TAG != 7)
        fail("persistent receive's status: source", st.MPI_SOURCE);
    for (int i = 0; i < WORDS; i++)
        if (in[i] != 1000 + i)
            fail("persistent receive's payload", in[i]);
}

static void ring(void)
{
    for (int round = 0; round < 20; round++) {
        int out = me * 1000 + round, in = -1;
        int right = (me + 1) % np, left = (me + np - 1) % np;
        MPI_Sendrecv(&out, 1, MPI_INT, right, 3, &in, 1, MPI_INT, left, 3, MPI_COMM_WORLD,
                     MPI_STATUS_IGNORE);
        if (in != left * 1000 + round)
            fail("ring payload", in);
    }
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    MPI_Comm_size(MPI_COMM_WORLD, &np);
    int refused = argc == 3 && strcmp(argv[2], "refused_send") == 0;
    int persistent = argc == 3 && strcmp(argv[2], "persistent_after_free") == 0;
    if (np < 2 || !(refused || persistent)) {
        fprintf(stderr, "usage: count_edges DIR refused_send|persistent_after_free "
                        "(2 ranks or more)\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    const char *dir = argv[1];
    MPI_Comm c = MPI_COMM_NULL;
    MPI_Request recv = MPI_REQUEST_NULL;
    static long long in[WORDS];
    if (refused)
        refused_sends();
    else
        persistent_before(&c, &recv, in);
    MPI_Barrier(MPI_COMM_WORLD);
    if (me == 0)
        touch(dir, "ready");
    wait_for(dir, "go");
    if (persistent)
        persistent_after(&c, &recv, in);
    ring();
    MPI_Barrier(MPI_COMM_WORLD);
    printf("count_edges OK rank %d\n", me);
    fflush(stdout);
    MPI_Finalize();
    return 0;
}
