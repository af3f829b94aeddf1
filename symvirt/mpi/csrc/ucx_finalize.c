/* ---- MPICH before 4.2 over UCX's TCP transport: a deadlock in MPI_Finalize, cured ----------
 *
 * MPICH 4.0 and 4.1 (device ch4:ucx, as Debian 12 builds 4.0.2) end MPI_Finalize by closing
 * every UCX endpoint of MPI_COMM_WORLD in flush mode (ucp_disconnect_nb), progressing UCX
 * until every close completed, and only then entering a PMI barrier. Over UCX's TCP
 * transport (UCX 1.12 and later) the flush of an endpoint that sent anything since its last
 * flush sends an empty put and waits for the peer's acknowledgement, which the peer sends
 * only while it progresses UCX. A peer whose own closes completed first waits in the PMI
 * barrier, where it never progresses: the rank that still waits for its acknowledgement
 * spins forever, and so does the job. MPICH 4.2 moved the PMI barrier before the closes.
 * Seen here: 7 of 20 launches of 4 ranks whose traffic all went over TCP hung there, 24 of
 * 30 when one rank reached MPI_Finalize 2 ms after the others; and a job of the virtual
 * cluster whose ranks had all printed their results did not end (rank 0 spinning in
 * MPI_Finalize, rank 1 in the PMI read).
 *
 * The cure, fitted to MPICH's own sequence, interposes two UCX calls (a program or
 * LD_PRELOAD library defines them before libucp in the lookup order; MPICH calls them
 * through its PLT): ucp_worker_create, to know MPICH's workers, and ucp_disconnect_nb, which
 * in MPICH only MPI_Finalize calls. Only calls made from MPICH's library count (libucp calls
 * ucp_disconnect_nb itself, and a process may use UCX elsewhere). At the last of the world's
 * closes (PMI_SIZE times the square of the number of workers: one per pair of virtual network
 * interfaces) this rank progresses UCX
 * until its own closes completed, then enters a PMI barrier of its own and goes on
 * progressing until every rank entered it. So no rank stops progressing while a peer still
 * waits for its acknowledgement: when the barrier ends, every rank's closes are complete,
 * and MPICH's loop and its PMI barrier follow without waiting on anyone. The barrier goes
 * over the launcher's PMI_FD in PMI-1's wire format (cmd=barrier_in, cmd=barrier_out), as
 * MPICH's built-in client speaks it there between its own requests (every rank adds the
 * same one barrier, so every rank of a job must carry the cure, with the same setting). Not
 * applied without PMI_FD and PMI_SIZE (process managers that connect otherwise), nor with
 * SYMVIRT_MPICH_FINALIZE_BARRIER=0; it costs the normal run nothing
 * (one call per worker at MPI_Init, the interposed closes at MPI_Finalize). Part of both C
 * libraries (mpi_build.rs) and, with the feature rsmpi, of every Rust program (build.rs);
 * empty unless mpi.h is MPICH's before 4.2. UCX's few types are declared here (its C ABI, as
 * UCX 1.x defines it), so the cure does not depend on where ucp.h is installed. */
#define _GNU_SOURCE /* RTLD_NEXT */
#include <mpi.h>

#if defined(MPICH_CALC_VERSION)
#if MPICH_NUMVERSION < MPICH_CALC_VERSION(4, 2, 0, MPICH_RELEASE_TYPE_ALPHA, 0)

#include <dlfcn.h>
#include <errno.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* UCX's types as ucp.h and ucs/type/status.h define them: opaque handles, a status that is a
 * packed (one-byte) enum, and a pointer that is a request, NULL (UCS_OK) or an error code. */
typedef struct ucp_context *ucp_context_h;
typedef struct ucp_worker *ucp_worker_h;
typedef struct ucp_ep *ucp_ep_h;
typedef struct ucp_worker_params ucp_worker_params_t;
typedef int8_t ucs_status_t;
typedef void *ucs_status_ptr_t;
#define UCS_OK 0
#define UCS_INPROGRESS 1
#define UCS_ERR_LAST (-100)
#define UCS_PTR_IS_PTR(p) (((uintptr_t)(p) - 1) < ((uintptr_t)(intptr_t)UCS_ERR_LAST - 1))

/* Rust programs carry this file in a static library that may meet another copy (build.rs):
 * there the definitions are weak, which changes nothing for the dynamic linker. */
#ifdef SYMVIRT_UCX_CURE_WEAK
#define INTERPOSED __attribute__((weak))
#else
#define INTERPOSED
#endif

#define MAX_WORKERS 64

static ucp_worker_h workers[MAX_WORKERS];
static int nworkers;
/* The closes MPICH asked for (their requests, when in flight), and how many there are. */
static ucs_status_ptr_t *closing;
static size_t nclosing, closing_cap;
static long closes;
/* No memory for the requests: this rank cannot tell when its closes are done, so it enters the
 * barrier at once (every rank must enter it, or the barriers after it would not match). */
static int untracked;

/* The next definition of `name` after this object's: libucp's. */
static void *next_definition(const char *name)
{
    void *f = dlsym(RTLD_NEXT, name);
    if (f == NULL) {
        fprintf(stderr, "symvirt: %s not found after the layer: %s\n", name, dlerror());
        abort();
    }
    return f;
}

