//! The client against a scripted fake QMP server on a real unix (or TCP) socket: the
//! misbehaviour real QEMU will not produce on demand. Every case must end in a clear error,
//! never a panic or a hang.

use std::error::Error as _;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::{JoinHandle, Scope};
use std::time::{Duration, Instant};

use qmp::types::QmpCapability;
use qmp::{
    ConnectOptions, Endpoint, Error, ErrorClass, EventFilter, EventKind, MigrationStatus,
    MigrationWait, ProtocolError, Qmp, RunState, wait_for_migration,
};
use serde_json::{Value, json};

const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10}, "package": "fake"}, "capabilities": ["oob"]}}"#;

/// The server's end of one connection.
struct Peer {
    reader: BufReader<Box<dyn std::io::Read + Send>>,
    writer: Box<dyn Write + Send>,
    /// The unix socket itself, for shutdowns.
    socket: Option<std::os::unix::net::UnixStream>,
}

impl Peer {
    fn send(&mut self, line: &str) {
        // The client may already have hung up; that is part of several scripts.
        let _ = self.writer.write_all(line.as_bytes());
        let _ = self.writer.write_all(b"\r\n");
        let _ = self.writer.flush();
    }

    fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.writer.write_all(bytes);
        let _ = self.writer.flush();
    }

    /// The next request, or `None` when the client hung up.
    fn recv(&mut self) -> Option<Value> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(serde_json::from_str(&line).expect("client sent valid JSON")),
        }
    }

    fn reply(&mut self, request: &Value, value: Value) {
        self.send(&json!({"return": value, "id": request["id"]}).to_string());
    }

    /// Greets and answers `qmp_capabilities`; returns that request.
    fn negotiate(&mut self) -> Value {
        self.send(GREETING);
        let caps = self.recv().expect("qmp_capabilities request");
        assert_eq!(caps["execute"], "qmp_capabilities");
        self.reply(&caps, json!({}));
        caps
    }

    /// Stops reading without closing: the client's writes fail (`EPIPE`) while its reader
    /// sees no end of stream, as when a dying peer's socket is half torn down.
    fn stop_reading(&self) {
        let socket = self.socket.as_ref().expect("a unix socket");
        socket.shutdown(std::net::Shutdown::Read).unwrap();
    }

    /// Reads until the client hangs up.
    fn drain(&mut self) {
        while self.recv().is_some() {}
    }

    /// Waits for the first bytes of the next request and reads no further: QEMU frozen in
    /// the middle of reading it. Returns once the client is certainly writing.
    fn freeze_on_next_request(&mut self) {
        let first = self.reader.fill_buf().expect("a request arrives");
        assert!(!first.is_empty(), "the client hung up instead of writing");
    }
}

/// A fake server accepting one connection and running a script on it.
struct FakeServer {
    path: PathBuf,
    handle: Option<JoinHandle<()>>,
}

impl FakeServer {
    fn unix(script: impl FnOnce(Peer) + Send + 'static) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "qmp-fake-{}-{}.sock",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).expect("bind fake QMP socket");
        let handle = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            // Bounds every script: a server thread never outlives a broken test by long.
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            let reader: Box<dyn std::io::Read + Send> = Box::new(stream.try_clone().unwrap());
            script(Peer {
                reader: BufReader::new(reader),
                socket: Some(stream.try_clone().unwrap()),
                writer: Box::new(stream),
            });
        });
        Self {
            path,
            handle: Some(handle),
        }
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.path.clone())
    }

    /// Waits for the script to end and propagates its assertion failures.
    fn finish(mut self) {
        if let Some(h) = self.handle.take() {
            h.join().expect("fake server script panicked");
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn options() -> ConnectOptions {
    ConnectOptions {
        greeting_timeout: Duration::from_secs(5),
        command_timeout: Duration::from_secs(5),
        ..ConnectOptions::default()
    }
}

fn connect(server: &FakeServer) -> Qmp {
    Qmp::connect(&server.endpoint(), options()).expect("connect to fake server")
}

fn assert_disconnected(result: qmp::Result<Value>) {
    assert!(
        matches!(result, Err(Error::Disconnected { .. })),
        "expected disconnected, got {result:?}"
    );
}

/// Bounds a test of calls that might hang: unless the returned sender is dropped (or sent to)
/// within `limit`, the connection is closed, which ends every call on it. The test then
/// fails on the calls' results or durations instead of hanging.
fn watchdog<'scope>(
    s: &'scope Scope<'scope, '_>,
    qmp: &'scope Qmp,
    limit: Duration,
) -> mpsc::Sender<()> {
    let (done, finished) = mpsc::channel::<()>();
    s.spawn(move || {
        if let Err(mpsc::RecvTimeoutError::Timeout) = finished.recv_timeout(limit) {
            qmp.close();
        }
    });
    done
}

/// `f`'s result and how long it took.
fn timed<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let start = Instant::now();
    let out = f();
    (out, start.elapsed())
}

