use super::*;

const GOOD: &str = r#"
zone: eu-west
gateway: gw-1
trust_domain: prod.example
tls: { cert: gw.crt, key: gw.key, bundle: ca.crt }
listen: { overlay: "0.0.0.0:4433", admin: "127.0.0.1:9901" }
peers:
  - { id: "spiffe://prod.example/zone/us-east/gw-1", address: "10.0.0.2:4433", zone: us-east }
exports:
  - { name: orders.shop, port: 8080, endpoints: ["127.0.0.1:18080"], labels: { version: v1 } }
imports:
  - { service: catalog.shop, listen: "127.0.0.1:15001", prefer_zones: [us-east] }
timing: { ping_interval: 100ms, peer_timeout: 500ms }
"#;

#[test]
fn the_fixed_part_names_each_changed_key_and_the_snapshot_takes_the_memory_budget() {
    let a = parse(GOOD).unwrap();
    assert!(a.fixed.changed_keys(&a.fixed.clone()).is_empty());
    let with = |yaml: &str| parse(&format!("{GOOD}{yaml}")).unwrap();
    let b = with("limits: { memory_budget: 1GiB }\nlog: { level: debug }\n");
    assert_eq!(b.snapshot.memory_budget, Some(1 << 30));
    assert_eq!(b.fixed.limits.memory_budget, None, "the budget lives in the snapshot only");
    assert_eq!(b.fixed.limits_with(&b.snapshot).memory_budget, Some(1 << 30));
    assert_eq!(a.fixed.changed_keys(&b.fixed), ["log"]);
    let c = parse(&GOOD.replace("gw-1\ntrust", "gw-2\ntrust").replace("peer_timeout: 500ms", "peer_timeout: 600ms"))
        .unwrap();
    assert_eq!(a.fixed.changed_keys(&c.fixed), ["gateway", "timing"]);
    let d = parse(&GOOD.replace("127.0.0.1:15001", "127.0.0.1:15002")).unwrap();
    assert!(a.fixed.changed_keys(&d.fixed).is_empty(), "imports are part of the snapshot");
    assert_ne!(a.snapshot, d.snapshot);
}

#[test]
fn parses_a_good_config() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.fixed.zone.as_str(), "eu-west");
    assert_eq!(c.snapshot.peers.len(), 1);
    assert_eq!(c.snapshot.exports[0].labels, vec![("version".to_string(), "v1".to_string())]);
    assert_eq!(c.fixed.timing.peer_timeout, Duration::from_millis(500));
    assert_eq!(c.snapshot.preferences.len(), 1);
}

#[test]
fn unknown_key_names_its_path() {
    let bad = GOOD.replace("zone: us-east }", "zone: us-east, wieght: 3 }");
    let errs = parse(&bad).unwrap_err();
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].path, "peers[0].wieght");
    assert!(errs[0].reason.contains("unknown field `wieght`"), "{}", errs[0].reason);
}

#[test]
fn reports_every_semantic_error_with_its_path() {
    let bad = GOOD
        .replace("zone: eu-west", "zone: EU")
        .replace("\"10.0.0.2:4433\"", "\"no where:x\"")
        .replace("127.0.0.1:18080", "localhost")
        .replace("ping_interval: 100ms", "ping_interval: soon");
    let errs = parse(&bad).unwrap_err();
    let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(paths, vec!["zone", "peers[0].address", "exports[0].endpoints[0]", "timing.ping_interval"]);
}

#[test]
fn limits_parse_with_units_and_refuse_what_is_out_of_range() {
    let with = |l: &str| GOOD.replace("timing: {", &format!("limits: {{ {l} }}\ntiming: {{"));
    let c = parse(&with("peer_receive_window: 32MiB, stream_window: 4MiB, memory_budget: 2GiB, flows_per_peer: 500"))
        .unwrap();
    assert_eq!(c.fixed.limits.quic.peer_receive_window, 32 << 20);
    assert_eq!(c.fixed.limits.quic.stream_window, 4 << 20);
    assert_eq!(c.fixed.limits.quic.flows_per_peer, 500);
    assert_eq!(c.snapshot.memory_budget, Some(2 << 30));
    let defaults = parse(GOOD).unwrap().fixed.limits;
    assert_eq!(defaults.quic.peer_receive_window, 64 << 20, "never unlimited by default");
    assert_eq!(defaults.memory_budget, None);
    let errs = parse(&with("peer_receive_window: 0, stream_window: 2GiB, memory_budget: lots, peer_flow_rate: 0"))
        .unwrap_err();
    let paths: Vec<_> = errs.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        vec!["limits.peer_flow_rate", "limits.peer_receive_window", "limits.stream_window", "limits.memory_budget"],
        "{errs:?}"
    );
    let errs = parse(&with("stream_window: 128MiB")).unwrap_err();
    assert_eq!(errs[0].path, "limits.stream_window");
    assert!(errs[0].reason.contains("must not exceed limits.peer_receive_window"));
    let errs = parse(&with("connections_per_listener: 10, connections_per_source: 20")).unwrap_err();
    assert_eq!(errs[0].path, "limits.connections_per_source");
}

