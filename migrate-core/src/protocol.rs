//! The wire protocol, version 1.
//!
//! A migration uses one **control** connection and N **memory** connections (N >= 1), over TCP,
//! a unix socket or an in-process socket pair. All fixed-size fields are little-endian.
//!
//! # Connection preamble (network transports)
//!
//! Every connection opens with a 32-byte [`Preamble`] from the source:
//! `magic "NINJAMIG" | version u32 | role u32 (1 control, 2 memory) | index u32 | memory_count u32 |
//! session u64`. The destination answers on the control connection only, once it holds the
//! control and all memory connections, with a 16-byte [`PreambleReply`]:
//! `magic | version u32 | status u32` (0 accepted, 1 version mismatch, 2 malformed). The preamble
//! layout never changes between versions, so a version mismatch is always a clear error before
//! anything else is sent. In-process pairs skip the preamble.
//!
//! # Control messages
//!
//! Framed as `length u32 | bincode payload` (see [`crate::codec`]), at most
//! [`MAX_CONTROL_FRAME`] bytes. The sequence:
//!
//! ```text
//! source                                destination
//!   Hello{page size, regions, features} ->
//!                                       <- HelloReply{Accept | Refuse(reason)}
//!   (pre-copy rounds on the memory connections; RoundEnd{round} on control after each)
//!   -- source pauses the guest, sends the last dirty pages and END_OF_STREAM on every memory
//!      connection --
//!   State{opaque VMM/vCPU state, pages per connection} ->
//!                                       <- Ready       (all memory and state loaded)
//!   Commit ->
//!                                       <- CommitAck   (destination guest resumed)
//! ```
//!
//! Either side may send `Abort(reason)` and close. The source stays authoritative until it reads
//! `CommitAck`; if anything fails before, it resumes its guest. The destination resumes its guest
//! only after `Commit`. (A cut between the destination resuming and its ack arriving is the one
//! window no two-party protocol can close; the source then reports a commit-phase error.)
//!
//! # Memory stream
//!
//! A sequence of records, each starting with a 16-byte [`RecordHeader`]:
//! `kind u16 | flags u16 (0) | count u32 | arg u64`.
//!
//! * `BATCH`: `count` range entries ([`RangeEntry`], 16 bytes each:
//!   `gpa u64 | pages u32 | flags u32`) follow, then the bytes of every data range in table order,
//!   straight from guest memory. `arg` is the number of data pages in the batch (a cross-check).
//!   A range with flag `ZERO` carries no bytes: the receiver zeroes those pages.
//! * `END_OF_ROUND`: `arg` is the round number just finished.
//! * `END_OF_STREAM`: `arg` is the number of pages (data + zero) this connection carried in the
//!   whole migration. Nothing follows.
//!
//! This module owns these bytes: [`RecordHeader`] and [`RangeEntry`] encode and decode them,
//! [`encode_batch_head`] and [`decode_range_table`] a whole batch head. Moving the page bytes
//! between sockets and guest memory is [`crate::pages`] and [`crate::transport`]'s job.
//!
//! A page always travels on the same memory connection (connection = `(gpa / STRIPE_BYTES) % N`),
//! so a page resent in a later round can never overtake its older copy.
//!
//! The receiver validates every header and every range (known kind and flags, page-aligned
//! address, range inside one guest region, bounded counts) before it touches guest memory.

use crate::dirty::PAGE_SIZE;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Magic bytes opening every connection.
pub const MAGIC: [u8; 8] = *b"NINJAMIG";
/// The protocol version this crate speaks.
pub const PROTOCOL_VERSION: u32 = 1;
/// Size of [`Preamble`] on the wire.
pub const PREAMBLE_LEN: usize = 32;
/// Size of [`PreambleReply`] on the wire.
pub const PREAMBLE_REPLY_LEN: usize = 16;
/// Size of [`RecordHeader`] on the wire.
pub const RECORD_HEADER_LEN: usize = 16;
/// Size of [`RangeEntry`] on the wire.
pub const RANGE_ENTRY_LEN: usize = 16;
/// Most range entries in one batch.
pub const MAX_RANGES_PER_BATCH: u32 = 512;
/// Most data pages (pages whose bytes follow) in one batch: 4 MiB.
pub const MAX_DATA_PAGES_PER_BATCH: u64 = 1024;
/// Most pages one range may cover (zero ranges can be long).
pub const MAX_PAGES_PER_RANGE: u32 = 1 << 20;
/// Largest control frame accepted (the opaque state travels in one).
pub const MAX_CONTROL_FRAME: u32 = 64 << 20;
/// Pages are assigned to memory connections in stripes of this many bytes.
pub const STRIPE_BYTES: u64 = 256 * 1024;
/// Most memory connections a destination accepts.
pub const MAX_MEMORY_CONNECTIONS: u32 = 64;

