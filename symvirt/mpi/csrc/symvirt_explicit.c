/* Explicit safe points: the MPI glue of the safe-point state machine (Rust core, see
 * src/safepoint.rs). Compiled once per MPI implementation. Uses PMPI_* so that the layer's own
 * traffic is never counted or intercepted by a PMPI tool, and a private duplicate of the
 * user's communicator so it never matches the application's messages. */
#include "symvirt.h"

#include <stdlib.h>
#include <string.h>

static struct {
    MPI_Comm comm; /* private duplicate */
    MPI_Request req[SYMVIRT_SLOTS];
    uint64_t send[SYMVIRT_SLOTS];
    uint64_t recv[SYMVIRT_SLOTS];
    symvirt_sp *sp;
} g = {.comm = MPI_COMM_NULL};

static int op_start(void *ctx, int slot, uint64_t value)
{
    (void)ctx;
    g.send[slot] = value;
    return PMPI_Iallreduce(&g.send[slot], &g.recv[slot], 1, MPI_UINT64_T, MPI_MAX, g.comm,
                           &g.req[slot]);
}

static int op_finish(void *ctx, int slot, uint64_t *result)
{
    (void)ctx;
    int rc = PMPI_Wait(&g.req[slot], MPI_STATUS_IGNORE);
    *result = g.recv[slot];
    return rc;
}

static int op_barrier(void *ctx)
{
    (void)ctx;
    return PMPI_Barrier(g.comm);
}

static const symvirt_agreement_ops OPS = {op_start, op_finish, op_barrier};

int symvirt_init(MPI_Comm comm)
{
    if (g.sp != NULL)
        return SYMVIRT_ERR_STATE;
    int rank = 0;
    if (PMPI_Comm_rank(MPI_COMM_WORLD, &rank) != MPI_SUCCESS)
        return SYMVIRT_ERR_MPI;
    if (PMPI_Comm_dup(comm, &g.comm) != MPI_SUCCESS)
        return SYMVIRT_ERR_MPI;
    PMPI_Comm_set_errhandler(g.comm, MPI_ERRORS_RETURN);
    /* Connecting may fail (no agent): the safe point is set up anyway so that every rank
     * takes part in the same collectives. */
    int agent = symvirt_ctl_open((uint32_t)rank, NULL,
                                 symvirt_env_ms("SYMVIRT_CONNECT_TIMEOUT_MS", 10000));
    g.sp = symvirt_sp_new(&OPS, NULL, symvirt_env_ms("SYMVIRT_QUIESCE_TIMEOUT_MS", 600000));
    if (g.sp == NULL)
        return SYMVIRT_ERR_STATE;
    return agent < 0 ? agent : SYMVIRT_CONTINUE;
}

int symvirt_safe_point(MPI_Comm comm, symvirt_interconnect *ic)
{
    (void)comm; /* the private duplicate made at init carries the agreement */
    if (g.sp == NULL)
        return SYMVIRT_ERR_STATE;
    return symvirt_sp_poll(g.sp, ic);
}

int symvirt_on_quiesce(void (*hook)(uint64_t epoch, void *ctx), void *ctx)
{
    return g.sp == NULL ? SYMVIRT_ERR_STATE : symvirt_sp_on_quiesce(g.sp, hook, ctx);
}

int symvirt_on_resume(void (*hook)(const symvirt_interconnect *ic, void *ctx), void *ctx)
{
    return g.sp == NULL ? SYMVIRT_ERR_STATE : symvirt_sp_on_resume(g.sp, hook, ctx);
}

int symvirt_finalize(void)
{
    if (g.sp == NULL)
        return SYMVIRT_ERR_STATE;
    int rc = symvirt_sp_free(g.sp);
    g.sp = NULL;
    if (g.comm != MPI_COMM_NULL)
        PMPI_Comm_free(&g.comm);
    return rc;
}

void symvirt_init_f_(MPI_Fint *comm, MPI_Fint *ierr)
{
    *ierr = symvirt_init(MPI_Comm_f2c(*comm));
}

void symvirt_safe_point_f_(MPI_Fint *comm, MPI_Fint *result, int64_t *epoch, MPI_Fint *ierr)
{
    symvirt_interconnect ic;
    memset(&ic, 0, sizeof ic);
    int r = symvirt_safe_point(MPI_Comm_f2c(*comm), &ic);
    *result = r < 0 ? 0 : r;
    *epoch = (int64_t)ic.epoch;
    *ierr = r < 0 ? r : 0;
}

void symvirt_finalize_f_(MPI_Fint *ierr)
{
    *ierr = symvirt_finalize();
}
