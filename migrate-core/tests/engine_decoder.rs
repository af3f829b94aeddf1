//! Bad input to the receiver's decoder: clear errors, no panic, no write outside guest memory,
//! and no write to guest memory at all from a record that fails validation.

use migrate_core::Error;
use migrate_core::codec;
use migrate_core::pages::{GuestPages, fuzz_memory_stream, page_hashes, receive_stream};
use migrate_core::protocol::{
    MAX_DATA_PAGES_PER_BATCH, MAX_RANGES_PER_BATCH, RangeEntry, Record, RecordHeader,
};
use migrate_core::vm::GuestMemory;
use vm_memory::GuestAddress;

fn header(r: Record) -> Vec<u8> {
    RecordHeader::encode(&r).to_vec()
}

fn entry(gpa: u64, pages: u32, zero: bool) -> Vec<u8> {
    let mut b = [0u8; 16];
    RangeEntry { gpa, pages, zero }.encode_into(&mut b);
    b.to_vec()
}

fn batch(ranges: &[(u64, u32, bool)]) -> Vec<u8> {
    let data: u64 = ranges.iter().filter(|r| !r.2).map(|r| u64::from(r.1)).sum();
    let mut v = header(Record::Batch {
        ranges: ranges.len() as u32,
        data_pages: data,
    });
    for &(g, n, z) in ranges {
        v.extend(entry(g, n, z));
    }
    for &(_, n, z) in ranges {
        if !z {
            v.extend(std::iter::repeat_n(0xabu8, n as usize * 4096));
        }
    }
    v
}

fn end(total: u64) -> Vec<u8> {
    header(Record::EndOfStream { total_pages: total })
}

/// The decoder's guest: 64 KiB at 0 and 64 KiB at 1 MiB (same as `fuzz_memory_stream`).
fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[
        (GuestAddress(0), 0x10000),
        (GuestAddress(0x10_0000), 0x10000),
    ])
    .unwrap()
}

/// Feeds `input`; returns the error and asserts guest memory is untouched (all zero).
fn rejected(input: &[u8]) -> Error {
    let mem = memory();
    let pages = GuestPages::new(&mem).unwrap();
    let mut src = input;
    let err = receive_stream(&mut src, &pages, |_| Ok(())).expect_err("bad input accepted");
    let zero = page_hashes(&memory()).unwrap();
    assert_eq!(
        page_hashes(&mem).unwrap(),
        zero,
        "guest memory written before validation"
    );
    err
}

#[test]
fn valid_stream_lands_where_addressed() {
    let mut s = batch(&[(0x1000, 2, false), (0x10_0000, 1, false), (0x3000, 1, true)]);
    s.extend(header(Record::EndOfRound { round: 0 }));
    s.extend(end(4));
    let c = fuzz_memory_stream(&s).unwrap();
    assert_eq!((c.data_pages, c.zero_pages, c.rounds), (3, 1, 1));
    let mem = memory();
    let pages = GuestPages::new(&mem).unwrap();
    receive_stream(&mut &s[..], &pages, |_| Ok(())).unwrap();
    use vm_memory::Bytes;
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0xab);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x2fff)).unwrap(), 0xab);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3000)).unwrap(), 0);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0000)).unwrap(), 0xab);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(0x0fff)).unwrap(), 0);
}

#[test]
fn truncated_headers_are_disconnects() {
    for cut in [0, 1, 8, 15] {
        let s = batch(&[(0x1000, 1, false)]);
        let e = rejected(&s[..cut]);
        assert!(matches!(e, Error::Disconnected), "cut {cut}: {e:?}");
    }
    // Header complete, range table truncated.
    let s = batch(&[(0x1000, 1, false), (0x2000, 1, false)]);
    assert!(matches!(rejected(&s[..16 + 20]), Error::Disconnected));
    // Page data truncated: the stream ends; no panic (the partial page may have landed).
    let s = batch(&[(0x1000, 1, false)]);
    assert!(fuzz_memory_stream(&s[..s.len() - 100]).is_err());
}

#[test]
fn out_of_range_addresses_are_refused_before_writing() {
    for (gpa, pages) in [
        (0x10000, 1),          // just past region 0 (in the hole)
        (0xf000, 2),           // starts inside region 0, ends past it
        (0x8_0000, 1),         // in the hole
        (0x11_0000, 1),        // just past region 1
        (0x10_f000, 2),        // crosses region 1's end
        (u64::MAX - 4095, 1),  // wraps
        (0xffff_ffff_f000, 1), // far away
    ] {
        let mut s = batch(&[(0x1000, 1, false), (gpa, pages, false)]);
        s.extend(end(2));
        let e = rejected(&s);
        assert!(
            e.to_string().contains("outside guest memory"),
            "{gpa:#x}: {e}"
        );
    }
    // The same for zero ranges (they would write zeroes).
    let mut s = batch(&[(0x10000, 1, true)]);
    s.extend(end(1));
    assert!(rejected(&s).to_string().contains("outside guest memory"));
    // Misaligned address.
    let mut s = batch(&[(0x1001, 1, false)]);
    s.extend(end(1));
    assert!(rejected(&s).to_string().contains("page-aligned"));
}

