//! The explicit safe point for Rust MPI programs written with the `mpi` crate (feature `rsmpi`).
//!
//! [`SymVirt`] is the issue's API in Rust: [`SymVirt::init`] once after MPI is initialized,
//! [`SymVirt::safe_point`] once per iteration of the main loop on every rank,
//! [`SymVirt::finalize`] before MPI is finalized; [`SymVirt::quiet`] and
//! [`SymVirt::quiet_with_requests`] around a long computation, so that a cut requested during
//! it falls within milliseconds (a thread of the library makes it; see the `quiet` module).
//! [`MpiAgreement`] is the [`Agreement`] underneath: a MAX-reduction per pipeline slot with
//! `immediate_all_reduce_into` and a barrier, on a private duplicate of the user's communicator
//! (the same operations as the C glue's `MPI_Iallreduce`).
//!
//! Requests live across calls (started at one safe point, completed two later), which the
//! `mpi` crate's scoped requests cannot express safely: its `scope` must end before the call
//! returns. So the buffers are a heap allocation owned by the [`MpiAgreement`] through a raw
//! pointer, the requests are `'static`-scoped, and the allocation is freed only when no request
//! is left in flight (otherwise leaked, never freed under MPI).
//!
//! Limits: MPI errors abort the job (the `mpi` crate keeps MPI's default error handler and
//! does not report return codes), so the [`Agreement`] methods here only fail on misuse. One
//! `SymVirt` per process. The explicit mode's contract holds (each iteration's messages are
//! matched within it; see [`crate::safepoint`]). MPI itself keeps its transport: a resume
//! hands the new interconnect to the program's hook, which is where it would re-select one.

mod quiet;

use crate::control::{self, Control, SOCKET_ENV};
use crate::error::{Error, Result};
pub use crate::safepoint::SafePointResult;
use crate::safepoint::{Agreement, SLOTS, SafePoint};
use mpi::Threading;
use mpi::collective::SystemOperation;
use mpi::ffi::MPI_Request;
use mpi::raw::AsRaw;
use mpi::request::{Request, StaticScope};
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives};
use quiet::Quiet;
use std::marker::PhantomData;
use std::mem::ManuallyDrop;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;
pub use symvirt_proto::protocol::Interconnect;

/// One pipeline slot's buffers: MPI reads `send` and writes `recv` while its reduction runs.
#[derive(Default)]
struct Slot {
    send: u64,
    recv: u64,
}

/// The safe-point agreement over the `mpi` crate: one immediate MAX all-reduce per pipeline
/// slot, and a barrier, on a private duplicate of a communicator.
pub struct MpiAgreement {
    /// The duplicate; freed on drop unless MPI is already finalized.
    comm: ManuallyDrop<SimpleCommunicator>,
    /// `SLOTS` slots from a leaked `Box`; requests borrow into it; freed by `drop` when none is
    /// in flight.
    slots: NonNull<Slot>,
    requests: [Option<Request<'static, u64, StaticScope>>; SLOTS],
}

impl std::fmt::Debug for MpiAgreement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let in_flight: Vec<usize> = (0..SLOTS).filter(|&s| self.requests[s].is_some()).collect();
        f.debug_struct("MpiAgreement")
            .field("in_flight", &in_flight)
            .finish()
    }
}

impl MpiAgreement {
    /// An agreement on a duplicate of `comm` (collective over `comm`: every rank calls it).
    pub fn new<C: Communicator>(comm: &C) -> MpiAgreement {
        let slots: Box<[Slot; SLOTS]> = Box::default();
        let slots = NonNull::from(Box::leak(slots)).cast::<Slot>();
        MpiAgreement {
            comm: ManuallyDrop::new(comm.duplicate()),
            slots,
            requests: Default::default(),
        }
    }

    /// The private communicator (for a collective that must not mix with the user's traffic).
    pub fn communicator(&self) -> &SimpleCommunicator {
        &self.comm
    }

