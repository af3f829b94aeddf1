//! TLS 1.3 with mutual authentication on every connection of a migration.
//!
//! A site has one CA; each host has a certificate signed by it. Both ends check the other's
//! chain against that CA. The source also checks that the destination's certificate is valid
//! for the name it dialled ([`SourceTls`]); the destination can restrict which source names it
//! takes ([`DestinationTls`]). The control connection and each memory connection is its own
//! TLS session, set up before the connection preamble: a peer that fails authentication never
//! reaches the protocol, and the protocol inside is unchanged (see [`crate::transport`]).
//!
//! rustls runs the handshake and carries the preamble; then its traffic keys go to this
//! module's record layer (`Records`), which seals and opens standard TLS 1.3 records in place
//! in the stream's own buffers (what kernel TLS does), since rustls's buffers cost as much CPU
//! as the cipher at a migration's rates. Records keep their sequence numbers, so a forged,
//! replayed, reordered or cut record fails the stream.
//!
//! The files are PEM, in the layout QEMU's `tls-creds-x509` reads ([`Credentials::source_in`],
//! [`Credentials::destination_in`]), so one directory per host serves QEMU and this engine.
//! Crypto comes from `ring`; AES-128-GCM is preferred, the fastest suite with AES-NI.

use crate::{Error, Result};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The PEM files of one end: the site's CA, this end's certificate (chain) and private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// CA certificate(s) the peer's chain must lead to.
    pub ca: PathBuf,
    /// This end's certificate, then any intermediates.
    pub cert: PathBuf,
    /// This end's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl Credentials {
    /// A source's files in a `tls-creds-x509` directory: `ca-cert.pem`, `client-cert.pem`,
    /// `client-key.pem`.
    pub fn source_in(dir: &Path) -> Credentials {
        Credentials {
            ca: dir.join("ca-cert.pem"),
            cert: dir.join("client-cert.pem"),
            key: dir.join("client-key.pem"),
        }
    }

    /// A destination's files in a `tls-creds-x509` directory: `ca-cert.pem`,
    /// `server-cert.pem`, `server-key.pem`.
    pub fn destination_in(dir: &Path) -> Credentials {
        Credentials {
            ca: dir.join("ca-cert.pem"),
            cert: dir.join("server-cert.pem"),
            key: dir.join("server-key.pem"),
        }
    }

    fn load(&self) -> Result<Loaded> {
        let certs = |path: &Path| -> Result<Vec<CertificateDer<'static>>> {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| tls_error(format!("reading {}", path.display()), e))?;
            if certs.is_empty() {
                return Err(tls_error(
                    format!("reading {}", path.display()),
                    "no certificate in the file",
                ));
            }
            Ok(certs)
        };
        let mut roots = RootCertStore::empty();
        for ca in certs(&self.ca)? {
            roots
                .add(ca)
                .map_err(|e| tls_error(format!("CA certificate {}", self.ca.display()), e))?;
        }
        let key = PrivateKeyDer::from_pem_file(&self.key)
            .map_err(|e| tls_error(format!("reading {}", self.key.display()), e))?;
        Ok(Loaded {
            roots: Arc::new(roots),
            chain: certs(&self.cert)?,
            key,
        })
    }
}

struct Loaded {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    use rustls::crypto::ring::cipher_suite::*;
    let mut p = rustls::crypto::ring::default_provider();
    p.cipher_suites = vec![
        TLS13_AES_128_GCM_SHA256,
        TLS13_AES_256_GCM_SHA384,
        TLS13_CHACHA20_POLY1305_SHA256,
    ];
    Arc::new(p)
}

/// Parses a peer name: a DNS name or an IP address, as the certificate's subjectAltName has it.
fn peer_name(name: &str) -> Result<ServerName<'static>> {
    ServerName::try_from(name.to_owned()).map_err(|e| tls_error(format!("peer name {name:?}"), e))
}

