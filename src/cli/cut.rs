//! `ninja-migrate cut`: cuts of a running MPI job through its guest agent, without moving
//! anything (for benchmark harnesses): `status` asks the agent who it is; `cycle` quiesces the
//! job (every rank at a consistent cut, no message in flight), holds it, resumes it, and
//! repeats; `pause` leaves the job at a cut and `resume` releases it, from another process
//! (the agent releases a cut on its own after its stale-epoch time with no host connected:
//! 5 minutes unless `symvirt-agent --stale-epoch-ms` says otherwise); `report` checks the cuts
//! the ranks recorded (`SYMVIRT_CUT_LOG`), pair by pair.
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
use symvirt::protocol::{AgentPhase, GuestMessage, HostMessage, Interconnect};
use symvirt::session::{GuestInfo, GuestSession};
use symvirt_mpi::cut_log::CutReport;

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

/// `cut status` arguments.
#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    agent: AgentArgs,
    /// Wait (up to --timeout-ms) until every rank has registered with the agent: how a harness
    /// knows the job is ready to be cut.
    #[arg(long)]
    wait_registered: bool,
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

/// What the agent's `status` says: (last epoch, phase, registered ranks); `None` from an
/// agent that predates `status` (it ignores the request).
fn agent_status(
    channel: &HostChannel,
    deadline: Instant,
) -> Result<Option<(u64, AgentPhase, u32)>, String> {
    channel
        .send(&HostMessage::Status)
        .map_err(|e| format!("status: {}", e.chain()))?;
    let answer = channel.wait_for(|m| matches!(m, GuestMessage::Status { .. }), deadline);
    match answer {
        Ok(GuestMessage::Status {
            epoch,
            phase,
            registered,
            ..
        }) => Ok(Some((epoch, phase, registered))),
        Ok(_) => unreachable!("only status is waited for"),
        Err(symvirt::error::Error::Timeout) => Ok(None),
        Err(e) => Err(format!("status: {}", e.chain())),
    }
}

