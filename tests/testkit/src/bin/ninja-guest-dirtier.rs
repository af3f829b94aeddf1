//! Guest program for migration tests: keeps rewriting a known pattern over a few MiB and checks,
//! before each overwrite, that every page still holds what it last wrote there.
//!
//! A migration that loses a dirty page leaves the destination with an older version of that page;
//! the next pass finds it and prints `MISMATCH`. Runs as a static binary inside the busybox
//! initramfs (see scripts/build-fixtures). Output, on the serial console:
//!
//! ```text
//! ninja-guest-dirtier: start mib=4 pages=1024
//! ninja-guest-dirtier: pass=17 ok
//! ninja-guest-dirtier: MISMATCH pass=18 page=12 word=0 expected=... found=...
//! ```

use std::io::Write;
use std::time::{Duration, Instant};

const PAGE_WORDS: usize = 4096 / 8;
const REPORT_EVERY: Duration = Duration::from_millis(250);

/// The value of word `word` of page `page` after pass `pass`: distinct per page, word and pass,
/// never zero (so a page that reads as zero is caught too).
fn pattern(page: usize, word: usize, pass: u64) -> u64 {
    let mut x =
        (page as u64) << 32 ^ (word as u64) << 16 ^ pass.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 33;
    x = x.wrapping_mul(0xFF51_AFD7_ED55_8CCD);
    x ^= x >> 33;
    x | 1
}

/// A word that did not hold what the previous pass wrote.
#[derive(Debug, PartialEq, Eq)]
struct Mismatch {
    page: usize,
    word: usize,
    expected: u64,
    found: u64,
}

/// Checks that every word holds its value from `pass - 1`, rewriting it with `pass` as it goes.
/// Stops at the first stale word and leaves the rest untouched.
fn check_and_rewrite(memory: &mut [u64], pass: u64) -> Result<(), Mismatch> {
    for (page, words) in memory.chunks_exact_mut(PAGE_WORDS).enumerate() {
        for (word, value) in words.iter_mut().enumerate() {
            let expected = pattern(page, word, pass - 1);
            if *value != expected {
                return Err(Mismatch {
                    page,
                    word,
                    expected,
                    found: *value,
                });
            }
            *value = pattern(page, word, pass);
        }
    }
    Ok(())
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(4);
    let pages = mib * 256;
    let mut memory: Vec<u64> = (0..pages * PAGE_WORDS)
        .map(|i| pattern(i / PAGE_WORDS, i % PAGE_WORDS, 0))
        .collect();
    let mut out = std::io::stdout();
    let _ = writeln!(out, "ninja-guest-dirtier: start mib={mib} pages={pages}");

    let mut last_report = Instant::now();
    let mut pass: u64 = 1;
    loop {
        if let Err(m) = check_and_rewrite(&mut memory, pass) {
            let _ = writeln!(
                out,
                "ninja-guest-dirtier: MISMATCH pass={pass} page={} word={} expected={:#x} found={:#x}",
                m.page, m.word, m.expected, m.found
            );
            // Stop dirtying so the evidence stays in place; keep the process alive.
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
        if last_report.elapsed() >= REPORT_EVERY {
            let _ = writeln!(out, "ninja-guest-dirtier: pass={pass} ok");
            last_report = Instant::now();
        }
        pass += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(pages: usize) -> Vec<u64> {
        (0..pages * PAGE_WORDS)
            .map(|i| pattern(i / PAGE_WORDS, i % PAGE_WORDS, 0))
            .collect()
    }

    #[test]
    fn consecutive_passes_check_clean() {
        let mut memory = fresh(8);
        for pass in 1..=5 {
            assert_eq!(check_and_rewrite(&mut memory, pass), Ok(()));
        }
    }

    #[test]
    fn a_stale_page_is_caught() {
        let mut memory = fresh(8);
        check_and_rewrite(&mut memory, 1).unwrap();
        let stale_page: Vec<u64> = memory[3 * PAGE_WORDS..4 * PAGE_WORDS].to_vec();
        check_and_rewrite(&mut memory, 2).unwrap();
        // A migration that missed the pass-2 write of page 3 leaves its pass-1 content behind.
        memory[3 * PAGE_WORDS..4 * PAGE_WORDS].copy_from_slice(&stale_page);
        let m = check_and_rewrite(&mut memory, 3).unwrap_err();
        assert_eq!((m.page, m.word), (3, 0));
        assert_eq!(m.found, pattern(3, 0, 1));
    }

    #[test]
    fn a_zeroed_page_is_caught() {
        let mut memory = fresh(2);
        memory[PAGE_WORDS..].fill(0);
        assert_eq!(check_and_rewrite(&mut memory, 1).unwrap_err().page, 1);
    }
}
