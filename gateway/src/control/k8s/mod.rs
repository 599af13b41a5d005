//! The Kubernetes source of configuration (issue 24, in progress): the Multi-Cluster Services
//! objects of the gateway's cluster, turned into exports by the pure [`model`].

pub mod model;
