//! Mesh-wide documents as one gateway holds them (`SPEC.md` §4.8): the newest verified document,
//! which every control stream floods to its peer, and every gateway's latest status report. A
//! document is verified here (bounds, the publisher's chain against the trust bundles, the
//! publisher list, the signature) before anything else sees it; applying it is the gateway's
//! ([`DocumentHandler`]), which reports back with [`Mesh::report_document`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use causeway_protocol::document::{DocumentState, DocumentStatus, SignedDocument};
use causeway_protocol::Identity;
use rustls::pki_types::{CertificateDer, UnixTime};
use tokio::sync::watch;

use super::Mesh;
use crate::core::documents::{self, Bucket, Held, Offered, StatusTable, Verdict, Verified};
use crate::metrics::{DOCUMENTS, DOCUMENT_STATUS_DROPPED};
use crate::ports::DocumentHandler;

/// Where a document came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A peer's control stream.
    Peer(Identity),
    /// This gateway's admin API (`causeway apply`) or its own publisher.
    Local,
    /// This gateway's persisted last-known-good copy: its chain is checked as of when it was
    /// published (it may have expired since; it was verified when it arrived).
    Persisted,
}

impl Origin {
    fn label(&self) -> &'static str {
        match self {
            Origin::Peer(_) => "peer",
            Origin::Local => "local",
            Origin::Persisted => "persisted",
        }
    }
}

/// Why a document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct DocumentRefused {
    /// The `reason` label (`oversized`, `malformed`, `certificate`, `bad_signature`,
    /// `unauthorized_publisher`, `older`, `superseded`, `rate`).
    pub reason: &'static str,
    pub detail: String,
}

/// What an offered document did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Accepted {
    /// It is held now (and being applied and flooded).
    Newer(Arc<Verified>),
    /// It was held already.
    Duplicate(Arc<Verified>),
}

pub(crate) struct Documents {
    publishers: Vec<Identity>,
    held: watch::Sender<Held>,
    statuses: Mutex<StatusTable>,
    /// Bumped at every kept report: control streams send what their peer has not seen.
    status_tick: watch::Sender<u64>,
    /// This gateway's next report number (starts at the start-up time in ms, so a restarted
    /// gateway's reports are newer than its last ones).
    seq: Mutex<u64>,
    rates: Mutex<HashMap<Identity, Bucket>>,
    /// Weak: the handler holds this mesh (a cycle would keep a stopped gateway's socket bound).
    handler: RwLock<Option<Weak<dyn DocumentHandler>>>,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

impl Documents {
    pub(crate) fn new(publishers: Vec<Identity>) -> Self {
        Self {
            publishers,
            held: watch::Sender::new(None),
            statuses: Mutex::new(StatusTable::default()),
            status_tick: watch::Sender::new(0),
            seq: Mutex::new(unix_ms()),
            rates: Mutex::new(HashMap::new()),
            handler: RwLock::new(None),
        }
    }
}

impl Mesh {
    fn docs(&self) -> &Documents {
        &self.0.documents
    }

    /// Registers what applies verified documents (the gateway, at start). The mesh keeps only a
    /// weak reference: the caller owns the handler.
    pub fn set_document_handler(&self, h: &Arc<dyn DocumentHandler>) {
        *self.docs().handler.write().unwrap_or_else(|e| e.into_inner()) = Some(Arc::downgrade(h));
    }

    /// The identities whose documents are accepted.
    pub fn publishers(&self) -> &[Identity] {
        &self.docs().publishers
    }

    /// The newest verified document.
    pub fn held_document(&self) -> Held {
        self.docs().held.borrow().clone()
    }

    pub(crate) fn watch_documents(&self) -> watch::Receiver<Held> {
        self.docs().held.subscribe()
    }

    pub(crate) fn watch_statuses(&self) -> watch::Receiver<u64> {
        self.docs().status_tick.subscribe()
    }

    /// Every gateway's latest report (this one's included).
    pub fn document_statuses(&self) -> Vec<DocumentStatus> {
        self.docs().statuses.lock().unwrap_or_else(|e| e.into_inner()).rows()
    }

    /// Verifies `doc` and, if it wins over the one held, holds it: every control stream floods it
    /// and the handler applies it. Every outcome is counted (`mesh_documents_total{result,
    /// reason}`); refusals are logged.
    pub fn offer_document(&self, doc: SignedDocument, from: Origin) -> Result<Accepted, DocumentRefused> {
        let res = self.verify_and_hold(doc, &from);
        let m = self.metrics();
        match &res {
            Ok(Accepted::Newer(v)) => {
                m.counter(DOCUMENTS, &[("result", "accepted"), ("reason", ""), ("origin", from.label())]).increment(1);
                tracing::info!(
                    target: "causeway::audit",
                    kind = "document",
                    version = v.version,
                    digest = %v.digest_hex(),
                    publisher = %v.publisher,
                    origin = from.label(),
                    "document.accepted"
                );
                // A persisted document is applied by whoever restored it, before anything else.
                let handler =
                    self.docs().handler.read().unwrap_or_else(|e| e.into_inner()).as_ref().and_then(Weak::upgrade);
                if let Some(h) = handler.filter(|_| from != Origin::Persisted) {
                    tokio::spawn(h.apply(v.clone()));
                }
            }
            Ok(Accepted::Duplicate(_)) => {
                m.counter(DOCUMENTS, &[("result", "duplicate"), ("reason", ""), ("origin", from.label())]).increment(1)
            }
            Err(e) => {
                m.counter(DOCUMENTS, &[("result", "refused"), ("reason", e.reason), ("origin", from.label())])
                    .increment(1);
                let peer = match &from {
                    Origin::Peer(p) => p.to_string(),
                    _ => String::new(),
                };
                crate::warn_limited!(reason = e.reason, detail = %e.detail, origin = from.label(), %peer, "document.refused");
            }
        }
        res
    }

