//! Starting QEMU for tests: TCG, a QMP unix socket, a serial log, killed and cleaned up on drop.

use crate::Fixtures;
use std::fs;
use std::io;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The QEMU binary tests start.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// How a test QEMU is started. Build with [`QemuConfig::new`] and the setters.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    kernel: PathBuf,
    initramfs: PathBuf,
    memory_mib: u32,
    guest_run: Option<String>,
    incoming: Option<String>,
    args: Vec<String>,
    kernel_args: Vec<String>,
    netns: Option<String>,
}

impl QemuConfig {
    /// A 256 MiB TCG guest booting the fixtures, running nothing but the init.
    pub fn new(fixtures: &Fixtures) -> QemuConfig {
        QemuConfig {
            kernel: fixtures.kernel.clone(),
            initramfs: fixtures.initramfs.clone(),
            memory_mib: 256,
            guest_run: None,
            incoming: None,
            args: Vec::new(),
            kernel_args: Vec::new(),
            netns: None,
        }
    }

    /// Guest RAM size.
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }

    /// The command the guest's init runs, e.g. `/bin/ninja-guest-dirtier 4`. Arguments must not
    /// contain commas (they travel on the kernel command line as `ninja.run=a,b,c`).
    pub fn guest_run(mut self, command: &str) -> Self {
        assert!(
            !command.contains(','),
            "guest_run: commas cannot be passed: {command}"
        );
        self.guest_run = Some(command.split_whitespace().collect::<Vec<_>>().join(","));
        self
    }

    /// Start as a migration destination: `-incoming URI` (e.g. `tcp:127.0.0.1:4444` or `defer`).
    pub fn incoming(mut self, uri: &str) -> Self {
        self.incoming = Some(uri.to_owned());
        self
    }

    /// One more QEMU command line argument (devices, chardevs, ...).
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// One more word on the guest kernel's command line (e.g. `ninja.vm=vm0`).
    pub fn kernel_arg(mut self, arg: impl Into<String>) -> Self {
        let arg = arg.into();
        assert!(
            !arg.contains(char::is_whitespace),
            "kernel_arg: one word: {arg}"
        );
        self.kernel_args.push(arg);
        self
    }

    /// Run QEMU inside the network namespace `ns` (`ip netns exec`, which becomes QEMU), so its
    /// tap devices are that namespace's.
    pub fn netns(mut self, ns: &str) -> Self {
        self.netns = Some(ns.to_owned());
        self
    }

    /// The program and the leading arguments that start QEMU (in the network namespace when
    /// one is set); [`QemuConfig::machine_args`] follow them.
    pub fn program(&self) -> Vec<String> {
        let mut words = Vec::new();
        if let Some(ns) = &self.netns {
            words.extend(["ip", "netns", "exec", ns].map(String::from));
        }
        words.push(QEMU_BINARY.into());
        words
    }

    /// Several more QEMU command line arguments.
    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }
}

impl QemuConfig {
    /// The QEMU command line of this machine, without the monitor and `-incoming`: the guest
    /// (kernel, initramfs, program), its memory, the serial log at `serial`, and the extra
    /// arguments. A migration destination must be started with the same machine; tests that let
    /// a controller launch destinations give it these arguments.
    pub fn machine_args(&self, serial: &Path) -> Vec<String> {
        let append = self.kernel_cmdline();
        let mut args: Vec<String> = ["-accel", "tcg", "-machine", "pc", "-m"]
            .into_iter()
            .map(String::from)
            .collect();
        args.push(self.memory_mib.to_string());
        args.extend(
            [
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-kernel",
            ]
            .map(String::from),
        );
        args.push(self.kernel.display().to_string());
        args.push("-initrd".into());
        args.push(self.initramfs.display().to_string());
        args.push("-append".into());
        args.push(append);
        args.push("-chardev".into());
        args.push(format!("file,id=ninja-serial,path={}", serial.display()));
        args.extend(["-serial", "chardev:ninja-serial"].map(String::from));
        args.extend(self.args.iter().cloned());
        args
    }
}

