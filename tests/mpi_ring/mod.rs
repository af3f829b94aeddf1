//! What the command-line MPI tests share: `ninja-migrate` itself, the layer's libraries built
//! through `mpi build`, and the ring job: a token passed around the ranks `LAPS` times,
//! `PAUSE_US` apart; each rank but 0 adds its rank, and rank 0 prints `ring ok SUM` (or
//! `ring BAD SUM`).

// Each test binary that includes this module uses part of it.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use symvirt_mpi::mpi_build::{Libraries, MpiImpl};

const RING: &str = r#"
#include <mpi.h>
#include <stdio.h>
#include <unistd.h>
int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank, size, token = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    for (int lap = 0; lap < LAPS; lap++) {
        if (rank == 0) {
            MPI_Send(&token, 1, MPI_INT, 1, 7, MPI_COMM_WORLD);
            MPI_Recv(&token, 1, MPI_INT, size - 1, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        } else {
            MPI_Recv(&token, 1, MPI_INT, rank - 1, 7, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
            token += rank;
            MPI_Send(&token, 1, MPI_INT, (rank + 1) % size, 7, MPI_COMM_WORLD);
        }
        if (PAUSE_US > 0) usleep(PAUSE_US);
    }
    int want = 0;
    for (int r = 1; r < size; r++) want += r * LAPS;
    if (rank == 0) printf("ring %s %d\n", token == want ? "ok" : "BAD", token);
    MPI_Finalize();
    return 0;
}
"#;

/// The ring built with `mpi`'s `mpicc` in `dir`.
pub fn build(mpi: MpiImpl, dir: &Path, laps: u32, pause_us: u32) -> PathBuf {
    let src = dir.join("ring.c");
    std::fs::write(&src, RING).unwrap();
    let exe = dir.join(format!("ring-{}-{laps}", mpi.name()));
    let out = Command::new(mpi.mpicc())
        .arg(format!("-DLAPS={laps}"))
        .arg(format!("-DPAUSE_US={pause_us}"))
        .arg(&src)
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out));
    exe
}

/// A command's stdout and stderr, for assertion messages.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// `ninja-migrate ARGS`, run to its end.
pub fn ninja(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ninja-migrate"))
        .args(args)
        .output()
        .unwrap()
}

/// The layer's libraries for `mpi` in `out`, through `mpi build --json`.
pub fn built(mpi: MpiImpl, out: &Path) -> Libraries {
    let done = ninja(&[
        "mpi",
        "build",
        "--json",
        "--mpi",
        mpi.name(),
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(done.status.success(), "{}", text(&done));
    let l: serde_json::Value = serde_json::from_slice(&done.stdout).unwrap();
    let path = |k: &str| PathBuf::from(l[k].as_str().unwrap());
    Libraries {
        mpi,
        dir: out.join(mpi.name()),
        explicit_shared: path("explicit_shared"),
        explicit_static: path("explicit_static"),
        transparent: path("transparent"),
    }
}
