//! The host controller: runs a migration plan over a whole virtual cluster.
//!
//! Phases, each a barrier over every VM with its own deadline and timing:
//! `connect` (monitors, guest channels, `hello`), `reserve` (destinations started and
//! listening, their devices claimed, before the source lets go of anything), `quiesce`
//! (`prepare` to every guest, wait for every `quiesced`), `detach`, `migrate` (pre-copy of all
//! VMs, at most `max_parallel` at once, each pausing before switchover; then all switch over
//! together), `attach`, `resume` (the new interconnect, through the destination's channel),
//! `commit` (sources released). A failure before `resume` rolls every VM back: migrations
//! cancelled, destinations torn down, sources continued with their original devices, and the
//! guests told to resume on their old interconnect (`abort` if they had not quiesced).
//!
//! The sources stay authoritative until `commit`: they are paused at the switchover, holding
//! the cut every guest quiesced at. So a failure in `resume` (a destination that died after
//! the switchover, a guest that does not see its new interconnect) rolls back too: every
//! destination is torn down, including those whose guests had already resumed, and every
//! source continues from the cut and is told to resume on its old interconnect. The job loses
//! what its ranks did at the destinations since the resume (it is done again at the sources),
//! which is consistent because every rank goes back to the same cut; effects outside the
//! virtual cluster in that window (files on shared storage, say) may happen twice.
//!
//! Events ([`Event`]) go to a sink as they happen, for progress displays and schedulers.

use crate::backend::qemu::{Launcher, QemuVm};
use crate::backend::{MigrationProgress, VmBackend};
use crate::checkpoint::{self, Partial, SavedState, StateFormat};
use crate::cluster::{MigrationSettings, Plan, VmSpec};
use crate::error::{Error, ErrorKind, Result};
use crate::host_channel::HostChannel;
use crate::journal::{Journal, Record};
use crate::protocol::{GuestMessage, HostMessage, Interconnect, PciDevice};
use crate::remote::Connector;
use crate::session::{GuestSession, SessionState};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A phase of a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum Phase {
    /// Monitors, guest channels, `hello`.
    Connect,
    /// Destinations ready, their devices claimed.
    Reserve,
    /// Every guest at its quiescent point.
    Quiesce,
    /// Passthrough devices unplugged at the sources.
    Detach,
    /// Every VM migrated, switched over together.
    Migrate,
    /// Destination devices plugged.
    Attach,
    /// Guests resumed on the new interconnect.
    Resume,
    /// Sources released.
    Commit,
    /// Undoing a failed plan.
    Rollback,
    /// Every VM saved to a file at the cut (a checkpoint).
    Save,
    /// Every VM started from its file (a restore).
    Restore,
}

impl Phase {
    /// Its name.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::Reserve => "reserve",
            Phase::Quiesce => "quiesce",
            Phase::Detach => "detach",
            Phase::Migrate => "migrate",
            Phase::Attach => "attach",
            Phase::Resume => "resume",
            Phase::Commit => "commit",
            Phase::Rollback => "rollback",
            Phase::Save => "save",
            Phase::Restore => "restore",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What happened, as it happens. Serialized as one JSON object with an `event` tag.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// The plan starts.
    PlanStarted {
        /// The VMs, in plan order.
        vms: Vec<String>,
        /// The SymVirt epoch used with the guests.
        epoch: u64,
    },
    /// A phase starts for every VM.
    PhaseStarted {
        /// The phase.
        phase: Phase,
    },
    /// A phase ended for every VM.
    PhaseFinished {
        /// The phase.
        phase: Phase,
        /// How long it took.
        ms: f64,
        /// Whether every VM passed it.
        ok: bool,
    },
    /// One VM moved on within a phase.
    VmProgress {
        /// The VM.
        vm: String,
        /// The phase.
        phase: Phase,
        /// What happened.
        detail: String,
        /// How far, 0 to 1, when known.
        #[serde(skip_serializing_if = "Option::is_none")]
        fraction: Option<f64>,
    },
    /// A guest confirmed `resume`: the interconnect its ranks use now, and (when its agent
    /// reports them) the PCI devices it sees.
    GuestResumed {
        /// The VM.
        vm: String,
        /// `destination`, or `source` after a rollback.
        at: String,
        /// The interconnect as the guest confirmed it (with the interface it found).
        interconnect: Interconnect,
        /// The guest's PCI devices.
        #[serde(skip_serializing_if = "Option::is_none")]
        pci_devices: Option<Vec<PciDevice>>,
    },
    /// One VM failed in a phase.
    VmError {
        /// The VM.
        vm: String,
        /// The phase.
        phase: Phase,
        /// What kind of failure.
        kind: ErrorKind,
        /// The error and its causes.
        error: String,
    },
    /// The plan is being rolled back.
    RollbackStarted {
        /// The phase that failed.
        failed_phase: Phase,
    },
    /// The rollback ended.
    RollbackFinished {
        /// How long it took.
        ms: f64,
        /// Whether every VM was restored.
        ok: bool,
    },
    /// A recovery of an interrupted run starts ([`Controller::recover`]).
    RecoveryStarted {
        /// The interrupted run.
        run: String,
        /// Its VMs.
        vms: Vec<String>,
        /// The phase it had entered last.
        #[serde(skip_serializing_if = "Option::is_none")]
        interrupted_in: Option<Phase>,
        /// Whether it had decided to keep the destinations (the recovery rolls forward).
        forward: bool,
        /// What the recovery does, and why.
        why: String,
    },
    /// A guard's checkpoint is complete ([`crate::guard`]).
    CheckpointTaken {
        /// Its directory.
        dir: std::path::PathBuf,
        /// The cut's epoch.
        epoch: u64,
        /// How long the job was held (the checkpoint's run, connect to resume), ms.
        ms: f64,
        /// Bytes of VM state written.
        bytes: u64,
    },
    /// A guard's checkpoint failed; the job goes on and the older checkpoints are kept.
    CheckpointFailed {
        /// Why.
        error: String,
    },
    /// A guard found a VM gone at its source.
    VmLost {
        /// The VM.
        vm: String,
        /// What the guard saw.
        error: String,
    },
    /// A guard restores the cluster from a checkpoint.
    RestoreStarted {
        /// The checkpoint.
        dir: std::path::PathBuf,
        /// Its cut's epoch.
        epoch: u64,
    },
    /// A checkpoint could not be restored; the guard goes on with the one before it.
    RestoreFailed {
        /// The checkpoint.
        dir: std::path::PathBuf,
        /// Why.
        error: String,
    },
    /// The cluster runs again, restored by a guard.
    Recovered {
        /// The checkpoint it came from.
        dir: std::path::PathBuf,
        /// From the loss being noticed to every guest resumed, ms.
        ms: f64,
    },
    /// The plan ended.
    PlanFinished {
        /// `completed`, `rolled_back` or `failed`.
        outcome: String,
        /// Total wall time.
        total_ms: f64,
    },
}

