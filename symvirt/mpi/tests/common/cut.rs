//! The transparent layer's cut records (`SYMVIRT_CUT_LOG`): per rank, how many messages it had
//! sent to and received from each peer when it paused, and the check every cut must pass.

use super::read_records;
use std::path::Path;
use symvirt_mpi::cut_log::{self, CutReport};

/// The cut of `epoch`, once every rank has written its record.
pub fn read_cut(dir: &Path, epoch: u64) -> CutReport {
    // Waits for every record, then reads them with the library's reader.
    read_records(dir, "cut", epoch);
    cut_log::read(dir, epoch).unwrap_or_else(|e| panic!("epoch {epoch}: {e}"))
}

/// Every pair: what i sent to j is what j received from i. Returns the global total.
pub fn check_pairs(cut: &CutReport, epoch: u64) -> u64 {
    let broken = cut.mismatches();
    assert!(
        broken.is_empty(),
        "epoch {epoch}: pairs that disagree (rank from sent to rank to, which received): \
         {broken:?}; records: {cut:?}"
    );
    cut.messages()
}

/// The cut of `epoch` was made by each rank's own thread where a rank had an MPI-IO file open
/// (it may have been inside an MPI-IO call the layer does not wrap), and everywhere when
/// `own_thread_only` (the progress thread switched off). Returns how many ranks had a file open.
pub fn check_cut_makers(dir: &Path, epoch: u64, own_thread_only: bool) -> usize {
    let mut with_files = 0;
    for (maker, files) in cut_threads(dir, epoch) {
        assert!(
            (files == 0 && !own_thread_only) || maker == "the application's thread",
            "epoch {epoch}: a rank with {files} files open was cut by {maker}"
        );
        with_files += usize::from(files > 0);
    }
    with_files
}

/// What a record's line `<label><value>` says (`label` with its trailing space, e.g. `"serves "`).
pub fn record_line<'a>(record: &'a str, label: &str) -> &'a str {
    record
        .lines()
        .find_map(|l| l.strip_prefix(label))
        .unwrap_or_else(|| panic!("no {label:?} line in {record:?}"))
}

/// Each rank's record of the cut of `epoch`: which thread made it ("the progress thread" or
/// "the application's thread") and how many MPI-IO files the rank had open.
pub fn cut_threads(dir: &Path, epoch: u64) -> Vec<(String, u32)> {
    read_records(dir, "cut", epoch)
        .iter()
        .map(|record| {
            (
                record_line(record, "made by ").to_string(),
                record_line(record, "open files ")
                    .parse()
                    .unwrap_or_else(|_| panic!("epoch {epoch}: open files in {record:?}")),
            )
        })
        .collect()
}

/// The explicit safe point's cut records of `epoch` (`iteration sent received WHERE BY`,
/// written by the stress program's quiesce hook): every rank at the same iteration, global
/// sent == received. Returns the global sent count.
pub fn check_iterations(dir: &Path, epoch: u64) -> u64 {
    let recs = read_records(dir, "cut", epoch);
    let parsed: Vec<[u64; 3]> = recs
        .iter()
        .map(|r| {
            let v: Vec<u64> = r
                .split_whitespace()
                .take(3)
                .map(|x| x.parse().unwrap())
                .collect();
            [v[0], v[1], v[2]]
        })
        .collect();
    let iteration = parsed[0][0];
    assert!(
        parsed.iter().all(|p| p[0] == iteration),
        "epoch {epoch}: ranks stopped at different iterations: {recs:?}"
    );
    let sent: u64 = parsed.iter().map(|p| p[1]).sum();
    let received: u64 = parsed.iter().map(|p| p[2]).sum();
    assert_eq!(
        sent, received,
        "epoch {epoch}: cut not consistent: {recs:?}"
    );
    sent
}

/// Where each rank's explicit cut of `epoch` fell and which thread ran its quiesce hook: the
/// last two words of the stress program's record (`quiet` or `safe_point`; `main` or `thread`).
pub fn explicit_cut_places(dir: &Path, epoch: u64) -> Vec<(String, String)> {
    read_records(dir, "cut", epoch)
        .iter()
        .map(|r| {
            let w: Vec<&str> = r.split_whitespace().collect();
            assert_eq!(w.len(), 5, "epoch {epoch}: record {r:?}");
            (w[3].to_string(), w[4].to_string())
        })
        .collect()
}
