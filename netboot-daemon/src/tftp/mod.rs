//! TFTP (RFC 1350) with options (RFC 2347-2349) and windowsize (RFC 7440), read-only.
//!
//! - [`wire`]: packet parsing and emission;
//! - [`transfer`]: one transfer as a sans-IO state machine;
//! - [`server`]: admission of requests on the listening port (limits, duplicates).
//!
//! The protocol modules import nothing but std, thiserror and tracing.

pub mod server;
pub mod transfer;
pub mod wire;
