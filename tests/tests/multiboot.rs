//! Multiboot kernels and `--debug-exit` on this machine's own /dev/kvm: a hand-made kernel checks
//! the boot loader magic, prints the command line it was given and ends nvmm through port 0xf4 with
//! a status that carries its module count; bad Multiboot images are one-line errors.

use std::path::PathBuf;

use nvmm_tests::multiboot::{header, FLAG_ADDRESSES, LOAD_ADDR};
use nvmm_tests::{assert_one_line_error, run_nvmm, scratch_dir};

/// What the kernel writes to port 0xf4 when EAX does not hold the boot loader magic.
const BAD_MAGIC_VALUE: u8 = 0x7f;
/// The kernel writes this plus its module count to port 0xf4.
const EXIT_BASE: u8 = 5;

/// 32-bit code, entered with paging off: checks EAX, writes the command line (info + 16) to COM1,
/// then `EXIT_BASE + mods_count` (info + 20) to the debug-exit port, then resets.
fn code() -> Vec<u8> {
    let mut c = Vec::new();
    c.push(0x3d); // cmp eax, 0x2badb002
    c.extend(0x2bad_b002u32.to_le_bytes());
    c.extend([0x75, 0]); // jne bad (patched below)
    let jne_bad = c.len();
    c.extend([0x8b, 0x73, 0x10]); // mov esi, [ebx + 16]: the command line
    c.extend([0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    let top = c.len();
    c.extend([0xac, 0x84, 0xc0]); // top: lodsb; test al, al
    c.extend([0x74, 0x03]); // jz +3 (past out and jmp)
    c.push(0xee); // out dx, al
    c.push(0xeb);
    c.push((top as isize - (c.len() + 1) as isize) as i8 as u8); // jmp top
    c.extend([0xb0, b'\n', 0xee]); // mov al, '\n'; out dx, al
    c.extend([0x8b, 0x43, 0x14]); // mov eax, [ebx + 20]: mods_count
    c.extend([0x04, EXIT_BASE]); // add al, EXIT_BASE
    let exit = c.len();
    c.extend([0xe6, 0xf4]); // exit: out 0xf4, al
    // Without a debug-exit port the kernel carries on: an i8042 reset ends nvmm with status 0.
    c.extend([0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
    c.extend([0xfa, 0xf4, 0xeb, 0xfd]); // cli; hlt; jmp back, should the reset not land
    let bad = c.len();
    c[jne_bad - 1] = (bad - jne_bad) as u8;
    c.extend([0xb0, BAD_MAGIC_VALUE, 0xeb]); // bad: mov al, BAD_MAGIC_VALUE; jmp exit
    c.push((exit as isize - (c.len() + 1) as isize) as i8 as u8);
    c
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
