//! The host's end of one guest's channel.
//!
//! [`HostChannel`] owns a reader thread per guest. The thread reads the socket in fixed chunks
//! through a bounded [`LineReader`], decodes each line strictly, runs it through the guest's
//! [`GuestSession`] and only then queues it for the controller. Everything refused is counted
//! per [`RejectionKind`], kept in a short ring of recent rejections and logged at a limited
//! rate, so a guest flooding the channel costs the reader CPU but never memory, never the
//! controller's attention and never the log. Because the session lets each state-changing
//! message through at most once per host message, the queue cannot fill with a guest's
//! messages; it is bounded anyway and excess events are dropped and counted.
//!
//! Two ways to reach the guest: [`HostChannel::connect`] to the unix socket of QEMU's
//! `virtserialport` chardev (QEMU is the server: `-chardev socket,...,server=on,wait=off`),
//! reconnecting whenever it is lost; or [`HostChannel::listen`] on a socket an agent running as a
//! host process connects to (tests, or the agent of a VMM without virtio-serial).

use crate::error::{Error, Result};
use crate::framing::{Frame, LineReader};
use crate::protocol::{GuestMessage, HostMessage, MAX_LINE, decode, encode};
use crate::session::{Accepted, GuestInfo, GuestSession, Rejection, RejectionKind, SessionState};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Tuning of a [`HostChannel`].
#[derive(Debug, Clone)]
pub struct ChannelOptions {
    /// A name for logs (the VM).
    pub label: String,
    /// Capacity of the event queue to the controller.
    pub queue: usize,
    /// How long a `send` may block on a guest that does not read.
    pub write_timeout: Duration,
    /// Pause between connection attempts.
    pub reconnect_interval: Duration,
    /// Rejections logged per second at most (the rest are only counted).
    pub log_rejections_per_sec: u32,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        ChannelOptions {
            label: "guest".into(),
            queue: 64,
            write_timeout: Duration::from_secs(2),
            reconnect_interval: Duration::from_millis(50),
            log_rejections_per_sec: 10,
        }
    }
}

impl ChannelOptions {
    /// Default options with a log label.
    pub fn labelled(label: impl Into<String>) -> Self {
        ChannelOptions {
            label: label.into(),
            ..ChannelOptions::default()
        }
    }
}

/// What the controller receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelEvent {
    /// The channel's socket is (re)connected; a `hello` should follow.
    Connected,
    /// The channel's socket was lost; reconnecting.
    Disconnected,
    /// A guest message that passed parsing and the session's checks.
    Message(GuestMessage),
}

/// Counters of one channel (a snapshot).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelStats {
    /// Bytes read from the guest.
    pub bytes: u64,
    /// Non-empty lines seen (oversized ones included).
    pub lines: u64,
    /// Guest messages queued for the controller.
    pub delivered: u64,
    /// Rejections per kind, indexed by [`RejectionKind::index`].
    pub rejected: [u64; RejectionKind::ALL.len()],
    /// Events dropped because the controller's queue was full.
    pub dropped: u64,
    /// Repeated identical `hello`s not passed on.
    pub coalesced: u64,
    /// Successful connections.
    pub connections: u64,
}

impl ChannelStats {
    /// Rejections of one kind.
    pub fn rejected(&self, kind: RejectionKind) -> u64 {
        self.rejected[kind.index()]
    }

    /// All rejections.
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().sum()
    }
}

const RECENT_REJECTIONS: usize = 16;
/// How often the reader thread looks at the stop flag.
const POLL_INTERVAL: Duration = Duration::from_millis(100);

#[derive(Default)]
struct Counters {
    bytes: AtomicU64,
    lines: AtomicU64,
    delivered: AtomicU64,
    rejected: [AtomicU64; RejectionKind::ALL.len()],
    dropped: AtomicU64,
    coalesced: AtomicU64,
    connections: AtomicU64,
}

struct Shared {
    options: ChannelOptions,
    session: Mutex<GuestSession>,
    writer: Mutex<Option<UnixStream>>,
    counters: Counters,
    recent: Mutex<VecDeque<Rejection>>,
    stop: AtomicBool,
}

