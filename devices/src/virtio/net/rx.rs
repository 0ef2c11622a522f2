//! Receive path: a frame from the TAP (vnet header first) is copied into the guest's RX buffers.
//!
//! The driver's available RX chains are taken off the queue as soon as they are seen, checked
//! (device-writable, inside guest memory) and kept in order in [`RxBuffers`]; chains that cannot
//! hold anything go straight back with length 0. A frame is delivered only once enough buffers are
//! known to hold it (one buffer without `VIRTIO_NET_F_MRG_RXBUF`, several with it), so a frame
//! never needs to be taken back half-written.

use std::collections::VecDeque;
use std::io;
use std::mem::offset_of;

use virtio_bindings::virtio_net::virtio_net_hdr_v1;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::{MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::virtio::{add_used_batch, push_guest_iovecs, IOV_MAX};

/// Descriptors one RX chain may have. Linux uses 1 (mergeable buffers) or about 20 (big packets).
pub const MAX_RX_DESCRIPTORS: usize = 64;
const NUM_BUFFERS: usize = offset_of!(virtio_net_hdr_v1, num_buffers);

/// Why an RX chain was given back unused.
#[derive(Debug, thiserror::Error)]
pub enum RxError {
    #[error("RX chain is empty, loops, or leaves the descriptor table")]
    BrokenChain,
    #[error("RX chain has a device-readable descriptor")]
    ReadOnlyDescriptor,
    #[error("RX chain has more than {MAX_RX_DESCRIPTORS} descriptors")]
    TooManyDescriptors,
    #[error("RX buffer at {addr:#x}, {len} bytes, is outside guest memory")]
    OutsideMemory { addr: u64, len: u32 },
    #[error("RX chain of {0} bytes cannot hold a vnet header")]
    TooSmall(usize),
}

/// What became of a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// Written to the guest and put in the used ring.
    Delivered,
    /// Not enough buffers yet: keep the frame and wait for the driver to add some.
    NoRoom,
    /// The frame can never fit the buffers this driver gives: dropped.
    Dropped,
}

/// What one read from the TAP gave, whichever buffer it went into.
#[derive(Debug)]
pub enum TapRead {
    /// A frame of this many bytes, vnet header included.
    Frame(usize),
    /// Nothing to read.
    Empty,
    /// A frame too short for its vnet header (no TAP sends one): to be dropped.
    Runt(usize),
    Failed(io::Error),
}

impl From<io::Result<usize>> for TapRead {
    fn from(read: io::Result<usize>) -> TapRead {
        match read {
            Ok(0) => TapRead::Empty,
            Ok(len) if len < VNET_HDR_LEN => TapRead::Runt(len),
            Ok(len) => TapRead::Frame(len),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => TapRead::Empty,
            Err(e) => TapRead::Failed(e),
        }
    }
}

/// One RX chain, checked: its writable segments in order.
#[derive(Debug)]
struct RxBuffer {
    head: u16,
    segments: Vec<(GuestAddress, u32)>,
    capacity: usize,
}

