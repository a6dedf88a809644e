//! Certificate credentials: client assertions (RFC 7523 JWT bearer tokens) signed with the
//! private key of a certificate registered on the app registration.
//!
//! The assertion's header names the certificate by its thumbprints (`x5t#S256`, the SHA-256 of
//! the DER certificate, and the legacy SHA-1 `x5t`); its claims are `aud` = the token URL,
//! `iss` = `sub` = the client id, a random `jti`, and `nbf`/`iat`/`exp` spanning ten minutes.
//! Only RSA keys are supported (PS256 or RS256), which is what Entra ID accepts.
//!
//! The certificate and key files are read again before each assertion, so a renewed
//! certificate (a rotated Kubernetes Secret) takes effect without a restart; when the files no
//! longer parse, or the key no longer matches the certificate, the last good pair is kept.
//! Neither the key nor an assertion is ever printed: [`CertificateCredential`]'s `Debug` shows
//! the certificate's thumbprint only, and errors name files, never their content.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::digest::{SHA1_FOR_LEGACY_USE_ONLY, SHA256, digest};
use ring::rand::SystemRandom;
use ring::signature::{self, RsaEncoding, RsaKeyPair};
use rustls::pki_types::CertificateDer;
use rustls_pemfile::Item;
use serde_json::json;

use super::token::SecretString;

/// Lifetime of an assertion (Entra ID accepts up to a day; the SDKs use ten minutes).
const ASSERTION_LIFETIME_SECS: u64 = 600;

/// Signature algorithm of certificate assertions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum AssertionAlgorithm {
    /// RSASSA-PSS with SHA-256 (what Entra ID recommends).
    #[default]
    #[value(name = "PS256")]
    Ps256,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    #[value(name = "RS256")]
    Rs256,
}

impl AssertionAlgorithm {
    /// The JWS `alg` name.
    pub fn as_str(self) -> &'static str {
        match self {
            AssertionAlgorithm::Ps256 => "PS256",
            AssertionAlgorithm::Rs256 => "RS256",
        }
    }

    fn padding(self) -> &'static dyn RsaEncoding {
        match self {
            AssertionAlgorithm::Ps256 => &signature::RSA_PSS_SHA256,
            AssertionAlgorithm::Rs256 => &signature::RSA_PKCS1_SHA256,
        }
    }
}

impl fmt::Display for AssertionAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a certificate credential could not be loaded. Messages name files and what is wrong
/// with them, never their content.
#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    /// A file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The content is not what was expected.
    #[error("{path}: {problem}")]
    Invalid {
        /// The file.
        path: String,
        /// What is wrong.
        problem: String,
    },
    /// The key cannot sign for the certificate.
    #[error("the private key in {key} does not belong to the certificate in {cert}")]
    Mismatch {
        /// The certificate file.
        cert: String,
        /// The key file.
        key: String,
    },
}

/// A certificate and its private key, parsed.
struct Loaded {
    /// SHA-256 of the raw file contents, to notice when they change.
    source_digest: [u8; 32],
    key: RsaKeyPair,
    /// base64url SHA-256 of the DER certificate.
    x5t_s256: String,
    /// base64url SHA-1 of the DER certificate.
    x5t: String,
    /// Upper-case hex SHA-1, as the Entra ID portal shows certificates.
    thumbprint_hex: String,
}

/// The app's certificate credential: signs client assertions.
pub struct CertificateCredential {
    /// The certificate's file (or, for one given as PEM, what names it in errors).
    cert_path: PathBuf,
    key_path: Option<PathBuf>,
    /// Read from files, again before each assertion; `false`: given as PEM, fixed.
    from_files: bool,
    algorithm: AssertionAlgorithm,
    current: Mutex<Arc<Loaded>>,
    rng: SystemRandom,
}

impl fmt::Debug for CertificateCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateCredential")
            .field("certificate", &self.cert_path.display().to_string())
            .field("thumbprint", &self.thumbprint())
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, CertificateError> {
    std::fs::read(path).map_err(|source| CertificateError::Read {
        path: path.display().to_string(),
        source,
    })
}

fn invalid(path: &Path, problem: impl Into<String>) -> CertificateError {
    CertificateError::Invalid {
        path: path.display().to_string(),
        problem: problem.into(),
    }
}

