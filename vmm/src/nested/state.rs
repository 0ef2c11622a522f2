//! The nested state of a vCPU (`KVM_GET_NESTED_STATE`/`KVM_SET_NESTED_STATE`) as bytes, so a
//! snapshot can carry it as an `Option<Vec<u8>>`.
//!
//! The bytes are the `struct kvm_nested_state` KVM wrote: a 128-byte header (flags, format,
//! size, then the VMX or SVM header) followed by the VMCS12/VMCB12 when the vCPU is in guest
//! mode; `size` in the header is the length.
//!
//! Restore order (QEMU's): KVM_SET_CPUID2, then the VMX capability MSRs (`vcpu_msrs`; KVM
//! refuses them once the guest is in VMX operation), then KVM_SET_SREGS (EFER.SVME must be set
//! before an SVM state goes in), then [`set_nested_state`], then KVM_SET_REGS, the other MSRs
//! and KVM_SET_VCPU_EVENTS.

use std::mem::size_of;

use kvm_bindings::{kvm_nested_state, KVM_STATE_NESTED_FORMAT_VMX};
use kvm_ioctls::{KvmNestedStateBuffer, VcpuFd};

use super::NestedError;

/// The header alone: what KVM returns when no VMCS12/VMCB12 follows.
const HEADER_LEN: usize = size_of::<kvm_nested_state>();
/// The largest nested state (VMX: header, VMCS12, shadow VMCS12).
const MAX_LEN: usize = size_of::<KvmNestedStateBuffer>();

// The byte views below rely on the buffer being the header followed by the data, no padding.
const _: () = assert!(HEADER_LEN == 128);
const _: () = assert!(MAX_LEN == HEADER_LEN + 2 * 4096);

/// Offsets of header fields in `struct kvm_nested_state`.
const FLAGS_AT: usize = 0;
const FORMAT_AT: usize = 2;
const SIZE_AT: usize = 4;
/// `hdr.vmx.vmxon_pa`: the guest's VMXON region, all ones when it never ran VMXON.
const VMX_VMXON_PA_AT: usize = 8;
/// KVM's "no address" value for `vmxon_pa`.
const INVALID_GPA: u64 = u64::MAX;

/// Reads the vCPU's nested state. `None`: there is none to carry, because the vCPU never
/// entered VMX operation (on SVM the header always matters, as it holds GIF).
///
/// Call it only for VMs run with --nested: on a host without `KVM_CAP_NESTED_STATE` the ioctl
/// fails.
pub fn get_nested_state(vcpu: &VcpuFd) -> Result<Option<Vec<u8>>, NestedError> {
    let mut buf = KvmNestedStateBuffer::empty();
    // kvm-ioctls answers None for a header-only state, but the header alone can hold state
    // (VMXON done with no current VMCS, SVM's GIF): `buf.size` is what counts.
    vcpu.nested_state(&mut buf)
        .map_err(NestedError::GetNestedState)?;
    let len = (buf.size as usize).clamp(HEADER_LEN, MAX_LEN);
    let bytes = &as_bytes(&buf)[..len];
    Ok(carries_state(bytes).then(|| bytes.to_vec()))
}

/// Restores a nested state that [`get_nested_state`] returned.
pub fn set_nested_state(vcpu: &VcpuFd, state: &[u8]) -> Result<(), NestedError> {
    let buf = from_bytes(state)?;
    vcpu.set_nested_state(&buf)
        .map_err(NestedError::SetNestedState)
}

/// Whether header and data say anything a fresh vCPU would not already have.
fn carries_state(bytes: &[u8]) -> bool {
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    if bytes.len() > HEADER_LEN || u16_at(FLAGS_AT) != 0 {
        return true;
    }
    if u32::from(u16_at(FORMAT_AT)) != KVM_STATE_NESTED_FORMAT_VMX {
        return true;
    }
    let mut pa = [0u8; 8];
    pa.copy_from_slice(&bytes[VMX_VMXON_PA_AT..VMX_VMXON_PA_AT + 8]);
    u64::from_le_bytes(pa) != INVALID_GPA
}

fn as_bytes(buf: &KvmNestedStateBuffer) -> &[u8] {
    // SAFETY: KvmNestedStateBuffer is repr(C), made of integers, a union padded to 120 bytes
    // by a byte array, and byte arrays, with no padding between them (asserted above), and
    // `empty()` zeroed all of it before KVM wrote into it, so all MAX_LEN bytes are initialized
    // and the slice borrows `buf` for its lifetime.
    unsafe {
        std::slice::from_raw_parts((buf as *const KvmNestedStateBuffer).cast::<u8>(), MAX_LEN)
    }
}

