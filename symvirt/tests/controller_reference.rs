//! The controller on the reference-VMM backend: two KVM VMs of `migrate-core`'s reference VMM,
//! each with a passthrough HCA STAND-IN (no HCA exists here) and the SymVirt port-I/O
//! hypercall channel, moved to Ethernet and back by `migrate-core`'s engine, then a plan whose
//! destination refuses the VM rolled back. The guests are checked by their own counters and
//! memory: every page of their working sets holds what the guest last wrote.

use migrate_core::vmm::{ReferenceVm, VmmConfig};
use migrate_core::{MigrationConfig, destination, source, transport};
use ninja_testkit::{free_tcp_port, kvm_or_skip};
use qmp::Endpoint;
use serde_json::Map;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use symvirt::backend::reference::{GuestHome, ReferenceBackend, ReferenceGuest};
use symvirt::backend::{MigrationProgress, MigrationResult, VmBackend};
use symvirt::cluster::{
    Deadlines, DestinationSpec, Device, MigrationSettings, Plan, SourceSpec, VmSpec,
};
use symvirt::controller::{
    AfterCheckpoint, Controller, Event, GuestNotice, Outcome, Phase, Report,
};
use symvirt::host_channel::HostChannel;
use symvirt::protocol::Interconnect;
use symvirt::remote::Address;
use symvirt::session::GuestSession;

const PATIENCE: Duration = Duration::from_secs(60);

/// One test at a time: each runs two or three KVM guests on a 2-core machine.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn config() -> VmmConfig {
    VmmConfig {
        mem_size: 32 << 20,
        vcpus: 1,
        working_set_pages: 256,
        ..VmmConfig::default()
    }
}

fn hca(name: &str) -> Device {
    Device::HcaStandin {
        id: "hca0".into(),
        mem_path: PathBuf::from(format!("/dev/shm/unused-{name}")),
        size: 1 << 20,
        properties: Map::new(),
    }
}

fn mac_of(i: usize) -> String {
    format!("52:54:00:00:20:{:02x}", i + 1)
}

fn nic(i: usize) -> Device {
    Device::VirtioNet {
        id: "n0".into(),
        mac: mac_of(i),
        netdev: None,
        properties: Map::new(),
    }
}

fn infiniband() -> Interconnect {
    Interconnect::Infiniband {
        hca: "hca0".into(),
        port: 1,
        pci: None,
    }
}

fn ethernet(i: usize) -> Interconnect {
    Interconnect::Ethernet {
        mac: mac_of(i),
        iface: None,
        pci: None,
    }
}

/// A VM of the plan; the monitor and channel addresses are not used by this backend.
fn spec(name: &str, from: (Vec<Device>, Interconnect), to: (Vec<Device>, Interconnect)) -> VmSpec {
    let unused = Address::Local(Endpoint::Unix(PathBuf::from("in-process")));
    VmSpec {
        name: name.into(),
        source: SourceSpec {
            qmp: unused.clone(),
            channel: unused.clone(),
            libvirt: None,
            devices: from.0,
            interconnect: from.1,
        },
        destination: DestinationSpec {
            qmp: unused.clone(),
            channel: unused,
            libvirt: None,
            migrate_uri: format!("tcp:127.0.0.1:{}", free_tcp_port()),
            launch: None,
            devices: to.0,
            interconnect: to.1,
        },
    }
}

/// Which way [`two_vms`] moves the cluster.
enum Direction {
    /// From the HCA stand-in to a NIC.
    ToEthernet,
    /// Back.
    ToHca,
}

/// The plan's VMs `vm0` and `vm1`, moving between the HCA stand-in and a NIC.
fn two_vms(direction: Direction) -> Vec<VmSpec> {
    (0..2)
        .map(|i| {
            let hca_side = (vec![hca(&format!("vm{i}"))], infiniband());
            let nic_side = (vec![nic(i)], ethernet(i));
            let name = format!("vm{i}");
            match direction {
                Direction::ToEthernet => spec(&name, hca_side, nic_side),
                Direction::ToHca => spec(&name, nic_side, hca_side),
            }
        })
        .collect()
}

fn run(vms: Vec<VmSpec>, homes: &[GuestHome], destination: VmmConfig) -> (Report, Vec<Event>) {
    run_with(vms, homes, destination, |_, b| b, None)
}

