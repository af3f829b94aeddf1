//! A real virtual cluster, end to end: MPI ranks inside two Linux guests, moved from one fabric
//! to another and back while the job runs, by `ninja-migrate plan run` from plan files.
//!
//! The guests boot the shared read-only cluster root (`scripts/build-cluster-image`: Open MPI,
//! MPICH, sshd, the agent) plus a job disk holding the transparent layer and the stress program
//! built for the MPI under test. They sit on three Linux bridges in a network namespace of the
//! test's own ([`ninja_testkit::cluster`]): management, fabric A (the source cluster's HCA
//! network, whose NICs are hot-added as the passthrough STAND-IN, next to the `ivshmem` device
//! that makes them unmigratable as a VFIO device is) and fabric B (the destination's Ethernet).
//! `mpirun` in vm0 starts 4 ranks (2 per guest) over ssh; they talk TCP between the guests'
//! data addresses, which the agents route through whichever fabric NIC the guest has.
//!
//! Judged by the job and by the wire: the taps' byte counters show the job's traffic on A, then
//! on B (and nothing more on A), then on A again; the ranks keep their PIDs; every cut is
//! consistent pair by pair; the program's own checks pass at the end.

#[path = "../symvirt-mpi/tests/common/mod.rs"]
#[allow(unused_imports)]
mod mpi_common;

use mpi_common::cut::{check_pairs, read_cut};
use ninja_testkit::cluster::{
    ClusterFixtures, Fabrics, Net, cluster_or_skip, data_address, guest_machine, management_ip,
    pack_disk,
};
use ninja_testkit::{Qemu, RawQmp};
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use symvirt_mpi::mpi_build::{Linkage, MpiImpl};

const VMS: usize = 2;
const RANKS_PER_VM: usize = 2;
/// Upper bound for any one wait.
const PATIENCE: Duration = Duration::from_secs(120);

/// Two guests, their migrations and an MPI job: one test at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Which fabric a VM is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fabric {
    A,
    B,
}

impl Fabric {
    fn mac(self, vm: usize) -> String {
        match self {
            Fabric::A => format!("52:54:00:aa:00:{:02x}", vm + 1),
            Fabric::B => format!("52:54:00:bb:00:{:02x}", vm + 1),
        }
    }

    fn tap(self, vm: usize) -> String {
        match self {
            Fabric::A => format!("a{vm}"),
            Fabric::B => format!("b{vm}"),
        }
    }

    fn other(self) -> Fabric {
        match self {
            Fabric::A => Fabric::B,
            Fabric::B => Fabric::A,
        }
    }
}

/// Where one VM runs now: its QMP monitor and SymVirt channel, and its fabric.
struct Placement {
    qmp: PathBuf,
    channel: PathBuf,
    fabric: Fabric,
    /// The fabric-A stand-in's shared memory file while the VM is on A.
    hca_mem: Option<PathBuf>,
}

struct VirtualCluster {
    test: String,
    /// Short: it names the test directory, which unix socket paths (108 bytes) start with.
    tag: String,
    mpi: MpiImpl,
    fixtures: ClusterFixtures,
    fabrics: Fabrics,
    dir: PathBuf,
    job_disk: PathBuf,
    /// Per VM, the data address its agent re-plumbs on resume (`--data-address`); `None`: the
    /// agent's network step is off.
    agent_data: Vec<Option<String>>,
    sources: Vec<Qemu>,
    at: Vec<Placement>,
    moves: usize,
}

