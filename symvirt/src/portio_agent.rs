//! The in-guest agent's role for a reference-VMM guest (a guest without MPI), played by the VMM.
//!
//! The reference VMM's guest program is hand-assembled machine code: it cannot parse JSON. It
//! does the part that makes this the SymVirt hypercall: at its pause point vCPU 0 moves every
//! channel byte through the two I/O ports of [`crate::portio`] (one VM exit per byte) into and
//! out of a mailbox in guest memory, and every vCPU parks there while the mailbox's wait word
//! is set (see [`migrate_core::vmm::guest::mailbox`]). This module is the rest of an agent,
//! running as a VMM thread: it reads the host's lines from the mailbox, answers `hello`, turns
//! `prepare` into the wait word and reports `quiesced` once every vCPU is parked at its pause
//! point, and on `resume` (or `abort`) clears the word and, for `resume`, reports `resumed`.
//!
//! Its state (phase, epoch) lives in the mailbox's agent words, so it migrates with guest
//! memory: the destination's agent continues the epoch the source's started.

use crate::error::{Error, Result};
use crate::framing::{Frame, LineReader};
use crate::protocol::{
    AgentPhase, GuestMessage, HostMessage, MAX_LINE, PROTOCOL_VERSION, decode, encode,
};
use migrate_core::vmm::ReferenceVm;
use migrate_core::vmm::guest::mailbox;
use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// The agent's version, as sent in `hello`.
pub const AGENT_VERSION: &str = concat!("reference-", env!("CARGO_PKG_VERSION"));

/// How often the agent looks at the mailbox.
const POLL: Duration = Duration::from_millis(2);

// Agent words in the mailbox.
const WORD_PHASE: usize = 0;
const WORD_EPOCH: usize = 1;
const WORD_LAST_EPOCH: usize = 2;
const PHASE_RUNNING: u64 = 0;
const PHASE_PREPARING: u64 = 1;
const PHASE_QUIESCED: u64 = 2;

