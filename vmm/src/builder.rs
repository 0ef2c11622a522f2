//! Building a VM, from its configuration or from a snapshot, and running it to the end. Both read
//! top to bottom in the order things are built, and share every step they can: the API socket,
//! KVM, the VM, the devices, and [`launch`], which starts every thread and runs the main loop.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, SubscriberOps};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm};

use crate::acpi;
use crate::api::server::{self as api_server, ApiServer};
use crate::boot::{self, BootExtras, Entry};
use crate::config::{DiskConfig, NetConfig, RestoreConfig, VmConfig};
use crate::cpuid;
use crate::devices::{self, ConsoleInput, ExitWatcher, Legacy, Subscriber, TestDevices, TestWiring};
use crate::host::{Host, Vendor};
use crate::kvm;
use crate::mailbox::mailbox;
use crate::memory;
use crate::mptable;
use crate::nested;
use crate::sleep::SleepWatcher;
use crate::snapshot::{self, DiskRecord, Machine, NetRecord, Snapshot};
use crate::terminal::RawMode;
use crate::vcpu::persist::{self, SaveSpec};
use crate::vcpu::{self, regs, IoBuses, Vcpu, VmExit, VmSignals};
use crate::virtio::Attached;
use crate::vm::Vm;
use crate::vmm::{self as running, Facts, Parts, Persisted, StartupStages, Vmm};

