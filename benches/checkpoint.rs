//! What a checkpoint of a whole virtual cluster costs, what a restore costs, and how long a
//! guard takes to bring the cluster back after a VM dies, against guest memory and VM count.
//!
//! Per configuration (256 MiB and 1 GiB per VM; 1, 2 and 4 VMs) and repetition: N TCG QEMUs
//! boot, each guest running the dirtier over half its memory (so the checkpoint has data to
//! write) and the SymVirt agent, with the passthrough HCA stand-in hot-added. Then:
//! - `Controller::checkpoint` (the job goes on): the job-visible pause (quiesce to resume),
//!   the save phase (QEMU writing, then the files checksummed and `fsync`ed, the manifest
//!   renamed into place), bytes of state (apparent and allocated: mapped-ram files are sparse)
//!   and the write rate against the disk's: right after the checkpoint, the same amount of
//!   non-zero bytes written to a file in the same directory as a checkpoint writes (buffered,
//!   then `fsync`);
//! - the sources are killed and `Controller::restore` brings the cluster back on Ethernet:
//!   its total time.
//!
//! For 2 VMs of 256 MiB, a guard (`symvirt::guard`) also runs: one checkpoint, then one source
//! is killed; the time from the kill to every guest resumed from the checkpoint.
//!
//! Then the disk scenario: 1 VM of 256 MiB with a writable raw disk of 0, 256 and 1024 MiB of
//! data, at one path for source and destination; its copy is part of the pause.
//!
//! One JSON line per configuration, medians over the repetitions. Run:
//! `cargo bench --bench checkpoint` (`NINJA_BENCH_REPS`, default 3; `NINJA_BENCH_ONLY=disk`
//! for the disk scenario alone).

use ninja_testkit::{Fixtures, Qemu, QemuConfig, free_tcp_port, qemu_or_skip};
use qmp::Endpoint;
use serde_json::{Map, json};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use symvirt::cluster::{
    Deadlines, DestinationSpec, Device, LaunchSpec, MigrationSettings, Plan, SourceSpec, VmSpec,
};
use symvirt::controller::{AfterCheckpoint, Controller, Event, Outcome, Phase};
use symvirt::host_channel::qemu_channel_args;
use symvirt::protocol::Interconnect;
use symvirt::remote::Address;

const MEMORY_MIB: [u32; 2] = [256, 1024];
const VMS: [usize; 3] = [1, 2, 4];
/// Writable disk sizes of the disk scenario (1 VM of 256 MiB): its data is copied in the pause.
const DISK_MIB: [u32; 3] = [0, 256, 1024];
const PATIENCE: Duration = Duration::from_secs(300);

