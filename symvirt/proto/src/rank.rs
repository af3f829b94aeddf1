//! The rank-side protocol between the guest agent and the MPI ranks of its guest, and
//! [`RankClient`], the rank's end of it (what the MPI layer calls).
//!
//! Same framing as the host channel (newline-delimited JSON, [`crate::protocol::MAX_LINE`]) over
//! a unix socket inside the guest (default [`DEFAULT_RANK_SOCKET`]):
//!
//! ```text
//! rank  -> agent  {"type":"register","rank":R}        once, first
//! agent -> rank   {"type":"registered","rank":R,"expected":N}  or  {"type":"refused","reason":...}
//! agent -> rank   {"type":"prepare","epoch":E,"deadline_ms":D}
//! rank  -> agent  {"type":"counts","epoch":E,"counts":C}  0 or more, at the quiescent point
//! rank  -> agent  {"type":"quiesced","epoch":E}        at the rank's quiescent point
//! agent -> rank   {"type":"resume","epoch":E,"interconnect":I}  or  {"type":"abort","epoch":E}
//! rank  -> agent  {"type":"resumed","epoch":E}         after reconnecting over I
//! ```
//!
//! `counts` ([`CountsChunk`]s, in any order) carry what the rank had sent to and received from
//! every rank at the cut, for the host's cut report ([`crate::cut_report`]); a rank of the
//! transparent layer sends them, one of the explicit API has none to send.
//!
//! An agent at its connection limit answers `refused` before reading anything and closes the
//! connection. A rank must read what the agent sends (at its safe points is enough): the agent
//! drops a rank it cannot write to within `symvirt_agent::agent::RANK_WRITE_TIMEOUT`, failing the
//! epoch in progress.

use crate::cut_report::CountsChunk;
use crate::error::{Error, Result};
use crate::framing::{Frame, LineReader};
use crate::protocol::{Interconnect, MAX_LINE, MAX_REASON, Validate, decode, encode};
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// Where the agent listens for ranks unless told otherwise.
pub const DEFAULT_RANK_SOCKET: &str = "/run/symvirt/agent.sock";

/// A message from a rank to the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum RankRequest {
    /// The rank joins (first message on a connection).
    Register {
        /// The MPI rank (its id in MPI_COMM_WORLD).
        rank: u32,
    },
    /// Part of what the rank had sent and received at the cut of `epoch` (before `quiesced`).
    Counts {
        /// The epoch.
        epoch: u64,
        /// The peers this message counts.
        counts: CountsChunk,
    },
    /// The rank is at its quiescent point for `epoch`.
    Quiesced {
        /// The epoch.
        epoch: u64,
    },
    /// The rank continued after `resume` for `epoch`.
    Resumed {
        /// The epoch.
        epoch: u64,
    },
    /// The rank cannot reach a quiescent point for `epoch` (e.g. it uses communication its
    /// MPI layer cannot bring to a cut): the agent fails the epoch with `reason`.
    Unable {
        /// The epoch.
        epoch: u64,
        /// Why, for the host: at most [`MAX_UNABLE_REASON`] bytes, no control characters.
        reason: String,
    },
}

/// The longest `reason` in [`RankRequest::Unable`]: the agent passes it on inside its own
/// `failed` reason, which the host accepts up to [`MAX_REASON`] bytes.
pub const MAX_UNABLE_REASON: usize = MAX_REASON / 2;

/// A message from the agent to a rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum AgentNotice {
    /// Registration accepted.
    Registered {
        /// The rank.
        rank: u32,
        /// How many ranks the agent waits for.
        expected: u32,
    },
    /// Registration refused.
    Refused {
        /// Why.
        reason: String,
    },
    /// Reach the quiescent point within `deadline_ms`.
    Prepare {
        /// The epoch.
        epoch: u64,
        /// Milliseconds left, counted from receipt.
        deadline_ms: u64,
    },
    /// Continue over `interconnect`.
    Resume {
        /// The epoch.
        epoch: u64,
        /// The interconnect to reconnect over.
        interconnect: Interconnect,
    },
    /// The epoch is cancelled; continue on the old interconnect.
    Abort {
        /// The epoch.
        epoch: u64,
    },
}

impl Validate for RankRequest {
    fn validate(&self) -> Result<()> {
        match self {
            RankRequest::Register { .. } => Ok(()),
            RankRequest::Quiesced { epoch }
            | RankRequest::Resumed { epoch }
            | RankRequest::Unable { epoch, .. }
            | RankRequest::Counts { epoch, .. }
                if *epoch == 0 =>
            {
                Err(Error::Invalid("epoch 0".into()))
            }
            RankRequest::Unable { reason, .. }
                if reason.len() > MAX_UNABLE_REASON || reason.chars().any(char::is_control) =>
            {
                Err(Error::Invalid(format!(
                    "reason: want at most {MAX_UNABLE_REASON} bytes without control characters"
                )))
            }
            RankRequest::Counts { counts, .. } => counts.validate(),
            _ => Ok(()),
        }
    }
}

