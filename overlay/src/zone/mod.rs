//! The zone side of a gateway: what connects to it from its own zone over QUIC — redirectors
//! handing over captured connections (`redirectors`) and HTTP/3 clients (`clients`).

pub(crate) mod clients;
pub(crate) mod redirectors;
