//! The virtio-mmio transport, version 2 only (virtio 1.2, section 4.2.2): a 4 KiB register window
//! that the VMM places on the MMIO bus, in front of one [`VirtioDevice`].
//!
//! The transport owns the register state (feature selects, queue addresses, the status handshake).
//! Queues are built, and checked against guest memory, only when the driver writes DRIVER_OK; they
//! are then handed to the device. Registers are 32 bits wide and little-endian; other access widths
//! are ignored, except in the device configuration space at [`CONFIG_SPACE`].

use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
    VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_mmio as regs;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::persist::{PersistError, QueueRegistersState, TransportState};
use super::{Interrupt, VirtioDevice};
use crate::bus::BusDevice;

/// Size of the register window (`virtio_mmio.device=4K@...`).
pub const MMIO_LEN: u64 = 0x1000;

// Register offsets, from the Linux uapi header via virtio-bindings.
pub(crate) const MAGIC_VALUE: u64 = regs::VIRTIO_MMIO_MAGIC_VALUE as u64;
pub(crate) const VERSION: u64 = regs::VIRTIO_MMIO_VERSION as u64;
pub(crate) const DEVICE_ID: u64 = regs::VIRTIO_MMIO_DEVICE_ID as u64;
pub(crate) const VENDOR_ID: u64 = regs::VIRTIO_MMIO_VENDOR_ID as u64;
pub(crate) const DEVICE_FEATURES: u64 = regs::VIRTIO_MMIO_DEVICE_FEATURES as u64;
pub(crate) const DEVICE_FEATURES_SEL: u64 = regs::VIRTIO_MMIO_DEVICE_FEATURES_SEL as u64;
pub(crate) const DRIVER_FEATURES: u64 = regs::VIRTIO_MMIO_DRIVER_FEATURES as u64;
pub(crate) const DRIVER_FEATURES_SEL: u64 = regs::VIRTIO_MMIO_DRIVER_FEATURES_SEL as u64;
pub(crate) const QUEUE_SEL: u64 = regs::VIRTIO_MMIO_QUEUE_SEL as u64;
pub(crate) const QUEUE_NUM_MAX: u64 = regs::VIRTIO_MMIO_QUEUE_NUM_MAX as u64;
pub(crate) const QUEUE_NUM: u64 = regs::VIRTIO_MMIO_QUEUE_NUM as u64;
pub(crate) const QUEUE_READY: u64 = regs::VIRTIO_MMIO_QUEUE_READY as u64;
/// QueueNotify: the VMM registers one ioeventfd per queue at `base + QUEUE_NOTIFY`, datamatch = index.
pub const QUEUE_NOTIFY: u64 = regs::VIRTIO_MMIO_QUEUE_NOTIFY as u64;
pub(crate) const INTERRUPT_STATUS: u64 = regs::VIRTIO_MMIO_INTERRUPT_STATUS as u64;
pub(crate) const INTERRUPT_ACK: u64 = regs::VIRTIO_MMIO_INTERRUPT_ACK as u64;
pub(crate) const STATUS: u64 = regs::VIRTIO_MMIO_STATUS as u64;
pub(crate) const QUEUE_DESC_LOW: u64 = regs::VIRTIO_MMIO_QUEUE_DESC_LOW as u64;
pub(crate) const QUEUE_DESC_HIGH: u64 = regs::VIRTIO_MMIO_QUEUE_DESC_HIGH as u64;
pub(crate) const QUEUE_AVAIL_LOW: u64 = regs::VIRTIO_MMIO_QUEUE_AVAIL_LOW as u64;
pub(crate) const QUEUE_AVAIL_HIGH: u64 = regs::VIRTIO_MMIO_QUEUE_AVAIL_HIGH as u64;
pub(crate) const QUEUE_USED_LOW: u64 = regs::VIRTIO_MMIO_QUEUE_USED_LOW as u64;
pub(crate) const QUEUE_USED_HIGH: u64 = regs::VIRTIO_MMIO_QUEUE_USED_HIGH as u64;
pub(crate) const SHM_SEL: u64 = regs::VIRTIO_MMIO_SHM_SEL as u64;
pub(crate) const SHM_LEN_LOW: u64 = regs::VIRTIO_MMIO_SHM_LEN_LOW as u64;
pub(crate) const SHM_LEN_HIGH: u64 = regs::VIRTIO_MMIO_SHM_LEN_HIGH as u64;
pub(crate) const SHM_BASE_LOW: u64 = regs::VIRTIO_MMIO_SHM_BASE_LOW as u64;
pub(crate) const SHM_BASE_HIGH: u64 = regs::VIRTIO_MMIO_SHM_BASE_HIGH as u64;
pub(crate) const CONFIG_GENERATION: u64 = regs::VIRTIO_MMIO_CONFIG_GENERATION as u64;
/// Start of the device-specific configuration space.
pub const CONFIG_SPACE: u64 = regs::VIRTIO_MMIO_CONFIG as u64;
/// The configuration space runs to the end of the window.
const CONFIG_SPACE_LEN: usize = (MMIO_LEN - CONFIG_SPACE) as usize;

