//! TLS between source and destination, tried as a stranger on the network would: a foreign
//! CA, an expired certificate, a wrong name, a clear-text peer, a forged byte, a crowd of idle
//! and garbage connections. Each is refused or detected, the source guest runs on, the
//! destination discards what it got, and the listener still takes the genuine source.

mod engine_common;

use engine_common::{Fault, Proxy, assert_runs, within};
use migrate_core::software_guest::{SoftwareGuest, SoftwareGuestConfig};
use migrate_core::tls::{Credentials, DestinationTls, SourceTls};
use migrate_core::transport::{self, Connections, Endpoint, Listener};
use migrate_core::vm::MigratableVm;
use migrate_core::{Error, MigrationConfig, Phase, destination, source};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress};

/// A CA that signs certificates for the tests.
struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            issuer: Issuer::new(params, key),
            pem,
        }
    }

    /// A leaf certificate and key (PEM) for `names`; `expired` puts its validity in 2020.
    fn issue(
        &self,
        names: &[&str],
        usage: ExtendedKeyUsagePurpose,
        expired: bool,
    ) -> (String, String) {
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params.extended_key_usages = vec![usage];
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2020, 12, 31);
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// A directory of credentials, removed when dropped.
struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Dir {
        let d = std::env::temp_dir().join(format!("ninja-tls-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }

    /// Writes `trusted` as the CA file and `leaf` as this end's certificate and key.
    fn credentials(&self, name: &str, trusted: &Ca, leaf: (String, String)) -> Credentials {
        let path = |f: &str| self.0.join(format!("{name}-{f}"));
        std::fs::write(path("ca.pem"), &trusted.pem).unwrap();
        std::fs::write(path("cert.pem"), leaf.0).unwrap();
        std::fs::write(path("key.pem"), leaf.1).unwrap();
        Credentials {
            ca: path("ca.pem"),
            cert: path("cert.pem"),
            key: path("key.pem"),
        }
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One site: its CA, a destination certificate for 127.0.0.1, a source certificate for
/// `ninja-source`.
struct Site {
    ca: Ca,
    dir: Dir,
}

impl Site {
    fn new(tag: &str) -> Site {
        Site {
            ca: Ca::new("site CA"),
            dir: Dir::new(tag),
        }
    }

    fn destination(&self) -> DestinationTls {
        let leaf = self
            .ca
            .issue(&["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth, false);
        let creds = self.dir.credentials("destination", &self.ca, leaf);
        DestinationTls::new(&creds, &["ninja-source".to_string()]).unwrap()
    }

    fn source(&self) -> SourceTls {
        self.source_named("ninja-source", false)
    }

    fn source_named(&self, name: &str, expired: bool) -> SourceTls {
        let leaf = self
            .ca
            .issue(&[name], ExtendedKeyUsagePurpose::ClientAuth, expired);
        let creds = self
            .dir
            .credentials(&format!("source-{name}"), &self.ca, leaf);
        SourceTls::new(&creds, "127.0.0.1").unwrap()
    }
}

fn guest_config() -> SoftwareGuestConfig {
    SoftwareGuestConfig {
        fill: true,
        working_set_pages: 256,
        dirty_rate_mib_s: Some(20.0),
        ..SoftwareGuestConfig::new(16 << 20)
    }
}

fn config() -> MigrationConfig {
    MigrationConfig {
        handshake_timeout: Duration::from_secs(5),
        io_timeout: Duration::from_secs(5),
        commit_timeout: Duration::from_secs(5),
        ..Default::default()
    }
}

fn tcp(addr: SocketAddr) -> Endpoint {
    Endpoint::Tcp(addr)
}

fn listener(tls: Option<DestinationTls>) -> (Listener, SocketAddr) {
    let ep = tcp("127.0.0.1:0".parse().unwrap());
    let l = match tls {
        Some(t) => Listener::bind_tls(&ep, t).unwrap(),
        None => Listener::bind(&ep).unwrap(),
    };
    let Endpoint::Tcp(addr) = l.endpoint().unwrap() else {
        unreachable!()
    };
    (l, addr)
}

/// Receives one migration on `conns`; the guest it returns has run on the destination.
fn receive(conns: Connections) -> migrate_core::Result<SoftwareGuest> {
    destination::receive(
        conns,
        &config(),
        |_| SoftwareGuest::incoming(guest_config()),
    )
    .map(|(g, _)| g)
}

/// The innermost error of a chain.
fn root(e: &Error) -> &Error {
    match e {
        Error::Migration { source, .. } | Error::MemoryConnection { source, .. } => root(source),
        e => e,
    }
}

/// A refused connection set: a handshake error carrying a TLS reason that contains `why`.
fn assert_refused(r: migrate_core::Result<Connections>, why: &str) {
    let e = r.expect_err("a stranger got in");
    assert!(
        matches!(
            e,
            Error::Migration {
                phase: Phase::Handshake,
                ..
            }
        ),
        "{e:?}"
    );
    let chain = format!("{:?}", root(&e));
    assert!(chain.contains(why), "expected {why:?} in {chain}");
}

/// The guest arrived whole and went on from where the source stopped.
fn assert_moved(moved: &SoftwareGuest, src: &SoftwareGuest) {
    moved.pause().unwrap();
    moved
        .check_consistency()
        .expect("destination memory consistent");
    assert!(moved.counter() >= src.counter());
}

/// 64 bytes of guest memory at a page the guest never writes (what a wiretap would look for).
fn needle(guest: &SoftwareGuest) -> Vec<u8> {
    let written: std::collections::HashSet<u64> = guest.written_pages().into_iter().collect();
    let gpa = (1..)
        .map(|p| p * 4096 + 1024)
        .find(|a| !written.contains(&(a & !4095)))
        .unwrap();
    let mut b = vec![0u8; 64];
    guest
        .guest_memory()
        .read_slice(&mut b, GuestAddress(gpa))
        .unwrap();
    b
}

/// Migrates a fresh guest through a wiretapping proxy to `l`; returns whether the wiretap
/// saw the guest's memory.
fn migrate_through_wiretap(l: Listener, addr: SocketAddr, tls: Option<SourceTls>) -> bool {
    let proxy = Proxy::start(addr, Fault::None);
    let src = SoftwareGuest::start(guest_config()).unwrap();
    let secret = needle(&src);
    let dst = std::thread::spawn(move || receive(l.accept(Duration::from_secs(20))?));
    let ep = tcp(proxy.addr);
    let conns = match &tls {
        Some(t) => transport::connect_tls(&ep, 2, Duration::from_secs(5), t),
        None => transport::connect(&ep, 2, Duration::from_secs(5)),
    }
    .unwrap();
    assert_eq!(conns.control.is_encrypted(), tls.is_some());
    source::migrate(&src, conns, &config(), None).unwrap();
    let moved = dst.join().unwrap().unwrap();
    assert_moved(&moved, &src);
    assert_eq!(needle(&moved), secret);
    let seen = proxy.seen.lock().unwrap();
    seen.windows(secret.len()).any(|w| w == secret.as_slice())
}

#[test]
fn a_migration_over_tls_moves_the_guest_and_the_wire_does_not_show_its_memory() {
    within(120, || {
        let site = Site::new("wire");
        let (l, addr) = listener(Some(site.destination()));
        assert!(
            !migrate_through_wiretap(l, addr, Some(site.source())),
            "guest memory readable on the wire under TLS"
        );
        // The same wiretap reads a clear-text migration: the check above can fail.
        let (l, addr) = listener(None);
        assert!(migrate_through_wiretap(l, addr, None));
    });
}

#[test]
fn strangers_are_refused_and_the_listener_still_takes_the_source() {
    within(120, || {
        let site = Site::new("strangers");
        let (l, addr) = listener(Some(site.destination()));
        let accepted = std::thread::spawn(move || l.accept(Duration::from_secs(60)));
        let ep = tcp(addr);
        let t = Duration::from_secs(5);

        // A certificate from another CA (the stranger trusts our CA: it still gets no entry).
        let foreign = Ca::new("another CA");
        let leaf = foreign.issue(
            &["ninja-source"],
            ExtendedKeyUsagePurpose::ClientAuth,
            false,
        );
        let creds = site.dir.credentials("foreign", &site.ca, leaf);
        let stranger = SourceTls::new(&creds, "127.0.0.1").unwrap();
        assert_refused(transport::connect_tls(&ep, 1, t, &stranger), "UnknownCA");
        // Our CA, but expired.
        let expired = site.source_named("ninja-source", true);
        assert_refused(
            transport::connect_tls(&ep, 1, t, &expired),
            "CertificateExpired",
        );
        // Our CA, valid, but not a name the destination takes.
        let intruder = site.source_named("intruder", false);
        assert_refused(
            transport::connect_tls(&ep, 1, t, &intruder),
            "BadCertificate",
        );
        // A genuine source dialling a name the destination's certificate does not carry.
        let leaf = site.ca.issue(
            &["ninja-source"],
            ExtendedKeyUsagePurpose::ClientAuth,
            false,
        );
        let creds = site.dir.credentials("misdialled", &site.ca, leaf);
        let misdialled = SourceTls::new(&creds, "other-host").unwrap();
        assert_refused(
            transport::connect_tls(&ep, 1, t, &misdialled),
            "NotValidForName",
        );
        // A clear-text source.
        assert!(transport::connect(&ep, 1, t).is_err());

        let genuine = transport::connect_tls(&ep, 2, t, &site.source()).unwrap();
        let got = accepted.join().unwrap().unwrap();
        assert_eq!(got.memory.len(), 2);
        assert!(genuine.control.is_encrypted() && got.control.is_encrypted());
    });
}

#[test]
fn a_source_refuses_an_expired_destination() {
    within(60, || {
        let site = Site::new("expired-destination");
        let leaf = site
            .ca
            .issue(&["127.0.0.1"], ExtendedKeyUsagePurpose::ServerAuth, true);
        let creds = site.dir.credentials("destination", &site.ca, leaf);
        let (l, addr) = listener(Some(DestinationTls::new(&creds, &[]).unwrap()));
        let waiting = std::thread::spawn(move || l.accept(Duration::from_secs(3)));
        let r = transport::connect_tls(&tcp(addr), 1, Duration::from_secs(5), &site.source());
        assert_refused(r, "Expired");
        // Nothing reached the destination's protocol.
        assert!(waiting.join().unwrap().is_err());
    });
}

#[test]
fn a_forged_byte_fails_the_migration_the_source_runs_on_and_the_listener_serves_again() {
    within(120, || {
        let site = Site::new("forged");
        let (l, addr) = listener(Some(site.destination()));
        let l = std::sync::Arc::new(l);
        // One byte inverted 1 MiB into the first memory connection.
        let proxy = Proxy::start(
            addr,
            Fault::FlipByte {
                conn: 1,
                after: 1 << 20,
            },
        );
        let src = SoftwareGuest::start(guest_config()).unwrap();
        let dst = std::thread::spawn({
            let l = l.clone();
            move || receive(l.accept(Duration::from_secs(20))?)
        });
        let conns =
            transport::connect_tls(&tcp(proxy.addr), 2, Duration::from_secs(5), &site.source())
                .unwrap();
        let err = source::migrate(&src, conns, &config(), None).expect_err("forgery accepted");
        assert!(matches!(err, Error::Migration { .. }), "{err:?}");
        let dst_err = match dst.join().unwrap() {
            Ok(_) => panic!("the destination ran a guest from a forged stream"),
            Err(e) => e,
        };
        assert!(
            format!("{:?}", root(&dst_err)).contains("DecryptError"),
            "destination: {dst_err:?}"
        );
        assert_runs(&src);
        drop(proxy);

        // The same listener takes the next, genuine migration of the same guest.
        let dst = std::thread::spawn(move || receive(l.accept(Duration::from_secs(20))?));
        let conns =
            transport::connect_tls(&tcp(addr), 2, Duration::from_secs(5), &site.source()).unwrap();
        source::migrate(&src, conns, &config(), None).unwrap();
        let moved = dst.join().unwrap().unwrap();
        assert_moved(&moved, &src);
    });
}

#[test]
fn a_genuine_source_gets_through_idle_garbage_and_slow_peers() {
    within(120, || {
        let site = Site::new("crowd");
        let (l, addr) = listener(Some(site.destination()));
        let idle: Vec<TcpStream> = (0..100)
            .map(|_| TcpStream::connect(addr).unwrap())
            .collect();
        let mut garbage: Vec<TcpStream> = Vec::new();
        for i in 0..10u8 {
            let mut g = TcpStream::connect(addr).unwrap();
            // Half look like a TLS record header, half are noise.
            let mut bytes: Vec<u8> = (0..600u32)
                .map(|b| (b as u8).wrapping_mul(31) ^ i)
                .collect();
            if i % 2 == 0 {
                bytes[..5].copy_from_slice(&[0x16, 0x03, 0x01, 0x02, 0x00]);
            }
            let _ = g.write_all(&bytes);
            garbage.push(g);
        }
        // Two peers sending a byte every 200 ms (a slow hello).
        let slow: Vec<_> = (0..2)
            .map(|_| {
                std::thread::spawn(move || {
                    let mut s = TcpStream::connect(addr).unwrap();
                    for b in [0x16u8, 0x03, 0x01, 0x00, 0x40, 0x01, 0x00] {
                        if s.write_all(&[b]).is_err() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                })
            })
            .collect();
        let src = SoftwareGuest::start(guest_config()).unwrap();
        let dst = std::thread::spawn(move || receive(l.accept(Duration::from_secs(30))?));
        let started = Instant::now();
        let conns =
            transport::connect_tls(&tcp(addr), 2, Duration::from_secs(5), &site.source()).unwrap();
        // Served side by side: no stranger's handshake wait (5 s) delayed ours.
        let waited = started.elapsed();
        source::migrate(&src, conns, &config(), None).unwrap();
        let moved = dst.join().unwrap().unwrap();
        assert_moved(&moved, &src);
        assert!(
            waited < Duration::from_secs(4),
            "connecting took {waited:?}"
        );
        for s in slow {
            s.join().unwrap();
        }
        drop((idle, garbage));
    });
}

#[test]
fn credentials_that_do_not_load_are_named() {
    let dir = Dir::new("bad-files");
    let missing = Credentials::source_in(&dir.0);
    let e = SourceTls::new(&missing, "127.0.0.1").unwrap_err();
    assert!(e.to_string().contains("ca-cert.pem"), "{e}");
    std::fs::write(dir.0.join("ca-cert.pem"), "not a certificate").unwrap();
    let e = SourceTls::new(&missing, "127.0.0.1").unwrap_err();
    assert!(e.to_string().contains("ca-cert.pem"), "{e}");
}
