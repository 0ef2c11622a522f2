//! The VM file descriptor: guest memory slots, the in-kernel interrupt controllers and PIT, and the
//! eventfd wiring (ioeventfd, irqfd) that keeps device traffic off the vCPU threads.

use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::memory::layout;

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
}

pub struct Vm {
    pub fd: VmFd,
    pub mem: GuestMemoryMmap,
}

impl Vm {
    /// Creates the VM, gives it `mem`, and creates the IRQ chip and PIT.
    pub fn create(kvm: &Kvm, mem: GuestMemoryMmap) -> Result<Self, Error> {
        let fd = kvm.create_vm().map_err(Error::Create)?;
        fd.set_tss_address(layout::KVM_TSS_ADDRESS as usize).map_err(Error::SetTss)?;
        fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS).map_err(Error::SetIdentityMap)?;
        for (slot, region) in mem.iter().enumerate() {
            let r = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which the returned `Vm` keeps for
            // as long as the VM fd (and so the slot) exists.
            unsafe { fd.set_user_memory_region(r) }.map_err(|e| Error::SetMemory(slot as u32, e))?;
        }
        // The IRQ chip must exist before vCPUs are created, so their LAPICs are in-kernel too.
        fd.create_irq_chip().map_err(Error::CreateIrqchip)?;
        let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
        fd.create_pit2(pit).map_err(Error::CreatePit)?;
        Ok(Self { fd, mem })
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
