/* The cut (see the top of pmpi_internal.h): counts exchanged, drained, reported, resumed; and
 * the idle turns of the layer's wait loops, which enter a requested cut or answer a peer's. */
#include "pmpi_internal.h"

/* A runtime may define this to re-select its transport after a migration (transparent mode's
 * resume hook); it runs on every rank before the rank reports resumed. */
void symvirt_transport_reselect(const symvirt_interconnect *ic) __attribute__((weak));

/* A COUNTS message from peer p: {epoch, messages p sent to this rank in all, then for each
 * communicator p observes with this rank in it and a message sent there: its identity and
 * how many}. */
#define COUNTS_CAP (2 + 2 * MAX_COMMS)
/* Per peer: its last COUNTS message (COUNTS_CAP entries, made on first use), how many entries
 * it holds, and whether it is there. */
static uint64_t **early;
static int *early_len;
static int *have_early;
/* Per peer, during a cut: its COUNTS for this cut arrived. */
static int *have;
/* Per peer, during a cut: a message from it is too large for the buffer (over INT_MAX bytes),
 * so it is left in place and the cut is answered "unable"; the first such peer, or -1. */
static int *oversized;
static int oversized_from = -1;
/* The epochs this cut serves, the highest of each kind (the agent's, SIGUSR1's): the rank's
 * own and those of the peers' COUNTS (see "Requests of both kinds at once" in
 * pmpi_internal.h). */
static symvirt_served joined;
/* The epoch this rank started the cut for (its COUNTS carry it). */
static uint64_t started;

/* The epochs the cut serves, the agent's first: how many (1 or 2) into out. */
static int joined_epochs(uint64_t out[2])
{
    int n = 0;
    if (joined.agent != 0)
        out[n++] = joined.agent;
    if (joined.signal != 0)
        out[n++] = joined.signal;
    return n;
}
static const char *log_dir;
static uint64_t quiesce_timeout_ms;
/* How long a drain may wait before this rank gives its cut up (see give_up_now). */
static uint64_t drain_timeout_ms;

void svp_cut_setup(void)
{
    early = calloc((size_t)svp.np, sizeof *early);
    early_len = calloc((size_t)svp.np, sizeof(int));
    have_early = calloc((size_t)svp.np, sizeof(int));
    if (early == NULL || early_len == NULL || have_early == NULL)
        svp_die("out of memory");
    log_dir = getenv("SYMVIRT_CUT_LOG");
    quiesce_timeout_ms = symvirt_env_ms("SYMVIRT_QUIESCE_TIMEOUT_MS", 600000);
    drain_timeout_ms = symvirt_env_ms("SYMVIRT_DRAIN_TIMEOUT_MS", 60000);
}

/* ---- the cut ---------------------------------------------------------------------------- */

static void write_log(const char *kind, uint64_t epoch, const char *text)
{
    if (log_dir == NULL)
        return;
    char path[4096], tmp[4200];
    snprintf(path, sizeof path, "%s/%s-%llu-%d", log_dir, kind, (unsigned long long)epoch,
             svp.me);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    FILE *f = fopen(tmp, "w");
    if (f == NULL)
        return;
    fputs(text, f);
    fclose(f);
    rename(tmp, path);
}

