//! A debug port the guest writes to once it reaches userspace, so boot time can be measured as
//! Firecracker's boot-timer device does: the time from VMM start to that write.

use std::time::Instant;

use crate::bus::BusDevice;

/// Chosen clear of the ports Linux probes on a PC (0x80 is its I/O delay port).
pub const BOOT_TIMER_PORT: u64 = 0x440;
/// The value the guest writes; other values are ignored.
pub const BOOT_TIMER_MAGIC: u8 = 123;

pub struct BootTimer {
    start: Instant,
    reported: bool,
}

impl BootTimer {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            reported: false,
        }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        if data.first() == Some(&BOOT_TIMER_MAGIC) && !self.reported {
            self.reported = true;
            let ms = self.start.elapsed().as_secs_f64() * 1000.0;
            log::info!("guest boot time: {ms:.1} ms (userspace wrote {BOOT_TIMER_MAGIC} to port {BOOT_TIMER_PORT:#x})");
        }
    }
}
