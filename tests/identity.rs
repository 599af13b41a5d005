//! Peer identity checks in the handshake: wrong CA, wrong SPIFFE ID and an expired certificate are
//! each refused, counted by reason, and the gateway keeps serving its real peers.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::time::Duration;

use causeway::demo::Pki;
use causeway_tests::rogue;
use causeway_tests::*;

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
    let (m, listen) = echo_pair().await;
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
    assert_eq!(causeway::admin::peers_json(&m.gw(1).mesh)["peers"][0]["state"], "up");
    m.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_right_ca_with_an_unexpected_spiffe_id_is_refused() {
    let (m, listen) = echo_pair().await;
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
    let (m, listen) = echo_pair().await;
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
    assert_eq!(causeway::admin::peers_json(&m.gw(0).mesh)["peers"][0]["state"], "down");
    m.shutdown().await;
}

/// A certificate from the mesh CA for `uris`, shaped by `tweak`.
fn crafted(
    pki: &Pki,
    uris: &[&str],
    tweak: impl FnOnce(&mut rcgen::CertificateParams),
) -> (causeway_overlay::Credentials, causeway_overlay::TrustBundle) {
    use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
    let ca_key = KeyPair::from_pem(&pki.ca.key_pem).unwrap();
    let issuer = Issuer::from_ca_cert_pem(&pki.ca.cert_pem, ca_key).unwrap();
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names = uris.iter().map(|u| SanType::URI((*u).try_into().unwrap())).collect();
    p.is_ca = IsCa::ExplicitNoCa;
    p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = time::OffsetDateTime::now_utc() - time::Duration::minutes(1);
    p.not_after = time::OffsetDateTime::now_utc() + time::Duration::hours(1);
    tweak(&mut p);
    let cert = p.signed_by(&key, &issuer).unwrap();
    let chain = format!("{}{}", cert.pem(), pki.ca.cert_pem);
    let creds = causeway::certs::credentials_from_pem(chain.as_bytes(), key.serialize_pem().as_bytes()).unwrap();
    (creds, causeway::certs::bundle_from_pem(pki.ca.cert_pem.as_bytes()).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_x509_svid_violation_is_refused_with_its_own_reason() {
    use rcgen::{BasicConstraints, IsCa, KeyUsagePurpose, SanType};
    let (m, listen) = echo_pair().await;
    let good = m.ids[0].to_string();
    let long = format!("spiffe://{TRUST_DOMAIN}/{}", "a".repeat(2100));
    type Tweak = Box<dyn FnOnce(&mut rcgen::CertificateParams)>;
    let none: fn() -> Tweak = || Box::new(|_| {});
    let shapes: Vec<(&str, Vec<String>, Tweak, &str)> = vec![
        (
            "uppercase trust domain",
            vec![format!("spiffe://TEST.causeway/zone/a/gateway/gw-1")],
            none(),
            "invalid_spiffe_id",
        ),
        ("port", vec![format!("spiffe://{TRUST_DOMAIN}:443/zone/a/gateway/gw-1")], none(), "invalid_spiffe_id"),
        ("userinfo", vec![format!("spiffe://u@{TRUST_DOMAIN}/zone/a/gateway/gw-1")], none(), "invalid_spiffe_id"),
        ("query", vec![format!("{good}?q=1")], none(), "invalid_spiffe_id"),
        ("fragment", vec![format!("{good}#f")], none(), "invalid_spiffe_id"),
        ("percent-encoding", vec![format!("spiffe://{TRUST_DOMAIN}/zone/a%2Fb")], none(), "invalid_spiffe_id"),
        ("empty segment", vec![format!("spiffe://{TRUST_DOMAIN}/zone//a")], none(), "invalid_spiffe_id"),
        ("dot segment", vec![format!("spiffe://{TRUST_DOMAIN}/zone/./a")], none(), "invalid_spiffe_id"),
        ("over 2048 bytes", vec![long], none(), "invalid_spiffe_id"),
        ("another scheme", vec![format!("https://{TRUST_DOMAIN}/zone/a")], none(), "invalid_spiffe_id"),
        ("two URI SANs", vec![good.clone(), format!("spiffe://{TRUST_DOMAIN}/other")], none(), "multiple_uri_sans"),
        (
            "no URI SAN",
            vec![],
            Box::new(|p: &mut rcgen::CertificateParams| {
                p.subject_alt_names = vec![SanType::DnsName("gw.example".try_into().unwrap())]
            }),
            "no_spiffe_id",
        ),
        (
            "leaf is a CA",
            vec![good.clone()],
            Box::new(|p: &mut rcgen::CertificateParams| p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained)),
            "ca_as_leaf",
        ),
        (
            "keyCertSign on a leaf",
            vec![good.clone()],
            Box::new(|p: &mut rcgen::CertificateParams| {
                p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyCertSign]
            }),
            "key_usage",
        ),
        (
            "cRLSign on a leaf",
            vec![good.clone()],
            Box::new(|p: &mut rcgen::CertificateParams| {
                p.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::CrlSign]
            }),
            "key_usage",
        ),
        (
            "no digitalSignature",
            vec![good.clone()],
            Box::new(|p: &mut rcgen::CertificateParams| p.key_usages = vec![KeyUsagePurpose::KeyEncipherment]),
            "key_usage",
        ),
    ];
    let n = shapes.len();
    for (what, uris, tweak, reason) in shapes {
        let before = refusals(&m, 1, reason);
        let uris: Vec<&str> = uris.iter().map(String::as_str).collect();
        expect_refused(&m, crafted(&m.pki, &uris, tweak)).await;
        assert!(
            eventually(Duration::from_secs(5), || refusals(&m, 1, reason) == before + 1.0).await,
            "{what}: expected reason {reason}\n{}",
            m.gw(1).metrics_text()
        );
    }
    assert!(n >= 12);
    // A well-formed certificate of the same shape passes the handshake (the harness is not refusing
    // everything). As a second connection of peer a presenting another leaf it is taken for a
    // certificate rotation — a replacement that becomes current only once its control stream is
    // up — and this client opens none: it is closed by the control-stream deadline, not by TLS.
    let (creds, bundle) = crafted(&m.pki, &[good.as_str()], |_| {});
    let (_ep, conn) = rogue::dial(creds, bundle, &m.ids[1], m.addrs[1]).await.unwrap();
    let code = rogue::close_code(&conn, Duration::from_secs(10)).await.map(|(c, _)| c);
    assert_eq!(code, Some(causeway_protocol::ErrorCode::PROTOCOL_VIOLATION.0), "a valid SVID was refused");
    echo_flow(listen, b"still serving").await.unwrap();
    m.shutdown().await;
}

