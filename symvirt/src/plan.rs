//! Migration plans in TOML: reading, and checking with every error located (`LINE:COLUMN`).
//!
//! ```toml
//! [settings]
//! max_parallel = 2            # VMs in pre-copy at once (0: all)
//! max_bandwidth = 1073741824  # bytes/s per migration (optional)
//! [settings.deadlines_ms]     # any phase may be omitted (defaults in cluster::Deadlines)
//! quiesce = 30000
//!
//! [[vm]]
//! name = "vm0"
//! [vm.source]
//! qmp = "unix:/run/ninja/vm0/qmp.sock"        # or tcp:HOST:PORT, ssh:HOST:/PATH
//! channel = "unix:/run/ninja/vm0/symvirt.sock"
//! interconnect = { kind = "infiniband", hca = "mlx5_0", port = 1 }
//! [[vm.source.devices]]                       # detached before, re-attached on rollback
//! kind = "vfio-pci"
//! id = "hca0"
//! host = "0000:3b:00.1"
//! [vm.destination]
//! qmp = "ssh:node7:/run/ninja/vm0/qmp.sock"
//! channel = "ssh:node7:/run/ninja/vm0/symvirt.sock"
//! migrate_uri = "tcp:10.0.0.7:4444"
//! interconnect = { kind = "ethernet", mac = "52:54:00:00:00:07" }
//! launch = { host = "node7", args = ["-machine", "pc", "..."] }   # optional
//! [[vm.destination.devices]]
//! kind = "virtio-net"
//! id = "net0"
//! mac = "52:54:00:00:00:07"
//! ```
//!
//! Device kinds: `vfio-pci` (a real HCA), `hca-standin` (`ivshmem-plain` on a shared memory
//! file, the STAND-IN used where no HCA exists), `virtio-net` (plugged with its backend) and
//! `standby-nic` (a NIC the VM has from boot; only its link is switched, see
//! [`Device::StandbyNic`]).

use crate::cluster::{
    Deadlines, DestinationSpec, Device, LaunchSpec, LibvirtDomain, MigrationSettings, Plan,
    SourceSpec, TlsSettings, VmSpec,
};
use crate::error::{Error, Result};
use crate::protocol::{Interconnect, Validate, is_mac_address};
use crate::remote::{Address, check_migrate_uri, valid_host};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;
use symvirt_proto::addr::Bdf;
use toml::Spanned;