    fn check(&self, slot: usize) -> Result<()> {
        if slot < SLOTS {
            Ok(())
        } else {
            Err(Error::State(format!(
                "pipeline slot {slot} out of range (0..{SLOTS})"
            )))
        }
    }
}

impl Agreement for MpiAgreement {
    fn start(&mut self, slot: usize, value: u64) -> Result<()> {
        self.check(slot)?;
        if self.requests[slot].is_some() {
            return Err(Error::State(format!(
                "pipeline slot {slot} still has a reduction in flight"
            )));
        }
        // SAFETY: `slot < SLOTS`, so the pointer stays inside the allocation made in `new`,
        // which lives until `drop` and is freed there only when no request is in flight. No
        // request uses this slot (checked above), so nothing else refers to its fields: the
        // write and the two borrows below are exclusive. The borrows are 'static as far as
        // the type system knows; they end when `finish` completes the request, before the
        // slot is touched again, and the allocation outlives them (leaked if a request is
        // still in flight at drop).
        let (send, recv): (&'static u64, &'static mut u64) = unsafe {
            let p = self.slots.as_ptr().add(slot);
            (*p).send = value;
            (&(*p).send, &mut (*p).recv)
        };
        let request =
            self.comm
                .immediate_all_reduce_into(StaticScope, send, recv, SystemOperation::max());
        self.requests[slot] = Some(request);
        Ok(())
    }

    fn finish(&mut self, slot: usize) -> Result<u64> {
        self.check(slot)?;
        let request = self.requests[slot].take().ok_or_else(|| {
            Error::State(format!("no reduction in flight in pipeline slot {slot}"))
        })?;
        Ok(*request.wait_for_data())
    }

    fn barrier(&mut self) -> Result<()> {
        self.comm.barrier();
        Ok(())
    }
}

impl Drop for MpiAgreement {
    fn drop(&mut self) {
        let mut in_flight = false;
        for request in self.requests.iter_mut().filter_map(Option::take) {
            // Completing would block on ranks that may never start the same reduction (this
            // drop follows an error): leave the request to MPI and keep its buffers alive.
            // SAFETY: the request's buffers are in `slots`, which is leaked below, so they
            // outlive it.
            let _ = unsafe { request.into_raw() };
            in_flight = true;
        }
        if !in_flight {
            // SAFETY: `slots` came from `Box::leak` of a `Box<[Slot; SLOTS]>` in `new`, and no
            // request refers to it any more: this is the only owner.
            drop(unsafe { Box::from_raw(self.slots.cast::<[Slot; SLOTS]>().as_ptr()) });
        }
        if !mpi::environment::is_finalized() {
            // SAFETY: dropped once, here; the field is not used afterwards. Pending operations
            // on a freed communicator still complete (MPI defers the deallocation).
            unsafe { ManuallyDrop::drop(&mut self.comm) };
        }
        // After MPI_Finalize a communicator must not be freed: it is forgotten with `self`.
    }
}

/// How [`SymVirt::init_with`] finds its agent and how long it waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// The agent's rank socket; `None`: no agent (the safe point never stops for the agent).
    pub socket: Option<PathBuf>,
    /// How long registering with the agent may take.
    pub connect_timeout: Duration,
    /// How long a rank waits at a cut for the agent's `resume` or `abort`.
    pub quiesce_timeout: Duration,
    /// Install the SIGUSR1 fallback trigger ([`control::install_signal_trigger`]).
    pub signal_trigger: bool,
}

