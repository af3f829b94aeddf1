//! The port-I/O "hypercall" transport: the original SymVirt wait/signal, for VMMs that emulate
//! devices themselves (the reference VMM in `migrate-core` runs guests without virtio-serial).
//!
//! The guest talks through two 8-bit I/O ports, carrying the same newline-delimited protocol
//! lines as every other transport, one byte per access:
//!
//! | port       | guest `out`                                  | guest `in`                               |
//! |------------|----------------------------------------------|------------------------------------------|
//! | `base + 0` | next byte of a guest-to-host line            | next byte from the host (0 when none)    |
//! | `base + 1` | [`RESET`]: drop any partial line (agent restart) | [`STATUS_DATA`] when host bytes are waiting, ORed with [`STATUS_HOST`] |
//!
//! [`PortIoDevice`] is the VMM's device model: the VMM calls [`PortIoDevice::pio_write`] and
//! [`PortIoDevice::pio_read`] on its port-I/O exits (the reference VMM does so through its
//! I/O bus, [`migrate_core::vmm::io::IoBus`], where the device plugs in as an
//! [`IoPortDevice`]), and gives the other end of the device's
//! socket pair to [`crate::host_channel::HostChannel::from_stream`], so every check the host
//! makes on virtio-serial applies unchanged. The device never blocks a vCPU: bytes for the host
//! go out on a non-blocking socket (dropped and counted when the host does not keep up, which
//! only corrupts the guest's own line), and host bytes are buffered up to [`MAX_INBOUND`].

use crate::error::{Error, Result};
use crate::protocol::MAX_LINE;
use migrate_core::vmm::io::IoPortDevice;
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;

/// Default base port (two ports: `base`, `base + 1`); free on the PC machine types.
pub const DEFAULT_BASE: u16 = 0x0ef0;
/// STATUS bit: bytes from the host are waiting on the DATA port.
pub const STATUS_DATA: u8 = 0x01;
/// STATUS bit: the host side is attached (always, for a device model inside the host's VMM).
pub const STATUS_HOST: u8 = 0x02;
/// Written to STATUS: forget the partial line sent so far.
pub const RESET: u8 = 0x01;
/// Host bytes buffered for the guest at most (a few whole lines).
pub const MAX_INBOUND: usize = 4 * MAX_LINE;

/// The VMM's model of the two SymVirt ports.
#[derive(Debug)]
pub struct PortIoDevice {
    base: u16,
    socket: UnixStream,
    inbound: VecDeque<u8>,
    /// Bytes of the guest's current line, to drop the rest of it on RESET.
    line_started: bool,
    dropped: u64,
}

impl PortIoDevice {
    /// A device at `base`, and the host's end of its channel (for `HostChannel::from_stream`).
    pub fn new(base: u16) -> Result<(PortIoDevice, UnixStream)> {
        let (device_end, host_end) =
            UnixStream::pair().map_err(|e| Error::io("socketpair for port-I/O channel", e))?;
        device_end
            .set_nonblocking(true)
            .map_err(|e| Error::io("set_nonblocking", e))?;
        let device = PortIoDevice {
            base,
            socket: device_end,
            inbound: VecDeque::with_capacity(MAX_LINE),
            line_started: false,
            dropped: 0,
        };
        Ok((device, host_end))
    }

    /// A new channel: the device's socket is replaced by a new pair, and the host's new end is
    /// returned (the old host end sees the channel close). Bytes not yet read are dropped.
    pub fn reconnect(&mut self) -> Result<UnixStream> {
        let (device_end, host_end) =
            UnixStream::pair().map_err(|e| Error::io("socketpair for port-I/O channel", e))?;
        device_end
            .set_nonblocking(true)
            .map_err(|e| Error::io("set_nonblocking", e))?;
        self.socket = device_end;
        self.inbound.clear();
        self.line_started = false;
        Ok(host_end)
    }

    /// The two ports, `base` and `base + 1`.
    pub fn ports(&self) -> [u16; 2] {
        [self.base, self.base.wrapping_add(1)]
    }

    /// Whether `port` belongs to this device.
    pub fn handles(&self, port: u16) -> bool {
        port == self.base || port == self.base.wrapping_add(1)
    }

    /// Guest bytes that could not be passed to the host (it was not reading).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// A guest `out` to `port`.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) {
        if port == self.base {
            for &b in data {
                self.send_byte(b);
            }
        } else if port == self.base.wrapping_add(1)
            && data.first() == Some(&RESET)
            && self.line_started
        {
            // Ends the partial line; the host rejects it as malformed and resynchronises.
            self.send_byte(b'\n');
        }
    }

    /// A guest `in` from `port`.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        data.fill(0);
        if port == self.base {
            self.refill();
            for d in data.iter_mut() {
                match self.inbound.pop_front() {
                    Some(b) => *d = b,
                    None => break,
                }
            }
        } else if port == self.base.wrapping_add(1) {
            self.refill();
            if let Some(d) = data.first_mut() {
                *d = STATUS_HOST
                    | if self.inbound.is_empty() {
                        0
                    } else {
                        STATUS_DATA
                    };
            }
        }
    }

    fn send_byte(&mut self, b: u8) {
        match self.socket.write(&[b]) {
            Ok(1) => self.line_started = b != b'\n',
            _ => self.dropped += 1,
        }
    }

    fn refill(&mut self) {
        let room = MAX_INBOUND - self.inbound.len();
        if room == 0 {
            return;
        }
        let mut buf = [0u8; 1024];
        let want = room.min(buf.len());
        match self.socket.read(&mut buf[..want]) {
            Ok(n) => self.inbound.extend(&buf[..n]),
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(_) => {}
        }
    }
}

impl IoPortDevice for PortIoDevice {
    fn handles(&self, port: u16) -> bool {
        PortIoDevice::handles(self, port)
    }

    fn pio_write(&mut self, port: u16, data: &[u8]) {
        PortIoDevice::pio_write(self, port, data)
    }

    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        PortIoDevice::pio_read(self, port, data)
    }
}
