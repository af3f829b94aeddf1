//! What the QEMU controller tests ask of their guests: the PCI devices a guest reports through
//! its agent (hot-plug reaches a guest asynchronously, so epochs repeat until the report says
//! what the test waits for), and whether its dirtier goes on.
#![allow(dead_code)]

use std::path::Path;
use std::time::{Duration, Instant};
use symvirt::controller::{GuestNotice, VmReport};
use symvirt::host_channel::{ChannelOptions, HostChannel};
use symvirt::protocol::{GuestMessage, HostMessage, Interconnect, PciDevice};

/// Upper bound for any single wait.
pub const PATIENCE: Duration = Duration::from_secs(120);
pub const VIRTIO_VENDOR: u16 = 0x1af4;
/// The HCA stand-in (`ivshmem-plain`).
pub const IVSHMEM_DEVICE: u16 = 0x1110;
/// virtio-net, legacy and modern.
pub const VIRTIO_NET_DEVICES: [u16; 2] = [0x1000, 0x1041];

pub fn has(devices: &[PciDevice], device: u16) -> bool {
    devices
        .iter()
        .any(|d| d.vendor == VIRTIO_VENDOR && d.device == device)
}

pub fn has_nic(devices: &[PciDevice]) -> bool {
    VIRTIO_NET_DEVICES.iter().any(|&d| has(devices, d))
}

/// Asks the guest behind `sock` (a new host connection) for its PCI devices, repeating epochs
/// (after `after_epoch`) until `done` holds or patience runs out: hot-plug reaches a guest
/// asynchronously. Returns the last report.
pub fn guest_pci_until(
    sock: &Path,
    vm: &str,
    after_epoch: u64,
    interconnect: Interconnect,
    done: impl Fn(&[PciDevice]) -> bool,
) -> Vec<PciDevice> {
    let chan = HostChannel::connect(sock, ChannelOptions::labelled(vm)).unwrap();
    let serial = sock.with_file_name("serial.log");
    guest_pci_until_on(&chan, &serial, vm, after_epoch, interconnect, done)
}

/// [`guest_pci_until`] on an open channel (its guest's console log in `serial`).
pub fn guest_pci_until_on(
    chan: &HostChannel,
    serial: &Path,
    vm: &str,
    after_epoch: u64,
    interconnect: Interconnect,
    done: impl Fn(&[PciDevice]) -> bool,
) -> Vec<PciDevice> {
    // Right after the controller's connection: the channel's hello request gets the answer.
    let info = match chan.wait_hello(Instant::now() + PATIENCE) {
        Ok(i) => i,
        Err(e) => {
            let log = read(serial);
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            panic!("{vm}: no hello: {e}; serial tail (newest first): {tail:#?}")
        }
    };
    assert_eq!(info.vm, vm);
    let started = Instant::now();
    let mut epoch = after_epoch;
    loop {
        epoch += 1;
        chan.send(&HostMessage::Prepare {
            epoch,
            deadline_ms: 30_000,
        })
        .unwrap();
        let got = chan
            .wait_for(
                |m| !matches!(m, GuestMessage::Hello { .. }),
                Instant::now() + PATIENCE,
            )
            .unwrap();
        assert_eq!(got, GuestMessage::Quiesced { epoch });
        chan.send(&HostMessage::Resume {
            epoch,
            interconnect: interconnect.clone(),
        })
        .unwrap();
        let devices = match chan
            .wait_for(
                |m| !matches!(m, GuestMessage::Hello { .. }),
                Instant::now() + PATIENCE,
            )
            .unwrap()
        {
            GuestMessage::Resumed {
                pci_devices: Some(d),
                ..
            } => d,
            other => panic!("{vm}: expected resumed, got {other:?}"),
        };
        if done(&devices) || started.elapsed() > PATIENCE {
            return devices;
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

pub fn passes(serial: &str) -> usize {
    serial.matches("ninja-guest-dirtier: pass=").count()
}

/// Waits until the guest's dirtier printed more passes than `before` (the guest runs).
pub fn wait_more_passes(serial: impl Fn() -> String, before: usize, what: &str) {
    let started = Instant::now();
    while passes(&serial()) <= before {
        assert!(
            started.elapsed() < PATIENCE,
            "{what}: the dirtier stopped at {before} passes"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

pub fn read(path: &Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The plan told `vm`'s guest to resume on Ethernet with `mac`, and the guest confirmed it.
pub fn assert_resumed_on_mac(vm: &VmReport, mac: &str) {
    match &vm.guest {
        GuestNotice::Resumed {
            interconnect: Interconnect::Ethernet { mac: m, .. },
            ..
        } => assert_eq!(m, mac, "{}", vm.name),
        other => panic!("{}: not resumed on Ethernet: {other:?}", vm.name),
    }
}
