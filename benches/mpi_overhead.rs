//! What the transparent SymVirt layer (`libsymvirt_pmpi_<impl>.so`, LD_PRELOAD) costs an MPI job,
//! per MPI implementation installed (Open MPI, MPICH).
//!
//! - `pingpong`: 2 ranks, `symvirt/mpi/tests/programs/pingpong.c`: one-way latency of
//!   `LAT_BYTES` (8 B) and ping-pong bandwidth of `BW_BYTES` (1 MiB), timed with `MPI_Wtime`
//!   inside the program after untimed warm-up rounds. Launches without and with the layer
//!   alternate (A B, B A, A B, ...: drift on this shared machine hits both alike), each launch
//!   timing several samples. `latency_ratio` and `bandwidth_ratio` are paired: the median over
//!   pairs of (launch median with / launch median without). `bandwidth_ratio_in_process`, the
//!   one the bandwidth target is judged on: every launch also runs pairs of 1 MiB ping-pong
//!   blocks through and around the wrappers in one process (bandwidth through / around;
//!   median over the launch's pairs, then over the launches with the layer; `_control`
//!   without it), as the latency blocks below, since launches differ by up to 20 %. This
//!   machine switches between speed regimes at random, for a few seconds at most (the same
//!   ping-pong takes 160 or 400 ns one way), so
//!   the ratio of the pooled medians (`*_ratio_pooled`, also reported) compares regimes
//!   whenever the two variants' samples landed in them unevenly. Also reported: medians with
//!   min/max of both variants, per-pair ratios (median, min, max), and whether the issue's
//!   targets hold (latency ratio <= 1.05, bandwidth ratio >= 0.98; `within_targets`, below).
//!   `latency_ratio_fastest` pairs the launches' fastest samples instead of their medians
//!   (median over pairs): the machine's noise only adds time, so the fastest sample of a
//!   launch is the one least blurred by it.
//!   `latency_ratio_in_process`, the estimate the latency target is judged on: every launch
//!   also runs `NINJA_MPI_AB_PAIRS` sets of short latency blocks, one through `MPI_Send` and
//!   `MPI_Recv` (the layer's wrappers when preloaded), one through `PMPI_Send` and `PMPI_Recv`
//!   (around them), a millisecond apart in one process; a launch's ratio is the median over its
//!   sets of (through / around), and the estimate the median over the launches with the
//!   layer. The blocks share the speed regime that launches do not, so this ratio moves by
//!   about 1 % between launches where the paired one moves by 20 %. It is also reported per
//!   speed regime (`_by_regime`), over sets rather than launches: a fast episode of this
//!   machine lasts a few seconds at most, so sets see it where a launch's median mostly does
//!   not. Only steady sets count there (none of the blocks made of MPI's calls alone over 1.5x
//!   another: none preempted, no regime switch inside; the block through the layer is left
//!   out of that test, so its cost neither hides a set nor moves it): `fast` are those whose
//!   fastest such block ran faster than `_fast_below_us`, the boundary between two clusters
//!   of their latencies more than 2x apart (at least 20 sets each, both variants), else all are
//!   `single`; the layer's cost in nanoseconds is a larger share in the fast regime.
//!   `latency_floors_in_process`: the same, over sets, for the two other blocks of each set,
//!   the floors of any blocking receive that can leave MPI while it waits (which a receive
//!   must, to answer a cut), made of MPI's own calls without the layer (in the launches with
//!   it, so at its thread level): `request` (`PMPI_Irecv` then `PMPI_Wait`: the price of a
//!   request instead of `MPI_Recv`'s own) and `polled` (`PMPI_Irecv` then `PMPI_Test` until it
//!   completes); `ratio` is their median over all those sets. What the layer adds over these is
//!   its own; and
//!   for the launches without the layer (`_control`: both blocks are then the same MPI
//!   functions, so it shows the estimate's own bias, 1.000 +- 0.003 here). What it leaves out
//!   is what loading the layer costs calls it does not wrap (the thread level it initialises
//!   MPI at, its sleeping progress thread): `latency_ratio_around` pairs the blocks around the
//!   layer of the two launches of a pair, with the noise of launches. `within_targets`: the
//!   in-process ratio over sets at most 1.05 in every regime seen, and
//!   `bandwidth_ratio_in_process` at least 0.98.
//!   `arrived_receive_*`: what the layer adds to a receive whose 8-byte message has arrived
//!   before it was posted (as in most halo exchanges): blocks of 16 such receives through and
//!   around the wrappers, paired in one process as above (`_ratio`, median over launches with
//!   the layer of their median through / around; `_ratio_control` without it), with the
//!   nanoseconds per receive. No waiting is in this path, so it does not depend on the regime.
//! - `collectives`: what the layer costs an 8-byte `MPI_Allreduce` (2 ranks,
//!   `symvirt/mpi/tests/programs/collbench.c`), blocking (aligned first), non-blocking
//!   (`MPI_Iallreduce` + `MPI_Wait`: started once both ranks called it) and persistent (MPI 4:
//!   `MPI_Start` + `MPI_Wait`, the start deferred the same way): per form, blocks through the
//!   `MPI_` functions and around them (`PMPI_`) a millisecond apart in one process, as
//!   `latency_ratio_in_process`; `ratio` is the median over the launches with the layer of
//!   their median ratio (through / around), `ratio_control` the same for launches without it
//!   (the estimate's noise), with the microseconds per collective of both.
//! - `quiesce`: 4 ranks run `stress.c` (point-to-point and collectives) under the layer with a
//!   real guest agent; the bench sends migration requests (`prepare`) on the agent's host
//!   channel, as the tests do, at varying moments; `quiesce_ms` is request to the agent's
//!   report that all 4 ranks are quiesced (median, p95, min, max); the ranks are resumed each
//!   time and the program's own payload checks must pass at the end.
//! - `quiesce_compute`: the same for a compute-bound program (`stress.c` modes
//!   `compute,collective`: every rank computes 2/3 to 4/3 of `NINJA_MPI_COMPUTE_MS`, default
//!   5000, without an MPI call, then an Allreduce and friends), requests at random moments:
//!   `quiesce_ms` with the layer's progress thread (the default; `NINJA_MPI_COMPUTE_REQUESTS`,
//!   default 20; target p95 <= 50 ms), and `quiesce_ms_without_progress_thread`
//!   (`SYMVIRT_PROGRESS_THREAD=0`, `NINJA_MPI_COMPUTE_REQUESTS_WITHOUT`, default 5: what a cut
//!   cost before, the rest of the slowest rank's compute phase).
//! - `quiesce_compute_explicit`: the same program linked with the explicit library instead,
//!   its compute phases declared quiet (`symvirt_quiet_begin/end`, `STRESS_QUIET=1`; the
//!   library's thread cuts them): `quiesce_ms` (same requests and target), and
//!   `quiesce_ms_safe_points_only` (no quiet phases, `SYMVIRT_SAFE_POINT_DEPTH=0`: the cut
//!   waits for a safe point; `NINJA_MPI_COMPUTE_REQUESTS_WITHOUT` requests).
//! - `quiesce_compute_nb_explicit`: the same with a receive from the left and a large
//!   (rendezvous) send to the right outstanding across every compute phase (`stress.c` mode
//!   `compute_nb`), declared to the phase (`symvirt_quiet_begin_requests`): the library
//!   completes them before each cut.
//!
//! One JSON line per (mpi, scenario); a failed scenario prints a line with `error`. An MPI
//! implementation that is not installed prints `SKIPPED: ...`.
//!
//! Run: `cargo bench --bench mpi_overhead` (`-- --quick` or `NINJA_BENCH_QUICK=1`: a smoke
//! run well under a minute). Knobs: `NINJA_MPI_IMPLS` (`openmpi,mpich`), `NINJA_MPI_PAIRS`,
//! `NINJA_MPI_SAMPLES` (per launch), `NINJA_MPI_LAT_BYTES`, `NINJA_MPI_LAT_ROUNDS`,
//! `NINJA_MPI_AB_PAIRS`, `NINJA_MPI_BW_BYTES`, `NINJA_MPI_BW_ROUNDS`, `NINJA_MPI_QUIESCE_REQUESTS`,
//! `NINJA_MPI_STRESS_MODES`, `NINJA_MPI_COMPUTE_MS`, `NINJA_MPI_COMPUTE_REQUESTS`,
//! `NINJA_MPI_COMPUTE_REQUESTS_WITHOUT`, `NINJA_MPI_COLL_LAUNCHES`, `NINJA_MPI_COLL_PAIRS`,
//! `NINJA_MPI_COLL_ROUNDS`, `NINJA_MPI_SCENARIOS` (`pingpong,collectives,quiesce,
//! quiesce_compute,quiesce_compute_explicit,quiesce_compute_nb_explicit`),
//! `NINJA_MPI_QUIET_WAIT_S` (default 60, 0 in quick mode: before each
//! pair of launches, wait at most this long for the shared CPUs to be idle;
//! `pairs_started_quiet` in the line says how many pairs got such a window).

