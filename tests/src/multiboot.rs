//! Multiboot (v1) kernel images around hand-made 32-bit code, for the Multiboot and kvm-unit-tests
//! device tests: the header, and a kernel that carries its own load addresses.

pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// Header flag bit 16: the header gives the load addresses (no ELF needed).
pub const FLAG_ADDRESSES: u32 = 1 << 16;
/// Where kernels load normally: 1 MiB.
pub const LOAD_ADDR: u32 = 0x10_0000;
/// The header with its five address fields; the code follows it, and is entered there.
pub const ADDRESS_HEADER_LEN: u32 = 32;

/// A Multiboot header with `flags`, the five address fields if given, and a checksum off by
/// `checksum_error` (0 for a good one).
pub fn header(flags: u32, addresses: Option<[u32; 5]>, checksum_error: u32) -> Vec<u8> {
    let mut h = Vec::new();
    let checksum = 0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags)).wrapping_add(checksum_error);
    for v in [HEADER_MAGIC, flags, checksum] {
        h.extend(v.to_le_bytes());
    }
    for v in addresses.into_iter().flatten() {
        h.extend(v.to_le_bytes());
    }
    h
}

/// A kernel that carries its load addresses: header at the file's start, `code` after it, loaded
/// at `load` and entered at `load + ADDRESS_HEADER_LEN`.
pub fn address_kernel(code: &[u8], load: u32) -> Vec<u8> {
    let entry = load + ADDRESS_HEADER_LEN;
    let end = entry + code.len() as u32;
    let mut k = header(FLAG_ADDRESSES, Some([load, load, end, end + 0x1000, entry]), 0);
    assert_eq!(k.len() as u32, ADDRESS_HEADER_LEN);
    k.extend(code);
    k
}

/// The ports nvmm gives a Multiboot kernel, which the test kernels drive.
pub mod ports {
    pub const COM1_DATA: u32 = 0x3f8;
    /// `--debug-exit`: a write of V ends nvmm with status (V << 1) | 1.
    pub const DEBUG_EXIT: u32 = 0xf4;
    /// The i8042's command port, and the command that pulses the reset line.
    pub const I8042_COMMAND: u32 = 0x64;
    pub const I8042_RESET: u32 = 0xfe;
    pub const FW_CFG_SELECTOR: u32 = 0x510;
    pub const FW_CFG_DATA: u32 = 0x511;
    pub const PM_TIMER: u32 = 0x608;
    /// The CMOS RTC's index and data ports.
    pub const RTC_INDEX: u32 = 0x70;
    pub const RTC_DATA: u32 = 0x71;
    /// The PM1a enable register the FADT names (vmm/src/acpi.rs checks it does), and its RTC_EN.
    pub const PM1A_ENABLE: u32 = 0x60c + 2;
    pub const RTC_EN: u32 = 0x400;
}
