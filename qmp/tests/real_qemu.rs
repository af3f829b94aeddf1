//! The client against real QEMU processes (TCG guests booting the test fixtures).
//!
//! Each test skips (printing `SKIPPED: ...`) when QEMU or the fixtures are missing, unless
//! `NINJA_REQUIRE` includes `qemu`. Every QEMU is killed by its `Qemu` guard's Drop.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use ninja_testkit::{Qemu, QemuConfig, free_tcp_port, qemu_or_skip};
use qmp::types::QmpCapability;
use qmp::{
    ConnectOptions, DeviceSpec, Endpoint, Error, ErrorClass, EventFilter, EventKind,
    MigrationCapability, MigrationParameters, MigrationStatus, MigrationWait, NetdevSpec,
    ObjectSpec, Qmp, RunState, wait_for_migration,
};
use serde_json::json;

const BOOT: Duration = Duration::from_secs(90);
const EVENT: Duration = Duration::from_secs(60);
const MIGRATION: Duration = Duration::from_secs(180);

fn connect(vm: &Qemu) -> Qmp {
    let options = ConnectOptions {
        greeting_timeout: Duration::from_secs(30),
        command_timeout: Duration::from_secs(60),
        ..ConnectOptions::default()
    };
    Qmp::connect(&Endpoint::Unix(vm.qmp_path().to_owned()), options).expect("connect to QEMU's QMP")
}

/// Starts a guest running the page dirtier and waits for its first verified-pass report, so
/// the kernel (and its ACPI hotplug driver) is up.
fn booted_guest(config: QemuConfig) -> Qemu {
    let mut vm = Qemu::start(config.guest_run("/bin/ninja-guest-dirtier 8")).expect("start QEMU");
    vm.wait_serial_until(|log| verified_passes(log) >= 1, BOOT)
        .expect("guest boots and runs the dirtier");
    vm
}

/// Count of verified passes on a guest's console; panics on a reported mismatch.
fn verified_passes(serial: &str) -> usize {
    assert!(
        !serial.contains("MISMATCH"),
        "guest memory corrupted: {serial}"
    );
    serial
        .lines()
        .filter(|l| l.contains("ninja-guest-dirtier: pass=") && l.ends_with(" ok"))
        .count()
}

/// A file under /dev/shm removed on drop (backing of the passthrough stand-in).
struct ShmFile(PathBuf);

impl ShmFile {
    fn new(tag: &str) -> Self {
        Self(PathBuf::from(format!(
            "/dev/shm/ninja-qmp-{tag}-{}",
            std::process::id()
        )))
    }
}

