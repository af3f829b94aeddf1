//! Typed QMP replies and enums (field names as in QEMU's `qapi/*.json`).
//!
//! Forward compatibility: every enum has an `Other(String)` catch-all, every struct ignores
//! unknown fields and treats fields newer QEMUs may drop as optional.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// Declares a QAPI string enum with an `Other(String)` catch-all, serialized as its QAPI name.
macro_rules! qapi_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        pub enum $name {
            $($(#[$vmeta])* $variant,)*
            /// A value this client does not know (e.g. from a newer QEMU).
            Other(String),
        }

        impl $name {
            /// The QAPI spelling.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $text,)*
                    Self::Other(s) => s,
                }
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                match s {
                    $($text => Self::$variant,)*
                    other => Self::Other(other.to_owned()),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = std::borrow::Cow::<'de, str>::deserialize(d)?;
                Ok(Self::from(s.as_ref()))
            }
        }
    };
}

qapi_enum! {
    /// QMP error class (`QapiErrorClass`).
    ErrorClass {
        /// Most errors.
        GenericError = "GenericError",
        /// The command does not exist.
        CommandNotFound = "CommandNotFound",
        /// A device is not active.
        DeviceNotActive = "DeviceNotActive",
        /// The device does not exist.
        DeviceNotFound = "DeviceNotFound",
        /// KVM lacks a capability.
        KvmMissingCap = "KVMMissingCap",
    }
}

qapi_enum! {
    /// A capability offered in the QMP greeting (`QMPCapability`).
    QmpCapability {
        /// Out-of-band command execution.
        Oob = "oob",
    }
}

qapi_enum! {
    /// The VM run state (`RunState`).
    RunState {
        /// Stopped by the debugger.
        Debug = "debug",
        /// Waiting for an incoming migration.
        InMigrate = "inmigrate",
        /// An internal error stopped the VM.
        InternalError = "internal-error",
        /// An I/O error stopped the VM.
        IoError = "io-error",
        /// Paused (`stop`).
        Paused = "paused",
        /// Stopped after a completed outgoing migration.
        PostMigrate = "postmigrate",
        /// Not started yet (`-S`).
        Prelaunch = "prelaunch",
        /// Finishing a migration.
        FinishMigrate = "finish-migrate",
        /// Loading a snapshot.
        RestoreVm = "restore-vm",
        /// Running.
        Running = "running",
        /// Saving a snapshot.
        SaveVm = "save-vm",
        /// Shut down (with `-no-shutdown`).
        Shutdown = "shutdown",
        /// Suspended (ACPI S3).
        Suspended = "suspended",
        /// Stopped by the watchdog.
        Watchdog = "watchdog",
        /// The guest panicked.
        GuestPanicked = "guest-panicked",
        /// COLO fault tolerance.
        Colo = "colo",
    }
}

qapi_enum! {
    /// Migration status (`MigrationStatus`).
    MigrationStatus {
        /// No migration started.
        None = "none",
        /// Setting up.
        Setup = "setup",
        /// Being cancelled.
        Cancelling = "cancelling",
        /// Cancelled.
        Cancelled = "cancelled",
        /// Pre-copy in progress.
        Active = "active",
        /// Post-copy in progress.
        PostcopyActive = "postcopy-active",
        /// Post-copy paused by a network failure.
        PostcopyPaused = "postcopy-paused",
        /// Setting up post-copy recovery.
        PostcopyRecoverSetup = "postcopy-recover-setup",
        /// Recovering post-copy.
        PostcopyRecover = "postcopy-recover",
        /// Finished successfully.
        Completed = "completed",
        /// Failed.
        Failed = "failed",
        /// COLO.
        Colo = "colo",
        /// Paused before switchover (`pause-before-switchover`), waiting for `migrate-continue`.
        PreSwitchover = "pre-switchover",
        /// Migrating device state after RAM.
        Device = "device",
        /// Waiting for a failover device to be unplugged (`wait-unplug`).
        WaitUnplug = "wait-unplug",
    }
}

impl MigrationStatus {
    /// True when the migration can make no further progress on its own.
    pub fn is_terminal(&self) -> bool {
        matches!(self, Self::Completed | Self::Failed | Self::Cancelled)
    }
}

