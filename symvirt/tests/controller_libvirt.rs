//! The controller through libvirt (feature `libvirt`): two private libvirt daemons stand for two
//! hosts ([`ninja_testkit::libvirt`]), each VM is a TCG domain of the first one running the
//! dirtier and the SymVirt agent, with the passthrough HCA STAND-IN (`<shmem>` ivshmem-plain,
//! aliased `ua-hca0`) that keeps libvirt from migrating it. Plans name the daemons' URIs and
//! the domains; the guest channel is opened through libvirt.
//!
//! Tests in this file run one at a time (each has up to two daemons and four QEMUs).

#[path = "common/guest.rs"]
mod guest;
#[path = "common/plans.rs"]
mod plans;

use guest::*;
use ninja_testkit::libvirt::{LibvirtHost, libvirt_or_skip};
use ninja_testkit::{Fixtures, QemuConfig, free_tcp_port, qemu_or_skip};
use plans::*;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use symvirt::backend::VmBackend;
use symvirt::backend::libvirt::LibvirtVm;
use symvirt::controller::{Event, GuestNotice, Outcome, Phase};
use symvirt::error::ErrorKind;
use symvirt::protocol::Interconnect;

const MEMORY_MIB: u32 = 128;
const HCA_SIZE: u64 = 1 << 20;
/// The definition moves with the domain.
const PERSIST: &str = "persistent = true\nundefine_source = true\n";

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Two hosts, and the VMs' files.
struct Rig {
    fixtures: Fixtures,
    dir: PathBuf,
    tag: String,
    a: LibvirtHost,
    b: LibvirtHost,
}

