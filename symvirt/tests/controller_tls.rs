//! A plan over QEMU's TLS (`[settings.tls]`): the controller creates the `tls-creds-x509`
//! objects and sets `tls-creds` at both ends over QMP. One TCG guest (the dirtier and the
//! agent) moves through a recording TCP proxy: in clear text its memory is readable on the
//! wire (the control), over TLS it is not (the controller reaching that destination's monitor
//! over QEMU's TLS chardev, `tls:`); a destination whose certificate another CA signed is
//! refused, and the guest goes on at its source.

#[path = "common/guest.rs"]
mod guest;
#[path = "common/plans.rs"]
mod plans;

use guest::*;
use ninja_testkit::{Fixtures, Qemu, QemuConfig, RawQmp, free_tcp_port, qemu_or_skip};
use plans::*;
use serde_json::json;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use symvirt::controller::Outcome;
use symvirt::host_channel::qemu_channel_args;

const MEMORY_MIB: u32 = 128;
/// In the guest's memory (its kernel command line, its initramfs): readable in a clear-text
/// migration stream.
const MARKER: &[u8] = b"ninja-guest-dirtier";
/// At most this much of a stream is kept.
const CAPTURE_LIMIT: usize = 512 << 20;

fn machine(fixtures: &Fixtures, channel: &Path) -> QemuConfig {
    QemuConfig::new(fixtures)
        .memory_mib(MEMORY_MIB)
        .guest_run(
            "/bin/sh -c /bin/ninja-guest-dirtier${IFS}4&/bin/symvirt-agent${IFS}--ranks${IFS}0${IFS}--vm${IFS}vm0${IFS}--interconnect-wait-ms${IFS}0",
        )
        .args(qemu_channel_args(channel))
}

/// A TCP proxy on loopback that forwards one connection at a time to `to` and keeps what the
/// client sent (the migration stream, source to destination).
struct Recorder {
    port: u16,
    sent: Arc<Mutex<Vec<u8>>>,
}

