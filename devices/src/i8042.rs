//! The i8042 keyboard controller, present for one reason: its reset command is how a guest without
//! ACPI reboots (`reboot=k`), which nvmm treats as the end of the VM.

use vm_superio::I8042Device;

use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;

/// Data port 0x60 to command port 0x64; vm-superio takes offsets from the data port.
pub const I8042_PORT: u64 = 0x60;
pub const PORT_COUNT: u64 = 5;

/// The controller's state in a snapshot: empty, because vm-superio's i8042 has no registers (every
/// read answers 0, and only the reset command does anything). Kept so the controller saves and loads
/// itself like every other device, and a later controller with registers has its place.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct I8042State {}

pub struct I8042 {
    dev: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// `reset` is signalled when the guest pulses the reset line.
    pub fn new(reset: EventFdTrigger) -> Self {
        Self {
            dev: I8042Device::new(reset),
        }
    }
}

impl I8042 {
    pub fn save(&self) -> I8042State {
        I8042State {}
    }

    pub fn restore(&mut self, _state: &I8042State) {}
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.dev.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            if let Err(e) = self.dev.write(offset as u8, value) {
                crate::error_limited!("i8042 reset could not be signalled: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn reset_command_signals() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut d = I8042::new(EventFdTrigger(evt.try_clone().unwrap()));
        d.write(0, &[0xfe]); // the data port does nothing
        assert!(evt.read().is_err());
        d.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
