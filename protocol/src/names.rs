//! Parsed names. A value of these types is valid by construction ("parse, don't validate").

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::limits::{MAX_GATEWAY_ID_LEN, MAX_SERVICE_NAME_LEN, MAX_ZONE_NAME_LEN};

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("must not be empty")]
    Empty,
    #[error("longer than {max} bytes")]
    TooLong { max: usize },
    #[error("invalid character {0:?} (allowed: a-z, 0-9, '-'{dots})", dots = if *.1 { ", '.'" } else { "" })]
    BadChar(char, bool),
    #[error("labels must start and end with a letter or digit")]
    BadLabel,
    #[error("the suffix '.invalid' is reserved")]
    Reserved,
}

/// Checks a lowercase DNS-style name: labels of `[a-z0-9-]`, not starting or ending with '-',
/// separated by '.' when `dots` is allowed.
fn check_dns_like(s: &str, max: usize, dots: bool) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::Empty);
    }
    if s.len() > max {
        return Err(NameError::TooLong { max });
    }
    if let Some(c) =
        s.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || (dots && *c == '.')))
    {
        return Err(NameError::BadChar(c, dots));
    }
    for label in s.split('.') {
        let ok = label.len() <= 63
            && label.starts_with(|c: char| c.is_ascii_alphanumeric())
            && label.ends_with(|c: char| c.is_ascii_alphanumeric());
        if !ok {
            return Err(NameError::BadLabel);
        }
    }
    Ok(())
}

macro_rules! name_type {
    ($(#[$doc:meta])* $name:ident, $max:expr, $dots:expr) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(Box<str>);

        impl $name {
            pub fn new(s: &str) -> Result<Self, NameError> {
                check_dns_like(s, $max, $dots)?;
                if s.ends_with(".invalid") {
                    return Err(NameError::Reserved);
                }
                Ok(Self(s.into()))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl std::str::FromStr for $name {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                // Borrow when the format allows it; postcard and YAML both hand out strings.
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

name_type!(
    /// A zone: one cluster, cloud region or site, e.g. `eu-west`.
    ZoneName, MAX_ZONE_NAME_LEN, false
);
name_type!(
    /// A mesh service, e.g. `orders.shop` (dotted labels: service, then namespace).
    ServiceName, MAX_SERVICE_NAME_LEN, true
);
name_type!(
    /// One gateway within a zone, e.g. `gw-1`. Unique mesh-wide together with its zone.
    GatewayId, MAX_GATEWAY_ID_LEN, true
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_dns_like_names() {
        assert!(ZoneName::new("eu-west-1").is_ok());
        assert!(ServiceName::new("orders.shop").is_ok());
        assert!(GatewayId::new("gw-1").is_ok());
    }

    #[test]
    fn refuses_bad_names() {
        assert_eq!(ZoneName::new(""), Err(NameError::Empty));
        assert_eq!(ZoneName::new("a.b"), Err(NameError::BadChar('.', false)));
        assert_eq!(ServiceName::new("Orders"), Err(NameError::BadChar('O', true)));
        assert_eq!(ServiceName::new("-a"), Err(NameError::BadLabel));
        assert_eq!(ServiceName::new("a..b"), Err(NameError::BadLabel));
        assert_eq!(ServiceName::new("x.invalid"), Err(NameError::Reserved));
        assert!(matches!(ZoneName::new(&"a".repeat(64)), Err(NameError::TooLong { .. })));
    }
}

#[cfg(test)]
mod props {
    use super::*;

    proptest::proptest! {
        #[test]
        fn arbitrary_strings_never_panic(s: String) {
            for ok in [ZoneName::new(&s).is_ok(), ServiceName::new(&s).is_ok(), GatewayId::new(&s).is_ok()] {
                if ok {
                    proptest::prop_assert!(s.len() <= MAX_SERVICE_NAME_LEN && !s.is_empty());
                }
            }
        }
    }
}
