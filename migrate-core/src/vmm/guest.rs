//! The built-in guest: memory layout, page tables, GDT and a hand-assembled x86-64 program
//! that dirties a working set and keeps a counter, a checksum and an error count per vCPU.
//!
//! Guest-physical layout (identity mapped with 2 MiB pages, up to [`MAX_MEMORY`]):
//!
//! | address          | content                                             |
//! |------------------|-----------------------------------------------------|
//! | `0x1000`         | GDT (null, 64-bit code, data, TSS descriptors)      |
//! | `0x2000`         | PML4                                                |
//! | `0x3000`         | PDPT                                                |
//! | `0x4000..0x8000` | four page directories (2 MiB pages, 4 GiB)          |
//! | `0x8000`         | status page: one [`VcpuBlock`] of 64 bytes per vCPU |
//! | `0x9000`         | SymVirt mailbox header (see [`mailbox`])            |
//! | `0xa000`         | mailbox inbox ring (4 KiB, host to guest)           |
//! | `0xb000`         | mailbox outbox ring (4 KiB, guest to host)          |
//! | `0x10000`        | the program                                         |
//! | `0x100000..`     | working sets, vCPU after vCPU                       |
//! | `0xfec00000..`   | IOAPIC and local APIC (KVM's): no working set here  |
//!
//! Each pass of the program over its working set: `c = counter + 1`; for every page, read
//! its first word (it must equal `counter`, else `errors += 1`), fold it into the checksum,
//! write `c`, count it in `pages_written`, spin `delay` times; then store the checksum and `counter = c`, and `out` to
//! [`HEARTBEAT_PORT`] so the host sees a VM exit; every 256 pages it also writes to
//! [`TICK_PORT`], so a throttled vCPU can be slowed down within a long pass. A page left stale by a migration therefore
//! shows up in the guest's own error count.
//!
//! After each pass the program reaches its *pause point*, the SymVirt "wait/signal" of a
//! guest without MPI (see [`mailbox`]): when the host enabled the channel, vCPU 0 moves bytes
//! between the SymVirt I/O ports and the mailbox rings (`in`/`out`, one byte per access, so
//! every byte is a VM exit of the running vCPU), and every vCPU parks there, servicing the
//! channel, while the mailbox's wait word is set; each turn of that wait is an `out` to
//! [`WAIT_PORT`], where the VMM blocks the vCPU for a moment instead of letting it spin.

use crate::dirty::PAGE_SIZE;
use crate::vm::GuestMemory;
use crate::{Error, Result};
use vm_memory::{Bytes, GuestAddress};

/// GDT address.
pub const GDT_ADDR: u64 = 0x1000;
/// PML4 address (CR3).
pub const PML4_ADDR: u64 = 0x2000;
/// PDPT address.
pub const PDPT_ADDR: u64 = 0x3000;
/// First page directory.
pub const PD_ADDR: u64 = 0x4000;
/// Page directories available (one per GiB).
const PD_COUNT: u64 = 4;
/// Status page: per-vCPU blocks.
pub const STATUS_ADDR: u64 = 0x8000;
/// Program start (RIP of every vCPU).
pub const CODE_ADDR: u64 = 0x10000;
/// First working-set page.
pub const WORKING_SET_ADDR: u64 = 0x100000;
/// Largest guest the page tables map.
pub const MAX_MEMORY: u64 = PD_COUNT << 30;
/// Where x86's interrupt controllers sit in guest-physical space: KVM's in-kernel IOAPIC at
/// `0xfec0_0000` and local APIC at `0xfee0_0000` answer accesses there, not memory. The
/// working sets must end below it (a guest of 4 GiB that rewrote those pages read back
/// register values and counted 2 errors); memory above it is still the guest's and migrates.
pub const INTERRUPT_CONTROLLERS_ADDR: u64 = 0xfec0_0000;
/// Bytes per vCPU block in the status page.
pub const VCPU_BLOCK_SIZE: u64 = 64;
/// Most vCPUs the status page holds.
pub const MAX_VCPUS: u32 = 32;
/// I/O port the program writes after each pass.
pub const HEARTBEAT_PORT: u16 = 0x80;
/// I/O port the program writes every 256 pages, so the host can throttle mid-pass.
pub const TICK_PORT: u16 = 0x81;
/// I/O port the program writes on each turn of its wait at the pause point: the VMM blocks
/// the vCPU there for a moment (the SymVirt wait), so a parked guest does not spin a host core.
pub const WAIT_PORT: u16 = 0x82;

