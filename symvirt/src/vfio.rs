//! Passthrough PCI functions for custom VMMs, through VFIO.
//!
//! What a VMM needs before it can hand an HCA's virtual function to a guest: its address
//! ([`Bdf`]), where the kernel lists it (its IOMMU group, its driver: it must be bound to
//! `vfio-pci`), and then, with the `vfio` feature, the VFIO container, group and device
//! opened through `vfio-ioctls` (`VfioPassthrough`), reset between owners, and detached and
//! attached around a migration as the controller's plan says. The address and sysfs parts are
//! always built (plans are checked with them on hosts without VFIO); opening needs the feature
//! and, at run time, /dev/vfio (an IOMMU and the vfio-pci driver).

use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Where the kernel lists PCI devices (under a sysfs root).
pub const PCI_DEVICES: &str = "bus/pci/devices";
/// The driver a passthrough function must be bound to.
pub const VFIO_DRIVER: &str = "vfio-pci";

pub use symvirt_proto::addr::Bdf;

/// A PCI function as sysfs describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SysfsFunction {
    /// Its address.
    pub bdf: Bdf,
    /// Its directory, e.g. `/sys/bus/pci/devices/0000:3b:00.1`.
    pub path: PathBuf,
    /// Its IOMMU group (the unit VFIO hands out: /dev/vfio/GROUP).
    pub iommu_group: u32,
    /// The driver bound to it, if any.
    pub driver: Option<String>,
}

fn link_name(link: &Path) -> Option<String> {
    std::fs::read_link(link)
        .ok()?
        .file_name()?
        .to_str()
        .map(str::to_owned)
}

/// Looks `bdf` up under `sysfs` (normally `/sys`): its directory, IOMMU group and driver.
pub fn resolve(sysfs: &Path, bdf: Bdf) -> Result<SysfsFunction> {
    let path = sysfs.join(PCI_DEVICES).join(bdf.to_string());
    if !path.exists() {
        return Err(Error::Refused(format!(
            "PCI function {bdf}: not found ({} does not exist)",
            path.display()
        )));
    }
    let group = link_name(&path.join("iommu_group")).ok_or_else(|| {
        Error::Refused(format!(
            "PCI function {bdf}: no IOMMU group (is the IOMMU enabled? intel_iommu=on / amd_iommu=on)"
        ))
    })?;
    let iommu_group = group.parse().map_err(|_| {
        Error::Refused(format!(
            "PCI function {bdf}: IOMMU group {group:?} is not a number"
        ))
    })?;
    Ok(SysfsFunction {
        bdf,
        driver: link_name(&path.join("driver")),
        path,
        iommu_group,
    })
}

/// Checks that `function` can be passed through: bound to vfio-pci, its group node present
/// under `dev` (normally `/dev`), and the VFIO container device there.
pub fn check_ready(function: &SysfsFunction, dev: &Path) -> Result<()> {
    let bdf = function.bdf;
    match function.driver.as_deref() {
        Some(VFIO_DRIVER) => {}
        Some(other) => {
            return Err(Error::Refused(format!(
                "PCI function {bdf} is bound to {other}, not {VFIO_DRIVER} (unbind it and write \
                 its vendor and device ids to /sys/bus/pci/drivers/{VFIO_DRIVER}/new_id)"
            )));
        }
        None => {
            return Err(Error::Refused(format!(
                "PCI function {bdf} has no driver; bind it to {VFIO_DRIVER}"
            )));
        }
    }
    let container = dev.join("vfio/vfio");
    if !container.exists() {
        return Err(Error::Refused(format!(
            "VFIO is not available: {} does not exist (load the vfio-pci module)",
            container.display()
        )));
    }
    let group = dev.join(format!("vfio/{}", function.iommu_group));
    if !group.exists() {
        return Err(Error::Refused(format!(
            "PCI function {bdf}: {} does not exist (IOMMU group {} not bound to VFIO)",
            group.display(),
            function.iommu_group
        )));
    }
    Ok(())
}

