//! The controller against real QEMU: two TCG guests from the fixtures, each running the
//! dirtier and the SymVirt agent, with the passthrough HCA STAND-IN (`ivshmem-plain` on a
//! shared memory file, hot-added as a scheduler would assign a VF) that makes QEMU refuse a
//! plain migration. Plans move them to fresh QEMUs started by the controller's launcher and
//! back; rollback tests break one VM's migration in each phase.
//!
//! Tests in this file run one at a time (each has up to four QEMUs).

#[path = "common/guest.rs"]
mod guest;
#[path = "common/plans.rs"]
mod plans;

use guest::*;
use ninja_testkit::{Fixtures, Qemu, QemuConfig, RawQmp, free_tcp_port, qemu_or_skip};
use plans::*;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use symvirt::controller::{
    AfterCheckpoint, Controller, Event, GuestNotice, Outcome, Phase, Report,
};
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

/// The pass numbers the dirtier printed on `serial`, in order.
fn pass_numbers(serial: &str) -> Vec<u64> {
    serial
        .lines()
        .filter_map(|l| l.split("ninja-guest-dirtier: pass=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// Two sources with their stand-in HCAs, and a plan moving them to Ethernet in QEMUs the
/// controller launches under `base` (the destinations a restore uses).
fn checkpoint_setup(
    fixtures: &Fixtures,
    tag: &str,
    vm1_ranks: u32,
    settings: &str,
) -> (PathBuf, Cleanup, Vec<SourceVm>, String) {
    let base = std::env::temp_dir().join(format!("symvirt-ctl-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let mut cleanup = Cleanup::default();
    cleanup.paths.push(base.clone());
    let sources = vec![
        start_source(fixtures, "vm0", 0, tag),
        start_source(fixtures, "vm1", vm1_ranks, tag),
    ];
    for s in &sources {
        cleanup.paths.push(s.channel.clone());
        cleanup.paths.push(s.hca_mem.clone());
    }
    let vms: Vec<VmPlan> = sources
        .iter()
        .enumerate()
        .map(|(i, s)| VmPlan {
            name: s.name.clone(),
            source_qmp: s.qemu.qmp_path().to_owned(),
            source_channel: s.channel.clone(),
            source_devices: hca_standin_toml("T", &s.hca_mem),
            source_interconnect: ib().into(),
            dest: Dest::Launch(base.join(format!("{}-restored", s.name))),
            dest_devices: nic_toml("T", &mac_of(i), ""),
            dest_interconnect: eth(&mac_of(i)),
            ranks: if i == 1 { vm1_ranks } else { 0 },
        })
        .collect();
    let plan = plan_toml(fixtures, settings, &vms);
    (base, cleanup, sources, plan)
}

fn checkpoint(plan: &str, to: &Path, after: AfterCheckpoint) -> (Report, Vec<Event>) {
    let parsed = symvirt::plan::parse(plan).unwrap();
    let events = Mutex::new(Vec::new());
    let sink = |e: &Event| {
        eprintln!("event: {}", serde_json::to_string(e).unwrap());
        events.lock().unwrap().push(e.clone());
    };
    let report = Controller::new(parsed, &sink)
        .checkpoint_qemu(plan, to, after)
        .unwrap();
    eprintln!("report: {report:#?}");
    (report, events.into_inner().unwrap())
}

/// The source runs, with its stand-in HCA, and its dirtier goes on past `passes_before`.
fn runs_at_source_with_its_hca(s: &SourceVm, passes_before: usize) {
    let mut qmp = RawQmp::connect(s.qemu.qmp_path()).unwrap();
    let status = qmp.execute("query-status", json!({})).unwrap();
    assert_eq!(status["running"], json!(true), "{}: {status}", s.name);
    assert!(qom_has_device(&mut qmp, "hca0"), "{}: no stand-in", s.name);
    drop(qmp);
    wait_more_passes(|| s.qemu.serial(), passes_before, &s.name);
}

/// A checkpoint while the job goes on, then the sources die (a lost host) and the cluster is
/// restored from the checkpoint onto Ethernet: every guest's own counter continues from the
/// cut (not from a reboot, not from where the dead sources had got to), its memory checks
/// pass, and it sees its new NIC and not the HCA. A damaged state file is refused first, with
/// nothing started.
#[test]
fn a_checkpointed_cluster_is_restored_on_ethernet_from_its_cut() {
    let test = "a_checkpointed_cluster_is_restored_on_ethernet_from_its_cut";
    let Some(fixtures) = qemu_or_skip(test) else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (base, cleanup, mut sources, plan) = checkpoint_setup(&fixtures, "ckpt", 0, "");
    for s in &sources {
        wait_more_passes(|| s.qemu.serial(), 1, &s.name);
    }
    let before: Vec<u64> = sources
        .iter()
        .map(|s| *pass_numbers(&s.qemu.serial()).last().unwrap())
        .collect();
    let ckpt = base.join("ckpt");
    let (report, events) = checkpoint(&plan, &ckpt, AfterCheckpoint::Continue);
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.errors);
    let at_end: Vec<u64> = sources
        .iter()
        .map(|s| *pass_numbers(&s.qemu.serial()).last().unwrap())
        .collect();
    for phase in [
        Phase::Connect,
        Phase::Quiesce,
        Phase::Detach,
        Phase::Save,
        Phase::Resume,
    ] {
        assert!(report.phase(phase).is_some(), "no timing for {phase}");
        assert!(events.contains(&Event::PhaseStarted { phase }), "{phase}");
    }
    let manifest = symvirt::checkpoint::read(&ckpt).unwrap();
    assert_eq!(manifest.epoch, report.epoch);
    for (i, vm) in manifest.vms.iter().enumerate() {
        assert_eq!(vm.name, sources[i].name);
        assert_eq!(vm.interconnect, infiniband());
        assert_eq!(report.vms[i].transferred, vm.bytes);
        assert!(vm.bytes >= u64::from(MEMORY_MIB) << 20, "{vm:?}");
        assert!(
            vm.format.capabilities.contains(&"mapped-ram".into()),
            "{vm:?}"
        );
    }
    // The job went on at the sources, with their HCAs, told so on their interconnect.
    for (i, s) in sources.iter().enumerate() {
        match &report.vms[i].guest {
            GuestNotice::Resumed { interconnect, .. } => {
                assert_eq!(interconnect, &infiniband(), "{}", s.name)
            }
            other => panic!("{}: {other:?}", s.name),
        }
        runs_at_source_with_its_hca(s, passes(&s.qemu.serial()));
    }
    // A live migration of these sources still works after the save (its capabilities were
    // put back): QEMU refuses mapped-ram on a socket.
    {
        let mut qmp = RawQmp::connect(sources[0].qemu.qmp_path()).unwrap();
        let caps = qmp
            .execute("query-migrate-capabilities", json!({}))
            .unwrap();
        let on: Vec<&serde_json::Value> = caps
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["state"] == json!(true))
            .map(|c| &c["capability"])
            .collect();
        assert!(!on.contains(&&json!("mapped-ram")), "{caps}");
    }
    // The hosts die later: the sources go, their counters some seconds on from the cut.
    let dead_at: Vec<u64> = sources
        .iter_mut()
        .map(|s| {
            wait_more_passes(|| s.qemu.serial(), passes(&s.qemu.serial()) + 10, &s.name);
            let last = *pass_numbers(&s.qemu.serial()).last().unwrap();
            s.qemu.kill();
            last
        })
        .collect();

    // A flipped byte in vm1's file: refused, naming it, nothing started.
    let vm1_file = ckpt.join(&manifest.vms[1].file);
    let flip = |path: &Path| {
        use std::io::{Read, Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap();
        let mut b = [0u8; 1];
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.read_exact(&mut b).unwrap();
        f.seek(SeekFrom::Start(4096)).unwrap();
        f.write_all(&[b[0] ^ 0x40]).unwrap();
    };
    flip(&vm1_file);
    let parsed = symvirt::plan::parse(&plan).unwrap();
    let sink = |_: &Event| {};
    let e = Controller::new(parsed.clone(), &sink)
        .restore_qemu(&ckpt, &base)
        .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Checkpoint, "{e}");
    assert!(e.to_string().contains("vm1.state"), "{e}");
    for s in &sources {
        let qmp = base.join(format!("{}-restored/qmp.sock", s.name));
        assert!(!qmp.exists(), "a QEMU was started for a damaged checkpoint");
    }
    flip(&vm1_file);

    let events = Mutex::new(Vec::new());
    let sink = |e: &Event| {
        eprintln!("event: {}", serde_json::to_string(e).unwrap());
        events.lock().unwrap().push(e.clone());
    };
    let restored = Controller::new(parsed, &sink)
        .restore_qemu(&ckpt, &base)
        .unwrap();
    eprintln!("restore: {restored:#?}");
    for vm in &restored.vms {
        cleanup.pid(vm.destination_pid);
    }
    assert_eq!(
        restored.outcome,
        Outcome::Completed,
        "{:?}",
        restored.errors
    );
    assert_eq!(restored.epoch, report.epoch);
    for (i, s) in sources.iter().enumerate() {
        assert_resumed_on_mac(&restored.vms[i], &mac_of(i));
        let dir = base.join(format!("{}-restored", s.name));
        let devices = guest_pci_until(
            &dir.join("sv.sock"),
            &s.name,
            restored.epoch,
            ethernet(&mac_of(i)),
            |d| has_nic(d) && !has(d, IVSHMEM_DEVICE),
        );
        assert!(
            has_nic(&devices) && !has(&devices, IVSHMEM_DEVICE),
            "{devices:?}"
        );
        let serial = dir.join("serial.log");
        wait_more_passes(|| read(&serial), 1, &s.name);
        let text = read(&serial);
        assert!(!text.contains("MISMATCH"), "{}: {text}", s.name);
        // The guest's counter continues from the cut: after what it had printed before the
        // checkpoint, and well before where the source had got to when it died. (The console
        // lags the guest by some passes: a line the source had not printed yet at the end of
        // the checkpoint may be the restored guest's first.)
        let first = pass_numbers(&text)[0];
        let cut_at_most = at_end[i] + (dead_at[i] - at_end[i]) / 2;
        eprintln!(
            "{}: pass {} before the checkpoint, {} at its end, {} at the death, {first} \
             first after the restore",
            s.name, before[i], at_end[i], dead_at[i]
        );
        assert!(
            first > before[i] && first <= cut_at_most,
            "{}: restored at pass {first}, the cut was after {} and the source died at {}",
            s.name,
            before[i],
            dead_at[i]
        );
    }
    drop(cleanup);
}

/// A checkpoint that cannot quiesce every guest fails: nothing is left that reads as a
/// checkpoint, and the job goes on where it was, with its devices.
#[test]
fn a_checkpoint_whose_guest_never_quiesces_leaves_the_job_running() {
    let test = "a_checkpoint_whose_guest_never_quiesces_leaves_the_job_running";
    let Some(fixtures) = qemu_or_skip(test) else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let settings = "[settings.deadlines_ms]\nquiesce = 5000";
    let (base, _cleanup, sources, plan) = checkpoint_setup(&fixtures, "ckptq", 1, settings);
    let before: Vec<usize> = sources.iter().map(|s| passes(&s.qemu.serial())).collect();
    let ckpt = base.join("ckpt");
    let (report, _) = checkpoint(&plan, &ckpt, AfterCheckpoint::Stop);
    match &report.outcome {
        Outcome::RolledBack { phase, error } => {
            assert_eq!(*phase, Phase::Quiesce, "{error}");
            assert_eq!(error.kind, ErrorKind::Timeout, "{error}");
        }
        other => panic!("expected a rollback: {other:?}"),
    }
    assert!(!ckpt.exists());
    assert!(!base.join(".ckpt.partial").exists());
    for (i, s) in sources.iter().enumerate() {
        runs_at_source_with_its_hca(s, before[i]);
    }
}

/// Mounts a tmpfs of `mib` MiB at `dir` (root only); `false` when that is not possible here.
fn mount_tmpfs(dir: &Path, mib: u64) -> bool {
    std::process::Command::new("mount")
        .args([
            "-t",
            "tmpfs",
            "-o",
            &format!("size={mib}m,mode=0700"),
            "tmpfs",
        ])
        .arg(dir)
        .status()
        .is_ok_and(|s| s.success())
}

/// A disk that fills up during a checkpoint: the checkpoint fails with the reason, the job
/// goes on with its devices, nothing partial is left, and the older checkpoint on the same
/// disk still reads back whole. Then `--stop` on a disk with room: the sources end.
#[test]
fn a_full_disk_fails_the_checkpoint_and_keeps_the_job_and_the_older_one() {
    let test = "a_full_disk_fails_the_checkpoint_and_keeps_the_job_and_the_older_one";
    let Some(fixtures) = qemu_or_skip(test) else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (base, _cleanup, mut sources, plan) = checkpoint_setup(&fixtures, "ckptfull", 0, "");
    let disk = base.join("disk");
    std::fs::create_dir_all(&disk).unwrap();
    if !mount_tmpfs(&disk, 1024) {
        println!("SKIPPED: {test}: cannot mount a tmpfs (needs root)");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&self.0)
                .status();
        }
    }
    let _unmount = Unmount(disk.clone());
    let (first, _) = checkpoint(&plan, &disk.join("first"), AfterCheckpoint::Continue);
    assert_eq!(first.outcome, Outcome::Completed, "{:?}", first.errors);
    let used = nix::sys::statvfs::statvfs(&disk).unwrap();
    let used_mib = ((used.blocks() - used.blocks_free()) * used.fragment_size()) >> 20;
    // Room for half another one.
    let size = used_mib + used_mib / 2 + 1;
    let remounted = std::process::Command::new("mount")
        .args(["-o", &format!("remount,size={size}m"), "tmpfs"])
        .arg(&disk)
        .status()
        .unwrap();
    assert!(remounted.success());
    let before: Vec<usize> = sources.iter().map(|s| passes(&s.qemu.serial())).collect();
    let (second, _) = checkpoint(&plan, &disk.join("second"), AfterCheckpoint::Stop);
    match &second.outcome {
        Outcome::RolledBack { phase, error } => {
            assert_eq!(*phase, Phase::Save, "{error}");
            let text = error.to_string() + &format!("{:?}", error.source);
            assert!(
                text.contains("No space left") || text.contains("ENOSPC"),
                "{text}"
            );
        }
        other => panic!("expected a rollback: {other:?} {:?}", second.errors),
    }
    let left: Vec<String> = std::fs::read_dir(&disk)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["first"], "only the complete checkpoint is left");
    symvirt::checkpoint::read(&disk.join("first")).unwrap();
    for (i, s) in sources.iter().enumerate() {
        runs_at_source_with_its_hca(s, before[i]);
    }

    // Room again: `--stop` saves and ends every source.
    std::fs::remove_dir_all(disk.join("first")).unwrap();
    let (third, _) = checkpoint(&plan, &disk.join("third"), AfterCheckpoint::Stop);
    assert_eq!(third.outcome, Outcome::Completed, "{:?}", third.errors);
    assert!(third.phase(Phase::Commit).is_some());
    symvirt::checkpoint::read(&disk.join("third")).unwrap();
    for s in &mut sources {
        let started = Instant::now();
        while s.qemu.is_running() && started.elapsed() < PATIENCE {
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(
            !s.qemu.is_running(),
            "{}: still running after --stop",
            s.name
        );
    }
}

/// A guard checkpoints the running cluster; vm1's QEMU is killed (a lost host) right after
/// the second checkpoint, whose vm0 file is also damaged: the guard notices, stops vm0's
/// source, finds the newest checkpoint damaged and restores the one before it at the
/// destinations, where both guests run on with their memory intact.
#[test]
fn a_guard_restores_the_cluster_from_the_last_good_checkpoint_when_a_vm_dies() {
    let test = "a_guard_restores_the_cluster_from_the_last_good_checkpoint_when_a_vm_dies";
    let Some(fixtures) = qemu_or_skip(test) else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (base, cleanup, mut sources, plan) = checkpoint_setup(&fixtures, "guard", 0, "");
    let vm1_pid = sources[1].qemu.pid();
    let taken = Mutex::new(Vec::<PathBuf>::new());
    let killed_at = Mutex::new(None::<Instant>);
    let events = Mutex::new(Vec::new());
    let sink = |e: &Event| {
        eprintln!("event: {}", serde_json::to_string(e).unwrap());
        events.lock().unwrap().push((Instant::now(), e.clone()));
        if let Event::CheckpointTaken { dir, .. } = e {
            let mut taken = taken.lock().unwrap();
            taken.push(dir.clone());
            if taken.len() == 2 {
                let state = dir.join("vm0.state");
                let mut bytes = std::fs::read(&state).unwrap();
                bytes[8192] ^= 0x01;
                std::fs::write(&state, bytes).unwrap();
                // SAFETY: kill(2) on the QEMU this test started; no memory is involved.
                unsafe {
                    libc::kill(vm1_pid as i32, libc::SIGKILL);
                }
                *killed_at.lock().unwrap() = Some(Instant::now());
            }
        }
    };
    let settings = symvirt::guard::GuardSettings {
        dir: base.join("guarded"),
        every: Duration::from_secs(1),
        keep: 2,
        poll: Duration::from_millis(200),
        log_dir: base.clone(),
        journals: Some(symvirt::journal::StateDir::open(base.join("state")).unwrap()),
    };
    let parsed = symvirt::plan::parse(&plan).unwrap();
    let controller = Controller::new(parsed, &sink);
    let end = symvirt::guard::guard_qemu(&controller, &plan, &settings).unwrap();
    let (lost, checkpoint, report) = match end {
        symvirt::guard::GuardEnd::Recovered {
            lost,
            checkpoint,
            report,
            took,
        } => {
            eprintln!("{test}: recovered {took:?} after the loss was noticed");
            (lost, checkpoint, report)
        }
        other => panic!("{other:?}"),
    };
    for vm in &report.vms {
        cleanup.pid(vm.destination_pid);
    }
    let taken = taken.into_inner().unwrap();
    assert_eq!(lost, ["vm1"]);
    assert_eq!(checkpoint, taken[0], "the older, intact checkpoint");
    // Every checkpoint was journaled, and every journal closed: nothing for `plan recover`.
    let state = settings.journals.as_ref().unwrap();
    assert!(state.unfinished().unwrap().is_empty());
    let journals = std::fs::read_dir(state.path().join("runs")).unwrap();
    let journaled = journals
        .filter(|e| e.as_ref().unwrap().path().extension() == Some("json".as_ref()))
        .count();
    assert!(
        journaled >= taken.len(),
        "{journaled} journals for {} checkpoints",
        taken.len()
    );
    let events = events.into_inner().unwrap();
    let refused = events.iter().any(|(_, e)| {
        matches!(e, Event::RestoreFailed { dir, error }
            if *dir == taken[1] && error.contains("vm0.state") && error.contains("checksum"))
    });
    assert!(
        refused,
        "the damaged checkpoint was not refused: {events:?}"
    );
    let killed = killed_at.into_inner().unwrap().unwrap();
    let back = events
        .iter()
        .find(|(_, e)| matches!(e, Event::Recovered { .. }))
        .map(|(t, _)| *t)
        .unwrap();
    eprintln!(
        "{test}: from vm1's death to the cluster running again: {:?}",
        back - killed
    );
    // vm0's source was stopped: one copy of each VM.
    let t = Instant::now();
    while sources[0].qemu.is_running() && t.elapsed() < PATIENCE {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!sources[0].qemu.is_running(), "vm0's source still runs");
    for (i, s) in sources.iter().enumerate() {
        assert_resumed_on_mac(&report.vms[i], &mac_of(i));
        let serial = base.join(format!("{}-restored/serial.log", s.name));
        wait_more_passes(|| read(&serial), 1, &s.name);
        assert!(!read(&serial).contains("MISMATCH"), "{}", s.name);
    }
    drop(cleanup);
}

/// A survivor the guard cannot stop (its monitor held by another client, as a hung QEMU's
/// would be) when another VM is lost: nothing is restored, since two copies of a VM must never
/// run. The guard fails naming it, and the survivor runs on, alone.
#[test]
fn a_guard_restores_nothing_while_a_survivor_may_still_run() {
    let test = "a_guard_restores_nothing_while_a_survivor_may_still_run";
    let Some(fixtures) = qemu_or_skip(test) else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (base, cleanup, mut sources, plan) = checkpoint_setup(&fixtures, "guard-busy", 0, "");
    let vm1_pid = sources[1].qemu.pid();
    let vm0_monitor = sources[0].qemu.qmp_path().to_owned();
    let holder = Mutex::new(None::<RawQmp>);
    let events = Mutex::new(Vec::new());
    let sink = |e: &Event| {
        eprintln!("event: {}", serde_json::to_string(e).unwrap());
        events.lock().unwrap().push(e.clone());
        if matches!(e, Event::CheckpointTaken { .. }) {
            // vm0's monitor taken by another client, then vm1's host dies.
            *holder.lock().unwrap() = Some(RawQmp::connect(&vm0_monitor).unwrap());
            // SAFETY: kill(2) on the QEMU this test started; no memory is involved.
            unsafe {
                libc::kill(vm1_pid as i32, libc::SIGKILL);
            }
        }
    };
    let settings = symvirt::guard::GuardSettings {
        dir: base.join("guarded"),
        every: Duration::from_secs(3600),
        keep: 2,
        poll: Duration::from_millis(200),
        log_dir: base.clone(),
        journals: None,
    };
    let parsed = symvirt::plan::parse(&plan).unwrap();
    let controller = Controller::new(parsed, &sink);
    let e = symvirt::guard::guard_qemu(&controller, &plan, &settings)
        .expect_err("restored while vm0 may still run")
        .chain();
    assert!(e.contains("vm0") && e.contains("still answers"), "{e}");
    let events = events.into_inner().unwrap();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::RestoreStarted { .. })),
        "{events:?}"
    );
    assert!(sources[0].qemu.is_running(), "vm0's only copy was stopped");
    assert!(!base.join("vm0-restored/serial.log").exists());
    drop(holder);
    drop(cleanup);
}