static void log_cut(uint64_t epoch, int given_up_by)
{
    size_t cap = (size_t)svp.np * 48 + 256;
    char *text = malloc(cap);
    if (text == NULL)
        return;
    size_t n = 0;
    for (int pass = 0; pass < 2; pass++) {
        n += (size_t)snprintf(text + n, cap - n, pass == 0 ? "sent" : "received");
        for (int p = 0; p < svp.np; p++)
            n += (size_t)snprintf(text + n, cap - n, " %llu",
                                  (unsigned long long)(pass == 0 ? svp.sent[p] : svp.recv[p]));
        n += (size_t)snprintf(text + n, cap - n, "\n");
    }
    n += (size_t)snprintf(text + n, cap - n, "drained %llu\n", (unsigned long long)svp.drained);
    /* The epochs this one cut served: the same on every rank; and the one this rank started
     * it for. */
    n += (size_t)snprintf(text + n, cap - n, "started %llu\nserves", (unsigned long long)started);
    uint64_t epochs[2];
    for (int k = 0, ne = joined_epochs(epochs); k < ne; k++)
        n += (size_t)snprintf(text + n, cap - n, " %llu", (unsigned long long)epochs[k]);
    n += (size_t)snprintf(text + n, cap - n, "\n");
    /* Which thread made it, and with how many MPI-IO files open: tests see the progress
     * thread step back while a file is open. */
    n += (size_t)snprintf(text + n, cap - n, "made by %s thread\nopen files %d\n",
                          svp_in_progress_thread ? "the progress" : "the application's",
                          svp.files.n);
    if (given_up_by >= 0)
        n += (size_t)snprintf(text + n, cap - n, "given up by rank %d\n", given_up_by);
    write_log("cut", epoch, text);
    free(text);
}

/* The last COUNTS message from peer p (see COUNTS_CAP). */
static uint64_t *early_slot(int p)
{
    return early[p];
}

/* Receives one COUNTS message (already probed) into the early slot of its sender. */
static void take_counts(const MPI_Status *probed)
{
    int p = probed->MPI_SOURCE, n = 0;
    PMPI_Get_count(probed, MPI_UINT64_T, &n);
    if (n < 2 || n > COUNTS_CAP || n % 2 != 0)
        svp_die("a malformed COUNTS message");
    if (early[p] == NULL && (early[p] = malloc(COUNTS_CAP * sizeof(uint64_t))) == NULL)
        svp_die("out of memory");
    PMPI_Recv(early[p], n, MPI_UINT64_T, p, TAG_COUNTS, svp.ctl, MPI_STATUS_IGNORE);
    early_len[p] = n;
    have_early[p] = 1;
}

void svp_serve_peers(void)
{
    int flag = 0;
    MPI_Status st;
    PMPI_Iprobe(MPI_ANY_SOURCE, TAG_COUNTS, svp.ctl, &flag, &st);
    if (!flag)
        return;
    take_counts(&st);
    uint64_t epoch = early_slot(st.MPI_SOURCE)[0];
    if (!symvirt_served_covers(&svp.served, epoch))
        svp_make_cut(epoch);
    else
        have_early[st.MPI_SOURCE] = 0; /* stale */
}

/* See svp_idle (pmpi_internal.h). */
__attribute__((noinline)) void svp_idle_check(unsigned long t)
{
    if (t > 4096)
        sched_yield();
    if (!svp.ready || svp.closed)
        return;
    if (svp_ndeferred)
        svp_progress_deferred();
    uint64_t e = symvirt_ctl_pending(&svp.served);
    if (e != 0)
        svp_make_cut(e);
    else if ((t & 63) == 0)
        svp_serve_peers();
}

void svp_idle_test(void)
{
    static unsigned long turns;
    svp_idle(&turns);
    if (turns > 4096)
        turns = 0; /* no yield inside an application's own polling loop */
}

/* How many messages peer p counted to this rank for the cut (itself: what it sent itself); 0
 * while p's COUNTS have not arrived. */
static uint64_t counted_to_me(int p)
{
    return p == svp.me ? svp.sent[svp.me] : have[p] ? early_slot(p)[1] : 0;
}

/* Diagnostics for a drain that does not finish (printed once per cut, to stderr). */
static void dump_drain(uint64_t epoch, int open_colls)
{
    fprintf(stderr,
            "symvirt-pmpi rank %d: epoch %llu drain still waiting; %d pending requests, %d "
            "non-blocking collectives open\n",
            svp.me, (unsigned long long)epoch, svp.reqs.n, open_colls);
    for (int p = 0; p < svp.np; p++)
        fprintf(stderr, "  peer %d: counts %s, want %llu, received %llu\n", p,
                have[p] ? "in" : "missing",
                (unsigned long long)counted_to_me(p), (unsigned long long)svp.recv[p]);
    svp_report_open_colls(stderr);
    svp_report_deferred(stderr);
    fflush(stderr);
}

