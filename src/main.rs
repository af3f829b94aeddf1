//! `ninja-migrate`: the command line of Ninja.
//!
//! - `demo`: live-migrate a running reference-VMM guest from this process to a second one over
//!   loopback TCP and verify it by the guest's memory.
//! - `vmm listen` / `vmm migrate`: the destination and source halves, for two processes or hosts.
//! - `plan check` / `plan run` / `plan recover`: validate or run a migration plan over a virtual
//!   cluster, or finish a run whose controller died.
//! - `mpi build` / `env` / `run`: the MPI layer's libraries for the MPIs installed here, the
//!   variables that preload it, a job run under it with an agent beside it.
//! - `cut status` / `cycle` / `pause` / `resume` / `report`: cuts of a running MPI job through
//!   its guest agent, and the ranks' records of them checked.

mod cli;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(
    name = "ninja-migrate",
    version,
    about = "Live migration of virtual HPC clusters"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Migrate a running guest between two processes on loopback TCP and verify it.
    Demo(cli::demo::DemoArgs),
    /// Run one half of a reference-VMM migration.
    #[command(subcommand)]
    Vmm(VmmCommand),
    /// Check or run a migration plan over a virtual cluster.
    #[command(subcommand)]
    Plan(cli::plan::PlanCommand),
    /// Build the MPI layer's libraries for the MPIs installed here.
    #[command(subcommand)]
    Mpi(cli::mpi::MpiCommand),
    /// Take cuts of a running MPI job through its guest agent (nothing moves).
    #[command(subcommand)]
    Cut(CutCommand),
}

#[derive(Debug, Subcommand)]
enum CutCommand {
    /// Ask the agent who it is and how many ranks take part.
    Status(cli::cut::StatusArgs),
    /// Quiesce the job at a consistent cut, hold, resume; --count times.
    Cycle(cli::cut::CycleArgs),
    /// Quiesce the job and leave it at the cut (prints the epoch for `cut resume`).
    Pause(cli::cut::AgentArgs),
    /// Release the cut `cut pause` took.
    Resume(cli::cut::ResumeArgs),
    /// Check the cuts the ranks recorded (--cut-log), pair by pair.
    Report(cli::cut::ReportArgs),
}

#[derive(Debug, Subcommand)]
enum VmmCommand {
    /// Wait for an incoming migration, run the received guest, report.
    Listen(cli::vmm::ListenArgs),
    /// Run a guest and migrate it to a listening destination.
    Migrate(cli::vmm::MigrateArgs),
}

fn main() -> ExitCode {
    // The libraries' log records (e.g. a source resumed after a failed migration) go to
    // stderr; `NINJA_LOG=info` (or `debug`, or `symvirt=debug`) shows more than warnings.
    env_logger::Builder::from_env(env_logger::Env::new().filter_or("NINJA_LOG", "warn"))
        .format_timestamp_millis()
        .init();
    let cli = Cli::parse();
    match &cli.command {
        Command::Plan(plan) => return cli::plan::main(plan),
        Command::Mpi(cli::mpi::MpiCommand::Build(args)) => return cli::mpi::build(args),
        Command::Mpi(cli::mpi::MpiCommand::Env(args)) => return cli::mpi::env(args),
        Command::Mpi(cli::mpi::MpiCommand::Run(args)) => return cli::mpi::run(args),
        Command::Cut(CutCommand::Status(args)) => return cli::cut::status(args),
        Command::Cut(CutCommand::Cycle(args)) => return cli::cut::cycle(args),
        Command::Cut(CutCommand::Pause(args)) => return cli::cut::pause(args),
        Command::Cut(CutCommand::Resume(args)) => return cli::cut::resume(args),
        Command::Cut(CutCommand::Report(args)) => return cli::cut::report(args),
        _ => {}
    }
    let exposure = match &cli.command {
        Command::Vmm(VmmCommand::Listen(args)) => {
            cli::vmm::check_exposure(&args.listen, args.tls_creds.is_some(), args.insecure)
        }
        Command::Vmm(VmmCommand::Migrate(args)) => {
            cli::vmm::check_exposure(&args.to, args.tls_creds.is_some(), args.insecure)
        }
        _ => Ok(()),
    };
    if let Err(why) = exposure {
        eprintln!("ninja-migrate: refused: {why}");
        return ExitCode::from(2);
    }
    let result = match &cli.command {
        Command::Demo(args) => cli::demo::demo(args).map(|r| r.verified),
        Command::Vmm(VmmCommand::Listen(args)) => cli::vmm::listen(args).map(|_| true),
        Command::Vmm(VmmCommand::Migrate(args)) => cli::vmm::migrate(args).map(|_| true),
        Command::Plan(_) | Command::Mpi(_) | Command::Cut(_) => unreachable!("handled above"),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("ninja-migrate: error: {}", symvirt_proto::error::chain(&e));
            ExitCode::FAILURE
        }
    }
}
