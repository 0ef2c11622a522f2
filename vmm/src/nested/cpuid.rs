//! The CPUID bits that decide whether a guest sees hardware virtualization.
//!
//! nvmm owns these bits here and nowhere else: the rest of the CPUID setup leaves them as
//! `KVM_GET_SUPPORTED_CPUID` reported them, and [`shape_cpuid`] then hides them (no --nested)
//! or checks they are there and keeps them (--nested).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

use super::NestedError;
use crate::host::Vendor;

/// CPUID leaf 1: processor info and feature bits.
pub const LEAF_FEATURES: u32 = 0x1;
/// Leaf 1 ECX bit 5: VMX, Intel's hardware virtualization.
pub const LEAF1_ECX_VMX: u32 = 1 << 5;
/// CPUID leaf 0x8000_0001: extended processor info and feature bits.
pub const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
/// Leaf 0x8000_0001 ECX bit 2: SVM, AMD's hardware virtualization.
pub const EXT1_ECX_SVM: u32 = 1 << 2;
/// CPUID leaf 0x8000_000A: SVM revision (EAX), number of ASIDs (EBX), SVM features (EDX).
/// KVM reports the features its nested SVM emulates (NPT, NRIPS, VMCB clean bits, ...).
pub const LEAF_SVM: u32 = 0x8000_000A;
/// Leaf 0x8000_000A EDX bit 0: nested paging (NPT). Without it, nested guests run on shadow
/// paging: correct but slow.
pub const SVM_EDX_NPT: u32 = 1 << 0;

/// What the supported CPUID offers for a nested hypervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VirtOffer {
    /// Intel VMX (leaf 1 ECX bit 5).
    Vmx,
    /// AMD SVM (leaf 0x8000_0001 ECX bit 2) and its feature leaf 0x8000_000A.
    Svm {
        /// Nested paging (leaf 0x8000_000A EDX bit 0).
        npt: bool,
        /// Number of ASIDs (leaf 0x8000_000A EBX).
        asids: u32,
    },
}

impl std::fmt::Display for VirtOffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VirtOffer::Vmx => f.write_str("VMX"),
            VirtOffer::Svm { npt: true, asids } => write!(f, "SVM with NPT, {asids} ASIDs"),
            VirtOffer::Svm { npt: false, asids } => {
                write!(
                    f,
                    "SVM without NPT (nested guests use shadow paging), {asids} ASIDs"
                )
            }
        }
    }
}

/// The entry of a leaf that has no sub-leaves.
fn leaf(cpuid: &CpuId, function: u32) -> Option<&kvm_cpuid_entry2> {
    cpuid
        .as_slice()
        .iter()
        .find(|e| e.function == function && e.index == 0)
}

/// Checks that `cpuid` (as `KVM_GET_SUPPORTED_CPUID` returned it) offers the vendor's hardware
/// virtualization, and says what it offers.
pub fn offered(cpuid: &CpuId, vendor: &Vendor) -> Result<VirtOffer, NestedError> {
    let has =
        |function: u32, ecx_bit: u32| leaf(cpuid, function).is_some_and(|e| e.ecx & ecx_bit != 0);
    match vendor {
        Vendor::Intel if has(LEAF_FEATURES, LEAF1_ECX_VMX) => Ok(VirtOffer::Vmx),
        Vendor::Intel => Err(NestedError::NotOffered { what: "VMX" }),
        Vendor::Amd if !has(LEAF_EXT_FEATURES, EXT1_ECX_SVM) => {
            Err(NestedError::NotOffered { what: "SVM" })
        }
        Vendor::Amd => match leaf(cpuid, LEAF_SVM) {
            Some(e) => Ok(VirtOffer::Svm {
                npt: e.edx & SVM_EDX_NPT != 0,
                asids: e.ebx,
            }),
            None => Err(NestedError::NotOffered {
                what: "the SVM feature leaf 0x8000000A",
            }),
        },
        Vendor::Other(id) => Err(NestedError::UnsupportedVendor { vendor: id.clone() }),
    }
}

