//! A VM that libvirt manages, driven through libvirt (feature `libvirt`): the plan names a
//! daemon's URI and a domain instead of QMP and channel sockets.
//!
//! - The guest channel is the domain's `org.symvirt.0` virtio-serial channel, opened through
//!   the libvirt connection (`virDomainOpenChannel`), so a remote daemon's guests are reached
//!   over the same `qemu+ssh://` or `qemu+tls://` connection, with no socket of our own. Two
//!   threads copy between the libvirt stream and one end of a socket pair; the other end is the
//!   [`HostChannel`]'s.
//! - Devices are plugged and unplugged as device XML ([`super::libvirt_xml`]); an unplug is
//!   waited for until the device is gone from the live XML. Nothing is plugged into a slot the
//!   run has unplugged a device from (on an i440fx root bus; elsewhere libvirt chooses): a
//!   guest asked to eject twice before it ejected once (a NIC plugged and unplugged within
//!   milliseconds, as a rollback does) holds a stale eject request for the slot, and Linux
//!   ejects whatever sits there when it gets to it. Seen here: the HCA re-attached by a
//!   rollback disappeared from the guest a moment later, in 4 of 38 runs of the test.
//! - The migration is libvirt's peer-to-peer live migration: the source daemon makes the
//!   destination domain from the source's XML (its passthrough devices are unplugged by then)
//!   on the daemon the plan's destination URI names.
//!
//! **The switchover.** libvirt has no pause-before-switchover for its callers: its migration
//! ends with the destination started and the source gone. So each VM migrates with
//! `VIR_MIGRATE_PAUSED`: when its migration completes, the domain is paused at the destination
//! (its source QEMU has ended), and [`VmBackend::switchover`] resumes it once every VM of the
//! plan has got that far. The guests are quiesced, so a VM paused while another still copies
//! sends nothing the other could miss, and the job resumes everywhere in one step. The cost is
//! the rollback: a VM whose migration completed has no source any more, so rolling it back
//! migrates it back (paused, so a single pass) and re-attaches its devices there.

use super::libvirt_xml::{
    PciSlot, alias, at_root_slot, blocking_devices, check_device, device_xml, find_device,
    free_root_slot, mac_of, pci_slot, with_link, without_address, without_devices,
};
use super::{MigrationProgress, MigrationResult, VmBackend};
use crate::cluster::{LibvirtDomain, MigrationSettings, VmSpec};
use crate::error::{Error, Result};
use crate::host_channel::{ChannelOptions, HostChannel};
use crate::protocol::DEFAULT_PORT_NAME;
use crate::session::GuestSession;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use virt::connect::Connect;
use virt::domain::{Domain, JobStats, MigrateParameters};
use virt::stream::Stream;
use virt::sys;

/// How often a wait looks again (a device gone, a migration's progress).
const POLL: Duration = Duration::from_millis(50);

/// One VM of a plan as a libvirt domain.
pub struct LibvirtVm {
    spec: VmSpec,
    settings: MigrationSettings,
    source: LibvirtDomain,
    destination: LibvirtDomain,
    source_conn: Option<Connect>,
    destination_conn: Option<Connect>,
    /// The source's devices as they were when unplugged (with their addresses), in order.
    detached: Vec<String>,
    /// The migration running in its own thread (libvirt's call blocks until it ends).
    migration: Option<JoinHandle<std::result::Result<(), virt::error::Error>>>,
    /// The migration completed: the domain is (paused or running) at the destination and gone
    /// at the source.
    moved: bool,
    /// Aliases of the devices plugged at the destination.
    attached: Vec<String>,
    /// The guest's PCI slots this run unplugged a device from, at either end: nothing is
    /// plugged into them again (see [`free_root_slot`]).
    vacated: Vec<PciSlot>,
    /// Aliases of the source's standby NICs whose link this run took down.
    links_down: Vec<String>,
    /// Aliases of the destination's standby NICs whose link this run brought up.
    links_up: Vec<String>,
    /// The source's persistent definition before the move, if it had one: a rollback that
    /// migrates the VM back defines it there again.
    source_definition: Option<String>,
    /// Migrate over TLS (`VIR_MIGRATE_TLS`, the daemons' own certificates).
    tls: bool,
    result: MigrationResult,
}

impl std::fmt::Debug for LibvirtVm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LibvirtVm")
            .field("name", &self.spec.name)
            .field("source", &self.source)
            .field("destination", &self.destination)
            .field("moved", &self.moved)
            .finish()
    }
}

