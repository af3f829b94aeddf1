//! `ssh:` endpoints against a real OpenSSH server: a private sshd on loopback (see
//! `common/sshd.rs`), reached through the plan's `ssh_program`. Every monitor and guest channel
//! of a plan is `ssh:HOST:/path` and the destination QEMU is launched through `ssh HOST`, so the
//! code path is the one a remote host takes; only the host is this one.
//!
//! The plans move a TCG guest from the passthrough HCA STAND-IN (`ivshmem-plain`, hot-added as
//! a scheduler assigns a VF) to Ethernet (`virtio-net`), judged as `controller_qemu.rs` judges:
//! by the guest's own PCI report through its agent. Failure cases: an sshd that cannot be
//! reached, a remote socket that is not there, a destination that fails to start on its host,
//! and forwards whose ssh dies mid-plan (source monitor, destination monitor, guest channel):
//! each ends in a clear error and a rollback that leaves no ssh and no destination behind.
//!
//! Tests in this file run one at a time (QEMUs and sshds are not cheap on two cores).

#[path = "common/guest.rs"]
mod guest;

#[path = "common/sshd.rs"]
mod sshd;

use guest::*;
use ninja_testkit::{
    Fixtures, Qemu, QemuConfig, RawQmp, free_tcp_port, qemu_or_skip, sshd_or_skip,
};
use serde_json::json;
use sshd::{Sshd, kill_processes_mentioning, processes_mentioning};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use symvirt::controller::{Controller, Event, GuestNotice, Outcome, Phase, Report};
use symvirt::host_channel::qemu_channel_args;
use symvirt::protocol::Interconnect;
use symvirt::remote::{Address, Connector};

const MEMORY_MIB: u32 = 192;
const MAC: &str = "52:54:00:00:20:01";

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// The sshd, if this machine has QEMU's fixtures (when `qemu`) and OpenSSH's server.
fn sshd_for(test: &str, tag: &str) -> Option<Sshd> {
    let binary = sshd_or_skip(test)?;
    match Sshd::start(&binary, tag) {
        Ok(s) => Some(s),
        Err(why) => {
            ninja_testkit::skip(ninja_testkit::Requirement::Ssh, test, &why);
            None
        }
    }
}

/// Paths and processes a test creates; removed / killed (by pid, found by the private
/// directory in their command lines) on drop.
struct Cleanup {
    dir: PathBuf,
    files: Vec<PathBuf>,
}

impl Cleanup {
    fn new(tag: &str) -> Cleanup {
        let dir = std::env::temp_dir().join(format!("symvirt-ssh-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Cleanup {
            dir,
            files: Vec::new(),
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        // Destination QEMUs launched through ssh are children of sshd's session, not ours.
        kill_processes_mentioning(&self.dir.display().to_string());
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Waits until `check` holds (processes take a moment to exit after a kill).
fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let started = Instant::now();
    while !check() {
        assert!(started.elapsed() < Duration::from_secs(30), "{what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

// ---- The Connector alone: forwards through the real sshd ----

/// A unix socket server answering each line with the line upper-cased.
fn upper_case_server(path: &Path) -> std::thread::JoinHandle<()> {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut buf = [0u8; 256];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || buf[..n] == *b"quit\n" {
                        return;
                    }
                    let _ = conn.write_all(&buf[..n].to_ascii_uppercase());
                }
            });
        }
    })
}

fn round_trip(local: &Path, text: &str) -> String {
    let mut s = UnixStream::connect(local).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(text.as_bytes()).unwrap();
    let mut buf = vec![0u8; text.len()];
    s.read_exact(&mut buf).unwrap();
    String::from_utf8(buf).unwrap()
}

