//! The real thing: a TCG guest booted from the fixtures runs `symvirt-agent` on a virtio-serial
//! port; the host channel talks to it through QEMU's chardev socket. Between `quiesced` and
//! `resume` the test swaps the passthrough HCA stand-in (an `ivshmem-plain` device, not a real
//! HCA) for a virtio-net NIC over QMP, and checks the guest's own PCI report in `resumed`.

use ninja_testkit::{Qemu, QemuConfig, RawQmp, qemu_or_skip};
use serde_json::json;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use symvirt::host_channel::{ChannelOptions, HostChannel, qemu_channel_args};
use symvirt::protocol::{GuestMessage, HostMessage, Interconnect, PciDevice};

const PATIENCE: Duration = Duration::from_secs(90);
const NIC_MAC: &str = "52:54:00:12:34:56";
const VIRTIO_VENDOR: u16 = 0x1af4;
const IVSHMEM_DEVICE: u16 = 0x1110;
const VIRTIO_NET_DEVICES: [u16; 2] = [0x1000, 0x1041];

/// Files this test creates outside QEMU's own directory, removed on drop.
struct Cleanup(Vec<PathBuf>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_dir_all(p).or_else(|_| std::fs::remove_file(p));
        }
    }
}

/// One epoch: prepare, `between` (devices are swapped here), resume, and the guest's report.
fn epoch(
    host: &HostChannel,
    epoch: u64,
    interconnect: Interconnect,
    between: impl FnOnce(),
) -> (Interconnect, Vec<PciDevice>) {
    host.send(&HostMessage::Prepare {
        epoch,
        deadline_ms: 30_000,
    })
    .unwrap();
    let got = host
        .wait_for(
            |m| !matches!(m, GuestMessage::Hello { .. }),
            Instant::now() + PATIENCE,
        )
        .unwrap();
    assert_eq!(got, GuestMessage::Quiesced { epoch });
    between();
    host.send(&HostMessage::Resume {
        epoch,
        interconnect,
    })
    .unwrap();
    match host
        .wait_for(
            |m| !matches!(m, GuestMessage::Hello { .. }),
            Instant::now() + PATIENCE,
        )
        .unwrap()
    {
        GuestMessage::Resumed {
            epoch: e,
            interconnect,
            pci_devices: Some(devices),
        } if e == epoch => (interconnect, devices),
        other => panic!("epoch {epoch}: expected resumed with PCI devices, got {other:?}"),
    }
}

fn has(devices: &[PciDevice], device: u16) -> bool {
    devices
        .iter()
        .any(|d| d.vendor == VIRTIO_VENDOR && d.device == device)
}

