//! Libvirt daemons standing for hosts, for the libvirt backend's tests and benchmarks.
//!
//! [`LibvirtHost::start`] runs a private `libvirtd` that behaves as another host's would:
//!
//! - **Its own everything.** The daemon runs in a private mount namespace (`unshare -m`) in
//!   which `/etc/libvirt`, `/run/libvirt`, `/var/lib/libvirt`, `/var/log/libvirt` and
//!   `/var/cache/libvirt` are bind mounts of directories under the host's own temporary
//!   directory: its configuration, domain state, channel sockets and capability cache are its
//!   own. Its client socket is outside, in `DIR/sock` (`unix_sock_dir`), and it is reached
//!   as `qemu+unix:///system?socket=DIR/sock/libvirt-sock`, the URI a plan names.
//! - **Its own identity.** `host_uuid` differs per daemon: libvirt refuses to migrate a domain
//!   to a daemon with the source's host UUID ("the same host").
//! - **No system services.** QEMU runs as root without a security driver, cgroups or
//!   `virtlogd` (`stdio_handler = "file"`): a container has none of them.
//!
//! The QEMUs such a daemon starts see the host's files (kernel, initramfs, `/dev/shm`); two
//! daemons on one machine differ in what libvirt keeps, which is what the backend relies on.
//! Dropping a [`LibvirtHost`] destroys its domains (their QEMUs end) and stops the daemon.

use crate::skip::{Requirement, skip};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// Where Debian installs the daemon.
pub const LIBVIRTD: &str = "/usr/sbin/libvirtd";

/// The directories a daemon keeps its state in, each replaced by its own in its namespace.
const PRIVATE_DIRS: [(&str, &str); 5] = [
    ("etc", "/etc/libvirt"),
    ("run", "/run/libvirt"),
    ("lib", "/var/lib/libvirt"),
    ("log", "/var/log/libvirt"),
    ("cache", "/var/cache/libvirt"),
];

/// True if libvirt's daemon and `virsh` are installed; otherwise skips (see [`skip`]).
pub fn libvirt_or_skip(test: &str) -> bool {
    let mut missing = Vec::new();
    if !Path::new(LIBVIRTD).is_file() {
        missing.push(LIBVIRTD);
    }
    if Command::new("virsh").arg("--version").output().is_err() {
        missing.push("virsh");
    }
    if missing.is_empty() {
        return true;
    }
    skip(
        Requirement::Libvirt,
        test,
        &format!(
            "not installed: {} (libvirt-daemon-driver-qemu, libvirt-clients)",
            missing.join(", ")
        ),
    );
    false
}

/// A private libvirt daemon standing for one host.
#[derive(Debug)]
pub struct LibvirtHost {
    daemon: Child,
    dir: PathBuf,
    uri: String,
}