#[test]
fn forwards_through_sshd_are_shared_restarted_when_dead_and_gone_after_drop() {
    let test = "forwards_through_sshd_are_shared_restarted_when_dead_and_gone_after_drop";
    let Some(sshd) = sshd_for(test, "fwd") else {
        return;
    };
    let cleanup = Cleanup::new("fwd");
    let remote = cleanup.dir.join("upper.sock");
    let _server = upper_case_server(&remote);
    let address: Address = format!("ssh:{}:{}", sshd.alias(), remote.display())
        .parse()
        .unwrap();
    let deadline = || Instant::now() + Duration::from_secs(60);

    let connector = Connector::new(sshd.ssh_program().to_string_lossy()).unwrap();
    let local = connector.local_path(&address, deadline()).unwrap();
    assert_ne!(local, remote, "an ssh: address must go through a forward");
    assert_eq!(round_trip(&local, "hello\n"), "HELLO\n");
    // The same remote socket shares one forward (one ssh per endpoint, not per connection).
    assert_eq!(connector.local_path(&address, deadline()).unwrap(), local);
    let pids = connector.forward_pids();
    assert_eq!(pids.len(), 1, "{pids:?}");
    assert_eq!(sshd.clients(), pids, "the forward is the only client");

    // Its ssh dies (a dropped connection): another is started at the same local path, so a
    // client that reconnects by path gets through again.
    // SAFETY: kill(2) on the pid of the forward this test's connector started.
    unsafe {
        libc::kill(pids[0] as i32, libc::SIGKILL);
    }
    eventually("the forward was not restarted", || {
        let now = connector.forward_pids();
        now.len() == 1 && now != pids
    });
    let why = connector
        .forward_failure(&address)
        .expect("a forward that died is explained");
    assert!(why.contains("ended") && why.contains("signal"), "{why}");
    assert_eq!(connector.local_path(&address, deadline()).unwrap(), local);
    assert_eq!(round_trip(&local, "again\n"), "AGAIN\n");
    assert_eq!(sshd.clients(), connector.forward_pids());

    // A server on another port that nobody runs: a clear error, and no ssh left behind.
    let closed: Address = format!("ssh:{}:{}", sshd.closed_alias(), remote.display())
        .parse()
        .unwrap();
    let err = connector.local_path(&closed, deadline()).unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains(sshd.closed_alias()) && text.contains("Connection refused"),
        "{text}"
    );

    drop(connector);
    eventually("forwards outlived their connector", || {
        sshd.clients().is_empty()
    });
    assert!(!local.exists(), "the forward's socket was left behind");
}

#[test]
fn a_dead_runs_forwards_are_ended_and_nobody_elses() {
    let test = "a_dead_runs_forwards_are_ended_and_nobody_elses";
    let Some(sshd) = sshd_for(test, "deadfwd") else {
        return;
    };
    let cleanup = Cleanup::new("deadfwd");
    let remote = cleanup.dir.join("upper.sock");
    let _server = upper_case_server(&remote);
    let address: Address = format!("ssh:{}:{}", sshd.alias(), remote.display())
        .parse()
        .unwrap();
    let deadline = || Instant::now() + Duration::from_secs(60);
    let ssh = sshd.ssh_program().to_string_lossy().into_owned();

    let dead_dir = cleanup.dir.join("run.fwd");
    let dead = Connector::in_dir(ssh.clone(), dead_dir.clone()).unwrap();
    let local = dead.local_path(&address, deadline()).unwrap();
    assert!(local.starts_with(&dead_dir), "{}", local.display());
    let dead_pids = dead.forward_pids();
    // Its controller dies: nothing of it runs its drop, its ssh client stays.
    std::mem::forget(dead);
    let other = Connector::in_dir(ssh, cleanup.dir.join("other.fwd")).unwrap();
    other.local_path(&address, deadline()).unwrap();
    let other_pids = other.forward_pids();
    assert!(
        Connector::in_dir("ssh", dead_dir.clone()).is_err(),
        "the dead run's place is taken"
    );

    let ended = symvirt::remote::clear_forwards(&dead_dir, deadline()).unwrap();
    assert_eq!(ended, 1);
    assert!(
        !dead_dir.exists(),
        "the dead run's forward directory was left"
    );
    eventually("the dead run's ssh outlived clear_forwards", || {
        sshd.clients() == other_pids
    });
    assert!(dead_pids.iter().all(|p| !other_pids.contains(p)));
    // Clearing again finds nothing; the live connector's forward still works.
    assert_eq!(
        symvirt::remote::clear_forwards(&dead_dir, deadline()).unwrap(),
        0
    );
    let live = other.local_path(&address, deadline()).unwrap();
    assert_eq!(round_trip(&live, "still\n"), "STILL\n");
}

