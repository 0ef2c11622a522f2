//! The disk image: a file whose bytes are the disk's, moved straight to and from guest memory.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use vm_memory::{GuestAddress, GuestMemoryError, GuestMemoryMmap, Permissions};
use vmm_sys_util::write_zeroes::{PunchHole, WriteZeroesAt};

use super::{BlockError, ID_BYTES, SECTOR_SIZE};
use crate::virtio::{advance, push_guest_iovecs, IOV_MAX};

/// Errors from I/O on the image. Offsets and lengths are in bytes.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("guest buffer at {addr:#x}, {len} bytes, is not in guest memory: {err}")]
    Buffer {
        addr: u64,
        len: u32,
        err: GuestMemoryError,
    },
    #[error("cannot {op} the disk image at byte {offset}: {err}")]
    Io {
        op: &'static str,
        offset: u64,
        err: io::Error,
    },
    #[error("cannot flush the disk image: {0}")]
    Flush(io::Error),
    #[error("an earlier flush of the disk image failed ({0}); writes since may be lost, so no flush succeeds again")]
    FlushFailedBefore(io::ErrorKind),
    #[error("cannot discard {len} bytes at disk offset {offset}: {err}")]
    Discard {
        offset: u64,
        len: u64,
        err: io::Error,
    },
    #[error("cannot zero {len} bytes at disk offset {offset}: {err}")]
    WriteZeroes {
        offset: u64,
        len: u64,
        err: io::Error,
    },
}

#[derive(Clone, Copy)]
enum Direction {
    ToGuest,
    ToDisk,
}

impl Direction {
    fn op(self) -> &'static str {
        match self {
            Direction::ToGuest => "read",
            Direction::ToDisk => "write",
        }
    }
}

/// How a flush reaches stable storage; tests put a failing or slow one in its place.
pub type SyncFn = fn(&File) -> io::Result<()>;

/// An open disk image. Callers check ranges against [`Disk::size`] before any I/O.
#[derive(Debug)]
pub struct Disk {
    file: File,
    size: u64,
    read_only: bool,
    serial: [u8; ID_BYTES],
    sync: SyncFn,
    /// Set by the first failed fsync, for good. After a failed fsync Linux may have dropped the
    /// dirty pages and cleared the error, so a later fsync can succeed without the data being on
    /// disk: the guest must never be told "flushed" again (as QEMU does).
    flush_failed: Option<io::ErrorKind>,
}

