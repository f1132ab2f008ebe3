//! Boot flows: what a client boots, as iPXE scripts generated from the inventory.
//!
//! [`ipxe`] turns a [`ipxe::Plan`] (device, settings, links, firmware facts) into a script;
//! it is pure: no store, no clock, no I/O, so every policy has a golden-file test.
//! [`tftp`] generates the script TFTP clients fetch, which chains to the HTTP one.

pub mod ipxe;
pub mod tftp;