#[test]
fn wrong_page_counts_are_refused() {
    // Header claims 2 data pages, ranges hold 1.
    let mut s = header(Record::Batch {
        ranges: 1,
        data_pages: 2,
    });
    s.extend(entry(0x1000, 1, false));
    s.extend(vec![1u8; 2 * 4096]);
    let e = rejected(&s);
    assert!(e.to_string().contains("data pages"), "{e}");
    // Zero-page range of 0 pages.
    let mut s = header(Record::Batch {
        ranges: 1,
        data_pages: 0,
    });
    s.extend(entry(0x1000, 0, true));
    assert!(rejected(&s).to_string().contains("range of 0 pages"));
    // End of stream claiming more pages than arrived.
    let mut s = batch(&[(0x1000, 1, true)]);
    s.extend(end(5));
    let e = fuzz_memory_stream(&s).unwrap_err();
    assert!(e.to_string().contains("claiming 5 pages"), "{e}");
}

#[test]
fn oversized_messages_are_refused() {
    let e = rejected(&header(Record::Batch {
        ranges: MAX_RANGES_PER_BATCH + 1,
        data_pages: 1,
    }));
    assert!(e.to_string().contains("ranges"), "{e}");
    let e = rejected(&header(Record::Batch {
        ranges: 1,
        data_pages: MAX_DATA_PAGES_PER_BATCH + 1,
    }));
    assert!(e.to_string().contains("data pages"), "{e}");
    // Ranges that together exceed the per-batch data limit although the header is in bounds.
    let mut s = header(Record::Batch {
        ranges: 2,
        data_pages: MAX_DATA_PAGES_PER_BATCH,
    });
    s.extend(entry(0, 16, false));
    s.extend(entry(0x10_0000, 1 << 20, false));
    let _ = rejected(&s);
    // Control frames over the limit.
    let mut f = (u32::MAX).to_le_bytes().to_vec();
    f.extend([0u8; 16]);
    let e = codec::read_message(&mut &f[..]).unwrap_err();
    assert!(e.to_string().contains("exceeds"), "{e}");
}

#[test]
fn unknown_kinds_and_flags_are_refused() {
    let mut h = header(Record::EndOfRound { round: 1 });
    h[0] = 77;
    assert!(rejected(&h).to_string().contains("unknown record kind"));
    let mut h = header(Record::EndOfRound { round: 1 });
    h[3] = 0x80;
    assert!(rejected(&h).to_string().contains("flags"));
    let mut s = header(Record::Batch {
        ranges: 1,
        data_pages: 0,
    });
    let mut e = entry(0x1000, 1, true);
    e[12] |= 4;
    s.extend(e);
    assert!(rejected(&s).to_string().contains("range flags"));
}

/// xorshift64*: a fixed-seed generator so failures reproduce.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

fn random_valid_stream(r: &mut Rng) -> Vec<u8> {
    let mut v = Vec::new();
    let mut total = 0;
    for _ in 0..r.below(4) {
        let n = 1 + r.below(3) as usize;
        let ranges: Vec<(u64, u32, bool)> = (0..n)
            .map(|_| {
                let base = if r.below(2) == 0 { 0 } else { 0x10_0000 };
                (
                    base + r.below(14) * 4096,
                    1 + r.below(2) as u32,
                    r.below(3) == 0,
                )
            })
            .collect();
        total += ranges.iter().map(|x| u64::from(x.1)).sum::<u64>();
        v.extend(batch(&ranges));
        if r.below(2) == 0 {
            v.extend(header(Record::EndOfRound { round: r.below(10) }));
        }
    }
    v.extend(end(total));
    v
}

#[test]
fn random_and_mutated_inputs_never_panic() {
    let mut r = Rng(0x5eed_1234_abcd_ef01);
    let mut accepted = 0;
    for i in 0..20_000 {
        let mut input = random_valid_stream(&mut r);
        match i % 5 {
            0 => {} // valid
            1 => {
                // Flip a few bytes, mostly in headers and tables.
                for _ in 0..1 + r.below(4) {
                    let at = r.below(input.len().min(64) as u64) as usize;
                    input[at] ^= 1 << r.below(8);
                }
            }
            2 => {
                let at = r.below(input.len() as u64) as usize;
                input.truncate(at);
            }
            3 => {
                // Overwrite a u64 anywhere with an extreme value.
                let at = r.below(input.len().saturating_sub(8) as u64) as usize;
                let x = [0u64, u64::MAX, 1 << 32, 0x10_0000, 0xffff][r.below(5) as usize];
                input[at..at + 8].copy_from_slice(&x.to_le_bytes());
            }
            _ => {
                input = (0..r.below(300)).map(|_| r.next() as u8).collect();
            }
        }
        if fuzz_memory_stream(&input).is_ok() {
            accepted += 1;
        }
        let _ = codec::decode(&input[..input.len().min(512)]);
    }
    // The generator's valid streams (every 5th) must all be accepted.
    assert!(accepted >= 4000, "only {accepted} accepted");
}
