//! The states a processor comes out of a reset in, for a guest that wakes from ACPI S3: on a PC the
//! processors lost their state while asleep, and firmware hands the boot processor to the OS's
//! waking vector in real mode, with the others waiting for the OS's startup IPI.
//!
//! # Order
//! `KVM_SET_SREGS`, then `KVM_SET_REGS`, then `KVM_SET_MP_STATE`: the MP state goes last because
//! KVM_SET_SREGS changes it by itself (it makes a boot processor at the reset vector runnable),
//! and because INIT_RECEIVED is refused while the vCPU may still be in a state that latches INIT
//! (SVM with GIF clear, which clearing EFER.SVME ends). It runs on the vCPU's own thread while the
//! vCPU is paused, so no exit is pending (see `runner.rs`) and the old registers are whole.

use kvm_bindings::{kvm_dtable, kvm_mp_state, kvm_regs, kvm_segment, kvm_sregs, KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vCPU {id}: {ioctl}: {err}")]
    Ioctl { id: u8, ioctl: &'static str, err: kvm_ioctls::Error },
    #[error("vCPU {0} is not paused: it can be reset only while it is")]
    NotPaused(u8),
}

/// Where a reset leaves a vCPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetState {
    /// Running in real mode at `segment:offset`: the boot processor at an S3 resume.
    RealMode { segment: u16, offset: u16 },
    /// Waiting for a startup IPI (whose vector then sets CS:IP), as INIT leaves a processor.
    WaitForSipi,
}

/// Real-mode segments span 64 KiB; descriptor tables keep their reset limit.
const REAL_MODE_LIMIT: u32 = 0xffff;
/// Segment types: code (execute/read, accessed), data (read/write, accessed), a busy 32-bit TSS
/// and an LDT, as a reset leaves them (the last two are system segments).
const CODE: u8 = 0xb;
const DATA: u8 = 0x3;
const TSS_BUSY: u8 = 0xb;
const LDT: u8 = 0x2;
/// CR0 with only ET: protection and paging off, caches on (firmware enables them before it
/// jumps to the waking vector).
const CR0_ET: u64 = 1 << 4;
/// RFLAGS bit 1 is reserved and always set; IF is clear.
const RFLAGS_RESERVED: u64 = 1 << 1;

fn segment(selector: u16, type_: u8, s: u8) -> kvm_segment {
    kvm_segment {
        base: u64::from(selector) << 4,
        limit: REAL_MODE_LIMIT,
        selector,
        type_,
        present: 1,
        s,
        ..Default::default()
    }
}

/// Real mode with CS at `code_segment` and every other segment at 0: paging, protection, long
/// mode and (with EFER.SVME clear) SVM off, and no pending interrupt. The APIC base is kept.
pub fn real_mode_sregs(current: &kvm_sregs, code_segment: u16) -> kvm_sregs {
    let data = segment(0, DATA, 1);
    let table = kvm_dtable { base: 0, limit: REAL_MODE_LIMIT as u16, ..Default::default() };
    kvm_sregs {
        cs: segment(code_segment, CODE, 1),
        ds: data,
        es: data,
        fs: data,
        gs: data,
        ss: data,
        tr: segment(0, TSS_BUSY, 0),
        ldt: segment(0, LDT, 0),
        gdt: table,
        idt: table,
        cr0: CR0_ET,
        apic_base: current.apic_base,
        ..Default::default()
    }
}