impl Drop for LibvirtVm {
    fn drop(&mut self) {
        // virt's connections are reference-counted by hand: ours end with the backend (domains
        // and channel streams still in use hold their own references).
        let conns = [self.source_conn.take(), self.destination_conn.take()];
        for mut conn in conns.into_iter().flatten() {
            let _ = conn.close();
        }
    }
}

impl LibvirtVm {
    /// The backend of `spec`, whose source and destination must be libvirt domains.
    pub fn new(spec: VmSpec, settings: MigrationSettings) -> Result<LibvirtVm> {
        let (Some(source), Some(destination)) = (
            spec.source.libvirt.clone(),
            spec.destination.libvirt.clone(),
        ) else {
            return Err(Error::Config(format!(
                "{}: not a libvirt domain at both ends",
                spec.name
            )));
        };
        // libvirt prints every error on stderr by default; ours carry them.
        virt::error::clear_error_callback();
        Ok(LibvirtVm {
            spec,
            settings,
            source,
            destination,
            source_conn: None,
            destination_conn: None,
            detached: Vec::new(),
            migration: None,
            moved: false,
            attached: Vec::new(),
            vacated: Vec::new(),
            links_down: Vec::new(),
            links_up: Vec::new(),
            source_definition: None,
            tls: false,
            result: MigrationResult::default(),
        })
    }

    /// Migrates over TLS (`VIR_MIGRATE_TLS`): with the certificates the site gave the libvirt
    /// daemons (`migrate_tls_x509_cert_dir` in their `qemu.conf`).
    pub fn with_tls(mut self, tls: bool) -> LibvirtVm {
        self.tls = tls;
        self
    }

    fn err(&self, at: &LibvirtDomain, what: &str, source: virt::error::Error) -> Error {
        Error::Libvirt {
            what: format!("{} at {}: {what}", self.spec.name, at.uri),
            source,
        }
    }

    fn open(&self, at: &LibvirtDomain) -> Result<Connect> {
        Connect::open(Some(&at.uri)).map_err(|e| self.err(at, "connect", e))
    }

    fn source_domain(&mut self) -> Result<Domain> {
        if self.source_conn.is_none() {
            self.source_conn = Some(self.open(&self.source.clone())?);
        }
        let conn = self.source_conn.as_ref().ok_or(Error::NotConnected)?;
        Domain::lookup_by_name(conn, &self.source.domain)
            .map_err(|e| self.err(&self.source, "look up the domain", e))
    }

    fn destination_connection(&mut self) -> Result<&Connect> {
        if self.destination_conn.is_none() {
            self.destination_conn = Some(self.open(&self.destination.clone())?);
        }
        self.destination_conn.as_ref().ok_or(Error::NotConnected)
    }

    /// The domain at the destination, if the daemon has it.
    fn destination_domain(&mut self) -> Result<Option<Domain>> {
        let name = self.destination.domain.clone();
        let conn = self.destination_connection()?;
        match Domain::lookup_by_name(conn, &name) {
            Ok(d) => Ok(Some(d)),
            Err(e) if e.code() == virt::error::ErrorNumber::NoDomain => Ok(None),
            Err(e) => Err(self.err(&self.destination, "look up the domain", e)),
        }
    }

    fn live_xml(&self, at: &LibvirtDomain, domain: &Domain) -> Result<String> {
        domain
            .get_xml_desc(0)
            .map_err(|e| self.err(at, "read the domain XML", e))
    }

    fn find(&self, at: &LibvirtDomain, domain: &Domain, alias: &str) -> Result<Option<String>> {
        let xml = self.live_xml(at, domain)?;
        find_device(&xml, alias).map_err(|e| Error::Refused(format!("{}: {e}", self.spec.name)))
    }

    /// Unplugs the device `element` (aliased `alias`) and waits until it is gone: libvirt
    /// returns once it asked, and a guest may take its time to let go.
    fn unplug(
        &self,
        at: &LibvirtDomain,
        domain: &Domain,
        alias: &str,
        element: &str,
        deadline: Instant,
    ) -> Result<()> {
        domain
            .detach_device_flags(element, sys::VIR_DOMAIN_AFFECT_LIVE)
            .map_err(|e| self.err(at, &format!("detach {alias}"), e))?;
        while self.find(at, domain, alias)?.is_some() {
            if Instant::now() >= deadline {
                return Err(Error::Deadline(format!(
                    "{}: {alias} still plugged at {} when the deadline passed",
                    self.spec.name, at.uri
                )));
            }
            std::thread::sleep(POLL);
        }
        Ok(())
    }

