//! The SymVirt guest agent (the `symvirt-agent` binary, static, in every guest of a virtual
//! cluster): it relays between the host controller and the guest's MPI ranks, and on resume
//! moves the VM's data address onto the new fabric's NIC before the ranks go on.
//!
//! - [`agent`]: the event loop (host link, rank socket, epochs, limits, stale epochs);
//! - `cut_reports`: what the ranks counted at the last cuts, kept for the host's `report`;
//! - [`guest_link`]: the agent's end of the host channel (virtio-serial port or unix socket);
//! - [`data_net`]: the network step (route and neighbours of the data address, in-process
//!   rtnetlink and ARP);
//! - [`sysfs`]: what the guest sees of its PCI devices and NICs.
//!
//! The wire formats are `symvirt-proto`'s; the host side is the `symvirt` crate.
//!
//! ```no_run
//! use symvirt_agent::agent::{Agent, AgentConfig};
//! use symvirt_agent::guest_link::ChannelSpec;
//! let config = AgentConfig {
//!     channel: ChannelSpec::Unix("/tmp/host.sock".into()),
//!     ranks: 2,
//!     ..AgentConfig::default()
//! };
//! let agent = Agent::spawn(config)?; // ranks connect to symvirt_proto::rank::DEFAULT_RANK_SOCKET
//! # drop(agent);
//! # Ok::<(), symvirt_agent::Error>(())
//! ```

pub mod agent;
mod cut_reports;
pub mod data_net;
pub mod error;
pub mod guest_link;
mod netlink;
pub mod sysfs;

pub use error::{Error, Result};
