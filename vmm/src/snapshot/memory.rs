//! Guest memory in a file of its own: written sparse, mapped back copy-on-write.
//!
//! # Writing
//! Only pages that hold something are written; the rest stay holes (`ftruncate` gives the file its
//! full size), so the file takes the disk space of the RAM the guest touched. A page holds
//! something when `/proc/self/pagemap` says it is present or swapped out (mincore(2) would miss a
//! swapped page, whose contents would be lost), or, in a VM that was itself restored, when the
//! snapshot file it is mapped from has data there: such a page that was only ever read is not in
//! our page tables, yet it is the guest's.
//!
//! # Mapping back
//! Each RAM region is mapped `MAP_PRIVATE` from its place in the file: nothing is read at restore,
//! pages fault in from the page cache as the guest touches them, and the guest's writes go to
//! private copies, never to the file. Restore time does not grow with guest RAM.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap};

const PAGE: u64 = 4096;
/// pagemap entry bits: page present in RAM, page swapped out.
const PM_PRESENT: u64 = 1 << 63;
const PM_SWAPPED: u64 = 1 << 62;
/// Pagemap entries read per call (256 KiB of entries, 256 MiB of guest RAM).
const PAGEMAP_CHUNK: usize = 32768;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read /proc/self/pagemap: {0}")]
    Pagemap(#[source] std::io::Error),
    #[error("cannot write guest memory to {path}: {err}")]
    Write { path: String, err: std::io::Error },
    #[error("cannot open memory file {path}: {err}")]
    Open { path: String, err: std::io::Error },
    #[error("memory file {path} has {len} bytes, the state says {expected}")]
    Short { path: String, len: u64, expected: u64 },
    #[error("cannot map memory file {path}: {err}")]
    Map { path: String, err: String },
}

/// One RAM region: where it sits in the guest and in the memory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryRange {
    pub guest_addr: u64,
    pub len: u64,
    pub file_offset: u64,
}

/// What was written: the RAM regions, and how many bytes of pages went into the file.
pub struct Written {
    pub ranges: Vec<MemoryRange>,
    pub bytes_written: u64,
}

/// Writes every page of `mem` that holds something into `file` (empty, just created), at the
/// region's offset, and sizes the file to all of RAM. The vCPUs must be paused and the devices
/// parked: nothing may write guest memory meanwhile.
pub fn write(mem: &GuestMemoryMmap, file: &File, path: &Path) -> Result<Written, Error> {
    let werr = |err| Error::Write { path: path.display().to_string(), err };
    let mut pagemap = File::open("/proc/self/pagemap").map_err(Error::Pagemap)?;
    let mut ranges = Vec::new();
    let (mut offset, mut bytes_written) = (0u64, 0u64);
    for region in mem.iter() {
        let len = region.len();
        let host = region.as_ptr() as u64;
        // SAFETY: the region is a live mapping of `len` bytes owned by `mem`, borrowed for this
        // call; the VM is paused, so no vCPU or device writes it while the slice exists.
        let bytes = unsafe { std::slice::from_raw_parts(region.as_ptr().cast_const(), len as usize) };
        let source = region.file_offset().map(|f| (f.file(), f.start()));
        for run in runs_to_write(&mut pagemap, host, len, source)? {
            for (start, end) in without_zero_pages(bytes, run) {
                file.write_all_at(&bytes[start as usize..end as usize], offset + start).map_err(werr)?;
                bytes_written += end - start;
            }
        }
        ranges.push(MemoryRange { guest_addr: region.start_addr().0, len, file_offset: offset });
        offset += len;
    }
    file.set_len(offset).map_err(werr)?;
    Ok(Written { ranges, bytes_written })
}

