//! Where a gateway's configuration snapshot comes from, and how the sources merge: its own file
//! and mesh-wide documents (README "Mesh-wide documents").
//!
//! Precedence, key by key: a document's section for this gateway's zone (`zones.<zone>.<key>`),
//! else the document's mesh-wide section (`<key>`), else the file. A section the document sets
//! replaces the file's whole key. The merged YAML is validated exactly as `causeway check`
//! validates a file, so a document that does not fit a zone (it names a service that zone does not
//! export, say) is refused there, with the key path, and nothing of it applies.

pub mod documents;
pub mod k8s;
pub mod publish;

use std::collections::BTreeMap;
use std::sync::Arc;

use causeway_protocol::ZoneName;
use serde::Deserialize;
use serde_yaml_ng::Value;

use crate::config::{Config, ConfigError};
use crate::parse::from_yaml;

/// The keys a mesh-wide document may set.
pub const SECTIONS: [&str; 4] = ["http_routes", "authorization", "rate_limits", "client_allowlists"];

#[derive(Debug, Default, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSections {
    http_routes: Option<Value>,
    authorization: Option<Value>,
    rate_limits: Option<Value>,
    client_allowlists: Option<Value>,
}

impl RawSections {
    fn get(&self, key: &str) -> Option<&Value> {
        match key {
            "http_routes" => self.http_routes.as_ref(),
            "authorization" => self.authorization.as_ref(),
            "rate_limits" => self.rate_limits.as_ref(),
            "client_allowlists" => self.client_allowlists.as_ref(),
            _ => None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDocument {
    http_routes: Option<Value>,
    authorization: Option<Value>,
    rate_limits: Option<Value>,
    client_allowlists: Option<Value>,
    #[serde(default)]
    zones: BTreeMap<String, RawSections>,
}

/// A parsed mesh-wide document: sections for every zone, and per-zone ones that win over them.
#[derive(Debug, Clone, PartialEq)]
pub struct MeshDocument {
    mesh: RawSections,
    zones: BTreeMap<ZoneName, RawSections>,
}

/// Parses a document's YAML: only [`SECTIONS`] and `zones.<zone>.<section>`; each section's
/// content is checked when it is merged with a gateway's file ([`compose`]).
pub fn parse_document(text: &str) -> Result<MeshDocument, Vec<ConfigError>> {
    let raw: RawDocument = from_yaml(text)?;
    let mut errors = Vec::new();
    let mut zones = BTreeMap::new();
    for (z, s) in raw.zones {
        match ZoneName::new(&z) {
            Ok(zone) => {
                zones.insert(zone, s);
            }
            Err(e) => errors.push(ConfigError { path: format!("zones.{z}"), reason: e.to_string() }),
        }
    }
    let mesh = RawSections {
        http_routes: raw.http_routes,
        authorization: raw.authorization,
        rate_limits: raw.rate_limits,
        client_allowlists: raw.client_allowlists,
    };
    if errors.is_empty() {
        Ok(MeshDocument { mesh, zones })
    } else {
        Err(errors)
    }
}

impl MeshDocument {
    /// The sections that apply in `zone`: (key, value, where the document set it).
    pub fn sections_for(&self, zone: &ZoneName) -> Vec<(&'static str, &Value, String)> {
        let own = self.zones.get(zone);
        SECTIONS
            .iter()
            .filter_map(|key| match own.and_then(|s| s.get(key)) {
                Some(v) => Some((*key, v, format!("zones.{zone}.{key}"))),
                None => self.mesh.get(key).map(|v| (*key, v, key.to_string())),
            })
            .collect()
    }

    /// The zones the document names sections for.
    pub fn zones(&self) -> impl Iterator<Item = &ZoneName> {
        self.zones.keys()
    }
}

/// The file's configuration with the document's sections for its zone merged in, validated as a
/// whole. An error in a key the document set names the document's path for it.
pub fn compose(file: &Config, doc: &MeshDocument) -> Result<Config, Vec<ConfigError>> {
    let sections = doc.sections_for(&file.fixed.zone);
    let mut merged = (*file.source).clone();
    let Some(map) = merged.as_mapping_mut() else {
        return Err(vec![ConfigError { path: String::new(), reason: "the file is not a YAML mapping".into() }]);
    };
    for (key, value, _) in &sections {
        map.insert(Value::String((*key).into()), (*value).clone());
    }
    let from_document = |mut e: ConfigError| {
        if let Some((_, _, at)) =
            sections.iter().find(|(key, ..)| e.path == *key || e.path.starts_with(&format!("{key}.")))
        {
            e.reason = format!("{} (mesh document, {at})", e.reason);
        }
        e
    };
    let raw: crate::config::RawConfig = serde_path_to_error::deserialize(merged).map_err(|e| {
        let path = e.path().to_string();
        vec![from_document(ConfigError { path, reason: e.into_inner().to_string() })]
    })?;
    let mut cfg =
        crate::config::validate(&raw).map_err(|errs| errs.into_iter().map(from_document).collect::<Vec<_>>())?;
    // What the file's loading resolved (paths relative to the file) stays as it was.
    cfg.fixed.tls = file.fixed.tls.clone();
    cfg.fixed.state_dir = file.fixed.state_dir.clone();
    cfg.fixed.document_file = file.fixed.document_file.clone();
    cfg.source = file.source.clone();
    Ok(cfg)
}

/// A document in force at this gateway.
#[derive(Debug, Clone)]
pub struct InForce {
    pub verified: Arc<causeway_overlay::core::documents::Verified>,
    pub document: MeshDocument,
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"
zone: east
gateway: gw-1
trust_domain: td
tls: { cert: c.pem, key: k.pem, bundle: b.pem }
listen: { overlay: "127.0.0.1:4433" }
exports:
  - { name: reviews.shop, port: 80, protocol: http, endpoints: ["127.0.0.1:9000"] }
authorization:
  default_deny: true
"#;

    #[test]
    fn a_zone_section_wins_over_the_mesh_section_which_wins_over_the_file() {
        let file = crate::config::parse(FILE).unwrap();
        assert!(file.snapshot.authorization.default_deny);
        let doc = parse_document(
            "authorization: { default_deny: false, audit_mode: true }
zones:
  east: { authorization: { default_deny: false } }
  west: { authorization: { default_deny: true } }
",
        )
        .unwrap();
        let cfg = compose(&file, &doc).unwrap();
        let a = &cfg.snapshot.authorization;
        assert!(!a.default_deny && !a.audit_mode, "{a:?}");
        assert_eq!(doc.sections_for(&ZoneName::new("north").unwrap())[0].2, "authorization");
        assert_eq!(cfg.fixed, file.fixed);
    }

    #[test]
    fn a_section_that_does_not_fit_the_zone_is_refused_with_its_path_and_its_place_in_the_document() {
        let file = crate::config::parse(FILE).unwrap();
        let doc = parse_document(
            "authorization:
  policies: [{ name: p, service: orders.shop, action: allow, rules: [{}] }]
",
        )
        .unwrap();
        let errs = compose(&file, &doc).unwrap_err();
        assert_eq!(errs[0].path, "authorization.policies[0].service", "{errs:?}");
        assert!(errs[0].reason.contains("not exported") && errs[0].reason.contains("mesh document"), "{errs:?}");
        let bad = parse_document("peers: []\n").unwrap_err();
        assert!(bad[0].reason.contains("peers"), "{bad:?}");
        let zone = parse_document("zones: { \"No Such\": {} }\n").unwrap_err();
        assert_eq!(zone[0].path, "zones.No Such", "{zone:?}");
    }
}
