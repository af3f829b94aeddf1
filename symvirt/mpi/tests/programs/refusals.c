/* Under the transparent layer, calls it cannot make correct fail at the call, through the
 * error handler, with MPI_ERR_UNSUPPORTED_OPERATION: MPI_Cancel of a pending non-blocking
 * collective, of a pending send (its count was taken when it started), and of a pending
 * MPI_Isendrecv (MPI 4, for the same reason); MPI_Sendrecv_replace_c with a count above
 * INT_MAX (MPI 4); MPI_Request_free of a persistent collective started while a member has
 * not started it yet (MPI 4: erroneous for an active one). The program then
 * goes on: the collective and the send still complete, the message is received intact. A
 * receive too small for its message fails with MPI_ERR_TRUNCATE, as without the layer, and
 * reaches a program's error handler once.
 * With -DSYMVIRT_EXPLICIT (linked with the explicit library instead), misuse of quiet phases
 * fails with SYMVIRT_ERR_STATE and changes nothing: symvirt_quiet_end outside a phase, a
 * negative request count or a missing request array, a nested symvirt_quiet_begin(_requests),
 * symvirt_safe_point inside a phase; the phase then ends normally.
 * Prints "refusals OK rank R".
 *
 *   refusals */
#include <limits.h>
#include <mpi.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#ifdef SYMVIRT_EXPLICIT
#include "symvirt.h"
#endif

#define WORDS (32 * 1024) /* rendezvous in both implementations */

static int me;
static int handled; /* errors the counting error handler saw */

static void count_error(MPI_Comm *comm, int *code, ...)
{
    (void)comm;
    (void)code;
    handled++;
}

static void fail(const char *what, int rc)
{
    fprintf(stderr, "refusals FAIL rank %d: %s (code %d)\n", me, what, rc);
    fflush(stderr);
    MPI_Abort(MPI_COMM_WORLD, 3);
}

#ifdef SYMVIRT_EXPLICIT
static void check_quiet_phase_misuse(void)
{
    int rc = symvirt_init(MPI_COMM_WORLD);
    if (rc != SYMVIRT_CONTINUE)
        fail("symvirt_init", rc);
    for (int round = 0; round < 3; round++) {
        if ((rc = symvirt_quiet_end(MPI_COMM_WORLD, NULL)) != SYMVIRT_ERR_STATE)
            fail("symvirt_quiet_end outside a quiet phase was not refused", rc);
        if ((rc = symvirt_quiet_begin_requests(MPI_COMM_WORLD, -1, NULL)) != SYMVIRT_ERR_STATE)
            fail("a negative request count was not refused", rc);
        if ((rc = symvirt_quiet_begin_requests(MPI_COMM_WORLD, 2, NULL)) != SYMVIRT_ERR_STATE)
            fail("requests without their array were not refused", rc);
        if ((rc = symvirt_quiet_begin(MPI_COMM_WORLD)) != SYMVIRT_CONTINUE)
            fail("symvirt_quiet_begin", rc);
        if ((rc = symvirt_quiet_begin(MPI_COMM_WORLD)) != SYMVIRT_ERR_STATE)
            fail("a nested symvirt_quiet_begin was not refused", rc);
        MPI_Request none = MPI_REQUEST_NULL;
        if ((rc = symvirt_quiet_begin_requests(MPI_COMM_WORLD, 1, &none)) != SYMVIRT_ERR_STATE)
            fail("a nested symvirt_quiet_begin_requests was not refused", rc);
        if ((rc = symvirt_safe_point(MPI_COMM_WORLD, NULL)) != SYMVIRT_ERR_STATE)
            fail("symvirt_safe_point inside a quiet phase was not refused", rc);
        if ((rc = symvirt_finalize()) != SYMVIRT_ERR_STATE)
            fail("symvirt_finalize inside a quiet phase was not refused", rc);
        if ((rc = symvirt_quiet_end(MPI_COMM_WORLD, NULL)) != SYMVIRT_CONTINUE)
            fail("symvirt_quiet_end", rc);
        if ((rc = symvirt_safe_point(MPI_COMM_WORLD, NULL)) != SYMVIRT_CONTINUE)
            fail("symvirt_safe_point", rc);
    }
    if ((rc = symvirt_finalize()) != SYMVIRT_CONTINUE)
        fail("symvirt_finalize", rc);
}
#endif

