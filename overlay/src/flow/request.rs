//! HTTP requests across the overlay: each request of an `http` service is its own HTTP/3 request
//! on the peer connection (not a CONNECT tunnel), so one slow response never holds up another.
//!
//! The overlay only carries them: the gateway asks where a service can be served
//! ([`Mesh::http_candidates`]) and opens a request toward the peer it chose ([`Mesh::open_http`]);
//! a peer's requests reach the gateway's `HttpHandler` through the node's dispatch. Parsing client
//! HTTP, routes, load balancing and talking to endpoints are the gateway's (`causeway::http`).

use causeway_protocol::control::ServiceAd;
use causeway_protocol::flow::FlowError;
use causeway_protocol::{Identity, ServiceName, ZoneName};

use crate::core::route_table::{PeerState, Target};
use crate::ports::ClientStream;
use crate::state::{ConnFlow, Mesh};

/// A candidate for a request: where, and the labels it advertised for the service.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub target: Target,
    pub zone: ZoneName,
    pub labels: Vec<(String, String)>,
}

impl Mesh {
    /// Where `service` can be served now, best first (as for flows: local, then preferred zones,
    /// then by RTT), with the labels each place advertised.
    pub fn http_candidates(&self, service: &ServiceName) -> Vec<Candidate> {
        let routes = self.routes();
        let local_labels = |ad: Option<&ServiceAd>| ad.map(|a| a.labels.clone()).unwrap_or_default();
        routes
            .candidates(service)
            .into_iter()
            .filter_map(|t| match &t {
                Target::Local => Some(Candidate {
                    zone: self.zone().clone(),
                    labels: local_labels(routes.local().find(|a| &a.name == service)),
                    target: t,
                }),
                Target::Peer(id) => {
                    let e = routes.peer(id).filter(|e| e.state == PeerState::Up)?;
                    Some(Candidate { zone: e.zone.clone()?, labels: local_labels(e.services.get(service)), target: t })
                }
            })
            .collect()
    }

    /// The port `peer` advertised for `service` (the request's `:authority` port).
    pub fn advertised_port(&self, peer: &Identity, service: &ServiceName) -> Option<u16> {
        self.routes().peer(peer)?.services.get(service).map(|a| a.port)
    }

    /// Opens an HTTP/3 request toward `peer` (its headers are sent; the body and the response are
    /// the caller's). The connection is kept open for the request's life.
    pub async fn open_http(
        &self,
        peer: &Identity,
        req: http::Request<()>,
    ) -> Result<(ClientStream, ConnFlow), FlowError> {
        let (mut requests, held) = self.peer_table().requests(peer).ok_or(FlowError::NoHealthyEndpoint)?;
        let stream = requests.send_request(req).await.map_err(|_| FlowError::BackendRefused)?;
        Ok((stream, held))
    }
}
