//! The connection: socket, greeting and capability negotiation, the reader thread, and
//! matching replies to calls by id.
//!
//! The reader thread owns the read half of the socket. Each call registers a one-shot channel
//! under a fresh id before its request is written; the reader routes `return`/`error` replies
//! by id and events to subscriptions. When the stream ends or breaks, the reader fails every
//! pending call at once and marks the connection dead, so later calls fail without I/O.

use std::collections::HashMap;
use std::io::{self, ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::error::{Error, ProtocolError, Result};
use crate::events::{Event, EventFilter, SubscriberSlot, Subscription};
use crate::framing::LineReader;
use crate::types::{ErrorClass, QmpCapability, VersionInfo};

/// Where QEMU's QMP monitor listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A unix socket path (`-qmp unix:PATH,server=on,wait=off`).
    Unix(PathBuf),
    /// A TCP address, `host:port` (`-qmp tcp:HOST:PORT,server=on,wait=off`).
    Tcp(String),
}

/// Connection settings. `Default` suits a local QEMU.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// How long to wait for the greeting and the `qmp_capabilities` reply.
    pub greeting_timeout: Duration,
    /// Timeout of calls made without an explicit one (also bounds each socket write).
    pub command_timeout: Duration,
    /// Longest message accepted, in bytes; a longer one is a protocol error.
    pub max_line_len: usize,
    /// Events each subscription queues before the oldest is discarded (and counted).
    pub event_queue_capacity: usize,
    /// Enable the `oob` capability when QEMU offers it.
    pub enable_oob: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            greeting_timeout: Duration::from_secs(10),
            command_timeout: Duration::from_secs(30),
            max_line_len: 1 << 20,
            event_queue_capacity: 1024,
            enable_oob: true,
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

/// The socket, unix or TCP.
#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn connect(endpoint: &Endpoint, timeout: Duration) -> io::Result<Self> {
        match endpoint {
            Endpoint::Unix(path) => UnixStream::connect(path).map(Self::Unix),
            Endpoint::Tcp(addr) => {
                let mut last =
                    io::Error::new(ErrorKind::InvalidInput, "address resolves to nothing");
                for sock in addr.to_socket_addrs()? {
                    match TcpStream::connect_timeout(&sock, timeout) {
                        Ok(s) => {
                            s.set_nodelay(true)?;
                            return Ok(Self::Tcp(s));
                        }
                        Err(e) => last = e,
                    }
                }
                Err(last)
            }
        }
    }

    fn try_clone(&self) -> io::Result<Self> {
        match self {
            Self::Unix(s) => s.try_clone().map(Self::Unix),
            Self::Tcp(s) => s.try_clone().map(Self::Tcp),
        }
    }

    fn shutdown(&self) {
        // Errors only mean the socket is already gone, which is the goal.
        let _ = match self {
            Self::Unix(s) => s.shutdown(Shutdown::Both),
            Self::Tcp(s) => s.shutdown(Shutdown::Both),
        };
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Unix(s) => s.set_read_timeout(t),
            Self::Tcp(s) => s.set_read_timeout(t),
        }
    }

    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Self::Unix(s) => s.set_write_timeout(t),
            Self::Tcp(s) => s.set_write_timeout(t),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.read(buf),
            Self::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Unix(s) => s.write(buf),
            Self::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Unix(s) => s.flush(),
            Self::Tcp(s) => s.flush(),
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
}

impl std::fmt::Display for Fatal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Closed => f.write_str("connection closed by the client"),
            Self::Eof => f.write_str("QEMU closed the connection"),
            Self::Io(e) => write!(f, "socket error: {e}"),
            Self::Protocol(p) => write!(f, "protocol error: {p}"),
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

type ReplySender = Sender<Result<Value>>;

#[derive(Default)]
struct State {
    pending: HashMap<u64, ReplySender>,
    subscribers: Vec<SubscriberSlot>,
    dead: Option<Fatal>,
}

/// State shared by the client, its reader thread and its subscriptions.
pub(crate) struct Shared {
    state: Mutex<State>,
    closing: AtomicBool,
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

