//! Moving page bytes between guest memory and sockets without copies.
//!
//! The sender gathers a batch head (record header and range table, encoded by
//! [`crate::protocol`]) and up to [`MAX_DATA_PAGES_PER_BATCH`] page slices into one vectored
//! write straight from guest memory (the socket I/O is [`crate::transport`]'s). The receiver
//! reads the head, validates every range against the guest layout, then reads the page bytes
//! straight into guest memory ([`PageSource`]).

use crate::dirty::{PAGE_SIZE, PageRun};
use crate::protocol::{
    MAX_DATA_PAGES_PER_BATCH, MAX_PAGES_PER_RANGE, MAX_RANGES_PER_BATCH, RANGE_ENTRY_LEN,
    RECORD_HEADER_LEN, RangeEntry, Record, RecordHeader, decode_range_table, encode_batch_head,
};
use crate::transport::{PageSource, Stream};
use crate::vm::GuestMemory;
use crate::{Error, Result};
use std::marker::PhantomData;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

#[derive(Debug, Clone, Copy)]
struct HostRegion {
    gpa: u64,
    len: u64,
    host: *mut u8,
}

/// Host addresses of every guest region, for vectored I/O. Borrows the memory, so the mappings
/// outlive it.
#[derive(Debug)]
pub struct GuestPages<'a> {
    regions: Vec<HostRegion>,
    /// The highest guest-physical address first-round data was received up to, on any memory
    /// connection ([`GuestPages::populate_ahead`] stays ahead of it).
    received_to: AtomicU64,
    _mem: PhantomData<&'a GuestMemory>,
}

// SAFETY: the pointers refer to mmap'ed guest memory borrowed for 'a; the memory is shared by
// design (guest and VMM threads access it concurrently) and every access through these pointers
// is a volatile-style raw copy done by the kernel (readv/sendmsg) or by volatile reads.
unsafe impl Send for GuestPages<'_> {}
// SAFETY: see `Send`; `GuestPages` itself is immutable after construction.
unsafe impl Sync for GuestPages<'_> {}

impl<'a> GuestPages<'a> {
    /// Maps every region of `mem`.
    pub fn new(mem: &'a GuestMemory) -> Result<Self> {
        let mut regions = Vec::new();
        for r in mem.iter() {
            let slice = r
                .get_slice(MemoryRegionAddress(0), r.len() as usize)
                .map_err(|e| Error::Memory(e.to_string()))?;
            // The pointer stays valid while `mem` is borrowed: mmap regions are never remapped.
            let host = slice.ptr_guard_mut().as_ptr();
            regions.push(HostRegion {
                gpa: r.start_addr().0,
                len: r.len(),
                host,
            });
        }
        Ok(GuestPages {
            regions,
            received_to: AtomicU64::new(0),
            _mem: PhantomData,
        })
    }

    /// The region holding the byte at `gpa`, if any. Regions are sorted and disjoint
    /// (vm-memory keeps them so).
    fn region(&self, gpa: u64) -> Option<&HostRegion> {
        let i = self
            .regions
            .partition_point(|r| r.gpa <= gpa)
            .checked_sub(1)?;
        let r = &self.regions[i];
        (gpa - r.gpa < r.len).then_some(r)
    }

    /// The guest-physical address just past the region holding `gpa`, if any.
    ///
    /// Regions adjacent in guest-physical address space are still separate host mappings
    /// (separate KVM memory slots): a range of pages must never run past this address.
    pub(crate) fn region_end(&self, gpa: u64) -> Option<u64> {
        self.region(gpa).map(|r| r.gpa + r.len)
    }

    /// Guest-physical start address of every region, ascending.
    pub(crate) fn region_starts(&self) -> Vec<u64> {
        self.regions.iter().map(|r| r.gpa).collect()
    }