/// "virt", little-endian.
const MAGIC: u32 = 0x7472_6976;
/// Modern (virtio 1.x) register layout; legacy (1) is not offered.
const MMIO_VERSION: u32 = 2;
/// "nvmm", little-endian. Drivers do not look at it.
const VENDOR: u32 = 0x6d6d_766e;
/// Reads of the shared-memory registers: "no such region".
const NO_SHM_REGION: u32 = u32::MAX;

// Device status values the driver may write, in handshake order (virtio 1.2, 3.1.1).
const S_ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const S_DRIVER: u32 = S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER;
const S_FEATURES_OK: u32 = S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
const S_DRIVER_OK: u32 = S_FEATURES_OK | VIRTIO_CONFIG_S_DRIVER_OK;

/// Why the queues were unusable at DRIVER_OK.
#[derive(Debug, thiserror::Error)]
enum QueueSetupError {
    #[error("queue {0} is not ready")]
    NotReady(usize),
    #[error("queue {index}: {err}")]
    Invalid {
        index: usize,
        err: virtio_queue::Error,
    },
    #[error("queue {0}: rings lie outside guest memory")]
    OutsideMemory(usize),
}

/// The registers of one queue, as the driver wrote them.
#[derive(Debug, Clone, Copy, Default)]
struct QueueRegisters {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueRegisters {
    fn new(max_size: u16) -> Self {
        Self {
            max_size,
            size: max_size,
            ..Self::default()
        }
    }

    /// Builds a virtio-queue `Queue`, letting it check size and alignment, then memory bounds.
    fn build(
        &self,
        index: usize,
        mem: &GuestMemoryMmap,
        event_idx: bool,
    ) -> Result<Queue, QueueSetupError> {
        if !self.ready {
            return Err(QueueSetupError::NotReady(index));
        }
        let invalid = |err| QueueSetupError::Invalid { index, err };
        let mut queue = Queue::new(self.max_size).map_err(invalid)?;
        queue.try_set_size(self.size).map_err(invalid)?;
        queue
            .try_set_desc_table_address(GuestAddress(self.desc))
            .map_err(invalid)?;
        queue
            .try_set_avail_ring_address(GuestAddress(self.avail))
            .map_err(invalid)?;
        queue
            .try_set_used_ring_address(GuestAddress(self.used))
            .map_err(invalid)?;
        queue.set_event_idx(event_idx);
        queue.set_ready(true);
        if !queue.is_valid(mem) {
            return Err(QueueSetupError::OutsideMemory(index));
        }
        Ok(queue)
    }
}

/// Replaces the low or high half of a 64-bit register.
fn set_half(reg: &mut u64, high: bool, value: u32) {
    *reg = if high {
        (*reg & 0xffff_ffff) | (u64::from(value) << 32)
    } else {
        (*reg & !0xffff_ffff) | u64::from(value)
    };
}

/// The virtio-mmio register window of one device.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    // Cached from the device: fixed for its lifetime, and reading them must not take its lock.
    device_type: u32,
    avail_features: u64,
    queue_events: Arc<[EventFd]>,
    interrupt: Arc<Interrupt>,
    /// The whole configuration window as the device reads it (see `VirtioDevice::read_config`).
    config: Vec<u8>,
    /// The driver wrote 0 to the status while the device's event loop held its lock (in the
    /// middle of a request): the reset completes at a later access, and until then the status
    /// reads as before, which tells the driver to wait (virtio 1.2, 4.2.3.1: it reads the status
    /// back until it is 0).
    reset_pending: bool,

    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<QueueRegisters>,
}

