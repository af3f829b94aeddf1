//! `ninja-migrate plan check|run PLAN.toml` and `plan recover`: validate a migration plan, run
//! it (journaled, interruptible), or finish a run whose controller died. `plan checkpoint` and
//! `plan restore`: save a whole virtual cluster at one cut, and bring it back.

use clap::{Args, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use symvirt::controller::{AfterCheckpoint, Controller, Event, Outcome, Report, new_epoch};
use symvirt::guard::{GuardEnd, GuardSettings, guard_qemu};
use symvirt::journal::StateDir;

/// The `plan` subcommands.
#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Check a plan and report every error with its location.
    Check(CheckArgs),
    /// Run a plan: quiesce, detach, migrate, attach, resume (or roll back).
    Run(RunArgs),
    /// Move every VM whose source is on HOST as the plan says; the plan's other VMs take part
    /// in the cut and stay where they are (proactive fault tolerance).
    Evacuate(EvacuateArgs),
    /// Finish every interrupted run in the state directory: roll back before its decision to
    /// keep the destinations, forward after it; one running copy of every VM.
    Recover(RecoverArgs),
    /// Save every VM of the plan's sources at one cut into a new directory (a checkpoint),
    /// then let the job go on (or stop it).
    Checkpoint(CheckpointArgs),
    /// Start every VM of a checkpoint at the plan's destinations and resume the job from its
    /// cut.
    Restore(RestoreArgs),
    /// Checkpoint the plan's sources periodically; when one is lost, stop the others and
    /// restore the newest checkpoint that restores at the plan's destinations.
    Guard(GuardArgs),
}

/// `plan guard`.
#[derive(Debug, Args)]
pub struct GuardArgs {
    /// The plan file (TOML): sources guarded, destinations where a restore goes.
    pub plan: PathBuf,
    /// Where the checkpoints go (DIR/ckpt-MS).
    #[arg(long)]
    pub dir: PathBuf,
    /// Seconds from one checkpoint to the next.
    #[arg(long, default_value_t = 600)]
    pub every: u64,
    /// Complete checkpoints kept.
    #[arg(long, default_value_t = 2)]
    pub keep: usize,
    /// How often every source is asked whether it runs, in ms.
    #[arg(long, default_value_t = 1000)]
    pub poll_ms: u64,
    /// Emit one JSON event per line on stdout instead of progress lines.
    #[arg(long)]
    pub json: bool,
    /// Where the logs of the QEMUs of a restore go [default: STATE_DIR/logs/guard-MS].
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// The private state directory (each checkpoint's journal, logs) [default: as for
    /// `plan run`].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// `plan evacuate`.
#[derive(Debug, Args)]
pub struct EvacuateArgs {
    /// The host to empty, as the plan names it (`user@` and case ignored; `localhost` for
    /// `unix:` and loopback endpoints).
    pub host: String,
    /// The rest, as for `plan run`.
    #[command(flatten)]
    pub run: RunArgs,
}

/// `plan checkpoint`.
#[derive(Debug, Args)]
pub struct CheckpointArgs {
    /// The plan file (TOML): its sources are the VMs saved.
    pub plan: PathBuf,
    /// The checkpoint directory to create (it must not exist; on the VMs' host, or storage
    /// every host shares).
    #[arg(long)]
    pub to: PathBuf,
    /// Stop every VM once saved, instead of letting the job go on.
    #[arg(long)]
    pub stop: bool,
    /// Emit one JSON event per line on stdout instead of progress lines.
    #[arg(long)]
    pub json: bool,
    /// The private state directory (the checkpoint's journal) [default: as for `plan run`].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// `plan restore`.
#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// The checkpoint directory.
    pub checkpoint: PathBuf,
    /// Restore at this plan's destinations [default: the destinations of the plan the
    /// checkpoint was taken with].
    #[arg(long)]
    pub plan: Option<PathBuf>,
    /// Emit one JSON event per line on stdout instead of progress lines.
    #[arg(long)]
    pub json: bool,
    /// Where the logs of the QEMUs it starts go [default: STATE_DIR/logs/restore-MS].
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// The private state directory (logs) [default: as for `plan run`].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// `plan recover`.
#[derive(Debug, Args)]
pub struct RecoverArgs {
    /// Emit one JSON event per line on stdout instead of progress lines.
    #[arg(long)]
    pub json: bool,
    /// The private state directory of the runs (journals, logs) [default: $NINJA_STATE_DIR,
    /// else $XDG_STATE_HOME/ninja-migrate, else ~/.local/state/ninja-migrate].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// `plan check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The plan file (TOML).
    pub plan: PathBuf,
}

/// `plan run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The plan file (TOML).
    pub plan: PathBuf,
    /// Emit one JSON event per line on stdout (for schedulers) instead of progress lines.
    #[arg(long)]
    pub json: bool,
    /// Where the logs of destination QEMUs started by the plan go [default: STATE_DIR/logs/RUN].
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
    /// The private state directory of the runs (journals, logs) [default: $NINJA_STATE_DIR,
    /// else $XDG_STATE_HOME/ninja-migrate, else ~/.local/state/ninja-migrate].
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
}

/// Opens the state directory named, or the default one.
fn state_dir(named: &Option<PathBuf>) -> Result<StateDir, ExitCode> {
    let path = named.clone().unwrap_or_else(StateDir::default_path);
    StateDir::open(&path).map_err(|e| {
        eprintln!(
            "ninja-migrate: state directory {}: {}",
            path.display(),
            e.chain()
        );
        ExitCode::from(2)
    })
}

/// SIGINT and SIGTERM set the returned flag instead of killing the process: the run rolls
/// back in order. Blocked here, before any thread starts, so every thread inherits the mask
/// and one thread waits for them.
fn interrupt_flag() -> &'static AtomicBool {
    static FLAG: AtomicBool = AtomicBool::new(false);
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    if signals.thread_block().is_ok() {
        std::thread::spawn(move || {
            let mut told = false;
            while let Ok(signal) = signals.wait() {
                FLAG.store(true, Ordering::SeqCst);
                if told {
                    eprintln!(
                        "ninja-migrate: {signal} again: still rolling back (SIGKILL leaves the \
                         run to `ninja-migrate plan recover`)"
                    );
                } else {
                    eprintln!(
                        "ninja-migrate: {signal}: stopping at the next step and rolling back"
                    );
                    told = true;
                }
            }
        });
    }
    &FLAG
}