/// One error per build stage; each stage's message says what failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Kvm(#[from] kvm::Error),
    #[error(transparent)]
    Memory(#[from] memory::Error),
    #[error(transparent)]
    Vm(#[from] crate::vm::Error),
    #[error(transparent)]
    Boot(#[from] boot::Error),
    #[error(transparent)]
    MpTable(#[from] mptable::Error),
    #[error(transparent)]
    Acpi(#[from] acpi::Error),
    #[error(transparent)]
    Devices(#[from] devices::Error),
    #[error(transparent)]
    Virtio(#[from] crate::virtio::Error),
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    #[error(transparent)]
    Nested(#[from] nested::NestedError),
    #[error("KVM_GET_SUPPORTED_CPUID: {0}")]
    Cpuid(#[source] kvm_ioctls::Error),
    #[error(transparent)]
    CpuidLeaf(#[from] cpuid::Error),
    #[error("KVM_GET_MSR_INDEX_LIST: {0}")]
    MsrIndexList(#[source] kvm_ioctls::Error),
    #[error("boot tables: {0}")]
    BootTables(#[source] regs::Error),
    #[error(transparent)]
    Api(#[from] api_server::Error),
    #[error(transparent)]
    Run(#[from] running::Error),
    #[error("event loop: {0}")]
    EventLoop(String),
    #[error(transparent)]
    Seccomp(#[from] crate::seccomp::Error),
    #[error(transparent)]
    Snapshot(#[from] snapshot::Error),
    #[error(transparent)]
    VcpuState(#[from] persist::Error),
    #[error("disk {path} has changed since the snapshot: {now} bytes, the snapshot says {saved}")]
    DiskChanged { path: std::path::PathBuf, saved: u64, now: u64 },
    #[error("the snapshot is inconsistent: {0}")]
    Inconsistent(String),
    #[error(transparent)]
    DeviceState(#[from] nvmm_devices::virtio::PersistError),
}

/// Builds the VM described by `config`, boots it, and returns how it ended.
pub fn build_and_run(config: &VmConfig, start: Instant) -> Result<VmExit, Error> {
    // Before anything else, so that every thread nvmm or its crates start inherits the filter.
    crate::seccomp::install(config.seccomp)?;
    let mut stages = StartupStages::default();
    stages.mark("seccomp", start);
    // First, so a bad path fails before any work; the socket file goes when `api` is dropped.
    let api = config.api_socket.as_deref().map(ApiServer::bind).transpose()?;
    let kvm = kvm::open()?;
    let host = Host::real();
    stages.mark("kvm and host", start);
    let vm = Vm::create(&kvm, memory::create(config.mem_bytes, config.thp)?)?;
    let thp = if config.thp == memory::Thp::On { "on" } else { "off" };
    log::info!("guest RAM: {} MiB, --thp {thp} (host THP: {})", config.mem_bytes >> 20, host.thp.as_deref().unwrap_or("none"));
    if config.nested {
        nested::preflight(&host, Some(&kvm), Some(&vm.fd))?;
    }
    stages.mark("vm", start);

    let kernel = boot::load_kernel(&vm.mem, &config.kernel, config.entry)?;
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(&vm.mem, &kernel, path)?),
        None => None,
    };
    stages.mark("kernel and initrd", start);

    let mut io = IoBuses::default();
    let legacy = devices::setup_legacy(&vm, &mut io, start, config.acpi)?;
    let virtio = crate::virtio::attach(&vm, &mut io, &config.disks, &config.nets)?;
    stages.mark("devices", start);

    // The MP table is always there, for kernels built without ACPI; a kernel with ACPI prefers
    // the MADT. Devices are described once: in the DSDT, or on the command line.
    mptable::setup(&vm.mem, config.cpus)?;
    let multiboot = matches!(kernel.entry, Entry::Multiboot { .. });
    let machine = machine_of(config, &virtio, multiboot);
    let platform = if multiboot { acpi::Platform::FixedHardware } else { acpi::Platform::HardwareReduced };
    let rsdp = if config.acpi { Some(acpi::setup(&vm.mem, config.cpus, &virtio.windows, platform)?) } else { None };
    if multiboot {
        let cmdline = config.cmdline.as_deref().unwrap_or("");
        let module = config.initrd.as_deref().zip(initrd);
        boot::write_multiboot_info(&vm.mem, &kernel, cmdline, module, config.mem_bytes)?;
    } else {
        let mut cmdline = guest_cmdline(config, &host);
        if !config.acpi {
            cmdline = crate::virtio::cmdline_with_devices(&cmdline, &virtio.windows)?;
        }
        boot::load_cmdline_checked(&vm.mem, &kernel, &cmdline)?;
        boot::write_boot_params(&vm.mem, &kernel, cmdline.len(), BootExtras { initrd, rsdp }, config.mem_bytes)?;
    }
    stages.mark("tables", start);

    let signals = vm_signals()?;
    let wiring = TestWiring { vm: &vm, signals: &signals, power_off: &legacy.power_off };
    let test_devices = devices::setup_test_devices(&mut io, &machine, wiring)?;

    let vcpus = create_vcpus(&kvm, &vm, &host, config)?;
    let gdt = regs::write_boot_tables(&vm.mem, kernel.entry).map_err(Error::BootTables)?;
    vcpus[0].configure_boot(kernel.entry, &gdt)?;
    stages.mark("vcpus", start);
    prefault_boot_footprint(&vm, &vcpus[0], &boot::boot_footprint(&kernel, initrd, config.mem_bytes));
    stages.mark("prefault", start);

    launch(Launch { api, kvm, host, vm, io, legacy, test_devices, virtio, vcpus, machine, signals, paused: false, start, stages })
}

/// Starts the VM saved in `restore.dir` where it stopped, and returns how it ended.
///
/// The order, and why (after the seccomp filter, as for a boot):
/// 1. the API socket, then the state file, read and checked whole: bad input fails before
///    anything is created;
/// 2. memory, mapped from the memory file (copy-on-write: nothing is read now);
/// 3. the VM, then its PIT, kvmclock, PICs and IOAPIC, before any vCPU: the vCPUs' kvmclock MSRs
///    refer to a clock that already reads the saved time;
/// 4. the devices, built exactly as for a boot (disks and TAPs reopened by the recorded paths and
///    names, the kvm-unit-tests devices the snapshot records), each disk checked against its
///    recorded size;
/// 5. the vCPUs, each restored in the order `vcpu/persist.rs` gives;
/// 6. the devices' own state, last: loading it raises the interrupts that were due again, and an
///    edge is lost unless the IOAPIC's routes and the LAPICs it targets are already restored;
/// 7. the threads, running or (`--paused`) paused.
pub fn restore_and_run(restore: &RestoreConfig, start: Instant) -> Result<VmExit, Error> {
    // As for a boot: before any thread exists, so every one inherits the filter.
    crate::seccomp::install(restore.seccomp)?;
    let api = restore.api_socket.as_deref().map(ApiServer::bind).transpose()?;
    let snap = snapshot::load_state(&restore.dir)?;
    let machine = snap.machine.clone();
    check_consistent(&snap)?;
    let kvm = kvm::open()?;
    let host = Host::real();
    let vm = Vm::create(&kvm, snapshot::map_memory(&restore.dir, &snap)?)?;
    if machine.nested {
        nested::preflight(&host, Some(&kvm), Some(&vm.fd))?;
    }
    vm.restore_state(&snap.vm)?;

    let mut io = IoBuses::default();
    let legacy = devices::setup_legacy(&vm, &mut io, start, machine.acpi)?;
    let (disks, nets) = device_configs(&machine);
    let virtio = crate::virtio::attach(&vm, &mut io, &disks, &nets)?;
    check_disks(&machine.disks, &virtio)?;
    let signals = vm_signals()?;
    let wiring = TestWiring { vm: &vm, signals: &signals, power_off: &legacy.power_off };
    let test_devices = devices::setup_test_devices(&mut io, &machine, wiring)?;

    let mut vcpus = Vec::with_capacity(snap.vcpus.len());
    for state in &snap.vcpus {
        let vcpu = Vcpu::new(&vm.fd, state.id)?;
        persist::restore(&vcpu.fd, state)?;
        vcpus.push(vcpu);
    }

    legacy.restore(&snap.devices.serial, &snap.devices.i8042)?;
    test_devices.restore(&snap.devices.test_devices);
    for (transport, state) in virtio.transports.iter().zip(&snap.devices.virtio) {
        transport.lock().unwrap_or_else(|e| e.into_inner()).restore(state)?;
    }
    log::info!("restored from {} in {:.1} ms (process start to vCPU threads starting)", restore.dir.display(), start.elapsed().as_secs_f64() * 1000.0);
    let mut stages = StartupStages::default();
    stages.mark("restore", start);
    launch(Launch { api, kvm, host, vm, io, legacy, test_devices, virtio, vcpus, machine, signals, paused: restore.paused, start, stages })
}

/// What both builds hand over to [`launch`].
struct Launch {
    api: Option<ApiServer>,
    kvm: Kvm,
    host: Host,
    vm: Vm,
    io: IoBuses,
    legacy: Legacy,
    test_devices: TestDevices,
    virtio: Attached,
    vcpus: Vec<Vcpu>,
    machine: Machine,
    /// How the VM ends and sleeps; devices that end it (debug-exit) or put it to sleep (the PM1
    /// blocks) hold them already.
    signals: VmSignals,
    paused: bool,
    start: Instant,
    stages: StartupStages,
}

fn vm_signals() -> Result<VmSignals, Error> {
    VmSignals::new().map_err(|e| Error::EventLoop(e.to_string()))
}

/// Starts the console, the device loops, the API and the vCPU threads, then runs the VM.
fn launch(l: Launch) -> Result<VmExit, Error> {
    let Launch { mut api, kvm, host, vm, io, legacy, mut test_devices, virtio, vcpus, machine, signals, paused, start, mut stages } = l;
    let exit = signals.exit.clone();
    let spec = Arc::new(save_spec(&kvm, &host, machine.nested)?);
    let mut events: EventManager<Subscriber> =
        EventManager::new().map_err(|e| Error::EventLoop(format!("{e:?}")))?;
    events.add_subscriber(Arc::new(Mutex::new(ExitWatcher { signal: exit.clone(), reset: legacy.reset, power_off: legacy.power_off })));
    events.add_subscriber(Arc::new(Mutex::new(crate::signals::StopSignals::install().map_err(|e| Error::EventLoop(format!("cannot handle SIGTERM and SIGINT: {e}")))?)));
    events.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(legacy.serial.clone(), legacy.serial_room.clone()))));
    events.add_subscriber(Arc::new(Mutex::new(SleepWatcher(signals.sleep.clone()))));
    if let Some(timer) = test_devices.rtc_timer.take() {
        events.add_subscriber(Arc::new(Mutex::new(timer)));
    }
    let device_loops = crate::virtio::spawn_event_loops(virtio.subscribers)?;
    let api_calls = match api.as_mut() {
        Some(server) => {
            let (mailbox, inbox) = mailbox().map_err(|e| Error::EventLoop(e.to_string()))?;
            server.start(mailbox)?;
            Some(inbox)
        }
        None => None,
    };

    stages.mark("device and API threads", start);
    let _raw = RawMode::enter();
    let io = Arc::new(io);
    let vcpus = vcpus.into_iter().map(|v| v.start(&vm.fd, io.clone(), signals.clone(), paused, start)).collect::<Result<_, _>>()?;
    log::debug!("VM started in {:.1} ms", start.elapsed().as_secs_f64() * 1000.0);
    let facts = Facts { cpus: machine.cpus, mem_bytes: machine.mem_bytes, layer: host.layer.number(), nested: machine.nested, started: start, stages };
    let persisted = Persisted { machine, spec, serial: legacy.serial, i8042: legacy.i8042, test_devices, transports: virtio.transports };
    let sleep = signals.sleep;
    let vmm = Vmm::new(Parts { vm, events, exit, sleep, vcpus, devices: device_loops, disks: virtio.disks, api: api_calls, facts, persisted, paused })?;
    Ok(vmm.run()?)
}

/// One vCPU per `--cpus`, each with its CPUID (topology, nested bits) and boot MSRs set.
fn create_vcpus(kvm: &Kvm, vm: &Vm, host: &Host, config: &VmConfig) -> Result<Vec<Vcpu>, Error> {
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(Error::Cpuid)?;
    let msrs = regs::boot_msrs(&nested::vcpu_msrs(kvm, &host.vendor, config.nested)?);
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    let mut vcpus = Vec::with_capacity(config.cpus.into());
    for id in 0..config.cpus {
        let mut cpuid = supported.clone();
        cpuid::shape_for_vcpu(&mut cpuid, id, config.cpus, tsc_deadline)?;
        nested::shape_cpuid(&mut cpuid, &host.vendor, config.nested)?;
        let vcpu = Vcpu::new(&vm.fd, id)?;
        // The guest's TSC runs at the rate KVM gives a new vCPU; 0 (unknown) leaves the leaf out.
        let tsc_khz = vcpu.fd.get_tsc_khz().unwrap_or(0);
        cpuid::add_timing_leaf(&mut cpuid, tsc_khz)?;
        if id == 0 {
            log::debug!("CPUID 0x{:x}: TSC {tsc_khz} kHz, APIC bus {} kHz", cpuid::LEAF_TIMING, cpuid::APIC_BUS_KHZ);
        }
        vcpu.configure(&cpuid, &msrs)?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// Maps the memory the boot will touch first in KVM's page tables (`prefault.rs`). Only a cost
/// saved: a KVM that cannot (shadow paging, Linux before 6.10) or a failure leaves the guest to
/// fault the pages in itself, as it would have.
fn prefault_boot_footprint(vm: &Vm, boot_vcpu: &Vcpu, ranges: &[std::ops::Range<u64>]) {
    match crate::prefault::prefault(&vm.fd, &boot_vcpu.fd, &vm.mem, ranges) {
        Ok(bytes) => log::info!("prefault: {} KiB of the boot's memory mapped in KVM before the first KVM_RUN ({} ranges)", bytes >> 10, ranges.len()),
        Err(e @ crate::prefault::Error::Unsupported) => log::debug!("prefault: {e}"),
        Err(e) => log::warn!("prefault: {e}; the guest faults its memory in itself"),
    }
}

/// Which MSRs a snapshot of this VM saves: what KVM lists, and the VMX capability MSRs on Intel
/// with `--nested`.
fn save_spec(kvm: &Kvm, host: &Host, nested: bool) -> Result<SaveSpec, Error> {
    let listed = kvm.get_msr_index_list().map_err(Error::MsrIndexList)?;
    Ok(SaveSpec::new(listed.as_slice(), nested && host.vendor == Vendor::Intel, nested))
}

/// The machine as a snapshot records it. A Multiboot kernel (kvm-unit-tests) with ACPI gets the
/// devices its FADT names: the PM timer, the PM1 blocks and the CMOS RTC.
fn machine_of(config: &VmConfig, virtio: &Attached, multiboot: bool) -> Machine {
    let disks = config
        .disks
        .iter()
        .zip(&virtio.disks)
        .map(|(d, a)| DiskRecord {
            path: std::path::absolute(&d.path).unwrap_or_else(|_| d.path.clone()),
            read_only: d.read_only,
            id: d.id.clone(),
            size_bytes: a.device.lock().unwrap_or_else(|e| e.into_inner()).sectors() * 512,
        })
        .collect();
    let nets = config.nets.iter().map(|n| NetRecord { tap: n.tap.clone(), mac: n.mac.clone() }).collect();
    Machine {
        mem_bytes: config.mem_bytes,
        cpus: config.cpus,
        nested: config.nested,
        acpi: config.acpi,
        disks,
        nets,
        pm_timer: multiboot && config.acpi,
        debug_exit: config.debug_exit,
        cmos_rtc: multiboot && config.acpi,
        acpi_pm1: multiboot && config.acpi,
    }
}

/// The devices a snapshot records, as the configuration that builds them.
fn device_configs(machine: &Machine) -> (Vec<DiskConfig>, Vec<NetConfig>) {
    let disks = machine.disks.iter().map(|d| DiskConfig { path: d.path.clone(), read_only: d.read_only, id: d.id.clone() }).collect();
    let nets = machine.nets.iter().map(|n| NetConfig { tap: n.tap.clone(), mac: n.mac.clone() }).collect();
    (disks, nets)
}

/// A disk whose size changed is not the disk the guest knew.
fn check_disks(records: &[DiskRecord], virtio: &Attached) -> Result<(), Error> {
    for (r, a) in records.iter().zip(&virtio.disks) {
        let now = a.device.lock().unwrap_or_else(|e| e.into_inner()).sectors() * 512;
        if now != r.size_bytes {
            return Err(Error::DiskChanged { path: r.path.clone(), saved: r.size_bytes, now });
        }
    }
    Ok(())
}

/// Counts that must agree before anything is built from the state.
fn check_consistent(snap: &Snapshot) -> Result<(), Error> {
    let m = &snap.machine;
    if snap.vcpus.len() != usize::from(m.cpus) || snap.vcpus.iter().enumerate().any(|(i, v)| usize::from(v.id) != i) {
        return Err(Error::Inconsistent(format!("{} vCPU states for {} vCPUs", snap.vcpus.len(), m.cpus)));
    }
    let devices = m.disks.len() + m.nets.len();
    if snap.devices.virtio.len() != devices {
        return Err(Error::Inconsistent(format!("{} virtio states for {devices} devices", snap.devices.virtio.len())));
    }
    let saved = &snap.devices.test_devices;
    for (device, has, state) in [
        ("PM timer", m.pm_timer, saved.pm_timer.is_some()),
        ("CMOS RTC", m.cmos_rtc, saved.cmos_rtc.is_some()),
        ("PM1 register block", m.acpi_pm1, saved.acpi_pm1.is_some()),
    ] {
        if has != state {
            let (has, saved) = if has { ("has a", "none") } else { ("has no", "one") };
            return Err(Error::Inconsistent(format!("the machine {has} {device}, and {saved} is saved")));
        }
    }
    let ram: u64 = snap.memory.iter().map(|r| r.len).sum();
    if ram != m.mem_bytes {
        return Err(Error::Inconsistent(format!("{ram} bytes of memory ranges for {} bytes of RAM", m.mem_bytes)));
    }
    Ok(())
}

/// Tells Linux that the machine has no PCI bus. Without it the kernel looks for one through
/// ports 0xcf8-0xcff (its early quirks scan of bus 0, the conf1 and conf2 checks): about 230 port
/// exits that nvmm answers with nothing, each a round trip through every KVM below at depth.
const NO_PCI: &str = "pci=off";

/// The user's command line, plus what nvmm knows of the machine that the user did not say:
/// `pci=off` (nvmm has no PCI bus), and the guest's layer when ours is known, so `nvmm check`
/// inside the guest can say which layer it runs at.
fn guest_cmdline(config: &VmConfig, host: &Host) -> String {
    with_machine_params(config.linux_cmdline(), host.layer.number())
}

fn with_machine_params(user: &str, layer: Option<u32>) -> String {
    let has = |prefix: &str| user.split_whitespace().any(|w| w.starts_with(prefix));
    let mut cmdline = user.to_string();
    if !has("pci=") {
        cmdline.push_str(&format!(" {NO_PCI}"));
    }
    if let Some(layer) = layer.filter(|_| !has(crate::host::LAYER_PARAM)) {
        cmdline.push_str(&format!(" {}={}", crate::host::LAYER_PARAM, layer + 1));
    }
    cmdline
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A state with `cpus` vCPUs, `virtio` device states and `ram` bytes of memory ranges, for a
    /// machine of 1 vCPU, one disk and 64 MiB. KVM's structs read from JSON as their bytes; an
    /// empty array is all zeros.
    fn snapshot(cpus: usize, virtio: usize, ram: u64) -> Snapshot {
        let vcpu = |id| serde_json::json!({ "id": id, "cpuid": [], "vmx_msrs": [], "sregs": [], "nested": null,
            "tsc_khz": null, "regs": [], "xsave": [], "xcrs": [], "lapic": [], "msrs": [], "mp_state": [],
            "debugregs": [], "events": [] });
        let transport = serde_json::to_value(nvmm_devices::virtio::TransportState::default()).unwrap();
        serde_json::from_value(serde_json::json!({
            "machine": { "mem_bytes": 64 << 20, "cpus": 1, "nested": false, "acpi": true,
                "disks": [{ "path": "/d.img", "read_only": false, "id": null, "size_bytes": 4096 }], "nets": [] },
            "memory": [{ "guest_addr": 0, "len": ram, "file_offset": 0 }],
            "vm": { "pic_master": [], "pic_slave": [], "ioapic": [], "pit": [], "clock": [] },
            "vcpus": (0..cpus).map(vcpu).collect::<Vec<_>>(),
            "devices": { "serial": nvmm_devices::serial::SerialPortState::default(), "i8042": {},
                "virtio": vec![transport; virtio] },
        }))
        .unwrap()
    }

    #[test]
    fn a_snapshot_that_contradicts_itself_is_refused_before_anything_is_built() {
        assert!(check_consistent(&snapshot(1, 1, 64 << 20)).is_ok());
        for (bad, what) in [
            (snapshot(2, 1, 64 << 20), "2 vCPU states for 1 vCPUs"),
            (snapshot(1, 0, 64 << 20), "0 virtio states for 1 devices"),
            (snapshot(1, 1, 32 << 20), "33554432 bytes of memory ranges for 67108864 bytes of RAM"),
        ] {
            let e = check_consistent(&bad).unwrap_err().to_string();
            assert_eq!(e, format!("the snapshot is inconsistent: {what}"));
        }
        // A PM timer's state goes with a machine that has one, and only with it.
        let mut timer_without_state = snapshot(1, 1, 64 << 20);
        timer_without_state.machine.pm_timer = true;
        let mut state_without_timer = snapshot(1, 1, 64 << 20);
        state_without_timer.devices.test_devices.pm_timer = Some(Default::default());
        for (bad, what) in
            [(timer_without_state, "the machine has a PM timer, and none is saved"), (state_without_timer, "the machine has no PM timer, and one is saved")]
        {
            assert_eq!(check_consistent(&bad).unwrap_err().to_string(), format!("the snapshot is inconsistent: {what}"));
        }
    }

    #[test]
    fn the_kernel_is_told_there_is_no_pci_and_its_layer_unless_the_user_said() {
        assert_eq!(with_machine_params("console=ttyS0", None), "console=ttyS0 pci=off");
        assert_eq!(with_machine_params("console=ttyS0", Some(1)), "console=ttyS0 pci=off nvmm.layer=2");
        assert_eq!(with_machine_params("pci=nommconf nvmm.layer=5", Some(1)), "pci=nommconf nvmm.layer=5");
    }

    #[test]
    fn the_recorded_devices_become_the_configuration_that_builds_them() {
        let mut m = snapshot(1, 1, 64 << 20).machine;
        m.nets.push(NetRecord { tap: "tap7".into(), mac: Some("52:54:00:00:00:07".into()) });
        let (disks, nets) = device_configs(&m);
        assert_eq!(disks, vec![DiskConfig { path: "/d.img".into(), read_only: false, id: None }]);
        assert_eq!(nets, vec![NetConfig { tap: "tap7".into(), mac: Some("52:54:00:00:00:07".into()) }]);
    }
}
