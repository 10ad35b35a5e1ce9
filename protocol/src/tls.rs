//! TLS for master-worker connections (rustls, no OpenSSL).
//!
//! The master holds a certificate and key (`--tls-cert`, `--tls-key`); a
//! worker trusts it through the cluster's CA certificate (`--tls-ca`) or
//! through the SHA-256 fingerprint of the master's certificate
//! (`--tls-fingerprint`), which needs no CA and no host names. [`init`]
//! makes a small CA and a master certificate signed by it, so a cluster
//! gets going in one command (`drover tls init DIR`).
//!
//! When a password is also set, its proof is bound to the TLS session
//! through [`binding`] (a value exported from the session's keys, RFC 5705):
//! a proof made on one TLS connection is worthless on any other, so a relay
//! that terminates TLS on both sides cannot pass a worker's proof on.

pub use rustls;
pub use tokio_rustls;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use sha2::{Digest, Sha256};

/// Errors while setting TLS up; each names the file or value at fault.
#[derive(thiserror::Error, Debug)]
pub enum TlsError {
    #[error("TLS certificate file {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("TLS key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error(
        "TLS fingerprint {0:?} is not 64 hex digits (the SHA-256 that `drover tls init` prints)"
    )]
    Fingerprint(String),
    #[error("TLS set-up: {0}")]
    Config(String),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("TLS handshake with the master at {addr} failed: {reason}")]
    Handshake { addr: String, reason: String },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::Cert {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate in it".into()));
    }
    Ok(certs)
}

/// The master's side: its certificate chain and private key, from PEM files.
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let certs = read_certs(cert)?;
    // Read through the one secret-file reader, so a key others can read is
    // named in a warning like a password file is.
    let pem =
        drover_catalog::secret::read_secret_file(key, "TLS key").map_err(|e| TlsError::Key {
            path: key.to_path_buf(),
            reason: e.to_string(),
        })?;
    let key_der = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| TlsError::Key {
        path: key.to_path_buf(),
        reason: format!("no PEM private key in it ({e})"),
    })?;
    let config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key_der)
        .map_err(|e| TlsError::Key {
            path: key.to_path_buf(),
            reason: format!("does not match {}: {e}", cert.display()),
        })?;
    Ok(Arc::new(config))
}

/// How a worker decides that it reached the real master.
#[derive(Clone, Debug)]
pub enum Trust {
    /// The master's certificate must chain to this CA certificate (PEM) and
    /// name the host the worker connects to.
    Ca(PathBuf),
    /// The master's certificate must have this SHA-256 fingerprint.
    Fingerprint([u8; 32]),
}

impl Trust {
    /// Parses a fingerprint as `drover tls init` prints it (hex, colons
    /// allowed).
    pub fn fingerprint(text: &str) -> Result<Trust, TlsError> {
        let digits: String = text.chars().filter(|c| *c != ':').collect();
        let bytes = hex::decode(&digits).map_err(|_| TlsError::Fingerprint(text.into()))?;
        let pin: [u8; 32] = bytes
            .try_into()
            .map_err(|_| TlsError::Fingerprint(text.into()))?;
        Ok(Trust::Fingerprint(pin))
    }
}

/// The worker's side.
pub fn client_config(trust: &Trust) -> Result<Arc<ClientConfig>, TlsError> {
    let builder = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| TlsError::Config(e.to_string()))?;
    let config = match trust {
        Trust::Ca(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs(path)? {
                roots.add(cert).map_err(|e| TlsError::Cert {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Fingerprint(pin) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                pin: *pin,
                provider: provider(),
            }))
            .with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// The name a worker checks the master's certificate against: the host part
/// of `HOST:PORT`. (A pinned fingerprint ignores it.)
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string())
        .map_err(|e| TlsError::Config(format!("{host:?} is not a host name for TLS: {e}")))
}

/// SHA-256 of a certificate (DER), as hex with colons: what a worker pins.
pub fn fingerprint(cert: &[u8]) -> String {
    let digest = Sha256::digest(cert);
    digest
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The fingerprint of the first certificate in a PEM file (what a worker
/// pins with `--tls-fingerprint`).
pub fn cert_file_fingerprint(path: &Path) -> Result<String, TlsError> {
    let certs = read_certs(path)?;
    Ok(fingerprint(certs[0].as_ref()))
}

/// Accepts exactly one certificate, by fingerprint; the handshake's
/// signatures are still checked, so only the holder of its key passes.
#[derive(Debug)]
struct Pinned {
    pin: [u8; 32],
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let seen: [u8; 32] = Sha256::digest(end_entity.as_ref()).into();
        if seen == self.pin {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!(
                "the master's certificate has fingerprint {}, not the pinned one",
                fingerprint(end_entity.as_ref())
            )))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A value both ends of one TLS session share and no other session has,
/// bound into the password proofs.
pub fn binding<D>(conn: &rustls::ConnectionCommon<D>) -> Result<[u8; 32], TlsError> {
    let mut out = [0u8; 32];
    conn.export_keying_material(&mut out, b"EXPORTER-drover-auth", None)
        .map_err(|e| TlsError::Config(format!("cannot export the session binding: {e}")))?;
    Ok(out)
}

/// What [`init`] wrote.
#[derive(Debug)]
pub struct Generated {
    pub ca_cert: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Fingerprint of `cert`, for workers that pin it.
    pub fingerprint: String,
}

/// Makes a cluster CA and a master certificate it signs, valid for `hosts`
/// (names or IP addresses; `localhost` and 127.0.0.1 are always added), in
/// `dir`: `ca.pem` (give it to workers), `master.pem` and `master-key.pem`
/// (only the master reads this; mode 0600). The CA's own key is not kept:
/// a new master certificate comes with a new CA, so nothing on disk can sign
/// a rogue one.
///
/// ```no_run
/// let made = drover_protocol::tls::init(std::path::Path::new("tls"), &["node1".into()])?;
/// println!("workers: --tls-ca {}", made.ca_cert.display());
/// # Ok::<(), drover_protocol::tls::TlsError>(())
/// ```
pub fn init(dir: &Path, hosts: &[String]) -> Result<Generated, TlsError> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let gen = |e: rcgen::Error| TlsError::Config(format!("generating the certificates: {e}"));
    fs::create_dir_all(dir)?;

    let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "drover cluster CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_key = KeyPair::generate().map_err(gen)?;
    let ca_cert = ca.self_signed(&ca_key).map_err(gen)?;

    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into()];
    for h in hosts {
        if !names.contains(h) {
            names.push(h.clone());
        }
    }
    let mut leaf = CertificateParams::new(names).map_err(gen)?;
    leaf.distinguished_name
        .push(DnType::CommonName, "drover master");
    let leaf_key = KeyPair::generate().map_err(gen)?;
    let leaf_cert = leaf.signed_by(&leaf_key, &ca_cert, &ca_key).map_err(gen)?;

    let made = Generated {
        ca_cert: dir.join("ca.pem"),
        cert: dir.join("master.pem"),
        key: dir.join("master-key.pem"),
        fingerprint: fingerprint(leaf_cert.der()),
    };
    fs::write(&made.ca_cert, ca_cert.pem())?;
    fs::write(&made.cert, leaf_cert.pem())?;
    write_private(&made.key, leaf_key.serialize_pem().as_bytes())?;
    Ok(made)
}

