//! The PVH boot protocol's `hvm_start_info`, module list (the initrd) and memory map.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap};

use super::BootExtras;
use crate::memory::{layout, E820Entry};

const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// Version 1 of the start info adds `memmap_paddr`/`memmap_entries`, which Linux reads.
const START_INFO_VERSION: u32 = 1;
// The memory map (at most 4 entries of 24 bytes) must fit below the zero page.
const _: () = assert!(layout::PVH_MEMMAP_START + 4 * 24 <= layout::ZERO_PAGE_START);

// linux-loader's PVH structs are plain C data but do not implement `ByteValued`; these wrappers let
// the configurator write them.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: each wraps a `repr(C)` struct of integers with no padding that any bit pattern fits.
unsafe impl ByteValued for StartInfo {}
// SAFETY: as above.
unsafe impl ByteValued for MemmapEntry {}
// SAFETY: as above.
unsafe impl ByteValued for ModlistEntry {}

pub(super) fn write_start_info(
    mem: &GuestMemoryMmap,
    extras: BootExtras,
    e820: &[E820Entry],
) -> Result<(), linux_loader::configurator::Error> {
    let initrd = extras.initrd;
    let info = StartInfo(hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: START_INFO_VERSION,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() { layout::PVH_MODLIST_START } else { 0 },
        cmdline_paddr: layout::CMDLINE_START,
        memmap_paddr: layout::PVH_MEMMAP_START,
        memmap_entries: e820.len() as u32,
        rsdp_paddr: extras.rsdp.unwrap_or(0),
        ..Default::default()
    });
    let memmap: Vec<MemmapEntry> = e820
        .iter()
        .map(|e| MemmapEntry(hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind as u32, reserved: 0 }))
        .collect();
    let mut params = BootParams::new(&info, GuestAddress(layout::PVH_INFO_START));
    params.set_sections(&memmap, GuestAddress(layout::PVH_MEMMAP_START));
    if let Some(r) = initrd {
        let module = ModlistEntry(hvm_modlist_entry { paddr: r.addr, size: r.size, ..Default::default() });
        params.set_modules(&[module], GuestAddress(layout::PVH_MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams(&params, mem)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::e820_map;

    #[test]
    fn start_info_points_at_memmap_cmdline_and_initrd() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let initrd = super::super::InitrdRegion { addr: 0x200_0000, size: 0x5000 };
        let extras = BootExtras { initrd: Some(initrd), rsdp: Some(0xe_0000) };
        write_start_info(&mem, extras, &e820_map(64 << 20)).unwrap();
        let info: StartInfo = super::super::read_obj(&mem, layout::PVH_INFO_START);
        assert_eq!(info.0.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.0.cmdline_paddr, layout::CMDLINE_START);
        assert_eq!(info.0.memmap_entries, 3);
        assert_eq!(info.0.nr_modules, 1);
        assert_eq!(info.0.rsdp_paddr, 0xe_0000);
        let m: ModlistEntry = super::super::read_obj(&mem, layout::PVH_MODLIST_START);
        assert_eq!((m.0.paddr, m.0.size), (0x200_0000, 0x5000));
        let e: MemmapEntry = super::super::read_obj(&mem, layout::PVH_MEMMAP_START + 2 * 24);
        assert_eq!((e.0.addr, e.0.type_), (layout::HIMEM_START, 1));
    }
}
