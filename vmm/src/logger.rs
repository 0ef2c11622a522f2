//! A minimal `log` backend: one line per record on stderr, prefixed with `nvmm`.
//!
//! Writing never panics: `eprintln!` does when stderr is a closed pipe or a full disk, which would
//! let a guest that makes nvmm log end nvmm. A line that cannot be written is dropped. Lines a
//! guest can trigger are rate-limited where they are logged (`nvmm_devices::warn_limited!`).

use std::io::Write;

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            write_stderr(&format!("nvmm: {}: {}\n", record.level().as_str().to_lowercase(), record.args()));
        }
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

pub fn init(level: LevelFilter) {
    // Only fails if a logger is already set, in which case that one stays.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// Writes `text` to stderr in one call, ignoring failure: with stderr gone there is nowhere left
/// to report it. (Rust ignores SIGPIPE, so a closed pipe is an EPIPE here, not a signal.)
pub fn write_stderr(text: &str) {
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writing_to_a_full_or_closed_stderr_does_not_panic() {
        use std::os::fd::AsRawFd;
        let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
        // SAFETY: dup/dup2 on valid fds; stderr is put back before the test returns.
        let saved = unsafe { libc::dup(libc::STDERR_FILENO) };
        assert!(saved >= 0);
        // SAFETY: as above.
        unsafe { libc::dup2(full.as_raw_fd(), libc::STDERR_FILENO) };
        write_stderr("nvmm: this line goes nowhere\n");
        LOGGER.log(&Record::builder().args(format_args!("nor this one")).level(log::Level::Warn).build());
        // SAFETY: as above.
        unsafe {
            libc::dup2(saved, libc::STDERR_FILENO);
            libc::close(saved);
        }
    }
}