impl LibvirtHost {
    /// Starts a daemon for host `name` (a unique host UUID is derived from it and this
    /// process) and waits until it answers.
    pub fn start(name: &str) -> io::Result<LibvirtHost> {
        static NEXT: AtomicU32 = AtomicU32::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("ninja-lv-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (sub, _) in PRIVATE_DIRS {
            fs::create_dir_all(dir.join(sub))?;
        }
        let sock = dir.join("sock");
        fs::create_dir_all(&sock)?;
        let uuid = format!("4e494e4a-{:04x}-4000-8000-{:012x}", n, std::process::id());
        fs::write(
            dir.join("etc/libvirtd.conf"),
            format!(
                "unix_sock_dir = \"{}\"\nhost_uuid = \"{uuid}\"\nauth_unix_rw = \"none\"\n\
                 auth_unix_ro = \"none\"\nlog_outputs = \"3:file:{}\"\n",
                sock.display(),
                dir.join("libvirtd.log").display()
            ),
        )?;
        fs::write(
            dir.join("etc/qemu.conf"),
            "user = \"root\"\ngroup = \"root\"\ndynamic_ownership = 0\nremember_owner = 0\n\
             security_driver = \"none\"\ncgroup_controllers = [ ]\nstdio_handler = \"file\"\n",
        )?;
        let mut mounts = String::new();
        for (sub, target) in PRIVATE_DIRS {
            // The mount points must exist on the host (a fresh machine may lack /run/libvirt).
            fs::create_dir_all(target)?;
            mounts.push_str(&format!(
                "mount --bind '{}' '{target}' && ",
                dir.join(sub).display()
            ));
        }
        let script = format!(
            "{mounts}exec {LIBVIRTD} --config /etc/libvirt/libvirtd.conf --pid-file '{}'",
            dir.join("libvirtd.pid").display()
        );
        let daemon = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("stderr.log"))?)
            .spawn()?;
        let uri = format!(
            "qemu+unix:///system?socket={}",
            sock.join("libvirt-sock").display()
        );
        let mut host = LibvirtHost { daemon, dir, uri };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(out) = host.virsh(&["uri"]) {
                if out.status.success() {
                    return Ok(host);
                }
            }
            if let Some(status) = host.daemon.try_wait()? {
                return Err(io::Error::other(format!(
                    "libvirtd for {name} exited ({status}): {}",
                    host.log()
                )));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::other(format!(
                    "libvirtd for {name} did not answer in 30 s: {}",
                    host.log()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The URI that reaches this daemon.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The daemon's directory (its private state is under it).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Runs `virsh -c URI ARGS`.
    pub fn virsh(&self, args: &[&str]) -> io::Result<Output> {
        Command::new("virsh")
            .arg("-c")
            .arg(&self.uri)
            .args(args)
            .stdin(Stdio::null())
            .output()
    }

    /// Runs `virsh` and returns its standard output; `Err` with its error output on failure.
    pub fn virsh_ok(&self, args: &[&str]) -> io::Result<String> {
        let out = self.virsh(args)?;
        if !out.status.success() {
            return Err(io::Error::other(format!(
                "virsh {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Creates a transient domain from `xml`.
    pub fn create(&self, xml: &str) -> io::Result<()> {
        let file = self.dir.join(format!(
            "domain-{}.xml",
            NEXT_FILE.fetch_add(1, Ordering::Relaxed)
        ));
        fs::write(&file, xml)?;
        self.virsh_ok(&["create", &file.display().to_string()])
            .map(drop)
    }

    /// Defines a persistent domain from `xml` and starts it.
    pub fn define_and_start(&self, xml: &str, name: &str) -> io::Result<()> {
        let file = self.dir.join(format!(
            "domain-{}.xml",
            NEXT_FILE.fetch_add(1, Ordering::Relaxed)
        ));
        fs::write(&file, xml)?;
        self.virsh_ok(&["define", &file.display().to_string()])?;
        self.virsh_ok(&["start", name]).map(drop)
    }

    /// Whether the daemon has a persistent definition of `domain`.
    pub fn is_defined(&self, domain: &str) -> bool {
        self.virsh_ok(&["list", "--all", "--persistent", "--name"])
            .is_ok_and(|names| names.lines().any(|l| l.trim() == domain))
    }

    /// The state `virsh domstate` gives (`running`, `paused`, ...), or None if the daemon has
    /// no such domain.
    pub fn domain_state(&self, domain: &str) -> Option<String> {
        let out = self.virsh(&["domstate", domain]).ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// The domain's live XML.
    pub fn dumpxml(&self, domain: &str) -> io::Result<String> {
        self.virsh_ok(&["dumpxml", domain])
    }

    /// The daemon's log (errors only), for failure messages.
    pub fn log(&self) -> String {
        let mut text = fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
        text.push_str(&fs::read_to_string(self.dir.join("libvirtd.log")).unwrap_or_default());
        text
    }

    /// Stops the daemon without ending its domains (a daemon that dies under a migration).
    pub fn kill_daemon(&mut self) {
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
    }

    /// The pids of the QEMUs this daemon started: its domains' (`run/qemu/NAME.pid`) and the
    /// one it probes QEMU's capabilities with (`lib/qemu/qmp-*/qmp.pid`), which a daemon killed
    /// while probing leaves behind.
    fn qemu_pids(&self) -> Vec<i32> {
        let pid_files = |dir: PathBuf| -> Vec<PathBuf> {
            fs::read_dir(dir)
                .map(|entries| entries.flatten().map(|e| e.path()).collect())
                .unwrap_or_default()
        };
        let mut files: Vec<PathBuf> = pid_files(self.dir.join("run/qemu"))
            .into_iter()
            .filter(|p| p.extension().is_some_and(|x| x == "pid"))
            .collect();
        for probe in pid_files(self.dir.join("lib/qemu")) {
            if probe
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("qmp-"))
            {
                files.push(probe.join("qmp.pid"));
            }
        }
        files
            .iter()
            .filter_map(|f| fs::read_to_string(f).ok()?.trim().parse().ok())
            .collect()
    }
}

static NEXT_FILE: AtomicU32 = AtomicU32::new(0);

impl Drop for LibvirtHost {
    fn drop(&mut self) {
        if let Ok(names) = self.virsh_ok(&["list", "--all", "--name"]) {
            for name in names.lines().filter(|l| !l.trim().is_empty()) {
                let _ = self.virsh(&["destroy", name.trim()]);
                let _ = self.virsh(&["undefine", name.trim()]);
            }
        }
        // Whatever QEMU is left (a daemon killed under its domains) ends too.
        for pid in self.qemu_pids() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).output();
        }
        let _ = self.daemon.kill();
        let _ = self.daemon.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