/// Record kind: a batch of pages.
pub const KIND_BATCH: u16 = 1;
/// Record kind: end of a pre-copy round.
pub const KIND_END_OF_ROUND: u16 = 2;
/// Record kind: end of this connection's stream.
pub const KIND_END_OF_STREAM: u16 = 3;
/// Range flag: the pages are all zero; no bytes follow.
pub const RANGE_ZERO: u32 = 1;

/// Role of a connection, announced in its preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The control connection.
    Control,
    /// Memory connection number `index`.
    Memory,
}

/// The first bytes on every network connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Preamble {
    /// Protocol version of the sender.
    pub version: u32,
    /// Control or memory.
    pub role: Role,
    /// Index of a memory connection (0 for control).
    pub index: u32,
    /// How many memory connections the source opens.
    pub memory_count: u32,
    /// Random id tying the connections of one migration together.
    pub session: u64,
}

impl Preamble {
    /// Encodes to the fixed wire layout.
    pub fn encode(&self) -> [u8; PREAMBLE_LEN] {
        let mut b = [0u8; PREAMBLE_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        let role: u32 = match self.role {
            Role::Control => 1,
            Role::Memory => 2,
        };
        b[12..16].copy_from_slice(&role.to_le_bytes());
        b[16..20].copy_from_slice(&self.index.to_le_bytes());
        b[20..24].copy_from_slice(&self.memory_count.to_le_bytes());
        b[24..32].copy_from_slice(&self.session.to_le_bytes());
        b
    }

    /// Decodes and checks magic and role. The version is returned as sent, unchecked, so the
    /// caller can answer a mismatch.
    pub fn decode(b: &[u8; PREAMBLE_LEN]) -> Result<Self> {
        if b[0..8] != MAGIC {
            return Err(Error::Protocol("bad magic in connection preamble".into()));
        }
        let role = match u32_at(b, 12) {
            1 => Role::Control,
            2 => Role::Memory,
            r => return Err(Error::Protocol(format!("unknown connection role {r}"))),
        };
        Ok(Preamble {
            version: u32_at(b, 8),
            role,
            index: u32_at(b, 16),
            memory_count: u32_at(b, 20),
            session: u64_at(b, 24),
        })
    }
}

/// Destination's answer to the control preamble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreambleReply {
    /// Protocol version of the destination.
    pub version: u32,
    /// 0 accepted, 1 version mismatch, 2 malformed.
    pub status: u32,
}

/// [`PreambleReply::status`]: accepted.
pub const STATUS_OK: u32 = 0;
/// [`PreambleReply::status`]: the versions differ.
pub const STATUS_VERSION_MISMATCH: u32 = 1;
/// [`PreambleReply::status`]: the connection set was malformed.
pub const STATUS_MALFORMED: u32 = 2;

impl PreambleReply {
    /// Encodes to the fixed wire layout.
    pub fn encode(&self) -> [u8; PREAMBLE_REPLY_LEN] {
        let mut b = [0u8; PREAMBLE_REPLY_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.status.to_le_bytes());
        b
    }

    /// Decodes and checks the magic.
    pub fn decode(b: &[u8; PREAMBLE_REPLY_LEN]) -> Result<Self> {
        if b[0..8] != MAGIC {
            return Err(Error::Protocol("bad magic in preamble reply".into()));
        }
        Ok(PreambleReply {
            version: u32_at(b, 8),
            status: u32_at(b, 12),
        })
    }
}