/// Locks a mutex, ignoring poisoning: the data behind these locks stays consistent at every
/// await point, and a panicked reader thread must not take the controller down with it.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

enum Endpoint {
    /// One stream, served once (no reconnection).
    Stream(Option<UnixStream>),
    Connect(PathBuf),
    Listen(UnixListener),
}

/// The QEMU arguments that give a guest its SymVirt channel: a virtio-serial port named
/// [`DEFAULT_PORT_NAME`](crate::protocol::DEFAULT_PORT_NAME) (the guest agent opens
/// `/dev/virtio-ports/org.symvirt.0`), backed by a unix socket at `socket` on which QEMU listens
/// and [`HostChannel::connect`] connects. Source and destination QEMUs of a migration need the
/// same arguments (paths may differ).
pub fn qemu_channel_args(socket: &Path) -> Vec<String> {
    vec![
        "-device".into(),
        "virtio-serial".into(),
        "-chardev".into(),
        format!(
            "socket,id=symvirt0,path={},server=on,wait=off",
            socket.display()
        ),
        "-device".into(),
        format!(
            "virtserialport,chardev=symvirt0,name={}",
            crate::protocol::DEFAULT_PORT_NAME
        ),
    ]
}

/// The host's end of one guest's channel. Dropping it stops the reader thread.
pub struct HostChannel {
    shared: Arc<Shared>,
    events: Receiver<ChannelEvent>,
    thread: Option<JoinHandle<()>>,
    listen_path: Option<PathBuf>,
    /// Served once: a lost connection is not made again (see [`HostChannel::from_stream`]).
    one_shot: bool,
}

impl std::fmt::Debug for HostChannel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostChannel")
            .field("label", &self.shared.options.label)
            .field("state", &self.state())
            .finish()
    }
}

impl HostChannel {
    /// Connects (as a client, retrying until it exists) to `path`, the unix socket of QEMU's
    /// virtio-serial chardev, and reconnects whenever the connection is lost.
    pub fn connect(path: impl AsRef<Path>, options: ChannelOptions) -> Result<HostChannel> {
        Self::start(Endpoint::Connect(path.as_ref().to_owned()), options, None)
    }

    /// Like [`HostChannel::connect`], continuing `session` (a snapshot of another channel's,
    /// see [`HostChannel::session`]): after a migration the guest's channel is reached through
    /// the destination's socket, in the middle of the epoch the source's channel started.
    pub fn connect_continuing(
        path: impl AsRef<Path>,
        options: ChannelOptions,
        session: GuestSession,
    ) -> Result<HostChannel> {
        Self::start_with(
            Endpoint::Connect(path.as_ref().to_owned()),
            options,
            None,
            session,
        )
    }

    /// A snapshot of the guest's protocol session, to continue it on another channel.
    pub fn session(&self) -> GuestSession {
        lock(&self.shared.session).clone()
    }

    /// Serves one already connected stream, e.g. one end of a `UnixStream::pair` whose other
    /// end a VMM's device model feeds ([`crate::portio::PortIoDevice`]). Not reconnected.
    pub fn from_stream(stream: UnixStream, options: ChannelOptions) -> Result<HostChannel> {
        Self::start(Endpoint::Stream(Some(stream)), options, None)
    }

    /// Like [`HostChannel::from_stream`], continuing `session` (see
    /// [`HostChannel::connect_continuing`]): a migrated guest's port-I/O channel at the
    /// destination VMM.
    pub fn from_stream_continuing(
        stream: UnixStream,
        options: ChannelOptions,
        session: GuestSession,
    ) -> Result<HostChannel> {
        Self::start_with(Endpoint::Stream(Some(stream)), options, None, session)
    }

