//! The virtual-cluster rig shared by `tests/virtual_cluster.rs` and `benches/virtual_cluster.rs`:
//! guests booted on fabric A in a namespace of their own, an MPI job started in vm0, plans
//! written and run with `ninja-migrate plan run`, and the job judged by counters, PIDs, cuts
//! and its own checks. Everything it starts is killed, and its files removed, on drop.
#![allow(dead_code)]

#[path = "../../symvirt/mpi/tests/common/mod.rs"]
#[allow(unused_imports)]
pub mod mpi_common;

use mpi_common::cut::{check_iterations, check_pairs, read_cut};
use ninja_testkit::cluster::{
    ClusterFixtures, Fabrics, Net, cluster_or_skip, data_address, guest_machine, management_ip,
    pack_disk,
};
use ninja_testkit::{Qemu, RawQmp};
use qmp::{MigrationCapability, MigrationInfo, MigrationWait, Qmp, RunState, wait_for_migration};
use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, mpsc};
use std::time::{Duration, Instant};
use symvirt_mpi::mpi_build::{Linkage, MpiImpl};

/// VMs in the tests' cluster.
pub const VMS: usize = 2;
/// Ranks each guest runs.
pub const RANKS_PER_VM: usize = 2;
/// Upper bound for any one wait.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// Two guests, their migrations and an MPI job: one test at a time.
pub static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Which fabric a VM is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fabric {
    A,
    B,
}

impl Fabric {
    pub fn mac(self, vm: usize) -> String {
        match self {
            Fabric::A => format!("52:54:00:aa:00:{:02x}", vm + 1),
            Fabric::B => format!("52:54:00:bb:00:{:02x}", vm + 1),
        }
    }

    pub fn tap(self, vm: usize) -> String {
        match self {
            Fabric::A => format!("a{vm}"),
            Fabric::B => format!("b{vm}"),
        }
    }

    pub fn other(self) -> Fabric {
        match self {
            Fabric::A => Fabric::B,
            Fabric::B => Fabric::A,
        }
    }
}

/// How a VM gets its fabric-B NIC (`fb0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FabricBNic {
    /// The plan hot-plugs it, with its tap, at the destination (`kind = "virtio-net"`).
    HotPlugged,
    /// The VM has it from boot wherever it runs, at PCI slot [`STANDBY_SLOT`], on its tap when
    /// on fabric B, elsewhere on a tap on no bridge (a backend is needed: the guest negotiated
    /// the tap's offloads, and a NIC without one refuses the incoming stream); the plan switches
    /// its link (`kind = "standby-nic"`): a carrier change for the guest instead of a PCI
    /// hot-plug.
    Standby,
}

/// The standby fabric-B NIC's PCI slot, the same in every QEMU of a VM (migration needs it).
pub const STANDBY_SLOT: u8 = 0x10;

/// How the cluster is built.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The MPI the job uses.
    pub mpi: MpiImpl,
    /// Transparent layer preloaded (`Plain`) or the explicit safe-point API linked in.
    pub linkage: Linkage,
    /// Per VM, the data address its agent re-plumbs on resume (`--data-address`); `None`: the
    /// agent's network step is off. Its length is the number of VMs.
    pub agent_data: Vec<Option<String>>,
    /// Guest RAM.
    pub memory_mib: u32,
    /// More programs for the job disk: sources in `symvirt/mpi/tests/programs`, built for this
    /// MPI and linkage, at `/job/<stem>` (`pingpong.c` is `/job/pingpong`).
    pub programs: Vec<&'static str>,
    /// How the fabric-B NIC arrives.
    pub fabric_b: FabricBNic,
    /// Every VM also has a writable 16 MiB disk of its own (drive `scratch`; qcow2 for vm0,
    /// raw for the others), at the same path wherever the VM runs (the hosts' shared storage):
    /// [`VirtualCluster::scratch_image`].
    pub scratch_disk: bool,
}

impl Setup {
    /// `vms` VMs of 256 MiB, the transparent layer, every agent re-plumbing its own address,
    /// fabric B's NIC on standby.
    pub fn new(mpi: MpiImpl, vms: usize) -> Setup {
        Setup {
            mpi,
            linkage: Linkage::Plain,
            agent_data: (0..vms).map(|vm| Some(data_address(vm))).collect(),
            memory_mib: 256,
            programs: Vec::new(),
            fabric_b: FabricBNic::Standby,
            scratch_disk: false,
        }
    }

    fn vms(&self) -> usize {
        self.agent_data.len()
    }
}

/// Where one VM runs now: its QMP monitor and SymVirt channel, and its fabric.
pub struct Placement {
    qmp: PathBuf,
    channel: PathBuf,
    fabric: Fabric,
    /// The fabric-A stand-in's shared memory file while the VM is on A.
    hca_mem: Option<PathBuf>,
}

