//! The CPUID each vCPU sees: KVM's supported set, with a topology that matches `--cpus` (one socket,
//! one thread per core) and each vCPU's own APIC ID. VMX/SVM exposure is `nested`'s job.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_PARAMS: u32 = 4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

/// Leaf 1 EBX: bits 31..24 initial APIC ID, bits 23..16 logical processors per package.
const EBX_APIC_ID_SHIFT: u32 = 24;
const EBX_LOGICAL_COUNT_SHIFT: u32 = 16;
/// Leaf 1 ECX bit 31: running under a hypervisor. KVM's supported set leaves it clear, and without
/// it Linux never looks at leaf 0x4000_0000, so it misses kvm-clock and paravirt features.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 ECX bit 24: the LAPIC timer has TSC-deadline mode. KVM emulates it but leaves the bit to
/// userspace (KVM_CAP_TSC_DEADLINE_TIMER). Without it Linux programs the LAPIC timer through its
/// one-shot count register, which costs more exits per tick.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 EDX bit 28 (HTT): EBX[23:16] is valid, i.e. more than one logical processor.
const EDX_HTT: u32 = 1 << 28;
/// Leaf 0x8000_0001 ECX bit 1 (CmpLegacy): multi-core, tells AMD guests to use 0x8000_0008.
const ECX_CMP_LEGACY: u32 = 1 << 1;
/// Leaf 0xb/0x1f ECX[15:8] level types.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// Bits needed to number `n` cores (the APIC ID shift of the core level).
fn id_bits(n: u8) -> u32 {
    (n.max(1) as u32).next_power_of_two().trailing_zeros()
}

/// Shapes `cpuid` for vCPU `id` of `count`. `tsc_deadline`: KVM can emulate the TSC-deadline timer.
pub fn shape_for_vcpu(cpuid: &mut CpuId, id: u8, count: u8, tsc_deadline: bool) {
    let apic_id = u32::from(id);
    let count32 = u32::from(count);
    let core_bits = id_bits(count);
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0xffff) | (apic_id << EBX_APIC_ID_SHIFT) | ((count32.next_power_of_two() & 0xff) << EBX_LOGICAL_COUNT_SHIFT);
                e.ecx |= ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                }
                if count > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            // EAX[31:26]: addressable core IDs per package minus one.
            LEAF_CACHE_PARAMS if e.eax != 0 => {
                e.eax = (e.eax & 0x03ff_ffff) | (((1u32 << core_bits) - 1) << 26);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => shape_topology_level(e, apic_id, count32, core_bits),
            LEAF_EXT_FEATURES => {
                if count > 1 {
                    e.ecx |= ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !ECX_CMP_LEGACY;
                }
            }
            // ECX[7:0] cores minus one, ECX[15:12] APIC ID bits for the core.
            LEAF_AMD_SIZE_IDS => e.ecx = (e.ecx & !0xf0ff) | (core_bits << 12) | (count32 - 1),
            LEAF_AMD_EXT_APIC_ID => {
                e.eax = apic_id;
                e.ebx = apic_id & 0xff; // one thread per core; core ID = APIC ID
                e.ecx = 0; // node 0, one node per package
            }
            _ => {}
        }
    }
}

fn shape_topology_level(e: &mut kvm_cpuid_entry2, apic_id: u32, count: u32, core_bits: u32) {
    e.edx = apic_id;
    match e.index {
        0 => {
            e.eax = 0;
            e.ebx = 1;
            e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
        }
        1 => {
            e.eax = core_bits;
            e.ebx = count;
            e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
        }
        _ => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = e.index;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax, ebx, ecx, edx, ..Default::default() }
    }

    fn sig(s: &[u8; 12]) -> (u32, u32, u32) {
        let w = |i: usize| u32::from_le_bytes(s[i..i + 4].try_into().unwrap());
        (w(0), w(4), w(8))
    }

    pub fn supported(vendor: &[u8; 12]) -> CpuId {
        let (b, d, c) = sig(vendor);
        CpuId::from_entries(&[
            entry(0, 0, 0x1f, b, c, d),
            entry(1, 0, 0x00a20f12, 0x0008_0800, 0xf6f8_3203, 0x178b_fbff),
            entry(4, 0, 0x121, 0x1c0003f, 0x3f, 0),
            entry(0xb, 0, 1, 2, 0x100, 7),
            entry(0xb, 1, 4, 16, 0x201, 7),
            entry(0xb, 2, 0, 0, 2, 7),
            entry(0x8000_0001, 0, 0, 0, 0x75c2_37ff, 0x2fd3_fbff),
            entry(0x8000_0008, 0, 0x3030, 0, 0x700f, 0),
            entry(0x8000_001e, 0, 9, 0x104, 0x300, 0),
        ])
        .unwrap()
    }

    fn get(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice().iter().find(|e| e.function == f && e.index == i).unwrap()
    }

    #[test]
    fn each_vcpu_gets_its_apic_id_and_a_consistent_topology() {
        for id in 0..4u8 {
            let mut c = supported(b"AuthenticAMD");
            shape_for_vcpu(&mut c, id, 4, true);
            let l1 = get(&c, 1, 0);
            assert_eq!(l1.ebx >> 24, id as u32);
            assert_eq!((l1.ebx >> 16) & 0xff, 4);
            assert_ne!(l1.edx & EDX_HTT, 0);
            assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);
            assert_ne!(l1.ecx & ECX_TSC_DEADLINE, 0);
            assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
            assert_eq!(get(&c, 0xb, 0).ebx, 1);
            assert_eq!(get(&c, 0xb, 1).ebx, 4);
            assert_eq!(get(&c, 0xb, 1).eax, 2);
            assert!((0..3).all(|i| get(&c, 0xb, i).edx == id as u32));
            assert_eq!(get(&c, 0xb, 2).ecx, 2, "invalid level ends the enumeration");
            assert_eq!(get(&c, 4, 0).eax >> 26, 3);
            assert_eq!(get(&c, 0x8000_0008, 0).ecx & 0xff, 3);
            assert_eq!((get(&c, 0x8000_0008, 0).ecx >> 12) & 0xf, 2);
            assert_ne!(get(&c, 0x8000_0001, 0).ecx & ECX_CMP_LEGACY, 0);
            assert_eq!(get(&c, 0x8000_001e, 0).eax, id as u32);
        }
    }

    #[test]
    fn single_vcpu_is_not_multicore() {
        let mut c = supported(b"GenuineIntel");
        shape_for_vcpu(&mut c, 0, 1, false);
        assert_eq!(get(&c, 1, 0).edx & EDX_HTT, 0);
        assert_eq!(get(&c, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(get(&c, 0x8000_0001, 0).ecx & ECX_CMP_LEGACY, 0);
        assert_eq!(get(&c, 0xb, 1).ebx, 1);
        assert_eq!(get(&c, 0xb, 1).eax, 0);
    }

    #[test]
    fn odd_counts_round_up_the_id_space() {
        let mut c = supported(b"AuthenticAMD");
        shape_for_vcpu(&mut c, 2, 3, true);
        assert_eq!(get(&c, 0xb, 1).eax, 2);
        assert_eq!((get(&c, 1, 0).ebx >> 16) & 0xff, 4);
        assert_eq!(get(&c, 0xb, 1).ebx, 3);
    }
}
