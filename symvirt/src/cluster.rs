//! The virtual cluster a plan moves: its VMs, where each runs now and where it goes, the
//! passthrough devices to detach at the source and the devices to attach at the destination.
//!
//! These are the validated, typed values the controller works on; [`crate::plan`] reads them
//! from a TOML file and checks them first.

use crate::protocol::Interconnect;
use crate::remote::Address;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::time::Duration;

/// A device the controller plugs or unplugs over QMP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Device {
    /// A real passthrough HCA (an SR-IOV VF): `vfio-pci,host=BDF`.
    VfioPci {
        /// The QEMU device id.
        id: String,
        /// The host PCI address, `DDDD:BB:DD.F`.
        host: String,
        /// More `device_add` properties (`addr`, `bus`, ...).
        #[serde(default)]
        properties: Map<String, Value>,
    },
    /// A STAND-IN for a passthrough HCA where no HCA exists: an `ivshmem-plain` device on a
    /// shared `memory-backend-file`. Like a VFIO device without migration support it blocks
    /// migration while attached. Real deployments use [`Device::VfioPci`].
    HcaStandin {
        /// The QEMU device id (the backend object is `<id>-mem`).
        id: String,
        /// The shared memory file (under /dev/shm); claimed when the device is reserved.
        mem_path: PathBuf,
        /// The region size in bytes (a power of two).
        size: u64,
        /// More `device_add` properties.
        #[serde(default)]
        properties: Map<String, Value>,
    },
    /// A paravirtual NIC: `virtio-net-pci` (migratable).
    VirtioNet {
        /// The QEMU device id.
        id: String,
        /// The MAC address, lower-case `xx:xx:xx:xx:xx:xx`.
        mac: String,
        /// A network backend to create first (`netdev_add` arguments: `type`, `id`, options).
        #[serde(default)]
        netdev: Option<Map<String, Value>>,
        /// More `device_add` properties.
        #[serde(default)]
        properties: Map<String, Value>,
    },
    /// A `virtio-net-pci` NIC the VM has from boot wherever it runs (it migrates with the VM;
    /// each host's QEMU command line gives it that host's network backend, or none), whose
    /// link the controller switches instead of plugging the device: down on the source before
    /// the move (so the destination starts with it down), up on the destination after it. The
    /// guest sees a carrier change where a hot-plug would cost it a PCI probe, under TCG
    /// hundreds of milliseconds of the job's pause.
    StandbyNic {
        /// The QEMU device id (also the NIC's net client name for `set_link`).
        id: String,
        /// The MAC address, lower-case `xx:xx:xx:xx:xx:xx`; checked on the destination.
        mac: String,
    },
}

impl Device {
    /// The QEMU device id.
    pub fn id(&self) -> &str {
        match self {
            Device::VfioPci { id, .. }
            | Device::HcaStandin { id, .. }
            | Device::VirtioNet { id, .. }
            | Device::StandbyNic { id, .. } => id,
        }
    }

    /// The id of the stand-in's memory backend object.
    pub fn backend_object_id(&self) -> Option<String> {
        match self {
            Device::HcaStandin { id, .. } => Some(format!("{id}-mem")),
            _ => None,
        }
    }

    /// The id of a NIC's network backend.
    pub fn netdev_id(&self) -> Option<String> {
        match self {
            Device::VirtioNet {
                netdev: Some(n), ..
            } => n.get("id").and_then(Value::as_str).map(str::to_owned),
            _ => None,
        }
    }

    /// Whether the device stays in the VM and only its link is switched ([`Device::StandbyNic`]).
    pub fn is_standby(&self) -> bool {
        matches!(self, Device::StandbyNic { .. })
    }

    /// The NIC's MAC address, if the device is a NIC.
    pub fn mac(&self) -> Option<&str> {
        match self {
            Device::VirtioNet { mac, .. } | Device::StandbyNic { mac, .. } => Some(mac),
            _ => None,
        }
    }

    /// A short description for events and logs, e.g. `hca-standin hca0`.
    pub fn describe(&self) -> String {
        match self {
            Device::VfioPci { id, host, .. } => format!("vfio-pci {id} (host {host})"),
            Device::HcaStandin { id, .. } => format!("hca-standin {id} (ivshmem-plain)"),
            Device::VirtioNet { id, mac, .. } => format!("virtio-net-pci {id} ({mac})"),
            Device::StandbyNic { id, mac } => format!("standby virtio-net-pci {id} ({mac})"),
        }
    }
}