impl Drop for VirtualCluster {
    fn drop(&mut self) {
        // Destinations the plans launched are not this process's children: find them by the
        // test directory on their command lines.
        let _ = Command::new("pkill")
            .args(["-KILL", "-f"])
            .arg(format!("qemu-system-x86_64 .*{}", self.dir.display()))
            .status();
        for p in &self.at {
            if let Some(m) = &p.hca_mem {
                let _ = fs::remove_file(m);
            }
        }
        if std::env::var_os("NINJA_KEEP_TEMP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn toml_list(words: &[String]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

impl VirtualCluster {
    /// Boots the guests on fabric A, their agents expecting 2 ranks each and re-plumbing the
    /// data address `agent_data[vm]` on resume (none: no network step); `None` when the test
    /// skips.
    fn boot(
        test: &str,
        tag: &str,
        mpi: MpiImpl,
        agent_data: Vec<Option<String>>,
    ) -> Option<VirtualCluster> {
        let fixtures = cluster_or_skip(test)?;
        let dir = std::env::temp_dir().join(format!("ninja-vc-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();

        // The job's disk: the transparent layer and the stress program for this MPI.
        let libs = mpi_common::libraries(mpi);
        let job = dir.join("job");
        fs::create_dir_all(&job).unwrap();
        fs::copy(&libs.transparent, job.join("libsymvirt_pmpi.so")).unwrap();
        let stress = mpi_common::program(mpi, "stress.c", Linkage::Plain);
        fs::copy(stress, job.join("stress")).unwrap();
        let job_disk = dir.join("job.ext4");
        pack_disk(&job, &job_disk).unwrap();

        let fabrics = Fabrics::create().unwrap();
        for vm in 0..VMS {
            fabrics
                .add_tap(&format!("m{vm}s"), Net::Management)
                .unwrap();
            for mv in 0..2 {
                fabrics
                    .add_tap(&format!("m{vm}d{mv}"), Net::Management)
                    .unwrap();
            }
            fabrics.add_tap(&Fabric::A.tap(vm), Net::FabricA).unwrap();
            fabrics.add_tap(&Fabric::B.tap(vm), Net::FabricB).unwrap();
        }
        let mut cluster = VirtualCluster {
            test: test.into(),
            tag: tag.into(),
            mpi,
            fixtures,
            fabrics,
            dir,
            job_disk,
            agent_data,
            sources: Vec::new(),
            at: Vec::new(),
            moves: 0,
        };
        for vm in 0..VMS {
            let channel = cluster.dir.join(format!("vm{vm}-s.sock"));
            let machine = cluster.machine(vm, &format!("m{vm}s"), &channel);
            let q = Qemu::start(machine).unwrap();
            cluster.at.push(Placement {
                qmp: q.qmp_path().to_path_buf(),
                channel,
                fabric: Fabric::A,
                hca_mem: None,
            });
            cluster.sources.push(q);
        }
        for vm in 0..VMS {
            cluster.sources[vm]
                .wait_serial("cluster-init: ready", PATIENCE)
                .unwrap_or_else(|e| panic!("vm{vm}: {e}"));
            cluster.wait_ssh(vm);
            cluster.give_fabric_a(vm);
        }
        Some(cluster)
    }

    fn machine(&self, vm: usize, mgmt_tap: &str, channel: &Path) -> ninja_testkit::QemuConfig {
        let mut agent = format!("--ranks {RANKS_PER_VM} --report-pci");
        if let Some(data) = &self.agent_data[vm] {
            agent.push_str(&format!(" --data-address {data}"));
        }
        guest_machine(
            &self.fixtures,
            &self.fabrics,
            vm,
            Some(&self.job_disk),
            mgmt_tap,
            channel,
            &agent,
        )
        .arg("-name")
        .arg(format!("vm{vm},debug-threads=on"))
    }

    fn ssh(&self, vm: usize, script: &str) -> std::process::Output {
        self.fabrics
            .ssh(&self.fixtures.key, &management_ip(vm), script)
            .unwrap()
    }

    /// Runs `script` on `vm`; its stdout, or a panic with what went wrong.
    fn run(&self, vm: usize, script: &str) -> String {
        let out = self.ssh(vm, script);
        assert!(
            out.status.success(),
            "{}: vm{vm}: {script}: {}\n{}",
            self.test,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_ssh(&self, vm: usize) {
        let t = Instant::now();
        loop {
            if self.ssh(vm, "true").status.success() {
                return;
            }
            assert!(t.elapsed() < PATIENCE, "vm{vm}: no ssh login");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Hot-adds vm's fabric-A NIC as a scheduler assigns an HCA: the NIC on tap a<vm> next to
    /// the ivshmem STAND-IN that makes it unmigratable, then routes the data subnet through it.
    fn give_fabric_a(&mut self, vm: usize) {
        let mem = PathBuf::from(format!(
            "/dev/shm/ninja-vc-{}-{}-vm{vm}-hca0",
            std::process::id(),
            self.tag
        ));
        self.sources[vm].add_hca_standin(&mem).unwrap();
        let mut qmp = RawQmp::connect(self.sources[vm].qmp_path()).unwrap();
        qmp.execute(
            "netdev_add",
            serde_json::json!({"type": "tap", "id": "fa0n", "ifname": Fabric::A.tap(vm),
                "script": "no", "downscript": "no"}),
        )
        .unwrap();
        qmp.execute(
            "device_add",
            serde_json::json!({"driver": "virtio-net-pci", "id": "fa0", "netdev": "fa0n",
                "mac": Fabric::A.mac(vm)}),
        )
        .unwrap();
        drop(qmp);
        self.at[vm].hca_mem = Some(mem);
        self.run(
            vm,
            &format!(
                "symvirt-agent route-data --data-address {} --mac {}",
                data_address(vm),
                Fabric::A.mac(vm)
            ),
        );
    }

    /// The command that starts the job in vm0 (4 ranks, 2 per guest, TCP between the data
    /// addresses, the transparent layer preloaded into the ranks, cut records in /tmp/cuts).
    fn launcher(&self, modes: &str) -> String {
        let hosts = format!("{}:2,{}:2", management_ip(0), management_ip(1));
        let program = format!("/job/stress {modes} /tmp/job 10");
        match self.mpi {
            MpiImpl::OpenMpi => format!(
                "mpirun.openmpi --allow-run-as-root --oversubscribe --bind-to none -np 4 \
                 -host {hosts} --mca pml ob1 --mca btl self,vader,tcp \
                 --mca btl_vader_single_copy_mechanism none --mca btl_tcp_if_include data0 \
                 --mca oob_tcp_if_include eth0 -x LD_PRELOAD=/job/libsymvirt_pmpi.so \
                 -x SYMVIRT_CUT_LOG=/tmp/cuts {program}"
            ),
            MpiImpl::Mpich => format!(
                "mpiexec.mpich -launcher ssh -hosts {hosts} -n 4 -genv UCX_TLS tcp,self \
                 -genv UCX_NET_DEVICES data0 -genv LD_PRELOAD /job/libsymvirt_pmpi.so \
                 -genv SYMVIRT_CUT_LOG /tmp/cuts {program}"
            ),
        }
    }

    /// Starts the job in the background of vm0; its output goes to /tmp/job/out there.
    fn start_job(&self, modes: &str) {
        for vm in 0..VMS {
            self.run(vm, "mkdir -p /tmp/job /tmp/cuts");
        }
        let script = format!(
            "setsid sh -c '{} >/tmp/job/out 2>&1; echo $? >/tmp/job/status' \
             </dev/null >/dev/null 2>&1 &",
            self.launcher(modes)
        );
        self.run(0, &script);
    }

    /// The PIDs of the ranks in every guest.
    fn rank_pids(&self) -> Vec<BTreeSet<u32>> {
        (0..VMS)
            .map(|vm| {
                let t = Instant::now();
                loop {
                    let out = self.ssh(vm, "pidof stress");
                    let pids: BTreeSet<u32> = String::from_utf8_lossy(&out.stdout)
                        .split_whitespace()
                        .filter_map(|p| p.parse().ok())
                        .collect();
                    if pids.len() == RANKS_PER_VM {
                        return pids;
                    }
                    assert!(t.elapsed() < PATIENCE, "vm{vm}: ranks {pids:?}");
                    std::thread::sleep(Duration::from_millis(300));
                }
            })
            .collect()
    }

    /// Bytes on the taps of `fabric`, all VMs.
    fn fabric_bytes(&self, fabric: Fabric) -> u64 {
        (0..VMS)
            .map(|vm| self.fabrics.tap_bytes(&fabric.tap(vm)).unwrap())
            .sum()
    }

    /// Waits until `fabric` carries at least `bytes` more than it does now: the job talks there.
    fn wait_traffic(&self, fabric: Fabric, bytes: u64) -> Result<(), String> {
        self.wait_traffic_for(fabric, bytes, Duration::from_secs(60))
    }

    fn wait_traffic_for(&self, fabric: Fabric, bytes: u64, limit: Duration) -> Result<(), String> {
        let start = self.fabric_bytes(fabric);
        let t = Instant::now();
        while self.fabric_bytes(fabric) < start + bytes {
            if t.elapsed() > limit {
                return Err(format!(
                    "fabric {fabric:?} carried {} bytes in {limit:?}; job: {}",
                    self.fabric_bytes(fabric) - start,
                    self.job_output()
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    fn job_output(&self) -> String {
        String::from_utf8_lossy(&self.ssh(0, "cat /tmp/job/out /tmp/job/status").stdout)
            .into_owned()
    }

    fn fabric_devices(&self, vm: usize, fabric: Fabric, hca_mem: Option<&Path>) -> String {
        let mut s = String::new();
        if let Some(mem) = hca_mem {
            s.push_str(&format!(
                "[[DEVICES]]\nkind = \"hca-standin\"\nid = \"hca0\"\nmem_path = \"{}\"\nsize = 1048576\n",
                mem.display()
            ));
        }
        let (id, netdev) = match fabric {
            Fabric::A => ("fa0", "fa0n"),
            Fabric::B => ("fb0", "fb0n"),
        };
        s.push_str(&format!(
            "[[DEVICES]]\nkind = \"virtio-net\"\nid = \"{id}\"\nmac = \"{}\"\n\
             netdev = {{ type = \"tap\", id = \"{netdev}\", ifname = \"{}\", script = \"no\", downscript = \"no\" }}\n",
            fabric.mac(vm),
            fabric.tap(vm)
        ));
        s
    }

    /// Writes the plan that moves every VM to the other fabric, at a destination QEMU the plan
    /// launches in the namespace; returns its path and where the VMs will be.
    fn plan_to_other_fabric(&self) -> (PathBuf, Vec<Placement>) {
        let mv = self.moves;
        let mut plan = String::from(
            "[settings]\nmax_parallel = 2\n[settings.deadlines_ms]\nquiesce = 60000\nresume = 60000\n",
        );
        let mut next = Vec::new();
        for vm in 0..VMS {
            let here = &self.at[vm];
            let to = here.fabric.other();
            let d = self.dir.join(format!("vm{vm}-d{mv}"));
            fs::create_dir_all(&d).unwrap();
            let channel = d.join("channel.sock");
            let machine = self.machine(vm, &format!("m{vm}d{mv}"), &channel);
            let mut launch = machine.program();
            launch.extend(machine.machine_args(&d.join("serial.log")));
            let hca_mem = (to == Fabric::A).then(|| {
                PathBuf::from(format!(
                    "/dev/shm/ninja-vc-{}-{}-vm{vm}-d{mv}-hca0",
                    std::process::id(),
                    self.tag
                ))
            });
            plan.push_str(&format!(
                "\n[[vm]]\nname = \"vm{vm}\"\n\
                 [vm.source]\nqmp = \"unix:{}\"\nchannel = \"unix:{}\"\n\
                 interconnect = {{ kind = \"ethernet\", mac = \"{}\" }}\n{}\
                 [vm.destination]\nqmp = \"unix:{}\"\nchannel = \"unix:{}\"\n\
                 migrate_uri = \"unix:{}\"\n\
                 interconnect = {{ kind = \"ethernet\", mac = \"{}\" }}\n\
                 launch = {{ program = {:?}, args = {} }}\n{}",
                here.qmp.display(),
                here.channel.display(),
                here.fabric.mac(vm),
                self.fabric_devices(vm, here.fabric, here.hca_mem.as_deref())
                    .replace("[[DEVICES]]", "[[vm.source.devices]]"),
                d.join("qmp.sock").display(),
                channel.display(),
                d.join("migrate.sock").display(),
                to.mac(vm),
                launch[0],
                toml_list(&launch[1..]),
                self.fabric_devices(vm, to, hca_mem.as_deref())
                    .replace("[[DEVICES]]", "[[vm.destination.devices]]"),
            ));
            next.push(Placement {
                qmp: d.join("qmp.sock"),
                channel,
                fabric: to,
                hca_mem,
            });
        }
        let path = self.dir.join(format!("plan-{mv}.toml"));
        fs::write(&path, plan).unwrap();
        (path, next)
    }

    /// Runs `ninja-migrate plan run --json` on the plan; its exit code and events.
    fn run_plan(&self, plan: &Path) -> (i32, Vec<serde_json::Value>, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_ninja-migrate"))
            .args(["plan", "run", "--json", "--log-dir"])
            .arg(self.dir.join("logs"))
            .arg(plan)
            .output()
            .unwrap();
        let events = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (
            out.status.code().unwrap_or(-1),
            events,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Tries to move every VM to the other fabric; the plan must roll back (exit 3), leaving
    /// every VM where it is. Returns the plan's stderr and events, for the reason.
    fn move_rolled_back(&mut self) -> String {
        let (plan, _) = self.plan_to_other_fabric();
        let (code, events, stderr) = self.run_plan(&plan);
        let all = format!("{stderr}\nevents: {events:#?}");
        assert_eq!(code, 3, "{}: the move must roll back: {all}", self.test);
        for e in events.iter().filter(|e| e["type"] == "guest_resumed") {
            assert_eq!(e["at"], "source", "{e}");
        }
        self.moves += 1;
        all
    }

    /// Moves every VM to the other fabric with a plan; the plan's epoch.
    fn move_to_other_fabric(&mut self) -> u64 {
        let (plan, next) = self.plan_to_other_fabric();
        let (code, events, stderr) = self.run_plan(&plan);
        let epoch = events
            .iter()
            .find_map(|e| e["epoch"].as_u64())
            .unwrap_or_else(|| panic!("no plan_started event: {events:?}\n{stderr}"));
        assert_eq!(
            code,
            0,
            "{}: move {} failed: {stderr}\nevents: {events:#?}\njob: {}",
            self.test,
            self.moves,
            self.job_output()
        );
        for (vm, e) in events
            .iter()
            .filter(|e| e["type"] == "guest_resumed")
            .enumerate()
        {
            assert!(vm < VMS, "{events:?}");
            assert_eq!(e["at"], "destination", "{e}");
        }
        for p in &self.at {
            if let Some(m) = &p.hca_mem {
                let _ = fs::remove_file(m);
            }
        }
        self.at = next;
        self.moves += 1;
        epoch
    }

    /// The cut records of `epoch` from every guest, in a local directory for [`read_cut`].
    fn collect_cut(&self, epoch: u64) -> Vec<(Vec<u64>, Vec<u64>)> {
        let local = self.dir.join(format!("cuts-{epoch}"));
        fs::create_dir_all(&local).unwrap();
        for vm in 0..VMS {
            let listing = self.run(
                vm,
                &format!(
                    "cd /tmp/cuts && for f in cut-{epoch}-*; do echo \"== $f\"; cat \"$f\"; done"
                ),
            );
            for part in listing.split("== ").filter(|p| !p.is_empty()) {
                let (name, body) = part.split_once('\n').unwrap();
                fs::write(local.join(name.trim()), body).unwrap();
            }
        }
        read_cut(&local, epoch)
    }

    /// Asks the job to stop, waits for it, returns its output.
    fn finish_job(&self) -> String {
        self.run(0, "touch /tmp/job/stop");
        let t = Instant::now();
        loop {
            let status = self.ssh(0, "cat /tmp/job/status");
            if status.status.success() {
                let code = String::from_utf8_lossy(&status.stdout).trim().to_owned();
                let out = self.job_output();
                assert_eq!(code, "0", "{}: the job failed:\n{out}", self.test);
                return out;
            }
            assert!(
                t.elapsed() < PATIENCE,
                "{}: the job did not stop: {}",
                self.test,
                self.job_output()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
}

/// Migrate blocked while the stand-in is attached, as with a VFIO device without migration
/// support.
fn assert_migration_refused(q: &Qemu) {
    let mut qmp = RawQmp::connect(q.qmp_path()).unwrap();
    let r = qmp.execute("migrate", serde_json::json!({"uri": "exec:cat >/dev/null"}));
    let e = r.expect_err("migrate with the fabric-A stand-in attached must be refused");
    assert!(e.contains("ivshmem") || e.contains("disabled"), "{e}");
}

/// The job on fabric A, moved to B and back to A, judged by counters, PIDs, cuts and results.
/// Every VM's agent re-plumbs its own data address.
fn own_data_addresses() -> Vec<Option<String>> {
    (0..VMS).map(|vm| Some(data_address(vm))).collect()
}

fn a_to_b_to_a(mpi: MpiImpl, tag: &str, test: &str) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(mut c) = VirtualCluster::boot(test, tag, mpi, own_data_addresses()) else {
        return;
    };
    assert_migration_refused(&c.sources[0]);
    c.start_job("ring,anysource,collective");
    c.wait_traffic(Fabric::A, 1 << 20).unwrap();
    let pids = c.rank_pids();
    let b_before = c.fabric_bytes(Fabric::B);

    // A -> B.
    let epoch1 = c.move_to_other_fabric();
    let a_after_detach = c.fabric_bytes(Fabric::A);
    c.wait_traffic(Fabric::B, 1 << 20).unwrap();
    assert!(c.fabric_bytes(Fabric::B) > b_before);
    assert_eq!(
        c.fabric_bytes(Fabric::A),
        a_after_detach,
        "fabric A carried traffic after its NICs were detached"
    );
    assert_eq!(c.rank_pids(), pids, "the ranks are the same processes");
    let total = check_pairs(&c.collect_cut(epoch1), epoch1);
    eprintln!("{test}: cut 1 (A->B) after {total} messages");

    // B -> A: the fallback-and-recovery return.
    let b_after_first = c.fabric_bytes(Fabric::B);
    let epoch2 = c.move_to_other_fabric();
    let b_after_detach = c.fabric_bytes(Fabric::B);
    assert!(b_after_detach >= b_after_first);
    c.wait_traffic(Fabric::A, 1 << 20).unwrap();
    assert_eq!(
        c.fabric_bytes(Fabric::B),
        b_after_detach,
        "fabric B carried traffic after its NICs were detached"
    );
    assert_eq!(c.rank_pids(), pids, "the ranks are the same processes");
    let total2 = check_pairs(&c.collect_cut(epoch2), epoch2);
    assert!(total2 > total, "the job advanced between the cuts");

    let out = c.finish_job();
    let oks = out.lines().filter(|l| l.contains("stress OK rank")).count();
    assert_eq!(oks, VMS * RANKS_PER_VM, "{out}");
}

#[test]
fn open_mpi_job_in_the_guests_moves_from_fabric_a_to_b_and_back() {
    a_to_b_to_a(
        MpiImpl::OpenMpi,
        "aba-ompi",
        "open_mpi_job_in_the_guests_moves_from_fabric_a_to_b_and_back",
    );
}

#[test]
fn mpich_job_in_the_guests_moves_from_fabric_a_to_b_and_back() {
    a_to_b_to_a(
        MpiImpl::Mpich,
        "aba-mpich",
        "mpich_job_in_the_guests_moves_from_fabric_a_to_b_and_back",
    );
}

/// The negative control: the same move with the agents' network step off. The ranks resume
/// with their data subnet routed nowhere (the fabric-A NICs are gone) and the job stalls: no
/// traffic on fabric B, no end when asked to stop. Proves the A-to-B test can fail.
#[test]
fn without_the_network_step_the_moved_job_stalls() {
    let test = "without_the_network_step_the_moved_job_stalls";
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(mut c) = VirtualCluster::boot(test, "nostep", MpiImpl::OpenMpi, vec![None; VMS])
    else {
        return;
    };
    c.start_job("ring,anysource,collective");
    c.wait_traffic(Fabric::A, 1 << 20).unwrap();
    c.move_to_other_fabric();
    let stalled = c.wait_traffic_for(Fabric::B, 1 << 20, Duration::from_secs(20));
    assert!(stalled.is_err(), "the job ran on without the network step");
    c.run(0, "touch /tmp/job/stop");
    std::thread::sleep(Duration::from_secs(10));
    assert!(
        !c.ssh(0, "cat /tmp/job/status").status.success(),
        "the job ended: {}",
        c.job_output()
    );
}

/// A guest whose agent names a data address the guest does not have: the cut is refused with
/// that reason, the plan rolls back, and the job runs on over fabric A, same processes.
#[test]
fn a_misconfigured_data_address_rolls_back_and_the_job_stays_on_fabric_a() {
    let test = "a_misconfigured_data_address_rolls_back_and_the_job_stays_on_fabric_a";
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut data = own_data_addresses();
    data[1] = Some("10.99.0.42/24".into());
    let Some(mut c) = VirtualCluster::boot(test, "baddata", MpiImpl::OpenMpi, data) else {
        return;
    };
    c.start_job("ring,anysource,collective");
    c.wait_traffic(Fabric::A, 1 << 20).unwrap();
    let pids = c.rank_pids();
    let why = c.move_rolled_back();
    assert!(
        why.contains("data address 10.99.0.42/24 is not configured"),
        "{why}"
    );
    c.wait_traffic(Fabric::A, 1 << 20).unwrap();
    assert_eq!(c.rank_pids(), pids);
    let out = c.finish_job();
    assert_eq!(
        out.matches("stress OK rank").count(),
        VMS * RANKS_PER_VM,
        "{out}"
    );
}

/// Fabric B is down (its bridge removed) when the VMs resume there: no peer answers on the new
/// NICs, the agents report it, the plan rolls every VM back to fabric A and the job runs on.
#[test]
fn a_dead_destination_fabric_rolls_back_to_fabric_a() {
    let test = "a_dead_destination_fabric_rolls_back_to_fabric_a";
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let Some(mut c) = VirtualCluster::boot(test, "deadb", MpiImpl::Mpich, own_data_addresses())
    else {
        return;
    };
    c.start_job("ring,anysource,collective");
    c.wait_traffic(Fabric::A, 1 << 20).unwrap();
    let pids = c.rank_pids();
    c.fabrics.remove_bridge(Net::FabricB).unwrap();
    let why = c.move_rolled_back();
    assert!(why.contains("do not answer"), "{why}");
    c.wait_traffic(Fabric::A, 1 << 20).unwrap();
    assert_eq!(c.rank_pids(), pids);
    let out = c.finish_job();
    assert_eq!(
        out.matches("stress OK rank").count(),
        VMS * RANKS_PER_VM,
        "{out}"
    );
}
