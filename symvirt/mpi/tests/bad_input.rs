//! Bad input on the MPI side, real 4-rank jobs and the real agent: a resume for the wrong
//! epoch, an agent that disappears (between epochs, and while the ranks wait at the cut), and a
//! request that races MPI_Finalize. Each ends in a clear error or a safe no-op, the job's own
//! checks pass, and nothing hangs (every wait is bounded; jobs are killed on drop).

mod common;

use common::cut::{check_pairs, read_cut, record_line};
use common::*;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use symvirt::protocol::{GuestMessage, HostMessage};
use symvirt_mpi::mpi_build::{Linkage, MpiImpl};

const MODES: &str = "ring,ring_nb,anysource,collective";

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Mode {
    Explicit,
    Transparent,
}

/// Starts the stress program in `mode` against the rig's agent; returns the job and the
/// records directory.
fn start(rig: &Rig, mpi: MpiImpl, mode: Mode) -> (Job, PathBuf) {
    start_with(rig, mpi, mode, Vec::new())
}

/// [`start`] with more environment for the ranks.
fn start_with(
    rig: &Rig,
    mpi: MpiImpl,
    mode: Mode,
    mut env: Vec<(String, String)>,
) -> (Job, PathBuf) {
    let cuts = rig.dir.0.join("cuts");
    fs::create_dir_all(&cuts).unwrap();
    env.push(rig.agent_env());
    let linkage = match mode {
        Mode::Explicit => Linkage::Explicit,
        Mode::Transparent => {
            env.push(("SYMVIRT_CUT_LOG".into(), cuts.display().to_string()));
            env.push((
                "LD_PRELOAD".into(),
                libraries(mpi).transparent.display().to_string(),
            ));
            Linkage::Plain
        }
    };
    let prog = program(mpi, "stress.c", linkage);
    let job = Job::start(
        mpi,
        &prog,
        &[MODES, cuts.to_str().unwrap(), "16"],
        &env,
        &rig.dir.0,
    );
    (job, cuts)
}

fn finish_ok(job: &mut Job, cuts: &std::path::Path) -> String {
    fs::write(cuts.join("stop"), "").unwrap();
    let (ok, out) = job.wait();
    assert!(ok, "MPI job failed\n{}", job.logs());
    assert_eq!(
        out.lines().filter(|l| l.contains(" OK rank ")).count(),
        RANKS as usize,
        "{out}"
    );
    out
}

fn expect_quiesced(rig: &Rig, job: &mut Job, epoch: u64) {
    match outcome_while_running(rig, job) {
        GuestMessage::Quiesced { epoch: e } if e == epoch => {}
        other => panic!("expected quiesced {epoch}, got {other:?}\n{}", job.logs()),
    }
}

fn wrong_epoch_resume(mpi: MpiImpl, mode: Mode, tag: &str) {
    let rig = Rig::new(tag);
    let (mut job, cuts) = start(&rig, mpi, mode);
    rig.prepare(1);
    expect_quiesced(&rig, &mut job, 1);
    // A resume for an epoch that is not the current one: refused with a clear error; the
    // ranks stay paused. (A rank given such a resume by its agent ignores it too: see the
    // control-plane unit test `resume_for_another_epoch_is_ignored`.)
    let refused = rig.host.send(&HostMessage::Resume {
        epoch: 7,
        interconnect: ethernet(7),
    });
    assert!(
        matches!(refused, Err(symvirt::Error::Transition { .. })),
        "{refused:?}"
    );
    let early = rig.host.wait_for(
        |m| matches!(m, GuestMessage::Resumed { .. }),
        Instant::now() + Duration::from_millis(500),
    );
    assert!(
        early.is_err(),
        "a wrong-epoch resume released the ranks: {early:?}"
    );
    assert!(job.running(), "{}", job.logs());
    rig.resume(1, ethernet(1));
    match outcome_while_running(&rig, &mut job) {
        GuestMessage::Resumed { epoch: 1, .. } => {}
        other => panic!("expected resumed 1, got {other:?}\n{}", job.logs()),
    }
    let out = finish_ok(&mut job, &cuts);
    if mode == Mode::Explicit {
        assert!(out.contains("agent_errors 0 cuts 1"), "{out}");
    }
}

