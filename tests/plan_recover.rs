//! A controller that dies: `plan run` killed (SIGKILL) or interrupted (SIGINT) at every phase
//! boundary and in the middle of migrate, for 2 VMs, then `plan recover`. Afterwards exactly one
//! copy of each VM runs, on the side the journal's decision says, with that side's devices,
//! its guest released (the next plan quiesces it again) and its dirtier still finding every
//! page it wrote; nothing is left unfinished in the state directory.
//!
//! The VMs go back and forth between side A (stand-in HCA `hca0`) and side B (virtio-net
//! `net0`); each side's QEMU is started by the plan that moves a VM there.

use ninja_testkit::{QemuConfig, RawQmp, free_tcp_port, qemu_or_skip};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};
use symvirt::host_channel::qemu_channel_args;

const VMS: usize = 2;
const MEMORY_MIB: u32 = 96;
const PATIENCE: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Side {
    A,
    B,
}

impl Side {
    fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
    fn name(self) -> &'static str {
        match self {
            Side::A => "a",
            Side::B => "b",
        }
    }
}

/// Where a kill lands: after the event this matches.
struct KillPoint {
    label: &'static str,
    matches: fn(&Value) -> bool,
    /// Whether the run had decided to keep the destinations by then.
    decided: Decided,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Decided {
    /// Not yet: the VMs end up back where they were.
    Before,
    /// The decision follows the event at once: the signal may land on either side of it.
    Racing,
    /// Yes: the VMs end up at the destination.
    After,
}

fn finished(e: &Value, phase: &str) -> bool {
    e["event"] == "phase_finished" && e["phase"] == phase
}

const KILL_POINTS: [KillPoint; 9] = [
    KillPoint {
        label: "after connect",
        matches: |e| finished(e, "connect"),
        decided: Decided::Before,
    },
    KillPoint {
        label: "after reserve",
        matches: |e| finished(e, "reserve"),
        decided: Decided::Before,
    },
    KillPoint {
        label: "after quiesce",
        matches: |e| finished(e, "quiesce"),
        decided: Decided::Before,
    },
    KillPoint {
        label: "after detach",
        matches: |e| finished(e, "detach"),
        decided: Decided::Before,
    },
    KillPoint {
        label: "in migrate",
        matches: |e| {
            e["event"] == "vm_progress"
                && e["phase"] == "migrate"
                && e["detail"].as_str().is_some_and(|d| d.contains("MiB sent"))
        },
        decided: Decided::Before,
    },
    KillPoint {
        label: "after migrate",
        matches: |e| finished(e, "migrate"),
        decided: Decided::Before,
    },
    KillPoint {
        label: "after attach",
        matches: |e| finished(e, "attach"),
        decided: Decided::Before,
    },
    KillPoint {
        label: "after resume",
        matches: |e| finished(e, "resume"),
        decided: Decided::Racing,
    },
    KillPoint {
        label: "at commit",
        matches: |e| e["event"] == "phase_started" && e["phase"] == "commit",
        decided: Decided::After,
    },
];

struct Rig {
    dir: PathBuf,
    fixtures: ninja_testkit::Fixtures,
    /// Where the VMs run now.
    at: Side,
    /// The first QEMUs, started by the test (later ones by the plans).
    first: Vec<Child>,
}

impl Rig {
    fn side_dir(&self, side: Side, vm: usize) -> PathBuf {
        self.dir.join(format!("{}{vm}", side.name()))
    }
    fn qmp(&self, side: Side, vm: usize) -> PathBuf {
        self.side_dir(side, vm).join("qmp.sock")
    }
    fn serial(&self, side: Side, vm: usize) -> PathBuf {
        self.side_dir(side, vm).join("serial.log")
    }
    fn hca_mem(&self, vm: usize) -> PathBuf {
        PathBuf::from(format!(
            "/dev/shm/ninja-recover-{}-{vm}",
            self.dir.file_name().unwrap().to_string_lossy()
        ))
    }
    fn mac(vm: usize) -> String {
        format!("52:54:00:00:31:{vm:02x}")
    }
    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    /// The machine of VM `vm` on `side` (no `-qmp`: the launcher adds it).
    fn machine(&self, side: Side, vm: usize) -> Vec<String> {
        let run = format!(
            "/bin/sh -c /bin/ninja-guest-dirtier${{IFS}}4&/bin/symvirt-agent${{IFS}}--ranks${{IFS}}0${{IFS}}--vm${{IFS}}vm{vm}${{IFS}}--report-pci"
        );
        QemuConfig::new(&self.fixtures)
            .memory_mib(MEMORY_MIB)
            .guest_run(&run)
            .args(qemu_channel_args(&self.side_dir(side, vm).join("sv.sock")))
            .machine_args(&self.serial(side, vm))
    }

