//! What a virtio device and its transport save in a snapshot, as plain serde structs, and how they
//! load it back (Firecracker's `persist.rs` modules are the model). The VMM decides when: only
//! while the device loop is parked at a request boundary, so no request is half done. The VMM
//! builds the device exactly as for a fresh boot, then hands it the saved state.
//!
//! A queue is saved as its registers plus the two indexes the device owns (`next_avail`,
//! `next_used`) and whether event indexes were negotiated; the rings themselves, including the
//! `used_event`/`avail_event` words that event indexes use, live in guest memory, which the
//! snapshot carries anyway.

use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueState};

/// One queue, as `virtio_queue::QueueState` has it (which has no serde of its own).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
}

impl QueueSnapshot {
    pub fn of(queue: &Queue) -> Self {
        let s = queue.state();
        Self {
            max_size: s.max_size,
            size: s.size,
            ready: s.ready,
            desc_table: s.desc_table,
            avail_ring: s.avail_ring,
            used_ring: s.used_ring,
            next_avail: s.next_avail,
            next_used: s.next_used,
            event_idx: s.event_idx_enabled,
        }
    }

    /// The queue again; virtio-queue checks size and alignment (the caller checks memory bounds).
    pub fn to_queue(self) -> Result<Queue, virtio_queue::Error> {
        Queue::try_from(QueueState {
            max_size: self.max_size,
            next_avail: self.next_avail,
            next_used: self.next_used,
            event_idx_enabled: self.event_idx,
            size: self.size,
            ready: self.ready,
            desc_table: self.desc_table,
            avail_ring: self.avail_ring,
            used_ring: self.used_ring,
        })
    }
}

/// What a device keeps beyond its transport's registers: its queues while it runs, and for
/// virtio-net the frame it read from the TAP and holds until the guest has room for it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    /// `Some` between DRIVER_OK and a reset.
    pub queues: Option<Vec<QueueSnapshot>>,
    pub held_frame: Option<Vec<u8>>,
}

/// One queue's registers as the driver wrote them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueRegistersState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

/// The virtio-mmio transport: status handshake, feature selects, queue registers, the interrupt
/// status and config generation, and the device's own state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub queues: Vec<QueueRegistersState>,
    pub interrupt_status: u32,
    pub config_generation: u32,
    pub device: DeviceState,
}

/// Why saved state does not fit the device it is loaded into.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("saved virtio device type {saved} is loaded into a device of type {actual}")]
    DeviceType { saved: u32, actual: u32 },
    #[error("virtio device {device}: saved {saved} queues, the device has {actual}")]
    QueueCount { device: u32, saved: usize, actual: usize },
    #[error("virtio device {device}: saved queue {index}: {err}")]
    Queue { device: u32, index: usize, err: virtio_queue::Error },
    #[error("virtio device {device}: saved queue {index} lies outside guest memory")]
    OutsideMemory { device: u32, index: usize },
    #[error("virtio device {device} cannot start again: {err}")]
    Activate { device: u32, err: super::ActivateError },
    #[error("virtio device {device}: cannot raise the interrupt again: {err}")]
    Interrupt { device: u32, err: std::io::Error },
    #[error("virtio device {device}: held frame of {len} bytes is larger than {max}")]
    FrameTooLarge { device: u32, len: usize, max: usize },
}