impl MmioTransport {
    /// Wraps `device`. `mem` is handed to the device when the driver activates it.
    pub fn new(mem: GuestMemoryMmap, device: Arc<Mutex<dyn VirtioDevice>>) -> Self {
        let (device_type, avail_features, queues, queue_events, interrupt, config) = {
            let dev = device.lock().unwrap_or_else(PoisonError::into_inner);
            let mut config = vec![0u8; CONFIG_SPACE_LEN];
            dev.read_config(0, &mut config);
            (
                dev.device_type(),
                dev.avail_features(),
                dev.queue_max_sizes()
                    .iter()
                    .map(|&max| QueueRegisters::new(max))
                    .collect(),
                dev.queue_events().clone(),
                dev.interrupt().clone(),
                config,
            )
        };
        Self {
            device,
            mem,
            device_type,
            avail_features,
            queue_events,
            interrupt,
            config,
            reset_pending: false,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            queues,
        }
    }

    /// One eventfd per queue: register each as an ioeventfd at `base + QUEUE_NOTIFY`, datamatch = index.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    /// The eventfd to register as an irqfd for this device's IRQ line.
    pub fn interrupt_event(&self) -> &EventFd {
        self.interrupt.event()
    }

    /// The virtio device ID of the device behind this transport.
    pub fn device_type(&self) -> u32 {
        self.device_type
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    // A device whose lock was poisoned panicked on the event loop; its state is still the best we have.
    fn device(&self) -> MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn selected_queue(&self) -> Option<&QueueRegisters> {
        self.queues.get(self.queue_sel as usize)
    }

    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            MAGIC_VALUE => MAGIC,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device_type,
            VENDOR_ID => VENDOR,
            DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            INTERRUPT_STATUS => self.interrupt.status(),
            STATUS => self.status,
            SHM_LEN_LOW | SHM_LEN_HIGH | SHM_BASE_LOW | SHM_BASE_HIGH => NO_SHM_REGION,
            CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => {
                crate::warn_limited!("virtio-mmio: read of unknown or write-only register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            DEVICE_FEATURES_SEL => self.device_features_sel = value,
            DRIVER_FEATURES => self.write_driver_features(value),
            DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            QUEUE_SEL => self.queue_sel = value,
            QUEUE_NUM | QUEUE_READY | QUEUE_DESC_LOW | QUEUE_DESC_HIGH | QUEUE_AVAIL_LOW
            | QUEUE_AVAIL_HIGH | QUEUE_USED_LOW | QUEUE_USED_HIGH => {
                self.write_queue_register(offset, value)
            }
            QUEUE_NOTIFY => self.notify(value),
            INTERRUPT_ACK => {
                if let Err(e) = self.interrupt.ack(value) {
                    crate::error_limited!("virtio-mmio: cannot raise the interrupt again: {e}");
                }
            }
            STATUS => self.write_status(value),
            SHM_SEL => {}
            _ => crate::warn_limited!("virtio-mmio: write of unknown or read-only register {offset:#x}"),
        }
    }

    fn write_driver_features(&mut self, value: u32) {
        // Features may change only between DRIVER and FEATURES_OK.
        if self.status != S_DRIVER {
            crate::warn_limited!(
                "virtio-mmio: driver features written in status {:#x}",
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => set_half(&mut self.acked_features, false, value),
            1 => set_half(&mut self.acked_features, true, value),
            sel => crate::warn_limited!("virtio-mmio: driver features page {sel} does not exist"),
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        // Queues are set up after FEATURES_OK and before DRIVER_OK, and only while not ready.
        if self.status != S_FEATURES_OK {
            crate::warn_limited!(
                "virtio-mmio: queue register {offset:#x} written in status {:#x}",
                self.status
            );
            return;
        }
        let sel = self.queue_sel;
        let Some(queue) = self.queues.get_mut(sel as usize) else {
            crate::warn_limited!("virtio-mmio: queue {sel} does not exist");
            return;
        };
        if offset == QUEUE_READY {
            queue.ready = value == 1;
            return;
        }
        if queue.ready {
            crate::warn_limited!("virtio-mmio: queue {sel} register {offset:#x} written while ready");
            return;
        }
        match offset {
            // Sizes above 0xffff saturate so that the check at DRIVER_OK refuses them.
            QUEUE_NUM => queue.size = u16::try_from(value).unwrap_or(u16::MAX),
            QUEUE_DESC_LOW => set_half(&mut queue.desc, false, value),
            QUEUE_DESC_HIGH => set_half(&mut queue.desc, true, value),
            QUEUE_AVAIL_LOW => set_half(&mut queue.avail, false, value),
            QUEUE_AVAIL_HIGH => set_half(&mut queue.avail, true, value),
            QUEUE_USED_LOW => set_half(&mut queue.used, false, value),
            QUEUE_USED_HIGH => set_half(&mut queue.used, true, value),
            _ => {}
        }
    }

    /// A notification that did not go through an ioeventfd: forward it to the queue's eventfd.
    fn notify(&self, index: u32) {
        match self.queue_events.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    crate::error_limited!("virtio-mmio: cannot kick queue {index}: {e}");
                }
            }
            None => crate::warn_limited!("virtio-mmio: notification for queue {index}, which does not exist"),
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // As for the other registers (see `write`), a pending reset completes first.
        self.finish_reset(true);
        self.status = match (self.status, value) {
            // The driver gave up; keep the rest as it is until it resets the device.
            (old, new) if new & VIRTIO_CONFIG_S_FAILED != 0 => old | VIRTIO_CONFIG_S_FAILED,
            (old, new) if old == new => old,
            (0, S_ACKNOWLEDGE) => S_ACKNOWLEDGE,
            (S_ACKNOWLEDGE, S_DRIVER) => S_DRIVER,
            (S_DRIVER, S_FEATURES_OK) => {
                if self.features_acceptable() {
                    S_FEATURES_OK
                } else {
                    // The driver reads status back, sees no FEATURES_OK, and gives up.
                    S_DRIVER
                }
            }
            (S_FEATURES_OK, S_DRIVER_OK) => self.activate(),
            (old, new) => {
                crate::warn_limited!("virtio-mmio: invalid status transition {old:#x} -> {new:#x}");
                old
            }
        };
    }

    fn features_acceptable(&self) -> bool {
        let unknown = self.acked_features & !self.avail_features;
        if unknown != 0 {
            crate::warn_limited!(
                "virtio-mmio: device {}: driver acked features {unknown:#x} that were not offered",
                self.device_type
            );
            return false;
        }
        if self.acked_features & (1 << VIRTIO_F_VERSION_1) == 0 {
            crate::warn_limited!(
                "virtio-mmio: device {}: legacy driver (VERSION_1 not acked)",
                self.device_type
            );
            return false;
        }
        true
    }

    /// DRIVER_OK: build the queues and start the device; returns the new status.
    fn activate(&mut self) -> u32 {
        let event_idx = self.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let queues: Result<Vec<Queue>, _> = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| q.build(i, &self.mem, event_idx))
            .collect();
        let result = match queues {
            Ok(queues) => {
                let mem = self.mem.clone();
                let acked = self.acked_features;
                self.device()
                    .activate(mem, queues, acked)
                    .map_err(|e| e.to_string())
            }
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => S_DRIVER_OK,
            Err(e) => {
                crate::error_limited!("virtio-mmio: device {} cannot start: {e}", self.device_type);
                // The device stays stopped; tell the driver (virtio 1.2, 2.1.2).
                if let Err(e) = self.interrupt.signal_config_change() {
                    crate::error_limited!("virtio-mmio: cannot raise the config interrupt: {e}");
                }
                S_DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET
            }
        }
    }

