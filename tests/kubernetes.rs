//! The Kubernetes source against a real API server (etcd and kube-apiserver built from the Go
//! module proxy by `tests/k8s/build.sh`, once per machine).

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use causeway_tests::k8s::{ApiServer, ADMIN_TOKEN, GATEWAY_TOKEN};

fn get(api: &ApiServer, token: &str, path: &str) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-sk", "--max-time", "5", "-w", "\n%{http_code}", "-H", &format!("Authorization: Bearer {token}")])
        .arg(format!("{}{path}", api.url))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The harness itself: a real API server, RBAC on, the administrator allowed and the gateway's
/// identity refused until a role grants it something.
#[test]
fn a_real_api_server_starts_and_rbac_decides_for_the_gateways_token() {
    let api = ApiServer::start("smoke").unwrap();
    let (code, body) = get(&api, ADMIN_TOKEN, "/api/v1/namespaces");
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"kube-system\""), "{body}");
    let (code, body) = get(&api, GATEWAY_TOKEN, "/api/v1/namespaces");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("causeway-gateway"), "{body}");
    let (code, _) = get(&api, "not-a-token", "/api/v1/namespaces");
    assert_eq!(code, 401);
}
