//! Transparent mode with ranks that compute for seconds between MPI calls (4 ranks, Open MPI
//! and MPICH, real guest agent): the layer's progress thread brings a rank that is outside MPI
//! into the cut at once, instead of at its next MPI call.
//!
//! The stress program alternates compute phases of 1.3-2.7 s (no MPI call) with a ring, a
//! phase with a large Isend and an Irecv outstanding across it (Waitall afterwards), and
//! collectives. Cuts are requested at random moments; each must be quiesced well before the
//! compute phases end (1 s here, against phases of up to 2.7 s: without the progress thread a
//! cut waits for the slowest rank's phase), with per-pair sent == received. Each cut is held
//! until a rank has entered MPI during it (its compute phase ended; at most 4 s): that call
//! must return only after the resume, and some cut must have held one. The program's own checks (payloads, order, collective results) pass
//! at the end.
//!
//! With an MPI-IO file open the progress thread steps back (the application's thread may be
//! inside an MPI-IO call the layer does not wrap): cuts are made by the application's thread,
//! and the collective MPI-IO calls are aligned like other collectives.

mod common;

use common::cut::{check_cut_makers, check_pairs, cut_threads, read_cut};
use common::*;
use std::fs;
use std::path::Path;
use std::time::Duration;
use symvirt_mpi::mpi_build::{Linkage, MpiImpl};

/// Compute phases last 2/3 to 4/3 of this (the stress program's STRESS_COMPUTE_MS).
const COMPUTE_MS: u64 = 2000;
/// The bound each cut must meet (see the top).
const QUIESCE_BOUND: Duration = Duration::from_secs(1);

fn run_computing(mpi: MpiImpl, tag: &str, epochs: u64) {
    let rig = Rig::new(tag);
    let prog = program(mpi, "stress.c", Linkage::Plain);
    let cuts = rig.dir.0.join("cuts");
    fs::create_dir_all(&cuts).unwrap();
    let mut env = rig.transparent_env(mpi);
    env.push(("SYMVIRT_CUT_LOG".into(), cuts.display().to_string()));
    env.push(("STRESS_COMPUTE_MS".into(), COMPUTE_MS.to_string()));
    let args = [
        "compute,ring,compute_nb,collective",
        cuts.to_str().unwrap(),
        "2",
    ];
    let mut job = Job::start(mpi, &prog, &args, &env, &rig.dir.0);
    let mut jitter = Jitter::new();
    let mut holds = Vec::new();
    let mut slowest = Duration::ZERO;
    for epoch in 1..=epochs {
        std::thread::sleep(Duration::from_millis(jitter.ms(800, 2800)));
        let took = quiesce(&rig, &mut job, epoch);
        let from = monotonic_ns();
        eprintln!("{tag}: epoch {epoch} quiesced in {took:?}");
        slowest = slowest.max(took);
        check_pairs(&read_cut(&cuts, epoch), epoch);
        // Hold the cut until a rank is inside an MPI call entered during it (its compute
        // phase ended; phases last at most 4/3 COMPUTE_MS).
        let wait = Duration::from_millis(2 * COMPUTE_MS);
        holds.push(hold_cut(&cuts, &job, epoch, from, wait));
        resume_and_confirm(&rig, &mut job, epoch, &interconnect_for(epoch));
    }
    job.stop_and_check(&cuts);
    assert!(
        slowest < QUIESCE_BOUND,
        "a cut took {slowest:?} to quiesce ranks that were computing\n{}",
        job.logs()
    );
    // A call entered while a cut held the rank returned only after the resume.
    let held = check_holds(&cuts, &holds);
    // Compute phases fill most of the run, so some cut finds a rank computing.
    assert!(
        held > 0,
        "no MPI call was entered during any of {epochs} cuts"
    );
    let by_thread = (1..=epochs)
        .flat_map(|e| cut_makers(&cuts, e))
        .filter(|m| m == "the progress thread")
        .count();
    assert!(by_thread > 0, "the progress thread made none of the cuts");
}

/// Which thread made each rank's cut of `epoch`.
fn cut_makers(cuts: &Path, epoch: u64) -> Vec<String> {
    cut_threads(cuts, epoch)
        .into_iter()
        .map(|(m, _)| m)
        .collect()
}

/// With an MPI-IO file open the application's thread may be inside an MPI-IO call the layer
/// does not wrap, so the progress thread steps back: every cut is made by the application's
/// thread at its next wrapped call (after its compute phase at the latest) and is consistent,
/// and the program's file checks pass (collective writes, through a view every 4th iteration,
/// sync, and reads of the neighbour's block: aligned like other collectives).
fn run_with_a_file_open(mpi: MpiImpl, tag: &str, epochs: u64) {
    let rig = Rig::new(tag);
    let prog = program(mpi, "stress.c", Linkage::Plain);
    let cuts = rig.dir.0.join("cuts");
    fs::create_dir_all(&cuts).unwrap();
    let mut env = rig.transparent_env(mpi);
    env.push(("SYMVIRT_CUT_LOG".into(), cuts.display().to_string()));
    env.push(("STRESS_COMPUTE_MS".into(), "600".into()));
    let args = ["io,compute,ring,collective", cuts.to_str().unwrap(), "8"];
    let mut job = Job::start(mpi, &prog, &args, &env, &rig.dir.0);
    // A cut may fall before a rank has opened its file (the ranks start slowly on a loaded
    // machine): the progress thread may make that one. Cuts go on until some found files open.
    let (mut epoch, mut with_files) = (0, 0);
    while epoch < epochs || with_files == 0 {
        epoch += 1;
        assert!(epoch <= epochs + 10, "no cut found a file open");
        std::thread::sleep(Duration::from_millis(300 + (epoch * 370) % 600));
        quiesce(&rig, &mut job, epoch);
        check_pairs(&read_cut(&cuts, epoch), epoch);
        with_files += check_cut_makers(&cuts, epoch, false);
        resume_and_confirm(&rig, &mut job, epoch, &interconnect_for(epoch));
    }
    job.stop_and_check(&cuts);
    let written = fs::metadata(cuts.join("io.dat")).unwrap().len();
    assert_eq!(written, u64::from(RANKS) * 4096 * 8, "every rank's block");
}

#[test]
fn openmpi_ranks_computing_between_calls_are_cut_at_once_and_held_until_resume() {
    run_computing(MpiImpl::OpenMpi, "cmp-ompi", 4);
}

#[test]
fn mpich_ranks_computing_between_calls_are_cut_at_once_and_held_until_resume() {
    run_computing(MpiImpl::Mpich, "cmp-mpich", 4);
}

#[test]
fn openmpi_ranks_with_a_file_open_are_cut_by_their_own_thread() {
    run_with_a_file_open(MpiImpl::OpenMpi, "io-ompi", 3);
}

#[test]
fn mpich_ranks_with_a_file_open_are_cut_by_their_own_thread() {
    run_with_a_file_open(MpiImpl::Mpich, "io-mpich", 3);
}