/// Shapes the guest's hardware-virtualization CPUID bits.
///
/// `cpuid` must hold the VMX/SVM bits as `KVM_GET_SUPPORTED_CPUID` reported them. Without
/// `nested`, VMX and SVM are hidden and leaf 0x8000_000A is zeroed. With `nested`, the vendor's
/// own feature is kept as KVM offers it (on AMD the whole leaf 0x8000_000A: NPT, ASIDs, ...) and
/// the other vendor's is hidden; if KVM does not offer it, this fails and leaves `cpuid` as it
/// was.
pub fn shape_cpuid(cpuid: &mut CpuId, vendor: &Vendor, nested: bool) -> Result<(), NestedError> {
    let keep = if nested {
        Some(offered(cpuid, vendor)?)
    } else {
        None
    };
    if let Some(VirtOffer::Svm { npt: false, .. }) = keep {
        log::warn!("KVM offers SVM without NPT: nested guests will use shadow paging");
    }
    let keep_vmx = keep == Some(VirtOffer::Vmx);
    let keep_svm = matches!(keep, Some(VirtOffer::Svm { .. }));
    for e in cpuid.as_mut_slice() {
        match e.function {
            LEAF_FEATURES if !keep_vmx => e.ecx &= !LEAF1_ECX_VMX,
            LEAF_EXT_FEATURES if !keep_svm => e.ecx &= !EXT1_ECX_SVM,
            LEAF_SVM if !keep_svm => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
    Ok(())
}

/// CPUID tables as `KVM_GET_SUPPORTED_CPUID` returns them on nested-capable hosts.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;
    use kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;

    // Leaf 1 ECX bits besides VMX, so tests can see shaping leaves them alone.
    const ECX_SSE3: u32 = 1 << 0;
    const ECX_CX16: u32 = 1 << 13;
    const ECX_POPCNT: u32 = 1 << 23;
    const ECX_HYPERVISOR: u32 = 1 << 31;
    // Leaf 0x8000_0001 ECX bits besides SVM.
    const EXT_ECX_LAHF: u32 = 1 << 0;
    const EXT_ECX_CMP_LEGACY: u32 = 1 << 1;
    const EXT_ECX_ABM: u32 = 1 << 5;
    const EXT_ECX_PREFETCHW: u32 = 1 << 8;
    /// Leaf 0x8000_000A EDX as kvm_amd reports it: NPT(0) LBRV(1) NRIPS(3) TSCRATEMSR(4)
    /// VMCBCLEAN(5) FLUSHBYASID(6) DECODEASSISTS(7) PAUSEFILTER(10) PFTHRESHOLD(12) VGIF(16).
    pub const KVM_AMD_SVM_EDX: u32 = 0x0001_14fb;

    pub fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if function == 7 {
                KVM_CPUID_FLAG_SIGNIFCANT_INDEX
            } else {
                0
            },
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    pub const AMD_LEAF1_ECX: u32 = ECX_SSE3 | ECX_CX16 | ECX_POPCNT | ECX_HYPERVISOR;
    pub const AMD_EXT1_ECX: u32 =
        EXT_ECX_LAHF | EXT_ECX_CMP_LEGACY | EXT1_ECX_SVM | EXT_ECX_ABM | EXT_ECX_PREFETCHW;
    pub const INTEL_LEAF1_ECX: u32 =
        ECX_SSE3 | LEAF1_ECX_VMX | ECX_CX16 | ECX_POPCNT | ECX_HYPERVISOR;
    pub const INTEL_EXT1_ECX: u32 = EXT_ECX_LAHF | EXT_ECX_ABM | EXT_ECX_PREFETCHW;

    /// An AMD EPYC host with kvm_amd nested=1.
    pub fn amd_entries() -> Vec<kvm_cpuid_entry2> {
        vec![
            // "AuthenticAMD"
            entry(0, 0, [0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65]),
            entry(1, 0, [0x00a0_0f11, 0x0000_0800, AMD_LEAF1_ECX, 0x178b_fbff]),
            entry(7, 0, [0, 0x219c_91a9, 0x0040_069c, 0]),
            entry(0x8000_0000, 0, [0x8000_0021, 0, 0, 0]),
            entry(0x8000_0001, 0, [0x00a0_0f11, 0, AMD_EXT1_ECX, 0x2fd3_fbff]),
            entry(0x8000_0008, 0, [0x3030, 0, 0, 0]),
            // SVM revision 1, 8 ASIDs (what KVM always reports), KVM's nested SVM features.
            entry(LEAF_SVM, 0, [1, 8, 0, KVM_AMD_SVM_EDX]),
        ]
    }

    /// An Intel host with kvm_intel nested=Y: no leaf 0x8000_000A (max extended leaf 0x8000_0008).
    pub fn intel_entries() -> Vec<kvm_cpuid_entry2> {
        vec![
            // "GenuineIntel"
            entry(0, 0, [0x1b, 0x756e_6547, 0x6c65_746e, 0x4965_6e69]),
            entry(
                1,
                0,
                [0x0005_0657, 0x0000_0800, INTEL_LEAF1_ECX, 0x1f8b_fbff],
            ),
            entry(7, 0, [0, 0xd19f_4fbb, 0x0000_000c, 0xbc00_0400]),
            entry(0x8000_0000, 0, [0x8000_0008, 0, 0, 0]),
            entry(0x8000_0001, 0, [0, 0, INTEL_EXT1_ECX, 0x2c10_0800]),
            entry(0x8000_0008, 0, [0x3030, 0, 0, 0]),
        ]
    }

    pub fn cpuid(entries: &[kvm_cpuid_entry2]) -> CpuId {
        CpuId::from_entries(entries).expect("fixture fits in a CpuId")
    }

    pub fn get(cpuid: &CpuId, function: u32) -> kvm_cpuid_entry2 {
        *leaf(cpuid, function).expect("leaf present")
    }

    /// The table with `function`'s entry changed by `f`.
    pub fn with(
        mut entries: Vec<kvm_cpuid_entry2>,
        function: u32,
        f: impl Fn(&mut kvm_cpuid_entry2),
    ) -> Vec<kvm_cpuid_entry2> {
        entries
            .iter_mut()
            .filter(|e| e.function == function)
            .for_each(f);
        entries
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::*;
    use super::*;

    fn regs(e: &kvm_cpuid_entry2) -> [u32; 4] {
        [e.eax, e.ebx, e.ecx, e.edx]
    }

    #[test]
    fn amd_nested_keeps_svm_and_its_leaf() {
        let before = cpuid(&amd_entries());
        let mut c = before.clone();
        shape_cpuid(&mut c, &Vendor::Amd, true).unwrap();
        assert_eq!(get(&c, LEAF_EXT_FEATURES).ecx, AMD_EXT1_ECX);
        assert_ne!(get(&c, LEAF_EXT_FEATURES).ecx & EXT1_ECX_SVM, 0);
        let svm = get(&c, LEAF_SVM);
        assert_eq!(regs(&svm), [1, 8, 0, KVM_AMD_SVM_EDX]);
        assert_ne!(svm.edx & SVM_EDX_NPT, 0, "NPT kept");
        assert_eq!(get(&c, LEAF_FEATURES).ecx, AMD_LEAF1_ECX);
        // Nothing else moved.
        assert_eq!(c.as_slice(), before.as_slice());
    }

    #[test]
    fn amd_without_nested_hides_svm() {
        let mut c = cpuid(&amd_entries());
        shape_cpuid(&mut c, &Vendor::Amd, false).unwrap();
        let ext = get(&c, LEAF_EXT_FEATURES);
        assert_eq!(ext.ecx & EXT1_ECX_SVM, 0);
        assert_eq!(ext.ecx, AMD_EXT1_ECX & !EXT1_ECX_SVM, "only SVM cleared");
        assert_eq!(ext.edx, 0x2fd3_fbff);
        assert_eq!(
            regs(&get(&c, LEAF_SVM)),
            [0; 4],
            "leaf 0x8000000A zeroed, kept"
        );
        assert_eq!(get(&c, LEAF_FEATURES).ecx, AMD_LEAF1_ECX);
        assert_eq!(c.as_slice().len(), amd_entries().len());
    }

    #[test]
    fn amd_nested_fails_when_svm_not_offered() {
        let entries = with(amd_entries(), LEAF_EXT_FEATURES, |e| e.ecx &= !EXT1_ECX_SVM);
        let before = cpuid(&entries);
        let mut c = before.clone();
        let err = shape_cpuid(&mut c, &Vendor::Amd, true).unwrap_err();
        assert!(matches!(err, NestedError::NotOffered { what: "SVM" }));
        assert_eq!(
            err.to_string(),
            "KVM_GET_SUPPORTED_CPUID does not offer SVM: the host CPU or its KVM cannot give it to guests"
        );
        assert_eq!(c.as_slice(), before.as_slice(), "untouched on error");
    }

    #[test]
    fn amd_nested_fails_without_svm_leaf() {
        let entries: Vec<_> = amd_entries()
            .into_iter()
            .filter(|e| e.function != LEAF_SVM)
            .collect();
        let err = shape_cpuid(&mut cpuid(&entries), &Vendor::Amd, true).unwrap_err();
        assert!(err.to_string().contains("0x8000000A"), "{err}");
    }

    #[test]
    fn amd_without_npt_is_offered_but_said() {
        let entries = with(amd_entries(), LEAF_SVM, |e| e.edx &= !SVM_EDX_NPT);
        let c = cpuid(&entries);
        let offer = offered(&c, &Vendor::Amd).unwrap();
        assert_eq!(
            offer,
            VirtOffer::Svm {
                npt: false,
                asids: 8
            }
        );
        assert!(offer.to_string().contains("without NPT"));
        let mut c = c;
        shape_cpuid(&mut c, &Vendor::Amd, true).unwrap();
        assert_eq!(get(&c, LEAF_SVM).edx, KVM_AMD_SVM_EDX & !SVM_EDX_NPT);
    }

    #[test]
    fn amd_offer_display() {
        let offer = offered(&cpuid(&amd_entries()), &Vendor::Amd).unwrap();
        assert_eq!(offer.to_string(), "SVM with NPT, 8 ASIDs");
    }

    #[test]
    fn amd_stray_vmx_bit_is_hidden_even_with_nested() {
        let entries = with(amd_entries(), LEAF_FEATURES, |e| e.ecx |= LEAF1_ECX_VMX);
        for nested in [false, true] {
            let mut c = cpuid(&entries);
            shape_cpuid(&mut c, &Vendor::Amd, nested).unwrap();
            assert_eq!(get(&c, LEAF_FEATURES).ecx, AMD_LEAF1_ECX, "nested={nested}");
        }
    }

    #[test]
    fn intel_nested_keeps_vmx() {
        let before = cpuid(&intel_entries());
        let mut c = before.clone();
        shape_cpuid(&mut c, &Vendor::Intel, true).unwrap();
        assert_ne!(get(&c, LEAF_FEATURES).ecx & LEAF1_ECX_VMX, 0);
        assert_eq!(c.as_slice(), before.as_slice());
    }

    #[test]
    fn intel_without_nested_hides_vmx() {
        let mut c = cpuid(&intel_entries());
        shape_cpuid(&mut c, &Vendor::Intel, false).unwrap();
        let l1 = get(&c, LEAF_FEATURES);
        assert_eq!(l1.ecx & LEAF1_ECX_VMX, 0);
        assert_eq!(l1.ecx, INTEL_LEAF1_ECX & !LEAF1_ECX_VMX, "only VMX cleared");
        assert_eq!(l1.edx, 0x1f8b_fbff);
        assert_eq!(get(&c, LEAF_EXT_FEATURES).ecx, INTEL_EXT1_ECX);
    }

    #[test]
    fn intel_nested_fails_when_vmx_not_offered() {
        let entries = with(intel_entries(), LEAF_FEATURES, |e| e.ecx &= !LEAF1_ECX_VMX);
        let err = shape_cpuid(&mut cpuid(&entries), &Vendor::Intel, true).unwrap_err();
        assert!(matches!(err, NestedError::NotOffered { what: "VMX" }));
        assert!(err.to_string().contains("does not offer VMX"));
    }

    #[test]
    fn intel_stray_svm_bits_are_hidden_even_with_nested() {
        let mut entries = with(intel_entries(), LEAF_EXT_FEATURES, |e| {
            e.ecx |= EXT1_ECX_SVM
        });
        entries.push(entry(LEAF_SVM, 0, [1, 8, 0, KVM_AMD_SVM_EDX]));
        for nested in [false, true] {
            let mut c = cpuid(&entries);
            shape_cpuid(&mut c, &Vendor::Intel, nested).unwrap();
            assert_eq!(get(&c, LEAF_EXT_FEATURES).ecx, INTEL_EXT1_ECX);
            assert_eq!(regs(&get(&c, LEAF_SVM)), [0; 4]);
            assert_eq!(
                get(&c, LEAF_FEATURES).ecx & LEAF1_ECX_VMX != 0,
                nested,
                "VMX only with nested"
            );
        }
    }

    #[test]
    fn other_vendor() {
        let mut entries = with(amd_entries(), LEAF_FEATURES, |e| e.ecx |= LEAF1_ECX_VMX);
        entries.retain(|e| e.function != 0);
        let vendor = Vendor::Other("CentaurHauls".into());
        let mut c = cpuid(&entries);
        shape_cpuid(&mut c, &vendor, false).unwrap();
        assert_eq!(get(&c, LEAF_FEATURES).ecx & LEAF1_ECX_VMX, 0);
        assert_eq!(get(&c, LEAF_EXT_FEATURES).ecx & EXT1_ECX_SVM, 0);
        let err = shape_cpuid(&mut cpuid(&entries), &vendor, true).unwrap_err();
        assert_eq!(
            err.to_string(),
            "nested virtualization needs an Intel (VMX) or AMD (SVM) CPU, and this one is CentaurHauls"
        );
    }

    #[test]
    fn shaping_twice_is_the_same_as_once() {
        for (vendor, entries) in [
            (Vendor::Amd, amd_entries()),
            (Vendor::Intel, intel_entries()),
        ] {
            for nested in [false, true] {
                let mut once = cpuid(&entries);
                shape_cpuid(&mut once, &vendor, nested).unwrap();
                let mut twice = once.clone();
                shape_cpuid(&mut twice, &vendor, nested).unwrap();
                assert_eq!(once.as_slice(), twice.as_slice());
            }
        }
    }

    #[test]
    fn empty_table() {
        let mut c = cpuid(&[]);
        shape_cpuid(&mut c, &Vendor::Amd, false).unwrap();
        assert!(shape_cpuid(&mut c, &Vendor::Amd, true).is_err());
        assert!(shape_cpuid(&mut c, &Vendor::Intel, true).is_err());
    }

    #[test]
    fn indexed_leaf_is_not_taken_for_the_leaf() {
        // A sub-leaf 1 of leaf 1 (no such thing in practice) must not satisfy the VMX check.
        let entries = vec![entry(LEAF_FEATURES, 1, [0, 0, LEAF1_ECX_VMX, 0])];
        assert!(offered(&cpuid(&entries), &Vendor::Intel).is_err());
    }
}