void svp_make_cut(uint64_t epoch)
{
    /* With a window or a file open the progress thread makes no cut (see init.c): this
     * thread does. */
    if (svp_gated && !svp_in_progress_thread && !svp_unwrapped_calls_possible()) {
        symvirt_ctl_request_locally(epoch); /* wakes the progress thread */
        svp_park(epoch);
    } else {
        svp_cut(epoch);
    }
}

/* Peer p's COUNTS, if they arrived, for this cut: have[p]. Those of a cut already made are
 * stale (dropped); any other is p's one COUNTS of this cut, whatever epoch p started it for
 * (kept for the checks; its epoch joins the cut's). */
static void absorb_counts(int p)
{
    if (have[p] || !have_early[p])
        return;
    uint64_t e = early_slot(p)[0];
    if (symvirt_served_covers(&svp.served, e)) {
        have_early[p] = 0;
        return;
    }
    have[p] = 1;
    symvirt_served_record(&joined, e);
}

/* Sends every peer this rank's COUNTS for the cut (see COUNTS_CAP): one buffer, *out, that
 * the requests rq send from until they complete. Returns how many requests. */
static int send_counts(uint64_t epoch, uint64_t **out, MPI_Request *rq)
{
    size_t *at = calloc((size_t)svp.np + 1, sizeof(size_t));
    if (at == NULL)
        svp_die("out of memory");
    /* Entries per peer, then where each peer's message starts. */
    for (int c = 0; c < svp.ncomms; c++) {
        const tracked_comm *t = &svp.comms[c];
        for (int r = 0; t->comm != MPI_COMM_NULL && r < t->size; r++)
            if (t->sent[r] > 0)
                at[t->world[r] + 1] += 2;
    }
    for (int p = 0; p < svp.np; p++)
        at[p + 1] += at[p] + 2;
    *out = malloc(at[svp.np] * sizeof(uint64_t));
    if (*out == NULL)
        svp_die("out of memory");
    for (int p = 0; p < svp.np; p++) {
        (*out)[at[p]] = epoch;
        (*out)[at[p] + 1] = svp.sent[p];
    }
    size_t *fill = calloc((size_t)svp.np, sizeof(size_t));
    if (fill == NULL)
        svp_die("out of memory");
    for (int p = 0; p < svp.np; p++)
        fill[p] = at[p] + 2;
    for (int c = 0; c < svp.ncomms; c++) {
        const tracked_comm *t = &svp.comms[c];
        for (int r = 0; t->comm != MPI_COMM_NULL && r < t->size; r++) {
            if (t->sent[r] == 0)
                continue;
            size_t *f = &fill[t->world[r]];
            (*out)[(*f)++] = t->id;
            (*out)[(*f)++] = t->sent[r];
        }
    }
    int nrq = 0;
    for (int p = 0; p < svp.np; p++)
        if (p != svp.me)
            PMPI_Isend(*out + at[p], (int)(at[p + 1] - at[p]), MPI_UINT64_T, p, TAG_COUNTS,
                       svp.ctl, &rq[nrq++]);
    free(fill);
    free(at);
    return nrq;
}

/* Whether a cut's drain may take a message from rank r of slot c.
 * From a peer whose COUNTS have not arrived: yes (it may be blocked in a send that only this
 * rank's drain completes), after one more look for them (a peer in a cut posts its COUNTS
 * before anything it sends later, so once a later message is here its COUNTS are too).
 * From a peer that counted: only while it sent more on this communicator than arrived here
 * (communicators are matched by their shared identity; slots that share one are summed). So
 * a message the peer did not count (one MPI sends for a call of its own, on the program's
 * communicator with the program's tag) stays where it is for the call that waits for it.
 * Counting per WORLD peer only, a drain took the leaders' message of an MPI_Intercomm_create
 * that had got through the peer's shut gate in the middle of its cut, when that call was not
 * aligned, and found one more received than sent. */