// ---- Plans over ssh with real QEMU ----

fn agent_command(vm: &str) -> String {
    format!(
        "/bin/sh -c /bin/ninja-guest-dirtier${{IFS}}4&/bin/symvirt-agent${{IFS}}--ranks${{IFS}}0${{IFS}}--vm${{IFS}}{vm}${{IFS}}--report-pci"
    )
}

/// A source VM: booted, agent up, the stand-in HCA assigned.
struct SourceVm {
    name: String,
    qemu: Qemu,
    channel: PathBuf,
    hca_mem: PathBuf,
}

fn start_source(fixtures: &Fixtures, cleanup: &mut Cleanup, tag: &str) -> SourceVm {
    start_named_source(fixtures, cleanup, tag, "vm0")
}

fn start_named_source(
    fixtures: &Fixtures,
    cleanup: &mut Cleanup,
    tag: &str,
    name: &str,
) -> SourceVm {
    let channel = cleanup.dir.join(format!("{name}-source-sv.sock"));
    let config = QemuConfig::new(fixtures)
        .memory_mib(MEMORY_MIB)
        .guest_run(&agent_command(name))
        .args(qemu_channel_args(&channel));
    let mut qemu = Qemu::start(config).unwrap();
    qemu.wait_serial("symvirt-agent", PATIENCE).unwrap();
    let hca_mem = PathBuf::from(format!(
        "/dev/shm/symvirt-ssh-{}-{tag}-{name}-hca0",
        std::process::id()
    ));
    cleanup.files.push(hca_mem.clone());
    qemu.add_hca_standin(&hca_mem).unwrap();
    SourceVm {
        name: name.into(),
        qemu,
        channel,
        hca_mem,
    }
}