/// GDT selectors.
pub const CODE_SELECTOR: u16 = 0x08;
/// Data segment selector.
pub const DATA_SELECTOR: u16 = 0x10;
/// Task segment selector.
pub const TSS_SELECTOR: u16 = 0x18;
/// GDT entries: null, code (64-bit), data, TSS. Accessed bits preset so the CPU never writes.
pub const GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];

// Offsets inside a vCPU block.
const OFF_COUNTER: u64 = 0x00;
const OFF_CHECKSUM: u64 = 0x08;
const OFF_ERRORS: u64 = 0x10;
const OFF_WS_BASE: u64 = 0x18;
const OFF_WS_PAGES: u64 = 0x20;
const OFF_DELAY: u64 = 0x28;
const OFF_PAGES_WRITTEN: u64 = 0x30;
const OFF_WAITING: u64 = 0x38;

/// Guest-physical address of vCPU `index`'s block (what its RDI holds).
pub fn vcpu_block_addr(index: u32) -> u64 {
    STATUS_ADDR + u64::from(index) * VCPU_BLOCK_SIZE
}

/// What one vCPU's program reports in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VcpuBlock {
    /// Completed passes over the working set.
    pub counter: u64,
    /// Running checksum of the values read (see [`expected_checksum`]).
    pub checksum: u64,
    /// Pages whose content was not what the program last wrote there.
    pub errors: u64,
    /// First working-set page (host-written).
    pub ws_base: u64,
    /// Working-set pages (host-written).
    pub ws_pages: u64,
    /// Spin iterations after each page (host-written; changeable while running).
    pub delay: u64,
    /// Pages written since the start (a finer progress measure than `counter`).
    pub pages_written: u64,
    /// The mailbox wait word this vCPU saw at its last pause point: non-zero while it is parked
    /// there (see [`mailbox`]).
    pub waiting: u64,
}

impl VcpuBlock {
    /// Reads vCPU `index`'s block.
    pub fn read(mem: &GuestMemory, index: u32) -> Result<Self> {
        let base = vcpu_block_addr(index);
        let get = |off: u64| -> Result<u64> {
            mem.read_obj::<u64>(GuestAddress(base + off))
                .map_err(|e| Error::Memory(format!("reading vCPU {index} status: {e}")))
        };
        Ok(VcpuBlock {
            counter: get(OFF_COUNTER)?,
            checksum: get(OFF_CHECKSUM)?,
            errors: get(OFF_ERRORS)?,
            ws_base: get(OFF_WS_BASE)?,
            ws_pages: get(OFF_WS_PAGES)?,
            delay: get(OFF_DELAY)?,
            pages_written: get(OFF_PAGES_WRITTEN)?,
            waiting: get(OFF_WAITING)?,
        })
    }

    /// Whether the checksum matches the counter: the checksum is stored just before the
    /// counter, so a vCPU paused between the two stores is one pass ahead in the checksum.
    pub fn checksum_consistent(&self) -> bool {
        self.checksum == expected_checksum(self.counter, self.ws_pages)
            || self.checksum == expected_checksum(self.counter + 1, self.ws_pages)
    }
}

/// The checksum the program holds after `counter` complete passes over `pages` pages.
pub fn expected_checksum(counter: u64, pages: u64) -> u64 {
    let mut sum = 0u64;
    for pass in 1..=counter {
        for _ in 0..pages {
            sum = sum.rotate_left(5) ^ (pass - 1);
        }
    }
    sum
}

/// Writes a host-controlled field of vCPU `index`'s block.
pub fn write_delay(mem: &GuestMemory, index: u32, delay: u64) -> Result<()> {
    mem.write_obj(delay, GuestAddress(vcpu_block_addr(index) + OFF_DELAY))
        .map_err(|e| Error::Memory(format!("writing vCPU {index} delay: {e}")))
}

