//! The guest agent with real ranks over unix sockets, the host channel listening for it: the
//! whole guest side of the protocol in one process (and the agent binary as a child process).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use symvirt::agent::{Agent, AgentConfig};
use symvirt::data_net::DataNetwork;
use symvirt::guest_link::ChannelSpec;
use symvirt::host_channel::{ChannelOptions, HostChannel};
use symvirt::protocol::{GuestMessage, HostMessage, Interconnect, PciDevice};
use symvirt::rank::{RankClient, RankEvent};
use symvirt::session::SessionState;
use symvirt::sysfs::SysDirs;
use symvirt::{Error, sysfs};

const PATIENCE: Duration = Duration::from_secs(60);
const MAC: &str = "52:54:00:ab:cd:01";

fn soon() -> Instant {
    Instant::now() + PATIENCE
}

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> TempDir {
        let d = std::env::temp_dir().join(format!("symvirt-agent-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        TempDir(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn write(path: PathBuf, text: &str) {
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(path, text).unwrap();
}

/// A fake sysfs: an ivshmem stand-in gone, a virtio-net NIC present with MAC on eth1.
fn fake_sysfs(dir: &Path) {
    let pci = dir.join("pci");
    for (addr, dev, class) in [
        ("0000:00:02.0", "0x1000", "0x020000"),
        ("0000:00:03.0", "0x1003", "0x078000"),
    ] {
        write(pci.join(addr).join("vendor"), "0x1af4\n");
        write(pci.join(addr).join("device"), &format!("{dev}\n"));
        write(pci.join(addr).join("class"), &format!("{class}\n"));
    }
    write(dir.join("net/eth0/address"), "52:54:00:00:00:99\n");
    write(dir.join("net/eth1/address"), &format!("{MAC}\n"));
}

/// Host channel listening + agent connected to it + the rank socket.
struct Rig {
    dir: TempDir,
    host: HostChannel,
    agent: Option<Agent>,
}

impl Rig {
    fn new(tag: &str, ranks: u32) -> Rig {
        Rig::waiting(tag, ranks, PATIENCE)
    }

    /// A rig whose agent waits `interconnect_wait` for a new interconnect to appear.
    fn waiting(tag: &str, ranks: u32, interconnect_wait: Duration) -> Rig {
        Rig::build(tag, ranks, interconnect_wait, None)
    }

    /// A rig whose agent has a data network to check (never re-plumbed here: that would change
    /// this machine's routes).
    fn with_data(tag: &str, ranks: u32, data: DataNetwork) -> Rig {
        Rig::build(tag, ranks, PATIENCE, Some(data))
    }

    fn build(
        tag: &str,
        ranks: u32,
        interconnect_wait: Duration,
        data_network: Option<DataNetwork>,
    ) -> Rig {
        let dir = TempDir::new(tag);
        fake_sysfs(&dir.0);
        let host_sock = dir.0.join("host.sock");
        let host = HostChannel::listen(&host_sock, ChannelOptions::labelled(tag)).unwrap();
        let agent = Agent::spawn(AgentConfig {
            vm: format!("vm-{tag}"),
            channel: ChannelSpec::Unix(host_sock),
            rank_socket: dir.0.join("run/agent.sock"),
            ranks,
            report_pci: true,
            sys: SysDirs {
                pci: dir.0.join("pci"),
                net: dir.0.join("net"),
                infiniband: dir.0.join("infiniband"),
            },
            interconnect_wait: Some(interconnect_wait),
            data_network,
        })
        .unwrap();
        let info = host.wait_hello(soon()).unwrap();
        assert_eq!(info.vm, format!("vm-{tag}"));
        assert_eq!(info.ranks, ranks);
        Rig {
            dir,
            host,
            agent: Some(agent),
        }
    }

    fn rank(&self, rank: u32) -> Result<RankClient, Error> {
        RankClient::connect(self.dir.0.join("run/agent.sock"), rank, PATIENCE)
    }

    fn prepare(&self, epoch: u64, deadline_ms: u64) {
        self.host
            .send(&HostMessage::Prepare { epoch, deadline_ms })
            .unwrap();
    }

    fn wait_outcome(&self) -> GuestMessage {
        self.host
            .wait_for(|m| !matches!(m, GuestMessage::Hello { .. }), soon())
            .unwrap()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // The agent first: it removes its socket from the directory.
        self.agent.take();
    }
}

fn expect_prepare(rank: &mut RankClient, epoch: u64) {
    match rank.next_event(Some(PATIENCE)).unwrap() {
        Some(RankEvent::Prepare { epoch: e, .. }) if e == epoch => {}
        other => panic!(
            "rank {}: expected prepare {epoch}, got {other:?}",
            rank.rank()
        ),
    }
}

fn ethernet() -> Interconnect {
    Interconnect::Ethernet {
        mac: MAC.into(),
        iface: None,
        pci: Some("0000:00:02.0".into()),
    }
}

#[test]
fn quiesced_only_after_the_last_rank_and_resume_reaches_every_rank() {
    let rig = Rig::new("twoRanks", 2);
    let mut r0 = rig.rank(0).unwrap();
    let mut r1 = rig.rank(1).unwrap();
    assert_eq!(r0.expected_ranks(), 2);

    rig.prepare(1, 60_000);
    expect_prepare(&mut r0, 1);
    expect_prepare(&mut r1, 1);
    r0.quiesced(1).unwrap();
    // Rank 1 is not quiesced yet: nothing may come back.
    let early = rig.host.wait_for(
        |m| matches!(m, GuestMessage::Quiesced { .. }),
        Instant::now() + Duration::from_millis(500),
    );
    assert!(matches!(early, Err(Error::Timeout)), "{early:?}");
    assert!(matches!(
        rig.host.state(),
        SessionState::Preparing { epoch: 1, .. }
    ));
    r1.quiesced(1).unwrap();
    assert_eq!(rig.wait_outcome(), GuestMessage::Quiesced { epoch: 1 });

    rig.host
        .send(&HostMessage::Resume {
            epoch: 1,
            interconnect: ethernet(),
        })
        .unwrap();
    // Every rank is told the new interconnect, with the interface the MAC belongs to.
    let told = Interconnect::Ethernet {
        mac: MAC.into(),
        iface: Some("eth1".into()),
        pci: Some("0000:00:02.0".into()),
    };
    for r in [&mut r0, &mut r1] {
        assert_eq!(
            r.next_event(Some(PATIENCE)).unwrap(),
            Some(RankEvent::Resume {
                epoch: 1,
                interconnect: told.clone()
            })
        );
    }
    r0.resumed(1).unwrap();
    let early = rig.host.wait_for(
        |m| matches!(m, GuestMessage::Resumed { .. }),
        Instant::now() + Duration::from_millis(500),
    );
    assert!(matches!(early, Err(Error::Timeout)), "{early:?}");
    r1.resumed(1).unwrap();
    let expected_pci = vec![
        PciDevice {
            address: "0000:00:02.0".into(),
            vendor: 0x1af4,
            device: 0x1000,
            class: 0x020000,
        },
        PciDevice {
            address: "0000:00:03.0".into(),
            vendor: 0x1af4,
            device: 0x1003,
            class: 0x078000,
        },
    ];
    assert_eq!(
        rig.wait_outcome(),
        GuestMessage::Resumed {
            epoch: 1,
            interconnect: told,
            pci_devices: Some(expected_pci),
        }
    );
    assert_eq!(rig.host.state(), SessionState::Running);
    assert_eq!(r0.try_event().unwrap(), None);
}

/// Brings `ranks` through prepare to quiesced for `epoch`.
fn quiesce(rig: &Rig, ranks: &mut [&mut RankClient], epoch: u64) {
    rig.prepare(epoch, 60_000);
    for r in ranks.iter_mut() {
        expect_prepare(r, epoch);
        r.quiesced(epoch).unwrap();
    }
    assert_eq!(rig.wait_outcome(), GuestMessage::Quiesced { epoch });
}

#[test]
fn resume_waits_for_the_new_nic_and_fails_keeping_ranks_paused_when_it_never_comes() {
    let rig = Rig::waiting("nicWait", 1, Duration::from_millis(1500));
    let mut r0 = rig.rank(0).unwrap();
    let late_mac = "52:54:00:ab:cd:02";
    let late = Interconnect::Ethernet {
        mac: late_mac.into(),
        iface: None,
        pci: None,
    };
    // The NIC is probed while the agent waits: the rank is resumed on it.
    quiesce(&rig, &mut [&mut r0], 1);
    rig.host
        .send(&HostMessage::Resume {
            epoch: 1,
            interconnect: late.clone(),
        })
        .unwrap();
    assert_eq!(
        r0.next_event(Some(Duration::from_millis(300))).unwrap(),
        None
    );
    write(rig.dir.0.join("net/eth2/address"), &format!("{late_mac}\n"));
    match r0.next_event(Some(PATIENCE)).unwrap() {
        Some(RankEvent::Resume {
            epoch: 1,
            interconnect: Interconnect::Ethernet { iface, .. },
        }) => assert_eq!(iface.as_deref(), Some("eth2")),
        other => panic!("expected resume on eth2, got {other:?}"),
    }
    r0.resumed(1).unwrap();
    assert!(matches!(
        rig.wait_outcome(),
        GuestMessage::Resumed { epoch: 1, .. }
    ));

    // A NIC that never appears: `failed`, and the rank is neither resumed nor aborted, since
    // the host will move the VM back to where the rank can go on.
    quiesce(&rig, &mut [&mut r0], 2);
    let missing = Interconnect::Ethernet {
        mac: "52:54:00:ab:cd:03".into(),
        iface: None,
        pci: None,
    };
    rig.host
        .send(&HostMessage::Resume {
            epoch: 2,
            interconnect: missing,
        })
        .unwrap();
    match rig.wait_outcome() {
        GuestMessage::Failed { epoch: 2, reason } => assert!(
            reason.contains("no network interface has mac 52:54:00:ab:cd:03"),
            "{reason}"
        ),
        other => panic!("expected failed, got {other:?}"),
    }
    assert_eq!(r0.try_event().unwrap(), None);
    // Still quiesced: the host can abort the epoch (the ranks go on where they are).
    rig.host.send(&HostMessage::Abort { epoch: 2 }).unwrap();
    assert_eq!(
        r0.next_event(Some(PATIENCE)).unwrap(),
        Some(RankEvent::Abort { epoch: 2 })
    );
}

#[test]
fn a_missed_deadline_fails_the_epoch_releases_the_ranks_and_the_next_epoch_works() {
    let rig = Rig::new("deadline", 2);
    let mut r0 = rig.rank(0).unwrap();
    let mut r1 = rig.rank(1).unwrap();
    rig.prepare(1, 300);
    expect_prepare(&mut r0, 1);
    expect_prepare(&mut r1, 1);
    r0.quiesced(1).unwrap();
    match rig.wait_outcome() {
        GuestMessage::Failed { epoch: 1, reason } => {
            assert!(reason.contains("1 of 2 ranks quiesced"), "{reason}")
        }
        other => panic!("expected failed, got {other:?}"),
    }
    assert_eq!(
        r0.next_event(Some(PATIENCE)).unwrap(),
        Some(RankEvent::Abort { epoch: 1 })
    );
    assert_eq!(
        r1.next_event(Some(PATIENCE)).unwrap(),
        Some(RankEvent::Abort { epoch: 1 })
    );
    rig.host.send(&HostMessage::Abort { epoch: 1 }).unwrap();
    assert_eq!(rig.host.state(), SessionState::Running);

    rig.prepare(2, 60_000);
    expect_prepare(&mut r0, 2);
    expect_prepare(&mut r1, 2);
    r1.quiesced(2).unwrap();
    r0.quiesced(2).unwrap();
    assert_eq!(rig.wait_outcome(), GuestMessage::Quiesced { epoch: 2 });
    // The host aborts a quiesced epoch (e.g. the migration could not start): ranks continue.
    rig.host.send(&HostMessage::Abort { epoch: 2 }).unwrap();
    assert_eq!(
        r0.next_event(Some(PATIENCE)).unwrap(),
        Some(RankEvent::Abort { epoch: 2 })
    );
}

#[test]
fn a_rank_that_cannot_quiesce_fails_the_epoch_with_its_reason_and_the_next_epoch_works() {
    let rig = Rig::new("unable", 2);
    let mut r0 = rig.rank(0).unwrap();
    let mut r1 = rig.rank(1).unwrap();
    rig.prepare(1, 60_000);
    expect_prepare(&mut r0, 1);
    expect_prepare(&mut r1, 1);
    r0.quiesced(1).unwrap();
    // A reason longer than the protocol allows is cut, not refused.
    let long = format!("one-sided windows are open {}", "é".repeat(400));
    r1.unable(1, &long).unwrap();
    match rig.wait_outcome() {
        GuestMessage::Failed { epoch: 1, reason } => {
            assert!(
                reason.starts_with("rank 1 cannot quiesce: one-sided windows are open"),
                "{reason}"
            );
            assert!(
                reason.len() <= symvirt::protocol::MAX_REASON,
                "{} bytes",
                reason.len()
            );
        }
        other => panic!("expected failed, got {other:?}"),
    }
    for r in [&mut r0, &mut r1] {
        assert_eq!(
            r.next_event(Some(PATIENCE)).unwrap(),
            Some(RankEvent::Abort { epoch: 1 })
        );
    }
    rig.host.send(&HostMessage::Abort { epoch: 1 }).unwrap();
    // An `unable` for an epoch that is not being prepared changes nothing.
    r1.unable(1, "late").unwrap();
    rig.prepare(2, 60_000);
    expect_prepare(&mut r0, 2);
    expect_prepare(&mut r1, 2);
    r0.quiesced(2).unwrap();
    r1.quiesced(2).unwrap();
    assert_eq!(rig.wait_outcome(), GuestMessage::Quiesced { epoch: 2 });
}

#[test]
fn a_missing_data_address_refuses_the_cut_and_releases_ranks_pulled_into_it() {
    // 192.0.2.0/24 is reserved for documentation: no interface here has it.
    let rig = Rig::with_data("noData", 1, DataNetwork::parse("192.0.2.55/24").unwrap());
    let mut r0 = rig.rank(0).unwrap();
    rig.prepare(1, 60_000);
    match rig.wait_outcome() {
        GuestMessage::Failed { epoch: 1, reason } => assert!(
            reason.contains("data address 192.0.2.55/24 is not configured"),
            "{reason}"
        ),
        other => panic!("{other:?}"),
    }
    // No prepare reaches the rank, but an abort does: its peers elsewhere may pull it into the
    // cut, and it must not wait for a prepare that never comes.
    assert_eq!(
        r0.next_event(Some(PATIENCE)).unwrap(),
        Some(RankEvent::Abort { epoch: 1 })
    );
    // The host's abort of that epoch releases the ranks again; the next epoch is refused too.
    rig.host.send(&HostMessage::Abort { epoch: 1 }).unwrap();
    assert_eq!(
        r0.next_event(Some(PATIENCE)).unwrap(),
        Some(RankEvent::Abort { epoch: 1 })
    );
    rig.prepare(2, 60_000);
    assert!(matches!(
        rig.wait_outcome(),
        GuestMessage::Failed { epoch: 2, .. }
    ));
}

#[test]
fn a_configured_data_address_lets_the_cut_proceed() {
    let rig = Rig::with_data("withData", 1, DataNetwork::parse("127.0.0.1/8").unwrap());
    let mut r0 = rig.rank(0).unwrap();
    rig.prepare(1, 60_000);
    expect_prepare(&mut r0, 1);
    r0.quiesced(1).unwrap();
    assert_eq!(rig.wait_outcome(), GuestMessage::Quiesced { epoch: 1 });
}

#[test]
fn a_rank_leaving_mid_epoch_fails_it() {
    let rig = Rig::new("leave", 2);
    let mut r0 = rig.rank(0).unwrap();
    let mut r1 = rig.rank(1).unwrap();
    rig.prepare(1, 60_000);
    expect_prepare(&mut r0, 1);
    expect_prepare(&mut r1, 1);
    r0.quiesced(1).unwrap();
    drop(r1);
    match rig.wait_outcome() {
        GuestMessage::Failed { epoch: 1, reason } => {
            assert!(reason.contains("rank 1 left"), "{reason}")
        }
        other => panic!("expected failed, got {other:?}"),
    }
    assert_eq!(
        r0.next_event(Some(PATIENCE)).unwrap(),
        Some(RankEvent::Abort { epoch: 1 })
    );
}

#[test]
fn rank_registration_is_checked_and_a_late_rank_catches_up() {
    let rig = Rig::new("register", 2);
    let r0 = rig.rank(0).unwrap();
    match rig.rank(0) {
        Err(Error::RankRefused(reason)) => assert!(reason.contains("already"), "{reason}"),
        other => panic!("duplicate rank accepted: {other:?}"),
    }
    let mut r1 = rig.rank(1).unwrap();
    // A second agent in the same guest cannot take the rank socket over.
    let second = Agent::spawn(AgentConfig {
        channel: ChannelSpec::Unix(rig.dir.0.join("nowhere.sock")),
        rank_socket: rig.dir.0.join("run/agent.sock"),
        ..AgentConfig::default()
    });
    match second {
        Err(Error::Config(why)) => assert!(why.contains("another agent"), "{why}"),
        other => panic!("second agent started: {other:?}"),
    }
    match rig.rank(2) {
        Err(Error::RankRefused(reason)) => assert!(reason.contains("expects 2"), "{reason}"),
        other => panic!("third rank accepted: {other:?}"),
    }
    // Rank 0 restarts before the epoch; it registers again and gets the prepare it missed.
    drop(r0);
    let deadline = soon();
    let mut r0 = loop {
        match rig.rank(0) {
            Ok(r) => break r,
            Err(Error::RankRefused(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("rank 0 could not re-register: {e}"),
        }
    };
    rig.prepare(1, 60_000);
    expect_prepare(&mut r1, 1);
    expect_prepare(&mut r0, 1);
    r0.quiesced(1).unwrap();
    r1.quiesced(1).unwrap();
    assert_eq!(rig.wait_outcome(), GuestMessage::Quiesced { epoch: 1 });
}

#[test]
fn the_agent_reconnects_to_a_new_host_and_says_hello_again() {
    let mut rig = Rig::new("rehost", 0);
    let host_sock = rig.dir.0.join("host.sock");
    // The controller restarts: the old channel goes away, a new one listens on the same path.
    let placeholder =
        HostChannel::connect(rig.dir.0.join("nowhere.sock"), ChannelOptions::default()).unwrap();
    drop(std::mem::replace(&mut rig.host, placeholder));
    rig.host = HostChannel::listen(&host_sock, ChannelOptions::labelled("rehost2")).unwrap();
    assert_eq!(rig.host.wait_hello(soon()).unwrap().vm, "vm-rehost");
    rig.prepare(1, 60_000);
    assert_eq!(rig.wait_outcome(), GuestMessage::Quiesced { epoch: 1 });
}

/// Kills and reaps the child on drop.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn agent_binary_with_no_ranks_quiesces_at_once_and_reports_pci_devices() {
    let dir = TempDir::new("binary");
    let host_sock = dir.0.join("host.sock");
    let host = HostChannel::listen(&host_sock, ChannelOptions::labelled("binary")).unwrap();
    let log = dir.0.join("agent.log");
    let mut agent = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_symvirt-agent"))
            .arg("--channel")
            .arg(format!("unix:{}", host_sock.display()))
            .arg("--socket")
            .arg(dir.0.join("agent.sock"))
            .args(["--ranks", "0", "--vm", "vm7", "--report-pci"])
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let info = host.wait_hello(soon()).unwrap();
    assert_eq!((info.vm.as_str(), info.ranks, info.protocol), ("vm7", 0, 1));
    host.send(&HostMessage::Prepare {
        epoch: 1,
        deadline_ms: 60_000,
    })
    .unwrap();
    let quiesced = host
        .wait_for(|m| !matches!(m, GuestMessage::Hello { .. }), soon())
        .unwrap();
    assert_eq!(quiesced, GuestMessage::Quiesced { epoch: 1 });
    let ib = Interconnect::Infiniband {
        hca: "mlx5_0".into(),
        port: 1,
        pci: None,
    };
    host.send(&HostMessage::Resume {
        epoch: 1,
        interconnect: ib.clone(),
    })
    .unwrap();
    let resumed = host
        .wait_for(|m| matches!(m, GuestMessage::Resumed { .. }), soon())
        .unwrap();
    let this_machine = sysfs::pci_devices(Path::new(sysfs::PCI_DEVICES_DIR));
    assert_eq!(
        resumed,
        GuestMessage::Resumed {
            epoch: 1,
            interconnect: ib,
            pci_devices: Some(this_machine),
        }
    );
    assert!(agent.0.try_wait().unwrap().is_none(), "agent still running");
    // The agent logs a message after sending it: give the last line time to land.
    let started = Instant::now();
    while !fs::read_to_string(&log)
        .unwrap()
        .contains("sent resumed{epoch=1}")
        && started.elapsed() < PATIENCE
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(agent);
    let out = fs::read_to_string(&log).unwrap();
    for needle in [
        "symvirt-agent: host connected",
        "symvirt-agent: sent quiesced{epoch=1}",
        "symvirt-agent: sent resumed{epoch=1}",
    ] {
        assert!(
            out.contains(needle),
            "{needle:?} not in agent output:\n{out}"
        );
    }
}

#[test]
fn agent_binary_refuses_bad_arguments() {
    for args in [
        &["--ranks", "many"][..],
        &["--channel", "tcp:1.2.3.4:5"],
        &["--vm", "bad name"],
        &["--frobnicate"],
        &["--socket"],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_symvirt-agent"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.starts_with("symvirt-agent: error:"),
            "{args:?}: {text}"
        );
    }
}

#[test]
fn an_agent_that_listens_is_reached_like_a_guest_and_survives_the_host_reconnecting() {
    let dir = TempDir::new("listen");
    let channel = dir.0.join("sv.sock");
    let agent = Agent::spawn(AgentConfig {
        vm: "vm-listen".into(),
        channel: ChannelSpec::Listen(channel.clone()),
        rank_socket: dir.0.join("run/agent.sock"),
        ranks: 1,
        ..AgentConfig::default()
    })
    .unwrap();
    let started = Instant::now();
    let host = loop {
        match HostChannel::connect(&channel, ChannelOptions::labelled("listen")) {
            Ok(h)
                if h.wait_hello(Instant::now() + Duration::from_secs(1))
                    .is_ok() =>
            {
                break h;
            }
            _ => {
                assert!(started.elapsed() < PATIENCE, "the agent never answered");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    let mut r0 = RankClient::connect(dir.0.join("run/agent.sock"), 0, PATIENCE).unwrap();
    host.send(&HostMessage::Prepare {
        epoch: 1,
        deadline_ms: 60_000,
    })
    .unwrap();
    expect_prepare(&mut r0, 1);
    r0.quiesced(1).unwrap();
    assert_eq!(
        host.wait_for(|m| !matches!(m, GuestMessage::Hello { .. }), soon())
            .unwrap(),
        GuestMessage::Quiesced { epoch: 1 }
    );
    // The controller moves on to another connection (as it does to a migrated guest's), in
    // the middle of the epoch: the agent takes it and the epoch goes on.
    let session = host.session();
    drop(host);
    let host =
        HostChannel::connect_continuing(&channel, ChannelOptions::labelled("listen2"), session)
            .unwrap();
    // It connects in the background.
    let started = Instant::now();
    while !host.is_connected() {
        assert!(started.elapsed() < PATIENCE, "never reconnected");
        std::thread::sleep(Duration::from_millis(10));
    }
    host.send(&HostMessage::Resume {
        epoch: 1,
        interconnect: ethernet(),
    })
    .unwrap();
    assert!(matches!(
        r0.next_event(Some(PATIENCE)).unwrap(),
        Some(RankEvent::Resume { epoch: 1, .. })
    ));
    r0.resumed(1).unwrap();
    assert!(matches!(
        host.wait_for(|m| matches!(m, GuestMessage::Resumed { .. }), soon())
            .unwrap(),
        GuestMessage::Resumed { epoch: 1, .. }
    ));
    drop(agent);
    assert!(!channel.exists(), "the agent left its socket behind");
}
