//! What SymVirt's coordination costs on top of the migration itself, for 1, 2 and 4 TCG VMs.
//!
//! Per repetition and cluster size, interleaved (so both numbers come from one window on this
//! noisy 2-core machine): N source QEMUs (128 MiB, running `symvirt-agent`) boot; first they are
//! migrated plainly, all at once, into N destination QEMUs (`migrate`, no SymVirt: the
//! reference time); then a passthrough HCA stand-in (`ivshmem-plain`, no HCA here) is hot-added
//! to those same VMs and the controller runs a plan moving them from the stand-in to Ethernet
//! (connect, reserve, quiesce, detach, migrate, attach, resume, commit) into destinations it
//! launches. At most 2N QEMUs run at once.
//!
//! The same for the reference KVM VMM (`backend: "reference-kvm"`, 32 MiB VMs in this process,
//! when /dev/kvm works): the plain migration is `migrate-core`'s engine alone, the plan runs on
//! the reference backend with the port-I/O hypercall channel and an HCA stand-in.
//!
//! With the `libvirt` feature (`cargo bench --bench symvirt --features libvirt`), the same for
//! libvirt domains (`backend: "libvirt-tcg"`, 128 MiB, the same guest) between two private
//! libvirt daemons on this machine: the plain migration is libvirt's own (`virsh migrate --live
//! --p2p`, all at once), then the stand-in is plugged as `<shmem>` and the plan runs through
//! the libvirt backend, back to the first daemon.
//!
//! One JSON line per backend and cluster size, medians over the repetitions (ms): each phase,
//! the plan's total, the plain migration, and `coordination_overhead_ms`, the median of the
//! per-repetition difference `total - plain migration`: the number to shrink. Failed runs print
//! an error line and are left out. Run: `cargo bench --bench symvirt` (`NINJA_BENCH_REPS`,
//! default 3; `NINJA_BENCH_SIZES`, default `1,2,4`).

use ninja_testkit::{Fixtures, Qemu, QemuConfig, RawQmp, free_tcp_port, qemu_or_skip};
use qmp::Endpoint;
use serde_json::{Map, Value, json};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use symvirt::cluster::{
    Deadlines, DestinationSpec, Device, LaunchSpec, MigrationSettings, Plan, SourceSpec, VmSpec,
};
use symvirt::controller::{Controller, Event, Outcome, Phase, Report};
use symvirt::host_channel::qemu_channel_args;
use symvirt::protocol::Interconnect;
use symvirt::remote::Address;

const MEMORY_MIB: u32 = 128;
const SIZES: [usize; 3] = [1, 2, 4];
const PATIENCE: Duration = Duration::from_secs(120);
/// Pause after the agents start, before the plain migration.
const SETTLE: Duration = Duration::from_secs(3);

fn machine(fixtures: &Fixtures, vm: &str, sock: &Path) -> QemuConfig {
    QemuConfig::new(fixtures)
        .memory_mib(MEMORY_MIB)
        .guest_run(&format!("/bin/symvirt-agent --ranks 0 --vm {vm}"))
        .args(qemu_channel_args(sock))
}

