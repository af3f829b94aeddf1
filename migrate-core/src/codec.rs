//! The one place structured messages are encoded: control messages as bincode 2 (little-endian,
//! fixed-width integers), framed by a little-endian `u32` length. Page data never goes through
//! here (see [`crate::protocol`]).

use crate::protocol::{ControlMessage, MAX_CONTROL_FRAME};
use crate::{Error, Result};
use std::io::{Read, Write};

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding()
        .with_limit::<{ MAX_CONTROL_FRAME as usize }>()
}

/// Encodes a control message payload (without the length prefix).
pub fn encode(msg: &ControlMessage) -> Result<Vec<u8>> {
    let v =
        bincode::serde::encode_to_vec(msg, config()).map_err(|e| Error::Codec(e.to_string()))?;
    if v.len() > MAX_CONTROL_FRAME as usize {
        return Err(Error::Codec(format!(
            "message of {} bytes exceeds the {MAX_CONTROL_FRAME}-byte limit",
            v.len()
        )));
    }
    Ok(v)
}

/// Decodes a control message payload; every byte must be consumed.
pub fn decode(payload: &[u8]) -> Result<ControlMessage> {
    if payload.len() > MAX_CONTROL_FRAME as usize {
        return Err(Error::Codec(format!(
            "message of {} bytes exceeds the {MAX_CONTROL_FRAME}-byte limit",
            payload.len()
        )));
    }
    let (msg, used): (ControlMessage, usize) = bincode::serde::decode_from_slice(payload, config())
        .map_err(|e| Error::Codec(e.to_string()))?;
    if used != payload.len() {
        return Err(Error::Codec(format!(
            "{} trailing bytes after message",
            payload.len() - used
        )));
    }
    Ok(msg)
}

/// Writes one framed message.
pub fn write_message(w: &mut impl Write, msg: &ControlMessage) -> Result<()> {
    let payload = encode(msg)?;
    let mut frame = Vec::with_capacity(4 + payload.len());
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(&payload);
    w.write_all(&frame).map_err(io_error)?;
    w.flush().map_err(io_error)
}

/// Reads one framed message. The length is checked before anything is allocated.
pub fn read_message(r: &mut impl Read) -> Result<ControlMessage> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).map_err(io_error)?;
    let len = u32::from_le_bytes(len);
    if len > MAX_CONTROL_FRAME {
        return Err(Error::Protocol(format!(
            "control frame of {len} bytes exceeds the {MAX_CONTROL_FRAME}-byte limit"
        )));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload).map_err(io_error)?;
    decode(&payload)
}

/// Maps a socket error to the crate error: EOF is a disconnect, a read/write timeout a timeout.
pub(crate) fn io_error(e: std::io::Error) -> Error {
    use std::io::ErrorKind::*;
    if let Some(tls) = crate::tls::from_io(&e) {
        return tls;
    }
    match e.kind() {
        UnexpectedEof | ConnectionReset | BrokenPipe | ConnectionAborted => Error::Disconnected,
        WouldBlock | TimedOut => Error::Timeout("socket read or write".into()),
        _ => Error::Io {
            context: "control connection".into(),
            source: e,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{MemoryLayout, RegionDesc};

    #[test]
    fn golden_bytes_commit_and_ready() {
        // Enum variants are u32 indices in declaration order.
        assert_eq!(encode(&ControlMessage::Ready).unwrap(), [4, 0, 0, 0]);
        assert_eq!(encode(&ControlMessage::Commit).unwrap(), [5, 0, 0, 0]);
        assert_eq!(encode(&ControlMessage::CommitAck).unwrap(), [6, 0, 0, 0]);
    }

    #[test]
    fn golden_bytes_hello() {
        let msg = ControlMessage::Hello {
            page_size: 4096,
            layout: MemoryLayout {
                regions: vec![RegionDesc {
                    gpa: 0x1000,
                    len: 0x2000,
                }],
            },
            features: 0,
        };
        let bytes = encode(&msg).unwrap();
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            0, 0, 0, 0,                     // variant Hello
            0, 16, 0, 0,                    // page_size 4096
            1, 0, 0, 0, 0, 0, 0, 0,         // 1 region
            0, 16, 0, 0, 0, 0, 0, 0,        // gpa 0x1000
            0, 32, 0, 0, 0, 0, 0, 0,        // len 0x2000
            0, 0, 0, 0, 0, 0, 0, 0,         // features
        ];
        assert_eq!(bytes, want);
        assert_eq!(decode(&bytes).unwrap(), msg);
    }

    #[test]
    fn golden_bytes_state_and_refusal() {
        let msg = ControlMessage::State {
            state: vec![0xaa, 0xbb],
            pages_per_connection: vec![7],
        };
        #[rustfmt::skip]
        let want: Vec<u8> = vec![
            3, 0, 0, 0,
            2, 0, 0, 0, 0, 0, 0, 0, 0xaa, 0xbb,
            1, 0, 0, 0, 0, 0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(encode(&msg).unwrap(), want);
        let refuse = ControlMessage::HelloReply {
            refused: Some("no".into()),
        };
        assert_eq!(
            encode(&refuse).unwrap(),
            [1, 0, 0, 0, 1, 2, 0, 0, 0, 0, 0, 0, 0, b'n', b'o']
        );
    }

    #[test]
    fn rejects_trailing_bytes_unknown_variant_and_huge_lengths() {
        assert!(decode(&[4, 0, 0, 0, 0]).is_err());
        assert!(decode(&[99, 0, 0, 0]).is_err());
        // State with a claimed 2^62-byte vector: must fail without allocating it.
        let mut b = vec![3, 0, 0, 0];
        b.extend_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(decode(&b).is_err());
        // A frame length over the limit is refused before reading the payload.
        let mut frame = (MAX_CONTROL_FRAME + 1).to_le_bytes().to_vec();
        frame.extend_from_slice(&[0; 8]);
        let err = read_message(&mut &frame[..]).unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
        // Truncated frame.
        let err = read_message(&mut &[8u8, 0, 0, 0, 4][..]).unwrap_err();
        assert!(matches!(err, Error::Disconnected), "{err}");
    }
}
