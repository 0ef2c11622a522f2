//! The Intel MultiProcessor table: how a guest without ACPI finds its CPUs, its IOAPIC and how ISA
//! IRQs are wired. Built as bytes (MP spec 1.4) and written to the last KiB of base memory.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::memory::layout::{APIC_START, IOAPIC_START, MPTABLE_START};

const FLOATING_POINTER_SIGNATURE: &[u8; 4] = b"_MP_";
const CONFIG_TABLE_SIGNATURE: &[u8; 4] = b"PCMP";
const SPEC_REVISION: u8 = 4;
const FLOATING_POINTER_LEN: usize = 16;
const CONFIG_HEADER_LEN: usize = 44;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;

const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Version and CPUID signature/features the processor entries claim: an integrated APIC (0x14),
/// family 6, with FPU and APIC present.
const LAPIC_VERSION: u8 = 0x14;
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;
const IOAPIC_VERSION: u8 = 0x11;
const IOAPIC_ENABLED: u8 = 1;
/// The IOAPIC KVM emulates has 24 pins.
pub const IOAPIC_PINS: u8 = 24;

const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
/// Polarity and trigger "conform to the bus" (ISA: active high, edge).
const INT_FLAGS_CONFORM: u16 = 0;
const ISA_BUS_ID: u8 = 0;
const ALL_LAPICS: u8 = 0xff;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("MP table: {0} vCPUs is more than the table can describe ({MAX_CPUS_IN_TABLE})")]
    TooManyCpus(u8),
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// APIC IDs are 8 bits and the IOAPIC takes the ID after the last CPU.
pub const MAX_CPUS_IN_TABLE: u8 = 254;

/// The IOAPIC's ID: the first one after the vCPUs' local APIC IDs (0 to `num_cpus` - 1). The
/// ACPI MADT says the same.
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)).wrapping_neg()
}

/// Builds the floating pointer followed by the configuration table, for a table placed at `base`.
pub fn build(num_cpus: u8, base: u64) -> Result<Vec<u8>, Error> {
    if num_cpus == 0 || num_cpus > MAX_CPUS_IN_TABLE {
        return Err(Error::TooManyCpus(num_cpus));
    }
    let ioapic_id = ioapic_id(num_cpus);
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..num_cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, id, LAPIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, IOAPIC_ENABLED]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 2;
    // ISA IRQ n arrives on IOAPIC pin n, as KVM's default GSI routing wires it. The 8259's ExtINT
    // reaches the CPUs through LINT0 only: declaring it on an IOAPIC pin too leaves Linux without
    // a mapping for IRQ 0 (the timer) and it oopses in check_timer().
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT]);
        entries.extend_from_slice(&INT_FLAGS_CONFORM.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, pin, ioapic_id, pin]);
        count += 1;
    }
    // Every LAPIC's LINT0 takes ExtINT and LINT1 takes NMI.
    for (kind, lint) in [(INT_TYPE_EXTINT, 0u8), (INT_TYPE_NMI, 1u8)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind]);
        entries.extend_from_slice(&INT_FLAGS_CONFORM.to_le_bytes());
        entries.extend_from_slice(&[ISA_BUS_ID, 0, ALL_LAPICS, lint]);
        count += 1;
    }

    let table_len = CONFIG_HEADER_LEN + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(CONFIG_TABLE_SIGNATURE);
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.extend_from_slice(&[SPEC_REVISION, 0]); // checksum filled below
    table.extend_from_slice(b"NVMM    "); // OEM ID, 8 bytes
    table.extend_from_slice(b"000000000000"); // product ID, 12 bytes
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0u8; 4]); // extended table length, checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut out = Vec::with_capacity(FLOATING_POINTER_LEN + table_len);
    out.extend_from_slice(FLOATING_POINTER_SIGNATURE);
    out.extend_from_slice(&((base + FLOATING_POINTER_LEN as u64) as u32).to_le_bytes());
    out.extend_from_slice(&[1, SPEC_REVISION, 0, 0, 0, 0, 0, 0]); // length in 16-byte units, ...
    out[10] = checksum(&out);
    out.extend_from_slice(&table);
    Ok(out)
}

/// Writes the MP table for `num_cpus` vCPUs at [`MPTABLE_START`].
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), Error> {
    let bytes = build(num_cpus, MPTABLE_START)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START)).map_err(Error::Write)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_pointers_are_valid() {
        let t = build(4, MPTABLE_START).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(sum(&t[..16]), 0);
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, MPTABLE_START + 16);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
    }

    #[test]
    fn describes_each_cpu_once_with_one_bootstrap() {
        for n in [1u8, 2, 32, 64, MAX_CPUS_IN_TABLE] {
            let t = build(n, MPTABLE_START).unwrap();
            let table = &t[16..];
            let count = u16::from_le_bytes([table[34], table[35]]) as usize;
            assert_eq!(count, n as usize + 2 + IOAPIC_PINS as usize + 2);
            let cpus: Vec<&[u8]> = table[44..44 + 20 * n as usize].chunks(20).collect();
            assert!(cpus.iter().all(|c| c[0] == ENTRY_PROCESSOR));
            let ids: Vec<u8> = cpus.iter().map(|c| c[1]).collect();
            assert_eq!(ids, (0..n).collect::<Vec<_>>());
            assert_eq!(cpus.iter().filter(|c| c[3] & CPU_BOOTSTRAP != 0).count(), 1);
            // The IOAPIC follows the bus entry and takes the next free APIC ID.
            let ioapic = &table[44 + 20 * n as usize + 8..];
            assert_eq!((ioapic[0], ioapic[1]), (ENTRY_IOAPIC, n));
        }
    }

    #[test]
    fn every_ioapic_pin_is_a_plain_interrupt() {
        let n = 2usize;
        let t = build(n as u8, MPTABLE_START).unwrap();
        let io_entries = &t[16 + 44 + 20 * n + 16..][..8 * IOAPIC_PINS as usize];
        for (pin, e) in io_entries.chunks(8).enumerate() {
            assert_eq!((e[0], e[1], e[5], e[7]), (ENTRY_IO_INTERRUPT, INT_TYPE_INT, pin as u8, pin as u8));
        }
    }

    #[test]
    fn refuses_impossible_cpu_counts() {
        assert!(build(0, MPTABLE_START).is_err());
        assert!(build(255, MPTABLE_START).is_err());
    }

    #[test]
    fn fits_in_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        setup(&mem, 64).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_START)).unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