/// A running agent role; dropping it stops its thread.
#[derive(Debug)]
pub struct PortIoAgent {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl PortIoAgent {
    /// Enables the guest's channel on `port` (the device must be plugged on the VM's I/O bus
    /// there) and starts answering for the guest named `name`.
    pub fn start(vm: Arc<ReferenceVm>, name: &str, port: u16) -> Result<PortIoAgent> {
        mailbox::enable(vm.memory(), port).map_err(vmm)?;
        let stop = Arc::new(AtomicBool::new(false));
        let mut core = Core {
            vm,
            name: name.to_owned(),
            lines: LineReader::new(MAX_LINE),
            outgoing: VecDeque::new(),
        };
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("symvirt-pio-{name}"))
            .spawn(move || {
                // Says hello unasked when it starts, as an agent does when it sees the host.
                core.say(GuestMessage::Hello {
                    vm: core.name.clone(),
                    agent_version: AGENT_VERSION.into(),
                    protocol: PROTOCOL_VERSION,
                    ranks: 0,
                });
                while !thread_stop.load(Ordering::SeqCst) {
                    if let Err(e) = core.turn() {
                        log::warn!("port-I/O agent {}: {e}", core.name);
                    }
                    std::thread::sleep(POLL);
                }
            })
            .map_err(|e| Error::io("spawn the port-I/O agent", e))?;
        Ok(PortIoAgent {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for PortIoAgent {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn vmm(e: migrate_core::Error) -> Error {
    Error::Vmm(Box::new(e))
}

struct Core {
    vm: Arc<ReferenceVm>,
    name: String,
    lines: LineReader,
    /// Bytes for the host that did not fit in the outbox yet.
    outgoing: VecDeque<u8>,
}

impl Core {
    fn word(&self, i: usize) -> Result<u64> {
        mailbox::agent_word(self.vm.memory(), i).map_err(vmm)
    }

    fn set_word(&self, i: usize, v: u64) -> Result<()> {
        mailbox::set_agent_word(self.vm.memory(), i, v).map_err(vmm)
    }

    fn say(&mut self, message: GuestMessage) {
        match encode(&message) {
            Ok(line) => self.outgoing.extend(line),
            Err(e) => log::error!("cannot encode {}: {e}", message.describe()),
        }
    }

    fn turn(&mut self) -> Result<()> {
        // A paused VM (migrating, or handed over to a destination) is left alone: its memory
        // belongs to the migration.
        if self.vm.is_paused() {
            return Ok(());
        }
        let mem = self.vm.memory();
        let bytes = mailbox::take_inbox(mem).map_err(vmm)?;
        let mut frames = Vec::new();
        self.lines.push(&bytes, |f| frames.push(f));
        for frame in frames {
            match frame {
                Frame::Line(line) => match decode::<HostMessage>(&line) {
                    Ok(m) => self.on_host(m)?,
                    Err(e) => log::warn!("port-I/O agent {}: ignored host line: {e}", self.name),
                },
                Frame::Oversized { bytes } => {
                    log::warn!("port-I/O agent {}: ignored {bytes}-byte line", self.name)
                }
            }
        }
        if self.word(WORD_PHASE)? == PHASE_PREPARING {
            let epoch = self.word(WORD_EPOCH)?;
            let parked = (0..self.vm.config().vcpus)
                .map(|i| self.vm.status(i).map(|b| b.waiting == epoch))
                .collect::<std::result::Result<Vec<bool>, _>>()
                .map_err(vmm)?;
            if parked.iter().all(|&p| p) {
                self.set_word(WORD_PHASE, PHASE_QUIESCED)?;
                self.say(GuestMessage::Quiesced { epoch });
            }
        }
        if !self.outgoing.is_empty() {
            let pending: Vec<u8> = self.outgoing.iter().copied().collect();
            let n = mailbox::put_outbox(self.vm.memory(), &pending).map_err(vmm)?;
            self.outgoing.drain(..n);
        }
        Ok(())
    }

    fn on_host(&mut self, message: HostMessage) -> Result<()> {
        log::info!(
            "port-I/O agent {}: host says {}",
            self.name,
            message.describe()
        );
        let phase = self.word(WORD_PHASE)?;
        let current = self.word(WORD_EPOCH)?;
        let mem = self.vm.memory();
        match message {
            HostMessage::Hello => self.say(GuestMessage::Hello {
                vm: self.name.clone(),
                agent_version: AGENT_VERSION.into(),
                protocol: PROTOCOL_VERSION,
                ranks: 0,
            }),
            HostMessage::Prepare { epoch, .. } => {
                if phase != PHASE_RUNNING || epoch <= self.word(WORD_LAST_EPOCH)? {
                    log::warn!(
                        "port-I/O agent {}: ignored prepare{{epoch={epoch}}}",
                        self.name
                    );
                    return Ok(());
                }
                self.set_word(WORD_EPOCH, epoch)?;
                self.set_word(WORD_LAST_EPOCH, epoch)?;
                self.set_word(WORD_PHASE, PHASE_PREPARING)?;
                // The SymVirt wait: every vCPU parks at its next pause point.
                mailbox::set_wait(mem, epoch).map_err(vmm)?;
            }
            HostMessage::Resume {
                epoch,
                interconnect,
            } => {
                if phase != PHASE_QUIESCED || epoch != current {
                    log::warn!(
                        "port-I/O agent {}: ignored resume{{epoch={epoch}}}",
                        self.name
                    );
                    return Ok(());
                }
                // The SymVirt signal.
                mailbox::set_wait(mem, 0).map_err(vmm)?;
                self.set_word(WORD_PHASE, PHASE_RUNNING)?;
                self.say(GuestMessage::Resumed {
                    epoch,
                    interconnect,
                    pci_devices: None,
                });
            }
            HostMessage::Abort { epoch } => {
                if phase == PHASE_RUNNING || epoch != current {
                    log::warn!(
                        "port-I/O agent {}: ignored abort{{epoch={epoch}}}",
                        self.name
                    );
                    return Ok(());
                }
                mailbox::set_wait(mem, 0).map_err(vmm)?;
                self.set_word(WORD_PHASE, PHASE_RUNNING)?;
            }
            HostMessage::Status => self.say(GuestMessage::Status {
                epoch: self.word(WORD_LAST_EPOCH)?,
                phase: match phase {
                    PHASE_PREPARING => AgentPhase::Preparing,
                    PHASE_QUIESCED => AgentPhase::Quiesced,
                    _ => AgentPhase::Running,
                },
                ranks: 0,
                registered: 0,
            }),
            HostMessage::Report { epoch, .. } => self.say(GuestMessage::NoReport {
                epoch,
                reason: "this guest runs no MPI ranks: nothing is counted at its cuts".into(),
            }),
        }
        Ok(())
    }
}
