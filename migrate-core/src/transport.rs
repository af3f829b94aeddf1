//! Connections between source and destination: TCP, unix socket, or an in-process socket pair;
//! always one control connection plus N memory connections, each in clear text or in its own
//! TLS 1.3 session ([`connect_tls`], [`Listener::bind_tls`]; see [`crate::tls`]).
//!
//! [`connect`] (source) and [`Listener::accept`] (destination) exchange the connection
//! preamble (see [`crate::protocol`]), so a protocol-version mismatch fails here, before the
//! handshake proper, with [`Error::Incompatible`] wrapped in [`Phase::Handshake`].
//!
//! The socket I/O of page batches lives here too: [`Stream`] gathers a batch from guest memory
//! into one `sendmsg` and scatters received pages into guest memory with `readv` (through the
//! TLS record layer when the stream is encrypted) ([`PageSource`]); what the bytes mean is
//! [`crate::protocol`]'s business.
//!
//! A [`Listener`] serves every accepted connection's handshake and preamble side by side on one
//! `poll` loop, with a deadline each and a bound on how many wait: idle, slow, garbage or
//! unauthenticated peers are dropped while the genuine source gets through.

use crate::protocol::{
    MAX_MEMORY_CONNECTIONS, PREAMBLE_LEN, PREAMBLE_REPLY_LEN, PROTOCOL_VERSION, Preamble,
    PreambleReply, Role, STATUS_MALFORMED, STATUS_OK, STATUS_VERSION_MISMATCH,
};
use crate::tls::{DestinationTls, Records, SourceTls, tls_error};
use crate::{Error, Phase, Result};
use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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

/// A connected socket.
#[derive(Debug)]
enum Socket {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Socket {
    fn try_clone(&self) -> std::io::Result<Socket> {
        match self {
            Socket::Tcp(s) => s.try_clone().map(Socket::Tcp),
            Socket::Unix(s) => s.try_clone().map(Socket::Unix),
        }
    }

    fn set_nonblocking(&self, nb: bool) -> std::io::Result<()> {
        match self {
            Socket::Tcp(s) => s.set_nonblocking(nb),
            Socket::Unix(s) => s.set_nonblocking(nb),
        }
    }
}

impl AsFd for Socket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Socket::Tcp(s) => s.as_fd(),
            Socket::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for &Socket {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Socket::Tcp(s) => (&*s).read(buf),
            Socket::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Socket {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Socket::Tcp(s) => (&*s).write(buf),
            Socket::Unix(s) => (&*s).write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[std::io::IoSlice<'_>]) -> std::io::Result<usize> {
        match self {
            Socket::Tcp(s) => (&*s).write_vectored(bufs),
            Socket::Unix(s) => (&*s).write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One byte stream of a migration: a socket, in clear text or inside a TLS session
/// ([`crate::tls`]). Clones ([`Stream::try_clone`]) share the socket and the session.
#[derive(Debug)]
pub struct Stream {
    socket: Socket,
    tls: Option<Arc<Mutex<Session>>>,
}

/// A TLS session over a stream's socket: rustls's until the connection preamble is through,
/// then the engine's own record layer on the same keys ([`Records`]).
enum Session {
    Handshake(Handshake),
    Records(Records),
    /// A take-over that failed: the stream is unusable.
    Broken,
}

fn broken() -> std::io::Error {
    std::io::Error::other("TLS: the record layer could not take the session over")
}

/// rustls's buffered session, for the handshake and the preamble.
struct Handshake {
    conn: rustls::Connection,
    /// Ciphertext read from the socket that rustls has not taken yet: whatever is left here
    /// at the take-over goes to the record layer, not lost inside rustls.
    ahead: Vec<u8>,
    start: usize,
    end: usize,
}

/// How much ciphertext one read(2) takes during the handshake and the preamble (a few small
/// records; the record layer has its own buffer for the traffic after them).
const READ_AHEAD: usize = 16 << 10;

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Session::Handshake(_) => "Session::Handshake",
            Session::Records(_) => "Session::Records",
            Session::Broken => "Session::Broken",
        })
    }
}

impl Session {
    fn new(conn: rustls::Connection) -> Session {
        Session::Handshake(Handshake {
            conn,
            ahead: vec![0; READ_AHEAD],
            start: 0,
            end: 0,
        })
    }

