//! Finding what a test needs, and skipping loudly when it is missing.
//!
//! A test that needs a missing component prints `SKIPPED: <test>: <why>` straight to the process's
//! stderr (not through the test harness's capture, so it shows in CI logs) and returns. When the
//! environment variable `NINJA_REQUIRE` names the component (`qemu`, `kvm`, `mpi`, `ssh`; comma separated,
//! or `all`), the test panics instead: `scripts/test` sets it for every component the machine has,
//! so a machine that has QEMU cannot silently skip the QEMU tests.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A component a test may need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Requirement {
    /// `qemu-system-x86_64` and the guest fixtures.
    Qemu,
    /// A usable `/dev/kvm`.
    Kvm,
    /// Open MPI and MPICH (`mpirun`, `mpiexec.mpich`, compilers).
    Mpi,
    /// OpenSSH's server and client (`sshd`, `ssh`, `ssh-keygen`), for a private sshd on loopback.
    Ssh,
    /// Network namespaces, bridges and taps (root and iproute2), for the virtual-cluster tests.
    Netns,
    /// libvirt's daemon and `virsh`, for the libvirt backend's tests.
    Libvirt,
}

impl Requirement {
    fn name(self) -> &'static str {
        match self {
            Requirement::Qemu => "qemu",
            Requirement::Kvm => "kvm",
            Requirement::Mpi => "mpi",
            Requirement::Ssh => "ssh",
            Requirement::Netns => "netns",
            Requirement::Libvirt => "libvirt",
        }
    }

    /// Whether `NINJA_REQUIRE` forbids skipping for lack of this component.
    pub fn required(self) -> bool {
        std::env::var("NINJA_REQUIRE")
            .map(|v| {
                v.split(',')
                    .map(str::trim)
                    .any(|c| c == "all" || c == self.name())
            })
            .unwrap_or(false)
    }
}

/// Reports a skip: prints `SKIPPED: <test>: <why>` to stderr, or panics when the component is
/// required on this machine (see the module doc).
pub fn skip(req: Requirement, test: &str, why: &str) {
    if req.required() {
        panic!("{test}: NINJA_REQUIRE includes {} but: {why}", req.name());
    }
    let _ = writeln!(std::io::stderr(), "SKIPPED: {test}: {why}");
}

/// The guest kernel and initramfs built by `scripts/build-fixtures`.
#[derive(Debug, Clone)]
pub struct Fixtures {
    /// Debian cloud kernel (bzImage).
    pub kernel: PathBuf,
    /// Busybox initramfs with the guest programs.
    pub initramfs: PathBuf,
}

impl Fixtures {
    /// Where the fixtures are: `NINJA_FIXTURES_DIR`, else `target/fixtures` of this workspace.
    pub fn dir() -> PathBuf {
        if let Some(d) = std::env::var_os("NINJA_FIXTURES_DIR") {
            return PathBuf::from(d);
        }
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/fixtures")
    }

    /// The fixtures if both files exist.
    pub fn find() -> Result<Fixtures, String> {
        let dir = Fixtures::dir();
        let f = Fixtures {
            kernel: dir.join("vmlinuz"),
            initramfs: dir.join("initramfs.cpio.gz"),
        };
        for p in [&f.kernel, &f.initramfs] {
            if !p.is_file() {
                return Err(format!(
                    "{} missing (run scripts/build-fixtures)",
                    p.display()
                ));
            }
        }
        Ok(f)
    }
}

fn qemu_version() -> Result<String, String> {
    let out = Command::new(crate::qemu::QEMU_BINARY)
        .arg("--version")
        .output()
        .map_err(|e| format!("{} not runnable: {e}", crate::qemu::QEMU_BINARY))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .next()
        .map(str::to_owned)
        .ok_or_else(|| "qemu --version printed nothing".into())
}

/// The fixtures, if QEMU and the fixtures are there; otherwise skips (see [`skip`]) and returns None.
///
/// QEMU older than 9.0 counts as missing: it loses dirty pages under TCG during migration.
pub fn qemu_or_skip(test: &str) -> Option<Fixtures> {
    let check = || -> Result<Fixtures, String> {
        let version = qemu_version()?;
        let major: u32 = version
            .split_whitespace()
            .find_map(|w| w.split('.').next()?.parse().ok())
            .ok_or_else(|| format!("cannot read QEMU version from {version:?}"))?;
        if major < 9 {
            return Err(format!(
                "{version} loses dirty pages under TCG; install 10.x (scripts/install-deps)"
            ));
        }
        Fixtures::find()
    };
    match check() {
        Ok(f) => Some(f),
        Err(why) => {
            skip(Requirement::Qemu, test, &why);
            None
        }
    }
}

/// True if `/dev/kvm` can be opened read-write; otherwise skips and returns false.
pub fn kvm_or_skip(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            skip(Requirement::Kvm, test, &format!("/dev/kvm: {e}"));
            false
        }
    }
}

/// True if both Open MPI and MPICH launchers are installed; otherwise skips and returns false.
pub fn mpi_or_skip(test: &str) -> bool {
    let missing: Vec<&str> = ["mpirun.openmpi", "mpiexec.mpich"]
        .into_iter()
        .filter(|b| {
            Command::new(b)
                .arg("--version")
                .output()
                .map(|o| !o.status.success())
                .unwrap_or(true)
        })
        .collect();
    if missing.is_empty() {
        true
    } else {
        skip(
            Requirement::Mpi,
            test,
            &format!("not installed: {}", missing.join(", ")),
        );
        false
    }
}

/// Where `sshd` is installed (Debian puts it in /usr/sbin, often not on a user's PATH).
pub const SSHD_BINARY: &str = "/usr/sbin/sshd";

/// The `sshd` binary, if OpenSSH's server and client are installed; otherwise skips (see
/// [`skip`]) and returns None.
pub fn sshd_or_skip(test: &str) -> Option<PathBuf> {
    let sshd = PathBuf::from(SSHD_BINARY);
    let mut missing: Vec<&str> = Vec::new();
    if !sshd.is_file() {
        missing.push(SSHD_BINARY);
    }
    for client in ["ssh", "ssh-keygen"] {
        // `ssh -V` and `ssh-keygen -?` both exit non-zero; being runnable is what counts.
        if Command::new(client).arg("-V").output().is_err() {
            missing.push(client);
        }
    }
    if missing.is_empty() {
        Some(sshd)
    } else {
        skip(
            Requirement::Ssh,
            test,
            &format!("not installed: {} (openssh-server)", missing.join(", ")),
        );
        None
    }
}
