//! The receiving side: handshake, page streams written straight into guest memory, state,
//! commit. A failure at any point drops the half-received guest (it is never resumed).

use crate::codec::{read_message, write_message};
use crate::dirty::PAGE_SIZE;
use crate::pages::{GuestPages, ReceivedCounters, receive_stream};
use crate::policy::MigrationConfig;
use crate::protocol::{ControlMessage, FEATURES, MemoryLayout};
use crate::stats::{ReceiveReport, thread_cpu_seconds};
use crate::transport::{Connections, Stream};
use crate::vm::IncomingVm;
use crate::{Error, Phase, Result};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Receives a migration on `conn`. `make_vm` builds the destination VM for the announced
/// layout (its memory must have exactly that layout). The VM is resumed only after the source's
/// commit; on success it is returned running. On failure it is dropped without ever running and
/// the error is [`Error::Migration`] naming the phase.
pub fn receive<V: IncomingVm>(
    mut conn: Connections,
    cfg: &MigrationConfig,
    make_vm: impl FnOnce(&MemoryLayout) -> Result<V>,
) -> Result<(V, ReceiveReport)> {
    let handles: Vec<Stream> = std::iter::once(conn.control.try_clone())
        .chain(conn.memory.iter().map(Stream::try_clone))
        .collect::<Result<_>>()?;
    let start = Instant::now();
    let cpu0 = thread_cpu_seconds();
    let mut control = conn.control;
    let fail = |phase: Phase, e: Error, control: &mut Stream| {
        // Best effort: tell the source why, then make sure nobody waits on us.
        let _ = control.set_timeouts(Some(Duration::from_millis(200)));
        let _ = write_message(
            control,
            &ControlMessage::Abort {
                reason: format!("destination failed in {phase}: {e}"),
            },
        );
        for h in &handles {
            h.shutdown();
        }
        Error::Migration {
            phase,
            source: Box::new(e),
        }
    };

    // Handshake.
    let vm = match handshake(&mut control, cfg, make_vm, conn.memory.len()) {
        Ok(vm) => vm,
        Err(e) => return Err(fail(Phase::Handshake, e, &mut control)),
    };

    // Receive memory and state.
    let n = conn.memory.len();
    let pages = match GuestPages::new(vm.memory()) {
        Ok(p) => p,
        Err(e) => return Err(fail(Phase::Receive, e, &mut control)),
    };
    pages.advise_huge_pages();
    let failed = AtomicBool::new(false);
    let activity = AtomicU64::new(0);
    let mut rounds = 0u32;
    let populate_stop = AtomicBool::new(false);
    let received = std::thread::scope(|s| {
        // Fresh memory faulted in beside the receivers, until receiving ends either way.
        let stop_populating = SetOnDrop(&populate_stop);
        let populate = cfg.populate_ahead.then(|| {
            s.spawn(|| {
                let c0 = thread_cpu_seconds();
                let bytes = pages.populate_ahead(stop_populating.0);
                (bytes, thread_cpu_seconds() - c0)
            })
        });
        // (connection, result, CPU seconds, whether it was the first to fail)
        let (tx, rx) =
            crossbeam_channel::unbounded::<(usize, Result<ReceivedCounters>, f64, bool)>();
        for (i, m) in conn.memory.iter_mut().enumerate() {
            let tx = tx.clone();
            let pages = &pages;
            let failed = &failed;
            let activity = &activity;
            let handles = &handles;
            let _ = m.set_timeouts(Some(cfg.io_timeout));
            s.spawn(move || {
                let c0 = thread_cpu_seconds();
                let r = receive_stream(m, pages, |c| {
                    activity.fetch_add(1, Ordering::Relaxed);
                    if failed.load(Ordering::Relaxed) {
                        return Err(Error::Protocol("another connection failed".into()));
                    }
                    let _ = c;
                    Ok(())
                });
                let first = r.is_err() && !failed.swap(true, Ordering::SeqCst);
                if first {
                    // Wake the control loop and the other receivers.
                    for h in handles.iter().skip(1) {
                        h.shutdown();
                    }
                }
                let _ = tx.send((i, r, thread_cpu_seconds() - c0, first));
            });
        }
        drop(tx);
        let r = control_loop(&mut control, cfg, &failed, &activity, &mut rounds);
        let state = match r {
            Ok(s) => s,
            Err(e) => {
                failed.store(true, Ordering::SeqCst);
                for h in handles.iter().skip(1) {
                    h.shutdown();
                }
                // Prefer a memory connection's error: it is the cause, the control's the effect;
                // and of those the first, not what the shutdown it caused did to the others.
                let mut cause = None;
                for (i, r, _, first) in rx.iter() {
                    let Err(me) = r else { continue };
                    if matches!(me, Error::Protocol(ref m) if m == "another connection failed") {
                        continue;
                    }
                    if first || cause.is_none() {
                        cause = Some(Error::MemoryConnection {
                            index: i,
                            source: Box::new(me),
                        });
                        if first {
                            break;
                        }
                    }
                }
                return Err(cause.unwrap_or(e));
            }
        };
        let mut results = (0..n)
            .map(|_| {
                rx.recv_timeout(cfg.io_timeout)
                    .map_err(|_| Error::Timeout("memory connections did not finish".into()))
            })
            .collect::<Result<Vec<_>>>()?;
        // Errors first, the first connection to fail ahead of the others: it names the cause.
        results.sort_by_key(|(_, r, _, first)| (r.is_ok(), !first));
        let mut totals = vec![ReceivedCounters::default(); n];
        drop(stop_populating);
        let (populated, mut cpu) = populate.map_or((0, 0.0), |t| t.join().unwrap_or((0, 0.0)));
        log::debug!("faulted {} MiB in ahead of the stream", populated >> 20);
        for (i, r, c, _) in results {
            totals[i] = r.map_err(|e| Error::MemoryConnection {
                index: i,
                source: Box::new(e),
            })?;
            cpu += c;
        }
        Ok((state, totals, cpu))
    });
    let ((state, pages_per_connection), totals, recv_cpu) = match received {
        Ok(x) => x,
        Err(e) => return Err(fail(Phase::Receive, e, &mut control)),
    };
    for (i, (got, want)) in totals.iter().zip(&pages_per_connection).enumerate() {
        if got.data_pages + got.zero_pages != *want {
            let e = Error::Protocol(format!(
                "memory connection {i}: {} pages arrived, source sent {want}",
                got.data_pages + got.zero_pages
            ));
            return Err(fail(Phase::Receive, e, &mut control));
        }
    }
    if pages_per_connection.len() != n {
        let e = Error::Protocol("state names a different number of connections".into());
        return Err(fail(Phase::Receive, e, &mut control));
    }
    if let Err(e) = vm.restore_state(&state) {
        return Err(fail(Phase::Receive, e, &mut control));
    }

    // Commit: run only once the source has let go.
    let commit = (|| -> Result<()> {
        control.set_timeouts(Some(cfg.commit_timeout))?;
        write_message(&mut control, &ControlMessage::Ready)?;
        match read_message(&mut control).map_err(|e| match e {
            Error::Timeout(_) => Error::Timeout("waiting for the source's Commit".into()),
            e => e,
        })? {
            ControlMessage::Commit => Ok(()),
            ControlMessage::Abort { reason } => Err(Error::Peer(reason)),
            _ => Err(Error::Protocol("expected Commit".into())),
        }
    })();
    if let Err(e) = commit {
        return Err(fail(Phase::Commit, e, &mut control));
    }
    if let Err(e) = vm.resume() {
        // Committed: the source has let go; nothing to roll back to. Report loudly.
        return Err(Error::Migration {
            phase: Phase::Commit,
            source: Box::new(e),
        });
    }
    if let Err(e) = write_message(&mut control, &ControlMessage::CommitAck) {
        log::warn!("guest resumed but the commit acknowledgement was not delivered: {e}");
    }
    let report = ReceiveReport {
        data_pages: totals.iter().map(|c| c.data_pages).sum(),
        zero_pages: totals.iter().map(|c| c.zero_pages).sum(),
        bytes: totals.iter().map(|c| c.bytes).sum(),
        rounds,
        total_ms: start.elapsed().as_secs_f64() * 1e3,
        cpu_s: thread_cpu_seconds() - cpu0 + recv_cpu,
    };
    Ok((vm, report))
}