/// One problem in a plan, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanIssue {
    /// 1-based line (0 when the file as a whole is meant).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Which value, e.g. `vm[1].destination.qmp`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for PlanIssue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}:{}: {}", self.line, self.column, self.message)
        } else {
            write!(
                f,
                "{}:{}: {}: {}",
                self.line, self.column, self.path, self.message
            )
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    #[serde(default)]
    // Not spanned: a table made only by its sub-tables (`[settings.tls]` without `[settings]`)
    // has no span the toml crate can give.
    settings: Option<SettingsFile>,
    #[serde(default)]
    vm: Vec<Spanned<VmFile>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct SettingsFile {
    #[serde(default)]
    max_parallel: Option<Spanned<usize>>,
    #[serde(default)]
    max_bandwidth: Option<Spanned<u64>>,
    #[serde(default)]
    downtime_limit_ms: Option<Spanned<u64>>,
    #[serde(default)]
    ssh_program: Option<String>,
    #[serde(default)]
    deadlines_ms: Option<Spanned<BTreeMap<String, Spanned<u64>>>>,
    #[serde(default)]
    tls: Option<Spanned<TlsFile>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TlsFile {
    #[serde(default)]
    creds_dir: Option<Spanned<std::path::PathBuf>>,
    #[serde(default)]
    require: bool,
    #[serde(default)]
    allowed_sources: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct VmFile {
    name: Spanned<String>,
    source: Spanned<SourceFile>,
    destination: Spanned<DestinationFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceFile {
    #[serde(default)]
    qmp: Option<Spanned<String>>,
    #[serde(default)]
    channel: Option<Spanned<String>>,
    #[serde(default)]
    libvirt: Option<Spanned<String>>,
    #[serde(default)]
    domain: Option<Spanned<String>>,
    #[serde(default)]
    migrate_uri: Option<Spanned<String>>,
    interconnect: Spanned<Interconnect>,
    #[serde(default)]
    devices: Vec<Spanned<Device>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DestinationFile {
    #[serde(default)]
    qmp: Option<Spanned<String>>,
    #[serde(default)]
    channel: Option<Spanned<String>>,
    #[serde(default)]
    migrate_uri: Option<Spanned<String>>,
    #[serde(default)]
    libvirt: Option<Spanned<String>>,
    #[serde(default)]
    persistent: Option<Spanned<bool>>,
    #[serde(default)]
    undefine_source: Option<Spanned<bool>>,
    interconnect: Spanned<Interconnect>,
    #[serde(default)]
    launch: Option<Spanned<LaunchSpec>>,
    #[serde(default)]
    devices: Vec<Spanned<Device>>,
}

/// A libvirt connection URI: `DRIVER[+TRANSPORT]://[HOST]/PATH[?PARAMS]` (or `DRIVER:///...`).
fn check_libvirt_uri(uri: &str) -> std::result::Result<(), String> {
    let Some((scheme, _)) = uri.split_once("://") else {
        return Err(format!(
            "{uri:?} is not a libvirt URI (qemu:///system, qemu+ssh://HOST/system, ...)"
        ));
    };
    let valid = |c: char| c.is_ascii_alphanumeric() || c == '+' || c == '-';
    if scheme.is_empty() || !scheme.chars().all(valid) || uri.chars().any(char::is_control) {
        return Err(format!("{uri:?} is not a libvirt URI"));
    }
    Ok(())
}

/// Turns byte offsets into line and column.
struct Locator<'a> {
    text: &'a str,
}

impl Locator<'_> {
    fn at(&self, offset: usize) -> (usize, usize) {
        let before = &self.text[..offset.min(self.text.len())];
        let line = before.matches('\n').count() + 1;
        let column = before.chars().rev().take_while(|&c| c != '\n').count() + 1;
        (line, column)
    }
}

/// Collects issues while the plan is checked.
struct Checker<'a> {
    locator: Locator<'a>,
    issues: Vec<PlanIssue>,
}

impl Checker<'_> {
    fn issue(&mut self, span: Range<usize>, path: impl Into<String>, message: impl Into<String>) {
        let (line, column) = self.locator.at(span.start);
        self.issues.push(PlanIssue {
            line,
            column,
            path: path.into(),
            message: message.into(),
        });
    }

    fn address(&mut self, value: &Spanned<String>, path: &str) -> Option<Address> {
        match value.get_ref().parse::<Address>() {
            Ok(a) => Some(a),
            Err(e) => {
                self.issue(value.span(), path, e);
                None
            }
        }
    }

    fn channel_address(&mut self, value: &Spanned<String>, path: &str) -> Option<Address> {
        let a = self.address(value, path)?;
        if let Address::Local(qmp::Endpoint::Tcp(_) | qmp::Endpoint::Tls(_)) = a {
            self.issue(
                value.span(),
                path,
                "a guest channel is a unix socket (unix: or ssh:), not tcp: or tls:",
            );
            return None;
        }
        Some(a)
    }

    /// A VM given as a libvirt domain: source and destination daemons (both, or neither), no
    /// QMP or channel sockets, no launch (libvirt makes the destination from the source's XML).
    fn libvirt(
        &mut self,
        vm: &VmFile,
        name: &str,
        base: &str,
    ) -> Option<(LibvirtDomain, LibvirtDomain)> {
        let (src, dst) = (vm.source.get_ref(), vm.destination.get_ref());
        let (source, destination) = match (&src.libvirt, &dst.libvirt) {
            (None, None) => {
                for (value, path) in [(&src.domain, "domain"), (&src.migrate_uri, "migrate_uri")] {
                    if let Some(v) = value {
                        self.issue(
                            v.span(),
                            format!("{base}.source.{path}"),
                            "only for a libvirt source (source.libvirt)",
                        );
                    }
                }
                let flags = [
                    (&dst.persistent, "persistent"),
                    (&dst.undefine_source, "undefine_source"),
                ];
                for (value, path) in flags {
                    if let Some(v) = value {
                        self.issue(
                            v.span(),
                            format!("{base}.destination.{path}"),
                            "only for a libvirt destination (destination.libvirt)",
                        );
                    }
                }
                return None;
            }
            (Some(s), Some(d)) => (s, d),
            (Some(s), None) => {
                self.issue(
                    s.span(),
                    format!("{base}.destination.libvirt"),
                    "missing: a libvirt domain moves to another libvirt daemon",
                );
                return None;
            }
            (None, Some(d)) => {
                self.issue(
                    d.span(),
                    format!("{base}.source.libvirt"),
                    "missing: only a libvirt domain moves to a libvirt daemon",
                );
                return None;
            }
        };
        let mut ok = true;
        for (value, path) in [
            (source, "source.libvirt"),
            (destination, "destination.libvirt"),
        ] {
            if let Err(e) = check_libvirt_uri(value.get_ref()) {
                self.issue(value.span(), format!("{base}.{path}"), e);
                ok = false;
            }
        }
        let sockets = [
            (&src.qmp, "source.qmp"),
            (&src.channel, "source.channel"),
            (&dst.qmp, "destination.qmp"),
            (&dst.channel, "destination.channel"),
        ];
        for (value, path) in sockets {
            if let Some(v) = value {
                self.issue(
                    v.span(),
                    format!("{base}.{path}"),
                    "a libvirt domain is reached through libvirt: leave it out",
                );
                ok = false;
            }
        }
        if let Some(l) = &dst.launch {
            self.issue(
                l.span(),
                format!("{base}.destination.launch"),
                "libvirt makes the destination from the source's XML: leave it out",
            );
            ok = false;
        }
        let domain = src.domain.as_ref().map_or(name, |d| d.get_ref().as_str());
        if domain.is_empty() || domain.contains(['\0', '/']) {
            let span = src.domain.as_ref().map_or(vm.name.span(), |d| d.span());
            self.issue(
                span,
                format!("{base}.source.domain"),
                format!("{domain:?} is not a domain name"),
            );
            ok = false;
        }
        for (i, d) in src.devices.iter().chain(&dst.devices).enumerate() {
            if let Err(e) = crate::backend::libvirt_xml::check_device(d.get_ref()) {
                let side = if i < src.devices.len() {
                    "source"
                } else {
                    "destination"
                };
                self.issue(d.span(), format!("{base}.{side}.devices"), e);
                ok = false;
            }
        }
        if let Some(uri) = &src.migrate_uri {
            if let Err(e) = check_migrate_uri(uri.get_ref()) {
                self.issue(uri.span(), format!("{base}.source.migrate_uri"), e);
                ok = false;
            }
        }
        let flag = |v: &Option<Spanned<bool>>| v.as_ref().is_some_and(|b| *b.get_ref());
        ok.then(|| {
            let at = |uri: &Spanned<String>, migrate_uri: &Option<Spanned<String>>| LibvirtDomain {
                uri: uri.get_ref().clone(),
                domain: domain.to_owned(),
                migrate_uri: migrate_uri.as_ref().map(|u| u.get_ref().clone()),
                persistent: false,
                undefine_source: false,
            };
            let there = LibvirtDomain {
                persistent: flag(&dst.persistent),
                undefine_source: flag(&dst.undefine_source),
                ..at(destination, &dst.migrate_uri)
            };
            (at(source, &src.migrate_uri), there)
        })
    }

    /// `[settings.tls]`: a credentials directory QEMU can take (absolute, a path QEMU's option
    /// syntax keeps whole), needed when the plan has a QEMU VM.
    fn tls(&mut self, tls: &Spanned<TlsFile>, vms: &[VmSpec]) -> Option<TlsSettings> {
        let path = "settings.tls.creds_dir";
        let Some(dir) = &tls.get_ref().creds_dir else {
            if vms.iter().any(|v| v.source.libvirt.is_none()) {
                self.issue(tls.span(), path, "missing: QEMU's credentials directory");
                return None;
            }
            // libvirt domains only: their daemons have their own certificates.
            return Some(TlsSettings {
                creds_dir: std::path::PathBuf::new(),
                allowed_sources: Vec::new(),
            });
        };
        let text = dir.get_ref().to_str().unwrap_or(",");
        if !dir.get_ref().is_absolute() || text.contains(',') {
            self.issue(dir.span(), path, "an absolute path without ','");
            return None;
        }
        let allowed_sources = tls.get_ref().allowed_sources.clone();
        if allowed_sources
            .iter()
            .any(|dn| dn.is_empty() || !dn.contains('='))
        {
            self.issue(
                tls.span(),
                "settings.tls.allowed_sources",
                "distinguished names, e.g. \"CN=node1\"",
            );
            return None;
        }
        Some(TlsSettings {
            creds_dir: dir.get_ref().clone(),
            allowed_sources,
        })
    }

    fn interconnect(&mut self, value: &Spanned<Interconnect>, path: &str) {
        if let Err(e) = value.get_ref().validate() {
            self.issue(value.span(), path, e.to_string());
        }
    }

    fn devices(&mut self, devices: &[Spanned<Device>], path: &str) {
        let mut ids: HashMap<String, usize> = HashMap::new();
        for (i, d) in devices.iter().enumerate() {
            let p = format!("{path}[{i}]");
            let dev = d.get_ref();
            if !valid_id(dev.id()) {
                self.issue(
                    d.span(),
                    &p,
                    format!(
                        "device id {:?}: letters, digits, '-', '_' and '.', starting with a letter",
                        dev.id()
                    ),
                );
            }
            if let Some(j) = ids.insert(dev.id().to_owned(), i) {
                self.issue(
                    d.span(),
                    &p,
                    format!("device id {:?} also used by {path}[{j}]", dev.id()),
                );
            }
            match dev {
                Device::VfioPci { host, .. } => {
                    if let Err(e) = host.parse::<Bdf>() {
                        self.issue(d.span(), &p, format!("host: {e}"));
                    }
                }
                Device::HcaStandin { mem_path, size, .. } => {
                    if !mem_path.is_absolute() {
                        self.issue(d.span(), &p, "mem_path must be absolute");
                    }
                    if !size.is_power_of_two() || *size < 4096 {
                        self.issue(
                            d.span(),
                            &p,
                            format!("size {size}: ivshmem needs a power of two of at least 4096"),
                        );
                    }
                }
                Device::StandbyNic { mac, .. } => {
                    if !is_mac_address(mac) {
                        self.issue(
                            d.span(),
                            &p,
                            format!("mac {mac:?} is not lower-case xx:xx:xx:xx:xx:xx"),
                        );
                    }
                }
                Device::VirtioNet { mac, netdev, .. } => {
                    if !is_mac_address(mac) {
                        self.issue(
                            d.span(),
                            &p,
                            format!("mac {mac:?} is not lower-case xx:xx:xx:xx:xx:xx"),
                        );
                    }
                    if let Some(n) = netdev {
                        for key in ["type", "id"] {
                            if !n.get(key).is_some_and(serde_json::Value::is_string) {
                                self.issue(d.span(), &p, format!("netdev needs a string {key:?}"));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// QEMU's largest `downtime-limit`.
const MAX_DOWNTIME_LIMIT_MS: u64 = 2_000_000;

/// Options the destination launcher adds itself (or that would keep QEMU from waiting for the
/// migration on the plan's monitor).
const LAUNCHER_OWNS: [&str; 5] = [
    "-incoming",
    "-qmp",
    "-qmp-pretty",
    "-daemonize",
    "-preconfig",
];

fn valid_id(id: &str) -> bool {
    id.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

const PHASES: [&str; 8] = [
    "connect", "reserve", "quiesce", "detach", "migrate", "attach", "resume", "rollback",
];

/// Parses and checks a plan; `Err(issues)` lists every problem found, located.
pub fn parse(text: &str) -> std::result::Result<Plan, Vec<PlanIssue>> {
    let locator = Locator { text };
    let file: PlanFile = match toml::from_str(text) {
        Ok(f) => f,
        Err(e) => {
            let (line, column) = e.span().map(|s| locator.at(s.start)).unwrap_or((0, 0));
            return Err(vec![PlanIssue {
                line,
                column,
                path: String::new(),
                message: e.message().trim().to_owned(),
            }]);
        }
    };
    let mut c = Checker {
        locator,
        issues: Vec::new(),
    };

    let mut deadlines = Deadlines::default();
    let mut migration = MigrationSettings::default();
    let mut ssh_program = "ssh".to_owned();
    if let Some(s) = &file.settings {
        if let Some(p) = &s.max_parallel {
            migration.max_parallel = *p.get_ref();
        }
        if let Some(b) = &s.max_bandwidth {
            if *b.get_ref() == 0 {
                c.issue(
                    b.span(),
                    "settings.max_bandwidth",
                    "0 bytes/s would never finish",
                );
            }
            migration.max_bandwidth = Some(*b.get_ref());
        }
        if let Some(d) = &s.downtime_limit_ms {
            if *d.get_ref() > MAX_DOWNTIME_LIMIT_MS {
                c.issue(
                    d.span(),
                    "settings.downtime_limit_ms",
                    format!("QEMU accepts at most {MAX_DOWNTIME_LIMIT_MS} ms (2000 s)"),
                );
            }
            migration.downtime_limit_ms = Some(*d.get_ref());
        }
        if let Some(p) = &s.ssh_program {
            ssh_program = p.clone();
        }
        if let Some(map) = &s.deadlines_ms {
            for (phase, ms) in map.get_ref() {
                let path = format!("settings.deadlines_ms.{phase}");
                let d = Duration::from_millis(*ms.get_ref());
                if *ms.get_ref() == 0 {
                    c.issue(ms.span(), &path, "a deadline of 0 ms cannot be met");
                }
                let slot = match phase.as_str() {
                    "connect" => &mut deadlines.connect,
                    "reserve" => &mut deadlines.reserve,
                    "quiesce" => &mut deadlines.quiesce,
                    "detach" => &mut deadlines.detach,
                    "migrate" => &mut deadlines.migrate,
                    "attach" => &mut deadlines.attach,
                    "resume" => &mut deadlines.resume,
                    "rollback" => &mut deadlines.rollback,
                    _ => {
                        c.issue(
                            map.span(),
                            &path,
                            format!("unknown phase; expected one of {}", PHASES.join(", ")),
                        );
                        continue;
                    }
                };
                *slot = d;
            }
        }
    }

    if file.vm.is_empty() {
        c.issue(0..0, "vm", "the plan has no [[vm]]");
    }
    let mut names: HashMap<String, usize> = HashMap::new();
    // Every socket and port the plan names, by identity: no two may be the same.
    let mut taken: HashMap<String, String> = HashMap::new();
    let tls_given = file
        .settings
        .as_ref()
        .and_then(|s| s.tls.as_ref())
        .is_some();
    let mut vms = Vec::new();
    for (i, vm) in file.vm.iter().enumerate() {
        let v = vm.get_ref();
        let base = format!("vm[{i}]");
        let name = v.name.get_ref();
        if !valid_id(name) {
            c.issue(
                v.name.span(),
                format!("{base}.name"),
                format!("{name:?}: letters, digits, '-', '_' and '.', starting with a letter"),
            );
        }
        if let Some(j) = names.insert(name.clone(), i) {
            c.issue(
                v.name.span(),
                format!("{base}.name"),
                format!("{name:?} is also the name of vm[{j}]"),
            );
        }
        let src = v.source.get_ref();
        let dst = v.destination.get_ref();
        let libvirt = c.libvirt(v, name, &base);
        // A libvirt domain has no monitor or channel socket of its own in the plan.
        let unused = || Some(Address::Local(qmp::Endpoint::Unix("libvirt".into())));
        let (sq, sc, dq, dc) = if libvirt.is_some() {
            (unused(), unused(), unused(), unused())
        } else {
            let mut required =
                |value: &Option<Spanned<String>>, span: &Range<usize>, what: &str| {
                    let path = format!("{base}.{what}");
                    match value {
                        Some(v) if what.ends_with("channel") => c.channel_address(v, &path),
                        Some(v) => c.address(v, &path),
                        None => {
                            c.issue(
                                span.clone(),
                                path,
                                "missing (or give source.libvirt and destination.libvirt)",
                            );
                            None
                        }
                    }
                };
            (
                required(&src.qmp, &v.source.span(), "source.qmp"),
                required(&src.channel, &v.source.span(), "source.channel"),
                required(&dst.qmp, &v.destination.span(), "destination.qmp"),
                required(&dst.channel, &v.destination.span(), "destination.channel"),
            )
        };
        match &dst.migrate_uri {
            Some(uri) => {
                if let Err(e) = check_migrate_uri(uri.get_ref()) {
                    c.issue(uri.span(), format!("{base}.destination.migrate_uri"), e);
                }
            }
            None if libvirt.is_none() => c.issue(
                v.destination.span(),
                format!("{base}.destination.migrate_uri"),
                "missing",
            ),
            None => {}
        }
        c.interconnect(&src.interconnect, &format!("{base}.source.interconnect"));
        c.interconnect(
            &dst.interconnect,
            &format!("{base}.destination.interconnect"),
        );
        c.devices(&src.devices, &format!("{base}.source.devices"));
        c.devices(&dst.devices, &format!("{base}.destination.devices"));
        let uri = dst
            .migrate_uri
            .as_ref()
            .and_then(|u| u.get_ref().parse::<Address>().ok());
        for (what, value, address) in [
            ("source.qmp", &src.qmp, &sq),
            ("source.channel", &src.channel, &sc),
            ("destination.qmp", &dst.qmp, &dq),
            ("destination.channel", &dst.channel, &dc),
            ("destination.migrate_uri", &dst.migrate_uri, &uri),
        ] {
            let (Some(value), Some(address)) = (value, address) else {
                continue;
            };
            let here = format!("{base}.{what}");
            match taken.get(&address.identity()) {
                Some(other) => c.issue(
                    value.span(),
                    &here,
                    format!("{} is the same socket as {other}", value.get_ref()),
                ),
                None => {
                    taken.insert(address.identity(), here);
                }
            }
        }
        for (what, value, address) in [
            ("source.qmp", &src.qmp, &sq),
            ("destination.qmp", &dst.qmp, &dq),
        ] {
            let (Some(value), Some(Address::Local(qmp::Endpoint::Tls(_)))) = (value, address)
            else {
                continue;
            };
            if !tls_given {
                c.issue(
                    value.span(),
                    format!("{base}.{what}"),
                    "a tls: monitor needs [settings.tls] (its creds_dir holds the client certificate)",
                );
            }
            if what == "destination.qmp" && dst.launch.is_some() {
                c.issue(
                    value.span(),
                    format!("{base}.{what}"),
                    "a launched destination's monitor is unix: or ssh: (tls: is for a QEMU the site started)",
                );
            }
        }
        if let Interconnect::Ethernet { mac, .. } = dst.interconnect.get_ref() {
            let has_nic = dst
                .devices
                .iter()
                .any(|d| d.get_ref().mac() == Some(mac.as_str()));
            if !has_nic {
                c.issue(
                    dst.interconnect.span(),
                    format!("{base}.destination.interconnect"),
                    format!("no destination virtio-net or standby-nic device has mac {mac}"),
                );
            }
        }
        if let Some(l) = &dst.launch {
            let launch = l.get_ref();
            for arg in &launch.args {
                // QEMU takes `--opt` as `-opt`.
                let option = arg.strip_prefix('-').filter(|a| a.starts_with('-'));
                if let Some(owned) = LAUNCHER_OWNS.iter().find(|o| **o == option.unwrap_or(arg)) {
                    c.issue(
                        l.span(),
                        format!("{base}.destination.launch.args"),
                        format!("{arg}: {owned} is the launcher's own (it waits for the migration on the plan's monitor)"),
                    );
                }
                if arg.contains('\0') {
                    c.issue(
                        l.span(),
                        format!("{base}.destination.launch.args"),
                        format!("{arg:?} holds a NUL"),
                    );
                }
            }
            if launch.program.is_empty() || launch.program.contains('\0') {
                c.issue(
                    l.span(),
                    format!("{base}.destination.launch.program"),
                    format!("{:?} is not a program", launch.program),
                );
            }
            if let Some(host) = launch.host.as_deref().filter(|h| !valid_host(h)) {
                c.issue(
                    l.span(),
                    format!("{base}.destination.launch.host"),
                    format!("bad host {host:?}"),
                );
            }
            if let Some(qmp) = dst.qmp.as_ref().filter(|q| q.get_ref().contains(',')) {
                // QEMU's -qmp option would split the path at the comma.
                c.issue(
                    qmp.span(),
                    format!("{base}.destination.qmp"),
                    "a launched destination's monitor path cannot hold ','",
                );
            }
            if matches!(dq, Some(Address::Ssh { .. })) != launch.host.is_some() {
                c.issue(
                    l.span(),
                    format!("{base}.destination.launch.host"),
                    "a launch host is needed exactly when the destination qmp is ssh:",
                );
            }
        }
        if let (Some(sq), Some(sc), Some(dq), Some(dc)) = (sq, sc, dq, dc) {
            vms.push(VmSpec {
                name: name.clone(),
                source: SourceSpec {
                    qmp: sq,
                    channel: sc,
                    libvirt: libvirt.as_ref().map(|(source, _)| source.clone()),
                    devices: src.devices.iter().map(|d| d.get_ref().clone()).collect(),
                    interconnect: src.interconnect.get_ref().clone(),
                },
                destination: DestinationSpec {
                    qmp: dq,
                    channel: dc,
                    migrate_uri: dst
                        .migrate_uri
                        .as_ref()
                        .map(|u| u.get_ref().clone())
                        .unwrap_or_default(),
                    libvirt: libvirt.map(|(_, destination)| destination),
                    launch: dst.launch.as_ref().map(|l| l.get_ref().clone()),
                    devices: dst.devices.iter().map(|d| d.get_ref().clone()).collect(),
                    interconnect: dst.interconnect.get_ref().clone(),
                },
            });
        }
    }
    let tls_file = file.settings.as_ref().and_then(|s| s.tls.as_ref());
    let tls = tls_file.and_then(|t| c.tls(t, &vms));
    let plan = Plan {
        vms,
        deadlines,
        migration,
        ssh_program,
        tls,
    };
    if let Some(t) = tls_file.filter(|t| t.get_ref().require) {
        // Under `require`, what would cross hosts in clear text is an error.
        for what in plan.cleartext_endpoints() {
            c.issue(
                t.span(),
                "settings.tls.require",
                format!("{what}: not protected"),
            );
        }
    }
    if !c.issues.is_empty() {
        c.issues.sort_by_key(|i| (i.line, i.column));
        return Err(c.issues);
    }
    Ok(plan)
}

/// Reads and checks a plan file; errors name the file.
pub fn load(path: &Path) -> Result<Plan> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(format!("read plan {}", path.display()), e))?;
    parse(&text).map_err(Error::Plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[settings]
max_parallel = 1
max_bandwidth = 1000000
[settings.deadlines_ms]
quiesce = 5000

[[vm]]
name = "vm0"
[vm.source]
qmp = "unix:/run/vm0/qmp.sock"
channel = "unix:/run/vm0/sv.sock"
interconnect = { kind = "infiniband", hca = "mlx5_0", port = 1 }
[[vm.source.devices]]
kind = "hca-standin"
id = "hca0"
mem_path = "/dev/shm/vm0-hca0"
size = 1048576
[vm.destination]
qmp = "ssh:node7:/run/vm0/qmp.sock"
channel = "ssh:node7:/run/vm0/sv.sock"
migrate_uri = "tcp:10.0.0.7:4444"
interconnect = { kind = "ethernet", mac = "52:54:00:00:00:07" }
launch = { host = "node7", args = ["-machine", "pc"] }
[[vm.destination.devices]]
kind = "virtio-net"
id = "net0"
mac = "52:54:00:00:00:07"
netdev = { type = "user", id = "n0" }

[[vm]]
name = "vm1"
[vm.source]
qmp = "tcp:127.0.0.1:5555"
channel = "unix:/run/vm1/sv.sock"
interconnect = { kind = "ethernet", mac = "52:54:00:00:00:08" }
[vm.destination]
qmp = "unix:/run/vm1d/qmp.sock"
channel = "unix:/run/vm1d/sv.sock"
migrate_uri = "unix:/run/vm1d/mig.sock"
interconnect = { kind = "infiniband", hca = "mlx5_1", port = 1 }
[[vm.destination.devices]]
kind = "vfio-pci"
id = "hca1"
host = "0000:3b:00.2"
"#;

    #[test]
    fn a_run_with_another_number_of_backends_than_vms_is_refused() {
        let events = std::sync::atomic::AtomicUsize::new(0);
        let sink = |_: &crate::controller::Event| {
            events.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        };
        let controller = crate::controller::Controller::new(parse(GOOD).unwrap(), &sink);
        let e = controller.run(Vec::new()).unwrap_err().to_string();
        assert!(e.contains("0 backends for the plan's 2 VMs"), "{e}");
        assert_eq!(events.into_inner(), 0, "nothing may start");
    }

    #[test]
    fn a_good_plan_reads_into_the_cluster_model() {
        let plan = parse(GOOD).unwrap();
        assert_eq!(plan.vms.len(), 2);
        assert_eq!(plan.migration.max_parallel, 1);
        assert_eq!(plan.migration.max_bandwidth, Some(1_000_000));
        assert_eq!(plan.deadlines.quiesce, Duration::from_secs(5));
        assert_eq!(plan.deadlines.detach, Deadlines::default().detach);
        let vm0 = &plan.vms[0];
        assert_eq!(
            vm0.destination.qmp,
            Address::Ssh {
                host: "node7".into(),
                path: "/run/vm0/qmp.sock".into()
            }
        );
        assert_eq!(
            vm0.source.devices[0].backend_object_id().unwrap(),
            "hca0-mem"
        );
        assert_eq!(vm0.destination.devices[0].netdev_id().unwrap(), "n0");
        assert!(matches!(
            plan.vms[1].destination.devices[0],
            Device::VfioPci { ref host, .. } if host == "0000:3b:00.2"
        ));
        assert_eq!(
            plan.vms[1].source.qmp,
            Address::Local(qmp::Endpoint::Tcp("127.0.0.1:5555".into()))
        );
    }

    #[test]
    fn every_error_is_reported_with_its_line() {
        let bad = GOOD
            .replace("name = \"vm1\"", "name = \"vm0\"")
            .replace("tcp:10.0.0.7:4444", "tcp:10.0.0.7")
            .replace("size = 1048576", "size = 1000")
            .replace("host = \"0000:3b:00.2\"", "host = \"0000:3b:00.9\"")
            .replace(
                "channel = \"unix:/run/vm1/sv.sock\"",
                "channel = \"tcp:h:1\"",
            )
            .replace("quiesce = 5000", "quiesce = 0\nfrobnicate = 3");
        let issues = parse(&bad).unwrap_err();
        let text: Vec<String> = issues.iter().map(ToString::to_string).collect();
        let line_of = |needle: &str| {
            bad.lines()
                .position(|l| l.contains(needle))
                .map(|n| n + 1)
                .unwrap()
        };
        let expect = [
            ("vm[1].name", line_of("name = \"vm0\"")),
            ("vm[0].destination.migrate_uri", line_of("tcp:10.0.0.7\"")),
            // A device is located at its `[[...devices]]` header, the line before its kind.
            (
                "vm[0].source.devices[0]",
                line_of("kind = \"hca-standin\"") - 1,
            ),
            (
                "vm[1].destination.devices[0]",
                line_of("kind = \"vfio-pci\"") - 1,
            ),
            ("vm[1].source.channel", line_of("tcp:h:1")),
            ("settings.deadlines_ms.quiesce", line_of("quiesce = 0")),
            ("settings.deadlines_ms.frobnicate", 0),
        ];
        for (path, line) in expect {
            let found = issues.iter().find(|i| i.path == path);
            let Some(found) = found else {
                panic!("no issue for {path}: {text:#?}");
            };
            // The duplicate name is reported on the second VM's name line.
            if path == "vm[1].name" {
                assert!(found.line > line_of("name = \"vm0\""), "{found}");
            } else if line > 0 {
                assert_eq!(found.line, line, "{found}");
            }
        }
        assert!(issues.len() >= expect.len(), "{text:#?}");
    }

    #[test]
    fn syntax_and_unknown_fields_are_located() {
        let issues = parse("[[vm]]\nname = \"a\"\nsourze = 1\n").unwrap_err();
        assert_eq!(issues.len(), 1);
        assert_eq!(issues[0].line, 3, "{}", issues[0]);
        assert!(issues[0].message.contains("sourze"), "{}", issues[0]);
        let issues = parse("[settings\n").unwrap_err();
        assert_eq!(issues[0].line, 1, "{}", issues[0]);
        let issues = parse("").unwrap_err();
        assert!(issues[0].message.contains("no [[vm]]"));
    }

    #[test]
    fn shared_endpoints_and_missing_nic_are_refused() {
        let bad = GOOD
            .replace("unix:/run/vm1d/mig.sock", "tcp:10.0.0.7:4444")
            .replace(
                "id = \"net0\"\nmac = \"52:54:00:00:00:07\"",
                "id = \"net0\"\nmac = \"52:54:00:00:00:09\"",
            );
        let issues = parse(&bad).unwrap_err();
        let text: Vec<String> = issues.iter().map(ToString::to_string).collect();
        assert!(
            text.iter()
                .any(|t| t.contains("vm[1].destination.migrate_uri")
                    && t.contains("the same socket as vm[0].destination.migrate_uri")),
            "{text:#?}"
        );
        assert!(
            text.iter()
                .any(|t| t.contains("no destination virtio-net or standby-nic device has mac")),
            "{text:#?}"
        );
    }

    #[test]
    fn a_standby_nic_is_a_destination_nic_with_its_mac_checked_and_nothing_else() {
        let standby = GOOD.replace(
            "kind = \"virtio-net\"\nid = \"net0\"\nmac = \"52:54:00:00:00:07\"\nnetdev = { type = \"user\", id = \"n0\" }",
            "kind = \"standby-nic\"\nid = \"net0\"\nmac = \"52:54:00:00:00:07\"",
        );
        assert_ne!(standby, GOOD);
        let plan = parse(&standby).unwrap();
        let nic = &plan.vms[0].destination.devices[0];
        assert!(nic.is_standby());
        assert_eq!(nic.mac(), Some("52:54:00:00:00:07"));
        assert_eq!(nic.netdev_id(), None);
        // Its backend is on each host's command line, not in the plan.
        let issues = issues_of(&standby.replace(
            "mac = \"52:54:00:00:00:07\"\n\n",
            "mac = \"52:54:00:00:00:07\"\nnetdev = { type = \"user\", id = \"n0\" }\n\n",
        ));
        assert!(issues.iter().any(|t| t.contains("netdev")), "{issues:#?}");
        let issues = issues_of(&standby.replace(
            "id = \"net0\"\nmac = \"52:54:00:00:00:07\"",
            "id = \"net0\"\nmac = \"52:54:00:00:00:0G\"",
        ));
        assert!(
            has(&issues, "vm[0].destination.devices[0]", "is not lower-case"),
            "{issues:#?}"
        );
    }

    /// The issues `parse` finds in `text`, as text.
    fn issues_of(text: &str) -> Vec<String> {
        parse(text)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    fn has(issues: &[String], path: &str, words: &str) -> bool {
        issues
            .iter()
            .any(|t| t.contains(&format!("{path}: ")) && t.contains(words))
    }

    #[test]
    fn aliases_of_one_socket_are_refused() {
        // Two spellings of one path; one channel for source and destination; one port by two
        // names of this host; user@host against host.
        let bad = GOOD
            .replace("unix:/run/vm1d/qmp.sock", "unix:/run//vm0/./sv.sock")
            .replace("unix:/run/vm1d/sv.sock", "unix:/run/vm1/sv.sock")
            .replace("unix:/run/vm1d/mig.sock", "tcp:localhost:5555")
            .replace(
                "ssh:node7:/run/vm0/sv.sock",
                "ssh:root@NODE7:/run/vm0/qmp.sock",
            );
        let issues = issues_of(&bad);
        for (path, other) in [
            ("vm[1].destination.qmp", "vm[0].source.channel"),
            ("vm[1].destination.channel", "vm[1].source.channel"),
            ("vm[1].destination.migrate_uri", "vm[1].source.qmp"),
            ("vm[0].destination.channel", "vm[0].destination.qmp"),
        ] {
            assert!(
                has(&issues, path, &format!("the same socket as {other}")),
                "{path}: {issues:#?}"
            );
        }
    }

    #[test]
    fn a_symlinked_directory_is_the_same_socket() {
        let dir = std::env::temp_dir().join(format!("plan-alias-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("real")).unwrap();
        std::os::unix::fs::symlink(dir.join("real"), dir.join("link")).unwrap();
        // A symlink to the socket itself, where the socket exists.
        std::fs::write(dir.join("real/live.sock"), "").unwrap();
        std::os::unix::fs::symlink(dir.join("real/live.sock"), dir.join("alias.sock")).unwrap();
        let bad = GOOD
            .replace(
                "unix:/run/vm1d/qmp.sock",
                &format!("unix:{}/real/q.sock", dir.display()),
            )
            .replace(
                "unix:/run/vm1d/sv.sock",
                &format!("unix:{}/link/q.sock", dir.display()),
            )
            .replace(
                "unix:/run/vm1/sv.sock",
                &format!("unix:{}/real/live.sock", dir.display()),
            )
            .replace(
                "unix:/run/vm1d/mig.sock",
                &format!("unix:{}/alias.sock", dir.display()),
            );
        let issues = issues_of(&bad);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            has(
                &issues,
                "vm[1].destination.channel",
                "the same socket as vm[1].destination.qmp"
            ),
            "{issues:#?}"
        );
        assert!(
            has(
                &issues,
                "vm[1].destination.migrate_uri",
                "the same socket as vm[1].source.channel"
            ),
            "{issues:#?}"
        );
    }

    #[test]
    fn paths_names_and_numbers_outside_what_sockets_and_qemu_take_are_refused() {
        let long = format!("unix:/{}", "x".repeat(10 << 20));
        let bad = GOOD
            .replace("unix:/run/vm1d/qmp.sock", &long)
            .replace("unix:/run/vm1d/sv.sock", "unix:/run/vm1d/s\\u0000v.sock")
            .replace("unix:/run/vm1d/mig.sock", "unix:/run/../vm1d/mig.sock")
            .replace("max_bandwidth = 1000000", "max_bandwidth = 1000000\ndowntime_limit_ms = 9200000000000000000")
            .replace(
                "args = [\"-machine\", \"pc\"]",
                "args = [\"-machine\", \"pc\", \"--incoming\", \"tcp:0:1\", \"-daemonize\"], program = \"\"",
            )
            .replace("launch = { host = \"node7\"", "launch = { host = \"-oProxyCommand=x\"");
        let issues = issues_of(&bad);
        for (path, words) in [
            (
                "vm[1].destination.qmp",
                "a unix socket path holds at most 107",
            ),
            ("vm[1].destination.channel", "control character"),
            ("vm[1].destination.migrate_uri", "holds '..'"),
            ("settings.downtime_limit_ms", "at most 2000000 ms"),
            (
                "vm[0].destination.launch.args",
                "--incoming: -incoming is the launcher's own",
            ),
            (
                "vm[0].destination.launch.args",
                "-daemonize: -daemonize is the launcher's own",
            ),
            ("vm[0].destination.launch.program", "is not a program"),
            ("vm[0].destination.launch.host", "bad host"),
        ] {
            assert!(has(&issues, path, words), "{path}: {words}: {issues:#?}");
        }
        // The 10 MB path is not echoed back whole.
        assert!(issues.iter().all(|t| t.len() < 1000), "{issues:#?}");
    }

    const LIBVIRT: &str = r#"
[[vm]]
name = "vm0"
[vm.source]
libvirt = "qemu+ssh://node1/system"
domain = "job7-vm0"
migrate_uri = "tcp:10.0.0.1:49152"
interconnect = { kind = "infiniband", hca = "mlx5_0", port = 1 }
[[vm.source.devices]]
kind = "vfio-pci"
id = "hca0"
host = "0000:3b:00.1"
[vm.destination]
libvirt = "qemu+ssh://node7/system"
migrate_uri = "tcp:10.0.0.7:49152"
persistent = true
interconnect = { kind = "ethernet", mac = "52:54:00:00:00:07" }
[[vm.destination.devices]]
kind = "virtio-net"
id = "net0"
mac = "52:54:00:00:00:07"
"#;

    #[test]
    fn a_libvirt_domain_is_named_by_daemon_uri_and_domain() {
        let plan = parse(LIBVIRT).unwrap();
        let vm = &plan.vms[0];
        assert_eq!(
            vm.source.libvirt,
            Some(LibvirtDomain {
                uri: "qemu+ssh://node1/system".into(),
                domain: "job7-vm0".into(),
                migrate_uri: Some("tcp:10.0.0.1:49152".into()),
                persistent: false,
                undefine_source: false,
            })
        );
        let destination = vm.destination.libvirt.as_ref().unwrap();
        assert_eq!(destination.uri, "qemu+ssh://node7/system");
        // The destination domain keeps the source's name.
        assert_eq!(destination.domain, "job7-vm0");
        assert_eq!(
            destination.migrate_uri.as_deref(),
            Some("tcp:10.0.0.7:49152")
        );
        // Without `domain`, the VM's name is the domain's.
        let plain = parse(&LIBVIRT.replace("domain = \"job7-vm0\"\n", "")).unwrap();
        assert_eq!(plain.vms[0].source.libvirt.as_ref().unwrap().domain, "vm0");
    }

    #[test]
    fn a_libvirt_plan_with_what_libvirt_does_not_take_is_refused() {
        let sockets = issues_of(&LIBVIRT.replace(
            "migrate_uri = \"tcp:10.0.0.1:49152\"",
            "qmp = \"unix:/run/vm0/qmp.sock\"",
        ));
        assert!(
            has(&sockets, "vm[0].source.qmp", "leave it out"),
            "{sockets:?}"
        );
        let one_sided = issues_of(&LIBVIRT.replace("libvirt = \"qemu+ssh://node7/system\"\n", ""));
        assert!(
            has(&one_sided, "vm[0].destination.libvirt", "missing"),
            "{one_sided:?}"
        );
        let bad_uri = issues_of(&LIBVIRT.replace("qemu+ssh://node7/system", "node7"));
        assert!(
            has(&bad_uri, "vm[0].destination.libvirt", "not a libvirt URI"),
            "{bad_uri:?}"
        );
        let options = issues_of(&LIBVIRT.replace(
            "host = \"0000:3b:00.1\"",
            "host = \"0000:3b:00.1\"\nproperties = { addr = \"5\" }",
        ));
        assert!(
            has(&options, "vm[0].source.devices", "properties"),
            "{options:?}"
        );
        // A standby NIC is the domain's own: its link is switched.
        parse(&LIBVIRT.replace("kind = \"virtio-net\"", "kind = \"standby-nic\"")).unwrap();
        // A QEMU VM still needs its sockets.
        let qemu = issues_of(
            &LIBVIRT
                .replace("libvirt = \"qemu+ssh://node1/system\"\n", "")
                .replace("libvirt = \"qemu+ssh://node7/system\"\n", ""),
        );
        assert!(has(&qemu, "vm[0].source.qmp", "missing"), "{qemu:?}");
        assert!(
            has(&qemu, "vm[0].source.domain", "only for a libvirt source"),
            "{qemu:?}"
        );
    }

    #[test]
    fn tls_monitors_need_the_plans_credentials_and_are_not_cleartext() {
        let tcp = GOOD.replace(
            "qmp = \"tcp:127.0.0.1:5555\"",
            "qmp = \"tcp:10.0.0.9:5555\"",
        );
        assert!(
            parse(&tcp)
                .unwrap()
                .cleartext_endpoints()
                .iter()
                .any(|c| c.contains("source.qmp tcp:10.0.0.9:5555")),
        );
        let tls = GOOD.replace(
            "qmp = \"tcp:127.0.0.1:5555\"",
            "qmp = \"tls:10.0.0.9:5555\"",
        );
        let issues = issues_of(&tls);
        assert!(
            has(&issues, "vm[1].source.qmp", "[settings.tls]"),
            "{issues:?}"
        );
        let with_tls = tls.replace(
            "[settings.deadlines_ms]",
            "[settings.tls]\ncreds_dir = \"/etc/ninja/pki\"\n[settings.deadlines_ms]",
        );
        let plan = parse(&with_tls).unwrap();
        assert_eq!(
            plan.vms[1].source.qmp,
            Address::Local(qmp::Endpoint::Tls("10.0.0.9:5555".into()))
        );
        assert!(
            !plan
                .cleartext_endpoints()
                .iter()
                .any(|c| c.contains("5555")),
            "{:?}",
            plan.cleartext_endpoints()
        );
        // A destination the plan launches gets its monitor where the launcher puts it.
        let launched = with_tls.replace(
            "qmp = \"ssh:node7:/run/vm0/qmp.sock\"",
            "qmp = \"tls:10.0.0.7:5556\"",
        );
        let issues = issues_of(&launched);
        assert!(
            has(&issues, "vm[0].destination.qmp", "launched destination"),
            "{issues:?}"
        );
        // Nor is a guest channel TLS.
        let channel = with_tls.replace(
            "channel = \"unix:/run/vm0/sv.sock\"",
            "channel = \"tls:10.0.0.9:5557\"",
        );
        assert!(has(&issues_of(&channel), "vm[0].source.channel", "tls:"));
    }

    #[test]
    fn cleartext_between_hosts_is_listed_and_refused_under_require() {
        let plan = parse(GOOD).unwrap();
        let clear = plan.cleartext_endpoints();
        assert!(
            clear
                .iter()
                .any(|c| c.contains("destination.migrate_uri tcp:10.0.0.7:4444")),
            "{clear:?}"
        );
        // ssh: and unix: endpoints, loopback TCP: not listed.
        assert!(
            !clear
                .iter()
                .any(|c| c.contains("ssh:") || c.contains("unix:")),
            "{clear:?}"
        );
        let with_tls = GOOD.replace(
            "[settings.deadlines_ms]",
            "[settings.tls]\ncreds_dir = \"/etc/ninja/pki\"\n[settings.deadlines_ms]",
        );
        let plan = parse(&with_tls).unwrap();
        assert_eq!(
            plan.tls.as_ref().unwrap().creds_dir,
            Path::new("/etc/ninja/pki")
        );
        assert!(plan.tls.as_ref().unwrap().allowed_sources.is_empty());
        let authz = with_tls.replace(
            "creds_dir = ",
            "allowed_sources = [\"CN=node1\", \"CN=node2,O=Site\"]\ncreds_dir = ",
        );
        let allowed = parse(&authz).unwrap().tls.unwrap().allowed_sources;
        assert_eq!(allowed, ["CN=node1", "CN=node2,O=Site"]);
        let bad = issues_of(&with_tls.replace(
            "creds_dir = ",
            "allowed_sources = [\"node1\"]\ncreds_dir = ",
        ));
        assert!(
            has(&bad, "settings.tls.allowed_sources", "distinguished"),
            "{bad:?}"
        );
        assert!(
            !plan
                .cleartext_endpoints()
                .iter()
                .any(|c| c.contains("migrate_uri")),
            "{:?}",
            plan.cleartext_endpoints()
        );
        let required = GOOD.replace(
            "[settings.deadlines_ms]",
            "[settings.tls]\nrequire = true\ncreds_dir = \"pki\"\n[settings.deadlines_ms]",
        );
        let issues = issues_of(&required);
        assert!(
            has(&issues, "settings.tls.creds_dir", "absolute"),
            "{issues:?}"
        );
        assert!(
            has(&issues, "settings.tls.require", "not protected"),
            "{issues:?}"
        );
        // Libvirt domains only: the daemons have their certificates; TLS needs no directory.
        let libvirt = LIBVIRT.replacen(
            "[[vm]]",
            "[settings]\n[settings.tls]\nrequire = true\n\n[[vm]]",
            1,
        );
        let plan = parse(&libvirt).unwrap();
        assert!(plan.tls.is_some() && plan.cleartext_endpoints().is_empty());
        let plain = parse(LIBVIRT).unwrap();
        assert_eq!(
            plain.cleartext_endpoints().len(),
            1,
            "{:?}",
            plain.cleartext_endpoints()
        );
    }
}
