//! The MPI side of SymVirt: bring a running MPI job to a consistent cut (every message sent has
//! been received, every rank paused), report it to the guest agent, wait for the migration,
//! and hand the new interconnect to the application or runtime.
//!
//! Two modes:
//! - **explicit** (the supported one): every rank calls `symvirt_safe_point(comm, &ic)` once
//!   per iteration of its main loop (C API in `include/symvirt.h`, library
//!   `libsymvirt_mpi_<impl>.{so,a}`); the state machine is [`safepoint::SafePoint`]. Long
//!   compute phases in between are declared quiet (`symvirt_quiet_begin/end`): a thread of
//!   the C library cuts the ranks inside one in milliseconds (rank 0 decides, see
//!   `csrc/symvirt_explicit.c`; the cut itself is [`safepoint::SafePoint::cut_at`]).
//! - **transparent**: `libsymvirt_pmpi_<impl>.so` under `LD_PRELOAD` wraps MPI calls (PMPI),
//!   counts messages per peer, drains in-flight messages into its own buffers at a cut and
//!   delivers them later (`csrc/pmpi/`).
//!
//! How the work is split, and why: everything that does not touch MPI (the agent connection
//! and its watcher thread, [`control`]; the safe-point agreement state machine, [`safepoint`])
//! is Rust, written once, and exported to C by [`capi`]. The MPI calls themselves are thin C
//! glue in `csrc/`, compiled once per implementation with its own `mpicc` (Open MPI's handles
//! are pointers, MPICH's are integers: one build each), and linked with this crate's
//! staticlib into the per-implementation libraries by [`mpi_build`]. C glue rather than Rust
//! over bindgen'd `mpi-sys`: it builds in a second per implementation without a second cargo
//! target directory, and the PMPI wrappers must have exactly the C prototypes of `mpi.h`,
//! which the C compiler checks for us.
//!
//! Triggers: the guest agent's rank socket ([`control::Control`], `$SYMVIRT_AGENT_SOCKET`), and
//! SIGUSR1 forwarded by `mpirun`/`mpiexec` as a fallback for ranks without an agent (an odd
//! signal requests a cut, the next one releases it; [`control::install_signal_trigger`]).
//!
//! Refusals: a rank whose MPI uses RDMA verbs (a verbs device node open, [`verbs`]) answers
//! every cut with `unable`, in both modes (checked in [`control::Control::quiesce`], at the cut
//! only); the transparent layer does the same while an RMA window is open.
//!
//! Placement: where ranks share cores unbound and each is a scheduling group of its own, the
//! kernel may leave a cut thread unrun for tens of milliseconds; the transparent layer's rank 0
//! says so at start ([`placement`]).
//!
//! After resume, the runtime's transport hook runs on every rank before any rank continues:
//! `symvirt_on_resume` (explicit mode) or a `symvirt_transport_reselect` function the runtime
//! defines (transparent mode); that is where MPI Sessions finalize/re-init would go where the
//! runtime supports it. The interconnect (kind, device, MAC, PCI address, JSON) is handed over.
//!
//! Entry points for benches and end-to-end tests: [`mpi_build::build_libraries`],
//! [`mpi_build::build_program`], [`mpi_build::MpiImpl::launcher`]; programs in
//! `tests/programs/` (`stress.c`, `stress_f.f90`, `pingpong.c`).
//!
//! The flow of one epoch for a rank (explicit mode):
//!
//! ```text
//! agent --prepare{E}--> watcher thread: pending_epoch() = E
//! rank, safe point k:   start MAX-reduce(E) ... finish the reduce of k-2 -> E: cut here
//!                       on_quiesce hook -> quiesced{E} -> wait -> resume{E, interconnect}
//!                       on_resume hook (re-select transport) -> resumed{E} -> barrier
//! ```
//!
//! **Rust programs** written with the `mpi` crate (0.8) enable the feature `rsmpi` and use
//! `symvirt_mpi::rsmpi::SymVirt`, the issue's API: `SymVirt::init(&comm)` (collective; connects
//! to the agent at `$SYMVIRT_AGENT_SOCKET`, else the agent's default socket if it exists; with
//! no agent a safe point is a cheap no-op that still takes part, and SIGUSR1 can still cut),
//! `safe_point()` every iteration, `finalize()` before MPI is finalized; hooks with
//! `on_quiesce` / `on_resume`. Underneath, `rsmpi::MpiAgreement` runs the agreement with
//! `immediate_all_reduce_into` on a duplicate of `comm`. The program links whichever MPI
//! `mpi-sys` found at build time (`$MPI_PKG_CONFIG`, else `$MPICC`, else `mpicc`: Open MPI on
//! Debian with both installed); run it with that MPI's launcher (`examples/rust_ring.rs`):
//!
//! ```no_run
//! # #[cfg(feature = "rsmpi")]
//! # fn run() -> symvirt_mpi::Result<()> {
//! use mpi::traits::*;
//! use symvirt_mpi::rsmpi::{SafePointResult, SymVirt};
//!
//! // Funneled: SymVirt's watcher thread never calls MPI.
//! let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled).unwrap();
//! let world = universe.world();
//! let mut sv = SymVirt::init(&world)?;
//! sv.on_quiesce(|epoch| eprintln!("paused for epoch {epoch}"))?;
//! for _ in 0..1000 {
//!     // ... one iteration; its messages are matched within it ...
//!     if let SafePointResult::Resumed { interconnect, .. } = sv.safe_point()? {
//!         eprintln!("now on {interconnect}"); // re-select the transport here
//!     }
//! }
//! sv.finalize()?; // before `universe` is dropped (MPI_Finalize)
//! # Ok(())
//! # }
//! ```
//!
//! Other Rust MPI bindings run the same state machine over their own
//! [`safepoint::Agreement`]:
//!
//! ```no_run
//! use symvirt_mpi::control::{socket_path, Control};
//! use symvirt_mpi::safepoint::{Agreement, SafePoint, SafePointResult};
//! # fn run<A: Agreement>(agreement: A, rank: u32, work: impl Fn()) -> symvirt_mpi::Result<()> {
//! let control = Control::connect(&socket_path(None), rank, std::time::Duration::from_secs(10))?;
//! let mut sp = SafePoint::new(agreement, Some(control));
//! loop {
//!     work(); // one iteration; its messages are matched within it
//!     if let SafePointResult::Resumed { interconnect, .. } = sp.poll()? {
//!         println!("now on {interconnect:?}");
//!     }
//! }
//! # }
//! ```

pub mod capi;
pub mod control;
pub mod cut_log;
pub mod error;
pub mod mpi_build;
pub mod placement;
#[cfg(feature = "rsmpi")]
pub mod rsmpi;
pub mod safepoint;
pub mod verbs;

pub use error::{Error, Result};
