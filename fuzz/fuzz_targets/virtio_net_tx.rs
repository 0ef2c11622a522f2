//! TX chains from arbitrary guest memory (see `nvmm_fuzz::guest`), gathered into frames: every
//! piece must lie inside guest memory and the pieces must add up to the frame's length.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nvmm_devices::virtio::net::{tx, MAX_FRAME_LEN, VNET_HDR_LEN};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

fuzz_target!(|data: &[u8]| {
    let (mem, mut queue) = nvmm_fuzz::guest(data);
    let mut scratch = tx::Gathered::default();
    tx::process_queue(&mem, &mut queue, &mut scratch, |iov, len| {
        assert!(len >= VNET_HDR_LEN && len <= MAX_FRAME_LEN);
        assert_eq!(iov.iter().map(|v| v.iov_len).sum::<usize>(), len);
        for v in iov {
            // Each piece is host memory backing guest RAM, whole.
            let start = v.iov_base as usize;
            let inside = mem.iter().any(|r| {
                let base = r.as_ptr() as usize;
                start >= base && start + v.iov_len <= base + r.len() as usize
            });
            assert!(inside, "TX piece outside guest memory");
        }
    });
});
