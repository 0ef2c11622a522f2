//! A vCPU's state in a snapshot, and the order in which KVM must be given it back.
//!
//! # Restore order
//! Written here once; [`restore`] follows it step by step. The reasons:
//!
//! 1. `KVM_SET_CPUID2`: KVM checks everything below against the vCPU's CPUID (which MSRs exist,
//!    the XSAVE layout, whether SVM/VMX may be used), and re-derives the VMX capability MSRs
//!    from it.
//! 2. The VMX capability MSRs (Intel with `--nested`): KVM refuses to change them once the vCPU is
//!    in VMX operation, which step 4 may put it in; after CPUID, which would overwrite them.
//! 3. `KVM_SET_SREGS`: EFER.SVME (and CR4.VMXE) must already be set when a nested state goes in;
//!    SVM refuses any nested state but GIF_SET without SVME.
//! 4. `KVM_SET_NESTED_STATE` (only when saved): with the vCPU in guest mode, the registers that
//!    follow are the nested guest's, as they were read.
//! 5. `KVM_SET_TSC_KHZ`, when the saved rate differs from the vCPU's: before the TSC MSR is
//!    written, so the TSC goes on at the rate the guest calibrated.
//! 6. `KVM_SET_REGS`, `KVM_SET_XSAVE`, `KVM_SET_XCRS`: plain register state.
//! 7. `KVM_SET_LAPIC`: before the MSRs, so that the TSC-deadline MSR is written into a LAPIC
//!    already in TSC-deadline mode (QEMU defers it for the same reason).
//! 8. `KVM_SET_MSRS`: every other MSR KVM listed (TSC, kvmclock, SYSCALL, PAT...); all must be
//!    taken, as Firecracker insists.
//! 9. `KVM_SET_MP_STATE`, `KVM_SET_DEBUGREGS`.
//! 10. `KVM_SET_VCPU_EVENTS` last: a pending exception, NMI or interrupt, and the SMM and
//!     interrupt-shadow state, would be reset by the steps above (KVM clears pending events when
//!     registers or the MP state change).
//!
//! # Where it runs
//! Saving reads the state on the vCPU's own thread, asked through its channel while it is paused:
//! a paused vCPU has nothing pending (see `runner.rs`), and its fd stays where it is, so a failed
//! snapshot leaves the vCPU exactly as it was. Restoring writes it before the thread exists, on the
//! fd the builder just created, so nothing can run in between.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::nested::{self, NestedError};

/// `KVM_GET_MSRS` takes at most this many at a time (KVM's own limit is larger; this keeps each
/// call's buffer small).
const MSR_CHUNK: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("vCPU {id}: {ioctl}: {err}")]
    Ioctl { id: u8, ioctl: &'static str, err: kvm_ioctls::Error },
    #[error("vCPU {id}: KVM_SET_MSRS took {set} of {wanted} saved MSRs (first refused: {refused:#x})")]
    MsrsRefused { id: u8, set: usize, wanted: usize, refused: u32 },
    #[error("vCPU {id}: {count} MSRs do not fit in one KVM_GET_MSRS/KVM_SET_MSRS call")]
    MsrList { id: u8, count: usize },
    #[error("vCPU {id}: {count} saved CPUID entries do not fit in one KVM_SET_CPUID2 call")]
    CpuidList { id: u8, count: usize },
    #[error("vCPU {id}: {0}", id = .1)]
    Nested(#[source] NestedError, u8),
    #[error("vCPU {0} is not paused: its state can be read only while it is")]
    NotPaused(u8),
}

/// Which MSRs a vCPU saves: those `KVM_GET_MSR_INDEX_LIST` lists, and, apart because they go
/// back earlier, the VMX capability MSRs (Intel with `--nested`). Worked out once per VM.
#[derive(Debug, Clone, Default)]
pub struct SaveSpec {
    pub msrs: Vec<u32>,
    pub vmx_msrs: Vec<u32>,
    /// Read the nested state (only with `--nested`: without `KVM_CAP_NESTED_STATE` the ioctl
    /// fails).
    pub nested: bool,
}

impl SaveSpec {
    /// `listed` from `KVM_GET_MSR_INDEX_LIST`; the VMX capability MSRs are taken out of it and
    /// kept apart when `vmx` (Intel with `--nested`).
    pub fn new(listed: &[u32], vmx: bool, nested: bool) -> Self {
        let vmx_msrs: Vec<u32> = if vmx { nested::VMX_CAPABILITY_MSRS.to_vec() } else { Vec::new() };
        let msrs = listed.iter().copied().filter(|i| !nested::VMX_CAPABILITY_MSRS.contains(i)).collect();
        Self { msrs, vmx_msrs, nested }
    }
}

/// Everything KVM holds about one vCPU. Plain data: KVM's own structs, which kvm-bindings
/// serializes as their bytes.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub vmx_msrs: Vec<kvm_msr_entry>,
    pub sregs: kvm_sregs,
    /// `KVM_GET_NESTED_STATE` as bytes; `None` when the vCPU never used VMX/SVM, or without
    /// `--nested`. A header alone is kept: it can hold state (VMXON without a VMCS, SVM's GIF).
    pub nested: Option<Vec<u8>>,
    /// The TSC rate in kHz, `None` when KVM cannot tell (no `KVM_CAP_GET_TSC_KHZ`).
    pub tsc_khz: Option<u32>,
    pub regs: kvm_regs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<kvm_msr_entry>,
    pub mp_state: kvm_mp_state,
    pub debugregs: kvm_debugregs,
    pub events: kvm_vcpu_events,
}

