/* SymVirt explicit safe points for MPI applications and runtimes.
 *
 * Link: -lsymvirt_mpi_openmpi or -lsymvirt_mpi_mpich (the build matching your mpicc), or the
 * static .a plus -lpthread -ldl -lm -lrt -lgcc_s.
 *
 *   MPI_Init(&argc, &argv);
 *   symvirt_init(MPI_COMM_WORLD);          // registers with the guest agent
 *   for (;;) {
 *       one_iteration();                   // its messages are matched within the iteration
 *       symvirt_interconnect ic;
 *       int r = symvirt_safe_point(MPI_COMM_WORLD, &ic);
 *       if (r == SYMVIRT_RESUMED) { ... now on ic.kind / ic.device ... }
 *   }
 *   symvirt_finalize();
 *   MPI_Finalize();
 *
 * symvirt_safe_point is collective over comm and cheap when nothing is pending (one posted
 * MPI_Iallreduce of 8 bytes and one completed wait). When the agent asks for a migration, all
 * ranks stop at the same iteration (agreement pipelined two iterations deep: a rank only
 * waits for ranks two iterations behind it, and a cut falls two or three safe points after the
 * request; a program whose iterations take long sets SYMVIRT_SAFE_POINT_DEPTH=0 on every
 * rank: each safe point then waits for every rank, and the cut falls at the first or second
 * safe point after the request), run the quiesce hook, report quiesced through
 * the agent, wait for resume, run the resume hook, report resumed, pass a barrier, and return
 * SYMVIRT_RESUMED with the new interconnect (SYMVIRT_ABORTED when the migration was
 * cancelled, or refused: a rank whose MPI uses RDMA verbs reports unable instead of quiesced,
 * as its verbs endpoints would not survive the device swap). CONTRACT: each iteration's
 * messages are matched within the iteration.
 *
 * Resume hook: where a runtime re-selects its transport for the new interconnect (e.g.
 * finalize and re-initialise an MPI Session where the runtime supports it). It runs on every
 * rank before any rank leaves the safe point.
 *
 * Quiet phases: a cut in milliseconds while ranks compute between rare safe points.
 *
 *   for (;;) {
 *       exchange();                        // every message of the iteration matched here
 *       symvirt_quiet_begin(MPI_COMM_WORLD);
 *       compute_for_seconds();             // no MPI call, no message in flight
 *       int r = symvirt_quiet_end(MPI_COMM_WORLD, &ic);   // SYMVIRT_RESUMED: cut during it
 *       symvirt_safe_point(MPI_COMM_WORLD, NULL);          // optional, as before
 *   }
 *
 * Both are collective over the comm given to symvirt_init, in the same order on every rank.
 * CONTRACT: between them the rank makes no MPI call, and a message a rank sends before its
 * symvirt_quiet_begin is received before the receiver's symvirt_quiet_begin of the same
 * phase, unless the sender or the receiver declares its request outstanding across the
 * phase:
 *
 *       MPI_Irecv(..., &rq[0]); MPI_Isend(..., &rq[1]);
 *       symvirt_quiet_begin_requests(MPI_COMM_WORLD, 2, rq);
 *       compute_for_seconds();
 *       symvirt_quiet_end(MPI_COMM_WORLD, &ic);
 *       MPI_Waitall(2, rq, st);             // as usual: statuses intact
 *
 * Such requests must complete without any MPI call made after the phase began, on any rank
 * (their matching sends and receives are posted before the peers' phases begin). Before a cut
 * the library completes them, on every rank, with MPI_Request_get_status: it makes progress
 * and frees nothing, so the application's own wait after the phase completes them as usual. A
 * request that cannot complete holds the cut until SYMVIRT_QUIESCE_TIMEOUT_MS, then aborts the
 * job. symvirt_quiet_end may wait for them too (as the application's wait would). A
 * migration requested while the ranks are in the same quiet phase is cut there and then:
 * rank 0 decides when to cut and tells the others; a thread of the
 * library makes the cut on each rank's behalf while the rank goes on computing (quiesce hook
 * included, which then runs on that thread), and symvirt_quiet_end waits until the resume
 * (after the resume hook and a barrier) and returns SYMVIRT_RESUMED or SYMVIRT_ABORTED with
 * the interconnect. The thread calls MPI, so it needs MPI_THREAD_SERIALIZED or more
 * (MPI_Init_thread); at a lower level there is no thread and the cut is made at the phase's
 * begin or end instead. A request arriving outside a quiet phase is cut at the next quiet
 * phase's begin (or at a safe point, whichever comes first); several cuts may fall in one
 * phase. Cost: symvirt_quiet_end waits until every rank has ended the phase (a barrier: each
 * rank sends rank 0 one 16-byte message per phase and gets one of 24 bytes back).
 *
 * Errors are negative (SYMVIRT_ERR_*); symvirt_last_error() says why. Without an agent
 * (symvirt_init returned SYMVIRT_ERR_AGENT), or after the agent is lost, the safe point keeps
 * working as a collective no-op, so ranks never disagree. */
