//! Endpoints on any host: a plan names every QMP monitor and guest channel by address, never
//! assuming one machine.
//!
//! - `unix:/path`: a unix socket on this host;
//! - `tcp:HOST:PORT`: a TCP address (QMP only; guest channels are unix sockets);
//! - `ssh:HOST:/path`: a unix socket on another host, reached through OpenSSH's stream-local
//!   forwarding (`ssh -N -L LOCAL:REMOTE HOST`), the tool operators already trust.
//!
//! [`Connector::local_path`] turns an address into a local socket path, starting the forward
//! when needed; the forward lives as long as the connector (dropping it ends every forward),
//! restarted at the same path when its ssh dies, and errors through a forward that died say so
//! ([`Connector::forward_failure`]).
//! `symvirt/tests/controller_ssh.rs` runs these forwards against a private sshd on loopback.

use crate::error::{Error, Result};
use qmp::Endpoint;
use std::fmt;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::UnixStream;
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Where a socket is.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Address {
    /// Reached directly from this host: a unix socket here, or `host:port`.
    Local(Endpoint),
    /// A unix socket on `host`, reached through `ssh`.
    Ssh {
        /// The host, as `ssh` takes it (`node7`, `user@node7`).
        host: String,
        /// The socket's path on that host.
        path: PathBuf,
    },
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Local(e) => write!(f, "{e}"),
            Address::Ssh { host, path } => write!(f, "ssh:{host}:{}", path.display()),
        }
    }
}

/// Whether `host` is a host name or address `ssh` takes (no option, no shell word).
pub fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && !host.starts_with('-')
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-._@[]:".contains(c))
}

/// A socket path as written in a plan, in its lexical normal form (`/a/.//b` is `/a/b`), or
/// why it cannot name a unix socket.
fn socket_path(path: &str) -> std::result::Result<PathBuf, String> {
    if !path.starts_with('/') {
        return Err(format!("unix socket path {path:?} must be absolute"));
    }
    if path.contains(|c: char| c.is_control()) {
        return Err(format!(
            "unix socket path {path:?} holds a control character (NUL, newline, ...)"
        ));
    }
    if path.ends_with('/') {
        return Err(format!("unix socket path {path:?} names a directory"));
    }
    let p = Path::new(path);
    // Where `..` leads depends on symlinks: two spellings could name one socket unseen.
    if p.components().any(|c| c == Component::ParentDir) {
        return Err(format!("unix socket path {path:?} holds '..'"));
    }
    let normal: PathBuf = p.components().collect();
    check_socket_path_len(&normal)?;
    Ok(normal)
}

impl From<Endpoint> for Address {
    fn from(e: Endpoint) -> Address {
        Address::Local(e)
    }
}

impl Address {
    /// What two addresses share when they reach the same socket: the path with its existing
    /// parent directory resolved (symlinks), a host name without its `user@` and case, and
    /// every name of this host's loopback (`localhost`, `127.0.0.1`, `[::1]`) as one.
    pub fn identity(&self) -> String {
        match self {
            Address::Local(Endpoint::Unix(p)) => format!("unix:{}", resolved(p).display()),
            Address::Local(Endpoint::Tcp(a) | Endpoint::Tls(a)) => {
                let (host, port) = a.rsplit_once(':').unwrap_or((a, ""));
                format!("tcp:{}:{port}", host_identity(host))
            }
            Address::Ssh { host, path } => {
                let host = host.rsplit_once('@').map_or(host.as_str(), |(_, h)| h);
                format!("ssh:{}:{}", host_identity(host), path.display())
            }
        }
    }
}

impl Address {
    /// Whether reaching this address leaves this host unprotected: `tcp:` to a host other than
    /// this one's loopback (`ssh:` is ssh's, `unix:` is local).
    pub fn crosses_hosts(&self) -> bool {
        matches!(self, Address::Local(Endpoint::Tcp(_))) && !self.is_on("localhost")
    }

