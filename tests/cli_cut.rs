//! `ninja-migrate cut`, as a benchmark harness uses it: a real MPI job (both MPIs, 2 ranks)
//! with the transparent layer preloaded and a guest agent beside it; `cut status`, then
//! `cut cycle` takes cuts while the job runs, `cut pause` holds it across processes until
//! `cut resume`, and the job's own check passes. Bad cases: no agent, no job at the agent, a job
//! that ends while cuts keep coming, a bad interconnect.

mod mpi_ring;

use mpi_ring::{built, ninja, text};
use ninja_testkit::mpi_or_skip;
use serde_json::Value;
use std::process::{Command, Output};
use std::time::Duration;
use symvirt_agent::agent::{Agent, AgentConfig};
use symvirt_agent::guest_link::ChannelSpec;
use symvirt_mpi::mpi_build::MpiImpl;

const INTERCONNECT: &str = r#"{"kind":"ethernet","mac":"52:54:00:00:00:01"}"#;

#[test]
fn cut_cycle_takes_cuts_of_a_running_job_under_both_mpis() {
    if !mpi_or_skip("cut_cycle_takes_cuts_of_a_running_job_under_both_mpis") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ninja-cli-cut-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for mpi in MpiImpl::ALL {
        let channel = dir.join(format!("{}-channel.sock", mpi.name()));
        let ranks = dir.join(format!("{}-ranks.sock", mpi.name()));
        let agent = Agent::spawn(AgentConfig {
            vm: format!("cut-{}", mpi.name()),
            channel: ChannelSpec::Listen(channel.clone()),
            rank_socket: ranks.clone(),
            ranks: 2,
            ..AgentConfig::default()
        })
        .unwrap();
        let channel_arg = channel.to_str().unwrap();
        let status = ninja(&["cut", "status", "--json", "--channel", channel_arg]);
        assert!(status.status.success(), "{}", text(&status));
        let info: Value = serde_json::from_slice(&status.stdout).unwrap();
        assert_eq!(info["ranks"], 2, "{info}");
        assert_eq!(info["vm"], format!("cut-{}", mpi.name()), "{info}");
        // No job yet: nobody registered.
        assert_eq!(info["registered"], 0, "{info}");
        assert_eq!(info["phase"], "running", "{info}");
        // A cut with no job there: refused at once, not after the deadline.
        let t = std::time::Instant::now();
        let lonely = ninja(&["cut", "pause", "--channel", channel_arg]);
        assert_eq!(lonely.status.code(), Some(1), "{}", text(&lonely));
        assert!(
            text(&lonely).contains("only 0 of the 2 ranks the agent expects have registered"),
            "{}",
            text(&lonely)
        );
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());

        let env = [
            (
                "LD_PRELOAD".to_string(),
                built(mpi, &dir.join("libs"))
                    .transparent
                    .display()
                    .to_string(),
            ),
            (
                "SYMVIRT_AGENT_SOCKET".to_string(),
                ranks.display().to_string(),
            ),
        ];
        let job = mpi
            .launcher(2, &env)
            .arg(mpi_ring::build(mpi, &dir, 3000, 1000))
            .spawn_output();
        // Ready to be cut once both ranks registered.
        let ready = ninja(&[
            "cut",
            "status",
            "--json",
            "--wait-registered",
            "--channel",
            channel_arg,
        ]);
        assert!(ready.status.success(), "{}: {}", mpi.name(), text(&ready));
        let ready: Value = serde_json::from_slice(&ready.stdout).unwrap();
        assert_eq!(ready["registered"], 2, "{ready}");
        let cuts = ninja(&[
            "cut",
            "cycle",
            "--json",
            "--channel",
            channel_arg,
            "--count",
            "3",
            "--every",
            "0.3",
            "--hold-ms",
            "50",
            "--interconnect",
            INTERCONNECT,
        ]);
        assert!(cuts.status.success(), "{}: {}", mpi.name(), text(&cuts));
        let lines: Vec<Value> = String::from_utf8_lossy(&cuts.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{}", text(&cuts));
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(l["cut"], i + 1, "{l}");
            assert_eq!(l["ranks"], 2, "{l}");
            assert!(l["quiesce_ms"].as_f64().unwrap() > 0.0, "{l}");
        }
        // A cut held across processes: pause, the job stays at the cut (its remaining laps
        // take under 3 s: it would have ended), resume, the job ends well.
        let paused = ninja(&["cut", "pause", "--json", "--channel", channel_arg]);
        assert!(paused.status.success(), "{}: {}", mpi.name(), text(&paused));
        let paused: Value = serde_json::from_slice(&paused.stdout).unwrap();
        let epoch = paused["epoch"].as_u64().unwrap().to_string();
        std::thread::sleep(Duration::from_secs(4));
        assert!(
            !job.is_finished(),
            "{}: the job ran on through the pause",
            mpi.name()
        );
        let resumed = ninja(&[
            "cut",
            "resume",
            "--json",
            "--channel",
            channel_arg,
            "--epoch",
            &epoch,
            "--interconnect",
            INTERCONNECT,
        ]);
        assert!(
            resumed.status.success(),
            "{}: {}",
            mpi.name(),
            text(&resumed)
        );
        let done = job.join().unwrap();
        assert!(done.status.success(), "{}: {}", mpi.name(), text(&done));
        let out = String::from_utf8_lossy(&done.stdout);
        assert!(
            out.contains("ring ok 3000"),
            "{}: {}",
            mpi.name(),
            text(&done)
        );

        // A job that ends while cuts keep coming: the cycle stops with the reason, in
        // bounded time, and the job itself ends well. The end may fall before a prepare, during
        // a quiesce, or during a resume (a rank resumed and left before it acknowledged).
        let short = mpi
            .launcher(2, &env)
            .arg(mpi_ring::build(mpi, &dir, 400, 1000))
            .spawn_output();
        let ready = ninja(&[
            "cut",
            "status",
            "--wait-registered",
            "--channel",
            channel_arg,
        ]);
        assert!(ready.status.success(), "{}: {}", mpi.name(), text(&ready));
        let t = std::time::Instant::now();
        let cuts = ninja(&[
            "cut",
            "cycle",
            "--channel",
            channel_arg,
            "--count",
            "1000",
            "--every",
            "0.01",
            "--timeout-ms",
            "20000",
            "--interconnect",
            INTERCONNECT,
        ]);
        assert_eq!(
            cuts.status.code(),
            Some(1),
            "{}: {}",
            mpi.name(),
            text(&cuts)
        );
        let why = text(&cuts);
        assert!(
            why.contains("have registered: no job there")
                || why.contains("did not reach the cut")
                || (why.contains("did not resume") && why.contains("left during epoch")),
            "{}: {why}",
            mpi.name()
        );
        eprintln!("{}: a cycle over a job that ended: {why}", mpi.name());
        assert!(t.elapsed() < Duration::from_secs(40), "{:?}", t.elapsed());
        let done = short.join().unwrap();
        assert!(done.status.success(), "{}: {}", mpi.name(), text(&done));
        assert!(
            String::from_utf8_lossy(&done.stdout).contains("ring ok 400"),
            "{}: {}",
            mpi.name(),
            text(&done)
        );
        drop(agent);
    }

    // No agent there: a clear error at once, no hang.
    let absent = dir.join("nobody.sock");
    let none = ninja(&["cut", "status", "--channel", absent.to_str().unwrap()]);
    assert!(!none.status.success());
    assert!(
        text(&none).contains("no agent channel at"),
        "{}",
        text(&none)
    );
    // An interconnect the protocol does not have.
    let bad = ninja(&[
        "cut",
        "cycle",
        "--channel",
        absent.to_str().unwrap(),
        "--interconnect",
        r#"{"kind":"token-ring"}"#,
    ]);
    assert_eq!(bad.status.code(), Some(2), "{}", text(&bad));
    assert!(text(&bad).contains("--interconnect"), "{}", text(&bad));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs a command to completion on a thread of its own.
trait SpawnOutput {
    fn spawn_output(&mut self) -> std::thread::JoinHandle<Output>;
}

impl SpawnOutput for Command {
    fn spawn_output(&mut self) -> std::thread::JoinHandle<Output> {
        let child = self
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::thread::spawn(move || child.wait_with_output().unwrap())
    }
}