impl Drop for ShmFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Hot-adds the stand-in for a passthrough HCA (not a real HCA: an `ivshmem-plain` device on a
/// shared `memory-backend-file`, which blocks migration the way a VFIO device without
/// migration support does). Real deployments add `vfio-pci,host=BDF` here.
fn attach_hca_stand_in(qmp: &Qmp, shm: &ShmFile) {
    qmp.object_add(
        &ObjectSpec::new("memory-backend-file", "hca0-mem")
            .property("size", 1u64 << 20)
            .property("mem-path", shm.0.to_str().unwrap())
            .property("share", true),
    )
    .expect("object-add memory-backend-file");
    qmp.device_add(&DeviceSpec::new("ivshmem-plain", "hca0").property("memdev", "hca0-mem"))
        .expect("device_add ivshmem-plain");
}

fn has_device(qmp: &Qmp, id: &str) -> bool {
    qmp.query_pci()
        .unwrap()
        .iter()
        .flat_map(|bus| &bus.devices)
        .any(|d| d.qdev_id == id)
}

#[test]
fn greeting_and_version_match_query_version() {
    let Some(fixtures) = qemu_or_skip("greeting_and_version_match_query_version") else {
        return;
    };
    let vm = Qemu::start(QemuConfig::new(&fixtures).memory_mib(128)).unwrap();
    let qmp = connect(&vm);
    let greeting = qmp.greeting().clone();
    assert!(greeting.version.qemu.major >= 9, "{greeting:?}");
    assert!(
        greeting.capabilities.contains(&QmpCapability::Oob),
        "{greeting:?}"
    );
    assert!(qmp.oob_enabled());
    assert_eq!(qmp.query_version().unwrap(), greeting.version);
    // The i440fx host bridge is always on bus 0.
    let pci = qmp.query_pci().unwrap();
    assert!(
        pci[0].devices.iter().any(|d| d.class_info.class == 0x0600),
        "{pci:?}"
    );
    // An unknown command is a typed QMP error, and the raw escape hatch works.
    match qmp.execute("no-such-command", None) {
        Err(Error::Qmp { class, .. }) => assert_eq!(class, ErrorClass::CommandNotFound),
        other => panic!("expected CommandNotFound, got {other:?}"),
    }
    let name = qmp.execute("query-name", None).unwrap();
    assert!(name.is_object(), "{name}");
}

#[test]
fn concurrent_calls_from_many_threads_get_their_own_replies() {
    let Some(fixtures) = qemu_or_skip("concurrent_calls_from_many_threads_get_their_own_replies")
    else {
        return;
    };
    let vm = Qemu::start(QemuConfig::new(&fixtures).memory_mib(128)).unwrap();
    let qmp = connect(&vm);
    std::thread::scope(|s| {
        for t in 0..4 {
            let qmp = &qmp;
            s.spawn(move || {
                for i in 0..50 {
                    // Alternate commands so a reply routed to the wrong caller fails to decode.
                    if (t + i) % 2 == 0 {
                        assert_eq!(qmp.query_status().unwrap().status, RunState::Running);
                    } else {
                        assert_eq!(qmp.query_version().unwrap(), qmp.greeting().version);
                    }
                }
            });
        }
    });
    assert_eq!(qmp.unmatched_replies(), 0);
}

#[test]
fn stop_and_cont_change_state_and_emit_events() {
    let Some(fixtures) = qemu_or_skip("stop_and_cont_change_state_and_emit_events") else {
        return;
    };
    let vm = Qemu::start(QemuConfig::new(&fixtures).memory_mib(128)).unwrap();
    let qmp = connect(&vm);
    let mut events = qmp.subscribe(EventFilter::names(&["STOP", "RESUME"]));
    assert_eq!(qmp.query_status().unwrap().status, RunState::Running);

    qmp.stop().unwrap();
    let stop = events.wait_for_event("STOP", |_| true, EVENT).unwrap();
    assert_eq!(stop.kind(), EventKind::Stop);
    assert!(stop.timestamp.is_some_and(|t| t.seconds > 0));
    let status = qmp.query_status().unwrap();
    assert!(!status.running);
    assert_eq!(status.status, RunState::Paused);

    qmp.cont().unwrap();
    assert_eq!(
        events
            .wait_for_event("RESUME", |_| true, EVENT)
            .unwrap()
            .kind(),
        EventKind::Resume
    );
    let status = qmp.query_status().unwrap();
    assert!(status.running);
    assert_eq!(status.status, RunState::Running);
    // The connection's own queue saw both as well, in order.
    qmp.wait_for_event("STOP", |_| true, EVENT).unwrap();
    qmp.wait_for_event("RESUME", |_| true, EVENT).unwrap();
}

#[test]
fn virtio_net_hotplug_and_unplug_with_device_deleted() {
    let Some(fixtures) = qemu_or_skip("virtio_net_hotplug_and_unplug_with_device_deleted") else {
        return;
    };
    let vm = booted_guest(QemuConfig::new(&fixtures).memory_mib(128));
    let qmp = connect(&vm);
    qmp.netdev_add(&NetdevSpec::new("user", "net0")).unwrap();
    qmp.device_add(&DeviceSpec::new("virtio-net-pci", "n0").property("netdev", "net0"))
        .unwrap();
    assert!(has_device(&qmp, "n0"));
    // A duplicate id is refused with QEMU's error.
    match qmp.device_add(&DeviceSpec::new("virtio-net-pci", "n0")) {
        Err(e @ Error::Qmp { .. }) => {
            // The message names the command, then QEMU's description.
            let message = e.to_string();
            assert!(message.starts_with("device_add: "), "{message}");
            assert!(message.contains("'n0'"), "{message}");
        }
        other => panic!("expected a QMP error, got {other:?}"),
    }

    // The NIC's link goes down and up by its device id (QMP cannot show a NIC's link state:
    // the guest sees it, judged in tests/virtual_cluster.rs); an unknown name is refused.
    qmp.set_link("n0", false).unwrap();
    qmp.set_link("n0", true).unwrap();
    match qmp.set_link("nothing0", true) {
        Err(Error::Qmp { class, .. }) => assert_eq!(class, ErrorClass::DeviceNotFound),
        other => panic!("expected DeviceNotFound, got {other:?}"),
    }

    let deleted = qmp.device_del_and_wait("n0", EVENT).unwrap();
    match deleted.kind() {
        EventKind::DeviceDeleted { device, path } => {
            assert_eq!(device.as_deref(), Some("n0"));
            assert!(path.ends_with("/n0"), "{path}");
        }
        other => panic!("expected DEVICE_DELETED, got {other:?}"),
    }
    assert!(!has_device(&qmp, "n0"));
    match qmp.device_del("n0") {
        Err(Error::Qmp { class, .. }) => assert_eq!(class, ErrorClass::DeviceNotFound),
        other => panic!("expected DeviceNotFound, got {other:?}"),
    }
    qmp.netdev_del("net0").unwrap();
    // Deleting it again names the error.
    assert!(matches!(qmp.netdev_del("net0"), Err(Error::Qmp { .. })));
}

#[test]
fn chardev_and_object_add_remove() {
    let Some(fixtures) = qemu_or_skip("chardev_and_object_add_remove") else {
        return;
    };
    let vm = Qemu::start(QemuConfig::new(&fixtures).memory_mib(128)).unwrap();
    let qmp = connect(&vm);
    let sock = vm.dir().join("extra.sock");
    let backend = json!({"type": "socket", "data": {
        "addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}},
        "server": true, "wait": false}});
    let ret = qmp.chardev_add("extra0", backend).unwrap();
    assert_eq!(ret.pty, None);
    assert!(sock.exists(), "QEMU listens on the new chardev's socket");
    let chardevs = qmp.execute("query-chardev", None).unwrap();
    assert!(
        chardevs
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["label"] == "extra0")
    );
    qmp.chardev_remove("extra0").unwrap();
    assert!(matches!(
        qmp.chardev_remove("extra0"),
        Err(Error::Qmp { .. })
    ));

    qmp.object_add(&ObjectSpec::new("memory-backend-ram", "ram1").property("size", 1u64 << 20))
        .unwrap();
    qmp.object_del("ram1").unwrap();
    assert!(matches!(qmp.object_del("ram1"), Err(Error::Qmp { .. })));
}

