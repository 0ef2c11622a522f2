//! The device side of a split virtqueue beyond what virtio-queue does: used entries published as
//! one batch, interrupt and notification suppression (event indexes and flags), and draining a
//! queue without spinning on a driver's bogus index.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_bindings::virtio_ring::VRING_AVAIL_F_NO_INTERRUPT;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Whether the driver wants an interrupt for the buffers used since the used index was `since`.
/// With event indexes: whether `used_event` lies in that range (virtio 1.2, 2.7.10). Without: the
/// driver's VRING_AVAIL_F_NO_INTERRUPT flag, which Linux sets while it polls. (virtio-queue's own
/// `needs_notification` ignores the flag, and counts only buffers added one at a time.)
pub(crate) fn needs_interrupt(mem: &GuestMemoryMmap, queue: &Queue, since: u16) -> bool {
    // The used ring writes must be visible before the driver's fields are read (2.7.7.2).
    fence(Ordering::SeqCst);
    let avail = queue.avail_ring();
    if queue.event_idx_enabled() {
        let used_event = avail + 4 + 2 * u64::from(queue.size());
        let Ok(event) = mem.read_obj::<u16>(GuestAddress(used_event)) else {
            return true;
        };
        let (new, event) = (Wrapping(queue.next_used()), Wrapping(u16::from_le(event)));
        return new - event - Wrapping(1) < new - Wrapping(since);
    }
    match mem.read_obj::<u16>(GuestAddress(avail)) {
        Ok(flags) => u16::from_le(flags) & VRING_AVAIL_F_NO_INTERRUPT as u16 == 0,
        Err(_) => true,
    }
}

/// Puts `entries` (head index, used length) in the used ring and publishes them with one update
/// of the used index: a driver that looks in between sees all of them or none. virtio-net's
/// mergeable buffers need this: the first buffer announces how many follow, and Linux drops the
/// frame if they are not there yet.
pub(crate) fn add_used_batch(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    entries: &[(u16, u32)],
) -> Result<(), virtio_queue::Error> {
    let Some((&(last_head, last_len), rest)) = entries.split_last() else {
        return Ok(());
    };
    let start = queue.next_used();
    for (i, &(head, len)) in rest.iter().enumerate() {
        if head >= queue.size() {
            return Err(virtio_queue::Error::InvalidDescriptorIndex);
        }
        let slot = u64::from(start.wrapping_add(i as u16) % queue.size());
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        mem.write_obj(elem, GuestAddress(queue.used_ring() + 4 + slot * 8))
            .map_err(virtio_queue::Error::GuestMemory)?;
    }
    // add_used writes the last entry, then the index, with release ordering: the entries above
    // are visible before the index that covers them.
    queue.set_next_used(start.wrapping_add(rest.len() as u16));
    queue
        .add_used(mem, last_head, last_len)
        .inspect_err(|_| queue.set_next_used(start))
}

/// Completes the chains the driver has made available with `handle`, which returns each chain's
/// used length, at most `limit` of them: a driver that keeps adding chains from another vCPU
/// cannot keep the device in one call. Returns how many chains it completed.
pub(crate) fn complete_chains(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    what: &str,
    limit: usize,
    mut handle: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
) -> usize {
    let mut completed = 0;
    while completed < limit {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            break;
        };
        let head = chain.head_index();
        let len = handle(chain);
        // Fails only for a head index past the queue size: nothing to give back then.
        match queue.add_used(mem, head, len) {
            Ok(()) => completed += 1,
            Err(e) => crate::warn_limited!("{what}: cannot complete chain {head}: {e}"),
        }
    }
    completed
}

/// Turns the driver's notifications for `queue` off, while the device works through it anyway.
pub(crate) fn mute(mem: &GuestMemoryMmap, queue: &mut Queue, what: &str) {
    if let Err(e) = queue.disable_notification(mem) {
        crate::warn_limited!("{what}: cannot disable queue notifications: {e}");
    }
}

