//! Typed commands: argument builders and one method per QMP command the other crates use.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::connection::Qmp;
use crate::error::{Error, Result};
use crate::events::{DEVICE_DELETED, Event, EventFilter};
use crate::types::{
    BlockInfo, ChardevReturn, JobInfo, JobStatus, MigrationCapability, MigrationCapabilityStatus,
    MigrationInfo, MigrationParameters, MigrationStatus, PciInfo, StatusInfo, VersionInfo,
};

/// `device_add` arguments: a driver, an id, and any driver properties.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceSpec {
    /// The device model, e.g. `virtio-net-pci`.
    pub driver: String,
    /// The device id (`qdev_id`), used by `device_del`.
    pub id: String,
    /// Driver properties (`netdev`, `memdev`, `bus`, ...).
    #[serde(flatten)]
    pub properties: Map<String, Value>,
}

impl DeviceSpec {
    /// A device of model `driver` named `id`.
    pub fn new(driver: impl Into<String>, id: impl Into<String>) -> Self {
        Self {
            driver: driver.into(),
            id: id.into(),
            properties: Map::new(),
        }
    }

    /// Adds a property.
    pub fn property(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.properties.insert(name.into(), value.into());
        self
    }
}

/// `object-add` arguments: a QOM type, an id, and the type's properties.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObjectSpec {
    /// The QOM type, e.g. `memory-backend-file`.
    #[serde(rename = "qom-type")]
    pub qom_type: String,
    /// The object id.
    pub id: String,
    /// Type properties (`size`, `mem-path`, `share`, ...).
    #[serde(flatten)]
    pub properties: Map<String, Value>,
}

impl ObjectSpec {
    /// An object of type `qom_type` named `id`.
    pub fn new(qom_type: impl Into<String>, id: impl Into<String>) -> Self {
        Self {
            qom_type: qom_type.into(),
            id: id.into(),
            properties: Map::new(),
        }
    }

    /// Adds a property.
    pub fn property(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.properties.insert(name.into(), value.into());
        self
    }
}

/// `netdev_add` arguments: a backend type, an id, and the backend's options.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NetdevSpec {
    /// The backend type, e.g. `user`, `tap`, `socket`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The netdev id, referenced by a NIC's `netdev` property.
    pub id: String,
    /// Backend options.
    #[serde(flatten)]
    pub properties: Map<String, Value>,
}

impl NetdevSpec {
    /// A netdev of type `kind` named `id`.
    pub fn new(kind: impl Into<String>, id: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            id: id.into(),
            properties: Map::new(),
        }
    }

    /// Adds an option.
    pub fn property(mut self, name: impl Into<String>, value: impl Into<Value>) -> Self {
        self.properties.insert(name.into(), value.into());
        self
    }
}

fn to_args(value: &impl Serialize, command: &str) -> Result<Value> {
    serde_json::to_value(value).map_err(|source| Error::Decode {
        command: command.to_owned(),
        source,
    })
}

/// Run state, lifecycle and introspection.
impl Qmp {
    /// `query-status`.
    pub fn query_status(&self) -> Result<StatusInfo> {
        self.call("query-status", None)
    }

    /// `query-version`.
    pub fn query_version(&self) -> Result<VersionInfo> {
        self.call("query-version", None)
    }

    /// `query-pci`.
    pub fn query_pci(&self) -> Result<Vec<PciInfo>> {
        self.call("query-pci", None)
    }

    /// `stop`: pause the vCPUs (emits `STOP`).
    pub fn stop(&self) -> Result<()> {
        self.execute("stop", None).map(drop)
    }

    /// `cont`: resume the vCPUs (emits `RESUME`).
    pub fn cont(&self) -> Result<()> {
        self.execute("cont", None).map(drop)
    }

    /// `quit`: QEMU exits after replying (emits `SHUTDOWN`, then closes the connection).
    pub fn quit(&self) -> Result<()> {
        self.execute("quit", None).map(drop)
    }
}

/// Hotplug: devices, backing objects, network backends and character devices.
impl Qmp {
    /// `device_add`.
    pub fn device_add(&self, device: &DeviceSpec) -> Result<()> {
        self.execute("device_add", Some(to_args(device, "device_add")?))
            .map(drop)
    }