#[test]
fn wrong_epoch_resume_is_ignored_explicit_openmpi() {
    wrong_epoch_resume(MpiImpl::OpenMpi, Mode::Explicit, "bad-epoch-exp-ompi");
}

#[test]
fn wrong_epoch_resume_is_ignored_transparent_mpich() {
    wrong_epoch_resume(MpiImpl::Mpich, Mode::Transparent, "bad-epoch-tr-mpich");
}

/// The agent goes away between epochs: the job runs on (no more migrations) and finishes.
fn agent_gone_between_epochs(mpi: MpiImpl, mode: Mode, tag: &str) {
    let mut rig = Rig::new(tag);
    let (mut job, cuts) = start(&rig, mpi, mode);
    rig.prepare(1);
    expect_quiesced(&rig, &mut job, 1);
    rig.resume(1, infiniband());
    match outcome_while_running(&rig, &mut job) {
        GuestMessage::Resumed { epoch: 1, .. } => {}
        other => panic!("expected resumed 1, got {other:?}\n{}", job.logs()),
    }
    rig.agent.take(); // its socket disappears with it
    assert!(!rig.rank_socket().exists());
    std::thread::sleep(Duration::from_millis(200)); // let the ranks run without it
    let out = finish_ok(&mut job, &cuts);
    if mode == Mode::Explicit {
        assert!(out.contains("agent_errors 0 cuts 1"), "{out}");
    }
}

#[test]
fn agent_gone_between_epochs_explicit_mpich() {
    agent_gone_between_epochs(MpiImpl::Mpich, Mode::Explicit, "gone-exp-mpich");
}

#[test]
fn agent_gone_between_epochs_transparent_openmpi() {
    agent_gone_between_epochs(MpiImpl::OpenMpi, Mode::Transparent, "gone-tr-ompi");
}

/// The agent goes away while every rank waits at the cut: each rank gets a clear error (the
/// explicit safe point returns SYMVIRT_ERR_AGENT; the transparent layer logs it), is released,
/// and the job finishes correctly.
fn agent_gone_at_the_cut(mpi: MpiImpl, mode: Mode, tag: &str) {
    let mut rig = Rig::new(tag);
    let (mut job, cuts) = start(&rig, mpi, mode);
    rig.prepare(1);
    expect_quiesced(&rig, &mut job, 1);
    rig.agent.take();
    let out = finish_ok(&mut job, &cuts);
    let err = fs::read_to_string(&job.stderr).unwrap();
    match mode {
        Mode::Explicit => {
            let lines = out.lines().filter(|l| l.contains("agent_errors 1 cuts 0"));
            assert_eq!(lines.count(), RANKS as usize, "{out}\n{err}");
            assert!(err.contains("agent connection lost"), "{err}");
        }
        Mode::Transparent => {
            for rec in read_records(&cuts, "resumed", 1) {
                assert!(rec.starts_with("error -2 "), "{rec}");
            }
        }
    }
}

#[test]
fn agent_gone_at_the_cut_explicit_openmpi() {
    agent_gone_at_the_cut(MpiImpl::OpenMpi, Mode::Explicit, "cutgone-exp-ompi");
}

#[test]
fn agent_gone_at_the_cut_transparent_mpich() {
    agent_gone_at_the_cut(MpiImpl::Mpich, Mode::Transparent, "cutgone-tr-mpich");
}

