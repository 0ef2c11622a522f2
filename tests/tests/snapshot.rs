//! Snapshot and restore on this machine's own /dev/kvm, with the counting tiny guest: paused,
//! saved, its nvmm killed with SIGKILL, restored by a new nvmm, the count goes on from where it
//! stopped; one snapshot restored twice gives the same continuation; and every bad input (a
//! missing, foreign, truncated, corrupted or other-version snapshot, a short memory file, a disk
//! that changed, a destination that cannot be written, a VM that is running) is one line and
//! loses nothing.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::Duration;

use nvmm_tests::running::Nvmm;
use nvmm_tests::{assert_one_line_error, run_nvmm, scratch_dir};

/// The counting guest booted fresh in `dir`, with `extra` arguments and the socket `boot.sock`.
fn boot(dir: &Path, extra: &[&str]) -> Nvmm {
    Nvmm::boot_counter(dir, "boot", extra)
}

/// Pauses, lets a line already in the pipe arrive, and returns the last count printed.
fn pause(vm: &Nvmm) -> u64 {
    assert_eq!(vm.ctl_ok(&["pause"])["state"], "paused");
    thread::sleep(Duration::from_millis(200));
    let lines = vm.lines();
    count_of(lines.last().expect("no line before the pause"))
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
    let vm = boot(dir, extra);
    vm.wait_for_lines(5);
    let last = pause(&vm);
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
    let vm = boot(&dir, &[]);
    vm.wait_for_lines(5);
    // Running: refused, and nothing written.
    let (code, _, err) = vm.ctl(&["snapshot", dir.join("early").to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert_eq!(err.trim_end(), "nvmm: error: 409: a snapshot needs a paused VM: pause it first");
    assert!(!dir.join("early").exists());

    let last = pause(&vm);
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
        pause(&vm);
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
    let vm = boot(&dir, &[]);
    vm.wait_for_lines(3);
    let last = pause(&vm);
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
