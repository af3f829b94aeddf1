//! The run journal: what a plan run has done so far, on disk before each irreversible step, so
//! that a controller that dies leaves enough behind for `plan recover` to bring every VM to
//! exactly one running copy.
//!
//! A run writes `runs/RUN.json` in a private state directory (mode 0700, owned by the user;
//! see [`StateDir::open`]) and holds an exclusive `flock` on `runs/RUN.lock` while it lives, so
//! a journal whose lock is free belongs to a dead controller. The record names the phase the
//! run entered last and whether it decided to go forward (the destinations are the VMs from
//! then on): before that decision a recovery rolls back to the sources, after it rolls forward.
//! Every update is written to a temporary file, `fsync`ed and renamed over the old one, and the
//! directory is `fsync`ed: a crash leaves the old record or the new one, never a torn one.
//! The record is JSON, for the operator to read; it carries the plan's own text, so recovery
//! needs nothing else.

use crate::backend::Leftovers;
use crate::cluster::Plan;
use crate::controller::Phase;
use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

/// What the `format` field of every journal says.
const FORMAT: &str = "ninja-journal";
/// The record layout's version.
const VERSION: u32 = 1;

/// A run's record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Always `ninja-journal`.
    pub format: String,
    /// The layout version (1).
    pub version: u32,
    /// The run's id (also its file name).
    pub run: String,
    /// The controller's process id.
    pub pid: u32,
    /// When the run started, ms since the Unix epoch.
    pub started_unix_ms: u64,
    /// The SymVirt epoch told to the guests.
    pub epoch: u64,
    /// The plan's text, as run.
    pub plan: String,
    /// The VMs, in plan order.
    pub vms: Vec<String>,
    /// Every monitor and channel address the plan names (what two runs must not share).
    pub endpoints: Vec<String>,
    /// The phase the run entered last (`None`: none yet).
    pub phase: Option<Phase>,
    /// Per VM, what the run made (the destination it started here, the files it claimed).
    pub leftovers: Vec<Leftovers>,
    /// The run decided to keep the destinations: from here on, recovery goes forward.
    pub forward: bool,
    /// VMs that took part in the cut but did not move (an evacuation's other VMs).
    #[serde(default)]
    pub staying: Vec<String>,
    /// The run is a checkpoint into this directory, not a migration: it never touches a
    /// destination. A recovery continues every source with its devices; after the decision
    /// (the checkpoint is complete and the job was to stop) it stops them.
    #[serde(default)]
    pub checkpoint: Option<String>,
    /// How the run ended (`None`: it did not, as far as the journal knows).
    pub finished: Option<String>,
}

impl Record {
    /// Whether this run touches a VM or endpoint of `plan`.
    pub fn overlaps(&self, plan: &Plan) -> bool {
        let theirs = endpoints(plan);
        plan.vms.iter().any(|v| self.vms.contains(&v.name))
            || theirs.iter().any(|e| self.endpoints.contains(e))
    }
}

fn endpoints(plan: &Plan) -> Vec<String> {
    plan.vms
        .iter()
        .flat_map(|v| {
            [
                v.source.qmp.to_string(),
                v.source.channel.to_string(),
                v.destination.qmp.to_string(),
                v.destination.channel.to_string(),
            ]
        })
        .collect()
}

/// The private directory where runs keep their journals and logs.
#[derive(Debug, Clone)]
pub struct StateDir {
    path: PathBuf,
}

/// A journal found on disk.
#[derive(Debug, Clone)]
pub struct Found {
    /// Its file.
    pub path: PathBuf,
    /// What it says.
    pub record: Record,
    /// Whether its controller still runs (it holds the run's lock).
    pub live: bool,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Creates `dir` with mode 0700 if missing, and refuses one that is not a real directory
/// owned by this user and closed to everyone else.
fn private_dir(dir: &Path) -> Result<()> {
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(Error::io(format!("create {}", dir.display()), e)),
    }
    let meta = std::fs::symlink_metadata(dir)
        .map_err(|e| Error::io(format!("inspect {}", dir.display()), e))?;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    if !meta.is_dir() {
        return Err(Error::Refused(format!(
            "state directory {} is not a directory (a symlink?)",
            dir.display()
        )));
    }
    if meta.uid() != me {
        return Err(Error::Refused(format!(
            "state directory {} belongs to uid {}, not to this user ({me})",
            dir.display(),
            meta.uid()
        )));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(Error::Refused(format!(
            "state directory {} is open to others (mode {:o}); want 0700",
            dir.display(),
            meta.permissions().mode() & 0o777
        )));
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically and durably: a private temporary file, `fsync`,
/// rename, `fsync` of the directory. Never follows a symlink.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .map_err(|e| Error::io(format!("create {}", tmp.display()), e))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::io(format!("write {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(format!("rename {}", tmp.display()), e))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("sync {}", dir.display()), e))
}

impl StateDir {
    /// Where state lives unless told: `NINJA_STATE_DIR`, else `$XDG_STATE_HOME/ninja-migrate`,
    /// else `~/.local/state/ninja-migrate`.
    pub fn default_path() -> PathBuf {
        if let Some(d) = std::env::var_os("NINJA_STATE_DIR") {
            return d.into();
        }
        if let Some(d) = std::env::var_os("XDG_STATE_HOME").filter(|d| !d.is_empty()) {
            return PathBuf::from(d).join("ninja-migrate");
        }
        let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
        PathBuf::from(home).join(".local/state/ninja-migrate")
    }

