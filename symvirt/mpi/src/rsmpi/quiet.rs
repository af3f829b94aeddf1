//! Quiet phases for the Rust API: the protocol of the C library's `symvirt_quiet_begin` /
//! `symvirt_quiet_end`, over the `mpi` crate, step for step (its design, and why it is
//! consistent and free of deadlock, is the top comment of `csrc/symvirt_explicit.c`).
//!
//! In short: rank 0 of the communicator leads, on a private duplicate. For each cut requested
//! while the ranks are inside a phase it sends every other rank "prepare" {phase, epoch,
//! PREPARE}; each completes the requests it declared outstanding, reports "ready" {phase, k},
//! and goes on making progress; once every rank is ready or has ended its phase, the leader
//! sends "cut now" {phase, epoch, NOW} and every rank makes the cut. At its end each rank
//! reports "ended" {phase, 0} and waits for "go on" {phase, 0, _}, which the leader sends once
//! all have ended: the end of a phase is a barrier, so a "prepare" always finds the others
//! inside it. The library's thread runs the protocol while the application computes (MPI
//! gives `MPI_THREAD_SERIALIZED` or more); otherwise the application's thread runs it at the
//! phase's begin and end, and a cut waits for the last rank's begin or end.
//!
//! MPI errors abort the job (the `mpi` crate keeps MPI's default error handler); a protocol
//! that cannot go on (ranks out of step, requests that never complete) aborts it too, with a
//! message: the other ranks would wait for each other forever.

use super::MpiAgreement;
use crate::control;
use crate::error::Result;
use crate::safepoint::{SafePoint, SafePointResult};
use mpi::ffi::MPI_Request;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, Destination, Source};
use std::mem::{ManuallyDrop, MaybeUninit};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Leader to rank: {phase, epoch (0: go on), stage}.
const VERDICT_TAG: i32 = 1;
/// Rank to leader: {phase, ready for cut k (k > 0) or ended (0)}.
const REPORT_TAG: i32 = 2;
const LEADER: i32 = 0;
/// Verdict stages.
const PREPARE: u64 = 0;
const NOW: u64 = 1;

/// Why the protocol cannot go on.
#[derive(Debug)]
enum Broken {
    /// A message of another phase, or a "cut now" for a cut this rank was not told of: the
    /// ranks' quiet phases are not collective.
    OutOfStep,
    /// The phase's declared requests did not complete within the quiesce timeout.
    Timeout,
    /// MPI could not give a declared request's status.
    Mpi,
}

/// One rank's quiet-phase state (see the module documentation). Every method runs with the
/// [`super::State`] lock held.
pub(super) struct Quiet {
    /// The private duplicate the verdicts and reports travel on; freed on drop unless MPI is
    /// already finalized.
    comm: ManuallyDrop<SimpleCommunicator>,
    rank: i32,
    size: i32,
    /// How long the phase's requests may take to complete before the job is aborted.
    complete_timeout: Duration,
    /// Quiet phases begun.
    phase: u64,
    /// Between the phase's begin and end.
    inside: bool,
    /// The phase's outstanding requests (the application's handles, never freed here).
    requests: Vec<MPI_Request>,
    /// How many of them are known complete.
    requests_done: usize,
    // The others, for `phase`:
    /// Reported its end.
    ended: bool,
    /// "go on" received.
    go_on: bool,
    /// A "prepare" received and its cut not made yet: its epoch.
    cut_due: u64,
    /// ... and this rank is ready for it.
    ready: bool,
    /// ... and "cut now" received.
    cut_now: bool,
    /// "prepare" verdicts received.
    cuts_told: u64,
    // The leader, for `phase`:
    rank_ended: Vec<bool>,
    /// Per rank: the last cut it reported ready for.
    rank_in_cut: Vec<u64>,
    ended_count: usize,
    cuts_decided: u64,
    /// What the phase's cuts gave (an error is kept over a later cut's success).
    outcome: Option<Result<SafePointResult>>,
}

impl Quiet {
    /// Quiet-phase state on a duplicate of `comm` (collective over `comm`).
    pub(super) fn new<C: Communicator>(comm: &C, complete_timeout: Duration) -> Quiet {
        let comm = comm.duplicate();
        let (rank, size) = (comm.rank(), comm.size());
        Quiet {
            comm: ManuallyDrop::new(comm),
            rank,
            size,
            complete_timeout,
            phase: 0,
            inside: false,
            requests: Vec::new(),
            requests_done: 0,
            ended: false,
            go_on: false,
            cut_due: 0,
            ready: false,
            cut_now: false,
            cuts_told: 0,
            rank_ended: vec![false; size as usize],
            rank_in_cut: vec![0; size as usize],
            ended_count: 0,
            cuts_decided: 0,
            outcome: None,
        }
    }

