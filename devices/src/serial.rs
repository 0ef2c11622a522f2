//! The 16550A UART (vm-superio) on the port bus: output to a writer, input pushed by the VMM.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{SerialEvents, SerialState};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;

/// COM1's ports and IRQ.
pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const PORT_COUNT: u64 = 8;

/// Tells whoever feeds the UART that the guest emptied its receive FIFO, so that input waiting for
/// room (and the host's stdin, left unwatched meanwhile) can move on. It signals only while
/// someone waits: a guest polling an empty receive register costs nothing more.
#[derive(Debug)]
pub struct InputRoom {
    event: EventFd,
    waiting: AtomicBool,
}

impl InputRoom {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { event: EventFd::new(libc::EFD_NONBLOCK)?, waiting: AtomicBool::new(false) })
    }

    /// Readable once the FIFO has been emptied after [`InputRoom::wait`].
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    /// Asks for a signal when the guest next empties the FIFO.
    pub fn wait(&self) {
        self.waiting.store(true, Ordering::SeqCst);
    }
}

impl SerialEvents for InputRoom {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if self.waiting.swap(false, Ordering::SeqCst) {
            if let Err(e) = self.event.write(1) {
                crate::error_limited!("serial: cannot signal room for input: {e}");
            }
        }
    }
}

/// The UART's registers and its receive FIFO, for a snapshot (vm-superio's `SerialState`, which
/// has no serde of its own).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialPortState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("saved serial state does not load: {0}")]
    Restore(String),
}

pub struct SerialPort {
    uart: Serial<EventFdTrigger, Arc<InputRoom>, Box<dyn Write + Send>>,
}

impl SerialPort {
    /// `interrupt` is signalled when the guest should look at the UART (wired to an irqfd);
    /// `room` when the guest has emptied the receive FIFO while input waited.
    pub fn new(interrupt: EventFdTrigger, room: Arc<InputRoom>, out: Box<dyn Write + Send>) -> Self {
        Self {
            uart: Serial::with_events(interrupt, room, out),
        }
    }

    /// Queues input for the guest; returns how many bytes fit in the receive FIFO.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity().min(bytes.len());
        match self.uart.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                crate::warn_limited!("serial input dropped: {e:?}");
                0
            }
        }
    }

    /// Free space in the receive FIFO, so input can wait instead of being dropped.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }
}

impl SerialPort {
    pub fn save(&self) -> SerialPortState {
        let s = self.uart.state();
        SerialPortState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Loads saved registers, keeping this port's interrupt line and output. vm-superio raises
    /// the interrupt again if the saved state has one due.
    pub fn restore(&mut self, state: &SerialPortState, interrupt: EventFdTrigger, out: Box<dyn Write + Send>) -> Result<(), SerialError> {
        let s = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let room = self.uart.events().clone();
        self.uart = Serial::from_state(&s, interrupt, room, out).map_err(|e| SerialError::Restore(format!("{e:?}")))?;
        Ok(())
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let Some(first) = data.first_mut() {
            *first = self.uart.read(offset as u8);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some(&value) = data.first() {
            // A closed console must not stop the guest; the error is the writer's, not the guest's.
            if let Err(e) = self.uart.write(offset as u8, value) {
                log::debug!("serial output: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vmm_sys_util::eventfd::EventFd;

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn output_and_input() {
        let sink = Sink::default();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let room = Arc::new(InputRoom::new().unwrap());
        let mut s = SerialPort::new(
            EventFdTrigger(evt.try_clone().unwrap()),
            room.clone(),
            Box::new(sink.clone()),
        );
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi");
        s.write(1, &[1]); // IER: receive-data interrupt
        assert_eq!(s.enqueue_input(b"x"), 1);
        assert_eq!(evt.read().unwrap(), 1);
        let mut b = [0u8];
        s.read(5, &mut b); // LSR: data ready
        assert_eq!(b[0] & 1, 1);
        s.read(0, &mut b);
        assert_eq!(b[0], b'x');
        // Nobody waits for room: emptying the FIFO signals nothing.
        assert!(room.event().read().is_err());
    }

    #[test]
    fn emptying_the_fifo_signals_room_once_when_asked() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let room = Arc::new(InputRoom::new().unwrap());
        let mut s = SerialPort::new(EventFdTrigger(evt), room.clone(), Box::new(Sink::default()));
        let full = vec![b'y'; 1000];
        let took = s.enqueue_input(&full);
        assert_eq!(s.input_room(), 0);
        room.wait();
        let mut b = [0u8];
        for _ in 0..took - 1 {
            s.read(0, &mut b);
        }
        assert!(room.event().read().is_err(), "signalled before the FIFO was empty");
        s.read(0, &mut b);
        assert_eq!(room.event().read().unwrap(), 1);
        // Polling the empty register again does not signal without a new wait().
        s.read(0, &mut b);
        assert!(room.event().read().is_err());
    }

    #[test]
    fn registers_and_fifo_round_trip() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut s = SerialPort::new(EventFdTrigger(evt.try_clone().unwrap()), Arc::new(InputRoom::new().unwrap()), Box::new(Sink::default()));
        s.write(3, &[0x83]); // LCR: DLAB on, 8 bits
        s.write(0, &[0x0c]); // divisor low
        s.write(3, &[0x03]);
        s.write(7, &[0x5a]); // scratch
        s.write(1, &[1]);
        s.enqueue_input(b"ab");
        let saved = s.save();
        assert_eq!(saved.in_buffer, b"ab");
        let _ = evt.read();
        let evt2 = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = SerialPort::new(EventFdTrigger(evt2.try_clone().unwrap()), Arc::new(InputRoom::new().unwrap()), Box::new(Sink::default()));
        t.restore(&saved, EventFdTrigger(evt2.try_clone().unwrap()), Box::new(Sink::default())).unwrap();
        assert_eq!(t.save(), saved);
        assert_eq!(evt2.read().unwrap(), 1, "received data due an interrupt raises it again");
        let mut b = [0u8];
        t.read(7, &mut b);
        assert_eq!(b[0], 0x5a);
        t.read(0, &mut b);
        assert_eq!(b[0], b'a');
        let mut full = saved;
        full.in_buffer = vec![0; 1000];
        assert!(t.restore(&full, EventFdTrigger(evt2), Box::new(Sink::default())).is_err());
    }
}
