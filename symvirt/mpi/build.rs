//! With the feature `rsmpi`: compiles `csrc/ucx_finalize.c` (the cure for MPICH before 4.2's
//! deadlock in `MPI_Finalize` over UCX's TCP transport) against the MPI the `mpi` crate binds
//! to (probed the way mpi-sys probes it), and links it whole into every program that uses the
//! Rust API, whose dynamic symbol table then carries the two UCX calls it interposes. Against
//! another MPI the file compiles to nothing. The C libraries compile it themselves
//! (`mpi_build`).

fn main() {
    // Like mpi-sys, probes once per target directory: a later MPICC does not rebuild either.
    println!("cargo:rerun-if-changed=csrc/ucx_finalize.c");
    #[cfg(feature = "rsmpi")]
    compile_cure();
}

#[cfg(feature = "rsmpi")]
fn compile_cure() {
    let mpi = build_probe_mpi::probe().unwrap_or_else(|errs| {
        panic!("no MPI found for the Rust API: {errs:?}");
    });
    let mut build = cc::Build::new();
    build
        .file("csrc/ucx_finalize.c")
        .flag("-std=gnu11")
        // Weak: this crate's staticlib may meet the C libraries' own copy (`ld -r`).
        .define("SYMVIRT_UCX_CURE_WEAK", None)
        .warnings_into_errors(true)
        // Linked whole: nothing in Rust calls it, MPICH's library does.
        .link_lib_modifier("+whole-archive");
    for dir in &mpi.include_paths {
        build.include(dir);
    }
    build.compile("symvirt_ucx_finalize");
}
