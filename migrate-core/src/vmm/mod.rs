//! The reference VMM: a small KVM VMM whose guest dirties memory, migratable by this crate.
//!
//! [`ReferenceVm::new`] builds guest memory (vm-memory regions, one KVM slot each), an
//! in-kernel irqchip where KVM offers one, and [`VmmConfig::vcpus`] vCPUs in 64-bit long mode
//! with 2 MiB identity pages, each running the built-in program of [`guest`]: it sweeps its
//! working set, checks every page still holds what it last wrote, and keeps a counter and a
//! checksum in the status page. [`ReferenceVm::new_incoming`] builds the same VM, parked and
//! empty, for a migration to fill. Both implement [`MigratableVm`] and [`IncomingVm`].
//!
//! ```no_run
//! # fn main() -> migrate_core::Result<()> {
//! use migrate_core::vmm::{ReferenceVm, VmmConfig};
//! use migrate_core::vm::{IncomingVm, MigratableVm};
//! let src = ReferenceVm::new(VmmConfig::default())?;
//! src.resume()?;
//! src.pause()?;
//! let state = src.save_state()?;
//! let dst = ReferenceVm::new_incoming(VmmConfig::default())?;
//! // ... copy memory (the migration engine does this) ...
//! dst.restore_state(&state)?;
//! dst.resume()?;
//! # Ok(()) }
//! ```

pub mod guest;
pub mod io;
mod rate;
pub mod state;
mod vcpu;

use crate::dirty::{DirtyTracker, PAGE_SIZE};
use crate::kvm::{DirtyLogTracker, DirtyRingTracker, DirtyTracking, KvmVm};
use crate::vm::{GuestMemory, IncomingVm, MigratableVm};
use crate::{Error, Result};
use guest::VcpuBlock;
use io::IoBus;
use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_RUNNABLE, Msrs, kvm_mp_state, kvm_msr_entry, kvm_segment,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use rate::RateGovernor;
use state::{Features, VcpuState, VmState};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vcpu::Vcpu;
use vm_memory::GuestAddress;

/// What reference VM to build.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VmmConfig {
    /// Guest memory in bytes (a multiple of 2 MiB, at most 4 GiB).
    pub mem_size: u64,
    /// Largest memory region (= KVM slot); memory is split into regions of this size.
    pub slot_size: u64,
    /// Number of vCPUs (1..=32).
    pub vcpus: u32,
    /// Working-set pages each vCPU dirties per pass.
    pub working_set_pages: u64,
    /// Spin iterations after each page write: 0 dirties as fast as the vCPU runs.
    pub dirty_delay: u64,
    /// Target dirty rate over all vCPUs in MiB/s: a host thread steers the spin delay towards
    /// it (starting from `dirty_delay`). None leaves the delay fixed.
    #[serde(default)]
    pub dirty_rate_mib_s: Option<u32>,
    /// How KVM reports dirtied pages.
    pub tracking: DirtyTracking,
    /// Entries per vCPU dirty ring (a power of two; dirty ring tracking only).
    #[serde(default = "default_ring_entries")]
    pub dirty_ring_entries: u32,
}

fn default_ring_entries() -> u32 {
    crate::kvm::DIRTY_RING_ENTRIES
}

impl Default for VmmConfig {
    fn default() -> Self {
        VmmConfig {
            mem_size: 32 << 20,
            slot_size: 1 << 30,
            vcpus: 1,
            working_set_pages: 256,
            dirty_delay: 0,
            dirty_rate_mib_s: None,
            tracking: DirtyTracking::DirtyLog,
            dirty_ring_entries: crate::kvm::DIRTY_RING_ENTRIES,
        }
    }
}