static int drainable(int c, int r)
{
    const tracked_comm *t = &svp.comms[c];
    int p = t->world[r];
    if (oversized[p])
        return 0;
    if (p == svp.me)
        return t->recv[r] < t->sent[r];
    if (!have[p]) {
        int flag = 0;
        MPI_Status st;
        PMPI_Iprobe(p, TAG_COUNTS, svp.ctl, &flag, &st);
        if (flag) {
            take_counts(&st);
            absorb_counts(p);
        }
        if (!have[p])
            return 1;
    }
    const uint64_t *e = early_slot(p);
    uint64_t want = 0, got = 0;
    for (int i = 2; i + 1 < early_len[p]; i += 2)
        if (e[i] == t->id)
            want += e[i + 1];
    for (int s = 0; s < svp.ncomms; s++) {
        const tracked_comm *u = &svp.comms[s];
        if (u->comm == MPI_COMM_NULL || u->id != t->id)
            continue;
        for (int k = 0; k < u->size; k++)
            if (s == c ? k == r : u->world[k] == p)
                got += u->recv[k];
    }
    return got < want;
}

/* Takes a probed message from rank r of slot c into the buffer, or marks its peer oversized. */
static int drain_from(int c, int r, const MPI_Status *st)
{
    if (svp_drain_one(c, st))
        return 1;
    int p = svp.comms[c].world[r];
    oversized[p] = 1;
    if (oversized_from < 0)
        oversized_from = p;
    return 0;
}

/* Whether a message with this tag from rank r of t stays where it is for a call this rank is
 * aligning (svp_withheld). Only while the sender's COUNTS have not arrived: a sender in the
 * cut sent its part of such a call (run inside its cut) after everything it counted, and
 * drainable() stops at its count. */
static int withheld(const tracked_comm *t, int r, int tag)
{
    int p = t->world[r];
    return !have[p] && svp_withheld(t->comm, p, tag);
}

/* One turn of a cut's drain on slot c: takes into the buffer what drainable() allows. */
static void drain_comm(int c)
{
    const tracked_comm *t = &svp.comms[c];
    int flag = 0;
    MPI_Status st;
    /* Whatever came first, while it may be taken (the common case: one probe). */
    for (;;) {
        if (t->comm == MPI_COMM_NULL)
            return; /* freed */
        PMPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, t->comm, &flag, &st);
        if (!flag)
            return;
        if (withheld(t, st.MPI_SOURCE, st.MPI_TAG) || !drainable(c, st.MPI_SOURCE) ||
            !drain_from(c, st.MPI_SOURCE, &st))
            break;
    }
    /* A message left in place hides the others behind it from MPI_ANY_SOURCE: one source at
     * a time. */
    for (int r = 0; r < t->size; r++) {
        while (t->comm != MPI_COMM_NULL && drainable(c, r)) {
            PMPI_Iprobe(r, MPI_ANY_TAG, t->comm, &flag, &st);
            if (!flag || withheld(t, r, st.MPI_TAG) || !drain_from(c, r, &st))
                break;
        }
    }
}

/* ---- a cut given up -----------------------------------------------------------------------
 * A drain that cannot finish (a message counted by its sender on a communicator this rank has
 * no slot for; a peer that enters the cut late, or never) must not hold the job for ever. A
 * rank gives its cut up when its time is up: SYMVIRT_DRAIN_TIMEOUT_MS after its drain began
 * (0: no such limit), or three quarters of the time the agent's latest prepare allowed (so
 * that its reason reaches the host before the agent's deadline), or half a second after the
 * agent's abort of that epoch (symvirt_ctl_give_up_in_ms). Not at the abort itself: a new
 * host's prepare aborts the old epoch first, and the cut then goes on to serve the new one
 * (peers that start their cut for it join this one) under the new prepare's time. It reports
 * "unable" at once (for the agent's epoch: the host hears why from the rank that knows) and
 * enters the post-drain agreement with its rank, draining on meanwhile (keep_draining); the
 * agreement's maximum tells every rank that the cut was given up, and by whom, so all of them
 * report "unable" and leave through the same final barrier. What was drained stays in the
 * layer's buffer, what was not stays MPI's: the program receives both later, in order, as
 * after any cut. A peer that never enters the cut still holds the others in the agreement. */