/// The PEM items of a file. Unparseable sections are reported as such, without their content.
fn pem_items(path: &Path, bytes: &[u8]) -> Result<Vec<Item>, CertificateError> {
    rustls_pemfile::read_all(&mut &bytes[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| invalid(path, "not a valid PEM file"))
}

fn parse_key(path: &Path, bytes: &[u8]) -> Result<RsaKeyPair, CertificateError> {
    let rejected = |e: ring::error::KeyRejected| {
        invalid(
            path,
            format!("the RSA private key was rejected ({e}; 2048 to 8192 bits are supported)"),
        )
    };
    for item in pem_items(path, bytes)? {
        match item {
            Item::Pkcs8Key(k) => {
                return RsaKeyPair::from_pkcs8(k.secret_pkcs8_der()).map_err(rejected);
            }
            Item::Pkcs1Key(k) => {
                return RsaKeyPair::from_der(k.secret_pkcs1_der()).map_err(rejected);
            }
            Item::Sec1Key(_) => {
                return Err(invalid(
                    path,
                    "an EC private key: certificate credentials need an RSA key",
                ));
            }
            _ => {}
        }
    }
    let problem = if bytes
        .windows(b"ENCRYPTED PRIVATE KEY".len())
        .any(|w| w == b"ENCRYPTED PRIVATE KEY")
    {
        "the private key is encrypted: provide it unencrypted (the file itself is the secret)"
    } else {
        "no private key (expected PEM \"BEGIN PRIVATE KEY\" (PKCS#8) or \"BEGIN RSA PRIVATE KEY\" (PKCS#1))"
    };
    Err(invalid(path, problem))
}

fn b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

impl CertificateCredential {
    /// Loads the certificate (the first one in `cert_path`) and its RSA private key (from
    /// `key_path`, or from `cert_path` when the key is in the same file), and checks that they
    /// belong together.
    pub fn load(
        cert_path: impl Into<PathBuf>,
        key_path: Option<PathBuf>,
        algorithm: AssertionAlgorithm,
    ) -> Result<Self, CertificateError> {
        let cert_path = cert_path.into();
        let loaded = load_pair(&cert_path, key_path.as_deref())?;
        Ok(CertificateCredential {
            cert_path,
            key_path,
            from_files: true,
            algorithm,
            current: Mutex::new(Arc::new(loaded)),
            rng: SystemRandom::new(),
        })
    }

    /// A certificate and its RSA private key given as PEM (e.g. a Kubernetes Secret's keys, read
    /// by an MdeConnection's controller, which makes a new credential when they change);
    /// `cert_label` and `key_label` name them in errors.
    pub fn from_pem(
        cert_label: &str,
        cert: &[u8],
        key_label: &str,
        key: &[u8],
        algorithm: AssertionAlgorithm,
    ) -> Result<Self, CertificateError> {
        let (cert_path, key_path) = (PathBuf::from(cert_label), PathBuf::from(key_label));
        let loaded = parse_pair(&cert_path, cert, Some((&key_path, key)))?;
        Ok(CertificateCredential {
            cert_path,
            key_path: Some(key_path),
            from_files: false,
            algorithm,
            current: Mutex::new(Arc::new(loaded)),
            rng: SystemRandom::new(),
        })
    }

    /// The signature algorithm.
    pub fn algorithm(&self) -> AssertionAlgorithm {
        self.algorithm
    }

    /// The certificate's SHA-1 thumbprint in upper-case hex, as the Entra ID portal lists it
    /// (public information: safe to log).
    pub fn thumbprint(&self) -> String {
        self.current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .thumbprint_hex
            .clone()
    }

    /// The current pair: re-read from the files when they changed; the last good one when they
    /// no longer load.
    fn refresh(&self) -> Arc<Loaded> {
        let current = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !self.from_files {
            return current;
        }
        let digest = match files_digest(&self.cert_path, self.key_path.as_deref()) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "client certificate unreadable; using the one loaded before");
                return current;
            }
        };
        if digest == current.source_digest {
            return current;
        }
        match load_pair(&self.cert_path, self.key_path.as_deref()) {
            Ok(fresh) => {
                tracing::info!(thumbprint = %fresh.thumbprint_hex, "client certificate reloaded");
                let fresh = Arc::new(fresh);
                *self.current.lock().unwrap_or_else(|e| e.into_inner()) = fresh.clone();
                fresh
            }
            Err(e) => {
                tracing::warn!(error = %e, "client certificate files changed but do not load; using the one loaded before");
                current
            }
        }
    }

    /// A digest of the credential's material (the files' contents), to tell whether it changed.
    pub(crate) fn fingerprint(&self) -> [u8; 32] {
        self.refresh().source_digest
    }

    /// A signed client assertion for `client_id`, addressed to `audience` (the token URL).
    pub fn assertion(&self, client_id: &str, audience: &str) -> Result<SecretString, String> {
        let loaded = self.refresh();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|_| "the system clock is before 1970".to_string())?
            .as_secs();
        let header = json!({
            "alg": self.algorithm.as_str(),
            "typ": "JWT",
            "x5t": loaded.x5t,
            "x5t#S256": loaded.x5t_s256,
        });
        let claims = json!({
            "aud": audience,
            "iss": client_id,
            "sub": client_id,
            "jti": uuid::Uuid::new_v4().to_string(),
            "nbf": now,
            "iat": now,
            "exp": now + ASSERTION_LIFETIME_SECS,
        });
        let signing_input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let mut sig = vec![0; loaded.key.public().modulus_len()];
        loaded
            .key
            .sign(
                self.algorithm.padding(),
                &self.rng,
                signing_input.as_bytes(),
                &mut sig,
            )
            .map_err(|_| "signing the client assertion failed".to_string())?;
        Ok(SecretString::new(format!("{signing_input}.{}", b64(&sig))))
    }
}