    /// Boots the VMs on side A, their stand-in HCA given on the command line (`cold`) or
    /// hot-plugged after boot.
    fn boot(test: &str, tag: &str, cold: bool) -> Option<Rig> {
        let fixtures = qemu_or_skip(test)?;
        let dir = std::env::temp_dir().join(format!("ninja-recover-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut rig = Rig {
            dir,
            fixtures,
            at: Side::A,
            first: Vec::new(),
        };
        for vm in 0..VMS {
            for side in [Side::A, Side::B] {
                std::fs::create_dir_all(rig.side_dir(side, vm)).unwrap();
            }
            let _ = std::fs::remove_file(rig.hca_mem(vm));
            let mut args = rig.machine(Side::A, vm);
            if cold {
                args.extend([
                    "-object".into(),
                    format!(
                        "memory-backend-file,id=hca0-mem,size=1048576,mem-path={},share=on",
                        rig.hca_mem(vm).display()
                    ),
                    "-device".into(),
                    "ivshmem-plain,id=hca0,memdev=hca0-mem".into(),
                ]);
            }
            args.extend([
                "-qmp".into(),
                format!("unix:{},server=on,wait=off", rig.qmp(Side::A, vm).display()),
            ]);
            let child = Command::new(ninja_testkit::QEMU_BINARY)
                .args(&args)
                .process_group(0)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(rig.side_dir(Side::A, vm).join("boot.log")).unwrap())
                .spawn()
                .unwrap();
            rig.first.push(child);
        }
        for vm in 0..VMS {
            wait_for(&rig.serial(Side::A, vm), "ninja-guest-dirtier: pass=");
            wait_for(&rig.serial(Side::A, vm), "symvirt-agent: ");
            if !cold {
                let mut q = RawQmp::connect(&rig.qmp(Side::A, vm)).unwrap();
                q.execute(
                    "object-add",
                    json!({"qom-type": "memory-backend-file", "id": "hca0-mem",
                        "size": 1 << 20, "mem-path": rig.hca_mem(vm), "share": true}),
                )
                .unwrap();
                q.execute(
                    "device_add",
                    json!({"driver": "ivshmem-plain", "id": "hca0", "memdev": "hca0-mem"}),
                )
                .unwrap();
            }
        }
        Some(rig)
    }

    /// The plan moving every VM from `from` to the other side.
    fn plan(&self, from: Side) -> PathBuf {
        let mut text = String::from(
            "[settings]\nmax_bandwidth = 16777216\n[settings.deadlines_ms]\nquiesce = 30000\n\
             migrate = 120000\nresume = 30000\nrollback = 60000\n",
        );
        let to = from.other();
        for vm in 0..VMS {
            let hca = format!(
                "kind = \"hca-standin\"\nid = \"hca0\"\nmem_path = \"{}\"\nsize = 1048576\n",
                self.hca_mem(vm).display()
            );
            let nic = format!(
                "kind = \"virtio-net\"\nid = \"net0\"\nmac = \"{}\"\n",
                Self::mac(vm)
            );
            let interconnect = |side: Side| match side {
                Side::A => "{ kind = \"infiniband\", hca = \"hca0\", port = 1 }".to_owned(),
                Side::B => format!("{{ kind = \"ethernet\", mac = \"{}\" }}", Self::mac(vm)),
            };
            let device = |side: Side| match side {
                Side::A => hca.clone(),
                Side::B => nic.clone(),
            };
            text.push_str(&format!(
                "\n[[vm]]\nname = \"vm{vm}\"\n[vm.source]\nqmp = \"unix:{sq}\"\n\
                 channel = \"unix:{sc}\"\ninterconnect = {si}\n[[vm.source.devices]]\n{sd}\
                 [vm.destination]\nqmp = \"unix:{dq}\"\nchannel = \"unix:{dc}\"\n\
                 migrate_uri = \"tcp:127.0.0.1:{port}\"\ninterconnect = {di}\n\
                 launch = {{ args = {args:?} }}\n[[vm.destination.devices]]\n{dd}",
                sq = self.qmp(from, vm).display(),
                sc = self.side_dir(from, vm).join("sv.sock").display(),
                si = interconnect(from),
                sd = device(from),
                dq = self.qmp(to, vm).display(),
                dc = self.side_dir(to, vm).join("sv.sock").display(),
                port = free_tcp_port(),
                di = interconnect(to),
                args = self.machine(to, vm),
                dd = device(to),
            ));
        }
        let path = self.dir.join(format!("plan-{}.toml", from.name()));
        std::fs::write(&path, text).unwrap();
        path
    }