#[test]
fn guest_agent_in_qemu_quiesces_and_resumes_over_virtio_serial() {
    let Some(fixtures) =
        qemu_or_skip("guest_agent_in_qemu_quiesces_and_resumes_over_virtio_serial")
    else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("symvirt-qemu-{}", std::process::id()));
    let shm = PathBuf::from(format!("/dev/shm/symvirt-test-{}-hca0", std::process::id()));
    let _cleanup = Cleanup(vec![dir.clone(), shm.clone()]);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("symvirt.sock");
    let config = QemuConfig::new(&fixtures)
        .memory_mib(256)
        .guest_run("/bin/symvirt-agent --ranks 0 --vm vm0 --report-pci")
        .args(qemu_channel_args(&sock));
    let mut vm = Qemu::start(config).unwrap();
    let host = HostChannel::connect(&sock, ChannelOptions::labelled("vm0")).unwrap();
    let info = match host.wait_hello(Instant::now() + PATIENCE) {
        Ok(info) => info,
        Err(e) => panic!("no hello: {e}; serial:\n{}", vm.serial()),
    };
    assert_eq!(
        (info.vm.as_str(), info.ranks, info.protocol),
        ("vm0", 0, symvirt::protocol::PROTOCOL_VERSION)
    );
    let booted_at = Instant::now();

    // The scheduler assigns the guest its "HCA" (the stand-in), as it would a VF.
    let mut qmp = RawQmp::connect(vm.qmp_path()).unwrap();
    qmp.execute(
        "object-add",
        json!({"qom-type": "memory-backend-file", "id": "hca0-mem", "size": 1 << 20,
               "mem-path": shm.to_str().unwrap(), "share": true}),
    )
    .unwrap();
    qmp.execute(
        "device_add",
        json!({"driver": "ivshmem-plain", "id": "hca0", "memdev": "hca0-mem"}),
    )
    .unwrap();
    let hca = Interconnect::Infiniband {
        hca: "hca0".into(),
        port: 1,
        pci: None,
    };
    // Hot-plug reaches the guest asynchronously; epochs are cheap, so repeat until it shows.
    let mut n = 0;
    let devices = loop {
        n += 1;
        let (_, devices) = epoch(&host, n, hca.clone(), || {});
        if has(&devices, IVSHMEM_DEVICE) || booted_at.elapsed() > PATIENCE {
            break devices;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        has(&devices, IVSHMEM_DEVICE),
        "stand-in never seen: {devices:?}"
    );

    // Migration-style swap while the guest is quiesced: unplug the stand-in, plug a NIC.
    n += 1;
    let ethernet = Interconnect::Ethernet {
        mac: NIC_MAC.into(),
        iface: None,
        pci: None,
    };
    let (mut told, mut devices) = epoch(&host, n, ethernet.clone(), || {
        qmp.execute("device_del", json!({"id": "hca0"})).unwrap();
        qmp.wait_event("DEVICE_DELETED", PATIENCE).unwrap();
        qmp.execute("object-del", json!({"id": "hca0-mem"}))
            .unwrap();
        qmp.execute(
            "device_add",
            json!({"driver": "virtio-net-pci", "id": "n0", "mac": NIC_MAC}),
        )
        .unwrap();
    });
    // The guest ejected the stand-in before DEVICE_DELETED; the NIC may take a moment longer.
    assert!(
        !has(&devices, IVSHMEM_DEVICE),
        "stand-in still there: {devices:?}"
    );
    let swapped_at = Instant::now();
    while !(VIRTIO_NET_DEVICES.iter().any(|&d| has(&devices, d))
        && matches!(&told, Interconnect::Ethernet { iface: Some(_), .. }))
        && swapped_at.elapsed() < PATIENCE
    {
        std::thread::sleep(Duration::from_millis(200));
        n += 1;
        (told, devices) = epoch(&host, n, ethernet.clone(), || {});
    }
    assert!(
        VIRTIO_NET_DEVICES.iter().any(|&d| has(&devices, d)),
        "virtio-net never seen: {devices:?}"
    );
    assert!(!has(&devices, IVSHMEM_DEVICE));
    let nic = devices
        .iter()
        .find(|d| d.vendor == VIRTIO_VENDOR && VIRTIO_NET_DEVICES.contains(&d.device))
        .unwrap();
    assert_eq!(nic.class >> 8, 0x0200, "an Ethernet controller: {nic:?}");
    // The agent found the guest interface that carries the MAC the host assigned.
    match &told {
        Interconnect::Ethernet { mac, iface, .. } => {
            assert_eq!(mac, NIC_MAC);
            assert!(
                iface.as_deref().is_some_and(|i| i.starts_with("eth")),
                "{told:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    // The virtio-serial controller itself is on the guest's bus (legacy or modern id).
    assert!(
        has(&devices, 0x1003) || has(&devices, 0x1043),
        "{devices:?}"
    );
    assert_eq!(host.stats().rejected_total(), 0);

    // The agent logs after it writes, and the console trails the channel: wait for the lines.
    for needle in [
        "symvirt-agent: host connected".to_owned(),
        "symvirt-agent: sent quiesced{epoch=1}".to_owned(),
        format!("symvirt-agent: sent resumed{{epoch={n}}}"),
    ] {
        vm.wait_serial(&needle, PATIENCE).unwrap();
    }
    eprintln!("qemu agent: {n} epochs; guest PCI after swap: {devices:?}; interconnect {told:?}");
    vm.kill();
}

#[test]
fn guest_agent_finds_a_hot_plugged_port_by_name() {
    let Some(fixtures) = qemu_or_skip("guest_agent_finds_a_hot_plugged_port_by_name") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("symvirt-qemu-hot-{}", std::process::id()));
    let _cleanup = Cleanup(vec![dir.clone()]);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("hot.sock");
    // The port does not exist at boot, so the init makes no /dev/virtio-ports link for it.
    let config = QemuConfig::new(&fixtures)
        .memory_mib(128)
        .guest_run("/bin/symvirt-agent --channel virtio:org.symvirt.hot --vm hot0")
        .args(["-device", "virtio-serial,id=vs0"]);
    let mut vm = Qemu::start(config).unwrap();
    vm.wait_serial("symvirt-agent: host channel not available yet", PATIENCE)
        .unwrap();
    let mut qmp = RawQmp::connect(vm.qmp_path()).unwrap();
    qmp.execute(
        "chardev-add",
        json!({"id": "svh", "backend": {"type": "socket", "data": {
            "addr": {"type": "unix", "data": {"path": sock.to_str().unwrap()}},
            "server": true, "wait": false}}}),
    )
    .unwrap();
    qmp.execute(
        "device_add",
        json!({"driver": "virtserialport", "bus": "vs0.0", "chardev": "svh",
               "name": "org.symvirt.hot", "id": "hotport"}),
    )
    .unwrap();
    let host = HostChannel::connect(&sock, ChannelOptions::labelled("hot0")).unwrap();
    let info = match host.wait_hello(Instant::now() + PATIENCE) {
        Ok(info) => info,
        Err(e) => panic!("no hello: {e}; serial:\n{}", vm.serial()),
    };
    assert_eq!(info.vm, "hot0");
    host.send(&HostMessage::Prepare {
        epoch: 1,
        deadline_ms: 30_000,
    })
    .unwrap();
    let got = host
        .wait_for(
            |m| !matches!(m, GuestMessage::Hello { .. }),
            Instant::now() + PATIENCE,
        )
        .unwrap();
    assert_eq!(got, GuestMessage::Quiesced { epoch: 1 });
    // Found by scanning /sys/class/virtio-ports: the device node, not a link.
    let log = vm
        .wait_serial("symvirt-agent: opened host channel", PATIENCE)
        .unwrap();
    assert!(
        log.contains("symvirt-agent: opened host channel /dev/vport"),
        "{log}"
    );
    vm.kill();
}

/// A host end that closes and reopens faster than the agent polls its virtio-serial port
/// (~100 ms) leaves no trace in the guest; the host's `hello` on every connection still gets
/// the agent's answer. Each reopen here follows the close at once.
#[test]
fn a_host_channel_reopened_within_the_agents_poll_still_gets_hello() {
    let Some(fixtures) =
        qemu_or_skip("a_host_channel_reopened_within_the_agents_poll_still_gets_hello")
    else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("symvirt-reopen-{}", std::process::id()));
    let _cleanup = Cleanup(vec![dir.clone()]);
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("symvirt.sock");
    let config = QemuConfig::new(&fixtures)
        .memory_mib(128)
        .guest_run("/bin/symvirt-agent --ranks 0 --vm vm0")
        .args(qemu_channel_args(&sock))
        // The NIC each epoch resumes on (the agent waits until the guest sees it).
        .args([
            "-device".to_owned(),
            format!("virtio-net-pci,mac={NIC_MAC}"),
        ]);
    let vm = Qemu::start(config).unwrap();
    let mut host = HostChannel::connect(&sock, ChannelOptions::labelled("vm0")).unwrap();
    if let Err(e) = host.wait_hello(Instant::now() + PATIENCE) {
        panic!("no first hello: {e}; serial:\n{}", vm.serial());
    }
    for round in 1..=8u64 {
        let closed = Instant::now();
        drop(host);
        host = HostChannel::connect(&sock, ChannelOptions::labelled("vm0")).unwrap();
        let reopened_in = closed.elapsed();
        let info = match host.wait_hello(Instant::now() + PATIENCE) {
            Ok(info) => info,
            Err(e) => panic!(
                "round {round}: no hello after a reopen in {reopened_in:?}: {e}; serial:\n{}",
                vm.serial()
            ),
        };
        assert_eq!(info.vm, "vm0");
        // The channel works, not just the greeting: a whole epoch through it.
        let (told, _) = epoch_without_pci(&host, round);
        assert!(
            matches!(&told, Interconnect::Ethernet { iface: Some(_), .. }),
            "{told:?}"
        );
        // Nothing the agent said was refused, except possibly a repeated hello: an answer to
        // the previous connection's request, written as this one opened, arrives here besides
        // this connection's own (a race of the guest's boot with the first reopen). It is
        // refused during an epoch and changes nothing.
        let rejections = host.recent_rejections();
        assert!(
            rejections
                .iter()
                .all(|r| r.detail.starts_with("second hello on one connection")),
            "round {round}: {rejections:?}"
        );
        assert_eq!(
            host.stats().rejected_total(),
            rejections.len() as u64,
            "round {round}"
        );
    }
}

/// One epoch on Ethernet; for agents started without `--report-pci`.
fn epoch_without_pci(host: &HostChannel, epoch: u64) -> (Interconnect, Option<Vec<PciDevice>>) {
    host.send(&HostMessage::Prepare {
        epoch,
        deadline_ms: 30_000,
    })
    .unwrap();
    let got = host
        .wait_for(
            |m| !matches!(m, GuestMessage::Hello { .. }),
            Instant::now() + PATIENCE,
        )
        .unwrap();
    assert_eq!(got, GuestMessage::Quiesced { epoch });
    host.send(&HostMessage::Resume {
        epoch,
        interconnect: Interconnect::Ethernet {
            mac: NIC_MAC.into(),
            iface: None,
            pci: None,
        },
    })
    .unwrap();
    match host
        .wait_for(
            |m| !matches!(m, GuestMessage::Hello { .. }),
            Instant::now() + PATIENCE,
        )
        .unwrap()
    {
        GuestMessage::Resumed {
            epoch: e,
            interconnect,
            pci_devices,
        } if e == epoch => (interconnect, pci_devices),
        other => panic!("epoch {epoch}: expected resumed, got {other:?}"),
    }
}
