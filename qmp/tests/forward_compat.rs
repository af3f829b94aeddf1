//! Forward compatibility and wire shapes: what a newer QEMU may send (unknown enum values,
//! unknown events, extra or missing fields) must decode, and what we send must have QAPI's
//! field names.

use qmp::types::{MigrationCapabilityStatus, PciInfo, ShutdownCause};
use qmp::{
    DeviceSpec, Event, EventKind, MigrationCapability, MigrationInfo, MigrationParameters,
    MigrationStatus, NetdevSpec, ObjectSpec, RunState, StatusInfo, VersionInfo,
};
use serde_json::{Value, json};

fn event(name: &str, data: Value) -> Event {
    Event {
        name: name.into(),
        data,
        timestamp: None,
    }
}

#[test]
fn migration_info_accepts_unknown_status_and_extra_fields() {
    let info: MigrationInfo = serde_json::from_value(json!({
        "status": "postcopy-teleport",
        "vfio": {"transferred": 0},
        "ram": {"transferred": 5, "total": 10, "remaining": 5, "mbps": 1.5, "brand-new": 7},
        "dirty-limit-throttle-time-per-round": 3,
        "downtime": 10
    }))
    .unwrap();
    assert_eq!(
        info.status(),
        MigrationStatus::Other("postcopy-teleport".into())
    );
    assert!(!info.status().is_terminal());
    let ram = info.ram.unwrap();
    assert_eq!((ram.transferred, ram.total, ram.remaining), (5, 10, 5));
    // Fields the reply left out default to zero.
    assert_eq!(ram.dirty_sync_count, 0);
    assert_eq!(info.downtime, Some(10));
}

#[test]
fn migration_info_before_any_migration_is_status_none() {
    let info: MigrationInfo = serde_json::from_value(json!({})).unwrap();
    assert_eq!(info.status(), MigrationStatus::None);
    assert_eq!(info.ram, None);
    let blocked: MigrationInfo =
        serde_json::from_value(json!({"blocked-reasons": ["device x"], "error-desc": "e"}))
            .unwrap();
    assert_eq!(blocked.blocked_reasons.unwrap(), ["device x"]);
    assert_eq!(blocked.error_desc.as_deref(), Some("e"));
}

#[test]
fn status_info_accepts_unknown_run_state_and_removed_fields() {
    let s: StatusInfo =
        serde_json::from_value(json!({"running": false, "status": "hibernating", "x": 1})).unwrap();
    assert_eq!(s.status, RunState::Other("hibernating".into()));
    // QEMU 7.2 still sent "singlestep"; 10.x does not. Either decodes.
    let old: StatusInfo =
        serde_json::from_value(json!({"running": true, "singlestep": false, "status": "running"}))
            .unwrap();
    assert_eq!(old.status, RunState::Running);
}

#[test]
fn version_and_pci_accept_extra_fields() {
    let v: VersionInfo = serde_json::from_value(json!({
        "qemu": {"major": 11, "minor": 2, "micro": 0, "nano": 9}, "package": "", "build": "x"
    }))
    .unwrap();
    assert_eq!(v.qemu.major, 11);
    let pci: Vec<PciInfo> = serde_json::from_value(json!([{"bus": 0, "devices": [{
        "bus": 0, "slot": 3, "function": 0, "irq_pin": 1, "irq": 11, "qdev_id": "n0",
        "class_info": {"class": 512, "desc": "Ethernet controller"},
        "id": {"device": 4096, "vendor": 6900, "subsystem": 1, "subsystem-vendor": 6900},
        "regions": [{"bar": 0, "type": "io", "address": -1, "size": 32}],
        "future": true
    }]}]))
    .unwrap();
    assert_eq!(pci[0].devices[0].qdev_id, "n0");
    assert_eq!(pci[0].devices[0].id.subsystem_vendor, Some(6900));
}

