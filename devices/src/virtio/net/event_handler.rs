//! Runs virtio-net on the event-manager thread: the RX and TX queue eventfds and the TAP fd.
//!
//! All three are registered once, in `init()`. Queue eventfds are level-triggered and drained on
//! every event. The TAP is edge-triggered: `process_rx` reads it until it is empty, or stops with
//! the frame kept when the guest has no RX buffers; the RX queue notification that comes with new
//! buffers resumes reading. So the TAP never spins the loop while the guest is out of buffers, and
//! no frame waits without an event to come for it. Before activation, every event is a no-op.

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::{Net, RX_QUEUE, TX_QUEUE};
use crate::virtio::drain_event;

const RX_QUEUE_EVENT: u32 = RX_QUEUE as u32;
const TX_QUEUE_EVENT: u32 = TX_QUEUE as u32;
const TAP_EVENT: u32 = 2;

impl MutEventSubscriber for Net {
    fn init(&mut self, ops: &mut EventOps) {
        let sources = [
            Events::with_data(&self.queue_events[RX_QUEUE], RX_QUEUE_EVENT, EventSet::IN),
            Events::with_data(&self.queue_events[TX_QUEUE], TX_QUEUE_EVENT, EventSet::IN),
            Events::with_data(
                &self.tap,
                TAP_EVENT,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
        ];
        for events in sources {
            if let Err(e) = ops.add(events) {
                crate::error_limited!(
                    "virtio-net: cannot watch event source {}: {e}",
                    events.data()
                );
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            RX_QUEUE_EVENT => {
                drain_event(&self.queue_events[RX_QUEUE]);
                self.process_rx();
            }
            TX_QUEUE_EVENT => {
                drain_event(&self.queue_events[TX_QUEUE]);
                self.process_tx();
            }
            TAP_EVENT => self.process_rx(),
            other => crate::warn_limited!("virtio-net: event for unknown source {other}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::{c_short, c_ulong, CString};
    use std::io;
    use std::mem::{size_of, zeroed};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::sync::{Arc, Mutex};

    use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
    use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF,
    };
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
    use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};

    use super::*;
    use crate::virtio::mmio::{INTERRUPT_STATUS, QUEUE_NOTIFY};
    use crate::virtio::test_utils::{
        add_chain, guest_memory, in_new_netns, r, used_entry, w, MmioDriver, QueueLayout,
    };
    use crate::virtio::{MmioTransport, NetConfig, VirtioDevice, INTERRUPT_USED_BUFFER};

    type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

    const TAP: &str = "nvmme2e0";
    /// IEEE 802 "local experimental" EtherType: no host protocol answers it.
    const ETH_P_TEST: u16 = 0x88b5;
    const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0, 0xab, 0xcd, 0xef];
    const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

    /// A raw packet socket on the TAP's host side, for frames of type ETH_P_TEST only.
    struct PacketSocket(OwnedFd);

    impl PacketSocket {
        /// Brings `ifname` up and binds to it.
        fn bind(ifname: &str) -> Self {
            let proto = ETH_P_TEST.to_be();
            // SAFETY: plain syscall without pointers.
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
            assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
            // SAFETY: `fd` was just created and is owned by nothing else.
            let sock = Self(unsafe { OwnedFd::from_raw_fd(fd) });

            // SAFETY: ifreq is a plain C struct, valid when zeroed.
            let mut ifr: libc::ifreq = unsafe { zeroed() };
            for (d, &s) in ifr.ifr_name.iter_mut().zip(ifname.as_bytes()) {
                *d = s as libc::c_char;
            }
            // SAFETY: SIOCGIFFLAGS fills the ifreq, which outlives the call.
            let ret =
                unsafe { ioctl_with_mut_ref(&sock.0, libc::SIOCGIFFLAGS as c_ulong, &mut ifr) };
            assert_eq!(ret, 0, "SIOCGIFFLAGS: {}", io::Error::last_os_error());
            // SAFETY: SIOCGIFFLAGS set the flags member of the union.
            unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as c_short };
            // SAFETY: SIOCSIFFLAGS reads the ifreq, which outlives the call.
            let ret = unsafe { ioctl_with_ref(&sock.0, libc::SIOCSIFFLAGS as c_ulong, &ifr) };
            assert_eq!(ret, 0, "SIOCSIFFLAGS: {}", io::Error::last_os_error());

            let name = CString::new(ifname).unwrap();
            // SAFETY: sockaddr_ll is a plain C struct, valid when zeroed.
            let mut addr: libc::sockaddr_ll = unsafe { zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = proto;
            // SAFETY: `name` is NUL-terminated and outlives the call.
            addr.sll_ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) } as i32;
            // SAFETY: `addr` is a valid sockaddr_ll of the length given.
            let ret = unsafe {
                libc::bind(
                    sock.0.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            assert_eq!(ret, 0, "bind: {}", io::Error::last_os_error());

            let timeout = libc::timeval {
                tv_sec: 5,
                tv_usec: 0,
            };
            // SAFETY: SO_RCVTIMEO reads a timeval of the length given.
            let ret = unsafe {
                libc::setsockopt(
                    sock.0.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&timeout as *const libc::timeval).cast(),
                    size_of::<libc::timeval>() as u32,
                )
            };
            assert_eq!(ret, 0, "SO_RCVTIMEO: {}", io::Error::last_os_error());
            sock
        }

        fn send(&self, frame: &[u8]) {
            // SAFETY: the buffer is valid for its length.
            let n =
                unsafe { libc::send(self.0.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            assert_eq!(
                n,
                frame.len() as isize,
                "send: {}",
                io::Error::last_os_error()
            );
        }

        fn recv(&self) -> Vec<u8> {
            let mut buf = vec![0u8; 2048];
            // SAFETY: the buffer is valid for its length.
            let n =
                unsafe { libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(n >= 0, "recv: {}", io::Error::last_os_error());
            buf.truncate(n as usize);
            buf
        }
    }

    fn eth_frame(dst: [u8; 6], src: [u8; 6], payload: &[u8]) -> Vec<u8> {
        let mut f = dst.to_vec();
        f.extend(src);
        f.extend(ETH_P_TEST.to_be_bytes());
        f.extend(payload);
        f
    }

    const RX_BUFFERS: u64 = 0x10_0000;
    const RX_BUFFER_LEN: u32 = 2048;

    /// Looks through the RX used ring for `frame`, delivered whole in one buffer.
    fn received(
        mem: &GuestMemoryMmap,
        rxq: &MockSplitQueue<'_, GuestMemoryMmap>,
        frame: &[u8],
    ) -> bool {
        (0..rxq.used().idx().load()).any(|i| {
            let (head, len) = used_entry(rxq, i);
            let mut got = vec![0u8; len as usize];
            mem.read_slice(
                &mut got,
                GuestAddress(RX_BUFFERS + u64::from(head) * 0x1000),
            )
            .unwrap();
            // num_buffers (the last two header bytes) is 1; the frame follows the header.
            got.len() == 12 + frame.len() && got[10..12] == [1, 0] && got[12..] == *frame
        })
    }

    /// The guest and a packet socket on the host side of a real TAP exchange one frame each way,
    /// through the MMIO transport and the event manager. Everything stays in a private namespace.
    #[test]
    fn frames_flow_between_a_real_tap_and_the_guest() {
        let done = in_new_netns(|| {
            // Keep IPv6 from sending frames of its own on the new link (they would be harmless).
            let _ = std::fs::write("/proc/sys/net/ipv6/conf/default/disable_ipv6", "1");
            let net = Arc::new(Mutex::new(
                Net::new(NetConfig {
                    tap: TAP.into(),
                    mac: Some(GUEST_MAC),
                })
                .unwrap(),
            ));
            let mem = guest_memory();
            let mut transport = MmioTransport::new(mem.clone(), net.clone());
            let mut em = EventManager::<Subscriber>::new().unwrap();
            em.add_subscriber(net.clone());
            let sock = PacketSocket::bind(TAP);

            let rxq = MockSplitQueue::create(&mem, GuestAddress(0), 256);
            let txq = MockSplitQueue::create(&mem, GuestAddress(0x1_0000), 256);
            let mut d = MmioDriver(&mut transport);
            let features = [
                VIRTIO_F_VERSION_1,
                VIRTIO_NET_F_MRG_RXBUF,
                VIRTIO_NET_F_MAC,
                VIRTIO_NET_F_GUEST_CSUM,
                VIRTIO_NET_F_GUEST_TSO4,
            ]
            .iter()
            .fold(0u64, |acc, b| acc | (1 << b));
            assert_eq!(net.lock().unwrap().avail_features() & features, features);
            assert!(d.negotiate(features));
            d.setup_queue(RX_QUEUE as u32, &QueueLayout::of(&rxq, 256));
            d.setup_queue(TX_QUEUE as u32, &QueueLayout::of(&txq, 256));
            d.driver_ok();
            assert!(net.lock().unwrap().is_activated());

            // Host to guest. The frame reaches the TAP before the guest has RX buffers: it must
            // wait, not be lost.
            let to_guest = eth_frame(GUEST_MAC, HOST_MAC, b"to the guest");
            sock.send(&to_guest);
            for _ in 0..3 {
                em.run_with_timeout(50).unwrap();
            }
            assert_eq!(rxq.used().idx().load(), 0);
            for i in 0..16u16 {
                add_chain(
                    &rxq,
                    i,
                    &[w(RX_BUFFERS + u64::from(i) * 0x1000, RX_BUFFER_LEN)],
                );
            }
            d.write(QUEUE_NOTIFY, RX_QUEUE as u32);
            let mut tries = 0;
            while !received(&mem, &rxq, &to_guest) {
                tries += 1;
                assert!(tries < 50, "frame not delivered to the guest");
                em.run_with_timeout(100).unwrap();
            }
            assert_ne!(d.read(INTERRUPT_STATUS) & INTERRUPT_USED_BUFFER, 0);

            // Guest to host: header and frame in two descriptors.
            let to_host = eth_frame(HOST_MAC, GUEST_MAC, b"to the host");
            mem.write_slice(&[0u8; 12], GuestAddress(0x20_0000))
                .unwrap();
            mem.write_slice(&to_host, GuestAddress(0x20_1000)).unwrap();
            add_chain(
                &txq,
                0,
                &[r(0x20_0000, 12), r(0x20_1000, to_host.len() as u32)],
            );
            d.write(QUEUE_NOTIFY, TX_QUEUE as u32);
            let mut tries = 0;
            while txq.used().idx().load() == 0 {
                tries += 1;
                assert!(tries < 50, "TX chain not completed");
                em.run_with_timeout(100).unwrap();
            }
            assert_eq!(used_entry(&txq, 0), (0, 0));
            assert_eq!(sock.recv(), to_host);
        });
        if done.is_none() {
            crate::virtio::test_utils::skip("cannot create a network namespace here");
        }
    }
}
