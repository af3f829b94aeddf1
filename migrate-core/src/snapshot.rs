//! Snapshots: a paused VM's memory and state in one file, for checkpoint and restart.
//!
//! The file (integers little-endian):
//!
//! ```text
//! offset  size
//! 0       8     magic "NINJASNP"
//! 8       4     format version (1)
//! 12      4     page size (4096)
//! 16      4     number of memory regions, N (1..=4096)
//! 20      4     CRC-32 of the memory, every region's bytes in order
//! 24      8     length of the VM state
//! 32      4     CRC-32 of the VM state
//! 36      4     CRC-32 of bytes 0..36 and of the region table
//! 40      16*N  region table: guest physical address u64, length u64
//! M       ...   the regions' bytes in order, M = 40 + 16*N rounded up to a page; pages of
//!               zeros are holes (the file is sparse)
//! M+mem   len   the VM state (`MigratableVm::save_state`)
//! ```
//!
//! [`save`] pauses the VM, writes the memory and the state, then the header, and `fsync`s; the
//! VM stays paused. [`restore`] checks the header, the layout and the file's length before it
//! builds the VM (as [`crate::destination::receive`] does, from the layout), then both
//! checksums as it reads; any mismatch is an [`Error::Snapshot`] naming the file and what is
//! wrong, and the half-built VM is dropped, never resumed.

use crate::dirty::PAGE_SIZE;
use crate::protocol::{MemoryLayout, RegionDesc};
use crate::vm::{IncomingVm, MigratableVm};
use crate::{Error, Result};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Instant;
use vm_memory::{Bytes, GuestAddress};

/// The first bytes of a snapshot.
pub const MAGIC: [u8; 8] = *b"NINJASNP";
/// The layout's version.
pub const VERSION: u32 = 1;
/// Bytes of the fixed header before the region table.
const HEADER: usize = 40;
/// Most regions a snapshot may have (as a migration's layout).
const MAX_REGIONS: usize = 4096;
/// Memory is copied through a buffer of this size.
const CHUNK: usize = 1 << 20;

/// What [`save`] wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotReport {
    /// Guest memory, bytes.
    pub memory_bytes: u64,
    /// Memory bytes written (pages of zeros are holes).
    pub written_bytes: u64,
    /// The VM state, bytes.
    pub state_bytes: u64,
    /// Pause (if the VM ran) to `fsync` done, ms.
    pub total_ms: f64,
}

fn problem(path: &Path, what: impl Into<String>) -> Error {
    Error::Snapshot {
        path: path.to_owned(),
        problem: what.into(),
    }
}

fn io(path: &Path, doing: &str, e: std::io::Error) -> Error {
    Error::Io {
        context: format!("{doing} {}", path.display()),
        source: e,
    }
}

/// Where the memory starts in a file whose layout has `regions` regions.
fn memory_offset(regions: usize) -> u64 {
    (HEADER + 16 * regions).div_ceil(PAGE_SIZE as usize) as u64 * PAGE_SIZE
}

/// The header and region table, with their checksum filled in.
fn header(layout: &MemoryLayout, memory_crc: u32, state: &[u8]) -> Vec<u8> {
    let mut h = Vec::with_capacity(HEADER + 16 * layout.regions.len());
    h.extend_from_slice(&MAGIC);
    h.extend_from_slice(&VERSION.to_le_bytes());
    h.extend_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
    h.extend_from_slice(&(layout.regions.len() as u32).to_le_bytes());
    h.extend_from_slice(&memory_crc.to_le_bytes());
    h.extend_from_slice(&(state.len() as u64).to_le_bytes());
    h.extend_from_slice(&crc32fast::hash(state).to_le_bytes());
    h.extend_from_slice(&[0; 4]);
    for r in &layout.regions {
        h.extend_from_slice(&r.gpa.to_le_bytes());
        h.extend_from_slice(&r.len.to_le_bytes());
    }
    let crc = header_crc(&h);
    h[36..40].copy_from_slice(&crc.to_le_bytes());
    h
}

