//! Running plans in the controller tests: parse a plan's text, run it on its VMs' backends with
//! every event logged to stderr and kept, and the interconnects the plans name.
#![allow(dead_code)]

use std::path::Path;
use std::sync::Mutex;
use symvirt::controller::{Controller, Event, Report};
use symvirt::protocol::Interconnect;

/// Runs `plan` (destination QEMUs log into `log_dir`), calling `on_event` on every event as it
/// comes; returns the report and the events.
pub fn run(plan: &str, log_dir: &Path, on_event: impl Fn(&Event) + Sync) -> (Report, Vec<Event>) {
    let plan = match symvirt::plan::parse(plan) {
        Ok(p) => p,
        Err(issues) => panic!("plan: {issues:#?}\n{plan}"),
    };
    let events = Mutex::new(Vec::new());
    let sink = |e: &Event| {
        eprintln!("event: {}", serde_json::to_string(e).unwrap());
        on_event(e);
        events.lock().unwrap().push(e.clone());
    };
    let report = Controller::new(plan, &sink).run_qemu(log_dir).unwrap();
    eprintln!("report: {report:#?}");
    (report, events.into_inner().unwrap())
}

/// The stand-in HCA's interconnect, as a plan writes it.
pub fn ib() -> &'static str {
    r#"{ kind = "infiniband", hca = "hca0", port = 1 }"#
}

/// Ethernet on the NIC with `mac`, as a plan writes it.
pub fn eth(mac: &str) -> String {
    format!("{{ kind = \"ethernet\", mac = \"{mac}\" }}")
}

/// [`eth`] as the guest confirms it.
pub fn ethernet(mac: &str) -> Interconnect {
    Interconnect::Ethernet {
        mac: mac.into(),
        iface: None,
        pci: None,
    }
}

/// [`ib`] as the guest confirms it.
pub fn infiniband() -> Interconnect {
    Interconnect::Infiniband {
        hca: "hca0".into(),
        port: 1,
        pci: None,
    }
}