#[cfg(feature = "vfio")]
pub use open::VfioPassthrough;

#[cfg(feature = "vfio")]
mod open {
    use super::{Bdf, SysfsFunction, check_ready, resolve};
    use crate::error::{Error, Result};
    use migrate_core::vmm::io::IoPortDevice;
    use std::path::Path;
    use std::sync::Arc;
    use vfio_ioctls::{VfioContainer, VfioDevice};

    fn vfio_error(what: String) -> impl FnOnce(vfio_ioctls::VfioError) -> Error {
        move |source| Error::Vfio { what, source }
    }

    /// A passthrough PCI function opened through VFIO (container, group, device), the device a
    /// custom VMM detaches before a migration and attaches after it. Detached, the function is
    /// reset and its device file closed, so the VMM holds nothing of it; attached, it is open
    /// again and reset for its new owner. Mapping its BARs and guest memory for DMA is the
    /// VMM's business (`vfio-ioctls` has the calls).
    pub struct VfioPassthrough {
        function: SysfsFunction,
        device: Option<VfioDevice>,
        container: Arc<VfioContainer>,
    }

    impl std::fmt::Debug for VfioPassthrough {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("VfioPassthrough")
                .field("function", &self.function)
                .field("attached", &self.device.is_some())
                .finish()
        }
    }

    impl VfioPassthrough {
        /// Opens `bdf` (looked up under `sysfs`, its nodes under `dev`: normally `/sys` and
        /// `/dev`), attached and reset.
        pub fn open(bdf: Bdf, sysfs: &Path, dev: &Path) -> Result<VfioPassthrough> {
            let function = resolve(sysfs, bdf)?;
            check_ready(&function, dev)?;
            let container = Arc::new(
                VfioContainer::new(None).map_err(vfio_error("open the VFIO container".into()))?,
            );
            let mut p = VfioPassthrough {
                function,
                device: None,
                container,
            };
            p.attach()?;
            Ok(p)
        }

        /// The function.
        pub fn function(&self) -> &SysfsFunction {
            &self.function
        }

        /// Whether the device is open.
        pub fn is_attached(&self) -> bool {
            self.device.is_some()
        }

        /// Opens the device (if closed) and resets it.
        pub fn attach(&mut self) -> Result<()> {
            if self.device.is_none() {
                let device =
                    VfioDevice::new(&self.function.path, self.container.clone(), false).map_err(
                        vfio_error(format!("open VFIO device {}", self.function.bdf)),
                    )?;
                self.device = Some(device);
            }
            self.reset();
            Ok(())
        }

        /// Resets the device (when it supports reset) and closes it.
        pub fn detach(&mut self) {
            self.reset();
            self.device = None;
        }

        /// Resets the function, if open and resettable.
        pub fn reset(&self) {
            if let Some(d) = &self.device {
                d.reset();
            }
        }

        /// Whether the function supports VFIO migration (v2); `false` when closed.
        pub fn migratable(&self) -> bool {
            self.device
                .as_ref()
                .and_then(|d| d.query_migration_support().ok().flatten())
                .is_some()
        }
    }

    /// Plugged on a reference VMM's I/O bus, a passthrough function claims no I/O ports (its
    /// BARs are memory-mapped by the VMM) but blocks migration unless it supports VFIO
    /// migration, like QEMU's vfio-pci.
    impl IoPortDevice for VfioPassthrough {
        fn handles(&self, _: u16) -> bool {
            false
        }
        fn pio_write(&mut self, _: u16, _: &[u8]) {}
        fn pio_read(&mut self, _: u16, data: &mut [u8]) {
            data.fill(0xff);
        }
        fn migration_blocker(&self) -> Option<String> {
            (!self.migratable()).then(|| {
                format!(
                    "VFIO function {} without migration support",
                    self.function.bdf
                )
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Tree(PathBuf);

    impl Tree {
        fn new(tag: &str) -> Tree {
            let d = std::env::temp_dir().join(format!("symvirt-vfio-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Tree(d)
        }

        /// A sysfs-like tree with one function in `group`, bound to `driver`.
        fn function(&self, bdf: &str, group: Option<u32>, driver: Option<&str>) {
            let sys = self.0.join("sys");
            let real = sys.join("devices/pci0000:3a/0000:3a:00.0").join(bdf);
            std::fs::create_dir_all(&real).unwrap();
            std::fs::create_dir_all(sys.join(PCI_DEVICES)).unwrap();
            std::os::unix::fs::symlink(&real, sys.join(PCI_DEVICES).join(bdf)).unwrap();
            if let Some(g) = group {
                let gdir = sys.join(format!("kernel/iommu_groups/{g}"));
                std::fs::create_dir_all(&gdir).unwrap();
                std::os::unix::fs::symlink(&gdir, real.join("iommu_group")).unwrap();
            }
            if let Some(d) = driver {
                let ddir = sys.join(format!("bus/pci/drivers/{d}"));
                std::fs::create_dir_all(&ddir).unwrap();
                std::os::unix::fs::symlink(&ddir, real.join("driver")).unwrap();
            }
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn sysfs_gives_the_group_and_driver_and_readiness_is_checked() {
        let t = Tree::new("ok");
        t.function("0000:3b:00.1", Some(42), Some("vfio-pci"));
        t.function("0000:3b:00.2", Some(43), Some("mlx5_core"));
        t.function("0000:3b:00.3", None, None);
        let sys = t.0.join("sys");
        let f = resolve(&sys, "0000:3b:00.1".parse().unwrap()).unwrap();
        assert_eq!(f.iommu_group, 42);
        assert_eq!(f.driver.as_deref(), Some("vfio-pci"));
        assert!(f.path.ends_with("0000:3b:00.1"));

        // No /dev/vfio here: a clear error, not a panic.
        let dev = t.0.join("dev");
        std::fs::create_dir_all(&dev).unwrap();
        let e = check_ready(&f, &dev).unwrap_err().to_string();
        assert!(
            e.contains("VFIO is not available") && e.contains("vfio/vfio"),
            "{e}"
        );
        std::fs::create_dir_all(dev.join("vfio")).unwrap();
        std::fs::write(dev.join("vfio/vfio"), b"").unwrap();
        let e = check_ready(&f, &dev).unwrap_err().to_string();
        assert!(e.contains("IOMMU group 42"), "{e}");
        std::fs::write(dev.join("vfio/42"), b"").unwrap();
        check_ready(&f, &dev).unwrap();

        let mlx = resolve(&sys, "0000:3b:00.2".parse().unwrap()).unwrap();
        let e = check_ready(&mlx, &dev).unwrap_err().to_string();
        assert!(e.contains("bound to mlx5_core"), "{e}");
        let e = resolve(&sys, "0000:3b:00.3".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no IOMMU group"), "{e}");
        let e = resolve(&sys, "0000:3b:00.4".parse().unwrap())
            .unwrap_err()
            .to_string();
        assert!(e.contains("not found"), "{e}");
    }

    /// On this machine (no VFIO hardware): opening fails with a clear error.
    #[cfg(feature = "vfio")]
    #[test]
    fn opening_without_vfio_is_a_clear_error() {
        let t = Tree::new("open");
        t.function("0000:3b:00.1", Some(7), Some("vfio-pci"));
        let dev = t.0.join("dev");
        std::fs::create_dir_all(&dev).unwrap();
        let e = VfioPassthrough::open("0000:3b:00.1".parse().unwrap(), &t.0.join("sys"), &dev)
            .unwrap_err()
            .to_string();
        assert!(e.contains("VFIO is not available"), "{e}");
    }
}
