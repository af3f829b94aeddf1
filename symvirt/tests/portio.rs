//! The port-I/O transport's device model driven the way a guest's `in`/`out` instructions would,
//! with the host channel on the other end (no KVM needed: the VMM's exit handler just calls
//! these two methods).

use std::time::{Duration, Instant};
use symvirt::host_channel::{ChannelEvent, ChannelOptions, HostChannel};
use symvirt::portio::{DEFAULT_BASE, PortIoDevice, RESET, STATUS_DATA, STATUS_HOST};
use symvirt::protocol::{GuestMessage, HostMessage, Interconnect, decode};
use symvirt::session::{RejectionKind, SessionState};

const DATA: u16 = DEFAULT_BASE;
const STATUS: u16 = DEFAULT_BASE + 1;
const PATIENCE: Duration = Duration::from_secs(60);

fn out_line(dev: &mut PortIoDevice, line: &str) {
    for b in line.bytes().chain(std::iter::once(b'\n')) {
        dev.pio_write(DATA, &[b]);
    }
}

fn status(dev: &mut PortIoDevice) -> u8 {
    let mut s = [0xff];
    dev.pio_read(STATUS, &mut s);
    s[0]
}

/// Polls STATUS and reads DATA byte by byte until a newline, as a guest agent would.
fn in_line(dev: &mut PortIoDevice) -> String {
    let deadline = Instant::now() + PATIENCE;
    let mut line = Vec::new();
    loop {
        assert!(Instant::now() < deadline, "no line from the host");
        if status(dev) & STATUS_DATA == 0 {
            std::thread::sleep(Duration::from_millis(1));
            continue;
        }
        let mut b = [0];
        dev.pio_read(DATA, &mut b);
        if b[0] == b'\n' {
            return String::from_utf8(line).unwrap();
        }
        line.push(b[0]);
    }
}

#[test]
fn a_guest_speaks_the_protocol_through_two_io_ports() {
    let (mut dev, host_end) = PortIoDevice::new(DEFAULT_BASE).unwrap();
    assert!(dev.handles(DATA) && dev.handles(STATUS));
    assert!(!dev.handles(DEFAULT_BASE + 2) && !dev.handles(DEFAULT_BASE - 1));
    let host = HostChannel::from_stream(host_end, ChannelOptions::labelled("pio")).unwrap();
    // The host's first words on a new channel: introduce yourself.
    let asked: HostMessage = decode(in_line(&mut dev).as_bytes()).unwrap();
    assert_eq!(asked, HostMessage::Hello);
    assert_eq!(status(&mut dev), STATUS_HOST, "nothing else waiting yet");

    out_line(
        &mut dev,
        r#"{"type":"hello","vm":"kvm0","agent_version":"1","protocol":1,"ranks":0}"#,
    );
    assert_eq!(
        host.wait_hello(Instant::now() + PATIENCE).unwrap().vm,
        "kvm0"
    );

    host.send(&HostMessage::Prepare {
        epoch: 1,
        deadline_ms: 1000,
    })
    .unwrap();
    let got: HostMessage = decode(in_line(&mut dev).as_bytes()).unwrap();
    assert_eq!(
        got,
        HostMessage::Prepare {
            epoch: 1,
            deadline_ms: 1000
        }
    );
    assert_eq!(status(&mut dev), STATUS_HOST, "the line was consumed whole");

    // A guest agent restarting mid-line: RESET ends the partial line, which the host rejects,
    // and the next line is read cleanly.
    for b in br#"{"type":"quies"#.iter() {
        dev.pio_write(DATA, &[*b]);
    }
    dev.pio_write(STATUS, &[RESET]);
    out_line(&mut dev, r#"{"type":"quiesced","epoch":1}"#);
    let quiesced = host
        .wait_for(
            |m| matches!(m, GuestMessage::Quiesced { .. }),
            Instant::now() + PATIENCE,
        )
        .unwrap();
    assert_eq!(quiesced, GuestMessage::Quiesced { epoch: 1 });
    assert_eq!(host.stats().rejected(RejectionKind::Malformed), 1);

    let interconnect = Interconnect::Infiniband {
        hca: "mlx5_1".into(),
        port: 1,
        pci: None,
    };
    host.send(&HostMessage::Resume {
        epoch: 1,
        interconnect: interconnect.clone(),
    })
    .unwrap();
    // A wide `in` (inl) takes four bytes at once.
    let mut first = [0u8; 4];
    while status(&mut dev) & STATUS_DATA == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    dev.pio_read(DATA, &mut first);
    let rest = in_line(&mut dev);
    let line = format!("{}{rest}", std::str::from_utf8(&first).unwrap());
    assert_eq!(
        decode::<HostMessage>(line.as_bytes()).unwrap(),
        HostMessage::Resume {
            epoch: 1,
            interconnect: interconnect.clone()
        }
    );
    out_line(
        &mut dev,
        &format!(
            r#"{{"type":"resumed","epoch":1,"interconnect":{}}}"#,
            serde_json::to_string(&interconnect).unwrap()
        ),
    );
    host.wait_for(
        |m| matches!(m, GuestMessage::Resumed { .. }),
        Instant::now() + PATIENCE,
    )
    .unwrap();
    assert_eq!(host.state(), SessionState::Running);
    assert_eq!(dev.dropped(), 0);

    // The VMM tears the device down: the host sees the channel end, then close.
    drop(dev);
    let mut events = Vec::new();
    while let Ok(e) = host.recv_timeout(PATIENCE) {
        events.push(e);
    }
    assert_eq!(
        events.last(),
        Some(&ChannelEvent::Disconnected),
        "{events:?}"
    );
    assert!(matches!(
        host.recv_timeout(Duration::ZERO),
        Err(symvirt::Error::Closed)
    ));
}
