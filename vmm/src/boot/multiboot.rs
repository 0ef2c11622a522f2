//! Multiboot (version 1) kernels, such as kvm-unit-tests' `.flat` files: finding the header,
//! loading the image (ELF32 program headers, or the header's own load addresses), and the
//! Multiboot information structure the kernel finds through EBX.
//!
//! The kernel is entered in 32-bit protected mode with paging off and flat segments (the PVH
//! entry's CPU state), EAX = [`BOOTLOADER_MAGIC`], EBX = [`INFO_START`].

use std::path::{Path, PathBuf};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::InitrdRegion;
use crate::memory::{self, layout, E820Entry};

/// The header's magic, and what EAX holds at the kernel's entry.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
pub const BOOTLOADER_MAGIC: u32 = 0x2bad_b002;
/// The header must lie, 4-byte aligned, in the file's first 8 KiB.
pub const SEARCH_LIMIT: usize = 8192;
/// Where the information structure, its memory map and module list go: the PVH start info's
/// place, free here because a kernel is entered through one protocol only.
pub const INFO_START: u64 = layout::PVH_INFO_START;
const MMAP_START: u64 = INFO_START + 0x100;
const MODS_START: u64 = INFO_START + 0x200;
const LOADER_NAME_START: u64 = INFO_START + 0x240;
const LOADER_NAME: &[u8] = b"nvmm\0";
/// The kernel's command line and, after it, the module's string.
const CMDLINE_START: u64 = layout::CMDLINE_START;
const CMDLINE_SPACE: usize = layout::CMDLINE_MAX_SIZE;
// The structure, memory map, module list and loader name all fit below the zero page.
const _: () = assert!(LOADER_NAME_START + LOADER_NAME.len() as u64 <= layout::ZERO_PAGE_START);

/// Header flags. Bits 0-15 are requirements a loader that does not know them must refuse.
const FLAG_PAGE_ALIGN_MODULES: u32 = 1 << 0;
const FLAG_MEMORY_INFO: u32 = 1 << 1;
/// A video mode request; nvmm has no framebuffer and, like QEMU, boots the kernel anyway.
const FLAG_VIDEO_MODE: u32 = 1 << 2;
const FLAGS_KNOWN_REQUIRED: u32 = FLAG_PAGE_ALIGN_MODULES | FLAG_MEMORY_INFO | FLAG_VIDEO_MODE;
const FLAGS_REQUIRED: u32 = 0xffff;
/// The header carries load addresses ("a.out kludge"): they take precedence over an ELF's.
const FLAG_ADDRESSES: u32 = 1 << 16;

/// Information structure flags: which of its fields are valid.
const INFO_MEMORY: u32 = 1 << 0;
const INFO_CMDLINE: u32 = 1 << 2;
const INFO_MODS: u32 = 1 << 3;
const INFO_MMAP: u32 = 1 << 6;
const INFO_LOADER_NAME: u32 = 1 << 9;
const INFO_SIZE: usize = 88;
/// One memory map entry: its size field (which does not count itself), base, length, type.
const MMAP_ENTRY_SIZE: u32 = 24;

