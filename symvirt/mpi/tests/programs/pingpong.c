/* Ping-pong between ranks 0 and 1 (other ranks wait in a barrier): the normal-run cost of the
 * transparent layer (benches/mpi_overhead.rs runs it with and without LD_PRELOAD, interleaved).
 *
 *   pingpong SAMPLES LAT_BYTES LAT_ROUNDS BW_BYTES BW_ROUNDS [AB_PAIRS]
 *
 * After untimed warm-up rounds of both sizes, every sample times LAT_ROUNDS round trips of
 * LAT_BYTES, then BW_ROUNDS round trips of BW_BYTES, each with MPI_Wtime between two barriers
 * (so only the ping-pong itself is timed). Rank 0 prints one line per timed phase:
 *
 *   sample N latency|bandwidth bytes=B rounds=R seconds=S
 *
 * With AB_PAIRS, the samples are followed by that many sets of latency blocks of AB_ROUNDS
 * (LAT_ROUNDS / 25, at least 100) round trips each, a millisecond apart, each block in each
 * place of the set in turn: one through MPI_Send and MPI_Recv (the layer's wrappers when it is
 * preloaded), one around them through PMPI_Send and PMPI_Recv, and the two floors of any
 * blocking receive that can answer a cut while it waits (PMPI_Send with PMPI_Irecv then
 * PMPI_Wait: `request`; with PMPI_Irecv then PMPI_Test until it completes: `polled`). Rank 0
 * prints one line per set:
 *
 *   ab N bytes=B rounds=R through=S around=S request=S polled=S
 *
 * The blocks of a set run in one process, so they share the machine's speed regime, which
 * launches do not; without the layer `through` and `around` are the same MPI functions, and
 * their ratio shows what this estimate's noise is.
 *
 * Then AB_PAIRS / 10 (rounded up) pairs of bandwidth blocks of BW_ROUNDS / 10 (at least 2)
 * round trips of BW_BYTES, through the wrappers and around them (MPI_Send with MPI_Recv,
 * PMPI_Send with PMPI_Recv), in alternating order; rank 0 prints:
 *
 *   bw N bytes=B rounds=R through=S around=S
 *
 * Then AB_PAIRS pairs of blocks of receives whose message has arrived already (a message sent
 * before its receive is posted, as in most halo exchanges): rank 1 sends ARRIVED 8-byte
 * messages, both ranks pass a barrier, rank 0 times receiving them; through the wrappers, then
 * around them (MPI_Send with MPI_Recv, PMPI_Send with PMPI_Recv), in alternating order. This
 * path has no waiting in it, so it is the same in every speed regime. Rank 0 prints:
 *
 *   arrived N count=K through=S around=S
 *
 * Every round checks the first and last byte of the payload (the peer increments both), so a
 * layer that lost or truncated a message fails the run (exit through MPI_Abort). */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int me;

typedef int (*send_fn)(const void *, int, MPI_Datatype, int, int, MPI_Comm);
typedef int (*recv_fn)(void *, int, MPI_Datatype, int, int, MPI_Comm, MPI_Status *);

/* `rounds` round trips of `bytes` between ranks 0 and 1 through `send` and `recv`; `seq`
 * numbers the rounds across calls so every round's payload differs from the last one's. */
