//! Splitting a byte stream into bounded lines: the one line codec of the project. QEMU's QMP
//! socket and the SymVirt guest channel both carry one JSON message per line, and a peer that
//! sends an endless line must cost an error, not memory.
//!
//! [`LineReader`] never holds more than `limit` bytes: a line that grows past the limit is
//! dropped, the rest of it up to the next `\n` is skipped as it arrives, and one
//! [`Frame::Oversized`] reports it. An untrusted guest's channel resynchronises at the next
//! newline; a QMP client, whose peer should never do this, gives the stream up as soon as
//! [`LineReader::discarding`] says a line went over.
//!
//! ```
//! use ninja_framing::{Frame, LineReader};
//! let mut lines = LineReader::new(8);
//! let mut got = Vec::new();
//! lines.push(b"ok\nfar too long\nab", |f| got.push(f));
//! assert_eq!(got, [Frame::Line(b"ok".to_vec()), Frame::Oversized { bytes: 12 }]);
//! assert_eq!(lines.buffered(), 2); // "ab" waits for its newline
//! ```

/// What [`LineReader::push`] produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A complete line, without its `\n`. Empty lines are not reported.
    Line(Vec<u8>),
    /// A line longer than the limit was discarded; `bytes` is its length without the `\n`.
    Oversized {
        /// How many bytes were discarded.
        bytes: usize,
    },
}

/// Incremental, bounded line splitter.
#[derive(Debug)]
pub struct LineReader {
    buf: Vec<u8>,
    /// Longest line accepted, newline included.
    limit: usize,
    /// `Some(n)`: inside an oversized line, `n` bytes discarded so far.
    discarding: Option<usize>,
}

impl LineReader {
    /// A reader accepting lines of at most `limit` bytes, newline included.
    pub fn new(limit: usize) -> LineReader {
        LineReader {
            buf: Vec::with_capacity(limit.min(64 * 1024)),
            limit,
            discarding: None,
        }
    }

    /// Feeds `data`; calls `out` for every complete line or discarded oversized line.
    pub fn push(&mut self, mut data: &[u8], mut out: impl FnMut(Frame)) {
        while !data.is_empty() {
            let newline = data.iter().position(|&b| b == b'\n');
            let chunk = &data[..newline.unwrap_or(data.len())];
            data = match newline {
                Some(n) => &data[n + 1..],
                None => &[],
            };
            match &mut self.discarding {
                Some(skipped) => *skipped += chunk.len(),
                None if self.buf.len() + chunk.len() < self.limit => {
                    self.buf.extend_from_slice(chunk)
                }
                None => {
                    self.discarding = Some(self.buf.len() + chunk.len());
                    self.buf.clear();
                }
            }
            if newline.is_some() {
                if let Some(bytes) = self.discarding.take() {
                    out(Frame::Oversized { bytes });
                } else if !self.buf.is_empty() {
                    out(Frame::Line(std::mem::take(&mut self.buf)));
                }
            }
        }
    }

    /// Forgets a partial line (the connection was lost).
    pub fn reset(&mut self) {
        self.buf.clear();
        self.discarding = None;
    }

    /// Bytes of the current partial line held in memory.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Inside a line that went over the limit: how many of its bytes were dropped so far.
    pub fn discarding(&self) -> Option<usize> {
        self.discarding
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(reader: &mut LineReader, data: &[u8]) -> Vec<Frame> {
        let mut v = Vec::new();
        reader.push(data, |f| v.push(f));
        v
    }

    #[test]
    fn splits_lines_across_chunks() {
        let mut r = LineReader::new(16);
        assert_eq!(frames(&mut r, b"ab"), vec![]);
        assert_eq!(
            frames(&mut r, b"c\n\nde\nf"),
            vec![Frame::Line(b"abc".to_vec()), Frame::Line(b"de".to_vec())]
        );
        assert_eq!(frames(&mut r, b"\n"), vec![Frame::Line(b"f".to_vec())]);
    }

    #[test]
    fn oversized_line_is_discarded_without_buffering_and_reading_resumes() {
        let mut r = LineReader::new(8);
        // Exactly the limit with the newline: 7 bytes + \n is accepted.
        assert_eq!(
            frames(&mut r, b"1234567\n"),
            vec![Frame::Line(b"1234567".to_vec())]
        );
        assert_eq!(frames(&mut r, b"12345678"), vec![]);
        for _ in 0..1000 {
            assert_eq!(frames(&mut r, &[b'x'; 1000]), vec![]);
            assert_eq!(r.buffered(), 0);
        }
        assert_eq!(
            frames(&mut r, b"yy\nok\n"),
            vec![
                Frame::Oversized {
                    bytes: 8 + 1_000_000 + 2
                },
                Frame::Line(b"ok".to_vec())
            ]
        );
    }

    #[test]
    fn reset_drops_partial_line() {
        let mut r = LineReader::new(8);
        assert_eq!(frames(&mut r, b"half"), vec![]);
        r.reset();
        assert_eq!(frames(&mut r, b"new\n"), vec![Frame::Line(b"new".to_vec())]);
    }
}
