//! Checkpoints of a whole virtual cluster: every VM saved at one cut, and a manifest.
//!
//! A checkpoint is a directory:
//!
//! ```text
//! DIR/MANIFEST     "ninja-checkpoint 1 crc32=8HEX\n", then the manifest as JSON
//! DIR/vm0.state    each VM's saved state (for QEMU: its migration stream, written by QEMU)
//! DIR/vm0.disk0.qcow2   each writable disk of the VM as it was at the cut (QEMU: a backup
//!                   job's copy, same format as the disk)
//! ```
//!
//! The first line names the format and its version and carries the CRC-32 of the JSON after
//! it; the manifest gives every VM file's size and CRC-32, the cut's epoch, each VM's
//! interconnect at the cut, and the plan's text. A checkpoint is written into a hidden
//! `.DIR.partial` beside `DIR`; every file is `fsync`ed, the directory is renamed to `DIR`
//! and the parent `fsync`ed: a directory named `DIR` with a `MANIFEST` is complete, and what a
//! crash or a full disk leaves is a `.partial` directory that nothing reads as a checkpoint.
//!
//! [`read`] checks the manifest line and checksum, and every VM file's presence, size and
//! checksum, and names the file and what is wrong when one does not hold. A restore writes
//! each disk copy back over the image the VM had ([`write_back`]) before the VM starts, so the
//! disk matches the memory it is restored with.

use crate::error::{Error, Result};
use crate::protocol::Interconnect;
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The first word of a manifest.
const MAGIC: &str = "ninja-checkpoint";
/// The manifest layout's version.
pub const FORMAT_VERSION: u32 = 1;
/// The manifest's file name in a checkpoint directory.
pub const MANIFEST: &str = "MANIFEST";

/// How one VM's state was saved: what the VMM must be told to read it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFormat {
    /// Who wrote it: `qemu-migration` (QEMU's migration stream to a file).
    pub writer: String,
    /// Migration capabilities the reader must turn on (`mapped-ram`, `multifd`).
    pub capabilities: Vec<String>,
}

/// A writable disk of a VM, copied at the cut.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskCopy {
    /// The block device: the drive's id, or the device's for a `-blockdev` node.
    pub device: String,
    /// The image the VM had open (a path on its host): a restore writes the copy back there.
    pub image: String,
    /// The image's format, which the copy has too (`qcow2`, `raw`).
    pub format: String,
    /// The copy, relative to the checkpoint directory.
    pub file: String,
}

/// A disk copy in a checkpoint, with its size and checksum.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedDisk {
    /// What was copied, and where from.
    #[serde(flatten)]
    pub copy: DiskCopy,
    /// The copy's size in bytes.
    pub bytes: u64,
    /// The copy's CRC-32 (IEEE).
    pub crc32: u32,
}

/// What a backend's save wrote beside the VM's state file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedState {
    /// How the state file was written.
    pub format: StateFormat,
    /// The VM's writable disks at the cut (none for a VM without one).
    pub disks: Vec<DiskCopy>,
}

/// Where a backend writes the copy of the `n`th writable disk of the VM whose state goes to
/// `state` (`vm0.state` -> `vm0.disk0.qcow2`).
pub fn disk_path(state: &Path, n: usize, format: &str) -> PathBuf {
    let stem = state
        .file_stem()
        .map_or_else(String::new, |s| s.to_string_lossy().into_owned());
    state.with_file_name(format!("{stem}.disk{n}.{format}"))
}

/// One VM in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedVm {
    /// The VM's name (as in the plan).
    pub name: String,
    /// Its state file, relative to the checkpoint directory.
    pub file: String,
    /// The file's size in bytes.
    pub bytes: u64,
    /// The file's CRC-32 (IEEE).
    pub crc32: u32,
    /// How the state was saved.
    pub format: StateFormat,
    /// The interconnect its guest used at the cut.
    pub interconnect: Interconnect,
    /// Its writable disks at the cut.
    #[serde(default)]
    pub disks: Vec<SavedDisk>,
}

/// What a checkpoint holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// The SymVirt epoch of the cut: every guest was quiesced in it, and is resumed in it.
    pub epoch: u64,
    /// When the checkpoint was completed, ms since the Unix epoch.
    pub created_unix_ms: u64,
    /// The plan's text: where the VMs were (sources) and where they go by default on a
    /// restore (destinations).
    pub plan: String,
    /// Every VM, in plan order.
    pub vms: Vec<SavedVm>,
}