    /// Host pointer for `pages` pages at `gpa`, if the whole range lies inside one region.
    /// A range running on into an adjacent region is refused: the two are separate mappings.
    fn locate(&self, gpa: u64, pages: u64) -> Option<*mut u8> {
        let len = pages.checked_mul(PAGE_SIZE)?;
        let r = self.region(gpa)?;
        let off = gpa - r.gpa;
        if off.checked_add(len)? > r.len {
            return None;
        }
        // SAFETY: off + len <= r.len, so the result stays inside the region's mapping.
        Some(unsafe { r.host.add(off as usize) })
    }

    /// Asks for transparent huge pages behind every region (best effort): memory that is about
    /// to be filled costs a 2 MiB fault and clear instead of 512 small ones. For a destination's
    /// fresh memory; a mapping the kernel cannot back with huge pages is left as it is.
    pub(crate) fn advise_huge_pages(&self) {
        for r in &self.regions {
            // SAFETY: [host, host+len) is one guest memory mapping; MADV_HUGEPAGE only changes
            // how the kernel backs it, never its contents.
            unsafe {
                libc::madvise(r.host.cast(), r.len as usize, libc::MADV_HUGEPAGE);
            }
        }
    }

    /// Faults the destination's fresh memory in, from low to high addresses in 2 MiB steps,
    /// ahead of the first round's stream (which sends memory in that order on every
    /// connection), until it is all in or `stop` is set; returns the bytes it faulted in.
    /// Run on a thread of its own while the receivers read: the page clearing a fresh page
    /// costs then happens beside the copy instead of before it (a receiver's own populate of
    /// a batch finds the pages present). Where the receivers have got ahead of it, it jumps to
    /// their frontier. Faulting in only allocates and clears: concurrent writes into the same
    /// pages are unaffected.
    pub(crate) fn populate_ahead(&self, stop: &AtomicBool) -> u64 {
        const STEP: u64 = 2 << 20;
        let mut done = 0;
        for r in &self.regions {
            let mut off = 0;
            while off < r.len {
                if stop.load(Ordering::Relaxed) {
                    return done;
                }
                let frontier = self.received_to.load(Ordering::Relaxed);
                if r.gpa + off < frontier {
                    off = (frontier - r.gpa)
                        .min(r.len)
                        .next_multiple_of(STEP)
                        .min(r.len);
                    continue;
                }
                let len = STEP.min(r.len - off);
                // SAFETY: off + len <= r.len: the range lies inside the region's mapping.
                populate(unsafe { r.host.add(off as usize) }, len as usize);
                done += len;
                off += len;
            }
        }
        done
    }

    /// Notes that first-round data up to `gpa_end` arrived (see `populate_ahead`).
    fn note_received(&self, gpa_end: u64) {
        self.received_to.fetch_max(gpa_end, Ordering::Relaxed);
    }

    /// True if the page at `gpa` is all zero bytes. `gpa` must be a valid page address.
    pub fn is_zero(&self, gpa: u64) -> bool {
        match self.locate(gpa, 1) {
            Some(p) => page_is_zero(p),
            None => false,
        }
    }
}

/// Which pages of each region may hold data, from the host kernel's page tables.
///
/// A page of a private anonymous mapping that is neither present nor swapped (nor file-backed)
/// in /proc/self/pagemap has never been written: it reads as zero. Finding that out by reading
/// it costs a page fault per page (about 1 us here, several times more while KVM has the memory
/// registered), which made round 0 of a mostly-empty 1 GiB guest take seconds. Regions that are
/// not private anonymous, or a pagemap that cannot be read, count as touched everywhere.
#[derive(Debug)]
pub(crate) struct TouchedPages {
    /// Per region, in memory order: (gpa, pages, per-page "may hold data"; None = all).
    regions: Vec<(u64, u64, Option<Vec<bool>>)>,
}