    /// Opens (creating, mode 0700) the state directory at `path`, with `runs/` and `logs/`.
    pub fn open(path: impl Into<PathBuf>) -> Result<StateDir> {
        let path = path.into();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::io(format!("create {}", parent.display()), e))?;
        }
        private_dir(&path)?;
        private_dir(&path.join("runs"))?;
        private_dir(&path.join("logs"))?;
        Ok(StateDir { path })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the run `run` keeps the logs of the QEMUs it starts (created, private).
    pub fn log_dir(&self, run: &str) -> Result<PathBuf> {
        let dir = self.path.join("logs").join(run);
        private_dir(&dir)?;
        Ok(dir)
    }

    /// Every journal of a run that did not finish.
    pub fn unfinished(&self) -> Result<Vec<Found>> {
        let runs = self.path.join("runs");
        let entries = std::fs::read_dir(&runs)
            .map_err(|e| Error::io(format!("list {}", runs.display()), e))?;
        let mut found = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let record = read_record(&path)?;
            if record.finished.is_some() {
                continue;
            }
            let live = lock_held(&path.with_extension("lock"));
            found.push(Found { path, record, live });
        }
        found.sort_by_key(|f| f.record.started_unix_ms);
        Ok(found)
    }

    /// Starts the journal of a run of `plan` (whose text is `plan_text`); refuses while an
    /// unfinished run touches the same VMs or endpoints, naming what to do.
    pub fn begin(&self, plan_text: &str, plan: &Plan, epoch: u64) -> Result<Journal> {
        for f in self.unfinished()? {
            if f.record.overlaps(plan) {
                return Err(Error::Refused(if f.live {
                    format!(
                        "run {} (pid {}) is moving the same VMs now",
                        f.record.run, f.record.pid
                    )
                } else {
                    format!(
                        "run {} of the same VMs was interrupted in {}; run `ninja-migrate plan \
                         recover --state-dir {}` first",
                        f.record.run,
                        f.record.phase.map_or("its start", Phase::as_str),
                        self.path.display()
                    )
                }));
            }
        }
        let run = format!("{}-{}", unix_ms(), std::process::id());
        let path = self.path.join("runs").join(format!("{run}.json"));
        let lock = take_lock(&path.with_extension("lock"))?.ok_or_else(|| {
            Error::Refused(format!("run {run}: its lock is held by another process"))
        })?;
        let record = Record {
            format: FORMAT.into(),
            version: VERSION,
            run,
            pid: std::process::id(),
            started_unix_ms: unix_ms(),
            epoch,
            plan: plan_text.into(),
            vms: plan.vms.iter().map(|v| v.name.clone()).collect(),
            endpoints: endpoints(plan),
            phase: None,
            leftovers: vec![Leftovers::default(); plan.vms.len()],
            forward: false,
            staying: Vec::new(),
            checkpoint: None,
            finished: None,
        };
        let journal = Journal {
            path,
            _lock: lock,
            record: Mutex::new(record),
        };
        journal.save()?;
        Ok(journal)
    }

    /// Takes charge of the unfinished journal at `path` (its controller must be dead).
    pub fn adopt(&self, path: &Path) -> Result<Journal> {
        let lock = take_lock(&path.with_extension("lock"))?.ok_or_else(|| {
            Error::Refused(format!(
                "{}: its run is still going (the controller holds its lock)",
                path.display()
            ))
        })?;
        let record = read_record(path)?;
        Ok(Journal {
            path: path.to_owned(),
            _lock: lock,
            record: Mutex::new(record),
        })
    }
}

fn read_record(path: &Path) -> Result<Record> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    let record: Record = serde_json::from_str(&text)
        .map_err(|e| Error::Config(format!("{}: not a journal: {e}", path.display())))?;
    if record.format != FORMAT || record.version != VERSION {
        return Err(Error::Config(format!(
            "{}: journal format {} version {}, this program reads {FORMAT} version {VERSION}",
            path.display(),
            record.format,
            record.version
        )));
    }
    Ok(record)
}

/// Opens and locks `path` (exclusive, non-blocking); `None` when another process holds it.
fn take_lock(path: &Path) -> Result<Option<nix::fcntl::Flock<File>>> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(Error::io(format!("lock {}", path.display()), e.into())),
    }
}

fn lock_held(path: &Path) -> bool {
    path.exists() && matches!(take_lock(path), Ok(None))
}

/// A run's journal, held (locked) by this process.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    _lock: nix::fcntl::Flock<File>,
    record: Mutex<Record>,
}

