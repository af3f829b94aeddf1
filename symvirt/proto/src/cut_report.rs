//! What a cut was: per rank, the messages it had sent to and received from every rank, and
//! how many the MPI layer drained off the wire to get there. A cut is consistent when, for
//! every pair, what rank `i` sent to `j` is what `j` received from `i`: no message in flight,
//! none received that was not sent.
//!
//! The counts travel from every rank to its guest's agent ([`crate::rank::RankRequest::Counts`])
//! and from the agent to the host ([`crate::protocol::GuestMessage::Report`]) in
//! [`CountsChunk`]s of at most [`COUNTS_CHUNK`] peers, so a line stays under
//! [`crate::protocol::MAX_LINE`] for any job size; [`RankCounts`] puts one rank's chunks back
//! together, [`CutReport::assemble`] puts the ranks of a job together.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};

/// The most peers one [`CountsChunk`] carries: 2 x 64 twenty-digit counts fit a line.
pub const COUNTS_CHUNK: usize = 64;

/// The largest job (ranks in `MPI_COMM_WORLD`) whose cuts are reported: bounds what a rank can
/// make its agent hold (16 bytes per peer per rank).
pub const MAX_WORLD: u32 = 1 << 16;

/// One rank's counts for the peers `first..first + sent.len()` of a job of `world` ranks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CountsChunk {
    /// Ranks in the job.
    pub world: u32,
    /// The first peer this chunk counts.
    pub first: u32,
    /// Messages sent to each peer.
    pub sent: Vec<u64>,
    /// Messages received from each peer (the layer's buffer included).
    pub received: Vec<u64>,
    /// Messages the layer drained into its buffer to reach the cut (the same in every chunk).
    pub drained: u64,
}

impl CountsChunk {
    /// Checks the bounds: a known job size, at most [`COUNTS_CHUNK`] peers, inside the job.
    pub fn validate(&self) -> Result<()> {
        let n = self.sent.len();
        if self.world == 0 || self.world > MAX_WORLD {
            return Err(Error::Invalid(format!(
                "counts: a job of {} ranks (1..={MAX_WORLD})",
                self.world
            )));
        }
        if n == 0 || n > COUNTS_CHUNK || self.received.len() != n {
            return Err(Error::Invalid(format!(
                "counts: {n} sent and {} received (1..={COUNTS_CHUNK} of each, as many)",
                self.received.len()
            )));
        }
        if u64::from(self.first) + n as u64 > u64::from(self.world) {
            return Err(Error::Invalid(format!(
                "counts: peers {}..{} of a job of {}",
                self.first,
                u64::from(self.first) + n as u64,
                self.world
            )));
        }
        Ok(())
    }

    /// The longest a chunk can be written: every number at its maximum (the tests check that
    /// a message carrying it fits a line).
    #[cfg(test)]
    pub(crate) fn largest() -> CountsChunk {
        CountsChunk {
            world: MAX_WORLD,
            first: MAX_WORLD - COUNTS_CHUNK as u32,
            sent: vec![u64::MAX; COUNTS_CHUNK],
            received: vec![u64::MAX; COUNTS_CHUNK],
            drained: u64::MAX,
        }
    }

    /// Splits one rank's counts into chunks, in peer order.
    pub fn split(sent: &[u64], received: &[u64], drained: u64) -> Result<Vec<CountsChunk>> {
        let world = u32::try_from(sent.len())
            .ok()
            .filter(|w| received.len() == sent.len() && (1..=MAX_WORLD).contains(w))
            .ok_or_else(|| {
                Error::Invalid(format!(
                    "counts: {} sent and {} received for a job of 1..={MAX_WORLD} ranks",
                    sent.len(),
                    received.len()
                ))
            })?;
        Ok(sent
            .chunks(COUNTS_CHUNK)
            .zip(received.chunks(COUNTS_CHUNK))
            .enumerate()
            .map(|(i, (s, r))| CountsChunk {
                world,
                first: (i * COUNTS_CHUNK) as u32,
                sent: s.to_vec(),
                received: r.to_vec(),
                drained,
            })
            .collect())
    }
}

/// One rank's counts, put together from its chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankCounts {
    world: u32,
    sent: Vec<u64>,
    received: Vec<u64>,
    have: Vec<bool>,
    missing: usize,
    drained: u64,
}

impl RankCounts {
    /// Starts from the first chunk that arrives.
    pub fn new(chunk: &CountsChunk) -> Result<RankCounts> {
        chunk.validate()?;
        let n = chunk.world as usize;
        let mut counts = RankCounts {
            world: chunk.world,
            sent: vec![0; n],
            received: vec![0; n],
            have: vec![false; n],
            missing: n,
            drained: chunk.drained,
        };
        counts.add(chunk)?;
        Ok(counts)
    }

