//! `ninja-migrate mpi`: the MPI layer for the MPIs installed here.
//!
//! - `build`: its libraries, built from this source tree, and how to preload them.
//! - `env`: the variables a job's ranks need (the preload, the agent's rank socket).
//! - `run -- LAUNCHER ARGS...`: a job on this host under the layer, with a guest agent beside
//!   it whose control socket `ninja-migrate cut` drives.

use clap::{Args, Subcommand, ValueEnum};
use nix::sys::signal::{SigSet, Signal};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use symvirt_agent::agent::{Agent, AgentConfig};
use symvirt_agent::guest_link::ChannelSpec;
use symvirt_mpi::mpi_build::{self, MpiImpl};

/// `mpi` subcommands.
#[derive(Debug, Subcommand)]
pub enum MpiCommand {
    /// Build `libsymvirt_pmpi_<mpi>.so` (the transparent layer, for LD_PRELOAD) and
    /// `libsymvirt_mpi_<mpi>.{so,a}` (the explicit safe-point API) and print where they are.
    Build(BuildArgs),
    /// Print the variables that put a job's ranks under the transparent layer.
    Env(EnvArgs),
    /// Run an MPI job on this host under the transparent layer, with a guest agent beside it
    /// (its control socket is what `ninja-migrate cut` takes as --channel).
    Run(RunArgs),
}

/// `mpi env` arguments.
#[derive(Debug, Args)]
pub struct EnvArgs {
    /// The MPI.
    #[arg(long, value_enum)]
    mpi: OneMpi,
    /// Where `mpi build` put the libraries.
    #[arg(long)]
    libs: Option<PathBuf>,
    /// The agent's rank socket (what `symvirt-agent --rank-socket` listens on).
    #[arg(long, default_value = symvirt::rank::DEFAULT_RANK_SOCKET)]
    agent_socket: PathBuf,
    /// Where each rank writes its cut records (per-pair counts at every cut).
    #[arg(long)]
    cut_log: Option<PathBuf>,
    /// As launcher arguments (`-x NAME=VALUE` / `-genv NAME VALUE`) instead of shell exports.
    #[arg(long)]
    launcher_args: bool,
}

/// `mpi run` arguments.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The MPI (default: told by the launcher's name, following symlinks).
    #[arg(long, value_enum)]
    mpi: Option<OneMpi>,
    /// How many ranks the job has (default: the launcher's -n / -np).
    #[arg(long)]
    ranks: Option<u32>,
    /// The agent's control socket (default: control.sock in a fresh directory, printed).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Where `mpi build` put the libraries (built there first if missing).
    #[arg(long)]
    libs: Option<PathBuf>,
    /// Where each rank writes its cut records.
    #[arg(long)]
    cut_log: Option<PathBuf>,
    /// The launcher and its arguments, after `--`: `mpirun.openmpi -np 4 ./a.out`.
    #[arg(last = true, required = true)]
    launcher: Vec<String>,
}

/// One MPI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OneMpi {
    /// Open MPI.
    Openmpi,
    /// MPICH.
    Mpich,
}

impl From<OneMpi> for MpiImpl {
    fn from(m: OneMpi) -> MpiImpl {
        match m {
            OneMpi::Openmpi => MpiImpl::OpenMpi,
            OneMpi::Mpich => MpiImpl::Mpich,
        }
    }
}

/// Which MPI.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Which {
    /// Every MPI whose `mpicc.<mpi>` is installed.
    All,
    /// Open MPI.
    Openmpi,
    /// MPICH.
    Mpich,
}

/// `mpi build` arguments.
#[derive(Debug, Args)]
pub struct BuildArgs {
    /// The MPI to build for.
    #[arg(long, value_enum, default_value = "all")]
    mpi: Which,
    /// Where the libraries go (one directory per MPI below it).
    #[arg(long)]
    out: Option<PathBuf>,
    /// One JSON object per MPI instead of text.
    #[arg(long)]
    json: bool,
}

/// The workspace this binary was built from (the root package's directory): the layer is
/// compiled from its sources there, into its `target`.
fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn installed(mpi: MpiImpl) -> bool {
    Command::new(mpi.mpicc())
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Builds the layer's Rust core (`libsymvirt_mpi.a`, release) with cargo, in the workspace.
fn build_core(workspace: &Path) -> Result<PathBuf, String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| workspace.join("target"), PathBuf::from);
    let status = Command::new(&cargo)
        .args(["build", "--release", "-q", "-p", "symvirt-mpi", "--lib"])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target)
        .status()
        .map_err(|e| format!("run {cargo}: {e}"))?;
    if !status.success() {
        return Err(format!("cargo build -p symvirt-mpi failed ({status})"));
    }
    let lib = target.join("release").join("libsymvirt_mpi.a");
    if !lib.exists() {
        return Err(format!("{} missing after the build", lib.display()));
    }
    Ok(lib)
}

