//! The publishing side of mesh-wide documents (`causeway apply`, `causeway status --mesh`): sign a
//! document with the operator's own SPIFFE certificate and key, hand it to any gateway's admin
//! API, and follow it until every gateway has reported.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use causeway_overlay::Credentials;
use causeway_protocol::document::{DocumentBody, SignedDocument, MAX_CONTENT_LEN};

/// Signs `content` as document `version` with the publisher's credentials.
pub fn sign(creds: &Credentials, version: u64, content: &str) -> anyhow::Result<SignedDocument> {
    sign_with(version, content, |msg| {
        let (scheme, sig) = causeway_overlay::transport::tls::sign(&creds.key, msg)?;
        Ok((creds.chain.clone(), scheme, sig))
    })
}

type Signature = (Vec<rustls::pki_types::CertificateDer<'static>>, rustls::SignatureScheme, Vec<u8>);

/// Signs `content` as document `version` with `signer` (the message in, the chain, scheme and
/// signature out).
pub fn sign_with(
    version: u64,
    content: &str,
    signer: impl FnOnce(&[u8]) -> Result<Signature, causeway_overlay::transport::tls::TlsError>,
) -> anyhow::Result<SignedDocument> {
    anyhow::ensure!(
        content.len() <= MAX_CONTENT_LEN,
        "the document is {} bytes, over the {MAX_CONTENT_LEN}-byte limit",
        content.len()
    );
    let published_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let body = DocumentBody { version, published_ms, content: content.to_string() }.encode()?;
    let (chain, scheme, signature) = signer(&SignedDocument::signed_message(&body))?;
    Ok(SignedDocument { body, chain: chain.iter().map(|c| c.to_vec()).collect(), scheme: u16::from(scheme), signature })
}

/// `GET /mesh` of a gateway.
pub async fn mesh_view(admin: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let (code, body) = crate::admin::get(admin, "/mesh").await?;
    anyhow::ensure!(code == 200, "{admin} answered {code} for /mesh: {}", body.trim());
    serde_json::from_str(&body).context("/mesh")
}

/// The version `causeway apply` publishes by default: one more than the gateway holds.
pub fn next_version(view: &serde_json::Value) -> u64 {
    view["document"]["version"].as_u64().unwrap_or(0) + 1
}

/// `POST /mesh/documents`: the status code and the gateway's answer.
pub async fn post(admin: SocketAddr, doc: &SignedDocument) -> anyhow::Result<(u16, serde_json::Value)> {
    let body = Bytes::from(postcard::to_stdvec(doc)?);
    let (code, text) = crate::admin::request(admin, hyper::Method::POST, "/mesh/documents", body).await?;
    let v = serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({ "detail": text }));
    Ok((code, v))
}

/// How a published document ended up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Every gateway reported it applied.
    Applied,
    /// Every gateway reported; some refused it.
    Refused,
    /// Another document won (a concurrent publish with the same version and a higher digest, or
    /// a newer one): this one is superseded.
    Superseded { by: u64 },
    /// Not every gateway reported in time.
    Pending,
}

/// Polls `GET /mesh` until every reachable gateway listed there reports on document (`version`,
/// `digest`), another document is held instead, or `wait` passes. Returns the outcome and the
/// last view (unreachable peers are in it, `behind`).
pub async fn follow(
    admin: SocketAddr,
    version: u64,
    digest: &str,
    wait: Duration,
) -> anyhow::Result<(Outcome, serde_json::Value)> {
    let deadline = Instant::now() + wait;
    loop {
        let view = mesh_view(admin).await?;
        let held = &view["document"];
        if held["digest"].as_str() != Some(digest) && held["version"].as_u64().is_some_and(|v| v >= version) {
            return Ok((Outcome::Superseded { by: held["version"].as_u64().unwrap_or(0) }, view));
        }
        let rows = view["gateways"].as_array().cloned().unwrap_or_default();
        let ours = |r: &serde_json::Value| r["digest"].as_str() == Some(digest);
        let reachable = |r: &serde_json::Value| r["reachable"].as_bool() != Some(false);
        let done = held["digest"].as_str() == Some(digest)
            && rows
                .iter()
                .filter(|r| reachable(r))
                .all(|r| ours(r) && matches!(r["state"].as_str(), Some("applied" | "refused")));
        if done {
            let refused = rows.iter().any(|r| r["state"] == "refused");
            return Ok((if refused { Outcome::Refused } else { Outcome::Applied }, view));
        }
        if Instant::now() >= deadline {
            return Ok((Outcome::Pending, view));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `causeway status --mesh`: the document held and every gateway's standing, as a table.
pub fn render(view: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let d = &view["document"];
    if d.is_null() {
        out.push_str("document: none\n");
    } else {
        let _ = writeln!(
            out,
            "document: version {} digest {} publisher {}",
            d["version"],
            d["digest"].as_str().map(|s| &s[..s.len().min(16)]).unwrap_or(""),
            d["publisher"].as_str().unwrap_or("")
        );
    }
    let _ = writeln!(out, "{:<12} {:<14} {:<9} {:>7}  {:<10} REASON", "ZONE", "GATEWAY", "STATE", "VERSION", "AT");
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    let mut rows = view["gateways"].as_array().cloned().unwrap_or_default();
    rows.sort_by_key(|r| {
        (r["zone"].as_str().unwrap_or("").to_string(), r["gateway"].as_str().unwrap_or("").to_string())
    });
    for r in rows {
        let at = r["at_ms"].as_u64().map(|t| format!("{:.1}s ago", now.saturating_sub(t) as f64 / 1000.0));
        let _ = writeln!(
            out,
            "{:<12} {:<14} {:<9} {:>7}  {:<10} {}",
            r["zone"].as_str().unwrap_or("-"),
            r["gateway"].as_str().unwrap_or("-"),
            r["state"].as_str().unwrap_or("-"),
            r["version"].as_u64().map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
            at.unwrap_or_else(|| "-".into()),
            r["reason"].as_str().unwrap_or("")
        );
    }
    out
}
