//! TLS on both sides: PEM loading, the listener's server config with SNI certificate
//! selection, and the connector towards a pool's backends.
//!
//! Everything here is built when a snapshot is built (at start and on every reload), so a
//! renewed certificate or CA file is picked up by a reload; nothing is read on the request
//! path.

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use crate::config::{ListenerTls, UpstreamTls};

pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("{}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no PEM certificate found", path.display()));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Chooses the certificate by SNI; the first is served when SNI is absent or matches none.
#[derive(Debug)]
struct SniResolver {
    certs: Vec<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = hello
            .server_name()
            .and_then(|n| ServerName::try_from(n).ok())
        {
            for ck in &self.certs {
                let valid = ck
                    .end_entity_cert()
                    .ok()
                    .and_then(|c| webpki::EndEntityCert::try_from(c).ok())
                    .is_some_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok());
                if valid {
                    return Some(Arc::clone(ck));
                }
            }
        }
        self.certs.first().cloned()
    }
}

/// Loads the listener's certificates (on start and on every reload, so a renewed certificate
/// is served after a reload) and builds its rustls config.
pub fn server_config(tls: &ListenerTls) -> Result<Arc<rustls::ServerConfig>, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut certs = Vec::with_capacity(tls.certificates.len());
    for pair in &tls.certificates {
        let chain = read_certs(&pair.cert)?;
        let key = read_key(&pair.key)?;
        let signing = provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| format!("{}: {e}", pair.key.display()))?;
        let ck = CertifiedKey::new(chain, signing);
        ck.keys_match().map_err(|e| {
            format!(
                "{} does not match {}: {e}",
                pair.key.display(),
                pair.cert.display()
            )
        })?;
        certs.push(Arc::new(ck));
    }
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { certs }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// TLS towards a pool's backends, built once per snapshot.
#[derive(Clone)]
pub struct UpstreamTlsConnector {
    connector: tokio_rustls::TlsConnector,
    server_name: Option<String>,
    /// What the connector trusts and checks: the root certificates' bytes and the server
    /// name. A CA file rewritten in place changes it although the config text does not.
    fingerprint: u64,
}

impl UpstreamTlsConnector {
    pub fn new(cfg: &UpstreamTls) -> Result<UpstreamTlsConnector, String> {
        use std::hash::{Hash, Hasher};
        let mut fp = std::collections::hash_map::DefaultHasher::new();
        cfg.server_name.hash(&mut fp);
        let mut roots = rustls::RootCertStore::empty();
        match &cfg.ca {
            Some(path) => {
                let certs = read_certs(path)?;
                for c in certs {
                    c.as_ref().hash(&mut fp);
                    roots
                        .add(c)
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                for c in found.certs {
                    c.as_ref().hash(&mut fp);
                    let _ = roots.add(c);
                }
                if roots.is_empty() {
                    return Err("no system root certificates found (install ca-certificates, or set tls.ca)".into());
                }
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(UpstreamTlsConnector {
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_name: cfg.server_name.clone(),
            fingerprint: fp.finish(),
        })
    }

    /// Equal for two connectors that trust the same roots and check the same name.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// TLS over `tcp` to the backend at `address`, verified against the pool's roots. The
    /// name checked is `server_name` when set, else the host part of the address.
    pub async fn connect(
        &self,
        address: &str,
        tcp: tokio::net::TcpStream,
    ) -> Result<
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        Box<dyn std::error::Error + Send + Sync>,
    > {
        Ok(self.connector.connect(self.name_for(address)?, tcp).await?)
    }

    /// As `connect`, offering only ALPN `h2`: for the gRPC health check, which speaks HTTP/2
    /// whatever the pool's protocol (gRPC servers may refuse a TLS client without it).
    pub async fn connect_h2(
        &self,
        address: &str,
        tcp: tokio::net::TcpStream,
    ) -> Result<
        tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
        Box<dyn std::error::Error + Send + Sync>,
    > {
        let name = self.name_for(address)?;
        Ok(self
            .connector
            .with_alpn(vec![b"h2".to_vec()])
            .connect(name, tcp)
            .await?)
    }

    /// The name checked: `server_name` when set, else the host part of the address.
    fn name_for(
        &self,
        address: &str,
    ) -> Result<ServerName<'static>, rustls::pki_types::InvalidDnsNameError> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => host_part(address).to_owned(),
        };
        ServerName::try_from(name)
    }
}

fn host_part(address: &str) -> &str {
    let host = address.rsplit_once(':').map(|(h, _)| h).unwrap_or(address);
    host.trim_start_matches('[').trim_end_matches(']')
}
