//! `ninja-migrate plan check|run PLAN.toml` and `plan recover`: validate a migration plan, run
//! it (journaled, interruptible), or finish a run whose controller died.

use clap::{Args, Subcommand};
use nix::sys::signal::{SigSet, Signal};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use symvirt::controller::{Controller, Event, Outcome, Report, new_epoch};
use symvirt::journal::StateDir;

/// The `plan` subcommands.
#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Check a plan and report every error with its location.
    Check(CheckArgs),
    /// Run a plan: quiesce, detach, migrate, attach, resume (or roll back).
    Run(RunArgs),
    /// Finish every interrupted run in the state directory: roll back before its decision to
    /// keep the destinations, forward after it; one running copy of every VM.
    Recover(RecoverArgs),
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

/// Reads and checks a plan; prints every issue as `FILE:LINE:COLUMN: PATH: MESSAGE`.
fn load(path: &PathBuf) -> Result<symvirt::cluster::Plan, ExitCode> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("ninja-migrate: cannot read {}: {e}", path.display());
            return Err(ExitCode::from(2));
        }
    };
    symvirt::plan::parse(&text).map_err(|issues| {
        for issue in &issues {
            eprintln!("{}:{issue}", path.display());
        }
        eprintln!("{}: {} error(s)", path.display(), issues.len());
        ExitCode::FAILURE
    })
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
        PlanCommand::Run(args) => {
            let interrupt = interrupt_flag();
            let plan = match load(&args.plan) {
                Ok(p) => p,
                Err(code) => return code,
            };
            let state = match state_dir(&args.state_dir) {
                Ok(s) => s,
                Err(code) => return code,
            };
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
                .interruptible(interrupt);
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
