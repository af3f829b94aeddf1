//! The guest agent: relays between the host channel and the guest's MPI ranks.
//!
//! Threads: the host link ([`crate::guest_link`]), a listener on the rank socket, one reader
//! per rank connection; all of them feed one event loop that owns the agent's state, so the
//! protocol logic is single-threaded. The agent reports `quiesced` only when every expected
//! rank has registered and reported `quiesced` for the epoch. On `resume` it waits (bounded)
//! until the guest sees the new interconnect ([`sysfs::find_interconnect`]; the Ethernet
//! interface name is resolved from the MAC when the host did not give one), forwards it to the
//! ranks and reports `resumed` when every rank acknowledged; if the interconnect never
//! appears it reports `failed` and keeps the ranks paused, for the host to roll back. A rank
//! that leaves during an epoch, one that reports it cannot quiesce (`unable`, with a reason
//! passed on), or a deadline that passes, fails the epoch (`failed` to the host, `abort` to the
//! ranks).
//!
//! # Limits
//!
//! One rank cannot stall the others. Ranks are told things in rank order, each write bounded by
//! [`RANK_WRITE_TIMEOUT`]: a rank whose notice cannot be written in that time (it stopped
//! reading and its socket buffer is full) or at all is dropped, its connection shut down, and
//! an epoch in progress fails with a reason naming it, as if it had left (a `prepare` is then
//! not passed on to the ranks after it: they only see the `abort`). At most
//! [`AgentConfig::rank_connection_limit`] rank connections are served at once, each with its
//! reader thread; one more is answered `refused` and closed, without a thread.
//!
//! # Stale epochs
//!
//! A host that dies in the middle of an epoch must not leave the ranks paused for good. The
//! agent leaves an epoch in progress, its ranks told `abort` (unless they were already told to
//! resume), when
//! - a `prepare` for a newer epoch arrives: the host that sends it has given the old one up
//!   (its session allows `prepare` only between epochs); the new epoch then starts;
//! - the host's `abort` for it arrives, on this connection or a later one (a controller that
//!   continues the epoch's session);
//! - no host has been connected for [`AgentConfig::stale_epoch_after`]. The agent then reports
//!   `failed` for the epoch to the next host that connects: one continuing the session (it
//!   thinks the guest quiesced, or resuming) goes to `failed` and aborts or rolls back instead
//!   of moving a guest whose ranks run on; a new controller's fresh session rejects the stale
//!   report (counted, harmless) and starts its own epoch.
//!
//! While a host is connected, only its own messages end an epoch: a quiesced, resuming or
//! waiting-for-interconnect guest stays so for as long as the host takes to finish it.
//!
//! ```no_run
//! use symvirt_agent::agent::{Agent, AgentConfig};
//! use symvirt_agent::guest_link::ChannelSpec;
//! let config = AgentConfig {
//!     channel: ChannelSpec::Unix("/tmp/host.sock".into()),
//!     ranks: 0,
//!     ..AgentConfig::default()
//! };
//! let agent = Agent::spawn(config).unwrap(); // runs until dropped or shut down
//! # drop(agent);
//! ```

use crate::cut_reports::CutReports;
use crate::data_net::DataNetwork;
use crate::error::{Error, Result};
use crate::guest_link::{self, ChannelSpec, HostWriter, LinkEvent};
use crate::sysfs::{self, SysDirs};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use symvirt_proto::framing::{Frame, LineReader};
use symvirt_proto::protocol::{
    AgentPhase, GuestMessage, HostMessage, Interconnect, MAX_LINE, PROTOCOL_VERSION,
};
use symvirt_proto::protocol::{decode, encode};
use symvirt_proto::rank::{AgentNotice, DEFAULT_RANK_SOCKET, RankRequest};

/// The agent's version, as sent in `hello`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// How long the `symvirt-agent` binary waits for a new interconnect unless told otherwise.
pub const DEFAULT_INTERCONNECT_WAIT: Duration = Duration::from_secs(20);

/// How long one write to a rank may block. A rank reads its notices at its safe points, a few
/// lines an epoch, so a write that cannot finish within this time means the rank stopped reading
/// and its socket buffer is full: the agent drops it rather than stall every other rank and the
/// host behind it. Short enough that the host's deadlines (seconds to minutes) still hold.
pub const RANK_WRITE_TIMEOUT: Duration = Duration::from_secs(2);

/// How many rank connections an agent serves at once unless told otherwise
/// ([`AgentConfig::max_rank_connections`]). Each one has a reader thread; a guest's ranks need
/// one each (one per core, typically far fewer than this), and the rest is room for ranks that
/// restart and for tools that connect.
pub const MAX_RANK_CONNECTIONS: usize = 1024;

/// Connections the agent always allows beyond its expected ranks: a restarted rank may connect
/// again before its old connection is gone.
const RANK_CONNECTION_SPARE: usize = 16;