    /// Between a phase's begin and end.
    pub(super) fn inside(&self) -> bool {
        self.inside
    }

    /// Begins a phase with `requests` outstanding across it; `thread`: the library's thread
    /// makes the cuts (else they are made here and at the end).
    pub(super) fn begin(
        &mut self,
        sp: &mut SafePoint<MpiAgreement>,
        requests: Vec<MPI_Request>,
        thread: bool,
    ) {
        self.requests = requests;
        self.requests_done = 0;
        self.phase += 1;
        self.inside = true;
        self.ended = false;
        self.go_on = false;
        self.cut_due = 0;
        self.cuts_told = 0;
        self.ready = false;
        self.cut_now = false;
        self.rank_ended.fill(false);
        self.rank_in_cut.fill(0);
        self.ended_count = 0;
        self.cuts_decided = 0;
        self.outcome = None;
        let pending = sp.pending().unwrap_or(0);
        let yielding = YieldOff::new();
        let step = if self.rank != LEADER {
            self.follow(sp, false, !thread)
        } else if pending != 0 && !thread {
            self.leader_cut(sp, pending)
        } else {
            Ok(())
        };
        drop(yielding);
        if let Err(why) = step {
            self.protocol_failed("the begin of a quiet phase", why);
        }
    }

    /// Ends the phase: returns once every rank has ended it, after any cut requested
    /// meanwhile; the result of the phase's last cut (`Continue` when none fell in it).
    pub(super) fn end(&mut self, sp: &mut SafePoint<MpiAgreement>) -> Result<SafePointResult> {
        let yielding = YieldOff::new();
        let step = if self.rank == LEADER {
            self.leader_end(sp)
        } else {
            self.other_end(sp)
        };
        drop(yielding);
        if let Err(why) = step {
            self.protocol_failed("the end of a quiet phase", why);
        }
        self.inside = false;
        self.requests.clear(); // the application completes them now
        self.outcome.take().unwrap_or(Ok(SafePointResult::Continue))
    }

    /// One turn of the library's thread, inside a phase: the leader cuts for a pending
    /// request, the others follow the verdicts; then the declared requests are driven.
    /// Returns whether some of them are still incomplete.
    pub(super) fn thread_turn(&mut self, sp: &mut SafePoint<MpiAgreement>) -> bool {
        let yielding = YieldOff::new();
        let pending = sp.pending().unwrap_or(0);
        let step = if self.rank == LEADER && pending != 0 {
            self.leader_cut(sp, pending)
        } else if self.rank != LEADER {
            // A verdict may come before this rank's own request.
            self.follow(sp, false, true)
        } else {
            Ok(())
        };
        // MPI moves a large message only inside its calls: driving the requests here lets
        // the transfer overlap the computation, and a cut then finds them complete.
        let driving = step.and_then(|()| self.requests_complete().map(|done| !done));
        drop(yielding);
        driving.unwrap_or_else(|why| self.protocol_failed("the quiet thread", why))
    }

    /// How long the thread sleeps between turns when nothing is requested: inside a phase
    /// the others look for a verdict every few milliseconds (a rank's own request may come
    /// late, or never when only rank 0's agent asks).
    pub(super) fn thread_sleep(&self, driving: bool) -> Duration {
        if driving {
            Duration::from_millis(1)
        } else if self.inside && self.rank != LEADER {
            Duration::from_millis(5)
        } else {
            Duration::from_secs(1)
        }
    }

    fn protocol_failed(&self, where_: &str, why: Broken) -> ! {
        let why = match why {
            Broken::OutOfStep => "ranks out of step: quiet phases must be collective",
            Broken::Timeout => {
                "the phase's outstanding requests did not complete within \
                 SYMVIRT_QUIESCE_TIMEOUT_MS: each needs a call made after the phase began"
            }
            Broken::Mpi => "MPI_Request_get_status on a declared request",
        };
        // One write: the ranks share the launcher's stderr.
        let line = format!(
            "symvirt: rank {}: quiet phase {}: {where_} failed ({why}): aborting the job, its \
             ranks would otherwise wait for each other forever\n",
            self.rank, self.phase
        );
        let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
        SimpleCommunicator::world().abort(70)
    }

