//! What the controller needs from a VMM, per VM: reach the guest channel, reserve the
//! destination, detach, migrate with a synchronized switchover, attach, commit or roll back.
//!
//! [`qemu::QemuVm`] implements it over QMP (and starts destination QEMUs with
//! [`qemu::Launcher`]); [`reference::ReferenceBackend`] for `migrate-core`'s reference KVM VMM,
//! migrated by its pre-copy engine, with the port-I/O hypercall channel. Guest coordination (prepare, resume, abort) is the controller's, the
//! same for every backend.

#[cfg(feature = "libvirt")]
pub mod libvirt;
pub mod libvirt_xml;
pub mod qemu;
pub mod reference;

use crate::checkpoint::{SavedState, StateFormat};
use crate::error::Result;
use crate::host_channel::HostChannel;
use crate::session::GuestSession;
use std::path::Path;
use std::time::Instant;

/// One progress report of a migration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MigrationProgress {
    /// Bytes sent so far.
    pub transferred: u64,
    /// Bytes still to send (the dirty set).
    pub remaining: u64,
    /// Guest RAM in bytes.
    pub total: u64,
}

/// What a run made for one VM (as its journal keeps it).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Leftovers {
    /// The destination QEMU the run started on this host, if any: a recovery kills it (after
    /// checking it still is that QEMU) when it rolls back.
    pub destination_pid: Option<u32>,
    /// Files the run created exclusively (stand-in HCA memory at the destination): removed
    /// on rollback, and only those.
    pub claimed: Vec<std::path::PathBuf>,
    /// The run used no destination for this VM (a checkpoint, a VM that stays): a recovery
    /// leaves whatever answers at the plan's destination alone.
    #[serde(default)]
    pub source_only: bool,
}

/// How one VM's migration went.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct MigrationResult {
    /// Total time the VMM reports, in ms.
    pub total_ms: Option<u64>,
    /// The guest's downtime, in ms.
    pub downtime_ms: Option<u64>,
    /// Bytes transferred.
    pub transferred: u64,
}

/// The per-VM operations of a migration plan, in the order the controller calls them. Every
/// method is bounded by `deadline`. After any failure the controller calls
/// [`VmBackend::rollback`], which must work from whatever point was reached.
pub trait VmBackend: Send {
    /// The VM's name.
    fn name(&self) -> &str;

    /// Connects to the source's monitor (once) and opens the guest channel there (a new one on
    /// every call), continuing `session` when given: after a failure past the switchover the
    /// guest is back at the source, in the epoch its destination channel was in.
    fn connect(
        &mut self,
        continuing: Option<GuestSession>,
        deadline: Instant,
    ) -> Result<HostChannel>;

    /// Gets the destination ready (started or checked, listening) and claims its devices,
    /// before the source lets go of anything; checks the source has what the plan detaches.
    fn reserve(&mut self, deadline: Instant) -> Result<()>;

    /// Unplugs the source's passthrough devices and removes their backing objects.
    fn detach(&mut self, deadline: Instant) -> Result<()>;

    /// Starts the migration; it pauses before switchover.
    fn start_migration(&mut self) -> Result<()>;

    /// Waits until the migration is ready to switch over (the source is paused). Gives up
    /// with [`crate::Error::Interrupted`] soon after `stop` says so (the operator interrupted
    /// the run).
    fn wait_ready_to_switch(
        &mut self,
        deadline: Instant,
        progress: &mut dyn FnMut(MigrationProgress),
        stop: &dyn Fn() -> bool,
    ) -> Result<()>;

    /// Switches over and waits until the destination runs.
    fn switchover(&mut self, deadline: Instant) -> Result<MigrationResult>;

    /// Plugs the destination's devices.
    fn attach(&mut self, deadline: Instant) -> Result<()>;

    /// Opens the guest channel at the destination, continuing the source's `session`.
    fn destination_channel(
        &mut self,
        session: GuestSession,
        deadline: Instant,
    ) -> Result<HostChannel>;

    /// The migration is done: releases the source (and its devices). The destination keeps
    /// running.
    fn commit(&mut self) -> Result<()>;

    /// Undoes everything done so far: cancels the migration, tears the destination down,
    /// continues the source and re-attaches its original devices.
    fn rollback(&mut self, deadline: Instant) -> Result<()>;

    /// Saves the whole VM (memory and device state) to the file `path` at the cut: the VM is
    /// stopped first and stays stopped. Afterwards [`VmBackend::rollback`] continues it where
    /// it was, with its devices, and [`VmBackend::commit`] ends it. Returns how the state was
    /// saved, which [`VmBackend::restore`] needs, and the copies of its writable disks at the
    /// cut, written beside `path` ([`crate::checkpoint::disk_path`]).
    fn save(&mut self, path: &Path, deadline: Instant) -> Result<SavedState> {
        let _ = (path, deadline);
        Err(crate::Error::Refused(format!(
            "{}: this backend cannot save a VM to a file",
            self.name()
        )))
    }

    /// Starts the VM at its destination from the state `save` wrote to `path` and lets it run
    /// (its guest quiesced, as it was saved). Then [`VmBackend::attach`] and
    /// [`VmBackend::destination_channel`] go on as after a migration; [`VmBackend::rollback`]
    /// tears the restored VM down, [`VmBackend::commit`] keeps it.
    fn restore(&mut self, format: &StateFormat, path: &Path, deadline: Instant) -> Result<()> {
        let _ = (format, path, deadline);
        Err(crate::Error::Refused(format!(
            "{}: this backend cannot restore a VM from a file",
            self.name()
        )))
    }

    /// Whether the VM still runs at its source: `Err` when its VMM, or the host it is on, is
    /// gone, or the VM stopped for good (see [`crate::guard`]).
    fn check_source(&mut self, deadline: Instant) -> Result<()> {
        let _ = deadline;
        Ok(())
    }

    /// Ends the VM at its source if it still runs there, and makes sure it is gone: a guard
    /// stops the survivors of a lost host before it restores the whole cluster elsewhere.
    fn stop_source(&mut self, deadline: Instant) -> Result<()> {
        let _ = deadline;
        Err(crate::Error::Refused(format!(
            "{}: this backend cannot stop a VM at its source",
            self.name()
        )))
    }

    /// The process id of a destination this backend started, if any.
    fn destination_pid(&self) -> Option<u32> {
        None
    }

    /// What the run made for this VM and a recovery must undo or keep: journaled once the
    /// destination is reserved.
    fn leftovers(&self) -> Leftovers {
        Leftovers::default()
    }

    /// Takes charge of what an interrupted run left of this VM (see
    /// [`crate::controller::Controller::recover`]): reaches whichever of source and destination
    /// still answer, and learns where the migration stands, so that [`VmBackend::rollback`]
    /// or [`VmBackend::roll_forward`] can finish the job.
    fn adopt(&mut self, left: &Leftovers, deadline: Instant) -> Result<()> {
        let _ = (left, deadline);
        Err(crate::Error::Refused(format!(
            "{}: this backend cannot take over an interrupted run",
            self.name()
        )))
    }

    /// Finishes a run that had decided to keep the destination: makes sure it runs with its
    /// devices and the source is gone (verified). The guest is the controller's.
    fn roll_forward(&mut self, deadline: Instant) -> Result<()> {
        let _ = deadline;
        Err(crate::Error::Refused(format!(
            "{}: this backend cannot take over an interrupted run",
            self.name()
        )))
    }
}
