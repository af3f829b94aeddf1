//! The reference VMM on real KVM: the guest runs, pauses, resumes, and its state moves to a
//! second VM in the same process.

mod kvm_common;

use kvm_common::{kvm_or_skip, wait_counter_above};
use migrate_core::vm::{IncomingVm, MigratableVm};
use migrate_core::vmm::{ReferenceVm, VmmConfig};
use std::time::Duration;

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

#[test]
fn pause_stops_the_counter_and_resume_continues_it() {
    if !kvm_or_skip("pause_stops_the_counter_and_resume_continues_it") {
        return;
    }
    let vm = ReferenceVm::new(small(2)).unwrap();
    vm.resume().unwrap();
    wait_counter_above(&vm, 0, 2);
    wait_counter_above(&vm, 1, 2);
    vm.pause().unwrap();
    assert!(vm.is_paused());
    let before = [vm.status(0).unwrap(), vm.status(1).unwrap()];
    let beats = vm.heartbeats();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        [vm.status(0).unwrap(), vm.status(1).unwrap()],
        before,
        "a paused guest ran"
    );
    assert_eq!(vm.heartbeats(), beats);
    vm.pause().unwrap(); // idempotent
    vm.resume().unwrap();
    wait_counter_above(&vm, 0, before[0].counter + 1);
    wait_counter_above(&vm, 1, before[1].counter + 1);
    // Throttled, the guest still makes progress and still pauses.
    vm.set_throttle(90).unwrap();
    let now = vm.status(0).unwrap().counter;
    wait_counter_above(&vm, 0, now + 1);
    vm.pause().unwrap();
    for i in 0..2 {
        let b = vm.check_working_set(i).unwrap();
        assert_eq!(b.errors, 0);
        assert!(b.checksum_consistent(), "{b:?}");
    }
}

/// Copies every byte of `from`'s memory into `to`'s (what a migration does, minus the wire).
fn copy_memory(from: &ReferenceVm, to: &ReferenceVm) {
    use vm_memory::{Bytes, GuestAddress};
    let size = from.config().mem_size;
    let mut buf = vec![0u8; 1 << 20];
    let mut addr = 0;
    while addr < size {
        let n = buf.len().min((size - addr) as usize);
        from.memory()
            .read_slice(&mut buf[..n], GuestAddress(addr))
            .unwrap();
        to.memory()
            .write_slice(&buf[..n], GuestAddress(addr))
            .unwrap();
        addr += n as u64;
    }
}

#[test]
fn saved_state_restored_into_a_second_vm_continues_counting() {
    if !kvm_or_skip("saved_state_restored_into_a_second_vm_continues_counting") {
        return;
    }
    let config = small(2);
    let src = ReferenceVm::new(config.clone()).unwrap();
    src.resume().unwrap();
    wait_counter_above(&src, 0, 3);
    wait_counter_above(&src, 1, 3);
    src.pause().unwrap();
    let saved = [
        src.check_working_set(0).unwrap(),
        src.check_working_set(1).unwrap(),
    ];
    let state = MigratableVm::save_state(&src).unwrap();
    assert!(!src.msr_indices().is_empty(), "no MSR saved");

    let dst = ReferenceVm::new_incoming(config).unwrap();
    copy_memory(&src, &dst);
    dst.restore_state(&state).unwrap();
    IncomingVm::resume(&dst).unwrap();
    for (i, s) in saved.iter().enumerate() {
        wait_counter_above(&dst, i as u32, s.counter + 2);
    }
    dst.pause().unwrap();
    for i in 0..2 {
        let b = dst.check_working_set(i).unwrap();
        assert_eq!(b.errors, 0, "vCPU {i} found stale pages after restore");
        assert!(
            b.checksum_consistent(),
            "vCPU {i}: checksum does not continue the source's: {b:?}"
        );
    }
    // The source stayed where it was.
    assert_eq!(src.status(0).unwrap(), saved[0]);
    // A state restored twice is fine; a state for another VM shape is refused.
    let other = ReferenceVm::new_incoming(small(1)).unwrap();
    let e = other.restore_state(&state).unwrap_err().to_string();
    assert!(e.contains("2 vCPUs"), "{e}");
}

#[test]
fn refused_msr_is_a_clear_error() {
    if !kvm_or_skip("refused_msr_is_a_clear_error") {
        return;
    }
    let src = ReferenceVm::new(small(1)).unwrap();
    src.pause().unwrap();
    let mut state = src.capture_state().unwrap();
    state.vcpus[0].msrs.push((0xdead_beef, 1));
    let dst = ReferenceVm::new_incoming(small(1)).unwrap();
    let e = dst.restore_state(&state.encode()).unwrap_err().to_string();
    assert!(e.contains("MSR 0xdeadbeef") && e.contains("refused"), "{e}");
    let n = src.msr_indices().len();
    assert!(e.contains(&format!("set {n} of {}", n + 1)), "{e}");
}

#[test]
fn guest_detects_a_page_it_did_not_write() {
    if !kvm_or_skip("guest_detects_a_page_it_did_not_write") {
        return;
    }
    use vm_memory::{Bytes, GuestAddress};
    let vm = ReferenceVm::new(small(1)).unwrap();
    vm.resume().unwrap();
    wait_counter_above(&vm, 0, 2);
    vm.pause().unwrap();
    let b = vm.check_working_set(0).unwrap();
    assert_eq!(b.errors, 0);
    // Make the first and the last page stale, as a migration that lost dirty pages would. Two
    // pages, because the vCPU may have been paused between loading a page and storing its new
    // value: it then overwrites that one page with a value it already found correct (which no
    // migration can cause: the destination gets the memory as it was at the pause). A single
    // pause point can hide at most one of the two.
    let pages = [b.ws_base, b.ws_base + (b.ws_pages - 1) * 4096];
    for page in pages {
        vm.memory()
            .write_obj(b.counter.wrapping_sub(5), GuestAddress(page))
            .unwrap();
    }
    assert!(
        vm.check_working_set(0).is_err(),
        "host-side check missed the stale pages"
    );
    vm.resume().unwrap();
    wait_counter_above(&vm, 0, b.counter + 2);
    vm.pause().unwrap();
    let errors = vm.status(0).unwrap().errors;
    assert!(
        (1..=2).contains(&errors),
        "the guest noticed {errors} of the 2 stale pages"
    );
}

#[test]
fn dirty_rate_target_steers_the_spin_delay() {
    if !kvm_or_skip("dirty_rate_target_steers_the_spin_delay") {
        return;
    }
    // Far below what the guest does at full speed: the governor must make it spin.
    let config = VmmConfig {
        dirty_rate_mib_s: Some(2),
        ..small(1)
    };
    let vm = ReferenceVm::new(config).unwrap();
    vm.resume().unwrap();
    kvm_common::wait_for("the governor to raise the delay", || {
        vm.status(0).unwrap().delay > 10
    });
    let c = vm.status(0).unwrap().counter;
    wait_counter_above(&vm, 0, c + 1);
    vm.pause().unwrap();
    // Paused, the governor leaves guest memory alone.
    let before = vm.status(0).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(vm.status(0).unwrap(), before);
    assert_eq!(vm.check_working_set(0).unwrap().errors, 0);
}