    /// Plugs the device `element` into the running domain (and, with `flags`, its definition):
    /// on a `pci-root` bus at a slot this run has not vacated ([`free_root_slot`]); elsewhere
    /// where `element` says, or where libvirt finds room.
    fn plug(
        &self,
        at: &LibvirtDomain,
        domain: &Domain,
        element: &str,
        flags: u32,
        what: &str,
    ) -> Result<()> {
        let refused = |e: String| Error::Refused(format!("{}: {what}: {e}", self.spec.name));
        let xml = self.live_xml(at, domain)?;
        let chosen = free_root_slot(&xml, &self.vacated).map_err(refused)?;
        let placed = match chosen {
            Some(slot) => at_root_slot(element, slot).map_err(refused)?,
            None => element.to_owned(),
        };
        let plugged = domain.attach_device_flags(&placed, flags);
        // The element's own address (a device coming back where it was) may be taken by now:
        // then wherever there is room. A slot chosen above was free; a failure there is the
        // device's own, and without an address libvirt could pick a slot this run vacated.
        if plugged.is_err() && chosen.is_none() && pci_slot(&placed).is_some() {
            let bare = without_address(&placed).map_err(refused)?;
            if domain.attach_device_flags(&bare, flags).is_ok() {
                return Ok(());
            }
        }
        plugged.map(drop).map_err(|e| self.err(at, what, e))
    }

    /// Switches the link of the standby NIC aliased `alias` (the domain's from boot).
    fn set_link(&self, at: &LibvirtDomain, domain: &Domain, alias: &str, up: bool) -> Result<()> {
        let element = self.find(at, domain, alias)?.ok_or_else(|| {
            Error::Refused(format!(
                "{}: no NIC aliased {alias:?} at {}",
                self.spec.name, at.uri
            ))
        })?;
        let xml = with_link(&element, up)
            .map_err(|e| Error::Refused(format!("{}: {alias}: {e}", self.spec.name)))?;
        let state = if up { "up" } else { "down" };
        domain
            .update_device_flags(&xml, sys::VIR_DOMAIN_AFFECT_LIVE)
            .map_err(|e| self.err(at, &format!("link {state} on {alias}"), e))?;
        Ok(())
    }

    fn state(&self, at: &LibvirtDomain, domain: &Domain) -> Result<sys::virDomainState> {
        domain
            .get_state()
            .map(|(state, _)| state)
            .map_err(|e| self.err(at, "read the run state", e))
    }

    fn resume(&self, at: &LibvirtDomain, domain: &Domain) -> Result<()> {
        if self.state(at, domain)? == sys::VIR_DOMAIN_PAUSED {
            domain.resume().map_err(|e| self.err(at, "resume", e))?;
        }
        Ok(())
    }

    /// Opens the domain's SymVirt channel through libvirt (a one-shot channel: when the
    /// domain's QEMU ends, the controller asks for a new one).
    fn channel(
        &self,
        conn: &Connect,
        domain: &Domain,
        label: String,
        continuing: Option<GuestSession>,
    ) -> Result<HostChannel> {
        let ours = open_channel(conn, domain, &label)?;
        let options = ChannelOptions::labelled(label);
        match continuing {
            None => HostChannel::from_stream(ours, options),
            Some(session) => HostChannel::from_stream_continuing(ours, options, session),
        }
    }

    /// Waits for the migration thread and says how it ended.
    fn join_migration(&mut self) -> Result<()> {
        let Some(thread) = self.migration.take() else {
            return Ok(());
        };
        match thread.join() {
            Ok(Ok(())) => {
                self.moved = true;
                Ok(())
            }
            Ok(Err(e)) => Err(self.err(&self.source.clone(), "migrate", e)),
            Err(_) => Err(Error::Internal("the migration thread panicked".into())),
        }
    }

