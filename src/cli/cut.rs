//! `ninja-migrate cut`: cuts of a running MPI job through its guest agent, without moving
//! anything (for benchmark harnesses): `status` asks the agent who it is; `cycle` quiesces the
//! job (every rank at a consistent cut, no message in flight), holds it, resumes it, and
//! repeats; `pause` leaves the job at a cut and `resume` releases it, from another process
//! (the agent releases a cut on its own after its stale-epoch time with no host connected:
//! 5 minutes unless `symvirt-agent --stale-epoch-ms` says otherwise); `report` checks a cut
//! pair by pair, from what the ranks told their agents or from the records they wrote
//! (`SYMVIRT_CUT_LOG`). `cycle` checks every cut it takes that way.
//!
//! The agent is reached at the host end of its channel: the socket it listens on when started
//! with `symvirt-agent --channel listen:PATH`, or a VM's channel socket. The work is
//! `symvirt::cut::JobCuts`; this is its command line.

use clap::Args;
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;
use symvirt::controller::new_epoch;
use symvirt::cut::CutReport;
use symvirt::cut::JobCuts;
use symvirt::protocol::Interconnect;
use symvirt_mpi::cut_log;

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

/// Connects to the agent and waits for its hello.
fn open(args: &AgentArgs) -> Result<JobCuts, String> {
    JobCuts::connect(&args.channel, Duration::from_millis(args.timeout_ms)).map_err(|e| e.chain())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Runs `cut status`.
pub fn status(args: &StatusArgs) -> ExitCode {
    let result = open(&args.agent).and_then(|job| {
        let status = if args.wait_registered {
            job.wait_registered(Duration::from_millis(args.agent.timeout_ms))
                .map(Some)
        } else {
            job.status()
        };
        status.map(|s| (job, s)).map_err(|e| e.chain())
    });
    let (job, status) = match result {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let info = job.info();
    if args.agent.json {
        println!(
            "{}",
            json!({"vm": info.vm, "agent_version": info.agent_version,
                   "protocol": info.protocol, "ranks": info.ranks,
                   "registered": status.map(|s| s.registered),
                   "epoch": status.map(|s| s.epoch),
                   "phase": status.map(|s| s.phase)})
        );
    } else {
        let now = match status {
            Some(s) => format!(
                "{} registered now; last epoch {}, {}",
                s.registered,
                s.epoch,
                format!("{:?}", s.phase).to_lowercase()
            ),
            None => "registered ranks unknown (the agent predates status)".into(),
        };
        println!(
            "agent of {} (symvirt-agent {}, protocol {}): {} ranks take part, {now}",
            info.vm, info.agent_version, info.protocol, info.ranks
        );
    }
    ExitCode::SUCCESS
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
    let job = match open(args) {
        Ok(j) => j,
        Err(e) => return fail(e),
    };
    let epoch = new_epoch();
    let info = job.info();
    match job.quiesce(epoch, Duration::from_millis(args.timeout_ms)) {
        Ok(took) if args.json => println!(
            "{}",
            json!({"epoch": epoch, "vm": info.vm, "ranks": info.ranks, "quiesce_ms": ms(took)})
        ),
        Ok(took) => println!(
            "epoch {epoch}: {} ranks quiesced in {:.1} ms; held until `ninja-migrate cut resume \
             --epoch {epoch}`",
            info.ranks,
            ms(took)
        ),
        Err(e) => return fail(e.chain()),
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
    let timeout = Duration::from_millis(args.agent.timeout_ms);
    // This connection continues the session `cut pause` started.
    let resumed = JobCuts::continuing(&args.agent.channel, args.epoch, timeout)
        .and_then(|job| job.resume(args.epoch, &interconnect, timeout));
    match resumed {
        Ok(took) if args.agent.json => {
            println!("{}", json!({"epoch": args.epoch, "resume_ms": ms(took)}));
            ExitCode::SUCCESS
        }
        Ok(took) => {
            println!("epoch {}: resumed in {:.1} ms", args.epoch, ms(took));
            ExitCode::SUCCESS
        }
        Err(e) => fail(e.chain()),
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
    let job = match open(&args.agent) {
        Ok(j) => j,
        Err(e) => return fail(e),
    };
    let info = job.info();
    let timeout = Duration::from_millis(args.agent.timeout_ms);
    let first = new_epoch();
    let mut code = ExitCode::SUCCESS;
    for n in 0..args.count {
        if n > 0 {
            std::thread::sleep(Duration::from_secs_f64(args.every));
        }
        let epoch = first + u64::from(n);
        let cut = job.quiesce(epoch, timeout).and_then(|q| {
            std::thread::sleep(Duration::from_millis(args.hold_ms));
            job.resume(epoch, &interconnect, timeout).map(|r| (q, r))
        });
        let (quiesce, resume) = match cut {
            Ok(times) => times,
            Err(e) => return fail(format!("cut {}: {}", n + 1, e.chain())),
        };
        // What every rank counted at this cut (the agent keeps it after the resume).
        let report =
            symvirt::cut::job_report(std::slice::from_ref(&job), epoch).map_err(|e| e.chain());
        let consistent = report.as_ref().map(|r| r.mismatches().is_empty());
        if consistent == Ok(false) {
            code = ExitCode::FAILURE;
        }
        if args.agent.json {
            let mut line = json!({"cut": n + 1, "epoch": epoch, "vm": info.vm,
                                  "ranks": info.ranks, "quiesce_ms": ms(quiesce),
                                  "resume_ms": ms(resume)});
            match report {
                Ok(r) => {
                    line["messages"] = json!(r.messages());
                    line["drained"] = json!(r.drained());
                    line["consistent"] = json!(r.mismatches().is_empty());
                    line["slowest_quiesce_ms"] = json!(r.slowest().map(|s| s.1));
                }
                Err(e) => line["report_error"] = json!(e),
            }
            println!("{line}");
        } else {
            let counted = match &report {
                Ok(r) => format!(
                    "; {} messages before the cut, {} drained: {}",
                    r.messages(),
                    r.drained(),
                    if r.mismatches().is_empty() {
                        "consistent"
                    } else {
                        "INCONSISTENT (see `cut report`)"
                    }
                ),
                Err(e) => format!("; no report: {e}"),
            };
            println!(
                "cut {}: {} ranks quiesced in {:.1} ms, resumed in {:.1} ms{counted}",
                n + 1,
                info.ranks,
                ms(quiesce),
                ms(resume)
            );
        }
    }
    code
}

/// `cut report` arguments.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The agent's channel socket; once per guest for a job spread over several.
    #[arg(long, required_unless_present = "cut_log")]
    channel: Vec<PathBuf>,
    /// Instead of agents: the directory the ranks write their cut records to
    /// (`SYMVIRT_CUT_LOG`, `mpi run --cut-log`).
    #[arg(long, conflicts_with = "channel")]
    cut_log: Option<PathBuf>,
    /// Only this epoch (default: from agents, the last cut; from records, every epoch).
    #[arg(long)]
    epoch: Option<u64>,
    /// How long an agent may take to answer (ms).
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
    /// One JSON object per epoch instead of text.
    #[arg(long)]
    json: bool,
}

/// Prints one epoch's report; returns whether the cut was consistent.
fn print_report(cut: &CutReport, json: bool) -> bool {
    let broken = cut.mismatches();
    let slowest = cut.slowest();
    if json {
        let pairs: Vec<_> = broken
            .iter()
            .map(|m| json!({"from": m.from, "to": m.to, "sent": m.sent, "received": m.received}))
            .collect();
        println!(
            "{}",
            json!({"epoch": cut.epoch, "ranks": cut.ranks.len(), "messages": cut.messages(),
                   "drained": cut.drained(), "consistent": broken.is_empty(),
                   "mismatches": pairs, "slowest_rank": slowest.map(|s| s.0),
                   "slowest_quiesce_ms": slowest.map(|s| s.1)})
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
        let last = slowest
            .map(|(rank, ms)| format!(", rank {rank} last at the cut after {ms} ms"))
            .unwrap_or_default();
        println!(
            "epoch {}: {} ranks, {} messages before the cut, {} drained by the layer{last}: \
             {verdict}",
            cut.epoch,
            cut.ranks.len(),
            cut.messages(),
            cut.drained()
        );
    }
    broken.is_empty()
}

/// Runs `cut report`: per epoch, what every rank counted at the cut, checked pair by pair.
/// Fails (exit 1) if a cut is inconsistent or a report is missing or malformed.
pub fn report(args: &ReportArgs) -> ExitCode {
    let reports: Vec<Result<CutReport, String>> = match &args.cut_log {
        Some(dir) => {
            let epochs = match args.epoch {
                Some(e) => Ok(vec![e]),
                None => cut_log::epochs(dir),
            };
            match epochs {
                Ok(e) if e.is_empty() => {
                    return fail(format!("no cut records in {}", dir.display()));
                }
                Ok(e) => e
                    .into_iter()
                    .map(|epoch| {
                        cut_log::read(dir, epoch).map_err(|e| format!("epoch {epoch}: {e}"))
                    })
                    .collect(),
                Err(e) => return fail(e),
            }
        }
        None => match agents_report(args) {
            Ok(r) => vec![Ok(r)],
            Err(e) => return fail(e),
        },
    };
    let mut code = ExitCode::SUCCESS;
    for report in reports {
        match report {
            Ok(cut) if print_report(&cut, args.json) => {}
            Ok(_) => code = ExitCode::FAILURE,
            Err(e) => {
                eprintln!("ninja-migrate: {e}");
                code = ExitCode::FAILURE;
            }
        }
    }
    code
}

/// The report of `--epoch` (default: the first agent's last epoch) from every `--channel`.
fn agents_report(args: &ReportArgs) -> Result<CutReport, String> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let agents = args
        .channel
        .iter()
        .map(|path| JobCuts::connect(path, timeout))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.chain())?;
    let epoch = match args.epoch {
        Some(e) => e,
        None => match agents[0].status().map_err(|e| e.chain())? {
            Some(s) if s.epoch > 0 => s.epoch,
            Some(_) => return Err("the agent has seen no cut yet".into()),
            None => return Err("the agent predates `status`: give --epoch".into()),
        },
    };
    symvirt::cut::job_report(&agents, epoch).map_err(|e| e.chain())
}
