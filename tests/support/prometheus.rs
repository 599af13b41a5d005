//! A real Prometheus and its promtool, from Debian's `prometheus` package unpacked (not installed:
//! no service starts) by `tests/run.sh` into a cache outside the clone.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;

/// Where `tests/run.sh` unpacks the package (`CAUSEWAY_PROMETHEUS_DIR` overrides).
pub const DEFAULT_DIR: &str = "/var/cache/causeway-ci/prometheus";

/// The path of `prometheus` or `promtool`; panics with the way to get it when it is missing.
pub fn tool(name: &str) -> PathBuf {
    let dir = std::env::var("CAUSEWAY_PROMETHEUS_DIR").unwrap_or_else(|_| DEFAULT_DIR.to_string());
    let path = PathBuf::from(dir).join("usr/bin").join(name);
    assert!(
        path.exists(),
        "{} is missing: `bash tests/run.sh` unpacks Debian's prometheus package there",
        path.display()
    );
    path
}

/// `promtool check metrics` on an exposition: its findings (empty when it has none).
pub fn check_metrics(text: &str) -> anyhow::Result<String> {
    use std::io::Write;
    let mut child = std::process::Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("run promtool")?;
    child.stdin.take().context("stdin")?.write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    let findings = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    if out.status.success() {
        Ok(String::new())
    } else {
        Ok(findings)
    }
}

/// A Prometheus server scraping `targets` every second, killed on drop.
pub struct Prometheus {
    child: std::process::Child,
    pub addr: SocketAddr,
    _dir: tempdir::Dir,
}

impl Prometheus {
    pub async fn start(targets: &[SocketAddr]) -> anyhow::Result<Self> {
        // The port is picked free and then handed to Prometheus: another process may take it in
        // between, and then Prometheus exits at once. Such a start is retried on a new port.
        let mut last = None;
        for _ in 0..3 {
            match Self::start_once(targets).await {
                Ok(p) => return Ok(p),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("prometheus did not start")))
    }

    async fn start_once(targets: &[SocketAddr]) -> anyhow::Result<Self> {
        let dir = tempdir::Dir::new("prometheus")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
                 scrape_configs:\n  - job_name: causeway\n    static_configs: [{{ targets: [{}] }}]\n",
                targets.join(", ")
            ),
        )?;
        let child = std::process::Command::new(tool("prometheus"))
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .context("run prometheus")?;
        let mut p = Self { child, addr, _dir: dir };
        // Listening comes before the TSDB is open (queries get 503 until then): wait for /-/ready.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = p.child.try_wait()? {
                anyhow::bail!("prometheus exited ({status}) before it was ready on {addr}");
            }
            if let Ok((200, _)) = causeway::admin::get(addr, "/-/ready").await {
                return Ok(p);
            }
            anyhow::ensure!(std::time::Instant::now() < deadline, "prometheus on {addr} never became ready");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An instant query's scalar result (the first series' value), if it has one.
    pub async fn query(&self, promql: &str) -> anyhow::Result<Option<f64>> {
        let q: String = form_urlencoded::byte_serialize(promql.as_bytes()).collect();
        let (status, body) = causeway::admin::get(self.addr, &format!("/api/v1/query?query={q}")).await?;
        anyhow::ensure!(status == 200, "query refused ({status}): {body}");
        let v: serde_json::Value = serde_json::from_str(&body)?;
        let value = v["data"]["result"][0]["value"][1].as_str().and_then(|s| s.parse::<f64>().ok());
        Ok(value)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory removed on drop.
pub mod tempdir {
    use std::path::{Path, PathBuf};

    pub struct Dir(PathBuf);

    impl Dir {
        pub fn new(prefix: &str) -> std::io::Result<Self> {
            let n: u64 = rand::random();
            let p = std::env::temp_dir().join(format!("causeway-{prefix}-{n:016x}"));
            std::fs::create_dir_all(&p)?;
            Ok(Self(p))
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
