//! The guest physical address map, guest RAM, and the E820 map that describes it.

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

/// Fixed guest-physical addresses used during boot. All sit in the first MiB, below the kernel.
pub mod layout {
    /// GDT and IDT for the boot CPU state.
    pub const GDT_START: u64 = 0x500;
    pub const IDT_START: u64 = 0x520;
    /// PVH `hvm_start_info`, its module list and its memory map.
    pub const PVH_INFO_START: u64 = 0x6000;
    pub const PVH_MODLIST_START: u64 = 0x6040;
    pub const PVH_MEMMAP_START: u64 = 0x6080;
    /// Linux "zero page" (`boot_params`).
    pub const ZERO_PAGE_START: u64 = 0x7000;
    pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
    /// Identity-mapped page tables: PML4, PDPT, then one PD per GiB.
    pub const PML4_START: u64 = 0x9000;
    pub const PDPTE_START: u64 = 0xa000;
    pub const PDE_START: u64 = 0xb000;
    /// Number of GiB identity-mapped for the 64-bit entry (covers kernel, zero page and cmdline).
    pub const IDENTITY_MAPPED_GIB: u64 = 4;
    pub const CMDLINE_START: u64 = 0x20000;
    pub const CMDLINE_MAX_SIZE: usize = 0x10000;
    /// The MP table lives in the last KiB of base memory, one of the places Linux scans for it.
    pub const MPTABLE_START: u64 = 0x9fc00;
    /// Reserved from the MP table to the end of the first MiB (EBDA, VGA, BIOS ROM).
    pub const EBDA_START: u64 = MPTABLE_START;
    /// ACPI tables fill the BIOS area, where Linux scans for the RSDP on 16-byte boundaries.
    pub const ACPI_TABLES_START: u64 = 0xe_0000;
    pub const ACPI_TABLES_END: u64 = HIMEM_START;
    pub const HIMEM_START: u64 = 0x10_0000;
    /// RAM stops here and resumes at 4 GiB; the gap holds device MMIO, the IOAPIC and the LAPIC.
    pub const MMIO_GAP_START: u64 = 0xc000_0000;
    pub const MMIO_GAP_END: u64 = 1 << 32;
    /// Where virtio-mmio windows are placed, one page each.
    pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
    pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
    pub const IOAPIC_START: u64 = 0xfec0_0000;
    pub const APIC_START: u64 = 0xfee0_0000;
    /// KVM needs three pages for the TSS and one for the identity map on Intel, inside the gap.
    pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
    pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
}

use layout::*;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--mem {0} MiB is too small: nvmm needs at least {MIN_MEM_MIB} MiB")]
    TooSmall(u64),
    #[error("--mem {mib} MiB is more than this host's {host_mib} MiB of RAM")]
    TooLarge { mib: u64, host_mib: u64 },
    #[error("cannot allocate {0} MiB of guest memory: {1}")]
    Allocate(u64, String),
}

pub const MIN_MEM_MIB: u64 = 16;

/// Guest RAM ranges for `size` bytes: below the MMIO gap first, the rest above 4 GiB.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, usize)> {
    let low = size.min(MMIO_GAP_START);
    let mut ranges = vec![(GuestAddress(0), low as usize)];
    if size > low {
        ranges.push((GuestAddress(MMIO_GAP_END), (size - low) as usize));
    }
    ranges
}

/// How guest RAM is backed: `--thp`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Thp {
    /// 2 MiB-aligned and `MADV_HUGEPAGE`, as QEMU and Cloud Hypervisor back guest RAM.
    #[default]
    On,
    /// The host's default page size, and whatever the host's THP setting gives unasked.
    Off,
}

/// A transparent huge page on x86-64, and the alignment guest RAM needs for KVM to map it whole.
pub const HUGE_PAGE: u64 = 2 << 20;

