//! The SymVirt port-I/O hypercall in a real KVM guest: the reference VMM's guest program moves
//! every channel byte through the two I/O ports (a VM exit per byte) at its pause point, the
//! VMM's port-I/O agent role plays the in-guest agent, and the host channel on the other end is
//! the one every transport uses.

use migrate_core::vmm::guest::mailbox;
use migrate_core::vmm::{ReferenceVm, VmmConfig};
use ninja_testkit::kvm_or_skip;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use symvirt::host_channel::{ChannelOptions, HostChannel};
use symvirt::portio::{DEFAULT_BASE, PortIoDevice};
use symvirt::portio_agent::PortIoAgent;
use symvirt::protocol::{GuestMessage, HostMessage, Interconnect};

const PATIENCE: Duration = Duration::from_secs(60);

fn counter(vm: &ReferenceVm) -> u64 {
    (0..vm.config().vcpus)
        .map(|i| vm.status(i).unwrap().counter)
        .sum()
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !cond() {
        assert!(Instant::now() < deadline, "gave up waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_kvm_guest_waits_and_is_signalled_through_the_port_io_hypercall() {
    if !kvm_or_skip("a_kvm_guest_waits_and_is_signalled_through_the_port_io_hypercall") {
        return;
    }
    let vm = Arc::new(
        ReferenceVm::new(VmmConfig {
            mem_size: 16 << 20,
            vcpus: 2,
            working_set_pages: 64,
            ..VmmConfig::default()
        })
        .unwrap(),
    );
    let (device, host_end) = PortIoDevice::new(DEFAULT_BASE).unwrap();
    let device = Arc::new(Mutex::new(device));
    vm.io_bus()
        .plug(
            "symvirt0",
            &[DEFAULT_BASE, DEFAULT_BASE + 1],
            Box::new(device.clone()),
        )
        .unwrap();
    let host = HostChannel::from_stream(host_end, ChannelOptions::labelled("kvm0")).unwrap();
    let _agent = PortIoAgent::start(vm.clone(), "kvm0", DEFAULT_BASE).unwrap();
    vm.resume().unwrap();

    let info = host.wait_hello(Instant::now() + PATIENCE).unwrap();
    assert_eq!((info.vm.as_str(), info.ranks), ("kvm0", 0));
    // The guest itself sent every byte of it: the outbox is drained by its `out`s only.
    wait_until("the outbox to drain", || {
        mailbox::outbox_pending(vm.memory()).unwrap() == 0
    });

    for epoch in 1..=3u64 {
        let running = counter(&vm);
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
        // Every vCPU is parked at its pause point: no pass completes while it waits.
        let parked = counter(&vm);
        assert!(parked >= running);
        for i in 0..2 {
            assert_eq!(vm.status(i).unwrap().waiting, epoch, "vCPU {i} not parked");
        }
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(counter(&vm), parked, "a vCPU ran a pass while quiesced");
        assert!(vm.failure().is_none(), "{:?}", vm.failure());

        let interconnect = Interconnect::Ethernet {
            mac: "52:54:00:00:00:07".into(),
            iface: None,
            pci: None,
        };
        host.send(&HostMessage::Resume {
            epoch,
            interconnect: interconnect.clone(),
        })
        .unwrap();
        let got = host
            .wait_for(
                |m| !matches!(m, GuestMessage::Hello { .. }),
                Instant::now() + PATIENCE,
            )
            .unwrap();
        assert_eq!(
            got,
            GuestMessage::Resumed {
                epoch,
                interconnect,
                pci_devices: None
            }
        );
        wait_until("the guest to run on after the signal", || {
            counter(&vm) > parked
        });
    }
    vm.pause().unwrap();
    for i in 0..2 {
        let block = vm.check_working_set(i).unwrap();
        assert_eq!(block.errors, 0, "vCPU {i}");
        assert!(block.checksum_consistent(), "vCPU {i}: {block:?}");
    }
    assert_eq!(host.stats().rejected_total(), 0);
    assert_eq!(device.lock().unwrap().dropped(), 0);
}
