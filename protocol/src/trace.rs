//! W3C Trace Context `traceparent` (https://www.w3.org/TR/trace-context/ §3.2), version 00.

use std::fmt;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct TraceParent {
    pub trace_id: u128,
    pub span_id: u64,
    pub sampled: bool,
}

impl TraceParent {
    /// A new, sampled trace: ids from the caller's randomness (this crate has none), forced
    /// non-zero as W3C Trace Context requires (an all-zero id is invalid).
    pub fn root(trace_id: u128, span_id: u64) -> Self {
        Self { trace_id: trace_id | 1, span_id: span_id | 1, sampled: true }
    }

    /// A child of this context: same trace, a new span id chosen by the caller.
    pub fn child(self, span_id: u64) -> Self {
        Self { span_id, ..self }
    }

    /// Parses `00-<32 hex>-<16 hex>-<2 hex>`. All-zero ids are invalid per the specification.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        if b.len() != 55 || &b[..3] != b"00-" || b[35] != b'-' || b[52] != b'-' {
            return None;
        }
        let hex = |r: std::ops::Range<usize>| {
            let part = s.get(r)?;
            part.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)).then_some(part)
        };
        let trace_id = u128::from_str_radix(hex(3..35)?, 16).ok()?;
        let span_id = u64::from_str_radix(hex(36..52)?, 16).ok()?;
        let flags = u8::from_str_radix(hex(53..55)?, 16).ok()?;
        (trace_id != 0 && span_id != 0).then_some(Self { trace_id, span_id, sampled: flags & 1 == 1 })
    }
}

impl fmt::Display for TraceParent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "00-{:032x}-{:016x}-{:02x}", self.trace_id, self.span_id, u8::from(self.sampled))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let t =
            TraceParent { trace_id: 0x4bf92f3577b34da6a3ce929d0e0e4736, span_id: 0x00f067aa0ba902b7, sampled: true };
        let s = t.to_string();
        assert_eq!(s, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        assert_eq!(TraceParent::parse(&s), Some(t));
    }

    #[test]
    fn refuses_invalid() {
        assert_eq!(TraceParent::parse("00-00000000000000000000000000000000-00f067aa0ba902b7-01"), None);
        assert_eq!(TraceParent::parse("00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01"), None);
        assert_eq!(TraceParent::parse("garbage"), None);
    }
}

#[cfg(test)]
mod props {
    use super::*;

    proptest::proptest! {
        #[test]
        fn arbitrary_strings_never_panic(s: String) {
            if let Some(t) = TraceParent::parse(&s) {
                proptest::prop_assert_eq!(TraceParent::parse(&t.to_string()), Some(t));
            }
        }

        #[test]
        fn valid_shapes_round_trip(trace_id in 1u128.., span_id in 1u64.., sampled: bool) {
            let t = TraceParent { trace_id, span_id, sampled };
            proptest::prop_assert_eq!(TraceParent::parse(&t.to_string()), Some(t));
        }
    }
}
