//! Loading a kernel (a Linux bzImage or ELF vmlinux, or a Multiboot kernel), its initrd and command
//! line into guest memory, and choosing the entry protocol: the 64-bit Linux boot protocol, PVH, or
//! Multiboot.

mod footprint;
mod linux;
pub mod multiboot;
mod pvh;

use std::fs::File;
use std::path::{Path, PathBuf};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub use footprint::boot_footprint;

use crate::config::EntryChoice;
use crate::memory::{self, layout};

/// x86's COMMAND_LINE_SIZE, the limit for kernels that do not state their own (ELF vmlinux).
const DEFAULT_CMDLINE_SIZE: usize = 2048;
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
/// e_ident's class byte; a 32-bit ELF is not a vmlinux (but may be a Multiboot kernel).
const ELF_CLASS: usize = 4;
const ELFCLASS64: u8 = 2;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
/// Boot protocol 2.06 is the first with `cmdline_size`, 2.10 the first with `init_size`.
const BOOT_PROTOCOL_CMDLINE_SIZE: u16 = 0x206;
const BOOT_PROTOCOL_INIT_SIZE: u16 = 0x20a;
/// boot_params.hdr.type_of_loader: "undefined" loader, as other VMMs report.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// setup_header.loadflags bit: the kernel can use the heap between setup and heap_end_ptr.
const CAN_USE_HEAP: u8 = 0x80;
const PAGE_SIZE: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot open {what} {path}: {source}")]
    Open { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("cannot use {path} as the {what}: it is {kind}, not a regular file")]
    NotRegular { what: &'static str, path: PathBuf, kind: &'static str },
    #[error("{0} is not a Linux kernel or a Multiboot kernel: expected a bzImage, an ELF vmlinux, or a Multiboot header in the first 8 KiB")]
    NotAKernel(PathBuf),
    #[error(transparent)]
    Multiboot(#[from] multiboot::Error),
    #[error("cannot load kernel {path}: {reason} (a truncated or corrupt image?)")]
    Load { path: PathBuf, reason: linux_loader::loader::Error },
    #[error("--entry pvh: kernel {0} has no PVH entry note (build it with CONFIG_PVH=y, or use --entry 64bit)")]
    NoPvhNote(PathBuf),
    #[error("kernel {path} is truncated: {actual} bytes, its header says {expected}")]
    Truncated { path: PathBuf, actual: u64, expected: u64 },
    #[error("kernel {path} needs {need_mib} MiB of guest memory to boot, more than --mem gives ({have_mib} MiB)")]
    KernelTooBig { path: PathBuf, need_mib: u64, have_mib: u64 },
    #[error("initrd {path} ({size_mib} MiB) does not fit in guest memory below {limit:#x} after the kernel; raise --mem")]
    InitrdTooBig { path: PathBuf, size_mib: u64, limit: u64 },
    #[error("cannot read initrd {path}: {source}")]
    ReadInitrd { path: PathBuf, source: vm_memory::GuestMemoryError },
    #[error("kernel command line is {len} bytes; this kernel accepts at most {max}")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("invalid kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error("cannot write boot parameters: {0}")]
    BootParams(String),
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// 64-bit Linux boot protocol: long mode, RSI points at the zero page.
    Linux64 { rip: u64 },
    /// PVH: 32-bit protected mode without paging, RBX points at `hvm_start_info`.
    Pvh { rip: u64 },
    /// Multiboot: 32-bit protected mode without paging, EAX holds the boot loader magic and EBX
    /// points at the Multiboot information.
    Multiboot { rip: u64 },
}

/// The kernel as loaded into guest memory, before boot parameters are written.
pub struct LoadedKernel {
    pub path: PathBuf,
    pub result: KernelLoaderResult,
    pub entry: Entry,
    /// The most command line bytes this kernel accepts (without the NUL).
    pub cmdline_max: usize,
}

/// Where the initrd was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdRegion {
    pub addr: u64,
    pub size: u64,
}

enum Format {
    BzImage,
    Elf,
}

