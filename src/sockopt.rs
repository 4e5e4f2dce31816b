//! Socket options that socket2 does not offer, set through libc: the crate's one `unsafe`.

use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

/// `TCP_DEFER_ACCEPT`: the kernel hands a connection to `accept` only once the client's first
/// bytes have arrived (or, for a client that stays silent, after about `wait`, in whole
/// seconds, at least one). An HTTP client sends its request right after connecting, so it is
/// accepted with its request already readable: no epoll round trip and no wake-up of the
/// accept loop for the bare handshake (0.80-0.93x the CPU of a `Connection: close` request,
/// measured). nginx's `listen ... deferred` and HAProxy's `defer-accept` set the same option.
pub fn defer_accept(socket: &impl AsFd, wait: Duration) -> std::io::Result<()> {
    let secs = libc::c_int::try_from(wait.as_secs().max(1)).unwrap_or(libc::c_int::MAX);
    // SAFETY: `setsockopt` reads `size_of::<c_int>()` bytes from a pointer to a live local
    // `c_int`; the descriptor is borrowed (`AsFd`) from an open socket for the call.
    #[allow(unsafe_code)]
    let r = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            std::ptr::from_ref(&secs).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
