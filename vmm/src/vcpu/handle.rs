//! The VMM's side of a vCPU thread: its message channel, the kick that gets it out of `KVM_RUN`,
//! and its exit count.
//!
//! # The kick
//! A vCPU inside `KVM_RUN` reads no channel, so every message is followed by a kick: the handle
//! sets `immediate_exit` in the vCPU's `kvm_run` and sends the thread `SIGRTMIN`. The signal makes
//! a `KVM_RUN` in progress return `EINTR`; its handler does nothing (it exists so that the signal
//! interrupts instead of ending the process). The flag covers what the signal cannot: a thread
//! that has looked at its channel but not yet entered `KVM_RUN` would sleep through a signal sent
//! in between, but with the flag set its next `KVM_RUN` returns `EINTR` at once.
//!
//! The flag is written through a mapping of `kvm_run` of the handle's own, made from a duplicate of
//! the vCPU fd: the write touches no memory that the vCPU thread holds a reference to, and the
//! mapping lives exactly as long as the handle.

use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd};
use std::sync::atomic::{fence, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_ioctls::{VcpuFd, VmFd};
use libc::{c_int, c_void, siginfo_t};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::persist::{self, SaveSpec, VcpuState};
use super::reset::{self, ResetState};
use super::profile::{ExitProfile, VcpuProfile};
use super::stats::KvmStats;
use super::{Error, IoBuses};
use crate::cpuid::TimerFacts;

/// A saved vCPU state, or why it could not be read.
pub type SaveReply = Result<VcpuState, persist::Error>;
/// Whether a reset went in.
pub type ResetReply = Result<(), reset::Error>;

/// What the VMM asks of a vCPU thread.
#[derive(Debug)]
pub enum VcpuMessage {
    /// Leave `KVM_RUN` and wait, using no CPU, until `Resume` or `Finish`.
    Pause,
    Resume,
    /// End the thread.
    Finish,
    /// Read the vCPU's state (only while paused) and send it on the channel given.
    Save(Arc<SaveSpec>, Sender<SaveReply>),
    /// Put the vCPU in a reset state (only while paused; an S3 wake) and answer on the channel.
    Reset(ResetState, Sender<ResetReply>),
}

/// What a vCPU thread answers to a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VcpuReport {
    Paused,
    Resumed,
    /// The vCPU has stopped for good (the guest reset, or an error): the VM is ending.
    Stopped,
}

/// Where a vCPU's exit count comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitSource {
    /// KVM's binary statistics: every exit, those KVM handles itself included.
    KvmStats,
    /// nvmm's own count of `KVM_RUN` returns to userspace (when KVM has no statistics).
    Nvmm,
}

/// The VMM's handle on one running vCPU thread.
pub struct VcpuHandle {
    id: u8,
    messages: Sender<VcpuMessage>,
    reports: Receiver<VcpuReport>,
    kick: VcpuFd,
    thread: Option<JoinHandle<()>>,
    kvm_stats: Option<KvmStats>,
    profile: Arc<ExitProfile>,
    io: Arc<IoBuses>,
    cpuid: Option<TimerFacts>,
}

/// What [`VcpuHandle::new`] needs to report on the vCPU.
pub(super) struct Reporting {
    pub kvm_stats: Option<KvmStats>,
    pub profile: Arc<ExitProfile>,
    /// The buses, for the names of their devices.
    pub io: Arc<IoBuses>,
    pub cpuid: Option<TimerFacts>,
}

/// Installs the no-op `SIGRTMIN` handler, once per process (the answer of the first try is kept).
///
/// vmm-sys-util installs it without `SA_RESTART`, so a blocking call the kick interrupts on a vCPU
/// thread returns `EINTR`; the ones made there (console writes through `write_all`, channel
/// receives) retry on it.
pub(super) fn install_kick_handler() -> Result<(), Error> {
    extern "C" fn interrupt_only(_: c_int, _: *mut siginfo_t, _: *mut c_void) {}
    static INSTALLED: OnceLock<Result<(), vmm_sys_util::errno::Error>> = OnceLock::new();
    INSTALLED.get_or_init(|| register_signal_handler(SIGRTMIN(), interrupt_only)).map_err(Error::SignalHandler)
}

