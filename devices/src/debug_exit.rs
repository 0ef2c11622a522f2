//! QEMU's isa-debug-exit, as kvm-unit-tests use it: a guest write of V to the port ends the VMM
//! with exit status (V << 1) | 1, so a test's pass (0 -> 1), fail (1 -> 3) and skip (38 -> 77)
//! read the same under either VMM. Only there when the user asks (`--debug-exit`): otherwise a
//! guest could end nvmm with a status of its choosing.

use crate::bus::BusDevice;

/// The port and width kvm-unit-tests' `x86/run` gives QEMU (`iobase=0xf4,iosize=0x4`).
pub const DEBUG_EXIT_PORT: u64 = 0xf4;
pub const PORT_COUNT: u64 = 4;

/// The status a write of `value` asks for, as QEMU computes it (an `int` exit status, of which
/// the process's parent sees the low 8 bits).
pub fn exit_status(value: u32) -> u8 {
    ((value << 1) | 1) as u8
}

pub struct DebugExit {
    on_exit: Box<dyn Fn(u8) + Send>,
}

impl DebugExit {
    /// `on_exit` is called with the exit status on every write; ending the VM is its job.
    pub fn new(on_exit: Box<dyn Fn(u8) + Send>) -> Self {
        Self { on_exit }
    }
}

impl BusDevice for DebugExit {
    /// QEMU's device has nothing to read either; a floating bus reads as all ones.
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    /// The access's width decides how many bytes make up the value (little endian), as in QEMU.
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let value = data.iter().take(4).rev().fold(0u32, |v, &b| (v << 8) | u32::from(b));
        (self.on_exit)(exit_status(value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn writes_become_qemu_statuses() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let mut dev = DebugExit::new(Box::new(move |status| s.lock().unwrap().push(status)));
        dev.write(0, &[0]);
        dev.write(0, &[1]);
        dev.write(0, &[38, 0, 0, 0]);
        dev.write(0, &[0x80]);
        assert_eq!(*seen.lock().unwrap(), vec![1, 3, 77, 1]);
    }
}