int main(int argc, char **argv)
{
    int np;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &me);
    MPI_Comm_size(MPI_COMM_WORLD, &np);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_set_errhandler(MPI_COMM_SELF, MPI_ERRORS_RETURN);
#ifdef SYMVIRT_EXPLICIT
    check_quiet_phase_misuse();
    printf("refusals OK rank %d\n", me);
    fflush(stdout);
    MPI_Finalize();
    return 0;
#endif

    /* Rank 0 starts the Ibarrier only once every other rank has cancelled its own, so theirs
     * are pending then; rank 0's may complete at once (cancelling it then does nothing). */
    MPI_Request r;
    int rc, token = 0;
    if (me == 0)
        for (int p = 1; p < np; p++)
            MPI_Recv(&token, 1, MPI_INT, p, 4, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    MPI_Ibarrier(MPI_COMM_WORLD, &r);
    rc = MPI_Cancel(&r);
    if (me != 0 && rc != MPI_ERR_UNSUPPORTED_OPERATION)
        fail("MPI_Cancel of a pending non-blocking collective was not refused", rc);
    if (me != 0)
        MPI_Send(&token, 1, MPI_INT, 0, 4, MPI_COMM_WORLD);
    MPI_Wait(&r, MPI_STATUS_IGNORE);

    /* A synchronous send cannot complete before the barrier: the peer receives after it. */
    int right = (me + 1) % np, left = (me + np - 1) % np;
    uint64_t *out = malloc(WORDS * sizeof *out), *in = malloc(WORDS * sizeof *in);
    for (int i = 0; i < WORDS; i++)
        out[i] = ((uint64_t)me << 32) | (uint64_t)i;
    MPI_Request s;
    MPI_Issend(out, WORDS, MPI_UINT64_T, right, 5, MPI_COMM_WORLD, &s);
    rc = MPI_Cancel(&s);
    if (rc != MPI_ERR_UNSUPPORTED_OPERATION)
        fail("MPI_Cancel of a pending send was not refused", rc);
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Status st;
    MPI_Recv(in, WORDS, MPI_UINT64_T, left, 5, MPI_COMM_WORLD, &st);
    MPI_Wait(&s, &st);
    int cancelled = 1;
    MPI_Test_cancelled(&st, &cancelled);
    if (cancelled)
        fail("the send was cancelled", 0);
    for (int i = 0; i < WORDS; i++)
        if (in[i] != (((uint64_t)left << 32) | (uint64_t)i))
            fail("payload", i);
#if MPI_VERSION >= 4
    /* MPI 4: cancelling a pending MPI_Isendrecv is refused as well (its send was counted);
     * the request still completes, with its receive's message and status. */
    uint64_t mine = (uint64_t)me, got = UINT64_MAX, passed = UINT64_MAX;
    MPI_Request sr;
    MPI_Isendrecv(&mine, 1, MPI_UINT64_T, right, 7, &got, 1, MPI_UINT64_T, left, 8,
                  MPI_COMM_WORLD, &sr);
    rc = MPI_Cancel(&sr);
    if (rc != MPI_ERR_UNSUPPORTED_OPERATION)
        fail("MPI_Cancel of a pending MPI_Isendrecv was not refused", rc);
    MPI_Barrier(MPI_COMM_WORLD);
    MPI_Send(&mine, 1, MPI_UINT64_T, right, 8, MPI_COMM_WORLD);
    MPI_Recv(&passed, 1, MPI_UINT64_T, left, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    MPI_Wait(&sr, &st);
    cancelled = 1;
    MPI_Test_cancelled(&st, &cancelled);
    if (cancelled || got != (uint64_t)left || passed != (uint64_t)left ||
        st.MPI_SOURCE != left || st.MPI_TAG != 8)
        fail("the MPI_Isendrecv after a refused cancel", 0);
    /* A large-count call the layer serves through its int form fails beyond an int, before
     * touching anything. */
    rc = MPI_Sendrecv_replace_c(&mine, (MPI_Count)INT_MAX + 1, MPI_BYTE, right, 9, left, 9,
                                MPI_COMM_WORLD, &st);
    if (rc != MPI_ERR_UNSUPPORTED_OPERATION)
        fail("MPI_Sendrecv_replace_c above INT_MAX was not refused", rc);
    /* A persistent collective that every rank but 0 starts before a barrier (on another
     * communicator) and rank 0 after it: the others' starts wait for rank 0's, and freeing one
     * meanwhile is refused; then it completes. */
    MPI_Comm pc;
    MPI_Comm_dup(MPI_COMM_WORLD, &pc);
    uint64_t word = me == 0 ? 42 : 0;
    MPI_Request pb;
    MPI_Bcast_init(&word, 1, MPI_UINT64_T, 0, pc, MPI_INFO_NULL, &pb);
    if (me != 0) {
        MPI_Start(&pb);
        rc = MPI_Request_free(&pb);
        if (rc != MPI_ERR_UNSUPPORTED_OPERATION || pb == MPI_REQUEST_NULL)
            fail("MPI_Request_free of a started persistent collective was not refused", rc);
    }
    MPI_Barrier(MPI_COMM_WORLD);
    if (me == 0)
        MPI_Start(&pb);
    MPI_Wait(&pb, MPI_STATUS_IGNORE);
    if (word != 42)
        fail("the persistent Bcast after a refused free", (int)word);
    MPI_Request_free(&pb);
    MPI_Comm_free(&pc);
#endif
    /* A receive too small for its message fails as MPI makes it fail (the layer's own receive
     * path must pass the error on), and the next message arrives intact. */
    uint64_t big[4] = {1, 2, 3, (uint64_t)me}, small[2] = {0, 0};
    MPI_Send(big, 4, MPI_UINT64_T, right, 6, MPI_COMM_WORLD);
    MPI_Send(&big[3], 1, MPI_UINT64_T, right, 6, MPI_COMM_WORLD);
    MPI_Barrier(MPI_COMM_WORLD); /* both there before the receives: the arrived-message path */
    rc = MPI_Recv(small, 2, MPI_UINT64_T, left, 6, MPI_COMM_WORLD, &st);
    int klass = 0;
    MPI_Error_class(rc, &klass);
    if (klass != MPI_ERR_TRUNCATE)
        fail("a truncated receive did not fail with MPI_ERR_TRUNCATE", rc);
    rc = MPI_Recv(small, 2, MPI_UINT64_T, left, 6, MPI_COMM_WORLD, &st);
    int n = 0;
    MPI_Get_count(&st, MPI_UINT64_T, &n);
    if (rc != MPI_SUCCESS || n != 1 || small[0] != (uint64_t)left)
        fail("the message after a truncated one", rc);
    /* That error reaches the program's error handler once, through the layer's blocking
     * receive and through MPI_Irecv + MPI_Wait alike. */
    MPI_Errhandler counting;
    MPI_Comm_create_errhandler(count_error, &counting);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, counting);
    MPI_Send(big, 4, MPI_UINT64_T, right, 7, MPI_COMM_WORLD);
    MPI_Send(big, 4, MPI_UINT64_T, right, 7, MPI_COMM_WORLD);
    MPI_Barrier(MPI_COMM_WORLD);
    handled = 0;
    MPI_Recv(small, 2, MPI_UINT64_T, left, 7, MPI_COMM_WORLD, &st);
    if (handled != 1)
        fail("a truncated receive did not reach the error handler once", handled);
    MPI_Request truncated;
    MPI_Irecv(small, 2, MPI_UINT64_T, left, 7, MPI_COMM_WORLD, &truncated);
    handled = 0;
    MPI_Wait(&truncated, &st);
    if (handled != 1)
        fail("a truncated MPI_Wait did not reach the error handler once", handled);
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Errhandler_free(&counting);
    MPI_Barrier(MPI_COMM_WORLD);
    printf("refusals OK rank %d\n", me);
    fflush(stdout);
    free(out);
    free(in);
    MPI_Finalize();
    return 0;
}