/// Checks that every page of vCPU `index`'s working set holds what the program wrote: a
/// prefix holds `counter + 1` (the pass in progress), the rest `counter`.
pub fn check_working_set(mem: &GuestMemory, index: u32) -> Result<VcpuBlock> {
    let block = VcpuBlock::read(mem, index)?;
    let mut in_prefix = true;
    for page in 0..block.ws_pages {
        let addr = block.ws_base + page * PAGE_SIZE;
        let word: u64 = mem
            .read_obj(GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("reading page {addr:#x}: {e}")))?;
        let ok = if in_prefix && word == block.counter + 1 {
            true
        } else {
            in_prefix = false;
            word == block.counter
        };
        if !ok {
            return Err(Error::Memory(format!(
                "vCPU {index}: page {addr:#x} holds {word}, counter is {}",
                block.counter
            )));
        }
    }
    Ok(block)
}

/// Tiny assembler for the program: raw bytes plus rel8 jumps to labels.
struct Asm {
    code: Vec<u8>,
    labels: Vec<Option<usize>>,
    /// (offset of the displacement, label, displacement width in bytes: 1 or 4).
    fixups: Vec<(usize, usize, usize)>,
}

impl Asm {
    fn new() -> Self {
        Asm {
            code: Vec::new(),
            labels: Vec::new(),
            fixups: Vec::new(),
        }
    }
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }
    fn bind(&mut self, label: usize) {
        self.labels[label] = Some(self.code.len());
    }
    fn emit(&mut self, bytes: &[u8]) {
        self.code.extend_from_slice(bytes);
    }
    /// A short jump (`opcode rel8`) to `label`.
    fn jump8(&mut self, opcode: u8, label: usize) {
        self.code.push(opcode);
        self.code.push(0);
        self.fixups.push((self.code.len() - 1, label, 1));
    }
    /// A near jump (`opcode... rel32`, e.g. `e9` or `0f 84`) to `label`.
    fn jump32(&mut self, opcode: &[u8], label: usize) {
        self.code.extend_from_slice(opcode);
        self.code.extend_from_slice(&[0; 4]);
        self.fixups.push((self.code.len() - 4, label, 4));
    }
    fn finish(mut self) -> Vec<u8> {
        for (at, label, width) in self.fixups {
            let target = self.labels[label].expect("unbound label in guest program") as isize;
            let rel = target - (at as isize + width as isize);
            if width == 1 {
                let rel = i8::try_from(rel).expect("guest program jump out of rel8 range");
                self.code[at] = rel as u8;
            } else {
                let rel = i32::try_from(rel).expect("guest program jump out of rel32 range");
                self.code[at..at + 4].copy_from_slice(&rel.to_le_bytes());
            }
        }
        self.code
    }
}

