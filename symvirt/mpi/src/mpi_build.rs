//! Builds the per-implementation libraries and MPI programs (tests, benches, users' CI).
//!
//! For an [`MpiImpl`], [`build_libraries`] compiles the C glue in `csrc/` with that
//! implementation's `mpicc` and links it with this crate's staticlib (`libsymvirt_mpi.a`,
//! built by cargo) into:
//! - `libsymvirt_mpi_<impl>.so` and `.a`: the explicit safe-point API (`include/symvirt.h`,
//!   `symvirt_explicit.c`), with `ucx_finalize.c`;
//! - `libsymvirt_pmpi_<impl>.so`: the transparent layer, for `LD_PRELOAD`: every `.c` file in
//!   `csrc/pmpi/` (one per part of the layer; what they share is declared, hidden, in
//!   `csrc/pmpi/pmpi_internal.h`, whose header comment describes the design), plus
//!   `ucx_finalize.c`, and `symvirt_pmpi_fortran.c`: Open MPI's Fortran entry points. Of the
//!   layer's own symbols only the `MPI_*` and `mpi_*_` wrappers are exported (besides what
//!   the core exports, and the two UCX calls `ucx_finalize.c` interposes for MPICH before
//!   4.2: it cures that MPICH's deadlock in `MPI_Finalize` over UCX's TCP transport).
//!
//! The transparent layer's files are compiled in parallel (as many `mpicc` at once as there
//! are CPUs). Outputs are written under a temporary name and renamed, so a reader never sees
//! half a file.

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};

/// An MPI implementation as Debian installs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MpiImpl {
    /// Open MPI (`mpicc.openmpi`, `mpirun.openmpi`).
    OpenMpi,
    /// MPICH (`mpicc.mpich`, `mpiexec.mpich`).
    Mpich,
}

impl MpiImpl {
    /// Both implementations.
    pub const ALL: [MpiImpl; 2] = [MpiImpl::OpenMpi, MpiImpl::Mpich];

    /// The suffix used in file names: `openmpi` or `mpich`.
    pub fn name(self) -> &'static str {
        match self {
            MpiImpl::OpenMpi => "openmpi",
            MpiImpl::Mpich => "mpich",
        }
    }

    /// The C compiler wrapper.
    pub fn mpicc(self) -> &'static str {
        match self {
            MpiImpl::OpenMpi => "mpicc.openmpi",
            MpiImpl::Mpich => "mpicc.mpich",
        }
    }

    /// Libraries the transparent layer calls beyond what `mpicc` links: Open MPI's progress
    /// engine (`opal_progress`, in `libopen-pal`), polled directly by the layer's waits.
    fn transparent_link_libs(self) -> &'static [&'static str] {
        match self {
            MpiImpl::OpenMpi => &["-lopen-pal"],
            MpiImpl::Mpich => &[],
        }
    }

    /// The Fortran compiler wrapper.
    pub fn mpif90(self) -> &'static str {
        match self {
            MpiImpl::OpenMpi => "mpif90.openmpi",
            MpiImpl::Mpich => "mpif90.mpich",
        }
    }

    /// A launcher command for `ranks` local ranks with extra environment `env` given to the
    /// ranks only (not to the launcher), ready for the program and its arguments.
    pub fn launcher(self, ranks: u32, env: &[(String, String)]) -> Command {
        match self {
            MpiImpl::OpenMpi => {
                let mut c = Command::new("mpirun.openmpi");
                c.args([
                    "--allow-run-as-root",
                    "--oversubscribe",
                    "--bind-to",
                    "none",
                ]);
                c.args(["-np", &ranks.to_string()]);
                // Shared memory and self only: no network probing.
                c.env("OMPI_MCA_btl", "self,vader");
                c.env("OMPI_MCA_btl_vader_single_copy_mechanism", "none");
                c.args(self.env_args(env));
                c
            }
            MpiImpl::Mpich => {
                let mut c = Command::new("mpiexec.mpich");
                c.args(["-n", &ranks.to_string()]);
                c.args(self.env_args(env));
                c
            }
        }
    }

    /// The launcher arguments that set `env` in every rank (not in the launcher):
    /// `-x NAME=VALUE` (Open MPI), `-genv NAME VALUE` (MPICH's Hydra).
    pub fn env_args(self, env: &[(String, String)]) -> Vec<String> {
        env.iter()
            .flat_map(|(k, v)| match self {
                MpiImpl::OpenMpi => vec!["-x".to_owned(), format!("{k}={v}")],
                MpiImpl::Mpich => vec!["-genv".to_owned(), k.clone(), v.clone()],
            })
            .collect()
    }

    /// Whether this implementation's Fortran bindings call `PMPI_*` directly (so the
    /// transparent layer must wrap the Fortran entry points itself).
    pub fn fortran_bypasses_c(self) -> bool {
        self == MpiImpl::OpenMpi
    }
}

