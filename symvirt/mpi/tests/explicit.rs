//! Explicit safe points with real MPI jobs (4 ranks, Open MPI and MPICH) and the real guest
//! agent: several migration requests per run; at every cut all ranks stopped at the same
//! iteration and the global sent count equals the received count (read while the ranks are
//! paused, before the test sends resume); every rank is given the new interconnect; the
//! program's own payload checks pass and it finishes.

mod common;

use common::cut::{check_iterations, explicit_cut_places};
use common::*;
use std::fs;
use std::time::Duration;
use symvirt::protocol::Interconnect;
use symvirt_mpi::mpi_build::{Linkage, MpiImpl};

/// Every rank recorded the resume of `epoch`, with the interconnect `ic` when given (the
/// Fortran program's record carries none).
fn check_resumed(cuts: &std::path::Path, epoch: u64, ic: Option<&Interconnect>) {
    for rec in read_records(cuts, "resumed", epoch) {
        assert!(rec.starts_with("resumed "), "{rec}");
        if let Some(ic) = ic {
            let json = serde_json::to_string(ic).unwrap();
            assert!(
                rec.trim_end().ends_with(&json),
                "rank saw {rec}, want {json}"
            );
        }
    }
}

/// `modes`: the C program's first argument; `None` for the Fortran program (no modes, and its
/// resume record carries no interconnect JSON).
fn run_explicit(mpi: MpiImpl, source: &str, modes: Option<&str>, tag: &str, epochs: u64) {
    let rig = Rig::new(tag);
    let prog = program(mpi, source, Linkage::Explicit);
    let cuts = rig.dir.0.join("cuts");
    fs::create_dir_all(&cuts).unwrap();
    let env = [rig.agent_env()];
    let mut args: Vec<&str> = modes.into_iter().collect();
    args.extend([cuts.to_str().unwrap(), "16"]);
    let mut job = Job::start(mpi, &prog, &args, &env, &rig.dir.0);
    let mut last_sent = 0;
    for epoch in 1..=epochs {
        let took = quiesce(&rig, &mut job, epoch);
        // Informational only (no timed assertions): request to all ranks quiesced.
        eprintln!("{tag}: epoch {epoch} quiesced in {:?}", took);
        // The ranks are paused now: their records describe the cut.
        let sent = check_iterations(&cuts, epoch);
        assert!(sent > last_sent, "no traffic between cuts");
        last_sent = sent;
        let ic = interconnect_for(epoch);
        resume_and_confirm(&rig, &mut job, epoch, &ic);
        check_resumed(&cuts, epoch, modes.is_some().then_some(&ic));
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
        rig.agent_env(),
        ("SYMVIRT_SAFE_POINT_DEPTH".to_string(), "0".to_string()),
        ("STRESS_COMPUTE_MS".to_string(), "700".to_string()),
    ];
    let args = ["compute,ring", cuts.to_str().unwrap(), "2"];
    let mut job = Job::start(mpi, &prog, &args, &env, &rig.dir.0);
    for epoch in 1..=epochs {
        std::thread::sleep(std::time::Duration::from_millis(200 + (epoch * 430) % 900));
        let from = monotonic_ns();
        quiesce(&rig, &mut job, epoch);
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

/// Quiet phases: every iteration computes for 1.3-2.7 s inside `symvirt_quiet_begin/end`, then
/// a ring and collectives, then a safe point (default depth). Cuts requested at random moments
/// fall in a quiet phase on every rank, at the same iteration, consistent (global sent ==
/// received). With the library's thread (`thread`) each is quiesced within 1 s while the ranks
/// compute (a safe point would take up to three phases), some ranks' cuts made by that thread
/// (a rank that has ended its phase waits at its end for the others and is cut from there),
/// and a rank that reaches `symvirt_quiet_end` while the cut holds returns only after the
/// resume; every other request comes right after the previous resume, so that several cuts
/// fall in one phase. Without it (`SYMVIRT_PROGRESS_THREAD=0`) the application's thread makes
/// the cut at the phase's begin or end.
///
/// With `Requests::Outstanding` the iterations alternate a phase with a receive from the left
/// and a large (rendezvous) send to the right outstanding across it
/// (`symvirt_quiet_begin_requests`) and a plain one: at every cut inside the former each rank's
/// receive buffer already holds its message (counted as received in the cut record only then,
/// so that global sent == received proves it), and the program's own checks after its
/// `MPI_Waitall` pass.
fn run_quiet_phases(mpi: MpiImpl, tag: &str, epochs: u64, thread: bool, requests: Requests) {
    let compute_ms: u64 = match requests {
        Requests::None => 2000,
        // Two phases an iteration.
        Requests::Outstanding => 1000,
    };
    let rig = Rig::new(tag);
    let prog = program(mpi, "stress.c", Linkage::Explicit);
    let cuts = rig.dir.0.join("cuts");
    fs::create_dir_all(&cuts).unwrap();
    let mut env = vec![
        rig.agent_env(),
        ("STRESS_QUIET".to_string(), "1".to_string()),
        ("STRESS_COMPUTE_MS".to_string(), compute_ms.to_string()),
    ];
    if !thread {
        env.push(("SYMVIRT_PROGRESS_THREAD".to_string(), "0".to_string()));
    }
    let modes = match requests {
        Requests::None => "compute,ring,collective",
        Requests::Outstanding => "compute_nb,ring,compute,collective",
    };
    let args = [modes, cuts.to_str().unwrap(), "2"];
    let mut job = Job::start(mpi, &prog, &args, &env, &rig.dir.0);
    let mut jitter = Jitter::new();
    let (mut holds, mut slowest, mut by_thread) = (Vec::new(), Duration::ZERO, 0);
    for epoch in 1..=epochs {
        let back_to_back = thread && epoch % 2 == 0;
        if !back_to_back {
            std::thread::sleep(Duration::from_millis(jitter.ms(800, 2800)));
        }
        let took = quiesce(&rig, &mut job, epoch);
        let from = monotonic_ns();
        eprintln!("{tag}: epoch {epoch} quiesced in {took:?}");
        slowest = slowest.max(took);
        check_iterations(&cuts, epoch);
        let places = explicit_cut_places(&cuts, epoch);
        for (place, hook_thread) in &places {
            assert_eq!(place, "quiet", "epoch {epoch}: {places:?}");
            if !thread {
                assert_eq!(hook_thread, "main", "epoch {epoch}: {places:?}");
            }
        }
        // A rank that had ended its phase waits at its end for the others: cut from there.
        by_thread += places.iter().filter(|(_, t)| t == "thread").count();
        if thread && !back_to_back {
            let wait = Duration::from_millis(2 * compute_ms);
            holds.push(hold_cut(&cuts, &job, epoch, from, wait));
        }
        let ic = interconnect_for(epoch);
        resume_and_confirm(&rig, &mut job, epoch, &ic);
        check_resumed(&cuts, epoch, Some(&ic));
    }
    job.stop_and_check(&cuts);
    if thread {
        assert!(
            slowest < Duration::from_secs(1),
            "a cut took {slowest:?} to quiesce ranks in a quiet phase\n{}",
            job.logs()
        );
        assert!(by_thread > 0, "the library's thread made no rank's cut");
        assert!(
            check_holds(&cuts, &holds) > 0,
            "no rank reached symvirt_quiet_end during any of {epochs} cuts"
        );
    }
}

/// Whether the quiet phases of [`run_quiet_phases`] have requests outstanding across them.
#[derive(Clone, Copy)]
enum Requests {
    None,
    Outstanding,
}

#[test]
fn explicit_openmpi_quiet_phases_cut_at_once_while_ranks_compute() {
    run_quiet_phases(MpiImpl::OpenMpi, "exp-quiet-ompi", 6, true, Requests::None);
}

#[test]
fn explicit_mpich_quiet_phases_cut_at_once_while_ranks_compute() {
    run_quiet_phases(MpiImpl::Mpich, "exp-quiet-mpich", 6, true, Requests::None);
}

#[test]
fn explicit_openmpi_quiet_phases_without_the_thread_cut_at_their_ends() {
    run_quiet_phases(
        MpiImpl::OpenMpi,
        "exp-quiet-nt-ompi",
        3,
        false,
        Requests::None,
    );
}

#[test]
fn explicit_mpich_quiet_phases_without_the_thread_cut_at_their_ends() {
    run_quiet_phases(
        MpiImpl::Mpich,
        "exp-quiet-nt-mpich",
        3,
        false,
        Requests::None,
    );
}

#[test]
fn explicit_openmpi_quiet_phases_with_requests_outstanding_cut_at_once() {
    run_quiet_phases(
        MpiImpl::OpenMpi,
        "exp-quiet-rq-ompi",
        6,
        true,
        Requests::Outstanding,
    );
}

#[test]
fn explicit_mpich_quiet_phases_with_requests_outstanding_cut_at_once() {
    run_quiet_phases(
        MpiImpl::Mpich,
        "exp-quiet-rq-mpich",
        6,
        true,
        Requests::Outstanding,
    );
}

#[test]
fn explicit_openmpi_quiet_phases_with_requests_outstanding_without_the_thread() {
    run_quiet_phases(
        MpiImpl::OpenMpi,
        "exp-quiet-rqnt-ompi",
        3,
        false,
        Requests::Outstanding,
    );
}

#[test]
fn explicit_mpich_quiet_phases_with_requests_outstanding_without_the_thread() {
    run_quiet_phases(
        MpiImpl::Mpich,
        "exp-quiet-rqnt-mpich",
        3,
        false,
        Requests::Outstanding,
    );
}

/// Misuse of quiet phases (an end outside a phase, a nested begin, a safe point or finalize
/// inside one) is refused with SYMVIRT_ERR_STATE and changes nothing: the phases then end and
/// the program finishes (`refusals.c`, explicit build).
fn refuses_quiet_phase_misuse(mpi: MpiImpl, tag: &str) {
    let rig = Rig::new(tag);
    let prog = program(mpi, "refusals.c", Linkage::Explicit);
    let env = [rig.agent_env()];
    let mut job = Job::start(mpi, &prog, &[], &env, &rig.dir.0);
    wait_every_rank_ok(&mut job, "refusals OK rank ");
}

#[test]
fn explicit_openmpi_refuses_quiet_phase_misuse() {
    refuses_quiet_phase_misuse(MpiImpl::OpenMpi, "exp-refuse-ompi");
}

#[test]
fn explicit_mpich_refuses_quiet_phase_misuse() {
    refuses_quiet_phase_misuse(MpiImpl::Mpich, "exp-refuse-mpich");
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

/// MPICH 4.0's MPI_Finalize over UCX's TCP transport with rank 0 late to its closes, in a
/// program linked with the explicit API (statically): every job ends (`csrc/ucx_finalize.c`).
#[test]
fn explicit_mpich_jobs_over_tcp_end_without_deadlock_in_finalize() {
    mpich_jobs_over_tcp_end(Linkage::Explicit, "fin-tcp-x", 3);
}

/// The explicit library's quiet thread, like the layer's progress thread, waits to run where
/// unbound ranks are each a scheduling group of their own: rank 0 (and only it) says so when
/// the thread starts (its first quiet phase) with MPICH; Open MPI's ranks share one session.
#[test]
fn explicit_rank_zero_warns_at_its_first_quiet_phase_when_unbound_ranks_are_groups() {
    if !placement_warnings_testable() {
        return;
    }
    let short_run = |mpi: MpiImpl, tag: &str| {
        let rig = Rig::new(tag);
        let prog = program(mpi, "stress.c", Linkage::Explicit);
        let env = [
            rig.agent_env(),
            ("STRESS_QUIET".to_string(), "1".to_string()),
            ("STRESS_COMPUTE_MS".to_string(), "30".to_string()),
        ];
        let cmd = mpi.launcher(RANKS, &env);
        stderr_of_short_run(&rig, cmd, "stress OK rank ", |work| {
            let prog = prog.display().to_string();
            vec![prog, "compute,ring".into(), work.into(), "2".into()]
        })
    };
    let mpich = short_run(MpiImpl::Mpich, "place-x-mpich");
    assert_eq!(mpich.matches(PLACEMENT_WARNING).count(), 1, "{mpich}");
    let ompi = short_run(MpiImpl::OpenMpi, "place-x-ompi");
    assert!(!ompi.contains(PLACEMENT_WARNING), "{ompi}");
}
