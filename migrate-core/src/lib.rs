//! Pre-copy live migration for VMMs that own their guest memory.
//!
//! A VMM hands the engine its guest memory (vm-memory regions) and a control interface
//! ([`vm::MigratableVm`]): pause and resume the vCPUs, save and restore opaque state, throttle.
//! The engine copies memory while the guest runs, resends what the guest dirtied (KVM dirty log
//! or ring, ORed with vm-memory's bitmap of the VMM's own writes), and switches over when the
//! last round fits the downtime target. The source stays authoritative until the destination
//! has committed; any earlier failure resumes the source untouched.

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod dirty;
pub mod error;
pub mod kvm;
pub mod vm;
pub mod vmm;

pub use error::{Error, Phase, Result};
