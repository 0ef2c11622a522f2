//! System-management RAM: what a vCPU sees in place of guest RAM while it is in SMM.
//!
//! A guest can raise an SMI itself, with an IPI whose delivery mode is SMI (kvm-unit-tests' svm
//! tests do, to check that an intercepted SMI leaves the guest). KVM then writes the vCPU's state
//! at SMBASE + 0xfe00 and enters SMM at SMBASE + 0x8000, reading memory through the slots of
//! address space 1. On a PC the firmware has put an SMI handler there, in RAM the chipset hides
//! from everything but SMM; QEMU gives SeaBIOS's. nvmm has no firmware, and with no slots in
//! address space 1 the VM dies at the first SMI (KVM_RUN fails with EIO; QEMU with `smm=off`
//! aborts on an assertion).
//!
//! So address space 1 is guest RAM again, except for the 64 KiB at the SMBASE every vCPU starts
//! with (0x30000), which are nvmm's own: a handler that is one RSM, and room for the state save
//! area. An SMI returns at once, as under firmware with nothing to do. Guest RAM at those
//! addresses is neither seen nor touched in SMM, and SMRAM is not seen outside it. Nothing
//! relocates SMBASE: only an SMI handler could, and this one does not.

use kvm_bindings::kvm_userspace_memory_region;
use vm_memory::mmap::MmapRegion;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// SMBASE after reset (Intel SDM 3C 32.11, AMD APM 2 10.2.3).
pub const SMBASE: u64 = 0x3_0000;
/// SMRAM from SMBASE: the handler's 32 KiB and the 32 KiB above it that end in the save area.
pub const SIZE: usize = 0x1_0000;
/// Where a vCPU starts in SMM: CS base SMBASE, IP 0x8000.
const HANDLER_OFFSET: usize = 0x8000;
/// Where the vCPU's state is saved on entry and read back by RSM (512 bytes to the end).
const SAVE_AREA_OFFSET: usize = 0xfe00;
/// The handler: RSM (0f aa), in the 16-bit mode SMM starts in.
const HANDLER: [u8; 2] = [0x0f, 0xaa];
/// KVM takes the address space in the high 16 bits of a slot number.
const ADDRESS_SPACE_SMM: u32 = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot map {SIZE} bytes of SMRAM: {0}")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
    #[error("an SMRAM save area of {0} bytes, not {1}")]
    SaveAreaSize(usize, usize),
}

pub struct Smram {
    region: MmapRegion,
}

impl Smram {
    /// A fresh SMRAM holding the handler.
    pub fn new() -> Result<Self, Error> {
        let region = MmapRegion::new(SIZE).map_err(Error::Map)?;
        let smram = Self { region };
        smram.bytes()[HANDLER_OFFSET..HANDLER_OFFSET + HANDLER.len()].copy_from_slice(&HANDLER);
        Ok(smram)
    }

    #[allow(clippy::mut_from_ref)]
    fn bytes(&self) -> &mut [u8] {
        // SAFETY: the mapping is SIZE bytes, private to this object, and lives as long as it.
        // The guest writes only the save area, and only inside KVM_RUN, which snapshots and
        // restores never overlap: they run on paused or not yet started vCPUs.
        unsafe { std::slice::from_raw_parts_mut(self.region.as_ptr(), SIZE) }
    }

    /// The state save area, for a snapshot: a vCPU paused inside SMM returns through it.
    pub fn save_area(&self) -> Vec<u8> {
        self.bytes()[SAVE_AREA_OFFSET..].to_vec()
    }

    /// Puts back what [`Smram::save_area`] read.
    pub fn restore_save_area(&self, area: &[u8]) -> Result<(), Error> {
        let dst = &mut self.bytes()[SAVE_AREA_OFFSET..];
        if area.len() != dst.len() {
            return Err(Error::SaveAreaSize(area.len(), dst.len()));
        }
        dst.copy_from_slice(area);
        Ok(())
    }