/// A record header on a memory connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record {
    /// `ranges` range entries follow, then `data_pages` pages of bytes.
    Batch {
        /// Number of range entries.
        ranges: u32,
        /// Number of data pages in the batch.
        data_pages: u64,
    },
    /// A pre-copy round ended.
    EndOfRound {
        /// The round number.
        round: u64,
    },
    /// The connection's stream ended.
    EndOfStream {
        /// Pages (data + zero) sent on this connection in total.
        total_pages: u64,
    },
}

/// The raw 16-byte header; see [`Record`].
pub struct RecordHeader;

impl RecordHeader {
    /// Encodes a record header.
    pub fn encode(r: &Record) -> [u8; RECORD_HEADER_LEN] {
        let (kind, count, arg) = match *r {
            Record::Batch { ranges, data_pages } => (KIND_BATCH, ranges, data_pages),
            Record::EndOfRound { round } => (KIND_END_OF_ROUND, 0, round),
            Record::EndOfStream { total_pages } => (KIND_END_OF_STREAM, 0, total_pages),
        };
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[0..2].copy_from_slice(&kind.to_le_bytes());
        b[4..8].copy_from_slice(&count.to_le_bytes());
        b[8..16].copy_from_slice(&arg.to_le_bytes());
        b
    }

    /// Decodes and validates a record header (kind known, flags zero, counts bounded).
    pub fn decode(b: &[u8; RECORD_HEADER_LEN]) -> Result<Record> {
        let kind = u16::from_le_bytes([b[0], b[1]]);
        let flags = u16::from_le_bytes([b[2], b[3]]);
        let count = u32_at(b, 4);
        let arg = u64_at(b, 8);
        if flags != 0 {
            return Err(Error::Protocol(format!("unknown record flags {flags:#x}")));
        }
        match kind {
            KIND_BATCH => {
                if count == 0 || count > MAX_RANGES_PER_BATCH {
                    return Err(Error::Protocol(format!(
                        "batch with {count} ranges (allowed 1..={MAX_RANGES_PER_BATCH})"
                    )));
                }
                if arg > MAX_DATA_PAGES_PER_BATCH {
                    return Err(Error::Protocol(format!(
                        "batch with {arg} data pages (max {MAX_DATA_PAGES_PER_BATCH})"
                    )));
                }
                Ok(Record::Batch {
                    ranges: count,
                    data_pages: arg,
                })
            }
            KIND_END_OF_ROUND | KIND_END_OF_STREAM if count != 0 => Err(Error::Protocol(format!(
                "marker record of kind {kind} with count {count}"
            ))),
            KIND_END_OF_ROUND => Ok(Record::EndOfRound { round: arg }),
            KIND_END_OF_STREAM => Ok(Record::EndOfStream { total_pages: arg }),
            k => Err(Error::Protocol(format!("unknown record kind {k}"))),
        }
    }
}

/// One entry of a batch's range table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RangeEntry {
    /// Guest-physical address of the first page (page-aligned).
    pub gpa: u64,
    /// Number of pages.
    pub pages: u32,
    /// True if the pages are all zero (no bytes follow for this range).
    pub zero: bool,
}

impl RangeEntry {
    /// Encodes into `out` (16 bytes).
    pub fn encode_into(&self, out: &mut [u8]) {
        out[0..8].copy_from_slice(&self.gpa.to_le_bytes());
        out[8..12].copy_from_slice(&self.pages.to_le_bytes());
        let flags = if self.zero { RANGE_ZERO } else { 0 };
        out[12..16].copy_from_slice(&flags.to_le_bytes());
    }

    /// Decodes one entry and checks what can be checked without the memory layout.
    pub fn decode(b: &[u8]) -> Result<Self> {
        if b.len() != RANGE_ENTRY_LEN {
            return Err(Error::Protocol("truncated range entry".into()));
        }
        let gpa = u64_at(b, 0);
        let pages = u32_at(b, 8);
        let flags = u32_at(b, 12);
        if flags & !RANGE_ZERO != 0 {
            return Err(Error::Protocol(format!("unknown range flags {flags:#x}")));
        }
        if gpa % PAGE_SIZE != 0 {
            return Err(Error::Protocol(format!(
                "range address {gpa:#x} not page-aligned"
            )));
        }
        if pages == 0 || pages > MAX_PAGES_PER_RANGE {
            return Err(Error::Protocol(format!(
                "range of {pages} pages (allowed 1..={MAX_PAGES_PER_RANGE})"
            )));
        }
        Ok(RangeEntry {
            gpa,
            pages,
            zero: flags & RANGE_ZERO != 0,
        })
    }
}