/// The event printer of `run` and `recover`.
fn printer(json: bool) -> impl Fn(&Event) + Sync {
    let out = Mutex::new(std::io::stdout());
    move |e: &Event| {
        let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
        let line = if json {
            serde_json::to_string(e).unwrap_or_default()
        } else {
            human(e)
        };
        if !line.is_empty() {
            let _ = writeln!(out, "{line}");
        }
    }
}

fn exit_code(report: &Report) -> ExitCode {
    for e in &report.errors {
        eprintln!("ninja-migrate: {e}");
    }
    match report.outcome {
        Outcome::Completed => ExitCode::SUCCESS,
        Outcome::RolledBack { .. } => ExitCode::from(3),
        _ => ExitCode::from(4),
    }
}

/// `plan recover`: every unfinished run whose controller is gone, oldest first.
fn recover(args: &RecoverArgs) -> ExitCode {
    let state = match state_dir(&args.state_dir) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let found = match state.unfinished() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ninja-migrate: {}", e.chain());
            return ExitCode::from(2);
        }
    };
    let sink = printer(args.json);
    let mut code = ExitCode::SUCCESS;
    let mut recovered = 0;
    for f in found {
        if f.live {
            eprintln!(
                "ninja-migrate: run {} (pid {}) is still going; not touching it",
                f.record.run, f.record.pid
            );
            continue;
        }
        let plan = match symvirt::plan::parse(&f.record.plan) {
            Ok(p) => p,
            Err(issues) => {
                eprintln!(
                    "ninja-migrate: run {}: its plan no longer parses ({} issue(s))",
                    f.record.run,
                    issues.len()
                );
                code = ExitCode::from(4);
                continue;
            }
        };
        let journal = match state.adopt(&f.path) {
            Ok(j) => j,
            Err(e) => {
                eprintln!("ninja-migrate: {}", e.chain());
                code = ExitCode::from(4);
                continue;
            }
        };
        let log_dir = match state.log_dir(&f.record.run) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("ninja-migrate: {}", e.chain());
                return ExitCode::from(2);
            }
        };
        recovered += 1;
        match Controller::new(plan, &sink).recover_qemu(&journal, &log_dir) {
            Ok(report) => {
                if !matches!(
                    report.outcome,
                    Outcome::Completed | Outcome::RolledBack { .. }
                ) {
                    code = exit_code(&report);
                } else {
                    exit_code(&report);
                }
            }
            Err(e) => {
                eprintln!("ninja-migrate: {}", e.chain());
                code = ExitCode::from(4);
            }
        }
    }
    if recovered == 0 {
        println!(
            "ninja-migrate: nothing to recover in {}",
            state.path().display()
        );
    }
    code
}

