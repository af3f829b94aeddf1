//! The explicit safe point: every rank calls [`SafePoint::poll`] once per iteration of its main
//! loop; when a migration is requested, all ranks stop at the same iteration.
//!
//! Agreement without blocking the others (pipelined): at iteration `k` each rank starts a
//! non-blocking MAX-reduction of its locally requested epoch (0: none) and completes the one it
//! started at iteration `k - DEPTH`. Every rank gets the same result for `k - DEPTH` at its
//! iteration `k`, so every rank stops at the same iteration. A rank only ever waits for ranks
//! that are `DEPTH` iterations behind it.
//!
//! **Contract** (the explicit mode's assumption): each iteration's messages are matched within
//! that iteration, i.e. no rank blocks in iteration `k` on a message its peer sends in a later
//! iteration. Then a rank waiting for a peer that is `DEPTH` iterations behind never holds
//! anything that peer needs, so there is no deadlock; and at the agreed iteration every message
//! sent has been received: the cut is consistent.
//!
//! **Depth.** The pipeline costs a cut up to `DEPTH + 1` safe points after the request: little
//! when safe points come every few milliseconds, seconds for a program that calls its safe
//! point rarely (an iteration of seconds). Such a program sets `SYMVIRT_SAFE_POINT_DEPTH=0`
//! (the same on every rank; [`SafePoint::set_depth`] in Rust): each safe point then completes
//! its own reduction before it returns (every rank waits there for the slowest, once per
//! iteration), and the cut falls at the first or second safe point after the request (the
//! second when every rank had already contributed to the first before the request arrived).
//!
//! The MPI operations come from an [`Agreement`] (the C library implements it with
//! `MPI_Iallreduce` on a private duplicate of the communicator); the state machine is here only.

use crate::control::{self, Control, Outcome, Served};
use crate::error::Result;
use std::collections::VecDeque;
use std::time::Duration;

/// How many iterations the reduction of a request lags behind, unless set lower (see the top).
pub const DEPTH: usize = 2;
/// Pipeline slots an [`Agreement`] must provide (requests in flight at once).
pub const SLOTS: usize = DEPTH + 1;

/// The collective operations the safe point needs, on a communicator private to it.
pub trait Agreement {
    /// Starts a MAX-reduction of `value` over all ranks in pipeline slot `slot` (< [`SLOTS`]).
    fn start(&mut self, slot: usize, value: u64) -> Result<()>;
    /// Completes the reduction in `slot` and returns the maximum.
    fn finish(&mut self, slot: usize) -> Result<u64>;
    /// Waits until every rank arrives (used once per cut, after resume).
    fn barrier(&mut self) -> Result<()>;
}

/// What happened at a safe point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SafePointResult {
    /// Nothing pending (the common case).
    Continue,
    /// The ranks stopped here, the cluster migrated, and the ranks were released.
    Resumed {
        /// The epoch.
        epoch: u64,
        /// The interconnect the guest has now (also given to the resume hook).
        interconnect: symvirt_proto::protocol::Interconnect,
    },
    /// The ranks stopped here but the migration was cancelled; nothing changed.
    Aborted {
        /// The epoch.
        epoch: u64,
    },
}

/// Called at the cut, before `quiesced` is reported (e.g. to record or flush state).
pub type QuiesceHook = Box<dyn FnMut(u64) + Send>;
/// Called after `resume`, before `resumed` is reported: where a runtime re-selects its
/// transport (e.g. MPI Sessions finalize/re-init where the runtime supports it).
pub type ResumeHook = Box<dyn FnMut(u64, &symvirt_proto::protocol::Interconnect) + Send>;

