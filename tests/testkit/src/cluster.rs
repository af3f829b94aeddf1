//! A virtual cluster for tests: Linux guests that boot the shared cluster root
//! (`scripts/build-cluster-image`) on real Linux bridges, in a network namespace of the test's
//! own, with an ssh login over the management network.
//!
//! Three bridges, as on a real pair of clusters: the management network every host has (the
//! launcher's and the test's ssh traffic), fabric A (the source cluster's HCA network: its NICs
//! are hot-added as the passthrough STAND-IN) and fabric B (the destination's Ethernet). Every
//! QEMU NIC has a tap of its own on one bridge; the taps' byte counters tell where the job's
//! traffic went. Nothing in the namespace reaches outside it.

use crate::{Fixtures, QemuConfig, Requirement, mpi_or_skip, qemu_or_skip, skip};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// The cluster's shared root and its login key, built by `scripts/build-fixtures`.
#[derive(Debug, Clone)]
pub struct ClusterFixtures {
    /// The guest kernel and initramfs.
    pub boot: Fixtures,
    /// The read-only root filesystem image every guest opens.
    pub root: PathBuf,
    /// The private key that logs in as root on every guest.
    pub key: PathBuf,
}

impl ClusterFixtures {
    /// The fixtures if they have all been built.
    pub fn find() -> Result<ClusterFixtures, String> {
        let boot = Fixtures::find()?;
        let dir = Fixtures::dir().join("cluster");
        let f = ClusterFixtures {
            boot,
            root: dir.join("root.ext4"),
            key: dir.join("id_ed25519"),
        };
        for p in [&f.root, &f.key] {
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

/// The cluster fixtures, if QEMU, both MPIs, the cluster root and network namespaces are all
/// there; otherwise skips (see [`skip`]) and returns None.
pub fn cluster_or_skip(test: &str) -> Option<ClusterFixtures> {
    qemu_or_skip(test)?;
    if !mpi_or_skip(test) {
        return None;
    }
    let fixtures = match ClusterFixtures::find() {
        Ok(f) => f,
        Err(why) => {
            skip(Requirement::Qemu, test, &why);
            return None;
        }
    };
    if let Err(e) = Fabrics::create() {
        skip(
            Requirement::Netns,
            test,
            &format!("cannot make a network namespace with bridges (root and iproute2): {e}"),
        );
        return None;
    }
    Some(fixtures)
}

/// One of the cluster's networks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    /// The management network (10.77.0.0/24; the test's own end is 10.77.0.254).
    Management,
    /// Fabric A: the source cluster's HCA network.
    FabricA,
    /// Fabric B: the destination cluster's Ethernet.
    FabricB,
}

impl Net {
    /// The bridge's name in the namespace.
    pub fn bridge(self) -> &'static str {
        match self {
            Net::Management => "mgmt",
            Net::FabricA => "fabric-a",
            Net::FabricB => "fabric-b",
        }
    }
}

/// The management address of VM `vm` (0-based).
pub fn management_ip(vm: usize) -> String {
    format!("10.77.0.{}", vm + 1)
}

/// The data address of VM `vm`, with the data subnet's prefix: what the job's ranks use.
pub fn data_address(vm: usize) -> String {
    format!("10.99.0.{}/24", vm + 1)
}

/// A network namespace with the three bridges; deleted (with its taps) on drop.
#[derive(Debug)]
pub struct Fabrics {
    ns: String,
}

fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

impl Fabrics {
    /// Creates the namespace and its bridges (needs root).
    pub fn create() -> io::Result<Fabrics> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let ns = format!(
            "ninja-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let _ = ip(&["netns", "del", &ns]);
        ip(&["netns", "add", &ns])?;
        let fabrics = Fabrics { ns };
        fabrics.ip(&["link", "set", "lo", "up"])?;
        for net in [Net::Management, Net::FabricA, Net::FabricB] {
            fabrics.add_bridge(net)?;
        }
        fabrics.ip(&[
            "addr",
            "add",
            "10.77.0.254/24",
            "dev",
            Net::Management.bridge(),
        ])?;
        Ok(fabrics)
    }

    /// Takes charge of an existing namespace made by [`Fabrics::create`] (another process's,
    /// left running on purpose); dropping the result deletes it.
    pub fn attach(ns: &str) -> Fabrics {
        Fabrics { ns: ns.to_owned() }
    }

    /// The namespace's name.
    pub fn ns(&self) -> &str {
        &self.ns
    }

    /// Runs `ip ARGS` in the namespace.
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        let mut all = vec!["-n", &self.ns];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// (Re)creates the bridge of `net`.
    pub fn add_bridge(&self, net: Net) -> io::Result<()> {
        self.ip(&["link", "add", net.bridge(), "type", "bridge"])?;
        self.ip(&["link", "set", net.bridge(), "up"])
    }

