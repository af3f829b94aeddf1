//! Test fixtures for Ninja's tests and benchmarks: the guest kernel and initramfs built by
//! `scripts/build-fixtures`, a QEMU launcher that cleans up after itself, and a minimal raw QMP
//! line client for tests that must not depend on the `qmp` crate they are testing.
//!
//! ```no_run
//! use ninja_testkit::{qemu_or_skip, Qemu, QemuConfig};
//! use std::time::Duration;
//! let Some(fixtures) = qemu_or_skip("my_test") else { return };
//! let mut vm = Qemu::start(QemuConfig::new(&fixtures).guest_run("/bin/ninja-guest-dirtier 4")).unwrap();
//! vm.wait_serial("pass=", Duration::from_secs(60)).unwrap();
//! // vm.qmp_path() is the QMP unix socket; dropping `vm` kills QEMU and removes its files.
//! ```

pub mod cluster;
pub mod libvirt;
mod qemu;
mod raw_qmp;
mod skip;
pub mod tls;

pub use qemu::{QEMU_BINARY, Qemu, QemuConfig, free_tcp_port};
pub use raw_qmp::RawQmp;
pub use skip::{
    Fixtures, Requirement, SSHD_BINARY, kvm_or_skip, mpi_or_skip, qemu_or_skip, skip, sshd_or_skip,
};