    /// Hands the session's traffic keys to the engine's record layer (once the preamble is
    /// through: nothing may be left in rustls's buffers).
    fn take_over(&mut self) -> Result<()> {
        if !matches!(self, Session::Handshake(_)) {
            return Ok(());
        }
        let Session::Handshake(h) = std::mem::replace(self, Session::Broken) else {
            unreachable!("checked above")
        };
        *self = Session::Records(Records::take_over(h.conn, &h.ahead[h.start..h.end])?);
        Ok(())
    }

    fn flush(&mut self, socket: &Socket) -> std::io::Result<()> {
        match self {
            Session::Handshake(h) => h.flush(socket),
            Session::Records(r) => r.flush(socket),
            Session::Broken => Err(broken()),
        }
    }

    fn send(&mut self, socket: &Socket, data: &[u8]) -> std::io::Result<()> {
        match self {
            Session::Handshake(h) => h.send(socket, data),
            Session::Records(r) => r.send(socket, data),
            Session::Broken => Err(broken()),
        }
    }

    fn recv(&mut self, socket: &Socket, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Session::Handshake(h) => h.recv(socket, buf),
            Session::Records(r) => r.recv(socket, buf),
            Session::Broken => Err(broken()),
        }
    }

    fn recv_exact(&mut self, socket: &Socket, mut buf: &mut [u8]) -> std::io::Result<()> {
        while !buf.is_empty() {
            match self.recv(socket, buf)? {
                0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                n => buf = &mut buf[n..],
            }
        }
        Ok(())
    }

    fn has_buffered(&mut self) -> bool {
        match self {
            Session::Handshake(h) => h.has_buffered(),
            Session::Records(r) => r.has_buffered(),
            Session::Broken => false,
        }
    }
}

impl Handshake {
    /// Writes out every record the session has queued (data, alerts, key updates).
    fn flush(&mut self, mut socket: &Socket) -> std::io::Result<()> {
        while self.conn.wants_write() {
            self.conn.write_tls(&mut socket)?;
        }
        Ok(())
    }

    /// Encrypts all of `data`, writing records out whenever the queue is full.
    fn send(&mut self, socket: &Socket, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let n = self.conn.writer().write(data)?;
            data = &data[n..];
            if n == 0 {
                self.flush(socket)?;
            }
        }
        Ok(())
    }

    /// Reads plaintext (0 at a clean close); a damaged, forged or truncated record is an
    /// error carrying the [`rustls::Error`].
    fn recv(&mut self, mut socket: &Socket, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.conn.reader().read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                r => return r,
            }
            self.flush(socket)?;
            if self.start == self.end {
                let n = loop {
                    match socket.read(&mut self.ahead) {
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        r => break r?,
                    }
                };
                (self.start, self.end) = (0, n);
                if n == 0 {
                    // End of stream: rustls then tells a close_notify from a truncation.
                    self.conn.read_tls(&mut &[][..])?;
                }
            }
            if self.start < self.end {
                self.start += self.conn.read_tls(&mut &self.ahead[self.start..self.end])?;
            }
            if let Err(e) = self.conn.process_new_packets() {
                let _ = self.flush(socket); // the alert that tells the peer why
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e));
            }
        }
    }

    /// Whether plaintext (or ciphertext not yet decrypted) waits in the session.
    fn has_buffered(&mut self) -> bool {
        self.start < self.end
            || self
                .conn
                .process_new_packets()
                .is_ok_and(|s| s.plaintext_bytes_to_read() > 0)
    }
}

impl Stream {
    fn plain(socket: Socket) -> Stream {
        Stream { socket, tls: None }
    }

