/* A message of over 2 GiB in flight at a cut, or matched by MPI_Mprobe and not received yet:
 * the transparent layer's buffer cannot hold it, so the cut is answered "unable" (the job is
 * neither aborted nor cut inconsistently) and the job goes on; the message is then received,
 * truncated on purpose into 8 words so that the program stays small, which takes it all the
 * same; a later cut is served, its counts consistent.
 *
 *   oversized DIR
 *
 * First the matched one: rank 0 starts an Isend of 2^31 + 8 bytes to rank 1 (tag 4), rank 1
 * matches it (MPI_Mprobe), every rank passes a barrier, rank 0 creates DIR/matched and every
 * rank waits, outside MPI, until DIR/go1 exists; rank 1 receives it (MPI_Mrecv, truncated),
 * rank 0 completes its send, all pass a barrier. Then the one in flight: rank 0 starts an Isend of 2^31 + 8 bytes (zero pages, never written) to rank 1; once every
 * rank has passed a barrier after it, rank 0 creates DIR/sent and every rank waits, outside
 * MPI, until DIR/go exists. Rank 1 receives the message into 8 words (MPI_ERR_TRUNCATE
 * expected: MPI_ERRORS_RETURN), rank 0 completes its send, and rank 0 creates DIR/received
 * after a barrier; then ring traffic (checked) until DIR/stop exists. Prints
 * "oversized OK rank R ring N". */
#include <limits.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "work_dir.h"

#define BIG_WORDS ((MPI_Count)INT_MAX / 8 + 2) /* 2^31 + 8 bytes */

static int me, np;

static void fail(const char *what, long long got)
{
    fprintf(stderr, "oversized FAIL rank %d: %s (%lld)\n", me, what, got);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 3);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    MPI_Comm_size(MPI_COMM_WORLD, &np);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    if (argc != 2 || np < 2) {
        fprintf(stderr, "usage: oversized DIR (2 ranks or more)\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    const char *dir = argv[1];
    uint64_t *big = NULL;
    MPI_Request r = MPI_REQUEST_NULL;
    MPI_Datatype words8; /* an int count of a contiguous type: the same on every MPI */
    MPI_Type_contiguous(8, MPI_UINT64_T, &words8);
    MPI_Type_commit(&words8);
    if (me == 0) {
        big = calloc((size_t)BIG_WORDS, sizeof *big);
        if (big == NULL)
            fail("cannot allocate the large message", BIG_WORDS);
        MPI_Isend(big, (int)(BIG_WORDS / 8), words8, 1, 4, MPI_COMM_WORLD, &r);
    }
    MPI_Message matched = MPI_MESSAGE_NULL;
    if (me == 1)
        MPI_Mprobe(0, 4, MPI_COMM_WORLD, &matched, MPI_STATUS_IGNORE);
    MPI_Barrier(MPI_COMM_WORLD);
    if (me == 0)
        touch(dir, "matched");
    while (!exists(dir, "go1"))
        usleep(1000);
    if (me == 1) {
        uint64_t small[8];
        int rc = MPI_Mrecv(small, 8, MPI_UINT64_T, &matched, MPI_STATUS_IGNORE);
        int class = MPI_SUCCESS;
        MPI_Error_class(rc, &class);
        if (class != MPI_ERR_TRUNCATE)
            fail("the matched large message was not truncated", rc);
    }
    if (me == 0)
        MPI_Wait(&r, MPI_STATUS_IGNORE);
    MPI_Barrier(MPI_COMM_WORLD);
    if (me == 0)
        MPI_Isend(big, (int)(BIG_WORDS / 8), words8, 1, 5, MPI_COMM_WORLD, &r);
    MPI_Type_free(&words8);
    MPI_Barrier(MPI_COMM_WORLD);
    if (me == 0)
        touch(dir, "sent");
    while (!exists(dir, "go"))
        usleep(1000);
    if (me == 1) {
        uint64_t small[8];
        MPI_Status st;
        int rc = MPI_Recv(small, 8, MPI_UINT64_T, 0, 5, MPI_COMM_WORLD, &st);
        int class = MPI_SUCCESS;
        MPI_Error_class(rc, &class);
        if (class != MPI_ERR_TRUNCATE)
            fail("the large message was not truncated", rc);
    }
    if (me == 0) {
        MPI_Wait(&r, MPI_STATUS_IGNORE);
        free(big);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    if (me == 0)
        touch(dir, "received");
    int right = (me + 1) % np, left = (me + np - 1) % np;
    uint64_t ring = 0;
    for (;;) {
        if (ring % 64 == 0) {
            int here = me == 0 && exists(dir, "stop"), all = 0;
            MPI_Allreduce(&here, &all, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
            if (all)
                break;
        }
        uint64_t out = ((uint64_t)me << 32) | ring, in = 0;
        MPI_Sendrecv(&out, 1, MPI_UINT64_T, right, 7, &in, 1, MPI_UINT64_T, left, 7,
                     MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        if (in != (((uint64_t)left << 32) | ring))
            fail("ring message", (long long)in);
        ring++;
    }
    printf("oversized OK rank %d ring %llu\n", me, (unsigned long long)ring);
    fflush(stdout);
    MPI_Finalize();
    return 0;
}
