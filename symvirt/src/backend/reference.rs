//! The reference-VMM backend: VMs of `migrate-core`'s reference KVM VMM, run in this process,
//! migrated by `migrate-core`'s pre-copy engine, their guests reached through the SymVirt
//! port-I/O hypercall channel ([`crate::portio`], answered by [`crate::portio_agent`]).
//!
//! A [`ReferenceGuest`] is one such VM as a custom VMM runs it: the KVM VM, the channel device
//! on its I/O bus, the agent role, and the devices plugged on its bus. Passthrough devices are
//! [`HcaStandin`]s here: STAND-INS for a passthrough HCA (no HCA exists on this machine) that,
//! like a VFIO function without migration support, make the VM refuse to migrate while
//! plugged. [`NicStandin`] stands in for a paravirtual NIC (migratable).
//!
//! [`ReferenceVm`]'s home ([`GuestHome`]) is shared with the caller: it holds the source until
//! the plan commits, then the destination, so whoever started the VM keeps reaching it.
//! Destinations are started in this process when the plan reserves them, listening on the
//! plan's `migrate_uri` (`tcp:HOST:PORT` or `unix:PATH`). The synchronized switchover: the
//! engine pauses the source for its final round; the backend's pause holds there, source
//! paused, until the controller lets every VM switch over together (or cancels).
//!
//! The plan's monitor and channel addresses are not used: this backend reaches its VMs
//! in-process.

use crate::backend::{MigrationProgress, MigrationResult, VmBackend};
use crate::checkpoint::{SavedState, StateFormat};
use crate::cluster::{Device, VmSpec};
use crate::error::{Error, Result};
use crate::host_channel::{ChannelOptions, HostChannel};
use crate::portio::{DEFAULT_BASE, PortIoDevice};
use crate::portio_agent::PortIoAgent;
use crate::session::GuestSession;
use crossbeam_channel::Receiver;
use migrate_core::dirty::DirtyTracker;
use migrate_core::transport::{self, Endpoint, Listener};
use migrate_core::vm::{GuestMemory, IncomingVm, MigratableVm};
use migrate_core::vmm::io::IoPortDevice;
use migrate_core::vmm::{ReferenceVm, VmmConfig};
use migrate_core::{MigrationConfig, MigrationReport, Progress, destination, snapshot, source};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// First I/O port of the stand-in devices (four ports each, in plan order).
pub const STANDIN_PORTS: u16 = 0x0f40;
/// How long an in-process destination waits for its source.
const ACCEPT_PATIENCE: Duration = Duration::from_secs(600);
/// What an [`HcaStandin`] reads as on every port.
pub const HCA_STANDIN_SIGNATURE: u8 = 0xb1;

fn vmm(e: migrate_core::Error) -> Error {
    Error::Vmm(Box::new(e))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A STAND-IN for a passthrough HCA on a custom VMM (no HCA exists here): four I/O ports that
/// read as [`HCA_STANDIN_SIGNATURE`]. Like a VFIO function without migration support it makes
/// the VM refuse to migrate while it is plugged. Real deployments pass a VFIO device
/// (`crate::vfio`, behind the `vfio` feature).
#[derive(Debug)]
pub struct HcaStandin {
    base: u16,
}

impl IoPortDevice for HcaStandin {
    fn handles(&self, port: u16) -> bool {
        (self.base..self.base + 4).contains(&port)
    }
    fn pio_write(&mut self, _: u16, _: &[u8]) {}
    fn pio_read(&mut self, _: u16, data: &mut [u8]) {
        data.fill(HCA_STANDIN_SIGNATURE);
    }
    fn migration_blocker(&self) -> Option<String> {
        Some("passthrough HCA stand-in: no migration support (as a VFIO function)".into())
    }
}

/// A STAND-IN for a paravirtual NIC: four I/O ports that read as its MAC address. Migratable.
#[derive(Debug)]
pub struct NicStandin {
    base: u16,
    mac: [u8; 6],
}

impl IoPortDevice for NicStandin {
    fn handles(&self, port: u16) -> bool {
        (self.base..self.base + 4).contains(&port)
    }
    fn pio_write(&mut self, _: u16, _: &[u8]) {}
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        for (i, d) in data.iter_mut().enumerate() {
            *d = self.mac[(usize::from(port - self.base) + i) % 6];
        }
    }
}

