//! Ninja on the real virtual cluster (`tests/cluster_rig`): Linux guests under QEMU TCG in a
//! network namespace, an MPI job of 2 ranks per guest talking TCP between the guests' data
//! addresses, moved between fabric A (the HCA STAND-IN) and fabric B by `ninja-migrate plan run`.
//!
//! - `migration`, per cluster size (2, 4 VMs) and guest memory (256, 512 MiB): one booted
//!   cluster running `stress` under the transparent layer (Open MPI), and per repetition one
//!   move to the other fabric (alternating A->B, B->A, ...) next to one plain migration of the
//!   same VMs (QEMU's migration alone, no quiesce, no device swap: destinations launched in the
//!   namespace with `-incoming defer`, every VM migrated at once over unix sockets, timed from
//!   the first `migrate` to the last `completed`; the rig's plans migrate at most 2 VMs at
//!   once, `max_parallel = 2`; both use QEMU's default bandwidth). Plain migrations run while
//!   the VMs are on fabric B, since A's stand-in blocks migration: a repetition starting on A
//!   moves first, one starting on B migrates plainly first. The job must move 1 MiB on its
//!   fabric before each of them, and must pass its own checks at the end (`job_ok`; null when
//!   the guest could not be asked).
//!   `job_visible_pause_ms` is the time from the quiesce phase's end (every rank at the cut) to
//!   the resume phase's end (every rank released), both taken from the arrival of the
//!   `phase_finished` lines of `plan run --json`; `quiesce_start_to_resume_end_ms` starts at
//!   the quiesce phase's `phase_started` line. `pause_minus_plain_ms` is the median over the
//!   repetitions of (pause - plain migration of that repetition); for 2 VMs `target_holds`
//!   says whether it is at most `TARGET_SLACK_MS`.
//! - `memory_scaling`, per cluster size with both memory sizes: the ratios of the 512 MiB
//!   medians to the 256 MiB ones, and whether they are near 2 (within `PROPORTIONAL_TOLERANCE`).
//! - `pingpong`, per MPI: a 2-rank ping-pong (`symvirt/mpi/tests/programs/pingpong.c` on the
//!   job disk), one rank in each of 2 guests over their data addresses, with and without the
//!   transparent layer preloaded, launches interleaved (A B, B A, ...): `latency_ratio` and
//!   `bandwidth_ratio` are medians of per-pair ratios of launch medians, as in
//!   `benches/mpi_overhead.rs`.
//!
//! One JSON line per scenario, medians over the repetitions; a failed scenario prints a line
//! with `error` (and whatever it measured before). Every line carries the host's load average
//! at its start and end (`load_start`, `load_end`): the machine is shared.
//!
//! Fabric B's NIC is on standby (`standby-nic`: the plan switches its link) unless a scenario
//! ends in `-hot` (hot-plugged by the plan, `virtio-net`); `fabric_b_nic` says which. Memory
//! scaling compares standby scenarios.
//!
//! Run: `cargo bench --bench virtual_cluster` (`-- --quick` or `NINJA_BENCH_QUICK=1`: 2 VMs of
//! 256 MiB, standby and hot-plugged, one repetition each, 2 ping-pong pairs, Open MPI only).
//! Knobs: `NINJA_VC_REPS` (3), `NINJA_VC_SCENARIOS` (`2x256,2x256-hot,2x512,4x256,4x512`), `NINJA_VC_PAIRS` (6), `NINJA_VC_MPIS`
//! (`openmpi,mpich`), `NINJA_VC_LAT_ROUNDS` (400), `NINJA_VC_BUDGET_S` (1500: a ping-pong
//! scenario that would, by the last one's time, end after it is skipped with a `SKIPPED:` line),
//! `NINJA_VC_EVENTS=1` (every move's events, with their arrival times, on stderr).
//! The full run takes about 25 minutes on a 2-core machine; `--quick` about 4.

#[path = "../tests/cluster_rig/mod.rs"]
mod cluster_rig;

