//! Port-I/O devices of the reference VMM: what a guest's `in`/`out` reach besides the
//! program's own heartbeat ports.
//!
//! A VMM that emulates its devices itself plugs them in here: the SymVirt port-I/O channel
//! (`symvirt::portio`), passthrough devices and their stand-ins. Every vCPU thread routes its
//! `KVM_EXIT_IO` exits through the one [`IoBus`] of its VM; a port no device claims reads as
//! all ones and ignores writes, as on a PC. Devices can be plugged and unplugged while the VM
//! runs (hot-plug); one whose [`IoPortDevice::migration_blocker`] says so makes the VM refuse
//! to migrate while it is plugged, as a VFIO device without migration support does.

use std::sync::{Arc, Mutex, MutexGuard};

/// A device on the guest's I/O port space. Called from vCPU threads, one access at a time.
pub trait IoPortDevice: Send {
    /// Whether `port` is one of this device's.
    fn handles(&self, port: u16) -> bool;
    /// A guest `out` of `data` to `port`.
    fn pio_write(&mut self, port: u16, data: &[u8]);
    /// A guest `in` from `port`: fill `data`.
    fn pio_read(&mut self, port: u16, data: &mut [u8]);
    /// Why the VM cannot migrate while this device is plugged, if it cannot.
    fn migration_blocker(&self) -> Option<String> {
        None
    }
}

/// A device shared between the bus and whoever else drives it (its host side).
impl<T: IoPortDevice> IoPortDevice for Arc<Mutex<T>> {
    fn handles(&self, port: u16) -> bool {
        lock(self).handles(port)
    }
    fn pio_write(&mut self, port: u16, data: &[u8]) {
        lock(self).pio_write(port, data)
    }
    fn pio_read(&mut self, port: u16, data: &mut [u8]) {
        lock(self).pio_read(port, data)
    }
    fn migration_blocker(&self) -> Option<String> {
        lock(self).migration_blocker()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

struct Plugged {
    name: String,
    device: Box<dyn IoPortDevice>,
}

/// The devices on one VM's I/O port space.
#[derive(Default)]
pub struct IoBus {
    devices: Mutex<Vec<Plugged>>,
}

impl std::fmt::Debug for IoBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBus")
            .field("devices", &self.names())
            .finish()
    }
}

impl IoBus {
    /// Plugs `device` in under `name`; refused when the name is taken or one of `ports`
    /// already belongs to another device.
    pub fn plug(
        &self,
        name: &str,
        ports: &[u16],
        device: Box<dyn IoPortDevice>,
    ) -> crate::Result<()> {
        let mut devices = lock(&self.devices);
        if let Some(p) = devices
            .iter()
            .find(|p| p.name == name || ports.iter().any(|&port| p.device.handles(port)))
        {
            return Err(crate::Error::VmControl(format!(
                "cannot plug {name}: {} is plugged on the same name or ports",
                p.name
            )));
        }
        devices.push(Plugged {
            name: name.to_owned(),
            device,
        });
        Ok(())
    }

    /// Unplugs the device named `name`; returns it (None when there is none).
    pub fn unplug(&self, name: &str) -> Option<Box<dyn IoPortDevice>> {
        let mut devices = lock(&self.devices);
        let i = devices.iter().position(|p| p.name == name)?;
        Some(devices.remove(i).device)
    }

    /// The plugged devices' names, in plug order.
    pub fn names(&self) -> Vec<String> {
        lock(&self.devices).iter().map(|p| p.name.clone()).collect()
    }

    /// The first plugged device that forbids migration, and why.
    pub fn migration_blocker(&self) -> Option<String> {
        lock(&self.devices).iter().find_map(|p| {
            p.device
                .migration_blocker()
                .map(|why| format!("device {}: {why}", p.name))
        })
    }

    /// A guest `out`; returns whether a device took it.
    pub fn write(&self, port: u16, data: &[u8]) -> bool {
        let mut devices = lock(&self.devices);
        match devices.iter_mut().find(|p| p.device.handles(port)) {
            Some(p) => {
                p.device.pio_write(port, data);
                true
            }
            None => false,
        }
    }

    /// A guest `in`; a port nobody claims reads as all ones.
    pub fn read(&self, port: u16, data: &mut [u8]) {
        let mut devices = lock(&self.devices);
        match devices.iter_mut().find(|p| p.device.handles(port)) {
            Some(p) => p.device.pio_read(port, data),
            None => data.fill(0xff),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Latch {
        port: u16,
        value: u8,
        blocks: bool,
    }

    impl IoPortDevice for Latch {
        fn handles(&self, port: u16) -> bool {
            port == self.port
        }
        fn pio_write(&mut self, _: u16, data: &[u8]) {
            self.value = data[0];
        }
        fn pio_read(&mut self, _: u16, data: &mut [u8]) {
            data.fill(self.value);
        }
        fn migration_blocker(&self) -> Option<String> {
            self.blocks.then(|| "not migratable".into())
        }
    }

    #[test]
    fn routes_by_port_and_unclaimed_ports_read_all_ones() {
        let bus = IoBus::default();
        let latch = Latch {
            port: 0x10,
            value: 0,
            blocks: false,
        };
        bus.plug("a", &[0x10], Box::new(latch)).unwrap();
        assert!(bus.write(0x10, &[7]));
        assert!(!bus.write(0x11, &[7]));
        let mut b = [0u8; 2];
        bus.read(0x10, &mut b);
        assert_eq!(b, [7, 7]);
        bus.read(0x11, &mut b);
        assert_eq!(b, [0xff, 0xff]);
        assert_eq!(bus.migration_blocker(), None);
    }

    #[test]
    fn names_and_ports_are_exclusive_and_blockers_are_reported() {
        let bus = IoBus::default();
        let mk = |port, blocks| {
            Box::new(Latch {
                port,
                value: 0,
                blocks,
            })
        };
        bus.plug("hca0", &[0x20], mk(0x20, true)).unwrap();
        assert!(bus.plug("hca0", &[0x30], mk(0x30, false)).is_err());
        assert!(bus.plug("other", &[0x20], mk(0x20, false)).is_err());
        assert_eq!(
            bus.migration_blocker().as_deref(),
            Some("device hca0: not migratable")
        );
        assert!(bus.unplug("hca0").is_some());
        assert!(bus.unplug("hca0").is_none());
        assert_eq!(bus.migration_blocker(), None);
        assert!(bus.names().is_empty());
    }
}
