//! The bench runner: a one-vCPU VM holding the bench program (`guest.rs`), in which the VMM sets
//! the registers and segments for each routine in turn, runs it to its "done" port write, and
//! reads its per-iteration cycle counts back from guest memory. Exits the routines cause go
//! through nvmm's own exit handler and I/O buses, as a booted guest's would.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_msr_entry, kvm_regs, kvm_sregs, Msrs, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, NoDatamatch, VcpuExit};
use nvmm_devices::bus::{BusDevice, BusError};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};
use vmm_sys_util::eventfd::EventFd;

use crate::vcpu::profile::ExitProfile;
use crate::vcpu::stats::ExitCounter;
use super::guest::{self, Hypercall, Inputs, Kind, Program};
use crate::boot::Entry;
use crate::cpuid;
use crate::host::Vendor;
use crate::memory;
use crate::vcpu::{self, handle_exit, regs, Action, IoBuses, Vcpu, VmExit};
use crate::vm::{self, Vm};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Vm(#[from] vm::Error),
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    #[error("bench vCPU: {0}")]
    Regs(#[from] regs::Error),
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    Cpuid(#[source] kvm_ioctls::Error),
    #[error(transparent)]
    CpuidLeaf(#[from] cpuid::Error),
    #[error("cannot create an eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    #[error("KVM_IOEVENTFD (port {0:#x}): {1}")]
    PioIoeventfd(u8, #[source] kvm_ioctls::Error),
    #[error("bench device placement: {0}")]
    Bus(#[from] BusError),
    #[error(transparent)]
    Guest(#[from] guest::Error),
    #[error("cannot write the bench guest into its memory: {0}")]
    GuestMemory(#[from] GuestMemoryError),
    #[error("KVM_GET_MSRS (MSR {0:#x}): {1}")]
    GetMsr(u32, String),
    #[error("KVM_SET_REGS/KVM_SET_SREGS before '{0}': {1}")]
    SetRegs(&'static str, #[source] kvm_ioctls::Error),
    #[error("cannot arm the bench watchdog: {0}")]
    Watchdog(String),
    #[error("KVM_RUN during '{0}': {1}")]
    Run(&'static str, #[source] kvm_ioctls::Error),
    #[error("the bench guest stopped during '{kind}' at CPL {cpl}: {why}")]
    Stopped { kind: &'static str, cpl: u8, why: String },
    #[error("the bench guest took exception {vector} during '{kind}' at CPL {cpl} (faulting rip {rip:#x})")]
    Fault { kind: &'static str, cpl: u8, vector: u8, rip: u64 },
    #[error("the bench guest did not finish '{kind}' at CPL {cpl} within {secs} s (guest rip {rip:#x})")]
    Timeout { kind: &'static str, cpl: u8, secs: u64, rip: u64 },
}

/// The privilege level a routine runs at.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Cpl {
    Zero,
    Three,
}

impl Cpl {
    pub fn number(self) -> u8 {
        match self {
            Cpl::Zero => 0,
            Cpl::Three => 3,
        }
    }
}

/// RFLAGS: bit 1 is always set; IOPL 3 (bits 12..13) lets CPL 3 use port I/O without a TSS bitmap.
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;
/// Exceptions that push an error code, which sits between the stack pointer and the faulting RIP.
const VECTORS_WITH_ERROR_CODE: [u8; 9] = [8, 10, 11, 12, 13, 14, 17, 21, 30];

/// What one routine run measured.
#[derive(Debug)]
pub struct PhaseResult {
    /// Guest-side TSC cycles, one per iteration.
    pub samples: Vec<u32>,
    /// For `PioUser`: host TSC cycles from one userspace exit's KVM_RUN return to the next.
    pub host: Option<Vec<u32>>,
    /// Exits KVM counted during the run, when it counts them.
    pub exits: Option<u64>,
}

/// Ignores writes and reads zeros: the device behind the userspace port and MMIO window, so each
/// exit takes the same bus lookup and lock a real device's would.
struct Sink;

impl BusDevice for Sink {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {}
}

/// The bench VM.
pub struct Runner {
    vm: Vm,
    vcpu: Vcpu,
    io: IoBuses,
    program: Program,
    /// Long mode with the bench's descriptor tables; segments are set per CPL.
    long_mode: kvm_sregs,
    /// IA32_MISC_ENABLE as KVM holds it: what the wrmsr routine writes back.
    msr_value: u64,
    counter: Option<ExitCounter>,
    /// handle_exit counts every exit; the bench has its own timings and never reads this.
    profile: ExitProfile,
    iterations: u32,
    /// Whether the guest's LAPIC timer has TSC-deadline mode, which hlt-irq needs.
    tsc_deadline: bool,
    /// TSC cycles from the start of an hlt-irq iteration to its timer's deadline.
    hlt_delay: u64,
    /// Kept open for as long as KVM signals them.
    _ioevents: [EventFd; 2],
}

/// hlt-irq's timer delay when the runner is not told better: 1 ms at 3 GHz.
const DEFAULT_HLT_DELAY: u64 = 3_000_000;

/// Guest memory: everything below the results, then one u32 per iteration.
fn mem_size(iterations: u32) -> u64 {
    let need = guest::RESULTS_START + 4 * u64::from(iterations);
    need.div_ceil(1 << 20).max(memory::MIN_MEM_MIB) << 20
}

impl Runner {
    /// Builds the VM: memory, irqchip, ioeventfds, one configured vCPU in long mode, the program.
    pub fn new(kvm: &Kvm, vendor: &Vendor, iterations: u32) -> Result<Runner, Error> {
        let vm = Vm::create(kvm, memory::create(mem_size(iterations), memory::Thp::On)?)?;
        let ioevents = [EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?, EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?];
        // Any write of any size to the port completes in KVM: `out imm8, al` leaves al undefined.
        vm.fd
            .register_ioevent(&ioevents[0], &IoEventAddress::Pio(u64::from(guest::PORT_IOEVENTFD)), NoDatamatch)
            .map_err(|e| Error::PioIoeventfd(guest::PORT_IOEVENTFD, e))?;
        vm.register_mmio_ioevent(&ioevents[1], guest::MMIO_IOEVENTFD, guest::MMIO_DATAMATCH)?;
        let mut io = IoBuses::default();
        let sink: Arc<Mutex<dyn BusDevice>> = Arc::new(Mutex::new(Sink));
        io.pio.insert(u64::from(guest::PORT_USER), 1, sink.clone())?;
        io.mmio.insert(guest::MMIO_USER, 0x1000, sink)?;

        let vcpu = Vcpu::new(&vm.fd, 0)?;
        let mut cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(Error::Cpuid)?;
        let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
        cpuid::shape_for_vcpu(&mut cpuid, 0, 1, tsc_deadline)?;
        vcpu.configure(&cpuid, &regs::boot_msrs(&[]))?;
        regs::enable_lapic(&vcpu.fd)?;
        let msr_value = read_msr(&vcpu, guest::MSR_BENCH)?;

        let program = Program::new(Hypercall::for_vendor(vendor))?;
        let entry = Entry::Linux64 { rip: guest::CODE_START };
        let boot_gdt = regs::write_boot_tables(&vm.mem, entry)?;
        regs::allow_user_access(&vm.mem)?;
        guest::write_tables(&vm.mem, &program)?;
        regs::setup_sregs(&vcpu.fd, entry, &boot_gdt)?;
        let mut long_mode = vcpu.fd.get_sregs().map_err(regs::Error::GetSregs)?;
        long_mode.gdt.base = guest::GDT_START;
        long_mode.gdt.limit = guest::GDT_LIMIT;
        long_mode.idt.base = guest::IDT_START;
        long_mode.idt.limit = guest::IDT_LIMIT;
        long_mode.tr = regs::segment_from_gdt(guest::gdt()[5], guest::SEL_TSS);
        let counter = ExitCounter::open(&vcpu.fd);
        let hlt_delay = DEFAULT_HLT_DELAY;
        let profile = ExitProfile::new(&io, std::time::Instant::now());
        Ok(Runner { vm, vcpu, io, program, long_mode, msr_value, counter, profile, iterations, tsc_deadline, hlt_delay, _ioevents: ioevents })
    }

    /// The guest's TSC frequency as KVM sets it (KVM_GET_TSC_KHZ), if KVM says.
    pub fn tsc_khz(&self) -> Option<u32> {
        self.vcpu.fd.get_tsc_khz().ok().filter(|k| *k > 0)
    }

    /// Whether hlt-irq can run: its timer needs TSC-deadline mode (KVM_CAP_TSC_DEADLINE_TIMER).
    pub fn has_tsc_deadline(&self) -> bool {
        self.tsc_deadline
    }

    /// Sets how many TSC cycles after its start an hlt-irq iteration's timer fires.
    pub fn set_hlt_delay(&mut self, cycles: u64) {
        self.hlt_delay = cycles;
    }

    /// Runs `kind`'s routine at `cpl` for the configured iterations.
    pub fn run(&mut self, kind: Kind, cpl: Cpl) -> Result<PhaseResult, Error> {
        self.enter(kind, cpl)?;
        let before = self.counter.as_ref().and_then(ExitCounter::read);
        let watchdog = Watchdog::arm().map_err(Error::Watchdog)?;
        let host = self.run_to_done(kind, cpl, timeout(self.iterations));
        drop(watchdog);
        let host = host?;
        let after = self.counter.as_ref().and_then(ExitCounter::read);
        let mut samples = vec![0u32; self.iterations as usize];
        let bytes: &mut [u8] = bytemuck_u32s(&mut samples);
        self.vm.mem.read_slice(bytes, GuestAddress(guest::RESULTS_START))?;
        Ok(PhaseResult { samples, host, exits: before.zip(after).map(|(b, a)| a.saturating_sub(b)) })
    }

    /// Points the vCPU at `kind`'s routine, at `cpl`, with a return address to the "done" stub.
    fn enter(&mut self, kind: Kind, cpl: Cpl) -> Result<(), Error> {
        let top = match cpl {
            Cpl::Zero => guest::STACK0_TOP,
            Cpl::Three => guest::STACK3_TOP,
        };
        let rsp = top - 8;
        self.vm.mem.write_obj(Program::addr(self.program.done), GuestAddress(rsp))?;
        let inputs = Inputs::for_kind(kind, self.msr_value, self.hlt_delay);
        let regs = kvm_regs {
            rip: Program::addr(self.program.routine(kind)),
            rsp,
            rflags: RFLAGS_RESERVED | if cpl == Cpl::Three { RFLAGS_IOPL3 } else { 0 },
            rdi: u64::from(self.iterations),
            rsi: guest::RESULTS_START,
            rbx: inputs.rbx,
            rcx: inputs.rcx,
            r9: inputs.r9,
            r10: inputs.r10,
            ..Default::default()
        };
        let gdt = guest::gdt();
        let (code, data) = match cpl {
            Cpl::Zero => (regs::segment_from_gdt(gdt[1], guest::SEL_CODE0), regs::segment_from_gdt(gdt[2], guest::SEL_DATA0)),
            Cpl::Three => (regs::segment_from_gdt(gdt[4], guest::SEL_CODE3), regs::segment_from_gdt(gdt[3], guest::SEL_DATA3)),
        };
        let mut sregs = self.long_mode;
        sregs.cs = code;
        (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
        let name = kind.name();
        self.vcpu.fd.set_sregs(&sregs).map_err(|e| Error::SetRegs(name, e))?;
        self.vcpu.fd.set_regs(&regs).map_err(|e| Error::SetRegs(name, e))
    }

    /// The exit loop of one routine: nvmm's exit handler for everything but the bench's own ports.
    /// Returns the host-side round trips of `PioUser`.
    fn run_to_done(&mut self, kind: Kind, cpl: Cpl, timeout: Duration) -> Result<Option<Vec<u32>>, Error> {
        let name = kind.name();
        let deadline = Instant::now() + timeout;
        let mut host = (kind == Kind::PioUser).then(|| Vec::with_capacity(self.iterations as usize));
        let mut last_user_exit: Option<u64> = None;
        let fault = loop {
            let exit = match self.vcpu.fd.run() {
                Ok(exit) => exit,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    if Instant::now() > deadline {
                        let rip = self.vcpu.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                        return Err(Error::Timeout { kind: name, cpl: cpl.number(), secs: timeout.as_secs(), rip });
                    }
                    continue;
                }
                Err(e) => return Err(Error::Run(name, e)),
            };
            let now = rdtsc();
            match exit {
                VcpuExit::IoOut(port, _) if port == u16::from(guest::PORT_DONE) => return Ok(host),
                VcpuExit::IoOut(port, data) if port == u16::from(guest::PORT_FAULT) => break data.first().copied().unwrap_or(0xff),
                exit => {
                    if let (Some(h), VcpuExit::IoOut(port, _)) = (host.as_mut(), &exit) {
                        if *port == u16::from(guest::PORT_USER) {
                            if let Some(last) = last_user_exit {
                                h.push(now.wrapping_sub(last) as u32);
                            }
                            last_user_exit = Some(now);
                        }
                    }
                    if let Action::Stop(why) = handle_exit(exit, &self.io, &self.profile) {
                        let why = match why {
                            VmExit::Reset => "it shut down (triple fault)".to_string(),
                            VmExit::PowerOff => "it powered off".to_string(),
                            // Only the API asks for this, and the bench has no API.
                            VmExit::Shutdown => "it was shut down".to_string(),
                            // The bench guest has no debug-exit port either.
                            VmExit::DebugExit(status) => format!("it asked for exit status {status}"),
                            VmExit::Error(msg) => msg,
                        };
                        let rip = self.vcpu.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                        return Err(Error::Stopped { kind: name, cpl: cpl.number(), why: format!("{why} (guest rip {rip:#x})") });
                    }
                }
            }
        };
        Err(Error::Fault { kind: name, cpl: cpl.number(), vector: fault, rip: self.faulting_rip(fault) })
    }

    /// The RIP an exception stub was entered from, read from the interrupt frame on its stack.
    fn faulting_rip(&self, vector: u8) -> u64 {
        let Ok(regs) = self.vcpu.fd.get_regs() else { return 0 };
        let skip = if VECTORS_WITH_ERROR_CODE.contains(&vector) { 8 } else { 0 };
        self.vm.mem.read_obj::<u64>(GuestAddress(regs.rsp + skip)).unwrap_or(0)
    }
}

/// How long a routine may take: generous, since an emulated CPL 0 or a nested guest under TCG
/// can spend hundreds of microseconds per iteration.
fn timeout(iterations: u32) -> Duration {
    Duration::from_secs(60) + Duration::from_millis(2) * iterations
}

/// The u32 slice as bytes, for reading guest memory into it.
fn bytemuck_u32s(v: &mut [u32]) -> &mut [u8] {
    // SAFETY: u32 has no padding and every byte pattern is a valid u32; the byte slice covers
    // exactly the same memory and borrows `v` mutably for its lifetime.
    unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr().cast::<u8>(), std::mem::size_of_val(v)) }
}

/// The host's TSC.
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects; every x86-64 CPU has it.
    unsafe { core::arch::x86_64::_rdtsc() }
}

fn read_msr(vcpu: &Vcpu, index: u32) -> Result<u64, Error> {
    let mut msrs = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }]).map_err(|e| Error::GetMsr(index, format!("{e:?}")))?;
    match vcpu.fd.get_msrs(&mut msrs) {
        Ok(1) => Ok(msrs.as_slice()[0].data),
        Ok(_) => Err(Error::GetMsr(index, "KVM does not have it".into())),
        Err(e) => Err(Error::GetMsr(index, e.to_string())),
    }
}

/// A SIGALRM every second while a routine runs, so that KVM_RUN returns (EINTR) and the deadline
/// is checked even when the guest never exits (a hlt that nothing wakes). Disarmed on drop.
struct Watchdog;

extern "C" fn on_alarm(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

impl Watchdog {
    fn arm() -> Result<Watchdog, String> {
        vmm_sys_util::signal::register_signal_handler(libc::SIGALRM, on_alarm).map_err(|e| format!("SIGALRM handler: {e}"))?;
        set_itimer(1)?;
        Ok(Watchdog)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        // Failing to disarm leaves harmless no-op signals; nothing better to do in drop.
        let _ = set_itimer(0);
    }
}

/// ITIMER_REAL every `secs` seconds (0 disarms).
fn set_itimer(secs: libc::time_t) -> Result<(), String> {
    let tv = libc::timeval { tv_sec: secs, tv_usec: 0 };
    let it = libc::itimerval { it_interval: tv, it_value: tv };
    // SAFETY: `it` is a valid itimerval; a null old-value pointer is allowed.
    let rc = unsafe { libc::setitimer(libc::ITIMER_REAL, &it, std::ptr::null_mut()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!("setitimer: {}", std::io::Error::last_os_error()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_holds_the_results() {
        assert_eq!(mem_size(1), memory::MIN_MEM_MIB << 20);
        assert_eq!(mem_size(10_000_000), 41 << 20);
        assert!(mem_size(10_000_000) >= guest::RESULTS_START + 40_000_000);
    }

    #[test]
    fn sink_reads_zero() {
        let mut b = [0xffu8; 4];
        Sink.read(0, &mut b);
        assert_eq!(b, [0; 4]);
    }

    #[test]
    fn u32s_as_bytes() {
        let mut v = [0u32; 2];
        bytemuck_u32s(&mut v).copy_from_slice(&[1, 0, 0, 0, 0, 1, 0, 0]);
        assert_eq!(v, [1, 256]);
    }
}
