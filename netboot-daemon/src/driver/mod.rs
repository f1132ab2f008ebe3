//! Drivers: they own sockets, rings, files and timers, feed the protocol cores and carry
//! out what the cores ask for. They make no protocol decision.
//!
//! - [`uring`]: TFTP on one io_uring, on a dedicated thread (the default), and iSCSI
//!   connections on another ([`uring::iscsi`], the default);
//! - [`tokio`]: TFTP on tokio tasks (development, tests, and the fallback when a ring
//!   cannot be set up); iSCSI's tokio driver lives in [`crate::service::iscsi`].
//!
//! [`start_tftp`] picks one as configured (`tftp.driver`);
//! [`crate::service::iscsi::IscsiRunner::start`] does so for iSCSI (`iscsi.driver`).

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ::tokio::sync::watch;
use ::tokio::task::JoinHandle;

use crate::config::TftpDriver;
use crate::service::tftp::{Tftp, transfer_ip};

pub mod tokio;
#[allow(
    unsafe_code,
    reason = "io_uring submissions, provided-buffer rings and socket options; each block has a SAFETY comment"
)]
pub mod uring;

/// A running TFTP driver.
#[derive(Debug)]
pub enum Running {
    /// The io_uring driver's thread.
    Uring(uring::Handle),
    /// The tokio driver's task; it stops when the shutdown channel turns true.
    Tokio(JoinHandle<()>),
}

impl Running {
    /// Which driver runs.
    pub fn kind(&self) -> TftpDriver {
        match self {
            Self::Uring(_) => TftpDriver::Uring,
            Self::Tokio(_) => TftpDriver::Tokio,
        }
    }

    /// Stops the driver (the tokio one once `shutdown` has turned true) and waits for it.
    pub async fn stop(self) {
        match self {
            Self::Uring(handle) => {
                let _ = ::tokio::task::spawn_blocking(move || handle.stop()).await;
            }
            Self::Tokio(task) => {
                let _ = task.await;
            }
        }
    }
}

/// In single-port mode, the address a client reaches a transfer at: the listener's
/// port, at the listener's address, or for a wildcard listener the address the kernel
/// answers `peer` from (a routing lookup: a UDP socket connected to the peer, which sends
/// nothing). A generated file may name it.
pub(crate) fn reply_address(listener: SocketAddr, peer: SocketAddr) -> SocketAddr {
    let ip = transfer_ip(listener);
    let ip = if ip.is_unspecified() {
        std::net::UdpSocket::bind(SocketAddr::new(ip, 0))
            .and_then(|s| s.connect(peer).and_then(|()| s.local_addr()))
            .map_or(ip, |a| a.ip())
    } else {
        ip
    };
    SocketAddr::new(ip, listener.port())
}

/// Warns when the kernel granted the TFTP listener a smaller `which` buffer than asked for:
/// datagrams beyond it are dropped, and their clients wait out their timeout.
fn warn_if_short(which: &str, force: &str, sysctl: &str, got: usize, want: usize) {
    if got < want {
        tracing::warn!(
            asked = want,
            got,
            "the TFTP listener's {which} buffer is smaller than a boot storm needs (no CAP_NET_ADMIN for {force}; raise {sysctl}): datagrams beyond it are dropped and their clients retry after their timeout"
        );
    }
}

/// Starts serving TFTP on `listener` with the driver `choice` (the io_uring one spinning
/// for up to `busy_poll` before it sleeps); when the io_uring driver cannot be set up (old
/// kernel, io_uring disabled by sysctl or seccomp), warns and falls back to the tokio
/// driver. Must be called inside a tokio runtime.
pub fn start_tftp(
    tftp: Arc<Tftp>,
    listener: std::net::UdpSocket,
    choice: TftpDriver,
    busy_poll: Duration,
    shutdown: watch::Receiver<bool>,
) -> io::Result<Running> {
    // Room for a burst of RRQs; in single-port mode every transfer also sends from the
    // listener.
    let want = tftp.listener_receive_buffer();
    let got = crate::net::raise_receive_buffer(&listener, want);
    warn_if_short("receive", "SO_RCVBUFFORCE", "net.core.rmem_max", got, want);
    if tftp.single_port() {
        let got = crate::net::raise_send_buffer(&listener, want);
        warn_if_short("send", "SO_SNDBUFFORCE", "net.core.wmem_max", got, want);
    }
    let listener = match choice {
        TftpDriver::Uring => match uring::spawn(Arc::clone(&tftp), listener, busy_poll) {
            Ok(handle) => return Ok(Running::Uring(handle)),
            Err(e) => {
                tracing::warn!(error = %e.error, "io_uring unavailable for TFTP; using the tokio driver");
                e.listener
            }
        },
        TftpDriver::Tokio => listener,
    };
    listener.set_nonblocking(true)?;
    let listener = ::tokio::net::UdpSocket::from_std(listener)?;
    Ok(Running::Tokio(::tokio::spawn(tokio::serve(
        tftp, listener, shutdown,
    ))))
}
