/* SymVirt MPI-independent core (Rust, libsymvirt_mpi.a): the control plane and the
 * safe-point state machine. Used by the per-implementation glue and by MPI runtimes that
 * integrate SymVirt themselves. Status codes and symvirt_interconnect: see symvirt.h. */
#ifndef SYMVIRT_CORE_H
#define SYMVIRT_CORE_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SYMVIRT_CONTINUE 0
#define SYMVIRT_RESUMED 1
#define SYMVIRT_ABORTED 2
#define SYMVIRT_ERR_STATE (-1)
#define SYMVIRT_ERR_AGENT (-2)
#define SYMVIRT_ERR_TIMEOUT (-3)
#define SYMVIRT_ERR_MPI (-4)

#define SYMVIRT_IC_NONE 0
#define SYMVIRT_IC_INFINIBAND 1
#define SYMVIRT_IC_ETHERNET 2

/* The interconnect a rank has after a migration. */
typedef struct symvirt_interconnect {
    uint64_t epoch;   /* the migration's epoch */
    int kind;         /* SYMVIRT_IC_* (NONE after an abort) */
    int port;         /* InfiniBand port (1-based), else 0 */
    char device[72];  /* HCA name, or Ethernet interface name ("" when unknown) */
    char mac[24];     /* Ethernet MAC, else "" */
    char pci[24];     /* PCI address in the guest, "" when unknown */
    char json[1024];  /* the whole description as JSON */
} symvirt_interconnect;

/* The last error of the calling thread (valid until its next failing call). */
const char *symvirt_last_error(void);

/* Control plane: one per process. socket NULL: $SYMVIRT_AGENT_SOCKET or the default. */
int symvirt_ctl_open(uint32_t rank, const char *socket, uint64_t timeout_ms);
/* 1 when SIGUSR1 through the launcher cuts this process (odd signals cut, the next releases),
 * else 0; set by symvirt_ctl_open, agent or not. */
int symvirt_ctl_signal_cuts(void);
/* The last cut made, per kind of request (the agent's epochs count from 1, SIGUSR1's from
 * 2^48: one number would hide the agent's later requests behind a signal cut). Whoever makes
 * cuts keeps one, zero-initialised, and changes it only through these functions (atomic:
 * another thread may read it while the cut is recorded); the fields are the highest epoch of
 * each kind recorded, for the thread that records to read. */
typedef struct symvirt_served {
    _Alignas(8) uint64_t agent; /* 8-aligned everywhere: the Rust side's atomics need it */
    _Alignas(8) uint64_t signal;
} symvirt_served;
/* Whether the cut of epoch is made according to served: 1, else 0 (epoch 0 always is). */
int symvirt_served_covers(const symvirt_served *served, uint64_t epoch);
/* The cut of epoch is made. */
void symvirt_served_record(symvirt_served *served, uint64_t epoch);
/* The epoch a migration is requested for that served does not cover, 0 when none: the
 * agent's, else SIGUSR1's; or the highest one this process asked for itself
 * (symvirt_ctl_request_locally), if higher. A few atomic loads. */
uint64_t symvirt_ctl_pending(const symvirt_served *served);
/* Asks for a cut of epoch from inside this process (a rank that learnt of a cut from a peer
 * before its own request arrived): symvirt_ctl_pending reports it from now on, and threads
 * in symvirt_ctl_wait_requested wake. */
void symvirt_ctl_request_locally(uint64_t epoch);
/* Blocks until a cut served does not cover is requested, other than skip (0: none), and
 * returns its epoch; at most timeout_ms, or until symvirt_ctl_wake (then 0). served is read
 * throughout (it may be a live record another thread updates). Sleeps on a futex the
 * request's publisher wakes (the agent watcher, or the SIGUSR1 handler): no polling. */
uint64_t symvirt_ctl_wait_requested(const symvirt_served *served, uint64_t skip,
                                    uint64_t timeout_ms);
/* Stops a thread in symvirt_ctl_wait_requested whose stop flag is set and which sets *ended
 * (atomically) as it returns: wakes it until it has (one wake, sent just before its wait
 * began, would be missed and it would sleep out its timeout). Then join it. */
void symvirt_ctl_wake_until(const int *ended);
/* Prints to stderr why this rank's cut threads may wait tens of milliseconds to run when
 * ranks share cores (not bound to a core, a scheduling group of its own: see placement.rs),
 * once per process; 1 if it printed, else 0. For one rank to call once a cut thread has
 * started. */
