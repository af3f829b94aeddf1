//! Line framing with a length bound: QMP sends one JSON object per line, and a peer that
//! sends an endless line must cost an error, not memory.

use std::io::{BufRead, BufReader, ErrorKind, Read};

use crate::error::{Error, ProtocolError, Result};

/// Reads `\n`-terminated lines of at most `max_len` bytes (terminator excluded).
pub(crate) struct LineReader<R> {
    inner: BufReader<R>,
    max_len: usize,
    partial: Vec<u8>,
}

impl<R: Read> LineReader<R> {
    pub(crate) fn new(inner: R, max_len: usize) -> Self {
        Self {
            inner: BufReader::with_capacity(64 * 1024, inner),
            max_len,
            partial: Vec::new(),
        }
    }

    /// The next line without its `\r\n`, or `None` at a clean end of stream.
    ///
    /// A line over the limit is [`ProtocolError::LineTooLong`] (the stream is then unusable);
    /// end of stream inside a line is [`ProtocolError::Truncated`]. I/O errors, including read
    /// timeouts, are returned as [`Error::Io`] and keep the partial line for a retry.
    pub(crate) fn read_line(&mut self) -> Result<Option<Vec<u8>>> {
        loop {
            let available = match self.inner.fill_buf() {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(source) => {
                    return Err(Error::Io {
                        context: "reading from QMP socket",
                        source,
                    });
                }
            };
            if available.is_empty() {
                return if self.partial.is_empty() {
                    Ok(None)
                } else {
                    Err(Error::Protocol(ProtocolError::Truncated {
                        bytes: self.partial.len(),
                    }))
                };
            }
            let (take, complete) = match available.iter().position(|&b| b == b'\n') {
                Some(end) => (end, true),
                None => (available.len(), false),
            };
            if self.partial.len() + take > self.max_len {
                return Err(Error::Protocol(ProtocolError::LineTooLong {
                    limit: self.max_len,
                }));
            }
            self.partial.extend_from_slice(&available[..take]);
            self.inner.consume(if complete { take + 1 } else { take });
            if complete {
                let mut line = std::mem::take(&mut self.partial);
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                return Ok(Some(line));
            }
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
    fn end_of_stream_inside_a_line_is_truncation() {
        let out = lines(b"{}\n{\"ret", 100);
        assert!(matches!(
            out[1],
            Err(Error::Protocol(ProtocolError::Truncated { bytes: 5 }))
        ));
    }
}
