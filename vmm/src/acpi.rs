//! ACPI tables, the way distribution kernels find CPUs and devices: an RSDP pointing at an XSDT,
//! a hardware-reduced FADT (no PM timer, no SCI, no fixed buttons: power-off and reset go
//! through three I/O ports, `nvmm_devices::acpi_pm`), a MADT with one local APIC per vCPU and the
//! IOAPIC, and a DSDT describing COM1 and each virtio-mmio window. Built with rust-vmm's
//! `acpi_tables` and written to the BIOS area below 1 MiB, which the E820 map already reserves
//! and where Linux also scans for the RSDP when no boot protocol hands it the address.
//!
//! A Multiboot kernel (kvm-unit-tests) gets the FADT of a PC with fixed hardware instead, as QEMU
//! gives it: the PM timer, the PM1 event and control blocks through which it sleeps in S3, the
//! CMOS RTC, and a FACS, where it leaves the address its resume code is to run at.

use acpi_tables::aml::{Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, IO};
use acpi_tables::facs::FACS;
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use nvmm_devices::acpi_pm::{self, ACPI_PM_PORT};
use nvmm_devices::acpi_pm1::{self, PM1_PORT};
use nvmm_devices::cmos_rtc;
use nvmm_devices::pm_timer::{self, PM_TIMER_PORT};
use nvmm_devices::serial;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use zerocopy::byteorder::{LE, U16, U32};
use zerocopy::{Immutable, IntoBytes};

use crate::memory::layout::{ACPI_TABLES_END, ACPI_TABLES_START, APIC_START, IOAPIC_START};
use crate::mptable;
use crate::virtio::MmioWindow;

const OEM_ID: [u8; 6] = *b"NVMM  ";
const OEM_REVISION: u32 = 1;
/// DSDT revision 2 and up has 64-bit integers.
const DSDT_REVISION: u8 = 6;
const SDT_HEADER_LEN: u32 = 36;
/// Tables start on 16-byte boundaries (the RSDP must; the others are merely tidy).
const TABLE_ALIGN: u64 = 16;
/// The FACS must start on a 64-byte boundary (ACPI 6.5, 5.2.10).
const FACS_ALIGN: u64 = 64;
/// Where the FIRMWARE_CTRL field points in a FACS: the real-mode waking vector and its 64-bit
/// successor (which nvmm does not honour).
pub const FACS_WAKING_VECTOR: u64 = std::mem::offset_of!(FACS, waking) as u64;
pub const FACS_X_WAKING_VECTOR: u64 = std::mem::offset_of!(FACS, x_waking) as u64;
/// The ISA interrupt the SCI is wired to on a PC. Named in the FADT, as ACPI asks; nothing raises
/// it (see `nvmm_devices::acpi_pm1`).
const SCI_IRQ: u16 = 9;
/// IAPC_BOOT_ARCH: no VGA, no MSI (nvmm has no PCI), no CMOS RTC. The 8042 bit stays clear, so
/// Linux does not probe a keyboard controller; `reboot=k` still reaches the i8042's reset line.
const BOOT_ARCH_NO_VGA: u16 = 1 << 2;
const BOOT_ARCH_NO_MSI: u16 = 1 << 3;
const BOOT_ARCH_NO_CMOS_RTC: u16 = 1 << 5;
/// MADT structure types the crate has no type for (ACPI 6.5, 5.2.12).
const MADT_INTERRUPT_SOURCE_OVERRIDE: u8 = 2;
const MADT_LOCAL_APIC_NMI: u8 = 4;
/// MPS INTI flags: polarity and trigger "conform to the bus" (ISA: active high, edge).
const MPS_INTI_CONFORM: u16 = 0;
const ISA_BUS: u8 = 0;
const ALL_PROCESSORS: u8 = 0xff;
const PIT_IRQ: u8 = 0;
const LINT1: u8 = 1;

/// The platform the tables describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    /// Linux guests: hardware-reduced, with no PM timer (which Linux would take, a VM exit per
    /// read, as its TSC's watchdog) and no RTC.
    HardwareReduced,
    /// Multiboot kernels: fixed hardware, as kvm-unit-tests expect of QEMU's PC (see the module
    /// documentation).
    FixedHardware,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("ACPI tables: {0} bytes do not fit in the {max} bytes reserved for them", max = ACPI_TABLES_END - ACPI_TABLES_START)]
    TooLarge(u64),
    #[error("cannot write the ACPI tables to guest memory: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// A MADT interrupt source override: ISA IRQ `source` arrives on `gsi`.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct InterruptSourceOverride {
    r#type: u8,
    length: u8,
    bus: u8,
    source: u8,
    gsi: U32<LE>,
    flags: U16<LE>,
}

