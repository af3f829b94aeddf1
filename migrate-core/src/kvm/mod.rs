//! KVM pieces kvm-ioctls does not wrap: dirty log clearing and dirty ring harvesting, and the
//! [`DirtyTracker`](crate::dirty::DirtyTracker)s built on them.
//!
//! [`KvmVm`] owns a KVM VM fd together with the guest memory registered in it (one memory
//! slot per vm-memory region), so a slot can never outlive the mapping it points to.
//! [`DirtyLogTracker`] reads the per-slot dirty log with manual protection and clears it in
//! chunks; [`DirtyRingTracker`] collects the per-vCPU dirty rings. Both OR in vm-memory's
//! bitmap of the VMM's own writes, so a harvest is the whole dirty set.
//!
//! On kvm_pvm (this project's test machines) a vCPU is not stopped at the ring's soft limit
//! in time: a ring that fills overflows and stays "full" with nothing to collect. Rings are
//! therefore large ([`DIRTY_RING_ENTRIES`]) and a background thread empties them every few
//! milliseconds; a vCPU that meets a wedged ring stops with an error instead of spinning.

pub mod raw;
mod tracker;

pub use tracker::{DirtyLogTracker, DirtyRingTracker};

use crate::dirty::PAGE_SIZE;
use crate::vm::GuestMemory;
use crate::{Error, Result};
use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use raw::DirtyRing;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion};

/// Entries per vCPU dirty ring. 4096 overflowed and wedged harvesting on kvm_pvm; 65536 holds
/// 256 MiB of dirtied pages between harvests.
pub const DIRTY_RING_ENTRIES: u32 = 65536;

/// Pages per `KVM_CLEAR_DIRTY_LOG` call, so the kernel's MMU lock is held only briefly.
pub const CLEAR_CHUNK_PAGES: u64 = 16384;

/// How KVM reports the pages the guest writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub enum DirtyTracking {
    /// Per-slot dirty bitmap (`KVM_GET_DIRTY_LOG`, manual protect, `KVM_CLEAR_DIRTY_LOG`).
    #[default]
    DirtyLog,
    /// Per-vCPU dirty ring ([`DIRTY_RING_ENTRIES`] entries unless
    /// [`KvmVm::with_ring_entries`] says otherwise).
    DirtyRing,
}

/// One KVM memory slot: a vm-memory region registered with KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSlot {
    /// KVM slot number (the region's index).
    pub slot: u32,
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Size in bytes (a multiple of [`PAGE_SIZE`]).
    pub size: u64,
    /// Where the region is mapped in this process.
    pub host_addr: u64,
}

impl MemSlot {
    /// Number of 4 KiB pages in the slot.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
}

/// Collected-but-not-yet-reported dirty pages from the rings, per slot.
#[derive(Debug, Default)]
struct RingState {
    rings: Vec<DirtyRing>,
    pending: Vec<Vec<u64>>,
}

/// A KVM VM fd and the guest memory registered as its memory slots.
///
/// Field order matters: the VM fd (and with it every slot) is dropped before the memory.
#[derive(Debug)]
pub struct KvmVm {
    fd: VmFd,
    memory: GuestMemory,
    slots: Vec<MemSlot>,
    tracking: DirtyTracking,
    manual_protect: bool,
    logging: AtomicBool,
    tracker_active: AtomicBool,
    ring_entries: u32,
    ring_full_exits: AtomicU64,
    rings: Mutex<RingState>,
}

impl KvmVm {
    /// Creates a VM, sets up the chosen dirty tracking (before any vCPU exists, as the dirty
    /// ring requires) and registers every region of `memory` as a slot, logging off.
    pub fn new(kvm: &Kvm, memory: GuestMemory, tracking: DirtyTracking) -> Result<Self> {
        Self::with_ring_entries(kvm, memory, tracking, DIRTY_RING_ENTRIES)
    }

    /// [`KvmVm::new`] with dirty rings of `ring_entries` entries (a power of two; ignored for
    /// the dirty log). Small rings fill fast: for tests of the ring-full path.
    pub fn with_ring_entries(
        kvm: &Kvm,
        memory: GuestMemory,
        tracking: DirtyTracking,
        ring_entries: u32,
    ) -> Result<Self> {
        let fd = kvm.create_vm().map_err(|source| Error::Kvm {
            op: "KVM_CREATE_VM",
            source,
        })?;
        let mut manual_protect = false;
        match tracking {
            DirtyTracking::DirtyLog => manual_protect = raw::enable_manual_dirty_log_protect(&fd)?,
            DirtyTracking::DirtyRing => raw::enable_dirty_ring(&fd, ring_entries)?,
        }
        let slots: Vec<MemSlot> = memory
            .iter()
            .enumerate()
            .map(|(i, r)| MemSlot {
                slot: i as u32,
                guest_addr: r.start_addr().0,
                size: r.len(),
                host_addr: r.as_ptr() as u64,
            })
            .collect();
        let pending = slots
            .iter()
            .map(|s| vec![0u64; s.pages().div_ceil(64) as usize])
            .collect();
        let vm = KvmVm {
            fd,
            memory,
            slots,
            tracking,
            manual_protect,
            logging: AtomicBool::new(false),
            tracker_active: AtomicBool::new(false),
            ring_entries,
            ring_full_exits: AtomicU64::new(0),
            rings: Mutex::new(RingState {
                rings: Vec::new(),
                pending,
            }),
        };
        for slot in &vm.slots {
            vm.register(slot, false)?;
        }
        Ok(vm)
    }