/// The plan of `vms`: 2 VMs at once, 120 s to migrate.
fn plan_of(vms: Vec<VmSpec>) -> Plan {
    Plan {
        vms,
        deadlines: Deadlines {
            migrate: Duration::from_secs(120),
            ..Deadlines::default()
        },
        migration: MigrationSettings {
            max_parallel: 2,
            ..MigrationSettings::default()
        },
        ssh_program: "ssh".into(),
        tls: None,
    }
}

/// A backend per VM of `vms`, living in `homes`, its destination built with `destination`.
fn backends_of(
    vms: Vec<VmSpec>,
    homes: &[GuestHome],
    destination: VmmConfig,
) -> Vec<Box<dyn VmBackend>> {
    vms.into_iter()
        .zip(homes)
        .map(|(spec, home)| {
            Box::new(ReferenceBackend::new(
                spec,
                home.clone(),
                destination.clone(),
                MigrationConfig::default(),
            )) as Box<dyn VmBackend>
        })
        .collect()
}

/// [`run`], with each VM's backend passed through `wrap` (to inject a fault), cancelled from
/// the library as `cancel_at` starts.
fn run_with(
    vms: Vec<VmSpec>,
    homes: &[GuestHome],
    destination: VmmConfig,
    wrap: impl Fn(usize, Box<dyn VmBackend>) -> Box<dyn VmBackend>,
    cancel_at: Option<Phase>,
) -> (Report, Vec<Event>) {
    let plan = plan_of(vms.clone());
    let backends: Vec<Box<dyn VmBackend>> = backends_of(vms, homes, destination)
        .into_iter()
        .enumerate()
        .map(|(i, b)| wrap(i, b))
        .collect();
    let events = Mutex::new(Vec::new());
    let cancel = AtomicBool::new(false);
    let sink = |e: &Event| {
        if matches!(e, Event::PhaseStarted { phase } if Some(*phase) == cancel_at) {
            cancel.store(true, Ordering::SeqCst);
        }
        events.lock().unwrap().push(e.clone());
    };
    let report = Controller::new(plan, &sink)
        .interruptible(&cancel)
        .run(backends)
        .unwrap();
    (report, events.into_inner().unwrap())
}

fn vm_of(home: &GuestHome) -> Arc<ReferenceVm> {
    home.lock().unwrap().vm().clone()
}

fn counter(vm: &ReferenceVm) -> u64 {
    vm.status(0).unwrap().counter
}

