//! The rules a gateway decides requests and flows by — HTTP routes, endpoint options,
//! authorization policies and rate limits — built from one configuration snapshot and installed
//! whole ([`crate::policy::Enforcer::install`]). A request or flow loads them once and decides
//! everything by that one set, so it never sees one snapshot's routes with another's policy.
//!
//! Data only: the enforcer holds the set in force, the HTTP side and the overlay's authorizer read it.

use std::collections::HashMap;
use std::sync::Arc;

use causeway_protocol::ServiceName;

use crate::http::routes::HttpRoute;
use crate::http::HttpOptions;
use crate::policy::Policies;
use crate::ratelimit::{LimitSpec, RateLimits};

/// One complete set of rules (see the module docs).
pub struct Rules {
    pub routes: Vec<HttpRoute>,
    /// How each exported `http` service's endpoints are spoken to.
    pub options: HashMap<ServiceName, HttpOptions>,
    pub policies: Policies,
    /// The running limits; kept (with their buckets and open-flow counts) by an install whose
    /// limits are unchanged.
    pub limits: Arc<RateLimits>,
    /// What `limits` was built from.
    pub limit_specs: Vec<LimitSpec>,
}

impl Rules {
    /// The endpoint protocol and breakers of an exported `http` service.
    pub fn options(&self, service: &ServiceName) -> HttpOptions {
        self.options.get(service).cloned().unwrap_or_default()
    }
}

/// What [`crate::policy::Enforcer::install`] builds [`Rules`] from (a snapshot's parts).
#[derive(Clone, Copy)]
pub struct RuleSpec<'a> {
    pub routes: &'a [HttpRoute],
    pub options: &'a HashMap<ServiceName, HttpOptions>,
    pub policies: &'a Policies,
    pub rate_limits: &'a [LimitSpec],
    pub rate_limit_store: Option<&'a crate::ratelimit::store::StoreSpec>,
}