    /// Adds a chunk; refuses one for another job size, a different `drained`, or peers
    /// already counted.
    pub fn add(&mut self, chunk: &CountsChunk) -> Result<()> {
        chunk.validate()?;
        if chunk.world != self.world || chunk.drained != self.drained {
            return Err(Error::Invalid(format!(
                "counts: a chunk for {} ranks with {} drained after one for {} with {}",
                chunk.world, chunk.drained, self.world, self.drained
            )));
        }
        let range = chunk.first as usize..chunk.first as usize + chunk.sent.len();
        if self.have[range.clone()].iter().any(|&h| h) {
            return Err(Error::Invalid(format!(
                "counts: peers {range:?} counted twice"
            )));
        }
        self.sent[range.clone()].copy_from_slice(&chunk.sent);
        self.received[range.clone()].copy_from_slice(&chunk.received);
        self.have[range.clone()].fill(true);
        self.missing -= range.len();
        Ok(())
    }

    /// Whether every peer is counted.
    pub fn complete(&self) -> bool {
        self.missing == 0
    }

    /// The record, once [`RankCounts::complete`].
    pub fn finish(self, rank: u32, quiesce_ms: Option<u64>) -> Result<RankCut> {
        if !self.complete() {
            return Err(Error::Invalid(format!(
                "counts of rank {rank}: {} of {} peers missing",
                self.missing, self.world
            )));
        }
        Ok(RankCut {
            rank,
            sent: self.sent,
            received: self.received,
            drained: self.drained,
            quiesce_ms,
        })
    }
}

/// One rank's record of one cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankCut {
    /// The rank (in `MPI_COMM_WORLD`).
    pub rank: u32,
    /// Messages sent to each rank.
    pub sent: Vec<u64>,
    /// Messages received from each rank.
    pub received: Vec<u64>,
    /// Messages drained into the layer's buffer for this cut.
    pub drained: u64,
    /// How long the rank took to reach the cut after its agent's `prepare`, when the agent
    /// measured it.
    pub quiesce_ms: Option<u64>,
}

impl RankCut {
    /// The record as chunks ([`CountsChunk::split`]).
    pub fn chunks(&self) -> Result<Vec<CountsChunk>> {
        CountsChunk::split(&self.sent, &self.received, self.drained)
    }
}

/// A pair whose counts disagree at a cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mismatch {
    /// The sender.
    pub from: usize,
    /// The receiver.
    pub to: usize,
    /// What `from` says it sent to `to`.
    pub sent: u64,
    /// What `to` says it received from `from`.
    pub received: u64,
}

/// Every rank's record of one epoch's cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutReport {
    /// The epoch.
    pub epoch: u64,
    /// Per rank, in rank order (`ranks[i].rank == i`).
    pub ranks: Vec<RankCut>,
}

impl CutReport {
    /// Puts a job's records together (from one agent or several): every rank of the job once,
    /// each counting every rank.
    pub fn assemble(epoch: u64, records: impl IntoIterator<Item = RankCut>) -> Result<CutReport> {
        let mut ranks: Vec<RankCut> = records.into_iter().collect();
        ranks.sort_by_key(|r| r.rank);
        let n = ranks.len();
        for (i, r) in ranks.iter().enumerate() {
            if r.rank as usize != i {
                let what = if i > 0 && ranks[i - 1].rank == r.rank {
                    format!("rank {} reported twice", r.rank)
                } else {
                    format!("no record of rank {i}")
                };
                return Err(Error::Invalid(format!("epoch {epoch}: {what}")));
            }
            if r.sent.len() != n || r.received.len() != n {
                return Err(Error::Invalid(format!(
                    "epoch {epoch}: rank {i} counts {} sent and {} received peers, but {n} \
                     ranks reported",
                    r.sent.len(),
                    r.received.len()
                )));
            }
        }
        if n == 0 {
            return Err(Error::Invalid(format!("epoch {epoch}: no records")));
        }
        Ok(CutReport { epoch, ranks })
    }

    /// The pairs whose counts disagree (empty: the cut is consistent).
    pub fn mismatches(&self) -> Vec<Mismatch> {
        let mut out = Vec::new();
        for (from, r) in self.ranks.iter().enumerate() {
            for (to, &sent) in r.sent.iter().enumerate() {
                let received = self.ranks[to].received[from];
                if sent != received {
                    out.push(Mismatch {
                        from,
                        to,
                        sent,
                        received,
                    });
                }
            }
        }
        out
    }

    /// Messages sent by every rank before the cut.
    pub fn messages(&self) -> u64 {
        self.ranks.iter().flat_map(|r| &r.sent).sum()
    }

    /// Messages drained into the layer's buffers for the cut.
    pub fn drained(&self) -> u64 {
        self.ranks.iter().map(|r| r.drained).sum()
    }