    fn session(&self) -> Option<std::sync::MutexGuard<'_, Session>> {
        // A thread that panicked mid-record leaves the session unusable either way; the next
        // read or write fails on its own.
        self.tls
            .as_ref()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Hands a TLS stream's keys from rustls to the engine's record layer (after the
    /// preamble; see [`Records`]).
    fn take_over_tls(&self) -> Result<()> {
        match self.session() {
            Some(mut s) => s.take_over(),
            None => Ok(()),
        }
    }

    /// Whether the stream is inside a TLS session.
    pub fn is_encrypted(&self) -> bool {
        self.tls.is_some()
    }

    /// Sets read and write timeouts (`None` = block forever).
    pub fn set_timeouts(&self, t: Option<Duration>) -> Result<()> {
        let r = match &self.socket {
            Socket::Tcp(s) => s.set_read_timeout(t).and_then(|_| s.set_write_timeout(t)),
            Socket::Unix(s) => s.set_read_timeout(t).and_then(|_| s.set_write_timeout(t)),
        };
        r.map_err(|e| io_err("setting socket timeouts", e))
    }

    /// Sets only the read timeout.
    pub fn set_read_timeout(&self, t: Option<Duration>) -> Result<()> {
        let r = match &self.socket {
            Socket::Tcp(s) => s.set_read_timeout(t),
            Socket::Unix(s) => s.set_read_timeout(t),
        };
        r.map_err(|e| io_err("setting socket timeout", e))
    }

    /// Closes both directions; a peer blocked on it sees EOF or a reset.
    pub fn shutdown(&self) {
        let _ = match &self.socket {
            Socket::Tcp(s) => s.shutdown(Shutdown::Both),
            Socket::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }

    /// Another handle to the same socket (and TLS session).
    pub fn try_clone(&self) -> Result<Stream> {
        Ok(Stream {
            socket: self
                .socket
                .try_clone()
                .map_err(|e| io_err("cloning socket", e))?,
            tls: self.tls.clone(),
        })
    }

    /// Waits up to `ms` milliseconds for something to read (plaintext a TLS session already
    /// holds counts).
    pub fn wait_readable(&self, ms: u16) -> Result<bool> {
        if self.session().is_some_and(|mut s| s.has_buffered()) {
            return Ok(true);
        }
        let mut fds = [PollFd::new(self.socket.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(ms)) {
            Ok(n) => Ok(n > 0),
            Err(nix::errno::Errno::EINTR) => Ok(false),
            Err(e) => Err(io_err("poll", e.into())),
        }
    }

    fn tune(socket: &Socket) {
        if let Socket::Tcp(s) = socket {
            let _ = s.set_nodelay(true);
        }
        // Larger socket buffers keep the pipe full while the sender scans the next batch.
        let size: libc::c_int = 4 << 20;
        for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            // SAFETY: setsockopt on a valid fd we own, with a pointer to a c_int and its size.
            unsafe {
                libc::setsockopt(
                    socket.as_fd().as_raw_fd(),
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

/// How long an accepted connection has to complete its TLS handshake and send its preamble
/// before the listener drops it (a slow or idle peer holds one pending slot, nothing more).
const HANDSHAKE_WAIT: Duration = Duration::from_secs(5);
/// How many accepted connections may be in their handshake at once; past it the oldest is
/// dropped, so strangers cannot fill the listener and a genuine source still gets in.
pub const DEFAULT_MAX_PENDING: usize = 128;
/// How often a waiting [`Listener::accept_unless`] looks at its cancel flag.
const CANCEL_CHECK: Duration = Duration::from_millis(100);

/// The slices an iovec array describes.
///
/// # Safety
/// The iovec must point at `iov_len` bytes that stay valid for `'a`.
unsafe fn iov_slice<'a>(v: &libc::iovec) -> &'a [u8] {
    // SAFETY: the caller vouches for the memory (see above).
    unsafe { std::slice::from_raw_parts(v.iov_base.cast::<u8>(), v.iov_len) }
}

impl Stream {
    /// Writes every byte described by `iov` with `sendmsg` (or through the TLS session),
    /// advancing over partial writes. Every iovec must point at memory that stays valid for
    /// the call (our buffers, or guest memory checked to lie inside a region).
    pub(crate) fn send_vectored_all(&self, iov: &mut [libc::iovec]) -> Result<()> {
        if let Some(mut session) = self.session() {
            let sent = iov
                .iter()
                // SAFETY: as this function requires, each iovec points at live memory.
                .try_for_each(|v| session.send(&self.socket, unsafe { iov_slice(v) }))
                .and_then(|()| session.flush(&self.socket));
            return sent.map_err(crate::codec::io_error);
        }
        let fd = self.socket.as_fd().as_raw_fd();
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
        if let Some(mut session) = self.session() {
            for v in iov.iter() {
                // SAFETY: the iovecs point into our buffer or into validated guest memory,
                // which nothing else touches while a batch is received.
                let buf =
                    unsafe { std::slice::from_raw_parts_mut(v.iov_base.cast::<u8>(), v.iov_len) };
                session
                    .recv_exact(&self.socket, buf)
                    .map_err(crate::codec::io_error)?;
            }
            return Ok(());
        }
        let fd = self.socket.as_fd().as_raw_fd();
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
        self.socket.as_fd().as_raw_fd()
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.session() {
            Some(mut session) => session.recv(&self.socket, buf),
            None => (&self.socket).read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.session() {
            Some(mut session) => {
                session.send(&self.socket, buf)?;
                session.flush(&self.socket)?;
                Ok(buf.len())
            }
            None => (&self.socket).write(buf),
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
        let (a, b) = (Socket::Unix(a), Socket::Unix(b));
        Stream::tune(&a);
        Stream::tune(&b);
        Ok((Stream::plain(a), Stream::plain(b)))
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

fn open(ep: &Endpoint) -> std::io::Result<Socket> {
    let s = match ep {
        Endpoint::Tcp(a) => Socket::Tcp(TcpStream::connect_timeout(a, Duration::from_secs(10))?),
        Endpoint::Unix(p) => Socket::Unix(UnixStream::connect(p)?),
    };
    Stream::tune(&s);
    Ok(s)
}

/// Runs a source's TLS handshake on a blocking socket (its timeouts bound each step).
fn client_handshake(socket: Socket, tls: &SourceTls, ep: &Endpoint) -> Result<Stream> {
    let mut conn = tls.session()?;
    let failed = |e: std::io::Error| match crate::tls::from_io(&e) {
        Some(Error::Tls { source, .. }) => tls_error(format!("handshake with {ep}"), source),
        _ => crate::codec::io_error(e),
    };
    while conn.is_handshaking() {
        conn.complete_io(&mut &socket).map_err(failed)?;
    }
    Ok(Stream {
        socket,
        tls: Some(Arc::new(Mutex::new(Session::new(conn)))),
    })
}

fn handshake_err(e: Error) -> Error {
    Error::Migration {
        phase: Phase::Handshake,
        source: Box::new(e),
    }
}

/// Source side: opens the control and `memory_connections` memory connections to `ep` and
/// exchanges the preamble, in clear text. Errors are wrapped in [`Phase::Handshake`].
pub fn connect(ep: &Endpoint, memory_connections: usize, timeout: Duration) -> Result<Connections> {
    connect_with(ep, memory_connections, timeout, PROTOCOL_VERSION, None)
}

/// [`connect`] with every connection inside its own TLS session: the destination must show a
/// certificate from the site's CA valid for `tls`'s destination name, and gets ours.
pub fn connect_tls(
    ep: &Endpoint,
    memory_connections: usize,
    timeout: Duration,
    tls: &SourceTls,
) -> Result<Connections> {
    connect_with(ep, memory_connections, timeout, PROTOCOL_VERSION, Some(tls))
}

/// [`connect`] announcing an arbitrary protocol version: for testing a destination's refusal.
#[doc(hidden)]
pub fn connect_with_version(
    ep: &Endpoint,
    memory_connections: usize,
    timeout: Duration,
    version: u32,
) -> Result<Connections> {
    connect_with(ep, memory_connections, timeout, version, None)
}

fn connect_with(
    ep: &Endpoint,
    memory_connections: usize,
    timeout: Duration,
    version: u32,
    tls: Option<&SourceTls>,
) -> Result<Connections> {
    let run = || -> Result<Connections> {
        if memory_connections == 0 || memory_connections > MAX_MEMORY_CONNECTIONS as usize {
            return Err(Error::Protocol(format!(
                "{memory_connections} memory connections requested (1..={MAX_MEMORY_CONNECTIONS})"
            )));
        }
        let session = session_id();
        let dial = |pre: Preamble| -> Result<Stream> {
            let socket = open(ep).map_err(|e| io_err(&format!("connecting to {ep}"), e))?;
            let mut s = Stream::plain(socket);
            s.set_timeouts(Some(timeout))?;
            if let Some(tls) = tls {
                s = client_handshake(s.socket, tls, ep)?;
            }
            s.write_all(&pre.encode()).map_err(crate::codec::io_error)?;
            // A memory connection's TLS is the record layer's from here; the control
            // connection's once the verdict is read.
            if pre.role == Role::Memory {
                s.take_over_tls()?;
            }
            Ok(s)
        };
        let pre = Preamble {
            version,
            role: Role::Control,
            index: 0,
            memory_count: memory_connections as u32,
            session,
        };
        let mut control = dial(pre)?;
        let mut memory = Vec::new();
        for i in 0..memory_connections {
            match dial(Preamble {
                role: Role::Memory,
                index: i as u32,
                ..pre
            }) {
                Ok(m) => memory.push(m),
                Err(e) => {
                    // A destination that refused the control connection (its preamble, or our
                    // certificate) stops listening at once: its verdict explains the failed
                    // connect better.
                    control.set_timeouts(Some(timeout.min(Duration::from_secs(1))))?;
                    return Err(match read_verdict(&mut control, version) {
                        Err(
                            refusal @ (Error::Incompatible(_)
                            | Error::Protocol(_)
                            | Error::Tls { .. }),
                        ) => refusal,
                        _ => e,
                    });
                }
            }
        }
        read_verdict(&mut control, version)?;
        control.take_over_tls()?;
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

/// A listening socket.
#[derive(Debug)]
enum ListenSocket {
    Tcp(TcpListener),
    /// The path is removed on drop.
    Unix(UnixListener, PathBuf),
}

/// Destination side: a listening socket, in clear text or requiring TLS from every connection.
///
/// Strangers cannot take it down: each accepted connection has 5 s to finish
/// its TLS handshake and send its preamble, all of them progress side by side (an idle or slow
/// peer holds one slot, not the listener), at most [`Listener::set_max_pending`] wait at once
/// (the oldest is dropped past it), and one that fails authentication or sends garbage is
/// dropped while the listener goes on waiting for the migration's own connections.
#[derive(Debug)]
pub struct Listener {
    socket: ListenSocket,
    tls: Option<DestinationTls>,
    max_pending: usize,
}

/// An accepted connection on its way to a preamble.
struct Pending {
    socket: Socket,
    tls: Option<rustls::Connection>,
    preamble: [u8; PREAMBLE_LEN],
    got: usize,
    since: Instant,
    peer: String,
}

enum Step {
    /// Needs the socket readable (or writable, when `write`).
    Wait {
        write: bool,
    },
    Done(Preamble),
    Failed(Error),
}

impl Pending {
    /// Moves the handshake on as far as the non-blocking socket allows.
    fn advance(&mut self) -> Step {
        use std::io::ErrorKind::{Interrupted, WouldBlock};
        let io = |e: std::io::Error| Step::Failed(crate::codec::io_error(e));
        let Some(tls) = &mut self.tls else {
            loop {
                match (&self.socket).read(&mut self.preamble[self.got..]) {
                    Ok(0) => return Step::Failed(Error::Disconnected),
                    Ok(n) => {
                        self.got += n;
                        if self.got == PREAMBLE_LEN {
                            return self.decoded();
                        }
                    }
                    Err(e) if e.kind() == WouldBlock => return Step::Wait { write: false },
                    Err(e) if e.kind() == Interrupted => {}
                    Err(e) => return io(e),
                }
            }
        };
        loop {
            while tls.wants_write() {
                match tls.write_tls(&mut &self.socket) {
                    Ok(_) => {}
                    Err(e) if e.kind() == WouldBlock => return Step::Wait { write: true },
                    Err(e) if e.kind() == Interrupted => {}
                    Err(e) => return io(e),
                }
            }
            if !tls.is_handshaking() {
                match tls.reader().read(&mut self.preamble[self.got..]) {
                    Ok(0) => return Step::Failed(Error::Disconnected),
                    Ok(n) => {
                        self.got += n;
                        if self.got == PREAMBLE_LEN {
                            return self.decoded();
                        }
                        continue;
                    }
                    Err(e) if e.kind() == WouldBlock => {}
                    Err(e) => return io(e),
                }
            }
            match tls.read_tls(&mut &self.socket) {
                Ok(0) => return Step::Failed(Error::Disconnected),
                Ok(_) => {
                    if let Err(e) = tls.process_new_packets() {
                        let _ = tls.write_tls(&mut &self.socket); // the alert: why
                        return Step::Failed(tls_error(format!("handshake with {}", self.peer), e));
                    }
                }
                Err(e) if e.kind() == WouldBlock => return Step::Wait { write: false },
                Err(e) if e.kind() == Interrupted => {}
                Err(e) => return io(e),
            }
        }
    }

    fn decoded(&self) -> Step {
        match Preamble::decode(&self.preamble) {
            Ok(p) => Step::Done(p),
            Err(e) => Step::Failed(e),
        }
    }

    /// The connection as a blocking stream, once its preamble is in (a TLS one handed to the
    /// engine's record layer).
    fn into_stream(self) -> Result<Stream> {
        self.socket
            .set_nonblocking(false)
            .map_err(|e| io_err("accepted socket", e))?;
        let s = Stream {
            socket: self.socket,
            tls: self.tls.map(|c| Arc::new(Mutex::new(Session::new(c)))),
        };
        s.take_over_tls()?;
        Ok(s)
    }
}

impl Listener {
    /// Binds to `ep` for clear-text migrations (TCP port 0 picks a free port; see
    /// [`Listener::endpoint`]).
    pub fn bind(ep: &Endpoint) -> Result<Listener> {
        let socket = match ep {
            Endpoint::Tcp(a) => TcpListener::bind(a)
                .map(ListenSocket::Tcp)
                .map_err(|e| io_err(&format!("binding {ep}"), e))?,
            Endpoint::Unix(p) => {
                let _ = std::fs::remove_file(p);
                UnixListener::bind(p)
                    .map(|l| ListenSocket::Unix(l, p.clone()))
                    .map_err(|e| io_err(&format!("binding {ep}"), e))?
            }
        };
        let set_nb = match &socket {
            ListenSocket::Tcp(l) => l.set_nonblocking(true),
            ListenSocket::Unix(l, _) => l.set_nonblocking(true),
        };
        set_nb.map_err(|e| io_err("listener", e))?;
        Ok(Listener {
            socket,
            tls: None,
            max_pending: DEFAULT_MAX_PENDING,
        })
    }

    /// Binds to `ep`; every connection must complete a TLS handshake with a source `tls`
    /// accepts before its preamble is read.
    pub fn bind_tls(ep: &Endpoint, tls: DestinationTls) -> Result<Listener> {
        let mut l = Listener::bind(ep)?;
        l.tls = Some(tls);
        Ok(l)
    }

    /// How many accepted connections may be mid-handshake at once (default
    /// [`DEFAULT_MAX_PENDING`], at least 2).
    pub fn set_max_pending(&mut self, n: usize) {
        self.max_pending = n.max(2);
    }

    /// Whether connections must use TLS.
    pub fn is_encrypted(&self) -> bool {
        self.tls.is_some()
    }

    /// The bound endpoint.
    pub fn endpoint(&self) -> Result<Endpoint> {
        match &self.socket {
            ListenSocket::Tcp(l) => l
                .local_addr()
                .map(Endpoint::Tcp)
                .map_err(|e| io_err("local address", e)),
            ListenSocket::Unix(_, p) => Ok(Endpoint::Unix(p.clone())),
        }
    }

    fn fd(&self) -> BorrowedFd<'_> {
        match &self.socket {
            ListenSocket::Tcp(l) => l.as_fd(),
            ListenSocket::Unix(l, _) => l.as_fd(),
        }
    }

    /// One waiting connection, non-blocking, or `None` when none waits.
    fn accept_pending(&self) -> Result<Option<Pending>> {
        let accepted = match &self.socket {
            ListenSocket::Tcp(l) => l
                .accept()
                .map(|(s, a)| (Socket::Tcp(s), format!("tcp:{a}"))),
            ListenSocket::Unix(l, p) => l
                .accept()
                .map(|(s, _)| (Socket::Unix(s), format!("unix:{}", p.display()))),
        };
        let (socket, peer) = match accepted {
            Ok(a) => a,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::Interrupted =>
            {
                return Ok(None);
            }
            // The peer gave up between SYN and accept: nothing to do with us.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => return Ok(None),
            Err(e) => return Err(io_err("accept", e)),
        };
        socket
            .set_nonblocking(true)
            .map_err(|e| io_err("accepted socket", e))?;
        Stream::tune(&socket);
        Ok(Some(Pending {
            socket,
            tls: self.tls.as_ref().map(DestinationTls::session).transpose()?,
            preamble: [0; PREAMBLE_LEN],
            got: 0,
            since: Instant::now(),
            peer,
        }))
    }

    /// Accepts one migration's control and memory connections and answers the preamble.
    /// A protocol-version mismatch is answered (so the source learns why) and returned as
    /// [`Error::Incompatible`]. Errors are wrapped in [`Phase::Handshake`].
    pub fn accept(&self, timeout: Duration) -> Result<Connections> {
        self.accept_unless(timeout, &AtomicBool::new(false))
    }

    /// [`Listener::accept`], given up with [`Error::Cancelled`] once `cancel` is set (seen
    /// within 0.1 s).
    pub fn accept_unless(&self, timeout: Duration, cancel: &AtomicBool) -> Result<Connections> {
        let deadline = Instant::now() + timeout;
        let run = || -> Result<Connections> {
            let mut set = ConnectionSet::default();
            let mut pending: std::collections::VecDeque<Pending> = Default::default();
            let mut wants_write: Vec<bool> = Vec::new();
            loop {
                if cancel.load(Ordering::SeqCst) {
                    return Err(Error::Cancelled);
                }
                let now = Instant::now();
                if now >= deadline {
                    return Err(Error::Timeout("waiting for the source to connect".into()));
                }
                // Sleep in the kernel until a connection or a pending peer moves, a pending
                // peer's time is up, or it is time to look at the cancel flag.
                let wake = pending
                    .iter()
                    .map(|p| p.since + HANDSHAKE_WAIT)
                    .min()
                    .unwrap_or(deadline)
                    .min(deadline)
                    .min(now + CANCEL_CHECK);
                let millis = wake.saturating_duration_since(now).as_millis().max(1);
                let mut fds = Vec::with_capacity(1 + pending.len());
                fds.push(PollFd::new(self.fd(), PollFlags::POLLIN));
                for (p, w) in pending.iter().zip(&wants_write) {
                    let events = if *w {
                        PollFlags::POLLIN | PollFlags::POLLOUT
                    } else {
                        PollFlags::POLLIN
                    };
                    fds.push(PollFd::new(p.socket.as_fd(), events));
                }
                match poll(
                    &mut fds,
                    PollTimeout::from(u16::try_from(millis).unwrap_or(u16::MAX)),
                ) {
                    Ok(_) | Err(nix::errno::Errno::EINTR) => {}
                    Err(e) => return Err(io_err("poll the listener", e.into())),
                }
                let ready: Vec<bool> = fds
                    .iter()
                    .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
                    .collect();
                drop(fds);

                // Move every peer that has something on; drop the failed and the late.
                let now = Instant::now();
                let mut kept = std::collections::VecDeque::with_capacity(pending.len());
                wants_write.clear();
                for (mut p, ready) in pending.drain(..).zip(ready[1..].iter().copied()) {
                    let step = if ready {
                        p.advance()
                    } else if now >= p.since + HANDSHAKE_WAIT {
                        Step::Failed(Error::Timeout(format!(
                            "no handshake and preamble within {} s",
                            HANDSHAKE_WAIT.as_secs()
                        )))
                    } else {
                        Step::Wait { write: false }
                    };
                    match step {
                        Step::Wait { write } => {
                            kept.push_back(p);
                            wants_write.push(write);
                        }
                        Step::Failed(e) => log::warn!("dropped a connection from {}: {e}", p.peer),
                        Step::Done(preamble) => {
                            let peer = p.peer.clone();
                            match p.into_stream() {
                                Ok(stream) => {
                                    if set.add(stream, preamble)? {
                                        return set.finish();
                                    }
                                }
                                Err(e) => log::warn!("dropped a connection from {peer}: {e}"),
                            }
                        }
                    }
                }
                pending = kept;

                if ready[0] {
                    while let Some(p) = self.accept_pending()? {
                        if pending.len() >= self.max_pending {
                            if let Some(old) = pending.pop_front() {
                                wants_write.remove(0);
                                log::warn!(
                                    "dropped a connection from {}: more than {} connections in their handshake",
                                    old.peer,
                                    self.max_pending
                                );
                            }
                        }
                        pending.push_back(p);
                        wants_write.push(false);
                    }
                }
            }
        };
        run().map_err(handshake_err)
    }
}

/// The connections of a migration as they come in, in any order.
#[derive(Default)]
struct ConnectionSet {
    control: Option<(Stream, Preamble)>,
    memory: Vec<Option<Stream>>,
    /// Memory connections that came before the control connection.
    early: Vec<(Stream, Preamble)>,
}

impl ConnectionSet {
    /// Takes one connection; `true` once the set is complete.
    fn add(&mut self, mut s: Stream, p: Preamble) -> Result<bool> {
        if p.version != PROTOCOL_VERSION {
            refuse(&mut s, STATUS_VERSION_MISMATCH);
            return Err(Error::Incompatible(format!(
                "source speaks protocol version {}, we speak {PROTOCOL_VERSION}",
                p.version
            )));
        }
        match p.role {
            Role::Control if self.control.is_none() => {
                if p.memory_count == 0 || p.memory_count > MAX_MEMORY_CONNECTIONS {
                    refuse(&mut s, STATUS_MALFORMED);
                    return Err(Error::Protocol(format!(
                        "source announced {} memory connections",
                        p.memory_count
                    )));
                }
                self.memory = (0..p.memory_count).map(|_| None).collect();
                self.control = Some((s, p));
                for (m, mp) in std::mem::take(&mut self.early) {
                    place(&mut self.memory, m, mp, &p)?;
                }
            }
            Role::Control => return Err(Error::Protocol("second control connection".into())),
            Role::Memory => match &self.control {
                Some((_, cp)) => {
                    let cp = *cp;
                    place(&mut self.memory, s, p, &cp)?
                }
                None if self.early.len() < MAX_MEMORY_CONNECTIONS as usize => {
                    self.early.push((s, p))
                }
                None => return Err(Error::Protocol("too many connections".into())),
            },
        }
        Ok(self.control.is_some() && self.memory.iter().all(Option::is_some))
    }

    /// Accepts the complete set (answers the preamble).
    fn finish(self) -> Result<Connections> {
        let (mut control, _) = self.control.expect("complete set");
        let reply = PreambleReply {
            version: PROTOCOL_VERSION,
            status: STATUS_OK,
        };
        control
            .write_all(&reply.encode())
            .map_err(crate::codec::io_error)?;
        Ok(Connections {
            control,
            memory: self
                .memory
                .into_iter()
                .map(|m| m.expect("complete set"))
                .collect(),
        })
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
        if let ListenSocket::Unix(_, p) = &self.socket {
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
            started.elapsed() < HANDSHAKE_WAIT,
            "{:?}",
            started.elapsed()
        );
    }

    /// More idle peers than the listener keeps: the oldest are dropped, the source that comes
    /// after them gets in.
    #[test]
    fn a_full_listener_drops_its_oldest_peer_for_a_new_one() {
        let mut listener = Listener::bind(&Endpoint::Tcp("127.0.0.1:0".parse().unwrap())).unwrap();
        listener.set_max_pending(4);
        let ep = listener.endpoint().unwrap();
        let Endpoint::Tcp(addr) = ep.clone() else {
            panic!("{ep:?}")
        };
        let idle: Vec<_> = (0..10)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        let accepted = std::thread::spawn(move || listener.accept(Duration::from_secs(20)));
        std::thread::sleep(Duration::from_millis(300));
        let started = Instant::now();
        let source = connect(&ep, 2, Duration::from_secs(20)).unwrap();
        let destination = accepted.join().unwrap().unwrap();
        assert_eq!((source.memory.len(), destination.memory.len()), (2, 2));
        assert!(
            started.elapsed() < HANDSHAKE_WAIT,
            "{:?}",
            started.elapsed()
        );
        drop(idle);
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
