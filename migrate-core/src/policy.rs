//! Pre-copy convergence policy and its configuration.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// What to do when pre-copy has not converged by [`MigrationConfig::timeout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeoutStrategy {
    /// Give up: resume the source, return [`crate::Error::NotConverged`].
    Abort,
    /// Switch over anyway (downtime exceeds the target).
    Force,
}

/// Migration settings shared by source and destination.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationConfig {
    /// Target for the final round's duration (guest paused).
    pub downtime_target: Duration,
    /// Pre-copy time after which `on_timeout` applies.
    pub timeout: Duration,
    /// Abort or force at the timeout.
    pub on_timeout: TimeoutStrategy,
    /// Throttle the vCPUs (auto-converge) when rounds stop shrinking.
    pub auto_converge: bool,
    /// First throttle step, percent.
    pub throttle_initial: u8,
    /// Throttle increment per non-converging round, percent.
    pub throttle_increment: u8,
    /// Highest throttle, percent.
    pub throttle_max: u8,
    /// Bandwidth cap over all memory connections, bytes per second.
    pub max_bandwidth: Option<u64>,
    /// Time allowed for the handshake and for each commit step.
    pub handshake_timeout: Duration,
    /// Time allowed between the final state and the commit acknowledgement.
    pub commit_timeout: Duration,
    /// A socket idle for longer than this fails the migration.
    pub io_timeout: Duration,
    /// Destination: fault fresh guest memory in on a thread of its own, ahead of the first
    /// round's stream, instead of each receiver faulting a batch in just before it copies it
    /// (off). On by default: 14 paired measurements on a 2-core host (the `precopy` bench's
    /// `populate_ahead_gain`) had a median of 1.24, from 0.82 to 2.18.
    pub populate_ahead: bool,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            downtime_target: Duration::from_millis(300),
            timeout: Duration::from_secs(60),
            on_timeout: TimeoutStrategy::Force,
            auto_converge: true,
            throttle_initial: 20,
            throttle_increment: 10,
            throttle_max: 99,
            max_bandwidth: None,
            handshake_timeout: Duration::from_secs(10),
            commit_timeout: Duration::from_secs(10),
            io_timeout: Duration::from_secs(30),
            populate_ahead: true,
        }
    }
}

/// The decision after a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Send another round.
    Continue,
    /// Send another round with this throttle.
    Throttle(u8),
    /// Pause and switch over.
    Switchover(crate::stats::SwitchoverReason),
    /// Give up.
    Abort,
}

/// Tracks bandwidth and dirty rate across rounds and decides when to switch over.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    cfg: MigrationConfig,
    bandwidth: Option<f64>,
    throttle: u8,
    last_dirty: Option<u64>,
    stalled_rounds: u32,
}

impl Policy {
    /// A policy with the given settings.
    pub fn new(cfg: &MigrationConfig) -> Self {
        Policy {
            cfg: cfg.clone(),
            bandwidth: None,
            throttle: 0,
            last_dirty: None,
            stalled_rounds: 0,
        }
    }

    /// Records a round that moved `bytes` in `secs`. Rounds too small and too quick to measure
    /// are ignored; a small round that still took a while (a slow or capped link) counts.
    pub fn record_round(&mut self, bytes: u64, secs: f64) {
        if bytes > 0 && (bytes >= 4 << 20 || secs >= 0.02) {
            let bw = bytes as f64 / secs;
            // Weight recent rounds, but do not forget the large round 0 entirely.
            self.bandwidth = Some(match self.bandwidth {
                Some(old) => 0.5 * old + 0.5 * bw,
                None => bw,
            });
        }
    }

    /// Current bandwidth estimate in bytes per second, never above the configured cap.
    pub fn bandwidth(&self) -> f64 {
        // Before anything was measured, assume 1 GiB/s; tiny rounds fit any target.
        let estimate = self.bandwidth.unwrap_or(1024.0 * 1024.0 * 1024.0);
        match self.cfg.max_bandwidth {
            Some(cap) => estimate.min(cap as f64),
            None => estimate,
        }
    }

    /// Estimated time to send `dirty_pages` pages.
    pub fn estimate(&self, dirty_pages: u64) -> Duration {
        let bytes = dirty_pages as f64 * (crate::dirty::PAGE_SIZE as f64 + 16.0);
        Duration::from_secs_f64(bytes / self.bandwidth())
    }

    /// Current throttle, percent.
    pub fn throttle(&self) -> u8 {
        self.throttle
    }