/// One rank's safe point.
pub struct SafePoint<A: Agreement> {
    agreement: A,
    control: Option<Control>,
    in_flight: VecDeque<usize>,
    /// Reductions left in flight across safe points (at most [`DEPTH`]).
    depth: usize,
    iteration: u64,
    /// The last cut made, per kind of request; requests up to it are settled.
    served: Served,
    quiesce_timeout: Duration,
    on_quiesce: Option<QuiesceHook>,
    on_resume: Option<ResumeHook>,
    /// Where this rank's request comes from (the process-wide control plane).
    requests: fn(&Served) -> u64,
}

impl<A: Agreement> std::fmt::Debug for SafePoint<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafePoint")
            .field("iteration", &self.iteration)
            .field("served", &self.served)
            .finish()
    }
}

impl<A: Agreement> SafePoint<A> {
    /// A safe point over `agreement`, reporting through `control` (`None`: no agent, the
    /// safe point never stops; still collective, so every rank must make the same choice).
    pub fn new(agreement: A, control: Option<Control>) -> SafePoint<A> {
        SafePoint {
            agreement,
            control,
            in_flight: VecDeque::with_capacity(SLOTS),
            depth: depth_from_env(),
            iteration: 0,
            served: Served::new(),
            quiesce_timeout: Duration::from_secs(600),
            on_quiesce: None,
            on_resume: None,
            requests: control::pending_epoch,
        }
    }

    /// How long a rank waits at the cut for its agent (prepare, then resume or abort).
    pub fn set_quiesce_timeout(&mut self, timeout: Duration) {
        self.quiesce_timeout = timeout;
    }

    /// How many reductions stay in flight across safe points, 0 to [`DEPTH`] (larger values
    /// are taken as [`DEPTH`]). Every rank must set the same, before its first safe point.
    pub fn set_depth(&mut self, depth: usize) {
        self.depth = depth.min(DEPTH);
    }

    /// Installs the hook run at the cut.
    pub fn on_quiesce(&mut self, hook: QuiesceHook) {
        self.on_quiesce = Some(hook);
    }

    /// Installs the hook run after resume (transport re-selection).
    pub fn on_resume(&mut self, hook: ResumeHook) {
        self.on_resume = Some(hook);
    }

    /// The control plane, if any.
    pub fn control(&self) -> Option<&Control> {
        self.control.as_ref()
    }

    /// Safe points passed so far.
    pub fn iteration(&self) -> u64 {
        self.iteration
    }

    /// The cuts made so far (what a thread waiting for the next request passes to
    /// [`control::wait_requested`], as a copy).
    pub fn served(&self) -> &Served {
        &self.served
    }

    /// The epoch requested and not yet cut for, if any (no MPI call; a few atomic loads).
    pub fn pending(&self) -> Option<u64> {
        let local = (self.requests)(&self.served);
        (!self.served.covers(local)).then_some(local)
    }

    /// Makes the cut for `epoch` here, outside the agreement: for glue that has its own way of
    /// bringing every rank to the same point (the C library's quiet phases, where every rank
    /// learns the epoch from one leader). Collective: every rank calls it for the same epoch,
    /// at the same point of its program, and a later safe point agreeing on that epoch passes.
    pub fn cut_at(&mut self, epoch: u64) -> Result<SafePointResult> {
        self.cut(epoch)
    }

    /// The safe point proper; see the module documentation. Collective over the ranks.
    pub fn poll(&mut self) -> Result<SafePointResult> {
        // The agent's request or a SIGUSR1 one (0 without either).
        let local = self.pending().unwrap_or(0);
        let slot = (self.iteration % SLOTS as u64) as usize;
        self.agreement.start(slot, local)?;
        self.in_flight.push_back(slot);
        self.iteration += 1;
        if self.in_flight.len() <= self.depth {
            return Ok(SafePointResult::Continue);
        }
        let oldest = self.in_flight.pop_front().expect("len > depth");
        let agreed = self.agreement.finish(oldest)?;
        if self.served.covers(agreed) {
            return Ok(SafePointResult::Continue);
        }
        self.cut(agreed)
    }

