//! Whether this rank's placement lets the kernel leave its cut thread unrun for a long time.
//!
//! A thread that takes cuts while the application computes (the transparent layer's progress
//! thread, the agent watcher, the explicit libraries' quiet threads) sleeps until a request,
//! then must run within milliseconds. Measured with 4 MPICH ranks on 2 cores (a kernel
//! scheduler trace, `symvirt/mpi/README.md`): when each rank is a scheduling group of its own
//! and ranks are not bound to cores, such a thread, woken onto a core where another rank's
//! computing thread and polling cut thread ran, waited 50-130 ms; 3 to 5 cuts in 60-70 took
//! 40-220 ms. Each rank is a group of its own when it leads its own session (MPICH's launcher
//! makes one per rank; Open MPI's ranks share the launcher's) and the kernel's autogroups are
//! on and apply (the process is in the root CPU cgroup). Bound to cores, or with autogroups
//! off, no cut was slow. Rank 0 says so when its cut thread starts ([`warn`]: the layer at
//! start, the explicit libraries at their first quiet phase); it cannot change either itself.

use std::path::Path;

/// Prints to stderr why this rank's cut threads may wait to run ([`hazard`]), once per process;
/// whether it printed. For one rank of a job to call when its cut thread starts (launchers
/// place every rank alike).
pub fn warn() -> bool {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let mut printed = false;
    WARNED.call_once(|| {
        if let Some(why) = hazard() {
            eprintln!("symvirt: {why}");
            printed = true;
        }
    });
    printed
}

/// The kernel's switch for autogroups.
const AUTOGROUP_SWITCH: &str = "/proc/sys/kernel/sched_autogroup_enabled";

/// Why this process's cut threads may wait tens of milliseconds to run when ranks share cores,
/// or `None` when its placement does not make it so: it leads its own session, the kernel's
/// autogroups are on and apply to it, and it may run on more than one core.
pub fn hazard() -> Option<String> {
    if !autogroups_apply() {
        return None;
    }
    // SAFETY: getsid and getpid take no pointers and only read the calling process's ids.
    let own_session = unsafe { libc::getsid(0) == libc::getpid() };
    if !own_session {
        return None;
    }
    let cpus = allowed_cpus()?;
    (!on_one_core(&cpus)).then(|| {
        format!(
            "this rank is not bound to a core ({} CPUs allowed) and is a scheduling group of its \
             own (its own session, with the kernel's autogroups on): where ranks share cores, a \
             cut may take up to about 200 ms while the kernel leaves this rank's cut thread \
             unrun; bind ranks to cores (mpiexec -bind-to core) or set \
             kernel.sched_autogroup_enabled=0",
            cpus.len()
        )
    })
}

/// Whether the kernel's autogroups are on and apply to this process (it is in the root CPU
/// group): then every session is a scheduling group of its own.
fn autogroups_apply() -> bool {
    std::fs::read_to_string(AUTOGROUP_SWITCH).is_ok_and(|s| s.trim() == "1") && in_root_cpu_group()
}

/// The CPUs this thread may run on.
fn allowed_cpus() -> Option<Vec<usize>> {
    // SAFETY: cpu_set_t is plain data, valid all zeroes.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: sched_getaffinity writes at most size_of::<cpu_set_t>() bytes into `set`, a live
    // cpu_set_t of that size.
    let rc =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    (rc == 0).then(|| {
        (0..libc::CPU_SETSIZE as usize)
            // SAFETY: CPU_ISSET only reads the set sched_getaffinity filled, at an index below
            // its size.
            .filter(|&c| unsafe { libc::CPU_ISSET(c, &set) })
            .collect()
    })
}

/// Whether `cpus` are the hardware threads of one core (a rank bound with `-bind-to core` on
/// a machine with SMT may run on two or more).
fn on_one_core(cpus: &[usize]) -> bool {
    let Some(first) = cpus.first() else {
        return true;
    };
    let siblings = std::fs::read_to_string(format!(
        "/sys/devices/system/cpu/cpu{first}/topology/thread_siblings_list"
    ))
    .map(|list| cpu_list(&list))
    .unwrap_or_else(|_| vec![*first]);
    cpus.iter().all(|c| siblings.contains(c))
}