fn toml_list(args: &[String]) -> String {
    let quoted: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// A one-VM plan whose every endpoint is `ssh:HOST:` (the source's through `source_host`,
/// the destination's through `sshd`'s alias) and whose destination is launched through ssh
/// into `dest_dir`.
fn ssh_plan(
    fixtures: &Fixtures,
    sshd: &Sshd,
    source_host: &str,
    source: &SourceVm,
    dest_dir: &Path,
    settings: &str,
) -> String {
    format!(
        "{}{}",
        plan_settings(sshd, settings),
        vm_toml(fixtures, sshd, source_host, source, dest_dir, MAC)
    )
}

fn plan_settings(sshd: &Sshd, settings: &str) -> String {
    format!(
        "[settings]\nssh_program = \"{}\"\n{settings}\n",
        sshd.ssh_program().display()
    )
}

/// One `[[vm]]` of an ssh plan (see [`ssh_plan`]), its destination NIC with `mac`.
fn vm_toml(
    fixtures: &Fixtures,
    sshd: &Sshd,
    source_host: &str,
    source: &SourceVm,
    dest_dir: &Path,
    mac: &str,
) -> String {
    std::fs::create_dir_all(dest_dir).unwrap();
    let host = sshd.alias();
    let args = QemuConfig::new(fixtures)
        .memory_mib(MEMORY_MIB)
        .guest_run(&agent_command(&source.name))
        .args(qemu_channel_args(&dest_dir.join("sv.sock")))
        .machine_args(&dest_dir.join("serial.log"));
    format!(
        r#"
[[vm]]
name = "{name}"
[vm.source]
qmp = "ssh:{source_host}:{sq}"
channel = "ssh:{source_host}:{sc}"
interconnect = {{ kind = "infiniband", hca = "hca0", port = 1 }}
[[vm.source.devices]]
kind = "hca-standin"
id = "hca0"
mem_path = "{mem}"
size = 1048576
[vm.destination]
qmp = "ssh:{host}:{d}/qmp.sock"
channel = "ssh:{host}:{d}/sv.sock"
migrate_uri = "tcp:127.0.0.1:{port}"
interconnect = {{ kind = "ethernet", mac = "{mac}" }}
launch = {{ host = "{host}", args = {args} }}
[[vm.destination.devices]]
kind = "virtio-net"
id = "net0"
mac = "{mac}"
"#,
        name = source.name,
        sq = source.qemu.qmp_path().display(),
        sc = source.channel.display(),
        mem = source.hca_mem.display(),
        d = dest_dir.display(),
        port = free_tcp_port(),
        args = toml_list(&args),
    )
}

fn run(plan: &str, log_dir: &Path, on_event: impl Fn(&Event) + Sync) -> Report {
    let plan = match symvirt::plan::parse(plan) {
        Ok(p) => p,
        Err(issues) => panic!("plan: {issues:#?}\n{plan}"),
    };
    let sink = |e: &Event| {
        eprintln!("event: {}", serde_json::to_string(e).unwrap());
        on_event(e);
    };
    let report = Controller::new(plan, &sink).run_qemu(log_dir).unwrap();
    eprintln!("report: {report:#?}");
    report
}

fn infiniband() -> Interconnect {
    Interconnect::Infiniband {
        hca: "hca0".into(),
        port: 1,
        pci: None,
    }
}

/// The forwards (`ssh -N`) started through `sshd`'s wrapper that still run.
fn forwards_left(sshd: &Sshd) -> Vec<u32> {
    sshd.clients()
        .into_iter()
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.split(|&b| b == 0).any(|a| a == b"-N"))
        })
        .collect()
}

/// The source runs with its stand-in HCA and its guest works on InfiniBand (after a rollback).
fn assert_source_runs_with_its_hca(source: &mut SourceVm, epoch: u64, before: usize) {
    let mut qmp = RawQmp::connect(source.qemu.qmp_path()).unwrap();
    let status = qmp.execute("query-status", json!({})).unwrap();
    assert_eq!(status["running"], json!(true), "{status}");
    let peripherals = qmp
        .execute("qom-list", json!({"path": "/machine/peripheral"}))
        .unwrap();
    assert!(
        peripherals
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["name"] == json!("hca0")),
        "stand-in not re-attached: {peripherals}"
    );
    drop(qmp);
    let devices = guest_pci_until(&source.channel, &source.name, epoch, infiniband(), |d| {
        has(d, IVSHMEM_DEVICE) && !has_nic(d)
    });
    assert!(
        has(&devices, IVSHMEM_DEVICE),
        "guest lost its HCA: {devices:?}"
    );
    assert!(!has_nic(&devices), "{devices:?}");
    wait_more_passes(
        || source.qemu.serial(),
        passes(&source.qemu.serial()).max(before),
        "source",
    );
}

fn mac_of(i: usize) -> String {
    format!("52:54:00:00:21:{:02x}", i + 1)
}