fn damaged(path: &Path, problem: impl Into<String>) -> Error {
    Error::Checkpoint {
        path: path.to_owned(),
        problem: problem.into(),
    }
}

/// The size and CRC-32 of the file at `path`.
pub fn file_checksum(path: &Path) -> Result<(u64, u32)> {
    let mut file = File::open(path).map_err(|e| damaged(path, format!("cannot open: {e}")))?;
    let mut hasher = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| damaged(path, format!("cannot read: {e}")))?;
        if n == 0 {
            return Ok((bytes, hasher.finalize()));
        }
        hasher.update(&buf[..n]);
        bytes += n as u64;
    }
}

/// The bytes of a manifest file.
fn encode(manifest: &Manifest) -> Result<Vec<u8>> {
    let json = serde_json::to_vec_pretty(manifest)
        .map_err(|e| Error::Internal(format!("manifest: {e}")))?;
    let mut out = format!(
        "{MAGIC} {FORMAT_VERSION} crc32={:08x}\n",
        crc32fast::hash(&json)
    )
    .into_bytes();
    out.extend_from_slice(&json);
    Ok(out)
}

/// Reads a manifest file's bytes (`path` names it in errors).
fn decode(path: &Path, bytes: &[u8]) -> Result<Manifest> {
    let newline = bytes
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| damaged(path, "no header line"))?;
    let header = std::str::from_utf8(&bytes[..newline])
        .map_err(|_| damaged(path, "the header line is not text"))?;
    let words: Vec<&str> = header.split(' ').collect();
    let [magic, version, crc] = words[..] else {
        return Err(damaged(
            path,
            format!("not a checkpoint manifest: {header:?}"),
        ));
    };
    if magic != MAGIC {
        return Err(damaged(
            path,
            format!("not a checkpoint manifest: {header:?}"),
        ));
    }
    if version != FORMAT_VERSION.to_string() {
        return Err(damaged(
            path,
            format!("format version {version}, this program reads version {FORMAT_VERSION}"),
        ));
    }
    let crc = crc
        .strip_prefix("crc32=")
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(|| damaged(path, format!("bad checksum field {crc:?}")))?;
    let json = &bytes[newline + 1..];
    let actual = crc32fast::hash(json);
    if actual != crc {
        return Err(damaged(
            path,
            format!("checksum mismatch: the header says {crc:08x}, the contents are {actual:08x}"),
        ));
    }
    let manifest: Manifest =
        serde_json::from_slice(json).map_err(|e| damaged(path, format!("unreadable: {e}")))?;
    for vm in &manifest.vms {
        let files = std::iter::once(&vm.file).chain(vm.disks.iter().map(|d| &d.copy.file));
        for file in files {
            if !valid_file_name(file) {
                return Err(damaged(
                    path,
                    format!(
                        "VM {:?} names the file {file:?}, not one in the checkpoint",
                        vm.name
                    ),
                ));
            }
        }
    }
    Ok(manifest)
}

/// A plain file name (no directories, nothing hidden): what a manifest may name.
fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && !name.contains('/')
        && !name.contains('\0')
        && name.len() <= 255
}

/// Reads the checkpoint in `dir` and checks every file it names: present, of its size, with
/// its checksum. Any damage is an [`Error::Checkpoint`] naming the file.
pub fn read(dir: &Path) -> Result<Manifest> {
    let manifest = read_manifest(dir)?;
    for vm in &manifest.vms {
        check_file(dir, &vm.name, &vm.file, vm.bytes, vm.crc32)?;
        for disk in &vm.disks {
            check_file(dir, &vm.name, &disk.copy.file, disk.bytes, disk.crc32)?;
        }
    }
    Ok(manifest)
}

/// Checks that VM `vm`'s `file` in `dir` has `bytes` bytes and the CRC-32 `crc32`.
fn check_file(dir: &Path, vm: &str, file: &str, bytes: u64, crc32: u32) -> Result<()> {
    let path = dir.join(file);
    let meta = std::fs::metadata(&path)
        .map_err(|e| damaged(&path, format!("VM {vm:?}: missing ({e})")))?;
    if meta.len() != bytes {
        return Err(damaged(
            &path,
            format!(
                "VM {vm:?}: {} bytes, the manifest says {bytes} (truncated or replaced)",
                meta.len()
            ),
        ));
    }
    let (_, crc) = file_checksum(&path)?;
    if crc != crc32 {
        return Err(damaged(
            &path,
            format!(
                "VM {vm:?}: checksum {crc:08x}, the manifest says {crc32:08x} (the file changed)"
            ),
        ));
    }
    Ok(())
}

