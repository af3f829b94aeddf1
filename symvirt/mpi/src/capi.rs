//! The C ABI of the MPI-independent core (declared in `include/symvirt_core.h`), used by the
//! per-implementation C glue (`csrc/`): the control plane (`symvirt_ctl_*`) and the safe-point
//! state machine (`symvirt_sp_*`) driven through a table of MPI operations.
//!
//! Every function returns a status code (`SYMVIRT_*`, negative on error) and never unwinds;
//! [`symvirt_last_error`] describes the last error of the calling thread.

use crate::control::{self, Control, Outcome, Served};
use crate::error::{Error, Result};
use crate::safepoint::{Agreement, SafePoint, SafePointResult};
use std::cell::RefCell;
use std::ffi::{CStr, CString, c_char, c_int, c_void};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;
use symvirt_proto::protocol::Interconnect;

/// Nothing happened.
pub const SYMVIRT_CONTINUE: c_int = 0;
/// A cut was made, the job migrated and was released; the interconnect was filled in.
pub const SYMVIRT_RESUMED: c_int = 1;
/// A cut was made but the migration was cancelled.
pub const SYMVIRT_ABORTED: c_int = 2;
/// Used out of order (not initialised, initialised twice, null pointer).
pub const SYMVIRT_ERR_STATE: c_int = -1;
/// The agent could not be reached, refused the rank, or its connection was lost.
pub const SYMVIRT_ERR_AGENT: c_int = -2;
/// The agent did not answer in time.
pub const SYMVIRT_ERR_TIMEOUT: c_int = -3;
/// An MPI call failed.
pub const SYMVIRT_ERR_MPI: c_int = -4;

/// `symvirt_interconnect.kind`: no change / unknown.
pub const SYMVIRT_IC_NONE: c_int = 0;
/// `symvirt_interconnect.kind`: an InfiniBand HCA.
pub const SYMVIRT_IC_INFINIBAND: c_int = 1;
/// `symvirt_interconnect.kind`: an Ethernet NIC.
pub const SYMVIRT_IC_ETHERNET: c_int = 2;

/// The interconnect after a migration, as C sees it (`symvirt_interconnect`).
#[repr(C)]
#[derive(Debug)]
pub struct CInterconnect {
    /// The epoch of the migration.
    pub epoch: u64,
    /// `SYMVIRT_IC_*`.
    pub kind: c_int,
    /// InfiniBand port (1-based), else 0.
    pub port: c_int,
    /// HCA name (InfiniBand) or interface name (Ethernet, "" when unknown).
    pub device: [c_char; 72],
    /// MAC address (Ethernet), else "".
    pub mac: [c_char; 24],
    /// PCI address in the guest, "" when unknown.
    pub pci: [c_char; 24],
    /// The whole description as JSON.
    pub json: [c_char; 1024],
}

fn copy_str(dst: &mut [c_char], s: &str) {
    let n = s.len().min(dst.len() - 1);
    for (d, b) in dst.iter_mut().zip(&s.as_bytes()[..n]) {
        *d = *b as c_char;
    }
    dst[n] = 0;
}

impl CInterconnect {
    fn fill(&mut self, epoch: u64, ic: &Interconnect) {
        self.epoch = epoch;
        self.port = 0;
        copy_str(&mut self.device, "");
        copy_str(&mut self.mac, "");
        copy_str(&mut self.pci, "");
        match ic {
            Interconnect::Infiniband { hca, port, pci } => {
                self.kind = SYMVIRT_IC_INFINIBAND;
                self.port = c_int::from(*port);
                copy_str(&mut self.device, hca);
                copy_str(&mut self.pci, pci.as_deref().unwrap_or(""));
            }
            Interconnect::Ethernet { mac, iface, pci } => {
                self.kind = SYMVIRT_IC_ETHERNET;
                copy_str(&mut self.device, iface.as_deref().unwrap_or(""));
                copy_str(&mut self.mac, mac);
                copy_str(&mut self.pci, pci.as_deref().unwrap_or(""));
            }
        }
        let json = serde_json::to_string(ic).unwrap_or_default();
        copy_str(&mut self.json, &json);
    }

