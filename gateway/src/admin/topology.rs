//! The mesh as this gateway sees it, for people: `/topology.json` (zones, the peer connections
//! with their path and flows, each service with where it is served and where new traffic goes) and
//! `/topology`, a page that draws it and refreshes every second — one HTML file with its script
//! and style inline, no external assets (it works in an air-gapped cluster). `causeway status`
//! prints the same view.
//!
//! It is this gateway's view: its own zone and its peers, the edges being its connections. Edges
//! between two peers are theirs to show (each gateway has the page).

use serde_json::{json, Value};

use causeway_overlay::Mesh;

/// The page (`/topology`).
pub const PAGE: &str = include_str!("topology.html");

/// `/topology.json`.
pub fn json(mesh: &Mesh) -> Value {
    let peers = super::peers_json(mesh);
    let services = super::services_json(mesh);
    let here = mesh.zone().to_string();
    let mut zones = vec![json!({ "zone": here, "gateway": mesh.gateway().to_string(), "local": true })];
    let mut edges = Vec::new();
    for p in peers["peers"].as_array().into_iter().flatten() {
        let zone = p["zone"].as_str().unwrap_or("").to_string();
        if !zones.iter().any(|z| z["zone"] == zone.as_str()) {
            zones.push(json!({ "zone": zone, "gateway": p["gateway"], "local": false }));
        }
        let path = &p["path"];
        edges.push(json!({
            "from": here,
            "to": zone,
            "peer": p["id"],
            "gateway": p["gateway"],
            "state": p["state"],
            "rtt_ms": p["rtt_ms"],
            "loss_ratio": path["loss_ratio"],
            "cwnd_bytes": path["cwnd_bytes"],
            "open_flows": p["open_flows"],
            "flows_total": p["flows_total"],
            "sent_bytes": path["sent_bytes"],
            "received_bytes": path["received_bytes"],
        }));
    }
    let services: Vec<Value> = services["services"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|s| {
            let offers = s["offers"].as_array().cloned().unwrap_or_default();
            let served: Vec<Value> = offers
                .iter()
                .map(|o| {
                    json!({
                        "zone": o["zone"],
                        "state": o["state"],
                        "healthy_endpoints": o["healthy_endpoints"],
                        "local": o["local"],
                    })
                })
                .collect();
            // Where new traffic goes: the zones of the route order, best first.
            let zone_of = |t: &str| {
                if t == "local" {
                    return Some(here.clone());
                }
                offers.iter().find(|o| o["peer"] == t).and_then(|o| o["zone"].as_str()).map(str::to_string)
            };
            let route: Vec<String> = s["route_order"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str())
                .filter_map(zone_of)
                .collect();
            json!({
                "name": s["name"],
                "protocol": offers.first().map(|o| o["protocol"].clone()).unwrap_or(Value::Null),
                "served_in": served,
                "route": route,
                // Known, but nowhere to send a new flow: what the page and `status` flag.
                "unavailable": route.is_empty(),
            })
        })
        .collect();
    json!({
        "zone": here,
        "gateway": mesh.gateway().to_string(),
        "identity": mesh.identity().to_string(),
        "zones": zones,
        "edges": edges,
        "services": services,
    })
}

/// The terminal view of [`json`] (`causeway status`): the edges, then the services.
pub fn render_text(t: &Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "gateway {} in zone {} ({})", t["gateway"], t["zone"], t["identity"]);
    let _ = writeln!(
        out,
        "\n{:<14} {:<48} {:<9} {:>8} {:>7} {:>6} {:>9}",
        "ZONE", "PEER", "STATE", "RTT ms", "LOSS %", "FLOWS", "TOTAL"
    );
    let num = |v: &Value, digits: usize, scale: f64| {
        v.as_f64().map(|x| format!("{:.*}", digits, x * scale)).unwrap_or_else(|| "-".into())
    };
    for e in t["edges"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "{:<14} {:<48} {:<9} {:>8} {:>7} {:>6} {:>9}",
            e["to"].as_str().unwrap_or("-"),
            e["peer"].as_str().unwrap_or(""),
            e["state"].as_str().unwrap_or(""),
            num(&e["rtt_ms"], 2, 1.0),
            num(&e["loss_ratio"], 2, 100.0),
            e["open_flows"].as_u64().map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
            e["flows_total"].as_u64().map(|n| n.to_string()).unwrap_or_else(|| "-".into()),
        );
    }
    let _ =
        writeln!(out, "\n{:<32} {:<6} {:<28} ROUTE (new traffic goes to the first)", "SERVICE", "PROTO", "SERVED IN");
    for s in t["services"].as_array().into_iter().flatten() {
        let served: Vec<String> = s["served_in"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|o| {
                let zone = o["zone"].as_str().unwrap_or("?");
                match (o["state"].as_str(), o["healthy_endpoints"].as_u64()) {
                    (Some("up"), Some(n)) if n > 0 => format!("{zone}({n})"),
                    (state, _) => format!("{zone}({})", state.filter(|s| *s != "up").unwrap_or("0")),
                }
            })
            .collect();
        let route: Vec<&str> = s["route"].as_array().into_iter().flatten().filter_map(|z| z.as_str()).collect();
        let route = if route.is_empty() { "! unavailable".to_string() } else { route.join(" > ") };
        let _ = writeln!(
            out,
            "{:<32} {:<6} {:<28} {}",
            s["name"].as_str().unwrap_or(""),
            s["protocol"].as_str().unwrap_or("-"),
            served.join(" "),
            route
        );
    }
    out
}