/// The program's machine code (position independent; RDI = this vCPU's block).
pub fn program() -> Vec<u8> {
    let mut a = Asm::new();
    let outer = a.label();
    let inner = a.label();
    let page_ok = a.label();
    let spin = a.label();
    let next = a.label();
    let no_tick = a.label();
    let done = a.label();

    a.bind(outer);
    a.emit(&[0x48, 0x8b, 0x07]); //             mov rax, [rdi]        ; rax = counter
    a.emit(&[0x48, 0x8d, 0x58, 0x01]); //       lea rbx, [rax+1]      ; rbx = c = counter + 1
    a.emit(&[0x48, 0x8b, 0x77, 0x18]); //       mov rsi, [rdi+0x18]   ; rsi = working-set base
    a.emit(&[0x48, 0x8b, 0x4f, 0x20]); //       mov rcx, [rdi+0x20]   ; rcx = pages left
    a.emit(&[0x48, 0x8b, 0x57, 0x08]); //       mov rdx, [rdi+0x08]   ; rdx = checksum
    a.emit(&[0x48, 0x85, 0xc9]); //             test rcx, rcx
    a.jump8(0x74, done); //                     jz done               ; empty working set
    a.bind(inner);
    a.emit(&[0x4c, 0x8b, 0x06]); //             mov r8, [rsi]         ; r8 = page's word
    a.emit(&[0x49, 0x39, 0xc0]); //             cmp r8, rax           ; == counter?
    a.jump8(0x74, page_ok); //                  je page_ok
    a.emit(&[0x48, 0xff, 0x47, 0x10]); //       inc qword [rdi+0x10]  ; errors += 1
    a.bind(page_ok);
    a.emit(&[0x48, 0xc1, 0xc2, 0x05]); //       rol rdx, 5
    a.emit(&[0x4c, 0x31, 0xc2]); //             xor rdx, r8           ; checksum = rol(cs,5) ^ word
    a.emit(&[0x48, 0x89, 0x1e]); //             mov [rsi], rbx        ; page's word = c (dirties it)
    a.emit(&[0x48, 0xff, 0x47, 0x30]); //       inc qword [rdi+0x30]  ; pages_written += 1
    a.emit(&[0x4c, 0x8b, 0x4f, 0x28]); //       mov r9, [rdi+0x28]    ; r9 = delay (host may change it)
    a.bind(spin);
    a.emit(&[0x4d, 0x85, 0xc9]); //             test r9, r9
    a.jump8(0x74, next); //                     jz next
    a.emit(&[0xf3, 0x90]); //                   pause
    a.emit(&[0x49, 0xff, 0xc9]); //             dec r9
    a.jump8(0xeb, spin); //                     jmp spin
    a.bind(next);
    a.emit(&[0xf6, 0xc1, 0xff]); //             test cl, 0xff         ; every 256th page...
    a.jump8(0x75, no_tick); //                  jnz no_tick
    a.emit(&[0xe6, TICK_PORT as u8]); //        out 0x81, al          ; ...a VM exit (throttle point)
    a.bind(no_tick);
    a.emit(&[0x48, 0x81, 0xc6, 0x00, 0x10, 0x00, 0x00]); // add rsi, 4096 ; next page
    a.emit(&[0x48, 0xff, 0xc9]); //             dec rcx
    a.jump8(0x75, inner); //                    jnz inner
    a.bind(done);
    a.emit(&[0x48, 0x89, 0x57, 0x08]); //       mov [rdi+0x08], rdx   ; store checksum
    a.emit(&[0x48, 0x89, 0x1f]); //             mov [rdi], rbx        ; counter = c
    a.emit(&[0xe6, HEARTBEAT_PORT as u8]); //   out 0x80, al          ; heartbeat: a VM exit per pass
    pause_point(&mut a, outer);
    a.finish()
}

