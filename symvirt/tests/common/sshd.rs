//! A private OpenSSH server on loopback for tests of `ssh:` endpoints.
//!
//! [`Sshd::start`] runs `sshd -D -e -f DIR/sshd_config` as the current user, with its own host
//! key, `ListenAddress 127.0.0.1:<free port>`, and a fresh client key in `DIR/authorized_keys`.
//! [`Sshd::ssh_program`] is a wrapper script (`ssh -F DIR/ssh_config "$@"`, a plan's
//! `ssh_program`) under which [`Sshd::alias`] reaches that server non-interactively and
//! [`Sshd::closed_alias`] names a loopback port where nothing listens. Dropping the [`Sshd`]
//! kills the server and every process whose command line still names its directory (the
//! clients started through the wrapper), then removes the directory.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const START_PATIENCE: Duration = Duration::from_secs(30);

/// A running private sshd.
pub struct Sshd {
    dir: PathBuf,
    child: Child,
}

/// The pids of processes (other than this one) whose command line contains `needle`: the
/// processes a test started with its own private paths in their arguments.
pub fn processes_mentioning(needle: &str) -> Vec<u32> {
    let me = std::process::id();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| pid != me)
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .is_ok_and(|c| c.contains(needle))
        })
        .collect()
}

/// Kills (SIGKILL, by pid) every process whose command line contains `needle`.
pub fn kill_processes_mentioning(needle: &str) {
    for pid in processes_mentioning(needle) {
        // SAFETY: kill(2) on a pid read from /proc whose command line names this test's
        // private directory; no memory is involved.
        unsafe {
            libc::kill(pid as i32, libc::SIGKILL);
        }
    }
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot run: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_file(path: &Path, text: &str, mode: u32) {
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(text.as_bytes()).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

impl Sshd {
    /// Starts `sshd_binary` in a fresh directory (named after `tag`) and waits until it listens.
    ///
    /// Returns `Err` with the reason when this machine cannot run a private sshd (for the
    /// caller to skip or fail on).
    pub fn start(sshd_binary: &Path, tag: &str) -> Result<Sshd, String> {
        let dir = std::env::temp_dir().join(format!("ninja-sshd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // Run as root, sshd refuses to start without its privilege separation directory
        // (as another user it needs none).
        let privsep = Path::new("/run/sshd");
        // SAFETY: geteuid(2) has no preconditions and touches no memory of ours.
        let root = unsafe { libc::geteuid() } == 0;
        if root && !privsep.is_dir() {
            std::fs::create_dir_all(privsep)
                .and_then(|()| {
                    std::fs::set_permissions(privsep, std::fs::Permissions::from_mode(0o755))
                })
                .map_err(|e| format!("sshd needs {}: {e}", privsep.display()))?;
        }
        for key in ["host_key", "client_key"] {
            run(
                Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-C", key, "-f"])
                    .arg(dir.join(key)),
                "ssh-keygen",
            );
        }
        std::fs::copy(dir.join("client_key.pub"), dir.join("authorized_keys")).unwrap();
        let port = ninja_testkit::free_tcp_port();
        let closed_port = ninja_testkit::free_tcp_port();
        let d = dir.display();
        write_file(
            &dir.join("sshd_config"),
            &format!(
                "ListenAddress 127.0.0.1:{port}\n\
                 HostKey {d}/host_key\n\
                 AuthorizedKeysFile {d}/authorized_keys\n\
                 PidFile none\n\
                 UsePAM no\n\
                 StrictModes no\n\
                 PubkeyAuthentication yes\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 PermitRootLogin prohibit-password\n\
                 AllowStreamLocalForwarding yes\n\
                 X11Forwarding no\n\
                 PrintMotd no\n\
                 LogLevel VERBOSE\n"
            ),
            0o600,
        );
        let host = |alias: &str, port: u16| {
            format!(
                "Host {alias}\n  HostName 127.0.0.1\n  Port {port}\n  IdentityFile {d}/client_key\n  \
                 IdentitiesOnly yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  \
                 BatchMode yes\n  ConnectTimeout 10\n  LogLevel INFO\n"
            )
        };
        write_file(
            &dir.join("ssh_config"),
            &format!(
                "{}{}",
                host("ninja-loopback", port),
                host("ninja-closed", closed_port)
            ),
            0o600,
        );
        write_file(
            &dir.join("ssh"),
            &format!("#!/bin/sh\nexec ssh -F '{d}/ssh_config' \"$@\"\n"),
            0o755,
        );
        let log = std::fs::File::create(dir.join("sshd.log")).unwrap();
        let mut cmd = Command::new(sshd_binary);
        cmd.args(["-D", "-e", "-f"])
            .arg(dir.join("sshd_config"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // Its own process group, so that a test's Ctrl-C reaches it through the Drop only.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd
            .spawn()
            .map_err(|e| format!("{}: {e}", sshd_binary.display()))?;
        let mut sshd = Sshd { dir, child };
        let started = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Ok(Some(status)) = sshd.child.try_wait() {
                return Err(format!("sshd exited ({status}): {}", sshd.log()));
            }
            if started.elapsed() > START_PATIENCE {
                return Err(format!("sshd not listening: {}", sshd.log()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(sshd)
    }

    /// The host name under [`Sshd::ssh_program`] that reaches this server.
    pub fn alias(&self) -> &'static str {
        "ninja-loopback"
    }

    /// A host name under [`Sshd::ssh_program`] whose port has no server.
    pub fn closed_alias(&self) -> &'static str {
        "ninja-closed"
    }

    /// The wrapper script to use as `ssh`.
    pub fn ssh_program(&self) -> PathBuf {
        self.dir.join("ssh")
    }

    /// What the server logged.
    pub fn log(&self) -> String {
        std::fs::read(self.dir.join("sshd.log"))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// The ssh clients started through the wrapper that still run.
    pub fn clients(&self) -> Vec<u32> {
        processes_mentioning(&format!("{}/ssh_config", self.dir.display()))
            .into_iter()
            .filter(|pid| !is_zombie(*pid))
            .collect()
    }
}

/// Whether `pid` has exited and waits to be reaped (its /proc entry lingers).
pub fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

impl Drop for Sshd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group of the sshd this value started (its own group,
        // see `start`); no memory is involved.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        kill_processes_mentioning(&self.dir.display().to_string());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
