//! The transparent layer's cut records, read back: what a harness checks a cut by.
//!
//! With `SYMVIRT_CUT_LOG=DIR` in its environment every rank writes, at every cut of epoch `E`,
//! `DIR/cut-E-R` (R its rank in `MPI_COMM_WORLD`), atomically (a temporary file renamed):
//!
//! ```text
//! sent N0 N1 ... N(n-1)        messages this rank had sent to each rank
//! received N0 N1 ... N(n-1)    messages it had received from each (the layer's buffer included)
//! drained D                    messages the layer took off the wire into its buffer to reach the cut
//! started E                    the epoch this rank started its cut for
//! serves E [F]                 the epochs this cut served: E, or the agent's and SIGUSR1's
//!                              requested at once (the same line on every rank, a record each)
//! made by the progress thread  or "the application's thread": which thread made the cut
//! open files F                 MPI-IO files the rank had open (the progress thread makes no cut then)
//! given up by rank K           only when the cut was given up (a drain that could not finish):
//!                              the epoch failed, and the counts need not agree
//! ```
//!
//! (a program recording its own cuts, through the explicit API's hooks, writes the first two
//! lines and whatever it likes after them).
//!
//! and `DIR/resumed-E-R` when it goes on. [`read`] reads one epoch's records into a
//! [`CutReport`], the same report the agents give the host (`ninja-migrate cut report`);
//! [`CutReport::mismatches`] lists the pairs whose counts disagree.
//!
//! The same counts also travel through the agent (the cut records are the way to check cuts
//! where there is no agent, as with SIGUSR1 cuts, or to keep them after the job).

use crate::error::{Error, Result};
use std::path::Path;
pub use symvirt_proto::cut_report::{CutReport, Mismatch, RankCut};

fn bad(path: &Path, what: impl Into<String>) -> Error {
    Error::CutLog {
        path: path.to_path_buf(),
        what: what.into(),
        source: None,
    }
}

/// Parses one record (its `sent`, `received` and `drained` lines; the others are skipped) of
/// `rank` in a job of `ranks` ranks.
fn parse(text: &str, rank: u32, ranks: Option<usize>, path: &Path) -> Result<RankCut> {
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
        rank,
        sent,
        received,
        drained,
        quiesce_ms: None,
    })
}

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
    let first = parse(&text, 0, None, &path)?;
    let n = first.sent.len();
    let mut ranks = vec![first];
    for rank in 1..n {
        let (path, text) = read(rank)?;
        ranks.push(parse(&text, rank as u32, Some(n), &path)?);
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
    fn records_are_read_into_the_report_every_agent_gives() {
        let d = dir("pairs");
        std::fs::write(d.join("cut-3-0"), "sent 0 5\nreceived 0 4\ndrained 1\n").unwrap();
        std::fs::write(d.join("cut-3-1"), "sent 4 0\nreceived 5 0\niteration 9\n").unwrap();
        std::fs::write(d.join("cut-4-0"), "sent 0 6\nreceived 0 4\ndrained 0\n").unwrap();
        std::fs::write(d.join("resumed-3-0"), "").unwrap();
        assert_eq!(epochs(&d).unwrap(), vec![3, 4]);
        let record = |rank, sent: [u64; 2], received: [u64; 2], drained| RankCut {
            rank,
            sent: sent.to_vec(),
            received: received.to_vec(),
            drained,
            quiesce_ms: None,
        };
        // A writer's own lines after the counts are skipped (no drained line: 0).
        let expected = vec![record(0, [0, 5], [0, 4], 1), record(1, [4, 0], [5, 0], 0)];
        assert_eq!(
            read(&d, 3).unwrap(),
            CutReport::assemble(3, expected).unwrap()
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_and_malformed_records_name_the_file() {
        let d = dir("bad");
        std::fs::write(d.join("cut-1-0"), "sent 0 1\nreceived 0 1\ndrained 0\n").unwrap();
        let e = read(&d, 1).unwrap_err().to_string();
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
            let e = read(&d, 1).unwrap_err().to_string();
            assert!(e.contains("cut-1-1") && e.contains(words), "{text:?}: {e}");
        }
        std::fs::remove_dir_all(&d).unwrap();
    }
}