impl Options {
    /// As the C library does: the socket from `$SYMVIRT_AGENT_SOCKET`, else the agent's
    /// default socket if it exists, else none; timeouts from `$SYMVIRT_CONNECT_TIMEOUT_MS`
    /// (10 s) and `$SYMVIRT_QUIESCE_TIMEOUT_MS` (600 s); the SIGUSR1 trigger installed.
    pub fn from_env() -> Options {
        let socket = match std::env::var_os(SOCKET_ENV) {
            Some(p) if !p.is_empty() => Some(PathBuf::from(p)),
            _ => {
                let default = control::socket_path(None);
                default.exists().then_some(default)
            }
        };
        Options {
            socket,
            connect_timeout: env_ms("SYMVIRT_CONNECT_TIMEOUT_MS", 10_000),
            quiesce_timeout: env_ms("SYMVIRT_QUIESCE_TIMEOUT_MS", 600_000),
            signal_trigger: true,
        }
    }
}

fn env_ms(name: &str, fallback: u64) -> Duration {
    let ms = std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(fallback);
    Duration::from_millis(ms)
}

/// One `SymVirt` per process (the control plane and the request flag are process-wide).
static OPEN: AtomicBool = AtomicBool::new(false);

/// A rank's explicit safe point: the issue's `symvirt_init` / `symvirt_safe_point` /
/// `symvirt_finalize` for Rust, and quiet phases ([`SymVirt::quiet`]) for programs that
/// compute for long between safe points.
pub struct SymVirt {
    shared: Option<Arc<Shared>>,
    /// The quiet thread, started by the first quiet phase when MPI allows it.
    thread: Option<JoinHandle<()>>,
    /// Not `Send`: the application calls MPI through it from the thread that made it (MPI may
    /// give only `MPI_THREAD_FUNNELED`); `State` is `Send` for the quiet thread only.
    _funneled: PhantomData<*const ()>,
}

/// What the application's thread and the quiet thread share.
struct Shared {
    state: Mutex<State>,
    stop: AtomicBool,
}

struct State {
    sp: SafePoint<MpiAgreement>,
    quiet: Quiet,
}

// SAFETY: `State` holds MPI handles (communicators, requests, the application's declared
// requests) that are valid on any thread of the process. They are used only with the mutex of
// `Shared` held, and the only other thread that takes it, the quiet thread, exists only when
// MPI provides MPI_THREAD_SERIALIZED or more and calls MPI only while the application is
// inside a quiet phase, where by the contract it makes no MPI call: MPI calls never overlap.
// The quiet thread is joined before `SymVirt` lets go of `State` (finalize, drop), so it never
// frees a communicator itself; `SymVirt` stays `!Send`.
unsafe impl Send for State {}

impl std::fmt::Debug for SymVirt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sp = self
            .shared
            .as_ref()
            .and_then(|s| s.state.try_lock().ok().map(|st| format!("{:?}", st.sp)));
        f.debug_struct("SymVirt")
            .field("sp", &sp)
            .field("quiet_thread", &self.thread.is_some())
            .finish()
    }
}

impl SymVirt {
    /// Sets up the safe point on `comm` with [`Options::from_env`]. Collective over `comm`.
    pub fn init<C: Communicator>(comm: &C) -> Result<SymVirt> {
        SymVirt::init_with(comm, Options::from_env())
    }

    /// Sets up the safe point on `comm`. Collective over `comm`: registers this rank (its
    /// rank in `MPI_COMM_WORLD`, as the agent counts them) with the agent, then the ranks
    /// agree that all of them have an agent or none has. If any rank could not reach its
    /// agent, or only some ranks have one, every rank gets the error (none is left waiting in
    /// a safe point the others never enter).
    pub fn init_with<C: Communicator>(comm: &C, options: Options) -> Result<SymVirt> {
        if !mpi::environment::is_initialized() || mpi::environment::is_finalized() {
            return Err(Error::State(
                "SymVirt::init needs MPI initialized and not yet finalized".into(),
            ));
        }
        if OPEN.swap(true, Ordering::AcqRel) {
            return Err(Error::State(
                "SymVirt already initialized in this process".into(),
            ));
        }
        let result = SymVirt::open(comm, options);
        if result.is_err() {
            OPEN.store(false, Ordering::Release);
        }
        result
    }

