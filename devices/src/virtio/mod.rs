//! Virtio devices (virtio 1.x, split virtqueues) and the virtio-mmio transport that exposes them.
//!
//! # Wiring, as the VMM does it
//!
//! ```text
//! let block = Arc::new(Mutex::new(Block::new(config)?));
//! let transport = MmioTransport::new(mem.clone(), block.clone());   // Arc<Mutex<dyn VirtioDevice>>
//! for (i, evt) in transport.queue_events().iter().enumerate() {
//!     vm.register_ioevent(evt, &IoEventAddress::Mmio(base + QUEUE_NOTIFY), i as u32)?;
//! }
//! vm.register_irqfd(transport.interrupt_event(), irq)?;
//! mmio_bus.insert(base, MMIO_LEN, Arc::new(Mutex::new(transport)))?;
//! event_manager.add_subscriber(block);                               // same Arc, as a subscriber
//! ```
//!
//! # Threads and activation
//!
//! vCPU threads only touch registers, which the transport keeps itself (with a copy of the config
//! space), so they never wait for the device: only the two status writes that hand queues over or
//! take them back (DRIVER_OK and reset) lock it, and they wait for at most the request in hand,
//! whose work is bounded. All queue work happens on an event-manager thread (nvmm gives each device
//! its own), in the device's `event_handler.rs`. A subscriber registers its queue eventfds (and,
//! for net, the TAP fd) once, in `init()`, whatever the device state; events that arrive while the
//! device is not activated are drained and ignored. When the driver writes DRIVER_OK, the
//! transport hands the queues to [`VirtioDevice::activate`] (under the same mutex the event loop
//! takes), and the device kicks its own queue eventfds so that the event loop looks at the queues
//! once right away. A reset (status 0) calls [`VirtioDevice::reset`], which drops the queues; later
//! events are ignored again.

pub mod block;
mod interrupt;
mod iovec;
pub mod mmio;
pub mod net;
pub mod persist;
mod ring;
#[cfg(test)]
pub(crate) mod test_utils;

use std::sync::Arc;

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use block::{Block, BlockConfig, BlockError};
pub use interrupt::{Interrupt, INTERRUPT_CONFIG_CHANGE, INTERRUPT_USED_BUFFER};
pub(crate) use iovec::{advance, push_guest_iovecs, IOV_MAX};
pub use ring::Drained;
pub use mmio::{MmioTransport, MMIO_LEN, QUEUE_NOTIFY};
pub use net::{parse_mac, Net, NetConfig, NetError};
pub use persist::{DeviceState, PersistError, QueueSnapshot, TransportState};
pub(crate) use ring::{
    add_used_batch, complete_chains, drain_queue, keep_going, mute, needs_interrupt, unmute,
};

/// Features every device here offers: modern virtio only, indirect descriptor tables (walked by
/// virtio-queue's `DescriptorChain`) and event indexes, which let both sides skip most notifications
/// and interrupts under load.
pub(crate) const COMMON_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_INDIRECT_DESC) | (1 << VIRTIO_RING_F_EVENT_IDX);

/// What the transport needs from a device. Implemented by [`Block`] and [`Net`].
pub trait VirtioDevice: Send {
    /// The virtio device ID (`VIRTIO_ID_BLOCK`, `VIRTIO_ID_NET`, ...).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits offered to the driver.
    fn avail_features(&self) -> u64;

    /// Reads the device-specific configuration space; bytes past its end read as zero. The
    /// transport reads it once, when it is created, and answers the driver from that copy: the
    /// configuration of every device here is fixed, and a vCPU reading it must never wait for the
    /// device's lock, which its event loop holds through disk and network I/O. Writes from the
    /// driver are ignored (no device here has a writable field).
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// One eventfd per queue, signalled when the driver notifies that queue.
    fn queue_events(&self) -> &Arc<[EventFd]>;

    /// The interrupt status register and the eventfd that raises the device's IRQ.
    fn interrupt(&self) -> &Arc<Interrupt>;

    /// Starts the device with the queues the driver set up (already checked against guest memory)
    /// and the features it acknowledged.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        acked_features: u64,
    ) -> Result<(), ActivateError>;

    /// Returns the device to its initial state: queues dropped, pending work discarded.
    fn reset(&mut self);

    /// What the device holds beyond its transport's registers, for a snapshot. The VMM asks only
    /// while the device's loop is parked, between two requests.
    fn save_state(&self) -> DeviceState;

    /// Takes back a frame saved by [`VirtioDevice::save_state`], after the device was activated
    /// with its saved queues. Only virtio-net holds frames; the others have nothing to take.
    fn load_held_frame(&mut self, frame: Vec<u8>) -> Result<(), PersistError> {
        log::warn!("virtio device {}: ignoring a saved frame of {} bytes", self.device_type(), frame.len());
        Ok(())
    }
}

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The transport handed over a different number of queues than the device has.
    #[error("expected {expected} queues, got {got}")]
    QueueCount { expected: usize, got: usize },
    /// The TAP device refused the offloads the driver negotiated.
    #[error(transparent)]
    Tap(#[from] net::TapError),
}

/// Copies `config[offset..]` into `data`; whatever lies past the end of `config` reads as zero.
pub(crate) fn read_config_space(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(src) = usize::try_from(offset).ok().and_then(|o| config.get(o..)) else {
        return;
    };
    let n = src.len().min(data.len());
    data[..n].copy_from_slice(&src[..n]);
}

/// Takes a queue's eventfd count so a level-triggered epoll does not report it again. The fds are
/// non-blocking: a spurious wake-up reads EAGAIN, which is not worth reporting.
pub(crate) fn drain_event(evt: &EventFd) {
    if let Err(e) = evt.read() {
        if e.kind() != std::io::ErrorKind::WouldBlock {
            crate::error_limited!("cannot read a queue eventfd: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_reads_are_bounded_and_zero_filled() {
        let config = [1u8, 2, 3, 4];
        let mut data = [0xffu8; 4];
        read_config_space(&config, 2, &mut data);
        assert_eq!(data, [3, 4, 0, 0]);
        read_config_space(&config, 4, &mut data);
        assert_eq!(data, [0; 4]);
        read_config_space(&config, u64::MAX, &mut data);
        assert_eq!(data, [0; 4]);
    }
}