/// Waits until the guest completes passes beyond `than` (it runs), then checks its memory.
fn runs_on_intact(vm: &ReferenceVm, than: u64, what: &str) {
    let started = Instant::now();
    while counter(vm) <= than + 2 {
        assert!(
            started.elapsed() < PATIENCE,
            "{what}: the guest stopped at {} passes ({:?})",
            counter(vm),
            vm.failure()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    vm.pause().unwrap();
    let block = vm.check_working_set(0).unwrap();
    assert_eq!(block.errors, 0, "{what}: the guest found stale pages");
    assert!(block.checksum_consistent(), "{what}: {block:?}");
    assert_eq!(block.waiting, 0, "{what}: still parked at its pause point");
    vm.resume().unwrap();
}

fn start_sources() -> Vec<GuestHome> {
    ["vm0", "vm1"]
        .iter()
        .map(|name| {
            let guest = ReferenceGuest::start(name, config()).unwrap();
            guest.plug(&hca(name), 0).unwrap();
            Arc::new(Mutex::new(guest))
        })
        .collect()
}

#[test]
fn two_reference_vms_move_from_hca_standin_to_ethernet_and_back() {
    if !kvm_or_skip("two_reference_vms_move_from_hca_standin_to_ethernet_and_back") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let homes = start_sources();

    // With the stand-in plugged, the engine refuses a plain migration, as with a VFIO HCA.
    {
        let vm = vm_of(&homes[0]);
        let cfg = MigrationConfig::default();
        let (src, dst) = transport::in_process(1).unwrap();
        let receiver = std::thread::spawn({
            let cfg = cfg.clone();
            move || destination::receive(dst, &cfg, |_| ReferenceVm::new_incoming(config()))
        });
        let err = source::migrate(&*vm, src, &cfg, None).unwrap_err();
        assert!(format!("{err:?}").contains("stand-in"), "{err:?}");
        assert!(receiver.join().unwrap().is_err());
        assert!(!vm.is_paused(), "the refused source runs on");
    }

    // Forward: HCA stand-in -> Ethernet.
    let sources: Vec<Arc<ReferenceVm>> = homes.iter().map(vm_of).collect();
    let vms = two_vms(Direction::ToEthernet);
    let (report, events) = run(vms, &homes, config());
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
        assert!(events.contains(&Event::PhaseStarted { phase }));
    }
    for (i, home) in homes.iter().enumerate() {
        let r = &report.vms[i];
        match &r.guest {
            GuestNotice::Resumed { interconnect, .. } => assert_eq!(interconnect, &ethernet(i)),
            other => panic!("{}: {other:?}", r.name),
        }
        assert!(r.transferred > 0 && r.migration_ms.is_some());
        let vm = vm_of(home);
        assert!(!Arc::ptr_eq(&vm, &sources[i]), "vm{i} did not move");
        assert!(sources[i].is_paused(), "vm{i}: the source still runs");
        let guest = home.lock().unwrap();
        assert!(guest.has_device("n0") && !guest.has_device("hca0"));
        drop(guest);
        // It continues from where the source stopped, with every page intact.
        runs_on_intact(&vm, counter(&sources[i]), &format!("vm{i} forward"));
    }
    drop(sources);

    // Back: Ethernet -> HCA stand-in.
    let moved: Vec<Arc<ReferenceVm>> = homes.iter().map(vm_of).collect();
    let vms = two_vms(Direction::ToHca);
    let (report, _) = run(vms, &homes, config());
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.errors);
    for (i, home) in homes.iter().enumerate() {
        match &report.vms[i].guest {
            GuestNotice::Resumed { interconnect, .. } => assert_eq!(interconnect, &infiniband()),
            other => panic!("vm{i}: {other:?}"),
        }
        let vm = vm_of(home);
        assert!(!Arc::ptr_eq(&vm, &moved[i]));
        assert!(home.lock().unwrap().has_device("hca0"));
        runs_on_intact(&vm, counter(&moved[i]), &format!("vm{i} back"));
    }
}

#[test]
fn a_destination_that_refuses_the_vm_rolls_the_plan_back() {
    if !kvm_or_skip("a_destination_that_refuses_the_vm_rolls_the_plan_back") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let homes = start_sources();
    let sources: Vec<Arc<ReferenceVm>> = homes.iter().map(vm_of).collect();
    let vms = two_vms(Direction::ToEthernet);
    // The destinations are built for another memory size: they refuse at the handshake.
    let other = VmmConfig {
        mem_size: 64 << 20,
        ..config()
    };
    let (report, events) = run(vms, &homes, other);
    match &report.outcome {
        Outcome::RolledBack { phase, error } => {
            assert_eq!(*phase, Phase::Migrate);
            assert!(error.message().contains("differ"), "{error}");
            assert_eq!(error.kind, symvirt::error::ErrorKind::Vmm, "{error}");
        }
        other => panic!("{other:?}: {:?}", report.errors),
    }
    assert!(
        events
            .iter()
            .any(|e| matches!(e, Event::RollbackFinished { ok: true, .. }))
    );
    assert_back_at_sources(&report, &homes, &sources);
}

#[test]
fn a_plan_cancelled_from_the_library_rolls_back() {
    if !kvm_or_skip("a_plan_cancelled_from_the_library_rolls_back") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let homes = start_sources();
    let sources: Vec<Arc<ReferenceVm>> = homes.iter().map(vm_of).collect();
    let vms = two_vms(Direction::ToEthernet);
    // Cancelled while the devices are detached: the run stops before migrating.
    let (report, events) = run_with(vms, &homes, config(), |_, b| b, Some(Phase::Detach));
    match &report.outcome {
        Outcome::RolledBack { phase, error } => {
            assert_eq!(*phase, Phase::Migrate, "{error}");
            assert_eq!(error.kind, symvirt::error::ErrorKind::Cancelled, "{error}");
            assert_eq!(error.vm, None, "the run was cancelled, not a VM: {error}");
        }
        other => panic!("{other:?}: {:?}", report.errors),
    }
    assert!(
        !events.iter().any(|e| matches!(
            e,
            Event::PhaseStarted {
                phase: Phase::Migrate
            }
        )),
        "migrated after the cancel: {events:?}"
    );
    assert!(report.vms.iter().all(|v| v.transferred == 0));
    assert_back_at_sources(&report, &homes, &sources);
}

