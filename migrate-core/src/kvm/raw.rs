//! Raw KVM ioctls and mappings that kvm-ioctls does not wrap: enabling manual dirty-log
//! protection, `KVM_CLEAR_DIRTY_LOG`, the per-vCPU dirty ring (enable, mmap, harvest) and
//! `KVM_RESET_DIRTY_RINGS`. Every `unsafe` block of the crate's KVM side lives here.

use crate::{Error, Result};
use kvm_bindings::{
    KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE, KVM_DIRTY_LOG_PAGE_OFFSET,
    KVMIO, kvm_clear_dirty_log, kvm_dirty_gfn, kvm_enable_cap,
};
use kvm_ioctls::VmFd;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use vmm_sys_util::errno;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

/// Request numbers (kernel UAPI `linux/kvm.h`).
mod nr {
    use super::*;
    ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
    ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);
}
use nr::{KVM_CLEAR_DIRTY_LOG, KVM_RESET_DIRTY_RINGS};

/// A ring entry the kernel has filled and userspace has not yet collected.
const KVM_DIRTY_GFN_F_DIRTY: u32 = 1;
/// A ring entry userspace has collected; `KVM_RESET_DIRTY_RINGS` recycles it.
const KVM_DIRTY_GFN_F_RESET: u32 = 2;

fn kvm_err(op: &'static str, source: errno::Error) -> Error {
    Error::Kvm { op, source }
}

/// Turns on manual dirty-log protection (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`): after it,
/// `KVM_GET_DIRTY_LOG` only reads the bitmap and [`clear_dirty_log`] re-protects pages.
/// Returns false when the kernel lacks the capability (the legacy get-and-clear mode applies).
pub fn enable_manual_dirty_log_protect(vm: &VmFd) -> Result<bool> {
    let supported = vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    if supported <= 0 {
        return Ok(false);
    }
    let mut flags = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE);
    // INITIALLY_SET spares the kernel a write-protect pass over every page when logging starts.
    if supported as u64 & u64::from(KVM_DIRTY_LOG_INITIALLY_SET) != 0 {
        flags |= u64::from(KVM_DIRTY_LOG_INITIALLY_SET);
    }
    let cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        args: [flags, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap)
        .map_err(|e| kvm_err("KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)", e))?;
    Ok(true)
}

/// `KVM_CLEAR_DIRTY_LOG`: clears the dirty bits set in `bitmap` for pages
/// `first_page .. first_page + num_pages` of `slot` and write-protects those pages again.
/// `first_page` must be a multiple of 64; `num_pages` too unless the range ends the slot.
pub fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bitmap: &[u64],
) -> Result<()> {
    if first_page % 64 != 0 || (num_pages as usize).div_ceil(64) > bitmap.len() {
        return Err(Error::Memory(format!(
            "KVM_CLEAR_DIRTY_LOG: bad range (first page {first_page}, {num_pages} pages, {} words)",
            bitmap.len()
        )));
    }
    let mut clear = kvm_clear_dirty_log {
        slot,
        num_pages,
        first_page,
        ..Default::default()
    };
    clear.__bindgen_anon_1.dirty_bitmap = bitmap.as_ptr() as *mut libc::c_void;
    // SAFETY: `vm` is a KVM VM fd and `clear` a valid kvm_clear_dirty_log whose bitmap pointer
    // covers `num_pages` bits (checked above); the kernel only reads the bitmap, which outlives
    // the call. The return value is checked.
    let ret = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
    if ret < 0 {
        return Err(kvm_err("KVM_CLEAR_DIRTY_LOG", errno::Error::last()));
    }
    Ok(())
}