// The pingpong scenario's JSON line has more fields than json!'s default recursion allows.
#![recursion_limit = "256"]

// The symvirt-mpi tests' rig (library and program builds, guest agent with a host channel,
// MPI jobs killed on drop): one copy, used by those tests and by this bench.
#[path = "../symvirt/mpi/tests/common/mod.rs"]
mod common;

use common::{Jitter, Job, RANKS, Rig, ethernet, libraries, outcome_while_running, program};
use serde_json::{Value, json};
use std::panic::AssertUnwindSafe;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use symvirt::protocol::GuestMessage;
use symvirt_mpi::mpi_build::{Linkage, MpiImpl};

/// The targets for the normal-run overhead.
const LATENCY_RATIO_MAX: f64 = 1.05;
const BANDWIDTH_RATIO_MIN: f64 = 0.98;
/// The target for a cut of ranks that compute (p95 of `quiesce_ms`).
const COMPUTE_QUIESCE_P95_MAX_MS: f64 = 50.0;

#[derive(Debug, Clone)]
struct Settings {
    quick: bool,
    impls: Vec<MpiImpl>,
    pairs: usize,
    samples: usize,
    lat_bytes: usize,
    lat_rounds: usize,
    ab_pairs: usize,
    bw_bytes: usize,
    bw_rounds: usize,
    quiesce_requests: u64,
    stress_modes: String,
    compute_ms: u64,
    compute_requests: u64,
    compute_requests_without: u64,
    scenarios: Vec<String>,
    quiet_wait: Duration,
    coll_launches: usize,
    coll_pairs: usize,
    coll_rounds: usize,
}

fn env_or<T: std::str::FromStr>(name: &str, fallback: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v.trim().parse().unwrap_or_else(|_| {
            eprintln!("mpi_overhead: ignoring {name}={v:?} (not a number)");
            fallback
        }),
        _ => fallback,
    }
}

