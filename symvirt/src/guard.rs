//! A guard: periodic checkpoints of a running virtual cluster, and its restore, without a
//! person, when one of its VMs is lost.
//!
//! Every `every`, the guard checkpoints the plan's sources into `dir/ckpt-MS` (see
//! [`crate::checkpoint`]; the job goes on) and keeps the newest `keep` complete ones. Between
//! checkpoints it asks every source's monitor, every `poll`, whether the VM still runs (a
//! monitor that no longer answers, through an ssh forward too, is a lost host). When one is
//! lost it stops every other source (one copy of each VM, and every rank back to the same
//! cut), then restores the newest checkpoint at the plan's destinations, falling back to the
//! one before it when a checkpoint is damaged or its restore fails. Each step is an
//! [`Event`]; the guard ends once the cluster runs again (or when interrupted).

use crate::backend::VmBackend;
use crate::checkpoint;
use crate::controller::{AfterCheckpoint, Controller, Event, Outcome, Report, new_epoch};
use crate::error::{Error, Result};
use crate::journal::StateDir;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How a guard works.
#[derive(Debug, Clone)]
pub struct GuardSettings {
    /// Where the checkpoints go (`DIR/ckpt-MS`).
    pub dir: PathBuf,
    /// Time from one checkpoint's end to the next one's start.
    pub every: Duration,
    /// How many complete checkpoints to keep (at least 1).
    pub keep: usize,
    /// How often every source is asked whether it runs.
    pub poll: Duration,
    /// Where the QEMUs of a restore log.
    pub log_dir: PathBuf,
    /// Where each checkpoint is journaled (see [`crate::journal`]), so that `plan recover`
    /// continues the sources of a guard that died in the middle of one; `None`: not journaled.
    pub journals: Option<StateDir>,
}

/// How a guard ended.
#[derive(Debug)]
#[non_exhaustive]
pub enum GuardEnd {
    /// A VM was lost and the cluster runs again from a checkpoint, at the plan's destinations.
    Recovered {
        /// The VMs found lost.
        lost: Vec<String>,
        /// The checkpoint restored.
        checkpoint: PathBuf,
        /// The restore.
        report: Box<Report>,
        /// From the loss being noticed to every guest resumed.
        took: Duration,
    },
    /// The guard was interrupted; the job runs where it was.
    Interrupted,
}

/// The complete checkpoints in `dir`, newest first.
pub fn checkpoints(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("ckpt-"))
        .map(|e| e.path())
        .filter(|p| p.join(checkpoint::MANIFEST).is_file())
        .collect();
    found.sort();
    found.reverse();
    Ok(found)
}

/// Runs the guard over the QEMU VMs of `controller`'s plan (whose text is `plan_text`).
/// `Err` when the guard cannot start (no checkpoint directory) or cannot bring the cluster
/// back (no checkpoint could be restored: the error says why the last one failed).
pub fn guard_qemu(
    controller: &Controller<'_>,
    plan_text: &str,
    settings: &GuardSettings,
) -> Result<GuardEnd> {
    if let Some(vm) = controller.plan().first_libvirt_vm() {
        return Err(Error::Refused(format!(
            "{vm} is a libvirt domain: the guard watches QEMU VMs only"
        )));
    }
    std::fs::create_dir_all(&settings.dir)
        .map_err(|e| Error::io(format!("create {}", settings.dir.display()), e))?;
    let mut watched = controller.plan_backends(&settings.log_dir, None)?;
    loop {
        take_checkpoint(controller, plan_text, settings);
        let next = Instant::now() + settings.every;
        loop {
            if controller.interrupted() {
                return Ok(GuardEnd::Interrupted);
            }
            let lost = lost_vms(controller, &mut watched, settings.poll);
            if !lost.is_empty() {
                return recover(controller, &mut watched, settings, lost);
            }
            if Instant::now() >= next {
                break;
            }
            std::thread::sleep(
                settings
                    .poll
                    .min(next.saturating_duration_since(Instant::now())),
            );
        }
    }
}