use cluster_rig::{Fabric, FabricBNic, RANKS_PER_VM, Setup, TimedPlan, VirtualCluster};
use serde_json::{Map, Value, json};
use std::panic::AssertUnwindSafe;
use std::time::{Duration, Instant};
use symvirt_mpi::mpi_build::MpiImpl;

/// The target: job-visible pause at most the plain migration plus this, for 2 VMs.
const TARGET_SLACK_MS: f64 = 1000.0;
/// Twice the memory is "in proportion" when a ratio is within 2 ± this.
const PROPORTIONAL_TOLERANCE: f64 = 0.3;
/// Upper bounds: a plan, a plain migration, the job's traffic between migrations.
const PLAN_LIMIT: Duration = Duration::from_secs(300);
const PLAIN_LIMIT: Duration = Duration::from_secs(180);
const TRAFFIC_LIMIT: Duration = Duration::from_secs(90);
/// Bytes the job moves on its fabric before each migration.
const TRAFFIC: u64 = 1 << 20;
/// A ping-pong launch is killed in the guest after this long.
const LAUNCH_LIMIT_S: u64 = 300;

struct Settings {
    quick: bool,
    reps: usize,
    scenarios: Vec<(usize, u32, FabricBNic)>,
    pairs: usize,
    mpis: Vec<MpiImpl>,
    lat_rounds: usize,
    budget: Duration,
}

fn env_or<T: std::str::FromStr>(name: &str, fallback: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(fallback)
}

impl Settings {
    fn from_env() -> Settings {
        let quick = std::env::args().any(|a| a == "--quick")
            || std::env::var("NINJA_BENCH_QUICK").is_ok_and(|v| v == "1");
        let scenarios = std::env::var("NINJA_VC_SCENARIOS").unwrap_or_else(|_| {
            if quick {
                "2x256,2x256-hot"
            } else {
                "2x256,2x256-hot,2x512,4x256,4x512"
            }
            .into()
        });
        let scenarios = scenarios
            .split(',')
            .filter_map(|s| {
                let (size, nic) = match s.trim().split_once('-') {
                    Some((size, "hot")) => (size, FabricBNic::HotPlugged),
                    Some(_) => return None,
                    None => (s.trim(), FabricBNic::Standby),
                };
                let (vms, mib) = size.split_once('x')?;
                Some((vms.parse().ok()?, mib.parse().ok()?, nic))
            })
            .collect();
        let mpis = std::env::var("NINJA_VC_MPIS")
            .unwrap_or_else(|_| if quick { "openmpi" } else { "openmpi,mpich" }.into());
        Settings {
            quick,
            reps: env_or("NINJA_VC_REPS", if quick { 1 } else { 3 }).max(1),
            scenarios,
            pairs: env_or("NINJA_VC_PAIRS", if quick { 2 } else { 6 }).max(1),
            mpis: MpiImpl::ALL
                .into_iter()
                .filter(|m| mpis.split(',').any(|n| n.trim() == m.name()))
                .collect(),
            lat_rounds: env_or("NINJA_VC_LAT_ROUNDS", 400).max(1),
            budget: Duration::from_secs(env_or("NINJA_VC_BUDGET_S", 25 * 60)),
        }
    }
}

fn median(v: &[f64]) -> Option<f64> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    (n > 0).then(|| (s[(n - 1) / 2] + s[n / 2]) / 2.0)
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

/// The median rounded to 0.1, or null.
fn med(v: &[f64]) -> Value {
    json!(median(v).map(|m| round(m, 1)))
}

/// Every sample rounded to 0.1.
fn rounded(v: &[f64]) -> Vec<f64> {
    v.iter().map(|x| round(*x, 1)).collect()
}

/// Median, min and max (4 decimals) and the count.
fn spread(v: &[f64]) -> Value {
    let min = v.iter().copied().reduce(f64::min);
    let max = v.iter().copied().reduce(f64::max);
    let r = |x: Option<f64>| x.map(|x| round(x, 4));
    json!({"median": r(median(v)), "min": r(min), "max": r(max), "n": v.len()})
}

