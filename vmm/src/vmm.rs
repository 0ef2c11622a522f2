//! The running VM and everything that runs it: one handle per vCPU thread, the device event loops,
//! the disks (flushed at shutdown), and the main event loop, which watches for the VM's end, feeds
//! the console, and answers API calls between two dispatch rounds.
//!
//! # Pause and resume
//! Pause stops the vCPUs first, so that no new request reaches a device, then parks each device
//! loop at a request boundary (see `device_loop.rs`); resume goes the other way round, so the
//! first notification from a resumed vCPU finds its device running. Each vCPU leaves `KVM_RUN`
//! with nothing pending (see `vcpu/runner.rs`) and sleeps on its channel: a paused VM uses no CPU.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use nvmm_devices::virtio::block::disk::DiskError;
use serde::Serialize;

use crate::api::{self, Action, ApiError, Call, Status};
use crate::device_loop::{self, DeviceLoop};
use crate::devices::Subscriber;
use crate::mailbox::Inbox;
use crate::memory;
use crate::vcpu::{self, ExitSignal, ExitSource, VcpuHandle, VcpuMessage, VcpuReport, VmExit};
use crate::virtio::AttachedDisk;
use crate::vm::Vm;

/// How long a vCPU or a device loop may take to answer a pause or a resume.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long each thread may take to end once the VM has stopped.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the VM is already paused")]
    AlreadyPaused,
    #[error("the VM is not paused")]
    NotPaused,
    #[error("the VM is stopping")]
    Stopping,
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    #[error(transparent)]
    DeviceLoop(#[from] device_loop::Error),
    #[error("cannot flush disk {path}: {err}")]
    Flush { path: PathBuf, err: DiskError },
    #[error("cannot watch for API calls: {0}")]
    ApiWakeup(#[source] std::io::Error),
    #[error("event loop: {0}")]
    EventLoop(String),
}

impl Error {
    /// A request the VM's state does not allow is the client's conflict; the rest are ours.
    fn status(&self) -> Status {
        match self {
            Error::AlreadyPaused | Error::NotPaused | Error::Stopping => Status::Conflict,
            _ => Status::Internal,
        }
    }
}

/// Whether the guest runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    Running,
    Paused,
}

/// What does not change while the VM runs, for `GET /vm`.
#[derive(Debug, Clone)]
pub struct Facts {
    pub cpus: u8,
    pub mem_bytes: u64,
    /// Our own layer (0 on bare metal), when known; the guest runs one layer above.
    pub layer: Option<u32>,
    pub nested: bool,
    pub started: Instant,
}

/// The answer to `GET /vm`.
#[derive(Debug, Serialize)]
pub struct VmInfo {
    pub state: RunState,
    pub cpus: u8,
    pub memory_bytes: u64,
    pub layer: Option<u32>,
    pub nested: bool,
    pub uptime_ms: u64,
    pub vcpus: Vec<VcpuInfo>,
}

#[derive(Debug, Serialize)]
pub struct VcpuInfo {
    pub id: u8,
    pub exits: u64,
    pub exits_source: ExitSource,
}

/// What the builder hands over once everything is created and started.
pub struct Parts {
    pub vm: Vm,
    /// The main event loop, with the console and the VM's end already subscribed.
    pub events: EventManager<Subscriber>,
    pub exit: Arc<ExitSignal>,
    pub vcpus: Vec<VcpuHandle>,
    pub devices: Vec<DeviceLoop>,
    pub disks: Vec<AttachedDisk>,
    /// API calls, when `--api-socket` is given.
    pub api: Option<Inbox<Call>>,
    pub facts: Facts,
}

pub struct Vmm {
    vm: Vm,
    events: EventManager<Subscriber>,
    exit: Arc<ExitSignal>,
    vcpus: Vec<VcpuHandle>,
    devices: Vec<DeviceLoop>,
    disks: Vec<AttachedDisk>,
    api: Option<Inbox<Call>>,
    facts: Facts,
    state: RunState,
}