impl Settings {
    fn from_env() -> Settings {
        let quick = std::env::args().any(|a| a == "--quick")
            || std::env::var("NINJA_BENCH_QUICK").is_ok_and(|v| v == "1");
        let pick = |full: usize, smoke: usize| if quick { smoke } else { full };
        let impls = match std::env::var("NINJA_MPI_IMPLS") {
            Ok(list) => MpiImpl::ALL
                .into_iter()
                .filter(|m| list.split(',').any(|n| n.trim() == m.name()))
                .collect(),
            Err(_) => MpiImpl::ALL.to_vec(),
        };
        Settings {
            quick,
            impls,
            pairs: env_or("NINJA_MPI_PAIRS", pick(21, 3)).max(1),
            samples: env_or("NINJA_MPI_SAMPLES", pick(3, 3)).max(1),
            lat_bytes: env_or("NINJA_MPI_LAT_BYTES", 8),
            lat_rounds: env_or("NINJA_MPI_LAT_ROUNDS", pick(50_000, 20_000)).max(1),
            ab_pairs: env_or("NINJA_MPI_AB_PAIRS", pick(600, 100)).max(1),
            bw_bytes: env_or("NINJA_MPI_BW_BYTES", 1 << 20).max(1),
            bw_rounds: env_or("NINJA_MPI_BW_ROUNDS", pick(300, 60)).max(1),
            quiesce_requests: env_or("NINJA_MPI_QUIESCE_REQUESTS", pick(15, 4) as u64).max(1),
            stress_modes: std::env::var("NINJA_MPI_STRESS_MODES")
                .unwrap_or_else(|_| "ring,ring_nb,alltoall,anysource,collective".into()),
            compute_ms: env_or("NINJA_MPI_COMPUTE_MS", pick(5000, 1000) as u64).max(1),
            compute_requests: env_or("NINJA_MPI_COMPUTE_REQUESTS", pick(20, 4) as u64).max(1),
            compute_requests_without: env_or(
                "NINJA_MPI_COMPUTE_REQUESTS_WITHOUT",
                pick(5, 2) as u64,
            ),
            scenarios: std::env::var("NINJA_MPI_SCENARIOS")
                .unwrap_or_else(|_| {
                    "pingpong,collectives,quiesce,quiesce_compute,quiesce_compute_explicit,\
                     quiesce_compute_nb_explicit"
                        .into()
                })
                .split(',')
                .map(|x| x.trim().to_string())
                .collect(),
            quiet_wait: Duration::from_secs(env_or("NINJA_MPI_QUIET_WAIT_S", pick(60, 0) as u64)),
            coll_launches: env_or("NINJA_MPI_COLL_LAUNCHES", pick(6, 2)).max(1),
            coll_pairs: env_or("NINJA_MPI_COLL_PAIRS", pick(40, 10)).max(1),
            coll_rounds: env_or("NINJA_MPI_COLL_ROUNDS", pick(2000, 500)).max(1),
        }
    }
}

/// Why `mpi` cannot run here, if it cannot.
fn missing(mpi: MpiImpl) -> Option<String> {
    let launcher = mpi.launcher(1, &[]).get_program().to_owned();
    for tool in [std::ffi::OsString::from(mpi.mpicc()), launcher] {
        let ok = Command::new(&tool)
            .arg("--version")
            .stdin(Stdio::null())
            .output()
            .is_ok_and(|o| o.status.success());
        if !ok {
            return Some(format!("{} not installed", tool.to_string_lossy()));
        }
    }
    None
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// The nearest-rank 95th percentile.
fn p95(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n => s[((n as f64 * 0.95).ceil() as usize).clamp(1, n) - 1],
    }
}

/// Median, p95, min and max, rounded for the JSON line.
fn spread(v: &[f64]) -> Value {
    let min = v.iter().copied().fold(f64::INFINITY, f64::min);
    let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    json!({"median": round(median(v)), "p95": round(p95(v)), "min": round(min), "max": round(max), "n": v.len()})
}

fn round(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// Busy and total jiffies of all CPUs so far (`/proc/stat`).
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let v: Vec<u64> = stat
        .lines()
        .next()?
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().sum();
    let idle = v.get(3)? + v.get(4).unwrap_or(&0);
    Some((total - idle, total))
}

/// Waits (at most `max`) for a window of 300 ms in which the CPUs were at least 90% idle: this
/// machine is shared, and a ping-pong that loses its core to another process for a moment
/// measures the scheduler, not the layer. Returns whether such a window came.
fn wait_quiet(max: Duration) -> bool {
    let end = Instant::now() + max;
    loop {
        let Some(a) = cpu_jiffies() else { return false };
        std::thread::sleep(Duration::from_millis(300));
        let Some(b) = cpu_jiffies() else { return false };
        let busy = (b.0 - a.0) as f64 / (b.1 - a.1).max(1) as f64;
        if busy <= 0.10 {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
    }
}

/// One launch's samples: one-way latency (µs) and bandwidth (MiB/s, bytes moved both ways);
/// its sets of latency blocks; per pair of bandwidth blocks, bandwidth through / around the
/// wrappers; per pair of blocks of receives of arrived messages, the ratio and the nanoseconds
/// per receive around and through the wrappers.
#[derive(Default)]
struct Launch {
    latency_us: Vec<f64>,
    bandwidth_mib_s: Vec<f64>,
    sets: Vec<Set>,
    bandwidth_through_around: Vec<f64>,
    arrived_ratio: Vec<f64>,
    arrived_ns: [Vec<f64>; 2],
}

/// The number after `key=` in a line of a program's output.
fn field_of(line: &str, key: &str) -> Result<f64, String> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no {key}= in {line:?}"))
}

/// Without and with the layer, or the other way round: A B, B A, ... (neither variant always
/// runs first).
fn preload_order(i: usize) -> [bool; 2] {
    if i % 2 == 0 {
        [false, true]
    } else {
        [true, false]
    }
}