/// A request sent as the job finishes: either every rank still reaches the cut (then it
/// completes normally) or the ranks have left (the agent reports a failed epoch). Never a hang,
/// never a broken job.
fn request_during_finalize(mpi: MpiImpl, mode: Mode, tag: &str) {
    let rig = Rig::new(tag);
    let (mut job, cuts) = start(&rig, mpi, mode);
    rig.prepare(1);
    expect_quiesced(&rig, &mut job, 1);
    rig.resume(1, ethernet(1));
    match outcome_while_running(&rig, &mut job) {
        GuestMessage::Resumed { epoch: 1, .. } => {}
        other => panic!("expected resumed 1, got {other:?}\n{}", job.logs()),
    }
    fs::write(cuts.join("stop"), "").unwrap();
    rig.host
        .send(&HostMessage::Prepare {
            epoch: 2,
            deadline_ms: 30_000,
        })
        .unwrap();
    match rig
        .host
        .wait_for(|m| !matches!(m, GuestMessage::Hello { .. }), soon())
        .unwrap()
    {
        GuestMessage::Quiesced { epoch: 2 } => {
            rig.resume(2, ethernet(2));
            let m = rig
                .host
                .wait_for(|m| !matches!(m, GuestMessage::Hello { .. }), soon())
                .unwrap();
            assert!(matches!(m, GuestMessage::Resumed { epoch: 2, .. }), "{m:?}");
        }
        GuestMessage::Failed { epoch: 2, reason } => {
            assert!(
                reason.contains("left") || reason.contains("deadline"),
                "{reason}"
            )
        }
        other => panic!("unexpected {other:?}\n{}", job.logs()),
    }
    let (ok, out) = job.wait();
    assert!(ok, "MPI job failed\n{}", job.logs());
    assert_eq!(out.lines().filter(|l| l.contains(" OK rank ")).count(), 4);
}

#[test]
fn request_during_finalize_explicit_mpich() {
    request_during_finalize(MpiImpl::Mpich, Mode::Explicit, "fin-exp-mpich");
}

#[test]
fn request_during_finalize_transparent_openmpi() {
    request_during_finalize(MpiImpl::OpenMpi, Mode::Transparent, "fin-tr-ompi");
}

/// Waits (at most a minute) for the job to create `path`.
/// Waits for the agent to fail `epoch` with a reason that says a rank cannot quiesce and
/// contains every one of `why`, then aborts the epoch as the host does.
fn expect_failed_then_abort(rig: &Rig, job: &mut Job, epoch: u64, why: &[&str]) {
    match outcome_while_running(rig, job) {
        GuestMessage::Failed { epoch: e, reason } if e == epoch => assert!(
            reason.contains("cannot quiesce") && why.iter().all(|w| reason.contains(w)),
            "{reason}"
        ),
        other => panic!(
            "epoch {epoch}: expected failed, got {other:?}\n{}",
            job.logs()
        ),
    }
    rig.host.send(&HostMessage::Abort { epoch }).unwrap();
}

/// A program in states the transparent layer does not cover (`program`, run with a work
/// directory): each time it creates a `served` file there, a migration request is served (a
/// covered state next to the uncovered ones); each time it creates a `refused` file, a request
/// fails the epoch with a reason containing every one of `reason` (the host keeps the job
/// where it is); after each, the test creates the file that lets the job go on. Once the
/// program creates `served_at`, a request is served. Then the job ends on `stop`, its own
/// checks passing (a line `<name> OK rank R` per rank).
struct Uncovered<'a> {
    program: &'a str,
    /// Where the program is served migration first, and the file that lets it go on from
    /// there: (created by the program, created by the test), in order.
    served: &'a [(&'a str, &'a str)],
    /// Where it is refused migration next, the same way.
    refused: &'a [(&'a str, &'a str)],
    reason: &'a [&'a str],
    served_at: &'a str,
}