    fn verify_and_hold(&self, doc: SignedDocument, from: &Origin) -> Result<Accepted, DocumentRefused> {
        let refuse = |reason: &'static str, detail: String| DocumentRefused { reason, detail };
        if let Origin::Peer(p) = from {
            let now = Instant::now();
            // One bucket per peer: only configured peers have control streams, so this is bounded.
            let mut rates = self.docs().rates.lock().unwrap_or_else(|e| e.into_inner());
            let b = rates.entry(p.clone()).or_insert_with(|| Bucket::full(documents::DOCUMENT_RATE, now));
            if !b.take(documents::DOCUMENT_RATE, now) {
                return Err(refuse(
                    "rate",
                    format!("more than {} documents a second", documents::DOCUMENT_RATE.per_second),
                ));
            }
        }
        let body = doc.decode_body().map_err(|e| refuse(e.label(), e.to_string()))?;
        let chain: Vec<CertificateDer<'_>> = doc.chain.iter().map(|c| CertificateDer::from(c.as_slice())).collect();
        let at = match from {
            Origin::Persisted => UnixTime::since_unix_epoch(Duration::from_millis(body.published_ms)),
            _ => UnixTime::now(),
        };
        let message = SignedDocument::signed_message(&doc.body);
        let publisher = self
            .tls()
            .verify_signed(&chain, at, &message, doc.scheme, &doc.signature)
            .map_err(|e| refuse(e.label(), e.to_string()))?;
        if !self.docs().publishers.contains(&publisher) {
            return Err(refuse("unauthorized_publisher", format!("{publisher} is not a listed publisher")));
        }
        let digest: [u8; 32] = ring::digest::digest(&ring::digest::SHA256, &doc.body)
            .as_ref()
            .try_into()
            .map_err(|_| refuse("malformed", "digest".into()))?;
        let v = Verified {
            version: body.version,
            digest,
            publisher,
            published_ms: body.published_ms,
            content: body.content,
            signed: doc,
        };
        let mut out = None;
        self.docs().held.send_if_modified(|held| {
            let verdict = documents::judge(held.as_ref().map(|h| h.key()), v.key());
            match verdict {
                Verdict::Newer => {
                    let v = Arc::new(v.clone());
                    *held = Some(v.clone());
                    out = Some(Ok(Accepted::Newer(v)));
                    true
                }
                Verdict::Duplicate => {
                    out = held.clone().map(|h| Ok(Accepted::Duplicate(h)));
                    false
                }
                Verdict::Older { held } => {
                    out =
                        Some(Err(refuse("older", format!("version {} is older than {held}, the one held", v.version))));
                    false
                }
                Verdict::Superseded => {
                    let detail =
                        format!("version {} {} loses to the held one of the same version", v.version, v.digest_hex());
                    out = Some(Err(refuse("superseded", detail)));
                    false
                }
            }
        });
        out.unwrap_or_else(|| Err(refuse("malformed", "no verdict".into())))
    }

    /// Records what this gateway did with a document (and floods the report).
    pub fn report_document(&self, v: &Verified, state: DocumentState, reason: &str) {
        let seq = {
            let mut s = self.docs().seq.lock().unwrap_or_else(|e| e.into_inner());
            *s = (*s + 1).max(unix_ms());
            *s
        };
        let reason: String = reason.chars().take(causeway_protocol::limits::MAX_REASON_LEN / 4).collect();
        let status = DocumentStatus {
            identity: self.identity().clone(),
            zone: self.zone().clone(),
            gateway: self.gateway().clone(),
            seq,
            version: v.version,
            digest: v.digest,
            state,
            reason,
            at_ms: unix_ms(),
        };
        self.offer_status(status);
    }

    /// Keeps a gateway's report if it is newer than the one known; returns whether it was kept.
    pub fn offer_status(&self, s: DocumentStatus) -> bool {
        let offered = self.docs().statuses.lock().unwrap_or_else(|e| e.into_inner()).offer(s);
        match offered {
            Offered::Kept => {
                self.docs().status_tick.send_modify(|t| *t += 1);
                true
            }
            Offered::Stale => false,
            Offered::Full => {
                self.metrics().counter(DOCUMENT_STATUS_DROPPED, &[]).increment(1);
                false
            }
        }
    }
}
