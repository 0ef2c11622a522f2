//! The virtio-blk device: what it offers the driver, and its request queue once activated.

use std::mem::{offset_of, size_of};
use std::path::PathBuf;
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::disk::Disk;
use super::request::process_request;
use super::{BlockError, MAX_DISCARD_SEGMENTS, MAX_ZEROES_SECTORS, QUEUE_SIZE, SEG_MAX};
use crate::virtio::{drain_queue, ActivateError, DeviceState, Interrupt, QueueSnapshot, VirtioDevice, COMMON_FEATURES};

/// How the VMM describes a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockConfig {
    /// Raw image file or host block device.
    pub path: PathBuf,
    /// Open `O_RDONLY` and offer `VIRTIO_BLK_F_RO`.
    pub read_only: bool,
    /// Serial returned by GET_ID (at most 20 bytes); derived from the file when `None`.
    pub id: Option<String>,
}

/// State that exists only between DRIVER_OK and reset.
struct Active {
    mem: GuestMemoryMmap,
    queue: Queue,
}

/// A virtio-blk device with one request queue.
pub struct Block {
    disk: Disk,
    avail_features: u64,
    config_space: Vec<u8>,
    pub(super) queue_events: Arc<[EventFd]>,
    interrupt: Arc<Interrupt>,
    active: Option<Active>,
}

impl Block {
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let disk = Disk::open(&config.path, config.read_only, config.id.as_deref())?;
        let mut avail_features =
            COMMON_FEATURES | (1 << VIRTIO_BLK_F_FLUSH) | (1 << VIRTIO_BLK_F_SEG_MAX);
        avail_features |= if config.read_only {
            1 << VIRTIO_BLK_F_RO
        } else {
            (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
        };
        let queue_event = EventFd::new(EFD_NONBLOCK).map_err(BlockError::EventFd)?;
        Ok(Self {
            config_space: config_space(&disk),
            disk,
            avail_features,
            queue_events: Arc::new([queue_event]),
            interrupt: Arc::new(Interrupt::new().map_err(BlockError::EventFd)?),
            active: None,
        })
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.disk.sectors()
    }

    pub fn read_only(&self) -> bool {
        self.disk.read_only()
    }

    /// Makes every completed write durable (the VMM's shutdown; the guest has its own flush).
    pub fn flush(&mut self) -> Result<(), super::disk::DiskError> {
        self.disk.flush()
    }

    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// The driver notified the queue (or the device kicked itself on activation).
    pub(super) fn process_queue_event(&mut self) {
        // Not activated: the event is left over from before a reset, or premature.
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let drained = process_queue(&active.mem, &mut active.queue, &mut self.disk);
        if drained.interrupt {
            if let Err(e) = self.interrupt.signal_used_buffer() {
                crate::error_limited!("virtio-blk: cannot raise the interrupt: {e}");
            }
        }
        // Out of budget for this turn: come back on the next one, after the other events.
        if drained.more {
            if let Err(e) = self.queue_events[0].write(1) {
                crate::error_limited!("virtio-blk: cannot kick the queue: {e}");
            }
        }
    }
}

/// Requests completed per turn of the event loop. The device's lock is held meanwhile, and a
/// driver's reset waits for it: a few dozen requests (each at most `SEG_MAX` pages, or 1 GiB of
/// zeroes) keep that short, and the loop comes straight back for the rest.
const REQUESTS_PER_TURN: usize = 32;

/// Completes the requests the driver made available, at most [`REQUESTS_PER_TURN`].
pub fn process_queue(mem: &GuestMemoryMmap, queue: &mut Queue, disk: &mut Disk) -> crate::virtio::Drained {
    drain_queue(mem, queue, "virtio-blk", REQUESTS_PER_TURN, |chain| {
        process_request(mem, chain, disk)
    })
}

