//! Connections between source and destination: TCP, unix socket, or an in-process socket pair;
//! always one control connection plus N memory connections.
//!
//! [`connect`] (source) and [`Listener::accept`] (destination) exchange the connection
//! preamble (see [`crate::protocol`]), so a protocol-version mismatch fails here, before the
//! handshake proper, with [`Error::Incompatible`] wrapped in [`Phase::Handshake`].
//!
//! The socket I/O of page batches lives here too: [`Stream`] gathers a batch from guest memory
//! into one `sendmsg` and scatters received pages into guest memory with `readv`
//! ([`PageSource`]); what the bytes mean is [`crate::protocol`]'s business.

use crate::protocol::{
    MAX_MEMORY_CONNECTIONS, PREAMBLE_LEN, PREAMBLE_REPLY_LEN, PROTOCOL_VERSION, Preamble,
    PreambleReply, Role, STATUS_MALFORMED, STATUS_OK, STATUS_VERSION_MISMATCH,
};
use crate::{Error, Phase, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Where a destination listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A unix socket path.
    Unix(PathBuf),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for Endpoint {
    type Err = Error;

    /// `tcp:HOST:PORT` (a name is resolved, first address wins), `unix:PATH`, or a bare
    /// `HOST:PORT` meaning TCP.
    fn from_str(s: &str) -> Result<Endpoint> {
        use std::net::ToSocketAddrs;
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(Error::Protocol(format!(
                    "endpoint {s:?}: empty unix socket path"
                )));
            }
            return Ok(Endpoint::Unix(PathBuf::from(path)));
        }
        let addr = s.strip_prefix("tcp:").unwrap_or(s);
        addr.to_socket_addrs()
            .map_err(|e| Error::Protocol(format!("endpoint {s:?}: {e}")))?
            .next()
            .map(Endpoint::Tcp)
            .ok_or_else(|| Error::Protocol(format!("endpoint {s:?}: no address")))
    }
}

/// One byte stream of a migration.
#[derive(Debug)]
pub enum Stream {
    /// A TCP connection.
    Tcp(TcpStream),
    /// A unix socket (also used for in-process pairs).
    Unix(UnixStream),
}

impl Stream {
    /// Sets read and write timeouts (`None` = block forever).
    pub fn set_timeouts(&self, t: Option<Duration>) -> Result<()> {
        let r = match self {
            Stream::Tcp(s) => s.set_read_timeout(t).and_then(|_| s.set_write_timeout(t)),
            Stream::Unix(s) => s.set_read_timeout(t).and_then(|_| s.set_write_timeout(t)),
        };
        r.map_err(|e| io_err("setting socket timeouts", e))
    }

    /// Sets only the read timeout.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> Result<()> {
        let r = match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        };
        r.map_err(|e| io_err("setting socket timeout", e))
    }

    /// Closes both directions; a peer blocked on it sees EOF or a reset.
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Another handle to the same socket.
    pub fn try_clone(&self) -> Result<Stream> {
        match self {
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
        }
        .map_err(|e| io_err("cloning socket", e))
    }

    fn tune(&self) {
        if let Stream::Tcp(s) = self {
            let _ = s.set_nodelay(true);
        }
        // Larger socket buffers keep the pipe full while the sender scans the next batch.
        let size: libc::c_int = 4 << 20;
        for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            // SAFETY: setsockopt on a valid fd we own, with a pointer to a c_int and its size.
            unsafe {
                libc::setsockopt(
                    self.as_raw_fd(),
                    libc::SOL_SOCKET,
                    opt,
                    (&size as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
        }
    }
}

/// Most iovecs passed to one `sendmsg` or `readv` (IOV_MAX).
const IOV_MAX: usize = 1024;

/// How long [`Listener::accept`] waits for a new connection's preamble before it drops it.
const PREAMBLE_WAIT: Duration = Duration::from_secs(2);
/// How often a waiting [`Listener::accept_unless`] looks at its cancel flag.
const CANCEL_CHECK: Duration = Duration::from_millis(100);

impl Stream {
    /// Writes every byte described by `iov` with `sendmsg`, advancing over partial writes.
    /// Every iovec must point at memory that stays valid for the call (our buffers, or guest
    /// memory checked to lie inside a region).
    pub(crate) fn send_vectored_all(&self, iov: &mut [libc::iovec]) -> Result<()> {
        let fd = self.as_raw_fd();
        let mut start = 0;
        while start < iov.len() {
            let n = iov.len().min(start + IOV_MAX) - start;
            let msg = libc::msghdr {
                msg_name: std::ptr::null_mut(),
                msg_namelen: 0,
                msg_iov: iov[start..].as_mut_ptr(),
                msg_iovlen: n,
                msg_control: std::ptr::null_mut(),
                msg_controllen: 0,
                msg_flags: 0,
            };
            // SAFETY: every iovec points at live memory (our buffers or guest memory inside a
            // region, checked by the caller); MSG_NOSIGNAL turns a dead peer into EPIPE, not
            // SIGPIPE.
            let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(crate::codec::io_error(e));
            }
            advance(iov, &mut start, r as usize);
        }
        Ok(())
    }
}

