//! Cuts of a running MPI job without moving it, through its guest agent: what a benchmark
//! harness or a scheduler takes to quiesce a job (every rank at a consistent cut, nothing in
//! flight), hold it and release it. `ninja-migrate cut` is a thin shell over this.
//!
//! ```no_run
//! # fn main() -> symvirt::error::Result<()> {
//! use std::time::Duration;
//! use symvirt::cut::JobCuts;
//! use symvirt::protocol::Interconnect;
//! let job = JobCuts::connect("/tmp/ctl.sock".as_ref(), Duration::from_secs(30))?;
//! job.wait_registered(Duration::from_secs(30))?; // every rank is there
//! let epoch = symvirt::controller::new_epoch();
//! let quiesced_in = job.quiesce(epoch, Duration::from_secs(30))?;
//! let here = Interconnect::Ethernet { mac: "52:54:00:00:00:01".into(), iface: None, pci: None };
//! let resumed_in = job.resume(epoch, &here, Duration::from_secs(30))?;
//! let report = symvirt::cut::job_report(&[job], epoch)?; // what every rank counted
//! assert!(report.mismatches().is_empty(), "a message was in flight at the cut");
//! # Ok(()) }
//! ```
//!
//! A cut held by one process can be released by another: [`JobCuts::continuing`] opens the
//! channel in the state the first left it (the agent itself gives a held cut up after its
//! stale-epoch time with no host connected).

use crate::error::{Error, Result};
use crate::host_channel::{ChannelOptions, HostChannel};
use crate::protocol::{AgentPhase, GuestMessage, HostMessage, Interconnect};
use crate::session::{GuestInfo, GuestSession};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use symvirt_proto::cut_report::RankCounts;
pub use symvirt_proto::cut_report::{CutReport, Mismatch, RankCut};

/// How long an agent that predates `status` is given to answer it.
const STATUS_WAIT: Duration = Duration::from_secs(2);

/// What the agent's `status` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentStatus {
    /// The last epoch the agent heard of (0: none).
    pub epoch: u64,
    /// Where it stands.
    pub phase: AgentPhase,
    /// How many of its ranks have registered now.
    pub registered: u32,
}

/// A connection to the agent of a running job.
#[derive(Debug)]
pub struct JobCuts {
    channel: HostChannel,
    info: GuestInfo,
}

impl JobCuts {
    /// Connects to the agent's channel socket `path` and waits (up to `timeout`) for its
    /// `hello`.
    pub fn connect(path: &Path, timeout: Duration) -> Result<JobCuts> {
        JobCuts::open(path, timeout, None)
    }

    /// Connects to take over the cut of `epoch` another connection left held (quiesced).
    pub fn continuing(path: &Path, epoch: u64, timeout: Duration) -> Result<JobCuts> {
        JobCuts::open(path, timeout, Some(GuestSession::quiesced(epoch)))
    }

    fn open(path: &Path, timeout: Duration, session: Option<GuestSession>) -> Result<JobCuts> {
        if !path.exists() {
            return Err(Error::Refused(format!(
                "no agent channel at {} (start symvirt-agent with --channel listen:{})",
                path.display(),
                path.display()
            )));
        }
        let options = ChannelOptions::labelled("cut");
        let channel = match session {
            None => HostChannel::connect(path, options),
            Some(s) => HostChannel::connect_continuing(path, options, s),
        }?;
        let info = channel.wait_hello(Instant::now() + timeout).map_err(|e| {
            Error::Deadline(format!(
                "no agent answered at {} within {} ms: {}",
                path.display(),
                timeout.as_millis(),
                e.chain()
            ))
        })?;
        Ok(JobCuts { channel, info })
    }

    /// Who the agent is, and how many ranks take part.
    pub fn info(&self) -> &GuestInfo {
        &self.info
    }

