//! Shared helpers for the KVM tests: skip where /dev/kvm is unusable, bounded waits, a
//! destination VM that records what the migration delivered.

#![allow(dead_code)]

use migrate_core::pages::page_hashes;
use migrate_core::vm::{GuestMemory, IncomingVm, MigratableVm};
use migrate_core::vmm::{ReferenceVm, kvm_usable};
use std::io::Write;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Upper bound for any wait on the guest (the machine is slow and shared; this is a hang
/// guard, not a performance assertion).
pub const WAIT: Duration = Duration::from_secs(120);

/// True if KVM works here. Otherwise prints `SKIPPED: <test>: <why>` and returns false, or
/// panics when NINJA_REQUIRE contains "kvm" (CI).
pub fn kvm_or_skip(test: &str) -> bool {
    match kvm_usable() {
        Ok(()) => true,
        Err(why) => {
            if std::env::var("NINJA_REQUIRE")
                .unwrap_or_default()
                .contains("kvm")
            {
                panic!("{test}: KVM required (NINJA_REQUIRE) but unusable: {why}");
            }
            let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
            false
        }
    }
}

/// Polls `cond` until it holds; panics with `what` after [`WAIT`].
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until vCPU `index`'s counter exceeds `above`; panics if a vCPU failed.
pub fn wait_counter_above(vm: &ReferenceVm, index: u32, above: u64) -> u64 {
    let mut last = 0;
    wait_for(&format!("vCPU {index} counter above {above}"), || {
        if let Some(f) = vm.failure() {
            panic!("vCPU failed: {f}");
        }
        last = vm.status(index).unwrap().counter;
        last > above
    });
    last
}

/// What a destination held when it was resumed: a hash of every page and each vCPU's counter.
pub struct AtResume {
    pub hashes: Vec<u64>,
    pub counters: Vec<u64>,
}

/// The destination VM, recording [`AtResume`] at the moment it is resumed (after the commit,
/// before any guest instruction runs there): exactly what the migration delivered.
pub struct HashAtResume {
    pub vm: ReferenceVm,
    at_resume: Mutex<Option<AtResume>>,
}

impl HashAtResume {
    pub fn new(vm: ReferenceVm) -> HashAtResume {
        HashAtResume {
            vm,
            at_resume: Mutex::new(None),
        }
    }

    /// What was recorded; panics if the VM was never resumed.
    pub fn take(&self) -> AtResume {
        self.at_resume
            .lock()
            .unwrap()
            .take()
            .expect("destination never resumed")
    }
}

impl IncomingVm for HashAtResume {
    fn memory(&self) -> &GuestMemory {
        MigratableVm::memory(&self.vm)
    }
    fn restore_state(&self, state: &[u8]) -> migrate_core::Result<()> {
        self.vm.restore_state(state)
    }
    fn resume(&self) -> migrate_core::Result<()> {
        let hashes = page_hashes(MigratableVm::memory(&self.vm)).expect("hash guest memory");
        let counters = (0..self.vm.config().vcpus)
            .map(|i| self.vm.status(i).map(|b| b.counter))
            .collect::<migrate_core::Result<_>>()?;
        *self.at_resume.lock().unwrap() = Some(AtResume { hashes, counters });
        IncomingVm::resume(&self.vm)
    }
}