/// `virtio_blk_config`, little-endian, as the driver reads it.
fn config_space(disk: &Disk) -> Vec<u8> {
    let mut c = vec![0u8; size_of::<virtio_blk_config>()];
    let mut put = |at: usize, bytes: &[u8]| c[at..at + bytes.len()].copy_from_slice(bytes);
    put(
        offset_of!(virtio_blk_config, capacity),
        &disk.sectors().to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, seg_max),
        &SEG_MAX.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, num_queues),
        &1u16.to_le_bytes(),
    );
    // Ranges are bounded per segment, so that one request's work is; alignment 1 sector.
    put(
        offset_of!(virtio_blk_config, max_discard_sectors),
        &MAX_ZEROES_SECTORS.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_discard_seg),
        &MAX_DISCARD_SEGMENTS.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, discard_sector_alignment),
        &1u32.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_write_zeroes_sectors),
        &MAX_ZEROES_SECTORS.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_write_zeroes_seg),
        &MAX_DISCARD_SEGMENTS.to_le_bytes(),
    );
    // WRITE_ZEROES with UNMAP punches a hole.
    put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_space(&self.config_space, offset, data);
    }

    fn queue_events(&self) -> &Arc<[EventFd]> {
        &self.queue_events
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let Ok([queue]) = <[Queue; 1]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 1, got });
        };
        self.active = Some(Active { mem, queue });
        // Have the event loop look at the queue now, in case requests were queued before.
        if let Err(e) = self.queue_events[0].write(1) {
            crate::error_limited!("virtio-blk: cannot kick the queue: {e}");
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }

    /// Requests are completed before the loop parks, so the queue's indexes are all there is.
    fn save_state(&self) -> DeviceState {
        DeviceState { queues: self.active.as_ref().map(|a| vec![QueueSnapshot::of(&a.queue)]), held_frame: None }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{add_chain, guest_memory, r, used_entry, w};
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN};
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempfile::TempFile;

    fn block(read_only: bool) -> (TempFile, Block) {
        let tmp = TempFile::new().unwrap();
        tmp.as_file().set_len(1 << 20).unwrap();
        let b = Block::new(BlockConfig {
            path: tmp.as_path().to_owned(),
            read_only,
            id: None,
        })
        .unwrap();
        (tmp, b)
    }

    #[test]
    fn features_follow_read_only() {
        let (_t, rw) = block(false);
        let (_t2, ro) = block(true);
        for b in [&rw, &ro] {
            assert_ne!(b.avail_features() & (1 << VIRTIO_F_VERSION_1), 0);
            assert_ne!(b.avail_features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
        }
        assert_eq!(rw.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw.avail_features() & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_ne!(ro.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(ro.avail_features() & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert!(ro.read_only());
    }

    #[test]
    fn config_space_has_capacity_in_sectors() {
        let (_t, b) = block(false);
        let mut cap = [0u8; 8];
        b.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 2048);
        let mut seg = [0u8; 4];
        b.read_config(offset_of!(virtio_blk_config, seg_max) as u64, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), SEG_MAX);
    }

    #[test]
    fn bad_request_does_not_stop_the_queue() {
        let (_t, mut b) = block(false);
        let mem = guest_memory();
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&VIRTIO_BLK_T_IN.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(0x10_0000)).unwrap();
        // Bad (read-only data for IN), broken (no status), then good.
        add_chain(
            &vq,
            0,
            &[r(0x10_0000, 16), r(0x20_0000, 512), w(0x30_0000, 1)],
        );
        add_chain(&vq, 3, &[r(0x10_0000, 16), r(0x20_0000, 512)]);
        add_chain(
            &vq,
            5,
            &[r(0x10_0000, 16), w(0x20_0000, 512), w(0x30_0001, 1)],
        );
        b.activate(mem.clone(), vec![vq.create_queue().unwrap()], 0)
            .unwrap();
        assert_eq!(b.queue_events[0].read().unwrap(), 1); // the activation kick
        b.process_queue_event();
        assert_eq!(vq.used().idx().load(), 3);
        assert_eq!(used_entry(&vq, 0), (0, 1));
        assert_eq!(used_entry(&vq, 1), (3, 0));
        assert_eq!(used_entry(&vq, 2), (5, 513));
        let status = |a| mem.read_obj::<u8>(GuestAddress(a)).unwrap();
        assert_eq!(status(0x30_0000), VIRTIO_BLK_S_IOERR as u8);
        assert_eq!(status(0x30_0001), VIRTIO_BLK_S_OK as u8);
        assert_eq!(b.interrupt.status(), crate::virtio::INTERRUPT_USED_BUFFER);

        b.reset();
        assert!(!b.is_activated());
        b.process_queue_event(); // ignored, no panic
    }

    /// A vCPU reading the config space, the status or the interrupt status, acknowledging an
    /// interrupt or notifying the queue does not wait for the flush the device is in.
    #[test]
    fn registers_answer_while_a_slow_flush_holds_the_device() {
        use crate::bus::BusDevice;
        use crate::virtio::mmio::{CONFIG_SPACE, INTERRUPT_ACK, INTERRUPT_STATUS, QUEUE_NOTIFY, STATUS};
        use crate::virtio::test_utils::{MmioDriver, QueueLayout};
        use crate::virtio::MmioTransport;
        use std::sync::Mutex;
        use std::time::{Duration, Instant};
        use virtio_bindings::virtio_blk::VIRTIO_BLK_T_FLUSH;

        const FLUSH_TIME: Duration = Duration::from_millis(800);
        let (_t, mut b) = block(false);
        b.disk.set_sync(|f| {
            std::thread::sleep(FLUSH_TIME);
            f.sync_all()
        });
        let offered = b.avail_features();
        let blk = Arc::new(Mutex::new(b));
        let mem = guest_memory();
        let mut transport = MmioTransport::new(mem.clone(), blk.clone());
        let vq = MockSplitQueue::create(&mem, GuestAddress(0), 16);
        let mut d = MmioDriver(&mut transport);
        assert!(d.negotiate(offered));
        d.setup_queue(0, &QueueLayout::of(&vq, 16));
        d.driver_ok();
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&VIRTIO_BLK_T_FLUSH.to_le_bytes());
        mem.write_slice(&hdr, GuestAddress(0x10_0000)).unwrap();
        add_chain(&vq, 0, &[r(0x10_0000, 16), w(0x30_0000, 1)]);

        // The event loop's side: the device under its lock for the whole request.
        let worker = {
            let blk = blk.clone();
            std::thread::spawn(move || blk.lock().unwrap().process_queue_event())
        };
        let waiting = Instant::now();
        while blk.try_lock().is_ok() {
            assert!(waiting.elapsed() < Duration::from_secs(5), "the flush never started");
            std::thread::sleep(Duration::from_millis(1));
        }

        let t = Instant::now();
        let mut cap = [0u8; 8];
        d.0.read(CONFIG_SPACE, &mut cap);
        let status = d.read(STATUS);
        d.read(INTERRUPT_STATUS);
        d.write(INTERRUPT_ACK, 1);
        d.write(QUEUE_NOTIFY, 0);
        let took = t.elapsed();
        assert!(took < FLUSH_TIME / 4, "register accesses took {took:?} during a flush");
        assert_eq!(u64::from_le_bytes(cap), 2048);
        assert_ne!(status, 0);

        // A reset does not wait either: the status reads as before until the device, done with
        // its request, has been reset, which the driver waits for by reading it back.
        let t = Instant::now();
        d.write(STATUS, 0);
        let still = d.read(STATUS);
        let took = t.elapsed();
        assert!(took < FLUSH_TIME / 4, "a reset took {took:?} during a flush");
        assert_eq!(still, status, "the reset completed while the device was in its request");
        assert!(blk.try_lock().is_err(), "the flush ended before the registers were read");

        worker.join().unwrap();
        assert_eq!(used_entry(&vq, 0), (0, 1));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x30_0000)).unwrap(), VIRTIO_BLK_S_OK as u8);
        assert_eq!(d.read(STATUS), 0);
        assert!(!blk.lock().unwrap().is_activated());
        assert_eq!(d.read(INTERRUPT_STATUS), 0);
    }

    #[test]
    fn activate_wants_exactly_one_queue() {
        let (_t, mut b) = block(false);
        assert!(b.activate(guest_memory(), vec![], 0).is_err());
        assert!(!b.is_activated());
    }
}