/// Reads the state of a vCPU that is not running (its thread is paused, or does not exist yet).
pub fn save(id: u8, fd: &VcpuFd, spec: &SaveSpec) -> Result<VcpuState, Error> {
    let e = |ioctl| move |err| Error::Ioctl { id, ioctl, err };
    let cpuid = fd.get_cpuid2(KVM_MAX_CPUID_ENTRIES).map_err(e("KVM_GET_CPUID2"))?;
    Ok(VcpuState {
        id,
        cpuid: cpuid.as_slice().to_vec(),
        mp_state: fd.get_mp_state().map_err(e("KVM_GET_MP_STATE"))?,
        regs: fd.get_regs().map_err(e("KVM_GET_REGS"))?,
        sregs: fd.get_sregs().map_err(e("KVM_GET_SREGS"))?,
        xsave: fd.get_xsave().map_err(e("KVM_GET_XSAVE"))?,
        xcrs: fd.get_xcrs().map_err(e("KVM_GET_XCRS"))?,
        debugregs: fd.get_debug_regs().map_err(e("KVM_GET_DEBUGREGS"))?,
        lapic: fd.get_lapic().map_err(e("KVM_GET_LAPIC"))?,
        msrs: read_msrs(id, fd, &spec.msrs)?,
        vmx_msrs: read_msrs(id, fd, &spec.vmx_msrs)?,
        events: fd.get_vcpu_events().map_err(e("KVM_GET_VCPU_EVENTS"))?,
        tsc_khz: fd.get_tsc_khz().ok(),
        // Last, as QEMU does: everything above is read from a vCPU whose nested state is settled.
        nested: if spec.nested { nested::get_nested_state(fd).map_err(|err| Error::Nested(err, id))? } else { None },
    })
}

/// Writes `state` into a vCPU that has never run, in the order the module documentation gives.
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<(), Error> {
    let id = state.id;
    let e = |ioctl| move |err| Error::Ioctl { id, ioctl, err };
    // 1.
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| Error::CpuidList { id, count: state.cpuid.len() })?;
    fd.set_cpuid2(&cpuid).map_err(e("KVM_SET_CPUID2"))?;
    // 2.
    write_msrs(id, fd, &state.vmx_msrs)?;
    // 3.
    fd.set_sregs(&state.sregs).map_err(e("KVM_SET_SREGS"))?;
    // 4.
    if let Some(nested_state) = &state.nested {
        nested::set_nested_state(fd, nested_state).map_err(|err| Error::Nested(err, id))?;
    }
    // 5.
    if let Some(khz) = state.tsc_khz {
        if fd.get_tsc_khz().ok() != Some(khz) {
            fd.set_tsc_khz(khz).map_err(e("KVM_SET_TSC_KHZ"))?;
        }
    }
    // 6.
    fd.set_regs(&state.regs).map_err(e("KVM_SET_REGS"))?;
    // SAFETY: KVM_SET_XSAVE reads as many bytes as the vCPU's XSAVE layout needs, and that fits
    // in the 4 KiB `kvm_xsave` unless a dynamic XSTATE feature (AMX) was enabled for the guest
    // with arch_prctl(ARCH_REQ_XCOMP_GUEST_PERM), which nvmm never does.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(e("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&state.xcrs).map_err(e("KVM_SET_XCRS"))?;
    // 7.
    fd.set_lapic(&state.lapic).map_err(e("KVM_SET_LAPIC"))?;
    // 8.
    write_msrs(id, fd, &state.msrs)?;
    // 9.
    fd.set_mp_state(state.mp_state).map_err(e("KVM_SET_MP_STATE"))?;
    fd.set_debug_regs(&state.debugregs).map_err(e("KVM_SET_DEBUGREGS"))?;
    // 10.
    fd.set_vcpu_events(&state.events).map_err(e("KVM_SET_VCPU_EVENTS"))
}

