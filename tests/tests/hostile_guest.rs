//! Hand-made guests that attack nvmm from inside, on this machine's own /dev/kvm (the tiny guest
//! needs no Linux): what each one does must stay bounded on the host.

use std::process::{Command, Stdio};

use nvmm_tests::{nvmm_bin, run_nvmm, scratch_dir, tiny};

fn write(dir: &str, name: &str, bytes: Vec<u8>) -> String {
    let path = scratch_dir(dir).join(name);
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

fn disk(dir: &str) -> String {
    let path = scratch_dir(dir).join("disk.img");
    std::fs::File::create(&path).unwrap().set_len(1 << 20).unwrap();
    format!("path={}", path.display())
}

/// 100,000 writes to a read-only virtio-mmio register, each worth a warning: a few dozen lines.
#[test]
fn a_register_flood_yields_a_few_dozen_log_lines() {
    let elf = write("hostile-flood", "flood.elf", tiny::register_flood_elf(100_000));
    let (code, _, stderr) = run_nvmm(&[], &["--kernel", &elf, "--disk", &disk("hostile-flood")]);
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert!(!lines.is_empty(), "no warning at all: the guest did not run?");
    assert!(lines.len() <= 40, "{} lines:\n{}", lines.len(), lines[..10.min(lines.len())].join("\n"));
    assert!(lines[0].contains("write of unknown or read-only register 0x0"), "{}", lines[0]);
    assert!(stderr.contains("more like it were suppressed"), "{stderr}");
}

/// The same flood with stderr on a full disk, and on a closed pipe: the guest still ends and nvmm
/// exits 0, instead of dying on its first failed log line.
#[test]
fn a_log_flood_with_stderr_gone_does_not_end_nvmm() {
    let elf = write("hostile-full", "flood.elf", tiny::register_flood_elf(20_000));
    let disk = disk("hostile-full");
    let full = std::fs::OpenOptions::new().write(true).open("/dev/full").unwrap();
    let status = Command::new(nvmm_bin()).args(["--kernel", &elf, "--disk", &disk])
        .stdout(Stdio::null()).stderr(full).status().unwrap();
    assert_eq!(status.code(), Some(0), "stderr on /dev/full: {status:?}");

    let mut child = Command::new(nvmm_bin()).args(["--kernel", &elf, "--disk", &disk])
        .stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    drop(child.stderr.take());
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "stderr a closed pipe: {status:?}");
}

/// nvmm's own memory from its `--log-level info` exit line (peak RSS minus guest RAM touched).
fn own_memory_kib(stderr: &str) -> u64 {
    let line = stderr.lines().find(|l| l.contains("nvmm's own")).unwrap_or_else(|| panic!("no memory line in: {stderr}"));
    let after = line.split("nvmm's own ").nth(1).unwrap_or_default();
    after.split_whitespace().next().and_then(|n| n.parse().ok()).unwrap_or_else(|| panic!("{line}"))
}

/// 10,000 rounds of one RX descriptor offered as a whole ring: nvmm holds it once, and its own
/// memory stays small (before the fix, 8,000 rounds took it to 241 MB).
#[test]
fn one_rx_buffer_offered_ten_thousand_times_keeps_nvmm_small() {
    let elf = write("hostile-rx", "refill.elf", tiny::rx_refill_elf(10_000));
    // A network namespace of nvmm's own for the TAP: nothing leaves it.
    let (code, _, stderr) = run_nvmm(&["unshare", "--net", "--"], &["--kernel", &elf, "--net", "tap=nvmmrx0", "--log-level", "info"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.contains("RX chain 0 offered again"), "the guest's offers did not reach the device: {stderr}");
    let own = own_memory_kib(&stderr);
    assert!(own < 10 << 10, "nvmm's own memory {own} KiB: {stderr}");
}
