//! Services: the glue between a protocol core and its drivers: what is not I/O (files,
//! caches, admission, counters), and the boot timeline they feed. The drivers are in
//! [`crate::driver`].

pub mod accounting;
pub mod dhcp;
pub mod images;
pub mod install;
pub mod iscsi;
pub mod tally;
pub mod tftp;
pub mod timeline;