/// Reads `indices`, leaving out those KVM lists but will not read for this vCPU (an MSR of the
/// other vendor, or of a feature its CPUID does not have): `KVM_GET_MSRS` stops at the first of
/// them, and reading resumes after it.
fn read_msrs(id: u8, fd: &VcpuFd, indices: &[u32]) -> Result<Vec<kvm_msr_entry>, Error> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(MSR_CHUNK)];
        let entries: Vec<kvm_msr_entry> = chunk.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::MsrList { id, count: entries.len() })?;
        let read = fd.get_msrs(&mut msrs).map_err(|err| Error::Ioctl { id, ioctl: "KVM_GET_MSRS", err })?;
        out.extend_from_slice(&msrs.as_slice()[..read]);
        if read < chunk.len() {
            log::debug!("vCPU {id}: MSR {:#x} is listed but cannot be read; not saved", chunk[read]);
            rest = &rest[read + 1..];
        } else {
            rest = &rest[chunk.len()..];
        }
    }
    Ok(out)
}

fn write_msrs(id: u8, fd: &VcpuFd, entries: &[kvm_msr_entry]) -> Result<(), Error> {
    for chunk in entries.chunks(MSR_CHUNK) {
        let msrs = Msrs::from_entries(chunk).map_err(|_| Error::MsrList { id, count: chunk.len() })?;
        let set = fd.set_msrs(&msrs).map_err(|err| Error::Ioctl { id, ioctl: "KVM_SET_MSRS", err })?;
        if set < chunk.len() {
            return Err(Error::MsrsRefused { id, set, wanted: chunk.len(), refused: chunk[set].index });
        }
    }
    Ok(())
}

/// Whether a saved nested state has the vCPU in guest mode (running its own guest when saved).
pub fn in_guest_mode(nested_state: &[u8]) -> bool {
    nested_state.len() >= 2
        && u32::from(u16::from_le_bytes([nested_state[0], nested_state[1]])) & kvm_bindings::KVM_STATE_NESTED_GUEST_MODE != 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmx_msrs_are_kept_apart_and_only_on_request() {
        let listed = [0x10, 0x480, 0xc000_0080, 0x48d];
        let s = SaveSpec::new(&listed, true, true);
        assert_eq!(s.msrs, vec![0x10, 0xc000_0080]);
        assert_eq!(s.vmx_msrs.len(), nested::VMX_CAPABILITY_MSRS.len());
        let s = SaveSpec::new(&listed, false, false);
        assert_eq!(s.msrs, vec![0x10, 0xc000_0080]);
        assert!(s.vmx_msrs.is_empty());
    }

    #[test]
    fn guest_mode_is_read_from_the_flags() {
        let mut header = vec![0u8; 128];
        assert!(!in_guest_mode(&header));
        header[0] = kvm_bindings::KVM_STATE_NESTED_GUEST_MODE as u8;
        assert!(in_guest_mode(&header));
        assert!(!in_guest_mode(&[]));
    }

    /// On this host's /dev/kvm (nothing to test without one): a vCPU's state, saved, serialized
    /// and restored into a fresh vCPU of another VM, reads back the same.
    #[test]
    fn a_vcpu_state_round_trips_through_kvm() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            eprintln!("no /dev/kvm: skipped");
            return;
        };
        let listed = kvm.get_msr_index_list().unwrap();
        let spec = SaveSpec::new(listed.as_slice(), false, false);
        let make = || {
            let vm = kvm.create_vm().unwrap();
            vm.create_irq_chip().unwrap();
            let fd = vm.create_vcpu(0).unwrap();
            let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
            fd.set_cpuid2(&cpuid).unwrap();
            (vm, fd)
        };
        let (_vm, fd) = make();
        let mut regs = fd.get_regs().unwrap();
        regs.rax = 0x1234_5678;
        regs.rip = 0xfff0;
        fd.set_regs(&regs).unwrap();
        let saved = save(0, &fd, &spec).unwrap();
        assert!(!saved.msrs.is_empty());
        let saved: VcpuState = serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
        let (_vm2, fd2) = make();
        restore(&fd2, &saved).unwrap();
        let again = save(0, &fd2, &spec).unwrap();
        assert_eq!(again.regs.rax, 0x1234_5678);
        assert_eq!(again.regs.rip, 0xfff0);
        assert_eq!(again.sregs.cr0, saved.sregs.cr0);
        assert_eq!(again.msrs.len(), saved.msrs.len());
    }
}