/// A server that negotiates, then reads the first bytes of the next request and stops reading
/// until `release` is signalled (or a minute passes): QEMU frozen mid-command.
fn frozen_server(started: mpsc::Sender<()>, release: mpsc::Receiver<()>) -> FakeServer {
    FakeServer::unix(move |mut peer| {
        peer.negotiate();
        peer.freeze_on_next_request();
        let _ = started.send(());
        let _ = release.recv_timeout(Duration::from_secs(60));
    })
}

#[test]
fn greeting_is_parsed_and_oob_negotiated() {
    let server = FakeServer::unix(|mut peer| {
        let caps = peer.negotiate();
        assert_eq!(caps["arguments"]["enable"], json!(["oob"]));
        let req = peer.recv().unwrap();
        assert_eq!(req["execute"], "query-status");
        assert!(req["id"].is_u64(), "every command carries an id: {req}");
        peer.reply(
            &req,
            json!({"running": true, "singlestep": false, "status": "running"}),
        );
        peer.drain();
    });
    let qmp = connect(&server);
    assert_eq!(qmp.greeting().version.qemu.major, 10);
    assert_eq!(qmp.greeting().version.package, "fake");
    assert!(qmp.oob_enabled());
    let status = qmp.query_status().unwrap();
    assert!(status.running);
    assert_eq!(status.status, RunState::Running);
    drop(qmp);
    server.finish();
}

