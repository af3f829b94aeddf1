//! The connection: socket, greeting and capability negotiation, the reader thread, and
//! matching replies to calls by id.
//!
//! The reader thread owns the read half of the socket. Each call registers a one-shot channel
//! under a fresh id before its request is written; the reader routes `return`/`error` replies
//! by id and events to subscriptions. When the stream ends or breaks, the reader fails every
//! pending call at once and marks the connection dead, so later calls fail without I/O.
//!
//! Writes: one call at a time holds the [`WriteGate`] and writes its whole request, bounded
//! by the call's deadline (the socket's send timeout is set to the time left before every
//! write). A call waiting for the gate gives up at its own deadline. A write that stops part
//! way leaves a half-sent request in the stream, so the connection is then closed.
//!
//! Whoever ends the connection records why ([`Shared::fail_all`]) *before* shutting the socket
//! down, so the reason, not the reader's view of the shutdown, is what every later call sees.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::{Error, ProtocolError, Result};
use crate::events::{Event, EventFilter, EventQueue, SubscriberSlot, Subscription, deadline_after};
use crate::framing::LineReader;
use crate::types::{ErrorClass, QmpCapability, VersionInfo};

/// Where QEMU's QMP monitor listens.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// A unix socket path (`-qmp unix:PATH,server=on,wait=off`).
    Unix(PathBuf),
    /// A TCP address, `host:port` (`-qmp tcp:HOST:PORT,server=on,wait=off`).
    Tcp(String),
    /// A TCP address, `host:port`, of a monitor on QEMU's TLS chardev (`-chardev
    /// socket,id=ID,host=HOST,port=PORT,server=on,wait=off,tls-creds=CREDS -mon
    /// chardev=ID,mode=control`); needs [`ConnectOptions::tls`].
    Tls(String),
}

/// `unix:PATH` or `tcp:HOST:PORT`, as QEMU's `-qmp` takes it; `tls:HOST:PORT` for a TLS
/// chardev.
impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Tls(a) => write!(f, "tls:{a}"),
        }
    }
}

/// TLS for [`Endpoint::Tls`]: the client side of QEMU's `tls-creds-x509` chardev.
#[derive(Debug, Clone)]
pub struct TlsClient {
    /// The CA the monitor's certificate must lead to, and our certificate (which QEMU checks
    /// when its credentials say `verify-peer=on`).
    pub config: Arc<rustls::ClientConfig>,
    /// The name the monitor's certificate must carry; `None`: the endpoint's host.
    pub server_name: Option<String>,
}

/// Connection settings. `Default` suits a local QEMU.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// How long to wait for the greeting and the `qmp_capabilities` reply.
    pub greeting_timeout: Duration,
    /// Timeout of calls made without an explicit one. A call's timeout bounds all its waiting:
    /// for its turn to write, for QEMU to read the request and for the reply.
    pub command_timeout: Duration,
    /// Longest message accepted, in bytes; a longer one is a protocol error.
    pub max_line_len: usize,
    /// Events each subscription queues before the oldest is discarded (and counted).
    pub event_queue_capacity: usize,
    /// Enable the `oob` capability when QEMU offers it.
    pub enable_oob: bool,
    /// TLS settings, needed for [`Endpoint::Tls`].
    pub tls: Option<TlsClient>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            greeting_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(30),
            max_line_len: 1 << 20,
            event_queue_capacity: 1024,
            enable_oob: true,
            tls: None,
        }
    }
}

/// What QEMU announced when the connection opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    /// QEMU's version.
    pub version: VersionInfo,
    /// Capabilities QEMU offered.
    pub capabilities: Vec<QmpCapability>,
}

#[derive(Deserialize)]
struct GreetingMessage {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Deserialize)]
struct GreetingBody {
    version: VersionInfo,
    #[serde(default)]
    capabilities: Vec<QmpCapability>,
}

