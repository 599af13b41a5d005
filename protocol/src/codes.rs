//! Error codes Causeway puts on the wire: as QUIC application close codes, as stream reset codes
//! and in control `Error` messages. An open newtype: an unknown code still decodes and is shown in hex.
//!
//! The range `0x4357_0000..=0x4357_ffff` ("CW") is Causeway's. HTTP/3's own codes (0x100–0x110,
//! RFC 9114 §8.1) keep their meaning on the same connection.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ErrorCode(pub u64);

macro_rules! codes {
    ($($(#[$doc:meta])* ($val:expr, $name:ident);)*) => {
        impl ErrorCode {
            $($(#[$doc])* pub const $name: ErrorCode = ErrorCode($val);)*

            /// The code's name, or `None` for a code this version does not know.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($val => Some(stringify!($name)),)*
                    _ => None,
                }
            }
        }
    };
}

codes! {
    /// Graceful close: a replaced connection retired, or the peer ended its control stream cleanly.
    /// (The loser of a duplicate connection gets `DUPLICATE_CONNECTION`.)
    (0x100, H3_NO_ERROR);
    /// An HTTP/3 session could not be set up on a new peer connection.
    (0x102, H3_INTERNAL_ERROR);
    /// Stop sending: a unidirectional stream's type did not arrive in time (`SPEC.md` §3).
    (0x103, H3_STREAM_CREATION_ERROR);
    /// The peer's behaviour exceeds what we serve: an HTTP/3 frame over its limit, or most of a
    /// batch of streams reset right after opening (rapid reset).
    (0x107, H3_EXCESSIVE_LOAD);
    /// Stream reset: the request's headers did not complete within `timing.header_timeout`
    /// (RFC 9114 §8.1).
    (0x10d, H3_REQUEST_INCOMPLETE);
    /// A control frame could not be decoded (bad postcard body, trailing bytes, bad name).
    (0x4357_0001, CONTROL_MALFORMED);
    /// A control frame declared a length above the limit.
    (0x4357_0002, CONTROL_OVERSIZED);
    /// The control stream ended inside the preface or a frame, or a frame was not completed in time.
    (0x4357_0003, CONTROL_TRUNCATED);
    /// The peer speaks another protocol version.
    (0x4357_0004, VERSION_MISMATCH);
    /// The peer's hello named a zone other than the one configured for its identity, or its
    /// certificate holds no SPIFFE ID.
    (0x4357_0005, PEER_MISMATCH);
    /// A message arrived out of order (e.g. anything before hello, a second hello).
    (0x4357_0006, PROTOCOL_VIOLATION);
    /// A peer exceeded a limit (catalog size, labels).
    (0x4357_0007, LIMIT_EXCEEDED);
    /// This connection lost the tie-break of a simultaneous dial; the other one is kept.
    (0x4357_0008, DUPLICATE_CONNECTION);
    /// The peer did not answer liveness pings in time.
    (0x4357_0009, PEER_UNRESPONSIVE);
    /// The gateway is shutting down.
    (0x4357_000a, SHUTDOWN);
    /// The peer was removed from this gateway's configuration (or its identity revoked).
    (0x4357_000b, PEER_REMOVED);
    /// Stream reset: the backend connection of a flow failed or was reset.
    (0x4357_0100, FLOW_BACKEND_RESET);
    /// Stream reset: the client side of a flow went away.
    (0x4357_0101, FLOW_CLIENT_RESET);
}

impl fmt::Debug for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(n) => write!(f, "{n}"),
            None => write!(f, "{:#x}", self.0),
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}
