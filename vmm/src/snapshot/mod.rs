//! Snapshots on disk: a directory with a state file (`state`, framed as `format.rs` says) and the
//! guest's memory (`memory`, sparse, see `memory.rs`).
//!
//! The state is plain data: the machine's shape and what its devices are backed by ([`Machine`]),
//! where RAM sits in the memory file, the VM's interrupt controllers and clock, each vCPU's state
//! (`vcpu/persist.rs`), and each device's own (`nvmm_devices`' `save` methods). Who saves what, in
//! which order, is the VMM's business (`vmm.rs` saves, `builder.rs` restores).
//!
//! Both files are written under temporary names and renamed into place, so a snapshot taken into
//! the directory a VM was restored from never truncates the file that VM's memory is mapped from,
//! and a failed snapshot leaves the directory's previous snapshot whole.

pub mod format;
pub mod memory;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use nvmm_devices::acpi_pm1::Pm1State;
use nvmm_devices::cmos_rtc::CmosRtcState;
use nvmm_devices::fw_cfg::FwCfgState;
use nvmm_devices::i8042::I8042State;
use nvmm_devices::pm_timer::PmTimerState;
use nvmm_devices::serial::SerialPortState;
use nvmm_devices::virtio::TransportState;
use serde::{Deserialize, Serialize};
use vm_memory::GuestMemoryMmap;

use crate::vcpu::persist::VcpuState;
use crate::vm::VmState;
pub use format::FormatError;
pub use memory::MemoryRange;

pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("snapshot directory {0} does not exist")]
    NoDir(PathBuf),
    #[error("{0} is not an nvmm snapshot: it has no state file")]
    NoState(PathBuf),
    #[error("cannot read {path}: {err}")]
    Read { path: PathBuf, err: std::io::Error },
    #[error("{path}: {err}")]
    Format { path: PathBuf, err: FormatError },
    #[error("{path}: the state does not parse: {err}")]
    Parse { path: PathBuf, err: serde_json::Error },
    #[error("cannot serialize the VM state: {0}")]
    Serialize(#[source] serde_json::Error),
    #[error("cannot create snapshot directory {path}: {err}")]
    CreateDir { path: PathBuf, err: std::io::Error },
    #[error("cannot write {path}: {err}")]
    Write { path: PathBuf, err: std::io::Error },
    #[error(transparent)]
    Memory(#[from] memory::Error),
}

impl Error {
    /// Whether the destination was the problem (the client's to fix), not the VMM.
    pub fn is_destination(&self) -> bool {
        matches!(self, Error::CreateDir { .. } | Error::Write { .. } | Error::Memory(memory::Error::Write { .. }))
    }
}

/// A virtio-blk disk: reopened by path at restore, refused if its size changed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRecord {
    pub path: PathBuf,
    pub read_only: bool,
    pub id: Option<String>,
    pub size_bytes: u64,
}

/// A virtio-net device: its TAP is reopened (or created) by name at restore.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRecord {
    pub tap: String,
    pub mac: Option<String>,
}

/// The machine's shape: what building it again needs (the kernel is in memory already).
///
/// Fields added after format version 1 was first written carry `#[serde(default)]`: a snapshot
/// written before them still loads, with what its restore built then (no PM timer, no
/// debug-exit port, no RTC, no PM1 blocks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    pub mem_bytes: u64,
    pub cpus: u8,
    pub nested: bool,
    pub acpi: bool,
    pub disks: Vec<DiskRecord>,
    pub nets: Vec<NetRecord>,
    /// The ACPI PM timer (a Multiboot kernel with ACPI has one).
    #[serde(default)]
    pub pm_timer: bool,
    /// `--debug-exit`: the guest may end nvmm through port 0xf4.
    #[serde(default)]
    pub debug_exit: bool,
    /// The CMOS RTC (a Multiboot kernel with ACPI has one).
    #[serde(default)]
    pub cmos_rtc: bool,
    /// The ACPI PM1 event and control blocks, through which the guest sleeps in S3 (a Multiboot
    /// kernel with ACPI has them, and a FACS at `acpi::facs_addr()`).
    #[serde(default)]
    pub acpi_pm1: bool,
}

