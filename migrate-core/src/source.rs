//! The sending side: pre-copy rounds, switchover, commit, rollback.
//!
//! One worker thread per memory connection writes batches straight from guest memory; the
//! calling thread harvests dirty pages, splits them into stripes (a page always goes to the same
//! connection, see [`crate::protocol`]) and runs the policy and the control connection.

use crate::codec::{read_message, write_message};
use crate::dirty::{DirtyBitmap, DirtyTracker, PAGE_SIZE};
use crate::pages::{BatchWriter, GuestPages, StreamCounters};
use crate::policy::{Decision, MigrationConfig, Policy, RateLimiter};
use crate::protocol::{ControlMessage, FEATURES, MemoryLayout, Record, STRIPE_BYTES};
use crate::stats::{MigrationReport, Progress, RoundStats, thread_cpu_seconds};
use crate::transport::{Connections, Stream};
use crate::vm::MigratableVm;
use crate::{Error, Phase, Result};
use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// Pages handed to a worker at a time.
const JOB_PAGES: u64 = 1024;

enum Cmd {
    Runs(Vec<(u64, u64)>, bool),
    EndRound(u64),
    EndStream,
}

type Reply = (usize, Result<StreamCounters>);

trait At<T> {
    fn at(self, phase: Phase) -> std::result::Result<T, (Phase, Error)>;
}

impl<T> At<T> for Result<T> {
    fn at(self, phase: Phase) -> std::result::Result<T, (Phase, Error)> {
        self.map_err(|e| (phase, e))
    }
}

/// Migrates `vm` over `conn`. On success the source guest stays paused (the destination owns
/// it now). On any failure before the destination's commit acknowledgement the source guest is
/// resumed, its memory untouched, and the error is [`Error::Migration`] naming the phase.
/// Progress events go to `progress` with `try_send`: a full bounded channel drops events
/// rather than stalling the migration.
pub fn migrate(
    vm: &dyn MigratableVm,
    conn: Connections,
    cfg: &MigrationConfig,
    progress: Option<Sender<Progress>>,
) -> Result<MigrationReport> {
    let handles: Vec<Stream> = std::iter::once(conn.control.try_clone())
        .chain(conn.memory.iter().map(Stream::try_clone))
        .collect::<Result<_>>()?;
    let mut paused = false;
    let mut tracker: Option<Box<dyn DirtyTracker>> = None;
    let r = run(vm, conn, cfg, progress.as_ref(), &mut paused, &mut tracker);
    if let Some(t) = tracker.as_mut() {
        if let Err(e) = t.stop() {
            log::warn!("stopping dirty tracking: {e}");
        }
    }
    match r {
        Ok(rep) => Ok(rep),
        Err((phase, e)) => {
            let e = explain(&handles[0], phase, e);
            for h in &handles {
                h.shutdown();
            }
            if let Err(t) = vm.set_throttle(0) {
                log::warn!("removing throttle after failed migration: {t}");
            }
            if paused {
                if let Err(re) = vm.resume() {
                    log::error!("resuming the source after failed migration: {re}");
                }
            }
            Err(Error::Migration {
                phase,
                source: Box::new(e),
            })
        }
    }
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

fn run(
    vm: &dyn MigratableVm,
    conn: Connections,
    cfg: &MigrationConfig,
    progress: Option<&Sender<Progress>>,
    paused: &mut bool,
    tracker_slot: &mut Option<Box<dyn DirtyTracker>>,
) -> std::result::Result<MigrationReport, (Phase, Error)> {
    let start = Instant::now();
    let cpu0 = thread_cpu_seconds();
    let mem = vm.memory();
    let layout = MemoryLayout::of(mem);
    let n = conn.memory.len();
    let mut control = conn.control;

    // Handshake.
    control
        .set_timeouts(Some(cfg.handshake_timeout))
        .at(Phase::Handshake)?;
    write_message(
        &mut control,
        &ControlMessage::Hello {
            page_size: PAGE_SIZE as u32,
            layout: layout.clone(),
            features: FEATURES,
        },
    )
    .at(Phase::Handshake)?;
    match read_message(&mut control).at(Phase::Handshake)? {
        ControlMessage::HelloReply { refused: None } => {}
        ControlMessage::HelloReply {
            refused: Some(reason),
        } => return Err((Phase::Handshake, Error::Incompatible(reason))),
        ControlMessage::Abort { reason } => return Err((Phase::Handshake, Error::Peer(reason))),
        m => return Err((Phase::Handshake, unexpected(&m))),
    }
    control
        .set_timeouts(Some(cfg.io_timeout))
        .at(Phase::PreCopy)?;
    for m in &conn.memory {
        m.set_timeouts(Some(cfg.io_timeout)).at(Phase::PreCopy)?;
    }
    send(
        progress,
        Progress::Started {
            memory_bytes: layout.total_bytes(),
        },
    );

    let tracker = tracker_slot.insert(vm.dirty_tracker().at(Phase::PreCopy)?);
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
        };
        let r = rounds(
            vm,
            &mut ctx,
            tracker.as_mut(),
            &mut control,
            cfg,
            progress,
            paused,
            start,
        );
        // On an error the control connection stays open: `migrate` tells the destination why
        // (an `Abort` with the reason) before it shuts every connection down.
        drop(ctx);
        let worker_cpu: f64 = workers.into_iter().map(|w| w.join().unwrap_or(0.0)).sum();
        r.map(|mut rep| {
            rep.cpu_s = thread_cpu_seconds() - cpu0 + worker_cpu;
            rep
        })
    })
}