/// What `--kernel` turned out to be.
enum Detected {
    Linux(Format),
    Multiboot { image: Vec<u8>, header: multiboot::Header },
}

/// Opens a kernel or initrd, refusing anything but a regular file before reading a byte: a FIFO
/// would block the read forever, a character device (`/dev/zero`) never ends, and a directory fails
/// with a less helpful message. `O_NONBLOCK` keeps the open itself from waiting for a FIFO's
/// writer; it changes nothing for the regular file that is then read.
fn open(what: &'static str, path: &Path) -> Result<File, Error> {
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| Error::Open { what, path: path.into(), source };
    let file = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(err)?;
    let kind = file.metadata().map_err(err)?.file_type();
    if !kind.is_file() {
        return Err(Error::NotRegular { what, path: path.into(), kind: file_kind(&kind) });
    }
    Ok(file)
}

/// A name for a file type, for messages.
fn file_kind(kind: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if kind.is_dir() {
        "a directory"
    } else if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else {
        "not a regular file"
    }
}

/// A 64-bit ELF or a bzImage is Linux; anything else (an ELF32 included) may carry a Multiboot header.
fn detect_format(file: &mut File, path: &Path) -> Result<Detected, Error> {
    let mut head = vec![0u8; multiboot::SEARCH_LIMIT];
    let n = read_prefix(file, &mut head).map_err(|source| Error::Open { what: "kernel", path: path.into(), source })?;
    let head = &head[..n];
    if head.len() > ELF_CLASS && &head[..4] == ELF_MAGIC && head[ELF_CLASS] == ELFCLASS64 {
        return Ok(Detected::Linux(Format::Elf));
    }
    if head.get(BZIMAGE_MAGIC_OFFSET..BZIMAGE_MAGIC_OFFSET + 4) == Some(BZIMAGE_MAGIC) {
        return Ok(Detected::Linux(Format::BzImage));
    }
    match multiboot::find_header(path, head)? {
        Some(header) => {
            let image = std::fs::read(path).map_err(|source| Error::Open { what: "kernel", path: path.into(), source })?;
            Ok(Detected::Multiboot { image, header })
        }
        None => Err(Error::NotAKernel(path.into())),
    }
}

fn read_prefix(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    use std::io::{Read, Seek};
    file.rewind()?;
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    file.rewind()?;
    Ok(n)
}

/// Loads the kernel at `path` into `mem` and decides the entry protocol.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path, choice: EntryChoice) -> Result<LoadedKernel, Error> {
    let mut file = open("kernel", path)?;
    let format = match detect_format(&mut file, path)? {
        Detected::Linux(format) => format,
        Detected::Multiboot { image, header } => return load_multiboot(mem, path, &image, &header),
    };
    let load_err = |reason| Error::Load { path: path.into(), reason };
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let mem_size = memory::size(mem);
    if let Format::Elf = format {
        // The loader would fail mid-copy with a generic read error; say what the kernel needs.
        if let Some(end) = elf_load_end(&mut file).filter(|&end| end > memory::low_mem_end(mem_size)) {
            return Err(Error::KernelTooBig { path: path.into(), need_mib: end.div_ceil(1 << 20), have_mib: mem_size >> 20 });
        }
    }
    let result = match format {
        Format::BzImage => BzImage::load(mem, None, &mut file, himem),
        Format::Elf => Elf::load(mem, None, &mut file, himem),
    };
    let result = result.map_err(|e| match e {
        // The loader reports "does not fit" as a memory error; say which limit was hit.
        linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::ReadKernelImage)
        | linux_loader::loader::Error::Bzimage(linux_loader::loader::bzimage::Error::ReadBzImageCompressedKernel)
            if file_len(path) > mem_size =>
        {
            Error::KernelTooBig { path: path.into(), need_mib: file_len(path) >> 20, have_mib: mem_size >> 20 }
        }
        e => load_err(e),
    })?;

    let (entry, cmdline_max) = match (format, result.setup_header) {
        (Format::BzImage, Some(hdr)) => {
            check_bzimage_complete(path, &hdr)?;
            check_init_size(path, &hdr, mem_size)?;
            // The 64-bit entry point sits 0x200 bytes into the protected-mode kernel.
            (Entry::Linux64 { rip: result.kernel_load.0 + 0x200 }, cmdline_size(&hdr))
        }
        _ => match (result.pvh_boot_cap, choice) {
            (PvhBootCapability::PvhEntryPresent(addr), EntryChoice::Auto | EntryChoice::Pvh) => {
                (Entry::Pvh { rip: addr.0 }, DEFAULT_CMDLINE_SIZE - 1)
            }
            (_, EntryChoice::Pvh) => return Err(Error::NoPvhNote(path.into())),
            _ => (Entry::Linux64 { rip: result.kernel_load.0 }, DEFAULT_CMDLINE_SIZE - 1),
        },
    };
    if result.kernel_end > memory::low_mem_end(mem_size) {
        return Err(Error::KernelTooBig { path: path.into(), need_mib: result.kernel_end >> 20, have_mib: mem_size >> 20 });
    }
    Ok(LoadedKernel { path: path.into(), result, entry, cmdline_max })
}