/// Where `mpi build` puts the libraries unless told.
fn default_libs() -> PathBuf {
    workspace().join("target").join("ninja-mpi")
}

/// The transparent layer for `mpi` under `libs` (as `mpi build --out libs` leaves it).
fn transparent_layer(mpi: MpiImpl, libs: &Path) -> PathBuf {
    mpi_build::transparent_path(mpi, &libs.join(mpi.name()))
}

/// The variables a rank needs, in order.
fn rank_env(layer: &Path, agent_socket: &Path, cut_log: Option<&Path>) -> Vec<(String, String)> {
    let mut env = vec![
        ("LD_PRELOAD".to_owned(), layer.display().to_string()),
        (
            "SYMVIRT_AGENT_SOCKET".to_owned(),
            agent_socket.display().to_string(),
        ),
    ];
    if let Some(dir) = cut_log {
        env.push(("SYMVIRT_CUT_LOG".to_owned(), dir.display().to_string()));
    }
    env
}

/// Runs `mpi env`.
pub fn env(args: &EnvArgs) -> ExitCode {
    let mpi = MpiImpl::from(args.mpi);
    let libs = args.libs.clone().unwrap_or_else(default_libs);
    let layer = transparent_layer(mpi, &libs);
    if !layer.exists() {
        eprintln!(
            "ninja-migrate: no {} (run `ninja-migrate mpi build --mpi {}{}` first)",
            layer.display(),
            mpi.name(),
            args.libs
                .as_ref()
                .map(|d| format!(" --out {}", d.display()))
                .unwrap_or_default()
        );
        return ExitCode::FAILURE;
    }
    let env = rank_env(&layer, &args.agent_socket, args.cut_log.as_deref());
    if args.launcher_args {
        println!("{}", mpi.env_args(&env).join(" "));
    } else {
        for (k, v) in env {
            println!("export {k}={v}");
        }
    }
    ExitCode::SUCCESS
}

/// Which MPI a launcher belongs to, by its name once symlinks (`mpirun` through the
/// alternatives system) are followed.
fn launcher_mpi(program: &str) -> Option<MpiImpl> {
    let path = if program.contains('/') {
        PathBuf::from(program)
    } else {
        std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join(program))
            .find(|p| p.is_file())?
    };
    let real = std::fs::canonicalize(&path).unwrap_or(path);
    let name = real.file_name()?.to_string_lossy().into_owned();
    match name.as_str() {
        "mpirun.openmpi" | "mpiexec.openmpi" | "orterun" | "prterun" => Some(MpiImpl::OpenMpi),
        "mpirun.mpich" | "mpiexec.mpich" | "mpiexec.hydra" => Some(MpiImpl::Mpich),
        _ => None,
    }
}

/// The rank count a launcher is given: `-n N`, `-np N`, `--np N`, `-c N` or `-n=N` forms.
fn launcher_ranks(args: &[String]) -> Option<u32> {
    let mut words = args.iter();
    while let Some(w) = words.next() {
        let flag = w.split_once('=').map_or(w.as_str(), |(f, _)| f);
        if matches!(flag, "-n" | "-np" | "--np" | "-c" | "--n") {
            let value = match w.split_once('=') {
                Some((_, v)) => Some(v),
                None => words.next().map(String::as_str),
            };
            return value.and_then(|v| v.parse().ok());
        }
    }
    None
}

/// Runs `mpi run`.
pub fn run(args: &RunArgs) -> ExitCode {
    match run_job(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("ninja-migrate: {e}");
            ExitCode::from(2)
        }
    }
}