impl Recorder {
    fn start(to: u16) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let keep = sent.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(mut client) = client else { return };
                let Ok(mut server) = TcpStream::connect(("127.0.0.1", to)) else {
                    continue;
                };
                let (mut back_from, mut back_to) =
                    (server.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut back_from, &mut back_to);
                });
                let keep = keep.clone();
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n @ 1..) = client.read(&mut buf) {
                        {
                            let mut k = keep.lock().unwrap();
                            if k.len() < CAPTURE_LIMIT {
                                k.extend_from_slice(&buf[..n]);
                            }
                        }
                        if server.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = server.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Recorder { port, sent }
    }

    fn sent(&self) -> Vec<u8> {
        self.sent.lock().unwrap().clone()
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A destination QEMU waiting for the migration on `port`, with TLS credentials from
/// `creds` when given (as a site starts one: the object on the command line, `tls-creds` and
/// the listening port set over QMP), and then also a second monitor on a TLS chardev at
/// `tls_monitor`.
fn destination(
    fixtures: &Fixtures,
    channel: &Path,
    creds: Option<&Path>,
    port: u16,
    tls_monitor: Option<u16>,
) -> Qemu {
    let mut config = machine(fixtures, channel).incoming("defer");
    if let Some(dir) = creds {
        config = config.args([
            "-object".to_owned(),
            format!(
                "tls-creds-x509,id=ninja-tls,dir={},endpoint=server,verify-peer=on",
                dir.display()
            ),
        ]);
        if let Some(m) = tls_monitor {
            config = config.args([
                "-chardev".to_owned(),
                format!("socket,id=montls,host=127.0.0.1,port={m},server=on,wait=off,tls-creds=ninja-tls"),
                "-mon".to_owned(),
                "chardev=montls,mode=control".to_owned(),
            ]);
        }
    }
    let q = Qemu::start(config).expect("start the destination");
    let mut qmp = RawQmp::connect(q.qmp_path()).unwrap();
    if creds.is_some() {
        qmp.execute("migrate-set-parameters", json!({"tls-creds": "ninja-tls"}))
            .unwrap();
    }
    qmp.execute(
        "migrate-incoming",
        json!({"uri": format!("tcp:127.0.0.1:{port}")}),
    )
    .unwrap();
    q
}

/// Runs `plan`, which must roll back (`why`: what should refuse it), and checks the guest
/// goes on at `at`.
fn assert_rolled_back(plan: &str, dir: &Path, at: &Qemu, why: &str) -> symvirt::controller::Report {
    let (report, _) = run(plan, dir, |_| {});
    match &report.outcome {
        Outcome::RolledBack { error, .. } => eprintln!("refused: {}", error.source.chain()),
        other => panic!("{why} did not refuse: {other:?}"),
    }
    wait_more_passes(
        || at.serial(),
        passes(&at.serial()),
        &format!("vm0 still at its source after {why}"),
    );
    assert!(!at.serial().contains("MISMATCH"));
    report
}

/// A plan from `from` to `to` (each a QEMU with its channel), migrating to `port`, over TLS
/// with the credentials directory and allowed source names in `tls`; the destination's
/// monitor is `to_qmp` when given, else its unix socket.
fn plan(
    from: (&Qemu, &Path),
    to: (&Qemu, &Path),
    port: u16,
    tls: Option<(&Path, &[&str])>,
    to_qmp: Option<&str>,
) -> String {
    let tls = tls.map_or(String::new(), |(d, allowed)| {
        format!(
            "[settings.tls]\ncreds_dir = \"{}\"\nallowed_sources = {allowed:?}\n",
            d.display()
        )
    });
    let ib = ib();
    let to_qmp = to_qmp.map_or_else(
        || format!("unix:{}", to.0.qmp_path().display()),
        str::to_owned,
    );
    format!(
        "[settings]\n{tls}[settings.deadlines_ms]\nmigrate = 60000\n\n[[vm]]\nname = \"vm0\"\n\
         [vm.source]\nqmp = \"unix:{}\"\nchannel = \"unix:{}\"\ninterconnect = {ib}\n\
         [vm.destination]\nqmp = \"{to_qmp}\"\nchannel = \"unix:{}\"\n\
         migrate_uri = \"tcp:127.0.0.1:{port}\"\ninterconnect = {ib}\n",
        from.0.qmp_path().display(),
        from.1.display(),
        to.1.display(),
    )
}

/// A plan to a destination the controller launches in `to` (QMP, channel, console there),
/// accepting only sources whose certificate has one of the distinguished names `allowed`.
fn launched_plan(
    fixtures: &Fixtures,
    from: (&Qemu, &Path),
    to: &Path,
    creds: &Path,
    allowed: &[&str],
) -> String {
    let ib = ib();
    let args = machine(fixtures, &to.join("sv.sock")).machine_args(&to.join("serial.log"));
    format!(
        "[settings.tls]\ncreds_dir = \"{}\"\nallowed_sources = {allowed:?}\n\n[[vm]]\nname = \"vm0\"\n\
         [vm.source]\nqmp = \"unix:{}\"\nchannel = \"unix:{}\"\ninterconnect = {ib}\n\
         [vm.destination]\nqmp = \"unix:{}\"\nchannel = \"unix:{}\"\n\
         migrate_uri = \"tcp:127.0.0.1:{}\"\ninterconnect = {ib}\nlaunch = {{ args = {args:?} }}\n",
        creds.display(),
        from.0.qmp_path().display(),
        from.1.display(),
        to.join("qmp.sock").display(),
        to.join("sv.sock").display(),
        free_tcp_port(),
    )
}

/// Kills the destinations a plan launched (they outlive it, as they should).
struct KillLaunched(Vec<u32>);

impl Drop for KillLaunched {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .status();
        }
    }
}