/// The pause point (SymVirt wait/signal), entered after each pass with RDI = this vCPU's block;
/// ends with a jump to `outer`. R10 holds the mailbox address; DX the STATUS port.
fn pause_point(a: &mut Asm, outer: usize) {
    use mailbox::*;
    let pause = a.label();
    let recv = a.label();
    let send = a.label();
    let check_wait = a.label();
    let to_outer = a.label();
    let imm32 = |v: u64| (v as u32).to_le_bytes();
    a.bind(pause);
    a.emit(&[0x49, 0xc7, 0xc2]); //             mov r10, MAILBOX_ADDR
    a.emit(&imm32(MAILBOX_ADDR));
    a.emit(&[0x49, 0x83, 0x7a, OFF_ENABLED as u8, 0x00]); // cmp qword [r10+ENABLED], 0
    a.jump32(&[0x0f, 0x84], to_outer); //       je to_outer           ; no channel: run on
    a.emit(&[0x48, 0x81, 0xff]); //             cmp rdi, block of vCPU 0
    a.emit(&imm32(STATUS_ADDR));
    a.jump8(0x75, check_wait); //               jne check_wait        ; only vCPU 0 talks
    a.emit(&[0x66, 0x41, 0x8b, 0x52, OFF_PORT as u8]); // mov dx, [r10+PORT] ; DATA port
    a.emit(&[0x66, 0xff, 0xc2]); //             inc dx                ; STATUS port
    a.bind(recv);
    a.emit(&[0xec]); //                         in al, dx             ; STATUS (a VM exit)
    a.emit(&[0xa8, 0x01]); //                   test al, STATUS_DATA
    a.jump8(0x74, send); //                     jz send
    a.emit(&[0x49, 0x8b, 0x4a, OFF_IN_HEAD as u8]); // mov rcx, [r10+IN_HEAD]
    a.emit(&[0x48, 0x89, 0xc8]); //             mov rax, rcx
    a.emit(&[0x49, 0x2b, 0x42, OFF_IN_TAIL as u8]); // sub rax, [r10+IN_TAIL]
    a.emit(&[0x48, 0x3d]); //                   cmp rax, RING
    a.emit(&imm32(RING_SIZE));
    a.jump8(0x73, send); //                     jae send              ; inbox full: host drains it
    a.emit(&[0x66, 0xff, 0xca]); //             dec dx                ; DATA port
    a.emit(&[0xec]); //                         in al, dx             ; one host byte (a VM exit)
    a.emit(&[0x66, 0xff, 0xc2]); //             inc dx                ; STATUS port
    a.emit(&[0x48, 0x89, 0xcb]); //             mov rbx, rcx
    a.emit(&[0x48, 0x81, 0xe3]); //             and rbx, RING - 1
    a.emit(&imm32(RING_SIZE - 1));
    a.emit(&[0x41, 0x88, 0x84, 0x1a]); //       mov [r10+rbx+INBOX], al
    a.emit(&imm32(INBOX_ADDR - MAILBOX_ADDR));
    a.emit(&[0x48, 0xff, 0xc1]); //             inc rcx
    a.emit(&[0x49, 0x89, 0x4a, OFF_IN_HEAD as u8]); // mov [r10+IN_HEAD], rcx ; after the byte
    a.jump8(0xeb, recv); //                     jmp recv
    a.bind(send);
    a.emit(&[0x49, 0x8b, 0x4a, OFF_OUT_TAIL as u8]); // mov rcx, [r10+OUT_TAIL]
    a.emit(&[0x49, 0x3b, 0x4a, OFF_OUT_HEAD as u8]); // cmp rcx, [r10+OUT_HEAD]
    a.jump8(0x73, check_wait); //               jae check_wait        ; nothing to send
    a.emit(&[0x48, 0x89, 0xcb]); //             mov rbx, rcx
    a.emit(&[0x48, 0x81, 0xe3]); //             and rbx, RING - 1
    a.emit(&imm32(RING_SIZE - 1));
    a.emit(&[0x41, 0x8a, 0x84, 0x1a]); //       mov al, [r10+rbx+OUTBOX]
    a.emit(&imm32(OUTBOX_ADDR - MAILBOX_ADDR));
    a.emit(&[0x66, 0xff, 0xca]); //             dec dx                ; DATA port
    a.emit(&[0xee]); //                         out dx, al            ; one guest byte (a VM exit)
    a.emit(&[0x66, 0xff, 0xc2]); //             inc dx                ; STATUS port
    a.emit(&[0x48, 0xff, 0xc1]); //             inc rcx
    a.emit(&[0x49, 0x89, 0x4a, OFF_OUT_TAIL as u8]); // mov [r10+OUT_TAIL], rcx
    a.jump8(0xeb, send); //                     jmp send
    a.bind(check_wait);
    a.emit(&[0x49, 0x8b, 0x42, OFF_WAIT as u8]); // mov rax, [r10+WAIT]
    a.emit(&[0x48, 0x89, 0x47, OFF_WAITING as u8]); // mov [rdi+WAITING], rax ; parked or not
    a.emit(&[0x48, 0x85, 0xc0]); //             test rax, rax
    a.jump8(0x74, to_outer); //                 jz to_outer           ; signalled: run on
    a.emit(&[0xe6, WAIT_PORT as u8]); //        out 0x82, al          ; wait: the VMM blocks us a while
    a.jump32(&[0xe9], pause); //                jmp pause
    a.bind(to_outer);
    a.jump32(&[0xe9], outer); //                jmp outer
}

