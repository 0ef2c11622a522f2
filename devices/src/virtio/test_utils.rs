//! Helpers shared by the virtio unit tests: guest memory, a driver that speaks MMIO registers, a
//! device that records what the transport does to it, and descriptor chain builders.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FEATURES_OK,
};
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::mmio::*;
use super::{ActivateError, Interrupt, VirtioDevice};
use crate::bus::BusDevice;

/// Guest memory size for tests: 16 MiB at address 0.
pub const MEM_SIZE: usize = 16 << 20;

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// Where a driver puts one queue's rings.
#[derive(Debug, Clone, Copy)]
pub struct QueueLayout {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl QueueLayout {
    /// Rings 4 KiB apart from `base`: room for up to 256 entries.
    pub fn at(base: u64, size: u16) -> Self {
        Self {
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
        }
    }

    /// The rings of a mock queue, which the test then fills.
    pub fn of(vq: &MockSplitQueue<'_, GuestMemoryMmap>, size: u16) -> Self {
        Self {
            size,
            desc: vq.desc_table_addr().0,
            avail: vq.avail_addr().0,
            used: vq.used_addr().0,
        }
    }

    pub fn with_desc(mut self, desc: u64) -> Self {
        self.desc = desc;
        self
    }
}

/// Plays the guest driver against a transport, one 32-bit register access at a time.
pub struct MmioDriver<'a>(pub &'a mut MmioTransport);

impl MmioDriver<'_> {
    pub fn read(&mut self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.0.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    pub fn write(&mut self, offset: u64, value: u32) {
        self.0.write(offset, &value.to_le_bytes());
    }

    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK; returns whether the device kept FEATURES_OK.
    pub fn negotiate(&mut self, features: u64) -> bool {
        self.write(STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
        self.write(STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
        for page in 0..2 {
            self.write(DRIVER_FEATURES_SEL, page);
            self.write(DRIVER_FEATURES, (features >> (32 * page)) as u32);
        }
        let s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
        self.write(STATUS, s);
        self.read(STATUS) & VIRTIO_CONFIG_S_FEATURES_OK != 0
    }

    pub fn setup_queue(&mut self, index: u32, l: &QueueLayout) {
        self.write(QUEUE_SEL, index);
        self.write(QUEUE_NUM, u32::from(l.size));
        for (lo, hi, addr) in [
            (QUEUE_DESC_LOW, QUEUE_DESC_HIGH, l.desc),
            (QUEUE_AVAIL_LOW, QUEUE_AVAIL_HIGH, l.avail),
            (QUEUE_USED_LOW, QUEUE_USED_HIGH, l.used),
        ] {
            self.write(lo, addr as u32);
            self.write(hi, (addr >> 32) as u32);
        }
        self.write(QUEUE_READY, 1);
    }

    pub fn driver_ok(&mut self) {
        let s = self.read(STATUS);
        self.write(STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
    }
}

/// What a [`FakeDevice`] was activated with.
pub struct FakeActive {
    pub acked_features: u64,
    pub queues: Vec<Queue>,
}

/// A device that records activation and resets; its config space reads 0, 1, 2, ...
pub struct FakeDevice {
    features: u64,
    max_sizes: Vec<u16>,
    config: Vec<u8>,
    queue_events: Arc<[EventFd]>,
    pub interrupt: Arc<Interrupt>,
    pub active: Option<FakeActive>,
    pub resets: usize,
}

impl FakeDevice {
    pub const TYPE: u32 = 42;

    pub fn new(features: u64, max_sizes: &[u16]) -> Self {
        Self {
            features,
            max_sizes: max_sizes.to_vec(),
            config: (0..16).collect(),
            queue_events: max_sizes
                .iter()
                .map(|_| EventFd::new(EFD_NONBLOCK).unwrap())
                .collect(),
            interrupt: Arc::new(Interrupt::new().unwrap()),
            active: None,
            resets: 0,
        }
    }
}

impl VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        Self::TYPE
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.max_sizes
    }
    fn avail_features(&self) -> u64 {
        self.features
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_space(&self.config, offset, data);
    }
    fn queue_events(&self) -> &Arc<[EventFd]> {
        &self.queue_events
    }
    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        self.active = Some(FakeActive {
            acked_features,
            queues,
        });
        Ok(())
    }
    fn reset(&mut self) {
        self.active = None;
        self.resets += 1;
    }
    fn save_state(&self) -> super::DeviceState {
        super::DeviceState {
            queues: self.active.as_ref().map(|a| a.queues.iter().map(super::QueueSnapshot::of).collect()),
            held_frame: None,
        }
    }
}