/// Connects to the unix socket at `path` within `timeout`. A listener whose backlog is full
/// (QEMU's monitor queues one client while it serves another) makes a blocking `connect`
/// wait without end; a non-blocking one says `EAGAIN`, retried until the timeout (`TimedOut`).
fn connect_unix(path: &std::path::Path, timeout: Duration) -> io::Result<UnixStream> {
    use nix::errno::Errno;
    use nix::sys::socket::{AddressFamily, SockFlag, SockType, UnixAddr, connect, socket};
    use std::os::fd::AsRawFd;
    let deadline = Instant::now() + timeout;
    let addr = UnixAddr::new(path).map_err(io::Error::from)?;
    loop {
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        match connect(fd.as_raw_fd(), &addr) {
            Ok(()) => {
                let stream = UnixStream::from(fd);
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(Errno::EAGAIN) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(Errno::EAGAIN) => {
                return Err(io::Error::new(
                    ErrorKind::TimedOut,
                    "the socket's backlog stayed full",
                ));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// The socket, unix or TCP, or TCP inside a TLS session.
#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
    Tls(TcpStream, Arc<Mutex<rustls::ClientConnection>>),
}

fn connect_tcp(addr: &str, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(ErrorKind::InvalidInput, "address resolves to nothing");
    for sock in addr.to_socket_addrs()? {
        match TcpStream::connect_timeout(&sock, timeout) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Runs the TLS handshake on `socket` within `timeout` (the socket's timeouts bound each step).
fn tls_handshake(
    socket: &TcpStream,
    addr: &str,
    tls: &TlsClient,
    timeout: Duration,
) -> io::Result<rustls::ClientConnection> {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    let name = tls.server_name.clone().unwrap_or_else(|| {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned()
    });
    let name = rustls::pki_types::ServerName::try_from(name)
        .map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?;
    let mut conn = rustls::ClientConnection::new(tls.config.clone(), name)
        .map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))?;
    socket.set_read_timeout(Some(timeout))?;
    socket.set_write_timeout(Some(timeout))?;
    while conn.is_handshaking() {
        conn.complete_io(&mut &*socket)?;
    }
    Ok(conn)
}

impl Stream {
    fn connect(
        endpoint: &Endpoint,
        timeout: Duration,
        tls: Option<&TlsClient>,
    ) -> io::Result<Self> {
        match endpoint {
            Endpoint::Unix(path) => connect_unix(path, timeout).map(Self::Unix),
            Endpoint::Tcp(addr) => connect_tcp(addr, timeout).map(Self::Tcp),
            Endpoint::Tls(addr) => {
                let tls = tls.ok_or_else(|| {
                    io::Error::new(
                        ErrorKind::InvalidInput,
                        "a tls: endpoint needs TLS settings (ConnectOptions::tls)",
                    )
                })?;
                let socket = connect_tcp(addr, timeout)?;
                let session = tls_handshake(&socket, addr, tls, timeout)?;
                Ok(Self::Tls(socket, Arc::new(Mutex::new(session))))
            }
        }
    }

    fn try_clone(&self) -> io::Result<Self> {
        match self {
            Self::Unix(s) => s.try_clone().map(Self::Unix),
            Self::Tcp(s) => s.try_clone().map(Self::Tcp),
            Self::Tls(s, session) => Ok(Self::Tls(s.try_clone()?, session.clone())),
        }
    }

    fn shutdown(&self) {
        // Errors only mean the socket is already gone, which is the goal.
        let _ = match self {
            Self::Unix(s) => s.shutdown(Shutdown::Both),
            Self::Tcp(s) | Self::Tls(s, _) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Unix(s) => s.set_read_timeout(t),
            Self::Tcp(s) | Self::Tls(s, _) => s.set_read_timeout(t),
        }
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Unix(s) => s.set_write_timeout(t),
            Self::Tcp(s) | Self::Tls(s, _) => s.set_write_timeout(t),
        }
    }

    /// One `write` of raw bytes (ciphertext, for TLS) through a shared reference (`Write` is
    /// implemented for `&UnixStream` and `&TcpStream`; the [`WriteGate`] makes the writing
    /// exclusive).
    fn send(&self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => (&mut &*s).write(buf),
            Self::Tcp(s) | Self::Tls(s, _) => (&mut &*s).write(buf),
        }
    }

    /// Writes all of `bytes` unless `deadline` passes first: the send timeout is set to the
    /// time left before each `write`, so a peer that stops reading cannot hold the caller
    /// longer. On failure, also says how many bytes went out (for TLS: at least 1 once any
    /// record was sealed, since its sequence number is spent and the stream must close).
    fn write_all_before(
        &self,
        bytes: &[u8],
        deadline: Instant,
    ) -> std::result::Result<(), (usize, io::Error)> {
        let Self::Tls(_, session) = self else {
            return self.write_raw_before(bytes, deadline);
        };
        if Instant::now() >= deadline {
            return Err((0, ErrorKind::TimedOut.into()));
        }
        let sealed = {
            let mut session = session.lock().unwrap_or_else(PoisonError::into_inner);
            let mut out = Vec::with_capacity(bytes.len() + 64);
            let sealed = session.writer().write_all(bytes).and_then(|()| {
                while session.wants_write() {
                    session.write_tls(&mut out)?;
                }
                Ok(())
            });
            sealed.map(|()| out)
        };
        let sealed = sealed.map_err(|e| (1, e))?;
        self.write_raw_before(&sealed, deadline)
            .map_err(|(sent, e)| ((sent * bytes.len() / sealed.len()).max(1), e))
    }

    fn write_raw_before(
        &self,
        bytes: &[u8],
        deadline: Instant,
    ) -> std::result::Result<(), (usize, io::Error)> {
        let mut sent = 0;
        while sent < bytes.len() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return Err((sent, ErrorKind::TimedOut.into()));
            }
            self.set_write_timeout(Some(remaining))
                .map_err(|e| (sent, e))?;
            match self.send(&bytes[sent..]) {
                Ok(0) => return Err((sent, ErrorKind::WriteZero.into())),
                Ok(n) => sent += n,
                // A timeout may fire a little early; the deadline check above decides.
                Err(e) if e.kind() == ErrorKind::Interrupted || is_timeout(&e) => {}
                Err(e) => return Err((sent, e)),
            }
        }
        Ok(())
    }
}

/// The right to write to the socket, one call at a time, taken with a deadline (a plain
/// mutex would queue every caller behind a write that QEMU does not read).
#[derive(Default)]
struct WriteGate {
    busy: Mutex<bool>,
    freed: Condvar,
}

/// A call's turn to write; the gate opens again when it is dropped.
struct WriteTurn<'a>(&'a WriteGate);