fn load_multiboot(mem: &GuestMemoryMmap, path: &Path, image: &[u8], header: &multiboot::Header) -> Result<LoadedKernel, Error> {
    let loaded = multiboot::load(mem, path, image, header)?;
    let result = KernelLoaderResult { kernel_load: GuestAddress(loaded.start), kernel_end: loaded.end, ..Default::default() };
    let entry = Entry::Multiboot { rip: loaded.entry.into() };
    Ok(LoadedKernel { path: path.into(), result, entry, cmdline_max: layout::CMDLINE_MAX_SIZE - 1 })
}

/// The highest physical address an ELF's loadable segments reach, or None if the headers are unreadable
/// (the loader then reports the problem itself).
fn elf_load_end(file: &mut File) -> Option<u64> {
    use linux_loader::elf::{Elf64_Ehdr, Elf64_Phdr, PT_LOAD};
    use std::io::{Read, Seek, SeekFrom};
    use vm_memory::ByteValued;
    let mut ehdr = Elf64_Ehdr::default();
    file.rewind().ok()?;
    file.read_exact(ehdr.as_mut_slice()).ok()?;
    let mut end = 0u64;
    for i in 0..u64::from(ehdr.e_phnum) {
        let mut phdr = Elf64_Phdr::default();
        file.seek(SeekFrom::Start(ehdr.e_phoff.checked_add(i * u64::from(ehdr.e_phentsize))?)).ok()?;
        file.read_exact(phdr.as_mut_slice()).ok()?;
        if phdr.p_type == PT_LOAD {
            end = end.max(phdr.p_paddr.checked_add(phdr.p_memsz)?);
        }
    }
    file.rewind().ok()?;
    Some(end)
}

fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path).map(|m| m.len()).unwrap_or(0)
}

fn cmdline_size(hdr: &setup_header) -> usize {
    if hdr.version >= BOOT_PROTOCOL_CMDLINE_SIZE && hdr.cmdline_size > 0 {
        hdr.cmdline_size as usize
    } else {
        255
    }
}

/// The loader takes whatever follows the setup code; `syssize` says how much there should be.
fn check_bzimage_complete(path: &Path, hdr: &setup_header) -> Result<(), Error> {
    let setup_sects = if hdr.setup_sects == 0 { 4 } else { u64::from(hdr.setup_sects) };
    let expected = (setup_sects + 1) * 512 + u64::from(hdr.syssize) * 16;
    let actual = file_len(path);
    if actual < expected {
        return Err(Error::Truncated { path: path.into(), actual, expected });
    }
    Ok(())
}