/// The SymVirt mailbox: how the program's pause point and the host's side of a guest without
/// MPI (the VMM playing the in-guest agent, `symvirt::portio_agent`) share the channel.
///
/// Header at [`mailbox::MAILBOX_ADDR`], little-endian `u64` words:
///
/// | offset | word       | written by | meaning                                              |
/// |--------|------------|------------|------------------------------------------------------|
/// | `0x00` | `enabled`  | host       | non-zero: vCPU 0 services the ports at pause points  |
/// | `0x08` | `port`     | host       | the DATA port (STATUS is `port + 1`)                 |
/// | `0x10` | `wait`     | host       | non-zero: every vCPU parks at its pause point (wait) |
/// | `0x18` | `in_head`  | guest      | bytes received from the host into the inbox, total  |
/// | `0x20` | `in_tail`  | host       | inbox bytes the host side consumed, total            |
/// | `0x28` | `out_head` | host       | bytes queued in the outbox, total                    |
/// | `0x30` | `out_tail` | guest      | outbox bytes sent to the host, total                 |
/// | `0x40..0x80` | agent words | host | eight words of state for the host's agent role     |
///
/// The rings are single-producer single-consumer: the producer writes the bytes, then its head
/// (x86 keeps stores in order); the consumer reads the head, then the bytes. Everything lives
/// in guest memory, so it migrates with the guest: a destination's agent role continues where
/// the source's stopped.
pub mod mailbox {
    use crate::vm::GuestMemory;
    use crate::{Error, Result};
    use std::sync::atomic::Ordering;
    use vm_memory::{Bytes, GuestAddress};

    /// The header's guest-physical address.
    pub const MAILBOX_ADDR: u64 = 0x9000;
    /// The inbox ring (host to guest).
    pub const INBOX_ADDR: u64 = 0xa000;
    /// The outbox ring (guest to host).
    pub const OUTBOX_ADDR: u64 = 0xb000;
    /// Bytes per ring.
    pub const RING_SIZE: u64 = 4096;
    /// Agent words available.
    pub const AGENT_WORDS: usize = 8;

    pub(super) const OFF_ENABLED: u64 = 0x00;
    pub(super) const OFF_PORT: u64 = 0x08;
    pub(super) const OFF_WAIT: u64 = 0x10;
    pub(super) const OFF_IN_HEAD: u64 = 0x18;
    pub(super) const OFF_IN_TAIL: u64 = 0x20;
    pub(super) const OFF_OUT_HEAD: u64 = 0x28;
    pub(super) const OFF_OUT_TAIL: u64 = 0x30;
    const OFF_AGENT: u64 = 0x40;

    fn load(mem: &GuestMemory, off: u64) -> Result<u64> {
        mem.load::<u64>(GuestAddress(MAILBOX_ADDR + off), Ordering::Acquire)
            .map_err(|e| Error::Memory(format!("reading the SymVirt mailbox: {e}")))
    }

    fn store(mem: &GuestMemory, off: u64, value: u64) -> Result<()> {
        mem.store(value, GuestAddress(MAILBOX_ADDR + off), Ordering::Release)
            .map_err(|e| Error::Memory(format!("writing the SymVirt mailbox: {e}")))
    }

    /// Turns the channel on: from the next pause point vCPU 0 services `port` and `port + 1`.
    pub fn enable(mem: &GuestMemory, port: u16) -> Result<()> {
        store(mem, OFF_PORT, u64::from(port))?;
        store(mem, OFF_ENABLED, 1)
    }

    /// Whether the channel is on (it stays on across a migration: it is guest memory).
    pub fn enabled(mem: &GuestMemory) -> Result<bool> {
        Ok(load(mem, OFF_ENABLED)? != 0)
    }

    /// Sets the wait word: non-zero parks every vCPU at its pause point (wait), zero lets them
    /// go on (signal).
    pub fn set_wait(mem: &GuestMemory, value: u64) -> Result<()> {
        store(mem, OFF_WAIT, value)
    }

    /// The wait word.
    pub fn wait(mem: &GuestMemory) -> Result<u64> {
        load(mem, OFF_WAIT)
    }