    /// Every rank is here, at the same iteration, for `epoch`.
    fn cut(&mut self, epoch: u64) -> Result<SafePointResult> {
        // Settle the reductions still in flight: no collective stays open across the cut
        // (every rank started the same ones). Their values are this epoch, nothing new, or a
        // request of the other kind (agent or SIGUSR1), which the next safe point brings again.
        while let Some(slot) = self.in_flight.pop_front() {
            self.agreement.finish(slot)?;
        }
        self.served.record(epoch);
        if let Some(hook) = self.on_quiesce.as_mut() {
            hook(epoch);
        }
        let outcome = match &self.control {
            _ if control::is_signal_epoch(epoch) => {
                control::wait_signal_release(epoch, self.quiesce_timeout)
            }
            Some(c) => c.quiesce(epoch, self.quiesce_timeout),
            None => Ok(Outcome::Aborted { epoch }),
        };
        let result = match outcome {
            Ok(Outcome::Resumed {
                epoch,
                interconnect,
            }) => {
                if let Some(hook) = self.on_resume.as_mut() {
                    hook(epoch, &interconnect);
                }
                let acked = match &self.control {
                    Some(c) => c.resumed(epoch),
                    None => Ok(()),
                };
                acked.map(|()| SafePointResult::Resumed {
                    epoch,
                    interconnect,
                })
            }
            Ok(Outcome::Aborted { epoch }) => Ok(SafePointResult::Aborted { epoch }),
            Err(e) => Err(e),
        };
        // Nobody sends on the (possibly new) transport before every rank is back.
        self.agreement.barrier()?;
        result
    }

    /// Ends the safe point, settling reductions still in flight (collective), and returns
    /// the control plane (dropping it unregisters the rank).
    pub fn finish(mut self) -> Result<Option<Control>> {
        while let Some(slot) = self.in_flight.pop_front() {
            self.agreement.finish(slot)?;
        }
        Ok(self.control.take())
    }
}