#[test]
fn http_breakers_and_endpoint_protocols_are_checked() {
    let with = |fields: &str| {
        GOOD.replace("{ name: orders.shop, port: 8080,", &format!("{{ name: orders.shop, port: 8080, {fields}"))
    };
    let c = parse(&with("protocol: grpc, max_requests: 10,")).unwrap();
    assert!(c.snapshot.http_options[&c.snapshot.exports[0].name].h2);
    assert_eq!(c.snapshot.exports[0].protocol, Protocol::Http);
    let c = parse(&with("protocol: http, max_connections: 4,")).unwrap();
    assert!(!c.snapshot.http_options[&c.snapshot.exports[0].name].h2);
    assert_eq!(
        (
            c.snapshot.http_options[&c.snapshot.exports[0].name].max_connections,
            c.snapshot.http_options[&c.snapshot.exports[0].name].max_pending
        ),
        (Some(4), Some(1024))
    );
    let cases = [
        ("protocol: http, max_pending: 5,", "exports[0].max_pending", "needs max_connections"),
        ("protocol: http2, max_connections: 2,", "exports[0].max_connections", "HTTP/1.1 endpoints"),
        ("max_requests: 3,", "exports[0].max_requests", "http services only"),
        ("protocol: http, max_connections: 0,", "exports[0].max_connections", "at least 1"),
        ("protocol: h3,", "exports[0].protocol", "one of tcp, http, http2, grpc"),
    ];
    for (fields, path, reason) in cases {
        let errs = parse(&with(fields)).unwrap_err();
        assert_eq!(errs[0].path, path, "{fields}: {errs:?}");
        assert!(errs[0].reason.contains(reason), "{fields}: {}", errs[0].reason);
    }
}

#[test]
fn federated_trust_domains_admit_their_peers_and_nothing_else() {
    let partner = "  - { id: \"spiffe://partner.example/zone/ap/gw-1\", zone: ap }\n";
    let with_peer = GOOD.replace("exports:", &format!("{partner}exports:"));
    let errs = parse(&with_peer).unwrap_err();
    assert_eq!(errs[0].path, "peers[1].id");
    assert!(errs[0].reason.contains("neither trust_domain"), "{}", errs[0].reason);
    let fed =
        with_peer.replace("peers:", "federation:\n  - { trust_domain: partner.example, bundle: partner.crt }\npeers:");
    let c = parse(&fed).unwrap();
    assert_eq!(c.fixed.tls.federation.len(), 1);
    assert_eq!(c.fixed.tls.federation[0].0.as_str(), "partner.example");
    let own = fed.replace("trust_domain: partner.example", "trust_domain: prod.example");
    let errs = parse(&own).unwrap_err();
    assert_eq!(errs[0].path, "federation[0].trust_domain");
}

#[test]
fn refuses_inconsistent_timers() {
    let longer = parse(&GOOD.replace("peer_timeout: 500ms", "peer_timeout: 4s")).unwrap();
    assert_eq!(longer.fixed.timing.peer_close_timeout, Duration::from_secs(8));
    let errs = parse(&GOOD.replace("peer_timeout: 500ms", "peer_timeout: 4s, peer_close_timeout: 2s")).unwrap_err();
    assert_eq!(errs[0].path, "timing.peer_close_timeout");
    let bad = GOOD.replace("peer_timeout: 500ms", "peer_timeout: 50ms");
    let errs = parse(&bad).unwrap_err();
    assert_eq!(errs[0].path, "timing.peer_timeout");
}