impl Disk {
    /// Opens `path` (read-only: `O_RDONLY`) with the serial `id`, or one derived from the file.
    pub fn open(path: &Path, read_only: bool, id: Option<&str>) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .and_then(|file| {
                // A directory opens read-only, then fails every read.
                if file.metadata()?.is_dir() {
                    return Err(io::Error::from_raw_os_error(libc::EISDIR));
                }
                Ok(file)
            })
            .map_err(|err| BlockError::Open {
                path: path.to_owned(),
                read_only,
                err,
            })?;
        lock(&file, read_only).map_err(|holder| BlockError::Locked {
            path: path.to_owned(),
            read_only,
            holder,
        })?;
        let serial = match id {
            Some(id) => serial_from_id(id)?,
            None => serial_from_file(&file).map_err(|err| BlockError::Stat {
                path: path.to_owned(),
                err,
            })?,
        };
        Self::from_file(file, read_only, serial).map_err(|err| BlockError::Size {
            path: path.to_owned(),
            err,
        })
    }

    /// Wraps an already open file. A trailing partial sector is not visible to the guest.
    pub fn from_file(file: File, read_only: bool, serial: [u8; ID_BYTES]) -> io::Result<Self> {
        // Seeking to the end works for regular files and block devices alike (st_size is 0 for
        // the latter).
        let len = (&file).seek(SeekFrom::End(0))?;
        Ok(Self {
            file,
            size: len - len % SECTOR_SIZE,
            read_only,
            serial,
            sync: File::sync_all,
            flush_failed: None,
        })
    }

    /// Size visible to the guest, in bytes (a whole number of sectors).
    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn sectors(&self) -> u64 {
        self.size / SECTOR_SIZE
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// The GET_ID answer: the serial, NUL-padded to 20 bytes.
    pub fn serial(&self) -> &[u8; ID_BYTES] {
        &self.serial
    }

    /// Reads the disk from `offset` into the guest buffers `segments`, in order.
    pub fn read_to_guest(
        &self,
        mem: &GuestMemoryMmap,
        segments: impl IntoIterator<Item = (GuestAddress, u32)>,
        offset: u64,
    ) -> Result<(), DiskError> {
        self.transfer(mem, segments, offset, Direction::ToGuest)
    }

    /// Writes the guest buffers `segments`, in order, to the disk from `offset`.
    pub fn write_from_guest(
        &self,
        mem: &GuestMemoryMmap,
        segments: impl IntoIterator<Item = (GuestAddress, u32)>,
        offset: u64,
    ) -> Result<(), DiskError> {
        self.transfer(mem, segments, offset, Direction::ToDisk)
    }

    /// One preadv/pwritev for the whole request where the kernel allows it: a 1 MiB request
    /// comes in up to 256 page-sized buffers, and a system call per buffer costs more than the
    /// copy under nested virtualization.
    fn transfer(
        &self,
        mem: &GuestMemoryMmap,
        segments: impl IntoIterator<Item = (GuestAddress, u32)>,
        mut offset: u64,
        direction: Direction,
    ) -> Result<(), DiskError> {
        let access = match direction {
            Direction::ToGuest => Permissions::Write,
            Direction::ToDisk => Permissions::Read,
        };
        let segments = segments.into_iter();
        let mut iovecs = Vec::with_capacity(segments.size_hint().0);
        for (addr, len) in segments {
            push_guest_iovecs(mem, addr, len as usize, access, &mut iovecs).map_err(|err| {
                DiskError::Buffer {
                    addr: addr.0,
                    len,
                    err,
                }
            })?;
        }
        let mut iov = &mut iovecs[..];
        let fd = self.file.as_raw_fd();
        while !iov.is_empty() {
            let count = iov.len().min(IOV_MAX) as libc::c_int;
            let at = offset as libc::off_t;
            // SAFETY: every iovec covers guest memory, which `mem` keeps mapped for the call; the
            // kernel writes only inside them (reads) or only reads them (writes).
            let done = unsafe {
                match direction {
                    Direction::ToGuest => libc::preadv(fd, iov.as_ptr(), count, at),
                    Direction::ToDisk => libc::pwritev(fd, iov.as_ptr(), count, at),
                }
            };
            let err = |err| DiskError::Io {
                op: direction.op(),
                offset,
                err,
            };
            let done = match done {
                n if n > 0 => n as usize,
                // Ranges are checked against the size, so this is a file cut short behind our back.
                0 => return Err(err(io::ErrorKind::UnexpectedEof.into())),
                _ => match io::Error::last_os_error() {
                    e if e.kind() == io::ErrorKind::Interrupted => continue,
                    e => return Err(err(e)),
                },
            };
            offset += done as u64;
            iov = advance(iov, done);
        }
        Ok(())
    }

    /// Makes every completed write durable. Once a flush has failed, every later one fails too.
    pub fn flush(&mut self) -> Result<(), DiskError> {
        if let Some(kind) = self.flush_failed {
            return Err(DiskError::FlushFailedBefore(kind));
        }
        (self.sync)(&self.file).map_err(|e| {
            self.flush_failed = Some(e.kind());
            DiskError::Flush(e)
        })
    }

    /// Replaces how the image is synced (tests: a failing or slow fsync).
    pub fn set_sync(&mut self, sync: SyncFn) {
        self.sync = sync;
    }

    /// Lets the host reclaim the space. A file system that cannot punch holes just keeps it:
    /// discard is a hint, and the data read back afterwards is unspecified anyway.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<(), DiskError> {
        match self.file.punch_hole(offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r.map_err(|err| DiskError::Discard { offset, len, err }),
        }
    }

    /// Makes the range read as zeroes: a hole if `unmap` and the file system can punch one, else
    /// `FALLOC_FL_ZERO_RANGE`, else plain writes of zeroes.
    pub fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), DiskError> {
        if unmap && self.file.punch_hole(offset, len).is_ok() {
            return Ok(());
        }
        let err = |err| DiskError::WriteZeroes { offset, len, err };
        let len_usize =
            usize::try_from(len).map_err(|_| err(io::ErrorKind::InvalidInput.into()))?;
        self.file
            .write_all_zeroes_at(offset, len_usize)
            .map_err(err)
    }
}

/// Who holds a lock that kept us from taking ours.
#[derive(Debug)]
pub enum LockHolder {
    /// A process-associated (classic POSIX) lock: the kernel names the process.
    Process { pid: i32, writing: bool },
    /// An open file description lock (another nvmm, QEMU, or this nvmm's other `--disk` on the
    /// same image): the kernel reports no process for those.
    OpenFile { writing: bool },
    /// The lock went away between our attempt and the question, or the question failed.
    Unknown(io::Error),
}