#[test]
fn unknown_and_malformed_events_become_other() {
    let unknown = event(
        "VFIO_MIGRATION",
        json!({"device": "hca0", "state": "stop-copy"}),
    );
    assert_eq!(
        unknown.kind(),
        EventKind::Other {
            name: "VFIO_MIGRATION".into(),
            data: unknown.data.clone()
        }
    );
    // A known event whose data changed shape beyond recognition is not an error either.
    let odd = event("MIGRATION_PASS", json!({"pass": "seven"}));
    assert!(matches!(odd.kind(), EventKind::Other { .. }));
}

#[test]
fn known_events_are_typed_with_unknown_values_kept() {
    assert_eq!(
        event("MIGRATION", json!({"status": "pre-switchover"})).kind(),
        EventKind::Migration {
            status: MigrationStatus::PreSwitchover
        }
    );
    assert_eq!(
        event("MIGRATION", json!({"status": "warp"})).kind(),
        EventKind::Migration {
            status: MigrationStatus::Other("warp".into())
        }
    );
    assert_eq!(
        event("MIGRATION_PASS", json!({"pass": 3})).kind(),
        EventKind::MigrationPass { pass: 3 }
    );
    assert_eq!(
        event(
            "DEVICE_DELETED",
            json!({"path": "/machine/peripheral-anon/device[0]/virtio-backend"})
        )
        .kind(),
        EventKind::DeviceDeleted {
            device: None,
            path: "/machine/peripheral-anon/device[0]/virtio-backend".into()
        }
    );
    assert_eq!(
        event(
            "SHUTDOWN",
            json!({"guest": true, "reason": "guest-hibernate"})
        )
        .kind(),
        EventKind::Shutdown {
            guest: true,
            reason: ShutdownCause::Other("guest-hibernate".into())
        }
    );
    assert_eq!(event("STOP", Value::Null).kind(), EventKind::Stop);
    assert_eq!(event("RESUME", json!({"new": 1})).kind(), EventKind::Resume);
}

#[test]
fn enums_round_trip_their_qapi_names() {
    for status in ["active", "pre-switchover", "wait-unplug", "something-new"] {
        let parsed: MigrationStatus = serde_json::from_value(json!(status)).unwrap();
        assert_eq!(serde_json::to_value(&parsed).unwrap(), json!(status));
    }
    assert_eq!(
        MigrationStatus::from("postcopy-recover-setup"),
        MigrationStatus::PostcopyRecoverSetup
    );
    assert_eq!(RunState::from("inmigrate").to_string(), "inmigrate");
}

#[test]
fn command_arguments_use_qapi_field_names() {
    let device = DeviceSpec::new("virtio-net-pci", "n0").property("netdev", "net0");
    assert_eq!(
        serde_json::to_value(&device).unwrap(),
        json!({"driver": "virtio-net-pci", "id": "n0", "netdev": "net0"})
    );
    let object = ObjectSpec::new("memory-backend-file", "m0").property("share", true);
    assert_eq!(
        serde_json::to_value(&object).unwrap(),
        json!({"qom-type": "memory-backend-file", "id": "m0", "share": true})
    );
    let netdev = NetdevSpec::new("user", "net0");
    assert_eq!(
        serde_json::to_value(&netdev).unwrap(),
        json!({"type": "user", "id": "net0"})
    );
    let cap = MigrationCapabilityStatus {
        capability: MigrationCapability::PauseBeforeSwitchover,
        state: true,
    };
    assert_eq!(
        serde_json::to_value(&cap).unwrap(),
        json!({"capability": "pause-before-switchover", "state": true})
    );
    let mut params = MigrationParameters {
        downtime_limit: Some(30),
        multifd_channels: Some(4),
        ..MigrationParameters::default()
    };
    params.extra.insert("x-new-knob".into(), json!(1));
    assert_eq!(
        serde_json::to_value(&params).unwrap(),
        json!({"downtime-limit": 30, "multifd-channels": 4, "x-new-knob": 1})
    );
}

#[test]
fn migration_parameters_reply_keeps_unknown_parameters() {
    let params: MigrationParameters = serde_json::from_value(json!({
        "downtime-limit": 300, "max-bandwidth": 134217728, "tls-creds": "", "zero-page-detection": "multifd"
    }))
    .unwrap();
    assert_eq!(params.downtime_limit, Some(300));
    assert_eq!(params.extra["zero-page-detection"], "multifd");
}