/// How long an epoch may stay in progress with no host connected, unless told otherwise
/// ([`AgentConfig::stale_epoch_after`]). A live controller is away from a guest only between the
/// switchover and reaching the guest at the destination, or while a rollback reaches it back
/// at the source, each bounded by the plan's `resume` and `rollback` deadlines (60 s by
/// default); five minutes is well beyond both, so a guest the controller is still moving is
/// never released under it, while a guest whose controller died is released within minutes.
pub const DEFAULT_STALE_EPOCH_AFTER: Duration = Duration::from_secs(300);

/// How long a refused rank connection stays open (write side shut) before it is closed, so the
/// rank has sent its `register` and can read `refused` rather than a reset connection.
const REFUSED_LINGER: Duration = Duration::from_secs(1);
/// Refused connections kept lingering at most (older ones are closed at once).
const REFUSED_LINGERING: usize = 64;

/// How an agent is set up.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The VM's name, sent in `hello`.
    pub vm: String,
    /// How to reach the host.
    pub channel: ChannelSpec,
    /// The unix socket ranks connect to.
    pub rank_socket: PathBuf,
    /// How many ranks must quiesce (0: the agent alone, it quiesces at once).
    pub ranks: u32,
    /// Report the guest's PCI devices in `resumed`.
    pub report_pci: bool,
    /// Where the guest's PCI devices, interfaces and verbs devices are listed.
    pub sys: SysDirs,
    /// How long `resume` waits for the guest to see the new interconnect (a device plugged
    /// just before takes a moment to be probed) before the agent reports `failed`, keeping
    /// its ranks paused so the host can roll back. `None`: the interconnect is passed on as
    /// the host names it (for agents outside a guest, whose sysfs says nothing about it); an
    /// Ethernet interface name is still filled in from the MAC when one matches.
    pub interconnect_wait: Option<Duration>,
    /// The VM's data address, re-routed through the new fabric's NIC on every `resume` before
    /// the ranks are released ([`crate::data_net`]). `None`: the agent leaves the network alone.
    pub data_network: Option<DataNetwork>,
    /// How many rank connections are served at once (each has a reader thread); one more is
    /// refused. Never fewer than [`AgentConfig::ranks`] and a few spare: see
    /// [`AgentConfig::rank_connection_limit`]. Default [`MAX_RANK_CONNECTIONS`].
    pub max_rank_connections: usize,
    /// How long an epoch may stay in progress with no host connected before the agent gives it
    /// up: it tells its ranks `abort` (unless they were told to resume) and reports `failed`
    /// to the next host. `None`: never (the ranks wait for a host however long it takes).
    /// Default [`DEFAULT_STALE_EPOCH_AFTER`].
    pub stale_epoch_after: Option<Duration>,
}

impl AgentConfig {
    /// How many rank connections the agent serves at once: [`AgentConfig::max_rank_connections`],
    /// raised when needed to the expected ranks plus a few spare, so that every rank can
    /// always connect.
    pub fn rank_connection_limit(&self) -> usize {
        self.max_rank_connections
            .max(self.ranks as usize + RANK_CONNECTION_SPARE)
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            vm: "guest".into(),
            channel: ChannelSpec::default(),
            rank_socket: DEFAULT_RANK_SOCKET.into(),
            ranks: 0,
            report_pci: false,
            sys: SysDirs::default(),
            interconnect_wait: None,
            data_network: None,
            max_rank_connections: MAX_RANK_CONNECTIONS,
            stale_epoch_after: Some(DEFAULT_STALE_EPOCH_AFTER),
        }
    }
}

/// Everything the event loop reacts to.
enum Event {
    Link(LinkEvent),
    RankConnected(u64, UnixStream),
    Rank(u64, symvirt_proto::Result<RankRequest>),
    RankGone(u64),
}

/// A running agent. Dropping it stops every thread and removes the rank socket.
#[derive(Debug)]
pub struct Agent {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    main: Option<JoinHandle<Result<()>>>,
    rank_socket: PathBuf,
}

