//! The vCPU thread: a small state machine driven by the VMM's messages.
//!
//! ```text
//!   Running --Pause--> Paused --Resume--> Running
//!   Running --the guest sleeps (ACPI S3)--> Paused (by itself, before the next guest instruction)
//!   Running --guest reset or error--> Stopped (tells the VMM, answers Stopped to everything)
//!   any state --Finish--> the thread returns
//! ```
//!
//! # Sleep
//! A guest that enters S3 must run nothing after the write that asks for it: kvm-unit-tests' s3
//! test writes a failure mark right after it, which its resume code would then report. The VMM
//! pauses every vCPU, but its Pause comes after the write's exit, and meanwhile the vCPU would run
//! on. So while [`SleepSignal`] says vCPUs must stop, a vCPU re-enters `KVM_RUN` with
//! `immediate_exit` set, which completes the exit's instruction and runs no other (see below), and
//! then pauses itself; the VMM's Pause finds it paused.
//!
//! # Pending I/O
//! KVM finishes a port or MMIO exit (stores the data of an `in` or an MMIO read in the guest's
//! registers, steps past the instruction) only when userspace enters `KVM_RUN` again; until then
//! the registers KVM would report are not the guest's. KVM's API documentation asks userspace to
//! re-enter with `immediate_exit` set (or a signal pending) to complete such an operation without
//! running more guest code, before it reads the vCPU's state. Here a vCPU reads its messages only
//! after a `KVM_RUN` that returned `EINTR`, and that call has first completed whatever the exit
//! before it left pending: KVM runs the completion before it looks at `immediate_exit` or at
//! signals, and if the completion needs userspace once more (a string instruction's next chunk),
//! `KVM_RUN` returns that exit instead, which is handled with `immediate_exit` still set. So a
//! vCPU that reports `Paused` has nothing pending, and its state can be read as it is.

use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::Arc;
use std::time::Instant;

use kvm_bindings::KVM_EXIT_INTERNAL_ERROR;
use kvm_ioctls::VcpuFd;

use super::handle::{SaveReply, VcpuMessage, VcpuReport};
use super::persist;
use super::profile::{ExitProfile, Kind};
use super::reset;
use super::{handle_exit, Action, ExitSignal, IoBuses, VmExit};
use crate::sleep::SleepSignal;

/// Where the thread's state machine stands.
#[derive(Debug, PartialEq, Eq)]
enum State {
    Running,
    Paused,
    Stopped(VmExit),
    Finished,
}

pub(super) struct Runner {
    pub id: u8,
    pub fd: VcpuFd,
    pub io: Arc<IoBuses>,
    pub messages: Receiver<VcpuMessage>,
    pub reports: Sender<VcpuReport>,
    pub exit: Arc<ExitSignal>,
    /// Whether the guest sleeps (ACPI S3): no vCPU may run then.
    pub sleep: Arc<SleepSignal>,
    /// The exits that reached nvmm, by kind, and the time spent on them.
    pub profile: Arc<ExitProfile>,
    /// Start paused (a VM restored with `--paused`): no `KVM_RUN` until the first `Resume`.
    pub start_paused: bool,
}

impl Runner {
    /// The thread's body: starts running and returns when told to finish.
    pub fn run(mut self) {
        let mut state = if self.start_paused { State::Paused } else { State::Running };
        loop {
            state = match state {
                State::Running => self.running(),
                State::Paused => self.paused(),
                State::Stopped(why) => self.stopped(why),
                State::Finished => return,
            };
        }
    }