    /// The rank that reached the cut last and how long it took, when the agents measured it.
    pub fn slowest(&self) -> Option<(u32, u64)> {
        self.ranks
            .iter()
            .filter_map(|r| Some((r.rank, r.quiesce_ms?)))
            .max_by_key(|&(_, ms)| ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rank(rank: u32, sent: &[u64], received: &[u64]) -> RankCut {
        RankCut {
            rank,
            sent: sent.to_vec(),
            received: received.to_vec(),
            drained: 1,
            quiesce_ms: Some(u64::from(rank) * 10),
        }
    }

    #[test]
    fn a_consistent_cut_and_a_broken_one() {
        let ok =
            CutReport::assemble(3, [rank(1, &[4, 0], &[5, 0]), rank(0, &[0, 5], &[0, 4])]).unwrap();
        assert!(ok.mismatches().is_empty());
        assert_eq!(
            (ok.messages(), ok.drained(), ok.slowest()),
            (9, 2, Some((1, 10)))
        );
        let broken =
            CutReport::assemble(4, [rank(0, &[0, 6], &[0, 4]), rank(1, &[4, 0], &[5, 0])]).unwrap();
        assert_eq!(
            broken.mismatches(),
            vec![Mismatch {
                from: 0,
                to: 1,
                sent: 6,
                received: 5
            }]
        );
    }

    #[test]
    fn assembly_refuses_gaps_repeats_and_wrong_sizes() {
        let a = rank(0, &[0, 1], &[0, 1]);
        for (records, words) in [
            (vec![a.clone(), a.clone()], "rank 0 reported twice"),
            (
                vec![a.clone(), rank(2, &[0, 1], &[0, 1])],
                "no record of rank 1",
            ),
            (vec![a.clone()], "2 sent and 2 received peers, but 1 ranks"),
            (vec![], "no records"),
        ] {
            let e = CutReport::assemble(7, records).unwrap_err().to_string();
            assert!(e.contains("epoch 7") && e.contains(words), "{e}");
        }
    }

    #[test]
    fn counts_split_and_come_back_whole_in_any_order() {
        let n = 2 * COUNTS_CHUNK + 5;
        let sent: Vec<u64> = (0..n as u64).collect();
        let received: Vec<u64> = (0..n as u64).map(|i| u64::MAX - i).collect();
        let mut chunks = CountsChunk::split(&sent, &received, 9).unwrap();
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks[2].sent.len(), 5);
        chunks.reverse();
        let mut counts = RankCounts::new(&chunks[0]).unwrap();
        assert!(!counts.complete());
        let early = counts.clone().finish(3, None).unwrap_err().to_string();
        assert!(
            early.contains(&format!("{} of {n} peers missing", 2 * COUNTS_CHUNK)),
            "{early}"
        );
        for c in &chunks[1..] {
            counts.add(c).unwrap();
        }
        let e = counts.add(&chunks[1]).unwrap_err().to_string();
        assert!(e.contains("counted twice"), "{e}");
        let back = counts.finish(3, Some(12)).unwrap();
        assert_eq!(
            (back.sent, back.received, back.drained),
            (sent, received, 9)
        );
    }

    #[test]
    fn chunks_out_of_bounds_are_refused() {
        let good = CountsChunk {
            world: 4,
            first: 2,
            sent: vec![1, 2],
            received: vec![3, 4],
            drained: 0,
        };
        good.validate().unwrap();
        let bad = [
            (
                CountsChunk {
                    first: 3,
                    ..good.clone()
                },
                "peers 3..5 of a job of 4",
            ),
            (
                CountsChunk {
                    world: 0,
                    ..good.clone()
                },
                "a job of 0 ranks",
            ),
            (
                CountsChunk {
                    world: MAX_WORLD + 1,
                    first: 0,
                    ..good.clone()
                },
                "a job of 65537",
            ),
            (
                CountsChunk {
                    received: vec![1],
                    ..good.clone()
                },
                "2 sent and 1 received",
            ),
            (
                CountsChunk {
                    sent: vec![],
                    received: vec![],
                    ..good.clone()
                },
                "0 sent",
            ),
            (
                CountsChunk {
                    world: 1000,
                    sent: vec![0; COUNTS_CHUNK + 1],
                    received: vec![0; COUNTS_CHUNK + 1],
                    ..good.clone()
                },
                "65 sent",
            ),
        ];
        for (chunk, words) in bad {
            let e = chunk.validate().unwrap_err().to_string();
            assert!(e.contains(words), "{chunk:?}: {e}");
        }
        let mut counts = RankCounts::new(&good).unwrap();
        let e = counts
            .add(&CountsChunk {
                world: 5,
                first: 0,
                ..good.clone()
            })
            .unwrap_err()
            .to_string();
        assert!(e.contains("a chunk for 5 ranks"), "{e}");
        assert!(CountsChunk::split(&[1, 2], &[1], 0).is_err());
        assert!(CountsChunk::split(&[], &[], 0).is_err());
    }
}