/// Puts the vCPU in `state`, in the order the module documentation gives.
pub fn apply(id: u8, fd: &VcpuFd, state: ResetState) -> Result<(), Error> {
    let e = |ioctl| move |err| Error::Ioctl { id, ioctl, err };
    let (segment, offset, mp_state) = match state {
        ResetState::RealMode { segment, offset } => (segment, offset, KVM_MP_STATE_RUNNABLE),
        ResetState::WaitForSipi => (0, 0, KVM_MP_STATE_INIT_RECEIVED),
    };
    let current = fd.get_sregs().map_err(e("KVM_GET_SREGS"))?;
    fd.set_sregs(&real_mode_sregs(&current, segment)).map_err(e("KVM_SET_SREGS"))?;
    fd.set_regs(&kvm_regs { rip: u64::from(offset), rflags: RFLAGS_RESERVED, ..Default::default() }).map_err(e("KVM_SET_REGS"))?;
    fd.set_mp_state(kvm_mp_state { mp_state }).map_err(e("KVM_SET_MP_STATE"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_mode_at_the_waking_vector() {
        let long_mode = kvm_sregs { cr0: 0x8000_0011, cr3: 0x9000, cr4: 0x20, efer: 0x1500, apic_base: 0xfee0_0900, interrupt_bitmap: [1, 0, 0, 0], ..Default::default() };
        let s = real_mode_sregs(&long_mode, 0x100);
        assert_eq!((s.cs.selector, s.cs.base, s.cs.limit, s.cs.type_, s.cs.s, s.cs.present), (0x100, 0x1000, 0xffff, CODE, 1, 1));
        assert_eq!((s.cs.db, s.cs.l, s.cs.g, s.cs.unusable), (0, 0, 0, 0), "16-bit, not long, byte-granular");
        for d in [s.ds, s.es, s.fs, s.gs, s.ss] {
            assert_eq!((d.selector, d.base, d.limit, d.type_, d.s), (0, 0, 0xffff, DATA, 1));
        }
        assert_eq!((s.tr.type_, s.tr.s, s.tr.present, s.ldt.type_, s.ldt.s), (TSS_BUSY, 0, 1, LDT, 0));
        assert_eq!((s.cr0, s.cr3, s.cr4, s.efer), (CR0_ET, 0, 0, 0), "no paging, protection, long mode or SVM");
        assert_eq!((s.idt.base, s.idt.limit, s.gdt.limit), (0, 0xffff, 0xffff));
        assert_eq!(s.apic_base, 0xfee0_0900);
        assert_eq!(s.interrupt_bitmap, [0; 4], "a pending interrupt is dropped");
    }

    /// On this host's /dev/kvm: a vCPU left in long mode, reset to the waking vector 0x1000, runs
    /// the real-mode code there with CS = 0x100; a second one waits for a startup IPI.
    #[test]
    fn a_long_mode_vcpu_resumes_in_real_mode_and_another_waits_for_sipi() {
        use iced_x86::code_asm::{ax, cs, dx, CodeAssembler};
        use vm_memory::{Bytes, GuestAddress};

        use crate::boot::Entry;
        use crate::vcpu::{regs, Vcpu};

        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            crate::skip_test("no /dev/kvm");
            return;
        };
        let vm = crate::vm::Vm::create(&kvm, crate::memory::create(64 << 20, crate::memory::Thp::On).unwrap()).unwrap();
        let entry = Entry::Linux64 { rip: 0x10_0000 };
        let gdt = regs::write_boot_tables(&vm.mem, entry).unwrap();
        let vcpu = Vcpu::new(&vm.fd, 0).unwrap();
        vcpu.configure_boot(entry, &gdt).unwrap();
        let mut a = CodeAssembler::new(16).unwrap();
        a.mov(dx, 0x80u32).unwrap();
        a.mov(ax, cs).unwrap();
        a.out(dx, ax).unwrap();
        let mut end = a.create_label();
        a.set_label(&mut end).unwrap();
        a.jmp(end).unwrap();
        vm.mem.write_slice(&a.assemble(0).unwrap(), GuestAddress(0x1000)).unwrap();

        apply(0, &vcpu.fd, ResetState::RealMode { segment: 0x100, offset: 0 }).unwrap();
        let mut fd = vcpu.fd;
        match fd.run().unwrap() {
            kvm_ioctls::VcpuExit::IoOut(port, data) => assert_eq!((port, data), (0x80, &[0x00, 0x01][..]), "CS was 0x100"),
            other => panic!("expected the port write, got {other:?}"),
        }
        let s = fd.get_sregs().unwrap();
        assert_eq!((s.cr0 & 1, s.efer), (0, 0), "real mode");

        let ap = Vcpu::new(&vm.fd, 1).unwrap();
        apply(1, &ap.fd, ResetState::WaitForSipi).unwrap();
        assert_eq!(ap.fd.get_mp_state().unwrap().mp_state, KVM_MP_STATE_INIT_RECEIVED);
    }
}