/// Byte ranges of the region (relative to its start) to write, in order, neighbours merged.
fn runs_to_write(pagemap: &mut File, host: u64, len: u64, source: Option<(&File, u64)>) -> Result<Vec<(u64, u64)>, Error> {
    let pages = (len / PAGE) as usize;
    let mut wanted = vec![false; pages];
    let mut entries = vec![0u8; PAGEMAP_CHUNK * 8];
    let mut page = 0;
    while page < pages {
        let n = (pages - page).min(PAGEMAP_CHUNK);
        pagemap.seek(SeekFrom::Start((host / PAGE + page as u64) * 8)).map_err(Error::Pagemap)?;
        pagemap.read_exact(&mut entries[..n * 8]).map_err(Error::Pagemap)?;
        for (i, e) in entries[..n * 8].chunks_exact(8).enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(e);
            wanted[page + i] = u64::from_le_bytes(b) & (PM_PRESENT | PM_SWAPPED) != 0;
        }
        page += n;
    }
    if let Some((file, start)) = source {
        for (a, b) in data_extents(file, start, start + len) {
            for w in &mut wanted[((a - start) / PAGE) as usize..((b - start).div_ceil(PAGE) as usize).min(pages)] {
                *w = true;
            }
        }
    }
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, _) in wanted.iter().enumerate().filter(|(_, w)| **w) {
        let (a, b) = (i as u64 * PAGE, (i as u64 + 1) * PAGE);
        match runs.last_mut() {
            Some(last) if last.1 == a => last.1 = b,
            _ => runs.push((a, b)),
        }
    }
    Ok(runs)
}

/// The pages of `run` (byte offsets into `bytes`) that are not all zeros, neighbours merged. The
/// file's holes read back as zeros, so a zero page need not be written; and on transparent huge
/// pages one page the guest touched makes all 512 of its 2 MiB present, most of them zeros.
fn without_zero_pages(bytes: &[u8], (start, end): (u64, u64)) -> Vec<(u64, u64)> {
    let is_zero = |page: &[u8]| page.chunks_exact(16).all(|c| u128::from_ne_bytes(c.try_into().unwrap()) == 0);
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for a in (start..end).step_by(PAGE as usize) {
        let b = (a + PAGE).min(end);
        if is_zero(&bytes[a as usize..b as usize]) {
            continue;
        }
        match runs.last_mut() {
            Some(last) if last.1 == a => last.1 = b,
            _ => runs.push((a, b)),
        }
    }
    runs
}