/// A plan's address (checked when the plan was read) as this backend takes it.
fn parse_addr<T: std::str::FromStr<Err = symvirt_proto::Error>>(s: &str) -> Result<T> {
    s.parse()
        .map_err(|e: symvirt_proto::Error| Error::Config(e.to_string()))
}

/// One reference VM as a custom VMM runs it: the KVM VM, its SymVirt port-I/O channel and the
/// agent role answering for the guest.
#[derive(Debug)]
pub struct ReferenceGuest {
    name: String,
    vm: Arc<ReferenceVm>,
    channel: Arc<Mutex<PortIoDevice>>,
    /// The host end of the channel before anyone connected.
    host_end: Option<UnixStream>,
    agent: Option<PortIoAgent>,
}

impl ReferenceGuest {
    /// Builds a reference VM named `name`, plugs the SymVirt channel at
    /// [`crate::portio::DEFAULT_BASE`], starts the agent role and runs the guest.
    pub fn start(name: &str, config: VmmConfig) -> Result<ReferenceGuest> {
        let vm = Arc::new(ReferenceVm::new(config).map_err(vmm)?);
        let mut guest = Self::wire(name, vm)?;
        guest.start_agent()?;
        guest.vm.resume().map_err(vmm)?;
        Ok(guest)
    }

    /// The same VM, parked and empty, for a migration to fill (channel plugged, so the guest
    /// finds it when it runs; the agent role starts once it does).
    fn incoming(name: &str, config: VmmConfig) -> migrate_core::Result<ReferenceGuest> {
        let vm = Arc::new(ReferenceVm::new_incoming(config)?);
        Self::wire(name, vm).map_err(|e| migrate_core::Error::VmControl(e.chain()))
    }

    fn wire(name: &str, vm: Arc<ReferenceVm>) -> Result<ReferenceGuest> {
        let (device, host_end) = PortIoDevice::new(DEFAULT_BASE)?;
        let ports = device.ports();
        let channel = Arc::new(Mutex::new(device));
        vm.io_bus()
            .plug("symvirt0", &ports, Box::new(channel.clone()))
            .map_err(vmm)?;
        Ok(ReferenceGuest {
            name: name.to_owned(),
            vm,
            channel,
            host_end: Some(host_end),
            agent: None,
        })
    }

