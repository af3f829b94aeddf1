//! End to end with the controller: an MPI job of 4 host-process ranks stands for the guests of
//! two QEMU VMs (2 ranks per VM). Each VM's "guest agent" is a host process too, listening
//! where the controller expects the guest's channel (`listen:`), with the VM's 2 ranks
//! registered. The VMs are real TCG guests from the fixtures running the dirtier, each with the
//! HCA STAND-IN (`ivshmem-plain`) that blocks plain migration.
//!
//! The plan's quiesce phase must wait for the ranks (the transparent layer brings them to a
//! consistent cut, checked pair by pair), then the VMs are detached, migrated and given a
//! virtio-net NIC at fresh destination QEMUs; the ranks are resumed with each VM's new
//! Ethernet interconnect and the job finishes with its own checks passing. Run under Open MPI
//! and MPICH. The guests are judged by their own dirtier, which keeps verifying its memory at
//! the destination.

mod common;

use common::cut::{check_pairs, read_cut};
use common::*;
use ninja_testkit::{Fixtures, Qemu, QemuConfig, free_tcp_port, mpi_or_skip, qemu_or_skip};
use std::fs;
use std::net::Shutdown;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Instant;
use symvirt::controller::{Controller, Event, GuestNotice, Outcome, Phase};
use symvirt::protocol::Interconnect;
use symvirt_agent::agent::{Agent, AgentConfig};
use symvirt_agent::guest_link::ChannelSpec;
use symvirt_mpi::mpi_build::{Linkage, MpiImpl};

const VMS: usize = 2;
const RANKS_PER_VM: u32 = RANKS / VMS as u32;
const MEMORY_MIB: u32 = 128;

/// Two QEMUs per VM and an MPI job: one test at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn mac_of(vm: usize) -> String {
    format!("52:54:00:00:20:{:02x}", vm + 1)
}

fn machine(fixtures: &Fixtures) -> QemuConfig {
    QemuConfig::new(fixtures)
        .memory_mib(MEMORY_MIB)
        .guest_run("/bin/ninja-guest-dirtier 4")
}

fn dirtier_passes(serial: &str) -> usize {
    serial.matches("ninja-guest-dirtier: pass=").count()
}

/// A source VM with its HCA stand-in, and the shared-memory file behind it.
fn start_source(fixtures: &Fixtures, hca_mem: &Path) -> Qemu {
    let mut q = Qemu::start(machine(fixtures)).unwrap();
    q.wait_serial("ninja-guest-dirtier: pass=", PATIENCE)
        .unwrap();
    q.add_hca_standin(hca_mem).unwrap();
    q
}