impl TouchedPages {
    /// Snapshots the page tables of `mem`. A page first written after the snapshot is not in
    /// it: callers must have dirty tracking on already.
    pub fn snapshot(mem: &GuestMemory) -> TouchedPages {
        use std::os::unix::fs::FileExt;
        // Bits 63 present, 62 swapped, 61 file page or shared anonymous.
        const TOUCHED: u64 = 0b111 << 61;
        let pagemap = std::fs::File::open("/proc/self/pagemap").ok();
        let regions = mem
            .iter()
            .map(|r| {
                let (gpa, pages) = (r.start_addr().0, r.len() / PAGE_SIZE);
                let private_anon = r.file_offset().is_none()
                    && r.flags() & libc::MAP_PRIVATE != 0
                    && r.flags() & libc::MAP_ANONYMOUS != 0;
                let host = r.as_ptr() as u64;
                let map = pagemap
                    .as_ref()
                    .filter(|_| private_anon && host % PAGE_SIZE == 0)
                    .and_then(|f| {
                        let mut buf = vec![0u8; pages as usize * 8];
                        f.read_exact_at(&mut buf, host / PAGE_SIZE * 8).ok()?;
                        Some(
                            buf.chunks_exact(8)
                                .map(|e| {
                                    u64::from_le_bytes(e.try_into().expect("8-byte chunk"))
                                        & TOUCHED
                                        != 0
                                })
                                .collect(),
                        )
                    });
                (gpa, pages, map)
            })
            .collect();
        TouchedPages { regions }
    }

    /// Runs of pages that may hold data, in memory order.
    pub fn runs(&self) -> Vec<PageRun> {
        let mut runs = Vec::new();
        for (gpa, pages, map) in &self.regions {
            let Some(map) = map else {
                runs.push(PageRun::new(*gpa, *pages));
                continue;
            };
            let mut start = None;
            for (i, &touched) in map.iter().enumerate() {
                match (touched, start) {
                    (true, None) => start = Some(i as u64),
                    (false, Some(s)) => {
                        runs.push(PageRun::new(gpa + s * PAGE_SIZE, i as u64 - s));
                        start = None;
                    }
                    _ => {}
                }
            }
            if let Some(s) = start {
                runs.push(PageRun::new(gpa + s * PAGE_SIZE, pages - s));
            }
        }
        runs
    }
}

fn page_is_zero(p: *const u8) -> bool {
    let words = p.cast::<u64>();
    let mut acc = 0u64;
    for chunk in 0..(PAGE_SIZE as usize / 64) {
        for i in 0..8 {
            // SAFETY: `p` points to a whole, 4096-byte aligned guest page (checked by `locate`);
            // volatile because the guest may write it concurrently.
            acc |= unsafe { words.add(chunk * 8 + i).read_volatile() };
        }
        if acc != 0 {
            return false;
        }
    }
    true
}

/// Per-page 64-bit hashes of all guest memory, region by region (for verification). Pages the
/// kernel says were never touched hash as zero pages without being read (see `TouchedPages`).
pub fn page_hashes(mem: &GuestMemory) -> Result<Vec<u64>> {
    fn hash_page(p: *const u64) -> u64 {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for w in 0..(PAGE_SIZE as usize / 8) {
            // SAFETY: callers pass a whole guest page; volatile as the guest may be writing it.
            let v = unsafe { p.add(w).read_volatile() };
            h = (h ^ v).wrapping_mul(0x0000_0100_0000_01b3).rotate_left(29);
        }
        h
    }
    let zero_page = [0u64; PAGE_SIZE as usize / 8];
    let zero_hash = hash_page(zero_page.as_ptr());
    let pages = GuestPages::new(mem)?;
    let touched = TouchedPages::snapshot(mem);
    let mut out = Vec::new();
    for (r, (_, _, map)) in pages.regions.iter().zip(&touched.regions) {
        for i in 0..r.len / PAGE_SIZE {
            if map.as_ref().is_some_and(|m| !m[i as usize]) {
                out.push(zero_hash);
                continue;
            }
            // SAFETY: i * PAGE_SIZE < r.len: inside the region.
            let p = unsafe { r.host.add((i * PAGE_SIZE) as usize) }.cast::<u64>();
            out.push(hash_page(p));
        }
    }
    Ok(out)
}

