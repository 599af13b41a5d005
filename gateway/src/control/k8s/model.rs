//! What a cluster's Multi-Cluster Services objects mean for this gateway, decided without I/O:
//! `ServiceExport`s, with their Services and EndpointSlices, become exports (ready endpoints only,
//! ports by name, protocol from `appProtocol`, labels for HTTP subsets) and the status conditions
//! each `ServiceExport` should carry. The watchers (`super`) feed it plain values; unit tests
//! cover every rule without an API server.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use causeway_overlay::{Endpoint, Export};
use causeway_protocol::control::Protocol;
use causeway_protocol::ServiceName;

/// A Service's port, as the model needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    pub name: Option<String>,
    pub port: u16,
    pub app_protocol: Option<String>,
}

/// A Service, as the model needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// `ClusterIP`, `NodePort`, `LoadBalancer`, `ExternalName`.
    pub kind: String,
    pub ports: Vec<ServicePort>,
    pub labels: BTreeMap<String, String>,
}

/// An EndpointSlice of a Service (label `kubernetes.io/service-name`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slice {
    pub namespace: String,
    pub service: String,
    /// (port name, port number) as the slice lists them.
    pub ports: Vec<(Option<String>, u16)>,
    /// Each endpoint's addresses and whether it is ready (`conditions.ready`, absent = ready).
    pub endpoints: Vec<(Vec<IpAddr>, bool)>,
}

/// One status condition of a `ServiceExport` (MCS API, KEP-1645).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    /// `Valid`, `Ready` or `Conflict`.
    pub kind: &'static str,
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

/// What one `ServiceExport` became.
#[derive(Debug, Clone, PartialEq)]
pub struct Exported {
    pub namespace: String,
    pub name: String,
    /// The export, when the `ServiceExport` is valid.
    pub export: Option<Export>,
    pub conditions: Vec<Condition>,
}

/// The mesh name of Service `name` in `namespace`: `<name>.<namespace>`.
pub fn mesh_name(namespace: &str, name: &str) -> Option<ServiceName> {
    ServiceName::new(&format!("{name}.{namespace}")).ok()
}

/// `appProtocol` → how the overlay carries the service: HTTP for `http`, `kubernetes.io/h2c` and
/// `grpc` (each request routed on its own), else TCP.
pub fn protocol(app_protocol: Option<&str>) -> Protocol {
    match app_protocol.map(str::to_ascii_lowercase).as_deref() {
        Some("http" | "kubernetes.io/h2c" | "grpc" | "http2") => Protocol::Http,
        _ => Protocol::Tcp,
    }
}

fn condition(kind: &'static str, status: bool, reason: &'static str, message: impl Into<String>) -> Condition {
    Condition { kind, status, reason, message: message.into() }
}