/// The CRC-32 of a header: its first 36 bytes and the region table.
fn header_crc(h: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&h[..36]);
    hasher.update(&h[HEADER..]);
    hasher.finalize()
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Pauses `vm` and writes its memory and state to a new file at `path` (replacing any), then
/// `fsync`s it. The VM stays paused: resume it to go on, or drop it.
pub fn save(vm: &dyn MigratableVm, path: &Path) -> Result<SnapshotReport> {
    let start = Instant::now();
    vm.pause()?;
    let state = vm.save_state()?;
    let mem = vm.memory();
    let layout = MemoryLayout::of(mem);
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| io(path, "create", e))?;
    let base = memory_offset(layout.regions.len());
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let (mut at, mut written) = (base, 0u64);
    for r in &layout.regions {
        let mut done = 0u64;
        while done < r.len {
            let n = (r.len - done).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, GuestAddress(r.gpa + done))
                .map_err(|e| Error::Memory(format!("read {:#x}: {e}", r.gpa + done)))?;
            crc.update(chunk);
            for (i, page) in chunk.chunks(PAGE_SIZE as usize).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    let off = at + (i as u64) * PAGE_SIZE;
                    file.write_all_at(page, off)
                        .map_err(|e| io(path, "write", e))?;
                    written += page.len() as u64;
                }
            }
            at += n as u64;
            done += n as u64;
        }
    }
    file.write_all_at(&state, at)
        .map_err(|e| io(path, "write", e))?;
    file.write_all_at(&header(&layout, crc.finalize(), &state), 0)
        .map_err(|e| io(path, "write", e))?;
    // The zero pages at the end are holes too: the length says where the state ends.
    file.set_len(at + state.len() as u64)
        .and_then(|()| file.sync_all())
        .map_err(|e| io(path, "sync", e))?;
    Ok(SnapshotReport {
        memory_bytes: layout.total_bytes(),
        written_bytes: written,
        state_bytes: state.len() as u64,
        total_ms: start.elapsed().as_secs_f64() * 1e3,
    })
}

/// Reads the header and the layout of the snapshot at `path`, checked.
fn read_header(path: &Path, file: &File) -> Result<(MemoryLayout, u32, u64, u32)> {
    let mut fixed = [0u8; HEADER];
    file.read_exact_at(&mut fixed, 0)
        .map_err(|e| problem(path, format!("no snapshot header ({e})")))?;
    if fixed[..8] != MAGIC {
        return Err(problem(path, "not a snapshot (bad magic)"));
    }
    let version = u32_at(&fixed, 8);
    if version != VERSION {
        return Err(problem(
            path,
            format!("format version {version}, this program reads version {VERSION}"),
        ));
    }
    let page_size = u32_at(&fixed, 12);
    if u64::from(page_size) != PAGE_SIZE {
        return Err(problem(path, format!("page size {page_size}")));
    }
    let regions = u32_at(&fixed, 16) as usize;
    if regions == 0 || regions > MAX_REGIONS {
        return Err(problem(path, format!("{regions} memory regions")));
    }
    let mut h = fixed.to_vec();
    h.resize(HEADER + 16 * regions, 0);
    file.read_exact_at(&mut h[HEADER..], HEADER as u64)
        .map_err(|e| problem(path, format!("truncated region table ({e})")))?;
    let crc = header_crc(&h);
    if crc != u32_at(&h, 36) {
        return Err(problem(
            path,
            format!(
                "header checksum {crc:08x}, the header says {:08x}",
                u32_at(&h, 36)
            ),
        ));
    }
    let layout = MemoryLayout {
        regions: (0..regions)
            .map(|i| RegionDesc {
                gpa: u64_at(&h, HEADER + 16 * i),
                len: u64_at(&h, HEADER + 16 * i + 8),
            })
            .collect(),
    };
    layout
        .validate()
        .map_err(|e| problem(path, format!("memory layout: {e}")))?;
    Ok((layout, u32_at(&h, 20), u64_at(&h, 24), u32_at(&h, 32)))
}

