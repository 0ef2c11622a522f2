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

/// A few x86-64 instructions, encoded by hand, for guests that attack nvmm from inside: enough to
/// fill guest memory, poke MMIO registers in a loop and end.
#[derive(Default)]
pub struct Asm(Vec<u8>);

/// The first virtio-mmio window, where the first `--disk` or `--net` device sits.
pub const VIRTIO_MMIO_BASE: u32 = 0xd000_0000;

impl Asm {
    /// `mov ebx, imm32`: rbx is the base for [`Asm::mmio32`].
    pub fn mov_ebx(mut self, imm: u32) -> Self {
        self.0.push(0xbb);
        self.0.extend(imm.to_le_bytes());
        self
    }

    /// `mov edi, imm32`: rdi is the base for [`Asm::ram32`] and [`Asm::add_ram16`].
    pub fn mov_edi(mut self, imm: u32) -> Self {
        self.0.push(0xbf);
        self.0.extend(imm.to_le_bytes());
        self
    }

    /// `mov ecx, imm32`: the count for [`Asm::loop_back`].
    pub fn mov_ecx(mut self, imm: u32) -> Self {
        self.0.push(0xb9);
        self.0.extend(imm.to_le_bytes());
        self
    }

    /// `mov dword [rbx + disp32], imm32`.
    pub fn mmio32(mut self, disp: u32, imm: u32) -> Self {
        self.0.extend([0xc7, 0x83]);
        self.0.extend(disp.to_le_bytes());
        self.0.extend(imm.to_le_bytes());
        self
    }

    /// `mov dword [rdi + disp32], imm32`.
    pub fn ram32(mut self, disp: u32, imm: u32) -> Self {
        self.0.extend([0xc7, 0x87]);
        self.0.extend(disp.to_le_bytes());
        self.0.extend(imm.to_le_bytes());
        self
    }

    /// `add word [rdi + disp32], imm16`.
    pub fn add_ram16(mut self, disp: u32, imm: u16) -> Self {
        self.0.extend([0x66, 0x81, 0x87]);
        self.0.extend(disp.to_le_bytes());
        self.0.extend(imm.to_le_bytes());
        self
    }

    /// Where the next instruction goes, for [`Asm::loop_back`].
    pub fn here(&self) -> usize {
        self.0.len()
    }

    /// `loop target`: decrements rcx and jumps back while it is not zero.
    pub fn loop_back(mut self, target: usize) -> Self {
        self.0.push(0xe2);
        let from = self.0.len() + 1;
        self.0.push(rel8(from, target));
        self
    }

    /// Busy-waits `n` iterations (`mov edx, n; 1: dec edx; jnz 1b`), leaving rcx alone.
    pub fn delay(mut self, n: u32) -> Self {
        self.0.push(0xba);
        self.0.extend(n.to_le_bytes());
        self.0.extend([0xff, 0xca, 0x75, 0xfc]);
        self
    }

    /// Pulses the i8042 reset line, which ends nvmm with status 0.
    pub fn reset(mut self) -> Self {
        self.0.extend([0xb0, 0xfe, 0xe6, 0x64]); // mov al, 0xfe; out 0x64, al
        self.0.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp back, should the reset not land
        self
    }

    /// Sleeps for good: interrupts off, then hlt, which KVM's in-kernel LAPIC handles without
    /// coming back to nvmm.
    pub fn halt_forever(mut self) -> Self {
        self.0.extend([0xfa, 0xf4, 0xeb, 0xfd]); // cli; hlt; jmp back to the hlt
        self
    }

    /// The guest as an ELF64 executable.
    pub fn elf(self) -> Vec<u8> {
        elf_of(self.0)
    }
}

// virtio-mmio register offsets (virtio 1.2, 4.2.2), for the guests below.
const MMIO_MAGIC: u32 = 0x000;
const MMIO_DRIVER_FEATURES: u32 = 0x020;
const MMIO_DRIVER_FEATURES_SEL: u32 = 0x024;
const MMIO_QUEUE_SEL: u32 = 0x030;
const MMIO_QUEUE_NUM: u32 = 0x038;
const MMIO_QUEUE_READY: u32 = 0x044;
const MMIO_QUEUE_NOTIFY: u32 = 0x050;
const MMIO_STATUS: u32 = 0x070;
const MMIO_QUEUE_DESC_LOW: u32 = 0x080;
const MMIO_QUEUE_AVAIL_LOW: u32 = 0x090;
const MMIO_QUEUE_USED_LOW: u32 = 0x0a0;

