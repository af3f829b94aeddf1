/* MPI 4's persistent collectives and partitioned communication (MPICH 4) under the
 * transparent layer: persistent collectives are covered (their starts deferred until every
 * member has started), so a migration request is served even while some ranks have started
 * one and a peer has not; partitioned requests are observed, not covered: while a rank holds
 * one (made, not freed), a request fails with a reason naming the call; once freed, requests
 * are served again.
 *
 *   persistent_coll DIR
 *
 * Phase 1: every rank makes an MPI_Allreduce_init on MPI_COMM_WORLD; ranks 1.. start it and
 * tell rank 0 (a message each), which creates DIR/started and waits, outside MPI, until
 * DIR/go exists before it starts its own: meanwhile the others wait for it. The result is
 * checked; once every rank's completed, rank 0 creates DIR/idle and waits, outside MPI,
 * until DIR/go2 exists (every request inactive, none freed); the collective runs 8 more times,
 * checked, and is freed. Phase 2: ranks 0 and 1 make a partitioned send and receive
 * (MPI_Psend_init / MPI_Precv_init); rank 0 creates DIR/partitioned and waits, outside MPI,
 * until DIR/go3 exists; then the message goes (partitions marked ready one at a time,
 * MPI_Parrived), checked; both requests are freed, and rank 0 creates DIR/done once every
 * rank's are. Phase 3: ring traffic (Send/Recv, checked) until DIR/stop exists. Prints
 * "persistent_coll OK rank R ring N". */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

#include "work_dir.h"

#define PARTS 4
#define PART_WORDS 1024

static int me, np;

static void fail(const char *what, uint64_t got, uint64_t want)
{
    fprintf(stderr, "persistent_coll FAIL rank %d: %s: got %llu want %llu\n", me, what,
            (unsigned long long)got, (unsigned long long)want);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 3);
}

/* Whether DIR/name exists on rank 0's view (all agree). */
static int agreed(const char *dir, const char *name)
{
    int here = me == 0 && exists(dir, name), all = 0;
    MPI_Allreduce(&here, &all, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    return all;
}

/* One round of the persistent Allreduce: each rank contributes me + round + 1. */
static void check_sum(uint64_t sum, uint64_t round)
{
    uint64_t want = 0;
    for (int p = 0; p < np; p++)
        want += (uint64_t)p + round + 1;
    if (sum != want)
        fail("persistent Allreduce result", sum, want);
}

static void partitioned(const char *dir)
{
    uint64_t *buf = malloc(PARTS * PART_WORDS * sizeof *buf);
    MPI_Request r;
    if (me == 0) {
        for (int i = 0; i < PARTS * PART_WORDS; i++)
            buf[i] = ((uint64_t)7 << 40) | (uint64_t)i;
        MPI_Psend_init(buf, PARTS, PART_WORDS, MPI_UINT64_T, 1, 9, MPI_COMM_WORLD, MPI_INFO_NULL,
                       &r);
        touch(dir, "partitioned");
        while (!exists(dir, "go3"))
            usleep(1000);
        MPI_Start(&r);
        for (int p = PARTS - 1; p >= 0; p--)
            MPI_Pready(p, r);
        MPI_Wait(&r, MPI_STATUS_IGNORE);
        MPI_Request_free(&r);
    } else if (me == 1) {
        MPI_Precv_init(buf, PARTS, PART_WORDS, MPI_UINT64_T, 0, 9, MPI_COMM_WORLD, MPI_INFO_NULL,
                       &r);
        MPI_Start(&r);
        for (int p = 0; p < PARTS; p++) {
            int arrived = 0;
            while (!arrived)
                MPI_Parrived(r, p, &arrived);
        }
        MPI_Wait(&r, MPI_STATUS_IGNORE);
        MPI_Request_free(&r);
        for (int i = 0; i < PARTS * PART_WORDS; i++)
            if (buf[i] != (((uint64_t)7 << 40) | (uint64_t)i))
                fail("partitioned message", buf[i], ((uint64_t)7 << 40) | (uint64_t)i);
    }
    free(buf);
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    MPI_Comm_size(MPI_COMM_WORLD, &np);
    if (argc != 2) {
        fprintf(stderr, "usage: persistent_coll DIR\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    const char *dir = argv[1];
    int right = (me + 1) % np, left = (me + np - 1) % np;
    uint64_t mine = 0, sum = 0, round = 0;
    MPI_Request all;
    MPI_Allreduce_init(&mine, &sum, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD, MPI_INFO_NULL,
                       &all);
    mine = (uint64_t)me + round + 1;
    if (me == 0) {
        for (int p = 1; p < np; p++)
            MPI_Recv(NULL, 0, MPI_BYTE, p, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        touch(dir, "started");
        while (!exists(dir, "go"))
            usleep(1000);
        MPI_Start(&all);
    } else {
        MPI_Start(&all);
        MPI_Send(NULL, 0, MPI_BYTE, 0, 1, MPI_COMM_WORLD);
    }
    MPI_Wait(&all, MPI_STATUS_IGNORE);
    check_sum(sum, round++);
    MPI_Barrier(MPI_COMM_WORLD);
    if (me == 0) {
        touch(dir, "idle");
        while (!exists(dir, "go2"))
            usleep(1000);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    while (round < 9) {
        mine = (uint64_t)me + round + 1;
        MPI_Start(&all);
        MPI_Wait(&all, MPI_STATUS_IGNORE);
        check_sum(sum, round++);
    }
    MPI_Request_free(&all);
    partitioned(dir);
    MPI_Barrier(MPI_COMM_WORLD);
    if (me == 0)
        touch(dir, "done");

    uint64_t ring = 0;
    while (ring % 64 != 0 || !agreed(dir, "stop")) {
        uint64_t out = ((uint64_t)me << 32) | ring, in = 0;
        if (me % 2 == 0) {
            MPI_Send(&out, 1, MPI_UINT64_T, right, 7, MPI_COMM_WORLD);
            MPI_Recv(&in, 1, MPI_UINT64_T, left, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else {
            MPI_Recv(&in, 1, MPI_UINT64_T, left, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            MPI_Send(&out, 1, MPI_UINT64_T, right, 7, MPI_COMM_WORLD);
        }
        if (in != (((uint64_t)left << 32) | ring))
            fail("ring message", in, ((uint64_t)left << 32) | ring);
        ring++;
    }
    printf("persistent_coll OK rank %d ring %llu\n", me, (unsigned long long)ring);
    fflush(stdout);
    MPI_Finalize();
    return 0;
}
