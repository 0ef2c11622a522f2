//! One RX queue driven through many rounds of refills, as a hostile driver would drive it: each
//! round moves the available index on by an amount from the input (up to two rings at once),
//! writes one ring slot, and may have a frame delivered. Whatever the driver does, the device
//! never holds more buffers than the queue has entries, nor the same chain twice.
//!
//! Input: a round count, then 4 bytes per round (index step, low and high; ring slot; head, whose
//! bit 7 asks for a delivery and bit 6 for mergeable buffers), then the shape and contents of
//! guest memory (see `nvmm_fuzz::guest`).

#![no_main]

use std::collections::HashSet;

use libfuzzer_sys::fuzz_target;
use nvmm_devices::virtio::net::rx::RxBuffers;
use nvmm_fuzz::{AVAIL_RING, QUEUE_SIZE};
use vm_memory::{Bytes, GuestAddress};

const MAX_ROUNDS: usize = 64;

fuzz_target!(|data: &[u8]| {
    let Some((&count, rest)) = data.split_first() else {
        return;
    };
    let rounds = usize::from(count).min(MAX_ROUNDS);
    if rest.len() < rounds * 4 {
        return;
    }
    let (script, memory) = rest.split_at(rounds * 4);
    let (mem, mut queue) = nvmm_fuzz::guest(memory);
    let mut rx = RxBuffers::default();
    let mut frame = vec![0x5a; 1514 + 12];
    for round in script.chunks_exact(4) {
        let step = u16::from_le_bytes([round[0], round[1]]) % (2 * QUEUE_SIZE + 1);
        let slot = u64::from(round[2]) % u64::from(QUEUE_SIZE);
        let head = u16::from(round[3] & 0x3f) % QUEUE_SIZE;
        let idx_at = GuestAddress(AVAIL_RING + 2);
        let idx: u16 = mem.read_obj(idx_at).expect("the ring is in guest memory");
        mem.write_obj(idx.wrapping_add(step), idx_at).expect("the ring is in guest memory");
        mem.write_obj(head, GuestAddress(AVAIL_RING + 4 + 2 * slot)).expect("the ring is in guest memory");
        rx.refill(&mem, &mut queue);
        if round[3] & 0x80 != 0 {
            rx.deliver(&mem, &mut queue, &mut frame, round[3] & 0x40 != 0);
        }
        assert!(rx.len() <= usize::from(QUEUE_SIZE), "{} buffers held", rx.len());
        let mut seen = HashSet::new();
        assert!(rx.heads().all(|h| seen.insert(h)), "a chain held twice");
    }
});