    fn start_agent(&mut self) -> Result<()> {
        if self.agent.is_none() {
            self.agent = Some(PortIoAgent::start(
                self.vm.clone(),
                &self.name,
                DEFAULT_BASE,
            )?);
        }
        Ok(())
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The KVM VM (its memory, counters, I/O bus).
    pub fn vm(&self) -> &Arc<ReferenceVm> {
        &self.vm
    }

    /// A host channel to the guest; a new one replaces (closes) the previous one.
    pub fn channel(&mut self, session: Option<GuestSession>) -> Result<HostChannel> {
        let stream = match self.host_end.take() {
            Some(s) => s,
            None => lock(&self.channel).reconnect()?,
        };
        let options = ChannelOptions::labelled(self.name.clone());
        match session {
            None => HostChannel::from_stream(stream, options),
            Some(s) => HostChannel::from_stream_continuing(stream, options, s),
        }
    }

    /// Plugs a stand-in for `device` as the `index`-th device of a plan list.
    pub fn plug(&self, device: &Device, index: usize) -> Result<()> {
        let base = STANDIN_PORTS + 4 * index as u16;
        let ports = [base, base + 1, base + 2, base + 3];
        let boxed: Box<dyn IoPortDevice> = match device {
            Device::HcaStandin { .. } => Box::new(HcaStandin { base }),
            Device::VirtioNet { mac, .. } => Box::new(NicStandin {
                base,
                mac: parse_addr::<symvirt_proto::addr::MacAddr>(mac)?.0,
            }),
            Device::StandbyNic { id, .. } => {
                return Err(Error::Refused(format!(
                    "standby NIC {id}: the reference VMM has no NIC whose link can be switched \
                     (list it as a virtio-net device: a port-I/O stand-in is plugged)"
                )));
            }
            #[cfg(feature = "vfio")]
            Device::VfioPci { host, .. } => Box::new(crate::vfio::VfioPassthrough::open(
                parse_addr(host)?,
                std::path::Path::new("/sys"),
                std::path::Path::new("/dev"),
            )?),
            #[cfg(not(feature = "vfio"))]
            Device::VfioPci { host, .. } => {
                return Err(Error::Refused(format!(
                    "vfio-pci {host}: passthrough needs symvirt's `vfio` feature"
                )));
            }
        };
        self.vm
            .io_bus()
            .plug(device.id(), &ports, boxed)
            .map_err(vmm)
    }

    /// Whether a device named `id` is plugged.
    pub fn has_device(&self, id: &str) -> bool {
        self.vm.io_bus().names().iter().any(|n| n == id)
    }
}

impl IncomingVm for ReferenceGuest {
    fn memory(&self) -> &GuestMemory {
        self.vm.memory()
    }
    fn restore_state(&self, state: &[u8]) -> migrate_core::Result<()> {
        IncomingVm::restore_state(&*self.vm, state)
    }
    fn resume(&self) -> migrate_core::Result<()> {
        IncomingVm::resume(&*self.vm)
    }
}

/// Where a VM lives now: the source until a plan commits, then the destination.
pub type GuestHome = Arc<Mutex<ReferenceGuest>>;

/// Where one VM's migration is at its switchover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Switch {
    Copying,
    /// The source is paused for its final round, waiting for the word.
    Ready,
    Go,
    Cancel,
}

#[derive(Debug)]
struct Switchover {
    state: Mutex<Switch>,
    cv: Condvar,
}

impl Switchover {
    fn new() -> Arc<Switchover> {
        Arc::new(Switchover {
            state: Mutex::new(Switch::Copying),
            cv: Condvar::new(),
        })
    }

    fn set(&self, s: Switch) {
        *lock(&self.state) = s;
        self.cv.notify_all();
    }

    fn get(&self) -> Switch {
        *lock(&self.state)
    }
}

/// The source as the engine sees it: pausing for the final round holds, paused, until the
/// controller lets every VM switch over together (QEMU's `pause-before-switchover`).
struct GatedSource {
    vm: Arc<ReferenceVm>,
    gate: Arc<Switchover>,
}

