//! The virtio-mmio transport in front of a real virtio-blk device, driven by register reads and
//! writes in any order and width (the status handshake, activation, reset and the config space
//! included), with turns of the device's event loop in between, as its thread would take them.
//!
//! Input: an operation count, then 8 bytes per operation (kind, offset low and high, a 32-bit
//! value, a spare byte), then the shape and contents of guest memory (see `nvmm_fuzz::guest`),
//! where the queue's rings are. Kind, low 2 bits: read, write, an event-loop turn, or the whole
//! handshake up to DRIVER_OK with the rings at `nvmm_fuzz`'s addresses; bits 2-3: the access
//! width, 1, 2, 4 or 8 bytes.

#![no_main]

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use libfuzzer_sys::fuzz_target;
use nvmm_devices::bus::BusDevice;
use nvmm_devices::virtio::{Block, BlockConfig, MmioTransport, MMIO_LEN};
use nvmm_fuzz::{disk_image, AVAIL_RING, DESC_TABLE, DISK_LEN, USED_RING};

const MAX_OPS: usize = 256;

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

/// What a driver does to reach DRIVER_OK with one queue of `size` (virtio 1.2, 3.1.1).
fn handshake(t: &mut MmioTransport, size: u32) {
    for status in [1, 3] {
        write32(t, 0x70, status);
    }
    write32(t, 0x24, 1);
    write32(t, 0x20, 1); // VIRTIO_F_VERSION_1
    write32(t, 0x24, 0);
    write32(t, 0x20, 0);
    write32(t, 0x70, 11);
    write32(t, 0x30, 0);
    write32(t, 0x38, size);
    for (reg, addr) in [(0x80, DESC_TABLE), (0x90, AVAIL_RING), (0xa0, USED_RING)] {
        write32(t, reg, addr as u32);
        write32(t, reg + 4, 0);
    }
    write32(t, 0x44, 1);
    write32(t, 0x70, 15);
}

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let ops = usize::from(count).min(MAX_OPS);
    if rest.len() < ops * 8 {
        return;
    }
    let (script, memory) = rest.split_at(ops * 8);
    let (mem, _shape) = nvmm_fuzz::memory(memory);
    let path = format!("/proc/self/fd/{}", disk_image().as_raw_fd());
    let block = Block::new(BlockConfig { path: path.into(), read_only: false, id: Some("fuzz".into()) })
        .expect("cannot open the disk image");
    let block = Arc::new(Mutex::new(block));
    let mut transport = MmioTransport::new(mem, block.clone());
    let mut events = EventManager::<Subscriber>::new().expect("cannot create an event manager");
    events.add_subscriber(block);
    for op in script.chunks_exact(8) {
        let offset = u64::from(u16::from_le_bytes([op[1], op[2]])) % MMIO_LEN;
        let width = 1usize << ((op[0] >> 2) & 3);
        let value = [op[3], op[4], op[5], op[6], op[7], 0, 0, 0];
        match op[0] & 3 {
            0 => {
                let mut buf = [0u8; 8];
                transport.read(offset, &mut buf[..width]);
            }
            1 => transport.write(offset, &value[..width]),
            2 => {
                events.run_with_timeout(0).expect("the event loop fails");
            }
            _ => handshake(&mut transport, u32::from(op[3]) + 1),
        }
    }
    let len = disk_image().metadata().map(|m| m.len()).ok();
    assert_eq!(len, Some(DISK_LEN), "requests never grow the image");
});