impl VmmConfig {
    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::VmControl(format!("bad VMM config: {m}")));
        if self.mem_size == 0 || self.mem_size % (2 << 20) != 0 || self.mem_size > guest::MAX_MEMORY
        {
            return bad(format!(
                "memory {:#x} must be a non-zero multiple of 2 MiB up to {} GiB",
                self.mem_size,
                guest::MAX_MEMORY >> 30
            ));
        }
        if self.slot_size == 0 || self.slot_size % PAGE_SIZE != 0 {
            return bad(format!(
                "slot size {:#x} must be a non-zero multiple of 4 KiB",
                self.slot_size
            ));
        }
        if self.vcpus == 0 || self.vcpus > guest::MAX_VCPUS {
            return bad(format!("{} vCPUs (1..={})", self.vcpus, guest::MAX_VCPUS));
        }
        let end = guest::working_set_base(self.vcpus, self.working_set_pages);
        if end > self.mem_size {
            return bad(format!(
                "working sets end at {end:#x}, beyond memory of {:#x} bytes",
                self.mem_size
            ));
        }
        if end > guest::INTERRUPT_CONTROLLERS_ADDR {
            return bad(format!(
                "working sets end at {end:#x}, past {:#x} where the interrupt controllers \
                 answer instead of memory: at most {} MiB of working set",
                guest::INTERRUPT_CONTROLLERS_ADDR,
                (guest::INTERRUPT_CONTROLLERS_ADDR - guest::WORKING_SET_ADDR) >> 20
            ));
        }
        Ok(())
    }

    /// Checks that a migration's announced memory layout is this configuration's, so a
    /// destination refuses a guest of another shape before any page arrives.
    pub fn check_layout(&self, layout: &crate::protocol::MemoryLayout) -> Result<()> {
        let ours: Vec<(u64, u64)> = self
            .regions()
            .iter()
            .map(|(g, l)| (g.0, *l as u64))
            .collect();
        let theirs: Vec<(u64, u64)> = layout.regions.iter().map(|r| (r.gpa, r.len)).collect();
        if ours == theirs {
            Ok(())
        } else {
            Err(Error::Incompatible(format!(
                "source memory regions {theirs:x?} differ from this VM's {ours:x?}"
            )))
        }
    }

    /// Regions (start, length) as registered with KVM.
    pub fn regions(&self) -> Vec<(GuestAddress, usize)> {
        let mut out = Vec::new();
        let mut start = 0;
        while start < self.mem_size {
            let len = self.slot_size.min(self.mem_size - start);
            out.push((GuestAddress(start), len as usize));
            start += len;
        }
        out
    }
}

/// Whether /dev/kvm can run the reference VMM here; the error says why not.
pub fn kvm_usable() -> std::result::Result<(), String> {
    let kvm = Kvm::new().map_err(|e| format!("cannot open /dev/kvm: {e}"))?;
    if kvm.get_api_version() != 12 {
        return Err(format!("KVM API version {}", kvm.get_api_version()));
    }
    kvm.create_vm()
        .map(|_| ())
        .map_err(|e| format!("KVM_CREATE_VM failed: {e}"))
}

/// A running (or parked) reference VM.
#[derive(Debug)]
pub struct ReferenceVm {
    // Field order: vCPU threads (and their fds) go before the VM and its memory.
    vcpus: Vec<Vcpu>,
    vm: Arc<KvmVm>,
    config: VmmConfig,
    features: Features,
    msr_indices: Arc<Vec<u32>>,
    paused: AtomicBool,
    /// True while paused; held while pausing, resuming, and by the rate governor's writes.
    gate: Arc<Mutex<bool>>,
    bus: Arc<IoBus>,
    _governor: Option<RateGovernor>,
    _kvm: Kvm,
}

impl ReferenceVm {
    /// Builds the VM, installs the guest program and sets every vCPU at its start; the
    /// vCPUs stay paused until [`MigratableVm::resume`].
    pub fn new(config: VmmConfig) -> Result<Self> {
        let vm = Self::build(config)?;
        guest::install(
            vm.memory(),
            vm.config.vcpus,
            vm.config.working_set_pages,
            vm.config.dirty_delay,
        )?;
        for (i, v) in vm.vcpus.iter().enumerate() {
            let irqchip = vm.features.irqchip;
            v.exec(move |fd| boot_registers(fd, i as u32, irqchip))??;
        }
        Ok(vm)
    }

    /// Builds the same VM with empty memory and parked vCPUs, to receive a migration.
    pub fn new_incoming(config: VmmConfig) -> Result<Self> {
        Self::build(config)
    }