/// Allocates guest RAM after checking the size against what the host has.
pub fn create(size: u64, thp: Thp) -> Result<GuestMemoryMmap, Error> {
    let mib = size >> 20;
    if mib < MIN_MEM_MIB {
        return Err(Error::TooSmall(mib));
    }
    if let Some(host_mib) = host_mem_mib() {
        if mib > host_mib {
            return Err(Error::TooLarge { mib, host_mib });
        }
    }
    let mem = match thp {
        Thp::Off => GuestMemoryMmap::from_ranges(&ram_ranges(size)).map_err(|e| Error::Allocate(mib, e.to_string()))?,
        Thp::On => {
            let mut regions = Vec::new();
            for (addr, len) in ram_ranges(size) {
                regions.push(huge_page_region(addr, len).map_err(|e| Error::Allocate(mib, e))?);
            }
            GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Allocate(mib, e.to_string()))?
        }
    };
    leave_out_of_core_dumps(&mem);
    Ok(mem)
}

/// One RAM region on transparent huge pages. KVM maps a guest page with one 2 MiB nested page
/// table entry only when the host backs it with a huge page at the same offset within 2 MiB, so
/// the mapping starts on a 2 MiB boundary (as the guest addresses of RAM regions do): a guest's
/// first touch of fresh memory is then one nested page fault per 2 MiB instead of per 4 KiB, and
/// at depth each one is a round trip through every KVM below. The kernel aligns large anonymous
/// mappings by itself only since Linux 6.7 and only for some lengths, hence the reservation.
///
/// The mapping is never unmapped: nvmm builds one VM per process, and guest memory is shared with
/// every vCPU and device thread for the life of it.
fn huge_page_region(addr: GuestAddress, len: usize) -> Result<GuestRegionMmap, String> {
    let huge = HUGE_PAGE as usize;
    let (prot, flags) = (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE);
    let reserved = len + huge;
    // SAFETY: a new anonymous mapping at an address of the kernel's choosing: nothing else is
    // touched.
    let base = unsafe { libc::mmap(std::ptr::null_mut(), reserved, prot, flags, -1, 0) };
    if base == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error().to_string());
    }
    let start = (base as usize).next_multiple_of(huge);
    let (head, tail) = (start - base as usize, reserved - len - (start - base as usize));
    // SAFETY: both ranges are the unaligned ends of the mapping just made, which nothing uses.
    unsafe {
        if head > 0 {
            libc::munmap(base, head);
        }
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
    }
    // SAFETY: MADV_HUGEPAGE on the mapping made above changes only how its pages are backed.
    // Without THP in the host kernel it fails (EINVAL) and the pages stay 4 KiB, which is fine.
    if unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) } != 0 {
        log::debug!("guest RAM stays on 4 KiB pages: madvise(MADV_HUGEPAGE): {}", std::io::Error::last_os_error());
    }
    // SAFETY: `start` and `len` are exactly the part of the mapping left above, which is never
    // unmapped (see the function's comment), so it stays valid for as long as the region lives.
    let mapping = unsafe { MmapRegionBuilder::new(len).with_raw_mmap_pointer(start as *mut u8) }
        .with_mmap_prot(prot)
        .with_mmap_flags(flags)
        .build()
        .map_err(|e| e.to_string())?;
    GuestRegionMmap::new(mapping, addr).ok_or_else(|| format!("region at {:#x} overflows", addr.0))
}

/// Marks guest RAM `MADV_DONTDUMP`: a core dump of nvmm (after a panic, with panic=abort) would
/// otherwise hold all of the guest's memory, which is the guest's data and may be gigabytes.
fn leave_out_of_core_dumps(mem: &GuestMemoryMmap) {
    use vm_memory::{GuestMemoryRegion, MemoryRegionAddress};
    for region in mem.iter() {
        let Ok(ptr) = region.get_host_address(MemoryRegionAddress(0)) else { continue };
        let len = region.len() as usize;
        // SAFETY: the range is exactly one mapping that vm-memory made and keeps for as long as
        // `mem` lives; MADV_DONTDUMP changes only what a core dump includes.
        if unsafe { libc::madvise(ptr.cast(), len, libc::MADV_DONTDUMP) } != 0 {
            log::warn!("guest RAM will appear in core dumps: madvise: {}", std::io::Error::last_os_error());
        }
    }
}

fn host_mem_mib() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib >> 10)
}

/// Total guest RAM in bytes.
pub fn size(mem: &GuestMemoryMmap) -> u64 {
    mem.iter().map(vm_memory::GuestMemoryRegion::len).sum()
}

