//! Runs the block request queue on the event-manager thread.
//!
//! The queue eventfd is registered once, in `init()`, before the driver has set anything up; the
//! device ignores it until activated (see the module docs of `virtio`).

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::Block;
use crate::virtio::drain_event;

impl MutEventSubscriber for Block {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_events.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                crate::error_limited!("virtio-blk: cannot watch queue {i}: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match self.queue_events.get(events.data() as usize) {
            Some(evt) => drain_event(evt),
            None => {
                crate::warn_limited!("virtio-blk: event for unknown source {}", events.data());
                return;
            }
        }
        self.process_queue_event();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT};
    use virtio_bindings::virtio_config::{VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempfile::TempFile;

    use crate::virtio::mmio::{INTERRUPT_STATUS, QUEUE_NOTIFY, STATUS};
    use crate::virtio::test_utils::{
        add_chain, guest_memory, r, used_entry, w, MmioDriver, QueueLayout,
    };
    use crate::virtio::{Block, BlockConfig, MmioTransport, VirtioDevice, INTERRUPT_USED_BUFFER};

    type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

    fn block(tmp: &TempFile) -> Arc<Mutex<Block>> {
        tmp.as_file().set_len(1 << 20).unwrap();
        Arc::new(Mutex::new(
            Block::new(BlockConfig {
                path: tmp.as_path().to_owned(),
                read_only: false,
                id: Some("e2e".into()),
            })
            .unwrap(),
        ))
    }

    /// The same `Arc<Mutex<Block>>` serves as the transport's device and as the event loop's
    /// subscriber; a guest write goes register handshake -> notify -> event loop -> disk -> IRQ.
    #[test]
    fn one_arc_serves_transport_and_event_manager() {
        let tmp = TempFile::new().unwrap();
        let blk = block(&tmp);
        let mem = guest_memory();
        let device: Arc<Mutex<dyn VirtioDevice>> = blk.clone();
        let subscriber: Subscriber = blk.clone();
        let mut transport = MmioTransport::new(mem.clone(), device);
        let mut em = EventManager::<Subscriber>::new().unwrap();
        em.add_subscriber(subscriber);

        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let mut d = MmioDriver(&mut transport);
        assert_eq!(d.0.queue_events().len(), 1);
        let offered = blk.lock().unwrap().avail_features();
        assert!(d.negotiate(offered));
        d.setup_queue(0, &QueueLayout::of(&vq, 16));
        d.driver_ok();
        assert!(blk.lock().unwrap().is_activated());
        // The activation kick: nothing queued yet, so no interrupt.
        assert_eq!(em.run_with_timeout(100).unwrap(), 1);
        assert_eq!(d.read(INTERRUPT_STATUS), 0);

        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&VIRTIO_BLK_T_OUT.to_le_bytes());
        hdr[8..].copy_from_slice(&2u64.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(0x10_0000)).unwrap();
        mem.write_slice(&[0xc3; 512], GuestAddress(0x20_0000))
            .unwrap();
        add_chain(
            &vq,
            0,
            &[r(0x10_0000, 16), r(0x20_0000, 512), w(0x30_0000, 1)],
        );
        // No ioeventfd in a unit test: the notify write reaches the transport, which kicks.
        d.write(QUEUE_NOTIFY, 0);
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);

        assert_eq!(used_entry(&vq, 0), (0, 1));
        assert_eq!(
            mem.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(),
            VIRTIO_BLK_S_OK as u8
        );
        assert_eq!(d.read(INTERRUPT_STATUS), INTERRUPT_USED_BUFFER);
        assert_eq!(d.0.interrupt_event().read().unwrap(), 1);
        let mut on_disk = [0u8; 512];
        std::os::unix::fs::FileExt::read_exact_at(tmp.as_file(), &mut on_disk, 1024).unwrap();
        assert_eq!(on_disk, [0xc3; 512]);

        // Reset: later notifications are drained and ignored.
        d.write(STATUS, 0);
        assert!(!blk.lock().unwrap().is_activated());
        d.write(QUEUE_NOTIFY, 0);
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(vq.used().idx().load(), 1);
    }

    #[test]
    fn invalid_queue_at_driver_ok_needs_reset_and_device_stays_idle() {
        let tmp = TempFile::new().unwrap();
        let blk = block(&tmp);
        let mut transport = MmioTransport::new(guest_memory(), blk.clone());
        let mut d = MmioDriver(&mut transport);
        assert!(d.negotiate(1 << VIRTIO_F_VERSION_1));
        d.setup_queue(0, &QueueLayout::at(0xffff_ffff_0000, 256));
        d.driver_ok();
        assert_ne!(d.read(STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
        assert!(!blk.lock().unwrap().is_activated());
    }
}
