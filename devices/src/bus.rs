//! Address-keyed dispatch of guest port I/O and MMIO accesses to devices.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device that answers guest reads and writes in an address range. `offset` is relative to the
/// start of the range the device was inserted at.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// Errors from building a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range is empty.
    #[error("bus range at {0:#x} has zero length")]
    ZeroLength(u64),
    /// The range overlaps one already on the bus.
    #[error("bus range {base:#x}+{len:#x} overlaps an existing device")]
    Overlap { base: u64, len: u64 },
}

struct Range {
    len: u64,
    /// The entry's index in [`Bus::names`], which profiles count accesses by.
    slot: usize,
    device: Arc<Mutex<dyn BusDevice>>,
}

/// One address space (port I/O or MMIO).
#[derive(Default)]
pub struct Bus {
    ranges: BTreeMap<u64, Range>,
    /// One name per entry, in insertion order.
    names: Vec<String>,
}

/// The name of an entry inserted without one.
pub const UNNAMED: &str = "device";

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` at `[base, base + len)`, named [`UNNAMED`].
    pub fn insert(
        &mut self,
        base: u64,
        len: u64,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        self.insert_named(base, len, UNNAMED, device)
    }

    /// Places `device` at `[base, base + len)` under `name` (what exit profiles call it).
    pub fn insert_named(
        &mut self,
        base: u64,
        len: u64,
        name: &str,
        device: Arc<Mutex<dyn BusDevice>>,
    ) -> Result<(), BusError> {
        if len == 0 {
            return Err(BusError::ZeroLength(base));
        }
        let end = base
            .checked_add(len)
            .ok_or(BusError::Overlap { base, len })?;
        let before = self.ranges.range(..end).next_back();
        if let Some((&b, r)) = before {
            if b + r.len > base {
                return Err(BusError::Overlap { base, len });
            }
        }
        let slot = self.names.len();
        self.names.push(name.to_string());
        self.ranges.insert(base, Range { len, slot, device });
        Ok(())
    }

    /// The entries' names, indexed by the slot [`Bus::read_slot`] and [`Bus::write_slot`] return.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    fn find(&self, addr: u64) -> Option<(u64, &Range)> {
        let (&base, range) = self.ranges.range(..=addr).next_back()?;
        (addr - base < range.len).then_some((addr - base, range))
    }

    /// Dispatches a read; returns false when no device covers `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        self.read_slot(addr, data).is_some()
    }

    /// Dispatches a write; returns false when no device covers `addr`.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        self.write_slot(addr, data).is_some()
    }

    /// Dispatches a read; returns the slot of the device that took it, `None` when none covers `addr`.
    pub fn read_slot(&self, addr: u64, data: &mut [u8]) -> Option<usize> {
        let (offset, range) = self.find(addr)?;
        lock(&range.device).read(offset, data);
        Some(range.slot)
    }

    /// Dispatches a write; returns the slot of the device that took it, `None` when none covers `addr`.
    pub fn write_slot(&self, addr: u64, data: &[u8]) -> Option<usize> {
        let (offset, range) = self.find(addr)?;
        lock(&range.device).write(offset, data);
        Some(range.slot)
    }
}

// A device whose lock was poisoned panicked on another thread while handling an access; its state is
// still the best we have, and the guest must not be able to turn one panic into a cascade.
fn lock(dev: &Arc<Mutex<dyn BusDevice>>) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Echo(u8);
    impl BusDevice for Echo {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(self.0.wrapping_add(offset as u8));
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn dispatch_by_range_with_relative_offset() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Echo(1))))
            .unwrap();
        let mut b = [0u8; 1];
        assert!(bus.read(0x105, &mut b));
        assert_eq!(b[0], 6);
        assert!(!bus.read(0x110, &mut b));
        assert!(!bus.read(0xff, &mut b));
        assert!(bus.write(0x100, &[9]));
        bus.read(0x100, &mut b);
        assert_eq!(b[0], 9);
    }

    #[test]
    fn accesses_name_the_slot_of_the_device_that_took_them() {
        let mut bus = Bus::new();
        bus.insert_named(0x200, 4, "b", Arc::new(Mutex::new(Echo(0)))).unwrap();
        bus.insert_named(0x100, 4, "a", Arc::new(Mutex::new(Echo(0)))).unwrap();
        assert_eq!(bus.names(), ["b", "a"]);
        let mut d = [0u8; 1];
        assert_eq!(bus.read_slot(0x101, &mut d), Some(1));
        assert_eq!(bus.write_slot(0x203, &[1]), Some(0));
        assert_eq!(bus.write_slot(0x204, &[1]), None);
        assert_eq!(bus.names().len(), 2, "a refused insert must not add a name");
        assert!(bus.insert_named(0x102, 1, "c", Arc::new(Mutex::new(Echo(0)))).is_err());
        assert_eq!(bus.names().len(), 2);
    }

    #[test]
    fn overlaps_are_refused() {
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, Arc::new(Mutex::new(Echo(0))))
            .unwrap();
        let e = bus.insert(0x10f, 1, Arc::new(Mutex::new(Echo(0))));
        assert_eq!(
            e,
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1
            })
        );
        assert!(bus
            .insert(0xf8, 0x9, Arc::new(Mutex::new(Echo(0))))
            .is_err());
        assert!(bus.insert(0x110, 1, Arc::new(Mutex::new(Echo(0)))).is_ok());
        assert!(bus.insert(0x200, 0, Arc::new(Mutex::new(Echo(0)))).is_err());
    }
}
