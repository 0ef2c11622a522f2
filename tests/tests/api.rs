//! The control API (`--api-socket`, `nvmm ctl`) on this machine's own /dev/kvm, with the counting
//! tiny guest: pause stops its output and its vCPU thread's CPU time, resume carries on from the
//! next count, wrong states get 409 and bad requests 400 with nvmm still answering, and shutdown
//! ends nvmm with status 0 and no socket left behind.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::Duration;

use nvmm_tests::running::{Nvmm, WAIT};
use nvmm_tests::{assert_one_line_error, run_nvmm, scratch_dir, tiny};

/// nvmm running the counting guest in the scratch directory `name`, with the API socket
/// `api.sock` there and more nvmm arguments `extra` (`{dir}` in them stands for that directory).
/// Returns once the guest has printed 3 lines.
fn start(name: &str, extra: &[&str]) -> Nvmm {
    let dir = scratch_dir(name);
    let extra: Vec<String> = extra.iter().map(|a| a.replace("{dir}", dir.to_str().unwrap())).collect();
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let vm = Nvmm::boot_counter(&dir, "api", &extra);
    vm.wait_for_lines(3);
    assert!(vm.socket().exists(), "no socket at {}", vm.socket().display());
    vm
}

/// Every line is the next count: nothing skipped, nothing repeated, no second start.
fn assert_consecutive(lines: &[String]) {
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(u64::from_str_radix(line, 16).ok(), Some(i as u64 + 1), "line {i} of {lines:?}");
    }
}

#[test]
fn pause_stops_the_guest_and_its_vcpu_and_resume_carries_on() {
    let vm = start("api-pause", &[]);
    let info = vm.ctl_ok(&["info"]);
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["cpus"], 1);
    assert_eq!(info["memory_bytes"], 256u64 << 20);
    assert_eq!(info["nested"], false);
    assert!(info["vcpus"][0]["exits"].as_u64().unwrap() > 0, "{info}");

    let running_from = vm.thread_cpu_ticks("vcpu0");
    thread::sleep(Duration::from_secs(1));
    let running_ticks = vm.thread_cpu_ticks("vcpu0") - running_from;

    assert_eq!(vm.ctl_ok(&["pause"]), serde_json::json!({ "state": "paused" }));
    // A line the guest wrote just before may still be in the pipe.
    thread::sleep(Duration::from_millis(200));
    let (lines, ticks) = (vm.count(), vm.thread_cpu_ticks("vcpu0"));
    let exits = vm.ctl_ok(&["info"])["vcpus"][0]["exits"].as_u64().unwrap();
    thread::sleep(Duration::from_millis(1500));
    assert_eq!(vm.count(), lines, "the guest printed while paused");
    let paused_ticks = vm.thread_cpu_ticks("vcpu0") - ticks;
    eprintln!("vcpu0: {running_ticks} ticks in 1 s running, {paused_ticks} in 1.5 s paused");
    assert!(paused_ticks <= 1, "vcpu0 used {paused_ticks} ticks paused (running: {running_ticks} in 1 s)");
    assert!(running_ticks > paused_ticks, "vcpu0 used no CPU running either: the measure means nothing");
    let info = vm.ctl_ok(&["info"]);
    assert_eq!(info["state"], "paused");
    assert_eq!(info["vcpus"][0]["exits"].as_u64().unwrap(), exits, "exits counted while paused");

    let (code, _, err) = vm.ctl(&["pause"]);
    assert_eq!(code, Some(1));
    assert_eq!(err.trim_end(), "nvmm: error: 409: the VM is already paused");

    assert_eq!(vm.ctl_ok(&["resume"]), serde_json::json!({ "state": "running" }));
    vm.wait_for_lines(lines + 5);
    assert_consecutive(&vm.lines());
    assert_eq!(vm.ctl_ok(&["info"])["state"], "running");
    let (code, _, err) = vm.ctl(&["resume"]);
    assert_eq!(code, Some(1));
    assert_eq!(err.trim_end(), "nvmm: error: 409: the VM is not paused");

    assert_eq!(vm.ctl_ok(&["shutdown"]), serde_json::json!({ "state": "shut down", "disks_flushed": 0 }));
    let socket = vm.socket().to_path_buf();
    assert_eq!(vm.wait_for_exit(), Some(0));
    assert!(!socket.exists(), "socket left behind");
}