fn files_digest(cert: &Path, key: Option<&Path>) -> Result<[u8; 32], CertificateError> {
    let key_bytes = match key {
        Some(k) => Some(read(k)?),
        None => None,
    };
    Ok(digest_of(&read(cert)?, key_bytes.as_deref()))
}

fn digest_of(cert: &[u8], key: Option<&[u8]>) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&SHA256);
    ctx.update(cert);
    if let Some(key) = key {
        ctx.update(b"\0key\0");
        ctx.update(key);
    }
    let mut out = [0; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

fn load_pair(cert_path: &Path, key_path: Option<&Path>) -> Result<Loaded, CertificateError> {
    let cert_bytes = read(cert_path)?;
    let key = match key_path {
        Some(p) => Some((p, read(p)?)),
        None => None,
    };
    parse_pair(
        cert_path,
        &cert_bytes,
        key.as_ref().map(|(p, b)| (*p, &b[..])),
    )
}

/// A certificate (the first one in `cert_bytes`) and its RSA private key (from `key`, or from
/// the certificate's bytes), checked to belong together.
fn parse_pair(
    cert_path: &Path,
    cert_bytes: &[u8],
    key: Option<(&Path, &[u8])>,
) -> Result<Loaded, CertificateError> {
    let key_bytes = key.map(|(_, b)| b);
    let cert_der: CertificateDer<'static> = pem_items(cert_path, cert_bytes)?
        .into_iter()
        .find_map(|i| match i {
            Item::X509Certificate(c) => Some(c),
            _ => None,
        })
        .ok_or_else(|| invalid(cert_path, "no PEM \"BEGIN CERTIFICATE\" block"))?;
    let (key_file, key) = match key {
        Some((path, bytes)) => (path, parse_key(path, bytes)?),
        None => (cert_path, parse_key(cert_path, cert_bytes)?),
    };
    let cert = webpki::EndEntityCert::try_from(&cert_der)
        .map_err(|e| invalid(cert_path, format!("the certificate does not parse ({e:?})")))?;
    // The key must sign what the certificate's public key verifies.
    let probe = b"mde-isolation-operator key check";
    let mut sig = vec![0; key.public().modulus_len()];
    key.sign(
        &signature::RSA_PKCS1_SHA256,
        &SystemRandom::new(),
        probe,
        &mut sig,
    )
    .map_err(|_| invalid(key_file, "the RSA private key cannot sign"))?;
    cert.verify_signature(webpki::ring::RSA_PKCS1_2048_8192_SHA256, probe, &sig)
        .map_err(|_| CertificateError::Mismatch {
            cert: cert_path.display().to_string(),
            key: key_file.display().to_string(),
        })?;

    let sha1 = digest(&SHA1_FOR_LEGACY_USE_ONLY, cert_der.as_ref());
    Ok(Loaded {
        source_digest: digest_of(cert_bytes, key_bytes),
        key,
        x5t_s256: b64(digest(&SHA256, cert_der.as_ref()).as_ref()),
        x5t: b64(sha1.as_ref()),
        thumbprint_hex: sha1.as_ref().iter().map(|b| format!("{b:02X}")).collect(),
    })
}

/// RSA test certificates made with the `openssl` command, and an independent check of
/// assertions.
#[cfg(test)]
pub(crate) mod test_keys {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use rustls::pki_types::CertificateDer;
    use serde_json::Value;

    fn openssl(args: &[&str]) {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("the openssl command is needed to make RSA test keys");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A self-signed RSA-2048 certificate and its key (`name.crt`, `name.key`) in `dir`; the
    /// key is PKCS#1 when `pkcs1`, else PKCS#8.
    pub(crate) fn pair(dir: &Path, name: &str, pkcs1: bool) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        let (c, k) = (cert.to_str().unwrap(), key.to_str().unwrap());
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            k,
            "-out",
            c,
            "-days",
            "2",
            "-subj",
            "/CN=mde-test",
        ]);
        if pkcs1 {
            openssl(&["rsa", "-in", k, "-traditional", "-out", k]);
        }
        (cert, key)
    }

    /// Checks `jwt`'s thumbprints and signature against the certificate in `cert` and returns
    /// its claims.
    pub(crate) fn verify(jwt: &str, cert: &Path) -> Value {
        let pem = std::fs::read(cert).unwrap();
        let der: CertificateDer<'static> = rustls_pemfile::certs(&mut &pem[..])
            .next()
            .unwrap()
            .unwrap();
        let parts: Vec<&str> = jwt.split('.').collect();
        assert_eq!(parts.len(), 3);
        let decode = |s: &str| URL_SAFE_NO_PAD.decode(s).unwrap();
        let header: Value = serde_json::from_slice(&decode(parts[0])).unwrap();
        let sha256 = ring::digest::digest(&ring::digest::SHA256, der.as_ref());
        assert_eq!(header["x5t#S256"], URL_SAFE_NO_PAD.encode(sha256));
        let sha1 = ring::digest::digest(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY, der.as_ref());
        assert_eq!(header["x5t"], URL_SAFE_NO_PAD.encode(sha1));
        assert_eq!(header["typ"], "JWT");
        let alg = match header["alg"].as_str().unwrap() {
            "PS256" => webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
            "RS256" => webpki::ring::RSA_PKCS1_2048_8192_SHA256,
            other => panic!("alg {other}"),
        };
        let signed = format!("{}.{}", parts[0], parts[1]);
        webpki::EndEntityCert::try_from(&der)
            .unwrap()
            .verify_signature(alg, signed.as_bytes(), &decode(parts[2]))
            .expect("the signature verifies with the certificate's key");
        serde_json::from_slice(&decode(parts[1])).unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::test_keys::{pair, verify};
    use super::*;

    #[test]
    fn assertions_carry_the_claims_entra_id_checks() {
        let dir = tempfile::tempdir().unwrap();
        for (alg, pkcs1) in [
            (AssertionAlgorithm::Ps256, false),
            (AssertionAlgorithm::Rs256, true),
        ] {
            let (cert, key) = pair(dir.path(), alg.as_str(), pkcs1);
            let c = CertificateCredential::load(&cert, Some(key), alg).unwrap();
            let aud = "https://login.microsoftonline.com/t/oauth2/v2.0/token";
            let jwt = c.assertion("app-id", aud).unwrap();
            let claims = verify(jwt.expose(), &cert);
            assert_eq!(claims["aud"], aud);
            assert_eq!(claims["iss"], "app-id");
            assert_eq!(claims["sub"], "app-id");
            let (nbf, iat, exp) = (
                claims["nbf"].as_u64().unwrap(),
                claims["iat"].as_u64().unwrap(),
                claims["exp"].as_u64().unwrap(),
            );
            assert_eq!((nbf, exp - iat), (iat, ASSERTION_LIFETIME_SECS));
            assert!(uuid::Uuid::parse_str(claims["jti"].as_str().unwrap()).is_ok());
            let header: serde_json::Value = serde_json::from_slice(
                &URL_SAFE_NO_PAD
                    .decode(jwt.expose().split('.').next().unwrap())
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(header["alg"], alg.as_str());
            assert_ne!(
                c.assertion("app-id", aud).unwrap().expose(),
                jwt.expose(),
                "fresh jti"
            );
        }
    }

    #[test]
    fn the_key_may_share_the_certificate_file() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(dir.path(), "both", false);
        let both = dir.path().join("both.pem");
        let mut pem = std::fs::read(&cert).unwrap();
        pem.extend(std::fs::read(&key).unwrap());
        std::fs::write(&both, pem).unwrap();
        let c = CertificateCredential::load(&both, None, AssertionAlgorithm::Ps256).unwrap();
        verify(c.assertion("a", "b").unwrap().expose(), &cert);
        assert_eq!(c.thumbprint().len(), 40);
    }

    #[test]
    fn unusable_files_are_reported_without_their_content() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(dir.path(), "one", false);
        let (_, other_key) = pair(dir.path(), "two", false);
        let alg = AssertionAlgorithm::Ps256;
        let err = |cert: &Path, key: Option<&Path>| {
            CertificateCredential::load(cert, key.map(Path::to_path_buf), alg)
                .unwrap_err()
                .to_string()
        };
        let e = err(&cert, Some(&other_key));
        assert!(e.contains("does not belong to the certificate"), "{e}");
        let e = err(&cert, None);
        assert!(e.contains("no private key"), "{e}");
        let e = err(&key, Some(&key));
        assert!(e.contains("BEGIN CERTIFICATE"), "{e}");
        let e = err(&dir.path().join("absent.crt"), Some(&key));
        assert!(e.contains("absent.crt"), "{e}");

        let encrypted = dir.path().join("enc.key");
        std::fs::write(
            &encrypted,
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nMIIB\n-----END ENCRYPTED PRIVATE KEY-----\n",
        )
        .unwrap();
        let e = err(&cert, Some(&encrypted));
        assert!(e.contains("encrypted"), "{e}");

        let ec = rcgen::KeyPair::generate().unwrap();
        let ec_file = dir.path().join("ec.key");
        std::fs::write(&ec_file, ec.serialize_pem()).unwrap();
        let e = err(&cert, Some(&ec_file));
        assert!(e.contains("RSA"), "{e}");

        for text in [
            err(&cert, Some(&other_key)),
            format!(
                "{:?}",
                CertificateCredential::load(&cert, Some(key.clone()), alg).unwrap()
            ),
        ] {
            assert!(
                !text.contains("PRIVATE KEY") && !text.contains("MII"),
                "{text}"
            );
        }
    }

    #[test]
    fn renewed_files_are_picked_up_and_broken_ones_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = pair(dir.path(), "old", false);
        let (new_cert, new_key) = pair(dir.path(), "new", true);
        let live_cert = dir.path().join("tls.crt");
        let live_key = dir.path().join("tls.key");
        std::fs::copy(&cert, &live_cert).unwrap();
        std::fs::copy(&key, &live_key).unwrap();
        let c = CertificateCredential::load(
            &live_cert,
            Some(live_key.clone()),
            AssertionAlgorithm::Rs256,
        )
        .unwrap();
        let old_print = c.fingerprint();
        verify(c.assertion("a", "b").unwrap().expose(), &cert);

        // Half-rotated (new certificate, old key): the old pair goes on signing.
        std::fs::copy(&new_cert, &live_cert).unwrap();
        verify(c.assertion("a", "b").unwrap().expose(), &cert);
        std::fs::copy(&new_key, &live_key).unwrap();
        verify(c.assertion("a", "b").unwrap().expose(), &new_cert);
        assert_ne!(c.fingerprint(), old_print);
        std::fs::remove_file(&live_key).unwrap();
        verify(c.assertion("a", "b").unwrap().expose(), &new_cert);
    }
}