impl QemuConfig {
    /// The guest kernel's command line: the serial console, what the guest runs, the extra
    /// kernel arguments.
    pub fn kernel_cmdline(&self) -> String {
        let mut append = String::from("console=ttyS0 panic=-1 quiet");
        if let Some(run) = &self.guest_run {
            append.push_str(" ninja.run=");
            append.push_str(run);
        }
        for arg in &self.kernel_args {
            append.push(' ');
            append.push_str(arg);
        }
        append
    }

    /// The same machine as a transient libvirt domain `name` (TCG, `pc`, the fixtures booted
    /// directly, the serial console appended to `serial`, the SymVirt virtio-serial channel as
    /// libvirt's own unix socket), with `devices` (device XML) added. QEMU arguments given
    /// with [`QemuConfig::args`] are not carried over.
    pub fn libvirt_domain_xml(&self, name: &str, serial: &Path, devices: &str) -> String {
        let esc = |s: &str| {
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
        };
        format!(
            "<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{emulator}</emulator>
    <serial type='file'><source path='{serial}' append='on'/><target port='0'/></serial>
    <channel type='unix'><source mode='bind'/><target type='virtio' name='org.symvirt.0'/></channel>
    <memballoon model='none'/>
    {devices}
  </devices>
</domain>
",
            memory = self.memory_mib,
            kernel = esc(&self.kernel.display().to_string()),
            initrd = esc(&self.initramfs.display().to_string()),
            cmdline = esc(&self.kernel_cmdline()),
            emulator = QEMU_PATH,
            serial = esc(&serial.display().to_string()),
        )
    }
}

/// Where libvirt finds QEMU (it wants a path).
const QEMU_PATH: &str = "/usr/bin/qemu-system-x86_64";

/// A running QEMU process. Dropping it kills the process and removes its files.
#[derive(Debug)]
pub struct Qemu {
    child: Child,
    dir: PathBuf,
    qmp: PathBuf,
    serial: PathBuf,
}

