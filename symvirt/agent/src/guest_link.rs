//! The guest agent's end of the host channel: a virtio-serial port, or a unix socket when the
//! agent runs as a host process (tests, VMMs without virtio-serial).
//!
//! A virtio-serial port stays open across host connections. The kernel reports whether the
//! host side (QEMU's chardev) is connected through `poll`: `POLLHUP` while it is not, and
//! `read` then returns 0 at once. The link turns those transitions into
//! `Connected` / `Disconnected` link events so the agent says `hello` to every
//! new host connection. A unix socket is simply reconnected when it ends; an agent that
//! listens (a host process standing for a guest, which the controller reaches like QEMU's
//! chardev socket) serves one host connection at a time and takes the next when it ends.

use crate::error::{Error, Result};
use crate::sysfs;
use crossbeam_channel::Sender;
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use symvirt_proto::framing::{Frame, LineReader};
use symvirt_proto::protocol::{HostMessage, MAX_LINE, decode};

pub use symvirt_proto::protocol::DEFAULT_PORT_NAME;

/// How the agent reaches the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelSpec {
    /// A virtio-serial port by name, e.g. `org.symvirt.0` (resolved through
    /// /dev/virtio-ports, or /sys/class/virtio-ports when the link is missing).
    VirtioPort(String),
    /// A character device path, e.g. `/dev/vport1p1`.
    Device(PathBuf),
    /// A unix socket the host listens on.
    Unix(PathBuf),
    /// A unix socket the agent listens on and the host connects to, as it connects to QEMU's
    /// chardev socket for a guest.
    Listen(PathBuf),
}

impl ChannelSpec {
    /// Parses `virtio:NAME`, `unix:PATH`, `listen:PATH` or a device path.
    pub fn parse(spec: &str) -> Result<ChannelSpec> {
        if let Some(path) = spec.strip_prefix("listen:") {
            if !path.starts_with('/') {
                return Err(Error::Config(format!(
                    "listen: needs an absolute socket path, not {path:?}"
                )));
            }
            return Ok(ChannelSpec::Listen(path.into()));
        }
        if let Some(name) = spec.strip_prefix("virtio:") {
            if name.is_empty() || name.contains('/') {
                return Err(Error::Config(format!("bad virtio port name {name:?}")));
            }
            Ok(ChannelSpec::VirtioPort(name.into()))
        } else if let Some(path) = spec.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(Error::Config("unix: needs a socket path".into()));
            }
            Ok(ChannelSpec::Unix(path.into()))
        } else if spec.starts_with('/') {
            Ok(ChannelSpec::Device(spec.into()))
        } else {
            Err(Error::Config(format!(
                "channel {spec:?}: want virtio:NAME, unix:PATH, listen:PATH or /dev/PATH"
            )))
        }
    }
}

impl Default for ChannelSpec {
    fn default() -> Self {
        ChannelSpec::VirtioPort(DEFAULT_PORT_NAME.into())
    }
}

/// What the link reports to the agent.
#[derive(Debug)]
pub(crate) enum LinkEvent {
    /// The host side is connected; the writer slot holds a handle.
    Connected,
    /// The host side went away.
    Disconnected,
    /// A valid host message.
    Message(HostMessage),
}

/// Where the agent writes to the host; `None` while disconnected.
pub(crate) type HostWriter = Arc<Mutex<Option<File>>>;

const RETRY: Duration = Duration::from_millis(100);
const POLL_MS: i32 = 100;
/// A virtio port whose host side is away cannot be waited on (`poll` says hang-up at once), so
/// the agent looks again: often for a while after the host left, since a migration's
/// destination connects within a second of the switchover and the job waits for it; then at
/// [`RETRY`], not to wake an idle guest a hundred times a second.
const HOST_RETURN_WINDOW: Duration = Duration::from_secs(10);
const HOST_RETURN_POLL: Duration = Duration::from_millis(5);
/// How often an agent that listens checks for a host connection.
const ACCEPT_POLL: Duration = Duration::from_millis(10);