    /// Moves the domain back from the destination (after its migration completed): paused
    /// there first, so one pass copies it; then it is the source's again.
    fn migrate_back(&mut self, deadline: Instant) -> Result<()> {
        let Some(domain) = self.destination_domain()? else {
            // Gone from the destination: back at the source already, or lost.
            self.moved = false;
            return Ok(());
        };
        let at = self.destination.clone();
        for alias in std::mem::take(&mut self.attached) {
            if let Some(element) = self.find(&at, &domain, &alias)? {
                self.unplug(&at, &domain, &alias, &element, deadline)?;
                self.vacated.extend(pci_slot(&element));
            }
        }
        for alias in std::mem::take(&mut self.links_up) {
            self.set_link(&at, &domain, &alias, false)?;
        }
        if self.state(&at, &domain)? == sys::VIR_DOMAIN_RUNNING {
            domain.suspend().map_err(|e| self.err(&at, "pause", e))?;
        }
        let mut flags = self.flags();
        if self.destination.persistent {
            // The definition made there goes.
            flags |= sys::VIR_MIGRATE_UNDEFINE_SOURCE;
        }
        if self.source_definition.is_some() {
            flags |= sys::VIR_MIGRATE_PERSIST_DEST;
        }
        let params = MigrateParameters {
            uri: self.source.migrate_uri.as_deref().and_then(migration_uri),
            persist_xml: self.source_definition.clone(),
            ..Default::default()
        };
        domain
            .migrate_to_uri3(Some(&self.source.uri), params, flags)
            .map_err(|e| self.err(&at, "migrate back to the source", e))?;
        self.moved = false;
        Ok(())
    }

    fn flags(&self) -> u32 {
        let tls = if self.tls { sys::VIR_MIGRATE_TLS } else { 0 };
        sys::VIR_MIGRATE_LIVE | sys::VIR_MIGRATE_PEER2PEER | sys::VIR_MIGRATE_PAUSED | tls
    }

    fn progress(&self, domain: &Domain) -> Option<MigrationProgress> {
        let stats = job_stats(domain, 0)?;
        Some(MigrationProgress {
            transferred: stats.data_processed.or(stats.mem_processed)?,
            remaining: stats.data_remaining.or(stats.mem_remaining).unwrap_or(0),
            total: stats.data_total.or(stats.mem_total).unwrap_or(0),
        })
    }
}

/// libvirt's statistics of the domain's current job (`flags` 0) or of its last completed one
/// (`VIR_DOMAIN_JOB_STATS_COMPLETED`); None when there are none. (virt 0.4.3's
/// `Domain::get_job_stats` makes a `Vec` of the null pointer libvirt returns for no statistics.)
fn job_stats(domain: &Domain, flags: u32) -> Option<JobStats> {
    let mut kind: libc::c_int = 0;
    let mut params: sys::virTypedParameterPtr = std::ptr::null_mut();
    let mut count: libc::c_int = 0;
    // SAFETY: `domain` is a valid reference; the out-pointers are to locals; libvirt allocates
    // the parameter array it returns in `params`.
    let ret = unsafe {
        sys::virDomainGetJobStats(domain.as_ptr(), &mut kind, &mut params, &mut count, flags)
    };
    if ret < 0 || params.is_null() {
        return None;
    }
    let stats = (count > 0).then(|| {
        // SAFETY: libvirt returned `count` initialized parameters at `params`.
        let copied = unsafe { std::slice::from_raw_parts(params, count as usize) }.to_vec();
        // Copies every value out (strings included) before the array is freed below.
        JobStats::from((kind, copied))
    });
    // SAFETY: frees, once, the array (and its strings) libvirt allocated.
    unsafe { sys::virTypedParamsFree(params, count) };
    stats
}

/// The plan's `tcp:HOST:PORT` or `unix:PATH` as libvirt's migration URI (`tcp://HOST:PORT`,
/// `unix://PATH`).
fn migration_uri(plan_uri: &str) -> Option<String> {
    let (scheme, rest) = plan_uri.split_once(':')?;
    Some(format!("{scheme}://{rest}"))
}

/// Opens `domain`'s SymVirt channel (taking it from any other client) as a stream, and
/// returns the controller's end of a socket pair that two threads copy to and from it. The
/// copy ends (and the stream is aborted) when either side closes.
fn open_channel(conn: &Connect, domain: &Domain, label: &str) -> Result<UnixStream> {
    let failed = |source| Error::Libvirt {
        what: format!("{label}: open channel {DEFAULT_PORT_NAME}"),
        source,
    };
    let stream = Stream::new(conn, 0).map_err(failed)?;
    domain
        .open_channel(
            Some(DEFAULT_PORT_NAME),
            &stream,
            sys::VIR_DOMAIN_CHANNEL_FORCE,
        )
        .map_err(failed)?;
    bridge(stream, label)
}

