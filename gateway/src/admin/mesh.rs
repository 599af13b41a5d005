//! Mesh-wide documents on the admin API: `GET /mesh` (the document held, every gateway's
//! standing) and `POST /mesh/documents` (a signed document, as `causeway apply` sends it).

use causeway_overlay::core::documents::{hex, standing, Standing};
use causeway_overlay::state::documents::{Accepted, Origin};
use causeway_overlay::Mesh;
use causeway_protocol::document::SignedDocument;
use hyper::StatusCode;
use serde_json::json;

/// Largest body `POST /mesh/documents` reads.
pub const MAX_POST: usize = 2 * causeway_protocol::document::MAX_BODY_LEN;

/// `GET /mesh`: the document held and where every gateway stands with it — `applied`,
/// `refused` (with its reason) or `behind` (its latest report is about another document, or a
/// peer has reported nothing yet). `reachable` is false for a peer that has reported nothing and
/// is not up: `causeway apply` does not wait for it (it catches up when it reconnects).
pub fn mesh_json(mesh: &Mesh) -> serde_json::Value {
    let held = mesh.held_document();
    let key = held.as_ref().map(|h| h.key());
    let peers = mesh.peer_view();
    // A direct peer that is not up cannot report now, whatever it reported before.
    let reachable = |id: &causeway_protocol::Identity| {
        peers
            .iter()
            .find(|p| &p.spec.id == id)
            .is_none_or(|p| p.state == causeway_overlay::core::route_table::PeerState::Up)
    };
    let mut rows: Vec<serde_json::Value> = mesh
        .document_statuses()
        .into_iter()
        .map(|s| {
            json!({
                "identity": s.identity.to_string(),
                "zone": s.zone.to_string(),
                "gateway": s.gateway.to_string(),
                "state": standing(&s, key).as_str(),
                "version": s.version,
                "digest": hex(&s.digest),
                "reason": s.reason,
                "at_ms": s.at_ms,
                "reachable": reachable(&s.identity),
            })
        })
        .collect();
    // Peers that have reported nothing are behind.
    for p in &peers {
        if !rows.iter().any(|r| r["identity"] == p.spec.id.to_string()) {
            let up = p.state == causeway_overlay::core::route_table::PeerState::Up;
            rows.push(json!({
                "identity": p.spec.id.to_string(),
                "zone": p.zone.as_ref().or(p.spec.zone.as_ref()).map(|z| z.to_string()),
                "gateway": p.gateway.as_ref().map(|g| g.to_string()),
                "state": Standing::Behind.as_str(),
                "version": null,
                "digest": null,
                "reason": if up { "no report" } else { "no report: peer not connected" },
                "at_ms": null,
                "reachable": up,
            }));
        }
    }
    if !rows.iter().any(|r| r["identity"] == mesh.identity().to_string()) {
        rows.push(json!({
            "identity": mesh.identity().to_string(),
            "zone": mesh.zone().to_string(),
            "gateway": mesh.gateway().to_string(),
            "state": Standing::Behind.as_str(),
            "version": null, "digest": null, "reason": "no document applied", "at_ms": null, "reachable": true,
        }));
    }
    json!({
        "publishers": mesh.publishers().iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "document": held.map(|h| json!({
            "version": h.version,
            "digest": h.digest_hex(),
            "publisher": h.publisher.to_string(),
            "published_ms": h.published_ms,
        })),
        "gateways": rows,
    })
}

/// `POST /mesh/documents`: verified and, if it wins, held, applied and flooded, exactly as if a
/// peer had sent it. 200 when accepted or already held; 400 malformed or oversized; 403 a
/// signature or publisher refused; 409 older or superseded; 429 too many.
pub fn post_document(mesh: &Mesh, body: &[u8]) -> (StatusCode, serde_json::Value) {
    let doc: SignedDocument = match postcard::from_bytes(body) {
        Ok(d) => d,
        Err(e) => {
            return (
                StatusCode::BAD_REQUEST,
                json!({"result": "refused", "reason": "malformed", "detail": e.to_string()}),
            )
        }
    };
    match mesh.offer_document(doc, Origin::Local) {
        Ok(Accepted::Newer(v)) => {
            (StatusCode::OK, json!({"result": "accepted", "version": v.version, "digest": v.digest_hex()}))
        }
        Ok(Accepted::Duplicate(v)) => {
            (StatusCode::OK, json!({"result": "duplicate", "version": v.version, "digest": v.digest_hex()}))
        }
        Err(e) => {
            let code = match e.reason {
                "oversized" | "malformed" => StatusCode::BAD_REQUEST,
                "older" | "superseded" => StatusCode::CONFLICT,
                "rate" => StatusCode::TOO_MANY_REQUESTS,
                _ => StatusCode::FORBIDDEN,
            };
            (code, json!({"result": "refused", "reason": e.reason, "detail": e.detail}))
        }
    }
}
