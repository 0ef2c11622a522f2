//! ACPI S3 (suspend to RAM) between the devices and the VMM. The guest's write of SLP_TYP=S3 |
//! SLP_EN (`nvmm_devices::acpi_pm1`) requests sleep: from then on every vCPU stops before its next
//! guest instruction (`vcpu/runner.rs`), and the main loop pauses them all (`vmm.rs`). The RTC's
//! alarm, with RTC_EN set, requests the wake: the main loop puts the boot vCPU where firmware
//! leaves it at a resume (real mode at the FACS's waking vector), the others in wait-for-SIPI,
//! and runs them again.

use std::sync::atomic::{AtomicBool, Ordering};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::acpi;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read the FACS's waking vector at {addr:#x}: {err}")]
    Facs { addr: u64, err: vm_memory::GuestMemoryError },
}

/// The guest's requests to sleep and wake, and whether vCPUs may run.
pub struct SleepSignal {
    /// Set from the guest's sleep request until the VMM has woken the vCPUs: a vCPU that sees it
    /// after an exit completes that exit's instruction, then pauses itself.
    vcpus_stop: AtomicBool,
    sleep: AtomicBool,
    wake: AtomicBool,
    /// Wakes the main loop.
    event: EventFd,
}

impl SleepSignal {
    pub fn new() -> std::io::Result<Self> {
        let event = EventFd::new(libc::EFD_NONBLOCK)?;
        Ok(Self { vcpus_stop: AtomicBool::new(false), sleep: AtomicBool::new(false), wake: AtomicBool::new(false), event })
    }

    /// The guest entered S3 (called on the vCPU thread that wrote the request).
    pub fn request_sleep(&self) {
        self.vcpus_stop.store(true, Ordering::SeqCst);
        self.sleep.store(true, Ordering::SeqCst);
        self.notify();
    }

    /// A wake event came while the guest slept.
    pub fn request_wake(&self) {
        self.wake.store(true, Ordering::SeqCst);
        self.notify();
    }

    fn notify(&self) {
        // A full counter still wakes the reader, so a failed write changes nothing.
        let _ = self.event.write(1);
    }

    pub fn vcpus_must_stop(&self) -> bool {
        self.vcpus_stop.load(Ordering::SeqCst)
    }

    /// The vCPUs have been put in their wake state and may run.
    pub fn let_vcpus_run(&self) {
        self.vcpus_stop.store(false, Ordering::SeqCst);
    }

    /// Whether a sleep was requested since the last call.
    pub fn take_sleep(&self) -> bool {
        self.sleep.swap(false, Ordering::SeqCst)
    }

    /// Whether a sleep is requested and not yet taken.
    pub fn sleep_pending(&self) -> bool {
        self.sleep.load(Ordering::SeqCst)
    }

    /// Whether a wake was requested since the last call.
    pub fn take_wake(&self) -> bool {
        self.wake.swap(false, Ordering::SeqCst)
    }
}

/// Wakes the main loop on a sleep or wake request; the loop reads the flags after each round.
pub struct SleepWatcher(pub std::sync::Arc<SleepSignal>);

impl MutEventSubscriber for SleepWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.0.event, EventSet::IN)) {
            log::error!("cannot watch for the guest's ACPI sleep requests: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.0.event.read();
    }
}

/// Where the boot vCPU resumes: `segment:offset` in real mode, from the FACS's
/// Firmware_Waking_Vector as ACPI says (segment = vector >> 4, offset = vector & 0xf); `None` when
/// the guest left it 0, after which a PC's firmware boots afresh.
pub fn waking_vector(mem: &GuestMemoryMmap) -> Result<Option<(u16, u16)>, Error> {
    let read = |offset: u64| {
        let addr = acpi::facs_addr() + offset;
        mem.read_obj::<u64>(GuestAddress(addr)).map_err(|err| Error::Facs { addr, err })
    };
    let vector = read(acpi::FACS_WAKING_VECTOR)? as u32;
    if read(acpi::FACS_X_WAKING_VECTOR)? != 0 {
        nvmm_devices::warn_limited!("the guest set the FACS's 64-bit waking vector; nvmm resumes it at the real-mode one");
    }
    Ok((vector != 0).then_some(((vector >> 4) as u16, (vector & 0xf) as u16)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_waking_vector_becomes_a_real_mode_segment_and_offset() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        assert_eq!(waking_vector(&mem).unwrap(), None, "0: no resume code");
        let at = GuestAddress(acpi::facs_addr() + acpi::FACS_WAKING_VECTOR);
        // kvm-unit-tests' s3.c puts its resume code at 0x1000.
        mem.write_obj(0x1000u32, at).unwrap();
        assert_eq!(waking_vector(&mem).unwrap(), Some((0x100, 0)));
        mem.write_obj(0x9_f123u32, at).unwrap();
        assert_eq!(waking_vector(&mem).unwrap(), Some((0x9f12, 3)));
    }

    #[test]
    fn requests_are_taken_once_and_vcpus_stay_stopped_until_let_run() {
        let s = SleepSignal::new().unwrap();
        assert!(!s.vcpus_must_stop() && !s.take_sleep() && !s.take_wake());
        s.request_sleep();
        assert!(s.vcpus_must_stop() && s.sleep_pending());
        assert!(s.take_sleep());
        assert!(!s.take_sleep() && !s.sleep_pending());
        s.request_wake();
        assert!(s.take_wake() && !s.take_wake());
        assert!(s.vcpus_must_stop(), "until the VMM has set the vCPUs' wake state");
        s.let_vcpus_run();
        assert!(!s.vcpus_must_stop());
        assert_eq!(s.event.read().unwrap(), 2);
    }
}