/// Zone a in trust domain `test.causeway`, zone b in `partner.example` with its own CA; each
/// federates the other's bundle. Flows cross; b's CA cannot vouch for a `test.causeway` identity;
/// an identity of a trust domain nobody federates is refused as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn federated_trust_domains_vouch_only_for_their_own_identities() {
    use causeway_protocol::TrustDomain;
    let mut m = echo_pair_plan().await;
    let partner = Pki::new("partner.example").unwrap();
    let b_id = partner.identity("b", "gw-1");
    let hour = Validity::for_duration(Duration::from_secs(3600));
    let ours = m.pki.dir.join("ca.crt");
    let theirs = partner.dir.join("ca.crt");
    m.specs[1].trust_domain = "partner.example".into();
    m.specs[1].tls = partner.issue("b-partner", &b_id, hour).unwrap();
    m.specs[1].extra = format!("federation:\n  - {{ trust_domain: test.causeway, bundle: \"{}\" }}\n", ours.display());
    m.specs[0].extra =
        format!("federation:\n  - {{ trust_domain: partner.example, bundle: \"{}\" }}\n", theirs.display());
    m.specs[0].peers[0].0 = b_id.clone();
    m.ids[1] = b_id;
    m.start_all().await.unwrap();
    assert!(m.wait_routes(0, "echo.test", 1).await, "a never learned echo.test across trust domains");
    let listen = m.gw(0).import_addr("echo.test").unwrap();
    assert_eq!(echo_flow(listen, b"across trust domains").await.unwrap().0, "b");

    // partner.example's CA (trusted by b for partner identities) mints a's test.causeway identity:
    // checked against test.causeway's bundle only, so refused.
    let read_pem = |p: &std::path::Path| std::fs::read(p).unwrap();
    let rogue_bundle = |own: &Pki| {
        let b = causeway::certs::bundle_from_pem(&read_pem(&own.dir.join("ca.crt"))).unwrap();
        let td = TrustDomain::new("partner.example").unwrap();
        causeway::certs::federate_pem(b, td, &read_pem(&theirs)).unwrap()
    };
    // (Our own `certs::issue` refuses to do this; a CA with the partner's key and a relabelled
    // trust domain does it anyway, as a compromised or careless partner CA would.)
    let minting = Pki {
        dir: partner.dir.clone(),
        ca: causeway::certs::Ca {
            cert_pem: partner.ca.cert_pem.clone(),
            key_pem: partner.ca.key_pem.clone(),
            trust_domain: TrustDomain::new(TRUST_DOMAIN).unwrap(),
        },
    };
    let forged = rogue::credentials(&minting, &m.ids[0], hour, &m.pki).unwrap();
    expect_refused(&m, (forged.0, rogue_bundle(&m.pki))).await;
    assert!(
        eventually(Duration::from_secs(5), || refusals(&m, 1, "unknown_ca") == 1.0).await,
        "{}",
        m.gw(1).metrics_text()
    );
    // A trust domain b holds no bundle for: refused with its own reason.
    let nowhere = causeway_protocol::Identity::parse("spiffe://nowhere.example/zone/a/gateway/gw-1").unwrap();
    let stranger = Pki::new("nowhere.example").unwrap();
    let creds = rogue::credentials(&stranger, &nowhere, hour, &m.pki).unwrap();
    expect_refused(&m, (creds.0, rogue_bundle(&stranger))).await;
    assert!(eventually(Duration::from_secs(5), || refusals(&m, 1, "unknown_trust_domain") == 1.0).await);
    // The real cross-domain peer is still served.
    assert_eq!(echo_flow(listen, b"still here").await.unwrap().0, "b");
    m.shutdown().await;
}