fn refused_until_left(mpi: MpiImpl, tag: &str, u: Uncovered) {
    let rig = Rig::new(tag);
    let prog = program(mpi, u.program, Linkage::Plain);
    let work = rig.dir.0.join("work");
    fs::create_dir_all(&work).unwrap();
    let env = rig.transparent_env(mpi);
    let mut job = Job::start(mpi, &prog, &[work.to_str().unwrap()], &env, &rig.dir.0);
    let mut epoch = 0;
    for (at, leave) in u.served {
        epoch += 1;
        wait_for_file(&mut job, &work.join(at));
        rig.prepare(epoch);
        match outcome_while_running(&rig, &mut job) {
            GuestMessage::Quiesced { epoch: e } if e == epoch => {}
            other => panic!("expected quiesced at {at}, got {other:?}\n{}", job.logs()),
        }
        resume_and_confirm(&rig, &mut job, epoch, &interconnect_for(epoch));
        fs::write(work.join(leave), "").unwrap();
    }
    for (at, leave) in u.refused {
        epoch += 1;
        wait_for_file(&mut job, &work.join(at));
        rig.prepare(epoch);
        expect_failed_then_abort(&rig, &mut job, epoch, u.reason);
        fs::write(work.join(leave), "").unwrap();
    }
    epoch += 1;
    wait_for_file(&mut job, &work.join(u.served_at));
    rig.prepare(epoch);
    match outcome_while_running(&rig, &mut job) {
        GuestMessage::Quiesced { epoch: e } if e == epoch => {}
        other => panic!("expected quiesced, got {other:?}\n{}", job.logs()),
    }
    resume_and_confirm(&rig, &mut job, epoch, &interconnect_for(epoch));
    fs::write(work.join("stop"), "").unwrap();
    let (ok, out) = job.wait();
    assert!(ok, "{} job failed\n{}", u.program, job.logs());
    let name = u.program.split('.').next().unwrap();
    let oks = out
        .lines()
        .filter(|l| l.starts_with(&format!("{name} OK rank ")))
        .count();
    assert_eq!(oks, RANKS as usize, "{out}");
}

/// One-sided communication is not covered by the transparent layer: while a window is open a
/// migration request fails the epoch with a reason that names it and the job goes on, its own
/// checks passing; once the window is freed a request is served (a request before the window
/// exists is served too: the window's creation is aligned).
const WINDOWS: Uncovered = Uncovered {
    program: "rma.c",
    served: &[],
    refused: &[("open", "phase2")],
    reason: &["one-sided communication is not covered", "1 window open"],
    served_at: "freed",
};

#[test]
fn openmpi_one_sided_windows_refuse_migration_until_freed() {
    refused_until_left(MpiImpl::OpenMpi, "bad-rma-ompi", WINDOWS);
}

#[test]
fn mpich_one_sided_windows_refuse_migration_until_freed() {
    refused_until_left(MpiImpl::Mpich, "bad-rma-mpich", WINDOWS);
}

/// The same from Fortran (`rma_f.f90`): Open MPI's Fortran window calls reach the layer only
/// through its Fortran entry points. Without them the window went unseen and the cut was
/// served while it was open.
const FORTRAN_WINDOWS: Uncovered = Uncovered {
    program: "rma_f.f90",
    ..WINDOWS
};

#[test]
fn openmpi_fortran_one_sided_windows_refuse_migration_until_freed() {
    refused_until_left(MpiImpl::OpenMpi, "bad-rmaf-ompi", FORTRAN_WINDOWS);
}

#[test]
fn mpich_fortran_one_sided_windows_refuse_migration_until_freed() {
    refused_until_left(MpiImpl::Mpich, "bad-rmaf-mpich", FORTRAN_WINDOWS);
}

