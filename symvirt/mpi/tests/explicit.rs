//! Explicit safe points with real MPI jobs (4 ranks, Open MPI and MPICH) and the real guest
//! agent: several migration requests per run; at every cut all ranks stopped at the same
//! iteration and the global sent count equals the received count (read while the ranks are
//! paused, before the test sends resume); every rank is given the new interconnect; the
//! program's own payload checks pass and it finishes.

mod common;

use common::cut::check_iterations;
use common::*;
use std::fs;
use symvirt::protocol::GuestMessage;
use symvirt_mpi::mpi_build::{Linkage, MpiImpl};

/// `modes`: the C program's first argument; `None` for the Fortran program (no modes, and its
/// resume record carries no interconnect JSON).
fn run_explicit(mpi: MpiImpl, source: &str, modes: Option<&str>, tag: &str, epochs: u64) {
    let rig = Rig::new(tag);
    let prog = program(mpi, source, Linkage::Explicit);
    let cuts = rig.dir.0.join("cuts");
    fs::create_dir_all(&cuts).unwrap();
    let env = [(
        "SYMVIRT_AGENT_SOCKET".to_string(),
        rig.rank_socket().display().to_string(),
    )];
    let mut args: Vec<&str> = modes.into_iter().collect();
    args.extend([cuts.to_str().unwrap(), "16"]);
    let mut job = Job::start(mpi, &prog, &args, &env, &rig.dir.0);
    let mut last_sent = 0;
    for epoch in 1..=epochs {
        let asked = std::time::Instant::now();
        rig.prepare(epoch);
        match outcome_while_running(&rig, &mut job) {
            GuestMessage::Quiesced { epoch: e } if e == epoch => {
                // Informational only (no timed assertions): request to all ranks quiesced.
                eprintln!("{tag}: epoch {epoch} quiesced in {:?}", asked.elapsed());
            }
            other => panic!(
                "epoch {epoch}: expected quiesced, got {other:?}\n{}",
                job.logs()
            ),
        }
        // The ranks are paused now: their records describe the cut.
        let sent = check_iterations(&cuts, epoch);
        assert!(sent > last_sent, "no traffic between cuts");
        last_sent = sent;
        let ic = interconnect_for(epoch);
        resume_and_confirm(&rig, &mut job, epoch, &ic);
        let json = serde_json::to_string(&ic).unwrap();
        for rec in read_records(&cuts, "resumed", epoch) {
            assert!(rec.starts_with("resumed "), "{rec}");
            if modes.is_some() {
                assert!(
                    rec.trim_end().ends_with(&json),
                    "rank saw {rec}, want {json}"
                );
            }
        }
    }
    fs::write(cuts.join("stop"), "").unwrap();
    let (ok, out) = job.wait();
    assert!(ok, "MPI job failed\n{}", job.logs());
    let oks: Vec<&str> = out.lines().filter(|l| l.contains(" OK rank ")).collect();
    assert_eq!(oks.len(), RANKS as usize, "{out}");
    for l in oks {
        assert!(l.ends_with(&format!("cuts {epochs}")), "{l}");
    }
}

/// A program that calls its safe point rarely (every iteration computes 0.47-0.93 s, then a
/// ring) with `SYMVIRT_SAFE_POINT_DEPTH=0`: every cut falls at the first or second safe point
/// after the request, so no rank ends more than two compute phases between the request and the
/// cut (with the default depth, 2, it would be three or four), and the cut is consistent.
fn run_rare_safe_points(mpi: MpiImpl, tag: &str, epochs: u64) {
    let rig = Rig::new(tag);
    let prog = program(mpi, "stress.c", Linkage::Explicit);
    let cuts = rig.dir.0.join("cuts");
    fs::create_dir_all(&cuts).unwrap();
    let env = [
        (
            "SYMVIRT_AGENT_SOCKET".to_string(),
            rig.rank_socket().display().to_string(),
        ),
        ("SYMVIRT_SAFE_POINT_DEPTH".to_string(), "0".to_string()),
        ("STRESS_COMPUTE_MS".to_string(), "700".to_string()),
    ];
    let args = ["compute,ring", cuts.to_str().unwrap(), "2"];
    let mut job = Job::start(mpi, &prog, &args, &env, &rig.dir.0);
    for epoch in 1..=epochs {
        std::thread::sleep(std::time::Duration::from_millis(200 + (epoch * 430) % 900));
        let from = monotonic_ns();
        rig.prepare(epoch);
        match outcome_while_running(&rig, &mut job) {
            GuestMessage::Quiesced { epoch: e } if e == epoch => {}
            other => panic!(
                "epoch {epoch}: expected quiesced, got {other:?}\n{}",
                job.logs()
            ),
        }
        check_iterations(&cuts, epoch);
        for rank in 0..RANKS {
            let phases = entries(&cuts)
                .into_iter()
                .filter(|&(r, enter, _)| r == rank && enter > from)
                .count();
            assert!(
                phases <= 2,
                "epoch {epoch}: rank {rank} ended {phases} compute phases between the request \
                 and the cut"
            );
        }
        resume_and_confirm(&rig, &mut job, epoch, &interconnect_for(epoch));
    }
    job.stop_and_check(&cuts);
}

#[test]
fn explicit_openmpi_rare_safe_points_cut_at_the_next_one() {
    run_rare_safe_points(MpiImpl::OpenMpi, "exp-rare-ompi", 3);
}

#[test]
fn explicit_mpich_rare_safe_points_cut_at_the_next_one() {
    run_rare_safe_points(MpiImpl::Mpich, "exp-rare-mpich", 3);
}

const ALL_MODES: &str = "ring,ring_nb,alltoall,anysource,collective";

#[test]
fn explicit_openmpi_c_stress_consistent_at_every_cut() {
    run_explicit(MpiImpl::OpenMpi, "stress.c", Some(ALL_MODES), "exp-ompi", 3);
}

#[test]
fn explicit_mpich_c_stress_consistent_at_every_cut() {
    run_explicit(MpiImpl::Mpich, "stress.c", Some(ALL_MODES), "exp-mpich", 3);
}

#[test]
fn explicit_openmpi_fortran_stress_consistent_at_every_cut() {
    run_explicit(MpiImpl::OpenMpi, "stress_f.f90", None, "exp-f-ompi", 3);
}

#[test]
fn explicit_mpich_fortran_stress_consistent_at_every_cut() {
    run_explicit(MpiImpl::Mpich, "stress_f.f90", None, "exp-f-mpich", 3);
}
