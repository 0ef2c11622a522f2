//! TX chains from arbitrary guest memory (see `nvmm_fuzz::guest`), gathered into frames.

#![no_main]

use libfuzzer_sys::fuzz_target;
use nvmm_devices::virtio::net::{tx, MAX_FRAME_LEN, VNET_HDR_LEN};

fuzz_target!(|data: &[u8]| {
    let (mem, mut queue) = nvmm_fuzz::guest(data);
    let mut frame = vec![0u8; MAX_FRAME_LEN];
    tx::process_queue(&mem, &mut queue, &mut frame, |f| {
        assert!(f.len() >= VNET_HDR_LEN && f.len() <= MAX_FRAME_LEN);
    });
});