impl WriteGate {
    fn lock(&self) -> MutexGuard<'_, bool> {
        self.busy.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for the turn to write until `deadline`; `None` if it did not come in time.
    fn enter(&self, deadline: Instant) -> Option<WriteTurn<'_>> {
        let mut busy = self.lock();
        loop {
            if !*busy {
                *busy = true;
                return Some(WriteTurn(self));
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                return None;
            }
            busy = self
                .freed
                .wait_timeout(busy, remaining)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }
}

impl Drop for WriteTurn<'_> {
    fn drop(&mut self) {
        *self.0.lock() = false;
        // Every waiter re-checks; one whose deadline passed must not swallow the wake-up.
        self.0.freed.notify_all();
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
            Self::Tls(s, session) => tls_read(s, session, buf),
        }
    }
}

/// Plaintext from a TLS session. The socket is read without holding the session, so a
/// writer never waits behind the reader thread's blocking read.
fn tls_read(
    socket: &TcpStream,
    session: &Mutex<rustls::ClientConnection>,
    buf: &mut [u8],
) -> io::Result<usize> {
    let lock = || session.lock().unwrap_or_else(PoisonError::into_inner);
    let mut raw = [0u8; 16 << 10];
    loop {
        match lock().reader().read(buf) {
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            r => return r,
        }
        let n = (&mut &*socket).read(&mut raw)?;
        let mut session = lock();
        let mut rest = &raw[..n];
        loop {
            // At the end of the stream rustls learns it (a clean close or a truncation).
            session.read_tls(&mut rest)?;
            session
                .process_new_packets()
                .map_err(|e| io::Error::new(ErrorKind::InvalidData, e))?;
            if rest.is_empty() {
                break;
            }
        }
    }
}

/// Why the connection ended.
#[derive(Debug, Clone)]
enum Fatal {
    Closed,
    Eof,
    Io(String),
    Protocol(ProtocolError),
    /// A request was only partly written before its call's deadline: the rest of the stream
    /// would be misread, so the client closed the connection.
    WriteTimedOut {
        command: String,
        after: Duration,
        sent: usize,
        len: usize,
    },
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Closed => f.write_str("connection closed by the client"),
            Self::Eof => f.write_str("QEMU closed the connection"),
            Self::Io(e) => write!(f, "socket error: {e}"),
            Self::Protocol(p) => write!(f, "protocol error: {p}"),
            Self::WriteTimedOut {
                command,
                after,
                sent,
                len,
            } => write!(
                f,
                "write of command {command} timed out after {after:?} ({sent} of {len} bytes \
                 sent: QEMU stopped reading); the client closed the connection, whose stream \
                 held a half-written command"
            ),
        }
    }
}

impl Fatal {
    /// The error a call pending at the moment of failure gets.
    fn pending_error(&self) -> Error {
        match self {
            Self::Protocol(p) => Error::Protocol(p.clone()),
            other => Error::Disconnected {
                reason: other.to_string(),
            },
        }
    }
}