    fn clear(&mut self, epoch: u64) {
        self.epoch = epoch;
        self.kind = SYMVIRT_IC_NONE;
        self.port = 0;
        copy_str(&mut self.device, "");
        copy_str(&mut self.mac, "");
        copy_str(&mut self.pci, "");
        copy_str(&mut self.json, "");
    }
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn fail(e: &Error) -> c_int {
    let text = CString::new(e.to_string().replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|l| *l.borrow_mut() = text);
    match e {
        Error::Agent { .. } | Error::AgentLost(_) => SYMVIRT_ERR_AGENT,
        Error::Timeout(_) => SYMVIRT_ERR_TIMEOUT,
        Error::Mpi { .. } => SYMVIRT_ERR_MPI,
        Error::State(_) | Error::Build { .. } | Error::CutLog { .. } => SYMVIRT_ERR_STATE,
    }
}

/// The last error of the calling thread, as a C string valid until its next failing call.
#[unsafe(no_mangle)]
pub extern "C" fn symvirt_last_error() -> *const c_char {
    LAST_ERROR.with(|l| l.borrow().as_ptr())
}

/// The process's control plane, for the C glue (the safe point takes it over when created).
static CONTROL: Mutex<Option<Control>> = Mutex::new(None);

fn control_slot() -> std::sync::MutexGuard<'static, Option<Control>> {
    CONTROL.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads an optional C string.
///
/// # Safety
/// `s` is null or a NUL-terminated string.
unsafe fn opt_str<'a>(s: *const c_char) -> Option<&'a str> {
    if s.is_null() {
        return None;
    }
    // SAFETY: the caller guarantees a NUL-terminated string.
    unsafe { CStr::from_ptr(s) }.to_str().ok()
}

/// Registers `rank` with the guest agent at `socket` (NULL: `$SYMVIRT_AGENT_SOCKET`, else the
/// agent's default path), waiting at most `timeout_ms`.
///
/// # Safety
/// `socket` is null or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn symvirt_ctl_open(
    rank: u32,
    socket: *const c_char,
    timeout_ms: u64,
) -> c_int {
    // The fallback trigger works with or without an agent.
    if let Err(e) = control::install_signal_trigger() {
        log::warn!("symvirt: no SIGUSR1 trigger: {e}");
    }
    // SAFETY: forwarded caller guarantee.
    let path = control::socket_path(unsafe { opt_str(socket) }.map(Path::new));
    let mut slot = control_slot();
    if slot.is_some() {
        return fail(&Error::State("symvirt control plane opened twice".into()));
    }
    match Control::connect(&path, rank, Duration::from_millis(timeout_ms)) {
        Ok(c) => {
            *slot = Some(c);
            SYMVIRT_CONTINUE
        }
        Err(e) => fail(&e),
    }
}

/// Milliseconds from the environment variable `name` (decimal digits), else `fallback`: the
/// C glue's timeouts (`SYMVIRT_CONNECT_TIMEOUT_MS`, `SYMVIRT_QUIESCE_TIMEOUT_MS`).
///
/// # Safety
/// `name` is null or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn symvirt_env_ms(name: *const c_char, fallback: u64) -> u64 {
    // SAFETY: forwarded caller guarantee.
    unsafe { opt_str(name) }
        .and_then(|n| std::env::var(n).ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(fallback)
}

/// 1 when SIGUSR1 (through the launcher) cuts this process, else 0: what a rank without an
/// agent can still be cut by. Set by [`symvirt_ctl_open`], agent or not.
#[unsafe(no_mangle)]
pub extern "C" fn symvirt_ctl_signal_cuts() -> c_int {
    c_int::from(control::signal_trigger_ready())
}

/// What a null `symvirt_served` pointer stands for: no cut made.
static NO_CUT: Served = Served::new();

/// The epoch a cut is requested for that `served` does not cover (see
/// [`control::pending_epoch`]), 0 when none. A null `served` counts as no cut made.
///
/// # Safety
/// `served` is null or points to a live `symvirt_served`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn symvirt_ctl_pending(served: *const Served) -> u64 {
    // SAFETY: the caller guarantees `served` is null or live.
    control::pending_epoch(unsafe { served.as_ref() }.unwrap_or(&NO_CUT))
}