    /// One pass over the declared requests (each call makes progress): whether all are
    /// complete. They stay the application's: nothing is freed.
    fn requests_complete(&mut self) -> std::result::Result<bool, Broken> {
        while let Some(&request) = self.requests.get(self.requests_done) {
            let mut flag = 0;
            let mut status = MaybeUninit::<mpi::ffi::MPI_Status>::uninit();
            // SAFETY: `request` is the handle of a live `mpi` crate request the application
            // lends for the phase (`SymVirt::quiet_with_requests` borrows it, so it is neither
            // waited for nor dropped meanwhile); MPI_Request_get_status reads it without
            // freeing it and writes only `flag` and `status`, which live across the call.
            let rc = unsafe {
                mpi::ffi::MPI_Request_get_status(request, &mut flag, status.as_mut_ptr())
            };
            if rc != mpi::ffi::MPI_SUCCESS as i32 {
                return Err(Broken::Mpi);
            }
            if flag == 0 {
                return Ok(false);
            }
            self.requests_done += 1;
        }
        Ok(true)
    }

    /// Drives the declared requests until all are complete (by the contract nothing they
    /// need is still to be posted), or the timeout.
    fn complete_requests(&mut self) -> std::result::Result<(), Broken> {
        let until = Instant::now() + self.complete_timeout;
        while !self.requests_complete()? {
            if Instant::now() >= until {
                return Err(Broken::Timeout);
            }
            pause(); // the peers are computing or on their way: yield the core
        }
        Ok(())
    }

    fn make_cut(&mut self, sp: &mut SafePoint<MpiAgreement>, epoch: u64) {
        let result = sp.cut_at(epoch);
        if !matches!((&self.outcome, &result), (Some(Err(_)), Ok(_))) {
            self.outcome = Some(result);
        }
    }

    fn verdict_to_all(&self, epoch: u64, stage: u64) {
        let msg = [self.phase, epoch, stage];
        for r in (0..self.size).filter(|&r| r != LEADER) {
            self.comm
                .process_at_rank(r)
                .send_with_tag(&msg[..], VERDICT_TAG);
        }
    }

    fn report(&self, kind: u64) {
        self.comm
            .process_at_rank(LEADER)
            .send_with_tag(&[self.phase, kind][..], REPORT_TAG);
    }

    /// The leader: takes the reports that have arrived.
    fn take_reports(&mut self) -> std::result::Result<(), Broken> {
        while let Some(status) = self.comm.any_process().immediate_probe_with_tag(REPORT_TAG) {
            let r = status.source_rank();
            let mut msg = [0u64; 2];
            self.comm
                .process_at_rank(r)
                .receive_into_with_tag(&mut msg[..], REPORT_TAG);
            if msg[0] != self.phase {
                return Err(Broken::OutOfStep);
            }
            let r = r as usize;
            if msg[1] != 0 {
                self.rank_in_cut[r] = msg[1];
            } else if !self.rank_ended[r] {
                self.rank_ended[r] = true;
                self.ended_count += 1;
            }
        }
        Ok(())
    }

    /// The leader, inside the phase with `epoch` pending: "prepare"; once its own requests
    /// are complete and every rank has reported ready or ended, "cut now" and its own cut.
    fn leader_cut(
        &mut self,
        sp: &mut SafePoint<MpiAgreement>,
        epoch: u64,
    ) -> std::result::Result<(), Broken> {
        self.verdict_to_all(epoch, PREPARE);
        self.cuts_decided += 1;
        let until = Instant::now() + self.complete_timeout;
        let mut mine = false;
        let mut r = 0;
        while r < self.size || !mine {
            mine = mine || self.requests_complete()?;
            if r < self.size {
                let i = r as usize;
                if r == LEADER || self.rank_ended[i] || self.rank_in_cut[i] == self.cuts_decided {
                    r += 1;
                    continue;
                }
            }
            self.take_reports()?;
            if !mine && Instant::now() >= until {
                return Err(Broken::Timeout);
            }
            pause(); // ranks computing: their threads answer within a turn
        }
        self.verdict_to_all(epoch, NOW);
        self.make_cut(sp, epoch);
        Ok(())
    }

    /// The leader at its phase's end: until every rank has ended it, cuts for the requests
    /// that come meanwhile; then "go on".
    fn leader_end(&mut self, sp: &mut SafePoint<MpiAgreement>) -> std::result::Result<(), Broken> {
        loop {
            self.take_reports()?;
            let pending = sp.pending().unwrap_or(0);
            if pending != 0 {
                self.leader_cut(sp, pending)?;
            } else if self.ended_count + 1 == self.size as usize {
                self.verdict_to_all(0, PREPARE);
                return Ok(());
            } else {
                pause(); // up to the slowest rank's phase: yield the core
            }
        }
    }

