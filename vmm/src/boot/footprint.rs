//! Where a freshly loaded kernel touches memory first: the boot structures in the first MiB, the
//! image nvmm loaded, the initrd, for a bzImage the buffer it decompresses itself into
//! (`init_size` bytes from where its 64-bit entry code puts the kernel), and for Linux the top of
//! RAM, where its early allocator works down from. nvmm maps these in KVM's page tables before the
//! first `KVM_RUN` (`prefault.rs`): otherwise the guest's first touch of each page is an exit, and
//! at depth each such exit is a round trip through every KVM below. The rest of RAM is left to be
//! faulted in when the guest uses it.

use std::ops::Range;

use linux_loader::loader::bootparam::setup_header;

use super::{Entry, InitrdRegion, LoadedKernel, BOOT_PROTOCOL_INIT_SIZE, PAGE_SIZE};
use crate::memory::{self, layout};

/// Linux's memory sections (x86-64 `SECTION_SIZE_BITS` = 27): its `struct page` array covers RAM
/// in whole sections.
const LINUX_SECTION: u64 = 128 << 20;
/// One 64-byte `struct page` for each 4 KiB page.
const LINUX_STRUCT_PAGE_PER_PAGE: u64 = 4096 / 64;
/// What else Linux's early allocator takes from the top of RAM in a small guest besides the
/// `struct page` array: per-CPU areas, the dentry and inode hash tables, page tables, the log
/// buffer (measured: about 2 MiB with 96 and 384 MiB of RAM).
const LINUX_EARLY_ALLOCATIONS: u64 = 2 << 20;
/// At most this much from the top of RAM, so that start-up does not grow with the guest's RAM
/// (a 64 GiB guest's `struct page` array alone is 1 GiB); the rest faults in as it would have.
const LINUX_TOP_MAX: u64 = 64 << 20;

/// The guest-physical ranges a boot touches first, page aligned, sorted, merged, and within RAM.
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
    let ram: Vec<Range<u64>> = memory::ram_ranges(mem_size)
        .iter()
        .map(|(start, len)| start.0..start.0 + *len as u64)
        .collect();
    if !matches!(kernel.entry, Entry::Multiboot { .. }) {
        ranges.extend(linux_early_allocations(&ram, mem_size, initrd));
    }
    normalize(ranges, &ram)
}

/// Where Linux's early allocator (memblock, top-down) puts the `struct page` array and its other
/// first allocations: just below the top of RAM, or below the initrd when the initrd ends there
/// (it stays reserved until it is unpacked).
fn linux_early_allocations(
    ram: &[Range<u64>],
    mem_size: u64,
    initrd: Option<InitrdRegion>,
) -> Option<Range<u64>> {
    let last = ram.last()?;
    let top = match initrd {
        Some(r) if r.addr.saturating_add(r.size) + PAGE_SIZE > last.end => r.addr,
        _ => last.end,
    };
    let size = (mem_size.next_multiple_of(LINUX_SECTION) / LINUX_STRUCT_PAGE_PER_PAGE
        + LINUX_EARLY_ALLOCATIONS)
        .min(LINUX_TOP_MAX);
    Some(top.saturating_sub(size).max(last.start)..top)
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

/// Rounds each range out to whole pages, keeps the parts inside `ram`, and merges those that
/// overlap or touch.
fn normalize(ranges: Vec<Range<u64>>, ram: &[Range<u64>]) -> Vec<Range<u64>> {
    let mut ranges: Vec<Range<u64>> = ranges
        .iter()
        .map(|r| {
            (r.start & !(PAGE_SIZE - 1))..(r.end.saturating_add(PAGE_SIZE - 1) & !(PAGE_SIZE - 1))
        })
        .flat_map(|r| {
            ram.iter()
                .map(move |m| r.start.max(m.start)..r.end.min(m.end))
        })
        .filter(|r| r.start < r.end)
        .collect();
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
    fn a_bzimage_touches_low_memory_its_image_its_buffer_the_initrd_and_below_it() {
        let initrd = InitrdRegion {
            addr: 94 * MIB + 0x1000,
            size: 2 * MIB - 0x1000 - 10,
        };
        let got = boot_footprint(&bzimage(false, 0xe2_f000), Some(initrd), 96 * MIB);
        // Low memory and the loaded image touch at 1 MiB and merge; the image's end rounds up.
        // Below the initrd: one 128 MiB section's struct pages (2 MiB) and 2 MiB more.
        assert_eq!(
            got,
            vec![
                0..4 * MIB + PAGE_SIZE,
                16 * MIB..16 * MIB + 0xe2_f000,
                initrd.addr - 4 * MIB..96 * MIB
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
            vec![0..MIB, 33 * MIB..34 * MIB + MIB, 250 * MIB..256 * MIB],
            "2 MiB aligned up from 33 MiB is 34 MiB; 4 MiB of struct pages and 2 MiB at the top"
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
            vec![0..4 * MIB + PAGE_SIZE, 92 * MIB..96 * MIB]
        );
        k.result.setup_header = None;
        k.result.kernel_load = GuestAddress(16 * MIB);
        k.result.kernel_end = 40 * MIB;
        assert_eq!(
            boot_footprint(&k, None, 32 * MIB),
            vec![0..MIB, 16 * MIB..32 * MIB]
        );
    }

    #[test]
    fn above_the_mmio_gap_the_top_of_ram_is_the_top_of_high_ram() {
        let initrd = InitrdRegion {
            addr: 3072 * MIB - 2 * MIB,
            size: 2 * MIB,
        };
        let got = boot_footprint(&bzimage(false, 0x10_0000), Some(initrd), 4608 * MIB);
        // 4.5 GiB is 36 sections: 72 MiB of struct pages and 2 MiB more, cut to 64 MiB, below
        // 5.5 GiB.
        let top = (4096 + 1536) * MIB;
        assert_eq!(
            got,
            vec![
                0..4 * MIB + PAGE_SIZE,
                16 * MIB..17 * MIB,
                initrd.addr..3072 * MIB,
                top - 64 * MIB..top
            ]
        );
    }

    #[test]
    fn a_multiboot_kernel_gets_no_linux_guesses() {
        let mut k = bzimage(false, 0x10_0000);
        k.result.setup_header = None;
        k.entry = Entry::Multiboot { rip: 2 * MIB };
        assert_eq!(
            boot_footprint(&k, None, 64 * MIB),
            vec![0..4 * MIB + PAGE_SIZE]
        );
    }
}