    /// Whether this address is on `host` (a name as an operator gives it: `user@` and case
    /// ignored, every name of this host's loopback one host; a `unix:` path is on this host).
    pub fn is_on(&self, host: &str) -> bool {
        let here = match self {
            Address::Local(Endpoint::Unix(_)) => host_identity("localhost"),
            Address::Local(Endpoint::Tcp(a) | Endpoint::Tls(a)) => {
                host_identity(a.rsplit_once(':').map_or(a.as_str(), |(h, _)| h))
            }
            Address::Ssh { host, .. } => {
                host_identity(host.rsplit_once('@').map_or(host.as_str(), |(_, h)| h))
            }
        };
        here == host_identity(host.rsplit_once('@').map_or(host, |(_, h)| h))
    }
}

/// `path` with its symlinks resolved as far as it exists here (the socket itself, else its
/// parent directory).
fn resolved(path: &Path) -> PathBuf {
    if let Ok(whole) = std::fs::canonicalize(path) {
        return whole;
    }
    match (path.parent(), path.file_name()) {
        (Some(dir), Some(name)) => std::fs::canonicalize(dir)
            .map(|d| d.join(name))
            .unwrap_or_else(|_| path.to_owned()),
        _ => path.to_owned(),
    }
}

fn host_identity(host: &str) -> String {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let local = bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified());
    if local {
        "loopback".into()
    } else {
        bare.to_ascii_lowercase()
    }
}

/// Checks `HOST:PORT` (the host may be a bracketed IPv6 address).
pub fn check_host_port(addr: &str) -> std::result::Result<(), String> {
    let (host, port) = addr
        .rsplit_once(':')
        .ok_or_else(|| format!("{addr:?} is not HOST:PORT"))?;
    if host.is_empty() || !valid_host(host) {
        return Err(format!("bad host {host:?}"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(()),
        _ => Err(format!("bad port {port:?}")),
    }
}

impl FromStr for Address {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Address, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            Ok(Endpoint::Unix(socket_path(path)?).into())
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            check_host_port(addr)?;
            Ok(Endpoint::Tcp(addr.into()).into())
        } else if let Some(addr) = s.strip_prefix("tls:") {
            check_host_port(addr)?;
            Ok(Endpoint::Tls(addr.into()).into())
        } else if let Some(rest) = s.strip_prefix("ssh:") {
            let (host, path) = rest
                .split_once(":/")
                .ok_or_else(|| format!("{s:?} is not ssh:HOST:/PATH"))?;
            if !valid_host(host) {
                return Err(format!("bad ssh host {host:?}"));
            }
            Ok(Address::Ssh {
                host: host.into(),
                path: socket_path(&format!("/{path}"))?,
            })
        } else {
            Err(format!(
                "{s:?}: expected unix:/PATH, tcp:HOST:PORT, tls:HOST:PORT or ssh:HOST:/PATH"
            ))
        }
    }
}

/// Checks a QEMU migration URI: `tcp:HOST:PORT` or `unix:/PATH`.
pub fn check_migrate_uri(uri: &str) -> std::result::Result<(), String> {
    if let Some(addr) = uri.strip_prefix("tcp:") {
        check_host_port(addr)
    } else if let Some(path) = uri.strip_prefix("unix:") {
        socket_path(path).map(drop)
    } else {
        Err(format!("{uri:?}: expected tcp:HOST:PORT or unix:/PATH"))
    }
}

/// An `ssh -N -L` forward: its current ssh client, restarted at the same local path when it
/// dies; killed on drop.
#[derive(Debug)]
struct Forward {
    host: String,
    remote: PathBuf,
    local: PathBuf,
    log: PathBuf,
    child: Child,
    started: Instant,
    /// How its last ssh ended (status and ssh's last words), once one has.
    ended: Option<String>,
    /// Restarts in a row whose ssh ended soon after starting (the host is down).
    failures: u32,
}

