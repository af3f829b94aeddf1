//! Holds the guest's dirty rate near a target in MiB/s by adjusting the per-page spin delay
//! the program reads from guest memory (`delay` in each vCPU block).
//! Progress is measured in pages written (the program counts every page), so the estimate
//! is fine-grained even when one pass over a large working set takes longer than a window.
//!
//! The rate the program reaches for a given delay depends on the host (kvm_pvm emulates every
//! instruction), so the governor measures it: every [`PERIOD`] it reads each vCPU's page count
//! and scales that vCPU's delay by measured/target, damped to at most 2x per step.

use super::guest::{self, VcpuBlock};
use crate::dirty::PAGE_SIZE;
use crate::vm::GuestMemory;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Measurement window.
pub const PERIOD: Duration = Duration::from_millis(100);
/// Largest delay the governor sets (about a second per page at this machine's speed).
const MAX_DELAY: u64 = 1 << 22;

/// The running governor; stops when dropped.
#[derive(Debug)]
pub struct RateGovernor {
    quit: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl RateGovernor {
    /// Starts steering `vcpus` vCPUs towards `target_mib_s` in total. `gate` is held while
    /// writing guest memory and is true while the VM is paused (nothing is written then).
    pub fn start(
        memory: GuestMemory,
        vcpus: u32,
        target_mib_s: f64,
        gate: Arc<Mutex<bool>>,
    ) -> std::io::Result<Self> {
        let quit = Arc::new(AtomicBool::new(false));
        let q = quit.clone();
        let thread = std::thread::Builder::new()
            .name("dirty-rate".into())
            .spawn(move || {
                let per_vcpu = target_mib_s * f64::from(1u32 << 20) / f64::from(vcpus);
                let mut last: Vec<Option<(u64, Instant)>> = vec![None; vcpus as usize];
                while !q.load(Ordering::Relaxed) {
                    std::thread::sleep(PERIOD);
                    let paused = gate.lock().unwrap_or_else(|p| p.into_inner());
                    if *paused {
                        last.iter_mut().for_each(|l| *l = None);
                        continue;
                    }
                    for (i, prev) in last.iter_mut().enumerate() {
                        let Ok(b) = VcpuBlock::read(&memory, i as u32) else {
                            continue;
                        };
                        let now = Instant::now();
                        if let Some((p0, t0)) = *prev {
                            let secs = now.duration_since(t0).as_secs_f64();
                            let rate =
                                b.pages_written.wrapping_sub(p0) as f64 * PAGE_SIZE as f64 / secs;
                            let delay = next_delay(b.delay, rate, per_vcpu);
                            if delay != b.delay {
                                let _ = guest::write_delay(&memory, i as u32, delay);
                            }
                        }
                        *prev = Some((b.pages_written, now));
                    }
                }
            })?;
        Ok(RateGovernor {
            quit,
            thread: Some(thread),
        })
    }
}

/// The delay for the next window, given the rate the current one produced.
fn next_delay(delay: u64, rate: f64, target: f64) -> u64 {
    if target <= 0.0 {
        return MAX_DELAY;
    }
    let ratio = (rate / target).clamp(0.5, 2.0);
    if (0.95..=1.05).contains(&ratio) {
        return delay;
    }
    if delay == 0 {
        // Full speed and still too slow: nothing to gain; too fast: start spinning.
        return if ratio > 1.0 { 1 } else { 0 };
    }
    let next = (delay as f64 * ratio).round() as u64;
    // Small delays move by at least one step so the loop cannot get stuck.
    let next = if ratio > 1.0 {
        next.max(delay + 1)
    } else {
        next.min(delay - 1)
    };
    next.min(MAX_DELAY)
}

impl Drop for RateGovernor {
    fn drop(&mut self) {
        self.quit.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::next_delay;

    #[test]
    fn delay_moves_towards_the_target() {
        assert!(next_delay(100, 200.0, 100.0) > 100, "too fast: spin longer");
        assert!(next_delay(100, 50.0, 100.0) < 100, "too slow: spin less");
        assert_eq!(next_delay(100, 100.0, 100.0), 100);
        assert_eq!(next_delay(0, 50.0, 100.0), 0);
        assert_eq!(next_delay(0, 500.0, 100.0), 1);
        assert_eq!(next_delay(1, 10.0, 100.0), 0);
    }
}