/// The end of RAM below the MMIO gap.
pub fn low_mem_end(size: u64) -> u64 {
    size.min(MMIO_GAP_START)
}

/// How much host memory the VMM used: its peak RSS and, of that, the guest RAM pages touched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostUsage {
    pub peak_rss_kib: u64,
    pub guest_touched_kib: u64,
}

impl HostUsage {
    /// The VMM's own memory: what it held at its peak beyond the guest's RAM.
    pub fn overhead_kib(&self) -> u64 {
        self.peak_rss_kib.saturating_sub(self.guest_touched_kib)
    }
}

/// Reads this process's peak RSS and the resident size of the guest RAM mappings.
pub fn host_usage(mem: &GuestMemoryMmap) -> Option<HostUsage> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let starts: Vec<u64> = mem.iter().map(|r| r.as_ptr() as u64).collect();
    Some(HostUsage { peak_rss_kib: status_kib(&status, "VmHWM:")?, guest_touched_kib: rss_of_mappings(&smaps, &starts) })
}

fn status_kib(status: &str, key: &str) -> Option<u64> {
    status.lines().find(|l| l.starts_with(key))?.split_whitespace().nth(1)?.parse().ok()
}

/// Sums the `Rss:` of the smaps entries whose mapping starts at one of `starts`.
fn rss_of_mappings(smaps: &str, starts: &[u64]) -> u64 {
    let mut in_guest = false;
    let mut total = 0;
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, _)) = first.split_once('-').filter(|(a, _)| a.chars().all(|c| c.is_ascii_hexdigit())) {
            in_guest = u64::from_str_radix(start, 16).is_ok_and(|a| starts.contains(&a));
        } else if in_guest && line.starts_with("Rss:") {
            total += line.split_whitespace().nth(1).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
        }
    }
    total
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    Ram = 1,
    Reserved = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Kind,
}

