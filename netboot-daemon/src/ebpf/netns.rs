//! Running a closure inside another network namespace, for attaching to its interfaces.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd as _, AsRawFd as _, BorrowedFd};
use std::path::Path;

/// The calling thread's network namespace.
pub(super) const THREAD_NETNS: &str = "/proc/thread-self/ns/net";

/// Runs `f` with the calling thread switched into the network namespace at `netns_path`
/// (e.g. `/var/run/netns/NAME` or `/proc/PID/ns/net`), then switches back.
///
/// Only this thread changes namespace. Sockets and interface lookups made inside `f` belong
/// to the target namespace; file descriptors opened there keep working after the switch back.
/// The switch back also happens when `f` panics; if it fails then, the process aborts rather
/// than leave a thread in the wrong namespace. If it fails after `f` returned normally (for
/// example because `f` dropped `CAP_SYS_ADMIN`), the error is returned and the thread stays
/// in the target namespace: treat that as fatal.
pub fn in_netns<T>(netns_path: &Path, f: impl FnOnce() -> T) -> io::Result<T> {
    let target = File::open(netns_path)?;
    enter_netns(target.as_fd(), f)
}

pub(super) fn enter_netns<T>(target: BorrowedFd<'_>, f: impl FnOnce() -> T) -> io::Result<T> {
    let original = File::open(THREAD_NETNS)?;
    setns_net(target)?;
    let restore = RestoreNetns(Some(original));
    let value = f();
    restore.finish()?;
    Ok(value)
}

/// Switches the thread back to its original namespace, also when unwinding.
struct RestoreNetns(Option<File>);

impl RestoreNetns {
    fn finish(mut self) -> io::Result<()> {
        let original = self.0.take().expect("invariant: restored only once");
        setns_net(original.as_fd())
    }
}

impl Drop for RestoreNetns {
    fn drop(&mut self) {
        if let Some(original) = self.0.take()
            && let Err(error) = setns_net(original.as_fd())
        {
            tracing::error!(%error, "cannot return to the original network namespace; aborting");
            std::process::abort();
        }
    }
}

fn setns_net(netns: BorrowedFd<'_>) -> io::Result<()> {
    // SAFETY: `setns` takes a file descriptor, valid for the duration of the borrow, and only
    // changes the calling thread's network namespace; it touches no memory of ours.
    let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_netns_returns_to_the_original_namespace() {
        let before = std::fs::read_link(THREAD_NETNS).expect("read own netns");
        // Entering our own namespace needs CAP_SYS_ADMIN; without it the call fails cleanly.
        match in_netns(Path::new(THREAD_NETNS), || 42) {
            Ok(v) => assert_eq!(v, 42),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}"),
        }
        assert_eq!(
            std::fs::read_link(THREAD_NETNS).expect("read own netns"),
            before
        );
    }
}