    fn build(config: VmmConfig) -> Result<Self> {
        config.validate()?;
        let kvm = Kvm::new().map_err(|source| Error::Kvm {
            op: "open /dev/kvm",
            source,
        })?;
        let memory = GuestMemory::from_ranges(&config.regions())
            .map_err(|e| Error::Memory(format!("allocating {} bytes: {e}", config.mem_size)))?;
        let vm = Arc::new(KvmVm::with_ring_entries(
            &kvm,
            memory,
            config.tracking,
            config.dirty_ring_entries,
        )?);
        let irqchip = match vm.fd().create_irq_chip() {
            Ok(()) => true,
            Err(e) => {
                log::warn!("no in-kernel irqchip ({e}); LAPIC state is not saved");
                false
            }
        };
        let features = Features {
            xsave: kvm.check_extension(Cap::Xsave),
            xcrs: kvm.check_extension(Cap::Xcrs),
            irqchip,
        };
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| Error::Kvm {
                op: "KVM_GET_SUPPORTED_CPUID",
                source,
            })?;
        let mut msr_indices = None;
        let mut vcpus = Vec::new();
        let bus = Arc::new(IoBus::default());
        for i in 0..config.vcpus {
            let fd = vm.create_vcpu(u64::from(i))?;
            for e in cpuid.as_mut_slice() {
                if e.function == 1 {
                    // Initial APIC id in EBX[31:24].
                    e.ebx = (e.ebx & 0x00ff_ffff) | (i << 24);
                }
            }
            fd.set_cpuid2(&cpuid).map_err(|source| Error::Kvm {
                op: "KVM_SET_CPUID2",
                source,
            })?;
            if msr_indices.is_none() {
                msr_indices = Some(Arc::new(probe_msrs(&kvm, &fd)?));
            }
            vcpus.push(Vcpu::spawn(i, fd, vm.clone(), bus.clone())?);
        }
        let gate = Arc::new(Mutex::new(true));
        let governor = match config.dirty_rate_mib_s {
            Some(rate) => Some(
                RateGovernor::start(
                    vm.memory().clone(),
                    config.vcpus,
                    f64::from(rate),
                    gate.clone(),
                )
                .map_err(|source| Error::Io {
                    context: "spawning the dirty rate governor".into(),
                    source,
                })?,
            ),
            None => None,
        };
        Ok(ReferenceVm {
            vcpus,
            vm,
            config,
            features,
            msr_indices: msr_indices.unwrap_or_default(),
            paused: AtomicBool::new(true),
            gate,
            bus,
            _governor: governor,
            _kvm: kvm,
        })
    }

    /// The guest memory.
    pub fn memory(&self) -> &GuestMemory {
        self.vm.memory()
    }

    /// Stops every vCPU; returns when none runs guest code. Idempotent.
    pub fn pause(&self) -> Result<()> {
        let mut gate = self.lock_gate();
        for v in &self.vcpus {
            v.pause()?;
        }
        *gate = true;
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }

    /// Lets every vCPU run. Idempotent.
    pub fn resume(&self) -> Result<()> {
        if let Some(f) = self.failure() {
            return Err(Error::VmControl(format!(
                "cannot resume: a vCPU stopped: {f}"
            )));
        }
        let mut gate = self.lock_gate();
        *gate = false;
        self.paused.store(false, Ordering::SeqCst);
        for v in &self.vcpus {
            v.resume()?;
        }
        Ok(())
    }

    fn lock_gate(&self) -> std::sync::MutexGuard<'_, bool> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The devices on the guest's I/O ports (plug and unplug them here, also while running).
    pub fn io_bus(&self) -> &Arc<IoBus> {
        &self.bus
    }

    /// The configuration the VM was built with.
    pub fn config(&self) -> &VmmConfig {
        &self.config
    }

    /// The KVM VM and its slots.
    pub fn kvm_vm(&self) -> &Arc<KvmVm> {
        &self.vm
    }

    /// The MSRs saved and restored per vCPU.
    pub fn msr_indices(&self) -> &[u32] {
        &self.msr_indices
    }

    /// vCPU `index`'s counter, checksum and error count, read from guest memory.
    pub fn status(&self, index: u32) -> Result<VcpuBlock> {
        VcpuBlock::read(self.vm.memory(), index)
    }

    /// Checks vCPU `index`'s working set holds what its program wrote (see
    /// [`guest::check_working_set`]); meaningful while paused.
    pub fn check_working_set(&self, index: u32) -> Result<VcpuBlock> {
        guest::check_working_set(self.vm.memory(), index)
    }

    /// Changes the spin delay after each page write, for every vCPU, while running.
    pub fn set_dirty_delay(&self, delay: u64) -> Result<()> {
        (0..self.config.vcpus).try_for_each(|i| guest::write_delay(self.vm.memory(), i, delay))
    }

    /// Passes completed, summed over vCPUs, as seen by VM exits.
    pub fn heartbeats(&self) -> u64 {
        self.vcpus.iter().map(Vcpu::heartbeats).sum()
    }

    /// The first vCPU failure (guest halted, KVM error), if any.
    pub fn failure(&self) -> Option<String> {
        self.vcpus.iter().find_map(Vcpu::failure)
    }

    /// Whether the vCPUs are paused.
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Reads the complete VM state (vCPUs must be paused).
    pub fn capture_state(&self) -> Result<VmState> {
        if !self.is_paused() {
            return Err(Error::VmControl("save_state needs a paused VM".into()));
        }
        let (irqchips, clock) = state::save_vm_devices(self.vm.fd(), self.features.irqchip)?;
        let mut vcpus = Vec::new();
        for v in &self.vcpus {
            let features = self.features;
            let msrs = self.msr_indices.clone();
            vcpus.push(v.exec(move |fd| VcpuState::save(fd, features, &msrs))??);
        }
        Ok(VmState {
            mem_size: self.config.mem_size,
            irqchips,
            clock,
            vcpus,
        })
    }

    /// Loads a complete VM state (vCPUs must be paused).
    pub fn apply_state(&self, state: &VmState) -> Result<()> {
        if !self.is_paused() {
            return Err(Error::VmControl("restore_state needs a paused VM".into()));
        }
        if state.mem_size != self.config.mem_size || state.vcpus.len() != self.vcpus.len() {
            return Err(Error::VmControl(format!(
                "state is for {} bytes and {} vCPUs; this VM has {} bytes and {} vCPUs",
                state.mem_size,
                state.vcpus.len(),
                self.config.mem_size,
                self.vcpus.len()
            )));
        }
        if state.irqchips.is_empty() == self.features.irqchip {
            return Err(Error::VmControl(
                "state and VM differ in having an irqchip".into(),
            ));
        }
        state::restore_vm_devices(self.vm.fd(), state)?;
        for (v, s) in self.vcpus.iter().zip(&state.vcpus) {
            let s = s.clone();
            v.exec(move |fd| s.restore(fd))??;
        }
        Ok(())
    }
}

