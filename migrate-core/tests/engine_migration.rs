//! End-to-end migrations of the software guest: in-process, TCP (1 and 2 memory connections),
//! unix socket. Each checks the destination's memory at resume equals the source's memory at
//! switchover page by page, that the guest continues on the destination from its paused step,
//! and that the source no longer runs.

mod engine_common;

use engine_common::{Recorded, within};
use migrate_core::pages::page_hashes;
use migrate_core::protocol::{MemoryLayout, RegionDesc};
use migrate_core::software_guest::{SoftwareGuest, SoftwareGuestConfig};
use migrate_core::transport::{self, Connections, Endpoint, Listener};
use migrate_core::{MigrationConfig, Progress, destination, source};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// 48 MiB in two regions with a hole, like RAM below and above a PCI window.
fn guest_config(fill: bool, rate_mib_s: f64) -> SoftwareGuestConfig {
    SoftwareGuestConfig {
        layout: MemoryLayout {
            regions: vec![
                RegionDesc {
                    gpa: 0,
                    len: 32 << 20,
                },
                RegionDesc {
                    gpa: 1 << 32,
                    len: 16 << 20,
                },
            ],
        },
        working_set_pages: 2048,
        dirty_rate_mib_s: Some(rate_mib_s),
        fill,
    }
}

