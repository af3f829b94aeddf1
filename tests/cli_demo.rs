//! `ninja-migrate demo` and `vmm listen`/`vmm migrate` as a user runs them: two processes,
//! loopback, judged by the guest's memory and counters in the JSON report.

use ninja_testkit::kvm_or_skip;
use serde_json::Value;
use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, Command, Output, Stdio};

fn ninja() -> Command {
    Command::new(env!("CARGO_BIN_EXE_ninja-migrate"))
}

fn demo(args: &[&str]) -> Value {
    let out = ninja()
        .args(["demo", "--json", "--mem-mib=64", "--working-set-mib=8"])
        .args(["--run-before-ms=300", "--run-after-ms=300"])
        .args(args)
        .stderr(Stdio::inherit())
        .output()
        .expect("run ninja-migrate demo");
    let text = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("demo printed no JSON report ({e}): {text}"));
    assert!(out.status.success(), "demo failed: {report}");
    report
}

fn assert_verified(r: &Value) {
    assert_eq!(r["memory_identical"], true, "{r}");
    assert_eq!(r["guest_errors"], 0, "{r}");
    assert_eq!(r["counter_at_pause"], r["counter_at_resume"], "{r}");
    assert!(
        r["counter_after"].as_u64() > r["counter_at_resume"].as_u64(),
        "guest did not run on the destination: {r}"
    );
    assert_eq!(r["source_stopped"], true, "{r}");
    assert_eq!(r["verified"], true, "{r}");
    // The migration's downtime and the demo's verification are reported apart: together they
    // are the pause the source measured.
    let (downtime, verify) = (r["downtime_ms"].as_f64(), r["verify_ms"].as_f64());
    let paused = r["source"]["report"]["downtime_ms"].as_f64();
    assert!(verify > Some(0.0), "{r}");
    let sum = downtime.zip(verify).map(|(d, v)| d + v);
    assert!(
        sum.zip(paused).is_some_and(|(s, p)| (s - p).abs() < 0.01),
        "{r}"
    );
}

#[test]
fn demo_migrates_a_kvm_guest_between_two_processes() {
    if !kvm_or_skip("demo_migrates_a_kvm_guest_between_two_processes") {
        return;
    }
    let r = demo(&["--guest=kvm", "--connections=2"]);
    assert_eq!(r["guest"], "kvm");
    assert_eq!(r["connections"], 2);
    assert_verified(&r);
}

#[test]
fn demo_migrates_the_software_guest() {
    let r = demo(&["--guest=software"]);
    assert_eq!(r["guest"], "software");
    assert_verified(&r);
}

/// `vmm listen --json` with `args`, up to its `listening` line (returned parsed).
fn listen(args: &[&str]) -> (Child, BufReader<ChildStdout>, Value) {
    let mut dst = ninja()
        .args(["vmm", "listen", "--json", "--run-after-ms=200"])
        .args(["--accept-timeout-s=60"])
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("start destination");
    // The destination announces itself before accepting.
    let mut stdout = BufReader::new(dst.stdout.take().unwrap());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let listening: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(listening["event"], "listening", "{line}");
    (dst, stdout, listening)
}

/// A source that succeeded and the destination that received its guest: the memory digests
/// agree and the source stayed stopped.
fn assert_received(src: Output, mut dst: Child, mut stdout: BufReader<ChildStdout>) {
    let src_text = String::from_utf8_lossy(&src.stdout);
    assert!(
        src.status.success(),
        "source failed: {src_text} {}",
        String::from_utf8_lossy(&src.stderr)
    );
    let migrated: Value = serde_json::from_str(src_text.lines().last().unwrap()).unwrap();
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    assert!(dst.wait().unwrap().success(), "destination failed: {rest}");
    let received: Value = serde_json::from_str(rest.lines().last().unwrap()).unwrap();
    assert_eq!(migrated["event"], "migrated");
    assert_eq!(received["event"], "received");
    assert_eq!(migrated["digest"], received["at_resume"]["digest"]);
    assert_eq!(migrated["source_stopped"], true);
}