    /// Takes every byte the guest received from the host since the last call. A head the
    /// guest corrupted is an error once: the ring restarts at it.
    pub fn take_inbox(mem: &GuestMemory) -> Result<Vec<u8>> {
        let head = load(mem, OFF_IN_HEAD)?;
        let tail = load(mem, OFF_IN_TAIL)?;
        if head == tail {
            return Ok(Vec::new());
        }
        if head < tail || head - tail > RING_SIZE {
            store(mem, OFF_IN_TAIL, head)?;
            return Err(Error::Memory(format!(
                "SymVirt inbox corrupt (head {head}, tail {tail}): bytes dropped"
            )));
        }
        let mut bytes = vec![0u8; (head - tail) as usize];
        for (i, b) in bytes.iter_mut().enumerate() {
            let at = INBOX_ADDR + (tail + i as u64) % RING_SIZE;
            *b = mem
                .read_obj(GuestAddress(at))
                .map_err(|e| Error::Memory(format!("reading the SymVirt inbox: {e}")))?;
        }
        store(mem, OFF_IN_TAIL, head)?;
        Ok(bytes)
    }

    /// Queues as much of `bytes` as the outbox has room for; returns how many.
    /// A tail the guest corrupted is an error once: the ring restarts at it.
    pub fn put_outbox(mem: &GuestMemory, bytes: &[u8]) -> Result<usize> {
        let head = load(mem, OFF_OUT_HEAD)?;
        let tail = load(mem, OFF_OUT_TAIL)?;
        if head < tail || head - tail > RING_SIZE {
            store(mem, OFF_OUT_HEAD, tail)?;
            return Err(Error::Memory(format!(
                "SymVirt outbox corrupt (head {head}, tail {tail}): bytes dropped"
            )));
        }
        let n = bytes.len().min((RING_SIZE - (head - tail)) as usize);
        for (i, b) in bytes[..n].iter().enumerate() {
            let at = OUTBOX_ADDR + (head + i as u64) % RING_SIZE;
            mem.write_obj(*b, GuestAddress(at))
                .map_err(|e| Error::Memory(format!("writing the SymVirt outbox: {e}")))?;
        }
        store(mem, OFF_OUT_HEAD, head + n as u64)?;
        Ok(n)
    }

    /// Outbox bytes the guest has not sent yet.
    pub fn outbox_pending(mem: &GuestMemory) -> Result<u64> {
        Ok(load(mem, OFF_OUT_HEAD)?.saturating_sub(load(mem, OFF_OUT_TAIL)?))
    }

    /// Agent word `i` (0..[`AGENT_WORDS`]).
    pub fn agent_word(mem: &GuestMemory, i: usize) -> Result<u64> {
        check_word(i)?;
        load(mem, OFF_AGENT + 8 * i as u64)
    }

    /// Sets agent word `i`.
    pub fn set_agent_word(mem: &GuestMemory, i: usize, value: u64) -> Result<()> {
        check_word(i)?;
        store(mem, OFF_AGENT + 8 * i as u64, value)
    }

    fn check_word(i: usize) -> Result<()> {
        if i >= AGENT_WORDS {
            return Err(Error::VmControl(format!(
                "agent word {i} (there are {AGENT_WORDS})"
            )));
        }
        Ok(())
    }
}

/// Where vCPU `index`'s working set starts, for `pages_per_vcpu` pages each.
pub fn working_set_base(index: u32, pages_per_vcpu: u64) -> u64 {
    WORKING_SET_ADDR + u64::from(index) * pages_per_vcpu * PAGE_SIZE
}

