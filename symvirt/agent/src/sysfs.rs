//! What the guest agent reads from sysfs: its PCI devices, the interface that has a MAC
//! address, whether the interconnect the host names is there, and the device node of a named
//! virtio-serial port. Each function takes the sysfs
//! directory it reads so tests can point it at a fake tree.

use std::fs;
use std::path::{Path, PathBuf};
use symvirt_proto::protocol::{Interconnect, MAX_PCI_DEVICES, PciDevice, is_pci_address};

/// Where the kernel lists PCI functions.
pub const PCI_DEVICES_DIR: &str = "/sys/bus/pci/devices";
/// Where the kernel lists network interfaces.
pub const NET_DIR: &str = "/sys/class/net";
/// Where the kernel lists verbs (InfiniBand) devices, once a verbs driver is loaded.
pub const INFINIBAND_DIR: &str = "/sys/class/infiniband";
/// Where the kernel lists virtio-serial ports.
pub const VIRTIO_PORTS_DIR: &str = "/sys/class/virtio-ports";
/// Where udev (or the fixtures' init) links named virtio-serial ports.
pub const VIRTIO_PORT_LINKS: &str = "/dev/virtio-ports";

fn read_hex(path: &Path) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    let t = text.trim();
    u64::from_str_radix(t.strip_prefix("0x").unwrap_or(t), 16).ok()
}

/// The PCI functions under `dir` (normally [`PCI_DEVICES_DIR`]), sorted by address, at most
/// [`MAX_PCI_DEVICES`]; entries whose files cannot be read are skipped.
pub fn pci_devices(dir: &Path) -> Vec<PciDevice> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut devices: Vec<PciDevice> = entries
        .flatten()
        .filter_map(|e| {
            let address = e.file_name().into_string().ok()?;
            if !is_pci_address(&address) {
                return None;
            }
            let p = e.path();
            Some(PciDevice {
                vendor: u16::try_from(read_hex(&p.join("vendor"))?).ok()?,
                device: u16::try_from(read_hex(&p.join("device"))?).ok()?,
                class: u32::try_from(read_hex(&p.join("class"))?).ok()?,
                address,
            })
        })
        .collect();
    devices.sort_by(|a, b| a.address.cmp(&b.address));
    devices.truncate(MAX_PCI_DEVICES);
    devices
}

/// The interface under `dir` (normally [`NET_DIR`]) whose MAC address is `mac`.
pub fn interface_with_mac(dir: &Path, mac: &str) -> Option<String> {
    fs::read_dir(dir).ok()?.flatten().find_map(|e| {
        let address = fs::read_to_string(e.path().join("address")).ok()?;
        (address.trim().eq_ignore_ascii_case(mac))
            .then(|| e.file_name().into_string().ok())
            .flatten()
    })
}

/// The sysfs directories [`find_interconnect`] looks in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysDirs {
    /// Normally [`PCI_DEVICES_DIR`].
    pub pci: PathBuf,
    /// Normally [`NET_DIR`].
    pub net: PathBuf,
    /// Normally [`INFINIBAND_DIR`].
    pub infiniband: PathBuf,
}

impl Default for SysDirs {
    fn default() -> Self {
        SysDirs {
            pci: PCI_DEVICES_DIR.into(),
            net: NET_DIR.into(),
            infiniband: INFINIBAND_DIR.into(),
        }
    }
}

/// Checks that the guest sees `interconnect`, filling in an Ethernet interface name from its
/// MAC; `Err` says what is missing. A hot-plugged device appears some time after the host
/// plugged it, so callers retry for a while.
///
/// What is checked: the PCI address when one is given; for Ethernet, the interface (by name,
/// or the one with the MAC); for InfiniBand, the verbs device, when the guest has a verbs
/// stack at all (without one, [`INFINIBAND_DIR`] is absent and the HCA name cannot be checked).
pub fn find_interconnect(
    interconnect: &mut Interconnect,
    dirs: &SysDirs,
) -> std::result::Result<(), String> {
    let pci = match interconnect {
        Interconnect::Ethernet { pci, .. } | Interconnect::Infiniband { pci, .. } => pci.clone(),
    };
    if let Some(address) = pci {
        if !dirs.pci.join(&address).exists() {
            return Err(format!("no PCI device {address}"));
        }
    }
    match interconnect {
        Interconnect::Ethernet { mac, iface, .. } => match iface {
            Some(name) if dirs.net.join(name.as_str()).exists() => Ok(()),
            Some(name) => Err(format!("no network interface {name}")),
            None => {
                *iface = interface_with_mac(&dirs.net, mac);
                iface
                    .as_ref()
                    .map(|_| ())
                    .ok_or_else(|| format!("no network interface has mac {mac}"))
            }
        },
        Interconnect::Infiniband { hca, .. } => {
            if dirs.infiniband.is_dir() && !dirs.infiniband.join(hca.as_str()).exists() {
                Err(format!("no verbs device {hca}"))
            } else {
                Ok(())
            }
        }
    }
}

