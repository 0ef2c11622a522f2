//! The interrupt side of a virtio device: the InterruptStatus register and the eventfd that the VMM
//! turns into an (edge-triggered) IRQ with an irqfd.
//!
//! virtio-mmio's interrupt is a level: asserted while InterruptStatus is non-zero. An irqfd gives
//! edges, so an edge is sent exactly where the level would rise: when the status goes from zero to
//! non-zero, and when an InterruptACK leaves bits set. Firing on every used buffer instead would
//! interrupt a driver that has not yet acknowledged the last interrupt once more for nothing; under
//! load that doubled the interrupts Linux took. The driver acknowledges before it looks at the
//! rings (Linux's `vm_interrupt` does), so buffers added while the status was already set are seen.
//! The cost: an edge that hits a masked IOAPIC pin is lost (KVM replays only level pins), and the
//! device would wait for an ack that never comes. Linux masks an edge pin only around its own
//! irq_ack, before the handler reads the status, when no edge is due from here.

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
        if self.status.fetch_or(bit, Ordering::SeqCst) == 0 {
            self.event.write(1)?;
        }
        Ok(())
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the given status bits. Bits still set raise the interrupt again.
    pub fn ack(&self, bits: u32) -> io::Result<()> {
        if self.status.fetch_and(!bits, Ordering::SeqCst) & !bits != 0 {
            self.event.write(1)?;
        }
        Ok(())
    }

    /// The ConfigGeneration register.
    pub fn config_generation(&self) -> u32 {
        self.config_generation.load(Ordering::SeqCst)
    }

    /// The eventfd the VMM registers as an irqfd.
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    /// Puts back a saved status and generation. A status with bits set raises the interrupt
    /// once: the edge the guest may not have taken before the snapshot must not be lost, and a
    /// second one costs the driver one look at an unchanged ring.
    pub(crate) fn restore(&self, status: u32, config_generation: u32) -> io::Result<()> {
        self.config_generation.store(config_generation, Ordering::SeqCst);
        self.status.store(status, Ordering::SeqCst);
        if status != 0 {
            self.event.write(1)?;
        }
        Ok(())
    }

    /// Device reset: no interrupt pending.
    pub(crate) fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Edges pending on the eventfd (0 if none).
    fn edges(irq: &Interrupt) -> u64 {
        irq.event().read().unwrap_or(0)
    }

    #[test]
    fn edges_come_where_the_level_would_rise() {
        let irq = Interrupt::new().unwrap();
        irq.signal_used_buffer().unwrap();
        assert_eq!(irq.status(), INTERRUPT_USED_BUFFER);
        assert_eq!(edges(&irq), 1);
        // Not acknowledged yet: the level is already up, no new edge.
        irq.signal_used_buffer().unwrap();
        irq.signal_config_change().unwrap();
        assert_eq!(edges(&irq), 0);
        assert_eq!(
            irq.status(),
            INTERRUPT_USED_BUFFER | INTERRUPT_CONFIG_CHANGE
        );
        assert_eq!(irq.config_generation(), 1);
        // An ack that leaves a bit set raises it again; one that clears everything does not.
        irq.ack(INTERRUPT_USED_BUFFER).unwrap();
        assert_eq!(irq.status(), INTERRUPT_CONFIG_CHANGE);
        assert_eq!(edges(&irq), 1);
        irq.ack(INTERRUPT_CONFIG_CHANGE).unwrap();
        assert_eq!(edges(&irq), 0);
        // From zero again: a new edge.
        irq.signal_used_buffer().unwrap();
        assert_eq!(edges(&irq), 1);
        irq.reset();
        assert_eq!(irq.status(), 0);
    }
}