const ELFCLASS32: u8 = 1;
const ELFDATA2LSB: u8 = 1;
const EM_386: u16 = 3;
const PT_LOAD: u32 = 1;
const ELF32_EHDR_SIZE: usize = 52;
const ELF32_PHDR_SIZE: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Multiboot kernel {path}: the header at offset {offset:#x} has a checksum that does not add up (magic + flags + checksum must be 0)")]
    Checksum { path: PathBuf, offset: usize },
    #[error("Multiboot kernel {path}: header flags {flags:#x} require features nvmm does not offer (bits {unknown:#x})")]
    Flags { path: PathBuf, flags: u32, unknown: u32 },
    #[error("Multiboot kernel {path}: {reason}")]
    Image { path: PathBuf, reason: &'static str },
    #[error("Multiboot kernel {path}: {what} {start:#x}-{end:#x} lies outside guest RAM from 1 MiB to {ram_end:#x}")]
    Outside { path: PathBuf, what: &'static str, start: u64, end: u64, ram_end: u64 },
    #[error("Multiboot command line and module name are {len} bytes; at most {max} fit")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("cannot write the Multiboot information: {0}")]
    Write(#[source] vm_memory::GuestMemoryError),
}

/// A Multiboot header as found in the file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Its offset in the file.
    pub offset: usize,
    pub flags: u32,
    header_addr: u32,
    load_addr: u32,
    load_end_addr: u32,
    bss_end_addr: u32,
    entry_addr: u32,
}

/// Where the kernel went: its entry point and the end of everything it occupies (bss included).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loaded {
    pub entry: u32,
    pub start: u64,
    pub end: u64,
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off.checked_add(4)?)?.try_into().ok()?))
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off.checked_add(2)?)?.try_into().ok()?))
}

/// Looks for the header in the first 8 KiB of `image`: None if no magic is there at all; an error
/// if magic is there but no candidate's checksum adds up, or its required flags are unknown.
pub fn find_header(path: &Path, image: &[u8]) -> Result<Option<Header>, Error> {
    let mut bad_checksum = None;
    let limit = image.len().min(SEARCH_LIMIT);
    for offset in (0..limit.saturating_sub(11)).step_by(4) {
        let word = |i: usize| u32_at(image, offset + 4 * i).unwrap_or(0);
        if word(0) != HEADER_MAGIC {
            continue;
        }
        let flags = word(1);
        if HEADER_MAGIC.wrapping_add(flags).wrapping_add(word(2)) != 0 {
            bad_checksum.get_or_insert(offset);
            continue;
        }
        let unknown = flags & FLAGS_REQUIRED & !FLAGS_KNOWN_REQUIRED;
        if unknown != 0 {
            return Err(Error::Flags { path: path.into(), flags, unknown });
        }
        let header = Header {
            offset,
            flags,
            header_addr: word(3),
            load_addr: word(4),
            load_end_addr: word(5),
            bss_end_addr: word(6),
            entry_addr: word(7),
        };
        if flags & FLAG_ADDRESSES != 0 && image.len() < offset + 32 {
            return Err(Error::Image { path: path.into(), reason: "the header's address fields are cut off" });
        }
        return Ok(Some(header));
    }
    match bad_checksum {
        Some(offset) => Err(Error::Checksum { path: path.into(), offset }),
        None => Ok(None),
    }
}

/// One piece of the image to copy: `file` bytes from `offset` in the file to `addr`, then zeroes
/// up to `mem_size`.
struct Segment {
    addr: u64,
    offset: usize,
    file_size: usize,
    mem_size: u64,
}

/// Loads the kernel described by `header` from `image` into `mem`.
pub fn load(mem: &GuestMemoryMmap, path: &Path, image: &[u8], header: &Header) -> Result<Loaded, Error> {
    let (entry, segments) = if header.flags & FLAG_ADDRESSES != 0 {
        address_segments(path, image, header)?
    } else {
        elf32_segments(path, image)?
    };
    let ram_end = memory::low_mem_end(memory::size(mem));
    let (mut start, mut end) = (u64::MAX, 0u64);
    // Every segment is checked before any is written: nvmm's own boot tables sit below 1 MiB.
    for s in &segments {
        let seg_end = s.addr + s.mem_size;
        if s.addr < layout::HIMEM_START || seg_end > ram_end {
            return Err(Error::Outside { path: path.into(), what: "segment", start: s.addr, end: seg_end, ram_end });
        }
        (start, end) = (start.min(s.addr), end.max(seg_end));
    }
    for s in &segments {
        mem.write_slice(&image[s.offset..s.offset + s.file_size], GuestAddress(s.addr)).map_err(Error::Write)?;
        let zeroes = vec![0u8; (s.mem_size - s.file_size as u64) as usize];
        mem.write_slice(&zeroes, GuestAddress(s.addr + s.file_size as u64)).map_err(Error::Write)?;
    }
    if segments.is_empty() {
        return Err(Error::Image { path: path.into(), reason: "nothing to load (no PT_LOAD segment)" });
    }
    if !(start..end).contains(&u64::from(entry)) {
        return Err(Error::Outside { path: path.into(), what: "entry point", start: entry.into(), end: u64::from(entry) + 1, ram_end });
    }
    Ok(Loaded { entry, start, end })
}

