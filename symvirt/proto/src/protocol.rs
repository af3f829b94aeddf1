//! The SymVirt guest/host channel protocol, version 1.
//!
//! # Framing
//!
//! Newline-delimited JSON: one message per line, UTF-8, terminated by `\n`, at most
//! [`MAX_LINE`] (4096) bytes including the newline. JSON escapes control characters inside
//! strings, so a raw `\n` never occurs inside a message and always ends one. Chosen over
//! length-prefixed binary frames because:
//! - the channel is a byte stream from an untrusted guest; a newline resynchronises the reader
//!   after garbage, while one corrupt length prefix would poison every frame after it;
//! - a human can drive either side with `socat - UNIX-CONNECT:<socket>` when debugging;
//! - messages are a few per migration; parsing cost is irrelevant.
//!
//! A line over the limit is discarded up to its newline without being buffered (see
//! [`crate::framing::LineReader`]) and reported as a rejection. Empty lines are ignored.
//!
//! # Versions
//!
//! The guest states its protocol version in `hello` ([`GuestMessage::Hello::protocol`]); the host
//! accepts versions [`MIN_PROTOCOL_VERSION`]..=[`PROTOCOL_VERSION`] and rejects the `hello`
//! otherwise (the session then stays unidentified and every later message is rejected). Parsing
//! is strict (unknown fields are errors), so any change to a message is a new version.
//!
//! # Messages
//!
//! Host to guest ([`HostMessage`]):
//! - `{"type":"hello"}`: the host opened its end of the channel; the agent answers with its
//!   `hello`. Sent on every new connection, because the agent cannot always see one: a
//!   virtio-serial port stays open in the guest, and a host end that closes and reopens between
//!   two of the agent's polls leaves no trace there. Added without a version change: an agent
//!   that predates it ignores the line as unknown, and the host accepts its unprompted `hello`.
//! - `{"type":"prepare","epoch":E,"deadline_ms":D}`: reach the quiescent point for epoch `E`
//!   within `D` ms of receipt. Relative time because host and guest clocks differ (and a guest's
//!   clock jumps across a migration).
//! - `{"type":"resume","epoch":E,"interconnect":I}`: continue, now over interconnect `I`.
//! - `{"type":"abort","epoch":E}`: epoch `E` is cancelled; continue on the interconnect the
//!   guest had. Not acknowledged.
//! - `{"type":"status"}`: say where you are (answered with `status`), in any state. Added
//!   without a version change, as `hello` was: an agent that predates it ignores the line, and
//!   the host, hearing nothing, reports the status unknown.
//! - `{"type":"report","epoch":E,"cursor":C}`: send part `C` (from 0) of the cut report of
//!   epoch `E` (answered with `report` or `no_report`), in any state. Added without a version
//!   change, as `status` was.
//!
//! Guest to host ([`GuestMessage`]):
//! - `{"type":"hello","vm":V,"agent_version":A,"protocol":1,"ranks":N}`: sent when the agent
//!   sees the host side open, when the agent starts, and in answer to the host's `hello`; `N`
//!   local MPI ranks take part. A repeated identical `hello` between epochs is coalesced, and so
//!   is one the host asked for; an unasked second one during an epoch (the agent restarted and
//!   lost it) is rejected; one naming another VM is always rejected.
//! - `{"type":"quiesced","epoch":E}`: every local rank is at the quiescent point.
//! - `{"type":"resumed","epoch":E,"interconnect":I,"pci_devices":[...]}`: every rank acknowledged
//!   the resume; `pci_devices` (optional) is what the guest sees on its PCI bus now.
//! - `{"type":"failed","epoch":E,"reason":R}`: the guest cannot complete epoch `E`.
//! - `{"type":"status","epoch":E,"phase":P,"ranks":N,"registered":R}`: the answer to the host's
//!   `status`: the last epoch the agent heard of (0: none), where it stands (`running`,
//!   `preparing`, `quiesced`, `resuming`), and how many of its `N` ranks have registered now.
//! - `{"type":"report","epoch":E,"cursor":C,"next":C2,"rank":R,"quiesce_ms":Q,"counts":K}`:
//!   part `C` of the cut report of epoch `E`: rank `R`'s counts for some peers
//!   ([`crate::cut_report::CountsChunk`]) and how long it took to reach the cut after `prepare`;
//!   `next` is the part to ask for next, absent after the last. A report is one part per
//!   [`crate::cut_report::COUNTS_CHUNK`] peers of every local rank, so any job fits the line limit.
//! - `{"type":"no_report","epoch":E,"reason":R}`: the agent holds no report of epoch `E` (it
//!   keeps the last [`REPORTED_EPOCHS`]; ranks of the explicit API send no counts).
//!
//! [`Interconnect`] is `{"kind":"infiniband","hca":"mlx5_0","port":1,"pci":"0000:00:05.0"}` or
//! `{"kind":"ethernet","mac":"52:54:00:12:34:56","iface":"eth1","pci":"0000:00:04.0"}`:
//! what an MPI runtime needs to reconnect (the HCA device name and port for verbs/UCX; the
//! interface for TCP, which the agent resolves from the MAC the host assigned when it is absent).
//!
//! # State machine (per guest; the host keeps it in `symvirt::session::GuestSession`)
//!
//! ```text
//!  Idle --hello--> Running --prepare(E)--> Preparing(E) --quiesced(E)--> Quiesced(E)
//!                     ^                        |    \--failed(E)--> Failed(E)
//!                     |                      abort(E)                  |
//!                     +------------------------+---------abort(E)------+
//!                     +--resumed(E)-- Resuming(E) <--resume(E)-- Quiesced(E)
//! ```
//! Epochs start at 1 and increase strictly. Rejected (logged and counted, state unchanged): any
//! line that is too long, not UTF-8, not JSON, of an unknown type, with unknown or missing
//! fields or out-of-range values; a message with an epoch other than the current one; a message
//! the current state does not expect (`quiesced` before `prepare`, `resumed` before `resume`,
//! a second `hello` on one connection during an epoch, ...).

