//! virtio-blk backed by a raw image file (or a host block device), one request queue.
//!
//! - [`disk`]: the image file: positional I/O straight between the file and guest memory.
//! - [`request`]: parses one descriptor chain into a request and executes it on the disk.
//! - `device`: the [`Block`] device: features, config space, activation, queue processing.
//! - `event_handler`: runs the queue on the event-manager thread.

mod device;
pub mod disk;
mod event_handler;
pub mod request;

use std::io;
use std::path::PathBuf;

pub use device::{process_queue, Block, BlockConfig};
pub use disk::Disk;

/// Bytes per sector: the unit of `virtio_blk_outhdr.sector` and of the capacity.
pub const SECTOR_SIZE: u64 = 512;
/// Entries in the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data segments per request the driver may use (config `seg_max`); a request has two descriptors
/// more, for the header and the status.
pub const SEG_MAX: u32 = 128;
/// Length of the serial returned by GET_ID.
pub const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;
/// Segments per DISCARD or WRITE_ZEROES request (config `max_discard_seg`, `max_write_zeroes_seg`).
pub const MAX_DISCARD_SEGMENTS: u32 = 32;
/// Sectors per DISCARD or WRITE_ZEROES segment (config `max_discard_sectors`,
/// `max_write_zeroes_sectors`): 32 MiB, so one request, which the device works through while
/// holding its lock, zeroes at most 1 GiB even where that means writing the zeroes.
pub const MAX_ZEROES_SECTORS: u32 = 1 << 16;

fn access(read_only: &bool) -> &'static str {
    if *read_only {
        "read-only"
    } else {
        "read-write"
    }
}

/// Errors from creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image cannot be opened.
    #[error("cannot open disk image {} {}: {err}", .path.display(), access(.read_only))]
    Open {
        path: PathBuf,
        read_only: bool,
        err: io::Error,
    },
    /// Another user holds a lock on the image that ours conflicts with.
    #[error("disk image {} is in use: {holder}; nvmm opens it {} only when no other user has it {}", .path.display(), access(.read_only), if *.read_only { "read-write" } else { "open" })]
    Locked {
        path: PathBuf,
        read_only: bool,
        holder: disk::LockHolder,
    },
    /// The image size cannot be found (seek to its end failed).
    #[error("cannot get the size of disk image {}: {err}", .path.display())]
    Size { path: PathBuf, err: io::Error },
    /// No `id` was given and the image cannot be stat'ed to derive one.
    #[error("cannot stat disk image {} to derive its serial: {err}", .path.display())]
    Stat { path: PathBuf, err: io::Error },
    /// The serial does not fit in the 20 bytes GET_ID returns.
    #[error("block device id '{0}' is longer than {ID_BYTES} bytes")]
    IdTooLong(String),
    /// Creating an eventfd failed.
    #[error("cannot create an eventfd for the block device: {0}")]
    EventFd(io::Error),
}
