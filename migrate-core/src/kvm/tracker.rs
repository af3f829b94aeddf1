//! Dirty trackers on KVM: the per-slot dirty log and the per-vCPU dirty ring, each ORed with
//! vm-memory's bitmap of the VMM's own writes.

use super::{CLEAR_CHUNK_PAGES, KvmVm, MemSlot, raw};
use crate::dirty::{DirtyBitmap, DirtyTracker};
use crate::{Error, Result};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;
use vm_memory::GuestMemoryBackend as _;

/// How often the background harvester empties the dirty rings while a ring tracker lives.
const RING_HARVEST_INTERVAL: Duration = Duration::from_millis(5);

/// Makes `into` one zeroed bitmap per slot if it is empty, or checks it already matches.
fn ensure_layout(into: &mut DirtyBitmap, slots: &[MemSlot]) -> Result<()> {
    if into.regions.is_empty() {
        into.regions = slots
            .iter()
            .map(|s| (s.guest_addr, vec![0; s.pages().div_ceil(64) as usize]))
            .collect();
        return Ok(());
    }
    let matches = into.regions.len() == slots.len()
        && into.regions.iter().zip(slots).all(|((start, words), s)| {
            *start == s.guest_addr && words.len() as u64 == s.pages().div_ceil(64)
        });
    if matches {
        Ok(())
    } else {
        Err(Error::Memory(
            "dirty bitmap layout does not match the VM's memory slots".into(),
        ))
    }
}

fn or_into(dst: &mut [u64], src: &[u64]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d |= *s;
    }
}

/// ORs and clears vm-memory's record of the VMM's own writes, region by region.
fn harvest_vmm_writes(vm: &KvmVm, into: &mut DirtyBitmap) {
    for (region, (_, words)) in vm.memory().iter().zip(into.regions.iter_mut()) {
        // The region's whole bitmap (the `Deref` target's), not a slice view.
        let bitmap = vm_memory::MmapRegion::bitmap(region);
        or_into(words, &bitmap.get_and_reset());
    }
}

fn reset_vmm_writes(vm: &KvmVm) {
    for region in vm.memory().iter() {
        vm_memory::MmapRegion::bitmap(region).reset();
    }
}

/// KVM dirty log per memory slot. With manual protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`)
/// a harvest reads the bitmap, then re-protects only the dirty pages with
/// `KVM_CLEAR_DIRTY_LOG` in chunks of [`CLEAR_CHUNK_PAGES`]; without it, `KVM_GET_DIRTY_LOG`
/// clears as it reads.
#[derive(Debug)]
pub struct DirtyLogTracker {
    vm: Arc<KvmVm>,
    stopped: bool,
}

impl DirtyLogTracker {
    /// Turns logging on and arms it: pages written after this returns are reported.
    pub fn start(vm: Arc<KvmVm>) -> Result<Self> {
        vm.claim_tracker()?;
        let mut tracker = DirtyLogTracker { vm, stopped: false };
        let armed = tracker
            .vm
            .set_logging(true)
            .and_then(|()| tracker.harvest(&mut DirtyBitmap::default()));
        if let Err(e) = armed {
            let _ = tracker.stop();
            return Err(e);
        }
        reset_vmm_writes(&tracker.vm);
        Ok(tracker)
    }

    fn harvest_slot(&self, slot: &MemSlot, words: &mut [u64]) -> Result<()> {
        let bits = self
            .vm
            .fd()
            .get_dirty_log(slot.slot, slot.size as usize)
            .map_err(|source| Error::Kvm {
                op: "KVM_GET_DIRTY_LOG",
                source,
            })?;
        if self.vm.manual_protect() {
            let chunk_words = (CLEAR_CHUNK_PAGES / 64) as usize;
            for (i, chunk) in bits.chunks(chunk_words).enumerate() {
                if chunk.iter().all(|w| *w == 0) {
                    continue;
                }
                let first_page = (i * chunk_words * 64) as u64;
                let num_pages = (slot.pages() - first_page).min(CLEAR_CHUNK_PAGES) as u32;
                raw::clear_dirty_log(self.vm.fd(), slot.slot, first_page, num_pages, chunk)?;
            }
        }
        or_into(words, &bits);
        Ok(())
    }
}