/// Writes `count` times to the first virtio-mmio device's read-only magic register (each write
/// is a warning nvmm could log), then resets.
pub fn register_flood_elf(count: u32) -> Vec<u8> {
    let a = Asm::default().mov_ebx(VIRTIO_MMIO_BASE).mov_ecx(count);
    let top = a.here();
    a.mmio32(MMIO_MAGIC, 0).loop_back(top).reset().elf()
}

/// Iterations of the refill guest's wait between rounds: at CPL 0 on a PVM host each one is
/// emulated (about a microsecond per instruction).
const REFILL_DELAY: u32 = 100;

/// How far the refill guest moves the available index each round: half a ring, so that a round
/// the device thread misses (two notifications taken as one) still leaves an index it accepts.
const REFILL_STEP: u16 = 128;

/// Queue size the refill guest sets up for both virtio-net queues (the device's maximum).
pub const REFILL_QUEUE_SIZE: u32 = 256;

/// Drives the first virtio-mmio device, a virtio-net, to DRIVER_OK with 256-entry queues, then
/// offers one and the same 2 KiB RX buffer (descriptor 0) `rounds` times: each round moves the
/// available index on by half a ring, every slot of which names descriptor 0, and notifies.
/// Between two rounds the guest waits a little, so that the device thread, which takes notifications
/// through an ioeventfd, sees most rounds one by one (an index that moved by more than a ring at
/// once is refused before any chain is taken). Then resets.
pub fn rx_refill_elf(rounds: u32) -> Vec<u8> {
    const RX: u32 = 0x20_0000; // descriptor table; avail ring at +0x1000, used ring at +0x2000
    const TX: u32 = 0x21_0000;
    const BUFFER: u32 = 0x30_0000;
    let mut a = Asm::default().mov_ebx(VIRTIO_MMIO_BASE);
    // Handshake (virtio 1.2, 3.1.1): ACKNOWLEDGE, DRIVER, VIRTIO_F_VERSION_1 only, FEATURES_OK.
    a = a.mmio32(MMIO_STATUS, 1).mmio32(MMIO_STATUS, 3);
    a = a.mmio32(MMIO_DRIVER_FEATURES_SEL, 1).mmio32(MMIO_DRIVER_FEATURES, 1);
    a = a.mmio32(MMIO_DRIVER_FEATURES_SEL, 0).mmio32(MMIO_DRIVER_FEATURES, 0);
    a = a.mmio32(MMIO_STATUS, 11);
    for (queue, base) in [(0, RX), (1, TX)] {
        a = a.mmio32(MMIO_QUEUE_SEL, queue).mmio32(MMIO_QUEUE_NUM, REFILL_QUEUE_SIZE);
        a = a.mmio32(MMIO_QUEUE_DESC_LOW, base).mmio32(MMIO_QUEUE_AVAIL_LOW, base + 0x1000);
        a = a.mmio32(MMIO_QUEUE_USED_LOW, base + 0x2000).mmio32(MMIO_QUEUE_READY, 1);
    }
    // Descriptor 0: the buffer, device-writable (flags 2), no next. Guest RAM starts zeroed, so
    // every available ring slot already names descriptor 0.
    a = a.mov_edi(RX).ram32(0, BUFFER).ram32(4, 0).ram32(8, 2048).ram32(12, 2);
    a = a.mmio32(MMIO_STATUS, 15);
    a = a.mov_ecx(rounds);
    let top = a.here();
    a = a.add_ram16(0x1000 + 2, REFILL_STEP).mmio32(MMIO_QUEUE_NOTIFY, 0).delay(REFILL_DELAY).loop_back(top);
    a.reset().elf()
}

/// Echoes what arrives on COM1 back to COM1, polling the line status register, until it reads a
/// `q` (echoed too), then resets.
pub fn echo_elf() -> Vec<u8> {
    let mut c = vec![0x66, 0xba, 0xfd, 0x03]; // top: mov dx, 0x3fd (line status)
    let poll = c.len();
    c.extend([0xec, 0xa8, 0x01]); // poll: in al, dx; test al, 1 (data ready)
    c.push(0x74); // jz poll
    c.push(rel8(c.len() + 1, poll));
    c.extend([0x66, 0xba, 0xf8, 0x03, 0xec, 0xee]); // mov dx, 0x3f8; in al, dx; out dx, al
    c.extend([0x3c, b'q', 0x75]); // cmp al, 'q'; jne top
    c.push(rel8(c.len() + 1, 0));
    Asm(c).reset().elf()
}

/// A guest that halts at once and never reads its UART.
pub fn halt_elf() -> Vec<u8> {
    Asm::default().halt_forever().elf()
}