/// The 1, 5 and 15 minute load averages.
fn load() -> String {
    let avg = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    avg.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
}

fn panic_text(panic: Box<dyn std::any::Any + Send>) -> String {
    match panic.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p
            .downcast_ref::<&str>()
            .map_or("panic".into(), |s| s.to_string()),
    }
}

/// What one scenario measured: named series of samples, and notes for its line.
#[derive(Default)]
struct Measured {
    series: std::collections::BTreeMap<String, Vec<f64>>,
    line: Map<String, Value>,
    errors: Vec<String>,
}

impl Measured {
    fn push(&mut self, name: &str, v: f64) {
        self.series.entry(name.into()).or_default().push(v);
    }

    fn get(&self, name: &str) -> &[f64] {
        self.series.get(name).map_or(&[], Vec::as_slice)
    }
}

/// Runs a scenario, catching the rig's panics, then `summary` over what it measured; prints
/// its line (with the load around it and its errors) and returns what it measured.
fn scenario(
    head: Value,
    run: impl FnOnce(&mut Measured) -> Result<(), String>,
    summary: impl FnOnce(&mut Measured),
) -> Measured {
    let load_start = load();
    let started = Instant::now();
    let mut m = Measured::default();
    let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| run(&mut m)));
    summary(&mut m);
    let error = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(e),
        Err(panic) => Some(panic_text(panic)),
    };
    let mut line = match head {
        Value::Object(o) => o,
        _ => Map::new(),
    };
    line.append(&mut m.line.clone());
    if !m.errors.is_empty() {
        line.insert("errors".into(), json!(m.errors));
    }
    if let Some(e) = error {
        line.insert("error".into(), json!(e));
    }
    line.insert("load_start".into(), json!(load_start));
    line.insert("load_end".into(), json!(load()));
    line.insert("elapsed_s".into(), json!(started.elapsed().as_secs()));
    println!("{}", Value::Object(line));
    m
}

/// MiB of RAM each guest uses (MemTotal - MemAvailable).
fn guest_memory_used(c: &VirtualCluster) -> Vec<f64> {
    (0..c.vms())
        .map(|vm| {
            let info = c.run(vm, "cat /proc/meminfo");
            let kib = |key: &str| {
                info.lines()
                    .find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok())
                    .unwrap_or(0.0)
            };
            round((kib("MemTotal:") - kib("MemAvailable:")) / 1024.0, 1)
        })
        .collect()
}

/// One move's numbers: the pause as the job sees it, and each phase.
fn record_move(m: &mut Measured, run: &TimedPlan) -> Result<f64, String> {
    let at = |event: &str, phase: &str| {
        run.at(event, Some(phase))
            .ok_or_else(|| format!("no {event} {phase} event"))
    };
    let cut = at("phase_finished", "quiesce")?;
    let released = at("phase_finished", "resume")?;
    let pause = released - cut;
    m.push("job_visible_pause_ms", pause);
    m.push(
        "quiesce_start_to_resume_end_ms",
        released - at("phase_started", "quiesce")?,
    );
    for (phase, ms) in run.phase_ms() {
        m.push(&format!("phase:{phase}"), ms);
    }
    if let Some(total) = run.total_ms() {
        m.push("plan_total_ms", total);
    }
    Ok(pause)
}

/// Moves the cluster to the other fabric once, timed; the job then moves traffic there.
fn one_move(c: &mut VirtualCluster, m: &mut Measured) -> Result<f64, String> {
    let from = c.fabric();
    let run = c.try_move_to_other_fabric(PLAN_LIMIT)?;
    let pause = record_move(m, &run)?;
    if std::env::var_os("NINJA_VC_EVENTS").is_some() {
        for (t, e) in &run.events {
            eprintln!("  {t:9.1} ms {e}");
        }
    }
    eprintln!(
        "virtual_cluster: {} VMs {from:?}->{:?}: pause {pause:.0} ms, plan {:.0} ms",
        c.vms(),
        c.fabric(),
        run.total_ms().unwrap_or(f64::NAN)
    );
    m.line
        .entry("moves")
        .or_insert_with(|| json!([]))
        .as_array_mut()
        .unwrap()
        .push(json!(format!("{from:?}->{:?}", c.fabric())));
    c.wait_job_traffic(TRAFFIC, TRAFFIC_LIMIT)?;
    Ok(pause)
}

