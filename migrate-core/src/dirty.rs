//! Dirty page tracking: which guest pages changed since the last harvest.
//!
//! The migration's dirty set is the union of what KVM saw the guest write (dirty log or ring)
//! and what the VMM itself wrote through vm-memory (its `AtomicBitmap`).

use crate::Result;

/// Size of a guest page as tracked and sent. KVM tracks 4 KiB pages on x86-64.
pub const PAGE_SIZE: u64 = 4096;

/// A run of contiguous guest pages: `pages` pages starting at the page-aligned guest-physical
/// address `gpa`. Dirty tracking reports runs and the sender moves them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRun {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// Number of pages.
    pub pages: u64,
}

impl PageRun {
    /// `pages` pages starting at `gpa`.
    pub const fn new(gpa: u64, pages: u64) -> Self {
        PageRun { gpa, pages }
    }

    /// The guest-physical address just past the run.
    pub const fn end(&self) -> u64 {
        self.gpa + self.pages * PAGE_SIZE
    }

    /// True if the page at `gpa` lies in the run.
    pub const fn contains(&self, gpa: u64) -> bool {
        gpa >= self.gpa && gpa < self.end()
    }
}

/// A set of dirty pages: one bit per 4 KiB page for each memory region, in region order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtyBitmap {
    /// Per region: (guest-physical start, bitmap words; bit i of word w = page w*64+i).
    pub regions: Vec<(u64, Vec<u64>)>,
}

/// Something that reports pages dirtied since the previous call.
pub trait DirtyTracker: Send {
    /// ORs the pages dirtied since the previous harvest (or since creation) into `into`,
    /// and re-arms tracking for them. `into` has one entry per region, laid out like the memory.
    fn harvest(&mut self, into: &mut DirtyBitmap) -> Result<()>;
    /// Stops tracking (turns dirty logging off). Called once when the migration ends.
    fn stop(&mut self) -> Result<()>;
}

impl DirtyBitmap {
    /// An empty bitmap laid out like `mem` (one entry per region).
    pub fn for_memory(mem: &crate::vm::GuestMemory) -> Self {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        DirtyBitmap {
            regions: mem
                .iter()
                .map(|r| {
                    (
                        r.start_addr().0,
                        vec![0u64; (r.len() / PAGE_SIZE).div_ceil(64) as usize],
                    )
                })
                .collect(),
        }
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|(_, w)| w.iter())
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Clears every bit, keeping the layout.
    pub fn clear(&mut self) {
        for (_, w) in &mut self.regions {
            w.iter_mut().for_each(|x| *x = 0);
        }
    }

    /// ORs `words` (a bitmap of the region starting at `gpa`) in.
    pub fn or_region(&mut self, gpa: u64, words: &[u64]) -> Result<()> {
        let (_, dst) = self
            .regions
            .iter_mut()
            .find(|(g, _)| *g == gpa)
            .ok_or_else(|| {
                crate::Error::Memory(format!("no region at {gpa:#x} in dirty bitmap"))
            })?;
        for (d, s) in dst.iter_mut().zip(words) {
            *d |= *s;
        }
        Ok(())
    }

    /// Calls `f` for every run of contiguous dirty pages, region by region.
    pub fn for_each_run(&self, mut f: impl FnMut(PageRun)) {
        for (start, words) in &self.regions {
            let mut run: Option<PageRun> = None;
            for (wi, &w) in words.iter().enumerate() {
                if w == 0 {
                    if let Some(r) = run.take() {
                        f(r);
                    }
                    continue;
                }
                for bit in 0..64 {
                    let page = wi as u64 * 64 + bit;
                    if w & (1 << bit) != 0 {
                        let gpa = start + page * PAGE_SIZE;
                        run = match run {
                            Some(r) if r.end() == gpa => Some(PageRun::new(r.gpa, r.pages + 1)),
                            Some(r) => {
                                f(r);
                                Some(PageRun::new(gpa, 1))
                            }
                            None => Some(PageRun::new(gpa, 1)),
                        };
                    }
                }
            }
            if let Some(r) = run {
                f(r);
            }
        }
    }

    /// Every run of contiguous dirty pages, region by region (see [`DirtyBitmap::for_each_run`]).
    pub fn runs(&self) -> Vec<PageRun> {
        let mut runs = Vec::new();
        self.for_each_run(|r| runs.push(r));
        runs
    }
}

/// Tracks the VMM's own writes through vm-memory: each region's `AtomicBitmap`, which every
/// `Bytes` write (and `VolatileSlice` copy) marks after the bytes are written.
#[derive(Debug)]
pub struct BitmapTracker {
    memory: crate::vm::GuestMemory,
}

impl BitmapTracker {
    /// Starts tracking: clears the bitmaps so only writes from now on count.
    /// (`GuestMemoryMmap` is a cheap clone sharing the regions and their bitmaps.)
    pub fn new(memory: &crate::vm::GuestMemory) -> Self {
        use vm_memory::GuestMemoryBackend;
        for r in memory.iter() {
            vm_memory::MmapRegion::bitmap(r).reset();
        }
        BitmapTracker {
            memory: memory.clone(),
        }
    }
}

impl DirtyTracker for BitmapTracker {
    fn harvest(&mut self, into: &mut DirtyBitmap) -> Result<()> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        for r in self.memory.iter() {
            let words = vm_memory::MmapRegion::bitmap(r).get_and_reset();
            into.or_region(r.start_addr().0, &words)?;
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        Ok(())
    }
}

/// The union of several trackers (e.g. KVM's dirty log and vm-memory's bitmap).
pub struct UnionTracker {
    parts: Vec<Box<dyn DirtyTracker>>,
}

impl UnionTracker {
    /// ORs the given trackers.
    pub fn new(parts: Vec<Box<dyn DirtyTracker>>) -> Self {
        UnionTracker { parts }
    }
}

impl DirtyTracker for UnionTracker {
    fn harvest(&mut self, into: &mut DirtyBitmap) -> Result<()> {
        for p in &mut self.parts {
            p.harvest(into)?;
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        let mut first = Ok(());
        for p in &mut self.parts {
            let r = p.stop();
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    fn mem() -> crate::vm::GuestMemory {
        crate::vm::GuestMemory::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x100000), 0x8000),
        ])
        .unwrap()
    }

    #[test]
    fn bitmap_tracker_sees_vmm_writes_and_rearms() {
        let m = mem();
        m.write_obj(1u64, GuestAddress(0x2000)).unwrap();
        let mut t = BitmapTracker::new(&m);
        m.write_obj(1u64, GuestAddress(0x3008)).unwrap();
        m.write_slice(&[1u8; 8192], GuestAddress(0x101000)).unwrap();
        let mut b = DirtyBitmap::for_memory(&m);
        t.harvest(&mut b).unwrap();
        assert_eq!(
            b.runs(),
            vec![PageRun::new(0x3000, 1), PageRun::new(0x101000, 2)]
        );
        let mut b2 = DirtyBitmap::for_memory(&m);
        t.harvest(&mut b2).unwrap();
        assert_eq!(b2.count(), 0);
    }

    #[test]
    fn union_ors_trackers() {
        let m = mem();
        let mut u = UnionTracker::new(vec![
            Box::new(BitmapTracker::new(&m)),
            Box::new(BitmapTracker::new(&m)),
        ]);
        m.write_obj(1u8, GuestAddress(0x0)).unwrap();
        let mut b = DirtyBitmap::for_memory(&m);
        u.harvest(&mut b).unwrap();
        assert_eq!(b.count(), 1);
        u.stop().unwrap();
    }
}
