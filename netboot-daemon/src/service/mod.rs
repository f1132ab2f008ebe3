//! Services: the glue between a protocol core and its drivers: what is not I/O (files,
//! caches, admission, counters). The drivers are in [`crate::driver`].

pub mod dhcp;
pub mod tftp;
