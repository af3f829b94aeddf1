//! A typed, synchronous QMP client for QEMU: what the rest of Ninja uses to control QEMU
//! (run state, hotplug of devices, live migration).
//!
//! A [`Qmp`] connection reads the greeting, negotiates capabilities (`oob` when offered) and
//! starts a reader thread that matches replies to calls by id and fans events out to
//! [`Subscription`]s. Every call has a timeout; when QEMU dies, pending calls fail at once with
//! [`Error::Disconnected`]. Types tolerate newer QEMUs: unknown enum values, events and fields
//! never fail decoding.
//!
//! ```no_run
//! use std::time::Duration;
//! use qmp::{DeviceSpec, MigrationWait, Qmp, wait_for_migration};
//!
//! # fn main() -> qmp::Result<()> {
//! let qmp = Qmp::connect_unix("/run/vm0/qmp.sock")?;
//! println!("QEMU {:?}", qmp.greeting().version.qemu);
//! // Detach the passthrough device, then migrate.
//! qmp.device_del_and_wait("hca0", Duration::from_secs(10))?;
//! qmp.migrate("tcp:127.0.0.1:4444")?;
//! let done = wait_for_migration(&qmp, &MigrationWait::default(), |info| {
//!     println!("{:?}: {:?}", info.status, info.ram.as_ref().map(|r| r.remaining));
//! })?;
//! println!("downtime {:?} ms", done.downtime);
//! # Ok(()) }
//! ```

mod commands;
mod connection;
mod error;
pub mod events;
mod framing;
mod migration;
pub mod types;

pub use commands::{DeviceSpec, NetdevSpec, ObjectSpec};
pub use connection::{ConnectOptions, Endpoint, Greeting, Qmp, TlsClient};
pub use error::{Error, ProtocolError, Result};
pub use events::{Event, EventFilter, EventKind, Subscription};
pub use migration::{MigrationWait, wait_for_migration};
pub use types::{
    BlockInfo, ErrorClass, JobInfo, JobStatus, MigrationCapability, MigrationInfo,
    MigrationParameters, MigrationStatus, RamStats, RunState, StatusInfo, VersionInfo,
};