    /// `device_del`: only *requests* the unplug; the guest completes it and QEMU then emits
    /// `DEVICE_DELETED`. See [`Qmp::device_del_and_wait`].
    pub fn device_del(&self, id: &str) -> Result<()> {
        self.execute("device_del", Some(json!({ "id": id })))
            .map(drop)
    }

    /// `device_del`, then waits up to `timeout` for the `DEVICE_DELETED` event naming `id`.
    /// Subscribes before sending, so an event that races the reply is not missed.
    pub fn device_del_and_wait(&self, id: &str, timeout: Duration) -> Result<Event> {
        let mut events = self.subscribe(EventFilter::names(&[DEVICE_DELETED]));
        self.device_del(id)?;
        events.wait_for_event(
            DEVICE_DELETED,
            |e| e.data.get("device").and_then(Value::as_str) == Some(id),
            timeout,
        )
    }

    /// `device_del` of every one of `ids` at once, then waits up to `timeout` until each has its
    /// `DEVICE_DELETED`: the guest ejects them together instead of one after another.
    pub fn device_del_all_and_wait(&self, ids: &[&str], timeout: Duration) -> Result<()> {
        let deadline = std::time::Instant::now() + timeout;
        let mut events = self.subscribe(EventFilter::names(&[DEVICE_DELETED]));
        for id in ids {
            self.device_del(id)?;
        }
        let mut pending: Vec<&str> = ids.to_vec();
        while !pending.is_empty() {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let event = events.wait_for_event(
                DEVICE_DELETED,
                |e| {
                    e.data
                        .get("device")
                        .and_then(Value::as_str)
                        .is_some_and(|d| pending.contains(&d))
                },
                left,
            )?;
            let gone = event.data.get("device").and_then(Value::as_str);
            pending.retain(|id| Some(*id) != gone);
        }
        Ok(())
    }

    /// `object-add`.
    pub fn object_add(&self, object: &ObjectSpec) -> Result<()> {
        self.execute("object-add", Some(to_args(object, "object-add")?))
            .map(drop)
    }

    /// `object-del`.
    pub fn object_del(&self, id: &str) -> Result<()> {
        self.execute("object-del", Some(json!({ "id": id })))
            .map(drop)
    }

    /// `netdev_add`.
    pub fn netdev_add(&self, netdev: &NetdevSpec) -> Result<()> {
        self.execute("netdev_add", Some(to_args(netdev, "netdev_add")?))
            .map(drop)
    }

    /// `netdev_del`.
    pub fn netdev_del(&self, id: &str) -> Result<()> {
        self.execute("netdev_del", Some(json!({ "id": id })))
            .map(drop)
    }

    /// `set_link`: a NIC's link (by device id) or a network backend's, up or down. The guest
    /// sees the carrier change at once; nothing is plugged.
    pub fn set_link(&self, name: &str, up: bool) -> Result<()> {
        self.execute("set_link", Some(json!({ "name": name, "up": up })))
            .map(drop)
    }

    /// `chardev-add` with a `ChardevBackend` object, e.g.
    /// `{"type": "socket", "data": {"addr": {...}, "server": true, "wait": false}}`.
    pub fn chardev_add(&self, id: &str, backend: Value) -> Result<ChardevReturn> {
        self.call("chardev-add", Some(json!({ "id": id, "backend": backend })))
    }

    /// `chardev-remove`.
    pub fn chardev_remove(&self, id: &str) -> Result<()> {
        self.execute("chardev-remove", Some(json!({ "id": id })))
            .map(drop)
    }
}

