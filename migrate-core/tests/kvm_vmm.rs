//! The reference VMM on real KVM: the guest runs, pauses, resumes, and its state moves to a
//! second VM in the same process.

mod kvm_common;

use kvm_common::{kvm_or_skip, wait_counter_above};
use migrate_core::vm::{IncomingVm, MigratableVm};
use migrate_core::vmm::{ReferenceVm, VmmConfig};

fn small(vcpus: u32) -> VmmConfig {
    VmmConfig {
        mem_size: 16 << 20,
        slot_size: 8 << 20,
        vcpus,
        working_set_pages: 64,
        ..Default::default()
    }
}

#[test]
fn guest_runs_and_counter_increases() {
    if !kvm_or_skip("guest_runs_and_counter_increases") {
        return;
    }
    let vm = ReferenceVm::new(small(1)).unwrap();
    assert_eq!(
        vm.status(0).unwrap().counter,
        0,
        "nothing runs before resume"
    );
    vm.resume().unwrap();
    let first = wait_counter_above(&vm, 0, 0);
    wait_counter_above(&vm, 0, first + 2);
    vm.pause().unwrap();
    let block = vm.check_working_set(0).unwrap();
    assert_eq!(block.errors, 0, "guest saw pages it did not write");
    assert!(
        block.checksum_consistent(),
        "checksum {block:?} does not match counter"
    );
    assert!(
        vm.heartbeats() >= block.counter,
        "every pass exits to the host once"
    );
}
