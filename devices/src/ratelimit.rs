//! Per-call-site rate limits for log lines a guest can trigger at VM-exit rate: a driver poking
//! bad registers in a loop must not fill the host's disk or hold the vCPU in `write(2)`.
//!
//! [`warn_limited!`](crate::warn_limited) and [`error_limited!`](crate::error_limited) behave as
//! `log::warn!` and `log::error!`, except that each call site logs at most [`LINES_PER_WINDOW`]
//! lines per [`WINDOW`]; the first line it logs after dropping some says how many it dropped, and
//! [`take_suppressed`] gives the counts no later line reported (nvmm prints them at exit).

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// Lines one call site may log per window.
pub const LINES_PER_WINDOW: u32 = 5;
/// The window over which lines are counted.
pub const WINDOW: Duration = Duration::from_secs(1);

#[derive(Debug)]
struct State {
    window_start: Option<Instant>,
    logged: u32,
    suppressed: u64,
    registered: bool,
}

/// The count kept for one call site (a `static` in each macro expansion).
#[derive(Debug)]
pub struct Site {
    module: &'static str,
    line: u32,
    state: Mutex<State>,
}

/// Every macro call site that has counted a line, for [`take_suppressed`].
static REGISTERED: Mutex<Vec<&'static Site>> = Mutex::new(Vec::new());

/// The lines dropped and not yet reported, per call site (module, line), as of now; the counts
/// are then cleared.
pub fn take_suppressed() -> Vec<(&'static str, u32, u64)> {
    let sites = REGISTERED.lock().unwrap_or_else(PoisonError::into_inner);
    sites
        .iter()
        .filter_map(|site| {
            let mut s = site.state.lock().unwrap_or_else(PoisonError::into_inner);
            let n = std::mem::take(&mut s.suppressed);
            (n > 0).then_some((site.module, site.line, n))
        })
        .collect()
}

/// Whether a line may be logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Log it; `suppressed` lines from this site were dropped since the last one logged.
    Log { suppressed: u64 },
    Drop,
}

impl Site {
    /// The site at `line` of `module`.
    pub const fn new(module: &'static str, line: u32) -> Self {
        Site { module, line, state: Mutex::new(State { window_start: None, logged: 0, suppressed: 0, registered: false }) }
    }

    /// [`Site::admit_at`] now, for a site that lives as long as the program (a macro's
    /// `static`), which is then listed for [`take_suppressed`].
    pub fn admit_static(&'static self) -> Admit {
        let first = {
            let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            !std::mem::replace(&mut s.registered, true)
        };
        if first {
            REGISTERED.lock().unwrap_or_else(PoisonError::into_inner).push(self);
        }
        self.admit_at(Instant::now())
    }

    /// Counts one line at time `now` and says whether it may be logged.
    pub fn admit_at(&self, now: Instant) -> Admit {
        // A panic while holding this lock left plain counters behind: still usable.
        let mut s = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let expired = s.window_start.is_none_or(|start| now.saturating_duration_since(start) >= WINDOW);
        if expired {
            s.window_start = Some(now);
            s.logged = 0;
        }
        if s.logged >= LINES_PER_WINDOW {
            s.suppressed += 1;
            return Admit::Drop;
        }
        s.logged += 1;
        Admit::Log { suppressed: std::mem::take(&mut s.suppressed) }
    }

    pub fn admit(&self) -> Admit {
        self.admit_at(Instant::now())
    }

    /// The lines dropped and not yet reported; the count is then cleared.
    pub fn take_suppressed(&self) -> u64 {
        std::mem::take(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner).suppressed)
    }
}

impl Default for Site {
    fn default() -> Self {
        Self::new("", 0)
    }
}

/// `log::log!` at `$level`, rate-limited per call site (see the module docs).
#[macro_export]
macro_rules! log_limited {
    ($level:expr, $($arg:tt)+) => {{
        static SITE: $crate::ratelimit::Site = $crate::ratelimit::Site::new(module_path!(), line!());
        let level = $level;
        // Lines the logger would drop anyway are not counted.
        if $crate::__log::log_enabled!(level) {
            if let $crate::ratelimit::Admit::Log { suppressed } = SITE.admit_static() {
                if suppressed > 0 {
                    $crate::__log::log!(level, "{} (after {} more like it were suppressed)", format_args!($($arg)+), suppressed);
                } else {
                    $crate::__log::log!(level, $($arg)+);
                }
            }
        }
    }};
}

/// `log::warn!`, rate-limited per call site.
#[macro_export]
macro_rules! warn_limited {
    ($($arg:tt)+) => { $crate::log_limited!($crate::__log::Level::Warn, $($arg)+) };
}

/// `log::error!`, rate-limited per call site.
#[macro_export]
macro_rules! error_limited {
    ($($arg:tt)+) => { $crate::log_limited!($crate::__log::Level::Error, $($arg)+) };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_flood_is_cut_to_a_few_lines_per_window_and_the_rest_counted() {
        let site = Site::new("test", 1);
        let t0 = Instant::now();
        let logged = (0..10_000).filter(|_| matches!(site.admit_at(t0), Admit::Log { .. })).count();
        assert_eq!(logged, LINES_PER_WINDOW as usize);
        // Still inside the window: dropped.
        assert_eq!(site.admit_at(t0 + WINDOW / 2), Admit::Drop);
        // The next window's first line carries the count of what was dropped, once.
        let later = t0 + WINDOW;
        assert_eq!(site.admit_at(later), Admit::Log { suppressed: 10_000 - 5 + 1 });
        assert_eq!(site.admit_at(later), Admit::Log { suppressed: 0 });
    }

    #[test]
    fn sites_are_counted_apart() {
        let (a, b) = (Site::new("a", 1), Site::new("b", 2));
        let t = Instant::now();
        for _ in 0..LINES_PER_WINDOW {
            a.admit_at(t);
        }
        assert_eq!(a.admit_at(t), Admit::Drop);
        assert_eq!(b.admit_at(t), Admit::Log { suppressed: 0 });
    }

    #[test]
    fn the_macros_expand_and_count_what_they_drop() {
        /// A logger that takes every line and shows none: the macros count only enabled lines.
        struct Quiet;
        impl log::Log for Quiet {
            fn enabled(&self, _: &log::Metadata) -> bool {
                true
            }
            fn log(&self, _: &log::Record) {}
            fn flush(&self) {}
        }
        static QUIET: Quiet = Quiet;
        let _ = log::set_logger(&QUIET);
        log::set_max_level(log::LevelFilter::Warn);
        for i in 0..100 {
            crate::warn_limited!("test line {i}");
        }
        let dropped = take_suppressed();
        let here = dropped.iter().find(|(m, _, _)| *m == module_path!()).expect("this site is listed");
        assert_eq!(here.2, 100 - u64::from(LINES_PER_WINDOW));
        assert!(take_suppressed().iter().all(|(m, _, _)| *m != module_path!()), "counts are cleared");
    }
}
