//! Harness for nvmm's integration tests.
//!
//! Tests that need a real KVM run shell scripts inside "the lab": a QEMU TCG guest whose
//! kernel has a genuine `kvm_amd` with nested SVM (see `tools/lab.sh`). The guest artifacts
//! come from `tools/build-guest.sh`, the nvmm binary from `tools/test.sh`.
//!
//! ```no_run
//! use nvmm_tests::{nvmm_bin, Lab};
//! let run = Lab::new()
//!     .file(nvmm_bin(), "/lab/nvmm")
//!     .run("/lab/nvmm --help && echo HELP-OK");
//! run.assert_marker("HELP-OK");
//! run.assert_status(0);
//! ```

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};

pub mod guest;
pub mod multiboot;
pub mod net;
pub mod running;
pub mod tiny;

/// The workspace root (the parent of this crate's directory).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate has a parent directory")
        .to_path_buf()
}

/// A directory for a test's scratch files, `build/scratch/<name>` (git-ignored), created if
/// needed. Left in place after the run, to be looked at when a test fails.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = repo_root().join("build/scratch").join(name);
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("cannot create {}: {e}", dir.display()));
    dir
}

/// `build/guest`: the guest kernel and base initramfs. Panics if they have not been built.
pub fn guest_dir() -> PathBuf {
    let dir = repo_root().join("build/guest");
    for f in ["bzImage", "vmlinux", "initramfs.cpio"] {
        if !dir.join(f).is_file() {
            panic!(
                "{} is missing: build the guest artifacts with tools/build-guest.sh \
                 (or run the whole suite with tools/test.sh)",
                dir.join(f).display()
            );
        }
    }
    dir
}

/// The statically linked nvmm binary that runs inside the lab: `$NVMM_BIN` if set, else
/// `target/x86_64-unknown-linux-gnu/release/nvmm`. Panics if it does not exist.
pub fn nvmm_bin() -> PathBuf {
    let path = match std::env::var_os("NVMM_BIN") {
        Some(p) => PathBuf::from(p),
        None => repo_root().join("target/x86_64-unknown-linux-gnu/release/nvmm"),
    };
    if !path.is_file() {
        panic!(
            "nvmm binary {} not found: run tools/test.sh, which builds it statically \
             (or point NVMM_BIN at one)",
            path.display()
        );
    }
    path
}

/// Whether the tests run under CI (`CI` set, and not to `false` or `0`).
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// For a test that cannot run on this machine: says why, and under CI fails instead, so that a
/// skip is never taken for a pass there. Tests in this crate use it rather than returning early.
pub fn skip(why: &str) {
    assert!(!under_ci(), "test skipped under CI: {why}");
    eprintln!("skipped: {why}");
}

/// A wrapper for [`run_nvmm`]: a private mount namespace whose /dev is an empty tmpfs, so nvmm
/// finds no /dev/kvm while the host's stays untouched.
pub const WITHOUT_DEV: &[&str] =
    &["unshare", "--mount", "--propagation", "private", "sh", "-c", "mount -t tmpfs none /dev && exec \"$0\" \"$@\""];

/// What nvmm says when there is no /dev/kvm at all.
pub const NO_DEV_KVM: &str = "nvmm: error: /dev/kvm not found: load kvm_intel or kvm_amd (and enable virtualization in the firmware)";

