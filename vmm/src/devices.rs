//! Placing devices on the buses and wiring their interrupts: the legacy PC devices here, virtio in
//! `virtio.rs`. Also the event-loop subscribers for the console and for the VM's end.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use nvmm_devices::acpi_pm::{self, AcpiPm, ACPI_PM_PORT};
use nvmm_devices::acpi_pm1::{self, Pm1, Pm1Lines};
use nvmm_devices::boot_timer::{BootTimer, BOOT_TIMER_PORT};
use nvmm_devices::cmos_rtc::timer::RtcTimer;
use nvmm_devices::cmos_rtc::{self, CmosRtc, HostClock, RtcLines};
use nvmm_devices::debug_exit::{self, DebugExit};
use nvmm_devices::fw_cfg::{self, FwCfg};
use nvmm_devices::i8042::{self, I8042, I8042State};
use nvmm_devices::pm_timer::{self, PmTimer};
use nvmm_devices::serial::{self, InputRoom, SerialPort, SerialPortState};
use nvmm_devices::trigger::EventFdTrigger;
use vmm_sys_util::eventfd::EventFd;

use crate::sleep::SleepSignal;
use crate::snapshot::{Machine, TestDevicesState};
use crate::vcpu::{ExitSignal, IoBuses, VmExit, VmSignals};
use crate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("device placement: {0}")]
    Bus(#[from] nvmm_devices::bus::BusError),
    #[error(transparent)]
    Vm(#[from] crate::vm::Error),
    #[error(transparent)]
    SerialState(#[from] serial::SerialError),
    #[error("cannot create the RTC's timer: {0}")]
    Timer(#[source] std::io::Error),
}

fn eventfd() -> Result<EventFd, Error> {
    EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)
}

/// What the event loop serves: each device behind the same mutex its bus entry uses.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// The legacy devices, and what the event loop needs to serve them.
pub struct Legacy {
    pub serial: Arc<Mutex<SerialPort>>,
    /// Signalled when the guest empties the serial receive FIFO, while console input waits.
    pub serial_room: Arc<InputRoom>,
    /// The serial port's interrupt line, for loading a saved state into the port.
    serial_irq: EventFd,
    pub i8042: Arc<Mutex<I8042>>,
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
    let serial_room = Arc::new(InputRoom::new().map_err(Error::EventFd)?);
    let trigger = EventFdTrigger(serial_irq.try_clone().map_err(Error::EventFd)?);
    let serial = Arc::new(Mutex::new(SerialPort::new(trigger, serial_room.clone(), Box::new(std::io::stdout()))));
    io.pio.insert_named(serial::COM1_PORT, serial::PORT_COUNT, "serial", serial.clone())?;

    let reset = eventfd()?;
    let dup = reset.try_clone().map_err(Error::EventFd)?;
    let i8042 = Arc::new(Mutex::new(I8042::new(EventFdTrigger(dup))));
    io.pio.insert_named(i8042::I8042_PORT, i8042::PORT_COUNT, "i8042", i8042.clone())?;
    io.pio.insert_named(BOOT_TIMER_PORT, 1, "boot-timer", Arc::new(Mutex::new(BootTimer::new(start))))?;

    let power_off = eventfd()?;
    if acpi {
        let pm = AcpiPm::new(
            EventFdTrigger(power_off.try_clone().map_err(Error::EventFd)?),
            EventFdTrigger(reset.try_clone().map_err(Error::EventFd)?),
        );
        io.pio.insert_named(ACPI_PM_PORT, acpi_pm::PORT_COUNT, "acpi-pm", Arc::new(Mutex::new(pm)))?;
    }
    Ok(Legacy { serial, serial_room, serial_irq, i8042, reset, power_off })
}

impl Legacy {
    /// Loads the serial port's and the i8042's saved state; the port keeps its interrupt line
    /// and writes to stdout as before.
    pub fn restore(&self, serial: &SerialPortState, i8042: &I8042State) -> Result<(), Error> {
        let trigger = EventFdTrigger(self.serial_irq.try_clone().map_err(Error::EventFd)?);
        self.serial.lock().unwrap_or_else(|e| e.into_inner()).restore(serial, trigger, Box::new(std::io::stdout()))?;
        self.i8042.lock().unwrap_or_else(|e| e.into_inner()).restore(i8042);
        Ok(())
    }
}

/// The kvm-unit-tests devices that keep state, for a snapshot.
pub struct TestDevices {
    pub fw_cfg: Arc<Mutex<FwCfg>>,
    pub pm_timer: Option<Arc<Mutex<PmTimer>>>,
    pub cmos_rtc: Option<Arc<Mutex<CmosRtc>>>,
    pub acpi_pm1: Option<Arc<Mutex<Pm1>>>,
    /// The RTC's timer, for the main event loop to take.
    pub rtc_timer: Option<RtcTimer>,
}

/// What the test devices reach beyond the bus: the VM (for IRQ 8), how the VM ends and sleeps,
/// and the ACPI power-off line.
pub struct TestWiring<'a> {
    pub vm: &'a Vm,
    pub signals: &'a VmSignals,
    pub power_off: &'a EventFd,
}

fn locked<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The devices of QEMU's PC that kvm-unit-tests talk to, those `machine` has: fw_cfg (always: it
/// only answers what the guest asks), the ACPI PM timer and PM1 blocks and the CMOS RTC (when the
/// FADT names them), and the debug-exit port (when asked for), which ends the VM. The same for a
/// boot and a restore.
pub fn setup_test_devices(io: &mut IoBuses, machine: &Machine, wiring: TestWiring) -> Result<TestDevices, Error> {
    let fw_cfg = Arc::new(Mutex::new(FwCfg::new(machine.cpus.into(), machine.mem_bytes)));
    io.pio.insert(fw_cfg::FW_CFG_PORT, fw_cfg::PORT_COUNT, fw_cfg.clone())?;
    let pm_timer = if machine.pm_timer {
        let timer = Arc::new(Mutex::new(PmTimer::new()));
        io.pio.insert(pm_timer::PM_TIMER_PORT, pm_timer::PORT_COUNT, timer.clone())?;
        Some(timer)
    } else {
        None
    };
    let acpi_pm1 = machine.acpi_pm1.then(|| setup_acpi_pm1(io, wiring.signals.sleep.clone(), wiring.power_off)).transpose()?;
    let (cmos_rtc, rtc_timer) = machine.cmos_rtc.then(|| setup_cmos_rtc(io, wiring.vm, acpi_pm1.clone())).transpose()?.unzip();
    if machine.debug_exit {
        let exit = wiring.signals.exit.clone();
        let dev = DebugExit::new(Box::new(move |status| exit.exit(VmExit::DebugExit(status))));
        io.pio.insert(debug_exit::DEBUG_EXIT_PORT, debug_exit::PORT_COUNT, Arc::new(Mutex::new(dev)))?;
    }
    Ok(TestDevices { fw_cfg, pm_timer, cmos_rtc, acpi_pm1, rtc_timer })
}

/// The PM1 blocks: S5 powers off as the hardware-reduced sleep register does; S3 and its wake go
/// through `sleep`.
fn setup_acpi_pm1(io: &mut IoBuses, sleep: Arc<SleepSignal>, power_off: &EventFd) -> Result<Arc<Mutex<Pm1>>, Error> {
    let waker = sleep.clone();
    let lines = Pm1Lines {
        power_off: EventFdTrigger(power_off.try_clone().map_err(Error::EventFd)?),
        sleep: Box::new(move || sleep.request_sleep()),
        wake: Box::new(move || waker.request_wake()),
    };
    let pm1 = Arc::new(Mutex::new(Pm1::new(lines)));
    io.pio.insert_named(acpi_pm1::PM1_PORT, acpi_pm1::PORT_COUNT, "acpi-pm1", pm1.clone())?;
    Ok(pm1)
}

/// The RTC on IRQ 8, its alarm reported to the PM1 blocks (RTC_STS, and the S3 wake), and its
/// timer.
fn setup_cmos_rtc(io: &mut IoBuses, vm: &Vm, pm1: Option<Arc<Mutex<Pm1>>>) -> Result<(Arc<Mutex<CmosRtc>>, RtcTimer), Error> {
    let irq = eventfd()?;
    vm.register_irqfd(&irq, cmos_rtc::RTC_IRQ)?;
    let rearm = eventfd()?;
    let lines = RtcLines {
        irq: EventFdTrigger(irq),
        rearm: EventFdTrigger(rearm.try_clone().map_err(Error::EventFd)?),
        alarm: Box::new(move || {
            if let Some(pm1) = &pm1 {
                locked(pm1).rtc_alarm();
            }
        }),
    };
    let rtc = Arc::new(Mutex::new(CmosRtc::new(Box::new(HostClock::new()), lines)));
    io.pio.insert_named(cmos_rtc::RTC_PORT, cmos_rtc::PORT_COUNT, "cmos-rtc", rtc.clone())?;
    let timer = RtcTimer::new(rtc.clone(), rearm).map_err(Error::Timer)?;
    Ok((rtc, timer))
}

impl TestDevices {
    pub fn save(&self) -> TestDevicesState {
        TestDevicesState {
            fw_cfg: locked(&self.fw_cfg).save(),
            pm_timer: self.pm_timer.as_ref().map(|t| locked(t).save()),
            cmos_rtc: self.cmos_rtc.as_ref().map(|r| locked(r).save()),
            acpi_pm1: self.acpi_pm1.as_ref().map(|p| locked(p).save()),
        }
    }

    /// Loads the saved state; a device with none saved (the builder refuses that) runs on fresh.
    pub fn restore(&self, state: &TestDevicesState) {
        locked(&self.fw_cfg).restore(&state.fw_cfg);
        if let (Some(timer), Some(saved)) = (&self.pm_timer, &state.pm_timer) {
            locked(timer).restore(saved);
        }
        if let (Some(rtc), Some(saved)) = (&self.cmos_rtc, &state.cmos_rtc) {
            locked(rtc).restore(saved);
        }
        if let (Some(pm1), Some(saved)) = (&self.acpi_pm1, &state.acpi_pm1) {
            locked(pm1).restore(saved);
        }
    }

    /// Whether something will wake a guest asleep in S3: RTC_EN, and an RTC alarm to come.
    pub fn wakes_from_s3(&self) -> bool {
        let rtc_en = self.acpi_pm1.as_ref().is_some_and(|p| locked(p).rtc_wakes());
        rtc_en && self.cmos_rtc.as_ref().is_some_and(|r| locked(r).alarm_armed())
    }
}

/// Feeds the host's stdin to the guest's serial port, only as fast as the guest reads it: once the
/// receive FIFO is full, stdin is no longer watched (a level-triggered stdin with unread input
/// would wake the main loop forever) until the guest empties the FIFO.
pub struct ConsoleInput {
    serial: Arc<Mutex<SerialPort>>,
    room: Arc<InputRoom>,
    pending: Vec<u8>,
    /// Whether stdin is in the event loop (it is not while input waits for room, nor after EOF).
    watching: bool,
    /// Stdin reached its end or failed: never watched again.
    ended: bool,
}

/// `Events::data` of each source.
const STDIN: u32 = 0;
const ROOM: u32 = 1;

impl ConsoleInput {
    pub fn new(serial: Arc<Mutex<SerialPort>>, room: Arc<InputRoom>) -> Self {
        Self { serial, room, pending: Vec::new(), watching: false, ended: false }
    }

    fn stdin_events() -> Events {
        Events::with_data(&std::io::stdin(), STDIN, EventSet::IN)
    }

    /// Moves what fits into the FIFO; true if everything did.
    fn flush_pending(&mut self) -> bool {
        let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        let n = serial.enqueue_input(&self.pending);
        self.pending.drain(..n);
        self.pending.is_empty()
    }

    /// [`Self::flush_pending`]; when the FIFO is full, asks the UART to signal once the guest has
    /// emptied it. The second try, after asking, catches an emptying just before the request.
    fn deliver(&mut self) -> bool {
        if self.flush_pending() {
            return true;
        }
        self.room.wait();
        self.flush_pending()
    }

    /// Watches stdin again, or asks the UART to say when there is room.
    fn watch_stdin(&mut self, ops: &mut EventOps, watch: bool) {
        if watch == self.watching || self.ended {
            return;
        }
        let result = if watch { ops.add(Self::stdin_events()) } else { ops.remove(Self::stdin_events()) };
        match result {
            Ok(()) => self.watching = watch,
            // stdin may be a file or closed (e.g. under CI); the guest then has no console input.
            Err(e) => {
                log::debug!("console input unavailable: {e:?}");
                self.ended = true;
            }
        }
    }

    /// Free space in the UART's receive FIFO.
    fn room(&self) -> usize {
        self.serial.lock().unwrap_or_else(|e| e.into_inner()).input_room()
    }

    fn read_stdin(&mut self, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        // Read no more than the FIFO takes; with no room at all, read nothing and wait for the
        // guest (asked first, so that an emptying in between is not missed).
        let mut room = self.room();
        if room == 0 {
            self.room.wait();
            room = self.room();
            if room == 0 {
                self.watch_stdin(ops, false);
                return;
            }
        }
        let want = room.min(buf.len());
        match std::io::stdin().lock().read(&mut buf[..want]) {
            Ok(n) if n > 0 => self.pending.extend_from_slice(&buf[..n]),
            // EOF or an error: stop watching, or epoll would report it forever.
            _ => {
                self.watch_stdin(ops, false);
                self.ended = true;
                return;
            }
        }
        if !self.deliver() {
            // The FIFO is full: sleep until the guest empties it.
            self.watch_stdin(ops, false);
        }
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::with_data(self.room.event(), ROOM, EventSet::IN)) {
            log::error!("cannot watch the serial port for room: {e:?}");
        }
        self.watch_stdin(ops, true);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        match events.data() {
            STDIN => self.read_stdin(ops),
            _ => {
                let _ = self.room.event().read();
                if self.deliver() {
                    self.watch_stdin(ops, true);
                }
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
