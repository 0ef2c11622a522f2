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
    // Said on the next line logged after a window, or at exit.
    assert!(stderr.contains("more like it were suppressed") || stderr.contains("were suppressed"), "{stderr}");
    assert!(lines.last().is_some_and(|l| l.contains("suppressed")), "the drop count is not the last word: {stderr}");
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

/// CPU time (user + system, in clock ticks) of process `pid`, from /proc/PID/stat.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// `yes` on stdin and a guest that never reads its UART: once the receive FIFO is full, nvmm stops
/// reading stdin and sleeps (under 1% of a CPU over 10 s, where it used to spin at 100%).
#[test]
fn console_input_the_guest_never_reads_costs_no_cpu() {
    let elf = write("hostile-yes", "halt.elf", tiny::halt_elf());
    let mut yes = Command::new("yes").stdout(Stdio::piped()).spawn().unwrap();
    let mut nvmm = Command::new(nvmm_bin()).args(["--kernel", &elf])
        .stdin(yes.stdout.take().unwrap()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    std::thread::sleep(std::time::Duration::from_secs(1));
    assert!(nvmm.try_wait().unwrap().is_none(), "nvmm ended early");
    let before = cpu_ticks(nvmm.id());
    std::thread::sleep(std::time::Duration::from_secs(10));
    let used = cpu_ticks(nvmm.id()) - before;
    let _ = nvmm.kill();
    let _ = nvmm.wait();
    let _ = yes.kill();
    let _ = yes.wait();
    // Clock ticks are 1/100 s on Linux (USER_HZ): 1% of 10 s is 10 ticks.
    assert!(used < 10, "nvmm used {used} ticks of CPU in 10 s");
}

/// Input larger than the UART's FIFO reaches a guest that reads it, all of it and in order: stdin
/// is set aside while the FIFO is full and taken up again when the guest has emptied it.
#[test]
fn console_input_flows_at_the_guests_pace() {
    use std::io::Write;
    let elf = write("console-echo", "echo.elf", tiny::echo_elf());
    let input: Vec<u8> = (0..3000u32).map(|i| b'a' + (i % 26) as u8).filter(|&b| b != b'q').chain([b'q']).collect();
    let mut nvmm = Command::new(nvmm_bin()).args(["--kernel", &elf])
        .stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut stdin = nvmm.stdin.take().unwrap();
    let feed = input.clone();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&feed);
    });
    let out = nvmm.wait_with_output().unwrap();
    writer.join().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&input));
}
