//! The Rust API (feature `rsmpi`): `examples/rust_ring.rs`, a checked ring written with the
//! `mpi` crate that calls `SymVirt::safe_point` every iteration, run as a real 4-rank job
//! under the launcher of the MPI the `mpi` crate linked (read from the library at run time:
//! Open MPI or MPICH, the same assertions under both), with the real
//! guest agent. Several migration requests: at every cut all ranks stopped at the same
//! iteration and what each rank sent to each peer is what that peer received (read while the
//! ranks are paused, before resume); every rank's resume hook and safe point see the new
//! interconnect; an aborted epoch returns with nothing changed; the job's own payload checks
//! pass and it finishes. Also: no agent (a SIGUSR1 cut), and an agent socket that does not
//! exist (every rank fails `init` with the cause, the job ends).

mod common;

use common::cut::{check_pairs, read_cut};
use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;
use symvirt_mpi::control::SIGNAL_EPOCH_BASE;
use symvirt_mpi::mpi_build::MpiImpl;

/// Names the MPI this run must test (`openmpi` or `mpich`), when set: scripts/test runs this
/// test once per MPI, each build in its own target directory, and sets it for each, so a build
/// that bound the other MPI fails instead of testing that one twice.
const EXPECT_MPI_ENV: &str = "NINJA_RSMPI_EXPECT_MPI";

/// `rust_ring`, built (once per test process) with the profile of this test, into this test's
/// target directory (an MPICH build lives in a directory of its own; `$CARGO_TARGET_DIR`,
/// when relative, would name another directory from the package directory tests run in).
fn rust_ring() -> &'static Path {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT.get_or_init(|| {
        // <target dir>/<profile>/deps/rust_api-<hash> -> <target dir>/<profile>
        let exe = std::env::current_exe().unwrap();
        let profile = exe.parent().unwrap().parent().unwrap();
        let target_dir = profile.parent().unwrap();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build.args([
            "build",
            "-q",
            "-p",
            "symvirt-mpi",
            "--features",
            "rsmpi",
            "--example",
            "rust_ring",
        ]);
        build.arg("--target-dir").arg(target_dir);
        if profile.file_name().is_some_and(|n| n == "release") {
            build.arg("--release");
        }
        let st = build.status().expect("run cargo build");
        assert!(st.success(), "cargo build --example rust_ring failed");
        let bin = profile.join("examples/rust_ring");
        assert!(bin.exists(), "{} missing", bin.display());
        bin
    })
}

/// The MPI `rust_ring` is linked against, whose launcher must start it (mpi-sys binds to the
/// MPI its build found). Read from the library itself: `rust_ring --mpi-library` prints
/// `MPI_Get_library_version`. The dynamic linker's choice (`ldd`) must agree, and so must
/// `$NINJA_RSMPI_EXPECT_MPI` when set.
fn rust_ring_mpi() -> MpiImpl {
    static FOUND: OnceLock<MpiImpl> = OnceLock::new();
    *FOUND.get_or_init(|| {
        let bin = rust_ring();
        let full = bounded_output(Command::new(bin).arg("--mpi-library"));
        // MPICH's first line names its version; the rest is its build configuration.
        let version = full.lines().next().unwrap_or_default().to_string();
        let says = if version.starts_with("Open MPI") {
            MpiImpl::OpenMpi
        } else if version.starts_with("MPICH") {
            MpiImpl::Mpich
        } else {
            panic!(
                "{} reports an MPI library this test does not know: {version:?}",
                bin.display()
            )
        };
        let libs = bounded_output(Command::new("ldd").arg(bin));
        let loads: Vec<MpiImpl> = [
            (MpiImpl::Mpich, "libmpich.so"),
            (MpiImpl::OpenMpi, "libmpi.so"),
        ]
        .into_iter()
        .filter(|(_, lib)| libs.contains(lib))
        .map(|(mpi, _)| mpi)
        .collect();
        assert_eq!(
            loads,
            [says],
            "{} reports {version:?} but the dynamic linker loads:\n{libs}",
            bin.display()
        );
        if let Ok(want) = std::env::var(EXPECT_MPI_ENV) {
            assert_eq!(
                says.name(),
                want,
                "{EXPECT_MPI_ENV}={want} (openmpi or mpich) but {} links {version:?}",
                bin.display()
            );
        }
        eprintln!("rust_ring links {}: {version}", says.name());
        says
    })
}

