/* ---- completion: test and wait families --------------------------------------------------
 * Persistent receives served from the buffer (substitutes) complete here without MPI. The
 * all, any and some families have one test function each, which both their Test (one turn of
 * svp_idle_test() when nothing completed) and their Wait (svp_idle() between tries) call. */
#include "pmpi_internal.h"

int MPI_Test(MPI_Request *req, int *flag, MPI_Status *status)
{
    GUARD();
    if (svp_ndeferred)
        svp_progress_deferred();
    if (svp.subst.n && svp_take_substitute(*req, status)) {
        *flag = 1;
        return MPI_SUCCESS;
    }
    MPI_Request handle = *req;
    MPI_Status local;
    int rc = PMPI_Test(req, flag, &local);
    if (*flag)
        svp_completed(handle, &local);
    else
        svp_idle_test();
    if (status != MPI_STATUS_IGNORE)
        *status = local;
    return rc;
}

int MPI_Wait(MPI_Request *req, MPI_Status *status)
{
    GUARD();
    if (svp.subst.n && svp_take_substitute(*req, status))
        return MPI_SUCCESS;
    MPI_Request handle = *req;
    MPI_Status local;
    int rc = svp_wait_serving(req, &local);
    svp_completed(handle, &local);
    if (status != MPI_STATUS_IGNORE)
        *status = local;
    return rc;
}

int MPI_Request_get_status(MPI_Request req, int *flag, MPI_Status *status)
{
    GUARD();
    if (svp_ndeferred)
        svp_progress_deferred();
    for (int i = 0; i < svp.subst.n; i++)
        if (svp.subst.v[i].req == req) {
            *flag = 1;
            if (status != MPI_STATUS_IGNORE)
                *status = svp.subst.v[i].st;
            return MPI_SUCCESS;
        }
    int rc = PMPI_Request_get_status(req, flag, status);
    if (rc == MPI_SUCCESS && !*flag)
        svp_idle_test();
    return rc;
}

/* Runs a Test* call on a copy of the handles and accounts for what completed. */
static MPI_Request *snapshot(int n, const MPI_Request *reqs)
{
    MPI_Request *h = malloc((size_t)(n > 0 ? n : 1) * sizeof *h);
    if (h == NULL)
        svp_die("out of memory");
    memcpy(h, reqs, (size_t)n * sizeof *h);
    return h;
}

static MPI_Status *statuses(int n)
{
    MPI_Status *s = malloc((size_t)(n > 0 ? n : 1) * sizeof *s);
    if (s == NULL)
        svp_die("out of memory");
    return s;
}

static int is_substitute(MPI_Request h)
{
    for (int j = 0; j < svp.subst.n; j++)
        if (h != MPI_REQUEST_NULL && h == svp.subst.v[j].req)
            return 1;
    return 0;
}

static int testall(int n, MPI_Request *reqs, int *flag, MPI_Status *sts)
{
    if (svp_ndeferred)
        svp_progress_deferred();
    MPI_Request *h = snapshot(n, reqs);
    MPI_Status *local = statuses(n);
    /* Substitutes are complete: MPI tests the others (their slots read as null). */
    int nsub = 0;
    if (svp_find_substitute(n, reqs) >= 0)
        for (int i = 0; i < n; i++)
            if (is_substitute(reqs[i])) {
                reqs[i] = MPI_REQUEST_NULL;
                nsub++;
            }
    int rc = PMPI_Testall(n, reqs, flag, local);
    for (int i = 0; i < n; i++) {
        if (h[i] == MPI_REQUEST_NULL)
            continue;
        if (nsub && is_substitute(h[i])) {
            reqs[i] = h[i]; /* persistent: the handle stays */
            if (*flag)
                svp_take_substitute(h[i], &local[i]);
        } else if (*flag || (rc == MPI_ERR_IN_STATUS && reqs[i] == MPI_REQUEST_NULL)) {
            svp_completed(h[i], &local[i]); /* persistent handles stay non-null */
        }
    }
    if (sts != MPI_STATUSES_IGNORE)
        memcpy(sts, local, (size_t)n * sizeof *local);
    free(h);
    free(local);
    return rc;
}