/// `SYMVIRT_SAFE_POINT_DEPTH` (0 to [`DEPTH`]), or [`DEPTH`]; a value that is not a number is
/// reported and ignored.
fn depth_from_env() -> usize {
    match std::env::var("SYMVIRT_SAFE_POINT_DEPTH") {
        Ok(v) => v.trim().parse::<usize>().map_or_else(
            |_| {
                log::warn!("SYMVIRT_SAFE_POINT_DEPTH={v:?} is not a number: depth {DEPTH}");
                DEPTH
            },
            |d| d.min(DEPTH),
        ),
        Err(_) => DEPTH,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Barrier, Mutex};

    /// An in-process stand-in for MPI_Iallreduce among threads: slot values per round.
    struct Threads {
        rank: usize,
        ranks: usize,
        round: [u64; SLOTS],
        next_round: u64,
        board: Board,
        gate: Arc<Barrier>,
    }

    impl Agreement for Threads {
        fn start(&mut self, slot: usize, value: u64) -> Result<()> {
            self.round[slot] = self.next_round;
            self.next_round += 1;
            self.board
                .lock()
                .unwrap()
                .insert((self.round[slot], self.rank), value);
            Ok(())
        }
        fn finish(&mut self, slot: usize) -> Result<u64> {
            let round = self.round[slot];
            loop {
                let board = self.board.lock().unwrap();
                let vals: Vec<u64> = (0..self.ranks)
                    .filter_map(|r| board.get(&(round, r)).copied())
                    .collect();
                if vals.len() == self.ranks {
                    return Ok(vals.into_iter().max().unwrap_or(0));
                }
                drop(board);
                std::thread::yield_now();
            }
        }
        fn barrier(&mut self) -> Result<()> {
            self.gate.wait();
            Ok(())
        }
    }

    type Board = Arc<Mutex<std::collections::HashMap<(u64, usize), u64>>>;

    /// One agreement per rank, over one board.
    fn threads(ranks: usize) -> (Vec<Threads>, Board) {
        let board: Board = Arc::new(Mutex::new(Default::default()));
        let gate = Arc::new(Barrier::new(ranks));
        let all = (0..ranks)
            .map(|rank| Threads {
                rank,
                ranks,
                round: [0; SLOTS],
                next_round: 0,
                board: board.clone(),
                gate: gate.clone(),
            })
            .collect();
        (all, board)
    }

    thread_local! {
        /// The epoch this thread's rank sees requested (the stand-in for the agent's request).
        static REQUESTED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }

    /// A request that one rank sees from its safe point 4 on: every rank stops at the same
    /// safe point, `depth` safe points later (without an agent the cut ends `Aborted`).
    #[test]
    fn every_rank_stops_depth_safe_points_after_one_sees_the_request() {
        for depth in [0, 1, DEPTH] {
            let handles: Vec<_> = threads(3)
                .0
                .into_iter()
                .map(|a| {
                    std::thread::spawn(move || {
                        let rank = a.rank;
                        let mut sp = SafePoint::new(a, None);
                        sp.requests = |_| REQUESTED.with(|r| r.get());
                        sp.set_depth(depth);
                        let mut stopped = Vec::new();
                        for i in 0..12 {
                            if rank == 1 && i == 4 {
                                REQUESTED.with(|r| r.set(7));
                            }
                            match sp.poll().unwrap() {
                                SafePointResult::Continue => {}
                                SafePointResult::Aborted { epoch: 7 } => stopped.push(i),
                                other => panic!("{other:?}"),
                            }
                        }
                        sp.finish().unwrap();
                        stopped
                    })
                })
                .collect();
            for h in handles {
                assert_eq!(h.join().unwrap(), [4 + depth], "depth {depth}");
            }
        }
    }

    /// A cut made outside the agreement (the C library's quiet phases) settles its epoch: the
    /// reductions in flight that carry it, and later safe points, go on without a second cut.
    #[test]
    fn a_cut_made_outside_the_agreement_is_not_made_again_at_a_safe_point() {
        let handles: Vec<_> = threads(3)
            .0
            .into_iter()
            .map(|a| {
                std::thread::spawn(move || {
                    let mut sp = SafePoint::new(a, None);
                    sp.requests = |_| REQUESTED.with(|r| r.get());
                    assert_eq!(sp.poll().unwrap(), SafePointResult::Continue);
                    REQUESTED.with(|r| r.set(9));
                    assert_eq!(sp.pending(), Some(9));
                    // In flight across the cut, carrying the request.
                    assert_eq!(sp.poll().unwrap(), SafePointResult::Continue);
                    assert_eq!(sp.cut_at(9).unwrap(), SafePointResult::Aborted { epoch: 9 });
                    assert_eq!(sp.pending(), None);
                    for _ in 0..6 {
                        assert_eq!(sp.poll().unwrap(), SafePointResult::Continue);
                    }
                    sp.finish().unwrap();
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
    }

    #[test]
    fn without_an_agent_the_pipeline_never_stops_and_settles_at_the_end() {
        let ranks = 3;
        let (all, board) = threads(ranks);
        let handles: Vec<_> = all
            .into_iter()
            .map(|a| {
                std::thread::spawn(move || {
                    let mut sp = SafePoint::new(a, None);
                    // Isolated from the process-wide control plane other unit tests drive.
                    sp.requests = |_| 0;
                    for _ in 0..50 {
                        assert_eq!(sp.poll().unwrap(), SafePointResult::Continue);
                    }
                    assert_eq!(sp.iteration(), 50);
                    sp.finish().unwrap().is_none()
                })
            })
            .collect();
        for h in handles {
            assert!(h.join().unwrap());
        }
        // Every round that was started was completed by every rank.
        assert_eq!(board.lock().unwrap().len(), 50 * ranks);
    }
}