/* The shortest drain given up by the agent's time (a cut entered after three quarters of it). */
#define MIN_DRAIN_MS 1000
/* The cut in progress: when its drain began, and why this rank gave it up (empty: it did
 * not). */
static uint64_t drain_began_ms;
static char given_up_why[256];
/* The reason of the rank that gave the cut up, the same on every rank. */
static char cut_given_up_why[256];

uint64_t svp_now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000u + (uint64_t)t.tv_nsec / 1000000u;
}

/* What this rank's drain still waits for, in a few words, into why. */
static void drain_missing(char *why, size_t cap, int open_colls)
{
    size_t n = 0;
    int named = 0;
    for (int p = 0; p < svp.np && named < 2; p++) {
        uint64_t want = counted_to_me(p);
        if (!have[p])
            n += (size_t)snprintf(why + n, cap - n, "%sthe counts of rank %d",
                                  named++ ? ", " : "", p);
        else if (svp.recv[p] < want && !oversized[p])
            n += (size_t)snprintf(why + n, cap - n, "%s%llu of %llu messages from rank %d",
                                  named++ ? ", " : "", (unsigned long long)svp.recv[p],
                                  (unsigned long long)want, p);
        if (n >= cap)
            return;
    }
    if (open_colls > 0 && n < cap)
        snprintf(why + n, cap - n, "%s%d non-blocking collectives open", named ? ", " : "",
                 open_colls);
}

/* Whether this rank gives the cut up now (see above); if so, given_up_why says why. */
static int give_up_now(int open_colls)
{
    uint64_t now = svp_now_ms(), epochs[2], waited = now - drain_began_ms;
    int due = drain_timeout_ms > 0 && waited >= drain_timeout_ms;
    /* A cut entered late (its prepare's time already spent) still gets a moment to finish. */
    for (int k = 0, ne = joined_epochs(epochs); k < ne && !due && waited >= MIN_DRAIN_MS; k++)
        due = symvirt_ctl_give_up_in_ms(epochs[k]) == 0;
    if (!due)
        return 0;
    char missing[160] = "";
    drain_missing(missing, sizeof missing, open_colls);
    snprintf(given_up_why, sizeof given_up_why,
             "gave the cut up: its drain waited %llu ms for %s",
             (unsigned long long)waited, missing);
    fprintf(stderr, "symvirt-pmpi rank %d: %s\n", svp.me, given_up_why);
    svp_report_open_colls(stderr);
    svp_report_deferred(stderr);
    fflush(stderr);
    return 1;
}

/* While a rank that gave its cut up waits in the post-drain agreement: a peer that has not
 * entered the cut yet may be blocked in a send to this rank that only a drain completes (a
 * large or synchronous MPI_Send), and enters only once it returns; so its COUNTS are taken and
 * its messages drained here as in the drain, or the agreement would wait for it for ever. */
static void keep_draining(void)
{
    for (int p = 0; p < svp.np; p++)
        absorb_counts(p);
    for (int c = 0; c < svp.ncomms; c++)
        drain_comm(c);
    int flag = 0;
    MPI_Status st;
    PMPI_Iprobe(MPI_ANY_SOURCE, TAG_COUNTS, svp.ctl, &flag, &st);
    if (flag && !have[st.MPI_SOURCE]) {
        take_counts(&st);
        absorb_counts(st.MPI_SOURCE);
    }
}

/* After the post-drain agreement of a cut given up: the COUNTS of the peers whose COUNTS had
 * not arrived. Each peer sent them before it entered the agreement, so they come; taken now,
 * they join their epochs to the cut's (recorded as served on every rank alike) and none is
 * left behind for the next cut. */
static void take_missing_counts(void)
{
    for (int p = 0; p < svp.np; p++) {
        absorb_counts(p); /* taken already, perhaps */
        while (!have[p]) {
            MPI_Status st;
            PMPI_Probe(p, TAG_COUNTS, svp.ctl, &st);
            take_counts(&st);
            absorb_counts(p);
        }
    }
}

/* At the cut, for one epoch it serves: the report, the wait for resume (or for the releasing
 * SIGUSR1), the transport hook. */