/// Evacuation: vm1 leaves its host, vm0 takes part in the cut and stays. vm1 runs at its
/// destination on Ethernet, its source gone; vm0's guest was resumed at its source on its
/// HCA, which it still has, and no destination was started for it.
#[test]
fn an_evacuation_moves_one_vm_and_the_other_stays_in_the_cut() {
    let test = "an_evacuation_moves_one_vm_and_the_other_stays_in_the_cut";
    let Some(fixtures) = qemu_or_skip(test) else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (base, cleanup, mut sources, plan) = checkpoint_setup(&fixtures, "evac", 0, "");
    let parsed = symvirt::plan::parse(&plan).unwrap();
    let events = Mutex::new(Vec::new());
    let sink = |e: &Event| {
        eprintln!("event: {}", serde_json::to_string(e).unwrap());
        events.lock().unwrap().push(e.clone());
    };
    let before = passes(&sources[0].qemu.serial());
    let report = Controller::new(parsed, &sink)
        .staying(["vm0".to_owned()])
        .run_qemu(&base)
        .unwrap();
    for vm in &report.vms {
        cleanup.pid(vm.destination_pid);
    }
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.errors);
    let events = events.into_inner().unwrap();
    let resumed = |vm: &str, at: &str| {
        events
            .iter()
            .any(|e| matches!(e, Event::GuestResumed { vm: v, at: a, .. } if v == vm && a == at))
    };
    assert!(resumed("vm0", "source") && !resumed("vm0", "destination"));
    assert!(resumed("vm1", "destination"));
    match &report.vms[0].guest {
        GuestNotice::Resumed { interconnect, .. } => assert_eq!(interconnect, &infiniband()),
        other => panic!("vm0: {other:?}"),
    }
    assert_resumed_on_mac(&report.vms[1], &mac_of(1));
    assert!(report.vms[0].destination_pid.is_none());
    assert!(!base.join("vm0-restored/qmp.sock").exists());
    runs_at_source_with_its_hca(&sources[0], before);
    let t = Instant::now();
    while sources[1].qemu.is_running() && t.elapsed() < PATIENCE {
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!sources[1].qemu.is_running(), "vm1's source still runs");
    let devices = guest_pci_until(
        &base.join("vm1-restored/sv.sock"),
        "vm1",
        report.epoch,
        ethernet(&mac_of(1)),
        |d| has_nic(d) && !has(d, IVSHMEM_DEVICE),
    );
    assert!(
        has_nic(&devices) && !has(&devices, IVSHMEM_DEVICE),
        "{devices:?}"
    );
    drop(cleanup);
}