fn bridge(stream: Stream, label: &str) -> Result<UnixStream> {
    let (ours, theirs) = UnixStream::pair().map_err(|e| Error::io("socketpair", e))?;
    let mut to_host = theirs
        .try_clone()
        .map_err(|e| Error::io("clone the channel socket", e))?;
    let mut from_host = theirs;
    let inbound = stream.clone();
    std::thread::Builder::new()
        .name(format!("lv-chan-in-{label}"))
        .spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = inbound.recv(&mut buf) {
                if to_host.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = to_host.shutdown(std::net::Shutdown::Both);
        })
        .map_err(|e| Error::io("spawn channel thread", e))?;
    std::thread::Builder::new()
        .name(format!("lv-chan-out-{label}"))
        .spawn(move || {
            let mut buf = [0u8; 4096];
            'copy: while let Ok(n @ 1..) = from_host.read(&mut buf) {
                let mut sent = 0;
                while sent < n {
                    match stream.send(&buf[sent..n]) {
                        Ok(k @ 1..) => sent += k,
                        _ => break 'copy,
                    }
                }
            }
            // Wakes the inbound thread's blocking receive, if it still waits.
            let _ = stream.abort();
        })
        .map_err(|e| Error::io("spawn channel thread", e))?;
    Ok(ours)
}

impl VmBackend for LibvirtVm {
    fn name(&self) -> &str {
        &self.spec.name
    }

    fn connect(
        &mut self,
        continuing: Option<GuestSession>,
        _deadline: Instant,
    ) -> Result<HostChannel> {
        let domain = self.source_domain()?;
        let conn = self.source_conn.as_ref().ok_or(Error::NotConnected)?;
        self.channel(conn, &domain, self.spec.name.clone(), continuing)
    }

    fn reserve(&mut self, _deadline: Instant) -> Result<()> {
        let domain = self.source_domain()?;
        let at = self.source.clone();
        if self.state(&at, &domain)? != sys::VIR_DOMAIN_RUNNING {
            return Err(Error::Refused(format!(
                "{}: the domain does not run at {}",
                self.spec.name, at.uri
            )));
        }
        let xml = self.live_xml(&at, &domain)?;
        for d in &self.spec.source.devices {
            let a = alias(d.id());
            if find_device(&xml, &a)
                .map_err(|e| Error::Refused(format!("{}: {e}", self.spec.name)))?
                .is_none()
            {
                return Err(Error::Refused(format!(
                    "{}: the domain at {} has no device aliased {a:?} to detach",
                    self.spec.name, at.uri
                )));
            }
        }
        // What libvirt would refuse to migrate is refused now, before any VM lets go of a
        // device.
        let ids: Vec<&str> = self.spec.source.devices.iter().map(|d| d.id()).collect();
        let blocking = blocking_devices(&xml, &ids)
            .map_err(|e| Error::Refused(format!("{}: {e}", self.spec.name)))?;
        if !blocking.is_empty() {
            return Err(Error::Refused(format!(
                "{}: libvirt cannot migrate the domain with {} attached, and the plan does not \
                 detach it",
                self.spec.name,
                blocking.join(", ")
            )));
        }
        for d in &self.spec.destination.devices {
            check_device(d).map_err(|e| Error::Refused(format!("{}: {e}", self.spec.name)))?;
        }
        // A standby NIC migrates with the domain: it is in the source's XML, with its MAC.
        let standby = self
            .spec
            .source
            .devices
            .iter()
            .chain(&self.spec.destination.devices);
        for d in standby.filter(|d| d.is_standby()) {
            let a = alias(d.id());
            let element = find_device(&xml, &a)
                .map_err(|e| Error::Refused(format!("{}: {e}", self.spec.name)))?;
            let has = element.as_deref().and_then(mac_of);
            if has.as_deref() != d.mac() {
                return Err(Error::Refused(format!(
                    "{}: the domain's standby NIC {a:?} has mac {}, the plan says {}",
                    self.spec.name,
                    has.as_deref().unwrap_or("none"),
                    d.mac().unwrap_or_default()
                )));
            }
        }
        if let Some(there) = self.destination_domain()? {
            if there.is_active().unwrap_or(true) {
                return Err(Error::Refused(format!(
                    "{}: a domain {:?} already runs at {}",
                    self.spec.name, self.destination.domain, self.destination.uri
                )));
            }
        }
        Ok(())
    }