    /// The exit loop: run, handle, repeat; messages are read after an interrupted `KVM_RUN`.
    fn running(&mut self) -> State {
        self.profile.entering();
        loop {
            match self.fd.run() {
                Ok(exit) => {
                    if log::log_enabled!(log::Level::Trace) {
                        log::trace!("vcpu{}: exit: {exit:?}", self.id);
                    }
                    // CLOCK_MONOTONIC through the vDSO: tens of ns against microseconds per exit.
                    let took = Instant::now();
                    let action = handle_exit(exit, &self.io, &self.profile);
                    self.profile.handled(took.elapsed());
                    if let Action::Stop(why) = action {
                        return State::Stopped(why);
                    }
                    if self.sleep.vcpus_must_stop() {
                        self.fd.set_kvm_immediate_exit(1);
                    }
                }
                Err(e) if e.errno() == libc::EINTR => {
                    self.profile.count(Kind::Interrupt);
                    // Cleared before the channel is read: a kick that lands after this clear also
                    // sent its message before setting the flag, so the read below sees it.
                    self.fd.set_kvm_immediate_exit(0);
                    match self.messages.try_recv() {
                        Ok(VcpuMessage::Pause) => {
                            self.report(VcpuReport::Paused);
                            return State::Paused;
                        }
                        Ok(VcpuMessage::Resume) => self.report(VcpuReport::Resumed),
                        Ok(VcpuMessage::Save(_, reply)) => refuse_save(self.id, &reply),
                        Ok(VcpuMessage::Reset(_, reply)) => refuse_reset(self.id, &reply),
                        Ok(VcpuMessage::Finish) | Err(TryRecvError::Disconnected) => return State::Finished,
                        // Asleep: paused without being asked, until the VMM wakes the guest.
                        Err(TryRecvError::Empty) if self.sleep.vcpus_must_stop() => return State::Paused,
                        Err(TryRecvError::Empty) => {}
                    }
                }
                Err(e) if e.errno() == libc::EAGAIN => {}
                Err(e) => return State::Stopped(VmExit::Error(format!("KVM_RUN failed: {e}"))),
            }
        }
    }

    /// Blocks on the channel: a paused vCPU uses no CPU.
    fn paused(&mut self) -> State {
        match self.messages.recv() {
            Ok(VcpuMessage::Resume) => {
                // The flag may still be set by the kick that paused us. This Resume's own kick can
                // also land after the clear: a stale flag costs one empty KVM_RUN, no more.
                self.fd.set_kvm_immediate_exit(0);
                self.report(VcpuReport::Resumed);
                State::Running
            }
            Ok(VcpuMessage::Pause) => {
                self.report(VcpuReport::Paused);
                State::Paused
            }
            Ok(VcpuMessage::Save(spec, reply)) => {
                // Nothing is pending here (see the module documentation): the state is whole.
                let _ = reply.send(persist::save(self.id, &self.fd, &spec));
                State::Paused
            }
            Ok(VcpuMessage::Reset(state, reply)) => {
                let _ = reply.send(reset::apply(self.id, &self.fd, state));
                State::Paused
            }
            Ok(VcpuMessage::Finish) | Err(_) => State::Finished,
        }
    }

    /// Tells the VMM why the vCPU stopped, then answers `Stopped` until told to finish.
    fn stopped(&mut self, why: VmExit) -> State {
        if why == VmExit::Reset && log::log_enabled!(log::Level::Debug) {
            log_shutdown_state(&self.fd);
        }
        let why = describe_internal_error(&mut self.fd).unwrap_or(why);
        log::debug!("vcpu{} stopped: {why:?}", self.id);
        self.exit.exit(why);
        loop {
            match self.messages.recv() {
                Ok(VcpuMessage::Finish) | Err(_) => return State::Finished,
                Ok(VcpuMessage::Save(_, reply)) => refuse_save(self.id, &reply),
                Ok(VcpuMessage::Reset(_, reply)) => refuse_reset(self.id, &reply),
                Ok(_) => self.report(VcpuReport::Stopped),
            }
        }
    }

    fn report(&self, report: VcpuReport) {
        // The VMM gone means the process is ending; there is no one left to tell.
        let _ = self.reports.send(report);
    }
}

/// A running or stopped vCPU's registers are not a state to restore; the VMM asks only paused ones.
fn refuse_save(id: u8, reply: &std::sync::mpsc::Sender<SaveReply>) {
    let _ = reply.send(Err(persist::Error::NotPaused(id)));
}

/// Only a paused vCPU is reset: a running one has registers in flux, a stopped one no VM to wake.
fn refuse_reset(id: u8, reply: &std::sync::mpsc::Sender<super::ResetReply>) {
    let _ = reply.send(Err(reset::Error::NotPaused(id)));
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
