//! A real virtual cluster, end to end: MPI ranks inside two Linux guests, moved from one fabric
//! to another and back while the job runs, by `ninja-migrate plan run` from plan files.
//!
//! The guests boot the shared read-only cluster root (`scripts/build-cluster-image`: Open MPI,
//! MPICH, sshd, the agent) plus a job disk holding the transparent layer and the stress program
//! built for the MPI under test. They sit on three Linux bridges in a network namespace of the
//! test's own ([`ninja_testkit::cluster`]): management, fabric A (the source cluster's HCA
//! network, whose NICs are hot-added as the passthrough STAND-IN, next to the `ivshmem` device
//! that makes them unmigratable as a VFIO device is) and fabric B (the destination's Ethernet,
//! whose NIC is either in the VM from boot with its link switched by the plan, `standby-nic`,
//! or hot-plugged by the plan, `virtio-net`: half the A -> B -> A tests each).
//! `mpirun` in vm0 starts 4 ranks (2 per guest) over ssh; they talk TCP between the guests'
//! data addresses, which the agents route through whichever fabric NIC the guest has.
//!
//! Judged by the job and by the wire: the taps' byte counters show the job's traffic on A, then
//! on B (and nothing more on A), then on A again; the ranks keep their PIDs; every cut is
//! consistent pair by pair; the program's own checks pass at the end.

mod cluster_rig;

use cluster_rig::*;
use ninja_testkit::cluster::Net;
use ninja_testkit::{Qemu, RawQmp};
use std::time::Duration;
use symvirt_mpi::mpi_build::{Linkage, MpiImpl};

/// Migrate blocked while the stand-in is attached, as with a VFIO device without migration
/// support.
fn assert_migration_refused(q: &Qemu) {
    let mut qmp = RawQmp::connect(q.qmp_path()).unwrap();
    let r = qmp.execute("migrate", serde_json::json!({"uri": "exec:cat >/dev/null"}));
    let e = r.expect_err("migrate with the fabric-A stand-in attached must be refused");
    assert!(e.contains("ivshmem") || e.contains("disabled"), "{e}");
}

/// The job on fabric A, moved to B and back to A, judged by counters, PIDs, cuts and results.
fn a_to_b_to_a(setup: Setup, tag: &str, test: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(mut c) = VirtualCluster::boot(test, tag, setup) else {
        return;
    };
    assert_migration_refused(&c.sources[0]);
    c.start_job("ring,anysource,collective");
    c.wait_traffic(Fabric::A, 1 << 20).unwrap();
    let pids = c.rank_pids();

    // A -> B, then B -> A: the fallback-and-recovery return.
    let total = moved_and_carried_on(&mut c, Fabric::B, &pids, test);
    let total2 = moved_and_carried_on(&mut c, Fabric::A, &pids, test);
    assert!(total2 > total, "the job advanced between the cuts");

    finish_with_every_rank_ok(&c);
}

#[test]
fn open_mpi_job_in_the_guests_moves_from_fabric_a_to_b_and_back() {
    a_to_b_to_a(
        Setup::new(MpiImpl::OpenMpi, VMS),
        "aba-ompi",
        "open_mpi_job_in_the_guests_moves_from_fabric_a_to_b_and_back",
    );
}

/// Fabric B's NIC hot-plugged by the plan instead of on standby.
#[test]
fn mpich_job_in_the_guests_moves_from_fabric_a_to_b_and_back() {
    a_to_b_to_a(
        Setup {
            fabric_b: FabricBNic::HotPlugged,
            ..Setup::new(MpiImpl::Mpich, VMS)
        },
        "aba-mpich",
        "mpich_job_in_the_guests_moves_from_fabric_a_to_b_and_back",
    );
}