int symvirt_warn_placement(void);
/* Wakes every thread in symvirt_ctl_wait_requested. Async-signal-safe. */
void symvirt_ctl_wake(void);
/* At the cut: report quiesced, wait for resume (SYMVIRT_RESUMED, *out filled) or abort. A rank
 * whose MPI uses RDMA verbs (a file under /dev/infiniband/ open; SYMVIRT_VERBS_DEVICE_DIR
 * replaces that directory, a test hook read at symvirt_ctl_open) reports unable instead and
 * gets SYMVIRT_ABORTED: its verbs endpoints would not survive the device swap. */
int symvirt_ctl_quiesce(uint64_t epoch, uint64_t timeout_ms, symvirt_interconnect *out);
/* At the cut, before symvirt_ctl_quiesce: the messages this rank had sent to and received from
 * each of the np ranks, and how many it drained; sent with its quiesced, for the cut report. */
int symvirt_ctl_counts(uint64_t epoch, int np, const uint64_t *sent, const uint64_t *received,
                       uint64_t drained);
/* At the cut, instead of symvirt_ctl_quiesce: this rank cannot be migrated for epoch (reason
 * goes to the host, which then sees the epoch fail); waits for the outcome (SYMVIRT_ABORTED). */
int symvirt_ctl_unable(uint64_t epoch, const char *reason, uint64_t timeout_ms,
                       symvirt_interconnect *out);
/* During a cut, without waiting: milliseconds until a cut for epoch that cannot finish is given
 * up, by the newest epoch the agent prepared or aborted (if epoch or newer: three quarters of
 * the time its prepare allowed, or half a second after its abort); UINT64_MAX when there is
 * none (neither yet, SIGUSR1's epoch, no agent). */
uint64_t symvirt_ctl_give_up_in_ms(uint64_t epoch);
/* During a cut, without waiting: reports this rank unable for epoch (reason to the host) if the
 * agent prepared it and has not ended it; a later symvirt_ctl_unable only waits for the
 * outcome. 1 if sent, 0 if not (SIGUSR1's epochs, no agent), or an error. */
int symvirt_ctl_tell_unable(uint64_t epoch, const char *reason);
/* Milliseconds from the environment variable name (decimal digits), else fallback. */
uint64_t symvirt_env_ms(const char *name, uint64_t fallback);
/* After re-selecting the transport. */
int symvirt_ctl_resumed(uint64_t epoch);
void symvirt_ctl_close(void);

/* Safe-point state machine over MPI operations provided by the caller (each returns an
 * MPI error code). Takes over the control plane opened with symvirt_ctl_open, if any. */
typedef struct symvirt_agreement_ops {
    int (*start)(void *ctx, int slot, uint64_t value);      /* MAX-reduce, non-blocking */
    int (*finish)(void *ctx, int slot, uint64_t *result);   /* complete it */
    int (*barrier)(void *ctx);
} symvirt_agreement_ops;
#define SYMVIRT_SLOTS 3 /* reductions in flight at once (pipeline depth 2, plus one) */

typedef struct CSafePoint symvirt_sp;
symvirt_sp *symvirt_sp_new(const symvirt_agreement_ops *ops, void *ctx, uint64_t quiesce_timeout_ms);
int symvirt_sp_on_quiesce(symvirt_sp *sp, void (*hook)(uint64_t epoch, void *ctx), void *ctx);
int symvirt_sp_on_resume(symvirt_sp *sp, void (*hook)(const symvirt_interconnect *ic, void *ctx), void *ctx);
int symvirt_sp_poll(symvirt_sp *sp, symvirt_interconnect *out);
/* The epoch requested and not yet cut for, 0 when none (no MPI call). */
uint64_t symvirt_sp_pending(const symvirt_sp *sp);
/* Copies the cuts sp has made into *out: for symvirt_ctl_wait_requested on a thread that does
 * not hold sp. */
void symvirt_sp_served(const symvirt_sp *sp, symvirt_served *out);
/* Makes the cut for epoch now, outside the agreement: for glue that brings every rank to the
 * same point of its program by other means (every rank calls it there, for the same epoch).
 * Returns as symvirt_sp_poll. */
int symvirt_sp_cut(symvirt_sp *sp, uint64_t epoch, symvirt_interconnect *out);
/* Raises on the calling thread the error of the last symvirt_sp_cut (made on another thread):
 * its code, or SYMVIRT_CONTINUE if it did not fail; symvirt_last_error() then says why. */
int symvirt_sp_raise(const symvirt_sp *sp);
int symvirt_sp_free(symvirt_sp *sp);

#ifdef __cplusplus
}
#endif
#endif
