//! Mesh DNS: answers `A` queries for `<service>.<suffix>` with the service's VIP, NXDOMAIN for
//! unknown mesh names, an empty answer for other record types of mesh names, and forwards every
//! other query, unchanged, to the upstream resolver. Parsing and encoding are hickory-proto's.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use causeway_overlay::metrics::{Metrics, DNS_QUERIES};
use causeway_overlay::redirector::Redirector;
use causeway_protocol::ServiceName;
use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{RData, Record, RecordType};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

/// Largest query accepted over UDP (RFC 6891 suggests 1,232 bytes for EDNS; 4 KiB leaves room).
const MAX_QUERY: usize = 4096;
/// Forwarded queries in flight; beyond it queries are dropped (the client retries).
const MAX_FORWARDS: usize = 256;
const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

pub struct MeshDns {
    socket: Arc<UdpSocket>,
    suffix: String,
    upstream: SocketAddr,
    ttl: u32,
}

impl MeshDns {
    pub async fn bind(addr: SocketAddr, suffix: &str, upstream: SocketAddr, ttl: Duration) -> std::io::Result<Self> {
        let socket = Arc::new(UdpSocket::bind(addr).await?);
        let suffix = format!(".{}.", suffix.trim_matches('.').to_ascii_lowercase());
        Ok(Self { socket, suffix, upstream, ttl: ttl.as_secs().min(u64::from(u32::MAX)) as u32 })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    pub async fn run(self, redirector: Redirector, metrics: Metrics, stop: CancellationToken) {
        let forwards = Arc::new(Semaphore::new(MAX_FORWARDS));
        let mut buf = vec![0u8; MAX_QUERY];
        loop {
            let (n, client) = tokio::select! {
                r = self.socket.recv_from(&mut buf) => match r {
                    Ok(x) => x,
                    Err(_) => continue,
                },
                _ = stop.cancelled() => return,
            };
            let query = &buf[..n];
            let count = |result: &'static str| metrics.counter(DNS_QUERIES, &[("result", result)]).increment(1);
            let table = redirector.table();
            match handle(query, &self.suffix, self.ttl, |s| table.vips.vip(s)) {
                Handling::Malformed => count("malformed"),
                Handling::Answer(bytes, result) => {
                    count(result);
                    let _ = self.socket.send_to(&bytes, client).await;
                }
                Handling::Forward(id) => {
                    let Ok(permit) = forwards.clone().try_acquire_owned() else {
                        count("dropped");
                        continue;
                    };
                    let (socket, upstream, query) = (self.socket.clone(), self.upstream, query.to_vec());
                    let m = metrics.clone();
                    tokio::spawn(async move {
                        let result = match forward(&query, upstream, id).await {
                            Some(resp) => {
                                let _ = socket.send_to(&resp, client).await;
                                "forwarded"
                            }
                            None => "forward_failed",
                        };
                        m.counter(DNS_QUERIES, &[("result", result)]).increment(1);
                        drop(permit);
                    });
                }
            }
        }
    }
}

/// What mesh DNS does with one datagram from a pod.
#[derive(Debug, PartialEq, Eq)]
pub enum Handling {
    /// Not a DNS message: dropped, counted.
    Malformed,
    /// A mesh name: this reply (encoded), counted under this result.
    Answer(Vec<u8>, &'static str),
    /// Anything else: forwarded unchanged to the upstream resolver; the answer must carry this ID.
    Forward(u16),
}

/// Decides what to do with `query` (pure: the fuzz target `mesh_dns` drives it). `suffix` is the
/// mesh suffix as `.mesh.`; `vip` looks a service up in the VIP table.
pub fn handle(query: &[u8], suffix: &str, ttl: u32, vip: impl Fn(&ServiceName) -> Option<Ipv4Addr>) -> Handling {
    let Ok(msg) = Message::from_vec(query) else { return Handling::Malformed };
    match answer(&msg, suffix, ttl, vip).map(|(reply, result)| (reply.to_vec(), result)) {
        Some((Ok(bytes), result)) => Handling::Answer(bytes, result),
        Some((Err(_), _)) => Handling::Malformed,
        None => Handling::Forward(msg.metadata.id),
    }
}

/// The reply to a mesh name, or `None` when the query is for the upstream resolver.
fn answer(
    msg: &Message,
    suffix: &str,
    ttl: u32,
    vip: impl Fn(&ServiceName) -> Option<Ipv4Addr>,
) -> Option<(Message, &'static str)> {
    if msg.metadata.message_type != MessageType::Query || msg.metadata.op_code != OpCode::Query {
        return None;
    }
    let [q] = msg.queries.as_slice() else { return None };
    let name = q.name().to_lowercase().to_ascii();
    let fqdn = if name.ends_with('.') { name } else { format!("{name}.") };
    let service = fqdn.strip_suffix(suffix)?;
    let mut reply = Message::response(msg.metadata.id, OpCode::Query);
    reply.metadata.recursion_desired = msg.metadata.recursion_desired;
    reply.metadata.recursion_available = true;
    reply.metadata.authoritative = true;
    reply.add_query(q.clone());
    let Some(addr) = ServiceName::new(service).ok().and_then(|s| vip(&s)) else {
        reply.metadata.response_code = ResponseCode::NXDomain;
        return Some((reply, "mesh_nxdomain"));
    };
    if q.query_type() != RecordType::A {
        // The name exists, with no record of this type (NODATA).
        return Some((reply, "mesh_nodata"));
    }
    reply.add_answer(Record::from_rdata(q.name().clone(), ttl, RData::A(A(addr))));
    Some((reply, "mesh_a"))
}

/// Sends a query to the upstream resolver from a fresh socket and returns its answer.
async fn forward(query: &[u8], upstream: SocketAddr, id: u16) -> Option<Vec<u8>> {
    let bind = if upstream.is_ipv4() { SocketAddr::from(([0, 0, 0, 0], 0)) } else { SocketAddr::from(([0u16; 8], 0)) };
    let sock = UdpSocket::bind(bind).await.ok()?;
    sock.connect(upstream).await.ok()?;
    sock.send(query).await.ok()?;
    let mut buf = vec![0u8; 65_535];
    let exchange = async {
        loop {
            let n = sock.recv(&mut buf).await.ok()?;
            // Ignore anything that is not the answer to this query (a spoofing attempt or a stray).
            if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == id {
                return Some(buf[..n].to_vec());
            }
        }
    };
    tokio::time::timeout(FORWARD_TIMEOUT, exchange).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for label in name.split('.').filter(|l| !l.is_empty()) {
            q.push(label.len() as u8);
            q.extend_from_slice(label.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&[0, 1]);
        q
    }

    fn table(s: &ServiceName) -> Option<Ipv4Addr> {
        (s.as_str() == "orders.shop").then_some(Ipv4Addr::new(240, 240, 0, 7))
    }

    #[test]
    fn mesh_names_are_answered_and_others_forwarded() {
        let Handling::Answer(reply, "mesh_a") = handle(&query("Orders.Shop.mesh", 1), ".mesh.", 5, table) else {
            panic!("no A answer")
        };
        let reply = Message::from_vec(&reply).unwrap();
        assert_eq!(reply.metadata.id, 0x1234);
        assert_eq!(reply.answers.len(), 1);
        assert!(matches!(
            handle(&query("nope.shop.mesh", 1), ".mesh.", 5, table),
            Handling::Answer(_, "mesh_nxdomain")
        ));
        assert!(matches!(
            handle(&query("orders.shop.mesh", 28), ".mesh.", 5, table),
            Handling::Answer(_, "mesh_nodata")
        ));
        assert_eq!(handle(&query("example.com", 1), ".mesh.", 5, table), Handling::Forward(0x1234));
        assert_eq!(handle(b"\x12", ".mesh.", 5, table), Handling::Malformed);
    }
}