/// Moves every VM to fabric `to` and checks the job there: its traffic on `to`, none more on
/// the fabric it left once the plan detached those NICs, the same rank processes, a consistent
/// cut. Returns the messages delivered before the cut.
fn moved_and_carried_on(
    c: &mut VirtualCluster,
    to: Fabric,
    pids: &[std::collections::BTreeSet<u32>],
    test: &str,
) -> u64 {
    let from = to.other();
    let (from_before, to_before) = (c.fabric_bytes(from), c.fabric_bytes(to));
    let epoch = c.move_to_other_fabric();
    let from_after_detach = c.fabric_bytes(from);
    assert!(from_after_detach >= from_before);
    let restart = c.wait_traffic(to, 1 << 20).unwrap();
    eprintln!(
        "{test}: 1 MiB of the job's traffic on fabric {to:?} {restart:?} after the plan ended"
    );
    assert!(c.fabric_bytes(to) > to_before);
    assert_eq!(
        c.fabric_bytes(from),
        from_after_detach,
        "fabric {from:?} carried traffic after its NICs were detached"
    );
    assert_eq!(c.rank_pids(), pids, "the ranks are the same processes");
    let total = c.check_cut(epoch);
    eprintln!("{test}: cut of the move to {to:?} after {total} messages");
    total
}

/// The job started on fabric A, a move that must roll back with a reason containing `reason`,
/// then the job on fabric A still, same processes, finishing with every rank's checks passed.
fn rollback_leaves_the_job_on_fabric_a(c: &mut VirtualCluster, reason: &str) {
    c.start_job("ring,anysource,collective");
    c.wait_traffic(Fabric::A, 1 << 20).unwrap();
    let pids = c.rank_pids();
    let why = c.move_rolled_back();
    assert!(why.contains(reason), "{why}");
    c.wait_traffic(Fabric::A, 1 << 20).unwrap();
    assert_eq!(c.rank_pids(), pids);
    finish_with_every_rank_ok(c);
}

/// Stops the job; every rank printed its OK (the program's own checks passed).
fn finish_with_every_rank_ok(c: &VirtualCluster) {
    let out = c.finish_job();
    let oks = out.lines().filter(|l| l.contains("stress OK rank")).count();
    assert_eq!(oks, c.vms() * RANKS_PER_VM, "{out}");
}

/// The negative control: the same move with the agents' network step off. The ranks resume
/// with their data subnet routed nowhere (the fabric-A NICs are gone) and the job stalls: no
/// traffic on fabric B, no end when asked to stop. Proves the A-to-B test can fail.
#[test]
fn without_the_network_step_the_moved_job_stalls() {
    let test = "without_the_network_step_the_moved_job_stalls";
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(mut c) = VirtualCluster::boot(
        test,
        "nostep",
        Setup {
            agent_data: vec![None; VMS],
            ..Setup::new(MpiImpl::OpenMpi, VMS)
        },
    ) else {
        return;
    };
    c.start_job("ring,anysource,collective");
    c.wait_traffic(Fabric::A, 1 << 20).unwrap();
    c.move_to_other_fabric();
    let stalled = c.wait_traffic_for(Fabric::B, 1 << 20, Duration::from_secs(20));
    assert!(stalled.is_err(), "the job ran on without the network step");
    c.run(0, "touch /tmp/job/stop");
    std::thread::sleep(Duration::from_secs(10));
    assert!(
        !c.ssh(0, "cat /tmp/job/status").status.success(),
        "the job ended: {}",
        c.job_output()
    );
}

/// A guest whose agent names a data address the guest does not have: the cut is refused with
/// that reason, the plan rolls back, and the job runs on over fabric A, same processes.
#[test]
fn a_misconfigured_data_address_rolls_back_and_the_job_stays_on_fabric_a() {
    let test = "a_misconfigured_data_address_rolls_back_and_the_job_stays_on_fabric_a";
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut setup = Setup::new(MpiImpl::OpenMpi, VMS);
    setup.agent_data[1] = Some("10.99.0.42/24".into());
    let Some(mut c) = VirtualCluster::boot(test, "baddata", setup) else {
        return;
    };
    rollback_leaves_the_job_on_fabric_a(&mut c, "data address 10.99.0.42/24 is not configured");
}

/// Fabric B is down (its bridge removed) when the VMs resume there: no peer answers on the new
/// NICs, the agents report it, the plan rolls every VM back to fabric A and the job runs on.
#[test]
fn a_dead_destination_fabric_rolls_back_to_fabric_a() {
    let test = "a_dead_destination_fabric_rolls_back_to_fabric_a";
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(mut c) = VirtualCluster::boot(test, "deadb", Setup::new(MpiImpl::Mpich, VMS)) else {
        return;
    };
    c.fabrics.remove_bridge(Net::FabricB).unwrap();
    rollback_leaves_the_job_on_fabric_a(&mut c, "do not answer");
}