use crate::cut_report::CountsChunk;
use crate::error::{Error, Result};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// The oldest protocol version this crate accepts from a guest.
pub const MIN_PROTOCOL_VERSION: u32 = 1;
/// The longest line, newline included.
pub const MAX_LINE: usize = 4096;
/// The longest name (VM, agent version, HCA, interface, PCI address).
pub const MAX_NAME: usize = 64;
/// The longest failure reason.
pub const MAX_REASON: usize = 512;
/// The most PCI devices a `resumed` may list (so it fits in [`MAX_LINE`]).
pub const MAX_PCI_DEVICES: usize = 40;
/// The most ranks one guest may declare.
pub const MAX_RANKS: u32 = 4096;
/// How many epochs' cut reports an agent keeps.
pub const REPORTED_EPOCHS: usize = 16;
/// The virtio-serial port name of the channel unless configured otherwise.
pub const DEFAULT_PORT_NAME: &str = "org.symvirt.0";

/// A message from the host (controller) to the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum HostMessage {
    /// The host opened its end: introduce yourself (answered with [`GuestMessage::Hello`]).
    Hello,
    /// Reach the quiescent point for `epoch` within `deadline_ms` of receipt.
    Prepare {
        /// The migration epoch (starts at 1, strictly increasing).
        epoch: u64,
        /// Milliseconds the guest has, counted from receipt.
        deadline_ms: u64,
    },
    /// Continue over `interconnect`.
    Resume {
        /// The epoch being completed.
        epoch: u64,
        /// The interconnect the guest has now.
        interconnect: Interconnect,
    },
    /// The epoch is cancelled; continue on the old interconnect.
    Abort {
        /// The epoch being cancelled.
        epoch: u64,
    },
    /// Say where you are (answered with [`GuestMessage::Status`]).
    Status,
    /// Send part `cursor` of the cut report of `epoch` (answered with [`GuestMessage::Report`]
    /// or [`GuestMessage::NoReport`]).
    Report {
        /// The epoch.
        epoch: u64,
        /// Which part: 0 first, then the `next` of the previous answer.
        cursor: u64,
    },
}