/// MPI 4's persistent collectives are covered, partitioned requests only observed. A request
/// is served while ranks 1.. have started an MPI_Allreduce_init's request and rank 0, outside
/// MPI, has not (the layer defers the starts until every member has started: nothing is in
/// flight), and while the request is inactive everywhere; the collective runs 9 times,
/// checked. While ranks 0 and 1 hold a partitioned send and receive (MPI_Psend_init,
/// MPI_Precv_init) a request fails the epoch with a reason naming the call, and the job goes
/// on: the message passes (MPI_Pready, MPI_Parrived), checked; once both are freed a request
/// is served. MPICH 4 only: Open MPI 4.1 has no MPI 4 calls.
#[test]
fn mpich_persistent_collectives_served_partitioned_requests_refused() {
    refused_until_left(
        MpiImpl::Mpich,
        "bad-pcoll-mpich",
        Uncovered {
            program: "persistent_coll.c",
            served: &[("started", "go"), ("idle", "go2")],
            refused: &[("partitioned", "go3")],
            reason: &["made by MPI_P", "_init exists", "not covered"],
            served_at: "done",
        },
    );
}

/// A message of over 2 GiB in flight at a cut, or matched by MPI_Mprobe and not received yet
/// (which stopped the job before), cannot be held in the layer's buffer: each cut is
/// answered "unable" with a reason saying so (not a rank aborted, nor a cut that leaves the
/// message uncounted), the job goes on, receives the message (truncated on purpose: the
/// program stays small; the message's pages are never written), and a later request is served
/// with consistent counts. MPICH: Open MPI 4.1 itself crashes (a segfault in its shared-memory
/// copy) when a message this large is truncated, with or without the layer.
#[test]
fn mpich_message_over_2_gib_in_flight_refuses_migration() {
    refused_until_left(
        MpiImpl::Mpich,
        "bad-oversized-mpich",
        Uncovered {
            program: "oversized.c",
            served: &[],
            refused: &[("matched", "go1"), ("sent", "go")],
            reason: &["over 2 GiB from rank 0", "cannot hold it"],
            served_at: "received",
        },
    );
}

/// `stuck_drain.c` (with `mode`, if any) against a new rig, with cut records: the rig, the
/// job once rank 0 has sent its message, the program's work directory and the records'.
fn start_stuck_drain(mpi: MpiImpl, tag: &str, mode: &[&str]) -> (Rig, Job, PathBuf, PathBuf) {
    start_in_work_dir(mpi, tag, "stuck_drain.c", mode, "sent")
}

/// Starts the test program `source` under the transparent layer, its work directory WORK
/// (its first argument, then `args`) beside its cut records CUTS, and waits until it creates
/// WORK/`first`. Returns the rig, the job, WORK and CUTS.
fn start_in_work_dir(
    mpi: MpiImpl,
    tag: &str,
    source: &str,
    args: &[&str],
    first: &str,
) -> (Rig, Job, PathBuf, PathBuf) {
    let rig = Rig::new(tag);
    let prog = program(mpi, source, Linkage::Plain);
    let (work, cuts) = (rig.dir.0.join("work"), rig.dir.0.join("cuts"));
    fs::create_dir_all(&work).unwrap();
    fs::create_dir_all(&cuts).unwrap();
    let mut env = rig.transparent_env(mpi);
    env.push(("SYMVIRT_CUT_LOG".into(), cuts.display().to_string()));
    let mut all = vec![work.to_str().unwrap()];
    all.extend_from_slice(args);
    let mut job = Job::start(mpi, &prog, &all, &env, &rig.dir.0);
    wait_for_file(&mut job, &work.join(first));
    (rig, job, work, cuts)
}

/// After the given-up cuts: `stuck_drain.c` goes on (its message received and checked), a cut
/// for `epoch` is served with every pair agreeing, and the job ends with every rank's checks
/// passed.
fn stuck_drain_ends_well(rig: &Rig, job: &mut Job, work: &Path, cuts: &Path, epoch: u64) {
    fs::write(work.join("go"), "").unwrap();
    wait_for_file(job, &work.join("received"));
    rig.prepare(epoch);
    expect_quiesced(rig, job, epoch);
    check_pairs(&read_cut(cuts, epoch), epoch);
    resume_and_confirm(rig, job, epoch, &interconnect_for(epoch));
    fs::write(work.join("stop"), "").unwrap();
    wait_every_rank_ok(job, "stuck_drain OK rank ");
}

