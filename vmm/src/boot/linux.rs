//! The Linux x86 boot protocol's "zero page" (`boot_params`) for the 64-bit entry.

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header, E820_MAX_ENTRIES_ZEROPAGE};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::{BootExtras, CAN_USE_HEAP, LOADER_TYPE_UNDEFINED};
use crate::memory::{layout, E820Entry};

/// The setup header's magic values for a kernel loaded from an ELF vmlinux, which has none.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// Leave the heap end just below the command line, as the boot protocol suggests.
const HEAP_END: u16 = 0xfe00;

pub(super) fn write_zero_page(
    mem: &GuestMemoryMmap,
    header: Option<setup_header>,
    cmdline_len: usize,
    extras: BootExtras,
    e820: &[E820Entry],
) -> Result<(), linux_loader::configurator::Error> {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = BOOT_FLAG_MAGIC;
        params.hdr.header = HDRS_MAGIC;
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.loadflags |= CAN_USE_HEAP;
    params.hdr.heap_end_ptr = HEAP_END;
    params.hdr.cmd_line_ptr = layout::CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(r) = extras.initrd {
        params.hdr.ramdisk_image = r.addr as u32;
        params.hdr.ramdisk_size = r.size as u32;
    }
    // Read by kernels of boot protocol 2.14 and later; older ones scan for the RSDP.
    params.acpi_rsdp_addr = extras.rsdp.unwrap_or(0);
    for (slot, e) in params.e820_table.iter_mut().zip(e820.iter().take(E820_MAX_ENTRIES_ZEROPAGE)) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind as u32 };
    }
    params.e820_entries = e820.len().min(E820_MAX_ENTRIES_ZEROPAGE) as u8;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(layout::ZERO_PAGE_START)),
        mem,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::e820_map;

    #[test]
    fn zero_page_carries_cmdline_initrd_and_e820() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let initrd = super::super::InitrdRegion { addr: 0x300_0000, size: 0x1234 };
        let extras = BootExtras { initrd: Some(initrd), rsdp: Some(0xe_0000) };
        write_zero_page(&mem, None, 42, extras, &e820_map(64 << 20)).unwrap();
        let p: boot_params = super::super::read_obj(&mem, layout::ZERO_PAGE_START);
        assert_eq!({ p.hdr.cmd_line_ptr }, layout::CMDLINE_START as u32);
        assert_eq!({ p.hdr.cmdline_size }, 42);
        assert_eq!({ p.hdr.ramdisk_image }, 0x300_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 0x1234);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!({ p.hdr.header }, HDRS_MAGIC);
        assert_eq!(p.e820_entries, 3);
        assert_eq!({ p.e820_table[2].addr }, layout::HIMEM_START);
        assert_eq!({ p.e820_table[2].r#type }, 1);
        assert_eq!({ p.e820_table[1].r#type }, 2);
    }
}
