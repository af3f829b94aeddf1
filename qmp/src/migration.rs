//! Waiting for a migration: polls `query-migrate`, waking early on `MIGRATION` events (sent
//! when the `events` capability is on), and reports progress on every poll.

use std::time::{Duration, Instant};

use crate::connection::Qmp;
use crate::error::{Error, Result};
use crate::events::{EventFilter, MIGRATION};
use crate::types::{MigrationInfo, MigrationStatus};

/// How [`wait_for_migration`] waits.
#[derive(Debug, Clone)]
pub struct MigrationWait {
    /// Give up after this long.
    pub timeout: Duration,
    /// Poll `query-migrate` at least this often.
    pub poll_interval: Duration,
    /// Return successfully on reaching any of these statuses.
    pub until: Vec<MigrationStatus>,
}

impl Default for MigrationWait {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(300),
            poll_interval: Duration::from_millis(100),
            until: vec![MigrationStatus::Completed],
        }
    }
}

impl MigrationWait {
    /// Wait for `completed` within `timeout`.
    pub fn completed_within(timeout: Duration) -> Self {
        Self {
            timeout,
            ..Self::default()
        }
    }

    /// Wait for `status` (e.g. `pre-switchover`) within `timeout`.
    pub fn status_within(status: MigrationStatus, timeout: Duration) -> Self {
        Self {
            timeout,
            until: vec![status],
            ..Self::default()
        }
    }
}

/// Waits until the source's migration reaches one of `wait.until` and returns the typed
/// `query-migrate` reply read at that moment (final stats once `completed`).
///
/// `progress` sees every reply polled on the way. A migration that ends `failed` or
/// `cancelled` (unless listed in `until`) gives [`Error::MigrationFailed`] with QEMU's
/// `error-desc`; no target status within `wait.timeout` gives [`Error::Timeout`].
pub fn wait_for_migration(
    qmp: &Qmp,
    wait: &MigrationWait,
    mut progress: impl FnMut(&MigrationInfo),
) -> Result<MigrationInfo> {
    let deadline = Instant::now() + wait.timeout;
    let mut events = qmp.subscribe(EventFilter::names(&[MIGRATION]));
    loop {
        let info = qmp.query_migrate()?;
        progress(&info);
        let status = info.status();
        if wait.until.contains(&status) {
            return Ok(info);
        }
        if status.is_terminal() {
            let desc = info
                .error_desc
                .clone()
                .unwrap_or_else(|| "no error description".into());
            return Err(Error::MigrationFailed { status, desc });
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            let targets: Vec<&str> = wait.until.iter().map(MigrationStatus::as_str).collect();
            return Err(Error::Timeout {
                what: format!(
                    "migration to reach {} (last status {status})",
                    targets.join("/")
                ),
                after: wait.timeout,
            });
        }
        // An event only shortens the sleep; the next poll reads the authoritative state.
        match events.next_timeout(wait.poll_interval.min(remaining)) {
            Ok(_) | Err(Error::Timeout { .. }) => {}
            Err(e) => return Err(e),
        }
    }
}
