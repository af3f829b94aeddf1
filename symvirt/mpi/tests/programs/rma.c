/* One-sided communication under the transparent layer, which does not cover it: while a window
 * is open a rank refuses to be migrated (the agent reports the epoch failed, with the reason),
 * the job goes on unharmed; once the windows are freed migrations work again.
 *
 *   rma DIR
 *
 * Phase 1: a window on MPI_COMM_WORLD; rounds of MPI_Put to the right neighbour between two
 * fences, each value checked, until DIR/phase2 exists (all ranks agree at the fence). Then the
 * window is freed. Rank 0 creates DIR/open once every rank has its window, DIR/freed once they
 * are freed. Phase 2: ring traffic (Send/Recv, checked) until DIR/stop exists. Prints
 * "rma OK rank R rounds N ring M". */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

static int me, np;

static void fail(const char *what, uint64_t got, uint64_t want)
{
    fprintf(stderr, "rma FAIL rank %d: %s: got %llu want %llu\n", me, what,
            (unsigned long long)got, (unsigned long long)want);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 3);
}

/* Rank 0 creates DIR/name: tells the test where the job is. */
static void touch(const char *dir, const char *name)
{
    if (me != 0)
        return;
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "w");
    if (f != NULL)
        fclose(f);
}

/* Whether DIR/name exists on every rank's view (rank 0 decides, all agree). */
static int flag(const char *dir, const char *name)
{
    char path[4096];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int here = me == 0 && access(path, F_OK) == 0;
    int all = 0;
    MPI_Allreduce(&here, &all, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    return all;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    MPI_Comm_size(MPI_COMM_WORLD, &np);
    if (argc != 2) {
        fprintf(stderr, "usage: rma DIR\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    const char *dir = argv[1];
    int right = (me + 1) % np, left = (me + np - 1) % np;

    /* Open MPI 4.1 with btl self,vader (no single-copy) makes windows through
     * MPI_Win_allocate (its osc/sm). Debian's MPICH 4.0.2 (ch4:ucx) puts data at wrong
     * addresses on this machine (values lost, a neighbouring stack variable overwritten), so
     * under MPICH the window is made and fenced but no puts go through it: what is tested is
     * the layer's answer to an open window, not MPICH's RMA. */
    MPI_Win win;
    uint64_t *slot_memory;
#ifdef OPEN_MPI
    const int puts = 1;
    MPI_Win_allocate(sizeof *slot_memory, sizeof *slot_memory, MPI_INFO_NULL, MPI_COMM_WORLD,
                     &slot_memory, &win);
#else
    const int puts = 0;
    slot_memory = calloc(1, sizeof *slot_memory);
    MPI_Win_create(slot_memory, sizeof *slot_memory, sizeof *slot_memory, MPI_INFO_NULL,
                   MPI_COMM_WORLD, &win);
#endif
    volatile uint64_t *slot = slot_memory;
    /* Every rank has its window once every rank is past this barrier. */
    MPI_Barrier(MPI_COMM_WORLD);
    touch(dir, "open");
    uint64_t rounds = 0;
    for (;;) {
        uint64_t value = ((uint64_t)me << 32) | rounds;
        MPI_Win_fence(0, win);
        if (puts)
            MPI_Put(&value, 1, MPI_UINT64_T, right, 0, 1, MPI_UINT64_T, win);
        MPI_Win_fence(0, win);
        uint64_t want = ((uint64_t)left << 32) | rounds;
        if (puts && *slot != want)
            fail("value put by the left neighbour", *slot, want);
        rounds++;
        if (rounds % 8 == 0 && flag(dir, "phase2"))
            break;
    }
    MPI_Win_free(&win);
#ifndef OPEN_MPI
    free(slot_memory);
#endif
    touch(dir, "freed");

    uint64_t ring = 0;
    while (ring % 64 != 0 || !flag(dir, "stop")) {
        uint64_t out = ((uint64_t)me << 32) | ring, in = 0;
        MPI_Sendrecv(&out, 1, MPI_UINT64_T, right, 7, &in, 1, MPI_UINT64_T, left, 7,
                     MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        if (in != (((uint64_t)left << 32) | ring))
            fail("ring message", in, ((uint64_t)left << 32) | ring);
        ring++;
    }
    printf("rma OK rank %d rounds %llu ring %llu\n", me, (unsigned long long)rounds,
           (unsigned long long)ring);
    fflush(stdout);
    MPI_Finalize();
    return 0;
}