static void settle(uint64_t epoch, int given_up_by)
{
    symvirt_interconnect ic;
    memset(&ic, 0, sizeof ic);
    int r;
    const char *uncovered = svp_uncovered_alive();
    if (given_up_by >= 0) {
        /* This rank's reason was told already for the agent's epoch (then this only waits for
         * the outcome). */
        char why[256]; /* at most what the agent takes */
        if (given_up_by == svp.me)
            snprintf(why, sizeof why, "%s", given_up_why);
        else
            snprintf(why, sizeof why, "rank %d %.200s", given_up_by, cut_given_up_why);
        r = symvirt_ctl_unable(epoch, why, quiesce_timeout_ms, &ic);
    } else if (oversized_from >= 0) {
        /* Left in place: the cut is not consistent, and the message stays MPI's. */
        char why[200];
        snprintf(why, sizeof why,
                 "a message of over 2 GiB from rank %d is in flight; the transparent layer's "
                 "buffer cannot hold it",
                 oversized_from);
        r = symvirt_ctl_unable(epoch, why, quiesce_timeout_ms, &ic);
    } else if (uncovered != NULL) {
        /* MPI 4 traffic the layer neither counts nor drains may be in flight. */
        char why[200];
        snprintf(why, sizeof why,
                 "an MPI 4 request made by %s exists (until it is freed); its traffic is not "
                 "covered by the transparent layer",
                 uncovered);
        r = symvirt_ctl_unable(epoch, why, quiesce_timeout_ms, &ic);
    } else if (svp.windows.n > 0) {
        /* One-sided operations are not counted: a cut with a window open may leave some in
         * flight, so this rank tells the agent it cannot be migrated (the host sees the epoch
         * fail, with this reason, and keeps the job where it is). */
        char why[200];
        snprintf(why, sizeof why,
                 "MPI one-sided communication is not covered by the transparent layer (%d "
                 "window%s open)",
                 svp.windows.n, svp.windows.n == 1 ? "" : "s");
        r = symvirt_ctl_unable(epoch, why, quiesce_timeout_ms, &ic);
    } else {
        symvirt_ctl_counts(epoch, svp.np, svp.sent, svp.recv, svp.drained);
        r = symvirt_ctl_quiesce(epoch, quiesce_timeout_ms, &ic);
    }
    char text[1200];
    if (r == SYMVIRT_RESUMED) {
        if (symvirt_transport_reselect)
            symvirt_transport_reselect(&ic);
        symvirt_ctl_resumed(epoch);
        snprintf(text, sizeof text, "resumed %s\n", ic.json);
    } else if (r == SYMVIRT_ABORTED) {
        snprintf(text, sizeof text, "aborted\n");
    } else {
        snprintf(text, sizeof text, "error %d %s\n", r, symvirt_last_error());
        fprintf(stderr, "symvirt-pmpi rank %d: epoch %llu: %s", svp.me,
                (unsigned long long)epoch, text);
    }
    write_log("resumed", epoch, text);
}