/// The MSRs this KVM lets us both read and write back, from its index list.
fn probe_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>> {
    let list = kvm.get_msr_index_list().map_err(|source| Error::Kvm {
        op: "KVM_GET_MSR_INDEX_LIST",
        source,
    })?;
    let mut usable = Vec::new();
    for &index in list.as_slice() {
        let Ok(mut one) = Msrs::from_entries(&[kvm_msr_entry {
            index,
            ..Default::default()
        }]) else {
            continue;
        };
        if vcpu.get_msrs(&mut one).ok() == Some(1) && vcpu.set_msrs(&one).ok() == Some(1) {
            usable.push(index);
        }
    }
    Ok(usable)
}

/// Puts vCPU `index` at the program's start in 64-bit long mode with 2 MiB identity pages.
fn boot_registers(fd: &mut VcpuFd, index: u32, irqchip: bool) -> Result<()> {
    let kvm_err = |op| move |source| Error::Kvm { op, source };
    let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let segment = |selector: u16, entry: u64| kvm_segment {
        base: 0,
        limit: 0xfffff,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: ((entry >> 55) & 1) as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let code = segment(guest::CODE_SELECTOR, guest::GDT[1]);
    let data = segment(guest::DATA_SELECTOR, guest::GDT[2]);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(guest::TSS_SELECTOR, guest::GDT[3]);
    sregs.gdt.base = guest::GDT_ADDR;
    sregs.gdt.limit = (guest::GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr3 = guest::PML4_ADDR;
    sregs.cr4 = 0x20 | 0x200 | 0x400; // PAE | OSFXSR | OSXMMEXCPT
    sregs.cr0 = 0x8000_0000 | 0x1 | 0x2 | 0x10 | 0x20 | 0x10000; // PG | PE | MP | ET | NE | WP
    sregs.efer = 0x100 | 0x400; // LME | LMA
    fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    let regs = kvm_bindings::kvm_regs {
        rip: guest::CODE_ADDR,
        rdi: guest::vcpu_block_addr(index),
        rflags: 0x2,
        ..Default::default()
    };
    fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    if irqchip && index > 0 {
        // With an in-kernel LAPIC, application processors wait for INIT/SIPI; start them now.
        fd.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_RUNNABLE,
        })
        .map_err(kvm_err("KVM_SET_MP_STATE"))?;
    }
    Ok(())
}

