//! Migration statistics and progress events.

use serde::{Deserialize, Serialize};

/// One pre-copy round (or the final stop-and-copy round) on the source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundStats {
    /// Round number (0 = full pass).
    pub round: u32,
    /// Pages sent with their bytes.
    pub pages_sent: u64,
    /// Pages sent as zero markers (round 0 skips zero pages entirely and does not count them).
    pub zero_pages: u64,
    /// Bytes written to the memory connections.
    pub bytes: u64,
    /// Wall time of the round in milliseconds.
    pub duration_ms: f64,
    /// Dirty pages found when the round ended (what the next round must send).
    pub dirty_pages_found: u64,
    /// Measured bandwidth of the round in bytes per second.
    pub bandwidth_bytes_s: f64,
    /// Estimated guest dirty rate during the round, bytes per second.
    pub dirty_rate_bytes_s: f64,
    /// vCPU throttle in effect during the round, percent.
    pub throttle_percent: u8,
}

/// How pre-copy ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SwitchoverReason {
    /// The estimated final round fit the downtime target.
    Converged,
    /// The timeout passed and the strategy was "force".
    Forced,
}

/// The source's report of a completed migration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// Guest memory size in bytes.
    pub memory_bytes: u64,
    /// Memory connections used.
    pub connections: usize,
    /// Pre-copy rounds, then the final round (last entry).
    pub rounds: Vec<RoundStats>,
    /// Why the switchover happened.
    pub switchover: SwitchoverReason,
    /// Start to commit acknowledged, milliseconds.
    pub total_ms: f64,
    /// Guest paused on the source until resumed on the destination (commit ack), milliseconds.
    pub downtime_ms: f64,
    /// Bytes written to the memory connections in total.
    pub bytes_sent: u64,
    /// Opaque state size in bytes.
    pub state_bytes: u64,
    /// CPU time used by the engine's threads on the source, seconds.
    pub cpu_s: f64,
}

/// The destination's report.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReceiveReport {
    /// Pages written with bytes.
    pub data_pages: u64,
    /// Pages zeroed by markers.
    pub zero_pages: u64,
    /// Bytes read from the memory connections.
    pub bytes: u64,
    /// Pre-copy rounds announced by the source.
    pub rounds: u32,
    /// First connection to guest resumed, milliseconds.
    pub total_ms: f64,
    /// CPU time used by the engine's threads on the destination, seconds.
    pub cpu_s: f64,
}

/// Progress events from the source.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum Progress {
    /// Handshake done; pre-copy starts.
    Started {
        /// Guest memory size in bytes.
        memory_bytes: u64,
    },
    /// A round finished.
    Round(RoundStats),
    /// The vCPUs were throttled to help convergence.
    Throttled {
        /// New throttle, percent.
        percent: u8,
    },
    /// The guest is paused; the final round starts.
    Switchover {
        /// Dirty pages left to send.
        dirty_pages: u64,
    },
    /// The destination committed.
    Completed {
        /// Downtime in milliseconds.
        downtime_ms: f64,
    },
}

/// CPU time consumed by the calling thread so far, in seconds.
pub(crate) fn thread_cpu_seconds() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we pass; the clock id is valid on Linux.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return 0.0;
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}