int MPI_Testall(int n, MPI_Request *reqs, int *flag, MPI_Status *sts)
{
    GUARD();
    int rc = testall(n, reqs, flag, sts);
    if (!*flag)
        svp_idle_test();
    return rc;
}

int MPI_Waitall(int n, MPI_Request *reqs, MPI_Status *sts)
{
    GUARD();
    unsigned long turns = 0;
    for (;;) {
        int flag = 0;
        int rc = testall(n, reqs, &flag, sts);
        if (rc != MPI_SUCCESS || flag)
            return rc;
        svp_idle(&turns);
    }
}

static int testany(int n, MPI_Request *reqs, int *idx, int *flag, MPI_Status *status)
{
    if (svp_ndeferred)
        svp_progress_deferred();
    int s = svp_find_substitute(n, reqs);
    if (s >= 0) {
        *idx = s;
        *flag = 1;
        svp_take_substitute(reqs[s], status);
        return MPI_SUCCESS;
    }
    MPI_Request *h = snapshot(n, reqs);
    MPI_Status local;
    int rc = PMPI_Testany(n, reqs, idx, flag, &local);
    if (*flag && *idx != MPI_UNDEFINED)
        svp_completed(h[*idx], &local);
    if (status != MPI_STATUS_IGNORE)
        *status = local;
    free(h);
    return rc;
}

int MPI_Testany(int n, MPI_Request *reqs, int *idx, int *flag, MPI_Status *status)
{
    GUARD();
    int rc = testany(n, reqs, idx, flag, status);
    if (!*flag)
        svp_idle_test();
    return rc;
}

int MPI_Waitany(int n, MPI_Request *reqs, int *idx, MPI_Status *status)
{
    GUARD();
    unsigned long turns = 0;
    for (;;) {
        int flag = 0;
        int rc = testany(n, reqs, idx, &flag, status);
        if (rc != MPI_SUCCESS || flag)
            return rc;
        svp_idle(&turns);
    }
}

static int testsome(int n, MPI_Request *reqs, int *outcount, int *idx, MPI_Status *sts)
{
    if (svp_ndeferred)
        svp_progress_deferred();
    if (svp_find_substitute(n, reqs) >= 0) {
        int k = 0;
        for (int i = 0; i < n; i++)
            if (is_substitute(reqs[i])) {
                idx[k] = i;
                svp_take_substitute(reqs[i], sts == MPI_STATUSES_IGNORE ? MPI_STATUS_IGNORE
                                                                    : &sts[k]);
                k++;
            }
        *outcount = k;
        return MPI_SUCCESS;
    }
    MPI_Request *h = snapshot(n, reqs);
    MPI_Status *local = statuses(n);
    int rc = PMPI_Testsome(n, reqs, outcount, idx, local);
    if (*outcount != MPI_UNDEFINED)
        for (int i = 0; i < *outcount; i++)
            svp_completed(h[idx[i]], &local[i]);
    if (sts != MPI_STATUSES_IGNORE && *outcount != MPI_UNDEFINED)
        memcpy(sts, local, (size_t)*outcount * sizeof *local);
    free(h);
    free(local);
    return rc;
}

int MPI_Testsome(int n, MPI_Request *reqs, int *outcount, int *idx, MPI_Status *sts)
{
    GUARD();
    int rc = testsome(n, reqs, outcount, idx, sts);
    if (*outcount == 0)
        svp_idle_test();
    return rc;
}

int MPI_Waitsome(int n, MPI_Request *reqs, int *outcount, int *idx, MPI_Status *sts)
{
    GUARD();
    unsigned long turns = 0;
    for (;;) {
        int rc = testsome(n, reqs, outcount, idx, sts);
        if (rc != MPI_SUCCESS || *outcount != 0)
            return rc;
        svp_idle(&turns);
    }
}