/// Two VMs at once (`max_parallel = 2`): their forwards and ssh launches run side by side.
#[test]
fn plan_over_ssh_moves_two_vms_from_hca_standin_to_ethernet() {
    let test = "plan_over_ssh_moves_two_vms_from_hca_standin_to_ethernet";
    let Some(fixtures) = qemu_or_skip(test) else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(sshd) = sshd_for(test, "move") else {
        return;
    };
    let mut cleanup = Cleanup::new("move");
    let mut sources: Vec<SourceVm> = ["vm0", "vm1"]
        .iter()
        .map(|n| start_named_source(&fixtures, &mut cleanup, "move", n))
        .collect();
    let before: Vec<usize> = sources.iter().map(|s| passes(&s.qemu.serial())).collect();
    let dest_dirs: Vec<PathBuf> = sources
        .iter()
        .map(|s| cleanup.dir.join(format!("{}-dest", s.name)))
        .collect();
    let mut plan = plan_settings(&sshd, "max_parallel = 2");
    for (i, s) in sources.iter().enumerate() {
        plan.push_str(&vm_toml(
            &fixtures,
            &sshd,
            sshd.alias(),
            s,
            &dest_dirs[i],
            &mac_of(i),
        ));
    }
    // While the plan runs, its endpoints really go through ssh forwards: note the remote
    // socket of every forward seen at each event.
    let forwarded = Mutex::new(std::collections::BTreeSet::new());
    let report = run(&plan, &cleanup.dir, |_| {
        for pid in forwards_left(&sshd) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let args: Vec<String> = cmdline
                .split(|&b| b == 0)
                .map(|a| String::from_utf8_lossy(a).into_owned())
                .collect();
            if let Some(spec) = args
                .iter()
                .position(|a| a == "-L")
                .and_then(|i| args.get(i + 1))
            {
                let remote = spec.rsplit_once(':').map(|(_, r)| r.to_owned());
                forwarded.lock().unwrap().extend(remote);
            }
        }
    });
    assert_eq!(report.outcome, Outcome::Completed, "{:?}", report.errors);
    let mut expected = std::collections::BTreeSet::new();
    for (s, d) in sources.iter().zip(&dest_dirs) {
        for p in [
            s.qemu.qmp_path().to_owned(),
            s.channel.clone(),
            d.join("qmp.sock"),
            d.join("sv.sock"),
        ] {
            expected.insert(p.display().to_string());
        }
    }
    assert_eq!(*forwarded.lock().unwrap(), expected);
    // The plan's forwards ended with the plan.
    eventually("forwards outlived the plan", || {
        forwards_left(&sshd).is_empty()
    });

    // Asked through a forward of the test's own.
    let connector = Connector::new(sshd.ssh_program().to_string_lossy()).unwrap();
    for (i, s) in sources.iter_mut().enumerate() {
        let vm = &report.vms[i];
        assert_resumed_on_mac(vm, &mac_of(i));
        assert!(vm.transferred > 0);
        // The destination was launched through ssh: the controller's child is the ssh client.
        let launcher = vm.destination_pid.expect("a launched destination");
        let launcher_cmdline = read(Path::new(&format!("/proc/{launcher}/cmdline")));
        assert!(
            launcher_cmdline.contains("ssh_config") && launcher_cmdline.contains(sshd.alias()),
            "{launcher_cmdline:?}"
        );
        // The source let go; the guest runs at the destination, sees the NIC and not the
        // stand-in, and the dirtier goes on.
        eventually("the source QEMU still runs", || !s.qemu.is_running());
        let channel: Address = format!("ssh:{}:{}/sv.sock", sshd.alias(), dest_dirs[i].display())
            .parse()
            .unwrap();
        let local = connector
            .local_path(&channel, Instant::now() + PATIENCE)
            .unwrap();
        let nic = Interconnect::Ethernet {
            mac: mac_of(i),
            iface: None,
            pci: None,
        };
        let devices = guest_pci_until(&local, &s.name, report.epoch, nic, |d| {
            has_nic(d) && !has(d, IVSHMEM_DEVICE)
        });
        assert!(has_nic(&devices), "{}: no virtio-net: {devices:?}", s.name);
        assert!(
            !has(&devices, IVSHMEM_DEVICE),
            "{}: stand-in still there: {devices:?}",
            s.name
        );
        assert!(
            before[i] > 0 || passes(&s.qemu.serial()) > 0,
            "{}: the dirtier never ran",
            s.name
        );
        let serial = dest_dirs[i].join("serial.log");
        wait_more_passes(|| read(&serial), passes(&read(&serial)), &s.name);
    }
}

