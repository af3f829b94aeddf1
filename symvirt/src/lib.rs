//! SymVirt: coordination between a migrating virtual cluster's host controller and its guests.
//!
//! This part holds the guest/host channel: the versioned wire [`protocol`] (newline-delimited
//! JSON, bounded lines, strict parsing), the host's end of a guest's channel
//! ([`host_channel::HostChannel`], with the per-guest state machine [`session::GuestSession`]),
//! and the guest agent ([`agent::Agent`], the `symvirt-agent` binary) that relays between the
//! host and the guest's MPI ranks ([`rank::RankClient`]). Transports: virtio-serial (QEMU),
//! plain unix sockets (host processes, tests) and two I/O ports for VMMs that emulate their own
//! devices ([`portio`]: the SymVirt hypercall, answered in a reference-VMM guest by
//! [`portio_agent`]).
//!
//! The host [`controller`] runs a migration [`plan`] over a whole virtual cluster through a
//! [`backend`] per VM: QEMU over QMP ([`backend::qemu`]) or `migrate-core`'s reference KVM VMM
//! and pre-copy engine ([`backend::reference`]). A run's [`journal`] (in a private state
//! directory, written before each irreversible step) lets
//! [`controller::Controller::recover`] finish a run whose controller died: back to the sources
//! before the run decided to keep the destinations, forward after. Inside the guest, the agent's
//! network step ([`data_net`]) moves the VM's data address to the new fabric's NIC. Passthrough
//! functions for custom VMMs: [`vfio`] (opening them needs the `vfio` feature).
//!
//! The flow of one epoch, from the host's side:
//!
//! ```no_run
//! use symvirt::host_channel::{ChannelOptions, HostChannel};
//! use symvirt::protocol::{GuestMessage, HostMessage, Interconnect};
//! use std::time::{Duration, Instant};
//! # fn main() -> symvirt::Result<()> {
//! // QEMU was started with host_channel::qemu_channel_args("/run/vm0/symvirt.sock").
//! let chan = HostChannel::connect("/run/vm0/symvirt.sock", ChannelOptions::labelled("vm0"))?;
//! chan.wait_hello(Instant::now() + Duration::from_secs(30))?;
//! chan.send(&HostMessage::Prepare { epoch: 1, deadline_ms: 5000 })?;
//! let deadline = Instant::now() + Duration::from_secs(5);
//! match chan.wait_for(|m| matches!(m, GuestMessage::Quiesced { .. } | GuestMessage::Failed { .. }), deadline)? {
//!     GuestMessage::Quiesced { .. } => {} // detach, migrate, attach ...
//!     _ => return Ok(chan.send(&HostMessage::Abort { epoch: 1 })?),
//! }
//! let interconnect = Interconnect::Ethernet { mac: "52:54:00:12:34:56".into(), iface: None, pci: None };
//! chan.send(&HostMessage::Resume { epoch: 1, interconnect })?;
//! chan.wait_for(|m| matches!(m, GuestMessage::Resumed { .. }), Instant::now() + Duration::from_secs(30))?;
//! # Ok(()) }
//! ```

pub mod agent;
pub mod backend;
pub mod cluster;
pub mod controller;
pub mod data_net;
pub mod error;
pub mod framing;
pub mod guest_link;
pub mod host_channel;
pub mod journal;
mod netlink;
pub mod plan;
pub mod portio;
pub mod portio_agent;
pub mod protocol;
pub mod rank;
pub mod remote;
pub mod session;
pub mod sysfs;
pub mod vfio;

pub use error::{Error, Result};