    fn detach(&mut self, deadline: Instant) -> Result<()> {
        let domain = self.source_domain()?;
        let at = self.source.clone();
        for d in self.spec.source.devices.clone() {
            let a = alias(d.id());
            if d.is_standby() {
                self.set_link(&at, &domain, &a, false)?;
                self.links_down.push(a);
                continue;
            }
            let Some(element) = self.find(&at, &domain, &a)? else {
                continue;
            };
            self.unplug(&at, &domain, &a, &element, deadline)?;
            self.vacated.extend(pci_slot(&element));
            self.detached.push(element);
        }
        Ok(())
    }

    fn start_migration(&mut self) -> Result<()> {
        let domain = self.source_domain()?;
        let at = self.source.clone();
        if let Some(ms) = self.settings.downtime_limit_ms {
            domain
                .migrate_set_max_downtime(ms, 0)
                .map_err(|e| self.err(&at, "set the downtime limit", e))?;
        }
        if domain.is_persistent().unwrap_or(false) {
            let flags = sys::VIR_DOMAIN_XML_INACTIVE | sys::VIR_DOMAIN_XML_MIGRATABLE;
            let definition = domain
                .get_xml_desc(flags)
                .map_err(|e| self.err(&at, "read the domain's definition", e))?;
            self.source_definition = Some(definition);
        }
        let mut flags = self.flags();
        let mut persist_xml = None;
        if self.destination.persistent {
            flags |= sys::VIR_MIGRATE_PERSIST_DEST;
            // The definition the destination keeps: the source's (or, for a transient domain,
            // what runs) without the devices the plan detached.
            let definition = match &self.source_definition {
                Some(d) => d.clone(),
                None => domain
                    .get_xml_desc(sys::VIR_DOMAIN_XML_MIGRATABLE)
                    .map_err(|e| self.err(&at, "read the domain XML", e))?,
            };
            // A standby NIC stays: only its link was switched.
            let detached: Vec<String> = self
                .spec
                .source
                .devices
                .iter()
                .filter(|d| !d.is_standby())
                .map(|d| alias(d.id()))
                .collect();
            persist_xml = Some(
                without_devices(&definition, &detached)
                    .map_err(|e| Error::Refused(format!("{}: {e}", self.spec.name)))?,
            );
        }
        if self.destination.undefine_source {
            flags |= sys::VIR_MIGRATE_UNDEFINE_SOURCE;
        }
        let params = MigrateParameters {
            uri: self
                .destination
                .migrate_uri
                .as_deref()
                .and_then(migration_uri),
            // libvirt takes MiB/s.
            bandwidth: self.settings.max_bandwidth.map(|b| (b >> 20).max(1)),
            persist_xml,
            ..Default::default()
        };
        let to = self.destination.uri.clone();
        let thread = std::thread::Builder::new()
            .name(format!("lv-migrate-{}", self.spec.name))
            .spawn(move || domain.migrate_to_uri3(Some(&to), params, flags))
            .map_err(|e| Error::io("spawn the migration thread", e))?;
        self.migration = Some(thread);
        Ok(())
    }

    fn wait_ready_to_switch(
        &mut self,
        deadline: Instant,
        progress: &mut dyn FnMut(MigrationProgress),
        stop: &dyn Fn() -> bool,
    ) -> Result<()> {
        let domain = self.source_domain()?;
        loop {
            if self.migration.as_ref().is_none_or(JoinHandle::is_finished) {
                self.join_migration()?;
                break;
            }
            let give_up = if stop() {
                Some(Error::Interrupted)
            } else if Instant::now() >= deadline {
                Some(Error::Deadline(format!(
                    "{}: migration not complete when the deadline passed",
                    self.spec.name
                )))
            } else {
                None
            };
            if let Some(e) = give_up {
                // SAFETY: `domain` is a valid domain reference for the call's duration.
                unsafe { sys::virDomainAbortJob(domain.as_ptr()) };
                let _ = self.join_migration();
                return Err(e);
            }
            if let Some(p) = self.progress(&domain) {
                progress(p);
            }
            std::thread::sleep(POLL);
        }
        // Paused at the destination, its source ended.
        let at = self.destination.clone();
        let Some(there) = self.destination_domain()? else {
            return Err(Error::Refused(format!(
                "{}: migrated, but {} has no such domain",
                self.spec.name, at.uri
            )));
        };
        if let Some(stats) = job_stats(&there, sys::VIR_DOMAIN_JOB_STATS_COMPLETED) {
            self.result = MigrationResult {
                total_ms: stats.time_elapsed,
                downtime_ms: stats.downtime,
                transferred: stats.data_processed.or(stats.mem_processed).unwrap_or(0),
            };
        }
        Ok(())
    }

