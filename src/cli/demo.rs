//! `ninja-migrate demo`: live-migrate a running guest from this process to a second one over
//! loopback TCP, and check by the guest's own memory that it arrived whole and kept running.

use super::guest::{Guest, GuestArgs, GuestKind, Tracking};
use super::vmm::{Migrated, MigrationArgs, OnTimeout, Received, migrate_guest};
use clap::Args;
use migrate_core::transport::Endpoint;
use migrate_core::{Error, Result};
use serde::Serialize;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `demo` flags.
#[derive(Debug, Clone, Args)]
pub struct DemoArgs {
    /// The guest.
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Migration settings.
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// How long the guest runs before the migration starts.
    #[arg(long, default_value_t = 1000)]
    pub run_before_ms: u64,
    /// How long the destination runs the guest before reporting (at least; longer, up to 60 s
    /// more, until the guest's pass counter has advanced).
    #[arg(long, default_value_t = 1000)]
    pub run_after_ms: u64,
    /// Skip hashing guest memory at switchover (the destination's hash adds to downtime).
    #[arg(long)]
    pub no_verify: bool,
    /// Print the report as one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
}

/// What `demo --json` prints.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    /// "kvm" or "software".
    pub guest: String,
    /// Guest memory in bytes.
    pub mem_bytes: u64,
    /// Memory connections.
    pub connections: usize,
    /// Pre-copy rounds including the final one.
    pub rounds: usize,
    /// Migration start to commit, ms.
    pub total_ms: f64,
    /// The migration's downtime: the guest paused on the source until the destination could
    /// resume it, ms (without the demo's own verification).
    pub downtime_ms: f64,
    /// How long the demo kept the guest paused on top of that to hash the destination's
    /// memory for verification, ms (0 with `--no-verify`).
    pub verify_ms: f64,
    /// Bytes sent on the memory connections.
    pub bytes_sent: u64,
    /// bytes_sent over total time, GiB/s.
    pub throughput_gib_s: f64,
    /// Guest counter when paused on the source.
    pub counter_at_pause: u64,
    /// Guest counter as received by the destination.
    pub counter_at_resume: u64,
    /// Guest counter after running on the destination.
    pub counter_after: u64,
    /// Pages the guest found corrupted (source + destination).
    pub guest_errors: u64,
    /// Destination memory equals source memory at switchover (None: not checked).
    pub memory_identical: Option<bool>,
    /// The source guest stayed stopped after commit.
    pub source_stopped: bool,
    /// Everything above that must hold did.
    pub verified: bool,
    /// The source's full report.
    pub source: Migrated,
    /// The destination's full report.
    pub destination: Received,
}

/// Kills the destination process if the demo ends early.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn guest_cli_args(g: &GuestArgs) -> Vec<String> {
    let kind = match g.guest {
        GuestKind::Auto => "auto",
        GuestKind::Kvm => "kvm",
        GuestKind::Software => "software",
    };
    let tracking = match g.tracking {
        Tracking::Log => "log",
        Tracking::Ring => "ring",
    };
    vec![
        format!("--guest={kind}"),
        format!("--mem-mib={}", g.mem_mib),
        format!("--vcpus={}", g.vcpus),
        format!("--working-set-mib={}", g.working_set_mib),
        format!("--dirty-rate-mib-s={}", g.dirty_rate_mib_s),
        format!("--tracking={tracking}"),
    ]
}

fn migration_cli_args(m: &MigrationArgs) -> Vec<String> {
    let mut v = vec![
        format!("--connections={}", m.connections),
        format!("--downtime-ms={}", m.downtime_ms),
        format!("--timeout-s={}", m.timeout_s),
        format!(
            "--on-timeout={}",
            match m.on_timeout {
                OnTimeout::Force => "force",
                OnTimeout::Abort => "abort",
            }
        ),
        format!("--max-bandwidth-mib-s={}", m.max_bandwidth_mib_s),
    ];
    if m.no_auto_converge {
        v.push("--no-auto-converge".into());
    }
    v
}

fn io_err(context: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        context: context.into(),
        source,
    }
}

