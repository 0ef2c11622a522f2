//! The kvm-unit-tests devices (fw_cfg, the ACPI PM timer, the CMOS RTC, the PM1 blocks,
//! `--debug-exit`) survive a snapshot, on this machine's own /dev/kvm: a Multiboot kernel made
//! here reads the first byte of fw_cfg's signature, writes a byte of CMOS RAM and sets RTC_EN, then
//! spins on a gate byte in its own image. The test pauses it there, saves it, kills nvmm and opens
//! the gate in the snapshot's memory file, so only the restored VM goes on: it reads the next
//! fw_cfg byte, the PM timer, the CMOS byte and the PM1 enable register and writes what it found to
//! the debug-exit port.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use iced_x86::code_asm::*;
use iced_x86::BlockEncoderOptions;
use nvmm_tests::multiboot::ports::*;
use nvmm_tests::multiboot::{address_kernel, ADDRESS_HEADER_LEN, LOAD_ADDR};
use nvmm_tests::running::Nvmm;
use nvmm_tests::{run_nvmm, scratch_dir, tiny};

/// A byte of the RTC's RAM, and what the kernel writes there.
const CMOS_BYTE: u32 = 0x40;
const CMOS_MARK: u32 = 0x5a;
/// What the kernel writes to the debug-exit port: the fw_cfg byte it read after the restore, less
/// 'A' ('E', the signature's second byte, gives 4; a fresh fw_cfg's 'Q' 16; no fw_cfg 0xbe), with
/// `NO_PM_TIMER` added when the PM timer reads as a floating port (all ones), and
/// `RTC_OR_PM1_LOST` when the CMOS byte or RTC_EN did not come back.
const FW_CFG_BIAS: u8 = b'A';
const NO_PM_TIMER: u8 = 0x40;
const RTC_OR_PM1_LOST: u8 = 0x20;
/// The status the restored nvmm exits with when every device is back: (4 << 1) | 1.
const ALL_BACK: i32 = ((b'E' - FW_CFG_BIAS) as i32) << 1 | 1;

/// The kernel's 32-bit code (entered with paging off, flat segments) and where its gate byte is.
fn gate_kernel() -> (Vec<u8>, u32) {
    // 32-bit code has no RIP-relative operand, so the gate byte's absolute address goes in the
    // code: assembled once to learn where the byte lands (an absolute operand is always disp32, so
    // the address does not change the code's length), then again with it.
    let (_, gate_byte) = gate_kernel_code(0).expect("assemble the gate kernel");
    let (code, at) = gate_kernel_code(gate_byte).expect("assemble the gate kernel");
    assert_eq!(at, gate_byte);
    (address_kernel(&code, LOAD_ADDR), gate_byte)
}

/// The code, testing the gate byte at `gate_addr`, and the address its gate byte is at.
fn gate_kernel_code(gate_addr: u32) -> Result<(Vec<u8>, u32), IcedError> {
    let entry = u64::from(LOAD_ADDR + ADDRESS_HEADER_LEN);
    let mut a = CodeAssembler::new(32)?;
    let (mut gate_byte, mut pm_timer_read) = (a.create_label(), a.create_label());
    let (mut lost, mut kept) = (a.create_label(), a.create_label());
    a.mov(dx, FW_CFG_SELECTOR)?;
    a.xor(eax, eax)?;
    a.out(dx, ax)?; // select the signature, "QEMU"
    a.mov(dx, FW_CFG_DATA)?;
    a.in_(al, dx)?; // 'Q'
    a.mov(dx, COM1_DATA)?;
    a.out(dx, al)?;
    a.mov(al, u32::from(b'\n'))?;
    a.out(dx, al)?;
    a.mov(al, CMOS_BYTE)?;
    a.out(RTC_INDEX, al)?;
    a.mov(al, CMOS_MARK)?;
    a.out(RTC_DATA, al)?;
    a.mov(dx, PM1A_ENABLE)?;
    a.mov(ax, RTC_EN)?;
    a.out(dx, ax)?;
    let gate = tiny::here(&mut a)?;
    a.cmp(byte_ptr(gate_addr), 0)?;
    a.je(gate)?;
    a.mov(dx, FW_CFG_DATA)?;
    a.in_(al, dx)?; // 'E' if fw_cfg kept its item and place
    a.mov(dx, COM1_DATA)?;
    a.out(dx, al)?;
    a.mov(bl, al)?;
    a.mov(al, u32::from(b'\n'))?;
    a.out(dx, al)?;
    a.sub(bl, u32::from(FW_CFG_BIAS))?;
    a.mov(dx, PM_TIMER)?;
    a.in_(eax, dx)?;
    a.test(eax, 0xff00_0000u32)?; // a 24-bit count, or a floating port
    a.jz(pm_timer_read)?;
    a.or(bl, u32::from(NO_PM_TIMER))?;
    a.set_label(&mut pm_timer_read)?;
    a.mov(al, CMOS_BYTE)?;
    a.out(RTC_INDEX, al)?;
    a.in_(al, RTC_DATA)?;
    a.cmp(al, CMOS_MARK)?;
    a.jne(lost)?;
    a.mov(dx, PM1A_ENABLE)?;
    a.in_(ax, dx)?;
    a.cmp(ax, RTC_EN)?;
    a.je(kept)?;
    a.set_label(&mut lost)?;
    a.or(bl, u32::from(RTC_OR_PM1_LOST))?;
    a.set_label(&mut kept)?;
    a.mov(al, bl)?;
    a.out(DEBUG_EXIT, al)?;
    // Without a debug-exit port the kernel carries on: an i8042 reset ends nvmm with status 0.
    a.mov(al, I8042_RESET)?;
    a.out(I8042_COMMAND, al)?;
    a.cli()?;
    let halt = tiny::here(&mut a)?;
    a.hlt()?;
    a.jmp(halt)?;
    a.set_label(&mut gate_byte)?;
    a.db(&[0, 0, 0, 0])?;
    let assembled = a.assemble_options(entry, BlockEncoderOptions::RETURN_NEW_INSTRUCTION_OFFSETS)?;
    let at = assembled.label_ip(&gate_byte)? as u32;
    Ok((assembled.inner.code_buffer, at))
}