impl RxBuffer {
    fn parse(
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Result<Self, RxError> {
        let head = chain.head_index();
        let mut segments = Vec::new();
        let mut capacity = 0usize;
        let mut last = None;
        for desc in chain {
            if !desc.is_write_only() {
                return Err(RxError::ReadOnlyDescriptor);
            }
            if segments.len() == MAX_RX_DESCRIPTORS {
                return Err(RxError::TooManyDescriptors);
            }
            if !mem.check_range(desc.addr(), desc.len() as usize, Permissions::Write) {
                return Err(RxError::OutsideMemory {
                    addr: desc.addr().0,
                    len: desc.len(),
                });
            }
            segments.push((desc.addr(), desc.len()));
            capacity += desc.len() as usize;
            last = Some(desc);
        }
        if last.is_none_or(|d| d.has_next()) {
            return Err(RxError::BrokenChain);
        }
        if capacity < VNET_HDR_LEN {
            return Err(RxError::TooSmall(capacity));
        }
        Ok(Self {
            head,
            segments,
            capacity,
        })
    }

    /// Writes as much of `bytes` as fits from `offset` bytes into the buffer, across segments;
    /// returns how many bytes it wrote.
    fn write_at(&self, mem: &GuestMemoryMmap, mut offset: usize, bytes: &[u8]) -> usize {
        let mut done = 0;
        for &(addr, len) in &self.segments {
            let len = len as usize;
            if offset >= len {
                offset -= len;
                continue;
            }
            let n = (len - offset).min(bytes.len() - done);
            if n == 0 {
                break;
            }
            // Checked against guest memory when the chain was taken; memory does not shrink.
            let at = GuestAddress(addr.0 + offset as u64);
            if let Err(e) = mem.write_slice(&bytes[done..done + n], at) {
                crate::error_limited!("virtio-net: cannot write an RX buffer: {e}");
                break;
            }
            done += n;
            offset = 0;
        }
        done
    }
}

/// The RX buffers taken from the queue and not yet used, in the driver's order.
#[derive(Debug, Default)]
pub struct RxBuffers {
    buffers: VecDeque<RxBuffer>,
}

impl RxBuffers {
    /// Takes the chains the driver made available, up to the queue size in all: a driver that
    /// offers more than it has (the available index moved by more than the chains it wrote)
    /// cannot make the device hold more. A chain whose head is already held is the same buffer
    /// offered twice: it is not taken again. Unusable chains are completed at once with length 0;
    /// returns whether there were any (the driver must then be told).
    pub fn refill(&mut self, mem: &GuestMemoryMmap, queue: &mut Queue) -> bool {
        let mut returned = false;
        let limit = usize::from(queue.size());
        // At most one ring's worth of chains per call: bounded work whatever the index says.
        for _ in 0..limit {
            if self.buffers.len() >= limit {
                // Full: the rest wait in the ring until frames use some of these.
                break;
            }
            let Some(chain) = queue.pop_descriptor_chain(mem) else {
                break;
            };
            let head = chain.head_index();
            if self.buffers.iter().any(|b| b.head == head) {
                crate::warn_limited!("virtio-net: RX chain {head} offered again while the device holds it; ignored");
                continue;
            }
            match RxBuffer::parse(mem, chain) {
                Ok(buffer) => self.buffers.push_back(buffer),
                Err(e) => {
                    crate::warn_limited!("virtio-net: returning RX chain {head} unused: {e}");
                    returned |= queue.add_used(mem, head, 0).is_ok();
                }
            }
        }
        returned
    }

    /// The head index of each buffer held, in order.
    pub fn heads(&self) -> impl Iterator<Item = u16> + '_ {
        self.buffers.iter().map(|b| b.head)
    }

    /// Buffers held.
    pub fn len(&self) -> usize {
        self.buffers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buffers.is_empty()
    }

    /// Forgets every buffer (device reset).
    pub fn clear(&mut self) {
        self.buffers.clear();
    }

    /// Reads one frame with `read` straight into the held buffers, when they can take the largest
    /// frame there is: the TAP would cut a frame that does not fit, and the rest of it would be
    /// lost. Otherwise returns `None` and leaves everything as it was; the caller then reads into
    /// a frame buffer of its own and uses [`RxBuffers::deliver`]. A [`TapRead::Frame`] is in the
    /// guest's buffers and in the used ring; a runt leaves the buffers held.
    pub fn receive_direct(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        mergeable: bool,
        read: impl FnOnce(&[libc::iovec]) -> io::Result<usize>,
    ) -> Option<TapRead> {
        let usable = if mergeable { self.buffers.len() } else { 1 };
        let mut iov = Vec::new();
        let mut room = 0;
        for b in self.buffers.iter().take(usable) {
            if room >= MAX_FRAME_LEN {
                break;
            }
            for &(addr, len) in &b.segments {
                // Checked against guest memory when the chain was taken.
                if push_guest_iovecs(mem, addr, len as usize, Permissions::Write, &mut iov).is_err()
                {
                    return None;
                }
            }
            room += b.capacity;
        }
        if room < MAX_FRAME_LEN || iov.len() > IOV_MAX {
            return None;
        }
        let len = match TapRead::from(read(&iov)) {
            TapRead::Frame(len) => len,
            other => return Some(other),
        };
        let mut used = Vec::new();
        let mut rest = len;
        while rest > 0 {
            let Some(b) = self.buffers.pop_front() else {
                break;
            };
            let n = rest.min(b.capacity);
            rest -= n;
            // n <= MAX_FRAME_LEN.
            used.push((b, n as u32));
        }
        let count = u16::try_from(used.len()).unwrap_or(u16::MAX);
        used[0].0.write_at(mem, NUM_BUFFERS, &count.to_le_bytes());
        let entries: Vec<(u16, u32)> = used.iter().map(|(b, n)| (b.head, *n)).collect();
        if let Err(e) = add_used_batch(mem, queue, &entries) {
            crate::warn_limited!(
                "virtio-net: cannot complete {} RX chains: {e}",
                entries.len()
            );
        }
        Some(TapRead::Frame(len))
    }

