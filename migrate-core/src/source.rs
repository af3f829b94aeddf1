//! The sending side: pre-copy rounds, switchover, commit, rollback.
//!
//! One worker thread per memory connection writes batches straight from guest memory; the
//! calling thread harvests dirty pages, splits them into stripes (a page always goes to the same
//! connection, see [`crate::protocol`]) and runs the policy and the control connection. What
//! the calling thread carries from round to round (policy, dirty set, round statistics, whether
//! the guest is paused and tracking runs) is one `Migration` value: its methods are the phases
//! (handshake, pre-copy round, stop-and-copy, commit) and the rollback.

use crate::codec::{read_message, write_message};
use crate::dirty::{DirtyBitmap, DirtyTracker, PAGE_SIZE, PageRun};
use crate::pages::{BatchWriter, GuestPages, StreamCounters};
use crate::policy::{Decision, MigrationConfig, Policy, RateLimiter};
use crate::protocol::{ControlMessage, FEATURES, MemoryLayout, Record, STRIPE_BYTES};
use crate::stats::{MigrationReport, Progress, RoundStats, SwitchoverReason, thread_cpu_seconds};
use crate::transport::{Connections, Stream};
use crate::vm::MigratableVm;
use crate::{Error, Phase, Result};
use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use std::time::{Duration, Instant};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Pages handed to a worker at a time.
const JOB_PAGES: u64 = 1024;

enum Cmd {
    Runs(Vec<PageRun>, bool),
    EndRound(u64),
    EndStream,
}

type Reply = (usize, Result<StreamCounters>);

/// A result whose error names the phase it happened in.
type PhaseResult<T> = std::result::Result<T, (Phase, Error)>;

trait At<T> {
    fn at(self, phase: Phase) -> PhaseResult<T>;
}

impl<T> At<T> for Result<T> {
    fn at(self, phase: Phase) -> PhaseResult<T> {
        self.map_err(|e| (phase, e))
    }
}

/// Migrates `vm` over `conn`. On success the source guest stays paused (the destination owns
/// it now). On any failure before the destination's commit acknowledgement the source guest is
/// resumed, its memory untouched, and the error is [`Error::Migration`] naming the phase.
/// `progress` is called with each progress event, on the calling thread, between rounds: it
/// should return quickly (a slow callback delays the migration; to hand events to another
/// thread, `try_send` them on a channel).
pub fn migrate(
    vm: &dyn MigratableVm,
    conn: Connections,
    cfg: &MigrationConfig,
    progress: Option<&dyn Fn(&Progress)>,
) -> Result<MigrationReport> {
    let handles: Vec<Stream> = std::iter::once(conn.control.try_clone())
        .chain(conn.memory.iter().map(Stream::try_clone))
        .collect::<Result<_>>()?;
    let mut m = Migration::new(vm, cfg, progress);
    let r = m.run(conn);
    m.stop_tracking();
    r.map_err(|(phase, e)| m.roll_back(&handles, phase, e))
}

/// After a failure: if the destination said why it gave up, use its reason; then tell the
/// destination ours (best effort, bounded by short timeouts).
fn explain(control: &Stream, phase: Phase, e: Error) -> Error {
    let mut control = match control.try_clone() {
        Ok(c) => c,
        Err(_) => return e,
    };
    let _ = control.set_timeouts(Some(Duration::from_millis(200)));
    let e = match e {
        // A broken memory connection is usually the destination failing: it sends Abort first.
        Error::Disconnected | Error::Io { .. }
            if phase == Phase::PreCopy || phase == Phase::StopAndCopy =>
        {
            match read_message(&mut control) {
                Ok(ControlMessage::Abort { reason }) => Error::Peer(reason),
                _ => e,
            }
        }
        e => e,
    };
    let _ = write_message(
        &mut control,
        &ControlMessage::Abort {
            reason: format!("source failed in {phase}: {e}"),
        },
    );
    e
}

/// One outgoing migration: what the pre-copy loop carries from round to round, and what a
/// rollback must know (whether the guest was paused, whether dirty tracking runs).
struct Migration<'a> {
    vm: &'a dyn MigratableVm,
    cfg: &'a MigrationConfig,
    progress: Option<&'a dyn Fn(&Progress)>,
    start: Instant,
    /// Set before the guest is paused (even half-way): a rollback resumes it.
    paused: bool,
    /// Dirty tracking, once started; stopped when the migration ends either way.
    tracker: Option<Box<dyn DirtyTracker>>,
    policy: Policy,
    /// Pages dirtied and not yet sent.
    dirty: DirtyBitmap,
    /// Number of the next pre-copy round.
    round: u32,
    precopy_start: Instant,
    last_harvest: Instant,
    stats: Vec<RoundStats>,
}