/// A TLS 1.3 client configuration from `creds`: the CA a server's certificate must lead to,
/// and this end's certificate for servers that ask for one (a migration destination, QEMU's
/// TLS chardev with `verify-peer=on`).
pub fn client_config(creds: &Credentials) -> Result<Arc<ClientConfig>> {
    let loaded = creds.load()?;
    let config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error("protocol versions", e))?
        .with_root_certificates(loaded.roots)
        .with_client_auth_cert(loaded.chain, loaded.key)
        .map_err(|e| tls_error(format!("client key {}", creds.key.display()), e))?;
    let mut config = config;
    // The engine's own record layer takes over after the handshake (see `Records`).
    config.enable_secret_extraction = true;
    Ok(Arc::new(config))
}

/// The source's end: its identity, and the name the destination's certificate must carry.
#[derive(Debug, Clone)]
pub struct SourceTls {
    config: Arc<ClientConfig>,
    destination: ServerName<'static>,
}

impl SourceTls {
    /// Loads `creds` (the source's certificate) for migrations to a destination whose
    /// certificate is valid for `destination_name` (a DNS name or an IP address).
    pub fn new(creds: &Credentials, destination_name: &str) -> Result<SourceTls> {
        Ok(SourceTls {
            config: client_config(creds)?,
            destination: peer_name(destination_name)?,
        })
    }

    /// The name the destination's certificate must carry.
    pub fn destination_name(&self) -> String {
        self.destination.to_str().into_owned()
    }

    pub(crate) fn session(&self) -> Result<rustls::Connection> {
        rustls::ClientConnection::new(self.config.clone(), self.destination.clone())
            .map(rustls::Connection::Client)
            .map_err(|e| tls_error("new session", e))
    }
}

/// The destination's end: its identity, and which source names it takes.
#[derive(Debug, Clone)]
pub struct DestinationTls {
    config: Arc<ServerConfig>,
}

impl DestinationTls {
    /// Loads `creds` (the destination's certificate). A source must present a certificate from
    /// the same CA and, unless `allowed_sources` is empty, valid for one of those names (DNS
    /// names or IP addresses, as subjectAltName has them).
    pub fn new(creds: &Credentials, allowed_sources: &[String]) -> Result<DestinationTls> {
        let loaded = creds.load()?;
        let provider = provider();
        let chain = rustls::server::WebPkiClientVerifier::builder_with_provider(
            loaded.roots,
            provider.clone(),
        )
        .build()
        .map_err(|e| tls_error("source verifier", e))?;
        let verifier = Arc::new(SourceVerifier {
            chain,
            allowed: allowed_sources
                .iter()
                .map(|n| peer_name(n))
                .collect::<Result<_>>()?,
        });
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| tls_error("protocol versions", e))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(loaded.chain, loaded.key)
            .map_err(|e| tls_error(format!("destination key {}", creds.key.display()), e))?;
        // Every connection is a full handshake: tickets would only cost a record each.
        config.send_tls13_tickets = 0;
        // The engine's own record layer takes over after the handshake (see `Records`).
        config.enable_secret_extraction = true;
        Ok(DestinationTls {
            config: Arc::new(config),
        })
    }

    pub(crate) fn session(&self) -> Result<rustls::Connection> {
        rustls::ServerConnection::new(self.config.clone())
            .map(rustls::Connection::Server)
            .map_err(|e| tls_error("new session", e))
    }
}

/// webpki's chain check, then the source's name against the allowed ones, inside the
/// handshake: a refused source gets an alert (`bad_certificate`), not a bare close.
#[derive(Debug)]
struct SourceVerifier {
    chain: Arc<dyn ClientCertVerifier>,
    allowed: Vec<ServerName<'static>>,
}