fn config() -> MigrationConfig {
    MigrationConfig {
        downtime_target: Duration::from_millis(50),
        timeout: Duration::from_secs(20),
        io_timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

enum How {
    InProcess(usize),
    Network(Endpoint, usize),
}

fn migrate_and_verify(how: How, fill: bool) {
    migrate_and_verify_with(how, fill, config());
}

fn migrate_and_verify_with(how: How, fill: bool, cfg: MigrationConfig) {
    within(120, move || {
        let gcfg = guest_config(fill, 100.0);
        let src = SoftwareGuest::start(gcfg.clone()).unwrap();
        // Let the guest write for a while so memory holds history.
        std::thread::sleep(Duration::from_millis(100));
        let resumed = Arc::new(AtomicBool::new(false));
        let (src_conn, dst_thread) = match how {
            How::InProcess(n) => {
                let (s, d) = transport::in_process(n).unwrap();
                (
                    s,
                    spawn_destination(Ok(d), cfg.clone(), gcfg.clone(), resumed.clone()),
                )
            }
            How::Network(ep, n) => {
                let l = Listener::bind(&ep).unwrap();
                let ep = l.endpoint().unwrap();
                let accepted = std::thread::spawn(move || l.accept(Duration::from_secs(20)));
                let s = transport::connect(&ep, n, Duration::from_secs(10)).unwrap();
                let d = accepted.join().unwrap();
                (
                    s,
                    spawn_destination(d, cfg.clone(), gcfg.clone(), resumed.clone()),
                )
            }
        };
        let n = src_conn.memory.len();
        let (ptx, prx) = crossbeam_channel::unbounded();
        let on_progress = |p: &Progress| ptx.send(p.clone()).unwrap();
        let report = source::migrate(&src, src_conn, &cfg, Some(&on_progress)).expect("migration");
        // The source is paused for good: this is its memory at switchover.
        assert!(!src.is_running(), "source still runs after commit");
        let src_hashes = page_hashes(src.guest_memory()).unwrap();
        let src_counter = src.counter();
        src.check_consistency().expect("source memory consistent");

        let (dst, recv_report) = dst_thread.join().unwrap().expect("receive");
        assert!(resumed.load(Ordering::SeqCst));
        let dst_hashes = dst.hashes_at_resume.lock().unwrap().take().unwrap();
        assert_same_pages(&src_hashes, &dst_hashes);
        assert_eq!(dst.counter_at_resume.load(Ordering::SeqCst), src_counter);

        // The guest keeps going on the destination from where it stopped...
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while dst.guest.counter() <= src_counter {
            assert!(
                std::time::Instant::now() < deadline,
                "destination guest does not advance"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        migrate_core::vm::MigratableVm::pause(&dst.guest).unwrap();
        dst.guest
            .check_consistency()
            .expect("destination memory consistent");
        // ...and the source does not.
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(src.counter(), src_counter, "source advanced after commit");

        // Reports agree with each other and with what moved.
        assert_eq!(report.connections, n);
        assert!(
            report.rounds.len() >= 2,
            "a pre-copy round and the final round"
        );
        let sent: u64 = report
            .rounds
            .iter()
            .map(|r| r.pages_sent + r.zero_pages)
            .sum();
        assert_eq!(sent, recv_report.data_pages + recv_report.zero_pages);
        assert_eq!(report.bytes_sent, recv_report.bytes);
        if fill {
            // Round 0 of a filled guest sends every page.
            assert_eq!(report.rounds[0].pages_sent, (48u64 << 20) / 4096);
        } else {
            // Round 0 skips zero pages: far fewer than all.
            assert!(report.rounds[0].pages_sent < (48u64 << 20) / 4096 / 4);
        }
        let events: Vec<Progress> = prx.try_iter().collect();
        assert!(
            matches!(events.first(), Some(Progress::Started { .. })),
            "{events:?}"
        );
        assert!(
            matches!(events.last(), Some(Progress::Completed { .. })),
            "{events:?}"
        );
        serde_json::to_string(&report).expect("report serializes");
    });
}

fn spawn_destination(
    conn: migrate_core::Result<Connections>,
    cfg: MigrationConfig,
    gcfg: SoftwareGuestConfig,
    resumed: Arc<AtomicBool>,
) -> std::thread::JoinHandle<migrate_core::Result<(Recorded, migrate_core::ReceiveReport)>> {
    std::thread::spawn(move || {
        destination::receive(conn?, &cfg, |layout| {
            assert_eq!(layout, &gcfg.layout);
            Ok(Recorded::new(SoftwareGuest::incoming(gcfg)?, resumed))
        })
    })
}

/// Every page of the destination at resume equals the source's at switchover (by hash).
fn assert_same_pages(src_hashes: &[u64], dst_hashes: &[u64]) {
    assert_eq!(src_hashes.len(), dst_hashes.len());
    let differing: Vec<usize> = (0..src_hashes.len())
        .filter(|&i| src_hashes[i] != dst_hashes[i])
        .collect();
    assert!(
        differing.is_empty(),
        "{} pages differ, first {:?}",
        differing.len(),
        &differing[..differing.len().min(8)]
    );
}

#[test]
fn in_process_one_connection_byte_exact() {
    migrate_and_verify(How::InProcess(1), false);
}

#[test]
fn in_process_filled_guest_two_connections_byte_exact() {
    migrate_and_verify(How::InProcess(2), true);
}

#[test]
fn tcp_one_connection_byte_exact() {
    migrate_and_verify(
        How::Network(Endpoint::Tcp("127.0.0.1:0".parse().unwrap()), 1),
        true,
    );
}

#[test]
fn tcp_two_connections_byte_exact() {
    migrate_and_verify(
        How::Network(Endpoint::Tcp("127.0.0.1:0".parse().unwrap()), 2),
        false,
    );
}

/// Without the destination's populate thread (on in every other test here: the default), each
/// of two receivers of a filled, dirtying guest faults its batches in: every page arrives
/// intact.
#[test]
fn faulting_in_per_batch_two_connections_byte_exact() {
    migrate_and_verify_with(
        How::Network(Endpoint::Tcp("127.0.0.1:0".parse().unwrap()), 2),
        true,
        MigrationConfig {
            populate_ahead: false,
            ..config()
        },
    );
}

#[test]
fn unix_socket_byte_exact() {
    let path = std::env::temp_dir().join(format!("ninja-engine-{}.sock", std::process::id()));
    migrate_and_verify(How::Network(Endpoint::Unix(path), 2), true);
}

/// A guest that cannot converge, by construction rather than by timing: 16 MiB of filled
/// memory behind an 8 MiB/s cap make round 0 last ~2 s, so the guest (dirtying 8 MiB without
/// pause) has certainly run before the first decision, however loaded the machine; every later
/// round then holds far more than fits a 1 ms target at 8 MiB/s. (A quick round 0 on a starved
/// guest thread can rightly find nothing dirty and converge.)
fn unconvergeable_guest() -> SoftwareGuestConfig {
    SoftwareGuestConfig {
        layout: MemoryLayout {
            regions: vec![RegionDesc {
                gpa: 0,
                len: 16 << 20,
            }],
        },
        working_set_pages: 2048,
        dirty_rate_mib_s: None,
        fill: true,
    }
}

/// See [`unconvergeable_guest`].
fn unconvergeable(strategy: migrate_core::TimeoutStrategy) -> (SoftwareGuest, MigrationConfig) {
    let src = SoftwareGuest::start(unconvergeable_guest()).unwrap();
    let cfg = MigrationConfig {
        downtime_target: Duration::from_millis(1),
        timeout: Duration::from_secs(3),
        on_timeout: strategy,
        max_bandwidth: Some(8 << 20),
        ..config()
    };
    (src, cfg)
}

#[test]
fn timeout_strategy_force_switches_over_exactly() {
    within(120, || {
        let (src, cfg) = unconvergeable(migrate_core::TimeoutStrategy::Force);
        let gcfg = unconvergeable_guest();
        let (s, d) = transport::in_process(1).unwrap();
        let dst = spawn_destination(Ok(d), cfg.clone(), gcfg, Arc::new(AtomicBool::new(false)));
        let report = source::migrate(&src, s, &cfg, None).expect("forced migration");
        assert_eq!(
            report.switchover,
            migrate_core::stats::SwitchoverReason::Forced,
            "{report:?}"
        );
        let src_hashes = page_hashes(src.guest_memory()).unwrap();
        let (dst, _) = dst.join().unwrap().unwrap();
        assert_eq!(
            src_hashes,
            dst.hashes_at_resume.lock().unwrap().take().unwrap()
        );
    });
}

#[test]
fn timeout_strategy_abort_keeps_source_running() {
    within(120, || {
        let (src, cfg) = unconvergeable(migrate_core::TimeoutStrategy::Abort);
        let gcfg = unconvergeable_guest();
        let (s, d) = transport::in_process(1).unwrap();
        let resumed = Arc::new(AtomicBool::new(false));
        let dst = spawn_destination(Ok(d), cfg.clone(), gcfg, resumed.clone());
        let err = source::migrate(&src, s, &cfg, None).expect_err("must not converge");
        match &err {
            migrate_core::Error::Migration { phase, source } => {
                assert_eq!(*phase, migrate_core::Phase::PreCopy);
                assert!(
                    matches!(**source, migrate_core::Error::NotConverged(_)),
                    "{source}"
                );
            }
            e => panic!("unexpected error {e}"),
        }
        assert!(src.is_running());
        let c = src.counter();
        while src.counter() <= c {
            std::thread::sleep(Duration::from_millis(5));
        }
        let e = dst.join().unwrap().err().expect("destination must fail");
        assert!(matches!(e, migrate_core::Error::Migration { .. }), "{e}");
        assert!(!resumed.load(Ordering::SeqCst), "destination guest ran");
    });
}

#[test]
fn bandwidth_cap_is_respected() {
    // An upper bound only: a slow machine can only make the measured rate lower.
    within(120, || {
        let gcfg = guest_config(true, 1.0);
        let src = SoftwareGuest::start(gcfg.clone()).unwrap();
        let cap = 32u64 << 20;
        let cfg = MigrationConfig {
            max_bandwidth: Some(cap),
            ..config()
        };
        let (s, d) = transport::in_process(2).unwrap();
        let dst = spawn_destination(Ok(d), cfg.clone(), gcfg, Arc::new(AtomicBool::new(false)));
        let report = source::migrate(&src, s, &cfg, None).expect("migration");
        dst.join().unwrap().unwrap();
        let r0 = &report.rounds[0];
        assert!(r0.bytes >= 48 << 20, "{r0:?}");
        // One batch per connection (4 MiB) may go out before the limiter first sleeps.
        let allowed = (cap as f64) * (r0.duration_ms / 1e3) + 2.0 * 4.0 * (1 << 20) as f64;
        assert!(
            (r0.bytes as f64) <= allowed,
            "{} bytes in {} ms exceeds the cap",
            r0.bytes,
            r0.duration_ms
        );
    });
}

/// The VMM's own writes (through vm-memory) just before the pause, zeroing some pages that
/// round 0 sent: the union tracker must catch them and the final round must carry zero markers.
struct VmmWritesAtPause(SoftwareGuest);

impl migrate_core::vm::MigratableVm for VmmWritesAtPause {
    fn memory(&self) -> &migrate_core::vm::GuestMemory {
        self.0.guest_memory()
    }
    fn dirty_tracker(&self) -> migrate_core::Result<Box<dyn migrate_core::dirty::DirtyTracker>> {
        use migrate_core::dirty::{BitmapTracker, UnionTracker};
        let guest = migrate_core::vm::MigratableVm::dirty_tracker(&self.0)?;
        Ok(Box::new(UnionTracker::new(vec![
            guest,
            Box::new(BitmapTracker::new(self.0.guest_memory())),
        ])))
    }
    fn pause(&self) -> migrate_core::Result<()> {
        use vm_memory::{Bytes, GuestAddress};
        let mem = self.0.guest_memory();
        for i in 0..100u64 {
            mem.write_slice(&[0u8; 4096], GuestAddress((1 << 32) + i * 8192))
                .unwrap();
            mem.write_slice(&[0x77u8; 4096], GuestAddress((1 << 32) + i * 8192 + 4096))
                .unwrap();
        }
        migrate_core::vm::MigratableVm::pause(&self.0)
    }
    fn resume(&self) -> migrate_core::Result<()> {
        migrate_core::vm::MigratableVm::resume(&self.0)
    }
    fn save_state(&self) -> migrate_core::Result<Vec<u8>> {
        self.0.save_state()
    }
    fn set_throttle(&self, p: u8) -> migrate_core::Result<()> {
        self.0.set_throttle(p)
    }
}

#[test]
fn pages_zeroed_after_round_zero_arrive_as_zero_markers() {
    within(120, || {
        let gcfg = guest_config(true, 10.0);
        let src = VmmWritesAtPause(SoftwareGuest::start(gcfg.clone()).unwrap());
        let cfg = config();
        let (s, d) = transport::in_process(2).unwrap();
        let dst = spawn_destination(Ok(d), cfg.clone(), gcfg, Arc::new(AtomicBool::new(false)));
        let report = source::migrate(&src, s, &cfg, None).expect("migration");
        let src_hashes = page_hashes(src.0.guest_memory()).unwrap();
        let (dst, _) = dst.join().unwrap().unwrap();
        assert_eq!(
            src_hashes,
            dst.hashes_at_resume.lock().unwrap().take().unwrap()
        );
        let last = report.rounds.last().unwrap();
        assert!(last.zero_pages >= 100, "final round: {last:?}");
        assert!(last.pages_sent >= 100, "final round: {last:?}");
    });
}

/// A source guest whose VMM rewrites, just before the pause, the pages on both sides of every
/// boundary between adjacent regions: the final round's dirty runs touch across each boundary.
struct WritesAcrossBoundaries {
    guest: SoftwareGuest,
    /// Guest-physical addresses where one region ends and the next begins.
    boundaries: Vec<u64>,
}

impl migrate_core::vm::MigratableVm for WritesAcrossBoundaries {
    fn memory(&self) -> &migrate_core::vm::GuestMemory {
        self.guest.guest_memory()
    }
    fn dirty_tracker(&self) -> migrate_core::Result<Box<dyn migrate_core::dirty::DirtyTracker>> {
        use migrate_core::dirty::{BitmapTracker, UnionTracker};
        let guest = migrate_core::vm::MigratableVm::dirty_tracker(&self.guest)?;
        Ok(Box::new(UnionTracker::new(vec![
            guest,
            Box::new(BitmapTracker::new(self.guest.guest_memory())),
        ])))
    }
    fn pause(&self) -> migrate_core::Result<()> {
        use vm_memory::{Bytes, GuestAddress};
        let mem = self.guest.guest_memory();
        for &b in &self.boundaries {
            for gpa in (b - 3 * 4096..b + 3 * 4096).step_by(4096) {
                let page: Vec<u8> = (0..4096u64)
                    .map(|i| ((gpa + i) % 251) as u8 | 0x80)
                    .collect();
                mem.write_slice(&page, GuestAddress(gpa)).unwrap();
            }
        }
        migrate_core::vm::MigratableVm::pause(&self.guest)
    }
    fn resume(&self) -> migrate_core::Result<()> {
        migrate_core::vm::MigratableVm::resume(&self.guest)
    }
    fn save_state(&self) -> migrate_core::Result<Vec<u8>> {
        self.guest.save_state()
    }
    fn set_throttle(&self, p: u8) -> migrate_core::Result<()> {
        self.guest.set_throttle(p)
    }
}

/// Issue 16: guest memory in several regions adjacent in guest-physical address space (like
/// KVM memory slots), every page non-zero, pages dirty on both sides of each boundary. The
/// destination must receive every page exactly.
fn adjacent_regions_byte_exact(region_lens: &[u64], connections: usize) {
    let mut regions = Vec::new();
    let mut gpa = 0;
    for &len in region_lens {
        regions.push(RegionDesc { gpa, len });
        gpa += len;
    }
    let boundaries: Vec<u64> = regions[1..].iter().map(|r| r.gpa).collect();
    let total_pages = gpa / 4096;
    let gcfg = SoftwareGuestConfig {
        layout: MemoryLayout { regions },
        working_set_pages: 8,
        dirty_rate_mib_s: Some(1.0),
        fill: true,
    };
    within(60, move || {
        let src = WritesAcrossBoundaries {
            guest: SoftwareGuest::start(gcfg.clone()).unwrap(),
            boundaries,
        };
        let cfg = config();
        let (s, d) = transport::in_process(connections).unwrap();
        let dst = spawn_destination(Ok(d), cfg.clone(), gcfg, Arc::new(AtomicBool::new(false)));
        let report = source::migrate(&src, s, &cfg, None).expect("migration");
        let src_hashes = page_hashes(src.guest.guest_memory()).unwrap();
        let (dst, _) = dst.join().unwrap().expect("receive");
        let dst_hashes = dst.hashes_at_resume.lock().unwrap().take().unwrap();
        let zero_hash = {
            let m = MemoryLayout {
                regions: vec![RegionDesc { gpa: 0, len: 4096 }],
            }
            .create_memory()
            .unwrap();
            page_hashes(&m).unwrap()[0]
        };
        assert_eq!(src_hashes.len() as u64, total_pages);
        assert!(
            src_hashes.iter().all(|&h| h != zero_hash),
            "every source page holds data"
        );
        assert_same_pages(&src_hashes, &dst_hashes);
        assert_eq!(report.rounds[0].pages_sent, total_pages);
        let last = report.rounds.last().unwrap();
        assert!(last.pages_sent >= 6, "final round: {last:?}");
    });
}

#[test]
fn adjacent_regions_one_connection_byte_exact() {
    // Boundaries on stripe edges, like 1 GiB KVM slots: one connection carries both sides.
    adjacent_regions_byte_exact(&[2 << 20, 2 << 20, 1 << 20], 1);
}

#[test]
fn adjacent_regions_inside_a_stripe_two_connections_byte_exact() {
    // A boundary in the middle of a stripe: both sides go to the same connection even with two.
    adjacent_regions_byte_exact(&[(2 << 20) + 8 * 4096, (2 << 20) - 8 * 4096], 2);
}
