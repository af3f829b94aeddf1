//! Rollback: every failure before commit leaves the source guest running with intact memory,
//! the error names the phase, and the destination discards its half-received guest.

mod engine_common;

use engine_common::{Fault, Proxy, Recorded, assert_runs, within};
use migrate_core::codec::{read_message, write_message};
use migrate_core::pages::page_hashes;
use migrate_core::protocol::{ControlMessage, MemoryLayout, Record, RecordHeader, RegionDesc};
use migrate_core::software_guest::{SoftwareGuest, SoftwareGuestConfig};
use migrate_core::transport::{self, Endpoint, Listener};
use migrate_core::vm::MigratableVm;
use migrate_core::{Error, MigrationConfig, Phase, destination, source};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

fn guest_config() -> SoftwareGuestConfig {
    SoftwareGuestConfig {
        layout: MemoryLayout {
            regions: vec![RegionDesc {
                gpa: 0,
                len: 64 << 20,
            }],
        },
        working_set_pages: 1024,
        dirty_rate_mib_s: Some(50.0),
        fill: true,
    }
}

fn config() -> MigrationConfig {
    MigrationConfig {
        downtime_target: Duration::from_millis(50),
        timeout: Duration::from_secs(20),
        handshake_timeout: Duration::from_secs(5),
        commit_timeout: Duration::from_secs(2),
        io_timeout: Duration::from_secs(5),
        // Slow enough that the faults below land mid-round.
        max_bandwidth: Some(64 << 20),
        ..Default::default()
    }
}

/// The source after a failed migration: still running, error in `phase`, and every page it
/// does not write itself unchanged since before the migration.
fn assert_rolled_back(src: &SoftwareGuest, before: &[u64], err: &Error, phase: Phase) {
    assert_rolled_back_in(src, before, err, &[phase]);
}

/// [`assert_rolled_back`] for a fault the source may notice in any of `phases` (when depends
/// on how much the kernel buffered before the cut showed).
fn assert_rolled_back_in(src: &SoftwareGuest, before: &[u64], err: &Error, phases: &[Phase]) {
    let phase = match err {
        Error::Migration { phase: p, .. } => *p,
        e => panic!("expected a migration error, got {e:?}"),
    };
    assert!(phases.contains(&phase), "wrong phase: {err:?}");
    assert!(
        err.to_string().contains(&phase.to_string()),
        "message names the phase: {err}"
    );
    assert_runs(src);
    src.pause().unwrap();
    src.check_consistency().expect("source memory consistent");
    let after = page_hashes(src.guest_memory()).unwrap();
    let written: std::collections::HashSet<usize> = src
        .written_pages()
        .iter()
        .map(|g| (g / 4096) as usize)
        .collect();
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        if !written.contains(&i) {
            assert_eq!(a, b, "page {i} changed though the guest never writes it");
        }
    }
    src.resume().unwrap();
}

/// Runs a migration from a fresh source through a proxy with `fault` to a real destination.
fn run_with_fault(
    fault: Fault,
) -> (
    SoftwareGuest,
    Vec<u64>,
    Error,
    migrate_core::Result<()>,
    bool,
    usize,
) {
    let gcfg = guest_config();
    let src = SoftwareGuest::start(gcfg.clone()).unwrap();
    let before = page_hashes(src.guest_memory()).unwrap();
    let cfg = config();
    let listener = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse().unwrap())).unwrap();
    let Endpoint::Tcp(addr) = listener.endpoint().unwrap() else {
        unreachable!()
    };
    let proxy = Proxy::start(addr, fault);
    let resumed = Arc::new(AtomicBool::new(false));
    // The destination waits for the source's verdict far longer than the source waits for
    // Ready, so the source is always the side that gives up first in the commit phase. With
    // equal timeouts the destination, whose wait starts only a few ms after the source's, could
    // time out and close first on a loaded machine; the source then read that close
    // (Disconnected) before its own timeout fired.
    let dst_cfg = MigrationConfig {
        commit_timeout: Duration::from_secs(60),
        ..cfg.clone()
    };
    let dst = std::thread::spawn({
        let (cfg, resumed) = (dst_cfg, resumed.clone());
        move || -> migrate_core::Result<()> {
            let conn = listener.accept(Duration::from_secs(10))?;
            destination::receive(conn, &cfg, |_| {
                Ok(Recorded::new(SoftwareGuest::incoming(gcfg)?, resumed))
            })
            .map(|_| ())
        }
    });
    let n = 2;
    let err = transport::connect(&Endpoint::Tcp(proxy.addr), n, Duration::from_secs(5))
        .and_then(|c| source::migrate(&src, c, &cfg, None))
        .expect_err("migration must fail");
    let dst_result = dst.join().unwrap();
    drop(proxy);
    (
        src,
        before,
        err,
        dst_result,
        resumed.load(Ordering::SeqCst),
        n,
    )
}

