//! `ninja-migrate mpi run`, as a benchmark harness uses it: the project's stress program (C and
//! Fortran, 4 ranks, both MPIs) started through the wrapper, which builds nothing by hand,
//! preloads the layer through the launcher and puts an agent beside the job; `cut status` and
//! `cut cycle` through the control socket it prints; every cut consistent pair by pair (the
//! agent's report the cycle prints, the same counts as the ranks' cut records, read directly
//! and through `cut report`, from the agent and from the records, which also catches a record
//! altered to lie), the program's own checks passing. Bad cases: a program that is not an
//! MPI launcher, a launcher of the other MPI, no rank count.

#[path = "../symvirt/mpi/tests/common/mod.rs"]
#[allow(unused_imports)]
mod mpi_common;
mod mpi_ring;

use mpi_common::cut::{check_pairs, read_cut};
use mpi_ring::{built, ninja, text};
use ninja_testkit::mpi_or_skip;
use serde_json::Value;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use symvirt_mpi::mpi_build::{self, Libraries, Linkage, MpiImpl};

const INTERCONNECT: &str = r#"{"kind":"ethernet","mac":"52:54:00:00:00:01"}"#;
const RANKS: u32 = 4;
/// Bound on any wait.
const PATIENCE: Duration = Duration::from_secs(120);

/// Kills the wrapper (and so its launcher) if a test fails before it ended.
struct Job(Option<Child>);

