//! The host terminal in raw mode while the guest owns it, restored on every way out: normal return,
//! error, and fatal signals.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

static SAVED: Mutex<Option<libc::termios>> = Mutex::new(None);
static HANDLERS_SET: AtomicBool = AtomicBool::new(false);
/// The same termios, set once, for signal handlers, which must not take a lock.
static SAVED_FOR_SIGNALS: std::sync::OnceLock<libc::termios> = std::sync::OnceLock::new();

/// Restores the terminal when dropped.
pub struct RawMode(());

impl RawMode {
    /// Puts stdin in raw mode if it is a terminal; otherwise does nothing.
    pub fn enter() -> Option<RawMode> {
        // SAFETY: isatty only inspects the fd.
        if unsafe { libc::isatty(libc::STDIN_FILENO) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; tcgetattr fills it and we check the result.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd and pointer to a termios we own.
        if unsafe { libc::tcgetattr(libc::STDIN_FILENO, &mut t) } != 0 {
            return None;
        }
        *SAVED.lock().unwrap_or_else(|e| e.into_inner()) = Some(t);
        let _ = SAVED_FOR_SIGNALS.set(t);
        install_signal_handlers();
        let mut raw = t;
        // SAFETY: cfmakeraw only edits the struct we own.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so host-side log lines still start at column 0.
        raw.c_oflag |= libc::OPOST;
        // SAFETY: valid fd and termios.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, &raw) };
        Some(RawMode(()))
    }
}

/// Puts the terminal back as it was, if nvmm changed it (also from the panic hook).
pub fn restore() {
    if let Ok(saved) = SAVED.try_lock() {
        if let Some(t) = saved.as_ref() {
            // SAFETY: valid fd and termios saved by `enter`.
            unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t) };
        }
    }
}

/// [`restore`] from a signal handler: no lock (the interrupted thread may hold it), only a read
/// of the termios saved once raw mode began.
pub fn restore_from_signal() {
    if let Some(t) = SAVED_FOR_SIGNALS.get() {
        // SAFETY: valid fd and termios saved by `enter`; tcsetattr is async-signal-safe.
        unsafe { libc::tcsetattr(libc::STDIN_FILENO, libc::TCSANOW, t) };
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        restore();
    }
}

extern "C" fn on_fatal_signal(sig: libc::c_int) {
    restore();
    // SAFETY: restoring the default action and re-raising is async-signal-safe.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

fn install_signal_handlers() {
    if HANDLERS_SET.swap(true, Ordering::SeqCst) {
        return;
    }
    // SIGTERM and SIGINT stop the VM in order (signals.rs), and the terminal is restored on the
    // way out; these are the signals that end nvmm on the spot.
    for sig in [libc::SIGHUP, libc::SIGQUIT, libc::SIGSEGV, libc::SIGABRT] {
        // SAFETY: the handler only calls tcsetattr, signal and raise, which are async-signal-safe.
        unsafe { libc::signal(sig, on_fatal_signal as *const () as libc::sighandler_t) };
    }
}