/// Where a guest agent stands, as its `status` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentPhase {
    /// Between epochs: the ranks run.
    Running,
    /// Bringing the ranks to the cut.
    Preparing,
    /// Every rank at the cut, waiting for `resume` or `abort`.
    Quiesced,
    /// Releasing the ranks.
    Resuming,
}

/// A message from the guest agent to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum GuestMessage {
    /// The agent introduces itself (once per connection).
    Hello {
        /// The VM's name as the guest knows it.
        vm: String,
        /// The agent's software version.
        agent_version: String,
        /// The protocol version the agent speaks.
        protocol: u32,
        /// How many local MPI ranks take part (0: the agent alone).
        ranks: u32,
    },
    /// Every local rank reached the quiescent point for `epoch`.
    Quiesced {
        /// The epoch.
        epoch: u64,
    },
    /// Every local rank continued over `interconnect`.
    Resumed {
        /// The epoch.
        epoch: u64,
        /// The interconnect the ranks were given.
        interconnect: Interconnect,
        /// The PCI devices the guest sees, when the agent reports them.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pci_devices: Option<Vec<PciDevice>>,
    },
    /// The guest cannot complete `epoch`.
    Failed {
        /// The epoch.
        epoch: u64,
        /// Why, for the operator.
        reason: String,
    },
    /// The answer to the host's `status`.
    Status {
        /// The last epoch the agent heard of (0: none yet).
        epoch: u64,
        /// Where it stands.
        phase: AgentPhase,
        /// How many local ranks take part.
        ranks: u32,
        /// How many of them have registered with the agent now.
        registered: u32,
    },
    /// Part `cursor` of the cut report of `epoch`: one local rank's counts for some peers.
    Report {
        /// The epoch.
        epoch: u64,
        /// Which part this is.
        cursor: u64,
        /// The part to ask for next; `None` after the last.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        next: Option<u64>,
        /// The rank (in `MPI_COMM_WORLD`).
        rank: u32,
        /// How long the rank took to reach the cut after the agent's `prepare`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        quiesce_ms: Option<u64>,
        /// Its counts for the peers this part covers.
        counts: CountsChunk,
    },
    /// The agent holds no cut report of `epoch`.
    NoReport {
        /// The epoch.
        epoch: u64,
        /// Why, for the operator.
        reason: String,
    },
}

/// The interconnect a guest's MPI ranks communicate over.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Interconnect {
    /// An InfiniBand HCA (passthrough VF). Real deployments use `vfio-pci,host=BDF`.
    Infiniband {
        /// The verbs device name, e.g. `mlx5_0`.
        hca: String,
        /// The HCA port (1-based, as verbs counts).
        port: u8,
        /// The device's PCI address inside the guest, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pci: Option<String>,
    },
    /// A (paravirtual) Ethernet NIC.
    Ethernet {
        /// The MAC address the host assigned, `xx:xx:xx:xx:xx:xx` (lower-case hex).
        mac: String,
        /// The guest interface name; the agent fills it in from `mac` when absent.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        iface: Option<String>,
        /// The device's PCI address inside the guest, when known.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        pci: Option<String>,
    },
}

/// One PCI function as the guest sees it in /sys/bus/pci/devices.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PciDevice {
    /// `DDDD:BB:DD.F`.
    pub address: String,
    /// Vendor id.
    pub vendor: u16,
    /// Device id.
    pub device: u16,
    /// Class code (class, subclass, programming interface).
    pub class: u32,
}

/// Checks the values of a parsed message (the parser checks only their types).
pub trait Validate {
    /// `Err(Error::Invalid)` when a value is out of range.
    fn validate(&self) -> Result<()>;
}

fn invalid(what: String) -> Error {
    Error::Invalid(what)
}

fn check_epoch(epoch: u64) -> Result<()> {
    if epoch == 0 {
        return Err(invalid("epoch 0 (epochs start at 1)".into()));
    }
    Ok(())
}