fn write_private(path: &Path, bytes: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    /// A TLS session over a real loopback connection: the master's end
    /// reads one line and answers with its binding; returns what the
    /// worker got (or the handshake error) and its own binding.
    async fn session(
        made: &Generated,
        trust: &Trust,
        name: &str,
    ) -> Result<([u8; 32], [u8; 32]), String> {
        let server = server_config(&made.cert, &made.key).map_err(|e| e.to_string())?;
        let client = client_config(trust).map_err(|e| e.to_string())?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let master = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = TlsAcceptor::from(server).accept(tcp).await.ok()?;
            let b = binding(tls.get_ref().1).unwrap();
            let mut one = [0u8; 1];
            tls.read_exact(&mut one).await.ok()?;
            tls.write_all(&b).await.ok()?;
            tls.flush().await.ok()?;
            Some(b)
        });
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = server_name(name).map_err(|e| e.to_string())?;
        let mut tls = TlsConnector::from(client)
            .connect(name, tcp)
            .await
            .map_err(|e| e.to_string())?;
        let mine = binding(tls.get_ref().1).unwrap();
        tls.write_all(b"x").await.unwrap();
        tls.flush().await.unwrap();
        let mut theirs = [0u8; 32];
        tls.read_exact(&mut theirs)
            .await
            .map_err(|e| e.to_string())?;
        let _ = master.await;
        Ok((mine, theirs))
    }

    #[tokio::test]
    async fn a_worker_trusting_the_ca_or_the_fingerprint_connects_and_shares_the_binding() {
        let dir = tempfile::tempdir().unwrap();
        let made = init(dir.path(), &["node1.example.org".into()]).unwrap();
        let mode = fs::metadata(&made.key).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );

        let by_ca = Trust::Ca(made.ca_cert.clone());
        for name in ["localhost", "127.0.0.1", "node1.example.org"] {
            let (mine, theirs) = session(&made, &by_ca, name).await.unwrap();
            assert_eq!(mine, theirs, "both ends derive the same binding");
        }
        let pinned = Trust::fingerprint(&made.fingerprint).unwrap();
        let (a, _) = session(&made, &pinned, "any.host").await.unwrap();
        let (b, _) = session(&made, &pinned, "any.host").await.unwrap();
        assert_ne!(a, b, "each session has its own binding");
    }

    #[tokio::test]
    async fn a_worker_refuses_a_master_it_does_not_trust() {
        let dir = tempfile::tempdir().unwrap();
        let made = init(&dir.path().join("real"), &[]).unwrap();
        let rogue = init(&dir.path().join("rogue"), &[]).unwrap();
        // The rogue master presents its own certificate.
        let err = session(&rogue, &Trust::Ca(made.ca_cert.clone()), "localhost")
            .await
            .unwrap_err();
        assert!(err.contains("certificate"), "{err}");
        let err = session(&rogue, &Trust::fingerprint(&made.fingerprint).unwrap(), "x")
            .await
            .unwrap_err();
        assert!(err.contains("fingerprint"), "{err}");
        // The right CA, but a name the certificate does not carry.
        let err = session(&made, &Trust::Ca(made.ca_cert.clone()), "elsewhere.org")
            .await
            .unwrap_err();
        assert!(err.to_lowercase().contains("name"), "{err}");
    }

    #[test]
    fn bad_files_and_fingerprints_say_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "").unwrap();
        let err = server_config(&empty, &empty).unwrap_err().to_string();
        assert!(
            err.contains("empty.pem") && err.contains("no PEM certificate"),
            "{err}"
        );
        let err = Trust::fingerprint("abc").unwrap_err().to_string();
        assert!(err.contains("64 hex digits"), "{err}");
        let missing = client_config(&Trust::Ca(dir.path().join("nope.pem")))
            .unwrap_err()
            .to_string();
        assert!(missing.contains("nope.pem"), "{missing}");
    }
}