/// Every rank's record of the cut of `epoch` says it was given up by rank `by` (a prefix of
/// the rank's number, "" for any), and its resume record says aborted: they come within 30 s.
fn expect_given_up(job: &Job, cuts: &Path, epoch: u64, by: &str) {
    let until = Instant::now() + Duration::from_secs(30);
    let cut = loop {
        if let Some(records) = records_now(cuts, "cut", epoch) {
            break records;
        }
        assert!(Instant::now() < until, "epoch {epoch} held\n{}", job.logs());
        std::thread::sleep(Duration::from_millis(20));
    };
    for (rank, record) in cut.iter().enumerate() {
        assert!(
            record.contains(&format!("given up by rank {by}")),
            "epoch {epoch} rank {rank}: {record}"
        );
    }
    for (rank, record) in read_records(cuts, "resumed", epoch).iter().enumerate() {
        assert_eq!(record, "aborted\n", "epoch {epoch} rank {rank}");
    }
}

/// A cut whose drain cannot finish is given up by every rank, and the job goes on where it
/// is. `stuck_drain.c` makes one: rank 0 sends rank 1 a message on a communicator rank 1 has
/// no slot for yet (an `MPI_Comm_idup` of an intercommunicator, a gap the README lists; once
/// it is closed this test needs another way to stall a drain), then every rank computes.
/// - Epoch 1, the host allowing 8 s: rank 1 gives up at three quarters of that and tells the
///   host why (its drain waited for rank 0's message), before the agent's own deadline.
/// - Epoch 2, the host allowing 120 s, dies after 1 s; a new host asks for epoch 3 with 12 s
///   (the agent gives 2 up). The cut goes on, now bound by epoch 3's time, and is given up at
///   three quarters of it; the ranks then cut for 3, which is given up after 1 s, in time to
///   tell the new host why.
/// - Epoch 4, the host allowing 120 s, aborts it after 1 s: the ranks leave half a second
///   later (long before three quarters of 120 s).
///
/// Each time every rank's cut record says who gave it up, and every rank goes on (its resume
/// record says aborted). Then the message is received (checked), ring traffic passes
/// (checked), and epoch 5 is served with every pair's counts agreeing: nothing the given-up
/// cuts left behind (a peer's counts, a drained message) confuses a later one. Before, rank
/// 1's drain waited for ever and the job with it.
fn stuck_drain_given_up(mpi: MpiImpl, tag: &str) {
    let (mut rig, mut job, work, cuts) = start_stuck_drain(mpi, tag, &[]);
    // The host allows deadline_ms for epoch; the agent fails it with a rank's reason.
    let prepare_given_up =
        |rig: &Rig, job: &mut Job, epoch: u64, deadline_ms: u64, why: &[&str]| {
            let prepare = HostMessage::Prepare { epoch, deadline_ms };
            rig.host.send(&prepare).unwrap();
            expect_failed_then_abort(rig, job, epoch, why);
        };
    let stuck = [
        "gave the cut up: its drain waited",
        "for 0 of 1 messages from rank 0",
    ];

    prepare_given_up(&rig, &mut job, 1, 8000, &stuck);
    expect_given_up(&job, &cuts, 1, "1");

    rig.prepare(2);
    std::thread::sleep(Duration::from_secs(1));
    rig.new_host(tag);
    // Epoch 3's own cut begins after three quarters of its time: every rank drains for 1 s,
    // and any of them may give up first (a peer still leaving the cut before).
    prepare_given_up(
        &rig,
        &mut job,
        3,
        12_000,
        &["gave the cut up: its drain waited"],
    );
    expect_given_up(&job, &cuts, 2, "1");
    expect_given_up(&job, &cuts, 3, "");

    rig.prepare(4);
    std::thread::sleep(Duration::from_secs(1));
    rig.host.send(&HostMessage::Abort { epoch: 4 }).unwrap();
    expect_given_up(&job, &cuts, 4, "1");
    stuck_drain_ends_well(&rig, &mut job, &work, &cuts, 5);
}