/// `plan checkpoint`.
fn checkpoint(args: &CheckpointArgs) -> ExitCode {
    let interrupt = interrupt_flag();
    let plan = match load(&args.plan) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let text = std::fs::read_to_string(&args.plan).unwrap_or_default();
    let after = if args.stop {
        AfterCheckpoint::Stop
    } else {
        AfterCheckpoint::Continue
    };
    let state = match state_dir(&args.state_dir) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let journal = match state.begin(&text, &plan, new_epoch()) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("ninja-migrate: {}", e.chain());
            return ExitCode::from(2);
        }
    };
    let sink = printer(args.json);
    let controller = Controller::new(plan, &sink)
        .journaled(&journal)
        .interruptible(interrupt);
    match controller.checkpoint_qemu(&text, &args.to, after) {
        Ok(report) => {
            if report.outcome == Outcome::Completed {
                println!("ninja-migrate: checkpoint {} complete", args.to.display());
            }
            exit_code(&report)
        }
        Err(e) => {
            eprintln!("ninja-migrate: {}", e.chain());
            // Nothing was touched: the journal has no phase yet.
            let _ = journal.finish("failed_to_start");
            ExitCode::from(2)
        }
    }
}

/// `plan restore`.
fn restore(args: &RestoreArgs) -> ExitCode {
    let interrupt = interrupt_flag();
    // The checkpoint is checked whole before anything starts.
    let manifest = match symvirt::checkpoint::read(&args.checkpoint) {
        Ok(m) => m,
        Err(e) => {
            eprintln!("ninja-migrate: {}", e.chain());
            return ExitCode::from(2);
        }
    };
    let plan = match &args.plan {
        Some(path) => match load(path) {
            Ok(p) => p,
            Err(code) => return code,
        },
        None => match symvirt::plan::parse(&manifest.plan) {
            Ok(p) => p,
            Err(issues) => {
                eprintln!(
                    "ninja-migrate: the checkpoint's plan no longer parses ({} issue(s)); name \
                     one with --plan",
                    issues.len()
                );
                return ExitCode::from(2);
            }
        },
    };
    let log_dir = match log_dir(&args.log_dir, &args.state_dir, "restore") {
        Ok(d) => d,
        Err(code) => return code,
    };
    let sink = printer(args.json);
    let controller = Controller::new(plan, &sink).interruptible(interrupt);
    match controller.restore_qemu(&args.checkpoint, &log_dir) {
        Ok(report) => exit_code(&report),
        Err(e) => {
            eprintln!("ninja-migrate: {}", e.chain());
            ExitCode::from(2)
        }
    }
}

/// The log directory named, else `STATE_DIR/logs/WHAT-MS`.
fn log_dir(
    named: &Option<PathBuf>,
    state: &Option<PathBuf>,
    what: &str,
) -> Result<PathBuf, ExitCode> {
    if let Some(d) = named {
        return Ok(d.clone());
    }
    state_dir(state)?
        .log_dir(&format!("{what}-{}", new_epoch()))
        .map_err(|e| {
            eprintln!("ninja-migrate: {}", e.chain());
            ExitCode::from(2)
        })
}