impl std::fmt::Display for LockHolder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let how = |writing: bool| if writing { "for writing" } else { "for reading" };
        match self {
            Self::Process { pid, writing } => write!(f, "locked {} by process {pid}", how(*writing)),
            Self::OpenFile { writing } => write!(
                f,
                "locked {} through an open file description, whose process the kernel does not report (another nvmm or QEMU, or the same image given twice)",
                how(*writing)
            ),
            Self::Unknown(e) => write!(f, "locked by another user ({e})"),
        }
    }
}

/// Takes an open file description lock on the whole image: a write lock for a read-write disk, a
/// read lock for a read-only one, so that any number of readers share an image but a writer has
/// it alone. The lock lives as long as the file (every descriptor of this open file description),
/// goes with nvmm's death, and conflicts even with another open of the same path in this process.
fn lock(file: &File, read_only: bool) -> Result<(), LockHolder> {
    let kind = if read_only { libc::F_RDLCK } else { libc::F_WRLCK };
    let mut fl = whole_file(kind);
    // SAFETY: F_OFD_SETLK reads the flock struct, which outlives the call; the fd is open.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
        return Err(LockHolder::Unknown(err));
    }
    // SAFETY: F_OFD_GETLK fills the flock struct we own; the fd is open.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } != 0 {
        return Err(LockHolder::Unknown(io::Error::last_os_error()));
    }
    let writing = i32::from(fl.l_type) == libc::F_WRLCK;
    Err(match fl.l_pid {
        _ if i32::from(fl.l_type) == libc::F_UNLCK => LockHolder::Unknown(err),
        pid if pid > 0 => LockHolder::Process { pid, writing },
        _ => LockHolder::OpenFile { writing },
    })
}

/// A lock request of `kind` over the whole file, however long it grows.
fn whole_file(kind: libc::c_int) -> libc::flock {
    // SAFETY: flock is a plain C struct, valid when zeroed (pid 0, as OFD locks require).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl
}

fn serial_from_id(id: &str) -> Result<[u8; ID_BYTES], BlockError> {
    let mut serial = [0u8; ID_BYTES];
    serial
        .get_mut(..id.len())
        .ok_or_else(|| BlockError::IdTooLong(id.to_owned()))?
        .copy_from_slice(id.as_bytes());
    Ok(serial)
}