    fn switchover(&mut self, deadline: Instant) -> Result<MigrationResult> {
        let at = self.destination.clone();
        let domain = self.destination_domain()?.ok_or(Error::NotConnected)?;
        self.resume(&at, &domain)?;
        while self.state(&at, &domain)? != sys::VIR_DOMAIN_RUNNING {
            if Instant::now() >= deadline {
                return Err(Error::Deadline(format!(
                    "{}: not running at {} after the switchover",
                    self.spec.name, at.uri
                )));
            }
            std::thread::sleep(POLL);
        }
        Ok(self.result)
    }

    fn attach(&mut self, _deadline: Instant) -> Result<()> {
        let at = self.destination.clone();
        let domain = self.destination_domain()?.ok_or(Error::NotConnected)?;
        for d in self.spec.destination.devices.clone() {
            if d.is_standby() {
                let a = alias(d.id());
                self.set_link(&at, &domain, &a, true)?;
                self.links_up.push(a);
                continue;
            }
            let xml =
                device_xml(&d).map_err(|e| Error::Refused(format!("{}: {e}", self.spec.name)))?;
            // A domain defined there keeps the device in its definition too.
            let config = if self.destination.persistent {
                sys::VIR_DOMAIN_AFFECT_CONFIG
            } else {
                0
            };
            let what = format!("attach {}", d.describe());
            self.plug(
                &at,
                &domain,
                &xml,
                sys::VIR_DOMAIN_AFFECT_LIVE | config,
                &what,
            )?;
            self.attached.push(alias(d.id()));
        }
        Ok(())
    }

    fn destination_channel(
        &mut self,
        session: GuestSession,
        _deadline: Instant,
    ) -> Result<HostChannel> {
        let domain = self.destination_domain()?.ok_or(Error::NotConnected)?;
        let conn = self.destination_conn.as_ref().ok_or(Error::NotConnected)?;
        self.channel(
            conn,
            &domain,
            format!("{}@destination", self.spec.name),
            Some(session),
        )
    }

    fn commit(&mut self) -> Result<()> {
        // libvirt ended the source when the migration completed.
        Ok(())
    }

    fn rollback(&mut self, deadline: Instant) -> Result<()> {
        if let Some(thread) = &self.migration {
            if !thread.is_finished() {
                if let Ok(domain) = self.source_domain() {
                    // SAFETY: `domain` is a valid domain reference for the call's duration.
                    unsafe { sys::virDomainAbortJob(domain.as_ptr()) };
                }
            }
            // A migration that completed all the same is moved back below.
            let _ = self.join_migration();
        }
        if self.moved {
            self.migrate_back(deadline)?;
        }
        let domain = self.source_domain()?;
        let at = self.source.clone();
        for element in std::mem::take(&mut self.detached) {
            let a = roxmltree::Document::parse(&element)
                .ok()
                .and_then(|doc| {
                    doc.root_element()
                        .children()
                        .find(|c| c.has_tag_name("alias"))
                        .and_then(|c| c.attribute("name").map(str::to_owned))
                })
                .unwrap_or_default();
            if self.find(&at, &domain, &a)?.is_some() {
                continue;
            }
            // Not into a slot this run vacated (its own included): the guest may still hold a
            // stale eject request for it, which would take the device out again.
            let what = format!("re-attach {a}");
            self.plug(&at, &domain, &element, sys::VIR_DOMAIN_AFFECT_LIVE, &what)?;
            // A rollback that says "ok" has given the guest its device back.
            if self.find(&at, &domain, &a)?.is_none() {
                return Err(Error::Refused(format!(
                    "{}: {a} re-attached at {}, but not in the domain's live XML",
                    self.spec.name, at.uri
                )));
            }
        }
        for a in std::mem::take(&mut self.links_down) {
            self.set_link(&at, &domain, &a, true)?;
        }
        self.resume(&at, &domain)
    }
}
