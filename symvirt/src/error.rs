//! The crate's error type.

use std::io;

/// Everything that can go wrong in symvirt.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A line (one message) was longer than the protocol allows; it was discarded unread.
    #[error("message of {len} bytes exceeds the {limit}-byte line limit")]
    LineTooLong {
        /// Bytes seen before the end of the line (or the encoded size when sending).
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// A line that is not valid UTF-8.
    #[error("message is not UTF-8")]
    NotUtf8(#[source] std::str::Utf8Error),
    /// A line that is not one of the protocol's messages (syntax, unknown type or field).
    #[error("malformed message")]
    Malformed(#[source] serde_json::Error),
    /// A well-formed message whose values are out of range.
    #[error("invalid message: {0}")]
    Invalid(String),
    /// A message that the per-epoch state machine does not allow now.
    #[error("{message} not allowed in state {state}")]
    Transition {
        /// The message, e.g. `resume{epoch=3}`.
        message: String,
        /// The state it arrived in.
        state: String,
    },
    /// An I/O error on a socket or device.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The peer is not connected (yet, or any more).
    #[error("not connected")]
    NotConnected,
    /// A deadline passed.
    #[error("timed out")]
    Timeout,
    /// The channel was shut down.
    #[error("channel closed")]
    Closed,
    /// The agent refused a rank's registration.
    #[error("agent refused rank registration: {0}")]
    RankRefused(String),
    /// A bad command line or configuration value.
    #[error("configuration: {0}")]
    Config(String),
}

impl Error {
    /// An [`Error::Io`] with a description of what failed.
    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
