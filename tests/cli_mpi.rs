//! `ninja-migrate mpi build`, as a harness author uses it: build the layer for both MPIs
//! installed here, then run a real MPI job with the transparent layer preloaded the way the
//! command says.

mod mpi_ring;

use ninja_testkit::mpi_or_skip;
use serde_json::Value;
use std::path::Path;
use symvirt_mpi::mpi_build::MpiImpl;

fn mpi_of(name: &str) -> MpiImpl {
    MpiImpl::ALL.into_iter().find(|m| m.name() == name).unwrap()
}

#[test]
fn mpi_build_makes_the_layer_for_every_installed_mpi_and_a_job_runs_under_it() {
    if !mpi_or_skip("mpi_build_makes_the_layer_for_every_installed_mpi_and_a_job_runs_under_it") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ninja-cli-mpi-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let libs = dir.join("libs");
    let out = mpi_ring::ninja(&["mpi", "build", "--json", "--out", libs.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let built: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let names: Vec<&str> = built.iter().map(|b| b["mpi"].as_str().unwrap()).collect();
    assert_eq!(names, ["openmpi", "mpich"], "{stdout}");
    for b in &built {
        let mpi = mpi_of(b["mpi"].as_str().unwrap());
        for key in ["transparent", "explicit_shared", "explicit_static"] {
            let path = Path::new(b[key].as_str().unwrap());
            assert!(path.is_file(), "{key}: {}", path.display());
            assert!(path.starts_with(dir.join("libs").join(mpi.name())));
        }
        let so = b["transparent"].as_str().unwrap();
        assert!(b["preload"].as_str().unwrap().contains(so), "{b}");
        // The job, with the layer preloaded as the command says (-x / -genv LD_PRELOAD).
        let exe = mpi_ring::build(mpi, &dir, 100, 0);
        let run = mpi
            .launcher(2, &[("LD_PRELOAD".into(), so.into())])
            .arg(&exe)
            .output()
            .unwrap();
        let (job_out, job_err) = (
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr),
        );
        assert!(run.status.success(), "{}: {job_out}{job_err}", mpi.name());
        assert!(
            job_out.contains("ring ok 100"),
            "{}: {job_out}{job_err}",
            mpi.name()
        );
        // The layer was in the job: each rank says it runs without an agent, and what is
        // true then (no migration, cuts by SIGUSR1).
        assert_eq!(
            job_err
                .matches("no guest agent")
                .zip(job_err.matches(
                    "the job cannot be migrated; SIGUSR1 through the launcher still takes cuts"
                ))
                .count(),
            2,
            "{}: {job_err}",
            mpi.name()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_default_library_directory_is_the_workspace_target() {
    // Built or not, `mpi env` names the layer where `mpi build` puts it by default.
    let out = mpi_ring::ninja(&["mpi", "env", "--mpi", "openmpi"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let default = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/ninja-mpi/openmpi");
    assert!(
        said.contains(default.to_str().unwrap()),
        "{said} (expected under {})",
        default.display()
    );
}