/// A MADT local APIC NMI structure: which LINT pin of which processors takes NMIs.
#[repr(C, packed)]
#[derive(Clone, Copy, IntoBytes, Immutable)]
struct LocalApicNmi {
    r#type: u8,
    length: u8,
    processor_uid: u8,
    flags: U16<LE>,
    lint: u8,
}

impl Aml for InterruptSourceOverride {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

impl Aml for LocalApicNmi {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        sink.vec(self.as_bytes());
    }
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

/// The DSDT: COM1, each virtio-mmio window (`LNRO0005`, the ID Linux's virtio_mmio driver
/// matches), and `_S5_`, the sleep type that powers off (with fixed hardware also `_S3_`, the one
/// that suspends to RAM).
pub fn dsdt(virtio: &[MmioWindow], platform: Platform) -> Vec<u8> {
    let mut body = Vec::new();
    // Name::new encodes its value at once, so the resource descriptors need not outlive it.
    let com1_crs = Name::new(
        "_CRS".into(),
        &ResourceTemplate::new(vec![
            &IO::new(serial::COM1_PORT as u16, serial::COM1_PORT as u16, 1, serial::PORT_COUNT as u8),
            &Interrupt::new(true, true, false, false, serial::COM1_IRQ),
        ]),
    );
    Device::new(
        "_SB_.COM1".into(),
        vec![&Name::new("_HID".into(), &EISAName::new("PNP0501")), &Name::new("_UID".into(), &0u8), &com1_crs],
    )
    .to_aml_bytes(&mut body);
    for (i, w) in virtio.iter().enumerate() {
        let crs = Name::new(
            "_CRS".into(),
            &ResourceTemplate::new(vec![
                // Windows sit in the MMIO gap below 4 GiB, so they fit Memory32Fixed.
                &Memory32Fixed::new(true, w.base as u32, w.len as u32),
                // Edge: the transport signals through an irqfd, which KVM delivers as an edge.
                &Interrupt::new(true, true, false, false, w.irq),
            ]),
        );
        let uid = i as u32;
        Device::new(
            Path::new(&format!("_SB_.V{i:03}")),
            vec![&Name::new("_HID".into(), &"LNRO0005"), &Name::new("_UID".into(), &uid), &crs],
        )
        .to_aml_bytes(&mut body);
    }
    if platform == Platform::FixedHardware {
        Name::new("_S3_".into(), &Package::new(vec![&acpi_pm1::S3_SLEEP_TYPE])).to_aml_bytes(&mut body);
    }
    Name::new("_S5_".into(), &Package::new(vec![&acpi_pm::S5_SLEEP_TYPE])).to_aml_bytes(&mut body);

    let mut table = Sdt::new(*b"DSDT", SDT_HEADER_LEN, DSDT_REVISION, OEM_ID, *b"NVMMDSDT", OEM_REVISION);
    table.append_slice(&body);
    table.as_slice().to_vec()
}

/// The MADT: local APIC IDs are vCPU indexes (as CPUID reports them), the IOAPIC takes the ID
/// after them, as in the MP table.
pub fn madt(cpus: u8) -> Vec<u8> {
    let mut madt = MADT::new(OEM_ID, *b"NVMMAPIC", OEM_REVISION, LocalInterruptController::Address(APIC_START as u32));
    for id in 0..cpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(mptable::ioapic_id(cpus), IOAPIC_START as u32, 0));
    // KVM's default GSI routing wires ISA IRQ n to IOAPIC pin n, which is also ACPI's default for
    // ISA IRQs; the timer's override says so explicitly, since PC firmware usually moves it to
    // pin 2, where nothing drives it here.
    madt.add_structure(InterruptSourceOverride {
        r#type: MADT_INTERRUPT_SOURCE_OVERRIDE,
        length: 10,
        bus: ISA_BUS,
        source: PIT_IRQ,
        gsi: u32::from(PIT_IRQ).into(),
        flags: MPS_INTI_CONFORM.into(),
    });
    // As in the MP table: every LAPIC's LINT1 takes NMIs.
    madt.add_structure(LocalApicNmi {
        r#type: MADT_LOCAL_APIC_NMI,
        length: 6,
        processor_uid: ALL_PROCESSORS,
        flags: MPS_INTI_CONFORM.into(),
        lint: LINT1,
    });
    bytes(&madt)
}

