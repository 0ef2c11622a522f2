//! The CPUID each vCPU sees: KVM's supported set, with a topology that matches `--cpus` (one socket,
//! one thread per core) and each vCPU's own APIC ID, and the TSC and APIC bus frequencies in leaf
//! 0x4000_0010. VMX/SVM exposure is `nested`'s job.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot add CPUID leaf {0:#x}: {1:?}")]
    AddLeaf(u32, vmm_sys_util::fam::Error),
}

const LEAF_FEATURES: u32 = 1;
const LEAF_CACHE_PARAMS: u32 = 4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZE_IDS: u32 = 0x8000_0008;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;
/// KVM's signature leaf; EAX is the highest hypervisor leaf.
const LEAF_KVM_SIGNATURE: u32 = 0x4000_0000;
/// The timing leaf VMware defined and KVM guests read too: EAX the TSC frequency, EBX the
/// APIC bus (LAPIC timer) frequency, both in kHz. QEMU fills it when the TSC frequency is known.
pub const LEAF_TIMING: u32 = 0x4000_0010;
/// KVM's LAPIC timer counts at 1 GHz (one tick a nanosecond, `APIC_BUS_CYCLE_NS` = 1).
pub const APIC_BUS_KHZ: u32 = 1_000_000;

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
pub fn shape_for_vcpu(cpuid: &mut CpuId, id: u8, count: u8, tsc_deadline: bool) -> Result<(), Error> {
    add_topology_levels(cpuid)?;
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
    Ok(())
}

/// Gives each topology leaf KVM lists (0xb, and 0x1f on Intel) the three subleaves that describe
/// one package of cores: SMT, core, and the invalid level that ends the list. Since Linux 6.2 KVM
/// reports only subleaf 0, zeroed ("no topology": userspace is to describe its own). With subleaf
/// 0 alone a guest finds no core level and counts each vCPU as a package of its own; on AMD, Linux
/// then marks the TSC unstable as it does on multi-socket machines ("TSCs unsynchronized"), and a
/// 2-vCPU guest of nvmm went without the TSC clocksource that the same guest of QEMU has.
fn add_topology_levels(cpuid: &mut CpuId) -> Result<(), Error> {
    for leaf in [LEAF_EXT_TOPOLOGY, LEAF_V2_EXT_TOPOLOGY] {
        let Some(first) = cpuid.as_slice().iter().find(|e| e.function == leaf && e.index == 0).copied() else { continue };
        for index in 1..=2 {
            if !cpuid.as_slice().iter().any(|e| e.function == leaf && e.index == index) {
                cpuid.push(kvm_cpuid_entry2 { index, ..first }).map_err(|e| Error::AddLeaf(leaf, e))?;
            }
        }
    }
    Ok(())
}

/// Tells the guest its TSC frequency (`KVM_GET_TSC_KHZ`) and the LAPIC timer's in leaf
/// 0x4000_0010, so it need not measure them against another clock; raises the signature leaf's
/// highest leaf to match. Does nothing without KVM's signature leaf (nothing points the guest
/// at the hypervisor leaves then) or with an unknown TSC frequency (0).
pub fn add_timing_leaf(cpuid: &mut CpuId, tsc_khz: u32) -> Result<(), Error> {
    if tsc_khz == 0 {
        return Ok(());
    }
    let Some(sig) = cpuid.as_mut_slice().iter_mut().find(|e| e.function == LEAF_KVM_SIGNATURE) else {
        return Ok(());
    };
    sig.eax = sig.eax.max(LEAF_TIMING);
    let timing = kvm_cpuid_entry2 { function: LEAF_TIMING, eax: tsc_khz, ebx: APIC_BUS_KHZ, ..Default::default() };
    match cpuid.as_mut_slice().iter_mut().find(|e| e.function == LEAF_TIMING) {
        Some(e) => *e = timing,
        None => cpuid.push(timing).map_err(|e| Error::AddLeaf(LEAF_TIMING, e))?,
    }
    Ok(())
}