/// The device node of the virtio-serial port called `name`: the link in `links`
/// (normally [`VIRTIO_PORT_LINKS`]) if there is one, else found by scanning `ports`
/// (normally [`VIRTIO_PORTS_DIR`]) for a port whose `name` file says `name` (a port hot-plugged
/// after boot has no link), as `dev/<vportNpM>`.
pub fn virtio_port(name: &str, links: &Path, ports: &Path, dev: &Path) -> Option<PathBuf> {
    let link = links.join(name);
    if link.exists() {
        return Some(link);
    }
    fs::read_dir(ports).ok()?.flatten().find_map(|e| {
        let port_name = fs::read_to_string(e.path().join("name")).ok()?;
        (port_name.trim() == name).then(|| dev.join(e.file_name()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("symvirt-sysfs-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn write(path: PathBuf, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    #[test]
    fn reads_pci_devices_like_the_kernel_lists_them() {
        let d = temp_dir("pci");
        for (addr, v, dv, c) in [
            ("0000:00:04.0", "0x1af4", "0x1000", "0x020000"),
            ("0000:00:03.0", "0x1af4", "0x1110", "0x050000"),
        ] {
            write(d.join(addr).join("vendor"), &format!("{v}\n"));
            write(d.join(addr).join("device"), &format!("{dv}\n"));
            write(d.join(addr).join("class"), &format!("{c}\n"));
        }
        write(d.join("not-a-device").join("vendor"), "0x1\n");
        write(d.join("0000:00:05.0").join("vendor"), "garbage\n");
        let got = pci_devices(&d);
        assert_eq!(
            got,
            vec![
                PciDevice {
                    address: "0000:00:03.0".into(),
                    vendor: 0x1af4,
                    device: 0x1110,
                    class: 0x050000
                },
                PciDevice {
                    address: "0000:00:04.0".into(),
                    vendor: 0x1af4,
                    device: 0x1000,
                    class: 0x020000
                },
            ]
        );
        assert!(pci_devices(&d.join("missing")).is_empty());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn this_machines_pci_bus_is_read_completely() {
        let dir = Path::new(PCI_DEVICES_DIR);
        let Ok(entries) = fs::read_dir(dir) else {
            return; // no sysfs PCI in this container: covered by the fake tree above
        };
        let listed = entries.count().min(MAX_PCI_DEVICES);
        assert_eq!(pci_devices(dir).len(), listed);
    }

    #[test]
    fn finds_interface_by_mac_and_port_by_name() {
        let d = temp_dir("net");
        write(d.join("net/eth0/address"), "52:54:00:00:00:01\n");
        write(d.join("net/eth1/address"), "52:54:00:00:00:02\n");
        assert_eq!(
            interface_with_mac(&d.join("net"), "52:54:00:00:00:02").as_deref(),
            Some("eth1")
        );
        assert_eq!(
            interface_with_mac(&d.join("net"), "52:54:00:00:00:03"),
            None
        );

        write(d.join("ports/vport1p1/name"), "org.other\n");
        write(d.join("ports/vport2p1/name"), "org.symvirt.0\n");
        let (links, ports, dev) = (d.join("links"), d.join("ports"), d.join("dev"));
        assert_eq!(
            virtio_port("org.symvirt.0", &links, &ports, &dev),
            Some(dev.join("vport2p1"))
        );
        write(links.join("org.symvirt.0"), "");
        assert_eq!(
            virtio_port("org.symvirt.0", &links, &ports, &dev),
            Some(links.join("org.symvirt.0"))
        );
        assert_eq!(virtio_port("org.none", &links, &ports, &dev), None);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn an_interconnect_is_found_only_when_the_guest_sees_it() {
        let d = temp_dir("ic");
        let dirs = SysDirs {
            pci: d.join("pci"),
            net: d.join("net"),
            infiniband: d.join("infiniband"),
        };
        let mut eth = Interconnect::Ethernet {
            mac: "52:54:00:00:00:02".into(),
            iface: None,
            pci: None,
        };
        assert_eq!(
            find_interconnect(&mut eth, &dirs),
            Err("no network interface has mac 52:54:00:00:00:02".into())
        );
        // The NIC's driver bound: the interface appears and its name is filled in.
        write(d.join("net/eth1/address"), "52:54:00:00:00:02\n");
        assert_eq!(find_interconnect(&mut eth, &dirs), Ok(()));
        assert!(matches!(&eth, Interconnect::Ethernet { iface: Some(i), .. } if i == "eth1"));
        // A name the host gave must exist; so must a PCI address.
        let mut named = Interconnect::Ethernet {
            mac: "52:54:00:00:00:02".into(),
            iface: Some("eth7".into()),
            pci: None,
        };
        assert!(find_interconnect(&mut named, &dirs).is_err());
        let mut ib = Interconnect::Infiniband {
            hca: "mlx5_0".into(),
            port: 1,
            pci: Some("0000:00:05.0".into()),
        };
        assert_eq!(
            find_interconnect(&mut ib, &dirs),
            Err("no PCI device 0000:00:05.0".into())
        );
        write(d.join("pci/0000:00:05.0/vendor"), "0x15b3\n");
        // No verbs stack in the guest: the HCA name cannot be checked, the device is there.
        assert_eq!(find_interconnect(&mut ib, &dirs), Ok(()));
        // With one, the verbs device must be listed.
        fs::create_dir_all(d.join("infiniband/mlx5_1")).unwrap();
        assert_eq!(
            find_interconnect(&mut ib, &dirs),
            Err("no verbs device mlx5_0".into())
        );
        fs::create_dir_all(d.join("infiniband/mlx5_0")).unwrap();
        assert_eq!(find_interconnect(&mut ib, &dirs), Ok(()));
        let _ = fs::remove_dir_all(&d);
    }
}