    fn register(&self, slot: &MemSlot, log: bool) -> Result<()> {
        if slot.size % PAGE_SIZE != 0 || slot.guest_addr % PAGE_SIZE != 0 {
            return Err(Error::Memory(format!(
                "region at {:#x} of {:#x} bytes is not page aligned",
                slot.guest_addr, slot.size
            )));
        }
        let region = kvm_userspace_memory_region {
            slot: slot.slot,
            flags: if log { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: slot.guest_addr,
            memory_size: slot.size,
            userspace_addr: slot.host_addr,
        };
        // SAFETY: the host range is a region of `self.memory`, which stays mapped as long as
        // `self` lives, and `self.fd` (the only owner of the VM, and so of the slot) is dropped
        // before `self.memory` (field order).
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| Error::Kvm {
            op: "KVM_SET_USER_MEMORY_REGION",
            source,
        })
    }

    /// Turns `KVM_MEM_LOG_DIRTY_PAGES` on or off for every slot.
    pub fn set_logging(&self, on: bool) -> Result<()> {
        for slot in &self.slots {
            self.register(slot, on)?;
        }
        self.logging.store(on, Ordering::SeqCst);
        Ok(())
    }

    /// The VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// The guest memory registered in the VM.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// The memory slots, in region order.
    pub fn slots(&self) -> &[MemSlot] {
        &self.slots
    }

    /// The dirty tracking chosen at creation.
    pub fn tracking(&self) -> DirtyTracking {
        self.tracking
    }

    /// Whether manual dirty-log protection is on (dirty log tracking only).
    pub fn manual_protect(&self) -> bool {
        self.manual_protect
    }

    /// Creates vCPU `id`, mapping its dirty ring when the VM uses one.
    pub fn create_vcpu(&self, id: u64) -> Result<VcpuFd> {
        let vcpu = self.fd.create_vcpu(id).map_err(|source| Error::Kvm {
            op: "KVM_CREATE_VCPU",
            source,
        })?;
        if self.tracking == DirtyTracking::DirtyRing {
            let ring = DirtyRing::map(raw::vcpu_raw_fd(&vcpu), self.ring_entries)?;
            self.lock_rings().rings.push(ring);
        }
        Ok(vcpu)
    }

    fn lock_rings(&self) -> std::sync::MutexGuard<'_, RingState> {
        // A panic while holding the lock leaves only bitmaps behind: still usable.
        self.rings.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Collects every vCPU's dirty ring into the pending set and lets KVM recycle the entries.
    /// Called by the tracker and by a vCPU thread whose ring is full.
    pub fn collect_rings(&self) -> Result<u64> {
        let mut state = self.lock_rings();
        let RingState { rings, pending } = &mut *state;
        let mut total = 0u64;
        let mut bad = None;
        for ring in rings.iter_mut() {
            total += u64::from(ring.harvest(|slot, offset| {
                let slot_id = (slot & 0xffff) as usize;
                match pending.get_mut(slot_id) {
                    Some(bits) if (offset / 64) < bits.len() as u64 => {
                        bits[(offset / 64) as usize] |= 1 << (offset % 64)
                    }
                    _ => bad = Some((slot, offset)),
                }
            }));
        }
        if total > 0 {
            raw::reset_dirty_rings(&self.fd)?;
        }
        if let Some((slot, offset)) = bad {
            return Err(Error::Memory(format!(
                "dirty ring reported page {offset} of unknown slot {slot}"
            )));
        }
        Ok(total)
    }

    /// A vCPU found its ring full (`KVM_EXIT_DIRTY_RING_FULL`): collect, and count it.
    pub fn on_ring_full(&self) -> Result<u64> {
        self.ring_full_exits.fetch_add(1, Ordering::Relaxed);
        self.collect_rings()
    }

    /// How often a vCPU stopped on a full dirty ring.
    pub fn ring_full_exits(&self) -> u64 {
        self.ring_full_exits.load(Ordering::Relaxed)
    }

    /// Takes the pages collected from the rings so far, leaving the pending set empty.
    fn take_ring_pending(&self) -> Vec<Vec<u64>> {
        let mut state = self.lock_rings();
        state
            .pending
            .iter_mut()
            .map(|bits| std::mem::replace(bits, vec![0; bits.len()]))
            .collect()
    }

    /// Claims the single tracker slot; a VM has at most one migration at a time.
    fn claim_tracker(&self) -> Result<()> {
        if self.tracker_active.swap(true, Ordering::SeqCst) {
            return Err(Error::VmControl(
                "a dirty tracker is already active on this VM".into(),
            ));
        }
        Ok(())
    }

    fn release_tracker(&self) {
        self.tracker_active.store(false, Ordering::SeqCst);
    }
}
