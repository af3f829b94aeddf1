//! The transparent layer's cut records, read back: what a harness checks a cut by.
//!
//! With `SYMVIRT_CUT_LOG=DIR` in its environment every rank writes, at every cut of epoch `E`,
//! `DIR/cut-E-R` (R its rank in `MPI_COMM_WORLD`), atomically (a temporary file renamed):
//!
//! ```text
//! sent N0 N1 ... N(n-1)        messages this rank had sent to each rank
//! received N0 N1 ... N(n-1)    messages it had received from each (the layer's buffer included)
//! drained D                    messages the layer took off the wire into its buffer to reach the cut
//! ```
//!
//! (a program recording its own cuts, through the explicit API's hooks, writes the first two
//! lines and whatever it likes after them).
//!
//! and `DIR/resumed-E-R` when it goes on. A cut is consistent when, for every pair, what rank
//! `i` sent to `j` is what `j` received from `i`: no message in flight, none received that was
//! not sent. [`CutReport::read`] reads one epoch's records; [`CutReport::mismatches`] lists the
//! pairs that break the rule.

use crate::error::{Error, Result};
use std::path::Path;

/// One rank's record of one cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankCut {
    /// Messages sent to each rank.
    pub sent: Vec<u64>,
    /// Messages received from each rank.
    pub received: Vec<u64>,
    /// Messages drained into the layer's buffer for this cut.
    pub drained: u64,
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
    /// Per rank, in rank order.
    pub ranks: Vec<RankCut>,
}

fn bad(path: &Path, what: impl Into<String>) -> Error {
    Error::CutLog {
        path: path.to_path_buf(),
        what: what.into(),
        source: None,
    }
}

impl RankCut {
    /// Parses one record (the three lines above) of a job of `ranks` ranks.
    fn parse(text: &str, ranks: Option<usize>, path: &Path) -> Result<RankCut> {
        let mut lines = text.lines();
        let mut row = |label: &str| -> Result<Vec<u64>> {
            let line = lines
                .next()
                .ok_or_else(|| bad(path, format!("no {label} line")))?;
            let mut words = line.split_whitespace();
            if words.next() != Some(label) {
                return Err(bad(
                    path,
                    format!("expected a {label} line, found {line:?}"),
                ));
            }
            words
                .map(|w| {
                    w.parse()
                        .map_err(|_| bad(path, format!("{label}: {w:?} is not a count")))
                })
                .collect()
        };
        let sent = row("sent")?;
        let received = row("received")?;
        let n = ranks.unwrap_or(sent.len());
        if sent.len() != n || received.len() != n {
            return Err(bad(
                path,
                format!(
                    "{} sent and {} received counts for {n} ranks",
                    sent.len(),
                    received.len()
                ),
            ));
        }
        // Lines after these two are the writer's own (the explicit API's programs write their
        // iteration): only `drained` is read.
        let drained = match lines.find_map(|l| l.strip_prefix("drained ")) {
            Some(d) => d
                .trim()
                .parse()
                .map_err(|_| bad(path, format!("drained: {d:?} is not a count")))?,
            None => 0,
        };
        Ok(RankCut {
            sent,
            received,
            drained,
        })
    }
}

impl CutReport {
    /// Reads the records of `epoch` in `dir`: one per rank, rank 0 telling how many there are.
    pub fn read(dir: &Path, epoch: u64) -> Result<CutReport> {
        let read = |rank: usize| {
            let path = dir.join(format!("cut-{epoch}-{rank}"));
            std::fs::read_to_string(&path)
                .map_err(|e| Error::CutLog {
                    what: "cannot read it".into(),
                    path: path.clone(),
                    source: Some(e),
                })
                .map(|text| (path, text))
        };
        let (path, text) = read(0)?;
        let first = RankCut::parse(&text, None, &path)?;
        let n = first.sent.len();
        let mut ranks = vec![first];
        for rank in 1..n {
            let (path, text) = read(rank)?;
            ranks.push(RankCut::parse(&text, Some(n), &path)?);
        }
        Ok(CutReport { epoch, ranks })
    }

    /// The epochs with a record of rank 0 in `dir`, in order.
    pub fn epochs(dir: &Path) -> Result<Vec<u64>> {
        let entries = std::fs::read_dir(dir).map_err(|e| Error::CutLog {
            path: dir.to_path_buf(),
            what: "cannot list the directory".into(),
            source: Some(e),
        })?;
        let mut epochs: Vec<u64> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter_map(|name| {
                let rest = name.strip_prefix("cut-")?.strip_suffix("-0")?;
                rest.parse().ok()
            })
            .collect();
        epochs.sort_unstable();
        Ok(epochs)
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("cut-log-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_consistent_cut_and_a_broken_one() {
        let d = dir("pairs");
        std::fs::write(d.join("cut-3-0"), "sent 0 5\nreceived 0 4\ndrained 1\n").unwrap();
        std::fs::write(d.join("cut-3-1"), "sent 4 0\nreceived 5 0\ndrained 0\n").unwrap();
        std::fs::write(d.join("cut-4-0"), "sent 0 6\nreceived 0 4\ndrained 0\n").unwrap();
        std::fs::write(d.join("cut-4-1"), "sent 4 0\nreceived 5 0\ndrained 0\n").unwrap();
        std::fs::write(d.join("resumed-3-0"), "").unwrap();
        assert_eq!(CutReport::epochs(&d).unwrap(), vec![3, 4]);
        let ok = CutReport::read(&d, 3).unwrap();
        assert!(ok.mismatches().is_empty());
        assert_eq!((ok.messages(), ok.drained()), (9, 1));
        let broken = CutReport::read(&d, 4).unwrap();
        assert_eq!(
            broken.mismatches(),
            vec![Mismatch {
                from: 0,
                to: 1,
                sent: 6,
                received: 5
            }]
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_and_malformed_records_name_the_file() {
        let d = dir("bad");
        std::fs::write(d.join("cut-1-0"), "sent 0 1\nreceived 0 1\ndrained 0\n").unwrap();
        let e = CutReport::read(&d, 1).unwrap_err().to_string();
        assert!(e.contains("cut-1-1") && e.contains("cannot read"), "{e}");
        for (text, words) in [
            ("sent 0 1\nreceived 0\ndrained 0\n", "1 received counts"),
            (
                "sent 0 x\nreceived 0 1\ndrained 0\n",
                "\"x\" is not a count",
            ),
            (
                "received 0 1\nsent 0 1\ndrained 0\n",
                "expected a sent line",
            ),
            ("sent 0 1\n", "no received line"),
            (
                "sent 0 1\nreceived 0 1\ndrained -1\n",
                "drained: \"-1\" is not a count",
            ),
        ] {
            std::fs::write(d.join("cut-1-1"), text).unwrap();
            let e = CutReport::read(&d, 1).unwrap_err().to_string();
            assert!(e.contains("cut-1-1") && e.contains(words), "{text:?}: {e}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