/* Whether `caller` (a return address) is in MPICH's library: the object that defines
 * PMPI_Finalize. */
static int called_by_mpi(void *caller)
{
    static void *mpi_base;
    Dl_info at, mpi;
    if (mpi_base == NULL) {
        void *f = dlsym(RTLD_DEFAULT, "PMPI_Finalize");
        if (f == NULL || dladdr(f, &mpi) == 0)
            return 0;
        mpi_base = mpi.dli_fbase;
    }
    return dladdr(caller, &at) != 0 && at.dli_fbase == mpi_base;
}

INTERPOSED ucs_status_t ucp_worker_create(ucp_context_h context, const ucp_worker_params_t *params,
                                          ucp_worker_h *worker_p)
{
    static ucs_status_t (*next)(ucp_context_h, const ucp_worker_params_t *, ucp_worker_h *);
    if (next == NULL)
        next = next_definition("ucp_worker_create");
    ucs_status_t st = next(context, params, worker_p);
    if (st == UCS_OK && nworkers < MAX_WORKERS && called_by_mpi(__builtin_return_address(0)))
        workers[nworkers++] = *worker_p;
    return st;
}

/* A non-negative integer from the environment; -1 without one. */
static long env_count(const char *name)
{
    const char *s = getenv(name);
    if (s == NULL || *s == '\0')
        return -1;
    char *end;
    long v = strtol(s, &end, 10);
    return *end == '\0' && v >= 0 ? v : -1;
}

/* libucp's functions the cure calls itself, found at run time: the layer does not link libucp
 * (MPICH brings it). */
static unsigned (*worker_progress)(ucp_worker_h);
static ucs_status_t (*request_status)(void *);

static int own_closes_complete(void)
{
    if (untracked)
        return 1;
    for (size_t i = 0; i < nclosing; i++)
        if (request_status(closing[i]) == UCS_INPROGRESS)
            return 0;
    return 1;
}

/* Writes all of `s` to `fd`; 0, or -1. */
static int write_all(int fd, const char *s)
{
    size_t len = strlen(s);
    while (len > 0) {
        ssize_t n = write(fd, s, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        s += n;
        len -= (size_t)n;
    }
    return 0;
}

/* Progresses every worker until this rank's closes completed, then through a PMI barrier
 * over `pmi_fd` until every rank entered it. 0, or -1 with a reason on stderr. */
static int progressing_barrier(int pmi_fd)
{
    worker_progress = next_definition("ucp_worker_progress");
    request_status = next_definition("ucp_request_check_status");
    int entered = 0;
    char line[256];
    size_t have = 0;
    for (;;) {
        unsigned events = 0;
        for (int i = 0; i < nworkers; i++)
            events += worker_progress(workers[i]);
        if (!entered && own_closes_complete()) {
            if (write_all(pmi_fd, "cmd=barrier_in\n") != 0) {
                perror("symvirt: PMI barrier_in");
                return -1;
            }
            entered = 1;
        }
        struct pollfd p = {.fd = pmi_fd, .events = POLLIN};
        if (entered && poll(&p, 1, 0) == 1) {
            ssize_t n = read(pmi_fd, line + have, sizeof line - 1 - have);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                fprintf(stderr, "symvirt: PMI connection closed during the finalize barrier\n");
                return -1;
            }
            have += (size_t)n;
            line[have] = '\0';
            if (strchr(line, '\n') != NULL) {
                if (strcmp(line, "cmd=barrier_out\n") == 0)
                    return 0;
                fprintf(stderr, "symvirt: unexpected PMI reply to barrier_in: %s", line);
                return -1;
            }
            if (have == sizeof line - 1) {
                fprintf(stderr, "symvirt: PMI reply to barrier_in too long\n");
                return -1;
            }
        }
        if (events == 0)
            sched_yield(); /* ranks may share a core: let the one that must answer run */
    }
}

INTERPOSED ucs_status_ptr_t ucp_disconnect_nb(ucp_ep_h ep)
{
    static ucs_status_ptr_t (*next)(ucp_ep_h);
    if (next == NULL)
        next = next_definition("ucp_disconnect_nb");
    ucs_status_ptr_t req = next(ep);
    if (!called_by_mpi(__builtin_return_address(0)))
        return req;
    long size = env_count("PMI_SIZE"), pmi_fd = env_count("PMI_FD");
    long expected = size * nworkers * nworkers;
    if (closes == 0 && expected > 0) {
        /* Room for every close at the first, before any is in flight. */
        closing = calloc((size_t)expected, sizeof *closing);
        closing_cap = closing != NULL ? (size_t)expected : 0;
    }
    if (UCS_PTR_IS_PTR(req)) {
        if (nclosing < closing_cap)
            closing[nclosing++] = req;
        else
            untracked = 1;
    }
    int off = env_count("SYMVIRT_MPICH_FINALIZE_BARRIER") == 0;
    if (++closes == expected && pmi_fd >= 0 && !off && progressing_barrier((int)pmi_fd) != 0)
        fprintf(stderr, "symvirt: the finalize barrier failed: MPI_Finalize may hang "
                        "(MPICH before 4.2 over UCX's TCP transport)\n");
    return req;
}

#endif
#endif
