//! `ninja-migrate vmm listen` and `vmm migrate`: the two halves of a reference-VMM migration,
//! one per process (or per host).

use super::guest::{AtResume, Guest, GuestArgs, GuestProgress, Incoming};
use clap::{Args, ValueEnum};
use migrate_core::stats::{MigrationReport, Progress, ReceiveReport};
use migrate_core::tls::{Credentials, DestinationTls, SourceTls};
use migrate_core::transport::{self, Endpoint, Listener};
use migrate_core::{MigrationConfig, Result, TimeoutStrategy, destination, source};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// What to do when pre-copy does not converge in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnTimeout {
    /// Switch over anyway.
    Force,
    /// Give up and keep the guest on the source.
    Abort,
}

/// Migration settings.
#[derive(Debug, Clone, Args)]
pub struct MigrationArgs {
    /// Memory connections (plus one control connection).
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Downtime target in milliseconds.
    #[arg(long, default_value_t = 50)]
    pub downtime_ms: u64,
    /// Pre-copy time limit in seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_s: u64,
    /// At the time limit: force the switchover or abort.
    #[arg(long, value_enum, default_value_t = OnTimeout::Force)]
    pub on_timeout: OnTimeout,
    /// Bandwidth cap in MiB/s (0: none).
    #[arg(long, default_value_t = 0)]
    pub max_bandwidth_mib_s: u64,
    /// Do not throttle the vCPUs when rounds stop shrinking.
    #[arg(long)]
    pub no_auto_converge: bool,
}

impl MigrationArgs {
    /// The engine configuration these flags describe.
    pub fn config(&self) -> MigrationConfig {
        MigrationConfig {
            downtime_target: Duration::from_millis(self.downtime_ms),
            timeout: Duration::from_secs(self.timeout_s),
            on_timeout: match self.on_timeout {
                OnTimeout::Force => TimeoutStrategy::Force,
                OnTimeout::Abort => TimeoutStrategy::Abort,
            },
            auto_converge: !self.no_auto_converge,
            max_bandwidth: (self.max_bandwidth_mib_s > 0).then_some(self.max_bandwidth_mib_s << 20),
            ..MigrationConfig::default()
        }
    }
}

/// `vmm listen`: receive a guest, run it, report.
#[derive(Debug, Clone, Args)]
pub struct ListenArgs {
    /// Where to listen: tcp:HOST:PORT (port 0 picks one) or unix:PATH.
    #[arg(long)]
    pub listen: Endpoint,
    /// The guest (must match the source's).
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Migration settings (timeouts apply on this side too).
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// How long to run the received guest before reporting and exiting: at least this long,
    /// and longer (up to 60 s more) until its pass counter has advanced, since a guest
    /// rewriting a large working set needs longer for one pass.
    #[arg(long, default_value_t = 1000)]
    pub run_after_ms: u64,
    /// How long to wait for the source to connect.
    #[arg(long, default_value_t = 300)]
    pub accept_timeout_s: u64,
    /// Skip hashing guest memory at resume (the hash adds to downtime).
    #[arg(long)]
    pub no_verify: bool,
    /// TLS 1.3 with mutual authentication: a directory with the site's `ca-cert.pem` and this
    /// host's `server-cert.pem` and `server-key.pem` (the layout QEMU's tls-creds-x509 reads).
    /// Every connection must then show a certificate from that CA.
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// Take only sources whose certificate is valid for this name (DNS name or IP address;
    /// repeatable). Without it, any certificate from the CA gets in.
    #[arg(long, value_name = "NAME", requires = "tls_creds")]
    pub tls_allow: Vec<String>,
    /// How many incoming migrations to try: after a failed one (a cut connection, a forged
    /// record, a source that gave up) the guest it brought is discarded and the listener takes
    /// the next, until one succeeds, the attempts are used up, or the accept timeout passes.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub attempts: u32,
    /// Listen on an address other than loopback although the stream is neither authenticated
    /// nor encrypted (no --tls-creds): anyone who reaches the port can hand this VMM a guest
    /// to run.
    #[arg(long)]
    pub insecure: bool,
    /// Print JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
}

/// `vmm migrate`: run a guest, migrate it away, report.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// The destination: tcp:HOST:PORT or unix:PATH.
    #[arg(long)]
    pub to: Endpoint,
    /// TLS 1.3 with mutual authentication: a directory with the site's `ca-cert.pem` and this
    /// host's `client-cert.pem` and `client-key.pem` (the layout QEMU's tls-creds-x509 reads).
    #[arg(long, value_name = "DIR")]
    pub tls_creds: Option<PathBuf>,
    /// The name the destination's certificate must carry (DNS name or IP address); default:
    /// the address in --to.
    #[arg(long, value_name = "NAME", requires = "tls_creds")]
    pub tls_name: Option<String>,
    /// Send to an address other than loopback although the stream is neither authenticated
    /// nor encrypted (no --tls-creds): the guest's memory crosses the network readable, to
    /// whoever answers.
    #[arg(long)]
    pub insecure: bool,
    /// The guest (must match the destination's).
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Migration settings.
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// How long the guest runs before the migration starts.
    #[arg(long, default_value_t = 1000)]
    pub run_before_ms: u64,
    /// Print JSON lines instead of text.
    #[arg(long)]
    pub json: bool,
}