/// The parts of `file` between `from` and `to` that hold data (SEEK_DATA/SEEK_HOLE); all of it
/// when the file system cannot tell.
fn data_extents(file: &File, from: u64, to: u64) -> Vec<(u64, u64)> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut at = from;
    while at < to {
        // SAFETY: lseek on an fd we hold open; it only moves the file offset, which nothing
        // else here relies on (the writes and maps use explicit offsets).
        let data = unsafe { libc::lseek(fd, at as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            // ENXIO: no data after `at`; anything else: we cannot tell, so take all of it.
            if std::io::Error::last_os_error().raw_os_error() != Some(libc::ENXIO) {
                out.push((at, to));
            }
            break;
        }
        let data = data as u64;
        if data >= to {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 { to } else { (hole as u64).min(to) };
        out.push((data, hole));
        at = hole;
    }
    out
}

/// Maps each range of `path` privately (copy-on-write) as guest RAM.
pub fn map(path: &Path, ranges: &[MemoryRange]) -> Result<GuestMemoryMmap, Error> {
    let name = || path.display().to_string();
    let file = File::open(path).map_err(|err| Error::Open { path: name(), err })?;
    let len = file.metadata().map_err(|err| Error::Open { path: name(), err })?.len();
    let expected = ranges.iter().map(|r| r.file_offset + r.len).max().unwrap_or(0);
    if len < expected {
        return Err(Error::Short { path: name(), len, expected });
    }
    let mut regions = Vec::with_capacity(ranges.len());
    for r in ranges {
        let file = file.try_clone().map_err(|err| Error::Open { path: name(), err })?;
        let mapping = MmapRegionBuilder::new(r.len as usize)
            .with_file_offset(FileOffset::new(file, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| Error::Map { path: name(), err: e.to_string() })?;
        let region = GuestRegionMmap::new(mapping, GuestAddress(r.guest_addr))
            .ok_or_else(|| Error::Map { path: name(), err: format!("region at {:#x} overflows", r.guest_addr) })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Map { path: name(), err: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    fn scratch() -> vmm_sys_util::tempdir::TempDir {
        vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/nvmm-snapmem").unwrap()
    }

    /// Zero pages are left out of a run, whole pages at a time, and what is left is merged.
    #[test]
    fn zero_pages_are_not_written() {
        let p = PAGE as usize;
        let mut bytes = vec![0u8; 6 * p];
        bytes[p] = 1; // page 1
        bytes[3 * p - 1] = 2; // the last byte of page 2
        bytes[5 * p + 7] = 3; // page 5
        assert_eq!(without_zero_pages(&bytes, (0, 6 * PAGE)), vec![(PAGE, 3 * PAGE), (5 * PAGE, 6 * PAGE)]);
        assert_eq!(without_zero_pages(&bytes, (3 * PAGE, 5 * PAGE)), vec![]);
        assert_eq!(without_zero_pages(&bytes, (2 * PAGE, 6 * PAGE)), vec![(2 * PAGE, 3 * PAGE), (5 * PAGE, 6 * PAGE)]);
    }

    /// Touched pages are written, the rest are holes; the file maps back with the same bytes,
    /// and writes to the mapping do not reach the file. Written again from that mapping (a VM
    /// that was restored), the pages it only read come from the first file.
    #[test]
    fn sparse_write_and_private_map() {
        let dir = scratch();
        let mem = crate::memory::create(64 << 20, crate::memory::Thp::On).unwrap();
        mem.write_slice(b"first", GuestAddress(0x1000)).unwrap();
        mem.write_slice(b"last", GuestAddress((64 << 20) - 4)).unwrap();
        let path = dir.as_path().join("memory");
        let file = File::create(&path).unwrap();
        let w = write(&mem, &file, &path).unwrap();
        assert_eq!(w.ranges, vec![MemoryRange { guest_addr: 0, len: 64 << 20, file_offset: 0 }]);
        assert!(w.bytes_written <= 4 * PAGE, "wrote {} bytes for two touched pages", w.bytes_written);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(meta.blocks() * 512 <= 64 * 1024, "{} bytes on disk", meta.blocks() * 512);

        let back = map(&path, &w.ranges).unwrap();
        let mut buf = [0u8; 5];
        back.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
        assert_eq!(&buf, b"first");
        back.write_slice(b"XXXXX", GuestAddress(0x1000)).unwrap();
        let mut on_disk = [0u8; 5];
        File::open(&path).unwrap().read_exact_at(&mut on_disk, 0x1000).unwrap();
        assert_eq!(&on_disk, b"first", "a private mapping wrote through to the file");

        let path2 = dir.as_path().join("memory2");
        let file2 = File::create(&path2).unwrap();
        write(&back, &file2, &path2).unwrap();
        let again = map(&path2, &w.ranges).unwrap();
        let mut tail = [0u8; 4];
        again.read_slice(&mut tail, GuestAddress((64 << 20) - 4)).unwrap();
        assert_eq!(&tail, b"last", "a page never touched since the restore was lost");
        again.read_slice(&mut buf, GuestAddress(0x1000)).unwrap();
        assert_eq!(&buf, b"XXXXX");
    }

    #[test]
    fn a_short_file_is_refused() {
        let dir = scratch();
        let path = dir.as_path().join("memory");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let r = [MemoryRange { guest_addr: 0, len: 1 << 20, file_offset: 0 }];
        let e = map(&path, &r).unwrap_err().to_string();
        assert!(e.contains("has 4096 bytes, the state says 1048576"), "{e}");
    }
}
