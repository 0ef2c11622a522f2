//! A minimal `log` backend: one line per record on stderr, prefixed with `nvmm`.
//!
//! Writing never panics: `eprintln!` does when stderr is a closed pipe or a full disk, which would
//! let a guest that makes nvmm log end nvmm. A line that cannot be written is dropped. Lines a
//! guest can trigger are rate-limited where they are logged (`nvmm_devices::warn_limited!`), and
//! again here, per call site, which also covers lines from other crates (virtio-queue logs an
//! error for every bad available index a guest writes).

use std::collections::HashMap;
use std::io::Write;
use std::sync::{Mutex, PoisonError};

use log::{LevelFilter, Log, Metadata, Record};
use nvmm_devices::ratelimit::{Admit, Site};

/// The rate limit of each call site seen so far, by module and line.
static SITES: Mutex<Option<HashMap<(String, u32), Site>>> = Mutex::new(None);

/// Counts a line from `record`'s call site; `None` if it is to be dropped, else how many were.
fn admit(record: &Record) -> Option<u64> {
    let key = (record.module_path().unwrap_or_default().to_string(), record.line().unwrap_or(0));
    // A panic while holding this lock left plain counters behind: still usable.
    let mut sites = SITES.lock().unwrap_or_else(PoisonError::into_inner);
    match sites.get_or_insert_with(HashMap::new).entry(key).or_default().admit() {
        Admit::Log { suppressed } => Some(suppressed),
        Admit::Drop => None,
    }
}

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let Some(suppressed) = admit(record) else { return };
        let level = record.level().as_str().to_lowercase();
        let line = match suppressed {
            0 => format!("nvmm: {level}: {}\n", record.args()),
            n => format!("nvmm: {level}: {} (after {n} more like it were suppressed)\n", record.args()),
        };
        write_stderr(&line);
    }

    fn flush(&self) {}
}

static LOGGER: StderrLogger = StderrLogger;

pub fn init(level: LevelFilter) {
    // Only fails if a logger is already set, in which case that one stays.
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(level);
}

/// One line per call site whose last lines were dropped with no later line to say so, at exit.
pub fn report_suppressed() {
    let mut dropped: Vec<(String, u32, u64)> =
        nvmm_devices::ratelimit::take_suppressed().into_iter().map(|(m, l, n)| (m.to_string(), l, n)).collect();
    if let Some(sites) = SITES.lock().unwrap_or_else(PoisonError::into_inner).as_mut() {
        for ((module, line), site) in sites.iter_mut() {
            let n = site.take_suppressed();
            if n > 0 {
                dropped.push((module.clone(), *line, n));
            }
        }
    }
    for (module, line, n) in dropped {
        write_stderr(&format!("nvmm: warn: {n} more log lines from {module}:{line} were suppressed\n"));
    }
}

/// Makes a panic one line on stderr, after the terminal is put back: Rust's default message
/// spans several lines, and the console is in raw mode. Release builds abort after the hook
/// (panic=abort); guest RAM is left out of the core dump (see `memory.rs`).
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        crate::terminal::restore();
        write_stderr(&panic_line(info));
    }));
}

/// `nvmm: error: internal error in thread 'vcpu0' at src/x.rs:10:5: what (a bug: please report it)`.
fn panic_line(info: &std::panic::PanicHookInfo<'_>) -> String {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("unnamed");
    let place = info.location().map(|l| format!(" at {}:{}:{}", l.file(), l.line(), l.column())).unwrap_or_default();
    let what = info.payload_as_str().unwrap_or("no message");
    // A message with line breaks would break the one-line promise.
    let what = what.replace('\n', " ");
    format!("nvmm: error: internal error in thread '{name}'{place}: {what} (a bug: please report it)\n")
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
    fn a_panic_is_one_line_naming_thread_and_place() {
        let line = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let seen = line.clone();
        let t = std::thread::Builder::new()
            .name("vcpu7".into())
            .spawn(move || {
                let previous = std::panic::take_hook();
                std::panic::set_hook(Box::new(move |info| *seen.lock().unwrap() = panic_line(info)));
                let _ = std::panic::catch_unwind(|| panic!("two\nlines"));
                std::panic::set_hook(previous);
            })
            .unwrap();
        t.join().unwrap();
        let line = line.lock().unwrap().clone();
        assert!(line.starts_with("nvmm: error: internal error in thread 'vcpu7' at vmm/src/logger.rs:"), "{line}");
        assert!(line.ends_with(": two lines (a bug: please report it)\n"), "{line}");
        assert_eq!(line.lines().count(), 1);
    }

    #[test]
    fn a_flood_from_one_call_site_is_cut() {
        let record = |line| Record::builder().args(format_args!("x")).module_path(Some("virtio_queue::queue")).line(Some(line)).build();
        let passed = (0..1000).filter(|_| admit(&record(7)).is_some()).count();
        assert_eq!(passed, nvmm_devices::ratelimit::LINES_PER_WINDOW as usize);
        assert_eq!(admit(&record(8)), Some(0), "another call site has its own count");
    }

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