/// A printable identifier: 1..=MAX_NAME bytes of `[A-Za-z0-9._:+-]`.
fn check_name(field: &str, value: &str) -> Result<()> {
    let ok_char = |c: char| c.is_ascii_alphanumeric() || "._:+-".contains(c);
    if value.is_empty() || value.len() > MAX_NAME || !value.chars().all(ok_char) {
        return Err(invalid(format!(
            "{field}: want 1-{MAX_NAME} characters of [A-Za-z0-9._:+-], got {:?}",
            truncate(value, MAX_NAME)
        )));
    }
    Ok(())
}

pub use crate::addr::{is_mac_address, is_pci_address};

fn check_pci(field: &str, value: &Option<String>) -> Result<()> {
    match value {
        Some(p) if !is_pci_address(p) => Err(invalid(format!(
            "{field}: not a PCI address DDDD:BB:DD.F: {:?}",
            truncate(p, MAX_NAME)
        ))),
        _ => Ok(()),
    }
}

/// At most `max` bytes of `s`, cut at a character boundary (for error messages).
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl Validate for Interconnect {
    fn validate(&self) -> Result<()> {
        match self {
            Interconnect::Infiniband { hca, port, pci } => {
                check_name("hca", hca)?;
                if *port == 0 {
                    return Err(invalid("port 0 (HCA ports start at 1)".into()));
                }
                check_pci("pci", pci)
            }
            Interconnect::Ethernet { mac, iface, pci } => {
                if !is_mac_address(mac) {
                    return Err(invalid(format!(
                        "mac: not xx:xx:xx:xx:xx:xx (lower-case): {:?}",
                        truncate(mac, MAX_NAME)
                    )));
                }
                if let Some(i) = iface {
                    check_name("iface", i)?;
                }
                check_pci("pci", pci)
            }
        }
    }
}

/// For people: `infiniband mlx5_0 port 1`, `ethernet eth1 (52:54:00:12:34:56)`.
impl std::fmt::Display for Interconnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Interconnect::Infiniband { hca, port, .. } => write!(f, "infiniband {hca} port {port}"),
            Interconnect::Ethernet { mac, iface, .. } => match iface {
                Some(i) => write!(f, "ethernet {i} ({mac})"),
                None => write!(f, "ethernet {mac}"),
            },
        }
    }
}

impl Interconnect {
    /// `infiniband` or `ethernet`.
    pub fn kind(&self) -> &'static str {
        match self {
            Interconnect::Infiniband { .. } => "infiniband",
            Interconnect::Ethernet { .. } => "ethernet",
        }
    }
}

impl Validate for HostMessage {
    fn validate(&self) -> Result<()> {
        match self {
            HostMessage::Hello | HostMessage::Status => Ok(()),
            HostMessage::Prepare { epoch, .. }
            | HostMessage::Abort { epoch }
            | HostMessage::Report { epoch, .. } => check_epoch(*epoch),
            HostMessage::Resume {
                epoch,
                interconnect,
            } => {
                check_epoch(*epoch)?;
                interconnect.validate()
            }
        }
    }
}

impl HostMessage {
    /// The epoch the message is about (`None` for `hello`).
    pub fn epoch(&self) -> Option<u64> {
        match self {
            HostMessage::Hello | HostMessage::Status => None,
            HostMessage::Prepare { epoch, .. }
            | HostMessage::Resume { epoch, .. }
            | HostMessage::Abort { epoch }
            | HostMessage::Report { epoch, .. } => Some(*epoch),
        }
    }

    /// A short description for logs, e.g. `prepare{epoch=3}`.
    pub fn describe(&self) -> String {
        let name = match self {
            HostMessage::Hello => return "hello".into(),
            HostMessage::Status => return "status".into(),
            HostMessage::Prepare { .. } => "prepare",
            HostMessage::Resume { .. } => "resume",
            HostMessage::Abort { .. } => "abort",
            HostMessage::Report { cursor, .. } => {
                return format!(
                    "report{{epoch={}, part {cursor}}}",
                    self.epoch().unwrap_or(0)
                );
            }
        };
        format!("{name}{{epoch={}}}", self.epoch().unwrap_or(0))
    }
}