fn io_register(port: u64) -> GAS {
    GAS::new(AddressSpace::SystemIo, 8, 0, AccessSize::ByteAccess, port)
}

/// A block of 16-bit I/O registers, `len` bytes long.
fn io_block(port: u64, len: u8) -> GAS {
    GAS::new(AddressSpace::SystemIo, len * 8, 0, AccessSize::WordAccess, port)
}

/// The FADT: the DSDT, the sleep and reset registers Linux uses; with fixed hardware (`facs` is
/// then the FACS's address) also the PM timer, the PM1 blocks and the RTC's century register.
pub fn fadt(dsdt_addr: u64, facs: Option<u32>) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"NVMMFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::ResetRegSup)
        // Set means "no fixed-feature button": nvmm has neither.
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    let mut boot_arch = BOOT_ARCH_NO_VGA | BOOT_ARCH_NO_MSI;
    match facs {
        None => {
            fadt = fadt.flag(Flags::HwReducedAcpi);
            boot_arch |= BOOT_ARCH_NO_CMOS_RTC;
        }
        Some(facs) => {
            // FIRMWARE_CTRL, the 32-bit field kvm-unit-tests read (X_FIRMWARE_CTRL stays 0).
            // WBINVD works, so a guest can flush its caches before it sleeps.
            fadt = fadt.firmware_ctrl_32(facs).flag(Flags::Wbinvd);
            fixed_hardware(&mut fadt);
        }
    }
    fadt.iapc_boot_arch = boot_arch.into();
    fadt.sleep_control_reg = io_register(ACPI_PM_PORT + acpi_pm::SLEEP_CONTROL);
    fadt.sleep_status_reg = io_register(ACPI_PM_PORT + acpi_pm::SLEEP_STATUS);
    fadt.reset_reg = io_register(ACPI_PM_PORT + acpi_pm::RESET);
    fadt.reset_value = acpi_pm::RESET_VALUE;
    bytes(&fadt.finalize())
}

/// The fixed-hardware fields, each in its 32-bit form (which kvm-unit-tests read) and its
/// generic-address form (which ACPI 2.0+ guests prefer). No SMI command port: ACPI mode is on
/// from the start.
fn fixed_hardware(fadt: &mut FADTBuilder) {
    fadt.sci_int = SCI_IRQ.into();
    fadt.pm1a_evt_blk = (PM1_PORT as u32).into();
    fadt.pm1_evt_len = acpi_pm1::EVENT_BLOCK_LEN;
    fadt.x_pm1a_evt_blk = io_block(PM1_PORT, acpi_pm1::EVENT_BLOCK_LEN);
    let control = PM1_PORT + acpi_pm1::CONTROL;
    fadt.pm1a_cnt_blk = (control as u32).into();
    fadt.pm1_cnt_len = acpi_pm1::CONTROL_BLOCK_LEN;
    fadt.x_pm1a_cnt_blk = io_block(control, acpi_pm1::CONTROL_BLOCK_LEN);
    fadt.pm_tmr_blk = (PM_TIMER_PORT as u32).into();
    fadt.pm_tmr_len = pm_timer::PORT_COUNT as u8;
    fadt.x_pm_tmr_blk = GAS::new(AddressSpace::SystemIo, 32, 0, AccessSize::DwordAccess, PM_TIMER_PORT);
    fadt.century = cmos_rtc::CENTURY;
}

/// The FACS: only its waking vectors mean anything to nvmm, and the guest writes them.
pub fn facs() -> Vec<u8> {
    bytes(&FACS::new())
}

/// Where [`setup`] places the FACS: first after the RSDP, so that it is found at the same place in
/// every VM (and in a snapshot of one) without reading the tables back.
pub fn facs_addr() -> u64 {
    (ACPI_TABLES_START + Rsdp::len() as u64).next_multiple_of(FACS_ALIGN)
}

