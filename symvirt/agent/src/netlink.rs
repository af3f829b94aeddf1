//! The few kernel requests the data-network step needs, made in-process: rtnetlink (link up,
//! route replace, neighbour dump and insert) and ARP over a packet socket.
//!
//! Why not `ip` and `arping`: under TCG every program start costs 0.1 to 0.2 s, and the step
//! runs while the job is paused, so it is on the job-visible pause. Netlink messages are in the
//! host's byte order (`nlmsghdr`, then the family header, then 4-byte-aligned attributes);
//! ARP packets in network order.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// How long one netlink request may wait for the kernel's answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);

/// An interface's index by name.
pub(crate) fn interface_index(name: &str) -> io::Result<u32> {
    nix::net::if_::if_nametoindex(name)
        .map_err(|e| io::Error::new(io::Error::from(e).kind(), format!("no interface {name}")))
}

/// An interface's Ethernet address (from the link-layer entry `getifaddrs` lists).
pub(crate) fn interface_mac(name: &str) -> io::Result<[u8; 6]> {
    nix::ifaddrs::getifaddrs()?
        .filter(|a| a.interface_name == name)
        .find_map(|a| a.address?.as_link_addr()?.addr())
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{name} has no MAC")))
}

/// A neighbour-table entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Neighbour {
    pub address: Ipv4Addr,
    pub ifindex: u32,
    /// `NUD_*` bits.
    pub state: u16,
}

/// A route-netlink socket.
pub(crate) struct Rtnl {
    fd: OwnedFd,
    seq: u32,
}

/// Appends an attribute (`rtattr`: length, type, payload, padding to 4 bytes).
fn push_attr(msg: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    msg.extend_from_slice(&(len as u16).to_ne_bytes());
    msg.extend_from_slice(&kind.to_ne_bytes());
    msg.extend_from_slice(payload);
    msg.resize(msg.len().next_multiple_of(4), 0);
}

/// The attributes after a family header: (type, payload) pairs; a malformed one ends the list.
fn attrs(mut body: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while body.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([body[0], body[1]]));
        let kind = u16::from_ne_bytes([body[2], body[3]]);
        if len < 4 || len > body.len() {
            break;
        }
        out.push((kind, &body[4..len]));
        body = &body[len.next_multiple_of(4).min(body.len())..];
    }
    out
}