/// Enables the per-vCPU dirty ring with `entries` entries (a power of two). Must run before any
/// vCPU is created. Prefers the ACQ_REL flavour (required on weakly ordered hosts).
pub fn enable_dirty_ring(vm: &VmFd, entries: u32) -> Result<()> {
    let bytes = u64::from(entries) * std::mem::size_of::<kvm_dirty_gfn>() as u64;
    let cap = if vm.check_extension_raw(u64::from(KVM_CAP_DIRTY_LOG_RING_ACQ_REL)) > 0 {
        KVM_CAP_DIRTY_LOG_RING_ACQ_REL
    } else {
        KVM_CAP_DIRTY_LOG_RING
    };
    let max = vm.check_extension_raw(u64::from(cap));
    if max <= 0 {
        return Err(Error::VmControl(
            "this KVM has no dirty ring (KVM_CAP_DIRTY_LOG_RING)".into(),
        ));
    }
    if !entries.is_power_of_two() || bytes > max as u64 {
        return Err(Error::VmControl(format!(
            "dirty ring of {entries} entries ({bytes} bytes) not allowed; KVM's maximum is {max} bytes"
        )));
    }
    let enable = kvm_enable_cap {
        cap,
        args: [bytes, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&enable)
        .map_err(|e| kvm_err("KVM_ENABLE_CAP(DIRTY_LOG_RING)", e))
}

/// `KVM_RESET_DIRTY_RINGS`: lets KVM recycle every collected entry of every ring (and
/// write-protect those pages again). Returns how many entries were reset.
pub fn reset_dirty_rings(vm: &VmFd) -> Result<u32> {
    // SAFETY: `vm` is a KVM VM fd; this ioctl takes no argument. The return value is checked.
    let ret = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if ret < 0 {
        return Err(kvm_err("KVM_RESET_DIRTY_RINGS", errno::Error::last()));
    }
    Ok(ret as u32)
}

/// One vCPU's dirty ring, mapped from its vCPU fd.
#[derive(Debug)]
pub struct DirtyRing {
    entries: *mut kvm_dirty_gfn,
    count: u32,
    /// Next entry to collect (free-running; the ring index is `fetch % count`).
    fetch: u32,
}

// SAFETY: the mapping is process-wide memory shared with the kernel; entries are only touched
// through atomic flag accesses with the acquire/release protocol KVM documents, so moving the
// owner to another thread is sound.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the dirty ring of the vCPU whose fd is `vcpu_fd` (`entries` as passed to
    /// [`enable_dirty_ring`]). The mapping outlives the fd if that is closed first.
    pub fn map(vcpu_fd: RawFd, entries: u32) -> Result<Self> {
        let len = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: sysconf has no memory-safety preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as i64;
        // SAFETY: maps a fresh shared region of `len` bytes from a vCPU fd at the offset KVM
        // defines for the dirty ring; the result is checked before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu_fd,
                i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(Error::Io {
                context: "mmap of the vCPU dirty ring".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(DirtyRing {
            entries: ptr.cast(),
            count: entries,
            fetch: 0,
        })
    }

    /// Collects every filled entry in order, calling `f(slot, page offset in slot)` for each,
    /// and marks them collected. Returns how many were collected; call [`reset_dirty_rings`]
    /// afterwards so KVM can reuse them.
    pub fn harvest(&mut self, mut f: impl FnMut(u32, u64)) -> u32 {
        let mut n = 0;
        loop {
            let idx = (self.fetch % self.count) as usize;
            // SAFETY: idx < count, so the entry lies inside the mapping made in `map`.
            let gfn = unsafe { self.entries.add(idx) };
            // SAFETY: `flags` is a naturally aligned u32 inside the live mapping; the kernel
            // writes it concurrently, so it is only accessed atomically.
            let flags = unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*gfn).flags)) };
            // Acquire pairs with KVM's release store of the flag after it wrote slot/offset.
            if flags.load(Ordering::Acquire) & KVM_DIRTY_GFN_F_DIRTY == 0 {
                break;
            }
            // SAFETY: the entry is owned by userspace while its DIRTY flag is set.
            let (slot, offset) = unsafe { ((*gfn).slot, (*gfn).offset) };
            f(slot, offset);
            flags.store(KVM_DIRTY_GFN_F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
            n += 1;
        }
        n
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let len = self.count as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: unmaps exactly the region mapped in `map`; no reference into it survives.
        unsafe { libc::munmap(self.entries.cast(), len) };
    }
}

/// Raw fd of a kvm-ioctls vCPU (for [`DirtyRing::map`]).
pub fn vcpu_raw_fd(vcpu: &kvm_ioctls::VcpuFd) -> RawFd {
    vcpu.as_raw_fd()
}
