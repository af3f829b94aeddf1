//! The agent's error type.

use std::io;

/// What can go wrong in the guest agent.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A message to or from the host or a rank (see [`symvirt_proto::Error`]).
    #[error(transparent)]
    Protocol(#[from] symvirt_proto::Error),
    /// An I/O error on a socket, device or file.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A bad command line or configuration value.
    #[error("configuration: {0}")]
    Config(String),
    /// The guest is not set up for what was asked (e.g. no NIC with the fabric's MAC).
    #[error("{0}")]
    Refused(String),
}

impl Error {
    /// An [`Error::Io`] with a description of what failed.
    pub fn io(what: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    /// The message of this error and of every source below it, joined by `: `.
    pub fn chain(&self) -> String {
        symvirt_proto::error::chain(self)
    }
}

/// The agent's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