impl<'a> Migration<'a> {
    fn new(
        vm: &'a dyn MigratableVm,
        cfg: &'a MigrationConfig,
        progress: Option<&'a dyn Fn(&Progress)>,
    ) -> Self {
        let now = Instant::now();
        Migration {
            vm,
            cfg,
            progress,
            start: now,
            paused: false,
            tracker: None,
            policy: Policy::new(cfg),
            dirty: DirtyBitmap::for_memory(vm.memory()),
            round: 0,
            precopy_start: now,
            last_harvest: now,
            stats: Vec::new(),
        }
    }

    /// The statistics of a round that sent `d` in `secs` and left `found` pages dirty, at an
    /// estimated dirty rate of `rate` bytes per second.
    fn round_stats(
        &self,
        round: u32,
        d: &StreamCounters,
        secs: f64,
        found: u64,
        rate: f64,
    ) -> RoundStats {
        RoundStats {
            round,
            pages_sent: d.data_pages,
            zero_pages: d.zero_pages,
            bytes: d.bytes,
            duration_ms: secs * 1e3,
            dirty_pages_found: found,
            bandwidth_bytes_s: d.bytes as f64 / secs.max(1e-9),
            dirty_rate_bytes_s: rate,
            throttle_percent: self.policy.throttle(),
        }
    }

    fn notify(&self, p: Progress) {
        if let Some(f) = self.progress {
            f(&p);
        }
    }

    /// ORs what was dirtied since the last harvest into `self.dirty`.
    fn harvest(&mut self) -> Result<()> {
        match self.tracker.as_mut() {
            Some(t) => t.harvest(&mut self.dirty),
            None => Err(Error::Protocol("dirty tracking is not running".into())),
        }
    }

    fn stop_tracking(&mut self) {
        if let Some(t) = self.tracker.as_mut() {
            if let Err(e) = t.stop() {
                log::warn!("stopping dirty tracking: {e}");
            }
        }
    }

    /// After a failure: tells the destination, shuts every connection down, removes the
    /// throttle and resumes the guest if it was paused. Returns the error to report.
    fn roll_back(&mut self, handles: &[Stream], phase: Phase, e: Error) -> Error {
        let e = explain(&handles[0], phase, e);
        for h in handles {
            h.shutdown();
        }
        if let Err(t) = self.vm.set_throttle(0) {
            log::warn!("removing throttle after failed migration: {t}");
        }
        if self.paused {
            if let Err(re) = self.vm.resume() {
                log::error!("resuming the source after failed migration: {re}");
            }
        }
        Error::Migration {
            phase,
            source: Box::new(e),
        }
    }

    /// Handshake, then memory over worker threads (one per memory connection), then commit.
    fn run(&mut self, conn: Connections) -> PhaseResult<MigrationReport> {
        let cpu0 = thread_cpu_seconds();
        let cfg = self.cfg;
        let mem = self.vm.memory();
        let n = conn.memory.len();
        let mut control = conn.control;
        let layout = MemoryLayout::of(mem);
        let memory_bytes = layout.total_bytes();
        self.handshake(&mut control, layout)?;
        for m in &conn.memory {
            m.set_timeouts(Some(cfg.io_timeout)).at(Phase::PreCopy)?;
        }
        self.notify(Progress::Started { memory_bytes });
        self.tracker = Some(self.vm.dirty_tracker().at(Phase::PreCopy)?);
        let pages = GuestPages::new(mem).at(Phase::PreCopy)?;
        let rate = cfg.max_bandwidth.map(|b| b as f64 / n as f64);

        std::thread::scope(|s| {
            let (reply_tx, reply_rx) = unbounded::<Reply>();
            let mut senders = Vec::new();
            let mut workers = Vec::new();
            for (i, stream) in conn.memory.into_iter().enumerate() {
                let (tx, rx) = bounded::<Cmd>(4);
                let reply_tx = reply_tx.clone();
                let pages = &pages;
                senders.push(tx);
                workers.push(s.spawn(move || worker(i, stream, pages, rx, reply_tx, rate)));
            }
            drop(reply_tx);
            let mut ctx = Ctx {
                senders,
                replies: reply_rx,
                totals: vec![StreamCounters::default(); n],
                io_timeout: cfg.io_timeout,
                region_starts: pages.region_starts(),
            };
            let r = self.transfer(&mut ctx, &mut control);
            // On an error the control connection stays open: `migrate` tells the destination
            // why (an `Abort` with the reason) before it shuts every connection down.
            drop(ctx);
            let worker_cpu: f64 = workers.into_iter().map(|w| w.join().unwrap_or(0.0)).sum();
            r.map(|mut rep| {
                rep.cpu_s = thread_cpu_seconds() - cpu0 + worker_cpu;
                rep
            })
        })
    }