/// Decides every `ServiceExport` (namespace, name) against the Services and slices in the cache.
/// A Service with several ports is exported on its first one (the overlay advertises one port per
/// service); the others are named in the `Valid` message.
pub fn exports(service_exports: &[(String, String)], services: &[Service], slices: &[Slice]) -> Vec<Exported> {
    let mut out = Vec::new();
    for (ns, name) in service_exports {
        let mut e = Exported { namespace: ns.clone(), name: name.clone(), export: None, conditions: Vec::new() };
        let Some(svc) = services.iter().find(|s| &s.namespace == ns && &s.name == name) else {
            e.conditions.push(condition("Valid", false, "NoService", format!("no Service {ns}/{name}")));
            out.push(e);
            continue;
        };
        if svc.kind == "ExternalName" {
            e.conditions.push(condition(
                "Valid",
                false,
                "InvalidServiceType",
                "an ExternalName Service cannot be exported",
            ));
            out.push(e);
            continue;
        }
        let Some(mesh) = mesh_name(ns, name) else {
            e.conditions.push(condition(
                "Valid",
                false,
                "InvalidName",
                format!("{name}.{ns} is not a mesh service name"),
            ));
            out.push(e);
            continue;
        };
        let Some(port) = svc.ports.first() else {
            e.conditions.push(condition("Valid", false, "NoPorts", "the Service has no ports"));
            out.push(e);
            continue;
        };
        let mut endpoints = Vec::new();
        for s in slices.iter().filter(|s| &s.namespace == ns && &s.service == name) {
            // The slice's port for the Service's port: by name (both unnamed when the Service has
            // a single unnamed port).
            let Some(target) = s.ports.iter().find(|(n, _)| *n == port.name).map(|(_, p)| *p) else { continue };
            for (addrs, ready) in &s.endpoints {
                if *ready {
                    endpoints.extend(addrs.iter().map(|ip| Endpoint::Addr(SocketAddr::new(*ip, target))));
                }
            }
        }
        endpoints.sort_by_key(|e| e.to_string());
        endpoints.dedup();
        let others: Vec<String> =
            svc.ports[1..].iter().map(|p| p.name.clone().unwrap_or_else(|| p.port.to_string())).collect();
        let message = if others.is_empty() {
            format!("exported as {mesh}:{}", port.port)
        } else {
            format!("exported as {mesh}:{} (ports {} are not exported)", port.port, others.join(", "))
        };
        e.conditions.push(condition("Valid", true, "Valid", message));
        e.conditions.push(if endpoints.is_empty() {
            condition("Ready", false, "NoReadyEndpoints", "no ready endpoint")
        } else {
            condition("Ready", true, "Ready", format!("{} ready endpoints", endpoints.len()))
        });
        e.conditions.push(condition("Conflict", false, "NoConflicts", ""));
        e.export = Some(Export {
            name: mesh,
            protocol: protocol(port.app_protocol.as_deref()),
            port: port.port,
            endpoints,
            labels: svc.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        });
        out.push(e);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(name: &str, ports: &[(Option<&str>, u16, Option<&str>)]) -> Service {
        Service {
            namespace: "shop".into(),
            name: name.into(),
            kind: "ClusterIP".into(),
            ports: ports
                .iter()
                .map(|(n, p, a)| ServicePort { name: n.map(Into::into), port: *p, app_protocol: a.map(Into::into) })
                .collect(),
            labels: BTreeMap::from([("version".to_string(), "v1".to_string())]),
        }
    }

    fn slice(service: &str, port: (Option<&str>, u16), eps: &[(&str, bool)]) -> Slice {
        Slice {
            namespace: "shop".into(),
            service: service.into(),
            ports: vec![(port.0.map(Into::into), port.1)],
            endpoints: eps.iter().map(|(ip, r)| (vec![ip.parse().unwrap()], *r)).collect(),
        }
    }

    #[test]
    fn ready_endpoints_of_every_slice_on_the_named_port_are_exported_with_the_services_labels() {
        let services = [svc("reviews", &[(Some("http"), 80, Some("http")), (Some("admin"), 9000, None)])];
        let slices = [
            slice("reviews", (Some("http"), 8080), &[("10.0.0.1", true), ("10.0.0.2", false)]),
            slice("reviews", (Some("http"), 8080), &[("10.0.0.3", true)]),
            slice("reviews", (Some("admin"), 9001), &[("10.0.0.9", true)]),
            slice("other", (Some("http"), 8080), &[("10.0.0.8", true)]),
        ];
        let out = exports(&[("shop".into(), "reviews".into())], &services, &slices);
        let x = out[0].export.as_ref().unwrap();
        assert_eq!((x.name.as_str(), x.port, x.protocol), ("reviews.shop", 80, Protocol::Http));
        let eps: Vec<String> = x.endpoints.iter().map(|e| e.to_string()).collect();
        assert_eq!(eps, ["10.0.0.1:8080", "10.0.0.3:8080"]);
        assert_eq!(x.labels, [("version".to_string(), "v1".to_string())]);
        let c: Vec<_> = out[0].conditions.iter().map(|c| (c.kind, c.status, c.reason)).collect();
        assert_eq!(c, [("Valid", true, "Valid"), ("Ready", true, "Ready"), ("Conflict", false, "NoConflicts")]);
        assert!(out[0].conditions[0].message.contains("admin"), "{:?}", out[0].conditions);
    }

    #[test]
    fn a_missing_or_external_service_is_invalid_and_one_without_ready_endpoints_is_not_ready() {
        let mut ext = svc("ext", &[(None, 80, None)]);
        ext.kind = "ExternalName".into();
        let services = [ext, svc("idle", &[(None, 6379, None)])];
        let slices = [slice("idle", (None, 6379), &[("10.0.0.5", false)])];
        let se = [("shop".into(), "gone".into()), ("shop".into(), "ext".into()), ("shop".into(), "idle".into())];
        let out = exports(&se, &services, &slices);
        let first = |i: usize| (out[i].conditions[0].kind, out[i].conditions[0].status, out[i].conditions[0].reason);
        assert_eq!(first(0), ("Valid", false, "NoService"));
        assert_eq!(first(1), ("Valid", false, "InvalidServiceType"));
        assert!(out[0].export.is_none() && out[1].export.is_none());
        let idle = out[2].export.as_ref().unwrap();
        assert!(idle.endpoints.is_empty());
        assert_eq!(idle.protocol, Protocol::Tcp);
        assert_eq!((out[2].conditions[1].kind, out[2].conditions[1].status), ("Ready", false));
    }
}
