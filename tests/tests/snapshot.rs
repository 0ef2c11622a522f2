//! Snapshot and restore on this machine's own /dev/kvm, with the counting tiny guest: paused,
//! saved, its nvmm killed with SIGKILL, restored by a new nvmm, the count goes on from where it
//! stopped; one snapshot restored twice gives the same continuation; and every bad input (a
//! missing, foreign, truncated, corrupted or other-version snapshot, a short memory file, a disk
//! that changed, a destination that cannot be written, a VM that is running) is one line and
//! loses nothing.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use nvmm_tests::{assert_one_line_error, nvmm_bin, run_nvmm, scratch_dir, tiny};

const WAIT: Duration = Duration::from_secs(20);

/// An nvmm process with an API socket, its console lines collected as they come. Killed on drop.
struct Nvmm {
    child: Child,
    socket: PathBuf,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Nvmm {
    /// The counting guest booted fresh in `dir`, with `extra` arguments.
    fn boot(dir: &Path, extra: &[&str]) -> Nvmm {
        let elf = dir.join("counter.elf");
        tiny::write_counter_elf(&elf);
        let mut args = vec!["--kernel".to_string(), elf.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(dir, "boot", &args)
    }

    /// A new nvmm restoring `snapshot`.
    fn restore(dir: &Path, name: &str, snapshot: &Path, extra: &[&str]) -> Nvmm {
        let mut args = vec!["--restore".to_string(), snapshot.display().to_string()];
        args.extend(extra.iter().map(|s| s.to_string()));
        Self::spawn(dir, name, &args)
    }

    fn spawn(dir: &Path, name: &str, args: &[String]) -> Nvmm {
        let socket = dir.join(format!("{name}.sock"));
        let _ = std::fs::remove_file(&socket);
        let mut child = Command::new(nvmm_bin())
            .args(args)
            .args(["--api-socket", socket.to_str().unwrap()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start nvmm");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                sink.lock().unwrap().push(line);
            }
        });
        let mut vm = Nvmm { child, socket, lines };
        let t = Instant::now();
        while !vm.socket.exists() {
            if let Some(status) = vm.child.try_wait().unwrap() {
                panic!("nvmm {args:?} exited with {status} before serving its socket");
            }
            assert!(t.elapsed() < WAIT, "no socket at {}", vm.socket.display());
            thread::sleep(Duration::from_millis(10));
        }
        vm
    }

    fn lines(&self) -> Vec<String> {
        self.lines.lock().unwrap().clone()
    }

    fn wait_for_lines(&self, n: usize) {
        let t = Instant::now();
        while self.lines.lock().unwrap().len() < n {
            assert!(t.elapsed() < WAIT, "the guest printed {:?}, waited for {n} lines", self.lines());
            thread::sleep(Duration::from_millis(10));
        }
    }

    fn ctl(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let mut all = vec!["ctl", self.socket.to_str().unwrap()];
        all.extend_from_slice(args);
        run_nvmm(&[], &all)
    }

    fn ctl_ok(&self, args: &[&str]) -> serde_json::Value {
        let (code, out, err) = self.ctl(args);
        assert_eq!(code, Some(0), "ctl {args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("ctl {args:?} printed {out:?}: {e}"))
    }

    /// Pauses, lets a line already in the pipe arrive, and returns the last count printed.
    fn pause(&self) -> u64 {
        assert_eq!(self.ctl_ok(&["pause"])["state"], "paused");
        thread::sleep(Duration::from_millis(200));
        let lines = self.lines();
        count_of(lines.last().expect("no line before the pause"))
    }

    fn snapshot(&self, dest: &Path) -> serde_json::Value {
        self.ctl_ok(&["snapshot", dest.to_str().unwrap()])
    }

    fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    fn shutdown(mut self) {
        assert_eq!(self.ctl_ok(&["shutdown"])["state"], "shut down");
        let t = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert_eq!(status.code(), Some(0));
                return;
            }
            assert!(t.elapsed() < WAIT, "nvmm did not exit");
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Nvmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn count_of(line: &str) -> u64 {
    u64::from_str_radix(line, 16).unwrap_or_else(|_| panic!("not a count: {line:?}"))
}

/// The lines are `first`, `first + 1`, ...: nothing skipped, nothing repeated, no second start.
fn assert_counts_from(lines: &[String], first: u64) {
    for (i, line) in lines.iter().enumerate() {
        assert_eq!(count_of(line), first + i as u64, "line {i} of {lines:?}");
    }
}

/// A counting guest paused at some count, saved into `dir/snap`, and killed with SIGKILL.
fn saved_counter(dir: &Path, extra: &[&str]) -> (PathBuf, u64) {
    let vm = Nvmm::boot(dir, extra);
    vm.wait_for_lines(5);
    let last = vm.pause();
    let snap = dir.join("snap");
    let answer = vm.snapshot(&snap);
    assert_eq!(answer["state"], "paused", "{answer}");
    thread::sleep(Duration::from_millis(300));
    assert_eq!(count_of(vm.lines().last().unwrap()), last, "the guest printed after the snapshot");
    vm.kill9();
    (snap, last)
}

#[test]
fn snapshot_kill_restore_and_the_count_goes_on() {
    let dir = scratch_dir("snap-restore");
    let vm = Nvmm::boot(&dir, &[]);
    vm.wait_for_lines(5);
    // Running: refused, and nothing written.
    let (code, _, err) = vm.ctl(&["snapshot", dir.join("early").to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert_eq!(err.trim_end(), "nvmm: error: 409: a snapshot needs a paused VM: pause it first");
    assert!(!dir.join("early").exists());

    let last = vm.pause();
    let snap = dir.join("snap");
    let answer = vm.snapshot(&snap);
    assert_eq!(answer["state"], "paused", "{answer}");
    vm.kill9();

    // Sparse: the tiny guest touches a few pages of its 256 MiB.
    let mem = std::fs::metadata(snap.join("memory")).unwrap();
    assert_eq!(mem.len(), 256 << 20);
    assert!(mem.blocks() * 512 < 8 << 20, "memory file takes {} bytes on disk", mem.blocks() * 512);
    let (code, out, err) = run_nvmm(&[], &["snapshot-info", snap.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(info["format_version"], 1);
    assert_eq!(info["machine"]["cpus"], 1);
    assert_eq!(info["vcpus"][0]["guest_mode"], false);

    let again = Nvmm::restore(&dir, "restored", &snap, &[]);
    again.wait_for_lines(10);
    assert_counts_from(&again.lines(), last + 1);
    assert_eq!(again.ctl_ok(&["info"])["state"], "running");
    again.shutdown();
}

#[test]
fn one_snapshot_restored_twice_continues_the_same_way() {
    let dir = scratch_dir("snap-twice");
    let (snap, last) = saved_counter(&dir, &[]);
    let mut runs = Vec::new();
    for name in ["first", "second"] {
        let vm = Nvmm::restore(&dir, name, &snap, &[]);
        vm.wait_for_lines(8);
        vm.pause();
        let lines: Vec<String> = vm.lines()[..8].to_vec();
        assert_counts_from(&lines, last + 1);
        runs.push(lines);
        vm.shutdown();
    }
    assert_eq!(runs[0], runs[1]);
}

#[test]
fn restored_paused_waits_for_resume() {
    let dir = scratch_dir("snap-paused");
    let (snap, last) = saved_counter(&dir, &[]);
    let vm = Nvmm::restore(&dir, "paused", &snap, &["--paused"]);
    thread::sleep(Duration::from_millis(700));
    assert!(vm.lines().is_empty(), "a VM restored paused printed {:?}", vm.lines());
    assert_eq!(vm.ctl_ok(&["info"])["state"], "paused");
    // A paused restored VM can be saved again, into the very directory its memory is mapped
    // from (the new files replace the old ones by rename), and that snapshot is the same VM.
    let snap2 = snap.clone();
    vm.snapshot(&snap2);
    assert_eq!(vm.ctl_ok(&["resume"])["state"], "running");
    vm.wait_for_lines(5);
    assert_counts_from(&vm.lines(), last + 1);
    vm.kill9();
    let vm = Nvmm::restore(&dir, "from-second", &snap2, &[]);
    vm.wait_for_lines(5);
    assert_counts_from(&vm.lines(), last + 1);
    vm.shutdown();
}

#[test]
fn a_snapshot_into_an_unwritable_place_leaves_the_vm_paused_and_resumable() {
    let dir = scratch_dir("snap-unwritable");
    let vm = Nvmm::boot(&dir, &[]);
    vm.wait_for_lines(3);
    let last = vm.pause();
    // Under a regular file: no one, root included, can create a directory there.
    let file = dir.join("a-file");
    std::fs::write(&file, b"x").unwrap();
    let (code, _, err) = vm.ctl(&["snapshot", file.join("snap").to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("nvmm: error: 400: snapshot not written (the VM stays paused): cannot create snapshot directory"), "{err}");
    assert_eq!(vm.ctl_ok(&["info"])["state"], "paused");
    thread::sleep(Duration::from_millis(300));
    assert_eq!(count_of(vm.lines().last().unwrap()), last);
    assert_eq!(vm.ctl_ok(&["resume"])["state"], "running");
    vm.wait_for_lines(vm.lines().len() + 3);
    assert_counts_from(&vm.lines(), 1);
    vm.shutdown();
}

/// Copies a snapshot directory so each bad-input case damages its own.
fn copy_snapshot(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).unwrap();
    for f in ["state", "memory"] {
        // cp keeps the memory file sparse.
        let st = Command::new("cp").args(["--sparse=always"]).arg(from.join(f)).arg(to.join(f)).status().unwrap();
        assert!(st.success());
    }
}

#[test]
fn bad_snapshots_are_one_line_each() {
    let dir = scratch_dir("snap-bad");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let (snap, _) = saved_counter(&dir, &["--disk", &format!("path={}", disk.display())]);
    let restore = |d: &Path| vec!["--restore".to_string(), d.display().to_string()];
    let check = |d: &Path, expected: &str| {
        let args = restore(d);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_one_line_error(&[], &args, expected);
    };

    let missing = dir.join("missing");
    check(&missing, &format!("snapshot directory {} does not exist", missing.display()));
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    check(&empty, "is not an nvmm snapshot: it has no state file");
    let foreign = dir.join("foreign");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::write(foreign.join("state"), b"{\"not\": \"ours\"}").unwrap();
    check(&foreign, "not an nvmm snapshot state file (no NVMMSNAP magic)");

    let state = std::fs::read(snap.join("state")).unwrap();
    let case = |name: &str, bytes: &[u8]| {
        let d = dir.join(name);
        copy_snapshot(&snap, &d);
        std::fs::write(d.join("state"), bytes).unwrap();
        d
    };
    check(&case("truncated", &state[..state.len() / 2]), "state file truncated");
    let mut corrupted = state.clone();
    corrupted[state.len() / 2] ^= 0x20;
    check(&case("corrupted", &corrupted), "state file corrupted: checksum");
    let mut other = state.clone();
    other[8] = 9;
    check(&case("version", &other), "snapshot format version 9, and this nvmm reads only version 1");

    let short = case("short", &state);
    std::fs::OpenOptions::new().write(true).open(short.join("memory")).unwrap().set_len(1 << 20).unwrap();
    check(&short, "has 1048576 bytes, the state says 268435456");

    let changed = case("changed", &state);
    std::fs::OpenOptions::new().write(true).open(&disk).unwrap().set_len(2 << 20).unwrap();
    check(&changed, &format!("disk {} has changed since the snapshot: 2097152 bytes, the snapshot says 1048576", disk.display()));

    // Restore flags a snapshot records itself are refused by the command line, in one line.
    assert_one_line_error(&[], &["--restore", snap.to_str().unwrap(), "--mem", "1G"], "'--restore <DIR>' cannot be used with '--mem <SIZE>'");
}
