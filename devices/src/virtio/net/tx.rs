//! Transmit path: each TX chain (vnet header + Ethernet frame, device-readable) goes to the TAP
//! in one writev straight from the guest's buffers, with no copy of its own.

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{GuestMemoryError, GuestMemoryMmap, Permissions};

use super::{ETH_HLEN, MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::virtio::{complete_chains, push_guest_iovecs, IOV_MAX};

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
    #[error("TX frame is in more than {IOV_MAX} pieces")]
    TooManyPieces,
    #[error("TX buffer is not in guest memory: {0}")]
    Memory(GuestMemoryError),
}

/// A TX chain's buffers, checked, in the form writev takes. Kept across chains to reuse its memory.
#[derive(Default)]
pub struct Gathered {
    iov: Vec<libc::iovec>,
}

// SAFETY: the iovecs point into guest memory, which every thread may access; they are only
// dereferenced by the kernel during writev, while the guest memory they came from is mapped.
unsafe impl Send for Gathered {}

impl Gathered {
    /// The frame's pieces, in order.
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iov
    }
}

/// Checks the chain and collects its buffers into `out`; returns the frame length.
pub fn gather_frame(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    out: &mut Gathered,
) -> Result<usize, TxError> {
    out.iov.clear();
    let mut len = 0usize;
    let mut last = None;
    for desc in chain {
        if desc.is_write_only() {
            return Err(TxError::WriteOnlyDescriptor);
        }
        len = len
            .checked_add(desc.len() as usize)
            .filter(|&l| l <= MAX_FRAME_LEN)
            .ok_or(TxError::TooLong)?;
        push_guest_iovecs(
            mem,
            desc.addr(),
            desc.len() as usize,
            Permissions::Read,
            &mut out.iov,
        )
        .map_err(TxError::Memory)?;
        if out.iov.len() > IOV_MAX {
            return Err(TxError::TooManyPieces);
        }
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

/// Sends every frame the driver queued through `send` (its pieces and its length); every chain is
/// completed, sent or not. Returns how many chains there were.
pub fn process_queue(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    scratch: &mut Gathered,
    mut send: impl FnMut(&[libc::iovec], usize),
) -> usize {
    // One ring's worth per call; the device kicks itself to come back for the rest.
    complete_chains(mem, queue, "virtio-net TX", usize::from(queue.size()), |chain| {
        match gather_frame(mem, chain, scratch) {
            Ok(len) => send(scratch.iovecs(), len),
            Err(e) => crate::warn_limited!("virtio-net: dropping TX frame: {e}"),
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
    use vm_memory::{Bytes, GuestAddress};

    /// The bytes the iovecs cover, in order (the test's guest memory holds still meanwhile).
    fn flatten(iov: &[libc::iovec]) -> Vec<u8> {
        iov.iter()
            // SAFETY: gather_frame made each iovec from a slice of live guest memory.
            .flat_map(|v| unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) })
            .copied()
            .collect()
    }

    fn run(mem: &GuestMemoryMmap, chains: &[&[Desc]]) -> Vec<Vec<u8>> {
        let vq = MockSplitQueue::create(mem, GuestAddress(0), 16);
        let mut first = 0;
        for c in chains {
            add_chain(&vq, first, c);
            first += c.len() as u16;
        }
        let mut q: Queue = vq.create_queue().unwrap();
        let mut scratch = Gathered::default();
        let mut sent = Vec::new();
        let n = process_queue(mem, &mut q, &mut scratch, |iov, len| {
            let frame = flatten(iov);
            assert_eq!(frame.len(), len);
            sent.push(frame)
        });
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
        let mut sent = 0;
        let mut scratch = Gathered::default();
        assert_eq!(
            process_queue(&mem, &mut q, &mut scratch, |_, _| sent += 1),
            1
        );
        assert_eq!(sent, 0);
        assert_eq!(used_entry(&vq, 0), (0, 0));
    }
}
