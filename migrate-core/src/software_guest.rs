//! A software guest: a thread that plays the vCPU, writing through vm-memory (so vm-memory's
//! `AtomicBitmap` sees every write). It serves where `/dev/kvm` is absent, in tests and benches.
//!
//! Memory layout it keeps: the first page of the first region is the header (counter at 0,
//! checksum at 8); the working set is `working_set_pages` pages spread evenly over all memory.
//! Step `n` fills working-set page `n % len` with a pattern derived from `n` (first word `n`),
//! then stores counter `n` and checksum `mix(1) + ... + mix(n)`. So, in any consistent
//! snapshot, [`check_consistency`] holds: checksum matches counter and every working-set page
//! is a complete pattern for a step `<= counter`.

use crate::dirty::{BitmapTracker, DirtyTracker, PAGE_SIZE};
use crate::protocol::MemoryLayout;
use crate::vm::{GuestMemory, IncomingVm, MigratableVm};
use crate::{Error, Result};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// How a software guest behaves.
#[derive(Debug, Clone, PartialEq)]
pub struct SoftwareGuestConfig {
    /// Memory layout.
    pub layout: MemoryLayout,
    /// Pages the guest keeps rewriting.
    pub working_set_pages: u64,
    /// Dirtying rate in MiB/s; `None` = as fast as the thread can.
    pub dirty_rate_mib_s: Option<f64>,
    /// Fill every page with a non-zero pattern at creation (an "all pages used" guest).
    pub fill: bool,
}

