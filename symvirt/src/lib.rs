//! SymVirt, host side: moves a whole virtual cluster, its MPI job running, from one set of
//! hosts (and fabric) to another.
//!
//! The [`controller`] runs a migration [`plan`] (TOML, checked with every error located) over
//! every VM at once: connect, reserve, quiesce (every guest's MPI ranks reach a cut with no
//! message in flight), detach the passthrough devices, migrate, attach the destination's
//! interconnect, resume, commit; on any failure it rolls back so the job keeps running where it
//! was, and its [`controller::Report`] says per VM and phase what failed and what kind of
//! failure it was ([`error::ErrorKind`]). Each VM is driven through a [`backend`]: QEMU over QMP
//! ([`backend::qemu`], endpoints on any host through [`remote`]) or `migrate-core`'s reference
//! KVM VMM ([`backend::reference`]). A run's [`journal`] (a private state directory, written
//! before each irreversible step) lets [`controller::Controller::recover`] finish a run whose
//! controller died. [`checkpoint`]: the controller also saves every VM at one cut into a
//! checkpoint directory and restores it at other hosts ([`controller::Controller::checkpoint`],
//! [`controller::Controller::restore`]); a [`guard`] takes checkpoints periodically and
//! restores the cluster by itself when one of its VMs is lost.
//!
//! The host talks to each guest's agent over a channel ([`host_channel::HostChannel`], with the
//! per-guest state machine [`session::GuestSession`]): virtio-serial for QEMU, unix sockets,
//! or two I/O ports for VMMs that emulate their own devices ([`portio`], answered in a
//! reference-VMM guest by [`portio_agent`]). Passthrough functions for custom VMMs: [`vfio`]
//! (opening them needs the `vfio` feature). The wire formats are `symvirt-proto`'s (re-exported
//! here as [`protocol`], [`framing`], [`rank`]); the guest agent is the `symvirt-agent` crate.
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

pub mod backend;
pub mod checkpoint;
pub mod cluster;
pub mod controller;
pub mod cut;
pub mod error;
pub mod guard;
pub mod host_channel;
pub mod journal;
pub mod plan;
pub mod portio;
pub mod portio_agent;
pub mod remote;
pub mod session;
pub mod vfio;

pub use symvirt_proto::{framing, protocol, rank};

pub use error::{Error, Result};
