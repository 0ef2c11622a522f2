//! The ACPI power management timer: a free-running 24-bit counter at 3.579545 MHz, read as a
//! 32-bit I/O port that the FADT's PM_TMR_BLK names. kvm-unit-tests' `vmexit inl_from_pmtimer`
//! times reads of it (a userspace exit under nvmm, as under QEMU).

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;

/// Next to the hardware-reduced sleep and reset registers (0x600-0x602), where QEMU's PC has it.
pub const PM_TIMER_PORT: u64 = 0x608;
pub const PORT_COUNT: u64 = 4;
/// The timer's frequency, fixed by the ACPI specification (4.8.3.3).
pub const FREQUENCY_HZ: u128 = 3_579_545;
const COUNTER_MASK: u32 = 0x00ff_ffff;

/// What a snapshot keeps of the timer: its count when saved, from which a restored timer goes on,
/// as the guest's other clocks go on from their saved time.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PmTimerState {
    pub count: u32,
}

pub struct PmTimer {
    /// The count is `base` at `start`, and runs on from there.
    start: Instant,
    base: u32,
}

impl PmTimer {
    pub fn new() -> Self {
        Self { start: Instant::now(), base: 0 }
    }

    /// The count at `now`. Truncating the ticks to 32 bits keeps their low 24 right.
    fn count_at(&self, now: Instant) -> u32 {
        let ticks = now.saturating_duration_since(self.start).as_nanos() * FREQUENCY_HZ / 1_000_000_000;
        self.base.wrapping_add(ticks as u32) & COUNTER_MASK
    }

    fn count(&self) -> u32 {
        self.count_at(Instant::now())
    }

    pub fn save(&self) -> PmTimerState {
        PmTimerState { count: self.count() }
    }

    pub fn restore(&mut self, state: &PmTimerState) {
        self.start = Instant::now();
        self.base = state.count & COUNTER_MASK;
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

    /// A restored timer reads the saved count at once and counts on from it, wrapping at 24 bits.
    #[test]
    fn a_restored_timer_goes_on_from_the_saved_count() {
        let mut t = PmTimer::new();
        t.restore(&PmTimerState { count: COUNTER_MASK - 10 });
        assert_eq!(t.count_at(t.start), COUNTER_MASK - 10);
        let one_second = t.start + std::time::Duration::from_secs(1);
        assert_eq!(t.count_at(one_second), (COUNTER_MASK - 10).wrapping_add(FREQUENCY_HZ as u32) & COUNTER_MASK);
        // Only the low 24 bits of a saved count mean anything.
        t.restore(&PmTimerState { count: u32::MAX });
        assert_eq!(t.count_at(t.start), COUNTER_MASK);
    }
}
