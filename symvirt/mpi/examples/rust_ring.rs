//! A checked ring over the `mpi` crate with an explicit SymVirt safe point every iteration.
//!
//!   mpirun -np 4 rust_ring DIR MIN_ITERS [QUIET_MS]
//!   rust_ring --mpi-library
//!
//! `mpirun` stands for the launcher of the MPI it links (`mpirun.openmpi` or `mpiexec.mpich`).
//!
//! The second form prints the linked MPI library's own description (`MPI_Get_library_version`,
//! callable before `MPI_Init`) and exits: a test reads it to pick the matching launcher.
//!
//! Each iteration every rank sends one message to its right neighbour (blocking send-receive;
//! every fourth one 256 KiB, beyond the eager limit) and one to its left neighbour
//! (immediate send and receive in a request scope), then checks with an all-reduce that the
//! job received as many messages as it sent. Every message carries (source, destination,
//! per-pair sequence number, length) and a payload derived from them; the receiver checks all
//! of it, so a lost, duplicated, reordered or corrupted message fails the run.
//!
//! Then `SymVirt::safe_point`. At a cut the quiesce hook writes `DIR/cut-E-R`:
//! `sent <per peer>` / `received <per peer>` / `iteration N`; the resume hook writes
//! `DIR/hook-E-R` (the interconnect's JSON); after the safe point returns, `DIR/resumed-E-R`
//! (`resumed ITERATION JSON` or `aborted ITERATION`).
//!
//! With QUIET_MS, each iteration also computes for QUIET_MS milliseconds inside a quiet phase
//! (`SymVirt::quiet_with_requests`) with one 256 KiB message to the right neighbour outstanding
//! across it (immediate send and receive posted before the phase, waited for after it); MPI is
//! then initialized with `MPI_THREAD_SERIALIZED`, so the library's thread can make the cut
//! while the rank computes. The cut record then counts the outstanding message as received
//! only if the receive buffer already holds it whole, and adds `place quiet` or `place
//! safe_point` (where the program was) and `thread NAME` (which thread ran the hook). With
//! `RUST_RING_PANIC_AT=N`, rank 1 panics inside the quiet phase of iteration N and catches the
//! panic after `quiet_with_requests` lets it go on (printing `caught the panic`).
//!
//! Runs at least MIN_ITERS iterations, then until `DIR/stop` exists (the ranks agree), and
//! prints `rust_ring OK rank R iterations N sent S received V cuts C`. An error from SymVirt
//! is printed with its causes and the rank exits with status 4 (init) or 5 (safe point); a
//! failed check aborts the job.

use mpi::Threading;
use mpi::collective::SystemOperation;
use mpi::point_to_point::send_receive_into_with_tags;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use symvirt_mpi::rsmpi::{SafePointResult, SymVirt};

const HEADER: usize = 4;
const SMALL: usize = 16;
/// 256 KiB of u64: the rendezvous protocol in both Open MPI and MPICH.
const LARGE: usize = 32 * 1024;
const TO_RIGHT: i32 = 10;
const TO_LEFT: i32 = 20;
const ACROSS_QUIET: i32 = 30;

/// Per-peer message counts, shared with the quiesce hook.
struct Counts {
    sent: Vec<AtomicU64>,
    received: Vec<AtomicU64>,
    iteration: AtomicU64,
    /// Inside a quiet phase.
    quiet: AtomicBool,
    /// The receive buffer of the message outstanding across the quiet phase (null: none),
    /// its length and sequence number.
    outstanding: AtomicPtr<u64>,
    outstanding_len: AtomicUsize,
    outstanding_seq: AtomicU64,
}

impl Counts {
    fn new(np: usize) -> Counts {
        Counts {
            sent: (0..np).map(|_| AtomicU64::new(0)).collect(),
            received: (0..np).map(|_| AtomicU64::new(0)).collect(),
            iteration: AtomicU64::new(0),
            quiet: AtomicBool::new(false),
            outstanding: AtomicPtr::new(std::ptr::null_mut()),
            outstanding_len: AtomicUsize::new(0),
            outstanding_seq: AtomicU64::new(0),
        }
    }