    fn handshake(&self, control: &mut Stream, layout: MemoryLayout) -> PhaseResult<()> {
        control
            .set_timeouts(Some(self.cfg.handshake_timeout))
            .at(Phase::Handshake)?;
        write_message(
            control,
            &ControlMessage::Hello {
                page_size: PAGE_SIZE as u32,
                layout,
                features: FEATURES,
            },
        )
        .at(Phase::Handshake)?;
        match read_message(control).at(Phase::Handshake)? {
            ControlMessage::HelloReply { refused: None } => {}
            ControlMessage::HelloReply {
                refused: Some(reason),
            } => return Err((Phase::Handshake, Error::Incompatible(reason))),
            ControlMessage::Abort { reason } => {
                return Err((Phase::Handshake, Error::Peer(reason)));
            }
            m => return Err((Phase::Handshake, unexpected(&m))),
        }
        control
            .set_timeouts(Some(self.cfg.io_timeout))
            .at(Phase::PreCopy)
    }

    /// Pre-copy rounds until the policy switches over, then stop-and-copy and commit.
    fn transfer(&mut self, ctx: &mut Ctx, control: &mut Stream) -> PhaseResult<MigrationReport> {
        self.precopy_start = Instant::now();
        self.last_harvest = self.precopy_start;
        let switchover = loop {
            if let Some(reason) = self.precopy_round(ctx, control)? {
                break reason;
            }
            self.round += 1;
        };
        let pause_at = Instant::now();
        let state_bytes = self.stop_and_copy(ctx, control)?;
        self.commit(control)?;
        let downtime_ms = pause_at.elapsed().as_secs_f64() * 1e3;
        self.notify(Progress::Completed { downtime_ms });
        Ok(MigrationReport {
            memory_bytes: self.vm.memory().iter().map(|r| r.len()).sum(),
            connections: ctx.senders.len(),
            bytes_sent: self.stats.iter().map(|r| r.bytes).sum(),
            rounds: std::mem::take(&mut self.stats),
            switchover,
            total_ms: self.start.elapsed().as_secs_f64() * 1e3,
            downtime_ms,
            state_bytes,
            cpu_s: 0.0,
        })
    }

    /// One pre-copy round: sends what is dirty (round 0: everything that may hold data),
    /// harvests, and asks the policy. Returns why to switch over, or `None` to go on.
    fn precopy_round(
        &mut self,
        ctx: &mut Ctx,
        control: &mut Stream,
    ) -> PhaseResult<Option<SwitchoverReason>> {
        let round = self.round;
        let t0 = Instant::now();
        if round == 0 {
            // Dirty tracking is already on: what is written after this snapshot goes next round.
            let touched = crate::pages::TouchedPages::snapshot(self.vm.memory()).runs();
            ctx.dispatch(touched, true).at(Phase::PreCopy)?;
        } else {
            let runs = self.dirty.runs();
            self.dirty.clear();
            ctx.dispatch(runs, false).at(Phase::PreCopy)?;
        }
        let d = ctx.finish(false, u64::from(round)).at(Phase::PreCopy)?;
        let secs = t0.elapsed().as_secs_f64();
        self.policy.record_round(d.bytes, secs);
        self.harvest().at(Phase::PreCopy)?;
        let found = self.dirty.count();
        let now = Instant::now();
        let rate =
            found as f64 * PAGE_SIZE as f64 / (now - self.last_harvest).as_secs_f64().max(1e-6);
        self.last_harvest = now;
        write_message(
            control,
            &ControlMessage::RoundEnd {
                round,
                pages: d.data_pages + d.zero_pages,
            },
        )
        .at(Phase::PreCopy)?;
        let rs = self.round_stats(round, &d, secs, found, rate);
        self.notify(Progress::Round(rs.clone()));
        self.stats.push(rs);
        match self.policy.decide(found, self.precopy_start.elapsed()) {
            Decision::Switchover(r) => return Ok(Some(r)),
            Decision::Continue => {}
            Decision::Throttle(p) => {
                self.vm.set_throttle(p).at(Phase::PreCopy)?;
                self.notify(Progress::Throttled { percent: p });
            }
            Decision::Abort => {
                return Err((
                    Phase::PreCopy,
                    Error::NotConverged(format!(
                        "{found} dirty pages after {} rounds in {:.1} s; estimated final round {:.0} ms exceeds the {} ms target",
                        round + 1,
                        self.precopy_start.elapsed().as_secs_f64(),
                        self.policy.estimate(found).as_secs_f64() * 1e3,
                        self.cfg.downtime_target.as_millis()
                    )),
                ));
            }
        }
        Ok(None)
    }