/// Sets the byte at guest address `addr` in the snapshot's memory file, found through the memory
/// ranges of its state file (after the 20-byte header: magic, version, length).
fn poke_guest_byte(snap: &Path, addr: u32, value: u8) {
    let state = std::fs::read(snap.join("state")).unwrap();
    let payload: serde_json::Value = serde_json::from_slice(&state[20..state.len() - 4]).unwrap();
    let addr = u64::from(addr);
    let range = payload["memory"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| (r["guest_addr"].as_u64().unwrap()..r["guest_addr"].as_u64().unwrap() + r["len"].as_u64().unwrap()).contains(&addr))
        .expect("the gate byte is in no memory range");
    let offset = range["file_offset"].as_u64().unwrap() + addr - range["guest_addr"].as_u64().unwrap();
    let memory = std::fs::OpenOptions::new().write(true).open(snap.join("memory")).unwrap();
    memory.write_all_at(&[value], offset).unwrap();
}

/// The gate kernel booted with `extra`, paused at its gate, saved into `dir/snap` and killed; the
/// gate is then opened in the snapshot.
fn saved_at_the_gate(dir: &Path, extra: &[&str]) -> PathBuf {
    let (kernel, gate) = gate_kernel();
    let path = dir.join("gate.mb");
    std::fs::write(&path, kernel).unwrap();
    let mut args = vec!["--kernel".to_string(), path.display().to_string(), "--mem".into(), "32M".into()];
    args.extend(extra.iter().map(|s| s.to_string()));
    let vm = Nvmm::spawn(dir, "boot", &args);
    vm.wait_for_lines(1);
    assert_eq!(vm.lines(), ["Q"], "fw_cfg at boot");
    assert_eq!(vm.ctl_ok(&["pause"])["state"], "paused");
    let snap = dir.join("snap");
    assert_eq!(vm.snapshot(&snap)["state"], "paused");
    vm.kill9();
    poke_guest_byte(&snap, gate, 1);
    snap
}

/// With `--debug-exit`, the restored VM has all its devices, fw_cfg where the guest left it, the
/// CMOS byte and RTC_EN as it wrote them: the guest's write ends the restored nvmm with the status
/// it carries.
#[test]
fn the_test_devices_and_their_state_come_back_after_a_restore() {
    let dir = scratch_dir("snap-test-devices");
    let snap = saved_at_the_gate(&dir, &["--debug-exit"]);
    let (code, out, err) = run_nvmm(&[], &["snapshot-info", snap.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    for device in ["debug_exit", "pm_timer", "cmos_rtc", "acpi_pm1"] {
        assert_eq!(info["machine"][device], true, "{device}: {info}");
    }
    assert_eq!(restore(&snap), Some(ALL_BACK));
}

/// Without `--debug-exit` at boot, the restored VM has no debug-exit port either: the guest's write
/// goes nowhere and its reset ends nvmm with status 0.
#[test]
fn a_restore_adds_no_debug_exit_port_the_boot_did_not_have() {
    let dir = scratch_dir("snap-no-debug-exit");
    let snap = saved_at_the_gate(&dir, &[]);
    assert_eq!(restore(&snap), Some(0));
}

/// The exit status of `nvmm --restore snap` (124 if it has not ended after 20 s). No API socket:
/// the guest may end the restored VM before a socket could be waited for.
fn restore(snap: &Path) -> Option<i32> {
    let (code, _, err) = run_nvmm(&["timeout", "20"], &["--restore", snap.to_str().unwrap()]);
    assert!(err.lines().all(|l| !l.starts_with("nvmm: error")), "{err}");
    code
}