/// Migrates the cluster plainly once; the job then moves traffic again.
fn one_plain(c: &mut VirtualCluster, m: &mut Measured) -> Result<f64, String> {
    let p = c.plain_migration(PLAIN_LIMIT)?;
    let wall = p.wall.as_secs_f64() * 1000.0;
    eprintln!("virtual_cluster: {} VMs plain: {wall:.0} ms", c.vms());
    m.push("plain_migration_ms", wall);
    let max = |v: &[u64]| v.iter().copied().max().unwrap_or(0) as f64;
    m.push("plain_qemu_total_time_max_ms", max(&p.total_ms));
    m.push("plain_downtime_max_ms", max(&p.downtime_ms));
    let sent: u64 = p.transferred.iter().sum();
    m.push("plain_transferred_mib", sent as f64 / (1u64 << 20) as f64);
    c.wait_job_traffic(TRAFFIC, TRAFFIC_LIMIT)?;
    Ok(wall)
}

fn migration(
    s: &Settings,
    (vms, mib, fabric_b): (usize, u32, FabricBNic),
    m: &mut Measured,
) -> Result<(), String> {
    let test = format!("bench virtual_cluster {vms}x{mib} {fabric_b:?}");
    let setup = Setup {
        memory_mib: mib,
        fabric_b,
        ..Setup::new(MpiImpl::OpenMpi, vms)
    };
    let Some(mut c) = VirtualCluster::boot(&test, &format!("b{vms}x{mib}"), setup) else {
        return Err("skipped: the virtual cluster cannot run here".into());
    };
    c.start_job("ring,anysource,collective");
    c.wait_job_traffic(TRAFFIC, TRAFFIC_LIMIT)?;
    m.line
        .insert("guest_mem_used_mib".into(), json!(guest_memory_used(&c)));
    for rep in 0..s.reps {
        // A move and a plain migration next to each other; plain ones only on fabric B.
        let step = if c.fabric() == Fabric::A {
            one_move(&mut c, m).and_then(|pause| Ok((pause, one_plain(&mut c, m)?)))
        } else {
            one_plain(&mut c, m).and_then(|plain| Ok((one_move(&mut c, m)?, plain)))
        };
        match step {
            Ok((pause, plain)) => m.push("pause_minus_plain_ms", pause - plain),
            Err(e) => {
                m.errors.push(format!("repetition {rep}: {e}"));
                break;
            }
        }
    }
    // Four busy TCG guests on 2 cores can leave sshd silent past ssh's 10 s connect timeout
    // (seen once): ask for the stop a few times before `finish_job` asks again and waits.
    for _ in 0..5 {
        if c.ssh(0, "touch /tmp/job/stop").status.success() {
            break;
        }
    }
    let job_ok = match std::panic::catch_unwind(AssertUnwindSafe(|| c.finish_job())) {
        Ok(out) => {
            let oks = out.lines().filter(|l| l.contains("stress OK rank")).count();
            Some(oks == vms * RANKS_PER_VM)
        }
        Err(panic) => {
            let why = panic_text(panic);
            m.errors.push(format!("job: {why}"));
            // Unknown (null) when the guest could not be asked.
            why.contains("the job failed").then_some(false)
        }
    };
    m.line.insert("job_ok".into(), json!(job_ok));
    Ok(())
}

