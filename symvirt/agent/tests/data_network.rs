//! The agent's network step on real interfaces: two network namespaces joined by a veth pair
//! stand for a guest and its peer on a new fabric (needs root).

use ninja_testkit::cluster::Fabrics;
use ninja_testkit::{Requirement, skip};
use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};
use symvirt_agent::data_net::DataNetwork;

/// Runs `f` on a thread inside namespace `ns` (a namespace is per thread: the test's own thread
/// stays where it is).
fn inside<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn ip_out(ns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "ip {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The guest side (`data0` with 10.99.0.1/24 noprefixroute, NIC `fab` down and unrouted) and a
/// peer with 10.99.0.2/24 on the other end of `fab`.
fn guest_and_peer(test: &str) -> Option<(Fabrics, Fabrics)> {
    let made = Fabrics::create().and_then(|g| Ok((g, Fabrics::create()?)));
    let (guest, peer) = match made {
        Ok(pair) => pair,
        Err(e) => {
            skip(
                Requirement::Netns,
                test,
                &format!("cannot make a network namespace: {e}"),
            );
            return None;
        }
    };
    for args in [
        &[
            "link",
            "add",
            "fab",
            "type",
            "veth",
            "peer",
            "name",
            "fabp",
            "netns",
            peer.ns(),
        ][..],
        // What holds the data address: a dummy in the guests; a port-less bridge here, since
        // this host's kernel may lack the dummy driver.
        &["link", "add", "data0", "type", "bridge"],
        &[
            "addr",
            "add",
            "10.99.0.1/24",
            "dev",
            "data0",
            "noprefixroute",
        ],
        &["link", "set", "data0", "up"],
    ] {
        guest.ip(args).unwrap();
    }
    peer.ip(&["addr", "add", "10.99.0.2/24", "dev", "fabp"])
        .unwrap();
    peer.ip(&["link", "set", "fabp", "up"]).unwrap();
    Some((guest, peer))
}

fn data(timeout_ms: u64) -> DataNetwork {
    let mut d = DataNetwork::parse("10.99.0.1/24").unwrap();
    d.probe_timeout = Duration::from_millis(timeout_ms);
    d
}

const PEER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);

#[test]
fn the_data_subnet_follows_the_vm_onto_a_new_nic_and_its_peer_answers_there() {
    let Some((guest, peer)) = guest_and_peer("data_subnet_follows") else {
        return;
    };
    let ns = guest.ns().to_owned();
    // Before the step the NIC is down and nothing routes the subnet: the probe fails.
    let before = inside(&ns, || data(400).probe_peers("fab", &[PEER]));
    assert!(before.is_err(), "{before:?}");

    let (routed, probed) = inside(&ns, || {
        let d = data(2000);
        d.route_via("fab").unwrap();
        let t = Instant::now();
        d.probe_peers("fab", &[PEER]).unwrap();
        (d.peers().unwrap(), t.elapsed())
    });
    assert!(probed < Duration::from_millis(500), "{probed:?}");
    assert_eq!(
        routed,
        vec![PEER],
        "the answering peer is in the neighbour table"
    );
    let route = ip_out(guest.ns(), &["route", "show", "10.99.0.0/24"]);
    assert!(
        route.contains("dev fab") && route.contains("src 10.99.0.1"),
        "{route}"
    );
    let peer_mac = ip_out(peer.ns(), &["link", "show", "fabp"]);
    let peer_mac = peer_mac
        .split("link/ether ")
        .nth(1)
        .unwrap()
        .split(' ')
        .next()
        .unwrap();
    let neigh = ip_out(guest.ns(), &["neigh", "show", "10.99.0.2"]);
    assert!(
        neigh.contains(&format!("dev fab lladdr {peer_mac}")),
        "{neigh}"
    );
    // A TCP connection from the data address reaches the peer, and its answer comes back.
    let listener = inside(peer.ns(), || {
        std::net::TcpListener::bind("10.99.0.2:0").unwrap()
    });
    let port = listener.local_addr().unwrap().port();
    let server = std::thread::spawn(move || {
        let (mut conn, from) = listener.accept().unwrap();
        std::io::Write::write_all(&mut conn, b"pong").unwrap();
        from.ip()
    });
    let answer = inside(&ns, move || {
        let to = std::net::SocketAddr::from((PEER, port));
        let mut c = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)).unwrap();
        let mut buf = String::new();
        std::io::Read::read_to_string(&mut c, &mut buf).unwrap();
        buf
    });
    assert_eq!(answer, "pong");
    assert_eq!(
        server.join().unwrap(),
        Ipv4Addr::new(10, 99, 0, 1),
        "from the data address"
    );

    // A peer not on the fabric is named, after the probe's limit, and only it.
    let (silent, took) = inside(&ns, || {
        let t = Instant::now();
        let r = data(600).probe_peers("fab", &[PEER, Ipv4Addr::new(10, 99, 0, 3)]);
        (r.unwrap_err().to_string(), t.elapsed())
    });
    assert!(
        silent.contains("peer(s) 10.99.0.3 do not answer on fab within 600 ms"),
        "{silent}"
    );
    assert!(took >= Duration::from_millis(600), "{took:?}");

    // The fabric goes down: the peer no longer answers.
    peer.ip(&["link", "set", "fabp", "down"]).unwrap();
    let down = inside(&ns, || data(400).probe_peers("fab", &[PEER]));
    assert!(down.unwrap_err().to_string().contains("10.99.0.2"));
}

#[test]
fn routing_through_a_missing_nic_is_refused_with_its_name() {
    let Some((guest, _peer)) = guest_and_peer("missing_nic") else {
        return;
    };
    let e = inside(guest.ns(), || {
        data(400).route_via("eth9").unwrap_err().to_string()
    });
    assert!(e.contains("eth9"), "{e}");
    // The data subnet stays unrouted.
    assert!(
        ip_out(guest.ns(), &["route", "show", "10.99.0.0/24"])
            .trim()
            .is_empty()
    );
}
