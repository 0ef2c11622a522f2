//! Seccomp filters, one per kind of thread, from the rules in `resources/seccomp/x86_64.json`.
//!
//! The main thread installs its filter first thing in `builder::build_and_run`, so every thread
//! started afterwards (vCPUs, device loops, the API thread and tiny_http's own threads) runs under
//! it; vCPU and device-loop threads add their own, narrower filter when they start
//! ([`enter`]). A forbidden call in `on` mode traps: the SIGSYS handler writes one line naming the
//! thread and the call, restores the terminal and ends nvmm with status 1. In `log` mode the
//! kernel lets the call through and logs it.

mod names;

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::OnceLock;

use seccompiler::{BpfProgram, TargetArch};

/// The rules, as data (see `resources/seccomp/README.md`).
const RULES: &str = include_str!("../../../resources/seccomp/x86_64.json");

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("seccomp rules (resources/seccomp/x86_64.json): {0}")]
    Rules(String),
    #[error("seccomp rules have no filter for the {0} thread")]
    NoFilter(&'static str),
    #[error("cannot install the seccomp filter of the {thread} thread: {err}")]
    Apply { thread: String, err: seccompiler::Error },
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// `--seccomp`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// No filters.
    Off,
    /// Filters whose violations the kernel logs and lets through (to find a missing rule).
    Log,
    /// Filters whose violations end nvmm with one line naming the thread and the call.
    #[default]
    On,
}

/// The kinds of thread, each with its filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread (VM set-up, the main loop, API answers), inherited by every other thread.
    Main,
    Vcpu,
    Block,
    Net,
}

impl ThreadKind {
    fn filter_name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Block => "virtio-block",
            ThreadKind::Net => "virtio-net",
        }
    }
}

/// The compiled filters, once `--seccomp` is not `off`.
static FILTERS: OnceLock<HashMap<String, BpfProgram>> = OnceLock::new();

/// Compiles the rules for `mode` (with its default action).
fn compile(mode: Mode) -> Result<HashMap<String, BpfProgram>, Error> {
    let action = match mode {
        Mode::Log => "log",
        _ => "trap",
    };
    let mut rules: serde_json::Value = serde_json::from_str(RULES).map_err(|e| Error::Rules(e.to_string()))?;
    if let Some(filters) = rules.as_object_mut() {
        for filter in filters.values_mut() {
            filter["default_action"] = serde_json::Value::from(action);
        }
    }
    let json = serde_json::to_vec(&rules).map_err(|e| Error::Rules(e.to_string()))?;
    seccompiler::compile_from_json(json.as_slice(), TargetArch::x86_64).map_err(|e| Error::Rules(e.to_string()))
}

/// Compiles the filters, installs the SIGSYS handler and confines the calling (main) thread.
/// Nothing at all with `Mode::Off`.
pub fn install(mode: Mode) -> Result<(), Error> {
    if mode == Mode::Off {
        return Ok(());
    }
    let filters = compile(mode)?;
    for kind in [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Block, ThreadKind::Net] {
        if !filters.contains_key(kind.filter_name()) {
            return Err(Error::NoFilter(kind.filter_name()));
        }
    }
    install_sigsys_handler()?;
    // A second install (tests) keeps the first set: the rules are the same.
    let _ = FILTERS.set(filters);
    enter(ThreadKind::Main, "main")
}

/// Confines the calling thread, named `name` in messages, with the filter of `kind`, on top of the
/// main thread's it inherited. Does nothing when filters are off.
pub fn enter(kind: ThreadKind, name: &str) -> Result<(), Error> {
    let Some(filters) = FILTERS.get() else {
        return Ok(());
    };
    set_thread_name(name);
    let filter = filters.get(kind.filter_name()).ok_or(Error::NoFilter(kind.filter_name()))?;
    seccompiler::apply_filter(filter).map_err(|err| Error::Apply { thread: name.to_string(), err })?;
    probe(kind);
    Ok(())
}

/// For [`enter`] on a thread that cannot return an error: a thread that should be confined and is
/// not would run unconfined, so nvmm ends instead.
pub fn enter_or_exit(kind: ThreadKind, name: &str) {
    if let Err(e) = enter(kind, name) {
        crate::logger::write_stderr(&format!("nvmm: error: {e}\n"));
        crate::terminal::restore();
        std::process::exit(1);
    }
}

