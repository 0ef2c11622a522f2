//! vCPUs: creation, boot-time configuration, and one thread each running `KVM_RUN`.

pub mod exit;
pub mod regs;
pub mod stats;

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use kvm_bindings::{kvm_msr_entry, CpuId, KVM_EXIT_INTERNAL_ERROR};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

pub use exit::{handle_exit, Action, IoBuses, VmExit};

use crate::boot::Entry;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("KVM_CREATE_VCPU {0}: {1}")]
    Create(u8, #[source] kvm_ioctls::Error),
    #[error("KVM_SET_CPUID2 on vCPU {0}: {1}")]
    SetCpuid(u8, #[source] kvm_ioctls::Error),
    #[error("vCPU {0}: {1}")]
    Regs(u8, #[source] regs::Error),
    #[error("cannot start vCPU thread {0}: {1}")]
    Spawn(u8, #[source] std::io::Error),
}

/// How the VM ends: the first vCPU or device to stop records why and wakes the main loop.
pub struct ExitSignal {
    event: EventFd,
    reason: Mutex<Option<VmExit>>,
}

impl ExitSignal {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { event: EventFd::new(libc::EFD_NONBLOCK)?, reason: Mutex::new(None) })
    }

    /// Records `why` unless an earlier reason is already recorded, and wakes the main loop.
    pub fn exit(&self, why: VmExit) {
        let mut reason = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if reason.is_none() {
            *reason = Some(why);
        }
        // A full counter still wakes the reader, so a failed write changes nothing.
        let _ = self.event.write(1);
    }

    pub fn event(&self) -> &EventFd {
        &self.event
    }

    pub fn reason(&self) -> Option<VmExit> {
        self.reason.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

pub struct Vcpu {
    pub id: u8,
    pub fd: VcpuFd,
}

impl Vcpu {
    pub fn new(vm: &VmFd, id: u8) -> Result<Self, Error> {
        let fd = vm.create_vcpu(u64::from(id)).map_err(|e| Error::Create(id, e))?;
        Ok(Self { id, fd })
    }

    /// State every vCPU needs: CPUID, MSRs, FPU and LINT wiring.
    pub fn configure(&self, cpuid: &CpuId, msrs: &[kvm_msr_entry]) -> Result<(), Error> {
        self.fd.set_cpuid2(cpuid).map_err(|e| Error::SetCpuid(self.id, e))?;
        let r = |e| Error::Regs(self.id, e);
        regs::setup_msrs(&self.fd, msrs).map_err(r)?;
        regs::setup_fpu(&self.fd).map_err(r)?;
        regs::setup_lint(&self.fd).map_err(r)
    }

    /// Registers and segments of the boot vCPU at the kernel entry. The others wait for INIT/SIPI.
    pub fn configure_boot(&self, entry: Entry, gdt: &[u64; 4]) -> Result<(), Error> {
        let r = |e| Error::Regs(self.id, e);
        regs::setup_regs(&self.fd, entry).map_err(r)?;
        regs::setup_sregs(&self.fd, entry, gdt).map_err(r)
    }

    /// Runs the vCPU on its own thread until the VM stops.
    pub fn spawn(self, io: Arc<IoBuses>, signal: Arc<ExitSignal>) -> Result<JoinHandle<()>, Error> {
        let id = self.id;
        std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                let why = run(self.fd, &io);
                log::debug!("vcpu{id} stopped: {why:?}");
                signal.exit(why);
            })
            .map_err(|e| Error::Spawn(id, e))
    }
}

/// The exit loop: run, handle, repeat.
pub fn run(mut fd: VcpuFd, io: &IoBuses) -> VmExit {
    loop {
        let action = match fd.run() {
            Ok(exit) => {
                if log::log_enabled!(log::Level::Trace) {
                    log::trace!("exit: {exit:?}");
                }
                handle_exit(exit, io)
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Action::Continue,
            Err(e) => Action::Stop(VmExit::Error(format!("KVM_RUN failed: {e}"))),
        };
        if let Action::Stop(why) = action {
            if why == VmExit::Reset && log::log_enabled!(log::Level::Debug) {
                log_shutdown_state(&fd);
            }
            return describe_internal_error(&mut fd).unwrap_or(why);
        }
    }
}

/// A shutdown is how Linux's `reboot=t` resets, and also what a guest crash looks like: where the
/// vCPU stood tells the two apart.
fn log_shutdown_state(fd: &VcpuFd) {
    let (Ok(r), Ok(s)) = (fd.get_regs(), fd.get_sregs()) else {
        return;
    };
    log::debug!(
        "shutdown: rip {:#x} rsp {:#x} rflags {:#x} cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} idt {:#x}/{:#x} cs {:#x}",
        r.rip, r.rsp, r.rflags, s.cr0, s.cr2, s.cr3, s.cr4, s.efer, s.idt.base, s.idt.limit, s.cs.selector
    );
}

/// KVM's internal errors carry a suberror code worth reporting (1 = emulation failure).
fn describe_internal_error(fd: &mut VcpuFd) -> Option<VmExit> {
    let run = fd.get_kvm_run();
    if run.exit_reason != KVM_EXIT_INTERNAL_ERROR {
        return None;
    }
    // SAFETY: `internal` is the active member of the exit union when exit_reason is INTERNAL_ERROR.
    let suberror = unsafe { run.__bindgen_anon_1.internal.suberror };
    let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
    Some(VmExit::Error(format!("KVM internal error (suberror {suberror}) at guest rip {rip:#x}")))
}