    /// Listens on `path` for an agent that connects as a client (one connection at a time).
    pub fn listen(path: impl AsRef<Path>, options: ChannelOptions) -> Result<HostChannel> {
        let path = path.as_ref().to_owned();
        let listener = UnixListener::bind(&path)
            .map_err(|e| Error::io(format!("bind {}", path.display()), e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("set_nonblocking", e))?;
        Self::start(Endpoint::Listen(listener), options, Some(path))
    }

    fn start(
        endpoint: Endpoint,
        options: ChannelOptions,
        listen_path: Option<PathBuf>,
    ) -> Result<HostChannel> {
        Self::start_with(endpoint, options, listen_path, GuestSession::new())
    }

    fn start_with(
        endpoint: Endpoint,
        options: ChannelOptions,
        listen_path: Option<PathBuf>,
        session: GuestSession,
    ) -> Result<HostChannel> {
        let (tx, rx) = crossbeam_channel::bounded(options.queue.max(2));
        let one_shot = matches!(endpoint, Endpoint::Stream(_));
        let shared = Arc::new(Shared {
            options,
            session: Mutex::new(session),
            writer: Mutex::new(None),
            counters: Counters::default(),
            recent: Mutex::new(VecDeque::with_capacity(RECENT_REJECTIONS)),
            stop: AtomicBool::new(false),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("symvirt-chan-{}", shared.options.label))
            .spawn(move || Reader::new(thread_shared, tx).run(endpoint))
            .map_err(|e| Error::io("spawn channel reader thread", e))?;
        Ok(HostChannel {
            shared,
            events: rx,
            thread: Some(thread),
            listen_path,
            one_shot,
        })
    }

    /// Sends a message to the guest. Refused without sending when the session does not allow
    /// it now ([`Error::Transition`]); [`Error::NotConnected`] when the socket is down.
    pub fn send(&self, message: &HostMessage) -> Result<()> {
        let line = encode(message)?;
        // The state changes before the write: the guest may answer before `write_all` returns.
        let (before, applied) = {
            let mut session = lock(&self.shared.session);
            let before = session.on_host(message, Instant::now())?;
            (before, session.state().clone())
        };
        let result = {
            let mut writer = lock(&self.shared.writer);
            match writer.as_mut() {
                None => Err(Error::NotConnected),
                Some(w) => w
                    .write_all(&line)
                    .map_err(|e| Error::io(format!("send {} to the guest", message.describe()), e)),
            }
        };
        if result.is_err() {
            lock(&self.shared.session).undo(&applied, before);
        } else {
            log::debug!(
                "symvirt channel {}: sent {}",
                self.shared.options.label,
                message.describe()
            );
        }
        result
    }

    /// The next event, waiting at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<ChannelEvent> {
        match self.events.recv_timeout(timeout) {
            Ok(e) => Ok(e),
            Err(RecvTimeoutError::Timeout) => Err(Error::Timeout),
            Err(RecvTimeoutError::Disconnected) => Err(Error::Closed),
        }
    }

    /// Waits until a guest message satisfies `predicate`, or `deadline`. Events before it that
    /// do not match are consumed and discarded (the session has already applied them; include
    /// `failed` in the predicate to learn of failures).
    pub fn wait_for(
        &self,
        mut predicate: impl FnMut(&GuestMessage) -> bool,
        deadline: Instant,
    ) -> Result<GuestMessage> {
        loop {
            match self.events.recv_deadline(deadline) {
                Ok(ChannelEvent::Message(m)) if predicate(&m) => return Ok(m),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return Err(Error::Timeout),
                Err(RecvTimeoutError::Disconnected) => return Err(Error::Closed),
            }
        }
    }

    /// Waits until the guest is identified (its `hello`), or `deadline`. Consumes the events
    /// queued before it.
    pub fn wait_hello(&self, deadline: Instant) -> Result<GuestInfo> {
        loop {
            if let Some(info) = self.guest() {
                return Ok(info);
            }
            match self.events.recv_deadline(deadline) {
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => return Err(Error::Timeout),
                Err(RecvTimeoutError::Disconnected) => return Err(Error::Closed),
            }
        }
    }

    /// The guest's protocol state.
    pub fn state(&self) -> SessionState {
        lock(&self.shared.session).state().clone()
    }

    /// Who the guest said it is, once it did.
    pub fn guest(&self) -> Option<GuestInfo> {
        lock(&self.shared.session).guest().cloned()
    }

    /// Whether the connection is lost for good: a one-shot stream that ended. Such a channel
    /// is opened again by whoever made it (a connecting or listening channel reconnects
    /// itself).
    pub fn is_lost(&self) -> bool {
        self.one_shot && !self.is_connected()
    }

    /// Whether the guest's channel is connected now.
    pub fn is_connected(&self) -> bool {
        lock(&self.shared.writer).is_some()
    }

    /// The channel's counters.
    pub fn stats(&self) -> ChannelStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ChannelStats {
            bytes: get(&c.bytes),
            lines: get(&c.lines),
            delivered: get(&c.delivered),
            rejected: std::array::from_fn(|i| get(&c.rejected[i])),
            dropped: get(&c.dropped),
            coalesced: get(&c.coalesced),
            connections: get(&c.connections),
        }
    }

