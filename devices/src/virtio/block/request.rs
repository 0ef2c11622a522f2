//! One virtio-blk request: split a descriptor chain into header, data and status, check it, run it
//! on the [`Disk`], and write the status byte.
//!
//! The layout is the one Linux uses (virtio 1.2, 5.2.6): a device-readable header descriptor of at
//! least 16 bytes (`virtio_blk_outhdr`), data descriptors all in the direction the request type
//! needs, and a device-writable status descriptor whose first byte receives the status. Every
//! buffer is checked against guest memory, and every disk range against the disk size, before any
//! byte moves, so a rejected request changes neither the disk nor guest memory (except the status).

use std::mem::{offset_of, size_of};

use virtio_bindings::virtio_blk::{
    virtio_blk_discard_write_zeroes, virtio_blk_outhdr, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
    VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID,
    VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
    VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, Permissions};

use super::disk::{Disk, DiskError};
use super::{ID_BYTES, MAX_DISCARD_SEGMENTS, MAX_ZEROES_SECTORS, SECTOR_SIZE, SEG_MAX};

/// Size of the request header.
pub const HEADER_LEN: u32 = size_of::<virtio_blk_outhdr>() as u32;
/// Descriptors a request may have: header, up to `SEG_MAX` data segments, status.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
const SEGMENT_LEN: usize = size_of::<virtio_blk_discard_write_zeroes>();

/// The request type from the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Unsupported(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            t => Self::Unsupported(t),
        }
    }
}

/// Why a request failed. The first two leave no status byte to write.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("descriptor chain is empty, loops, or leaves the descriptor table")]
    BrokenChain,
    #[error("last descriptor is not a device-writable status byte")]
    NoStatus,
    #[error("request has more than {MAX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("request header is device-writable or shorter than {HEADER_LEN} bytes")]
    BadHeader,
    #[error("{0:?} request has a data descriptor in the wrong direction")]
    WrongDirection(RequestType),
    #[error("buffer at {addr:#x}, {len} bytes, is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("guest memory access failed: {0}")]
    Memory(GuestMemoryError),
    #[error("data length {0} is not a multiple of {SECTOR_SIZE}")]
    UnalignedLength(u64),
    #[error("sector {sector} plus {len} bytes lies past the end of the disk ({size} bytes)")]
    PastEnd { sector: u64, len: u64, size: u64 },
    #[error("GET_ID buffer of {0} bytes is shorter than {ID_BYTES}")]
    IdBufferTooSmall(u64),
    #[error("{0:?} request on a read-only disk")]
    ReadOnly(RequestType),
    #[error(
        "{0} bytes is not a list of 1 to {MAX_DISCARD_SEGMENTS} discard/write-zeroes segments"
    )]
    BadSegmentList(u64),
    #[error("discard/write-zeroes segment of {0} sectors is over the {MAX_ZEROES_SECTORS} the device offers")]
    SegmentTooLong(u32),
    #[error("discard/write-zeroes segment flags {0:#x} are not supported")]
    UnsupportedFlags(u32),
    #[error("request type {0} is not supported")]
    Unsupported(u32),
    #[error(transparent)]
    Disk(#[from] DiskError),
}