    /// Copies `frame` (vnet header first) into the buffers and completes them. Sets the header's
    /// `num_buffers` to the number of buffers used.
    pub fn deliver(
        &mut self,
        mem: &GuestMemoryMmap,
        queue: &mut Queue,
        frame: &mut [u8],
        mergeable: bool,
    ) -> Delivery {
        if frame.len() < VNET_HDR_LEN {
            return Delivery::Dropped;
        }
        let needed = if mergeable {
            let (mut room, mut count) = (0, 0);
            for b in &self.buffers {
                if room >= frame.len() {
                    break;
                }
                room += b.capacity;
                count += 1;
            }
            if room < frame.len() {
                // If even a full ring cannot hold it, waiting is pointless.
                return if self.buffers.len() >= usize::from(queue.size()) {
                    Delivery::Dropped
                } else {
                    Delivery::NoRoom
                };
            }
            count
        } else {
            match self.buffers.front() {
                None => return Delivery::NoRoom,
                Some(b) if b.capacity < frame.len() => return Delivery::Dropped,
                Some(_) => 1,
            }
        };
        // At most the queue size (<= 32768) buffers.
        let count = u16::try_from(needed).unwrap_or(u16::MAX);
        frame[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&count.to_le_bytes());

        let mut rest: &[u8] = frame;
        let mut used = Vec::with_capacity(needed);
        for _ in 0..needed {
            let Some(buffer) = self.buffers.pop_front() else {
                break;
            };
            let n = buffer.write_at(mem, 0, rest);
            rest = &rest[n..];
            // n <= frame length <= MAX_FRAME_LEN.
            used.push((buffer.head, u32::try_from(n).unwrap_or(u32::MAX)));
        }
        // All of the frame's buffers at once: the driver reads num_buffers from the first.
        if let Err(e) = add_used_batch(mem, queue, &used) {
            crate::warn_limited!("virtio-net: cannot complete {} RX chains: {e}", used.len());
        }
        Delivery::Delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{add_chain, guest_memory, r, used_entry, w, MEM_SIZE};
    use virtio_queue::mock::MockSplitQueue;

    fn frame(len: usize) -> Vec<u8> {
        let mut f: Vec<u8> = (0..len).map(|i| i as u8).collect();
        f[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&[0xee, 0xee]);
        f
    }

    fn read(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        b
    }

    #[test]
    fn mergeable_frame_spans_buffers_and_sets_num_buffers() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        for i in 0..4 {
            add_chain(&vq, i, &[w(0x10_0000 + u64::from(i) * 0x1000, 100)]);
        }
        let mut q: Queue = vq.create_queue().unwrap();
        let mut rx = RxBuffers::default();
        assert!(!rx.refill(&mem, &mut q));
        assert_eq!(rx.len(), 4);

        let mut f = frame(250);
        assert_eq!(rx.deliver(&mem, &mut q, &mut f, true), Delivery::Delivered);
        assert_eq!(rx.len(), 1);
        assert_eq!(vq.used().idx().load(), 3);
        assert_eq!(used_entry(&vq, 0), (0, 100));
        assert_eq!(used_entry(&vq, 1), (1, 100));
        assert_eq!(used_entry(&vq, 2), (2, 50));
        let mut got = read(&mem, 0x10_0000, 100);
        got.extend(read(&mem, 0x10_1000, 100));
        got.extend(read(&mem, 0x10_2000, 50));
        assert_eq!(&got[NUM_BUFFERS..NUM_BUFFERS + 2], &[3, 0]);
        assert_eq!(got[..NUM_BUFFERS], f[..NUM_BUFFERS]);
        assert_eq!(got[VNET_HDR_LEN..], f[VNET_HDR_LEN..]);

        // 150 bytes do not fit in the one 100-byte buffer left: kept for later.
        let mut f = frame(150);
        assert_eq!(rx.deliver(&mem, &mut q, &mut f, true), Delivery::NoRoom);
        assert_eq!(vq.used().idx().load(), 3);
        add_chain(&vq, 4, &[w(0x10_4000, 100)]);
        rx.refill(&mem, &mut q);
        assert_eq!(rx.deliver(&mem, &mut q, &mut f, true), Delivery::Delivered);
        assert_eq!(used_entry(&vq, 3), (3, 100));
        assert_eq!(used_entry(&vq, 4), (4, 50));
    }

