//! The cut reports the agent keeps for the host: per epoch, what every local rank had sent and
//! received at the cut (its `counts`) and how long it took to get there after `prepare`.
//!
//! Only the last [`REPORTED_EPOCHS`] epochs are kept. The host reads a report part by part
//! (`report{epoch, cursor}`), one [`CountsChunk`] of one rank per part, so a report of any
//! size crosses the channel in bounded lines. Counts a rank got wrong do not fail its cut:
//! the report of that epoch says so instead.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;
use symvirt_proto::cut_report::{COUNTS_CHUNK, CountsChunk, RankCounts, RankCut};
use symvirt_proto::protocol::{GuestMessage, REPORTED_EPOCHS};

/// One local rank at one cut.
#[derive(Debug, Default)]
struct RankRecord {
    /// Counts while chunks arrive.
    counts: Option<RankCounts>,
    /// The finished record, once the rank is at the cut with complete counts.
    cut: Option<RankCut>,
    /// Why there is no record (bad counts, counts incomplete at the cut).
    error: Option<String>,
    /// Whether the rank reached the cut.
    quiesced: bool,
}

/// One epoch.
#[derive(Debug)]
struct EpochRecords {
    epoch: u64,
    prepared_at: Instant,
    /// How many ranks the agent expects.
    expected: u32,
    ranks: BTreeMap<u32, RankRecord>,
}

/// The reports of the last [`REPORTED_EPOCHS`] epochs, oldest first.
#[derive(Debug, Default)]
pub(crate) struct CutReports {
    epochs: VecDeque<EpochRecords>,
}

impl CutReports {
    /// A `prepare` for `epoch` reached the ranks: its clock starts.
    pub(crate) fn begin(&mut self, epoch: u64, expected: u32) {
        if self.epochs.len() == REPORTED_EPOCHS {
            self.epochs.pop_front();
        }
        self.epochs.push_back(EpochRecords {
            epoch,
            prepared_at: Instant::now(),
            expected,
            ranks: BTreeMap::new(),
        });
    }

    fn rank(&mut self, epoch: u64, rank: u32) -> Option<&mut RankRecord> {
        let e = self.epochs.iter_mut().rev().find(|e| e.epoch == epoch)?;
        Some(e.ranks.entry(rank).or_default())
    }

    /// Part of `rank`'s counts for `epoch`.
    pub(crate) fn counts(&mut self, epoch: u64, rank: u32, chunk: &CountsChunk) {
        let Some(r) = self.rank(epoch, rank) else {
            return;
        };
        if r.quiesced || r.error.is_some() {
            let why = "counts after the rank reached the cut";
            r.error.get_or_insert_with(|| format!("rank {rank}: {why}"));
            return;
        }
        let added = match r.counts.as_mut() {
            None => RankCounts::new(chunk).map(|c| r.counts = Some(c)),
            Some(c) => c.add(chunk),
        };
        if let Err(e) = added {
            log::warn!("epoch {epoch}: rank {rank} sent bad counts: {e}");
            r.error = Some(format!("rank {rank} sent bad counts: {e}"));
            r.counts = None;
        }
    }

    /// `rank` reached the cut of `epoch`.
    pub(crate) fn quiesced(&mut self, epoch: u64, rank: u32) {
        let Some(e) = self.epochs.iter_mut().rev().find(|e| e.epoch == epoch) else {
            return;
        };
        let ms = u64::try_from(e.prepared_at.elapsed().as_millis()).unwrap_or(u64::MAX);
        let r = e.ranks.entry(rank).or_default();
        r.quiesced = true;
        match r.counts.take() {
            Some(c) if c.complete() => match c.finish(rank, Some(ms)) {
                Ok(cut) => r.cut = Some(cut),
                Err(e) => r.error = Some(e.to_string()),
            },
            Some(_) => {
                r.error = Some(format!(
                    "rank {rank} reached the cut with its counts incomplete"
                ))
            }
            None => {}
        }
    }