#[test]
fn passthrough_stand_in_blocks_migration_until_detached_then_loopback_migration_completes() {
    let test =
        "passthrough_stand_in_blocks_migration_until_detached_then_loopback_migration_completes";
    let Some(fixtures) = qemu_or_skip(test) else {
        return;
    };
    let port = free_tcp_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    let src_vm = booted_guest(QemuConfig::new(&fixtures).memory_mib(128));
    let mut dst_vm =
        Qemu::start(QemuConfig::new(&fixtures).memory_mib(128).incoming(&uri)).unwrap();
    let src = connect(&src_vm);
    let dst = connect(&dst_vm);
    assert_eq!(dst.query_status().unwrap().status, RunState::InMigrate);

    // Attach the stand-in HCA: migration is refused with QEMU's reason, as a typed error.
    let shm = ShmFile::new("hca");
    attach_hca_stand_in(&src, &shm);
    match src.migrate(&uri) {
        Err(Error::Qmp {
            command,
            class,
            desc,
        }) => {
            assert_eq!(command, "migrate");
            assert_eq!(class, ErrorClass::GenericError);
            assert!(desc.contains("ivshmem"), "{desc}");
        }
        other => panic!("migration with the stand-in attached must fail, got {other:?}"),
    }
    let blocked = src.query_migrate().unwrap();
    let reasons = blocked.blocked_reasons.unwrap_or_default();
    assert!(reasons.iter().any(|r| r.contains("ivshmem")), "{reasons:?}");
    assert_eq!(src.query_status().unwrap().status, RunState::Running);

    // Detach: unplug, wait for the guest to release it, drop the backend.
    src.device_del_and_wait("hca0", EVENT).unwrap();
    src.object_del("hca0-mem").unwrap();
    assert!(
        src.query_migrate()
            .unwrap()
            .blocked_reasons
            .unwrap_or_default()
            .is_empty()
    );

    let params = MigrationParameters {
        downtime_limit: Some(300),
        max_bandwidth: Some(1 << 30),
        ..MigrationParameters::default()
    };
    src.migrate_set_parameters(&params).unwrap();
    let now = src.query_migrate_parameters().unwrap();
    assert_eq!(
        (now.downtime_limit, now.max_bandwidth),
        (Some(300), Some(1 << 30))
    );
    src.migrate_set_capabilities(&[(MigrationCapability::Events, true)])
        .unwrap();
    let caps = src.query_migrate_capabilities().unwrap();
    assert!(
        caps.iter()
            .any(|c| c.capability == MigrationCapability::Events && c.state)
    );

    let mut migration_events = src.subscribe(EventFilter::names(&["MIGRATION"]));
    src.migrate(&uri).unwrap();
    let mut polls = 0;
    let done = wait_for_migration(&src, &MigrationWait::completed_within(MIGRATION), |_| {
        polls += 1
    })
    .unwrap();
    assert!(polls >= 1);
    assert_eq!(done.status(), MigrationStatus::Completed);
    let ram = done.ram.clone().expect("ram stats");
    eprintln!(
        "migration: total {:?} ms, downtime {:?} ms, {} MiB sent, {} passes, {} polls",
        done.total_time,
        done.downtime,
        ram.transferred >> 20,
        ram.dirty_sync_count,
        polls
    );
    assert!(ram.total >= 128 << 20, "{ram:?}");
    assert!(ram.transferred > 0 && ram.normal > 0, "{ram:?}");
    assert_eq!(ram.remaining, 0);
    assert!(ram.dirty_sync_count >= 1);
    assert!(
        done.downtime.is_some() && done.total_time.is_some(),
        "{done:?}"
    );
    migration_events
        .wait_for_event("MIGRATION", |e| e.data["status"] == "completed", EVENT)
        .unwrap();
    // QEMU reports `completed` before its migration thread's cleanup moves the source from
    // finish-migrate to postmigrate: wait (bounded) for that step.
    let asked = Instant::now();
    let mut state = src.query_status().unwrap().status;
    while state == RunState::FinishMigrate && asked.elapsed() < EVENT {
        std::thread::sleep(Duration::from_millis(10));
        state = src.query_status().unwrap().status;
    }
    assert_eq!(state, RunState::PostMigrate);

    // The guest goes on at the destination with its memory intact.
    dst_vm
        .wait_serial_until(|log| verified_passes(log) >= 2, BOOT)
        .expect("dirtier keeps verifying passes on the destination");
    assert_eq!(dst.query_status().unwrap().status, RunState::Running);
    // Attach the interconnect the destination has: a paravirtual NIC.
    dst.device_add(&DeviceSpec::new("virtio-net-pci", "pv0"))
        .unwrap();
    assert!(has_device(&dst, "pv0"));
}