impl Vmm {
    pub fn new(mut parts: Parts) -> Result<Self, Error> {
        if let Some(inbox) = &parts.api {
            let wakeup = inbox.wakeup().map_err(Error::ApiWakeup)?;
            parts.events.add_subscriber(Arc::new(Mutex::new(wakeup)));
        }
        let Parts { vm, events, exit, vcpus, devices, disks, api, facts } = parts;
        Ok(Self { vm, events, exit, vcpus, devices, disks, api, facts, state: RunState::Running })
    }

    /// Runs the main loop until the VM ends, then ends every thread and says why the VM ended.
    pub fn run(mut self) -> Result<VmExit, Error> {
        let why = loop {
            if let Some(why) = self.exit.reason() {
                match why {
                    VmExit::Reset => log::info!("the guest reset"),
                    VmExit::PowerOff => log::info!("the guest powered off"),
                    VmExit::Shutdown => log::info!("shut down through the API"),
                    VmExit::DebugExit(status) => log::info!("the guest asked for exit status {status}"),
                    VmExit::Error(_) => {}
                }
                break why;
            }
            self.events.run().map_err(|e| Error::EventLoop(format!("{e:?}")))?;
            self.answer_api_calls();
        };
        self.teardown();
        Ok(why)
    }

    /// Stops every vCPU and parks every device; 409 if already paused.
    pub fn pause(&mut self) -> Result<(), Error> {
        if self.state == RunState::Paused {
            return Err(Error::AlreadyPaused);
        }
        if let Err(e) = self.pause_all() {
            // Leave the VM as it was, running, as far as it still can.
            if let Err(undo) = self.resume_all() {
                log::warn!("after a failed pause ({e}), resuming failed too: {undo}");
            }
            return Err(e);
        }
        self.state = RunState::Paused;
        Ok(())
    }

    /// Lets a paused VM go on exactly where it stopped; 409 if it is running.
    pub fn resume(&mut self) -> Result<(), Error> {
        if self.state == RunState::Running {
            return Err(Error::NotPaused);
        }
        self.resume_all()?;
        self.state = RunState::Running;
        Ok(())
    }

    /// Stops the guest, flushes every disk, and ends the VM (nvmm then exits 0). Returns the
    /// number of disks flushed.
    pub fn shutdown(&mut self) -> Result<usize, Error> {
        if self.state == RunState::Running {
            match self.pause_all() {
                // A VM already stopping still gets its disks flushed: each flush takes the
                // device's lock, so it falls between two requests.
                Ok(()) | Err(Error::Stopping) => self.state = RunState::Paused,
                Err(e) => return Err(e),
            }
        }
        for disk in &self.disks {
            let block = disk.device.lock().unwrap_or_else(|e| e.into_inner());
            block.flush().map_err(|err| Error::Flush { path: disk.path.clone(), err })?;
        }
        self.exit.exit(VmExit::Shutdown);
        Ok(self.disks.len())
    }

    pub fn info(&self) -> VmInfo {
        let vcpus = self
            .vcpus
            .iter()
            .map(|v| {
                let (exits, exits_source) = v.exits();
                VcpuInfo { id: v.id(), exits, exits_source }
            })
            .collect();
        VmInfo {
            state: self.state,
            cpus: self.facts.cpus,
            memory_bytes: self.facts.mem_bytes,
            layer: self.facts.layer,
            nested: self.facts.nested,
            uptime_ms: self.facts.started.elapsed().as_millis() as u64,
            vcpus,
        }
    }

    fn pause_all(&mut self) -> Result<(), Error> {
        for vcpu in &mut self.vcpus {
            expect(vcpu.request(VcpuMessage::Pause, ANSWER_TIMEOUT)?, VcpuReport::Paused)?;
        }
        for device in &self.devices {
            device.park(ANSWER_TIMEOUT)?;
        }
        Ok(())
    }

