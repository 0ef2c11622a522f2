//! The running VM and everything that runs it: one handle per vCPU thread, the device event loops,
//! the disks (flushed at shutdown), and the main event loop, which watches for the VM's end, feeds
//! the console, and answers API calls between two dispatch rounds.
//!
//! # Pause and resume
//! Pause stops the vCPUs first, so that no new request reaches a device, then parks each device
//! loop at a request boundary (see `device_loop.rs`); resume goes the other way round, so the
//! first notification from a resumed vCPU finds its device running. Each vCPU leaves `KVM_RUN`
//! with nothing pending (see `vcpu/runner.rs`) and sleeps on its channel: a paused VM uses no CPU.
//!
//! # ACPI S3
//! A guest that sleeps (`sleep.rs`) is paused the same way, and is then `Suspended`: neither the
//! API's pause, resume and snapshot nor anything else runs it until its wake event. The wake puts
//! each vCPU in the state firmware leaves at a resume (`vcpu/reset.rs`), then resumes as above.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, SubscriberOps};
use nvmm_devices::virtio::block::disk::DiskError;
use serde::Serialize;

use nvmm_devices::i8042::I8042;
use nvmm_devices::serial::SerialPort;
use nvmm_devices::virtio::MmioTransport;

use crate::api::{self, Action, ApiError, Call, Status};
use crate::snapshot::{self, DevicesState, Machine, Snapshot};
use crate::vcpu::persist::SaveSpec;
use crate::device_loop::{self, DeviceLoop};
use crate::devices::{Subscriber, TestDevices};
use crate::mailbox::Inbox;
use crate::memory;
use crate::sleep::{self, SleepSignal};
use crate::vcpu::reset::ResetState;
use crate::vcpu::profile::VcpuProfile;
use crate::vcpu::stats::{KvmStats, VM_PROFILE_STATS};
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
    #[error("a snapshot needs a paused VM: pause it first")]
    SnapshotRunning,
    #[error("snapshot: {0}")]
    VmState(#[source] crate::vm::Error),
    #[error("snapshot not written (the VM stays paused): {0}")]
    Snapshot(#[source] snapshot::Error),
    #[error("the guest is asleep (ACPI S3) until its wake event")]
    Asleep,
    #[error(transparent)]
    Sleep(#[from] sleep::Error),
}

impl Error {
    /// A request the VM's state does not allow is the client's conflict, a destination that
    /// cannot be written the client's mistake; the rest are ours.
    fn status(&self) -> Status {
        match self {
            Error::AlreadyPaused | Error::NotPaused | Error::Stopping | Error::SnapshotRunning | Error::Asleep => Status::Conflict,
            Error::Snapshot(e) if e.is_destination() => Status::BadRequest,
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
    /// The guest sleeps in ACPI S3 (it asked to), its vCPUs paused until its wake event.
    Suspended,
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
    pub stages: StartupStages,
}

/// When each start-up stage ended, in ms from nvmm's start, in order: where the time before the
/// first `KVM_RUN` goes.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct StartupStages(pub Vec<(&'static str, f64)>);

impl StartupStages {
    /// Records that `stage` ends now.
    pub fn mark(&mut self, stage: &'static str, start: Instant) {
        self.0.push((stage, start.elapsed().as_secs_f64() * 1000.0));
    }

    fn describe(&self) -> String {
        self.0.iter().map(|(stage, ms)| format!("{stage} {ms:.1}")).collect::<Vec<_>>().join(", ")
    }
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
    pub profile: Profile,
}

/// The exit profile: nvmm's start-up time and each vCPU's exits (`vcpu/profile.rs`).
#[derive(Debug, Serialize)]
pub struct Profile {
    /// nvmm's start to the first `KVM_RUN` of any vCPU; `null` before it (a VM restored paused).
    pub startup_ms: Option<f64>,
    /// The start-up stages as `[name, ms from nvmm's start at its end]` pairs.
    pub startup_stages_ms: StartupStages,
    pub vcpus: Vec<VcpuProfile>,
    /// KVM's statistics of the whole VM (`VM_PROFILE_STATS`: the guest pages it maps now, by
    /// size); `null` without `KVM_GET_STATS_FD` on the VM.
    pub kvm_vm: Option<BTreeMap<String, u64>>,
}

impl Profile {
    fn of(vcpus: &[VcpuHandle], stages: &StartupStages, vm_stats: Option<&KvmStats>) -> Self {
        let vcpus: Vec<VcpuProfile> = vcpus.iter().map(VcpuHandle::profile).collect();
        let startup_ms = vcpus.iter().filter_map(|v| v.first_run_ms).reduce(f64::min);
        Self { startup_ms, startup_stages_ms: stages.clone(), vcpus, kvm_vm: vm_stats.map(KvmStats::read) }
    }
}

#[derive(Debug, Serialize)]
pub struct VcpuInfo {
    pub id: u8,
    pub exits: u64,
    pub exits_source: ExitSource,
}

/// What saving the VM needs beyond the VM itself: the machine's shape, which MSRs to read, and
/// the devices that save their own state.
pub struct Persisted {
    pub machine: Machine,
    pub spec: Arc<SaveSpec>,
    pub serial: Arc<Mutex<SerialPort>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub test_devices: TestDevices,
    /// One per virtio-mmio window, in window order.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
}

/// What the builder hands over once everything is created and started.
pub struct Parts {
    pub vm: Vm,
    /// The main event loop, with the console and the VM's end already subscribed.
    pub events: EventManager<Subscriber>,
    pub exit: Arc<ExitSignal>,
    pub sleep: Arc<SleepSignal>,
    pub vcpus: Vec<VcpuHandle>,
    pub devices: Vec<DeviceLoop>,
    pub disks: Vec<AttachedDisk>,
    /// API calls, when `--api-socket` is given.
    pub api: Option<Inbox<Call>>,
    pub facts: Facts,
    pub persisted: Persisted,
    /// The vCPUs were started paused (`--restore DIR --paused`); the devices are parked here.
    pub paused: bool,
}

pub struct Vmm {
    vm: Vm,
    events: EventManager<Subscriber>,
    exit: Arc<ExitSignal>,
    sleep: Arc<SleepSignal>,
    vcpus: Vec<VcpuHandle>,
    devices: Vec<DeviceLoop>,
    disks: Vec<AttachedDisk>,
    api: Option<Inbox<Call>>,
    facts: Facts,
    persisted: Persisted,
    state: RunState,
    /// The VM's own KVM statistics for the profile, opened once like each vCPU's.
    vm_stats: Option<KvmStats>,
}

impl Vmm {
    pub fn new(mut parts: Parts) -> Result<Self, Error> {
        if let Some(inbox) = &parts.api {
            let wakeup = inbox.wakeup().map_err(Error::ApiWakeup)?;
            parts.events.add_subscriber(Arc::new(Mutex::new(wakeup)));
        }
        let Parts { vm, events, exit, sleep, vcpus, devices, disks, api, facts, persisted, paused } = parts;
        let vm_stats = KvmStats::open(&vm.fd, VM_PROFILE_STATS);
        let mut vmm = Self { vm, events, exit, sleep, vcpus, devices, disks, api, facts, persisted, state: RunState::Running, vm_stats };
        if paused {
            // The vCPUs never ran; the devices must not either (a TAP would fill guest memory).
            for device in &vmm.devices {
                device.park(ANSWER_TIMEOUT)?;
            }
            vmm.state = RunState::Paused;
        }
        Ok(vmm)
    }

    /// Runs the main loop until the VM ends, then ends every thread and says why the VM ended.
    pub fn run(mut self) -> Result<VmExit, Error> {
        let why = loop {
            if let Some(sig) = crate::signals::received() {
                self.stop_on_signal(sig);
            }
            if let Some(why) = self.exit.reason() {
                match why {
                    VmExit::Reset => log::info!("the guest reset"),
                    VmExit::PowerOff => log::info!("the guest powered off"),
                    VmExit::Shutdown if crate::signals::received().is_some() => {}
                    VmExit::Shutdown => log::info!("shut down through the API"),
                    VmExit::DebugExit(status) => log::info!("the guest asked for exit status {status}"),
                    VmExit::Error(_) => {}
                }
                break why;
            }
            self.events.run().map_err(|e| Error::EventLoop(format!("{e:?}")))?;
            if let Err(e) = self.follow_sleep() {
                self.exit.exit(VmExit::Error(format!("ACPI S3: {e}")));
            }
            self.answer_api_calls();
        };
        self.teardown();
        Ok(why)
    }

    /// Stops every vCPU and parks every device; 409 if already paused or asleep.
    pub fn pause(&mut self) -> Result<(), Error> {
        match self.state {
            RunState::Paused => return Err(Error::AlreadyPaused),
            RunState::Suspended => return Err(Error::Asleep),
            RunState::Running => {}
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

    /// Lets a paused VM go on exactly where it stopped; 409 if it is running or asleep. A guest
    /// that asked to sleep just before the pause goes to sleep instead.
    pub fn resume(&mut self) -> Result<(), Error> {
        match self.state {
            RunState::Running => return Err(Error::NotPaused),
            RunState::Suspended => return Err(Error::Asleep),
            RunState::Paused => {}
        }
        if self.sleep.take_sleep() {
            self.fall_asleep();
            return Ok(());
        }
        self.resume_all()?;
        self.state = RunState::Running;
        Ok(())
    }

    /// The guest's sleep and wake requests, each in its turn: a wake waits for its sleep to be
    /// taken, and a sleep asked for while the VM was paused is taken at the resume.
    fn follow_sleep(&mut self) -> Result<(), Error> {
        if self.state == RunState::Running && self.sleep.take_sleep() {
            self.pause_all()?;
            self.fall_asleep();
        }
        if self.state == RunState::Suspended && self.sleep.take_wake() {
            self.wake()?;
        }
        Ok(())
    }

    /// Every vCPU and device is stopped: the guest sleeps. One line says until when.
    fn fall_asleep(&mut self) {
        self.state = RunState::Suspended;
        if self.persisted.test_devices.wakes_from_s3() {
            log::info!("the guest is asleep (ACPI S3) until its RTC alarm");
        } else {
            log::warn!("the guest is asleep (ACPI S3) with no wake event set (an RTC alarm with RTC_EN): nvmm waits for SIGTERM or an API shutdown");
        }
    }

    /// The boot vCPU to the waking vector in real mode, the others to wait-for-SIPI, then all run.
    /// A guest that left no waking vector would be booted afresh by a PC's firmware: nvmm, which
    /// does not reboot, ends it as a reset.
    fn wake(&mut self) -> Result<(), Error> {
        let Some((segment, offset)) = sleep::waking_vector(&self.vm.mem)? else {
            log::info!("the guest woke from S3 with no waking vector in its FACS");
            self.exit.exit(VmExit::Reset);
            return Ok(());
        };
        for vcpu in &mut self.vcpus {
            let state = if vcpu.id() == 0 { ResetState::RealMode { segment, offset } } else { ResetState::WaitForSipi };
            vcpu.reset(state, ANSWER_TIMEOUT)?;
        }
        self.sleep.let_vcpus_run();
        self.resume_all()?;
        self.state = RunState::Running;
        log::info!("the guest woke from S3 at {segment:#06x}:{offset:#06x}");
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
            let mut block = disk.device.lock().unwrap_or_else(|e| e.into_inner());
            block.flush().map_err(|err| Error::Flush { path: disk.path.clone(), err })?;
        }
        self.exit.exit(VmExit::Shutdown);
        Ok(self.disks.len())
    }

    /// SIGTERM or SIGINT: the orderly stop of [`Vmm::shutdown`] (vCPUs stopped, each device done
    /// with the request in hand, every disk flushed). If that fails, the VM ends all the same,
    /// with the reason as its error.
    fn stop_on_signal(&mut self, sig: i32) {
        if self.exit.reason().is_some() {
            return;
        }
        let name = crate::signals::name(sig);
        match self.shutdown() {
            Ok(flushed) => log::info!("stopped on {name}: {flushed} disks flushed"),
            Err(e) => self.exit.exit(VmExit::Error(format!("stopping on {name}: {e}"))),
        }
    }

    /// Saves the paused VM into `destination`; it stays paused whatever happens. Every vCPU is
    /// read on its own thread, then the VM's chips and clock, then each device, then memory.
    pub fn snapshot(&mut self, destination: &std::path::Path) -> Result<snapshot::Written, Error> {
        // A restored VM would not know it slept: its vCPUs would run on after the sleep request.
        if self.state == RunState::Suspended || self.sleep.sleep_pending() {
            return Err(Error::Asleep);
        }
        if self.state != RunState::Paused {
            return Err(Error::SnapshotRunning);
        }
        let started = Instant::now();
        let mut vcpus = Vec::with_capacity(self.vcpus.len());
        for vcpu in &mut self.vcpus {
            vcpus.push(vcpu.save(self.persisted.spec.clone(), ANSWER_TIMEOUT)?);
        }
        let vm = self.vm.save_state().map_err(Error::VmState)?;
        let p = &self.persisted;
        let devices = DevicesState {
            serial: p.serial.lock().unwrap_or_else(|e| e.into_inner()).save(),
            i8042: p.i8042.lock().unwrap_or_else(|e| e.into_inner()).save(),
            virtio: p.transports.iter().map(|t| t.lock().unwrap_or_else(|e| e.into_inner()).save()).collect(),
            test_devices: p.test_devices.save(),
        };
        let state = Snapshot { machine: p.machine.clone(), memory: Vec::new(), vm, vcpus, devices };
        let written = snapshot::save(destination, &self.vm.mem, state).map_err(Error::Snapshot)?;
        log::info!(
            "snapshot to {} in {:.1} ms: {} KiB of memory pages, {} KiB of state",
            destination.display(),
            started.elapsed().as_secs_f64() * 1000.0,
            written.memory_bytes_written >> 10,
            written.state_bytes >> 10
        );
        Ok(written)
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
            profile: Profile::of(&self.vcpus, &self.facts.stages, self.vm_stats.as_ref()),
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
                serde_json::json!({ "state": self.state })
            }
            Action::Shutdown => {
                let flushed = self.shutdown().map_err(refused)?;
                serde_json::json!({ "state": "shut down", "disks_flushed": flushed })
            }
            Action::Snapshot { destination } => {
                let started = Instant::now();
                let written = self.snapshot(&destination).map_err(refused)?;
                serde_json::json!({
                    "state": RunState::Paused,
                    "destination": destination,
                    "memory_bytes_written": written.memory_bytes_written,
                    "state_bytes": written.state_bytes,
                    "ms": started.elapsed().as_secs_f64() * 1000.0,
                })
            }
        })
    }

    /// Ends the vCPU and device threads, each within a bounded time, and logs nvmm's memory.
    fn teardown(mut self) {
        let started = Instant::now();
        for vcpu in &mut self.vcpus {
            if let Err(e) = vcpu.stop(TEARDOWN_TIMEOUT) {
                log::warn!("{e}");
            }
        }
        for device in self.devices {
            if let Err(e) = device.stop(TEARDOWN_TIMEOUT) {
                log::warn!("{e}");
            }
        }
        let teardown = started.elapsed();
        if log::log_enabled!(log::Level::Info) {
            log_profile(&Profile::of(&self.vcpus, &self.facts.stages, self.vm_stats.as_ref()), teardown);
        }
        if let Some(u) = memory::host_usage(&self.vm.mem) {
            log::info!(
                "memory: peak RSS {} KiB, guest RAM touched {} KiB, nvmm's own {} KiB",
                u.peak_rss_kib, u.guest_touched_kib, u.overhead_kib()
            );
        }
    }
}

/// The exit profile, once the vCPUs have stopped, and the teardown time (vCPU and device threads
/// ended; what follows, the terminal and the process exit, is not counted).
fn log_profile(profile: &Profile, teardown: Duration) {
    let startup = profile.startup_ms.map_or("not reached".to_string(), |ms| format!("{ms:.1} ms"));
    log::info!(
        "profile: start-up (nvmm's start to the first KVM_RUN) {startup} (stages end at, ms: {}), teardown {:.1} ms",
        profile.startup_stages_ms.describe(),
        teardown.as_secs_f64() * 1000.0
    );
    // One record for all vCPUs: the logger keeps at most 5 lines a second per call site.
    let lines: Vec<String> = profile.vcpus.iter().flat_map(VcpuProfile::lines).map(|l| format!("profile: {l}")).collect();
    // Each further line carries the logger's prefix too, so every line reads on its own.
    log::info!("{}", lines.join("\nnvmm: info: "));
    if let Some(stats) = &profile.kvm_vm {
        let pages: Vec<String> = stats.iter().map(|(name, n)| format!("{name} {n}")).collect();
        log::info!("profile: KVM maps guest memory now in {}", pages.join(", "));
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
        for e in [Error::AlreadyPaused, Error::NotPaused, Error::Stopping, Error::SnapshotRunning, Error::Asleep] {
            assert_eq!(e.status(), Status::Conflict, "{e}");
        }
        assert_eq!(Error::EventLoop("x".into()).status(), Status::Internal);
        assert_eq!(Error::Vcpu(vcpu::Error::Gone(0)).status(), Status::Internal);
        let unwritable = snapshot::Error::CreateDir { path: "/x".into(), err: std::io::ErrorKind::PermissionDenied.into() };
        assert_eq!(Error::Snapshot(unwritable).status(), Status::BadRequest);
        let ours = snapshot::Error::Serialize(serde_json::from_str::<u8>("x").unwrap_err());
        assert_eq!(Error::Snapshot(ours).status(), Status::Internal);
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
            profile: Profile {
                startup_ms: Some(12.5),
                startup_stages_ms: StartupStages(vec![("kvm", 1.5)]),
                vcpus: vec![],
                kvm_vm: Some(BTreeMap::from([("pages_2m".to_string(), 3)])),
            },
        };
        let v = serde_json::to_value(info).unwrap();
        assert_eq!(v["state"], "paused");
        assert_eq!(v["vcpus"][0]["exits_source"], "kvm_stats");
        assert_eq!(v["layer"], 1);
        assert_eq!(v["memory_bytes"], 268435456u64);
        assert_eq!(v["profile"]["startup_ms"], 12.5);
        assert_eq!(v["profile"]["startup_stages_ms"], serde_json::json!([["kvm", 1.5]]));
        assert_eq!(v["profile"]["kvm_vm"]["pages_2m"], 3);
        assert!(v["profile"]["vcpus"].is_array());
    }
}