#[test]
fn a_plan_over_tls_cannot_be_read_on_the_wire_and_a_foreign_destination_is_refused() {
    let Some(fixtures) = qemu_or_skip("a_plan_over_tls") else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("symvirt-ctl-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (site, foreign) = (dir.join("site"), dir.join("foreign"));
    ninja_testkit::tls::site_credentials(&site, "Ninja test site CA", &["127.0.0.1"])
        .expect("openssl");
    ninja_testkit::tls::site_credentials(&foreign, "Another CA", &["127.0.0.1"]).unwrap();
    let channel = |name: &str| -> PathBuf { dir.join(format!("{name}-sv.sock")) };

    let mut a = Qemu::start(machine(&fixtures, &channel("a"))).expect("start the source");
    a.wait_serial("symvirt-agent", PATIENCE).unwrap();
    let serial_of = |q: &Qemu| q.serial();

    // The control: in clear text, the guest's memory crosses the wire readable.
    let port = free_tcp_port();
    let b = destination(&fixtures, &channel("b"), None, port, None);
    let wire = Recorder::start(port);
    let (report, _) = run(
        &plan(
            (&a, &channel("a")),
            (&b, &channel("b")),
            wire.port,
            None,
            None,
        ),
        &dir,
        |_| {},
    );
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.errors);
    let clear = wire.sent();
    assert!(
        contains(&clear, MARKER),
        "the control stream ({} bytes) shows no guest memory",
        clear.len()
    );
    drop(a);

    // Over TLS: the same guest moves on, and the wire shows none of its memory. The
    // controller drives the destination through its TLS monitor (tls:).
    let port = free_tcp_port();
    let monitor = free_tcp_port();
    let c = destination(&fixtures, &channel("c"), Some(&site), port, Some(monitor));
    let wire = Recorder::start(port);
    let (report, _) = run(
        &plan(
            (&b, &channel("b")),
            (&c, &channel("c")),
            wire.port,
            Some((&site, &["CN=ninja-source"])),
            Some(&format!("tls:127.0.0.1:{monitor}")),
        ),
        &dir,
        |_| {},
    );
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.errors);
    let sealed = wire.sent();
    assert!(
        sealed.len() > 1 << 20,
        "only {} bytes crossed",
        sealed.len()
    );
    assert!(
        !contains(&sealed, MARKER),
        "guest memory readable in the TLS stream"
    );
    // TLS 1.3 records (content type 23, version 3.3) carry it.
    assert!(
        contains(&sealed, &[0x17, 0x03, 0x03]),
        "no TLS application data records"
    );
    wait_more_passes(|| serial_of(&c), passes(&c.serial()), "vm0 at c");
    drop(b);

    // A destination whose certificate another CA signed: refused, the guest goes on at c.
    let port = free_tcp_port();
    let d = destination(&fixtures, &channel("d"), Some(&foreign), port, None);
    let to_d = plan(
        (&c, &channel("c")),
        (&d, &channel("d")),
        port,
        Some((&site, &[])),
        None,
    );
    assert_rolled_back(&to_d, &dir, &c, "a foreign destination");
    let mut qmp = RawQmp::connect(c.qmp_path()).unwrap();
    let status = qmp.execute("query-status", json!({})).unwrap();
    assert_eq!(status["running"], json!(true), "{status}");
    drop(qmp);
    drop(d);

    // A destination the site started, listening already: the plan's allowed_sources still
    // reach it (tls-authz set over QMP before the source connects), and this source is not
    // among them.
    let port = free_tcp_port();
    let g = destination(&fixtures, &channel("g"), Some(&site), port, None);
    let to_g = plan(
        (&c, &channel("c")),
        (&g, &channel("g")),
        port,
        Some((&site, &["CN=another-source"])),
        None,
    );
    assert_rolled_back(
        &to_g,
        &dir,
        &c,
        "a site's destination allowing another source",
    );
    assert!(
        g.qemu_log().contains("CN=ninja-source") && g.qemu_log().contains("denied"),
        "the site's destination does not show the refusal: {}",
        g.qemu_log()
    );
    drop(g);

    // tls-authz: a destination that accepts only another source's certificate refuses this
    // one; one that names it takes the guest.
    let mut launched = KillLaunched(Vec::new());
    let (e, f) = (dir.join("e"), dir.join("f"));
    for d in [&e, &f] {
        std::fs::create_dir_all(d).unwrap();
    }
    let to_e = launched_plan(
        &fixtures,
        (&c, &channel("c")),
        &e,
        &site,
        &["CN=another-source"],
    );
    let report = assert_rolled_back(
        &to_e,
        &dir,
        &c,
        "a launched destination allowing another source",
    );
    launched
        .0
        .extend(report.vms.iter().filter_map(|v| v.destination_pid));
    // The destination said why (its log is the launcher's).
    let log = read(&dir.join("vm0-destination.log"));
    assert!(
        log.contains("CN=ninja-source") && log.contains("denied"),
        "the destination's log does not show the refusal: {log}"
    );
    let (report, _) = run(
        &launched_plan(
            &fixtures,
            (&c, &channel("c")),
            &f,
            &site,
            &["CN=ninja-source"],
        ),
        &dir,
        |_| {},
    );
    launched
        .0
        .extend(report.vms.iter().filter_map(|v| v.destination_pid));
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.errors);
    let at_f = || read(&f.join("serial.log"));
    wait_more_passes(at_f, passes(&at_f()), "vm0 at f");
    assert!(!at_f().contains("MISMATCH"));
    drop((c, launched));
    std::thread::sleep(Duration::from_millis(100));
    let _ = std::fs::remove_dir_all(&dir);
}