/// The libraries built for one implementation.
#[derive(Debug, Clone)]
pub struct Libraries {
    /// The implementation.
    pub mpi: MpiImpl,
    /// Directory holding the libraries.
    pub dir: PathBuf,
    /// `libsymvirt_mpi_<impl>.so`.
    pub explicit_shared: PathBuf,
    /// `libsymvirt_mpi_<impl>.a` (link also `-lpthread -ldl -lm`).
    pub explicit_static: PathBuf,
    /// `libsymvirt_pmpi_<impl>.so` for `LD_PRELOAD`.
    pub transparent: PathBuf,
}

/// This crate's directory (sources, headers).
pub fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The public headers' directory.
pub fn include_dir() -> PathBuf {
    crate_dir().join("include")
}

/// The libraries the Rust staticlib needs when linked into a C program or library.
pub const CORE_LINK_LIBS: [&str; 5] = ["-lpthread", "-ldl", "-lm", "-lrt", "-lgcc_s"];

fn run(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().map_err(|e| Error::Build {
        what: format!("{what}: cannot run {:?}", cmd.get_program()),
        source: Some(e),
    })?;
    if !out.status.success() {
        return Err(Error::Build {
            what: format!(
                "{what}: {:?} failed ({}):\n{}{}",
                cmd,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            source: None,
        });
    }
    Ok(())
}

fn rename(tmp: &Path, dst: &Path) -> Result<()> {
    std::fs::rename(tmp, dst).map_err(|e| Error::Build {
        what: format!("rename {} to {}", tmp.display(), dst.display()),
        source: Some(e),
    })
}

/// The glue both libraries carry besides their own sources.
const SHARED_SOURCES: &[&str] = &["ucx_finalize.c"];

/// The transparent layer's sources, as paths under `csrc/`: every `.c` file in `csrc/pmpi/`
/// (sorted), then [`SHARED_SOURCES`], then `symvirt_pmpi_fortran.c`.
fn transparent_sources() -> Result<Vec<String>> {
    let dir = crate_dir().join("csrc").join("pmpi");
    let listing_failed = |e| Error::Build {
        what: format!("list {}", dir.display()),
        source: Some(e),
    };
    let mut sources = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(listing_failed)? {
        let name = entry.map_err(listing_failed)?.file_name();
        let name = name.to_string_lossy();
        if name.ends_with(".c") {
            sources.push(format!("pmpi/{name}"));
        }
    }
    if sources.is_empty() {
        return Err(Error::Build {
            what: format!("no C sources in {}", dir.display()),
            source: None,
        });
    }
    sources.sort();
    sources.extend(SHARED_SOURCES.iter().map(|s| s.to_string()));
    sources.push("symvirt_pmpi_fortran.c".to_string());
    Ok(sources)
}

/// Where [`compile_object`] puts the object of `source`: `pmpi_cut.o` for `pmpi/cut.c`.
fn object_path(source: &str, out_dir: &Path) -> PathBuf {
    out_dir.join(source.replace('/', "_").replace(".c", ".o"))
}

/// Compiles `source` (a path under `csrc/`) into `out_dir`, as [`object_path`] names it.
fn compile_object(mpi: MpiImpl, source: &str, out_dir: &Path) -> Result<PathBuf> {
    let src = crate_dir().join("csrc").join(source);
    let obj = object_path(source, out_dir);
    let tmp = obj.with_extension(format!("o.{}.tmp", std::process::id()));
    run(
        Command::new(mpi.mpicc())
            .args(["-c", "-O2", "-g", "-fPIC", "-Wall", "-Wextra", "-std=gnu11"])
            // Calls into MPI through its GOT entry, not a PLT stub: a jump fewer on every
            // wrapped call's way to PMPI.
            .arg("-fno-plt")
            // MPICH marks MPI_STATUSES_IGNORE arguments as arrays: a false positive.
            .arg("-Wno-stringop-overflow")
            .arg(format!("-DSYMVIRT_MPI_IMPL_{}", mpi.name().to_uppercase()))
            .arg("-I")
            .arg(include_dir())
            .arg(&src)
            .arg("-o")
            .arg(&tmp),
        &format!("compile {source} for {}", mpi.name()),
    )?;
    rename(&tmp, &obj)?;
    Ok(obj)
}

/// Compiles `sources` like [`compile_object`], as many at once as there are CPUs; the objects
/// in the order of `sources`, or the first source's error.
fn compile_objects(mpi: MpiImpl, sources: &[String], out_dir: &Path) -> Result<Vec<PathBuf>> {
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, sources.len().max(1));
    let next = AtomicUsize::new(0);
    let done = Mutex::new(Vec::with_capacity(sources.len()));
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(source) = sources.get(i) else {
                        break;
                    };
                    let obj = compile_object(mpi, source, out_dir);
                    done.lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push((i, obj));
                }
            });
        }
    });
    let mut done = done.into_inner().unwrap_or_else(PoisonError::into_inner);
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, obj)| obj).collect()
}