impl MigratableVm for ReferenceVm {
    fn memory(&self) -> &GuestMemory {
        self.vm.memory()
    }

    fn dirty_tracker(&self) -> Result<Box<dyn DirtyTracker>> {
        // Called once at the start of every migration: the place to refuse one, as QEMU does
        // while a device without migration support (a VFIO function) is plugged.
        if let Some(why) = self.bus.migration_blocker() {
            return Err(Error::VmControl(format!("migration is blocked by {why}")));
        }
        Ok(match self.vm.tracking() {
            DirtyTracking::DirtyLog => Box::new(DirtyLogTracker::start(self.vm.clone())?),
            DirtyTracking::DirtyRing => Box::new(DirtyRingTracker::start(self.vm.clone())?),
        })
    }

    fn pause(&self) -> Result<()> {
        ReferenceVm::pause(self)
    }

    fn resume(&self) -> Result<()> {
        ReferenceVm::resume(self)
    }

    fn save_state(&self) -> Result<Vec<u8>> {
        Ok(self.capture_state()?.encode())
    }

    fn set_throttle(&self, percent: u8) -> Result<()> {
        for v in &self.vcpus {
            v.set_throttle(percent);
        }
        Ok(())
    }
}

impl IncomingVm for ReferenceVm {
    fn memory(&self) -> &GuestMemory {
        self.vm.memory()
    }

    fn restore_state(&self, state: &[u8]) -> Result<()> {
        self.apply_state(&VmState::decode(state)?)
    }

    fn resume(&self) -> Result<()> {
        ReferenceVm::resume(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::MemoryLayout;

    #[test]
    fn layout_check_accepts_own_shape_and_names_a_mismatch() {
        let cfg = VmmConfig {
            mem_size: 6 << 20,
            slot_size: 4 << 20,
            ..Default::default()
        };
        let mem = GuestMemory::from_ranges(&cfg.regions()).unwrap();
        cfg.check_layout(&MemoryLayout::of(&mem)).unwrap();
        let other = VmmConfig {
            slot_size: 2 << 20,
            ..cfg.clone()
        };
        let e = other.check_layout(&MemoryLayout::of(&mem)).unwrap_err();
        assert!(matches!(e, Error::Incompatible(_)), "{e}");
    }

    #[test]
    fn bad_configs_are_refused_before_touching_kvm() {
        for cfg in [
            VmmConfig {
                mem_size: 3 << 20,
                ..Default::default()
            },
            VmmConfig {
                mem_size: 8 << 30,
                ..Default::default()
            },
            VmmConfig {
                vcpus: 0,
                ..Default::default()
            },
            VmmConfig {
                vcpus: 33,
                ..Default::default()
            },
            VmmConfig {
                working_set_pages: 1 << 20,
                ..Default::default()
            },
            VmmConfig {
                slot_size: 100,
                ..Default::default()
            },
        ] {
            assert!(cfg.validate().is_err(), "{cfg:?} accepted");
        }
        VmmConfig::default().validate().unwrap();
        // A 4 GiB guest may rewrite everything below the interrupt controllers, not them.
        let four = |mib: u64| VmmConfig {
            mem_size: 4 << 30,
            working_set_pages: (mib << 20) / PAGE_SIZE,
            ..Default::default()
        };
        four(4075).validate().unwrap();
        let e = four(4080).validate().unwrap_err().to_string();
        assert!(
            e.contains("interrupt controllers") && e.contains("4075 MiB"),
            "{e}"
        );
    }
}
