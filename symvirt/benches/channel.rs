//! Costs of the SymVirt channel. Prints one JSON line per scenario:
//! - `epoch-agent-Nranks`: an in-process guest agent with N rank threads that answer at once,
//!   reached through a listening `HostChannel`: latency of prepare -> quiesced and of
//!   resume -> resumed (median and p99 over the epochs, microseconds);
//! - `reject-<kind>`: how fast the host's reader judges and discards a hostile guest's lines of
//!   one kind (median over rounds, lines/s and MiB/s), with the kinds interleaved in rounds so
//!   their ratios come from one window.
//!
//! Run: `cargo bench -p symvirt --bench channel`.

use serde_json::json;
use std::io::{BufWriter, Write};
use std::os::unix::net::UnixListener;
use std::time::{Duration, Instant};
use symvirt::host_channel::{ChannelOptions, HostChannel};
use symvirt::protocol::{GuestMessage, HostMessage, Interconnect, MAX_LINE};
use symvirt::rank::{RankClient, RankEvent};
use symvirt_agent::agent::{Agent, AgentConfig};
use symvirt_agent::guest_link::ChannelSpec;

const EPOCHS: u64 = 300;
const ROUNDS: usize = 7;
const LINES_PER_ROUND: usize = 50_000;
const PATIENCE: Duration = Duration::from_secs(60);

/// The `p` quantile of sorted samples, to 0.1.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    (sorted[((sorted.len() - 1) as f64 * p).round() as usize] * 10.0).round() / 10.0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("symvirt-bench-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn wait(host: &HostChannel, want: fn(&GuestMessage) -> bool) {
    host.wait_for(want, Instant::now() + PATIENCE).unwrap();
}

fn epochs_with_ranks(ranks: u32) {
    let dir = temp_dir(&format!("epoch{ranks}"));
    let host_sock = dir.join("host.sock");
    let host = HostChannel::listen(&host_sock, ChannelOptions::labelled("bench")).unwrap();
    let rank_sock = dir.join("agent.sock");
    let agent = Agent::spawn(AgentConfig {
        vm: "bench".into(),
        channel: ChannelSpec::Unix(host_sock),
        rank_socket: rank_sock.clone(),
        ranks,
        ..AgentConfig::default()
    })
    .unwrap();
    host.wait_hello(Instant::now() + PATIENCE).unwrap();
    let workers: Vec<_> = (0..ranks)
        .map(|r| {
            let mut client = RankClient::connect(&rank_sock, r, PATIENCE).unwrap();
            std::thread::spawn(move || {
                // Answers everything at once until the agent goes away.
                while let Ok(Some(event)) = client.next_event(None) {
                    let _ = match event {
                        RankEvent::Prepare { epoch, .. } => client.quiesced(epoch),
                        RankEvent::Resume { epoch, .. } => client.resumed(epoch),
                        RankEvent::Abort { .. } => Ok(()),
                    };
                }
            })
        })
        .collect();
    let interconnect = Interconnect::Infiniband {
        hca: "mlx5_0".into(),
        port: 1,
        pci: None,
    };
    let (mut quiesce, mut resume) = (Vec::new(), Vec::new());
    for epoch in 1..=EPOCHS {
        let t = Instant::now();
        host.send(&HostMessage::Prepare {
            epoch,
            deadline_ms: 60_000,
        })
        .unwrap();
        wait(&host, |m| matches!(m, GuestMessage::Quiesced { .. }));
        quiesce.push(t.elapsed().as_secs_f64() * 1e6);
        let t = Instant::now();
        host.send(&HostMessage::Resume {
            epoch,
            interconnect: interconnect.clone(),
        })
        .unwrap();
        wait(&host, |m| matches!(m, GuestMessage::Resumed { .. }));
        resume.push(t.elapsed().as_secs_f64() * 1e6);
    }
    drop(agent);
    for w in workers {
        let _ = w.join();
    }
    drop(host);
    let _ = std::fs::remove_dir_all(&dir);
    quiesce.sort_by(f64::total_cmp);
    resume.sort_by(f64::total_cmp);
    println!(
        "{}",
        json!({
            "scenario": format!("epoch-agent-{ranks}ranks"),
            "epochs": EPOCHS,
            "prepare_to_quiesced_us": {"median": percentile(&quiesce, 0.5), "p99": percentile(&quiesce, 0.99)},
            "resume_to_resumed_us": {"median": percentile(&resume, 0.5), "p99": percentile(&resume, 0.99)},
        })
    );
}

fn rejection_throughput() {
    let dir = temp_dir("reject");
    let path = dir.join("sv.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let host = HostChannel::connect(&path, ChannelOptions::labelled("bench")).unwrap();
    let (guest, _) = listener.accept().unwrap();
    let mut guest = BufWriter::with_capacity(256 * 1024, guest);
    writeln!(
        guest,
        r#"{{"type":"hello","vm":"vm0","agent_version":"1","protocol":1,"ranks":1}}"#
    )
    .unwrap();
    guest.flush().unwrap();
    host.wait_hello(Instant::now() + PATIENCE).unwrap();
    host.send(&HostMessage::Prepare {
        epoch: 1,
        deadline_ms: 600_000,
    })
    .unwrap();
    let kinds: [(&str, String); 4] = [
        ("garbage", "\u{1}\u{2}not json at all {{{{".into()),
        ("wrong-epoch", r#"{"type":"quiesced","epoch":2}"#.into()),
        (
            "unknown-field",
            r#"{"type":"quiesced","epoch":1,"extra":1}"#.into(),
        ),
        ("oversized-16k", "z".repeat(4 * MAX_LINE)),
    ];
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); kinds.len()];
    let mut judged = 0u64;
    for _ in 0..ROUNDS {
        for (i, (_, line)) in kinds.iter().enumerate() {
            let t = Instant::now();
            for _ in 0..LINES_PER_ROUND {
                guest.write_all(line.as_bytes()).unwrap();
                guest.write_all(b"\n").unwrap();
            }
            guest.flush().unwrap();
            judged += LINES_PER_ROUND as u64;
            while host.stats().rejected_total() < judged {
                assert!(t.elapsed() < PATIENCE, "reader stalled");
                std::thread::sleep(Duration::from_micros(200));
            }
            rates[i].push(LINES_PER_ROUND as f64 / t.elapsed().as_secs_f64());
        }
    }
    for ((name, line), r) in kinds.iter().zip(rates) {
        let lines_per_s = median(r);
        println!(
            "{}",
            json!({
                "scenario": format!("reject-{name}"),
                "rounds": ROUNDS,
                "lines_per_round": LINES_PER_ROUND,
                "lines_per_s": lines_per_s.round(),
                "mib_per_s": (lines_per_s * (line.len() + 1) as f64 / (1 << 20) as f64 * 10.0).round() / 10.0,
            })
        );
    }
    assert_eq!(host.stats().delivered, 1, "nothing but hello got through");
    drop(host);
    let _ = std::fs::remove_dir_all(&dir);
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --all-targets` runs this without it, and
    // measurements have no place in a test run.
    if !std::env::args().any(|a| a == "--bench") {
        return;
    }
    epochs_with_ranks(0);
    epochs_with_ranks(4);
    rejection_throughput();
}