void svp_cut(uint64_t epoch)
{
    /* 1. my counts to every peer */
    uint64_t *out = NULL;
    MPI_Request *rq = malloc((size_t)svp.np * sizeof(MPI_Request));
    have = calloc((size_t)svp.np, sizeof(int));
    oversized = calloc((size_t)svp.np, sizeof(int));
    oversized_from = -1;
    if (rq == NULL || have == NULL || oversized == NULL)
        svp_die("out of memory");
    svp_sum_counts();
    int nrq = send_counts(epoch, &out, rq);
    memset(&joined, 0, sizeof joined);
    symvirt_served_record(&joined, epoch);
    started = epoch;
    /* 2. drain until every peer's count is met and my collectives are complete */
    have[svp.me] = 1;
    svp.drained = 0;
    int matched_too_large = svp_drain_matched();
    if (matched_too_large >= 0) {
        oversized[matched_too_large] = 1;
        oversized_from = matched_too_large;
    }
    unsigned long spins = 0;
    drain_began_ms = svp_now_ms();
    given_up_why[0] = '\0';
    int gave_up = 0;
    for (;;) {
        for (int p = 0; p < svp.np; p++)
            absorb_counts(p);
        svp_finish_alignment();
        if (svp_ndeferred)
            svp_progress_deferred();
        int open_colls = svp_poll_pending();
        for (int c = 0; c < svp.ncomms; c++)
            drain_comm(c);
        int done = open_colls == 0;
        svp_sum_counts();
        for (int p = 0; p < svp.np; p++) {
            if (!have[p]) {
                done = 0;
                continue;
            }
            uint64_t want = counted_to_me(p);
            if (svp.recv[p] < want && !oversized[p])
                done = 0;
            else if (svp.recv[p] > want)
                svp_die("received more messages than were sent: counting is broken");
        }
        if (done)
            break;
        if (++spins == 2000000)
            dump_drain(epoch, open_colls);
        if ((spins & 63) == 0 && give_up_now(open_colls)) {
            gave_up = 1;
            break;
        }
        int flag = 0;
        MPI_Status st;
        PMPI_Iprobe(MPI_ANY_SOURCE, TAG_COUNTS, svp.ctl, &flag, &st);
        if (flag && have[st.MPI_SOURCE])
            svp_die("a second COUNTS from one peer during a cut"); /* its first is in use */
        if (flag)
            take_counts(&st);
        else
            svp_pause();
    }
    /* Given up: the host hears this rank's reason now, for the agent's epoch (it then aborts
     * the epoch everywhere), without waiting for its answer: a late peer may need this rank's
     * drain to get into the cut (settle waits for the answer). A SIGUSR1 epoch has nobody to
     * tell before its settle. */
    if (gave_up && joined.agent != 0)
        symvirt_ctl_tell_unable(joined.agent, given_up_why);
    /* Keep progressing until every rank has drained (or given up): a receiver may still need
     * this rank's help to finish a large (rendezvous) transfer it has already matched. The
     * maximum agreed is 1 + the highest rank that gave the cut up, or 0. */
    agreement drained = svp_agreement_of(svp.ctl, NULL, svp.np, svp.me, TAG_DRAINED,
                                         gave_up ? (uint64_t)svp.me + 1 : 0);
    while (!svp_agree_step(&drained)) {
        svp_finish_alignment();
        if (svp_ndeferred)
            svp_progress_deferred();
        svp_poll_pending();
        if (gave_up)
            keep_draining();
        svp_pause();
    }
    int given_up_by = (int)drained.value - 1;
    if (given_up_by >= 0) {
        take_missing_counts();
        /* Every rank reports the reason of the rank that gave up: the agent passes on the first
         * report it gets, whichever rank's connection that comes on. */
        memcpy(cut_given_up_why, given_up_why, sizeof given_up_why);
        PMPI_Bcast(cut_given_up_why, sizeof cut_given_up_why, MPI_CHAR, given_up_by, svp.ctl);
    }
    for (int p = 0; p < svp.np; p++)
        have_early[p] = 0;
    PMPI_Waitall(nrq, rq, MPI_STATUSES_IGNORE);
    free(out);
    free(rq);
    free(have);
    have = NULL;
    free(oversized);
    oversized = NULL;
    /* Every rank serves the same epochs: each started its cut for one and sent its COUNTS
     * once, and every rank took every peer's. The progress thread reads the record. */
    uint64_t epochs[2];
    int ne = joined_epochs(epochs);
    for (int k = 0; k < ne; k++)
        symvirt_served_record(&svp.served, epochs[k]);

    /* 3. report, wait, resume: the agent's epoch first (the host migrates, the transport may
     * change), then the signal's (held until the releasing SIGUSR1). The records of both are
     * written first: whoever releases the signal's cut may be waiting for them. */
    svp_sum_counts();
    for (int k = 0; k < ne; k++)
        log_cut(epochs[k], given_up_by);
    for (int k = 0; k < ne; k++)
        settle(epochs[k], given_up_by);
    /* Nobody sends on the (possibly new) transport before every rank is back. On the COUNTS
     * communicator: an alignment reduction may be pending (cut served from align). */
    PMPI_Barrier(svp.ctl);
}