impl MigratableVm for GatedSource {
    fn memory(&self) -> &GuestMemory {
        self.vm.memory()
    }
    fn dirty_tracker(&self) -> migrate_core::Result<Box<dyn DirtyTracker>> {
        MigratableVm::dirty_tracker(&*self.vm)
    }
    fn pause(&self) -> migrate_core::Result<()> {
        self.vm.pause()?;
        let mut s = lock(&self.gate.state);
        if *s == Switch::Copying {
            *s = Switch::Ready;
            self.gate.cv.notify_all();
        }
        while *s == Switch::Ready {
            s = self.gate.cv.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        match *s {
            Switch::Cancel => Err(migrate_core::Error::VmControl(
                "switchover cancelled by the controller".into(),
            )),
            _ => Ok(()),
        }
    }
    fn resume(&self) -> migrate_core::Result<()> {
        self.vm.resume()
    }
    fn save_state(&self) -> migrate_core::Result<Vec<u8>> {
        MigratableVm::save_state(&*self.vm)
    }
    fn set_throttle(&self, percent: u8) -> migrate_core::Result<()> {
        MigratableVm::set_throttle(&*self.vm, percent)
    }
}

/// An in-process destination: listening, then receiving, then running.
struct Destination {
    stop: Arc<AtomicBool>,
    endpoint: Endpoint,
    thread: Option<JoinHandle<Result<ReferenceGuest>>>,
}

impl Destination {
    fn start(
        name: &str,
        endpoint: Endpoint,
        config: VmmConfig,
        migration: MigrationConfig,
    ) -> Result<Destination> {
        if let Endpoint::Unix(p) = &endpoint {
            let _ = std::fs::remove_file(p);
        }
        let listener = Listener::bind(&endpoint).map_err(vmm)?;
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let name = name.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("symvirt-dst-{name}"))
            .spawn(move || {
                // One accept: a migration's connections arrive together; tearing down
                // cancels it (see `tear_down`).
                let conn = match listener.accept_unless(ACCEPT_PATIENCE, &thread_stop) {
                    Err(migrate_core::Error::Migration { source, .. })
                        if matches!(*source, migrate_core::Error::Cancelled) =>
                    {
                        return Err(Error::Refused("destination torn down".into()));
                    }
                    other => other.map_err(vmm)?,
                };
                if thread_stop.load(Ordering::SeqCst) {
                    return Err(Error::Refused("destination torn down".into()));
                }
                let (mut guest, _) = destination::receive(conn, &migration, |layout| {
                    config.check_layout(layout)?;
                    ReferenceGuest::incoming(&name, config.clone())
                })
                .map_err(vmm)?;
                guest.start_agent()?;
                Ok(guest)
            })
            .map_err(|e| Error::io("spawn the destination", e))?;
        Ok(Destination {
            stop,
            endpoint,
            thread: Some(thread),
        })
    }

    /// Waits for the received guest (running).
    fn join(&mut self) -> Result<ReferenceGuest> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .unwrap_or_else(|_| Err(Error::Internal("the destination thread panicked".into()))),
            None => Err(Error::Refused("destination already gone".into())),
        }
    }

    /// Stops listening (or receiving) and drops whatever arrived.
    fn tear_down(&mut self) {
        // An accept waiting for a source that will not come sees the flag and ends.
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Endpoint::Unix(p) = &self.endpoint {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for Destination {
    fn drop(&mut self) {
        self.tear_down();
    }
}

/// One VM of a plan on the reference VMM.
pub struct ReferenceBackend {
    spec: VmSpec,
    home: GuestHome,
    destination_config: VmmConfig,
    migration: MigrationConfig,
    memory_connections: usize,
    destination: Option<Destination>,
    gate: Arc<Switchover>,
    running: Option<JoinHandle<migrate_core::Result<MigrationReport>>>,
    progress: Option<Receiver<Progress>>,
    memory_bytes: u64,
    arrived: Option<ReferenceGuest>,
    detached: bool,
    /// The source was saved to a file (and stays paused until a rollback or the end).
    saved: bool,
}

/// What [`ReferenceBackend`]'s save names as the writer of its files.
const SNAPSHOT_WRITER: &str = "ninja-snapshot";

impl std::fmt::Debug for ReferenceBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReferenceBackend")
            .field("vm", &self.spec.name)
            .finish_non_exhaustive()
    }
}

impl ReferenceBackend {
    /// The backend for `spec`, whose VM lives in `home`; its destination is built with
    /// `destination_config` (a different memory layout is refused at the handshake).
    pub fn new(
        spec: VmSpec,
        home: GuestHome,
        destination_config: VmmConfig,
        migration: MigrationConfig,
    ) -> ReferenceBackend {
        ReferenceBackend {
            spec,
            home,
            destination_config,
            migration,
            memory_connections: 2,
            destination: None,
            gate: Switchover::new(),
            running: None,
            progress: None,
            memory_bytes: 0,
            arrived: None,
            detached: false,
            saved: false,
        }
    }

    fn endpoint(&self) -> Result<Endpoint> {
        self.spec
            .destination
            .migrate_uri
            .parse()
            .map_err(|e| Error::Config(format!("{}: migrate_uri: {e}", self.spec.name)))
    }