impl Drop for Job {
    fn drop(&mut self) {
        if let Some(c) = self.0.as_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Job {
    /// Waits (bounded) for the wrapper to end; its output.
    fn finish(mut self) -> Output {
        let mut child = self.0.take().unwrap();
        let t = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if t.elapsed() > PATIENCE {
                let _ = child.kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        child.wait_with_output().unwrap()
    }
}

/// One program of `mpi` under `mpi run`: 5 cuts while it runs, each consistent.
fn cuts_of_a_job_under_mpi_run(mpi: MpiImpl, libs: &Libraries, source: &str, dir: &Path) {
    let what = format!("{} {source}", mpi.name());
    let src = mpi_build::crate_dir().join("tests/programs").join(source);
    let stem = Path::new(source).file_stem().unwrap().to_string_lossy();
    let exe = mpi_build::build_program(libs, &src, Linkage::Plain, &dir.join(&*stem))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let run = dir.join(format!("{stem}-run"));
    let (job_dir, cut_log, control) = (run.join("job"), run.join("cuts"), run.join("ctl.sock"));
    std::fs::create_dir_all(&job_dir).unwrap();
    std::fs::create_dir_all(&cut_log).unwrap();

    let mut words: Vec<String> = [
        "mpi",
        "run",
        "--libs",
        libs.dir.parent().unwrap().to_str().unwrap(),
        "--control",
        control.to_str().unwrap(),
        "--cut-log",
        cut_log.to_str().unwrap(),
        "--",
    ]
    .iter()
    .map(|w| w.to_string())
    .collect();
    // The launcher the project's MPI tests use, for RANKS local ranks, its words after `--`.
    let launcher = mpi.launcher(RANKS, &[]);
    words.push(launcher.get_program().to_string_lossy().into_owned());
    words.extend(
        launcher
            .get_args()
            .map(|a| a.to_string_lossy().into_owned()),
    );
    words.push(exe.display().to_string());
    if source.ends_with(".c") {
        words.push("ring,anysource,collective".into());
    }
    words.extend([job_dir.display().to_string(), "10".into()]);
    let job = Job(Some(
        Command::new(env!("CARGO_BIN_EXE_ninja-migrate"))
            .args(&words)
            // Its environment (Open MPI's transport choice) reaches the launcher through us.
            .envs(launcher.get_envs().filter_map(|(k, v)| Some((k, v?))))
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    ));
    let t = Instant::now();
    while !control.exists() {
        assert!(t.elapsed() < PATIENCE, "{what}: no control socket");
        std::thread::sleep(Duration::from_millis(50));
    }
    let channel = control.to_str().unwrap();
    let status = ninja(&[
        "cut",
        "status",
        "--json",
        "--wait-registered",
        "--channel",
        channel,
    ]);
    assert!(status.status.success(), "{what}: {}", text(&status));
    let info: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(info["ranks"], RANKS, "{what}: {info}");
    assert_eq!(info["registered"], RANKS, "{what}: {info}");

    let cuts = ninja(&[
        "cut",
        "cycle",
        "--json",
        "--channel",
        channel,
        "--count",
        "5",
        "--every",
        "0.3",
        "--hold-ms",
        "20",
        "--interconnect",
        INTERCONNECT,
    ]);
    assert!(cuts.status.success(), "{what}: {}", text(&cuts));
    let lines: Vec<Value> = String::from_utf8_lossy(&cuts.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 5, "{what}: {}", text(&cuts));
    // The last cut's report again, from the agent, as a harness asks for it afterwards.
    let from_agent = ninja(&["cut", "report", "--json", "--channel", channel]);
    assert!(from_agent.status.success(), "{what}: {}", text(&from_agent));
    let from_agent: Value = serde_json::from_slice(&from_agent.stdout).unwrap();
    assert_eq!(
        (&from_agent["epoch"], &from_agent["messages"]),
        (&lines[4]["epoch"], &lines[4]["messages"]),
        "{what}: {from_agent}"
    );
    assert!(
        from_agent["slowest_quiesce_ms"].is_u64(),
        "{what}: {from_agent}"
    );

    std::fs::write(job_dir.join("stop"), "").unwrap();
    let done = job.finish();
    assert!(done.status.success(), "{what}: {}", text(&done));
    let out = String::from_utf8_lossy(&done.stdout);
    let oks = out.lines().filter(|l| l.contains(" OK rank ")).count();
    assert_eq!(oks, RANKS as usize, "{what}: {}", text(&done));
    // Every cut: every rank recorded it, and what each sent to each is what the other got.
    let mut last = 0;
    for l in &lines {
        assert_eq!(l["ranks"], RANKS, "{what}: {l}");
        let epoch = l["epoch"].as_u64().unwrap();
        let cut = read_cut(&cut_log, epoch);
        assert_eq!(cut.ranks.len(), RANKS as usize, "{what}: epoch {epoch}");
        let total = check_pairs(&cut, epoch);
        // The agent's report, printed by the cycle, counts what the records count.
        assert_eq!(
            (l["consistent"].as_bool(), l["messages"].as_u64()),
            (Some(true), Some(total)),
            "{what}: {l}"
        );
        assert_eq!(l["drained"].as_u64(), Some(cut.drained()), "{what}: {l}");
        assert!(
            total >= last,
            "{what}: epoch {epoch} has fewer messages than the one before"
        );
        last = total;
    }
    assert!(last > 0, "{what}: no message before the last cut");
    // The same through `cut report`, as a harness reads it.
    let report = ninja(&[
        "cut",
        "report",
        "--json",
        "--cut-log",
        cut_log.to_str().unwrap(),
    ]);
    assert!(report.status.success(), "{what}: {}", text(&report));
    let epochs: Vec<Value> = String::from_utf8_lossy(&report.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(epochs.len(), lines.len(), "{what}: {}", text(&report));
    for (e, l) in epochs.iter().zip(&lines) {
        assert_eq!(e["epoch"], l["epoch"], "{what}: {e}");
        assert_eq!(
            (e["ranks"].as_u64(), e["consistent"].as_bool()),
            (Some(4), Some(true)),
            "{e}"
        );
    }
    assert_eq!(epochs.last().unwrap()["messages"], last, "{what}");
    // A record that lies is caught, and named.
    let epoch = lines[0]["epoch"].as_u64().unwrap();
    let record = cut_log.join(format!("cut-{epoch}-1"));
    let text_of = std::fs::read_to_string(&record).unwrap();
    let mut rows: Vec<String> = text_of.lines().map(str::to_owned).collect();
    let mut sent: Vec<u64> = rows[0]
        .split_whitespace()
        .skip(1)
        .map(|w| w.parse().unwrap())
        .collect();
    sent[2] += 1;
    rows[0] = format!(
        "sent {}",
        sent.iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );
    std::fs::write(&record, rows.join("\n") + "\n").unwrap();
    let epoch_arg = epoch.to_string();
    let bad = ninja(&[
        "cut",
        "report",
        "--cut-log",
        cut_log.to_str().unwrap(),
        "--epoch",
        &epoch_arg,
    ]);
    assert_eq!(bad.status.code(), Some(1), "{what}: {}", text(&bad));
    let said = String::from_utf8_lossy(&bad.stdout);
    assert!(
        said.contains("INCONSISTENT: rank 1 sent") && said.contains("to rank 2"),
        "{what}: {said}"
    );
    // The wrapper removed its agent's sockets.
    assert!(!control.exists(), "{what}: control socket left behind");
}

#[test]
fn c_and_fortran_jobs_run_under_mpi_run_and_are_cut_under_both_mpis() {
    if !mpi_or_skip("c_and_fortran_jobs_run_under_mpi_run_and_are_cut_under_both_mpis") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ninja-cli-mpi-run-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    for mpi in MpiImpl::ALL {
        let here = dir.join(mpi.name());
        std::fs::create_dir_all(&here).unwrap();
        let libs = built(mpi, &here.join("libs"));
        for source in ["stress.c", "stress_f.f90"] {
            cuts_of_a_job_under_mpi_run(mpi, &libs, source, &here);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn mpi_run_refuses_what_it_cannot_run_with_a_reason() {
    let refused = |args: &[&str], words: &str| {
        let mut all = vec!["mpi", "run"];
        all.extend(args);
        let out = ninja(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out));
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(words),
            "{args:?}: {}",
            text(&out)
        );
    };
    refused(&["--", "sleep", "1"], "sleep is not an MPI launcher");
    refused(
        &["--", "/no/such/launcher", "-n", "2"],
        "not an MPI launcher",
    );
    if mpi_or_skip("mpi_run_refuses_what_it_cannot_run_with_a_reason") {
        refused(
            &["--mpi", "mpich", "--", "mpirun.openmpi", "-np", "2", "true"],
            "mpirun.openmpi is openmpi's launcher, not mpich's",
        );
        refused(&["--", "mpiexec.mpich", "true"], "give --ranks");
    }
}
