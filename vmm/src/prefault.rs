//! Mapping guest memory in KVM's page tables before the guest touches it
//! (`KVM_PRE_FAULT_MEMORY`, Linux 6.10+, two-dimensional paging only).
//!
//! With nested paging, the first guest access to each page is an exit (a nested page fault) that
//! KVM answers by mapping the page. On bare metal that costs microseconds; at depth each one is a
//! round trip through every KVM below (an L3 page fault goes to L1's KVM, is reflected into L2's,
//! which maps the page and re-enters L3 through L1 again). A kernel boot touches thousands of
//! pages that are known in advance (`boot::boot_footprint`), so nvmm maps them before the first
//! `KVM_RUN`: the KVM below then takes the mapping from the page tables instead of from exits.
//! Pages nvmm did not write are first made present and writable in nvmm's own mapping
//! (`MADV_POPULATE_WRITE`): KVM pre-faults as a read, and a never-touched anonymous page would be
//! mapped as the shared zero page, costing an exit again at the guest's first write.

use std::ops::Range;

use kvm_bindings::{kvm_pre_fault_memory, KVMIO, KVM_CAP_PRE_FAULT_MEMORY};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_iowr_nr;

ioctl_iowr_nr!(KVM_PRE_FAULT_MEMORY, KVMIO, 0xd5, kvm_pre_fault_memory);

/// How many times one range is retried after `EINTR` or `EAGAIN` before giving up.
const RETRIES: u32 = 100;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM cannot pre-fault guest memory here (KVM_CAP_PRE_FAULT_MEMORY is 0: shadow paging, or Linux before 6.10)")]
    Unsupported,
    #[error("guest memory {0:#x}..{1:#x} is not RAM")]
    NotRam(u64, u64),
    #[error("madvise(MADV_POPULATE_WRITE) of guest memory at {gpa:#x}: {source}")]
    Populate { gpa: u64, source: std::io::Error },
    #[error("KVM_PRE_FAULT_MEMORY at {gpa:#x}: {source}")]
    PreFault { gpa: u64, source: std::io::Error },
}

/// Makes `ranges` of guest RAM present and maps them in KVM's page tables through `vcpu` (whose
/// registers must be set: the mapping is made as for its current mode). Returns the bytes mapped.
pub fn prefault(
    vm: &VmFd,
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    ranges: &[Range<u64>],
) -> Result<u64, Error> {
    if vm.check_extension_raw(KVM_CAP_PRE_FAULT_MEMORY.into()) <= 0 {
        return Err(Error::Unsupported);
    }
    let mut mapped = 0;
    for r in ranges {
        populate(mem, r)?;
        pre_fault(vcpu, r)?;
        mapped += r.end - r.start;
    }
    Ok(mapped)
}

/// `MADV_POPULATE_WRITE` (Linux 5.14+) over the host mapping of `r`; without it (`EINVAL`) the
/// range is left as it is, and only the pages nvmm wrote get writable mappings.
fn populate(mem: &GuestMemoryMmap, r: &Range<u64>) -> Result<(), Error> {
    let len = (r.end - r.start) as usize;
    let host = mem
        .get_slice(GuestAddress(r.start), len)
        .map_err(|_| Error::NotRam(r.start, r.end))?
        .ptr_guard_mut()
        .as_ptr();
    // SAFETY: `host..host + len` lies inside one guest RAM mapping that `mem` owns (get_slice
    // checked it); MADV_POPULATE_WRITE only faults pages in, as a write of nothing, and changes no
    // byte of their contents.
    if unsafe { libc::madvise(host.cast(), len, libc::MADV_POPULATE_WRITE) } != 0 {
        let source = std::io::Error::last_os_error();
        if source.raw_os_error() != Some(libc::EINVAL) {
            return Err(Error::Populate {
                gpa: r.start,
                source,
            });
        }
    }
    Ok(())
}

/// `KVM_PRE_FAULT_MEMORY` until the whole of `r` is mapped: KVM maps what it can, returns, and
/// leaves the rest in the structure it was given.
fn pre_fault(vcpu: &VcpuFd, r: &Range<u64>) -> Result<(), Error> {
    let mut range = kvm_pre_fault_memory {
        gpa: r.start,
        size: r.end - r.start,
        ..Default::default()
    };
    let mut retries = 0;
    while range.size > 0 {
        // SAFETY: the ioctl reads and writes exactly one `kvm_pre_fault_memory`, which `range` is,
        // and touches no memory of ours besides.
        if unsafe { ioctl_with_mut_ref(vcpu, KVM_PRE_FAULT_MEMORY(), &mut range) } == 0 {
            continue;
        }
        let source = std::io::Error::last_os_error();
        let again = matches!(source.raw_os_error(), Some(libc::EINTR | libc::EAGAIN));
        if !again || retries == RETRIES {
            return Err(Error::PreFault {
                gpa: range.gpa,
                source,
            });
        }
        retries += 1;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_outside_ram_are_refused_before_any_ioctl() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert!(matches!(
            populate(&mem, &(0x8_0000..0x20_0000)),
            Err(Error::NotRam(0x8_0000, 0x20_0000))
        ));
        populate(&mem, &(0..0x1_0000)).unwrap();
    }

    /// On this machine's /dev/kvm (PVM, shadow paging) KVM says it cannot; on a KVM with nested
    /// paging the boot vCPU's low memory gets mapped. Either way the guest's bytes stay as written.
    #[test]
    fn prefault_maps_or_says_why_not_and_keeps_the_contents() {
        use vm_memory::Bytes;
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            crate::skip_test("no /dev/kvm");
            return;
        };
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        mem.write_obj(0x1234_5678u32, GuestAddress(0x2000)).unwrap();
        let vm = crate::vm::Vm::create(&kvm, mem).unwrap();
        let vcpu = vm.fd.create_vcpu(0).unwrap();
        match prefault(&vm.fd, &vcpu, &vm.mem, &[0..0x8_0000, 0xc_0000..0x10_0000]) {
            Ok(n) => assert_eq!(n, 0xc_0000),
            Err(e) => assert!(matches!(e, Error::Unsupported), "{e}"),
        }
        assert_eq!(
            vm.mem.read_obj::<u32>(GuestAddress(0x2000)).unwrap(),
            0x1234_5678
        );
    }
}