/// A call waiting for its reply.
struct Pending {
    /// The command, named in a QMP error reply.
    command: String,
    reply: Sender<Result<Value>>,
}

/// A reply as QEMU sent it, before it is matched to a call.
enum Reply {
    Return(Value),
    Error { class: ErrorClass, desc: String },
}

#[derive(Default)]
struct State {
    pending: HashMap<u64, Pending>,
    subscribers: Vec<SubscriberSlot>,
    dead: Option<Fatal>,
}

/// State shared by the client, its reader thread and its subscriptions.
pub(crate) struct Shared {
    state: Mutex<State>,
    closing: AtomicBool,
    /// A write found QEMU gone before the reader did: the connection is over, though the
    /// reader may still deliver replies QEMU sent before it hung up.
    hung_up: AtomicBool,
    unmatched: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic elsewhere must not take the connection down with it: the state stays valid.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Why the connection is dead (or a generic note if it is not).
    pub(crate) fn disconnect_reason(&self) -> String {
        self.lock()
            .dead
            .as_ref()
            .map_or_else(|| "connection closed".to_owned(), Fatal::to_string)
    }

    /// The error of a call that finds the connection dead, if it is.
    fn dead_error(&self) -> Option<Error> {
        self.lock().dead.as_ref().map(|fatal| Error::Disconnected {
            reason: fatal.to_string(),
        })
    }

    /// Marks the connection dead and fails everything waiting on it. The first cause wins.
    /// Call it *before* shutting the socket down, or the reader's view of the shutdown wins.
    fn fail_all(&self, fatal: Fatal) {
        let mut state = self.lock();
        if state.dead.is_some() {
            return;
        }
        log::debug!("QMP connection ended: {fatal}");
        for (_, waiter) in state.pending.drain() {
            let _ = waiter.reply.send(Err(fatal.pending_error()));
        }
        // Dropping the senders wakes every subscription with "disconnected".
        state.subscribers.clear();
        state.dead = Some(fatal);
    }

    fn dispatch_event(&self, event: Event) {
        self.lock().subscribers.retain(|slot| slot.deliver(&event));
    }

    fn route_reply(
        &self,
        id: Option<&Value>,
        reply: Reply,
    ) -> std::result::Result<(), ProtocolError> {
        let waiter = id
            .and_then(Value::as_u64)
            .and_then(|id| self.lock().pending.remove(&id));
        match (waiter, id, reply) {
            (Some(waiter), _, reply) => {
                let result = match reply {
                    Reply::Return(value) => Ok(value),
                    Reply::Error { class, desc } => Err(Error::Qmp {
                        command: waiter.command,
                        class,
                        desc,
                    }),
                };
                // The caller may have timed out and gone; its reply is then dropped.
                let _ = waiter.reply.send(result);
                Ok(())
            }
            (None, None, Reply::Error { class, desc }) => {
                Err(ProtocolError::ErrorWithoutId { class, desc })
            }
            (None, id, _) => {
                let n = self.unmatched.fetch_add(1, Ordering::Relaxed) + 1;
                log::warn!("dropping QMP reply with unknown id {id:?} ({n} so far)");
                Ok(())
            }
        }
    }

    /// Handles one line from QEMU; an `Err` is fatal for the connection.
    fn handle_line(&self, line: &[u8]) -> std::result::Result<(), ProtocolError> {
        if line.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let mut message = parse_object(line)?;
        if let Some(Value::String(name)) = message.remove("event") {
            self.dispatch_event(Event::from_message(name, &mut message));
            return Ok(());
        }
        let id = message.remove("id");
        if let Some(value) = message.remove("return") {
            return self.route_reply(id.as_ref(), Reply::Return(value));
        }
        if let Some(error) = message.remove("error") {
            let (class, desc) = error_parts(&error);
            return self.route_reply(id.as_ref(), Reply::Error { class, desc });
        }
        // Something a newer QEMU may send that this client does not know: not fatal.
        log::warn!(
            "ignoring unknown QMP message: {}",
            String::from_utf8_lossy(line)
        );
        Ok(())
    }
}