/// One checkpoint into a new directory; the oldest beyond `keep` go once it is complete.
fn take_checkpoint(controller: &Controller<'_>, plan_text: &str, settings: &GuardSettings) {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let dir = settings.dir.join(format!("ckpt-{stamp:016}"));
    let result = match &settings.journals {
        None => controller.checkpoint_qemu(plan_text, &dir, AfterCheckpoint::Continue),
        Some(state) => state
            .begin(plan_text, controller.plan(), new_epoch())
            .and_then(|journal| {
                let journaled = controller.journaled_by(&journal);
                let result = journaled.checkpoint_qemu(plan_text, &dir, AfterCheckpoint::Continue);
                if result.is_err() {
                    // Nothing was touched: the journal has no phase yet.
                    let _ = journal.finish("failed_to_start");
                }
                result
            }),
    };
    match result {
        Ok(report) if report.outcome == Outcome::Completed => {
            controller.emit(Event::CheckpointTaken {
                dir: dir.clone(),
                epoch: report.epoch,
                ms: report.total.as_secs_f64() * 1000.0,
                bytes: report.vms.iter().map(|v| v.transferred).sum(),
            });
            if let Ok(all) = checkpoints(&settings.dir) {
                for old in all.iter().skip(settings.keep.max(1)) {
                    let _ = std::fs::remove_dir_all(old);
                }
            }
        }
        Ok(report) => controller.emit(Event::CheckpointFailed {
            error: report
                .errors
                .first()
                .map_or_else(|| report.outcome.as_str().to_owned(), |f| f.message()),
        }),
        Err(e) => controller.emit(Event::CheckpointFailed { error: e.chain() }),
    }
}

/// The VMs whose source no longer runs, each reported as an event.
fn lost_vms(
    controller: &Controller<'_>,
    watched: &mut [Box<dyn VmBackend>],
    poll: Duration,
) -> Vec<String> {
    let mut lost = Vec::new();
    for vm in watched.iter_mut() {
        // A monitor gets a little more than a poll to answer: a busy host is not a dead one.
        let deadline = Instant::now() + poll.max(Duration::from_secs(2));
        if let Err(e) = vm.check_source(deadline) {
            controller.emit(Event::VmLost {
                vm: vm.name().to_owned(),
                error: e.chain(),
            });
            lost.push(vm.name().to_owned());
        }
    }
    lost
}

/// Stops every source still running, then restores the newest checkpoint that restores.
fn recover(
    controller: &Controller<'_>,
    watched: &mut [Box<dyn VmBackend>],
    settings: &GuardSettings,
    lost: Vec<String>,
) -> Result<GuardEnd> {
    let noticed = Instant::now();
    let deadline = noticed + controller.plan().deadlines.rollback;
    for vm in watched.iter_mut() {
        if let Err(e) = vm.stop_source(deadline) {
            // Two copies of a VM must never run: nothing is restored while one may.
            return Err(Error::Vm {
                vm: vm.name().to_owned(),
                phase: "stop the survivors".into(),
                source: Box::new(e),
            });
        }
    }
    let mut last_error = Error::Checkpoint {
        path: settings.dir.clone(),
        problem: "no complete checkpoint to restore".into(),
    };
    for dir in checkpoints(&settings.dir)? {
        let epoch = checkpoint::read_manifest(&dir).map_or(0, |m| m.epoch);
        controller.emit(Event::RestoreStarted {
            dir: dir.clone(),
            epoch,
        });
        let failed = match controller.restore_qemu(&dir, &settings.log_dir) {
            Ok(report) if report.outcome == Outcome::Completed => {
                let took = noticed.elapsed();
                controller.emit(Event::Recovered {
                    dir: dir.clone(),
                    ms: took.as_secs_f64() * 1000.0,
                });
                return Ok(GuardEnd::Recovered {
                    lost,
                    checkpoint: dir,
                    report: Box::new(report),
                    took,
                });
            }
            Ok(report) => Error::Qemu(
                report
                    .errors
                    .first()
                    .map_or_else(|| report.outcome.as_str().to_owned(), |f| f.message()),
            ),
            Err(e) => e,
        };
        controller.emit(Event::RestoreFailed {
            dir: dir.clone(),
            error: failed.chain(),
        });
        last_error = failed;
    }
    Err(last_error)
}
