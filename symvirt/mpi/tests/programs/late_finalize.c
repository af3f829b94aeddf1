/* Test harness, preloaded into MPICH ranks (LD_PRELOAD): makes rank 0 late in MPI_Finalize in
 * the way that deadlocks MPICH before 4.2 over UCX's TCP transport (see csrc/ucx_finalize.c).
 * At its first ucp_disconnect_nb, rank 0 progresses UCX for 300 ms before it closes its
 * endpoints: it answers the peers' flushes, so their closes complete and, without the cure,
 * they wait in MPICH's PMI barrier, never answering the flushes rank 0 then sends. Seen
 * without the harness (a rank that reaches the closes later than its peers), it makes every
 * launch meet the deadlock instead of some. Preloaded after the cure's definitions (the
 * layer's, or the program's own), so that MPICH's calls still reach the cure first; everything
 * passes through to the next definition (libucp's). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <ucp/api/ucp.h>

static ucp_worker_h workers[64];
static int nworkers;

ucs_status_t ucp_worker_create(ucp_context_h context, const ucp_worker_params_t *params,
                               ucp_worker_h *worker_p)
{
    ucs_status_t (*next)(ucp_context_h, const ucp_worker_params_t *, ucp_worker_h *) =
        dlsym(RTLD_NEXT, "ucp_worker_create");
    ucs_status_t st = next(context, params, worker_p);
    if (st == UCS_OK && nworkers < 64)
        workers[nworkers++] = *worker_p;
    return st;
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec * 1e-9;
}

ucs_status_ptr_t ucp_disconnect_nb(ucp_ep_h ep)
{
    static int late_done;
    const char *rank = getenv("PMI_RANK");
    if (!late_done && rank != NULL && strcmp(rank, "0") == 0) {
        late_done = 1;
        unsigned (*progress)(ucp_worker_h) = dlsym(RTLD_NEXT, "ucp_worker_progress");
        for (double end = now() + 0.3; now() < end;)
            for (int i = 0; i < nworkers; i++)
                progress(workers[i]);
    }
    ucs_status_ptr_t (*next)(ucp_ep_h) = dlsym(RTLD_NEXT, "ucp_disconnect_nb");
    return next(ep);
}
