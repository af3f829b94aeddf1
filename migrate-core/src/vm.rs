//! The control interface a VMM gives the migration engine.
//!
//! The source side implements [`MigratableVm`]; the destination side implements [`IncomingVm`].
//! The reference VMM ([`crate::vmm`]) and the software guest implement both.

use crate::Result;
use crate::dirty::DirtyTracker;
use vm_memory::{GuestMemoryMmap, bitmap::AtomicBitmap};

/// Guest memory as the engine sees it: vm-memory regions whose bitmap records the VMM's own writes.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// A running VM the engine can migrate away.
pub trait MigratableVm: Send + Sync {
    /// The guest memory (all regions). Addresses are guest-physical.
    fn memory(&self) -> &GuestMemory;
    /// A tracker of pages the guest and the VMM dirty from now on. Called once per migration,
    /// before round 0; the tracker's `stop` is called when the migration ends either way.
    fn dirty_tracker(&self) -> Result<Box<dyn DirtyTracker>>;
    /// Stop every vCPU (returns when none runs guest code). Idempotent.
    fn pause(&self) -> Result<()>;
    /// Let the vCPUs run again. Idempotent.
    fn resume(&self) -> Result<()>;
    /// Opaque VMM and vCPU state, valid only while paused.
    fn save_state(&self) -> Result<Vec<u8>>;
    /// Slow the guest down to let pre-copy converge: 0 = full speed, 99 = mostly stopped.
    /// VMMs that cannot throttle return Ok and ignore it.
    fn set_throttle(&self, percent: u8) -> Result<()>;
}

/// A VM on the destination that receives memory and state, then runs.
pub trait IncomingVm: Send + Sync {
    /// The destination guest memory, laid out as the source announced.
    fn memory(&self) -> &GuestMemory;
    /// Load the state saved by the source's [`MigratableVm::save_state`].
    fn restore_state(&self, state: &[u8]) -> Result<()>;
    /// Start the vCPUs (after commit).
    fn resume(&self) -> Result<()>;
}