    /// Pauses the guest, sends the last dirty pages, ends every memory stream and sends the
    /// state. Returns the state's size.
    fn stop_and_copy(&mut self, ctx: &mut Ctx, control: &mut Stream) -> PhaseResult<u64> {
        // Resume on failure even if the pause itself failed half-way (resume is idempotent).
        self.paused = true;
        self.vm.pause().at(Phase::StopAndCopy)?;
        self.harvest().at(Phase::StopAndCopy)?;
        let found = self.dirty.count();
        self.notify(Progress::Switchover { dirty_pages: found });
        let t0 = Instant::now();
        ctx.dispatch(self.dirty.runs(), false)
            .at(Phase::StopAndCopy)?;
        let d = ctx.finish(true, 0).at(Phase::StopAndCopy)?;
        let state = self.vm.save_state().at(Phase::StopAndCopy)?;
        let state_bytes = state.len() as u64;
        write_message(
            control,
            &ControlMessage::State {
                state,
                pages_per_connection: ctx
                    .totals
                    .iter()
                    .map(|c| c.data_pages + c.zero_pages)
                    .collect(),
            },
        )
        .at(Phase::StopAndCopy)?;
        let secs = t0.elapsed().as_secs_f64();
        let rs = self.round_stats(self.round + 1, &d, secs, found, 0.0);
        self.stats.push(rs);
        Ok(state_bytes)
    }

    /// The source stays authoritative until the destination's CommitAck.
    fn commit(&self, control: &mut Stream) -> PhaseResult<()> {
        control
            .set_timeouts(Some(self.cfg.commit_timeout))
            .at(Phase::Commit)?;
        expect(control, "Ready", |m| matches!(m, ControlMessage::Ready)).at(Phase::Commit)?;
        write_message(control, &ControlMessage::Commit).at(Phase::Commit)?;
        expect(control, "CommitAck", |m| {
            matches!(m, ControlMessage::CommitAck)
        })
        .at(Phase::Commit)
    }
}

struct Ctx {
    senders: Vec<Sender<Cmd>>,
    replies: Receiver<Reply>,
    totals: Vec<StreamCounters>,
    io_timeout: Duration,
    /// Guest-physical start of every memory region, ascending: runs are never joined across
    /// one (adjacent regions are separate mappings).
    region_starts: Vec<u64>,
}

impl Ctx {
    fn worker_failure(&self) -> Error {
        match self.replies.recv_timeout(Duration::from_secs(1)) {
            Ok((i, Err(e))) => annotate(i, e),
            _ => Error::Protocol("a memory connection worker stopped".into()),
        }
    }

    fn send(&self, i: usize, cmd: Cmd) -> Result<()> {
        self.senders[i].send(cmd).map_err(|_| self.worker_failure())
    }