/// Where a QEMU destination comes from when the controller starts it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LaunchSpec {
    /// Run it on this host through `ssh HOST` (absent: locally).
    #[serde(default)]
    pub host: Option<String>,
    /// The QEMU binary.
    #[serde(default = "default_qemu")]
    pub program: String,
    /// The machine arguments, the same as the source's (devices that migrate, memory, CPUs,
    /// the guest channel's chardev with the destination's socket path). The launcher adds
    /// `-qmp` for the destination's QMP address and `-incoming defer`.
    pub args: Vec<String>,
}

fn default_qemu() -> String {
    "qemu-system-x86_64".into()
}

/// A VM that libvirt manages: a domain of the libvirt daemon at `uri` (any URI libvirt takes:
/// `qemu:///system`, `qemu+ssh://node7/system`, `qemu+tls://node7/system`,
/// `qemu+unix:///system?socket=PATH`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibvirtDomain {
    /// The daemon's connection URI, as this host reaches it (and, for the destination, as the
    /// source's daemon reaches it: the migration is peer to peer).
    pub uri: String,
    /// The domain's name.
    pub domain: String,
    /// Where a migration into this daemon's host connects, `tcp:HOST:PORT` (libvirt's
    /// `migrate_uri`; absent: libvirt picks a port on the host's name). A source's is used
    /// when a rollback migrates the VM back.
    pub migrate_uri: Option<String>,
    /// Destination only: the domain is defined (persistent) there after the move, with the
    /// source's definition less the devices the plan detaches, plus those it attaches
    /// (`VIR_MIGRATE_PERSIST_DEST`).
    pub persistent: bool,
    /// Destination only: the source's definition is removed after the move
    /// (`VIR_MIGRATE_UNDEFINE_SOURCE`).
    pub undefine_source: bool,
}

/// The source side of one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceSpec {
    /// QEMU's QMP monitor (unused for a libvirt domain).
    pub qmp: Address,
    /// The guest channel, QEMU's virtserialport chardev socket (unused for a libvirt domain:
    /// the channel is opened through libvirt).
    pub channel: Address,
    /// The VM is this libvirt domain, driven through libvirt instead of QMP.
    pub libvirt: Option<LibvirtDomain>,
    /// The passthrough devices to detach before migrating (re-attached on rollback).
    pub devices: Vec<Device>,
    /// The interconnect the guest has now (told again on rollback).
    pub interconnect: Interconnect,
}

/// The destination side of one VM.
#[derive(Debug, Clone, PartialEq)]
pub struct DestinationSpec {
    /// The destination QEMU's QMP monitor (unused for a libvirt domain).
    pub qmp: Address,
    /// The guest channel on the destination (unused for a libvirt domain).
    pub channel: Address,
    /// The migration URI the destination listens on, `tcp:HOST:PORT` or `unix:PATH`; for a
    /// libvirt domain, where its QEMU listens (empty: libvirt picks).
    pub migrate_uri: String,
    /// The libvirt daemon the domain moves to (the same domain name), when the source is a
    /// libvirt domain.
    pub libvirt: Option<LibvirtDomain>,
    /// Start the destination QEMU (absent: it runs already, started with `-incoming URI`).
    pub launch: Option<LaunchSpec>,
    /// The devices to attach after the migration.
    pub devices: Vec<Device>,
    /// The interconnect the guest gets there.
    pub interconnect: Interconnect,
}

/// One VM of the virtual cluster and where it goes.
#[derive(Debug, Clone, PartialEq)]
pub struct VmSpec {
    /// Its name (unique in the plan; the name its agent gives in `hello`).
    pub name: String,
    /// Where it runs.
    pub source: SourceSpec,
    /// Where it goes.
    pub destination: DestinationSpec,
}

/// How long each phase may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadlines {
    /// Connecting to every monitor and guest channel, and every guest's `hello`.
    pub connect: Duration,
    /// Starting or checking the destinations and claiming their devices.
    pub reserve: Duration,
    /// Every guest quiesced (the barrier); also the `deadline_ms` sent in `prepare`.
    pub quiesce: Duration,
    /// Every passthrough device unplugged.
    pub detach: Duration,
    /// Every VM migrated (pre-copy, the synchronized switchover).
    pub migrate: Duration,
    /// Every destination device plugged.
    pub attach: Duration,
    /// Every guest's `resumed`.
    pub resume: Duration,
    /// Each VM's rollback.
    pub rollback: Duration,
}

impl Default for Deadlines {
    fn default() -> Self {
        let s = Duration::from_secs;
        Deadlines {
            connect: s(60),
            reserve: s(30),
            quiesce: s(30),
            detach: s(15),
            migrate: s(300),
            attach: s(15),
            resume: s(60),
            rollback: s(60),
        }
    }
}

