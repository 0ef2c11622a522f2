//! Transmit path: each TX chain (vnet header + Ethernet frame, device-readable) is gathered into
//! one buffer and handed to the TAP as one write.

use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestMemoryError, GuestMemoryMmap};

use super::{ETH_HLEN, MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::virtio::complete_chains;

/// Why a TX chain was dropped.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    #[error("TX chain is empty, loops, or leaves the descriptor table")]
    BrokenChain,
    #[error("TX chain has a device-writable descriptor")]
    WriteOnlyDescriptor,
    #[error("TX frame is longer than {MAX_FRAME_LEN} bytes")]
    TooLong,
    #[error("TX frame of {0} bytes is shorter than a vnet and an Ethernet header")]
    TooShort(usize),
    #[error("cannot read the TX frame from guest memory: {0}")]
    Memory(GuestMemoryError),
}

/// Copies the chain into `frame` (at least [`MAX_FRAME_LEN`] bytes long); returns the frame length.
pub fn read_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    frame: &mut [u8],
) -> Result<usize, TxError> {
    let cap = frame.len().min(MAX_FRAME_LEN);
    let frame = &mut frame[..cap];
    let mut len = 0usize;
    let mut last = None;
    for desc in chain {
        if desc.is_write_only() {
            return Err(TxError::WriteOnlyDescriptor);
        }
        let end = len
            .checked_add(desc.len() as usize)
            .ok_or(TxError::TooLong)?;
        let dst = frame.get_mut(len..end).ok_or(TxError::TooLong)?;
        mem.read_slice(dst, desc.addr()).map_err(TxError::Memory)?;
        len = end;
        last = Some(desc);
    }
    // A last descriptor that still says "next" means the walk was cut short.
    if last.is_none_or(|d| d.has_next()) {
        return Err(TxError::BrokenChain);
    }
    if len < VNET_HDR_LEN + ETH_HLEN {
        return Err(TxError::TooShort(len));
    }
    Ok(len)
}

/// Sends every frame the driver queued through `send`; every chain is completed, sent or not.
/// Returns how many chains there were.
pub fn process_queue(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    frame: &mut [u8],
    mut send: impl FnMut(&[u8]),
) -> usize {
    complete_chains(mem, queue, "virtio-net TX", |chain| {
        match read_frame(mem, chain, frame) {
            Ok(len) => send(&frame[..len]),
            Err(e) => log::warn!("virtio-net: dropping TX frame: {e}"),
        }
        // The device writes nothing into TX buffers.
        0
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{
        add_chain, add_raw_chain, guest_memory, r, used_entry, w, Desc, MEM_SIZE,
    };
    use virtio_bindings::virtio_ring::VRING_DESC_F_NEXT;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestAddress;

    fn run(mem: &GuestMemoryMmap, chains: &[&[Desc]]) -> Vec<Vec<u8>> {
        let vq = MockSplitQueue::create(mem, GuestAddress(0), 16);
        let mut first = 0;
        for c in chains {
            add_chain(&vq, first, c);
            first += c.len() as u16;
        }
        let mut q: Queue = vq.create_queue().unwrap();
        let mut frame = vec![0u8; MAX_FRAME_LEN];
        let mut sent = Vec::new();
        let n = process_queue(mem, &mut q, &mut frame, |f| sent.push(f.to_vec()));
        assert_eq!(n, chains.len());
        assert_eq!(vq.used().idx().load() as usize, chains.len());
        for i in 0..chains.len() {
            assert_eq!(used_entry(&vq, i as u16).1, 0);
        }
        sent
    }

    #[test]
    fn frame_is_assembled_from_all_descriptors() {
        let mem = guest_memory();
        mem.write_slice(&[1; 12], GuestAddress(0x10_0000)).unwrap();
        mem.write_slice(&[2; 20], GuestAddress(0x20_0000)).unwrap();
        mem.write_slice(&[3; 30], GuestAddress(0x30_0000)).unwrap();
        let sent = run(
            &mem,
            &[&[r(0x10_0000, 12), r(0x20_0000, 20), r(0x30_0000, 30)]],
        );
        let mut expect = vec![1; 12];
        expect.extend([2; 20]);
        expect.extend([3; 30]);
        assert_eq!(sent, vec![expect]);
    }

    #[test]
    fn bad_chains_are_dropped_and_completed() {
        let mem = guest_memory();
        let end = MEM_SIZE as u64;
        let good: &[Desc] = &[r(0x10_0000, 60)];
        let sent = run(
            &mem,
            &[
                &[r(0x10_0000, 12), w(0x20_0000, 60)], // device-writable
                &[r(0x10_0000, 20)],                   // shorter than headers
                &[r(end - 10, 60)],                    // outside guest memory
                &[r(0x10_0000, 40_000), r(0x20_0000, 40_000)], // too long
                &[r(0x10_0000, u32::MAX)],
                good,
            ],
        );
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].len(), 60);
    }

    #[test]
    fn looping_chain_is_dropped() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let next = VRING_DESC_F_NEXT as u16;
        add_raw_chain(
            &vq,
            0,
            &[(0x10_0000, 30, next, 1), (0x10_0000, 30, next, 0)],
        );
        let mut q: Queue = vq.create_queue().unwrap();
        let mut frame = vec![0u8; MAX_FRAME_LEN];
        let mut sent = 0;
        assert_eq!(process_queue(&mem, &mut q, &mut frame, |_| sent += 1), 1);
        assert_eq!(sent, 0);
        assert_eq!(used_entry(&vq, 0), (0, 0));
    }
}