#[test]
fn pause_before_switchover_then_migrate_continue_completes() {
    let Some(fixtures) = qemu_or_skip("pause_before_switchover_then_migrate_continue_completes")
    else {
        return;
    };
    let src_vm = booted_guest(QemuConfig::new(&fixtures).memory_mib(128));
    let mut dst_vm =
        Qemu::start(QemuConfig::new(&fixtures).memory_mib(128).incoming("defer")).unwrap();
    let src = connect(&src_vm);
    let dst = connect(&dst_vm);
    let port = free_tcp_port();
    let uri = format!("tcp:127.0.0.1:{port}");
    dst.migrate_incoming(&uri).unwrap();

    src.migrate_set_capabilities(&[
        (MigrationCapability::Events, true),
        (MigrationCapability::PauseBeforeSwitchover, true),
    ])
    .unwrap();
    src.migrate_set_parameters(&MigrationParameters {
        max_bandwidth: Some(1 << 30),
        ..MigrationParameters::default()
    })
    .unwrap();
    let mut events = src.subscribe(EventFilter::names(&["MIGRATION"]));
    src.migrate(&uri).unwrap();
    let paused = wait_for_migration(
        &src,
        &MigrationWait::status_within(MigrationStatus::PreSwitchover, MIGRATION),
        |_| {},
    )
    .unwrap();
    assert_eq!(paused.status(), MigrationStatus::PreSwitchover);
    events
        .wait_for_event("MIGRATION", |e| e.data["status"] == "pre-switchover", EVENT)
        .unwrap();
    // The source waits, stopped, for the go-ahead.
    assert!(!src.query_status().unwrap().running);
    // Continuing from a state we are not in is refused.
    assert!(matches!(
        src.migrate_continue(MigrationStatus::Active),
        Err(Error::Qmp { .. })
    ));

    src.migrate_continue(MigrationStatus::PreSwitchover)
        .unwrap();
    let done =
        wait_for_migration(&src, &MigrationWait::completed_within(MIGRATION), |_| {}).unwrap();
    assert_eq!(done.status(), MigrationStatus::Completed);
    assert!(done.ram.is_some_and(|r| r.transferred > 0));
    dst_vm
        .wait_serial_until(|log| verified_passes(log) >= 2, BOOT)
        .expect("dirtier keeps verifying passes on the destination");
}

