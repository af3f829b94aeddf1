//! The guest agent with real ranks over unix sockets, the host channel listening for it: the
//! whole guest side of the protocol in one process (and the agent binary as a child process).

use std::fs;
use std::io::{BufRead, BufReader, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use symvirt::host_channel::{ChannelOptions, HostChannel};
use symvirt::protocol::{GuestMessage, HostMessage, Interconnect, PciDevice};
use symvirt::rank::{RankClient, RankEvent};
use symvirt::session::{GuestSession, SessionState};
use symvirt_agent::agent::{Agent, AgentConfig};
use symvirt_agent::data_net::DataNetwork;
use symvirt_agent::guest_link::ChannelSpec;
use symvirt_agent::sysfs;
use symvirt_agent::sysfs::SysDirs;
use symvirt_proto::Error;

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

/// Host channel + agent connected to it + the rank socket.
struct Rig {
    dir: TempDir,
    host: HostChannel,
    agent: Option<Agent>,
    /// The agent listens on its channel and the host connects (as to a guest's virtio-serial
    /// port), rather than the other way round.
    listens: bool,
}

impl Rig {
    fn new(tag: &str, ranks: u32) -> Rig {
        Rig::build(tag, ranks, false, |_| {})
    }

    /// A rig whose agent waits `interconnect_wait` for a new interconnect to appear.
    fn waiting(tag: &str, ranks: u32, interconnect_wait: Duration) -> Rig {
        Rig::build(tag, ranks, false, |c| {
            c.interconnect_wait = Some(interconnect_wait)
        })
    }

    /// A rig whose agent has a data network to check (never re-plumbed here: that would change
    /// this machine's routes).
    fn with_data(tag: &str, ranks: u32, data: DataNetwork) -> Rig {
        Rig::build(tag, ranks, false, |c| c.data_network = Some(data))
    }

    /// A rig whose agent listens on its channel, as a guest's agent sits at its end of a
    /// virtio-serial port: hosts come and go ([`Rig::host_gone`], [`Rig::host_back`]).
    fn listening(tag: &str, ranks: u32, tune: impl FnOnce(&mut AgentConfig)) -> Rig {
        Rig::build(tag, ranks, true, tune)
    }

    fn build(tag: &str, ranks: u32, listens: bool, tune: impl FnOnce(&mut AgentConfig)) -> Rig {
        let dir = TempDir::new(tag);
        fake_sysfs(&dir.0);
        let host_sock = dir.0.join("host.sock");
        let mut config = AgentConfig {
            vm: format!("vm-{tag}"),
            channel: if listens {
                ChannelSpec::Listen(host_sock.clone())
            } else {
                ChannelSpec::Unix(host_sock.clone())
            },
            rank_socket: dir.0.join("run/agent.sock"),
            ranks,
            report_pci: true,
            sys: SysDirs {
                pci: dir.0.join("pci"),
                net: dir.0.join("net"),
                infiniband: dir.0.join("infiniband"),
            },
            interconnect_wait: Some(PATIENCE),
            ..AgentConfig::default()
        };
        tune(&mut config);
        let host = if listens {
            nowhere(&dir)
        } else {
            HostChannel::listen(&host_sock, ChannelOptions::labelled(tag)).unwrap()
        };
        let mut rig = Rig {
            dir,
            host,
            agent: Some(Agent::spawn(config).unwrap()),
            listens,
        };
        if listens {
            rig.host_back(None);
        }
        let info = rig.host.wait_hello(soon()).unwrap();
        assert_eq!(info.vm, format!("vm-{tag}"));
        assert_eq!(info.ranks, ranks);
        rig
    }

    /// The host goes away (its controller died, or moved on): returns its session.
    fn host_gone(&mut self) -> GuestSession {
        let placeholder = nowhere(&self.dir);
        let gone = std::mem::replace(&mut self.host, placeholder);
        gone.session()
    }

    /// A host comes (back): a new controller (`None`), or one continuing `session`. Returns
    /// once it is connected, and for a new one, once the agent said `hello`.
    fn host_back(&mut self, session: Option<GuestSession>) {
        let label = ChannelOptions::labelled("back");
        let path = self.dir.0.join("host.sock");
        let fresh = session.is_none();
        self.host = match (self.listens, session) {
            (true, None) => HostChannel::connect(&path, label).unwrap(),
            (true, Some(s)) => HostChannel::connect_continuing(&path, label, s).unwrap(),
            (false, None) => HostChannel::listen(&path, label).unwrap(),
            (false, Some(_)) => panic!("a listening host cannot continue a session"),
        };
        let started = Instant::now();
        while !self.host.is_connected() {
            assert!(
                started.elapsed() < PATIENCE,
                "the host never reached the agent"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        if fresh {
            self.host.wait_hello(soon()).unwrap();
        }
    }

    fn rank(&self, rank: u32) -> Result<RankClient, Error> {
        RankClient::connect(self.rank_socket(), rank, PATIENCE)
    }

    /// Registers `rank` again, once the agent has let go of its old connection (or freed a
    /// connection slot).
    fn rank_again(&self, rank: u32) -> RankClient {
        let deadline = soon();
        loop {
            match self.rank(rank) {
                Ok(r) => return r,
                Err(Error::RankRefused(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Err(e) => panic!("rank {rank} could not register again: {e}"),
            }
        }
    }

    fn rank_socket(&self) -> PathBuf {
        self.dir.0.join("run/agent.sock")
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

    /// Waits for the outcome, which must be `failed` for `epoch`: returns its reason.
    fn failure(&self, epoch: u64) -> String {
        match self.wait_outcome() {
            GuestMessage::Failed { epoch: e, reason } if e == epoch => reason,
            other => panic!("expected failed{{epoch={epoch}}}, got {other:?}"),
        }
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        // The agent first: it removes its socket from the directory.
        self.agent.take();
    }
}

/// A host channel that never connects: what a rig holds while no host is there.
fn nowhere(dir: &TempDir) -> HostChannel {
    HostChannel::connect(dir.0.join("nowhere.sock"), ChannelOptions::default()).unwrap()
}

fn expect_prepare(rank: &mut RankClient, epoch: u64) {
    match next_for(rank, epoch) {
        RankEvent::Prepare { epoch: e, .. } if e == epoch => {}
        other => panic!(
            "rank {}: expected prepare {epoch}, got {other:?}",
            rank.rank()
        ),
    }
}

/// The next notice must be `abort` for `epoch`.
fn expect_abort(rank: &mut RankClient, epoch: u64) {
    assert_eq!(
        rank.next_event(Some(PATIENCE)).unwrap(),
        Some(RankEvent::Abort { epoch }),
        "rank {}",
        rank.rank()
    );
}

/// The next notice for `epoch`, skipping repeated aborts of earlier epochs (the host's abort of
/// an epoch the agent had failed already reaches the ranks again).
fn next_for(rank: &mut RankClient, epoch: u64) -> RankEvent {
    loop {
        match rank.next_event(Some(PATIENCE)).unwrap() {
            Some(RankEvent::Abort { epoch: e }) if e < epoch => {}
            Some(event) => return event,
            None => panic!("rank {}: nothing for epoch {epoch}", rank.rank()),
        }
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
    assert!(matches!(early, Err(symvirt::Error::Timeout)), "{early:?}");
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
    assert!(matches!(early, Err(symvirt::Error::Timeout)), "{early:?}");
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
    let reason = rig.failure(2);
    assert!(
        reason.contains("no network interface has mac 52:54:00:ab:cd:03"),
        "{reason}"
    );
    assert_eq!(r0.try_event().unwrap(), None);
    // Still quiesced: the host can abort the epoch (the ranks go on where they are).
    rig.host.send(&HostMessage::Abort { epoch: 2 }).unwrap();
    expect_abort(&mut r0, 2);
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
    let reason = rig.failure(1);
    assert!(reason.contains("1 of 2 ranks quiesced"), "{reason}");
    expect_abort(&mut r0, 1);
    expect_abort(&mut r1, 1);
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
    expect_abort(&mut r0, 2);
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
    let reason = rig.failure(1);
    assert!(
        reason.starts_with("rank 1 cannot quiesce: one-sided windows are open"),
        "{reason}"
    );
    assert!(
        reason.len() <= symvirt::protocol::MAX_REASON,
        "{} bytes",
        reason.len()
    );
    for r in [&mut r0, &mut r1] {
        expect_abort(r, 1);
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
    let reason = rig.failure(1);
    assert!(
        reason.contains("data address 192.0.2.55/24 is not configured"),
        "{reason}"
    );
    // No prepare reaches the rank, but an abort does: its peers elsewhere may pull it into the
    // cut, and it must not wait for a prepare that never comes.
    expect_abort(&mut r0, 1);
    // The host's abort of that epoch releases the ranks again; the next epoch is refused too.
    rig.host.send(&HostMessage::Abort { epoch: 1 }).unwrap();
    expect_abort(&mut r0, 1);
    rig.prepare(2, 60_000);
    rig.failure(2);
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
    let reason = rig.failure(1);
    assert!(reason.contains("rank 1 left"), "{reason}");
    expect_abort(&mut r0, 1);
}

/// A job whose ranks left between the host's last look and its prepare: the prepare fails at
/// once with the reason (not at its deadline); the next job's ranks are waited for again.
#[test]
fn a_prepare_after_the_job_ended_fails_at_once_and_the_next_job_is_cut() {
    let rig = Rig::new("ended", 2);
    let r0 = rig.rank(0).unwrap();
    let r1 = rig.rank(1).unwrap();
    drop(r0);
    drop(r1);
    std::thread::sleep(Duration::from_millis(500)); // the agent sees both go
    let asked = Instant::now();
    rig.prepare(1, 60_000);
    let reason = rig.failure(1);
    assert!(reason.contains("ranks left"), "{reason}");
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "{:?}",
        asked.elapsed()
    );
    rig.host.send(&HostMessage::Abort { epoch: 1 }).unwrap();
    assert_eq!(rig.host.state(), SessionState::Running);
    // A new job: its first rank registers, the prepare waits for the second.
    let mut r0 = rig.rank_again(0);
    rig.prepare(2, 60_000);
    expect_prepare(&mut r0, 2);
    let mut r1 = rig.rank(1).unwrap();
    expect_prepare(&mut r1, 2);
    r0.quiesced(2).unwrap();
    r1.quiesced(2).unwrap();
    assert_eq!(rig.wait_outcome(), GuestMessage::Quiesced { epoch: 2 });
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
        Err(symvirt_agent::Error::Config(why)) => assert!(why.contains("another agent"), "{why}"),
        other => panic!("second agent started: {other:?}"),
    }
    match rig.rank(2) {
        Err(Error::RankRefused(reason)) => assert!(reason.contains("expects 2"), "{reason}"),
        other => panic!("third rank accepted: {other:?}"),
    }
    // Rank 0 restarts before the epoch; it registers again and gets the prepare it missed.
    drop(r0);
    let mut r0 = rig.rank_again(0);
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
    // The controller restarts: the old channel goes away, a new one listens on the same path.
    rig.host_gone();
    rig.host_back(None);
    assert_eq!(rig.host.guest().unwrap().vm, "vm-rehost");
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
        &["--stale-epoch-ms", "soon"],
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
    let mut rig = Rig::listening("listen", 1, |_| {});
    let mut r0 = rig.rank(0).unwrap();
    rig.prepare(1, 60_000);
    expect_prepare(&mut r0, 1);
    r0.quiesced(1).unwrap();
    assert_eq!(rig.wait_outcome(), GuestMessage::Quiesced { epoch: 1 });
    // The controller moves on to another connection (as it does to a migrated guest's), in
    // the middle of the epoch: the agent takes it and the epoch goes on.
    let session = rig.host_gone();
    rig.host_back(Some(session));
    rig.host
        .send(&HostMessage::Resume {
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
        rig.wait_outcome(),
        GuestMessage::Resumed { epoch: 1, .. }
    ));
    let channel = rig.dir.0.join("host.sock");
    rig.agent.take();
    assert!(!channel.exists(), "the agent left its socket behind");
}

/// Whether the agent has shut its end of `rank`'s connection (it dropped the rank).
fn hung_up(rank: &RankClient) -> bool {
    let mut fds = libc::pollfd {
        fd: rank.as_raw_fd(),
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `fds` is one valid pollfd that lives across the call; the count passed is 1.
    let n = unsafe { libc::poll(&mut fds, 1, 0) };
    n > 0 && fds.revents & (libc::POLLHUP | libc::POLLRDHUP) != 0
}

#[test]
fn a_rank_that_stops_reading_is_dropped_and_never_wedges_the_agent() {
    // Rank 0 registers and never reads again; rank 1 reads everything. Each cycle writes two
    // notices to rank 0; about 700 cycles fill its socket buffer, and the agent drops it on
    // the write that times out. The test then registers a new rank 0 that does not read
    // either: 5,000 cycles overflow a rank's buffer several times, and the agent stalls at
    // most `RANK_WRITE_TIMEOUT` for each.
    const CYCLES: u64 = 5_000;
    let rig = Rig::new("stuck", 2);
    let mut stuck = rig.rank(0).unwrap();
    let mut r1 = rig.rank(1).unwrap();
    let (mut drops, mut failed) = (0, 0);
    let started = Instant::now();
    for epoch in 1..=CYCLES {
        rig.prepare(epoch, 60_000);
        match next_for(&mut r1, epoch) {
            RankEvent::Prepare { epoch: e, .. } if e == epoch => {
                rig.host.send(&HostMessage::Abort { epoch }).unwrap();
                assert_eq!(next_for(&mut r1, epoch), RankEvent::Abort { epoch });
            }
            // Rank 0, told first, could not take the prepare: the epoch failed before rank 1
            // heard of it, with a reason naming rank 0.
            RankEvent::Abort { epoch: e } if e == epoch => {
                let reason = rig.failure(epoch);
                let expected = format!("rank 0 dropped during epoch {epoch}: it stopped reading");
                assert!(reason.starts_with(&expected), "{reason}");
                rig.host.send(&HostMessage::Abort { epoch }).unwrap();
                failed += 1;
            }
            other => panic!("epoch {epoch}: rank 1 got {other:?}"),
        }
        if hung_up(&stuck) {
            drops += 1;
            stuck = rig.rank(0).unwrap();
        }
    }
    eprintln!(
        "{CYCLES} cycles in {:.1} s: the rank that does not read was dropped {drops} times, \
         {failed} of them during an epoch",
        started.elapsed().as_secs_f64()
    );
    assert!(drops >= 3, "rank 0 dropped only {drops} times");
    // The agent still completes an epoch, with a rank 0 that reads.
    drop(stuck);
    let mut r0 = rig.rank_again(0);
    let epoch = CYCLES + 1;
    rig.prepare(epoch, 60_000);
    for r in [&mut r0, &mut r1] {
        expect_prepare(r, epoch);
        r.quiesced(epoch).unwrap();
    }
    assert_eq!(rig.wait_outcome(), GuestMessage::Quiesced { epoch });
}

#[test]
fn a_rank_that_cannot_be_written_to_is_dropped_and_fails_the_epoch_naming_it() {
    let rig = Rig::new("unwritable", 2);
    let mut r0 = rig.rank(0).unwrap();
    // Rank 1 registers, then shuts its reading side: nothing can be written to it any more.
    let r1 = UnixStream::connect(rig.rank_socket()).unwrap();
    (&r1)
        .write_all(b"{\"type\":\"register\",\"rank\":1}\n")
        .unwrap();
    let mut line = String::new();
    BufReader::new(&r1).read_line(&mut line).unwrap();
    assert!(line.contains("registered"), "{line}");
    r1.shutdown(Shutdown::Read).unwrap();
    rig.prepare(1, 60_000);
    expect_prepare(&mut r0, 1);
    let reason = rig.failure(1);
    assert!(
        reason.starts_with("rank 1 dropped during epoch 1: a notice could not be written"),
        "{reason}"
    );
    expect_abort(&mut r0, 1);
    // The host aborts; a rank 1 that reads takes the dropped one's place.
    rig.host.send(&HostMessage::Abort { epoch: 1 }).unwrap();
    let mut r1 = rig.rank(1).unwrap();
    rig.prepare(2, 60_000);
    for r in [&mut r0, &mut r1] {
        assert!(matches!(
            next_for(r, 2),
            RankEvent::Prepare { epoch: 2, .. }
        ));
        r.quiesced(2).unwrap();
    }
    assert_eq!(rig.wait_outcome(), GuestMessage::Quiesced { epoch: 2 });
}

/// The threads of this process.
fn threads() -> usize {
    let status = fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap()
}

#[test]
fn rank_connections_beyond_the_limit_are_refused_without_a_thread() {
    const FLOOD: usize = 400;
    let tune = |c: &mut AgentConfig| c.max_rank_connections = 8;
    let rig = Rig::build("cap", 2, false, tune);
    let mut config = AgentConfig {
        ranks: 2,
        ..AgentConfig::default()
    };
    tune(&mut config);
    // Two ranks and 16 spare.
    let limit = config.rank_connection_limit();
    assert_eq!(limit, 18);
    let mut r0 = rig.rank(0).unwrap();
    let before = threads();
    // Connections that never say anything: the first ones get a reader thread each, the rest
    // are refused at once.
    let idle: Vec<UnixStream> = (0..FLOOD)
        .map(|_| UnixStream::connect(rig.rank_socket()).unwrap())
        .collect();
    match rig.rank(1) {
        Err(Error::RankRefused(reason)) => assert_eq!(
            reason,
            format!("the agent serves {limit} rank connections at most")
        ),
        other => panic!("a connection over the limit was served: {other:?}"),
    }
    let grown = threads().saturating_sub(before);
    // Other tests in this process start and stop a few threads meanwhile.
    assert!(
        grown <= limit + 32,
        "{grown} more threads for {FLOOD} connections (limit {limit})"
    );
    idle[FLOOD - 1].set_read_timeout(Some(PATIENCE)).unwrap();
    let mut refusal = String::new();
    BufReader::new(&idle[FLOOD - 1])
        .read_line(&mut refusal)
        .unwrap();
    assert!(refusal.starts_with("{\"type\":\"refused\""), "{refusal}");
    // The rank that was there is still served; once the idle connections are gone, rank 1 gets
    // in and the epoch completes.
    rig.prepare(1, 60_000);
    expect_prepare(&mut r0, 1);
    drop(idle);
    let mut r1 = rig.rank_again(1);
    expect_prepare(&mut r1, 1);
    r0.quiesced(1).unwrap();
    r1.quiesced(1).unwrap();
    assert_eq!(rig.wait_outcome(), GuestMessage::Quiesced { epoch: 1 });
}

/// A rig whose agent is quiesced for epoch 1 with rank 0 registered.
fn quiesced_rig(tag: &str, tune: impl FnOnce(&mut AgentConfig)) -> (Rig, RankClient) {
    let rig = Rig::listening(tag, 1, tune);
    let mut r0 = rig.rank(0).unwrap();
    rig.prepare(1, 60_000);
    expect_prepare(&mut r0, 1);
    r0.quiesced(1).unwrap();
    assert_eq!(rig.wait_outcome(), GuestMessage::Quiesced { epoch: 1 });
    (rig, r0)
}

/// Epoch `epoch` completes its quiesce with rank `r0` alone.
fn quiesce_alone(rig: &Rig, r0: &mut RankClient, epoch: u64) {
    rig.prepare(epoch, 60_000);
    expect_prepare(r0, epoch);
    r0.quiesced(epoch).unwrap();
    assert_eq!(rig.wait_outcome(), GuestMessage::Quiesced { epoch });
}

#[test]
fn a_new_hosts_prepare_ends_the_epoch_a_dead_host_left() {
    let (mut rig, mut r0) = quiesced_rig("newer", |_| {});
    // The controller dies with the guest quiesced; a new one starts its own epoch.
    rig.host_gone();
    rig.host_back(None);
    rig.prepare(2, 60_000);
    expect_abort(&mut r0, 1);
    expect_prepare(&mut r0, 2);
    r0.quiesced(2).unwrap();
    assert_eq!(rig.wait_outcome(), GuestMessage::Quiesced { epoch: 2 });
}

#[test]
fn a_hosts_abort_after_a_reconnect_ends_the_epoch() {
    let (mut rig, mut r0) = quiesced_rig("reabort", |_| {});
    // A controller that continues the session (it recovered it) aborts the epoch.
    let session = rig.host_gone();
    rig.host_back(Some(session));
    rig.host.send(&HostMessage::Abort { epoch: 1 }).unwrap();
    expect_abort(&mut r0, 1);
    quiesce_alone(&rig, &mut r0, 2);
}

#[test]
fn with_no_host_for_too_long_the_agent_gives_the_epoch_up_and_the_next_host_learns_it_failed() {
    const STALE: Duration = Duration::from_millis(1000);
    let (mut rig, mut r0) = quiesced_rig("stale", |c| c.stale_epoch_after = Some(STALE));
    // A connected host keeps the guest quiesced however long it takes.
    assert_eq!(r0.next_event(Some(STALE * 2)).unwrap(), None);
    // The controller dies: after a while with no host, the ranks go on where they are.
    let session = rig.host_gone();
    let gone = Instant::now();
    expect_abort(&mut r0, 1);
    assert!(gone.elapsed() >= STALE, "{:?}", gone.elapsed());
    // A host that continues the session, thinking the guest quiesced, learns it failed.
    rig.host_back(Some(session));
    let reason = rig.failure(1);
    assert!(reason.starts_with("no host for 1000 ms"), "{reason}");
    assert!(matches!(
        rig.host.state(),
        SessionState::Failed { epoch: 1, .. }
    ));
    rig.host.send(&HostMessage::Abort { epoch: 1 }).unwrap();
    quiesce_alone(&rig, &mut r0, 2);
    // A new controller after another stale epoch: the late `failed` is no epoch of its
    // session, so it rejects it, and its own epoch goes ahead.
    rig.host_gone();
    assert_eq!(next_for(&mut r0, 2), RankEvent::Abort { epoch: 2 });
    rig.host_back(None);
    quiesce_alone(&rig, &mut r0, 3);
}

/// Takes the cut of `epoch` through the rig's host, every rank sending `counts(rank)` (sent,
/// received, drained; `None`: no counts, as a rank of the explicit API), and resumes it.
fn counted_cut(
    rig: &Rig,
    ranks: &mut [RankClient],
    epoch: u64,
    counts: impl Fn(u32) -> Option<(Vec<u64>, Vec<u64>, u64)>,
) {
    rig.prepare(epoch, 60_000);
    for r in ranks.iter_mut() {
        expect_prepare(r, epoch);
        if let Some((sent, received, drained)) = counts(r.rank()) {
            r.counts(epoch, &sent, &received, drained).unwrap();
        }
        r.quiesced(epoch).unwrap();
    }
    assert_eq!(rig.wait_outcome(), GuestMessage::Quiesced { epoch });
    let resume = HostMessage::Resume {
        epoch,
        interconnect: ethernet(),
    };
    rig.host.send(&resume).unwrap();
    for r in ranks.iter_mut() {
        assert!(matches!(next_for(r, epoch), RankEvent::Resume { .. }));
        r.resumed(epoch).unwrap();
    }
    assert!(matches!(
        rig.wait_outcome(),
        GuestMessage::Resumed { epoch: e, .. } if e == epoch
    ));
}

/// Consistent counts of a job of `world` ranks: rank i sent i * 1000 + j messages to j.
fn consistent(world: u32) -> impl Fn(u32) -> Option<(Vec<u64>, Vec<u64>, u64)> {
    move |i| {
        let sent = (0..world).map(|j| u64::from(i * 1000 + j)).collect();
        let received = (0..world).map(|j| u64::from(j * 1000 + i)).collect();
        Some((sent, received, u64::from(i)))
    }
}

#[test]
fn the_host_reads_what_every_rank_counted_at_a_cut_part_by_part() {
    // More ranks than one part holds peers: a report of several parts per rank.
    let world = symvirt_proto::cut_report::COUNTS_CHUNK as u32 + 6;
    let mut rig = Rig::listening("report", world, |_| {});
    let mut ranks: Vec<RankClient> = (0..world).map(|r| rig.rank(r).unwrap()).collect();
    counted_cut(&rig, &mut ranks, 1, consistent(world));
    // Epoch 2: rank 5 says it sent one message more to rank 7 than rank 7 received.
    counted_cut(&rig, &mut ranks, 2, |i| {
        let (mut sent, received, drained) = consistent(world)(i)?;
        if i == 5 {
            sent[7] += 1;
        }
        Some((sent, received, drained))
    });
    counted_cut(&rig, &mut ranks, 3, |i| {
        consistent(world)(i).filter(|_| i != 0)
    });

    // A harness connects afterwards, as `ninja-migrate cut report` does.
    rig.host_gone();
    let channel = rig.dir.0.join("host.sock");
    let job = symvirt::cut::JobCuts::connect(&channel, PATIENCE).unwrap();
    let report = symvirt::cut::job_report(std::slice::from_ref(&job), 1).unwrap();
    assert_eq!(report.ranks.len(), world as usize);
    assert!(report.mismatches().is_empty(), "{:?}", report.mismatches());
    let n = u64::from(world);
    assert_eq!(report.messages(), 1001 * n * n * (n - 1) / 2);
    assert_eq!(report.drained(), n * (n - 1) / 2);
    assert!(report.slowest().is_some());
    assert_eq!(report.ranks[9].sent, consistent(world)(9).unwrap().0);

    let lying = symvirt::cut::job_report(std::slice::from_ref(&job), 2).unwrap();
    assert_eq!(
        lying.mismatches(),
        vec![symvirt::cut::Mismatch {
            from: 5,
            to: 7,
            sent: 5008,
            received: 5007
        }]
    );
    let uncounted = job.report(3).unwrap_err().to_string();
    assert!(uncounted.contains("rank 0 sent no counts"), "{uncounted}");
    let unknown = job.report(9).unwrap_err().to_string();
    assert!(unknown.contains("epoch 9 is not one of them"), "{unknown}");
}

#[test]
fn a_job_over_two_agents_is_reported_whole_and_a_missing_agent_is_named() {
    let mut rigs = [
        Rig::listening("reportA", 1, |_| {}),
        Rig::listening("reportB", 1, |_| {}),
    ];
    for (i, rig) in rigs.iter().enumerate() {
        let mut ranks = vec![rig.rank(i as u32).unwrap()];
        counted_cut(rig, &mut ranks, 4, consistent(2));
    }
    let jobs: Vec<_> = rigs
        .iter_mut()
        .map(|rig| {
            rig.host_gone();
            symvirt::cut::JobCuts::connect(&rig.dir.0.join("host.sock"), PATIENCE).unwrap()
        })
        .collect();
    let whole = symvirt::cut::job_report(&jobs, 4).unwrap();
    assert_eq!(whole.ranks.len(), 2);
    assert!(whole.mismatches().is_empty());
    assert_eq!(whole.messages(), 1 + 1000 + 1001);
    let half = symvirt::cut::job_report(&jobs[1..], 4)
        .unwrap_err()
        .to_string();
    assert!(half.contains("no record of rank 0"), "{half}");
}
