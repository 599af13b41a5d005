//! Mutual TLS with SPIFFE identities (X.509-SVIDs).
//!
//! A peer is accepted only if its chain verifies against the trust bundle at the current time and
//! its leaf carries exactly one URI SAN holding a SPIFFE ID that we expect: on the dialing side the ID
//! configured for that peer, on the accepting side any configured peer's ID. Every refusal happens
//! inside the handshake, is logged with its reason and counted in
//! `causeway_peer_handshake_failures_total{reason}`. Only TLS 1.3 is offered (QUIC requires it).

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use causeway_protocol::{Identity, TrustDomain};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::metrics::{Metrics, PEER_HANDSHAKE_FAILURES, TLS_LEAF_NOT_AFTER, TLS_RELOADS};

/// ALPN of the overlay: plain HTTP/3.
pub const ALPN: &[u8] = b"h3";
/// SNI sent when dialing a peer. Peers are authenticated by SPIFFE ID, not by name.
pub const SERVER_NAME: &str = "gateway.causeway.invalid";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("trust bundle holds no usable CA certificate")]
    EmptyBundle,
    #[error("CA certificate {index} is not usable as a trust anchor: {reason}")]
    BadAnchor { index: usize, reason: String },
    #[error("own certificate: {0}")]
    OwnCertificate(String),
    #[error("rustls: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Why a peer's certificate was refused. The label of `causeway_peer_handshake_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    UnknownCa,
    Expired,
    NotYetValid,
    BadCertificate,
    NoSpiffeId,
    MultipleUriSans,
    InvalidSpiffeId,
    KeyUsage,
    CaAsLeaf,
    UnexpectedIdentity,
    NoCertificate,
    /// The leaf names a trust domain we hold no bundle for.
    UnknownTrustDomain,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::UnknownCa => "unknown_ca",
            Refusal::Expired => "expired",
            Refusal::NotYetValid => "not_yet_valid",
            Refusal::BadCertificate => "bad_certificate",
            Refusal::NoSpiffeId => "no_spiffe_id",
            Refusal::MultipleUriSans => "multiple_uri_sans",
            Refusal::InvalidSpiffeId => "invalid_spiffe_id",
            Refusal::KeyUsage => "key_usage",
            Refusal::CaAsLeaf => "ca_as_leaf",
            Refusal::UnexpectedIdentity => "unexpected_identity",
            Refusal::NoCertificate => "no_certificate",
            Refusal::UnknownTrustDomain => "unknown_trust_domain",
        }
    }

    fn to_rustls(self) -> rustls::Error {
        let e = match self {
            Refusal::UnknownCa | Refusal::UnknownTrustDomain => CertificateError::UnknownIssuer,
            Refusal::Expired => CertificateError::Expired,
            Refusal::NotYetValid => CertificateError::NotValidYet,
            Refusal::UnexpectedIdentity
            | Refusal::NoSpiffeId
            | Refusal::MultipleUriSans
            | Refusal::InvalidSpiffeId
            | Refusal::KeyUsage => CertificateError::ApplicationVerificationFailure,
            Refusal::BadCertificate | Refusal::CaAsLeaf | Refusal::NoCertificate => CertificateError::BadEncoding,
        };
        rustls::Error::InvalidCertificate(e)
    }
}