/// `plan guard`.
fn guard(args: &GuardArgs) -> ExitCode {
    let interrupt = interrupt_flag();
    let plan = match load(&args.plan) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let text = std::fs::read_to_string(&args.plan).unwrap_or_default();
    let log_dir = match log_dir(&args.log_dir, &args.state_dir, "guard") {
        Ok(d) => d,
        Err(code) => return code,
    };
    let journals = match state_dir(&args.state_dir) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let settings = GuardSettings {
        journals: Some(journals),
        dir: args.dir.clone(),
        every: Duration::from_secs(args.every),
        keep: args.keep,
        poll: Duration::from_millis(args.poll_ms.max(10)),
        log_dir,
    };
    let sink = printer(args.json);
    let controller = Controller::new(plan, &sink).interruptible(interrupt);
    match guard_qemu(&controller, &text, &settings) {
        Ok(GuardEnd::Recovered {
            lost, checkpoint, ..
        }) => {
            eprintln!(
                "ninja-migrate: lost {}; the cluster runs again from {}",
                lost.join(", "),
                checkpoint.display()
            );
            ExitCode::SUCCESS
        }
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ninja-migrate: {}", e.chain());
            ExitCode::from(4)
        }
    }
}

/// Reads and checks a plan; prints every issue as `FILE:LINE:COLUMN: PATH: MESSAGE`.
fn load(path: &PathBuf) -> Result<symvirt::cluster::Plan, ExitCode> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ninja-migrate: cannot read {}: {e}", path.display());
            return Err(ExitCode::from(2));
        }
    };
    let plan = symvirt::plan::parse(&text).map_err(|issues| {
        for issue in &issues {
            eprintln!("{}:{issue}", path.display());
        }
        eprintln!("{}: {} error(s)", path.display(), issues.len());
        ExitCode::FAILURE
    })?;
    // What would cross hosts unprotected: said every time ([settings.tls] require = true
    // makes it an error).
    for what in plan.cleartext_endpoints() {
        eprintln!(
            "{}: warning: clear text between hosts: {what}",
            path.display()
        );
    }
    Ok(plan)
}

/// Runs a `plan` subcommand.
pub fn main(command: &PlanCommand) -> ExitCode {
    match command {
        PlanCommand::Check(args) => match load(&args.plan) {
            Ok(plan) => {
                println!("{}: ok ({} VMs)", args.plan.display(), plan.vms.len());
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        PlanCommand::Recover(args) => recover(args),
        PlanCommand::Checkpoint(args) => checkpoint(args),
        PlanCommand::Restore(args) => restore(args),
        PlanCommand::Guard(args) => guard(args),
        PlanCommand::Run(args) => run(args, None),
        PlanCommand::Evacuate(args) => run(&args.run, Some(&args.host)),
    }
}

/// `plan run`, and `plan evacuate` (`host`: the VMs whose source is elsewhere stay).
fn run(args: &RunArgs, host: Option<&str>) -> ExitCode {
    let interrupt = interrupt_flag();
    let plan = match load(&args.plan) {
        Ok(p) => p,
        Err(code) => return code,
    };
    let state = match state_dir(&args.state_dir) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let mut staying = Vec::new();
    if let Some(host) = host {
        if let Some(vm) = plan.first_libvirt_vm() {
            eprintln!("ninja-migrate: {vm} is a libvirt domain: plan evacuate moves QEMU VMs only");
            return ExitCode::from(2);
        }
        let (on, off): (Vec<_>, Vec<_>) = plan.vms.iter().partition(|v| v.source.qmp.is_on(host));
        if on.is_empty() {
            eprintln!(
                "ninja-migrate: no VM of {} has its source on {host}",
                args.plan.display()
            );
            return ExitCode::from(2);
        }
        staying = off.iter().map(|v| v.name.clone()).collect();
    }
    let text = std::fs::read_to_string(&args.plan).unwrap_or_default();
    let journal = match state.begin(&text, &plan, new_epoch()) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("ninja-migrate: {}", e.chain());
            return ExitCode::from(2);
        }
    };
    let log_dir = match &args.log_dir {
        Some(d) => d.clone(),
        None => match state.log_dir(&journal.record().run) {
            Ok(d) => d,
            Err(e) => {
                eprintln!("ninja-migrate: {}", e.chain());
                return ExitCode::from(2);
            }
        },
    };
    let sink = printer(args.json);
    let controller = Controller::new(plan, &sink)
        .journaled(&journal)
        .interruptible(interrupt)
        .staying(staying);
    match controller.run_qemu(&log_dir) {
        Ok(report) => exit_code(&report),
        Err(e) => {
            eprintln!("ninja-migrate: {}", e.chain());
            // Nothing was touched: the journal has no phase yet.
            let _ = journal.finish("failed_to_start");
            ExitCode::FAILURE
        }
    }
}