/// Pages whose bytes follow in a batch with these ranges (the non-zero ranges' pages).
pub fn data_pages(ranges: &[RangeEntry]) -> u64 {
    ranges
        .iter()
        .filter(|r| !r.zero)
        .map(|r| u64::from(r.pages))
        .sum()
}

/// Encodes the head of a batch: its [`RecordHeader`] and range table, every byte that precedes
/// the page data (which goes on the wire straight from guest memory). `out` is cleared first.
pub fn encode_batch_head(ranges: &[RangeEntry], out: &mut Vec<u8>) {
    out.clear();
    out.extend_from_slice(&RecordHeader::encode(&Record::Batch {
        ranges: ranges.len() as u32,
        data_pages: data_pages(ranges),
    }));
    for r in ranges {
        let mut e = [0u8; RANGE_ENTRY_LEN];
        r.encode_into(&mut e);
        out.extend_from_slice(&e);
    }
}

/// Decodes a batch's range table (the entries announced by [`Record::Batch`]) into `out`
/// (cleared first). Every entry is checked by [`RangeEntry::decode`]; the data pages must stay
/// within [`MAX_DATA_PAGES_PER_BATCH`] and match the header's `data_pages`. Whether the ranges
/// lie inside guest memory is for the receiver to check against its layout.
pub fn decode_range_table(table: &[u8], data_pages: u64, out: &mut Vec<RangeEntry>) -> Result<()> {
    if table.len() % RANGE_ENTRY_LEN != 0 {
        return Err(Error::Protocol("truncated range entry".into()));
    }
    out.clear();
    let mut data = 0u64;
    for e in table.chunks_exact(RANGE_ENTRY_LEN) {
        let r = RangeEntry::decode(e)?;
        if !r.zero {
            data += u64::from(r.pages);
            if data > MAX_DATA_PAGES_PER_BATCH {
                return Err(Error::Protocol(format!(
                    "batch ranges carry more than {MAX_DATA_PAGES_PER_BATCH} data pages"
                )));
            }
        }
        out.push(r);
    }
    if data != data_pages {
        return Err(Error::Protocol(format!(
            "batch header says {data_pages} data pages, its ranges hold {data}"
        )));
    }
    Ok(())
}

/// One guest memory region as announced in the handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionDesc {
    /// Guest-physical start address.
    pub gpa: u64,
    /// Length in bytes (a multiple of the page size).
    pub len: u64,
}

/// The guest memory layout: regions in ascending address order.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct MemoryLayout {
    /// The regions.
    pub regions: Vec<RegionDesc>,
}

impl MemoryLayout {
    /// The layout of existing guest memory.
    pub fn of(mem: &crate::vm::GuestMemory) -> Self {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        MemoryLayout {
            regions: mem
                .iter()
                .map(|r| RegionDesc {
                    gpa: r.start_addr().0,
                    len: r.len(),
                })
                .collect(),
        }
    }

