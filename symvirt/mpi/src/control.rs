//! The control plane of one rank: its connection to the guest agent, watched by a thread.
//!
//! MPI code must learn about a migration request without a system call on its fast path, so a
//! watcher thread owns the [`RankClient`] and publishes the requested epoch in an atomic
//! ([`pending_epoch`]): checking it is a few loads. The thread never calls MPI. At the cut the
//! rank calls [`Control::quiesce`], which reports `quiesced` and blocks until the agent says
//! `resume` (with the new interconnect) or `abort`; after re-selecting its transport the rank
//! calls [`Control::resumed`].
//!
//! One control plane per process (one process is one rank).

use crate::error::{Error, Result};
use crate::verbs;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use symvirt_proto::protocol::Interconnect;
use symvirt_proto::rank::{RankClient, RankEvent};

/// The environment variable naming the agent's rank socket.
pub const SOCKET_ENV: &str = "SYMVIRT_AGENT_SOCKET";

/// How long the watcher blocks on the agent socket before it looks at its stop flag again
/// (dropping a [`Control`] also wakes it at once by shutting the socket's read side).
const WATCH_TIMEOUT_MS: i32 = 500;

/// How long a cut for an epoch the agent aborted waits for a newer `prepare` before it is given
/// up ([`Control::give_up_in`]): a new host's `prepare` follows the old epoch's `abort` at once
/// (the agent ends the old epoch for it), and the cut may then go on to serve the new epoch.
pub const ABORT_GRACE: Duration = Duration::from_millis(500);

/// The epoch the agent asked this rank to reach a cut for (0: none). Read on MPI fast paths.
static REQUESTED: AtomicU64 = AtomicU64::new(0);
/// Whether a control plane is open in this process.
static OPEN: AtomicBool = AtomicBool::new(false);

/// Bumped whenever a cut is requested (by the agent or by SIGUSR1) and by [`wake_waiters`]:
/// the futex word a thread in [`wait_requested`] sleeps on, so that waiting costs nothing
/// between requests.
static REQUESTS: AtomicU32 = AtomicU32::new(0);

/// Wakes every thread in [`wait_requested`]. Async-signal-safe (an atomic and a system call).
pub fn wake_waiters() {
    REQUESTS.fetch_add(1, Ordering::AcqRel);
    // SAFETY: FUTEX_WAKE on the address of a static AtomicU32; the kernel reads no memory of
    // ours beyond that word and writes none.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            REQUESTS.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        );
    }
}

/// Wakes the threads in [`wait_requested`] until `ended()` says the one being stopped (its
/// stop flag already set) has returned: one wake, sent just before its wait began, would be
/// missed, and it would sleep out its timeout (up to a second at a job's end).
pub fn wake_until(ended: impl Fn() -> bool) {
    while !ended() {
        wake_waiters();
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Blocks until a cut `served` does not cover is requested, other than `skip` (0: none), and
/// returns its epoch; or until `timeout` passes, or [`wake_waiters`] is called (then 0: the
/// caller looks at its own flags). Never spins: the thread sleeps on a futex the request's
/// publisher wakes.
pub fn wait_requested(served: &Served, skip: u64, timeout: Duration) -> u64 {
    let deadline = Instant::now() + timeout;
    let seen = REQUESTS.load(Ordering::Acquire);
    loop {
        let e = pending_epoch(served);
        if e != 0 && e != skip {
            return e;
        }
        if REQUESTS.load(Ordering::Acquire) != seen {
            return 0;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return 0;
        }
        let ts = libc::timespec {
            tv_sec: left.as_secs() as libc::time_t,
            tv_nsec: left.subsec_nanos() as libc::c_long,
        };
        // SAFETY: FUTEX_WAIT on the address of a static AtomicU32 with a relative timeout that
        // lives across the call; the kernel only reads both. It returns at once if the word
        // changed since `seen` was read, so no wake between the checks above and here is lost.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                REQUESTS.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                seen,
                &ts as *const libc::timespec,
            );
        }
    }
}

/// SIGUSR1s received (the fallback trigger; see [`install_signal_trigger`]).
static SIGNALS: AtomicU64 = AtomicU64::new(0);

/// Cuts requested by SIGUSR1 have epochs above this (the agent's epochs count from 1).
pub const SIGNAL_EPOCH_BASE: u64 = 1 << 48;

/// The highest epoch of each kind this process asked a cut for itself ([`request_locally`]).
static LOCAL: Served = Served::new();

