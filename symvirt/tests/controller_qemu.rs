//! The controller against real QEMU: two TCG guests from the fixtures, each running the
//! dirtier and the SymVirt agent, with the passthrough HCA STAND-IN (`ivshmem-plain` on a
//! shared memory file, hot-added as a scheduler would assign a VF) that makes QEMU refuse a
//! plain migration. Plans move them to fresh QEMUs started by the controller's launcher and
//! back; rollback tests break one VM's migration in each phase.
//!
//! Tests in this file run one at a time (each has up to four QEMUs).

#[path = "common/guest.rs"]
mod guest;

use guest::*;
use ninja_testkit::{Fixtures, Qemu, QemuConfig, RawQmp, free_tcp_port, qemu_or_skip};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use symvirt::controller::{Controller, Event, GuestNotice, Outcome, Phase, Report};
use symvirt::error::ErrorKind;
use symvirt::host_channel::qemu_channel_args;
use symvirt::protocol::Interconnect;

const MEMORY_MIB: u32 = 192;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Files and processes this test creates outside testkit's QEMUs; removed/killed on drop.
#[derive(Default)]
struct Cleanup {
    paths: Vec<PathBuf>,
    pids: Mutex<Vec<u32>>,
}

impl Cleanup {
    fn pid(&self, pid: Option<u32>) {
        if let Some(p) = pid {
            self.pids.lock().unwrap().push(p);
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for &pid in self.pids.lock().unwrap().iter() {
            // SAFETY: kill(2) on a pid this test's controller started; no memory is involved.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        for p in &self.paths {
            let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
        }
    }
}

fn agent_command(vm: &str, ranks: u32) -> String {
    // One program runs from the kernel command line; a shell starts both. ${IFS} is a space
    // for that shell (the command line cannot carry spaces inside one argument).
    format!(
        "/bin/sh -c /bin/ninja-guest-dirtier${{IFS}}4&/bin/symvirt-agent${{IFS}}--ranks${{IFS}}{ranks}${{IFS}}--vm${{IFS}}{vm}${{IFS}}--report-pci"
    )
}

/// The arguments of a destination with the same machine as the sources testkit starts.
fn machine_args(fixtures: &Fixtures, vm: &str, ranks: u32, dir: &Path) -> Vec<String> {
    QemuConfig::new(fixtures)
        .memory_mib(MEMORY_MIB)
        .guest_run(&agent_command(vm, ranks))
        .args(qemu_channel_args(&dir.join("sv.sock")))
        .machine_args(&dir.join("serial.log"))
}

/// A source VM: booted, agent up, the stand-in HCA assigned.
struct SourceVm {
    name: String,
    qemu: Qemu,
    channel: PathBuf,
    hca_mem: PathBuf,
}

fn start_source(fixtures: &Fixtures, name: &str, ranks: u32, tag: &str) -> SourceVm {
    start_source_with(fixtures, name, ranks, tag, &[])
}

/// [`start_source`] with more machine arguments.
fn start_source_with(
    fixtures: &Fixtures,
    name: &str,
    ranks: u32,
    tag: &str,
    extra: &[String],
) -> SourceVm {
    let config = QemuConfig::new(fixtures)
        .memory_mib(MEMORY_MIB)
        .guest_run(&agent_command(name, ranks))
        .args(extra.iter().cloned());
    // The channel socket lives in testkit's per-VM directory, known only after start: use a
    // path of our own instead.
    let channel = std::env::temp_dir().join(format!(
        "symvirt-ctl-{}-{tag}-{name}.sock",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&channel);
    let mut qemu = Qemu::start(config.args(qemu_channel_args(&channel))).unwrap();
    qemu.wait_serial("symvirt-agent", PATIENCE).unwrap();
    let hca_mem = PathBuf::from(format!(
        "/dev/shm/symvirt-ctl-{}-{tag}-{name}-hca0",
        std::process::id()
    ));
    qemu.add_hca_standin(&hca_mem).unwrap();
    SourceVm {
        name: name.into(),
        qemu,
        channel,
        hca_mem,
    }
}

fn mac_of(i: usize) -> String {
    format!("52:54:00:00:10:{:02x}", i + 1)
}

/// How a VM's destination is described in a plan.
enum Dest {
    /// Launched by the controller into this directory.
    Launch(PathBuf),
    /// An already running QEMU: its monitor, channel and migration URI.
    External {
        qmp: PathBuf,
        channel: PathBuf,
        uri: String,
    },
}

fn hca_standin_toml(table: &str, mem: &Path) -> String {
    format!(
        "[[{table}]]\nkind = \"hca-standin\"\nid = \"hca0\"\nmem_path = \"{}\"\nsize = 1048576\n",
        mem.display()
    )
}

fn nic_toml(table: &str, mac: &str, extra: &str) -> String {
    format!("[[{table}]]\nkind = \"virtio-net\"\nid = \"net0\"\nmac = \"{mac}\"\n{extra}")
}

fn toml_list(args: &[String]) -> String {
    let quoted: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// A plan moving `(name, source qmp, source channel, source devices toml, source interconnect)`
/// to `dest` with `dest_devices` / `dest_interconnect`.
struct VmPlan {
    name: String,
    source_qmp: PathBuf,
    source_channel: PathBuf,
    source_devices: String,
    source_interconnect: String,
    dest: Dest,
    dest_devices: String,
    dest_interconnect: String,
    ranks: u32,
}

fn plan_toml(fixtures: &Fixtures, settings: &str, vms: &[VmPlan]) -> String {
    let mut t = format!("[settings]\n{settings}\n");
    for vm in vms {
        let (qmp, channel, uri, launch) = match &vm.dest {
            Dest::Launch(dir) => {
                std::fs::create_dir_all(dir).unwrap();
                (
                    dir.join("qmp.sock"),
                    dir.join("sv.sock"),
                    format!("tcp:127.0.0.1:{}", free_tcp_port()),
                    format!(
                        "launch = {{ args = {} }}\n",
                        toml_list(&machine_args(fixtures, &vm.name, vm.ranks, dir))
                    ),
                )
            }
            Dest::External { qmp, channel, uri } => {
                (qmp.clone(), channel.clone(), uri.clone(), String::new())
            }
        };
        t.push_str(&format!(
            "\n[[vm]]\nname = \"{}\"\n[vm.source]\nqmp = \"unix:{}\"\nchannel = \"unix:{}\"\ninterconnect = {}\n{}\
             [vm.destination]\nqmp = \"unix:{}\"\nchannel = \"unix:{}\"\nmigrate_uri = \"{uri}\"\ninterconnect = {}\n{launch}{}",
            vm.name,
            vm.source_qmp.display(),
            vm.source_channel.display(),
            vm.source_interconnect,
            vm.source_devices.replace("[[T]]", "[[vm.source.devices]]"),
            qmp.display(),
            channel.display(),
            vm.dest_interconnect,
            vm.dest_devices.replace("[[T]]", "[[vm.destination.devices]]"),
        ));
    }
    t
}

fn run(plan: &str, log_dir: &Path, on_event: impl Fn(&Event) + Sync) -> (Report, Vec<Event>) {
    let plan = match symvirt::plan::parse(plan) {
        Ok(p) => p,
        Err(issues) => panic!("plan: {issues:#?}\n{plan}"),
    };
    let events = Mutex::new(Vec::new());
    let sink = |e: &Event| {
        eprintln!("event: {}", serde_json::to_string(e).unwrap());
        on_event(e);
        events.lock().unwrap().push(e.clone());
    };
    let report = Controller::new(plan, &sink).run_qemu(log_dir).unwrap();
    eprintln!("report: {report:#?}");
    (report, events.into_inner().unwrap())
}

fn ib() -> &'static str {
    r#"{ kind = "infiniband", hca = "hca0", port = 1 }"#
}

fn eth(mac: &str) -> String {
    format!("{{ kind = \"ethernet\", mac = \"{mac}\" }}")
}

fn ethernet(mac: &str) -> Interconnect {
    Interconnect::Ethernet {
        mac: mac.into(),
        iface: None,
        pci: None,
    }
}

fn infiniband() -> Interconnect {
    Interconnect::Infiniband {
        hca: "hca0".into(),
        port: 1,
        pci: None,
    }
}

#[test]
fn two_vms_move_from_hca_standin_to_ethernet_and_back() {
    let Some(fixtures) = qemu_or_skip("two_vms_move_from_hca_standin_to_ethernet_and_back") else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let base = std::env::temp_dir().join(format!("symvirt-ctl-fwd-{}", std::process::id()));
    let mut cleanup = Cleanup::default();
    cleanup.paths.push(base.clone());
    let mut sources: Vec<SourceVm> = ["vm0", "vm1"]
        .iter()
        .map(|n| start_source(&fixtures, n, 0, "fwd"))
        .collect();
    for s in &sources {
        cleanup.paths.push(s.channel.clone());
        cleanup.paths.push(s.hca_mem.clone());
    }
    // With the stand-in attached, QEMU refuses a plain migration, as with a VFIO HCA.
    {
        let mut qmp = RawQmp::connect(sources[0].qemu.qmp_path()).unwrap();
        let port = free_tcp_port();
        let refused = qmp.execute("migrate", json!({"uri": format!("tcp:127.0.0.1:{port}")}));
        let err = refused.expect_err("migrate with the stand-in attached must be refused");
        assert!(err.to_string().contains("ivshmem"), "{err}");
    }
    let before: Vec<usize> = sources.iter().map(|s| passes(&s.qemu.serial())).collect();

    // Forward: HCA stand-in -> Ethernet, into QEMUs the controller launches.
    let dest_dirs: Vec<PathBuf> = sources
        .iter()
        .map(|s| base.join(format!("{}-eth", s.name)))
        .collect();
    let vms: Vec<VmPlan> = sources
        .iter()
        .enumerate()
        .map(|(i, s)| VmPlan {
            name: s.name.clone(),
            source_qmp: s.qemu.qmp_path().to_owned(),
            source_channel: s.channel.clone(),
            source_devices: hca_standin_toml("T", &s.hca_mem),
            source_interconnect: ib().into(),
            dest: Dest::Launch(dest_dirs[i].clone()),
            dest_devices: nic_toml("T", &mac_of(i), ""),
            dest_interconnect: eth(&mac_of(i)),
            ranks: 0,
        })
        .collect();
    let plan = plan_toml(&fixtures, "max_parallel = 2", &vms);
    let (report, events) = run(&plan, &base, |_| {});
    for vm in &report.vms {
        cleanup.pid(vm.destination_pid);
    }
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.errors);
    for phase in [
        Phase::Connect,
        Phase::Reserve,
        Phase::Quiesce,
        Phase::Detach,
        Phase::Migrate,
        Phase::Attach,
        Phase::Resume,
        Phase::Commit,
    ] {
        assert!(report.phase(phase).is_some(), "no timing for {phase}");
        assert!(
            events.contains(&Event::PhaseStarted { phase }),
            "no phase_started for {phase}"
        );
    }
    for (i, vm) in report.vms.iter().enumerate() {
        assert_resumed_on_mac(vm, &mac_of(i));
        assert!(vm.transferred > 0);
    }
    // The sources were released; the guests run at the destinations: their agents answer,
    // they see the NIC and not the stand-in, and the dirtier goes on.
    for (i, s) in sources.iter_mut().enumerate() {
        let started = Instant::now();
        while s.qemu.is_running() && started.elapsed() < PATIENCE {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            !s.qemu.is_running(),
            "{}: source QEMU still running",
            s.name
        );
        let dir = &dest_dirs[i];
        let devices = guest_pci_until(
            &dir.join("sv.sock"),
            &s.name,
            report.epoch,
            ethernet(&mac_of(i)),
            |d| has_nic(d) && !has(d, IVSHMEM_DEVICE),
        );
        assert!(has_nic(&devices), "{}: no virtio-net: {devices:?}", s.name);
        assert!(
            !has(&devices, IVSHMEM_DEVICE),
            "{}: stand-in still there: {devices:?}",
            s.name
        );
        let serial = dir.join("serial.log");
        // The destination's console starts empty: new passes prove the migrated guest runs.
        assert!(
            before[i] > 0 || passes(&s.qemu.serial()) > 0,
            "{}: the dirtier never ran",
            s.name
        );
        wait_more_passes(|| read(&serial), passes(&read(&serial)), &s.name);
    }

    // Reverse: Ethernet -> HCA stand-in, again into fresh QEMUs.
    let back_dirs: Vec<PathBuf> = sources
        .iter()
        .map(|s| base.join(format!("{}-hca", s.name)))
        .collect();
    let back_mem: Vec<PathBuf> = sources
        .iter()
        .map(|s| {
            PathBuf::from(format!(
                "/dev/shm/symvirt-ctl-{}-back-{}-hca0",
                std::process::id(),
                s.name
            ))
        })
        .collect();
    cleanup.paths.extend(back_mem.iter().cloned());
    let vms: Vec<VmPlan> = sources
        .iter()
        .enumerate()
        .map(|(i, s)| VmPlan {
            name: s.name.clone(),
            source_qmp: dest_dirs[i].join("qmp.sock"),
            source_channel: dest_dirs[i].join("sv.sock"),
            source_devices: nic_toml("T", &mac_of(i), ""),
            source_interconnect: eth(&mac_of(i)),
            dest: Dest::Launch(back_dirs[i].clone()),
            dest_devices: hca_standin_toml("T", &back_mem[i]),
            dest_interconnect: ib().into(),
            ranks: 0,
        })
        .collect();
    let plan = plan_toml(&fixtures, "max_parallel = 1", &vms);
    let (back, _) = run(&plan, &base, |_| {});
    for vm in &back.vms {
        cleanup.pid(vm.destination_pid);
    }
    assert_eq!(back.outcome, Outcome::Completed, "{:?}", back.errors);
    assert!(back.epoch > report.epoch);
    for (i, s) in sources.iter().enumerate() {
        match &back.vms[i].guest {
            GuestNotice::Resumed { interconnect, .. } => {
                assert_eq!(interconnect, &infiniband(), "{}", s.name)
            }
            other => panic!("{}: {other:?}", s.name),
        }
        let devices = guest_pci_until(
            &back_dirs[i].join("sv.sock"),
            &s.name,
            back.epoch,
            infiniband(),
            |d| has(d, IVSHMEM_DEVICE) && !has_nic(d),
        );
        assert!(
            has(&devices, IVSHMEM_DEVICE),
            "{}: no stand-in HCA: {devices:?}",
            s.name
        );
        assert!(
            !has_nic(&devices),
            "{}: NIC still there: {devices:?}",
            s.name
        );
        let serial = back_dirs[i].join("serial.log");
        wait_more_passes(|| read(&serial), passes(&read(&serial)), &s.name);
    }
}

/// How a rollback test breaks vm1 (vm0 always has a good, launched destination).
enum Break {
    /// vm1's destination runs but never listens (`-incoming defer`, no `migrate-incoming`).
    NotListening,
    /// vm1's destination is killed once its migration is under way.
    KilledMidMigration,
    /// vm1's destination is killed after the switchover and attach, as the guests are told to
    /// resume: vm0's guest resumes at its destination and must come back to its source too.
    KilledAfterSwitchover,
    /// vm1's NIC cannot be plugged at the destination (its PCI slot is taken).
    DeviceAddRefused,
    /// vm1's guest never quiesces (its agent waits for an MPI rank that never registers).
    NeverQuiesces,
}

fn qom_has_device(qmp: &mut RawQmp, id: &str) -> bool {
    let list = qmp
        .execute("qom-list", json!({"path": "/machine/peripheral"}))
        .unwrap();
    list.as_array()
        .unwrap()
        .iter()
        .any(|p| p["name"] == json!(id))
}

fn rollback_case(test: &str, how: Break, expect_phase: Phase) {
    let Some(fixtures) = qemu_or_skip(test) else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tag = format!("rb{}", expect_phase.as_str());
    let base = std::env::temp_dir().join(format!("symvirt-ctl-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&base).unwrap();
    let mut cleanup = Cleanup::default();
    cleanup.paths.push(base.clone());
    let vm1_ranks = if matches!(how, Break::NeverQuiesces) {
        1
    } else {
        0
    };
    let mut sources = vec![
        start_source(&fixtures, "vm0", 0, &tag),
        start_source(&fixtures, "vm1", vm1_ranks, &tag),
    ];
    for s in &sources {
        cleanup.paths.push(s.channel.clone());
        cleanup.paths.push(s.hca_mem.clone());
    }
    // vm1's destination, when the test itself starts it.
    let external = match how {
        Break::NotListening | Break::KilledMidMigration | Break::KilledAfterSwitchover => {
            let sock = base.join("vm1-external-sv.sock");
            let port = free_tcp_port();
            let incoming = match how {
                Break::NotListening => "defer".to_owned(),
                _ => format!("tcp:127.0.0.1:{port}"),
            };
            let config = QemuConfig::new(&fixtures)
                .memory_mib(MEMORY_MIB)
                .guest_run(&agent_command("vm1", vm1_ranks))
                .incoming(&incoming)
                .args(qemu_channel_args(&sock));
            let q = Qemu::start(config).unwrap();
            Some((q, sock, format!("tcp:127.0.0.1:{port}")))
        }
        _ => None,
    };
    let vms: Vec<VmPlan> = sources
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let dest = match (&external, i) {
                (Some((q, sock, uri)), 1) => Dest::External {
                    qmp: q.qmp_path().to_owned(),
                    channel: sock.clone(),
                    uri: uri.clone(),
                },
                _ => Dest::Launch(base.join(format!("{}-dest", s.name))),
            };
            let extra = match (&how, i) {
                // Slot 1 is the PIIX3 bridge on the pc machine.
                (Break::DeviceAddRefused, 1) => "properties = { addr = \"0x1\" }\n",
                _ => "",
            };
            VmPlan {
                name: s.name.clone(),
                source_qmp: s.qemu.qmp_path().to_owned(),
                source_channel: s.channel.clone(),
                source_devices: hca_standin_toml("T", &s.hca_mem),
                source_interconnect: ib().into(),
                dest,
                dest_devices: nic_toml("T", &mac_of(i), extra),
                dest_interconnect: eth(&mac_of(i)),
                ranks: if i == 1 { vm1_ranks } else { 0 },
            }
        })
        .collect();
    let settings = match how {
        // Slow enough that the kill lands mid-migration.
        Break::KilledMidMigration => "max_bandwidth = 20000000",
        Break::NeverQuiesces => "[settings.deadlines_ms]\nquiesce = 5000",
        _ => "",
    };
    let plan = plan_toml(&fixtures, settings, &vms);
    let external = Mutex::new(external);
    let killed = Mutex::new(false);
    let before: Vec<usize> = sources.iter().map(|s| passes(&s.qemu.serial())).collect();
    let (report, events) = run(&plan, &base, |e| {
        let now = match (&how, e) {
            (
                Break::KilledMidMigration,
                Event::VmProgress {
                    vm,
                    phase: Phase::Migrate,
                    fraction: Some(f),
                    ..
                },
            ) => vm == "vm1" && *f < 1.0,
            (
                Break::KilledAfterSwitchover,
                Event::PhaseStarted {
                    phase: Phase::Resume,
                },
            ) => true,
            _ => false,
        };
        let mut killed = killed.lock().unwrap();
        if now && !*killed {
            if let Some((q, _, _)) = external.lock().unwrap().as_mut() {
                q.kill();
                *killed = true;
            }
        }
    });
    for vm in &report.vms {
        cleanup.pid(vm.destination_pid);
    }
    if matches!(
        how,
        Break::KilledMidMigration | Break::KilledAfterSwitchover
    ) {
        assert!(*killed.lock().unwrap(), "the destination was never killed");
    }
    let resumed_at = |vm: &str, at: &str| {
        events
            .iter()
            .any(|e| matches!(e, Event::GuestResumed { vm: v, at: a, .. } if v == vm && a == at))
    };
    if matches!(how, Break::KilledAfterSwitchover) {
        // vm0's guest ran on at its destination (with the NIC), then came back.
        assert!(resumed_at("vm0", "destination"), "{events:?}");
        assert!(!resumed_at("vm1", "destination"), "{events:?}");
    }
    match &report.outcome {
        Outcome::RolledBack { phase, error } => {
            assert_eq!(*phase, expect_phase, "{error}");
            assert_eq!(error.vm.as_deref(), Some("vm1"), "{error}");
            // What a scheduler acts on, without reading the message.
            let expect_kind = match how {
                Break::NeverQuiesces => ErrorKind::Timeout,
                // A QEMU that died, one that never listens, one that refuses a device.
                Break::NotListening
                | Break::KilledMidMigration
                | Break::KilledAfterSwitchover
                | Break::DeviceAddRefused => ErrorKind::Vmm,
            };
            assert_eq!(error.kind, expect_kind, "{error}");
            let reported = events.iter().any(|e| {
                matches!(e, Event::VmError { vm, phase: p, kind, .. }
                    if vm == "vm1" && p == phase && *kind == expect_kind)
            });
            assert!(
                reported,
                "no vm_error event of kind {expect_kind}: {events:?}"
            );
        }
        other => panic!(
            "expected a rollback from {expect_phase}: {other:?} {:?}",
            report.errors
        ),
    }
    // Destinations are gone.
    for vm in &report.vms {
        if let Some(pid) = vm.destination_pid {
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "{}: destination {pid} still there",
                vm.name
            );
        }
    }
    if let Some((q, _, _)) = external.lock().unwrap().as_mut() {
        let started = Instant::now();
        while q.is_running() && started.elapsed() < PATIENCE {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(!q.is_running(), "vm1's external destination still runs");
    }
    // Every source runs, with its stand-in HCA, and its guest was told to go on.
    for (i, s) in sources.iter_mut().enumerate() {
        let mut qmp = RawQmp::connect(s.qemu.qmp_path()).unwrap();
        let status = qmp.execute("query-status", json!({})).unwrap();
        assert_eq!(status["running"], json!(true), "{}: {status}", s.name);
        assert!(
            qom_has_device(&mut qmp, "hca0"),
            "{}: stand-in not re-attached",
            s.name
        );
        drop(qmp);
        let never_quiesced = matches!(how, Break::NeverQuiesces) && i == 1;
        if never_quiesced {
            assert_eq!(report.vms[i].guest, GuestNotice::Aborted);
            s.qemu
                .wait_serial(
                    &format!("host says abort{{epoch={}}}", report.epoch),
                    PATIENCE,
                )
                .unwrap();
        } else {
            match &report.vms[i].guest {
                GuestNotice::Resumed { interconnect, .. } => {
                    assert_eq!(interconnect, &infiniband(), "{}", s.name)
                }
                other => panic!("{}: guest was not resumed: {other:?}", s.name),
            }
            assert!(resumed_at(&s.name, "source"), "{}: {events:?}", s.name);
            let devices = guest_pci_until(&s.channel, &s.name, report.epoch, infiniband(), |d| {
                has(d, IVSHMEM_DEVICE) && !has_nic(d)
            });
            assert!(
                has(&devices, IVSHMEM_DEVICE),
                "{}: guest lost its HCA: {devices:?}",
                s.name
            );
            assert!(!has_nic(&devices), "{}: {devices:?}", s.name);
        }
        let serial = || s.qemu.serial();
        wait_more_passes(serial, passes(&s.qemu.serial()).max(before[i]), &s.name);
    }
}

#[test]
fn rollback_when_the_destination_is_not_listening() {
    rollback_case(
        "rollback_when_the_destination_is_not_listening",
        Break::NotListening,
        Phase::Migrate,
    );
}

#[test]
fn rollback_when_the_destination_dies_mid_migration() {
    rollback_case(
        "rollback_when_the_destination_dies_mid_migration",
        Break::KilledMidMigration,
        Phase::Migrate,
    );
}

#[test]
fn rollback_when_a_destination_dies_after_the_switchover() {
    rollback_case(
        "rollback_when_a_destination_dies_after_the_switchover",
        Break::KilledAfterSwitchover,
        Phase::Resume,
    );
}

#[test]
fn rollback_when_device_add_is_refused_at_the_destination() {
    rollback_case(
        "rollback_when_device_add_is_refused_at_the_destination",
        Break::DeviceAddRefused,
        Phase::Attach,
    );
}

#[test]
fn rollback_when_a_guest_never_quiesces() {
    rollback_case(
        "rollback_when_a_guest_never_quiesces",
        Break::NeverQuiesces,
        Phase::Quiesce,
    );
}

/// The arguments of a standby NIC `fb0` with `mac` (on a user-mode backend, the same kind on
/// both sides: the guest's negotiated features must be offered at the destination too).
fn standby_nic_args(mac: &str) -> Vec<String> {
    [
        "-netdev".to_owned(),
        "user,id=fb0n".to_owned(),
        "-device".to_owned(),
        format!("virtio-net-pci,id=fb0,netdev=fb0n,mac={mac},addr=0x10"),
    ]
    .to_vec()
}

/// A standby NIC (`kind = "standby-nic"`): a destination whose NIC has another MAC is refused
/// before anything moves; one that has it gets the VM, its link switched on, and the guest
/// finds its new interconnect on that NIC without a hot-plug (that the link carries the job's
/// traffic there, and only there, is judged in tests/virtual_cluster.rs by the taps' counters).
#[test]
fn a_standby_nic_is_checked_at_the_destination_and_switched_on_there() {
    let test = "a_standby_nic_is_checked_at_the_destination_and_switched_on_there";
    let Some(fixtures) = qemu_or_skip(test) else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let tag = "standby";
    let base = std::env::temp_dir().join(format!("symvirt-ctl-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&base).unwrap();
    let mut cleanup = Cleanup::default();
    cleanup.paths.push(base.clone());
    let mac = mac_of(0);
    let source = start_source_with(&fixtures, "vm0", 0, tag, &standby_nic_args(&mac));
    cleanup.paths.push(source.channel.clone());
    cleanup.paths.push(source.hca_mem.clone());
    // Off its fabric: no link.
    let mut qmp = RawQmp::connect(source.qemu.qmp_path()).unwrap();
    qmp.execute("set_link", json!({"name": "fb0", "up": false}))
        .unwrap();
    drop(qmp);
    let plan_with = |dest_mac: &str, dir: &str| {
        let vm = VmPlan {
            name: "vm0".into(),
            source_qmp: source.qemu.qmp_path().to_owned(),
            source_channel: source.channel.clone(),
            source_devices: hca_standin_toml("T", &source.hca_mem),
            source_interconnect: ib().into(),
            dest: Dest::Launch(base.join(dir)),
            dest_devices: format!("[[T]]\nkind = \"standby-nic\"\nid = \"fb0\"\nmac = \"{mac}\"\n"),
            dest_interconnect: eth(&mac),
            ranks: 0,
        };
        let plan = plan_toml(&fixtures, "", &[vm]);
        let nic = toml_list(&standby_nic_args(dest_mac));
        plan.replace(
            "launch = { args = [",
            &format!("launch = {{ args = [{}, ", nic.trim_matches(['[', ']'])),
        )
    };

    // The destination's NIC has another MAC: refused, the source keeps its HCA and runs.
    let (report, _) = run(&plan_with(&mac_of(7), "wrong"), &base, |_| {});
    for vm in &report.vms {
        cleanup.pid(vm.destination_pid);
    }
    match &report.outcome {
        Outcome::RolledBack { error, .. } => {
            let text = error.to_string();
            assert!(
                text.contains("standby NIC \"fb0\" has mac") && text.contains(&mac_of(7)),
                "{text}"
            );
            assert_eq!(error.kind, ErrorKind::Refused, "{text}");
        }
        other => panic!("expected a rollback: {other:?}"),
    }
    let mut qmp = RawQmp::connect(source.qemu.qmp_path()).unwrap();
    assert!(qom_has_device(&mut qmp, "hca0"), "stand-in not re-attached");
    drop(qmp);

    // The right one: moved, the link switched on there, the guest on its new interconnect.
    let before = passes(&source.qemu.serial());
    let (report, events) = run(&plan_with(&mac, "right"), &base, |_| {});
    for vm in &report.vms {
        cleanup.pid(vm.destination_pid);
    }
    assert!(
        matches!(report.outcome, Outcome::Completed),
        "{:?} {events:?}",
        report.outcome
    );
    match &report.vms[0].guest {
        GuestNotice::Resumed { interconnect, .. } => match interconnect {
            Interconnect::Ethernet { mac: m, iface, .. } => {
                assert_eq!(m, &mac);
                assert!(
                    iface.is_some(),
                    "the guest found no interface: {interconnect:?}"
                );
            }
            other => panic!("resumed on {other:?}"),
        },
        other => panic!("guest was not resumed: {other:?}"),
    }
    let attach = events.iter().any(|e| {
        matches!(
            e,
            Event::PhaseFinished {
                phase: Phase::Attach,
                ..
            }
        )
    });
    assert!(attach, "{events:?}");
    let dest_serial = base.join("right").join("serial.log");
    wait_more_passes(
        || std::fs::read_to_string(&dest_serial).unwrap_or_default(),
        before,
        "destination",
    );
}