fn parse_object(line: &[u8]) -> std::result::Result<Map<String, Value>, ProtocolError> {
    match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(other) => Err(ProtocolError::MalformedJson {
            detail: format!("expected an object, got {}", kind_of(&other)),
        }),
        Err(e) => Err(ProtocolError::MalformedJson {
            detail: e.to_string(),
        }),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// QEMU's error class and description from an `error` member.
fn error_parts(error: &Value) -> (ErrorClass, String) {
    let text = |key: &str| error.get(key).and_then(Value::as_str).unwrap_or_default();
    (ErrorClass::from(text("class")), text("desc").to_owned())
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::BrokenPipe
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::NotConnected
            | ErrorKind::UnexpectedEof
    )
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// A QMP client connection. Calls may be made from several threads at once.
pub struct Qmp {
    shared: Arc<Shared>,
    /// Written only by the holder of `gate`'s turn.
    writer: Stream,
    gate: WriteGate,
    control: Stream,
    greeting: Greeting,
    oob: bool,
    next_id: AtomicU64,
    options: ConnectOptions,
    default_events: Arc<EventQueue>,
    reader: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Qmp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qmp")
            .field("greeting", &self.greeting)
            .field("oob", &self.oob)
            .field("connected", &self.is_connected())
            .finish()
    }
}

impl Qmp {
    /// Connects to a unix socket with default options.
    pub fn connect_unix(path: impl AsRef<Path>) -> Result<Self> {
        Self::connect(
            &Endpoint::Unix(path.as_ref().to_owned()),
            ConnectOptions::default(),
        )
    }

    /// Connects to a TCP address (`host:port`) with default options.
    pub fn connect_tcp(addr: &str) -> Result<Self> {
        Self::connect(&Endpoint::Tcp(addr.to_owned()), ConnectOptions::default())
    }