/// Writes the copy of `disk` in the checkpoint `dir` back over the image the VM had, in place
/// (a VMM already waiting with the image open sees the new contents when it activates it),
/// and `fsync`s it. Nothing else may be writing that image: its VM is gone or stopped.
pub fn write_back(dir: &Path, disk: &SavedDisk) -> Result<()> {
    let from = dir.join(&disk.copy.file);
    let to = Path::new(&disk.copy.image);
    let io = |what: &str, e| Error::io(format!("{what} {}", to.display()), e);
    let mut src =
        File::open(&from).map_err(|e| Error::io(format!("open {}", from.display()), e))?;
    let mut dst = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(to)
        .map_err(|e| io("open", e))?;
    std::io::copy(&mut src, &mut dst).map_err(|e| io("write", e))?;
    dst.set_len(disk.bytes).map_err(|e| io("truncate", e))?;
    dst.sync_all().map_err(|e| io("sync", e))
}

/// Reads and checks the manifest of `dir` only (not the VM files).
pub fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    let bytes = std::fs::read(&path).map_err(|e| {
        damaged(
            &path,
            format!("no manifest: not a complete checkpoint ({e})"),
        )
    })?;
    decode(&path, &bytes)
}

/// A checkpoint being written: a hidden directory beside its final place, removed unless
/// [`Partial::complete`] renames it there.
#[derive(Debug)]
pub struct Partial {
    dir: PathBuf,
    target: PathBuf,
    done: bool,
}