/// Runs the demo; returns the report (printed already) or the first error.
pub fn demo(args: &DemoArgs) -> Result<DemoReport> {
    // The source guest is built first so that "auto" resolves the same way on both sides.
    let guest = Guest::start(&args.guest)?;
    let mut guest_args = args.guest.clone();
    guest_args.guest = match guest {
        Guest::Kvm(_) => GuestKind::Kvm,
        Guest::Software(_) => GuestKind::Software,
    };

    let exe = std::env::current_exe().map_err(io_err("finding ninja-migrate"))?;
    let mut cmd = Command::new(exe);
    cmd.args(["vmm", "listen", "--listen", "tcp:127.0.0.1:0", "--json"])
        .arg(format!("--run-after-ms={}", args.run_after_ms))
        .args(guest_cli_args(&guest_args))
        .args(migration_cli_args(&args.migration))
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    if args.no_verify {
        cmd.arg("--no-verify");
    }
    let mut child = ChildGuard(cmd.spawn().map_err(io_err("starting the destination"))?);
    let dest_pid = child.0.id();
    let stdout = child.0.stdout.take().expect("piped stdout");
    let (tx, rx) = crossbeam_channel::unbounded::<serde_json::Value>();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
            if let Ok(v) = serde_json::from_str(&line) {
                if tx.send(v).is_err() {
                    break;
                }
            }
        }
    });
    let next_event = |name: &str, timeout: Duration| -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(v) if v["event"] == name => return Ok(v),
                Ok(_) => {}
                Err(_) => {
                    return Err(Error::Timeout(format!(
                        "destination process {dest_pid} sent no {name:?} report"
                    )));
                }
            }
        }
    };
    let listening = next_event("listening", Duration::from_secs(30))?;
    let endpoint: Endpoint = listening["endpoint"].as_str().unwrap_or_default().parse()?;

    if !args.json {
        println!(
            "ninja-migrate demo: {} guest, {} MiB, {} vCPUs, working set {} MiB dirtied at {}; destination process {dest_pid} on {endpoint}",
            guest.kind(),
            args.guest.mem_mib,
            args.guest.vcpus,
            args.guest.working_set_mib,
            if args.guest.dirty_rate_mib_s == 0 {
                "full speed".to_string()
            } else {
                format!("{} MiB/s", args.guest.dirty_rate_mib_s)
            }
        );
    }
    std::thread::sleep(Duration::from_millis(args.run_before_ms));
    let source = migrate_guest(&guest, &endpoint, None, &args.migration, args.json)?;
    let received = next_event(
        "received",
        Duration::from_millis(args.run_after_ms) + Duration::from_secs(120),
    )?;
    let destination: Received = serde_json::from_value(received)
        .map_err(|e| Error::Protocol(format!("destination report: {e}")))?;
    let _ = child.0.wait();

    let memory_identical =
        (!args.no_verify).then_some(destination.at_resume.digest == source.digest);
    let guest_errors = source.at_pause.errors + destination.after_run.errors;
    let counter_at_pause = source.at_pause.counter;
    let counter_at_resume = destination.at_resume.progress.counter;
    let counter_after = destination.after_run.counter;
    let verified = memory_identical != Some(false)
        && guest_errors == 0
        && counter_at_resume == counter_at_pause
        && counter_after > counter_at_resume
        && source.source_stopped;
    let r = &source.report;
    let report = DemoReport {
        guest: source.guest.clone(),
        mem_bytes: r.memory_bytes,
        connections: r.connections,
        rounds: r.rounds.len(),
        total_ms: r.total_ms,
        // The destination hashes before it resumes: the migration's own downtime is the rest.
        downtime_ms: (r.downtime_ms - destination.at_resume.verify_ms).max(0.0),
        verify_ms: destination.at_resume.verify_ms,
        bytes_sent: r.bytes_sent,
        throughput_gib_s: r.bytes_sent as f64 / (r.total_ms / 1e3).max(1e-9) / f64::from(1 << 30),
        counter_at_pause,
        counter_at_resume,
        counter_after,
        guest_errors,
        memory_identical,
        source_stopped: source.source_stopped,
        verified,
        source,
        destination,
    };
    if args.json {
        println!(
            "{}",
            serde_json::to_string(&report).expect("serializable report")
        );
    } else {
        println!(
            "  done: {} rounds, total {:.1} ms, downtime {:.1} ms{}, {:.1} MiB sent ({:.2} GiB/s)",
            report.rounds,
            report.total_ms,
            report.downtime_ms,
            if report.verify_ms > 0.0 {
                format!(
                    " (then {:.1} ms more paused while the demo hashed memory to verify it)",
                    report.verify_ms
                )
            } else {
                String::new()
            },
            report.bytes_sent as f64 / f64::from(1 << 20),
            report.throughput_gib_s
        );
        println!(
            "  guest counter: {} at pause on the source, {} as received, {} after {} ms on the destination; {} guest errors",
            report.counter_at_pause,
            report.counter_at_resume,
            report.counter_after,
            report.destination.run_ms,
            report.guest_errors
        );
        println!(
            "  memory at switchover: {}; source guest {}",
            match report.memory_identical {
                Some(true) => "identical on both sides",
                Some(false) => "DIFFERENT",
                None => "not checked (--no-verify)",
            },
            if report.source_stopped {
                "stopped"
            } else {
                "STILL RUNNING"
            }
        );
        println!("demo: {}", if report.verified { "ok" } else { "FAILED" });
    }
    Ok(report)
}
