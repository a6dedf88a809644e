//! The credentials an app registration can carry besides a secret, and the signature checks of
//! client assertions made with them:
//!
//! - registered certificates (certificate credentials): the assertion names one by its
//!   thumbprint (`x5t#S256`, or the legacy SHA-1 `x5t`) and is signed with its RSA key (RS256
//!   or PS256);
//! - federated identity credentials (workload identity): an external issuer's token (e.g. a
//!   Kubernetes projected service-account token) matching an issuer/subject/audience rule and
//!   signed by one of the issuer's keys, given as a JWKS or a PEM public key or certificate
//!   (RS256, PS256 or ES256).
//!
//! Independent of the operator's library: this is the other side of the contract.

use std::path::Path;

use ring::digest::{SHA1_FOR_LEGACY_USE_ONLY, SHA256, digest};
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use rustls::pki_types::CertificateDer;
use rustls_pemfile::Item;
use serde_json::Value;

use crate::auth::base64url_decode;

/// Audience Entra ID requires of federated tokens.
pub const TOKEN_EXCHANGE_AUDIENCE: &str = "api://AzureADTokenExchange";

/// A certificate registered on an app.
#[derive(Debug, Clone)]
pub struct RegisteredCertificate {
    /// DER certificate.
    der: Vec<u8>,
    /// SHA-256 of the DER, base64url (`x5t#S256`).
    pub x5t_s256: String,
    /// SHA-1 of the DER, base64url (`x5t`).
    pub x5t: String,
}

/// A federated identity credential: who may sign in as the app with an external token.
#[derive(Debug, Clone)]
pub struct FederatedCredential {
    /// Exact `iss` of accepted tokens.
    pub issuer: String,
    /// Exact `sub` of accepted tokens.
    pub subject: String,
    /// Required `aud` (one of the token's audiences).
    pub audience: String,
    /// The issuer's signing keys.
    keys: Vec<VerifyKey>,
}

/// A key that verifies JWS signatures.
#[derive(Debug, Clone)]
enum VerifyKey {
    /// RSA, as modulus and exponent (from a JWKS).
    RsaComponents {
        kid: Option<String>,
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// RSA, as a PKCS#1 RSAPublicKey DER.
    RsaDer { kid: Option<String>, der: Vec<u8> },
    /// ECDSA P-256, as an uncompressed point.
    P256 { kid: Option<String>, point: Vec<u8> },
}

impl VerifyKey {
    fn kid(&self) -> Option<&str> {
        match self {
            VerifyKey::RsaComponents { kid, .. }
            | VerifyKey::RsaDer { kid, .. }
            | VerifyKey::P256 { kid, .. } => kid.as_deref(),
        }
    }

    fn verify(&self, alg: &str, msg: &[u8], sig: &[u8]) -> bool {
        let rsa: &signature::RsaParameters = match alg {
            "RS256" => &signature::RSA_PKCS1_2048_8192_SHA256,
            "PS256" => &signature::RSA_PSS_2048_8192_SHA256,
            "ES256" => {
                return match self {
                    VerifyKey::P256 { point, .. } => {
                        UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                            .verify(msg, sig)
                            .is_ok()
                    }
                    _ => false,
                };
            }
            _ => return false,
        };
        match self {
            VerifyKey::RsaComponents { n, e, .. } => RsaPublicKeyComponents { n, e }
                .verify(rsa, msg, sig)
                .is_ok(),
            VerifyKey::RsaDer { der, .. } => {
                UnparsedPublicKey::new(rsa, der).verify(msg, sig).is_ok()
            }
            VerifyKey::P256 { .. } => false,
        }
    }
}

/// A value that is either inline text or the path of a file holding it (relative paths are
/// relative to `base`).
fn text_or_file(value: &str, inline: bool, base: &Path) -> Result<String, String> {
    if inline {
        return Ok(value.to_string());
    }
    let path = base.join(value.trim());
    std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))
}

fn pem_items(text: &str) -> Result<Vec<Item>, String> {
    rustls_pemfile::read_all(&mut text.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| "not valid PEM".to_string())
}