impl Agent {
    /// Binds the rank socket (creating its directory) and starts the agent's threads.
    pub fn spawn(config: AgentConfig) -> Result<Agent> {
        if let Some(dir) = config.rank_socket.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        }
        // A socket file left by an agent that died is stale and removed; one that answers
        // belongs to a running agent, which must not be robbed of its ranks.
        if UnixStream::connect(&config.rank_socket).is_ok() {
            return Err(Error::Config(format!(
                "another agent is listening on {}",
                config.rank_socket.display()
            )));
        }
        let _ = std::fs::remove_file(&config.rank_socket);
        let listener = UnixListener::bind(&config.rank_socket).map_err(|e| {
            Error::io(
                format!("bind rank socket {}", config.rank_socket.display()),
                e,
            )
        })?;
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::io("set_nonblocking", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = crossbeam_channel::bounded::<Event>(1024);
        let writer: HostWriter = Arc::new(Mutex::new(None));
        let mut threads = Vec::new();

        let (link_tx, link_rx) = crossbeam_channel::bounded::<LinkEvent>(64);
        let forward = tx.clone();
        threads.push(spawn("symvirt-link-fwd", move || {
            for e in link_rx {
                if forward.send(Event::Link(e)).is_err() {
                    break;
                }
            }
        })?);
        let (spec, s, w) = (config.channel.clone(), stop.clone(), writer.clone());
        threads.push(spawn("symvirt-link", move || {
            guest_link::run(spec, s, link_tx, w)
        })?);
        let (s, t) = (stop.clone(), tx.clone());
        let limit = config.rank_connection_limit();
        threads.push(spawn("symvirt-ranks", move || {
            accept_ranks(listener, limit, s, t)
        })?);
        drop(tx);

        log::info!(
            "agent {AGENT_VERSION} for vm {} starting: channel {:?}, ranks {}, rank socket {}",
            config.vm,
            config.channel,
            config.ranks,
            config.rank_socket.display()
        );
        let rank_socket = config.rank_socket.clone();
        let s = stop.clone();
        let main = std::thread::Builder::new()
            .name("symvirt-agent".into())
            .spawn(move || Core::new(config, writer).run(rx, s))
            .map_err(|e| Error::io("spawn agent thread", e))?;
        Ok(Agent {
            stop,
            threads,
            main: Some(main),
            rank_socket,
        })
    }

    /// Runs until the agent stops by itself (it does not, unless a thread fails).
    pub fn wait(mut self) -> Result<()> {
        let r = match self.main.take() {
            Some(m) => m
                .join()
                .unwrap_or_else(|_| Err(Error::Config("agent thread panicked".into()))),
            None => Ok(()),
        };
        self.shutdown_threads();
        r
    }

    fn shutdown_threads(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(m) = self.main.take() {
            let _ = m.join();
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.rank_socket);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown_threads();
    }
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map_err(|e| Error::io(format!("spawn {name}"), e))
}