/// Runs nvmm on this host with `args`, through `wrapper` (a command and its arguments that end by
/// running the next argument, e.g. `unshare --net --`) unless it is empty. Returns the exit status,
/// stdout and stderr.
pub fn run_nvmm(wrapper: &[&str], args: &[&str]) -> (Option<i32>, String, String) {
    let mut cmd = match wrapper.split_first() {
        Some((first, rest)) => {
            let mut c = Command::new(first);
            c.args(rest).arg(nvmm_bin());
            c
        }
        None => Command::new(nvmm_bin()),
    };
    let out = cmd.args(args).output().expect("run nvmm");
    (out.status.code(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

/// Asserts that nvmm (see [`run_nvmm`]) exits with status 1 and exactly one stderr line, an error
/// containing `expected`.
pub fn assert_one_line_error(wrapper: &[&str], args: &[&str], expected: &str) {
    let (code, _, stderr) = run_nvmm(wrapper, args);
    assert_eq!(code, Some(1), "args {args:?}: stderr {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line expected, got: {stderr}");
    assert!(stderr.starts_with("nvmm: error: "), "{stderr}");
    assert!(stderr.contains(expected), "expected '{expected}' in: {stderr}");
}

/// A run to be made in the lab. Build it with the methods below, then call [`Lab::run`].
#[derive(Debug, Clone)]
pub struct Lab {
    files: Vec<(PathBuf, String)>,
    bins: Vec<PathBuf>,
    drives: Vec<PathBuf>,
    cpus: u32,
    mem_mib: u32,
    timeout_secs: u64,
    append: Vec<String>,
    kill_on: Option<String>,
}

impl Default for Lab {
    fn default() -> Self {
        Self::new()
    }
}

impl Lab {
    /// 2 CPUs, 2048 MiB, 600 s timeout.
    pub fn new() -> Self {
        Lab {
            files: Vec::new(),
            bins: Vec::new(),
            drives: Vec::new(),
            cpus: 2,
            mem_mib: 2048,
            timeout_secs: 600,
            append: Vec::new(),
            kill_on: None,
        }
    }

    /// Put host file (or directory) `src` at absolute path `dst` in the guest.
    pub fn file(mut self, src: impl AsRef<Path>, dst: &str) -> Self {
        self.files.push((src.as_ref().to_path_buf(), dst.to_string()));
        self
    }

    /// Put a host program (path, or name looked up in PATH) and its shared libraries in the
    /// guest, at the program's own path.
    pub fn bin(mut self, path: impl AsRef<Path>) -> Self {
        self.bins.push(path.as_ref().to_path_buf());
        self
    }

    /// Attach a raw disk image as the next virtio-blk device (/dev/vda, /dev/vdb, ...).
    pub fn drive(mut self, path: impl AsRef<Path>) -> Self {
        self.drives.push(path.as_ref().to_path_buf());
        self
    }

    pub fn cpus(mut self, n: u32) -> Self {
        self.cpus = n;
        self
    }

    pub fn mem_mib(mut self, m: u32) -> Self {
        self.mem_mib = m;
        self
    }

    /// Wall-clock limit for the whole run, boot included.
    pub fn timeout(mut self, secs: u64) -> Self {
        self.timeout_secs = secs;
        self
    }

    /// Extra argument for the lab guest's kernel command line.
    pub fn append(mut self, arg: &str) -> Self {
        self.append.push(arg.to_string());
        self
    }

    /// Kill the whole lab, QEMU itself, with SIGKILL from the host as soon as a console line
    /// contains `marker`: a power cut for L1, whose page cache is lost while what it wrote to its
    /// drives stays (see tools/lab.sh). The run then has no status.
    pub fn kill_on(mut self, marker: &str) -> Self {
        self.kill_on = Some(marker.to_string());
        self
    }

    /// Boot the lab, run `script` with busybox sh, and collect the console. The console is
    /// echoed with `eprint!` as it arrives: libtest shows it when the test fails (or live
    /// with `--nocapture`).
    pub fn run(&self, script: &str) -> LabRun {
        guest_dir();
        let script_file = TempFile::new("lab-script.sh");
        std::fs::write(&script_file.0, script).expect("write the lab script");

        let mut args: Vec<String> = Vec::new();
        for (src, dst) in &self.files {
            args.push("--file".into());
            args.push(format!("{}:{}", src.display(), dst));
        }
        for b in &self.bins {
            args.push("--bin".into());
            args.push(b.display().to_string());
        }
        for d in &self.drives {
            args.push("--drive".into());
            args.push(d.display().to_string());
        }
        args.extend([
            "--cpus".into(),
            self.cpus.to_string(),
            "--mem".into(),
            self.mem_mib.to_string(),
            "--timeout".into(),
            self.timeout_secs.to_string(),
            "--append".into(),
            self.append.join(" "),
        ]);
        let pidfile = TempFile::new("qemu.pid");
        if self.kill_on.is_some() {
            args.push("--pidfile".into());
            args.push(pidfile.0.display().to_string());
        }
        args.push(script_file.0.display().to_string());

        // One stream for the console and lab.sh's own messages, in order.
        let mut child = Command::new("bash")
            .arg("-c")
            .arg("exec \"$0\" \"$@\" 2>&1")
            .arg(repo_root().join("tools/lab.sh"))
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start tools/lab.sh");
        let mut output = String::new();
        let mut reader = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = Vec::new();
        loop {
            line.clear();
            match reader.read_until(b'\n', &mut line) {
                Ok(0) => break,
                Ok(_) => {
                    let text = String::from_utf8_lossy(&line).replace('\r', "");
                    eprint!("{text}");
                    output.push_str(&text);
                    if self.kill_on.as_deref().is_some_and(|m| text.contains(m)) && !output.contains(KILLED) {
                        kill_qemu(&pidfile.0);
                        output.push_str(&format!("{KILLED}\n"));
                    }
                }
                Err(e) => panic!("reading the lab console: {e}"),
            }
        }
        let exit = child.wait().expect("wait for tools/lab.sh");
        let status = if output.contains("lab: no exit status") {
            None
        } else {
            exit.code()
        };
        LabRun { status, output }
    }
}

/// What [`Lab::kill_on`] adds to the run's output once it has killed QEMU.
pub const KILLED: &str = "lab: killed QEMU from the host";

/// SIGKILL to the QEMU process whose PID is in `pidfile`.
fn kill_qemu(pidfile: &Path) {
    let pid = std::fs::read_to_string(pidfile).unwrap_or_else(|e| panic!("QEMU's pidfile {}: {e}", pidfile.display()));
    let status = Command::new("kill").args(["-KILL", pid.trim()]).status().expect("run kill");
    assert!(status.success(), "kill -KILL {} failed", pid.trim());
    eprintln!("{KILLED} (pid {})", pid.trim());
}

/// The outcome of [`Lab::run`].
#[derive(Debug, Clone)]
pub struct LabRun {
    /// The script's exit status, from the guest's `NVMM-EXIT` line; `None` if the lab never
    /// got there (timeout, kernel panic, QEMU failure: the reason is in `output`).
    pub status: Option<i32>,
    /// The lab guest's console (with nested guests' output, if any) and lab.sh's messages.
    pub output: String,
}

impl LabRun {
    /// Whether the console contains `s`.
    pub fn has(&self, s: &str) -> bool {
        self.output.contains(s)
    }

    /// The value of the first `NAME=value` line on the console; panics if there is none.
    pub fn value(&self, name: &str) -> String {
        let prefix = format!("{name}=");
        self.output
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix.as_str()).map(|v| v.trim().to_string()))
            .unwrap_or_else(|| panic!("no {name}= line on the console; tail:\n{}", self.tail(40)))
    }

    /// Panic unless the console contains `s`.
    pub fn assert_marker(&self, s: &str) {
        if !self.has(s) {
            panic!(
                "marker {s:?} not in the lab console (status {:?}); console tail:\n{}",
                self.status,
                self.tail(40)
            );
        }
    }

    /// Panic unless the script exited with `status`.
    pub fn assert_status(&self, status: i32) {
        if self.status != Some(status) {
            panic!(
                "lab script status {:?}, expected {status}; console tail:\n{}",
                self.status,
                self.tail(40)
            );
        }
    }

    /// The last `n` lines of the console.
    pub fn tail(&self, n: usize) -> String {
        let lines: Vec<&str> = self.output.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }
}

/// A path in the temp dir, unique to this process and call, removed on drop.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str) -> Self {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        TempFile(std::env::temp_dir().join(format!("nvmm-{}-{n}-{name}", std::process::id())))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
