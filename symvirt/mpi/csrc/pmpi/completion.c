/* ---- completion: test and wait families --------------------------------------------------
 * Persistent receives served from the buffer (substitutes) complete here without MPI; a
 * persistent collective whose start the layer deferred (svp_pcoll_state) is incomplete here
 * until it starts, though MPI would take the still inactive request as complete. The
 * all, any and some families have one test function each, which both their Test (one turn of
 * svp_idle_test() when nothing completed) and their Wait (svp_idle() between tries) call. */
#include "pmpi_internal.h"

/* A test of h (MPI_Test, MPI_Request_get_status) when h is a persistent collective the layer
 * answers for: one whose deferred start is not made yet is incomplete, one whose start failed
 * is complete with its code (kept for the next completion with keep). Returns whether it did,
 * its code in *rc. */
static int pcoll_tested(MPI_Request h, int *flag, MPI_Status *status, int keep, int *rc)
{
    switch (svp_npcoll ? svp_pcoll_state(h) : PCOLL_NOT) {
    case PCOLL_UNSTARTED:
        *flag = 0;
        svp_idle_test();
        *rc = MPI_SUCCESS;
        return 1;
    case PCOLL_FAILED:
        *flag = 1;
        *rc = svp_pcoll_take_error(h, status, keep);
        return 1;
    default:
        return 0;
    }
}