/// Builds a VM with `make_vm` from the layout of the snapshot at `path`, fills its memory and
/// restores its state from the file. The VM is not resumed: the caller does, once its devices
/// are in place. A damaged file is an [`Error::Snapshot`] and the VM is dropped.
pub fn restore<V: IncomingVm>(
    path: &Path,
    make_vm: impl FnOnce(&MemoryLayout) -> Result<V>,
) -> Result<V> {
    let file = File::open(path).map_err(|e| io(path, "open", e))?;
    let (layout, memory_crc, state_len, state_crc) = read_header(path, &file)?;
    let base = memory_offset(layout.regions.len());
    let expected = base + layout.total_bytes() + state_len;
    let actual = file.metadata().map_err(|e| io(path, "stat", e))?.len();
    if actual != expected {
        return Err(problem(
            path,
            format!("{actual} bytes, its header says {expected} (truncated or extended)"),
        ));
    }
    let vm = make_vm(&layout)?;
    let have = MemoryLayout::of(vm.memory());
    if have != layout {
        return Err(problem(
            path,
            format!("memory layout {layout:?}, the new VM has {have:?}"),
        ));
    }
    let mem = vm.memory();
    let mut crc = crc32fast::Hasher::new();
    let mut buf = vec![0u8; CHUNK];
    let mut at = base;
    for r in &layout.regions {
        let mut done = 0u64;
        while done < r.len {
            let n = (r.len - done).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            file.read_exact_at(chunk, at)
                .map_err(|e| io(path, "read", e))?;
            crc.update(chunk);
            // A new VM's memory is zero: only pages with data are written.
            for (i, page) in chunk.chunks(PAGE_SIZE as usize).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    let gpa = r.gpa + done + (i as u64) * PAGE_SIZE;
                    mem.write_slice(page, GuestAddress(gpa))
                        .map_err(|e| Error::Memory(format!("write {gpa:#x}: {e}")))?;
                }
            }
            at += n as u64;
            done += n as u64;
        }
    }
    let crc = crc.finalize();
    if crc != memory_crc {
        return Err(problem(
            path,
            format!("memory checksum {crc:08x}, the header says {memory_crc:08x}"),
        ));
    }
    let mut state = vec![0u8; state_len as usize];
    file.read_exact_at(&mut state, at)
        .map_err(|e| io(path, "read", e))?;
    let crc = crc32fast::hash(&state);
    if crc != state_crc {
        return Err(problem(
            path,
            format!("state checksum {crc:08x}, the header says {state_crc:08x}"),
        ));
    }
    vm.restore_state(&state)?;
    Ok(vm)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::software_guest::{SoftwareGuest, SoftwareGuestConfig};
    use std::path::PathBuf;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ninja-snap-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn saved(dir: &Path) -> (PathBuf, SoftwareGuestConfig, Vec<u64>, u64) {
        let cfg = SoftwareGuestConfig::new(8 << 20);
        let guest = SoftwareGuest::start(cfg.clone()).unwrap();
        while guest.counter() < 3 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let path = dir.join("vm.snap");
        let report = save(&guest, &path).unwrap();
        let hashes = crate::pages::page_hashes(MigratableVm::memory(&guest)).unwrap();
        let counter = guest.counter();
        assert_eq!(report.memory_bytes, 8 << 20);
        assert!(report.written_bytes < report.memory_bytes, "{report:?}");
        assert!(report.state_bytes > 0);
        (path, cfg, hashes, counter)
    }

    #[test]
    fn a_snapshot_restores_the_paused_guest_page_for_page() {
        let dir = scratch("ok");
        let (path, cfg, hashes, counter) = saved(&dir);
        let guest = restore(&path, |_| SoftwareGuest::incoming(cfg.clone())).unwrap();
        assert_eq!(
            crate::pages::page_hashes(IncomingVm::memory(&guest)).unwrap(),
            hashes
        );
        assert_eq!(guest.counter(), counter);
        IncomingVm::resume(&guest).unwrap();
        let t = Instant::now();
        while guest.counter() <= counter {
            assert!(
                t.elapsed().as_secs() < 10,
                "the restored guest does not run"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_damaged_snapshot_is_refused_with_what_is_wrong() {
        let dir = scratch("damaged");
        let (path, cfg, _, _) = saved(&dir);
        let good = std::fs::read(&path).unwrap();
        let refused = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            match restore(&path, |_| SoftwareGuest::incoming(cfg.clone())) {
                Err(e @ Error::Snapshot { .. }) => e.to_string(),
                Err(e) => panic!("not a snapshot error: {e}"),
                Ok(_) => panic!("a damaged snapshot was restored"),
            }
        };
        let at = |b: &mut Vec<u8>, i: usize| b[i] ^= 0x10;
        let mut b = good.clone();
        at(&mut b, 0);
        assert!(refused(&b).contains("bad magic"));
        let mut b = good.clone();
        b[8] = 2;
        assert!(refused(&b).contains("format version 2"));
        let mut b = good.clone();
        at(&mut b, 44);
        assert!(refused(&b).contains("header checksum"));
        // A flipped byte in the memory, in the state; a truncated file.
        let base = memory_offset(1) as usize;
        let mut b = good.clone();
        at(&mut b, base + 5 * 4096 + 17);
        assert!(refused(&b).contains("memory checksum"));
        let mut b = good.clone();
        let last = b.len() - 1;
        at(&mut b, last);
        assert!(refused(&b).contains("state checksum"));
        let e = refused(&good[..good.len() - 100]);
        assert!(e.contains("truncated"), "{e}");
        assert!(e.contains("vm.snap"), "{e}");
        // Another layout than the new VM's.
        std::fs::write(&path, &good).unwrap();
        let other = SoftwareGuestConfig::new(4 << 20);
        let e = restore(&path, |_| SoftwareGuest::incoming(other))
            .err()
            .unwrap();
        assert!(e.to_string().contains("memory layout"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_header_layout_is_fixed() {
        let layout = MemoryLayout {
            regions: vec![RegionDesc {
                gpa: 0x1000,
                len: 0x2000,
            }],
        };
        let h = header(&layout, 0xdead_beef, b"st");
        assert_eq!(&h[..8], b"NINJASNP");
        assert_eq!(u32_at(&h, 8), 1);
        assert_eq!(u32_at(&h, 12), 4096);
        assert_eq!(u32_at(&h, 16), 1);
        assert_eq!(u32_at(&h, 20), 0xdead_beef);
        assert_eq!(u64_at(&h, 24), 2);
        assert_eq!(u32_at(&h, 32), crc32fast::hash(b"st"));
        assert_eq!(u32_at(&h, 36), header_crc(&h));
        assert_eq!((u64_at(&h, 40), u64_at(&h, 48)), (0x1000, 0x2000));
        assert_eq!(h.len(), 56);
        assert_eq!(memory_offset(1), 4096);
        assert_eq!(memory_offset(300), 8192);
    }
}
