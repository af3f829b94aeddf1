//! The crate's error type.

use std::io;

/// Everything that can go wrong on the MPI side of SymVirt.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Talking to the guest agent failed.
    #[error("guest agent: {what}")]
    Agent {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: symvirt_proto::Error,
    },
    /// The agent connection ended (the agent stopped or its socket disappeared).
    #[error("guest agent connection lost: {0}")]
    AgentLost(String),
    /// The control plane was opened twice in one process, or used before it was opened.
    #[error("control plane: {0}")]
    State(String),
    /// The agent did not answer in time.
    #[error("timed out waiting for {0}")]
    Timeout(String),
    /// An MPI call made by the layer failed (the MPI error code).
    #[error("MPI call {call} failed with error code {code}")]
    Mpi {
        /// The call.
        call: String,
        /// The MPI error code.
        code: i32,
    },
    /// A cut record (`SYMVIRT_CUT_LOG`) is missing, unreadable or malformed.
    #[error("cut record {path}: {what}")]
    CutLog {
        /// The record file (or the directory).
        path: std::path::PathBuf,
        /// What is wrong with it.
        what: String,
        /// The I/O cause, when it could not be read.
        #[source]
        source: Option<io::Error>,
    },
    /// Building a per-implementation library or program failed.
    #[error("build: {what}")]
    Build {
        /// What was being built, and the tool's diagnostics.
        what: String,
        /// The I/O cause, when the tool could not run at all.
        #[source]
        source: Option<io::Error>,
    },
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