    fn open<C: Communicator>(comm: &C, options: Options) -> Result<SymVirt> {
        if options.signal_trigger {
            if let Err(e) = control::install_signal_trigger() {
                log::warn!("symvirt: no SIGUSR1 trigger: {e}");
            }
        }
        let agreement = MpiAgreement::new(comm);
        let quiet = Quiet::new(comm, options.quiesce_timeout);
        let rank = SimpleCommunicator::world().rank();
        let connected = options
            .socket
            .as_deref()
            .map(|path| connect(path, rank, &options));
        // [failed, with an agent, without one], maximum over the ranks.
        let mine: [u8; 3] = [
            matches!(connected, Some(Err(_))) as u8,
            matches!(connected, Some(Ok(_))) as u8,
            connected.is_none() as u8,
        ];
        let mut all = [0u8; 3];
        agreement
            .communicator()
            .all_reduce_into(&mine[..], &mut all[..], SystemOperation::max());
        let control = match connected {
            Some(Err(e)) => return Err(e),
            _ if all[0] != 0 => {
                return Err(Error::State(
                    "another rank could not reach its guest agent".into(),
                ));
            }
            _ if all[1] != 0 && all[2] != 0 => {
                return Err(Error::State(
                    "some ranks have a guest agent and some have none".into(),
                ));
            }
            Some(Ok(c)) => Some(c),
            None => None,
        };
        let mut sp = SafePoint::new(agreement, control);
        sp.set_quiesce_timeout(options.quiesce_timeout);
        Ok(SymVirt {
            shared: Some(Arc::new(Shared {
                state: Mutex::new(State { sp, quiet }),
                stop: AtomicBool::new(false),
            })),
            thread: None,
            _funneled: PhantomData,
        })
    }

    /// The safe point: call it once per iteration of the main loop, on every rank of the
    /// communicator given to [`SymVirt::init`], after the iteration's messages are matched.
    /// Nothing pending: returns [`SafePointResult::Continue`] after starting one non-blocking
    /// reduction and completing one started two safe points earlier. When a migration was
    /// requested, every rank stops at the same safe point, the quiesce hook runs, the agent is
    /// told, and the call returns after resume (with the new interconnect) or abort.
    pub fn safe_point(&mut self) -> Result<SafePointResult> {
        self.state()?.sp.poll()
    }

    /// A quiet phase: runs `work`, which makes no MPI call, while the library can bring this
    /// rank into a cut on its behalf, so that a cut requested during a long computation falls
    /// in milliseconds instead of at the next safe point. Collective over the communicator
    /// given to [`SymVirt::init`]: every rank runs the same sequence of phases, and by the
    /// contract every message sent before a phase is matched by a receive posted before it
    /// (the iteration's exchange is done).
    ///
    /// When MPI provides `MPI_THREAD_SERIALIZED` or more (and `$SYMVIRT_PROGRESS_THREAD` is
    /// not `0`), a thread of the library makes the cut while `work` runs; the hooks run on it
    /// (thread name `symvirt-quiet`; a hook that panics there aborts the job). Otherwise the
    /// cut falls at the phase's begin or end. The end of a phase waits for every rank to end
    /// it, and for the resume of a cut in progress; a panic in `work` ends the phase too, then
    /// goes on unwinding. Returns what `work` returned and the outcome of the phase's cuts: the
    /// last one's result ([`SafePointResult::Continue`] when none fell in it), or the error of
    /// one that failed (the value of `work` is kept either way). The outer error: the phase
    /// could not begin (`work` did not run) or end.
    pub fn quiet<R>(&mut self, work: impl FnOnce() -> R) -> Result<(R, Result<SafePointResult>)> {
        self.quiet_with_requests(&[], work)
    }