/// Where the receiver of a memory stream gets its bytes: a socket (vectored reads) or, for
/// tests and fuzzing, a byte slice.
pub trait PageSource {
    /// Fills `buf` completely.
    fn read_bytes(&mut self, buf: &mut [u8]) -> Result<()>;
    /// Fills every iovec (guest memory validated by the caller) completely.
    fn read_into(&mut self, iov: &mut [libc::iovec]) -> Result<()>;
}

impl PageSource for Stream {
    fn read_bytes(&mut self, buf: &mut [u8]) -> Result<()> {
        let mut iov = [libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }];
        self.read_into(&mut iov)
    }

    fn read_into(&mut self, iov: &mut [libc::iovec]) -> Result<()> {
        let fd = self.as_raw_fd();
        let mut start = 0;
        while start < iov.len() {
            let n = iov.len().min(start + IOV_MAX) - start;
            // SAFETY: the iovecs point into `buf` or into validated guest memory.
            let r = unsafe { libc::readv(fd, iov[start..].as_ptr(), n as libc::c_int) };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(crate::codec::io_error(e));
            }
            if r == 0 {
                return Err(Error::Disconnected);
            }
            advance(iov, &mut start, r as usize);
        }
        Ok(())
    }
}

impl PageSource for &[u8] {
    fn read_bytes(&mut self, buf: &mut [u8]) -> Result<()> {
        if self.len() < buf.len() {
            return Err(Error::Disconnected);
        }
        let (a, b) = self.split_at(buf.len());
        buf.copy_from_slice(a);
        *self = b;
        Ok(())
    }

    fn read_into(&mut self, iov: &mut [libc::iovec]) -> Result<()> {
        for v in iov.iter() {
            if self.len() < v.iov_len {
                return Err(Error::Disconnected);
            }
            let (a, b) = self.split_at(v.iov_len);
            // SAFETY: the iovec was validated by the receiver to lie inside guest memory.
            unsafe { std::ptr::copy_nonoverlapping(a.as_ptr(), v.iov_base.cast::<u8>(), a.len()) };
            *self = b;
        }
        Ok(())
    }
}

