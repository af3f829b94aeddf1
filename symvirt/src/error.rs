//! The crate's error type.

use std::io;

/// Everything that can go wrong in symvirt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A message to or from a guest (see [`symvirt_proto::Error`]).
    #[error(transparent)]
    Protocol(#[from] symvirt_proto::Error),
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
    /// Something did not happen before its deadline (what, and which deadline).
    #[error("{0}")]
    Deadline(String),
    /// The guest's agent reported a failure or answered what it must not (the reason is its).
    #[error("{0}")]
    Guest(String),
    /// A bug: a controller thread panicked.
    #[error("internal error: {0}")]
    Internal(String),
    /// The operator interrupted the run (SIGINT or SIGTERM).
    #[error("interrupted by the operator")]
    Interrupted,
    /// A run that was interrupted (its controller died or was stopped), as its recovery found it.
    #[error("{0}")]
    RunInterrupted(String),
    /// The channel was shut down.
    #[error("channel closed")]
    Closed,
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
    /// A QEMU process did not do what it must (it exited, or kept running when told to quit).
    #[error("{0}")]
    Qemu(String),
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
    /// A libvirt call failed (`libvirt` feature).
    #[cfg(feature = "libvirt")]
    #[error("{what}")]
    Libvirt {
        /// What was being done, e.g. `vm0 at qemu:///system: detach ua-hca0`.
        what: String,
        /// libvirt's error.
        #[source]
        source: virt::error::Error,
    },
    /// A checkpoint that is damaged, incomplete, or not for this plan: the file, and what is
    /// wrong with it.
    #[error("{}: {problem}", path.display())]
    Checkpoint {
        /// The file (or directory) at fault.
        path: std::path::PathBuf,
        /// What is wrong.
        problem: String,
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

/// What kind of failure an [`Error`] is: what a scheduler acts on without reading the text.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ErrorKind {
    /// A deadline passed (a phase's, or one within it): retry later, or with more time.
    Timeout,
    /// The run was cancelled (SIGINT, SIGTERM, or [`crate::controller::Controller::interruptible`]).
    Cancelled,
    /// The guest said no: its agent reported `failed` (a rank that cannot quiesce, a verbs job,
    /// an interconnect it never saw) or broke the protocol.
    Guest,
    /// The guest's channel is not there or went away (no agent, a closed socket).
    GuestUnreachable,
    /// QEMU, the reference VMM or VFIO refused or failed a command, or died.
    Vmm,
    /// The plan cannot be carried out as written: a precondition does not hold (a destination
    /// monitor in use, a stand-in that is not the source's), or the plan or configuration is
    /// wrong. Nothing was changed for it.
    Refused,
    /// An I/O error on this host (a socket, a file, an ssh forward).
    Io,
    /// A checkpoint is damaged, incomplete, or not for this plan: use another one.
    Checkpoint,
    /// A bug in the controller.
    Internal,
}

impl ErrorKind {
    /// The name in events and JSON (`timeout`, `guest_unreachable`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::Timeout => "timeout",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Guest => "guest",
            ErrorKind::GuestUnreachable => "guest_unreachable",
            ErrorKind::Vmm => "vmm",
            ErrorKind::Refused => "refused",
            ErrorKind::Io => "io",
            ErrorKind::Checkpoint => "checkpoint",
            ErrorKind::Internal => "internal",
        }
    }
}

impl std::fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Error {
    /// What kind of failure this is.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Error::Timeout | Error::Deadline(_) => ErrorKind::Timeout,
            Error::Interrupted | Error::RunInterrupted(_) => ErrorKind::Cancelled,
            Error::Guest(_) | Error::Transition { .. } | Error::Protocol(_) => ErrorKind::Guest,
            Error::NotConnected | Error::Closed => ErrorKind::GuestUnreachable,
            Error::Qmp { source, .. } if matches!(source, qmp::Error::Timeout { .. }) => {
                ErrorKind::Timeout
            }
            Error::Qmp { .. } | Error::Qemu(_) | Error::Vmm(_) => ErrorKind::Vmm,
            #[cfg(feature = "vfio")]
            Error::Vfio { .. } => ErrorKind::Vmm,
            #[cfg(feature = "libvirt")]
            Error::Libvirt { .. } => ErrorKind::Vmm,
            Error::Refused(_) | Error::Config(_) | Error::Plan(_) => ErrorKind::Refused,
            Error::Io { .. } => ErrorKind::Io,
            Error::Internal(_) => ErrorKind::Internal,
            Error::Checkpoint { .. } => ErrorKind::Checkpoint,
            Error::Vm { source, .. } => source.kind(),
        }
    }

    /// An [`Error::Io`] with a description of what failed.
    pub(crate) fn qmp(what: impl Into<String>, source: qmp::Error) -> Error {
        Error::Qmp {
            what: what.into(),
            source,
        }
    }

    /// The message of this error and of every source below it, joined by `: `.
    pub fn chain(&self) -> String {
        symvirt_proto::error::chain(self)
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
