//! The hardware-reduced ACPI registers a guest powers off and resets through: the FADT's sleep
//! control and sleep status registers, and its reset register. Three I/O ports, no interrupts.
//!
//! Linux powers off by writing `SLP_TYP << 2 | SLP_EN` to the sleep control register, with
//! SLP_TYP taken from the DSDT's `_S5_` package, and reboots (`reboot=a`, the default on ACPI
//! machines) by writing the FADT's reset value to the reset register.

use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;

/// First port of the block; nothing else on a PC sits here.
pub const ACPI_PM_PORT: u64 = 0x600;
pub const PORT_COUNT: u64 = 3;
/// Offsets in the block, as the FADT's generic addresses name them.
pub const SLEEP_CONTROL: u64 = 0;
pub const SLEEP_STATUS: u64 = 1;
pub const RESET: u64 = 2;
/// What a write to the reset register must hold to reset (the FADT's RESET_VALUE).
pub const RESET_VALUE: u8 = 1;
/// The sleep type the DSDT's `_S5_` package gives for soft-off.
pub const S5_SLEEP_TYPE: u8 = 5;

/// Sleep control register: SLP_TYP in bits 2-4, SLP_EN in bit 5 (ACPI 6.5, 4.8.3.7).
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;
const SLP_EN: u8 = 1 << 5;

pub struct AcpiPm {
    power_off: EventFdTrigger,
    reset: EventFdTrigger,
    /// A guest asking for a sleep state we do not offer is told nothing; it is logged once.
    warned: bool,
}

impl AcpiPm {
    /// `power_off` is signalled on a write that enters S5, `reset` on a write of the reset value.
    pub fn new(power_off: EventFdTrigger, reset: EventFdTrigger) -> Self {
        Self { power_off, reset, warned: false }
    }

    fn signal(&self, which: &EventFdTrigger, what: &str) {
        if let Err(e) = which.write(1) {
            crate::error_limited!("ACPI {what} could not be signalled: {e}");
        }
    }
}

impl BusDevice for AcpiPm {
    /// Sleep status reads as 0: a guest that enters S5 never wakes to look at it.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            SLEEP_CONTROL if value & SLP_EN != 0 => {
                let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
                if sleep_type == S5_SLEEP_TYPE {
                    self.signal(&self.power_off, "power-off");
                } else if !self.warned {
                    self.warned = true;
                    crate::warn_limited!("guest asked for ACPI sleep type {sleep_type}; only S5 (power off) is offered");
                }
            }
            RESET if value == RESET_VALUE => self.signal(&self.reset, "reset"),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn device() -> (AcpiPm, EventFd, EventFd) {
        let off = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let d = AcpiPm::new(EventFdTrigger(off.try_clone().unwrap()), EventFdTrigger(reset.try_clone().unwrap()));
        (d, off, reset)
    }

    #[test]
    fn s5_with_slp_en_powers_off() {
        let (mut d, off, reset) = device();
        // Linux's acpi_hw_extended_sleep: SLP_TYP first without SLP_EN does nothing.
        d.write(SLEEP_CONTROL, &[S5_SLEEP_TYPE << 2]);
        assert!(off.read().is_err());
        d.write(SLEEP_CONTROL, &[(S5_SLEEP_TYPE << 2) | SLP_EN]);
        assert_eq!(off.read().unwrap(), 1);
        assert!(reset.read().is_err());
    }

    #[test]
    fn other_sleep_states_and_registers_do_nothing() {
        let (mut d, off, reset) = device();
        for typ in [0u8, 1, 3, 4, 7] {
            d.write(SLEEP_CONTROL, &[(typ << 2) | SLP_EN]);
        }
        d.write(SLEEP_STATUS, &[0xff]);
        d.write(RESET, &[RESET_VALUE + 1]);
        d.write(SLEEP_CONTROL, &[]);
        assert!(off.read().is_err());
        assert!(reset.read().is_err());
        let mut b = [0xffu8; 1];
        d.read(SLEEP_STATUS, &mut b);
        assert_eq!(b, [0]);
    }

    #[test]
    fn reset_value_resets() {
        let (mut d, off, reset) = device();
        d.write(RESET, &[RESET_VALUE]);
        assert_eq!(reset.read().unwrap(), 1);
        assert!(off.read().is_err());
    }
}