/// Blocks until a cut `served` does not cover is requested, other than `skip` (returns its
/// epoch), at most `timeout_ms`, or until [`symvirt_ctl_wake`] (then 0). Sleeps on a futex:
/// no polling. `served` is read throughout: it may be a live record another thread updates.
///
/// # Safety
/// As [`symvirt_ctl_pending`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn symvirt_ctl_wait_requested(
    served: *const Served,
    skip: u64,
    timeout_ms: u64,
) -> u64 {
    // SAFETY: the caller guarantees `served` is null or live.
    let served = unsafe { served.as_ref() }.unwrap_or(&NO_CUT);
    control::wait_requested(served, skip, Duration::from_millis(timeout_ms))
}

/// Whether the cut of `epoch` is made according to `served` (1) or not (0).
///
/// # Safety
/// As [`symvirt_ctl_pending`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn symvirt_served_covers(served: *const Served, epoch: u64) -> c_int {
    // SAFETY: the caller guarantees `served` is null or live.
    c_int::from(unsafe { served.as_ref() }.is_some_and(|s| s.covers(epoch)) || epoch == 0)
}

/// Records in `served` that the cut of `epoch` is made (atomic: other threads may read it).
///
/// # Safety
/// As [`symvirt_ctl_pending`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn symvirt_served_record(served: *const Served, epoch: u64) {
    // SAFETY: the caller guarantees `served` is null or live.
    if let Some(s) = unsafe { served.as_ref() } {
        s.record(epoch);
    }
}

/// Asks for a cut of `epoch` from inside this process: [`symvirt_ctl_pending`] reports it
/// from now on, and threads in [`symvirt_ctl_wait_requested`] wake.
#[unsafe(no_mangle)]
pub extern "C" fn symvirt_ctl_request_locally(epoch: u64) {
    control::request_locally(epoch);
}

/// Wakes every thread in [`symvirt_ctl_wait_requested`] until `*ended` (read atomically) is not
/// 0: for stopping one of them (see [`control::wake_until`]).
///
/// # Safety
/// `ended` points to a live, aligned `int` that other threads change only atomically.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn symvirt_ctl_wake_until(ended: *const c_int) {
    // SAFETY: the caller guarantees a live, aligned int only changed atomically; AtomicI32 has
    // the layout of an int.
    let ended = unsafe { AtomicI32::from_ptr(ended.cast_mut()) };
    control::wake_until(|| ended.load(Ordering::Acquire) != 0);
}

/// Prints to stderr why this rank's cut threads may wait tens of milliseconds to run when ranks
/// share cores ([`crate::placement::warn`]: once per process); 1 if it printed, else 0. For one
/// rank to call once a cut thread has started.
#[unsafe(no_mangle)]
pub extern "C" fn symvirt_warn_placement() -> c_int {
    c_int::from(crate::placement::warn())
}

/// Wakes every thread in [`symvirt_ctl_wait_requested`].
#[unsafe(no_mangle)]
pub extern "C" fn symvirt_ctl_wake() {
    control::wake_waiters();
}

/// How an epoch ended, for C: fills `out` (if given) and returns `SYMVIRT_RESUMED` or
/// `SYMVIRT_ABORTED`.
fn deliver(out: Option<&mut CInterconnect>, outcome: Outcome) -> c_int {
    match outcome {
        Outcome::Resumed {
            epoch,
            interconnect,
        } => {
            if let Some(o) = out {
                o.fill(epoch, &interconnect);
            }
            SYMVIRT_RESUMED
        }
        Outcome::Aborted { epoch } => {
            if let Some(o) = out {
                o.clear(epoch);
            }
            SYMVIRT_ABORTED
        }
    }
}

/// A safe point's result, for C: the status code, `out` filled after a cut.
fn answer(out: Option<&mut CInterconnect>, result: SafePointResult) -> c_int {
    match result {
        SafePointResult::Continue => SYMVIRT_CONTINUE,
        SafePointResult::Resumed {
            epoch,
            interconnect,
        } => deliver(
            out,
            Outcome::Resumed {
                epoch,
                interconnect,
            },
        ),
        SafePointResult::Aborted { epoch } => deliver(out, Outcome::Aborted { epoch }),
    }
}

/// An epoch's outcome (or the error waiting for it), for C: see [`deliver`] and [`fail`].
///
/// # Safety
/// `out` is null or points to a writable `symvirt_interconnect`.
unsafe fn settle(out: *mut CInterconnect, outcome: Result<Outcome>) -> c_int {
    // SAFETY: the caller guarantees `out` is null or valid for writes.
    let out = unsafe { out.as_mut() };
    match outcome {
        Ok(outcome) => deliver(out, outcome),
        Err(e) => fail(&e),
    }
}