    /// Connects, reads the greeting and negotiates capabilities (`oob` when offered and
    /// enabled in `options`).
    pub fn connect(endpoint: &Endpoint, options: ConnectOptions) -> Result<Self> {
        let io = |context| move |source| Error::Io { context, source };
        let stream = match Stream::connect(endpoint, options.greeting_timeout, options.tls.as_ref())
        {
            Ok(s) => s,
            // A unix socket that listens but takes no one (a full backlog): as a missing
            // greeting. (A TCP connect that times out may be a host that is gone: an I/O error.)
            Err(e) if e.kind() == ErrorKind::TimedOut && matches!(endpoint, Endpoint::Unix(_)) => {
                return Err(Error::Timeout {
                    what: "QEMU to accept the connection".to_owned(),
                    after: options.greeting_timeout,
                });
            }
            Err(e) => return Err(io("connecting to the QMP socket")(e)),
        };
        let control = stream.try_clone().map_err(io("cloning the QMP socket"))?;
        let mut reader = LineReader::new(
            stream.try_clone().map_err(io("cloning the QMP socket"))?,
            options.max_line_len,
        );
        let deadline = deadline_after(options.greeting_timeout);

        let greeting = read_greeting(&mut reader, &stream, deadline, options.greeting_timeout)?;
        let oob = options.enable_oob && greeting.capabilities.contains(&QmpCapability::Oob);
        let writer = stream;
        let enable = if oob { json!(["oob"]) } else { json!([]) };
        let negotiate =
            json!({"execute": "qmp_capabilities", "arguments": {"enable": enable}, "id": 0});
        match writer.write_all_before(&encode(&negotiate), deadline) {
            Ok(()) => {}
            Err((_, source)) if is_timeout(&source) => {
                return Err(Error::Timeout {
                    what: "QEMU to accept qmp_capabilities".to_owned(),
                    after: options.greeting_timeout,
                });
            }
            Err((_, source)) => return Err(io("negotiating QMP capabilities")(source)),
        }
        read_negotiation_reply(&mut reader, &writer, deadline, options.greeting_timeout)?;
        writer
            .set_read_timeout(None)
            .map_err(io("configuring the QMP socket"))?;

        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            closing: AtomicBool::new(false),
            hung_up: AtomicBool::new(false),
            unmatched: AtomicU64::new(0),
        });
        let (default_events, slot) = EventQueue::new(options.event_queue_capacity);
        shared.lock().subscribers.push(slot);
        let reader_control = control.try_clone().map_err(io("cloning the QMP socket"))?;
        let reader_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || reader_loop(reader, &reader_shared, &reader_control))
            .map_err(io("spawning the QMP reader thread"))?;
        Ok(Self {
            shared,
            writer,
            gate: WriteGate::default(),
            control,
            greeting,
            oob,
            next_id: AtomicU64::new(1),
            options,
            default_events,
            reader: Mutex::new(Some(handle)),
        })
    }

    /// The greeting QEMU sent.
    pub fn greeting(&self) -> &Greeting {
        &self.greeting
    }

    /// True when the `oob` capability was negotiated.
    pub fn oob_enabled(&self) -> bool {
        self.oob
    }

    /// The options this connection was made with.
    pub fn options(&self) -> &ConnectOptions {
        &self.options
    }

    /// False once the connection has ended (seen by the reader or by a write); calls then fail
    /// with [`Error::Disconnected`].
    pub fn is_connected(&self) -> bool {
        self.shared.lock().dead.is_none() && !self.shared.hung_up.load(Ordering::Acquire)
    }

    /// Replies that matched no pending call (late replies after a timeout, unknown ids):
    /// each was logged and dropped.
    pub fn unmatched_replies(&self) -> u64 {
        self.shared.unmatched.load(Ordering::Relaxed)
    }

    /// Runs `command` with `arguments` (a JSON object, or `None`) and the default timeout.
    pub fn execute(&self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.execute_with_timeout(command, arguments, self.options.command_timeout)
    }

    /// Runs `command` and waits at most `timeout` for its reply.
    ///
    /// `timeout` bounds all the call's waiting: for other calls' writes, for QEMU to read this
    /// request and for the reply. A call that times out before any of its request is written
    /// leaves the connection usable; one that times out part way through the write closes it
    /// (later calls fail with [`Error::Disconnected`] saying so).
    pub fn execute_with_timeout(
        &self,
        command: &str,
        arguments: Option<Value>,
        timeout: Duration,
    ) -> Result<Value> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (sender, receiver) = crossbeam_channel::bounded(1);
        {
            let mut state = self.shared.lock();
            if let Some(fatal) = &state.dead {
                return Err(Error::Disconnected {
                    reason: fatal.to_string(),
                });
            }
            let pending = Pending {
                command: command.to_owned(),
                reply: sender,
            };
            state.pending.insert(id, pending);
        }
        let mut request = Map::new();
        request.insert("execute".into(), Value::String(command.to_owned()));
        if let Some(arguments) = arguments.filter(|a| !a.is_null()) {
            request.insert("arguments".into(), arguments);
        }
        request.insert("id".into(), Value::from(id));
        let bytes = encode(&Value::Object(request));
        // From here on the call waits (for its turn, for QEMU to read, for the reply); encoding
        // a large request is not waiting, and would otherwise eat a short timeout.
        let deadline = deadline_after(timeout);
        if let Err(e) = self.send_request(command, &bytes, deadline, timeout) {
            self.shared.lock().pending.remove(&id);
            return Err(e);
        }
        match receiver.recv_deadline(deadline) {
            Ok(result) => result,
            Err(RecvTimeoutError::Timeout) => {
                self.shared.lock().pending.remove(&id);
                // The reply may have been routed between the timeout and the removal.
                receiver.try_recv().unwrap_or_else(|_| {
                    Err(Error::Timeout {
                        what: format!("reply to {command}"),
                        after: timeout,
                    })
                })
            }
            Err(RecvTimeoutError::Disconnected) => Err(Error::Disconnected {
                reason: self.shared.disconnect_reason(),
            }),
        }
    }

    /// Writes one encoded request in its turn, both before `deadline`. A failure part way
    /// closes the connection, recording why before the socket is shut down.
    fn send_request(
        &self,
        command: &str,
        bytes: &[u8],
        deadline: Instant,
        timeout: Duration,
    ) -> Result<()> {
        let Some(turn) = self.gate.enter(deadline) else {
            // Nothing of this request was written: the connection is still in sync.
            return Err(self.shared.dead_error().unwrap_or_else(|| Error::Timeout {
                what: format!("QEMU to accept {command} (an earlier command's write is stuck)"),
                after: timeout,
            }));
        };
        // The write that held the turn before may have failed and closed the connection.
        if let Some(e) = self.shared.dead_error() {
            return Err(e);
        }
        let Err((sent, source)) = self.writer.write_all_before(bytes, deadline) else {
            return Ok(());
        };
        if let Some(e) = self.shared.dead_error() {
            // Closed under the write (by `close`, or by the reader): that reason stands.
            return Err(e);
        }
        if is_disconnect(&source) {
            // QEMU hung up; the reader reports it (after any replies it sent before). Until it
            // has, the connection must not look alive to a caller deciding to reconnect.
            self.shared.hung_up.store(true, Ordering::Release);
            return Err(Error::Disconnected {
                reason: format!("{} (sending {command}: {source})", Fatal::Eof),
            });
        }
        let timed_out = is_timeout(&source);
        if timed_out && sent == 0 {
            return Err(Error::Timeout {
                what: format!("QEMU to accept {command}"),
                after: timeout,
            });
        }
        // Part of the request may be on the wire: the stream is no longer in sync.
        let (fatal, error) = if timed_out {
            let fatal = Fatal::WriteTimedOut {
                command: command.to_owned(),
                after: timeout,
                sent,
                len: bytes.len(),
            };
            let error = Error::Timeout {
                what: format!(
                    "QEMU to accept {command} (it stopped reading part way; the connection is \
                     closed)"
                ),
                after: timeout,
            };
            (fatal, error)
        } else {
            let fatal = Fatal::Io(format!("sending {command}: {source}"));
            let error = Error::Io {
                context: "sending a QMP command",
                source,
            };
            (fatal, error)
        };
        log::warn!("closing the QMP connection: {fatal}");
        self.shared.fail_all(fatal);
        self.control.shutdown();
        // Only now may the next writer look: it finds the connection dead, with the reason.
        drop(turn);
        Err(error)
    }

    /// Runs `command` and decodes its reply as `T`.
    pub fn call<T: serde::de::DeserializeOwned>(
        &self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<T> {
        let value = self.execute(command, arguments)?;
        T::deserialize(value).map_err(|source| Error::Decode {
            command: command.to_owned(),
            source,
        })
    }

    /// A new subscription to the events matching `filter`, from now on.
    pub fn subscribe(&self, filter: EventFilter) -> Subscription {
        let (subscription, slot) = Subscription::new(
            filter,
            self.options.event_queue_capacity,
            Arc::clone(&self.shared),
        );
        let mut state = self.shared.lock();
        if state.dead.is_none() {
            state.subscribers.push(slot);
        }
        subscription
    }

    /// Waits for an event on the connection's own queue, which holds every event since
    /// connecting (up to the queue capacity) that no earlier wait consumed.
    ///
    /// Several threads may wait at once, each for its own event: none holds the queue while
    /// it waits, and the predicate runs without any of the connection's locks held.
    pub fn wait_for_event(
        &self,
        name: &str,
        predicate: impl FnMut(&Event) -> bool,
        timeout: Duration,
    ) -> Result<Event> {
        self.default_events
            .wait_for_event(name, predicate, timeout, &self.shared)
    }

    /// Events discarded from the connection's own queue because nobody consumed them.
    pub fn default_queue_dropped(&self) -> u64 {
        self.default_events.dropped()
    }

    /// Closes the connection: pending calls fail with [`Error::Disconnected`].
    pub fn close(&self) {
        self.shared.closing.store(true, Ordering::Release);
        // Recorded first: a call whose write the shutdown breaks reports this, not the break.
        self.shared.fail_all(Fatal::Closed);
        self.control.shutdown();
        let handle = self
            .reader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.close();
    }
}

