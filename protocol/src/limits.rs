//! Limits every decoder enforces before it allocates. Each is part of the protocol (`SPEC.md` §Limits):
//! a peer that exceeds one is refused with an error code, never buffered.

/// Longest zone name (one DNS label).
pub const MAX_ZONE_NAME_LEN: usize = 63;
/// Longest service name (a DNS name).
pub const MAX_SERVICE_NAME_LEN: usize = 253;
/// Longest gateway id.
pub const MAX_GATEWAY_ID_LEN: usize = 63;
/// Longest SPIFFE ID (the SPIFFE X.509-SVID specification's limit).
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

/// Largest control frame body. A catalog chunk of [`MAX_SERVICES_PER_FRAME`] services of at most
/// ~300 bytes each is ~77 KiB, so 256 KiB leaves room for labels while bounding what one peer can make
/// a gateway buffer per control stream (one stream per peer: 100 peers × 256 KiB = 25 MiB worst case).
pub const MAX_CONTROL_FRAME_LEN: usize = 256 * 1024;
/// Services per catalog frame; larger catalogs are sent as several chunks.
pub const MAX_SERVICES_PER_FRAME: usize = 256;
/// Services one zone may advertise. 10,000 × ~300 B ≈ 3 MiB of catalog per peer at most.
pub const MAX_SERVICES_PER_ZONE: usize = 10_000;
/// Labels per advertised service, and the longest label key or value.
pub const MAX_LABELS: usize = 16;
pub const MAX_LABEL_LEN: usize = 63;
/// Longest free-text reason in an error or goodbye message.
pub const MAX_REASON_LEN: usize = 1024;

/// A control frame must be complete within this long of its first byte (no slow drip).
pub const CONTROL_FRAME_DEADLINE_SECS: u64 = 10;
/// A peer that sends no control frame (or nothing at all) for this long is unresponsive and its
/// connection is closed: the default of `timing.peer_close_timeout`.
/// Long enough to ride out a WAN blackhole of ~2 s: QUIC's probe timeout backs off exponentially
/// while the path is dark, so the first packet after it may come ~2 s after the path is back.
pub const CONTROL_SILENCE_SECS: u64 = 5;