    /// The most recent rejections (at most 16), oldest first.
    pub fn recent_rejections(&self) -> Vec<Rejection> {
        lock(&self.shared.recent).iter().cloned().collect()
    }
}

impl Drop for HostChannel {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(w) = lock(&self.shared.writer).as_ref() {
            let _ = w.shutdown(std::net::Shutdown::Both);
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Some(p) = &self.listen_path {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The reader thread's state.
struct Reader {
    shared: Arc<Shared>,
    events: Sender<ChannelEvent>,
    lines: LineReader,
    log_window: Instant,
    logged_in_window: u32,
    suppressed: u64,
}

impl Reader {
    fn new(shared: Arc<Shared>, events: Sender<ChannelEvent>) -> Reader {
        Reader {
            shared,
            events,
            lines: LineReader::new(MAX_LINE),
            log_window: Instant::now(),
            logged_in_window: 0,
            suppressed: 0,
        }
    }

    fn stopping(&self) -> bool {
        self.shared.stop.load(Ordering::SeqCst)
    }

    fn run(mut self, mut endpoint: Endpoint) {
        while !self.stopping() {
            let stream = match &mut endpoint {
                Endpoint::Stream(once) => once.take(),
                Endpoint::Connect(path) => UnixStream::connect(path).ok(),
                Endpoint::Listen(listener) => match listener.accept() {
                    Ok((s, _)) => s.set_nonblocking(false).ok().map(|_| s),
                    Err(_) => None,
                },
            };
            let Some(stream) = stream else {
                std::thread::sleep(self.shared.options.reconnect_interval);
                continue;
            };
            if let Err(e) = self.serve(stream) {
                log::warn!("symvirt channel {}: {e}", self.shared.options.label);
            }
            if matches!(endpoint, Endpoint::Stream(_)) {
                // A one-shot stream ended: the controller sees Disconnected, then Closed.
                break;
            }
        }
    }

    /// Reads one connection until it ends or the channel stops.
    fn serve(&mut self, mut stream: UnixStream) -> Result<()> {
        let label = self.shared.options.label.clone();
        stream
            .set_read_timeout(Some(POLL_INTERVAL))
            .map_err(|e| Error::io("set_read_timeout", e))?;
        let writer = stream
            .try_clone()
            .map_err(|e| Error::io("clone channel socket", e))?;
        writer
            .set_write_timeout(Some(self.shared.options.write_timeout))
            .map_err(|e| Error::io("set_write_timeout", e))?;
        lock(&self.shared.session).connected();
        *lock(&self.shared.writer) = Some(writer);
        self.shared
            .counters
            .connections
            .fetch_add(1, Ordering::Relaxed);
        log::info!("symvirt channel {label}: connected");
        self.deliver(ChannelEvent::Connected);
        self.lines.reset();
        self.ask_hello();
        let mut buf = [0u8; 8192];
        let end = loop {
            if self.stopping() {
                break Ok(());
            }
            match stream.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => {
                    self.shared
                        .counters
                        .bytes
                        .fetch_add(n as u64, Ordering::Relaxed);
                    let mut frames = Vec::new();
                    self.lines.push(&buf[..n], |f| frames.push(f));
                    for frame in frames {
                        self.handle(frame);
                    }
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => break Err(Error::io("read from the guest channel", e)),
            }
        };
        *lock(&self.shared.writer) = None;
        if !self.stopping() {
            log::info!("symvirt channel {label}: disconnected");
            self.deliver(ChannelEvent::Disconnected);
        }
        end
    }

    /// Asks the agent to introduce itself: it may not have seen this connection open (a
    /// virtio-serial port closed and reopened between two of its polls looks unchanged).
    fn ask_hello(&self) {
        let line = match encode(&HostMessage::Hello) {
            Ok(l) => l,
            Err(e) => return log::error!("cannot encode hello: {e}"),
        };
        if let Err(e) = lock(&self.shared.session).on_host(&HostMessage::Hello, Instant::now()) {
            return log::error!("hello refused by the session: {e}");
        }
        if let Some(w) = lock(&self.shared.writer).as_mut() {
            if let Err(e) = w.write_all(&line) {
                // The reader sees the connection end and reconnects; nothing else to do.
                log::warn!(
                    "symvirt channel {}: sending hello: {e}",
                    self.shared.options.label
                );
            }
        }
    }

    fn handle(&mut self, frame: Frame) {
        self.shared.counters.lines.fetch_add(1, Ordering::Relaxed);
        let message = match frame {
            Frame::Oversized { bytes } => Err(Rejection::new(
                RejectionKind::Oversized,
                format!("line of {bytes} bytes discarded (limit {MAX_LINE})"),
            )),
            Frame::Line(line) => decode::<GuestMessage>(&line)
                .map_err(|e| Rejection::from_decode_error(&e))
                .and_then(|m| lock(&self.shared.session).on_guest(&m).map(|a| (m, a))),
        };
        match message {
            Ok((_, Accepted::Duplicate)) => {
                self.shared
                    .counters
                    .coalesced
                    .fetch_add(1, Ordering::Relaxed);
            }
            Ok((m, Accepted::Applied)) => {
                log::debug!(
                    "symvirt channel {}: received {}",
                    self.shared.options.label,
                    m.describe()
                );
                self.deliver(ChannelEvent::Message(m));
            }
            Err(r) => self.reject(r),
        }
    }

    /// Queues an event for the controller without ever blocking. Connection events give way
    /// to guest messages when the queue is half full (a reconnecting peer must not crowd them
    /// out).
    fn deliver(&mut self, event: ChannelEvent) {
        let is_message = matches!(event, ChannelEvent::Message(_));
        let crowded = self.events.len() * 2 >= self.events.capacity().unwrap_or(usize::MAX);
        if !is_message && crowded {
            self.shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Counted before it is queued, so a controller that has received it also sees it counted.
        if is_message {
            self.shared
                .counters
                .delivered
                .fetch_add(1, Ordering::Relaxed);
        }
        match self.events.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(e)) => {
                if is_message {
                    self.shared
                        .counters
                        .delivered
                        .fetch_sub(1, Ordering::Relaxed);
                }
                self.shared.counters.dropped.fetch_add(1, Ordering::Relaxed);
                log::error!(
                    "symvirt channel {}: controller queue full, dropped {e:?}",
                    self.shared.options.label
                );
            }
            // The controller is gone: nobody to tell.
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    fn reject(&mut self, rejection: Rejection) {
        self.shared.counters.rejected[rejection.kind.index()].fetch_add(1, Ordering::Relaxed);
        {
            let mut recent = lock(&self.shared.recent);
            if recent.len() == RECENT_REJECTIONS {
                recent.pop_front();
            }
            recent.push_back(rejection.clone());
        }
        let now = Instant::now();
        if now.duration_since(self.log_window) >= Duration::from_secs(1) {
            if self.suppressed > 0 {
                log::warn!(
                    "symvirt channel {}: {} more rejections not logged",
                    self.shared.options.label,
                    self.suppressed
                );
            }
            self.log_window = now;
            self.logged_in_window = 0;
            self.suppressed = 0;
        }
        if self.logged_in_window < self.shared.options.log_rejections_per_sec {
            self.logged_in_window += 1;
            log::warn!(
                "symvirt channel {}: rejected guest line: {rejection}",
                self.shared.options.label
            );
        } else {
            self.suppressed += 1;
        }
    }
}
