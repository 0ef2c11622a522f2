//! Bad input ends with one clear line on stderr and a nonzero status, before any guest runs.
//! These run nvmm on this machine's own /dev/kvm: every check here fails before the first KVM_RUN.

use std::path::{Path, PathBuf};

use nvmm_tests::{assert_one_line_error, guest_dir, run_nvmm, scratch_dir, NO_DEV_KVM, WITHOUT_DEV};

fn kernel() -> String {
    guest_dir().join("bzImage").display().to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn truncated_copy(src: &Path, name: &str, keep: usize) -> PathBuf {
    let bytes = std::fs::read(src).unwrap();
    let path = scratch_dir("errors").join(name);
    std::fs::write(&path, &bytes[..keep.min(bytes.len())]).unwrap();
    path
}

#[test]
fn missing_kernel() {
    assert_one_line_error(&[], &["--kernel", "/nonexistent/bzImage"], "cannot open kernel /nonexistent/bzImage: No such file");
}

#[test]
fn kernel_is_a_directory_or_unreadable() {
    assert_one_line_error(&[], &["--kernel", "/etc"], "/etc");
}

#[test]
fn file_that_is_not_a_kernel() {
    assert_one_line_error(&[], &["--kernel", "/etc/passwd"], "/etc/passwd is not a Linux kernel");
}

#[test]
fn truncated_bzimage() {
    let len = std::fs::metadata(kernel()).unwrap().len() as usize;
    let p = truncated_copy(Path::new(&kernel()), "bzImage.half", len / 2);
    assert_one_line_error(&[], &["--kernel", s(&p)], "is truncated");
}

#[test]
fn truncated_vmlinux() {
    let p = truncated_copy(&guest_dir().join("vmlinux"), "vmlinux.head", 1 << 20);
    assert_one_line_error(&[], &["--kernel", s(&p)], "cannot load kernel");
}

#[test]
fn missing_initrd() {
    assert_one_line_error(&[], &["--kernel", &kernel(), "--initrd", "/nonexistent.cpio"], "cannot open initrd /nonexistent.cpio");
}

#[test]
fn initrd_that_does_not_fit() {
    let p = scratch_dir("errors").join("big.initrd");
    std::fs::File::create(&p).unwrap().set_len(48 << 20).unwrap();
    assert_one_line_error(&[], &["--kernel", &kernel(), "--initrd", s(&p), "--mem", "32M"], "does not fit in guest memory");
}

#[test]
fn memory_too_small_for_the_kernel() {
    let vmlinux = guest_dir().join("vmlinux");
    assert_one_line_error(&[], &["--kernel", s(&vmlinux), "--mem", "16M"], "more than --mem gives (16 MiB)");
}

#[test]
fn memory_below_the_minimum() {
    assert_one_line_error(&[], &["--kernel", &kernel(), "--mem", "4M"], "--mem 4 MiB is too small");
}

#[test]
fn memory_more_than_the_host_has() {
    assert_one_line_error(&[], &["--kernel", &kernel(), "--mem", "64T"], "more than this host's");
}

#[test]
fn command_line_too_long() {
    let long = "x".repeat(5000);
    // The length counts what nvmm appends too (` pci=off`).
    assert_one_line_error(&[], &["--kernel", &kernel(), "--cmdline", &long], "kernel command line is 5008 bytes; this kernel accepts at most");
}

#[test]
fn no_kvm_device() {
    let (code, _, stderr) = run_nvmm(WITHOUT_DEV, &["--kernel", &kernel()]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.trim(), NO_DEV_KVM);
}

#[test]
fn no_permission_on_kvm_device() {
    assert_one_line_error(
        &["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"],
        &["--kernel", &kernel()],
        "no permission to open /dev/kvm: run as root or add this user to the 'kvm' group",
    );
}

#[test]
fn missing_kernel_flag_and_bad_values() {
    assert_one_line_error(&[], &[], "--kernel is required");
    // clap's own refusals are one line and status 1 too, naming the flag and the value.
    for (args, expected) in [
        (&["--kernel", "k", "--cpus", "0"][..], "'0' for '--cpus"),
        (&["--kernel", "k", "--cpus", "65"], "'65' for '--cpus"),
        (&["--kernel", "k", "--mem", "0"], "'0' for '--mem"),
        (&["--kernel", "k", "--mem", "lots"], "invalid size 'lots'"),
        (&["--kernel", "k", "--disk", "ro=on"], "path=FILE is required"),
        (&["--kernel", "k", "--disk", "path=/a,readonly=maybe"], "readonly takes on or off"),
        (&["--kernel", "k", "--frobnicate"], "'--frobnicate'"),
        (&["bench"], "a subcommand is required"),
    ] {
        assert_one_line_error(&[], args, expected);
    }
}

#[test]
fn help_and_version_go_to_stdout_with_status_0() {
    for (flag, expected) in [("--help", "--kernel <PATH>"), ("--version", "nvmm ")] {
        let (code, stdout, stderr) = run_nvmm(&[], &[flag]);
        assert_eq!(code, Some(0), "{flag}: {stderr}");
        assert!(stdout.contains(expected), "{flag}: {stdout}");
        assert_eq!(stderr, "", "{flag}");
    }
}

#[test]
fn memory_that_is_not_whole_pages() {
    assert_one_line_error(&[], &["--kernel", &kernel(), "--mem", "262145K"], "--mem 262145K is not a whole number of 4096-byte pages");
}

/// Runs nvmm with `args`, killing it if it has not ended within 10 s (then the test fails).
fn run_nvmm_bounded(args: &[&str]) -> (Option<i32>, String) {
    use std::io::Read;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let mut child = Command::new(nvmm_tests::nvmm_bin()).args(args).stdin(Stdio::null()).stdout(Stdio::null())
        .stderr(Stdio::piped()).spawn().unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > Duration::from_secs(10) {
            child.kill().unwrap();
            child.wait().unwrap();
            panic!("nvmm {args:?} still running after 10 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child.stderr.take().unwrap().read_to_string(&mut stderr).unwrap();
    (status.code(), stderr)
}

fn assert_bounded_one_line_error(args: &[&str], expected: &str) {
    let (code, stderr) = run_nvmm_bounded(args);
    assert_eq!(code, Some(1), "{args:?}: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("nvmm: error: ") && stderr.contains(expected), "expected '{expected}' in: {stderr}");
}

#[test]
fn kernel_and_initrd_must_be_regular_files() {
    let fifo = scratch_dir("errors").join("kernel.fifo");
    let _ = std::fs::remove_file(&fifo);
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success(), "mkfifo");
    // No writer ever opens the FIFO: reading it would wait forever.
    assert_bounded_one_line_error(&["--kernel", s(&fifo)], "it is a FIFO, not a regular file");
    assert_bounded_one_line_error(&["--kernel", "/dev/zero"], "cannot use /dev/zero as the kernel: it is a character device");
    assert_bounded_one_line_error(&["--kernel", "/etc"], "cannot use /etc as the kernel: it is a directory");
    assert_bounded_one_line_error(&["--kernel", &kernel(), "--initrd", s(&fifo)], "as the initrd: it is a FIFO");
    assert_bounded_one_line_error(&["--kernel", &kernel(), "--initrd", "/dev/zero"], "as the initrd: it is a character device");
}

#[test]
fn bench_console_with_a_huge_count_is_an_error_not_a_crash() {
    let p = scratch_dir("errors").join("huge-count.console");
    std::fs::write(&p, format!("nvmm-bench-raw loop {}\n00000001\n", u64::MAX)).unwrap();
    let (code, stderr) = run_nvmm_bounded(&["bench", "exits", "--from-console", s(&p)]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("nvmm: error: "), "{stderr}");
}

#[test]
fn disk_that_cannot_be_opened() {
    assert_one_line_error(&[], &["--kernel", &kernel(), "--disk", "path=/nonexistent/disk.img"], "cannot open disk image /nonexistent/disk.img read-write: No such file");
    assert_one_line_error(&[], &["--kernel", &kernel(), "--disk", "path=/etc"], "cannot open disk image /etc");
}

#[test]
fn bad_tap_name_and_mac() {
    assert_one_line_error(&[], &["--kernel", &kernel(), "--net", "tap=averyveryverylongtapname"], "TAP name 'averyveryverylongtapname' is longer than 15 bytes");
    assert_one_line_error(&[], &["--kernel", &kernel(), "--net", "tap=nvmmt0,mac=02:00:00:00:00"], "invalid MAC address '02:00:00:00:00'");
}