/// Two vCPUs, the second never started by the guest (it waits for INIT/SIPI inside KVM_RUN), and a
/// disk, whose device loop is parked and unparked: all pause and resume, and shutdown flushes the disk.
#[test]
fn two_vcpus_and_a_disk_pause_resume_and_shut_down() {
    let disk = scratch_dir("api-two").join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let vm = start("api-two", &["--cpus", "2", "--disk", "path={dir}/disk.img"]);
    let info = vm.ctl_ok(&["info"]);
    assert_eq!(info["cpus"], 2);
    assert_eq!(info["vcpus"].as_array().unwrap().len(), 2, "{info}");
    assert_eq!(vm.ctl_ok(&["pause"])["state"], "paused");
    thread::sleep(Duration::from_millis(200));
    let lines = vm.count();
    thread::sleep(Duration::from_millis(500));
    assert_eq!(vm.count(), lines, "the guest printed while paused");
    assert_eq!(vm.ctl_ok(&["info"])["state"], "paused");
    assert_eq!(vm.ctl_ok(&["resume"])["state"], "running");
    vm.wait_for_lines(lines + 5);
    assert_consecutive(&vm.lines());
    // Shutdown from a running VM pauses it first.
    assert_eq!(vm.ctl_ok(&["shutdown"]), serde_json::json!({ "state": "shut down", "disks_flushed": 1 }));
    assert_eq!(vm.wait_for_exit(), Some(0));
}

/// One raw HTTP/1.1 exchange; the status and the body.
fn http(socket: &Path, method: &str, path: &str, body: &[u8]) -> (u16, String) {
    let mut s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    let head = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n", body.len());
    s.write_all(head.as_bytes()).unwrap();
    // The server may answer before reading a body it refuses, and close.
    let _ = s.write_all(body);
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let status = answer.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = answer.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (status, body)
}

fn error_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{body:?}: {e}"));
    let e = v["error"].as_str().unwrap_or_else(|| panic!("no error field in {body}")).to_string();
    assert!(!e.contains('\n'));
    e
}

#[test]
fn bad_requests_are_refused_and_nvmm_keeps_answering() {
    let vm = start("api-bad", &[]);
    let s = vm.socket();
    let (code, body) = http(s, "PUT", "/vm/pause", b"{not json");
    assert_eq!(code, 400, "{body}");
    assert!(error_of(&body).starts_with("malformed JSON body"), "{body}");
    let (code, body) = http(s, "PUT", "/vm/pause", br#"{"when": "now"}"#);
    assert_eq!((code, error_of(&body).as_str()), (400, "malformed JSON body: unknown field 'when'"));
    let (code, body) = http(s, "PUT", "/vm/pause", &vec![b' '; 64 * 1024]);
    assert_eq!((code, error_of(&body).as_str()), (400, "request body over 4096 bytes"));
    let (code, body) = http(s, "GET", "/vm/pause", b"");
    assert_eq!((code, error_of(&body).as_str()), (405, "GET is not allowed on /vm/pause"));
    let (code, body) = http(s, "GET", "/snapshot", b"");
    assert_eq!((code, error_of(&body).as_str()), (404, "no such route: /snapshot"));

    // Still running, still answering, and a well-formed body is fine.
    let lines = vm.count();
    vm.wait_for_lines(lines + 3);
    let (code, body) = http(s, "GET", "/vm", b"");
    assert_eq!(code, 200, "{body}");
    assert_eq!(serde_json::from_str::<serde_json::Value>(&body).unwrap()["state"], "running");
    assert_eq!(http(s, "PUT", "/vm/pause", b"{}"), (200, r#"{"state":"paused"}"#.to_string()));
    let (code, body) = http(s, "PUT", "/vm/pause", b"");
    assert_eq!((code, error_of(&body).as_str()), (409, "the VM is already paused"));
    assert_eq!(http(s, "PUT", "/vm/shutdown", b"").0, 200);
    assert_eq!(vm.wait_for_exit(), Some(0));
}

#[test]
fn a_socket_path_that_exists_or_cannot_be_made_is_refused() {
    let dir = scratch_dir("api-paths");
    let elf = dir.join("counter.elf");
    tiny::write_counter_elf(&elf);
    let taken = dir.join("taken.sock");
    std::fs::write(&taken, b"not ours").unwrap();
    let k = elf.to_str().unwrap();
    assert_one_line_error(&[], &["--kernel", k, "--api-socket", taken.to_str().unwrap()], "already exists: remove it, or choose another path");
    assert_eq!(std::fs::read(&taken).unwrap(), b"not ours", "an existing file was touched");
    assert_one_line_error(&[], &["--kernel", k, "--api-socket", "/nonexistent/dir/api.sock"], "cannot create API socket /nonexistent/dir/api.sock");
}

#[test]
fn ctl_without_a_server_is_one_line() {
    assert_one_line_error(&[], &["ctl", "/nonexistent/api.sock", "info"], "cannot connect to API socket /nonexistent/api.sock");
}

/// The guest ending by itself (the banner guest resets) removes the socket too.
#[test]
fn the_socket_goes_when_the_guest_resets() {
    let dir = scratch_dir("api-reset");
    let elf = dir.join("tiny.elf");
    tiny::write_elf(&elf);
    let socket = dir.join("api.sock");
    let _ = std::fs::remove_file(&socket);
    let (code, _, err) = run_nvmm(&[], &["--kernel", elf.to_str().unwrap(), "--api-socket", socket.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(!socket.exists());
}