/// One failure of a run: which VM (none: the run as a whole, e.g. its journal), in which
/// phase, what kind, and the error with its causes.
#[derive(Debug, Clone)]
pub struct Failure {
    /// The VM, if one VM failed.
    pub vm: Option<String>,
    /// The phase it failed in.
    pub phase: Phase,
    /// What kind of failure.
    pub kind: ErrorKind,
    /// The error (shared: a report is cloned, an error is not).
    pub source: Arc<Error>,
}

impl Failure {
    fn new(vm: Option<&str>, phase: Phase, error: Error) -> Failure {
        Failure {
            vm: vm.map(str::to_owned),
            phase,
            kind: error.kind(),
            source: Arc::new(error),
        }
    }

    /// The error's message and its causes.
    pub fn message(&self) -> String {
        self.source.chain()
    }
}

impl PartialEq for Failure {
    fn eq(&self, other: &Failure) -> bool {
        (&self.vm, self.phase, self.kind, self.message())
            == (&other.vm, other.phase, other.kind, other.message())
    }
}

impl std::fmt::Display for Failure {
    /// `vm0: quiesce: the guest did not quiesce within 5000 ms`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if let Some(vm) = &self.vm {
            write!(f, "{vm}: ")?;
        }
        write!(f, "{}: {}", self.phase, self.message())
    }
}

/// How a plan ended.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Outcome {
    /// Every VM runs at its destination, resumed on its new interconnect.
    Completed,
    /// The plan failed in `phase` and every VM was restored at its source.
    RolledBack {
        /// The phase that failed.
        phase: Phase,
        /// The first failure.
        error: Failure,
    },
    /// The plan failed and could not be fully undone: see the errors.
    Failed {
        /// The phase that failed.
        phase: Phase,
        /// The first failure.
        error: Failure,
    },
}

impl Outcome {
    /// `completed`, `rolled_back` or `failed`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Completed => "completed",
            Outcome::RolledBack { .. } => "rolled_back",
            Outcome::Failed { .. } => "failed",
        }
    }
}

/// What the guest was told when the plan ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum GuestNotice {
    /// Nothing (it was never reached).
    Nothing,
    /// `resume` with this interconnect, and the guest answered `resumed`.
    Resumed {
        /// The interconnect the guest confirmed (with the interface it found).
        interconnect: Interconnect,
        /// The PCI devices the guest reported.
        pci_devices: Option<Vec<PciDevice>>,
    },
    /// `resume` sent but not confirmed.
    ResumeUnconfirmed(String),
    /// `abort` (the guest had not quiesced).
    Aborted,
}

/// One VM's part of a [`Report`].
#[derive(Debug, Clone, PartialEq)]
pub struct VmReport {
    /// The VM.
    pub name: String,
    /// What its guest was told last.
    pub guest: GuestNotice,
    /// Migration time (VMM's count), ms.
    pub migration_ms: Option<u64>,
    /// Downtime, ms.
    pub downtime_ms: Option<u64>,
    /// Bytes migrated.
    pub transferred: u64,
    /// The destination process the controller started (now the VM, if completed).
    pub destination_pid: Option<u32>,
}

/// How a plan went.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// The SymVirt epoch.
    pub epoch: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// Each phase that ran and how long it took, in order.
    pub phases: Vec<(Phase, Duration)>,
    /// Per VM, in plan order.
    pub vms: Vec<VmReport>,
    /// Every failure, with its VM, phase and kind (the first one failed the run).
    pub errors: Vec<Failure>,
    /// Total wall time.
    pub total: Duration,
}

impl Report {
    /// The duration of `phase`, if it ran.
    pub fn phase(&self, phase: Phase) -> Option<Duration> {
        self.phases
            .iter()
            .find(|(p, _)| *p == phase)
            .map(|(_, d)| *d)
    }
}

/// One VM during a run.
struct Member {
    backend: Box<dyn VmBackend>,
    channel: Option<HostChannel>,
    report: VmReport,
    source_interconnect: Interconnect,
    target_interconnect: Interconnect,
    /// The guest session as it was at the source when the channel moved to the destination:
    /// where a rollback picks the guest up again.
    source_session: Option<GuestSession>,
    /// How a checkpoint saved this VM.
    saved: Option<SavedState>,
    /// It quiesces with the others but does not move ([`Controller::staying`]).
    stays: bool,
}

/// A counting semaphore for the migration concurrency limit.
struct Slots {
    free: Mutex<usize>,
    cv: Condvar,
}

impl Slots {
    fn acquire(&self, deadline: Instant) -> Result<SlotGuard<'_>> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout);
            }
            free = self
                .cv
                .wait_timeout(free, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        *free -= 1;
        Ok(SlotGuard(self))
    }
}

struct SlotGuard<'a>(&'a Slots);

impl Drop for SlotGuard<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.cv.notify_one();
    }
}

/// Where events go. Called from the controller's worker threads.
pub type EventSink<'a> = &'a (dyn Fn(&Event) + Sync);

/// What a checkpoint does with the job once every VM is saved.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AfterCheckpoint {
    /// The job goes on where it is, with its devices.
    #[default]
    Continue,
    /// Every VM is stopped (its QEMU ends): the checkpoint is the job now.
    Stop,
}

/// Runs plans.
pub struct Controller<'a> {
    plan: Plan,
    sink: EventSink<'a>,
    journal: Option<&'a Journal>,
    interrupt: Option<&'a AtomicBool>,
    staying: Vec<String>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A SymVirt epoch for a new plan: the wall clock in ms, so that epochs keep increasing across
/// plans run by different controller processes (an agent ignores an epoch it has seen).
pub fn new_epoch() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(1)
        .max(1)
}

impl<'a> Controller<'a> {
    /// A controller for `plan`, reporting to `sink`.
    pub fn new(plan: Plan, sink: EventSink<'a>) -> Controller<'a> {
        Controller {
            plan,
            sink,
            journal: None,
            interrupt: None,
            staying: Vec::new(),
        }
    }

    /// VMs of the plan that take part in the cut but stay where they are: they quiesce with
    /// the others and are resumed at their source, on their interconnect, once the others
    /// run at their destinations. Evacuating one host moves its VMs and keeps the rest.
    pub fn staying(mut self, vms: impl IntoIterator<Item = String>) -> Controller<'a> {
        self.staying = vms.into_iter().collect();
        self
    }