impl Drop for Rig {
    fn drop(&mut self) {
        for vm in ["vm0", "vm1"] {
            let _ = std::fs::remove_file(self.hca_mem(vm));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn rig(test: &str) -> Option<Rig> {
    let fixtures = qemu_or_skip(test)?;
    if !libvirt_or_skip(test) {
        return None;
    }
    let tag = format!("{}-{test:.12}", std::process::id());
    let dir = std::env::temp_dir().join(format!("symvirt-ctl-lv-{tag}"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    Some(Rig {
        fixtures,
        dir,
        a: LibvirtHost::start("a").expect("libvirtd for host a"),
        b: LibvirtHost::start("b").expect("libvirtd for host b"),
        tag,
    })
}

fn agent_command(vm: &str, ranks: u32) -> String {
    format!(
        "/bin/sh -c /bin/ninja-guest-dirtier${{IFS}}4&/bin/symvirt-agent${{IFS}}--ranks${{IFS}}{ranks}${{IFS}}--vm${{IFS}}{vm}${{IFS}}--report-pci"
    )
}

fn mac_of(i: usize) -> String {
    format!("52:54:00:00:31:{:02x}", i + 1)
}

impl Rig {
    fn hca_mem(&self, vm: &str) -> PathBuf {
        PathBuf::from(format!("/dev/shm/ninja-lv-{}-{vm}", self.tag))
    }

    fn serial(&self, vm: &str) -> PathBuf {
        self.dir.join(format!("{vm}-serial.log"))
    }

    /// Starts `vm` as a transient domain of host a with its stand-in HCA (and `extra` device
    /// XML), and waits for its agent.
    fn start(&self, vm: &str, ranks: u32, extra: &str) {
        self.start_as(vm, ranks, extra, false);
    }

    /// [`Rig::start`], as a persistent (defined) domain when `persistent`.
    fn start_as(&self, vm: &str, ranks: u32, extra: &str, persistent: bool) {
        let hca = format!(
            "<shmem name='{}'><model type='ivshmem-plain'/><size unit='bytes'>{HCA_SIZE}</size>\
             <alias name='ua-hca0'/></shmem>{extra}",
            self.hca_mem(vm).file_name().unwrap().to_str().unwrap()
        );
        let xml = QemuConfig::new(&self.fixtures)
            .memory_mib(MEMORY_MIB)
            .guest_run(&agent_command(vm, ranks))
            .libvirt_domain_xml(vm, &self.serial(vm), &hca);
        if persistent {
            self.a
                .define_and_start(&xml, vm)
                .expect("define and start the domain");
        } else {
            self.a.create(&xml).expect("create the domain");
        }
        let started = Instant::now();
        while !read(&self.serial(vm)).contains("symvirt-agent") {
            assert!(
                started.elapsed() < PATIENCE,
                "{vm}: no agent: {}",
                read(&self.serial(vm))
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// vm0 and vm1 moving from a (their stand-in HCA) to b (a NIC, with `netdev(i)` for vm
    /// `i`), with destination settings `flags`.
    fn to_ethernet<'a>(
        &'a self,
        flags: &'a str,
        netdev: impl Fn(usize) -> &'a str,
    ) -> Vec<VmPlan<'a>> {
        ["vm0", "vm1"]
            .into_iter()
            .enumerate()
            .map(|(i, name)| VmPlan {
                name,
                from: &self.a,
                to: &self.b,
                source: (hca_toml("source", &self.hca_mem(name)), ib().into()),
                destination: (
                    nic_toml("destination", &mac_of(i), netdev(i)),
                    eth(&mac_of(i)),
                ),
                flags,
            })
            .collect()
    }

    fn passes(&self, vm: &str) -> usize {
        passes(&read(&self.serial(vm)))
    }

    fn wait_more_passes(&self, vm: &str, before: usize) {
        wait_more_passes(|| read(&self.serial(vm)), before, vm);
    }
}

/// One VM of a plan: its devices and interconnects at each end.
struct VmPlan<'a> {
    name: &'a str,
    from: &'a LibvirtHost,
    to: &'a LibvirtHost,
    source: (String, String),
    destination: (String, String),
    /// More destination settings (`persistent = true`, ...).
    flags: &'a str,
}

fn hca_toml(table: &str, mem: &Path) -> String {
    format!(
        "[[vm.{table}.devices]]\nkind = \"hca-standin\"\nid = \"hca0\"\nmem_path = \"{}\"\nsize = {HCA_SIZE}\n",
        mem.display()
    )
}

fn nic_toml(table: &str, mac: &str, netdev: &str) -> String {
    format!(
        "[[vm.{table}.devices]]\nkind = \"virtio-net\"\nid = \"net0\"\nmac = \"{mac}\"\n{netdev}"
    )
}

fn plan_toml(settings: &str, vms: &[VmPlan]) -> String {
    let mut plan = format!("[settings]\n{settings}\n");
    for vm in vms {
        plan.push_str(&format!(
            "[[vm]]\nname = \"{name}\"\n[vm.source]\nlibvirt = \"{from}\"\n\
             migrate_uri = \"tcp:127.0.0.1:{back}\"\ninterconnect = {sic}\n{sdev}\
             [vm.destination]\nlibvirt = \"{to}\"\nmigrate_uri = \"tcp:127.0.0.1:{port}\"\n\
             {flags}interconnect = {dic}\n{ddev}",
            name = vm.name,
            from = vm.from.uri(),
            to = vm.to.uri(),
            back = free_tcp_port(),
            port = free_tcp_port(),
            sic = vm.source.1,
            sdev = vm.source.0,
            dic = vm.destination.1,
            ddev = vm.destination.0,
            flags = vm.flags,
        ));
    }
    plan
}

fn resumed_at(events: &[Event], vm: &str, at: &str) -> Option<Vec<symvirt::protocol::PciDevice>> {
    events.iter().find_map(|e| match e {
        Event::GuestResumed {
            vm: v,
            at: a,
            pci_devices,
            ..
        } if v == vm && a == at => Some(pci_devices.clone().unwrap_or_default()),
        _ => None,
    })
}

/// The PCI devices the guest of the plan's `i`th VM reports through a channel opened through
/// libvirt at the VM's source, once `done` holds (see [`guest_pci_until_on`]).
fn guest_pci(
    rig: &Rig,
    plan: &str,
    i: usize,
    epoch: u64,
    interconnect: Interconnect,
    done: impl Fn(&[symvirt::protocol::PciDevice]) -> bool,
) -> Vec<symvirt::protocol::PciDevice> {
    let plan = symvirt::plan::parse(plan).unwrap();
    let spec = plan.vms[i].clone();
    let name = spec.name.clone();
    let mut vm = LibvirtVm::new(spec, plan.migration).unwrap();
    let chan = vm.connect(None, Instant::now() + PATIENCE).unwrap();
    guest_pci_until_on(&chan, &rig.serial(&name), &name, epoch, interconnect, done)
}

/// Whether the domain's live XML at `host` has a device aliased `alias`. A daemon that cannot
/// give the XML (three tries, half a second apart) fails the test with its error and log:
/// that is no answer, either way.
fn has_device(host: &LibvirtHost, vm: &str, alias: &str) -> bool {
    let mut error = None;
    for _ in 0..3 {
        match host.dumpxml(vm) {
            Ok(xml) => return xml.contains(&format!("<alias name='{alias}'/>")),
            Err(e) => error = Some(e),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    panic!(
        "{vm}: no live XML to look for {alias}: {error:?}\n{}",
        host.log()
    );
}

#[test]
fn two_domains_move_from_the_hca_standin_to_ethernet_and_back_through_libvirt() {
    let test = "two_domains_move_through_libvirt";
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(rig) = rig(test) else { return };
    // Defined domains: their definitions move with them.
    for vm in ["vm0", "vm1"] {
        rig.start_as(vm, 0, "", true);
    }
    // With the stand-in attached, libvirt refuses to migrate the domain, as with a VFIO HCA.
    let refused = rig.a.virsh(&[
        "migrate",
        "vm0",
        rig.b.uri(),
        "--p2p",
        "--live",
        "--migrateuri",
        &format!("tcp://127.0.0.1:{}", free_tcp_port()),
    ]);
    let refused = refused.unwrap();
    assert!(
        !refused.status.success(),
        "libvirt migrated vm0 with its HCA"
    );
    assert!(rig.a.domain_state("vm0").as_deref() == Some("running"));

    let before: Vec<usize> = ["vm0", "vm1"].iter().map(|v| rig.passes(v)).collect();
    let forward = rig.to_ethernet(PERSIST, |_| "");
    // And back, later: the NIC unplugged at b, the stand-in plugged at a.
    let back: Vec<VmPlan> = ["vm0", "vm1"]
        .iter()
        .enumerate()
        .map(|(i, name)| VmPlan {
            name,
            from: &rig.b,
            to: &rig.a,
            source: (nic_toml("source", &mac_of(i), ""), eth(&mac_of(i))),
            destination: (hca_toml("destination", &rig.hca_mem(name)), ib().into()),
            flags: PERSIST,
        })
        .collect();
    let (forward, back) = (
        plan_toml("max_parallel = 2", &forward),
        plan_toml("", &back),
    );
    let (report, events) = run(&forward, &rig.dir, |_| {});
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.errors);
    for phase in [
        Phase::Quiesce,
        Phase::Detach,
        Phase::Migrate,
        Phase::Attach,
        Phase::Resume,
    ] {
        assert!(
            events.iter().any(
                |e| matches!(e, Event::PhaseFinished { phase: p, ok: true, .. } if *p == phase)
            ),
            "no successful {phase:?}: {events:?}"
        );
    }
    // Progress came from libvirt's job statistics, in the same event stream.
    assert!(
        events.iter().any(|e| matches!(
            e,
            Event::VmProgress {
                phase: Phase::Migrate,
                ..
            }
        )),
        "{events:?}"
    );
    for (i, vm) in ["vm0", "vm1"].iter().enumerate() {
        assert_resumed_on_mac(&report.vms[i], &mac_of(i));
        assert!(report.vms[i].transferred > 0, "{:?}", report.vms[i]);
        // The guest, through its agent at the destination, has no HCA any more.
        let devices = resumed_at(&events, vm, "destination").expect("resumed at the destination");
        assert!(!has(&devices, IVSHMEM_DEVICE), "{vm}: {devices:?}");
        // The domain runs at b with the NIC, and is gone from a.
        assert_eq!(rig.b.domain_state(vm).as_deref(), Some("running"));
        assert_eq!(rig.a.domain_state(vm), None, "{vm} still at a");
        assert!(has_device(&rig.b, vm, "ua-net0"), "{vm}: no NIC at b");
        assert!(!has_device(&rig.b, vm, "ua-hca0"), "{vm}: HCA went along");
        // Its definition moved too, with the NIC and without the HCA.
        assert!(rig.b.is_defined(vm) && !rig.a.is_defined(vm), "{vm}");
        let defined = rig.b.virsh_ok(&["dumpxml", "--inactive", vm]).unwrap();
        assert!(defined.contains("<alias name='ua-net0'/>"), "{defined}");
        assert!(!defined.contains("ua-hca0"), "{defined}");
        let serial = read(&rig.serial(vm));
        assert!(
            serial.contains(&format!(
                "symvirt-agent: sent resumed{{epoch={}}}",
                report.epoch
            )),
            "{vm}: {serial}"
        );
        rig.wait_more_passes(vm, before[i].max(rig.passes(vm)));
        assert!(!read(&rig.serial(vm)).contains("MISMATCH"), "{vm}");
        // The guest sees its NIC (reached through b, where it runs now).
        let nic = Interconnect::Ethernet {
            mac: mac_of(i),
            iface: None,
            pci: None,
        };
        let devices = guest_pci(&rig, &back, i, report.epoch, nic, has_nic);
        assert!(
            has_nic(&devices) && !has(&devices, IVSHMEM_DEVICE),
            "{vm}: {devices:?}"
        );
    }

    let (report, events) = run(&back, &rig.dir, |_| {});
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.errors);
    for (i, vm) in ["vm0", "vm1"].iter().enumerate() {
        match &report.vms[i].guest {
            GuestNotice::Resumed { interconnect, .. } => assert_eq!(interconnect, &infiniband()),
            other => panic!("{vm}: {other:?}"),
        }
        assert!(
            resumed_at(&events, vm, "destination").is_some(),
            "{events:?}"
        );
        assert_eq!(rig.a.domain_state(vm).as_deref(), Some("running"));
        assert_eq!(rig.b.domain_state(vm), None, "{vm} still at b");
        assert!(has_device(&rig.a, vm, "ua-hca0"), "{vm}: no HCA at a");
        assert!(!has_device(&rig.a, vm, "ua-net0"), "{vm}: NIC went along");
        assert!(rig.a.is_defined(vm) && !rig.b.is_defined(vm), "{vm}");
        let defined = rig.a.virsh_ok(&["dumpxml", "--inactive", vm]).unwrap();
        assert!(defined.contains("<alias name='ua-hca0'/>"), "{defined}");
        assert!(!defined.contains("ua-net0"), "{defined}");
        rig.wait_more_passes(vm, rig.passes(vm));
        assert!(!read(&rig.serial(vm)).contains("MISMATCH"), "{vm}");
        let devices = guest_pci(&rig, &forward, i, report.epoch, infiniband(), |d| {
            has(d, IVSHMEM_DEVICE) && !has_nic(d)
        });
        assert!(
            has(&devices, IVSHMEM_DEVICE) && !has_nic(&devices),
            "{vm}: {devices:?}"
        );
    }
}

/// How a rollback test breaks vm1's move.
#[derive(Debug, Clone, Copy)]
enum Break {
    /// vm1's guest never quiesces (its agent waits for an MPI rank that never registers).
    NeverQuiesces,
    /// b cannot plug vm1's NIC (its bridge does not exist there), after both VMs moved.
    DeviceRefused,
    /// b's daemon dies while vm1 migrates.
    DaemonKilledMidMigration,
}

fn rollback_case(test: &str, how: Break, expect_phase: Phase) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(mut rig) = rig(test) else { return };
    let vm1_ranks = u32::from(matches!(how, Break::NeverQuiesces));
    // Defined domains where both move and come back: their definitions come back too.
    let persistent = matches!(how, Break::DeviceRefused);
    rig.start_as("vm0", 0, "", persistent);
    rig.start_as("vm1", vm1_ranks, "", persistent);
    let vms = rig.to_ethernet(if persistent { PERSIST } else { "" }, |i| {
        if i == 1 && matches!(how, Break::DeviceRefused) {
            "netdev = { type = \"bridge\", id = \"n1\", bridge = \"ninja-nobr0\" }\n"
        } else {
            ""
        }
    });
    let settings = match how {
        Break::NeverQuiesces => "[settings.deadlines_ms]\nquiesce = 5000",
        // Slowly (8 MiB/s), so that b's daemon dies under the migrations.
        Break::DaemonKilledMidMigration => "max_bandwidth = 8388608",
        Break::DeviceRefused => "",
    };
    let plan = plan_toml(settings, &vms);
    let killed = Mutex::new(false);
    let (report, events) = {
        let b = Mutex::new(&mut rig.b);

        let dir = rig.dir.clone();
        run(&plan, &dir, |e| {
            if let Event::VmProgress {
                phase: Phase::Migrate,
                ..
            } = e
            {
                if matches!(how, Break::DaemonKilledMidMigration) {
                    let mut k = killed.lock().unwrap();
                    if !*k {
                        b.lock().unwrap().kill_daemon();
                        *k = true;
                    }
                }
            }
        })
    };
    if matches!(how, Break::DaemonKilledMidMigration) {
        assert!(*killed.lock().unwrap(), "b's daemon was never killed");
    }
    match &report.outcome {
        Outcome::RolledBack { phase, error } => {
            assert_eq!(*phase, expect_phase, "{error}");
            // A dead destination daemon fails whichever migration notices first.
            if !matches!(how, Break::DaemonKilledMidMigration) {
                assert_eq!(error.vm.as_deref(), Some("vm1"), "{error}");
            }
            let expect_kind = match how {
                Break::NeverQuiesces => ErrorKind::Timeout,
                Break::DeviceRefused | Break::DaemonKilledMidMigration => ErrorKind::Vmm,
            };
            assert_eq!(error.kind, expect_kind, "{error}");
        }
        other => panic!(
            "expected a rollback from {expect_phase:?}: {other:?} {:?}",
            report.errors
        ),
    }
    // Every domain runs at a again, with its HCA, and its guest goes on.
    for (i, vm) in ["vm0", "vm1"].iter().enumerate() {
        assert_eq!(rig.a.domain_state(vm).as_deref(), Some("running"), "{vm}");
        assert!(
            has_device(&rig.a, vm, "ua-hca0"),
            "{vm}: HCA not re-attached: {:?}\n{}",
            rig.a.dumpxml(vm),
            rig.a.log()
        );
        assert!(
            !has_device(&rig.a, vm, "ua-net0"),
            "{vm}: NIC came back along"
        );
        if matches!(how, Break::DeviceRefused) {
            // Both had moved: both came back from b.
            assert_eq!(rig.b.domain_state(vm), None, "{vm} left at b");
            assert!(rig.a.is_defined(vm) && !rig.b.is_defined(vm), "{vm}");
            let defined = rig.a.virsh_ok(&["dumpxml", "--inactive", vm]).unwrap();
            assert!(defined.contains("<alias name='ua-hca0'/>"), "{defined}");
            assert!(resumed_at(&events, vm, "destination").is_none());
        }
        let never_quiesced = matches!(how, Break::NeverQuiesces) && i == 1;
        if never_quiesced {
            assert_eq!(report.vms[i].guest, GuestNotice::Aborted);
        } else {
            match &report.vms[i].guest {
                GuestNotice::Resumed { interconnect, .. } => {
                    assert_eq!(interconnect, &infiniband(), "{vm}")
                }
                other => panic!("{vm}: guest was not resumed: {other:?}"),
            }
            assert!(resumed_at(&events, vm, "source").is_some(), "{events:?}");
            // The guest sees its HCA again (a hot-plug reaches it in its own time).
            let devices = guest_pci(&rig, &plan, i, report.epoch, infiniband(), |d| {
                has(d, IVSHMEM_DEVICE) && !has_nic(d)
            });
            assert!(
                has(&devices, IVSHMEM_DEVICE),
                "{vm}: guest lost its HCA: {devices:?}"
            );
            assert!(!has_nic(&devices), "{vm}: {devices:?}");
        }
        rig.wait_more_passes(vm, rig.passes(vm));
        assert!(!read(&rig.serial(vm)).contains("MISMATCH"), "{vm}");
    }
}

#[test]
fn rollback_through_libvirt_when_a_guest_never_quiesces() {
    rollback_case("lv_never_quiesces", Break::NeverQuiesces, Phase::Quiesce);
}

#[test]
fn rollback_through_libvirt_when_the_destination_refuses_the_device() {
    rollback_case("lv_device_refused", Break::DeviceRefused, Phase::Attach);
}

#[test]
fn rollback_through_libvirt_when_the_destination_daemon_dies_mid_migration() {
    rollback_case(
        "lv_daemon_killed",
        Break::DaemonKilledMidMigration,
        Phase::Migrate,
    );
}

#[test]
fn a_domain_libvirt_cannot_migrate_is_refused_before_anything_is_detached() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(rig) = rig("lv_refused_before") else {
        return;
    };
    rig.start("vm0", 0, "");
    // vm1 has a second ivshmem region the plan does not detach.
    let extra = format!(
        "<shmem name='ninja-lv-{}-extra'><model type='ivshmem-plain'/>\
         <size unit='bytes'>{HCA_SIZE}</size><alias name='ua-extra0'/></shmem>",
        rig.tag
    );
    rig.start("vm1", 0, &extra);
    let vms = rig.to_ethernet("", |_| "");
    let (report, events) = run(&plan_toml("", &vms), &rig.dir, |_| {});
    match &report.outcome {
        Outcome::RolledBack { phase, error } => {
            assert_eq!(*phase, Phase::Reserve, "{error}");
            assert_eq!(error.vm.as_deref(), Some("vm1"));
            assert_eq!(error.kind, ErrorKind::Refused);
            let text = error.source.chain();
            assert!(text.contains("shmem ua-extra0"), "{text}");
        }
        other => panic!("expected a refusal in reserve: {other:?}"),
    }
    // Nothing was detached anywhere, no guest was asked to quiesce.
    assert!(
        !events.iter().any(|e| matches!(
            e,
            Event::PhaseStarted {
                phase: Phase::Detach | Phase::Quiesce
            }
        )),
        "{events:?}"
    );
    for vm in ["vm0", "vm1"] {
        assert_eq!(rig.a.domain_state(vm).as_deref(), Some("running"));
        assert!(has_device(&rig.a, vm, "ua-hca0"), "{vm}");
        assert_eq!(rig.b.domain_state(vm), None);
        rig.wait_more_passes(vm, rig.passes(vm));
    }
    let _ = std::fs::remove_file(format!("/dev/shm/ninja-lv-{}-extra", rig.tag));
}

#[test]
fn a_standby_nic_is_switched_on_at_the_destination_through_libvirt() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(rig) = rig("lv_standby_nic") else {
        return;
    };
    // The fabric-B NIC is the domain's from boot, its link down until the move.
    let mac = mac_of(0);
    let standby = format!(
        "<interface type='user'><mac address='{mac}'/><model type='virtio'/>\
         <link state='down'/><alias name='ua-fab0'/></interface>"
    );
    rig.start("vm0", 0, &standby);
    let standby_toml = format!(
        "[[vm.destination.devices]]\nkind = \"standby-nic\"\nid = \"fab0\"\nmac = \"{mac}\"\n"
    );
    let vm = VmPlan {
        name: "vm0",
        from: &rig.a,
        to: &rig.b,
        source: (hca_toml("source", &rig.hca_mem("vm0")), ib().into()),
        destination: (standby_toml, eth(&mac)),
        flags: "",
    };
    let (report, _) = run(&plan_toml("", &[vm]), &rig.dir, |_| {});
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.errors);
    // The guest confirmed Ethernet on that NIC, whose link is up at b.
    assert_resumed_on_mac(&report.vms[0], &mac);
    let nic = rig.b.dumpxml("vm0").unwrap();
    assert!(nic.contains("<link state='up'/>"), "{nic}");
    assert!(!has_device(&rig.b, "vm0", "ua-hca0"));
    rig.wait_more_passes("vm0", rig.passes("vm0"));
}
