//! Multiboot kernels and `--debug-exit` on this machine's own /dev/kvm: a tiny kernel checks
//! the boot loader magic, prints the command line it was given and ends nvmm through port 0xf4 with
//! a status that carries its module count; bad Multiboot images are one-line errors.

use std::path::PathBuf;

use iced_x86::code_asm::*;
use nvmm_tests::multiboot::ports::*;
use nvmm_tests::multiboot::{header, FLAG_ADDRESSES, LOAD_ADDR};
use nvmm_tests::{assert_one_line_error, run_nvmm, scratch_dir, tiny};

/// What the kernel writes to port 0xf4 when EAX does not hold the boot loader magic.
const BAD_MAGIC_VALUE: u8 = 0x7f;
/// The kernel writes this plus its module count to port 0xf4.
const EXIT_BASE: u8 = 5;

/// What the boot loader leaves in EAX.
const BOOT_LOADER_MAGIC: u32 = 0x2bad_b002;
// Multiboot information (EBX) fields.
const INFO_CMDLINE: u32 = 16;
const INFO_MODS_COUNT: u32 = 20;

/// 32-bit code, entered with paging off: checks EAX, writes the command line to COM1, then
/// `EXIT_BASE + mods_count` to the debug-exit port, then resets. It has only relative jumps, so
/// it runs wherever it is loaded.
fn code() -> Vec<u8> {
    kernel_code().expect("assemble the Multiboot kernel")
}

fn kernel_code() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(32)?;
    let (mut bad, mut exit, mut printed) = (a.create_label(), a.create_label(), a.create_label());
    a.cmp(eax, BOOT_LOADER_MAGIC)?;
    a.jne(bad)?;
    a.mov(esi, dword_ptr(ebx + INFO_CMDLINE))?;
    a.mov(dx, COM1_DATA)?;
    let next = tiny::here(&mut a)?;
    a.lodsb()?;
    a.test(al, al)?;
    a.jz(printed)?;
    a.out(dx, al)?;
    a.jmp(next)?;
    a.set_label(&mut printed)?;
    a.mov(al, '\n' as u32)?;
    a.out(dx, al)?;
    a.mov(eax, dword_ptr(ebx + INFO_MODS_COUNT))?;
    a.add(al, u32::from(EXIT_BASE))?;
    a.set_label(&mut exit)?;
    a.out(DEBUG_EXIT, al)?;
    // Without a debug-exit port the kernel carries on: an i8042 reset ends nvmm with status 0.
    a.mov(al, I8042_RESET)?;
    a.out(I8042_COMMAND, al)?;
    a.cli()?;
    let halt = tiny::here(&mut a)?;
    a.hlt()?;
    a.jmp(halt)?;
    a.set_label(&mut bad)?;
    a.mov(al, u32::from(BAD_MAGIC_VALUE))?;
    a.jmp(exit)?;
    a.assemble(0)
}

/// A kernel that carries its load addresses, loaded at `load` (1 MiB normally).
fn address_kernel(load: u32) -> Vec<u8> {
    nvmm_tests::multiboot::address_kernel(&code(), load)
}

/// The same code as an ELF32 executable whose one segment (header, then code) loads at 2 MiB.
fn elf32_kernel() -> Vec<u8> {
    let paddr = 0x20_0000u32;
    let mut data = header(0, None, 0);
    let entry = paddr + data.len() as u32;
    data.extend(code());
    let mut e = vec![0u8; 0x100];
    e[..8].copy_from_slice(&[0x7f, b'E', b'L', b'F', 1, 1, 1, 0]); // ELF32, little endian
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&3u16.to_le_bytes()); // EM_386
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..28].copy_from_slice(&entry.to_le_bytes());
    e[28..32].copy_from_slice(&52u32.to_le_bytes()); // program headers right after this one
    e[40..42].copy_from_slice(&52u16.to_le_bytes());
    e[42..44].copy_from_slice(&32u16.to_le_bytes());
    e[44..46].copy_from_slice(&1u16.to_le_bytes());
    for (i, v) in [1u32, 0x100, paddr, paddr, data.len() as u32, data.len() as u32, 5, 0x1000].iter().enumerate() {
        e[52 + 4 * i..56 + 4 * i].copy_from_slice(&v.to_le_bytes());
    }
    e.extend(data);
    e
}

fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let p = scratch_dir("multiboot").join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_multiboot_kernel_ends_nvmm_through_the_debug_exit_port() {
    let k = write("address.mb", &address_kernel(LOAD_ADDR));
    let (code, out, err) = run_nvmm(&[], &["--kernel", s(&k), "--debug-exit", "--cmdline", "-x svm", "--mem", "32M"]);
    // No module: the kernel writes EXIT_BASE, nvmm exits (EXIT_BASE << 1) | 1.
    assert_eq!(code, Some(i32::from(EXIT_BASE) << 1 | 1), "stdout {out} stderr {err}");
    // The command line is the kernel's path, then --cmdline, as QEMU writes it.
    assert_eq!(out.trim_end(), format!("{} -x svm", k.display()), "stderr {err}");

    // An ELF32 kernel, with --initrd as its one module and the default (empty) command line.
    let k = write("elf32.mb", &elf32_kernel());
    let initrd = write("module", b"module contents");
    let (code, out, err) = run_nvmm(&[], &["--kernel", s(&k), "--initrd", s(&initrd), "--debug-exit", "--mem", "32M"]);
    assert_eq!(code, Some(i32::from(EXIT_BASE + 1) << 1 | 1), "stdout {out} stderr {err}");
    assert_eq!(out.trim_end(), k.display().to_string());
}

#[test]
fn without_debug_exit_port_0xf4_is_not_an_exit() {
    // The write goes nowhere; the kernel's i8042 reset that follows ends nvmm with status 0.
    let k = write("noexit.mb", &address_kernel(LOAD_ADDR));
    let (code, out, err) = run_nvmm(&[], &["--kernel", s(&k), "--mem", "32M"]);
    assert_eq!(code, Some(0), "stdout {out} stderr {err}");
    assert_eq!(out.trim_end(), k.display().to_string());
}

#[test]
fn bad_multiboot_images_are_one_line_errors() {
    let mut bad_magic = address_kernel(LOAD_ADDR);
    bad_magic[0] ^= 0x10;
    let p = write("badmagic.mb", &bad_magic);
    assert_one_line_error(&[], &["--kernel", s(&p)], "is not a Linux kernel or a Multiboot kernel");

    let mut far = vec![0u8; 8192];
    far.extend(address_kernel(LOAD_ADDR));
    let p = write("far.mb", &far);
    assert_one_line_error(&[], &["--kernel", s(&p)], "Multiboot header in the first 8 KiB");

    let mut k = header(FLAG_ADDRESSES, Some([LOAD_ADDR, LOAD_ADDR, 0, 0, LOAD_ADDR + 32]), 1);
    k.extend(code());
    let p = write("checksum.mb", &k);
    assert_one_line_error(&[], &["--kernel", s(&p)], "checksum that does not add up");

    let p = write("outside.mb", &address_kernel(64 << 20));
    assert_one_line_error(&[], &["--kernel", s(&p), "--mem", "32M"], "lies outside guest RAM");

    let p = write("ok.mb", &address_kernel(LOAD_ADDR));
    let big = scratch_dir("multiboot").join("big.module");
    std::fs::File::create(&big).unwrap().set_len(40 << 20).unwrap();
    assert_one_line_error(&[], &["--kernel", s(&p), "--initrd", s(&big), "--mem", "32M"], "does not fit in guest memory");
}