/// Every VM runs where it was, from where it stopped, with its stand-in plugged again (and
/// not the destination's NIC), and its guest was told to go on over the interconnect it had.
fn assert_back_at_sources(report: &Report, homes: &[GuestHome], sources: &[Arc<ReferenceVm>]) {
    for (i, home) in homes.iter().enumerate() {
        match &report.vms[i].guest {
            GuestNotice::Resumed { interconnect, .. } => assert_eq!(interconnect, &infiniband()),
            other => panic!("vm{i}: {other:?}"),
        }
        let vm = vm_of(home);
        assert!(Arc::ptr_eq(&vm, &sources[i]), "vm{i} moved");
        assert!(home.lock().unwrap().has_device("hca0"));
        assert!(!home.lock().unwrap().has_device("net0"));
        let now = counter(&vm);
        runs_on_intact(&vm, now, &format!("vm{i} after rollback"));
    }
}

/// A backend whose destination is lost right after the switchover: its guest channel there
/// cannot be opened (as when the destination host goes down). Everything else is the real one.
struct DestinationLostAfterSwitchover(Box<dyn VmBackend>);

impl VmBackend for DestinationLostAfterSwitchover {
    fn name(&self) -> &str {
        self.0.name()
    }
    fn connect(
        &mut self,
        continuing: Option<GuestSession>,
        deadline: Instant,
    ) -> symvirt::Result<HostChannel> {
        self.0.connect(continuing, deadline)
    }
    fn reserve(&mut self, deadline: Instant) -> symvirt::Result<()> {
        self.0.reserve(deadline)
    }
    fn detach(&mut self, deadline: Instant) -> symvirt::Result<()> {
        self.0.detach(deadline)
    }
    fn start_migration(&mut self) -> symvirt::Result<()> {
        self.0.start_migration()
    }
    fn wait_ready_to_switch(
        &mut self,
        deadline: Instant,
        progress: &mut dyn FnMut(MigrationProgress),
        stop: &dyn Fn() -> bool,
    ) -> symvirt::Result<()> {
        self.0.wait_ready_to_switch(deadline, progress, stop)
    }
    fn switchover(&mut self, deadline: Instant) -> symvirt::Result<MigrationResult> {
        self.0.switchover(deadline)
    }
    fn attach(&mut self, deadline: Instant) -> symvirt::Result<()> {
        self.0.attach(deadline)
    }
    fn destination_channel(
        &mut self,
        _session: GuestSession,
        _deadline: Instant,
    ) -> symvirt::Result<HostChannel> {
        Err(symvirt::Error::Refused(
            "injected: the destination host is gone".into(),
        ))
    }
    fn commit(&mut self) -> symvirt::Result<()> {
        self.0.commit()
    }
    fn rollback(&mut self, deadline: Instant) -> symvirt::Result<()> {
        self.0.rollback(deadline)
    }
}

#[test]
fn a_destination_lost_after_the_switchover_rolls_every_vm_back_to_its_source() {
    if !kvm_or_skip("a_destination_lost_after_the_switchover_rolls_every_vm_back_to_its_source") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let homes = start_sources();
    let sources: Vec<Arc<ReferenceVm>> = homes.iter().map(vm_of).collect();
    let vms = two_vms(Direction::ToEthernet);
    let lose_vm1 = |i, b| {
        if i == 1 {
            Box::new(DestinationLostAfterSwitchover(b)) as Box<dyn VmBackend>
        } else {
            b
        }
    };
    let (report, events) = run_with(vms, &homes, config(), lose_vm1, None);
    match &report.outcome {
        Outcome::RolledBack { phase, error } => {
            assert_eq!(*phase, Phase::Resume);
            assert!(
                error.message().contains("destination host is gone"),
                "{error}"
            );
        }
        other => panic!("{other:?}: {:?}", report.errors),
    }
    // Both migrated; vm0's guest resumed at its destination before vm1's failure was known.
    assert!(report.vms.iter().all(|v| v.transferred > 0));
    let resumed_at = |vm: &str, at: &str| {
        events
            .iter()
            .any(|e| matches!(e, Event::GuestResumed { vm: v, at: a, .. } if v == vm && a == at))
    };
    assert!(resumed_at("vm0", "destination"), "{events:?}");
    for i in 0..homes.len() {
        assert!(resumed_at(&format!("vm{i}"), "source"), "{events:?}");
    }
    // Back where they were, from the cut their sources held.
    assert_back_at_sources(&report, &homes, &sources);
}