/// The migration scenario's line fields from its samples.
fn migration_summary(vms: usize, m: &mut Measured) {
    let mut phases = Map::new();
    for (name, v) in &m.series {
        if let Some(phase) = name.strip_prefix("phase:") {
            phases.insert(phase.into(), med(v));
        }
    }
    let mut fields = vec![("phase_ms".to_string(), Value::Object(phases))];
    for name in [
        "job_visible_pause_ms",
        "quiesce_start_to_resume_end_ms",
        "plan_total_ms",
        "plain_migration_ms",
        "plain_qemu_total_time_max_ms",
        "plain_downtime_max_ms",
        "plain_transferred_mib",
        "pause_minus_plain_ms",
    ] {
        fields.push((name.into(), med(m.get(name))));
    }
    let excess = median(m.get("pause_minus_plain_ms"));
    fields.push((
        "target_holds".into(),
        json!(
            (vms == 2)
                .then_some(excess.map(|e| e <= TARGET_SLACK_MS))
                .flatten()
        ),
    ));
    fields.push((
        "samples".into(),
        json!({
            "job_visible_pause_ms": rounded(m.get("job_visible_pause_ms")),
            "plain_migration_ms": rounded(m.get("plain_migration_ms")),
        }),
    ));
    m.line.extend(fields);
}

/// The 512/256 MiB ratio line for one cluster size.
fn memory_scaling(vms: usize, small: &Measured, large: &Measured) {
    let mut ratios = Map::new();
    let mut proportional = Map::new();
    for (key, series) in [
        ("plain_migration_ms", "plain_migration_ms"),
        ("migrate_phase_ms", "phase:migrate"),
        ("job_visible_pause_ms", "job_visible_pause_ms"),
        ("plain_transferred_mib", "plain_transferred_mib"),
    ] {
        let r = median(large.get(series))
            .zip(median(small.get(series)))
            .map(|(l, s)| l / s);
        ratios.insert(key.into(), json!(r.map(|r| round(r, 3))));
        proportional.insert(
            key.into(),
            json!(r.map(|r| (r - 2.0).abs() <= PROPORTIONAL_TOLERANCE)),
        );
    }
    let line = json!({
        "bench": "virtual_cluster",
        "scenario": "memory_scaling",
        "vms": vms,
        "memory_mib": [256, 512],
        "ratio_512_to_256": ratios,
        "grows_in_proportion": proportional,
        "proportional_means": format!("ratio within 2 ± {PROPORTIONAL_TOLERANCE}"),
    });
    println!("{line}");
}

/// One ping-pong launch in the guests: per sample, one-way latency (µs) and bandwidth (MiB/s).
fn pingpong_launch(
    c: &VirtualCluster,
    s: &Settings,
    preload: bool,
) -> Result<(Vec<f64>, Vec<f64>), String> {
    let env: &[(&str, &str)] = if preload {
        &[("LD_PRELOAD", "/job/libsymvirt_pmpi.so")]
    } else {
        &[]
    };
    let program = format!("/job/pingpong 3 8 {} 262144 20", s.lat_rounds);
    let command = c.mpi_command(1, env, &program);
    let out = c.run(0, &format!("timeout -s KILL {LAUNCH_LIMIT_S} {command}"));
    let (mut lat, mut bw) = (Vec::new(), Vec::new());
    for line in out.lines().filter(|l| l.starts_with("sample ")) {
        let field = |key: &str| -> Option<f64> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
        };
        let (Some(bytes), Some(rounds), Some(secs)) =
            (field("bytes"), field("rounds"), field("seconds"))
        else {
            return Err(format!("unreadable sample: {line:?}"));
        };
        if line.contains(" latency ") {
            lat.push(secs / rounds / 2.0 * 1e6);
        } else {
            bw.push(2.0 * bytes * rounds / secs / f64::from(1 << 20));
        }
    }
    if lat.is_empty() || bw.is_empty() {
        return Err(format!("no samples from the ping-pong:\n{out}"));
    }
    Ok((lat, bw))
}