fn b64url(data: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

impl RegisteredCertificate {
    /// A certificate from PEM text or a PEM file (the first certificate in it).
    pub fn parse(value: &str, base: &Path) -> Result<Self, String> {
        let text = text_or_file(value, value.contains("-----BEGIN"), base)?;
        let der = pem_items(&text)?
            .into_iter()
            .find_map(|i| match i {
                Item::X509Certificate(c) => Some(c.to_vec()),
                _ => None,
            })
            .ok_or("no PEM \"BEGIN CERTIFICATE\" block")?;
        webpki::EndEntityCert::try_from(&CertificateDer::from(der.as_slice()))
            .map_err(|e| format!("the certificate does not parse ({e:?})"))?;
        Ok(RegisteredCertificate {
            x5t_s256: b64url(digest(&SHA256, &der).as_ref()),
            x5t: b64url(digest(&SHA1_FOR_LEGACY_USE_ONLY, &der).as_ref()),
            der,
        })
    }

    /// Whether `sig` is a valid `alg` (RS256 or PS256) signature of `msg` by this certificate's
    /// key.
    pub fn verify(&self, alg: &str, msg: &[u8], sig: &[u8]) -> bool {
        let alg = match alg {
            "RS256" => webpki::ring::RSA_PKCS1_2048_8192_SHA256,
            "PS256" => webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
            _ => return false,
        };
        let der = CertificateDer::from(self.der.as_slice());
        webpki::EndEntityCert::try_from(&der)
            .and_then(|c| c.verify_signature(alg, msg, sig))
            .is_ok()
    }
}

impl FederatedCredential {
    /// A rule with its keys: `jwks` (JSON text or a file) and/or `public_key` (PEM public key
    /// or certificate, text or a file).
    pub fn new(
        issuer: String,
        subject: String,
        audience: String,
        jwks: Option<&str>,
        public_key: Option<&str>,
        base: &Path,
    ) -> Result<Self, String> {
        if issuer.is_empty() || subject.is_empty() || audience.is_empty() {
            return Err("issuer, subject and audience must not be empty".into());
        }
        let mut keys = Vec::new();
        if let Some(j) = jwks {
            let text = text_or_file(j, j.trim_start().starts_with('{'), base)?;
            keys.extend(parse_jwks(&text)?);
        }
        if let Some(p) = public_key {
            let text = text_or_file(p, p.contains("-----BEGIN"), base)?;
            keys.push(parse_public_key_pem(&text)?);
        }
        if keys.is_empty() {
            return Err("needs the issuer's keys: `jwks` and/or `publicKey`".into());
        }
        Ok(FederatedCredential {
            issuer,
            subject,
            audience,
            keys,
        })
    }

    /// Whether `sig` is a valid `alg` signature of `msg` by one of the issuer's keys (those
    /// with the token's `kid` when both name one).
    pub fn verify(&self, alg: &str, kid: Option<&str>, msg: &[u8], sig: &[u8]) -> bool {
        self.keys
            .iter()
            .filter(|k| match (kid, k.kid()) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            })
            .any(|k| k.verify(alg, msg, sig))
    }
}

fn parse_jwks(text: &str) -> Result<Vec<VerifyKey>, String> {
    let v: Value = serde_json::from_str(text).map_err(|e| format!("JWKS is not JSON: {e}"))?;
    let list = v
        .get("keys")
        .and_then(Value::as_array)
        .ok_or("JWKS has no \"keys\" array")?;
    let field = |k: &Value, name: &str| {
        k.get(name)
            .and_then(Value::as_str)
            .and_then(base64url_decode)
            .ok_or(format!("JWKS key without a valid \"{name}\""))
    };
    let mut keys = Vec::new();
    for k in list {
        let kid = k.get("kid").and_then(Value::as_str).map(str::to_string);
        match k.get("kty").and_then(Value::as_str) {
            Some("RSA") => keys.push(VerifyKey::RsaComponents {
                kid,
                n: field(k, "n")?,
                e: field(k, "e")?,
            }),
            Some("EC") if k.get("crv").and_then(Value::as_str) == Some("P-256") => {
                let mut point = vec![4];
                point.extend(field(k, "x")?);
                point.extend(field(k, "y")?);
                keys.push(VerifyKey::P256 { kid, point });
            }
            _ => {} // other key types cannot sign what is verified here
        }
    }
    if keys.is_empty() {
        return Err("JWKS has no RSA or P-256 key".into());
    }
    Ok(keys)
}

/// One DER element: (tag, content, rest).
fn der_next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| (tag, &rest[..len], &rest[len..]))
}

const OID_RSA: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];

/// The key of a SubjectPublicKeyInfo (RSA or EC P-256).
fn parse_spki(spki: &[u8]) -> Option<VerifyKey> {
    let (0x30, body, _) = der_next(spki)? else {
        return None;
    };
    let (0x30, alg, rest) = der_next(body)? else {
        return None;
    };
    let (0x03, bits, _) = der_next(rest)? else {
        return None;
    };
    let (&0, key) = bits.split_first()? else {
        return None;
    };
    let (0x06, oid, params) = der_next(alg)? else {
        return None;
    };
    if oid == OID_RSA {
        return Some(VerifyKey::RsaDer {
            kid: None,
            der: key.to_vec(),
        });
    }
    let (0x06, curve, _) = der_next(params)? else {
        return None;
    };
    (oid == OID_EC && curve == OID_P256).then(|| VerifyKey::P256 {
        kid: None,
        point: key.to_vec(),
    })
}