/// The a.out kludge: the file from `header_addr - load_addr` before the header is loaded at
/// `load_addr`, up to `load_end_addr` (or the file's end), then zeroed up to `bss_end_addr`.
fn address_segments(path: &Path, image: &[u8], h: &Header) -> Result<(u32, Vec<Segment>), Error> {
    let bad = |reason| Error::Image { path: path.into(), reason };
    if h.load_addr > h.header_addr {
        return Err(bad("load_addr lies above header_addr"));
    }
    let offset = h
        .offset
        .checked_sub((h.header_addr - h.load_addr) as usize)
        .ok_or_else(|| bad("load_addr starts before the file does"))?;
    let file_size = if h.load_end_addr == 0 {
        image.len() - offset
    } else {
        let size = h.load_end_addr.checked_sub(h.load_addr).ok_or_else(|| bad("load_end_addr lies below load_addr"))?;
        size as usize
    };
    if offset + file_size > image.len() {
        return Err(bad("load_end_addr lies past the end of the file"));
    }
    let loaded_end = u64::from(h.load_addr) + file_size as u64;
    let mem_end = if h.bss_end_addr == 0 { loaded_end } else { u64::from(h.bss_end_addr) };
    if mem_end < loaded_end {
        return Err(bad("bss_end_addr lies below load_end_addr"));
    }
    let segment = Segment { addr: h.load_addr.into(), offset, file_size, mem_size: mem_end - u64::from(h.load_addr) };
    Ok((h.entry_addr, vec![segment]))
}

/// An ELF32 i386 executable's PT_LOAD segments, at their physical addresses.
fn elf32_segments(path: &Path, image: &[u8]) -> Result<(u32, Vec<Segment>), Error> {
    let bad = |reason| Error::Image { path: path.into(), reason };
    if image.len() < ELF32_EHDR_SIZE || &image[..4] != b"\x7fELF" {
        return Err(bad("neither an ELF32 executable nor a header with load addresses (flag bit 16)"));
    }
    if image[4] != ELFCLASS32 || image[5] != ELFDATA2LSB || u16_at(image, 18) != Some(EM_386) {
        return Err(bad("not a little-endian ELF32 i386 executable"));
    }
    let truncated = || bad("its program headers lie past the end of the file");
    let entry = u32_at(image, 24).ok_or_else(truncated)?;
    let phoff = u32_at(image, 28).ok_or_else(truncated)? as usize;
    let phentsize = usize::from(u16_at(image, 42).ok_or_else(truncated)?);
    let phnum = usize::from(u16_at(image, 44).ok_or_else(truncated)?);
    if phentsize < ELF32_PHDR_SIZE && phnum > 0 {
        return Err(bad("its program header entries are too small"));
    }
    let mut segments = Vec::new();
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let field = |n: usize| u32_at(image, ph + 4 * n).ok_or_else(truncated);
        if field(0)? != PT_LOAD || field(5)? == 0 {
            continue;
        }
        let (offset, paddr, file_size, mem_size) = (field(1)? as usize, field(3)?, field(4)? as usize, field(5)?);
        if file_size as u64 > u64::from(mem_size) {
            return Err(bad("a segment's file size exceeds its memory size"));
        }
        if offset.checked_add(file_size).is_none_or(|end| end > image.len()) {
            return Err(bad("a segment lies past the end of the file"));
        }
        segments.push(Segment { addr: paddr.into(), offset, file_size, mem_size: mem_size.into() });
    }
    Ok((entry, segments))
}