/// Turns the driver's notifications back on. Returns whether chains came in before that took
/// effect: they would wait for a notification that never comes, so the caller must look again.
pub(crate) fn unmute(mem: &GuestMemoryMmap, queue: &mut Queue, what: &str) -> bool {
    queue.enable_notification(mem).unwrap_or_else(|e| {
        crate::warn_limited!("{what}: cannot enable queue notifications: {e}");
        false
    })
}

/// After `unmute` said chains came in: whether to look again. Once without `progress` is right
/// (they came in while the queue was being read); twice in a row, the ring's index points at
/// chains that cannot be taken, which only a broken or hostile driver does: looking again would
/// spin forever, so the device waits for the next notification instead.
pub(crate) fn keep_going(progress: bool, retried: &mut bool, what: &str) -> bool {
    if progress {
        *retried = false;
        return true;
    }
    if *retried {
        crate::warn_limited!(
            "{what}: the available index points past what the ring holds; waiting for the driver"
        );
        *retried = false;
        return false;
    }
    *retried = true;
    true
}

/// What [`drain_queue`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    /// The driver must be interrupted.
    pub interrupt: bool,
    /// The budget ran out with chains perhaps left: the caller must come back on a later turn of
    /// its event loop (notifications stay off meanwhile).
    pub more: bool,
}