/// The destination's final report (the `received` JSON line).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Received {
    /// "kvm" or "software".
    pub guest: String,
    /// The engine's report.
    pub report: ReceiveReport,
    /// Memory digest and guest progress as received.
    pub at_resume: AtResume,
    /// Guest progress after running on this side.
    pub after_run: GuestProgress,
    /// How long it ran here.
    pub run_ms: u64,
}

/// The source's final report (the `migrated` JSON line).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Migrated {
    /// "kvm" or "software".
    pub guest: String,
    /// The engine's report.
    pub report: MigrationReport,
    /// Guest progress when it was paused for good.
    pub at_pause: GuestProgress,
    /// Digest of guest memory at switchover.
    pub digest: u64,
    /// Whether the guest stayed stopped on the source after commit.
    pub source_stopped: bool,
}

fn emit(json: bool, event: &str, value: &impl Serialize, text: impl FnOnce() -> String) {
    if json {
        let mut v = serde_json::to_value(value).expect("serializable report");
        if let Some(obj) = v.as_object_mut() {
            obj.insert("event".into(), event.into());
        }
        println!("{v}");
    } else {
        println!("{}", text());
    }
}

/// Prints a round line per progress event (text mode only).
pub fn print_progress(p: &Progress) {
    match p {
        Progress::Started { memory_bytes } => {
            println!("  migrating {} MiB", memory_bytes >> 20)
        }
        Progress::Round(r) => println!(
            "  round {:>2}: {:>7} pages ({:>7.1} MiB) in {:>7.1} ms, {:>5.2} GiB/s, dirty after: {} pages{}",
            r.round,
            r.pages_sent,
            r.bytes as f64 / f64::from(1 << 20),
            r.duration_ms,
            r.bandwidth_bytes_s / f64::from(1 << 30),
            r.dirty_pages_found,
            if r.throttle_percent > 0 {
                format!(", throttle {}%", r.throttle_percent)
            } else {
                String::new()
            }
        ),
        Progress::Throttled { percent } => println!("  throttling the vCPUs to {percent}%"),
        Progress::Switchover { dirty_pages } => {
            println!("  switchover: guest paused, {dirty_pages} dirty pages left")
        }
        Progress::Completed { downtime_ms } => {
            println!("  committed: guest paused {downtime_ms:.1} ms")
        }
        other => println!("  {other:?}"),
    }
}

/// Refuses a migration stream that would leave this host in clear text unless `insecure`:
/// without TLS only loopback and unix sockets are safe by default.
pub fn check_exposure(
    endpoint: &Endpoint,
    tls: bool,
    insecure: bool,
) -> std::result::Result<(), String> {
    match endpoint {
        Endpoint::Tcp(addr) if !addr.ip().is_loopback() && !tls && !insecure => Err(format!(
            "{endpoint} is not a loopback address, and without --tls-creds the migration \
             stream is neither authenticated nor encrypted: give --tls-creds, use 127.0.0.1 \
             or a unix socket, or pass --insecure on a network you trust"
        )),
        _ => Ok(()),
    }
}

/// The source's TLS settings from `--tls-creds` and `--tls-name`.
fn source_tls(args: &MigrateArgs) -> Result<Option<SourceTls>> {
    let Some(dir) = &args.tls_creds else {
        return Ok(None);
    };
    let name = match (&args.tls_name, &args.to) {
        (Some(n), _) => n.clone(),
        (None, Endpoint::Tcp(a)) => a.ip().to_string(),
        (None, Endpoint::Unix(_)) => {
            return Err(migrate_core::Error::Protocol(
                "--tls-name is needed for a unix socket (no address to check the certificate \
                 against)"
                    .into(),
            ));
        }
    };
    SourceTls::new(&Credentials::source_in(dir), &name).map(Some)
}

/// Binds, announces the endpoint (the `listening` line), receives, runs, reports.
/// How much longer than `--run-after-ms` a received guest may take to show a new pass.
const AFTER_RUN_PATIENCE: Duration = Duration::from_secs(60);