    /// The answer to the host's `report{epoch, cursor}`.
    pub(crate) fn part(&self, epoch: u64, cursor: u64) -> GuestMessage {
        let none = |reason: String| GuestMessage::NoReport { epoch, reason };
        let Some(e) = self.epochs.iter().find(|e| e.epoch == epoch) else {
            return none(format!(
                "the agent holds reports of its last {REPORTED_EPOCHS} cuts; epoch {epoch} is \
                 not one of them"
            ));
        };
        let mut records = Vec::new();
        for (rank, r) in &e.ranks {
            if let Some(why) = &r.error {
                return none(why.clone());
            }
            if r.quiesced {
                match &r.cut {
                    Some(cut) => records.push(cut),
                    None => {
                        return none(format!(
                            "rank {rank} sent no counts (ranks of the explicit API do not \
                             count their messages)"
                        ));
                    }
                }
            }
        }
        if records.len() < e.expected as usize {
            return none(format!(
                "{} of the {} ranks reached the cut of epoch {epoch}",
                records.len(),
                e.expected
            ));
        }
        // Part `cursor` is the `cursor`-th chunk, counting every rank's chunks in rank order.
        let mut skip = cursor;
        for (i, cut) in records.iter().enumerate() {
            // Parts per rank, counted without splitting every record for every part asked.
            let n = cut.sent.len().div_ceil(COUNTS_CHUNK) as u64;
            if skip >= n {
                skip -= n;
                continue;
            }
            let counts = match cut.chunks() {
                Ok(mut c) => c.swap_remove(skip as usize),
                Err(err) => return none(err.to_string()),
            };
            let last = i + 1 == records.len() && skip + 1 == n;
            return GuestMessage::Report {
                epoch,
                cursor,
                next: (!last).then_some(cursor + 1),
                rank: cut.rank,
                quiesce_ms: cut.quiesce_ms,
                counts,
            };
        }
        none(format!("the report of epoch {epoch} has no part {cursor}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(world: usize, rank: u64) -> Vec<CountsChunk> {
        let sent: Vec<u64> = (0..world as u64).map(|p| rank * 1000 + p).collect();
        CountsChunk::split(&sent, &sent, rank).unwrap()
    }

    /// Reads every part as the host does.
    fn read_all(reports: &CutReports, epoch: u64) -> Result<Vec<(u32, CountsChunk)>, String> {
        let mut parts = Vec::new();
        let mut cursor = Some(0);
        while let Some(c) = cursor {
            match reports.part(epoch, c) {
                GuestMessage::Report {
                    rank, next, counts, ..
                } => {
                    parts.push((rank, counts));
                    cursor = next;
                }
                GuestMessage::NoReport { reason, .. } => return Err(reason),
                other => panic!("{other:?}"),
            }
        }
        Ok(parts)
    }

    #[test]
    fn every_ranks_counts_come_back_part_by_part() {
        let world = COUNTS_CHUNK + 3;
        let mut reports = CutReports::default();
        reports.begin(5, 2);
        for rank in [7u32, 2] {
            for c in chunks(world, u64::from(rank)).iter().rev() {
                reports.counts(5, rank, c);
            }
        }
        let early = read_all(&reports, 5).unwrap_err();
        assert!(
            early.contains("0 of the 2 ranks reached the cut"),
            "{early}"
        );
        reports.quiesced(5, 7);
        reports.quiesced(5, 2);
        let parts = read_all(&reports, 5).unwrap();
        let ranks: Vec<u32> = parts.iter().map(|p| p.0).collect();
        assert_eq!(ranks, vec![2, 2, 7, 7]);
        assert_eq!(parts[3].1.sent, vec![7064, 7065, 7066]);
        assert_eq!(parts[0].1.drained, 2);
        let beyond = read_all(&reports, 4).unwrap_err();
        assert!(beyond.contains("epoch 4 is not one of them"), "{beyond}");
        match reports.part(5, 4) {
            GuestMessage::NoReport { reason, .. } => assert!(reason.contains("no part 4")),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn missing_bad_and_late_counts_are_reported_not_invented() {
        let mut reports = CutReports::default();
        reports.begin(1, 1);
        reports.quiesced(1, 0);
        let e = read_all(&reports, 1).unwrap_err();
        assert!(e.contains("rank 0 sent no counts"), "{e}");

        reports.begin(2, 1);
        reports.counts(2, 0, &chunks(COUNTS_CHUNK + 1, 0)[0]);
        reports.quiesced(2, 0);
        let e = read_all(&reports, 2).unwrap_err();
        assert!(e.contains("counts incomplete"), "{e}");

        reports.begin(3, 1);
        let c = chunks(2, 0);
        reports.counts(3, 0, &c[0]);
        reports.counts(3, 0, &c[0]);
        reports.quiesced(3, 0);
        let e = read_all(&reports, 3).unwrap_err();
        assert!(e.contains("counted twice"), "{e}");

        reports.begin(4, 1);
        reports.counts(4, 0, &c[0]);
        reports.quiesced(4, 0);
        reports.counts(4, 0, &c[0]);
        let e = read_all(&reports, 4).unwrap_err();
        assert!(e.contains("after the rank reached the cut"), "{e}");
    }

    #[test]
    fn only_the_last_epochs_are_kept() {
        let mut reports = CutReports::default();
        for epoch in 1..=REPORTED_EPOCHS as u64 + 1 {
            reports.begin(epoch, 1);
            reports.counts(epoch, 0, &chunks(1, 0)[0]);
            reports.quiesced(epoch, 0);
        }
        assert!(read_all(&reports, 1).is_err());
        assert_eq!(read_all(&reports, 2).unwrap().len(), 1);
        assert_eq!(
            read_all(&reports, REPORTED_EPOCHS as u64 + 1)
                .unwrap()
                .len(),
            1
        );
    }
}
