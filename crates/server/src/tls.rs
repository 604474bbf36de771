//! `[tls]`: rustls (ring provider) for peer links and for the client listeners.
//!
//! - `peer = true`: every peer link is mutual TLS. The dialer presents its certificate and
//!   checks the acceptor's against `ca_file` (for the host it dialed); the acceptor requires a
//!   client certificate signed by `ca_file`. The HMAC handshake then runs inside the TLS
//!   stream unchanged, so a node needs both a certificate from the cluster's CA and the
//!   cluster secret.
//! - `client = true`: the HTTP listener ([`TlsSetup::client`], ALPN `http/1.1`) and the
//!   RESP listener ([`TlsSetup::resp`], no ALPN, as Redis) serve TLS with
//!   `cert_file`/`key_file`; clients are not asked for certificates.
//!
//! PEM files are read with `rustls-pki-types` (`rustls-pemfile` is unmaintained).

use rustls::crypto::CryptoProvider;
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// The `[tls]` config section.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// PEM: this node's certificate chain (leaf first), for the node's IP or host name.
    pub cert_file: Option<PathBuf>,
    /// PEM: the private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: Option<PathBuf>,
    /// PEM: the CA certificate(s) that sign every node's certificate. Required with `peer`.
    pub ca_file: Option<PathBuf>,
    /// Mutual TLS on peer links.
    pub peer: bool,
    /// TLS on the client listeners (HTTP, RESP).
    pub client: bool,
}

/// Both ends of mutual TLS on peer links.
#[derive(Clone)]
pub struct PeerTls {
    pub connector: TlsConnector,
    pub acceptor: TlsAcceptor,
}

impl PeerTls {
    /// The name the dialer checks the acceptor's certificate against: the host of `address`
    /// (an IP address or a DNS name).
    pub fn server_name(address: &str) -> Result<ServerName<'static>, String> {
        if let Ok(socket) = address.parse::<std::net::SocketAddr>() {
            return Ok(ServerName::IpAddress(socket.ip().into()));
        }
        let host = address
            .rsplit_once(':')
            .map(|(host, _)| host)
            .unwrap_or(address);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        ServerName::try_from(host.to_string())
            .map_err(|e| format!("{address:?} has no host name TLS can check: {e}"))
    }
}

/// What `[tls]` turns on.
#[derive(Clone, Default)]
pub struct TlsSetup {
    pub peer: Option<PeerTls>,
    /// For the HTTP listener.
    pub client: Option<TlsAcceptor>,
    /// For the Redis protocol listener: the same certificate, no ALPN.
    pub resp: Option<TlsAcceptor>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn required<'a>(path: &'a Option<PathBuf>, key: &str, why: &str) -> Result<&'a Path, String> {
    path.as_deref()
        .ok_or_else(|| format!("tls.{key} is required {why}"))
}

fn read_certs(path: &Path, key: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    std::fs::metadata(path).map_err(|e| format!("tls.{key} {}: {e}", path.display()))?;
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("tls.{key} {}: {e}", path.display()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("tls.{key} {}: bad PEM: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "tls.{key} {}: no CERTIFICATE in it",
            path.display()
        ));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    std::fs::metadata(path).map_err(|e| format!("tls.key_file {}: {e}", path.display()))?;
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("tls.key_file {}: no private key in it: {e}", path.display()))
}

impl TlsSection {
    /// Reads and checks the files and builds what is turned on; `Ok` with nothing in it when
    /// neither `peer` nor `client` is set.
    pub fn build(&self) -> Result<TlsSetup, String> {
        let mut setup = TlsSetup::default();
        if !self.peer && !self.client {
            return Ok(setup);
        }
        let why = if self.peer {
            "with tls.peer = true"
        } else {
            "with tls.client = true"
        };
        let certs = read_certs(required(&self.cert_file, "cert_file", why)?, "cert_file")?;
        let key = read_key(required(&self.key_file, "key_file", why)?)?;
        if self.peer {
            let ca_path = required(
                &self.ca_file,
                "ca_file",
                "with tls.peer = true (the CA that signs every node's certificate)",
            )?;
            let mut roots = RootCertStore::empty();
            for ca in read_certs(ca_path, "ca_file")? {
                roots
                    .add(ca)
                    .map_err(|e| format!("tls.ca_file {}: {e}", ca_path.display()))?;
            }
            let roots = Arc::new(roots);
            let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
                .build()
                .map_err(|e| format!("tls.ca_file {}: {e}", ca_path.display()))?;
            let server = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs.clone(), key.clone_key())
                .map_err(|e| format!("tls.cert_file/tls.key_file: {e}"))?;
            let client = rustls::ClientConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_root_certificates(roots)
                .with_client_auth_cert(certs.clone(), key.clone_key())
                .map_err(|e| format!("tls.cert_file/tls.key_file: {e}"))?;
            setup.peer = Some(PeerTls {
                connector: TlsConnector::from(Arc::new(client)),
                acceptor: TlsAcceptor::from(Arc::new(server)),
            });
        }
        if self.client {
            let mut server = rustls::ServerConfig::builder_with_provider(provider())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .map_err(|e| format!("tls.cert_file/tls.key_file: {e}"))?;
            // Redis clients announce no ALPN protocol; the RESP listener asks for none.
            setup.resp = Some(TlsAcceptor::from(Arc::new(server.clone())));
            server.alpn_protocols = vec![b"http/1.1".to_vec()];
            setup.client = Some(TlsAcceptor::from(Arc::new(server)));
        }
        Ok(setup)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_pair(dir: &Path) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().unwrap();
        let params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (cert_file, key_file) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert_file, cert.pem()).unwrap();
        std::fs::write(&key_file, key.serialize_pem()).unwrap();
        (cert_file, key_file)
    }

    /// Off by default; each missing or unreadable file is named in the error.
    #[test]
    fn validation_names_the_problem() {
        assert!(TlsSection::default().build().unwrap().peer.is_none());
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = write_pair(dir.path());
        let mut section = TlsSection {
            peer: true,
            ..TlsSection::default()
        };
        let error = |s: &TlsSection| s.build().err().unwrap();
        assert!(error(&section).contains("tls.cert_file is required"));
        section.cert_file = Some(cert.clone());
        section.key_file = Some(dir.path().join("missing.pem"));
        assert!(error(&section).contains("tls.key_file"));
        section.key_file = Some(cert.clone());
        assert!(error(&section).contains("no private key"));
        section.key_file = Some(key.clone());
        assert!(error(&section).contains("tls.ca_file is required"));
        section.ca_file = Some(key.clone());
        assert!(error(&section).contains("no CERTIFICATE"));
        section.ca_file = Some(cert.clone());
        let setup = section.build().unwrap();
        assert!(setup.peer.is_some() && setup.client.is_none());
        let client_only = TlsSection {
            cert_file: Some(cert),
            key_file: Some(key),
            client: true,
            ..TlsSection::default()
        };
        let client_only = client_only.build().unwrap();
        assert!(client_only.client.is_some() && client_only.resp.is_some());
    }

    #[test]
    fn server_names_come_from_the_dialed_host() {
        assert!(matches!(
            PeerTls::server_name("127.0.0.1:7001").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            PeerTls::server_name("[::1]:7001").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            PeerTls::server_name("node-a.example:7001").unwrap(),
            ServerName::DnsName(_)
        ));
    }
}