/// A serial stable across runs for the same image: its device and inode numbers.
fn serial_from_file(file: &File) -> io::Result<[u8; ID_BYTES]> {
    let meta = file.metadata()?;
    let id = format!("{:x}-{:x}", meta.dev(), meta.ino());
    let mut serial = [0u8; ID_BYTES];
    let n = id.len().min(ID_BYTES);
    serial[..n].copy_from_slice(&id.as_bytes()[..n]);
    Ok(serial)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;
    use vmm_sys_util::tempfile::TempFile;

    fn temp_disk(len: u64) -> (TempFile, Disk) {
        let tmp = TempFile::new().unwrap();
        tmp.as_file().set_len(len).unwrap();
        let disk = Disk::open(tmp.as_path(), false, Some("disk0")).unwrap();
        (tmp, disk)
    }

    #[test]
    fn scattered_buffers_move_in_order_across_regions() {
        use vm_memory::Bytes;
        // Two adjacent regions: the second buffer straddles their boundary.
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1_0000),
            (GuestAddress(0x1_0000), 0x1_0000),
        ])
        .unwrap();
        let (tmp, disk) = temp_disk(1 << 20);
        let data: Vec<u8> = (0..1536u32).map(|i| (i * 7 + 3) as u8).collect();
        let out = [(GuestAddress(0x2000), 512), (GuestAddress(0xff00), 1024)];
        mem.write_slice(&data[..512], GuestAddress(0x2000)).unwrap();
        mem.write_slice(&data[512..], GuestAddress(0xff00)).unwrap();
        disk.write_from_guest(&mem, out, 4096).unwrap();
        let mut on_disk = vec![0u8; 1536];
        tmp.as_file().read_exact_at(&mut on_disk, 4096).unwrap();
        assert_eq!(on_disk, data);

        let back = [(GuestAddress(0x1_8000), 1000), (GuestAddress(0x3000), 536)];
        disk.read_to_guest(&mem, back, 4096).unwrap();
        let mut got = vec![0u8; 1536];
        mem.read_slice(&mut got[..1000], GuestAddress(0x1_8000))
            .unwrap();
        mem.read_slice(&mut got[1000..], GuestAddress(0x3000))
            .unwrap();
        assert_eq!(got, data);

        // Past the end of guest memory: refused before any I/O.
        let e = disk
            .read_to_guest(&mem, [(GuestAddress(0x1_ff00), 512)], 0)
            .unwrap_err();
        assert!(matches!(e, DiskError::Buffer { addr: 0x1_ff00, .. }), "{e}");
        // Past the end of the file (shrunk behind the device's back).
        tmp.as_file().set_len(512).unwrap();
        let e = disk.read_to_guest(&mem, back, 4096).unwrap_err();
        assert!(matches!(e, DiskError::Io { op: "read", .. }), "{e}");
    }

    #[test]
    fn size_rounds_down_to_whole_sectors() {
        let (_tmp, disk) = temp_disk(4 * 512 + 100);
        assert_eq!(disk.sectors(), 4);
        assert_eq!(disk.size(), 2048);
        assert_eq!(&disk.serial()[..6], b"disk0\0");
    }

    #[test]
    fn derived_serial_is_stable_and_padded() {
        let tmp = TempFile::new().unwrap();
        let a = Disk::open(tmp.as_path(), true, None).unwrap();
        let b = Disk::open(tmp.as_path(), true, None).unwrap();
        assert_eq!(a.serial(), b.serial());
        assert_ne!(a.serial()[0], 0);
    }

    #[test]
    fn open_errors_name_the_path_and_the_os_error() {
        let e = Disk::open(Path::new("/nonexistent/x.img"), false, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot open disk image /nonexistent/x.img read-write: No such file or directory (os error 2)"
        );
        let e = Disk::open(Path::new("/"), true, None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "cannot open disk image / read-only: Is a directory (os error 21)"
        );
        let tmp = TempFile::new().unwrap();
        let e = Disk::open(tmp.as_path(), false, Some("123456789012345678901")).unwrap_err();
        assert_eq!(
            e.to_string(),
            "block device id '123456789012345678901' is longer than 20 bytes"
        );
    }

    #[test]
    fn read_only_image_is_opened_read_only() {
        let tmp = TempFile::new().unwrap();
        tmp.as_file().set_len(512).unwrap();
        let disk = Disk::open(tmp.as_path(), true, None).unwrap();
        assert!(disk.read_only());
        assert!(disk.file.write_at(b"x", 0).is_err());
    }

    #[test]
    fn images_are_locked_one_writer_or_many_readers() {
        let tmp = TempFile::new().unwrap();
        tmp.as_file().set_len(4096).unwrap();
        let p = tmp.as_path();
        let rw = Disk::open(p, false, None).unwrap();
        // Another open file description, even in this process, is refused either way.
        for read_only in [false, true] {
            let e = Disk::open(p, read_only, None).unwrap_err();
            let msg = e.to_string();
            assert!(matches!(e, BlockError::Locked { holder: LockHolder::OpenFile { writing: true }, .. }), "{msg}");
            assert!(msg.starts_with(&format!("disk image {} is in use: locked for writing", p.display())), "{msg}");
        }
        drop(rw);
        let ro1 = Disk::open(p, true, None).unwrap();
        let ro2 = Disk::open(p, true, None).unwrap();
        let e = Disk::open(p, false, None).unwrap_err();
        assert!(matches!(e, BlockError::Locked { holder: LockHolder::OpenFile { writing: false }, .. }), "{e}");
        drop((ro1, ro2));
        Disk::open(p, false, None).unwrap();
    }

    #[test]
    fn a_failed_flush_is_remembered() {
        let (_tmp, mut disk) = temp_disk(4096);
        disk.flush().unwrap();
        disk.set_sync(|_| Err(io::Error::from_raw_os_error(libc::EIO)));
        let e = disk.flush().unwrap_err();
        assert!(matches!(&e, DiskError::Flush(err) if err.raw_os_error() == Some(libc::EIO)), "{e}");
        // The storage works again, but what the failed fsync lost is lost: still an error.
        disk.set_sync(File::sync_all);
        for _ in 0..3 {
            let e = disk.flush().unwrap_err();
            assert!(matches!(e, DiskError::FlushFailedBefore(_)), "{e}");
        }
    }

    #[test]
    fn write_zeroes_and_discard() {
        let (tmp, mut disk) = temp_disk(8192);
        tmp.as_file().write_all_at(&[0xaa; 8192], 0).unwrap();
        disk.write_zeroes(512, 1024, false).unwrap();
        disk.write_zeroes(4096, 512, true).unwrap();
        disk.discard(6144, 512).unwrap();
        let mut buf = vec![0u8; 8192];
        tmp.as_file().read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..512].iter().all(|&b| b == 0xaa));
        assert!(buf[512..1536].iter().all(|&b| b == 0));
        assert!(buf[1536..4096].iter().all(|&b| b == 0xaa));
        assert!(buf[4096..4608].iter().all(|&b| b == 0));
        assert_eq!(tmp.as_file().metadata().unwrap().len(), 8192);
    }
}