/// Parses `sample N latency|bandwidth bytes=B rounds=R seconds=S`,
/// `ab N bytes=B rounds=R through=S around=S request=S polled=S`,
/// `bw N bytes=B rounds=R through=S around=S` and `arrived N count=K through=S around=S` lines.
fn parse_samples(stdout: &str) -> Result<Launch, String> {
    let mut out = Launch::default();
    for line in stdout.lines() {
        let field = |key: &str| field_of(line, key);
        let one_way_us = |seconds: f64, rounds: f64| -> Result<f64, String> {
            if seconds <= 0.0 {
                return Err(format!("non-positive time in {line:?}"));
            }
            Ok(seconds / rounds / 2.0 * 1e6)
        };
        if line.starts_with("arrived ") {
            let count = field("count")?;
            let (through, around) = (field("through")?, field("around")?);
            if through <= 0.0 || around <= 0.0 || count <= 0.0 {
                return Err(format!("non-positive time or count in {line:?}"));
            }
            out.arrived_ratio.push(through / around);
            out.arrived_ns[0].push(around / count * 1e9);
            out.arrived_ns[1].push(through / count * 1e9);
        } else if line.starts_with("bw ") {
            let (through, around) = (field("through")?, field("around")?);
            if through <= 0.0 || around <= 0.0 {
                return Err(format!("non-positive time in {line:?}"));
            }
            // Bandwidth through / around the wrappers: the inverse ratio of the times.
            out.bandwidth_through_around.push(around / through);
        } else if line.starts_with("ab ") {
            let rounds = field("rounds")?;
            let through = one_way_us(field("through")?, rounds)?;
            let around = one_way_us(field("around")?, rounds)?;
            out.sets.push(Set {
                around_us: around,
                ratios: [
                    through / around,
                    one_way_us(field("request")?, rounds)? / around,
                    one_way_us(field("polled")?, rounds)? / around,
                ],
            });
        } else if line.starts_with("sample ") {
            let (bytes, rounds) = (field("bytes")?, field("rounds")?);
            let seconds = field("seconds")?;
            if line.contains(" latency ") {
                out.latency_us.push(one_way_us(seconds, rounds)?);
            } else if line.contains(" bandwidth ") {
                one_way_us(seconds, rounds)?;
                out.bandwidth_mib_s
                    .push(2.0 * bytes * rounds / seconds / (1u64 << 20) as f64);
            }
        }
    }
    if out.latency_us.is_empty()
        || out.bandwidth_mib_s.is_empty()
        || out.sets.is_empty()
        || out.arrived_ratio.is_empty()
        || out.bandwidth_through_around.is_empty()
    {
        return Err(format!("no samples in the output:\n{stdout}"));
    }
    Ok(out)
}

/// One set of latency blocks a millisecond apart in one process: the one-way latency around
/// the layer's wrappers (µs), and the ratios to it of the blocks through them (`THROUGH`) and
/// of the receive's two floors (`REQUEST`, `POLLED`).
struct Set {
    around_us: f64,
    ratios: [f64; 3],
}

impl Set {
    /// The ratios of the blocks made of MPI's calls alone (the floors) to `around`, and 1 for
    /// `around` itself: what tells the machine's state apart from the layer's cost.
    fn mpi_only(&self) -> [f64; 3] {
        [1.0, self.ratios[REQUEST], self.ratios[POLLED]]
    }

    /// The fastest of the set's blocks made of MPI's calls alone, one way (µs).
    fn fastest_us(&self) -> f64 {
        self.around_us * self.mpi_only().into_iter().fold(f64::INFINITY, f64::min)
    }

    /// Whether the set ran in one regime, undisturbed: none of its blocks made of MPI's calls
    /// alone over 1.5x another (a block the scheduler preempted, or a regime switch within the
    /// set). The block through the layer is left out, so that the layer's cost, however large,
    /// neither makes a set unsteady nor moves it to another regime. The regimes are found and
    /// reported from such sets only.
    fn steady(&self) -> bool {
        let slowest = self.mpi_only().into_iter().fold(0.0, f64::max);
        self.around_us * slowest <= 1.5 * self.fastest_us()
    }
}

const THROUGH: usize = 0;
const REQUEST: usize = 1;
const POLLED: usize = 2;

/// Where the machine's fast speed regime ends (µs one way, a steady set's fastest block): two
/// clusters of the steady sets' latencies (2-means on their logarithms), when their centres
/// are more than 2x apart and each holds at least `MIN_REGIME_SETS` sets (they were about
/// 0.17 and 0.45 us here); the boundary is the geometric mean of the centres. Else infinite:
/// one regime. A fast episode of this machine lasts a few seconds at most, so sets
/// (milliseconds) see it where whole launches mostly do not.
fn fast_below_us(sets: &[&Set]) -> f64 {
    let logs: Vec<f64> = sets
        .iter()
        .filter(|s| s.steady())
        .map(|s| s.fastest_us().ln())
        .collect();
    let (Some(lo), Some(hi)) = (
        logs.iter().copied().reduce(f64::min),
        logs.iter().copied().reduce(f64::max),
    ) else {
        return f64::INFINITY;
    };
    let (mut fast, mut slow) = (lo, hi);
    let mut counts = (0, 0);
    for _ in 0..50 {
        let split = (fast + slow) / 2.0;
        let (f, s): (Vec<f64>, Vec<f64>) = logs.iter().partition(|&&l| l < split);
        if f.is_empty() || s.is_empty() {
            return f64::INFINITY;
        }
        fast = f.iter().sum::<f64>() / f.len() as f64;
        slow = s.iter().sum::<f64>() / s.len() as f64;
        counts = (f.len(), s.len());
    }
    let apart = slow - fast > 2f64.ln();
    if apart && counts.0 >= MIN_REGIME_SETS && counts.1 >= MIN_REGIME_SETS {
        ((fast + slow) / 2.0).exp()
    } else {
        f64::INFINITY
    }
}

/// The fewest sets (of both variants) a cluster needs to count as a speed regime. A regime's
/// ratios are then reported from the sets with the layer alone, with their number (`n`).
const MIN_REGIME_SETS: usize = 20;