fn link_shared(
    mpi: MpiImpl,
    objs: &[PathBuf],
    core: &Path,
    extra_libs: &[&str],
    out: &Path,
) -> Result<()> {
    let tmp = out.with_extension(format!("so.{}.tmp", std::process::id()));
    run(
        Command::new(mpi.mpicc())
            .args(["-shared", "-fPIC", "-Wl,--no-undefined"])
            .args(objs)
            .arg(core)
            .args(CORE_LINK_LIBS)
            .args(extra_libs)
            .arg("-o")
            .arg(&tmp),
        &format!("link {}", out.display()),
    )?;
    rename(&tmp, out)
}

/// Where [`build_libraries`] puts `mpi`'s transparent layer in `out_dir`.
pub fn transparent_path(mpi: MpiImpl, out_dir: &Path) -> PathBuf {
    out_dir.join(format!("libsymvirt_pmpi_{}.so", mpi.name()))
}

/// Builds the libraries for `mpi` in `out_dir` from `core` (this crate's `libsymvirt_mpi.a`).
pub fn build_libraries(mpi: MpiImpl, core: &Path, out_dir: &Path) -> Result<Libraries> {
    std::fs::create_dir_all(out_dir).map_err(|e| Error::Build {
        what: format!("create {}", out_dir.display()),
        source: Some(e),
    })?;
    let n = mpi.name();
    // The shared glue is among the transparent layer's sources: compiled once, used by both.
    let transparent = compile_objects(mpi, &transparent_sources()?, out_dir)?;
    let mut explicit = vec![compile_object(mpi, "symvirt_explicit.c", out_dir)?];
    explicit.extend(SHARED_SOURCES.iter().map(|s| object_path(s, out_dir)));

    let explicit_shared = out_dir.join(format!("libsymvirt_mpi_{n}.so"));
    link_shared(mpi, &explicit, core, &[], &explicit_shared)?;
    let transparent_so = transparent_path(mpi, out_dir);
    link_shared(
        mpi,
        &transparent,
        core,
        mpi.transparent_link_libs(),
        &transparent_so,
    )?;

    // The static library: one relocatable object holding the glue and the whole core
    // staticlib (`ld -r`), archived with gcc-ar: it passes GCC's own LTO plugin, so binutils
    // does not try other installed plugins (LLVMgold aborts on Rust's objects).
    let explicit_static = out_dir.join(format!("libsymvirt_mpi_{n}.a"));
    let combined = out_dir.join(format!("symvirt_mpi_{n}_all.{}.o", std::process::id()));
    run(
        Command::new("ld")
            .arg("-r")
            .arg("-o")
            .arg(&combined)
            .args(&explicit)
            .arg("--whole-archive")
            .arg(core)
            .arg("--no-whole-archive"),
        &format!("combine objects for {}", explicit_static.display()),
    )?;
    let tmp = out_dir.join(format!("libsymvirt_mpi_{n}.a.{}.tmp", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    run(
        Command::new("gcc-ar").arg("rcs").arg(&tmp).arg(&combined),
        &format!("archive {}", explicit_static.display()),
    )?;
    let _ = std::fs::remove_file(&combined);
    rename(&tmp, &explicit_static)?;

    Ok(Libraries {
        mpi,
        dir: out_dir.to_path_buf(),
        explicit_shared,
        explicit_static,
        transparent: transparent_so,
    })
}

/// How a program uses the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Linkage {
    /// Calls the explicit API; linked statically with `libsymvirt_mpi_<impl>.a`
    /// (compiled with `-DSYMVIRT_EXPLICIT`).
    Explicit,
    /// Knows nothing of SymVirt (the transparent layer is preloaded at run time).
    Plain,
}

/// Compiles an MPI program (`.c` with mpicc, `.f90` with mpif90) from `source` into `out`.
pub fn build_program(
    libs: &Libraries,
    source: &Path,
    linkage: Linkage,
    out: &Path,
) -> Result<PathBuf> {
    let fortran = source.extension().is_some_and(|e| e == "f90");
    let compiler = if fortran {
        libs.mpi.mpif90()
    } else {
        libs.mpi.mpicc()
    };
    let tmp = out.with_extension(format!("{}.tmp", std::process::id()));
    let mut cmd = Command::new(compiler);
    cmd.args(["-O2", "-g"]);
    // Fortran module files go next to the output, not into the working directory.
    let modules = out.with_extension(format!("{}.mod.d", std::process::id()));
    if fortran {
        std::fs::create_dir_all(&modules).map_err(|e| Error::Build {
            what: format!("create {}", modules.display()),
            source: Some(e),
        })?;
        cmd.arg("-cpp").arg("-J").arg(&modules);
    } else {
        cmd.args(["-Wall", "-Wextra", "-std=gnu11"])
            // MPICH marks MPI_STATUSES_IGNORE arguments as arrays: a false positive.
            .arg("-Wno-stringop-overflow");
    }
    cmd.arg("-I").arg(include_dir()).arg(source);
    if linkage == Linkage::Explicit {
        cmd.arg("-DSYMVIRT_EXPLICIT").arg(&libs.explicit_static);
        cmd.args(CORE_LINK_LIBS);
    }
    cmd.arg("-o").arg(&tmp);
    let built = run(&mut cmd, &format!("build {}", source.display()));
    let _ = std::fs::remove_dir_all(&modules);
    built?;
    rename(&tmp, out)?;
    Ok(out.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transparent_sources_are_the_layer_files_then_shared_then_fortran() {
        let sources = transparent_sources().unwrap();
        let (fortran, rest) = sources.split_last().unwrap();
        assert_eq!(fortran, "symvirt_pmpi_fortran.c");
        let (layer, shared) = rest.split_at(rest.len() - SHARED_SOURCES.len());
        assert_eq!(shared, SHARED_SOURCES);
        assert!(layer.iter().any(|s| s == "pmpi/init.c"), "{layer:?}");
        assert!(layer.iter().any(|s| s == "pmpi/collectives.c"), "{layer:?}");
        assert!(
            layer
                .iter()
                .all(|s| s.starts_with("pmpi/") && s.ends_with(".c"))
        );
        assert!(layer.windows(2).all(|w| w[0] < w[1]), "sorted: {layer:?}");
        for s in &sources {
            assert!(crate_dir().join("csrc").join(s).is_file(), "{s}");
        }
    }
}