impl Rtnl {
    pub(crate) fn open() -> io::Result<Rtnl> {
        use nix::sys::socket::{
            AddressFamily, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, setsockopt, socket,
            sockopt,
        };
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0))?;
        setsockopt(
            &fd,
            sockopt::ReceiveTimeout,
            &nix::sys::time::TimeVal::new(REQUEST_TIMEOUT.as_secs() as i64, 0),
        )?;
        Ok(Rtnl { fd, seq: 0 })
    }

    /// Sends one request (`family_header` and attributes already in `body`); for a dump, the
    /// payload of every answer, else the kernel's acknowledgement.
    fn request(&mut self, kind: u16, flags: u16, body: &[u8]) -> io::Result<Vec<Vec<u8>>> {
        self.seq = self.seq.wrapping_add(1);
        let mut msg = Vec::with_capacity(16 + body.len());
        msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&(flags | libc::NLM_F_REQUEST as u16).to_ne_bytes());
        msg.extend_from_slice(&self.seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        let kernel = nix::sys::socket::NetlinkAddr::new(0, 0);
        nix::sys::socket::sendto(
            self.fd.as_raw_fd(),
            &msg,
            &kernel,
            nix::sys::socket::MsgFlags::empty(),
        )?;
        let dump = flags & libc::NLM_F_DUMP as u16 != 0;
        let mut answers = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = nix::sys::socket::recv(
                self.fd.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::empty(),
            )?;
            let mut rest = &buf[..n];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
                let kind = u16::from_ne_bytes([rest[4], rest[5]]);
                let seq = u32::from_ne_bytes(rest[8..12].try_into().unwrap());
                if len < 16 || len > rest.len() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "malformed netlink answer",
                    ));
                }
                let payload = &rest[16..len];
                rest = &rest[len.next_multiple_of(4).min(rest.len())..];
                if seq != self.seq {
                    continue; // an answer to an earlier request that timed out
                }
                match kind as i32 {
                    libc::NLMSG_ERROR => {
                        let code = payload
                            .get(0..4)
                            .map(|b| i32::from_ne_bytes(b.try_into().unwrap()))
                            .unwrap_or(-libc::EPROTO);
                        return if code == 0 {
                            Ok(answers)
                        } else {
                            Err(io::Error::from_raw_os_error(-code))
                        };
                    }
                    libc::NLMSG_DONE => return Ok(answers),
                    _ if dump => answers.push(payload.to_vec()),
                    _ => {}
                }
            }
        }
    }

    /// Sets the interface up.
    pub(crate) fn set_up(&mut self, ifindex: u32) -> io::Result<()> {
        // ifinfomsg: family, pad, type, index, flags, change.
        let mut body = vec![libc::AF_UNSPEC as u8, 0, 0, 0];
        body.extend_from_slice(&(ifindex as i32).to_ne_bytes());
        body.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
        body.extend_from_slice(&(libc::IFF_UP as u32).to_ne_bytes());
        self.request(libc::RTM_NEWLINK, libc::NLM_F_ACK as u16, &body)
            .map(drop)
    }

    /// `ip route replace NETWORK/PREFIX dev IFINDEX src SRC` (main table, scope link).
    pub(crate) fn replace_route(
        &mut self,
        network: Ipv4Addr,
        prefix: u8,
        ifindex: u32,
        src: Ipv4Addr,
    ) -> io::Result<()> {
        // rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags.
        let mut body = vec![
            libc::AF_INET as u8,
            prefix,
            0,
            0,
            libc::RT_TABLE_MAIN,
            libc::RTPROT_BOOT,
            libc::RT_SCOPE_LINK,
            libc::RTN_UNICAST,
        ];
        body.extend_from_slice(&0u32.to_ne_bytes());
        push_attr(&mut body, libc::RTA_DST, &network.octets());
        push_attr(&mut body, libc::RTA_OIF, &ifindex.to_ne_bytes());
        push_attr(&mut body, libc::RTA_PREFSRC, &src.octets());
        let flags = libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE;
        self.request(libc::RTM_NEWROUTE, flags as u16, &body)
            .map(drop)
    }

    /// Every IPv4 neighbour-table entry.
    pub(crate) fn neighbours(&mut self) -> io::Result<Vec<Neighbour>> {
        // ndmsg: family, pad, pad, ifindex, state, flags, type.
        let body = [libc::AF_INET as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let answers = self.request(libc::RTM_GETNEIGH, libc::NLM_F_DUMP as u16, &body)?;
        Ok(answers
            .iter()
            .filter(|a| a.len() >= 12 && a[0] == libc::AF_INET as u8)
            .filter_map(|a| {
                let ifindex = i32::from_ne_bytes(a[4..8].try_into().unwrap()) as u32;
                let state = u16::from_ne_bytes([a[8], a[9]]);
                let dst = attrs(&a[12..])
                    .into_iter()
                    .find(|(kind, _)| *kind == libc::NDA_DST)?
                    .1;
                let octets: [u8; 4] = dst.try_into().ok()?;
                Some(Neighbour {
                    address: Ipv4Addr::from(octets),
                    ifindex,
                    state,
                })
            })
            .collect())
    }

    /// Records that `address` is at `mac` on the interface (`ip neigh replace ... nud
    /// reachable`): the first packet after the move needs no ARP round trip.
    pub(crate) fn set_neighbour(
        &mut self,
        ifindex: u32,
        address: Ipv4Addr,
        mac: [u8; 6],
    ) -> io::Result<()> {
        let mut body = vec![libc::AF_INET as u8, 0, 0, 0];
        body.extend_from_slice(&(ifindex as i32).to_ne_bytes());
        body.extend_from_slice(&libc::NUD_REACHABLE.to_ne_bytes());
        body.extend_from_slice(&[0, 0]); // flags, type
        push_attr(&mut body, libc::NDA_DST, &address.octets());
        push_attr(&mut body, libc::NDA_LLADDR, &mac);
        let flags = libc::NLM_F_ACK | libc::NLM_F_CREATE | libc::NLM_F_REPLACE;
        self.request(libc::RTM_NEWNEIGH, flags as u16, &body)
            .map(drop)
    }
}

/// An ARP request or reply (Ethernet, IPv4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Arp {
    pub reply: bool,
    pub sender_mac: [u8; 6],
    pub sender: Ipv4Addr,
    pub target_mac: [u8; 6],
    pub target: Ipv4Addr,
}