/// This gateway's certificate chain and key.
pub struct Credentials {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Credentials {
    fn clone(&self) -> Self {
        Self { chain: self.chain.clone(), key: self.key.clone_key() }
    }
}

impl Credentials {
    /// The SPIFFE ID of our own leaf.
    pub fn identity(&self) -> Result<Identity, TlsError> {
        let leaf = self.chain.first().ok_or_else(|| TlsError::OwnCertificate("empty chain".into()))?;
        spiffe_id(leaf).map_err(|r| TlsError::OwnCertificate(format!("leaf refused: {}", r.as_str())))
    }
}

/// CA certificates trusted for peers: those of our own trust domain, and those of each federated
/// trust domain. A chain is verified only against the bundle of the trust domain its leaf names,
/// so a federated CA cannot mint identities of our trust domain or of another federated one
/// (SPIFFE federation: one bundle per trust domain).
#[derive(Debug, Clone)]
pub struct TrustBundle {
    anchors: Vec<TrustAnchor<'static>>,
    federated: Vec<(TrustDomain, Vec<TrustAnchor<'static>>)>,
}

fn anchors(cas: &[CertificateDer<'_>]) -> Result<Vec<TrustAnchor<'static>>, TlsError> {
    let anchors = cas
        .iter()
        .enumerate()
        .map(|(index, der)| {
            webpki::anchor_from_trusted_cert(der)
                .map(|a| a.to_owned())
                .map_err(|e| TlsError::BadAnchor { index, reason: e.to_string() })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if anchors.is_empty() {
        return Err(TlsError::EmptyBundle);
    }
    Ok(anchors)
}

impl TrustBundle {
    /// The bundle of our own trust domain.
    pub fn new(cas: &[CertificateDer<'_>]) -> Result<Self, TlsError> {
        Ok(Self { anchors: anchors(cas)?, federated: Vec::new() })
    }

    /// Adds (or replaces) the bundle of a federated trust domain.
    pub fn federate(mut self, td: TrustDomain, cas: &[CertificateDer<'_>]) -> Result<Self, TlsError> {
        let a = anchors(cas)?;
        self.federated.retain(|(t, _)| *t != td);
        self.federated.push((td, a));
        Ok(self)
    }

    /// The anchors that may vouch for an identity in `td`, given our own trust domain (`None`: not
    /// known, as for test clients without a valid identity; our bundle then covers every trust
    /// domain not federated).
    fn anchors_for(&self, td: &TrustDomain, own: Option<&TrustDomain>) -> Option<&[TrustAnchor<'static>]> {
        if let Some((_, a)) = self.federated.iter().find(|(t, _)| t == td) {
            return Some(a);
        }
        own.is_none_or(|o| o == td).then_some(self.anchors.as_slice())
    }
}

/// Identities allowed to connect to this gateway: configured peers exactly, redirectors and
/// HTTP/3 clients by prefix.
#[derive(Debug, Default, Clone)]
pub struct AllowedSet {
    pub peers: HashSet<Identity>,
    /// SPIFFE ID prefixes of redirectors (node agents), e.g. `spiffe://td/zone/eu/node/`.
    pub redirector_prefixes: Vec<String>,
    /// SPIFFE ID prefixes of workloads that send HTTP/3 requests straight to this gateway.
    pub client_prefixes: Vec<String>,
}

impl AllowedSet {
    pub fn allows(&self, id: &Identity) -> bool {
        self.peers.contains(id) || self.is_redirector(id) || self.is_client(id)
    }

    pub fn is_client(&self, id: &Identity) -> bool {
        self.client_prefixes.iter().any(|p| id.as_str().starts_with(p.as_str()))
    }

    pub fn is_redirector(&self, id: &Identity) -> bool {
        self.redirector_prefixes.iter().any(|p| id.as_str().starts_with(p.as_str()))
    }
}

/// Shared so configuration reloads can change it.
pub type Allowed = Arc<RwLock<AllowedSet>>;

/// Extracts the SPIFFE ID of a leaf, applying the X.509-SVID rules (SPIFFE X509-SVID §4, §5):
/// not a CA; a key usage extension with digitalSignature and without keyCertSign or cRLSign;
/// exactly one URI SAN, which is a valid SPIFFE ID (`Identity::parse`).
pub fn spiffe_id(der: &CertificateDer<'_>) -> Result<Identity, Refusal> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| Refusal::BadCertificate)?;
    if cert.basic_constraints().map_err(|_| Refusal::BadCertificate)?.is_some_and(|bc| bc.value.ca) {
        return Err(Refusal::CaAsLeaf);
    }
    match cert.key_usage().map_err(|_| Refusal::BadCertificate)? {
        Some(ku) if ku.value.digital_signature() && !ku.value.key_cert_sign() && !ku.value.crl_sign() => {}
        _ => return Err(Refusal::KeyUsage),
    }
    let san = cert.subject_alternative_name().map_err(|_| Refusal::BadCertificate)?;
    let mut uris = san.iter().flat_map(|s| s.value.general_names.iter()).filter_map(|n| match n {
        GeneralName::URI(u) => Some(*u),
        _ => None,
    });
    match (uris.next(), uris.next()) {
        (Some(u), None) => Identity::parse(u).map_err(|_| Refusal::InvalidSpiffeId),
        (Some(_), Some(_)) => Err(Refusal::MultipleUriSans),
        (None, _) => Err(Refusal::NoSpiffeId),
    }
}

/// Chain and identity checks shared by both directions.
#[derive(Debug)]
struct Checker {
    current: Arc<Current>,
    own_domain: Option<TrustDomain>,
    algs: WebPkiSupportedAlgorithms,
    metrics: Metrics,
}

impl Checker {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        client: bool,
        expected: impl Fn(&Identity) -> bool,
    ) -> Result<Identity, rustls::Error> {
        self.check(end_entity, intermediates, now, client, expected).map_err(|r| {
            self.metrics.counter(PEER_HANDSHAKE_FAILURES, &[("reason", r.as_str())]).increment(1);
            let id = spiffe_id(end_entity).map(|i| i.to_string()).unwrap_or_default();
            crate::warn_limited!(reason = r.as_str(), peer_id = %id, side = if client { "accept" } else { "dial" }, "peer.handshake.refused");
            r.to_rustls()
        })
    }

    fn check(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        client: bool,
        expected: impl Fn(&Identity) -> bool,
    ) -> Result<Identity, Refusal> {
        let cert = webpki::EndEntityCert::try_from(end_entity).map_err(|_| Refusal::BadCertificate)?;
        let usage = if client { webpki::KeyUsage::client_auth() } else { webpki::KeyUsage::server_auth() };
        // The leaf's trust domain picks the only bundle that may vouch for it.
        let id = spiffe_id(end_entity)?;
        let bundle = self.current.bundle();
        let anchors =
            bundle.anchors_for(&id.trust_domain(), self.own_domain.as_ref()).ok_or(Refusal::UnknownTrustDomain)?;
        cert.verify_for_usage(self.algs.all, anchors, intermediates, now, usage, None, None).map_err(|e| {
            tracing::debug!(error = ?e, "peer.certificate.invalid");
            match e {
                // A CA with the same name as ours but another key shows up as a bad signature on
                // the chain: either way, no CA we trust issued it.
                webpki::Error::UnknownIssuer | webpki::Error::InvalidSignatureForPublicKey => Refusal::UnknownCa,
                webpki::Error::CertExpired { .. } => Refusal::Expired,
                webpki::Error::CertNotValidYet { .. } => Refusal::NotYetValid,
                webpki::Error::CaUsedAsEndEntity => Refusal::CaAsLeaf,
                _ => Refusal::BadCertificate,
            }
        })?;
        if !expected(&id) {
            return Err(Refusal::UnexpectedIdentity);
        }
        Ok(id)
    }
}

/// Verifies the gateway we dialed: its ID must be exactly the one configured for that peer.
#[derive(Debug)]
struct DialVerifier {
    checker: Checker,
    expected: Identity,
}

impl ServerCertVerifier for DialVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.checker.verify(end_entity, intermediates, now, false, |id| *id == self.expected)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.checker.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.checker.algs.supported_schemes()
    }
}

/// Verifies a gateway (or, later, a redirector) that dialed us: its ID must be an allowed one.
#[derive(Debug)]
struct AcceptVerifier {
    checker: Checker,
    allowed: Allowed,
}

impl ClientCertVerifier for AcceptVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.checker.verify(end_entity, intermediates, now, true, |id| {
            self.allowed.read().map(|a| a.allows(id)).unwrap_or(false)
        })?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.checker.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.checker.algs.supported_schemes()
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The certificate and trust bundle in use. Both can be replaced while running (rotation): every
/// handshake after the swap uses the new ones; established connections are unaffected.
#[derive(Debug)]
struct Current {
    key: RwLock<Arc<CertifiedKey>>,
    bundle: RwLock<Arc<TrustBundle>>,
}

impl Current {
    fn key(&self) -> Arc<CertifiedKey> {
        self.key.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
    fn bundle(&self) -> Arc<TrustBundle> {
        self.bundle.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// Presents the current certificate, on both sides of a handshake.
#[derive(Debug)]
struct Presenter(Arc<Current>);

impl rustls::server::ResolvesServerCert for Presenter {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.key())
    }
}

impl rustls::client::ResolvesClientCert for Presenter {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(self.0.key())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// Builds TLS configurations for one gateway, over a certificate and bundle that [`TlsFactory::update`]
/// may replace.
#[derive(Clone)]
pub struct TlsFactory {
    current: Arc<Current>,
    identity: Option<Identity>,
    metrics: Metrics,
}

impl TlsFactory {
    /// Fails only on a key that does not load. The leaf's SPIFFE ID is checked by whoever uses it
    /// (a gateway refuses to start without a valid one; test clients present invalid ones on purpose).
    pub fn new(creds: Credentials, bundle: TrustBundle, metrics: Metrics) -> Result<Self, TlsError> {
        let identity = creds.identity().ok();
        let key = Arc::new(certified(creds)?);
        let current = Arc::new(Current { key: RwLock::new(key), bundle: RwLock::new(Arc::new(bundle)) });
        let this = Self { current, identity, metrics };
        this.record_leaf();
        Ok(this)
    }

    /// Replaces the certificate and bundle for every later handshake; returns whether the leaf
    /// changed. Refused, with the old ones kept, when the new certificate names another identity,
    /// its key does not match it, or the new bundle does not hold the CA that issued it: peers
    /// verifying us by that bundle would refuse us (a root rotation must go A → A+B, then leaves
    /// from B, then B). Counted in `tls_reloads_total{result}`.
    pub fn update(&self, creds: Credentials, bundle: TrustBundle) -> Result<bool, TlsError> {
        let before = self.leaf();
        match self.swap(creds, bundle) {
            Ok(()) => {
                self.metrics.counter(TLS_RELOADS, &[("result", "ok")]).increment(1);
                self.record_leaf();
                Ok(self.leaf() != before)
            }
            Err(e) => {
                self.count_refused();
                Err(e)
            }
        }
    }

    /// Counts an update refused before it reached [`TlsFactory::update`] (unreadable or
    /// unparsable files).
    pub fn count_refused(&self) {
        self.metrics.counter(TLS_RELOADS, &[("result", "refused")]).increment(1);
    }

    /// Publishes the expiry of the leaf in use (`tls_leaf_not_after_seconds`).
    fn record_leaf(&self) {
        if let Some(t) = not_after(&self.leaf()) {
            self.metrics.gauge(TLS_LEAF_NOT_AFTER, &[]).set(t as f64);
        }
    }

    fn swap(&self, creds: Credentials, bundle: TrustBundle) -> Result<(), TlsError> {
        let id = creds.identity()?;
        if self.identity.as_ref() != Some(&id) {
            let was = self.identity.as_ref().map(|i| i.to_string()).unwrap_or_else(|| "none".into());
            return Err(TlsError::OwnCertificate(format!("identity changed from {was} to {id}")));
        }
        let key = certified(creds)?;
        let leaf = key.cert.first().ok_or_else(|| TlsError::OwnCertificate("empty chain".into()))?;
        let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| TlsError::OwnCertificate(e.to_string()))?;
        let algs = provider().signature_verification_algorithms;
        let now = UnixTime::now();
        ee.verify_for_usage(
            algs.all,
            &bundle.anchors,
            &key.cert[1..],
            now,
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .map_err(|e| TlsError::OwnCertificate(format!("not valid under the new trust bundle: {e}")))?;
        *self.current.key.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(key);
        *self.current.bundle.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(bundle);
        Ok(())
    }

    /// Our leaf certificate as presented now.
    pub fn leaf(&self) -> CertificateDer<'static> {
        self.current.key().cert.first().cloned().unwrap_or_else(|| CertificateDer::from(Vec::new()))
    }

    fn checker(&self) -> Checker {
        Checker {
            current: self.current.clone(),
            own_domain: self.identity.as_ref().map(Identity::trust_domain),
            algs: provider().signature_verification_algorithms,
            metrics: self.metrics.clone(),
        }
    }

    pub fn server(&self, allowed: Allowed) -> Result<rustls::ServerConfig, TlsError> {
        let verifier = Arc::new(AcceptVerifier { checker: self.checker(), allowed });
        let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_cert_resolver(Arc::new(Presenter(self.current.clone())));
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }

    /// A client configuration that accepts only `expected` as the server.
    pub fn client(&self, expected: Identity) -> Result<rustls::ClientConfig, TlsError> {
        let verifier = Arc::new(DialVerifier { checker: self.checker(), expected });
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_cert_resolver(Arc::new(Presenter(self.current.clone())));
        cfg.alpn_protocols = vec![ALPN.to_vec()];
        Ok(cfg)
    }
}

fn certified(creds: Credentials) -> Result<CertifiedKey, TlsError> {
    Ok(CertifiedKey::from_der(creds.chain, creds.key, &provider())?)
}

/// A certificate's notAfter as Unix seconds.
pub fn not_after(der: &CertificateDer<'_>) -> Option<i64> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(cert.validity().not_after.timestamp())
}

/// The leaf certificate a connection's peer presented.
pub fn peer_leaf(conn: &quinn::Connection) -> Option<CertificateDer<'static>> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    chain.first().cloned()
}

/// The SPIFFE ID a connection's peer presented (already verified during the handshake).
pub fn peer_identity(conn: &quinn::Connection) -> Option<Identity> {
    let any = conn.peer_identity()?;
    let chain = any.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    spiffe_id(chain.first()?).ok()
}

/// The URI SAN of any certificate, CA or not (used to read a CA's trust domain).
pub fn spiffe_id_any(der: &CertificateDer<'_>) -> Result<Identity, Refusal> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| Refusal::BadCertificate)?;
    let san = cert.subject_alternative_name().map_err(|_| Refusal::BadCertificate)?.ok_or(Refusal::NoSpiffeId)?;
    san.value
        .general_names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(u) => Identity::parse(u).ok(),
            _ => None,
        })
        .ok_or(Refusal::NoSpiffeId)
}

/// Signature schemes a document may be signed with, in order of preference.
const DOCUMENT_SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
];

/// Why a mesh-wide document's signature was refused (the `reason` label of its refusal).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureRefusal {
    /// The publisher's chain does not verify (with the certificate refusal's label).
    #[error("publisher certificate refused: {}", .0.as_str())]
    Certificate(Refusal),
    #[error("signature scheme {0:#06x} is not accepted")]
    Scheme(u16),
    #[error("signature does not verify")]
    BadSignature,
}

impl SignatureRefusal {
    pub fn label(&self) -> &'static str {
        match self {
            SignatureRefusal::Certificate(_) => "certificate",
            SignatureRefusal::Scheme(_) | SignatureRefusal::BadSignature => "bad_signature",
        }
    }
}