fn toml_list(args: &[String]) -> String {
    let quoted: Vec<String> = args.iter().map(|a| format!("{a:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

/// Removes files and kills destination QEMUs the controller left, on drop.
#[derive(Default)]
struct Cleanup {
    paths: Vec<PathBuf>,
    pids: Vec<u32>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for &pid in &self.pids {
            // SAFETY: kill(2) on a pid this test's controller started; no memory is involved.
            unsafe {
                libc::kill(pid as i32, libc::SIGKILL);
            }
        }
        for p in &self.paths {
            let _ = fs::remove_file(p);
            let _ = fs::remove_dir_all(p);
        }
    }
}

fn run_plan_with_mpi_ranks(mpi: MpiImpl, tag: &str, test: &str) {
    let Some(fixtures) = qemu_or_skip(test) else {
        return;
    };
    if !mpi_or_skip(test) {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = TempDir::new(tag);
    let mut cleanup = Cleanup::default();

    // The VMs.
    let hca_mems: Vec<PathBuf> = (0..VMS)
        .map(|i| {
            PathBuf::from(format!(
                "/dev/shm/symvirt-e2e-{}-{}-vm{i}-hca0",
                mpi.name(),
                std::process::id()
            ))
        })
        .collect();
    cleanup.paths.extend(hca_mems.iter().cloned());
    let mut sources: Vec<Qemu> = hca_mems
        .iter()
        .map(|m| start_source(&fixtures, m))
        .collect();

    // Their agents (host processes standing for the guests' agents) and the job.
    let agents: Vec<Agent> = (0..VMS)
        .map(|i| {
            Agent::spawn(AgentConfig {
                vm: format!("vm{i}"),
                channel: ChannelSpec::Listen(dir.0.join(format!("vm{i}-channel.sock"))),
                rank_socket: dir.0.join(format!("vm{i}-ranks.sock")),
                ranks: RANKS_PER_VM,
                ..AgentConfig::default()
            })
            .unwrap()
        })
        .collect();
    let libs = libraries(mpi);
    let prog = program(mpi, "stress.c", Linkage::Plain);
    let cuts = dir.0.join("cuts");
    fs::create_dir_all(&cuts).unwrap();
    // Ranks 0-1 belong to vm0, 2-3 to vm1: each finds its VM's agent. The layer is preloaded
    // into the program only, not into the shell.
    let script = format!(
        "r=${{OMPI_COMM_WORLD_RANK:-$PMI_RANK}}; \
         export SYMVIRT_AGENT_SOCKET={}/vm$((r / {RANKS_PER_VM}))-ranks.sock; \
         export LD_PRELOAD={}; exec \"$@\"",
        dir.0.display(),
        libs.transparent.display()
    );
    let env = [("SYMVIRT_CUT_LOG".to_string(), cuts.display().to_string())];
    let mut job = Job::start(
        mpi,
        Path::new("/bin/sh"),
        &[
            "-c",
            &script,
            "sh",
            prog.to_str().unwrap(),
            "ring,anysource,collective,stall",
            cuts.to_str().unwrap(),
            "8",
        ],
        &env,
        &dir.0,
    );

    // The plan: each VM to a QEMU the controller launches, HCA stand-in -> virtio-net.
    let mut plan =
        String::from("[settings]\nmax_parallel = 2\n[settings.deadlines_ms]\nquiesce = 60000\n");
    for (i, src) in sources.iter().enumerate() {
        let dest = dir.0.join(format!("vm{i}-dest"));
        fs::create_dir_all(&dest).unwrap();
        let channel = dir.0.join(format!("vm{i}-channel.sock"));
        let dest_channel = dest.join("channel.sock");
        relay(&dest_channel, channel.clone());
        plan.push_str(&format!(
            "\n[[vm]]\nname = \"vm{i}\"\n\
             [vm.source]\nqmp = \"unix:{}\"\nchannel = \"unix:{}\"\n\
             interconnect = {{ kind = \"infiniband\", hca = \"hca0\", port = 1 }}\n\
             [[vm.source.devices]]\nkind = \"hca-standin\"\nid = \"hca0\"\nmem_path = \"{}\"\nsize = 1048576\n\
             [vm.destination]\nqmp = \"unix:{}\"\nchannel = \"unix:{}\"\n\
             migrate_uri = \"tcp:127.0.0.1:{}\"\n\
             interconnect = {{ kind = \"ethernet\", mac = \"{}\" }}\n\
             launch = {{ args = {} }}\n\
             [[vm.destination.devices]]\nkind = \"virtio-net\"\nid = \"net0\"\nmac = \"{}\"\n",
            src.qmp_path().display(),
            channel.display(),
            hca_mems[i].display(),
            dest.join("qmp.sock").display(),
            dest_channel.display(),
            free_tcp_port(),
            mac_of(i),
            toml_list(&machine(&fixtures).machine_args(&dest.join("serial.log"))),
            mac_of(i),
        ));
    }
    let plan = symvirt::plan::parse(&plan).unwrap_or_else(|e| panic!("plan: {e:#?}\n{plan}"));

    let events = Mutex::new(Vec::new());
    let sink = |e: &Event| {
        eprintln!("event: {}", serde_json::to_string(e).unwrap());
        events.lock().unwrap().push(e.clone());
    };
    let started = Instant::now();
    let report = Controller::new(plan, &sink).run_qemu(&dir.0).unwrap();
    eprintln!("{test}: plan took {:?}: {report:#?}", started.elapsed());
    for vm in &report.vms {
        cleanup.pids.extend(vm.destination_pid);
    }
    assert_eq!(
        report.outcome,
        Outcome::Completed,
        "{:?}\n{}",
        report.errors,
        job.logs()
    );

    // The quiesce phase waited for the ranks: all 4 paused at one consistent cut.
    let cut = read_cut(&cuts, report.epoch);
    assert_eq!(cut.ranks.len(), RANKS as usize);
    let total = check_pairs(&cut, report.epoch);
    eprintln!("{test}: {total} messages delivered before the cut");
    // Each VM's ranks were resumed with that VM's new interconnect, through its agent.
    let resumed = read_records(&cuts, "resumed", report.epoch);
    for (rank, rec) in resumed.iter().enumerate() {
        let vm = rank / RANKS_PER_VM as usize;
        let want = Interconnect::Ethernet {
            mac: mac_of(vm),
            iface: None,
            pci: None,
        };
        assert_eq!(
            rec,
            &format!("resumed {}\n", serde_json::to_string(&want).unwrap()),
            "rank {rank}"
        );
        match &report.vms[vm].guest {
            GuestNotice::Resumed { interconnect, .. } => assert_eq!(interconnect, &want),
            other => panic!("vm{vm}: {other:?}"),
        }
    }
    let events = events.into_inner().unwrap();
    for phase in [
        Phase::Quiesce,
        Phase::Detach,
        Phase::Migrate,
        Phase::Attach,
        Phase::Resume,
    ] {
        assert!(events.contains(&Event::PhaseStarted { phase }), "{phase}");
    }

    // The VMs live at their destinations: the sources quit, the guests' dirtiers go on there.
    for (i, src) in sources.iter_mut().enumerate() {
        let t = Instant::now();
        while src.is_running() && t.elapsed() < PATIENCE {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        assert!(!src.is_running(), "vm{i}: source still running");
        let serial = dir.0.join(format!("vm{i}-dest/serial.log"));
        let t = Instant::now();
        while dirtier_passes(&fs::read_to_string(&serial).unwrap_or_default()) == 0 {
            assert!(
                t.elapsed() < PATIENCE,
                "vm{i}: the dirtier does not run at the destination"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }

    // The job runs on and finishes with its own checks passing.
    fs::write(cuts.join("stop"), "").unwrap();
    let (ok, out) = job.wait();
    assert!(ok, "MPI job failed\n{}", job.logs());
    let oks = out.lines().filter(|l| l.contains(" OK rank ")).count();
    assert_eq!(oks, RANKS as usize, "{out}");
    drop(agents);
}

#[test]
fn a_plan_moves_two_vms_while_their_open_mpi_ranks_quiesce_and_resume() {
    run_plan_with_mpi_ranks(
        MpiImpl::OpenMpi,
        "e2e-ompi",
        "a_plan_moves_two_vms_while_their_open_mpi_ranks_quiesce_and_resume",
    );
}

#[test]
fn a_plan_moves_two_vms_while_their_mpich_ranks_quiesce_and_resume() {
    run_plan_with_mpi_ranks(
        MpiImpl::Mpich,
        "e2e-mpich",
        "a_plan_moves_two_vms_while_their_mpich_ranks_quiesce_and_resume",
    );
}

/// The agent's channel at a second path, as a moved guest's channel appears at a new path on
/// its destination host (the agent here is a host process and does not move): every
/// connection there is relayed to the agent's socket.
fn relay(from: &Path, to: PathBuf) {
    let listener = UnixListener::bind(from).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(host) = conn else { return };
            let Ok(agent) = UnixStream::connect(&to) else {
                continue;
            };
            let pairs = [
                (host.try_clone().unwrap(), agent.try_clone().unwrap()),
                (agent, host),
            ];
            for (mut from, mut to) in pairs {
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from, &mut to);
                    let _ = to.shutdown(Shutdown::Both);
                });
            }
        }
    });
}
