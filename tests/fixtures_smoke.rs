//! Proves the guest fixtures are real: a TCG guest that keeps rewriting and checking a pattern is
//! live-migrated between two QEMU processes on loopback while it writes, and goes on counting on
//! the destination with its own pattern check passing.
//!
//! Judged by the guest's own output, not by QEMU's status: the dirtier checks every word of its
//! working set before overwriting it, so a page the migration lost shows up as `MISMATCH`.

use ninja_testkit::{Qemu, QemuConfig, RawQmp, free_tcp_port, qemu_or_skip};
use serde_json::json;
use std::time::{Duration, Instant};

/// The highest `pass=N` the dirtier has reported in `log`.
fn last_pass(log: &str) -> Option<u64> {
    log.lines()
        .filter_map(|l| l.split("ninja-guest-dirtier: pass=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .max()
}

#[test]
fn dirtying_guest_survives_qemu_live_migration() {
    let Some(fixtures) = qemu_or_skip("dirtying_guest_survives_qemu_live_migration") else {
        return;
    };
    // 16 MiB rewritten continuously while a bandwidth cap stretches the migration over several
    // rounds, so pages are dirtied during migration and must be resent.
    let config = QemuConfig::new(&fixtures)
        .memory_mib(128)
        .guest_run("/bin/ninja-guest-dirtier 16");
    let mut src = Qemu::start(config.clone()).expect("start source QEMU");
    src.wait_serial("ninja-guest-dirtier: pass=", Duration::from_secs(90))
        .expect("guest dirtier running on the source");

    let port = free_tcp_port();
    let mut dst = Qemu::start(config.incoming(&format!("tcp:127.0.0.1:{port}")))
        .expect("start destination QEMU");

    let mut qmp = RawQmp::connect(src.qmp_path()).expect("source QMP");
    qmp.execute(
        "migrate-set-parameters",
        json!({"max-bandwidth": 96u64 << 20, "downtime-limit": 300}),
    )
    .expect("set migration parameters");
    qmp.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}))
        .expect("start migration");

    let deadline = Instant::now() + Duration::from_secs(120);
    let info = loop {
        let info = qmp
            .execute("query-migrate", json!({}))
            .expect("query-migrate");
        match info["status"].as_str() {
            Some("completed") => break info,
            Some("failed") | Some("cancelled") => panic!("migration ended badly: {info}"),
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "migration not done in 120 s: {info}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let rounds = info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
    assert!(
        rounds >= 2,
        "expected several pre-copy rounds with a dirtying guest: {info}"
    );
    let src_pass = last_pass(&src.serial()).expect("source printed passes");

    // The destination continues the same guest: no boot messages, passes beyond the source's,
    // and at least a few more full checked passes.
    let log = dst
        .wait_serial_until(
            |log| last_pass(log).is_some_and(|p| p > src_pass + 20) || log.contains("MISMATCH"),
            Duration::from_secs(90),
        )
        .expect("guest runs on the destination");
    assert!(
        !log.contains("MISMATCH"),
        "the destination guest found memory the migration did not carry: {log}"
    );
    assert!(
        !log.contains("ninja-init: ready"),
        "the destination booted a fresh guest instead of continuing the migrated one: {log}"
    );
    let first_dst_pass = log
        .lines()
        .find_map(last_pass)
        .expect("destination printed passes");
    assert!(
        first_dst_pass >= src_pass,
        "destination counter {first_dst_pass} went back from the source's {src_pass}"
    );

    // The source is paused for good: its guest prints nothing more.
    let frozen = src.serial();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        frozen,
        src.serial(),
        "source guest still running after migration"
    );
}