/// Writes GDT, page tables, program and the vCPU blocks into fresh guest memory.
pub fn install(mem: &GuestMemory, vcpus: u32, pages_per_vcpu: u64, delay: u64) -> Result<()> {
    let w = |addr: u64, bytes: &[u8]| -> Result<()> {
        mem.write_slice(bytes, GuestAddress(addr))
            .map_err(|e| Error::Memory(format!("installing the guest at {addr:#x}: {e}")))
    };
    let words = |v: &[u64]| -> Vec<u8> { v.iter().flat_map(|x| x.to_le_bytes()).collect() };
    w(GDT_ADDR, &words(&GDT))?;
    // Present | writable, with accessed/dirty preset so the CPU never writes page tables.
    const TABLE: u64 = 0x3 | 0x20;
    const HUGE: u64 = 0x3 | 0x20 | 0x40 | 0x80;
    w(PML4_ADDR, &words(&[PDPT_ADDR | TABLE]))?;
    let pdpt: Vec<u64> = (0..PD_COUNT)
        .map(|i| (PD_ADDR + i * 0x1000) | TABLE)
        .collect();
    w(PDPT_ADDR, &words(&pdpt))?;
    let pds: Vec<u64> = (0..PD_COUNT * 512).map(|i| (i << 21) | HUGE).collect();
    w(PD_ADDR, &words(&pds))?;
    w(CODE_ADDR, &program())?;
    for i in 0..vcpus {
        let block = [
            0,
            0,
            0,
            working_set_base(i, pages_per_vcpu),
            pages_per_vcpu,
            delay,
            0,
            0,
        ];
        w(vcpu_block_addr(i), &words(&block))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_jumps_resolve_and_end_with_jump_to_start() {
        let code = program();
        // Last instruction (leaving the pause point): jmp rel32 back to offset 0.
        let n = code.len();
        assert_eq!(code[n - 5], 0xe9);
        let rel = i32::from_le_bytes(code[n - 4..].try_into().unwrap());
        assert_eq!(n as isize + rel as isize, 0);
        // The pause point loads the mailbox address (mov r10, imm32).
        let mov_r10 = [0x49, 0xc7, 0xc2, 0x00, 0x90, 0x00, 0x00];
        assert!(code.windows(7).any(|w| w == mov_r10));
    }

    #[test]
    fn mailbox_rings_wrap_and_recover_from_a_corrupt_guest() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        // The guest's side of the inbox, as its program does it: byte, then head.
        let guest_puts = |bytes: &[u8]| {
            let head: u64 = mem
                .read_obj(GuestAddress(mailbox::MAILBOX_ADDR + 0x18))
                .unwrap();
            for (i, b) in bytes.iter().enumerate() {
                let at = mailbox::INBOX_ADDR + (head + i as u64) % mailbox::RING_SIZE;
                mem.write_obj(*b, GuestAddress(at)).unwrap();
            }
            mem.write_obj(
                head + bytes.len() as u64,
                GuestAddress(mailbox::MAILBOX_ADDR + 0x18),
            )
            .unwrap();
        };
        for round in 0..3u8 {
            let line = vec![round; 3000];
            guest_puts(&line);
            assert_eq!(mailbox::take_inbox(&mem).unwrap(), line, "round {round}");
        }
        assert!(mailbox::take_inbox(&mem).unwrap().is_empty());
        assert_eq!(
            mailbox::put_outbox(&mem, &[1; 5000]).unwrap(),
            4096,
            "full ring"
        );
        assert_eq!(mailbox::outbox_pending(&mem).unwrap(), 4096);
        // A guest writes nonsense into its counters: one error, then the rings work again.
        mem.write_obj(u64::MAX, GuestAddress(mailbox::MAILBOX_ADDR + 0x18))
            .unwrap();
        assert!(mailbox::take_inbox(&mem).is_err());
        assert!(mailbox::take_inbox(&mem).unwrap().is_empty());
        mem.write_obj(1u64 << 40, GuestAddress(mailbox::MAILBOX_ADDR + 0x30))
            .unwrap();
        assert!(mailbox::put_outbox(&mem, b"x").is_err());
        assert_eq!(mailbox::put_outbox(&mem, b"x").unwrap(), 1);
    }

    #[test]
    fn checksum_model_matches_a_hand_computed_pass() {
        // Two pages, two passes: pass 1 reads 0,0; pass 2 reads 1,1.
        let mut s = 0u64;
        s = s.rotate_left(5); // ^ 0
        s = s.rotate_left(5); // ^ 0
        s = s.rotate_left(5) ^ 1;
        s = s.rotate_left(5) ^ 1;
        assert_eq!(expected_checksum(2, 2), s);
        assert_ne!(expected_checksum(3, 2), s);
    }
}