    /// Decides after a round, given the dirty pages found and the time since pre-copy began.
    pub fn decide(&mut self, dirty_pages: u64, elapsed: Duration) -> Decision {
        use crate::stats::SwitchoverReason::*;
        if self.estimate(dirty_pages) <= self.cfg.downtime_target {
            return Decision::Switchover(Converged);
        }
        if elapsed >= self.cfg.timeout {
            return match self.cfg.on_timeout {
                TimeoutStrategy::Force => Decision::Switchover(Forced),
                TimeoutStrategy::Abort => Decision::Abort,
            };
        }
        // Not shrinking by at least 10% counts as stalled.
        let stalled = matches!(self.last_dirty, Some(prev) if dirty_pages * 10 > prev * 9);
        self.last_dirty = Some(dirty_pages);
        if stalled {
            self.stalled_rounds += 1;
        }
        if self.cfg.auto_converge
            && self.stalled_rounds >= 2
            && self.throttle < self.cfg.throttle_max
        {
            self.stalled_rounds = 0;
            self.throttle = if self.throttle == 0 {
                self.cfg.throttle_initial
            } else {
                self.throttle.saturating_add(self.cfg.throttle_increment)
            }
            .min(self.cfg.throttle_max);
            return Decision::Throttle(self.throttle);
        }
        Decision::Continue
    }
}

/// Paces a sender to a byte rate.
#[derive(Debug)]
pub(crate) struct RateLimiter {
    rate: Option<f64>,
    start: std::time::Instant,
    bytes: u64,
}

impl RateLimiter {
    /// `rate` in bytes per second; `None` = unlimited.
    pub fn new(rate: Option<f64>) -> Self {
        RateLimiter {
            rate,
            start: std::time::Instant::now(),
            bytes: 0,
        }
    }

    /// Accounts `bytes` and sleeps if ahead of the rate.
    pub fn account(&mut self, bytes: u64) {
        let Some(rate) = self.rate else { return };
        self.bytes += bytes;
        let due = Duration::from_secs_f64(self.bytes as f64 / rate);
        let elapsed = self.start.elapsed();
        if due > elapsed {
            std::thread::sleep(due - elapsed);
        }
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn bandwidth_never_exceeds_the_cap() {
        let cfg = MigrationConfig {
            max_bandwidth: Some(2 << 20),
            downtime_target: Duration::from_millis(1),
            ..MigrationConfig::default()
        };
        let mut p = Policy::new(&cfg);
        assert_eq!(
            p.bandwidth(),
            (2 << 20) as f64,
            "unmeasured: the cap, not 1 GiB/s"
        );
        // 272 dirty pages over 2 MiB/s take ~0.5 s: far from a 1 ms target.
        assert_ne!(
            p.decide(272, Duration::from_millis(10)),
            Decision::Switchover(crate::stats::SwitchoverReason::Converged)
        );
        p.record_round(8 << 20, 0.001);
        assert_eq!(p.bandwidth(), (2 << 20) as f64);
    }

    #[test]
    fn a_small_slow_round_is_measured() {
        let mut p = Policy::new(&MigrationConfig::default());
        p.record_round(1 << 20, 0.5); // 2 MiB/s
        assert!((p.bandwidth() - 2.0 * 1048576.0).abs() < 1.0);
        p.record_round(4096, 0.001); // too small and quick to tell anything
        assert!((p.bandwidth() - 2.0 * 1048576.0).abs() < 1.0);
    }
    use super::*;

    #[test]
    fn switches_over_when_estimate_fits() {
        let cfg = MigrationConfig {
            downtime_target: Duration::from_millis(50),
            ..Default::default()
        };
        let mut p = Policy::new(&cfg);
        p.record_round(1 << 30, 1.0); // 1 GiB/s
        // 100 ms worth of pages does not fit, 10 ms does.
        assert_eq!(p.decide(25_000, Duration::from_secs(1)), Decision::Continue);
        assert_eq!(
            p.decide(2_500, Duration::from_secs(1)),
            Decision::Switchover(crate::stats::SwitchoverReason::Converged)
        );
    }

    #[test]
    fn throttles_when_stalled_then_times_out() {
        let cfg = MigrationConfig {
            downtime_target: Duration::from_millis(1),
            timeout: Duration::from_secs(10),
            on_timeout: TimeoutStrategy::Abort,
            ..Default::default()
        };
        let mut p = Policy::new(&cfg);
        p.record_round(1 << 30, 1.0);
        let d: Vec<_> = (0..4)
            .map(|_| p.decide(100_000, Duration::from_secs(1)))
            .collect();
        assert!(d.contains(&Decision::Throttle(20)), "{d:?}");
        assert_eq!(p.decide(100_000, Duration::from_secs(11)), Decision::Abort);
    }
}