struct Ctx {
    senders: Vec<Sender<Cmd>>,
    replies: Receiver<Reply>,
    totals: Vec<StreamCounters>,
    io_timeout: Duration,
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

    /// Splits runs into stripes and hands them to the owning workers.
    fn dispatch(&self, runs: impl Iterator<Item = (u64, u64)>, skip_zero: bool) -> Result<()> {
        let n = self.senders.len() as u64;
        let mut pending: Vec<(Vec<(u64, u64)>, u64)> = (0..n).map(|_| (Vec::new(), 0)).collect();
        for (mut gpa, mut count) in runs {
            while count > 0 {
                let stripe = gpa / STRIPE_BYTES;
                let stripe_end = (stripe + 1) * STRIPE_BYTES;
                let take = count.min((stripe_end - gpa) / PAGE_SIZE);
                let c = (stripe % n) as usize;
                let (list, pages) = &mut pending[c];
                match list.last_mut() {
                    Some((g, k)) if *g + *k * PAGE_SIZE == gpa => *k += take,
                    _ => list.push((gpa, take)),
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
        other => Error::Protocol(format!("memory connection {i}: {other}")),
    }
}

#[allow(clippy::too_many_arguments)]
fn rounds(
    vm: &dyn MigratableVm,
    ctx: &mut Ctx,
    tracker: &mut dyn DirtyTracker,
    control: &mut Stream,
    cfg: &MigrationConfig,
    progress: Option<&Sender<Progress>>,
    paused: &mut bool,
    start: Instant,
) -> std::result::Result<MigrationReport, (Phase, Error)> {
    let mem = vm.memory();
    let memory_bytes: u64 = mem.iter().map(|r| r.len()).sum();
    let mut policy = Policy::new(cfg);
    let mut dirty = DirtyBitmap::for_memory(mem);
    let precopy_start = Instant::now();
    let mut last_harvest = precopy_start;
    let mut stats: Vec<RoundStats> = Vec::new();
    let mut round = 0u32;
    let reason = loop {
        let t0 = Instant::now();
        if round == 0 {
            // Dirty tracking is already on: what is written after this snapshot goes next round.
            let touched = crate::pages::TouchedPages::snapshot(mem).runs();
            ctx.dispatch(touched.into_iter(), true).at(Phase::PreCopy)?;
        } else {
            let mut runs = Vec::new();
            dirty.for_each_run(|g, n| runs.push((g, n)));
            dirty.clear();
            ctx.dispatch(runs.into_iter(), false).at(Phase::PreCopy)?;
        }
        let d = ctx.finish(false, u64::from(round)).at(Phase::PreCopy)?;
        let secs = t0.elapsed().as_secs_f64();
        policy.record_round(d.bytes, secs);
        tracker.harvest(&mut dirty).at(Phase::PreCopy)?;
        let found = dirty.count();
        let now = Instant::now();
        let rate = found as f64 * PAGE_SIZE as f64 / (now - last_harvest).as_secs_f64().max(1e-6);
        last_harvest = now;
        write_message(
            control,
            &ControlMessage::RoundEnd {
                round,
                pages: d.data_pages + d.zero_pages,
            },
        )
        .at(Phase::PreCopy)?;
        let rs = RoundStats {
            round,
            pages_sent: d.data_pages,
            zero_pages: d.zero_pages,
            bytes: d.bytes,
            duration_ms: secs * 1e3,
            dirty_pages_found: found,
            bandwidth_bytes_s: d.bytes as f64 / secs.max(1e-9),
            dirty_rate_bytes_s: rate,
            throttle_percent: policy.throttle(),
        };
        send(progress, Progress::Round(rs.clone()));
        stats.push(rs);
        match policy.decide(found, precopy_start.elapsed()) {
            Decision::Switchover(r) => break r,
            Decision::Continue => {}
            Decision::Throttle(p) => {
                vm.set_throttle(p).at(Phase::PreCopy)?;
                send(progress, Progress::Throttled { percent: p });
            }
            Decision::Abort => {
                return Err((
                    Phase::PreCopy,
                    Error::NotConverged(format!(
                        "{found} dirty pages after {} rounds in {:.1} s; estimated final round {:.0} ms exceeds the {} ms target",
                        round + 1,
                        precopy_start.elapsed().as_secs_f64(),
                        policy.estimate(found).as_secs_f64() * 1e3,
                        cfg.downtime_target.as_millis()
                    )),
                ));
            }
        }
        round += 1;
    };

    // Stop and copy.
    let pause_at = Instant::now();
    // Resume on failure even if the pause itself failed half-way (resume is idempotent).
    *paused = true;
    vm.pause().at(Phase::StopAndCopy)?;
    tracker.harvest(&mut dirty).at(Phase::StopAndCopy)?;
    send(
        progress,
        Progress::Switchover {
            dirty_pages: dirty.count(),
        },
    );
    let t0 = Instant::now();
    let found = dirty.count();
    let mut runs = Vec::new();
    dirty.for_each_run(|g, n| runs.push((g, n)));
    ctx.dispatch(runs.into_iter(), false)
        .at(Phase::StopAndCopy)?;
    let d = ctx.finish(true, 0).at(Phase::StopAndCopy)?;
    let state = vm.save_state().at(Phase::StopAndCopy)?;
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
    stats.push(RoundStats {
        round: round + 1,
        pages_sent: d.data_pages,
        zero_pages: d.zero_pages,
        bytes: d.bytes,
        duration_ms: secs * 1e3,
        dirty_pages_found: found,
        bandwidth_bytes_s: d.bytes as f64 / secs.max(1e-9),
        dirty_rate_bytes_s: 0.0,
        throttle_percent: policy.throttle(),
    });

    // Commit: the source stays authoritative until CommitAck.
    control
        .set_timeouts(Some(cfg.commit_timeout))
        .at(Phase::Commit)?;
    expect(control, "Ready", |m| matches!(m, ControlMessage::Ready)).at(Phase::Commit)?;
    write_message(control, &ControlMessage::Commit).at(Phase::Commit)?;
    expect(control, "CommitAck", |m| {
        matches!(m, ControlMessage::CommitAck)
    })
    .at(Phase::Commit)?;
    let downtime_ms = pause_at.elapsed().as_secs_f64() * 1e3;
    send(progress, Progress::Completed { downtime_ms });
    Ok(MigrationReport {
        memory_bytes,
        connections: ctx.senders.len(),
        bytes_sent: stats.iter().map(|r| r.bytes).sum(),
        rounds: stats,
        switchover: reason,
        total_ms: start.elapsed().as_secs_f64() * 1e3,
        downtime_ms,
        state_bytes,
        cpu_s: 0.0,
    })
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

fn send(progress: Option<&Sender<Progress>>, p: Progress) {
    if let Some(tx) = progress {
        let _ = tx.try_send(p);
    }
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
    let mut w = BatchWriter::new(stream.as_raw_fd(), pages);
    let mut limiter = RateLimiter::new(rate);
    let mut accounted = 0;
    for cmd in rx {
        let r = match cmd {
            Cmd::Runs(runs, skip_zero) => {
                let mut r = Ok(());
                for (g, n) in runs {
                    r = w.push_run(g, n, skip_zero);
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
