//! Placing devices on the buses and wiring their interrupts: the legacy PC devices here, virtio in
//! `virtio.rs`. Also the event-loop subscribers for the console and for the VM's end.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use nvmm_devices::acpi_pm::{self, AcpiPm, ACPI_PM_PORT};
use nvmm_devices::boot_timer::{BootTimer, BOOT_TIMER_PORT};
use nvmm_devices::debug_exit::{self, DebugExit};
use nvmm_devices::fw_cfg::{self, FwCfg};
use nvmm_devices::pm_timer::{self, PmTimer};
use nvmm_devices::i8042::{self, I8042};
use nvmm_devices::serial::{self, SerialPort};
use nvmm_devices::trigger::EventFdTrigger;
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::vcpu::{ExitSignal, IoBuses, VmExit};
use crate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("device placement: {0}")]
    Bus(#[from] nvmm_devices::bus::BusError),
    #[error(transparent)]
    Vm(#[from] crate::vm::Error),
}

fn eventfd() -> Result<EventFd, Error> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)
}

/// What the event loop serves: each device behind the same mutex its bus entry uses.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The legacy devices, and what the event loop needs to serve them.
pub struct Legacy {
    pub serial: Arc<Mutex<SerialPort>>,
    /// Signalled by the i8042 reset line and the ACPI reset register.
    pub reset: EventFd,
    /// Signalled when the guest enters ACPI S5.
    pub power_off: EventFd,
}

/// COM1 to stdout, the i8042 for reset, the ACPI power-off and reset registers (when the guest
/// has ACPI tables that name them), and the boot timer port.
pub fn setup_legacy(vm: &Vm, io: &mut IoBuses, start: Instant, acpi: bool) -> Result<Legacy, Error> {
    let serial_irq = eventfd()?;
    vm.register_irqfd(&serial_irq, serial::COM1_IRQ)?;
    let serial = Arc::new(Mutex::new(SerialPort::new(EventFdTrigger(serial_irq), Box::new(std::io::stdout()))));
    io.pio.insert(serial::COM1_PORT, serial::PORT_COUNT, serial.clone())?;

    let reset = eventfd()?;
    let dup = reset.try_clone().map_err(Error::EventFd)?;
    io.pio.insert(i8042::I8042_PORT, i8042::PORT_COUNT, Arc::new(Mutex::new(I8042::new(EventFdTrigger(dup)))))?;
    io.pio.insert(BOOT_TIMER_PORT, 1, Arc::new(Mutex::new(BootTimer::new(start))))?;

    let power_off = eventfd()?;
    if acpi {
        let pm = AcpiPm::new(
            EventFdTrigger(power_off.try_clone().map_err(Error::EventFd)?),
            EventFdTrigger(reset.try_clone().map_err(Error::EventFd)?),
        );
        io.pio.insert(ACPI_PM_PORT, acpi_pm::PORT_COUNT, Arc::new(Mutex::new(pm)))?;
    }
    Ok(Legacy { serial, reset, power_off })
}

/// The devices of QEMU's PC that kvm-unit-tests talk to: fw_cfg (always: it only answers what the
/// guest asks), the ACPI PM timer when the FADT names it, and the debug-exit port when asked for,
/// which ends the VM through `exit`.
pub fn setup_test_devices(io: &mut IoBuses, config: &VmConfig, pm_timer: bool, exit: Arc<ExitSignal>) -> Result<(), Error> {
    let fw_cfg = FwCfg::new(config.cpus.into(), config.mem_bytes);
    io.pio.insert(fw_cfg::FW_CFG_PORT, fw_cfg::PORT_COUNT, Arc::new(Mutex::new(fw_cfg)))?;
    if pm_timer {
        io.pio.insert(pm_timer::PM_TIMER_PORT, pm_timer::PORT_COUNT, Arc::new(Mutex::new(PmTimer::new())))?;
    }
    if config.debug_exit {
        let dev = DebugExit::new(Box::new(move |status| exit.exit(VmExit::DebugExit(status))));
        io.pio.insert(debug_exit::DEBUG_EXIT_PORT, debug_exit::PORT_COUNT, Arc::new(Mutex::new(dev)))?;
    }
    Ok(())
}

/// Feeds the host's stdin to the guest's serial port.
pub struct ConsoleInput {
    serial: Arc<Mutex<SerialPort>>,
    pending: Vec<u8>,
}

impl ConsoleInput {
    pub fn new(serial: Arc<Mutex<SerialPort>>) -> Self {
        Self { serial, pending: Vec::new() }
    }

    fn flush_pending(&mut self) {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let n = serial.enqueue_input(&self.pending);
        self.pending.drain(..n);
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&std::io::stdin(), EventSet::IN)) {
            // stdin may be a file or closed (e.g. under CI); the guest then has no console input.
            log::debug!("console input unavailable: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if !self.pending.is_empty() {
            self.flush_pending();
            return;
        }
        let mut buf = [0u8; 64];
        match std::io::stdin().lock().read(&mut buf) {
            Ok(n) if n > 0 => {
                self.pending.extend_from_slice(&buf[..n]);
                self.flush_pending();
            }
            // EOF or an error: stop watching, or epoll would report it forever.
            _ => {
                let _ = ops.remove(events);
            }
        }
    }
}

/// Wakes the main loop when the VM must end: a vCPU stopped, or the guest asked for a reset or
/// a power-off.
pub struct ExitWatcher {
    pub signal: Arc<ExitSignal>,
    pub reset: EventFd,
    pub power_off: EventFd,
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        for fd in [self.signal.event(), &self.reset, &self.power_off] {
            if let Err(e) = ops.add(Events::new(fd, EventSet::IN)) {
                log::error!("cannot watch for VM exit: {e:?}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.reset.as_raw_fd() {
            let _ = self.reset.read();
            self.signal.exit(VmExit::Reset);
        } else if events.fd() == self.power_off.as_raw_fd() {
            let _ = self.power_off.read();
            self.signal.exit(VmExit::PowerOff);
        } else {
            let _ = self.signal.event().read();
        }
    }
}