impl SoftwareGuestConfig {
    /// One region of `bytes` at address 0, 64 working-set pages at 10 MiB/s, not filled.
    pub fn new(bytes: u64) -> Self {
        SoftwareGuestConfig {
            layout: MemoryLayout {
                regions: vec![crate::protocol::RegionDesc { gpa: 0, len: bytes }],
            },
            working_set_pages: 64,
            dirty_rate_mib_s: Some(10.0),
            fill: false,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Run {
    Running,
    PauseRequested,
    Paused,
    Stop,
}

#[derive(Debug)]
struct Shared {
    run: Mutex<(Run, u8)>,
    cv: Condvar,
}

/// The software guest. Dropping it stops its thread.
#[derive(Debug)]
pub struct SoftwareGuest {
    memory: GuestMemory,
    cfg: SoftwareGuestConfig,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

const STATE_MAGIC: &[u8; 4] = b"SWG1";

fn mix(n: u64) -> u64 {
    let mut x = n.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    x ^= x >> 31;
    x.wrapping_mul(0xbf58_476d_1ce4_e5b9) | 1
}

fn pattern(n: u64, out: &mut [u64; 512]) {
    out[0] = n;
    let m = mix(n);
    for (i, w) in out.iter_mut().enumerate().skip(1) {
        *w = m ^ (i as u64).wrapping_mul(0x1000_0000_01b3);
    }
}

/// The word a filled guest holds at `addr` before it writes there.
fn fill_word(addr: u64) -> u64 {
    (addr ^ 0x5a5a_5a5a_5a5a_5a5a) | 1
}

fn checksum_upto(n: u64) -> u64 {
    (1..=n).fold(0u64, |c, i| c.wrapping_add(mix(i)))
}

/// Addresses of the working-set pages for a layout.
fn working_set(layout: &MemoryLayout, pages: u64) -> Vec<u64> {
    let all: Vec<u64> = layout
        .regions
        .iter()
        .flat_map(|r| (0..r.len / PAGE_SIZE).map(move |i| r.gpa + i * PAGE_SIZE))
        .skip(1) // the header page
        .collect();
    if all.is_empty() || pages == 0 {
        return Vec::new();
    }
    let pages = pages.min(all.len() as u64);
    let stride = all.len() as u64 / pages;
    (0..pages).map(|i| all[(i * stride) as usize]).collect()
}

impl SoftwareGuest {
    /// Creates a running guest (source side).
    pub fn start(cfg: SoftwareGuestConfig) -> Result<Self> {
        let g = Self::create(cfg, false)?;
        if g.cfg.fill {
            g.fill_memory()?;
        }
        g.spawn()?;
        Ok(g)
    }

    /// Creates a guest that waits for migrated memory and state (destination side); it runs
    /// after [`IncomingVm::resume`].
    pub fn incoming(cfg: SoftwareGuestConfig) -> Result<Self> {
        Self::create(cfg, true)
    }

    fn create(cfg: SoftwareGuestConfig, paused: bool) -> Result<Self> {
        let memory = cfg.layout.create_memory()?;
        Ok(SoftwareGuest {
            memory,
            cfg,
            shared: Arc::new(Shared {
                run: Mutex::new((if paused { Run::Paused } else { Run::Running }, 0)),
                cv: Condvar::new(),
            }),
            thread: Mutex::new(None),
        })
    }

    fn fill_memory(&self) -> Result<()> {
        let mut buf = vec![0u8; 1 << 20];
        for r in self.memory.iter() {
            let mut off = 0u64;
            while off < r.len() {
                let len = (r.len() - off).min(buf.len() as u64) as usize;
                let base = r.start_addr().0 + off;
                for (i, c) in buf[..len].chunks_exact_mut(8).enumerate() {
                    c.copy_from_slice(
                        &((base + i as u64 * 8) ^ 0x5a5a_5a5a_5a5a_5a5a | 1).to_le_bytes(),
                    );
                }
                self.memory
                    .write_slice(&buf[..len], GuestAddress(base))
                    .map_err(|e| Error::Memory(e.to_string()))?;
                off += len as u64;
            }
        }
        // The header starts at step 0.
        let header = self.cfg.layout.regions[0].gpa;
        self.memory
            .write_slice(&[0u8; 16], GuestAddress(header))
            .map_err(|e| Error::Memory(e.to_string()))
    }

    fn spawn(&self) -> Result<()> {
        let mut slot = self.thread.lock().expect("poisoned");
        if slot.is_some() {
            return Ok(());
        }
        let memory = self.memory.clone();
        let shared = self.shared.clone();
        let ws = working_set(&self.cfg.layout, self.cfg.working_set_pages);
        let rate = self.cfg.dirty_rate_mib_s;
        let header = self.cfg.layout.regions[0].gpa;
        let h = std::thread::Builder::new()
            .name("software-vcpu".into())
            .spawn(move || vcpu(memory, shared, ws, rate, header))
            .map_err(|e| Error::VmControl(format!("spawning the guest thread: {e}")))?;
        *slot = Some(h);
        Ok(())
    }

    /// The guest memory (same as the trait methods, without naming a trait).
    pub fn guest_memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Addresses of the pages the guest writes: the header page, then the working set.
    pub fn written_pages(&self) -> Vec<u64> {
        let mut v = vec![self.cfg.layout.regions[0].gpa];
        v.extend(working_set(&self.cfg.layout, self.cfg.working_set_pages));
        v
    }

    /// The guest's step counter as stored in its memory.
    pub fn counter(&self) -> u64 {
        read_header(&self.memory, self.cfg.layout.regions[0].gpa).0
    }

    /// Whether the vCPU thread is executing (not paused).
    pub fn is_running(&self) -> bool {
        matches!(self.shared.run.lock().expect("poisoned").0, Run::Running)
    }

    /// Checks the guest's invariants on its own memory.
    pub fn check_consistency(&self) -> Result<u64> {
        check_consistency(&self.memory, &self.cfg)
    }
}

fn read_header(mem: &GuestMemory, header: u64) -> (u64, u64) {
    let c = mem.read_obj::<u64>(GuestAddress(header)).unwrap_or(0);
    let s = mem.read_obj::<u64>(GuestAddress(header + 8)).unwrap_or(0);
    (c, s)
}

/// Checks a software guest's memory: the checksum matches the counter and every working-set
/// page holds a complete pattern of a step not after the counter. Returns the counter.
pub fn check_consistency(mem: &GuestMemory, cfg: &SoftwareGuestConfig) -> Result<u64> {
    let (counter, sum) = read_header(mem, cfg.layout.regions[0].gpa);
    if counter > 1 << 36 {
        return Err(Error::Memory(format!("implausible counter {counter}")));
    }
    if sum != checksum_upto(counter) {
        return Err(Error::Memory(format!(
            "checksum wrong for counter {counter}"
        )));
    }
    let mut page = [0u64; 512];
    let mut want = [0u64; 512];
    for gpa in working_set(&cfg.layout, cfg.working_set_pages) {
        mem.read_slice(page_bytes_mut(&mut page), GuestAddress(gpa))
            .map_err(|e| Error::Memory(e.to_string()))?;
        let n = page[0];
        if n == 0 && !cfg.fill && page.iter().all(|&w| w == 0) {
            continue; // never written
        }
        if cfg.fill
            && page
                .iter()
                .enumerate()
                .all(|(i, &w)| w == fill_word(gpa + i as u64 * 8))
        {
            continue; // filled, never stepped on
        }
        if n > counter {
            return Err(Error::Memory(format!(
                "page {gpa:#x} from step {n} > counter {counter}"
            )));
        }
        pattern(n, &mut want);
        if page != want {
            return Err(Error::Memory(format!("page {gpa:#x} torn (step {n})")));
        }
    }
    Ok(counter)
}

fn page_bytes_mut(p: &mut [u64; 512]) -> &mut [u8] {
    // SAFETY: [u64; 512] is 4096 initialized bytes with no padding; u8 has alignment 1.
    unsafe { std::slice::from_raw_parts_mut(p.as_mut_ptr().cast::<u8>(), 4096) }
}

fn page_bytes(p: &[u64; 512]) -> &[u8] {
    // SAFETY: as in `page_bytes_mut`, read-only.
    unsafe { std::slice::from_raw_parts(p.as_ptr().cast::<u8>(), 4096) }
}

fn vcpu(memory: GuestMemory, shared: Arc<Shared>, ws: Vec<u64>, rate: Option<f64>, header: u64) {
    let (mut n, mut sum) = read_header(&memory, header);
    let mut buf = [0u64; 512];
    // Pace in slices of 1 ms worth of pages.
    let pages_per_s = rate.map(|r| r * 1024.0 * 1024.0 / PAGE_SIZE as f64);
    let started = Instant::now();
    let mut done = 0u64;
    loop {
        let throttle;
        {
            let mut g = shared.run.lock().expect("poisoned");
            loop {
                match g.0 {
                    Run::Running => break,
                    Run::Stop => return,
                    Run::PauseRequested => {
                        g.0 = Run::Paused;
                        shared.cv.notify_all();
                    }
                    Run::Paused => {}
                }
                g = shared.cv.wait(g).expect("poisoned");
            }
            throttle = g.1;
        }
        if ws.is_empty() {
            // Nothing to dirty: only the counter ticks, slowly.
            std::thread::sleep(Duration::from_millis(1));
            n += 1;
            sum = sum.wrapping_add(mix(n));
            let _ = memory.write_obj(sum, GuestAddress(header + 8));
            let _ = memory.write_obj(n, GuestAddress(header));
            continue;
        }
        let t0 = Instant::now();
        for _ in 0..64 {
            n += 1;
            let gpa = ws[(n % ws.len() as u64) as usize];
            pattern(n, &mut buf);
            let _ = memory.write_slice(page_bytes(&buf), GuestAddress(gpa));
            sum = sum.wrapping_add(mix(n));
            let _ = memory.write_obj(sum, GuestAddress(header + 8));
            let _ = memory.write_obj(n, GuestAddress(header));
        }
        done += 64;
        if throttle > 0 {
            let busy = t0.elapsed();
            std::thread::sleep(busy * u32::from(throttle) / u32::from(100 - throttle.min(99)));
        }
        if let Some(pps) = pages_per_s {
            let due = Duration::from_secs_f64(done as f64 / pps);
            let el = started.elapsed();
            if due > el {
                std::thread::sleep(due - el);
            } else if el - due > Duration::from_millis(100) {
                // Fell behind (e.g. while paused): do not burst to catch up.
                done = (el.as_secs_f64() * pps) as u64;
            }
        }
    }
}

impl MigratableVm for SoftwareGuest {
    fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    fn dirty_tracker(&self) -> Result<Box<dyn DirtyTracker>> {
        Ok(Box::new(BitmapTracker::new(&self.memory)))
    }

    fn pause(&self) -> Result<()> {
        let mut g = self.shared.run.lock().expect("poisoned");
        if g.0 == Run::Running {
            g.0 = if self.thread.lock().expect("poisoned").is_some() {
                Run::PauseRequested
            } else {
                Run::Paused
            };
            self.shared.cv.notify_all();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while g.0 == Run::PauseRequested {
            let (ng, _) = self
                .shared
                .cv
                .wait_timeout(g, Duration::from_millis(100))
                .expect("poisoned");
            g = ng;
            if Instant::now() > deadline {
                return Err(Error::VmControl("guest thread did not pause".into()));
            }
        }
        Ok(())
    }

    fn resume(&self) -> Result<()> {
        {
            let mut g = self.shared.run.lock().expect("poisoned");
            if g.0 != Run::Stop {
                g.0 = Run::Running;
            }
            self.shared.cv.notify_all();
        }
        self.spawn()
    }

    fn save_state(&self) -> Result<Vec<u8>> {
        let (c, s) = read_header(&self.memory, self.cfg.layout.regions[0].gpa);
        let mut v = STATE_MAGIC.to_vec();
        v.extend_from_slice(&c.to_le_bytes());
        v.extend_from_slice(&s.to_le_bytes());
        v.extend_from_slice(&self.cfg.working_set_pages.to_le_bytes());
        Ok(v)
    }

    fn set_throttle(&self, percent: u8) -> Result<()> {
        self.shared.run.lock().expect("poisoned").1 = percent.min(99);
        Ok(())
    }
}

impl IncomingVm for SoftwareGuest {
    fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    fn restore_state(&self, state: &[u8]) -> Result<()> {
        if state.len() != 28 || &state[0..4] != STATE_MAGIC {
            return Err(Error::VmControl("not a software guest state".into()));
        }
        let word = |i: usize| u64::from_le_bytes(state[i..i + 8].try_into().expect("8 bytes"));
        let (c, s, ws) = (word(4), word(12), word(20));
        if ws != self.cfg.working_set_pages {
            return Err(Error::VmControl(format!(
                "state has a working set of {ws} pages, this guest {}",
                self.cfg.working_set_pages
            )));
        }
        // The state was saved while paused: memory must show the same step.
        let (mc, ms) = read_header(&self.memory, self.cfg.layout.regions[0].gpa);
        if (mc, ms) != (c, s) {
            return Err(Error::VmControl(format!(
                "memory shows step {mc} but the state step {c}: memory incomplete"
            )));
        }
        Ok(())
    }

    fn resume(&self) -> Result<()> {
        MigratableVm::resume(self)
    }
}

impl Drop for SoftwareGuest {
    fn drop(&mut self) {
        if let Ok(mut g) = self.shared.run.lock() {
            g.0 = Run::Stop;
            self.shared.cv.notify_all();
        }
        if let Some(h) = self.thread.lock().ok().and_then(|mut t| t.take()) {
            let _ = h.join();
        }
    }
}
