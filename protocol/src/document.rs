//! Mesh-wide documents (`SPEC.md` §4.8): configuration an operator publishes once for every zone,
//! signed by its publisher and flooded over the control streams, and the status each gateway
//! reports back. Wire types and their bounds only; verifying the signature, choosing between
//! documents and applying one are the overlay's and the gateway's.

use serde::{Deserialize, Serialize};

use crate::identity::Identity;
use crate::names::{GatewayId, ZoneName};

/// What a publisher's signature covers: this context, then [`SignedDocument::body`] exactly.
pub const SIGNING_CONTEXT: &[u8] = b"causeway mesh document v1\0";
/// Largest document content (its YAML text).
pub const MAX_CONTENT_LEN: usize = 128 * 1024;
/// Largest signed body (content, version and time).
pub const MAX_BODY_LEN: usize = MAX_CONTENT_LEN + 64;
/// Certificates in a publisher's chain (leaf first), and the size of each.
pub const MAX_CHAIN_LEN: usize = 4;
pub const MAX_CERT_LEN: usize = 16 * 1024;
pub const MAX_SIGNATURE_LEN: usize = 1024;

/// A document as it travels: the body as signed, the publisher's chain, and the signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SignedDocument {
    /// The postcard encoding of a [`DocumentBody`].
    pub body: Vec<u8>,
    /// The publisher's X.509-SVID chain, DER, leaf first.
    pub chain: Vec<Vec<u8>>,
    /// The TLS 1.3 `SignatureScheme` code of the signature (e.g. `0x0403`, ECDSA P-256 SHA-256).
    pub scheme: u16,
    pub signature: Vec<u8>,
}

/// What a publisher signs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentBody {
    /// Newer documents have higher versions; two with the same version are ordered by digest.
    pub version: u64,
    /// When it was published, Unix milliseconds (the publisher's clock; informative).
    pub published_ms: u64,
    /// The document: YAML (README "Mesh-wide documents").
    pub content: String,
}

/// Why a document or status is refused before anything looks inside it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DocumentError {
    #[error("oversized: {0}")]
    Oversized(&'static str),
    #[error("malformed: {0}")]
    Malformed(String),
}

impl DocumentError {
    /// The `reason` label of the refusal counter.
    pub fn label(&self) -> &'static str {
        match self {
            DocumentError::Oversized(_) => "oversized",
            DocumentError::Malformed(_) => "malformed",
        }
    }
}

impl SignedDocument {
    /// Checks the bounds of every field.
    pub fn check(&self) -> Result<(), DocumentError> {
        if self.body.len() > MAX_BODY_LEN {
            return Err(DocumentError::Oversized("body"));
        }
        if self.chain.is_empty() {
            return Err(DocumentError::Malformed("no certificate".into()));
        }
        if self.chain.len() > MAX_CHAIN_LEN || self.chain.iter().any(|c| c.len() > MAX_CERT_LEN) {
            return Err(DocumentError::Oversized("certificate chain"));
        }
        if self.signature.len() > MAX_SIGNATURE_LEN {
            return Err(DocumentError::Oversized("signature"));
        }
        Ok(())
    }

    /// The signed body, decoded (no trailing bytes; content within [`MAX_CONTENT_LEN`]).
    pub fn decode_body(&self) -> Result<DocumentBody, DocumentError> {
        self.check()?;
        let (b, rest) = postcard::take_from_bytes::<DocumentBody>(&self.body)
            .map_err(|e| DocumentError::Malformed(e.to_string()))?;
        if !rest.is_empty() {
            return Err(DocumentError::Malformed(format!("{} trailing bytes in the body", rest.len())));
        }
        if b.content.len() > MAX_CONTENT_LEN {
            return Err(DocumentError::Oversized("content"));
        }
        Ok(b)
    }

    /// The bytes the signature covers.
    pub fn signed_message(body: &[u8]) -> Vec<u8> {
        [SIGNING_CONTEXT, body].concat()
    }
}

impl DocumentBody {
    pub fn encode(&self) -> Result<Vec<u8>, DocumentError> {
        if self.content.len() > MAX_CONTENT_LEN {
            return Err(DocumentError::Oversized("content"));
        }
        postcard::to_stdvec(self).map_err(|e| DocumentError::Malformed(e.to_string()))
    }
}

/// What a gateway did with a document version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DocumentState {
    /// In force at that gateway.
    Applied,
    /// Verified, but refused there (it does not validate with that gateway's own configuration);
    /// the gateway keeps what it had.
    Refused,
}

impl DocumentState {
    pub fn as_str(self) -> &'static str {
        match self {
            DocumentState::Applied => "applied",
            DocumentState::Refused => "refused",
        }
    }
}

/// A gateway's report of the document it runs, flooded like documents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentStatus {
    /// The reporting gateway.
    pub identity: Identity,
    pub zone: ZoneName,
    pub gateway: GatewayId,
    /// Increases with every report of that gateway (a newer report replaces an older one).
    pub seq: u64,
    /// The document version and SHA-256 digest of its body this report is about.
    pub version: u64,
    pub digest: [u8; 32],
    pub state: DocumentState,
    /// Why it was refused (free text, at most `MAX_REASON_LEN` bytes); empty when applied.
    pub reason: String,
    /// When, Unix milliseconds (the reporter's clock).
    pub at_ms: u64,
}