    /// A quiet phase with non-blocking requests outstanding across it (an `Isend`/`Irecv`
    /// overlapped with the computation): as [`SymVirt::quiet`], and before every cut the
    /// library completes `requests` on every rank, so every message is received when the cut
    /// falls. They stay the application's (`MPI_Request_get_status`: progress, nothing freed):
    /// wait for them after the phase as usual. Contract: each completes without any MPI call
    /// made after the phase began. A request that does not complete within the quiesce
    /// timeout (`$SYMVIRT_QUIESCE_TIMEOUT_MS`) aborts the job with a message.
    ///
    /// ```ignore
    /// let recv = left.immediate_receive_into(scope, &mut buf[..]);
    /// let send = right.immediate_send(scope, &out[..]);
    /// let (sum, cut) = sv.quiet_with_requests(&[&recv, &send], || compute(&data))?;
    /// send.wait();
    /// recv.wait();
    /// if let SafePointResult::Resumed { interconnect, .. } = cut? { /* moved */ }
    /// ```
    pub fn quiet_with_requests<R>(
        &mut self,
        requests: &[&dyn AsRaw<Raw = MPI_Request>],
        work: impl FnOnce() -> R,
    ) -> Result<(R, Result<SafePointResult>)> {
        let shared = Arc::clone(self.shared()?);
        self.start_thread(&shared);
        {
            let mut guard = lock(&shared)?;
            let State { sp, quiet } = &mut *guard;
            let handles = requests.iter().map(|r| r.as_raw()).collect();
            quiet.begin(sp, handles, self.thread.is_some());
        }
        // The quiet thread may cut and call MPI from here to the end: the application must not.
        let value = std::panic::catch_unwind(AssertUnwindSafe(work));
        // Ended whatever `work` did: the thread stops using the requests before a panic can
        // drop them, and no rank waits for this one's end. The lock is held by a cut the quiet
        // thread is making: until the resume.
        let ended = lock(&shared).map(|mut guard| {
            let State { sp, quiet } = &mut *guard;
            quiet.end(sp)
        });
        match value {
            Ok(value) => Ok((value, ended?)),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }

    /// Starts the quiet thread, once, when MPI allows a second thread to call it.
    fn start_thread(&mut self, shared: &Arc<Shared>) {
        let wanted = std::env::var("SYMVIRT_PROGRESS_THREAD").map_or(true, |v| v != "0");
        if self.thread.is_some()
            || !wanted
            || mpi::environment::threading_support() < Threading::Serialized
        {
            return;
        }
        let shared = Arc::clone(shared);
        // Read before the thread exists: it may call MPI once it runs.
        let first_rank = SimpleCommunicator::world().rank() == 0;
        match std::thread::Builder::new()
            .name("symvirt-quiet".into())
            .spawn(move || quiet_thread(&shared))
        {
            Ok(handle) => {
                self.thread = Some(handle);
                if first_rank {
                    crate::placement::warn();
                }
            }
            Err(e) => log::warn!("symvirt: no quiet thread ({e}): cuts fall at phase ends"),
        }
    }

    /// Runs `hook(epoch)` at every cut, before the agent is told this rank is quiesced (record
    /// or flush state here; every rank is at the same safe point).
    pub fn on_quiesce(&mut self, hook: impl FnMut(u64) + Send + 'static) -> Result<()> {
        self.state()?.sp.on_quiesce(Box::new(hook));
        Ok(())
    }

    /// Runs `hook(epoch, interconnect)` after a resume, before the agent is told this rank
    /// continues (re-select the transport here); no rank sends before all ran it.
    pub fn on_resume(
        &mut self,
        hook: impl FnMut(u64, &Interconnect) + Send + 'static,
    ) -> Result<()> {
        self.state()?.sp.on_resume(Box::new(hook));
        Ok(())
    }

    /// Whether this rank reports to a guest agent (else a cut comes only from SIGUSR1).
    pub fn has_agent(&self) -> bool {
        self.shared
            .as_ref()
            .and_then(|s| lock(s).ok().map(|st| st.sp.control().is_some()))
            .unwrap_or(false)
    }

    /// Safe points passed so far.
    pub fn iteration(&self) -> u64 {
        self.shared
            .as_ref()
            .and_then(|s| lock(s).ok().map(|st| st.sp.iteration()))
            .unwrap_or(0)
    }

    /// Settles the reductions still in flight, frees the private communicators and
    /// unregisters from the agent. Collective; call it before MPI is finalized.
    pub fn finalize(mut self) -> Result<()> {
        self.close()
    }

    fn close(&mut self) -> Result<()> {
        drop(self.state()?);
        let Some(shared) = self.shared.take() else {
            return Ok(());
        };
        self.stop_thread(&shared);
        OPEN.store(false, Ordering::Release);
        let state = Arc::into_inner(shared)
            .ok_or_else(|| Error::State("the quiet thread still holds the safe point".into()))?
            .state
            .into_inner()
            .map_err(|_| Error::State("a hook panicked during a cut".into()))?;
        let State { sp, quiet } = state;
        drop(quiet);
        sp.finish().map(drop)
    }

    fn stop_thread(&mut self, shared: &Shared) {
        shared.stop.store(true, Ordering::Release);
        if let Some(handle) = self.thread.take() {
            control::wake_until(|| handle.is_finished());
            let _ = handle.join();
        }
    }

    fn shared(&self) -> Result<&Arc<Shared>> {
        // One flag read in the MPI library: a clear error instead of an MPI call after
        // MPI_Finalize (which aborts).
        if mpi::environment::is_finalized() {
            return Err(Error::State(
                "MPI is finalized: call SymVirt::finalize before dropping the Universe".into(),
            ));
        }
        self.shared
            .as_ref()
            .ok_or_else(|| Error::State("SymVirt already finalized".into()))
    }

    fn state(&mut self) -> Result<MutexGuard<'_, State>> {
        lock(self.shared()?)
    }
}

