//! The crate's one error type.

use std::io;

/// The migration phase an error happened in, so callers know how far a migration got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Phase {
    /// Connecting and exchanging the handshake.
    Handshake,
    /// Pre-copy rounds while the guest runs.
    PreCopy,
    /// Guest paused: last dirty pages and device state.
    StopAndCopy,
    /// Waiting for the destination's commit.
    Commit,
    /// Receiving on the destination.
    Receive,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = match self {
            Phase::Handshake => "handshake",
            Phase::PreCopy => "pre-copy",
            Phase::StopAndCopy => "stop-and-copy",
            Phase::Commit => "commit",
            Phase::Receive => "receive",
        };
        f.write_str(s)
    }
}

/// Everything that can go wrong in migrate-core.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("kvm: {op}")]
    Kvm {
        /// The operation, e.g. "KVM_GET_DIRTY_LOG".
        op: &'static str,
        /// The errno KVM returned.
        #[source]
        source: vmm_sys_util::errno::Error,
    },
    /// Guest memory could not be set up or accessed.
    #[error("guest memory: {0}")]
    Memory(String),
    /// An I/O error outside a migration phase (files, sockets being set up).
    #[error("i/o: {context}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The VM could not be paused, resumed, saved or restored.
    #[error("vm control: {0}")]
    VmControl(String),
    /// A migration failed in the given phase; the source has been resumed untouched.
    #[error("migration failed in {phase}")]
    Migration {
        /// Where it failed.
        phase: Phase,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// One memory connection failed: which, and why.
    #[error("memory connection {index}")]
    MemoryConnection {
        /// Its index (0-based).
        index: usize,
        /// Why.
        #[source]
        source: Box<Error>,
    },
    /// The peer sent something that violates the wire protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The peer's handshake does not match ours (version, page size, memory layout).
    #[error("incompatible peer: {0}")]
    Incompatible(String),
    /// The peer reported an error.
    #[error("peer error: {0}")]
    Peer(String),
    /// A deadline passed.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The caller gave the wait up (see [`crate::transport::Listener::accept_unless`]).
    #[error("cancelled")]
    Cancelled,
    /// Convergence policy gave up (strategy "abort").
    #[error("did not converge: {0}")]
    NotConverged(String),
    /// A structured message could not be encoded or decoded.
    #[error("codec: {0}")]
    Codec(String),
    /// The connection was closed by the peer.
    #[error("connection closed by peer")]
    Disconnected,
    /// TLS: credentials that do not load, a peer that fails authentication, a damaged or
    /// forged record ([`crate::tls`]).
    #[error("tls: {context}")]
    Tls {
        /// What was being done.
        context: String,
        /// What rustls, webpki or the file system said.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A snapshot file is damaged, foreign or does not fit the VM ([`crate::snapshot`]).
    #[error("snapshot {}: {problem}", path.display())]
    Snapshot {
        /// The file.
        path: std::path::PathBuf,
        /// What is wrong.
        problem: String,
    },
}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