    /// Marks the connection dead and fails everything waiting on it. The first cause wins.
    fn fail_all(&self, fatal: Fatal) {
        let mut state = self.lock();
        if state.dead.is_some() {
            return;
        }
        log::debug!("QMP connection ended: {fatal}");
        for (_, waiter) in state.pending.drain() {
            let _ = waiter.send(Err(fatal.pending_error()));
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
        result: Result<Value>,
    ) -> std::result::Result<(), ProtocolError> {
        let waiter = id
            .and_then(Value::as_u64)
            .and_then(|id| self.lock().pending.remove(&id));
        match (waiter, id, result) {
            (Some(waiter), _, result) => {
                // The caller may have timed out and gone; its reply is then dropped.
                let _ = waiter.send(result);
                Ok(())
            }
            (None, None, Err(Error::Qmp { class, desc })) => {
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
            return self.route_reply(id.as_ref(), Ok(value));
        }
        if let Some(error) = message.remove("error") {
            return self.route_reply(id.as_ref(), Err(qmp_error(&error)));
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

fn qmp_error(error: &Value) -> Error {
    let (class, desc) = error_parts(error);
    Error::Qmp { class, desc }
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
    writer: Mutex<Stream>,
    control: Stream,
    greeting: Greeting,
    oob: bool,
    next_id: AtomicU64,
    options: ConnectOptions,
    default_events: Mutex<Subscription>,
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
        let stream = Stream::connect(endpoint, options.greeting_timeout)
            .map_err(io("connecting to the QMP socket"))?;
        stream
            .set_write_timeout(Some(options.command_timeout))
            .map_err(io("configuring the QMP socket"))?;
        let control = stream.try_clone().map_err(io("cloning the QMP socket"))?;
        let mut reader = LineReader::new(
            stream.try_clone().map_err(io("cloning the QMP socket"))?,
            options.max_line_len,
        );
        let deadline = Instant::now() + options.greeting_timeout;

        let greeting = read_greeting(&mut reader, &stream, deadline, options.greeting_timeout)?;
        let oob = options.enable_oob && greeting.capabilities.contains(&QmpCapability::Oob);
        let mut writer = stream;
        let enable = if oob { json!(["oob"]) } else { json!([]) };
        write_line(
            &mut writer,
            &json!({"execute": "qmp_capabilities", "arguments": {"enable": enable}, "id": 0}),
        )
        .map_err(io("negotiating QMP capabilities"))?;
        read_negotiation_reply(&mut reader, &writer, deadline, options.greeting_timeout)?;
        writer
            .set_read_timeout(None)
            .map_err(io("configuring the QMP socket"))?;

        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            closing: AtomicBool::new(false),
            unmatched: AtomicU64::new(0),
        });
        let (default_events, slot) = Subscription::new(
            EventFilter::All,
            options.event_queue_capacity,
            Arc::clone(&shared),
        );
        shared.lock().subscribers.push(slot);
        let reader_control = control.try_clone().map_err(io("cloning the QMP socket"))?;
        let reader_shared = Arc::clone(&shared);
        let handle = std::thread::Builder::new()
            .name("qmp-reader".into())
            .spawn(move || reader_loop(reader, &reader_shared, &reader_control))
            .map_err(io("spawning the QMP reader thread"))?;
        Ok(Self {
            shared,
            writer: Mutex::new(writer),
            control,
            greeting,
            oob,
            next_id: AtomicU64::new(1),
            options,
            default_events: Mutex::new(default_events),
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

    /// False once the connection has ended; calls then fail with [`Error::Disconnected`].
    pub fn is_connected(&self) -> bool {
        self.shared.lock().dead.is_none()
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
            state.pending.insert(id, sender);
        }
        let mut request = Map::new();
        request.insert("execute".into(), Value::String(command.to_owned()));
        if let Some(arguments) = arguments.filter(|a| !a.is_null()) {
            request.insert("arguments".into(), arguments);
        }
        request.insert("id".into(), Value::from(id));
        let written = {
            let mut writer = self.writer.lock().unwrap_or_else(PoisonError::into_inner);
            write_line(&mut *writer, &Value::Object(request))
        };
        if let Err(source) = written {
            self.shared.lock().pending.remove(&id);
            if is_disconnect(&source) || !self.is_connected() {
                return Err(Error::Disconnected {
                    reason: format!("sending {command}: {source}"),
                });
            }
            // Part of the request may be on the wire: the stream is no longer in sync.
            self.control.shutdown();
            if is_timeout(&source) {
                let after = self.options.command_timeout;
                let why = format!("QEMU stopped reading (write of {command} timed out)");
                self.shared.fail_all(Fatal::Io(why));
                return Err(Error::Timeout {
                    what: format!("QEMU to accept {command}"),
                    after,
                });
            }
            self.shared.fail_all(Fatal::Io(source.to_string()));
            return Err(Error::Io {
                context: "sending a QMP command",
                source,
            });
        }
        match receiver.recv_timeout(timeout) {
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
    pub fn wait_for_event(
        &self,
        name: &str,
        predicate: impl FnMut(&Event) -> bool,
        timeout: Duration,
    ) -> Result<Event> {
        self.default_events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .wait_for_event(name, predicate, timeout)
    }

    /// Events discarded from the connection's own queue because nobody consumed them.
    pub fn default_queue_dropped(&self) -> u64 {
        self.default_events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .dropped()
    }

    /// Closes the connection: pending calls fail with [`Error::Disconnected`].
    pub fn close(&self) {
        self.shared.closing.store(true, Ordering::Release);
        self.control.shutdown();
        let handle = self
            .reader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        if let Some(handle) = handle {
            let _ = handle.join();
        }
        self.shared.fail_all(Fatal::Closed);
    }
}

impl Drop for Qmp {
    fn drop(&mut self) {
        self.close();
    }
}

fn write_line(writer: &mut impl Write, message: &Value) -> io::Result<()> {
    let mut bytes = serde_json::to_vec(message).map_err(io::Error::other)?;
    bytes.push(b'\n');
    writer.write_all(&bytes)?;
    writer.flush()
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
            return Err(qmp_error(&error));
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
        // Stop QEMU from writing into a stream we no longer read.
        control.shutdown();
        shared.fail_all(fatal);
        return;
    }
}