/// Runs `cut status`.
pub fn status(args: &StatusArgs) -> ExitCode {
    let result = open(&args.agent).and_then(|(channel, info)| {
        let until = Instant::now() + Duration::from_millis(args.agent.timeout_ms);
        loop {
            // An agent that predates `status` stays silent: a short wait, then unknown.
            let ask = (Instant::now() + Duration::from_secs(2)).min(until);
            let status = agent_status(&channel, ask)?;
            let ready = status.is_some_and(|(_, _, r)| r >= info.ranks);
            if !args.wait_registered || ready {
                return Ok((info, status));
            }
            if status.is_none() {
                return Err(
                    "the agent does not report its registered ranks (it predates \
                            `status`): --wait-registered cannot tell"
                        .into(),
                );
            }
            if Instant::now() >= until {
                let registered = status.map_or(0, |(_, _, r)| r);
                return Err(format!(
                    "{registered} of {} ranks registered after {} ms",
                    info.ranks, args.agent.timeout_ms
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    match result {
        Ok((info, status)) => {
            let (epoch, phase, registered) = match status {
                Some((e, p, r)) => (Some(e), Some(p), Some(r)),
                None => (None, None, None),
            };
            if args.agent.json {
                println!(
                    "{}",
                    json!({"vm": info.vm, "agent_version": info.agent_version,
                           "protocol": info.protocol, "ranks": info.ranks,
                           "registered": registered, "epoch": epoch, "phase": phase})
                );
            } else {
                let now = match (registered, epoch, phase) {
                    (Some(r), Some(e), Some(p)) => {
                        format!("{r} registered now; last epoch {e}, {p:?}").to_lowercase()
                    }
                    _ => "registered ranks unknown (the agent predates status)".into(),
                };
                println!(
                    "agent of {} (symvirt-agent {}, protocol {}): {} ranks take part, {now}",
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

/// Asks for a cut in `epoch` and waits until every rank is at it; returns how long it took.
fn quiesce(
    channel: &HostChannel,
    info: &GuestInfo,
    epoch: u64,
    timeout_ms: u64,
) -> Result<Duration, String> {
    // A cut of a job whose ranks are not all there would wait out the deadline: say so now.
    let ask = Instant::now() + Duration::from_millis(timeout_ms.min(2000));
    if let Some((last, phase, registered)) = agent_status(channel, ask)? {
        if registered < info.ranks {
            return Err(format!(
                "only {registered} of the {} ranks the agent expects have registered: no job \
                 there, or not all of its ranks yet (`cut status --wait-registered` waits for \
                 them)",
                info.ranks
            ));
        }
        if phase != AgentPhase::Running {
            return Err(format!(
                "the agent is in epoch {last} already ({phase:?}): another host holds a cut"
            )
            .to_lowercase());
        }
    }
    let t = Instant::now();
    channel
        .send(&HostMessage::Prepare {
            epoch,
            deadline_ms: timeout_ms,
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
            t + Duration::from_millis(timeout_ms),
        )
        .map_err(|e| format!("waiting for the cut: {}", e.chain()))?;
    if let GuestMessage::Failed { reason, .. } = answer {
        return Err(format!("the job did not reach the cut: {reason}"));
    }
    Ok(t.elapsed())
}

/// Releases the cut of `epoch` on `interconnect`; returns how long the ranks took to go on.
fn release(
    channel: &HostChannel,
    epoch: u64,
    interconnect: &Interconnect,
    timeout_ms: u64,
) -> Result<Duration, String> {
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
            t + Duration::from_millis(timeout_ms),
        )
        .map_err(|e| format!("waiting for the resume: {}", e.chain()))?;
    if let GuestMessage::Failed { reason, .. } = answer {
        return Err(format!("the job did not resume: {reason}"));
    }
    Ok(t.elapsed())
}

fn parse_interconnect(text: &str) -> Result<Interconnect, ExitCode> {
    serde_json::from_str(text).map_err(|e| {
        eprintln!("ninja-migrate: --interconnect: {e}");
        ExitCode::from(2)
    })
}

fn fail(what: impl std::fmt::Display) -> ExitCode {
    eprintln!("ninja-migrate: {what}");
    ExitCode::FAILURE
}

/// Runs `cut pause`: the job stays at the cut when it returns.
pub fn pause(args: &AgentArgs) -> ExitCode {
    let (channel, info) = match open(args) {
        Ok(c) => c,
        Err(e) => return fail(e),
    };
    let epoch = new_epoch();
    match quiesce(&channel, &info, epoch, args.timeout_ms) {
        Ok(took) if args.json => println!(
            "{}",
            json!({"epoch": epoch, "vm": info.vm, "ranks": info.ranks,
                   "quiesce_ms": took.as_secs_f64() * 1e3})
        ),
        Ok(took) => println!(
            "epoch {epoch}: {} ranks quiesced in {:.1} ms; held until `ninja-migrate cut resume \
             --epoch {epoch}`",
            info.ranks,
            took.as_secs_f64() * 1e3
        ),
        Err(e) => return fail(e),
    }
    ExitCode::SUCCESS
}

/// `cut resume` arguments.
#[derive(Debug, Args)]
pub struct ResumeArgs {
    #[command(flatten)]
    agent: AgentArgs,
    /// The epoch `cut pause` printed.
    #[arg(long)]
    epoch: u64,
    /// The interconnect the ranks resume on (as for `cut cycle`).
    #[arg(long)]
    interconnect: String,
}

/// Runs `cut resume`: releases the cut `cut pause` took.
pub fn resume(args: &ResumeArgs) -> ExitCode {
    let interconnect = match parse_interconnect(&args.interconnect) {
        Ok(i) => i,
        Err(code) => return code,
    };
    let path = &args.agent.channel;
    if !path.exists() {
        return fail(format!("no agent channel at {}", path.display()));
    }
    // This connection continues the session `cut pause` started.
    let channel = match HostChannel::connect_continuing(
        path,
        ChannelOptions::labelled("cut"),
        GuestSession::quiesced(args.epoch),
    ) {
        Ok(c) => c,
        Err(e) => return fail(format!("{}: {}", path.display(), e.chain())),
    };
    let deadline = Instant::now() + Duration::from_millis(args.agent.timeout_ms);
    if let Err(e) = channel.wait_hello(deadline) {
        return fail(format!(
            "no agent answered at {}: {}",
            path.display(),
            e.chain()
        ));
    }
    match release(&channel, args.epoch, &interconnect, args.agent.timeout_ms) {
        Ok(took) if args.agent.json => {
            println!(
                "{}",
                json!({"epoch": args.epoch, "resume_ms": took.as_secs_f64() * 1e3})
            );
            ExitCode::SUCCESS
        }
        Ok(took) => {
            println!(
                "epoch {}: resumed in {:.1} ms",
                args.epoch,
                took.as_secs_f64() * 1e3
            );
            ExitCode::SUCCESS
        }
        Err(e) => fail(e),
    }
}

/// Runs `cut cycle`.
pub fn cycle(args: &CycleArgs) -> ExitCode {
    let interconnect = match parse_interconnect(&args.interconnect) {
        Ok(i) => i,
        Err(code) => return code,
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
        Err(e) => return fail(e),
    };
    let timeout = args.agent.timeout_ms;
    let first = new_epoch();
    for n in 0..args.count {
        if n > 0 {
            std::thread::sleep(Duration::from_secs_f64(args.every));
        }
        let epoch = first + u64::from(n);
        let cut = quiesce(&channel, &info, epoch, timeout).and_then(|q| {
            std::thread::sleep(Duration::from_millis(args.hold_ms));
            release(&channel, epoch, &interconnect, timeout).map(|r| (q, r))
        });
        match cut {
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
            Err(e) => return fail(format!("cut {}: {e}", n + 1)),
        }
    }
    ExitCode::SUCCESS
}

/// `cut report` arguments.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The directory the ranks write their cut records to (`SYMVIRT_CUT_LOG`, `mpi run
    /// --cut-log`).
    #[arg(long)]
    cut_log: PathBuf,
    /// Only this epoch (default: every epoch with records).
    #[arg(long)]
    epoch: Option<u64>,
    /// One JSON object per epoch instead of text.
    #[arg(long)]
    json: bool,
}

/// Runs `cut report`: per epoch, the ranks' records checked pair by pair. Fails (exit 1) if a
/// cut is inconsistent or a record is missing or malformed.
pub fn report(args: &ReportArgs) -> ExitCode {
    let epochs = match args.epoch {
        Some(e) => Ok(vec![e]),
        None => CutReport::epochs(&args.cut_log),
    };
    let epochs = match epochs {
        Ok(e) if e.is_empty() => {
            return fail(format!("no cut records in {}", args.cut_log.display()));
        }
        Ok(e) => e,
        Err(e) => return fail(e.to_string()),
    };
    let mut code = ExitCode::SUCCESS;
    for epoch in epochs {
        let cut = match CutReport::read(&args.cut_log, epoch) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("ninja-migrate: epoch {epoch}: {e}");
                code = ExitCode::FAILURE;
                continue;
            }
        };
        let broken = cut.mismatches();
        if !broken.is_empty() {
            code = ExitCode::FAILURE;
        }
        if args.json {
            let pairs: Vec<_> = broken
                .iter()
                .map(
                    |m| json!({"from": m.from, "to": m.to, "sent": m.sent, "received": m.received}),
                )
                .collect();
            println!(
                "{}",
                json!({"epoch": epoch, "ranks": cut.ranks.len(), "messages": cut.messages(),
                       "drained": cut.drained(), "consistent": broken.is_empty(),
                       "mismatches": pairs})
            );
        } else {
            let verdict = if broken.is_empty() {
                "consistent".to_owned()
            } else {
                let pairs: Vec<String> = broken
                    .iter()
                    .map(|m| {
                        format!(
                            "rank {} sent {} to rank {}, which received {}",
                            m.from, m.sent, m.to, m.received
                        )
                    })
                    .collect();
                format!("INCONSISTENT: {}", pairs.join("; "))
            };
            println!(
                "epoch {epoch}: {} ranks, {} messages before the cut, {} drained by the layer: \
                 {verdict}",
                cut.ranks.len(),
                cut.messages(),
                cut.drained()
            );
        }
    }
    code
}