fn machine(
    fixtures: &Fixtures,
    vm: &str,
    mib: u32,
    sock: &Path,
    disk: Option<&Path>,
) -> QemuConfig {
    let config = match disk {
        Some(d) => QemuConfig::new(fixtures).arg("-drive").arg(format!(
            "file={},format=raw,if=virtio,id=scratch",
            d.display()
        )),
        None => QemuConfig::new(fixtures),
    };
    config
        .memory_mib(mib)
        .guest_run(&format!(
            "/bin/sh -c /bin/ninja-guest-dirtier${{IFS}}{}&/bin/symvirt-agent${{IFS}}--ranks${{IFS}}0${{IFS}}--vm${{IFS}}{vm}",
            mib / 2
        ))
        .args(qemu_channel_args(sock))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Writes `bytes` of non-zero data to a file in `dir` and `fsync`s it: bytes/s.
fn disk_write_speed(dir: &Path, bytes: usize) -> Result<f64, String> {
    let path = dir.join("disk-speed");
    let block: Vec<u8> = (0..1 << 20).map(|i| (i % 251 + 1) as u8).collect();
    let started = Instant::now();
    let mut f = std::fs::File::create(&path).map_err(|e| e.to_string())?;
    for _ in 0..bytes / block.len() {
        f.write_all(&block).map_err(|e| e.to_string())?;
    }
    f.sync_all().map_err(|e| e.to_string())?;
    let took = started.elapsed();
    drop(f);
    let _ = std::fs::remove_file(&path);
    Ok(bytes as f64 / took.as_secs_f64())
}

/// Kills what a run left behind, and removes its files, on drop.
#[derive(Default)]
struct Leftovers {
    paths: Vec<PathBuf>,
    pids: Vec<u32>,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for pid in &self.pids {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
        for p in &self.paths {
            let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
        }
    }
}

/// N sources booted, with their stand-ins, and the plan moving them to launched destinations.
fn cluster(
    fixtures: &Fixtures,
    base: &Path,
    n: usize,
    mib: u32,
    disk_mib: u32,
    left: &mut Leftovers,
) -> Result<(Vec<Qemu>, Plan), String> {
    let mut sources = Vec::new();
    let mut vms = Vec::new();
    for i in 0..n {
        let name = format!("vm{i}");
        let sock = base.join(format!("{name}-s.sock"));
        // A raw disk full of data (nothing sparse to skip), at one path for both sides.
        let disk = (disk_mib > 0).then(|| base.join(format!("{name}-disk.raw")));
        if let Some(d) = &disk {
            let block: Vec<u8> = (0..1u32 << 20)
                .map(|b| (b.wrapping_mul(2_654_435_761) >> 13) as u8 | 1)
                .collect();
            let mut f = std::fs::File::create(d).map_err(|e| e.to_string())?;
            for _ in 0..disk_mib {
                std::io::Write::write_all(&mut f, &block).map_err(|e| e.to_string())?;
            }
        }
        let mut q = Qemu::start(machine(fixtures, &name, mib, &sock, disk.as_deref()))
            .map_err(|e| format!("start source: {e}"))?;
        q.wait_serial("ninja-guest-dirtier: pass=", PATIENCE)?;
        let mem = base.join(format!("{name}-hca0"));
        left.paths.push(mem.clone());
        q.add_hca_standin(&mem)?;
        let dir = base.join(format!("{name}-restored"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mac = format!("52:54:00:00:50:{:02x}", i + 1);
        vms.push(VmSpec {
            name: name.clone(),
            source: SourceSpec {
                qmp: Address::Local(Endpoint::Unix(q.qmp_path().to_owned())),
                channel: Address::Local(Endpoint::Unix(sock)),
                libvirt: None,
                devices: vec![Device::HcaStandin {
                    id: "hca0".into(),
                    mem_path: mem,
                    size: 1 << 20,
                    properties: Map::new(),
                }],
                interconnect: Interconnect::Infiniband {
                    hca: "hca0".into(),
                    port: 1,
                    pci: None,
                },
            },
            destination: DestinationSpec {
                qmp: Address::Local(Endpoint::Unix(dir.join("qmp.sock"))),
                channel: Address::Local(Endpoint::Unix(dir.join("sv.sock"))),
                libvirt: None,
                migrate_uri: format!("tcp:127.0.0.1:{}", free_tcp_port()),
                launch: Some(LaunchSpec {
                    host: None,
                    program: "qemu-system-x86_64".into(),
                    args: machine(fixtures, &name, mib, &dir.join("sv.sock"), disk.as_deref())
                        .machine_args(&dir.join("serial.log")),
                }),
                devices: vec![Device::VirtioNet {
                    id: "net0".into(),
                    mac: mac.clone(),
                    netdev: None,
                    properties: Map::new(),
                }],
                interconnect: Interconnect::Ethernet {
                    mac,
                    iface: None,
                    pci: None,
                },
            },
        });
        sources.push(q);
    }
    let plan = Plan {
        vms,
        deadlines: Deadlines::default(),
        migration: MigrationSettings::default(),
        ssh_program: "ssh".into(),
        tls: None,
    };
    Ok((sources, plan))
}

/// A sink that keeps when each phase started.
struct Timeline(Mutex<Vec<(Instant, Event)>>);

impl Timeline {
    fn at(&self, phase: Phase) -> Option<Instant> {
        self.0.lock().unwrap().iter().find_map(|(t, e)| match e {
            Event::PhaseStarted { phase: p } if *p == phase => Some(*t),
            _ => None,
        })
    }
}

struct Run {
    disk_bytes_per_s: f64,
    pause_ms: f64,
    save_ms: f64,
    state_bytes: u64,
    allocated_bytes: u64,
    restore_ms: f64,
}

fn one_run(
    fixtures: &Fixtures,
    n: usize,
    mib: u32,
    disk_mib: u32,
    rep: usize,
) -> Result<Run, String> {
    let base = std::env::temp_dir().join(format!(
        "ninja-bench-ckpt-{}-{n}-{mib}-{disk_mib}-{rep}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).map_err(|e| e.to_string())?;
    let mut left = Leftovers::default();
    left.paths.push(base.clone());
    let (mut sources, plan) = cluster(fixtures, &base, n, mib, disk_mib, &mut left)?;

    let timeline = Timeline(Mutex::new(Vec::new()));
    let sink = |e: &Event| timeline.0.lock().unwrap().push((Instant::now(), e.clone()));
    let ckpt = base.join("ckpt");
    let report = Controller::new(plan.clone(), &sink)
        .checkpoint_qemu("", &ckpt, AfterCheckpoint::Continue)
        .map_err(|e| e.chain())?;
    let finished = Instant::now();
    if report.outcome != Outcome::Completed {
        return Err(format!(
            "checkpoint {:?}: {:?}",
            report.outcome, report.errors
        ));
    }
    let quiesce = timeline.at(Phase::Quiesce).ok_or("no quiesce")?;
    let save = timeline.at(Phase::Save).ok_or("no save")?;
    let resume = timeline.at(Phase::Resume).ok_or("no resume")?;
    let manifest = symvirt::checkpoint::read(&ckpt).map_err(|e| e.chain())?;
    let state_bytes = manifest.vms.iter().map(|v| v.bytes).sum();
    let allocated_bytes = manifest
        .vms
        .iter()
        .flat_map(|v| std::iter::once(&v.file).chain(v.disks.iter().map(|d| &d.copy.file)))
        .map(|file| {
            std::fs::metadata(ckpt.join(file))
                .map(|m| m.blocks() * 512)
                .unwrap_or(0)
        })
        .sum::<u64>();
    // The disk, the same amount the checkpoint wrote, right after it.
    let disk_bytes_per_s = disk_write_speed(&base, allocated_bytes.max(64 << 20) as usize)?;

    for q in &mut sources {
        q.kill();
    }
    let sink = |_: &Event| {};
    let restored = Controller::new(plan, &sink)
        .restore_qemu(&ckpt, &base)
        .map_err(|e| e.chain())?;
    left.pids
        .extend(restored.vms.iter().filter_map(|v| v.destination_pid));
    if restored.outcome != Outcome::Completed {
        return Err(format!(
            "restore {:?}: {:?}",
            restored.outcome, restored.errors
        ));
    }
    Ok(Run {
        disk_bytes_per_s,
        pause_ms: ms(finished.duration_since(quiesce)),
        save_ms: ms(resume.duration_since(save)),
        state_bytes,
        allocated_bytes,
        restore_ms: ms(restored.total),
    })
}

/// A guard over 2 VMs: one checkpoint, then vm1's QEMU killed; kill to every guest resumed.
fn guard_run(fixtures: &Fixtures, mib: u32, rep: usize) -> Result<(f64, f64), String> {
    let base = std::env::temp_dir().join(format!(
        "ninja-bench-guard-{}-{mib}-{rep}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).map_err(|e| e.to_string())?;
    let mut left = Leftovers::default();
    left.paths.push(base.clone());
    let (sources, plan) = cluster(fixtures, &base, 2, mib, 0, &mut left)?;
    let victim = sources[1].pid();
    let killed = Mutex::new(None::<Instant>);
    let sink = |e: &Event| {
        if matches!(e, Event::CheckpointTaken { .. }) {
            let mut k = killed.lock().unwrap();
            if k.is_none() {
                let _ = std::process::Command::new("kill")
                    .args(["-9", &victim.to_string()])
                    .status();
                *k = Some(Instant::now());
            }
        }
    };
    let settings = symvirt::guard::GuardSettings {
        dir: base.join("guarded"),
        every: Duration::from_secs(3600),
        keep: 2,
        poll: Duration::from_millis(500),
        log_dir: base.clone(),
        journals: None,
    };
    let controller = Controller::new(plan, &sink);
    let end = symvirt::guard::guard_qemu(&controller, "", &settings).map_err(|e| e.chain())?;
    let back = Instant::now();
    match end {
        symvirt::guard::GuardEnd::Recovered { report, took, .. } => {
            left.pids
                .extend(report.vms.iter().filter_map(|v| v.destination_pid));
            let k = killed.lock().unwrap().ok_or("never killed")?;
            Ok((ms(back.duration_since(k)), ms(took)))
        }
        other => Err(format!("guard ended {other:?}")),
    }
}

/// The JSON line of one configuration's runs (medians).
fn line(n: usize, mib: u32, disk_mib: u32, runs: &[Run]) -> serde_json::Value {
    let rate: Vec<f64> = runs
        .iter()
        .map(|r| r.state_bytes as f64 / (r.save_ms / 1000.0))
        .collect();
    let allocated_rate: Vec<f64> = runs
        .iter()
        .map(|r| r.allocated_bytes as f64 / (r.save_ms / 1000.0))
        .collect();
    let ratio: Vec<f64> = runs
        .iter()
        .map(|r| r.allocated_bytes as f64 / (r.save_ms / 1000.0) / r.disk_bytes_per_s)
        .collect();
    json!({
        "bench": "checkpoint",
        "vms": n,
        "memory_mib": mib,
        "disk_mib": disk_mib,
        "reps": runs.len(),
        "pause_ms": median(runs.iter().map(|r| r.pause_ms).collect()),
        "save_ms": median(runs.iter().map(|r| r.save_ms).collect()),
        "state_mib": median(runs.iter().map(|r| r.state_bytes as f64 / 1048576.0).collect()),
        "allocated_mib": median(runs.iter().map(|r| r.allocated_bytes as f64 / 1048576.0).collect()),
        "state_mib_s": median(rate) / 1048576.0,
        "written_mib_s": median(allocated_rate) / 1048576.0,
        "disk_mib_s": median(runs.iter().map(|r| r.disk_bytes_per_s / 1048576.0).collect()),
        "written_to_disk_ratio": median(ratio),
        "restore_ms": median(runs.iter().map(|r| r.restore_ms).collect()),
    })
}

/// `reps` runs of a configuration; each failure is printed as its own line.
fn runs(fixtures: &Fixtures, n: usize, mib: u32, disk_mib: u32, reps: usize) -> Vec<Run> {
    (0..reps)
        .filter_map(|rep| match one_run(fixtures, n, mib, disk_mib, rep) {
            Ok(r) => Some(r),
            Err(e) => {
                println!(
                    "{}",
                    json!({"bench": "checkpoint", "vms": n, "memory_mib": mib,
                        "disk_mib": disk_mib, "error": e})
                );
                None
            }
        })
        .collect()
}

fn main() {
    let Some(fixtures) = qemu_or_skip("checkpoint bench") else {
        return;
    };
    let reps: usize = std::env::var("NINJA_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    // NINJA_BENCH_ONLY=disk: only the disk scenario.
    let only_disks = std::env::var("NINJA_BENCH_ONLY").is_ok_and(|o| o == "disk");
    for mib in MEMORY_MIB.iter().copied().filter(|_| !only_disks) {
        for n in VMS {
            let runs = runs(&fixtures, n, mib, 0, reps);
            if runs.is_empty() {
                continue;
            }
            let mut line = line(n, mib, 0, &runs);
            if n == 2 && mib == 256 {
                let guarded: Vec<(f64, f64)> = (0..reps)
                    .filter_map(|rep| match guard_run(&fixtures, mib, rep) {
                        Ok(r) => Some(r),
                        Err(e) => {
                            println!("{}", json!({"bench": "checkpoint-guard", "error": e}));
                            None
                        }
                    })
                    .collect();
                if !guarded.is_empty() {
                    line["death_to_running_ms"] =
                        json!(median(guarded.iter().map(|g| g.0).collect()));
                    line["noticed_to_running_ms"] =
                        json!(median(guarded.iter().map(|g| g.1).collect()));
                }
            }
            println!("{line}");
        }
    }
    // A writable disk: copied while the VM is stopped, so the pause grows with it.
    for disk_mib in DISK_MIB {
        let runs = runs(&fixtures, 1, 256, disk_mib, reps);
        if !runs.is_empty() {
            println!("{}", line(1, 256, disk_mib, &runs));
        }
    }
}