/// The last cut made, counted apart for the agent's epochs and for SIGUSR1's: signal epochs lie
/// above [`SIGNAL_EPOCH_BASE`], so one number would hide every later request of the agent
/// behind the first signal cut. Whoever makes cuts keeps one (the transparent layer, a safe
/// point) and asks [`pending_epoch`] with it. Atomic: the layer's progress thread reads the
/// one the application's thread records into. `#[repr(C)]`: the C layer embeds it.
#[repr(C)]
#[derive(Debug, Default)]
pub struct Served {
    agent: AtomicU64,
    signal: AtomicU64,
}

impl Served {
    /// No cut made yet.
    pub const fn new() -> Served {
        Served {
            agent: AtomicU64::new(0),
            signal: AtomicU64::new(0),
        }
    }

    fn of(&self, epoch: u64) -> &AtomicU64 {
        if is_signal_epoch(epoch) {
            &self.signal
        } else {
            &self.agent
        }
    }

    /// Whether the cut of `epoch` is made (epoch 0, no request, always is).
    pub fn covers(&self, epoch: u64) -> bool {
        epoch <= self.of(epoch).load(Ordering::Acquire)
    }

    /// The cut of `epoch` is made: requests of its kind up to it are settled.
    pub fn record(&self, epoch: u64) {
        self.of(epoch).fetch_max(epoch, Ordering::AcqRel);
    }

    /// Forgets every cut.
    fn clear(&self) {
        self.agent.store(0, Ordering::Release);
        self.signal.store(0, Ordering::Release);
    }
}

impl Clone for Served {
    fn clone(&self) -> Served {
        Served {
            agent: AtomicU64::new(self.agent.load(Ordering::Acquire)),
            signal: AtomicU64::new(self.signal.load(Ordering::Acquire)),
        }
    }
}

/// The epoch a cut was requested for that `served` does not cover, 0 when none: the agent's
/// request, else one made by SIGUSR1; or the highest one this process asked for itself (a
/// peer is already cutting for it), if higher. A few atomic loads.
pub fn pending_epoch(served: &Served) -> u64 {
    let open = |e: u64| if served.covers(e) { 0 } else { e };
    let e = match open(REQUESTED.load(Ordering::Acquire)) {
        0 => open(signal_epoch()),
        e => e,
    };
    let local =
        open(LOCAL.agent.load(Ordering::Acquire)).max(open(LOCAL.signal.load(Ordering::Acquire)));
    e.max(local)
}

/// Asks for a cut of `epoch` from inside this process (an MPI layer whose rank learnt of a cut
/// from a peer before its own request arrived): [`pending_epoch`] reports it from now on,
/// and threads in [`wait_requested`] wake.
pub fn request_locally(epoch: u64) {
    LOCAL.record(epoch);
    wake_waiters();
}

/// The SIGUSR1 handler that was installed before ours (MPICH installs one), called after ours.
static PREVIOUS: AtomicU64 = AtomicU64::new(0);
static PREVIOUS_SIGINFO: AtomicBool = AtomicBool::new(false);

/// The fallback trigger, for jobs whose ranks cannot reach an agent: `mpirun`/`mpiexec`
/// forward SIGUSR1 to every rank. An odd signal requests a cut (epoch
/// `SIGNAL_EPOCH_BASE + k` for the k-th one, the same on every rank); the ranks agree, reach
/// it and wait there; the next signal releases them with nothing changed. A handler installed
/// earlier (MPICH has one, for process-failure notices) is chained: it still runs.
pub fn install_signal_trigger() -> Result<()> {
    extern "C" fn on_sigusr1(
        sig: libc::c_int,
        info: *mut libc::siginfo_t,
        context: *mut libc::c_void,
    ) {
        // Async-signal-safe: atomics, a futex wake, and a call to the chained handler.
        SIGNALS.fetch_add(1, Ordering::AcqRel);
        wake_waiters();
        let previous = PREVIOUS.load(Ordering::Acquire) as usize;
        if previous == libc::SIG_DFL || previous == libc::SIG_IGN {
            return;
        }
        if PREVIOUS_SIGINFO.load(Ordering::Acquire) {
            // SAFETY: the address sigaction(2) reported for an SA_SIGINFO handler.
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                unsafe { std::mem::transmute(previous) };
            f(sig, info, context);
        } else {
            // SAFETY: the address sigaction(2) reported for a plain handler.
            let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(previous) };
            f(sig);
        }
    }
    verbs::device_dir(); // its environment is read at init, not at a cut
    static INSTALLED: AtomicBool = AtomicBool::new(false);
    if INSTALLED.swap(true, Ordering::AcqRel) {
        return Ok(());
    }
    // SAFETY: zeroed sigaction structs are valid arguments; sigaction(2) only reads and writes
    // the structs we pass.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGUSR1, std::ptr::null(), &mut old) != 0 {
            return Err(Error::State("sigaction(SIGUSR1) query failed".into()));
        }
        PREVIOUS.store(old.sa_sigaction as u64, Ordering::Release);
        PREVIOUS_SIGINFO.store(old.sa_flags & libc::SA_SIGINFO != 0, Ordering::Release);
        let mut new: libc::sigaction = std::mem::zeroed();
        new.sa_sigaction = on_sigusr1
            as extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void)
            as usize;
        new.sa_flags = libc::SA_RESTART | libc::SA_SIGINFO;
        libc::sigemptyset(&mut new.sa_mask);
        if libc::sigaction(libc::SIGUSR1, &new, std::ptr::null_mut()) != 0 {
            return Err(Error::State("sigaction(SIGUSR1) install failed".into()));
        }
    }
    TRIGGER_READY.store(true, Ordering::Release);
    Ok(())
}

