//! SPIFFE identities (https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md).
//!
//! `spiffe://<trust-domain>/<path>`: a lowercase trust domain of `[a-z0-9._-]`, no port, no userinfo,
//! no query or fragment, no percent-encoding, and path segments of `[A-Za-z0-9._-]` that are neither
//! empty nor `.` / `..`.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::limits::MAX_SPIFFE_ID_LEN;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("must start with 'spiffe://'")]
    Scheme,
    #[error("longer than {MAX_SPIFFE_ID_LEN} bytes")]
    TooLong,
    #[error("empty trust domain")]
    EmptyTrustDomain,
    #[error("trust domain may only hold a-z, 0-9, '.', '-', '_' (no port, userinfo or uppercase)")]
    BadTrustDomain,
    #[error("path segment is empty, '.' or '..'")]
    BadSegment,
    #[error("path may only hold A-Z, a-z, 0-9, '.', '-', '_' and '/' (no query, fragment or percent-encoding)")]
    BadPathChar,
}

/// A trust domain, e.g. `prod.example`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TrustDomain(Box<str>);

impl TrustDomain {
    pub fn new(s: &str) -> Result<Self, IdentityError> {
        if s.is_empty() {
            return Err(IdentityError::EmptyTrustDomain);
        }
        if s.len() > 255 || !s.bytes().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || b"._-".contains(&c)) {
            return Err(IdentityError::BadTrustDomain);
        }
        Ok(Self(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

/// A parsed SPIFFE ID.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Identity {
    uri: Box<str>,
    /// Byte length of `spiffe://<trust domain>`.
    td_end: usize,
}

const SCHEME: &str = "spiffe://";

impl Identity {
    pub fn parse(s: &str) -> Result<Self, IdentityError> {
        let rest = s.strip_prefix(SCHEME).ok_or(IdentityError::Scheme)?;
        if s.len() > MAX_SPIFFE_ID_LEN {
            return Err(IdentityError::TooLong);
        }
        let (td, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        TrustDomain::new(td)?;
        if !path.is_empty() {
            for seg in path[1..].split('/') {
                if seg.is_empty() || seg == "." || seg == ".." {
                    return Err(IdentityError::BadSegment);
                }
                if !seg.bytes().all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c)) {
                    return Err(IdentityError::BadPathChar);
                }
            }
        }
        Ok(Self { uri: s.into(), td_end: SCHEME.len() + td.len() })
    }

    pub fn trust_domain(&self) -> TrustDomain {
        TrustDomain(self.uri[SCHEME.len()..self.td_end].into())
    }

    /// The path, starting with '/', or empty.
    pub fn path(&self) -> &str {
        &self.uri[self.td_end..]
    }

    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl std::str::FromStr for Identity {
    type Err = IdentityError;
    fn from_str(s: &str) -> Result<Self, IdentityError> {
        Self::parse(s)
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.uri, f)
    }
}

impl Serialize for Identity {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.uri)
    }
}

impl<'de> Deserialize<'de> for Identity {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        Self::parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_ids() {
        let id = Identity::parse("spiffe://prod.example/zone/eu/gateway/gw-1").unwrap();
        assert_eq!(id.trust_domain().as_str(), "prod.example");
        assert_eq!(id.path(), "/zone/eu/gateway/gw-1");
        assert!(Identity::parse("spiffe://td").is_ok());
    }

    #[test]
    fn refuses_invalid_ids() {
        use IdentityError::*;
        for (s, e) in [
            ("http://td/x", Scheme),
            ("spiffe:///x", EmptyTrustDomain),
            ("spiffe://TD/x", BadTrustDomain),
            ("spiffe://td:443/x", BadTrustDomain),
            ("spiffe://u@td/x", BadTrustDomain),
            ("spiffe://td/a//b", BadSegment),
            ("spiffe://td/a/../b", BadSegment),
            ("spiffe://td/", BadSegment),
            ("spiffe://td/a?q", BadPathChar),
            ("spiffe://td/a%20b", BadPathChar),
            ("spiffe://td/a#f", BadPathChar),
        ] {
            assert_eq!(Identity::parse(s), Err(e), "{s}");
        }
        let long = format!("spiffe://td/{}", "a".repeat(MAX_SPIFFE_ID_LEN));
        assert_eq!(Identity::parse(&long), Err(TooLong));
    }
}

#[cfg(test)]
mod props {
    use super::*;

    proptest::proptest! {
        #[test]
        fn arbitrary_strings_never_panic(s: String) {
            if let Ok(id) = Identity::parse(&s) {
                // Whatever parses round-trips and names a valid trust domain.
                proptest::prop_assert_eq!(Identity::parse(id.as_str()), Ok(id.clone()));
                proptest::prop_assert!(TrustDomain::new(id.trust_domain().as_str()).is_ok());
            }
        }

        #[test]
        fn spiffe_shaped_strings_never_panic(td in "[a-zA-Z0-9.:@_%-]{0,20}", path in "(/[a-zA-Z0-9.%?#_-]{0,8}){0,4}") {
            let _ = Identity::parse(&format!("spiffe://{td}{path}"));
        }
    }
}