fn from_bytes(state: &[u8]) -> Result<KvmNestedStateBuffer, NestedError> {
    let bad = |why| NestedError::BadNestedState {
        len: state.len(),
        why,
    };
    if state.len() < HEADER_LEN {
        return Err(bad("shorter than the 128-byte header"));
    }
    if state.len() > MAX_LEN {
        return Err(bad("longer than the largest nested state (8320 bytes)"));
    }
    let mut size = [0u8; 4];
    size.copy_from_slice(&state[SIZE_AT..SIZE_AT + 4]);
    if u32::from_le_bytes(size) as usize != state.len() {
        return Err(bad("its header's size is not its length"));
    }
    let mut buf = KvmNestedStateBuffer::empty();
    // SAFETY: `buf` is MAX_LEN bytes of plain data for which every bit pattern is valid (see
    // `as_bytes`), and `state.len() <= MAX_LEN` was checked above; the two do not overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(
            state.as_ptr(),
            (&mut buf as *mut KvmNestedStateBuffer).cast::<u8>(),
            state.len(),
        );
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{
        KVM_STATE_NESTED_FORMAT_SVM, KVM_STATE_NESTED_GIF_SET, KVM_STATE_NESTED_GUEST_MODE,
    };

    /// A header as KVM writes it.
    fn header(format: u32, flags: u32, size: usize, vmxon_pa: u64) -> Vec<u8> {
        let mut b = vec![0u8; HEADER_LEN];
        b[FLAGS_AT..FLAGS_AT + 2].copy_from_slice(&(flags as u16).to_le_bytes());
        b[FORMAT_AT..FORMAT_AT + 2].copy_from_slice(&(format as u16).to_le_bytes());
        b[SIZE_AT..SIZE_AT + 4].copy_from_slice(&(size as u32).to_le_bytes());
        b[VMX_VMXON_PA_AT..VMX_VMXON_PA_AT + 8].copy_from_slice(&vmxon_pa.to_le_bytes());
        b
    }

    #[test]
    fn vmx_never_entered_carries_nothing() {
        let b = header(KVM_STATE_NESTED_FORMAT_VMX, 0, HEADER_LEN, INVALID_GPA);
        assert!(!carries_state(&b));
    }

    #[test]
    fn vmxon_without_vmcs_is_carried() {
        let b = header(KVM_STATE_NESTED_FORMAT_VMX, 0, HEADER_LEN, 0x7000);
        assert!(carries_state(&b));
    }

    #[test]
    fn guest_mode_is_carried() {
        let len = HEADER_LEN + 4096;
        let mut b = header(
            KVM_STATE_NESTED_FORMAT_VMX,
            KVM_STATE_NESTED_GUEST_MODE,
            len,
            0x7000,
        );
        b.resize(len, 0xab);
        assert!(carries_state(&b));
    }

    #[test]
    fn svm_header_is_always_carried() {
        let gif = header(
            KVM_STATE_NESTED_FORMAT_SVM,
            KVM_STATE_NESTED_GIF_SET,
            HEADER_LEN,
            0,
        );
        assert!(carries_state(&gif));
        // GIF clear is state too.
        let no_gif = header(KVM_STATE_NESTED_FORMAT_SVM, 0, HEADER_LEN, 0);
        assert!(carries_state(&no_gif));
    }

    #[test]
    fn bytes_round_trip() {
        let len = HEADER_LEN + 4096;
        let mut b = header(
            KVM_STATE_NESTED_FORMAT_SVM,
            KVM_STATE_NESTED_GUEST_MODE,
            len,
            0,
        );
        b.extend((0..4096).map(|i| (i % 251) as u8));
        let buf = from_bytes(&b).unwrap();
        assert_eq!(buf.size as usize, len);
        assert_eq!(u32::from(buf.format), KVM_STATE_NESTED_FORMAT_SVM);
        assert_eq!(&as_bytes(&buf)[..len], &b[..]);
        assert!(as_bytes(&buf)[len..].iter().all(|&x| x == 0), "rest zeroed");
    }

    #[test]
    fn largest_vmx_state_round_trips() {
        let mut b = header(
            KVM_STATE_NESTED_FORMAT_VMX,
            KVM_STATE_NESTED_GUEST_MODE,
            MAX_LEN,
            0x7000,
        );
        b.resize(MAX_LEN, 0x5a);
        assert_eq!(as_bytes(&from_bytes(&b).unwrap()), &b[..]);
    }

    fn error_of(state: &[u8]) -> String {
        match from_bytes(state) {
            Ok(_) => panic!("{} bytes accepted", state.len()),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn malformed_states_are_refused() {
        let short = vec![0u8; 100];
        assert_eq!(
            error_of(&short),
            "saved nested state of 100 bytes is malformed: shorter than the 128-byte header"
        );
        let mut long = header(KVM_STATE_NESTED_FORMAT_VMX, 0, MAX_LEN + 1, 0);
        long.resize(MAX_LEN + 1, 0);
        assert!(error_of(&long).contains("longer than"));
        let lying = header(KVM_STATE_NESTED_FORMAT_SVM, 0, HEADER_LEN + 4096, 0);
        assert!(error_of(&lying).ends_with("its header's size is not its length"));
    }

    /// On the real /dev/kvm (skipped when it cannot be opened): with KVM_CAP_NESTED_STATE the
    /// state of a fresh vCPU reads and writes back; without it (this PVM host) the ioctl fails
    /// with an error naming it.
    #[test]
    fn real_kvm_nested_state() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            crate::skip_test("/dev/kvm cannot be opened");
            return;
        };
        let Ok(vm) = kvm.create_vm() else {
            crate::skip_test("KVM_CREATE_VM failed");
            return;
        };
        let Ok(vcpu) = vm.create_vcpu(0) else {
            crate::skip_test("KVM_CREATE_VCPU failed");
            return;
        };
        let cap = vm.check_extension_int(kvm_ioctls::Cap::NestedState);
        let got = get_nested_state(&vcpu);
        println!(
            "KVM_CAP_NESTED_STATE = {cap}; get_nested_state: {:?}",
            got.as_ref().map(|s| s.as_ref().map(Vec::len))
        );
        if cap > 0 {
            if let Some(state) = got.unwrap() {
                set_nested_state(&vcpu, &state).unwrap();
            }
        } else {
            let e = got.unwrap_err().to_string();
            assert!(e.starts_with("KVM_GET_NESTED_STATE failed: "), "{e}");
        }
    }
}
