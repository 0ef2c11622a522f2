//! Devices emulated by nvmm. They know nothing of KVM or the command line: the VMM places them on a
//! [`bus::Bus`], wires their event fds to ioeventfd/irqfd and drives them from an event loop.

pub mod bus;