#ifndef SYMVIRT_H
#define SYMVIRT_H

#include <mpi.h>
#include "symvirt_core.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Collective over comm. Returns SYMVIRT_CONTINUE, or SYMVIRT_ERR_AGENT when no agent could be
 * reached (the safe point is set up anyway), or another error. */
int symvirt_init(MPI_Comm comm);
/* Collective over comm (the one given to symvirt_init); see above. ic may be NULL. */
int symvirt_safe_point(MPI_Comm comm, symvirt_interconnect *ic);
/* A quiet phase (see above): collective over comm, in the same order on every rank.
 * symvirt_quiet_begin returns SYMVIRT_CONTINUE or an error; symvirt_quiet_end returns
 * SYMVIRT_CONTINUE, or SYMVIRT_RESUMED / SYMVIRT_ABORTED (ic filled; ic may be NULL) when the
 * ranks were cut during the phase (the last cut's, if several), or an error. Unbalanced or
 * nested calls, and symvirt_safe_point inside a phase, return SYMVIRT_ERR_STATE. A failure of
 * the phases' own messages (an MPI error, or ranks found out of step) aborts the job with a
 * message on stderr: the other ranks would wait for this one forever. A rank that skips a
 * phase the others make may also hang the job, as a missing collective does. */
int symvirt_quiet_begin(MPI_Comm comm);
/* symvirt_quiet_begin with `count` requests outstanding across the phase (copied: the array
 * may be reused; the requests stay the application's to wait for after the phase). */
int symvirt_quiet_begin_requests(MPI_Comm comm, int count, const MPI_Request requests[]);
int symvirt_quiet_end(MPI_Comm comm, symvirt_interconnect *ic);
/* Hooks; call after symvirt_init. */
int symvirt_on_quiesce(void (*hook)(uint64_t epoch, void *ctx), void *ctx);
int symvirt_on_resume(void (*hook)(const symvirt_interconnect *ic, void *ctx), void *ctx);
/* Collective; closes the agent connection. */
int symvirt_finalize(void);

/* Fortran (gfortran, trailing underscore): the same calls with Fortran handles.
 *   call symvirt_init_f(comm, ierr); call symvirt_safe_point_f(comm, result, epoch, ierr)
 *   call symvirt_finalize_f(ierr) */
void symvirt_init_f_(MPI_Fint *comm, MPI_Fint *ierr);
void symvirt_safe_point_f_(MPI_Fint *comm, MPI_Fint *result, int64_t *epoch, MPI_Fint *ierr);
void symvirt_finalize_f_(MPI_Fint *ierr);
/*   call symvirt_quiet_begin_f(comm, ierr); call symvirt_quiet_end_f(comm, result, epoch, ierr) */
void symvirt_quiet_begin_f_(MPI_Fint *comm, MPI_Fint *ierr);
/*   call symvirt_quiet_begin_requests_f(comm, count, requests, ierr) */
void symvirt_quiet_begin_requests_f_(MPI_Fint *comm, MPI_Fint *count, MPI_Fint *requests,
                                     MPI_Fint *ierr);
void symvirt_quiet_end_f_(MPI_Fint *comm, MPI_Fint *result, int64_t *epoch, MPI_Fint *ierr);

#ifdef __cplusplus
}
#endif
#endif
