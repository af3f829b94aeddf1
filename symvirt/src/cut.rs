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
use std::path::Path;
use std::time::{Duration, Instant};

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