impl ClientCertVerifier for SourceVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.chain.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        let verified = self
            .chain
            .verify_client_cert(end_entity, intermediates, now)?;
        if self.allowed.is_empty() {
            return Ok(verified);
        }
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self
            .allowed
            .iter()
            .any(|name| cert.verify_is_valid_for_subject_name(name).is_ok())
        {
            Ok(verified)
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// An [`Error::Tls`].
pub(crate) fn tls_error(
    context: impl Into<String>,
    source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
) -> Error {
    Error::Tls {
        context: context.into(),
        source: source.into(),
    }
}

/// The TLS error inside an I/O error from a session (a bad record, an alert from the peer),
/// as an [`Error::Tls`]; `None` for plain I/O errors.
pub(crate) fn from_io(e: &std::io::Error) -> Option<Error> {
    let tls = e.get_ref()?.downcast_ref::<rustls::Error>()?;
    Some(tls_error("connection", tls.clone()))
}

/// Most plaintext bytes in one record (RFC 8446 §5.1).
const MAX_PLAINTEXT: usize = 1 << 14;
/// Most bytes after a record's header: plaintext, content type, padding and tag (§5.2).
const MAX_SEALED: usize = MAX_PLAINTEXT + 256;
const HEADER: usize = 5;
const TAG: usize = 16;
const APPLICATION_DATA: u8 = 23;
const ALERT: u8 = 21;
/// Records one key may seal: AES-GCM's bound for full-size records is 2^24.5 (RFC 8446
/// §5.5). Rekeying needs the traffic secret, which rustls does not hand over: a connection
/// that reaches this (256 GiB of full records one way) fails instead.
const RECORDS_PER_KEY: u64 = 1 << 24;

/// One direction's key, IV and record sequence number.
struct Direction {
    key: ring::aead::LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl Direction {
    fn new((seq, secrets): (u64, rustls::ConnectionTrafficSecrets)) -> Result<Direction> {
        use rustls::ConnectionTrafficSecrets as S;
        let (algorithm, key, iv) = match &secrets {
            S::Aes128Gcm { key, iv } => (&ring::aead::AES_128_GCM, key, iv),
            S::Aes256Gcm { key, iv } => (&ring::aead::AES_256_GCM, key, iv),
            S::Chacha20Poly1305 { key, iv } => (&ring::aead::CHACHA20_POLY1305, key, iv),
            _ => return Err(tls_error("record layer", "unsupported cipher suite")),
        };
        let key = ring::aead::UnboundKey::new(algorithm, key.as_ref())
            .map_err(|_| tls_error("record layer", "bad traffic key"))?;
        Ok(Direction {
            key: ring::aead::LessSafeKey::new(key),
            iv: iv
                .as_ref()
                .try_into()
                .map_err(|_| tls_error("record layer", "bad traffic IV"))?,
            seq,
        })
    }

    /// The next record's nonce: the IV XOR the sequence number (§5.3).
    fn nonce(&mut self) -> std::io::Result<ring::aead::Nonce> {
        if self.seq >= RECORDS_PER_KEY {
            return Err(std::io::Error::other(
                "TLS: this connection's key sealed as many records as it safely can",
            ));
        }
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        self.seq += 1;
        Ok(ring::aead::Nonce::assume_unique_for_key(n))
    }
}

/// TLS 1.3 application-data records (RFC 8446 §5.2), sealed and opened in place with the
/// traffic keys the handshake agreed on: once the handshake and the connection preamble are
/// done, this is what kernel TLS would do. rustls's own buffers copy each record in and out
/// once more and allocate per record; at the rates of a migration that is as much CPU as the
/// cipher. Both ends are this engine; the records are standard TLS 1.3 all the same.
pub(crate) struct Records {
    tx: Direction,
    rx: Direction,
    /// Ciphertext from the socket: `[start, end)` is not opened yet.
    inbuf: Vec<u8>,
    start: usize,
    end: usize,
    /// The opened plaintext of the current record not handed out yet (inside `inbuf`).
    plain: std::ops::Range<usize>,
    /// Sealed records not written yet.
    out: Vec<u8>,
    /// The peer's close_notify arrived.
    closed: bool,
}

/// How much ciphertext one read(2) takes, and how much sealed output waits for one write.
const RECORD_BUFFER: usize = 1 << 20;

impl Records {
    /// Takes over `conn` after its handshake; `unread` is ciphertext already read from the
    /// socket that rustls has not seen. Refuses when rustls holds plaintext not read yet.
    pub(crate) fn take_over(mut conn: rustls::Connection, unread: &[u8]) -> Result<Records> {
        let pending = conn
            .process_new_packets()
            .map_err(|e| tls_error("record layer", e))?;
        if pending.plaintext_bytes_to_read() > 0 || conn.wants_write() {
            return Err(tls_error(
                "record layer",
                "data pending in the handshake's session",
            ));
        }
        let secrets = conn
            .dangerous_extract_secrets()
            .map_err(|e| tls_error("record layer", e))?;
        let mut inbuf = vec![0; RECORD_BUFFER.max(unread.len())];
        inbuf[..unread.len()].copy_from_slice(unread);
        Ok(Records {
            tx: Direction::new(secrets.tx)?,
            rx: Direction::new(secrets.rx)?,
            inbuf,
            start: 0,
            end: unread.len(),
            plain: 0..0,
            out: Vec::with_capacity(RECORD_BUFFER + MAX_SEALED + HEADER),
            closed: false,
        })
    }

    /// Seals `data` into records, writing them out whenever a buffer's worth is ready.
    pub(crate) fn send(&mut self, mut socket: impl Write, mut data: &[u8]) -> std::io::Result<()> {
        while !data.is_empty() {
            let n = data.len().min(MAX_PLAINTEXT);
            let sealed_len = n + 1 + TAG;
            let at = self.out.len();
            self.out.extend_from_slice(&[
                APPLICATION_DATA,
                3,
                3,
                (sealed_len >> 8) as u8,
                sealed_len as u8,
            ]);
            self.out.extend_from_slice(&data[..n]);
            self.out.push(APPLICATION_DATA);
            let nonce = self.tx.nonce()?;
            let (header, body) = self.out[at..].split_at_mut(HEADER);
            let tag = self
                .tx
                .key
                .seal_in_place_separate_tag(nonce, ring::aead::Aad::from(&*header), body)
                .map_err(|_| std::io::Error::other("TLS: sealing a record failed"))?;
            self.out.extend_from_slice(tag.as_ref());
            data = &data[n..];
            if self.out.len() >= RECORD_BUFFER {
                self.flush(&mut socket)?;
            }
        }
        Ok(())
    }

    /// Writes out every sealed record.
    pub(crate) fn flush(&mut self, mut socket: impl Write) -> std::io::Result<()> {
        socket.write_all(&self.out)?;
        self.out.clear();
        Ok(())
    }

    /// Reads plaintext: 0 after the peer's close_notify; a damaged, forged, reordered or
    /// truncated record is an `InvalidData` error carrying the [`rustls::Error`] rustls would
    /// have given.
    pub(crate) fn recv(&mut self, mut socket: impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            if !self.plain.is_empty() {
                let n = buf.len().min(self.plain.len());
                buf[..n].copy_from_slice(&self.inbuf[self.plain.start..self.plain.start + n]);
                self.plain.start += n;
                return Ok(n);
            }
            if self.closed {
                return Ok(0);
            }
            // A whole record in the buffer, or read more.
            let have = self.end - self.start;
            let need = if have >= HEADER {
                let h = &self.inbuf[self.start..self.start + HEADER];
                let len = usize::from(h[3]) << 8 | usize::from(h[4]);
                if h[0] != APPLICATION_DATA
                    || h[1] != 3
                    || h[2] != 3
                    || len > MAX_SEALED
                    || len <= TAG
                {
                    return Err(bad(rustls::Error::InvalidMessage(
                        rustls::InvalidMessage::InvalidContentType,
                    )));
                }
                HEADER + len
            } else {
                HEADER
            };
            if have < need {
                if self.start > 0 && self.start + need > self.inbuf.len() {
                    self.inbuf.copy_within(self.start..self.end, 0);
                    (self.start, self.end) = (0, have);
                }
                let n = loop {
                    match socket.read(&mut self.inbuf[self.end..]) {
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        r => break r?,
                    }
                };
                if n == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "TLS: peer closed connection without sending TLS close_notify",
                    ));
                }
                self.end += n;
                continue;
            }
            // Open it in place.
            let nonce = self.rx.nonce()?;
            let (header, rest) = self.inbuf[self.start..].split_at_mut(HEADER);
            let opened = self
                .rx
                .key
                .open_in_place(
                    nonce,
                    ring::aead::Aad::from(&*header),
                    &mut rest[..need - HEADER],
                )
                .map_err(|_| bad(rustls::Error::DecryptError))?;
            // The content type is the last non-zero byte; zeros after it are padding.
            let Some(type_at) = opened.iter().rposition(|&b| b != 0) else {
                return Err(bad(rustls::Error::InvalidMessage(
                    rustls::InvalidMessage::InvalidContentType,
                )));
            };
            let content = self.start + HEADER..self.start + HEADER + type_at;
            let kind = opened[type_at];
            self.start += need;
            match kind {
                APPLICATION_DATA => self.plain = content,
                ALERT if content.len() == 2 && self.inbuf[content.start + 1] == 0 => {
                    self.closed = true; // close_notify
                }
                ALERT => {
                    let description = self.inbuf.get(content.start + 1).copied().unwrap_or(0);
                    return Err(bad(rustls::Error::AlertReceived(
                        rustls::AlertDescription::from(description),
                    )));
                }
                // A post-handshake message (a key update, a ticket): neither end sends one.
                _ => {
                    return Err(bad(rustls::Error::InappropriateMessage {
                        expect_types: vec![rustls::ContentType::ApplicationData],
                        got_type: rustls::ContentType::from(kind),
                    }));
                }
            }
            if self.start == self.end {
                (self.start, self.end) = (0, 0);
            }
        }
    }

    /// Whether plaintext, or ciphertext not opened yet, waits in the buffer.
    pub(crate) fn has_buffered(&self) -> bool {
        !self.plain.is_empty() || self.start < self.end
    }
}

