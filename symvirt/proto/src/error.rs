//! The error type of the wire formats.

use std::io;

/// What can go wrong reading, writing or checking a message.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// An I/O error on a socket.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A deadline passed.
    #[error("timed out")]
    Timeout,
    /// The peer closed the connection.
    #[error("channel closed")]
    Closed,
    /// The agent refused a rank's registration.
    #[error("agent refused rank registration: {0}")]
    RankRefused(String),
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
        chain(self)
    }
}

/// The message of `error` and of every source below it, joined by `: ` (for logs and reports,
/// where a `Display` of the top alone would hide the cause).
pub fn chain(error: &dyn std::error::Error) -> String {
    let mut msg = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// The result type of the wire formats.
pub type Result<T, E = Error> = std::result::Result<T, E>;
