//! The overlay's pure core: decisions without sockets, tasks or clocks of their own.
//!
//! Everything here takes its inputs (messages, `now`) as arguments and returns what to do, so it is
//! unit-tested to the message without a running mesh. The async shells (`peer`, `state`, `flow`) do the
//! I/O and act on the results.

pub mod abuse;
pub mod bucket;
pub mod caller;
pub mod catalog;
pub mod documents;
pub mod liveness;
pub mod path_model;
pub mod path_stats;
pub mod route_table;
pub mod tiebreak;