/// Runs the link until `stop`: opens, reads, reports, reopens.
pub(crate) fn run(
    spec: ChannelSpec,
    stop: Arc<AtomicBool>,
    events: Sender<LinkEvent>,
    writer: HostWriter,
) {
    if let ChannelSpec::Listen(path) = &spec {
        if let Err(e) = listen(path, &stop, &events, &writer) {
            log::warn!("host channel: {e}");
        }
        writer.lock().unwrap_or_else(|p| p.into_inner()).take();
        return;
    }
    let mut warned = false;
    while !stop.load(Ordering::SeqCst) {
        let opened = open(&spec);
        let (file, is_socket) = match opened {
            Ok(x) => x,
            Err(e) => {
                if !warned {
                    log::warn!("host channel not available yet: {e}");
                    warned = true;
                }
                std::thread::sleep(RETRY);
                continue;
            }
        };
        warned = false;
        if let Err(e) = serve(file, is_socket, &stop, &events, &writer) {
            log::warn!("host channel: {e}");
            std::thread::sleep(RETRY);
        }
    }
    writer.lock().unwrap_or_else(|p| p.into_inner()).take();
}

/// Serves host connections on a socket at `path`, one after the other, until `stop`.
fn listen(
    path: &Path,
    stop: &AtomicBool,
    events: &Sender<LinkEvent>,
    writer: &HostWriter,
) -> Result<()> {
    // A socket file nobody answers on was left by an agent that died.
    if UnixStream::connect(path).is_err() {
        let _ = std::fs::remove_file(path);
    }
    let listener =
        UnixListener::bind(path).map_err(|e| Error::io(format!("bind {}", path.display()), e))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::io("set_nonblocking", e))?;
    log::info!("listening for the host on {}", path.display());
    let result = loop {
        if stop.load(Ordering::SeqCst) {
            break Ok(());
        }
        match listener.accept() {
            Ok((stream, _)) => {
                let served = stream
                    .set_nonblocking(false)
                    .map_err(|e| Error::io("set_blocking", e))
                    .and_then(|()| {
                        let file = File::from(std::os::fd::OwnedFd::from(stream));
                        serve(file, true, stop, events, writer)
                    });
                if let Err(e) = served {
                    log::warn!("host channel: {e}");
                }
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => break Err(Error::io(format!("accept on {}", path.display()), e)),
        }
    };
    let _ = std::fs::remove_file(path);
    result
}

fn open(spec: &ChannelSpec) -> Result<(File, bool)> {
    let device = |path: &Path| {
        let file = File::options()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        log::info!("opened host channel {}", path.display());
        Ok((file, false))
    };
    match spec {
        ChannelSpec::Unix(path) => UnixStream::connect(path)
            .map(|s| (File::from(std::os::fd::OwnedFd::from(s)), true))
            .map_err(|e| Error::io(format!("connect {}", path.display()), e)),
        ChannelSpec::Device(path) => device(path),
        ChannelSpec::Listen(path) => Err(Error::Config(format!(
            "{} is listened on, not opened",
            path.display()
        ))),
        ChannelSpec::VirtioPort(name) => {
            let path = sysfs::virtio_port(
                name,
                Path::new(sysfs::VIRTIO_PORT_LINKS),
                Path::new(sysfs::VIRTIO_PORTS_DIR),
                Path::new("/dev"),
            )
            .ok_or_else(|| Error::Config(format!("no virtio-serial port named {name}")))?;
            device(&path)
        }
    }
}

