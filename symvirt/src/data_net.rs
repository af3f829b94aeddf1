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
//! Before a cut it checks that the data address is still configured; if it is not, the epoch
//! fails with that reason and the job stays where it is.

use crate::error::{Error, Result};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::process::Command;

/// The VM's data address and how the agent changes routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataNetwork {
    /// The VM's own data address.
    pub address: Ipv4Addr,
    /// The data subnet's prefix length (every VM of the job is in it).
    pub prefix: u8,
    /// The iproute2 `ip` program (absolute, or found on `PATH`).
    pub ip_program: PathBuf,
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

    fn ip(&self, args: &[&str]) -> Result<()> {
        let out = Command::new(&self.ip_program)
            .args(args)
            .output()
            .map_err(|e| Error::io(format!("run {}", self.ip_program.display()), e))?;
        if out.status.success() {
            Ok(())
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

    #[test]
    fn the_loopback_address_is_found() {
        DataNetwork::parse("127.0.0.1/8").unwrap().check().unwrap();
    }
}
