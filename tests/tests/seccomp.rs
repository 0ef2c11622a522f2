//! Seccomp filters on every thread (resources/seccomp/): checked on this machine's own /dev/kvm
//! with the tiny guest, which halts and leaves every thread of nvmm in place.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nvmm_tests::{nvmm_bin, scratch_dir, tiny};

fn halt_guest(dir: &str) -> String {
    let path = scratch_dir(dir).join("halt.elf");
    std::fs::write(&path, tiny::halt_elf()).unwrap();
    path.display().to_string()
}

/// The `Seccomp:` mode of every thread of `pid`, by thread name.
fn modes(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let status = std::fs::read_to_string(task.unwrap().path().join("status")).unwrap_or_default();
        let field = |k: &str| status.lines().find_map(|l| l.strip_prefix(k)).unwrap_or_default().trim().to_string();
        out.push((field("Name:"), field("Seccomp:")));
    }
    out
}

fn wait_for_threads(child: &mut Child, at_least: usize) {
    let start = Instant::now();
    while modes(child.id()).len() < at_least {
        assert!(child.try_wait().unwrap().is_none(), "nvmm ended early");
        assert!(start.elapsed() < Duration::from_secs(10), "nvmm did not start its threads");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// With a disk, a TAP (in a network namespace of nvmm's own) and the API socket after a request,
/// every thread (main, vcpu0, both device loops, nvmm-api and tiny_http's) is in filter mode.
#[test]
fn every_thread_runs_under_a_filter() {
    let dir = scratch_dir("seccomp-threads");
    let halt = halt_guest("seccomp-threads");
    let image = dir.join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let socket = dir.join("api.sock");
    let _ = std::fs::remove_file(&socket);
    let mut child = Command::new("unshare")
        .args(["--net", "--"])
        .arg(nvmm_bin())
        .args(["--kernel", &halt, "--disk", &format!("path={}", image.display()), "--net", "tap=nvmmsc0"])
        .arg("--api-socket")
        .arg(&socket)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // main, tiny_http's acceptor, nvmm-api, two device loops, vcpu0.
    wait_for_threads(&mut child, 6);
    let info = Command::new(nvmm_bin()).arg("ctl").arg(&socket).arg("info").output().unwrap();
    assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));
    let threads = modes(child.id());
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let names: Vec<&str> = threads.iter().map(|(n, _)| n.as_str()).collect();
    for wanted in ["vcpu0", "nvmm-virtio0", "nvmm-virtio1", "nvmm-api"] {
        assert!(names.contains(&wanted), "no {wanted} thread in {names:?}");
    }
    for (name, mode) in &threads {
        assert_eq!(mode, "2", "thread {name} is not under a filter: {threads:?}; {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// A vCPU thread that makes a call its filter does not allow (the test hook makes it call
/// getppid) ends nvmm with one line naming the thread and the call.
#[test]
fn a_forbidden_call_on_a_vcpu_ends_nvmm_with_one_line() {
    let halt = halt_guest("seccomp-probe");
    let out = Command::new(nvmm_bin())
        .args(["--kernel", &halt])
        .env("NVMM_TEST_SECCOMP_PROBE", "vcpu")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("nvmm: error: seccomp: thread vcpu0 made a forbidden system call: getppid (110)"), "{stderr}");
}

/// `--seccomp log` lets the same call through (the kernel logs it), and `--seccomp off` installs
/// nothing.
#[test]
fn log_and_off_modes() {
    let halt = halt_guest("seccomp-modes");
    for (mode, expected) in [("log", "2"), ("off", "0")] {
        let mut child = Command::new(nvmm_bin())
            .args(["--kernel", &halt, "--seccomp", mode])
            .env("NVMM_TEST_SECCOMP_PROBE", "vcpu")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_threads(&mut child, 2);
        std::thread::sleep(Duration::from_millis(300));
        assert!(child.try_wait().unwrap().is_none(), "--seccomp {mode}: nvmm ended");
        let threads = modes(child.id());
        let _ = child.kill();
        let _ = child.wait();
        assert!(threads.iter().all(|(_, m)| m == expected), "--seccomp {mode}: {threads:?}");
    }
}
