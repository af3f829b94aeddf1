//! Ninja: live migration of virtual HPC clusters.
//!
//! This facade re-exports the three library crates a host links:
//! - [`qmp`]: a typed QMP client to control QEMU (migration, hotplug, run state, events).
//! - [`migrate_core`]: a pre-copy memory migration engine for VMMs built on rust-vmm crates.
//! - [`symvirt`]: the coordination layer (quiesce, detach, migrate, attach, resume, rollback),
//!   with its wire formats (`symvirt::protocol`, `symvirt::rank`).
//!
//! What runs elsewhere links less: the guest agent (`symvirt-agent`) and the MPI layer inside
//! every rank (`symvirt-mpi`) link only the wire formats (`symvirt-proto`) and the line
//! framing (`ninja-framing`), not QEMU, KVM or the engine.

pub use migrate_core;
pub use qmp;
pub use symvirt;
