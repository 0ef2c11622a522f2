//! A minimal `log` backend: one line per record on stderr, prefixed with `nvmm`.

use log::{LevelFilter, Log, Metadata, Record};

struct StderrLogger;

impl Log for StderrLogger {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }

    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            eprintln!("nvmm: {}: {}", record.level().as_str().to_lowercase(), record.args());
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
