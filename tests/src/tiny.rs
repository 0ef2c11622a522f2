//! Hand-assembled guests, no Linux, as ELF64 executables entered at their 64-bit entry. They run on
//! this machine's own /dev/kvm, PVM included, where Linux cannot.
//!
//! - [`elf`]: writes a banner to COM1 (port I/O exits), reads the virtio-mmio magic and device ID at
//!   the first device window (MMIO exits), writes the boot-timer port and resets through the i8042
//!   (which ends the VM with status 0).
//! - [`counter_elf`]: counts forever, one line per count on COM1 (`00000001`, `00000002`, ... in
//!   hex), with a busy wait between lines; for pause and resume.

use std::path::Path;

pub const BANNER: &str = "nvmm tiny guest: ";
/// Where the guest's code is loaded and entered (the loader requires >= 1 MiB).
const LOAD_ADDR: u64 = 0x10_0000;
const CODE_OFFSET: usize = 0x1000;

/// The guest's machine code, with the banner after it.
fn code() -> Vec<u8> {
    let mut c: Vec<u8> = Vec::new();
    c.extend([0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    let lea_at = c.len();
    c.extend([0x48, 0x8d, 0x35, 0, 0, 0, 0]); // lea rsi, [rip + banner]
    c.push(0xb9); // mov ecx, banner length
    c.extend((BANNER.len() as u32).to_le_bytes());
    c.extend([0xac, 0xee, 0xe2, 0xfc]); // 1: lodsb; out dx, al; loop 1b
    c.extend([0xbb, 0x00, 0x00, 0x00, 0xd0]); // mov ebx, 0xd0000000 (first virtio-mmio window)
    c.extend([0x8b, 0x03]); // mov eax, [rbx]: magic
    for i in 0..4 {
        c.push(0xee); // out dx, al
        if i < 3 {
            c.extend([0xc1, 0xe8, 0x08]); // shr eax, 8
        }
    }
    c.extend([0x8b, 0x43, 0x08]); // mov eax, [rbx + 8]: device ID
    c.extend([0x04, b'0', 0xee]); // add al, '0'; out dx, al
    c.extend([0xb0, b'\n', 0xee]); // newline
    c.extend([0x66, 0xba, 0x40, 0x04, 0xb0, 123, 0xee]); // boot timer: out 0x440, 123
    c.extend([0xb0, 0xfe, 0xe6, 0x64]); // i8042: out 0x64, 0xfe (reset)
    c.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp back, should the reset not land
    let banner_at = c.len();
    c.extend(BANNER.as_bytes());
    let rel = (banner_at - (lea_at + 7)) as i32;
    c[lea_at + 3..lea_at + 7].copy_from_slice(&rel.to_le_bytes());
    c
}

/// The counting guest's machine code.
fn counter_code() -> Vec<u8> {
    let mut c: Vec<u8> = Vec::new();
    c.extend([0x31, 0xdb]); // xor ebx, ebx: the count
    let top = c.len();
    c.extend([0xff, 0xc3]); // top: inc ebx
    c.extend([0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    c.extend([0x89, 0xde]); // mov esi, ebx
    c.extend([0xb9, 8, 0, 0, 0]); // mov ecx, 8 (hex digits)
    let digit = c.len();
    c.extend([0xc1, 0xc6, 0x04]); // digit: rol esi, 4 (most significant nibble first)
    c.extend([0x89, 0xf0]); // mov eax, esi
    c.extend([0x24, 0x0f]); // and al, 0x0f
    c.extend([0x04, b'0']); // add al, '0'
    c.extend([0x3c, b'9', 0x76, 0x02]); // cmp al, '9'; jbe +2
    c.extend([0x04, b'A' - b'9' - 1]); // add al, 'A' - '9' - 1
    c.extend([0xee]); // out dx, al
    c.push(0xe2); // loop digit
    c.push(rel8(c.len() + 1, digit));
    c.extend([0xb0, b'\n', 0xee]); // mov al, '\n'; out dx, al
    c.push(0xb9); // mov ecx, COUNTER_DELAY
    c.extend(COUNTER_DELAY.to_le_bytes());
    c.extend([0xe2, 0xfe]); // loop $ (the busy wait)
    c.push(0xeb); // jmp top
    c.push(rel8(c.len() + 1, top));
    c
}

/// Iterations of the busy wait between two lines of the counting guest. At CPL 0 on a PVM host
/// each one goes through KVM's instruction emulator (about a microsecond), which gives a few dozen
/// lines a second there.
const COUNTER_DELAY: u32 = 20_000;

/// A backward rel8 from the end of a jump instruction (`from`) to `to`.
fn rel8(from: usize, to: usize) -> u8 {
    let d = to as isize - from as isize;
    assert!((-128..0).contains(&d), "jump out of rel8 range");
    d as i8 as u8
}

/// The counting guest.
pub fn counter_elf() -> Vec<u8> {
    elf_of(counter_code())
}

/// The banner guest.
pub fn elf() -> Vec<u8> {
    elf_of(code())
}

/// `code` as an ELF64 executable with one PT_LOAD segment.
fn elf_of(code: Vec<u8>) -> Vec<u8> {
    let mut e = Vec::new();
    e.extend(b"\x7fELF");
    e.extend([2, 1, 1, 0]); // 64-bit, little endian, version 1, SysV ABI
    e.extend([0u8; 8]);
    e.extend(2u16.to_le_bytes()); // ET_EXEC
    e.extend(62u16.to_le_bytes()); // EM_X86_64
    e.extend(1u32.to_le_bytes());
    e.extend(LOAD_ADDR.to_le_bytes()); // entry
    e.extend(64u64.to_le_bytes()); // program headers right after this header
    e.extend(0u64.to_le_bytes()); // no section headers
    e.extend(0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        e.extend(v.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
    }
    e.extend(1u32.to_le_bytes()); // PT_LOAD
    e.extend(5u32.to_le_bytes()); // R + X
    for v in [CODE_OFFSET as u64, LOAD_ADDR, LOAD_ADDR, code.len() as u64, code.len() as u64, 0x1000] {
        e.extend(v.to_le_bytes());
    }
    e.resize(CODE_OFFSET, 0);
    e.extend(code);
    e
}

pub fn write_elf(path: &Path) {
    std::fs::write(path, elf()).expect("write tiny guest");
}

pub fn write_counter_elf(path: &Path) {
    std::fs::write(path, counter_elf()).expect("write counting guest");
}