#[test]
fn unreachable_sshd_fails_in_connect_and_the_vm_keeps_running() {
    let test = "unreachable_sshd_fails_in_connect_and_the_vm_keeps_running";
    let Some(fixtures) = qemu_or_skip(test) else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(sshd) = sshd_for(test, "closed") else {
        return;
    };
    let mut cleanup = Cleanup::new("closed");
    let source = start_source(&fixtures, &mut cleanup, "closed");
    let before = passes(&source.qemu.serial());
    let dest_dir = cleanup.dir.join("dest");
    // The source host's sshd "is down": its alias names a port where nothing listens.
    let plan = ssh_plan(
        &fixtures,
        &sshd,
        sshd.closed_alias(),
        &source,
        &dest_dir,
        "",
    );
    let report = run(&plan, &cleanup.dir, |_| {});
    match &report.outcome {
        Outcome::RolledBack { phase, error } => {
            let error = error.to_string();
            assert_eq!(*phase, Phase::Connect, "{error}");
            assert!(
                error.contains(sshd.closed_alias()) && error.contains("Connection refused"),
                "{error}"
            );
        }
        other => panic!("expected a rollback from connect: {other:?}"),
    }
    assert_eq!(report.vms[0].destination_pid, None, "nothing launched");
    assert!(sshd.clients().is_empty(), "ssh left: {:?}", sshd.clients());
    // Untouched: running, stand-in attached, the dirtier goes on.
    let mut qmp = RawQmp::connect(source.qemu.qmp_path()).unwrap();
    let status = qmp.execute("query-status", json!({})).unwrap();
    assert_eq!(status["running"], json!(true), "{status}");
    drop(qmp);
    wait_more_passes(|| source.qemu.serial(), before, "source");
}

/// Which forward a test kills, and when.
enum Cut {
    /// The destination monitor's, once the switchover is done (attach starts).
    DestinationMonitorBeforeAttach,
    /// The source monitor's, while the pre-copy runs.
    SourceMonitorMidMigration,
    /// The source guest channel's, once the guest quiesced (detach starts); the plan then
    /// fails at attach (the NIC's PCI slot is taken), so the rollback must still reach the
    /// guest to resume it.
    SourceChannelAfterQuiesce,
}