    fn ninja(&self) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_ninja-migrate"));
        c.env("NINJA_STATE_DIR", self.state());
        c
    }

    /// Starts `plan run` of the move away from where the VMs are.
    fn start_run(&self) -> Child {
        self.ninja()
            .args(["plan", "run", "--json"])
            .arg(self.plan(self.at))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    }

    /// Runs the move and sends `signal` once the event of `point` went by; the run's output.
    fn run_until(&self, point: &KillPoint, signal: i32) -> (Output, bool) {
        let mut child = self.start_run();
        let stdout = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut signalled = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let event: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            seen.push(line);
            if !signalled && (point.matches)(&event) {
                // SAFETY: kill(2) on our own child's pid; no memory is involved.
                unsafe { libc::kill(child.id() as i32, signal) };
                signalled = true;
            }
        }
        let mut out = child.wait_with_output().unwrap();
        out.stdout = seen.join("\n").into_bytes();
        (out, signalled)
    }

    fn recover(&self) -> Output {
        self.ninja()
            .args(["plan", "recover", "--json"])
            .output()
            .unwrap()
    }

    /// Exactly one copy of each VM runs, on `side`, with that side's device; its guest's
    /// dirtier goes on without a mismatch; no run is left unfinished.
    fn check_settled(&mut self, side: Side, what: &str) {
        for vm in 0..VMS {
            let here = RawQmp::connect(&self.qmp(side, vm));
            let there = RawQmp::connect(&self.qmp(side.other(), vm));
            assert!(
                there.is_err(),
                "{what}: vm{vm} also answers on side {side:?}'s other side"
            );
            let mut q = here.unwrap_or_else(|e| panic!("{what}: vm{vm} not on side {side:?}: {e}"));
            let status = q.execute("query-status", json!({})).unwrap();
            assert_eq!(status["status"], "running", "{what}: vm{vm}: {status}");
            let devices = q
                .execute("qom-list", json!({"path": "/machine/peripheral"}))
                .unwrap();
            let want = if side == Side::A { "hca0" } else { "net0" };
            assert!(
                devices
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|d| d["name"] == want),
                "{what}: vm{vm} on side {side:?} lacks {want}: {devices}"
            );
            let serial = self.serial(side, vm);
            let before = passes(&serial);
            let until = Instant::now() + Duration::from_secs(30);
            while passes(&serial) <= before + 1 {
                assert!(Instant::now() < until, "{what}: vm{vm}'s dirtier stopped");
                std::thread::sleep(Duration::from_millis(100));
            }
            let log = std::fs::read_to_string(&serial).unwrap_or_default();
            assert!(!log.contains("MISMATCH"), "{what}: vm{vm}: {log}");
        }
        let qemus = Command::new("pgrep")
            .args([
                "-f",
                &format!("qemu-system-x86_64 .*{}", self.dir.display()),
            ])
            .output()
            .unwrap();
        let count = String::from_utf8_lossy(&qemus.stdout).lines().count();
        assert_eq!(count, VMS, "{what}: QEMU processes of this test");
        for entry in std::fs::read_dir(self.state().join("runs"))
            .into_iter()
            .flatten()
        {
            let path = entry.unwrap().path();
            assert!(
                path.extension().is_none_or(|e| e != "fwd"),
                "{what}: a run's forward directory was left: {}",
                path.display()
            );
            if path.extension().is_some_and(|e| e == "json") {
                let record: Value =
                    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
                assert!(!record["finished"].is_null(), "{what}: unfinished {record}");
            }
        }
        self.at = side;
    }

    /// Plans that would harm what is not theirs are refused and nothing is touched: a
    /// destination monitor path where another VM's monitor listens, a stand-in whose
    /// `mem_path` is not the file its memory uses.
    fn refuses_what_is_not_its_own(&mut self) {
        let plan = std::fs::read_to_string(self.plan(self.at)).unwrap();
        let unrelated = format!("/dev/shm/ninja-unrelated-{}", std::process::id());
        std::fs::write(&unrelated, "keep").unwrap();
        // vm1's live monitor by another spelling of its path: `plan check` sees it is vm1's.
        let alias = self
            .side_dir(self.at, 1)
            .join(".//qmp.sock")
            .display()
            .to_string();
        // By a hard link, which no check of the plan can see: the launcher must not take
        // over (or remove) what listens there.
        let bystander = self.dir.join("bystander.sock");
        let _ = std::fs::remove_file(&bystander);
        std::fs::hard_link(self.qmp(self.at, 1), &bystander).unwrap();
        let destination_qmp = self.qmp(self.at.other(), 0).display().to_string();
        let cases = [
            (
                plan.replacen(&destination_qmp, &alias, 1),
                1,
                "is the same socket as vm[0].destination.qmp",
            ),
            (
                plan.replacen(&destination_qmp, &bystander.display().to_string(), 1),
                3,
                "something is listening",
            ),
            (
                plan.replacen(&self.hca_mem(0).display().to_string(), &unrelated, 1),
                3,
                "but the source's hca0-mem uses",
            ),
        ];
        for (text, code, said) in cases {
            let path = self.dir.join("plan-harm.toml");
            std::fs::write(&path, text).unwrap();
            let run = self
                .ninja()
                .args(["plan", "run", "--json"])
                .arg(&path)
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&run.stderr);
            assert_eq!(run.status.code(), Some(code), "{said}: {stderr}");
            assert!(stderr.contains(said), "{said}: {stderr}");
            self.check_settled(self.at, said);
        }
        assert!(
            std::fs::symlink_metadata(&bystander).is_ok_and(|m| m.file_type().is_socket()),
            "the bystander's socket was removed"
        );
        let _ = std::fs::remove_file(&bystander);
        assert_eq!(std::fs::read_to_string(&unrelated).unwrap(), "keep");
        let _ = std::fs::remove_file(&unrelated);
    }

    /// Kills (or interrupts) a move at every point, recovering after each.
    fn every_point(&mut self, signal: i32, name: &str) {
        for point in &KILL_POINTS {
            if std::env::var("ONLY").is_ok_and(|o| !point.label.contains(&o)) {
                continue;
            }
            let what = format!("{name} {}", point.label);
            let from = self.at;
            let (run, signalled) = self.run_until(point, signal);
            let stdout = String::from_utf8_lossy(&run.stdout).into_owned();
            let stderr = String::from_utf8_lossy(&run.stderr).into_owned();
            assert!(
                signalled,
                "{what}: the point never came:\n{stdout}\n{stderr}"
            );
            if signal == libc::SIGINT {
                // An orderly end: rolled back before the decision, completed after it.
                let code = run.status.code();
                match point.decided {
                    Decided::Before => assert_eq!(code, Some(3), "{what}:\n{stdout}\n{stderr}"),
                    Decided::After => assert_eq!(code, Some(0), "{what}:\n{stdout}\n{stderr}"),
                    Decided::Racing => {
                        assert!(matches!(code, Some(0 | 3)), "{what}:\n{stdout}\n{stderr}")
                    }
                }
                if code == Some(3) {
                    assert!(
                        stderr.contains("interrupted by the operator"),
                        "{what}: {stderr}"
                    );
                }
            } else if point.decided == Decided::Before {
                assert_eq!(run.status.code(), None, "{what}: not killed:\n{stdout}");
                // A new run over the interrupted one is refused and names the way out.
                let again = self
                    .ninja()
                    .args(["plan", "run", "--json"])
                    .arg(self.plan(from))
                    .output()
                    .unwrap();
                let said = String::from_utf8_lossy(&again.stderr);
                assert_eq!(again.status.code(), Some(2), "{what}: {said}");
                assert!(
                    said.contains("ninja-migrate plan recover"),
                    "{what}: {said}"
                );
            }
            let recovered = self.recover();
            let out = String::from_utf8_lossy(&recovered.stdout).into_owned();
            let err = String::from_utf8_lossy(&recovered.stderr).into_owned();
            assert!(recovered.status.success(), "{what}: recover:\n{out}\n{err}");
            let rolled_back = out.contains("rolling back");
            let nothing = out.contains("nothing to recover");
            if signal == libc::SIGKILL && point.decided == Decided::Before {
                assert!(
                    out.contains("\"event\":\"recovery_started\"") && rolled_back,
                    "{what}: recover:\n{out}"
                );
            }
            if signal == libc::SIGINT {
                assert!(nothing, "{what}: the interrupted run left work: {out}");
            }
            // Where the VMs must be: decided by the journal's decision, as it went.
            let forward = match point.decided {
                Decided::Before => false,
                Decided::After => true,
                Decided::Racing if signal == libc::SIGINT => run.status.code() == Some(0),
                Decided::Racing => !rolled_back,
            };
            if point.decided == Decided::After {
                assert!(
                    !rolled_back,
                    "{what}: rolled back after the decision: {out}"
                );
            }
            let side = if forward { from.other() } else { from };
            self.check_settled(side, &what);
        }
        // The guests were released every time: a whole move still goes through.
        let (run, _) = self.run_until(
            &KillPoint {
                label: "never",
                matches: |_| false,
                decided: Decided::After,
            },
            0,
        );
        assert!(
            run.status.success(),
            "{name}: a full move after the recoveries: {}",
            String::from_utf8_lossy(&run.stderr)
        );
        let to = self.at.other();
        self.check_settled(to, &format!("{name}: full move"));
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for c in &mut self.first {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("pkill")
            .args(["-KILL", "-f"])
            .arg(format!("qemu-system-x86_64 .*{}", self.dir.display()))
            .status();
        for vm in 0..VMS {
            let _ = std::fs::remove_file(self.hca_mem(vm));
        }
        if std::env::var_os("NINJA_KEEP_TEMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn passes(serial: &Path) -> usize {
    std::fs::read_to_string(serial)
        .unwrap_or_default()
        .matches("ninja-guest-dirtier: pass=")
        .count()
}

fn wait_for(serial: &Path, text: &str) {
    let until = Instant::now() + PATIENCE;
    while !std::fs::read_to_string(serial)
        .unwrap_or_default()
        .contains(text)
    {
        assert!(
            Instant::now() < until,
            "{} never said {text:?}",
            serial.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

use std::os::unix::process::CommandExt;

#[test]
fn a_stand_in_given_on_the_command_line_is_refused_before_anything_is_touched() {
    let test = "a_stand_in_given_on_the_command_line_is_refused";
    let Some(mut rig) = Rig::boot(test, "cold", true) else {
        return;
    };
    let (run, _) = rig.run_until(
        &KillPoint {
            label: "never",
            matches: |_| false,
            decided: Decided::After,
        },
        0,
    );
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("reserve") && stderr.contains("QEMU's first RAM block"),
        "{stderr}"
    );
    rig.check_settled(Side::A, "refused cold-plugged stand-in");
}

#[test]
fn sigkill_at_every_phase_then_recover_leaves_one_copy_of_each_vm() {
    let Some(mut rig) = Rig::boot("sigkill_at_every_phase_then_recover", "kill", false) else {
        return;
    };
    rig.every_point(libc::SIGKILL, "SIGKILL");
}

#[test]
fn sigint_at_every_phase_rolls_back_in_order() {
    let Some(mut rig) = Rig::boot("sigint_at_every_phase_rolls_back_in_order", "int", false) else {
        return;
    };
    rig.refuses_what_is_not_its_own();
    rig.every_point(libc::SIGINT, "SIGINT");
}

/// Where a checkpoint is killed. A checkpoint that lets the job go on never decides to leave
/// the sources: a recovery always continues them.
const CHECKPOINT_KILL_POINTS: [KillPoint; 6] = [
    KillPoint {
        label: "after connect",
        matches: |e| finished(e, "connect"),
        decided: Decided::Before,
    },
    KillPoint {
        label: "after quiesce",
        matches: |e| finished(e, "quiesce"),
        decided: Decided::Before,
    },
    KillPoint {
        label: "after detach",
        matches: |e| finished(e, "detach"),
        decided: Decided::Before,
    },
    KillPoint {
        label: "in save",
        matches: |e| e["event"] == "phase_started" && e["phase"] == "save",
        decided: Decided::Before,
    },
    KillPoint {
        label: "after save",
        matches: |e| finished(e, "save"),
        decided: Decided::Before,
    },
    KillPoint {
        label: "in resume",
        matches: |e| e["event"] == "phase_started" && e["phase"] == "resume",
        decided: Decided::Before,
    },
];

impl Rig {
    /// `plan checkpoint` of the VMs where they are into `to` (`--stop` if `stop`), killed
    /// (SIGKILL) once an event `kill_at` matches went by; whether it was.
    fn checkpoint_killed(&self, to: &Path, stop: bool, kill_at: fn(&Value) -> bool) -> bool {
        let mut cmd = self.ninja();
        cmd.args(["plan", "checkpoint", "--json", "--to"]).arg(to);
        if stop {
            cmd.arg("--stop");
        }
        let mut child = cmd
            .arg(self.plan(self.at))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut killed = false;
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let event: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            if !killed && kill_at(&event) {
                // SAFETY: kill(2) on our own child's pid; no memory is involved.
                unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
                killed = true;
            }
        }
        let _ = child.wait();
        killed
    }

    /// No VM of the rig has mapped-ram on: a live migration over a socket would refuse it.
    fn no_file_capabilities(&self, side: Side, what: &str) {
        for vm in 0..VMS {
            let mut q = RawQmp::connect(&self.qmp(side, vm)).unwrap();
            let caps = q.execute("query-migrate-capabilities", json!({})).unwrap();
            let on = caps
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["capability"] == "mapped-ram" && c["state"] == true);
            assert!(!on, "{what}: vm{vm} keeps mapped-ram on: {caps}");
        }
    }
}

/// A controller that dies in the middle of a checkpoint: `plan checkpoint` killed at every
/// phase, then `plan recover` continues every source with its device and releases its guest
/// (a whole move goes through afterwards); a checkpoint directory left behind is complete or
/// absent. Then `plan checkpoint --stop` killed once the checkpoint is complete: the recovery
/// finishes it, stopping the sources, and the checkpoint reads back complete.
#[test]
fn a_checkpoint_killed_at_every_phase_is_recovered() {
    let test = "a_checkpoint_killed_at_every_phase_is_recovered";
    let Some(mut rig) = Rig::boot(test, "ckpt", false) else {
        return;
    };
    for (i, point) in CHECKPOINT_KILL_POINTS.iter().enumerate() {
        let what = format!("checkpoint killed {}", point.label);
        let to = rig.dir.join(format!("ckpt-{i}"));
        if point.label == "in save" {
            // What a save killed once it turned the file capabilities on leaves (the kill
            // below may land before or after that moment): the recovery turns them off.
            let mut q = RawQmp::connect(&rig.qmp(Side::A, 0)).unwrap();
            q.execute(
                "migrate-set-capabilities",
                json!({"capabilities": [{"capability": "mapped-ram", "state": true},
                    {"capability": "multifd", "state": true}]}),
            )
            .unwrap();
        }
        assert!(
            rig.checkpoint_killed(&to, false, point.matches),
            "{what}: never came"
        );
        let recovered = rig.recover();
        let out = String::from_utf8_lossy(&recovered.stdout).into_owned();
        assert!(
            recovered.status.success(),
            "{what}: recover: {out}\n{}",
            String::from_utf8_lossy(&recovered.stderr)
        );
        assert!(
            out.contains("continuing them with their devices"),
            "{what}: recover: {out}"
        );
        if to.exists() {
            symvirt::checkpoint::read(&to).unwrap_or_else(|e| panic!("{what}: {e}"));
        }
        rig.check_settled(Side::A, &what);
        rig.no_file_capabilities(Side::A, &what);
    }
    let (run, _) = rig.run_until(
        &KillPoint {
            label: "never",
            matches: |_| false,
            decided: Decided::After,
        },
        0,
    );
    assert!(
        run.status.success(),
        "a move after the recoveries: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    rig.check_settled(Side::B, "a move after the recoveries");

    // --stop, killed at its commit: the checkpoint is complete, the recovery stops the VMs.
    let to = rig.dir.join("ckpt-stop");
    let at_commit = |e: &Value| e["event"] == "phase_started" && e["phase"] == "commit";
    assert!(rig.checkpoint_killed(&to, true, at_commit));
    let recovered = rig.recover();
    let out = String::from_utf8_lossy(&recovered.stdout).into_owned();
    assert!(recovered.status.success(), "--stop: recover: {out}");
    assert!(out.contains("stopping them"), "--stop: recover: {out}");
    let manifest = symvirt::checkpoint::read(&to).unwrap();
    assert_eq!(manifest.vms.len(), VMS);
    for vm in 0..VMS {
        for side in [Side::A, Side::B] {
            assert!(
                RawQmp::connect(&rig.qmp(side, vm)).is_err(),
                "--stop: vm{vm} still answers on side {side:?}"
            );
        }
    }
}
