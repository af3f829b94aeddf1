//! Round-trip latency of `query-status` through the `qmp` client over a unix socket.
//!
//! Prints one JSON line per scenario (median and p99 over 1,000 calls, microseconds):
//! - `qemu-running`: a real QEMU (TCG, idle booted guest);
//! - `qemu-paused`: the same QEMU after `stop` (no vCPU thread competing for the 2 cores);
//! - `fake-server`: a thread answering instantly, i.e. the client's own cost plus the socket.
//!
//! The scenarios run interleaved in rounds so their ratio is measured in one window.
//! Run: `cargo bench --bench qmp_latency`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};

use ninja_testkit::{Qemu, QemuConfig, qemu_or_skip};
use qmp::{ConnectOptions, Endpoint, Qmp};
use serde_json::{Value, json};

const CALLS: usize = 1000;
const ROUNDS: usize = 10;
const WARMUP: usize = 50;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

fn report(scenario: &str, mut samples: Vec<f64>, extra: Value) {
    samples.sort_by(f64::total_cmp);
    let mut line = json!({
        "bench": "qmp_latency",
        "command": "query-status",
        "transport": "unix",
        "scenario": scenario,
        "calls": samples.len(),
        "median_us": (percentile(&samples, 0.5) * 10.0).round() / 10.0,
        "p99_us": (percentile(&samples, 0.99) * 10.0).round() / 10.0,
        "min_us": (samples[0] * 10.0).round() / 10.0,
        "max_us": (samples[samples.len() - 1] * 10.0).round() / 10.0,
    });
    if let (Value::Object(line), Value::Object(extra)) = (&mut line, extra) {
        line.extend(extra);
    }
    println!("{line}");
}

fn time_calls(qmp: &Qmp, n: usize, out: &mut Vec<f64>) {
    for _ in 0..n {
        let t = Instant::now();
        qmp.query_status().expect("query-status");
        out.push(t.elapsed().as_secs_f64() * 1e6);
    }
}

/// A QMP server thread that answers every command at once with a running status.
fn fake_server(path: &std::path::Path) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).expect("bind fake server");
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let mut writer = stream.try_clone().unwrap();
        let reader = BufReader::new(stream);
        let greeting = r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 0, "major": 10}, "package": ""}, "capabilities": ["oob"]}}"#;
        writeln!(writer, "{greeting}").unwrap();
        for line in reader.lines() {
            let Ok(line) = line else { return };
            let req: Value = serde_json::from_str(&line).unwrap();
            let ret = if req["execute"] == "query-status" {
                json!({"running": true, "status": "running"})
            } else {
                json!({})
            };
            let reply = json!({"return": ret, "id": req["id"]});
            if writeln!(writer, "{reply}").is_err() {
                return;
            }
        }
    })
}

fn main() {
    let options = ConnectOptions {
        greeting_timeout: Duration::from_secs(30),
        ..ConnectOptions::default()
    };
    let fake_path = std::env::temp_dir().join(format!("qmp-bench-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&fake_path);
    let server = fake_server(&fake_path);
    let fake = Qmp::connect(&Endpoint::Unix(fake_path.clone()), options.clone()).expect("fake");

    let real = qemu_or_skip("bench qmp_latency (real QEMU scenarios)").map(|fixtures| {
        let mut vm = Qemu::start(QemuConfig::new(&fixtures).memory_mib(128)).expect("start QEMU");
        vm.wait_serial("ninja-init: ready", Duration::from_secs(120))
            .expect("guest boots");
        let running = Qmp::connect(&Endpoint::Unix(vm.qmp_path().to_owned()), options.clone())
            .expect("connect QEMU");
        (vm, running)
    });

    let mut fake_samples = Vec::new();
    let mut running_samples = Vec::new();
    let mut paused_samples = Vec::new();
    time_calls(&fake, WARMUP, &mut Vec::new());
    if let Some((_, qmp)) = &real {
        time_calls(qmp, WARMUP, &mut Vec::new());
    }
    for _ in 0..ROUNDS {
        time_calls(&fake, CALLS / ROUNDS, &mut fake_samples);
        if let Some((_, qmp)) = &real {
            time_calls(qmp, CALLS / ROUNDS, &mut running_samples);
            qmp.stop().expect("stop");
            time_calls(qmp, CALLS / ROUNDS, &mut paused_samples);
            qmp.cont().expect("cont");
        }
    }

    let median = |s: &[f64]| {
        let mut v = s.to_vec();
        v.sort_by(f64::total_cmp);
        percentile(&v, 0.5)
    };
    let fake_median = median(&fake_samples);
    if let Some((_, qmp)) = &real {
        let v = qmp.greeting().version.qemu;
        let version = format!("{}.{}.{}", v.major, v.minor, v.micro);
        let ratio = |s: &[f64]| (median(s) / fake_median * 10.0).round() / 10.0;
        let extra = |s: &[f64]| json!({"qemu": version, "oob": qmp.oob_enabled(), "median_vs_fake_server": ratio(s)});
        report(
            "qemu-running",
            running_samples.clone(),
            extra(&running_samples),
        );
        report(
            "qemu-paused",
            paused_samples.clone(),
            extra(&paused_samples),
        );
    }
    report("fake-server", fake_samples, json!({}));

    drop(fake);
    let _ = server.join();
    let _ = std::fs::remove_file(&fake_path);
}