fn pingpong(s: &Settings, mpi: MpiImpl, m: &mut Measured) -> Result<(), String> {
    let test = format!("bench virtual_cluster pingpong {}", mpi.name());
    let setup = Setup {
        programs: vec!["pingpong.c"],
        ..Setup::new(mpi, 2)
    };
    let Some(c) = VirtualCluster::boot(&test, &format!("pp-{}", mpi.name()), setup) else {
        return Err("skipped: the virtual cluster cannot run here".into());
    };
    m.line
        .insert("fabric".into(), json!(format!("{:?}", c.fabric())));
    for pair in 0..s.pairs {
        // A B, B A, ...: neither variant always runs first.
        let order = [pair % 2 == 1, pair % 2 == 0];
        let mut pair_median = [(0.0, 0.0); 2];
        let t = Instant::now();
        for preload in order {
            let (lat, bw) = pingpong_launch(&c, s, preload)?;
            let variant = if preload { "with" } else { "without" };
            pair_median[preload as usize] = (median(&lat).unwrap(), median(&bw).unwrap());
            for v in lat {
                m.push(&format!("latency_us_{variant}"), v);
            }
            for v in bw {
                m.push(&format!("bandwidth_mib_s_{variant}"), v);
            }
        }
        let [without, with] = pair_median;
        m.push("latency_ratio", with.0 / without.0);
        m.push("bandwidth_ratio", with.1 / without.1);
        eprintln!(
            "virtual_cluster: pingpong {} pair {pair}: latency {:.1} -> {:.1} us ({:.0} s)",
            mpi.name(),
            without.0,
            with.0,
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn pingpong_summary(m: &mut Measured) {
    let mut fields = Map::new();
    for name in ["latency_ratio", "bandwidth_ratio"] {
        fields.insert(name.into(), json!(median(m.get(name)).map(|r| round(r, 4))));
        fields.insert(format!("{name}_per_pair"), spread(m.get(name)));
    }
    for name in [
        "latency_us_without",
        "latency_us_with",
        "bandwidth_mib_s_without",
        "bandwidth_mib_s_with",
    ] {
        fields.insert(name.into(), spread(m.get(name)));
    }
    m.line.extend(fields);
}

fn main() {
    let s = Settings::from_env();
    let started = Instant::now();
    let mut by_scenario = Vec::new();
    for &(vms, mib, fabric_b) in &s.scenarios {
        let nic = match fabric_b {
            FabricBNic::Standby => "standby",
            FabricBNic::HotPlugged => "hot-plugged",
        };
        let head = json!({
            "bench": "virtual_cluster", "scenario": "migration", "quick": s.quick, "mpi": "openmpi",
            "vms": vms, "memory_mib": mib, "fabric_b_nic": nic, "ranks": vms * RANKS_PER_VM,
            "repetitions": s.reps,
            "target": format!("job_visible_pause_ms <= plain_migration_ms + {TARGET_SLACK_MS} (2 VMs)"),
        });
        let m = scenario(
            head,
            |m| migration(&s, (vms, mib, fabric_b), m),
            |m| migration_summary(vms, m),
        );
        if fabric_b == FabricBNic::Standby {
            by_scenario.push(((vms, mib), m));
        }
    }
    for ((vms, mib), small) in &by_scenario {
        let large = by_scenario.iter().find(|(k, _)| *k == (*vms, 512));
        if let (256, Some((_, large))) = (mib, large) {
            memory_scaling(*vms, small, large);
        }
    }
    let mut last_pingpong = Duration::ZERO;
    for &mpi in &s.mpis {
        if started.elapsed() + last_pingpong > s.budget {
            println!(
                "SKIPPED: bench virtual_cluster pingpong ({}): it would end after the time budget \
                 ({} s, NINJA_VC_BUDGET_S)",
                mpi.name(),
                s.budget.as_secs()
            );
            continue;
        }
        let t = Instant::now();
        let head = json!({
            "bench": "virtual_cluster", "scenario": "pingpong", "quick": s.quick, "mpi": mpi.name(),
            "vms": 2, "ranks": 2, "pairs": s.pairs, "samples_per_launch": 3, "latency_bytes": 8,
            "latency_rounds": s.lat_rounds, "bandwidth_bytes": 262144, "bandwidth_rounds": 20,
        });
        scenario(head, |m| pingpong(&s, mpi, m), pingpong_summary);
        last_pingpong = t.elapsed();
    }
}
