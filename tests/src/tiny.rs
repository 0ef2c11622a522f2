//! Tiny guests, assembled with iced-x86, no Linux, as ELF64 executables entered at their 64-bit entry. They run on
//! this machine's own /dev/kvm, PVM included, where Linux cannot.
//!
//! - [`elf`]: writes a banner to COM1 (port I/O exits), reads the virtio-mmio magic and device ID at
//!   the first device window (MMIO exits), writes the boot-timer port and resets through the i8042
//!   (which ends the VM with status 0).
//! - [`counter_elf`]: counts forever, one line per count on COM1 (`00000001`, `00000002`, ... in
//!   hex), with a busy wait between lines; for pause and resume.

use std::path::Path;

use iced_x86::code_asm::*;

pub const BANNER: &str = "nvmm tiny guest: ";
/// Where the guest's code is loaded and entered (the loader requires >= 1 MiB).
const LOAD_ADDR: u64 = 0x10_0000;
const CODE_OFFSET: usize = 0x1000;

// The ports the guests use.
const COM1_DATA: u32 = 0x3f8;
const COM1_LSR: u32 = 0x3fd;
/// LSR bit 0: a received byte is waiting.
const LSR_DATA_READY: u32 = 0x01;
/// nvmm's boot-timer port, and the value that reports the boot time.
const BOOT_TIMER_PORT: u32 = 0x440;
const BOOT_TIMER_MAGIC: u32 = 123;
/// The i8042's command port, and the command that pulses the reset line.
const I8042_COMMAND: u32 = 0x64;
const I8042_RESET: u32 = 0xfe;

/// A label on the next instruction, for the jumps back to it.
pub fn here(a: &mut CodeAssembler) -> Result<CodeLabel, IcedError> {
    let mut label = a.create_label();
    a.set_label(&mut label)?;
    Ok(label)
}

/// The 64-bit guest that `build` assembles at its load address, as an ELF64 executable.
fn guest(build: impl FnOnce(&mut CodeAssembler) -> Result<(), IcedError>) -> Vec<u8> {
    let mut a = CodeAssembler::new(64).expect("a 64-bit assembler");
    build(&mut a).expect("a tiny guest's instructions");
    elf_of(a.assemble(LOAD_ADDR).expect("assemble a tiny guest"))
}

/// The banner guest: the banner, then the bytes of the magic, the device ID as a digit and a
/// newline, all on COM1; then the boot-timer write and the reset.
fn banner(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut text = a.create_label();
    a.mov(dx, COM1_DATA)?;
    a.lea(rsi, ptr(text))?;
    a.mov(ecx, BANNER.len() as u32)?;
    let print = here(a)?;
    a.lodsb()?;
    a.out(dx, al)?;
    a.loop_(print)?;
    a.mov(ebx, VIRTIO_MMIO_BASE)?;
    // One MMIO read each for the magic and the device ID: the tests count them.
    a.mov(eax, dword_ptr(rbx + MMIO_MAGIC))?;
    for i in 0..4 {
        a.out(dx, al)?;
        if i < 3 {
            a.shr(eax, 8)?;
        }
    }
    a.mov(eax, dword_ptr(rbx + MMIO_DEVICE_ID))?;
    a.add(al, '0' as u32)?;
    a.out(dx, al)?;
    a.mov(al, '\n' as u32)?;
    a.out(dx, al)?;
    a.mov(dx, BOOT_TIMER_PORT)?;
    a.mov(al, BOOT_TIMER_MAGIC)?;
    a.out(dx, al)?;
    reset(a)?;
    a.set_label(&mut text)?;
    a.db(BANNER.as_bytes())
}

/// The counting guest: one line of 8 hex digits per count, a busy wait between lines.
fn counter(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.xor(ebx, ebx)?; // the count
    let top = here(a)?;
    a.inc(ebx)?;
    a.mov(dx, COM1_DATA)?;
    a.mov(esi, ebx)?;
    a.mov(ecx, 8u32)?; // hex digits
    let digit = here(a)?;
    a.rol(esi, 4)?; // most significant nibble first
    a.mov(eax, esi)?;
    a.and(al, 0x0f)?;
    a.add(al, '0' as u32)?;
    let mut put = a.create_label();
    a.cmp(al, '9' as u32)?;
    a.jbe(put)?;
    a.add(al, 'A' as u32 - '9' as u32 - 1)?;
    a.set_label(&mut put)?;
    a.out(dx, al)?;
    a.loop_(digit)?;
    a.mov(al, '\n' as u32)?;
    a.out(dx, al)?;
    a.mov(ecx, COUNTER_DELAY)?;
    let wait = here(a)?;
    a.loop_(wait)?;
    a.jmp(top)
}

/// Iterations of the busy wait between two lines of the counting guest. At CPL 0 on a PVM host
/// each one goes through KVM's instruction emulator (about a microsecond), which gives a few dozen
/// lines a second there.
const COUNTER_DELAY: u32 = 20_000;