/// A bzImage decompresses in place and needs `init_size` bytes from its load address.
fn check_init_size(path: &Path, hdr: &setup_header, mem_size: u64) -> Result<(), Error> {
    if hdr.version < BOOT_PROTOCOL_INIT_SIZE {
        return Ok(());
    }
    let need = u64::from(hdr.code32_start) + u64::from(hdr.init_size);
    let have = memory::low_mem_end(mem_size);
    if need > have {
        return Err(Error::KernelTooBig { path: path.into(), need_mib: need.div_ceil(1 << 20), have_mib: mem_size >> 20 });
    }
    Ok(())
}

/// Loads the initrd as high as the kernel allows, page aligned, above the kernel's end.
pub fn load_initrd(mem: &GuestMemoryMmap, kernel: &LoadedKernel, path: &Path) -> Result<InitrdRegion, Error> {
    let mut file = open("initrd", path)?;
    let size = file
        .metadata()
        .map_err(|source| Error::Open { what: "initrd", path: path.into(), source })?
        .len();
    let mem_size = memory::size(mem);
    let mut limit = memory::low_mem_end(mem_size);
    if let Some(hdr) = kernel.result.setup_header {
        limit = limit.min(u64::from(hdr.initrd_addr_max) + 1);
    }
    let too_big = || Error::InitrdTooBig { path: path.into(), size_mib: size.div_ceil(1 << 20), limit };
    let addr = match kernel.entry {
        // A Multiboot kernel's module goes right after it, as QEMU puts it.
        Entry::Multiboot { .. } => multiboot::module_address(kernel.result.kernel_end),
        _ => limit.checked_sub(size).ok_or_else(too_big)? & !(PAGE_SIZE - 1),
    };
    if addr < kernel.result.kernel_end || addr.saturating_add(size) > limit {
        return Err(too_big());
    }
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, size as usize)
        .map_err(|source| Error::ReadInitrd { path: path.into(), source })?;
    Ok(InitrdRegion { addr, size })
}

/// Builds the command line, checking it against the kernel's limit, and writes it to guest memory.
pub fn load_cmdline_checked(mem: &GuestMemoryMmap, kernel: &LoadedKernel, cmdline: &str) -> Result<(), Error> {
    if cmdline.len() > kernel.cmdline_max {
        return Err(Error::CmdlineTooLong { len: cmdline.len(), max: kernel.cmdline_max });
    }
    let cl = Cmdline::try_from(cmdline, kernel.cmdline_max + 1).map_err(Error::Cmdline)?;
    load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cl)
        .map_err(|e| Error::BootParams(format!("command line: {e}")))
}

/// What the boot parameters point the kernel at, besides its command line and memory map.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootExtras {
    pub initrd: Option<InitrdRegion>,
    /// The ACPI RSDP, handed over directly so the kernel need not scan the BIOS area for it.
    pub rsdp: Option<u64>,
}

/// Writes the boot parameters the chosen entry protocol expects.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline_len: usize,
    extras: BootExtras,
    mem_size: u64,
) -> Result<(), Error> {
    let e820 = memory::e820_map(mem_size);
    match kernel.entry {
        Entry::Linux64 { .. } => linux::write_zero_page(mem, kernel.result.setup_header, cmdline_len, extras, &e820),
        Entry::Pvh { .. } => pvh::write_start_info(mem, extras, &e820),
        Entry::Multiboot { .. } => return Err(Error::BootParams("a Multiboot kernel takes write_multiboot_info".into())),
    }
    .map_err(|e| Error::BootParams(e.to_string()))
}

/// Writes a Multiboot kernel's information structure: `cmdline` is the user's, without anything
/// nvmm adds for Linux (a Multiboot kernel reads every word as its own argument).
pub fn write_multiboot_info(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &str,
    initrd: Option<(&Path, InitrdRegion)>,
    mem_size: u64,
) -> Result<(), Error> {
    Ok(multiboot::write_info(mem, &kernel.path, cmdline, initrd, &memory::e820_map(mem_size))?)
}

