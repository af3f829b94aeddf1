//! TLS 1.3 with mutual authentication on every connection of a migration.
//!
//! A site has one CA; each host has a certificate signed by it. Both ends check the other's
//! chain against that CA. The source also checks that the destination's certificate is valid
//! for the name it dialled ([`SourceTls`]); the destination can restrict which source names it
//! takes ([`DestinationTls`]). The control connection and each memory connection is its own
//! TLS session, set up before the connection preamble: a peer that fails authentication never
//! reaches the protocol, and the protocol inside is unchanged (see [`crate::transport`]).
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
