//! A running KVM guest migrated with the engine, in one process: every page matches at
//! switchover, the guest continues on the destination, the source stays stopped; a refused
//! migration leaves the source running and a retry then succeeds.

mod kvm_common;

use kvm_common::{HashAtResume, kvm_or_skip, wait_counter_above};
use migrate_core::dirty::PAGE_SIZE;
use migrate_core::kvm::DirtyTracking;
use migrate_core::pages::page_hashes;
use migrate_core::vmm::{ReferenceVm, VmmConfig};
use migrate_core::{Error, MigrationConfig, Phase, destination, source, transport};
use std::time::Duration;

/// 64 MiB guest, 2 vCPUs each dirtying 2 MiB as fast as it runs.
fn guest(tracking: DirtyTracking) -> VmmConfig {
    VmmConfig {
        mem_size: 64 << 20,
        slot_size: 32 << 20,
        vcpus: 2,
        working_set_pages: 512,
        dirty_delay: 0,
        tracking,
        ..Default::default()
    }
}

fn migration_config() -> MigrationConfig {
    MigrationConfig {
        downtime_target: Duration::from_millis(50),
        timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

fn migrate_running_guest(
    tracking: DirtyTracking,
    endpoint: Option<transport::Endpoint>,
    connections: usize,
) {
    let config = guest(tracking);
    let src = ReferenceVm::new(config.clone()).unwrap();
    src.resume().unwrap();
    wait_counter_above(&src, 0, 5);
    let cfg = migration_config();
    let (src_conn, dst_thread) = match endpoint {
        None => {
            let (s, d) = transport::in_process(connections).unwrap();
            let (cfg, config) = (cfg.clone(), config.clone());
            let t = std::thread::spawn(move || {
                destination::receive(d, &cfg, |layout| {
                    config.check_layout(layout)?;
                    Ok(HashAtResume::new(ReferenceVm::new_incoming(config)?))
                })
            });
            (s, t)
        }
        Some(ep) => {
            let listener = transport::Listener::bind(&ep).unwrap();
            let ep = listener.endpoint().unwrap();
            let (cfg2, config) = (cfg.clone(), config.clone());
            let t = std::thread::spawn(move || {
                let d = listener.accept(Duration::from_secs(30))?;
                destination::receive(d, &cfg2, |layout| {
                    config.check_layout(layout)?;
                    Ok(HashAtResume::new(ReferenceVm::new_incoming(config)?))
                })
            });
            (
                transport::connect(&ep, connections, Duration::from_secs(30)).unwrap(),
                t,
            )
        }
    };
    let report = source::migrate(&src, src_conn, &cfg, None).unwrap();
    let (dst, _) = dst_thread.join().unwrap().unwrap();
    eprintln!(
        "{tracking:?}, {connections} connection(s): {} rounds, switchover {:?}, downtime {:.1} ms, total {:.0} ms",
        report.rounds.len(),
        report.switchover,
        report.downtime_ms,
        report.total_ms
    );
    assert!(
        report.rounds.len() >= 2,
        "a dirtying guest needs more than one round: {report:?}"
    );

    // The source stopped at switchover and stays stopped; its memory is the switchover image.
    assert!(src.is_paused());
    let at_pause = [src.status(0).unwrap(), src.status(1).unwrap()];
    let src_hashes = page_hashes(src.memory()).expect("hash guest memory");
    let dst_hashes = dst.take().hashes;
    let differing: Vec<u64> = (0..src_hashes.len())
        .filter(|&i| src_hashes[i] != dst_hashes[i])
        .map(|i| i as u64 * PAGE_SIZE)
        .take(10)
        .collect();
    assert!(
        differing.is_empty(),
        "pages differ at switchover: {differing:x?}"
    );

    // The guest goes on counting on the destination from its value at pause, and finds
    // every page as it left it.
    for (i, b) in at_pause.iter().enumerate() {
        wait_counter_above(&dst.vm, i as u32, b.counter + 3);
    }
    dst.vm.pause().unwrap();
    for i in 0..2 {
        let b = dst.vm.check_working_set(i).unwrap();
        assert_eq!(b.errors, 0, "vCPU {i} found stale pages on the destination");
        assert!(b.checksum_consistent(), "{b:?}");
    }
    assert_eq!(
        [src.status(0).unwrap(), src.status(1).unwrap()],
        at_pause,
        "the source ran after the migration"
    );
}

#[test]
fn kvm_guest_migrates_in_process_with_dirty_log() {
    if !kvm_or_skip("kvm_guest_migrates_in_process_with_dirty_log") {
        return;
    }
    migrate_running_guest(DirtyTracking::DirtyLog, None, 2);
}

#[test]
fn kvm_guest_migrates_over_tcp_with_dirty_ring() {
    if !kvm_or_skip("kvm_guest_migrates_over_tcp_with_dirty_ring") {
        return;
    }
    let ep = transport::Endpoint::Tcp("127.0.0.1:0".parse().unwrap());
    migrate_running_guest(DirtyTracking::DirtyRing, Some(ep), 1);
}

#[test]
fn refused_migration_leaves_the_kvm_guest_running_and_a_retry_succeeds() {
    if !kvm_or_skip("refused_migration_leaves_the_kvm_guest_running_and_a_retry_succeeds") {
        return;
    }
    let config = guest(DirtyTracking::DirtyLog);
    let src = ReferenceVm::new(config.clone()).unwrap();
    src.resume().unwrap();
    wait_counter_above(&src, 0, 2);
    let cfg = migration_config();

    let (s, d) = transport::in_process(1).unwrap();
    let cfg2 = cfg.clone();
    let dst = std::thread::spawn(move || {
        // The destination is set up for a guest of another size: it refuses the layout.
        let wrong = VmmConfig {
            mem_size: 32 << 20,
            ..guest(DirtyTracking::DirtyLog)
        };
        destination::receive(d, &cfg2, move |layout| {
            wrong.check_layout(layout)?;
            ReferenceVm::new_incoming(wrong)
        })
    });
    let err = source::migrate(&src, s, &cfg, None).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Migration {
                phase: Phase::Handshake,
                ..
            }
        ),
        "{err:?}"
    );
    match dst.join().unwrap() {
        Err(Error::Migration {
            phase: Phase::Handshake,
            source,
        }) => {
            assert!(matches!(*source, Error::Incompatible(_)), "{source}")
        }
        other => panic!(
            "destination should refuse the layout: {:?}",
            other.map(|_| ())
        ),
    }
    assert!(!src.is_paused());
    let c = src.status(0).unwrap().counter;
    wait_counter_above(&src, 0, c + 2);

    // The dirty tracker was released: a second attempt works.
    let (s, d) = transport::in_process(1).unwrap();
    let cfg2 = cfg.clone();
    let dst = std::thread::spawn(move || {
        destination::receive(d, &cfg2, |layout| {
            config.check_layout(layout)?;
            ReferenceVm::new_incoming(config)
        })
    });
    source::migrate(&src, s, &cfg, None).unwrap();
    let (dvm, _) = dst.join().unwrap().unwrap();
    let c = src.status(0).unwrap().counter;
    wait_counter_above(&dvm, 0, c + 1);
    dvm.pause().unwrap();
    assert_eq!(dvm.check_working_set(0).unwrap().errors, 0);
}
