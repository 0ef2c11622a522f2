//! SIGTERM and SIGINT stop the VM in order (vCPUs, then devices, then every disk flushed) and nvmm
//! exits with 128 + the signal number. Run on this machine's own /dev/kvm with the tiny guest.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nvmm_tests::{nvmm_bin, scratch_dir, tiny};

/// Starts nvmm with a halting guest and a disk, sends `sig` once it runs; returns its exit code
/// and stderr.
fn stop_with(sig: i32, name: &str) -> (Option<i32>, String) {
    let dir = scratch_dir(&format!("signal-{name}"));
    let halt = dir.join("halt.elf");
    std::fs::write(&halt, tiny::halt_elf()).unwrap();
    let image = dir.join("disk.img");
    std::fs::File::create(&image).unwrap().set_len(1 << 20).unwrap();
    let mut child = Command::new(nvmm_bin())
        .args(["--kernel", halt.to_str().unwrap(), "--disk", &format!("path={}", image.display()), "--log-level", "info"])
        .stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let pid = child.id();
    let start = Instant::now();
    // The vCPU and device threads exist once the VM runs.
    while std::fs::read_dir(format!("/proc/{pid}/task")).map(|d| d.count() < 3).unwrap_or(false) {
        assert!(start.elapsed() < Duration::from_secs(10), "nvmm did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: kill(2) on our own child's pid, which it keeps until we wait for it.
    assert_eq!(unsafe { libc::kill(pid as i32, sig) }, 0);
    let stopped = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if stopped.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("nvmm still running 10 s after {name}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn sigterm_stops_in_order_and_exits_143() {
    let (code, stderr) = stop_with(libc::SIGTERM, "SIGTERM");
    assert_eq!(code, Some(143), "{stderr}");
    assert!(stderr.contains("nvmm: info: stopped on SIGTERM: 1 disks flushed"), "{stderr}");
    // Every thread ended and nvmm's own exit report was written.
    assert!(stderr.contains("nvmm: info: memory: peak RSS"), "{stderr}");
    assert!(!stderr.contains("through the API"), "{stderr}");
}

/// Without a terminal (stdin is /dev/null here) SIGINT does the same, with 130.
#[test]
fn sigint_without_a_terminal_stops_in_order_and_exits_130() {
    let (code, stderr) = stop_with(libc::SIGINT, "SIGINT");
    assert_eq!(code, Some(130), "{stderr}");
    assert!(stderr.contains("nvmm: info: stopped on SIGINT: 1 disks flushed"), "{stderr}");
}

/// On a terminal (a pseudo-terminal from `script`), nvmm puts it in raw mode while the guest runs
/// and gives it back as it was after an orderly stop on SIGTERM.
#[test]
fn sigterm_restores_the_terminal() {
    let dir = scratch_dir("signal-tty");
    let halt = dir.join("halt.elf");
    std::fs::write(&halt, tiny::halt_elf()).unwrap();
    let inner = format!(
        "stty -g; {} --kernel {} </dev/tty & p=$!; sleep 1; stty -g; kill -TERM $p; wait $p; echo status $?; stty -g",
        nvmm_bin().display(),
        halt.display()
    );
    let out = Command::new("timeout").args(["30", "script", "-qec", &inner, "/dev/null"]).stdin(Stdio::null()).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    let lines: Vec<&str> = text.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert_ne!(lines[1], lines[0], "the terminal was not in raw mode while nvmm ran: {text}");
    assert_eq!(lines[2], "status 143", "{text}");
    assert_eq!(lines[3], lines[0], "the terminal was not restored: {text}");
}