qapi_enum! {
    /// A migration capability (`MigrationCapability`).
    MigrationCapability {
        /// XBZRLE page compression.
        Xbzrle = "xbzrle",
        /// Pin all RAM for RDMA.
        RdmaPinAll = "rdma-pin-all",
        /// Throttle vCPUs when not converging.
        AutoConverge = "auto-converge",
        /// Send `MIGRATION` and `MIGRATION_PASS` events.
        Events = "events",
        /// Post-copy RAM.
        PostcopyRam = "postcopy-ram",
        /// Release source RAM after sending it.
        ReleaseRam = "release-ram",
        /// Open a return path from the destination.
        ReturnPath = "return-path",
        /// Pause before switchover until `migrate-continue`.
        PauseBeforeSwitchover = "pause-before-switchover",
        /// Several channels for RAM.
        Multifd = "multifd",
        /// Migrate dirty bitmaps.
        DirtyBitmaps = "dirty-bitmaps",
        /// Measure post-copy blocktime.
        PostcopyBlocktime = "postcopy-blocktime",
        /// Delay block activation on the destination.
        LateBlockActivate = "late-block-activate",
        /// Skip shared RAM.
        XIgnoreShared = "x-ignore-shared",
        /// Validate the VM UUID.
        ValidateUuid = "validate-uuid",
        /// Background snapshot.
        BackgroundSnapshot = "background-snapshot",
        /// Zero-copy send.
        ZeroCopySend = "zero-copy-send",
        /// Post-copy preemption channel.
        PostcopyPreempt = "postcopy-preempt",
        /// Wait for the destination's switchover acknowledgement.
        SwitchoverAck = "switchover-ack",
        /// Dirty-limit throttling.
        DirtyLimit = "dirty-limit",
        /// Mapped RAM (file migration).
        MappedRam = "mapped-ram",
    }
}

qapi_enum! {
    /// Why QEMU shut down (`ShutdownCause`).
    ShutdownCause {
        /// No reason.
        None = "none",
        /// A host error.
        HostError = "host-error",
        /// The QMP `quit` command.
        HostQmpQuit = "host-qmp-quit",
        /// The QMP `system_reset` command.
        HostQmpSystemReset = "host-qmp-system-reset",
        /// A signal (SIGTERM, ...).
        HostSignal = "host-signal",
        /// The user interface.
        HostUi = "host-ui",
        /// The guest shut down.
        GuestShutdown = "guest-shutdown",
        /// The guest reset.
        GuestReset = "guest-reset",
        /// The guest panicked.
        GuestPanic = "guest-panic",
        /// A subsystem reset.
        SubsystemReset = "subsystem-reset",
        /// A snapshot was loaded.
        SnapshotLoad = "snapshot-load",
    }
}

/// `major.minor.micro` of QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VersionTriple {
    /// Major version.
    pub major: u32,
    /// Minor version.
    pub minor: u32,
    /// Micro version.
    pub micro: u32,
}

/// `query-version` reply and the version part of the greeting (`VersionInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionInfo {
    /// QEMU's version numbers.
    pub qemu: VersionTriple,
    /// Distribution package string (may be empty).
    #[serde(default)]
    pub package: String,
}

/// `query-status` reply (`StatusInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    /// True when the vCPUs run.
    pub running: bool,
    /// The detailed run state.
    pub status: RunState,
}

/// One PCI bus in the `query-pci` reply (`PciInfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PciInfo {
    /// Bus number.
    pub bus: i64,
    /// Devices on the bus.
    pub devices: Vec<PciDeviceInfo>,
}

/// One PCI device (`PciDeviceInfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PciDeviceInfo {
    /// Bus number.
    pub bus: i64,
    /// Slot number.
    pub slot: i64,
    /// Function number.
    pub function: i64,
    /// Device class.
    pub class_info: PciDeviceClass,
    /// Vendor and device ids.
    pub id: PciDeviceId,
    /// Interrupt line, if any.
    #[serde(default)]
    pub irq: Option<i64>,
    /// The device's `id` given at `device_add` (empty when none).
    #[serde(default)]
    pub qdev_id: String,
    /// Bridge details (kept raw).
    #[serde(default)]
    pub pci_bridge: Option<Value>,
    /// BARs (kept raw).
    #[serde(default)]
    pub regions: Vec<Value>,
}

/// PCI class (`PciDeviceClass`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceClass {
    /// Class name, when QEMU knows one.
    #[serde(default)]
    pub desc: Option<String>,
    /// Class code.
    pub class: i64,
}

/// PCI ids (`PciDeviceId`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PciDeviceId {
    /// Device id.
    pub device: i64,
    /// Vendor id.
    pub vendor: i64,
    /// Subsystem id.
    #[serde(default)]
    pub subsystem: Option<i64>,
    /// Subsystem vendor id.
    #[serde(default, rename = "subsystem-vendor")]
    pub subsystem_vendor: Option<i64>,
}

/// `chardev-add` reply (`ChardevReturn`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChardevReturn {
    /// The pty path, for `pty` backends.
    #[serde(default)]
    pub pty: Option<String>,
}

/// RAM statistics of a migration (`MigrationStats`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct RamStats {
    /// Bytes transferred.
    pub transferred: u64,
    /// Bytes remaining.
    pub remaining: u64,
    /// Total guest RAM in bytes.
    pub total: u64,
    /// Zero pages (sent as a flag only).
    pub duplicate: u64,
    /// Pages sent in full.
    pub normal: u64,
    /// Bytes of pages sent in full.
    pub normal_bytes: u64,
    /// Pages dirtied per second.
    pub dirty_pages_rate: u64,
    /// Throughput in megabits per second.
    pub mbps: f64,
    /// Dirty bitmap synchronizations (one per pass).
    pub dirty_sync_count: u64,
    /// Page size in bytes.
    pub page_size: u64,
    /// Pages sent per second.
    pub pages_per_second: u64,
    /// Bytes sent before switchover.
    pub precopy_bytes: u64,
    /// Bytes sent during the downtime.
    pub downtime_bytes: u64,
    /// Bytes sent in post-copy.
    pub postcopy_bytes: u64,
    /// Bytes sent through multifd channels.
    pub multifd_bytes: u64,
    /// Post-copy page requests.
    pub postcopy_requests: u64,
}

