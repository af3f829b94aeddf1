//! KVM dirty tracking on the reference VMM: the dirty log (manual protect, chunked clear) and
//! the dirty ring report what the guest wrote, only plausible pages, and re-arm correctly.

mod kvm_common;

use kvm_common::{kvm_or_skip, wait_counter_above};
use migrate_core::dirty::{DirtyBitmap, PAGE_SIZE};
use migrate_core::kvm::{DirtyRingTracker, DirtyTracking};
use migrate_core::vm::MigratableVm;
use migrate_core::vmm::guest::{CODE_ADDR, PD_ADDR, STATUS_ADDR};
use migrate_core::vmm::{ReferenceVm, VmmConfig};
use std::collections::BTreeSet;
use vm_memory::{Bytes, GuestAddress};

fn pages(b: &DirtyBitmap) -> BTreeSet<u64> {
    let mut out = BTreeSet::new();
    for (start, words) in &b.regions {
        for (w, word) in words.iter().enumerate() {
            for bit in 0..64 {
                if word & (1 << bit) != 0 {
                    out.insert(start + (w as u64 * 64 + bit) * PAGE_SIZE);
                }
            }
        }
    }
    out
}

fn harvest(t: &mut Box<dyn migrate_core::dirty::DirtyTracker>) -> BTreeSet<u64> {
    let mut b = DirtyBitmap::default();
    t.harvest(&mut b).unwrap();
    pages(&b)
}

fn tracker_reports_guest_writes(tracking: DirtyTracking, test: &str) {
    if !kvm_or_skip(test) {
        return;
    }
    // Slots of 1.125 MiB: the working set (1 MiB .. 1.5 MiB) straddles slots 0 and 1.
    let config = VmmConfig {
        mem_size: 16 << 20,
        slot_size: 0x12_0000,
        vcpus: 2,
        working_set_pages: 64,
        tracking,
        ..Default::default()
    };
    let vm = ReferenceVm::new(config).unwrap();
    assert!(vm.kvm_vm().slots().len() > 2);
    let ws_start = vm.status(0).unwrap().ws_base;
    let ws_end = ws_start + 2 * 64 * PAGE_SIZE;
    let ws: BTreeSet<u64> = (ws_start..ws_end).step_by(PAGE_SIZE as usize).collect();
    let status_page = STATUS_ADDR;

    vm.resume().unwrap();
    wait_counter_above(&vm, 0, 1);
    let mut t = vm.dirty_tracker().unwrap();
    assert!(vm.dirty_tracker().is_err(), "two trackers on one VM");
    let c0 = vm.status(0).unwrap().counter;
    let c1 = vm.status(1).unwrap().counter;
    wait_counter_above(&vm, 0, c0 + 2);
    wait_counter_above(&vm, 1, c1 + 2);
    let dirty = harvest(&mut t);
    // Two full passes of both vCPUs since the tracker started: every working-set page and
    // the status page were written...
    for p in ws.iter().chain([&status_page]) {
        assert!(dirty.contains(p), "page {p:#x} written but not reported");
    }
    // ...and nothing else: not the code, not the page tables, nothing past the working sets.
    let unexpected: Vec<_> = dirty
        .iter()
        .filter(|p| !ws.contains(p) && **p != status_page)
        .collect();
    assert!(
        unexpected.is_empty(),
        "implausible dirty pages {unexpected:x?}"
    );
    assert!(!dirty.contains(&CODE_ADDR) && !dirty.contains(&PD_ADDR));

    // Paused: one harvest drains what was written up to the pause, the next sees nothing.
    vm.pause().unwrap();
    harvest(&mut t);
    assert_eq!(
        harvest(&mut t),
        BTreeSet::new(),
        "a paused guest dirtied pages"
    );

    // The VMM's own writes (through vm-memory) are part of the dirty set.
    let host_page = 12 << 20;
    vm.memory()
        .write_obj(7u64, GuestAddress(host_page + 8))
        .unwrap();
    assert_eq!(harvest(&mut t), BTreeSet::from([host_page]));
    assert_eq!(harvest(&mut t), BTreeSet::new());

    // Running again, only new writes are reported, and they are the working set again.
    vm.set_dirty_delay(0).unwrap(); // a host write to the status page
    let c = vm.status(0).unwrap().counter;
    vm.resume().unwrap();
    wait_counter_above(&vm, 0, c + 2);
    let again = harvest(&mut t);
    assert!(
        again.iter().all(|p| ws.contains(p) || *p == status_page),
        "{again:x?}"
    );
    assert!(again.contains(&ws_start), "{again:x?}");

    // After stop, a new tracker can start (a second migration attempt).
    t.stop().unwrap();
    let mut t2 = vm.dirty_tracker().unwrap();
    let c = vm.status(0).unwrap().counter;
    wait_counter_above(&vm, 0, c + 2);
    assert!(harvest(&mut t2).contains(&ws_start));
    t2.stop().unwrap();
    vm.pause().unwrap();
    assert_eq!(vm.check_working_set(0).unwrap().errors, 0);
}

#[test]
fn dirty_log_reports_guest_writes_and_rearms() {
    tracker_reports_guest_writes(
        DirtyTracking::DirtyLog,
        "dirty_log_reports_guest_writes_and_rearms",
    );
}

