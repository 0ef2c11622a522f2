//! The MSRs a nested guest needs set on each vCPU.
//!
//! Intel: the VMX capability MSRs (IA32_VMX_BASIC ... IA32_VMX_VMFUNC) tell the guest hypervisor
//! which VMX controls it may use. KVM gives each vCPU defaults, but the values KVM supports are
//! read here from the system fd (they are "feature MSRs") and set explicitly, so the guest sees
//! what the host KVM can emulate and a snapshot restores the same values. They must be set after
//! `KVM_SET_CPUID2` (which re-derives some of them) and before the guest runs VMXON.
//! IA32_FEATURE_CONTROL is not set here: nvmm boots Linux without firmware, and Linux enables
//! and locks VMX in it by itself when it finds it unlocked.
//!
//! AMD: nothing. SVM needs only CPUID (see `shape_cpuid`); EFER.SVME is the guest's to set, and
//! KVM itself emulates VM_CR and VM_HSAVE_PA for the guest.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::Kvm;

use super::NestedError;
use crate::host::Vendor;

/// Basic VMX information: VMCS revision, VMCS size, memory type, true-controls support.
pub const MSR_IA32_VMX_BASIC: u32 = 0x480;
/// Allowed settings of the pin-based VM-execution controls.
pub const MSR_IA32_VMX_PINBASED_CTLS: u32 = 0x481;
/// Allowed settings of the primary processor-based VM-execution controls.
pub const MSR_IA32_VMX_PROCBASED_CTLS: u32 = 0x482;
/// Allowed settings of the VM-exit controls.
pub const MSR_IA32_VMX_EXIT_CTLS: u32 = 0x483;
/// Allowed settings of the VM-entry controls.
pub const MSR_IA32_VMX_ENTRY_CTLS: u32 = 0x484;
/// Miscellaneous data: preemption-timer rate, activity states, CR3 targets, MSR list sizes.
pub const MSR_IA32_VMX_MISC: u32 = 0x485;
/// CR0 bits fixed to 1 in VMX operation.
pub const MSR_IA32_VMX_CR0_FIXED0: u32 = 0x486;
/// CR0 bits allowed to be 1 in VMX operation.
pub const MSR_IA32_VMX_CR0_FIXED1: u32 = 0x487;
/// CR4 bits fixed to 1 in VMX operation.
pub const MSR_IA32_VMX_CR4_FIXED0: u32 = 0x488;
/// CR4 bits allowed to be 1 in VMX operation.
pub const MSR_IA32_VMX_CR4_FIXED1: u32 = 0x489;
/// Highest VMCS field index.
pub const MSR_IA32_VMX_VMCS_ENUM: u32 = 0x48A;
/// Allowed settings of the secondary processor-based VM-execution controls.
pub const MSR_IA32_VMX_PROCBASED_CTLS2: u32 = 0x48B;
/// EPT and VPID capabilities.
pub const MSR_IA32_VMX_EPT_VPID_CAP: u32 = 0x48C;
/// Pin-based controls, including the default-1 bits that may be 0.
pub const MSR_IA32_VMX_TRUE_PINBASED_CTLS: u32 = 0x48D;
/// Primary processor-based controls, "true" version.
pub const MSR_IA32_VMX_TRUE_PROCBASED_CTLS: u32 = 0x48E;
/// VM-exit controls, "true" version.
pub const MSR_IA32_VMX_TRUE_EXIT_CTLS: u32 = 0x48F;
/// VM-entry controls, "true" version.
pub const MSR_IA32_VMX_TRUE_ENTRY_CTLS: u32 = 0x490;
/// VM functions (EPTP switching).
pub const MSR_IA32_VMX_VMFUNC: u32 = 0x491;

/// Every VMX capability MSR nvmm passes on, in index order.
pub const VMX_CAPABILITY_MSRS: [u32; 18] = [
    MSR_IA32_VMX_BASIC,
    MSR_IA32_VMX_PINBASED_CTLS,
    MSR_IA32_VMX_PROCBASED_CTLS,
    MSR_IA32_VMX_EXIT_CTLS,
    MSR_IA32_VMX_ENTRY_CTLS,
    MSR_IA32_VMX_MISC,
    MSR_IA32_VMX_CR0_FIXED0,
    MSR_IA32_VMX_CR0_FIXED1,
    MSR_IA32_VMX_CR4_FIXED0,
    MSR_IA32_VMX_CR4_FIXED1,
    MSR_IA32_VMX_VMCS_ENUM,
    MSR_IA32_VMX_PROCBASED_CTLS2,
    MSR_IA32_VMX_EPT_VPID_CAP,
    MSR_IA32_VMX_TRUE_PINBASED_CTLS,
    MSR_IA32_VMX_TRUE_PROCBASED_CTLS,
    MSR_IA32_VMX_TRUE_EXIT_CTLS,
    MSR_IA32_VMX_TRUE_ENTRY_CTLS,
    MSR_IA32_VMX_VMFUNC,
];