/// The E820 map for `size` bytes of RAM: base memory, the reserved EBDA/BIOS area, RAM from
/// 1 MiB to the MMIO gap, and RAM above 4 GiB.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let entry = |addr, size, kind| E820Entry { addr, size, kind };
    let mut map = vec![
        entry(0, EBDA_START, E820Kind::Ram),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820Kind::Reserved),
    ];
    let low_end = low_mem_end(size);
    if low_end > HIMEM_START {
        map.push(entry(HIMEM_START, low_end - HIMEM_START, E820Kind::Ram));
    }
    if size > low_end {
        map.push(entry(MMIO_GAP_END, size - low_end, E820Kind::Ram));
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `VmFlags:` of the mapping that starts at `start`, from /proc/self/smaps.
    fn vm_flags(start: usize) -> Vec<String> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&format!("{start:x}-")));
        assert!(lines.next().is_some(), "guest RAM mapping at {start:#x} not in smaps");
        let flags = lines.find(|l| l.starts_with("VmFlags:")).unwrap();
        flags.split_whitespace().skip(1).map(str::to_string).collect()
    }

    fn host_starts(mem: &GuestMemoryMmap) -> Vec<usize> {
        use vm_memory::{GuestMemoryRegion, MemoryRegionAddress};
        mem.iter().map(|r| r.get_host_address(MemoryRegionAddress(0)).unwrap() as usize).collect()
    }

    #[test]
    fn guest_ram_is_left_out_of_core_dumps() {
        for thp in [Thp::On, Thp::Off] {
            let mem = create(64 << 20, thp).unwrap();
            let flags = vm_flags(host_starts(&mem)[0]);
            assert!(flags.iter().any(|f| f == "dd"), "{thp:?}: {flags:?}");
        }
    }

    /// With THP on, each RAM region starts on a 2 MiB boundary and is advised for huge pages, so
    /// that KVM can map it with 2 MiB entries; a size that is not a multiple of 2 MiB (which the
    /// kernel would not align by itself) included. Off, it is not advised.
    #[test]
    fn guest_ram_on_huge_pages_is_aligned_and_advised() {
        use vm_memory::{Bytes, GuestMemoryRegion};
        for size in [(64 << 20) + (1 << 20), 17 << 20] {
            let mem = create(size, Thp::On).unwrap();
            assert_eq!(self::size(&mem), size);
            for (start, region) in host_starts(&mem).into_iter().zip(mem.iter()) {
                assert_eq!(start as u64 % HUGE_PAGE, 0, "{size:#x}: region at {start:#x}");
                assert_eq!(region.start_addr().0 % HUGE_PAGE, 0);
                if crate::host::HostFs::real().read(crate::host::SYS_THP_ENABLED).is_some() {
                    assert!(vm_flags(start).iter().any(|f| f == "hg"), "{size:#x}: {:?}", vm_flags(start));
                }
            }
            // The whole of it is usable, to the last byte.
            mem.write_obj(0xa5u8, GuestAddress(size - 1)).unwrap();
            assert_eq!(mem.read_obj::<u8>(GuestAddress(size - 1)).unwrap(), 0xa5);
        }
        let mem = create(64 << 20, Thp::Off).unwrap();
        assert!(!vm_flags(host_starts(&mem)[0]).iter().any(|f| f == "hg"));
    }

    #[test]
    fn small_guest_has_no_high_ram() {
        let map = e820_map(256 << 20);
        assert_eq!(map.len(), 3);
        assert_eq!(map[0], E820Entry { addr: 0, size: 0x9fc00, kind: E820Kind::Ram });
        assert_eq!(map[1].kind, E820Kind::Reserved);
        assert_eq!(map[2], E820Entry { addr: 0x100000, size: (256 << 20) - 0x100000, kind: E820Kind::Ram });
        assert_eq!(ram_ranges(256 << 20), vec![(GuestAddress(0), 256 << 20)]);
    }

    #[test]
    fn large_guest_skips_the_mmio_gap() {
        let size = 5u64 << 30;
        let map = e820_map(size);
        assert_eq!(map[2].addr + map[2].size, MMIO_GAP_START);
        assert_eq!(map[3], E820Entry { addr: 1 << 32, size: size - MMIO_GAP_START, kind: E820Kind::Ram });
        let ram: u64 = map.iter().filter(|e| e.kind == E820Kind::Ram).map(|e| e.size).sum();
        assert_eq!(ram, size - (HIMEM_START - EBDA_START));
        let ranges = ram_ranges(size);
        assert_eq!(ranges[1], (GuestAddress(1 << 32), (size - MMIO_GAP_START) as usize));
        // No RAM range may overlap the devices' windows.
        for (start, len) in ranges {
            let end = start.0 + len as u64;
            assert!(end <= VIRTIO_MMIO_START || start.0 >= MMIO_GAP_END);
        }
    }

    #[test]
    fn guest_rss_comes_from_the_guest_mappings_only() {
        let smaps = "7f0000000000-7f0010000000 rw-p 00000000 00:00 0\nSize: 262144 kB\nRss: 1200 kB\n\
                     55d000000000-55d000100000 r-xp 00000000 08:01 1 /usr/bin/nvmm\nRss: 900 kB\n";
        assert_eq!(rss_of_mappings(smaps, &[0x7f00_0000_0000]), 1200);
        assert_eq!(rss_of_mappings(smaps, &[0x1234]), 0);
        assert_eq!(status_kib("Name: nvmm\nVmHWM:\t  5000 kB\n", "VmHWM:"), Some(5000));
        let u = HostUsage { peak_rss_kib: 5000, guest_touched_kib: 1200 };
        assert_eq!(u.overhead_kib(), 3800);
    }

    #[test]
    fn touching_guest_memory_shows_in_its_rss() {
        use vm_memory::Bytes;
        let mem = create(32 << 20, Thp::On).unwrap();
        let before = host_usage(&mem).unwrap();
        mem.write_slice(&vec![1u8; 8 << 20], GuestAddress(0)).unwrap();
        let after = host_usage(&mem).unwrap();
        assert!(after.guest_touched_kib >= before.guest_touched_kib + 8 * 1024, "{before:?} {after:?}");
        assert!(after.peak_rss_kib >= after.guest_touched_kib);
    }

    #[test]
    fn sizes_are_checked() {
        assert!(matches!(create(1 << 20, Thp::On), Err(Error::TooSmall(1))));
        assert!(matches!(create(1 << 50, Thp::On), Err(Error::TooLarge { .. })));
        assert!(create(32 << 20, Thp::On).is_ok());
    }
}