#[test]
fn dirty_ring_reports_guest_writes_and_rearms() {
    tracker_reports_guest_writes(
        DirtyTracking::DirtyRing,
        "dirty_ring_reports_guest_writes_and_rearms",
    );
}

#[test]
fn dirty_ring_survives_more_pages_than_entries() {
    if !kvm_or_skip("dirty_ring_survives_more_pages_than_entries") {
        return;
    }
    // 96 MiB of working set = 24576 pages per pass; three passes exceed one ring (65536)
    // unless the background harvester and the ring-full exit keep up.
    let config = VmmConfig {
        mem_size: 128 << 20,
        working_set_pages: 24576,
        tracking: DirtyTracking::DirtyRing,
        ..Default::default()
    };
    let vm = ReferenceVm::new(config).unwrap();
    vm.resume().unwrap();
    let mut t = vm.dirty_tracker().unwrap();
    wait_counter_above(&vm, 0, 3);
    vm.pause().unwrap();
    let dirty = harvest(&mut t);
    assert!(
        dirty.len() as u64 >= 24576,
        "only {} pages reported",
        dirty.len()
    );
    let b = vm.check_working_set(0).unwrap();
    assert_eq!(b.errors, 0);
    assert!(vm.failure().is_none(), "{:?}", vm.failure());
}

#[test]
fn full_dirty_ring_is_collected_by_the_vcpu_or_fails_clearly() {
    if !kvm_or_skip("full_dirty_ring_is_collected_by_the_vcpu_or_fails_clearly") {
        return;
    }
    // A ring of 4096 entries, no background harvester, 8192 pages per pass: the ring fills.
    // KVM stops the vCPU (KVM_EXIT_DIRTY_RING_FULL) and the vCPU collects the ring itself.
    // kvm_pvm stops it too late: the ring overflows and wedges. Either way nothing may hang:
    // the guest goes on, or the vCPU stops with an error that says what happened.
    let config = VmmConfig {
        mem_size: 48 << 20,
        working_set_pages: 8192,
        tracking: DirtyTracking::DirtyRing,
        dirty_ring_entries: 4096,
        ..Default::default()
    };
    let vm = ReferenceVm::new(config).unwrap();
    let mut t: Box<dyn migrate_core::dirty::DirtyTracker> =
        Box::new(DirtyRingTracker::start_with(vm.kvm_vm().clone(), None).unwrap());
    vm.resume().unwrap();
    kvm_common::wait_for("three passes or a vCPU failure", || {
        vm.failure().is_some() || vm.status(0).unwrap().counter > 3
    });
    vm.pause().unwrap();
    assert!(vm.kvm_vm().ring_full_exits() > 0, "the ring never filled");
    let dirty = harvest(&mut t);
    match vm.failure() {
        None => {
            let b = vm.check_working_set(0).unwrap();
            assert_eq!(b.errors, 0);
            let ws: BTreeSet<u64> = (0..8192).map(|i| b.ws_base + i * PAGE_SIZE).collect();
            assert!(
                ws.is_subset(&dirty),
                "{} of 8192 pages reported",
                ws.intersection(&dirty).count()
            );
        }
        Some(f) => {
            eprintln!("this KVM wedges an overflowing dirty ring: {f}");
            assert!(f.contains("dirty ring overflowed"), "{f}");
            assert!(vm.resume().is_err(), "a wedged vCPU must not be resumed");
            assert!(vm.is_paused());
            // What was collected before the overflow is still reported, and is plausible.
            let b = vm.status(0).unwrap();
            let ws_end = b.ws_base + 8192 * PAGE_SIZE;
            assert!(!dirty.is_empty());
            assert!(
                dirty
                    .iter()
                    .all(|p| (b.ws_base..ws_end).contains(p) || *p == STATUS_ADDR),
                "implausible pages reported"
            );
        }
    }
    t.stop().unwrap();
}

#[test]
fn dirty_log_uses_manual_protect_where_kvm_offers_it_and_checks_clear_ranges() {
    if !kvm_or_skip("dirty_log_uses_manual_protect_where_kvm_offers_it_and_checks_clear_ranges") {
        return;
    }
    let vm = ReferenceVm::new(VmmConfig::default()).unwrap();
    let kvm_vm = vm.kvm_vm();
    let offered = kvm_vm
        .fd()
        .check_extension_raw(u64::from(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2))
        > 0;
    assert_eq!(kvm_vm.manual_protect(), offered);
    // KVM_CLEAR_DIRTY_LOG ranges must start on a 64-page boundary and fit the bitmap given.
    let bits = [u64::MAX; 2];
    use migrate_core::kvm::raw::clear_dirty_log;
    assert!(clear_dirty_log(kvm_vm.fd(), 0, 3, 64, &bits).is_err());
    assert!(clear_dirty_log(kvm_vm.fd(), 0, 0, 129, &bits).is_err());
    if offered {
        let _t = vm.dirty_tracker().unwrap(); // logging on: clearing is allowed now
        clear_dirty_log(kvm_vm.fd(), 0, 64, 128, &bits).unwrap();
        // A slot that does not exist is KVM's error, reported with the ioctl's name.
        let e = clear_dirty_log(kvm_vm.fd(), 77, 0, 64, &bits)
            .unwrap_err()
            .to_string();
        assert!(e.contains("KVM_CLEAR_DIRTY_LOG"), "{e}");
    }
}
