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
//! Ethernet interconnect whose interface is `IFACE`: it sets `IFACE` up and replaces the data
//! subnet's route (`ip route replace SUBNET dev IFACE src ADDRESS`); neighbour entries are per
//! interface, so the new NIC starts with none and those of a removed NIC went with it.
//! Before a cut it checks that the data address is still configured (if it is not, the epoch
//! fails with that reason and the job stays where it is) and notes the data-subnet peers the
//! guest talks to (its neighbour table). After re-plumbing, every one of them must answer ARP on
//! the new NIC (a peer answers for its data address while its own job is paused; its own probe
//! of us counts too) and its address is entered in the neighbour table: a fabric that is down,
//! or a peer that is not on it, fails the resume and the host rolls the job back to where it
//! was, instead of releasing ranks onto a dead wire. All of it is done in-process (rtnetlink and
//! a packet socket, see `netlink`): no program is started while the job is paused.

use crate::error::{Error, Result};
use crate::netlink::{Arp, ArpSocket, Rtnl, interface_index, interface_mac};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

/// How long the agent waits for a peer's ARP answer before asking again.
const PROBE_ATTEMPT: Duration = Duration::from_millis(200);

/// Neighbour states that say nothing about a live peer.
const DEAD_NEIGHBOUR: u16 = libc::NUD_FAILED | libc::NUD_INCOMPLETE | libc::NUD_NOARP;

/// The VM's data address and how long peers have to answer after a move.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataNetwork {
    /// The VM's own data address.
    pub address: Ipv4Addr,
    /// The data subnet's prefix length (every VM of the job is in it).
    pub prefix: u8,
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
            probe_timeout: Duration::from_secs(5),
        })
    }

    fn mask(&self) -> u32 {
        u32::MAX
            .checked_shl(32 - u32::from(self.prefix))
            .unwrap_or(0)
    }

    fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.address) & self.mask())
    }

    /// Whether `a` is in the data subnet.
    fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.network())
    }

    /// The data subnet, `NETWORK/PREFIX`.
    pub fn subnet(&self) -> String {
        format!("{}/{}", self.network(), self.prefix)
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
        let failed = |what: &str, e| Error::io(format!("{what} {iface}"), e);
        let ifindex = interface_index(iface).map_err(|e| failed("find", e))?;
        let mut rtnl = Rtnl::open().map_err(|e| Error::io("open route netlink", e))?;
        rtnl.set_up(ifindex).map_err(|e| failed("set up", e))?;
        rtnl.replace_route(self.network(), self.prefix, ifindex, self.address)
            .map_err(|e| failed(&format!("route {} through", self.subnet()), e))?;
        log::info!(
            "data subnet {} now routed through {iface} from {}",
            self.subnet(),
            self.address
        );
        Ok(())
    }

    /// The data-subnet peers in the guest's neighbour table (the job's other VMs, once the
    /// ranks have talked): every entry but failed, incomplete and no-ARP ones.
    pub fn peers(&self) -> Result<Vec<Ipv4Addr>> {
        let table = Rtnl::open()
            .and_then(|mut r| r.neighbours())
            .map_err(|e| Error::io("read the neighbour table", e))?;
        let mut peers: Vec<Ipv4Addr> = table
            .into_iter()
            .filter(|n| n.state & DEAD_NEIGHBOUR == 0 && n.state != 0)
            .map(|n| n.address)
            .filter(|&a| a != self.address && self.contains(a))
            .collect();
        peers.sort();
        peers.dedup();
        Ok(peers)
    }

    /// Waits (up to [`DataNetwork::probe_timeout`]) until every one of `peers` answers ARP on
    /// `iface` (or asks for us there), and enters each one's MAC in the neighbour table; names
    /// those that never do.
    pub fn probe_peers(&self, iface: &str, peers: &[Ipv4Addr]) -> Result<()> {
        if peers.is_empty() {
            return Ok(());
        }
        let failed = |what: &str, e| Error::io(format!("{what} on {iface}"), e);
        let ifindex = interface_index(iface).map_err(|e| failed("find the interface", e))?;
        let mac = interface_mac(iface).map_err(|e| failed("read the MAC", e))?;
        let socket = ArpSocket::open(ifindex).map_err(|e| failed("open an ARP socket", e))?;
        let mut rtnl = Rtnl::open().map_err(|e| Error::io("open route netlink", e))?;
        let until = Instant::now() + self.probe_timeout;
        let mut silent: Vec<Ipv4Addr> = peers.to_vec();
        let mut send_error = None;
        while !silent.is_empty() && Instant::now() < until {
            // Every silent peer asked at once, again each attempt: a peer whose own new NIC
            // is not up yet answers a moment later.
            for &peer in &silent {
                let request = Arp {
                    reply: false,
                    sender_mac: mac,
                    sender: self.address,
                    target_mac: [0; 6],
                    target: peer,
                };
                // A NIC without carrier refuses to send: the peer stays silent, and the
                // carrier may come back before the limit.
                if let Err(e) = socket.broadcast(&request) {
                    send_error = Some(e);
                }
            }
            let round = (Instant::now() + PROBE_ATTEMPT).min(until);
            while !silent.is_empty() {
                let Some(arp) = socket
                    .receive(round)
                    .map_err(|e| failed("receive ARP", e))?
                else {
                    break;
                };
                let for_us = !arp.reply || arp.target == self.address;
                if arp.sender_mac != mac && for_us && silent.contains(&arp.sender) {
                    silent.retain(|&p| p != arp.sender);
                    rtnl.set_neighbour(ifindex, arp.sender, arp.sender_mac)
                        .map_err(|e| failed(&format!("enter neighbour {}", arp.sender), e))?;
                }
            }
        }
        if silent.is_empty() {
            return Ok(());
        }
        let names: Vec<String> = silent.iter().map(ToString::to_string).collect();
        let why = match send_error {
            Some(e) => format!("{iface} cannot send ({e})"),
            None => "the fabric is down or they are not on it".into(),
        };
        Err(Error::Refused(format!(
            "data-network peer(s) {} do not answer on {iface} within {} ms: {why}",
            names.join(", "),
            self.probe_timeout.as_millis()
        )))
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
