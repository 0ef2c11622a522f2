//! Shared by the fuzz targets: a guest built from the fuzzer's bytes.
//!
//! [`guest`] takes a shape byte, then the memory's contents. The shape picks how guest memory is
//! laid out and how the queue runs, so that every target meets what a real guest can give it:
//! - bit 0: the first 64 KiB are two regions split at 32 KiB (buffers straddle a region boundary);
//! - bit 1: a third region of 64 KiB at 0x2_0000, after a hole (buffers may end in the hole);
//! - bit 2: event indexes negotiated (`used_event` and `avail_event` in the rings are used).
//!
//! The bytes after the shape fill the first 64 KiB, then the third region, so the descriptor
//! table, the available ring and every buffer a descriptor points to come from the fuzzer. The
//! queue's rings sit at fixed addresses; descriptor addresses may point anywhere, in guest memory
//! or not.

use std::fs::File;
use std::sync::OnceLock;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM_SIZE: usize = 0x1_0000;
pub const QUEUE_SIZE: u16 = 16;
pub const DESC_TABLE: u64 = 0x0;
pub const AVAIL_RING: u64 = 0x100;
pub const USED_RING: u64 = 0x200;
/// Where the third region starts when bit 1 of the shape asks for it.
pub const HIGH_REGION: u64 = 0x2_0000;
/// The size of the disk image the block targets run against.
pub const DISK_LEN: u64 = 0x1_0000;

/// One disk image of [`DISK_LEN`] bytes for the whole run, created once and unlinked at once, so
/// nothing is left behind; a target opens or dups it for each input.
pub fn disk_image() -> &'static File {
    static IMAGE: OnceLock<File> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("nvmm-fuzz-disk-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("cannot create the disk image");
        let _ = std::fs::remove_file(&path);
        file.set_len(DISK_LEN).expect("cannot size the disk image");
        file
    })
}

/// How guest memory is laid out and the queue runs (see the module docs).
#[derive(Debug, Clone, Copy)]
pub struct Shape(pub u8);

impl Shape {
    pub fn split(self) -> bool {
        self.0 & 1 != 0
    }
    pub fn high_region(self) -> bool {
        self.0 & 2 != 0
    }
    pub fn event_idx(self) -> bool {
        self.0 & 4 != 0
    }

    /// The regions of guest memory, in address order.
    pub fn regions(self) -> Vec<(GuestAddress, usize)> {
        let mut r = if self.split() {
            vec![(GuestAddress(0), MEM_SIZE / 2), (GuestAddress(MEM_SIZE as u64 / 2), MEM_SIZE / 2)]
        } else {
            vec![(GuestAddress(0), MEM_SIZE)]
        };
        if self.high_region() {
            r.push((GuestAddress(HIGH_REGION), MEM_SIZE));
        }
        r
    }
}

/// Guest memory shaped by `bytes[0]` and filled from the rest; returns it with its shape.
pub fn memory(bytes: &[u8]) -> (GuestMemoryMmap, Shape) {
    let (shape, contents) = match bytes.split_first() {
        Some((&s, rest)) => (Shape(s), rest),
        None => (Shape(0), bytes),
    };
    let mem = GuestMemoryMmap::from_ranges(&shape.regions()).expect("cannot allocate guest memory");
    let low = contents.len().min(MEM_SIZE);
    mem.write_slice(&contents[..low], GuestAddress(0)).expect("the write is within guest memory");
    if shape.high_region() {
        let high = &contents[low..];
        let n = high.len().min(MEM_SIZE);
        mem.write_slice(&high[..n], GuestAddress(HIGH_REGION)).expect("the write is within guest memory");
    }
    (mem, shape)
}

/// Guest memory as [`memory`] makes it, and a ready queue of [`QUEUE_SIZE`] over it.
pub fn guest(bytes: &[u8]) -> (GuestMemoryMmap, Queue) {
    let (mem, shape) = memory(bytes);
    let mut queue = Queue::new(QUEUE_SIZE).expect("valid queue size");
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_event_idx(shape.event_idx());
    queue.set_ready(true);
    (mem, queue)
}
