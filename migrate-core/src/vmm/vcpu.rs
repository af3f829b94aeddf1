//! vCPU threads with pause/resume from any thread.
//!
//! Pausing: under the control lock, the controller sets `want = Pause`, writes
//! `immediate_exit = 1` into the vCPU's `kvm_run` and kicks the thread with a signal. The vCPU
//! thread clears `immediate_exit` under the same lock just before entering `KVM_RUN`, so a
//! pause request either is seen before the run, makes `KVM_RUN` return at once, or interrupts
//! it: none is lost. Work on the vCPU fd itself (save/restore) runs on the vCPU thread as
//! queued commands while it is parked.

use super::guest::{HEARTBEAT_PORT, TICK_PORT, WAIT_PORT};
use super::io::IoBus;
use crate::kvm::{DirtyTracking, KvmVm};
use crate::{Error, Result};
use kvm_bindings::{KVM_EXIT_DIRTY_RING_FULL, kvm_run};
use kvm_ioctls::{VcpuExit, VcpuFd};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

/// How long a pause or a command may take before it is reported as stuck.
const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);
/// Consecutive full-ring exits with nothing to collect after which the ring counts as wedged.
const WEDGED_RING_EXITS: u32 = 1000;
/// Longest single throttle sleep, so the vCPU stays responsive.
const MAX_THROTTLE_SLEEP: Duration = Duration::from_millis(100);
/// How long one turn of the guest's SymVirt wait blocks the vCPU (the guest then looks at its
/// channel and its wait word again).
const WAIT_TURN: Duration = Duration::from_millis(1);

type Command = Box<dyn FnOnce(&mut VcpuFd) + Send>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Run,
    Pause,
    Exit,
}

struct Control {
    want: Want,
    /// The thread is parked (not in KVM_RUN) and will not run until `want` is Run.
    parked: bool,
    exited: bool,
    commands: VecDeque<Command>,
    /// Why the vCPU stopped on its own (guest halted, KVM error).
    failure: Option<String>,
    /// Address of the vCPU's kvm_run mapping (0 until the thread started).
    kvm_run: usize,
}

struct Shared {
    control: Mutex<Control>,
    changed: Condvar,
    throttle: AtomicU8,
    heartbeats: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: the signal only makes KVM_RUN return EINTR.
}

fn install_kick_handler() -> Result<()> {
    static INSTALLED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    INSTALLED
        .get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.to_string()))
        .clone()
        .map_err(|e| Error::VmControl(format!("installing the vCPU kick signal handler: {e}")))
}

/// One vCPU thread.
pub struct Vcpu {
    index: u32,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu")
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl Vcpu {
    /// Starts the thread for `fd`, parked (not running guest code).
    pub fn spawn(index: u32, fd: VcpuFd, vm: Arc<KvmVm>, bus: Arc<IoBus>) -> Result<Self> {
        install_kick_handler()?;
        let shared = Arc::new(Shared {
            control: Mutex::new(Control {
                want: Want::Pause,
                parked: false,
                exited: false,
                commands: VecDeque::new(),
                failure: None,
                kvm_run: 0,
            }),
            changed: Condvar::new(),
            throttle: AtomicU8::new(0),
            heartbeats: AtomicU64::new(0),
        });
        let thread_shared = shared.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{index}"))
            .spawn(move || vcpu_loop(fd, &thread_shared, &vm, &bus))
            .map_err(|source| Error::Io {
                context: format!("spawning vCPU {index}"),
                source,
            })?;
        let vcpu = Vcpu {
            index,
            shared,
            thread: Some(thread),
        };
        vcpu.wait_parked()?;
        Ok(vcpu)
    }

    fn wait_parked(&self) -> Result<()> {
        let deadline = Instant::now() + CONTROL_TIMEOUT;
        let mut c = self.shared.lock();
        while !c.parked && !c.exited {
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(format!("vCPU {} did not stop", self.index)));
            }
            let timeout = (deadline - now).min(Duration::from_millis(50));
            c = self
                .shared
                .changed
                .wait_timeout(c, timeout)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if !c.parked && !c.exited && c.want == Want::Pause {
                // A kick that raced with a blocking instruction: kick again.
                self.kick(&c);
            }
        }
        Ok(())
    }

    fn kick(&self, c: &Control) {
        if c.exited || c.kvm_run == 0 {
            return;
        }
        let run = c.kvm_run as *mut kvm_run;
        // SAFETY: `kvm_run` is the vCPU's live kvm_run mapping: the thread publishes it before
        // parking and unmaps it (drops its VcpuFd) only after setting `exited`, which we checked
        // under the same lock we hold. The byte is shared with the kernel, so it is written
        // atomically; the vCPU thread touches it only under this lock.
        let flag = unsafe {
            std::sync::atomic::AtomicU8::from_ptr(std::ptr::addr_of_mut!((*run).immediate_exit))
        };
        flag.store(1, Ordering::SeqCst);
        if let Some(t) = &self.thread {
            // ESRCH if the thread is already gone: harmless.
            let _ = t.kill(kick_signal());
        }
    }

    /// Stops guest execution; returns once the thread is parked outside `KVM_RUN`.
    pub fn pause(&self) -> Result<()> {
        {
            let mut c = self.shared.lock();
            if c.want == Want::Exit {
                return Err(Error::VmControl(format!("vCPU {} has exited", self.index)));
            }
            c.want = Want::Pause;
            if !c.parked {
                self.kick(&c);
            }
        }
        self.wait_parked()
    }

    /// Lets the vCPU run guest code again.
    pub fn resume(&self) -> Result<()> {
        let mut c = self.shared.lock();
        if c.want == Want::Exit || c.exited {
            return Err(Error::VmControl(format!("vCPU {} has exited", self.index)));
        }
        if let Some(f) = &c.failure {
            return Err(Error::VmControl(format!(
                "vCPU {} stopped: {f}",
                self.index
            )));
        }
        c.want = Want::Run;
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Runs `f` on the vCPU thread with its fd (the vCPU must be paused) and returns its result.
    pub fn exec<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut VcpuFd) -> R + Send + 'static,
    ) -> Result<R> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        {
            let mut c = self.shared.lock();
            if c.exited {
                return Err(Error::VmControl(format!("vCPU {} has exited", self.index)));
            }
            if c.want != Want::Pause {
                return Err(Error::VmControl(format!(
                    "vCPU {} is not paused",
                    self.index
                )));
            }
            c.commands.push_back(Box::new(move |fd| {
                let _ = tx.send(f(fd));
            }));
            self.shared.changed.notify_all();
        }
        rx.recv_timeout(CONTROL_TIMEOUT)
            .map_err(|_| Error::Timeout(format!("vCPU {} did not run a command", self.index)))
    }

    /// Sets the throttle: the thread sleeps `percent`/(100-`percent`) of its run time.
    pub fn set_throttle(&self, percent: u8) {
        self.shared
            .throttle
            .store(percent.min(99), Ordering::Relaxed);
    }

    /// Passes the guest program completed (VM exits on the heartbeat port).
    pub fn heartbeats(&self) -> u64 {
        self.shared.heartbeats.load(Ordering::Relaxed)
    }

    /// Why the vCPU stopped by itself, if it did.
    pub fn failure(&self) -> Option<String> {
        self.shared.lock().failure.clone()
    }
}