/// Completes the queue's available chains with `handle`, which returns each chain's used length,
/// with notifications off until the queue is empty, at most `budget` per call: one turn of the
/// event loop does bounded work, so a park request, a reset or another event source waits for at
/// most that.
pub(crate) fn drain_queue(
    mem: &GuestMemoryMmap,
    queue: &mut Queue,
    what: &str,
    budget: usize,
    mut handle: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> u32,
) -> Drained {
    let (mut completed, since) = (0, queue.next_used());
    let mut retried = false;
    let mut more = false;
    loop {
        mute(mem, queue, what);
        let from = queue.next_avail();
        completed += complete_chains(mem, queue, what, budget - completed, &mut handle);
        if completed >= budget {
            more = true;
            break;
        }
        let progress = queue.next_avail() != from;
        if !unmute(mem, queue, what) || !keep_going(progress, &mut retried, what) {
            break;
        }
    }
    Drained { interrupt: completed > 0 && needs_interrupt(mem, queue, since), more }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{add_chain, guest_memory, r};
    use virtio_queue::mock::MockSplitQueue;

    const SIZE: u16 = 16;
    /// Our own used ring: `MockSplitQueue` lays its used ring over the end of the available ring,
    /// where `used_event` lives.
    const USED: GuestAddress = GuestAddress(0x8000);

    fn queue(vq: &MockSplitQueue<'_, GuestMemoryMmap>, event_idx: bool) -> Queue {
        let mut q = Queue::new(SIZE).unwrap();
        q.try_set_desc_table_address(vq.desc_table_addr()).unwrap();
        q.try_set_avail_ring_address(vq.avail_addr()).unwrap();
        q.try_set_used_ring_address(USED).unwrap();
        q.set_event_idx(event_idx);
        q.set_ready(true);
        q
    }

    /// Completes the chain at `head` through `drain_queue`; returns whether it asks for an IRQ.
    fn complete(
        mem: &GuestMemoryMmap,
        vq: &MockSplitQueue<'_, GuestMemoryMmap>,
        q: &mut Queue,
        head: u16,
    ) -> bool {
        add_chain(vq, head, &[r(0x10_0000, 16)]);
        let mut seen = Vec::new();
        let irq = drain_queue(mem, q, "test", usize::from(SIZE), |c| {
            seen.push(c.head_index());
            7
        })
        .interrupt;
        assert_eq!(seen, [head]);
        irq
    }

    #[test]
    fn an_available_index_past_the_ring_does_not_spin() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), SIZE);
        let mut q = queue(&vq, true);
        add_chain(&vq, 0, &[r(0x10_0000, 16)]);
        // Claims a thousand more chains than the ring can hold.
        vq.avail().idx().store(1000);
        let mut seen = 0;
        drain_queue(&mem, &mut q, "test", usize::from(SIZE), |_| {
            seen += 1;
            0
        });
        assert_eq!(seen, 0);
    }

    #[test]
    fn one_call_completes_at_most_one_ring_and_says_there_is_more() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), SIZE);
        let mut q = queue(&vq, false);
        // A driver that adds a chain for every one completed, as another vCPU could.
        add_chain(&vq, 0, &[r(0x10_0000, 16)]);
        let mut seen = 0u16;
        let d = drain_queue(&mem, &mut q, "test", usize::from(SIZE), |_| {
            seen += 1;
            add_chain(&vq, seen % SIZE, &[r(0x10_0000, 16)]);
            0
        });
        assert_eq!(seen, SIZE);
        assert!(d.more);
        // Without new chains, the next call empties the queue and is done.
        let d = drain_queue(&mem, &mut q, "test", usize::from(SIZE), |_| 0);
        assert!(!d.more);
    }

    #[test]
    fn used_batch_is_published_by_one_index_update() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), SIZE);
        let mut q = queue(&vq, false);
        let used_idx = GuestAddress(USED.0 + 2);
        let entry = |i: u64| {
            let e: [u32; 2] = mem.read_obj(GuestAddress(USED.0 + 4 + i * 8)).unwrap();
            (e[0], e[1])
        };
        q.set_next_used(SIZE - 1); // wraps around the ring
        add_used_batch(&mem, &mut q, &[(3, 100), (4, 200), (5, 50)]).unwrap();
        assert_eq!(mem.read_obj::<u16>(used_idx).unwrap(), SIZE + 2);
        assert_eq!(q.next_used(), SIZE + 2);
        assert_eq!(
            [entry(u64::from(SIZE) - 1), entry(0), entry(1)],
            [(3, 100), (4, 200), (5, 50)]
        );
        // A bad head anywhere publishes nothing.
        assert!(add_used_batch(&mem, &mut q, &[(SIZE, 1), (1, 1)]).is_err());
        assert!(add_used_batch(&mem, &mut q, &[(1, 1), (SIZE, 1)]).is_err());
        assert_eq!(mem.read_obj::<u16>(used_idx).unwrap(), SIZE + 2);
        assert_eq!(q.next_used(), SIZE + 2);
    }

    #[test]
    fn no_interrupt_flag_is_honoured_without_event_idx() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), SIZE);
        let mut q = queue(&vq, false);
        let avail_flags = vq.avail_addr();

        assert!(complete(&mem, &vq, &mut q, 0));
        mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, avail_flags)
            .unwrap();
        assert!(!complete(&mem, &vq, &mut q, 1));
        mem.write_obj(0u16, avail_flags).unwrap();
        assert!(complete(&mem, &vq, &mut q, 2));
        // Notifications are back on when the device goes idle.
        assert_eq!(mem.read_obj::<u16>(USED).unwrap(), 0);
        assert_eq!(mem.read_obj::<u16>(GuestAddress(USED.0 + 2)).unwrap(), 3);
    }

    #[test]
    fn event_idx_interrupts_when_used_event_is_passed_and_asks_for_the_next_kick() {
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), SIZE);
        let mut q = queue(&vq, true);
        let ring_end = |base: GuestAddress, entry: u64| base.0 + 4 + entry * u64::from(SIZE);
        let used_event = GuestAddress(ring_end(vq.avail_addr(), 2));
        let avail_event = GuestAddress(ring_end(USED, 8));

        // "Interrupt me once the used index passes 1": not at 1, at 2.
        mem.write_obj(1u16, used_event).unwrap();
        assert!(!complete(&mem, &vq, &mut q, 0));
        assert!(complete(&mem, &vq, &mut q, 1));
        assert!(!complete(&mem, &vq, &mut q, 2));
        // The driver is asked to notify the next chain it makes available.
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 3);
        // The flag means nothing once event indexes are negotiated.
        mem.write_obj(VRING_AVAIL_F_NO_INTERRUPT as u16, vq.avail_addr())
            .unwrap();
        mem.write_obj(3u16, used_event).unwrap();
        assert!(complete(&mem, &vq, &mut q, 3));
    }
}