pub fn listen(args: &ListenArgs) -> Result<Received> {
    let listener = match &args.tls_creds {
        Some(dir) => {
            let tls = DestinationTls::new(&Credentials::destination_in(dir), &args.tls_allow)?;
            Listener::bind_tls(&args.listen, tls)?
        }
        None => Listener::bind(&args.listen)?,
    };
    let endpoint = listener.endpoint()?;
    emit(
        args.json,
        "listening",
        &serde_json::json!({ "endpoint": endpoint.to_string(), "tls": listener.is_encrypted() }),
        || {
            let tls = if listener.is_encrypted() {
                " (TLS)"
            } else {
                ""
            };
            format!("listening on {endpoint}{tls}")
        },
    );
    let cfg = args.migration.config();
    let verify = !args.no_verify;
    let deadline = Instant::now() + Duration::from_secs(args.accept_timeout_s);
    let mut attempt = 1;
    let (incoming, report) = loop {
        let received = listener
            .accept(deadline.saturating_duration_since(Instant::now()))
            .and_then(|conns| {
                destination::receive(conns, &cfg, |layout| {
                    Guest::incoming(&args.guest, layout).map(|g| Incoming::new(g, verify))
                })
            });
        match received {
            Ok(r) => break r,
            Err(e) if attempt < args.attempts && Instant::now() < deadline => {
                let why = symvirt_proto::error::chain(&e);
                emit(
                    args.json,
                    "failed",
                    &serde_json::json!({ "attempt": attempt, "error": why }),
                    || format!("attempt {attempt} failed, guest discarded: {why}"),
                );
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    };
    let at_resume = incoming.at_resume().unwrap_or_default();
    let started = Instant::now();
    std::thread::sleep(Duration::from_millis(args.run_after_ms));
    let mut after_run = incoming.guest.progress()?;
    let patience = started + Duration::from_millis(args.run_after_ms) + AFTER_RUN_PATIENCE;
    while after_run.counter <= at_resume.progress.counter
        && after_run.errors == 0
        && Instant::now() < patience
    {
        std::thread::sleep(Duration::from_millis(100));
        after_run = incoming.guest.progress()?;
    }
    let received = Received {
        guest: incoming.guest.kind().into(),
        report,
        at_resume,
        after_run,
        run_ms: u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
    };
    emit(args.json, "received", &received, || {
        format!(
            "received {} guest: {} data + {} zero pages in {:.1} ms; counter {} at resume, {} after {} ms; {} errors; digest {:#018x}",
            received.guest,
            received.report.data_pages,
            received.report.zero_pages,
            received.report.total_ms,
            received.at_resume.progress.counter,
            received.after_run.counter,
            received.run_ms,
            received.after_run.errors,
            received.at_resume.digest
        )
    });
    Ok(received)
}

/// Starts a guest, lets it run, migrates it to `args.to`, reports.
pub fn migrate(args: &MigrateArgs) -> Result<Migrated> {
    let tls = source_tls(args)?;
    let guest = Guest::start(&args.guest)?;
    std::thread::sleep(Duration::from_millis(args.run_before_ms));
    let migrated = migrate_guest(&guest, &args.to, tls.as_ref(), &args.migration, args.json)?;
    emit(args.json, "migrated", &migrated, || {
        format!(
            "migrated {} guest: {} rounds, downtime {:.1} ms, total {:.1} ms, {:.1} MiB sent; counter {} at pause; digest {:#018x}",
            migrated.guest,
            migrated.report.rounds.len(),
            migrated.report.downtime_ms,
            migrated.report.total_ms,
            migrated.report.bytes_sent as f64 / f64::from(1 << 20),
            migrated.at_pause.counter,
            migrated.digest
        )
    });
    Ok(migrated)
}

/// Migrates a running guest to `to` (over TLS when `tls` is given); on success the guest is
/// stopped here for good.
pub fn migrate_guest(
    guest: &Guest,
    to: &Endpoint,
    tls: Option<&SourceTls>,
    migration: &MigrationArgs,
    json: bool,
) -> Result<Migrated> {
    let cfg = migration.config();
    let n = migration.connections;
    let conns = match tls {
        Some(tls) => transport::connect_tls(to, n, cfg.handshake_timeout, tls)?,
        None => transport::connect(to, n, cfg.handshake_timeout)?,
    };
    let (tx, rx) = crossbeam_channel::unbounded();
    let printer = std::thread::spawn(move || {
        for p in rx {
            if !json {
                print_progress(&p);
            }
        }
    });
    let on_progress = move |p: &Progress| {
        let _ = tx.send(p.clone());
    };
    // The callback owns the sender: the printer ends once it is dropped.
    let result = source::migrate(guest.vm(), conns, &cfg, Some(&on_progress));
    drop(on_progress);
    let _ = printer.join();
    let report = result?;
    let at_pause = guest.progress()?;
    let digest = guest.memory_digest()?;
    // The source must not run after commit: its progress must not move.
    std::thread::sleep(Duration::from_millis(100));
    let source_stopped = guest.progress()? == at_pause;
    Ok(Migrated {
        guest: guest.kind().into(),
        report,
        at_pause,
        digest,
        source_stopped,
    })
}