/// A progress bar of `fraction` (0..=1), 20 cells wide.
fn bar(fraction: f64) -> String {
    let filled = (fraction.clamp(0.0, 1.0) * 20.0).round() as usize;
    format!("[{}{}]", "#".repeat(filled), "-".repeat(20 - filled))
}

/// One line for people.
fn human(e: &Event) -> String {
    match e {
        Event::PlanStarted { vms, epoch } => {
            format!(
                "plan: {} VM(s): {} (epoch {epoch})",
                vms.len(),
                vms.join(", ")
            )
        }
        Event::PhaseStarted { phase } => format!("== {phase}"),
        Event::PhaseFinished { phase, ms, ok } => {
            format!(
                "== {phase} {} in {ms:.0} ms",
                if *ok { "done" } else { "FAILED" }
            )
        }
        Event::VmProgress {
            vm,
            phase,
            detail,
            fraction,
        } => format!(
            "  {vm:<12} {phase:<8} {} {detail}",
            bar(fraction.unwrap_or(0.0))
        ),
        Event::GuestResumed {
            vm,
            at,
            interconnect,
            pci_devices,
        } => {
            let pci = pci_devices
                .as_ref()
                .map(|d| format!(", {} PCI devices", d.len()))
                .unwrap_or_default();
            format!("  {vm:<12} resumed at the {at} on {interconnect}{pci}")
        }
        Event::VmError {
            vm,
            phase,
            kind,
            error,
        } => format!("  {vm:<12} {phase:<8} ERROR ({kind}) {error}"),
        Event::RollbackStarted { failed_phase } => {
            format!("!! rolling back (failed in {failed_phase})")
        }
        Event::RollbackFinished { ms, ok } => format!(
            "!! rollback {} in {ms:.0} ms",
            if *ok { "complete" } else { "INCOMPLETE" }
        ),
        Event::RecoveryStarted { run, vms, why, .. } => {
            format!("recover: run {run} ({}): {why}", vms.join(", "))
        }
        Event::PlanFinished { outcome, total_ms } => {
            format!("plan {outcome} in {total_ms:.0} ms")
        }
        Event::CheckpointTaken {
            dir,
            epoch,
            ms,
            bytes,
        } => format!(
            "guard: checkpoint {} (epoch {epoch}, {} MiB) in {ms:.0} ms",
            dir.display(),
            bytes >> 20
        ),
        Event::CheckpointFailed { error } => format!("guard: checkpoint FAILED: {error}"),
        Event::VmLost { vm, error } => format!("guard: {vm} LOST: {error}"),
        Event::RestoreStarted { dir, epoch } => {
            format!("guard: restoring {} (epoch {epoch})", dir.display())
        }
        Event::RestoreFailed { dir, error } => {
            format!("guard: restore of {} FAILED: {error}", dir.display())
        }
        Event::Recovered { dir, ms } => format!(
            "guard: the cluster runs again from {}, {ms:.0} ms after the loss was noticed",
            dir.display()
        ),
        // A newer library's event: in the JSON lines only.
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_show_a_bar() {
        let line = human(&Event::VmProgress {
            vm: "vm0".into(),
            phase: symvirt::controller::Phase::Migrate,
            detail: "x".into(),
            fraction: Some(0.5),
        });
        assert!(line.contains("[##########----------]"), "{line}");
    }
}