/// The VMX capability MSRs found in a feature-MSR index list, in index order, once each.
pub fn vmx_msr_indices(feature_list: &[u32]) -> Vec<u32> {
    VMX_CAPABILITY_MSRS
        .into_iter()
        .filter(|i| feature_list.contains(i))
        .collect()
}

/// Reads the VMX capability MSRs of `feature_list` with `get_msrs` (`KVM_GET_MSRS` on the
/// system fd), checking that every one was read.
fn read_vmx_msrs(
    feature_list: &[u32],
    get_msrs: impl FnOnce(&mut Msrs) -> Result<usize, kvm_ioctls::Error>,
) -> Result<Vec<kvm_msr_entry>, NestedError> {
    let entries: Vec<kvm_msr_entry> = vmx_msr_indices(feature_list)
        .into_iter()
        .map(|index| kvm_msr_entry {
            index,
            ..Default::default()
        })
        .collect();
    if entries.is_empty() {
        return Ok(entries);
    }
    let mut msrs = Msrs::from_entries(&entries).map_err(NestedError::MsrList)?;
    let read = get_msrs(&mut msrs).map_err(NestedError::GetFeatureMsrs)?;
    let got = msrs.as_slice();
    if read < got.len() {
        return Err(NestedError::ShortMsrRead {
            read,
            wanted: got.len(),
            first_unread: got[read].index,
        });
    }
    Ok(got.to_vec())
}

/// The VMX capability MSRs the host KVM supports, with their values, ready for `vcpu.set_msrs`.
/// Empty when KVM lists none of them (an AMD host, or a KVM without nested VMX).
pub fn vmx_capability_msrs(kvm: &Kvm) -> Result<Vec<kvm_msr_entry>, NestedError> {
    let list = kvm
        .get_msr_feature_index_list()
        .map_err(NestedError::MsrFeatureList)?;
    read_vmx_msrs(list.as_slice(), |msrs| kvm.get_msrs(msrs))
}

/// The MSRs to set on each vCPU for `nested`: none without it, none on AMD, the VMX capability
/// MSRs on Intel (an error if KVM offers none).
pub fn vcpu_msrs(
    kvm: &Kvm,
    vendor: &Vendor,
    nested: bool,
) -> Result<Vec<kvm_msr_entry>, NestedError> {
    if !nested {
        return Ok(Vec::new());
    }
    match vendor {
        Vendor::Intel => non_empty(vmx_capability_msrs(kvm)?),
        Vendor::Amd => Ok(Vec::new()),
        Vendor::Other(id) => Err(NestedError::UnsupportedVendor { vendor: id.clone() }),
    }
}