static void rounds_via(send_fn send, recv_fn recv, unsigned char *buf, int bytes, int rounds,
                       unsigned *seq)
{
    int last = bytes > 0 ? bytes - 1 : 0;
    for (int i = 0; i < rounds; i++, (*seq)++) {
        unsigned char mark = (unsigned char)*seq;
        if (me == 0) {
            if (bytes > 0)
                buf[0] = buf[last] = mark;
            send(buf, bytes, MPI_BYTE, 1, 1, MPI_COMM_WORLD);
            recv(buf, bytes, MPI_BYTE, 1, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            if (bytes > 0 &&
                (buf[0] != (unsigned char)(mark + 1) || buf[last] != (unsigned char)(mark + 1))) {
                fprintf(stderr, "pingpong: round %u of %d bytes came back wrong\n", *seq, bytes);
                MPI_Abort(MPI_COMM_WORLD, 3);
            }
        } else if (me == 1) {
            recv(buf, bytes, MPI_BYTE, 0, 1, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            if (bytes > 0) {
                buf[0] = (unsigned char)(buf[0] + 1);
                if (last > 0)
                    buf[last] = (unsigned char)(buf[last] + 1);
            }
            send(buf, bytes, MPI_BYTE, 0, 1, MPI_COMM_WORLD);
        }
    }
}

static void rounds_of(unsigned char *buf, int bytes, int rounds, unsigned *seq)
{
    rounds_via(MPI_Send, MPI_Recv, buf, bytes, rounds, seq);
}

/* The two floors of a blocking receive that can answer a cut while it waits (it must be able
 * to return to the layer, so it cannot be MPI's own blocking receive), through MPI's
 * interface and without the layer: a request (PMPI_Irecv, then PMPI_Wait, which does not
 * return early: the price of the request alone), and a request polled (PMPI_Test until it
 * completes: a loop the layer could leave between turns). */
static int request_recv(void *buf, int count, MPI_Datatype dt, int src, int tag, MPI_Comm comm,
                        MPI_Status *st)
{
    MPI_Request r;
    int rc = PMPI_Irecv(buf, count, dt, src, tag, comm, &r);
    return rc != MPI_SUCCESS ? rc : PMPI_Wait(&r, st);
}

static int polled_recv(void *buf, int count, MPI_Datatype dt, int src, int tag, MPI_Comm comm,
                       MPI_Status *st)
{
    MPI_Request r;
    int flag = 0, rc = PMPI_Irecv(buf, count, dt, src, tag, comm, &r);
    while (rc == MPI_SUCCESS && !flag)
        rc = PMPI_Test(&r, &flag, st);
    return rc;
}

/* One block of `rounds` round trips, timed on rank 0 (a round trip needs both ranks, so the
 * blocks need no barrier between them). */
static double block_via(send_fn send, recv_fn recv, unsigned char *buf, int bytes, int rounds,
                        unsigned *seq)
{
    double start = MPI_Wtime();
    rounds_via(send, recv, buf, bytes, rounds, seq);
    return MPI_Wtime() - start;
}

enum { AB_BLOCKS = 4 };

/* Set p of n blocks (n <= AB_BLOCKS), block v through sends[v] and recvs[v]: each block in
 * each place of the set in turn as p goes on. t[v] gets block v's time on rank 0. */
static void set_via(int n, const send_fn *sends, const recv_fn *recvs, unsigned char *buf,
                    int bytes, int rounds, int p, unsigned *seq, double *t)
{
    for (int b = 0; b < n; b++) {
        int v = (b + p) % n;
        t[v] = block_via(sends[v], recvs[v], buf, bytes, rounds, seq);
    }
}

static double timed(unsigned char *buf, int bytes, int rounds, unsigned *seq)
{
    MPI_Barrier(MPI_COMM_WORLD);
    double start = MPI_Wtime();
    rounds_of(buf, bytes, rounds, seq);
    double seconds = MPI_Wtime() - start;
    MPI_Barrier(MPI_COMM_WORLD);
    return seconds;
}

enum { ARRIVED = 16 };

/* ARRIVED messages sent by rank 1 and, once they are there, received by rank 0 through
 * `recv`; returns rank 0's time for the receives. */
static double arrived_via(send_fn send, recv_fn recv, unsigned *seq)
{
    unsigned char msg[8] = {0};
    if (me == 1)
        for (int i = 0; i < ARRIVED; i++) {
            msg[0] = (unsigned char)(*seq + (unsigned)i);
            send(msg, 8, MPI_BYTE, 0, 2, MPI_COMM_WORLD);
        }
    MPI_Barrier(MPI_COMM_WORLD);
    double seconds = 0;
    if (me == 0) {
        double start = MPI_Wtime();
        for (int i = 0; i < ARRIVED; i++) {
            recv(msg, 8, MPI_BYTE, 1, 2, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            if (msg[0] != (unsigned char)(*seq + (unsigned)i)) {
                fprintf(stderr, "pingpong: arrived message %d came back wrong\n", i);
                MPI_Abort(MPI_COMM_WORLD, 3);
            }
        }
        seconds = MPI_Wtime() - start;
    }
    *seq += ARRIVED;
    MPI_Barrier(MPI_COMM_WORLD);
    return seconds;
}

static int positive(const char *arg, int allow_zero)
{
    char *end = NULL;
    long v = strtol(arg, &end, 10);
    if (end == arg || *end != '\0' || v < (allow_zero ? 0 : 1) || v > (1L << 30))
        return -1;
    return (int)v;
}

int main(int argc, char **argv)
{
    MPI_Init(&argc, &argv);
    int np;
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    MPI_Comm_size(MPI_COMM_WORLD, &np);
    int args = argc == 6 || argc == 7;
    int samples = args ? positive(argv[1], 0) : -1;
    int lat_bytes = args ? positive(argv[2], 1) : -1;
    int lat_rounds = args ? positive(argv[3], 0) : -1;
    int bw_bytes = args ? positive(argv[4], 1) : -1;
    int bw_rounds = args ? positive(argv[5], 0) : -1;
    int ab_pairs = argc == 7 ? positive(argv[6], 1) : 0;
    if (samples < 0 || lat_bytes < 0 || lat_rounds < 0 || bw_bytes < 0 || bw_rounds < 0 ||
        ab_pairs < 0 || np < 2) {
        if (me == 0)
            fprintf(stderr, "usage: pingpong SAMPLES LAT_BYTES LAT_ROUNDS BW_BYTES BW_ROUNDS "
                            "[AB_PAIRS] (positive integers, 2+ ranks)\n");
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    size_t size = (size_t)(lat_bytes > bw_bytes ? lat_bytes : bw_bytes) + 1;
    unsigned char *buf = malloc(size);
    if (buf == NULL) {
        fprintf(stderr, "pingpong: cannot allocate %zu bytes\n", size);
        MPI_Abort(MPI_COMM_WORLD, 2);
    }
    memset(buf, me, size);
    unsigned seq = 0;

    /* Warm-up, untimed: connections, eager/rendezvous paths, caches, page faults. */
    rounds_of(buf, lat_bytes, lat_rounds / 10 > 100 ? lat_rounds / 10 : 100, &seq);
    rounds_of(buf, bw_bytes, bw_rounds / 10 > 2 ? bw_rounds / 10 : 2, &seq);

    for (int s = 0; s < samples; s++) {
        double lat = timed(buf, lat_bytes, lat_rounds, &seq);
        double bw = timed(buf, bw_bytes, bw_rounds, &seq);
        if (me == 0) {
            printf("sample %d latency bytes=%d rounds=%d seconds=%.9f\n", s, lat_bytes, lat_rounds,
                   lat);
            printf("sample %d bandwidth bytes=%d rounds=%d seconds=%.9f\n", s, bw_bytes, bw_rounds,
                   bw);
            fflush(stdout);
        }
    }

    int ab_rounds = lat_rounds / 25 > 100 ? lat_rounds / 25 : 100;
    const recv_fn recvs[AB_BLOCKS] = {MPI_Recv, PMPI_Recv, request_recv, polled_recv};
    const send_fn sends[AB_BLOCKS] = {MPI_Send, PMPI_Send, PMPI_Send, PMPI_Send};
    double t[AB_BLOCKS];
    for (int p = 0; p < ab_pairs; p++) {
        set_via(AB_BLOCKS, sends, recvs, buf, lat_bytes, ab_rounds, p, &seq, t);
        if (me == 0)
            printf("ab %d bytes=%d rounds=%d through=%.9f around=%.9f request=%.9f "
                   "polled=%.9f\n",
                   p, lat_bytes, ab_rounds, t[0], t[1], t[2], t[3]);
    }
    int bw_ab_rounds = bw_rounds / 10 > 2 ? bw_rounds / 10 : 2;
    for (int p = 0; p < (ab_pairs + 9) / 10; p++) {
        set_via(2, sends, recvs, buf, bw_bytes, bw_ab_rounds, p, &seq, t); /* through, around */
        if (me == 0)
            printf("bw %d bytes=%d rounds=%d through=%.9f around=%.9f\n", p, bw_bytes,
                   bw_ab_rounds, t[0], t[1]);
    }
    for (int p = 0; p < ab_pairs; p++) {
        double through = 0, around = 0;
        if (p % 2 == 0) {
            through = arrived_via(MPI_Send, MPI_Recv, &seq);
            around = arrived_via(PMPI_Send, PMPI_Recv, &seq);
        } else {
            around = arrived_via(PMPI_Send, PMPI_Recv, &seq);
            through = arrived_via(MPI_Send, MPI_Recv, &seq);
        }
        if (me == 0)
            printf("arrived %d count=%d through=%.9f around=%.9f\n", p, ARRIVED, through, around);
    }
    if (me == 0)
        fflush(stdout);
    free(buf);
    MPI_Finalize();
    return 0;
}
