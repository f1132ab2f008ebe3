//! Services: the glue between a protocol core and a driver (sockets, files, timers).

pub mod dhcp;
pub mod tftp;