fn non_empty(msrs: Vec<kvm_msr_entry>) -> Result<Vec<kvm_msr_entry>, NestedError> {
    if msrs.is_empty() {
        Err(NestedError::NoVmxMsrs)
    } else {
        Ok(msrs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A feature-MSR index list as kvm_intel with nested=Y returns it: some non-VMX feature
    /// MSRs around all 18 VMX ones, unordered, and IA32_VMX_PROCBASED_CTLS3 (0x492) which
    /// nvmm does not pass on.
    fn intel_feature_list() -> Vec<u32> {
        let mut list = vec![0x10a, 0x345, 0xc001_1029, 0x492];
        list.extend(VMX_CAPABILITY_MSRS.iter().rev());
        list.push(0x8b);
        list
    }

    /// Values as a Skylake host's KVM reports them (enough to tell entries apart).
    fn fake_value(index: u32) -> u64 {
        match index {
            MSR_IA32_VMX_BASIC => 0x00da_0400_0000_0004,
            MSR_IA32_VMX_CR0_FIXED0 => 0x8000_0021,
            MSR_IA32_VMX_CR4_FIXED0 => 0x2000,
            i => 0xfff9_fffe_0401_e172 ^ u64::from(i),
        }
    }

    fn fill(msrs: &mut Msrs, upto: usize) -> usize {
        for e in msrs.as_mut_slice().iter_mut().take(upto) {
            e.data = fake_value(e.index);
        }
        upto.min(msrs.as_slice().len())
    }

    #[test]
    fn constants_cover_the_vmx_range() {
        let want: Vec<u32> = (0x480..=0x491).collect();
        assert_eq!(VMX_CAPABILITY_MSRS.to_vec(), want);
        assert_eq!(MSR_IA32_VMX_BASIC, 0x480);
        assert_eq!(MSR_IA32_VMX_VMFUNC, 0x491);
        assert_eq!(MSR_IA32_VMX_EPT_VPID_CAP, 0x48c);
    }

    #[test]
    fn filter_keeps_only_vmx_msrs_in_order() {
        let got = vmx_msr_indices(&intel_feature_list());
        assert_eq!(got, VMX_CAPABILITY_MSRS.to_vec());
        assert!(!got.contains(&0x492), "PROCBASED_CTLS3 left out");
        assert!(!got.contains(&0x10a));
    }

    #[test]
    fn filter_partial_and_duplicates() {
        let list = [0x48c, 0x480, 0x480, 0x47f, 0x491, 0x481];
        assert_eq!(vmx_msr_indices(&list), vec![0x480, 0x481, 0x48c, 0x491]);
    }

    #[test]
    fn filter_amd_list_is_empty() {
        // kvm_amd's feature MSRs: IA32_ARCH_CAPABILITIES, DE_CFG, IA32_PERF_CAPABILITIES ...
        assert!(vmx_msr_indices(&[0x10a, 0xc001_1029, 0x345]).is_empty());
        assert!(vmx_msr_indices(&[]).is_empty());
    }

    #[test]
    fn read_builds_entries_with_values() {
        let got = read_vmx_msrs(&intel_feature_list(), |m| Ok(fill(m, usize::MAX))).unwrap();
        assert_eq!(got.len(), 18);
        for (e, want) in got.iter().zip(VMX_CAPABILITY_MSRS) {
            assert_eq!(e.index, want);
            assert_eq!(e.data, fake_value(want));
            assert_eq!(e.reserved, 0);
        }
    }

    #[test]
    fn read_asks_kvm_for_exactly_the_vmx_msrs() {
        let mut asked = Vec::new();
        read_vmx_msrs(&intel_feature_list(), |m| {
            asked = m.as_slice().iter().map(|e| e.index).collect();
            Ok(m.as_slice().len())
        })
        .unwrap();
        assert_eq!(asked, VMX_CAPABILITY_MSRS.to_vec());
    }

    #[test]
    fn read_skips_the_ioctl_when_there_is_nothing_to_read() {
        let got = read_vmx_msrs(&[0x10a], |_| panic!("no ioctl for an empty list")).unwrap();
        assert!(got.is_empty());
    }

    #[test]
    fn short_read_names_the_first_unread_msr() {
        let err = read_vmx_msrs(&intel_feature_list(), |m| Ok(fill(m, 12))).unwrap_err();
        assert!(matches!(
            err,
            NestedError::ShortMsrRead {
                read: 12,
                wanted: 18,
                first_unread: 0x48c
            }
        ));
        assert_eq!(
            err.to_string(),
            "KVM_GET_MSRS read 12 of 18 VMX capability MSRs, stopping at 0x48c"
        );
    }

    #[test]
    fn ioctl_error_is_reported() {
        let err = read_vmx_msrs(&intel_feature_list(), |_| {
            Err(kvm_ioctls::Error::new(libc::EINVAL))
        })
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("KVM_GET_MSRS (feature MSRs) failed: "),
            "{err}"
        );
    }

    #[test]
    fn intel_needs_some_vmx_msrs() {
        let err = non_empty(Vec::new()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "KVM_GET_MSR_FEATURE_INDEX_LIST lists no VMX capability MSRs: the host KVM has no nested VMX (load kvm_intel with nested=1)"
        );
    }

    /// On the real /dev/kvm (skipped when it cannot be opened): the ioctls work, and a host that
    /// is not Intel yields no VMX MSRs.
    #[test]
    fn real_kvm_vmx_msrs() {
        let Ok(kvm) = Kvm::new() else {
            crate::skip_test("/dev/kvm cannot be opened");
            return;
        };
        let vendor = Vendor::detect();
        match vmx_capability_msrs(&kvm) {
            Ok(msrs) => {
                println!("VMX capability MSRs from the host KVM: {}", msrs.len());
                if vendor != Vendor::Intel {
                    assert!(msrs.is_empty());
                }
            }
            // A KVM without KVM_CAP_GET_MSR_FEATURES fails the list ioctl.
            Err(e) => println!("host KVM: {e}"),
        }
        assert!(vcpu_msrs(&kvm, &vendor, false).unwrap().is_empty());
        if vendor == Vendor::Amd {
            assert!(vcpu_msrs(&kvm, &vendor, true).unwrap().is_empty());
        }
    }
}