/// Every table, each with the guest-physical address it is written at.
pub struct Tables {
    pub rsdp_addr: u64,
    pub placed: Vec<(u64, Vec<u8>)>,
}

/// Lays the tables out from `start`: the RSDP first (Linux's scan finds it at the start of the
/// BIOS area), with fixed hardware the FACS, then the DSDT, FADT, MADT and XSDT, each after the
/// tables it points to.
pub fn build(start: u64, cpus: u8, virtio: &[MmioWindow], platform: Platform) -> Result<Tables, Error> {
    let mut placed = Vec::new();
    let mut next = start + Rsdp::len() as u64;
    let mut place = |table: Vec<u8>, align: u64| {
        let addr = next.next_multiple_of(align);
        next = addr + table.len() as u64;
        placed.push((addr, table));
        addr
    };
    // Below 1 MiB, so its address fits FIRMWARE_CTRL.
    let facs = (platform == Platform::FixedHardware).then(|| place(facs(), FACS_ALIGN) as u32);
    let dsdt_addr = place(dsdt(virtio, platform), TABLE_ALIGN);
    let fadt_addr = place(fadt(dsdt_addr, facs), TABLE_ALIGN);
    let madt_addr = place(madt(cpus), TABLE_ALIGN);
    let mut xsdt = XSDT::new(OEM_ID, *b"NVMMXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(bytes(&xsdt), TABLE_ALIGN);
    placed.insert(0, (start, bytes(&Rsdp::new(OEM_ID, xsdt_addr))));
    let end = placed.iter().map(|(a, t)| a + t.len() as u64).max().unwrap_or(start);
    if end > ACPI_TABLES_END {
        return Err(Error::TooLarge(end - start));
    }
    Ok(Tables { rsdp_addr: start, placed })
}

/// Writes the tables for `cpus` vCPUs, the `virtio` windows and `platform`; returns the RSDP's
/// address.
pub fn setup(mem: &GuestMemoryMmap, cpus: u8, virtio: &[MmioWindow], platform: Platform) -> Result<u64, Error> {
    let tables = build(ACPI_TABLES_START, cpus, virtio, platform)?;
    for (addr, table) in &tables.placed {
        mem.write_slice(table, GuestAddress(*addr)).map_err(Error::Write)?;
    }
    Ok(tables.rsdp_addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    fn windows(n: usize) -> Vec<MmioWindow> {
        (0..n).map(|i| MmioWindow { base: 0xd000_0000 + i as u64 * 0x1000, len: 0x1000, irq: 5 + i as u32 }).collect()
    }

    fn table(t: &Tables, addr: u64) -> &[u8] {
        &t.placed.iter().find(|(a, _)| *a == addr).unwrap_or_else(|| panic!("no table at {addr:#x}")).1
    }

    /// The MADT's structures as (type, bytes).
    fn madt_structures(m: &[u8]) -> Vec<(u8, &[u8])> {
        let mut out = Vec::new();
        let mut off = 44;
        while off < m.len() {
            let len = m[off + 1] as usize;
            out.push((m[off], &m[off..off + len]));
            off += len;
        }
        out
    }

    #[test]
    fn every_checksum_adds_up_and_lengths_match() {
        let t = build(ACPI_TABLES_START, 4, &windows(3), Platform::HardwareReduced).unwrap();
        let rsdp = table(&t, t.rsdp_addr);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
        for (addr, bytes) in &t.placed[1..] {
            assert_eq!(addr % TABLE_ALIGN, 0);
            assert_eq!(u32_at(bytes, 4) as usize, bytes.len(), "{} length", String::from_utf8_lossy(&bytes[..4]));
            assert_eq!(sum(bytes), 0, "{} checksum", String::from_utf8_lossy(&bytes[..4]));
        }
    }

    #[test]
    fn pointers_lead_from_the_rsdp_to_every_table() {
        let t = build(ACPI_TABLES_START, 2, &windows(1), Platform::HardwareReduced).unwrap();
        let xsdt = table(&t, u64_at(table(&t, t.rsdp_addr), 24));
        assert_eq!(&xsdt[..4], b"XSDT");
        let entries: Vec<&[u8]> = (36..xsdt.len()).step_by(8).map(|o| table(&t, u64_at(xsdt, o))).collect();
        let sigs: Vec<&[u8]> = entries.iter().map(|e| &e[..4]).collect();
        assert_eq!(sigs, [b"FACP", b"APIC"]);
        let fadt = entries[0];
        // X_DSDT at offset 140.
        assert_eq!(&table(&t, u64_at(fadt, 140))[..4], b"DSDT");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & Flags::HwReducedAcpi as u32, 0);
        // No FACS (FIRMWARE_CTRL at offset 36), PM timer (PM_TMR_BLK at 76), PM1 blocks (56, 64)
        // or RTC (IAPC_BOOT_ARCH at 109 says so) for Linux.
        assert_eq!([u32_at(fadt, 36), u32_at(fadt, 76), u32_at(fadt, 56), u32_at(fadt, 64)], [0; 4]);
        assert_ne!(u16::from_le_bytes([fadt[109], fadt[110]]) & BOOT_ARCH_NO_CMOS_RTC, 0);
        assert_eq!(count(table(&t, u64_at(fadt, 140)), b"_S3_"), 0);
        assert_ne!(flags & Flags::ResetRegSup as u32, 0);
        // Sleep control (offset 244) and reset (116) registers are nvmm's ports.
        assert_eq!((fadt[244], u64_at(fadt, 248)), (AddressSpace::SystemIo as u8, ACPI_PM_PORT + acpi_pm::SLEEP_CONTROL));
        assert_eq!((fadt[116], u64_at(fadt, 120), fadt[128]), (AddressSpace::SystemIo as u8, ACPI_PM_PORT + acpi_pm::RESET, acpi_pm::RESET_VALUE));
    }

    /// What kvm-unit-tests' s3.c reads: FIRMWARE_CTRL to the FACS, whose waking vector it writes,
    /// and the PM1a event and control blocks' ports.
    #[test]
    fn fixed_hardware_has_a_facs_pm1_blocks_a_pm_timer_and_an_rtc() {
        let t = build(ACPI_TABLES_START, 1, &[], Platform::FixedHardware).unwrap();
        let xsdt = table(&t, u64_at(table(&t, t.rsdp_addr), 24));
        let fadt = table(&t, u64_at(xsdt, 36));
        assert_eq!(&fadt[..4], b"FACP");
        assert_eq!(sum(fadt), 0);
        assert_eq!(u32_at(fadt, 112) & Flags::HwReducedAcpi as u32, 0, "not hardware-reduced");
        let facs_at = u64::from(u32_at(fadt, 36));
        assert_eq!((facs_at, facs_at % FACS_ALIGN, u64_at(fadt, 132)), (facs_addr(), 0, 0), "FIRMWARE_CTRL only");
        let facs = table(&t, facs_at);
        assert_eq!((&facs[..4], u32_at(facs, 4) as usize, facs.len()), (&b"FACS"[..], 64, 64));
        assert_eq!((u32_at(facs, FACS_WAKING_VECTOR as usize), u64_at(facs, FACS_X_WAKING_VECTOR as usize)), (0, 0));
        assert_eq!((FACS_WAKING_VECTOR, FACS_X_WAKING_VECTOR), (12, 24));
        // PM1a_EVT_BLK, PM1a_CNT_BLK and their lengths; the generic-address forms agree.
        assert_eq!((u32_at(fadt, 56), u32_at(fadt, 64), fadt[88], fadt[89]), (0x60c, 0x610, 4, 2));
        assert_eq!((fadt[148], fadt[149], u64_at(fadt, 152)), (AddressSpace::SystemIo as u8, 32, 0x60c));
        assert_eq!((fadt[172], fadt[173], u64_at(fadt, 176)), (AddressSpace::SystemIo as u8, 16, 0x610));
        // No SMI command port: ACPI mode is always on. SCI on IRQ 9.
        assert_eq!((u32_at(fadt, 48), u16::from_le_bytes([fadt[46], fadt[47]])), (0, 9));
        assert_eq!((u32_at(fadt, 76), fadt[91], u64_at(fadt, 208 + 4)), (PM_TIMER_PORT as u32, 4, PM_TIMER_PORT));
        // The RTC is there, with its century in CMOS byte 0x32.
        assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]) & BOOT_ARCH_NO_CMOS_RTC, 0);
        assert_eq!(fadt[108], 0x32);
        // The sleep and reset registers stay where Linux guests have them.
        assert_eq!((u64_at(fadt, 248), u64_at(fadt, 120)), (ACPI_PM_PORT + acpi_pm::SLEEP_CONTROL, ACPI_PM_PORT + acpi_pm::RESET));
        let dsdt = table(&t, u64_at(fadt, 140));
        assert_eq!((sum(dsdt), count(dsdt, b"_S3_"), count(dsdt, b"_S5_")), (0, 1, 1));
        // The FACS has no checksum; every other table still adds up.
        for (addr, bytes) in t.placed.iter().skip(1).filter(|(a, _)| *a != facs_at) {
            assert_eq!(sum(bytes), 0, "table at {addr:#x}");
        }
    }

    #[test]
    fn madt_has_one_enabled_lapic_per_vcpu_and_the_ioapic() {
        for cpus in [1u8, 2, 64] {
            let m = madt(cpus);
            assert_eq!(u32_at(&m, 36), APIC_START as u32);
            let s = madt_structures(&m);
            let lapics: Vec<&[u8]> = s.iter().filter(|(t, _)| *t == 0).map(|(_, b)| *b).collect();
            assert_eq!(lapics.len(), cpus as usize);
            for (i, l) in lapics.iter().enumerate() {
                assert_eq!((l[2], l[3], u32_at(l, 4)), (i as u8, i as u8, 1), "LAPIC {i}: uid, APIC ID, enabled");
            }
            let ioapics: Vec<&[u8]> = s.iter().filter(|(t, _)| *t == 1).map(|(_, b)| *b).collect();
            assert_eq!(ioapics.len(), 1);
            assert_eq!((ioapics[0][2], u32_at(ioapics[0], 4), u32_at(ioapics[0], 8)), (cpus, IOAPIC_START as u32, 0));
            let iso: Vec<&[u8]> = s.iter().filter(|(t, _)| *t == MADT_INTERRUPT_SOURCE_OVERRIDE).map(|(_, b)| *b).collect();
            assert_eq!(iso.len(), 1);
            assert_eq!((iso[0][3], u32_at(iso[0], 4)), (0, 0), "IRQ 0 on GSI 0");
            assert_eq!(s.iter().filter(|(t, _)| *t == MADT_LOCAL_APIC_NMI).count(), 1);
            assert_eq!(sum(&m), 0);
        }
    }

    /// Counts the occurrences of `needle` in `hay`.
    fn count(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).filter(|w| *w == needle).count()
    }

    #[test]
    fn dsdt_describes_each_virtio_window_once() {
        for n in [0usize, 1, 2, 19] {
            let w = windows(n);
            let d = dsdt(&w, Platform::HardwareReduced);
            assert_eq!(&d[..4], b"DSDT");
            assert_eq!(sum(&d), 0);
            assert_eq!(count(&d, b"LNRO0005\0"), n, "{n} devices");
            for (i, win) in w.iter().enumerate() {
                assert_eq!(count(&d, format!("V{i:03}").as_bytes()), 1);
                // Memory32Fixed descriptor (0x86, length 9, read-write) with the window's base
                // and size, and an extended IRQ descriptor with its IRQ.
                let mut mem = vec![0x86, 9, 0, 1];
                mem.extend_from_slice(&(win.base as u32).to_le_bytes());
                mem.extend_from_slice(&(win.len as u32).to_le_bytes());
                assert_eq!(count(&d, &mem), 1, "window {i}");
                let mut irq = vec![0x89, 6, 0, 0b11, 1];
                irq.extend_from_slice(&win.irq.to_le_bytes());
                assert_eq!(count(&d, &irq), 1, "IRQ of window {i}");
            }
            assert_eq!(count(&d, b"_S5_"), 1);
            assert_eq!(count(&d, b"COM1"), 1);
        }
    }

    #[test]
    fn the_largest_machine_fits_and_lands_in_guest_memory() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
        let rsdp = setup(&mem, crate::config::MAX_CPUS, &windows(19), Platform::FixedHardware).unwrap();
        assert_eq!(rsdp, ACPI_TABLES_START);
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let mut facs = [0u8; 4];
        mem.read_slice(&mut facs, GuestAddress(facs_addr())).unwrap();
        assert_eq!(&facs, b"FACS");
        assert!(matches!(build(ACPI_TABLES_END - 64, 1, &[], Platform::HardwareReduced), Err(Error::TooLarge(_))));
    }
}
