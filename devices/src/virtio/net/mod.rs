//! virtio-net backed by a host TAP device that carries the virtio-net header (`IFF_VNET_HDR`).
//!
//! The guest's `virtio_net_hdr_v1` and the TAP's vnet header have the same layout (12 bytes,
//! little-endian), so frames pass through unchanged in both directions; only `num_buffers` is
//! filled in on receive.
//!
//! - `tap`: opening the TAP and its ioctls.
//! - `tx`: guest TX chains into frames.
//! - `rx`: frames into the guest's RX buffers (mergeable or not).
//! - `device`: the [`Net`] device: features, config space, activation, offloads.
//! - `event_handler`: queues and TAP readiness on the event-manager thread.

mod device;
mod event_handler;
pub mod rx;
pub mod tap;
pub mod tx;

use std::io;
use std::mem::size_of;

use virtio_bindings::virtio_net::virtio_net_hdr_v1;

pub use device::{tap_offload_flags, Net, NetConfig};
pub use tap::{Tap, TapError};

/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;
/// Entries in each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Length of `virtio_net_hdr_v1`, which starts every frame in both directions.
pub const VNET_HDR_LEN: usize = size_of::<virtio_net_hdr_v1>();
/// Ethernet header length: the shortest frame a TAP accepts.
pub const ETH_HLEN: usize = 14;
/// Largest frame either way, vnet header included: a 64 KiB GSO packet with Ethernet and VLAN
/// headers. Bounds every frame buffer.
pub const MAX_FRAME_LEN: usize = VNET_HDR_LEN + ETH_HLEN + 4 + 65535;

/// Errors from creating a network device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("invalid MAC address '{0}': expected six hex bytes such as 52:54:00:12:34:56")]
    InvalidMac(String),
    #[error("MAC address '{0}' is a multicast address")]
    MulticastMac(String),
    #[error("cannot create an eventfd for the network device: {0}")]
    EventFd(io::Error),
}

/// Parses `aa:bb:cc:dd:ee:ff` (or with `-`). Refuses multicast addresses, which a NIC cannot own.
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let invalid = || NetError::InvalidMac(s.to_owned());
    let mut mac = [0u8; 6];
    let mut parts = s.split([':', '-']);
    for byte in &mut mac {
        let part = parts.next().ok_or_else(invalid)?;
        if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(invalid());
        }
        *byte = u8::from_str_radix(part, 16).map_err(|_| invalid())?;
    }
    if parts.next().is_some() {
        return Err(invalid());
    }
    if mac[0] & 1 != 0 {
        return Err(NetError::MulticastMac(s.to_owned()));
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:12:34:5f").unwrap(),
            [0x52, 0x54, 0, 0x12, 0x34, 0x5f]
        );
        assert_eq!(
            parse_mac("02-AA-bb-00-00-01").unwrap(),
            [2, 0xaa, 0xbb, 0, 0, 1]
        );
        for bad in [
            "",
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "52:54:0:12:34:56",
            "zz:54:00:12:34:56",
            "+1:54:00:12:34:56",
        ] {
            assert!(
                matches!(parse_mac(bad), Err(NetError::InvalidMac(_))),
                "{bad}"
            );
        }
        assert_eq!(
            parse_mac("01:00:5e:00:00:01").unwrap_err().to_string(),
            "MAC address '01:00:5e:00:00:01' is a multicast address"
        );
    }

    #[test]
    fn header_length_is_that_of_virtio_1() {
        assert_eq!(VNET_HDR_LEN, 12);
    }
}