impl Forward {
    /// Whether its ssh still runs.
    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// What ssh said (its errors: refused connection, failed authentication, ...).
    fn said(&self) -> String {
        std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b).trim().to_owned())
            .unwrap_or_default()
    }

    /// Starts ssh for this forward (its messages appended to the log).
    fn spawn(ssh: &str, host: &str, remote: &Path, local: &Path, log: &Path) -> Result<Child> {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| Error::io(format!("open {}", log.display()), e))?;
        // ssh's messages go to a file: a pipe nobody drains would stall a long-lived forward
        // once full (ssh reports every refused remote connection).
        forward_command(ssh, host, local, remote)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .map_err(|e| {
                Error::io(
                    format!("ssh forward to {host}:{}: start {ssh}", remote.display()),
                    e,
                )
            })
    }

    /// If its ssh died, records how and starts another: at once after a forward that ran a
    /// while, then backing off (a host that is down costs an ssh attempt per
    /// [`RESTART_INTERVAL`], doubling up to 64 times that).
    fn keep_alive(&mut self, ssh: &str) {
        let Ok(Some(status)) = self.child.try_wait() else {
            return;
        };
        let ran = self.started.elapsed();
        if ran >= HEALTHY_RUN {
            self.failures = 0;
        } else if ran < RESTART_INTERVAL * (1 << self.failures.min(6)) {
            return;
        } else {
            self.failures += 1;
        }
        let said = self.said();
        let last = said.lines().last().unwrap_or_default();
        self.ended = Some(format!(
            "{status}{}{last}",
            if last.is_empty() { "" } else { ": " }
        ));
        if let Ok(child) = Forward::spawn(ssh, &self.host, &self.remote, &self.local, &self.log) {
            self.child = child;
        }
        self.started = Instant::now();
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.local);
        let _ = std::fs::remove_file(&self.log);
    }
}

/// How often dead forwards are looked for, and restarted at most.
const RESTART_INTERVAL: Duration = Duration::from_millis(500);

/// An ssh that ran this long was a working forward: its end restarts it without delay.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

/// Ends what a dead run's connector left in `dir`: the ssh clients of its forwards (processes
/// of this user whose `-L` argument has its local end in `dir`; they outlive a controller
/// killed with SIGKILL) and the directory itself. Returns how many processes it ended.
pub fn clear_forwards(dir: &Path, deadline: Instant) -> Result<usize> {
    let mut prefix = dir.as_os_str().as_bytes().to_vec();
    prefix.extend_from_slice(b"/fwd-");
    let left: Vec<u32> = std::fs::read_dir("/proc")
        .map_err(|e| Error::io("list /proc", e))?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| forwards_into(pid, &prefix))
        .collect();
    for &pid in &left {
        // SAFETY: kill(2) on a pid just seen to be one of this run's ssh forwards.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
    }
    for &pid in &left {
        while forwards_into(pid, &prefix) {
            if Instant::now() >= deadline {
                return Err(Error::Refused(format!(
                    "ssh forward {pid} of {} does not end",
                    dir.display()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::io(format!("remove {}", dir.display()), e))
        }
        _ => Ok(left.len()),
    }
}

/// Creates `dir`, mode 0700; it must not exist.
fn make_private_dir(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|e| Error::io(format!("create {}", dir.display()), e))
}

/// Whether live process `pid` is an ssh forward whose local end starts with `prefix`.
fn forwards_into(pid: u32, prefix: &[u8]) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut words = cmdline.split(|&b| b == 0);
    // A zombie has an empty command line and is gone for our purposes.
    words.any(|w| w == b"-L") && words.next().is_some_and(|w| w.starts_with(prefix))
}

/// Longest unix socket path: `sun_path` holds 108 bytes with the terminating NUL.
pub const MAX_SOCKET_PATH: usize = 107;

/// Whether a unix socket can be bound or reached at `path`.
pub fn check_socket_path_len(path: &Path) -> std::result::Result<(), String> {
    let len = path.as_os_str().len();
    if len > MAX_SOCKET_PATH {
        // Not the path itself: it may be megabytes.
        return Err(format!(
            "{len} bytes long, a unix socket path holds at most {MAX_SOCKET_PATH}"
        ));
    }
    Ok(())
}

/// The command line of a stream-local forward from `local` to `remote` on `host`.
pub fn forward_command(ssh: &str, host: &str, local: &Path, remote: &Path) -> Command {
    let mut cmd = Command::new(ssh);
    cmd.args([
        "-N",
        "-o",
        "ExitOnForwardFailure=yes",
        "-o",
        "BatchMode=yes",
    ])
    .args(["-o", "StreamLocalBindUnlink=yes", "-L"])
    .arg(format!("{}:{}", local.display(), remote.display()))
    .arg("--")
    .arg(host);
    cmd
}

