//! The virtio-net device: features, config space, offloads, and the RX/TX work it does once the
//! driver has activated it.

use std::ffi::c_uint;
use std::mem::{offset_of, size_of};
use std::sync::Arc;

use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    virtio_net_config, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::rx::{Delivery, RxBuffers, TapRead};
use super::tap::Tap;
use super::{tx, NetError, MAX_FRAME_LEN, QUEUE_SIZE, RX_QUEUE, TX_QUEUE};
use crate::virtio::{
    keep_going, mute, needs_interrupt, unmute, ActivateError, DeviceState, Interrupt, PersistError, QueueSnapshot, VirtioDevice,
    COMMON_FEATURES,
};

/// How the VMM describes a NIC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Host TAP device name; created if it does not exist.
    pub tap: String,
    /// MAC address offered to the guest (`VIRTIO_NET_F_MAC`); the guest picks a random one if `None`.
    pub mac: Option<[u8; 6]>,
}

/// The offloads the guest may negotiate. Host offloads (CSUM, HOST_TSO*) need nothing from us: the
/// TAP takes partial-checksum and GSO frames with their vnet header. Guest offloads are passed on
/// to the TAP with TUNSETOFFLOAD once acked.
const OFFLOAD_FEATURES: u64 = (1 << VIRTIO_NET_F_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_CSUM)
    | (1 << VIRTIO_NET_F_GUEST_TSO4)
    | (1 << VIRTIO_NET_F_GUEST_TSO6)
    | (1 << VIRTIO_NET_F_GUEST_UFO)
    | (1 << VIRTIO_NET_F_HOST_TSO4)
    | (1 << VIRTIO_NET_F_HOST_TSO6);

/// The `TUN_F_*` flags matching the guest's acked receive offloads: what the TAP may hand us.
pub fn tap_offload_flags(acked_features: u64) -> c_uint {
    let has = |bit: u32| acked_features & (1 << bit) != 0;
    // Every receive offload implies frames without a complete checksum.
    if !has(VIRTIO_NET_F_GUEST_CSUM) {
        return 0;
    }
    let mut flags = libc::TUN_F_CSUM;
    for (bit, flag) in [
        (VIRTIO_NET_F_GUEST_TSO4, libc::TUN_F_TSO4),
        (VIRTIO_NET_F_GUEST_TSO6, libc::TUN_F_TSO6),
        (VIRTIO_NET_F_GUEST_UFO, libc::TUN_F_UFO),
    ] {
        if has(bit) {
            flags |= flag;
        }
    }
    flags
}

/// State that exists only between DRIVER_OK and reset.
struct Active {
    mem: GuestMemoryMmap,
    rx: Queue,
    tx: Queue,
    mergeable: bool,
}

/// A virtio-net device with one RX and one TX queue, backed by a TAP.
pub struct Net {
    pub(super) tap: Tap,
    mac: Option<[u8; 6]>,
    avail_features: u64,
    config_space: Vec<u8>,
    pub(super) queue_events: Arc<[EventFd]>,
    interrupt: Arc<Interrupt>,
    active: Option<Active>,
    rx_buffers: RxBuffers,
    /// A frame read from the TAP, vnet header first, of `rx_pending` bytes when Some.
    rx_frame: Vec<u8>,
    /// Set while the guest has no room for the frame in `rx_frame`: the TAP is not read until the
    /// driver adds RX buffers (and notifies the RX queue).
    rx_pending: Option<usize>,
    tx_scratch: tx::Gathered,
    /// TX looked again once without finding the chains the driver announced (see `keep_going`).
    tx_retried: bool,
}

impl Net {
    pub fn new(config: NetConfig) -> Result<Self, NetError> {
        let tap = Tap::open(&config.tap)?;
        let mut avail_features = COMMON_FEATURES
            | OFFLOAD_FEATURES
            | (1 << VIRTIO_NET_F_MRG_RXBUF)
            | (1 << VIRTIO_NET_F_STATUS);
        let mut config_space = vec![0u8; size_of::<virtio_net_config>()];
        if let Some(mac) = config.mac {
            avail_features |= 1 << VIRTIO_NET_F_MAC;
            let at = offset_of!(virtio_net_config, mac);
            config_space[at..at + 6].copy_from_slice(&mac);
        }
        let at = offset_of!(virtio_net_config, status);
        config_space[at..at + 2].copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());

