//! The VM file descriptor: guest memory slots, the in-kernel interrupt controllers and PIT, and the
//! eventfd wiring (ioeventfd, irqfd) that keeps device traffic off the vCPU threads.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, kvm_pit_state2, kvm_userspace_memory_region, KVM_IRQCHIP_IOAPIC,
    KVM_CAP_MULTI_ADDRESS_SPACE, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_PIT_SPEAKER_DUMMY,
};
use serde::{Deserialize, Serialize};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::layout;
use crate::smram::{self, Smram};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM_CREATE_VM: {0}")]
    Create(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_TSS_ADDR: {0}")]
    SetTss(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_IDENTITY_MAP_ADDR: {0}")]
    SetIdentityMap(#[source] kvm_ioctls::Error),
    #[error("KVM_SET_USER_MEMORY_REGION (slot {0}): {1}")]
    SetMemory(u32, #[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_IRQCHIP: {0}")]
    CreateIrqchip(#[source] kvm_ioctls::Error),
    #[error("KVM_CREATE_PIT2: {0}")]
    CreatePit(#[source] kvm_ioctls::Error),
    #[error("KVM_IRQFD (GSI {0}): {1}")]
    Irqfd(u32, #[source] kvm_ioctls::Error),
    #[error("KVM_IOEVENTFD ({0:#x}): {1}")]
    Ioeventfd(u64, #[source] kvm_ioctls::Error),
    #[error("{0}: {1}")]
    State(&'static str, #[source] kvm_ioctls::Error),
    #[error(transparent)]
    Smram(#[from] smram::Error),
    #[error("the snapshot has an SMRAM save area and this host's KVM has no SMM")]
    NoSmm,
}

/// What KVM holds for the whole VM: the two PICs, the IOAPIC, the PIT, and kvmclock.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
    /// SMRAM's state save area, where KVM has SMM (absent from snapshots made before SMRAM).
    #[serde(default)]
    pub smram_save_area: Option<Vec<u8>>,
}

pub struct Vm {
    pub fd: VmFd,
    pub mem: GuestMemoryMmap,
    /// What vCPUs see in SMM, if this host's KVM has SMM (see `smram.rs`).
    smram: Option<Smram>,
}

impl Vm {
    /// Creates the VM, gives it `mem` (and SMRAM, where KVM has SMM), and creates the IRQ chip
    /// and PIT.
    pub fn create(kvm: &Kvm, mem: GuestMemoryMmap) -> Result<Self, Error> {
        let fd = kvm.create_vm().map_err(Error::Create)?;
        fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize).map_err(Error::SetTss)?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS).map_err(Error::SetIdentityMap)?;
        let ram: Vec<_> = mem
            .iter()
            .enumerate()
            .map(|(slot, region)| kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            })
            .collect();
        let smram = if has_smm(kvm) { Some(Smram::new()?) } else { None };
        let smm_slots = smram.as_ref().map(|s| s.slots(&mem)).unwrap_or_default();
        for r in ram.into_iter().chain(smm_slots) {
            // SAFETY: every slot maps a live mapping owned by `mem` or `smram`, which the returned
            // `Vm` keeps for as long as the VM fd (and so the slot) exists.
            unsafe { fd.set_user_memory_region(r) }.map_err(|e| Error::SetMemory(r.slot, e))?;
        }
        // The IRQ chip must exist before vCPUs are created, so their LAPICs are in-kernel too.
        fd.create_irq_chip().map_err(Error::CreateIrqchip)?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(Error::CreatePit)?;
        Ok(Self { fd, mem, smram })
    }

    /// Reads the interrupt controllers, the PIT and kvmclock of a VM whose vCPUs are paused.
    pub fn save_state(&self) -> Result<VmState, Error> {
        let chip = |chip_id, name| {
            let mut c = kvm_irqchip { chip_id, ..Default::default() };
            self.fd.get_irqchip(&mut c).map(|()| c).map_err(|e| Error::State(name, e))
        };
        Ok(VmState {
            pic_master: chip(KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP (PIC master)")?,
            pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP (PIC slave)")?,
            ioapic: chip(KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP (IOAPIC)")?,
            pit: self.fd.get_pit2().map_err(|e| Error::State("KVM_GET_PIT2", e))?,
            clock: self.fd.get_clock().map_err(|e| Error::State("KVM_GET_CLOCK", e))?,
            smram_save_area: self.smram.as_ref().map(Smram::save_area),
        })
    }

    /// Loads what [`Vm::save_state`] read, before any vCPU state goes in: the vCPUs' kvmclock
    /// MSRs then refer to a clock that already reads the saved time.
    pub fn restore_state(&self, state: &VmState) -> Result<(), Error> {
        self.fd.set_pit2(&state.pit).map_err(|e| Error::State("KVM_SET_PIT2", e))?;
        // The flags say how the clock was read (TSC-stable, with host time); KVM_SET_CLOCK takes
        // only KVM_CLOCK_REALTIME, which would move the clock on by the time spent in the file.
        // Without it the guest's clock goes on from where it was paused.
        let clock = kvm_clock_data { flags: 0, ..state.clock };
        self.fd.set_clock(&clock).map_err(|e| Error::State("KVM_SET_CLOCK", e))?;
        for (chip, name) in [
            (&state.pic_master, "KVM_SET_IRQCHIP (PIC master)"),
            (&state.pic_slave, "KVM_SET_IRQCHIP (PIC slave)"),
            (&state.ioapic, "KVM_SET_IRQCHIP (IOAPIC)"),
        ] {
            self.fd.set_irqchip(chip).map_err(|e| Error::State(name, e))?;
        }
        match (&self.smram, &state.smram_save_area) {
            (Some(smram), Some(area)) => smram.restore_save_area(area)?,
            (None, Some(_)) => return Err(Error::NoSmm),
            // A snapshot from a host without SMM, or from before SMRAM: its vCPUs were not in SMM.
            (_, None) => {}
        }
        Ok(())
    }

    /// Interrupts: a write to `evt` raises `gsi` (edge) inside KVM.
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), Error> {
        self.fd.register_irqfd(evt, gsi).map_err(|e| Error::Irqfd(gsi, e))
    }

    /// A guest write of `datamatch` to MMIO `addr` completes in KVM and signals `evt`.
    pub fn register_mmio_ioevent(&self, evt: &EventFd, addr: u64, datamatch: u32) -> Result<(), Error> {
        self.fd
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), datamatch)
            .map_err(|e| Error::Ioeventfd(addr, e))
    }
}

/// KVM runs vCPUs in SMM, with a second address space for it (not under SEV-ES, nor where it is
/// built without SMM).
fn has_smm(kvm: &Kvm) -> bool {
    kvm.check_extension(Cap::X86Smm) && kvm.check_extension_raw(KVM_CAP_MULTI_ADDRESS_SPACE.into()) >= 2
}