#[test]
fn greeting_with_unknown_capability_and_fields_is_accepted() {
    let server = FakeServer::unix(|mut peer| {
        peer.send(r#"{"QMP": {"version": {"qemu": {"micro": 0, "minor": 1, "major": 12}, "package": "", "nano": 1}, "capabilities": ["oob", "teleport"], "motd": "hi"}}"#);
        let caps = peer.recv().unwrap();
        assert_eq!(caps["arguments"]["enable"], json!(["oob"]));
        peer.reply(&caps, json!({}));
        peer.drain();
    });
    let qmp = connect(&server);
    assert_eq!(
        qmp.greeting().capabilities,
        [QmpCapability::Oob, QmpCapability::Other("teleport".into())]
    );
    drop(qmp);
    server.finish();
}

#[test]
fn oob_is_not_requested_when_disabled() {
    let server = FakeServer::unix(|mut peer| {
        let caps = peer.negotiate();
        assert_eq!(caps["arguments"]["enable"], json!([]));
        peer.drain();
    });
    let qmp = Qmp::connect(
        &server.endpoint(),
        ConnectOptions {
            enable_oob: false,
            ..options()
        },
    )
    .unwrap();
    assert!(!qmp.oob_enabled());
    drop(qmp);
    server.finish();
}

#[test]
fn replies_out_of_order_reach_their_callers() {
    let server = FakeServer::unix(|mut peer| {
        peer.negotiate();
        let first = peer.recv().unwrap();
        let second = peer.recv().unwrap();
        // Answer in reverse order, echoing each command's name.
        for req in [&second, &first] {
            peer.reply(req, json!({ "echo": req["execute"] }));
        }
        peer.drain();
    });
    let qmp = connect(&server);
    std::thread::scope(|s| {
        let a = s.spawn(|| qmp.execute("cmd-a", None));
        let b = s.spawn(|| qmp.execute("cmd-b", None));
        assert_eq!(a.join().unwrap().unwrap(), json!({"echo": "cmd-a"}));
        assert_eq!(b.join().unwrap().unwrap(), json!({"echo": "cmd-b"}));
    });
    drop(qmp);
    server.finish();
}

#[test]
fn qmp_error_reply_is_typed() {
    let server = FakeServer::unix(|mut peer| {
        peer.negotiate();
        let req = peer.recv().unwrap();
        assert_eq!(req["execute"], "device_del");
        assert_eq!(req["arguments"], json!({"id": "nope"}));
        let err = json!({"error": {"class": "DeviceNotFound", "desc": "Device 'nope' not found"}, "id": req["id"]});
        peer.send(&err.to_string());
        let req = peer.recv().unwrap();
        let err = json!({"error": {"class": "SomeFutureClass", "desc": "new"}, "id": req["id"]});
        peer.send(&err.to_string());
        peer.drain();
    });
    let qmp = connect(&server);
    match qmp.device_del("nope") {
        Err(Error::Qmp {
            command,
            class,
            desc,
        }) => {
            assert_eq!(command, "device_del");
            assert_eq!(class, ErrorClass::DeviceNotFound);
            assert_eq!(desc, "Device 'nope' not found");
        }
        other => panic!("expected a QMP error, got {other:?}"),
    }
    match qmp.execute("x", None) {
        Err(Error::Qmp { class, .. }) => {
            assert_eq!(class, ErrorClass::Other("SomeFutureClass".into()))
        }
        other => panic!("expected a QMP error, got {other:?}"),
    }
    // A QMP error is not fatal for the connection.
    assert!(qmp.is_connected());
    drop(qmp);
    server.finish();
}

#[test]
fn qmp_error_names_the_command_that_failed() {
    let server = FakeServer::unix(|mut peer| {
        peer.negotiate();
        for (class, desc) in [
            ("GenericError", "Duplicate device ID 'n0' for device"),
            ("DeviceNotFound", "Device 'n1' not found"),
        ] {
            let req = peer.recv().unwrap();
            let err = json!({"error": {"class": class, "desc": desc}, "id": req["id"]});
            peer.send(&err.to_string());
        }
        peer.drain();
    });
    let qmp = connect(&server);
    let dup = qmp
        .device_add(&qmp::DeviceSpec::new("virtio-net-pci", "n0"))
        .unwrap_err();
    assert!(
        matches!(&dup, Error::Qmp { command, .. } if command == "device_add"),
        "{dup:?}"
    );
    assert_eq!(
        dup.to_string(),
        "device_add: Duplicate device ID 'n0' for device"
    );
    let missing = qmp.device_del("n1").unwrap_err();
    assert_eq!(
        missing.to_string(),
        "device_del: Device 'n1' not found (DeviceNotFound)"
    );
    drop(qmp);
    server.finish();
}

#[test]
fn qmp_error_during_negotiation_names_qmp_capabilities() {
    let server = FakeServer::unix(|mut peer| {
        peer.send(GREETING);
        let caps = peer.recv().unwrap();
        let err =
            json!({"error": {"class": "GenericError", "desc": "no oob today"}, "id": caps["id"]});
        peer.send(&err.to_string());
        peer.drain();
    });
    match Qmp::connect(&server.endpoint(), options()) {
        Err(e @ Error::Qmp { .. }) => assert_eq!(e.to_string(), "qmp_capabilities: no oob today"),
        other => panic!("expected a QMP error, got {other:?}"),
    }
    server.finish();
}

#[test]
fn truncated_json_at_end_of_stream_is_a_protocol_error() {
    let server = FakeServer::unix(|mut peer| {
        peer.negotiate();
        peer.recv().unwrap();
        peer.send_raw(br#"{"return": {"running": tr"#);
        // Closing here leaves the message unfinished.
    });
    let qmp = connect(&server);
    let result = qmp.execute("query-status", None);
    assert!(
        matches!(
            result,
            Err(Error::Protocol(ProtocolError::Truncated { bytes: 25 }))
        ),
        "got {result:?}"
    );
    assert!(!qmp.is_connected());
    assert_disconnected(qmp.execute("query-status", None));
    server.finish();
}

#[test]
fn truncated_json_line_is_malformed() {
    let server = FakeServer::unix(|mut peer| {
        peer.negotiate();
        peer.recv().unwrap();
        peer.send(r#"{"return": {"running": "#);
        peer.drain();
    });
    let qmp = connect(&server);
    let result = qmp.execute("query-status", None);
    assert!(
        matches!(
            result,
            Err(Error::Protocol(ProtocolError::MalformedJson { .. }))
        ),
        "got {result:?}"
    );
    assert_disconnected(qmp.execute("query-status", None));
    drop(qmp);
    server.finish();
}

#[test]
fn ten_mib_line_is_rejected_at_the_limit() {
    let server = FakeServer::unix(|mut peer| {
        peer.negotiate();
        peer.recv().unwrap();
        let mut huge = br#"{"return": ""#.to_vec();
        huge.resize(10 << 20, b'x');
        huge.extend_from_slice(b"\"}\n");
        // The client stops reading at its limit and hangs up; the write then fails.
        peer.send_raw(&huge);
    });
    let qmp = connect(&server);
    let result = qmp.execute("query-status", None);
    assert!(
        matches!(
            result,
            Err(Error::Protocol(ProtocolError::LineTooLong {
                limit: 1048576
            }))
        ),
        "got {result:?}"
    );
    assert_disconnected(qmp.execute("query-status", None));
    drop(qmp);
    server.finish();
}

#[test]
fn garbage_bytes_are_malformed_json() {
    let server = FakeServer::unix(|mut peer| {
        peer.negotiate();
        peer.recv().unwrap();
        peer.send_raw(b"\x00\xff\xfe garbage \x07\x1b[0m\n");
        peer.drain();
    });
    let qmp = connect(&server);
    let result = qmp.execute("query-status", None);
    assert!(
        matches!(
            result,
            Err(Error::Protocol(ProtocolError::MalformedJson { .. }))
        ),
        "got {result:?}"
    );
    drop(qmp);
    server.finish();
}

#[test]
fn garbage_instead_of_greeting_fails_connect() {
    let server = FakeServer::unix(|mut peer| {
        peer.send_raw(b"SSH-2.0-OpenSSH_9.2\r\n");
        peer.drain();
    });
    let result = Qmp::connect(&server.endpoint(), options());
    assert!(
        matches!(
            result,
            Err(Error::Protocol(ProtocolError::MalformedJson { .. }))
        ),
        "got {result:?}"
    );
    server.finish();
}

#[test]
fn json_that_is_not_a_greeting_fails_connect() {
    let server = FakeServer::unix(|mut peer| {
        peer.send(r#"{"return": {}}"#);
        peer.drain();
    });
    let result = Qmp::connect(&server.endpoint(), options());
    assert!(
        matches!(
            result,
            Err(Error::Protocol(ProtocolError::GreetingMissing { .. }))
        ),
        "got {result:?}"
    );
    server.finish();
}

#[test]
fn error_reply_without_id_fails_the_pending_call_and_closes() {
    let server = FakeServer::unix(|mut peer| {
        peer.negotiate();
        peer.recv().unwrap();
        peer.send(
            r#"{"error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}}"#,
        );
        peer.drain();
    });
    let qmp = connect(&server);
    match qmp.execute("query-status", None) {
        Err(Error::Protocol(ProtocolError::ErrorWithoutId { class, desc })) => {
            assert_eq!(class, ErrorClass::GenericError);
            assert!(desc.contains("JSON parse error"));
        }
        other => panic!("expected error-without-id, got {other:?}"),
    }
    assert!(!qmp.is_connected());
    assert_disconnected(qmp.execute("query-status", None));
    drop(qmp);
    server.finish();
}

#[test]
fn reply_with_wrong_id_is_dropped_and_the_right_one_delivered() {
    let server = FakeServer::unix(|mut peer| {
        peer.negotiate();
        let req = peer.recv().unwrap();
        peer.send(r#"{"return": {"wrong": true}, "id": 987654}"#);
        peer.send(r#"{"return": {"wrong": true}, "id": "not-a-number"}"#);
        peer.reply(&req, json!({"right": true}));
        peer.drain();
    });
    let qmp = connect(&server);
    assert_eq!(
        qmp.execute("query-status", None).unwrap(),
        json!({"right": true})
    );
    assert_eq!(qmp.unmatched_replies(), 2);
    assert!(qmp.is_connected());
    drop(qmp);
    server.finish();
}

#[test]
fn server_that_never_answers_times_out_and_late_reply_is_dropped() {
    let server = FakeServer::unix(|mut peer| {
        peer.negotiate();
        let ignored = peer.recv().unwrap();
        let second = peer.recv().unwrap();
        // Too late for the first caller, who has given up.
        peer.reply(&ignored, json!({"late": true}));
        peer.reply(&second, json!({"second": true}));
        peer.drain();
    });
    let qmp = connect(&server);
    let result = qmp.execute_with_timeout("query-status", None, Duration::from_millis(300));
    match result {
        Err(Error::Timeout { what, after }) => {
            assert!(what.contains("query-status"), "{what}");
            assert_eq!(after, Duration::from_millis(300));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    // The connection survives a timeout.
    assert_eq!(
        qmp.execute("query-status", None).unwrap(),
        json!({"second": true})
    );
    assert_eq!(qmp.unmatched_replies(), 1);
    drop(qmp);
    server.finish();
}

#[test]
fn server_that_stops_reading_times_out_the_write_and_closes() {
    // The server keeps the connection open, never reading, until the client has given up:
    // closing it after a fixed time would race a client starved of CPU on a loaded machine.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let server = FakeServer::unix(move |mut peer| {
        peer.negotiate();
        let _ = done_rx.recv_timeout(Duration::from_secs(60));
    });
    let opts = ConnectOptions {
        command_timeout: Duration::from_millis(300),
        ..options()
    };
    let qmp = Qmp::connect(&server.endpoint(), opts).unwrap();
    // Far more than a socket buffer holds.
    let big = json!({ "blob": "x".repeat(16 << 20) });
    match qmp.execute("x-big", Some(big)) {
        Err(Error::Timeout { what, .. }) => assert!(what.contains("x-big"), "{what}"),
        other => panic!("expected a write timeout, got {other:?}"),
    }
    // A half-written request leaves the stream unusable: the connection is closed.
    assert!(!qmp.is_connected());
    assert_disconnected(qmp.execute("query-status", None));
    drop(qmp);
    let _ = done_tx.send(());
    server.finish();
}

#[test]
fn frozen_server_write_ends_at_the_call_timeout_and_later_calls_say_why() {
    let (started_tx, started) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let server = frozen_server(started_tx, release_rx);
    // A long default timeout, as in production: it must not stretch a call's own one.
    let opts = ConnectOptions {
        command_timeout: Duration::from_secs(30),
        ..options()
    };
    let qmp = Qmp::connect(&server.endpoint(), opts).unwrap();
    let mut events = qmp.subscribe(EventFilter::All);
    // Well over what a socket buffer holds.
    let big = json!({ "blob": "x".repeat(1 << 20) });
    let ((big_result, big_took), (queued_result, queued_took)) = std::thread::scope(|s| {
        let done = watchdog(s, &qmp, Duration::from_secs(20));
        let big_call = s.spawn(|| {
            timed(|| qmp.execute_with_timeout("x-big", Some(big), Duration::from_secs(1)))
        });
        started
            .recv_timeout(Duration::from_secs(10))
            .expect("the big command reaches the server");
        // Queued behind the stuck write.
        let queued = s.spawn(|| {
            timed(|| qmp.execute_with_timeout("query-status", None, Duration::from_secs(8)))
        });
        let out = (big_call.join().unwrap(), queued.join().unwrap());
        drop(done);
        out
    });
    match big_result {
        Err(Error::Timeout { what, after }) => {
            assert!(what.contains("x-big"), "{what}");
            assert_eq!(after, Duration::from_secs(1));
        }
        other => panic!("expected a write timeout, got {other:?}"),
    }
    // One second, give or take a busy machine: not the default timeout (30 s), nor twice it.
    assert!(big_took < Duration::from_secs(10), "took {big_took:?}");
    // The queued call learns at once why the connection went, without a write of its own.
    assert!(
        queued_took < Duration::from_secs(10),
        "took {queued_took:?}"
    );
    let reason_ok = |reason: &str| reason.contains("x-big") && reason.contains("timed out");
    match &queued_result {
        Err(Error::Disconnected { reason }) if reason_ok(reason) => {}
        other => panic!("expected disconnected naming the stuck write, got {other:?}"),
    }
    // Every later call, and every event wait, gives the same reason.
    assert!(!qmp.is_connected());
    for result in [
        qmp.execute("query-status", None).map(drop),
        events
            .wait_for_event("STOP", |_| true, Duration::from_secs(5))
            .map(drop),
        qmp.wait_for_event("STOP", |_| true, Duration::from_secs(5))
            .map(drop),
    ] {
        match result {
            Err(Error::Disconnected { reason }) if reason_ok(&reason) => {}
            other => panic!("expected disconnected naming the stuck write, got {other:?}"),
        }
    }
    drop(qmp);
    let _ = release.send(());
    server.finish();
}

#[test]
fn call_queued_behind_a_stuck_write_gives_up_at_its_own_deadline() {
    let (started_tx, started) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    let server = frozen_server(started_tx, release_rx);
    let qmp = connect(&server);
    let big = json!({ "blob": "x".repeat(1 << 20) });
    let (big_result, (queued_result, queued_took), connected) = std::thread::scope(|s| {
        let done = watchdog(s, &qmp, Duration::from_secs(20));
        let big_call =
            s.spawn(|| qmp.execute_with_timeout("x-big", Some(big), Duration::from_secs(60)));
        started
            .recv_timeout(Duration::from_secs(10))
            .expect("the big command reaches the server");
        let queued =
            timed(|| qmp.execute_with_timeout("query-status", None, Duration::from_millis(300)));
        // Nothing of the queued call was written: the stream is still in sync.
        let connected = qmp.is_connected();
        // Ends the stuck write.
        qmp.close();
        let out = (big_call.join().unwrap(), queued, connected);
        drop(done);
        out
    });
    match queued_result {
        Err(Error::Timeout { what, after }) => {
            assert!(what.contains("query-status"), "{what}");
            assert_eq!(after, Duration::from_millis(300));
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    // 300 ms, give or take a busy machine: not the stuck write's 60 s or the socket's 5 s.
    assert!(queued_took < Duration::from_secs(4), "took {queued_took:?}");
    assert!(
        connected,
        "a call that wrote nothing must not close the connection"
    );
    // The write that close() broke reports the close, not the broken pipe.
    match big_result {
        Err(Error::Disconnected { reason }) => {
            assert!(reason.contains("closed by the client"), "{reason}")
        }
        other => panic!("expected disconnected by close, got {other:?}"),
    }
    let _ = release.send(());
    server.finish();
}

#[test]
fn server_silent_before_greeting_times_out() {
    let server = FakeServer::unix(|mut peer| peer.drain());
    let opts = ConnectOptions {
        greeting_timeout: Duration::from_millis(300),
        ..options()
    };
    match Qmp::connect(&server.endpoint(), opts) {
        Err(Error::Timeout { what, .. }) => assert!(what.contains("greeting"), "{what}"),
        other => panic!("expected a greeting timeout, got {other:?}"),
    }
    server.finish();
}

#[test]
fn server_closing_during_greeting_is_greeting_missing() {
    let half = FakeServer::unix(|mut peer| peer.send_raw(&GREETING.as_bytes()[..40]));
    match Qmp::connect(&half.endpoint(), options()) {
        Err(Error::Protocol(ProtocolError::GreetingMissing { detail })) => {
            assert!(detail.contains("40 bytes"), "{detail}")
        }
        other => panic!("expected greeting-missing, got {other:?}"),
    }
    half.finish();

    let nothing = FakeServer::unix(drop);
    let result = Qmp::connect(&nothing.endpoint(), options());
    assert!(
        matches!(
            result,
            Err(Error::Protocol(ProtocolError::GreetingMissing { .. }))
        ),
        "got {result:?}"
    );
    nothing.finish();
}

#[test]
fn server_closing_during_negotiation_is_reported() {
    let server = FakeServer::unix(|mut peer| {
        peer.send(GREETING);
        peer.recv();
    });
    let result = Qmp::connect(&server.endpoint(), options());
    assert!(
        matches!(
            result,
            Err(Error::Protocol(ProtocolError::GreetingMissing { .. }))
        ),
        "got {result:?}"
    );
    server.finish();
}

#[test]
fn disconnect_fails_every_pending_call_at_once() {
    let server = FakeServer::unix(|mut peer| {
        peer.negotiate();
        for _ in 0..3 {
            peer.recv().unwrap();
        }
        // Hang up with three calls pending.
    });
    let qmp = connect(&server);
    std::thread::scope(|s| {
        let calls: Vec<_> = (0..3)
            .map(|i| {
                let qmp = &qmp;
                s.spawn(move || {
                    qmp.execute_with_timeout(&format!("c{i}"), None, Duration::from_secs(60))
                })
            })
            .collect();
        for call in calls {
            assert_disconnected(call.join().unwrap());
        }
    });
    assert_disconnected(qmp.execute("query-status", None));
    let mut events = qmp.subscribe(EventFilter::All);
    assert!(matches!(
        events.wait_for_event("STOP", |_| true, Duration::from_secs(60)),
        Err(Error::Disconnected { .. })
    ));
    server.finish();
}

#[test]
fn events_during_a_call_are_queued_typed_and_filtered() {
    let server = FakeServer::unix(|mut peer| {
        peer.negotiate();
        let req = peer.recv().unwrap();
        let ts = r#""timestamp": {"seconds": 1700000000, "microseconds": 5}"#;
        peer.send(&format!(r#"{{"event": "STOP", {ts}}}"#));
        peer.send(&format!(
            r#"{{"event": "FUTURE_EVENT", "data": {{"x": [1, 2]}}, {ts}}}"#
        ));
        peer.send(&format!(
            r#"{{"event": "DEVICE_DELETED", "data": {{"device": "n0", "path": "/machine/peripheral/n0", "new-field": 1}}, {ts}}}"#
        ));
        peer.send(&format!(
            r#"{{"event": "MIGRATION", "data": {{"status": "quantum-tunnel"}}, {ts}}}"#
        ));
        peer.send(&format!(r#"{{"event": "RESUME", {ts}}}"#));
        peer.reply(&req, json!({}));
        peer.drain();
    });
    let qmp = connect(&server);
    let mut run_state = qmp.subscribe(EventFilter::names(&["STOP", "RESUME"]));
    qmp.execute("stop", None).unwrap();

    // Waiting for RESUME keeps the earlier STOP queued for the next wait.
    let resume = run_state
        .wait_for_event("RESUME", |_| true, Duration::from_secs(5))
        .unwrap();
    assert_eq!(resume.kind(), EventKind::Resume);
    let stop = run_state
        .wait_for_event("STOP", |_| true, Duration::from_secs(5))
        .unwrap();
    assert_eq!(stop.kind(), EventKind::Stop);
    assert_eq!(stop.timestamp.unwrap().seconds, 1_700_000_000);
    // The filter kept everything else out.
    assert!(run_state.try_next().is_none());

    // The connection's own queue saw all five, in order.
    let deleted = qmp
        .wait_for_event(
            "DEVICE_DELETED",
            |e| e.data["device"] == "n0",
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(
        deleted.kind(),
        EventKind::DeviceDeleted {
            device: Some("n0".into()),
            path: "/machine/peripheral/n0".into()
        }
    );
    let future = qmp
        .wait_for_event("FUTURE_EVENT", |_| true, Duration::from_secs(5))
        .unwrap();
    assert_eq!(
        future.kind(),
        EventKind::Other {
            name: "FUTURE_EVENT".into(),
            data: json!({"x": [1, 2]})
        }
    );
    let migration = qmp
        .wait_for_event("MIGRATION", |_| true, Duration::from_secs(5))
        .unwrap();
    assert_eq!(
        migration.kind(),
        EventKind::Migration {
            status: MigrationStatus::Other("quantum-tunnel".into())
        }
    );
    // A predicate that never matches ends in a timeout, not a hang.
    let none = qmp.wait_for_event(
        "STOP",
        |e| e.data["never"] == true,
        Duration::from_millis(200),
    );
    assert!(matches!(none, Err(Error::Timeout { .. })), "got {none:?}");
    drop(qmp);
    server.finish();
}

#[test]
fn waits_on_the_connection_queue_do_not_block_each_other() {
    // `emit` sends the event named in its arguments, then replies.
    let server = FakeServer::unix(|mut peer| {
        peer.negotiate();
        while let Some(req) = peer.recv() {
            assert_eq!(req["execute"], "emit");
            let name = req["arguments"]["event"].as_str().unwrap().to_owned();
            peer.send(&json!({ "event": name }).to_string());
            peer.reply(&req, json!({}));
        }
    });
    let qmp = connect(&server);
    let emit = |name: &str| {
        qmp.execute("emit", Some(json!({ "event": name }))).unwrap();
    };
    std::thread::scope(|s| {
        let done = watchdog(s, &qmp, Duration::from_secs(20));
        let late = s.spawn(|| {
            let result = qmp.wait_for_event("LATE", |_| true, Duration::from_secs(5));
            (result, Instant::now())
        });
        // Let it start waiting (the outcome must be the same if it has not yet).
        std::thread::sleep(Duration::from_millis(200));
        emit("NOW");
        let now = s.spawn(|| timed(|| qmp.wait_for_event("NOW", |_| true, Duration::from_secs(5))));
        let dropped = s.spawn(|| timed(|| qmp.default_queue_dropped()));
        let (now, now_took) = now.join().unwrap();
        let (dropped, dropped_took) = dropped.join().unwrap();
        assert_eq!(now.unwrap().name, "NOW");
        assert_eq!(dropped, 0);
        // Their event had arrived (or there was nothing to wait for): not the other
        // waiter's 5 s.
        assert!(now_took < Duration::from_secs(2), "took {now_took:?}");
        assert!(
            dropped_took < Duration::from_secs(2),
            "took {dropped_took:?}"
        );

        let emitted = Instant::now();
        emit("LATE");
        let (late, returned) = late.join().unwrap();
        assert_eq!(late.unwrap().name, "LATE");
        let late_took = returned.saturating_duration_since(emitted);
        assert!(late_took < Duration::from_secs(2), "took {late_took:?}");
        drop(done);
    });
    drop(qmp);
    server.finish();
}

#[test]
fn two_waiters_for_the_same_event_each_take_one() {
    let server = FakeServer::unix(|mut peer| {
        peer.negotiate();
        let req = peer.recv().unwrap();
        for n in 0..2 {
            peer.send(&json!({"event": "MIGRATION_PASS", "data": {"pass": n}}).to_string());
        }
        peer.reply(&req, json!({}));
        peer.drain();
    });
    let qmp = connect(&server);
    let passes: Vec<u64> = std::thread::scope(|s| {
        let done = watchdog(s, &qmp, Duration::from_secs(20));
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                s.spawn(|| qmp.wait_for_event("MIGRATION_PASS", |_| true, Duration::from_secs(5)))
            })
            .collect();
        qmp.execute("x", None).unwrap();
        let mut passes: Vec<u64> = waiters
            .into_iter()
            .map(|w| w.join().unwrap().unwrap().data["pass"].as_u64().unwrap())
            .collect();
        passes.sort_unstable();
        drop(done);
        passes
    });
    assert_eq!(passes, [0, 1]);
    // Both were taken: nothing is left for a third wait.
    let third = qmp.wait_for_event("MIGRATION_PASS", |_| true, Duration::from_millis(100));
    assert!(matches!(third, Err(Error::Timeout { .. })), "got {third:?}");
    drop(qmp);
    server.finish();
}

#[test]
fn event_wait_predicate_may_call_into_the_connection() {
    let server = FakeServer::unix(|mut peer| {
        peer.negotiate();
        let req = peer.recv().unwrap();
        peer.send(r#"{"event": "STOP"}"#);
        peer.reply(&req, json!({}));
        // The predicate's own call.
        let req = peer.recv().unwrap();
        peer.reply(&req, json!({"running": false, "status": "paused"}));
        peer.drain();
    });
    let qmp = connect(&server);
    qmp.execute("stop", None).unwrap();
    let stop = qmp
        .wait_for_event(
            "STOP",
            |_| !qmp.query_status().unwrap().running,
            Duration::from_secs(5),
        )
        .unwrap();
    assert_eq!(stop.kind(), EventKind::Stop);
    drop(qmp);
    server.finish();
}

#[test]
fn slow_subscriber_loses_oldest_events_and_counts_them() {
    let server = FakeServer::unix(|mut peer| {
        peer.negotiate();
        let req = peer.recv().unwrap();
        for pass in 1..=10 {
            peer.send(&json!({"event": "MIGRATION_PASS", "data": {"pass": pass}}).to_string());
        }
        peer.reply(&req, json!({}));
        peer.drain();
    });
    let opts = ConnectOptions {
        event_queue_capacity: 4,
        ..options()
    };
    let qmp = Qmp::connect(&server.endpoint(), opts).unwrap();
    let mut passes = qmp.subscribe(EventFilter::names(&["MIGRATION_PASS"]));
    qmp.execute("x", None).unwrap();
    let got: Vec<EventKind> = std::iter::from_fn(|| passes.try_next())
        .map(|e| e.kind())
        .collect();
    let expected: Vec<EventKind> = (7..=10)
        .map(|pass| EventKind::MigrationPass { pass })
        .collect();
    assert_eq!(got, expected);
    assert_eq!(passes.dropped(), 6);
    drop(qmp);
    server.finish();
}

#[test]
fn migration_wait_reports_progress_and_final_stats() {
    let server = FakeServer::unix(|mut peer| {
        peer.negotiate();
        let replies = [
            json!({"status": "setup"}),
            json!({"status": "active", "total-time": 50, "expected-downtime": 300,
                   "ram": {"transferred": 1000, "remaining": 9000, "total": 10000, "mbps": 80.5,
                           "dirty-sync-count": 1, "a-future-counter": 3}}),
            json!({"status": "completed", "total-time": 120, "downtime": 12, "setup-time": 3,
                   "ram": {"transferred": 11000, "remaining": 0, "total": 10000, "duplicate": 2,
                           "normal": 3, "normal-bytes": 12288, "dirty-pages-rate": 0, "mbps": 90.0,
                           "dirty-sync-count": 4}}),
        ];
        for reply in replies {
            let req = peer.recv().unwrap();
            assert_eq!(req["execute"], "query-migrate");
            peer.reply(&req, reply);
        }
        peer.drain();
    });
    let qmp = connect(&server);
    let mut seen = Vec::new();
    let wait = MigrationWait {
        poll_interval: Duration::from_millis(10),
        ..MigrationWait::default()
    };
    let done = wait_for_migration(&qmp, &wait, |info| seen.push(info.status())).unwrap();
    assert_eq!(
        seen,
        [
            MigrationStatus::Setup,
            MigrationStatus::Active,
            MigrationStatus::Completed
        ]
    );
    assert_eq!(done.downtime, Some(12));
    assert_eq!(done.total_time, Some(120));
    let ram = done.ram.unwrap();
    assert_eq!(
        (
            ram.transferred,
            ram.remaining,
            ram.normal_bytes,
            ram.dirty_sync_count
        ),
        (11000, 0, 12288, 4)
    );
    drop(qmp);
    server.finish();
}

#[test]
fn migration_wait_surfaces_failure_description() {
    let server = FakeServer::unix(|mut peer| {
        peer.negotiate();
        let req = peer.recv().unwrap();
        peer.reply(
            &req,
            json!({"status": "failed", "error-desc": "Unable to write to socket: Broken pipe"}),
        );
        peer.drain();
    });
    let qmp = connect(&server);
    match wait_for_migration(&qmp, &MigrationWait::default(), |_| {}) {
        Err(Error::MigrationFailed { status, desc }) => {
            assert_eq!(status, MigrationStatus::Failed);
            assert!(desc.contains("Broken pipe"));
        }
        other => panic!("expected a failed migration, got {other:?}"),
    }
    drop(qmp);
    server.finish();
}

#[test]
fn typed_reply_of_wrong_shape_is_a_decode_error() {
    let server = FakeServer::unix(|mut peer| {
        peer.negotiate();
        let req = peer.recv().unwrap();
        peer.reply(&req, json!({"running": "yes"}));
        peer.drain();
    });
    let qmp = connect(&server);
    let result = qmp.query_status();
    assert!(
        matches!(&result, Err(Error::Decode { command, .. }) if command == "query-status"),
        "got {result:?}"
    );
    drop(qmp);
    server.finish();
}

#[test]
fn decode_error_message_gives_the_reason_once() {
    let server = FakeServer::unix(|mut peer| {
        peer.negotiate();
        let req = peer.recv().unwrap();
        peer.reply(&req, json!({"running": "yes"}));
        peer.drain();
    });
    let qmp = connect(&server);
    let err = qmp.query_status().unwrap_err();
    let message = err.to_string();
    assert!(
        message.starts_with("unexpected reply to query-status: "),
        "{message}"
    );
    assert!(message.contains("expected a boolean"), "{message}");
    // The way the workspace prints errors (message, then each source) says it once.
    let mut chain = message.clone();
    let mut source = err.source();
    while let Some(s) = source {
        chain.push_str(&format!(": {s}"));
        source = s.source();
    }
    assert_eq!(chain.matches("expected a boolean").count(), 1, "{chain}");
    drop(qmp);
    server.finish();
}

#[test]
fn tcp_endpoint_works() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let handle = std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let reader: Box<dyn std::io::Read + Send> = Box::new(stream.try_clone().unwrap());
        let mut peer = Peer {
            reader: BufReader::new(reader),
            writer: Box::new(stream),
            socket: None,
        };
        peer.negotiate();
        let req = peer.recv().unwrap();
        peer.reply(
            &req,
            json!({"qemu": {"major": 10, "minor": 0, "micro": 2}, "package": ""}),
        );
        peer.drain();
    });
    let qmp = Qmp::connect(&Endpoint::Tcp(addr.to_string()), options()).unwrap();
    assert_eq!(qmp.query_version().unwrap().qemu.minor, 0);
    drop(qmp);
    handle.join().unwrap();
}

#[test]
fn connecting_to_nothing_is_an_io_error() {
    let path = std::env::temp_dir().join(format!("qmp-absent-{}.sock", std::process::id()));
    let result = Qmp::connect_unix(&path);
    assert!(matches!(result, Err(Error::Io { .. })), "got {result:?}");
}

/// A write that finds QEMU gone ends the connection for the caller at once, even while the
/// reader has not seen the end of the stream: a caller that reconnects when `is_connected()`
/// is false (the controller's rollback does) must not keep using a dead monitor.
#[test]
fn a_write_that_finds_qemu_gone_ends_the_connection() {
    let (stopped, stop) = mpsc::channel::<()>();
    let (release, released) = mpsc::channel::<()>();
    let server = FakeServer::unix(move |mut peer| {
        peer.negotiate();
        peer.stop_reading();
        stopped.send(()).unwrap();
        // Keep the socket open (no end of stream for the reader) until the test is done.
        let _ = released.recv_timeout(Duration::from_secs(20));
    });
    let qmp = connect(&server);
    stop.recv().unwrap();
    assert_disconnected(qmp.execute("query-status", None));
    assert!(!qmp.is_connected(), "a dead connection looks alive");
    assert_disconnected(qmp.execute("query-status", None));
    release.send(()).unwrap();
    drop(qmp);
    server.finish();
}