/// One request as it goes on the wire: a line of JSON.
fn encode(message: &Value) -> Vec<u8> {
    let mut bytes = message.to_string().into_bytes();
    bytes.push(b'\n');
    bytes
}

/// Reads one line before `deadline` during connection set-up.
fn read_setup_line(
    reader: &mut LineReader<Stream>,
    stream: &Stream,
    deadline: Instant,
    total: Duration,
    what: &str,
) -> Result<Vec<u8>> {
    let remaining = deadline.saturating_duration_since(Instant::now());
    let timeout = || Error::Timeout {
        what: what.to_owned(),
        after: total,
    };
    if remaining.is_zero() {
        return Err(timeout());
    }
    stream
        .set_read_timeout(Some(remaining))
        .map_err(|source| Error::Io {
            context: "configuring the QMP socket",
            source,
        })?;
    match reader.read_line() {
        Ok(Some(line)) => Ok(line),
        Ok(None) => Err(Error::Protocol(ProtocolError::GreetingMissing {
            detail: format!("connection closed while waiting for the {what}"),
        })),
        Err(Error::Protocol(ProtocolError::Truncated { bytes })) => {
            Err(Error::Protocol(ProtocolError::GreetingMissing {
                detail: format!("connection closed after {bytes} bytes of the {what}"),
            }))
        }
        Err(Error::Io { source, .. }) if is_timeout(&source) => Err(timeout()),
        Err(e) => Err(e),
    }
}