    /// Address space 1's slots: every RAM region of `mem` with SMRAM cut out of it, and SMRAM.
    pub fn slots(&self, mem: &GuestMemoryMmap) -> Vec<kvm_userspace_memory_region> {
        let ram: Vec<_> = mem
            .iter()
            .map(|r| (r.start_addr().0, r.len(), r.as_ptr() as u64))
            .collect();
        smm_slots(&ram, self.region.as_ptr() as u64)
    }
}

/// Address space 1 for RAM regions `(guest address, length, host address)`: each region minus
/// [SMBASE, SMBASE + SIZE), in up to two pieces that alias the same host memory, then SMRAM.
fn smm_slots(ram: &[(u64, u64, u64)], smram_host: u64) -> Vec<kvm_userspace_memory_region> {
    let (lo, hi) = (SMBASE, SMBASE + SIZE as u64);
    let mut pieces = Vec::new();
    for &(start, len, host) in ram {
        let end = start + len;
        for (a, b) in [(start, end.min(lo)), (start.max(hi), end)] {
            if a < b {
                pieces.push((a, b - a, host + (a - start)));
            }
        }
    }
    pieces.push((lo, SIZE as u64, smram_host));
    pieces
        .into_iter()
        .enumerate()
        .map(
            |(i, (guest_phys_addr, memory_size, userspace_addr))| kvm_userspace_memory_region {
                slot: ADDRESS_SPACE_SMM | i as u32,
                guest_phys_addr,
                memory_size,
                userspace_addr,
                flags: 0,
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges(slots: &[kvm_userspace_memory_region]) -> Vec<(u32, u64, u64, u64)> {
        slots
            .iter()
            .map(|s| (s.slot, s.guest_phys_addr, s.memory_size, s.userspace_addr))
            .collect()
    }

    #[test]
    fn smram_is_cut_out_of_low_ram_and_the_rest_aliases_it() {
        let ram = [
            (0, 0xc000_0000, 0x7000_0000_0000),
            (1 << 32, 1 << 30, 0x7100_0000_0000),
        ];
        let slots = smm_slots(&ram, 0x7f00_0000_0000);
        let a1 = ADDRESS_SPACE_SMM;
        assert_eq!(
            ranges(&slots),
            [
                (a1, 0, 0x3_0000, 0x7000_0000_0000),
                (a1 | 1, 0x4_0000, 0xc000_0000 - 0x4_0000, 0x7000_0004_0000),
                (a1 | 2, 1 << 32, 1 << 30, 0x7100_0000_0000),
                (a1 | 3, 0x3_0000, 0x1_0000, 0x7f00_0000_0000),
            ]
        );
    }

    #[test]
    fn a_region_that_misses_smram_is_kept_whole() {
        let slots = smm_slots(&[(0x10_0000, 0x10_0000, 0x1000_0000)], 0x2000_0000);
        assert_eq!(
            ranges(&slots),
            [
                (ADDRESS_SPACE_SMM, 0x10_0000, 0x10_0000, 0x1000_0000),
                (ADDRESS_SPACE_SMM | 1, SMBASE, 0x1_0000, 0x2000_0000)
            ]
        );
    }

    #[test]
    fn the_handler_is_rsm_at_smbase_plus_0x8000() {
        let smram = Smram::new().unwrap();
        assert_eq!(&smram.bytes()[0x8000..0x8002], &[0x0f, 0xaa]);
        assert!(smram.bytes()[..0x8000].iter().all(|&b| b == 0));
    }

    #[test]
    fn the_save_area_round_trips_and_a_wrong_size_is_refused() {
        let smram = Smram::new().unwrap();
        smram.bytes()[SAVE_AREA_OFFSET..].fill(0x5a);
        let saved = smram.save_area();
        assert_eq!(saved.len(), 512);
        let other = Smram::new().unwrap();
        other.restore_save_area(&saved).unwrap();
        assert_eq!(other.save_area(), saved);
        assert!(matches!(
            other.restore_save_area(&saved[1..]),
            Err(Error::SaveAreaSize(511, 512))
        ));
    }
}