/// At the cut, before [`symvirt_ctl_quiesce`]: what this rank had sent to (`sent[p]`) and
/// received from (`received[p]`) each of the `np` ranks, and how many messages it drained to
/// get there; the agent keeps them for the host's cut report. Ignored for a SIGUSR1 cut.
///
/// # Safety
/// `sent` and `received` are null or point to `np` readable counts each.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn symvirt_ctl_counts(
    epoch: u64,
    np: c_int,
    sent: *const u64,
    received: *const u64,
    drained: u64,
) -> c_int {
    if control::is_signal_epoch(epoch) {
        return SYMVIRT_CONTINUE;
    }
    let n = match usize::try_from(np) {
        Ok(n) if n > 0 && !sent.is_null() && !received.is_null() => n,
        _ => return fail(&Error::State(format!("counts of {np} ranks"))),
    };
    // SAFETY: the caller guarantees `np` readable counts behind each non-null pointer.
    let (sent, received) = unsafe {
        (
            std::slice::from_raw_parts(sent, n),
            std::slice::from_raw_parts(received, n),
        )
    };
    match control_slot().as_ref() {
        Some(c) => {
            c.set_counts(epoch, sent, received, drained);
            SYMVIRT_CONTINUE
        }
        None => fail(&Error::State("no control plane open".into())),
    }
}

/// At the cut: reports quiesced for `epoch`, waits at most `timeout_ms` for resume or abort.
/// Returns `SYMVIRT_RESUMED` (with `out` filled) or `SYMVIRT_ABORTED`, or an error. A rank whose
/// MPI uses RDMA verbs reports unable instead (see [`Control::quiesce`]): an abort.
///
/// # Safety
/// `out` is null or points to a writable `symvirt_interconnect`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn symvirt_ctl_quiesce(
    epoch: u64,
    timeout_ms: u64,
    out: *mut CInterconnect,
) -> c_int {
    let slot = control_slot();
    let timeout = Duration::from_millis(timeout_ms);
    let outcome = match slot.as_ref() {
        _ if control::is_signal_epoch(epoch) => control::wait_signal_release(epoch, timeout),
        Some(c) => c.quiesce(epoch, timeout),
        None => return fail(&Error::State("no control plane open".into())),
    };
    // SAFETY: the caller guarantees `out` is null or valid for writes.
    unsafe { settle(out, outcome) }
}

/// A rank's reason for the host, from a C string (null: "no reason given").
///
/// # Safety
/// `reason` is null or a NUL-terminated string.
unsafe fn reason_text(reason: *const c_char) -> String {
    if reason.is_null() {
        return String::from("no reason given");
    }
    // SAFETY: the caller guarantees a NUL-terminated string.
    unsafe { CStr::from_ptr(reason) }
        .to_string_lossy()
        .into_owned()
}

/// At the cut, instead of [`symvirt_ctl_quiesce`]: reports that this rank cannot be migrated
/// for `epoch` (`reason`, a C string, goes to the host) and waits for the outcome, normally
/// `SYMVIRT_ABORTED`. For an epoch requested by SIGUSR1 (no agent) the reason goes to stderr
/// and the rank waits for the releasing signal like the others.
///
/// # Safety
/// `reason` is null or a NUL-terminated string; `out` is null or points to a writable
/// `symvirt_interconnect`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn symvirt_ctl_unable(
    epoch: u64,
    reason: *const c_char,
    timeout_ms: u64,
    out: *mut CInterconnect,
) -> c_int {
    // SAFETY: the caller guarantees a null or NUL-terminated string.
    let reason = unsafe { reason_text(reason) };
    let slot = control_slot();
    let timeout = Duration::from_millis(timeout_ms);
    let outcome = match slot.as_ref() {
        _ if control::is_signal_epoch(epoch) => {
            eprintln!("symvirt: epoch {epoch}: this rank cannot be migrated: {reason}");
            control::wait_signal_release(epoch, timeout)
        }
        Some(c) => c.unable(epoch, &reason, timeout),
        None => return fail(&Error::State("no control plane open".into())),
    };
    // SAFETY: the caller guarantees `out` is null or valid for writes.
    unsafe { settle(out, outcome) }
}