/// The CPUs of a kernel CPU list ("0-3,8,10-11").
fn cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        if let (Ok(lo), Ok(hi)) = (lo.parse::<usize>(), hi.parse::<usize>()) {
            cpus.extend(lo..=hi);
        }
    }
    cpus
}

/// Whether the kernel schedules this process in its root CPU group, where autogroups apply:
/// not in a cgroup below the root that the `cpu` controller governs (v1 `cpu` hierarchy, or
/// v2 with the controller enabled at the root, which every group below it then inherits from
/// its nearest ancestor that has it). Inside a cgroup namespace the paths look like the root
/// whatever the host's are: there it may report autogroups that do not apply.
fn in_root_cpu_group() -> bool {
    let Ok(groups) = std::fs::read_to_string("/proc/self/cgroup") else {
        return true;
    };
    in_root_cpu_group_of(&groups, Path::new("/sys/fs/cgroup"))
}

/// [`in_root_cpu_group`] for `groups` (the text of `/proc/self/cgroup`) with cgroup v2 mounted
/// at `v2_root`.
fn in_root_cpu_group_of(groups: &str, v2_root: &Path) -> bool {
    for line in groups.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id != "0" && controllers.split(',').any(|c| c == "cpu") {
            return path == "/";
        }
        if id == "0" && controllers.is_empty() && path != "/" {
            // cgroup v2: below the root, the cpu controller governs the group if the root
            // hands it down (a group without it is scheduled with its nearest ancestor that
            // has it, itself below the root).
            let handed =
                std::fs::read_to_string(v2_root.join("cgroup.subtree_control")).unwrap_or_default();
            if handed.split_whitespace().any(|c| c == "cpu") {
                return false;
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// cgroup v1: a `cpu` group below the root takes autogroups out; the root keeps them.
    /// cgroup v2: below the root, the root handing the cpu controller down takes them out,
    /// whatever the levels in between hand down.
    #[test]
    fn cpu_groups_below_the_root_take_autogroups_out() {
        let none = Path::new("/nonexistent");
        assert!(in_root_cpu_group_of(
            "4:memory:/x\n2:cpu,cpuacct:/\n0::/\n",
            none
        ));
        assert!(!in_root_cpu_group_of("2:cpu,cpuacct:/slurm/job1\n", none));
        assert!(in_root_cpu_group_of("0::/\n", none));
        // No cpu controller at the root (its subtree_control is missing here).
        assert!(in_root_cpu_group_of(
            "0::/user.slice/session-1.scope\n",
            none
        ));
        let dir = std::env::temp_dir().join(format!("symvirt-cg-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("user.slice")).unwrap();
        std::fs::write(dir.join("cgroup.subtree_control"), "cpu memory\n").unwrap();
        std::fs::write(
            dir.join("user.slice/cgroup.subtree_control"),
            "memory pids\n",
        )
        .unwrap();
        assert!(!in_root_cpu_group_of(
            "0::/user.slice/session-1.scope\n",
            &dir
        ));
        assert!(!in_root_cpu_group_of("0::/a\n", &dir));
        std::fs::write(dir.join("cgroup.subtree_control"), "memory pids\n").unwrap();
        assert!(in_root_cpu_group_of(
            "0::/user.slice/session-1.scope\n",
            &dir
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Kernel CPU lists, and a rank on the hardware threads of one core counts as bound.
    #[test]
    fn cpu_lists_and_one_core() {
        assert_eq!(cpu_list("0-3,8,10-11\n"), [0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(cpu_list("5"), [5]);
        assert!(cpu_list("").is_empty());
        assert!(on_one_core(&[0]));
        let siblings =
            std::fs::read_to_string("/sys/devices/system/cpu/cpu0/topology/thread_siblings_list")
                .map(|l| cpu_list(&l))
                .unwrap_or_else(|_| vec![0]);
        assert!(on_one_core(&siblings));
        let cpus = allowed_cpus().unwrap();
        let beyond: Vec<usize> = cpus
            .iter()
            .copied()
            .filter(|c| !siblings.contains(c))
            .collect();
        if let Some(&other) = beyond.first() {
            assert!(!on_one_core(&[0, other]));
        }
    }
}
