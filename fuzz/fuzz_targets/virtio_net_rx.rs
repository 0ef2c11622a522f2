//! RX buffers from arbitrary guest memory (see `nvmm_fuzz::guest`), filled with frames whose
//! lengths come from the first two input bytes; bit 0 of the third picks mergeable buffers, bit 1
//! the direct path (a read straight into the buffers, which must all lie in guest memory).

#![no_main]

use libfuzzer_sys::fuzz_target;
use nvmm_devices::virtio::net::rx::{Delivery, RxBuffers, TapRead};
use nvmm_devices::virtio::net::MAX_FRAME_LEN;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

fuzz_target!(|data: &[u8]| {
    let [a, b, flags, memory @ ..] = data else {
        return;
    };
    let len = usize::from(u16::from_le_bytes([*a, *b])).min(MAX_FRAME_LEN);
    let (mem, mut queue) = nvmm_fuzz::guest(memory);
    let mut rx = RxBuffers::default();
    rx.refill(&mem, &mut queue);
    let mut frame = vec![0x5a; len];
    if flags & 2 != 0 {
        let regions: Vec<(usize, usize)> =
            mem.iter().map(|r| (r.as_ptr() as usize, r.len() as usize)).collect();
        for _ in 0..=nvmm_fuzz::QUEUE_SIZE {
            let got = rx.receive_direct(&mem, &mut queue, flags & 1 != 0, |iov| {
                let mut left = len;
                for v in iov {
                    let start = v.iov_base as usize;
                    let inside = regions
                        .iter()
                        .any(|&(b, l)| start >= b && start + v.iov_len <= b + l);
                    assert!(inside, "RX piece outside guest memory");
                    let n = left.min(v.iov_len);
                    // SAFETY: checked just above to lie inside guest memory.
                    unsafe { std::ptr::write_bytes(v.iov_base.cast::<u8>(), 0x5a, n) };
                    left -= n;
                }
                assert!(iov.iter().map(|v| v.iov_len).sum::<usize>() >= MAX_FRAME_LEN);
                Ok(len)
            });
            if !matches!(got, Some(TapRead::Frame(_))) {
                break;
            }
        }
        return;
    }
    // Deliver until the buffers run out; each delivery consumes at least one buffer.
    for _ in 0..=nvmm_fuzz::QUEUE_SIZE {
        if rx.deliver(&mem, &mut queue, &mut frame, flags & 1 != 0) != Delivery::Delivered {
            break;
        }
    }
});