/// During a cut, without waiting: milliseconds until a cut for `epoch` that cannot finish is
/// given up, by the agent's latest `prepare` (see [`Control::give_up_in`]); `u64::MAX` when
/// there is none (not prepared here yet, an epoch requested by SIGUSR1, no agent).
#[unsafe(no_mangle)]
pub extern "C" fn symvirt_ctl_give_up_in_ms(epoch: u64) -> u64 {
    let left = match control_slot().as_ref() {
        Some(c) if !control::is_signal_epoch(epoch) => c.give_up_in(epoch),
        _ => None,
    };
    left.map_or(u64::MAX, |d| d.as_millis().min(u64::MAX as u128 - 1) as u64)
}

/// During a cut, without waiting: reports that this rank cannot be migrated for `epoch`
/// (`reason`, a C string, goes to the host) if the agent has prepared `epoch` and not ended it
/// (see [`Control::tell_unable`]); a later [`symvirt_ctl_unable`] then waits for the outcome
/// without reporting again. Returns 1 if sent, 0 if not (SIGUSR1's epochs, no agent), or an
/// error.
///
/// # Safety
/// `reason` is null or a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn symvirt_ctl_tell_unable(epoch: u64, reason: *const c_char) -> c_int {
    if control::is_signal_epoch(epoch) {
        return 0;
    }
    // SAFETY: the caller guarantees a null or NUL-terminated string.
    let reason = unsafe { reason_text(reason) };
    match control_slot()
        .as_ref()
        .map(|c| c.tell_unable(epoch, &reason))
    {
        Some(Ok(sent)) => c_int::from(sent),
        Some(Err(e)) => fail(&e),
        None => 0,
    }
}

/// After re-selecting the transport: reports this rank running again for `epoch`.
#[unsafe(no_mangle)]
pub extern "C" fn symvirt_ctl_resumed(epoch: u64) -> c_int {
    if control::is_signal_epoch(epoch) {
        return SYMVIRT_CONTINUE; // nobody to tell
    }
    let slot = control_slot();
    let Some(c) = slot.as_ref() else {
        return fail(&Error::State("no control plane open".into()));
    };
    match c.resumed(epoch) {
        Ok(()) => SYMVIRT_CONTINUE,
        Err(e) => fail(&e),
    }
}

/// Closes the control plane (the agent sees the rank leave). Harmless when none is open.
#[unsafe(no_mangle)]
pub extern "C" fn symvirt_ctl_close() {
    control_slot().take();
}

/// The MPI operations of a safe point, implemented by the C glue (`symvirt_agreement_ops`).
/// Each returns an MPI error code (0: success).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct AgreementOps {
    /// Start a MAX reduction of `value` in `slot`.
    pub start: unsafe extern "C" fn(ctx: *mut c_void, slot: c_int, value: u64) -> c_int,
    /// Complete `slot`, store the maximum in `*result`.
    pub finish: unsafe extern "C" fn(ctx: *mut c_void, slot: c_int, result: *mut u64) -> c_int,
    /// Barrier over the ranks.
    pub barrier: unsafe extern "C" fn(ctx: *mut c_void) -> c_int,
}

struct COps {
    ops: AgreementOps,
    ctx: *mut c_void,
}

fn mpi(call: &str, code: c_int) -> Result<()> {
    if code == 0 {
        Ok(())
    } else {
        Err(Error::Mpi {
            call: call.into(),
            code,
        })
    }
}

impl Agreement for COps {
    fn start(&mut self, slot: usize, value: u64) -> Result<()> {
        // SAFETY: the glue's function with the context it gave us (see symvirt_sp_new).
        mpi("Iallreduce", unsafe {
            (self.ops.start)(self.ctx, slot as c_int, value)
        })
    }
    fn finish(&mut self, slot: usize) -> Result<u64> {
        let mut r = 0u64;
        // SAFETY: as in start; `r` is a valid u64 for the call's duration.
        mpi("Wait", unsafe {
            (self.ops.finish)(self.ctx, slot as c_int, &mut r)
        })?;
        Ok(r)
    }
    fn barrier(&mut self) -> Result<()> {
        // SAFETY: as in start.
        mpi("Barrier", unsafe { (self.ops.barrier)(self.ctx) })
    }
}