/// Reads back a value written to guest memory; for tests.
#[cfg(test)]
fn read_obj<T: vm_memory::ByteValued>(mem: &GuestMemoryMmap, addr: u64) -> T {
    mem.read_obj(GuestAddress(addr)).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(mib: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap()
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("nvmm-boot-{}-{name}", std::process::id()));
        std::fs::File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    /// A minimal bzImage: a setup header with the magic, 4 setup sectors, a tiny payload.
    fn fake_bzimage(payload: usize, init_size: u32) -> Vec<u8> {
        let mut img = vec![0u8; 5 * 512 + payload];
        img[0x1f1] = 4; // setup_sects
        img[0x202..0x206].copy_from_slice(BZIMAGE_MAGIC);
        img[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes()); // version 2.15
        img[0x1f4..0x1f8].copy_from_slice(&((payload as u32).div_ceil(16)).to_le_bytes()); // syssize
        img[0x211] = 1; // loadflags: LOADED_HIGH
        img[0x214..0x218].copy_from_slice(&0x100000u32.to_le_bytes()); // code32_start
        img[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        img[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
        img[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
        img
    }

    #[test]
    fn rejects_files_that_are_not_kernels() {
        let p = temp_file("notkernel", b"#!/bin/sh\necho hello\n");
        assert!(matches!(load_kernel(&mem(32), &p, EntryChoice::Auto), Err(Error::NotAKernel(_))));
        let p = temp_file("empty", b"");
        assert!(matches!(load_kernel(&mem(32), &p, EntryChoice::Auto), Err(Error::NotAKernel(_))));
        let e = load_kernel(&mem(32), Path::new("/nonexistent/bzImage"), EntryChoice::Auto).err().unwrap();
        assert!(e.to_string().starts_with("cannot open kernel /nonexistent/bzImage"), "{e}");
    }

    #[test]
    fn bzimage_loads_with_64bit_entry_and_its_cmdline_limit() {
        let p = temp_file("bz", &fake_bzimage(4096, 0x10000));
        let k = load_kernel(&mem(32), &p, EntryChoice::Auto).unwrap();
        assert_eq!(k.entry, Entry::Linux64 { rip: 0x100200 });
        assert_eq!(k.cmdline_max, 2048);
        let long = "x".repeat(2049);
        assert!(matches!(load_cmdline_checked(&mem(32), &k, &long), Err(Error::CmdlineTooLong { len: 2049, max: 2048 })));
        load_cmdline_checked(&mem(32), &k, "console=ttyS0").unwrap();
    }

    #[test]
    fn bzimage_that_cannot_decompress_in_memory_is_refused() {
        let p = temp_file("bzbig", &fake_bzimage(4096, 64 << 20));
        let e = load_kernel(&mem(32), &p, EntryChoice::Auto).err().unwrap();
        assert!(matches!(e, Error::KernelTooBig { need_mib: 65, have_mib: 32, .. }), "{e}");
    }

    #[test]
    fn truncated_bzimage_is_refused() {
        let img = fake_bzimage(8192, 0x10000);
        let p = temp_file("bztrunc", &img[..img.len() - 100]);
        assert!(matches!(load_kernel(&mem(32), &p, EntryChoice::Auto), Err(Error::Truncated { .. })));
        let p = temp_file("bztrunc2", &img[..0x300]);
        assert!(load_kernel(&mem(32), &p, EntryChoice::Auto).is_err());
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let m = mem(64);
        let k = load_kernel(&m, &temp_file("bz2", &fake_bzimage(4096, 0x10000)), EntryChoice::Auto).unwrap();
        let initrd = temp_file("initrd", &[7u8; 10000]);
        let r = load_initrd(&m, &k, &initrd).unwrap();
        assert_eq!(r.size, 10000);
        assert_eq!(r.addr % PAGE_SIZE, 0);
        assert!(r.addr + r.size <= 64 << 20 && r.addr + r.size > (64 << 20) - 2 * PAGE_SIZE);
        assert_eq!(read_obj::<u8>(&m, r.addr + 9999), 7);
        let big = temp_file("initrd-big", &vec![0u8; 40 << 20]);
        assert!(matches!(load_initrd(&mem(32), &k, &big), Err(Error::InitrdTooBig { .. })));
    }
}
