//! The QEMU backend: every step over QMP (the `qmp` crate), destinations started by
//! [`Launcher`] with `-incoming defer`.
//!
//! Migration uses QEMU's `pause-before-switchover` capability: each source stops at
//! `pre-switchover` with the guest paused, the controller waits for all of them, then sends
//! `migrate-continue` to each, so the whole cluster switches over together.

use crate::backend::{Leftovers, MigrationProgress, MigrationResult, VmBackend};
use crate::checkpoint::{self, DiskCopy, SavedState, StateFormat};
use crate::cluster::{
    Device, LaunchSpec, MigrationSettings, TLS_AUTHZ_ID, TLS_CREDS_ID, TlsSettings, VmSpec,
};
use crate::error::{Error, Result};
use crate::host_channel::{ChannelOptions, HostChannel};
use crate::remote::{Address, Connector};
use crate::session::GuestSession;
use qmp::{
    ConnectOptions, DeviceSpec, Endpoint, MigrationCapability, MigrationParameters,
    MigrationStatus, MigrationWait, NetdevSpec, ObjectSpec, Qmp, RunState, wait_for_migration,
};
use serde_json::{Value, json};
use std::collections::BTreeSet;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A destination QEMU process started by the controller.
#[derive(Debug)]
pub struct Launched {
    child: Option<Child>,
    log: PathBuf,
    remote: Option<RemoteLaunch>,
}

/// How to stop a QEMU started through `ssh HOST`: killing the local ssh client does not (the
/// remote command has no terminal, so nothing hangs it up), so its pid, printed first by the
/// remote shell (see [`Launcher::command`]), is signalled through another ssh.
#[derive(Debug)]
struct RemoteLaunch {
    ssh_program: String,
    host: String,
    /// Its `-qmp` argument: the remote kill checks the pid still is this QEMU.
    qmp_arg: String,
}

/// The first line a remote launch prints: the pid of the remote shell, which `exec`s QEMU.
const REMOTE_PID_PREFIX: &str = "ninja-launch-pid=";