impl Validate for GuestMessage {
    fn validate(&self) -> Result<()> {
        match self {
            GuestMessage::Hello {
                vm,
                agent_version,
                ranks,
                ..
            } => {
                check_name("vm", vm)?;
                check_name("agent_version", agent_version)?;
                if *ranks > MAX_RANKS {
                    return Err(invalid(format!("ranks: {ranks} > {MAX_RANKS}")));
                }
                Ok(())
            }
            GuestMessage::Quiesced { epoch } => check_epoch(*epoch),
            GuestMessage::Resumed {
                epoch,
                interconnect,
                pci_devices,
            } => {
                check_epoch(*epoch)?;
                interconnect.validate()?;
                if let Some(devices) = pci_devices {
                    if devices.len() > MAX_PCI_DEVICES {
                        return Err(invalid(format!(
                            "pci_devices: {} > {MAX_PCI_DEVICES}",
                            devices.len()
                        )));
                    }
                    for d in devices {
                        if !is_pci_address(&d.address) {
                            return Err(invalid(format!(
                                "pci_devices: bad address {:?}",
                                truncate(&d.address, MAX_NAME)
                            )));
                        }
                    }
                }
                Ok(())
            }
            GuestMessage::Failed { epoch, reason } | GuestMessage::NoReport { epoch, reason } => {
                check_epoch(*epoch)?;
                if reason.len() > MAX_REASON || reason.chars().any(char::is_control) {
                    return Err(invalid(format!(
                        "reason: want at most {MAX_REASON} bytes without control characters"
                    )));
                }
                Ok(())
            }
            GuestMessage::Report {
                epoch,
                cursor,
                next,
                counts,
                ..
            } => {
                check_epoch(*epoch)?;
                if next.is_some_and(|n| n <= *cursor) {
                    return Err(invalid(format!(
                        "report: next part {next:?} after {cursor}"
                    )));
                }
                counts.validate()
            }
            GuestMessage::Status {
                ranks, registered, ..
            } => {
                if *ranks > MAX_RANKS || registered > ranks {
                    return Err(invalid(format!(
                        "status: {registered} of {ranks} ranks registered (at most {MAX_RANKS})"
                    )));
                }
                Ok(())
            }
        }
    }
}

impl GuestMessage {
    /// The epoch the message is about (`None` for `hello` and `status`).
    pub fn epoch(&self) -> Option<u64> {
        match self {
            GuestMessage::Hello { .. } | GuestMessage::Status { .. } => None,
            GuestMessage::Quiesced { epoch }
            | GuestMessage::Resumed { epoch, .. }
            | GuestMessage::Failed { epoch, .. }
            | GuestMessage::Report { epoch, .. }
            | GuestMessage::NoReport { epoch, .. } => Some(*epoch),
        }
    }

    /// A short description for logs, e.g. `quiesced{epoch=3}`.
    pub fn describe(&self) -> String {
        match self {
            GuestMessage::Hello { .. } => "hello".into(),
            GuestMessage::Quiesced { epoch } => format!("quiesced{{epoch={epoch}}}"),
            GuestMessage::Resumed { epoch, .. } => format!("resumed{{epoch={epoch}}}"),
            GuestMessage::Failed { epoch, .. } => format!("failed{{epoch={epoch}}}"),
            GuestMessage::Report {
                epoch,
                cursor,
                rank,
                ..
            } => format!("report{{epoch={epoch}, part {cursor}, rank {rank}}}"),
            GuestMessage::NoReport { epoch, .. } => format!("no_report{{epoch={epoch}}}"),
            GuestMessage::Status { epoch, phase, .. } => {
                format!("status{{epoch={epoch}, {phase:?}}}")
            }
        }
    }
}

