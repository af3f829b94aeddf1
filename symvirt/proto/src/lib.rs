//! SymVirt's wire formats, shared by the host controller (`symvirt`), the guest agent
//! (`symvirt-agent`) and the MPI layer inside every rank (`symvirt-mpi`); serde only, so what
//! goes into a guest or an MPI process links nothing else.
//!
//! - [`protocol`]: the guest/host channel, version 1 (newline-delimited JSON, bounded lines,
//!   strict parsing), and the [`protocol::Interconnect`] a guest runs on;
//! - [`framing`]: the bounded line reader both ends use (the project's one line codec,
//!   `ninja-framing`, which the QMP client reads with too);
//! - [`addr`]: PCI and MAC addresses, checked in one place;
//! - [`cut_report`]: what a cut was (per-pair message counts), as ranks and agents report it;
//! - [`rank`]: the agent/rank messages and [`rank::RankClient`], a rank's connection to its
//!   guest's agent.
//!
//! ```
//! use symvirt_proto::protocol::{HostMessage, decode, encode};
//! let line = encode(&HostMessage::Prepare { epoch: 1, deadline_ms: 5000 })?;
//! assert_eq!(line, b"{\"type\":\"prepare\",\"epoch\":1,\"deadline_ms\":5000}\n");
//! let back: HostMessage = decode(&line[..line.len() - 1])?;
//! assert_eq!(back, HostMessage::Prepare { epoch: 1, deadline_ms: 5000 });
//! # Ok::<(), symvirt_proto::Error>(())
//! ```

pub mod addr;
pub mod cut_report;
pub mod error;
/// The bounded line reader both ends of every channel use.
pub mod framing {
    pub use ninja_framing::{Frame, LineReader};
}
pub mod protocol;
pub mod rank;

pub use error::{Error, Result};