#[test]
fn listen_and_migrate_over_a_unix_socket() {
    let dir = std::env::temp_dir().join(format!("ninja-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("mig.sock");
    let endpoint = format!("unix:{}", sock.display());
    let guest = ["--guest=software", "--mem-mib=32", "--working-set-mib=4"];
    let (dst, stdout, _) = listen(&[&["--listen", &endpoint][..], &guest].concat());
    let src = ninja()
        .args(["vmm", "migrate", "--json", "--run-before-ms=200"])
        .args(["--to", &endpoint])
        .args(guest)
        .output()
        .expect("run source");
    assert_received(src, dst, stdout);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn mismatched_guests_are_refused_at_the_handshake() {
    let mut dst = ninja()
        .args(["vmm", "listen", "--json", "--listen=tcp:127.0.0.1:0"])
        .args(["--guest=software", "--mem-mib=64", "--accept-timeout-s=60"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(dst.stdout.take().unwrap());
    let mut line = String::new();
    std::io::BufRead::read_line(&mut stdout, &mut line).unwrap();
    let listening: Value = serde_json::from_str(&line).unwrap();
    let endpoint = listening["endpoint"].as_str().unwrap().to_owned();
    let src = ninja()
        .args(["vmm", "migrate", "--run-before-ms=100", "--to", &endpoint])
        .args(["--guest=software", "--mem-mib=32"])
        .output()
        .unwrap();
    assert!(!src.status.success());
    let err = String::from_utf8_lossy(&src.stderr);
    assert!(
        err.contains("handshake"),
        "error should name the phase: {err}"
    );
    assert!(!dst.wait().unwrap().success());
}

#[test]
fn a_cleartext_stream_off_loopback_is_refused_unless_insecure() {
    // 192.0.2.0/24 is reserved for documentation: nothing answers there, nothing is tried.
    for args in [
        &["vmm", "listen", "--listen=tcp:0.0.0.0:0"][..],
        &["vmm", "migrate", "--to=tcp:192.0.2.1:9"][..],
    ] {
        let out = ninja()
            .args(args)
            .args(["--guest=software", "--mem-mib=32"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("not a loopback address") && err.contains("--insecure"),
            "{args:?}: {err}"
        );
    }
    // Asked for explicitly, the listener opens (and gives up when no source comes).
    let out = ninja()
        .args([
            "vmm",
            "listen",
            "--json",
            "--listen=tcp:0.0.0.0:0",
            "--insecure",
        ])
        .args(["--guest=software", "--mem-mib=32", "--accept-timeout-s=1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("\"listening\""), "{text}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("source to connect"), "{err}");
}

#[test]
fn listen_and_migrate_over_tls_off_loopback_after_a_failed_attempt() {
    let dir = std::env::temp_dir().join(format!("ninja-cli-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    ninja_testkit::tls::site_credentials(&dir, "Ninja test site CA", &["127.0.0.1"])
        .expect("openssl");
    let creds = format!("--tls-creds={}", dir.display());
    let guest = ["--guest=software", "--mem-mib=32", "--working-set-mib=4"];
    // Any address, not only loopback: TLS makes it safe without --insecure.
    let listen_args = ["--listen=tcp:0.0.0.0:0", "--attempts=2", &creds];
    let (dst, mut stdout, listening) =
        listen(&[&listen_args[..], &["--tls-allow=ninja-source"], &guest].concat());
    assert_eq!(listening["tls"], true, "{listening}");
    let port = listening["endpoint"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_owned();
    let to = format!("--to=tcp:127.0.0.1:{port}");

    // A clear-text source gets nowhere (and costs the destination no attempt).
    let plain = ninja()
        .args(["vmm", "migrate", "--run-before-ms=100", &to])
        .args(guest)
        .output()
        .unwrap();
    assert!(!plain.status.success());
    // An authenticated source with the wrong guest: attempt 1 fails at the handshake.
    let wrong = ninja()
        .args(["vmm", "migrate", "--run-before-ms=100", &to, &creds])
        .args(["--guest=software", "--mem-mib=16"])
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    let mut line = String::new();
    stdout.read_line(&mut line).unwrap();
    let failed: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(failed["event"], "failed", "{line}");
    assert_eq!(failed["attempt"], 1, "{line}");

    // Attempt 2: the genuine source.
    let src = ninja()
        .args([
            "vmm",
            "migrate",
            "--json",
            "--run-before-ms=200",
            &to,
            &creds,
        ])
        .args(guest)
        .output()
        .unwrap();
    assert_received(src, dst, stdout);
    let _ = std::fs::remove_dir_all(&dir);
}