    fn resume_all(&mut self) -> Result<(), Error> {
        for device in &self.devices {
            device.unpark(ANSWER_TIMEOUT)?;
        }
        for vcpu in &mut self.vcpus {
            expect(vcpu.request(VcpuMessage::Resume, ANSWER_TIMEOUT)?, VcpuReport::Resumed)?;
        }
        Ok(())
    }

    /// Answers every API call waiting in the inbox, in order.
    fn answer_api_calls(&mut self) {
        let mut calls = Vec::new();
        if let Some(inbox) = &self.api {
            loop {
                match inbox.try_recv() {
                    Ok(Some(call)) => calls.push(call),
                    Ok(None) => break,
                    Err(_) => {
                        self.api = None;
                        break;
                    }
                }
            }
        }
        for call in calls {
            let reply = self.answer(call.action);
            // A client that hung up does not need its answer.
            let _ = call.reply.send(reply);
        }
    }

    fn answer(&mut self, action: Action) -> api::Reply {
        let refused = |e: Error| ApiError::new(e.status(), e);
        Ok(match action {
            Action::Info => serde_json::to_value(self.info()).map_err(|e| ApiError::new(Status::Internal, e))?,
            Action::Pause => {
                self.pause().map_err(refused)?;
                serde_json::json!({ "state": RunState::Paused })
            }
            Action::Resume => {
                self.resume().map_err(refused)?;
                serde_json::json!({ "state": RunState::Running })
            }
            Action::Shutdown => {
                let flushed = self.shutdown().map_err(refused)?;
                serde_json::json!({ "state": "shut down", "disks_flushed": flushed })
            }
        })
    }

    /// Ends the vCPU and device threads, each within a bounded time, and logs nvmm's memory.
    fn teardown(self) {
        for vcpu in self.vcpus {
            if let Err(e) = vcpu.finish(TEARDOWN_TIMEOUT) {
                log::warn!("{e}");
            }
        }
        for device in self.devices {
            if let Err(e) = device.stop(TEARDOWN_TIMEOUT) {
                log::warn!("{e}");
            }
        }
        if let Some(u) = memory::host_usage(&self.vm.mem) {
            log::info!(
                "memory: peak RSS {} KiB, guest RAM touched {} KiB, nvmm's own {} KiB",
                u.peak_rss_kib, u.guest_touched_kib, u.overhead_kib()
            );
        }
    }
}

/// A vCPU that answers `Stopped` belongs to a VM that is ending.
fn expect(got: VcpuReport, wanted: VcpuReport) -> Result<(), Error> {
    match got {
        g if g == wanted => Ok(()),
        _ => Err(Error::Stopping),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_errors_are_conflicts_and_the_rest_internal() {
        for e in [Error::AlreadyPaused, Error::NotPaused, Error::Stopping] {
            assert_eq!(e.status(), Status::Conflict, "{e}");
        }
        assert_eq!(Error::EventLoop("x".into()).status(), Status::Internal);
        assert_eq!(Error::Vcpu(vcpu::Error::Gone(0)).status(), Status::Internal);
    }

    #[test]
    fn a_stopped_vcpu_means_the_vm_is_stopping() {
        assert!(expect(VcpuReport::Paused, VcpuReport::Paused).is_ok());
        assert!(matches!(expect(VcpuReport::Stopped, VcpuReport::Paused), Err(Error::Stopping)));
    }

    #[test]
    fn info_serializes_as_documented() {
        let info = VmInfo {
            state: RunState::Paused,
            cpus: 2,
            memory_bytes: 256 << 20,
            layer: Some(1),
            nested: true,
            uptime_ms: 1500,
            vcpus: vec![VcpuInfo { id: 0, exits: 42, exits_source: ExitSource::KvmStats }],
        };
        let v = serde_json::to_value(info).unwrap();
        assert_eq!(v["state"], "paused");
        assert_eq!(v["vcpus"][0]["exits_source"], "kvm_stats");
        assert_eq!(v["layer"], 1);
        assert_eq!(v["memory_bytes"], 268435456u64);
    }
}
