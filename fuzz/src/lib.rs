//! Shared by the fuzz targets: a guest built from the fuzzer's bytes.
//!
//! The input's bytes become the first 64 KiB of guest memory, so the descriptor table, the
//! available ring and every buffer a descriptor points to come from the fuzzer. The queue's rings
//! sit at fixed addresses; descriptor addresses may point anywhere, in guest memory or not.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

pub const MEM_SIZE: usize = 0x1_0000;
pub const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0x0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;

/// Guest memory holding `bytes`, and a ready queue over it.
pub fn guest(bytes: &[u8]) -> (GuestMemoryMmap, Queue) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)])
        .expect("cannot allocate guest memory");
    let n = bytes.len().min(MEM_SIZE);
    mem.write_slice(&bytes[..n], GuestAddress(0))
        .expect("the write is within guest memory");
    let mut queue = Queue::new(QUEUE_SIZE).expect("valid queue size");
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    (mem, queue)
}