    /// Removes the bridge of `net`: that network is down (its taps stay, unplugged).
    pub fn remove_bridge(&self, net: Net) -> io::Result<()> {
        self.ip(&["link", "del", net.bridge()])
    }

    /// Creates a persistent tap `name` on the bridge of `net`, for a QEMU NIC to open.
    pub fn add_tap(&self, name: &str, net: Net) -> io::Result<()> {
        self.ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
        self.ip(&["link", "set", name, "master", net.bridge()])?;
        self.ip(&["link", "set", name, "up"])
    }

    /// Bytes the tap `name` carried so far, both directions.
    pub fn tap_bytes(&self, name: &str) -> io::Result<u64> {
        let out = self
            .command("ip")
            .args(["-j", "-s", "link", "show", name])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| io::Error::other(format!("ip -j -s link show {name}: {e}: {text}")))?;
        let stats = &v[0]["stats64"];
        let bytes = |dir: &str| stats[dir]["bytes"].as_u64();
        match (bytes("rx"), bytes("tx")) {
            (Some(rx), Some(tx)) => Ok(rx + tx),
            _ => Err(io::Error::other(format!("no counters for {name}: {text}"))),
        }
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    /// Runs `script` as root on the guest at management address `host`, over ssh with the
    /// cluster key (batch mode, 10 s to connect).
    pub fn ssh(&self, key: &Path, host: &str, script: &str) -> io::Result<Output> {
        self.command("ssh")
            .args(["-F", "/dev/null", "-i"])
            .arg(key)
            .args([
                "-o",
                "BatchMode=yes",
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
                "-o",
                "LogLevel=ERROR",
                "-o",
                "ConnectTimeout=10",
                &format!("root@{host}"),
                script,
            ])
            .stdin(Stdio::null())
            .output()
    }
}

impl Drop for Fabrics {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.ns]);
    }
}

/// A cluster guest's machine: the shared root read-only as `/dev/vda` (and the job's disk as
/// `/dev/vdb` when given), the management NIC on tap `mgmt_tap`, the SymVirt channel at
/// `channel`, and on the kernel command line its name, its management and data addresses and
/// the agent's arguments (`agent_args`, space separated). Source and destinations of one VM
/// differ only in tap, channel and serial log.
pub fn guest_machine(
    fixtures: &ClusterFixtures,
    fabrics: &Fabrics,
    vm: usize,
    job_disk: Option<&Path>,
    mgmt_tap: &str,
    channel: &Path,
    agent_args: &str,
) -> QemuConfig {
    let mut config = QemuConfig::new(&fixtures.boot)
        .memory_mib(256)
        .netns(fabrics.ns())
        .kernel_arg("ninja.root=/dev/vda")
        .kernel_arg(format!("ninja.vm=vm{vm}"))
        .kernel_arg(format!("ninja.mgmt={}/24", management_ip(vm)))
        .kernel_arg(format!("ninja.data={}", data_address(vm)))
        .args([
            "-drive".into(),
            format!(
                "file={},format=raw,if=virtio,readonly=on",
                fixtures.root.display()
            ),
        ]);
    if !agent_args.is_empty() {
        let words: Vec<&str> = agent_args.split_whitespace().collect();
        config = config.kernel_arg(format!("ninja.agent={}", words.join(",")));
    }
    if let Some(disk) = job_disk {
        config = config.kernel_arg("ninja.job=/dev/vdb").args([
            "-drive".into(),
            format!("file={},format=raw,if=virtio,readonly=on", disk.display()),
        ]);
    }
    config.args([
        "-netdev".into(),
        format!("tap,id=mgmt,ifname={mgmt_tap},script=no,downscript=no"),
        "-device".into(),
        format!(
            "virtio-net-pci,netdev=mgmt,mac=52:54:00:77:00:{:02x}",
            vm + 1
        ),
        "-device".into(),
        "virtio-serial".into(),
        "-chardev".into(),
        format!(
            "socket,id=sv0,path={},server=on,wait=off",
            channel.display()
        ),
        "-device".into(),
        "virtserialport,chardev=sv0,name=org.symvirt.0".into(),
    ])
}

/// Packs the files of `dir` into a read-only ext4 disk image at `image` (the job's programs,
/// shared by every guest as a cluster's home directory would be).
pub fn pack_disk(dir: &Path, image: &Path) -> io::Result<()> {
    let bytes: u64 = std::fs::read_dir(dir)?
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    let kib = bytes / 1024 * 2 + 4096;
    let _ = std::fs::remove_file(image);
    let out = Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-d"])
        .arg(dir)
        .arg(image)
        .arg(format!("{kib}k"))
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "mke2fs {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
