//! Drivers: they own sockets, rings, files and timers, feed the protocol cores and carry
//! out what the cores ask for. They make no protocol decision.
//!
//! - [`tokio`]: TFTP on tokio tasks.

pub mod tokio;