    /// The agent's status; `None` from an agent that predates `status` (it stays silent).
    pub fn status(&self) -> Result<Option<AgentStatus>> {
        self.channel.send(&HostMessage::Status)?;
        let answer = self.channel.wait_for(
            |m| matches!(m, GuestMessage::Status { .. }),
            Instant::now() + STATUS_WAIT,
        );
        match answer {
            Ok(GuestMessage::Status {
                epoch,
                phase,
                registered,
                ..
            }) => Ok(Some(AgentStatus {
                epoch,
                phase,
                registered,
            })),
            Ok(_) => Err(Error::Internal(
                "a status wait returned another message".into(),
            )),
            Err(Error::Timeout) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Waits (up to `timeout`) until every rank has registered with the agent.
    pub fn wait_registered(&self, timeout: Duration) -> Result<AgentStatus> {
        let until = Instant::now() + timeout;
        loop {
            let Some(status) = self.status()? else {
                return Err(Error::Refused(
                    "the agent does not report its registered ranks (it predates `status`)".into(),
                ));
            };
            if status.registered >= self.info.ranks {
                return Ok(status);
            }
            if Instant::now() >= until {
                return Err(Error::Deadline(format!(
                    "{} of {} ranks registered after {} ms",
                    status.registered,
                    self.info.ranks,
                    timeout.as_millis()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Brings the job to the cut of `epoch` (every rank there, nothing in flight) within
    /// `timeout`; returns how long it took. A job whose ranks have not all registered, or an
    /// agent already in an epoch, is refused at once.
    pub fn quiesce(&self, epoch: u64, timeout: Duration) -> Result<Duration> {
        if let Some(s) = self.status()? {
            if s.registered < self.info.ranks {
                return Err(Error::Refused(format!(
                    "only {} of the {} ranks the agent expects have registered: no job there, \
                     or not all of its ranks yet",
                    s.registered, self.info.ranks
                )));
            }
            if s.phase != AgentPhase::Running {
                return Err(Error::Refused(format!(
                    "the agent is in epoch {} already ({}): another host holds a cut",
                    s.epoch,
                    format!("{:?}", s.phase).to_lowercase()
                )));
            }
        }
        let prepare = HostMessage::Prepare {
            epoch,
            deadline_ms: u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
        };
        self.exchange(&prepare, "the cut", "reach the cut", timeout, |m| {
            matches!(m, GuestMessage::Quiesced { .. })
        })
    }

    /// Releases the cut of `epoch`, the ranks going on over `interconnect`, within `timeout`;
    /// returns how long they took.
    pub fn resume(
        &self,
        epoch: u64,
        interconnect: &Interconnect,
        timeout: Duration,
    ) -> Result<Duration> {
        let resume = HostMessage::Resume {
            epoch,
            interconnect: interconnect.clone(),
        };
        self.exchange(&resume, "the resume", "resume", timeout, |m| {
            matches!(m, GuestMessage::Resumed { .. })
        })
    }

    /// What this agent's ranks counted at the cut of `epoch` (one of the agent's last
    /// [`crate::protocol::REPORTED_EPOCHS`]), read part by part; [`job_report`] puts the
    /// agents of a job together. Fails with the agent's reason when it has no report (ranks of
    /// the explicit API count nothing).
    pub fn report(&self, epoch: u64) -> Result<Vec<RankCut>> {
        let mut ranks: BTreeMap<u32, (RankCounts, Option<u64>)> = BTreeMap::new();
        let mut cursor = Some(0);
        while let Some(c) = cursor {
            self.channel
                .send(&HostMessage::Report { epoch, cursor: c })?;
            let answer = self.channel.wait_for(
                |m| match m {
                    GuestMessage::Report {
                        epoch: e,
                        cursor: k,
                        ..
                    } => *e == epoch && *k == c,
                    GuestMessage::NoReport { epoch: e, .. } => *e == epoch,
                    _ => false,
                },
                Instant::now() + STATUS_WAIT,
            );
            let (rank, quiesce_ms, counts, next) = match answer {
                Ok(GuestMessage::Report {
                    rank,
                    quiesce_ms,
                    counts,
                    next,
                    ..
                }) => (rank, quiesce_ms, counts, next),
                Ok(GuestMessage::NoReport { reason, .. }) => {
                    return Err(Error::Guest(format!(
                        "no cut report of epoch {epoch} from {}: {reason}",
                        self.info.vm
                    )));
                }
                Ok(_) => {
                    return Err(Error::Internal(
                        "a report wait returned another message".into(),
                    ));
                }
                Err(Error::Timeout) if c == 0 => {
                    return Err(Error::Refused(format!(
                        "the agent of {} gives no cut reports (it predates `report`)",
                        self.info.vm
                    )));
                }
                Err(e) => return Err(e),
            };
            // Each part adds peers not counted before (RankCounts refuses repeats) to one of
            // at most the agent's ranks: a lying agent cannot keep this loop going.
            let known = ranks.len();
            match ranks.get_mut(&rank) {
                Some((acc, _)) => acc.add(&counts)?,
                None if known < self.info.ranks as usize => {
                    ranks.insert(rank, (RankCounts::new(&counts)?, quiesce_ms));
                }
                None => {
                    return Err(Error::Guest(format!(
                        "the cut report of epoch {epoch} from {} names more than its {} ranks",
                        self.info.vm, self.info.ranks
                    )));
                }
            }
            cursor = next;
        }
        let records = ranks
            .into_iter()
            .map(|(rank, (counts, ms))| counts.finish(rank, ms))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        if records.len() != self.info.ranks as usize {
            return Err(Error::Guest(format!(
                "the cut report of epoch {epoch} from {} has {} of its {} ranks",
                self.info.vm,
                records.len(),
                self.info.ranks
            )));
        }
        Ok(records)
    }

    /// Sends `message` and waits (up to `timeout`) for the answer `done` accepts, or the
    /// agent's `failed` ("the job did not `failed_to`: reason"); returns how long it took.
    fn exchange(
        &self,
        message: &HostMessage,
        what: &str,
        failed_to: &str,
        timeout: Duration,
        done: impl Fn(&GuestMessage) -> bool,
    ) -> Result<Duration> {
        let t = Instant::now();
        self.channel.send(message)?;
        let answer = self
            .channel
            .wait_for(
                |m| done(m) || matches!(m, GuestMessage::Failed { .. }),
                t + timeout,
            )
            .map_err(|e| Error::Deadline(format!("waiting for {what}: {}", e.chain())))?;
        if let GuestMessage::Failed { reason, .. } = answer {
            return Err(Error::Guest(format!(
                "the job did not {failed_to}: {reason}"
            )));
        }
        Ok(t.elapsed())
    }
}

/// The cut report of `epoch` of a job whose ranks are spread over `agents` (one per guest):
/// every rank's counts, checked to cover the job once ([`CutReport::assemble`]); a harness
/// then asks [`CutReport::mismatches`] whether any message was in flight.
pub fn job_report(agents: &[JobCuts], epoch: u64) -> Result<CutReport> {
    let mut records = Vec::new();
    for agent in agents {
        records.extend(agent.report(epoch)?);
    }
    Ok(CutReport::assemble(epoch, records)?)
}
