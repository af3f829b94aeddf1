//! A checked ring over the `mpi` crate with an explicit SymVirt safe point every iteration.
//!
//!   mpirun -np 4 rust_ring DIR MIN_ITERS
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
//! Runs at least MIN_ITERS iterations, then until `DIR/stop` exists (the ranks agree), and
//! prints `rust_ring OK rank R iterations N sent S received V cuts C`. An error from SymVirt
//! is printed with its causes and the rank exits with status 4 (init) or 5 (safe point); a
//! failed check aborts the job.

use mpi::Threading;
use mpi::collective::SystemOperation;
use mpi::point_to_point::send_receive_into_with_tags;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use symvirt_mpi::rsmpi::{SafePointResult, SymVirt};

const HEADER: usize = 4;
const SMALL: usize = 16;
/// 256 KiB of u64: the rendezvous protocol in both Open MPI and MPICH.
const LARGE: usize = 32 * 1024;
const TO_RIGHT: i32 = 10;
const TO_LEFT: i32 = 20;

/// Per-peer message counts, shared with the quiesce hook.
struct Counts {
    sent: Vec<AtomicU64>,
    received: Vec<AtomicU64>,
    iteration: AtomicU64,
}

impl Counts {
    fn new(np: usize) -> Counts {
        Counts {
            sent: (0..np).map(|_| AtomicU64::new(0)).collect(),
            received: (0..np).map(|_| AtomicU64::new(0)).collect(),
            iteration: AtomicU64::new(0),
        }
    }

    fn row(v: &[AtomicU64]) -> String {
        v.iter()
            .map(|c| c.load(Ordering::Relaxed).to_string())
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

/// The message `src` sends `dst` as their `seq`-th.
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
    let (dir, min_iters) = match args.as_slice() {
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
        [_, dir, n] => match n.parse::<u64>() {
            Ok(n) => (PathBuf::from(dir), n),
            Err(_) => {
                eprintln!("rust_ring: MIN_ITERS must be a number, got {n:?}");
                return ExitCode::from(2);
            }
        },
        _ => {
            eprintln!("usage: rust_ring DIR MIN_ITERS | rust_ring --mpi-library");
            return ExitCode::from(2);
        }
    };
    // Funneled: only this thread calls MPI; SymVirt's watcher thread never does.
    let Some((universe, _)) = mpi::initialize_with_threading(Threading::Funneled) else {
        eprintln!("rust_ring: MPI was already initialized");
        return ExitCode::from(3);
    };
    let world = universe.world();
    let code = run(&world, &dir, min_iters);
    drop(world);
    drop(universe); // MPI_Finalize
    code
}

fn run(world: &SimpleCommunicator, dir: &Path, min_iters: u64) -> ExitCode {
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
    let (c, d) = (counts.clone(), dir.to_path_buf());
    sv.on_quiesce(move |epoch| {
        let text = format!(
            "sent {}\nreceived {}\niteration {}\n",
            Counts::row(&c.sent),
            Counts::row(&c.received),
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

    let right = (me + 1) % np;
    let left = (me + np - 1) % np;
    let (me_u, right_u, left_u) = (me as u64, right as u64, left as u64);
    let mut cuts = 0u64;
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

        match sv.safe_point() {
            Ok(SafePointResult::Continue) => {}
            Ok(SafePointResult::Resumed {
                epoch,
                interconnect,
            }) => {
                cuts += 1;
                let json = serde_json::to_string(&interconnect).unwrap_or_default();
                write_record(
                    &dir.join(format!("resumed-{epoch}-{me}")),
                    &format!("resumed {iteration} {json}\n"),
                );
            }
            Ok(SafePointResult::Aborted { epoch }) => {
                cuts += 1;
                write_record(
                    &dir.join(format!("resumed-{epoch}-{me}")),
                    &format!("aborted {iteration}\n"),
                );
            }
            Err(e) => {
                report(&format!("rank {me}: safe point"), &e);
                return ExitCode::from(5);
            }
        }

        if iteration + 1 >= min_iters && iteration % 8 == 7 {
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