/// Where the one module (the initrd) goes: after the kernel, page aligned, as QEMU puts it.
pub fn module_address(kernel_end: u64) -> u64 {
    kernel_end.next_multiple_of(4096)
}

/// Writes the information structure: memory sizes and map, the command line (`kernel_path`, then
/// `cmdline`, as QEMU writes it), the initrd as the one module, and the loader's name.
pub fn write_info(
    mem: &GuestMemoryMmap,
    kernel_path: &Path,
    cmdline: &str,
    initrd: Option<(&Path, InitrdRegion)>,
    e820: &[E820Entry],
) -> Result<(), Error> {
    let mut strings = Vec::new();
    let kernel_cmdline = if cmdline.is_empty() {
        kernel_path.display().to_string()
    } else {
        format!("{} {cmdline}", kernel_path.display())
    };
    strings.extend(kernel_cmdline.as_bytes());
    strings.push(0);
    let module_string = CMDLINE_START + strings.len() as u64;
    if let Some((path, _)) = initrd {
        strings.extend(path.display().to_string().as_bytes());
        strings.push(0);
    }
    if strings.len() > CMDLINE_SPACE {
        return Err(Error::CmdlineTooLong { len: strings.len(), max: CMDLINE_SPACE });
    }
    let w = |bytes: &[u8], addr: u64| mem.write_slice(bytes, GuestAddress(addr)).map_err(Error::Write);
    w(&strings, CMDLINE_START)?;

    let mut mmap = Vec::new();
    for e in e820 {
        mmap.extend((MMAP_ENTRY_SIZE - 4).to_le_bytes());
        mmap.extend(e.addr.to_le_bytes());
        mmap.extend(e.size.to_le_bytes());
        mmap.extend((e.kind as u32).to_le_bytes());
    }
    w(&mmap, MMAP_START)?;
    w(LOADER_NAME, LOADER_NAME_START)?;

    // mem_lower: KiB of RAM from 0 (to the EBDA); mem_upper: KiB from 1 MiB to the first hole.
    let ram_at = |addr: u64| e820.iter().find(|e| e.addr == addr && e.kind == memory::E820Kind::Ram).map_or(0, |e| e.size);
    let mut flags = INFO_MEMORY | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME;
    let (mut mods_count, mut mods_addr) = (0u32, 0u32);
    if let Some((_, region)) = initrd {
        let module = [region.addr as u32, (region.addr + region.size) as u32, module_string as u32, 0];
        w(&module.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>(), MODS_START)?;
        (flags, mods_count, mods_addr) = (flags | INFO_MODS, 1, MODS_START as u32);
    }
    let mut info = [0u32; INFO_SIZE / 4];
    info[0] = flags;
    info[1] = (ram_at(0) >> 10) as u32;
    info[2] = (ram_at(layout::HIMEM_START) >> 10) as u32;
    info[3] = 0xffff_ffff; // boot_device: none, flag bit 1 stays clear
    info[4] = CMDLINE_START as u32;
    (info[5], info[6]) = (mods_count, mods_addr);
    (info[11], info[12]) = (mmap.len() as u32, MMAP_START as u32);
    info[16] = LOADER_NAME_START as u32;
    w(&info.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>(), INFO_START)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::memory::e820_map;

    fn mem(mib: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap()
    }

    fn header(flags: u32, addresses: [u32; 5]) -> Vec<u8> {
        let mut h = Vec::new();
        for v in [HEADER_MAGIC, flags, 0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags))] {
            h.extend(v.to_le_bytes());
        }
        if flags & FLAG_ADDRESSES != 0 {
            addresses.iter().for_each(|v| h.extend(v.to_le_bytes()));
        }
        h
    }

    /// A kernel with load addresses: the header at offset `at`, the file loaded from its start
    /// at 1 MiB, `code` right after the header, and 4 KiB of bss.
    pub fn address_kernel(at: usize, code: &[u8]) -> Vec<u8> {
        let load = 0x10_0000u32;
        let end = load + (at + 32 + code.len()) as u32;
        let mut img = vec![0u8; at];
        img.extend(header(FLAG_ADDRESSES, [load + at as u32, load, end, end + 4096, load + at as u32 + 32]));
        img.extend(code);
        img
    }

    /// An ELF32 kernel with its header in the first segment's data, loaded at `paddr`.
    pub fn elf32_kernel(paddr: u32, code: &[u8]) -> Vec<u8> {
        let mut data = header(0, [0; 5]);
        let entry = paddr + data.len() as u32;
        data.extend(code);
        let mut e = vec![0u8; 0x100];
        e[..8].copy_from_slice(&[0x7f, b'E', b'L', b'F', ELFCLASS32, ELFDATA2LSB, 1, 0]);
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&EM_386.to_le_bytes());
        e[24..28].copy_from_slice(&entry.to_le_bytes());
        e[28..32].copy_from_slice(&52u32.to_le_bytes()); // phoff
        e[42..44].copy_from_slice(&32u16.to_le_bytes());
        e[44..46].copy_from_slice(&1u16.to_le_bytes());
        let ph = [PT_LOAD, 0x100, paddr, paddr, data.len() as u32, data.len() as u32 + 0x2000, 7, 0x1000];
        for (i, v) in ph.iter().enumerate() {
            e[52 + 4 * i..56 + 4 * i].copy_from_slice(&v.to_le_bytes());
        }
        e.extend(data);
        e
    }

    fn load_image(m: &GuestMemoryMmap, img: &[u8]) -> Result<Loaded, Error> {
        let p = Path::new("k.flat");
        let h = find_header(p, img)?.ok_or(Error::Image { path: p.into(), reason: "no header" })?;
        load(m, p, img, &h)
    }

    #[test]
    fn elf32_segments_load_at_their_physical_address() {
        let m = mem(16);
        let k = load_image(&m, &elf32_kernel(0x40_0000, &[0xf4, 0x90])).unwrap();
        assert_eq!(k, Loaded { entry: 0x40_000c, start: 0x40_0000, end: 0x40_0000 + 14 + 0x2000 });
        assert_eq!(m.read_obj::<u32>(GuestAddress(0x40_0000)).unwrap(), HEADER_MAGIC);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x40_000c)).unwrap(), 0xf4);
    }

    #[test]
    fn load_addresses_take_the_file_from_load_addr() {
        let m = mem(16);
        m.write_obj(0xffu8, GuestAddress(0x10_1100)).unwrap(); // in the bss: must come back zeroed
        let k = load_image(&m, &address_kernel(0x100, &[0xf4])).unwrap();
        assert_eq!(k.entry, 0x10_0120);
        assert_eq!(k.end, 0x10_0121 + 4096);
        assert_eq!(m.read_obj::<u32>(GuestAddress(0x10_0100)).unwrap(), HEADER_MAGIC);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x10_0120)).unwrap(), 0xf4);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x10_1100)).unwrap(), 0);
    }

    #[test]
    fn a_header_past_8_kib_or_with_bad_magic_is_not_found() {
        let p = Path::new("k");
        assert!(find_header(p, &address_kernel(SEARCH_LIMIT - 32, &[0xf4])).unwrap().is_some());
        assert_eq!(find_header(p, &address_kernel(SEARCH_LIMIT, &[0xf4])).unwrap(), None);
        let mut img = address_kernel(0, &[0xf4]);
        img[0] ^= 1;
        assert_eq!(find_header(p, &img).unwrap(), None);
    }

    #[test]
    fn a_checksum_that_does_not_add_up_is_refused() {
        let mut img = address_kernel(0x40, &[0xf4]);
        img[0x48] ^= 1;
        let e = find_header(Path::new("k"), &img).unwrap_err();
        assert!(matches!(e, Error::Checksum { offset: 0x40, .. }), "{e}");
        assert!(e.to_string().contains("checksum that does not add up"), "{e}");
        let mut img = header(1 << 5, [0; 5]);
        img.extend([0; 32]);
        assert!(matches!(find_header(Path::new("k"), &img), Err(Error::Flags { unknown: 0x20, .. })));
    }

    #[test]
    fn segments_outside_guest_memory_are_refused() {
        let e = load_image(&mem(16), &elf32_kernel(0x100_0000, &[0xf4])).unwrap_err();
        assert!(matches!(e, Error::Outside { what: "segment", start: 0x100_0000, ram_end: 0x100_0000, .. }), "{e}");
        let e = load_image(&mem(16), &elf32_kernel(0x8000, &[0xf4])).unwrap_err();
        assert!(matches!(e, Error::Outside { start: 0x8000, .. }), "{e}");
        // An a.out kludge pointing past the file.
        let mut img = address_kernel(0, &[0xf4]);
        img.truncate(20);
        assert!(matches!(load_image(&mem(16), &img), Err(Error::Image { .. })));
    }

    #[test]
    fn info_describes_memory_cmdline_and_module() {
        let m = mem(64);
        let initrd = InitrdRegion { addr: 0x20_0000, size: 0x1234 };
        write_info(&m, Path::new("x86/svm.flat"), "-pause_filter_test", Some((Path::new("/env"), initrd)), &e820_map(64 << 20))
            .unwrap();
        let word = |i: u64| m.read_obj::<u32>(GuestAddress(INFO_START + 4 * i)).unwrap();
        assert_eq!(word(0), INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_MMAP | INFO_LOADER_NAME);
        assert_eq!((word(1), word(2)), (0x9fc00 >> 10, (63 << 20) >> 10));
        let mut s = [0u8; 32];
        m.read_slice(&mut s, GuestAddress(u64::from(word(4)))).unwrap();
        assert_eq!(&s[..31], b"x86/svm.flat -pause_filter_test");
        assert_eq!((word(5), word(6)), (1, MODS_START as u32));
        let module: Vec<u32> = (0..3).map(|i| m.read_obj(GuestAddress(MODS_START + 4 * i)).unwrap()).collect();
        assert_eq!(&module[..2], &[0x20_0000, 0x20_1234]);
        m.read_slice(&mut s[..5], GuestAddress(u64::from(module[2]))).unwrap();
        assert_eq!(&s[..5], b"/env\0");
        assert_eq!((word(11), word(12)), (3 * MMAP_ENTRY_SIZE, MMAP_START as u32));
        let base: u64 = m.read_obj(GuestAddress(MMAP_START + 2 * 24 + 4)).unwrap();
        assert_eq!(base, layout::HIMEM_START);
    }

    #[test]
    fn ram_above_4_gib_is_in_the_map() {
        let e820 = e820_map(5 << 30);
        let m = mem(16);
        write_info(&m, Path::new("k"), "", None, &e820).unwrap();
        let len: u32 = m.read_obj(GuestAddress(INFO_START + 44)).unwrap();
        assert_eq!(len, 4 * MMAP_ENTRY_SIZE);
        let base: u64 = m.read_obj(GuestAddress(MMAP_START + 3 * 24 + 4)).unwrap();
        assert_eq!(base, 1 << 32);
        // mem_upper stops at the MMIO gap.
        let upper: u32 = m.read_obj(GuestAddress(INFO_START + 8)).unwrap();
        assert_eq!(u64::from(upper) << 10, layout::MMIO_GAP_START - layout::HIMEM_START);
    }
}