/// Whether a unix socket is bound at `path` and listening, from the kernel's socket table.
///
/// Probing by connecting would open a connection to the remote socket through the forward
/// (a QMP session, or a guest channel connection the guest sees come and go); the table shows
/// the listening socket without touching the far end. `None` when the table is unreadable.
fn listening(path: &Path) -> Option<bool> {
    const SO_ACCEPTCON: u32 = 0x0001_0000;
    let wanted = path.to_string_lossy();
    if wanted.contains(char::is_whitespace) {
        // The table separates its columns by spaces.
        return None;
    }
    let table = std::fs::read_to_string("/proc/net/unix").ok()?;
    Some(table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        // Num RefCount Protocol Flags Type St Inode Path
        fields.len() >= 8
            && fields[7] == wanted
            && u32::from_str_radix(fields[3], 16).is_ok_and(|f| f & SO_ACCEPTCON != 0)
    }))
}

/// Whether process `pid` is exiting (`PF_EXITING` in /proc/PID/stat): it has begun closing
/// its files but may not be reapable yet.
fn exiting(pid: u32) -> bool {
    const PF_EXITING: u64 = 0x4;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // After "PID (COMM) ": state ppid pgrp session tty_nr tpgid flags ...
            let (_, rest) = stat.rsplit_once(')')?;
            rest.split_whitespace().nth(6)?.parse::<u64>().ok()
        })
        .is_some_and(|flags| flags & PF_EXITING != 0)
}

fn up(local: &Path) -> bool {
    listening(local).unwrap_or_else(|| UnixStream::connect(local).is_ok())
}

/// The forwards and what keeps them alive, shared with the keeper thread.
#[derive(Debug)]
struct Forwards {
    ssh_program: String,
    list: Mutex<Vec<Forward>>,
}