/// Whether SIGUSR1 cuts this process ([`install_signal_trigger`] succeeded).
static TRIGGER_READY: AtomicBool = AtomicBool::new(false);

/// Whether SIGUSR1 cuts this process: what a rank without an agent can still be cut by.
pub fn signal_trigger_ready() -> bool {
    TRIGGER_READY.load(Ordering::Acquire)
}

fn signal_epoch() -> u64 {
    let n = SIGNALS.load(Ordering::Acquire);
    if n % 2 == 1 {
        SIGNAL_EPOCH_BASE + n.div_ceil(2)
    } else {
        0
    }
}

/// Whether `epoch` was requested by SIGUSR1.
pub fn is_signal_epoch(epoch: u64) -> bool {
    epoch > SIGNAL_EPOCH_BASE
}

/// At a signal-requested cut: waits (at most `timeout`) for the SIGUSR1 that releases it. With
/// no agent to refuse the cut to, a rank whose MPI uses RDMA verbs says so on stderr.
pub fn wait_signal_release(epoch: u64, timeout: Duration) -> Result<Outcome> {
    if let Some(why) = verbs::refusal() {
        eprintln!("symvirt: epoch {epoch}: this rank cannot be migrated: {why}");
    }
    let deadline = Instant::now() + timeout;
    let released_at = 2 * (epoch - SIGNAL_EPOCH_BASE);
    while SIGNALS.load(Ordering::Acquire) < released_at {
        if Instant::now() >= deadline {
            return Err(Error::Timeout("the SIGUSR1 that releases the cut".into()));
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(Outcome::Aborted { epoch })
}

/// How an epoch ended for this rank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Migrated; continue over `interconnect` (then call [`Control::resumed`]).
    Resumed {
        /// The epoch.
        epoch: u64,
        /// The interconnect the guest has now.
        interconnect: Interconnect,
    },
    /// The epoch was cancelled, or it was a SIGUSR1 cut that was released: the old
    /// interconnect is still in place.
    Aborted {
        /// The epoch.
        epoch: u64,
    },
}

/// What the watcher learnt from the agent.
#[derive(Debug, Default)]
struct State {
    /// The last `prepare` epoch received.
    prepared: u64,
    /// The newest epoch the agent prepared or aborted, and when a cut for it that cannot
    /// finish is given up (this rank's clock): see [`Control::give_up_in`].
    give_up: Option<(u64, Instant)>,
    /// The outcome of the last settled epoch.
    settled: Option<Outcome>,
    /// The last resume (kept apart: an abort of a newer epoch, refused at once, must not hide
    /// it from a rank that has not woken to it yet).
    resumed: Option<Outcome>,
    /// The epoch this rank last reported unable for ([`Control::tell_unable`]).
    told_unable: u64,
    /// Why the agent connection ended, once it has.
    lost: Option<String>,
}

impl State {
    /// How `epoch` ended, if it has: its own outcome, or an abort once the agent has gone on to
    /// a newer epoch (it keeps one epoch at a time, so a report for `epoch` would be ignored,
    /// and a rank waiting for an answer would wait out its timeout).
    fn outcome_of(&self, epoch: u64) -> Option<Outcome> {
        if let Some(o @ Outcome::Resumed { epoch: e, .. }) = &self.resumed {
            if *e == epoch {
                return Some(o.clone());
            }
        }
        let (settled, e) = match &self.settled {
            Some(o @ (Outcome::Resumed { epoch: e, .. } | Outcome::Aborted { epoch: e })) => {
                (Some(o), *e)
            }
            None => (None, 0),
        };
        if e == epoch {
            settled.cloned()
        } else if self.prepared.max(e) > epoch {
            Some(Outcome::Aborted { epoch })
        } else {
            None
        }
    }
}

/// What this rank had sent and received at a cut, sent to the agent with its `quiesced`.
#[derive(Debug, Clone)]
struct Counts {
    epoch: u64,
    sent: Vec<u64>,
    received: Vec<u64>,
    drained: u64,
}

struct Shared {
    client: Mutex<RankClient>,
    state: Mutex<State>,
    /// The counts of the cut this rank is at, for its report ([`Control::set_counts`]).
    counts: Mutex<Option<Counts>>,
    changed: Condvar,
    stop: AtomicBool,
}

impl Shared {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn client(&self) -> MutexGuard<'_, RankClient> {
        self.client.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A rank's open control plane. Dropping it closes the agent connection (the agent then
/// fails an epoch in progress: a rank that leaves cannot be part of a cut).
pub struct Control {
    shared: Arc<Shared>,
    watcher: Option<JoinHandle<()>>,
    rank: u32,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").field("rank", &self.rank).finish()
    }
}

/// The socket to use: `path`, else `$SYMVIRT_AGENT_SOCKET`, else the agent's default.
pub fn socket_path(path: Option<&Path>) -> PathBuf {
    match path {
        Some(p) => p.to_path_buf(),
        None => std::env::var_os(SOCKET_ENV)
            .map(PathBuf::from)
            .unwrap_or_else(|| symvirt_proto::rank::DEFAULT_RANK_SOCKET.into()),
    }
}

impl Control {
    /// Registers `rank` with the agent at `path` (see [`socket_path`]) and starts watching.
    pub fn connect(path: &Path, rank: u32, timeout: Duration) -> Result<Control> {
        if OPEN.swap(true, Ordering::AcqRel) {
            return Err(Error::State("already open in this process".into()));
        }
        verbs::device_dir(); // its environment is read at init, not at a cut
        // A new control plane: no request from before it, agent or not.
        REQUESTED.store(0, Ordering::Release);
        LOCAL.clear();
        let client = match RankClient::connect(path, rank, timeout) {
            Ok(c) => c,
            Err(source) => {
                OPEN.store(false, Ordering::Release);
                return Err(Error::Agent {
                    what: format!("register rank {rank} at {}", path.display()),
                    source,
                });
            }
        };
        let shared = Arc::new(Shared {
            client: Mutex::new(client),
            state: Mutex::new(State::default()),
            counts: Mutex::new(None),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let watcher = std::thread::Builder::new()
            .name("symvirt-watch".into())
            .spawn(move || watch(&s))
            .map_err(|e| {
                OPEN.store(false, Ordering::Release);
                Error::State(format!("spawn watcher thread: {e}"))
            })?;
        Ok(Control {
            shared,
            watcher: Some(watcher),
            rank,
        })
    }

    /// This rank.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// Why the agent connection ended, if it has.
    pub fn lost(&self) -> Option<String> {
        self.shared.state().lost.clone()
    }

    /// Reports this rank quiesced for `epoch` and waits (at most `timeout`) for its outcome.
    ///
    /// The ranks agree on `epoch` among themselves, so this rank's own `prepare` may still be
    /// on its way: it is awaited first (a `quiesced` for an epoch the agent has not started
    /// would be ignored).
    ///
    /// A rank whose MPI uses RDMA verbs (a verbs device open, see [`crate::verbs`]) cannot be
    /// migrated: it reports `unable` with that reason instead (the agent fails the epoch, so
    /// the outcome is an abort). Explicit safe points and the transparent layer both report
    /// quiesced through here.
    pub fn quiesce(&self, epoch: u64, timeout: Duration) -> Result<Outcome> {
        if let Some(why) = verbs::refusal() {
            log::warn!(
                "symvirt: epoch {epoch}: rank {} refuses the cut: {why}",
                self.rank
            );
            return self.unable(epoch, &why, timeout);
        }
        let counts = self
            .shared
            .counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .filter(|c| c.epoch == epoch);
        self.report_and_wait(epoch, timeout, "quiesced", |c| {
            if let Some(k) = &counts {
                c.counts(epoch, &k.sent, &k.received, k.drained)?;
            }
            c.quiesced(epoch)
        })
    }

    /// Records what this rank had sent to (`sent[p]`) and received from (`received[p]`) every
    /// rank `p` at the cut of `epoch`, and how many messages it drained to get there: the next
    /// [`Control::quiesce`] for `epoch` sends them to the agent, for the host's cut report.
    pub fn set_counts(&self, epoch: u64, sent: &[u64], received: &[u64], drained: u64) {
        *self.shared.counts.lock().unwrap_or_else(|p| p.into_inner()) = Some(Counts {
            epoch,
            sent: sent.to_vec(),
            received: received.to_vec(),
            drained,
        });
    }

    /// Reports that this rank cannot reach a quiescent point for `epoch`, and why, then waits
    /// (at most `timeout`) for the outcome: the agent fails the epoch, so an abort.
    pub fn unable(&self, epoch: u64, reason: &str, timeout: Duration) -> Result<Outcome> {
        self.report_and_wait(epoch, timeout, "unable", |c| c.unable(epoch, reason))
    }

    /// Reports that this rank cannot reach a quiescent point for `epoch`, without waiting: only
    /// if the agent has prepared `epoch` and not ended it yet (else the report would be
    /// ignored), once. A later [`Control::unable`] for `epoch` then only waits for the outcome.
    /// Returns whether it was sent.
    pub fn tell_unable(&self, epoch: u64, reason: &str) -> Result<bool> {
        let mut state = self.shared.state();
        if state.prepared != epoch
            || state.outcome_of(epoch).is_some()
            || state.told_unable == epoch
        {
            return Ok(false);
        }
        state.told_unable = epoch;
        drop(state);
        self.shared
            .client()
            .unable(epoch, reason)
            .map_err(|source| Error::Agent {
                what: format!("report unable for epoch {epoch}"),
                source,
            })?;
        Ok(true)
    }

    /// Waits for this rank's `prepare` for `epoch`, reports with `send`, waits for the outcome.
    fn report_and_wait(
        &self,
        epoch: u64,
        timeout: Duration,
        what: &str,
        send: impl FnOnce(&mut RankClient) -> symvirt_proto::Result<()>,
    ) -> Result<Outcome> {
        let deadline = Instant::now() + timeout;
        let state = self.wait_until(deadline, "prepare", |s| {
            s.prepared >= epoch || s.outcome_of(epoch).is_some()
        })?;
        if let Some(o) = state.outcome_of(epoch) {
            return Ok(o); // aborted before this rank got here
        }
        let told = what == "unable" && state.told_unable == epoch;
        drop(state);
        if !told {
            send(&mut self.shared.client()).map_err(|source| Error::Agent {
                what: format!("report {what} for epoch {epoch}"),
                source,
            })?;
        }
        let state = self.wait_until(deadline, "resume or abort", |s| {
            s.outcome_of(epoch).is_some()
        })?;
        Ok(state.outcome_of(epoch).expect("checked by wait_until"))
    }

    /// How long a cut for `epoch` that cannot finish may still wait before this rank gives it
    /// up, by the newest epoch the agent prepared or aborted, if that is `epoch` or newer
    /// (`None`: neither yet). Three quarters of the time its `prepare` allowed, so that the
    /// rank's reason reaches the host before the agent's deadline; [`ABORT_GRACE`] after its
    /// `abort` (prepared here or not). A newer `prepare` (a new host, which gave `epoch` up, and
    /// whose epoch the cut may go on to serve) brings its own time.
    pub fn give_up_in(&self, epoch: u64) -> Option<Duration> {
        match self.shared.state().give_up {
            Some((e, t)) if e >= epoch => Some(t.saturating_duration_since(Instant::now())),
            _ => None,
        }
    }

    /// Reports that this rank continues after `resume` for `epoch`.
    pub fn resumed(&self, epoch: u64) -> Result<()> {
        self.shared
            .client()
            .resumed(epoch)
            .map_err(|source| Error::Agent {
                what: format!("report resumed for epoch {epoch}"),
                source,
            })
    }

    fn wait_until(
        &self,
        deadline: Instant,
        what: &str,
        done: impl Fn(&State) -> bool,
    ) -> Result<MutexGuard<'_, State>> {
        let mut state = self.shared.state();
        loop {
            if done(&state) {
                return Ok(state);
            }
            if let Some(why) = &state.lost {
                return Err(Error::AgentLost(why.clone()));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(what.into()));
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let fd = self.shared.client().as_raw_fd();
        // SAFETY: shutdown(2) on the fd of the RankClient `shared` owns, alive until `self`
        // goes; it changes no memory, and wakes the watcher blocked in poll on that fd.
        unsafe {
            libc::shutdown(fd, libc::SHUT_RD);
        }
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        // The last reference to `shared` goes with `self`: dropping the RankClient closes the
        // socket, which tells the agent this rank is gone.
        REQUESTED.store(0, Ordering::Release);
        OPEN.store(false, Ordering::Release);
    }
}

/// Blocks until `fd` is readable (or hung up), at most [`WATCH_TIMEOUT_MS`].
fn wait_readable(fd: RawFd) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `pfd` is one valid pollfd that lives across the call; the count passed is 1.
    unsafe {
        libc::poll(&mut pfd, 1, WATCH_TIMEOUT_MS);
    }
}

/// The watcher: waits for the agent (blocked in `poll`, not the client's lock, which the rank
/// needs to report), publishes requests and outcomes.
fn watch(shared: &Shared) {
    let fd = shared.client().as_raw_fd();
    while !shared.stop.load(Ordering::Acquire) {
        let event = shared.client().try_event();
        match event {
            // Everything buffered was taken: nothing more until the socket is readable.
            Ok(None) => wait_readable(fd),
            Ok(Some(event)) => {
                let mut state = shared.state();
                match event {
                    RankEvent::Prepare { epoch, deadline } => {
                        if state.give_up.is_none_or(|(e, _)| epoch > e) {
                            let now = Instant::now();
                            let allowed = deadline.saturating_duration_since(now);
                            state.give_up = Some((epoch, now + allowed / 4 * 3));
                        }
                        state.prepared = state.prepared.max(epoch);
                        REQUESTED.store(epoch, Ordering::Release);
                        wake_waiters();
                    }
                    RankEvent::Resume {
                        epoch,
                        interconnect,
                    } => {
                        let resumed = Outcome::Resumed {
                            epoch,
                            interconnect,
                        };
                        state.resumed = Some(resumed.clone());
                        state.settled = Some(resumed);
                        let _ = REQUESTED.compare_exchange(
                            epoch,
                            0,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        );
                    }
                    RankEvent::Abort { epoch } => {
                        state.settled = Some(Outcome::Aborted { epoch });
                        let soon = Instant::now() + ABORT_GRACE;
                        state.give_up = match state.give_up {
                            Some((e, t)) if e == epoch => Some((e, t.min(soon))),
                            Some((e, t)) if e > epoch => Some((e, t)),
                            _ => Some((epoch, soon)),
                        };
                        let _ = REQUESTED.compare_exchange(
                            epoch,
                            0,
                            Ordering::AcqRel,
                            Ordering::Acquire,
                        );
                    }
                }
                shared.changed.notify_all();
            }
            Err(_) if shared.stop.load(Ordering::Acquire) => return,
            Err(e) => {
                log::warn!("symvirt: agent connection lost: {e}");
                shared.state().lost = Some(e.to_string());
                REQUESTED.store(0, Ordering::Release);
                shared.changed.notify_all();
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::os::unix::net::UnixListener;

    /// The tests share the process-wide request state.
    static SERIAL: Mutex<()> = Mutex::new(());

    /// A thread waiting for a request sleeps until one its cuts do not cover comes (here asked
    /// locally, as a rank that learnt of a cut from a peer does), returns 0 when woken without
    /// one or when its time is up, and never returns an epoch it has already served.
    #[test]
    fn waiting_for_a_request_wakes_on_a_local_one() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        LOCAL.clear();
        let served = Served::new();
        let started = Instant::now();
        assert_eq!(wait_requested(&served, 0, Duration::from_millis(50)), 0);
        assert!(started.elapsed() >= Duration::from_millis(50));
        let before = served.clone();
        let waiter =
            std::thread::spawn(move || wait_requested(&before, 0, Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(50));
        request_locally(7);
        assert_eq!(waiter.join().unwrap(), 7);
        // Skipped, or served: a wait sleeps again, and a bare wake returns 0 at once.
        assert_eq!(wait_requested(&served, 7, Duration::from_millis(20)), 0);
        served.record(7);
        let after = served.clone();
        let waiter = std::thread::spawn(move || wait_requested(&after, 0, Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(50));
        let woken = Instant::now();
        wake_waiters();
        assert_eq!(waiter.join().unwrap(), 0);
        assert!(woken.elapsed() < Duration::from_secs(10));
        LOCAL.clear();
    }

    /// The agent's epochs count from 1 and SIGUSR1's from 2^48: a signal cut, served and
    /// still remembered as a peer's, does not hide the agent's next, smaller epoch; and a cut
    /// of one kind does not cover the other's.
    #[test]
    fn a_signal_cut_does_not_hide_the_agents_next_request() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        LOCAL.clear();
        let served = Served::new();
        let signalled = SIGNAL_EPOCH_BASE + 1;
        request_locally(signalled);
        assert_eq!(pending_epoch(&served), signalled);
        served.record(signalled);
        assert_eq!(pending_epoch(&served), 0);
        assert!(served.covers(signalled) && !served.covers(2));
        request_locally(2);
        assert_eq!(pending_epoch(&served), 2);
        served.record(2);
        assert_eq!(pending_epoch(&served), 0);
        assert!(!served.covers(SIGNAL_EPOCH_BASE + 2) && !served.covers(3));
        LOCAL.clear();
    }

    /// A fresh directory for a fake agent, the path of its rank socket, and the socket bound.
    fn agent_socket(tag: &str) -> (PathBuf, PathBuf, UnixListener) {
        let dir = std::env::temp_dir().join(format!("symvirt-mpi-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        (dir, path, listener)
    }

    /// A fake agent on a real unix socket: registers the rank, asks for epoch 3, then sends a
    /// resume for epoch 2 (wrong) before the one for epoch 3.
    #[test]
    fn resume_for_another_epoch_is_ignored() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let (dir, path, listener) = agent_socket("ctl");
        let agent = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut lines = BufReader::new(s.try_clone().unwrap()).lines();
            assert_eq!(
                lines.next().unwrap().unwrap(),
                r#"{"type":"register","rank":5}"#
            );
            s.write_all(b"{\"type\":\"registered\",\"rank\":5,\"expected\":1}\n")
                .unwrap();
            s.write_all(b"{\"type\":\"prepare\",\"epoch\":3,\"deadline_ms\":60000}\n")
                .unwrap();
            assert_eq!(
                lines.next().unwrap().unwrap(),
                r#"{"type":"quiesced","epoch":3}"#
            );
            let ic = r#"{"kind":"infiniband","hca":"mlx5_0","port":1}"#;
            s.write_all(
                format!("{{\"type\":\"resume\",\"epoch\":2,\"interconnect\":{ic}}}\n").as_bytes(),
            )
            .unwrap();
            let ic = r#"{"kind":"ethernet","mac":"52:54:00:00:00:03","iface":"eth3"}"#;
            s.write_all(
                format!("{{\"type\":\"resume\",\"epoch\":3,\"interconnect\":{ic}}}\n").as_bytes(),
            )
            .unwrap();
            assert_eq!(
                lines.next().unwrap().unwrap(),
                r#"{"type":"resumed","epoch":3}"#
            );
        });
        let control = Control::connect(&path, 5, Duration::from_secs(30)).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while pending_epoch(&Served::new()) != 3 {
            assert!(Instant::now() < deadline, "prepare never published");
            std::thread::sleep(Duration::from_millis(1));
        }
        let outcome = control.quiesce(3, Duration::from_secs(30)).unwrap();
        assert_eq!(
            outcome,
            Outcome::Resumed {
                epoch: 3,
                interconnect: Interconnect::Ethernet {
                    mac: "52:54:00:00:00:03".into(),
                    iface: Some("eth3".into()),
                    pci: None,
                },
            }
        );
        control.resumed(3).unwrap();
        agent.join().unwrap();
        assert_eq!(pending_epoch(&Served::new()), 0);
        // The fake agent hung up: the control plane notices, and a cut now fails clearly.
        let err = control.quiesce(4, Duration::from_secs(30)).unwrap_err();
        assert!(matches!(err, Error::AgentLost(_)), "{err}");
        drop(control);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A cut that cannot finish is given up by [`Control::give_up_in`], read without waiting:
    /// nothing before the `prepare`, then three quarters of the time the agent gives; a
    /// `prepare` for an older epoch changes nothing, the `abort` shortens it to
    /// [`ABORT_GRACE`], a newer `prepare` replaces it.
    #[test]
    fn give_up_follows_the_latest_prepare_and_abort() {
        let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
        let (dir, path, listener) = agent_socket("giveup");
        let (go_tx, go_rx) = std::sync::mpsc::channel::<&'static [u8]>();
        let agent = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut lines = BufReader::new(s.try_clone().unwrap()).lines();
            lines.next().unwrap().unwrap(); // register
            s.write_all(b"{\"type\":\"registered\",\"rank\":2,\"expected\":1}\n")
                .unwrap();
            while let Ok(line) = go_rx.recv() {
                s.write_all(line).unwrap();
            }
            // What the rank reported after its registration, until it hung up.
            lines.map(|l| l.unwrap()).collect::<Vec<String>>()
        });
        let control = Control::connect(&path, 2, Duration::from_secs(30)).unwrap();
        let wait_for = |what: &str, done: &dyn Fn() -> bool| {
            let until = Instant::now() + Duration::from_secs(30);
            while !done() {
                assert!(Instant::now() < until, "{what} never seen");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        let within = |left: Option<Duration>, lo: u64, hi: u64| {
            let left = left.expect("a time");
            assert!(
                left > Duration::from_millis(lo) && left <= Duration::from_millis(hi),
                "{left:?}"
            );
        };
        assert_eq!(control.give_up_in(4), None);
        go_tx
            .send(b"{\"type\":\"prepare\",\"epoch\":4,\"deadline_ms\":60000}\n")
            .unwrap();
        wait_for("prepare", &|| control.give_up_in(4).is_some());
        within(control.give_up_in(4), 40_000, 45_000);
        assert_eq!(control.give_up_in(5), None, "not prepared yet");
        go_tx
            .send(b"{\"type\":\"prepare\",\"epoch\":3,\"deadline_ms\":1}\n")
            .unwrap();
        wait_for("prepare 3", &|| pending_epoch(&Served::new()) == 3);
        within(control.give_up_in(4), 40_000, 45_000);
        go_tx.send(b"{\"type\":\"abort\",\"epoch\":4}\n").unwrap();
        wait_for(
            "abort",
            &|| matches!(control.give_up_in(4), Some(d) if d <= ABORT_GRACE),
        );
        go_tx
            .send(b"{\"type\":\"prepare\",\"epoch\":6,\"deadline_ms\":8000}\n")
            .unwrap();
        wait_for("prepare 6", &|| control.give_up_in(6).is_some());
        within(control.give_up_in(4), 4000, 6000);
        within(control.give_up_in(6), 4000, 6000);
        // An epoch the agent has gone past is over, aborted (4) or never prepared here (5): a
        // report for it would be ignored, so none is sent and the answer is an abort, at once.
        let started = Instant::now();
        for epoch in [4, 5] {
            let over = control
                .unable(epoch, "late", Duration::from_secs(30))
                .unwrap();
            assert_eq!(over, Outcome::Aborted { epoch });
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        // Told without waiting, once; the wait that follows sends nothing more.
        assert!(
            !control.tell_unable(5, "stuck").unwrap(),
            "not the prepared epoch"
        );
        assert!(control.tell_unable(6, "stuck").unwrap());
        assert!(!control.tell_unable(6, "stuck").unwrap());
        go_tx.send(b"{\"type\":\"abort\",\"epoch\":6}\n").unwrap();
        let aborted = control.unable(6, "stuck", Duration::from_secs(30)).unwrap();
        assert_eq!(aborted, Outcome::Aborted { epoch: 6 });
        // An abort of an epoch never prepared here (the agent refused it) gives up a cut for it
        // half a second later, and does not hide the resume of the one before.
        go_tx
            .send(b"{\"type\":\"prepare\",\"epoch\":9,\"deadline_ms\":8000}\n")
            .unwrap();
        let ic = r#"{"kind":"ethernet","mac":"52:54:00:00:00:09","iface":"eth9"}"#;
        let resume = format!("{{\"type\":\"resume\",\"epoch\":9,\"interconnect\":{ic}}}\n");
        go_tx
            .send(Box::leak(resume.into_bytes().into_boxed_slice()))
            .unwrap();
        go_tx.send(b"{\"type\":\"abort\",\"epoch\":10}\n").unwrap();
        wait_for("abort 10", &|| control.give_up_in(10).is_some());
        assert!(control.give_up_in(10) <= Some(ABORT_GRACE));
        let resumed = control.quiesce(9, Duration::from_secs(30)).unwrap();
        assert!(
            matches!(resumed, Outcome::Resumed { epoch: 9, .. }),
            "{resumed:?}"
        );
        drop(go_tx);
        drop(control); // hangs up: the fake agent's last read ends
        let reported = agent.join().unwrap();
        assert_eq!(
            reported,
            [r#"{"type":"unable","epoch":6,"reason":"stuck"}"#],
            "one report, the one told"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