/// A checkpoint of both reference VMs while their job goes on (`migrate-core`'s snapshot
/// files), then the sources lost, and the cluster restored from the files onto Ethernet: each
/// guest continues from the cut (not from where its lost source had got to), with every page
/// of its working set intact and its new NIC plugged.
#[test]
fn two_reference_vms_are_checkpointed_and_restored_on_ethernet_from_the_cut() {
    if !kvm_or_skip("two_reference_vms_are_checkpointed_and_restored_on_ethernet_from_the_cut") {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let homes = start_sources();
    let sources: Vec<Arc<ReferenceVm>> = homes.iter().map(vm_of).collect();
    let dir = std::env::temp_dir().join(format!("symvirt-ref-ckpt-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ckpt = dir.join("ckpt");
    let sink = |_: &Event| {};

    for vm in &sources {
        runs_on_intact(vm, 3, "at its source");
    }
    let before_cut: Vec<u64> = sources.iter().map(|vm| counter(vm)).collect();
    let vms = two_vms(Direction::ToEthernet);
    let report = Controller::new(plan_of(vms.clone()), &sink)
        .checkpoint(
            backends_of(vms.clone(), &homes, config()),
            "",
            &ckpt,
            AfterCheckpoint::Continue,
        )
        .unwrap();
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.errors);
    let after_cut: Vec<u64> = sources.iter().map(|vm| counter(vm)).collect();
    let manifest = symvirt::checkpoint::read(&ckpt).unwrap();
    for (i, saved) in manifest.vms.iter().enumerate() {
        assert_eq!(saved.format.writer, "ninja-snapshot", "{saved:?}");
        // Sparse: the guest's 32 MiB are mostly zero pages.
        assert!(saved.bytes > 32 << 20, "{saved:?}");
        assert_eq!(report.vms[i].transferred, saved.bytes);
        // The job went on at the source, with its HCA stand-in.
        assert!(homes[i].lock().unwrap().has_device("hca0"));
        runs_on_intact(&sources[i], after_cut[i], &format!("vm{i} at its source"));
    }

    // The hosts die some seconds later: the sources stop where they had got to.
    std::thread::sleep(Duration::from_secs(3));
    let at_death: Vec<u64> = sources
        .iter()
        .map(|vm| {
            vm.pause().unwrap();
            counter(vm)
        })
        .collect();

    let report = Controller::new(plan_of(vms.clone()), &sink)
        .restore(backends_of(vms, &homes, config()), &ckpt)
        .unwrap();
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.errors);
    for (i, home) in homes.iter().enumerate() {
        match &report.vms[i].guest {
            GuestNotice::Resumed { interconnect, .. } => assert_eq!(interconnect, &ethernet(i)),
            other => panic!("vm{i}: {other:?}"),
        }
        let vm = vm_of(home);
        assert!(!Arc::ptr_eq(&vm, &sources[i]), "vm{i} was not restored");
        let from = counter(&vm);
        eprintln!(
            "vm{i}: passes {} before the cut, {} after it, {} at the death, {from} restored",
            before_cut[i], after_cut[i], at_death[i]
        );
        assert!(
            (before_cut[i]..at_death[i]).contains(&from),
            "vm{i} restored at pass {from}: not from the cut"
        );
        let guest = home.lock().unwrap();
        assert!(guest.has_device("n0") && !guest.has_device("hca0"));
        drop(guest);
        runs_on_intact(&vm, from, &format!("vm{i} restored"));
    }
    let _ = std::fs::remove_dir_all(&dir);
}
