//! The `causeway` binary as a user runs it: certificates, config checks (key paths, exit 2), the
//! shipped example configurations, and the demo.

#![allow(clippy::unwrap_used)] // test code: a failed unwrap is a failed test

use std::path::{Path, PathBuf};
use std::process::Command;

use causeway_tests::causeway_bin;

fn run(args: &[&str]) -> (i32, String, String) {
    let bin = causeway_bin();
    assert!(bin.exists(), "{} is missing: run `cargo build --bins` before the tests", bin.display());
    let out = Command::new(bin).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("causeway-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

#[test]
fn certs_init_and_issue_then_check_a_config() {
    let d = tmp("certs");
    let ca = d.join("ca");
    let gw = d.join("gw");
    let (code, _, err) = run(&["certs", "init", "--trust-domain", "prod.example", "--out", ca.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let id = "spiffe://prod.example/zone/eu/gateway/gw-1";
    let (code, _, err) =
        run(&["certs", "issue", "--ca", ca.to_str().unwrap(), "--id", id, "--out", gw.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let pem = std::fs::read(gw.join("cert.pem")).unwrap();
    let creds = causeway::certs::credentials_from_pem(&pem, &std::fs::read(gw.join("key.pem")).unwrap()).unwrap();
    assert_eq!(creds.identity().unwrap().as_str(), id, "the URI SAN is the SPIFFE ID");
    // Another trust domain is refused by issue.
    let (code, _, err) = run(&[
        "certs",
        "issue",
        "--ca",
        ca.to_str().unwrap(),
        "--id",
        "spiffe://other/x",
        "--out",
        gw.to_str().unwrap(),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("trust domain"), "{err}");

    let cfg = d.join("gw.yaml");
    std::fs::write(
        &cfg,
        "zone: eu\ngateway: gw-1\ntrust_domain: prod.example\ntls: { cert: gw/cert.pem, key: gw/key.pem, bundle: gw/ca.crt }\nlisten: { overlay: \"127.0.0.1:0\" }\n",
    )
    .unwrap();
    let (code, out, err) = run(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ok (zone eu"), "{out}");
    // The certificate must be in the configured trust domain.
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg).unwrap().replace("trust_domain: prod.example", "trust_domain: other.example"),
    )
    .unwrap();
    let (code, _, err) = run(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 2);
    assert!(err.contains("tls.cert: certificate identity"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_broken_config_names_every_key_path_and_exits_2() {
    let d = tmp("broken");
    let cfg = d.join("broken.yaml");
    std::fs::write(
        &cfg,
        r#"zone: EU-West
gateway: gw-1
trust_domain: prod.example
tls: { cert: c.pem, key: k.pem, bundle: ca.pem }
listen: { overlay: "0.0.0.0:4433" }
peers:
  - { id: "spiffe://prod.example/zone/us/gateway/gw-1", address: "not-an-address" }
exports:
  - { name: orders.shop, port: 8080, endpoints: [] }
timing: { peer_timeout: 2 fortnights }
"#,
    )
    .unwrap();
    let (code, _, err) = run(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    for path in ["zone:", "peers[0].address:", "exports[0].endpoints:", "timing.peer_timeout:"] {
        assert!(err.contains(path), "missing {path} in:\n{err}");
    }
    // An unknown key is named with its path too, and the gateway refuses to start the same way.
    std::fs::write(
        &cfg,
        std::fs::read_to_string(&cfg).unwrap().replace("gateway: gw-1", "gateway: gw-1\ngatway: typo"),
    )
    .unwrap();
    let (code, _, err) = run(&["gateway", "--config", cfg.to_str().unwrap()]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unknown field `gatway`"), "{err}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn every_example_config_parses() {
    let dir = repo().join("deploy/examples");
    let mut n = 0;
    let (mut documents, mut zones) = (Vec::new(), Vec::new());
    for entry in std::fs::read_dir(&dir).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "yaml") {
            let text = std::fs::read_to_string(&p).unwrap();
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.starts_with("mesh-") {
                documents.push((p.clone(), text));
                continue;
            }
            let redirector = name.starts_with("redirect-");
            let res = if redirector {
                causeway::redirect::parse(&text).map(|_| ())
            } else {
                causeway::config::parse(&text).map(|_| ())
            };
            if let Err(errs) = res {
                panic!("{}: {errs:?}", p.display());
            }
            if !redirector {
                zones.push((p.clone(), causeway::config::parse(&text).unwrap()));
            }
            n += 1;
        }
    }
    assert!(n >= 4, "expected the 3-zone example and a redirector in {}", dir.display());
    // A mesh-wide document parses, and merged with every zone's file it validates there.
    assert!(!documents.is_empty(), "expected a mesh-wide document example in {}", dir.display());
    for (p, text) in &documents {
        let doc = causeway::control::parse_document(text).unwrap_or_else(|e| panic!("{}: {e:?}", p.display()));
        for (zp, cfg) in &zones {
            if let Err(errs) = causeway::control::compose(cfg, &doc) {
                panic!("{} in {}: {errs:?}", p.display(), zp.display());
            }
        }
    }
}

#[test]
fn kubernetes_manifests_validate_and_embed_valid_configs() {
    let dir = repo().join("deploy/kubernetes");
    let files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    let mut configs = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for doc in serde_yaml_ng::Deserializer::from_str(&text) {
            let v: serde_yaml_ng::Value = serde::Deserialize::deserialize(doc).unwrap();
            let Some(data) = v.get("data") else { continue };
            if let Some(g) = data.get("gateway.yaml").and_then(|x| x.as_str()) {
                causeway::config::parse(g).unwrap_or_else(|e| panic!("{}: gateway.yaml: {e:?}", f.display()));
                configs += 1;
            }
            if let Some(r) = data.get("redirect.yaml").and_then(|x| x.as_str()) {
                causeway::redirect::parse(r).unwrap_or_else(|e| panic!("{}: redirect.yaml: {e:?}", f.display()));
                configs += 1;
            }
        }
    }
    assert_eq!(configs, 2, "the gateway and redirector ConfigMaps");
    // Schema validation, offline (PyPI kubernetes-validate; tests/run.sh installs it).
    let out = Command::new("kubernetes-validate")
        .arg("--strict")
        .args(&files)
        .output()
        .expect("kubernetes-validate is missing: pip install kubernetes-validate (tests/run.sh does)");
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

#[test]
fn the_demo_runs_to_completion() {
    let (code, out, err) = run(&["demo", "--flows", "40"]);
    assert_eq!(code, 0, "stdout:\n{out}\nstderr:\n{err}");
    assert!(out.contains("demo: all checks passed"), "{out}");
    assert!(out.contains("failover: first new orders.shop flow served by zone ap"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_a_running_gateways_peers_and_routes() {
    use causeway_tests::*;
    let (m, _) = echo_pair().await;
    let admin = m.gw(0).admin_addr.unwrap().to_string();
    let out = tokio::task::spawn_blocking(move || run(&["status", "--admin", &admin])).await.unwrap();
    let (code, stdout, stderr) = out;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("in zone \"a\""), "{stdout}");
    let peer_line = stdout.lines().find(|l| l.contains(m.ids[1].as_str())).expect("peer b listed");
    assert!(peer_line.starts_with("b ") && peer_line.contains(" up "), "{peer_line}");
    // Served in b (one healthy endpoint); new traffic goes to b.
    let route = stdout.lines().find(|l| l.starts_with("echo.test")).expect("echo.test listed");
    assert!(route.contains("b(1)") && route.trim_end().ends_with(" b"), "{route}");
    m.shutdown().await;
}
