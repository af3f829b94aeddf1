//! The crate's single error type.

use std::fmt;
use std::time::Duration;

use crate::types::ErrorClass;

/// Everything a QMP call, a connection attempt or an event wait can fail with.
///
/// `Display` gives one line; an error's [`source`](std::error::Error::source) is only what
/// that line does not already say (the I/O error under [`Error::Io`]), so printing the chain
/// never repeats a reason.
#[derive(Debug)]
#[non_exhaustive]
pub enum Error {
    /// QEMU executed the command and answered with an error, e.g.
    /// `device_add: Duplicate device ID 'n0' for device`.
    Qmp {
        /// The command QEMU refused (`device_add`, `migrate`, ...).
        command: String,
        /// QEMU's error class (`GenericError`, `DeviceNotFound`, ...).
        class: ErrorClass,
        /// QEMU's human-readable description.
        desc: String,
    },
    /// A socket operation failed.
    Io {
        /// What the client was doing.
        context: &'static str,
        /// The underlying error (the error's `source`).
        source: std::io::Error,
    },
    /// Nothing arrived in time.
    Timeout {
        /// What the client waited for (a command name, an event, the greeting).
        what: String,
        /// How long it waited.
        after: Duration,
    },
    /// The peer broke the QMP protocol.
    Protocol(ProtocolError),
    /// The connection is gone (QEMU exited, the socket closed, or an earlier fatal error).
    Disconnected {
        /// Why the connection ended.
        reason: String,
    },
    /// A reply did not have the shape the typed command expects (or typed arguments did not
    /// serialize), e.g. `unexpected reply to query-status: invalid type: string "yes",
    /// expected a boolean`.
    Decode {
        /// The command whose reply failed to decode.
        command: String,
        /// The decoding error. It is part of this error's message, so `source()` does not
        /// return it again.
        source: serde_json::Error,
    },
    /// A migration ended in `failed` or `cancelled` while a helper waited for it.
    MigrationFailed {
        /// The final status.
        status: crate::types::MigrationStatus,
        /// QEMU's `error-desc`, or a note when it gave none.
        desc: String,
    },
    /// A background job (`blockdev-backup`, `blockdev-create`, ...) ended with an error.
    Job {
        /// The job's id.
        id: String,
        /// QEMU's reason.
        reason: String,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            // The class is noise when it is the generic one, as it is for most errors.
            Self::Qmp {
                command,
                class: ErrorClass::GenericError,
                desc,
            } => write!(f, "{command}: {desc}"),
            Self::Qmp {
                command,
                class,
                desc,
            } => write!(f, "{command}: {desc} ({class})"),
            Self::Io { context, .. } => write!(f, "I/O error while {context}"),
            Self::Timeout { what, after } => {
                write!(f, "timed out after {after:?} waiting for {what}")
            }
            Self::Protocol(p) => write!(f, "QMP protocol error: {p}"),
            Self::Disconnected { reason } => write!(f, "disconnected from QEMU: {reason}"),
            Self::Decode { command, source } => {
                write!(f, "unexpected reply to {command}: {source}")
            }
            Self::MigrationFailed { status, desc } => {
                write!(f, "migration ended with status {status}: {desc}")
            }
            Self::Job { id, reason } => write!(f, "job {id} failed: {reason}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Io { source, .. } => Some(source),
            // Decode's reason is already in its message; the rest carry no inner error.
            _ => None,
        }
    }
}

/// The ways a peer can violate QMP. Part of [`Error::Protocol`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    /// A line was not valid JSON (or not a JSON object).
    MalformedJson {
        /// The parser's message.
        detail: String,
    },
    /// A line exceeded the configured maximum; the rest was not read.
    LineTooLong {
        /// The configured limit in bytes.
        limit: usize,
    },
    /// The stream ended in the middle of a message.
    Truncated {
        /// How many bytes of the unfinished message had arrived.
        bytes: usize,
    },
    /// The first message was not a QMP greeting, or the peer closed before sending one.
    GreetingMissing {
        /// What arrived instead.
        detail: String,
    },
    /// An error reply without an `id`: QEMU could not parse a request, which this client never
    /// sends malformed, so the stream is out of sync (the connection is closed).
    ErrorWithoutId {
        /// QEMU's error class.
        class: ErrorClass,
        /// QEMU's description.
        desc: String,
    },
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MalformedJson { detail } => write!(f, "malformed JSON: {detail}"),
            Self::LineTooLong { limit } => write!(f, "message longer than {limit} bytes"),
            Self::Truncated { bytes } => {
                write!(f, "stream ended inside a message ({bytes} bytes received)")
            }
            Self::GreetingMissing { detail } => write!(f, "no QMP greeting: {detail}"),
            Self::ErrorWithoutId { class, desc } => {
                write!(f, "error reply without id ({class}: {desc})")
            }
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