impl Drop for Vcpu {
    fn drop(&mut self) {
        {
            let mut c = self.shared.lock();
            c.want = Want::Exit;
            self.kick(&c);
            self.shared.changed.notify_all();
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn vcpu_loop(mut fd: VcpuFd, shared: &Shared, vm: &KvmVm, bus: &IoBus) {
    shared.lock().kvm_run = fd.get_kvm_run() as *mut kvm_run as usize;
    let mut empty_ring_full_exits = 0u32;
    loop {
        {
            let mut c = shared.lock();
            loop {
                while let Some(cmd) = c.commands.pop_front() {
                    cmd(&mut fd);
                }
                match c.want {
                    Want::Exit => {
                        c.exited = true;
                        c.parked = true;
                        shared.changed.notify_all();
                        return;
                    }
                    Want::Run if c.failure.is_none() => break,
                    _ => {
                        if !c.parked {
                            c.parked = true;
                            shared.changed.notify_all();
                        }
                        c = shared.changed.wait(c).unwrap_or_else(|p| p.into_inner());
                    }
                }
            }
            c.parked = false;
            shared.changed.notify_all();
            // Cleared under the lock the controller sets it under (see module docs).
            fd.set_kvm_immediate_exit(0);
        }
        let started = Instant::now();
        let failure = match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => {
                if port == HEARTBEAT_PORT {
                    shared.heartbeats.fetch_add(1, Ordering::Relaxed);
                } else if port == WAIT_PORT {
                    wait_turn(shared);
                } else if port != TICK_PORT {
                    // A device's port, or nobody's (ignored, as on a PC).
                    bus.write(port, data);
                }
                None
            }
            Ok(VcpuExit::IoIn(port, data)) => {
                bus.read(port, data);
                None
            }
            Ok(VcpuExit::Unsupported(reason)) if reason == KVM_EXIT_DIRTY_RING_FULL => {
                debug_assert_eq!(vm.tracking(), DirtyTracking::DirtyRing);
                match vm.on_ring_full() {
                    Err(e) => Some(format!("dirty ring full, harvest failed: {e}")),
                    Ok(0) => {
                        // Another thread may have just emptied the ring; but a ring KVM keeps
                        // calling full while it holds nothing has overflowed (kvm_pvm does not
                        // stop a vCPU at the soft limit in time) and cannot recover.
                        empty_ring_full_exits += 1;
                        (empty_ring_full_exits > WEDGED_RING_EXITS).then(|| {
                            "dirty ring overflowed: KVM reports it full but it holds no entries; \
                             use a larger ring and harvest more often"
                                .to_string()
                        })
                    }
                    Ok(_) => {
                        empty_ring_full_exits = 0;
                        None
                    }
                }
            }
            Ok(VcpuExit::Hlt) => Some("guest halted".to_string()),
            Ok(other) => Some(format!("unexpected VM exit {other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => None,
            Err(e) => Some(format!("KVM_RUN failed: {e}")),
        };
        if let Some(f) = failure {
            log::error!("vCPU stopped: {f}");
            shared.lock().failure = Some(f);
            continue;
        }
        throttle(shared, started.elapsed());
    }
}

/// Blocks the vCPU for one turn of the guest's wait, unless a pause or exit comes first.
fn wait_turn(shared: &Shared) {
    let c = shared.lock();
    let _ = shared
        .changed
        .wait_timeout_while(c, WAIT_TURN, |c| c.want == Want::Run)
        .unwrap_or_else(|p| p.into_inner());
}

/// Sleeps in proportion to the time spent running, unless a pause or exit comes first.
fn throttle(shared: &Shared, ran: Duration) {
    let percent = u32::from(shared.throttle.load(Ordering::Relaxed));
    if percent == 0 {
        return;
    }
    let sleep = (ran * percent / (100 - percent)).min(MAX_THROTTLE_SLEEP);
    let c = shared.lock();
    let _ = shared
        .changed
        .wait_timeout_while(c, sleep, |c| c.want == Want::Run)
        .unwrap_or_else(|p| p.into_inner());
}
