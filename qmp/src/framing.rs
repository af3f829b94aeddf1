//! Line framing with a length bound: QMP sends one JSON object per line, and a peer that
//! sends an endless line must cost an error, not memory. The splitting is `ninja-framing`'s
//! (the guest channel's too); this adds the pull from a socket and QMP's policy: a line over
//! the limit ends the stream at once, since QEMU never sends one.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read};

use crate::error::{Error, ProtocolError, Result};
use ninja_framing::Frame;

/// Reads `\n`-terminated lines of at most `max_len` bytes (terminator excluded).
pub(crate) struct LineReader<R> {
    inner: R,
    max_len: usize,
    lines: ninja_framing::LineReader,
    ready: VecDeque<Vec<u8>>,
    /// A line went over the limit: the lines before it are still handed out, then the error.
    over: bool,
    buf: Box<[u8]>,
}

impl<R: Read> LineReader<R> {
    pub(crate) fn new(inner: R, max_len: usize) -> Self {
        Self {
            inner,
            max_len,
            // The splitter's limit counts the newline.
            lines: ninja_framing::LineReader::new(max_len.saturating_add(1)),
            ready: VecDeque::new(),
            over: false,
            buf: vec![0; 64 * 1024].into_boxed_slice(),
        }
    }

    /// The next line without its `\r\n`, or `None` at a clean end of stream.
    ///
    /// A line over the limit is [`ProtocolError::LineTooLong`] (the stream is then unusable);
    /// end of stream inside a line is [`ProtocolError::Truncated`]. I/O errors, including read
    /// timeouts, are returned as [`Error::Io`] and keep the partial line for a retry.
    pub(crate) fn read_line(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            if let Some(mut line) = self.ready.pop_front() {
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(line));
            }
            if self.over {
                return Err(Error::Protocol(ProtocolError::LineTooLong {
                    limit: self.max_len,
                }));
            }
            let n = match self.inner.read(&mut self.buf) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Io {
                        context: "reading from QMP socket",
                        source,
                    });
                }
            };
            if n == 0 {
                return match self.lines.buffered() {
                    0 => Ok(None),
                    bytes => Err(Error::Protocol(ProtocolError::Truncated { bytes })),
                };
            }
            let (ready, over) = (&mut self.ready, &mut self.over);
            self.lines.push(&self.buf[..n], |frame| match frame {
                Frame::Line(line) if !*over => ready.push_back(line),
                Frame::Line(_) => {}
                Frame::Oversized { .. } => *over = true,
            });
            self.over |= self.lines.discarding().is_some();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<Result<Option<Vec<u8>>>> {
        let mut reader = LineReader::new(input, max);
        let mut out = Vec::new();
        loop {
            let r = reader.read_line();
            let stop = !matches!(r, Ok(Some(_)));
            out.push(r);
            if stop {
                return out;
            }
        }
    }

    #[test]
    fn splits_lines_and_strips_crlf() {
        let out = lines(b"{\"a\":1}\r\n{}\n", 100);
        assert_eq!(out[0].as_ref().unwrap().as_deref(), Some(&b"{\"a\":1}"[..]));
        assert_eq!(out[1].as_ref().unwrap().as_deref(), Some(&b"{}"[..]));
        assert!(matches!(out[2], Ok(None)));
    }

    #[test]
    fn line_at_the_limit_passes_and_one_more_byte_fails() {
        let ok = lines(b"12345\n", 5);
        assert_eq!(ok[0].as_ref().unwrap().as_deref(), Some(&b"12345"[..]));
        let too_long = lines(b"123456\n", 5);
        assert!(matches!(
            too_long[0],
            Err(Error::Protocol(ProtocolError::LineTooLong { limit: 5 }))
        ));
    }

    #[test]
    fn lines_before_an_over_long_one_come_first_and_nothing_after() {
        let out = lines(b"{}\n123456789\n{}\n", 5);
        assert_eq!(out[0].as_ref().unwrap().as_deref(), Some(&b"{}"[..]));
        assert!(matches!(
            out[1],
            Err(Error::Protocol(ProtocolError::LineTooLong { limit: 5 }))
        ));
        assert_eq!(out.len(), 2);
        // An endless line fails before its end arrives.
        let endless = lines(&[b'x'; 100_000], 5);
        assert!(matches!(
            endless[0],
            Err(Error::Protocol(ProtocolError::LineTooLong { limit: 5 }))
        ));
    }

    #[test]
    fn end_of_stream_inside_a_line_is_truncation() {
        let out = lines(b"{}\n{\"ret", 100);
        assert!(matches!(
            out[1],
            Err(Error::Protocol(ProtocolError::Truncated { bytes: 5 }))
        ));
    }
}