    /// The transport's registers and the device's own state, for a snapshot. Call it only while
    /// the device's loop is parked and the vCPUs are paused.
    pub fn save(&mut self) -> TransportState {
        // A reset the guest asked for while the device was busy finishes first, so the state
        // saved is the one the guest sees; the device's loop is parked, so its lock is free.
        self.finish_reset(true);
        TransportState {
            device_type: self.device_type,
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            queues: self
                .queues
                .iter()
                .map(|q| QueueRegistersState { max_size: q.max_size, size: q.size, ready: q.ready, desc: q.desc, avail: q.avail, used: q.used })
                .collect(),
            interrupt_status: self.interrupt.status(),
            config_generation: self.interrupt.config_generation(),
            device: self.device().save_state(),
        }
    }

    /// Loads a saved state into a freshly built transport and device of the same kind. A device
    /// that was running is activated with its saved queues (indexes included), so it carries on
    /// where it stopped; its activation kicks its queues once, which covers a notification that
    /// reached the old process but not its device.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), PersistError> {
        let device = self.device_type;
        if state.device_type != device {
            return Err(PersistError::DeviceType { saved: state.device_type, actual: device });
        }
        if state.queues.len() != self.queues.len() {
            return Err(PersistError::QueueCount { device, saved: state.queues.len(), actual: self.queues.len() });
        }
        for (q, s) in self.queues.iter_mut().zip(&state.queues) {
            *q = QueueRegisters { max_size: q.max_size, size: s.size, ready: s.ready, desc: s.desc, avail: s.avail, used: s.used };
        }
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.queue_sel = state.queue_sel;
        if let Some(saved) = &state.device.queues {
            if saved.len() != self.queues.len() {
                return Err(PersistError::QueueCount { device, saved: saved.len(), actual: self.queues.len() });
            }
            let mut queues = Vec::with_capacity(saved.len());
            for (index, s) in saved.iter().enumerate() {
                let queue = s.to_queue().map_err(|err| PersistError::Queue { device, index, err })?;
                if !queue.is_valid(&self.mem) {
                    return Err(PersistError::OutsideMemory { device, index });
                }
                queues.push(queue);
            }
            let mem = self.mem.clone();
            let mut dev = self.device();
            dev.activate(mem, queues, state.acked_features).map_err(|err| PersistError::Activate { device, err })?;
            if let Some(frame) = &state.device.held_frame {
                dev.load_held_frame(frame.clone())?;
            }
        }
        self.interrupt
            .restore(state.interrupt_status, state.config_generation)
            .map_err(|err| PersistError::Interrupt { device, err })
    }

    /// Status 0. The vCPU does not wait for the request the device may be in the middle of: if
    /// its lock is taken, the reset completes at a later access (see `reset_pending`).
    fn reset(&mut self) {
        self.reset_pending = true;
        self.finish_reset(false);
    }

    /// Resets the device, then the registers, if a reset is pending; with `wait`, waits for the
    /// device's lock, otherwise only if it is free. True once no reset is pending.
    fn finish_reset(&mut self, wait: bool) -> bool {
        if !self.reset_pending {
            return true;
        }
        if wait {
            self.device().reset();
        } else {
            match self.device.try_lock() {
                Ok(mut device) => device.reset(),
                // A device that panicked on its event loop: its state is still the best we have.
                Err(TryLockError::Poisoned(p)) => p.into_inner().reset(),
                Err(TryLockError::WouldBlock) => return false,
            }
        }
        self.reset_pending = false;
        // After the device, so that a request completed just before cannot leave an interrupt
        // raised on the reset device.
        self.interrupt.reset();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueRegisters::new(q.max_size);
        }
        true
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // A driver waiting for a reset reads the status until it is 0.
        if offset == STATUS {
            self.finish_reset(false);
        }
        if offset >= CONFIG_SPACE {
            super::read_config_space(&self.config, offset - CONFIG_SPACE, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) => *word = self.read_register(offset).to_le_bytes(),
            Err(_) => {
                crate::warn_limited!(
                    "virtio-mmio: {}-byte read of register {offset:#x}",
                    data.len()
                );
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // A driver that goes on without reading the status back (Linux's virtio-mmio does not)
        // must find the reset done: this write waits for it, the reset write itself did not.
        if offset != STATUS {
            self.finish_reset(true);
        }
        if offset >= CONFIG_SPACE {
            crate::warn_limited!(
                "virtio device {}: ignoring a {}-byte config write at {:#x}",
                self.device_type,
                data.len(),
                offset - CONFIG_SPACE
            );
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) => self.write_register(offset, u32::from_le_bytes(word)),
            Err(_) => crate::warn_limited!(
                "virtio-mmio: {}-byte write of register {offset:#x}",
                data.len()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::{fake_transport, guest_memory, FakeDevice, MmioDriver, QueueLayout};
    use crate::virtio::INTERRUPT_USED_BUFFER;

    const OFFERED: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << 3) | (1 << 40);

    fn transport() -> (MmioTransport, Arc<Mutex<FakeDevice>>) {
        fake_transport(OFFERED)
    }

    #[test]
    fn identification_registers() {
        let (mut t, _) = transport();
        let mut d = MmioDriver(&mut t);
        assert_eq!(d.read(MAGIC_VALUE), 0x7472_6976);
        assert_eq!(d.read(VERSION), 2);
        assert_eq!(d.read(DEVICE_ID), FakeDevice::TYPE);
        assert_eq!(d.read(VENDOR_ID), VENDOR);
        assert_eq!(d.read(SHM_LEN_LOW), u32::MAX);
    }

    #[test]
    fn feature_select_pages() {
        let (mut t, _) = transport();
        let mut d = MmioDriver(&mut t);
        d.write(DEVICE_FEATURES_SEL, 0);
        assert_eq!(d.read(DEVICE_FEATURES), OFFERED as u32);
        d.write(DEVICE_FEATURES_SEL, 1);
        assert_eq!(d.read(DEVICE_FEATURES), (OFFERED >> 32) as u32);
        d.write(DEVICE_FEATURES_SEL, 2);
        assert_eq!(d.read(DEVICE_FEATURES), 0);
    }

    #[test]
    fn odd_widths_are_ignored_and_config_is_forwarded() {
        let (mut t, _) = transport();
        let mut b = [0xffu8; 2];
        t.read(MAGIC_VALUE, &mut b);
        assert_eq!(b, [0, 0]);
        t.write(STATUS, &[1]);
        assert_eq!(t.status(), 0);
        let mut c = [0u8; 2];
        t.read(CONFIG_SPACE + 1, &mut c);
        assert_eq!(c, [1, 2]); // FakeDevice config is 0, 1, 2, ...
    }

    #[test]
    fn full_handshake_activates_device_with_acked_features() {
        let (mut t, dev) = transport();
        let mem = guest_memory();
        let layouts = [QueueLayout::at(0x1_0000, 16), QueueLayout::at(0x2_0000, 8)];
        let mut d = MmioDriver(&mut t);
        assert!(d.negotiate(OFFERED));
        for (i, l) in layouts.iter().enumerate() {
            d.setup_queue(i as u32, l);
        }
        d.write(QUEUE_SEL, 0);
        assert_eq!(d.read(QUEUE_NUM_MAX), 16);
        assert_eq!(d.read(QUEUE_READY), 1);
        d.write(QUEUE_SEL, 5);
        assert_eq!(d.read(QUEUE_NUM_MAX), 0);
        d.driver_ok();
        assert_eq!(d.read(STATUS), S_DRIVER_OK);
        let dev = dev.lock().unwrap();
        let active = dev.active.as_ref().expect("device activated");
        assert_eq!(active.acked_features, OFFERED);
        assert_eq!(active.queues.len(), 2);
        assert_eq!(active.queues[1].size(), 8);
        assert_eq!(active.queues[0].desc_table(), 0x1_0000);
        assert!(active.queues[0].is_valid(&mem));
    }

    #[test]
    fn status_transitions_must_follow_the_handshake_order() {
        let (mut t, _) = transport();
        let mut d = MmioDriver(&mut t);
        d.write(STATUS, S_DRIVER); // skips ACKNOWLEDGE
        assert_eq!(d.read(STATUS), 0);
        d.write(STATUS, S_ACKNOWLEDGE);
        d.write(STATUS, S_FEATURES_OK); // skips DRIVER
        assert_eq!(d.read(STATUS), S_ACKNOWLEDGE);
        d.write(STATUS, S_DRIVER);
        d.write(STATUS, S_DRIVER); // rewriting is harmless
        assert_eq!(d.read(STATUS), S_DRIVER);
        d.write(STATUS, S_ACKNOWLEDGE); // clearing bits is not a transition
        assert_eq!(d.read(STATUS), S_DRIVER);
        d.write(STATUS, S_DRIVER | VIRTIO_CONFIG_S_FAILED);
        assert_eq!(d.read(STATUS), S_DRIVER | VIRTIO_CONFIG_S_FAILED);
        d.write(STATUS, S_FEATURES_OK | VIRTIO_CONFIG_S_FAILED);
        assert_eq!(d.read(STATUS), S_DRIVER | VIRTIO_CONFIG_S_FAILED);
    }

    #[test]
    fn features_ok_refused_for_unoffered_or_legacy_features() {
        let (mut t, _) = transport();
        let mut d = MmioDriver(&mut t);
        assert!(!d.negotiate(OFFERED | (1 << 5)));
        assert_eq!(d.read(STATUS), S_DRIVER);

        let (mut t, _) = transport();
        let mut d = MmioDriver(&mut t);
        assert!(!d.negotiate(OFFERED & !(1 << VIRTIO_F_VERSION_1)));

        let (mut t, _) = transport();
        let mut d = MmioDriver(&mut t);
        assert!(d.negotiate(1 << VIRTIO_F_VERSION_1));
        // Too late to change features now.
        d.write(DRIVER_FEATURES_SEL, 0);
        d.write(DRIVER_FEATURES, 0xffff_ffff);
        assert_eq!(d.0.acked_features, 1 << VIRTIO_F_VERSION_1);
    }

    #[test]
    fn queue_registers_are_locked_outside_setup_and_while_ready() {
        let (mut t, _) = transport();
        let mut d = MmioDriver(&mut t);
        d.write(QUEUE_SEL, 0);
        d.write(QUEUE_NUM, 4); // before FEATURES_OK
        assert_eq!(d.0.queues[0].size, 16);
        assert!(d.negotiate(OFFERED));
        d.write(QUEUE_NUM, 4);
        d.write(QUEUE_READY, 1);
        d.write(QUEUE_NUM, 8); // while ready
        d.write(QUEUE_DESC_LOW, 0x1234_5000);
        assert_eq!(d.0.queues[0].size, 4);
        assert_eq!(d.0.queues[0].desc, 0);
        d.write(QUEUE_READY, 0);
        d.write(QUEUE_DESC_LOW, 0x1234_5000);
        d.write(QUEUE_DESC_HIGH, 0x1);
        assert_eq!(d.0.queues[0].desc, 0x1_1234_5000);
    }

    #[test]
    fn bad_queue_on_driver_ok_sets_needs_reset() {
        for bad in [
            QueueLayout::at(0x1_0000, 16).with_desc(0x1_0008), // misaligned
            QueueLayout::at(0x1_0000, 16).with_desc(0x40_0000_0000), // outside memory
            QueueLayout::at(0x1_0000, 12),                     // not a power of two
            QueueLayout::at(0x1_0000, 32),                     // above the maximum
        ] {
            let (mut t, dev) = transport();
            let mut d = MmioDriver(&mut t);
            assert!(d.negotiate(OFFERED));
            d.setup_queue(0, &bad);
            d.setup_queue(1, &QueueLayout::at(0x2_0000, 8));
            d.driver_ok();
            assert_eq!(
                d.read(STATUS),
                S_DRIVER_OK | VIRTIO_CONFIG_S_NEEDS_RESET,
                "{bad:?}"
            );
            assert!(dev.lock().unwrap().active.is_none());
            assert_ne!(
                d.read(INTERRUPT_STATUS) & crate::virtio::INTERRUPT_CONFIG_CHANGE,
                0
            );
        }
    }

    #[test]
    fn queue_not_ready_on_driver_ok_sets_needs_reset() {
        let (mut t, _) = transport();
        let mut d = MmioDriver(&mut t);
        assert!(d.negotiate(OFFERED));
        d.setup_queue(0, &QueueLayout::at(0x1_0000, 16));
        d.driver_ok();
        assert_ne!(d.read(STATUS) & VIRTIO_CONFIG_S_NEEDS_RESET, 0);
    }

    #[test]
    fn reset_clears_state_and_resets_device() {
        let (mut t, dev) = transport();
        let mut d = MmioDriver(&mut t);
        assert!(d.negotiate(OFFERED));
        d.setup_queue(0, &QueueLayout::at(0x1_0000, 16));
        d.setup_queue(1, &QueueLayout::at(0x2_0000, 8));
        d.driver_ok();
        dev.lock().unwrap().interrupt.signal_used_buffer().unwrap();
        assert_eq!(d.read(INTERRUPT_STATUS), INTERRUPT_USED_BUFFER);
        d.write(STATUS, 0);
        assert_eq!(d.read(STATUS), 0);
        assert_eq!(d.read(INTERRUPT_STATUS), 0);
        assert_eq!(d.0.acked_features, 0);
        d.write(QUEUE_SEL, 0);
        assert_eq!(d.read(QUEUE_READY), 0);
        assert_eq!(dev.lock().unwrap().resets, 1);
        assert!(dev.lock().unwrap().active.is_none());
        // And the handshake works again.
        assert!(d.negotiate(OFFERED));
    }

    /// With the device busy (its lock held, as by its event loop in a request), a reset does not
    /// wait: the status reads as before until the device is free and has been reset. A driver
    /// that writes on without reading the status back waits for the reset at that write.
    #[test]
    fn a_reset_of_a_busy_device_completes_later() {
        let (mut t, dev) = transport();
        let mut d = MmioDriver(&mut t);
        assert!(d.negotiate(OFFERED));
        let busy = dev.lock().unwrap();
        d.write(STATUS, 0);
        assert_eq!(d.read(STATUS), S_FEATURES_OK, "reset before the device was free");
        drop(busy);
        assert_eq!(d.read(STATUS), 0);
        assert_eq!(dev.lock().unwrap().resets, 1);

        assert!(d.negotiate(OFFERED));
        let holder = {
            let dev = dev.clone();
            let (tx, rx) = std::sync::mpsc::channel();
            let h = std::thread::spawn(move || {
                let _busy = dev.lock().unwrap();
                tx.send(()).unwrap();
                std::thread::sleep(std::time::Duration::from_millis(200));
            });
            rx.recv().unwrap();
            h
        };
        d.write(STATUS, 0);
        assert!(dev.try_lock().is_err(), "the device should still be busy");
        // No read-back: this write waits for the device and finds the reset done.
        d.write(STATUS, S_ACKNOWLEDGE);
        assert_eq!(dev.lock().unwrap().resets, 2);
        assert_eq!(d.read(STATUS), S_ACKNOWLEDGE);
        holder.join().unwrap();
    }

    #[test]
    fn interrupt_ack_clears_bits() {
        let (mut t, dev) = transport();
        let mut d = MmioDriver(&mut t);
        dev.lock().unwrap().interrupt.signal_used_buffer().unwrap();
        d.write(INTERRUPT_ACK, INTERRUPT_USED_BUFFER);
        assert_eq!(d.read(INTERRUPT_STATUS), 0);
    }

    #[test]
    fn queue_notify_write_kicks_the_queue_eventfd() {
        let (mut t, _) = transport();
        let mut d = MmioDriver(&mut t);
        d.write(QUEUE_NOTIFY, 1);
        d.write(QUEUE_NOTIFY, 7); // no such queue: ignored
        assert_eq!(d.0.queue_events()[1].read().unwrap(), 1);
        assert!(d.0.queue_events()[0].read().is_err()); // EAGAIN: nothing pending
    }
}

#[cfg(test)]
mod persist_tests {
    use super::*;
    use crate::virtio::test_utils::{fake_transport, FakeDevice, MmioDriver, QueueLayout};
    use crate::virtio::{DeviceState, INTERRUPT_USED_BUFFER};

    const OFFERED: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX);

    fn transport() -> (MmioTransport, Arc<Mutex<FakeDevice>>) {
        fake_transport(OFFERED)
    }

    /// A running device saved with moved indexes and a pending interrupt comes back, in a new
    /// transport and device, with the same registers, the same queue indexes, and its IRQ raised.
    #[test]
    fn a_running_device_round_trips() {
        let (mut t, dev) = transport();
        let mut d = MmioDriver(&mut t);
        assert!(d.negotiate(OFFERED));
        d.setup_queue(0, &QueueLayout::at(0x1_0000, 16));
        d.setup_queue(1, &QueueLayout::at(0x2_0000, 8));
        d.driver_ok();
        {
            let mut dev = dev.lock().unwrap();
            let q = &mut dev.active.as_mut().unwrap().queues[0];
            q.set_next_avail(5);
            q.set_next_used(3);
        }
        t.interrupt.signal_used_buffer().unwrap();
        t.interrupt.signal_config_change().unwrap();
        let _ = t.interrupt_event().read();
        let saved = t.save();
        assert_eq!(saved.status, S_DRIVER_OK);
        let queues = saved.device.queues.as_ref().unwrap();
        assert_eq!((queues[0].next_avail, queues[0].next_used, queues[0].event_idx), (5, 3, true));

        // Through serde, as a snapshot carries it.
        let saved: TransportState = serde_json::from_str(&serde_json::to_string(&saved).unwrap()).unwrap();
        let (mut t2, dev2) = transport();
        t2.restore(&saved).unwrap();
        assert_eq!(t2.save(), saved);
        let mut d2 = MmioDriver(&mut t2);
        assert_eq!(d2.read(STATUS), S_DRIVER_OK);
        assert_eq!(d2.read(INTERRUPT_STATUS), INTERRUPT_USED_BUFFER | crate::virtio::INTERRUPT_CONFIG_CHANGE);
        assert_eq!(d2.read(CONFIG_GENERATION), 1);
        assert_eq!(t2.interrupt_event().read().unwrap(), 1, "the pending interrupt is raised again");
        let dev2 = dev2.lock().unwrap();
        let active = dev2.active.as_ref().expect("activated by the restore");
        assert_eq!(active.acked_features, OFFERED);
        assert_eq!((active.queues[0].next_avail(), active.queues[0].next_used()), (5, 3));
        assert_eq!(active.queues[1].size(), 8);
    }

    #[test]
    fn a_device_never_started_stays_stopped_and_mismatches_are_refused() {
        let (mut t, _) = transport();
        let saved = t.save();
        assert_eq!(saved.device, DeviceState::default());
        let (mut t2, dev2) = transport();
        t2.restore(&saved).unwrap();
        assert!(dev2.lock().unwrap().active.is_none());

        let mut other = saved.clone();
        other.device_type = 1;
        assert!(matches!(t2.restore(&other), Err(PersistError::DeviceType { .. })));
        let mut other = saved.clone();
        other.queues.pop();
        assert!(matches!(t2.restore(&other), Err(PersistError::QueueCount { .. })));
        let mut other = saved;
        other.device.queues = Some(vec![
            crate::virtio::QueueSnapshot { max_size: 16, size: 16, ready: true, desc_table: 1 << 40, ..Default::default() },
            crate::virtio::QueueSnapshot { max_size: 8, size: 8, ready: true, ..Default::default() },
        ]);
        assert!(matches!(t2.restore(&other), Err(PersistError::OutsideMemory { index: 0, .. })));
    }
}
