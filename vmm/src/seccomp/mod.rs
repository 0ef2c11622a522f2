//! Seccomp filters, one per kind of thread, from the rules in `resources/seccomp/x86_64.json`,
//! compiled to BPF at build time (`vmm/build/seccomp.rs`): nvmm parses no JSON when it starts.
//!
//! The main thread installs its filter first thing in `builder::build_and_run`, so every thread
//! started afterwards (vCPUs, device loops, the API thread and tiny_http's own threads) runs under
//! it; vCPU and device-loop threads add their own, narrower filter when they start
//! ([`enter`]). A forbidden call in `on` mode traps: the SIGSYS handler writes one line naming the
//! thread and the call, restores the terminal and ends nvmm with status 1. In `log` mode the
//! kernel lets the call through and logs it.

mod names;

use std::cell::Cell;
use std::sync::OnceLock;

use seccompiler::sock_filter;

/// The BPF programs the build compiled from the rules: `TRAP` and `LOG`, each a table of
/// `(filter name, program)` with the default action of `--seccomp on` and `--seccomp log`.
mod compiled {
    include!(concat!(env!("OUT_DIR"), "/seccomp_filters.rs"));
}

/// A table of compiled filters, by filter name.
type Filters = &'static [(&'static str, &'static [sock_filter])];

#[derive(Debug, thiserror::Error)]
pub enum Error {
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
    const ALL: [ThreadKind; 4] = [ThreadKind::Main, ThreadKind::Vcpu, ThreadKind::Block, ThreadKind::Net];

    fn filter_name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Block => "virtio-block",
            ThreadKind::Net => "virtio-net",
        }
    }
}

/// The filters of the `--seccomp` mode, once it is not `off`.
static FILTERS: OnceLock<Filters> = OnceLock::new();

/// The compiled filters of `mode`; none for `off`.
fn filters_of(mode: Mode) -> Option<Filters> {
    match mode {
        Mode::Off => None,
        Mode::Log => Some(compiled::LOG),
        Mode::On => Some(compiled::TRAP),
    }
}

/// The program of `kind` in `filters`.
fn filter(filters: Filters, kind: ThreadKind) -> Result<&'static [sock_filter], Error> {
    let name = kind.filter_name();
    filters.iter().find(|(n, _)| *n == name).map(|(_, program)| *program).ok_or(Error::NoFilter(name))
}

/// Installs the SIGSYS handler and confines the calling (main) thread with the filters of
/// `mode`. Nothing at all with `Mode::Off`.
pub fn install(mode: Mode) -> Result<(), Error> {
    let Some(filters) = filters_of(mode) else {
        return Ok(());
    };
    for kind in ThreadKind::ALL {
        filter(filters, kind)?;
    }
    install_sigsys_handler()?;
    // A second install (tests) keeps the first set: the rules are the same.
    let _ = FILTERS.set(filters);
    enter(ThreadKind::Main, "main")
}

/// Confines the calling thread, named `name` in messages, with the filter of `kind`, on top of the
/// main thread's it inherited. Does nothing when filters are off.
pub fn enter(kind: ThreadKind, name: &str) -> Result<(), Error> {
    let Some(&filters) = FILTERS.get() else {
        return Ok(());
    };
    set_thread_name(name);
    let program = filter(filters, kind)?;
    seccompiler::apply_filter(program).map_err(|err| Error::Apply { thread: name.to_string(), err })?;
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

    /// The rules, for checks of the JSON itself.
    const RULES: &str = include_str!("../../../resources/seccomp/x86_64.json");

    /// The actions a program can end a call with (`ret #k`).
    fn returns(program: &[sock_filter]) -> Vec<u32> {
        let ret = (libc::BPF_RET | libc::BPF_K) as u16;
        program.iter().filter(|i| i.code == ret).map(|i| i.k).collect()
    }

    /// Each mode's table has exactly one non-empty program per kind of thread, and a program
    /// ends a forbidden call with its mode's action (the build replaced the default action), never
    /// the other mode's.
    #[test]
    fn the_embedded_filters_are_one_program_per_thread_kind_in_both_modes() {
        for (mode, action, other) in [(Mode::On, libc::SECCOMP_RET_TRAP, libc::SECCOMP_RET_LOG), (Mode::Log, libc::SECCOMP_RET_LOG, libc::SECCOMP_RET_TRAP)] {
            let filters = filters_of(mode).unwrap();
            assert_eq!(filters.len(), ThreadKind::ALL.len(), "{mode:?}");
            for kind in ThreadKind::ALL {
                assert_eq!(filters.iter().filter(|(n, _)| *n == kind.filter_name()).count(), 1, "{mode:?} {kind:?}");
                let program = filter(filters, kind).unwrap();
                assert!(!program.is_empty(), "{mode:?} {kind:?}");
                let returns = returns(program);
                assert!(returns.contains(&action) && !returns.contains(&other), "{mode:?} {kind:?}: {returns:x?}");
                assert!(returns.contains(&libc::SECCOMP_RET_ALLOW), "{mode:?} {kind:?}: {returns:x?}");
            }
        }
        assert!(filters_of(Mode::Off).is_none());
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
