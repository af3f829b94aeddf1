//! The host's view of one guest: the per-epoch state machine and what it rejects.
//!
//! [`GuestSession`] is pure (no I/O): the host channel feeds it every message it sends
//! ([`GuestSession::on_host`], which refuses transitions the protocol does not allow) and every
//! parsed guest message ([`GuestSession::on_guest`], which returns a [`Rejection`] and keeps its
//! state when the guest is wrong). See [`crate::protocol`] for the diagram.

use crate::error::{Error, Result};
use crate::protocol::{
    GuestMessage, HostMessage, Interconnect, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};
use std::fmt;
use std::time::{Duration, Instant};

/// Where one guest is in the protocol.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    /// No valid `hello` yet: the guest is not identified.
    Idle,
    /// Identified, no epoch in progress.
    Running,
    /// `prepare` sent; waiting for `quiesced` until `deadline`.
    Preparing {
        /// The epoch.
        epoch: u64,
        /// When the guest's time runs out (host clock).
        deadline: Instant,
    },
    /// Every rank of the guest is at the quiescent point.
    Quiesced {
        /// The epoch.
        epoch: u64,
    },
    /// `resume` sent; waiting for `resumed`.
    Resuming {
        /// The epoch.
        epoch: u64,
        /// What the guest was told to use.
        interconnect: Interconnect,
    },
    /// The guest reported `failed`; the host should `abort` (or roll back).
    Failed {
        /// The epoch.
        epoch: u64,
        /// The guest's reason.
        reason: String,
    },
}

impl SessionState {
    /// The epoch in progress, if any.
    pub fn epoch(&self) -> Option<u64> {
        match self {
            SessionState::Idle | SessionState::Running => None,
            SessionState::Preparing { epoch, .. }
            | SessionState::Quiesced { epoch }
            | SessionState::Resuming { epoch, .. }
            | SessionState::Failed { epoch, .. } => Some(*epoch),
        }
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SessionState::Idle => write!(f, "idle"),
            SessionState::Running => write!(f, "running"),
            SessionState::Preparing { epoch, .. } => write!(f, "preparing({epoch})"),
            SessionState::Quiesced { epoch } => write!(f, "quiesced({epoch})"),
            SessionState::Resuming { epoch, .. } => write!(f, "resuming({epoch})"),
            SessionState::Failed { epoch, .. } => write!(f, "failed({epoch})"),
        }
    }
}

/// Who the guest said it is in its `hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestInfo {
    /// The VM name.
    pub vm: String,
    /// The agent's version.
    pub agent_version: String,
    /// The protocol version.
    pub protocol: u32,
    /// Local MPI ranks.
    pub ranks: u32,
}

/// Why a guest line was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectionKind {
    /// Longer than the line limit.
    Oversized,
    /// Not UTF-8, not JSON, unknown type or fields.
    Malformed,
    /// Values out of range.
    Invalid,
    /// About an epoch other than the one in progress.
    WrongEpoch,
    /// Not expected in the current state (e.g. `quiesced` before `prepare`).
    Unexpected,
    /// A `hello` with an unsupported protocol version.
    Version,
    /// A `hello` naming a different VM than the first one did.
    Identity,
}

impl RejectionKind {
    /// Every kind, in counter order.
    pub const ALL: [RejectionKind; 7] = [
        RejectionKind::Oversized,
        RejectionKind::Malformed,
        RejectionKind::Invalid,
        RejectionKind::WrongEpoch,
        RejectionKind::Unexpected,
        RejectionKind::Version,
        RejectionKind::Identity,
    ];

    /// Index into [`RejectionKind::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }
}

/// One refused guest line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The category (counted).
    pub kind: RejectionKind,
    /// What exactly, for the log.
    pub detail: String,
}

impl Rejection {
    /// A rejection of `kind`.
    pub fn new(kind: RejectionKind, detail: impl Into<String>) -> Rejection {
        Rejection {
            kind,
            detail: detail.into(),
        }
    }

    /// Classifies a decoding error.
    pub fn from_decode_error(err: &symvirt_proto::Error) -> Rejection {
        let kind = match err {
            symvirt_proto::Error::LineTooLong { .. } => RejectionKind::Oversized,
            symvirt_proto::Error::Invalid(_) => RejectionKind::Invalid,
            _ => RejectionKind::Malformed,
        };
        Rejection::new(kind, err.chain())
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.detail)
    }
}