    /// The others at their phase's end: a cut already due is made first, then the requests
    /// are completed (an ended rank is ready for any cut), "ended" is reported, and the
    /// verdicts are followed until "go on".
    fn other_end(&mut self, sp: &mut SafePoint<MpiAgreement>) -> std::result::Result<(), Broken> {
        self.follow(sp, false, true)?;
        self.complete_requests()?;
        self.ended = true;
        self.report(0);
        self.follow(sp, true, true)
    }

    /// The others: follows the verdicts that have arrived, making the cuts they call for when
    /// `may_cut`; `wait`: until "go on". Once ready for a cut, waits for its "cut now" whatever
    /// `wait` says (the leader sends it once the last rank is ready).
    fn follow(
        &mut self,
        sp: &mut SafePoint<MpiAgreement>,
        wait: bool,
        may_cut: bool,
    ) -> std::result::Result<(), Broken> {
        while !self.go_on {
            if self.cut_due != 0 && !may_cut {
                return Ok(());
            }
            if self.cut_due != 0 && !self.ready {
                // An ended rank's requests were completed at its end; it reports nothing more.
                if !self.ended {
                    self.complete_requests()?;
                    self.report(self.cuts_told);
                }
                self.ready = true;
            }
            if self.cut_due != 0 && self.cut_now {
                let epoch = self.cut_due;
                self.make_cut(sp, epoch);
                self.cut_due = 0;
                self.ready = false;
                self.cut_now = false;
                continue;
            }
            let leader = self.comm.process_at_rank(LEADER);
            if leader.immediate_probe_with_tag(VERDICT_TAG).is_none() {
                if !wait && !self.ready {
                    return Ok(());
                }
                pause(); // up to the slowest rank's phase: yield the core
                continue;
            }
            let mut msg = [0u64; 3];
            leader.receive_into_with_tag(&mut msg[..], VERDICT_TAG);
            let [phase, epoch, stage] = msg;
            if phase != self.phase {
                return Err(Broken::OutOfStep);
            }
            if epoch == 0 {
                self.go_on = true;
            } else if stage == NOW {
                if epoch != self.cut_due || !self.ready {
                    return Err(Broken::OutOfStep);
                }
                self.cut_now = true;
            } else {
                self.cuts_told += 1;
                self.cut_due = epoch;
                // The leader's request may come before this rank's own: wake the thread.
                control::request_locally(epoch);
            }
        }
        Ok(())
    }
}

impl Drop for Quiet {
    fn drop(&mut self) {
        if !mpi::environment::is_finalized() {
            // SAFETY: dropped once, here; the field is not used afterwards. After
            // MPI_Finalize a communicator must not be freed: it is forgotten with `self`.
            unsafe { ManuallyDrop::drop(&mut self.comm) };
        }
    }
}

/// Between the protocol's turns: long enough to give the core to a computing rank, short
/// enough that a cut is not delayed.
fn pause() {
    std::thread::sleep(Duration::from_micros(50));
}

/// Open MPI's idle yield, off while the protocol runs (as the C library does: Open MPI,
/// oversubscribed, yields the CPU in every progress turn that finds nothing, and behind
/// computing threads each yield costs a time slice). Found at run time in Open MPI's
/// libopen-pal, loaded with libmpi; nothing with MPICH.
struct YieldOff {
    was: Option<bool>,
}

type SetYield = unsafe extern "C" fn(bool) -> bool;

impl YieldOff {
    fn new() -> YieldOff {
        YieldOff {
            // SAFETY: Open MPI's `bool opal_progress_set_yield_when_idle(bool)` only sets a
            // flag of its progress engine; it is called under the lock the protocol holds.
            was: set_yield().map(|f| unsafe { f(false) }),
        }
    }
}

impl Drop for YieldOff {
    fn drop(&mut self) {
        if let (Some(f), Some(was)) = (set_yield(), self.was) {
            // SAFETY: as in `YieldOff::new`.
            unsafe { f(was) };
        }
    }
}

fn set_yield() -> Option<SetYield> {
    static ADDRESS: OnceLock<usize> = OnceLock::new();
    let address = *ADDRESS.get_or_init(|| {
        // SAFETY: dlsym only looks a NUL-terminated name up in the objects already loaded.
        unsafe {
            libc::dlsym(
                libc::RTLD_DEFAULT,
                c"opal_progress_set_yield_when_idle".as_ptr(),
            ) as usize
        }
    });
    (address != 0).then(|| {
        // SAFETY: the address of Open MPI's `bool opal_progress_set_yield_when_idle(bool)`,
        // whose C signature `SetYield` is.
        unsafe { std::mem::transmute::<*const libc::c_void, SetYield>(address as *const _) }
    })
}
