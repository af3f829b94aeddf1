//! What `SymVirt::safe_point` costs a Rust MPI program when nothing is pending (no agent).
//!
//!   mpirun -np 4 rsmpi_overhead [ITERS] [PAIRS]
//!
//! Under the launcher of the MPI it links (mpi-sys binds to the MPI `$MPICC` names when it is
//! first built in a target directory: `MPICC=mpicc.mpich CARGO_TARGET_DIR=target/rsmpi-mpich`
//! builds it for `mpiexec.mpich`). MPICH's ranks poll without yielding: with more ranks than
//! cores each message waits for a time slice, so compare the two MPIs with as many ranks as cores.
//!
//! Per pair of samples, in alternating order (A B, B A, ...: drift on a shared machine hits
//! both alike): A = ITERS iterations of an 8-byte ring (send-receive to the right), B = the
//! same with a safe point after each iteration; plus C = ITERS safe points alone. Times are
//! `MPI_Wtime` on rank 0 between barriers. Rank 0 prints one JSON line: medians in µs per
//! iteration, the B/A ratio per pair (median, min, max), and the MPI library.

use mpi::point_to_point::send_receive_into;
use mpi::topology::SimpleCommunicator;
use mpi::traits::*;
use symvirt_mpi::rsmpi::{Options, SymVirt};

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// µs per iteration of `iters` runs of `step`, timed between barriers.
fn timed(world: &SimpleCommunicator, iters: u64, mut step: impl FnMut()) -> f64 {
    world.barrier();
    let t = mpi::time();
    for _ in 0..iters {
        step();
    }
    world.barrier();
    (mpi::time() - t) * 1e6 / iters as f64
}

fn main() {
    let mut args = std::env::args().skip(1);
    let iters: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let pairs: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(7);
    let Some((universe, _)) = mpi::initialize_with_threading(mpi::Threading::Funneled) else {
        eprintln!("rsmpi_overhead: MPI was already initialized");
        std::process::exit(3);
    };
    let world = universe.world();
    let (me, np) = (world.rank(), world.size());
    let options = Options {
        socket: None,
        ..Options::from_env()
    };
    let mut sv = SymVirt::init_with(&world, options).unwrap_or_else(|e| {
        eprintln!("rsmpi_overhead: rank {me}: {e}");
        world.abort(4)
    });
    let right = world.process_at_rank((me + 1) % np);
    let left = world.process_at_rank((me + np - 1) % np);
    let out = [me as u64];
    let mut got = [0u64];
    let mut ring = || {
        send_receive_into(&out[..], &right, &mut got[..], &left);
    };
    let safe_point = |sv: &mut SymVirt| {
        sv.safe_point().unwrap_or_else(|e| {
            eprintln!("rsmpi_overhead: rank {me}: {e}");
            world.abort(5)
        })
    };
    // Warm-up (connections, pipeline).
    timed(&world, iters / 10 + 1, || {
        ring();
        safe_point(&mut sv);
    });
    let (mut a, mut b, mut c, mut ratio) = (vec![], vec![], vec![], vec![]);
    for pair in 0..pairs {
        let (ta, tb) = if pair % 2 == 0 {
            let ta = timed(&world, iters, &mut ring);
            let tb = timed(&world, iters, || {
                ring();
                safe_point(&mut sv);
            });
            (ta, tb)
        } else {
            let tb = timed(&world, iters, || {
                ring();
                safe_point(&mut sv);
            });
            (timed(&world, iters, &mut ring), tb)
        };
        c.push(timed(&world, iters, || {
            safe_point(&mut sv);
        }));
        a.push(ta);
        b.push(tb);
        ratio.push(tb / ta);
    }
    sv.finalize().unwrap_or_else(|e| {
        eprintln!("rsmpi_overhead: rank {me}: {e}");
        world.abort(5)
    });
    if me == 0 {
        let library = mpi::environment::library_version()
            .unwrap_or_default()
            .lines()
            .next()
            .unwrap_or_default()
            .trim_matches(|c: char| c == '\0' || c.is_whitespace())
            .to_string();
        let (rmin, rmax) = ratio
            .iter()
            .fold((f64::MAX, f64::MIN), |(lo, hi), &r| (lo.min(r), hi.max(r)));
        println!(
            "{{\"scenario\":\"rsmpi_safe_point_no_agent\",\"mpi\":{:?},\"ranks\":{np},\"iters\":{iters},\"pairs\":{pairs},\"ring_us\":{:.3},\"ring_with_safe_point_us\":{:.3},\"safe_point_alone_us\":{:.3},\"ratio_median\":{:.3},\"ratio_min\":{rmin:.3},\"ratio_max\":{rmax:.3}}}",
            library,
            median(&mut a),
            median(&mut b),
            median(&mut c),
            median(&mut ratio)
        );
    }
    drop(world);
    drop(universe);
}