/// Test hook: `NVMM_TEST_SECCOMP_PROBE=vcpu` makes each vCPU thread, once confined, make a call
/// its filter forbids (getppid), to check the SIGSYS path end to end. It can only end nvmm.
fn probe(kind: ThreadKind) {
    if kind == ThreadKind::Vcpu && std::env::var_os("NVMM_TEST_SECCOMP_PROBE").is_some_and(|v| v == "vcpu") {
        // SAFETY: getppid takes no arguments and touches no memory.
        unsafe { libc::getppid() };
    }
}

thread_local! {
    /// The thread's name for the SIGSYS message, NUL-padded; set by [`enter`]. A const-initialized
    /// plain cell: reading it from a signal handler allocates nothing and takes no lock.
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

fn set_thread_name(name: &str) {
    let mut buf = [0u8; 16];
    let n = name.len().min(15);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    THREAD_NAME.with(|c| c.set(buf));
}

fn install_sigsys_handler() -> Result<(), Error> {
    // SAFETY: sigaction is a plain C struct, valid when zeroed.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = on_sigsys as *const () as libc::sighandler_t;
    action.sa_flags = libc::SA_SIGINFO;
    // SAFETY: the handler only formats into a stack buffer and calls write, ioctl and _exit,
    // which every filter allows and which are async-signal-safe.
    if unsafe { libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) } != 0 {
        return Err(Error::Handler(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// Where `siginfo_t` keeps the system call number of a seccomp SIGSYS on x86_64: after signo,
/// errno, code and padding (16 bytes) comes `_sigsys`: the call's address (8 bytes), then the
/// number.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn on_sigsys(_sig: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers; for SIGSYS from
    // seccomp its `_sigsys` member is filled, and the read stays inside the struct.
    let nr = unsafe { info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<i32>().read_unaligned() };
    let name = THREAD_NAME.with(Cell::get);
    let mut line = LineBuf::default();
    line.push(b"nvmm: error: seccomp: thread ");
    let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    line.push(if len == 0 { b"unnamed" } else { &name[..len] });
    line.push(b" made a forbidden system call: ");
    line.push(usize::try_from(nr).ok().and_then(|i| names::SYSCALL_NAMES.get(i)).map_or(&b"?"[..], |n| n.as_bytes()));
    line.push(b" (");
    line.push_number(i64::from(nr));
    line.push(b"); --seccomp log lets it through and has the kernel log it\n");
    // SAFETY: write(2) of a stack buffer; then the terminal, then _exit, all async-signal-safe.
    unsafe {
        libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len);
    }
    crate::terminal::restore_from_signal();
    // SAFETY: ends the process at once, which is what a violation means.
    unsafe { libc::_exit(1) };
}

/// A fixed buffer to build a line without allocating (inside a signal handler).
struct LineBuf {
    buf: [u8; 256],
    len: usize,
}

impl Default for LineBuf {
    fn default() -> Self {
        Self { buf: [0; 256], len: 0 }
    }
}

impl LineBuf {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut v: i64) {
        if v < 0 {
            self.push(b"-");
            v = -v;
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rules_compile_in_both_modes_with_every_filter() {
        for mode in [Mode::On, Mode::Log] {
            let f = compile(mode).unwrap();
            for kind in [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Block, ThreadKind::Net] {
                assert!(!f[kind.filter_name()].is_empty(), "{kind:?}");
            }
        }
    }

    /// seccompiler drops an unconditional rule for a call that also has conditional ones (only the
    /// conditions would then allow it): the rules must not mix the two for one call.
    #[test]
    fn no_call_has_both_an_unconditional_and_a_conditional_rule() {
        let rules: serde_json::Value = serde_json::from_str(RULES).unwrap();
        for (name, filter) in rules.as_object().unwrap() {
            let rules = filter["filter"].as_array().unwrap();
            let plain: Vec<&str> = rules.iter().filter(|r| r.get("args").is_none()).map(|r| r["syscall"].as_str().unwrap()).collect();
            for r in rules.iter().filter(|r| r.get("args").is_some()) {
                assert!(!plain.contains(&r["syscall"].as_str().unwrap()), "{name}: {}", r["syscall"]);
            }
        }
    }

    #[test]
    fn names_and_numbers() {
        assert_eq!(names::SYSCALL_NAMES[110], "getppid");
        assert_eq!(names::SYSCALL_NAMES[16], "ioctl");
        let mut l = LineBuf::default();
        l.push(b"x ");
        l.push_number(-435);
        assert_eq!(&l.buf[..l.len], b"x -435");
    }
}