/// What `cmd` prints on stdout; it must succeed within [`PATIENCE`].
fn bounded_output(cmd: &mut Command) -> String {
    let dir = TempDir::new("rsmpi-output");
    let out = dir.0.join("out");
    let child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let mut child = KillOnDrop(child);
    let deadline = soon();
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(std::time::Instant::now() < deadline, "{cmd:?} hung");
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = fs::read_to_string(&out).unwrap();
    assert!(status.success(), "{cmd:?}: {status}\n{text}");
    text
}

/// The iteration each rank recorded at the cut of `epoch` (third line of its record).
fn cut_iterations(dir: &Path, epoch: u64) -> Vec<u64> {
    read_records(dir, "cut", epoch)
        .iter()
        .map(|r| {
            let line = r.lines().nth(2).unwrap_or_else(|| panic!("short {r:?}"));
            let n = line
                .strip_prefix("iteration ")
                .unwrap_or_else(|| panic!("{r:?}"));
            n.parse().unwrap()
        })
        .collect()
}

/// Checks the cut of `epoch` (same iteration everywhere, every pair consistent); returns the
/// number of messages sent before it.
fn check_cut(dir: &Path, epoch: u64) -> u64 {
    let iters = cut_iterations(dir, epoch);
    assert!(
        iters.iter().all(|&i| i == iters[0]),
        "epoch {epoch}: ranks stopped at different iterations: {iters:?}"
    );
    check_pairs(&read_cut(dir, epoch), epoch)
}

