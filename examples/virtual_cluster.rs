//! A virtual cluster, end to end, by hand: two Linux guests running one MPI job, moved from
//! fabric A (the source cluster's HCA network, a STAND-IN here) to fabric B (Ethernet) and back
//! with `ninja-migrate plan run`, while you watch the job's traffic change wires.
//!
//! ```text
//! cargo run --release --example virtual_cluster -- up [openmpi|mpich]
//! ninja-migrate plan run DIR/plan-0.toml        # A -> B (DIR is printed by `up`)
//! cargo run --release --example virtual_cluster -- status
//! ninja-migrate plan run DIR/plan-1.toml        # B -> A
//! cargo run --release --example virtual_cluster -- down
//! ```
//!
//! `up` (as root, after `scripts/build-fixtures`) builds the layout the tests use
//! (`tests/cluster_rig`): a network namespace with three bridges, two TCG guests booting the
//! shared cluster root with their fabric-A NIC hot-added next to the `ivshmem` stand-in that
//! blocks plain migration, fabric B's NIC on standby (in every QEMU of the VM, its link down
//! off fabric B; the plans switch it), and a 4-rank stress job (2 ranks per guest, the transparent layer
//! preloaded) started by `mpirun` in vm0. It writes the two plans and leaves everything
//! running. `status` prints the bytes each fabric carried and the ranks' PIDs; `down` stops the
//! job, prints its own verdict, and removes everything.

#[path = "../tests/cluster_rig/mod.rs"]
mod cluster_rig;

use cluster_rig::{Fabric, Setup, VMS, VirtualCluster};
use ninja_testkit::cluster::{Fabrics, management_ip};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use symvirt_mpi::mpi_build::MpiImpl;

/// Where `up` leaves what `status` and `down` need.
const STATE: &str = "/tmp/ninja-virtual-cluster.json";

struct State {
    ns: String,
    dir: PathBuf,
    key: PathBuf,
}

impl State {
    fn load() -> Result<State, String> {
        let text =
            std::fs::read_to_string(STATE).map_err(|e| format!("{STATE}: {e} (run `up` first)"))?;
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        let field = |k: &str| {
            v[k].as_str()
                .map(str::to_owned)
                .ok_or(format!("{STATE}: {k}"))
        };
        Ok(State {
            ns: field("ns")?,
            dir: field("dir")?.into(),
            key: field("key")?.into(),
        })
    }

    fn ssh(&self, fabrics: &Fabrics, vm: usize, script: &str) -> String {
        match fabrics.ssh(&self.key, &management_ip(vm), script) {
            Ok(out) => String::from_utf8_lossy(&out.stdout).into_owned(),
            Err(e) => format!("(ssh vm{vm}: {e})"),
        }
    }
}

fn up(mpi: MpiImpl) -> Result<(), String> {
    if Path::new(STATE).exists() {
        return Err(format!(
            "{STATE} exists: a cluster is up (run `down` first)"
        ));
    }
    let mut cluster = VirtualCluster::boot("virtual_cluster example", "demo", Setup::new(mpi, VMS))
        .ok_or("a component is missing (the SKIPPED line says which)")?;
    cluster.start_job("ring,anysource,collective");
    cluster.wait_traffic(Fabric::A, 1 << 20)?;
    let [to_b, to_a] = cluster.write_round_trip_plans();
    let state = serde_json::json!({
        "ns": cluster.fabrics.ns(),
        "dir": cluster.dir(),
        "key": cluster.key(),
    });
    std::fs::write(STATE, state.to_string()).map_err(|e| format!("{STATE}: {e}"))?;
    println!(
        "virtual cluster up: 2 guests on fabric A, 4 ranks running; files in {}",
        cluster.dir().display()
    );
    println!("  A -> B: ninja-migrate plan run {}", to_b.display());
    println!("  B -> A: ninja-migrate plan run {}", to_a.display());
    println!("  status: cargo run --release --example virtual_cluster -- status");
    // Leave the guests and the namespace running for the plans; `down` removes them.
    std::mem::forget(cluster);
    Ok(())
}

fn status() -> Result<(), String> {
    let state = State::load()?;
    let fabrics = Fabrics::attach(&state.ns);
    for (fabric, name) in [(Fabric::A, "A"), (Fabric::B, "B")] {
        let bytes: Vec<String> = (0..VMS)
            .map(|vm| {
                let tap = fabric.tap(vm);
                match fabrics.tap_bytes(&tap) {
                    Ok(b) => format!("{tap} {:.1} MiB", b as f64 / f64::from(1 << 20)),
                    Err(_) => format!("{tap} -"),
                }
            })
            .collect();
        println!("fabric {name}: {}", bytes.join(", "));
    }
    for vm in 0..VMS {
        let pids = state.ssh(&fabrics, vm, "pidof stress");
        let route = state.ssh(&fabrics, vm, "ip route show 10.99.0.0/24");
        println!(
            "vm{vm}: ranks {}; data route: {}",
            pids.trim(),
            route.trim()
        );
    }
    std::mem::forget(fabrics);
    Ok(())
}

fn down() -> Result<(), String> {
    let state = State::load()?;
    let fabrics = Fabrics::attach(&state.ns);
    let verdict = state.ssh(
        &fabrics,
        0,
        "touch /tmp/job/stop; i=0; while [ ! -f /tmp/job/status ] && [ $i -lt 60 ]; do \
         sleep 1; i=$((i+1)); done; cat /tmp/job/out; echo \"exit status $(cat /tmp/job/status)\"",
    );
    println!("{}", verdict.trim());
    let _ = std::process::Command::new("pkill")
        .args(["-KILL", "-f"])
        .arg(format!("qemu-system-x86_64 .*{}", state.dir.display()))
        .status();
    // The stand-ins' shared memory files are named after the cluster's directory.
    if let Some(prefix) = state.dir.file_name().and_then(|n| n.to_str()) {
        for entry in std::fs::read_dir("/dev/shm")
            .into_iter()
            .flatten()
            .flatten()
        {
            if entry.file_name().to_string_lossy().starts_with(prefix) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&state.dir);
    let _ = std::fs::remove_file(STATE);
    drop(fabrics);
    println!("virtual cluster down");
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["up"] | ["up", "openmpi"] => up(MpiImpl::OpenMpi),
        ["up", "mpich"] => up(MpiImpl::Mpich),
        ["status"] => status(),
        ["down"] => down(),
        _ => Err("usage: virtual_cluster up [openmpi|mpich] | status | down".into()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("virtual_cluster: {e}");
            ExitCode::FAILURE
        }
    }
}
