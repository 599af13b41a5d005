//! `causeway certs`: a throwaway or small-scale CA for SPIFFE X.509-SVIDs, and loading PEM files.
//!
//! `init` makes a self-signed ECDSA P-256 CA for one trust domain; `issue` makes a leaf whose only
//! subject alternative name is the SPIFFE ID (URI SAN), usable for both TLS client and server auth,
//! as a gateway is both. Production meshes will usually take SVIDs from SPIRE or cert-manager: the
//! gateway only needs PEM files.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context};
use causeway_overlay::{Credentials, TrustBundle};
use causeway_protocol::{Identity, TrustDomain};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use time::OffsetDateTime;

pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";
pub const CERT: &str = "cert.pem";
pub const KEY: &str = "key.pem";

/// A CA in memory.
pub struct Ca {
    pub cert_pem: String,
    pub key_pem: String,
    pub trust_domain: TrustDomain,
}

/// A leaf in memory.
pub struct Leaf {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Validity of an issued certificate, relative to now.
#[derive(Debug, Clone, Copy)]
pub struct Validity {
    /// Start, relative to now (negative: in the past).
    pub not_before_secs: i64,
    pub not_after_secs: i64,
}

impl Validity {
    pub fn for_duration(d: Duration) -> Self {
        // Backdated a minute to tolerate clock skew between zones.
        Self { not_before_secs: -60, not_after_secs: d.as_secs() as i64 }
    }
}

fn at(offset: i64) -> OffsetDateTime {
    OffsetDateTime::now_utc() + time::Duration::seconds(offset)
}

pub fn new_ca(td: &TrustDomain, validity: Validity) -> anyhow::Result<Ca> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("Causeway CA {td}"));
    dn.push(DnType::OrganizationName, "Causeway");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    p.not_before = at(validity.not_before_secs);
    p.not_after = at(validity.not_after_secs);
    // The URI SAN tells which trust domain this root serves (SPIFFE bundle convention).
    p.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into()?)];
    let cert = p.self_signed(&key)?;
    Ok(Ca { cert_pem: cert.pem(), key_pem: key.serialize_pem(), trust_domain: td.clone() })
}

pub fn issue(ca: &Ca, id: &Identity, validity: Validity) -> anyhow::Result<Leaf> {
    if id.trust_domain() != ca.trust_domain {
        bail!("{id} is not in the CA's trust domain {}", ca.trust_domain);
    }
    let ca_key = KeyPair::from_pem(&ca.key_pem).context("CA key")?;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, ca_key).context("CA certificate")?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = vec![SanType::URI(id.as_str().try_into()?)];
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = at(validity.not_before_secs);
    p.not_after = at(validity.not_after_secs);
    p.use_authority_key_identifier_extension = true;
    let cert = p.signed_by(&key, &issuer)?;
    Ok(Leaf { cert_pem: cert.pem(), key_pem: key.serialize_pem() })
}

/// Writes `contents` to `path`. A private key is created with mode 0600, so it is never readable
/// by others, not even between its creation and a later chmod; an existing file is narrowed to
/// 0600 before it is overwritten.
fn write(path: &Path, contents: &str, private: bool) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let ctx = || format!("writing {}", path.display());
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    if private {
        opts.mode(0o600);
        if path.exists() {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).with_context(ctx)?;
        }
    }
    let mut f = opts.open(path).with_context(ctx)?;
    f.write_all(contents.as_bytes()).with_context(ctx)?;
    Ok(())
}

/// `causeway certs init`: writes `ca.crt` and `ca.key` into `out`.
pub fn init_dir(td: &TrustDomain, out: &Path, validity: Duration) -> anyhow::Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let ca = new_ca(td, Validity::for_duration(validity))?;
    write(&out.join(CA_CERT), &ca.cert_pem, false)?;
    write(&out.join(CA_KEY), &ca.key_pem, true)?;
    Ok(())
}

pub fn load_ca_dir(dir: &Path) -> anyhow::Result<Ca> {
    let cert_pem = std::fs::read_to_string(dir.join(CA_CERT))
        .with_context(|| format!("reading {}", dir.join(CA_CERT).display()))?;
    let key_pem =
        std::fs::read_to_string(dir.join(CA_KEY)).with_context(|| format!("reading {}", dir.join(CA_KEY).display()))?;
    let der = CertificateDer::from_pem_slice(cert_pem.as_bytes()).context("CA certificate PEM")?;
    let id = causeway_overlay::transport::tls::spiffe_id_any(&der)
        .map_err(|r| anyhow::anyhow!("the CA certificate names no spiffe:// trust domain ({})", r.as_str()))?;
    Ok(Ca { cert_pem, key_pem, trust_domain: id.trust_domain() })
}

/// `causeway certs issue`: writes `cert.pem` (leaf then CA) and `key.pem` into `out`, and a copy of
/// the CA certificate as `ca.crt` (the trust bundle).
pub fn issue_dir(ca_dir: &Path, id: &Identity, out: &Path, validity: Duration) -> anyhow::Result<()> {
    let ca = load_ca_dir(ca_dir)?;
    let leaf = issue(&ca, id, Validity::for_duration(validity))?;
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    write(&out.join(CERT), &format!("{}{}", leaf.cert_pem, ca.cert_pem), false)?;
    write(&out.join(KEY), &leaf.key_pem, true)?;
    write(&out.join(CA_CERT), &ca.cert_pem, false)?;
    Ok(())
}

/// Parses PEM credentials (chain, leaf first, and a PKCS#8/SEC1 key).
pub fn credentials_from_pem(cert_pem: &[u8], key_pem: &[u8]) -> anyhow::Result<Credentials> {
    let chain = CertificateDer::pem_slice_iter(cert_pem).collect::<Result<Vec<_>, _>>().context("certificate PEM")?;
    if chain.is_empty() {
        bail!("no certificate in PEM");
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).context("private key PEM")?;
    Ok(Credentials { chain, key })
}

pub fn bundle_from_pem(pem: &[u8]) -> anyhow::Result<TrustBundle> {
    let cas = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().context("bundle PEM")?;
    Ok(TrustBundle::new(&cas)?)
}

/// Adds a federated trust domain's bundle (PEM) to `bundle`.
pub fn federate_pem(bundle: TrustBundle, td: TrustDomain, pem: &[u8]) -> anyhow::Result<TrustBundle> {
    let cas = CertificateDer::pem_slice_iter(pem).collect::<Result<Vec<_>, _>>().context("bundle PEM")?;
    Ok(bundle.federate(td, &cas)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_created_private_and_stay_private_when_rewritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("causeway-certs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let td = TrustDomain::new("t.example").expect("td");
        init_dir(&td, &dir, Duration::from_secs(3600)).expect("init");
        let mode = |f: &str| std::fs::metadata(dir.join(f)).expect("file").permissions().mode() & 0o777;
        assert_eq!(mode(CA_KEY), 0o600);
        assert_ne!(mode(CA_CERT) & 0o044, 0, "the certificate stays readable");
        // An existing key file with a wide mode is narrowed before the new key is written into it.
        std::fs::set_permissions(dir.join(CA_KEY), std::fs::Permissions::from_mode(0o644)).expect("chmod");
        init_dir(&td, &dir, Duration::from_secs(3600)).expect("init again");
        assert_eq!(mode(CA_KEY), 0o600);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
