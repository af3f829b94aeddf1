//! Pre-copy engine vs a raw loopback TCP stream, one JSON line per scenario.
//!
//! Each scenario runs the engine (source and destination in this process, loopback TCP) and two
//! raw TCP baselines (the guest's size streamed from a region into a region of that size, no
//! protocol: fresh memory, as the engine's destination gets, `ratio_to_tcp`; and memory whose
//! pages were faulted in beforehand, `ratio_to_tcp_prefaulted`) in turn, `PRECOPY_REPS` times
//! (default 3), and prints medians. The
//! destination VM is "held": it receives memory and state and is resumed, but its vCPU is not
//! restarted, so its memory can be compared with the paused source afterwards (`verified`).
//!
//! Idle scenarios also run the engine with the destination's fresh memory faulted in per batch
//! by each receiver instead of ahead of the stream by a thread of its own (the default,
//! `MigrationConfig::populate_ahead`), in alternating order: `populate_ahead_gain` is the
//! default's throughput over per-batch faulting's, order effects cancelled in pairs of
//! repetitions (see `paired_gain`).
//!
//! Scenarios marked `tls` also run the engine over TLS 1.3 (mutual authentication, every
//! connection encrypted) and in clear text once more in each repetition, both into destination
//! memory faulted in before the clock starts, in alternating order: `tls_ratio` is TLS's
//! throughput over clear text's, paired the same way (`prefaulted_ratio_to_tcp_prefaulted`:
//! that clear-text run against the raw stream into pre-faulted memory, the engine's own cost
//! with fresh memory out of both). Pre-faulted, because on these
//! machines (VMs whose host takes back memory the guest kernel reports free) what fresh memory
//! costs varies fivefold from run to run, and would decide the ratio instead of TLS.
//!
//! The VM is pluggable ([`Workload`]); the software guest is the one used here.
//! `PRECOPY_SCENARIOS=name,name` selects scenarios.

use migrate_core::pages::page_hashes;
use migrate_core::protocol::{MemoryLayout, RegionDesc};
use migrate_core::software_guest::{SoftwareGuest, SoftwareGuestConfig};
use migrate_core::tls::{Credentials, DestinationTls, SourceTls};
use migrate_core::transport::{self, Endpoint, Listener};
use migrate_core::vm::{GuestMemory, IncomingVm, MigratableVm};
use migrate_core::vmm::guest::WORKING_SET_ADDR;
use migrate_core::vmm::{ReferenceVm, VmmConfig};
use migrate_core::{MigrationConfig, TimeoutStrategy, destination, source};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

/// Something the bench can migrate: a running source and a destination for a layout.
trait Workload {
    fn source(
        &self,
        bytes: u64,
        dirty_mib_s: Option<f64>,
    ) -> migrate_core::Result<Box<dyn MigratableVm>>;
    fn destination(&self, layout: &MemoryLayout) -> migrate_core::Result<Box<dyn IncomingVm>>;
}

struct Software;

impl Workload for Software {
    fn source(
        &self,
        bytes: u64,
        dirty: Option<f64>,
    ) -> migrate_core::Result<Box<dyn MigratableVm>> {
        Ok(Box::new(SoftwareGuest::start(SoftwareGuestConfig {
            layout: layout(bytes),
            // Idle: nothing but the counter page; dirtying: a 256 MiB working set.
            working_set_pages: if dirty.is_some() { 65536 } else { 0 },
            dirty_rate_mib_s: dirty,
            fill: true,
        })?))
    }
    fn destination(&self, layout: &MemoryLayout) -> migrate_core::Result<Box<dyn IncomingVm>> {
        Ok(Box::new(Held(Box::new(SoftwareGuest::incoming(
            SoftwareGuestConfig {
                layout: layout.clone(),
                working_set_pages: 0,
                dirty_rate_mib_s: None,
                fill: false,
            },
        )?))))
    }
}

/// A destination guest whose vCPU is not restarted (so its memory stays as received).
struct Held(Box<dyn IncomingVm>);

impl IncomingVm for Held {
    fn memory(&self) -> &GuestMemory {
        self.0.memory()
    }
    fn restore_state(&self, s: &[u8]) -> migrate_core::Result<()> {
        // The state would restart the guest (or, for the software guest, check memory against
        // a working set it does not have here): only memory is compared.
        let _ = s;
        Ok(())
    }
    fn resume(&self) -> migrate_core::Result<()> {
        Ok(())
    }
}