impl Arp {
    pub(crate) fn encode(&self) -> [u8; 28] {
        let mut p = [0u8; 28];
        p[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
        p[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
        p[4] = 6;
        p[5] = 4;
        p[6..8].copy_from_slice(&(if self.reply { 2u16 } else { 1 }).to_be_bytes());
        p[8..14].copy_from_slice(&self.sender_mac);
        p[14..18].copy_from_slice(&self.sender.octets());
        p[18..24].copy_from_slice(&self.target_mac);
        p[24..28].copy_from_slice(&self.target.octets());
        p
    }

    pub(crate) fn decode(p: &[u8]) -> Option<Arp> {
        if p.len() < 28 || p[0..6] != [0, 1, 8, 0, 6, 4] {
            return None;
        }
        let reply = match u16::from_be_bytes([p[6], p[7]]) {
            1 => false,
            2 => true,
            _ => return None,
        };
        let ip = |at: usize| Ipv4Addr::new(p[at], p[at + 1], p[at + 2], p[at + 3]);
        Some(Arp {
            reply,
            sender_mac: p[8..14].try_into().ok()?,
            sender: ip(14),
            target_mac: p[18..24].try_into().ok()?,
            target: ip(24),
        })
    }
}

/// A packet socket for ARP on one interface.
pub(crate) struct ArpSocket {
    fd: OwnedFd,
    ifindex: u32,
}

fn link_address(ifindex: u32, mac: [u8; 6]) -> libc::sockaddr_ll {
    let mut addr = libc::sockaddr_ll {
        sll_family: libc::AF_PACKET as u16,
        sll_protocol: (libc::ETH_P_ARP as u16).to_be(),
        sll_ifindex: ifindex as i32,
        sll_hatype: 0,
        sll_pkttype: 0,
        sll_halen: 6,
        sll_addr: [0; 8],
    };
    addr.sll_addr[..6].copy_from_slice(&mac);
    addr
}

impl ArpSocket {
    pub(crate) fn open(ifindex: u32) -> io::Result<ArpSocket> {
        // SAFETY: plain socket(2) call; the result is checked before use.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                i32::from((libc::ETH_P_ARP as u16).to_be()),
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let addr = link_address(ifindex, [0; 6]);
        // SAFETY: `addr` is a valid sockaddr_ll and the length passed is its size.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(ArpSocket { fd, ifindex })
    }

    /// Broadcasts `packet`.
    pub(crate) fn broadcast(&self, packet: &Arp) -> io::Result<()> {
        let bytes = packet.encode();
        let to = link_address(self.ifindex, [0xff; 6]);
        // SAFETY: `bytes` and `to` are valid for the lengths passed.
        let rc = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                bytes.as_ptr().cast(),
                bytes.len(),
                0,
                (&raw const to).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// The next ARP packet received before `until`, if any.
    pub(crate) fn receive(&self, until: Instant) -> io::Result<Option<Arp>> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        use std::os::fd::AsFd;
        let mut buf = [0u8; 128];
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let millis = u16::try_from(left.as_millis().max(1)).unwrap_or(u16::MAX);
            let mut fds = [PollFd::new(self.fd.as_fd(), PollFlags::POLLIN)];
            if poll(&mut fds, PollTimeout::from(millis))? == 0 {
                continue;
            }
            match nix::sys::socket::recv(
                self.fd.as_raw_fd(),
                &mut buf,
                nix::sys::socket::MsgFlags::empty(),
            ) {
                Ok(n) => {
                    if let Some(arp) = Arp::decode(&buf[..n]) {
                        return Ok(Some(arp));
                    }
                }
                Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_arp_request_has_the_wire_layout_and_decodes_back() {
        let request = Arp {
            reply: false,
            sender_mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            sender: Ipv4Addr::new(10, 99, 0, 1),
            target_mac: [0; 6],
            target: Ipv4Addr::new(10, 99, 0, 2),
        };
        let bytes = request.encode();
        assert_eq!(
            bytes,
            [
                0, 1, 8, 0, 6, 4, 0, 1, 0x52, 0x54, 0, 0x12, 0x34, 0x56, 10, 99, 0, 1, 0, 0, 0, 0,
                0, 0, 10, 99, 0, 2
            ]
        );
        assert_eq!(Arp::decode(&bytes), Some(request));
        let mut reply = bytes;
        reply[7] = 2;
        assert!(Arp::decode(&reply).unwrap().reply);
        reply[7] = 3;
        assert_eq!(Arp::decode(&reply), None, "unknown operation");
        assert_eq!(Arp::decode(&bytes[..27]), None, "short packet");
        let mut ipv6 = bytes;
        ipv6[2] = 0x86;
        assert_eq!(Arp::decode(&ipv6), None, "not IPv4 over Ethernet");
    }

    #[test]
    fn attributes_are_padded_and_parsed_back() {
        let mut body = Vec::new();
        push_attr(&mut body, 1, &[10, 99, 0, 0]);
        push_attr(&mut body, 2, &[1, 2, 3, 4, 5, 6]);
        push_attr(&mut body, 7, &[9]);
        assert_eq!(body.len(), 8 + 12 + 8);
        assert_eq!(
            attrs(&body),
            vec![
                (1, &[10, 99, 0, 0][..]),
                (2, &[1, 2, 3, 4, 5, 6][..]),
                (7, &[9][..])
            ]
        );
        // A length past the end ends the list instead of reading beyond it.
        let mut bad = body.clone();
        bad[20] = 200;
        assert_eq!(attrs(&bad).len(), 2);
    }

    #[test]
    fn the_loopback_interface_is_found_and_the_neighbour_table_read() {
        assert_eq!(interface_index("lo").unwrap(), 1);
        assert!(interface_index("no-such-if0").is_err());
        // A dump works unprivileged; its content depends on the machine.
        Rtnl::open().unwrap().neighbours().unwrap();
    }
}