fn bad(e: rustls::Error) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, e)
}

#[cfg(test)]
mod record_tests {
    use super::*;

    fn direction(key: u8) -> Direction {
        let unbound = ring::aead::UnboundKey::new(&ring::aead::AES_128_GCM, &[key; 16]).unwrap();
        Direction {
            key: ring::aead::LessSafeKey::new(unbound),
            iv: [key; 12],
            seq: 7,
        }
    }

    /// Two ends of one connection: what `a` seals, `b` opens.
    fn pair() -> (Records, Records) {
        let end = |tx, rx| Records {
            tx: direction(tx),
            rx: direction(rx),
            inbuf: vec![0; RECORD_BUFFER],
            start: 0,
            end: 0,
            plain: 0..0,
            out: Vec::new(),
            closed: false,
        };
        (end(1, 2), end(2, 1))
    }

    fn read_all(r: &mut Records, mut wire: &[u8], len: usize) -> std::io::Result<Vec<u8>> {
        let mut got = vec![0; len];
        let mut at = 0;
        while at < len {
            match r.recv(&mut wire, &mut got[at..])? {
                0 => break,
                n => at += n,
            }
        }
        got.truncate(at);
        Ok(got)
    }

    fn tls_error_of(e: std::io::Error) -> rustls::Error {
        e.get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .cloned()
            .unwrap_or_else(|| panic!("not a TLS error: {e}"))
    }

