//! The ACPI power management timer: a free-running 24-bit counter at 3.579545 MHz, read as a
//! 32-bit I/O port that the FADT's PM_TMR_BLK names. kvm-unit-tests' `vmexit inl_from_pmtimer`
//! times reads of it (a userspace exit under nvmm, as under QEMU).

use std::time::Instant;

use crate::bus::BusDevice;

/// Next to the hardware-reduced sleep and reset registers (0x600-0x602), where QEMU's PC has it.
pub const PM_TIMER_PORT: u64 = 0x608;
pub const PORT_COUNT: u64 = 4;
/// The timer's frequency, fixed by the ACPI specification (4.8.3.3).
pub const FREQUENCY_HZ: u128 = 3_579_545;
const COUNTER_MASK: u32 = 0x00ff_ffff;

pub struct PmTimer {
    start: Instant,
}

impl PmTimer {
    pub fn new() -> Self {
        Self { start: Instant::now() }
    }

    fn count(&self) -> u32 {
        let ticks = self.start.elapsed().as_nanos() * FREQUENCY_HZ / 1_000_000_000;
        (ticks as u32) & COUNTER_MASK
    }
}

impl Default for PmTimer {
    fn default() -> Self {
        Self::new()
    }
}

impl BusDevice for PmTimer {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let bytes = self.count().to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(offset as usize + i).copied().unwrap_or(0);
        }
    }

    /// The timer is read-only.
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(t: &mut PmTimer) -> u32 {
        let mut b = [0u8; 4];
        t.read(0, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn counts_at_the_acpi_rate_in_24_bits() {
        let mut t = PmTimer::new();
        let a = read(&mut t);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let b = read(&mut t);
        // 20 ms is 71,591 ticks; allow for a slow, loaded machine but not for another unit.
        let ticks = b.wrapping_sub(a) & COUNTER_MASK;
        assert!((71_000..400_000).contains(&ticks), "{ticks} ticks in 20 ms");
        assert_eq!(b & !COUNTER_MASK, 0);
    }
}