    /// Total bytes of guest memory.
    pub fn total_bytes(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Checks the layout is sane: page-aligned, non-empty, sorted, non-overlapping, bounded.
    pub fn validate(&self) -> Result<()> {
        if self.regions.is_empty() || self.regions.len() > 4096 {
            return Err(Error::Incompatible(format!(
                "memory layout with {} regions",
                self.regions.len()
            )));
        }
        let mut end = 0u64;
        for (i, r) in self.regions.iter().enumerate() {
            if r.len == 0 || r.gpa % PAGE_SIZE != 0 || r.len % PAGE_SIZE != 0 {
                return Err(Error::Incompatible(format!(
                    "region {i} ({:#x}+{:#x}) is empty or not page-aligned",
                    r.gpa, r.len
                )));
            }
            if i > 0 && r.gpa < end {
                return Err(Error::Incompatible(format!(
                    "region {i} overlaps or is unsorted"
                )));
            }
            end = r.gpa.checked_add(r.len).ok_or_else(|| {
                Error::Incompatible(format!("region {i} wraps the address space"))
            })?;
        }
        Ok(())
    }

    /// Creates guest memory with this layout (anonymous mappings, zero-filled).
    pub fn create_memory(&self) -> Result<crate::vm::GuestMemory> {
        self.validate()?;
        let ranges: Vec<(vm_memory::GuestAddress, usize)> = self
            .regions
            .iter()
            .map(|r| (vm_memory::GuestAddress(r.gpa), r.len as usize))
            .collect();
        crate::vm::GuestMemory::from_ranges(&ranges).map_err(|e| Error::Memory(e.to_string()))
    }
}

/// Feature bits both sides must agree on. Version 1 defines none.
pub const FEATURES: u64 = 0;

/// A structured message on the control connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlMessage {
    /// Source -> destination: what is about to be migrated.
    Hello {
        /// Page size in bytes (4096).
        page_size: u32,
        /// Guest memory layout.
        layout: MemoryLayout,
        /// Feature bits.
        features: u64,
    },
    /// Destination -> source: whether the destination takes the guest.
    HelloReply {
        /// `None` = accepted; `Some(reason)` = refused.
        refused: Option<String>,
    },
    /// Source -> destination: a pre-copy round finished (informational).
    RoundEnd {
        /// Round number.
        round: u32,
        /// Pages sent in the round.
        pages: u64,
    },
    /// Source -> destination: the guest is paused, memory is complete; here is its state.
    State {
        /// Opaque VMM and vCPU state.
        state: Vec<u8>,
        /// Pages each memory connection carried (must match what the destination received).
        pages_per_connection: Vec<u64>,
    },
    /// Destination -> source: memory and state loaded, ready to run.
    Ready,
    /// Source -> destination: the destination owns the guest now.
    Commit,
    /// Destination -> source: the guest runs on the destination.
    CommitAck,
    /// Either side: giving up.
    Abort {
        /// Why.
        reason: String,
    },
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preamble_round_trips_and_has_fixed_bytes() {
        let p = Preamble {
            version: 1,
            role: Role::Memory,
            index: 2,
            memory_count: 3,
            session: 0x0102030405060708,
        };
        let b = p.encode();
        assert_eq!(&b[0..8], b"NINJAMIG");
        assert_eq!(&b[8..16], &[1, 0, 0, 0, 2, 0, 0, 0]);
        assert_eq!(&b[24..32], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(Preamble::decode(&b).unwrap(), p);
    }

    #[test]
    fn record_header_golden_bytes() {
        let b = RecordHeader::encode(&Record::Batch {
            ranges: 2,
            data_pages: 3,
        });
        assert_eq!(b, [1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(
            RecordHeader::decode(&b).unwrap(),
            Record::Batch {
                ranges: 2,
                data_pages: 3
            }
        );
    }

    #[test]
    fn record_header_rejects_bad_values() {
        let mut b = RecordHeader::encode(&Record::EndOfRound { round: 1 });
        b[2] = 1; // flags
        assert!(RecordHeader::decode(&b).is_err());
        let mut b = RecordHeader::encode(&Record::EndOfRound { round: 1 });
        b[0] = 9; // kind
        assert!(RecordHeader::decode(&b).is_err());
        let b = RecordHeader::encode(&Record::Batch {
            ranges: MAX_RANGES_PER_BATCH + 1,
            data_pages: 1,
        });
        assert!(RecordHeader::decode(&b).is_err());
        let b = RecordHeader::encode(&Record::Batch {
            ranges: 0,
            data_pages: 0,
        });
        assert!(RecordHeader::decode(&b).is_err());
    }

    #[test]
    fn range_entry_rejects_misaligned_and_unknown_flags() {
        let mut b = [0u8; 16];
        RangeEntry {
            gpa: 0x1000,
            pages: 1,
            zero: true,
        }
        .encode_into(&mut b);
        assert!(RangeEntry::decode(&b).unwrap().zero);
        b[0] = 1;
        assert!(RangeEntry::decode(&b).is_err());
        b[0] = 0;
        b[12] = 2;
        assert!(RangeEntry::decode(&b).is_err());
    }

    #[test]
    fn preamble_reply_golden_bytes() {
        let r = PreambleReply {
            version: 1,
            status: STATUS_VERSION_MISMATCH,
        };
        let b = r.encode();
        assert_eq!(&b[0..8], b"NINJAMIG");
        assert_eq!(&b[8..16], &[1, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(PreambleReply::decode(&b).unwrap(), r);
    }

    #[test]
    fn marker_headers_golden_bytes() {
        let r = Record::EndOfRound { round: 0x0102 };
        let b = RecordHeader::encode(&r);
        assert_eq!(b, [2, 0, 0, 0, 0, 0, 0, 0, 2, 1, 0, 0, 0, 0, 0, 0]);
        assert_eq!(RecordHeader::decode(&b).unwrap(), r);
        let r = Record::EndOfStream { total_pages: 7 };
        let b = RecordHeader::encode(&r);
        assert_eq!(b, [3, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0]);
        assert_eq!(RecordHeader::decode(&b).unwrap(), r);
    }

    #[test]
    fn range_entry_golden_bytes_and_round_trip() {
        let e = RangeEntry {
            gpa: 0x0123_4000,
            pages: 3,
            zero: true,
        };
        let mut b = [0u8; RANGE_ENTRY_LEN];
        e.encode_into(&mut b);
        assert_eq!(b, [0, 0x40, 0x23, 0x01, 0, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0]);
        assert_eq!(RangeEntry::decode(&b).unwrap(), e);
        let e = RangeEntry { zero: false, ..e };
        e.encode_into(&mut b);
        assert_eq!(&b[12..16], &[0, 0, 0, 0]);
        assert_eq!(RangeEntry::decode(&b).unwrap(), e);
    }

    #[test]
    fn batch_head_golden_bytes_and_round_trip() {
        let ranges = [
            RangeEntry {
                gpa: 0x1000,
                pages: 2,
                zero: false,
            },
            RangeEntry {
                gpa: 0x8000,
                pages: 5,
                zero: true,
            },
        ];
        let mut b = Vec::new();
        encode_batch_head(&ranges, &mut b);
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            1, 0, 0, 0, 2, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, // BATCH, 2 ranges, 2 data pages
            0, 0x10, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0, // 0x1000, 2 pages
            0, 0x80, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 1, 0, 0, 0, // 0x8000, 5 pages, ZERO
        ];
        assert_eq!(b, want);
        let h: [u8; RECORD_HEADER_LEN] = b[..RECORD_HEADER_LEN].try_into().unwrap();
        let Record::Batch {
            ranges: n,
            data_pages,
        } = RecordHeader::decode(&h).unwrap()
        else {
            panic!("not a batch");
        };
        assert_eq!(n, 2);
        let mut got = Vec::new();
        decode_range_table(&b[RECORD_HEADER_LEN..], data_pages, &mut got).unwrap();
        assert_eq!(got, ranges);
        // The header's data page count must match the table.
        let err = decode_range_table(&b[RECORD_HEADER_LEN..], 3, &mut got).unwrap_err();
        assert!(err.to_string().contains("data pages"), "{err}");
        assert!(decode_range_table(&b[RECORD_HEADER_LEN..40], 2, &mut got).is_err());
    }

    #[test]
    fn layout_validation() {
        let ok = MemoryLayout {
            regions: vec![
                RegionDesc { gpa: 0, len: 8192 },
                RegionDesc {
                    gpa: 1 << 20,
                    len: 4096,
                },
            ],
        };
        ok.validate().unwrap();
        let overlap = MemoryLayout {
            regions: vec![
                RegionDesc { gpa: 0, len: 8192 },
                RegionDesc {
                    gpa: 4096,
                    len: 4096,
                },
            ],
        };
        assert!(overlap.validate().is_err());
        let wrap = MemoryLayout {
            regions: vec![RegionDesc {
                gpa: u64::MAX - 4095,
                len: 8192,
            }],
        };
        assert!(wrap.validate().is_err());
    }
}
