//! `ninja-migrate mpi build`: the MPI layer's libraries for the MPIs installed here, built from
//! this source tree, and how to preload them.

use clap::{Args, Subcommand, ValueEnum};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use symvirt_mpi::mpi_build::{self, MpiImpl};

/// `mpi` subcommands.
#[derive(Debug, Subcommand)]
pub enum MpiCommand {
    /// Build `libsymvirt_pmpi_<mpi>.so` (the transparent layer, for LD_PRELOAD) and
    /// `libsymvirt_mpi_<mpi>.{so,a}` (the explicit safe-point API) and print where they are.
    Build(BuildArgs),
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

/// The workspace this binary was built from: the layer is compiled from its sources.
fn workspace() -> PathBuf {
    let crate_dir = mpi_build::crate_dir();
    crate_dir
        .parent()
        .map_or(crate_dir.clone(), Path::to_path_buf)
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