    fn plug_all(guest: &ReferenceGuest, devices: &[Device]) -> Result<()> {
        for (i, d) in devices.iter().enumerate() {
            if !guest.has_device(d.id()) {
                guest.plug(d, i)?;
            }
        }
        Ok(())
    }

    fn cancel_migration(&mut self) -> Option<String> {
        let t = self.running.take()?;
        self.gate.set(Switch::Cancel);
        match t.join() {
            Ok(Ok(_)) => Some("migration finished while being cancelled".into()),
            Ok(Err(_)) | Err(_) => None,
        }
    }
}

impl VmBackend for ReferenceBackend {
    fn name(&self) -> &str {
        &self.spec.name
    }

    fn connect(
        &mut self,
        continuing: Option<GuestSession>,
        _deadline: Instant,
    ) -> Result<HostChannel> {
        lock(&self.home).channel(continuing)
    }

    fn reserve(&mut self, _deadline: Instant) -> Result<()> {
        {
            let home = lock(&self.home);
            for d in &self.spec.source.devices {
                if !home.has_device(d.id()) {
                    return Err(Error::Refused(format!(
                        "{} is not plugged at the source",
                        d.describe()
                    )));
                }
            }
        }
        self.destination = Some(Destination::start(
            &self.spec.name,
            self.endpoint()?,
            self.destination_config.clone(),
            self.migration.clone(),
        )?);
        Ok(())
    }

    fn detach(&mut self, _deadline: Instant) -> Result<()> {
        let home = lock(&self.home);
        self.detached = true;
        for d in &self.spec.source.devices {
            if home.vm.io_bus().unplug(d.id()).is_none() {
                return Err(Error::Refused(format!(
                    "{} was not plugged at the source",
                    d.describe()
                )));
            }
        }
        Ok(())
    }

    fn start_migration(&mut self) -> Result<()> {
        let endpoint = self.endpoint()?;
        let vm = lock(&self.home).vm.clone();
        self.memory_bytes = vm.config().mem_size;
        let source = GatedSource {
            vm,
            gate: self.gate.clone(),
        };
        let migration = self.migration.clone();
        let connections = self.memory_connections;
        let (tx, rx) = crossbeam_channel::bounded(64);
        self.progress = Some(rx);
        self.gate.set(Switch::Copying);
        self.running = Some(
            std::thread::Builder::new()
                .name(format!("symvirt-mig-{}", self.spec.name))
                .spawn(move || {
                    let conn =
                        transport::connect(&endpoint, connections, migration.handshake_timeout)?;
                    let on_progress = |p: &Progress| {
                        let _ = tx.try_send(p.clone());
                    };
                    source::migrate(&source, conn, &migration, Some(&on_progress))
                })
                .map_err(|e| Error::io("spawn the migration", e))?,
        );
        Ok(())
    }