impl Journal {
    /// The record as it stands.
    pub fn record(&self) -> Record {
        self.record
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Its file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where the run's ssh forwards keep their sockets (`runs/RUN.fwd`): a recovery ends what
    /// is left there ([`crate::remote::clear_forwards`]).
    pub fn forward_dir(&self) -> PathBuf {
        self.path.with_extension("fwd")
    }

    fn save(&self) -> Result<()> {
        let record = self.record();
        let text = serde_json::to_vec_pretty(&record)
            .map_err(|e| Error::Config(format!("journal: {e}")))?;
        write_durably(&self.path, &text)
    }

    /// Changes the record and writes it out before returning.
    pub fn update(&self, change: impl FnOnce(&mut Record)) -> Result<()> {
        change(&mut self.record.lock().unwrap_or_else(|p| p.into_inner()));
        self.save()
    }

    /// The run is over (`outcome`): nothing is left to recover.
    pub fn finish(&self, outcome: &str) -> Result<()> {
        self.update(|r| r.finished = Some(outcome.into()))?;
        let _ = std::fs::remove_file(self.path.with_extension("lock"));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(vm: &str, src: &str) -> (String, Plan) {
        let text = format!(
            r#"[[vm]]
name = "{vm}"
[vm.source]
qmp = "unix:/run/{src}/qmp.sock"
channel = "unix:/run/{src}/sv.sock"
interconnect = {{ kind = "ethernet", mac = "52:54:00:00:00:01" }}
[vm.destination]
qmp = "unix:/run/{vm}-dst/qmp.sock"
channel = "unix:/run/{vm}-dst/sv.sock"
migrate_uri = "tcp:127.0.0.1:4444"
interconnect = {{ kind = "ethernet", mac = "52:54:00:00:00:02" }}
[[vm.destination.devices]]
kind = "virtio-net"
id = "net0"
mac = "52:54:00:00:00:02"
"#
        );
        let p = crate::plan::parse(&text).unwrap();
        (text, p)
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ninja-journal-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn a_run_is_journaled_and_an_unfinished_one_blocks_the_same_vms() {
        let dir = scratch("block");
        let state = StateDir::open(dir.join("state")).unwrap();
        let mode = std::fs::metadata(state.path())
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let (text, p) = plan("vm0", "a");
        let j = state.begin(&text, &p, 7).unwrap();
        j.update(|r| r.phase = Some(Phase::Migrate)).unwrap();
        let on_disk = read_record(j.path()).unwrap();
        assert_eq!(on_disk.phase, Some(Phase::Migrate));
        assert_eq!(on_disk.plan, text);
        assert_eq!(on_disk.epoch, 7);

        // While its controller lives, the run is live; a second run of vm0 is refused.
        let found = state.unfinished().unwrap();
        assert_eq!(found.len(), 1);
        assert!(found[0].live);
        let e = state.begin(&text, &p, 8).unwrap_err().to_string();
        assert!(e.contains("moving the same VMs now"), "{e}");
        // A VM of another name at the same source endpoint is the same VM.
        let (text2, p2) = plan("other", "a");
        assert!(state.begin(&text2, &p2, 8).is_err());
        // Another VM entirely may move.
        let (text3, p3) = plan("vm9", "z");
        state
            .begin(&text3, &p3, 8)
            .unwrap()
            .finish("completed")
            .unwrap();

        // The controller dies (its lock goes): the next run names `plan recover`.
        let path = j.path().to_owned();
        drop(j);
        let e = state.begin(&text, &p, 9).unwrap_err().to_string();
        assert!(
            e.contains("interrupted in migrate") && e.contains("plan recover"),
            "{e}"
        );
        let adopted = state.adopt(&path).unwrap();
        assert!(state.adopt(&path).is_err(), "one recovery at a time");
        adopted.finish("rolled_back").unwrap();
        drop(adopted);
        assert!(state.unfinished().unwrap().is_empty());
        state.begin(&text, &p, 10).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_state_directory_open_to_others_or_a_symlink_is_refused() {
        let dir = scratch("perm");
        std::fs::create_dir_all(dir.join("open")).unwrap();
        std::fs::set_permissions(dir.join("open"), std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = StateDir::open(dir.join("open")).unwrap_err().to_string();
        assert!(e.contains("open to others (mode 755)"), "{e}");
        std::os::unix::fs::symlink("/tmp", dir.join("link")).unwrap();
        let e = StateDir::open(dir.join("link")).unwrap_err().to_string();
        assert!(e.contains("not a directory"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_foreign_or_torn_file_is_not_taken_for_a_journal() {
        let dir = scratch("foreign");
        let state = StateDir::open(&dir).unwrap();
        let path = dir.join("runs/x.json");
        std::fs::write(&path, "{\"format\":\"ninja-journal\",\"version\":1").unwrap();
        assert!(
            state
                .unfinished()
                .unwrap_err()
                .to_string()
                .contains("not a journal")
        );
        let (text, p) = plan("vm0", "a");
        let j = state.begin(&text, &p, 1);
        assert!(
            j.is_err(),
            "an unreadable journal stops a run rather than be ignored"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
