//! SIGTERM and SIGINT stop the VM in order instead of killing nvmm: the handler only records the
//! signal and wakes the main loop through an eventfd; the main loop then pauses the vCPUs, parks
//! every device loop (each finishes the request in hand), flushes every disk, and ends the VM,
//! after which the terminal is restored and nvmm exits with 128 + the signal number.
//!
//! A terminal in raw mode sends Ctrl-C to the guest as a byte, so SIGINT comes only from `kill`
//! or from a shell that is not sharing its terminal with the guest.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

/// The eventfd the handler writes to; -1 while there is none.
static WAKE_FD: AtomicI32 = AtomicI32::new(-1);
/// The first stop signal received; 0 while there was none.
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// The signals that stop the VM in order.
pub const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGTERM, libc::SIGINT];

extern "C" fn on_stop_signal(sig: libc::c_int) {
    // Only the first signal counts; a second one while stopping changes nothing.
    let _ = RECEIVED.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    let fd = WAKE_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one = 1u64;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live u64 of the length given.
        unsafe { libc::write(fd, (&one as *const u64).cast(), std::mem::size_of::<u64>()) };
    }
}

/// The stop signal received, if any: `SIGTERM` or `SIGINT`.
pub fn received() -> Option<i32> {
    match RECEIVED.load(Ordering::SeqCst) {
        0 => None,
        sig => Some(sig),
    }
}

/// The signal's name, for messages.
pub fn name(sig: i32) -> &'static str {
    match sig {
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        _ => "a signal",
    }
}

/// The exit status for a stop on `sig`, as shells report a process killed by it.
pub fn exit_status(sig: i32) -> u8 {
    u8::try_from(128 + sig).unwrap_or(u8::MAX)
}

/// Wakes the main loop when a stop signal arrives; installs the handlers when created.
pub struct StopSignals {
    wake: EventFd,
}

impl StopSignals {
    pub fn install() -> io::Result<Self> {
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        WAKE_FD.store(wake.as_raw_fd(), Ordering::SeqCst);
        for sig in STOP_SIGNALS {
            // SAFETY: sigaction is a plain C struct, valid when zeroed (empty mask, no flags).
            let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
            action.sa_sigaction = on_stop_signal as *const () as libc::sighandler_t;
            // Interrupted system calls elsewhere resume; KVM_RUN returns EINTR regardless, which
            // the vCPU loop takes as an ordinary exit.
            action.sa_flags = libc::SA_RESTART;
            // SAFETY: the handler only does atomic loads and stores and write(2), all
            // async-signal-safe; the struct outlives the call.
            if unsafe { libc::sigaction(sig, &action, std::ptr::null_mut()) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // A signal that came before the handler knew the eventfd still wakes the loop.
        if received().is_some() {
            wake.write(1)?;
        }
        Ok(Self { wake })
    }
}

impl Drop for StopSignals {
    fn drop(&mut self) {
        // The handler must not write to this fd number once it is closed and perhaps reused.
        WAKE_FD.store(-1, Ordering::SeqCst);
    }
}

impl MutEventSubscriber for StopSignals {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.wake, EventSet::IN)) {
            log::error!("cannot watch for SIGTERM and SIGINT: {e:?}");
        }
    }

    /// Only drains the eventfd: the main loop looks at [`received`] after every dispatch round.
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.wake.read();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_and_names() {
        assert_eq!(exit_status(libc::SIGTERM), 143);
        assert_eq!(exit_status(libc::SIGINT), 130);
        assert_eq!(name(libc::SIGTERM), "SIGTERM");
    }
}