        let eventfd = || EventFd::new(EFD_NONBLOCK).map_err(NetError::EventFd);
        Ok(Self {
            tap,
            mac: config.mac,
            avail_features,
            config_space,
            queue_events: Arc::new([eventfd()?, eventfd()?]),
            interrupt: Arc::new(Interrupt::new().map_err(NetError::EventFd)?),
            active: None,
            rx_buffers: RxBuffers::default(),
            rx_frame: vec![0u8; MAX_FRAME_LEN],
            rx_pending: None,
            tx_scratch: tx::Gathered::default(),
            tx_retried: false,
        })
    }

    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    pub fn mac(&self) -> Option<[u8; 6]> {
        self.mac
    }

    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn signal_used_buffer(&self) {
        if let Err(e) = self.interrupt.signal_used_buffer() {
            crate::error_limited!("virtio-net: cannot raise the interrupt: {e}");
        }
    }

    /// Moves frames from the TAP into RX buffers until the TAP is empty (the edge-triggered TAP
    /// event then comes again with the next frame) or the guest is out of buffers (the RX queue
    /// notification then brings us back here). The driver is asked to notify new RX buffers only
    /// in the second case: otherwise the next TAP event finds them anyway.
    pub(super) fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let (mut notify, since) = (false, active.rx.next_used());
        let mut retried = false;
        loop {
            let from = active.rx.next_avail();
            notify |= self.rx_buffers.refill(&active.mem, &mut active.rx);
            let progress = active.rx.next_avail() != from;
            loop {
                // Straight into the guest's buffers when they have room for any frame; otherwise
                // through rx_frame, where a frame can wait for buffers.
                let tap = &self.tap;
                let (read, direct) = match self.rx_pending.take() {
                    Some(len) => (TapRead::Frame(len), false),
                    None => match self.rx_buffers.receive_direct(
                        &active.mem,
                        &mut active.rx,
                        active.mergeable,
                        |iov| tap.readv(iov),
                    ) {
                        Some(read) => (read, true),
                        None => (TapRead::from(tap.read(&mut self.rx_frame)), false),
                    },
                };
                let len = match read {
                    TapRead::Frame(_) if direct => {
                        notify = true;
                        continue;
                    }
                    TapRead::Frame(len) => len,
                    TapRead::Empty => break,
                    TapRead::Runt(len) => {
                        crate::warn_limited!("virtio-net: dropping a {len}-byte frame from the TAP");
                        continue;
                    }
                    TapRead::Failed(e) => {
                        crate::error_limited!("virtio-net: cannot read from TAP {}: {e}", tap.name());
                        break;
                    }
                };
                let frame = &mut self.rx_frame[..len];
                match self
                    .rx_buffers
                    .deliver(&active.mem, &mut active.rx, frame, active.mergeable)
                {
                    Delivery::Delivered => notify = true,
                    Delivery::Dropped => crate::warn_limited!(
                        "virtio-net: dropping a {len}-byte frame that no RX buffer can hold"
                    ),
                    Delivery::NoRoom => {
                        self.rx_pending = Some(len);
                        break;
                    }
                }
            }
            if self.rx_pending.is_none() {
                mute(&active.mem, &mut active.rx, "virtio-net RX");
                break;
            }
            // Out of buffers: have the driver say when it adds some, unless it already did.
            if !unmute(&active.mem, &mut active.rx, "virtio-net RX")
                || !keep_going(progress, &mut retried, "virtio-net RX")
            {
                break;
            }
        }
        if notify && needs_interrupt(&active.mem, &active.rx, since) {
            self.signal_used_buffer();
        }
    }

    /// Sends every frame the guest queued to the TAP. As long as there were frames, the driver's
    /// TX notifications stay off and the device looks again on the next turn of the event loop
    /// (by kicking its own TX eventfd): a busy sender then costs one pass per batch instead of an
    /// exit per frame, the way QEMU's TX bottom half works. An empty pass turns them back on.
    pub(super) fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let (mem, queue) = (&active.mem, &mut active.tx);
        mute(mem, queue, "virtio-net TX");
        let (since, from) = (queue.next_used(), queue.next_avail());
        let tap = &self.tap;
        let sent = tx::process_queue(mem, queue, &mut self.tx_scratch, |frame, _| {
            // Like a NIC without carrier, a TAP whose host side is down drops the frame (EIO).
            if let Err(e) = tap.writev(frame) {
                log::debug!("virtio-net: TAP {} dropped a frame: {e}", tap.name());
            }
        });
        let progress = queue.next_avail() != from;
        // Notifications stay off while there is progress; keep_going then clears tx_retried.
        let again = (progress || unmute(mem, queue, "virtio-net TX"))
            && keep_going(progress, &mut self.tx_retried, "virtio-net TX");
        if sent > 0 && needs_interrupt(mem, queue, since) {
            self.signal_used_buffer();
        }
        if again {
            if let Err(e) = self.queue_events[TX_QUEUE].write(1) {
                crate::error_limited!("virtio-net: cannot kick the TX queue: {e}");
            }
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_space(&self.config_space, offset, data);
    }

    fn queue_events(&self) -> &Arc<[EventFd]> {
        &self.queue_events
    }

    fn interrupt(&self) -> &Arc<Interrupt> {
        &self.interrupt
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        acked_features: u64,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let Ok([rx, tx]) = <[Queue; 2]>::try_from(queues) else {
            return Err(ActivateError::QueueCount { expected: 2, got });
        };
        self.tap.set_offload(tap_offload_flags(acked_features))?;
        self.active = Some(Active {
            mem,
            rx,
            tx,
            mergeable: acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
        });
        // Have the event loop look at both queues, and at frames that reached the TAP before now.
        for i in [RX_QUEUE, TX_QUEUE] {
            if let Err(e) = self.queue_events[i].write(1) {
                crate::error_limited!("virtio-net: cannot kick queue {i}: {e}");
            }
        }
        Ok(())
    }

    /// RX buffers taken from the ring but not filled are given back by rewinding `next_avail`
    /// over them: they are the last chains taken, in ring order, and the driver cannot reuse
    /// their avail-ring slots before they are used, so the restored device takes them again.
    /// (A malformed chain completed at once between two held ones would be taken twice; Linux
    /// never posts one.) A frame waiting for room travels as it is.
    fn save_state(&self) -> DeviceState {
        let queues = self.active.as_ref().map(|a| {
            let mut rx = QueueSnapshot::of(&a.rx);
            let held = u16::try_from(self.rx_buffers.len()).unwrap_or(u16::MAX);
            rx.next_avail = rx.next_avail.wrapping_sub(held);
            vec![rx, QueueSnapshot::of(&a.tx)]
        });
        let held_frame = self.rx_pending.map(|len| self.rx_frame[..len].to_vec());
        DeviceState { queues, held_frame }
    }

    fn load_held_frame(&mut self, frame: Vec<u8>) -> Result<(), PersistError> {
        if frame.len() > self.rx_frame.len() {
            return Err(PersistError::FrameTooLarge { device: VIRTIO_ID_NET, len: frame.len(), max: self.rx_frame.len() });
        }
        self.rx_frame[..frame.len()].copy_from_slice(&frame);
        self.rx_pending = Some(frame.len());
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_buffers.clear();
        self.rx_pending = None;
        self.tx_retried = false;
        // The next driver may not accept offloaded frames.
        if let Err(e) = self.tap.set_offload(0) {
            crate::error_limited!("virtio-net: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::in_new_netns;
    use virtio_bindings::virtio_net::VIRTIO_NET_F_GUEST_ECN;

    #[test]
    fn offload_translation() {
        let f = |bits: &[u32]| bits.iter().fold(0u64, |acc, b| acc | (1 << b));
        assert_eq!(tap_offload_flags(0), 0);
        // Segmentation offloads mean nothing without checksum offload.
        assert_eq!(tap_offload_flags(f(&[VIRTIO_NET_F_GUEST_TSO4])), 0);
        assert_eq!(
            tap_offload_flags(f(&[VIRTIO_NET_F_GUEST_CSUM])),
            libc::TUN_F_CSUM
        );
        assert_eq!(
            tap_offload_flags(f(&[
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
                VIRTIO_NET_F_GUEST_TSO6,
                VIRTIO_NET_F_GUEST_UFO,
                VIRTIO_NET_F_HOST_TSO4,
                VIRTIO_NET_F_GUEST_ECN,
            ])),
            libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6 | libc::TUN_F_UFO
        );
    }

    #[test]
    fn features_and_config_space() {
        let done = in_new_netns(|| {
            let mac = [0x52, 0x54, 0, 1, 2, 3];
            let net = Net::new(NetConfig {
                tap: "nvmmcfg0".into(),
                mac: Some(mac),
            })
            .unwrap();
            assert_ne!(net.avail_features() & (1 << VIRTIO_NET_F_MAC), 0);
            assert_ne!(net.avail_features() & (1 << VIRTIO_NET_F_MRG_RXBUF), 0);
            let mut config = [0u8; 8];
            net.read_config(0, &mut config);
            assert_eq!(config[..6], mac);
            assert_eq!(
                u16::from_le_bytes([config[6], config[7]]),
                VIRTIO_NET_S_LINK_UP as u16
            );

            let net = Net::new(NetConfig {
                tap: "nvmmcfg1".into(),
                mac: None,
            })
            .unwrap();
            assert_eq!(net.avail_features() & (1 << VIRTIO_NET_F_MAC), 0);
            assert_eq!(net.tap_name(), "nvmmcfg1");
        });
        if done.is_none() {
            crate::virtio::test_utils::skip("cannot create a network namespace here");
        }
    }

    #[test]
    fn tap_errors_name_the_tap() {
        let e = Net::new(NetConfig {
            tap: "0123456789abcdef".into(),
            mac: None,
        })
        .err()
        .unwrap();
        assert_eq!(
            e.to_string(),
            "TAP name '0123456789abcdef' is longer than 15 bytes"
        );
    }
}