impl Validate for AgentNotice {
    fn validate(&self) -> Result<()> {
        match self {
            AgentNotice::Refused { reason } if reason.len() > MAX_REASON => {
                Err(Error::Invalid("reason too long".into()))
            }
            AgentNotice::Resume { interconnect, .. } => interconnect.validate(),
            _ => Ok(()),
        }
    }
}

/// What a rank is told to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RankEvent {
    /// Reach the quiescent point, then call [`RankClient::quiesced`].
    Prepare {
        /// The epoch.
        epoch: u64,
        /// When the agent gives up (rank's clock).
        deadline: Instant,
    },
    /// Reconnect over `interconnect`, then call [`RankClient::resumed`].
    Resume {
        /// The epoch.
        epoch: u64,
        /// The interconnect.
        interconnect: Interconnect,
    },
    /// Continue as before.
    Abort {
        /// The epoch.
        epoch: u64,
    },
}

/// A rank's connection to its guest's agent.
#[derive(Debug)]
pub struct RankClient {
    stream: UnixStream,
    lines: LineReader,
    pending: VecDeque<AgentNotice>,
    rank: u32,
    expected: u32,
}

/// The agent connection's fd, so a thread can wait for the agent (with `poll`) without
/// holding the client. The client buffers what it read: call [`RankClient::try_event`] until it
/// returns `None` before waiting.
impl std::os::fd::AsRawFd for RankClient {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.stream.as_raw_fd()
    }
}

impl RankClient {
    /// Connects to the agent at `path` and registers as `rank`; waits at most `timeout` for the
    /// agent's answer.
    pub fn connect(path: impl AsRef<Path>, rank: u32, timeout: Duration) -> Result<RankClient> {
        let path = path.as_ref();
        let stream = UnixStream::connect(path)
            .map_err(|e| Error::io(format!("connect to agent at {}", path.display()), e))?;
        let mut client = RankClient {
            stream,
            lines: LineReader::new(MAX_LINE),
            pending: VecDeque::new(),
            rank,
            expected: 0,
        };
        client.send(&RankRequest::Register { rank })?;
        let deadline = Instant::now() + timeout;
        loop {
            match client.next_notice(Some(deadline))? {
                Some(AgentNotice::Registered { expected, .. }) => {
                    client.expected = expected;
                    return Ok(client);
                }
                Some(AgentNotice::Refused { reason }) => return Err(Error::RankRefused(reason)),
                Some(other) => client.pending.push_back(other),
                None => return Err(Error::Timeout),
            }
        }
    }

    /// This rank's id.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// How many ranks the agent waits for.
    pub fn expected_ranks(&self) -> u32 {
        self.expected
    }