/// Migration.
impl Qmp {
    /// `migrate` to `uri` (e.g. `tcp:127.0.0.1:4444`). Returns once started; follow it with
    /// [`Qmp::query_migrate`] or [`crate::wait_for_migration`].
    pub fn migrate(&self, uri: &str) -> Result<()> {
        self.execute("migrate", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// `migrate-incoming` on a destination started with `-incoming defer`.
    pub fn migrate_incoming(&self, uri: &str) -> Result<()> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// `migrate-set-capabilities`.
    pub fn migrate_set_capabilities(
        &self,
        capabilities: &[(MigrationCapability, bool)],
    ) -> Result<()> {
        let list: Vec<MigrationCapabilityStatus> = capabilities
            .iter()
            .map(|(capability, state)| MigrationCapabilityStatus {
                capability: capability.clone(),
                state: *state,
            })
            .collect();
        self.execute(
            "migrate-set-capabilities",
            Some(json!({ "capabilities": list })),
        )
        .map(drop)
    }

    /// `query-migrate-capabilities`.
    pub fn query_migrate_capabilities(&self) -> Result<Vec<MigrationCapabilityStatus>> {
        self.call("query-migrate-capabilities", None)
    }

    /// `migrate-set-parameters` (only the fields that are set are sent).
    pub fn migrate_set_parameters(&self, parameters: &MigrationParameters) -> Result<()> {
        let args = to_args(parameters, "migrate-set-parameters")?;
        self.execute("migrate-set-parameters", Some(args)).map(drop)
    }

    /// `query-migrate-parameters`.
    pub fn query_migrate_parameters(&self) -> Result<MigrationParameters> {
        self.call("query-migrate-parameters", None)
    }

    /// `query-migrate`.
    pub fn query_migrate(&self) -> Result<MigrationInfo> {
        self.call("query-migrate", None)
    }

    /// `migrate_cancel`.
    pub fn migrate_cancel(&self) -> Result<()> {
        self.execute("migrate_cancel", None).map(drop)
    }

    /// `migrate-continue` from `state` (normally [`MigrationStatus::PreSwitchover`]).
    pub fn migrate_continue(&self, state: MigrationStatus) -> Result<()> {
        self.execute("migrate-continue", Some(json!({ "state": state })))
            .map(drop)
    }
}

/// Block devices and their background jobs.
impl Qmp {
    /// `query-block`: every block backend and its medium.
    pub fn query_block(&self) -> Result<Vec<BlockInfo>> {
        self.call("query-block", None)
    }

    /// `blockdev-add` of the node `options` describes (its `driver`, `node-name`, ...).
    pub fn blockdev_add(&self, options: Value) -> Result<()> {
        self.execute("blockdev-add", Some(options)).map(drop)
    }

    /// `blockdev-del` of a node no device uses.
    pub fn blockdev_del(&self, node_name: &str) -> Result<()> {
        self.execute("blockdev-del", Some(json!({ "node-name": node_name })))
            .map(drop)
    }

    /// `blockdev-create`: starts the job `job_id` that creates the image `options` describes.
    pub fn blockdev_create(&self, job_id: &str, options: Value) -> Result<()> {
        self.execute(
            "blockdev-create",
            Some(json!({ "job-id": job_id, "options": options })),
        )
        .map(drop)
    }

    /// `blockdev-backup` with `sync: full`: starts the job `job_id` copying the node `device`
    /// as it is at this instant into `target` (copy-before-write keeps the point in time while
    /// the guest goes on writing). The job stays concluded until dismissed, so its error can
    /// be read.
    pub fn blockdev_backup(&self, job_id: &str, device: &str, target: &str) -> Result<()> {
        self.execute(
            "blockdev-backup",
            Some(json!({
                "job-id": job_id, "device": device, "target": target, "sync": "full",
                "auto-dismiss": false,
            })),
        )
        .map(drop)
    }

    /// `query-jobs`.
    pub fn query_jobs(&self) -> Result<Vec<JobInfo>> {
        self.call("query-jobs", None)
    }

    /// `job-cancel`.
    pub fn job_cancel(&self, id: &str) -> Result<()> {
        self.execute("job-cancel", Some(json!({ "id": id })))
            .map(drop)
    }

    /// `job-dismiss` of a concluded job.
    pub fn job_dismiss(&self, id: &str) -> Result<()> {
        self.execute("job-dismiss", Some(json!({ "id": id })))
            .map(drop)
    }

    /// Waits up to `timeout` for the job `id` to conclude, dismisses it and returns how it
    /// ended: `Ok` with its last progress, or [`Error::Job`] with QEMU's reason.
    pub fn wait_job(&self, id: &str, timeout: Duration) -> Result<JobInfo> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let job = self
                .query_jobs()?
                .into_iter()
                .find(|j| j.id == id)
                .ok_or_else(|| Error::Job {
                    id: id.to_owned(),
                    reason: "no such job".into(),
                })?;
            if job.status == JobStatus::Concluded {
                self.job_dismiss(id)?;
                return match job.error {
                    Some(reason) => Err(Error::Job {
                        id: id.to_owned(),
                        reason,
                    }),
                    None => Ok(job),
                };
            }
            if std::time::Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!("job {id}"),
                    after: timeout,
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}
