//! Whether this rank's MPI uses RDMA verbs: such a rank is refused a cut.
//!
//! An MPI whose transport uses verbs (UCX, or Open MPI's openib, over an InfiniBand HCA) holds
//! queue pairs, memory registrations and a device context on the passthrough HCA; none of them
//! survives the device being swapped for another during a migration. So a rank that has a
//! verbs device open answers a cut with `unable` instead of `quiesced`
//! ([`crate::control::Control::quiesce`] asks [`refusal`]): the agent fails the epoch with the
//! reason, the host rolls back, and the job keeps running where it is.
//!
//! Detection is transport-agnostic: the process has a file descriptor open on a verbs device
//! node (`/proc/self/fd/*` links into `/dev/infiniband/`: `uverbsN`, `rdma_cm`, ...), which is
//! true of Open MPI 4.1 and MPICH 4.0 (ch4:ucx) whenever they use an HCA, and whenever they
//! opened one at start (UCX opens the HCAs it finds) even if shared memory carries the job's
//! traffic: that device context would not survive the swap either. The scan runs at a cut
//! only, never on an MPI call.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Where verbs device nodes live.
pub const DEFAULT_DEVICE_DIR: &str = "/dev/infiniband/";

/// Test hook: a directory that stands in for [`DEFAULT_DEVICE_DIR`] (there is no InfiniBand
/// hardware on the test machines). Read once, when the control plane opens.
pub const DEVICE_DIR_ENV: &str = "SYMVIRT_VERBS_DEVICE_DIR";

static DEVICE_DIR: OnceLock<PathBuf> = OnceLock::new();

/// The directory of verbs device nodes: `$SYMVIRT_VERBS_DEVICE_DIR` (resolved, as the kernel
/// reports open files' paths), else `/dev/infiniband/`. The environment is read at the first
/// call; [`crate::control`] makes that call when it opens.
pub fn device_dir() -> &'static Path {
    DEVICE_DIR.get_or_init(|| match std::env::var_os(DEVICE_DIR_ENV) {
        Some(d) if !d.is_empty() => {
            let d = PathBuf::from(d);
            d.canonicalize().unwrap_or(d)
        }
        _ => PathBuf::from(DEFAULT_DEVICE_DIR),
    })
}

/// The files under `dir` (not `dir` itself) this process has open, each once, in fd order.
pub fn open_under(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = Vec::new();
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return found;
    };
    for fd in fds.flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else {
            continue; // closed meanwhile (the directory's own fd, another thread's file)
        };
        let below = target
            .strip_prefix(dir)
            .is_ok_and(|rest| !rest.as_os_str().is_empty());
        if below && !found.contains(&target) {
            found.push(target);
        }
    }
    found
}

/// Why this rank cannot be migrated because its MPI uses RDMA verbs, or `None` when it holds
/// no verbs device open. The agent prefixes "rank R cannot quiesce: ".
pub fn refusal() -> Option<String> {
    let open = open_under(device_dir());
    let first = open.first()?;
    let more = match open.len() {
        1 => String::new(),
        n => format!(" and {} more", n - 1),
    };
    Some(format!(
        "its MPI uses RDMA verbs ({}{more} open): verbs endpoints cannot survive the device swap",
        first.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A STAND-IN for /dev/infiniband: a temporary directory with a plain file named like a
    /// verbs device node. Held open, it is found; closed, it is not; the directory alone never.
    #[test]
    fn a_standin_device_file_held_open_is_found() {
        let dir = std::env::temp_dir().join(format!("symvirt-mpi-verbs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let dir = dir.canonicalize().unwrap();
        let node = dir.join("uverbs0");
        std::fs::write(&node, b"").unwrap();
        assert!(open_under(&dir).is_empty());
        let held_dir = std::fs::File::open(&dir).unwrap();
        assert!(
            open_under(&dir).is_empty(),
            "the directory itself is no device"
        );
        let held = std::fs::File::open(&node).unwrap();
        let again = std::fs::File::open(&node).unwrap();
        assert_eq!(open_under(&dir), vec![node.clone()]);
        drop((held, again, held_dir));
        assert!(open_under(&dir).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