/// Every device's own state, in bus order.
#[derive(Debug, Serialize, Deserialize)]
pub struct DevicesState {
    pub serial: SerialPortState,
    pub i8042: I8042State,
    /// One per virtio-mmio window, in window order (disks first, then nets, as built).
    pub virtio: Vec<TransportState>,
    /// Missing from snapshots written before it: their fw_cfg restores fresh, without a PM timer.
    #[serde(default)]
    pub test_devices: TestDevicesState,
}

/// The state of the kvm-unit-tests devices that have one (the debug-exit port has none).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TestDevicesState {
    pub fw_cfg: FwCfgState,
    /// There when the machine has a PM timer (`Machine::pm_timer`).
    pub pm_timer: Option<PmTimerState>,
    /// There when the machine has an RTC (`Machine::cmos_rtc`).
    #[serde(default)]
    pub cmos_rtc: Option<CmosRtcState>,
    /// There when the machine has the PM1 blocks (`Machine::acpi_pm1`).
    #[serde(default)]
    pub acpi_pm1: Option<Pm1State>,
}

/// The whole state file.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub machine: Machine,
    pub memory: Vec<MemoryRange>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DevicesState,
}

/// How big a snapshot came out.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Written {
    /// Bytes of guest pages written to the memory file.
    pub memory_bytes_written: u64,
    pub state_bytes: u64,
}

/// Writes `mem` and `state` (whose `memory` field is filled here) into `dir`, created if missing.
pub fn save(dir: &Path, mem: &GuestMemoryMmap, mut state: Snapshot) -> Result<Written, Error> {
    std::fs::create_dir_all(dir).map_err(|err| Error::CreateDir { path: dir.to_path_buf(), err })?;
    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |err| Error::Write { path, err }
    };
    let mem_tmp = dir.join(format!(".{MEMORY_FILE}.tmp"));
    let file = File::create(&mem_tmp).map_err(write_err(&mem_tmp))?;
    let written = memory::write(mem, &file, &mem_tmp);
    let written = match written {
        Ok(w) => w,
        Err(e) => {
            let _ = std::fs::remove_file(&mem_tmp);
            return Err(e.into());
        }
    };
    state.memory = written.ranges;
    let payload = serde_json::to_vec(&state).map_err(Error::Serialize)?;
    let bytes = format::encode(&payload);
    let state_tmp = dir.join(format!(".{STATE_FILE}.tmp"));
    let result = File::create(&state_tmp)
        .and_then(|mut f| f.write_all(&bytes))
        .map_err(write_err(&state_tmp))
        .and_then(|()| std::fs::rename(&mem_tmp, dir.join(MEMORY_FILE)).map_err(write_err(&dir.join(MEMORY_FILE))))
        .and_then(|()| std::fs::rename(&state_tmp, dir.join(STATE_FILE)).map_err(write_err(&dir.join(STATE_FILE))));
    if let Err(e) = result {
        let _ = std::fs::remove_file(&mem_tmp);
        let _ = std::fs::remove_file(&state_tmp);
        return Err(e);
    }
    Ok(Written { memory_bytes_written: written.bytes_written, state_bytes: bytes.len() as u64 })
}

/// Reads and checks the state file of `dir`.
pub fn load_state(dir: &Path) -> Result<Snapshot, Error> {
    if !dir.is_dir() {
        return Err(Error::NoDir(dir.to_path_buf()));
    }
    let path = dir.join(STATE_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(Error::NoState(dir.to_path_buf())),
        Err(err) => return Err(Error::Read { path, err }),
    };
    let payload = format::decode(&bytes).map_err(|err| Error::Format { path: path.clone(), err })?;
    serde_json::from_slice(payload).map_err(|err| Error::Parse { path, err })
}

/// Maps the memory file of `dir` as `snapshot` describes it.
pub fn map_memory(dir: &Path, snapshot: &Snapshot) -> Result<GuestMemoryMmap, Error> {
    Ok(memory::map(&dir.join(MEMORY_FILE), &snapshot.memory)?)
}

/// `nvmm snapshot-info DIR`: what a snapshot holds, for people and tests.
#[derive(Debug, Serialize)]
pub struct Info {
    pub format_version: u32,
    pub machine: Machine,
    pub vcpus: Vec<VcpuInfo>,
}