/// Removes what a run left behind (files, launched destinations) on drop.
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

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Migrates every `(source, destination)` at once with QEMU's own migration; wall time until
/// the last one completed.
fn plain_migration(pairs: &[(&Qemu, &str)]) -> Result<Duration, String> {
    let mut monitors: Vec<RawQmp> = pairs
        .iter()
        .map(|(q, _)| RawQmp::connect(q.qmp_path()))
        .collect::<Result<_, _>>()?;
    let started = Instant::now();
    for (qmp, (_, uri)) in monitors.iter_mut().zip(pairs) {
        qmp.execute("migrate", json!({ "uri": uri }))?;
    }
    let mut done = vec![false; pairs.len()];
    while done.iter().any(|d| !d) {
        if started.elapsed() > PATIENCE {
            return Err("plain migration did not complete".into());
        }
        for (i, qmp) in monitors.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            let status = qmp.execute("query-migrate", json!({}))?;
            match status["status"].as_str() {
                Some("completed") => done[i] = true,
                Some("failed") | Some("cancelled") => {
                    return Err(format!("plain migration failed: {status}"));
                }
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(started.elapsed())
}

/// Both ends of a move from the HCA stand-in (its memory in `mem`) to a NIC with `mac`: the
/// devices and the interconnect of each.
fn standin_to_nic(
    mem: PathBuf,
    mac: &str,
) -> ((Vec<Device>, Interconnect), (Vec<Device>, Interconnect)) {
    let hca = Device::HcaStandin {
        id: "hca0".into(),
        mem_path: mem,
        size: 1 << 20,
        properties: Map::new(),
    };
    let ib = Interconnect::Infiniband {
        hca: "hca0".into(),
        port: 1,
        pci: None,
    };
    let nic = Device::VirtioNet {
        id: "net0".into(),
        mac: mac.into(),
        netdev: None,
        properties: Map::new(),
    };
    let eth = Interconnect::Ethernet {
        mac: mac.into(),
        iface: None,
        pci: None,
    };
    ((vec![hca], ib), (vec![nic], eth))
}

/// One repetition for `n` VMs: (plain migration, plan report phases and total).
fn one_run(fixtures: &Fixtures, n: usize, rep: usize) -> Result<(Duration, Report), String> {
    let base = std::env::temp_dir().join(format!(
        "ninja-bench-symvirt-{}-{n}-{rep}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).map_err(|e| e.to_string())?;
    let mut left = Leftovers::default();
    left.paths.push(base.clone());
    let names: Vec<String> = (0..n).map(|i| format!("vm{i}")).collect();

    // Boot the sources and their plain-migration destinations.
    let mut sources = Vec::new();
    let mut middles = Vec::new();
    let mut uris = Vec::new();
    for name in &names {
        let src = Qemu::start(machine(
            fixtures,
            name,
            &base.join(format!("{name}-a.sock")),
        ))
        .map_err(|e| format!("start source: {e}"))?;
        sources.push(src);
        let uri = format!("tcp:127.0.0.1:{}", free_tcp_port());
        let mid = Qemu::start(
            machine(fixtures, name, &base.join(format!("{name}-b.sock"))).incoming(&uri),
        )
        .map_err(|e| format!("start destination: {e}"))?;
        middles.push(mid);
        uris.push(uri);
    }
    for s in &mut sources {
        s.wait_serial("symvirt-agent", PATIENCE)?;
    }
    // Let the guests finish booting, so both migrations see the same idle guests.
    std::thread::sleep(SETTLE);
    let pairs: Vec<(&Qemu, &str)> = sources
        .iter()
        .zip(&uris)
        .map(|(q, u)| (q, u.as_str()))
        .collect();
    let plain = plain_migration(&pairs)?;
    drop(pairs);
    drop(sources);

    // The same VMs get their "HCA" (the stand-in) and are moved by the controller.
    let mut vms = Vec::new();
    for (i, (name, mid)) in names.iter().zip(&middles).enumerate() {
        let mem = PathBuf::from(format!(
            "/dev/shm/ninja-bench-{}-{n}-{rep}-{name}",
            std::process::id()
        ));
        left.paths.push(mem.clone());
        mid.add_hca_standin(&mem)?;
        let dir = base.join(format!("{name}-c"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mac = format!("52:54:00:00:30:{:02x}", i + 1);
        let ((hca, ib), (nic, eth)) = standin_to_nic(mem, &mac);
        vms.push(VmSpec {
            name: name.clone(),
            source: SourceSpec {
                qmp: Address::Local(Endpoint::Unix(mid.qmp_path().to_owned())),
                channel: Address::Local(Endpoint::Unix(base.join(format!("{name}-b.sock")))),
                libvirt: None,
                devices: hca,
                interconnect: ib,
            },
            destination: DestinationSpec {
                qmp: Address::Local(Endpoint::Unix(dir.join("qmp.sock"))),
                channel: Address::Local(Endpoint::Unix(dir.join("sv.sock"))),
                libvirt: None,
                migrate_uri: format!("tcp:127.0.0.1:{}", free_tcp_port()),
                launch: Some(LaunchSpec {
                    host: None,
                    program: "qemu-system-x86_64".into(),
                    args: machine(fixtures, name, &dir.join("sv.sock"))
                        .machine_args(&dir.join("serial.log")),
                }),
                devices: nic,
                interconnect: eth,
            },
        });
    }
    let report = run_plan(vms, &base, |r| {
        left.pids
            .extend(r.vms.iter().filter_map(|v| v.destination_pid))
    });
    drop(middles);
    Ok((plain, report?))
}

/// A plan of `vms` with default settings.
fn plan_of(vms: Vec<VmSpec>) -> Plan {
    Plan {
        vms,
        deadlines: Deadlines::default(),
        migration: MigrationSettings::default(),
        ssh_program: "ssh".into(),
        tls: None,
    }
}

/// The report of a plan that completed; any other outcome is an error.
fn completed(report: Report) -> Result<Report, String> {
    if report.outcome != Outcome::Completed {
        return Err(format!("plan {:?}: {:?}", report.outcome, report.errors));
    }
    Ok(report)
}

/// Runs a plan of QEMU or libvirt VMs (logs under `base`); `seen` gets the report whatever
/// its outcome (to clean up what the plan launched) before an incomplete one is an error.
fn run_plan(vms: Vec<VmSpec>, base: &Path, seen: impl FnOnce(&Report)) -> Result<Report, String> {
    let sink = |_: &Event| {};
    let report = Controller::new(plan_of(vms), &sink)
        .run_qemu(base)
        .map_err(|e| e.chain())?;
    seen(&report);
    completed(report)
}

/// The reference-VMM counterpart of [`one_run`].
fn reference_run(n: usize) -> Result<(Duration, Report), String> {
    use migrate_core::vmm::{ReferenceVm, VmmConfig};
    use migrate_core::{MigrationConfig, destination, source, transport};
    use std::sync::{Arc, Mutex};
    use symvirt::backend::VmBackend;
    use symvirt::backend::reference::{GuestHome, ReferenceBackend, ReferenceGuest};
    let config = VmmConfig {
        mem_size: 32 << 20,
        working_set_pages: 256,
        ..VmmConfig::default()
    };
    let cfg = MigrationConfig::default();
    let err = |e: symvirt::Error| e.chain();
    let hca = Device::HcaStandin {
        id: "hca0".into(),
        mem_path: PathBuf::from("/dev/shm/unused"),
        size: 1 << 20,
        properties: Map::new(),
    };
    let homes: Vec<GuestHome> = (0..n)
        .map(|i| {
            let g = ReferenceGuest::start(&format!("vm{i}"), config.clone()).map_err(err)?;
            Ok(Arc::new(Mutex::new(g)))
        })
        .collect::<Result<_, String>>()?;
    std::thread::sleep(Duration::from_millis(500));

    // Plain: the engine alone, every VM at once; the sources then run on.
    let vms: Vec<Arc<ReferenceVm>> = homes
        .iter()
        .map(|h| h.lock().unwrap().vm().clone())
        .collect();
    let started = Instant::now();
    let results: Vec<Result<(), String>> = std::thread::scope(|s| {
        let handles: Vec<_> = vms
            .iter()
            .map(|vm| {
                let (cfg, config) = (cfg.clone(), config.clone());
                s.spawn(move || {
                    let (src, dst) = transport::in_process(2).map_err(|e| e.to_string())?;
                    let receiver = std::thread::spawn({
                        let cfg = cfg.clone();
                        move || {
                            destination::receive(dst, &cfg, |_| ReferenceVm::new_incoming(config))
                        }
                    });
                    source::migrate(&**vm, src, &cfg, None).map_err(|e| e.to_string())?;
                    let received = receiver
                        .join()
                        .map_err(|_| "receiver panicked".to_string())?;
                    drop(received.map_err(|e| e.to_string())?);
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let plain = started.elapsed();
    for (r, vm) in results.into_iter().zip(&vms) {
        r?;
        vm.resume().map_err(|e| e.to_string())?;
    }
    drop(vms);

    for h in &homes {
        h.lock().unwrap().plug(&hca, 0).map_err(err)?;
    }
    let unused = Address::Local(Endpoint::Unix(PathBuf::from("in-process")));
    let specs: Vec<VmSpec> = (0..n)
        .map(|i| {
            let mac = format!("52:54:00:00:40:{:02x}", i + 1);
            VmSpec {
                name: format!("vm{i}"),
                source: SourceSpec {
                    qmp: unused.clone(),
                    channel: unused.clone(),
                    libvirt: None,
                    devices: vec![hca.clone()],
                    interconnect: Interconnect::Infiniband {
                        hca: "hca0".into(),
                        port: 1,
                        pci: None,
                    },
                },
                destination: DestinationSpec {
                    qmp: unused.clone(),
                    channel: unused.clone(),
                    libvirt: None,
                    migrate_uri: format!("tcp:127.0.0.1:{}", free_tcp_port()),
                    launch: None,
                    devices: vec![Device::VirtioNet {
                        id: "n0".into(),
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
            }
        })
        .collect();
    let backends: Vec<Box<dyn VmBackend>> = specs
        .iter()
        .zip(&homes)
        .map(|(spec, home)| {
            Box::new(ReferenceBackend::new(
                spec.clone(),
                home.clone(),
                config.clone(),
                cfg.clone(),
            )) as Box<dyn VmBackend>
        })
        .collect();
    let sink = |_: &Event| {};
    let report = Controller::new(plan_of(specs), &sink)
        .run(backends)
        .map_err(|e| e.chain())?;
    Ok((plain, completed(report)?))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let m = if v.is_empty() {
        f64::NAN
    } else if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (m * 10.0).round() / 10.0
}

type Samples = BTreeMap<(&'static str, usize), BTreeMap<String, Vec<f64>>>;

/// Records one run's numbers under `(backend, n)`, or prints why it failed.
fn record(
    samples: &mut Samples,
    key: (&'static str, usize),
    rep: usize,
    run: Result<(Duration, Report), String>,
) {
    let (plain, report) = match run {
        Ok(r) => r,
        Err(e) => {
            let line =
                json!({"bench": "symvirt", "backend": key.0, "vms": key.1, "rep": rep, "error": e});
            println!("{line}");
            return;
        }
    };
    let s = samples.entry(key).or_default();
    for p in PHASES {
        if let Some(d) = report.phase(p) {
            s.entry(format!("{p}_ms")).or_default().push(ms(d));
        }
    }
    let total = ms(report.total);
    s.entry("total_ms".into()).or_default().push(total);
    s.entry("plain_migration_ms".into())
        .or_default()
        .push(ms(plain));
    s.entry("coordination_overhead_ms".into())
        .or_default()
        .push(total - ms(plain));
    let downtime = report
        .vms
        .iter()
        .filter_map(|v| v.downtime_ms.map(|d| d as f64));
    if let Some(max) = downtime.reduce(f64::max) {
        s.entry("max_downtime_ms".into()).or_default().push(max);
    }
}

const PHASES: [Phase; 8] = [
    Phase::Connect,
    Phase::Reserve,
    Phase::Quiesce,
    Phase::Detach,
    Phase::Migrate,
    Phase::Attach,
    Phase::Resume,
    Phase::Commit,
];

fn main() {
    let fixtures = qemu_or_skip("bench symvirt (QEMU)");
    let kvm = match migrate_core::vmm::kvm_usable() {
        Ok(()) => true,
        Err(why) => {
            eprintln!("SKIPPED: bench symvirt (reference VMM): {why}");
            false
        }
    };
    let reps: usize = std::env::var("NINJA_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let sizes: Vec<usize> = std::env::var("NINJA_BENCH_SIZES")
        .ok()
        .map(|s| s.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| SIZES.to_vec());
    #[cfg(feature = "libvirt")]
    let hosts = fixtures.as_ref().and_then(|_| libvirt::hosts());
    let mut samples = Samples::new();
    for rep in 0..reps {
        for &n in &sizes {
            if let Some(f) = &fixtures {
                record(&mut samples, ("qemu-tcg", n), rep, one_run(f, n, rep));
                #[cfg(feature = "libvirt")]
                if let Some(h) = &hosts {
                    record(
                        &mut samples,
                        ("libvirt-tcg", n),
                        rep,
                        libvirt::run(f, h, n, rep),
                    );
                }
            }
            if kvm {
                record(&mut samples, ("reference-kvm", n), rep, reference_run(n));
            }
        }
    }
    for ((backend, n), fields) in samples {
        let mut line = json!({
            "bench": "symvirt",
            "backend": backend,
            "vms": n,
            "memory_mib": if backend == "reference-kvm" { 32 } else { MEMORY_MIB },
            "runs": fields.get("total_ms").map_or(0, Vec::len),
        });
        if let Value::Object(o) = &mut line {
            for (k, v) in fields {
                o.insert(k, json!(median(v)));
            }
        }
        println!("{line}");
    }
}

/// The libvirt counterpart of [`one_run`].
#[cfg(feature = "libvirt")]
mod libvirt {
    use super::*;
    use ninja_testkit::libvirt::{LibvirtHost, libvirt_or_skip};

    /// Two daemons standing for two hosts, for every repetition.
    pub fn hosts() -> Option<(LibvirtHost, LibvirtHost)> {
        if !libvirt_or_skip("bench symvirt (libvirt)") {
            return None;
        }
        match (LibvirtHost::start("bench-a"), LibvirtHost::start("bench-b")) {
            (Ok(a), Ok(b)) => Some((a, b)),
            (a, b) => {
                eprintln!(
                    "SKIPPED: bench symvirt (libvirt): {:?} {:?}",
                    a.err(),
                    b.err()
                );
                None
            }
        }
    }

    fn destroy(host: &LibvirtHost, names: &[String]) {
        for name in names {
            let _ = host.virsh(&["destroy", name]);
        }
    }

    /// `n` domains boot at a, migrate plainly to b (the reference time), get their stand-in
    /// there, and the plan moves them back to a onto Ethernet.
    pub fn run(
        fixtures: &Fixtures,
        (a, b): &(LibvirtHost, LibvirtHost),
        n: usize,
        rep: usize,
    ) -> Result<(Duration, Report), String> {
        let tag = format!("{}-{n}-{rep}", std::process::id());
        let base = std::env::temp_dir().join(format!("ninja-bench-lv-{tag}"));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).map_err(|e| e.to_string())?;
        let mut left = Leftovers::default();
        left.paths.push(base.clone());
        let names: Vec<String> = (0..n).map(|i| format!("lv{i}")).collect();
        // Whatever happens, no domain of this run outlives it.
        struct Destroy<'a>(&'a LibvirtHost, &'a LibvirtHost, &'a [String]);
        impl Drop for Destroy<'_> {
            fn drop(&mut self) {
                destroy(self.0, self.2);
                destroy(self.1, self.2);
            }
        }
        let _destroy = Destroy(a, b, &names);
        for name in &names {
            let serial = base.join(format!("{name}-serial.log"));
            let xml = QemuConfig::new(fixtures)
                .memory_mib(MEMORY_MIB)
                .guest_run(&format!("/bin/symvirt-agent --ranks 0 --vm {name}"))
                .libvirt_domain_xml(name, &serial, "");
            a.create(&xml).map_err(|e| e.to_string())?;
        }
        for name in &names {
            let serial = base.join(format!("{name}-serial.log"));
            let started = Instant::now();
            while !std::fs::read_to_string(&serial)
                .unwrap_or_default()
                .contains("symvirt-agent")
            {
                if started.elapsed() > PATIENCE {
                    return Err(format!("{name}: no agent"));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        std::thread::sleep(SETTLE);
        // The plain migration: libvirt's own, every domain at once.
        let started = Instant::now();
        let plain: Vec<Result<(), String>> = std::thread::scope(|scope| {
            let handles: Vec<_> = names
                .iter()
                .map(|name| {
                    scope.spawn(move || {
                        let uri = format!("tcp://127.0.0.1:{}", free_tcp_port());
                        a.virsh_ok(&[
                            "migrate",
                            name,
                            b.uri(),
                            "--live",
                            "--p2p",
                            "--migrateuri",
                            &uri,
                        ])
                        .map(drop)
                        .map_err(|e| e.to_string())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let plain_took = started.elapsed();
        plain.into_iter().collect::<Result<Vec<()>, String>>()?;

        // At b they get their "HCA", and the plan moves them back to a, onto Ethernet.
        let mut vms = Vec::new();
        for (i, name) in names.iter().enumerate() {
            let shm = format!("ninja-bench-lv-{tag}-{name}");
            left.paths.push(PathBuf::from("/dev/shm").join(&shm));
            let device = base.join(format!("{name}-hca.xml"));
            std::fs::write(
                &device,
                format!(
                    "<shmem name='{shm}'><model type='ivshmem-plain'/><size unit='bytes'>1048576</size><alias name='ua-hca0'/></shmem>"
                ),
            )
            .map_err(|e| e.to_string())?;
            b.virsh_ok(&[
                "attach-device",
                name,
                &device.display().to_string(),
                "--live",
            ])
            .map_err(|e| e.to_string())?;
            let mac = format!("52:54:00:00:32:{:02x}", i + 1);
            let at = |host: &LibvirtHost| symvirt::cluster::LibvirtDomain {
                uri: host.uri().into(),
                domain: name.clone(),
                migrate_uri: Some(format!("tcp:127.0.0.1:{}", free_tcp_port())),
                persistent: false,
                undefine_source: false,
            };
            let unused = Address::Local(Endpoint::Unix("libvirt".into()));
            let ((hca, ib), (nic, eth)) =
                standin_to_nic(PathBuf::from("/dev/shm").join(&shm), &mac);
            vms.push(VmSpec {
                name: name.clone(),
                source: SourceSpec {
                    qmp: unused.clone(),
                    channel: unused.clone(),
                    libvirt: Some(at(b)),
                    devices: hca,
                    interconnect: ib,
                },
                destination: DestinationSpec {
                    qmp: unused.clone(),
                    channel: unused,
                    libvirt: Some(at(a)),
                    migrate_uri: String::new(),
                    launch: None,
                    devices: nic,
                    interconnect: eth,
                },
            });
        }
        Ok((plain_took, super::run_plan(vms, &base, |_| {})?))
    }
}
