//! QEMU's firmware configuration device (fw_cfg), the legacy port interface only, with the few
//! items kvm-unit-tests read (`lib/x86/fwcfg.c`): the CPU count and the RAM size. The guest writes
//! a 16-bit item selector to the control port and reads the item byte by byte from the data port.
//! No DMA interface and no file directory: the ID item says so.

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;

/// Control port (selector, 16-bit write); the data port follows it.
pub const FW_CFG_PORT: u64 = 0x510;
pub const PORT_COUNT: u64 = 2;
const SELECTOR: u64 = 0;
const DATA: u64 = 1;

/// Item selectors (QEMU's `include/standard-headers/linux/qemu_fw_cfg.h` numbers them).
pub const SIGNATURE: u16 = 0x00;
pub const ID: u16 = 0x01;
pub const RAM_SIZE: u16 = 0x03;
pub const NB_CPUS: u16 = 0x05;
pub const MAX_CPUS: u16 = 0x0f;
/// The ID item's value: the traditional port interface, and nothing else (no DMA).
const ID_TRADITIONAL: u32 = 1;

/// What a snapshot keeps of the device: the selected item and how far into it the guest has read
/// (the items themselves come from the machine: CPU count and RAM size). The default, the
/// signature selected and nothing read, is a fresh device's.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FwCfgState {
    pub selected: u16,
    pub offset: u64,
}

pub struct FwCfg {
    cpus: u16,
    ram_bytes: u64,
    /// The item the guest selected, and how far into it it has read.
    selected: u16,
    offset: usize,
}

impl FwCfg {
    pub fn new(cpus: u16, ram_bytes: u64) -> Self {
        Self { cpus, ram_bytes, selected: SIGNATURE, offset: 0 }
    }

    pub fn save(&self) -> FwCfgState {
        FwCfgState { selected: self.selected, offset: self.offset as u64 }
    }

    pub fn restore(&mut self, state: &FwCfgState) {
        self.selected = state.selected;
        // Past its end an item reads as zeroes however far in: a larger offset (only a state file
        // can hold one) reads the same as the end, and the end cannot overflow as reads go on.
        let len = self.item(state.selected).len();
        self.offset = usize::try_from(state.offset).map_or(len, |o| o.min(len));
    }

    /// An item's bytes; unknown items are empty, so they read as zeroes as QEMU's do.
    fn item(&self, selector: u16) -> Vec<u8> {
        match selector {
            SIGNATURE => b"QEMU".to_vec(),
            ID => ID_TRADITIONAL.to_le_bytes().to_vec(),
            RAM_SIZE => self.ram_bytes.to_le_bytes().to_vec(),
            NB_CPUS | MAX_CPUS => self.cpus.to_le_bytes().to_vec(),
            _ => Vec::new(),
        }
    }
}

impl BusDevice for FwCfg {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset != DATA {
            data.fill(0);
            return;
        }
        let item = self.item(self.selected);
        for b in data.iter_mut() {
            *b = item.get(self.offset).copied().unwrap_or(0);
            self.offset += 1;
        }
    }

    /// A write to the control port selects an item and rewinds to its first byte; data-port
    /// writes (the long-deprecated write channel) are ignored.
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == SELECTOR && data.len() >= 2 {
            self.selected = u16::from_le_bytes([data[0], data[1]]);
            self.offset = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_item(dev: &mut FwCfg, selector: u16, len: usize) -> Vec<u8> {
        dev.write(SELECTOR, &selector.to_le_bytes());
        (0..len)
            .map(|_| {
                let mut b = [0u8];
                dev.read(DATA, &mut b);
                b[0]
            })
            .collect()
    }

    #[test]
    fn the_items_kvm_unit_tests_read() {
        let mut dev = FwCfg::new(3, 5 << 30);
        assert_eq!(read_item(&mut dev, SIGNATURE, 4), b"QEMU");
        assert_eq!(read_item(&mut dev, NB_CPUS, 2), [3, 0]);
        assert_eq!(read_item(&mut dev, RAM_SIZE, 8), (5u64 << 30).to_le_bytes());
        // Reading past an item, or an unknown item (the max-RAM item 0x11), gives zeroes.
        assert_eq!(read_item(&mut dev, NB_CPUS, 4), [3, 0, 0, 0]);
        assert_eq!(read_item(&mut dev, 0x11, 8), [0; 8]);
        // Selecting again starts over.
        assert_eq!(read_item(&mut dev, ID, 4), [1, 0, 0, 0]);
        assert_eq!(read_item(&mut dev, ID, 1), [1]);
    }

    /// A restored device goes on reading the item the saved one had selected, from where it was.
    #[test]
    fn save_and_restore_keep_the_item_and_the_place_in_it() {
        let mut dev = FwCfg::new(2, 1 << 30);
        assert_eq!(read_item(&mut dev, SIGNATURE, 1), b"Q");
        let state = dev.save();
        assert_eq!(state, FwCfgState { selected: SIGNATURE, offset: 1 });
        let json = serde_json::to_string(&state).unwrap();
        let mut restored = FwCfg::new(2, 1 << 30);
        restored.restore(&serde_json::from_str(&json).unwrap());
        let mut rest = [0u8; 3];
        restored.read(DATA, &mut rest);
        assert_eq!(&rest, b"EMU");
        // A fresh device's state is the default one, which snapshots without fw_cfg restore.
        assert_eq!(FwCfg::new(2, 1 << 30).save(), FwCfgState::default());
    }

    #[test]
    fn an_offset_past_the_item_reads_zeroes_and_is_kept_at_its_end() {
        let mut dev = FwCfg::new(2, 1 << 30);
        dev.restore(&FwCfgState { selected: NB_CPUS, offset: u64::MAX });
        let mut b = [0xaa; 4];
        dev.read(DATA, &mut b);
        assert_eq!(b, [0; 4]);
        assert_eq!(dev.save(), FwCfgState { selected: NB_CPUS, offset: 2 + 4 });
    }
}