/// Moves past `done` transferred bytes: skips finished iovecs, shortens a partial one.
fn advance(iov: &mut [libc::iovec], start: &mut usize, mut done: usize) {
    while done > 0 && *start < iov.len() {
        let v = &mut iov[*start];
        if done >= v.iov_len {
            done -= v.iov_len;
            *start += 1;
        } else {
            // SAFETY: done < iov_len, so the new base stays inside the same buffer.
            v.iov_base = unsafe { v.iov_base.cast::<u8>().add(done) }.cast();
            v.iov_len -= done;
            done = 0;
        }
    }
    while *start < iov.len() && iov[*start].iov_len == 0 {
        *start += 1;
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The connections of one migration, as seen from one side.
#[derive(Debug)]
pub struct Connections {
    /// Structured messages (handshake, state, commit).
    pub control: Stream,
    /// Page streams, index order.
    pub memory: Vec<Stream>,
}

impl Connections {
    /// Shuts every connection down (used on failure so no peer waits forever).
    pub fn shutdown_all(&self) {
        self.control.shutdown();
        for m in &self.memory {
            m.shutdown();
        }
    }
}

/// Two connected ends in this process (socket pairs): `(source side, destination side)`.
pub fn in_process(memory_connections: usize) -> Result<(Connections, Connections)> {
    if memory_connections == 0 {
        return Err(Error::Protocol(
            "at least one memory connection is needed".into(),
        ));
    }
    let pair = || -> Result<(Stream, Stream)> {
        let (a, b) = UnixStream::pair().map_err(|e| io_err("socketpair", e))?;
        let (a, b) = (Stream::Unix(a), Stream::Unix(b));
        a.tune();
        b.tune();
        Ok((a, b))
    };
    let (cs, cd) = pair()?;
    let mut ms = Vec::new();
    let mut md = Vec::new();
    for _ in 0..memory_connections {
        let (s, d) = pair()?;
        ms.push(s);
        md.push(d);
    }
    Ok((
        Connections {
            control: cs,
            memory: ms,
        },
        Connections {
            control: cd,
            memory: md,
        },
    ))
}

fn open(ep: &Endpoint) -> std::io::Result<Stream> {
    let s = match ep {
        Endpoint::Tcp(a) => Stream::Tcp(TcpStream::connect_timeout(a, Duration::from_secs(10))?),
        Endpoint::Unix(p) => Stream::Unix(UnixStream::connect(p)?),
    };
    s.tune();
    Ok(s)
}

fn handshake_err(e: Error) -> Error {
    Error::Migration {
        phase: Phase::Handshake,
        source: Box::new(e),
    }
}

/// Source side: opens the control and `memory_connections` memory connections to `ep` and
/// exchanges the preamble. Errors are wrapped in [`Phase::Handshake`].
pub fn connect(ep: &Endpoint, memory_connections: usize, timeout: Duration) -> Result<Connections> {
    connect_with_version(ep, memory_connections, timeout, PROTOCOL_VERSION)
}

/// [`connect`] announcing an arbitrary protocol version: for testing a destination's refusal.
#[doc(hidden)]
pub fn connect_with_version(
    ep: &Endpoint,
    memory_connections: usize,
    timeout: Duration,
    version: u32,
) -> Result<Connections> {
    let run = || -> Result<Connections> {
        if memory_connections == 0 || memory_connections > MAX_MEMORY_CONNECTIONS as usize {
            return Err(Error::Protocol(format!(
                "{memory_connections} memory connections requested (1..={MAX_MEMORY_CONNECTIONS})"
            )));
        }
        let session = session_id();
        let ctx = |e| io_err(&format!("connecting to {ep}"), e);
        let mut control = open(ep).map_err(ctx)?;
        control.set_timeouts(Some(timeout))?;
        let pre = Preamble {
            version,
            role: Role::Control,
            index: 0,
            memory_count: memory_connections as u32,
            session,
        };
        control
            .write_all(&pre.encode())
            .map_err(crate::codec::io_error)?;
        let mut memory = Vec::new();
        for i in 0..memory_connections {
            let opened = open(ep).map_err(ctx).and_then(|mut m| {
                m.set_timeouts(Some(timeout))?;
                let pre = Preamble {
                    role: Role::Memory,
                    index: i as u32,
                    ..pre
                };
                m.write_all(&pre.encode()).map_err(crate::codec::io_error)?;
                Ok(m)
            });
            match opened {
                Ok(m) => memory.push(m),
                Err(e) => {
                    // A destination that refused the control connection's preamble stops
                    // listening at once: its verdict explains the failed connect better.
                    control.set_timeouts(Some(timeout.min(Duration::from_secs(1))))?;
                    return Err(match read_verdict(&mut control, version) {
                        Err(refusal @ (Error::Incompatible(_) | Error::Protocol(_))) => refusal,
                        _ => e,
                    });
                }
            }
        }
        read_verdict(&mut control, version)?;
        Ok(Connections { control, memory })
    };
    run().map_err(handshake_err)
}

/// Reads the destination's answer to the preamble: `Ok` when it accepted our `version`.
fn read_verdict(control: &mut Stream, version: u32) -> Result<()> {
    let mut reply = [0u8; PREAMBLE_REPLY_LEN];
    control
        .read_exact(&mut reply)
        .map_err(crate::codec::io_error)?;
    let reply = PreambleReply::decode(&reply)?;
    match reply.status {
        STATUS_OK => {}
        STATUS_VERSION_MISMATCH => {
            return Err(Error::Incompatible(format!(
                "destination speaks protocol version {}, we speak {version}",
                reply.version
            )));
        }
        s => {
            return Err(Error::Protocol(format!(
                "destination refused the connection set (status {s})"
            )));
        }
    }
    if reply.version != version {
        return Err(Error::Incompatible(format!(
            "destination accepted but speaks protocol version {}, we speak {version}",
            reply.version
        )));
    }
    Ok(())
}

fn session_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ (u64::from(std::process::id()) << 32) ^ 0x9e37_79b9_7f4a_7c15
}

/// Destination side: a listening socket.
#[derive(Debug)]
pub enum Listener {
    /// Listening on TCP.
    Tcp(TcpListener),
    /// Listening on a unix socket path (removed on drop).
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Binds to `ep` (TCP port 0 picks a free port; see [`Listener::endpoint`]).
    pub fn bind(ep: &Endpoint) -> Result<Listener> {
        match ep {
            Endpoint::Tcp(a) => TcpListener::bind(a)
                .map(Listener::Tcp)
                .map_err(|e| io_err(&format!("binding {ep}"), e)),
            Endpoint::Unix(p) => {
                let _ = std::fs::remove_file(p);
                UnixListener::bind(p)
                    .map(|l| Listener::Unix(l, p.clone()))
                    .map_err(|e| io_err(&format!("binding {ep}"), e))
            }
        }
    }

    /// The bound endpoint.
    pub fn endpoint(&self) -> Result<Endpoint> {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map(Endpoint::Tcp)
                .map_err(|e| io_err("local address", e)),
            Listener::Unix(_, p) => Ok(Endpoint::Unix(p.clone())),
        }
    }

    fn accept_one(&self, deadline: Instant, cancel: &AtomicBool) -> Result<Stream> {
        // Non-blocking accept after poll(2) says a connection waits, until the deadline: a
        // source that never comes cannot hang the destination, and a waiting destination
        // sleeps in the kernel instead of retrying accept.
        let set_nb = |nb: bool| match self {
            Listener::Tcp(l) => l.set_nonblocking(nb),
            Listener::Unix(l, _) => l.set_nonblocking(nb),
        };
        set_nb(true).map_err(|e| io_err("listener", e))?;
        loop {
            let r = match self {
                Listener::Tcp(l) => l.accept().map(|(s, _)| Stream::Tcp(s)),
                Listener::Unix(l, _) => l.accept().map(|(s, _)| Stream::Unix(s)),
            };
            match r {
                Ok(s) => {
                    match &s {
                        Stream::Tcp(t) => t.set_nonblocking(false),
                        Stream::Unix(u) => u.set_nonblocking(false),
                    }
                    .map_err(|e| io_err("accepted socket", e))?;
                    s.tune();
                    return Ok(s);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if cancel.load(Ordering::SeqCst) {
                        return Err(Error::Cancelled);
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Error::Timeout("waiting for the source to connect".into()));
                    }
                    // Woken now and then to see whether the wait was cancelled.
                    let left = left.min(CANCEL_CHECK);
                    let millis = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
                    let fd = match self {
                        Listener::Tcp(l) => l.as_fd(),
                        Listener::Unix(l, _) => l.as_fd(),
                    };
                    let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
                    match poll(&mut fds, PollTimeout::from(millis)) {
                        Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                        Err(e) => return Err(io_err("poll the listener", e.into())),
                    }
                }
                Err(e) => return Err(io_err("accept", e)),
            }
        }
    }

    /// Accepts one migration's control and memory connections and answers the preamble.
    /// A protocol-version mismatch is answered (so the source learns why) and returned as
    /// [`Error::Incompatible`]. Errors are wrapped in [`Phase::Handshake`].
    pub fn accept(&self, timeout: Duration) -> Result<Connections> {
        self.accept_unless(timeout, &AtomicBool::new(false))
    }

    /// [`Listener::accept`], given up with [`Error::Cancelled`] once `cancel` is set (seen
    /// within 0.1 s while no connection is open, within the preamble wait while one is).
    pub fn accept_unless(&self, timeout: Duration, cancel: &AtomicBool) -> Result<Connections> {
        let deadline = Instant::now() + timeout;
        let run = || -> Result<Connections> {
            let mut control: Option<(Stream, Preamble)> = None;
            let mut memory: Vec<Option<Stream>> = Vec::new();
            let mut pending: Vec<(Stream, Preamble)> = Vec::new();
            loop {
                let mut s = self.accept_one(deadline, cancel)?;
                let left = || {
                    deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(10))
                };
                // A peer that is not a source (a port scanner, a stray client, an idle
                // connection) is dropped, and the listener goes on waiting for the migration's
                // own connections: it holds the listener for PREAMBLE_WAIT at most.
                s.set_timeouts(Some(left().min(PREAMBLE_WAIT)))?;
                let mut b = [0u8; PREAMBLE_LEN];
                let read = s.read_exact(&mut b).map_err(crate::codec::io_error);
                let p = match read.and_then(|()| Preamble::decode(&b)) {
                    Ok(p) => p,
                    Err(e) => {
                        log::warn!("dropped a connection without a migration preamble: {e}");
                        continue;
                    }
                };
                s.set_timeouts(Some(left()))?;
                if p.version != PROTOCOL_VERSION {
                    refuse(&mut s, STATUS_VERSION_MISMATCH);
                    return Err(Error::Incompatible(format!(
                        "source speaks protocol version {}, we speak {PROTOCOL_VERSION}",
                        p.version
                    )));
                }
                match p.role {
                    Role::Control if control.is_none() => {
                        if p.memory_count == 0 || p.memory_count > MAX_MEMORY_CONNECTIONS {
                            refuse(&mut s, STATUS_MALFORMED);
                            return Err(Error::Protocol(format!(
                                "source announced {} memory connections",
                                p.memory_count
                            )));
                        }
                        memory = (0..p.memory_count).map(|_| None).collect();
                        control = Some((s, p));
                        for (m, mp) in std::mem::take(&mut pending) {
                            place(&mut memory, m, mp, &p)?;
                        }
                    }
                    Role::Control => {
                        return Err(Error::Protocol("second control connection".into()));
                    }
                    Role::Memory => match &control {
                        Some((_, cp)) => {
                            let cp = *cp;
                            place(&mut memory, s, p, &cp)?
                        }
                        None if pending.len() < MAX_MEMORY_CONNECTIONS as usize => {
                            pending.push((s, p))
                        }
                        None => return Err(Error::Protocol("too many connections".into())),
                    },
                }
                if control.is_some() && memory.iter().all(Option::is_some) {
                    break;
                }
            }
            let (mut control, _) = control.expect("checked above");
            let reply = PreambleReply {
                version: PROTOCOL_VERSION,
                status: STATUS_OK,
            };
            control
                .write_all(&reply.encode())
                .map_err(crate::codec::io_error)?;
            Ok(Connections {
                control,
                memory: memory
                    .into_iter()
                    .map(|m| m.expect("checked above"))
                    .collect(),
            })
        };
        run().map_err(handshake_err)
    }
}