/// The counting guest.
pub fn counter_elf() -> Vec<u8> {
    guest(counter)
}

/// The banner guest.
pub fn elf() -> Vec<u8> {
    guest(banner)
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

/// The first virtio-mmio window, where the first `--disk` or `--net` device sits.
pub const VIRTIO_MMIO_BASE: u32 = 0xd000_0000;

/// Pulses the i8042 reset line, which ends nvmm with status 0; halts should the reset not land.
fn reset(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.mov(al, I8042_RESET)?;
    a.out(I8042_COMMAND, al)?;
    let halt = here(a)?;
    a.hlt()?;
    a.jmp(halt)
}

/// Sleeps for good: interrupts off, then hlt, which KVM's in-kernel LAPIC handles without coming
/// back to nvmm.
fn halt_forever(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.cli()?;
    let halt = here(a)?;
    a.hlt()?;
    a.jmp(halt)
}

/// `mov dword [rbx + reg], value`: rbx holds the virtio-mmio window.
fn mmio32(a: &mut CodeAssembler, reg: u32, value: u32) -> Result<(), IcedError> {
    a.mov(dword_ptr(rbx + reg), value)
}

// virtio-mmio register offsets (virtio 1.2, 4.2.2), for the guests below.
const MMIO_MAGIC: u32 = 0x000;
const MMIO_DEVICE_ID: u32 = 0x008;
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
    guest(|a| {
        a.mov(ebx, VIRTIO_MMIO_BASE)?;
        a.mov(ecx, count)?;
        let top = here(a)?;
        mmio32(a, MMIO_MAGIC, 0)?;
        a.loop_(top)?;
        reset(a)
    })
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
    // Each queue's descriptor table, then its available ring and used ring at these offsets.
    const RX: u32 = 0x20_0000;
    const TX: u32 = 0x21_0000;
    const AVAIL: u32 = 0x1000;
    const USED: u32 = 0x2000;
    /// The available ring's index, after its flags.
    const AVAIL_IDX: u32 = AVAIL + 2;
    const BUFFER: u32 = 0x30_0000;
    guest(|a| {
        a.mov(ebx, VIRTIO_MMIO_BASE)?;
        // Handshake (virtio 1.2, 3.1.1): ACKNOWLEDGE, DRIVER, VIRTIO_F_VERSION_1 only, FEATURES_OK.
        for (reg, value) in [
            (MMIO_STATUS, 1),
            (MMIO_STATUS, 3),
            (MMIO_DRIVER_FEATURES_SEL, 1),
            (MMIO_DRIVER_FEATURES, 1),
            (MMIO_DRIVER_FEATURES_SEL, 0),
            (MMIO_DRIVER_FEATURES, 0),
            (MMIO_STATUS, 11),
        ] {
            mmio32(a, reg, value)?;
        }
        for (queue, base) in [(0, RX), (1, TX)] {
            for (reg, value) in [
                (MMIO_QUEUE_SEL, queue),
                (MMIO_QUEUE_NUM, REFILL_QUEUE_SIZE),
                (MMIO_QUEUE_DESC_LOW, base),
                (MMIO_QUEUE_AVAIL_LOW, base + AVAIL),
                (MMIO_QUEUE_USED_LOW, base + USED),
                (MMIO_QUEUE_READY, 1),
            ] {
                mmio32(a, reg, value)?;
            }
        }
        // Descriptor 0: the buffer, device-writable (flags 2), no next. Guest RAM starts zeroed, so
        // every available ring slot already names descriptor 0.
        for (offset, value) in [(0, BUFFER), (4, 0), (8, 2048), (12, 2)] {
            a.mov(dword_ptr(RX + offset), value)?;
        }
        mmio32(a, MMIO_STATUS, 15)?;
        a.mov(ecx, rounds)?;
        let top = here(a)?;
        a.add(word_ptr(RX + AVAIL_IDX), u32::from(REFILL_STEP))?;
        mmio32(a, MMIO_QUEUE_NOTIFY, 0)?;
        a.mov(edx, REFILL_DELAY)?; // the wait, in edx: ecx counts the rounds
        let wait = here(a)?;
        a.dec(edx)?;
        a.jnz(wait)?;
        a.loop_(top)?;
        reset(a)
    })
}

/// Echoes what arrives on COM1 back to COM1, polling the line status register, until it reads a
/// `q` (echoed too), then resets.
pub fn echo_elf() -> Vec<u8> {
    guest(|a| {
        let top = here(a)?;
        a.mov(dx, COM1_LSR)?;
        let poll = here(a)?;
        a.in_(al, dx)?;
        a.test(al, LSR_DATA_READY)?;
        a.jz(poll)?;
        a.mov(dx, COM1_DATA)?;
        a.in_(al, dx)?;
        a.out(dx, al)?;
        a.cmp(al, 'q' as u32)?;
        a.jne(top)?;
        reset(a)
    })
}

/// A guest that halts at once and never reads its UART.
pub fn halt_elf() -> Vec<u8> {
    guest(halt_forever)
}
