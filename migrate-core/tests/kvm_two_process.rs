//! A KVM guest dirtying memory migrates over loopback TCP from this process to a second one:
//! the destination's memory equals the source's at switchover (a hash of every page), the
//! guest keeps counting on the destination from its value at pause, the source stays stopped.
//!
//! The destination is this test binary again, running the ignored test
//! `child_destination_process` with `NINJA_KVM_CHILD` naming a scratch directory.

mod kvm_common;

use kvm_common::{HashAtResume, kvm_or_skip, wait_counter_above, wait_for};
use migrate_core::dirty::PAGE_SIZE;
use migrate_core::kvm::DirtyTracking;
use migrate_core::pages::page_hashes;
use migrate_core::vmm::{ReferenceVm, VmmConfig};
use migrate_core::{MigrationConfig, destination, source, transport};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

const CHILD_ENV: &str = "NINJA_KVM_CHILD";

fn config() -> VmmConfig {
    VmmConfig {
        mem_size: 64 << 20,
        slot_size: 16 << 20,
        vcpus: 2,
        working_set_pages: 1024,
        dirty_delay: 0,
        tracking: DirtyTracking::DirtyLog,
        ..Default::default()
    }
}

fn migration_config() -> MigrationConfig {
    MigrationConfig {
        downtime_target: Duration::from_millis(50),
        timeout: Duration::from_secs(30),
        ..Default::default()
    }
}

fn write_u64s(path: &Path, v: &[u64]) {
    let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(tmp, path).unwrap(); // appears complete or not at all
}

fn read_u64s(path: &Path) -> Vec<u64> {
    std::fs::read(path)
        .unwrap()
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect()
}

/// Kills and reaps the child and removes the scratch directory, whatever happens.
struct ChildGuard {
    child: Child,
    dir: PathBuf,
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
#[ignore = "destination half of kvm_guest_migrates_between_two_processes (run by it)"]
fn child_destination_process() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: child_destination_process: runs only as the child of \
             kvm_guest_migrates_between_two_processes"
        );
        return;
    };
    let dir = PathBuf::from(dir);
    let listener =
        transport::Listener::bind(&transport::Endpoint::Tcp("127.0.0.1:0".parse().unwrap()))
            .unwrap();
    let transport::Endpoint::Tcp(addr) = listener.endpoint().unwrap() else {
        unreachable!()
    };
    std::fs::write(dir.join("port.tmp"), addr.port().to_string()).unwrap();
    std::fs::rename(dir.join("port.tmp"), dir.join("port")).unwrap();
    let conn = listener.accept(Duration::from_secs(60)).unwrap();
    let (dst, _) = destination::receive(conn, &migration_config(), |layout| {
        config().check_layout(layout)?;
        Ok(HashAtResume::new(ReferenceVm::new_incoming(config())?))
    })
    .unwrap();
    let kvm_common::AtResume {
        hashes,
        counters: at_arrival,
    } = dst.take();
    write_u64s(&dir.join("hashes"), &hashes);
    // Wait until the guest has counted past where it arrived, then stop it and report.
    let mut result = Vec::new();
    for (i, c) in at_arrival.iter().enumerate() {
        wait_counter_above(&dst.vm, i as u32, c + 3);
    }
    dst.vm.pause().unwrap();
    for (i, c) in at_arrival.iter().enumerate() {
        let b = dst.vm.check_working_set(i as u32).unwrap();
        assert!(b.checksum_consistent(), "{b:?}");
        result.extend([*c, b.counter, b.errors]);
    }
    write_u64s(&dir.join("result"), &result);
}

#[test]
fn kvm_guest_migrates_between_two_processes() {
    if !kvm_or_skip("kvm_guest_migrates_between_two_processes") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ninja-kvm-2proc-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_destination_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, &dir)
        // The child's harness summary would be counted as this binary's own results; its
        // diagnostics go to stderr, which stays attached.
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut guard = ChildGuard {
        child,
        dir: dir.clone(),
    };

    let src = ReferenceVm::new(config()).unwrap();
    src.resume().unwrap();
    wait_counter_above(&src, 0, 5);
    wait_for("the destination's port", || {
        dir.join("port").exists() || matches!(guard.child.try_wait(), Ok(Some(_)))
    });
    assert!(
        dir.join("port").exists(),
        "destination process exited early"
    );
    let port: u16 = std::fs::read_to_string(dir.join("port"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let ep = transport::Endpoint::Tcp(([127, 0, 0, 1], port).into());
    let conn = transport::connect(&ep, 1, Duration::from_secs(30)).unwrap();
    let report = source::migrate(&src, conn, &migration_config(), None).unwrap();
    eprintln!(
        "two processes: {} rounds, {:?}, downtime {:.1} ms (includes hashing on the destination)",
        report.rounds.len(),
        report.switchover,
        report.downtime_ms
    );
    assert!(report.rounds.len() >= 2, "{report:?}");
    assert!(src.is_paused());
    let at_pause = [src.status(0).unwrap(), src.status(1).unwrap()];

    wait_for("the destination's page hashes", || {
        dir.join("hashes").exists()
    });
    let src_hashes = page_hashes(src.memory()).expect("hash guest memory");
    let dst_hashes = read_u64s(&dir.join("hashes"));
    assert_eq!(src_hashes.len(), dst_hashes.len());
    let differing: Vec<u64> = (0..src_hashes.len())
        .filter(|&i| src_hashes[i] != dst_hashes[i])
        .map(|i| i as u64 * PAGE_SIZE)
        .take(10)
        .collect();
    assert!(
        differing.is_empty(),
        "pages differ at switchover: {differing:x?}"
    );

    wait_for("the destination's result", || {
        dir.join("result").exists() || matches!(guard.child.try_wait(), Ok(Some(_)))
    });
    let status = guard.child.wait().unwrap();
    assert!(status.success(), "destination process failed: {status}");
    let result = read_u64s(&dir.join("result"));
    for (i, b) in at_pause.iter().enumerate() {
        let (arrived, now, errors) = (result[3 * i], result[3 * i + 1], result[3 * i + 2]);
        assert_eq!(
            arrived, b.counter,
            "vCPU {i} arrived with another counter than it had at pause"
        );
        assert!(
            now > b.counter + 2,
            "vCPU {i} did not continue on the destination"
        );
        assert_eq!(errors, 0, "vCPU {i} found stale pages on the destination");
    }
    // The source no longer runs.
    assert_eq!([src.status(0).unwrap(), src.status(1).unwrap()], at_pause);
    assert!(src.is_paused());
}
