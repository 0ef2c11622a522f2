//! ACPI S3 on this machine's own /dev/kvm, with a Multiboot kernel made here that does what
//! kvm-unit-tests' s3.c does: it writes real-mode resume code and its address in the FACS, sets
//! the CMOS RTC's alarm to "every second" with AIE, enables RTC_EN, marks a word "asleep" and
//! writes SLP_TYP=S3 | SLP_EN, then marks the word "ran on". The resume code sends the word to the
//! debug-exit port: only a vCPU that stopped at the sleep request and woke at the waking vector
//! reports "asleep". Without RTC_EN nothing wakes the guest: nvmm says so and waits for a signal.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use iced_x86::code_asm::*;
use nvmm_tests::multiboot::ports::*;
use nvmm_tests::multiboot::{address_kernel, LOAD_ADDR};
use nvmm_tests::{nvmm_bin, run_nvmm, scratch_dir, tiny};

/// Where nvmm's FACS is (`acpi::facs_addr()`), and its Firmware_Waking_Vector.
const FACS_WAKING_VECTOR: u32 = 0xe_0040 + 12;
/// The PM1a control register the FADT names (vmm/src/acpi.rs checks it does).
const PM1A_CONTROL: u32 = 0x610;
/// SLP_TYP = 1 (S3, the DSDT's `_S3_`) | SLP_EN.
const SLEEP_S3: u32 = 0x2400;
const RTC_ALARMS: [u32; 3] = [0x01, 0x03, 0x05];
const RTC_ALARM_DONT_CARE: u32 = 0xff;
const RTC_REG_B: u32 = 0x0b;
const RTC_AIE: u32 = 0x20;
/// Where the resume code goes, as in s3.c; a real-mode vector, so below 1 MiB.
const RESUME_AT: u32 = 0x1000;
/// The word the resume code reports (address 0, as in s3.c), and what the kernel writes there.
const WORD: u32 = 0;
const ASLEEP: u8 = 0x10;
const RAN_ON: u8 = 0x11;

/// The resume code, 16-bit: the word to the debug-exit port, then halt.
fn resume_code() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(16)?;
    a.mov(eax, dword_ptr(WORD))?;
    a.out(DEBUG_EXIT, eax)?;
    a.cli()?;
    let halt = tiny::here(&mut a)?;
    a.hlt()?;
    a.jmp(halt)?;
    a.assemble(0)
}

/// The kernel's 32-bit code (paging off, flat segments), with RTC_EN set or not.
fn kernel_code(rtc_en: bool) -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    // The resume code, copied to RESUME_AT four bytes at a time, and its address in the FACS.
    for (i, chunk) in resume_code()?.chunks(4).enumerate() {
        let mut word = [0u8; 4];
        word[..chunk.len()].copy_from_slice(chunk);
        a.mov(dword_ptr(RESUME_AT + 4 * i as u32), u32::from_le_bytes(word))?;
    }
    a.mov(dword_ptr(FACS_WAKING_VECTOR), RESUME_AT)?;
    if rtc_en {
        a.mov(dx, PM1A_ENABLE)?;
        a.mov(ax, RTC_EN)?;
        a.out(dx, ax)?;
    }
    for alarm in RTC_ALARMS {
        a.mov(al, alarm)?;
        a.out(RTC_INDEX, al)?;
        a.mov(al, RTC_ALARM_DONT_CARE)?;
        a.out(RTC_DATA, al)?;
    }
    a.mov(al, RTC_REG_B)?;
    a.out(RTC_INDEX, al)?;
    a.in_(al, RTC_DATA)?;
    a.or(al, RTC_AIE)?;
    a.out(RTC_DATA, al)?;
    a.mov(dword_ptr(WORD), u32::from(ASLEEP))?;
    a.mov(dx, PM1A_CONTROL)?;
    a.mov(ax, SLEEP_S3)?;
    a.out(dx, ax)?;
    a.mov(dword_ptr(WORD), u32::from(RAN_ON))?;
    let spin = tiny::here(&mut a)?;
    a.jmp(spin)?;
    a.assemble(0)
}

fn kernel(name: &str, rtc_en: bool) -> std::path::PathBuf {
    let path = scratch_dir("s3").join(name);
    std::fs::write(&path, address_kernel(&kernel_code(rtc_en).expect("assemble the S3 kernel"), LOAD_ADDR)).unwrap();
    path
}

/// What nvmm exits with when the debug-exit port gets `value`.
fn status(value: u8) -> i32 {
    i32::from(value) << 1 | 1
}

#[test]
fn a_guest_sleeps_in_s3_and_the_rtc_alarm_wakes_it_at_its_waking_vector() {
    let k = kernel("s3.mb", true);
    // With a second vCPU, which waits for a startup IPI after the wake.
    for cpus in ["1", "2"] {
        let (code, out, err) =
            run_nvmm(&[], &["--kernel", k.to_str().unwrap(), "--debug-exit", "--mem", "32M", "--cpus", cpus, "--log-level", "info"]);
        assert_eq!(code, Some(status(ASLEEP)), "{cpus} vCPUs: {} means the vCPU ran on past its sleep request; stdout {out} stderr {err}", status(RAN_ON));
        assert!(err.contains("the guest is asleep (ACPI S3) until its RTC alarm"), "{err}");
        assert!(err.contains("the guest woke from S3 at 0x0100:0x0000"), "{err}");
        assert!(!err.contains("error"), "{err}");
    }
}

/// Without RTC_EN the alarm does not wake the guest: nvmm says so once, the API reports the VM
/// suspended and refuses to pause or snapshot it, and SIGTERM still ends it.
#[test]
fn a_guest_asleep_with_no_wake_event_waits_for_a_signal() {
    let k = kernel("s3-no-wake.mb", false);
    let dir = scratch_dir("s3");
    let socket = dir.join("no-wake.sock");
    let _ = std::fs::remove_file(&socket);
    let mut child = Command::new(nvmm_bin())
        .args(["--kernel", k.to_str().unwrap(), "--debug-exit", "--mem", "32M", "--api-socket", socket.to_str().unwrap()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", socket.to_str().unwrap()];
        all.extend_from_slice(args);
        run_nvmm(&[], &all)
    };
    let start = Instant::now();
    loop {
        let (_, out, _) = ctl(&["info"]);
        if out.contains("\"state\":\"suspended\"") || out.contains("\"state\": \"suspended\"") {
            break;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("nvmm exited with {status} before the guest slept");
        }
        assert!(start.elapsed() < Duration::from_secs(20), "the guest never slept: {out}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Alarms keep coming every second; none wakes it.
    std::thread::sleep(Duration::from_millis(2500));
    let (_, out, _) = ctl(&["info"]);
    assert!(out.contains("suspended"), "{out}");
    for refused in [&["pause"][..], &["snapshot", dir.join("no-wake-snap").to_str().unwrap()]] {
        let (code, _, err) = ctl(refused);
        assert_ne!(code, Some(0), "{refused:?} while asleep");
        assert!(err.contains("asleep (ACPI S3)"), "{refused:?}: {err}");
    }
    // SAFETY: kill(2) on our own child's pid, which it keeps until we wait for it.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let status = child.wait().unwrap();
    let mut err = String::new();
    child.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{err}");
    assert_eq!(err.matches("with no wake event set").count(), 1, "said once: {err}");
}