#[test]
fn killing_qemu_mid_call_fails_pending_call_with_disconnected() {
    let Some(fixtures) = qemu_or_skip("killing_qemu_mid_call_fails_pending_call_with_disconnected")
    else {
        return;
    };
    let mut vm = Qemu::start(QemuConfig::new(&fixtures).memory_mib(128)).unwrap();
    let qmp = connect(&vm);
    qmp.query_status().unwrap();
    let mut events = qmp.subscribe(EventFilter::All);
    let pid = vm.pid() as libc::pid_t;
    // SAFETY: plain kill(2) on the QEMU child this test started; SIGSTOP freezes it so the
    // next call is certain to be pending (QEMU cannot answer) when it is killed.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    let timeout = Duration::from_secs(120);
    std::thread::scope(|s| {
        let pending = s.spawn(|| qmp.execute_with_timeout("query-status", None, timeout));
        let waiting = s.spawn(move || events.wait_for_event("SHUTDOWN", |_| true, timeout));
        // Give the call time to be written (the outcome is the same if it is not yet).
        std::thread::sleep(Duration::from_millis(300));
        vm.kill();
        let result = pending.join().unwrap();
        assert!(
            matches!(result, Err(Error::Disconnected { .. })),
            "got {result:?}"
        );
        let result = waiting.join().unwrap();
        assert!(
            matches!(result, Err(Error::Disconnected { .. })),
            "got {result:?}"
        );
    });
    assert!(!qmp.is_connected());
    assert!(matches!(
        qmp.query_status(),
        Err(Error::Disconnected { .. })
    ));
}

#[test]
fn frozen_qemu_write_ends_at_the_call_timeout_and_later_calls_say_why() {
    let Some(fixtures) =
        qemu_or_skip("frozen_qemu_write_ends_at_the_call_timeout_and_later_calls_say_why")
    else {
        return;
    };
    let mut vm = Qemu::start(QemuConfig::new(&fixtures).memory_mib(128)).unwrap();
    // The default timeout is 60 s: it must not stretch the call's own 1 s.
    let qmp = connect(&vm);
    qmp.query_status().unwrap();
    let pid = vm.pid() as libc::pid_t;
    // SAFETY: plain kill(2) on the QEMU child this test started; SIGSTOP freezes it, so it
    // reads nothing from its QMP socket. The `Qemu` guard kills it (stopped or not) on drop.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
    // More than the socket buffer holds.
    let line = "x".repeat(256 << 10);
    let command = "human-monitor-command";
    let timed = |timeout: Duration, arguments| {
        let start = Instant::now();
        let result = qmp.execute_with_timeout(command, arguments, timeout);
        (result, start.elapsed())
    };
    let ((result, took), (queued, queued_took)) = std::thread::scope(|s| {
        // Should the write hang, closing the connection ends it (and the test fails below).
        let (done, finished) = std::sync::mpsc::channel::<()>();
        let watched = &qmp;
        s.spawn(move || {
            if finished.recv_timeout(Duration::from_secs(30)).is_err() {
                watched.close();
            }
        });
        let big = s.spawn(|| {
            timed(
                Duration::from_secs(1),
                Some(json!({ "command-line": line })),
            )
        });
        // Give it time to start writing (the outcome is the same if it has not yet).
        std::thread::sleep(Duration::from_millis(300));
        let queued = s.spawn(|| timed(Duration::from_secs(8), Some(json!({ "command-line": "" }))));
        let out = (big.join().unwrap(), queued.join().unwrap());
        let _ = done.send(());
        out
    });
    match result {
        Err(Error::Timeout { what, after }) => {
            assert!(what.contains(command), "{what}");
            assert_eq!(after, Duration::from_secs(1));
        }
        other => panic!("expected a write timeout, got {other:?}"),
    }
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert!(
        queued_took < Duration::from_secs(10),
        "took {queued_took:?}"
    );
    let reason_ok = |reason: &str| reason.contains(command) && reason.contains("timed out");
    match &queued {
        Err(Error::Disconnected { reason }) if reason_ok(reason) => {}
        other => panic!("expected disconnected naming the stuck write, got {other:?}"),
    }
    assert!(!qmp.is_connected());
    match qmp.query_status() {
        Err(Error::Disconnected { reason }) if reason_ok(&reason) => {}
        other => panic!("expected disconnected naming the stuck write, got {other:?}"),
    }
    vm.kill();
}