    /// The next instruction, waiting up to `timeout` (`None`: forever). `Ok(None)` on timeout.
    pub fn next_event(&mut self, timeout: Option<Duration>) -> Result<Option<RankEvent>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let notice = match self.pending.pop_front() {
                Some(n) => n,
                None => match self.next_notice(deadline)? {
                    Some(n) => n,
                    None => return Ok(None),
                },
            };
            let event = match notice {
                AgentNotice::Prepare { epoch, deadline_ms } => RankEvent::Prepare {
                    epoch,
                    deadline: Instant::now() + Duration::from_millis(deadline_ms),
                },
                AgentNotice::Resume {
                    epoch,
                    interconnect,
                } => RankEvent::Resume {
                    epoch,
                    interconnect,
                },
                AgentNotice::Abort { epoch } => RankEvent::Abort { epoch },
                AgentNotice::Registered { .. } | AgentNotice::Refused { .. } => continue,
            };
            return Ok(Some(event));
        }
    }

    /// The next instruction if one has arrived; never blocks (for an MPI safe point).
    pub fn try_event(&mut self) -> Result<Option<RankEvent>> {
        self.next_event(Some(Duration::ZERO))
    }

    /// Reports that this rank is at its quiescent point for `epoch`.
    pub fn quiesced(&mut self, epoch: u64) -> Result<()> {
        self.send(&RankRequest::Quiesced { epoch })
    }

    /// Sends what this rank had sent to (`sent[p]`) and received from (`received[p]`) every
    /// rank `p` at the cut of `epoch`, and how many messages it drained to get there; before
    /// [`RankClient::quiesced`].
    pub fn counts(
        &mut self,
        epoch: u64,
        sent: &[u64],
        received: &[u64],
        drained: u64,
    ) -> Result<()> {
        for counts in CountsChunk::split(sent, received, drained)? {
            self.send(&RankRequest::Counts { epoch, counts })?;
        }
        Ok(())
    }

    /// Reports that this rank continued after `resume` for `epoch`.
    pub fn resumed(&mut self, epoch: u64) -> Result<()> {
        self.send(&RankRequest::Resumed { epoch })
    }

    /// Reports that this rank cannot reach a quiescent point for `epoch`, and why (control
    /// characters become spaces; a reason over [`MAX_UNABLE_REASON`] bytes is cut).
    pub fn unable(&mut self, epoch: u64, reason: &str) -> Result<()> {
        let mut reason: String = reason
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        let mut end = reason.len().min(MAX_UNABLE_REASON);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
        self.send(&RankRequest::Unable { epoch, reason })
    }

    fn send(&mut self, request: &RankRequest) -> Result<()> {
        let line = encode(request)?;
        self.stream
            .write_all(&line)
            .map_err(|e| Error::io("write to agent", e))
    }

    /// Reads until one notice is complete; `None` when `deadline` passes first.
    fn next_notice(&mut self, deadline: Option<Instant>) -> Result<Option<AgentNotice>> {
        let mut buf = [0u8; 4096];
        loop {
            let wait = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            // A zero timeout means "block" to set_read_timeout; poll without waiting instead.
            let nonblocking = wait == Some(Duration::ZERO);
            self.stream
                .set_nonblocking(nonblocking)
                .and_then(|()| self.stream.set_read_timeout(wait.filter(|w| !w.is_zero())))
                .map_err(|e| Error::io("configure agent socket", e))?;
            let n = match self.stream.read(&mut buf) {
                Ok(0) => return Err(Error::Closed),
                Ok(n) => n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(None);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::io("read from agent", e)),
            };
            let mut frames = Vec::new();
            self.lines.push(&buf[..n], |f| frames.push(f));
            for frame in frames {
                match frame {
                    Frame::Line(line) => self.pending.push_back(decode(&line)?),
                    Frame::Oversized { bytes } => {
                        return Err(Error::LineTooLong {
                            len: bytes,
                            limit: MAX_LINE,
                        });
                    }
                }
            }
            if let Some(n) = self.pending.pop_front() {
                return Ok(Some(n));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_protocol_golden_lines() {
        let cases: [(RankRequest, &str); 3] = [
            (
                RankRequest::Register { rank: 3 },
                r#"{"type":"register","rank":3}"#,
            ),
            (
                RankRequest::Quiesced { epoch: 2 },
                r#"{"type":"quiesced","epoch":2}"#,
            ),
            (
                RankRequest::Resumed { epoch: 2 },
                r#"{"type":"resumed","epoch":2}"#,
            ),
        ];
        for (m, g) in cases {
            assert_eq!(encode(&m).unwrap(), format!("{g}\n").into_bytes());
            assert_eq!(decode::<RankRequest>(g.as_bytes()).unwrap(), m);
        }
        let notice = AgentNotice::Resume {
            epoch: 2,
            interconnect: Interconnect::Ethernet {
                mac: "52:54:00:00:00:01".into(),
                iface: Some("eth1".into()),
                pci: None,
            },
        };
        let g = r#"{"type":"resume","epoch":2,"interconnect":{"kind":"ethernet","mac":"52:54:00:00:00:01","iface":"eth1"}}"#;
        assert_eq!(encode(&notice).unwrap(), format!("{g}\n").into_bytes());
        assert_eq!(decode::<AgentNotice>(g.as_bytes()).unwrap(), notice);
        assert!(decode::<RankRequest>(br#"{"type":"register","rank":1,"x":1}"#).is_err());
        assert!(decode::<RankRequest>(br#"{"type":"quiesced","epoch":0}"#).is_err());
    }

    #[test]
    fn counts_golden_line_and_the_largest_fits_a_line() {
        let m = RankRequest::Counts {
            epoch: 2,
            counts: CountsChunk {
                world: 2,
                first: 0,
                sent: vec![0, 5],
                received: vec![0, 4],
                drained: 1,
            },
        };
        let g = r#"{"type":"counts","epoch":2,"counts":{"world":2,"first":0,"sent":[0,5],"received":[0,4],"drained":1}}"#;
        assert_eq!(encode(&m).unwrap(), format!("{g}\n").into_bytes());
        assert_eq!(decode::<RankRequest>(g.as_bytes()).unwrap(), m);
        let largest = RankRequest::Counts {
            epoch: u64::MAX,
            counts: CountsChunk::largest(),
        };
        encode(&largest).unwrap();
        let beyond = br#"{"type":"counts","epoch":2,"counts":{"world":2,"first":1,"sent":[0,5],"received":[0,4],"drained":1}}"#;
        let e = decode::<RankRequest>(beyond).unwrap_err().to_string();
        assert!(e.contains("peers 1..3 of a job of 2"), "{e}");
    }
}