/// Tells a source why its connection is refused (best effort: the error is ours to return).
fn refuse(s: &mut Stream, status: u32) {
    let reply = PreambleReply {
        version: PROTOCOL_VERSION,
        status,
    };
    let _ = s.write_all(&reply.encode());
}

fn place(memory: &mut [Option<Stream>], s: Stream, p: Preamble, control: &Preamble) -> Result<()> {
    if p.session != control.session {
        return Err(Error::Protocol(
            "memory connection from another session".into(),
        ));
    }
    let slot = memory.get_mut(p.index as usize).ok_or_else(|| {
        Error::Protocol(format!("memory connection index {} out of range", p.index))
    })?;
    if slot.is_some() {
        return Err(Error::Protocol(format!(
            "duplicate memory connection {}",
            p.index
        )));
    }
    *slot = Some(s);
    Ok(())
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn io_err(context: &str, source: std::io::Error) -> Error {
    Error::Io {
        context: context.to_string(),
        source,
    }
}

#[cfg(test)]
mod listener_tests {
    use super::*;
    use std::io::Write;

    /// A port scanner's garbage and an idle client come first: the listener drops both and
    /// accepts the source that connects after them.
    #[test]
    fn strangers_before_the_source_are_dropped_and_the_source_accepted() {
        let listener = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse().unwrap())).unwrap();
        let ep = listener.endpoint().unwrap();
        let Endpoint::Tcp(addr) = ep.clone() else {
            panic!("{ep:?}")
        };
        let mut garbage = std::net::TcpStream::connect(addr).unwrap();
        garbage.write_all(&[0x5a; PREAMBLE_LEN]).unwrap();
        let _idle = std::net::TcpStream::connect(addr).unwrap();
        let accepted = std::thread::spawn(move || listener.accept(Duration::from_secs(20)));
        let started = Instant::now();
        let source = connect(&ep, 1, Duration::from_secs(20)).unwrap();
        let destination = accepted.join().unwrap().unwrap();
        assert_eq!(destination.memory.len(), 1);
        assert_eq!(source.memory.len(), 1);
        assert!(
            started.elapsed() < PREAMBLE_WAIT + Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}

#[cfg(test)]
mod cancel_tests {
    use super::*;
    use std::sync::Arc;

    /// A destination torn down while it waits for a source that never comes: the wait ends
    /// at once with `Cancelled`, not at its timeout.
    #[test]
    fn a_cancelled_accept_ends_with_cancelled() {
        let listener = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse().unwrap())).unwrap();
        let cancel = Arc::new(AtomicBool::new(false));
        let waiting = std::thread::spawn({
            let cancel = cancel.clone();
            move || listener.accept_unless(Duration::from_secs(60), &cancel)
        });
        std::thread::sleep(Duration::from_millis(200));
        let t = Instant::now();
        cancel.store(true, Ordering::SeqCst);
        match waiting.join().unwrap() {
            Err(Error::Migration { source, .. }) => {
                assert!(matches!(*source, Error::Cancelled), "{source}")
            }
            other => panic!("{other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }
}

#[cfg(test)]
mod endpoint_tests {
    use super::Endpoint;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("127.0.0.1:4444".parse().unwrap())
        );
        assert_eq!(
            "127.0.0.1:5".parse::<Endpoint>().unwrap(),
            Endpoint::Tcp("127.0.0.1:5".parse().unwrap())
        );
        assert_eq!(
            "unix:/run/m.sock".parse::<Endpoint>().unwrap(),
            Endpoint::Unix("/run/m.sock".into())
        );
        for bad in ["unix:", "tcp:nohostport", "tcp:127.0.0.1:99999", ""] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad:?} accepted");
        }
    }
}
