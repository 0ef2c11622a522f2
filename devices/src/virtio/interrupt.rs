//! The interrupt side of a virtio device: the InterruptStatus register and the eventfd that the VMM
//! turns into an (edge-triggered) IRQ with an irqfd.

use std::io;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// InterruptStatus bit: the device put buffers in a used ring.
pub const INTERRUPT_USED_BUFFER: u32 = VIRTIO_MMIO_INT_VRING;
/// InterruptStatus bit: the device configuration changed.
pub const INTERRUPT_CONFIG_CHANGE: u32 = VIRTIO_MMIO_INT_CONFIG;

/// Shared by a device (event-loop thread), which raises interrupts, and its transport (vCPU threads),
/// which shows and acknowledges them. Atomics, so neither side needs the other's lock.
#[derive(Debug)]
pub struct Interrupt {
    status: AtomicU32,
    config_generation: AtomicU32,
    event: EventFd,
}

impl Interrupt {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            status: AtomicU32::new(0),
            config_generation: AtomicU32::new(0),
            event: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Tells the driver that used rings have new entries.
    pub fn signal_used_buffer(&self) -> io::Result<()> {
        self.signal(INTERRUPT_USED_BUFFER)
    }

    /// Tells the driver that the configuration space changed.
    pub fn signal_config_change(&self) -> io::Result<()> {
        self.config_generation.fetch_add(1, Ordering::SeqCst);
        self.signal(INTERRUPT_CONFIG_CHANGE)
    }

    // The status bit must be visible before the IRQ fires: the guest's handler reads it first.
    fn signal(&self, bit: u32) -> io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.event.write(1)
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the given status bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The ConfigGeneration register.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// The eventfd the VMM registers as an irqfd.
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    /// Device reset: no interrupt pending.
    pub(crate) fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signal_sets_status_then_fires_event_and_ack_clears() {
        let irq = Interrupt::new().unwrap();
        irq.signal_used_buffer().unwrap();
        assert_eq!(irq.status(), INTERRUPT_USED_BUFFER);
        assert_eq!(irq.event().read().unwrap(), 1);
        irq.signal_config_change().unwrap();
        assert_eq!(
            irq.status(),
            INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE
        );
        assert_eq!(irq.config_generation(), 1);
        irq.ack(INTERRUPT_USED_BUFFER);
        assert_eq!(irq.status(), INTERRUPT_CONFIG_CHANGE);
        irq.reset();
        assert_eq!(irq.status(), 0);
    }
}
