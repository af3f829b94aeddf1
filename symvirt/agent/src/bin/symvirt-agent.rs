//! `symvirt-agent`: the SymVirt guest agent (a static binary for the guest's initramfs).
//!
//! ```text
//! symvirt-agent [--channel virtio:NAME|unix:PATH|listen:PATH|/dev/PATH] [--socket PATH] [--ranks N]
//!               [--vm NAME] [--report-pci] [--interconnect-wait-ms MS] [--data-address CIDR]
//!               [--stale-epoch-ms MS]
//! ```
//!
//! `symvirt-agent route-data --data-address ADDR/PREFIX --mac MAC` routes the data subnet through
//! the NIC with that MAC once (waiting up to 20 s for it to appear) and exits: what a site runs
//! when it first gives a VM its fabric NIC.
//!
//! `--data-address ADDR/PREFIX`: the VM's data address (on a dummy interface); on every resume
//! the data subnet is routed through the new fabric's NIC before the ranks go on
//! (`symvirt_agent::data_net`).
//! `--interconnect-wait-ms`: how long `resume` waits for the guest to see the new
//! interconnect before reporting `failed` (default 20000; 0 passes it on unchecked).
//! `--stale-epoch-ms`: how long an epoch may stay in progress with no host connected before the
//! agent gives it up, releases its ranks and reports `failed` to the next host (default 300000;
//! 0: never; `symvirt_agent::agent::DEFAULT_STALE_EPOCH_AFTER`).
//! Logs every step to stdout prefixed `symvirt-agent:` (the serial console in a test guest).

use std::io::Write;
use symvirt_agent::agent::{Agent, AgentConfig};
use symvirt_agent::guest_link::ChannelSpec;
use symvirt_agent::{Error, Result};

const USAGE: &str = "usage: symvirt-agent [--channel virtio:NAME|unix:PATH|listen:PATH|/dev/PATH] \
[--socket PATH] [--ranks N] [--vm NAME] [--report-pci] [--interconnect-wait-ms MS] \
[--data-address ADDR/PREFIX] [--stale-epoch-ms MS]";

/// Prints log records to stdout with the agent's prefix.
struct StdoutLogger;

impl log::Log for StdoutLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::Level::Info
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            let mut out = std::io::stdout().lock();
            let _ = writeln!(out, "symvirt-agent: {}", record.args());
            let _ = out.flush();
        }
    }

    fn flush(&self) {}
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<AgentConfig> {
    let mut config = AgentConfig {
        vm: default_vm_name(),
        interconnect_wait: Some(symvirt_agent::agent::DEFAULT_INTERCONNECT_WAIT),
        ..AgentConfig::default()
    };
    while let Some(arg) = args.next() {
        let mut value = |name: &str| {
            args.next()
                .ok_or_else(|| Error::Config(format!("{name} needs a value; {USAGE}")))
        };
        match arg.as_str() {
            "--channel" => config.channel = ChannelSpec::parse(&value("--channel")?)?,
            "--socket" => config.rank_socket = value("--socket")?.into(),
            "--ranks" => {
                let v = value("--ranks")?;
                config.ranks = v
                    .parse()
                    .ok()
                    .filter(|&n| n <= symvirt_proto::protocol::MAX_RANKS)
                    .ok_or_else(|| Error::Config(format!("--ranks {v:?}: not a rank count")))?;
            }
            "--vm" => config.vm = value("--vm")?,
            "--interconnect-wait-ms" => {
                config.interconnect_wait = millis("--interconnect-wait-ms", &value(&arg)?)?
            }
            "--stale-epoch-ms" => {
                config.stale_epoch_after = millis("--stale-epoch-ms", &value(&arg)?)?
            }
            "--report-pci" => config.report_pci = true,
            "--data-address" => {
                config.data_network = Some(symvirt_agent::data_net::DataNetwork::parse(&value(
                    "--data-address",
                )?)?)
            }
            "--help" | "-h" => return Err(Error::Config(USAGE.into())),
            other => {
                return Err(Error::Config(format!(
                    "unknown argument {other:?}; {USAGE}"
                )));
            }
        }
    }
    // The name travels in `hello`; refuse one the host would reject.
    let probe = symvirt_proto::protocol::GuestMessage::Hello {
        vm: config.vm.clone(),
        agent_version: "0".into(),
        protocol: 1,
        ranks: 0,
    };
    symvirt_proto::protocol::Validate::validate(&probe)?;
    Ok(config)
}

/// A duration in ms; 0 is `None`.
fn millis(name: &str, v: &str) -> Result<Option<std::time::Duration>> {
    let ms: u64 = v
        .parse()
        .map_err(|_| Error::Config(format!("{name} {v:?}: not a number of ms")))?;
    Ok((ms > 0).then(|| std::time::Duration::from_millis(ms)))
}

/// The kernel's host name when it is a usable VM name, else `guest`.
fn default_vm_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| {
            !h.is_empty()
                && h.len() <= symvirt_proto::protocol::MAX_NAME
                && h.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        })
        .unwrap_or_else(|| "guest".into())
}

/// `route-data --data-address ADDR/PREFIX --mac MAC`: the network step once, for a VM's first
/// fabric NIC.
fn route_data(mut args: impl Iterator<Item = String>) -> Result<()> {
    const ROUTE_USAGE: &str =
        "usage: symvirt-agent route-data --data-address ADDR/PREFIX --mac MAC";
    let (mut data, mut mac) = (None, None);
    while let Some(arg) = args.next() {
        let value = args
            .next()
            .ok_or_else(|| Error::Config(format!("{arg} needs a value; {ROUTE_USAGE}")))?;
        match arg.as_str() {
            "--data-address" => data = Some(symvirt_agent::data_net::DataNetwork::parse(&value)?),
            "--mac" => mac = Some(value),
            other => {
                return Err(Error::Config(format!(
                    "unknown argument {other:?}; {ROUTE_USAGE}"
                )));
            }
        }
    }
    let (Some(data), Some(mac)) = (data, mac) else {
        return Err(Error::Config(ROUTE_USAGE.into()));
    };
    let mut nic = symvirt_proto::protocol::Interconnect::Ethernet {
        mac,
        iface: None,
        pci: None,
    };
    let dirs = symvirt_agent::sysfs::SysDirs::default();
    let until = std::time::Instant::now() + symvirt_agent::agent::DEFAULT_INTERCONNECT_WAIT;
    while let Err(missing) = symvirt_agent::sysfs::find_interconnect(&mut nic, &dirs) {
        if std::time::Instant::now() >= until {
            return Err(Error::Refused(missing));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let symvirt_proto::protocol::Interconnect::Ethernet {
        iface: Some(iface), ..
    } = &nic
    else {
        unreachable!("find_interconnect names the interface it found");
    };
    data.route_via(iface)
}

fn main() {
    let _ = log::set_logger(&StdoutLogger).map(|()| log::set_max_level(log::LevelFilter::Info));
    let mut args = std::env::args().skip(1).peekable();
    let result = if args.peek().is_some_and(|a| a == "route-data") {
        route_data(args.skip(1))
    } else {
        parse_args(args).and_then(|config| Agent::spawn(config)?.wait())
    };
    if let Err(e) = result {
        println!("symvirt-agent: error: {}", e.chain());
        std::process::exit(2);
    }
}
