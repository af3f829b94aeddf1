//! `ninja-migrate plan run` as a scheduler runs it: one VM holding the passthrough stand-in moves
//! to a destination QEMU the plan launches, onto Ethernet. The JSON events say every phase
//! succeeded, and the guest says so too: its agent at the destination confirms the resume of this
//! plan's epoch, and its dirtier keeps counting there without finding a stale page.

use ninja_testkit::{Qemu, QemuConfig, RawQmp, free_tcp_port, qemu_or_skip};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use symvirt::host_channel::qemu_channel_args;

const MEMORY_MIB: u32 = 128;

/// The guest runs the dirtier and the SymVirt agent (no MPI ranks; it reports its PCI devices).
fn guest_command(vm: &str) -> String {
    // ${IFS} is a space for the guest's shell; the kernel command line cannot carry one.
    format!(
        "/bin/sh -c /bin/ninja-guest-dirtier${{IFS}}4&/bin/symvirt-agent${{IFS}}--ranks${{IFS}}0${{IFS}}--vm${{IFS}}{vm}${{IFS}}--report-pci"
    )
}

fn machine(fixtures: &ninja_testkit::Fixtures, channel: &Path) -> QemuConfig {
    QemuConfig::new(fixtures)
        .memory_mib(MEMORY_MIB)
        .guest_run(&guest_command("vm0"))
        .args(qemu_channel_args(channel))
}

/// Quits the QEMU the plan launched (it outlives `plan run`, as it should).
struct QuitOnDrop(PathBuf);

impl Drop for QuitOnDrop {
    fn drop(&mut self) {
        if let Ok(mut q) = RawQmp::connect(&self.0) {
            let _ = q.execute("quit", json!({}));
        }
    }
}

fn dirtier_passes(log: &str) -> usize {
    log.matches("ninja-guest-dirtier: pass=").count()
}

#[test]
fn plan_run_moves_a_vm_from_the_hca_standin_to_ethernet() {
    let Some(fixtures) = qemu_or_skip("plan_run_moves_a_vm_from_the_hca_standin_to_ethernet")
    else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("ninja-cli-plan-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("dst")).unwrap();
    let src_channel = dir.join("src-sv.sock");
    let hca_mem = PathBuf::from(format!(
        "/dev/shm/ninja-cli-plan-{}-hca0",
        std::process::id()
    ));

    let mut src = Qemu::start(machine(&fixtures, &src_channel)).expect("start source");
    src.wait_serial("symvirt-agent", Duration::from_secs(120))
        .expect("agent up in the source guest");
    src.add_hca_standin(&hca_mem).unwrap();

    let dst_qmp = dir.join("dst/qmp.sock");
    let dst_serial = dir.join("dst/serial.log");
    let launch: Vec<String> =
        machine(&fixtures, &dir.join("dst/sv.sock")).machine_args(&dst_serial);
    let mac = "52:54:00:00:20:01";
    let plan = format!(
        r#"[settings]
[settings.deadlines_ms]
quiesce = 60000
migrate = 120000

[[vm]]
name = "vm0"
[vm.source]
qmp = "unix:{src_qmp}"
channel = "unix:{src_channel}"
interconnect = {{ kind = "infiniband", hca = "hca0", port = 1 }}
[[vm.source.devices]]
kind = "hca-standin"
id = "hca0"
mem_path = "{hca_mem}"
size = 1048576
[vm.destination]
qmp = "unix:{dst_qmp}"
channel = "unix:{dst_channel}"
migrate_uri = "tcp:127.0.0.1:{port}"
interconnect = {{ kind = "ethernet", mac = "{mac}" }}
launch = {{ args = {launch:?} }}
[[vm.destination.devices]]
kind = "virtio-net"
id = "net0"
mac = "{mac}"
"#,
        src_qmp = src.qmp_path().display(),
        src_channel = src_channel.display(),
        hca_mem = hca_mem.display(),
        dst_qmp = dst_qmp.display(),
        dst_channel = dir.join("dst/sv.sock").display(),
        port = free_tcp_port(),
    );
    let plan_path = dir.join("plan.toml");
    std::fs::write(&plan_path, plan).unwrap();
    let ninja = env!("CARGO_BIN_EXE_ninja-migrate");

    let check = Command::new(ninja)
        .args(["plan", "check"])
        .arg(&plan_path)
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );

    let quit_dst = QuitOnDrop(dst_qmp.clone());
    let run = Command::new(ninja)
        .args(["plan", "run", "--json", "--log-dir"])
        .arg(dir.join("logs"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg(&plan_path)
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    let events: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    assert!(run.status.success(), "plan run failed: {stdout}");
    let last = events.last().expect("events");
    assert_eq!(last["event"], "plan_finished", "{last}");
    assert_eq!(last["outcome"], "completed", "{last}");
    for phase in ["quiesce", "detach", "migrate", "attach", "resume"] {
        assert!(
            events
                .iter()
                .any(|e| e["event"] == "phase_finished" && e["phase"] == phase && e["ok"] == true),
            "no successful {phase} phase in {stdout}"
        );
    }

    // The guest lives on at the destination and keeps counting.
    let deadline = Instant::now() + Duration::from_secs(60);
    let read = || std::fs::read_to_string(&dst_serial).unwrap_or_default();
    let start = dirtier_passes(&read());
    while dirtier_passes(&read()) < start + 3 {
        assert!(
            Instant::now() < deadline,
            "guest not running at the destination: {}",
            read()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(!read().contains("MISMATCH"), "{}", read());
    // And the source QEMU is gone or stopped: its guest prints nothing more.
    let frozen = src.serial();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(frozen, src.serial(), "source guest still running");
    // The guest's own agent, now at the destination, was told to resume for this plan's epoch
    // and answered.
    let epoch = events[0]["epoch"]
        .as_u64()
        .expect("plan_started carries the epoch");
    assert!(
        read().contains(&format!("symvirt-agent: sent resumed{{epoch={epoch}}}")),
        "the guest at the destination never confirmed resume for epoch {epoch}: {}",
        read()
    );
    // Quit the destination while its monitor socket still exists, then clean up.
    drop(quit_dst);
    let _ = std::fs::remove_file(&hca_mem);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every plan shipped in examples/plans is one `plan check` accepts.
#[test]
fn the_example_plans_check() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/plans");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "toml") {
            continue;
        }
        let out = Command::new(env!("CARGO_BIN_EXE_ninja-migrate"))
            .args(["plan", "check"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}: {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        checked += 1;
    }
    assert!(checked >= 2, "{checked} plans in {}", dir.display());
}

/// `plan evacuate` of a host none of the plan's sources is on: refused, nothing touched.
#[test]
fn evacuating_a_host_without_vms_is_refused() {
    let plan = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/plans/hca-to-ethernet.toml");
    let state = std::env::temp_dir().join(format!("ninja-evacuate-{}", std::process::id()));
    let out = Command::new(env!("CARGO_BIN_EXE_ninja-migrate"))
        .args(["plan", "evacuate", "no-such-host", "--state-dir"])
        .arg(&state)
        .arg(&plan)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&state);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("has its source on no-such-host"), "{err}");
}
