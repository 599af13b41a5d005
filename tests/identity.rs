//! Peer identity checks in the handshake: wrong CA, wrong SPIFFE ID and an expired certificate are
//! each refused, counted by reason, and the gateway keeps serving its real peers.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use causeway::demo::Pki;
use causeway_tests::rogue;
use causeway_tests::*;

async fn serving_pair() -> (TestMesh, std::net::SocketAddr) {
    init();
    let (echo, _) = echo_server("b".into()).await.unwrap();
    let mut m = TestMesh::plan(
        vec![
            ZoneSpec { zone: "a", exports: vec![], imports: vec![("echo.test", vec![])] },
            ZoneSpec { zone: "b", exports: vec![("echo.test", vec![echo])], imports: vec![] },
        ],
        "",
    )
    .unwrap();
    m.start_all().await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 1).await);
    let listen = m.gw(0).import_addr("echo.test").unwrap();
    (m, listen)
}

fn refusals(m: &TestMesh, i: usize, reason: &str) -> f64 {
    metric(&m.gw(i).metrics_text(), "causeway_peer_handshake_failures_total", &[("reason", reason)]).unwrap_or(0.0)
}

/// Dials gateway b as a rogue client and expects the connection to be refused.
async fn expect_refused(m: &TestMesh, creds: (causeway_overlay::Credentials, causeway_overlay::TrustBundle)) {
    // TLS 1.3: the client may finish before the server checks its certificate; the server then
    // closes the connection with a TLS alert. A dial error is a refusal too.
    if let Ok((_ep, conn)) = rogue::dial(creds.0, creds.1, &m.ids[1], m.addrs[1]).await {
        let closed =
            tokio::time::timeout(Duration::from_secs(5), conn.closed()).await.expect("refused peer left connected");
        assert!(matches!(closed, quinn::ConnectionError::ConnectionClosed(_)), "{closed:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_from_another_ca_is_refused() {
    let (m, listen) = serving_pair().await;
    let other = Pki::new(TRUST_DOMAIN).unwrap();
    // Same SPIFFE ID as the real peer a, issued by a CA b does not trust.
    let creds =
        rogue::credentials(&other, &m.ids[0], Validity::for_duration(Duration::from_secs(3600)), &m.pki).unwrap();
    expect_refused(&m, creds).await;
    assert!(
        eventually(Duration::from_secs(5), || refusals(&m, 1, "unknown_ca") == 1.0).await,
        "{}",
        m.gw(1).metrics_text()
    );
    // The real peer is still served.
    let (banner, _) = echo_flow(listen, b"still here").await.unwrap();
    assert_eq!(banner, "b");
    assert_eq!(m.gw(1).mesh.peers_json()["peers"][0]["state"], "up");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_ca_with_an_unexpected_spiffe_id_is_refused() {
    let (m, listen) = serving_pair().await;
    let stranger = m.pki.identity("a", "gw-9");
    let creds =
        rogue::credentials(&m.pki, &stranger, Validity::for_duration(Duration::from_secs(3600)), &m.pki).unwrap();
    expect_refused(&m, creds).await;
    assert!(eventually(Duration::from_secs(5), || refusals(&m, 1, "unexpected_identity") == 1.0).await);
    echo_flow(listen, b"still here").await.unwrap();
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_certificate_is_refused() {
    let (m, listen) = serving_pair().await;
    let expired = Validity { not_before_secs: -7200, not_after_secs: -3600 };
    let creds = rogue::credentials(&m.pki, &m.ids[0], expired, &m.pki).unwrap();
    expect_refused(&m, creds).await;
    assert!(eventually(Duration::from_secs(5), || refusals(&m, 1, "expired") == 1.0).await);
    echo_flow(listen, b"still here").await.unwrap();
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dialing_gateway_refuses_a_peer_presenting_another_identity() {
    init();
    let mut m = TestMesh::plan(
        vec![
            ZoneSpec { zone: "a", exports: vec![], imports: vec![] },
            ZoneSpec { zone: "b", exports: vec![], imports: vec![] },
        ],
        "",
    )
    .unwrap();
    // b's certificate names gw-2, while a expects gw-1 there.
    let wrong = m.pki.identity("b", "gw-2");
    m.specs[1].tls = m.pki.issue("b-wrong", &wrong, Validity::for_duration(Duration::from_secs(3600))).unwrap();
    m.start_all().await.unwrap();
    assert!(eventually(Duration::from_secs(5), || refusals(&m, 0, "unexpected_identity") >= 1.0).await);
    assert_eq!(m.gw(0).mesh.peers_json()["peers"][0]["state"], "down");
    m.shutdown().await;
}