/// Waits until every rank printed that it is set up.
fn wait_ready(job: &Job) {
    let deadline = soon();
    loop {
        let err = fs::read_to_string(&job.stderr).unwrap_or_default();
        // Whole lines only: a rank's line may be half written when the file is read.
        let ready = err
            .lines()
            .filter(|l| l.contains(" ready, agent: "))
            .count();
        if ready == RANKS as usize && err.ends_with('\n') {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{}", job.logs());
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn ended_ok(job: &mut Job, cuts: u64) {
    let (ok, out) = job.wait();
    assert!(ok, "MPI job failed\n{}", job.logs());
    let oks: Vec<&str> = out
        .lines()
        .filter(|l| l.starts_with("rust_ring OK rank "))
        .collect();
    // One line per rank of one job (under the wrong launcher every process would be a
    // singleton "rank 0").
    let mut ranks: Vec<u32> = oks
        .iter()
        .map(|l| {
            let rank = l["rust_ring OK rank ".len()..].split(' ').next().unwrap();
            rank.parse().unwrap_or_else(|_| panic!("{l}"))
        })
        .collect();
    ranks.sort_unstable();
    assert_eq!(ranks, (0..RANKS).collect::<Vec<_>>(), "{out}");
    for l in oks {
        assert!(l.ends_with(&format!("cuts {cuts}")), "{l}");
    }
}

#[test]
fn rust_ring_reports_the_mpi_it_links_and_the_run_expects() {
    // The checks are in `rust_ring_mpi`; every job below starts under the launcher it picks.
    let mpi = rust_ring_mpi();
    assert!(MpiImpl::ALL.contains(&mpi));
}

#[test]
fn rust_ring_consistent_at_every_cut_resumed_with_the_interconnect() {
    let prog = rust_ring();
    let mpi = rust_ring_mpi();
    let rig = Rig::new("rsmpi-agent");
    let cuts = rig.dir.0.join("cuts");
    fs::create_dir_all(&cuts).unwrap();
    let env = [rig.agent_env()];
    let mut job = Job::start(mpi, prog, &[cuts.to_str().unwrap(), "16"], &env, &rig.dir.0);
    let epochs = 4;
    let aborted = 3;
    let mut last_sent = 0;
    for epoch in 1..=epochs {
        let took = quiesce(&rig, &mut job, epoch);
        // Informational only (no timed assertions): request to all ranks quiesced.
        eprintln!("rust_ring: epoch {epoch} quiesced in {:?}", took);
        // The ranks are paused: their records describe the cut.
        let sent = check_cut(&cuts, epoch);
        assert!(
            sent > last_sent,
            "no traffic between cuts {last_sent} {sent}"
        );
        last_sent = sent;
        let iteration = cut_iterations(&cuts, epoch)[0];
        if epoch == aborted {
            rig.host
                .send(&symvirt::protocol::HostMessage::Abort { epoch })
                .unwrap();
            for rec in read_records(&cuts, "resumed", epoch) {
                assert_eq!(rec, format!("aborted {iteration}\n"));
            }
            continue;
        }
        let ic = interconnect_for(epoch);
        resume_and_confirm(&rig, &mut job, epoch, &ic);
        let json = serde_json::to_string(&ic).unwrap();
        for rec in read_records(&cuts, "hook", epoch) {
            assert_eq!(rec, format!("{json}\n"), "resume hook");
        }
        for rec in read_records(&cuts, "resumed", epoch) {
            assert_eq!(rec, format!("resumed {iteration} {json}\n"));
        }
    }
    // The aborted epoch never reached the resume hook.
    assert!(!cuts.join(format!("hook-{aborted}-0")).exists());
    fs::write(cuts.join("stop"), "").unwrap();
    ended_ok(&mut job, epochs);
}

/// The line of each rank's record of the cut of `epoch` that starts with `label`.
fn record_lines(dir: &Path, epoch: u64, label: &str) -> Vec<String> {
    read_records(dir, "cut", epoch)
        .iter()
        .map(|r| {
            r.lines()
                .find_map(|l| l.strip_prefix(label))
                .unwrap_or_else(|| panic!("epoch {epoch}: no {label:?} line in {r:?}"))
                .to_string()
        })
        .collect()
}

/// `rust_ring` with quiet phases of 2 s of computation, a 256 KiB message outstanding across
/// each: cuts requested at random moments fall inside the phases; with the library's thread
/// (MPI_THREAD_SERIALIZED) each within a second while the ranks compute, made by that thread;
/// without it (`SYMVIRT_PROGRESS_THREAD=0`) at the phases' begins or ends, by the program's
/// thread. Every cut is consistent pair by pair, the outstanding message counted received only
/// where its buffer already held it whole; the ring's payload checks pass and the job ends.
fn run_quiet_phases(tag: &str, thread: bool) {
    let prog = rust_ring();
    let mpi = rust_ring_mpi();
    let rig = Rig::new(tag);
    let cuts = rig.dir.0.join("cuts");
    fs::create_dir_all(&cuts).unwrap();
    let mut env = vec![rig.agent_env()];
    if !thread {
        env.push(("SYMVIRT_PROGRESS_THREAD".to_string(), "0".to_string()));
    }
    let compute_ms = 2000;
    let args = [cuts.to_str().unwrap(), "2", &compute_ms.to_string()];
    let mut job = Job::start(mpi, prog, &args, &env, &rig.dir.0);
    wait_ready(&job);
    let epochs = if thread { 4 } else { 2 };
    let mut jitter = Jitter::new();
    let (mut slowest, mut last_sent) = (Duration::ZERO, 0);
    // Per epoch, which thread made each rank's cut.
    let mut makers = Vec::new();
    for epoch in 1..=epochs {
        std::thread::sleep(Duration::from_millis(jitter.ms(300, 2300)));
        let took = quiesce(&rig, &mut job, epoch);
        eprintln!("{tag}: epoch {epoch} quiesced in {took:?}");
        slowest = slowest.max(took);
        let sent = check_cut(&cuts, epoch);
        assert!(sent > last_sent, "no traffic between cuts");
        last_sent = sent;
        let places = record_lines(&cuts, epoch, "place ");
        assert!(
            places.iter().all(|p| p == "quiet"),
            "epoch {epoch}: ranks cut at {places:?}"
        );
        makers.push(record_lines(&cuts, epoch, "thread "));
        let ic = interconnect_for(epoch);
        resume_and_confirm(&rig, &mut job, epoch, &ic);
        let json = serde_json::to_string(&ic).unwrap();
        for rec in read_records(&cuts, "resumed", epoch) {
            assert!(rec.ends_with(&format!(" {json}\n")), "{rec:?}");
        }
    }
    fs::write(cuts.join("stop"), "").unwrap();
    ended_ok(&mut job, epochs);
    let want = if thread { "symvirt-quiet" } else { "main" };
    let made_by_want = makers
        .iter()
        .filter(|t| t.iter().all(|t| t == want))
        .count();
    // With the thread, a request that lands within a scheduling delay of a phase's end (4
    // computing ranks on 2 cores: milliseconds) is taken by a rank's own thread as the phase
    // ends, legitimately; one such epoch in a run is allowed, a thread that never cuts is not.
    let allowed_misses = if thread { 1 } else { 0 };
    assert!(
        made_by_want + allowed_misses >= makers.len(),
        "cuts made by {makers:?} (per epoch, per rank), want {want}"
    );
    if thread {
        assert!(
            slowest < Duration::from_secs(1),
            "a cut took {slowest:?} to quiesce ranks computing in {compute_ms} ms quiet phases"
        );
    }
}

#[test]
fn rust_ring_quiet_phases_cut_while_ranks_compute() {
    run_quiet_phases("rsmpi-quiet", true);
}

#[test]
fn rust_ring_quiet_phases_without_the_thread_cut_at_their_ends() {
    run_quiet_phases("rsmpi-quiet-nt", false);
}

/// Rank 1 panics inside a quiet phase (iteration 1) with a message outstanding across it: the
/// library ends the phase on every rank before the panic goes on (the program catches it), so
/// the job goes on: a later cut is consistent and every payload check passes to the end.
#[test]
fn rust_ring_a_panic_inside_a_quiet_phase_ends_it_on_every_rank() {
    let prog = rust_ring();
    let mpi = rust_ring_mpi();
    let rig = Rig::new("rsmpi-quiet-panic");
    let cuts = rig.dir.0.join("cuts");
    fs::create_dir_all(&cuts).unwrap();
    let env = [
        rig.agent_env(),
        ("RUST_RING_PANIC_AT".to_string(), "1".to_string()),
    ];
    let mut job = Job::start(
        mpi,
        prog,
        &[cuts.to_str().unwrap(), "3", "300"],
        &env,
        &rig.dir.0,
    );
    wait_ready(&job);
    // After the panic: iteration 1's phase ends 0.3-0.6 s after the start.
    job.wait_for_stderr("caught the panic");
    quiesce(&rig, &mut job, 1);
    check_cut(&cuts, 1);
    let ic = interconnect_for(1);
    resume_and_confirm(&rig, &mut job, 1, &ic);
    fs::write(cuts.join("stop"), "").unwrap();
    ended_ok(&mut job, 1);
    let err = fs::read_to_string(&job.stderr).unwrap();
    assert_eq!(err.matches("caught the panic").count(), 1, "{err}");
}

#[test]
fn rust_ring_without_an_agent_stops_on_sigusr1() {
    let prog = rust_ring();
    let mpi = rust_ring_mpi();
    let dir = TempDir::new("rsmpi-signal");
    let cuts = dir.0.join("cuts");
    fs::create_dir_all(&cuts).unwrap();
    let mut job = Job::start(mpi, prog, &[cuts.to_str().unwrap(), "16"], &[], &dir.0);
    wait_ready(&job);
    let err = fs::read_to_string(&job.stderr).unwrap();
    assert_eq!(err.matches("agent: false").count(), RANKS as usize, "{err}");
    // Forwarded by the launcher to every rank: each must have its handler (installed before
    // "ready") by then; the pause lets the launcher's own setup finish too.
    std::thread::sleep(Duration::from_millis(300));
    let mut last_sent = 0;
    for k in 1..=2u64 {
        let epoch = SIGNAL_EPOCH_BASE + k;
        job.signal(libc::SIGUSR1);
        let sent = check_cut(&cuts, epoch);
        assert!(sent > last_sent, "no traffic between cuts");
        last_sent = sent;
        let iteration = cut_iterations(&cuts, epoch)[0];
        assert!(job.running(), "{}", job.logs());
        job.signal(libc::SIGUSR1); // releases the cut
        for rec in read_records(&cuts, "resumed", epoch) {
            assert_eq!(rec, format!("aborted {iteration}\n"));
        }
    }
    fs::write(cuts.join("stop"), "").unwrap();
    ended_ok(&mut job, 2);
}

#[test]
fn rust_ring_with_a_missing_agent_socket_fails_init_on_every_rank() {
    let prog = rust_ring();
    let mpi = rust_ring_mpi();
    let dir = TempDir::new("rsmpi-nosock");
    let missing = dir.0.join("no-agent.sock");
    let env = [
        (
            "SYMVIRT_AGENT_SOCKET".to_string(),
            missing.display().to_string(),
        ),
        ("SYMVIRT_CONNECT_TIMEOUT_MS".into(), "200".into()),
    ];
    let mut job = Job::start(mpi, prog, &[dir.0.to_str().unwrap(), "16"], &env, &dir.0);
    let (ok, out) = job.wait();
    assert!(!ok, "the job should fail\n{}", job.logs());
    assert!(!out.contains(" OK rank "), "{out}");
    let err = fs::read_to_string(&job.stderr).unwrap();
    let why = format!("at {}", missing.display());
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| l.contains(": SymVirt::init: ") && l.contains(&why))
        .collect();
    assert_eq!(lines.len(), RANKS as usize, "{err}");
}

/// Runs [`singleton_checks`] in a process of its own (MPI_Init as a singleton changes the
/// process's environment, which the other tests' launchers would inherit), bounded in time.
#[test]
fn singleton_misuse_is_an_error_and_init_can_be_repeated() {
    let exe = std::env::current_exe().unwrap();
    let dir = TempDir::new("rsmpi-singleton-run");
    let out = dir.0.join("out");
    let child = Command::new(exe)
        .args([
            "--exact",
            "singleton_checks",
            "--include-ignored",
            "--nocapture",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .unwrap();
    let mut child = KillOnDrop(child);
    let deadline = soon();
    let status = loop {
        if let Some(st) = child.0.try_wait().unwrap() {
            break st;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "singleton_checks hung"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = fs::read_to_string(&out).unwrap();
    assert!(status.success(), "{text}");
    assert!(text.contains("test result: ok. 1 passed"), "{text}");
}

struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// As an MPI singleton (no launcher): misuse of the agreement and of `SymVirt` is an error,
/// not a panic or a hang, and the set-up can be repeated. Ignored in the normal run: it
/// initializes MPI in the test process; the test above runs it alone in a child process.
#[test]
#[ignore = "run in a child process by singleton_misuse_is_an_error_and_init_can_be_repeated"]
fn singleton_checks() {
    use mpi::traits::*;
    use symvirt_mpi::Error;
    use symvirt_mpi::rsmpi::{MpiAgreement, Options, SafePointResult, SymVirt};
    use symvirt_mpi::safepoint::{Agreement, SLOTS, SafePoint};

    let before = SymVirt::init(&mpi::topology::SimpleCommunicator::world()).unwrap_err();
    assert!(matches!(before, Error::State(_)), "{before}");
    let (universe, _) =
        mpi::initialize_with_threading(mpi::Threading::Funneled).expect("MPI initialized once");
    let world = universe.world();
    assert_eq!(world.size(), 1);

    let mut a = MpiAgreement::new(&world);
    assert!(matches!(a.start(SLOTS, 1), Err(Error::State(_))));
    assert!(matches!(a.finish(0), Err(Error::State(_))));
    a.start(0, 7).unwrap();
    assert!(matches!(a.start(0, 8), Err(Error::State(_))), "slot busy");
    a.start(1, 9).unwrap();
    assert_eq!(a.finish(1).unwrap(), 9);
    assert_eq!(a.finish(0).unwrap(), 7);
    a.barrier().unwrap();
    a.start(2, 3).unwrap();
    drop(a); // a reduction in flight: left to MPI, no wait, no panic

    let mut sp = SafePoint::new(MpiAgreement::new(&world), None);
    for _ in 0..50 {
        assert_eq!(sp.poll().unwrap(), SafePointResult::Continue);
    }
    assert!(sp.finish().unwrap().is_none());

    let dir = TempDir::new("rsmpi-singleton");
    let no_agent = Options {
        socket: None,
        connect_timeout: Duration::from_millis(200),
        quiesce_timeout: Duration::from_secs(10),
        signal_trigger: false,
    };
    let missing = Options {
        socket: Some(dir.0.join("no-agent.sock")),
        ..no_agent.clone()
    };
    let err = SymVirt::init_with(&world, missing).unwrap_err();
    assert!(matches!(err, Error::Agent { .. }), "{err}");
    // The failed init left nothing open.
    let mut sv = SymVirt::init_with(&world, no_agent.clone()).unwrap();
    assert!(!sv.has_agent());
    let again = SymVirt::init_with(&world, no_agent.clone()).unwrap_err();
    assert!(matches!(again, Error::State(_)), "{again}");
    for _ in 0..20 {
        assert_eq!(sv.safe_point().unwrap(), SafePointResult::Continue);
    }
    assert_eq!(sv.iteration(), 20);
    sv.finalize().unwrap();
    // After finalize, and after a drop without finalize, init works again.
    let mut sv = SymVirt::init_with(&world, no_agent.clone()).unwrap();
    sv.safe_point().unwrap();
    drop(sv);
    SymVirt::init_with(&world, no_agent.clone())
        .unwrap()
        .finalize()
        .unwrap();
    // Used after MPI_Finalize: errors, no MPI call (which would abort the process).
    let mut sv = SymVirt::init_with(&world, no_agent).unwrap();
    sv.safe_point().unwrap();
    drop(world);
    drop(universe);
    assert!(matches!(sv.safe_point(), Err(Error::State(_))));
    assert!(matches!(sv.finalize(), Err(Error::State(_))));
}

/// Rank 1 alone is given `rank1_socket` instead of the agent's socket (a shell wrapper sets
/// its environment): every rank's `init` fails, the job ends, no rank waits in a safe point.
fn one_rank_differs(tag: &str, rank1_socket: &str, rank1_says: &str, others_say: &str) {
    let prog = rust_ring();
    let mpi = rust_ring_mpi();
    let rig = Rig::new(tag);
    let env = [
        rig.agent_env(),
        ("SYMVIRT_CONNECT_TIMEOUT_MS".into(), "2000".into()),
        ("RANK1_SOCKET".into(), rank1_socket.into()),
    ];
    let script = r#"rank=${OMPI_COMM_WORLD_RANK:-$PMI_RANK}
if [ "$rank" = 1 ]; then export SYMVIRT_AGENT_SOCKET="$RANK1_SOCKET"; fi
exec "$0" "$@""#;
    let dir = rig.dir.0.to_str().unwrap();
    let args = ["-c", script, prog.to_str().unwrap(), dir, "16"];
    let mut job = Job::start(mpi, Path::new("/bin/sh"), &args, &env, &rig.dir.0);
    let (ok, out) = job.wait();
    assert!(!ok, "the job should fail\n{}", job.logs());
    assert!(!out.contains(" OK rank "), "{out}");
    let err = fs::read_to_string(&job.stderr).unwrap();
    // One report per rank, each up to its line's end (split on the prefix, not on newlines:
    // the ranks share one stderr).
    let init_errors: Vec<String> = err
        .split("rust_ring: rank ")
        .filter_map(|r| r.lines().next())
        .filter(|l| l.contains(": SymVirt::init: "))
        .map(|l| format!("rank {l}"))
        .collect();
    assert_eq!(init_errors.len(), RANKS as usize, "{err}");
    for l in &init_errors {
        let want = if l.contains("rank 1:") {
            rank1_says
        } else {
            others_say
        };
        assert!(l.contains(want), "{l}\nwant {want:?}\n{err}");
    }
}

#[test]
fn one_rank_without_its_agent_fails_init_on_every_rank() {
    one_rank_differs(
        "rsmpi-one-missing",
        "/nonexistent/symvirt-agent.sock",
        "register rank 1 at /nonexistent/symvirt-agent.sock",
        "another rank could not reach its guest agent",
    );
}

#[test]
fn one_rank_with_no_agent_configured_fails_init_on_every_rank() {
    // An empty socket variable: no agent for rank 1 (the default socket does not exist here).
    one_rank_differs(
        "rsmpi-one-none",
        "",
        "some ranks have a guest agent and some have none",
        "some ranks have a guest agent and some have none",
    );
}

/// The Rust API carries the cure for MPICH 4.0's deadlock in MPI_Finalize over UCX's TCP
/// transport (`csrc/ucx_finalize.c`, compiled by the build script): linked with MPICH,
/// `rust_ring` exports the two UCX calls it interposes and its jobs over TCP end, rank 0 made
/// late to its closes; linked with Open MPI (not affected) it carries no such symbol.
#[test]
fn rust_ring_over_tcp_ends_without_deadlock_in_finalize_with_mpich() {
    let prog = rust_ring();
    let symbols = bounded_output(Command::new("nm").args(["-D", "--defined-only"]).arg(prog));
    let interposes =
        symbols.contains(" ucp_disconnect_nb") && symbols.contains(" ucp_worker_create");
    match rust_ring_mpi() {
        MpiImpl::Mpich => {
            assert!(interposes, "rust_ring exports no UCX cure:\n{symbols}");
            for run in 0..3 {
                let tag = format!("rsmpi-fin-tcp-{run}");
                mpich_job_over_tcp_ends(prog, &[], None, "rust_ring OK", &tag);
            }
        }
        MpiImpl::OpenMpi => assert!(!interposes, "an Open MPI build interposes UCX"),
    }
}

/// The Rust API's quiet thread: rank 0 (and only it) warns when the thread starts (its first
/// quiet phase) where unbound ranks are each a scheduling group of their own, which MPICH's
/// ranks are (a session each) and Open MPI's are not (one session).
#[test]
fn rust_ring_rank_zero_warns_at_its_first_quiet_phase_when_unbound_ranks_are_groups() {
    if !placement_warnings_testable() {
        return;
    }
    let prog = rust_ring();
    let mpi = rust_ring_mpi();
    let rig = Rig::new("rsmpi-place");
    let cmd = mpi.launcher(RANKS, &[rig.agent_env()]);
    let stderr = stderr_of_short_run(&rig, cmd, "rust_ring OK rank ", |work| {
        let prog = prog.display().to_string();
        vec![prog, work.into(), "2".into(), "30".into()]
    });
    let warnings = stderr.matches(PLACEMENT_WARNING).count();
    let expected = usize::from(mpi == MpiImpl::Mpich);
    assert_eq!(warnings, expected, "{mpi:?}: {stderr}");
}
