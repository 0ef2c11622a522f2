//! Boot-time vCPU state, one small function per ioctl: registers, segments and paging, FPU, MSRs and
//! the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot::{multiboot, Entry};
use crate::memory::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM_SET_REGS: {0}")]
    SetRegs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_SREGS: {0}")]
    SetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_GET_SREGS: {0}")]
    GetSregs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_FPU: {0}")]
    SetFpu(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS: {0}")]
    SetMsrs(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_MSRS: KVM took {set} of {wanted} boot MSRs (first refused: {refused:#x})")]
    SetMsrsPartial { set: usize, wanted: usize, refused: u32 },
    #[error("KVM_GET_LAPIC/KVM_SET_LAPIC: {0}")]
    Lapic(#[source] kvm_ioctls::Error),
    #[error("cannot write boot page tables or GDT: {0}")]
    WriteMemory(#[source] vm_memory::GuestMemoryError),
}

// Control register and EFER bits.
const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
// The identity page tables must end below the command line.
const _: () = assert!(PDE_START + IDENTITY_MAPPED_GIB * 0x1000 <= CMDLINE_START);
/// RFLAGS bit 1 is reserved and always set.
const RFLAGS_RESERVED: u64 = 1 << 1;

/// Page table entry flags: present, writable, and (in a PD) a 2 MiB page.
const PTE_PRESENT_RW: u64 = 0x3;
const PDE_2M_PAGE: u64 = 0x83;

/// GDT access/flags words (bits 8..15 access byte, 20..23 flags), as `gdt_entry` expects.
pub const GDT_CODE64: u16 = 0xa09b;
const GDT_CODE32: u16 = 0xc09b;
pub const GDT_DATA: u16 = 0xc093;
pub const GDT_TSS64: u16 = 0x808b;
const GDT_TSS32: u16 = 0x008b;
const SELECTOR_CODE: u16 = 0x08;
const SELECTOR_DATA: u16 = 0x10;
const SELECTOR_TSS: u16 = 0x18;

/// x87 control word and MXCSR after FNINIT / reset.
const FPU_CONTROL_WORD: u16 = 0x37f;
const MXCSR_DEFAULT: u32 = 0x1f80;

// MSRs given their architectural reset values before the kernel runs.
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
/// MISC_ENABLE bit 0: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled (bit 11) with write-back (6) as the default memory type.
const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;

// Local APIC registers and LVT delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

/// Encodes a GDT descriptor.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (u64::from(flags), u64::from(base), u64::from(limit));
    ((base & 0xff00_0000) << 32)
        | ((flags & 0xf0ff) << 40)
        | ((limit & 0xf_0000) << 32)
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0xffff)
}

/// Decodes a GDT descriptor into the segment KVM loads.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from((entry >> 47) & 1 == 0),
        padding: 0,
    }
}

/// General purpose registers at the kernel's entry point.
pub fn setup_regs(vcpu: &VcpuFd, entry: Entry) -> Result<(), Error> {
    let mut regs = kvm_regs { rflags: RFLAGS_RESERVED, ..Default::default() };
    match entry {
        Entry::Linux64 { rip } => {
            regs.rip = rip;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        Entry::Pvh { rip } => {
            regs.rip = rip;
            regs.rbx = PVH_INFO_START;
        }
        Entry::Multiboot { rip } => {
            regs.rip = rip;
            regs.rax = multiboot::BOOTLOADER_MAGIC.into();
            regs.rbx = multiboot::INFO_START;
        }
    }
    vcpu.set_regs(&regs).map_err(Error::SetRegs)
}

/// Writes the GDT (and an empty IDT) for `entry`'s mode, and the identity page tables for long mode.
pub fn write_boot_tables(mem: &GuestMemoryMmap, entry: Entry) -> Result<[u64; 4], Error> {
    let (code, tss) = match entry {
        Entry::Linux64 { .. } => (GDT_CODE64, GDT_TSS64),
        Entry::Pvh { .. } | Entry::Multiboot { .. } => (GDT_CODE32, GDT_TSS32),
    };
    let gdt = [0, gdt_entry(code, 0, 0xfffff), gdt_entry(GDT_DATA, 0, 0xfffff), gdt_entry(tss, 0, 0xfffff)];
    let w = |val: u64, addr: u64| mem.write_obj(val, GuestAddress(addr)).map_err(Error::WriteMemory);
    for (i, e) in gdt.iter().enumerate() {
        w(*e, GDT_START + 8 * i as u64)?;
    }
    w(0, IDT_START)?;
    if let Entry::Linux64 { .. } = entry {
        w(PDPTE_START | PTE_PRESENT_RW, PML4_START)?;
        for gib in 0..IDENTITY_MAPPED_GIB {
            let pd = PDE_START + gib * 0x1000;
            w(pd | PTE_PRESENT_RW, PDPTE_START + gib * 8)?;
            for i in 0..512u64 {
                w(((gib << 30) | (i << 21)) | PDE_2M_PAGE, pd + i * 8)?;
            }
        }
    }
    Ok(gdt)
}

/// Segments, descriptor tables and control registers for `entry`'s mode (paging on for long mode,
/// off for PVH). `gdt` is what [`write_boot_tables`] wrote.
pub fn setup_sregs(vcpu: &VcpuFd, entry: Entry, gdt: &[u64; 4]) -> Result<(), Error> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(Error::GetSregs)?;
    let code = segment_from_gdt(gdt[1], SELECTOR_CODE);
    let data = segment_from_gdt(gdt[2], SELECTOR_DATA);
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = segment_from_gdt(gdt[3], SELECTOR_TSS);
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr4 = 0;
    sregs.efer = 0;
    if let Entry::Linux64 { .. } = entry {
        sregs.cr3 = PML4_START;
        sregs.cr4 |= X86_CR4_PAE;
        sregs.cr0 |= X86_CR0_PG;
        sregs.efer |= EFER_LME | EFER_LMA;
    }
    vcpu.set_sregs(&sregs).map_err(Error::SetSregs)
}

pub fn setup_fpu(vcpu: &VcpuFd) -> Result<(), Error> {
    let fpu = kvm_fpu { fcw: FPU_CONTROL_WORD, mxcsr: MXCSR_DEFAULT, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(Error::SetFpu)
}

/// The boot MSRs every vCPU gets, plus `extra` (e.g. nested virtualization capability MSRs).
pub fn boot_msrs(extra: &[kvm_msr_entry]) -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    let mut v = vec![
        e(MSR_IA32_SYSENTER_CS, 0),
        e(MSR_IA32_SYSENTER_ESP, 0),
        e(MSR_IA32_SYSENTER_EIP, 0),
        e(MSR_STAR, 0),
        e(MSR_CSTAR, 0),
        e(MSR_KERNEL_GS_BASE, 0),
        e(MSR_SYSCALL_MASK, 0),
        e(MSR_LSTAR, 0),
        e(MSR_IA32_TSC, 0),
        e(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        e(MSR_MTRR_DEF_TYPE, MTRR_ENABLE_WB),
    ];
    v.extend_from_slice(extra);
    v
}

pub fn setup_msrs(vcpu: &VcpuFd, msrs: &[kvm_msr_entry]) -> Result<(), Error> {
    let list = Msrs::from_entries(msrs).map_err(|_| Error::SetMsrsPartial { set: 0, wanted: msrs.len(), refused: 0 })?;
    let set = vcpu.set_msrs(&list).map_err(Error::SetMsrs)?;
    if set != msrs.len() {
        return Err(Error::SetMsrsPartial { set, wanted: msrs.len(), refused: msrs[set].index });
    }
    Ok(())
}

fn lapic_reg(regs: &[std::os::raw::c_char; 1024], off: usize) -> u32 {
    u32::from_le_bytes([regs[off] as u8, regs[off + 1] as u8, regs[off + 2] as u8, regs[off + 3] as u8])
}

fn set_lapic_reg(regs: &mut [std::os::raw::c_char; 1024], off: usize, val: u32) {
    for (i, b) in val.to_le_bytes().iter().enumerate() {
        regs[off + i] = *b as std::os::raw::c_char;
    }
}

/// LVT delivery mode occupies bits 8..10.
fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Wires LINT0 to ExtINT (the 8259) and LINT1 to NMI, as the MP table says.
pub fn setup_lint(vcpu: &VcpuFd) -> Result<(), Error> {
    let mut lapic = vcpu.get_lapic().map_err(Error::Lapic)?;
    let lvt0 = lapic_reg(&lapic.regs, APIC_LVT0);
    set_lapic_reg(&mut lapic.regs, APIC_LVT0, with_delivery_mode(lvt0, APIC_MODE_EXTINT));
    let lvt1 = lapic_reg(&lapic.regs, APIC_LVT1);
    set_lapic_reg(&mut lapic.regs, APIC_LVT1, with_delivery_mode(lvt1, APIC_MODE_NMI));
    vcpu.set_lapic(&lapic).map_err(Error::Lapic)
}

// ---- For the small built-in guests that run code in user mode and take interrupts (`nvmm bench`) ----

/// Ring-3 code and data descriptors: the ring-0 ones with DPL (access-byte bits 5..6) set to 3.
pub const GDT_CODE64_USER: u16 = GDT_CODE64 | (3 << 5);
pub const GDT_DATA_USER: u16 = GDT_DATA | (3 << 5);
/// Page-table entry bit 2: user-mode accesses allowed.
const PTE_USER: u64 = 0x4;

/// Sets the user bit in every entry of the identity map [`write_boot_tables`] wrote for long mode,
/// so code at CPL 3 can reach all of it (a CPL-3 access needs the bit at every level).
pub fn allow_user_access(mem: &GuestMemoryMmap) -> Result<(), Error> {
    let set_user = |addr: u64| -> Result<(), Error> {
        let e: u64 = mem.read_obj(GuestAddress(addr)).map_err(Error::WriteMemory)?;
        mem.write_obj(e | PTE_USER, GuestAddress(addr)).map_err(Error::WriteMemory)
    };
    set_user(PML4_START)?;
    for gib in 0..IDENTITY_MAPPED_GIB {
        set_user(PDPTE_START + gib * 8)?;
        for i in 0..512u64 {
            set_user(PDE_START + gib * 0x1000 + i * 8)?;
        }
    }
    Ok(())
}

/// Spurious-interrupt vector register; bit 8 software-enables the local APIC. It is clear after
/// reset, and a software-disabled APIC drops fixed interrupts, self-IPIs included.
const APIC_SPIV: usize = 0xf0;
const APIC_SPIV_ENABLE: u32 = 1 << 8;

/// Software-enables the local APIC, as a guest kernel does early in its boot.
pub fn enable_lapic(vcpu: &VcpuFd) -> Result<(), Error> {
    let mut lapic = vcpu.get_lapic().map_err(Error::Lapic)?;
    let spiv = lapic_reg(&lapic.regs, APIC_SPIV);
    set_lapic_reg(&mut lapic.regs, APIC_SPIV, spiv | APIC_SPIV_ENABLE);
    vcpu.set_lapic(&lapic).map_err(Error::Lapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_entries_round_trip_to_segments() {
        let cs = segment_from_gdt(gdt_entry(GDT_CODE64, 0, 0xfffff), SELECTOR_CODE);
        assert_eq!((cs.type_, cs.s, cs.l, cs.db, cs.g, cs.present, cs.dpl), (0xb, 1, 1, 0, 1, 1, 0));
        assert_eq!(cs.limit, 0xffff_ffff);
        let cs32 = segment_from_gdt(gdt_entry(GDT_CODE32, 0, 0xfffff), SELECTOR_CODE);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        let ds = segment_from_gdt(gdt_entry(GDT_DATA, 0x1234_5678, 0xabcd), SELECTOR_DATA);
        assert_eq!((ds.base, ds.type_), (0x1234_5678, 3));
        let tr = segment_from_gdt(gdt_entry(GDT_TSS64, 0, 0xfffff), SELECTOR_TSS);
        assert_eq!((tr.type_, tr.s, tr.unusable), (0xb, 0, 0));
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }

    #[test]
    fn long_mode_tables_identity_map_4gib() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem, Entry::Linux64 { rip: 0x100200 }).unwrap();
        let r = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(r(PML4_START), PDPTE_START | 3);
        assert_eq!(r(PDPTE_START + 8 * 3), (PDE_START + 3 * 0x1000) | 3);
        // The last 2 MiB page of the 4th GiB maps itself.
        assert_eq!(r(PDE_START + 3 * 0x1000 + 511 * 8), (0xffe0_0000) | PDE_2M_PAGE);
        assert_eq!(r(GDT_START + 8), gdt_entry(GDT_CODE64, 0, 0xfffff));
    }

    #[test]
    fn user_access_is_granted_at_every_level() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        write_boot_tables(&mem, Entry::Linux64 { rip: 0x100200 }).unwrap();
        allow_user_access(&mem).unwrap();
        let r = |a: u64| mem.read_obj::<u64>(GuestAddress(a)).unwrap();
        assert_eq!(r(PML4_START), PDPTE_START | 7);
        assert_eq!(r(PDPTE_START + 8 * 3), (PDE_START + 3 * 0x1000) | 7);
        assert_eq!(r(PDE_START + 3 * 0x1000 + 511 * 8), 0xffe0_0000 | PDE_2M_PAGE | PTE_USER);
        let cs = segment_from_gdt(gdt_entry(GDT_CODE64_USER, 0, 0xfffff), 0x23);
        assert_eq!((cs.dpl, cs.l, cs.type_), (3, 1, 0xb));
    }

    #[test]
    fn lint_delivery_modes() {
        assert_eq!(with_delivery_mode(0x10000, APIC_MODE_EXTINT), 0x10700);
        assert_eq!(with_delivery_mode(0x10700, APIC_MODE_NMI), 0x10400);
    }

    #[test]
    fn extra_msrs_follow_the_boot_set() {
        let extra = [kvm_msr_entry { index: 0x480, data: 7, ..Default::default() }];
        let v = boot_msrs(&extra);
        assert_eq!(v.last().unwrap().index, 0x480);
        assert!(v.iter().any(|e| e.index == MSR_MTRR_DEF_TYPE && e.data == MTRR_ENABLE_WB));
    }
}