impl RequestError {
    /// The status byte the driver sees.
    fn status(&self) -> u8 {
        match self {
            Self::Unsupported(_) | Self::UnsupportedFlags(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

/// A chain split into the request body (header and data) and the status byte's address.
struct SplitChain {
    body: Vec<Descriptor>,
    status: GuestAddress,
    too_long: bool,
}

fn split_chain(chain: DescriptorChain<&GuestMemoryMmap>) -> Result<SplitChain, RequestError> {
    let mut body = Vec::new();
    let mut last = None;
    let mut too_long = false;
    // The chain iterator itself stops loops (after queue-size descriptors) and unreadable
    // descriptors. The body keeps at most MAX_DESCRIPTORS - 1 entries; the status is `last`.
    for desc in chain {
        if let Some(prev) = last.replace(desc) {
            if body.len() < MAX_DESCRIPTORS - 1 {
                body.push(prev);
            } else {
                too_long = true;
            }
        }
    }
    let last = last.ok_or(RequestError::BrokenChain)?;
    // A last descriptor that still says "next" means the walk was cut short.
    if last.has_next() {
        return Err(RequestError::BrokenChain);
    }
    if !last.is_write_only() || last.len() == 0 {
        return Err(RequestError::NoStatus);
    }
    Ok(SplitChain {
        body,
        status: last.addr(),
        too_long,
    })
}

/// Runs the request in `chain` and writes its status byte. Returns the used length to report:
/// the bytes written into the chain (data and status), or 0 if there was nowhere to put a status.
pub fn process_request(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    disk: &mut Disk,
) -> u32 {
    let split = match split_chain(chain) {
        Ok(split) => split,
        Err(e) => {
            crate::warn_limited!("virtio-blk: dropping request: {e}");
            return 0;
        }
    };
    let result = if split.too_long {
        Err(RequestError::TooManyDescriptors)
    } else {
        execute(mem, &split.body, disk)
    };
    let (status, written) = match result {
        Ok(written) => (VIRTIO_BLK_S_OK as u8, written),
        Err(e) => {
            match e {
                RequestError::Disk(_) => crate::error_limited!("virtio-blk: {e}"),
                _ => crate::warn_limited!("virtio-blk: bad request: {e}"),
            }
            (e.status(), 0)
        }
    };
    if let Err(e) = mem.write_obj(status, split.status) {
        crate::warn_limited!("virtio-blk: cannot write the status byte: {e}");
        return 0;
    }
    written.saturating_add(1)
}

/// Checks and runs a request; returns the bytes written into guest data buffers.
fn execute(
    mem: &GuestMemoryMmap,
    body: &[Descriptor],
    disk: &mut Disk,
) -> Result<u32, RequestError> {
    let (header, data) = body.split_first().ok_or(RequestError::BadHeader)?;
    if header.is_write_only() || header.len() < HEADER_LEN {
        return Err(RequestError::BadHeader);
    }
    let mut raw = [0u8; HEADER_LEN as usize];
    mem.read_slice(&mut raw, header.addr())
        .map_err(RequestError::Memory)?;
    let request_type = RequestType::from(le_u32(&raw, offset_of!(virtio_blk_outhdr, type_)));
    let sector = le_u64(&raw, offset_of!(virtio_blk_outhdr, sector));

    match request_type {
        RequestType::In => {
            let len = sector_data_len(mem, data, request_type, true)?;
            let offset = disk_offset(disk, sector, len)?;
            disk.read_to_guest(mem, segments(data), offset)?;
            // A chain carries at most u32::MAX bytes (the chain iterator stops there).
            Ok(u32::try_from(len).unwrap_or(u32::MAX))
        }
        RequestType::Out => {
            refuse_if_read_only(disk, request_type)?;
            let len = sector_data_len(mem, data, request_type, false)?;
            let offset = disk_offset(disk, sector, len)?;
            disk.write_from_guest(mem, segments(data), offset)?;
            Ok(0)
        }
        RequestType::Flush => {
            disk.flush()?;
            Ok(0)
        }
        RequestType::GetId => {
            let len = data_len(mem, data, request_type, true)?;
            if len < ID_BYTES as u64 {
                return Err(RequestError::IdBufferTooSmall(len));
            }
            let serial = *disk.serial();
            write_scattered(mem, data, &serial)?;
            Ok(ID_BYTES as u32)
        }
        RequestType::Discard | RequestType::WriteZeroes => {
            refuse_if_read_only(disk, request_type)?;
            discard_or_write_zeroes(mem, data, request_type, disk)?;
            Ok(0)
        }
        RequestType::Unsupported(t) => Err(RequestError::Unsupported(t)),
    }
}

fn segments(data: &[Descriptor]) -> impl Iterator<Item = (GuestAddress, u32)> + '_ {
    data.iter().map(|d| (d.addr(), d.len()))
}

fn refuse_if_read_only(disk: &Disk, request_type: RequestType) -> Result<(), RequestError> {
    if disk.read_only() {
        return Err(RequestError::ReadOnly(request_type));
    }
    Ok(())
}

/// Checks direction and guest-memory bounds of every data descriptor; returns their total length.
fn data_len(
    mem: &GuestMemoryMmap,
    data: &[Descriptor],
    request_type: RequestType,
    device_writes: bool,
) -> Result<u64, RequestError> {
    let access = if device_writes {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let mut total = 0u64;
    for d in data {
        if d.is_write_only() != device_writes {
            return Err(RequestError::WrongDirection(request_type));
        }
        if !mem.check_range(d.addr(), d.len() as usize, access) {
            return Err(RequestError::OutsideMemory {
                addr: d.addr().0,
                len: d.len(),
            });
        }
        // At most MAX_DESCRIPTORS u32 lengths: no overflow in u64.
        total += u64::from(d.len());
    }
    Ok(total)
}

/// [`data_len`] for IN and OUT, whose data must be whole sectors.
fn sector_data_len(
    mem: &GuestMemoryMmap,
    data: &[Descriptor],
    request_type: RequestType,
    device_writes: bool,
) -> Result<u64, RequestError> {
    let len = data_len(mem, data, request_type, device_writes)?;
    if len % SECTOR_SIZE != 0 {
        return Err(RequestError::UnalignedLength(len));
    }
    Ok(len)
}

/// The byte offset of `sector`, if `len` bytes from there lie within the disk.
fn disk_offset(disk: &Disk, sector: u64, len: u64) -> Result<u64, RequestError> {
    let past_end = || RequestError::PastEnd {
        sector,
        len,
        size: disk.size(),
    };
    let offset = sector.checked_mul(SECTOR_SIZE).ok_or_else(past_end)?;
    let end = offset.checked_add(len).ok_or_else(past_end)?;
    if end > disk.size() {
        return Err(past_end());
    }
    Ok(offset)
}

/// Writes `bytes` across the data descriptors, in order (their total is at least `bytes.len()`).
fn write_scattered(
    mem: &GuestMemoryMmap,
    data: &[Descriptor],
    mut bytes: &[u8],
) -> Result<(), RequestError> {
    for d in data {
        if bytes.is_empty() {
            break;
        }
        let n = bytes.len().min(d.len() as usize);
        mem.write_slice(&bytes[..n], d.addr())
            .map_err(RequestError::Memory)?;
        bytes = &bytes[n..];
    }
    Ok(())
}

/// A DISCARD or WRITE_ZEROES range, checked against the disk.
struct Segment {
    offset: u64,
    len: u64,
    unmap: bool,
}

fn discard_or_write_zeroes(
    mem: &GuestMemoryMmap,
    data: &[Descriptor],
    request_type: RequestType,
    disk: &mut Disk,
) -> Result<(), RequestError> {
    let len = data_len(mem, data, request_type, false)?;
    let count = len / SEGMENT_LEN as u64;
    if len % SEGMENT_LEN as u64 != 0 || count == 0 || count > u64::from(MAX_DISCARD_SEGMENTS) {
        return Err(RequestError::BadSegmentList(len));
    }
    // Bounded just above: at most MAX_DISCARD_SEGMENTS * 16 bytes.
    let mut raw = vec![0u8; len as usize];
    let mut pos = 0;
    for d in data {
        let end = pos + d.len() as usize;
        mem.read_slice(&mut raw[pos..end], d.addr())
            .map_err(RequestError::Memory)?;
        pos = end;
    }
    // Check every segment before touching the disk.
    let allowed_flags = match request_type {
        RequestType::WriteZeroes => VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        _ => 0,
    };
    let mut segments = Vec::with_capacity(count as usize);
    for s in raw.chunks_exact(SEGMENT_LEN) {
        let sector = le_u64(s, offset_of!(virtio_blk_discard_write_zeroes, sector));
        let sectors = le_u32(s, offset_of!(virtio_blk_discard_write_zeroes, num_sectors));
        let flags = le_u32(s, offset_of!(virtio_blk_discard_write_zeroes, flags));
        if flags & !allowed_flags != 0 {
            return Err(RequestError::UnsupportedFlags(flags));
        }
        // What the config space offers bounds the work of one request, which holds the device.
        if sectors > MAX_ZEROES_SECTORS {
            return Err(RequestError::SegmentTooLong(sectors));
        }
        let len = u64::from(sectors) * SECTOR_SIZE;
        segments.push(Segment {
            offset: disk_offset(disk, sector, len)?,
            len,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    for s in segments {
        match request_type {
            RequestType::Discard => disk.discard(s.offset, s.len)?,
            _ => disk.write_zeroes(s.offset, s.len, s.unmap)?,
        }
    }
    Ok(())
}

// Little-endian fields at constant offsets of fixed-size headers.
fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(v)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{add_chain, add_raw_chain, guest_memory, r, w, Desc, MEM_SIZE};
    use std::os::unix::fs::FileExt;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::mock::MockSplitQueue;
    use virtio_queue::{Queue, QueueT};
    use vmm_sys_util::tempfile::TempFile;

    const SECTORS: u64 = 64;
    const HDR: u64 = 0x10_0000;
    const DATA: u64 = 0x20_0000;
    const STATUS: u64 = 0x30_0000;
    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    struct Fixture {
        mem: GuestMemoryMmap,
        tmp: TempFile,
        disk: Disk,
    }

    impl Fixture {
        fn new(read_only: bool) -> Self {
            let tmp = TempFile::new().unwrap();
            tmp.as_file().set_len(SECTORS * SECTOR_SIZE).unwrap();
            let disk = Disk::open(tmp.as_path(), read_only, Some("serial-123")).unwrap();
            Self {
                mem: guest_memory(),
                tmp,
                disk,
            }
        }

        fn header(&self, request_type: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&request_type.to_le_bytes());
            h[8..].copy_from_slice(&sector.to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        }

        /// Runs one chain through a fresh queue of `size`; returns (used len, status byte).
        fn run_on(
            &mut self,
            size: u16,
            build: impl FnOnce(&MockSplitQueue<'_, GuestMemoryMmap>),
        ) -> (u32, u8) {
            let vq = MockSplitQueue::create(&self.mem, GuestAddress(0), size);
            build(&vq);
            let mut q: Queue = vq.create_queue().unwrap();
            let chain = q.pop_descriptor_chain(&self.mem).unwrap();
            let used = process_request(&self.mem, chain, &mut self.disk);
            (used, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
        }

        fn run(&mut self, descs: &[Desc]) -> (u32, u8) {
            self.run_on(16, |vq| add_chain(vq, 0, descs))
        }

        fn file_bytes(&self, offset: u64, len: usize) -> Vec<u8> {
            let mut b = vec![0u8; len];
            self.tmp.as_file().read_exact_at(&mut b, offset).unwrap();
            b
        }
    }

    fn request(data: Desc) -> [Desc; 3] {
        [r(HDR, 16), data, w(STATUS, 1)]
    }

    #[test]
    fn write_then_read_back_through_the_file_and_flush() {
        let mut f = Fixture::new(false);
        f.mem
            .write_slice(&[0x5a; 1024], GuestAddress(DATA))
            .unwrap();
        f.header(VIRTIO_BLK_T_OUT, 3);
        assert_eq!(f.run(&request(r(DATA, 1024))), (1, OK));
        assert_eq!(f.file_bytes(3 * 512, 1024), vec![0x5a; 1024]);
        assert_eq!(f.file_bytes(2 * 512, 512), vec![0; 512]);

        f.tmp.as_file().write_all_at(&[7; 512], 10 * 512).unwrap();
        f.header(VIRTIO_BLK_T_IN, 10);
        // Two data segments: 256 + 256 bytes.
        let descs = [
            r(HDR, 16),
            w(DATA, 256),
            w(DATA + 0x1000, 256),
            w(STATUS, 1),
        ];
        assert_eq!(f.run(&descs), (513, OK));
        let mut got = [0u8; 256];
        f.mem
            .read_slice(&mut got, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert_eq!(got, [7; 256]);

        f.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(f.run(&[r(HDR, 16), w(STATUS, 1)]), (1, OK));
    }

    #[test]
    fn a_failed_flush_fails_every_later_flush() {
        let mut f = Fixture::new(false);
        f.disk.set_sync(|_| Err(std::io::Error::from_raw_os_error(libc::EIO)));
        f.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(f.run(&[r(HDR, 16), w(STATUS, 1)]), (1, IOERR));
        f.disk.set_sync(std::fs::File::sync_all);
        for _ in 0..2 {
            f.header(VIRTIO_BLK_T_FLUSH, 0);
            assert_eq!(f.run(&[r(HDR, 16), w(STATUS, 1)]), (1, IOERR));
        }
    }

    #[test]
    fn last_sector_is_reachable() {
        let mut f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_IN, SECTORS - 1);
        assert_eq!(f.run(&request(w(DATA, 512))), (513, OK));
    }

    #[test]
    fn read_only_disk_refuses_writes() {
        let mut f = Fixture::new(true);
        f.mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        for t in [
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ] {
            f.header(t, 0);
            assert_eq!(f.run(&request(r(DATA, 512))), (1, IOERR), "type {t}");
        }
        assert_eq!(f.file_bytes(0, 512), vec![0; 512]);
        f.header(VIRTIO_BLK_T_IN, 0);
        assert_eq!(f.run(&request(w(DATA, 512))), (513, OK));
    }

    #[test]
    fn requests_past_the_end_are_refused() {
        let mut f = Fixture::new(false);
        f.mem
            .write_slice(&[0x5a; 1024], GuestAddress(DATA))
            .unwrap();
        for (t, sector, data) in [
            (VIRTIO_BLK_T_OUT, SECTORS, r(DATA, 512)),
            (VIRTIO_BLK_T_OUT, SECTORS - 1, r(DATA, 1024)),
            (VIRTIO_BLK_T_IN, SECTORS, w(DATA, 512)),
            // sector * 512 overflows u64
            (VIRTIO_BLK_T_IN, u64::MAX / 256, w(DATA, 512)),
            // offset + len overflows u64
            (VIRTIO_BLK_T_OUT, (u64::MAX - 100) / 512, r(DATA, 1024)),
        ] {
            f.header(t, sector);
            assert_eq!(
                f.run(&request(data)),
                (1, IOERR),
                "type {t} sector {sector}"
            );
        }
        assert_eq!(f.tmp.as_file().metadata().unwrap().len(), SECTORS * 512);
    }

    #[test]
    fn malformed_chains_with_a_status_byte_get_ioerr() {
        let mut f = Fixture::new(false);
        let mem_end = MEM_SIZE as u64;
        let cases: Vec<(&str, u32, Vec<Desc>)> = vec![
            (
                "write-only header",
                VIRTIO_BLK_T_IN,
                vec![w(HDR, 16), w(DATA, 512), w(STATUS, 1)],
            ),
            (
                "short header",
                VIRTIO_BLK_T_IN,
                vec![r(HDR, 8), w(DATA, 512), w(STATUS, 1)],
            ),
            (
                "header outside memory",
                VIRTIO_BLK_T_IN,
                vec![r(mem_end - 8, 16), w(STATUS, 1)],
            ),
            (
                "read-only buffer for IN",
                VIRTIO_BLK_T_IN,
                request(r(DATA, 512)).to_vec(),
            ),
            (
                "write-only buffer for OUT",
                VIRTIO_BLK_T_OUT,
                request(w(DATA, 512)).to_vec(),
            ),
            (
                "data outside memory",
                VIRTIO_BLK_T_IN,
                request(w(mem_end - 256, 512)).to_vec(),
            ),
            (
                "data far outside memory",
                VIRTIO_BLK_T_OUT,
                request(r(u64::MAX - 10, 512)).to_vec(),
            ),
            (
                "unaligned length",
                VIRTIO_BLK_T_IN,
                request(w(DATA, 100)).to_vec(),
            ),
            (
                "GET_ID buffer too small",
                VIRTIO_BLK_T_GET_ID,
                request(w(DATA, 19)).to_vec(),
            ),
            ("status only", VIRTIO_BLK_T_IN, vec![w(STATUS, 1)]),
            (
                "empty discard list",
                VIRTIO_BLK_T_DISCARD,
                vec![r(HDR, 16), w(STATUS, 1)],
            ),
            (
                "ragged discard list",
                VIRTIO_BLK_T_DISCARD,
                request(r(DATA, 20)).to_vec(),
            ),
        ];
        for (name, t, descs) in cases {
            f.mem.write_slice(&[0xee; 512], GuestAddress(DATA)).unwrap();
            f.header(t, 0);
            assert_eq!(f.run(&descs), (1, IOERR), "{name}");
        }
        // Nothing was read into guest memory nor written to disk.
        let mut got = [0u8; 512];
        f.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, [0xee; 512]);
        assert_eq!(f.file_bytes(0, 512), vec![0; 512]);
    }

    #[test]
    fn chains_without_a_usable_status_are_skipped() {
        let mut f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_IN, 0);
        // Zero-length status, read-only status, status outside memory.
        for status in [w(STATUS, 0), r(STATUS, 1), w(MEM_SIZE as u64, 1)] {
            let descs = [r(HDR, 16), w(DATA, 512), status];
            assert_eq!(f.run(&descs).0, 0, "{status:?}");
        }
        assert_eq!(f.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), 0xff);
    }

    #[test]
    fn looping_chain_is_skipped() {
        let mut f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_IN, 0);
        let next = VRING_DESC_F_NEXT as u16;
        let write = VRING_DESC_F_WRITE as u16;
        let (used, status) = f.run_on(16, |vq| {
            add_raw_chain(
                vq,
                0,
                &[
                    (HDR, 16, next, 1),
                    (DATA, 512, next | write, 2),
                    (STATUS, 1, next | write, 1),
                ],
            )
        });
        assert_eq!((used, status), (0, 0xff));
        // A `next` index past the table end is as broken.
        let (used, _) = f.run_on(16, |vq| {
            add_raw_chain(vq, 0, &[(HDR, 16, next, 200), (STATUS, 1, write, 0)])
        });
        assert_eq!(used, 0);
    }

    #[test]
    fn too_many_descriptors_get_ioerr() {
        let mut f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_IN, 0);
        let mut descs = vec![r(HDR, 16)];
        // Half-sector segments: the largest valid request then covers the whole disk.
        descs.extend((0..MAX_DESCRIPTORS as u64 - 1).map(|i| w(DATA + i * 256, 256)));
        descs.push(w(STATUS, 1));
        assert_eq!(f.run_on(256, |vq| add_chain(vq, 0, &descs)), (1, IOERR));
        // One data segment fewer is the most allowed.
        descs.remove(1);
        let expect = (MAX_DESCRIPTORS as u32 - 2) * 256 + 1;
        assert_eq!(f.run_on(256, |vq| add_chain(vq, 0, &descs)), (expect, OK));
    }

    #[test]
    fn get_id_returns_the_serial() {
        let mut f = Fixture::new(false);
        f.header(VIRTIO_BLK_T_GET_ID, 0);
        // Split over two buffers, larger than needed.
        let descs = [r(HDR, 16), w(DATA, 4), w(DATA + 0x100, 64), w(STATUS, 1)];
        assert_eq!(f.run(&descs), (21, OK));
        let mut id = [0u8; 20];
        f.mem.read_slice(&mut id[..4], GuestAddress(DATA)).unwrap();
        f.mem
            .read_slice(&mut id[4..], GuestAddress(DATA + 0x100))
            .unwrap();
        assert_eq!(&id, b"serial-123\0\0\0\0\0\0\0\0\0\0");
    }

    #[test]
    fn unsupported_type_gets_unsupp() {
        let mut f = Fixture::new(false);
        f.header(2, 0); // SCSI_CMD
        assert_eq!(f.run(&request(w(DATA, 512))), (1, UNSUPP));
    }

    fn segment(sector: u64, sectors: u32, flags: u32) -> [u8; 16] {
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&sectors.to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        s
    }

    #[test]
    fn write_zeroes_and_discard() {
        let mut f = Fixture::new(false);
        f.tmp.as_file().write_all_at(&[0xaa; 8192], 0).unwrap();
        let mut list = segment(1, 2, 0).to_vec();
        list.extend(segment(8, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP));
        f.mem.write_slice(&list, GuestAddress(DATA)).unwrap();
        f.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        assert_eq!(f.run(&request(r(DATA, 32))), (1, OK));
        assert_eq!(f.file_bytes(0, 512), vec![0xaa; 512]);
        assert_eq!(f.file_bytes(512, 1024), vec![0; 1024]);
        assert_eq!(f.file_bytes(1536, 512), vec![0xaa; 512]);
        assert_eq!(f.file_bytes(8 * 512, 512), vec![0; 512]);

        f.mem
            .write_slice(&segment(12, 2, 0), GuestAddress(DATA))
            .unwrap();
        f.header(VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(f.run(&request(r(DATA, 16))), (1, OK));
    }

    #[test]
    fn zeroing_segments_are_bounded_by_what_the_config_offers() {
        let mut f = Fixture::new(false);
        // A sparse 1 TiB image, so that only the bound can refuse the segment.
        f.tmp.as_file().set_len(1 << 40).unwrap();
        // A new Disk for the new size, on the file the fixture's Disk already has (and locks).
        f.disk = Disk::from_file(f.tmp.as_file().try_clone().unwrap(), false, [0; ID_BYTES]).unwrap();
        f.tmp.as_file().write_all_at(&[0xaa; 512], 0).unwrap();
        f.mem.write_slice(&segment(0, MAX_ZEROES_SECTORS + 1, 0), GuestAddress(DATA)).unwrap();
        f.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        assert_eq!(f.run(&request(r(DATA, 16))), (1, IOERR));
        assert_eq!(f.file_bytes(0, 512), vec![0xaa; 512]);
        f.mem.write_slice(&segment(0, MAX_ZEROES_SECTORS, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP), GuestAddress(DATA)).unwrap();
        assert_eq!(f.run(&request(r(DATA, 16))), (1, OK));
        assert_eq!(f.file_bytes(0, 512), vec![0; 512]);
    }

    #[test]
    fn discard_checks_flags_and_ranges_before_touching_the_disk() {
        let mut f = Fixture::new(false);
        f.tmp.as_file().write_all_at(&[0xaa; 1024], 0).unwrap();
        f.mem
            .write_slice(
                &segment(0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP),
                GuestAddress(DATA),
            )
            .unwrap();
        f.header(VIRTIO_BLK_T_DISCARD, 0);
        assert_eq!(f.run(&request(r(DATA, 16))), (1, UNSUPP));

        // The first segment is fine, the second runs past the end: neither is applied.
        let mut list = segment(0, 1, 0).to_vec();
        list.extend(segment(SECTORS - 1, 2, 0));
        f.mem.write_slice(&list, GuestAddress(DATA)).unwrap();
        f.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        assert_eq!(f.run(&request(r(DATA, 32))), (1, IOERR));
        assert_eq!(f.file_bytes(0, 512), vec![0xaa; 512]);

        f.mem
            .write_slice(&segment(0, 1, 0x80), GuestAddress(DATA))
            .unwrap();
        assert_eq!(f.run(&request(r(DATA, 16))), (1, UNSUPP));

        let too_many = (MAX_DISCARD_SEGMENTS + 1) * 16;
        assert_eq!(f.run(&request(r(DATA, too_many))), (1, IOERR));
    }
}