/// Signs `message` with `key` (the publisher's private key): the scheme and the signature.
pub fn sign(key: &PrivateKeyDer<'_>, message: &[u8]) -> Result<(SignatureScheme, Vec<u8>), TlsError> {
    let key = provider().key_provider.load_private_key(key.clone_key())?;
    signer_sign(key.as_ref(), message)
}

fn signer_sign(key: &dyn rustls::sign::SigningKey, message: &[u8]) -> Result<(SignatureScheme, Vec<u8>), TlsError> {
    let signer = key
        .choose_scheme(DOCUMENT_SCHEMES)
        .ok_or_else(|| TlsError::OwnCertificate("the key's type cannot sign documents".into()))?;
    let sig = signer.sign(message)?;
    Ok((signer.scheme(), sig))
}

impl TlsFactory {
    /// Signs `message` with this gateway's own key: (chain, scheme, signature).
    pub fn sign(&self, message: &[u8]) -> Result<(Vec<CertificateDer<'static>>, SignatureScheme, Vec<u8>), TlsError> {
        let key = self.current.key();
        let (scheme, sig) = signer_sign(key.key.as_ref(), message)?;
        Ok((key.cert.clone(), scheme, sig))
    }

    /// Verifies a signature over `message` by the leaf of `chain`, whose chain must verify
    /// against the trust bundle at `at` (X.509-SVID rules, client usage): the signer's SPIFFE ID.
    /// Refusals are not counted as handshake failures.
    pub fn verify_signed(
        &self,
        chain: &[CertificateDer<'_>],
        at: UnixTime,
        message: &[u8],
        scheme: u16,
        signature: &[u8],
    ) -> Result<Identity, SignatureRefusal> {
        let checker = self.checker();
        let (leaf, intermediates) = chain.split_first().ok_or(SignatureRefusal::Certificate(Refusal::NoCertificate))?;
        let id = checker.check(leaf, intermediates, at, true, |_| true).map_err(SignatureRefusal::Certificate)?;
        let scheme = SignatureScheme::from(scheme);
        if !DOCUMENT_SCHEMES.contains(&scheme) {
            return Err(SignatureRefusal::Scheme(u16::from(scheme)));
        }
        let algs = checker.algs.mapping.iter().find(|(s, _)| *s == scheme).map(|(_, a)| *a).unwrap_or(&[]);
        let ee = webpki::EndEntityCert::try_from(leaf)
            .map_err(|_| SignatureRefusal::Certificate(Refusal::BadCertificate))?;
        if algs.iter().any(|alg| ee.verify_signature(*alg, message, signature).is_ok()) {
            Ok(id)
        } else {
            Err(SignatureRefusal::BadSignature)
        }
    }
}