/// Accepts rank connections, each served by a [`read_rank`] thread while fewer than `limit`
/// are open; refuses the others without a thread.
fn accept_ranks(
    listener: UnixListener,
    limit: usize,
    stop: Arc<AtomicBool>,
    events: Sender<Event>,
) {
    let open = Arc::new(AtomicUsize::new(0));
    let mut refused = Refusals::default();
    let mut next_id = 0u64;
    while !stop.load(Ordering::SeqCst) {
        refused.close_expired();
        let stream = match listener.accept() {
            Ok((stream, _)) => stream,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            }
            Err(e) => {
                log::warn!("rank socket accept: {e}");
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        if open.load(Ordering::SeqCst) >= limit {
            refused.refuse(stream, limit);
            continue;
        }
        refused.refusing = false;
        let reader = match stream
            .set_nonblocking(false)
            .and_then(|()| stream.set_write_timeout(Some(RANK_WRITE_TIMEOUT)))
            .and_then(|()| stream.try_clone())
        {
            Ok(r) => r,
            Err(e) => {
                log::warn!("rank connection: {e}");
                continue;
            }
        };
        next_id += 1;
        let id = next_id;
        if events.send(Event::RankConnected(id, stream)).is_err() {
            return;
        }
        open.fetch_add(1, Ordering::SeqCst);
        let (ev, count) = (events.clone(), OpenConnection(open.clone()));
        let spawned = spawn("symvirt-rank", move || {
            let _count = count;
            read_rank(id, reader, ev)
        });
        if let Err(e) = spawned {
            // The closure, and with it the count, is gone: the connection is not served.
            log::warn!("rank connection {id}: {e}");
            if events.send(Event::RankGone(id)).is_err() {
                return;
            }
        }
    }
}

/// One open rank connection, counted while its reader thread runs.
struct OpenConnection(Arc<AtomicUsize>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Rank connections refused for the connection limit, kept open (write side shut) a moment.
#[derive(Default)]
struct Refusals {
    lingering: VecDeque<(Instant, UnixStream)>,
    /// Refusing since the last accepted connection (logged once per run of refusals).
    refusing: bool,
    count: u64,
}

impl Refusals {
    /// Answers `refused` (best effort, never blocking) and lets the connection linger.
    fn refuse(&mut self, stream: UnixStream, limit: usize) {
        self.count += 1;
        let reason = format!("the agent serves {limit} rank connections at most");
        if !self.refusing {
            log::warn!(
                "refused a rank connection: {reason} ({} refused so far)",
                self.count
            );
            self.refusing = true;
        }
        if let Ok(line) = encode(&AgentNotice::Refused { reason }) {
            let _ = stream
                .set_nonblocking(true)
                .and_then(|()| (&stream).write_all(&line));
        }
        let _ = stream.shutdown(std::net::Shutdown::Write);
        if self.lingering.len() >= REFUSED_LINGERING {
            self.lingering.pop_front();
        }
        self.lingering
            .push_back((Instant::now() + REFUSED_LINGER, stream));
    }

    fn close_expired(&mut self) {
        let now = Instant::now();
        while self
            .lingering
            .front()
            .is_some_and(|(until, _)| *until <= now)
        {
            self.lingering.pop_front();
        }
    }
}

/// Reads one rank connection until it ends (the event loop shuts it down on stop).
fn read_rank(id: u64, mut stream: UnixStream, events: Sender<Event>) {
    let mut lines = LineReader::new(MAX_LINE);
    let mut buf = [0u8; 4096];
    loop {
        let n = match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut frames = Vec::new();
        lines.push(&buf[..n], |f| frames.push(f));
        for frame in frames {
            let request = match frame {
                Frame::Line(l) => decode::<RankRequest>(&l),
                Frame::Oversized { bytes } => Err(symvirt_proto::Error::LineTooLong {
                    len: bytes,
                    limit: MAX_LINE,
                }),
            };
            if events.send(Event::Rank(id, request)).is_err() {
                return;
            }
        }
    }
    let _ = events.send(Event::RankGone(id));
}

/// Where the agent is in the current epoch.
#[derive(Debug)]
enum Phase {
    Running,
    Preparing {
        epoch: u64,
        deadline: Instant,
        quiesced: BTreeSet<u32>,
    },
    Quiesced {
        epoch: u64,
    },
    /// `resume` arrived; the guest does not see the new interconnect yet.
    AwaitingInterconnect {
        epoch: u64,
        interconnect: Interconnect,
        until: Instant,
    },
    Resuming {
        epoch: u64,
        interconnect: Interconnect,
        acked: BTreeSet<u32>,
    },
}

struct RankConn {
    stream: UnixStream,
    rank: Option<u32>,
}

/// The event loop's state.
struct Core {
    config: AgentConfig,
    writer: HostWriter,
    ranks: BTreeMap<u64, RankConn>,
    phase: Phase,
    last_epoch: u64,
    /// A state report that could not be sent while the host was away; sent after `hello`.
    unsent: Option<GuestMessage>,
    /// The data-network peers noted at the last `prepare`, probed on the new NIC at resume.
    data_peers: Vec<std::net::Ipv4Addr>,
    /// Ranks dropped because a notice could not be written to them, and why; an epoch in
    /// progress fails for them once the event at hand is handled ([`Core::settle_dropped`]).
    dropped: VecDeque<(u32, String)>,
    /// Since when no host has been connected (`None`: one is).
    host_away_since: Option<Instant>,
    /// When the last `resume` arrived: the agent logs how long the guest took to go on.
    resume_arrived: Instant,
    /// The `resumed` of the last epoch that completed: sent again to a host that asks for it
    /// once more (a controller recovering an interrupted run cannot know it was sent).
    last_resumed: Option<GuestMessage>,
    /// A rank left and none has registered since: the job has ended (or lost a rank, which an
    /// MPI job does not get back), so a `prepare` that finds ranks missing fails at once.
    ranks_left: bool,
    /// What the ranks counted at the last cuts, for the host's `report`.
    reports: CutReports,
}

impl Core {
    fn new(config: AgentConfig, writer: HostWriter) -> Core {
        Core {
            config,
            writer,
            ranks: BTreeMap::new(),
            phase: Phase::Running,
            last_epoch: 0,
            unsent: None,
            data_peers: Vec::new(),
            dropped: VecDeque::new(),
            host_away_since: Some(Instant::now()),
            resume_arrived: Instant::now(),
            last_resumed: None,
            ranks_left: false,
            reports: CutReports::default(),
        }
    }

    fn run(mut self, events: Receiver<Event>, stop: Arc<AtomicBool>) -> Result<()> {
        while !stop.load(Ordering::SeqCst) {
            // Waiting for a device to appear, the ranks are paused: look again soon.
            let tick = if matches!(self.phase, Phase::AwaitingInterconnect { .. }) {
                Duration::from_millis(5)
            } else {
                Duration::from_millis(50)
            };
            match events.recv_timeout(tick) {
                Ok(e) => self.handle(e),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => break,
            }
            self.check_deadline();
            self.check_interconnect();
            self.check_stale();
            self.settle_dropped();
        }
        for conn in self.ranks.values() {
            let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        }
        Ok(())
    }

    fn registered(&self) -> impl Iterator<Item = u32> + '_ {
        self.ranks.values().filter_map(|c| c.rank)
    }

    fn tell_host(&mut self, message: GuestMessage) {
        let line = match encode(&message) {
            Ok(l) => l,
            Err(e) => {
                log::error!("cannot encode {}: {e}", message.describe());
                return;
            }
        };
        let sent = {
            let mut slot = self.writer.lock().unwrap_or_else(|p| p.into_inner());
            match slot.as_mut() {
                Some(w) => w.write_all(&line).map_err(|e| e.to_string()),
                None => Err("host not connected".into()),
            }
        };
        match sent {
            Ok(()) => log::info!("sent {}", message.describe()),
            Err(why) => {
                log::warn!(
                    "{} not sent ({why}); will send after reconnect",
                    message.describe()
                );
                // Only a change of the epoch's state waits for the host; answers to its
                // questions (status, report parts) it asks again.
                if matches!(
                    message,
                    GuestMessage::Quiesced { .. }
                        | GuestMessage::Resumed { .. }
                        | GuestMessage::Failed { .. }
                ) {
                    self.unsent = Some(message);
                }
            }
        }
    }

    /// Writes `notice` to connection `id`, within [`RANK_WRITE_TIMEOUT`]. A connection that
    /// cannot take it is shut down and forgotten at once (its reader's `RankGone` finds nothing);
    /// a registered rank is noted in `dropped`, for [`Core::settle_dropped`].
    fn tell_rank(&mut self, id: u64, notice: &AgentNotice) {
        let Some(conn) = self.ranks.get_mut(&id) else {
            return;
        };
        let written = encode(notice).map_err(|e| e.to_string()).and_then(|line| {
            conn.stream.write_all(&line).map_err(|e| match e.kind() {
                ErrorKind::WouldBlock | ErrorKind::TimedOut => format!(
                    "it stopped reading (a notice could not be written within {} ms)",
                    RANK_WRITE_TIMEOUT.as_millis()
                ),
                _ => format!("a notice could not be written to it: {e}"),
            })
        });
        let Err(why) = written else {
            return;
        };
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
        let rank = conn.rank;
        self.ranks.remove(&id);
        match rank {
            Some(rank) => {
                log::warn!("rank {rank} dropped: {why}");
                self.dropped.push_back((rank, why));
            }
            None => log::warn!("rank connection {id} closed: {why}"),
        }
    }

    /// Tells every registered rank, in rank order. A rank dropped on the way dooms the epoch:
    /// a `prepare` then goes no further (the ranks after it get only the `abort`); any other
    /// notice still reaches every rank that can take it.
    fn tell_all_ranks(&mut self, notice: &AgentNotice) {
        let mut ranks: Vec<(u32, u64)> = self
            .ranks
            .iter()
            .filter_map(|(&id, c)| c.rank.map(|r| (r, id)))
            .collect();
        ranks.sort_unstable();
        let dropped = self.dropped.len();
        for (_, id) in ranks {
            self.tell_rank(id, notice);
            if self.dropped.len() > dropped && matches!(notice, AgentNotice::Prepare { .. }) {
                break;
            }
        }
    }

    /// Fails the epoch in progress, if any, for every rank dropped since the last call.
    fn settle_dropped(&mut self) {
        while let Some((rank, why)) = self.dropped.pop_front() {
            if let Some(epoch) = self.epoch_in_progress() {
                self.fail(
                    epoch,
                    format!("rank {rank} dropped during epoch {epoch}: {why}"),
                );
            }
        }
    }

    fn handle(&mut self, event: Event) {
        match event {
            Event::Link(LinkEvent::Connected) => {
                log::info!("host connected");
                self.host_away_since = None;
                self.introduce();
            }
            Event::Link(LinkEvent::Disconnected) => {
                log::info!("host disconnected");
                self.host_away_since = Some(Instant::now());
            }
            Event::Link(LinkEvent::Message(m)) => self.on_host(m),
            Event::RankConnected(id, stream) => {
                self.ranks.insert(id, RankConn { stream, rank: None });
            }
            Event::Rank(id, Ok(request)) => self.on_rank(id, request),
            Event::Rank(id, Err(e)) => {
                log::warn!("rank connection {id}: bad message: {e}; closing it");
                if let Some(c) = self.ranks.get(&id) {
                    let _ = c.stream.shutdown(std::net::Shutdown::Both);
                }
            }
            Event::RankGone(id) => {
                let Some(conn) = self.ranks.remove(&id) else {
                    return;
                };
                if let Some(rank) = conn.rank {
                    log::info!("rank {rank} left");
                    self.ranks_left = true;
                    if let Some(epoch) = self.epoch_in_progress() {
                        self.fail(epoch, format!("rank {rank} left during epoch {epoch}"));
                    }
                }
            }
        }
    }

    /// Says `hello`, then what could not be sent while the host was away.
    fn introduce(&mut self) {
        self.tell_host(GuestMessage::Hello {
            vm: self.config.vm.clone(),
            agent_version: AGENT_VERSION.into(),
            protocol: PROTOCOL_VERSION,
            ranks: self.config.ranks,
        });
        if let Some(m) = self.unsent.take() {
            self.tell_host(m);
        }
    }

    fn epoch_in_progress(&self) -> Option<u64> {
        match &self.phase {
            Phase::Running => None,
            Phase::Preparing { epoch, .. }
            | Phase::Quiesced { epoch }
            | Phase::AwaitingInterconnect { epoch, .. }
            | Phase::Resuming { epoch, .. } => Some(*epoch),
        }
    }

    /// Gives up on `epoch`: tells the host, releases the ranks.
    fn fail(&mut self, epoch: u64, reason: String) {
        log::warn!("epoch {epoch} failed: {reason}");
        self.leave(epoch);
        self.tell_host(GuestMessage::Failed { epoch, reason });
    }

    /// Ends `epoch`, the one in progress: its ranks are told `abort`, unless they were already
    /// told to resume (they run on then, and an `abort` would mean nothing to them).
    fn leave(&mut self, epoch: u64) {
        if !matches!(self.phase, Phase::Resuming { .. }) {
            self.tell_all_ranks(&AgentNotice::Abort { epoch });
        }
        self.phase = Phase::Running;
    }

    /// Gives the epoch in progress up after [`AgentConfig::stale_epoch_after`] with no host:
    /// the one that started it is gone. `failed` waits in `unsent` for the next host.
    fn check_stale(&mut self) {
        let (Some(limit), Some(since), Some(epoch)) = (
            self.config.stale_epoch_after,
            self.host_away_since,
            self.epoch_in_progress(),
        ) else {
            return;
        };
        if since.elapsed() >= limit {
            let reason = format!(
                "no host for {} ms during epoch {epoch}: the agent gave it up, its ranks go on \
                 where they are",
                limit.as_millis()
            );
            self.fail(epoch, reason);
        }
    }

    fn on_host(&mut self, message: HostMessage) {
        log::info!("host says {}", message.describe());
        match message {
            // A host connection this agent may not have seen open (see `symvirt_proto::protocol`).
            HostMessage::Hello => self.introduce(),
            HostMessage::Prepare { epoch, deadline_ms } => {
                if epoch <= self.last_epoch {
                    log::warn!(
                        "ignored prepare{{epoch={epoch}}}: {:?}, last epoch {}",
                        self.phase,
                        self.last_epoch
                    );
                    return;
                }
                // The host prepares only between epochs (see the host's `symvirt::session`): one still in
                // progress here was given up by a host that went away (its controller died).
                if let Some(old) = self.epoch_in_progress() {
                    log::warn!(
                        "prepare{{epoch={epoch}}} in {:?}: the host gave epoch {old} up; leaving it",
                        self.phase
                    );
                    self.leave(old);
                }
                // Whatever waited for a host is about an older epoch, given up as well.
                self.unsent = None;
                self.last_epoch = epoch;
                // A job whose data address is gone could not carry on after the move: refuse
                // the cut before any rank pauses, so the job keeps running where it is.
                if let Some(data) = &self.config.data_network {
                    match data.check().and_then(|()| data.peers()) {
                        Ok(peers) => self.data_peers = peers,
                        Err(e) => {
                            let reason = format!("the guest's data network is not ready: {e}");
                            log::warn!("prepare{{epoch={epoch}}} refused: {reason}");
                            // Ranks elsewhere may already pull these ranks into the cut; an
                            // abort lets them go on rather than wait for a prepare.
                            self.tell_all_ranks(&AgentNotice::Abort { epoch });
                            self.tell_host(GuestMessage::Failed { epoch, reason });
                            return;
                        }
                    }
                }
                // Ranks that left do not come back: a job that ended between the host's last
                // look and this prepare is no job to wait for until the deadline. (Ranks that
                // have not registered yet, with none gone, are waited for: a starting job.)
                let registered = self.registered().count();
                if self.ranks_left && registered < self.config.ranks as usize {
                    let reason = format!(
                        "only {registered} of the {} ranks are registered, and ranks left since \
                         the last one registered: the job has ended or lost a rank",
                        self.config.ranks
                    );
                    log::warn!("prepare{{epoch={epoch}}} refused: {reason}");
                    self.tell_all_ranks(&AgentNotice::Abort { epoch });
                    self.tell_host(GuestMessage::Failed { epoch, reason });
                    return;
                }
                self.phase = Phase::Preparing {
                    epoch,
                    deadline: Instant::now() + Duration::from_millis(deadline_ms),
                    quiesced: BTreeSet::new(),
                };
                self.reports.begin(epoch, self.config.ranks);
                self.tell_all_ranks(&AgentNotice::Prepare { epoch, deadline_ms });
                self.check_quiesced();
            }
            HostMessage::Resume {
                epoch,
                interconnect,
            } => {
                if let (Phase::Running, Some(done)) = (&self.phase, &self.last_resumed) {
                    if done.epoch() == Some(epoch) {
                        log::info!("resume{{epoch={epoch}}} again: it is done, saying so again");
                        let done = done.clone();
                        self.tell_host(done);
                        return;
                    }
                }
                if !matches!(self.phase, Phase::Quiesced { epoch: e } if e == epoch) {
                    log::warn!("ignored resume{{epoch={epoch}}} in {:?}", self.phase);
                    return;
                }
                self.resume_arrived = Instant::now();
                self.phase = Phase::AwaitingInterconnect {
                    epoch,
                    interconnect,
                    until: Instant::now() + self.config.interconnect_wait.unwrap_or_default(),
                };
                self.check_interconnect();
            }
            HostMessage::Abort { epoch } => match self.phase {
                Phase::Preparing { epoch: e, .. }
                | Phase::Quiesced { epoch: e }
                | Phase::AwaitingInterconnect { epoch: e, .. }
                    if e == epoch =>
                {
                    self.leave(epoch)
                }
                // An epoch this agent already failed: its ranks may have been pulled into the
                // cut by their peers since; release them.
                Phase::Running if epoch == self.last_epoch => {
                    self.tell_all_ranks(&AgentNotice::Abort { epoch });
                }
                _ => log::warn!("ignored abort{{epoch={epoch}}} in {:?}", self.phase),
            },
            HostMessage::Status => {
                let phase = match self.phase {
                    Phase::Running => AgentPhase::Running,
                    Phase::Preparing { .. } => AgentPhase::Preparing,
                    Phase::Quiesced { .. } => AgentPhase::Quiesced,
                    Phase::AwaitingInterconnect { .. } | Phase::Resuming { .. } => {
                        AgentPhase::Resuming
                    }
                };
                let registered = u32::try_from(self.registered().count()).unwrap_or(u32::MAX);
                self.tell_host(GuestMessage::Status {
                    epoch: self.last_epoch,
                    phase,
                    ranks: self.config.ranks,
                    registered,
                });
            }
            HostMessage::Report { epoch, cursor } => {
                let part = self.reports.part(epoch, cursor);
                self.tell_host(part);
            }
        }
    }

    fn on_rank(&mut self, id: u64, request: RankRequest) {
        let current = self.ranks.get(&id).and_then(|c| c.rank);
        match (request, current) {
            (RankRequest::Register { rank }, None) => {
                let refuse = if self.registered().any(|r| r == rank) {
                    Some(format!("rank {rank} is already registered"))
                } else if self.registered().count() >= self.config.ranks as usize {
                    Some(format!("this agent expects {} ranks", self.config.ranks))
                } else {
                    None
                };
                if let Some(reason) = refuse {
                    log::warn!("refused rank {rank}: {reason}");
                    self.tell_rank(id, &AgentNotice::Refused { reason });
                    return;
                }
                if let Some(c) = self.ranks.get_mut(&id) {
                    c.rank = Some(rank);
                }
                log::info!("rank {rank} registered");
                self.ranks_left = false;
                let expected = self.config.ranks;
                self.tell_rank(id, &AgentNotice::Registered { rank, expected });
                // A rank that joins mid-epoch catches up.
                match &self.phase {
                    Phase::Preparing {
                        epoch, deadline, ..
                    } => {
                        let notice = AgentNotice::Prepare {
                            epoch: *epoch,
                            deadline_ms: deadline
                                .saturating_duration_since(Instant::now())
                                .as_millis() as u64,
                        };
                        self.tell_rank(id, &notice);
                    }
                    Phase::Resuming {
                        epoch,
                        interconnect,
                        ..
                    } => {
                        let notice = AgentNotice::Resume {
                            epoch: *epoch,
                            interconnect: interconnect.clone(),
                        };
                        self.tell_rank(id, &notice);
                    }
                    Phase::Running
                    | Phase::Quiesced { .. }
                    | Phase::AwaitingInterconnect { .. } => {}
                }
            }
            (RankRequest::Quiesced { epoch }, Some(rank)) => match &mut self.phase {
                Phase::Preparing {
                    epoch: e, quiesced, ..
                } if *e == epoch => {
                    quiesced.insert(rank);
                    self.reports.quiesced(epoch, rank);
                    log::info!("rank {rank} quiesced for epoch {epoch}");
                    self.check_quiesced();
                }
                _ => log::warn!("ignored quiesced{{epoch={epoch}}} from rank {rank}"),
            },
            (RankRequest::Counts { epoch, counts }, Some(rank)) => match &self.phase {
                Phase::Preparing { epoch: e, .. } if *e == epoch => {
                    self.reports.counts(epoch, rank, &counts)
                }
                _ => log::warn!("ignored counts{{epoch={epoch}}} from rank {rank}"),
            },
            (RankRequest::Resumed { epoch }, Some(rank)) => match &mut self.phase {
                Phase::Resuming {
                    epoch: e, acked, ..
                } if *e == epoch => {
                    acked.insert(rank);
                    log::info!("rank {rank} resumed for epoch {epoch}");
                    self.check_resumed();
                }
                _ => log::warn!("ignored resumed{{epoch={epoch}}} from rank {rank}"),
            },
            (RankRequest::Unable { epoch, reason }, Some(rank)) => match &self.phase {
                Phase::Preparing { epoch: e, .. } if *e == epoch => {
                    self.fail(epoch, format!("rank {rank} cannot quiesce: {reason}"));
                }
                _ => log::warn!("ignored unable{{epoch={epoch}}} from rank {rank}: {reason}"),
            },
            (request, rank) => {
                log::warn!("ignored {request:?} from connection {id} (rank {rank:?})")
            }
        }
    }

    /// Every expected rank registered and in `set`.
    fn all_ranks_in(&self, set: &BTreeSet<u32>) -> bool {
        let registered: BTreeSet<u32> = self.registered().collect();
        registered.len() == self.config.ranks as usize && registered.is_subset(set)
    }

    fn check_quiesced(&mut self) {
        if let Phase::Preparing {
            epoch, quiesced, ..
        } = &self.phase
        {
            if self.all_ranks_in(quiesced) {
                let epoch = *epoch;
                self.phase = Phase::Quiesced { epoch };
                self.tell_host(GuestMessage::Quiesced { epoch });
            }
        }
    }

    fn check_resumed(&mut self) {
        if let Phase::Resuming {
            epoch,
            interconnect,
            acked,
        } = &self.phase
        {
            if self.all_ranks_in(acked) {
                let message = GuestMessage::Resumed {
                    epoch: *epoch,
                    interconnect: interconnect.clone(),
                    pci_devices: self
                        .config
                        .report_pci
                        .then(|| sysfs::pci_devices(&self.config.sys.pci)),
                };
                log::info!(
                    "resume{{epoch={epoch}}}: every rank went on {} ms after the host's resume",
                    self.resume_arrived.elapsed().as_millis()
                );
                self.phase = Phase::Running;
                self.last_resumed = Some(message.clone());
                self.tell_host(message);
            }
        }
    }

    /// Releases the ranks once the guest sees the interconnect `resume` named; reports
    /// `failed` if it does not appear in time. The ranks stay paused then: the host rolls the
    /// VM back to where they can go on, or aborts the epoch.
    fn check_interconnect(&mut self) {
        let Phase::AwaitingInterconnect {
            epoch,
            interconnect,
            until,
        } = &mut self.phase
        else {
            return;
        };
        let (epoch, until) = (*epoch, *until);
        let found = sysfs::find_interconnect(interconnect, &self.config.sys);
        match found.or_else(|e| self.config.interconnect_wait.map_or(Ok(()), |_| Err(e))) {
            Ok(()) => {
                let interconnect = interconnect.clone();
                if let Some(wait) = self.config.interconnect_wait {
                    let waited =
                        wait.saturating_sub(until.saturating_duration_since(Instant::now()));
                    log::info!(
                        "resume{{epoch={epoch}}}: the guest saw its interconnect after {} ms",
                        waited.as_millis()
                    );
                }
                if let Err(reason) = self.replumb(&interconnect) {
                    log::warn!("resume{{epoch={epoch}}} failed: {reason}");
                    self.phase = Phase::Quiesced { epoch };
                    self.tell_host(GuestMessage::Failed { epoch, reason });
                    return;
                }
                self.tell_all_ranks(&AgentNotice::Resume {
                    epoch,
                    interconnect: interconnect.clone(),
                });
                self.phase = Phase::Resuming {
                    epoch,
                    interconnect,
                    acked: BTreeSet::new(),
                };
                self.check_resumed();
            }
            Err(missing) if Instant::now() >= until => {
                let waited = self.config.interconnect_wait.unwrap_or_default();
                let reason = format!(
                    "the guest does not see its new interconnect after {} ms: {missing}",
                    waited.as_millis()
                );
                log::warn!("resume{{epoch={epoch}}} failed: {reason}");
                self.phase = Phase::Quiesced { epoch };
                self.tell_host(GuestMessage::Failed { epoch, reason });
            }
            Err(_) => {}
        }
    }

    /// The network step: the data subnet follows the VM to the new fabric's NIC.
    fn replumb(&self, interconnect: &Interconnect) -> std::result::Result<(), String> {
        let Some(data) = &self.config.data_network else {
            return Ok(());
        };
        match interconnect {
            Interconnect::Ethernet {
                iface: Some(iface), ..
            } => {
                let started = Instant::now();
                data.route_via(iface)
                    .and_then(|()| data.probe_peers(iface, &self.data_peers))
                    .map_err(|e| format!("cannot route the data network through {iface}: {e}"))?;
                log::info!(
                    "data network on {iface}, {} peer(s) answering, in {} ms",
                    self.data_peers.len(),
                    started.elapsed().as_millis()
                );
                Ok(())
            }
            Interconnect::Ethernet {
                iface: None, mac, ..
            } => Err(format!(
                "cannot route the data network: no interface with mac {mac}"
            )),
            Interconnect::Infiniband { hca, .. } => Err(format!(
                "cannot route the data network through verbs device {hca}: name its IPoIB \
                 interface as an ethernet interconnect"
            )),
        }
    }

    fn check_deadline(&mut self) {
        if let Phase::Preparing {
            epoch,
            deadline,
            quiesced,
        } = &self.phase
        {
            if Instant::now() >= *deadline {
                let reason = format!(
                    "deadline passed: {} of {} ranks quiesced ({} registered)",
                    quiesced.len(),
                    self.config.ranks,
                    self.registered().count()
                );
                self.fail(*epoch, reason);
            }
        }
    }
}