/// What a sender or receiver moved on one connection.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct StreamCounters {
    /// Pages sent with their bytes.
    pub data_pages: u64,
    /// Pages sent as zero markers.
    pub zero_pages: u64,
    /// Bytes on the wire (headers, tables, pages).
    pub bytes: u64,
}

/// Builds batches and writes them to one socket.
pub(crate) struct BatchWriter<'a> {
    stream: &'a Stream,
    pages: &'a GuestPages<'a>,
    /// The encoded head (record header and range table) of the batch being written.
    head: Vec<u8>,
    ranges: Vec<RangeEntry>,
    data_pages: u64,
    /// Totals since creation.
    pub counters: StreamCounters,
}

impl<'a> BatchWriter<'a> {
    /// A writer on `stream`.
    pub fn new(stream: &'a Stream, pages: &'a GuestPages<'a>) -> Self {
        BatchWriter {
            stream,
            pages,
            head: Vec::with_capacity(
                RECORD_HEADER_LEN + MAX_RANGES_PER_BATCH as usize * RANGE_ENTRY_LEN,
            ),
            ranges: Vec::with_capacity(MAX_RANGES_PER_BATCH as usize),
            data_pages: 0,
            counters: StreamCounters::default(),
        }
    }

    /// Queues the pages of `run`, checking each for zero. A run spanning regions that are
    /// adjacent in guest-physical address space is split at each region's end (every range
    /// on the wire lies inside one region); a page outside guest memory is an error.
    /// Zero pages are skipped if `skip_zero` (round 0: the destination starts zeroed), else
    /// sent as zero markers.
    pub fn push_run(&mut self, run: PageRun, skip_zero: bool) -> Result<()> {
        let end = run.end();
        let mut at = run.gpa;
        while at < end {
            let region_end = self.pages.region_end(at).ok_or_else(|| {
                Error::Memory(format!(
                    "page {at:#x} of run {:#x}+{} pages lies outside guest memory",
                    run.gpa, run.pages
                ))
            })?;
            self.push_in_region(at, end.min(region_end), skip_zero)?;
            at = end.min(region_end);
        }
        Ok(())
    }

    /// Queues the pages in `[start, end)`, which lies inside one region.
    fn push_in_region(&mut self, start: u64, end: u64, skip_zero: bool) -> Result<()> {
        let mut at = start;
        while at < end {
            let zero = self.pages.is_zero(at);
            let mut n = 1;
            while at + n * PAGE_SIZE < end && self.pages.is_zero(at + n * PAGE_SIZE) == zero {
                n += 1;
                if !zero && n >= MAX_DATA_PAGES_PER_BATCH {
                    break;
                }
            }
            if !(zero && skip_zero) {
                self.push_range(at, n, zero)?;
            }
            at += n * PAGE_SIZE;
        }
        Ok(())
    }

    fn push_range(&mut self, gpa: u64, pages: u64, zero: bool) -> Result<()> {
        let mut gpa = gpa;
        let mut pages = pages;
        while pages > 0 {
            if self.ranges.len() == MAX_RANGES_PER_BATCH as usize
                || (!zero && self.data_pages == MAX_DATA_PAGES_PER_BATCH)
            {
                self.flush()?;
            }
            let room = if zero {
                pages.min(u64::from(MAX_PAGES_PER_RANGE))
            } else {
                pages.min(MAX_DATA_PAGES_PER_BATCH - self.data_pages)
            };
            // Extend the previous range when contiguous, of the same kind and in the same
            // region (`gpa` starting the next, adjacent region ends the range).
            let same_region = self.pages.region_end(gpa.saturating_sub(1)) > Some(gpa);
            match self.ranges.last_mut() {
                Some(last)
                    if last.zero == zero
                        && last.gpa + u64::from(last.pages) * PAGE_SIZE == gpa
                        && same_region
                        && u64::from(last.pages) + room <= u64::from(MAX_PAGES_PER_RANGE) =>
                {
                    last.pages += room as u32
                }
                _ => self.ranges.push(RangeEntry {
                    gpa,
                    pages: room as u32,
                    zero,
                }),
            }
            if zero {
                self.counters.zero_pages += room;
            } else {
                self.data_pages += room;
                self.counters.data_pages += room;
            }
            gpa += room * PAGE_SIZE;
            pages -= room;
        }
        Ok(())
    }