/// A federated partner's gateway may name callers of its own trust domain only: asserting one of
/// ours (to match our `identities` rules) is refused with `identity_refused`, counted and logged,
/// while its own callers are authorized as themselves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federated_peer_cannot_assert_identities_of_our_trust_domain() {
    let mut m = echo_pair_plan().await;
    let partner = Pki::new("partner.example").unwrap();
    let p_id = partner.identity("p", "gw-1");
    let ours = "spiffe://test.causeway/ns/shop/sa/orders";
    let theirs = "spiffe://partner.example/ns/shop/sa/orders";
    m.specs[1].extra = format!(
        "federation:\n  - {{ trust_domain: partner.example, bundle: \"{}\" }}\n\
         authorization:\n  default_deny: true\n  policies:\n    - {{ name: orders-only, service: echo.test, action: allow, \
         rules: [{{ from: {{ identities: [\"{ours}\", \"{theirs}\"] }} }}] }}\n",
        partner.dir.join("ca.crt").display()
    );
    m.specs[1].peers.push((p_id.clone(), None, "p".into()));
    m.start_all().await.unwrap();
    let hour = Validity::for_duration(Duration::from_secs(3600));
    let creds = rogue::credentials(&partner, &p_id, hour, &partner).unwrap();
    // The partner trusts its own CA for itself and ours for our gateways.
    let bundle = causeway::certs::federate_pem(
        creds.1,
        causeway_protocol::TrustDomain::new(TRUST_DOMAIN).unwrap(),
        m.pki.ca.cert_pem.as_bytes(),
    )
    .unwrap();
    let (_ep, conn) = rogue::dial(creds.0, bundle, &m.ids[1], m.addrs[1]).await.unwrap();
    let mut ctl = rogue::open_control(&conn).await.unwrap();
    let target = format!("echo.test:{SERVICE_PORT}");
    let call = |identity: &'static str| {
        let mut requests = ctl.requests.clone();
        let target = target.clone();
        async move {
            let req =
                http::Request::connect(target.as_str()).header("causeway-source-identity", identity).body(()).unwrap();
            let mut s = requests.send_request(req).await.unwrap();
            let resp = s.recv_response().await.unwrap();
            let reason = resp.headers().get("causeway-error").map(|v| v.to_str().unwrap().to_string());
            (resp.status().as_u16(), reason.unwrap_or_default())
        }
    };
    // One of our identities, asserted by the partner: refused, whatever our policies say.
    assert_eq!(call(ours).await, (403, "identity_refused".into()));
    // A caller of the partner's own domain: authorized as itself (the policy allows it).
    assert_eq!(call(theirs).await.0, 200);
    // Not a SPIFFE ID at all: refused too (it used to fall back to the peer's own identity).
    assert_eq!(call("root").await, (403, "identity_refused".into()));
    let _ = &mut ctl;
    let t = m.gw(1).metrics_text();
    let refused = |reason| metric(&t, "causeway_peer_assertions_refused_total", &[("reason", reason)]);
    assert_eq!(refused("foreign_trust_domain"), Some(1.0), "{t}");
    assert_eq!(refused("malformed"), Some(1.0));
    assert!(
        warnings().iter().any(|w| w.get("message") == "peer.assertion.refused" && w.get("asserted") == ours),
        "no log line names the refused assertion"
    );
    // Our own gateway a still reaches the service as itself... and is refused by the policy, not
    // by the assertion rule (a's clients are a's own identity, which the policy does not list).
    let listen = m.gw(0).import_addr("echo.test").unwrap();
    assert!(m.wait_routes(0, "echo.test", 1).await);
    assert!(echo_flow(listen, b"x").await.is_err(), "default deny let a's unlisted client through");
    let t = m.gw(1).metrics_text();
    assert_eq!(metric(&t, "causeway_peer_assertions_refused_total", &[]), Some(2.0));
    m.shutdown().await;
}