fn run_job(args: &RunArgs) -> Result<ExitCode, String> {
    let (program, launcher_args) = args.launcher.split_first().ok_or("no launcher after --")?;
    let detected = launcher_mpi(program);
    let mpi = match (args.mpi.map(MpiImpl::from), detected) {
        (Some(m), _) | (None, Some(m)) => m,
        (None, None) => {
            return Err(format!(
                "{program} is not an MPI launcher this knows (mpirun.openmpi, mpiexec.mpich,                  or a link to one): give --mpi if it is one"
            ));
        }
    };
    if let Some(d) = detected.filter(|d| *d != mpi) {
        return Err(format!(
            "{program} is {}'s launcher, not {}'s",
            d.name(),
            mpi.name()
        ));
    }
    let ranks = match args.ranks.or_else(|| launcher_ranks(launcher_args)) {
        Some(n) if n > 0 => n,
        _ => {
            return Err(
                "how many ranks? the launcher's arguments have no -n/-np: give --ranks".into(),
            );
        }
    };
    let libs = args.libs.clone().unwrap_or_else(default_libs);
    let layer = transparent_layer(mpi, &libs);
    if !layer.exists() {
        eprintln!(
            "ninja-migrate: building the layer for {} into {}",
            mpi.name(),
            libs.display()
        );
        let core = build_core(&workspace())?;
        mpi_build::build_libraries(mpi, &core, &libs.join(mpi.name()))
            .map_err(|e| format!("{}: {e}", mpi.name()))?;
    }

    // The agent's sockets: the control socket `cut` connects to, the ranks' socket.
    let dir = std::env::temp_dir().join(format!("ninja-mpi-run-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
    let control = args
        .control
        .clone()
        .unwrap_or_else(|| dir.join("control.sock"));
    let rank_socket = dir.join("ranks.sock");
    let agent = Agent::spawn(AgentConfig {
        vm: format!("mpi-run-{}", std::process::id()),
        channel: ChannelSpec::Listen(control.clone()),
        rank_socket: rank_socket.clone(),
        ranks,
        ..AgentConfig::default()
    })
    .map_err(|e| format!("start the agent: {e}"))?;
    eprintln!(
        "ninja-migrate: {} ranks of {}; cuts through --channel {}",
        ranks,
        mpi.name(),
        control.display()
    );

    let env = rank_env(&layer, &rank_socket, args.cut_log.as_deref());
    let mut launcher = Command::new(program);
    launcher.args(mpi.env_args(&env)).args(launcher_args);
    // SIGINT and SIGTERM go to the launcher, which stops its ranks; this process then ends
    // with it (and removes the agent's sockets).
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    let _ = signals.thread_block();
    let mut child = launcher
        .spawn()
        .map_err(|e| format!("start {program}: {e}"))?;
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    std::thread::spawn(move || {
        while let Ok(signal) = signals.wait() {
            let _ = nix::sys::signal::kill(pid, signal);
        }
    });
    let status = child
        .wait()
        .map_err(|e| format!("wait for {program}: {e}"))?;
    drop(agent);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(c) => ExitCode::from(u8::try_from(c).unwrap_or(1)),
        None => {
            eprintln!("ninja-migrate: {program} ended by {status}");
            ExitCode::FAILURE
        }
    })
}

/// How a job preloads the layer with `mpi`'s launcher.
fn preload_hint(mpi: MpiImpl, so: &Path) -> String {
    match mpi {
        MpiImpl::OpenMpi => format!("mpirun.openmpi -x LD_PRELOAD={} ...", so.display()),
        MpiImpl::Mpich => format!("mpiexec.mpich -genv LD_PRELOAD {} ...", so.display()),
    }
}

/// Runs `mpi build`.
pub fn build(args: &BuildArgs) -> ExitCode {
    let workspace = workspace();
    if !mpi_build::crate_dir().join("csrc").is_dir() {
        eprintln!(
            "ninja-migrate: mpi build compiles the layer from the source tree this binary was \
             built from ({}), which is not there",
            workspace.display()
        );
        return ExitCode::from(2);
    }
    let wanted: Vec<MpiImpl> = match args.mpi {
        Which::All => MpiImpl::ALL.into_iter().filter(|m| installed(*m)).collect(),
        Which::Openmpi => vec![MpiImpl::OpenMpi],
        Which::Mpich => vec![MpiImpl::Mpich],
    };
    if wanted.is_empty() {
        eprintln!("ninja-migrate: no MPI found (neither mpicc.openmpi nor mpicc.mpich runs)");
        return ExitCode::from(2);
    }
    let core = match build_core(&workspace) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ninja-migrate: {e}");
            return ExitCode::FAILURE;
        }
    };
    let out = args
        .out
        .clone()
        .unwrap_or_else(|| workspace.join("target").join("ninja-mpi"));
    let mut code = ExitCode::SUCCESS;
    for mpi in wanted {
        match mpi_build::build_libraries(mpi, &core, &out.join(mpi.name())) {
            Ok(libs) if args.json => println!(
                "{}",
                serde_json::json!({
                    "mpi": mpi.name(),
                    "transparent": libs.transparent,
                    "explicit_shared": libs.explicit_shared,
                    "explicit_static": libs.explicit_static,
                    "preload": preload_hint(mpi, &libs.transparent),
                })
            ),
            Ok(libs) => {
                println!("{}:", mpi.name());
                println!("  transparent layer  {}", libs.transparent.display());
                println!("  explicit API       {}", libs.explicit_shared.display());
                println!("                     {}", libs.explicit_static.display());
                println!(
                    "  preload with       {}",
                    preload_hint(mpi, &libs.transparent)
                );
            }
            Err(e) => {
                eprintln!("ninja-migrate: {}: {e}", mpi.name());
                code = ExitCode::FAILURE;
            }
        }
    }
    code
}