/// Runs a plan over ssh, kills one of its forwards (its ssh client, as a dropped connection
/// would end it) and checks the rollback: the failed phase and side in a clear error, no ssh
/// of the plan left, the destination QEMU (launched through ssh, so not the controller's
/// child) gone, and the source running with its stand-in HCA, its guest resumed on it.
fn forward_killed_case(test: &str, tag: &str, cut: Cut) {
    let Some(fixtures) = qemu_or_skip(test) else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(sshd) = sshd_for(test, tag) else {
        return;
    };
    let mut cleanup = Cleanup::new(tag);
    let mut source = start_source(&fixtures, &mut cleanup, tag);
    let before = passes(&source.qemu.serial());
    let dest_dir = cleanup.dir.join("dest");
    let dest_qmp = format!("{}/qmp.sock", dest_dir.display());
    let forward_ended = |victim: &str| format!("ssh forward to {}:{victim} ", sshd.alias());
    // Which forward, the plan's settings, and the phase and error words expected.
    let (victim, settings, expect_phase, expect_error) = match cut {
        // The error names the side and blames the forward, not QEMU.
        Cut::DestinationMonitorBeforeAttach => (
            dest_qmp.clone(),
            "",
            Phase::Attach,
            vec!["vm0 destination".to_owned(), forward_ended(&dest_qmp)],
        ),
        // Slow enough that the kill lands while the pre-copy runs.
        Cut::SourceMonitorMidMigration => {
            let qmp = source.qemu.qmp_path().display().to_string();
            (
                qmp.clone(),
                "max_bandwidth = 20000000",
                Phase::Migrate,
                vec!["vm0 source".to_owned(), forward_ended(&qmp)],
            )
        }
        Cut::SourceChannelAfterQuiesce => (
            source.channel.display().to_string(),
            "",
            Phase::Attach,
            vec!["vm0 destination: attach".to_owned()],
        ),
    };
    let mut plan = ssh_plan(&fixtures, &sshd, sshd.alias(), &source, &dest_dir, settings);
    if let Cut::SourceChannelAfterQuiesce = cut {
        // Slot 1 is the PIIX3 bridge on the pc machine: the NIC cannot be plugged.
        plan.push_str("properties = { addr = \"0x1\" }\n");
    }
    let killed = Mutex::new(Vec::new());
    let report = run(&plan, &cleanup.dir, |e| {
        let now = match (&cut, e) {
            (
                Cut::DestinationMonitorBeforeAttach,
                Event::PhaseStarted {
                    phase: Phase::Attach,
                },
            ) => true,
            (
                Cut::SourceChannelAfterQuiesce,
                Event::PhaseStarted {
                    phase: Phase::Detach,
                },
            ) => true,
            (
                Cut::SourceMonitorMidMigration,
                Event::VmProgress {
                    phase: Phase::Migrate,
                    fraction: Some(f),
                    ..
                },
            ) => *f < 1.0,
            _ => false,
        };
        if !now || !killed.lock().unwrap().is_empty() {
            return;
        }
        for pid in forwards_left(&sshd) {
            let cmdline = read(Path::new(&format!("/proc/{pid}/cmdline")));
            if cmdline.contains(&format!(":{victim}\0")) {
                // SAFETY: kill(2) on the pid of an ssh forward this test's plan started.
                unsafe {
                    libc::kill(pid as i32, libc::SIGKILL);
                }
                killed.lock().unwrap().push(pid);
            }
        }
    });
    assert_eq!(killed.lock().unwrap().len(), 1, "one forward to kill");
    match &report.outcome {
        Outcome::RolledBack { phase, error } => {
            let error = error.to_string();
            assert_eq!(*phase, expect_phase, "{error}");
            for words in &expect_error {
                assert!(error.contains(words.as_str()), "{words:?} not in {error}");
            }
        }
        // The whole outcome, and every failure with its causes (a `failed` outcome's reason is
        // in the rollback's errors, not in the outcome's first error).
        other => panic!(
            "expected a rollback from {expect_phase}, the plan ended {}: {other:#?}\nerrors:\n{}",
            other.as_str(),
            report
                .errors
                .iter()
                .map(|e| format!("  {e}\n"))
                .collect::<String>()
        ),
    }
    // No ssh of the plan is left, and never two copies of the guest.
    eventually("ssh clients outlived the plan", || {
        sshd.clients().is_empty()
    });
    eventually("the destination QEMU outlived the rollback", || {
        processes_mentioning(&dest_qmp).is_empty()
    });
    match &report.vms[0].guest {
        GuestNotice::Resumed { interconnect, .. } => match interconnect {
            Interconnect::Infiniband { hca, .. } => assert_eq!(hca, "hca0"),
            other => panic!("resumed on {other:?}"),
        },
        other => panic!("guest was not resumed: {other:?}"),
    }
    assert_source_runs_with_its_hca(&mut source, report.epoch, before);
}

#[test]
fn destination_monitor_forward_killed_before_attach_rolls_back() {
    forward_killed_case(
        "destination_monitor_forward_killed_before_attach_rolls_back",
        "cutdst",
        Cut::DestinationMonitorBeforeAttach,
    );
}

#[test]
fn source_monitor_forward_killed_mid_migration_rolls_back() {
    forward_killed_case(
        "source_monitor_forward_killed_mid_migration_rolls_back",
        "cutsrc",
        Cut::SourceMonitorMidMigration,
    );
}