/// `poll` on one fd for input; returns (readable, hung up).
fn poll_in(file: &File) -> Result<(bool, bool)> {
    let mut fds = libc::pollfd {
        fd: file.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `fds` is one valid pollfd that lives across the call; the count passed is 1.
    let n = unsafe { libc::poll(&mut fds, 1, POLL_MS) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == ErrorKind::Interrupted {
            return Ok((false, false));
        }
        return Err(Error::io("poll host channel", e));
    }
    let hup = fds.revents & (libc::POLLHUP | libc::POLLERR) != 0;
    Ok((fds.revents & libc::POLLIN != 0, hup))
}

fn set_connected(
    connected: &mut bool,
    now: bool,
    file: &File,
    events: &Sender<LinkEvent>,
    writer: &HostWriter,
) -> Result<()> {
    if *connected == now {
        return Ok(());
    }
    *connected = now;
    let mut slot = writer.lock().unwrap_or_else(|p| p.into_inner());
    if now {
        *slot = Some(
            file.try_clone()
                .map_err(|e| Error::io("clone host channel", e))?,
        );
        drop(slot);
        let _ = events.send(LinkEvent::Connected);
    } else {
        *slot = None;
        drop(slot);
        let _ = events.send(LinkEvent::Disconnected);
    }
    Ok(())
}

fn serve(
    mut file: File,
    is_socket: bool,
    stop: &AtomicBool,
    events: &Sender<LinkEvent>,
    writer: &HostWriter,
) -> Result<()> {
    let mut lines = LineReader::new(MAX_LINE);
    let mut connected = false;
    // Since when the host side of a virtio port is away.
    let mut away_since: Option<Instant> = None;
    if is_socket {
        set_connected(&mut connected, true, &file, events, writer)?;
    }
    let mut buf = [0u8; 4096];
    let result = loop {
        if stop.load(Ordering::SeqCst) {
            break Ok(());
        }
        let (readable, hup) = poll_in(&file)?;
        if !is_socket && !hup && !connected {
            set_connected(&mut connected, true, &file, events, writer)?;
        }
        if !readable && !hup {
            continue;
        }
        let n = match file.read(&mut buf) {
            Ok(n) => n,
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {
                continue;
            }
            Err(e) => break Err(Error::io("read host channel", e)),
        };
        if n == 0 {
            // A socket ended; a virtio port's host side is not connected (the port stays open).
            lines.reset();
            if connected || away_since.is_none() {
                away_since = Some(Instant::now());
            }
            set_connected(&mut connected, false, &file, events, writer)?;
            if is_socket {
                break Ok(());
            }
            let away = away_since.map_or(Duration::MAX, |t| t.elapsed());
            std::thread::sleep(if away < HOST_RETURN_WINDOW {
                HOST_RETURN_POLL
            } else {
                RETRY
            });
            continue;
        }
        let mut frames = Vec::new();
        lines.push(&buf[..n], |f| frames.push(f));
        for frame in frames {
            match frame {
                Frame::Line(line) => match decode::<HostMessage>(&line) {
                    Ok(m) => {
                        let _ = events.send(LinkEvent::Message(m));
                    }
                    Err(e) => log::warn!(
                        "ignored host line: {e}{}",
                        std::error::Error::source(&e)
                            .map(|s| format!(": {s}"))
                            .unwrap_or_default()
                    ),
                },
                Frame::Oversized { bytes } => {
                    log::warn!("ignored host line of {bytes} bytes (limit {MAX_LINE})")
                }
            }
        }
    };
    set_connected(&mut connected, false, &file, events, writer)?;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_channel_specs() {
        assert_eq!(
            ChannelSpec::parse("virtio:org.symvirt.0").unwrap(),
            ChannelSpec::VirtioPort("org.symvirt.0".into())
        );
        assert_eq!(
            ChannelSpec::parse("unix:/tmp/x.sock").unwrap(),
            ChannelSpec::Unix("/tmp/x.sock".into())
        );
        assert_eq!(
            ChannelSpec::parse("listen:/run/sv.sock").unwrap(),
            ChannelSpec::Listen("/run/sv.sock".into())
        );
        assert_eq!(
            ChannelSpec::parse("/dev/vport1p1").unwrap(),
            ChannelSpec::Device("/dev/vport1p1".into())
        );
        for bad in [
            "",
            "virtio:",
            "virtio:a/b",
            "unix:",
            "listen:",
            "listen:relative.sock",
            "tcp:1.2.3.4:5",
            "relative",
        ] {
            assert!(ChannelSpec::parse(bad).is_err(), "{bad}");
        }
    }
}
