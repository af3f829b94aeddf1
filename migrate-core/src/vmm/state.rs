//! Complete VM and vCPU state of the reference VMM, and its byte format.
//!
//! Format (all integers little-endian), in the spirit of Firecracker's snapshots:
//!
//! ```text
//! header:  magic "NINJAVMS" (8) | version u32 | payload length u64 | CRC-32 of payload u32
//! payload: a sequence of blobs, each u32 length + bytes:
//!          vm header (memory size u64, vCPU count u32, irqchip u32),
//!          PIC master, PIC slave, IOAPIC (empty without irqchip), kvmclock (empty if absent),
//!          then per vCPU: regs, sregs, fpu, xsave, xcrs, debugregs, mp_state, vcpu_events,
//!          lapic (empty blobs where KVM lacks the feature), MSRs (n × (index u32, pad u32, data u64)).
//! ```
//!
//! KVM structures are copied as their kernel ABI bytes (x86-64 only). A blob whose length
//! does not match its structure, a wrong magic, version or checksum is a clear error.

use crate::{Error, Result};
use kvm_bindings::{
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_MSR_ENTRIES, Msrs,
    kvm_clock_data, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{VcpuFd, VmFd};
use std::mem::size_of;
use zerocopy::{FromBytes, Immutable, IntoBytes};

/// First bytes of a saved state.
pub const STATE_MAGIC: [u8; 8] = *b"NINJAVMS";
/// Current format version.
pub const STATE_VERSION: u32 = 1;
const HEADER_LEN: usize = 8 + 4 + 8 + 4;
/// Largest accepted state (a guard against absurd lengths in corrupt input).
const MAX_STATE_LEN: u64 = 16 << 20;

/// A KVM structure from its kernel ABI bytes. kvm-bindings derives zerocopy's traits for the
/// structures (`as_bytes` gives the bytes), which proves they have no implicit padding and are
/// valid for any bytes.
fn abi_from<T: FromBytes>(bytes: &[u8], what: &str) -> Result<T> {
    T::read_from_bytes(bytes).map_err(|_| {
        Error::VmControl(format!(
            "state: {what} is {} bytes, expected {}",
            bytes.len(),
            size_of::<T>()
        ))
    })
}

/// `kvm_fpu`'s ABI bytes, field by field (kvm-bindings derives no zerocopy traits for it; its
/// fields are laid out without padding: pad1 and pad2 are explicit).
fn fpu_bytes(f: &kvm_fpu) -> Vec<u8> {
    let mut b = Vec::with_capacity(FPU_LEN);
    f.fpr.iter().for_each(|r| b.extend_from_slice(r));
    b.extend_from_slice(&f.fcw.to_le_bytes());
    b.extend_from_slice(&f.fsw.to_le_bytes());
    b.extend_from_slice(&[f.ftwx, f.pad1]);
    b.extend_from_slice(&f.last_opcode.to_le_bytes());
    b.extend_from_slice(&f.last_ip.to_le_bytes());
    b.extend_from_slice(&f.last_dp.to_le_bytes());
    f.xmm.iter().for_each(|r| b.extend_from_slice(r));
    b.extend_from_slice(&f.mxcsr.to_le_bytes());
    b.extend_from_slice(&f.pad2.to_le_bytes());
    b
}

const FPU_LEN: usize = size_of::<kvm_fpu>();
const _: () = assert!(FPU_LEN == 8 * 16 + 2 + 2 + 1 + 1 + 2 + 8 + 8 + 16 * 16 + 4 + 4);

fn fpu_from(bytes: &[u8]) -> Result<kvm_fpu> {
    if bytes.len() != FPU_LEN {
        return Err(Error::VmControl(format!(
            "state: fpu is {} bytes, expected {FPU_LEN}",
            bytes.len()
        )));
    }
    let mut at = 0;
    let mut take = |n: usize| {
        at += n;
        &bytes[at - n..at]
    };
    let mut f = kvm_fpu::default();
    f.fpr.iter_mut().for_each(|r| r.copy_from_slice(take(16)));
    f.fcw = u16::from_le_bytes(take(2).try_into().expect("2 bytes"));
    f.fsw = u16::from_le_bytes(take(2).try_into().expect("2 bytes"));
    (f.ftwx, f.pad1) = (take(1)[0], take(1)[0]);
    f.last_opcode = u16::from_le_bytes(take(2).try_into().expect("2 bytes"));
    f.last_ip = u64::from_le_bytes(take(8).try_into().expect("8 bytes"));
    f.last_dp = u64::from_le_bytes(take(8).try_into().expect("8 bytes"));
    f.xmm.iter_mut().for_each(|r| r.copy_from_slice(take(16)));
    f.mxcsr = u32::from_le_bytes(take(4).try_into().expect("4 bytes"));
    f.pad2 = u32::from_le_bytes(take(4).try_into().expect("4 bytes"));
    Ok(f)
}

/// Everything KVM holds for one vCPU.
#[derive(Clone)]
pub struct VcpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: kvm_fpu,
    /// Extended state as its 4 KiB `kvm_xsave` bytes (None where KVM lacks KVM_CAP_XSAVE).
    pub xsave: Option<Vec<u8>>,
    /// Extended control registers (None where KVM lacks KVM_CAP_XCRS).
    pub xcrs: Option<kvm_xcrs>,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Multiprocessing state (runnable, halted, waiting for SIPI).
    pub mp_state: kvm_mp_state,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Local APIC (None without an in-kernel irqchip).
    pub lapic: Option<kvm_lapic_state>,
    /// MSRs (index, value), in the order they are restored.
    pub msrs: Vec<(u32, u64)>,
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("rip", &self.regs.rip)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// What the VMM knows about KVM features, to save and restore only what exists.
#[derive(Debug, Clone, Copy)]
pub struct Features {
    /// KVM_CAP_XSAVE.
    pub xsave: bool,
    /// KVM_CAP_XCRS.
    pub xcrs: bool,
    /// In-kernel irqchip created.
    pub irqchip: bool,
}

fn kvm(op: &'static str) -> impl FnOnce(vmm_sys_util::errno::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

impl VcpuState {
    /// Reads the state of a stopped vCPU; `msr_indices` are the MSRs known to be readable.
    pub fn save(vcpu: &VcpuFd, features: Features, msr_indices: &[u32]) -> Result<Self> {
        let mut msrs = Vec::with_capacity(msr_indices.len());
        for chunk in msr_indices.chunks(KVM_MAX_MSR_ENTRIES) {
            let entries: Vec<kvm_msr_entry> = chunk
                .iter()
                .map(|&index| kvm_msr_entry {
                    index,
                    ..Default::default()
                })
                .collect();
            let mut wrapper = Msrs::from_entries(&entries)
                .map_err(|e| Error::VmControl(format!("MSR list: {e:?}")))?;
            let read = vcpu.get_msrs(&mut wrapper).map_err(kvm("KVM_GET_MSRS"))?;
            if read != chunk.len() {
                return Err(Error::VmControl(format!(
                    "KVM_GET_MSRS read {read} of {} MSRs; stopped at MSR {:#x}",
                    chunk.len(),
                    chunk[read]
                )));
            }
            msrs.extend(wrapper.as_slice().iter().map(|e| (e.index, e.data)));
        }
        Ok(VcpuState {
            regs: vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?,
            sregs: vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?,
            fpu: vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?,
            xsave: if features.xsave {
                Some(
                    vcpu.get_xsave()
                        .map_err(kvm("KVM_GET_XSAVE"))?
                        .as_bytes()
                        .to_vec(),
                )
            } else {
                None
            },
            xcrs: if features.xcrs {
                Some(vcpu.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?)
            } else {
                None
            },
            debugregs: vcpu.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?,
            mp_state: vcpu.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?,
            events: vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?,
            lapic: if features.irqchip {
                Some(vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?)
            } else {
                None
            },
            msrs,
        })
    }

    /// Loads the state into a vCPU that has not run since it was created (or is stopped).
    /// Order as Firecracker's: special registers before MSRs, LAPIC before MSRs (the TSC
    /// deadline MSR depends on the LAPIC mode), events last.
    pub fn restore(&self, vcpu: &VcpuFd) -> Result<()> {
        vcpu.set_mp_state(self.mp_state)
            .map_err(kvm("KVM_SET_MP_STATE"))?;
        vcpu.set_regs(&self.regs).map_err(kvm("KVM_SET_REGS"))?;
        vcpu.set_sregs(&self.sregs).map_err(kvm("KVM_SET_SREGS"))?;
        vcpu.set_fpu(&self.fpu).map_err(kvm("KVM_SET_FPU"))?;
        if let Some(xsave) = &self.xsave {
            set_xsave(vcpu, &abi_from::<kvm_xsave>(xsave, "xsave")?)?;
        }
        if let Some(xcrs) = &self.xcrs {
            vcpu.set_xcrs(xcrs).map_err(kvm("KVM_SET_XCRS"))?;
        }
        vcpu.set_debug_regs(&self.debugregs)
            .map_err(kvm("KVM_SET_DEBUGREGS"))?;
        if let Some(lapic) = &self.lapic {
            vcpu.set_lapic(lapic).map_err(kvm("KVM_SET_LAPIC"))?;
        }
        set_msrs_checked(vcpu, &self.msrs)?;
        vcpu.set_vcpu_events(&self.events)
            .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

fn set_xsave(vcpu: &VcpuFd, xsave: &kvm_xsave) -> Result<()> {
    // SAFETY: `xsave` is a legacy 4 KiB kvm_xsave read by KVM_GET_XSAVE (no XSAVE2 extension
    // area follows it), which is what KVM_SET_XSAVE reads.
    unsafe { vcpu.set_xsave(xsave) }.map_err(kvm("KVM_SET_XSAVE"))
}

/// `KVM_SET_MSRS` stops silently at the first MSR it refuses and returns how many it set:
/// anything short of all of them is an error naming the refused MSR.
pub fn set_msrs_checked(vcpu: &VcpuFd, msrs: &[(u32, u64)]) -> Result<()> {
    let mut done = 0;
    for chunk in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let wrapper = Msrs::from_entries(&entries)
            .map_err(|e| Error::VmControl(format!("MSR list: {e:?}")))?;
        let set = vcpu.set_msrs(&wrapper).map_err(kvm("KVM_SET_MSRS"))?;
        if set != chunk.len() {
            return Err(Error::VmControl(format!(
                "KVM_SET_MSRS set {} of {} MSRs: MSR {:#x} (value {:#x}) was refused",
                done + set,
                msrs.len(),
                chunk[set].0,
                chunk[set].1
            )));
        }
        done += set;
    }
    Ok(())
}

/// VM-wide state: interrupt controllers and clock.
#[derive(Clone)]
pub struct VmState {
    /// Guest memory size the state belongs to.
    pub mem_size: u64,
    /// PIC master, PIC slave, IOAPIC (empty without irqchip).
    pub irqchips: Vec<kvm_irqchip>,
    /// kvmclock (None where KVM refuses KVM_GET_CLOCK).
    pub clock: Option<kvm_clock_data>,
    /// Per vCPU.
    pub vcpus: Vec<VcpuState>,
}

impl std::fmt::Debug for VmState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmState")
            .field("mem_size", &self.mem_size)
            .field("irqchips", &self.irqchips.len())
            .field("vcpus", &self.vcpus)
            .finish_non_exhaustive()
    }
}

const IRQCHIP_IDS: [u32; 3] = [
    KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQCHIP_IOAPIC,
];

/// Reads the interrupt controllers and clock of a VM.
pub fn save_vm_devices(
    vm: &VmFd,
    irqchip: bool,
) -> Result<(Vec<kvm_irqchip>, Option<kvm_clock_data>)> {
    let mut chips = Vec::new();
    if irqchip {
        for id in IRQCHIP_IDS {
            let mut chip = kvm_irqchip {
                chip_id: id,
                ..Default::default()
            };
            vm.get_irqchip(&mut chip).map_err(kvm("KVM_GET_IRQCHIP"))?;
            chips.push(chip);
        }
    }
    Ok((chips, vm.get_clock().ok()))
}

/// Loads interrupt controllers and clock into a VM.
pub fn restore_vm_devices(vm: &VmFd, state: &VmState) -> Result<()> {
    for chip in &state.irqchips {
        vm.set_irqchip(chip).map_err(kvm("KVM_SET_IRQCHIP"))?;
    }
    if let Some(clock) = &state.clock {
        let mut clock = *clock;
        // Only the clock value is meaningful to set; KVM rejects unknown flags.
        clock.flags = 0;
        vm.set_clock(&clock).map_err(kvm("KVM_SET_CLOCK"))?;
    }
    Ok(())
}

/// CRC-32 (IEEE 802.3), as Firecracker's snapshots and zlib use.
fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

struct Writer(Vec<u8>);

impl Writer {
    fn blob(&mut self, bytes: &[u8]) {
        self.0
            .extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        self.0.extend_from_slice(bytes);
    }
    fn opt<T: IntoBytes + Immutable>(&mut self, v: &Option<T>) {
        match v {
            Some(v) => self.blob(v.as_bytes()),
            None => self.blob(&[]),
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn blob(&mut self, what: &str) -> Result<&'a [u8]> {
        let truncated = || Error::VmControl(format!("state truncated in {what}"));
        let len_bytes = self.0.get(..4).ok_or_else(truncated)?;
        let len = u32::from_le_bytes(len_bytes.try_into().expect("4 bytes")) as usize;
        let bytes = self.0.get(4..4 + len).ok_or_else(truncated)?;
        self.0 = &self.0[4 + len..];
        Ok(bytes)
    }
    fn abi<T: FromBytes>(&mut self, what: &str) -> Result<T> {
        abi_from(self.blob(what)?, what)
    }
    fn opt<T: FromBytes>(&mut self, what: &str) -> Result<Option<T>> {
        let b = self.blob(what)?;
        if b.is_empty() {
            Ok(None)
        } else {
            abi_from(b, what).map(Some)
        }
    }
}

impl VmState {
    /// Serializes to the versioned, checksummed format described in the module docs.
    pub fn encode(&self) -> Vec<u8> {
        let mut w = Writer(Vec::new());
        let mut head = Vec::new();
        head.extend_from_slice(&self.mem_size.to_le_bytes());
        head.extend_from_slice(&(self.vcpus.len() as u32).to_le_bytes());
        head.extend_from_slice(&(self.irqchips.len() as u32).to_le_bytes());
        w.blob(&head);
        for chip in &self.irqchips {
            w.blob(chip.as_bytes());
        }
        w.opt(&self.clock);
        for v in &self.vcpus {
            w.blob(v.regs.as_bytes());
            w.blob(v.sregs.as_bytes());
            w.blob(&fpu_bytes(&v.fpu));
            w.blob(v.xsave.as_deref().unwrap_or(&[]));
            w.opt(&v.xcrs);
            w.blob(v.debugregs.as_bytes());
            w.blob(v.mp_state.as_bytes());
            w.blob(v.events.as_bytes());
            w.opt(&v.lapic);
            let msrs: Vec<u8> = v
                .msrs
                .iter()
                .flat_map(|&(i, d)| {
                    let mut e = [0u8; 16];
                    e[..4].copy_from_slice(&i.to_le_bytes());
                    e[8..].copy_from_slice(&d.to_le_bytes());
                    e
                })
                .collect();
            w.blob(&msrs);
        }
        let payload = w.0;
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&STATE_MAGIC);
        out.extend_from_slice(&STATE_VERSION.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Parses [`VmState::encode`]'s output, checking magic, version, length and checksum.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = |m: String| Error::VmControl(format!("state: {m}"));
        if bytes.len() < HEADER_LEN {
            return Err(bad(format!(
                "{} bytes is shorter than the header",
                bytes.len()
            )));
        }
        if bytes[..8] != STATE_MAGIC {
            return Err(bad("bad magic (not a reference VMM state)".into()));
        }
        let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        if version != STATE_VERSION {
            return Err(bad(format!(
                "version {version}, this VMM reads {STATE_VERSION}"
            )));
        }
        let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
        let crc = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
        let payload = &bytes[HEADER_LEN..];
        if len > MAX_STATE_LEN || payload.len() as u64 != len {
            return Err(bad(format!(
                "payload is {} bytes, header says {len}",
                payload.len()
            )));
        }
        if crc32(payload) != crc {
            return Err(bad("checksum mismatch (corrupt state)".into()));
        }
        let mut r = Reader(payload);
        let head = r.blob("vm header")?;
        if head.len() != 16 {
            return Err(bad(format!(
                "vm header is {} bytes, expected 16",
                head.len()
            )));
        }
        let mem_size = u64::from_le_bytes(head[..8].try_into().expect("8 bytes"));
        let nvcpus = u32::from_le_bytes(head[8..12].try_into().expect("4 bytes"));
        let nchips = u32::from_le_bytes(head[12..16].try_into().expect("4 bytes"));
        if nchips > 3 || nvcpus > 1024 {
            return Err(bad(format!(
                "{nvcpus} vCPUs / {nchips} irqchips is out of range"
            )));
        }
        let irqchips = (0..nchips)
            .map(|_| r.abi("irqchip"))
            .collect::<Result<_>>()?;
        let clock = r.opt("clock")?;
        let mut vcpus = Vec::new();
        for _ in 0..nvcpus {
            let regs = r.abi("regs")?;
            let sregs = r.abi("sregs")?;
            let fpu = fpu_from(r.blob("fpu")?)?;
            let xsave = r.opt::<kvm_xsave>("xsave")?.map(|x| x.as_bytes().to_vec());
            let xcrs = r.opt("xcrs")?;
            let debugregs = r.abi("debugregs")?;
            let mp_state = r.abi("mp_state")?;
            let events = r.abi("vcpu_events")?;
            let lapic = r.opt("lapic")?;
            let raw = r.blob("msrs")?;
            if raw.len() % 16 != 0 {
                return Err(bad(format!("MSR blob of {} bytes", raw.len())));
            }
            let msrs = raw
                .chunks(16)
                .map(|e| {
                    (
                        u32::from_le_bytes(e[..4].try_into().expect("4 bytes")),
                        u64::from_le_bytes(e[8..].try_into().expect("8 bytes")),
                    )
                })
                .collect();
            vcpus.push(VcpuState {
                regs,
                sregs,
                fpu,
                xsave,
                xcrs,
                debugregs,
                mp_state,
                events,
                lapic,
                msrs,
            });
        }
        if !r.0.is_empty() {
            return Err(bad(format!("{} trailing bytes", r.0.len())));
        }
        Ok(VmState {
            mem_size,
            irqchips,
            clock,
            vcpus,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOLDEN_LEN: usize = 2152;
    const GOLDEN_CRC: u32 = 0x61ed_75f2;

    fn sample() -> VmState {
        let regs = kvm_regs {
            rip: 0x10000,
            rdi: 0x8040,
            ..Default::default()
        };
        VmState {
            mem_size: 64 << 20,
            irqchips: vec![kvm_irqchip {
                chip_id: 2,
                ..Default::default()
            }],
            clock: None,
            vcpus: vec![VcpuState {
                regs,
                sregs: kvm_sregs::default(),
                fpu: kvm_fpu::default(),
                xsave: None,
                xcrs: Some(kvm_xcrs::default()),
                debugregs: kvm_debugregs::default(),
                mp_state: kvm_mp_state::default(),
                events: kvm_vcpu_events::default(),
                lapic: None,
                msrs: vec![(0x10, 1234), (0xc000_0080, 0x500)],
            }],
        }
    }

    /// Every field of the FPU state set, so its bytes are checked in place.
    fn fpu() -> kvm_fpu {
        let mut fpu = kvm_fpu {
            fcw: 0x037f,
            fsw: 0x1234,
            ftwx: 0xa5,
            pad1: 0x5a,
            last_opcode: 0x0bcd,
            last_ip: 0x1122_3344_5566_7788,
            last_dp: 0x99aa_bbcc_ddee_ff00,
            mxcsr: 0x1f80,
            pad2: 0xdead_beef,
            ..Default::default()
        };
        for (i, row) in fpu.fpr.iter_mut().chain(fpu.xmm.iter_mut()).enumerate() {
            for (j, b) in row.iter_mut().enumerate() {
                *b = (i * 16 + j) as u8;
            }
        }
        fpu
    }

    /// Version 1 is these bytes: a change here breaks reading saved states.
    #[test]
    fn the_format_is_the_one_version_1_wrote() {
        let mut s = sample();
        s.vcpus[0].fpu = fpu();
        s.clock = Some(kvm_clock_data {
            clock: 0x0102_0304_0506_0708,
            flags: 2,
            ..Default::default()
        });
        let bytes = s.encode();
        assert_eq!(bytes.len(), GOLDEN_LEN);
        assert_eq!(&bytes[..12], b"NINJAVMS\x01\0\0\0");
        let whole = crc32(&bytes);
        assert_eq!(whole, GOLDEN_CRC, "{whole:#010x}");
        let back = VmState::decode(&bytes).unwrap();
        assert_eq!(back.vcpus[0].fpu, fpu());
        assert_eq!(back.clock.unwrap().clock, 0x0102_0304_0506_0708);
    }

    #[test]
    fn state_round_trips() {
        let s = sample();
        let back = VmState::decode(&s.encode()).unwrap();
        assert_eq!(back.mem_size, s.mem_size);
        assert_eq!(back.vcpus[0].regs, s.vcpus[0].regs);
        assert_eq!(back.vcpus[0].msrs, s.vcpus[0].msrs);
        assert!(back.vcpus[0].xsave.is_none() && back.vcpus[0].xcrs.is_some());
        assert_eq!(back.irqchips[0].chip_id, 2);
    }

    #[test]
    fn corrupt_state_is_rejected_clearly() {
        let bytes = sample().encode();
        let mut flipped = bytes.clone();
        *flipped.last_mut().unwrap() ^= 1;
        let e = VmState::decode(&flipped).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        let mut magic = bytes.clone();
        magic[0] = b'X';
        assert!(
            VmState::decode(&magic)
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
        let mut version = bytes.clone();
        version[8] = 9;
        assert!(
            VmState::decode(&version)
                .unwrap_err()
                .to_string()
                .contains("version 9")
        );
        for cut in [0, 10, HEADER_LEN, bytes.len() - 1] {
            assert!(VmState::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
    }
}
