//! A real Kubernetes API server for the tests: etcd and kube-apiserver built from the Go module
//! proxy by `tests/k8s/build.sh` (once per machine), started on loopback ports with a static
//! token for an administrator and one for the gateway (RBAC decides what that one may do).
//! Stopped (and its data removed) when dropped.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// The administrator's token (group `system:masters`).
pub const ADMIN_TOKEN: &str = "causeway-test-admin";
/// The gateway's token (user `causeway-gateway`, no groups: only what RBAC grants it).
pub const GATEWAY_TOKEN: &str = "causeway-test-gateway";
pub const GATEWAY_USER: &str = "causeway-gateway";

/// Where the binaries are: `CAUSEWAY_K8S_DIR`, else what `tests/k8s/build.sh` prints (it builds
/// them the first time).
pub fn binaries() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("CAUSEWAY_K8S_DIR").map(PathBuf::from) {
        if d.join("kube-apiserver").exists() {
            return Ok(d);
        }
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s/build.sh");
    let out = Command::new("bash").arg(script).stderr(Stdio::inherit()).output().context("tests/k8s/build.sh")?;
    anyhow::ensure!(out.status.success(), "tests/k8s/build.sh failed");
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim().lines().last().unwrap_or_default()))
}

/// A running etcd and kube-apiserver.
pub struct ApiServer {
    pub url: String,
    pub dir: PathBuf,
    etcd: Child,
    apiserver: Child,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl ApiServer {
    /// Starts both and waits (at most 60 s) until the API server answers `/readyz`.
    pub fn start(name: &str) -> anyhow::Result<Self> {
        let bin = binaries()?;
        let dir = std::env::temp_dir().join(format!("causeway-k8s-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("etcd"))?;
        let (client, peer, secure) = (free_port()?, free_port()?, free_port()?);
        let log = |n: &str| std::fs::File::create(dir.join(n));
        let etcd = Command::new(bin.join("etcd"))
            .args(["--data-dir", &dir.join("etcd").display().to_string()])
            .args(["--listen-client-urls", &format!("http://127.0.0.1:{client}")])
            .args(["--advertise-client-urls", &format!("http://127.0.0.1:{client}")])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &format!("default=http://127.0.0.1:{peer}")])
            .args(["--unsafe-no-fsync"])
            .stdout(Stdio::null())
            .stderr(log("etcd.log")?)
            .spawn()
            .context("etcd")?;
        // The service-account signing key, and the static tokens.
        let sa = rcgen::KeyPair::generate().context("service-account key")?;
        std::fs::write(dir.join("sa.key"), sa.serialize_pem())?;
        std::fs::write(dir.join("sa.pub"), sa.public_key_pem())?;
        std::fs::write(
            dir.join("tokens.csv"),
            format!("{ADMIN_TOKEN},admin,1,\"system:masters\"\n{GATEWAY_TOKEN},{GATEWAY_USER},2\n"),
        )?;
        let path = |f: &str| dir.join(f).display().to_string();
        let apiserver = Command::new(bin.join("kube-apiserver"))
            .args(["--etcd-servers", &format!("http://127.0.0.1:{client}")])
            .args(["--bind-address", "127.0.0.1", "--advertise-address", "127.0.0.1"])
            .args(["--secure-port", &secure.to_string(), "--cert-dir", &path("certs")])
            .args(["--service-account-issuer", "https://kubernetes.default.svc.cluster.local"])
            .args(["--service-account-key-file", &path("sa.pub")])
            .args(["--service-account-signing-key-file", &path("sa.key")])
            .args(["--token-auth-file", &path("tokens.csv"), "--authorization-mode", "RBAC"])
            .args(["--service-cluster-ip-range", "10.96.0.0/16", "--disable-admission-plugins", "ServiceAccount"])
            .stdout(Stdio::null())
            .stderr(log("kube-apiserver.log")?)
            .spawn()
            .context("kube-apiserver")?;
        let this = Self { url: format!("https://127.0.0.1:{secure}"), dir, etcd, apiserver };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !this.ready() {
            anyhow::ensure!(
                Instant::now() < deadline,
                "the API server never became ready:\n{}",
                std::fs::read_to_string(this.dir.join("kube-apiserver.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(this)
    }

    fn ready(&self) -> bool {
        Command::new("curl")
            .args(["-sfk", "--max-time", "2", "-H", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
            .arg(format!("{}/readyz", self.url))
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// A kubeconfig for `token`, trusting the API server's own certificate.
    pub fn kubeconfig(&self, token: &str) -> anyhow::Result<PathBuf> {
        let ca = self.dir.join("certs/apiserver.crt");
        let path = self.dir.join(format!("kubeconfig-{}", &token[token.len() - 5..]));
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster: {{ server: \"{}\", certificate-authority: \"{}\", tls-server-name: localhost }}\n\
users:\n- name: u\n  user: {{ token: \"{token}\" }}\ncontexts:\n- name: c\n  context: {{ cluster: test, user: u, namespace: default }}\ncurrent-context: c\n",
                self.url,
                ca.display()
            ),
        )?;
        Ok(path)
    }

    /// The address of the API server.
    pub fn addr(&self) -> SocketAddr {
        self.url.trim_start_matches("https://").parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 0)))
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        for c in [&mut self.apiserver, &mut self.etcd] {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