fn unique_dir() -> io::Result<PathBuf> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("ninja-qemu-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}

impl Qemu {
    /// Starts QEMU and waits until its QMP socket accepts connections (not negotiated yet).
    pub fn start(config: QemuConfig) -> io::Result<Qemu> {
        let dir = unique_dir()?;
        let qmp = dir.join("qmp.sock");
        let serial = dir.join("serial.log");
        let program = config.program();
        let mut cmd = Command::new(&program[0]);
        cmd.args(&program[1..])
            .args(config.machine_args(&serial))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", qmp.display()));
        if let Some(uri) = &config.incoming {
            cmd.args(["-incoming", uri]);
        }
        let log = fs::File::create(dir.join("qemu.log"))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn()?;
        let mut vm = Qemu {
            child,
            dir,
            qmp,
            serial,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            // The QMP probe takes QMP's one client slot; QEMU frees it when we close it. An
            // `-incoming tcp:` listener comes up after QMP, and probing it would start a migration,
            // so it is looked for in /proc/net/tcp instead.
            let incoming_ready = match config.incoming.as_deref().and_then(tcp_port_of) {
                Some(port) => tcp_listening(port),
                None => true,
            };
            if incoming_ready && std::os::unix::net::UnixStream::connect(&vm.qmp).is_ok() {
                return Ok(vm);
            }
            if let Some(status) = vm.child.try_wait()? {
                return Err(io::Error::other(format!(
                    "qemu exited ({status}) before its QMP socket was ready: {}",
                    vm.qemu_log()
                )));
            }
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("qemu QMP socket not ready in 20 s: {}", vm.qemu_log()),
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The QMP unix socket.
    pub fn qmp_path(&self) -> &Path {
        &self.qmp
    }

    /// The serial console log file.
    pub fn serial_path(&self) -> &Path {
        &self.serial
    }

    /// A directory that lives as long as this QEMU, for extra sockets and files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The QEMU process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the guest has printed on its serial console so far.
    pub fn serial(&self) -> String {
        fs::read(&self.serial)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// What QEMU itself printed (errors, warnings).
    pub fn qemu_log(&self) -> String {
        fs::read_to_string(self.dir.join("qemu.log")).unwrap_or_default()
    }

    /// Waits until the serial log contains `needle`; returns the log. The error says what the
    /// guest printed last and whether QEMU died.
    pub fn wait_serial(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        self.wait_serial_until(|log| log.contains(needle), timeout)
            .map_err(|e| format!("waiting for {needle:?}: {e}"))
    }

    /// Waits until `done(serial log)` holds; returns the log.
    pub fn wait_serial_until(
        &mut self,
        mut done: impl FnMut(&str) -> bool,
        timeout: Duration,
    ) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.serial();
            if done(&log) {
                return Ok(log);
            }
            if !self.is_running() {
                return Err(format!(
                    "qemu exited; qemu log: {}; serial tail: {}",
                    self.qemu_log().trim(),
                    tail(&log, 10)
                ));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "timed out after {timeout:?}; serial tail: {}",
                    tail(&log, 10)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether the QEMU process is still alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Kills QEMU (SIGKILL) and reaps it. Idempotent.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Hot-adds the passthrough HCA STAND-IN as a scheduler would assign a VF: an
    /// `ivshmem-plain` device `hca0` on a 1 MiB shared `memory-backend-file` `hca0-mem` at
    /// `mem_path` (under /dev/shm; the caller removes it). While it is attached QEMU refuses to
    /// migrate, as with a VFIO device. Opens and closes its own QMP connection (QMP serves one
    /// client at a time).
    pub fn add_hca_standin(&self, mem_path: &Path) -> Result<(), String> {
        let mut qmp = crate::RawQmp::connect(self.qmp_path())?;
        qmp.execute(
            "object-add",
            serde_json::json!({"qom-type": "memory-backend-file", "id": "hca0-mem",
                "size": 1 << 20, "mem-path": mem_path, "share": true}),
        )?;
        qmp.execute(
            "device_add",
            serde_json::json!({"driver": "ivshmem-plain", "id": "hca0", "memdev": "hca0-mem"}),
        )?;
        Ok(())
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.kill();
        if std::env::var_os("NINJA_KEEP_TEMP").is_none() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// The port of a `tcp:HOST:PORT` migration URI.
fn tcp_port_of(uri: &str) -> Option<u16> {
    uri.strip_prefix("tcp:")?.rsplit(':').next()?.parse().ok()
}

/// Whether some socket listens on `port` (IPv4 or IPv6), read from /proc/net/tcp{,6}.
fn tcp_listening(port: u16) -> bool {
    const LISTEN: &str = "0A";
    let wanted = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        fs::read_to_string(table).is_ok_and(|text| {
            text.lines().skip(1).any(|line| {
                let cols: Vec<&str> = line.split_whitespace().collect();
                cols.len() > 3 && cols[1].ends_with(&wanted) && cols[3] == LISTEN
            })
        })
    })
}

/// The last `n` lines of `log`, joined with " | ".
fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

/// A TCP port on 127.0.0.1 that was free a moment ago, below the kernel's ephemeral range.
///
/// Tests hand the port to a process that binds it later (`-incoming`, `migrate-incoming`). An
/// OS-assigned port (bind to port 0) comes from the ephemeral range, which outgoing connections
/// also draw their local ports from, so one of those could take it in between; ports below the
/// range are only ever taken by an explicit bind. Candidates are spread by process id and a
/// counter so concurrent tests rarely try the same one, and each is checked by binding it.
pub fn free_tcp_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (low, high) = (20000u32, ephemeral_start().clamp(20001, 32768));
    let span = high - low;
    let seed = std::process::id().wrapping_mul(2_654_435_761);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = low + (seed.wrapping_add(n.wrapping_mul(7919)) % span);
        if TcpListener::bind(("127.0.0.1", port as u16)).is_ok() {
            return port as u16;
        }
    }
    panic!("no free TCP port in {low}..{high}");
}

/// The first port of the kernel's ephemeral range (32768 if it cannot be read).
fn ephemeral_start() -> u32 {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_bindable_and_below_the_ephemeral_range() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let port = free_tcp_port();
            assert!(u32::from(port) < ephemeral_start(), "{port}");
            assert!(TcpListener::bind(("127.0.0.1", port)).is_ok());
            seen.insert(port);
        }
        assert!(
            seen.len() > 40,
            "ports should rarely repeat: {}",
            seen.len()
        );
    }
}
