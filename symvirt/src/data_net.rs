//! The guest's network step: the VM's data address follows it from one fabric to another.
//!
//! Open MPI 4.1 and MPICH 4.0 fix their transports when a job starts and cannot re-select one
//! inside a running process. What both can keep is a TCP connection, if its two addresses stay
//! valid. So the ranks of a job that is to move between fabrics communicate over a **data
//! address** that belongs to the VM, not to a NIC: it sits on a dummy interface (`data0`), added
//! `noprefixroute`, and the data subnet is routed through whichever fabric NIC the VM has now.
//! While the job is quiesced and the passthrough device swapped, the agent re-plumbs that route
//! onto the NIC of the new fabric ([`DataNetwork::route_via`]) before it releases the ranks; the
//! ranks' connections, between the same two data addresses, carry on over the new wire. Peers
//! answer ARP for their data address on any NIC (Linux's default `arp_ignore=0`).
//!
//! What a site sets up in each guest (the test cluster's init does the same):
//!
//! ```text
//! ip link add data0 type dummy
//! ip addr add 10.99.0.1/24 dev data0 noprefixroute   # the VM's data address, its subnet
//! ip link set data0 up
//! symvirt-agent --data-address 10.99.0.1/24 ...      # the agent re-plumbs on every resume
//! ```
//! and the ranks' TCP transport bound to it (`--mca btl_tcp_if_include data0` for Open MPI,
//! `UCX_NET_DEVICES=data0` for MPICH over UCX). What the agent changes on `resume` with an
//! Ethernet interconnect whose interface is `IFACE`: `ip link set IFACE up`, `ip route replace
//! SUBNET dev IFACE src ADDRESS`, `ip neigh flush to SUBNET` (entries learned on the old NIC).
//! Before a cut it checks that the data address is still configured (if it is not, the epoch
//! fails with that reason and the job stays where it is) and notes the data-subnet peers the
//! guest talks to (its neighbour table). After re-plumbing, every one of them must answer ARP on
//! the new NIC (`arping`; a peer answers for its data address while its own job is paused):
//! a fabric that is down, or a peer that is not on it, fails the resume and the host rolls the
//! job back to where it was, instead of releasing ranks onto a dead wire.

use crate::error::{Error, Result};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one ARP probe of a peer may take before it is sent again.
const PROBE_ATTEMPT: Duration = Duration::from_millis(200);

/// The VM's data address and how the agent changes routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataNetwork {
    /// The VM's own data address.
    pub address: Ipv4Addr,
    /// The data subnet's prefix length (every VM of the job is in it).
    pub prefix: u8,
    /// The iproute2 `ip` program (absolute, or found on `PATH`).
    pub ip_program: PathBuf,
    /// The `arping` program (busybox's or iputils'), for the peer probe.
    pub arping_program: PathBuf,
    /// How long every peer has to answer on the new NIC.
    pub probe_timeout: Duration,
}

impl DataNetwork {
    /// Parses `ADDRESS/PREFIX`, e.g. `10.99.0.1/24`.
    pub fn parse(cidr: &str) -> Result<DataNetwork> {
        let bad = || Error::Config(format!("data address {cidr:?}: want IPV4/PREFIX"));
        let (address, prefix) = cidr.split_once('/').ok_or_else(bad)?;
        let address: Ipv4Addr = address.parse().map_err(|_| bad())?;
        let prefix: u8 = prefix
            .parse()
            .ok()
            .filter(|p| (1..=32).contains(p))
            .ok_or_else(bad)?;
        Ok(DataNetwork {
            address,
            prefix,
            ip_program: "ip".into(),
            arping_program: "arping".into(),
            probe_timeout: Duration::from_secs(5),
        })
    }