#[derive(Debug, Serialize)]
pub struct VcpuInfo {
    pub id: u8,
    pub rip: u64,
    /// The nested state's flags (KVM_STATE_NESTED_*), `None` when none was saved.
    pub nested_flags: Option<u16>,
    pub nested_bytes: usize,
    /// KVM_STATE_NESTED_GUEST_MODE: the vCPU was running its own guest when saved.
    pub guest_mode: bool,
}

pub fn info(dir: &Path) -> Result<Info, Error> {
    let s = load_state(dir)?;
    let vcpus = s
        .vcpus
        .iter()
        .map(|v| VcpuInfo {
            id: v.id,
            rip: v.regs.rip,
            nested_flags: v.nested.as_ref().filter(|n| n.len() >= 2).map(|n| u16::from_le_bytes([n[0], n[1]])),
            nested_bytes: v.nested.as_ref().map_or(0, Vec::len),
            guest_mode: v.nested.as_deref().is_some_and(crate::vcpu::persist::in_guest_mode),
        })
        .collect();
    Ok(Info { format_version: format::VERSION, machine: s.machine, vcpus })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch() -> vmm_sys_util::tempdir::TempDir {
        vmm_sys_util::tempdir::TempDir::new_with_prefix("/tmp/nvmm-snapdir").unwrap()
    }

    #[test]
    fn missing_and_foreign_directories_are_named() {
        let dir = scratch();
        let missing = dir.as_path().join("nope");
        assert_eq!(load_state(&missing).unwrap_err().to_string(), format!("snapshot directory {} does not exist", missing.display()));
        assert!(load_state(dir.as_path()).unwrap_err().to_string().ends_with("is not an nvmm snapshot: it has no state file"));
        std::fs::write(dir.as_path().join(STATE_FILE), b"hello").unwrap();
        assert!(load_state(dir.as_path()).unwrap_err().to_string().ends_with("not an nvmm snapshot state file (no NVMMSNAP magic)"));
        std::fs::write(dir.as_path().join(STATE_FILE), format::encode(b"{}")).unwrap();
        assert!(load_state(dir.as_path()).unwrap_err().to_string().contains("the state does not parse"));
    }

    /// A state file written before the kvm-unit-tests devices were recorded has none of their
    /// fields; it loads, with no PM timer, no debug-exit port and a fresh fw_cfg.
    #[test]
    fn a_snapshot_without_the_test_devices_still_loads() {
        let machine = Machine {
            mem_bytes: 1 << 20,
            cpus: 1,
            nested: false,
            acpi: true,
            disks: Vec::new(),
            nets: Vec::new(),
            pm_timer: true,
            debug_exit: true,
            cmos_rtc: true,
            acpi_pm1: true,
        };
        let mut json = serde_json::to_value(&machine).unwrap();
        let added = ["pm_timer", "debug_exit", "cmos_rtc", "acpi_pm1"];
        json.as_object_mut().unwrap().retain(|k, _| !added.contains(&k.as_str()));
        let old: Machine = serde_json::from_value(json).unwrap();
        assert_eq!(old, Machine { pm_timer: false, debug_exit: false, cmos_rtc: false, acpi_pm1: false, ..machine });

        let devices = DevicesState {
            serial: SerialPortState::default(),
            i8042: I8042State::default(),
            virtio: Vec::new(),
            test_devices: TestDevicesState {
                fw_cfg: FwCfgState { selected: 5, offset: 1 },
                pm_timer: Some(PmTimerState { count: 7 }),
                cmos_rtc: Some(CmosRtcState::default()),
                acpi_pm1: Some(Pm1State::default()),
            },
        };
        let mut json = serde_json::to_value(&devices).unwrap();
        // Written before the RTC and the PM1 blocks: their states are missing.
        let test_devices = json["test_devices"].as_object_mut().unwrap();
        test_devices.retain(|k, _| k != "cmos_rtc" && k != "acpi_pm1");
        let older: DevicesState = serde_json::from_value(json.clone()).unwrap();
        assert_eq!((older.test_devices.cmos_rtc, older.test_devices.acpi_pm1), (None, None));
        assert_eq!(older.test_devices.pm_timer, Some(PmTimerState { count: 7 }));
        assert!(json.as_object_mut().unwrap().remove("test_devices").is_some());
        let old: DevicesState = serde_json::from_value(json).unwrap();
        assert_eq!(old.test_devices, TestDevicesState::default());
    }
}