/// A C callback and its context, carried into a hook closure.
struct Callback<F> {
    f: F,
    ctx: *mut c_void,
}
// SAFETY: the hooks run on the thread that calls symvirt_sp_poll or symvirt_sp_cut: the rank's
// main thread, or the glue's quiet-phase thread while the main thread computes, never both at
// once (the glue serialises them); the pointer is only handed back to the C callback.
unsafe impl<F> Send for Callback<F> {}

/// An explicit safe point (opaque to C).
pub struct CSafePoint {
    inner: SafePoint<COps>,
    /// The error of the last [`symvirt_sp_cut`], for [`symvirt_sp_raise`] on another thread.
    cut_error: Option<Error>,
}

/// Creates a safe point over `ops`/`ctx`, taking over the control plane opened with
/// [`symvirt_ctl_open`] (without one, it never stops but still takes part in the agreement).
///
/// # Safety
/// `ops` points to a valid table; its functions accept `ctx` until [`symvirt_sp_free`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn symvirt_sp_new(
    ops: *const AgreementOps,
    ctx: *mut c_void,
    quiesce_timeout_ms: u64,
) -> *mut CSafePoint {
    // SAFETY: the caller guarantees `ops` is null or valid.
    let Some(ops) = (unsafe { ops.as_ref() }) else {
        fail(&Error::State("null agreement table".into()));
        return std::ptr::null_mut();
    };
    let mut inner = SafePoint::new(COps { ops: *ops, ctx }, control_slot().take());
    inner.set_quiesce_timeout(Duration::from_millis(quiesce_timeout_ms));
    Box::into_raw(Box::new(CSafePoint {
        inner,
        cut_error: None,
    }))
}

/// Installs the hook run at the cut before `quiesced` is reported.
///
/// # Safety
/// `sp` comes from [`symvirt_sp_new`]; `f` accepts `ctx` for the safe point's lifetime.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn symvirt_sp_on_quiesce(
    sp: *mut CSafePoint,
    f: Option<unsafe extern "C" fn(epoch: u64, ctx: *mut c_void)>,
    ctx: *mut c_void,
) -> c_int {
    // SAFETY: the caller guarantees `sp` is null or live.
    let (Some(sp), Some(f)) = (unsafe { sp.as_mut() }, f) else {
        return fail(&Error::State("null safe point or hook".into()));
    };
    let cb = Callback { f, ctx };
    sp.inner.on_quiesce(Box::new(move |epoch| {
        let cb = &cb;
        // SAFETY: the caller's hook with its own context.
        unsafe { (cb.f)(epoch, cb.ctx) }
    }));
    SYMVIRT_CONTINUE
}

/// Installs the hook run after resume, before `resumed` is reported: where the runtime
/// re-selects its transport for the interconnect it is given.
///
/// # Safety
/// As [`symvirt_sp_on_quiesce`]; the interconnect pointer is valid during the call only.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn symvirt_sp_on_resume(
    sp: *mut CSafePoint,
    f: Option<unsafe extern "C" fn(ic: *const CInterconnect, ctx: *mut c_void)>,
    ctx: *mut c_void,
) -> c_int {
    // SAFETY: the caller guarantees `sp` is null or live.
    let (Some(sp), Some(f)) = (unsafe { sp.as_mut() }, f) else {
        return fail(&Error::State("null safe point or hook".into()));
    };
    let cb = Callback { f, ctx };
    sp.inner.on_resume(Box::new(move |epoch, ic| {
        let cb = &cb;
        let mut c = Box::new(CInterconnect {
            epoch: 0,
            kind: 0,
            port: 0,
            device: [0; 72],
            mac: [0; 24],
            pci: [0; 24],
            json: [0; 1024],
        });
        c.fill(epoch, ic);
        // SAFETY: the caller's hook with its own context; `c` outlives the call.
        unsafe { (cb.f)(&*c, cb.ctx) }
    }));
    SYMVIRT_CONTINUE
}