/// `query-migrate` reply (`MigrationInfo`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default)]
pub struct MigrationInfo {
    /// Status; absent before any migration.
    pub status: Option<MigrationStatus>,
    /// RAM statistics.
    pub ram: Option<RamStats>,
    /// Milliseconds since the migration started (or its total, once completed).
    pub total_time: Option<u64>,
    /// Milliseconds of setup.
    pub setup_time: Option<u64>,
    /// Expected downtime in ms (while active).
    pub expected_downtime: Option<u64>,
    /// Actual downtime in ms (once completed).
    pub downtime: Option<u64>,
    /// Current vCPU throttle (auto-converge).
    pub cpu_throttle_percentage: Option<u64>,
    /// Why the migration failed.
    pub error_desc: Option<String>,
    /// Why migration is blocked right now (devices without migration support, ...).
    pub blocked_reasons: Option<Vec<String>>,
}

impl MigrationInfo {
    /// The status, `none` when absent.
    pub fn status(&self) -> MigrationStatus {
        self.status.clone().unwrap_or(MigrationStatus::None)
    }
}

/// Arguments of `migrate-set-parameters` and reply of `query-migrate-parameters`
/// (`MigrateSetParameters` / `MigrationParameters`). Unset fields are not sent; `extra` carries
/// any parameter without a field here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct MigrationParameters {
    /// Maximum downtime in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub downtime_limit: Option<u64>,
    /// Maximum bandwidth in bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_bandwidth: Option<u64>,
    /// Bandwidth in bytes per second assumed for the switchover decision (0: measured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avail_switchover_bandwidth: Option<u64>,
    /// Number of multifd channels.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub multifd_channels: Option<u64>,
    /// Initial throttle percentage (auto-converge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_initial: Option<u64>,
    /// Throttle increment (auto-converge).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_throttle_increment: Option<u64>,
    /// Maximum post-copy bandwidth in bytes per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_postcopy_bandwidth: Option<u64>,
    /// Other parameters, by QAPI name.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, Value>,
}

/// One entry of `migrate-set-capabilities` / `query-migrate-capabilities`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCapabilityStatus {
    /// The capability.
    pub capability: MigrationCapability,
    /// Enabled or not.
    pub state: bool,
}

/// One block backend in the `query-block` reply (`BlockInfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockInfo {
    /// The backend's name (`-drive id=`); empty for a `-blockdev` node used by a device.
    pub device: String,
    /// The device's qdev path or id, when a device uses it.
    #[serde(default)]
    pub qdev: Option<String>,
    /// The medium, absent for an empty drive.
    #[serde(default)]
    pub inserted: Option<BlockDeviceInfo>,
}

/// The medium of a block backend (`BlockDeviceInfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BlockDeviceInfo {
    /// The top image's file name as QEMU opened it.
    pub file: String,
    /// The top node's name (QEMU makes one up, `#blockNNN`, when none was given).
    #[serde(rename = "node-name", default)]
    pub node_name: Option<String>,
    /// Read-only.
    pub ro: bool,
    /// The format driver (`qcow2`, `raw`, ...).
    pub drv: String,
    /// The image's size and format.
    pub image: ImageInfo,
}

/// An image's facts (`ImageInfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The format.
    pub format: String,
    /// The size the guest sees, in bytes.
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
}

qapi_enum! {
    /// A background job's state (`JobStatus`).
    JobStatus {
        /// Created, not started.
        Created = "created",
        /// Running.
        Running = "running",
        /// Paused.
        Paused = "paused",
        /// Ready to complete (mirror, commit).
        Ready = "ready",
        /// Paused while ready.
        Standby = "standby",
        /// Waiting for other jobs of its transaction.
        Waiting = "waiting",
        /// Waiting to be finalized.
        Pending = "pending",
        /// Being cancelled or failing.
        Aborting = "aborting",
        /// Finished (with or without an error), waiting to be dismissed.
        Concluded = "concluded",
        /// Gone.
        Null = "null",
    }
}

/// One background job in the `query-jobs` reply (`JobInfo`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobInfo {
    /// The job's id.
    pub id: String,
    /// What kind of job (`backup`, `create`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    /// Its state.
    pub status: JobStatus,
    /// Progress so far, in the job's own unit (bytes for a backup).
    #[serde(rename = "current-progress", default)]
    pub current_progress: u64,
    /// The progress at completion, as far as known.
    #[serde(rename = "total-progress", default)]
    pub total_progress: u64,
    /// Why the job failed, once concluded.
    #[serde(default)]
    pub error: Option<String>,
}