fn parse_public_key_pem(text: &str) -> Result<VerifyKey, String> {
    for item in pem_items(text)? {
        let spki = match item {
            Item::SubjectPublicKeyInfo(k) => k.to_vec(),
            Item::X509Certificate(c) => certificate_spki(&c)
                .ok_or("the certificate's public key could not be read")?
                .to_vec(),
            _ => continue,
        };
        return parse_spki(&spki).ok_or_else(|| "not an RSA or P-256 public key".to_string());
    }
    // PKCS#1 "RSA PUBLIC KEY": the RSAPublicKey DER itself.
    if let Some(b64) = text
        .split("-----BEGIN RSA PUBLIC KEY-----")
        .nth(1)
        .and_then(|r| r.split("-----END RSA PUBLIC KEY-----").next())
    {
        use base64::Engine;
        let compact: String = b64.split_whitespace().collect();
        let der = base64::engine::general_purpose::STANDARD
            .decode(compact)
            .map_err(|_| "RSA PUBLIC KEY is not valid base64")?;
        return Ok(VerifyKey::RsaDer { kid: None, der });
    }
    Err("no PEM public key (\"PUBLIC KEY\", \"RSA PUBLIC KEY\" or \"CERTIFICATE\")".into())
}

/// The SubjectPublicKeyInfo element of a DER certificate.
fn certificate_spki(cert: &[u8]) -> Option<&[u8]> {
    let (0x30, body, _) = der_next(cert)? else {
        return None;
    };
    let (0x30, tbs, _) = der_next(body)? else {
        return None;
    };
    let mut rest = tbs;
    // [0] version (optional), serial, signature, issuer, validity, subject, then the SPKI.
    if rest.first() == Some(&0xa0) {
        rest = der_next(rest)?.2;
    }
    for _ in 0..5 {
        rest = der_next(rest)?.2;
    }
    let (tag, _, after) = der_next(rest)?;
    (tag == 0x30).then(|| &rest[..rest.len() - after.len()])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn der_lengths() {
        assert_eq!(
            der_next(&[0x04, 0x01, 0xaa, 0xbb]),
            Some((4, &[0xaa][..], &[0xbb][..]))
        );
        let long = [&[0x04, 0x81, 0x80][..], &[0u8; 0x80]].concat();
        assert_eq!(der_next(&long).map(|x| x.1.len()), Some(0x80));
        assert_eq!(der_next(&[0x04, 0x05, 0x00]), None);
        assert_eq!(der_next(&[0x04, 0x80]), None);
    }

    #[test]
    fn p256_keys_from_pem_certificate_and_jwks_verify() {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["issuer.test".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let rng = ring::rand::SystemRandom::new();
        let signer = signature::EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &key.serialize_der(),
            &rng,
        )
        .unwrap();
        let sig = signer.sign(&rng, b"msg").unwrap();
        let base = Path::new("/");
        for (jwks, pem) in [
            (None, Some(key.public_key_pem())),
            (None, Some(cert.pem())),
            (
                Some(format!(
                    r#"{{"keys":[{{"kty":"EC","crv":"P-256","kid":"k1","x":"{}","y":"{}"}}]}}"#,
                    b64url(&key.public_key_raw()[1..33]),
                    b64url(&key.public_key_raw()[33..])
                )),
                None,
            ),
        ] {
            let rule = FederatedCredential::new(
                "iss".into(),
                "sub".into(),
                TOKEN_EXCHANGE_AUDIENCE.into(),
                jwks.as_deref(),
                pem.as_deref(),
                base,
            )
            .unwrap();
            assert!(rule.verify("ES256", None, b"msg", sig.as_ref()));
            assert!(!rule.verify("ES256", None, b"other", sig.as_ref()));
            assert!(!rule.verify("RS256", None, b"msg", sig.as_ref()));
            if jwks.is_some() {
                assert!(rule.verify("ES256", Some("k1"), b"msg", sig.as_ref()));
                assert!(!rule.verify("ES256", Some("k2"), b"msg", sig.as_ref()));
            }
        }
    }

    #[test]
    fn bad_rules_and_certificates_are_seed_errors() {
        let base = Path::new("/nonexistent");
        let rule = |jwks: Option<&str>, pem: Option<&str>| {
            FederatedCredential::new("i".into(), "s".into(), "a".into(), jwks, pem, base)
                .unwrap_err()
        };
        assert!(rule(None, None).contains("needs the issuer's keys"));
        assert!(rule(Some("{\"keys\":[]}"), None).contains("no RSA or P-256 key"));
        assert!(rule(Some("jwks.json"), None).contains("/nonexistent/jwks.json"));
        assert!(
            rule(
                None,
                Some("-----BEGIN NOTHING-----\n-----END NOTHING-----\n")
            )
            .contains("no PEM")
        );
        assert!(
            RegisteredCertificate::parse("cert.pem", base)
                .unwrap_err()
                .contains("cert.pem")
        );
    }
}