/// Waits for `child` to exit, killing it at `deadline`.
fn wait_or_kill(child: &mut Child, deadline: Instant) {
    while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

impl Launched {
    /// Its process id (of `ssh` for a remote launch).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// What it printed (QEMU's errors).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn exited(&mut self) -> Option<String> {
        let child = self.child.as_mut()?;
        match child.try_wait() {
            Ok(Some(status)) => {
                // QEMU's own words, without the remote shell's pid line.
                let log = self.log();
                let said: Vec<&str> = log
                    .lines()
                    .filter(|l| !l.starts_with(REMOTE_PID_PREFIX))
                    .collect();
                Some(format!("exited ({status}): {}", said.join("\n").trim()))
            }
            _ => None,
        }
    }

    /// Kills it (the destination is being torn down); a remote QEMU through its host's ssh.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            if let Some(remote) = &self.remote {
                self.stop_remote(remote, &mut c);
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends SIGTERM to the remote QEMU while its session (`client`) still runs, then waits a
    /// moment for the session to end with it. Bounded: a host ssh cannot reach is left to the
    /// operator (the log names the pid).
    fn stop_remote(&self, remote: &RemoteLaunch, client: &mut Child) {
        let patience = Instant::now() + Duration::from_secs(10);
        let pid = loop {
            // A session that ended took QEMU with it (QEMU was its command).
            if !matches!(client.try_wait(), Ok(None)) {
                return;
            }
            let pid = self.log().lines().find_map(|l| {
                l.strip_prefix(REMOTE_PID_PREFIX)
                    .and_then(|p| p.trim().parse::<u32>().ok())
            });
            match pid {
                Some(pid) => break pid,
                None if Instant::now() >= patience => return,
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let script = format!(
            "grep -qsF -- {} /proc/{pid}/cmdline && kill -TERM {pid}",
            shell_quote(&remote.qmp_arg)
        );
        let killer = Command::new(&remote.ssh_program)
            .args(["-o", "BatchMode=yes", "--", &remote.host, &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        if let Ok(mut k) = killer {
            wait_or_kill(&mut k, patience);
        }
        wait_or_kill(client, Instant::now() + Duration::from_secs(5));
    }

    /// Leaves it running for good: it is the VM now.
    pub fn release(&mut self) {
        self.child.take();
    }
}

impl Drop for Launched {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts destination QEMUs: the plan's machine arguments, `-qmp` on the destination's
/// monitor address and `-incoming defer` (the controller then sends `migrate-incoming`).
#[derive(Debug, Clone)]
pub struct Launcher {
    /// The `ssh` program for remote launches.
    pub ssh_program: String,
    /// Where logs of started QEMUs go.
    pub log_dir: PathBuf,
}

/// Quotes one word for a remote shell (`ssh HOST CMD` runs CMD through the user's shell).
fn shell_quote(word: &str) -> String {
    if !word.is_empty()
        && word
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// QEMU's `-qmp` argument for a monitor at `qmp` (a path on QEMU's own host for `ssh:`).
fn qmp_monitor_arg(qmp: &Address) -> String {
    match qmp {
        Address::Local(e) => format!("{e},server=on,wait=off"),
        Address::Ssh { path, .. } => format!("unix:{},server=on,wait=off", path.display()),
    }
}

impl Launcher {
    /// The full command line of a destination.
    pub fn command(&self, spec: &LaunchSpec, qmp: &Address) -> Result<Command> {
        let qmp_arg = qmp_monitor_arg(qmp);
        let mut words = vec![spec.program.clone()];
        words.extend(spec.args.iter().cloned());
        words.extend(["-qmp".into(), qmp_arg, "-incoming".into(), "defer".into()]);
        let mut cmd = match &spec.host {
            None => {
                let mut c = Command::new(&words[0]);
                c.args(&words[1..]);
                c
            }
            Some(host) => {
                let mut c = Command::new(&self.ssh_program);
                let remote: Vec<String> = words.iter().map(|w| shell_quote(w)).collect();
                // The shell prints its pid and becomes QEMU: Launched::kill signals that pid.
                let script = format!("echo {REMOTE_PID_PREFIX}$$; exec {}", remote.join(" "));
                c.args(["-o", "BatchMode=yes", "--", host, &script]);
                c
            }
        };
        // Its own process group: a Ctrl-C meant for the controller must not kill the VMs.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        Ok(cmd)
    }

    /// Starts a destination for `vm`.
    pub fn launch(&self, vm: &str, spec: &LaunchSpec, qmp: &Address) -> Result<Launched> {
        std::fs::create_dir_all(&self.log_dir)
            .map_err(|e| Error::io(format!("create {}", self.log_dir.display()), e))?;
        let log = self.log_dir.join(format!("{vm}-destination.log"));
        // Never through a symlink planted at the log's name.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&log)
            .map_err(|e| Error::io(format!("create {}", log.display()), e))?;
        let err = file
            .try_clone()
            .map_err(|e| Error::io("clone log file", e))?;
        if let Address::Local(Endpoint::Unix(p)) = qmp {
            clear_dead_socket(vm, p)?;
        }
        let child = self
            .command(spec, qmp)?
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()
            .map_err(|e| Error::io(format!("start {} for {vm}", spec.program), e))?;
        let remote = spec.host.as_ref().map(|host| RemoteLaunch {
            ssh_program: self.ssh_program.clone(),
            host: host.clone(),
            qmp_arg: qmp_monitor_arg(qmp),
        });
        Ok(Launched {
            child: Some(child),
            log,
            remote,
        })
    }
}

/// Makes way for a destination's monitor socket at `path`: nothing there is fine; a dead
/// socket (no listener: a QEMU that was killed) is removed; anything else is refused, above all
/// a live socket (another VM's monitor would be taken over) or a file that is not a socket.
fn clear_dead_socket(vm: &str, path: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(format!("inspect {}", path.display()), e)),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::Refused(format!(
            "{vm}: the destination monitor path {} holds something that is not a socket; not \
             removing it",
            path.display()
        )));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(Error::Refused(format!(
            "{vm}: something is listening at the destination monitor path {} (another VM?); \
             not taking it over",
            path.display()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|e| Error::io(format!("remove the dead socket {}", path.display()), e)),
        Err(e) => Err(Error::io(format!("probe {}", path.display()), e)),
    }
}

/// How long a recovery waits for a monitor that may be gone.
const GONE_CHECK: Duration = Duration::from_secs(3);

/// Whether process `pid` runs and its command line contains `marker` (a QEMU started for a
/// monitor: a reused pid does not match).
fn process_matches(pid: u32, marker: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.split(|&b| b == 0).any(|w| w == marker.as_bytes()))
}

/// Kills the destination QEMU `pid` an interrupted run left (only while it still is that QEMU:
/// `marker` is its `-qmp` argument) and waits until it is gone.
fn kill_orphan(pid: u32, marker: &str, deadline: Instant) -> std::result::Result<(), String> {
    while process_matches(pid, marker) {
        if Instant::now() >= deadline {
            return Err(format!("destination process {pid} still runs"));
        }
        // SAFETY: kill(2) with a pid just checked to be that QEMU; no memory is involved.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Where the migration of one VM is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MigrationState {
    NotStarted,
    Running,
    Completed,
}

/// One VM on QEMU.
#[derive(Debug)]
pub struct QemuVm {
    spec: VmSpec,
    settings: MigrationSettings,
    connector: Arc<Connector>,
    launcher: Launcher,
    source: Option<Qmp>,
    destination: Option<Qmp>,
    launched: Option<Launched>,
    claimed: Vec<PathBuf>,
    migration: MigrationState,
    /// A save to a file was started (see [`VmBackend::save`]): a rollback cancels it.
    saving: bool,
    /// Adopted from a run that used no destination (see [`Leftovers::source_only`]).
    source_only: bool,
    committed: bool,
    /// A destination an interrupted run started here, taken over by a recovery.
    orphan: Option<u32>,
    /// The migration goes over QEMU's TLS with these credentials.
    tls: Option<TlsSettings>,
}

/// What [`QemuVm::save`] names as the writer of its files.
const QEMU_STATE_WRITER: &str = "qemu-migration";

/// The capabilities of a save to a file, when QEMU has `mapped-ram`.
const FILE_CAPABILITIES: [MigrationCapability; 2] =
    [MigrationCapability::MappedRam, MigrationCapability::Multifd];

/// The bandwidth limit of a save (bytes/s): none that a disk reaches.
const SAVE_BANDWIDTH: u64 = 1 << 40;

/// QEMU's `file:` URI of `path` (absolute; a comma would start QEMU's options).
fn file_uri(path: &Path) -> Result<String> {
    let text = path.to_str().filter(|t| !t.contains(','));
    match text {
        Some(t) if path.is_absolute() => Ok(format!("file:{t}")),
        _ => Err(Error::Config(format!(
            "{}: a VM's state file needs an absolute path in UTF-8 without commas",
            path.display()
        ))),
    }
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Copies the block node `node` as it is now into a new image of `format` and `size` bytes at
/// `file` (on QEMU's host): `blockdev-create` of the file (and the qcow2 on it), the nodes
/// added, a `blockdev-backup` job waited for, the nodes removed again whatever happened.
fn backup_disk(
    qmp: &Qmp,
    node: &str,
    file: &str,
    format: &str,
    size: u64,
    deadline: Instant,
) -> qmp::Result<()> {
    const FILE_NODE: &str = "ninja-ckpt-file";
    const IMAGE_NODE: &str = "ninja-ckpt-image";
    const CREATE: &str = "ninja-ckpt-create";
    const BACKUP: &str = "ninja-ckpt-backup";
    let copied = (|| {
        // A raw image is the file itself, of the disk's size (sparse); qcow2 grows its own.
        let file_size = if format == "raw" { size } else { 0 };
        let create = json!({ "driver": "file", "filename": file, "size": file_size });
        qmp.blockdev_create(CREATE, create)?;
        qmp.wait_job(CREATE, remaining(deadline))?;
        qmp.blockdev_add(json!({ "driver": "file", "node-name": FILE_NODE, "filename": file }))?;
        if format == "qcow2" {
            let create = json!({ "driver": "qcow2", "file": FILE_NODE, "size": size });
            qmp.blockdev_create(CREATE, create)?;
            qmp.wait_job(CREATE, remaining(deadline))?;
        }
        qmp.blockdev_add(json!({ "driver": format, "node-name": IMAGE_NODE, "file": FILE_NODE }))?;
        qmp.blockdev_backup(BACKUP, node, IMAGE_NODE)?;
        qmp.wait_job(BACKUP, remaining(deadline)).map(drop)
    })();
    if copied.is_err() {
        // A job left running holds the nodes: cancelled, and gone before they are removed.
        for job in [CREATE, BACKUP] {
            let _ = qmp.job_cancel(job);
            let _ = qmp.wait_job(job, Duration::from_secs(5));
        }
    }
    let _ = qmp.blockdev_del(IMAGE_NODE);
    let _ = qmp.blockdev_del(FILE_NODE);
    copied
}

/// Waits until no RAM block of the backend object `obj` is left in QEMU's RAM list.
///
/// `object-del` returns before QEMU has dropped the RAM block of a device's memory backend (the
/// memory region is finalized later, after an RCU grace period). A migration started in that
/// window still sends the block, and the destination, which never had the device, refuses the
/// whole stream: `Unknown ramblock "0000:00:03.0/hca0-mem", cannot accept migration`. Seen about
/// once in three plan runs here. `Err(None)` means the deadline passed with the block still there.
fn wait_ramblock_gone(
    qmp: &Qmp,
    obj: &str,
    deadline: Instant,
) -> std::result::Result<(), Option<qmp::Error>> {
    loop {
        if ramblock_offset(qmp, obj).map_err(Some)?.is_none() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(None);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The offset of the RAM block of backend object `obj` in QEMU's RAM address space (`info
/// ramblock`), if it has one.
fn ramblock_offset(qmp: &Qmp, obj: &str) -> std::result::Result<Option<u64>, qmp::Error> {
    let out = qmp.execute(
        "human-monitor-command",
        Some(json!({ "command-line": "info ramblock" })),
    )?;
    Ok(out.as_str().unwrap_or_default().lines().find_map(|line| {
        let mut words = line.split_whitespace();
        let block = words.next()?;
        if block != obj && !block.ends_with(&format!("/{obj}")) {
            return None;
        }
        // Block Name, PSize (two words: "4 KiB"), Offset.
        let offset = words.nth(2)?;
        u64::from_str_radix(offset.trim_start_matches("0x"), 16).ok()
    }))
}

/// The ids of the children of a QOM container (`/machine/peripheral`, `/objects`).
fn qom_children(qmp: &Qmp, path: &str) -> std::result::Result<BTreeSet<String>, qmp::Error> {
    let list = qmp.execute("qom-list", Some(json!({ "path": path })))?;
    Ok(list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let ty = p.get("type")?.as_str()?;
            ty.starts_with("child<")
                .then(|| p.get("name")?.as_str().map(str::to_owned))
                .flatten()
        })
        .collect())
}

fn device_spec(device: &Device) -> DeviceSpec {
    let (driver, props) = match device {
        Device::VfioPci {
            host, properties, ..
        } => {
            let mut p = properties.clone();
            p.insert("host".into(), Value::String(host.clone()));
            ("vfio-pci", p)
        }
        Device::HcaStandin { properties, .. } => {
            let mut p = properties.clone();
            p.insert(
                "memdev".into(),
                Value::String(device.backend_object_id().unwrap_or_default()),
            );
            ("ivshmem-plain", p)
        }
        Device::VirtioNet {
            mac, properties, ..
        } => {
            let mut p = properties.clone();
            p.insert("mac".into(), Value::String(mac.clone()));
            if let Some(n) = device.netdev_id() {
                p.insert("netdev".into(), Value::String(n));
            }
            ("virtio-net-pci", p)
        }
        // Never plugged (its link is switched), described for completeness.
        Device::StandbyNic { mac, .. } => {
            let mut p = serde_json::Map::new();
            p.insert("mac".into(), Value::String(mac.clone()));
            ("virtio-net-pci", p)
        }
    };
    let mut spec = DeviceSpec::new(driver, device.id());
    spec.properties = props;
    spec
}

impl QemuVm {
    /// A VM of `spec`, reaching remote endpoints through `connector`.
    pub fn new(
        spec: VmSpec,
        settings: MigrationSettings,
        connector: Arc<Connector>,
        launcher: Launcher,
    ) -> QemuVm {
        QemuVm {
            spec,
            settings,
            connector,
            launcher,
            source: None,
            destination: None,
            launched: None,
            claimed: Vec::new(),
            migration: MigrationState::NotStarted,
            saving: false,
            source_only: false,
            committed: false,
            orphan: None,
            tls: None,
        }
    }

    /// How to reach a monitor at `endpoint`: a `tls:` one with the client certificate in the
    /// plan's credentials directory (`client-cert.pem`, `client-key.pem`, `ca-cert.pem`).
    fn qmp_options(&self, endpoint: &Endpoint) -> Result<ConnectOptions> {
        let tls = match (endpoint, &self.tls) {
            (Endpoint::Tls(_), Some(t)) => {
                let creds = migrate_core::tls::Credentials::source_in(&t.creds_dir);
                let config = migrate_core::tls::client_config(&creds).map_err(|e| {
                    Error::Config(format!("{endpoint}: {}", symvirt_proto::error::chain(&e)))
                })?;
                Some(qmp::TlsClient {
                    config,
                    server_name: None,
                })
            }
            (Endpoint::Tls(_), None) => {
                return Err(Error::Config(format!(
                    "{endpoint}: a TLS monitor needs the plan's [settings.tls] credentials"
                )));
            }
            _ => None,
        };
        Ok(ConnectOptions {
            tls,
            ..ConnectOptions::default()
        })
    }

    /// Migrates over QEMU's TLS with `tls`'s credentials (see [`TlsSettings`]).
    pub fn with_tls(mut self, tls: Option<TlsSettings>) -> QemuVm {
        self.tls = tls;
        self
    }

    /// At a destination, when the plan names the sources it accepts: an `authz-list` that
    /// allows exactly their certificates' distinguished names and denies every other. Returns
    /// its id.
    fn add_tls_authz(&self, qmp: &Qmp) -> Result<Option<&'static str>> {
        let Some(allowed) = self.tls.as_ref().map(|t| &t.allowed_sources) else {
            return Ok(None);
        };
        if allowed.is_empty() {
            return Ok(None);
        }
        let rules: Vec<Value> = allowed
            .iter()
            .map(|dn| json!({"match": dn, "policy": "allow", "format": "exact"}))
            .collect();
        let _ = qmp.object_del(TLS_AUTHZ_ID);
        qmp.object_add(
            &ObjectSpec::new("authz-list", TLS_AUTHZ_ID)
                .property("policy", "deny")
                .property("rules", Value::Array(rules)),
        )
        .map_err(|e| Error::qmp(self.what("destination", "TLS authorization"), e))?;
        Ok(Some(TLS_AUTHZ_ID))
    }

    /// Creates (again) the TLS credentials object for `endpoint` (`client` at the source,
    /// `server` at the destination), both ends verifying the other's certificate.
    fn add_tls_creds(&self, qmp: &Qmp, side: &str, endpoint: &str) -> Result<()> {
        let Some(tls) = &self.tls else {
            return Ok(());
        };
        // Left by an earlier run: made anew, in case the credentials changed.
        let _ = qmp.object_del(TLS_CREDS_ID);
        qmp.object_add(
            &ObjectSpec::new("tls-creds-x509", TLS_CREDS_ID)
                .property("dir", tls.creds_dir.to_string_lossy().into_owned())
                .property("endpoint", endpoint)
                .property("verify-peer", true),
        )
        .map_err(|e| {
            Error::qmp(
                self.what(
                    side,
                    format!("TLS credentials in {}", tls.creds_dir.display()),
                ),
                e,
            )
        })
    }

    /// Copies every writable disk of the stopped source beside the state file `state` (see
    /// [`checkpoint::disk_path`]), each by a QEMU backup job: QEMU reads its own images,
    /// whichever host it is on, through any backing chain. Done before the memory, while the
    /// guest is stopped: QEMU cannot end a migration while a block job runs (it must
    /// deactivate the images), so the copy is part of the checkpoint's pause.
    fn copy_disks(&self, state: &Path, deadline: Instant) -> Result<Vec<DiskCopy>> {
        let src = self.source()?;
        let blocks = src
            .query_block()
            .map_err(|e| Error::qmp(self.what("source", "query-block"), e))?;
        let writable = blocks.into_iter().filter_map(|b| {
            let medium = b.inserted.filter(|m| !m.ro)?;
            let device = match b.device.as_str() {
                "" => b.qdev.unwrap_or_default(),
                name => name.to_owned(),
            };
            Some((device, medium))
        });
        let mut copies = Vec::new();
        for (n, (device, medium)) in writable.enumerate() {
            let format = medium.image.format.clone();
            let refused =
                |why: String| Error::Refused(format!("{}: disk {device}: {why}", self.spec.name));
            if format != "qcow2" && format != "raw" {
                return Err(refused(format!(
                    "a {format} image; a checkpoint copies qcow2 and raw disks"
                )));
            }
            let node = medium
                .node_name
                .ok_or_else(|| refused("QEMU names no node for it".into()))?;
            let target = checkpoint::disk_path(state, n, &format);
            let name = target
                .to_str()
                .filter(|t| target.is_absolute() && !t.is_empty());
            let name =
                name.ok_or_else(|| refused("the copy needs an absolute UTF-8 path".into()))?;
            backup_disk(
                src,
                &node,
                name,
                &format,
                medium.image.virtual_size,
                deadline,
            )
            .map_err(|e| {
                Error::qmp(
                    self.what("source", format!("copy disk {device} to {name}")),
                    e,
                )
            })?;
            copies.push(DiskCopy {
                device,
                image: medium.file,
                format,
                file: target
                    .file_name()
                    .map_or_else(String::new, |f| f.to_string_lossy().into_owned()),
            });
        }
        Ok(copies)
    }

    fn what(&self, side: &str, action: impl std::fmt::Display) -> String {
        // A monitor reached through an ssh forward that died: say so, not only "QEMU closed
        // the connection".
        let monitor = match side {
            "source" => &self.spec.source.qmp,
            _ => &self.spec.destination.qmp,
        };
        match self.connector.forward_failure(monitor) {
            Some(why) => format!("{} {side}: {action} ({why})", self.spec.name),
            None => format!("{} {side}: {action}", self.spec.name),
        }
    }

    fn source(&self) -> Result<&Qmp> {
        self.source.as_ref().ok_or(Error::NotConnected)
    }

    fn destination(&self) -> Result<&Qmp> {
        self.destination.as_ref().ok_or(Error::NotConnected)
    }

    /// Refuses a destination that is not running (after the switchover it must).
    fn check_destination_runs(&self) -> Result<()> {
        let status = self
            .destination()?
            .query_status()
            .map_err(|e| Error::qmp(self.what("destination", "run state"), e))?;
        if status.running {
            Ok(())
        } else {
            Err(Error::Qemu(format!(
                "{}: the destination is not running after the switchover ({})",
                self.spec.name, status.status
            )))
        }
    }

    /// The source is gone: its stand-in "HCAs" are free again.
    fn release_source_standins(&self) {
        if matches!(self.spec.source.qmp, Address::Local(Endpoint::Unix(_))) {
            for d in &self.spec.source.devices {
                if let Device::HcaStandin { mem_path, .. } = d {
                    let _ = std::fs::remove_file(mem_path);
                }
            }
        }
    }

    /// The monitor at `address` if a QEMU answers there now (one connection, a greeting
    /// within a second): what a recovery finds, without waiting for what is gone.
    fn connect_once(&self, address: &Address, deadline: Instant) -> Option<Qmp> {
        let endpoint = self.connector.qmp_endpoint(address, deadline).ok()?;
        let options = ConnectOptions {
            greeting_timeout: Duration::from_secs(1),
            ..self.qmp_options(&endpoint).ok()?
        };
        Qmp::connect(&endpoint, options).ok()
    }

    /// Whether a QEMU may still run at `address`: its monitor greets, or accepts without a
    /// greeting (busy with another client, or hung). Only a socket that refuses or is gone
    /// (locally, or at the end of an ssh forward) means no QEMU: fencing never takes a QEMU it
    /// could not reach for one that is gone.
    fn answers(&self, address: &Address, deadline: Instant) -> bool {
        let Ok(endpoint) = self.connector.qmp_endpoint(address, deadline) else {
            return false;
        };
        let Ok(options) = self.qmp_options(&endpoint) else {
            return false;
        };
        let options = ConnectOptions {
            greeting_timeout: Duration::from_secs(1),
            ..options
        };
        matches!(
            Qmp::connect(&endpoint, options),
            Ok(_) | Err(qmp::Error::Timeout { .. })
        )
    }

    /// Fencing: the destination is torn down and verified gone (its process reaped or killed,
    /// its monitor silent) before the source may run again.
    fn fence_destination(&mut self, deadline: Instant) -> std::result::Result<(), String> {
        // A destination this run never reached, for a migration that never started, holds no
        // copy of the VM; nor does any for a run that used none (its migration went to a file).
        let reached =
            self.destination.is_some() || self.launched.is_some() || self.orphan.is_some();
        if !reached && (self.migration == MigrationState::NotStarted || self.source_only) {
            return Ok(());
        }
        if let Some(dst) = self.destination.take() {
            let _ = dst.quit();
        }
        if let Some(mut l) = self.launched.take() {
            l.kill();
        }
        let address = self.spec.destination.qmp.clone();
        if let Some(pid) = self.orphan.take() {
            kill_orphan(pid, &qmp_monitor_arg(&address), deadline)?;
        }
        // One that was never ours, or is remote: its monitor must not answer any more.
        let until = Instant::now() + GONE_CHECK;
        while self.answers(&address, deadline) {
            if Instant::now() >= until {
                return Err(format!(
                    "the destination at {address} still answers after quit: the source is \
                     left paused (stop the destination, then run the recovery again)"
                ));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Connects to a monitor, retrying until `deadline` (a just-started QEMU has no socket
    /// yet); gives up early when the launched QEMU exits.
    fn connect_monitor(&mut self, address: &Address, deadline: Instant) -> Result<Qmp> {
        loop {
            // Resolved per attempt: an ssh forward that died meanwhile is started again.
            let endpoint = self.connector.qmp_endpoint(address, deadline)?;
            match Qmp::connect(&endpoint, self.qmp_options(&endpoint)?) {
                Ok(q) => return Ok(q),
                Err(e) => {
                    if let Some(why) = self.launched.as_mut().and_then(Launched::exited) {
                        return Err(Error::Qemu(format!(
                            "{}: destination QEMU {why}",
                            self.spec.name
                        )));
                    }
                    if Instant::now() >= deadline {
                        // Through ssh, what ssh said last tells a missing remote socket
                        // ("open failed") from a QEMU that does not answer.
                        let note = self
                            .connector
                            .forward_message(address)
                            .map(|m| format!(" ({m})"))
                            .unwrap_or_default();
                        return Err(Error::qmp(
                            format!("{}: connect to {address}{note}", self.spec.name),
                            e,
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Refuses a standby NIC `id` of the `side` VM that does not have the plan's `mac`
    /// (`qom-get` of its `mac` property).
    fn check_nic_mac(&self, qmp: &Qmp, side: &str, id: &str, mac: &str) -> Result<()> {
        let has = qmp
            .execute(
                "qom-get",
                Some(json!({ "path": format!("/machine/peripheral/{id}"), "property": "mac" })),
            )
            .map_err(|e| Error::qmp(self.what(side, format!("MAC of {id}")), e))?;
        let has = has.as_str().unwrap_or_default().to_ascii_lowercase();
        if has != mac {
            return Err(Error::Refused(format!(
                "{}: the {side}'s standby NIC {id:?} has mac {has}, the plan says {mac}",
                self.spec.name
            )));
        }
        Ok(())
    }

    /// Claims a destination device before the source lets go of its own.
    /// The destination's monitor: the QEMU launched as the plan says (or found), waiting for
    /// an incoming VM.
    fn waiting_destination(&mut self, deadline: Instant) -> Result<Qmp> {
        let address = self.spec.destination.qmp.clone();
        if let Some(launch) = self.spec.destination.launch.clone() {
            self.launched = Some(self.launcher.launch(&self.spec.name, &launch, &address)?);
        }
        let dst = self.connect_monitor(&address, deadline)?;
        let status = dst
            .query_status()
            .map_err(|e| Error::qmp(self.what("destination", "run state"), e))?;
        if status.status != RunState::InMigrate {
            return Err(Error::Refused(format!(
                "{}: destination is {}, not waiting for a migration",
                self.spec.name,
                status.status.as_str()
            )));
        }
        Ok(dst)
    }

    /// Claims every device the plan attaches at the destination (connected already).
    fn claim_destination_devices(&mut self) -> Result<()> {
        let present = qom_children(self.destination()?, "/machine/peripheral")
            .map_err(|e| Error::qmp(self.what("destination", "devices"), e))?;
        for d in self.spec.destination.devices.clone() {
            self.claim(&d, &present)?;
        }
        Ok(())
    }

    /// Sets the capabilities of a save to, or a restore from, a file.
    fn set_file_capabilities(
        &self,
        qmp: &Qmp,
        side: &str,
        on: &[MigrationCapability],
    ) -> Result<()> {
        let mut caps: Vec<(MigrationCapability, bool)> = FILE_CAPABILITIES
            .iter()
            .map(|c| (c.clone(), on.contains(c)))
            .collect();
        caps.push((MigrationCapability::PauseBeforeSwitchover, false));
        caps.push((MigrationCapability::Events, true));
        qmp.migrate_set_capabilities(&caps)
            .map_err(|e| Error::qmp(self.what(side, "migration capabilities"), e))
    }

    fn claim(&mut self, device: &Device, present: &BTreeSet<String>) -> Result<()> {
        if let Device::StandbyNic { id, mac } = device {
            // It arrives with the VM: the destination's command line must have it, with the
            // host's backend, at the source's PCI address (else the migration fails).
            if !present.contains(id) {
                return Err(Error::Refused(format!(
                    "{}: the destination has no standby NIC {id:?} (its command line must \
                     have -device virtio-net-pci,id={id},mac={mac},... as the source has)",
                    self.spec.name
                )));
            }
            return self.check_nic_mac(self.destination()?, "destination", id, mac);
        }
        if present.contains(device.id()) {
            return Err(Error::Refused(format!(
                "{}: the destination already has a device {:?}",
                self.spec.name,
                device.id()
            )));
        }
        match device {
            Device::HcaStandin { mem_path, size, .. } => {
                // The stand-in's "HCA" is its shared memory file: creating it exclusively is
                // the reservation, as claiming a free VF would be.
                let file = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(mem_path)
                    .map_err(|e| {
                        Error::Refused(format!(
                            "{}: stand-in HCA {} not available: {e}",
                            self.spec.name,
                            mem_path.display()
                        ))
                    })?;
                self.claimed.push(mem_path.clone());
                file.set_len(*size)
                    .map_err(|e| Error::io(format!("size {}", mem_path.display()), e))?;
            }
            Device::VfioPci { host, .. } if self.destination_is_local() => {
                let dev = Path::new("/sys/bus/pci/devices").join(host);
                let driver = std::fs::read_link(dev.join("driver"))
                    .ok()
                    .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()));
                if driver.as_deref() != Some("vfio-pci") {
                    return Err(Error::Refused(format!(
                        "{}: host device {host} is {} (needs vfio-pci)",
                        self.spec.name,
                        match driver {
                            Some(d) => format!("bound to {d}"),
                            None if dev.exists() => "not bound to a driver".into(),
                            None => "absent".into(),
                        }
                    )));
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn destination_is_local(&self) -> bool {
        match &self.spec.destination.launch {
            Some(l) => l.host.is_none(),
            None => matches!(self.spec.destination.qmp, Address::Local(Endpoint::Unix(_))),
        }
    }

    /// Plugs `device` (with its backend) through `qmp`; a standby NIC's link goes up.
    fn plug(qmp: &Qmp, device: &Device) -> std::result::Result<(), qmp::Error> {
        if device.is_standby() {
            return qmp.set_link(device.id(), true);
        }
        if let (Device::HcaStandin { mem_path, size, .. }, Some(obj)) =
            (device, device.backend_object_id())
        {
            qmp.object_add(
                &ObjectSpec::new("memory-backend-file", obj)
                    .property("size", *size)
                    .property("mem-path", mem_path.to_string_lossy().into_owned())
                    .property("share", true),
            )?;
        }
        if let Device::VirtioNet {
            netdev: Some(n), ..
        } = device
        {
            let mut spec = NetdevSpec::new(
                n.get("type").and_then(Value::as_str).unwrap_or_default(),
                n.get("id").and_then(Value::as_str).unwrap_or_default(),
            );
            spec.properties = n
                .iter()
                .filter(|(k, _)| *k != "type" && *k != "id")
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            qmp.netdev_add(&spec)?;
        }
        qmp.device_add(&device_spec(device))
    }

    fn wait_running(&self, qmp: &Qmp, deadline: Instant) -> Result<()> {
        loop {
            let status = qmp
                .query_status()
                .map_err(|e| Error::qmp(self.what("destination", "run state"), e))?;
            if status.running {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Qemu(format!(
                    "{}: destination not running after the switchover ({})",
                    self.spec.name,
                    status.status.as_str()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl VmBackend for QemuVm {
    fn name(&self) -> &str {
        &self.spec.name
    }

    fn connect(
        &mut self,
        continuing: Option<GuestSession>,
        deadline: Instant,
    ) -> Result<HostChannel> {
        if self.source.is_none() {
            let address = self.spec.source.qmp.clone();
            self.source = Some(self.connect_monitor(&address, deadline)?);
        }
        let path = self
            .connector
            .local_path(&self.spec.source.channel, deadline)?;
        let options = ChannelOptions::labelled(self.spec.name.clone());
        match continuing {
            None => HostChannel::connect(path, options),
            Some(session) => HostChannel::connect_continuing(path, options, session),
        }
    }

    fn reserve(&mut self, deadline: Instant) -> Result<()> {
        // The source has what the plan detaches, and is ready to pause before switchover.
        {
            let src = self.source()?;
            let present = qom_children(src, "/machine/peripheral")
                .map_err(|e| Error::qmp(self.what("source", "devices"), e))?;
            for d in &self.spec.source.devices {
                if !present.contains(d.id()) {
                    return Err(Error::Refused(format!(
                        "{}: the source has no device {:?} to detach",
                        self.spec.name,
                        d.id()
                    )));
                }
                if let Device::StandbyNic { id, mac } = d {
                    self.check_nic_mac(src, "source", id, mac)?;
                }
                // QEMU 10.0 (TCG) aborts the source with "Bad ram offset 0" when it migrates
                // after the RAM block at offset 0 was removed: a memory backend given on the
                // command line comes before the guest's RAM. Refused before anything is touched.
                // The file commit removes must be the one this stand-in's memory uses.
                if let (Device::HcaStandin { mem_path, .. }, Some(obj)) = (d, d.backend_object_id())
                {
                    let used = src
                        .execute(
                            "qom-get",
                            Some(json!({ "path": format!("/objects/{obj}"), "property": "mem-path" })),
                        )
                        .map_err(|e| Error::qmp(self.what("source", format!("memory file of {obj}")), e))?;
                    if used.as_str() != Some(&*mem_path.to_string_lossy()) {
                        return Err(Error::Refused(format!(
                            "{}: the plan says stand-in {:?} uses {}, but the source's {obj} uses \
                             {used}",
                            self.spec.name,
                            d.id(),
                            mem_path.display()
                        )));
                    }
                }
                if let Some(obj) = d.backend_object_id() {
                    let offset = ramblock_offset(src, &obj)
                        .map_err(|e| Error::qmp(self.what("source", "RAM blocks"), e))?;
                    if offset == Some(0) {
                        return Err(Error::Refused(format!(
                            "{}: the memory of {:?} is QEMU's first RAM block (given on the \
                             command line); QEMU crashes migrating once it is removed: \
                             hot-plug the device after boot instead",
                            self.spec.name,
                            d.id()
                        )));
                    }
                }
            }
            let mut caps = vec![
                (MigrationCapability::PauseBeforeSwitchover, true),
                (MigrationCapability::Events, true),
            ];
            caps.dedup();
            src.migrate_set_capabilities(&caps)
                .map_err(|e| Error::qmp(self.what("source", "migration capabilities"), e))?;
            let mut params = MigrationParameters {
                max_bandwidth: self.settings.max_bandwidth,
                downtime_limit: self.settings.downtime_limit_ms,
                ..MigrationParameters::default()
            };
            if self.tls.is_some() {
                self.add_tls_creds(src, "source", "client")?;
                params.extra.insert("tls-creds".into(), TLS_CREDS_ID.into());
            }
            if params != MigrationParameters::default() {
                src.migrate_set_parameters(&params)
                    .map_err(|e| Error::qmp(self.what("source", "migration parameters"), e))?;
            }
        }
        // The destination: started (or found) waiting for the migration, listening.
        let dst = self.waiting_destination(deadline)?;
        if self.tls.is_some() {
            if self.launched.is_some() {
                self.add_tls_creds(&dst, "destination", "server")?;
                let mut params = MigrationParameters::default();
                params.extra.insert("tls-creds".into(), TLS_CREDS_ID.into());
                if let Some(authz) = self.add_tls_authz(&dst)? {
                    params.extra.insert("tls-authz".into(), authz.into());
                }
                dst.migrate_set_parameters(&params)
                    .map_err(|e| Error::qmp(self.what("destination", "migration parameters"), e))?;
            } else {
                // Started by the site, listening already: with TLS, or not used.
                let params = dst
                    .query_migrate_parameters()
                    .map_err(|e| Error::qmp(self.what("destination", "migration parameters"), e))?;
                let creds = params.extra.get("tls-creds").and_then(Value::as_str);
                if creds.is_none_or(str::is_empty) {
                    return Err(Error::Refused(format!(
                        "{}: the plan asks for TLS but the destination listens without \
                         (start it with -incoming defer; the plan's launch does the rest)",
                        self.spec.name
                    )));
                }
                // QEMU reads tls-authz when the source connects: set now, it still applies.
                if let Some(authz) = self.add_tls_authz(&dst)? {
                    let mut params = MigrationParameters::default();
                    params.extra.insert("tls-authz".into(), authz.into());
                    dst.migrate_set_parameters(&params).map_err(|e| {
                        Error::qmp(self.what("destination", "migration parameters"), e)
                    })?;
                }
            }
        }
        if self.launched.is_some() {
            dst.migrate_incoming(&self.spec.destination.migrate_uri)
                .map_err(|e| {
                    Error::qmp(
                        self.what(
                            "destination",
                            format!(
                                "listen for the migration on {}",
                                self.spec.destination.migrate_uri
                            ),
                        ),
                        e,
                    )
                })?;
        }
        self.destination = Some(dst);
        self.claim_destination_devices()
    }

    fn detach(&mut self, deadline: Instant) -> Result<()> {
        let src = self.source()?;
        // A standby NIC stays, without a link: the destination inherits it down.
        for d in self.spec.source.devices.iter().filter(|d| d.is_standby()) {
            src.set_link(d.id(), false).map_err(|e| {
                Error::qmp(self.what("source", format!("link of {} down", d.id())), e)
            })?;
        }
        // All at once: the guest ejects them in one hot-plug round (each takes it 0.1 s or
        // more under TCG, and the job is paused).
        let ids: Vec<&str> = self
            .spec
            .source
            .devices
            .iter()
            .filter(|d| !d.is_standby())
            .map(|d| d.id())
            .collect();
        if !ids.is_empty() {
            src.device_del_all_and_wait(&ids, remaining(deadline))
                .map_err(|e| {
                    Error::qmp(self.what("source", format!("detach {}", ids.join(", "))), e)
                })?;
        }
        for d in &self.spec.source.devices {
            if let Some(obj) = d.backend_object_id() {
                src.object_del(&obj)
                    .map_err(|e| Error::qmp(self.what("source", format!("remove {obj}")), e))?;
                wait_ramblock_gone(src, &obj, deadline).map_err(|e| match e {
                    Some(e) => Error::qmp(self.what("source", "RAM blocks"), e),
                    None => Error::Qemu(self.what(
                        "source",
                        format!("memory of {obj} still registered after object-del"),
                    )),
                })?;
            }
            if let Some(n) = d.netdev_id() {
                src.netdev_del(&n).map_err(|e| {
                    Error::qmp(
                        self.what("source", format!("remove network backend {n}")),
                        e,
                    )
                })?;
            }
        }
        Ok(())
    }

    fn start_migration(&mut self) -> Result<()> {
        let uri = self.spec.destination.migrate_uri.clone();
        self.source()?.migrate(&uri).map_err(|e| {
            Error::qmp(
                self.what("source", format!("start the migration to {uri}")),
                e,
            )
        })?;
        self.migration = MigrationState::Running;
        Ok(())
    }

    fn wait_ready_to_switch(
        &mut self,
        deadline: Instant,
        progress: &mut dyn FnMut(MigrationProgress),
        stop: &dyn Fn() -> bool,
    ) -> Result<()> {
        // In slices, to look at `stop` between them.
        loop {
            if stop() {
                return Err(Error::Interrupted);
            }
            let slice = remaining(deadline).min(Duration::from_millis(250));
            let wait = MigrationWait::status_within(MigrationStatus::PreSwitchover, slice);
            let waited = wait_for_migration(self.source()?, &wait, |info| {
                if let Some(ram) = &info.ram {
                    progress(MigrationProgress {
                        transferred: ram.transferred,
                        remaining: ram.remaining,
                        total: ram.total,
                    });
                }
            });
            match waited {
                Ok(_) => return Ok(()),
                Err(qmp::Error::Timeout { .. }) if !remaining(deadline).is_zero() => {}
                Err(e) => return Err(Error::qmp(self.what("source", "migration"), e)),
            }
        }
    }

    fn switchover(&mut self, deadline: Instant) -> Result<MigrationResult> {
        let src = self.source()?;
        src.migrate_continue(MigrationStatus::PreSwitchover)
            .map_err(|e| Error::qmp(self.what("source", "switch over"), e))?;
        let info = wait_for_migration(
            src,
            &MigrationWait::completed_within(remaining(deadline)),
            |_| {},
        )
        .map_err(|e| Error::qmp(self.what("source", "switchover"), e))?;
        self.migration = MigrationState::Completed;
        self.wait_running(self.destination()?, deadline)?;
        Ok(MigrationResult {
            total_ms: info.total_time,
            downtime_ms: info.downtime,
            transferred: info.ram.map(|r| r.transferred).unwrap_or(0),
        })
    }

    fn attach(&mut self, _deadline: Instant) -> Result<()> {
        let dst = self.destination()?;
        for d in &self.spec.destination.devices {
            Self::plug(dst, d).map_err(|e| {
                Error::qmp(
                    self.what("destination", format!("attach {}", d.describe())),
                    e,
                )
            })?;
        }
        Ok(())
    }

    fn destination_channel(
        &mut self,
        session: GuestSession,
        deadline: Instant,
    ) -> Result<HostChannel> {
        // A destination that died after the switchover would leave the channel connecting in
        // vain until the resume deadline: ask its monitor first.
        self.check_destination_runs()?;
        let path = self
            .connector
            .local_path(&self.spec.destination.channel, deadline)?;
        HostChannel::connect_continuing(
            path,
            ChannelOptions::labelled(format!("{}@destination", self.spec.name)),
            session,
        )
    }

    fn commit(&mut self) -> Result<()> {
        self.committed = true;
        if let Some(l) = self.launched.as_mut() {
            l.release();
        }
        // A restored VM has no source.
        let result = match &self.source {
            None => Ok(()),
            Some(s) => s
                .quit()
                .map_err(|e| Error::qmp(self.what("source", "stop it"), e)),
        };
        self.release_source_standins();
        self.claimed.clear();
        result
    }

    fn rollback(&mut self, deadline: Instant) -> Result<()> {
        let mut errors: Vec<String> = Vec::new();
        // 0. A source monitor lost mid-plan (an ssh forward that died, a dropped TCP
        // connection) is reached again: the source can only be restored through it.
        if self.source.as_ref().is_some_and(|s| !s.is_connected()) {
            // Not the launched destination's exit that connect_monitor watches for.
            let launched = self.launched.take();
            let address = self.spec.source.qmp.clone();
            match self.connect_monitor(&address, deadline) {
                Ok(q) => self.source = Some(q),
                Err(e) => errors.push(format!("reconnect to the source monitor: {e}")),
            }
            self.launched = launched;
        }
        // 1. No migration (nor save) may still be going when the source continues.
        if self.migration == MigrationState::Running || std::mem::take(&mut self.saving) {
            if let Some(src) = &self.source {
                let _ = src.migrate_cancel();
                let wait = MigrationWait {
                    timeout: remaining(deadline),
                    poll_interval: Duration::from_millis(50),
                    until: vec![
                        MigrationStatus::Cancelled,
                        MigrationStatus::Failed,
                        MigrationStatus::Completed,
                        MigrationStatus::None,
                    ],
                };
                if let Err(e) = wait_for_migration(src, &wait, |_| {}) {
                    errors.push(format!("cancel: {e}"));
                }
            }
        }
        // The source's next migration is not forced onto this plan's TLS.
        if self.tls.is_some() {
            if let Some(src) = &self.source {
                let params = MigrationParameters {
                    extra: [("tls-creds".to_owned(), "".into())].into_iter().collect(),
                    ..MigrationParameters::default()
                };
                let _ = src.migrate_set_parameters(&params);
                let _ = src.object_del(TLS_CREDS_ID);
            }
        }
        // A save its dead controller never finished left the file capabilities on, which a
        // live migration over a socket refuses (best effort: an older QEMU has none of them).
        if self.source_only {
            if let Some(src) = &self.source {
                let _ = self.set_file_capabilities(src, "source", &[]);
            }
        }
        // 2. Tear the destination down before the source runs again: never two live copies.
        // A destination not verified gone keeps the source paused.
        let fenced = self.fence_destination(deadline);
        for p in self.claimed.drain(..) {
            let _ = std::fs::remove_file(p);
        }
        if let Err(e) = fenced {
            errors.push(e);
            return Err(Error::Qemu(format!(
                "{}: rollback incomplete: {}",
                self.spec.name,
                errors.join("; ")
            )));
        }
        // 3. The source runs again, with its original devices.
        match &self.source {
            // Never connected (the source's monitor is the first thing connect reaches): the
            // plan did nothing to this source, so there is nothing to undo.
            None if self.migration == MigrationState::NotStarted => {}
            None => errors.push("no source monitor".into()),
            Some(src) => {
                match src.query_status() {
                    Ok(s) if s.running => {}
                    Ok(_) => {
                        if let Err(e) = src.cont() {
                            errors.push(format!("cont: {e}"));
                        }
                    }
                    Err(e) => errors.push(format!("query-status: {e}")),
                }
                match qom_children(src, "/machine/peripheral") {
                    Err(e) => errors.push(format!("qom-list: {e}")),
                    Ok(present) => {
                        let objects = qom_children(src, "/objects").unwrap_or_default();
                        for d in &self.spec.source.devices {
                            if present.contains(d.id()) && !d.is_standby() {
                                continue;
                            }
                            // A backend whose device_del timed out may still be there.
                            if let Some(obj) = d.backend_object_id() {
                                if objects.contains(&obj) {
                                    let _ = src.object_del(&obj);
                                }
                            }
                            if let Some(n) = d.netdev_id() {
                                let _ = src.netdev_del(&n);
                            }
                            if let Err(e) = Self::plug(src, d) {
                                errors.push(format!("re-attach {}: {e}", d.describe()));
                            }
                        }
                    }
                }
            }
        }
        self.migration = MigrationState::NotStarted;
        if errors.is_empty() {
            Ok(())
        } else {
            Err(Error::Qemu(format!(
                "{}: rollback incomplete: {}",
                self.spec.name,
                errors.join("; ")
            )))
        }
    }

    fn save(&mut self, path: &Path, deadline: Instant) -> Result<SavedState> {
        let uri = file_uri(path)?;
        let src = self.source()?;
        // Stopped first: one pass over memory, at the cut (the job waits in any case).
        src.stop()
            .map_err(|e| Error::qmp(self.what("source", "stop"), e))?;
        let disks = self.copy_disks(path, deadline)?;
        let src = self.source()?;
        let supported: Vec<MigrationCapability> = src
            .query_migrate_capabilities()
            .map_err(|e| Error::qmp(self.what("source", "migration capabilities"), e))?
            .into_iter()
            .map(|c| c.capability)
            .collect();
        // mapped-ram (QEMU 9.0 on) puts each page at a fixed offset of the file, written by
        // multifd's threads in parallel; without it the stream is written as it would be sent.
        let on: Vec<MigrationCapability> = if supported.contains(&MigrationCapability::MappedRam) {
            FILE_CAPABILITIES.to_vec()
        } else {
            Vec::new()
        };
        let settings_before = src
            .query_migrate_parameters()
            .map_err(|e| Error::qmp(self.what("source", "migration parameters"), e))?;
        self.set_file_capabilities(src, "source", &on)?;
        // A plan's bandwidth limit is for the network; a save goes as fast as the disk.
        src.migrate_set_parameters(&MigrationParameters {
            max_bandwidth: Some(SAVE_BANDWIDTH),
            ..MigrationParameters::default()
        })
        .map_err(|e| Error::qmp(self.what("source", "migration parameters"), e))?;
        self.saving = true;
        let src = self.source()?;
        let saved = src
            .migrate(&uri)
            .and_then(|()| {
                wait_for_migration(
                    src,
                    &MigrationWait::completed_within(remaining(deadline)),
                    |_| {},
                )
            })
            .map_err(|e| {
                Error::qmp(
                    self.what("source", format!("save to {}", path.display())),
                    e,
                )
            });
        // Back to what a live migration needs (mapped-ram refuses a socket), with the
        // plan's bandwidth, whatever happened.
        let restored = self
            .set_file_capabilities(src, "source", &[])
            .and_then(|()| {
                src.migrate_set_parameters(&MigrationParameters {
                    max_bandwidth: settings_before.max_bandwidth,
                    ..MigrationParameters::default()
                })
                .map_err(|e| Error::qmp(self.what("source", "migration parameters"), e))
            });
        self.saving = saved.is_err();
        saved?;
        restored?;
        Ok(SavedState {
            format: StateFormat {
                writer: QEMU_STATE_WRITER.into(),
                capabilities: on.iter().map(|c| c.as_str().to_owned()).collect(),
            },
            disks,
        })
    }

    fn restore(&mut self, format: &StateFormat, path: &Path, deadline: Instant) -> Result<()> {
        if format.writer != QEMU_STATE_WRITER {
            return Err(Error::Checkpoint {
                path: path.to_owned(),
                problem: format!("saved by {:?}, which QEMU cannot read", format.writer),
            });
        }
        let uri = file_uri(path)?;
        let dst = self.waiting_destination(deadline)?;
        self.destination = Some(dst);
        self.claim_destination_devices()?;
        let dst = self.destination()?;
        let on: Vec<MigrationCapability> = format
            .capabilities
            .iter()
            .map(|c| MigrationCapability::from(c.as_str()))
            .collect();
        self.set_file_capabilities(dst, "destination", &on)?;
        dst.migrate_incoming(&uri)
            .and_then(|()| {
                wait_for_migration(
                    dst,
                    &MigrationWait::completed_within(remaining(deadline)),
                    |_| {},
                )
            })
            .map_err(|e| {
                Error::qmp(
                    self.what("destination", format!("restore from {}", path.display())),
                    e,
                )
            })?;
        // Saved stopped, so restored paused: it runs once loaded, as a migrated VM does.
        dst.cont()
            .map_err(|e| Error::qmp(self.what("destination", "cont"), e))?;
        self.wait_running(dst, deadline)
    }

    fn check_source(&mut self, deadline: Instant) -> Result<()> {
        // One connection per check, closed after it: QEMU serves one monitor client at a
        // time, and a watcher must not keep the operator's tools (or a checkpoint) out.
        let address = self.spec.source.qmp.clone();
        let endpoint = self.connector.qmp_endpoint(&address, deadline)?;
        let options = ConnectOptions {
            greeting_timeout: remaining(deadline).max(Duration::from_secs(1)),
            ..self.qmp_options(&endpoint)?
        };
        let qmp = match Qmp::connect(&endpoint, options) {
            Ok(q) => q,
            // Connected, but no greeting: another client holds the monitor. Busy, not lost.
            Err(qmp::Error::Timeout { .. }) => return Ok(()),
            Err(e) => {
                return Err(Error::qmp(
                    self.what("source", format!("connect to {address}")),
                    e,
                ));
            }
        };
        let status = qmp
            .query_status()
            .map_err(|e| Error::qmp(self.what("source", "run state"), e))?;
        match status.status {
            RunState::Shutdown
            | RunState::GuestPanicked
            | RunState::InternalError
            | RunState::IoError => Err(Error::Qemu(format!(
                "{}: the source is {}",
                self.spec.name,
                status.status.as_str()
            ))),
            _ => Ok(()),
        }
    }

    fn stop_source(&mut self, deadline: Instant) -> Result<()> {
        let address = self.spec.source.qmp.clone();
        if self.source.as_ref().is_none_or(|s| !s.is_connected()) {
            self.source = self.connect_once(&address, deadline);
        }
        if let Some(src) = self.source.take() {
            let _ = src.quit();
        }
        self.release_source_standins();
        let until = Instant::now() + GONE_CHECK;
        while self.answers(&address, deadline) {
            if Instant::now() >= until {
                return Err(Error::Qemu(format!(
                    "{}: the source at {address} still answers after quit",
                    self.spec.name
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    fn destination_pid(&self) -> Option<u32> {
        self.launched.as_ref().and_then(Launched::pid)
    }

    fn leftovers(&self) -> Leftovers {
        Leftovers {
            destination_pid: self
                .launched
                .as_ref()
                .filter(|l| l.remote.is_none())
                .and_then(Launched::pid),
            claimed: self.claimed.clone(),
            source_only: false,
        }
    }

    fn adopt(&mut self, left: &Leftovers, deadline: Instant) -> Result<()> {
        self.source = self.connect_once(&self.spec.source.qmp, deadline);
        self.source_only = left.source_only;
        self.destination = if left.source_only {
            None
        } else {
            self.connect_once(&self.spec.destination.qmp, deadline)
        };
        self.orphan = left.destination_pid;
        self.claimed = left.claimed.clone();
        self.migration = match &self.source {
            None => MigrationState::NotStarted,
            Some(src) => {
                let status = src
                    .query_migrate()
                    .map_err(|e| Error::qmp(self.what("source", "migration state"), e))?
                    .status();
                match status {
                    MigrationStatus::None
                    | MigrationStatus::Cancelled
                    | MigrationStatus::Failed => MigrationState::NotStarted,
                    MigrationStatus::Completed => MigrationState::Completed,
                    _ => MigrationState::Running,
                }
            }
        };
        Ok(())
    }

    fn roll_forward(&mut self, deadline: Instant) -> Result<()> {
        // The destination must run before the source goes: it is the only copy after.
        let dst = self.destination().map_err(|_| {
            Error::Qemu(format!(
                "{}: the destination does not answer; the source is left as it is",
                self.spec.name
            ))
        })?;
        self.check_destination_runs()?;
        let present = qom_children(dst, "/machine/peripheral")
            .map_err(|e| Error::qmp(self.what("destination", "devices"), e))?;
        for d in &self.spec.destination.devices {
            if d.is_standby() || !present.contains(d.id()) {
                Self::plug(dst, d).map_err(|e| {
                    Error::qmp(
                        self.what("destination", format!("attach {}", d.describe())),
                        e,
                    )
                })?;
            }
        }
        // The source goes, verified: a copy that answers still could be continued by hand.
        if let Some(src) = self.source.take() {
            let _ = src.quit();
        }
        let source = self.spec.source.qmp.clone();
        let until = Instant::now() + GONE_CHECK;
        while self.answers(&source, deadline) {
            if Instant::now() >= until {
                return Err(Error::Qemu(format!(
                    "{}: the source at {source} still answers after quit",
                    self.spec.name
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        self.committed = true;
        self.claimed.clear();
        self.release_source_standins();
        Ok(())
    }
}

impl Drop for QemuVm {
    fn drop(&mut self) {
        if !self.committed {
            for p in self.claimed.drain(..) {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ninja-launch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn only_a_dead_socket_is_cleared_for_a_destination_monitor() {
        let dir = scratch("sock");
        // Nothing there.
        clear_dead_socket("vm0", &dir.join("none.sock")).unwrap();
        // A live monitor (a bystander VM's): refused, left alone.
        let live = dir.join("live.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&live).unwrap();
        let e = clear_dead_socket("vm0", &live).unwrap_err().to_string();
        assert!(e.contains("something is listening"), "{e}");
        assert!(live.exists());
        // A dead one (its QEMU was killed): removed.
        let dead = dir.join("dead.sock");
        drop(std::os::unix::net::UnixListener::bind(&dead).unwrap());
        clear_dead_socket("vm0", &dead).unwrap();
        assert!(!dead.exists());
        // A file that is not a socket: refused, intact.
        let file = dir.join("notes.txt");
        std::fs::write(&file, "keep").unwrap();
        let e = clear_dead_socket("vm0", &file).unwrap_err().to_string();
        assert!(e.contains("not a socket"), "{e}");
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_symlink_at_the_log_path_is_not_followed() {
        let dir = scratch("log");
        let target = dir.join("precious");
        std::fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, dir.join("vm0-destination.log")).unwrap();
        let launcher = Launcher {
            ssh_program: "ssh".into(),
            log_dir: dir.clone(),
        };
        let spec = LaunchSpec {
            host: None,
            program: "true".into(),
            args: Vec::new(),
        };
        let r = launcher.launch(
            "vm0",
            &spec,
            &Address::Local(Endpoint::Unix(dir.join("q.sock"))),
        );
        assert!(r.is_err(), "launched through a symlinked log");
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn launcher_adds_monitor_and_deferred_incoming() {
        let l = Launcher {
            ssh_program: "ssh".into(),
            log_dir: "/tmp".into(),
        };
        let spec = LaunchSpec {
            host: None,
            program: "qemu-system-x86_64".into(),
            args: vec!["-m".into(), "256".into()],
        };
        let cmd = l
            .command(
                &spec,
                &Address::Local(Endpoint::Unix("/run/d/qmp.sock".into())),
            )
            .unwrap();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "-m",
                "256",
                "-qmp",
                "unix:/run/d/qmp.sock,server=on,wait=off",
                "-incoming",
                "defer"
            ]
        );
        let remote = LaunchSpec {
            host: Some("node7".into()),
            args: vec!["-append".into(), "console=ttyS0 quiet".into()],
            ..spec
        };
        let cmd = l
            .command(
                &remote,
                &Address::Ssh {
                    host: "node7".into(),
                    path: "/run/d/qmp.sock".into(),
                },
            )
            .unwrap();
        assert_eq!(cmd.get_program(), "ssh");
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(args[3], "node7");
        assert_eq!(
            args[4],
            "echo ninja-launch-pid=$$; exec qemu-system-x86_64 -append 'console=ttyS0 quiet' -qmp \
             unix:/run/d/qmp.sock,server=on,wait=off -incoming defer"
        );
    }

    #[test]
    fn device_specs_carry_their_backends() {
        let standin = Device::HcaStandin {
            id: "hca0".into(),
            mem_path: "/dev/shm/x".into(),
            size: 1 << 20,
            properties: Default::default(),
        };
        let s = device_spec(&standin);
        assert_eq!(s.driver, "ivshmem-plain");
        assert_eq!(s.properties["memdev"], "hca0-mem");
        let vfio = Device::VfioPci {
            id: "hca1".into(),
            host: "0000:3b:00.1".into(),
            properties: Default::default(),
        };
        let s = device_spec(&vfio);
        assert_eq!(
            (s.driver.as_str(), &s.properties["host"]),
            ("vfio-pci", &json!("0000:3b:00.1"))
        );
    }
}