    #[test]
    fn records_round_trip_in_standard_tls13_framing() {
        let (mut a, mut b) = pair();
        let data: Vec<u8> = (0..40_000u32).map(|i| (i * 7) as u8).collect();
        let mut wire = Vec::new();
        a.send(&mut wire, &data).unwrap();
        a.flush(&mut wire).unwrap();
        // Three records (16 KiB, 16 KiB, the rest), each: type 23, version 3.3, length =
        // plaintext + content type + tag.
        assert_eq!(wire.len(), data.len() + 3 * (HEADER + 1 + TAG));
        assert_eq!(&wire[..5], &[23, 3, 3, 0x40, 0x11]);
        assert_eq!(read_all(&mut b, &wire, data.len()).unwrap(), data);
        assert!(!b.has_buffered());
    }

    #[test]
    fn a_changed_reordered_or_cut_record_is_refused() {
        let (mut a, _) = pair();
        let mut wire = Vec::new();
        a.send(&mut wire, &[5u8; 100]).unwrap();
        a.send(&mut wire, &[6u8; 100]).unwrap();
        a.flush(&mut wire).unwrap();
        let one = HEADER + 100 + 1 + TAG;

        let mut flipped = wire.clone();
        flipped[HEADER + 50] ^= 1;
        let e = read_all(&mut pair().1, &flipped, 200).unwrap_err();
        assert_eq!(tls_error_of(e), rustls::Error::DecryptError);

        let mut swapped = wire[one..].to_vec();
        swapped.extend_from_slice(&wire[..one]);
        let e = read_all(&mut pair().1, &swapped, 200).unwrap_err();
        assert_eq!(tls_error_of(e), rustls::Error::DecryptError);

        let e = read_all(&mut pair().1, &wire[..one + 10], 200).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof);