    /// Records the run in `journal` (see [`crate::journal`]) before each irreversible step:
    /// the phase entered, the destinations started, the decision to keep the destinations,
    /// the end. The run uses the journal's epoch. A journal that cannot be written stops the
    /// run before the step (and rolls back what was done).
    pub fn journaled(mut self, journal: &'a Journal) -> Controller<'a> {
        self.journal = Some(journal);
        self
    }

    /// The same controller, journaling into `journal` (a guard journals each checkpoint).
    pub fn journaled_by<'b>(&'b self, journal: &'b Journal) -> Controller<'b> {
        Controller {
            plan: self.plan.clone(),
            sink: self.sink,
            journal: Some(journal),
            interrupt: self.interrupt,
            staying: self.staying.clone(),
        }
    }

    /// Watches `flag` (set by a SIGINT or SIGTERM handler): once set, the run stops at the
    /// next phase, or within a quarter second while migrating, and rolls back. After the
    /// decision to keep the destinations the run finishes instead: that is the quicker way to
    /// one copy of every VM.
    pub fn interruptible(mut self, flag: &'a AtomicBool) -> Controller<'a> {
        self.interrupt = Some(flag);
        self
    }

    pub(crate) fn interrupted(&self) -> bool {
        self.interrupt.is_some_and(|f| f.load(Ordering::SeqCst))
    }

    fn record(&self, change: impl FnOnce(&mut Record)) -> Result<()> {
        match self.journal {
            Some(j) => j
                .update(change)
                .map_err(|e| Error::Refused(format!("cannot write the journal: {}", e.chain()))),
            None => Ok(()),
        }
    }

    /// Before `phase`: stops if interrupted, else journals that the run enters it.
    fn enter(&self, phase: Phase) -> Result<()> {
        if self.interrupted() {
            return Err(Error::Interrupted);
        }
        self.record(|r| r.phase = Some(phase))
    }

    /// Runs the plan on its VMs' backends: QEMU over QMP, or libvirt for a VM that is a
    /// libvirt domain (feature `libvirt`); destination QEMUs the run starts log into `log_dir`.
    pub fn run_qemu(&self, log_dir: &std::path::Path) -> Result<Report> {
        let forwards = self.journal.map(Journal::forward_dir);
        self.run(self.plan_backends(log_dir, forwards)?)
    }

    /// One backend per VM of the plan: a libvirt domain's is [`crate::backend::libvirt`]
    /// (feature `libvirt`), every other's is QEMU over QMP; ssh forwards in `forward_dir`
    /// (default: a fresh temporary directory).
    pub(crate) fn plan_backends(
        &self,
        log_dir: &std::path::Path,
        forward_dir: Option<std::path::PathBuf>,
    ) -> Result<Vec<Box<dyn VmBackend>>> {
        let ssh = self.plan.ssh_program.clone();
        let connector = Arc::new(match forward_dir {
            Some(dir) => Connector::in_dir(ssh, dir)?,
            None => Connector::new(ssh)?,
        });
        let launcher = Launcher {
            ssh_program: self.plan.ssh_program.clone(),
            log_dir: log_dir.to_owned(),
        };
        let backends: Vec<Box<dyn VmBackend>> = self
            .plan
            .vms
            .iter()
            .map(|vm| {
                if vm.source.libvirt.is_some() {
                    return libvirt_backend(vm, self.plan.migration, self.plan.tls.is_some());
                }
                let qemu = QemuVm::new(
                    vm.clone(),
                    self.plan.migration,
                    connector.clone(),
                    launcher.clone(),
                );
                Ok(Box::new(qemu.with_tls(self.plan.tls.clone())) as Box<dyn VmBackend>)
            })
            .collect::<Result<_>>()?;
        Ok(backends)
    }

    /// One member per VM, in plan order; exactly one backend per VM.
    fn members(&self, backends: Vec<Box<dyn VmBackend>>) -> Result<Vec<Member>> {
        if backends.len() != self.plan.vms.len() {
            return Err(Error::Config(format!(
                "{} backends for the plan's {} VMs",
                backends.len(),
                self.plan.vms.len()
            )));
        }
        if let Some(unknown) = self
            .staying
            .iter()
            .find(|s| !self.plan.vms.iter().any(|v| &v.name == *s))
        {
            return Err(Error::Config(format!(
                "{unknown:?} is to stay, but the plan has no such VM"
            )));
        }
        Ok(backends
            .into_iter()
            .zip(&self.plan.vms)
            .map(|(backend, spec)| Member {
                report: VmReport {
                    name: spec.name.clone(),
                    guest: GuestNotice::Nothing,
                    migration_ms: None,
                    downtime_ms: None,
                    transferred: 0,
                    destination_pid: None,
                },
                backend,
                channel: None,
                source_interconnect: spec.source.interconnect.clone(),
                target_interconnect: spec.destination.interconnect.clone(),
                source_session: None,
                saved: None,
                stays: self.staying.contains(&spec.name),
            })
            .collect())
    }

    /// The plan it runs.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub(crate) fn emit(&self, event: Event) {
        (self.sink)(&event);
    }

    /// Runs the plan with one backend per VM (in plan order). `Err` only when the backends
    /// do not match the plan (nothing was done); how the run went is in the report.
    pub fn run(&self, backends: Vec<Box<dyn VmBackend>>) -> Result<Report> {
        let started = Instant::now();
        let epoch = self.journal.map_or_else(new_epoch, |j| j.record().epoch);
        let mut members = self.members(backends)?;
        self.emit(Event::PlanStarted {
            vms: members.iter().map(|m| m.report.name.clone()).collect(),
            epoch,
        });
        let mut phases = Vec::new();
        let mut errors = Vec::new();
        let d = self.plan.deadlines;
        let steps: [(Phase, Duration); 6] = [
            (Phase::Connect, d.connect),
            (Phase::Reserve, d.reserve),
            (Phase::Quiesce, d.quiesce),
            (Phase::Detach, d.detach),
            (Phase::Migrate, d.migrate),
            (Phase::Attach, d.attach),
        ];
        let mut failed: Option<Failure> = None;
        if !self.staying.is_empty() {
            if let Err(e) = self.record(|r| r.staying = self.staying.clone()) {
                failed = Some(Failure::new(None, Phase::Connect, e));
            }
        }
        for (phase, limit) in steps {
            if failed.is_some() {
                break;
            }
            if let Err(e) = self.enter(phase) {
                failed = Some(Failure::new(None, phase, e));
                break;
            }
            let deadline = Instant::now() + limit;
            let errs = if phase == Phase::Migrate {
                let t = Instant::now();
                let errs = self.migrate(&mut members, deadline);
                self.emit(Event::PhaseFinished {
                    phase,
                    ms: ms(t.elapsed()),
                    ok: errs.is_empty(),
                });
                phases.push((phase, t.elapsed()));
                errs
            } else {
                let (took, errs) = self.phase(phase, &mut members, |c, m| match phase {
                    Phase::Connect => c.connect(m, deadline),
                    Phase::Quiesce => c.quiesce(m, epoch, limit, deadline),
                    _ if m.stays => Ok(()),
                    Phase::Reserve => m.backend.reserve(deadline),
                    Phase::Detach => m.backend.detach(deadline),
                    _ => m.backend.attach(deadline),
                });
                phases.push((phase, took));
                errs
            };
            if let Some(first) = errs.first() {
                failed = Some(first.clone());
                errors.extend(errs);
                break;
            }
            if phase == Phase::Reserve {
                let left = members.iter().map(|m| m.backend.leftovers()).collect();
                if let Err(e) = self.record(|r| r.leftovers = left) {
                    failed = Some(Failure::new(None, phase, e));
                    break;
                }
            }
        }
        if failed.is_none() {
            if let Err(e) = self.enter(Phase::Resume) {
                failed = Some(Failure::new(None, Phase::Resume, e));
            }
        }
        if failed.is_none() {
            let deadline = Instant::now() + d.resume;
            let (took, errs) = self.phase(Phase::Resume, &mut members, |c, m| {
                if m.stays {
                    c.resume_at_source(m, epoch, deadline)
                } else {
                    c.resume_at_destination(m, epoch, deadline)
                }
            });
            phases.push((Phase::Resume, took));
            if let Some(first) = errs.first() {
                failed = Some(first.clone());
                errors.extend(errs);
            }
        }
        // The decision: from here on the destinations are the VMs. Journaled first; a run
        // interrupted before it rolls back.
        if failed.is_none() {
            let decided = if self.interrupted() {
                Err(Error::Interrupted)
            } else {
                self.record(|r| {
                    r.forward = true;
                    r.phase = Some(Phase::Commit);
                })
            };
            if let Err(e) = decided {
                failed = Some(Failure::new(None, Phase::Commit, e));
            }
        }
        let outcome = self.settled(failed, &mut members, &mut phases, &mut errors);
        self.close_journal(&outcome, &mut errors);
        Ok(self.finished(epoch, outcome, phases, members, errors, started))
    }

    /// Announces the end and puts the report together.
    fn finished(
        &self,
        epoch: u64,
        outcome: Outcome,
        phases: Vec<(Phase, Duration)>,
        members: Vec<Member>,
        errors: Vec<Failure>,
        started: Instant,
    ) -> Report {
        let total = started.elapsed();
        self.emit(Event::PlanFinished {
            outcome: outcome.as_str().into(),
            total_ms: ms(total),
        });
        Report {
            epoch,
            outcome,
            phases,
            vms: members.into_iter().map(|m| m.report).collect(),
            errors,
            total,
        }
    }

    /// Recovers the interrupted run of `journal` (whose plan this controller has) on QEMU
    /// backends; QEMUs it starts log into `log_dir`.
    pub fn recover_qemu(&self, journal: &Journal, log_dir: &std::path::Path) -> Result<Report> {
        // The dead run's ssh forwards would hold its sockets: end them, and reuse the place.
        let forwards = journal.forward_dir();
        crate::remote::clear_forwards(&forwards, Instant::now() + self.plan.deadlines.connect)?;
        self.recover(journal, self.plan_backends(log_dir, Some(forwards))?)
    }

    /// Brings every VM of the interrupted run that `journal` records to exactly one running
    /// copy, with its devices, and its guest released. Before the run's decision to keep the
    /// destinations it rolls back: migrations cancelled, destinations stopped and verified gone
    /// (a destination that still answers keeps its source paused), sources continued with
    /// their devices, guests told `abort` (interrupted in quiesce) or `resume` on their old
    /// interconnect. After the decision it rolls forward: destinations checked running and
    /// given their devices, sources stopped and verified gone, guests told `resume` on the new
    /// interconnect (an agent that had done so says `resumed` again). The journal is closed
    /// when every VM is settled; otherwise it stays, for another attempt. `Err` only when the
    /// backends do not match the plan.
    pub fn recover(&self, journal: &Journal, backends: Vec<Box<dyn VmBackend>>) -> Result<Report> {
        let started = Instant::now();
        let record = journal.record();
        let epoch = record.epoch;
        let reached = record.phase;
        let forward = record.forward;
        let mut members = self.members(backends)?;
        let why = match reached {
            None => "before its first phase".to_owned(),
            Some(p) => format!("in {p}"),
        };
        self.emit(Event::RecoveryStarted {
            run: record.run.clone(),
            vms: record.vms.clone(),
            interrupted_in: reached,
            forward,
            why: if let Some(dir) = &record.checkpoint {
                if forward {
                    format!(
                        "the checkpoint into {dir} was interrupted {why}, complete, before the \
                         sources were stopped: stopping them"
                    )
                } else {
                    format!(
                        "the checkpoint into {dir} was interrupted {why}: the sources are the \
                         VMs, continuing them with their devices"
                    )
                }
            } else if forward {
                format!(
                    "the run was interrupted {why}, after it decided to keep the destinations: \
                     finishing it"
                )
            } else {
                format!(
                    "the run was interrupted {why}, before it decided to keep the destinations: \
                     the sources are the VMs, rolling back"
                )
            },
        });
        let deadline = Instant::now() + self.plan.deadlines.rollback;
        let phase = if forward {
            Phase::Commit
        } else {
            Phase::Rollback
        };
        let left = record.leftovers.clone();
        let checkpoint = record.checkpoint.is_some();
        let (took, errors) = self.phase(phase, &mut members, |c, m| {
            let index = c.plan.vms.iter().position(|v| v.name == m.report.name);
            let mut leftovers = index.and_then(|i| left.get(i)).cloned().unwrap_or_default();
            let stays = record.staying.contains(&m.report.name);
            leftovers.source_only |= checkpoint || stays;
            m.backend.adopt(&leftovers, deadline)?;
            if forward && checkpoint {
                // A complete checkpoint of a job that was to stop: the sources end.
                return m.backend.stop_source(deadline);
            }
            // A VM that stays never had a destination: it goes on at its source either way.
            if forward && !stays {
                m.backend.roll_forward(deadline)?;
                let channel = open_channel(m, Some(GuestSession::quiesced(epoch)), true, deadline)?;
                let told = tell_resume(&channel, epoch, m.target_interconnect.clone(), deadline);
                m.channel = Some(channel);
                c.note_resume(m, "destination", told)
            } else {
                m.backend.rollback(deadline)?;
                if reached.is_none_or(|p| p < Phase::Quiesce) {
                    return Ok(()); // no prepare was sent: the guest runs on
                }
                let channel =
                    open_channel(m, Some(GuestSession::quiesced(epoch)), false, deadline)?;
                let told = if reached == Some(Phase::Quiesce) {
                    // Devices untouched; ranks quiesced or on their way: abort the epoch.
                    send_when_connected(&channel, &HostMessage::Abort { epoch }, deadline)
                        .map(|()| GuestNotice::Aborted)
                } else {
                    tell_resume(&channel, epoch, m.source_interconnect.clone(), deadline)
                };
                m.channel = Some(channel);
                c.note_resume(m, "source", told)
            }
        });
        let outcome = match errors.first() {
            Some(e) => Outcome::Failed {
                phase,
                error: e.clone(),
            },
            None if forward => Outcome::Completed,
            None => Outcome::RolledBack {
                phase: reached.unwrap_or(Phase::Connect),
                error: Failure::new(
                    None,
                    reached.unwrap_or(Phase::Connect),
                    Error::RunInterrupted(format!("recovered: the run was interrupted {why}")),
                ),
            },
        };
        let mut errors = errors;
        if errors.is_empty() {
            if let Err(e) = journal.finish(&format!("recovered_{}", outcome.as_str())) {
                errors.push(Failure::new(None, phase, e));
            }
        }
        Ok(self.finished(
            epoch,
            outcome,
            vec![(phase, took)],
            members,
            errors,
            started,
        ))
    }

    /// Checkpoints the virtual cluster on QEMU backends: see [`Controller::checkpoint`].
    pub fn checkpoint_qemu(
        &self,
        plan_text: &str,
        to: &std::path::Path,
        after: AfterCheckpoint,
    ) -> Result<Report> {
        let backends = self.plan_backends(&std::env::temp_dir(), None)?;
        self.checkpoint(backends, plan_text, to, after)
    }

    /// Checkpoints the virtual cluster at the plan's sources into the directory `to` (see
    /// [`crate::checkpoint`]): `connect`, `quiesce` (one cut for every guest), `detach`,
    /// `save` (every VM stopped and written to its file, then the manifest, the checkpoint
    /// moved to `to`), then `resume` (sources continued with their devices, guests resumed on
    /// the interconnect they had) or, with [`AfterCheckpoint::Stop`], `commit` (sources
    /// stopped). The outcome is `Completed` when `to` holds a complete checkpoint; any failure
    /// before that rolls back as a plan does (the job goes on where it was, with its devices)
    /// and leaves nothing at `to`. `plan_text` is stored in the manifest. `Err` only when
    /// nothing was done (the backends do not match the plan, `to` exists).
    pub fn checkpoint(
        &self,
        backends: Vec<Box<dyn VmBackend>>,
        plan_text: &str,
        to: &std::path::Path,
        after: AfterCheckpoint,
    ) -> Result<Report> {
        let started = Instant::now();
        let epoch = self.journal.map_or_else(new_epoch, |j| j.record().epoch);
        let mut members = self.members(backends)?;
        let partial = Partial::begin(to)?;
        self.emit(Event::PlanStarted {
            vms: members.iter().map(|m| m.report.name.clone()).collect(),
            epoch,
        });
        let d = self.plan.deadlines;
        let mut phases = Vec::new();
        let mut errors = Vec::new();
        let steps = [
            (Phase::Connect, d.connect),
            (Phase::Quiesce, d.quiesce),
            (Phase::Detach, d.detach),
            (Phase::Save, d.migrate),
        ];
        let step = |c: &Self, m: &mut Member, phase, limit, deadline| match phase {
            Phase::Connect => c.connect(m, deadline),
            Phase::Quiesce => c.quiesce(m, epoch, limit, deadline),
            Phase::Detach => m.backend.detach(deadline),
            _ => {
                let path = partial.state_path(&m.report.name);
                let t = Instant::now();
                let saved = m.backend.save(&path, deadline)?;
                m.report.migration_ms = Some(t.elapsed().as_millis() as u64);
                let disks = saved.disks.iter().map(|d| path.with_file_name(&d.file));
                m.report.transferred = std::iter::once(path.clone())
                    .chain(disks)
                    .map(|p| std::fs::metadata(p).map_or(0, |f| f.len()))
                    .sum();
                m.saved = Some(saved);
                Ok(())
            }
        };
        let target = to.display().to_string();
        let mut failed = self
            .record(|r| r.checkpoint = Some(target))
            .err()
            .map(|e| Failure::new(None, Phase::Connect, e));
        if failed.is_none() {
            failed = self.run_steps(&mut members, &steps, step, &mut phases, &mut errors);
        }
        if failed.is_none() {
            let vms = members
                .iter()
                .map(|m| {
                    (
                        m.report.name.clone(),
                        m.saved.clone().unwrap_or_else(|| SavedState {
                            format: StateFormat {
                                writer: String::new(),
                                capabilities: Vec::new(),
                            },
                            disks: Vec::new(),
                        }),
                        m.source_interconnect.clone(),
                    )
                })
                .collect();
            if let Err(e) = partial.complete(epoch, plan_text, vms) {
                failed = Some(Failure::new(None, Phase::Save, e));
            }
        } else {
            drop(partial);
        }
        // The checkpoint is complete: a recovery goes on to what was asked, stopping the
        // sources (the decision) or letting them run.
        if failed.is_none() {
            let decided = self.record(|r| match after {
                AfterCheckpoint::Stop => {
                    r.forward = true;
                    r.phase = Some(Phase::Commit);
                }
                AfterCheckpoint::Continue => r.phase = Some(Phase::Resume),
            });
            if let Err(e) = decided {
                failed = Some(Failure::new(None, Phase::Save, e));
            }
        }
        let outcome = match failed {
            Some(error) => self.rolled_back(error, &mut members, &mut phases, &mut errors),
            None => {
                let (phase, result) = match after {
                    AfterCheckpoint::Continue => {
                        let deadline = Instant::now() + d.resume;
                        (
                            Phase::Resume,
                            self.phase(Phase::Resume, &mut members, |c, m| {
                                c.back_at_source(m, deadline)
                            }),
                        )
                    }
                    AfterCheckpoint::Stop => (
                        Phase::Commit,
                        self.phase(Phase::Commit, &mut members, |_, m| {
                            m.channel = None;
                            m.backend.commit()
                        }),
                    ),
                };
                let (took, errs) = result;
                phases.push((phase, took));
                // The checkpoint is complete either way; a job that did not go on is failed.
                let outcome = match errs.first() {
                    Some(first) if phase == Phase::Resume => Outcome::Failed {
                        phase,
                        error: first.clone(),
                    },
                    _ => Outcome::Completed,
                };
                errors.extend(errs);
                outcome
            }
        };
        self.close_journal(&outcome, &mut errors);
        Ok(self.finished(epoch, outcome, phases, members, errors, started))
    }

    /// Runs `steps` in order, each a phase over every member with its own deadline, until one
    /// fails or the run is interrupted: that failure (every VM's is in `errors`).
    fn run_steps(
        &self,
        members: &mut [Member],
        steps: &[(Phase, Duration)],
        step: impl Fn(&Self, &mut Member, Phase, Duration, Instant) -> Result<()> + Sync,
        phases: &mut Vec<(Phase, Duration)>,
        errors: &mut Vec<Failure>,
    ) -> Option<Failure> {
        for &(phase, limit) in steps {
            if let Err(e) = self.enter(phase) {
                return Some(Failure::new(None, phase, e));
            }
            let deadline = Instant::now() + limit;
            let (took, errs) =
                self.phase(phase, members, |c, m| step(c, m, phase, limit, deadline));
            phases.push((phase, took));
            if let Some(first) = errs.first().cloned() {
                errors.extend(errs);
                return Some(first);
            }
        }
        None
    }

    /// The end of a run or a restore: after `failed`, every member rolled back; else every VM
    /// committed where it runs now (a VM that stays keeps its source as it is).
    fn settled(
        &self,
        failed: Option<Failure>,
        members: &mut [Member],
        phases: &mut Vec<(Phase, Duration)>,
        errors: &mut Vec<Failure>,
    ) -> Outcome {
        for m in members.iter_mut() {
            m.report.destination_pid = m.backend.destination_pid();
        }
        if let Some(error) = failed {
            return self.rolled_back(error, members, phases, errors);
        }
        let (took, errs) = self.phase(Phase::Commit, members, |_, m| {
            m.channel = None;
            if m.stays {
                return Ok(());
            }
            m.backend.commit()
        });
        phases.push((Phase::Commit, took));
        // A source that did not quit cleanly is only noted: the VM is moved.
        errors.extend(errs);
        Outcome::Completed
    }

    /// Rolls every member back after `error` (added to `errors` when it is the run's own, not
    /// a VM's, which is there already); the outcome says whether that worked.
    fn rolled_back(
        &self,
        error: Failure,
        members: &mut [Member],
        phases: &mut Vec<(Phase, Duration)>,
        errors: &mut Vec<Failure>,
    ) -> Outcome {
        if error.vm.is_none() {
            errors.push(error.clone());
        }
        let phase = error.phase;
        let t = Instant::now();
        self.emit(Event::RollbackStarted {
            failed_phase: phase,
        });
        let rollback_errors = self.rollback(members);
        let ok = rollback_errors.is_empty();
        self.emit(Event::RollbackFinished {
            ms: ms(t.elapsed()),
            ok,
        });
        phases.push((Phase::Rollback, t.elapsed()));
        errors.extend(rollback_errors);
        if ok {
            Outcome::RolledBack { phase, error }
        } else {
            Outcome::Failed { phase, error }
        }
    }

    /// Restores a checkpoint on QEMU backends: see [`Controller::restore`]. QEMUs it starts
    /// log into `log_dir`.
    pub fn restore_qemu(
        &self,
        from: &std::path::Path,
        log_dir: &std::path::Path,
    ) -> Result<Report> {
        self.restore(self.plan_backends(log_dir, None)?, from)
    }

    /// Brings the virtual cluster checkpointed in `from` back at the plan's destinations
    /// (which may have another interconnect than the checkpoint's): `restore` (every VM
    /// started from its file), `attach`, `resume` (every guest resumed from the cut, on the
    /// destination's interconnect), `commit`. Any failure tears every restored VM down
    /// (outcome `RolledBack`: nothing runs). `Err` when nothing was started: the checkpoint
    /// is damaged or incomplete, or holds other VMs than the plan
    /// ([`Error::Checkpoint`]), or the backends do not match the plan.
    pub fn restore(
        &self,
        backends: Vec<Box<dyn VmBackend>>,
        from: &std::path::Path,
    ) -> Result<Report> {
        let started = Instant::now();
        let manifest = checkpoint::read(from)?;
        let theirs: Vec<&str> = manifest.vms.iter().map(|v| v.name.as_str()).collect();
        let ours: Vec<&str> = self.plan.vms.iter().map(|v| v.name.as_str()).collect();
        if theirs != ours {
            return Err(Error::Checkpoint {
                path: from.join(checkpoint::MANIFEST),
                problem: format!("holds the VMs {theirs:?}, the plan has {ours:?}"),
            });
        }
        let epoch = manifest.epoch;
        let mut members = self.members(backends)?;
        self.emit(Event::PlanStarted {
            vms: ours.iter().map(|v| v.to_string()).collect(),
            epoch,
        });
        let d = self.plan.deadlines;
        let mut phases = Vec::new();
        let mut errors = Vec::new();
        let steps = [
            (Phase::Restore, d.migrate),
            (Phase::Attach, d.attach),
            (Phase::Resume, d.resume),
        ];
        let step = |c: &Self, m: &mut Member, phase, _limit, deadline| match phase {
            Phase::Restore => {
                let saved = manifest
                    .vms
                    .iter()
                    .find(|v| v.name == m.report.name)
                    .ok_or_else(|| Error::Internal("a VM without its state".into()))?;
                let t = Instant::now();
                // The disks as they were at the cut, before the VM opens them.
                for disk in &saved.disks {
                    checkpoint::write_back(from, disk)?;
                }
                m.backend
                    .restore(&saved.format, &from.join(&saved.file), deadline)?;
                m.report.migration_ms = Some(t.elapsed().as_millis() as u64);
                m.report.transferred =
                    saved.bytes + saved.disks.iter().map(|d| d.bytes).sum::<u64>();
                Ok(())
            }
            Phase::Attach => m.backend.attach(deadline),
            _ => {
                let session = GuestSession::quiesced(epoch);
                let channel = open_channel(m, Some(session), true, deadline)?;
                let result = tell_resume(&channel, epoch, m.target_interconnect.clone(), deadline);
                m.channel = Some(channel);
                c.note_resume(m, "destination", result)
            }
        };
        let failed = self.run_steps(&mut members, &steps, step, &mut phases, &mut errors);
        let outcome = self.settled(failed, &mut members, &mut phases, &mut errors);
        Ok(self.finished(epoch, outcome, phases, members, errors, started))
    }

    /// Marks the journal finished, unless the run left something to recover (a rollback that
    /// did not complete).
    fn close_journal(&self, outcome: &Outcome, errors: &mut Vec<Failure>) {
        let Some(journal) = self.journal else {
            return;
        };
        let (phase, closed) = match outcome {
            Outcome::Failed { .. } => (
                Phase::Rollback,
                journal.update(|r| r.phase = Some(Phase::Rollback)),
            ),
            Outcome::Completed => (Phase::Commit, journal.finish(outcome.as_str())),
            _ => (Phase::Rollback, journal.finish(outcome.as_str())),
        };
        if let Err(e) = closed {
            errors.push(Failure::new(None, phase, e));
        }
    }

    /// Runs `step` for every member in parallel; returns the phase's time and its errors.
    fn phase(
        &self,
        phase: Phase,
        members: &mut [Member],
        step: impl Fn(&Self, &mut Member) -> Result<()> + Sync,
    ) -> (Duration, Vec<Failure>) {
        let t = Instant::now();
        self.emit(Event::PhaseStarted { phase });
        let errors = self.each(phase, members, |m| step(self, m));
        let took = t.elapsed();
        self.emit(Event::PhaseFinished {
            phase,
            ms: ms(took),
            ok: errors.is_empty(),
        });
        (took, errors)
    }

    /// `f` on every member in its own thread; errors reported as events and returned.
    fn each(
        &self,
        phase: Phase,
        members: &mut [Member],
        f: impl Fn(&mut Member) -> Result<()> + Sync,
    ) -> Vec<Failure> {
        let results: Vec<(String, Result<()>)> = std::thread::scope(|s| {
            let handles: Vec<_> = members
                .iter_mut()
                .map(|m| {
                    let f = &f;
                    s.spawn(move || {
                        let name = m.report.name.clone();
                        let r = f(m);
                        (name, r)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        (
                            "?".into(),
                            Err(Error::Internal(format!("a {phase} thread panicked"))),
                        )
                    })
                })
                .collect()
        });
        let mut errors = Vec::new();
        for (vm, r) in results {
            match r {
                Ok(()) => self.emit(Event::VmProgress {
                    vm,
                    phase,
                    detail: "done".into(),
                    fraction: Some(1.0),
                }),
                Err(e) => {
                    let failure = Failure::new(Some(&vm), phase, e);
                    self.emit(Event::VmError {
                        vm,
                        phase,
                        kind: failure.kind,
                        error: failure.message(),
                    });
                    errors.push(failure);
                }
            }
        }
        errors
    }

    fn connect(&self, m: &mut Member, deadline: Instant) -> Result<()> {
        // The channel asks the agent for its hello on connecting (see `crate::protocol`), so a
        // connection the agent did not see open is answered too.
        m.channel = Some(open_channel(m, None, false, deadline)?);
        Ok(())
    }

    fn quiesce(
        &self,
        m: &mut Member,
        epoch: u64,
        limit: Duration,
        deadline: Instant,
    ) -> Result<()> {
        let channel = m.channel.as_ref().ok_or(Error::NotConnected)?;
        channel.send(&HostMessage::Prepare {
            epoch,
            deadline_ms: limit.as_millis() as u64,
        })?;
        let reply = channel
            .wait_for(
                |g| {
                    matches!(
                        g,
                        GuestMessage::Quiesced { .. } | GuestMessage::Failed { .. }
                    )
                },
                deadline,
            )
            .map_err(|e| match e {
                Error::Timeout => Error::Deadline(format!(
                    "the guest did not quiesce within {} ms",
                    limit.as_millis()
                )),
                e => e,
            })?;
        match reply {
            GuestMessage::Failed { reason, .. } => {
                Err(Error::Guest(format!("the guest cannot quiesce: {reason}")))
            }
            _ => Ok(()),
        }
    }

    /// Pre-copy of every VM (at most `max_parallel` at once, each holding its slot until it is
    /// ready to switch over), then the synchronized switchover.
    fn migrate(&self, members: &mut [Member], deadline: Instant) -> Vec<Failure> {
        let phase = Phase::Migrate;
        self.emit(Event::PhaseStarted { phase });
        let limit = match self.plan.migration.max_parallel {
            0 => members.len().max(1),
            n => n,
        };
        let slots = Slots {
            free: Mutex::new(limit),
            cv: Condvar::new(),
        };
        let errors = self.each(phase, members, |m| {
            if m.stays {
                return Ok(());
            }
            let _slot = slots.acquire(deadline)?;
            m.backend.start_migration()?;
            let vm = m.report.name.clone();
            let mut last = Instant::now() - Duration::from_secs(1);
            let stop = || self.interrupted();
            m.backend.wait_ready_to_switch(
                deadline,
                &mut |p: MigrationProgress| {
                    // One progress event per VM every 200 ms at most.
                    if last.elapsed() >= Duration::from_millis(200) {
                        last = Instant::now();
                        let fraction = (p.total > 0)
                            .then(|| 1.0 - (p.remaining as f64 / p.total as f64).clamp(0.0, 1.0));
                        self.emit(Event::VmProgress {
                            vm: vm.clone(),
                            phase,
                            detail: format!(
                                "{} MiB sent, {} MiB remaining",
                                p.transferred >> 20,
                                p.remaining >> 20
                            ),
                            fraction,
                        });
                    }
                },
                &stop,
            )?;
            self.emit(Event::VmProgress {
                vm,
                phase,
                detail: "ready to switch over".into(),
                fraction: Some(1.0),
            });
            Ok(())
        });
        if !errors.is_empty() {
            return errors;
        }
        self.each(phase, members, |m| {
            if m.stays {
                return Ok(());
            }
            let r = m.backend.switchover(deadline)?;
            m.report.migration_ms = r.total_ms;
            m.report.downtime_ms = r.downtime_ms;
            m.report.transferred = r.transferred;
            Ok(())
        })
    }

    fn resume_at_destination(&self, m: &mut Member, epoch: u64, deadline: Instant) -> Result<()> {
        let session = m.channel.as_ref().ok_or(Error::NotConnected)?.session();
        // The source's channel is done: the guest lives at the destination now.
        m.channel = None;
        m.source_session = Some(session.clone());
        let channel = m.backend.destination_channel(session, deadline)?;
        let interconnect = m.target_interconnect.clone();
        let result = tell_resume(&channel, epoch, interconnect, deadline);
        m.channel = Some(channel);
        self.note_resume(m, "destination", result)
    }

    /// A VM that stays: its guest goes on at the source, on its interconnect.
    fn resume_at_source(&self, m: &mut Member, epoch: u64, deadline: Instant) -> Result<()> {
        let channel = m.channel.as_ref().ok_or(Error::NotConnected)?;
        let result = tell_resume(channel, epoch, m.source_interconnect.clone(), deadline);
        self.note_resume(m, "source", result)
    }

    /// Records what the guest answered to `resume`, as an event and in the report.
    fn note_resume(&self, m: &mut Member, at: &str, result: Result<GuestNotice>) -> Result<()> {
        match result {
            Ok(notice) => {
                if let GuestNotice::Resumed {
                    interconnect,
                    pci_devices,
                } = &notice
                {
                    self.emit(Event::GuestResumed {
                        vm: m.report.name.clone(),
                        at: at.into(),
                        interconnect: interconnect.clone(),
                        pci_devices: pci_devices.clone(),
                    });
                }
                m.report.guest = notice;
                Ok(())
            }
            Err(e) => {
                m.report.guest = GuestNotice::ResumeUnconfirmed(e.chain());
                Err(e)
            }
        }
    }

    fn rollback(&self, members: &mut [Member]) -> Vec<Failure> {
        let deadline = Instant::now() + self.plan.deadlines.rollback;
        self.each(Phase::Rollback, members, |m| {
            self.back_at_source(m, deadline)
        })
    }

    /// `m` runs at its source again, with its devices, its guest told to go on there.
    fn back_at_source(&self, m: &mut Member, deadline: Instant) -> Result<()> {
        let restored = m.backend.rollback(deadline);
        // A guest whose channel had moved to its (now torn down) destination is back at the
        // source, in the session it had there at the switchover: quiesced. A source channel
        // that cannot reconnect itself (libvirt's, whose QEMU a rollback may have replaced)
        // is opened again, in its session.
        let lost = m
            .channel
            .as_ref()
            .filter(|c| c.is_lost())
            .map(HostChannel::session);
        if let Some(session) = m.source_session.take().or(lost) {
            m.channel = None;
            match m.backend.connect(Some(session), deadline) {
                Ok(channel) => m.channel = Some(channel),
                Err(e) => {
                    m.report.guest = GuestNotice::ResumeUnconfirmed(e.chain());
                    restored?;
                    return Err(e);
                }
            }
        }
        // The guest is told in any case: it must not stay paused.
        let told = match &m.channel {
            None => Ok(GuestNotice::Nothing),
            Some(channel) => match channel.state() {
                SessionState::Quiesced { epoch } => {
                    tell_resume(channel, epoch, m.source_interconnect.clone(), deadline)
                }
                SessionState::Preparing { epoch, .. } | SessionState::Failed { epoch, .. } => {
                    channel
                        .send(&HostMessage::Abort { epoch })
                        .map(|()| GuestNotice::Aborted)
                }
                _ => Ok(GuestNotice::Nothing),
            },
        };
        let told = self.note_resume(m, "source", told);
        restored.and(told)
    }
}

/// How long one connection waits for the agent's `hello` before it is opened again.
const HELLO_ATTEMPT: Duration = Duration::from_secs(5);

/// Opens the guest channel of `m` (at its source, or at its destination, continuing
/// `session`) and waits for the agent's `hello`. A connection that gets none within
/// [`HELLO_ATTEMPT`] is closed and opened again: QEMU tells a virtio-serial guest that the host
/// end opened through a control queue that drops the notice when the guest has no buffer
/// posted (seen under load right after a rollback), and the agent then never sees the host; a
/// new connection sends a new notice.
fn open_channel(
    m: &mut Member,
    session: Option<GuestSession>,
    at_destination: bool,
    deadline: Instant,
) -> Result<HostChannel> {
    loop {
        let channel = if at_destination {
            m.backend
                .destination_channel(session.clone().unwrap_or_default(), deadline)?
        } else {
            m.backend.connect(session.clone(), deadline)?
        };
        let attempt = (Instant::now() + HELLO_ATTEMPT).min(deadline);
        match expect_hello(&channel, &m.report.name, attempt) {
            Err(_) if Instant::now() < deadline && channel.guest().is_none() => {
                log::warn!(
                    "{}: no hello from the guest agent in {} ms; opening the channel again",
                    m.report.name,
                    HELLO_ATTEMPT.as_millis()
                );
            }
            result => return result.map(|()| channel),
        }
    }
}

/// Waits for the agent's `hello` on `channel` and checks it is `vm`'s. A session taken up
/// without one (a recovery) must have it before anything else: the guest's answers count
/// only once it is identified.
fn expect_hello(channel: &HostChannel, vm: &str, deadline: Instant) -> Result<()> {
    let info = match channel.wait_hello(deadline) {
        Ok(info) => info,
        Err(Error::Timeout) => {
            return Err(Error::Deadline(
                "the guest agent did not say hello in time".into(),
            ));
        }
        Err(e) => return Err(e),
    };
    if info.vm != vm {
        return Err(Error::Guest(format!(
            "the guest agent says it is vm {:?}",
            info.vm
        )));
    }
    Ok(())
}

/// Sends `message` once the channel is connected (a channel just opened connects in the
/// background).
fn send_when_connected(
    channel: &HostChannel,
    message: &HostMessage,
    deadline: Instant,
) -> Result<()> {
    loop {
        match channel.send(message) {
            Err(Error::NotConnected) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(Error::NotConnected) => {
                return Err(Error::Deadline(
                    "the guest channel did not connect before the deadline".into(),
                ));
            }
            other => return other,
        }
    }
}

/// Sends `resume` and waits for `resumed`.
fn tell_resume(
    channel: &HostChannel,
    epoch: u64,
    interconnect: Interconnect,
    deadline: Instant,
) -> Result<GuestNotice> {
    let resume = HostMessage::Resume {
        epoch,
        interconnect,
    };
    send_when_connected(channel, &resume, deadline)?;
    match channel.wait_for(
        |g| {
            matches!(
                g,
                GuestMessage::Resumed { .. } | GuestMessage::Failed { .. }
            )
        },
        deadline,
    )? {
        GuestMessage::Resumed {
            interconnect,
            pci_devices,
            ..
        } => Ok(GuestNotice::Resumed {
            interconnect,
            pci_devices,
        }),
        GuestMessage::Failed { reason, .. } => Err(Error::Guest(format!(
            "the guest failed to resume: {reason}"
        ))),
        other => Err(Error::Guest(format!("unexpected {}", other.describe()))),
    }
}

/// The backend of a VM that is a libvirt domain.
#[cfg(feature = "libvirt")]
fn libvirt_backend(
    vm: &VmSpec,
    settings: MigrationSettings,
    tls: bool,
) -> Result<Box<dyn VmBackend>> {
    let vm = crate::backend::libvirt::LibvirtVm::new(vm.clone(), settings)?;
    Ok(Box::new(vm.with_tls(tls)))
}

/// Without the `libvirt` feature a libvirt domain cannot be driven.
#[cfg(not(feature = "libvirt"))]
fn libvirt_backend(
    vm: &VmSpec,
    _settings: MigrationSettings,
    _tls: bool,
) -> Result<Box<dyn VmBackend>> {
    Err(Error::Config(format!(
        "{} is a libvirt domain: this build has no libvirt support (cargo feature `libvirt`)",
        vm.name
    )))
}