fn lock(shared: &Shared) -> Result<MutexGuard<'_, State>> {
    shared
        .state
        .lock()
        .map_err(|_| Error::State("a hook panicked during a cut".into()))
}

/// The quiet thread: sleeps until a cut is requested, or inside a phase for a few
/// milliseconds; inside a phase runs the protocol's turn (see `quiet`).
fn quiet_thread(shared: &Shared) {
    while !shared.stop.load(Ordering::Acquire) {
        let Ok(mut guard) = shared.state.lock() else {
            return;
        };
        let State { sp, quiet } = &mut *guard;
        let turn =
            std::panic::catch_unwind(AssertUnwindSafe(|| quiet.inside() && quiet.thread_turn(sp)));
        let Ok(driving) = turn else {
            // A hook panicked in a cut: the other ranks would wait for this one forever.
            let line = "symvirt: a hook panicked in a cut made by the quiet thread: aborting the \
                        job, its ranks would otherwise wait for this one forever\n";
            let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
            SimpleCommunicator::world().abort(71)
        };
        let pending = sp.pending().is_some();
        // A copy: the wait returns at once for a request published after it.
        let served = sp.served().clone();
        let sleep = quiet.thread_sleep(driving);
        drop(guard);
        if pending {
            // Until the application enters a quiet phase, or the verdict comes.
            std::thread::sleep(Duration::from_micros(200));
        } else {
            control::wait_requested(&served, 0, sleep);
        }
    }
}

impl Drop for SymVirt {
    /// Without [`SymVirt::finalize`] (an error path): nothing collective is waited for;
    /// reductions in flight are left to MPI. The quiet thread is stopped and joined (outside a
    /// phase, which even a panic in `work` ends, it holds the lock only for a few loads).
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            self.stop_thread(&shared);
            OPEN.store(false, Ordering::Release);
        }
    }
}

fn connect(path: &Path, rank: i32, options: &Options) -> Result<Control> {
    let rank = u32::try_from(rank)
        .map_err(|_| Error::State(format!("MPI rank {rank} is not a valid rank")))?;
    Control::connect(path, rank, options.connect_timeout)
}