pub struct VirtualCluster {
    test: String,
    /// Short: it names the test directory, which unix socket paths (108 bytes) start with.
    tag: String,
    fixtures: ClusterFixtures,
    /// The namespace with the three bridges.
    pub fabrics: Fabrics,
    dir: PathBuf,
    job_disk: PathBuf,
    /// The source QEMUs the rig started (the plans' destinations are not its children).
    pub sources: Vec<Qemu>,
    at: Vec<Placement>,
    setup: Setup,
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

/// The `ninja-migrate` program: the one cargo built for tests and benches, elsewhere (the
/// example) the one on `PATH`.
fn ninja_migrate() -> &'static str {
    option_env!("CARGO_BIN_EXE_ninja-migrate").unwrap_or("ninja-migrate")
}

fn toml_list(words: &[String]) -> String {
    let quoted: Vec<String> = words.iter().map(|w| format!("{w:?}")).collect();
    format!("[{}]", quoted.join(", "))
}

impl VirtualCluster {
    /// Boots the guests of `setup` on fabric A, their agents expecting 2 ranks each; `None`
    /// when the test skips.
    pub fn boot(test: &str, tag: &str, setup: Setup) -> Option<VirtualCluster> {
        let mpi = setup.mpi;
        let fixtures = cluster_or_skip(test)?;
        let dir = std::env::temp_dir().join(format!("ninja-vc-{}-{tag}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();

        // The job's disk: the transparent layer and the stress program for this MPI.
        let libs = mpi_common::libraries(mpi);
        let job = dir.join("job");
        fs::create_dir_all(&job).unwrap();
        fs::copy(&libs.transparent, job.join("libsymvirt_pmpi.so")).unwrap();
        let stress = mpi_common::program(mpi, "stress.c", setup.linkage);
        fs::copy(stress, job.join("stress")).unwrap();
        for source in &setup.programs {
            let built = mpi_common::program(mpi, source, setup.linkage);
            let stem = Path::new(source).file_stem().unwrap();
            fs::copy(built, job.join(stem)).unwrap();
        }
        let job_disk = dir.join("job.ext4");
        pack_disk(&job, &job_disk).unwrap();
        if setup.scratch_disk {
            for vm in 0..setup.vms() {
                let format = scratch_format(vm);
                let image = dir.join(format!("scratch-vm{vm}.{format}"));
                let made = std::process::Command::new("qemu-img")
                    .args(["create", "-q", "-f", format])
                    .arg(&image)
                    .arg("16M")
                    .status();
                assert!(made.is_ok_and(|s| s.success()), "qemu-img create {image:?}");
            }
        }

        let fabrics = Fabrics::create().unwrap();
        for vm in 0..setup.vms() {
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
            fixtures,
            fabrics,
            dir,
            job_disk,
            sources: Vec::new(),
            at: Vec::new(),
            setup,
            moves: 0,
        };
        for vm in 0..cluster.vms() {
            let channel = cluster.dir.join(format!("vm{vm}-s.sock"));
            let machine = cluster.machine(vm, &format!("m{vm}s"), &channel, None);
            let q = Qemu::start(machine).unwrap();
            if cluster.setup.fabric_b == FabricBNic::Standby {
                // Off fabric B, no link (the guest sees a NIC without carrier).
                let mut qmp = RawQmp::connect(q.qmp_path()).unwrap();
                qmp.execute("set_link", serde_json::json!({"name": "fb0", "up": false}))
                    .unwrap();
            }
            cluster.at.push(Placement {
                qmp: q.qmp_path().to_path_buf(),
                channel,
                fabric: Fabric::A,
                hca_mem: None,
            });
            cluster.sources.push(q);
        }
        for vm in 0..cluster.vms() {
            cluster.sources[vm]
                .wait_serial("cluster-init: ready", PATIENCE)
                .unwrap_or_else(|e| panic!("vm{vm}: {e}"));
            cluster.wait_ssh(vm);
            cluster.give_fabric_a(vm);
        }
        Some(cluster)
    }

    /// The machine of `vm` (the same in every QEMU it runs in); with a standby fabric-B NIC,
    /// that NIC on `fabric_b_tap` if given (the QEMU is on fabric B), else on a tap of its own
    /// on no bridge (QEMU creates it, named after the management tap: `m0d1` gives `n0d1`).
    pub fn machine(
        &self,
        vm: usize,
        mgmt_tap: &str,
        channel: &Path,
        fabric_b_tap: Option<&str>,
    ) -> ninja_testkit::QemuConfig {
        let mut agent = format!("--ranks {RANKS_PER_VM} --report-pci");
        if let Some(data) = &self.setup.agent_data[vm] {
            agent.push_str(&format!(" --data-address {data}"));
        }
        let config = guest_machine(
            &self.fixtures,
            &self.fabrics,
            vm,
            Some(&self.job_disk),
            mgmt_tap,
            channel,
            &agent,
        )
        .memory_mib(self.setup.memory_mib)
        .arg("-name")
        .arg(format!("vm{vm},debug-threads=on"));
        let config = if self.setup.scratch_disk {
            config.arg("-drive").arg(format!(
                "file={},format={},if=virtio,id=scratch",
                self.scratch_image(vm).display(),
                scratch_format(vm)
            ))
        } else {
            config
        };
        if self.setup.fabric_b == FabricBNic::HotPlugged {
            return config;
        }
        let nowhere = format!("n{}", &mgmt_tap[1..]);
        with_fabric_b_nic(
            config,
            vm,
            fabric_b_tap.unwrap_or(&nowhere),
            i64::from(STANDBY_SLOT),
        )
    }

    /// VM `vm`'s writable disk ([`Setup::scratch_disk`]) on the host.
    pub fn scratch_image(&self, vm: usize) -> PathBuf {
        self.dir
            .join(format!("scratch-vm{vm}.{}", scratch_format(vm)))
    }

    /// The guest device of VM `vm`'s writable disk: the one of 16 MiB.
    pub fn scratch_device(&self, vm: usize) -> String {
        let found = self.run(
            vm,
            "for d in /sys/block/vd*; do [ \"$(cat $d/size)\" = 32768 ] && echo /dev/${d##*/}; done",
        );
        let device = found.trim().to_owned();
        assert!(
            device.starts_with("/dev/vd"),
            "vm{vm}: no 16 MiB disk: {found:?}"
        );
        device
    }

    /// How many VMs.
    pub fn vms(&self) -> usize {
        self.setup.vms()
    }

    pub fn ssh(&self, vm: usize, script: &str) -> std::process::Output {
        self.fabrics
            .ssh(&self.fixtures.key, &management_ip(vm), script)
            .unwrap()
    }

    /// Runs `script` on `vm`; its stdout, or a panic with what went wrong.
    pub fn run(&self, vm: usize, script: &str) -> String {
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

    pub fn wait_ssh(&self, vm: usize) {
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
    pub fn give_fabric_a(&mut self, vm: usize) {
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

    /// The command that starts the job in vm0 (2 ranks per guest, TCP between the data
    /// addresses, the transparent layer preloaded into the ranks or the explicit API linked in;
    /// cut records in /tmp/cuts or, explicit, /tmp/job).
    pub fn launcher(&self, modes: &str) -> String {
        let program = format!("/job/stress {modes} /tmp/job 10");
        // The explicit API is linked into the program; the transparent layer is preloaded.
        let mut env = vec![("SYMVIRT_CUT_LOG", "/tmp/cuts")];
        if self.setup.linkage == Linkage::Plain {
            env.push(("LD_PRELOAD", "/job/libsymvirt_pmpi.so"));
        }
        self.mpi_command(RANKS_PER_VM, &env, &program)
    }

    /// The launcher command (run in vm0) of `program` with `per_vm` ranks in every guest, TCP
    /// between the data addresses, `env` set in every rank.
    pub fn mpi_command(&self, per_vm: usize, env: &[(&str, &str)], program: &str) -> String {
        let hosts: Vec<String> = (0..self.vms())
            .map(|vm| format!("{}:{per_vm}", management_ip(vm)))
            .collect();
        let hosts = hosts.join(",");
        let ranks = self.vms() * per_vm;
        match self.setup.mpi {
            MpiImpl::OpenMpi => {
                let env: Vec<String> = env.iter().map(|(k, v)| format!("-x {k}={v}")).collect();
                format!(
                    "mpirun.openmpi --allow-run-as-root --oversubscribe --bind-to none -np {ranks} \
                     -host {hosts} --mca pml ob1 --mca btl self,vader,tcp \
                     --mca btl_vader_single_copy_mechanism none --mca btl_tcp_if_include data0 \
                     --mca oob_tcp_if_include eth0 {} {program}",
                    env.join(" ")
                )
            }
            MpiImpl::Mpich => {
                let env: Vec<String> = env.iter().map(|(k, v)| format!("-genv {k} {v}")).collect();
                format!(
                    "mpiexec.mpich -launcher ssh -hosts {hosts} -n {ranks} -genv UCX_TLS tcp,self \
                     -genv UCX_NET_DEVICES data0 {} {program}",
                    env.join(" ")
                )
            }
        }
    }

    /// Starts the job in the background of vm0; its output goes to /tmp/job/out there.
    pub fn start_job(&self, modes: &str) {
        for vm in 0..self.vms() {
            self.run(vm, "mkdir -p /tmp/job /tmp/cuts");
        }
        // The status appears whole (renamed into place): `finish_job` polls for it, and a
        // plain `echo >status` let it read the file created but still empty.
        let script = format!(
            "setsid sh -c '{} >/tmp/job/out 2>&1; echo $? >/tmp/job/status.new; \
             mv /tmp/job/status.new /tmp/job/status' </dev/null >/dev/null 2>&1 &",
            self.launcher(modes)
        );
        self.run(0, &script);
    }

    /// The PIDs of the ranks in every guest.
    pub fn rank_pids(&self) -> Vec<BTreeSet<u32>> {
        (0..self.vms())
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
    pub fn fabric_bytes(&self, fabric: Fabric) -> u64 {
        (0..self.vms())
            .map(|vm| self.fabrics.tap_bytes(&fabric.tap(vm)).unwrap())
            .sum()
    }

    /// Waits until `fabric` carries at least `bytes` more than it does now: the job talks there.
    /// Returns how long that took.
    pub fn wait_traffic(&self, fabric: Fabric, bytes: u64) -> Result<Duration, String> {
        self.wait_traffic_for(fabric, bytes, Duration::from_secs(60))
    }

    /// [`VirtualCluster::wait_traffic`] with a time limit.
    pub fn wait_traffic_for(
        &self,
        fabric: Fabric,
        bytes: u64,
        limit: Duration,
    ) -> Result<Duration, String> {
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
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(t.elapsed())
    }

    pub fn job_output(&self) -> String {
        String::from_utf8_lossy(&self.ssh(0, "cat /tmp/job/out /tmp/job/status").stdout)
            .into_owned()
    }

    pub fn fabric_devices(&self, vm: usize, fabric: Fabric, hca_mem: Option<&Path>) -> String {
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
        if fabric == Fabric::B && self.setup.fabric_b == FabricBNic::Standby {
            s.push_str(&format!(
                "[[DEVICES]]\nkind = \"standby-nic\"\nid = \"fb0\"\nmac = \"{}\"\n",
                fabric.mac(vm)
            ));
            return s;
        }
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
    pub fn plan_to_other_fabric(&self) -> (PathBuf, Vec<Placement>) {
        let mv = self.moves;
        let mut plan = String::from(
            "[settings]\nmax_parallel = 2\n[settings.deadlines_ms]\nquiesce = 60000\nresume = 60000\n",
        );
        let mut next = Vec::new();
        for vm in 0..self.vms() {
            let here = &self.at[vm];
            let to = here.fabric.other();
            let d = self.dir.join(format!("vm{vm}-d{mv}"));
            fs::create_dir_all(&d).unwrap();
            let channel = d.join("channel.sock");
            let tap = Fabric::B.tap(vm);
            let machine = self.machine(
                vm,
                &format!("m{vm}d{mv}"),
                &channel,
                (to == Fabric::B).then_some(tap.as_str()),
            );
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

    /// Runs `ninja-migrate plan run --json` on the plan (killed after 10 minutes); its exit code
    /// and events.
    pub fn run_plan(&self, plan: &Path) -> (i32, Vec<serde_json::Value>, String) {
        let run = self
            .run_plan_timed(plan, Duration::from_secs(600))
            .unwrap_or_else(|e| panic!("{}: {e}", self.test));
        let events = run.events.into_iter().map(|(_, e)| e).collect();
        (run.code, events, run.stderr)
    }

    /// Writes the plans of a round trip, to the other fabric and back, without running them
    /// (for a person to run with `ninja-migrate plan run`); afterwards the rig believes the VMs
    /// made both moves.
    pub fn write_round_trip_plans(&mut self) -> [PathBuf; 2] {
        let mut plans = Vec::new();
        for _ in 0..2 {
            let (plan, next) = self.plan_to_other_fabric();
            self.at = next;
            self.moves += 1;
            plans.push(plan);
        }
        [plans[0].clone(), plans[1].clone()]
    }

    /// The directory holding the cluster's sockets, logs and plans.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The private key that logs in on every guest.
    pub fn key(&self) -> &Path {
        &self.fixtures.key
    }

    /// Tries to move every VM to the other fabric; the plan must roll back (exit 3), leaving
    /// every VM where it is. Returns the plan's stderr and events, for the reason.
    pub fn move_rolled_back(&mut self) -> String {
        let (plan, _) = self.plan_to_other_fabric();
        let (code, events, stderr) = self.run_plan(&plan);
        let all = format!("{stderr}\nevents: {events:#?}");
        assert_eq!(code, 3, "{}: the move must roll back: {all}", self.test);
        // Guests that were quiesced resumed where they were.
        for e in events.iter().filter(|e| e["event"] == "guest_resumed") {
            assert_eq!(e["at"], "source", "{e}");
        }
        self.moves += 1;
        all
    }

    /// Moves every VM to the other fabric with a plan; the plan's epoch.
    pub fn move_to_other_fabric(&mut self) -> u64 {
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
        // Every guest confirmed its resume at its destination.
        let resumed: Vec<&serde_json::Value> = events
            .iter()
            .filter(|e| e["event"] == "guest_resumed")
            .collect();
        assert_eq!(resumed.len(), self.vms(), "{events:#?}");
        for e in resumed {
            assert_eq!(e["at"], "destination", "{e}");
        }
        self.arrive(next);
        epoch
    }

    /// Checkpoints every VM into `to` with `plan checkpoint --stop`, taken with the plan that
    /// moves them to the other fabric (whose destinations [`VirtualCluster::restore`] uses);
    /// every source QEMU ends. The cut's epoch, and where a restore puts the VMs.
    pub fn checkpoint_and_stop(&mut self, to: &Path) -> (u64, Vec<Placement>) {
        let (plan, next) = self.plan_to_other_fabric();
        let args: [std::ffi::OsString; _] = [
            "plan".into(),
            "checkpoint".into(),
            "--json".into(),
            "--stop".into(),
            "--to".into(),
            to.as_os_str().to_owned(),
            plan.into_os_string(),
        ];
        let run = self
            .ninja_timed(&args, Duration::from_secs(600))
            .unwrap_or_else(|e| panic!("{}: {e}", self.test));
        assert_eq!(run.code, 0, "{}: checkpoint: {}", self.test, run.describe());
        let epoch = run
            .events
            .iter()
            .find_map(|(_, e)| e["epoch"].as_u64())
            .unwrap();
        for (vm, q) in self.sources.iter_mut().enumerate() {
            let t = Instant::now();
            while q.is_running() {
                assert!(t.elapsed() < PATIENCE, "vm{vm} still runs after --stop");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        (epoch, next)
    }

    /// Restores the checkpoint in `from` with `plan restore` at `next` (as
    /// [`VirtualCluster::checkpoint_and_stop`] returned it): every guest resumed there.
    pub fn restore(&mut self, from: &Path, next: Vec<Placement>) {
        let args: [std::ffi::OsString; _] = [
            "plan".into(),
            "restore".into(),
            "--json".into(),
            "--log-dir".into(),
            self.dir.join("logs").into_os_string(),
            from.as_os_str().to_owned(),
        ];
        let run = self
            .ninja_timed(&args, Duration::from_secs(600))
            .unwrap_or_else(|e| panic!("{}: {e}", self.test));
        assert_eq!(run.code, 0, "{}: restore: {}", self.test, run.describe());
        let resumed: Vec<&serde_json::Value> = run
            .events
            .iter()
            .map(|(_, e)| e)
            .filter(|e| e["event"] == "guest_resumed" && e["at"] == "destination")
            .collect();
        assert_eq!(resumed.len(), self.vms(), "{}", run.describe());
        self.arrive(next);
    }

    /// The VMs live at `next` now: the sources' stand-in memory files go.
    fn arrive(&mut self, next: Vec<Placement>) {
        for p in &self.at {
            if let Some(m) = &p.hca_mem {
                let _ = fs::remove_file(m);
            }
        }
        self.at = next;
        self.moves += 1;
    }

    /// Checks the cut of `epoch` from every guest's records, copied to a local directory: pair
    /// by pair (transparent layer) or every rank at one iteration (explicit API). Returns the
    /// messages delivered before it. For a job of `mpi_common::RANKS` ranks.
    pub fn check_cut(&self, epoch: u64) -> u64 {
        assert_eq!(self.vms() * RANKS_PER_VM, mpi_common::RANKS as usize);
        let (remote, local) = match self.setup.linkage {
            Linkage::Plain => ("/tmp/cuts", self.dir.join(format!("cuts-{epoch}"))),
            Linkage::Explicit => ("/tmp/job", self.dir.join(format!("explicit-cuts-{epoch}"))),
        };
        fs::create_dir_all(&local).unwrap();
        for vm in 0..self.vms() {
            let listing = self.run(
                vm,
                &format!(
                    "cd {remote} && for f in cut-{epoch}-*; do echo \"== $f\"; cat \"$f\"; done"
                ),
            );
            for part in listing.split("== ").filter(|p| !p.is_empty()) {
                let (name, body) = part.split_once('\n').unwrap();
                fs::write(local.join(name.trim()), body).unwrap();
            }
        }
        match self.setup.linkage {
            Linkage::Plain => check_pairs(&read_cut(&local, epoch), epoch),
            Linkage::Explicit => check_iterations(&local, epoch),
        }
    }

    /// Asks the job to stop, waits for it, returns its output.
    pub fn finish_job(&self) -> String {
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
                "{}: the job did not stop: {}\n{}",
                self.test,
                self.job_output(),
                self.processes()
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// What every guest still runs of the job, and its sockets: for a job that does not end.
    pub fn processes(&self) -> String {
        (0..self.vms())
            .map(|vm| {
                let out = self.ssh(
                    vm,
                    "for p in /proc/[0-9]*; do c=$(tr '\\0' ' ' <$p/cmdline 2>/dev/null); \
                     [ -n \"$c\" ] && echo \"${p#/proc/} $(cat $p/wchan 2>/dev/null) $c\"; \
                     done; ss -tanpi 2>/dev/null | head -80; ip -s link; ip route; ip neigh",
                );
                format!("== vm{vm}\n{}", String::from_utf8_lossy(&out.stdout))
            })
            .collect()
    }
}

/// The image format of VM `vm`'s writable disk ([`Setup::scratch_disk`]).
pub fn scratch_format(vm: usize) -> &'static str {
    if vm == 0 { "qcow2" } else { "raw" }
}

/// A plan run whose JSON events carry the time their line arrived.
pub struct TimedPlan {
    /// `ninja-migrate`'s exit code.
    pub code: i32,
    /// Every event, with the milliseconds from the start of `ninja-migrate` to its line.
    pub events: Vec<(f64, serde_json::Value)>,
    pub stderr: String,
}

impl TimedPlan {
    /// When the first `event` (of `phase`, when given) arrived, in ms.
    pub fn at(&self, event: &str, phase: Option<&str>) -> Option<f64> {
        self.events
            .iter()
            .find(|(_, e)| e["event"] == event && phase.is_none_or(|p| e["phase"] == p))
            .map(|(t, _)| *t)
    }

    /// Each finished phase and its own duration (`phase_finished`'s `ms`), in plan order.
    pub fn phase_ms(&self) -> Vec<(String, f64)> {
        self.events
            .iter()
            .filter(|(_, e)| e["event"] == "phase_finished")
            .filter_map(|(_, e)| Some((e["phase"].as_str()?.to_owned(), e["ms"].as_f64()?)))
            .collect()
    }

    /// The plan's own total (`plan_finished`'s `total_ms`).
    pub fn total_ms(&self) -> Option<f64> {
        let finished = self
            .events
            .iter()
            .find(|(_, e)| e["event"] == "plan_finished");
        finished.and_then(|(_, e)| e["total_ms"].as_f64())
    }

    fn describe(&self) -> String {
        let events: Vec<String> = self
            .events
            .iter()
            .map(|(t, e)| format!("{t:9.1} ms {e}"))
            .collect();
        format!(
            "exit code {}: {}\nevents:\n{}",
            self.code,
            self.stderr.trim(),
            events.join("\n")
        )
    }
}

/// A plain migration of every VM: the wall time and QEMU's own numbers per VM.
pub struct PlainMigration {
    /// From the first `migrate` command to the last source's `completed`.
    pub wall: Duration,
    /// Per VM, QEMU's `total-time` (ms).
    pub total_ms: Vec<u64>,
    /// Per VM, QEMU's `downtime` (ms).
    pub downtime_ms: Vec<u64>,
    /// Per VM, RAM bytes sent.
    pub transferred: Vec<u64>,
}

/// Timed moves and plain migrations, for `benches/virtual_cluster.rs`: bounded, and returning
/// failures instead of panicking.
impl VirtualCluster {
    /// The fabric the VMs are on.
    pub fn fabric(&self) -> Fabric {
        self.at[0].fabric
    }

    /// [`VirtualCluster::run_plan`] with every event stamped as its line arrives; `ninja-migrate`
    /// is killed after `limit`.
    pub fn run_plan_timed(&self, plan: &Path, limit: Duration) -> Result<TimedPlan, String> {
        let args: [std::ffi::OsString; _] = [
            "plan".into(),
            "run".into(),
            "--json".into(),
            "--log-dir".into(),
            self.dir.join("logs").into_os_string(),
            "--state-dir".into(),
            self.dir.join("state").into_os_string(),
            plan.as_os_str().to_owned(),
        ];
        self.ninja_timed(&args, limit)
    }

    /// Runs `ninja-migrate ARGS` (with `--json`, killed after `limit`): its exit code, its
    /// events with the time each arrived, its stderr.
    fn ninja_timed(
        &self,
        args: &[std::ffi::OsString],
        limit: Duration,
    ) -> Result<TimedPlan, String> {
        let started = Instant::now();
        let mut child = Command::new(ninja_migrate())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| format!("ninja-migrate: {e}"))?;
        let (line_tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = line_tx.send((started.elapsed(), line));
            }
        });
        let (err_tx, err_rx) = mpsc::channel();
        let mut stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = stderr.read_to_string(&mut text);
            let _ = err_tx.send(text);
        });
        let code = loop {
            if let Some(status) = child.try_wait().map_err(|e| e.to_string())? {
                break status.code().unwrap_or(-1);
            }
            if started.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                break -1;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        // The pipes close with ninja-migrate (its QEMUs log elsewhere); a little grace anyway.
        let grace = Instant::now() + Duration::from_secs(5);
        let mut events = Vec::new();
        while let Ok((t, line)) =
            lines.recv_timeout(grace.saturating_duration_since(Instant::now()))
        {
            if let Ok(v) = serde_json::from_str(&line) {
                events.push((t.as_secs_f64() * 1000.0, v));
            }
        }
        let stderr = err_rx
            .recv_timeout(grace.saturating_duration_since(Instant::now()))
            .unwrap_or_default();
        let run = TimedPlan {
            code,
            events,
            stderr,
        };
        if started.elapsed() > limit {
            return Err(format!(
                "the plan did not end in {limit:?}: {}",
                run.describe()
            ));
        }
        Ok(run)
    }

    /// Creates tap `name` on `net` unless it exists (boot makes the taps of two moves).
    fn tap(&self, name: &str, net: Net) -> Result<(), String> {
        if self.fabrics.ip(&["link", "show", name]).is_ok() {
            return Ok(());
        }
        self.fabrics.add_tap(name, net).map_err(|e| e.to_string())
    }

    /// [`VirtualCluster::move_to_other_fabric`], any number of times, bounded by `limit`, its
    /// events timed; a plan that did not complete is an error (after a rollback the VMs are
    /// where they were).
    pub fn try_move_to_other_fabric(&mut self, limit: Duration) -> Result<TimedPlan, String> {
        for vm in 0..self.vms() {
            self.tap(&format!("m{vm}d{}", self.moves), Net::Management)?;
        }
        let (plan, next) = self.plan_to_other_fabric();
        let run = self.run_plan_timed(&plan, limit);
        let run = match run {
            Ok(run) if run.code == 0 => run,
            Ok(run) => {
                self.moves += 1;
                return Err(format!("move {}: {}", self.moves - 1, run.describe()));
            }
            Err(e) => {
                self.moves += 1;
                return Err(e);
            }
        };
        self.arrive(next);
        let resumed: Vec<&serde_json::Value> = run
            .events
            .iter()
            .filter(|(_, e)| e["event"] == "guest_resumed")
            .map(|(_, e)| &e["at"])
            .collect();
        if resumed.len() != self.vms() || resumed.iter().any(|at| *at != "destination") {
            return Err(format!("guests resumed at {resumed:?}: {}", run.describe()));
        }
        Ok(run)
    }

    /// Migrates every VM plainly (QEMU's migration alone: no quiesce, no device swap), all at
    /// once over unix sockets, into destinations this rig launches in the namespace with
    /// `-incoming defer`: the same machine, with the fabric-B NIC on the command line at the
    /// PCI address it has at the source, on fresh taps. The VMs must be on fabric B (fabric A's
    /// stand-in blocks migration). Afterwards the VMs live at those destinations, the sources
    /// have quit, and the job runs on. Bounded by `limit` (then cancelled: the VMs stay).
    pub fn plain_migration(&mut self, limit: Duration) -> Result<PlainMigration, String> {
        let mv = self.moves;
        let mut sources = Vec::new();
        for (vm, p) in self.at.iter().enumerate() {
            if p.fabric != Fabric::B {
                return Err(format!(
                    "vm{vm} is on fabric {:?}: not migratable",
                    p.fabric
                ));
            }
            let q = Qmp::connect_unix(&p.qmp).map_err(|e| format!("vm{vm} source: {e}"))?;
            let pci = q
                .query_pci()
                .map_err(|e| format!("vm{vm} query-pci: {e}"))?;
            let nic = pci
                .iter()
                .flat_map(|b| &b.devices)
                .find(|d| d.qdev_id == "fb0");
            let slot = nic.ok_or(format!("vm{vm}: no device fb0"))?.slot;
            sources.push((q, slot));
        }
        let mut destinations = Vec::new();
        let mut next = Vec::new();
        for (vm, (_, slot)) in sources.iter().enumerate() {
            let (mgmt, tap) = (format!("m{vm}d{mv}"), format!("b{vm}d{mv}"));
            self.tap(&mgmt, Net::Management)?;
            self.tap(&tap, Net::FabricB)?;
            let d = self.dir.join(format!("vm{vm}-d{mv}"));
            fs::create_dir_all(&d).map_err(|e| e.to_string())?;
            let channel = d.join("channel.sock");
            let mut config = self.machine(vm, &mgmt, &channel, Some(&tap));
            if self.setup.fabric_b == FabricBNic::HotPlugged {
                config = with_fabric_b_nic(config, vm, &tap, *slot);
            }
            let config = config.incoming("defer");
            let q = Qemu::start(config).map_err(|e| format!("vm{vm} destination: {e}"))?;
            let monitor = Qmp::connect_unix(q.qmp_path()).map_err(|e| e.to_string())?;
            let uri = format!("unix:{}", d.join("migrate.sock").display());
            monitor
                .migrate_incoming(&uri)
                .map_err(|e| format!("vm{vm} migrate-incoming: {e}"))?;
            next.push(Placement {
                qmp: q.qmp_path().to_path_buf(),
                channel,
                fabric: Fabric::B,
                hca_mem: None,
            });
            destinations.push((q, monitor, uri));
        }
        let caps = [
            (MigrationCapability::PauseBeforeSwitchover, false),
            (MigrationCapability::Events, true),
        ];
        for (q, _) in &sources {
            q.migrate_set_capabilities(&caps)
                .map_err(|e| format!("migrate-set-capabilities: {e}"))?;
        }
        let t0 = Instant::now();
        let migrated: Vec<Result<(Duration, MigrationInfo), String>> = std::thread::scope(|s| {
            let waits: Vec<_> = sources
                .iter()
                .zip(&destinations)
                .map(|((q, _), (_, _, uri))| {
                    q.migrate(uri).map_err(|e| format!("migrate {uri}: {e}"))?;
                    Ok(s.spawn(move || {
                        let wait = MigrationWait::completed_within(limit);
                        let info = wait_for_migration(q, &wait, |_| {});
                        info.map(|i| (t0.elapsed(), i)).map_err(|e| e.to_string())
                    }))
                })
                .collect();
            waits
                .into_iter()
                .map(|w: Result<_, String>| w?.join().map_err(|_| "waiter panicked".to_string())?)
                .collect()
        });
        let migrated: Result<Vec<_>, String> = migrated.into_iter().collect();
        let migrated = match migrated {
            Ok(m) => m,
            Err(e) => {
                // The VMs stay at their sources; the destinations die with `destinations`.
                for (q, _) in &sources {
                    let _ = q.migrate_cancel();
                    let _ = q.cont();
                }
                return Err(format!("plain migration: {e}"));
            }
        };
        for (vm, (_, monitor, _)) in destinations.iter().enumerate() {
            let t = Instant::now();
            while !monitor
                .query_status()
                .is_ok_and(|s| s.status == RunState::Running)
            {
                if t.elapsed() > PATIENCE {
                    return Err(format!("vm{vm}: the destination does not run"));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for (q, _) in &sources {
            let _ = q.quit();
        }
        for (q, _, _) in destinations {
            self.sources.push(q);
        }
        self.arrive(next);
        Ok(PlainMigration {
            wall: migrated.iter().map(|(t, _)| *t).max().unwrap_or_default(),
            total_ms: migrated
                .iter()
                .map(|(_, i)| i.total_time.unwrap_or(0))
                .collect(),
            downtime_ms: migrated
                .iter()
                .map(|(_, i)| i.downtime.unwrap_or(0))
                .collect(),
            transferred: migrated
                .iter()
                .map(|(_, i)| i.ram.as_ref().map_or(0, |r| r.transferred))
                .collect(),
        })
    }

    /// Bytes through every port of the bridge of `net` so far, both directions.
    pub fn bridge_bytes(&self, net: Net) -> Result<u64, String> {
        let out = self
            .fabrics
            .command("ip")
            .args(["-j", "-s", "link", "show", "master", net.bridge()])
            .output()
            .map_err(|e| e.to_string())?;
        let ports: serde_json::Value = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("ports of {}: {e}", net.bridge()))?;
        let bytes = |p: &serde_json::Value, dir: &str| p["stats64"][dir]["bytes"].as_u64();
        let ports = ports.as_array().map(Vec::as_slice).unwrap_or_default();
        Ok(ports
            .iter()
            .map(|p| bytes(p, "rx").unwrap_or(0) + bytes(p, "tx").unwrap_or(0))
            .sum())
    }

    /// Waits (at most `limit`) until the job moved `bytes` over the fabric the VMs are on,
    /// whichever taps their NICs use.
    pub fn wait_job_traffic(&self, bytes: u64, limit: Duration) -> Result<(), String> {
        let net = match self.at[0].fabric {
            Fabric::A => Net::FabricA,
            Fabric::B => Net::FabricB,
        };
        let start = self.bridge_bytes(net)?;
        let t = Instant::now();
        while self.bridge_bytes(net)? < start + bytes {
            if t.elapsed() > limit {
                let job = self.job_output();
                return Err(format!(
                    "no job traffic on {net:?} in {limit:?}; job: {job}"
                ));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }
}

/// `config` with vm's fabric-B NIC `fb0` on tap `tap` at PCI slot `slot`.
fn with_fabric_b_nic(
    config: ninja_testkit::QemuConfig,
    vm: usize,
    tap: &str,
    slot: i64,
) -> ninja_testkit::QemuConfig {
    config
        .arg("-netdev")
        .arg(format!("tap,id=fb0n,ifname={tap},script=no,downscript=no"))
        .arg("-device")
        .arg(format!(
            "virtio-net-pci,id=fb0,netdev=fb0n,mac={},addr={slot:#x}",
            Fabric::B.mac(vm)
        ))
}
