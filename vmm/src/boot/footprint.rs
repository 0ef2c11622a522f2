//! Where a freshly loaded kernel touches memory first: the boot structures in the first MiB, the
//! image nvmm loaded, the initrd, and, for a bzImage, the buffer it decompresses itself into
//! (`init_size` bytes from where its 64-bit entry code puts the kernel). nvmm maps these in KVM's
//! page tables before the first `KVM_RUN` (`prefault.rs`): otherwise the guest's first touch of
//! each page is an exit, and at depth each such exit is a round trip through every KVM below.
//! The rest of RAM is left to be faulted in when the guest uses it.

use std::ops::Range;

use linux_loader::loader::bootparam::setup_header;

use super::{InitrdRegion, LoadedKernel, BOOT_PROTOCOL_INIT_SIZE, PAGE_SIZE};
use crate::memory::{self, layout};

/// The guest-physical ranges a boot touches first, page aligned, sorted, merged, and within the
/// RAM below the MMIO gap.
pub fn boot_footprint(
    kernel: &LoadedKernel,
    initrd: Option<InitrdRegion>,
    mem_size: u64,
) -> Vec<Range<u64>> {
    let mut ranges = vec![
        0..layout::HIMEM_START,
        kernel.result.kernel_load.0..kernel.result.kernel_end,
    ];
    if let Some(hdr) = kernel.result.setup_header {
        ranges.extend(decompression_buffer(&hdr, kernel.result.kernel_load.0));
    }
    if let Some(r) = initrd {
        ranges.push(r.addr..r.addr.saturating_add(r.size));
    }
    normalize(ranges, memory::low_mem_end(mem_size))
}

/// Where a bzImage loaded at `load` decompresses itself, as its 64-bit entry code decides
/// (arch/x86/boot/compressed/head_64.S): at `pref_address` (`LOAD_PHYSICAL_ADDR`), or for a
/// relocatable kernel at the load address rounded up to `kernel_alignment` if that is higher;
/// `init_size` bytes from there hold the moved compressed image, the output, its bss and the
/// early page tables. Protocols before 2.10 do not say.
fn decompression_buffer(hdr: &setup_header, load: u64) -> Option<Range<u64>> {
    if hdr.version < BOOT_PROTOCOL_INIT_SIZE || hdr.init_size == 0 {
        return None;
    }
    let pref = hdr.pref_address;
    let start = if hdr.relocatable_kernel != 0 {
        let align = u64::from(hdr.kernel_alignment).max(PAGE_SIZE);
        load.checked_next_multiple_of(align)?.max(pref)
    } else {
        pref
    };
    Some(start..start.saturating_add(u64::from(hdr.init_size)))
}

/// Rounds each range out to whole pages, cuts it at `limit`, drops empty ones and merges those
/// that overlap or touch.
fn normalize(mut ranges: Vec<Range<u64>>, limit: u64) -> Vec<Range<u64>> {
    for r in &mut ranges {
        *r = (r.start & !(PAGE_SIZE - 1))
            ..(r.end.saturating_add(PAGE_SIZE - 1).min(limit) & !(PAGE_SIZE - 1));
    }
    ranges.retain(|r| r.start < r.end);
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use linux_loader::loader::KernelLoaderResult;
    use vm_memory::GuestAddress;

    use super::*;
    use crate::boot::Entry;

    const MIB: u64 = 1 << 20;

    fn bzimage(relocatable: bool, init_size: u32) -> LoadedKernel {
        let hdr = setup_header {
            version: 0x20f,
            pref_address: 16 * MIB,
            init_size,
            relocatable_kernel: u8::from(relocatable),
            kernel_alignment: 2 * MIB as u32,
            ..Default::default()
        };
        let result = KernelLoaderResult {
            kernel_load: GuestAddress(MIB),
            kernel_end: MIB + 3 * MIB + 100,
            setup_header: Some(hdr),
            ..Default::default()
        };
        LoadedKernel {
            path: PathBuf::from("bzImage"),
            result,
            entry: Entry::Linux64 { rip: MIB + 0x200 },
            cmdline_max: 2047,
        }
    }

    #[test]
    fn a_bzimage_touches_low_memory_its_image_its_buffer_and_the_initrd() {
        let initrd = InitrdRegion {
            addr: 94 * MIB + 0x1000,
            size: 2 * MIB - 0x1000 - 10,
        };
        let got = boot_footprint(&bzimage(false, 0xe2_f000), Some(initrd), 96 * MIB);
        // Low memory and the loaded image touch at 1 MiB and merge; the image's end rounds up.
        assert_eq!(
            got,
            vec![
                0..4 * MIB + PAGE_SIZE,
                16 * MIB..16 * MIB + 0xe2_f000,
                initrd.addr..96 * MIB
            ]
        );
    }

    #[test]
    fn a_relocatable_bzimage_decompresses_above_its_aligned_load_address_if_higher() {
        let mut k = bzimage(true, 0x10_0000);
        assert_eq!(
            boot_footprint(&k, None, 256 * MIB)[1],
            16 * MIB..17 * MIB,
            "below pref_address: pref_address"
        );
        k.result.kernel_load = GuestAddress(33 * MIB);
        k.result.kernel_end = 34 * MIB;
        let got = boot_footprint(&k, None, 256 * MIB);
        assert_eq!(
            got,
            vec![0..MIB, 33 * MIB..34 * MIB + MIB],
            "2 MiB aligned up from 33 MiB is 34 MiB"
        );
    }

    #[test]
    fn old_protocols_and_elf_kernels_have_no_buffer_and_nothing_passes_the_end_of_ram() {
        let mut k = bzimage(false, 0xe2_f000);
        if let Some(h) = k.result.setup_header.as_mut() {
            h.version = 0x209;
        }
        assert_eq!(
            boot_footprint(&k, None, 96 * MIB),
            vec![0..4 * MIB + PAGE_SIZE]
        );
        k.result.setup_header = None;
        k.result.kernel_load = GuestAddress(16 * MIB);
        k.result.kernel_end = 40 * MIB;
        assert_eq!(
            boot_footprint(&k, None, 32 * MIB),
            vec![0..MIB, 16 * MIB..32 * MIB]
        );
    }
}