/// The safe point: collective, once per iteration. Returns `SYMVIRT_CONTINUE`,
/// `SYMVIRT_RESUMED` (with `out` filled), `SYMVIRT_ABORTED`, or an error; after an error the
/// safe point stays usable (a lost agent makes it a no-op that still takes part).
///
/// # Safety
/// `sp` comes from [`symvirt_sp_new`]; `out` is null or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn symvirt_sp_poll(sp: *mut CSafePoint, out: *mut CInterconnect) -> c_int {
    // SAFETY: the caller guarantees `sp` is null or live.
    let Some(sp) = (unsafe { sp.as_mut() }) else {
        return fail(&Error::State("null safe point".into()));
    };
    // SAFETY: the caller guarantees `out` is null or writable.
    let out = unsafe { out.as_mut() };
    match sp.inner.poll() {
        Ok(result) => answer(out, result),
        Err(e) => fail(&e),
    }
}

/// The epoch a migration is requested for and not yet cut for, 0 when none (no MPI call).
///
/// # Safety
/// `sp` comes from [`symvirt_sp_new`]; no other thread uses it during the call.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn symvirt_sp_pending(sp: *const CSafePoint) -> u64 {
    // SAFETY: the caller guarantees `sp` is null or live.
    unsafe { sp.as_ref() }.map_or(0, |sp| sp.inner.pending().unwrap_or(0))
}

/// Copies the cuts `sp` has made into `out` (for [`symvirt_ctl_wait_requested`] on a thread
/// that does not hold `sp`).
///
/// # Safety
/// As [`symvirt_sp_pending`]; `out` points to a writable `symvirt_served`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn symvirt_sp_served(sp: *const CSafePoint, out: *mut Served) {
    // SAFETY: the caller guarantees `sp` is null or live.
    let served = unsafe { sp.as_ref() }.map_or_else(Served::new, |sp| sp.inner.served().clone());
    if !out.is_null() {
        // SAFETY: the caller guarantees `out` is writable; a `Served` holds no resource, so
        // the old value needs no drop.
        unsafe { out.write(served) };
    }
}

/// Makes the cut for `epoch` now (see `SafePoint::cut_at`): collective, every rank at the same
/// point of its program. Returns as [`symvirt_sp_poll`]; an error is also kept for
/// [`symvirt_sp_raise`].
///
/// # Safety
/// As [`symvirt_sp_poll`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn symvirt_sp_cut(
    sp: *mut CSafePoint,
    epoch: u64,
    out: *mut CInterconnect,
) -> c_int {
    // SAFETY: the caller guarantees `sp` is null or live.
    let Some(sp) = (unsafe { sp.as_mut() }) else {
        return fail(&Error::State("null safe point".into()));
    };
    // SAFETY: the caller guarantees `out` is null or writable.
    let out = unsafe { out.as_mut() };
    sp.cut_error = None;
    match sp.inner.cut_at(epoch) {
        Ok(result) => answer(out, result),
        Err(e) => {
            let code = fail(&e);
            sp.cut_error = Some(e);
            code
        }
    }
}

/// Raises on the calling thread the error of the last [`symvirt_sp_cut`] (made on another
/// thread): [`symvirt_last_error`] then describes it. Returns its code, or `SYMVIRT_CONTINUE`
/// when that cut did not fail.
///
/// # Safety
/// As [`symvirt_sp_pending`].
#[unsafe(no_mangle)]
pub unsafe extern "C" fn symvirt_sp_raise(sp: *const CSafePoint) -> c_int {
    // SAFETY: the caller guarantees `sp` is null or live.
    match unsafe { sp.as_ref() }.and_then(|sp| sp.cut_error.as_ref()) {
        Some(e) => fail(e),
        None => SYMVIRT_CONTINUE,
    }
}

/// Ends a safe point: settles the reductions in flight (collective) and closes the agent
/// connection. Returns an error code when the settling failed; `sp` is freed either way.
///
/// # Safety
/// `sp` comes from [`symvirt_sp_new`] and is not used afterwards.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn symvirt_sp_free(sp: *mut CSafePoint) -> c_int {
    if sp.is_null() {
        return SYMVIRT_CONTINUE;
    }
    // SAFETY: the caller hands back ownership of a pointer from symvirt_sp_new.
    let sp = unsafe { Box::from_raw(sp) };
    match sp.inner.finish() {
        Ok(_control) => SYMVIRT_CONTINUE, // dropped here: the agent sees the rank leave
        Err(e) => fail(&e),
    }
}