/// One descriptor of a chain to build: guest address, length, device-writable.
#[derive(Debug, Clone, Copy)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    pub write: bool,
}

/// A device-readable descriptor.
pub fn r(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: false,
    }
}

/// A device-writable descriptor.
pub fn w(addr: u64, len: u32) -> Desc {
    Desc {
        addr,
        len,
        write: true,
    }
}

/// Writes `descs` as one chain at descriptor index `first` and makes it available.
pub fn add_chain(vq: &MockSplitQueue<'_, GuestMemoryMmap>, first: u16, descs: &[Desc]) {
    let raw: Vec<RawDescriptor> = descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let mut flags = if d.write {
                VRING_DESC_F_WRITE as u16
            } else {
                0
            };
            let last = i + 1 == descs.len();
            if !last {
                flags |= VRING_DESC_F_NEXT as u16;
            }
            let next = if last { 0 } else { first + i as u16 + 1 };
            RawDescriptor::from(SplitDescriptor::new(d.addr, d.len, flags, next))
        })
        .collect();
    vq.add_desc_chains(&raw, first).unwrap();
}

/// Writes raw descriptors (flags and next as given) at index `first`; publishes only `first`.
/// (Tests stay below 8 chains per queue: `MockSplitQueue` places the used ring right after the
/// first `size` bytes of the available ring.)
pub fn add_raw_chain(
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
    first: u16,
    descs: &[(u64, u32, u16, u16)],
) {
    for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
        let d = SplitDescriptor::new(addr, len, flags, next);
        vq.desc_table()
            .store(first + i as u16, RawDescriptor::from(d))
            .unwrap();
    }
    let idx = vq.avail().idx().load();
    vq.avail()
        .ring()
        .ref_at(usize::from(idx))
        .unwrap()
        .store(first);
    vq.avail().idx().store(idx.wrapping_add(1));
}

/// The (head, len) of used ring entry `i`.
pub fn used_entry(vq: &MockSplitQueue<'_, GuestMemoryMmap>, i: u16) -> (u32, u32) {
    let e = vq.used().ring().ref_at(usize::from(i)).unwrap().load();
    (e.id(), e.len())
}

/// Runs `f` on a thread of its own inside a new network namespace, so that TAP devices it creates
/// (and any frame on them) stay private to the test. `None` if namespaces are not available.
pub fn in_new_netns<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let thread = std::thread::spawn(move || {
        // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only this thread to a new namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error());
            return None;
        }
        Some(f())
    });
    thread
        .join()
        .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

/// Whether the tests run under CI (`CI` set, and not to `false` or `0`), where nothing may be
/// skipped.
pub fn under_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

/// A test that cannot run here says so; under CI that is a failure, never a silent pass.
pub fn skip(why: &str) {
    assert!(!under_ci(), "test skipped under CI: {why}");
    eprintln!("skipped: {why}");
}

/// A transport over [`guest_memory`] in front of a [`FakeDevice`] that offers `offered`, with
/// queues of 16 and 8 entries; the device is returned too, for the test to look at.
pub fn fake_transport(offered: u64) -> (MmioTransport, Arc<Mutex<FakeDevice>>) {
    let dev = Arc::new(Mutex::new(FakeDevice::new(offered, &[16, 8])));
    (MmioTransport::new(guest_memory(), dev.clone()), dev)
}