fn read_greeting(
    reader: &mut LineReader<Stream>,
    stream: &Stream,
    deadline: Instant,
    total: Duration,
) -> Result<Greeting> {
    let line = read_setup_line(reader, stream, deadline, total, "QMP greeting")?;
    let message = parse_object(&line).map_err(Error::Protocol)?;
    let parsed: GreetingMessage =
        GreetingMessage::deserialize(Value::Object(message)).map_err(|e| {
            Error::Protocol(ProtocolError::GreetingMissing {
                detail: format!("first message is not a greeting ({e}): {}", preview(&line)),
            })
        })?;
    Ok(Greeting {
        version: parsed.qmp.version,
        capabilities: parsed.qmp.capabilities,
    })
}

fn read_negotiation_reply(
    reader: &mut LineReader<Stream>,
    stream: &Stream,
    deadline: Instant,
    total: Duration,
) -> Result<()> {
    loop {
        let line = read_setup_line(reader, stream, deadline, total, "qmp_capabilities reply")?;
        let mut message = parse_object(&line).map_err(Error::Protocol)?;
        if message.contains_key("event") {
            log::debug!(
                "event before capability negotiation finished: {}",
                preview(&line)
            );
            continue;
        }
        if message.get("id") != Some(&Value::from(0)) {
            if let Some(error) = message.get("error") {
                let (class, desc) = error_parts(error);
                return Err(Error::Protocol(ProtocolError::ErrorWithoutId {
                    class,
                    desc,
                }));
            }
            log::warn!("unexpected message during negotiation: {}", preview(&line));
            continue;
        }
        if let Some(error) = message.remove("error") {
            let (class, desc) = error_parts(&error);
            return Err(Error::Qmp {
                command: "qmp_capabilities".to_owned(),
                class,
                desc,
            });
        }
        return Ok(());
    }
}

fn preview(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(&line[..line.len().min(200)]);
    text.into_owned()
}

fn reader_loop(mut reader: LineReader<Stream>, shared: &Shared, control: &Stream) {
    loop {
        let fatal = match reader.read_line() {
            Ok(Some(line)) => match shared.handle_line(&line) {
                Ok(()) => continue,
                Err(p) => Fatal::Protocol(p),
            },
            Ok(None) => Fatal::Eof,
            Err(Error::Protocol(p)) => Fatal::Protocol(p),
            Err(Error::Io { source, .. }) if is_disconnect(&source) => Fatal::Eof,
            Err(Error::Io { source, .. }) => Fatal::Io(source.to_string()),
            Err(e) => Fatal::Io(e.to_string()),
        };
        let fatal = if shared.closing.load(Ordering::Acquire) {
            Fatal::Closed
        } else {
            fatal
        };
        // The reason first, then the shutdown (which a writer may notice before this returns).
        shared.fail_all(fatal);
        // Stop QEMU from writing into a stream we no longer read.
        control.shutdown();
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A monitor that takes no one (QEMU serving another client, its one-slot backlog full):
    /// the connect ends at the greeting timeout as a `Timeout`, where a blocking connect would
    /// wait without end.
    #[test]
    fn a_unix_socket_with_a_full_backlog_times_out() {
        use nix::sys::socket::{
            AddressFamily, Backlog, SockFlag, SockType, UnixAddr, bind, listen, socket,
        };
        use std::os::fd::AsRawFd;
        let path = std::env::temp_dir().join(format!("qmp-backlog-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let fd = socket(
            AddressFamily::Unix,
            SockType::Stream,
            SockFlag::empty(),
            None,
        )
        .unwrap();
        bind(fd.as_raw_fd(), &UnixAddr::new(&path).unwrap()).unwrap();
        listen(&fd, Backlog::new(0).unwrap()).unwrap();
        // Queued, never accepted, until connecting blocks.
        let mut queued = Vec::new();
        while let Ok(s) = connect_unix(&path, Duration::from_millis(50)) {
            queued.push(s);
            assert!(queued.len() < 64, "the backlog never filled");
        }
        let options = ConnectOptions {
            greeting_timeout: Duration::from_millis(300),
            ..ConnectOptions::default()
        };
        let t = Instant::now();
        let e = Qmp::connect(&Endpoint::Unix(path.clone()), options)
            .err()
            .unwrap();
        assert!(matches!(e, Error::Timeout { .. }), "{e}");
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn endpoints_print_as_qemu_takes_them() {
        assert_eq!(
            Endpoint::Unix("/run/q.sock".into()).to_string(),
            "unix:/run/q.sock"
        );
        assert_eq!(
            Endpoint::Tcp("[::1]:4444".into()).to_string(),
            "tcp:[::1]:4444"
        );
    }
}
