//! Transparent mode: the unmodified stress program (no SymVirt calls) with the PMPI layer
//! preloaded, 4 ranks, Open MPI and MPICH, real guest agent. Several migration requests per
//! run, arriving wherever the ranks are (inside blocking receives, waits, probes, collectives,
//! between iterations); at every cut, read while the ranks are paused, every rank's count of
//! messages sent to each peer equals that peer's count of messages received from it; every
//! rank is released with the new interconnect; afterwards the program's own checks (no loss,
//! duplication, reordering or corruption; collective results) pass.

mod common;

use common::cut::{check_cut_makers, check_pairs, read_cut, record_line};
use common::*;
use std::fs;
use std::time::Duration;
use symvirt::protocol::GuestMessage;
use symvirt_mpi::mpi_build::{Linkage, MpiImpl};

/// `modes`: the C program's first argument; `None` runs the Fortran program.
fn run_transparent(mpi: MpiImpl, modes: Option<&str>, tag: &str, epochs: u64) {
    run_transparent_with(mpi, modes, tag, epochs, &[]);
}

/// The same, with `extra` added to the ranks' environment.
fn run_transparent_with(
    mpi: MpiImpl,
    modes: Option<&str>,
    tag: &str,
    epochs: u64,
    extra: &[(&str, &str)],
) {
    let rig = Rig::new(tag);
    let source = if modes.is_some() {
        "stress.c"
    } else {
        "stress_f.f90"
    };
    let prog = program(mpi, source, Linkage::Plain);
    let cuts = rig.dir.0.join("cuts");
    fs::create_dir_all(&cuts).unwrap();
    let mut env = rig.transparent_env(mpi);
    env.push(("SYMVIRT_CUT_LOG".to_string(), cuts.display().to_string()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let mut args: Vec<&str> = modes.into_iter().collect();
    args.extend([cuts.to_str().unwrap(), "16"]);
    let mut job = Job::start(mpi, &prog, &args, &env, &rig.dir.0);
    let mut last_total = 0;
    let mut open_files_seen = false;
    // With the progress thread a cut falls at once, even while the ranks are still starting
    // (creating communicators, opening files: slow on a loaded machine), so the first cuts may
    // find no message sent yet; cuts go on until one has seen traffic (at most 20 more).
    let mut epoch = 0;
    while epoch < epochs || last_total == 0 {
        epoch += 1;
        assert!(
            epoch <= epochs + 20,
            "no traffic observed in {} cuts",
            epoch - 1
        );
        // Requests land wherever the ranks happen to be; vary the moment a little.
        std::thread::sleep(Duration::from_millis(37 * epoch));
        let took = quiesce(&rig, &mut job, epoch);
        // Informational only (no timed assertions): request to all ranks quiesced.
        eprintln!("{tag}: epoch {epoch} quiesced in {:?}", took);
        let total = check_pairs(&read_cut(&cuts, epoch), epoch);
        let thread_off = extra.contains(&("SYMVIRT_PROGRESS_THREAD", "0"));
        open_files_seen |= check_cut_makers(&cuts, epoch, thread_off) > 0;
        assert!(total >= last_total, "counts went backwards");
        last_total = total;
        let ic = interconnect_for(epoch);
        resume_and_confirm(&rig, &mut job, epoch, &ic);
        let json = serde_json::to_string(&ic).unwrap();
        for rec in read_records(&cuts, "resumed", epoch) {
            assert_eq!(rec, format!("resumed {json}\n"));
        }
    }
    if modes.is_none() {
        // The Fortran program keeps its MPI-IO file open (opened through the layer's
        // mpi_file_open_ with Open MPI) from its start to its end.
        assert!(open_files_seen, "no cut saw the program's MPI-IO file open");
    }
    fs::write(cuts.join("stop"), "").unwrap();
    let (ok, out) = job.wait();
    assert!(ok, "MPI job failed\n{}", job.logs());
    let oks = out.lines().filter(|l| l.contains(" OK rank ")).count();
    assert_eq!(oks, RANKS as usize, "{out}");
}

/// `cuts_wanted` cuts requested 0-4 ms apart while `stress.c` runs `modes`, so that some land
/// while a rank is still agreeing on a collective that others have already run: every cut
/// consistent, every check passed. Probabilistic: such a test may pass without its fix.
fn cuts_close_together(mpi: MpiImpl, modes: &str, tag: &str, cuts_wanted: u64) {
    cuts_close_together_with(mpi, modes, tag, cuts_wanted, &[]);
}

/// The same, with `extra` added to the ranks' environment.
fn cuts_close_together_with(
    mpi: MpiImpl,
    modes: &str,
    tag: &str,
    cuts_wanted: u64,
    extra: &[(&str, &str)],
) {
    let rig = Rig::new(tag);
    let prog = program(mpi, "stress.c", Linkage::Plain);
    let cuts = rig.dir.0.join("cuts");
    fs::create_dir_all(&cuts).unwrap();
    let mut env = rig.transparent_env(mpi);
    env.push(("SYMVIRT_CUT_LOG".to_string(), cuts.display().to_string()));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    let args = [modes, cuts.to_str().unwrap(), "16"];
    let mut job = Job::start(mpi, &prog, &args, &env, &rig.dir.0);
    for epoch in 1..=cuts_wanted {
        std::thread::sleep(Duration::from_millis(epoch * 7 % 5));
        quiesce(&rig, &mut job, epoch);
        check_pairs(&read_cut(&cuts, epoch), epoch);
        resume_and_confirm(&rig, &mut job, epoch, &interconnect_for(epoch));
    }
    fs::write(cuts.join("stop"), "").unwrap();
    wait_every_rank_ok(&mut job, "stress OK rank ");
}

/// A collective called inside another: mode `attrfree`, whose attribute delete callback frees
/// a communicator inside the layer's `MPI_Comm_free`; some cuts land while a rank aligns the
/// outer free and its members agree on it during the cut. Before the free was left to run
/// after such a cut, Open MPI held a cut for good in 1 run of 3 (and in 1 of 7 with 60 cuts).
#[test]
fn transparent_openmpi_collective_inside_a_collective_at_many_cuts() {
    cuts_close_together(MpiImpl::OpenMpi, "attrfree", "tr-nest-ompi", 150);
}

#[test]
fn transparent_mpich_collective_inside_a_collective_at_many_cuts() {
    cuts_close_together(MpiImpl::Mpich, "attrfree", "tr-nest-mpich", 150);
}

const P2P: &str = "ring,ring_nb,alltoall,anysource";
const COLL: &str = "collective,anysource,collective";

#[test]
fn transparent_openmpi_p2p_consistent_at_every_cut() {
    run_transparent(MpiImpl::OpenMpi, Some(P2P), "tr-p2p-ompi", 4);
}

#[test]
fn transparent_mpich_p2p_consistent_at_every_cut() {
    run_transparent(MpiImpl::Mpich, Some(P2P), "tr-p2p-mpich", 4);
}

#[test]
fn transparent_openmpi_collectives_and_p2p_consistent_at_every_cut() {
    run_transparent(MpiImpl::OpenMpi, Some(COLL), "tr-coll-ompi", 4);
}

#[test]
fn transparent_mpich_collectives_and_p2p_consistent_at_every_cut() {
    run_transparent(MpiImpl::Mpich, Some(COLL), "tr-coll-mpich", 4);
}

#[test]
fn transparent_openmpi_fortran_consistent_at_every_cut() {
    run_transparent(MpiImpl::OpenMpi, None, "tr-f-ompi", 3);
}

#[test]
fn transparent_mpich_fortran_consistent_at_every_cut() {
    run_transparent(MpiImpl::Mpich, None, "tr-f-mpich", 3);
}

/// Ranks mostly sit in a blocking receive from a computing rank, or in a barrier.
/// With the progress thread switched off (`SYMVIRT_PROGRESS_THREAD=0`): every rank makes
/// its cut itself, at its next MPI call, as the layer did before the thread.
const NO_THREAD: &str = "stall,ring_nb,split,anysource,collective";

#[test]
fn transparent_openmpi_without_the_progress_thread_consistent_at_every_cut() {
    let off = [("SYMVIRT_PROGRESS_THREAD", "0")];
    run_transparent_with(MpiImpl::OpenMpi, Some(NO_THREAD), "tr-off-ompi", 4, &off);
}

#[test]
fn transparent_mpich_without_the_progress_thread_consistent_at_every_cut() {
    let off = [("SYMVIRT_PROGRESS_THREAD", "0")];
    run_transparent_with(MpiImpl::Mpich, Some(NO_THREAD), "tr-off-mpich", 4, &off);
}

const STALL: &str = "stall,ring,stall,collective";

#[test]
fn transparent_openmpi_requests_landing_in_receives_collectives_and_compute() {
    run_transparent(MpiImpl::OpenMpi, Some(STALL), "tr-stall-ompi", 4);
}

#[test]
fn transparent_mpich_requests_landing_in_receives_collectives_and_compute() {
    run_transparent(MpiImpl::Mpich, Some(STALL), "tr-stall-mpich", 4);
}

/// Sub-communicators: MPI_Comm_split into halves (remade and freed every few iterations), a
/// ring and collectives on each half while the other half does something else, WORLD traffic
/// in between: counts are per WORLD peer whatever the communicator, so the cut checks cover it.
const SUBCOMM: &str = "split,ring,split,collective";

#[test]
fn transparent_openmpi_sub_communicators_consistent_at_every_cut() {
    run_transparent(MpiImpl::OpenMpi, Some(SUBCOMM), "tr-split-ompi", 4);
}

#[test]
fn transparent_mpich_sub_communicators_consistent_at_every_cut() {
    run_transparent(MpiImpl::Mpich, Some(SUBCOMM), "tr-split-mpich", 4);
}

/// Persistent requests (Send_init, Recv_init, Startall; a receive started after a cut drained
/// its message is served from the layer's buffer) next to non-blocking ring traffic,
/// MPI_Sendrecv_replace and a receive the program frees while it is pending (its message is
/// counted when it lands: otherwise every later cut waits for it).
const PERSIST: &str = "persist,ring_nb,freerecv,replace,persist";

#[test]
fn transparent_openmpi_persistent_requests_consistent_at_every_cut() {
    run_transparent(MpiImpl::OpenMpi, Some(PERSIST), "tr-pers-ompi", 4);
}

#[test]
fn transparent_mpich_persistent_requests_consistent_at_every_cut() {
    run_transparent(MpiImpl::Mpich, Some(PERSIST), "tr-pers-mpich", 4);
}

/// MPI 4's MPI_Isendrecv and MPI_Isendrecv_replace (MPICH 4 has them, Open MPI 4.1 does not):
/// counted like the layer's own receive and send, a message a cut drained found in the buffer,
/// the receive's status returned (MPICH 4.0's own returns an empty one), next to ring traffic
/// and collectives.
const ISENDRECV: &str = "isendrecv,ring,isendrecv,collective";

#[test]
fn transparent_mpich_isendrecv_consistent_at_every_cut() {
    run_transparent(MpiImpl::Mpich, Some(ISENDRECV), "tr-isr-mpich", 4);
}

/// MPI 4's persistent collectives (MPICH 4): started by MPI_Startall while a rank computes
/// outside MPI (the others' starts wait for it, deferred by the layer), with ring traffic
/// in flight, completed through every completion call; a cut waits only for collectives every
/// member has started. Results checked.
const PCOLL: &str = "pcoll,ring,pcoll,collective";

#[test]
fn transparent_mpich_persistent_collectives_consistent_at_every_cut() {
    run_transparent(MpiImpl::Mpich, Some(PCOLL), "tr-pcoll-mpich", 4);
}

/// Persistent collectives made (`_init`), started, completed and freed every iteration, with
/// cuts landing while some ranks still agree on an `_init` that others have made already: a
/// rank that finishes that agreement inside the cut makes its request there. MPICH never
/// calls a request made so and not yet started complete, and a cut once waited for it, for
/// good (in 1 run of about 60 with 3 cuts soon after the start of `PCOLL`).
#[test]
fn transparent_mpich_persistent_collectives_made_while_cuts_land() {
    cuts_close_together(MpiImpl::Mpich, "pinit,ring", "tr-pinit-mpich", 150);
}

/// `MPI_Comm_create_group` over every rank but the last, which starts cuts meanwhile from a
/// receive (mode `cgroup`), with rank 0 slowed down in its alignments (a test hook): the other
/// members are inside the call while rank 0 still agrees on it, in the cut it answers. Open
/// MPI's members send their parts of the call with the program's tag on the parent
/// communicator; the cut's drain took them into the layer's buffer, rank 0 then ran the call
/// inside the cut and waited for them for good, and the others with it.
fn group_made_while_a_cut_lands(mpi: MpiImpl, tag: &str) {
    let slow = [("SYMVIRT_TEST_SLOW_ALIGN_RANK", "0")];
    cuts_close_together_with(mpi, "cgroup,ring", tag, 60, &slow);
}

#[test]
fn transparent_openmpi_group_made_while_a_cut_lands() {
    group_made_while_a_cut_lands(MpiImpl::OpenMpi, "tr-cgroup-ompi");
}

#[test]
fn transparent_mpich_group_made_while_a_cut_lands() {
    group_made_while_a_cut_lands(MpiImpl::Mpich, "tr-cgroup-mpich");
}

/// MPI 4's large-count (_c) forms of point-to-point calls, a matched receive and collectives
/// (blocking, non-blocking, v variant), counted and aligned like the int forms, next to ring
/// traffic.
const LARGE_COUNT: &str = "large_count,ring,large_count,ring_nb";

#[test]
fn transparent_mpich_large_count_calls_consistent_at_every_cut() {
    run_transparent(MpiImpl::Mpich, Some(LARGE_COUNT), "tr-lc-mpich", 4);
}

/// Matched probes (Mprobe/Improbe with Mrecv/Imrecv, ANY_SOURCE and ANY_TAG) next to
/// ordinary ANY_SOURCE traffic.
const MPROBE: &str = "mprobe,anysource,mprobe";

#[test]
fn transparent_openmpi_matched_probes_consistent_at_every_cut() {
    run_transparent(MpiImpl::OpenMpi, Some(MPROBE), "tr-mprobe-ompi", 4);
}

#[test]
fn transparent_mpich_matched_probes_consistent_at_every_cut() {
    run_transparent(MpiImpl::Mpich, Some(MPROBE), "tr-mprobe-mpich", 4);
}

/// Non-blocking collectives outstanding while point-to-point traffic goes on, one rank's
/// freeing their datatype and operation before the others have called them (the layer starts
/// them later), one in flight across a blocking send whose receiver waits for it first (and,
/// with MPI 4, a persistent one: without the layer's progress in that send, the job
/// deadlocked), and cancelled receives (one that nothing matches, one whose message a cut may
/// have drained), and a large buffered send whose `MPI_Buffer_detach` waits for its receiver.
const NBCOLL: &str = "nbcoll,nbfree,nbsend,bsend,cancel,split";

#[test]
fn transparent_openmpi_nonblocking_collectives_and_cancel_consistent_at_every_cut() {
    run_transparent(MpiImpl::OpenMpi, Some(NBCOLL), "tr-nbc-ompi", 4);
}

#[test]
fn transparent_mpich_nonblocking_collectives_and_cancel_consistent_at_every_cut() {
    run_transparent(MpiImpl::Mpich, Some(NBCOLL), "tr-nbc-mpich", 4);
}

/// Dynamic sparse data exchange (NBX: Issend, receive until the sends are matched, Ibarrier,
/// receive until it completes) next to blocking collectives and ANY_SOURCE traffic: a rank
/// keeps receiving while its Ibarrier is pending, so the layer must not hold it there.
const NBX: &str = "nbx,collective,nbx,anysource";

#[test]
fn transparent_openmpi_nbx_consistent_at_every_cut() {
    run_transparent(MpiImpl::OpenMpi, Some(NBX), "tr-nbx-ompi", 4);
}

#[test]
fn transparent_mpich_nbx_consistent_at_every_cut() {
    run_transparent(MpiImpl::Mpich, Some(NBX), "tr-nbx-mpich", 4);
}

/// Neighborhood collectives on a cartesian ring (blocking and non-blocking) and the v
/// variants of the non-blocking collectives, outstanding while ring traffic goes on.
const VCOLL: &str = "vcoll,ring,vcoll,split";

#[test]
fn transparent_openmpi_neighborhood_and_v_collectives_consistent_at_every_cut() {
    run_transparent(MpiImpl::OpenMpi, Some(VCOLL), "tr-vcoll-ompi", 4);
}

#[test]
fn transparent_mpich_neighborhood_and_v_collectives_consistent_at_every_cut() {
    run_transparent(MpiImpl::Mpich, Some(VCOLL), "tr-vcoll-mpich", 4);
}

/// An intercommunicator between the halves (point to point with ANY_SOURCE, counted per
/// WORLD peer through the remote group; Allreduce and Barrier aligned in two rounds so both
/// groups agree) next to a sub-communicator ring.
const INTER: &str = "inter,split,inter,ring";

#[test]
fn transparent_openmpi_intercommunicator_consistent_at_every_cut() {
    run_transparent(MpiImpl::OpenMpi, Some(INTER), "tr-inter-ompi", 4);
}

#[test]
fn transparent_mpich_intercommunicator_consistent_at_every_cut() {
    run_transparent(MpiImpl::Mpich, Some(INTER), "tr-inter-mpich", 4);
}

/// Calls the layer cannot make correct fail at the call with MPI_ERR_UNSUPPORTED_OPERATION
/// and a message (MPI_Cancel of a pending non-blocking collective, of a pending send, of a
/// pending MPI_Isendrecv), and the
/// program goes on; a receive too small for its message fails with MPI_ERR_TRUNCATE through the
/// layer's own receive path.
fn refuses(mpi: MpiImpl, tag: &str) {
    let rig = Rig::new(tag);
    let prog = program(mpi, "refusals.c", Linkage::Plain);
    let env = rig.transparent_env(mpi);
    let mut job = Job::start(mpi, &prog, &[], &env, &rig.dir.0);
    wait_every_rank_ok(&mut job, "refusals OK rank ");
    let err = fs::read_to_string(&job.stderr).unwrap();
    let refused = |why: &str| {
        err.lines()
            .filter(|l| l.contains("MPI_Cancel refused") && l.contains(why))
            .count()
    };
    // Rank 0's Ibarrier may already be complete when it cancels it (then nothing is refused).
    let collective = refused("a non-blocking collective cannot be cancelled");
    assert!(
        (RANKS as usize - 1..=RANKS as usize).contains(&collective),
        "{collective} collective refusals: {err}"
    );
    assert_eq!(refused("cancelling a send"), RANKS as usize, "{err}");
    // MPI 4's MPI_Isendrecv and _c calls: MPICH 4 has them, Open MPI 4.1 does not.
    let isendrecv = if mpi == MpiImpl::Mpich {
        RANKS as usize
    } else {
        0
    };
    assert_eq!(refused("cancelling MPI_Isendrecv"), isendrecv, "{err}");
    let too_large = err
        .lines()
        .filter(|l| l.contains("MPI_Sendrecv_replace_c refused: a count beyond an int"))
        .count();
    assert_eq!(too_large, isendrecv, "{err}");
    let freed_started = err
        .lines()
        .filter(|l| l.contains("MPI_Request_free refused: a started persistent collective"))
        .count();
    let others = if mpi == MpiImpl::Mpich {
        RANKS as usize - 1
    } else {
        0
    };
    assert_eq!(freed_started, others, "{err}");
}

#[test]
fn transparent_openmpi_refuses_calls_it_cannot_make_correct() {
    refuses(MpiImpl::OpenMpi, "tr-refuse-ompi");
}

#[test]
fn transparent_mpich_refuses_calls_it_cannot_make_correct() {
    refuses(MpiImpl::Mpich, "tr-refuse-mpich");
}

/// A new host's prepare while the ranks are in a cut: the host that asked for epoch E dies and
/// a new one asks for E+1 (the agent gives E up). Without the progress thread a rank joins a
/// cut at its next MPI call, so some ranks may have started their cut for E while a peer,
/// computing (0.2-0.4 s between calls), starts it for E+1: one cut then serves E+1 (a rank's
/// record says which epoch it started with). Before that shared cut, the first rank died
/// ("COUNTS for a later epoch during a cut") within 3 to 10 rounds. Rounds go on until it
/// happened (3 to 15 rounds here, at most 300); every cut is consistent pair by pair and the
/// job ends correctly.
fn new_host_during_a_cut(mpi: MpiImpl, tag: &str) {
    let mut rig = Rig::new(tag);
    let prog = program(mpi, "stress.c", Linkage::Plain);
    let cuts = rig.dir.0.join("cuts");
    fs::create_dir_all(&cuts).unwrap();
    let mut env = rig.transparent_env(mpi);
    env.push(("SYMVIRT_CUT_LOG".to_string(), cuts.display().to_string()));
    env.push(("SYMVIRT_PROGRESS_THREAD".to_string(), "0".to_string()));
    env.push(("STRESS_COMPUTE_MS".to_string(), "300".to_string()));
    let args = ["compute,ring", cuts.to_str().unwrap(), "16"];
    let mut job = Job::start(mpi, &prog, &args, &env, &rig.dir.0);
    quiesce(&rig, &mut job, 1);
    resume_and_confirm(&rig, &mut job, 1, &interconnect_for(1));
    let mut jitter = Jitter::new();
    let (mut joined, mut rounds) = (0, 0);
    for k in 1..=300u64 {
        if joined > 0 {
            break;
        }
        rounds = k;
        let (given_up, epoch) = (2 * k, 2 * k + 1);
        rig.prepare(given_up);
        std::thread::sleep(Duration::from_millis(jitter.ms(0, 15)));
        rig.new_host(tag);
        rig.prepare(epoch);
        match outcome_while_running(&rig, &mut job) {
            GuestMessage::Quiesced { epoch: e } if e == epoch => {}
            other => panic!(
                "epoch {epoch}: expected quiesced, got {other:?}\n{}",
                job.logs()
            ),
        }
        let records = read_records(&cuts, "cut", epoch);
        check_pairs(&read_cut(&cuts, epoch), epoch);
        resume_and_confirm(&rig, &mut job, epoch, &interconnect_for(epoch));
        if records
            .iter()
            .any(|r| record_line(r, "started ") == given_up.to_string())
        {
            joined += 1;
            assert!(
                records
                    .iter()
                    .all(|r| record_line(r, "serves ") == epoch.to_string()),
                "round {k}: {records:?}"
            );
        }
    }
    assert!(
        joined > 0,
        "300 rounds and no cut begun for a given-up epoch served the next"
    );
    eprintln!("{tag}: after {rounds} rounds");
    job.stop_and_check(&cuts);
}

#[test]
fn transparent_openmpi_new_host_during_a_cut() {
    new_host_during_a_cut(MpiImpl::OpenMpi, "newhost-ompi");
}

#[test]
fn transparent_mpich_new_host_during_a_cut() {
    new_host_during_a_cut(MpiImpl::Mpich, "newhost-mpich");
}

/// Unbound MPICH ranks, each in a session of its own, are each a scheduling group of their own
/// where the kernel's autogroups apply: rank 0 (and only it) says so at start, naming the cure.
/// Bound (`-bind-to core`) they get no warning, nor do Open MPI's ranks (one session).
#[test]
fn rank_zero_warns_when_unbound_ranks_are_scheduling_groups_of_their_own() {
    if !placement_warnings_testable() {
        return;
    }
    let short_run = |mpi: MpiImpl, tag: &str, bind: bool| {
        let rig = Rig::new(tag);
        let prog = program(mpi, "stress.c", Linkage::Plain);
        let mut cmd = mpi.launcher(RANKS, &rig.transparent_env(mpi));
        if bind {
            cmd.args(["-bind-to", "core"]);
        }
        stderr_of_short_run(&rig, cmd, "stress OK rank ", |work| {
            vec![
                prog.display().to_string(),
                "ring".into(),
                work.into(),
                "2".into(),
            ]
        })
    };
    let unbound = short_run(MpiImpl::Mpich, "place-mpich", false);
    assert_eq!(unbound.matches(PLACEMENT_WARNING).count(), 1, "{unbound}");
    assert!(unbound.contains("-bind-to core"), "{unbound}");
    let bound = short_run(MpiImpl::Mpich, "place-mpich-bound", true);
    assert!(!bound.contains(PLACEMENT_WARNING), "{bound}");
    let ompi = short_run(MpiImpl::OpenMpi, "place-ompi", false);
    assert!(!ompi.contains(PLACEMENT_WARNING), "{ompi}");
}

/// MPICH 4.0's MPI_Finalize over UCX's TCP transport with rank 0 late to its closes, under the
/// layer: every job ends (the layer's cure for MPICH's deadlock there, `csrc/ucx_finalize.c`).
#[test]
fn transparent_mpich_jobs_over_tcp_end_without_deadlock_in_finalize() {
    mpich_jobs_over_tcp_end(Linkage::Plain, "fin-tcp-t", 3);
}
