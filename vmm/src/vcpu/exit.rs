//! What to do with one VM exit. A free function over the I/O buses, so tests drive it without a
//! vCPU thread.

use kvm_ioctls::VcpuExit;
use nvmm_devices::bus::Bus;

use super::profile::{ExitProfile, Kind};

/// Why a VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest asked for a reset (i8042 pulse, ACPI reset register, triple fault).
    Reset,
    /// The guest powered off through ACPI (sleep state S5).
    PowerOff,
    /// An API client asked for a shutdown; the disks are flushed.
    Shutdown,
    /// The guest wrote to the debug-exit port (`--debug-exit`): nvmm exits with this status.
    DebugExit(u8),
    /// Something went wrong; the message says what.
    Error(String),
}

/// The guest-visible I/O address spaces.
#[derive(Default)]
pub struct IoBuses {
    pub pio: Bus,
    pub mmio: Bus,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    Continue,
    Stop(VmExit),
}

/// Handles one exit and counts it in `profile`. Accesses to unclaimed ports read as all ones (a
/// floating ISA bus) and unclaimed MMIO reads as zero; writes to either are dropped.
pub fn handle_exit(exit: VcpuExit, io: &IoBuses, profile: &ExitProfile) -> Action {
    match exit {
        VcpuExit::IoIn(port, data) => {
            let slot = io.pio.read_slot(u64::from(port), data);
            if slot.is_none() {
                data.fill(0xff);
            }
            profile.port_io(port, slot);
        }
        VcpuExit::IoOut(port, data) => profile.port_io(port, io.pio.write_slot(u64::from(port), data)),
        VcpuExit::MmioRead(addr, data) => {
            let slot = io.mmio.read_slot(addr, data);
            if slot.is_none() {
                data.fill(0);
            }
            profile.mmio(slot);
        }
        VcpuExit::MmioWrite(addr, data) => profile.mmio(io.mmio.write_slot(addr, data)),
        VcpuExit::Shutdown => {
            profile.count(Kind::Shutdown);
            return Action::Stop(VmExit::Reset);
        }
        // With the in-kernel LAPIC, HLT is handled by KVM; seeing it means interrupts are off for good.
        VcpuExit::Hlt => {
            profile.count(Kind::Halt);
            return Action::Stop(VmExit::Error("the guest halted with interrupts disabled".into()));
        }
        // Signals and immediate-exit requests land here; the loop decides what to do next.
        VcpuExit::Intr => profile.count(Kind::Interrupt),
        other => {
            profile.count(Kind::Other);
            return Action::Stop(stop_reason(other));
        }
    }
    Action::Continue
}

/// Why an exit nvmm does not handle stops the VM.
fn stop_reason(exit: VcpuExit) -> VmExit {
    VmExit::Error(match exit {
        VcpuExit::FailEntry(reason, cpu) => format!("KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"),
        VcpuExit::SystemEvent(kind, _) => format!("unexpected system event {kind} from the guest"),
        other => format!("unhandled VM exit: {other:?}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvmm_devices::bus::BusDevice;
    use std::sync::{Arc, Mutex};

    struct Reg(Vec<u8>);
    impl BusDevice for Reg {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.get(offset as usize).copied().unwrap_or(0));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.resize(offset as usize + 1, 0);
            self.0[offset as usize] = data[0];
        }
    }

    fn buses() -> (IoBuses, Arc<Mutex<Reg>>) {
        let reg = Arc::new(Mutex::new(Reg(vec![])));
        let mut io = IoBuses::default();
        io.pio.insert(0x3f8, 8, reg.clone()).unwrap();
        io.mmio.insert(0xd000_0000, 0x1000, reg.clone()).unwrap();
        (io, reg)
    }

    fn handle_exit(exit: VcpuExit, io: &IoBuses) -> Action {
        super::handle_exit(exit, io, &ExitProfile::new(io, std::time::Instant::now()))
    }

    #[test]
    fn port_io_reaches_the_device_and_unclaimed_ports_float() {
        let (io, reg) = buses();
        assert_eq!(handle_exit(VcpuExit::IoOut(0x3f9, &[0x42]), &io), Action::Continue);
        assert_eq!(reg.lock().unwrap().0[1], 0x42);
        let mut b = [0u8; 1];
        handle_exit(VcpuExit::IoIn(0x3f9, &mut b), &io);
        assert_eq!(b[0], 0x42);
        let mut b = [0u8; 2];
        handle_exit(VcpuExit::IoIn(0x2f8, &mut b), &io);
        assert_eq!(b, [0xff, 0xff]);
    }

    #[test]
    fn mmio_reaches_the_device_and_unclaimed_reads_are_zero() {
        let (io, reg) = buses();
        handle_exit(VcpuExit::MmioWrite(0xd000_0004, &[9, 0, 0, 0]), &io);
        assert_eq!(reg.lock().unwrap().0[4], 9);
        let mut b = [0xaau8; 4];
        handle_exit(VcpuExit::MmioRead(0xe000_0000, &mut b), &io);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn shutdown_and_failures_stop_the_vm() {
        let (io, _) = buses();
        assert_eq!(handle_exit(VcpuExit::Shutdown, &io), Action::Stop(VmExit::Reset));
        assert!(matches!(handle_exit(VcpuExit::FailEntry(0x80000021, 0), &io), Action::Stop(VmExit::Error(_))));
        assert!(matches!(handle_exit(VcpuExit::Hlt, &io), Action::Stop(VmExit::Error(_))));
        assert_eq!(handle_exit(VcpuExit::Intr, &io), Action::Continue);
    }
}