#[test]
fn openmpi_cut_whose_drain_cannot_finish_is_given_up() {
    stuck_drain_given_up(MpiImpl::OpenMpi, "bad-stuck-ompi");
}

#[test]
fn mpich_cut_whose_drain_cannot_finish_is_given_up() {
    stuck_drain_given_up(MpiImpl::Mpich, "bad-stuck-mpich");
}

/// A rank that enters a given-up cut late must still get in: rank 3 of `stuck_drain.c late`
/// holds an MPI-IO file open (so the layer's progress thread makes no cut for it) and sends
/// rank 1 a 1 MiB message (`MPI_Ssend`) only once ranks 0-2 have given the cut up (the host
/// allowing 8 s, they wait for rank 3's counts) and wait in the post-drain agreement. Rank 1
/// drains the message there, so the send returns and rank 3 enters the cut at its next MPI
/// call; every rank leaves it; rank 1 then receives the message from the buffer (checked) and
/// a second cut is served with every pair agreeing. Without the drain in the agreement the
/// send, and so the job, waited for ever.
fn late_peer_gets_into_given_up_cut(mpi: MpiImpl, tag: &str) {
    let (rig, mut job, work, cuts) = start_stuck_drain(mpi, tag, &["late"]);
    let prepare = HostMessage::Prepare {
        epoch: 1,
        deadline_ms: 8000,
    };
    rig.host.send(&prepare).unwrap();
    let why = ["gave the cut up: its drain waited", "the counts of rank 3"];
    expect_failed_then_abort(&rig, &mut job, 1, &why);
    fs::write(work.join("late"), "").unwrap();
    expect_given_up(&job, &cuts, 1, "");
    stuck_drain_ends_well(&rig, &mut job, &work, &cuts, 2);
}

#[test]
fn openmpi_late_peer_gets_into_a_given_up_cut() {
    late_peer_gets_into_given_up_cut(MpiImpl::OpenMpi, "bad-late-ompi");
}

#[test]
fn mpich_late_peer_gets_into_a_given_up_cut() {
    late_peer_gets_into_given_up_cut(MpiImpl::Mpich, "bad-late-mpich");
}

/// A rank whose MPI uses RDMA verbs cannot be migrated (its endpoints would not survive the
/// device swap): while it holds a verbs device node open, a migration request fails the epoch
/// with a reason naming verbs and the device, every rank is released, and the job goes on and
/// finishes with its own checks passing. No InfiniBand here: the device node is a STAND-IN, a
/// plain file in a temporary directory that SYMVIRT_VERBS_DEVICE_DIR names in place of
/// /dev/infiniband/, held open by every rank (stress.c's STRESS_HOLD_OPEN). A job holding
/// nothing is served normally: every other test here.
/// `count_edges.c` in `mode`: a cut while every rank waits outside MPI is served with every
/// pair agreeing, and afterwards every rank's checks pass. Returns the cut's records.
fn count_edge(mpi: MpiImpl, tag: &str, mode: &str) -> Vec<String> {
    let (rig, mut job, work, cuts) = start_in_work_dir(mpi, tag, "count_edges.c", &[mode], "ready");
    rig.prepare(1);
    expect_quiesced(&rig, &mut job, 1);
    check_pairs(&read_cut(&cuts, 1), 1);
    resume_and_confirm(&rig, &mut job, 1, &interconnect_for(1));
    fs::write(work.join("go"), "").unwrap();
    wait_every_rank_ok(&mut job, "count_edges OK rank ");
    read_records(&cuts, "cut", 1)
}

