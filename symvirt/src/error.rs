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
    /// The operator interrupted the run (SIGINT or SIGTERM).
    #[error("interrupted by the operator")]
    Interrupted,
    /// The channel was shut down.
    #[error("channel closed")]
    Closed,
    /// The agent refused a rank's registration.
    #[error("agent refused rank registration: {0}")]
    RankRefused(String),
    /// A bad command line or configuration value.
    #[error("configuration: {0}")]
    Config(String),
    /// A migration plan with errors (every one, with its location).
    #[error("{} error(s) in the plan, first: {}", .0.len(), .0.first().map(ToString::to_string).unwrap_or_default())]
    Plan(Vec<crate::plan::PlanIssue>),
    /// A QMP command or wait failed.
    #[error("{what}")]
    Qmp {
        /// What was being done, e.g. `vm0 source: device_del hca0`.
        what: String,
        /// The cause.
        #[source]
        source: qmp::Error,
    },
    /// A precondition of the plan does not hold (e.g. the destination device is not free).
    #[error("{0}")]
    Refused(String),
    /// The reference VMM or the migration engine (`migrate-core`) failed.
    #[error("reference VMM")]
    Vmm(#[source] Box<migrate_core::Error>),
    /// A VFIO operation failed (`vfio` feature).
    #[cfg(feature = "vfio")]
    #[error("{what}")]
    Vfio {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: vfio_ioctls::VfioError,
    },
    /// One VM failed in one phase of a plan.
    #[error("vm {vm}: {phase} failed")]
    Vm {
        /// The VM.
        vm: String,
        /// The phase (`reserve`, `quiesce`, ...).
        phase: String,
        /// The cause.
        #[source]
        source: Box<Error>,
    },
}

impl Error {
    /// An [`Error::Io`] with a description of what failed.
    pub(crate) fn qmp(what: impl Into<String>, source: qmp::Error) -> Error {
        Error::Qmp {
            what: what.into(),
            source,
        }
    }

    /// The message of this error and of every source below it, joined by `: `.
    pub fn chain(&self) -> String {
        let mut msg = self.to_string();
        let mut source = std::error::Error::source(self);
        while let Some(s) = source {
            msg.push_str(": ");
            msg.push_str(&s.to_string());
            source = s.source();
        }
        msg
    }

    pub(crate) fn io(what: impl Into<String>, source: io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
