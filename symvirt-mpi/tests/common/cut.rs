//! The transparent layer's cut records (`SYMVIRT_CUT_LOG`): per rank, how many messages it had
//! sent to and received from each peer when it paused, and the check every cut must pass.

use super::read_records;
use std::path::Path;

/// Per rank: (sent to each peer, received from each peer) at the cut of `epoch`.
pub fn read_cut(dir: &Path, epoch: u64) -> Vec<(Vec<u64>, Vec<u64>)> {
    read_records(dir, "cut", epoch)
        .iter()
        .map(|rec| {
            let mut lines = rec.lines();
            let mut row = |label: &str| -> Vec<u64> {
                let l = lines
                    .next()
                    .unwrap_or_else(|| panic!("short record {rec:?}"));
                let mut w = l.split_whitespace();
                assert_eq!(w.next(), Some(label), "{rec:?}");
                w.map(|x| x.parse().unwrap()).collect()
            };
            (row("sent"), row("received"))
        })
        .collect()
}

/// Every pair: what i sent to j is what j received from i. Returns the global total.
pub fn check_pairs(cut: &[(Vec<u64>, Vec<u64>)], epoch: u64) -> u64 {
    let n = cut.len();
    let mut total = 0;
    for i in 0..n {
        for j in 0..n {
            assert_eq!(
                cut[i].0[j], cut[j].1[i],
                "epoch {epoch}: rank {i} sent {} messages to rank {j}, which received {}: {cut:?}",
                cut[i].0[j], cut[j].1[i]
            );
            total += cut[i].0[j];
        }
    }
    total
}

/// The explicit safe point's cut records of `epoch` (`iteration sent received`, written by the
/// stress program's quiesce hook): every rank at the same iteration, global sent == received.
/// Returns the global sent count.
pub fn check_iterations(dir: &Path, epoch: u64) -> u64 {
    let recs = read_records(dir, "cut", epoch);
    let parsed: Vec<[u64; 3]> = recs
        .iter()
        .map(|r| {
            let v: Vec<u64> = r.split_whitespace().map(|x| x.parse().unwrap()).collect();
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