fn handshake<V: IncomingVm>(
    control: &mut Stream,
    cfg: &MigrationConfig,
    make_vm: impl FnOnce(&MemoryLayout) -> Result<V>,
    connections: usize,
) -> Result<V> {
    control.set_timeouts(Some(cfg.handshake_timeout))?;
    if connections == 0 {
        return Err(Error::Protocol("no memory connection".into()));
    }
    let (page_size, layout, features) = match read_message(control)? {
        ControlMessage::Hello {
            page_size,
            layout,
            features,
        } => (page_size, layout, features),
        ControlMessage::Abort { reason } => return Err(Error::Peer(reason)),
        _ => return Err(Error::Protocol("expected Hello".into())),
    };
    let refuse = |control: &mut Stream, reason: String| -> Error {
        let _ = write_message(
            control,
            &ControlMessage::HelloReply {
                refused: Some(reason.clone()),
            },
        );
        Error::Incompatible(reason)
    };
    if u64::from(page_size) != PAGE_SIZE {
        return Err(refuse(
            control,
            format!("page size {page_size}, we use {PAGE_SIZE}"),
        ));
    }
    if features & !FEATURES != 0 {
        return Err(refuse(
            control,
            format!("unknown feature bits {:#x}", features & !FEATURES),
        ));
    }
    if let Err(e) = layout.validate() {
        return Err(refuse(control, e.to_string()));
    }
    let vm = match make_vm(&layout) {
        Ok(vm) => vm,
        Err(e) => return Err(refuse(control, format!("cannot create the guest: {e}"))),
    };
    let have = MemoryLayout::of(vm.memory());
    if have != layout {
        return Err(refuse(
            control,
            format!("destination memory layout {have:?} differs from {layout:?}"),
        ));
    }
    write_message(control, &ControlMessage::HelloReply { refused: None })?;
    Ok(vm)
}

