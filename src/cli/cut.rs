//! `ninja-migrate cut`: cuts of a running MPI job through its guest agent, without moving
//! anything (for benchmark harnesses): `status` asks the agent who it is; `cycle` quiesces the
//! job (every rank at a consistent cut, no message in flight), holds it, resumes it, and
//! repeats.
//!
//! The agent is reached at the host end of its channel: the socket it listens on when started
//! with `symvirt-agent --channel listen:PATH`, or a VM's channel socket.

use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};
use symvirt::controller::new_epoch;
use symvirt::host_channel::{ChannelOptions, HostChannel};
use symvirt::protocol::{GuestMessage, HostMessage, Interconnect};
use symvirt::session::GuestInfo;

/// What every `cut` subcommand takes.
#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The agent's channel socket.
    #[arg(long)]
    channel: PathBuf,
    /// How long the agent may take to answer, and a cut to complete (ms).
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
    /// One JSON object per line instead of text.
    #[arg(long)]
    json: bool,
}

/// `cut cycle` arguments.
#[derive(Debug, Args)]
pub struct CycleArgs {
    #[command(flatten)]
    agent: AgentArgs,
    /// How many cuts.
    #[arg(long, default_value_t = 1)]
    count: u32,
    /// Seconds from one cut's resume to the next cut.
    #[arg(long, default_value_t = 1.0)]
    every: f64,
    /// How long to hold each cut before resuming (ms).
    #[arg(long, default_value_t = 0)]
    hold_ms: u64,
    /// The interconnect the ranks resume on, as the protocol writes it, e.g.
    /// '{"kind":"ethernet","mac":"52:54:00:00:00:01"}' (the agent checks the guest sees it
    /// unless started with --interconnect-wait-ms 0).
    #[arg(long)]
    interconnect: String,
}

/// Connects and waits for the agent's hello.
fn open(args: &AgentArgs) -> Result<(HostChannel, GuestInfo), String> {
    let path = &args.channel;
    if !path.exists() {
        return Err(format!(
            "no agent channel at {} (start symvirt-agent with --channel listen:{})",
            path.display(),
            path.display()
        ));
    }
    let channel = HostChannel::connect(path, ChannelOptions::labelled("cut"))
        .map_err(|e| format!("{}: {}", path.display(), e.chain()))?;
    let info = channel
        .wait_hello(Instant::now() + Duration::from_millis(args.timeout_ms))
        .map_err(|e| {
            format!(
                "no agent answered at {} within {} ms: {}",
                path.display(),
                args.timeout_ms,
                e.chain()
            )
        })?;
    Ok((channel, info))
}

/// Runs `cut status`.
pub fn status(args: &AgentArgs) -> ExitCode {
    match open(args) {
        Ok((_, info)) => {
            if args.json {
                println!(
                    "{}",
                    json!({"vm": info.vm, "agent_version": info.agent_version,
                           "protocol": info.protocol, "ranks": info.ranks})
                );
            } else {
                println!(
                    "agent of {} (symvirt-agent {}, protocol {}): {} ranks take part",
                    info.vm, info.agent_version, info.protocol, info.ranks
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("ninja-migrate: {e}");
            ExitCode::FAILURE
        }
    }
}

/// One cut: prepare, quiesced, hold, resume, resumed. Returns (quiesce, resume) times.
fn one_cut(
    channel: &HostChannel,
    epoch: u64,
    args: &CycleArgs,
    interconnect: &Interconnect,
) -> Result<(Duration, Duration), String> {
    let limit = Duration::from_millis(args.agent.timeout_ms);
    let t = Instant::now();
    channel
        .send(&HostMessage::Prepare {
            epoch,
            deadline_ms: args.agent.timeout_ms,
        })
        .map_err(|e| format!("prepare: {}", e.chain()))?;
    let answer = channel
        .wait_for(
            |m| {
                matches!(
                    m,
                    GuestMessage::Quiesced { .. } | GuestMessage::Failed { .. }
                )
            },
            t + limit,
        )
        .map_err(|e| format!("waiting for the cut: {}", e.chain()))?;
    if let GuestMessage::Failed { reason, .. } = answer {
        return Err(format!("the job did not reach the cut: {reason}"));
    }
    let quiesce = t.elapsed();
    std::thread::sleep(Duration::from_millis(args.hold_ms));
    let t = Instant::now();
    channel
        .send(&HostMessage::Resume {
            epoch,
            interconnect: interconnect.clone(),
        })
        .map_err(|e| format!("resume: {}", e.chain()))?;
    let answer = channel
        .wait_for(
            |m| {
                matches!(
                    m,
                    GuestMessage::Resumed { .. } | GuestMessage::Failed { .. }
                )
            },
            t + limit,
        )
        .map_err(|e| format!("waiting for the resume: {}", e.chain()))?;
    if let GuestMessage::Failed { reason, .. } = answer {
        return Err(format!("the job did not resume: {reason}"));
    }
    Ok((quiesce, t.elapsed()))
}

/// Runs `cut cycle`.
pub fn cycle(args: &CycleArgs) -> ExitCode {
    let interconnect: Interconnect = match serde_json::from_str(&args.interconnect) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("ninja-migrate: --interconnect: {e}");
            return ExitCode::from(2);
        }
    };
    if !args.every.is_finite() || args.every < 0.0 {
        eprintln!(
            "ninja-migrate: --every: {} is not a number of seconds",
            args.every
        );
        return ExitCode::from(2);
    }
    let (channel, info) = match open(&args.agent) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ninja-migrate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let first = new_epoch();
    for n in 0..args.count {
        if n > 0 {
            std::thread::sleep(Duration::from_secs_f64(args.every));
        }
        let epoch = first + u64::from(n);
        match one_cut(&channel, epoch, args, &interconnect) {
            Ok((quiesce, resume)) if args.agent.json => println!(
                "{}",
                json!({"cut": n + 1, "epoch": epoch, "vm": info.vm, "ranks": info.ranks,
                       "quiesce_ms": quiesce.as_secs_f64() * 1e3,
                       "resume_ms": resume.as_secs_f64() * 1e3})
            ),
            Ok((quiesce, resume)) => println!(
                "cut {}: {} ranks quiesced in {:.1} ms, resumed in {:.1} ms",
                n + 1,
                info.ranks,
                quiesce.as_secs_f64() * 1e3,
                resume.as_secs_f64() * 1e3
            ),
            Err(e) => {
                eprintln!("ninja-migrate: cut {}: {e}", n + 1);
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
