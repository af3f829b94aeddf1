/* Ping-pong between ranks 0 and 1 (other ranks wait in a barrier): the normal-run cost of the
 * transparent layer (run with and without LD_PRELOAD, interleaved).
 *
 *   pingpong BYTES ROUNDS
 *
 * Rank 0 prints one line: "pingpong bytes=B rounds=R seconds=S" (S: wall time of the timed
 * rounds, after ROUNDS/10 warm-up rounds). Payload checked on the last round. */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int me, np;
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    MPI_Comm_size(MPI_COMM_WORLD, &np);
    if (argc != 3 || np < 2) {
        if (me == 0)
            fprintf(stderr, "usage: pingpong BYTES ROUNDS (2+ ranks)\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    int bytes = atoi(argv[1]), rounds = atoi(argv[2]), warm = rounds / 10;
    unsigned char *buf = malloc((size_t)bytes + 1);
    memset(buf, me, (size_t)bytes + 1);
    double start = 0;
    for (int i = 0; i < warm + rounds; i++) {
        if (i == warm) {
            MPI_Barrier(MPI_COMM_WORLD);
            start = MPI_Wtime();
        }
        if (me == 0) {
            buf[0] = (unsigned char)i;
            MPI_Send(buf, bytes, MPI_BYTE, 1, 1, MPI_COMM_WORLD);
            MPI_Recv(buf, bytes, MPI_BYTE, 1, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            if (bytes > 0 && buf[0] != (unsigned char)(i + 1))
                MPI_Abort(MPI_COMM_WORLD, 3);
        } else if (me == 1) {
            MPI_Recv(buf, bytes, MPI_BYTE, 0, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            if (bytes > 0)
                buf[0] = (unsigned char)(buf[0] + 1);
            MPI_Send(buf, bytes, MPI_BYTE, 0, 1, MPI_COMM_WORLD);
        }
    }
    double seconds = MPI_Wtime() - start;
    MPI_Barrier(MPI_COMM_WORLD);
    if (me == 0)
        printf("pingpong bytes=%d rounds=%d seconds=%.9f\n", bytes, rounds, seconds);
    free(buf);
    MPI_Finalize();
    return 0;
}
