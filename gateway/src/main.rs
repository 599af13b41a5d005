//! `causeway`: parses the command line and hands over to the library. Exit codes: 0 success,
//! 1 runtime failure, 2 invalid configuration or usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use causeway::config::{self, LogFormat};
use causeway::{app, certs, telemetry};
use causeway_protocol::{Identity, TrustDomain};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "causeway", version, about = "Zone gateways joined by an encrypted QUIC/HTTP3 overlay")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run a zone gateway.
    Gateway {
        #[arg(long, short)]
        config: PathBuf,
        /// Runtime worker threads (default: one per CPU).
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Validate a configuration file (and the TLS files it names); exit 2 on any error.
    Check {
        /// A gateway configuration.
        #[arg(long, short, required_unless_present = "redirect")]
        config: Option<PathBuf>,
        /// A redirector configuration.
        #[arg(long, conflicts_with = "config")]
        redirect: Option<PathBuf>,
    },
    /// Run the node agent: capture connections to mesh VIPs (iptables), hand them to the zone
    /// gateway, answer mesh DNS. Removes its iptables rules when it stops.
    Redirect {
        #[arg(long, short, required_unless_present = "cleanup")]
        config: Option<PathBuf>,
        /// Remove every iptables rule a redirector installed (after a crash) and exit.
        #[arg(long)]
        cleanup: bool,
        #[arg(long)]
        workers: Option<usize>,
    },
    /// Make a CA or issue SPIFFE certificates.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
    /// Three zones on loopback in one process: cross-zone traffic, then a failover. Exits by itself.
    Demo {
        /// Flows per phase.
        #[arg(long, default_value_t = 200)]
        flows: usize,
        /// Bytes each flow sends (and gets echoed back).
        #[arg(long, default_value_t = 64 * 1024)]
        bytes: usize,
    },
    /// Authorization policy tools.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Show a running gateway's peers and services (from its admin API); with `--mesh`, the
    /// mesh-wide document it holds and where every gateway stands with it.
    Status {
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: std::net::SocketAddr,
        #[arg(long)]
        mesh: bool,
    },
    /// Publish a mesh-wide document (routes, authorization, rate limits, allowlists) through any
    /// gateway: signed with the operator's certificate and key, flooded to every gateway, then
    /// followed until each has applied or refused it. Exit 0 when every gateway applied it, 1 when
    /// one refused it, it was superseded or the wait ran out, 2 on a bad document or usage.
    Apply {
        /// The document (YAML).
        #[arg(long, short = 'f')]
        file: PathBuf,
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: std::net::SocketAddr,
        /// The publisher's certificate chain (PEM): a SPIFFE ID listed in `control.publishers`.
        #[arg(long)]
        cert: PathBuf,
        #[arg(long)]
        key: PathBuf,
        /// The version to publish (default: one more than the gateway holds).
        #[arg(long)]
        version: Option<u64>,
        /// Print which sections apply in which zone, and publish nothing.
        #[arg(long)]
        dry_run: bool,
        /// How long to wait for every gateway's report (0s: do not wait).
        #[arg(long, default_value = "10s")]
        wait: String,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Print the decision a gateway's `authorization` makes for a caller, and the policy and rule
    /// that make it: from a configuration file, or asked of a running gateway's admin API. Exit 0
    /// when the call would pass, 1 when denied, 2 on a bad configuration or request.
    Explain {
        /// The destination gateway's configuration.
        #[arg(long, short, required_unless_present = "admin", conflicts_with = "admin")]
        config: Option<PathBuf>,
        /// The destination gateway's admin address (its running policy, after any reloads).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// The exported service called.
        #[arg(long)]
        service: String,
        /// The caller's SPIFFE ID.
        #[arg(long)]
        identity: String,
        /// The caller's zone.
        #[arg(long)]
        zone: Option<String>,
        /// The caller's address.
        #[arg(long)]
        address: Option<std::net::IpAddr>,
        /// The port called (default: the service's exported port).
        #[arg(long)]
        port: Option<u16>,
        /// For an HTTP request: its method (without it, a TCP flow).
        #[arg(long)]
        method: Option<String>,
        #[arg(long, default_value = "/")]
        path: String,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create a CA (ECDSA P-256): DIR/ca.crt and DIR/ca.key.
    Init {
        #[arg(long)]
        trust_domain: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 3650)]
        days: u64,
    },
    /// Issue a certificate for a SPIFFE ID: DIR/cert.pem (chain), DIR/key.pem, DIR/ca.crt.
    Issue {
        #[arg(long)]
        ca: PathBuf,
        #[arg(long)]
        id: String,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
}

/// jemalloc: fewer cycles per request than glibc malloc under the gateway's allocation pattern
/// (BENCHMARKS.md, B11 profile).
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Check { config: Some(config), .. } => check(&config),
        Cmd::Policy {
            cmd: PolicyCmd::Explain { config, admin, service, identity, zone, address, port, method, path },
        } => {
            let q = Explain { service, identity, zone, address, port, method, path };
            let answer = match (config, admin) {
                (Some(config), _) => explain_file(&config, &q),
                (None, Some(admin)) => explain_admin(admin, &q),
                (None, None) => Err("--config or --admin: required".to_string()),
            };
            match answer {
                Ok(v) => print_explained(&v),
                Err(why) => {
                    eprintln!("{why}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Check { redirect: Some(path), .. } => check_redirect(&path),
        Cmd::Check { .. } => ExitCode::from(2),
        Cmd::Redirect { cleanup: true, .. } => match causeway::redirect::iptables::cleanup() {
            Ok(n) => {
                println!("removed {n} iptables rule(s) tagged {}", causeway::redirect::iptables::TAG);
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cleanup: {e:#}");
                ExitCode::FAILURE
            }
        },
        Cmd::Redirect { config: Some(config), workers, .. } => redirect(&config, workers),
        Cmd::Redirect { .. } => ExitCode::from(2),
        Cmd::Gateway { config, workers } => gateway(&config, workers),
        Cmd::Certs { cmd } => certs_cmd(cmd),
        Cmd::Demo { flows, bytes } => {
            telemetry::init(LogFormat::Text, "warn");
            match runtime(None).and_then(|rt| rt.block_on(causeway::demo::run(flows, bytes))) {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("demo failed: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Apply { file, admin, cert, key, version, dry_run, wait } => {
            let Ok(wait) = causeway::parse::duration(&wait) else {
                eprintln!("--wait: {wait:?} is not a duration");
                return ExitCode::from(2);
            };
            let a = ApplyArgs { file, admin, cert, key, version, dry_run, wait };
            match runtime(Some(1)).and_then(|rt| rt.block_on(apply(a))) {
                Ok(code) => code,
                Err(e) => {
                    eprintln!("apply: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Status { admin, mesh: true } => {
            let view = runtime(Some(1)).and_then(|rt| rt.block_on(causeway::control::publish::mesh_view(admin)));
            match view {
                Ok(v) => {
                    print!("{}", causeway::control::publish::render(&v));
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("status: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Cmd::Status { admin, .. } => match runtime(Some(1)).and_then(|rt| rt.block_on(status(admin))) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("status: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

/// `--workers 1` runs everything on the main thread (no cross-thread wake-ups: the cheapest setup on
/// a small node, like one HAProxy thread); otherwise a work-stealing pool of that many threads
/// (default: one per core).
fn runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut b = match workers {
        Some(0 | 1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    Ok(b.enable_all().build()?)
}

/// Loads and validates a config and its TLS files, printing every error.
fn load(
    path: &std::path::Path,
) -> Result<(config::Config, causeway_overlay::Credentials, causeway_overlay::TrustBundle), ExitCode> {
    let cfg = config::load(path).map_err(|e| {
        eprint!("{e}");
        ExitCode::from(2)
    })?;
    let (creds, bundle) = app::load_tls(&cfg).map_err(|errors| {
        eprint!("{}", config::ConfigErrors { file: path.display().to_string(), errors });
        ExitCode::from(2)
    })?;
    Ok((cfg, creds, bundle))
}

/// A caller to explain (`causeway policy explain`).
struct Explain {
    service: String,
    identity: String,
    zone: Option<String>,
    address: Option<std::net::IpAddr>,
    port: Option<u16>,
    method: Option<String>,
    path: String,
}

/// The decision of the `authorization` in a configuration file.
fn explain_file(config: &std::path::Path, q: &Explain) -> Result<serde_json::Value, String> {
    use causeway::policy::{HttpSubject, Subject};
    let cfg = causeway::config::load(config).map_err(|e| e.to_string())?;
    let service = causeway_protocol::ServiceName::new(&q.service).map_err(|e| format!("--service: {e}"))?;
    let identity = causeway_protocol::Identity::parse(&q.identity).map_err(|e| format!("--identity: {e}"))?;
    let port = q.port.or_else(|| cfg.snapshot.exports.iter().find(|x| x.name == service).map(|x| x.port));
    let headers = http::HeaderMap::new();
    let s = Subject {
        service: Some(&service),
        identity: Some(&identity),
        zone: q.zone.as_deref(),
        addr: q.address,
        port,
        http: q.method.as_deref().map(|method| HttpSubject { method, path: &q.path, headers: &headers }),
    };
    Ok(cfg.snapshot.authorization.explain(&s))
}

/// The decision of a running gateway's policy, from its admin API (`/policy/explain`).
fn explain_admin(admin: std::net::SocketAddr, q: &Explain) -> Result<serde_json::Value, String> {
    let mut query = form_urlencoded::Serializer::new(String::new());
    query.append_pair("service", &q.service).append_pair("identity", &q.identity).append_pair("path", &q.path);
    for (k, v) in [
        ("zone", q.zone.clone()),
        ("address", q.address.map(|a| a.to_string())),
        ("port", q.port.map(|p| p.to_string())),
        ("method", q.method.clone()),
    ] {
        if let Some(v) = v {
            query.append_pair(k, &v);
        }
    }
    let path = format!("/policy/explain?{}", query.finish());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
    match rt.block_on(causeway::admin::get(admin, &path)) {
        Ok((200, body)) => serde_json::from_str(&body).map_err(|e| format!("{admin}: not an explanation: {e}")),
        Ok((code, body)) => Err(format!("{admin}: {code} {}", body.trim())),
        Err(e) => Err(format!("{admin}: {e:#}")),
    }
}

/// Prints an explanation; exit 0 when the call passes, 1 when it is denied.
fn print_explained(v: &serde_json::Value) -> ExitCode {
    let text = |k: &str| v[k].as_str().unwrap_or_default().to_string();
    let decision = match text("decision").as_str() {
        "audit" => "audit (would deny; audit mode lets it pass)".to_string(),
        d => d.to_string(),
    };
    println!("decision: {decision}");
    match v["rule"].as_u64() {
        Some(r) => println!("policy:   {} (rule {r})", text("policy")),
        None => println!("policy:   {} (no rule matched)", text("policy")),
    }
    println!("reason:   {}", text("reason"));
    let audited: Vec<&str> = v["audited"].as_array().into_iter().flatten().filter_map(|a| a.as_str()).collect();
    if !audited.is_empty() {
        println!("audited:  {}", audited.join(", "));
    }
    if v["passes"].as_bool() == Some(true) {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn check(path: &std::path::Path) -> ExitCode {
    match load(path) {
        Ok((cfg, creds, _)) => {
            let id = creds.identity().map(|i| i.to_string()).unwrap_or_default();
            println!(
                "{}: ok (zone {}, gateway {}, identity {id}, {} peers, {} exports, {} imports)",
                path.display(),
                cfg.fixed.zone,
                cfg.fixed.gateway,
                cfg.snapshot.peers.len(),
                cfg.snapshot.exports.len(),
                cfg.snapshot.imports.len()
            );
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn gateway(path: &std::path::Path, workers: Option<usize>) -> ExitCode {
    let (cfg, creds, bundle) = match load(path) {
        Ok(x) => x,
        Err(code) => return code,
    };
    telemetry::init(cfg.fixed.log_format, &cfg.fixed.log_level);
    tracing::info!(config = ?cfg, "config.effective");
    let rt = match runtime(workers) {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("runtime: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async {
        let gw = match app::Gateway::start(&cfg, creds, bundle).await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "gateway.start.failed");
                return ExitCode::FAILURE;
            }
        };
        gw.watch_config(path.to_path_buf(), cfg.fixed.tls.watch_interval);
        wait_for_signal().await;
        tracing::info!(deadline = ?cfg.fixed.timing.drain_timeout, "gateway.draining");
        let cut = gw.drain(cfg.fixed.timing.drain_timeout).await;
        tracing::info!(flows_cut = cut, "gateway.stopped");
        ExitCode::SUCCESS
    })
}

use causeway::wait_for_signal;

fn load_redirect(path: &std::path::Path) -> Result<causeway::redirect::RedirectConfig, ExitCode> {
    causeway::redirect::load(path).map_err(|e| {
        eprint!("{e}");
        ExitCode::from(2)
    })
}

fn check_redirect(path: &std::path::Path) -> ExitCode {
    let cfg = match load_redirect(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    match causeway::redirect::check(&cfg) {
        Ok(id) => {
            println!(
                "{}: ok (redirector {id}, gateway {} at {}, VIPs {})",
                path.display(),
                cfg.gateway_id,
                cfg.gateway,
                cfg.vip_range
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            eprint!("{}", config::ConfigErrors { file: path.display().to_string(), errors });
            ExitCode::from(2)
        }
    }
}

fn redirect(path: &std::path::Path, workers: Option<usize>) -> ExitCode {
    let cfg = match load_redirect(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Err(errors) = causeway::redirect::check(&cfg) {
        eprint!("{}", config::ConfigErrors { file: path.display().to_string(), errors });
        return ExitCode::from(2);
    }
    telemetry::init(cfg.log_format, &cfg.log_level);
    let res = runtime(workers).and_then(|rt| rt.block_on(causeway::redirect::run(cfg)));
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("redirect: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn certs_cmd(cmd: CertsCmd) -> ExitCode {
    let days = |d: u64| Duration::from_secs(d.saturating_mul(86_400));
    let res = match cmd {
        CertsCmd::Init { trust_domain, out, days: d } => match TrustDomain::new(&trust_domain) {
            Ok(td) => certs::init_dir(&td, &out, days(d)).map(|_| println!("CA for {td} written to {}", out.display())),
            Err(e) => {
                eprintln!("--trust-domain: {e}");
                return ExitCode::from(2);
            }
        },
        CertsCmd::Issue { ca, id, out, days: d } => match Identity::parse(&id) {
            Ok(id) => certs::issue_dir(&ca, &id, &out, days(d))
                .map(|_| println!("certificate for {id} written to {}", out.display())),
            Err(e) => {
                eprintln!("--id: {e}");
                return ExitCode::from(2);
            }
        },
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("certs: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn status(admin: std::net::SocketAddr) -> anyhow::Result<()> {
    let (code, body) = causeway::admin::get(admin, "/topology.json").await?;
    anyhow::ensure!(code == 200, "{admin} answered {code} for /topology.json: {}", body.trim());
    let t: serde_json::Value = serde_json::from_str(&body)?;
    print!("{}", causeway::admin::topology::render_text(&t));
    Ok(())
}

struct ApplyArgs {
    file: PathBuf,
    admin: std::net::SocketAddr,
    cert: PathBuf,
    key: PathBuf,
    version: Option<u64>,
    dry_run: bool,
    wait: Duration,
}

/// `causeway apply`: see [`Cmd::Apply`].
async fn apply(a: ApplyArgs) -> anyhow::Result<ExitCode> {
    use causeway::control::publish;
    let text = match std::fs::read_to_string(&a.file) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", a.file.display());
            return Ok(ExitCode::from(2));
        }
    };
    let doc = match causeway::control::parse_document(&text) {
        Ok(d) => d,
        Err(errors) => {
            for e in errors {
                eprintln!("{}: {e}", a.file.display());
            }
            return Ok(ExitCode::from(2));
        }
    };
    let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("cannot read {}", p.display()));
    let creds = certs::credentials_from_pem(&read(&a.cert)?, &read(&a.key)?)?;
    let publisher = creds.identity()?;
    let view = publish::mesh_view(a.admin).await?;
    let version = a.version.unwrap_or_else(|| publish::next_version(&view));
    if a.dry_run {
        println!("document version {version}, publisher {publisher} (dry run: nothing published)");
        let mut zones: Vec<String> = view["gateways"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["zone"].as_str().map(str::to_string))
            .chain(doc.zones().map(|z| z.to_string()))
            .collect();
        zones.sort();
        zones.dedup();
        for z in zones {
            let Ok(zone) = causeway_protocol::ZoneName::new(&z) else { continue };
            let from: Vec<String> =
                doc.sections_for(&zone).into_iter().map(|(k, _, at)| format!("{k} <- {at}")).collect();
            println!(
                "zone {z}: {}",
                if from.is_empty() { "nothing (its files decide)".into() } else { from.join(", ") }
            );
        }
        println!("each gateway validates the merge with its own file when the document arrives");
        return Ok(ExitCode::SUCCESS);
    }
    let signed = match publish::sign(&creds, version, &text) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{}: {e:#}", a.file.display());
            return Ok(ExitCode::from(2));
        }
    };
    let (code, answer) = publish::post(a.admin, &signed).await?;
    if code != 200 {
        eprintln!(
            "refused by {}: {} ({})",
            a.admin,
            answer["reason"].as_str().unwrap_or("?"),
            answer["detail"].as_str().unwrap_or("")
        );
        return Ok(ExitCode::FAILURE);
    }
    let digest = answer["digest"].as_str().unwrap_or_default().to_string();
    println!("published version {version} ({}), digest {digest}", answer["result"].as_str().unwrap_or(""));
    if a.wait.is_zero() {
        return Ok(ExitCode::SUCCESS);
    }
    let (outcome, view) = publish::follow(a.admin, version, &digest, a.wait).await?;
    print!("{}", publish::render(&view));
    Ok(match outcome {
        publish::Outcome::Applied => ExitCode::SUCCESS,
        publish::Outcome::Refused => {
            eprintln!("refused by some gateways (reasons above): they keep what they had");
            ExitCode::FAILURE
        }
        publish::Outcome::Superseded { by } => {
            eprintln!("superseded: version {by} won over this one");
            ExitCode::FAILURE
        }
        publish::Outcome::Pending => {
            eprintln!("not every gateway reported within {:?}", a.wait);
            ExitCode::FAILURE
        }
    })
}
