//! Ninja: live migration of virtual HPC clusters.
//!
//! This facade re-exports the three crates:
//! - [`qmp`]: a typed QMP client to control QEMU (migration, hotplug, run state, events).
//! - [`migrate_core`]: a pre-copy memory migration engine for VMMs built on rust-vmm crates.
//! - [`symvirt`]: the coordination layer (quiesce, detach, migrate, attach, resume, rollback).

pub use migrate_core;
pub use qmp;
pub use symvirt;