    /// Splits runs into stripes and hands them to the owning workers. Runs that touch are
    /// joined, except across the start of a region: with one connection (or a region boundary
    /// inside a stripe) the pages on both sides of a boundary between adjacent regions go to
    /// the same worker, and a joined run would span two host mappings.
    fn dispatch(&self, runs: Vec<PageRun>, skip_zero: bool) -> Result<()> {
        let n = self.senders.len() as u64;
        let mut pending: Vec<(Vec<PageRun>, u64)> = (0..n).map(|_| (Vec::new(), 0)).collect();
        for run in runs {
            let (mut gpa, mut count) = (run.gpa, run.pages);
            while count > 0 {
                let stripe = gpa / STRIPE_BYTES;
                let stripe_end = (stripe + 1) * STRIPE_BYTES;
                let take = count.min((stripe_end - gpa) / PAGE_SIZE);
                let c = (stripe % n) as usize;
                let (list, pages) = &mut pending[c];
                let starts_region = self.region_starts.binary_search(&gpa).is_ok();
                match list.last_mut() {
                    Some(last) if last.end() == gpa && !starts_region => last.pages += take,
                    _ => list.push(PageRun::new(gpa, take)),
                }
                *pages += take;
                if *pages >= JOB_PAGES {
                    let job = std::mem::take(list);
                    *pages = 0;
                    self.send(c, Cmd::Runs(job, skip_zero))?;
                }
                gpa += take * PAGE_SIZE;
                count -= take;
            }
        }
        for (c, (list, _)) in pending.into_iter().enumerate() {
            if !list.is_empty() {
                self.send(c, Cmd::Runs(list, skip_zero))?;
            }
        }
        Ok(())
    }

    /// Ends a round (or the stream) on every connection; returns what the round moved.
    fn finish(&mut self, end_stream: bool, round: u64) -> Result<StreamCounters> {
        for i in 0..self.senders.len() {
            self.send(
                i,
                if end_stream {
                    Cmd::EndStream
                } else {
                    Cmd::EndRound(round)
                },
            )?;
        }
        let mut delta = StreamCounters::default();
        for _ in 0..self.senders.len() {
            let (i, r) = self
                .replies
                .recv_timeout(self.io_timeout + Duration::from_secs(5))
                .map_err(|_| Error::Timeout("memory connection worker did not finish".into()))?;
            let c = r.map_err(|e| annotate(i, e))?;
            let old = self.totals[i];
            delta.data_pages += c.data_pages - old.data_pages;
            delta.zero_pages += c.zero_pages - old.zero_pages;
            delta.bytes += c.bytes - old.bytes;
            self.totals[i] = c;
        }
        Ok(delta)
    }
}

fn annotate(i: usize, e: Error) -> Error {
    match e {
        Error::Disconnected | Error::Timeout(_) | Error::Io { .. } => e,
        other => Error::MemoryConnection {
            index: i,
            source: Box::new(other),
        },
    }
}

fn expect(control: &mut Stream, what: &str, ok: impl Fn(&ControlMessage) -> bool) -> Result<()> {
    let m = read_message(control).map_err(|e| match e {
        Error::Timeout(_) => Error::Timeout(format!("waiting for the destination's {what}")),
        e => e,
    })?;
    if ok(&m) {
        return Ok(());
    }
    match m {
        ControlMessage::Abort { reason } => Err(Error::Peer(reason)),
        m => Err(unexpected(&m)),
    }
}

fn unexpected(m: &ControlMessage) -> Error {
    let name = format!("{m:?}");
    let name: String = name.chars().take_while(|c| c.is_alphanumeric()).collect();
    Error::Protocol(format!("unexpected control message {name}"))
}

fn worker(
    index: usize,
    stream: Stream,
    pages: &GuestPages<'_>,
    rx: Receiver<Cmd>,
    reply: Sender<Reply>,
    rate: Option<f64>,
) -> f64 {
    let cpu0 = thread_cpu_seconds();
    let mut w = BatchWriter::new(&stream, pages);
    let mut limiter = RateLimiter::new(rate);
    let mut accounted = 0;
    for cmd in rx {
        let r = match cmd {
            Cmd::Runs(runs, skip_zero) => {
                let mut r = Ok(());
                for run in runs {
                    r = w.push_run(run, skip_zero);
                    if r.is_err() {
                        break;
                    }
                    limiter.account(w.counters.bytes - accounted);
                    accounted = w.counters.bytes;
                }
                match r {
                    Ok(()) => continue,
                    Err(e) => Err(e),
                }
            }
            Cmd::EndRound(round) => w.marker(Record::EndOfRound { round }).map(|_| w.counters),
            Cmd::EndStream => {
                let total_pages = w.counters.data_pages + w.counters.zero_pages;
                w.marker(Record::EndOfStream { total_pages })
                    .map(|_| w.counters)
            }
        };
        let failed = r.is_err();
        let _ = reply.send((index, r));
        if failed {
            break;
        }
    }
    drop(stream);
    thread_cpu_seconds() - cpu0
}