    /// The data subnet, `NETWORK/PREFIX`.
    pub fn subnet(&self) -> String {
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0);
        let network = Ipv4Addr::from(u32::from(self.address) & mask);
        format!("{network}/{}", self.prefix)
    }

    /// Checks that the data address is configured on an interface that is up.
    pub fn check(&self) -> Result<()> {
        let addrs = nix::ifaddrs::getifaddrs()
            .map_err(|e| Error::io("list the guest's addresses", e.into()))?;
        let mut down = None;
        for a in addrs {
            let v4 = a
                .address
                .as_ref()
                .and_then(|s| s.as_sockaddr_in())
                .map(|s| s.ip());
            if v4 == Some(self.address) {
                if a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP) {
                    return Ok(());
                }
                down = Some(a.interface_name);
            }
        }
        Err(Error::Refused(match down {
            Some(iface) => format!("data address {} is on {iface}, which is down", self.address),
            None => format!(
                "data address {}/{} is not configured on any interface",
                self.address, self.prefix
            ),
        }))
    }

    /// Routes the data subnet through `iface` (the new fabric's NIC), from the data address.
    pub fn route_via(&self, iface: &str) -> Result<()> {
        self.check()?;
        let subnet = self.subnet();
        let src = self.address.to_string();
        self.ip(&["link", "set", iface, "up"])?;
        self.ip(&["route", "replace", &subnet, "dev", iface, "src", &src])?;
        self.ip(&["neigh", "flush", "to", &subnet])?;
        log::info!("data subnet {subnet} now routed through {iface} from {src}");
        Ok(())
    }

    /// The data-subnet peers in the guest's neighbour table (the job's other VMs, once the
    /// ranks have talked): every entry but failed and incomplete ones.
    pub fn peers(&self) -> Result<Vec<Ipv4Addr>> {
        let text = self.ip(&["-j", "-4", "neigh", "show", "to", &self.subnet()])?;
        let entries: Vec<serde_json::Value> = serde_json::from_str(text.trim())
            .map_err(|e| Error::Refused(format!("ip -j neigh: {e}: {text}")))?;
        let mut peers: Vec<Ipv4Addr> = entries
            .iter()
            .filter(|n| {
                !n["state"].as_array().is_some_and(|s| {
                    s.iter()
                        .any(|x| x == "FAILED" || x == "INCOMPLETE" || x == "NOARP")
                })
            })
            .filter_map(|n| n["dst"].as_str()?.parse().ok())
            .filter(|&a| a != self.address)
            .collect();
        peers.sort();
        peers.dedup();
        Ok(peers)
    }

    /// Waits (up to [`DataNetwork::probe_timeout`]) until every one of `peers` answers ARP on
    /// `iface`; names those that never do.
    pub fn probe_peers(&self, iface: &str, peers: &[Ipv4Addr]) -> Result<()> {
        let until = Instant::now() + self.probe_timeout;
        let mut silent: Vec<Ipv4Addr> = peers.to_vec();
        while !silent.is_empty() {
            // Every silent peer at once, each attempt cut short: a peer whose own new NIC is
            // not up yet answers a moment later, and arping's own wait is a whole second.
            let round = Instant::now() + PROBE_ATTEMPT;
            let mut probes: Vec<(Ipv4Addr, Option<std::process::Child>)> = silent
                .iter()
                .map(|&peer| {
                    let child = Command::new(&self.arping_program)
                        .args(["-q", "-f", "-c", "1", "-w", "1", "-I", iface, "-s"])
                        .arg(self.address.to_string())
                        .arg(peer.to_string())
                        .stdin(Stdio::null())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .ok();
                    (peer, child)
                })
                .collect();
            let mut answered = Vec::new();
            while Instant::now() < round && answered.len() < probes.len() {
                for (peer, child) in &mut probes {
                    if let Some(c) = child {
                        match c.try_wait() {
                            Ok(Some(status)) => {
                                if status.success() {
                                    answered.push(*peer);
                                }
                                *child = None;
                            }
                            Ok(None) => {}
                            Err(_) => *child = None,
                        }
                    }
                }
                if probes.iter().all(|(_, c)| c.is_none()) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            for (_, child) in &mut probes {
                if let Some(c) = child {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
            silent.retain(|p| !answered.contains(p));
            if !silent.is_empty() {
                // A probe that failed at once (no such interface yet) is not sent in a loop.
                std::thread::sleep(round.saturating_duration_since(Instant::now()));
            }
            if !silent.is_empty() && Instant::now() >= until {
                let names: Vec<String> = silent.iter().map(ToString::to_string).collect();
                return Err(Error::Refused(format!(
                    "data-network peer(s) {} do not answer on {iface} within {} ms: the \
                     fabric is down or they are not on it",
                    names.join(", "),
                    self.probe_timeout.as_millis()
                )));
            }
        }
        Ok(())
    }

    /// Runs `ip ARGS`; its standard output.
    fn ip(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.ip_program)
            .args(args)
            .output()
            .map_err(|e| Error::io(format!("run {}", self.ip_program.display()), e))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(Error::Refused(format!(
                "ip {}: {} ({})",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim(),
                out.status
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_an_address_and_its_subnet() {
        let d = DataNetwork::parse("10.99.0.7/24").unwrap();
        assert_eq!(d.address, Ipv4Addr::new(10, 99, 0, 7));
        assert_eq!(d.subnet(), "10.99.0.0/24");
        assert_eq!(
            DataNetwork::parse("10.99.3.7/20").unwrap().subnet(),
            "10.99.0.0/20"
        );
        assert_eq!(
            DataNetwork::parse("10.99.3.7/32").unwrap().subnet(),
            "10.99.3.7/32"
        );
        for bad in [
            "10.99.0.7",
            "10.99.0.7/0",
            "10.99.0.7/33",
            "x/24",
            "10.99.0/24",
            "",
        ] {
            assert!(DataNetwork::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_missing_data_address_is_named() {
        // 192.0.2.0/24 is reserved for documentation: no interface here has it.
        let d = DataNetwork::parse("192.0.2.55/24").unwrap();
        let e = d.check().unwrap_err().to_string();
        assert!(e.contains("192.0.2.55/24 is not configured"), "{e}");
        assert!(d.route_via("lo").is_err());
    }

    /// A probe whose `arping` is `program`, with a 600 ms limit.
    fn probe_with(program: &str) -> (Result<()>, Duration) {
        let mut d = DataNetwork::parse("127.0.0.1/8").unwrap();
        d.arping_program = program.into();
        d.probe_timeout = Duration::from_millis(600);
        let t = Instant::now();
        let peers = [Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3)];
        (d.probe_peers("lo", &peers), t.elapsed())
    }

    #[test]
    fn peers_that_answer_pass_the_probe_at_once() {
        let (r, took) = probe_with("true");
        r.unwrap();
        assert!(took < Duration::from_millis(500), "{took:?}");
    }

    #[test]
    fn silent_peers_are_named_once_the_probe_times_out() {
        let (r, took) = probe_with("false");
        let e = r.unwrap_err().to_string();
        assert!(
            e.contains("127.0.0.2, 127.0.0.3 do not answer on lo within 600 ms"),
            "{e}"
        );
        assert!(took >= Duration::from_millis(600), "{took:?}");
    }

    #[test]
    fn a_probe_that_hangs_is_cut_short_and_sent_again() {
        let dir = std::env::temp_dir().join(format!("symvirt-arping-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("arping");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 5\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let (r, took) = probe_with(script.to_str().unwrap());
        assert!(r.is_err());
        assert!(
            took < Duration::from_secs(2),
            "each attempt is cut short: {took:?}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_loopback_address_is_found() {
        DataNetwork::parse("127.0.0.1/8").unwrap().check().unwrap();
    }
}