impl Partial {
    /// Starts a checkpoint to be completed at `target`, which must not exist yet. The files go
    /// into `.NAME.partial` beside it (mode 0700; a leftover of an earlier attempt is removed).
    pub fn begin(target: &Path) -> Result<Partial> {
        let name = target
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| valid_file_name(n))
            .ok_or_else(|| {
                Error::Config(format!(
                    "{}: a checkpoint needs a directory name of its own",
                    target.display()
                ))
            })?;
        if target.exists() {
            return Err(Error::Refused(format!(
                "{}: already exists; a checkpoint is never written over another",
                target.display()
            )));
        }
        let parent = parent_of(target);
        let dir = parent.join(format!(".{name}.partial"));
        if dir.exists() {
            std::fs::remove_dir_all(&dir)
                .map_err(|e| Error::io(format!("remove {}", dir.display()), e))?;
        }
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        Ok(Partial {
            dir,
            target: target.to_owned(),
            done: false,
        })
    }

    /// Where VM `vm`'s state file goes (an absolute path, for a VMM that writes it itself).
    pub fn state_path(&self, vm: &str) -> PathBuf {
        self.dir.join(state_file_name(vm))
    }

    /// Checksums and `fsync`s every VM's file, writes the manifest, and moves the checkpoint
    /// to its place: from then on it is complete. Returns the manifest.
    pub fn complete(
        mut self,
        epoch: u64,
        plan: &str,
        vms: Vec<(String, SavedState, Interconnect)>,
    ) -> Result<Manifest> {
        let mut saved = Vec::with_capacity(vms.len());
        for (name, state, interconnect) in vms {
            let path = self.state_path(&name);
            sync_file(&path)?;
            let (bytes, crc32) = file_checksum(&path)?;
            let mut disks = Vec::with_capacity(state.disks.len());
            for copy in state.disks {
                let path = self.dir.join(&copy.file);
                sync_file(&path)?;
                let (bytes, crc32) = file_checksum(&path)?;
                disks.push(SavedDisk { copy, bytes, crc32 });
            }
            saved.push(SavedVm {
                file: state_file_name(&name),
                name,
                bytes,
                crc32,
                format: state.format,
                interconnect,
                disks,
            });
        }
        let manifest = Manifest {
            epoch,
            created_unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            plan: plan.to_owned(),
            vms: saved,
        };
        let path = self.dir.join(MANIFEST);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
        f.write_all(&encode(&manifest)?)
            .and_then(|()| f.sync_all())
            .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
        sync_dir(&self.dir)?;
        if self.target.exists() {
            return Err(Error::Refused(format!(
                "{}: appeared while the checkpoint was written",
                self.target.display()
            )));
        }
        std::fs::rename(&self.dir, &self.target)
            .map_err(|e| Error::io(format!("rename {}", self.dir.display()), e))?;
        self.done = true;
        sync_dir(parent_of(&self.target))?;
        Ok(manifest)
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn state_file_name(vm: &str) -> String {
    format!("{vm}.state")
}

fn parent_of(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn sync_file(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(format!("sync {}", path.display()), e))
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| Error::io(format!("sync {}", dir.display()), e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ninja-ckpt-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn format() -> StateFormat {
        StateFormat {
            writer: "qemu-migration".into(),
            capabilities: vec!["mapped-ram".into()],
        }
    }

    fn eth() -> Interconnect {
        Interconnect::Ethernet {
            mac: "52:54:00:00:00:01".into(),
            iface: None,
            pci: None,
        }
    }

    /// A complete checkpoint of two VMs with `size`-byte states, at `base/ckpt`.
    fn written(base: &Path, size: usize) -> PathBuf {
        std::fs::create_dir_all(base).unwrap();
        let target = base.join("ckpt");
        let partial = Partial::begin(&target).unwrap();
        for (i, vm) in ["vm0", "vm1"].iter().enumerate() {
            let bytes: Vec<u8> = (0..size).map(|b| (b * 7 + i) as u8).collect();
            std::fs::write(partial.state_path(vm), bytes).unwrap();
        }
        // vm1 has a writable disk, copied beside its state.
        let disk = disk_path(&partial.state_path("vm1"), 0, "raw");
        assert!(disk.ends_with("vm1.disk0.raw"), "{}", disk.display());
        std::fs::write(&disk, vec![0xd1; size / 2]).unwrap();
        let vms = ["vm0", "vm1"]
            .iter()
            .map(|v| {
                let disks = if *v == "vm1" {
                    vec![DiskCopy {
                        device: "scratch".into(),
                        image: base.join("scratch.raw").display().to_string(),
                        format: "raw".into(),
                        file: "vm1.disk0.raw".into(),
                    }]
                } else {
                    Vec::new()
                };
                let state = SavedState {
                    format: format(),
                    disks,
                };
                (v.to_string(), state, eth())
            })
            .collect();
        let m = partial.complete(42, "[[vm]]\n", vms).unwrap();
        assert_eq!(m.vms.len(), 2);
        target
    }

    #[test]
    fn a_complete_checkpoint_reads_back_with_its_sizes_and_checksums() {
        let base = scratch("ok");
        let target = written(&base, 10_000);
        let m = read(&target).unwrap();
        assert_eq!(m.epoch, 42);
        assert_eq!(m.plan, "[[vm]]\n");
        assert_eq!(m.vms[1].name, "vm1");
        assert_eq!(m.vms[1].bytes, 10_000);
        assert_eq!(m.vms[0].format, format());
        assert_eq!(
            (m.vms[0].bytes, m.vms[0].crc32),
            file_checksum(&target.join("vm0.state")).unwrap()
        );
        // Nothing partial is left, and the same place is never written twice.
        assert!(!base.join(".ckpt.partial").exists());
        let e = Partial::begin(&target).unwrap_err().to_string();
        assert!(e.contains("already exists"), "{e}");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn the_manifest_header_is_the_format_and_the_checksum_of_its_json() {
        let m = Manifest {
            epoch: 1,
            created_unix_ms: 2,
            plan: String::new(),
            vms: Vec::new(),
        };
        let bytes = encode(&m).unwrap();
        let json = br#"{
  "epoch": 1,
  "created_unix_ms": 2,
  "plan": "",
  "vms": []
}"#;
        let header = format!("ninja-checkpoint 1 crc32={:08x}\n", crc32fast::hash(json));
        assert_eq!(&bytes[..header.len()], header.as_bytes());
        assert_eq!(&bytes[header.len()..], json);
        assert_eq!(decode(Path::new("M"), &bytes).unwrap(), m);
    }

    fn refused(dir: &Path) -> String {
        match read(dir).unwrap_err() {
            e @ Error::Checkpoint { .. } => e.to_string(),
            e => panic!("not a checkpoint error: {e:?}"),
        }
    }

    #[test]
    fn a_flipped_byte_a_truncated_or_a_missing_file_is_named() {
        let base = scratch("damage");
        let target = written(&base, 50_000);
        let vm1 = target.join("vm1.state");

        let mut bytes = std::fs::read(&vm1).unwrap();
        bytes[31_337] ^= 0x01;
        std::fs::write(&vm1, &bytes).unwrap();
        let e = refused(&target);
        assert!(e.contains("vm1.state") && e.contains("checksum"), "{e}");

        bytes.truncate(49_000);
        std::fs::write(&vm1, &bytes).unwrap();
        let e = refused(&target);
        assert!(
            e.contains("vm1.state") && e.contains("49000 bytes") && e.contains("truncated"),
            "{e}"
        );

        std::fs::remove_file(&vm1).unwrap();
        let e = refused(&target);
        assert!(e.contains("vm1.state") && e.contains("missing"), "{e}");

        // A disk copy is checked as a state file is.
        let target = written(&base.join("again"), 50_000);
        let disk = target.join("vm1.disk0.raw");
        let mut bytes = std::fs::read(&disk).unwrap();
        bytes[7] ^= 0x80;
        std::fs::write(&disk, &bytes).unwrap();
        let e = refused(&target);
        assert!(e.contains("vm1.disk0.raw") && e.contains("checksum"), "{e}");
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_disk_copy_is_written_back_over_the_image_in_place() {
        let base = scratch("writeback");
        let target = written(&base, 10_000);
        let m = read(&target).unwrap();
        let disk = &m.vms[1].disks[0];
        assert_eq!((disk.copy.device.as_str(), disk.bytes), ("scratch", 5_000));
        // The image went on changing after the cut, and grew.
        let image = base.join("scratch.raw");
        std::fs::write(&image, vec![0x77; 9_000]).unwrap();
        let open_before = File::open(&image).unwrap();
        write_back(&target, disk).unwrap();
        assert_eq!(std::fs::read(&image).unwrap(), vec![0xd1; 5_000]);
        // Same file (a VMM holding it open reads the copy), not a new one in its place.
        let mut seen = Vec::new();
        (&open_before).read_to_end(&mut seen).unwrap();
        assert_eq!(seen, vec![0xd1; 5_000]);
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn a_damaged_or_foreign_manifest_is_refused() {
        let base = scratch("manifest");
        let target = written(&base, 100);
        let path = target.join(MANIFEST);
        let good = std::fs::read(&path).unwrap();

        // One byte of the JSON changed: the header's checksum catches it.
        let mut flipped = good.clone();
        let at = flipped.len() - 5;
        flipped[at] ^= 0x20;
        std::fs::write(&path, &flipped).unwrap();
        let e = refused(&target);
        assert!(
            e.contains("MANIFEST") && e.contains("checksum mismatch"),
            "{e}"
        );

        // A newer layout, another file, a manifest naming a file outside the checkpoint.
        let newer = String::from_utf8(good.clone()).unwrap().replacen(
            "ninja-checkpoint 1 ",
            "ninja-checkpoint 2 ",
            1,
        );
        std::fs::write(&path, newer).unwrap();
        assert!(refused(&target).contains("format version 2"));
        std::fs::write(&path, "{\"epoch\": 1}\n").unwrap();
        assert!(refused(&target).contains("not a checkpoint manifest"));
        let mut m = decode(&path, &good).unwrap();
        m.vms[0].file = "../../etc/passwd".into();
        std::fs::write(&path, encode(&m).unwrap()).unwrap();
        assert!(refused(&target).contains("not one in the checkpoint"));

        std::fs::remove_file(&path).unwrap();
        assert!(refused(&target).contains("not a complete checkpoint"));
        let _ = std::fs::remove_dir_all(&base);
    }

    #[test]
    fn an_abandoned_checkpoint_leaves_nothing_that_reads_as_one() {
        let base = scratch("abandon");
        let target = base.join("ckpt");
        let partial = Partial::begin(&target).unwrap();
        std::fs::write(partial.state_path("vm0"), b"half").unwrap();
        drop(partial);
        assert!(!target.exists());
        assert!(!base.join(".ckpt.partial").exists());
        let _ = std::fs::remove_dir_all(&base);
    }
}