/// Encodes a message as one line (JSON and `\n`); errors if it would exceed [`MAX_LINE`].
pub fn encode<T: Serialize + Validate>(message: &T) -> Result<Vec<u8>> {
    message.validate()?;
    let mut line = serde_json::to_vec(message).map_err(Error::Malformed)?;
    line.push(b'\n');
    if line.len() > MAX_LINE {
        return Err(Error::LineTooLong {
            len: line.len(),
            limit: MAX_LINE,
        });
    }
    Ok(line)
}

/// Decodes one line (without its `\n`): UTF-8, strict JSON, known type and fields, valid values.
pub fn decode<T: DeserializeOwned + Validate>(line: &[u8]) -> Result<T> {
    if line.len() >= MAX_LINE {
        return Err(Error::LineTooLong {
            len: line.len(),
            limit: MAX_LINE,
        });
    }
    let text = std::str::from_utf8(line).map_err(Error::NotUtf8)?;
    let message: T = serde_json::from_str(text).map_err(Error::Malformed)?;
    message.validate()?;
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eth() -> Interconnect {
        Interconnect::Ethernet {
            mac: "52:54:00:12:34:56".into(),
            iface: None,
            pci: Some("0000:00:04.0".into()),
        }
    }

    fn ib() -> Interconnect {
        Interconnect::Infiniband {
            hca: "mlx5_0".into(),
            port: 1,
            pci: None,
        }
    }

    fn all_host() -> Vec<HostMessage> {
        vec![
            HostMessage::Hello,
            HostMessage::Prepare {
                epoch: 1,
                deadline_ms: 5000,
            },
            HostMessage::Resume {
                epoch: 1,
                interconnect: eth(),
            },
            HostMessage::Resume {
                epoch: u64::MAX,
                interconnect: ib(),
            },
            HostMessage::Abort { epoch: 7 },
            HostMessage::Status,
            HostMessage::Report {
                epoch: 7,
                cursor: 1,
            },
        ]
    }

    fn all_guest() -> Vec<GuestMessage> {
        vec![
            GuestMessage::Hello {
                vm: "vm-0".into(),
                agent_version: "0.1.0".into(),
                protocol: 1,
                ranks: 2,
            },
            GuestMessage::Quiesced { epoch: 1 },
            GuestMessage::Resumed {
                epoch: 1,
                interconnect: eth(),
                pci_devices: None,
            },
            GuestMessage::Resumed {
                epoch: 2,
                interconnect: ib(),
                pci_devices: Some(vec![PciDevice {
                    address: "0000:00:03.0".into(),
                    vendor: 0x1af4,
                    device: 0x1000,
                    class: 0x020000,
                }]),
            },
            GuestMessage::Failed {
                epoch: 3,
                reason: "rank 1 did not quiesce in 5000 ms".into(),
            },
            GuestMessage::Status {
                epoch: 3,
                phase: AgentPhase::Quiesced,
                ranks: 4,
                registered: 3,
            },
            GuestMessage::Report {
                epoch: 3,
                cursor: 1,
                next: Some(2),
                rank: 1,
                quiesce_ms: Some(4),
                counts: CountsChunk {
                    world: 2,
                    first: 0,
                    sent: vec![5, 0],
                    received: vec![4, 0],
                    drained: 1,
                },
            },
            GuestMessage::NoReport {
                epoch: 2,
                reason: "no cut report of epoch 2 here".into(),
            },
        ]
    }

    #[test]
    fn every_message_round_trips() {
        for m in all_host() {
            let line = encode(&m).unwrap();
            assert_eq!(line.last(), Some(&b'\n'));
            assert_eq!(decode::<HostMessage>(&line[..line.len() - 1]).unwrap(), m);
        }
        for m in all_guest() {
            let line = encode(&m).unwrap();
            assert_eq!(decode::<GuestMessage>(&line[..line.len() - 1]).unwrap(), m);
        }
    }

    /// The wire format is the documented one, byte for byte: a change here is a protocol change.
    #[test]
    fn golden_lines() {
        let golden_host = [
            r#"{"type":"hello"}"#,
            r#"{"type":"prepare","epoch":1,"deadline_ms":5000}"#,
            r#"{"type":"resume","epoch":1,"interconnect":{"kind":"ethernet","mac":"52:54:00:12:34:56","pci":"0000:00:04.0"}}"#,
            r#"{"type":"resume","epoch":18446744073709551615,"interconnect":{"kind":"infiniband","hca":"mlx5_0","port":1}}"#,
            r#"{"type":"abort","epoch":7}"#,
            r#"{"type":"status"}"#,
            r#"{"type":"report","epoch":7,"cursor":1}"#,
        ];
        for (m, g) in all_host().iter().zip(golden_host) {
            assert_eq!(
                String::from_utf8(encode(m).unwrap()).unwrap(),
                format!("{g}\n")
            );
            assert_eq!(&decode::<HostMessage>(g.as_bytes()).unwrap(), m);
        }
        let golden_guest = [
            r#"{"type":"hello","vm":"vm-0","agent_version":"0.1.0","protocol":1,"ranks":2}"#,
            r#"{"type":"quiesced","epoch":1}"#,
            r#"{"type":"resumed","epoch":1,"interconnect":{"kind":"ethernet","mac":"52:54:00:12:34:56","pci":"0000:00:04.0"}}"#,
            r#"{"type":"resumed","epoch":2,"interconnect":{"kind":"infiniband","hca":"mlx5_0","port":1},"pci_devices":[{"address":"0000:00:03.0","vendor":6900,"device":4096,"class":131072}]}"#,
            r#"{"type":"failed","epoch":3,"reason":"rank 1 did not quiesce in 5000 ms"}"#,
            r#"{"type":"status","epoch":3,"phase":"quiesced","ranks":4,"registered":3}"#,
            r#"{"type":"report","epoch":3,"cursor":1,"next":2,"rank":1,"quiesce_ms":4,"counts":{"world":2,"first":0,"sent":[5,0],"received":[4,0],"drained":1}}"#,
            r#"{"type":"no_report","epoch":2,"reason":"no cut report of epoch 2 here"}"#,
        ];
        for (m, g) in all_guest().iter().zip(golden_guest) {
            assert_eq!(
                String::from_utf8(encode(m).unwrap()).unwrap(),
                format!("{g}\n")
            );
            assert_eq!(&decode::<GuestMessage>(g.as_bytes()).unwrap(), m);
        }
    }

    #[test]
    fn the_largest_report_part_fits_a_line_and_a_backward_cursor_is_refused() {
        let largest = GuestMessage::Report {
            epoch: u64::MAX,
            cursor: u64::MAX - 1,
            next: Some(u64::MAX),
            rank: u32::MAX,
            quiesce_ms: Some(u64::MAX),
            counts: CountsChunk::largest(),
        };
        encode(&largest).unwrap();
        let back = br#"{"type":"report","epoch":3,"cursor":2,"next":2,"rank":1,"counts":{"world":1,"first":0,"sent":[0],"received":[0],"drained":0}}"#;
        let e = decode::<GuestMessage>(back).unwrap_err().to_string();
        assert!(e.contains("next part Some(2) after 2"), "{e}");
    }

    #[test]
    fn strict_parsing_rejects_what_is_not_exactly_a_message() {
        let malformed = [
            "",
            "garbage",
            "{}",
            "[]",
            "null",
            r#"{"type":"reboot"}"#,
            r#"{"type":"prepare","epoch":1,"deadline_ms":5}"#, // host message from the guest
            r#"{"type":"quiesced"}"#,
            r#"{"type":"quiesced","epoch":1,"extra":true}"#,
            r#"{"type":"status","epoch":1,"phase":"asleep","ranks":2,"registered":1}"#,
            r#"{"type":"quiesced","epoch":-1}"#,
            r#"{"type":"quiesced","epoch":1.5}"#,
            r#"{"type":"quiesced","epoch":"1"}"#,
            r#"{"type":"quiesced","epoch":18446744073709551616}"#,
            r#"{"type":"quiesced","epoch":1,"epoch":2}"#,
            r#"{"type":"quiesced","epoch":1} trailing"#,
            r#"{"type":"hello","vm":"a","agent_version":"1","protocol":1}"#,
            r#"{"type":"resumed","epoch":1,"interconnect":{"kind":"myrinet"}}"#,
            r#"{"type":"resumed","epoch":1,"interconnect":{"kind":"ethernet","mac":"52:54:00:12:34:56","speed":10}}"#,
            r#"{"type":"resumed","epoch":1,"interconnect":{"kind":"ethernet","mac":"52:54:00:12:34:56"},"pci_devices":[{"address":"0000:00:03.0","vendor":70000,"device":1,"class":1}]}"#,
        ];
        for line in malformed {
            let err = decode::<GuestMessage>(line.as_bytes()).unwrap_err();
            assert!(matches!(err, Error::Malformed(_)), "{line}: {err:?}");
        }
        let invalid = [
            r#"{"type":"quiesced","epoch":0}"#,
            r#"{"type":"hello","vm":"","agent_version":"1","protocol":1,"ranks":1}"#,
            r#"{"type":"hello","vm":"a b","agent_version":"1","protocol":1,"ranks":1}"#,
            r#"{"type":"hello","vm":"a","agent_version":"1","protocol":1,"ranks":4097}"#,
            r#"{"type":"failed","epoch":1,"reason":"a\nb"}"#,
            r#"{"type":"status","epoch":1,"phase":"running","ranks":2,"registered":3}"#,
            r#"{"type":"resumed","epoch":1,"interconnect":{"kind":"ethernet","mac":"52:54:00:12:34"}}"#,
            r#"{"type":"resumed","epoch":1,"interconnect":{"kind":"ethernet","mac":"52:54:00:12:34:5G"}}"#,
            r#"{"type":"resumed","epoch":1,"interconnect":{"kind":"infiniband","hca":"mlx5_0","port":0}}"#,
            r#"{"type":"resumed","epoch":1,"interconnect":{"kind":"infiniband","hca":"mlx5_0","port":1,"pci":"00:05.0"}}"#,
        ];
        for line in invalid {
            let err = decode::<GuestMessage>(line.as_bytes()).unwrap_err();
            assert!(matches!(err, Error::Invalid(_)), "{line}: {err:?}");
        }
        let err = decode::<GuestMessage>(b"{\"type\":\"quiesced\",\"epoch\":1\xff}").unwrap_err();
        assert!(matches!(err, Error::NotUtf8(_)), "{err:?}");
        let long = format!(
            r#"{{"type":"failed","epoch":1,"reason":"{}"}}"#,
            "x".repeat(5000)
        );
        let err = decode::<GuestMessage>(long.as_bytes()).unwrap_err();
        assert!(matches!(err, Error::LineTooLong { .. }), "{err:?}");
    }

    #[test]
    fn encode_refuses_invalid_or_oversized_messages() {
        let bad = HostMessage::Prepare {
            epoch: 0,
            deadline_ms: 1,
        };
        assert!(matches!(encode(&bad), Err(Error::Invalid(_))));
        let many = GuestMessage::Resumed {
            epoch: 1,
            interconnect: eth(),
            pci_devices: Some(
                (0..MAX_PCI_DEVICES)
                    .map(|i| PciDevice {
                        address: format!("ffff:{i:02x}:1f.7"),
                        vendor: u16::MAX,
                        device: u16::MAX,
                        class: u32::MAX,
                    })
                    .collect(),
            ),
        };
        // The largest legal `resumed` still fits in one line.
        let line = encode(&many).unwrap();
        assert!(line.len() <= MAX_LINE, "{}", line.len());
    }

    #[test]
    fn address_checks() {
        assert!(is_pci_address("0000:00:04.0"));
        assert!(!is_pci_address("0000:00:04.0 "));
        assert!(!is_pci_address("0000:00:4.0"));
        assert!(!is_pci_address("0000:00:04:0"));
        assert!(is_mac_address("52:54:00:ab:cd:ef"));
        assert!(!is_mac_address("52:54:00:AB:CD:EF"));
        assert!(!is_mac_address("52-54-00-ab-cd-ef"));
    }
}
