//! vCPUs: creation, boot-time configuration, and one thread each running `KVM_RUN`, driven by the
//! VMM through a [`VcpuHandle`] (`handle.rs`) as a small state machine (`runner.rs`).

pub mod exit;
mod handle;
pub mod persist;
pub mod regs;
mod runner;
pub mod stats;

use std::sync::atomic::AtomicU64;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{kvm_msr_entry, CpuId};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

pub use exit::{handle_exit, Action, IoBuses, VmExit};
pub use handle::{ExitSource, SaveReply, VcpuHandle, VcpuMessage, VcpuReport};
use runner::Runner;
use stats::ExitCounter;

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
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    #[error("cannot duplicate the fd of vCPU {0}: {1}")]
    DupFd(u8, #[source] std::io::Error),
    #[error("cannot map kvm_run of vCPU {0} for its kick: {1}")]
    KickMap(u8, #[source] kvm_ioctls::Error),
    #[error("cannot signal vCPU {0}: {1}")]
    Kick(u8, #[source] vmm_sys_util::errno::Error),
    #[error("vCPU {0} did not answer within {1:?}")]
    NoAnswer(u8, Duration),
    #[error("the thread of vCPU {0} has ended")]
    Gone(u8),
    #[error(transparent)]
    State(#[from] persist::Error),
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

    /// Starts the vCPU's thread, running or paused, and returns the VMM's handle on it.
    pub fn start(self, vm: &VmFd, io: Arc<IoBuses>, exit: Arc<ExitSignal>, paused: bool) -> Result<VcpuHandle, Error> {
        let id = self.id;
        handle::install_kick_handler()?;
        let kick = handle::kick_fd(vm, &self.fd, id)?;
        // Opened now: once the thread is in KVM_RUN, the ioctl would wait for it to leave.
        let kvm_exits = ExitCounter::open(&self.fd);
        let own_exits = Arc::new(AtomicU64::new(0));
        let (messages, inbox) = mpsc::channel();
        let (outbox, reports) = mpsc::channel();
        let runner = Runner { id, fd: self.fd, io, messages: inbox, reports: outbox, exit, exits: own_exits.clone(), start_paused: paused };
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Vcpu, &format!("vcpu{id}"));
                runner.run()
            })
            .map_err(|e| Error::Spawn(id, e))?;
        Ok(VcpuHandle::new(id, messages, reports, kick, thread, kvm_exits, own_exits))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::memory;
    use crate::vm::Vm;

    const T: Duration = Duration::from_secs(5);

    fn wait_for_exits_above(h: &VcpuHandle, n: u64) -> u64 {
        let t = Instant::now();
        loop {
            let (now, _) = h.exits();
            if now > n {
                return now;
            }
            assert!(t.elapsed() < T, "the vCPU made no exit past {n}");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A real vCPU on this host's /dev/kvm (the test has nothing to do on a host without one): a
    /// real-mode loop of port writes, paused, resumed and finished through its handle.
    #[test]
    fn a_vcpu_pauses_resumes_and_finishes_on_request() {
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            crate::skip_test("no /dev/kvm");
            return;
        };
        let vm = Vm::create(&kvm, memory::create(64 << 20).unwrap()).unwrap();
        // 0x1000: out 0x80, al; jmp 0x1000
        vm.mem.write_slice(&[0xe6, 0x80, 0xeb, 0xfc], GuestAddress(0x1000)).unwrap();
        let vcpu = Vcpu::new(&vm.fd, 0).unwrap();
        let mut sregs = vcpu.fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.fd.set_sregs(&sregs).unwrap();
        let regs = kvm_bindings::kvm_regs { rip: 0x1000, rflags: 2, ..Default::default() };
        vcpu.fd.set_regs(&regs).unwrap();

        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut h = vcpu.start(&vm.fd, Arc::new(IoBuses::default()), exit.clone(), false).unwrap();
        wait_for_exits_above(&h, 10);
        assert_eq!(h.request(VcpuMessage::Pause, T).unwrap(), VcpuReport::Paused);
        let paused_at = h.exits().0;
        std::thread::sleep(Duration::from_millis(100));
        assert_eq!(h.exits().0, paused_at, "a paused vCPU made exits");
        assert_eq!(h.request(VcpuMessage::Pause, T).unwrap(), VcpuReport::Paused);
        assert_eq!(h.request(VcpuMessage::Resume, T).unwrap(), VcpuReport::Resumed);
        wait_for_exits_above(&h, paused_at + 10);
        assert_eq!(exit.reason(), None);
        h.finish(T).unwrap();
    }
}
