//! RX buffers from arbitrary guest memory (see `nvmm_fuzz::guest`), filled with frames whose
//! lengths come from the first two input bytes; bit 0 of the third picks mergeable buffers.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nvmm_devices::virtio::net::rx::{Delivery, RxBuffers};
use nvmm_devices::virtio::net::MAX_FRAME_LEN;

fuzz_target!(|data: &[u8]| {
    let [a, b, flags, memory @ ..] = data else {
        return;
    };
    let len = usize::from(u16::from_le_bytes([*a, *b])).min(MAX_FRAME_LEN);
    let (mem, mut queue) = nvmm_fuzz::guest(memory);
    let mut rx = RxBuffers::default();
    rx.refill(&mem, &mut queue);
    let mut frame = vec![0x5a; len];
    // Deliver until the buffers run out; each delivery consumes at least one buffer.
    for _ in 0..=nvmm_fuzz::QUEUE_SIZE {
        if rx.deliver(&mem, &mut queue, &mut frame, flags & 1 != 0) != Delivery::Delivered {
            break;
        }
    }
});
