//! Shared test rig: builds the per-MPI libraries and programs once per test process, runs an
//! in-process guest agent with a fake host channel (a unix socket the test drives), launches
//! 4-rank MPI jobs under a time limit and kills them (by process group id) when dropped.
#![allow(dead_code)]

pub mod cut;

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};
use symvirt::host_channel::{ChannelOptions, HostChannel};
use symvirt::protocol::{GuestMessage, HostMessage, Interconnect};
use symvirt_agent::agent::{Agent, AgentConfig};
use symvirt_agent::guest_link::ChannelSpec;
use symvirt_mpi::mpi_build::{self, Libraries, Linkage, MpiImpl};

/// Ranks per job (the requirement).
pub const RANKS: u32 = 4;
/// Upper bound for any single wait; a test never hangs longer.
pub const PATIENCE: Duration = Duration::from_secs(120);

pub fn soon() -> Instant {
    Instant::now() + PATIENCE
}

/// The workspace's target directory (tests run from target/<profile>/deps/).
fn target_profile_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// This crate's staticlib (`libsymvirt_mpi.a`), brought up to date with the sources by a
/// nested `cargo build` (a no-op when fresh; `cargo test` does not always emit the staticlib).
/// In the release profile (benches/mpi_overhead.rs includes this module) it is built with
/// `--release`, so the layer a bench measures is optimized.
fn core_staticlib() -> PathBuf {
    let profile = target_profile_dir();
    let lib = profile.join("libsymvirt_mpi.a");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut build = Command::new(cargo);
    build.args(["build", "-q", "-p", "symvirt-mpi", "--lib"]);
    if profile.file_name().is_some_and(|n| n == "release") {
        build.arg("--release");
    }
    let st = build.status().expect("run cargo build");
    assert!(st.success(), "cargo build -p symvirt-mpi --lib failed");
    assert!(lib.exists(), "{} missing", lib.display());
    lib
}

static LIBS: OnceLock<Mutex<HashMap<MpiImpl, Libraries>>> = OnceLock::new();

/// The libraries for `mpi`, built once per test process.
pub fn libraries(mpi: MpiImpl) -> Libraries {
    let mut map = LIBS.get_or_init(Default::default).lock().unwrap();
    if let Some(l) = map.get(&mpi) {
        return l.clone();
    }
    let dir = target_profile_dir().join("symvirt-mpi").join(mpi.name());
    let libs =
        mpi_build::build_libraries(mpi, &core_staticlib(), &dir).unwrap_or_else(|e| panic!("{e}"));
    map.insert(mpi, libs.clone());
    libs
}

/// A test program from tests/programs, built for `mpi` (once per test process).
pub fn program(mpi: MpiImpl, source: &str, linkage: Linkage) -> PathBuf {
    type Built = HashMap<(MpiImpl, String, bool), PathBuf>;
    static BUILT: OnceLock<Mutex<Built>> = OnceLock::new();
    let libs = libraries(mpi);
    let mut map = BUILT.get_or_init(Default::default).lock().unwrap();
    let key = (mpi, source.to_string(), linkage == Linkage::Explicit);
    if let Some(p) = map.get(&key) {
        return p.clone();
    }
    let src = mpi_build::crate_dir().join("tests/programs").join(source);
    let stem = Path::new(source).file_stem().unwrap().to_string_lossy();
    let kind = if linkage == Linkage::Explicit {
        "explicit"
    } else {
        "plain"
    };
    let out = libs.dir.join(format!("{stem}-{kind}"));
    let p = mpi_build::build_program(&libs, &src, linkage, &out).unwrap_or_else(|e| panic!("{e}"));
    map.insert(key, p.clone());
    p
}

pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("symvirt-mpi-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A guest agent for `RANKS` ranks, connected to a host channel the test drives.
pub struct Rig {
    pub dir: TempDir,
    pub host: HostChannel,
    pub agent: Option<Agent>,
}

impl Rig {
    pub fn new(tag: &str) -> Rig {
        let dir = TempDir::new(tag);
        let host_sock = dir.0.join("host.sock");
        let host = HostChannel::listen(&host_sock, ChannelOptions::labelled(tag)).unwrap();
        let agent = Agent::spawn(AgentConfig {
            vm: format!("vm-{tag}"),
            channel: ChannelSpec::Unix(host_sock),
            rank_socket: dir.0.join("agent.sock"),
            ranks: RANKS,
            ..AgentConfig::default()
        })
        .unwrap();
        host.wait_hello(soon()).unwrap();
        Rig {
            dir,
            host,
            agent: Some(agent),
        }
    }

    /// The ranks' environment for the transparent layer of `mpi` against this rig's agent.
    pub fn transparent_env(&self, mpi: MpiImpl) -> Vec<(String, String)> {
        vec![
            self.agent_env(),
            (
                "LD_PRELOAD".to_string(),
                libraries(mpi).transparent.display().to_string(),
            ),
        ]
    }

    /// The ranks' variable naming this rig's agent socket (`SYMVIRT_AGENT_SOCKET`).
    pub fn agent_env(&self) -> (String, String) {
        (
            "SYMVIRT_AGENT_SOCKET".to_string(),
            self.rank_socket().display().to_string(),
        )
    }

    /// The host goes away (its controller died) and a new one listens where it did: returns
    /// once the agent has reconnected and said hello to it.
    pub fn new_host(&mut self, tag: &str) {
        let nowhere =
            HostChannel::connect(self.dir.0.join("nowhere.sock"), ChannelOptions::default());
        drop(std::mem::replace(&mut self.host, nowhere.unwrap()));
        let path = self.dir.0.join("host.sock");
        self.host = HostChannel::listen(&path, ChannelOptions::labelled(tag)).unwrap();
        self.host.wait_hello(soon()).unwrap();
    }

    pub fn rank_socket(&self) -> PathBuf {
        self.dir.0.join("agent.sock")
    }

    pub fn prepare(&self, epoch: u64) {
        self.host
            .send(&HostMessage::Prepare {
                epoch,
                deadline_ms: PATIENCE.as_millis() as u64,
            })
            .unwrap();
    }

    /// Waits for the next non-hello message from the guest.
    pub fn outcome(&self) -> GuestMessage {
        self.host
            .wait_for(|m| !matches!(m, GuestMessage::Hello { .. }), soon())
            .unwrap_or_else(|e| panic!("no answer from the guest agent: {e}"))
    }

    pub fn resume(&self, epoch: u64, interconnect: Interconnect) {
        self.host
            .send(&HostMessage::Resume {
                epoch,
                interconnect,
            })
            .unwrap();
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.agent.take();
    }
}

/// A running MPI job; killed (its whole process group) when dropped.
pub struct Job {
    child: Option<Child>,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

impl Job {
    pub fn start(
        mpi: MpiImpl,
        program: &Path,
        args: &[&str],
        env: &[(String, String)],
        logs: &Path,
    ) -> Job {
        Job::start_ranks(mpi, RANKS, program, args, env, logs)
    }

    /// Like [`Job::start`] with `ranks` ranks instead of `RANKS`.
    pub fn start_ranks(
        mpi: MpiImpl,
        ranks: u32,
        program: &Path,
        args: &[&str],
        env: &[(String, String)],
        logs: &Path,
    ) -> Job {
        let mut cmd = mpi.launcher(ranks, env);
        cmd.arg(program).args(args);
        Job::spawn(cmd, logs)
    }

    /// Starts `cmd` (a launcher with its program) as a job, its output in `logs`.
    pub fn spawn(mut cmd: Command, logs: &Path) -> Job {
        let stdout = logs.join("stdout");
        let stderr = logs.join("stderr");
        cmd.stdin(Stdio::null())
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().unwrap();
        Job {
            child: Some(child),
            stdout,
            stderr,
        }
    }

    pub fn logs(&self) -> String {
        format!(
            "--- stdout\n{}\n--- stderr\n{}{}",
            fs::read_to_string(&self.stdout).unwrap_or_default(),
            fs::read_to_string(&self.stderr).unwrap_or_default(),
            self.backtraces()
        )
    }

    /// Waits (at most `PATIENCE`) until the job's stderr contains `needle`.
    pub fn wait_for_stderr(&self, needle: &str) {
        let deadline = soon();
        while !fs::read_to_string(&self.stderr)
            .unwrap_or_default()
            .contains(needle)
        {
            assert!(Instant::now() < deadline, "no {needle:?}\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stacks of the job's ranks (gdb, when installed), to explain a hang.
    pub fn backtraces(&self) -> String {
        let Some(child) = self.child.as_ref() else {
            return String::new();
        };
        let pgid = child.id() as i32;
        let mut out = String::new();
        for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            // SAFETY: getpgid(2) on a pid read from /proc; no memory is touched.
            let in_job = unsafe { libc::getpgid(pid) } == pgid;
            let comm = fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            if !in_job || comm.trim().starts_with("mpi") || comm.trim().starts_with("orted") {
                continue;
            }
            let bt = Command::new("gdb")
                .args([
                    "-p",
                    &pid.to_string(),
                    "-batch",
                    "-ex",
                    "thread apply all bt",
                ])
                .stdin(Stdio::null())
                .output();
            if let Ok(o) = bt {
                let text = String::from_utf8_lossy(&o.stdout);
                out.push_str(&format!("\n--- stack of {pid} {}\n", comm.trim()));
                for l in text
                    .lines()
                    .filter(|l| l.starts_with('#') || l.starts_with("Thread "))
                {
                    out.push_str(l);
                    out.push('\n');
                }
            }
        }
        out
    }

    /// Asks the stress program to stop (DIR/stop in `dir`), waits for it, and checks that it
    /// succeeded and every rank printed its OK line; returns its stdout.
    pub fn stop_and_check(&mut self, dir: &Path) -> String {
        fs::write(dir.join("stop"), "").unwrap();
        let (ok, out) = self.wait();
        assert!(ok, "MPI job failed\n{}", self.logs());
        assert_eq!(out.matches(" OK rank ").count(), RANKS as usize, "{out}");
        out
    }

    /// Waits for the job to end (at most `PATIENCE`); returns (success, stdout).
    pub fn wait(&mut self) -> (bool, String) {
        self.wait_at_most(PATIENCE)
    }

    /// Waits for the job to end, at most `limit` (then fails the test with the ranks' stacks);
    /// returns (success, stdout).
    pub fn wait_at_most(&mut self, limit: Duration) -> (bool, String) {
        let deadline = Instant::now() + limit;
        let child = self.child.as_mut().unwrap();
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                self.child = None;
                return (
                    st.success(),
                    fs::read_to_string(&self.stdout).unwrap_or_default(),
                );
            }
            if Instant::now() > deadline {
                let logs = self.logs();
                self.kill();
                panic!("MPI job did not finish in {limit:?}\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `sig` to the launcher (mpirun/mpiexec forward SIGUSR1 to every rank).
    pub fn signal(&self, sig: i32) {
        let pid = self.child.as_ref().expect("job running").id() as i32;
        // SAFETY: kill(2) on the launcher this job started.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.as_mut().map(|c| c.try_wait()), Some(Ok(None)))
    }

    /// Ends the job: SIGTERM to the launcher first, which ends the ranks and removes their
    /// shared-memory files (Open MPI's `/dev/shm/vader_segment.*` stay behind a SIGKILL), then,
    /// after at most 5 s, SIGKILL to whatever is left of the process group.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pid = c.id() as i32;
            // SAFETY: kill(2) on the launcher this job started.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            // SAFETY: kill(2) on the process group this job created (process_group(0)).
            unsafe {
                libc::kill(-pid, libc::SIGKILL);
            }
            let _ = c.wait();
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Reads the cut records `DIR/<prefix>-<epoch>-<rank>`, waiting until all ranks wrote theirs.
pub fn read_records(dir: &Path, prefix: &str, epoch: u64) -> Vec<String> {
    let deadline = soon();
    loop {
        if let Some(recs) = records_now(dir, prefix, epoch) {
            return recs;
        }
        assert!(
            Instant::now() < deadline,
            "{prefix} records for epoch {epoch} missing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The cut records `DIR/<prefix>-<epoch>-<rank>` if every rank has written its own, now.
pub fn records_now(dir: &Path, prefix: &str, epoch: u64) -> Option<Vec<String>> {
    (0..RANKS)
        .map(|r| {
            fs::read_to_string(dir.join(format!("{prefix}-{epoch}-{r}")))
                .ok()
                .filter(|s| s.ends_with('\n'))
        })
        .collect()
}

pub fn ethernet(n: u8) -> Interconnect {
    Interconnect::Ethernet {
        mac: format!("52:54:00:00:00:{n:02x}"),
        iface: Some(format!("eth{n}")),
        pci: None,
    }
}

pub fn infiniband() -> Interconnect {
    Interconnect::Infiniband {
        hca: "mlx5_1".into(),
        port: 1,
        pci: Some("0000:00:05.0".into()),
    }
}

/// The interconnect epoch `epoch` resumes on: Ethernet for odd epochs, InfiniBand for even
/// ones, so every run switches both ways.
pub fn interconnect_for(epoch: u64) -> Interconnect {
    if epoch % 2 == 1 {
        ethernet(epoch as u8)
    } else {
        infiniband()
    }
}

/// Waits until the job creates `path` (a test program's handshake file), failing early with
/// the job's logs if it ends first.
pub fn wait_for_file(job: &mut Job, path: &std::path::Path) {
    let until = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(job.running(), "job ended early\n{}", job.logs());
        assert!(
            Instant::now() < until,
            "{} never came\n{}",
            path.display(),
            job.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Resumes the quiesced ranks of `epoch` on `ic` and waits until the agent reports them
/// resumed on it.
pub fn resume_and_confirm(rig: &Rig, job: &mut Job, epoch: u64, ic: &Interconnect) {
    rig.resume(epoch, ic.clone());
    match outcome_while_running(rig, job) {
        GuestMessage::Resumed {
            epoch: e,
            interconnect,
            ..
        } if e == epoch => assert_eq!(&interconnect, ic),
        other => panic!(
            "epoch {epoch}: expected resumed, got {other:?}\n{}",
            job.logs()
        ),
    }
}

/// Waits for the agent's next report, failing early with the job's logs if the job dies.
pub fn outcome_while_running(rig: &Rig, job: &mut Job) -> GuestMessage {
    let deadline = soon();
    loop {
        match rig.host.wait_for(
            |m| !matches!(m, GuestMessage::Hello { .. }),
            Instant::now() + Duration::from_millis(300),
        ) {
            Ok(m) => return m,
            Err(symvirt::Error::Timeout) => {}
            Err(e) => panic!("host channel: {e}"),
        }
        assert!(job.running(), "MPI job ended early\n{}", job.logs());
        assert!(
            Instant::now() < deadline,
            "no report from the agent\n{}",
            job.logs()
        );
    }
}

/// Waits for the job, which must succeed with every rank printing a line that starts with
/// `ok_prefix`; returns its standard output.
pub fn wait_every_rank_ok(job: &mut Job, ok_prefix: &str) -> String {
    let (ok, out) = job.wait();
    assert!(ok, "the MPI job failed\n{}", job.logs());
    let oks = out.lines().filter(|l| l.starts_with(ok_prefix)).count();
    assert_eq!(oks, RANKS as usize, "{out}");
    out
}

/// What rank 0 prints at start when the kernel may leave a cut thread unrun for tens of
/// milliseconds (see `symvirt_mpi::placement`).
pub const PLACEMENT_WARNING: &str = "symvirt: this rank is not bound to a core";

/// Whether placement warnings can be tested here ([`sessions_are_groups_here`]); prints why
/// not (a SKIPPED line) when they cannot.
pub fn placement_warnings_testable() -> bool {
    let here = sessions_are_groups_here();
    if !here {
        println!(
            "SKIPPED: autogroups off, or not in the root CPU cgroup, or a single core: no \
             placement to warn about"
        );
    }
    here
}

/// A short run started by `cmd` (a launcher, with its environment) against `rig`'s agent: the
/// program and its arguments are `args(work)`, for a work directory that holds `stop` (so the
/// stress program and `rust_ring` end at their first look); every rank must print a line
/// starting with `ok_prefix`. Returns the job's stderr.
pub fn stderr_of_short_run(
    rig: &Rig,
    mut cmd: Command,
    ok_prefix: &str,
    args: impl FnOnce(&str) -> Vec<String>,
) -> String {
    let work = rig.dir.0.join("work");
    fs::create_dir_all(&work).unwrap();
    fs::write(work.join("stop"), "").unwrap();
    cmd.args(args(work.to_str().unwrap()));
    let mut job = Job::spawn(cmd, &rig.dir.0);
    wait_every_rank_ok(&mut job, ok_prefix);
    fs::read_to_string(&job.stderr).unwrap()
}

/// Whether every session is a scheduling group of its own here, read directly rather than
/// through the code under test, for the plain case: autogroups on, the test in the root CPU
/// cgroup (v1 `cpu:/`, or v2 `0::/`), and more than one core.
fn sessions_are_groups_here() -> bool {
    let read = |path: &str| fs::read_to_string(path).unwrap_or_default();
    let on = read("/proc/sys/kernel/sched_autogroup_enabled");
    let groups = read("/proc/self/cgroup");
    // The v1 cpu hierarchy's line if there is one (a hybrid system has both), else v2's.
    let lines: Vec<Vec<&str>> = groups.lines().map(|l| l.splitn(3, ':').collect()).collect();
    let cpu_line = lines
        .iter()
        .find(|f| f.len() == 3 && f[0] != "0" && f[1].split(',').any(|c| c == "cpu"))
        .or_else(|| lines.iter().find(|f| f.len() == 3 && f[0] == "0"));
    let root = cpu_line.is_some_and(|f| f[2] == "/");
    // The hardware threads of cpu0's core: a list such as "0-1" or "0,4".
    let siblings = read("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list");
    let threads_of_cpu0: usize = siblings
        .trim()
        .split(',')
        .map(|part| match part.split_once('-') {
            Some((lo, hi)) => {
                hi.parse::<usize>().unwrap_or(0) + 1 - lo.parse::<usize>().unwrap_or(0)
            }
            None => 1,
        })
        .sum::<usize>()
        .max(1);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    on.trim() == "1" && root && cpus > threads_of_cpu0
}

/// `tests/programs/late_finalize.c` built as a library to preload into MPICH ranks (once per
/// test process).
fn late_finalize_library() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let src = mpi_build::crate_dir().join("tests/programs/late_finalize.c");
            let dir = target_profile_dir().join("symvirt-mpi");
            fs::create_dir_all(&dir).unwrap();
            let out = dir.join("late_finalize.so");
            let st = Command::new(MpiImpl::Mpich.mpicc())
                .args([
                    "-shared", "-fPIC", "-O2", "-Wall", "-Wextra", "-Werror", "-o",
                ])
                .arg(&out)
                .arg(&src)
                .status()
                .unwrap();
            assert!(st.success(), "build {}", src.display());
            out
        })
        .clone()
}

/// Runs `runs` short jobs of the stress program, MPICH ranks under `linkage`, through
/// [`mpich_job_over_tcp_ends`].
pub fn mpich_jobs_over_tcp_end(linkage: Linkage, tag: &str, runs: u32) {
    let mpi = MpiImpl::Mpich;
    let prog = program(mpi, "stress.c", linkage);
    let layer = (linkage == Linkage::Plain).then(|| libraries(mpi).transparent);
    for run in 0..runs {
        let tag = format!("{tag}-{run}");
        mpich_job_over_tcp_ends(
            &prog,
            &["ring,collective"],
            layer.as_deref(),
            "stress OK",
            &tag,
        );
    }
}

/// One short MPICH job of `prog` (`args`, then a work directory that holds `stop`, then a
/// minimum of 2 iterations) against a rig's agent, `layer` preloaded when given, with all its
/// traffic over UCX's TCP transport on the loopback (MPICH's shared memory between local
/// ranks off) and rank 0 made late to its closes in MPI_Finalize by
/// `tests/programs/late_finalize.c`: the job must end within 60 s, every rank printing a line
/// that starts with `ok_prefix` and its rank. Without the cure of `csrc/ucx_finalize.c`
/// (SYMVIRT_MPICH_FINALIZE_BARRIER=0) every such launch deadlocks inside MPICH 4.0's
/// MPI_Finalize (measured: 5 of 5 with the stress program under the layer, 5 of 5 with it
/// linked with the explicit API, 4 of 4 with the Rust API's `rust_ring`; without the harness,
/// 3 of 12 plain launches of the stress program).
pub fn mpich_job_over_tcp_ends(
    prog: &Path,
    args: &[&str],
    layer: Option<&Path>,
    ok_prefix: &str,
    tag: &str,
) {
    let rig = Rig::new(tag);
    let work = rig.dir.0.join("work");
    fs::create_dir_all(&work).unwrap();
    fs::write(work.join("stop"), "").unwrap(); // out at the first look
    // MPICH's calls reach the cure first (the layer, preloaded before the harness, or the
    // program's own definitions), then the harness, then libucp: the cure counts only calls
    // made from MPICH's library.
    let late = late_finalize_library().display().to_string();
    let preload = match layer {
        Some(layer) => format!("{} {late}", layer.display()),
        None => late,
    };
    let mut env = vec![rig.agent_env()];
    for (k, v) in [
        ("LD_PRELOAD", preload.as_str()),
        ("UCX_TLS", "tcp,self"),
        ("UCX_NET_DEVICES", "lo"),
        ("MPIR_CVAR_NOLOCAL", "1"),
    ] {
        env.push((k.to_string(), v.to_string()));
    }
    let mut args = args.to_vec();
    args.extend([work.to_str().unwrap(), "2"]);
    let mut job = Job::start(MpiImpl::Mpich, prog, &args, &env, &rig.dir.0);
    let (ok, out) = job.wait_at_most(Duration::from_secs(60));
    assert!(ok, "{tag}: the MPI job failed\n{}", job.logs());
    let oks = out
        .lines()
        .filter(|l| l.starts_with(&format!("{ok_prefix} rank ")))
        .count();
    assert_eq!(oks, RANKS as usize, "{tag}: {out}");
}

/// Asks the agent to cut the job for `epoch` and waits until every rank is quiesced (any other
/// answer fails the test, with the job's logs); returns the time from request to quiesced.
pub fn quiesce(rig: &Rig, job: &mut Job, epoch: u64) -> Duration {
    let asked = Instant::now();
    rig.prepare(epoch);
    match outcome_while_running(rig, job) {
        GuestMessage::Quiesced { epoch: e } if e == epoch => asked.elapsed(),
        other => panic!(
            "epoch {epoch}: expected quiesced, got {other:?}\n{}",
            job.logs()
        ),
    }
}

/// CLOCK_MONOTONIC in nanoseconds, the clock of the stress program's entries.
pub fn monotonic_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime(2) writes the one timespec passed, which lives across the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    assert_eq!(rc, 0);
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Every rank's MPI entries after its compute phases (the stress program's DIR/entries-R):
/// (rank, entered, returned), `returned` None for a call still in progress.
pub fn entries(dir: &Path) -> Vec<(u32, u64, Option<u64>)> {
    let mut out = Vec::new();
    for rank in 0..RANKS {
        let text = fs::read_to_string(dir.join(format!("entries-{rank}"))).unwrap_or_default();
        for line in text.split_inclusive('\n') {
            let mut v = line.split_whitespace().map(|x| x.parse::<u64>().unwrap());
            let Some(enter) = v.next() else { continue };
            let ret = if line.ends_with('\n') { v.next() } else { None };
            out.push((rank, enter, ret));
        }
    }
    out
}

/// Pseudo-random waits that differ each run (no fixed phase relation to a program's phases).
pub struct Jitter(u64);

impl Jitter {
    pub fn new() -> Jitter {
        Jitter(u64::from(std::process::id()) ^ monotonic_ns())
    }

    /// The same sequence every run (a bench's requests).
    pub fn seeded(seed: u64) -> Jitter {
        Jitter(seed)
    }

    /// Milliseconds in `lo..hi`.
    pub fn ms(&mut self, lo: u64, hi: u64) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        lo + (self.0 >> 33) % (hi - lo)
    }
}

/// A cut held from `from` to `until` (CLOCK_MONOTONIC ns) while the ranks were paused.
pub struct Hold {
    pub epoch: u64,
    pub from: u64,
    pub until: u64,
}

/// Holds the cut of `epoch` (quiesced at `from`) until a rank of the stress program has
/// entered its first MPI call after a compute phase (entries, see [`entries`]), or for `wait`
/// if every rank was inside MPI already, then 200 ms more. A call entered during the cut must
/// not return before the resume: checked here while holding, and by [`check_holds`] after.
pub fn hold_cut(dir: &Path, job: &Job, epoch: u64, from: u64, wait: Duration) -> Hold {
    let deadline = Instant::now() + wait;
    while Instant::now() < deadline {
        let during: Vec<_> = entries(dir)
            .into_iter()
            .filter(|&(_, enter, _)| enter > from)
            .collect();
        if let Some((rank, _, Some(_))) = during.iter().find(|e| e.2.is_some()) {
            panic!(
                "epoch {epoch}: rank {rank} entered MPI during the cut and returned before the \
                 resume\n{}",
                job.logs()
            );
        }
        if !during.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    Hold {
        epoch,
        from,
        until: monotonic_ns(),
    }
}

/// Every call entered while a cut held the ranks returned only after its resume; returns how
/// many such calls there were.
pub fn check_holds(dir: &Path, holds: &[Hold]) -> usize {
    let mut held = 0;
    for (rank, enter, ret) in entries(dir) {
        let ret = ret.expect("every call returned by the end");
        for h in holds {
            if enter > h.from && enter < h.until {
                assert!(
                    ret >= h.until,
                    "rank {rank}: an MPI call entered during the cut of epoch {} returned {} ms \
                     before the resume",
                    h.epoch,
                    (h.until - ret) / 1_000_000
                );
                held += 1;
            }
        }
    }
    held
}
