//! Dirty page tracking: which guest pages changed since the last harvest.
//!
//! The migration's dirty set is the union of what KVM saw the guest write (dirty log or ring)
//! and what the VMM itself wrote through vm-memory (its `AtomicBitmap`).

use crate::Result;

/// Size of a guest page as tracked and sent. KVM tracks 4 KiB pages on x86-64.
pub const PAGE_SIZE: u64 = 4096;

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