/// The reference VMM's KVM guest, idle and filled: its program rewrites one working-set page;
/// every page above it the host wrote once before the guest started.
struct Kvm;

fn kvm_config(bytes: u64) -> VmmConfig {
    VmmConfig {
        mem_size: bytes,
        working_set_pages: 1,
        ..VmmConfig::default()
    }
}

impl Workload for Kvm {
    fn source(
        &self,
        bytes: u64,
        dirty: Option<f64>,
    ) -> migrate_core::Result<Box<dyn MigratableVm>> {
        assert!(dirty.is_none(), "the KVM scenarios are idle");
        let vm = ReferenceVm::new(kvm_config(bytes))?;
        let chunk: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
        let mut at = WORKING_SET_ADDR + 4096;
        while at < bytes {
            let n = (bytes - at).min(chunk.len() as u64) as usize;
            vm.memory()
                .write_slice(&chunk[..n], vm_memory::GuestAddress(at))
                .map_err(|e| migrate_core::Error::Memory(e.to_string()))?;
            at += n as u64;
        }
        MigratableVm::resume(&vm)?;
        Ok(Box::new(vm))
    }
    fn destination(&self, layout: &MemoryLayout) -> migrate_core::Result<Box<dyn IncomingVm>> {
        let bytes = layout.regions.iter().map(|r| r.len).sum();
        Ok(Box::new(Held(Box::new(ReferenceVm::new_incoming(
            kvm_config(bytes),
        )?))))
    }
}

struct DynVm(Box<dyn IncomingVm>);
impl IncomingVm for DynVm {
    fn memory(&self) -> &GuestMemory {
        self.0.memory()
    }
    fn restore_state(&self, s: &[u8]) -> migrate_core::Result<()> {
        self.0.restore_state(s)
    }
    fn resume(&self) -> migrate_core::Result<()> {
        self.0.resume()
    }
}

fn layout(bytes: u64) -> MemoryLayout {
    MemoryLayout {
        regions: vec![RegionDesc { gpa: 0, len: bytes }],
    }
}

struct Scenario {
    name: &'static str,
    mem: u64,
    connections: usize,
    dirty: Option<f64>,
    /// Also run over TLS.
    tls: bool,
    /// The reference VMM's KVM guest instead of the software guest.
    kvm: bool,
}

/// Both ends' TLS settings, from credentials made with `openssl` in a scratch directory.
struct Tls {
    source: SourceTls,
    destination: DestinationTls,
}