    /// Writes the queued batch, if any.
    pub fn flush(&mut self) -> Result<()> {
        if self.ranges.is_empty() {
            return Ok(());
        }
        encode_batch_head(&self.ranges, &mut self.head);
        let mut iov: Vec<libc::iovec> = Vec::with_capacity(self.ranges.len() + 1);
        iov.push(libc::iovec {
            iov_base: self.head.as_ptr() as *mut libc::c_void,
            iov_len: self.head.len(),
        });
        for r in self.ranges.iter().filter(|r| !r.zero) {
            let host = self
                .pages
                .locate(r.gpa, u64::from(r.pages))
                .ok_or_else(|| Error::Memory(format!("range {:#x} outside guest memory", r.gpa)))?;
            iov.push(libc::iovec {
                iov_base: host.cast(),
                iov_len: r.pages as usize * PAGE_SIZE as usize,
            });
        }
        let total: usize = iov.iter().map(|v| v.iov_len).sum();
        self.stream.send_vectored_all(&mut iov)?;
        self.counters.bytes += total as u64;
        self.ranges.clear();
        self.data_pages = 0;
        Ok(())
    }

    /// Flushes, then writes a marker record.
    pub fn marker(&mut self, r: Record) -> Result<()> {
        self.flush()?;
        let h = RecordHeader::encode(&r);
        let mut iov = [libc::iovec {
            iov_base: h.as_ptr() as *mut libc::c_void,
            iov_len: h.len(),
        }];
        self.stream.send_vectored_all(&mut iov)?;
        self.counters.bytes += h.len() as u64;
        Ok(())
    }
}

/// What a memory connection delivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReceivedCounters {
    /// Pages written with bytes.
    pub data_pages: u64,
    /// Pages zeroed.
    pub zero_pages: u64,
    /// Bytes read.
    pub bytes: u64,
    /// End-of-round markers seen.
    pub rounds: u64,
}