/// Tuning of the migration itself.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MigrationSettings {
    /// VMs migrating (pre-copy) at once; 0 means all.
    pub max_parallel: usize,
    /// Bandwidth cap per migration in bytes/s (QEMU `max-bandwidth`).
    pub max_bandwidth: Option<u64>,
    /// Downtime target in ms (QEMU `downtime-limit`).
    pub downtime_limit_ms: Option<u64>,
}

/// TLS for the migration streams of a plan. A QEMU VM's migration uses QEMU's own
/// (`tls-creds-x509` objects, created over QMP at both ends, and `tls-creds`), with mutual
/// authentication: every certificate is checked against the site's CA, the destination's name
/// against the migration URI's host. A libvirt domain migrates with `VIR_MIGRATE_TLS`, with the
/// certificates the site gave its libvirt daemons.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The credentials directory, the same path on every QEMU host: `ca-cert.pem`; where a
    /// destination runs `server-cert.pem` and `server-key.pem`; where a source runs
    /// `client-cert.pem` and `client-key.pem`.
    pub creds_dir: PathBuf,
    /// The distinguished names of the source certificates a destination accepts, as GnuTLS
    /// writes them (`CN=node1`, `CN=node1,O=Site`); empty: any the site CA signed. QEMU's
    /// `tls-authz` (an `authz-list`) at every QEMU destination: one the plan launches, or one
    /// the site started (set over QMP before the source connects).
    pub allowed_sources: Vec<String>,
}

/// The id of the TLS credentials object Ninja creates in a QEMU.
pub const TLS_CREDS_ID: &str = "ninja-tls";

/// The id of the `authz-list` Ninja creates in a destination QEMU.
pub const TLS_AUTHZ_ID: &str = "ninja-tls-authz";

/// A whole migration plan: the cluster's VMs and how to move them.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The VMs, in plan order.
    pub vms: Vec<VmSpec>,
    /// Phase deadlines.
    pub deadlines: Deadlines,
    /// Migration tuning.
    pub migration: MigrationSettings,
    /// The `ssh` program used for remote endpoints and launches.
    pub ssh_program: String,
    /// TLS for the migration streams (absent: clear text, see [`Plan::cleartext_endpoints`]).
    pub tls: Option<TlsSettings>,
}

impl Plan {
    /// What of the plan would cross between hosts in clear text: `tcp:` monitors and
    /// migration streams on an address other than this host's loopback (without `[settings.tls]`),
    /// `qemu+tcp://` libvirt connections, libvirt migrations between two hosts without TLS.
    /// `ssh:` endpoints and unix sockets are not listed.
    pub fn cleartext_endpoints(&self) -> Vec<String> {
        let mut found = Vec::new();
        for vm in &self.vms {
            let name = &vm.name;
            if let (Some(from), Some(to)) = (&vm.source.libvirt, &vm.destination.libvirt) {
                for (what, d) in [("source", from), ("destination", to)] {
                    if d.uri
                        .split_once("://")
                        .is_some_and(|(s, _)| s.ends_with("+tcp"))
                    {
                        found.push(format!("{name}: {what}.libvirt {} (no TLS)", d.uri));
                    }
                }
                if self.tls.is_none() && uri_host(&from.uri) != uri_host(&to.uri) {
                    found.push(format!(
                        "{name}: the migration from {} to {} (no [settings.tls])",
                        from.uri, to.uri
                    ));
                }
                continue;
            }
            for (what, address) in [
                ("source.qmp", &vm.source.qmp),
                ("destination.qmp", &vm.destination.qmp),
            ] {
                if address.crosses_hosts() {
                    found.push(format!("{name}: {what} {address} (QMP in clear text)"));
                }
            }
            let uri = &vm.destination.migrate_uri;
            if self.tls.is_none() && uri.parse::<Address>().is_ok_and(|a| a.crosses_hosts()) {
                found.push(format!(
                    "{name}: destination.migrate_uri {uri} (no [settings.tls])"
                ));
            }
        }
        found
    }

    /// The first VM that is a libvirt domain, for the commands that drive QEMU VMs only.
    pub fn first_libvirt_vm(&self) -> Option<&str> {
        self.vms
            .iter()
            .find(|v| v.source.libvirt.is_some())
            .map(|v| v.name.as_str())
    }
}

/// The host of a libvirt URI (empty for this host's daemon).
fn uri_host(uri: &str) -> &str {
    let rest = uri.split_once("://").map_or("", |(_, r)| r);
    let authority = rest.split(['/', '?']).next().unwrap_or("");
    authority.rsplit_once('@').map_or(authority, |(_, h)| h)
}
