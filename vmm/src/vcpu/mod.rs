//! vCPUs: creation, boot-time configuration, and one thread each running `KVM_RUN`, driven by the
//! VMM through a [`VcpuHandle`] (`handle.rs`) as a small state machine (`runner.rs`).

pub mod exit;
mod handle;
pub mod persist;
pub mod profile;
pub mod regs;
pub mod reset;
mod runner;
pub mod stats;

use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_msr_entry, CpuId};
use kvm_ioctls::{VcpuFd, VmFd};
use vmm_sys_util::eventfd::EventFd;

pub use exit::{handle_exit, Action, IoBuses, VmExit};
pub use handle::{ExitSource, ResetReply, SaveReply, VcpuHandle, VcpuMessage, VcpuReport};
use runner::Runner;
use profile::ExitProfile;
use stats::KvmStats;

use crate::boot::Entry;
use crate::sleep::SleepSignal;

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
    #[error(transparent)]
    Reset(#[from] reset::Error),
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

/// What every vCPU thread watches besides its channel.
#[derive(Clone)]
pub struct VmSignals {
    pub exit: Arc<ExitSignal>,
    pub sleep: Arc<SleepSignal>,
}

impl VmSignals {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { exit: Arc::new(ExitSignal::new()?), sleep: Arc::new(SleepSignal::new()?) })
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

    /// Starts the vCPU's thread, running or paused, and returns the VMM's handle on it; `started`
    /// is when nvmm started (the profile's start-up time counts from there). `signals` say when
    /// the VM ends and when the guest sleeps.
    pub fn start(self, vm: &VmFd, io: Arc<IoBuses>, signals: VmSignals, paused: bool, started: Instant) -> Result<VcpuHandle, Error> {
        let id = self.id;
        handle::install_kick_handler()?;
        let kick = handle::kick_fd(vm, &self.fd, id)?;
        // Opened now: once the thread is in KVM_RUN, the ioctl would wait for it to leave.
        let kvm_stats = KvmStats::open(&self.fd, stats::PROFILE_STATS);
        let profile = Arc::new(ExitProfile::new(&io, started));
        // Read back as KVM holds it (a restored VM's CPUID comes from its snapshot).
        let cpuid = self.fd.get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES).ok().map(|c| crate::cpuid::TimerFacts::of(&c));
        let reporting = handle::Reporting { kvm_stats, profile: profile.clone(), io: io.clone(), cpuid };
        let (messages, inbox) = mpsc::channel();
        let (outbox, reports) = mpsc::channel();
        let VmSignals { exit, sleep } = signals;
        let runner = Runner { id, fd: self.fd, io, messages: inbox, reports: outbox, exit, sleep, profile, start_paused: paused };
        let thread = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || {
                crate::seccomp::enter_or_exit(crate::seccomp::ThreadKind::Vcpu, &format!("vcpu{id}"));
                runner.run()
            })
            .map_err(|e| Error::Spawn(id, e))?;
        Ok(VcpuHandle::new(id, messages, reports, kick, thread, reporting))
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use iced_x86::code_asm::{al, byte_ptr, dx, CodeAssembler};
    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::memory;
    use crate::vm::Vm;

    const T: Duration = Duration::from_secs(5);
    /// Where the real-mode test guests' code sits and starts (cs.base 0).
    const CODE: u64 = 0x1000;

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
        let vm = Vm::create(&kvm, memory::create(64 << 20, memory::Thp::On).unwrap()).unwrap();
        let mut a = CodeAssembler::new(16).unwrap();
        a.anonymous_label().unwrap();
        a.out(0x80u32, al).unwrap();
        let top = a.bwd().unwrap();
        a.jmp(top).unwrap();
        vm.mem.write_slice(&a.assemble(CODE).unwrap(), GuestAddress(CODE)).unwrap();
        let vcpu = Vcpu::new(&vm.fd, 0).unwrap();
        let mut sregs = vcpu.fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.fd.set_sregs(&sregs).unwrap();
        let regs = kvm_bindings::kvm_regs { rip: CODE, rflags: 2, ..Default::default() };
        vcpu.fd.set_regs(&regs).unwrap();

        let signals = VmSignals::new().unwrap();
        let exit = signals.exit.clone();
        let mut h = vcpu.start(&vm.fd, Arc::new(IoBuses::default()), signals, false, Instant::now()).unwrap();
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

    /// A real-mode guest on this host's /dev/kvm, without an in-kernel IRQ chip so that its HLT
    /// reaches nvmm: 3 writes to a named port device, 1 to an unclaimed port, 2 MMIO reads of a
    /// named device, 1 of an unclaimed address, then HLT, which stops the vCPU. The profile must
    /// count exactly those.
    #[test]
    fn the_profile_counts_exactly_the_exits_the_guest_made() {
        use nvmm_devices::bus::BusDevice;
        struct Sink;
        impl BusDevice for Sink {
            fn read(&mut self, _: u64, data: &mut [u8]) {
                data.fill(0x5a);
            }
            fn write(&mut self, _: u64, _: &[u8]) {}
        }
        let Ok(kvm) = kvm_ioctls::Kvm::new() else {
            crate::skip_test("no /dev/kvm");
            return;
        };
        let mem = memory::create(16 << 20, memory::Thp::On).unwrap();
        let fd = kvm.create_vm().unwrap();
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            guest_phys_addr: 0,
            memory_size: 16 << 20,
            userspace_addr: { use vm_memory::GuestMemoryBackend; mem.get_host_address(GuestAddress(0)).unwrap() as u64 },
            flags: 0,
        };
        // SAFETY: `mem` is a live 16 MiB mapping that outlives the VM fd, dropped at the end of the test.
        unsafe { fd.set_user_memory_region(region) }.unwrap();
        let mut a = CodeAssembler::new(16).unwrap();
        a.mov(dx, 0x3f8u32).unwrap();
        for _ in 0..3 {
            a.out(dx, al).unwrap(); // the named port device
        }
        a.out(0x80u32, al).unwrap(); // unclaimed
        // ds.base is 0xd0000000: the named MMIO device, twice, then past it (unclaimed).
        for offset in [0u32, 4, 0x1000] {
            a.mov(al, byte_ptr(offset)).unwrap();
        }
        a.hlt().unwrap(); // no IRQ chip, so it exits to nvmm
        mem.write_slice(&a.assemble(CODE).unwrap(), GuestAddress(CODE)).unwrap();
        let vcpu = Vcpu::new(&fd, 0).unwrap();
        let mut sregs = vcpu.fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        sregs.ds.base = 0xd000_0000;
        vcpu.fd.set_sregs(&sregs).unwrap();
        vcpu.fd.set_regs(&kvm_bindings::kvm_regs { rip: CODE, rflags: 2, ..Default::default() }).unwrap();

        let mut io = IoBuses::default();
        io.pio.insert_named(0x3f8, 8, "serial", Arc::new(Mutex::new(Sink))).unwrap();
        io.mmio.insert_named(0xd000_0000, 0x1000, "virtio0", Arc::new(Mutex::new(Sink))).unwrap();
        let signals = VmSignals::new().unwrap();
        let exit = signals.exit.clone();
        let mut h = vcpu.start(&fd, Arc::new(io), signals, false, Instant::now()).unwrap();
        let t = Instant::now();
        while exit.reason().is_none() {
            assert!(t.elapsed() < T, "the guest never halted: {:?}", h.profile());
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(matches!(exit.reason(), Some(VmExit::Error(m)) if m.contains("halted")), "{:?}", exit.reason());
        h.stop(T).unwrap();
        let p = h.profile();
        assert_eq!(p.port_io, std::collections::BTreeMap::from([("serial".into(), 3), ("unclaimed".into(), 1)]));
        assert_eq!(p.mmio, std::collections::BTreeMap::from([("virtio0".into(), 2), ("unclaimed".into(), 1)]));
        assert_eq!(p.unclaimed_ports, std::collections::BTreeMap::from([("0x80".into(), 1)]));
        assert_eq!((p.halts, p.shutdowns, p.others), (1, 0, 0));
        // Nothing kicked the vCPU before it halted: every exit to nvmm is one of the above.
        assert_eq!(p.interrupts, 0);
        assert_eq!(p.userspace_exits, 3 + 1 + 2 + 1 + 1);
        assert!(p.first_run_ms.is_some());
        if let Some(kvm) = &p.kvm {
            assert!(kvm.get("exits").copied().unwrap_or(0) >= 8, "KVM saw fewer exits than nvmm: {kvm:?}");
        }
        drop(h);
        drop(fd);
        drop(mem);
    }
}