        let mut not_data = wire.clone();
        not_data[0] = 22;
        assert!(read_all(&mut pair().1, &not_data, 200).is_err());
        let mut too_long = wire.clone();
        too_long[3] = 0x48;
        assert!(read_all(&mut pair().1, &too_long, 200).is_err());
    }

    /// Seals a record of `content_type` (for the peer's alerts).
    fn sealed(a: &mut Records, content: &[u8], content_type: u8) -> Vec<u8> {
        let len = content.len() + 1 + TAG;
        let mut rec = vec![23, 3, 3, (len >> 8) as u8, len as u8];
        rec.extend_from_slice(content);
        rec.push(content_type);
        let nonce = a.tx.nonce().unwrap();
        let (h, body) = rec.split_at_mut(HEADER);
        let tag =
            a.tx.key
                .seal_in_place_separate_tag(nonce, ring::aead::Aad::from(&*h), body)
                .unwrap();
        rec.extend_from_slice(tag.as_ref());
        rec
    }

    #[test]
    fn close_notify_ends_the_stream_and_other_alerts_are_errors() {
        let (mut a, mut b) = pair();
        let mut wire = Vec::new();
        a.send(&mut wire, b"last words").unwrap();
        a.flush(&mut wire).unwrap();
        wire.extend(sealed(&mut a, &[1, 0], ALERT)); // warning, close_notify
        assert_eq!(read_all(&mut b, &wire, 100).unwrap(), b"last words");

        let (mut a, mut b) = pair();
        let wire = sealed(&mut a, &[2, 20], ALERT); // fatal, bad_record_mac
        let e = read_all(&mut b, &wire, 10).unwrap_err();
        assert_eq!(
            tls_error_of(e),
            rustls::Error::AlertReceived(rustls::AlertDescription::BadRecordMac)
        );
        // A post-handshake handshake message (a key update) is not taken.
        let (mut a, mut b) = pair();
        let wire = sealed(&mut a, &[24, 0, 0, 1, 0], 22);
        assert!(read_all(&mut b, &wire, 10).is_err());
    }
}