impl DirtyTracker for DirtyLogTracker {
    fn harvest(&mut self, into: &mut DirtyBitmap) -> Result<()> {
        if self.stopped {
            return Err(Error::VmControl("dirty log tracker already stopped".into()));
        }
        ensure_layout(into, self.vm.slots())?;
        for (slot, (_, words)) in self.vm.slots().iter().zip(into.regions.iter_mut()) {
            self.harvest_slot(slot, words)?;
        }
        harvest_vmm_writes(&self.vm, into);
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        let result = self.vm.set_logging(false);
        self.vm.release_tracker();
        result
    }
}

impl Drop for DirtyLogTracker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

/// KVM dirty ring: each vCPU pushes the pages it dirties into its own ring of
/// [`super::DIRTY_RING_ENTRIES`] entries. A background thread empties the rings every few
/// milliseconds (a full ring stops the vCPU), and a harvest empties them once more.
#[derive(Debug)]
pub struct DirtyRingTracker {
    vm: Arc<KvmVm>,
    quit: Arc<AtomicBool>,
    harvester: Option<JoinHandle<()>>,
    stopped: bool,
}

impl DirtyRingTracker {
    /// Turns logging on and starts the background harvester.
    pub fn start(vm: Arc<KvmVm>) -> Result<Self> {
        Self::start_with(vm, Some(RING_HARVEST_INTERVAL))
    }

    /// Like [`DirtyRingTracker::start`] with the background harvester running every
    /// `interval`, or not at all (then only harvests and full-ring exits empty the rings).
    pub fn start_with(vm: Arc<KvmVm>, interval: Option<Duration>) -> Result<Self> {
        vm.claim_tracker()?;
        let quit = Arc::new(AtomicBool::new(false));
        let mut tracker = DirtyRingTracker {
            vm: vm.clone(),
            quit: quit.clone(),
            harvester: None,
            stopped: false,
        };
        let armed = vm.set_logging(true).and_then(|()| vm.collect_rings());
        if let Err(e) = armed {
            let _ = tracker.stop();
            return Err(e);
        }
        vm.take_ring_pending();
        reset_vmm_writes(&vm);
        let Some(interval) = interval else {
            return Ok(tracker);
        };
        let spawned = std::thread::Builder::new()
            .name("dirty-ring".into())
            .spawn(move || {
                while !quit.load(Ordering::Relaxed) {
                    if let Err(e) = vm.collect_rings() {
                        log::error!("dirty ring harvest failed: {e}");
                    }
                    std::thread::sleep(interval);
                }
            });
        match spawned {
            Ok(handle) => tracker.harvester = Some(handle),
            Err(source) => {
                let _ = tracker.stop();
                return Err(Error::Io {
                    context: "spawning the dirty ring harvester".into(),
                    source,
                });
            }
        }
        Ok(tracker)
    }
}

impl DirtyTracker for DirtyRingTracker {
    fn harvest(&mut self, into: &mut DirtyBitmap) -> Result<()> {
        if self.stopped {
            return Err(Error::VmControl(
                "dirty ring tracker already stopped".into(),
            ));
        }
        ensure_layout(into, self.vm.slots())?;
        self.vm.collect_rings()?;
        for (pending, (_, words)) in self
            .vm
            .take_ring_pending()
            .iter()
            .zip(into.regions.iter_mut())
        {
            or_into(words, pending);
        }
        harvest_vmm_writes(&self.vm, into);
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        if self.stopped {
            return Ok(());
        }
        self.stopped = true;
        self.quit.store(true, Ordering::Relaxed);
        if let Some(h) = self.harvester.take() {
            let _ = h.join();
        }
        let result = self.vm.set_logging(false);
        // Entries pushed before logging stopped would otherwise fill the ring later.
        let collected = self.vm.collect_rings();
        self.vm.take_ring_pending();
        self.vm.release_tracker();
        result.and(collected.map(|_| ()))
    }
}

impl Drop for DirtyRingTracker {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
