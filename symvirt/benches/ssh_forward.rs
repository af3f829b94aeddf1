//! What reaching an endpoint through `ssh:` costs, against a private sshd on loopback (the
//! tests' helper, `tests/common/sshd.rs`). Prints one JSON line per scenario:
//! - `forward-setup`: a new [`Connector`] resolving an `ssh:` address until its forward listens
//!   (ssh start, key exchange, login, bind), median ms;
//! - `echo-roundtrip`: a 64-byte request and reply on a unix socket, direct and through the
//!   forward, interleaved in rounds; medians in µs and their ratio;
//! - `qmp-query-status`: one QMP command to a real QEMU, direct and through the forward,
//!   interleaved; medians in µs and their ratio (skipped without QEMU and the fixtures).
//!
//! Run: `cargo bench -p symvirt --bench ssh_forward`.

#[path = "../tests/common/sshd.rs"]
#[allow(dead_code)]
mod sshd;

use serde_json::json;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::time::{Duration, Instant};
use symvirt::remote::{Address, Connector};

const ROUNDS: usize = 7;
const CALLS_PER_ROUND: usize = 200;
const SETUPS: usize = 9;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2] * 10.0).round() / 10.0
}

fn echo_server(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 64];
                while conn.read_exact(&mut buf).is_ok() {
                    if conn.write_all(&buf).is_err() {
                        return;
                    }
                }
            });
        }
    });
}

/// Median µs of one 64-byte round trip on `stream`, over `n` calls.
fn echo_calls(stream: &mut UnixStream, n: usize) -> f64 {
    let mut buf = [7u8; 64];
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        stream.write_all(&buf).unwrap();
        stream.read_exact(&mut buf).unwrap();
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    median(samples)
}

fn qmp_calls(qmp: &qmp::Qmp, n: usize) -> f64 {
    let mut samples = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        qmp.query_status().unwrap();
        samples.push(t.elapsed().as_secs_f64() * 1e6);
    }
    median(samples)
}

fn main() {
    let Some(binary) = ninja_testkit::sshd_or_skip("bench ssh_forward") else {
        return;
    };
    let sshd = sshd::Sshd::start(&binary, "bench").expect("private sshd");
    let dir = std::env::temp_dir().join(format!("symvirt-bench-ssh-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ssh = sshd.ssh_program().to_string_lossy().into_owned();
    let echo = dir.join("echo.sock");
    echo_server(&echo);
    let address: Address = format!("ssh:{}:{}", sshd.alias(), echo.display())
        .parse()
        .unwrap();
    let deadline = || Instant::now() + Duration::from_secs(60);

    let mut setups = Vec::new();
    for _ in 0..SETUPS {
        let c = Connector::new(ssh.clone()).unwrap();
        let t = Instant::now();
        c.local_path(&address, deadline()).unwrap();
        setups.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "{}",
        json!({"bench": "ssh_forward", "scenario": "forward-setup", "runs": SETUPS,
               "median_ms": median(setups)})
    );

    let connector = Connector::new(ssh.clone()).unwrap();
    let local = connector.local_path(&address, deadline()).unwrap();
    let mut direct = UnixStream::connect(&echo).unwrap();
    let mut forwarded = UnixStream::connect(&local).unwrap();
    let (mut d, mut f) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        d.push(echo_calls(&mut direct, CALLS_PER_ROUND));
        f.push(echo_calls(&mut forwarded, CALLS_PER_ROUND));
    }
    let (d, f) = (median(d), median(f));
    println!(
        "{}",
        json!({"bench": "ssh_forward", "scenario": "echo-roundtrip", "rounds": ROUNDS,
               "calls_per_round": CALLS_PER_ROUND, "direct_us": d, "forwarded_us": f,
               "ratio": (f / d * 100.0).round() / 100.0})
    );

    match ninja_testkit::qemu_or_skip("bench ssh_forward qmp") {
        None => println!(
            "{}",
            json!({"bench": "ssh_forward", "scenario": "qmp-query-status", "skipped": "no QEMU"})
        ),
        Some(fixtures) => {
            let qemu = ninja_testkit::Qemu::start(ninja_testkit::QemuConfig::new(&fixtures))
                .expect("QEMU");
            let remote: Address = format!("ssh:{}:{}", sshd.alias(), qemu.qmp_path().display())
                .parse()
                .unwrap();
            let local = connector.qmp_endpoint(&remote, deadline()).unwrap();
            // QEMU's monitor serves one client at a time: alternate whole rounds.
            let (mut d, mut f) = (Vec::new(), Vec::new());
            for _ in 0..ROUNDS {
                let q = qmp::Qmp::connect_unix(qemu.qmp_path()).unwrap();
                d.push(qmp_calls(&q, CALLS_PER_ROUND));
                drop(q);
                let q = qmp::Qmp::connect(&local, qmp::ConnectOptions::default()).unwrap();
                f.push(qmp_calls(&q, CALLS_PER_ROUND));
            }
            let (d, f) = (median(d), median(f));
            println!(
                "{}",
                json!({"bench": "ssh_forward", "scenario": "qmp-query-status", "rounds": ROUNDS,
                       "calls_per_round": CALLS_PER_ROUND, "direct_us": d, "forwarded_us": f,
                       "ratio": (f / d * 100.0).round() / 100.0})
            );
        }
    }
    drop(connector);
    let _ = std::fs::remove_dir_all(&dir);
}