/// Fabric B's NIC hot-plugged by the plan instead of on standby.
#[test]
fn explicit_api_open_mpi_job_moves_from_fabric_a_to_b_and_back() {
    a_to_b_to_a(
        Setup {
            linkage: Linkage::Explicit,
            fabric_b: FabricBNic::HotPlugged,
            ..Setup::new(MpiImpl::OpenMpi, VMS)
        },
        "aba-ompi-x",
        "explicit_api_open_mpi_job_moves_from_fabric_a_to_b_and_back",
    );
}

#[test]
fn explicit_api_mpich_job_moves_from_fabric_a_to_b_and_back() {
    a_to_b_to_a(
        Setup {
            linkage: Linkage::Explicit,
            ..Setup::new(MpiImpl::Mpich, VMS)
        },
        "aba-mpich-x",
        "explicit_api_mpich_job_moves_from_fabric_a_to_b_and_back",
    );
}

/// The job checkpointed on fabric A with every VM stopped (`plan checkpoint --stop`), then
/// restored from the files on fabric B (`plan restore`): the same rank processes go on from
/// the cut, over fabric B only, and finish with every check of the program passed.
#[test]
fn open_mpi_job_is_checkpointed_on_fabric_a_and_restored_on_fabric_b() {
    let test = "open_mpi_job_is_checkpointed_on_fabric_a_and_restored_on_fabric_b";
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let setup = Setup {
        scratch_disk: true,
        ..Setup::new(MpiImpl::OpenMpi, VMS)
    };
    let Some(mut c) = VirtualCluster::boot(test, "ckpt-ompi", setup) else {
        return;
    };
    c.start_job("ring,anysource,collective");
    c.wait_traffic(Fabric::A, 1 << 20).unwrap();
    let pids = c.rank_pids();
    // Each guest writes its own mark on its disk before the cut, past its cache.
    let devices: Vec<String> = (0..c.vms()).map(|vm| c.scratch_device(vm)).collect();
    for (vm, device) in devices.iter().enumerate() {
        c.run(
            vm,
            &format!(
                "printf 'mark of vm{vm}' | dd of={device} bs=4096 conv=sync,fsync oflag=direct"
            ),
        );
    }
    let ckpt = c.dir().join("checkpoint");
    let (epoch, next) = c.checkpoint_and_stop(&ckpt);
    let manifest = symvirt::checkpoint::read(&ckpt).unwrap();
    for (vm, saved) in manifest.vms.iter().enumerate() {
        let disks: Vec<(&str, &str)> = saved
            .disks
            .iter()
            .map(|d| (d.copy.device.as_str(), d.copy.format.as_str()))
            .collect();
        assert_eq!(
            disks,
            [("scratch", scratch_format(vm))],
            "vm{vm}: {saved:?}"
        );
        assert_eq!(
            saved.disks[0].copy.image,
            c.scratch_image(vm).display().to_string()
        );
        // The disk goes on after the cut (as a source that kept running would write it).
        let later = std::process::Command::new("qemu-io")
            .args(["-f", scratch_format(vm), "-c", "write -P 0x66 0 64k"])
            .arg(c.scratch_image(vm))
            .output()
            .unwrap();
        assert!(later.status.success(), "{later:?}");
    }
    let (a_stopped, b_before) = (c.fabric_bytes(Fabric::A), c.fabric_bytes(Fabric::B));
    c.restore(&ckpt, next);
    // The guests' disks are as they were at the cut, read past their caches.
    for (vm, device) in devices.iter().enumerate() {
        let mark = c.run(
            vm,
            &format!("dd if={device} bs=4096 count=1 iflag=direct 2>/dev/null | head -c 11"),
        );
        assert_eq!(
            mark,
            format!("mark of vm{vm}"),
            "vm{vm}'s disk after the restore"
        );
    }
    let restart = c.wait_traffic(Fabric::B, 1 << 20).unwrap();
    eprintln!("{test}: 1 MiB of the job's traffic on fabric B {restart:?} after the restore");
    assert!(c.fabric_bytes(Fabric::B) > b_before);
    assert_eq!(
        c.fabric_bytes(Fabric::A),
        a_stopped,
        "fabric A carried traffic after the checkpoint"
    );
    assert_eq!(c.rank_pids(), pids, "the ranks are the same processes");
    let total = c.check_cut(epoch);
    eprintln!("{test}: cut of the checkpoint after {total} messages");
    finish_with_every_rank_ok(&c);
}