int MPI_Test(MPI_Request *req, int *flag, MPI_Status *status)
{
    GUARD();
    if (svp_ndeferred)
        svp_progress_deferred();
    int pc;
    if (pcoll_tested(*req, flag, status, 0, &pc))
        return pc;
    int err;
    if (svp.subst.n && svp_take_substitute(*req, status, &err)) {
        *flag = 1;
        return err;
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
    int err;
    if (svp.subst.n && svp_take_substitute(*req, status, &err))
        return err;
    for (unsigned long turns = 0; svp_npcoll && svp_pcoll_state(*req) == PCOLL_UNSTARTED;)
        svp_idle(&turns);
    if (svp_npcoll && svp_pcoll_state(*req) == PCOLL_FAILED)
        return svp_pcoll_take_error(*req, status, 0);
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
    int pc; /* a failed start is kept: the next completion returns its code */
    if (pcoll_tested(req, flag, status, 1, &pc))
        return pc;
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

/* ---- persistent collectives (MPI 4) in the array calls ------------------------------------
 * MPICH 4.0's MPI_Waitany and MPI_Testany return a completed persistent collective's request
 * again at every call (it stays active to them), and its MPI_Testall fails (MPI_ERR_IN_STATUS,
 * MPI_SUCCESS in every status) whenever it completes one; its MPI_Wait and MPI_Test are right.
 * So in the array calls the layer hides them from MPI (a null handle: skipped) and looks at
 * them itself, knowing their state (svp_pcoll_state): one whose start is deferred is
 * incomplete, an inactive one is skipped, a started one is complete once
 * MPI_Request_get_status says so, and is then completed by MPI_Wait. */

/* How many complete persistent collectives take_pcolls completes. */
enum { TAKE_ONE, TAKE_ALL, TAKE_ALL_OR_NONE /* none unless every one is complete */ };

/* Hides reqs' persistent collectives from MPI and completes (MPI_Wait) the complete ones, as
 * many as `take` says, their indices and statuses in done_idx and done_st (n entries each),
 * their count in *ndone; *rc becomes MPI_ERR_IN_STATUS if one failed. h: the handles before.
 * Returns how many are incomplete. */
static int take_pcolls(int n, MPI_Request *reqs, const MPI_Request *h, int take, int *done_idx,
                       MPI_Status *done_st, int *ndone, int *rc)
{
    int open = 0;
    *ndone = 0;
    for (int i = 0; i < n; i++) {
        int state = svp_pcoll_state(reqs[i]);
        if (state == PCOLL_NOT)
            continue;
        int complete = state == PCOLL_FAILED;
        if (state == PCOLL_STARTED &&
            PMPI_Request_get_status(reqs[i], &complete, MPI_STATUS_IGNORE) != MPI_SUCCESS)
            complete = 1; /* its MPI_Wait says what failed */
        open += state != PCOLL_INACTIVE && !complete;
        reqs[i] = MPI_REQUEST_NULL;
        if (complete && !(take == TAKE_ONE && *ndone == 1))
            done_idx[(*ndone)++] = i;
    }
    if (take == TAKE_ALL_OR_NONE && open > 0)
        *ndone = 0;
    for (int k = 0; k < *ndone; k++) {
        MPI_Request r = h[done_idx[k]]; /* persistent: the application's handle stays */
        int e = svp_pcoll_state(r) == PCOLL_FAILED ? svp_pcoll_take_error(r, &done_st[k], 0)
                                                   : PMPI_Wait(&r, &done_st[k]);
        done_st[k].MPI_ERROR = e; /* every status carries its code (MPI_ERR_IN_STATUS) */
        if (e != MPI_SUCCESS)
            *rc = MPI_ERR_IN_STATUS;
    }
    return open;
}

/* Puts back the handles take_pcolls hid (h: reqs before; persistent handles stay). */
static void restore_pcolls(int n, MPI_Request *reqs, const MPI_Request *h)
{
    for (int i = 0; i < n; i++)
        if (reqs[i] == MPI_REQUEST_NULL && svp_pcoll_state(h[i]) != PCOLL_NOT)
            reqs[i] = h[i];
}

/* MPI_Testall over reqs holding persistent collectives: every other request's completion is
 * looked at first without freeing it (MPI_Request_get_status), so that nothing changes when
 * not all are complete; then all are completed. */
static int testall_with_pcolls(int n, MPI_Request *reqs, const MPI_Request *h, int *flag,
                               MPI_Status *sts)
{
    for (int i = 0; i < n; i++) {
        if (svp_pcoll_state(reqs[i]) != PCOLL_NOT)
            continue;
        int done = 0;
        if (PMPI_Request_get_status(reqs[i], &done, MPI_STATUS_IGNORE) == MPI_SUCCESS &&
            !done) {
            *flag = 0; /* (one whose status query failed is done: its MPI_Wait says why) */
            return MPI_SUCCESS;
        }
    }
    int *idx = malloc((size_t)(n > 0 ? n : 1) * sizeof *idx), ndone = 0, rc = MPI_SUCCESS;
    MPI_Status *st = statuses(n);
    if (idx == NULL)
        svp_die("out of memory");
    *flag = take_pcolls(n, reqs, h, TAKE_ALL_OR_NONE, idx, st, &ndone, &rc) == 0;
    for (int i = 0; i < n && *flag; i++) {
        int r = PMPI_Wait(&reqs[i], &sts[i]); /* the hidden ones are null: at once */
        sts[i].MPI_ERROR = r; /* every status carries its code (MPI_ERR_IN_STATUS) */
        if (r != MPI_SUCCESS)
            rc = MPI_ERR_IN_STATUS;
    }
    for (int k = 0; k < ndone; k++)
        sts[idx[k]] = st[k];
    restore_pcolls(n, reqs, h);
    free(idx);
    free(st);
    return rc;
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
    int rc = svp_any_pcoll(n, reqs) ? testall_with_pcolls(n, reqs, h, flag, local)
                                    : PMPI_Testall(n, reqs, flag, local);
    for (int i = 0; i < n; i++) {
        if (h[i] == MPI_REQUEST_NULL)
            continue;
        if (nsub && is_substitute(h[i])) {
            reqs[i] = h[i]; /* persistent: the handle stays */
            if (*flag)
                svp_take_substitute(h[i], &local[i], NULL);
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
        int err;
        svp_take_substitute(reqs[s], status, &err);
        return err;
    }
    MPI_Request *h = snapshot(n, reqs);
    MPI_Status local;
    int rc = MPI_SUCCESS;
    if (svp_any_pcoll(n, reqs)) {
        int ndone = 0;
        int open = take_pcolls(n, reqs, h, TAKE_ONE, idx, &local, &ndone, &rc);
        if (ndone == 0)
            rc = PMPI_Testany(n, reqs, idx, flag, &local);
        else
            *flag = 1;
        if (rc == MPI_ERR_IN_STATUS)
            rc = local.MPI_ERROR;
        restore_pcolls(n, reqs, h);
        if (*flag && *idx == MPI_UNDEFINED && open)
            *flag = 0; /* not "nothing active": a hidden one is */
    } else {
        rc = PMPI_Testany(n, reqs, idx, flag, &local);
    }
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
                                                                    : &sts[k],
                                    NULL);
                k++;
            }
        *outcount = k;
        return MPI_SUCCESS;
    }
    MPI_Request *h = snapshot(n, reqs);
    MPI_Status *local = statuses(n);
    int rc;
    if (svp_any_pcoll(n, reqs)) {
        /* MPI's first, then the layer's after them (idx and local have room for all n). */
        int *own = malloc((size_t)(n > 0 ? n : 1) * sizeof *own), nown = 0, err = MPI_SUCCESS;
        MPI_Status *own_st = statuses(n);
        if (own == NULL)
            svp_die("out of memory");
        int open = take_pcolls(n, reqs, h, TAKE_ALL, own, own_st, &nown, &err);
        rc = PMPI_Testsome(n, reqs, outcount, idx, local);
        int k = *outcount == MPI_UNDEFINED ? 0 : *outcount;
        for (int j = 0; j < k && rc == MPI_SUCCESS && err != MPI_SUCCESS; j++)
            local[j].MPI_ERROR = MPI_SUCCESS; /* MPI_ERR_IN_STATUS: every status its code */
        for (int j = 0; j < nown; j++, k++) {
            idx[k] = own[j];
            local[k] = own_st[j];
        }
        if (k > 0 || open > 0)
            *outcount = k; /* not "nothing active" while a hidden one is */
        if (err != MPI_SUCCESS)
            rc = MPI_ERR_IN_STATUS;
        restore_pcolls(n, reqs, h);
        free(own);
        free(own_st);
    } else {
        rc = PMPI_Testsome(n, reqs, outcount, idx, local);
    }
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