/// Reads one memory connection until END_OF_STREAM, writing pages into guest memory.
/// Every header and range is validated before guest memory is touched; `on_progress` is
/// called after each record (return false to stop with an error).
pub fn receive_stream(
    src: &mut impl PageSource,
    pages: &GuestPages<'_>,
    mut on_record: impl FnMut(&ReceivedCounters) -> Result<()>,
) -> Result<ReceivedCounters> {
    let mut c = ReceivedCounters::default();
    let mut table = vec![0u8; MAX_RANGES_PER_BATCH as usize * RANGE_ENTRY_LEN];
    let mut iov: Vec<libc::iovec> = Vec::with_capacity(MAX_RANGES_PER_BATCH as usize);
    let mut entries: Vec<RangeEntry> = Vec::with_capacity(MAX_RANGES_PER_BATCH as usize);
    let mut hosts: Vec<*mut u8> = Vec::with_capacity(MAX_RANGES_PER_BATCH as usize);
    loop {
        let mut h = [0u8; RECORD_HEADER_LEN];
        src.read_bytes(&mut h)?;
        c.bytes += RECORD_HEADER_LEN as u64;
        match RecordHeader::decode(&h)? {
            Record::Batch {
                ranges: n,
                data_pages,
            } => {
                let tbl = &mut table[..n as usize * RANGE_ENTRY_LEN];
                src.read_bytes(tbl)?;
                c.bytes += tbl.len() as u64;
                decode_range_table(tbl, data_pages, &mut entries)?;
                hosts.clear();
                for r in &entries {
                    let host = pages.locate(r.gpa, u64::from(r.pages)).ok_or_else(|| {
                        Error::Protocol(format!(
                            "range {:#x}+{} pages lies outside guest memory",
                            r.gpa, r.pages
                        ))
                    })?;
                    hosts.push(host);
                }
                // Everything validated: now touch guest memory.
                iov.clear();
                let first_round = c.rounds == 0;
                for (r, host) in entries.iter().zip(&hosts) {
                    let len = r.pages as usize * PAGE_SIZE as usize;
                    if r.zero {
                        // SAFETY: `locate` checked [host, host+len) lies inside guest memory.
                        unsafe { std::ptr::write_bytes(*host, 0, len) };
                        c.zero_pages += u64::from(r.pages);
                    } else {
                        if first_round {
                            populate(*host, len);
                        }
                        iov.push(libc::iovec {
                            iov_base: host.cast(),
                            iov_len: len,
                        });
                    }
                }
                src.read_into(&mut iov)?;
                if first_round && let Some(last) = entries.last() {
                    pages.note_received(last.gpa + u64::from(last.pages) * PAGE_SIZE);
                }
                c.data_pages += data_pages;
                c.bytes += data_pages * PAGE_SIZE;
            }
            Record::EndOfRound { .. } => c.rounds += 1,
            Record::EndOfStream { total_pages } => {
                if total_pages != c.data_pages + c.zero_pages {
                    return Err(Error::Protocol(format!(
                        "stream ended claiming {total_pages} pages, {} arrived",
                        c.data_pages + c.zero_pages
                    )));
                }
                return Ok(c);
            }
        }
        on_record(&c)?;
    }
}

/// Faults in fresh destination pages in one call before the socket read fills them: much
/// cheaper than one page fault per page inside `readv`. Best effort (needs Linux 5.14).
fn populate(host: *mut u8, len: usize) {
    // Only whole host pages can be advised; guest pages are host pages here (4 KiB).
    if (host as usize) % PAGE_SIZE as usize != 0 {
        return;
    }
    // SAFETY: [host, host+len) lies inside a guest memory mapping (validated by `locate`);
    // MADV_POPULATE_WRITE only faults pages in, it never changes their contents.
    unsafe {
        libc::madvise(host.cast(), len, libc::MADV_POPULATE_WRITE);
    }
}

