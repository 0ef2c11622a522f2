//! The kvm-unit-tests devices (fw_cfg, the ACPI PM timer, `--debug-exit`) survive a snapshot, on
//! this machine's own /dev/kvm: a hand-made Multiboot kernel reads the first byte of fw_cfg's
//! signature, then spins on a gate byte in its own image. The test pauses it there, saves it, kills
//! nvmm and opens the gate in the snapshot's memory file, so only the restored VM goes on: it reads
//! the next fw_cfg byte and the PM timer and writes what it found to the debug-exit port.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use nvmm_tests::multiboot::{address_kernel, ADDRESS_HEADER_LEN, LOAD_ADDR};
use nvmm_tests::running::Nvmm;
use nvmm_tests::{run_nvmm, scratch_dir};

const FW_CFG_SELECTOR: u16 = 0x510;
const FW_CFG_DATA: u16 = 0x511;
const COM1: u16 = 0x3f8;
const PM_TIMER: u16 = 0x608;
const DEBUG_EXIT: u8 = 0xf4;
/// What the kernel writes to the debug-exit port: the fw_cfg byte it read after the restore, less
/// 'A' ('E', the signature's second byte, gives 4; a fresh fw_cfg's 'Q' 16; no fw_cfg 0xbe), with
/// `NO_PM_TIMER` added when the PM timer reads as a floating port (all ones).
const FW_CFG_BIAS: u8 = b'A';
const NO_PM_TIMER: u8 = 0x40;
/// The status the restored nvmm exits with when all three devices are back: (4 << 1) | 1.
const ALL_BACK: i32 = ((b'E' - FW_CFG_BIAS) as i32) << 1 | 1;

/// `mov dx, port`.
fn mov_dx(c: &mut Vec<u8>, port: u16) {
    c.extend([0x66, 0xba]);
    c.extend(port.to_le_bytes());
}

/// The kernel's 32-bit code (entered with paging off, flat segments) and where its gate byte is.
fn gate_kernel() -> (Vec<u8>, u32) {
    let mut c = Vec::new();
    mov_dx(&mut c, FW_CFG_SELECTOR);
    c.extend([0x31, 0xc0, 0x66, 0xef]); // xor eax, eax; out dx, ax: select the signature, "QEMU"
    mov_dx(&mut c, FW_CFG_DATA);
    c.push(0xec); // in al, dx: 'Q'
    mov_dx(&mut c, COM1);
    c.extend([0xee, 0xb0, b'\n', 0xee]); // out dx, al; mov al, '\n'; out dx, al
    let gate = c.len();
    c.extend([0x80, 0x3d, 0, 0, 0, 0, 0]); // gate: cmp byte [gate byte], 0 (address patched below)
    c.push(0x74); // je gate
    c.push((gate as isize - (c.len() + 1) as isize) as i8 as u8);
    mov_dx(&mut c, FW_CFG_DATA);
    c.push(0xec); // in al, dx: 'E' if fw_cfg kept its item and place
    mov_dx(&mut c, COM1);
    c.extend([0xee, 0x88, 0xc3]); // out dx, al; mov bl, al
    c.extend([0xb0, b'\n', 0xee]); // mov al, '\n'; out dx, al
    c.extend([0x80, 0xeb, FW_CFG_BIAS]); // sub bl, FW_CFG_BIAS
    mov_dx(&mut c, PM_TIMER);
    c.push(0xed); // in eax, dx
    c.extend([0xa9, 0, 0, 0, 0xff]); // test eax, 0xff000000: a 24-bit count, or a floating port
    c.extend([0x74, 0x03, 0x80, 0xcb, NO_PM_TIMER]); // jz +3; or bl, NO_PM_TIMER
    c.extend([0x88, 0xd8, 0xe6, DEBUG_EXIT]); // mov al, bl; out DEBUG_EXIT, al
    // Without a debug-exit port the kernel carries on: an i8042 reset ends nvmm with status 0.
    c.extend([0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    c.extend([0xfa, 0xf4, 0xeb, 0xfd]); // cli; hlt; jmp back, should the reset not land
    let gate_byte = LOAD_ADDR + ADDRESS_HEADER_LEN + c.len() as u32;
    c.extend([0, 0, 0, 0]);
    c[gate + 2..gate + 6].copy_from_slice(&gate_byte.to_le_bytes());
    (address_kernel(&c, LOAD_ADDR), gate_byte)
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

/// With `--debug-exit`, the restored VM has all three devices, fw_cfg where the guest left it: the
/// guest's write ends the restored nvmm with the status it carries.
#[test]
fn the_test_devices_and_their_state_come_back_after_a_restore() {
    let dir = scratch_dir("snap-test-devices");
    let snap = saved_at_the_gate(&dir, &["--debug-exit"]);
    let (code, out, err) = run_nvmm(&[], &["snapshot-info", snap.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let info: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((&info["machine"]["debug_exit"], &info["machine"]["pm_timer"]), (&true.into(), &true.into()), "{info}");
    let vm = Nvmm::restore(&dir, "restored", &snap, &[]);
    assert_eq!(vm.wait_for_exit(), Some(ALL_BACK));
}

/// Without `--debug-exit` at boot, the restored VM has no debug-exit port either: the guest's write
/// goes nowhere and its reset ends nvmm with status 0.
#[test]
fn a_restore_adds_no_debug_exit_port_the_boot_did_not_have() {
    let dir = scratch_dir("snap-no-debug-exit");
    let snap = saved_at_the_gate(&dir, &[]);
    let vm = Nvmm::restore(&dir, "restored", &snap, &[]);
    assert_eq!(vm.wait_for_exit(), Some(0));
}