    fn counts(v: &[AtomicU64]) -> Vec<u64> {
        v.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    fn row(counts: &[u64]) -> String {
        counts
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    }

    fn total(v: &[AtomicU64]) -> u64 {
        v.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

fn word(src: u64, dst: u64, seq: u64, i: u64) -> u64 {
    (src << 48) ^ (dst << 40) ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ i
}

/// The message `src` sends `dst` as their `seq`-th (every fourth one large).
fn message(src: u64, dst: u64, seq: u64) -> Vec<u64> {
    let len = if seq % 4 == 3 { LARGE } else { SMALL };
    let mut m = vec![src, dst, seq, len as u64];
    m.extend((0..len as u64).map(|i| word(src, dst, seq, i)));
    m
}

/// What is wrong with `got`, received by `dst` from `src` as their `seq`-th message.
fn check(got: &[u64], src: u64, dst: u64, seq: u64) -> Option<String> {
    let want = message(src, dst, seq);
    if got.len() < HEADER || got[..HEADER] != want[..HEADER] {
        return Some(format!(
            "header {:?}, want {:?}",
            &got[..got.len().min(HEADER)],
            &want[..HEADER]
        ));
    }
    (got != want.as_slice()).then(|| format!("payload of message {seq} from {src} corrupted"))
}

fn write_record(path: &Path, text: &str) {
    // Written whole, then renamed: the test never reads half a record.
    let tmp = path.with_extension("tmp");
    if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)) {
        eprintln!("rust_ring: cannot write {}: {e}", path.display());
    }
}

fn report(what: &str, e: &dyn std::error::Error) {
    let mut msg = format!("rust_ring: {what}: {e}");
    let mut cause = e.source();
    while let Some(c) = cause {
        msg.push_str(&format!(": {c}"));
        cause = c.source();
    }
    say(&msg);
}

/// One line to stderr in one write: ranks share the launcher's stderr, and `eprintln!` writes
/// the text and its newline separately, so lines of different ranks could run together.
fn say(line: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("{line}\n").as_bytes());
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    let (dir, min_iters, quiet_ms) = match args.as_slice() {
        [_, flag] if flag == "--mpi-library" => {
            return match mpi::environment::library_version() {
                Ok(v) => {
                    // Open MPI counts the terminating NUL in the length.
                    println!(
                        "{}",
                        v.trim_end_matches(|c: char| c == '\0' || c.is_whitespace())
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("rust_ring: the MPI library version is not UTF-8: {e}");
                    ExitCode::from(3)
                }
            };
        }
        [_, dir, n, rest @ ..] if rest.len() <= 1 => {
            let numbers: Result<Vec<u64>, _> =
                std::iter::once(n).chain(rest).map(|a| a.parse()).collect();
            match numbers.as_deref() {
                Ok([n]) => (PathBuf::from(dir), *n, None),
                Ok([n, ms]) => (PathBuf::from(dir), *n, Some(*ms)),
                _ => {
                    eprintln!("rust_ring: MIN_ITERS and QUIET_MS must be numbers, got {args:?}");
                    return ExitCode::from(2);
                }
            }
        }
        _ => {
            eprintln!("usage: rust_ring DIR MIN_ITERS [QUIET_MS] | rust_ring --mpi-library");
            return ExitCode::from(2);
        }
    };
    // Funneled: only this thread calls MPI; SymVirt's watcher thread never does. With quiet
    // phases, serialized: SymVirt's quiet thread calls MPI while this one computes.
    let threading = match quiet_ms {
        Some(_) => Threading::Serialized,
        None => Threading::Funneled,
    };
    let Some((universe, _)) = mpi::initialize_with_threading(threading) else {
        eprintln!("rust_ring: MPI was already initialized");
        return ExitCode::from(3);
    };
    let world = universe.world();
    let code = run(&world, &dir, min_iters, quiet_ms);
    drop(world);
    drop(universe); // MPI_Finalize
    code
}

fn run(world: &SimpleCommunicator, dir: &Path, min_iters: u64, quiet_ms: Option<u64>) -> ExitCode {
    let me = world.rank();
    let np = world.size();
    let fail = |what: String| -> ! {
        say(&format!("rust_ring: rank {me}: {what}"));
        world.abort(6)
    };
    let counts = Arc::new(Counts::new(np as usize));
    let mut sv = match SymVirt::init(world) {
        Ok(sv) => sv,
        Err(e) => {
            report(&format!("rank {me}: SymVirt::init"), &e);
            return ExitCode::from(4);
        }
    };
    // Tells a test that the SIGUSR1 trigger is installed on this rank.
    say(&format!(
        "rust_ring: rank {me} ready, agent: {}",
        sv.has_agent()
    ));
    let right = (me + 1) % np;
    let left = (me + np - 1) % np;
    let (me_u, right_u, left_u) = (me as u64, right as u64, left as u64);
    let (c, d) = (counts.clone(), dir.to_path_buf());
    sv.on_quiesce(move |epoch| {
        let mut received = Counts::counts(&c.received);
        let mut extra = String::new();
        if quiet_ms.is_some() {
            let buf = c.outstanding.load(Ordering::Acquire);
            if !buf.is_null() {
                let len = c.outstanding_len.load(Ordering::Acquire);
                // SAFETY: `buf` is the receive buffer of the message outstanding across the
                // quiet phase this cut fell in, alive until the phase's end (which waits for
                // this cut); the library completed its receive before the cut, so MPI no
                // longer writes it, and the application's thread is computing.
                let got = unsafe { std::slice::from_raw_parts(buf, len) };
                let seq = c.outstanding_seq.load(Ordering::Acquire);
                if check(got, left_u, me_u, seq).is_none() {
                    // Received into the program: counted.
                    received[left as usize] += 1;
                }
            }
            let place = if c.quiet.load(Ordering::Acquire) {
                "quiet"
            } else {
                "safe_point"
            };
            let thread = std::thread::current();
            extra = format!(
                "place {place}\nthread {}\n",
                thread.name().unwrap_or("unnamed")
            );
        }
        let text = format!(
            "sent {}\nreceived {}\niteration {}\n{extra}",
            Counts::row(&Counts::counts(&c.sent)),
            Counts::row(&received),
            c.iteration.load(Ordering::Relaxed)
        );
        write_record(&d.join(format!("cut-{epoch}-{me}")), &text);
    })
    .unwrap_or_else(|e| fail(format!("on_quiesce: {e}")));
    let d = dir.to_path_buf();
    sv.on_resume(move |epoch, ic| {
        let json = serde_json::to_string(ic).unwrap_or_default();
        write_record(&d.join(format!("hook-{epoch}-{me}")), &format!("{json}\n"));
    })
    .unwrap_or_else(|e| fail(format!("on_resume: {e}")));

    let mut cuts = 0u64;
    let panic_at: Option<u64> = std::env::var("RUST_RING_PANIC_AT")
        .ok()
        .and_then(|v| v.parse().ok());
    let mut iteration = 0u64;
    loop {
        counts.iteration.store(iteration, Ordering::Relaxed);
        let seq = iteration; // one message per pair and direction per iteration

        // Blocking, to the right.
        let out = message(me_u, right_u, seq);
        let mut got = vec![0u64; message(left_u, me_u, seq).len()];
        let status = send_receive_into_with_tags(
            &out[..],
            &world.process_at_rank(right),
            TO_RIGHT,
            &mut got[..],
            &world.process_at_rank(left),
            TO_RIGHT,
        );
        counts.sent[right as usize].fetch_add(1, Ordering::Relaxed);
        if status.source_rank() != left {
            fail(format!(
                "message from {}, want {left}",
                status.source_rank()
            ));
        }
        if let Some(why) = check(&got, left_u, me_u, seq) {
            fail(why);
        }
        counts.received[left as usize].fetch_add(1, Ordering::Relaxed);

        // Immediate, to the left.
        let out = message(me_u, left_u, seq);
        let mut got = vec![0u64; message(right_u, me_u, seq).len()];
        mpi::request::scope(|scope| {
            let recv = world
                .process_at_rank(right)
                .immediate_receive_into_with_tag(scope, &mut got[..], TO_LEFT);
            let send =
                world
                    .process_at_rank(left)
                    .immediate_send_with_tag(scope, &out[..], TO_LEFT);
            send.wait_without_status();
            counts.sent[left as usize].fetch_add(1, Ordering::Relaxed);
            recv.wait_without_status();
        });
        if let Some(why) = check(&got, right_u, me_u, seq) {
            fail(why);
        }
        counts.received[right as usize].fetch_add(1, Ordering::Relaxed);

        // The iteration's messages are all matched: the job sent what it received.
        let mine = [Counts::total(&counts.sent), Counts::total(&counts.received)];
        let mut all = [0u64; 2];
        world.all_reduce_into(&mine[..], &mut all[..], SystemOperation::sum());
        if all[0] != all[1] {
            fail(format!("job sent {} messages, received {}", all[0], all[1]));
        }

        // A cut's result: counted and recorded; an error ends the rank.
        let mut settle =
            |what: &str, result: symvirt_mpi::error::Result<SafePointResult>| match result {
                Ok(SafePointResult::Continue) => true,
                Ok(r) => {
                    cuts += 1;
                    record_resume(dir, me, iteration, &r);
                    true
                }
                Err(e) => {
                    report(&format!("rank {me}: {what}"), &e);
                    false
                }
            };
        if let Some(ms) = quiet_ms {
            let result = quiet_phase(world, &mut sv, &counts, iteration, ms, panic_at);
            if !settle("quiet phase", result) {
                return ExitCode::from(5);
            }
        }
        if !settle("safe point", sv.safe_point()) {
            return ExitCode::from(5);
        }

        // Iterations with a quiet phase take seconds: look for the stop file every time.
        if iteration + 1 >= min_iters && (quiet_ms.is_some() || iteration % 8 == 7) {
            let stop = (me == 0 && dir.join("stop").exists()) as u8;
            let mut any = 0u8;
            world.all_reduce_into(&stop, &mut any, SystemOperation::max());
            if any != 0 {
                break;
            }
        }
        iteration += 1;
    }
    if let Err(e) = sv.finalize() {
        report(&format!("rank {me}: SymVirt::finalize"), &e);
        return ExitCode::from(5);
    }
    println!(
        "rust_ring OK rank {me} iterations {} sent {} received {} cuts {cuts}",
        iteration + 1,
        Counts::total(&counts.sent),
        Counts::total(&counts.received)
    );
    ExitCode::SUCCESS
}

/// Writes `DIR/resumed-E-R` for a cut that returned `r` at `iteration`.
fn record_resume(dir: &Path, me: i32, iteration: u64, r: &SafePointResult) {
    let (epoch, text) = match r {
        SafePointResult::Continue => return,
        SafePointResult::Resumed {
            epoch,
            interconnect,
        } => {
            let json = serde_json::to_string(interconnect).unwrap_or_default();
            (epoch, format!("resumed {iteration} {json}\n"))
        }
        SafePointResult::Aborted { epoch } => (epoch, format!("aborted {iteration}\n")),
    };
    write_record(&dir.join(format!("resumed-{epoch}-{me}")), &text);
}

/// Busy for `ms` milliseconds, no MPI call: a compute phase.
fn compute(ms: u64) -> u64 {
    let until = Instant::now() + Duration::from_millis(ms);
    let mut x = 1u64;
    while Instant::now() < until {
        for _ in 0..10_000 {
            x = x
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
        }
    }
    x
}

/// One quiet phase of `ms` milliseconds of computation with a 256 KiB message to the right
/// neighbour outstanding across it; checks the message afterwards.
fn quiet_phase(
    world: &SimpleCommunicator,
    sv: &mut SymVirt,
    counts: &Counts,
    iteration: u64,
    ms: u64,
    panic_at: Option<u64>,
) -> symvirt_mpi::error::Result<SafePointResult> {
    let me = world.rank();
    let np = world.size();
    let (right, left) = ((me + 1) % np, (me + np - 1) % np);
    // Always a large message (seq = 3 mod 4): the rendezvous protocol, which needs MPI calls
    // on both sides to move.
    let seq = 4 * iteration + 3;
    let out = message(me as u64, right as u64, seq);
    let len = message(left as u64, me as u64, seq).len();
    let buf: *mut u64 = Box::into_raw(vec![0u64; len].into_boxed_slice()).cast();
    // SAFETY: `buf` points to `len` u64s just allocated; this slice is the only reference
    // through which Rust code writes them (MPI fills it), until the Box is rebuilt below.
    let got: &mut [u64] = unsafe { std::slice::from_raw_parts_mut(buf, len) };
    let result = mpi::request::scope(|scope| {
        let recv =
            world
                .process_at_rank(left)
                .immediate_receive_into_with_tag(scope, got, ACROSS_QUIET);
        let send =
            world
                .process_at_rank(right)
                .immediate_send_with_tag(scope, &out[..], ACROSS_QUIET);
        counts.sent[right as usize].fetch_add(1, Ordering::Relaxed);
        counts.outstanding_seq.store(seq, Ordering::Release);
        counts.outstanding_len.store(len, Ordering::Release);
        counts.outstanding.store(buf, Ordering::Release);
        counts.quiet.store(true, Ordering::Release);
        // Rank 1 panics inside the phase of iteration $RUST_RING_PANIC_AT, if set: the
        // library ends the phase on every rank before the panic goes on, caught here.
        let planned = me == 1 && panic_at == Some(iteration);
        let phase = std::panic::catch_unwind(AssertUnwindSafe(|| {
            sv.quiet_with_requests(&[&recv, &send], || {
                if planned {
                    panic!("rust_ring: planned panic inside a quiet phase");
                }
                compute(ms)
            })
        }));
        let result = phase.unwrap_or_else(|_| {
            say(&format!(
                "rust_ring: rank {me}: caught the panic of iteration {iteration}'s quiet phase"
            ));
            Ok((0, Ok(SafePointResult::Continue)))
        });
        counts.quiet.store(false, Ordering::Release);
        counts
            .outstanding
            .store(std::ptr::null_mut(), Ordering::Release);
        send.wait_without_status();
        recv.wait_without_status();
        result
    });
    // SAFETY: `buf` came from `Box::into_raw` of a boxed slice of `len` u64s above; the
    // requests that used it are complete and the hook no longer reads it (cleared above,
    // and a cut's hook runs before the phase's end returns).
    let got = unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(buf, len)) };
    if let Some(why) = check(&got, left as u64, me as u64, seq) {
        say(&format!(
            "rust_ring: rank {me}: across a quiet phase: {why}"
        ));
        world.abort(6);
    }
    counts.received[left as usize].fetch_add(1, Ordering::Relaxed);
    result.and_then(|(_, cut)| cut)
}