/// How an accepted guest message affected the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Accepted {
    /// It changed the state or the guest's identity: pass it on.
    Applied,
    /// A repeated, identical `hello` between epochs: nothing new, not passed on.
    Duplicate,
}

/// The protocol state of one guest, as the host sees it.
#[derive(Debug, Clone)]
pub struct GuestSession {
    state: SessionState,
    guest: Option<GuestInfo>,
    hello_on_this_connection: bool,
    /// `hello`s the host asked for on this connection: each excuses one repeated `hello` (the
    /// agent may also have seen the connection open and said it unasked), until the guest says
    /// anything else.
    hellos_requested: u32,
    last_epoch: u64,
}

impl Default for GuestSession {
    fn default() -> Self {
        GuestSession::new()
    }
}

impl GuestSession {
    /// A session with an unidentified guest.
    pub fn new() -> GuestSession {
        GuestSession {
            state: SessionState::Idle,
            guest: None,
            hello_on_this_connection: false,
            hellos_requested: 0,
            last_epoch: 0,
        }
    }

    /// A session taken up by a controller that did not see its start (a recovery): the guest
    /// is quiesced in `epoch` as far as the journal of the interrupted run knows. Its `hello`
    /// identifies it on the new connection; the agent answers a `resume` of an epoch it already
    /// completed with its `resumed` again.
    pub fn quiesced(epoch: u64) -> GuestSession {
        GuestSession {
            state: SessionState::Quiesced { epoch },
            last_epoch: epoch,
            ..GuestSession::new()
        }
    }

    /// The current state.
    pub fn state(&self) -> &SessionState {
        &self.state
    }

    /// The guest's identity, once it said `hello`.
    pub fn guest(&self) -> Option<&GuestInfo> {
        self.guest.as_ref()
    }

    /// The highest epoch the host started.
    pub fn last_epoch(&self) -> u64 {
        self.last_epoch
    }

    /// A new connection to the guest's channel: the agent will say `hello` again.
    pub fn connected(&mut self) {
        self.hello_on_this_connection = false;
        self.hellos_requested = 0;
    }

    /// Whether the `prepare` deadline of the epoch in progress has passed at `now`.
    pub fn deadline_passed(&self, now: Instant) -> bool {
        matches!(self.state, SessionState::Preparing { deadline, .. } if now >= deadline)
    }

    /// Applies a message the host is about to send; refuses one the protocol does not allow
    /// now. Returns the state before, so a failed send can be undone with [`GuestSession::undo`].
    pub fn on_host(&mut self, message: &HostMessage, now: Instant) -> Result<SessionState> {
        let refuse = |s: &SessionState| Error::Transition {
            message: message.describe(),
            state: s.to_string(),
        };
        let next = match (message, &self.state) {
            (HostMessage::Hello, state) => {
                // Allowed in every state; asks for an introduction, changes nothing else.
                self.hellos_requested = self.hellos_requested.saturating_add(1);
                return Ok(state.clone());
            }
            // Allowed in every state; the answer changes nothing.
            (HostMessage::Status | HostMessage::Report { .. }, state) => return Ok(state.clone()),
            (HostMessage::Prepare { epoch, deadline_ms }, SessionState::Running)
                if *epoch > self.last_epoch =>
            {
                SessionState::Preparing {
                    epoch: *epoch,
                    deadline: now + Duration::from_millis(*deadline_ms),
                }
            }
            (
                HostMessage::Resume {
                    epoch,
                    interconnect,
                },
                SessionState::Quiesced { epoch: e },
            ) if epoch == e => SessionState::Resuming {
                epoch: *epoch,
                interconnect: interconnect.clone(),
            },
            (
                HostMessage::Abort { epoch },
                SessionState::Preparing { epoch: e, .. }
                | SessionState::Quiesced { epoch: e }
                | SessionState::Failed { epoch: e, .. },
            ) if epoch == e => SessionState::Running,
            (_, state) => return Err(refuse(state)),
        };
        if let HostMessage::Prepare { epoch, .. } = message {
            self.last_epoch = *epoch;
        }
        Ok(std::mem::replace(&mut self.state, next))
    }

    /// Undoes [`GuestSession::on_host`] after the message could not be sent, unless the state
    /// moved on meanwhile.
    pub fn undo(&mut self, applied: &SessionState, before: SessionState) {
        if &self.state == applied {
            self.state = before;
        }
    }