#[test]
fn destination_vanishing_mid_round_rolls_back() {
    within(120, || {
        // 8 MiB into the 64 MiB first round on memory connection 0, every connection dies.
        let (src, before, err, dst, resumed, _) = run_with_fault(Fault::KillAll {
            conn: 1,
            after: 8 << 20,
        });
        assert_rolled_back(&src, &before, &err, Phase::PreCopy);
        assert!(dst.is_err(), "destination must report the failure");
        assert!(!resumed, "half-received guest ran");
    });
}

#[test]
fn one_memory_connection_cut_rolls_back() {
    within(120, || {
        let (src, before, err, dst, resumed, _) = run_with_fault(Fault::CutOne {
            conn: 2,
            after: 4 << 20,
        });
        assert_rolled_back(&src, &before, &err, Phase::PreCopy);
        let e = dst.expect_err("destination must fail");
        assert!(
            matches!(
                e,
                Error::Migration {
                    phase: Phase::Receive,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(!resumed, "half-received guest ran");
    });
}

#[test]
fn control_connection_cut_rolls_back() {
    within(120, || {
        // The control connection carries the preamble (32) + Hello; cut right after Hello.
        let (src, before, err, dst, resumed, _) = run_with_fault(Fault::CutOne {
            conn: 0,
            after: 100,
        });
        // The source notices when a write on the cut connection fails: a RoundEnd in pre-copy,
        // or, when the kernel buffered those, the stop-and-copy exchange.
        assert_rolled_back_in(&src, &before, &err, &[Phase::PreCopy, Phase::StopAndCopy]);
        assert!(dst.is_err());
        assert!(!resumed);
    });
}

#[test]
fn replies_never_arriving_time_out_in_commit() {
    within(120, || {
        // Only the preamble reply (16) and HelloReply (4 + 5) reach the source: Ready never does.
        let (src, before, err, dst, resumed, _) = run_with_fault(Fault::SwallowReplies {
            conn: 0,
            after: 16 + 9,
        });
        assert_rolled_back(&src, &before, &err, Phase::Commit);
        let Error::Migration { source, .. } = &err else {
            unreachable!()
        };
        assert!(matches!(**source, Error::Timeout(_)), "{source:?}");
        let e = dst.expect_err("destination must not commit");
        // It ended because the source gave up, not by a timeout of its own, and it was told
        // why: the source's Abort arrives before its connections close.
        assert!(
            matches!(
                &e,
                Error::Migration {
                    phase: Phase::Commit,
                    source,
                } if matches!(&**source, Error::Peer(r) if r.contains("source failed in"))
            ),
            "{e:?}"
        );
        assert!(!resumed, "destination ran without commit");
    });
}

#[test]
fn version_mismatch_refused_at_handshake() {
    within(60, || {
        let src = SoftwareGuest::start(guest_config()).unwrap();
        let before = page_hashes(src.guest_memory()).unwrap();
        let listener = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse().unwrap())).unwrap();
        let ep = listener.endpoint().unwrap();
        let dst = std::thread::spawn(move || listener.accept(Duration::from_secs(10)));
        let err = transport::connect_with_version(&ep, 1, Duration::from_secs(5), 99)
            .expect_err("destination must refuse version 99");
        assert!(err.to_string().contains("handshake"), "{err}");
        let Error::Migration { source, .. } = &err else {
            panic!("{err:?}")
        };
        assert!(matches!(**source, Error::Incompatible(_)), "{source:?}");
        assert!(
            source.to_string().contains("version 1"),
            "says which versions: {source}"
        );
        let derr = dst.join().unwrap().expect_err("destination refuses");
        let Error::Migration {
            phase: Phase::Handshake,
            source: dsrc,
        } = &derr
        else {
            panic!("{derr:?}")
        };
        assert!(dsrc.to_string().contains("99"), "{dsrc}");
        // The source was never touched.
        assert_rolled_back_without_migration(&src, &before);
    });
}

fn assert_rolled_back_without_migration(src: &SoftwareGuest, before: &[u64]) {
    let err = Error::Migration {
        phase: Phase::Handshake,
        source: Box::new(Error::Disconnected),
    };
    assert_rolled_back(src, before, &err, Phase::Handshake);
}

#[test]
fn layout_mismatch_refused_at_handshake() {
    within(60, || {
        let src = SoftwareGuest::start(guest_config()).unwrap();
        let before = page_hashes(src.guest_memory()).unwrap();
        let (s, d) = transport::in_process(1).unwrap();
        let cfg = config();
        let dst = std::thread::spawn({
            let cfg = cfg.clone();
            move || {
                destination::receive(d, &cfg, |_| {
                    // A destination that only has 32 MiB.
                    SoftwareGuest::incoming(SoftwareGuestConfig::new(32 << 20))
                })
                .map(|_| ())
            }
        });
        let err = source::migrate(&src, s, &cfg, None).expect_err("refused");
        assert_rolled_back(&src, &before, &err, Phase::Handshake);
        assert!(
            err.source().unwrap().to_string().contains("layout"),
            "{err:?}"
        );
        assert!(dst.join().unwrap().is_err());
    });
}

use std::error::Error as _;

#[test]
fn destination_times_out_when_commit_never_comes() {
    // A hand-driven source: complete handshake, empty memory streams, valid state, then silence.
    within(60, || {
        let gcfg = SoftwareGuestConfig::new(1 << 20);
        let (mut s, d) = transport::in_process(1).unwrap();
        let cfg = MigrationConfig {
            commit_timeout: Duration::from_millis(500),
            ..config()
        };
        let resumed = Arc::new(AtomicBool::new(false));
        let dst = std::thread::spawn({
            let (cfg, gcfg, resumed) = (cfg.clone(), gcfg.clone(), resumed.clone());
            move || {
                destination::receive(d, &cfg, |_| {
                    Ok(Recorded::new(SoftwareGuest::incoming(gcfg)?, resumed))
                })
                .map(|_| ())
            }
        });
        write_message(
            &mut s.control,
            &ControlMessage::Hello {
                page_size: 4096,
                layout: gcfg.layout.clone(),
                features: 0,
            },
        )
        .unwrap();
        assert_eq!(
            read_message(&mut s.control).unwrap(),
            ControlMessage::HelloReply { refused: None }
        );
        s.memory[0]
            .write_all(&RecordHeader::encode(&Record::EndOfStream {
                total_pages: 0,
            }))
            .unwrap();
        // State of a paused, never-run software guest (step 0, checksum 0).
        let paused = SoftwareGuest::incoming(gcfg).unwrap();
        let state = paused.save_state().unwrap();
        write_message(
            &mut s.control,
            &ControlMessage::State {
                state,
                pages_per_connection: vec![0],
            },
        )
        .unwrap();
        assert_eq!(read_message(&mut s.control).unwrap(), ControlMessage::Ready);
        // ...and no Commit.
        let e = dst.join().unwrap().expect_err("must time out");
        let Error::Migration { phase, source } = &e else {
            panic!("{e:?}")
        };
        assert_eq!(*phase, Phase::Commit);
        assert!(matches!(**source, Error::Timeout(_)), "{source:?}");
        assert!(
            !resumed.load(Ordering::SeqCst),
            "destination ran without commit"
        );
        // It told the source why before hanging up.
        match read_message(&mut s.control) {
            Ok(ControlMessage::Abort { reason }) => assert!(reason.contains("commit"), "{reason}"),
            other => panic!("expected Abort, got {other:?}"),
        }
    });
}

/// A destination whose VMM refuses the state.
struct RefusesState(SoftwareGuest);

impl migrate_core::vm::IncomingVm for RefusesState {
    fn memory(&self) -> &migrate_core::vm::GuestMemory {
        self.0.guest_memory()
    }
    fn restore_state(&self, _: &[u8]) -> migrate_core::Result<()> {
        Err(Error::VmControl("vCPU model not supported here".into()))
    }
    fn resume(&self) -> migrate_core::Result<()> {
        panic!("must never run")
    }
}

#[test]
fn destination_error_reaches_the_source_with_its_reason() {
    within(60, || {
        let gcfg = guest_config();
        let src = SoftwareGuest::start(gcfg.clone()).unwrap();
        let before = page_hashes(src.guest_memory()).unwrap();
        let (s, d) = transport::in_process(2).unwrap();
        let cfg = MigrationConfig {
            max_bandwidth: None,
            ..config()
        };
        let dst = std::thread::spawn({
            let cfg = cfg.clone();
            move || {
                destination::receive(d, &cfg, |_| {
                    Ok(RefusesState(SoftwareGuest::incoming(gcfg)?))
                })
                .map(|_| ())
            }
        });
        let err = source::migrate(&src, s, &cfg, None).expect_err("destination refuses the state");
        assert_rolled_back(&src, &before, &err, Phase::Commit);
        let Error::Migration { source, .. } = &err else {
            unreachable!()
        };
        assert!(
            matches!(&**source, Error::Peer(r) if r.contains("vCPU model not supported")),
            "{source:?}"
        );
        let e = dst.join().unwrap().expect_err("destination fails");
        assert!(
            matches!(
                e,
                Error::Migration {
                    phase: Phase::Receive,
                    ..
                }
            ),
            "{e:?}"
        );
    });
}