/// Decoder entry point for fuzzing and bad-input tests: feeds `data` as one memory stream into
/// a small two-region guest (64 KiB at 0, 64 KiB at 1 MiB). Must never panic or write outside
/// that memory.
pub fn fuzz_memory_stream(data: &[u8]) -> Result<ReceivedCounters> {
    use vm_memory::GuestAddress;
    let mem = GuestMemory::from_ranges(&[
        (GuestAddress(0), 0x10000),
        (GuestAddress(0x10_0000), 0x10000),
    ])
    .map_err(|e| Error::Memory(e.to_string()))?;
    let pages = GuestPages::new(&mem)?;
    let mut src = data;
    receive_stream(&mut src, &pages, |_| Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, FileOffset, GuestAddress};

    /// How many pages of [host, host+len) are resident (mincore(2)).
    fn resident_pages(host: *mut u8, len: usize) -> usize {
        let mut vec = vec![0u8; len / PAGE_SIZE as usize];
        // SAFETY: [host, host+len) is one page-aligned guest memory mapping; mincore writes one
        // byte per page into `vec`, which has exactly that many.
        let rc = unsafe { libc::mincore(host.cast(), len, vec.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        vec.iter().filter(|&&b| b & 1 == 1).count()
    }

    /// Populating ahead faults every region in (two regions, one ending on a 2 MiB step's
    /// middle), leaves contents alone, jumps past what the receivers already wrote, and stops
    /// when told.
    #[test]
    fn populating_ahead_faults_fresh_memory_in_beyond_the_receivers() {
        let mem = GuestMemory::from_ranges(&[
            (GuestAddress(0), 6 << 20),
            (GuestAddress(16 << 20), (3 << 20) + (64 << 10)),
        ])
        .unwrap();
        mem.write_obj(0xfeed_u64, GuestAddress(16 << 20)).unwrap();
        let pages = GuestPages::new(&mem).unwrap();
        let stop = AtomicBool::new(true);
        assert_eq!(pages.populate_ahead(&stop), 0, "stopped before it began");
        stop.store(false, Ordering::Relaxed);
        // The receivers are past the first region and 1 MiB into the second.
        pages.note_received((17 << 20) + 4096);
        let done = pages.populate_ahead(&stop);
        assert_eq!(
            done,
            (3 << 20) + (64 << 10) - (2 << 20),
            "only beyond the frontier's step"
        );
        let (a, b) = (pages.regions[0], pages.regions[1]);
        assert_eq!(
            resident_pages(a.host, a.len as usize),
            0,
            "behind the receivers"
        );
        assert!(resident_pages(b.host, b.len as usize) >= (done / PAGE_SIZE) as usize);
        // From the start: everything, contents kept.
        let fresh = GuestPages::new(&mem).unwrap();
        assert_eq!(fresh.populate_ahead(&stop), a.len + b.len);
        assert_eq!(
            resident_pages(a.host, a.len as usize) as u64,
            a.len / PAGE_SIZE
        );
        assert_eq!(
            resident_pages(b.host, b.len as usize) as u64,
            b.len / PAGE_SIZE
        );
        assert_eq!(mem.read_obj::<u64>(GuestAddress(16 << 20)).unwrap(), 0xfeed);
    }

    #[test]
    fn untouched_pages_are_left_out_of_runs_and_hash_as_zero() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let all = page_hashes(&mem).unwrap();
        let zero = all[0];
        assert!(
            all.iter().all(|&h| h == zero),
            "fresh memory hashes as zero pages"
        );
        let written = [0u64, 17 * PAGE_SIZE, (40 << 20) + 3 * PAGE_SIZE];
        for &gpa in &written {
            mem.write_obj(0xdead_beef_u64, GuestAddress(gpa)).unwrap();
        }
        let runs = TouchedPages::snapshot(&mem).runs();
        let covered: u64 = runs.iter().map(|r| r.pages).sum();
        for &gpa in &written {
            assert!(
                runs.iter().any(|r| r.contains(gpa)),
                "written page {gpa:#x} missing from {runs:x?}"
            );
        }
        // Transparent huge pages may fault in up to 2 MiB per write; never the whole region.
        assert!(
            covered <= 3 * 512,
            "{covered} pages reported touched: {runs:x?}"
        );
        let hashes = page_hashes(&mem).unwrap();
        for (i, h) in hashes.iter().enumerate() {
            let was_written = written.contains(&(i as u64 * PAGE_SIZE));
            assert_eq!(*h != zero, was_written, "page {i}");
        }
    }

    /// Three regions adjacent in guest-physical address space (like KVM memory slots).
    fn adjacent_regions() -> GuestMemory {
        GuestMemory::from_ranges(&[
            (GuestAddress(0), 0x10000),
            (GuestAddress(0x10000), 0x10000),
            (GuestAddress(0x20000), 0x10000),
        ])
        .unwrap()
    }

    #[test]
    fn runs_across_adjacent_regions_travel_as_ranges_inside_one_region() {
        let src = adjacent_regions();
        for gpa in (0..0x30000).step_by(PAGE_SIZE as usize) {
            let page: Vec<u8> = (0..PAGE_SIZE)
                .map(|i| ((gpa + i) % 251) as u8 | 1)
                .collect();
            src.write_slice(&page, GuestAddress(gpa)).unwrap();
        }
        // Zero one page right after the second boundary: zero markers must split there too.
        src.write_slice(&[0u8; PAGE_SIZE as usize], GuestAddress(0x20000))
            .unwrap();
        let (mut s, mut d) = crate::transport::in_process(1).unwrap();
        let (s, mut d) = (s.memory.remove(0), d.memory.remove(0));
        let src_pages = GuestPages::new(&src).unwrap();
        let sender = std::thread::scope(|scope| {
            let src_pages = &src_pages;
            // The stream moves into the sender: if it fails, the receiver sees it close.
            let h = scope.spawn(move || {
                let mut w = BatchWriter::new(&s, src_pages);
                // Runs crossing each boundary, and runs that touch at a boundary.
                w.push_run(PageRun::new(0xc000, 8), false).unwrap();
                w.push_run(PageRun::new(0x14000, 12), false).unwrap();
                w.push_run(PageRun::new(0x20000, 4), false).unwrap();
                w.push_run(PageRun::new(0x1f000, 1), false).unwrap();
                w.flush().unwrap();
                w.marker(Record::EndOfStream {
                    total_pages: w.counters.data_pages + w.counters.zero_pages,
                })
                .unwrap();
                w.counters
            });
            let dst = adjacent_regions();
            dst.write_slice(&[0xeeu8; PAGE_SIZE as usize], GuestAddress(0x20000))
                .unwrap();
            let got = receive_stream(&mut d, &GuestPages::new(&dst).unwrap(), |_| Ok(())).unwrap();
            let sent = h.join().unwrap();
            assert_eq!(got.data_pages, sent.data_pages);
            assert_eq!(got.zero_pages, 1);
            for gpa in (0xc000..0x24000).step_by(PAGE_SIZE as usize) {
                let (mut a, mut b) = ([0u8; PAGE_SIZE as usize], [0u8; PAGE_SIZE as usize]);
                src.read_slice(&mut a, GuestAddress(gpa)).unwrap();
                dst.read_slice(&mut b, GuestAddress(gpa)).unwrap();
                assert_eq!(a, b, "page {gpa:#x}");
            }
            sent
        });
        assert_eq!(sender.data_pages + sender.zero_pages, 8 + 12 + 4 + 1);
    }

    #[test]
    fn run_outside_guest_memory_is_an_error() {
        let mem = adjacent_regions();
        let pages = GuestPages::new(&mem).unwrap();
        let (s, _d) = crate::transport::in_process(1).unwrap();
        let mut w = BatchWriter::new(&s.memory[0], &pages);
        let e = w.push_run(PageRun::new(0x2e000, 4), false).unwrap_err();
        assert!(matches!(e, Error::Memory(_)), "{e}");
    }

    #[test]
    fn received_range_spanning_adjacent_regions_is_refused() {
        let mem = adjacent_regions();
        let pages = GuestPages::new(&mem).unwrap();
        for zero in [false, true] {
            let mut stream = Vec::new();
            encode_batch_head(
                &[RangeEntry {
                    gpa: 0xf000,
                    pages: 2,
                    zero,
                }],
                &mut stream,
            );
            if !zero {
                stream.extend_from_slice(&[0xabu8; 2 * PAGE_SIZE as usize]);
            }
            let e = receive_stream(&mut stream.as_slice(), &pages, |_| Ok(())).unwrap_err();
            assert!(matches!(e, Error::Protocol(_)), "{e}");
        }
        let hashes = page_hashes(&mem).unwrap();
        assert!(hashes.iter().all(|&h| h == hashes[0]), "memory untouched");
    }

    #[test]
    fn file_backed_memory_counts_as_touched_everywhere() {
        let fd =
            nix::sys::memfd::memfd_create("ninja-touched-test", nix::sys::memfd::MFdFlags::empty())
                .unwrap();
        let file = std::fs::File::from(fd);
        file.set_len(4 << 20).unwrap();
        let mem = GuestMemory::from_ranges_with_files(&[(
            GuestAddress(0),
            4 << 20,
            Some(FileOffset::new(file, 0)),
        )])
        .unwrap();
        assert_eq!(
            TouchedPages::snapshot(&mem).runs(),
            vec![PageRun::new(0, 1024)]
        );
    }
}
