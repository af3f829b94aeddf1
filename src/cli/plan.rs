//! `ninja-migrate plan check|run PLAN.toml`: validate a migration plan, or run it.

use clap::{Args, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Mutex;
use symvirt::controller::{Controller, Event, Outcome};

/// The `plan` subcommands.
#[derive(Debug, Subcommand)]
pub enum PlanCommand {
    /// Check a plan and report every error with its location.
    Check(CheckArgs),
    /// Run a plan: quiesce, detach, migrate, attach, resume (or roll back).
    Run(RunArgs),
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
    /// Where the logs of destination QEMUs started by the plan go.
    #[arg(long, default_value = "/tmp/ninja-migrate")]
    pub log_dir: PathBuf,
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
        PlanCommand::Run(args) => {
            let plan = match load(&args.plan) {
                Ok(p) => p,
                Err(code) => return code,
            };
            let out = Mutex::new(std::io::stdout());
            let json = args.json;
            let sink = |e: &Event| {
                let mut out = out.lock().unwrap_or_else(|p| p.into_inner());
                let line = if json {
                    serde_json::to_string(e).unwrap_or_default()
                } else {
                    human(e)
                };
                if !line.is_empty() {
                    let _ = writeln!(out, "{line}");
                }
            };
            let report = match Controller::new(plan, &sink).run_qemu(&args.log_dir) {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("ninja-migrate: {}", e.chain());
                    return ExitCode::FAILURE;
                }
            };
            for e in &report.errors {
                eprintln!("ninja-migrate: {e}");
            }
            match report.outcome {
                Outcome::Completed => ExitCode::SUCCESS,
                Outcome::RolledBack { .. } => ExitCode::from(3),
                Outcome::Failed { .. } => ExitCode::from(4),
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
        Event::VmError { vm, phase, error } => format!("  {vm:<12} {phase:<8} ERROR {error}"),
        Event::RollbackStarted { failed_phase } => {
            format!("!! rolling back (failed in {failed_phase})")
        }
        Event::RollbackFinished { ms, ok } => format!(
            "!! rollback {} in {ms:.0} ms",
            if *ok { "complete" } else { "INCOMPLETE" }
        ),
        Event::PlanFinished { outcome, total_ms } => {
            format!("plan {outcome} in {total_ms:.0} ms")
        }
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