type StateAndCounts = (Vec<u8>, Vec<u64>);

/// Reads control messages until the State arrives, watching the memory receivers.
fn control_loop(
    control: &mut Stream,
    cfg: &MigrationConfig,
    failed: &AtomicBool,
    activity: &AtomicU64,
    rounds: &mut u32,
) -> Result<StateAndCounts> {
    control.set_timeouts(Some(cfg.io_timeout))?;
    let mut last_activity = (activity.load(Ordering::Relaxed), Instant::now());
    loop {
        if failed.load(Ordering::SeqCst) {
            return Err(Error::Protocol("a memory connection failed".into()));
        }
        if control.wait_readable(100)? {
            match read_message(control)? {
                ControlMessage::RoundEnd { .. } => *rounds += 1,
                ControlMessage::State {
                    state,
                    pages_per_connection,
                } => return Ok((state, pages_per_connection)),
                ControlMessage::Abort { reason } => return Err(Error::Peer(reason)),
                _ => {
                    return Err(Error::Protocol(
                        "unexpected control message during receive".into(),
                    ));
                }
            }
            last_activity.1 = Instant::now();
        } else {
            let a = activity.load(Ordering::Relaxed);
            if a != last_activity.0 {
                last_activity = (a, Instant::now());
            } else if last_activity.1.elapsed() > cfg.io_timeout {
                return Err(Error::Timeout(format!(
                    "source silent for {} s",
                    cfg.io_timeout.as_secs()
                )));
            }
        }
    }
}

/// Sets its flag when dropped: stops a helper thread however the scope that spawned it ends.
struct SetOnDrop<'a>(&'a AtomicBool);

impl Drop for SetOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}
