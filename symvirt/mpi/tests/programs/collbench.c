/* What the transparent layer costs a small collective (benches/mpi_overhead.rs scenario
 * `collectives`): an 8-byte MPI_Allreduce in three forms, blocking, non-blocking
 * (MPI_Iallreduce + MPI_Wait) and, with MPI 4, persistent (MPI_Allreduce_init, then
 * MPI_Start + MPI_Wait per round).
 *
 *   collbench PAIRS ROUNDS
 *
 * For each form, PAIRS pairs of blocks of ROUNDS collectives, one block through the MPI_
 * functions (the layer's wrappers when it is preloaded: an alignment before a blocking one,
 * a deferred start for the others), the other around them through the PMPI_ functions, in
 * alternating order, each block between two PMPI_Barrier calls; rank 0 prints one line per
 * pair:
 *
 *   ab FORM N rounds=R through=S around=S
 *
 * The two blocks of a pair share the machine's speed regime; without the layer both are the
 * same MPI functions, and their ratio shows the estimate's own noise. Every round checks the
 * sum (each rank adds its rank + the round), so a layer that broke a collective fails the run
 * (MPI_Abort). */
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

static int me, np;

enum form { BLOCKING, NONBLOCKING, PERSISTENT };
static const char *const form_names[] = {"allreduce", "iallreduce", "allreduce_init"};

/* The persistent requests of each side (made once: through the layer, and around it). */
static MPI_Request persistent_through = MPI_REQUEST_NULL, persistent_around = MPI_REQUEST_NULL;
static uint64_t p_in, p_out; /* what the persistent requests name */

static void check(uint64_t got, uint64_t round)
{
    uint64_t want = (uint64_t)np * (uint64_t)(np - 1) / 2 + (uint64_t)np * round;
    if (got != want) {
        fprintf(stderr, "collbench: rank %d round %llu: sum %llu, want %llu\n", me,
                (unsigned long long)round, (unsigned long long)got, (unsigned long long)want);
        MPI_Abort(MPI_COMM_WORLD, 3);
    }
}

/* One collective of `form`, through the MPI_ functions or around them. */
static uint64_t one(enum form form, int through, uint64_t in)
{
    uint64_t out = 0;
    MPI_Request r;
    switch (form) {
    case BLOCKING:
        (through ? MPI_Allreduce : PMPI_Allreduce)(&in, &out, 1, MPI_UINT64_T, MPI_SUM,
                                                  MPI_COMM_WORLD);
        return out;
    case NONBLOCKING:
        if (through) {
            MPI_Iallreduce(&in, &out, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD, &r);
            MPI_Wait(&r, MPI_STATUS_IGNORE);
        } else {
            PMPI_Iallreduce(&in, &out, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD, &r);
            PMPI_Wait(&r, MPI_STATUS_IGNORE);
        }
        return out;
    case PERSISTENT:
        p_in = in;
        if (through) {
            MPI_Start(&persistent_through);
            MPI_Wait(&persistent_through, MPI_STATUS_IGNORE);
        } else {
            PMPI_Start(&persistent_around);
            PMPI_Wait(&persistent_around, MPI_STATUS_IGNORE);
        }
        return p_out;
    }
    return 0;
}

/* One timed block of `rounds` collectives (seconds on rank 0). */
static double block(enum form form, int through, int rounds, uint64_t *round)
{
    PMPI_Barrier(MPI_COMM_WORLD);
    double start = MPI_Wtime();
    for (int i = 0; i < rounds; i++, (*round)++)
        check(one(form, through, (uint64_t)me + *round), *round);
    double seconds = MPI_Wtime() - start;
    PMPI_Barrier(MPI_COMM_WORLD);
    return seconds;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    MPI_Comm_size(MPI_COMM_WORLD, &np);
    int pairs = argc == 3 ? atoi(argv[1]) : 0, rounds = argc == 3 ? atoi(argv[2]) : 0;
    if (pairs < 1 || rounds < 1) {
        if (me == 0)
            fprintf(stderr, "usage: collbench PAIRS ROUNDS (positive integers)\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    int forms = 2;
#if MPI_VERSION >= 4
    MPI_Allreduce_init(&p_in, &p_out, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD, MPI_INFO_NULL,
                       &persistent_through);
    PMPI_Allreduce_init(&p_in, &p_out, 1, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD, MPI_INFO_NULL,
                        &persistent_around);
    forms = 3;
#endif
    uint64_t round = 0;
    for (int f = 0; f < forms; f++) {
        block((enum form)f, 1, rounds, &round); /* warm-up, both ways */
        block((enum form)f, 0, rounds, &round);
        for (int p = 0; p < pairs; p++) {
            double t[2];
            int first = p % 2; /* through first in odd pairs */
            t[first] = block((enum form)f, first, rounds, &round);
            t[!first] = block((enum form)f, !first, rounds, &round);
            if (me == 0)
                printf("ab %s %d rounds=%d through=%.9f around=%.9f\n", form_names[f], p, rounds,
                       t[1], t[0]);
        }
    }
    if (persistent_through != MPI_REQUEST_NULL)
        MPI_Request_free(&persistent_through);
    if (persistent_around != MPI_REQUEST_NULL)
        PMPI_Request_free(&persistent_around);
    fflush(stdout);
    MPI_Finalize();
    return 0;
}