#[test]
fn quit_emits_shutdown_and_later_calls_fail_fast() {
    let Some(fixtures) = qemu_or_skip("quit_emits_shutdown_and_later_calls_fail_fast") else {
        return;
    };
    let _vm = Qemu::start(QemuConfig::new(&fixtures).memory_mib(128)).unwrap();
    let qmp = connect(&_vm);
    let mut events = qmp.subscribe(EventFilter::names(&["SHUTDOWN"]));
    qmp.quit().unwrap();
    let shutdown = events.wait_for_event("SHUTDOWN", |_| true, EVENT).unwrap();
    assert_eq!(
        shutdown.kind(),
        EventKind::Shutdown {
            guest: false,
            reason: qmp::types::ShutdownCause::HostQmpQuit
        }
    );
    // QEMU closes the socket as it exits.
    let after = events.wait_for_event("SHUTDOWN", |_| true, EVENT);
    assert!(
        matches!(after, Err(Error::Disconnected { .. })),
        "got {after:?}"
    );
    assert!(matches!(
        qmp.query_status(),
        Err(Error::Disconnected { .. })
    ));
}

/// A writable drive is found by `query-block`, copied by a backup job into an image made with
/// `blockdev-create` (byte for byte, as it was when the job started), and a failing job says
/// why in a typed error.
#[test]
fn a_backup_job_copies_a_drive_and_a_failed_job_says_why() {
    let Some(fixtures) = qemu_or_skip("a_backup_job_copies_a_drive_and_a_failed_job_says_why")
    else {
        return;
    };
    let dir = tempdir("backup");
    let disk = dir.join("disk.raw");
    let content: Vec<u8> = (0..4u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    std::fs::write(&disk, &content).unwrap();
    let config = QemuConfig::new(&fixtures)
        .memory_mib(128)
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=virtio,id=d0",
            disk.display()
        ));
    let vm = Qemu::start(config).unwrap();
    let qmp = connect(&vm);
    qmp.stop().unwrap();
    let blocks = qmp.query_block().unwrap();
    let d0 = blocks.iter().find(|b| b.device == "d0").expect("drive d0");
    let medium = d0.inserted.as_ref().unwrap();
    assert!(!medium.ro);
    assert_eq!(
        (medium.drv.as_str(), medium.image.virtual_size),
        ("raw", 4 << 20)
    );
    assert_eq!(medium.file, disk.to_str().unwrap());
    let node = medium.node_name.clone().unwrap();

    let copy = dir.join("copy.raw");
    let create = json!({"driver": "file", "filename": copy.to_str().unwrap(), "size": 4 << 20});
    qmp.blockdev_create("create", create).unwrap();
    qmp.wait_job("create", EVENT).unwrap();
    qmp.blockdev_add(
        json!({"driver": "file", "node-name": "cf", "filename": copy.to_str().unwrap()}),
    )
    .unwrap();
    qmp.blockdev_add(json!({"driver": "raw", "node-name": "c", "file": "cf"}))
        .unwrap();
    qmp.blockdev_backup("bk", &node, "c").unwrap();
    let done = qmp.wait_job("bk", EVENT).unwrap();
    assert_eq!(done.total_progress, 4 << 20);
    assert!(
        qmp.query_jobs().unwrap().is_empty(),
        "the job was dismissed"
    );
    qmp.blockdev_del("c").unwrap();
    qmp.blockdev_del("cf").unwrap();
    assert!(std::fs::read(&copy).unwrap() == content, "the copy differs");

    // A job that fails: a file in a directory that does not exist.
    let nowhere = dir.join("no/such/dir/x.raw");
    let create = json!({"driver": "file", "filename": nowhere.to_str().unwrap(), "size": 0});
    qmp.blockdev_create("bad", create).unwrap();
    match qmp.wait_job("bad", EVENT) {
        Err(Error::Job { id, reason }) => {
            assert_eq!(id, "bad");
            assert!(reason.contains("No such file"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        qmp.wait_job("never", EVENT),
        Err(Error::Job { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempdir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ninja-qmp-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A directory of test credentials, removed on drop.
struct CredsDir(PathBuf);

impl CredsDir {
    fn new(tag: &str, ca: &str) -> CredsDir {
        let d = std::env::temp_dir().join(format!("ninja-qmp-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        ninja_testkit::tls::site_credentials(&d, ca, &["127.0.0.1"]).expect("openssl");
        CredsDir(d)
    }
}

impl Drop for CredsDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tls_options(creds: &migrate_core::tls::Credentials, name: Option<&str>) -> ConnectOptions {
    ConnectOptions {
        greeting_timeout: Duration::from_secs(5),
        tls: Some(qmp::TlsClient {
            config: migrate_core::tls::client_config(creds).unwrap(),
            server_name: name.map(str::to_owned),
        }),
        ..ConnectOptions::default()
    }
}

/// A monitor on QEMU's TLS chardev (`verify-peer=on`): a stranger with another CA's
/// certificate, a client expecting another name and a clear-text client are all refused,
/// and the client the site CA signed then controls the VM.
#[test]
fn a_tls_monitor_takes_only_the_client_its_ca_signed() {
    let Some(fixtures) = qemu_or_skip("a_tls_monitor_takes_only_the_client_its_ca_signed") else {
        return;
    };
    let site = CredsDir::new("site", "Ninja test site CA");
    let foreign = CredsDir::new("foreign", "Another CA");
    let port = free_tcp_port();
    let vm = Qemu::start(QemuConfig::new(&fixtures).args([
        "-object".to_owned(),
        format!(
            "tls-creds-x509,id=montls,dir={},endpoint=server,verify-peer=on",
            site.0.display()
        ),
        "-chardev".to_owned(),
        format!("socket,id=montls0,host=127.0.0.1,port={port},server=on,wait=off,tls-creds=montls"),
        "-mon".to_owned(),
        "chardev=montls0,mode=control".to_owned(),
    ]))
    .expect("start QEMU");
    let ep = Endpoint::Tls(format!("127.0.0.1:{port}"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            Instant::now() < deadline,
            "TLS monitor never listened: {}",
            vm.qemu_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let ours = migrate_core::tls::Credentials::source_in(&site.0);

    // Another CA's client certificate (the stranger trusts our CA: it still gets nothing).
    let stranger = migrate_core::tls::Credentials {
        ca: ours.ca.clone(),
        ..migrate_core::tls::Credentials::source_in(&foreign.0)
    };
    let refused = Qmp::connect(&ep, tls_options(&stranger, None)).err();
    assert!(refused.is_some(), "a foreign certificate got a QMP session");
    // Our client, expecting a name the monitor's certificate does not carry.
    let e = Qmp::connect(&ep, tls_options(&ours, Some("other-host"))).err();
    assert!(
        format!("{e:?}").contains("NotValidForName"),
        "wrong name: {e:?}"
    );
    // Clear text on the TLS port: no greeting.
    let plain = ConnectOptions {
        greeting_timeout: Duration::from_secs(3),
        ..ConnectOptions::default()
    };
    assert!(Qmp::connect(&Endpoint::Tcp(format!("127.0.0.1:{port}")), plain).is_err());
    // A tls: endpoint without TLS settings is an error, not a clear-text connection.
    assert!(Qmp::connect(&ep, ConnectOptions::default()).is_err());

    let qmp = Qmp::connect(&ep, tls_options(&ours, None)).expect("the site's client connects");
    assert!(qmp.greeting().version.qemu.major >= 7);
    let status = qmp.query_status().expect("query-status over TLS");
    assert!(
        matches!(status.status, RunState::Running | RunState::Prelaunch),
        "{status:?}"
    );
    qmp.stop().expect("stop over TLS");
    assert_eq!(qmp.query_status().unwrap().status, RunState::Paused);
}
