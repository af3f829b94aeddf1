/* A cut whose drain cannot finish is given up by every rank, and the job goes on.
 *
 *   stuck_drain DIR [late]
 *
 * The even and the odd ranks are joined by an intercommunicator, duplicated with
 * MPI_Comm_idup. The transparent layer first sees such a duplicate when a rank uses it (a gap
 * its README lists), so a rank that has not used it has no slot for it. Rank 0 sends rank 1
 * (the odd group's first) one message there (tag 9); every rank passes a barrier, rank 0
 * creates DIR/sent and every rank waits, outside MPI, until DIR/go exists. A cut meanwhile
 * cannot finish: rank 0 counted the message, and rank 1's drain never looks where it is.
 * Then rank 1 receives it (checked), the ranks pass 100 rounds of ring traffic (checked),
 * rank 0 creates DIR/received, and every rank waits, outside MPI, until DIR/stop exists.
 * Prints "stuck_drain OK rank R".
 *
 * With "late", rank 3 (of 4) enters a cut late: it holds an MPI-IO file open (on
 * MPI_COMM_SELF, so the layer's progress thread makes no cut for it) and, instead of waiting
 * for DIR/go outside MPI, waits for DIR/late, then sends rank 1 a 1 MiB message (tag 11,
 * MPI_Ssend: it returns only once rank 1 has matched it; MPICH completes even a 1 MiB
 * MPI_Send here before that) and enters an MPI_Barrier; rank 1 receives that message
 * (checked) after DIR/go, before the barrier. */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#include "work_dir.h"

static int me, np;

static void fail(const char *what, unsigned long long got)
{
    fprintf(stderr, "stuck_drain FAIL rank %d: %s (%llu)\n", me, what, got);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 3);
}

static void wait_for(const char *dir, const char *name)
{
    while (!exists(dir, name))
        usleep(1000);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    MPI_Comm_size(MPI_COMM_WORLD, &np);
    if (argc < 2 || np < 2) {
        fprintf(stderr, "usage: stuck_drain DIR [late] (2 ranks or more; late: 4)\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    const char *dir = argv[1];
    int late = argc == 3 && strcmp(argv[2], "late") == 0 && np == 4;
    enum { BIG = 1 << 17 }; /* 1 MiB of words */
    static uint64_t big[BIG];
    MPI_File file = MPI_FILE_NULL;
    if (late && me == 3) {
        char path[4096];
        snprintf(path, sizeof path, "%s/rank3.dat", dir);
        MPI_File_open(MPI_COMM_SELF, path, MPI_MODE_CREATE | MPI_MODE_WRONLY, MPI_INFO_NULL,
                      &file);
        for (int i = 0; i < BIG; i++)
            big[i] = 0xb16b00b5ULL ^ (uint64_t)i;
    }
    MPI_Comm half, inter, dup;
    MPI_Comm_split(MPI_COMM_WORLD, me % 2, me, &half);
    /* The other group's leader, as a rank of MPI_COMM_WORLD: 1 for the evens, 0 for the odds. */
    MPI_Intercomm_create(half, 0, MPI_COMM_WORLD, me % 2 == 0 ? 1 : 0, 5, &inter);
    MPI_Request r;
    MPI_Comm_idup(inter, &dup, &r);
    MPI_Wait(&r, MPI_STATUS_IGNORE);
    const uint64_t sent = 0x5eed5eedULL;
    if (me == 0)
        MPI_Send(&sent, 1, MPI_UINT64_T, 0, 9, dup); /* rank 0 of the remote (odd) group */
    MPI_Barrier(MPI_COMM_WORLD);
    if (me == 0)
        touch(dir, "sent");
    if (late && me == 3) {
        wait_for(dir, "late");
        MPI_Ssend(big, BIG, MPI_UINT64_T, 1, 11, MPI_COMM_WORLD);
        MPI_File_close(&file);
    } else {
        wait_for(dir, "go");
    }
    if (me == 1) {
        uint64_t got = 0;
        MPI_Recv(&got, 1, MPI_UINT64_T, 0, 9, dup, MPI_STATUS_IGNORE);
        if (got != sent)
            fail("the message on the duplicate", got);
        if (late) {
            MPI_Recv(big, BIG, MPI_UINT64_T, 3, 11, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            for (int i = 0; i < BIG; i++)
                if (big[i] != (0xb16b00b5ULL ^ (uint64_t)i))
                    fail("the late 1 MiB message, word", (unsigned long long)i);
        }
    }
    MPI_Barrier(MPI_COMM_WORLD);
    int right = (me + 1) % np, left = (me + np - 1) % np;
    for (uint64_t ring = 0; ring < 100; ring++) {
        uint64_t out = ((uint64_t)me << 32) | ring, in = 0;
        MPI_Sendrecv(&out, 1, MPI_UINT64_T, right, 7, &in, 1, MPI_UINT64_T, left, 7,
                     MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        if (in != (((uint64_t)left << 32) | ring))
            fail("ring message", in);
    }
    MPI_Comm_free(&dup);
    MPI_Comm_free(&inter);
    MPI_Comm_free(&half);
    MPI_Barrier(MPI_COMM_WORLD);
    if (me == 0)
        touch(dir, "received");
    wait_for(dir, "stop");
    printf("stuck_drain OK rank %d\n", me);
    fflush(stdout);
    MPI_Finalize();
    return 0;
}