impl Tls {
    fn site() -> Tls {
        let dir = std::env::temp_dir().join(format!("ninja-precopy-tls-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        ninja_testkit::tls::site_credentials(&dir, "precopy bench CA", &["127.0.0.1"])
            .expect("openssl");
        let tls = Tls {
            source: SourceTls::new(&Credentials::source_in(&dir), "127.0.0.1").unwrap(),
            destination: DestinationTls::new(&Credentials::destination_in(&dir), &[]).unwrap(),
        };
        let _ = std::fs::remove_dir_all(&dir);
        tls
    }
}

#[derive(Default)]
struct Run {
    rounds: f64,
    total_ms: f64,
    downtime_ms: f64,
    bytes_sent: f64,
    throughput: f64,
    baseline: f64,
    prefaulted_baseline: f64,
    converged: bool,
    src_cpu: f64,
    dst_cpu: f64,
    verified: bool,
    measured_dirty: f64,
}

/// Faults every page of `memory` in (outside any measured time).
fn prefault(memory: &GuestMemory) {
    for r in memory.iter() {
        let slice = r
            .get_slice(MemoryRegionAddress(0), r.len() as usize)
            .unwrap();
        // SAFETY: one whole guest memory mapping; MADV_POPULATE_WRITE only faults pages in.
        let rc = unsafe {
            libc::madvise(
                slice.ptr_guard_mut().as_ptr().cast(),
                r.len() as usize,
                libc::MADV_POPULATE_WRITE,
            )
        };
        assert_eq!(rc, 0, "MADV_POPULATE_WRITE");
    }
}

/// How the destination's memory starts out for one engine run.
#[derive(Clone, Copy, PartialEq)]
enum Fresh {
    /// Fresh, faulted in by each receiver just before it copies a batch.
    PerBatch,
    /// Fresh, faulted in ahead of the stream by a thread of the destination's own (the
    /// default).
    PopulateAhead,
    /// Faulted in before the clock starts.
    Prefaulted,
}

/// One migration of `src`; `tls` runs it over TLS into destination memory prepared as `fresh`.
fn engine_run(
    w: &dyn Workload,
    src: &dyn MigratableVm,
    s: &Scenario,
    tls: Option<&Tls>,
    fresh: Fresh,
) -> Run {
    let prefaulted = fresh == Fresh::Prefaulted;
    let cfg = MigrationConfig {
        downtime_target: Duration::from_millis(50),
        timeout: Duration::from_secs(20),
        on_timeout: TimeoutStrategy::Force,
        populate_ahead: fresh == Fresh::PopulateAhead,
        ..Default::default()
    };
    let any = Endpoint::Tcp("127.0.0.1:0".parse().unwrap());
    let l = match tls {
        Some(t) => Listener::bind_tls(&any, t.destination.clone()).unwrap(),
        None => Listener::bind(&any).unwrap(),
    };
    let ep = l.endpoint().unwrap();
    let lay = MemoryLayout::of(src.memory());
    let dst_vm = w.destination(&lay).unwrap();
    if prefaulted {
        prefault(dst_vm.memory());
    }
    let dcfg = cfg.clone();
    let dst = std::thread::spawn(move || {
        let c = l.accept(Duration::from_secs(30))?;
        destination::receive(c, &dcfg, move |_| Ok(DynVm(dst_vm)))
    });
    let t = Duration::from_secs(10);
    let conn = match tls {
        Some(tls) => transport::connect_tls(&ep, s.connections, t, &tls.source),
        None => transport::connect(&ep, s.connections, t),
    }
    .unwrap();
    let rep = source::migrate(src, conn, &cfg, None).expect("migration");
    let (dvm, drep) = dst.join().unwrap().expect("receive");
    if std::env::var_os("PRECOPY_DEBUG").is_some() {
        eprintln!(
            "{}\n{}",
            serde_json::to_string(&rep).unwrap(),
            serde_json::to_string(&drep).unwrap()
        );
    }
    let verified = page_hashes(src.memory()).unwrap() == page_hashes(dvm.memory()).unwrap();
    drop(dvm);
    src.resume().unwrap();
    let pre = &rep.rounds[..rep.rounds.len() - 1];
    Run {
        rounds: rep.rounds.len() as f64,
        total_ms: rep.total_ms,
        downtime_ms: rep.downtime_ms,
        bytes_sent: rep.bytes_sent as f64,
        throughput: rep.bytes_sent as f64 / (rep.total_ms / 1e3) / (1u64 << 30) as f64,
        converged: rep.switchover == migrate_core::stats::SwitchoverReason::Converged,
        src_cpu: rep.cpu_s,
        dst_cpu: drep.cpu_s,
        verified,
        measured_dirty: pre.iter().map(|r| r.dirty_rate_bytes_s).fold(0.0, f64::max)
            / (1 << 20) as f64,
        ..Default::default()
    }
}

/// Raw loopback TCP: `bytes` from the source guest's memory into a fresh region (`prefaulted`:
/// one whose pages were all faulted in before the clock starts, as memory a VMM had touched
/// already would be), 1 MiB writes.
fn tcp_baseline(src: &GuestMemory, bytes: u64, prefaulted: bool) -> f64 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let recv = std::thread::spawn(move || {
        let dst =
            GuestMemory::from_ranges(&[(vm_memory::GuestAddress(0), bytes as usize)]).unwrap();
        let r = dst.iter().next().unwrap();
        let slice = r
            .get_slice(MemoryRegionAddress(0), r.len() as usize)
            .unwrap();
        let base = slice.ptr_guard_mut().as_ptr();
        if prefaulted {
            // SAFETY: the whole fresh region, which this thread owns exclusively.
            unsafe { std::ptr::write_bytes(base, 1, bytes as usize) };
        }
        ready_tx.send(()).unwrap();
        let (mut c, _) = l.accept().unwrap();
        let mut off = 0usize;
        while off < bytes as usize {
            let n = (bytes as usize - off).min(1 << 20);
            // SAFETY: [base+off, base+off+n) lies inside the fresh region we own exclusively.
            let buf = unsafe { std::slice::from_raw_parts_mut(base.add(off), n) };
            let got = c.read(buf).unwrap();
            assert!(got > 0, "baseline sender vanished");
            off += got;
        }
        c.write_all(&[1]).unwrap();
    });
    ready.recv().unwrap();
    let r = src.iter().next().unwrap();
    let slice = r.get_slice(MemoryRegionAddress(0), bytes as usize).unwrap();
    let base = slice.ptr_guard().as_ptr();
    let t0 = Instant::now();
    let mut c = TcpStream::connect(addr).unwrap();
    let mut off = 0usize;
    while off < bytes as usize {
        let n = (bytes as usize - off).min(1 << 20);
        // SAFETY: inside the source region; the source guest is paused while this runs.
        let buf = unsafe { std::slice::from_raw_parts(base.add(off), n) };
        c.write_all(buf).unwrap();
        off += n;
    }
    let mut ack = [0u8];
    c.read_exact(&mut ack).unwrap();
    let secs = t0.elapsed().as_secs_f64();
    recv.join().unwrap();
    bytes as f64 / secs / (1u64 << 30) as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The gain of A over B from per-repetition ratios A/B whose runs alternate order: the median
/// over consecutive pairs of repetitions of the pair's geometric mean. Here the first engine
/// run of a repetition is often 2-5x slower than the second (its fresh memory costs a host
/// fault per page), whichever configuration it is; a pair has each configuration first once,
/// so that cancels. An odd last repetition is left out.
fn paired_gain(ratios: Vec<f64>) -> f64 {
    if ratios.len() < 2 {
        return median(ratios);
    }
    median(
        ratios
            .chunks_exact(2)
            .map(|p| (p[0] * p[1]).sqrt())
            .collect(),
    )
}

fn main() {
    let reps: usize = std::env::var("PRECOPY_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let only: Option<Vec<String>> = std::env::var("PRECOPY_SCENARIOS")
        .ok()
        .map(|v| v.split(',').map(str::to_string).collect());
    const GIB: u64 = 1 << 30;
    let scenarios = [
        Scenario {
            name: "idle_full_1g_1c",
            mem: GIB,
            connections: 1,
            dirty: None,
            tls: true,
            kvm: false,
        },
        Scenario {
            name: "idle_full_1g_2c",
            mem: GIB,
            connections: 2,
            dirty: None,
            tls: true,
            kvm: false,
        },
        Scenario {
            name: "kvm_idle_full_1g_1c",
            mem: GIB,
            connections: 1,
            dirty: None,
            tls: false,
            kvm: true,
        },
        Scenario {
            name: "kvm_idle_full_1g_2c",
            mem: GIB,
            connections: 2,
            dirty: None,
            tls: false,
            kvm: true,
        },
        Scenario {
            name: "idle_full_2g_1c",
            mem: 2 * GIB,
            connections: 1,
            dirty: None,
            tls: false,
            kvm: false,
        },
        Scenario {
            name: "idle_full_4g_1c",
            mem: 4 * GIB,
            connections: 1,
            dirty: None,
            tls: false,
            kvm: false,
        },
        Scenario {
            name: "idle_full_4g_2c",
            mem: 4 * GIB,
            connections: 2,
            dirty: None,
            tls: false,
            kvm: false,
        },
        Scenario {
            name: "dirty_1g_100mib_s",
            mem: GIB,
            connections: 1,
            dirty: Some(100.0),
            tls: false,
            kvm: false,
        },
        Scenario {
            name: "dirty_1g_400mib_s",
            mem: GIB,
            connections: 1,
            dirty: Some(400.0),
            tls: false,
            kvm: false,
        },
        Scenario {
            name: "dirty_1g_1000mib_s",
            mem: GIB,
            connections: 1,
            dirty: Some(1000.0),
            tls: false,
            kvm: false,
        },
    ];
    let mut tls: Option<Tls> = None;
    for s in &scenarios {
        if let Some(only) = &only {
            if !only.iter().any(|o| o == s.name) {
                continue;
            }
        }
        let w: &dyn Workload = if s.kvm { &Kvm } else { &Software };
        if s.kvm {
            if let Err(why) = migrate_core::vmm::kvm_usable() {
                eprintln!("SKIPPED: {}: {why}", s.name);
                continue;
            }
        }
        if s.tls && tls.is_none() {
            tls = Some(Tls::site());
        }
        let src = w.source(s.mem, s.dirty).unwrap();
        let mut runs = Vec::new();
        // (clear text, TLS), both into pre-faulted memory.
        let mut tls_pairs: Vec<(Run, Run)> = Vec::new();
        // Idle scenarios: also faulting in per batch, in alternating order (what fresh memory
        // costs varies from run to run here).
        let mut per_batch: Vec<Run> = Vec::new();
        for rep in 0..reps {
            let compare = s.dirty.is_none();
            let mut r = if compare && rep % 2 == 1 {
                per_batch.push(engine_run(w, src.as_ref(), s, None, Fresh::PerBatch));
                engine_run(w, src.as_ref(), s, None, Fresh::PopulateAhead)
            } else {
                let r = engine_run(w, src.as_ref(), s, None, Fresh::PopulateAhead);
                if compare {
                    per_batch.push(engine_run(w, src.as_ref(), s, None, Fresh::PerBatch));
                }
                r
            };
            if s.tls {
                let pre = Fresh::Prefaulted;
                let (clear, secure) = if rep % 2 == 0 {
                    let c = engine_run(w, src.as_ref(), s, None, pre);
                    (c, engine_run(w, src.as_ref(), s, tls.as_ref(), pre))
                } else {
                    let t = engine_run(w, src.as_ref(), s, tls.as_ref(), pre);
                    (engine_run(w, src.as_ref(), s, None, pre), t)
                };
                tls_pairs.push((clear, secure));
            }
            // Interleaved: the baseline runs right after, in the same window, guest paused.
            src.pause().unwrap();
            r.baseline = tcp_baseline(src.memory(), s.mem, false);
            r.prefaulted_baseline = tcp_baseline(src.memory(), s.mem, true);
            src.resume().unwrap();
            runs.push(r);
        }
        src.pause().unwrap();
        drop(src);
        let m = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
        let throughput = m(|r| r.throughput);
        let baseline = m(|r| r.baseline);
        let prefaulted = m(|r| r.prefaulted_baseline);
        let mut line = serde_json::json!({
            "scenario": s.name,
            "mem_bytes": s.mem,
            "connections": s.connections,
            "dirty_rate_mib_s": s.dirty.unwrap_or(0.0),
            "measured_dirty_rate_mib_s": m(|r| r.measured_dirty),
            "rounds": m(|r| r.rounds),
            "total_ms": m(|r| r.total_ms),
            "downtime_ms": m(|r| r.downtime_ms),
            "bytes_sent": m(|r| r.bytes_sent),
            "throughput_gib_s": throughput,
            "tcp_baseline_gib_s": baseline,
            "ratio_to_tcp": throughput / baseline,
            "tcp_prefaulted_gib_s": prefaulted,
            "ratio_to_tcp_prefaulted": throughput / prefaulted,
            "converged": runs.iter().all(|r| r.converged),
            "src_cpu_s": m(|r| r.src_cpu),
            "dst_cpu_s": m(|r| r.dst_cpu),
            "verified": runs.iter().all(|r| r.verified),
            "reps": reps,
        });
        if !per_batch.is_empty() {
            let gains = runs.iter().zip(&per_batch);
            line["per_batch_gib_s"] =
                median(per_batch.iter().map(|r| r.throughput).collect()).into();
            line["per_batch_dst_cpu_s"] =
                median(per_batch.iter().map(|r| r.dst_cpu).collect()).into();
            line["populate_ahead_gain"] =
                paired_gain(gains.map(|(a, b)| a.throughput / b.throughput).collect()).into();
            line["per_batch_verified"] = per_batch.iter().all(|r| r.verified).into();
        }
        if s.tls {
            let cm = |f: fn(&Run) -> f64| median(tls_pairs.iter().map(|(c, _)| f(c)).collect());
            let tm = |f: fn(&Run) -> f64| median(tls_pairs.iter().map(|(_, t)| f(t)).collect());
            let ratios = tls_pairs.iter().map(|(c, t)| t.throughput / c.throughput);
            let extra = serde_json::json!({
                "prefaulted_throughput_gib_s": cm(|r| r.throughput),
                "prefaulted_src_cpu_s": cm(|r| r.src_cpu),
                "prefaulted_dst_cpu_s": cm(|r| r.dst_cpu),
                // The engine's own cost against the wire's: both into pre-faulted memory.
                "prefaulted_ratio_to_tcp_prefaulted": cm(|r| r.throughput) / prefaulted,
                "tls_throughput_gib_s": tm(|r| r.throughput),
                "tls_ratio": paired_gain(ratios.collect()),
                "tls_total_ms": tm(|r| r.total_ms),
                "tls_downtime_ms": tm(|r| r.downtime_ms),
                "tls_src_cpu_s": tm(|r| r.src_cpu),
                "tls_dst_cpu_s": tm(|r| r.dst_cpu),
                "tls_verified": tls_pairs.iter().all(|(c, t)| c.verified && t.verified),
            });
            for (k, v) in extra.as_object().unwrap() {
                line[k] = v.clone();
            }
        }
        println!("{line}");
    }
}