    /// Applies a guest message, or rejects it and keeps the state.
    pub fn on_guest(&mut self, message: &GuestMessage) -> std::result::Result<Accepted, Rejection> {
        use RejectionKind::*;
        if let GuestMessage::Hello {
            vm,
            agent_version,
            protocol,
            ranks,
        } = message
        {
            if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(protocol) {
                return Err(Rejection::new(
                    Version,
                    format!(
                        "protocol {protocol} not in {MIN_PROTOCOL_VERSION}..={PROTOCOL_VERSION}"
                    ),
                ));
            }
            if let Some(known) = &self.guest {
                if &known.vm != vm {
                    return Err(Rejection::new(
                        Identity,
                        format!("hello from vm {vm:?}, but this guest is {:?}", known.vm),
                    ));
                }
            }
            let info = GuestInfo {
                vm: vm.clone(),
                agent_version: agent_version.clone(),
                protocol: *protocol,
                ranks: *ranks,
            };
            // A second hello on one connection means the agent restarted (a virtio-serial port
            // can be reopened without the host's socket noticing). A restarted agent has lost
            // the epoch in progress: refuse it then, and let the controller's deadline act.
            if self.hello_on_this_connection {
                if self.hellos_requested > 0 && self.guest.as_ref() == Some(&info) {
                    // The answer to the host's `hello`, after one the agent sent unasked.
                    self.hellos_requested -= 1;
                    return Ok(Accepted::Duplicate);
                }
                if let Some(epoch) = self.state.epoch() {
                    return Err(Rejection::new(
                        Unexpected,
                        format!("second hello on one connection during epoch {epoch}"),
                    ));
                }
                if self.guest.as_ref() == Some(&info) {
                    return Ok(Accepted::Duplicate);
                }
            }
            self.guest = Some(info);
            self.hello_on_this_connection = true;
            if self.state == SessionState::Idle {
                self.state = SessionState::Running;
            }
            return Ok(Accepted::Applied);
        }
        // The answer to the host's `hello` comes before anything else the agent says.
        self.hellos_requested = 0;
        let what = message.describe();
        if self.guest.is_none() {
            return Err(Rejection::new(Unexpected, format!("{what} before hello")));
        }
        if let GuestMessage::Status { ranks, .. } = message {
            // Information, in any state; it must agree with the agent's hello.
            let said = self.guest.as_ref().map_or(0, |g| g.ranks);
            if *ranks != said {
                return Err(Rejection::new(
                    Invalid,
                    format!("{what} for {ranks} ranks, but the agent's hello said {said}"),
                ));
            }
            return Ok(Accepted::Applied);
        }
        if matches!(
            message,
            GuestMessage::Report { .. } | GuestMessage::NoReport { .. }
        ) {
            // An answer about a past cut, in any state.
            return Ok(Accepted::Applied);
        }
        let got = message.epoch().unwrap_or(0);
        match self.state.epoch() {
            None => {
                return Err(Rejection::new(
                    Unexpected,
                    format!("{what} with no epoch in progress"),
                ));
            }
            Some(current) if current != got => {
                return Err(Rejection::new(
                    WrongEpoch,
                    format!(
                        "{what}, but epoch {current} is in progress ({})",
                        self.state
                    ),
                ));
            }
            Some(_) => {}
        }
        let next = match (message, &self.state) {
            (GuestMessage::Quiesced { epoch }, SessionState::Preparing { .. }) => {
                SessionState::Quiesced { epoch: *epoch }
            }
            (
                GuestMessage::Resumed {
                    epoch,
                    interconnect,
                    ..
                },
                SessionState::Resuming {
                    interconnect: sent, ..
                },
            ) => {
                if interconnect.kind() != sent.kind() {
                    return Err(Rejection::new(
                        Invalid,
                        format!(
                            "resumed{{epoch={epoch}}} on {}, but the guest was given {}",
                            interconnect.kind(),
                            sent.kind()
                        ),
                    ));
                }
                SessionState::Running
            }
            (
                GuestMessage::Failed { epoch, reason },
                SessionState::Preparing { .. }
                | SessionState::Quiesced { .. }
                | SessionState::Resuming { .. },
            ) => SessionState::Failed {
                epoch: *epoch,
                reason: reason.clone(),
            },
            (_, state) => {
                return Err(Rejection::new(
                    Unexpected,
                    format!("{what} in state {state}"),
                ));
            }
        };
        self.state = next;
        Ok(Accepted::Applied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_is_answered_in_any_state_and_changes_nothing() {
        let mut s = GuestSession::default();
        let status = |ranks| GuestMessage::Status {
            epoch: 1,
            phase: crate::protocol::AgentPhase::Quiesced,
            ranks,
            registered: 1,
        };
        assert!(s.on_guest(&status(1)).is_err(), "status before hello");
        s.on_guest(&hello("vm0")).unwrap();
        s.on_host(
            &HostMessage::Prepare {
                epoch: 1,
                deadline_ms: 1000,
            },
            Instant::now(),
        )
        .unwrap();
        s.on_guest(&GuestMessage::Quiesced { epoch: 1 }).unwrap();
        let before = s.state().clone();
        s.on_host(&HostMessage::Status, Instant::now()).unwrap();
        assert_eq!(s.on_guest(&status(1)), Ok(Accepted::Applied));
        assert_eq!(s.state(), &before);
        // Ranks other than the hello's are a lie.
        assert!(s.on_guest(&status(3)).is_err());
        assert_eq!(s.state(), &before);
    }

    fn hello(vm: &str) -> GuestMessage {
        GuestMessage::Hello {
            vm: vm.into(),
            agent_version: "1".into(),
            protocol: PROTOCOL_VERSION,
            ranks: 1,
        }
    }

    fn eth() -> Interconnect {
        Interconnect::Ethernet {
            mac: "52:54:00:00:00:01".into(),
            iface: None,
            pci: None,
        }
    }

    fn prepare(epoch: u64) -> HostMessage {
        HostMessage::Prepare {
            epoch,
            deadline_ms: 1000,
        }
    }

    fn kind(r: std::result::Result<Accepted, Rejection>) -> RejectionKind {
        r.unwrap_err().kind
    }

    #[test]
    fn full_epoch_then_next_epoch() {
        let now = Instant::now();
        let mut s = GuestSession::new();
        s.connected();
        s.on_guest(&hello("vm0")).unwrap();
        assert_eq!(s.state(), &SessionState::Running);
        s.on_host(&prepare(1), now).unwrap();
        assert!(!s.deadline_passed(now));
        assert!(s.deadline_passed(now + Duration::from_secs(2)));
        s.on_guest(&GuestMessage::Quiesced { epoch: 1 }).unwrap();
        s.on_host(
            &HostMessage::Resume {
                epoch: 1,
                interconnect: eth(),
            },
            now,
        )
        .unwrap();
        s.on_guest(&GuestMessage::Resumed {
            epoch: 1,
            interconnect: eth(),
            pci_devices: None,
        })
        .unwrap();
        assert_eq!(s.state(), &SessionState::Running);
        // Epochs only go up.
        assert!(s.on_host(&prepare(1), now).is_err());
        s.on_host(&prepare(2), now).unwrap();
        s.on_guest(&GuestMessage::Failed {
            epoch: 2,
            reason: "x".into(),
        })
        .unwrap();
        assert!(matches!(s.state(), SessionState::Failed { epoch: 2, .. }));
        s.on_host(&HostMessage::Abort { epoch: 2 }, now).unwrap();
        assert_eq!(s.state(), &SessionState::Running);
    }

    #[test]
    fn a_hello_the_host_asked_for_is_excused_once_during_an_epoch() {
        let now = Instant::now();
        let mut s = GuestSession::new();
        s.connected();
        s.on_guest(&hello("vm0")).unwrap();
        s.on_host(&prepare(1), now).unwrap();
        // A new connection mid-epoch (the destination's channel): the agent says hello when it
        // sees the port open, and again in answer to the host's hello.
        s.connected();
        assert_eq!(
            s.on_host(&HostMessage::Hello, now).unwrap(),
            s.state().clone()
        );
        assert_eq!(s.on_guest(&hello("vm0")), Ok(Accepted::Applied));
        assert_eq!(s.on_guest(&hello("vm0")), Ok(Accepted::Duplicate));
        assert!(matches!(
            s.state(),
            SessionState::Preparing { epoch: 1, .. }
        ));
        // A third, unasked, is an agent that restarted and lost the epoch.
        assert_eq!(kind(s.on_guest(&hello("vm0"))), RejectionKind::Unexpected);
        // Asking never excuses another VM's hello.
        s.on_host(&HostMessage::Hello, now).unwrap();
        assert_eq!(kind(s.on_guest(&hello("vm1"))), RejectionKind::Identity);
    }

    #[test]
    fn guest_mistakes_are_rejected_without_changing_state() {
        let now = Instant::now();
        let mut s = GuestSession::new();
        s.connected();
        assert_eq!(
            kind(s.on_guest(&GuestMessage::Quiesced { epoch: 1 })),
            RejectionKind::Unexpected
        );
        assert_eq!(s.state(), &SessionState::Idle);
        assert_eq!(s.on_guest(&hello("vm0")), Ok(Accepted::Applied));
        // The agent restarted between epochs: an identical hello is a duplicate, a changed one
        // is news.
        assert_eq!(s.on_guest(&hello("vm0")), Ok(Accepted::Duplicate));
        let more_ranks = GuestMessage::Hello {
            vm: "vm0".into(),
            agent_version: "1".into(),
            protocol: PROTOCOL_VERSION,
            ranks: 4,
        };
        assert_eq!(s.on_guest(&more_ranks), Ok(Accepted::Applied));
        assert_eq!(s.guest().unwrap().ranks, 4);
        // quiesced before prepare
        assert_eq!(
            kind(s.on_guest(&GuestMessage::Quiesced { epoch: 1 })),
            RejectionKind::Unexpected
        );
        s.on_host(&prepare(5), now).unwrap();
        let before = s.state().clone();
        assert_eq!(
            kind(s.on_guest(&GuestMessage::Quiesced { epoch: 4 })),
            RejectionKind::WrongEpoch
        );
        assert_eq!(
            kind(s.on_guest(&GuestMessage::Resumed {
                epoch: 5,
                interconnect: eth(),
                pci_devices: None
            })),
            RejectionKind::Unexpected
        );
        assert_eq!(s.state(), &before);
        // An agent restart during the epoch is refused: the new agent knows nothing of it.
        assert_eq!(kind(s.on_guest(&hello("vm0"))), RejectionKind::Unexpected);
        s.on_guest(&GuestMessage::Quiesced { epoch: 5 }).unwrap();
        assert_eq!(
            kind(s.on_guest(&GuestMessage::Quiesced { epoch: 5 })),
            RejectionKind::Unexpected
        );
        // A resumed on another interconnect than the one sent.
        s.on_host(
            &HostMessage::Resume {
                epoch: 5,
                interconnect: eth(),
            },
            now,
        )
        .unwrap();
        let ib = Interconnect::Infiniband {
            hca: "mlx5_0".into(),
            port: 1,
            pci: None,
        };
        assert_eq!(
            kind(s.on_guest(&GuestMessage::Resumed {
                epoch: 5,
                interconnect: ib,
                pci_devices: None
            })),
            RejectionKind::Invalid
        );
        assert!(matches!(s.state(), SessionState::Resuming { epoch: 5, .. }));
        // Reconnection: a new hello is fine, a different VM is not, a bad version is not.
        s.connected();
        let bad_version = GuestMessage::Hello {
            vm: "vm0".into(),
            agent_version: "1".into(),
            protocol: 99,
            ranks: 1,
        };
        assert_eq!(kind(s.on_guest(&bad_version)), RejectionKind::Version);
        assert_eq!(kind(s.on_guest(&hello("vm1"))), RejectionKind::Identity);
        s.on_guest(&hello("vm0")).unwrap();
        assert!(matches!(s.state(), SessionState::Resuming { epoch: 5, .. }));
    }

    #[test]
    fn host_transitions_are_checked() {
        let now = Instant::now();
        let mut s = GuestSession::new();
        // Not identified yet.
        assert!(matches!(
            s.on_host(&prepare(1), now),
            Err(Error::Transition { .. })
        ));
        s.connected();
        s.on_guest(&hello("vm0")).unwrap();
        let resume = HostMessage::Resume {
            epoch: 1,
            interconnect: eth(),
        };
        assert!(s.on_host(&resume, now).is_err());
        let before = s.on_host(&prepare(1), now).unwrap();
        assert!(s.on_host(&resume, now).is_err(), "resume before quiesced");
        assert!(s.on_host(&HostMessage::Abort { epoch: 2 }, now).is_err());
        let applied = s.state().clone();
        s.undo(&applied, before);
        assert_eq!(s.state(), &SessionState::Running);
    }
}