impl Forwards {
    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Forward>> {
        self.list.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Resolves addresses to local sockets, owning the ssh forwards it starts.
///
/// One forward per remote socket, shared by every connection to it. A forward that came up
/// once is kept up: when its ssh dies (a dropped connection, a restarted sshd), a keeper
/// thread starts another at the same local path, so whoever reconnects by path (a guest
/// channel, a monitor reached again for a rollback) gets through once the host answers.
#[derive(Debug)]
pub struct Connector {
    /// Where the forwards' sockets and logs go: made at the first forward when the connector
    /// was made by [`Connector::new`] (`None` until then), so that a run with no remote
    /// address, even one killed, leaves no directory behind.
    dir: Mutex<Option<PathBuf>>,
    next: AtomicU32,
    forwards: Arc<Forwards>,
    keeper: Mutex<Option<Keeper>>,
}

/// The thread restarting dead forwards; stops when `stop` is dropped.
#[derive(Debug)]
struct Keeper {
    stop: Sender<()>,
    thread: JoinHandle<()>,
}

impl Connector {
    /// A connector that runs `ssh_program` for remote addresses and puts forwarded sockets in
    /// a fresh private directory under the temporary directory, made at the first forward.
    pub fn new(ssh_program: impl Into<String>) -> Result<Connector> {
        Ok(Connector::with_dir(ssh_program, None))
    }

    /// A connector whose forwards live in `dir`, which it creates (mode 0700; it must not
    /// exist) and removes when dropped. A run journals `dir`, so that after the run's death
    /// [`clear_forwards`] can end what it left.
    pub fn in_dir(ssh_program: impl Into<String>, dir: PathBuf) -> Result<Connector> {
        make_private_dir(&dir)?;
        Ok(Connector::with_dir(ssh_program, Some(dir)))
    }

    fn with_dir(ssh_program: impl Into<String>, dir: Option<PathBuf>) -> Connector {
        Connector {
            dir: Mutex::new(dir),
            next: AtomicU32::new(0),
            forwards: Arc::new(Forwards {
                ssh_program: ssh_program.into(),
                list: Mutex::new(Vec::new()),
            }),
            keeper: Mutex::new(None),
        }
    }

    /// The forwards' directory, made now if it is not yet.
    fn dir(&self) -> Result<PathBuf> {
        let mut dir = self.dir.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = &*dir {
            return Ok(d.clone());
        }
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let mut skipped = 0;
        loop {
            let fresh = std::env::temp_dir().join(format!(
                "symvirt-fwd-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            match make_private_dir(&fresh) {
                Ok(()) => return Ok(dir.insert(fresh).clone()),
                // Taken by a killed process that had this pid: skip such leftovers (never
                // touching them), a bounded number of times.
                Err(Error::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::AlreadyExists && skipped < 1024 =>
                {
                    skipped += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A local unix socket path for `address`: the path itself, or the local end of an ssh
    /// forward (started when none runs for it, waiting until it listens, at most until
    /// `deadline`). TCP addresses have no path: [`Error::Config`].
    pub fn local_path(&self, address: &Address, deadline: Instant) -> Result<PathBuf> {
        match address {
            Address::Local(Endpoint::Unix(p)) => Ok(p.clone()),
            Address::Local(e @ (Endpoint::Tcp(_) | Endpoint::Tls(_))) => Err(Error::Config(
                format!("{e} cannot be used as a unix socket"),
            )),
            Address::Ssh { host, path } => self.forward(host, path, deadline),
        }
    }

    /// A QMP endpoint for `address`.
    pub fn qmp_endpoint(&self, address: &Address, deadline: Instant) -> Result<Endpoint> {
        match address {
            Address::Local(e) => Ok(e.clone()),
            Address::Ssh { host, path } => self.forward(host, path, deadline).map(Endpoint::Unix),
        }
    }

    /// The process ids of the forwards' ssh clients now running.
    pub fn forward_pids(&self) -> Vec<u32> {
        self.forwards
            .lock()
            .iter_mut()
            .filter_map(|f| f.alive().then(|| f.child.id()))
            .collect()
    }

    /// Why connections to `address` broke, when that is its ssh forward ending (now down, or
    /// restarted since), for errors that would otherwise blame the far end.
    pub fn forward_failure(&self, address: &Address) -> Option<String> {
        self.with_forward(address, |f| {
            let what = format!("ssh forward to {}:{}", f.host, f.remote.display());
            // A connection through a dying ssh closes before the process can be reaped.
            if exiting(f.child.id()) {
                let _ = f.child.wait();
            }
            match f.child.try_wait() {
                Ok(Some(status)) => {
                    let said = f.said();
                    let last = said.lines().last().unwrap_or_default();
                    Some(format!(
                        "{what} ended ({status}){}{last}; restarting",
                        if last.is_empty() { "" } else { ": " }
                    ))
                }
                _ => f
                    .ended
                    .as_ref()
                    .map(|e| format!("{what} ended ({e}); restarted")),
            }
        })
    }

    /// What the ssh of `address`'s forward said last (e.g. `channel 2: open failed: ...` when
    /// the remote socket refused a connection), or why it ended.
    pub fn forward_message(&self, address: &Address) -> Option<String> {
        self.with_forward(address, |f| {
            let alive = f.alive();
            let said = f.said();
            let last = said.lines().last()?;
            Some(format!(
                "ssh forward to {}:{}{}: {last}",
                f.host,
                f.remote.display(),
                if alive { "" } else { " (down)" }
            ))
        })
    }

    /// Runs `look` on the forward of an `ssh:` address, if there is one.
    fn with_forward<T>(
        &self,
        address: &Address,
        look: impl FnOnce(&mut Forward) -> Option<T>,
    ) -> Option<T> {
        let Address::Ssh { host, path } = address else {
            return None;
        };
        let mut forwards = self.forwards.lock();
        let f = forwards
            .iter_mut()
            .find(|f| &f.host == host && &f.remote == path)?;
        look(f)
    }

    fn forward(&self, host: &str, remote: &Path, deadline: Instant) -> Result<PathBuf> {
        let what = format!("ssh forward to {host}:{}", remote.display());
        let known = self
            .forwards
            .lock()
            .iter()
            .find(|f| f.host == host && f.remote == remote)
            .map(|f| f.local.clone());
        if let Some(local) = known {
            // Kept up by the keeper: wait for it to listen (again).
            loop {
                if up(&local) {
                    return Ok(local);
                }
                if Instant::now() >= deadline {
                    let said = self
                        .forward_failure(&Address::Ssh {
                            host: host.to_owned(),
                            path: remote.to_owned(),
                        })
                        .unwrap_or_else(|| format!("{what}: not listening"));
                    return Err(Error::Deadline(format!("{said} (at the deadline)")));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        // A new forward, started without the lock held: several VMs' come up in parallel.
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let dir = self.dir()?;
        let local = dir.join(format!("fwd-{n}.sock"));
        check_socket_path_len(&local)
            .map_err(|e| Error::Config(format!("{what}: local end: {e}")))?;
        let log = dir.join(format!("fwd-{n}.log"));
        let child = Forward::spawn(&self.forwards.ssh_program, host, remote, &local, &log)?;
        let mut forward = Forward {
            host: host.to_owned(),
            remote: remote.to_owned(),
            local: local.clone(),
            log,
            child,
            started: Instant::now(),
            ended: None,
            failures: 0,
        };
        loop {
            // The local end listens once ssh has logged in and bound it; the remote end is
            // tried per connection, so a missing remote socket shows up as a closed
            // connection later (and in ssh's log).
            if up(&local) {
                let mut forwards = self.forwards.lock();
                if let Some(f) = forwards
                    .iter()
                    .find(|f| f.host == host && f.remote == remote)
                {
                    // Another thread's forward came up first: use that one, drop ours.
                    return Ok(f.local.clone());
                }
                forwards.push(forward);
                drop(forwards);
                self.start_keeper();
                return Ok(local);
            }
            // Until it came up once, a failing ssh is the caller's error, not retried.
            if let Ok(Some(status)) = forward.child.try_wait() {
                return Err(Error::Refused(format!(
                    "{what}: ssh exited ({status}): {}",
                    forward.said()
                )));
            }
            if Instant::now() >= deadline {
                let said = forward.said();
                return Err(Error::Deadline(format!(
                    "{what}: not up by the deadline{}",
                    if said.is_empty() {
                        " (ssh said nothing)".to_owned()
                    } else {
                        format!(": {said}")
                    }
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn start_keeper(&self) {
        let mut keeper = self.keeper.lock().unwrap_or_else(|p| p.into_inner());
        if keeper.is_some() {
            return;
        }
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let forwards = Arc::clone(&self.forwards);
        let thread = std::thread::Builder::new()
            .name("ssh-forwards".into())
            .spawn(move || {
                // Ends when the connector drops its sender.
                while let Err(RecvTimeoutError::Timeout) = stopped.recv_timeout(RESTART_INTERVAL) {
                    for f in forwards.lock().iter_mut() {
                        f.keep_alive(&forwards.ssh_program);
                    }
                }
            });
        // Without the keeper, forwards still work; a dead one then stays down.
        if let Ok(thread) = thread {
            *keeper = Some(Keeper { stop, thread });
        }
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        let keeper = self.keeper.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(Keeper { stop, thread }) = keeper {
            drop(stop);
            let _ = thread.join();
        }
        self.forwards.lock().clear();
        if let Some(dir) = self.dir.get_mut().unwrap_or_else(|p| p.into_inner()) {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_on_the_host_an_operator_names() {
        let ssh: Address = "ssh:root@Node7:/run/q.sock".parse().unwrap();
        assert!(ssh.is_on("node7") && ssh.is_on("admin@NODE7"));
        assert!(!ssh.is_on("node8") && !ssh.is_on("localhost"));
        let unix: Address = "unix:/run/q.sock".parse().unwrap();
        assert!(unix.is_on("localhost") && unix.is_on("127.0.0.1") && !unix.is_on("node7"));
        let tcp: Address = "tcp:[::1]:4444".parse().unwrap();
        assert!(tcp.is_on("localhost"));
        let tcp: Address = "tcp:10.0.0.7:4444".parse().unwrap();
        assert!(tcp.is_on("10.0.0.7") && !tcp.is_on("10.0.0.70"));
    }

    #[test]
    fn addresses_parse_and_print_back() {
        for s in [
            "unix:/run/vm0/qmp.sock",
            "tcp:127.0.0.1:4444",
            "tcp:[::1]:4444",
            "ssh:node7:/run/vm0/qmp.sock",
            "ssh:ops@node7:/run/x.sock",
        ] {
            let a: Address = s.parse().unwrap();
            assert_eq!(a.to_string(), s);
        }
        for bad in [
            "",
            "/run/x.sock",
            "unix:relative.sock",
            "tcp:host",
            "tcp:host:0",
            "tcp::99",
            "ssh:node7:relative",
            "ssh:-oProxyCommand=x:/a",
        ] {
            assert!(bad.parse::<Address>().is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn migrate_uris_are_checked() {
        assert!(check_migrate_uri("tcp:10.0.0.2:4444").is_ok());
        assert!(check_migrate_uri("unix:/run/m.sock").is_ok());
        assert!(check_migrate_uri("exec:cat").is_err());
        assert!(check_migrate_uri("tcp:10.0.0.2").is_err());
    }

    #[test]
    fn forward_command_is_a_stream_local_forward() {
        let cmd = forward_command(
            "ssh",
            "node7",
            Path::new("/tmp/l.sock"),
            Path::new("/run/q.sock"),
        );
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args.last().map(String::as_str), Some("node7"));
        assert!(args.contains(&"/tmp/l.sock:/run/q.sock".to_owned()));
        assert!(args.contains(&"-N".to_owned()));
        assert!(args.contains(&"ExitOnForwardFailure=yes".to_owned()));
    }

    /// Held by the tests that make fresh forward directories: one predicts the names the next
    /// ones take.
    static FRESH_DIRS: Mutex<()> = Mutex::new(());

    /// A directory left by a killed process that had this pid is skipped, and left alone.
    #[test]
    fn a_leftover_forward_directory_is_skipped() {
        let _fresh = FRESH_DIRS.lock().unwrap_or_else(|p| p.into_inner());
        let first = Connector::new("false").unwrap();
        let taken = first.dir().unwrap();
        std::mem::forget(first);
        // The next names, as a dead process with this pid would have left them.
        let (prefix, n) = taken.to_str().unwrap().rsplit_once('-').unwrap();
        let n: u32 = n.parse().unwrap();
        let left: Vec<PathBuf> = (1..=3)
            .map(|i| PathBuf::from(format!("{prefix}-{}", n + i)))
            .collect();
        for d in &left {
            std::fs::create_dir(d).unwrap();
            std::fs::write(d.join("mine"), "x").unwrap();
        }
        let c = Connector::new("false").unwrap();
        let made = c.dir().unwrap();
        assert!(!left.contains(&made) && made != taken, "{}", made.display());
        drop(c);
        assert!(!made.exists(), "{} left behind", made.display());
        for d in left.iter().chain([&taken]) {
            let _ = std::fs::remove_file(d.join("mine"));
            std::fs::remove_dir(d).unwrap();
        }
    }

    /// A connector used for local addresses only makes no directory: a run killed before it
    /// could drop it (a controller's death is part of the tests) leaves nothing behind.
    #[test]
    fn no_forward_no_directory() {
        let c = Connector::new("false").unwrap();
        let local: Address = "unix:/run/q.sock".parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(1);
        assert_eq!(
            c.local_path(&local, deadline).unwrap(),
            PathBuf::from("/run/q.sock")
        );
        assert!(c.dir.lock().unwrap().is_none());
    }

    /// A forward whose ssh exits is reported, not awaited (the real sshd cases are in
    /// `tests/controller_ssh.rs`).
    #[test]
    fn failing_ssh_is_reported() {
        let _fresh = FRESH_DIRS.lock().unwrap_or_else(|p| p.into_inner());
        let c = Connector::new("false").unwrap();
        let addr: Address = "ssh:node7:/run/q.sock".parse().unwrap();
        let err = c
            .local_path(&addr, Instant::now() + Duration::from_secs(10))
            .unwrap_err();
        assert!(matches!(err, Error::Refused(_)), "{err:?}");
    }
}
