//! Self-signed TLS: a fresh CA per run and a server certificate it signs, with the SANs
//! clients connect by (127.0.0.1, localhost, extras). Clients trust the CA written to
//! `--ca-out`.

use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::ServerConfig;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::TlsAcceptor;

/// The acceptor and the CA certificate in PEM.
pub struct TlsSetup {
    /// Server-side TLS.
    pub acceptor: TlsAcceptor,
    /// CA certificate (PEM) for clients.
    pub ca_pem: String,
}

/// Generates the CA and server certificate and builds a rustls config on the ring provider.
pub fn setup(extra_sans: &[String]) -> Result<TlsSetup, String> {
    let err = |e: &dyn std::fmt::Display| format!("TLS setup failed: {e}");
    let ca_key = KeyPair::generate().map_err(|e| err(&e))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(|e| err(&e))?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "mde-sim test CA");
    ca_params.distinguished_name = dn;
    let ca_cert = ca_params.self_signed(&ca_key).map_err(|e| err(&e))?;
    let issuer = Issuer::new(ca_params, ca_key);

    let mut sans = vec!["127.0.0.1".to_string(), "localhost".to_string()];
    sans.extend(extra_sans.iter().filter(|s| !s.is_empty()).cloned());
    let server_key = KeyPair::generate().map_err(|e| err(&e))?;
    let mut params = CertificateParams::new(sans).map_err(|e| err(&e))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "mde-sim");
    params.distinguished_name = dn;
    let server_cert = params
        .signed_by(&server_key, &issuer)
        .map_err(|e| err(&e))?;

    let chain = vec![CertificateDer::from(server_cert.der().to_vec())];
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| err(&e))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| err(&e))?;
    // The server speaks HTTP/1.1 only.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsSetup {
        acceptor: TlsAcceptor::from(Arc::new(config)),
        ca_pem: ca_cert.pem(),
    })
}