    fn wait_ready_to_switch(
        &mut self,
        deadline: Instant,
        progress: &mut dyn FnMut(MigrationProgress),
        stop: &dyn Fn() -> bool,
    ) -> Result<()> {
        let mut transferred = 0u64;
        loop {
            if stop() {
                return Err(Error::Interrupted);
            }
            if let Some(rx) = &self.progress {
                while let Ok(p) = rx.try_recv() {
                    if let Progress::Round(r) = p {
                        transferred += r.bytes;
                        progress(MigrationProgress {
                            transferred,
                            remaining: r.dirty_pages_found * migrate_core::dirty::PAGE_SIZE,
                            total: self.memory_bytes,
                        });
                    }
                }
            }
            if self.gate.get() == Switch::Ready {
                return Ok(());
            }
            if self.running.as_ref().is_some_and(JoinHandle::is_finished) {
                let t = self.running.take().expect("checked above");
                return match t.join() {
                    Ok(Err(e)) => Err(vmm(e)),
                    Ok(Ok(_)) => Err(Error::Refused(
                        "the migration ended without waiting for the switchover".into(),
                    )),
                    Err(_) => Err(Error::Internal("the migration thread panicked".into())),
                };
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn switchover(&mut self, _deadline: Instant) -> Result<MigrationResult> {
        let t = self
            .running
            .take()
            .ok_or_else(|| Error::Refused("no migration to switch over".into()))?;
        self.gate.set(Switch::Go);
        let report = t
            .join()
            .map_err(|_| Error::Internal("the migration thread panicked".into()))?
            .map_err(vmm)?;
        let arrived = self
            .destination
            .as_mut()
            .ok_or_else(|| Error::Refused("no destination".into()))?
            .join()?;
        self.arrived = Some(arrived);
        Ok(MigrationResult {
            total_ms: Some(report.total_ms.round() as u64),
            downtime_ms: Some(report.downtime_ms.round() as u64),
            transferred: report.bytes_sent,
        })
    }

    fn attach(&mut self, _deadline: Instant) -> Result<()> {
        let arrived = self
            .arrived
            .as_ref()
            .ok_or_else(|| Error::Refused("the VM has not arrived".into()))?;
        Self::plug_all(arrived, &self.spec.destination.devices)
    }

    fn destination_channel(
        &mut self,
        session: GuestSession,
        _deadline: Instant,
    ) -> Result<HostChannel> {
        self.arrived
            .as_mut()
            .ok_or_else(|| Error::Refused("the VM has not arrived".into()))?
            .channel(Some(session))
    }

    fn save(&mut self, path: &std::path::Path, _deadline: Instant) -> Result<SavedState> {
        let vm = lock(&self.home).vm.clone();
        self.saved = true;
        snapshot::save(&*vm, path).map_err(vmm)?;
        Ok(SavedState {
            format: StateFormat {
                writer: SNAPSHOT_WRITER.into(),
                capabilities: Vec::new(),
            },
            disks: Vec::new(),
        })
    }

    fn restore(
        &mut self,
        format: &StateFormat,
        path: &std::path::Path,
        _deadline: Instant,
    ) -> Result<()> {
        if format.writer != SNAPSHOT_WRITER {
            return Err(Error::Checkpoint {
                path: path.to_owned(),
                problem: format!(
                    "saved by {:?}, which the reference VMM cannot read",
                    format.writer
                ),
            });
        }
        let config = self.destination_config.clone();
        let name = self.spec.name.clone();
        let mut guest = snapshot::restore(path, |layout| {
            config.check_layout(layout)?;
            ReferenceGuest::incoming(&name, config.clone())
        })
        .map_err(vmm)?;
        guest.start_agent()?;
        guest.vm.resume().map_err(vmm)?;
        self.arrived = Some(guest);
        Ok(())
    }

    fn commit(&mut self) -> Result<()> {
        if self.saved && self.arrived.is_none() {
            // A checkpoint that stops the job: the saved source stays paused, with nothing
            // plugged, until its owner drops it.
            return Ok(());
        }
        let arrived = self
            .arrived
            .take()
            .ok_or_else(|| Error::Refused("nothing to commit".into()))?;
        // The source (paused since the switchover) goes; the VM lives at the destination.
        let source = std::mem::replace(&mut *lock(&self.home), arrived);
        drop(source);
        self.destination = None;
        Ok(())
    }

    fn rollback(&mut self, _deadline: Instant) -> Result<()> {
        self.saved = false;
        let mut problems = Vec::new();
        if let Some(p) = self.cancel_migration() {
            problems.push(p);
        }
        // A destination that ran (the failure came after the switchover) is dropped: the
        // guest was parked at its pause point there, so the source's memory is still current.
        if let Some(arrived) = self.arrived.take() {
            let _ = arrived.vm.pause();
        }
        if let Some(mut d) = self.destination.take() {
            d.tear_down();
        }
        let home = lock(&self.home);
        if self.detached {
            if let Err(e) = Self::plug_all(&home, &self.spec.source.devices) {
                problems.push(format!("re-plugging the source's devices: {}", e.chain()));
            }
        }
        if let Err(e) = home.vm.resume() {
            problems.push(format!("resuming the source: {e}"));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Refused(problems.join("; ")))
        }
    }
}
