//! Test support for HTTP services: real servers written in Python (each prints its port on its
//! first line and is killed on drop), and a two-zone mesh where zone `a` imports a service as
//! `http` and zone `east` exports it.

use std::io::BufRead;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};

use crate::{init, TestMesh, ZoneSpec};

/// A server process from a Python program; killed when dropped.
pub struct PyServer {
    pub addr: SocketAddr,
    child: Child,
}

impl Drop for PyServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `python3 -c program args…`; the program prints the port it listens on (127.0.0.1) first.
pub fn py_server(program: &str, args: &[&str]) -> PyServer {
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(program)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    let out = child.stdout.take().expect("piped stdout");
    std::io::BufReader::new(out).read_line(&mut line).expect("server port");
    let port: u16 = line.trim().parse().unwrap_or_else(|_| panic!("server port, got {line:?}"));
    PyServer { addr: SocketAddr::from(([127, 0, 0, 1], port)), child }
}

/// Writes `yaml` as gateway `i`'s config and starts it (in this process).
pub async fn start_yaml(m: &TestMesh, i: usize, yaml: &str) -> causeway::Gateway {
    let path = m.pki.dir.join(format!("{}-{}-http.yaml", m.specs[i].zone, m.specs[i].gateway));
    std::fs::write(&path, yaml).expect("write config");
    let cfg = causeway::config::load(&path).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    let (creds, bundle) = causeway::app::load_tls(&cfg).expect("tls");
    causeway::Gateway::start(&cfg, creds, bundle).await.expect("gateway starts")
}

/// Zone `a` imports `service` with `import_fields` (say `protocol: http,`); zone `east` exports it
/// to `endpoints` with `export_fields` (say `protocol: grpc, max_requests: 2,`) and `extra_east`
/// top-level YAML. Returns the mesh and a's listener for the service.
pub async fn two_zone_mesh(
    service: &'static str,
    endpoints: Vec<SocketAddr>,
    export_fields: &str,
    import_fields: &str,
    extra_east: &str,
) -> (TestMesh, SocketAddr) {
    init();
    let mut m = TestMesh::plan(
        vec![
            ZoneSpec { zone: "a", exports: vec![], imports: vec![(service, vec![])] },
            ZoneSpec { zone: "east", exports: vec![(service, endpoints)], imports: vec![] },
        ],
        "",
    )
    .expect("mesh plan");
    m.specs[1].extra = extra_east.to_string();
    let yaml =
        m.specs[1].yaml().replace(&format!("{{ name: {service},"), &format!("{{ name: {service}, {export_fields}"));
    m.gateways[1] = Some(start_yaml(&m, 1, &yaml).await);
    let yaml = m.specs[0]
        .yaml()
        .replace(&format!("{{ service: {service},"), &format!("{{ service: {service}, {import_fields}"));
    m.gateways[0] = Some(start_yaml(&m, 0, &yaml).await);
    assert!(m.wait_routes(0, service, 1).await, "zone a never learned {service}");
    let listen = m.gw(0).import_addr(service).expect("import listener");
    (m, listen)
}