/// What a vCPU's CPUID tells the guest about its timers, as the exit profile shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TimerFacts {
    /// Leaf 0x4000_0010, when present (with the signature leaf pointing at it).
    pub tsc_khz: Option<u32>,
    pub apic_bus_khz: Option<u32>,
    /// Leaf 0x8000_0007 EDX bit 8: the TSC runs at a constant rate in every C-, P- and T-state.
    pub invariant_tsc: bool,
    pub tsc_deadline: bool,
    pub x2apic: bool,
    /// Leaf 0xb subleaf 1 EBX: the logical processors of the package, as the core level says;
    /// `None` without one (each vCPU a package of its own, which on AMD makes Linux distrust
    /// the TSC as on a multi-socket machine).
    pub package_cpus: Option<u32>,
}

/// Leaf 0x8000_0007 EDX bit 8 (InvariantTSC); leaf 1 ECX bit 21 (x2APIC).
const LEAF_POWER_MGMT: u32 = 0x8000_0007;
const EDX_INVARIANT_TSC: u32 = 1 << 8;
const ECX_X2APIC: u32 = 1 << 21;

impl TimerFacts {
    pub fn of(cpuid: &CpuId) -> TimerFacts {
        let leaf = |f: u32| cpuid.as_slice().iter().find(|e| e.function == f && e.index == 0).copied();
        let max_hv = leaf(LEAF_KVM_SIGNATURE).map_or(0, |e| e.eax);
        let timing = leaf(LEAF_TIMING).filter(|_| max_hv >= LEAF_TIMING);
        let l1 = leaf(LEAF_FEATURES).unwrap_or_default();
        TimerFacts {
            tsc_khz: timing.map(|e| e.eax),
            apic_bus_khz: timing.map(|e| e.ebx),
            invariant_tsc: leaf(LEAF_POWER_MGMT).is_some_and(|e| e.edx & EDX_INVARIANT_TSC != 0),
            tsc_deadline: l1.ecx & ECX_TSC_DEADLINE != 0,
            x2apic: l1.ecx & ECX_X2APIC != 0,
            package_cpus: cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == LEAF_EXT_TOPOLOGY && e.index == 1 && (e.ecx >> 8) & 0xff == LEVEL_TYPE_CORE)
                .map(|e| e.ebx & 0xffff),
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
    use kvm_bindings::KVM_CPUID_FLAG_SIGNIFCANT_INDEX;

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
            // What KVM reports since Linux 6.2: subleaf 0 alone, zeroed but for flags.
            kvm_cpuid_entry2 { function: 0xb, index: 0, flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX, ..Default::default() },
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
            shape_for_vcpu(&mut c, id, 4, true).unwrap();
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
            assert_eq!(get(&c, 0xb, 0).ecx >> 8, LEVEL_TYPE_SMT);
            assert_eq!(get(&c, 0xb, 1).ecx >> 8, LEVEL_TYPE_CORE);
            assert!((0..3).all(|i| get(&c, 0xb, i).flags & KVM_CPUID_FLAG_SIGNIFCANT_INDEX != 0));
            assert_eq!(c.as_slice().iter().filter(|e| e.function == 0xb).count(), 3);
            assert_eq!(get(&c, 4, 0).eax >> 26, 3);
            assert_eq!(get(&c, 0x8000_0008, 0).ecx & 0xff, 3);
            assert_eq!((get(&c, 0x8000_0008, 0).ecx >> 12) & 0xf, 2);
            assert_ne!(get(&c, 0x8000_0001, 0).ecx & ECX_CMP_LEGACY, 0);
            assert_eq!(get(&c, 0x8000_001e, 0).eax, id as u32);
            assert_eq!(TimerFacts::of(&c).package_cpus, Some(4));
        }
    }

    /// Intel's v2 topology leaf gets the same levels; a KVM that already lists subleaves (before
    /// Linux 6.2 it passed the host's through) keeps them, shaped, and gets no duplicates.
    #[test]
    fn topology_levels_are_added_once_for_both_leaves() {
        let mut c = supported(b"GenuineIntel");
        c.push(kvm_cpuid_entry2 { function: 0x1f, index: 0, flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX, ..Default::default() }).unwrap();
        c.push(entry(0x1f, 1, 4, 16, 0x201, 7)).unwrap();
        shape_for_vcpu(&mut c, 1, 2, true).unwrap();
        for leaf in [0xb, 0x1f] {
            assert_eq!(c.as_slice().iter().filter(|e| e.function == leaf).count(), 3, "{leaf:#x}");
            assert_eq!((get(&c, leaf, 1).eax, get(&c, leaf, 1).ebx, get(&c, leaf, 1).ecx >> 8), (1, 2, LEVEL_TYPE_CORE));
            assert_eq!((get(&c, leaf, 2).ebx, get(&c, leaf, 2).ecx >> 8), (0, 0));
            assert!((0..3).all(|i| get(&c, leaf, i).edx == 1));
        }
    }

    #[test]
    fn single_vcpu_is_not_multicore() {
        let mut c = supported(b"GenuineIntel");
        shape_for_vcpu(&mut c, 0, 1, false).unwrap();
        assert_eq!(get(&c, 1, 0).edx & EDX_HTT, 0);
        assert_eq!(get(&c, 1, 0).ecx & ECX_TSC_DEADLINE, 0);
        assert_eq!(get(&c, 0x8000_0001, 0).ecx & ECX_CMP_LEGACY, 0);
        assert_eq!(get(&c, 0xb, 1).ebx, 1);
        assert_eq!(get(&c, 0xb, 1).eax, 0);
    }

    #[test]
    fn the_timing_leaf_carries_the_tsc_and_apic_bus_khz() {
        let mut c = supported(b"AuthenticAMD");
        c.push(entry(LEAF_KVM_SIGNATURE, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d)).unwrap();
        add_timing_leaf(&mut c, 2_994_000).unwrap();
        assert_eq!(get(&c, LEAF_KVM_SIGNATURE, 0).eax, LEAF_TIMING, "the guest must be told the leaf exists");
        let t = get(&c, LEAF_TIMING, 0);
        assert_eq!((t.eax, t.ebx, t.ecx, t.edx), (2_994_000, APIC_BUS_KHZ, 0, 0));
        let n = c.as_slice().len();
        add_timing_leaf(&mut c, 1_000_000).unwrap();
        assert_eq!(c.as_slice().len(), n, "a second call replaces the leaf");
        assert_eq!(get(&c, LEAF_TIMING, 0).eax, 1_000_000);
        let f = TimerFacts::of(&c);
        assert_eq!((f.tsc_khz, f.apic_bus_khz), (Some(1_000_000), Some(APIC_BUS_KHZ)));
        assert!(f.x2apic, "the test's leaf 1 has x2APIC");
        assert!(!f.invariant_tsc, "the test's table has no leaf 0x8000_0007");
        c.push(entry(LEAF_POWER_MGMT, 0, 0, 0, 0, EDX_INVARIANT_TSC)).unwrap();
        assert!(TimerFacts::of(&c).invariant_tsc);
    }

    #[test]
    fn no_timing_leaf_without_the_kvm_signature_or_a_frequency() {
        let mut c = supported(b"AuthenticAMD");
        add_timing_leaf(&mut c, 2_994_000).unwrap();
        assert!(c.as_slice().iter().all(|e| e.function != LEAF_TIMING));
        c.push(entry(LEAF_KVM_SIGNATURE, 0, 0x4000_0001, 0, 0, 0)).unwrap();
        add_timing_leaf(&mut c, 0).unwrap();
        assert!(c.as_slice().iter().all(|e| e.function != LEAF_TIMING));
        assert_eq!(get(&c, LEAF_KVM_SIGNATURE, 0).eax, 0x4000_0001);
        assert_eq!(TimerFacts::of(&c).tsc_khz, None);
    }

    #[test]
    fn odd_counts_round_up_the_id_space() {
        let mut c = supported(b"AuthenticAMD");
        shape_for_vcpu(&mut c, 2, 3, true).unwrap();
        assert_eq!(get(&c, 0xb, 1).eax, 2);
        assert_eq!((get(&c, 1, 0).ebx >> 16) & 0xff, 4);
        assert_eq!(get(&c, 0xb, 1).ebx, 3);
    }
}