#[test]
fn missing_remote_monitor_socket_fails_in_reserve_with_what_ssh_said() {
    let test = "missing_remote_monitor_socket_fails_in_reserve_with_what_ssh_said";
    let Some(fixtures) = qemu_or_skip(test) else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(sshd) = sshd_for(test, "absent") else {
        return;
    };
    let mut cleanup = Cleanup::new("absent");
    let source = start_source(&fixtures, &mut cleanup, "absent");
    let before = passes(&source.qemu.serial());
    let dest_dir = cleanup.dir.join("dest");
    // An already running destination is named, but nothing listens at its remote path.
    let absent = format!("{}/absent-qmp.sock", dest_dir.display());
    let plan: String = ssh_plan(
        &fixtures,
        &sshd,
        sshd.alias(),
        &source,
        &dest_dir,
        "[settings.deadlines_ms]\nreserve = 3000",
    )
    .lines()
    .filter(|l| !l.starts_with("launch = "))
    .map(|l| l.replace(&format!("{}/qmp.sock", dest_dir.display()), &absent) + "\n")
    .collect();
    let report = run(&plan, &cleanup.dir, |_| {});
    match &report.outcome {
        Outcome::RolledBack { phase, error } => {
            let error = error.to_string();
            assert_eq!(*phase, Phase::Reserve, "{error}");
            assert!(
                error.contains(&absent) && error.contains("open failed"),
                "{error}"
            );
        }
        other => panic!("expected a rollback from reserve: {other:?}"),
    }
    eventually("ssh clients outlived the plan", || {
        sshd.clients().is_empty()
    });
    let mut qmp = RawQmp::connect(source.qemu.qmp_path()).unwrap();
    let status = qmp.execute("query-status", json!({})).unwrap();
    assert_eq!(status["running"], json!(true), "{status}");
    drop(qmp);
    wait_more_passes(|| source.qemu.serial(), before, "source");
}

#[test]
fn source_channel_forward_killed_after_quiesce_still_resumes_the_guest_on_rollback() {
    forward_killed_case(
        "source_channel_forward_killed_after_quiesce_still_resumes_the_guest_on_rollback",
        "cutchan",
        Cut::SourceChannelAfterQuiesce,
    );
}

#[test]
fn destination_that_fails_to_start_remotely_is_reported_with_qemus_words() {
    let test = "destination_that_fails_to_start_remotely_is_reported_with_qemus_words";
    let Some(fixtures) = qemu_or_skip(test) else {
        return;
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(sshd) = sshd_for(test, "nostart") else {
        return;
    };
    let mut cleanup = Cleanup::new("nostart");
    let source = start_source(&fixtures, &mut cleanup, "nostart");
    let before = passes(&source.qemu.serial());
    // The destination's directory does not exist on its host: QEMU cannot bind its sockets.
    let dest_dir = cleanup.dir.join("dest");
    let plan = ssh_plan(&fixtures, &sshd, sshd.alias(), &source, &dest_dir, "");
    std::fs::remove_dir_all(&dest_dir).unwrap();
    let report = run(&plan, &cleanup.dir, |_| {});
    match &report.outcome {
        Outcome::RolledBack { phase, error } => {
            let error = error.to_string();
            assert_eq!(*phase, Phase::Reserve, "{error}");
            assert!(
                error.contains("destination QEMU exited") && error.contains("qemu-system-x86_64:"),
                "{error}"
            );
            assert!(!error.contains("ninja-launch-pid"), "{error}");
        }
        other => panic!("expected a rollback from reserve: {other:?}"),
    }
    eventually("ssh clients outlived the plan", || {
        sshd.clients().is_empty()
    });
    let mut qmp = RawQmp::connect(source.qemu.qmp_path()).unwrap();
    let status = qmp.execute("query-status", json!({})).unwrap();
    assert_eq!(status["running"], json!(true), "{status}");
    drop(qmp);
    wait_more_passes(|| source.qemu.serial(), before, "source");
}
