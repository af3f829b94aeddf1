//! The host channel against a hostile guest: the test plays QEMU's chardev socket (the server)
//! and writes whatever a compromised guest could write into its virtio-serial port.

use std::io::{BufWriter, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use symvirt::Error;
use symvirt::host_channel::{ChannelEvent, ChannelOptions, HostChannel};
use symvirt::protocol::{GuestMessage, HostMessage, MAX_LINE};
use symvirt::session::{RejectionKind, SessionState};

/// Generous bound for anything that should be immediate; only hit when something hangs.
const PATIENCE: Duration = Duration::from_secs(60);

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("symvirt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fake QEMU chardev server with one connected host channel.
struct Rig {
    _dir: TempDir,
    listener: UnixListener,
    guest: UnixStream,
    host: Arc<HostChannel>,
}

impl Rig {
    fn new(tag: &str, options: ChannelOptions) -> Rig {
        let dir = TempDir::new(tag);
        let path = dir.0.join("symvirt.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let host = Arc::new(HostChannel::connect(&path, options).unwrap());
        let (guest, _) = listener.accept().unwrap();
        guest.set_read_timeout(Some(PATIENCE)).unwrap();
        Rig {
            _dir: dir,
            listener,
            guest,
            host,
        }
    }

    fn guest_says(&mut self, line: &str) {
        self.guest.write_all(line.as_bytes()).unwrap();
        self.guest.write_all(b"\n").unwrap();
    }

    fn hello(&mut self) {
        self.guest_says(
            r#"{"type":"hello","vm":"vm0","agent_version":"0.1.0","protocol":1,"ranks":1}"#,
        );
        // Consumes the queued Connected and hello events, so each test starts from an empty
        // queue.
        let got = self
            .host
            .wait_for(
                |m| matches!(m, GuestMessage::Hello { .. }),
                Instant::now() + PATIENCE,
            )
            .unwrap();
        assert!(matches!(got, GuestMessage::Hello { ref vm, .. } if vm == "vm0"));
    }

    /// Waits until the host has rejected `n` lines in all.
    fn wait_rejections(&self, n: u64) {
        let deadline = Instant::now() + PATIENCE;
        while self.host.stats().rejected_total() < n {
            assert!(Instant::now() < deadline, "{:?}", self.host.stats());
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// What the guest reads next from the host, parsed, past the host's `hello` (sent on every
    /// connection). Unbuffered, so no line after it is lost.
    fn guest_reads(&mut self) -> serde_json::Value {
        loop {
            let mut line = Vec::new();
            let mut byte = [0u8];
            while byte[0] != b'\n' {
                assert_eq!((&self.guest).read(&mut byte).unwrap(), 1, "host hung up");
                line.push(byte[0]);
            }
            let value: serde_json::Value = serde_json::from_slice(&line).unwrap();
            if value != serde_json::json!({"type": "hello"}) {
                return value;
            }
        }
    }

    fn prepare(&mut self, epoch: u64) -> SessionState {
        self.host
            .send(&HostMessage::Prepare {
                epoch,
                deadline_ms: 60_000,
            })
            .unwrap();
        let seen = self.guest_reads();
        assert_eq!(seen["type"], "prepare");
        assert_eq!(seen["epoch"], epoch);
        let state = self.host.state();
        assert!(matches!(state, SessionState::Preparing { epoch: e, .. } if e == epoch));
        state
    }

    /// Sends a valid `quiesced`, which travels behind everything written before it, and waits
    /// for it: once it arrives every earlier line has been judged.
    fn sync_with_quiesced(&mut self, epoch: u64) {
        self.guest_says(&format!(r#"{{"type":"quiesced","epoch":{epoch}}}"#));
        let got = self
            .host
            .wait_for(
                |m| matches!(m, GuestMessage::Quiesced { .. }),
                Instant::now() + PATIENCE,
            )
            .unwrap();
        assert_eq!(got, GuestMessage::Quiesced { epoch });
    }
}

#[test]
fn oversized_lines_garbage_and_bad_messages_are_rejected_and_counted() {
    let mut rig = Rig::new("garbage", ChannelOptions::labelled("garbage"));
    // Before hello: nothing is accepted.
    rig.guest_says(r#"{"type":"quiesced","epoch":1}"#);
    rig.hello();
    let state = rig.prepare(1);

    let huge = "x".repeat(10 * MAX_LINE);
    rig.guest_says(&huge);
    rig.guest
        .write_all(b"\x00\xff\xfe binary \x01\x02 garbage\n")
        .unwrap();
    rig.guest_says("not json at all");
    rig.guest_says(r#"{"type":"reboot_host"}"#);
    rig.guest_says(r#"{"type":"quiesced","epoch":1,"also":"this"}"#);
    rig.guest_says(r#"{"type":"failed","epoch":1,"reason":"line\u0000break"}"#);
    rig.guest_says(r#"{"type":"hello","vm":"vm0","agent_version":"0.1.0","protocol":1,"ranks":1}"#);
    assert_eq!(rig.host.state(), state, "state kept through the garbage");
    rig.sync_with_quiesced(1);

    let stats = rig.host.stats();
    assert_eq!(stats.rejected(RejectionKind::Oversized), 1);
    assert_eq!(stats.rejected(RejectionKind::Malformed), 4);
    assert_eq!(stats.rejected(RejectionKind::Invalid), 1);
    // quiesced before hello, second hello on the connection
    assert_eq!(stats.rejected(RejectionKind::Unexpected), 2);
    assert_eq!(stats.rejected_total(), 8);
    assert_eq!(stats.delivered, 2, "hello and quiesced");
    let recent = rig.host.recent_rejections();
    assert_eq!(recent.len(), 8);
    assert!(recent[0].detail.contains("before hello"), "{recent:?}");
    assert!(recent[1].detail.contains("40960 bytes"), "{recent:?}");
    assert!(recent[7].detail.contains("second hello"), "{recent:?}");
}

#[test]
fn wrong_epoch_and_out_of_order_messages_are_rejected_without_changing_state() {
    let mut rig = Rig::new("epoch", ChannelOptions::labelled("epoch"));
    rig.hello();
    // quiesced before prepare
    rig.guest_says(r#"{"type":"quiesced","epoch":1}"#);
    rig.wait_rejections(1);
    let state = rig.prepare(3);
    rig.guest_says(r#"{"type":"quiesced","epoch":2}"#);
    rig.guest_says(r#"{"type":"quiesced","epoch":4}"#);
    rig.guest_says(r#"{"type":"resumed","epoch":3,"interconnect":{"kind":"ethernet","mac":"52:54:00:00:00:01"}}"#);
    rig.guest_says(r#"{"type":"failed","epoch":99,"reason":"not mine"}"#);
    assert_eq!(rig.host.state(), state);
    rig.sync_with_quiesced(3);
    let stats = rig.host.stats();
    assert_eq!(stats.rejected(RejectionKind::WrongEpoch), 3);
    assert_eq!(stats.rejected(RejectionKind::Unexpected), 2);
    assert_eq!(rig.host.state(), SessionState::Quiesced { epoch: 3 });

    // The host cannot be talked into skipping steps either.
    let err = rig
        .host
        .send(&HostMessage::Prepare {
            epoch: 4,
            deadline_ms: 1,
        })
        .unwrap_err();
    assert!(matches!(err, Error::Transition { .. }), "{err}");
    let err = rig.host.send(&HostMessage::Abort { epoch: 2 }).unwrap_err();
    assert!(matches!(err, Error::Transition { .. }), "{err}");
    assert_eq!(rig.host.state(), SessionState::Quiesced { epoch: 3 });
}

#[test]
fn a_flood_of_100k_messages_does_not_stall_the_controller() {
    const FLOOD: u64 = 100_000;
    let mut rig = Rig::new("flood", ChannelOptions::labelled("flood"));
    rig.hello();
    let state = rig.prepare(1);

    let stop = Arc::new(AtomicBool::new(false));
    let running = Arc::new(AtomicBool::new(true));
    let flooder = {
        let stream = rig.guest.try_clone().unwrap();
        let (stop, running) = (stop.clone(), running.clone());
        std::thread::spawn(move || {
            let lines = [
                (RejectionKind::WrongEpoch, r#"{"type":"quiesced","epoch":2}"#.to_owned()),
                (RejectionKind::Unexpected, r#"{"type":"resumed","epoch":1,"interconnect":{"kind":"ethernet","mac":"52:54:00:00:00:01"}}"#.to_owned()),
                (RejectionKind::Unexpected, r#"{"type":"hello","vm":"vm0","agent_version":"1","protocol":1,"ranks":1}"#.to_owned()),
                (RejectionKind::Malformed, "\u{1}\u{2}garbage{{{".to_owned()),
                (RejectionKind::Invalid, r#"{"type":"quiesced","epoch":0}"#.to_owned()),
                (RejectionKind::Oversized, "y".repeat(MAX_LINE + 100)),
            ];
            let mut counts = [0u64; RejectionKind::ALL.len()];
            let mut out = BufWriter::with_capacity(64 * 1024, stream);
            let mut n = 0u64;
            while n < FLOOD || !stop.load(Ordering::SeqCst) {
                // Oversized lines are 1 in 60, the rest rotate.
                let (kind, line) = if n % 60 == 59 {
                    &lines[5]
                } else {
                    &lines[(n % 5) as usize]
                };
                out.write_all(line.as_bytes()).unwrap();
                out.write_all(b"\n").unwrap();
                counts[kind.index()] += 1;
                n += 1;
            }
            out.flush().unwrap();
            running.store(false, Ordering::SeqCst);
            (n, counts)
        })
    };

    // While the flood runs: a wait with a deadline comes back at its deadline (it is run on a
    // thread so that a hang fails the test instead of blocking it), the reader keeps judging
    // lines meanwhile, and the state is intact.
    let started = Instant::now();
    while rig.host.stats().lines < 1000 {
        assert!(started.elapsed() < PATIENCE, "the flood never started");
        std::thread::sleep(Duration::from_millis(1));
    }
    let lines_before = rig.host.stats().lines;
    let (tx, rx) = crossbeam_channel::bounded(1);
    {
        let host = rig.host.clone();
        std::thread::spawn(move || {
            let r = host.wait_for(
                |m| matches!(m, GuestMessage::Quiesced { .. }),
                Instant::now() + Duration::from_secs(1),
            );
            let _ = tx.send((r, host.stats().lines, host.state()));
        });
    }
    let (result, lines_after, state_during) = rx
        .recv_timeout(PATIENCE)
        .expect("wait_for did not return while flooded");
    assert!(matches!(result, Err(Error::Timeout)), "{result:?}");
    assert!(
        running.load(Ordering::SeqCst) && lines_after > lines_before,
        "the wait ended while the flood was being read ({lines_before} -> {lines_after} lines)"
    );
    assert_eq!(state_during, state);

    stop.store(true, Ordering::SeqCst);
    let (written, counts) = flooder.join().unwrap();
    assert!(written >= FLOOD);
    // The one valid message after the flood still gets through, and nothing was lost or let in.
    rig.sync_with_quiesced(1);
    let stats = rig.host.stats();
    for kind in RejectionKind::ALL {
        assert_eq!(stats.rejected(kind), counts[kind.index()], "{kind:?}");
    }
    assert_eq!(stats.rejected_total(), written);
    assert_eq!(stats.delivered, 2, "hello and the final quiesced");
    assert_eq!(stats.dropped, 0);
    assert_eq!(rig.host.state(), SessionState::Quiesced { epoch: 1 });
    eprintln!(
        "flood: {written} lines, {} bytes, all rejected and counted",
        stats.bytes
    );
}

#[test]
fn a_guest_that_stops_reading_cannot_block_send() {
    let options = ChannelOptions {
        write_timeout: Duration::from_millis(200),
        ..ChannelOptions::labelled("stuck")
    };
    let mut rig = Rig::new("stuck", options);
    rig.hello();
    // prepare/abort alternate legally; the guest never reads, so the socket buffer fills up and
    // one send times out instead of blocking the controller.
    let mut epoch = 0;
    let err = loop {
        epoch += 1;
        assert!(epoch < 10_000_000, "the socket buffer never filled");
        let prepare = HostMessage::Prepare {
            epoch,
            deadline_ms: 1,
        };
        if let Err(e) = rig.host.send(&prepare) {
            break e;
        }
        if let Err(e) = rig.host.send(&HostMessage::Abort { epoch }) {
            break e;
        }
    };
    match &err {
        Error::Io { source, .. } => assert!(
            matches!(
                source.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ),
            "{source:?}"
        ),
        other => panic!("expected a write timeout, got {other:?}"),
    }
    // The failed send was undone: the session is in a state consistent with what was sent.
    let state = rig.host.state();
    assert!(
        matches!(state, SessionState::Running)
            || matches!(state, SessionState::Preparing { epoch: e, .. } if e == epoch),
        "{state:?} after failing in epoch {epoch}"
    );
}

#[test]
fn the_channel_reconnects_and_the_guest_says_hello_again() {
    let mut rig = Rig::new("reconnect", ChannelOptions::labelled("reconnect"));
    rig.hello();
    let state = rig.prepare(1);
    // QEMU drops the connection (e.g. the chardev was reset); the host reconnects.
    rig.guest.shutdown(std::net::Shutdown::Both).unwrap();
    let (guest, _) = rig.listener.accept().unwrap();
    guest.set_read_timeout(Some(PATIENCE)).unwrap();
    rig.guest = guest;
    assert_eq!(
        rig.host.recv_timeout(PATIENCE).unwrap(),
        ChannelEvent::Disconnected
    );
    assert_eq!(
        rig.host.recv_timeout(PATIENCE).unwrap(),
        ChannelEvent::Connected
    );
    // Another VM's agent cannot take over the channel; the right one can, epoch intact.
    rig.guest_says(
        r#"{"type":"hello","vm":"intruder","agent_version":"1","protocol":1,"ranks":1}"#,
    );
    rig.guest_says(r#"{"type":"hello","vm":"vm0","agent_version":"0.1.0","protocol":2,"ranks":1}"#);
    rig.guest_says(r#"{"type":"hello","vm":"vm0","agent_version":"0.1.0","protocol":1,"ranks":1}"#);
    assert!(matches!(
        rig.host
            .wait_for(
                |m| matches!(m, GuestMessage::Hello { .. }),
                Instant::now() + PATIENCE
            )
            .unwrap(),
        GuestMessage::Hello { .. }
    ));
    assert_eq!(rig.host.state(), state);
    let stats = rig.host.stats();
    assert_eq!(stats.connections, 2);
    assert_eq!(stats.rejected(RejectionKind::Identity), 1);
    assert_eq!(stats.rejected(RejectionKind::Version), 1);
    rig.sync_with_quiesced(1);
}

#[test]
fn repeated_hellos_between_epochs_are_coalesced_not_queued() {
    let mut rig = Rig::new("hellos", ChannelOptions::labelled("hellos"));
    rig.hello();
    let hello = r#"{"type":"hello","vm":"vm0","agent_version":"0.1.0","protocol":1,"ranks":1}"#;
    let mut out = BufWriter::new(rig.guest.try_clone().unwrap());
    for _ in 0..10_000 {
        writeln!(out, "{hello}").unwrap();
    }
    // A restarted agent with a different rank count is news and gets through.
    writeln!(
        out,
        r#"{{"type":"hello","vm":"vm0","agent_version":"0.1.1","protocol":1,"ranks":2}}"#
    )
    .unwrap();
    out.flush().unwrap();
    let got = rig
        .host
        .wait_for(
            |m| matches!(m, GuestMessage::Hello { ranks: 2, .. }),
            Instant::now() + PATIENCE,
        )
        .unwrap();
    assert!(
        matches!(&got, GuestMessage::Hello { agent_version, .. } if agent_version == "0.1.1"),
        "{got:?}"
    );
    assert_eq!(rig.host.guest().unwrap().agent_version, "0.1.1");
    let stats = rig.host.stats();
    assert_eq!(stats.coalesced, 10_000);
    assert_eq!(stats.delivered, 2);
    assert_eq!(stats.rejected_total(), 0);
    assert_eq!(rig.host.state(), SessionState::Running);
}