/// A second `VcpuFd` on the same vCPU, with a mapping of `kvm_run` of its own.
pub(super) fn kick_fd(vm: &VmFd, vcpu: &VcpuFd, id: u8) -> Result<VcpuFd, Error> {
    // SAFETY: the fd belongs to `vcpu`, which outlives this borrow; we only duplicate it.
    let dup = unsafe { BorrowedFd::borrow_raw(vcpu.as_raw_fd()) }
        .try_clone_to_owned()
        .map_err(|e| Error::DupFd(id, e))?;
    // SAFETY: `dup` is an open vCPU fd of this VM, and its ownership passes to the new VcpuFd.
    unsafe { vm.create_vcpu_from_rawfd(dup.into_raw_fd()) }.map_err(|e| Error::KickMap(id, e))
}

impl VcpuHandle {
    pub(super) fn new(
        id: u8,
        messages: Sender<VcpuMessage>,
        reports: Receiver<VcpuReport>,
        kick: VcpuFd,
        thread: JoinHandle<()>,
        reporting: Reporting,
    ) -> Self {
        let Reporting { kvm_stats, profile, io, cpuid } = reporting;
        Self { id, messages, reports, kick, thread: Some(thread), kvm_stats, profile, io, cpuid }
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// Sends `message` and waits at most `timeout` for the vCPU's answer.
    pub fn request(&mut self, message: VcpuMessage, timeout: Duration) -> Result<VcpuReport, Error> {
        // An answer left over from a request that timed out would be taken for this one's.
        while self.reports.try_recv().is_ok() {}
        self.send(message)?;
        self.reports.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => Error::NoAnswer(self.id, timeout),
            RecvTimeoutError::Disconnected => Error::Gone(self.id),
        })
    }

    /// Reads the state of this vCPU, which must be paused, on its own thread.
    pub fn save(&mut self, spec: Arc<SaveSpec>, timeout: Duration) -> Result<VcpuState, Error> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.send(VcpuMessage::Save(spec, reply))?;
        match answer.recv_timeout(timeout) {
            Ok(state) => Ok(state?),
            Err(RecvTimeoutError::Timeout) => Err(Error::NoAnswer(self.id, timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(Error::Gone(self.id)),
        }
    }

    /// Puts this vCPU, which must be paused, in `state`, on its own thread.
    pub fn reset(&mut self, state: ResetState, timeout: Duration) -> Result<(), Error> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.send(VcpuMessage::Reset(state, reply))?;
        match answer.recv_timeout(timeout) {
            Ok(done) => Ok(done?),
            Err(RecvTimeoutError::Timeout) => Err(Error::NoAnswer(self.id, timeout)),
            Err(RecvTimeoutError::Disconnected) => Err(Error::Gone(self.id)),
        }
    }

    fn send(&mut self, message: VcpuMessage) -> Result<(), Error> {
        self.messages.send(message).map_err(|_| Error::Gone(self.id))?;
        self.kick.set_kvm_immediate_exit(1);
        // The vCPU thread may enter KVM_RUN on another CPU right now: the flag must be visible
        // before the signal can be.
        fence(Ordering::SeqCst);
        let Some(thread) = &self.thread else {
            return Err(Error::Gone(self.id));
        };
        match thread.kill(SIGRTMIN()) {
            Ok(()) => Ok(()),
            // A thread that has already returned needs no kick; its answer is the closed channel.
            Err(_) if thread.is_finished() => Ok(()),
            Err(e) => Err(Error::Kick(self.id, e)),
        }
    }

    /// The vCPU's exits so far, and where the figure comes from.
    pub fn exits(&self) -> (u64, ExitSource) {
        match self.kvm_stats.as_ref().and_then(|s| s.get("exits")) {
            Some(n) => (n, ExitSource::KvmStats),
            None => (self.profile.report(self.id, &self.io, None, None).userspace_exits, ExitSource::Nvmm),
        }
    }

    /// The vCPU's exit profile so far.
    pub fn profile(&self) -> VcpuProfile {
        self.profile.report(self.id, &self.io, self.kvm_stats.as_ref(), self.cpuid)
    }

    /// Ends the thread and waits for it, at most `timeout` (a thread that does not end is left to
    /// the process exit).
    pub fn finish(mut self, timeout: Duration) -> Result<(), Error> {
        self.stop(timeout)
    }

    /// Ends the thread and waits for it, at most `timeout`, keeping the handle: its profile is
    /// then final.
    pub fn stop(&mut self, timeout: Duration) -> Result<(), Error> {
        let _ = self.send(VcpuMessage::Finish);
        // The thread drops its report sender when it returns.
        loop {
            match self.reports.recv_timeout(timeout) {
                Ok(_) => continue,
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => return Err(Error::NoAnswer(self.id, timeout)),
            }
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Ok(())
    }
}