    #[test]
    fn non_mergeable_frame_uses_one_chain_of_several_descriptors() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        add_chain(
            &vq,
            0,
            &[w(0x10_0000, 12), w(0x20_0000, 1000), w(0x30_0000, 1000)],
        );
        add_chain(&vq, 3, &[w(0x40_0000, 64)]);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut rx = RxBuffers::default();
        rx.refill(&mem, &mut q);

        let mut f = frame(1500);
        assert_eq!(rx.deliver(&mem, &mut q, &mut f, false), Delivery::Delivered);
        assert_eq!(used_entry(&vq, 0), (0, 1500));
        assert_eq!(read(&mem, 0x10_0000, 12)[NUM_BUFFERS..], [1, 0]);
        assert_eq!(read(&mem, 0x30_0000, 488), f[1012..]);

        // Too big for the next buffer, which stays for the next frame.
        let mut f = frame(100);
        assert_eq!(rx.deliver(&mem, &mut q, &mut f, false), Delivery::Dropped);
        let mut f = frame(64);
        assert_eq!(rx.deliver(&mem, &mut q, &mut f, false), Delivery::Delivered);
        assert_eq!(rx.deliver(&mem, &mut q, &mut f, false), Delivery::NoRoom);
    }

    #[test]
    fn unusable_chains_are_returned_empty() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        add_chain(&vq, 0, &[w(0x10_0000, 100), r(0x20_0000, 100)]);
        add_chain(&vq, 2, &[w(MEM_SIZE as u64 - 10, 100)]);
        add_chain(&vq, 3, &[w(0x10_0000, 4)]);
        add_chain(&vq, 4, &[w(0x10_0000, 100)]);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut rx = RxBuffers::default();
        assert!(rx.refill(&mem, &mut q));
        assert_eq!(rx.len(), 1);
        assert_eq!(vq.used().idx().load(), 3);
        for (i, head) in [0, 2, 3].into_iter().enumerate() {
            assert_eq!(used_entry(&vq, i as u16), (head, 0));
        }
    }

    /// A read that writes `frame` across the iovecs, as readv does.
    fn reader(frame: &[u8]) -> impl FnOnce(&[libc::iovec]) -> io::Result<usize> + '_ {
        move |iov| {
            let mut done = 0;
            for v in iov {
                let n = v.iov_len.min(frame.len() - done);
                // SAFETY: receive_direct made each iovec from live guest memory.
                unsafe {
                    std::ptr::copy_nonoverlapping(frame[done..].as_ptr(), v.iov_base.cast(), n)
                };
                done += n;
            }
            Ok(done)
        }
    }

    #[test]
    fn direct_read_fills_buffers_in_order_and_completes_only_those_used() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 64);
        // 40 buffers of 2 KiB: room for the largest frame (64 KiB and headers).
        for i in 0..40 {
            add_chain(&vq, i, &[w(0x10_0000 + u64::from(i) * 0x1000, 2048)]);
        }
        let mut q: Queue = vq.create_queue().unwrap();
        let mut rx = RxBuffers::default();
        rx.refill(&mem, &mut q);

        let f = frame(5000);
        let got = rx.receive_direct(&mem, &mut q, true, reader(&f));
        assert!(matches!(got, Some(TapRead::Frame(5000))), "{got:?}");
        assert_eq!(vq.used().idx().load(), 3);
        assert_eq!(used_entry(&vq, 0), (0, 2048));
        assert_eq!(used_entry(&vq, 2), (2, 904));
        assert_eq!(rx.len(), 37);
        let mut back = read(&mem, 0x10_0000, 2048);
        back.extend(read(&mem, 0x10_1000, 2048));
        back.extend(read(&mem, 0x10_2000, 904));
        assert_eq!(&back[NUM_BUFFERS..NUM_BUFFERS + 2], &[3, 0]);
        assert_eq!(back[VNET_HDR_LEN..], f[VNET_HDR_LEN..]);

        // Nothing waiting: nothing used.
        let empty = |_: &[libc::iovec]| Err(io::ErrorKind::WouldBlock.into());
        assert!(matches!(
            rx.receive_direct(&mem, &mut q, true, empty),
            Some(TapRead::Empty)
        ));
        assert_eq!(vq.used().idx().load(), 3);

        let f = frame(2048 * 5);
        assert!(matches!(
            rx.receive_direct(&mem, &mut q, true, reader(&f)),
            Some(TapRead::Frame(10240))
        ));
        // 32 buffers, 64 KiB, are a little less than the largest frame needs: no read at all.
        assert_eq!(rx.len(), 32);
        let never =
            |_: &[libc::iovec]| -> io::Result<usize> { panic!("read with too little room") };
        assert!(rx.receive_direct(&mem, &mut q, true, never).is_none());
        // Without mergeable buffers only the first chain counts, and 2 KiB is not enough.
        assert!(rx.receive_direct(&mem, &mut q, false, never).is_none());
    }

    #[test]
    fn tap_reads_are_sorted_the_same_for_both_paths() {
        let sort = |r: io::Result<usize>| TapRead::from(r);
        assert!(matches!(sort(Ok(0)), TapRead::Empty));
        assert!(matches!(
            sort(Err(io::ErrorKind::WouldBlock.into())),
            TapRead::Empty
        ));
        assert!(matches!(sort(Ok(VNET_HDR_LEN - 1)), TapRead::Runt(11)));
        assert!(matches!(sort(Ok(VNET_HDR_LEN)), TapRead::Frame(12)));
        assert!(matches!(
            sort(Err(io::Error::from_raw_os_error(libc::EIO))),
            TapRead::Failed(_)
        ));
    }

    /// The attack: one descriptor offered again and again, the available index moved by a whole
    /// ring each time. The device holds it once, never more than the queue size.
    #[test]
    fn one_chain_offered_over_and_over_is_held_once() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        add_chain(&vq, 0, &[w(0x10_0000, 2048)]);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut rx = RxBuffers::default();
        for round in 1..=10_000u32 {
            // Every ring slot names descriptor 0 (add_chain filled slot 0; the rest are zero).
            vq.avail().idx().store((round * 16) as u16);
            rx.refill(&mem, &mut q);
            assert!(rx.len() <= 1, "round {round}: {} buffers held", rx.len());
        }
        assert_eq!(rx.len(), 1);
    }

    #[test]
    fn never_more_than_the_queue_size_is_held() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 8);
        for i in 0..8 {
            add_chain(&vq, i, &[w(0x10_0000 + u64::from(i) * 0x1000, 2048)]);
        }
        let mut q: Queue = vq.create_queue().unwrap();
        let mut rx = RxBuffers::default();
        rx.refill(&mem, &mut q);
        assert_eq!(rx.len(), 8);
        // The driver claims 8 more, which it cannot have: none is taken.
        vq.avail().idx().store(16);
        rx.refill(&mem, &mut q);
        assert_eq!(rx.len(), 8);
        assert_eq!(q.next_avail(), 8);
    }

    #[test]
    fn frame_that_can_never_fit_is_dropped() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 2);
        add_chain(&vq, 0, &[w(0x10_0000, 100)]);
        add_chain(&vq, 1, &[w(0x20_0000, 100)]);
        let mut q: Queue = vq.create_queue().unwrap();
        let mut rx = RxBuffers::default();
        rx.refill(&mem, &mut q);
        let mut f = frame(300);
        assert_eq!(rx.deliver(&mem, &mut q, &mut f, true), Delivery::Dropped);
        assert_eq!(rx.len(), 2);
    }
}