/// Sends that MPI refused (a negative tag under `MPI_ERRORS_RETURN`: `MPI_Send`, `MPI_Isend`,
/// `MPI_Ssend`) are not counted: a later cut finds every pair even. Counted, they held every
/// later cut until the rank waiting for them gave it up.
fn refused_send_not_counted(mpi: MpiImpl, tag: &str) {
    count_edge(mpi, tag, "refused_send");
}

#[test]
fn openmpi_refused_send_is_not_counted() {
    refused_send_not_counted(MpiImpl::OpenMpi, "bad-refused-ompi");
}

#[test]
fn mpich_refused_send_is_not_counted() {
    refused_send_not_counted(MpiImpl::Mpich, "bad-refused-mpich");
}

/// A message a cut drained for a persistent receive not started yet is still delivered when
/// the program frees the communicator and then starts the receive (MPI keeps the
/// communicator for its persistent requests). Freeing it dropped the message before, and the
/// receive waited for ever.
fn persistent_receive_outlives_free(mpi: MpiImpl, tag: &str) {
    let cut = count_edge(mpi, tag, "persistent_after_free");
    assert_eq!(
        record_line(&cut[1], "drained "),
        "1",
        "rank 1's cut: {}",
        cut[1]
    );
}

#[test]
fn openmpi_persistent_receive_outlives_its_communicator() {
    persistent_receive_outlives_free(MpiImpl::OpenMpi, "bad-persfree-ompi");
}

#[test]
fn mpich_persistent_receive_outlives_its_communicator() {
    persistent_receive_outlives_free(MpiImpl::Mpich, "bad-persfree-mpich");
}

fn verbs_standin_refuses_migration(mpi: MpiImpl, mode: Mode, tag: &str) {
    let rig = Rig::new(tag);
    let standin_dir = rig.dir.0.join("standin-infiniband");
    fs::create_dir_all(&standin_dir).unwrap();
    let standin = standin_dir.join("uverbs0");
    fs::write(&standin, "").unwrap();
    let env = vec![
        (
            "SYMVIRT_VERBS_DEVICE_DIR".to_string(),
            standin_dir.display().to_string(),
        ),
        (
            "STRESS_HOLD_OPEN".to_string(),
            standin.display().to_string(),
        ),
    ];
    let (mut job, cuts) = start_with(&rig, mpi, mode, env);
    let named = format!("({} open)", standin.canonicalize().unwrap().display());
    // Twice: a refused cut leaves the job able to answer (and refuse) the next one.
    for epoch in 1..=2 {
        rig.prepare(epoch);
        let why = ["RDMA verbs", &named, "cannot survive the device swap"];
        expect_failed_then_abort(&rig, &mut job, epoch, &why);
        for rec in read_records(&cuts, "resumed", epoch) {
            assert!(rec.starts_with("aborted"), "epoch {epoch}: {rec}");
        }
    }
    let out = finish_ok(&mut job, &cuts);
    if mode == Mode::Explicit {
        let lines = out.lines().filter(|l| l.contains("agent_errors 0 cuts 2"));
        assert_eq!(lines.count(), RANKS as usize, "{out}");
    }
}

#[test]
fn verbs_standin_device_open_refuses_migration_explicit_openmpi() {
    verbs_standin_refuses_migration(MpiImpl::OpenMpi, Mode::Explicit, "verbs-exp-ompi");
}

#[test]
fn verbs_standin_device_open_refuses_migration_explicit_mpich() {
    verbs_standin_refuses_migration(MpiImpl::Mpich, Mode::Explicit, "verbs-exp-mpich");
}

#[test]
fn verbs_standin_device_open_refuses_migration_transparent_openmpi() {
    verbs_standin_refuses_migration(MpiImpl::OpenMpi, Mode::Transparent, "verbs-tr-ompi");
}

#[test]
fn verbs_standin_device_open_refuses_migration_transparent_mpich() {
    verbs_standin_refuses_migration(MpiImpl::Mpich, Mode::Transparent, "verbs-tr-mpich");
}