/// Ratio `k` of the steady ones of `sets`, per speed regime: `fast` and `slow` split at
/// `fast_below_us`, or `single`.
fn by_regime(sets: &[&Set], k: usize, fast_below_us: f64) -> Value {
    let ratios = |keep: &dyn Fn(&Set) -> bool| -> Value {
        let r: Vec<f64> = sets
            .iter()
            .filter(|s| s.steady() && keep(s))
            .map(|s| s.ratios[k])
            .collect();
        if r.is_empty() {
            Value::Null
        } else {
            spread(&r)
        }
    };
    if fast_below_us.is_infinite() {
        json!({"single": ratios(&|_| true)})
    } else {
        json!({
            "fast": ratios(&|s| s.fastest_us() < fast_below_us),
            "slow": ratios(&|s| s.fastest_us() >= fast_below_us),
        })
    }
}

/// Runs the 2-rank ping-pong once, with or without the layer preloaded.
fn pingpong_launch(mpi: MpiImpl, s: &Settings, rig: &Rig, preload: bool) -> Result<Launch, String> {
    let libs = libraries(mpi);
    let prog = program(mpi, "pingpong.c", Linkage::Plain);
    let mut env = vec![rig.agent_env()];
    if preload {
        env.push((
            "LD_PRELOAD".to_string(),
            libs.transparent.display().to_string(),
        ));
    }
    let args = [
        s.samples,
        s.lat_bytes,
        s.lat_rounds,
        s.bw_bytes,
        s.bw_rounds,
        s.ab_pairs,
    ]
    .map(|n| n.to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut job = Job::start_ranks(mpi, 2, &prog, &args, &env, &rig.dir.0);
    let (ok, stdout) = job.wait();
    if !ok {
        return Err(format!("pingpong failed\n{}", job.logs()));
    }
    parse_samples(&stdout)
}

fn pingpong(mpi: MpiImpl, s: &Settings) -> Result<Value, String> {
    let rig = Rig::new(&format!("bench-pp-{}", mpi.name()));
    let (mut lat, mut bw) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    let (mut lat_pairs, mut bw_pairs) = (Vec::new(), Vec::new());
    let mut lat_fastest_pairs = Vec::new();
    // Per launch, without and with the layer: (median through / around, median around, µs).
    let mut ab: [Vec<(f64, f64)>; 2] = [Vec::new(), Vec::new()];
    // Every set of blocks, without and with the layer.
    let mut sets: [Vec<Set>; 2] = [Vec::new(), Vec::new()];
    // Per launch, without and with the layer: median bandwidth through / around the wrappers.
    let mut bw_in_process: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    // Per launch, without and with the layer: median (through / around, ns around, ns through)
    // of the receives of arrived messages.
    let mut arrived: [Vec<[f64; 3]>; 2] = [Vec::new(), Vec::new()];
    let mut around_pairs = Vec::new();
    let mut quiet_pairs = 0;
    for pair in 0..s.pairs {
        quiet_pairs += wait_quiet(s.quiet_wait) as usize;
        let mut pair_median = [(0.0, 0.0); 2];
        let mut pair_fastest = [0.0; 2];
        for preload in preload_order(pair) {
            let run = pingpong_launch(mpi, s, &rig, preload)?;
            let i = preload as usize;
            pair_median[i] = (median(&run.latency_us), median(&run.bandwidth_mib_s));
            pair_fastest[i] = run.latency_us.iter().copied().fold(f64::INFINITY, f64::min);
            let of_sets = |f: fn(&Set) -> f64| run.sets.iter().map(f).collect::<Vec<_>>();
            ab[i].push((
                median(&of_sets(|s| s.ratios[THROUGH])),
                median(&of_sets(|s| s.around_us)),
            ));
            sets[i].extend(run.sets);
            bw_in_process[i].push(median(&run.bandwidth_through_around));
            arrived[i].push([
                median(&run.arrived_ratio),
                median(&run.arrived_ns[0]),
                median(&run.arrived_ns[1]),
            ]);
            lat[i].extend(run.latency_us);
            bw[i].extend(run.bandwidth_mib_s);
        }
        lat_pairs.push(pair_median[1].0 / pair_median[0].0);
        lat_fastest_pairs.push(pair_fastest[1] / pair_fastest[0]);
        bw_pairs.push(pair_median[1].1 / pair_median[0].1);
        let n = ab[1].len();
        around_pairs.push(ab[1][n - 1].1 / ab[0][n - 1].1);
    }
    let latency_ratio = median(&lat_pairs);
    let bandwidth_ratio = median(&bw_pairs);
    let bandwidth_in_process = median(&bw_in_process[1]);
    // The speed regimes, from every set of either variant.
    let all_sets: Vec<&Set> = sets.iter().flatten().collect();
    let fast_below = fast_below_us(&all_sets);
    let with: Vec<&Set> = sets[1].iter().collect();
    let without: Vec<&Set> = sets[0].iter().collect();
    let launch_ratios = |i: usize| ab[i].iter().map(|l| l.0).collect::<Vec<_>>();
    let through_by_regime = by_regime(&with, THROUGH, fast_below);
    // Every regime the launches with the layer ran in is within the target, and they ran in
    // one at least (a regime seen only without the layer has no ratio).
    let regimes_within = through_by_regime.as_object().is_some_and(|regimes| {
        let medians: Vec<f64> = regimes
            .values()
            .filter_map(|r| r["median"].as_f64())
            .collect();
        !medians.is_empty() && medians.iter().all(|&m| m <= LATENCY_RATIO_MAX)
    });
    // `ratio`: the median over every set of the launches with the layer (where MPI runs at the
    // layer's thread level, as in the blocks through it).
    let floor = |k: usize| {
        let ratios: Vec<f64> = with.iter().map(|s| s.ratios[k]).collect();
        json!({"ratio": round(median(&ratios)), "by_regime": by_regime(&with, k, fast_below)})
    };
    let latency_floors = json!({"request": floor(REQUEST), "polled": floor(POLLED)});
    let arrived_of =
        |with: usize, k: usize| -> Vec<f64> { arrived[with].iter().map(|a| a[k]).collect() };
    Ok(json!({
        "bench": "mpi_overhead",
        "mpi": mpi.name(),
        "scenario": "pingpong",
        "quick": s.quick,
        "pairs": s.pairs,
        "pairs_started_quiet": quiet_pairs,
        "samples_per_launch": s.samples,
        "latency_bytes": s.lat_bytes,
        "latency_rounds": s.lat_rounds,
        "ab_pairs_per_launch": s.ab_pairs,
        "bandwidth_bytes": s.bw_bytes,
        "bandwidth_rounds": s.bw_rounds,
        "latency_us_without": spread(&lat[0]),
        "latency_us_with": spread(&lat[1]),
        "bandwidth_mib_s_without": spread(&bw[0]),
        "bandwidth_mib_s_with": spread(&bw[1]),
        "latency_ratio": round(latency_ratio),
        "bandwidth_ratio": round(bandwidth_ratio),
        "bandwidth_ratio_in_process": round(bandwidth_in_process),
        "bandwidth_ratio_in_process_control": round(median(&bw_in_process[0])),
        "latency_ratio_pooled": round(median(&lat[1]) / median(&lat[0])),
        "bandwidth_ratio_pooled": round(median(&bw[1]) / median(&bw[0])),
        "latency_ratio_per_pair": spread(&lat_pairs),
        "latency_ratio_fastest": round(median(&lat_fastest_pairs)),
        "latency_ratio_fastest_per_pair": spread(&lat_fastest_pairs),
        "latency_ratio_in_process": round(median(&launch_ratios(1))),
        "latency_ratio_in_process_by_regime": through_by_regime,
        "latency_ratio_in_process_per_launch": spread(&launch_ratios(1)),
        "latency_ratio_in_process_control": round(median(&launch_ratios(0))),
        "latency_ratio_in_process_control_by_regime": by_regime(&without, THROUGH, fast_below),
        "latency_ratio_in_process_fast_below_us": round(fast_below.min(1e9)),
        "latency_floors_in_process": latency_floors,
        // Per launch with the layer: [latency around the wrappers (µs), ratio].
        "latency_in_process_launches": ab[1].iter().map(|l| [round(l.1), round(l.0)]).collect::<Vec<_>>(),
        "latency_us_around_with": spread(&ab[1].iter().map(|l| l.1).collect::<Vec<_>>()),
        "latency_ratio_around": round(median(&around_pairs)),
        "bandwidth_ratio_per_pair": spread(&bw_pairs),
        "arrived_receive_ratio": round(median(&arrived_of(1, 0))),
        "arrived_receive_ratio_control": round(median(&arrived_of(0, 0))),
        "arrived_receive_ns_around_with": spread(&arrived_of(1, 1)),
        "arrived_receive_ns_through": spread(&arrived_of(1, 2)),
        "latency_ratio_target_max": LATENCY_RATIO_MAX,
        "bandwidth_ratio_target_min": BANDWIDTH_RATIO_MIN,
        "within_targets": regimes_within && bandwidth_in_process >= BANDWIDTH_RATIO_MIN,
    }))
}

/// One collbench launch: per form, per pair, (seconds through, seconds around) per collective.
fn collbench_launch(
    mpi: MpiImpl,
    s: &Settings,
    rig: &Rig,
    preload: bool,
) -> Result<std::collections::BTreeMap<String, Vec<(f64, f64)>>, String> {
    let prog = program(mpi, "collbench.c", Linkage::Plain);
    let mut env = vec![rig.agent_env()];
    if preload {
        env.push((
            "LD_PRELOAD".to_string(),
            libraries(mpi).transparent.display().to_string(),
        ));
    }
    let args = [s.coll_pairs.to_string(), s.coll_rounds.to_string()];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut job = Job::start_ranks(mpi, 2, &prog, &args, &env, &rig.dir.0);
    let (ok, stdout) = job.wait();
    if !ok {
        return Err(format!("collbench failed\n{}", job.logs()));
    }
    let mut forms = std::collections::BTreeMap::<String, Vec<(f64, f64)>>::new();
    for line in stdout.lines().filter(|l| l.starts_with("ab ")) {
        let field = |key: &str| field_of(line, key);
        let form = line.split_whitespace().nth(1).unwrap_or("?").to_string();
        let rounds = field("rounds")?;
        let (through, around) = (field("through")? / rounds, field("around")? / rounds);
        if through <= 0.0 || around <= 0.0 {
            return Err(format!("non-positive time in {line:?}"));
        }
        forms.entry(form).or_default().push((through, around));
    }
    if forms.is_empty() {
        return Err(format!("no samples in the output:\n{stdout}"));
    }
    Ok(forms)
}

/// What the layer costs an 8-byte Allreduce, blocking, non-blocking and persistent (MPI 4):
/// 2 ranks, in one process through the layer's wrappers and around them (PMPI), as the
/// in-process latency estimate; launches with the layer alternate with launches without it
/// (their ratio is the estimate's own noise, `_control`).
fn collectives(mpi: MpiImpl, s: &Settings) -> Result<Value, String> {
    let rig = Rig::new(&format!("bench-coll-{}", mpi.name()));
    // Per form: per launch with / without the layer, (median ratio, median µs through, median
    // µs around).
    let mut per_form = std::collections::BTreeMap::<String, [Vec<(f64, f64, f64)>; 2]>::new();
    let mut quiet = 0;
    for launch in 0..s.coll_launches {
        quiet += wait_quiet(s.quiet_wait) as usize;
        for preload in preload_order(launch) {
            for (form, pairs) in collbench_launch(mpi, s, &rig, preload)? {
                let ratios: Vec<f64> = pairs.iter().map(|p| p.0 / p.1).collect();
                let through: Vec<f64> = pairs.iter().map(|p| p.0 * 1e6).collect();
                let around: Vec<f64> = pairs.iter().map(|p| p.1 * 1e6).collect();
                per_form.entry(form).or_default()[preload as usize].push((
                    median(&ratios),
                    median(&through),
                    median(&around),
                ));
            }
        }
    }
    let forms: serde_json::Map<String, Value> = per_form
        .into_iter()
        .map(|(form, [without, with])| {
            let col = |v: &[(f64, f64, f64)], k: usize| -> Vec<f64> {
                v.iter().map(|l| [l.0, l.1, l.2][k]).collect::<Vec<f64>>()
            };
            (
                form,
                json!({
                    "ratio": round(median(&col(&with, 0))),
                    "ratio_per_launch": spread(&col(&with, 0)),
                    "us_through": spread(&col(&with, 1)),
                    "us_around": spread(&col(&with, 2)),
                    "ratio_control": round(median(&col(&without, 0))),
                }),
            )
        })
        .collect();
    Ok(json!({
        "bench": "mpi_overhead",
        "mpi": mpi.name(),
        "scenario": "collectives",
        "quick": s.quick,
        "ranks": 2,
        "launches": s.coll_launches,
        "launches_started_quiet": quiet,
        "pairs_per_launch": s.coll_pairs,
        "rounds_per_block": s.coll_rounds,
        "forms": forms,
    }))
}

/// Sends `prepare` for `epoch` and waits for the agent's answer; returns the time to it.
fn quiesce_once(rig: &Rig, job: &mut Job, epoch: u64) -> Result<Duration, String> {
    let asked = Instant::now();
    rig.prepare(epoch);
    let took = match outcome_while_running(rig, job) {
        GuestMessage::Quiesced { epoch: e } if e == epoch => asked.elapsed(),
        other => return Err(format!("epoch {epoch}: expected quiesced, got {other:?}")),
    };
    let ic = ethernet((epoch % 250) as u8);
    rig.resume(epoch, ic);
    match outcome_while_running(rig, job) {
        GuestMessage::Resumed { epoch: e, .. } if e == epoch => Ok(took),
        other => Err(format!("epoch {epoch}: expected resumed, got {other:?}")),
    }
}

/// Runs the stress program with `modes` (and `extra_env`) under the layer (`Linkage::Plain`)
/// or linked with the explicit library (`Linkage::Explicit`), sends `requests`
/// migration requests after the pauses `gap` picks, and returns the request-to-quiesced times
/// in milliseconds; the program's own checks must pass at the end.
fn quiesce_times(
    mpi: MpiImpl,
    label: &str,
    linkage: Linkage,
    modes: &str,
    extra_env: &[(&str, String)],
    requests: u64,
    mut gap: impl FnMut(u64) -> Duration,
) -> Result<Vec<f64>, String> {
    let rig = Rig::new(&format!("bench-{label}-{}", mpi.name()));
    let prog = program(mpi, "stress.c", linkage);
    let work = rig.dir.0.join("work");
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let mut env = match linkage {
        Linkage::Explicit => vec![rig.agent_env()],
        _ => rig.transparent_env(mpi),
    };
    env.extend(extra_env.iter().map(|(k, v)| (k.to_string(), v.clone())));
    let work_arg = work.display().to_string();
    let args = [modes, work_arg.as_str(), "2"];
    let mut job = Job::start(mpi, &prog, &args, &env, &rig.dir.0);
    // Epoch 1 is a warm-up, untimed: it also waits until every rank has connected.
    quiesce_once(&rig, &mut job, 1)?;
    let mut times = Vec::new();
    for epoch in 2..2 + requests {
        std::thread::sleep(gap(epoch));
        let took =
            quiesce_once(&rig, &mut job, epoch).map_err(|e| format!("{e}\n{}", job.logs()))?;
        times.push(took.as_secs_f64() * 1000.0);
    }
    std::fs::write(work.join("stop"), "").map_err(|e| format!("stop file: {e}"))?;
    let (ok, out) = job.wait();
    let oks = out.lines().filter(|l| l.contains(" OK rank ")).count();
    if !ok || oks != RANKS as usize {
        return Err(format!("stress program failed its checks\n{}", job.logs()));
    }
    Ok(times)
}

fn quiesce(mpi: MpiImpl, s: &Settings) -> Result<Value, String> {
    // Requests land wherever the ranks are: vary the moment.
    let times = quiesce_times(
        mpi,
        "q",
        Linkage::Plain,
        &s.stress_modes,
        &[],
        s.quiesce_requests,
        |epoch| Duration::from_millis(20 + 37 * (epoch % 5)),
    )?;
    Ok(json!({
        "bench": "mpi_overhead",
        "mpi": mpi.name(),
        "scenario": "quiesce",
        "quick": s.quick,
        "ranks": RANKS,
        "stress_modes": s.stress_modes,
        "requests": s.quiesce_requests,
        "quiesce_ms": spread(&times),
    }))
}

fn quiesce_compute(mpi: MpiImpl, s: &Settings) -> Result<Value, String> {
    compute_bound(
        mpi,
        s,
        Variants {
            scenario: "quiesce_compute",
            modes: "compute,collective",
            linkage: Linkage::Plain,
            seed: 0x9e37_79b9_7f4a_7c15,
            fast: ("SYMVIRT_PROGRESS_THREAD", "1"),
            slow: ("SYMVIRT_PROGRESS_THREAD", "0"),
            slow_field: "quiesce_ms_without_progress_thread",
        },
    )
}

/// `quiesce_compute` for a program linked with the explicit library: its compute phases are
/// quiet phases (`STRESS_QUIET=1`), cut by the library's thread; next to it the same program
/// without quiet phases, cut at a safe point (`SYMVIRT_SAFE_POINT_DEPTH=0`: the first or
/// second after the request), as before.
fn quiesce_compute_explicit(mpi: MpiImpl, s: &Settings) -> Result<Value, String> {
    compute_bound(
        mpi,
        s,
        explicit_variants(
            "quiesce_compute_explicit",
            "compute,collective",
            0x51_7cc1_b727_220a,
        ),
    )
}

/// `quiesce_compute_explicit` with requests outstanding across every compute phase, declared
/// to it (`compute_nb`: `symvirt_quiet_begin_requests`).
fn quiesce_compute_nb_explicit(mpi: MpiImpl, s: &Settings) -> Result<Value, String> {
    compute_bound(
        mpi,
        s,
        explicit_variants(
            "quiesce_compute_nb_explicit",
            "compute_nb,collective",
            0x2545_f491_4f6c_dd1d,
        ),
    )
}

/// The explicit library's variants: quiet phases against safe points only.
fn explicit_variants(scenario: &'static str, modes: &'static str, seed: u64) -> Variants {
    Variants {
        scenario,
        modes,
        linkage: Linkage::Explicit,
        seed,
        fast: ("STRESS_QUIET", "1"),
        slow: ("SYMVIRT_SAFE_POINT_DEPTH", "0"),
        slow_field: "quiesce_ms_safe_points_only",
    }
}

/// A compute-bound scenario: the stress program (`modes`) linked as `linkage`, cut at random
/// moments with the `fast` setting (`compute_requests` times) and with the `slow` one
/// (`compute_requests_without` times, reported as `slow_field`).
struct Variants {
    scenario: &'static str,
    modes: &'static str,
    linkage: Linkage,
    seed: u64,
    fast: (&'static str, &'static str),
    slow: (&'static str, &'static str),
    slow_field: &'static str,
}

fn compute_bound(mpi: MpiImpl, s: &Settings, v: Variants) -> Result<Value, String> {
    // Moments spread over the compute phases (a fixed pseudo-random sequence).
    let mut jitter = Jitter::seeded(v.seed);
    let mut random_gap = move |_| Duration::from_millis(jitter.ms(300, 3000));
    let compute = ("STRESS_COMPUTE_MS", s.compute_ms.to_string());
    let label = |suffix: &str| format!("{}{suffix}", v.scenario);
    let fast = quiesce_times(
        mpi,
        &label(""),
        v.linkage,
        v.modes,
        &[compute.clone(), (v.fast.0, v.fast.1.to_string())],
        s.compute_requests,
        &mut random_gap,
    )?;
    let slow = if s.compute_requests_without > 0 {
        let times = quiesce_times(
            mpi,
            &label("-slow"),
            v.linkage,
            v.modes,
            &[compute, (v.slow.0, v.slow.1.to_string())],
            s.compute_requests_without,
            &mut random_gap,
        )?;
        spread(&times)
    } else {
        Value::Null
    };
    let mut line = json!({
        "bench": "mpi_overhead",
        "mpi": mpi.name(),
        "scenario": v.scenario,
        "quick": s.quick,
        "ranks": RANKS,
        "stress_modes": v.modes,
        "compute_ms": s.compute_ms,
        "requests": s.compute_requests,
        "quiesce_ms": spread(&fast),
        "p95_target_max_ms": COMPUTE_QUIESCE_P95_MAX_MS,
        "within_target": p95(&fast) <= COMPUTE_QUIESCE_P95_MAX_MS,
    });
    line[v.slow_field] = slow;
    Ok(line)
}

/// Runs one scenario; a failure (error or panic inside the rig) becomes an `error` line.
fn report(mpi: MpiImpl, scenario: &str, run: impl FnOnce() -> Result<Value, String>) {
    let line = match std::panic::catch_unwind(AssertUnwindSafe(run)) {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => {
            json!({"bench": "mpi_overhead", "mpi": mpi.name(), "scenario": scenario, "error": e})
        }
        Err(panic) => {
            let e = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".into());
            json!({"bench": "mpi_overhead", "mpi": mpi.name(), "scenario": scenario, "error": e})
        }
    };
    println!("{line}");
}

fn main() {
    let s = Settings::from_env();
    let mut ran = 0;
    for mpi in s.impls.clone() {
        if let Some(why) = missing(mpi) {
            println!("SKIPPED: bench mpi_overhead ({}): {why}", mpi.name());
            continue;
        }
        ran += 1;
        let wanted = |name: &str| s.scenarios.iter().any(|x| x == name);
        if wanted("pingpong") {
            report(mpi, "pingpong", || pingpong(mpi, &s));
        }
        if wanted("collectives") {
            report(mpi, "collectives", || collectives(mpi, &s));
        }
        if wanted("quiesce") {
            report(mpi, "quiesce", || quiesce(mpi, &s));
        }
        if wanted("quiesce_compute") {
            report(mpi, "quiesce_compute", || quiesce_compute(mpi, &s));
        }
        if wanted("quiesce_compute_explicit") {
            report(mpi, "quiesce_compute_explicit", || {
                quiesce_compute_explicit(mpi, &s)
            });
        }
        if wanted("quiesce_compute_nb_explicit") {
            report(mpi, "quiesce_compute_nb_explicit", || {
                quiesce_compute_nb_explicit(mpi, &s)
            });
        }
    }
    if ran == 0 {
        println!("SKIPPED: bench mpi_overhead: no MPI implementation to run");
    }
}
