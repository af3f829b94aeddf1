//! Pre-copy live migration for VMMs that own their guest memory.
//!
//! A VMM hands the engine its guest memory (vm-memory regions) and a control interface
//! ([`vm::MigratableVm`]): pause and resume the vCPUs, save and restore opaque state, throttle.
//! The engine copies memory while the guest runs, resends what the guest dirtied (KVM dirty log
//! or ring, ORed with vm-memory's bitmap of the VMM's own writes), and switches over when the
//! last round fits the downtime target. The source stays authoritative until the destination
//! has committed; any earlier failure resumes the source untouched.
//!
//! The pieces: [`source::migrate`] runs the handshake, the pre-copy rounds, stop-and-copy and
//! the commit (or the rollback); [`destination::receive`] is its counterpart. Dirty pages come
//! from a [`dirty::DirtyTracker`] as [`dirty::PageRun`]s; [`pages`] moves them between guest
//! memory and the memory connections; [`protocol`] owns the bytes on the wire (and [`codec`]
//! the control messages); [`transport`] owns the connections and their socket I/O, and [`tls`]
//! their authentication and encryption between hosts; [`policy`] decides when to throttle and
//! when to switch over. Progress reaches the caller through a callback. [`snapshot`] writes a
//! paused VM to a file and builds it back from one (checkpoint and restart).
//!
//! The main flow, here with the [software guest](software_guest) over the in-process transport
//! (TCP and unix sockets work the same through [`transport::connect`] and
//! [`transport::Listener::accept`]):
//!
//! ```
//! use migrate_core::{destination, source, transport, MigrationConfig};
//! use migrate_core::software_guest::{SoftwareGuest, SoftwareGuestConfig};
//!
//! let cfg = MigrationConfig::default();
//! let guest_cfg = SoftwareGuestConfig::new(16 << 20);
//! let src = SoftwareGuest::start(guest_cfg.clone())?;
//! let (src_conn, dst_conn) = transport::in_process(2)?;
//! let dst = std::thread::spawn({
//!     let cfg = cfg.clone();
//!     move || destination::receive(dst_conn, &cfg, |_layout| SoftwareGuest::incoming(guest_cfg))
//! });
//! let on_progress = |p: &migrate_core::Progress| log::debug!("{p:?}");
//! let report = source::migrate(&src, src_conn, &cfg, Some(&on_progress))?;
//! let (guest, _) = dst.join().unwrap()?; // running on the destination now
//! assert!(guest.counter() >= src.counter()); // it continues from where the source paused
//! println!("{} rounds, downtime {:.1} ms", report.rounds.len(), report.downtime_ms);
//! # Ok::<(), migrate_core::Error>(())
//! ```

#![deny(clippy::undocumented_unsafe_blocks)]

pub mod codec;
pub mod destination;
pub mod dirty;
pub mod error;
pub mod kvm;
pub mod pages;
pub mod policy;
pub mod protocol;
pub mod snapshot;
pub mod software_guest;
pub mod source;
pub mod stats;
pub mod tls;
pub mod transport;
pub mod vm;
pub mod vmm;

pub use error::{Error, Phase, Result};
pub use policy::{MigrationConfig, TimeoutStrategy};
pub use stats::{MigrationReport, Progress, ReceiveReport, RoundStats};
