//! Building a VM from its configuration and running it to the end, in one readable order.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, SubscriberOps};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm};

use crate::acpi;
use crate::api::server::{self as api_server, ApiServer};
use crate::boot::{self, BootExtras, Entry};
use crate::config::VmConfig;
use crate::cpuid;
use crate::devices::{self, ConsoleInput, ExitWatcher, Subscriber};
use crate::host::Host;
use crate::kvm;
use crate::mailbox::mailbox;
use crate::memory;
use crate::mptable;
use crate::nested;
use crate::terminal::RawMode;
use crate::vcpu::{self, regs, ExitSignal, IoBuses, Vcpu, VmExit};
use crate::vm::Vm;
use crate::vmm::{self as running, Facts, Parts, Vmm};

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
    #[error("boot tables: {0}")]
    BootTables(#[source] regs::Error),
    #[error(transparent)]
    Api(#[from] api_server::Error),
    #[error(transparent)]
    Run(#[from] running::Error),
    #[error("event loop: {0}")]
    EventLoop(String),
}

/// Builds the VM described by `config`, runs it, and returns how it ended.
pub fn build_and_run(config: &VmConfig, start: Instant) -> Result<VmExit, Error> {
    // First, so a bad path fails before any work; the socket file goes when `api` is dropped.
    let mut api = config.api_socket.as_deref().map(ApiServer::bind).transpose()?;
    let kvm = kvm::open()?;
    let mem = memory::create(config.mem_bytes)?;
    let vm = Vm::create(&kvm, mem)?;
    let host = Host::real();
    if config.nested {
        nested::preflight(&host, Some(&kvm), Some(&vm.fd))?;
    }

    let kernel = boot::load_kernel(&vm.mem, &config.kernel, config.entry)?;
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(&vm.mem, &kernel, path)?),
        None => None,
    };

    let mut io = IoBuses::default();
    let legacy = devices::setup_legacy(&vm, &mut io, start, config.acpi)?;
    let virtio = crate::virtio::attach(&vm, &mut io, config)?;

    // The MP table is always there, for kernels built without ACPI; a kernel with ACPI prefers
    // the MADT. Devices are described once: in the DSDT, or on the command line.
    mptable::setup(&vm.mem, config.cpus)?;
    let multiboot = matches!(kernel.entry, Entry::Multiboot { .. });
    let rsdp = if config.acpi { Some(acpi::setup(&vm.mem, config.cpus, &virtio.windows, multiboot)?) } else { None };
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

    let vcpus = create_vcpus(&kvm, &vm, &host, config)?;
    let gdt = regs::write_boot_tables(&vm.mem, kernel.entry).map_err(Error::BootTables)?;
    vcpus[0].configure_boot(kernel.entry, &gdt)?;

    let exit = Arc::new(ExitSignal::new().map_err(|e| Error::EventLoop(e.to_string()))?);
    devices::setup_test_devices(&mut io, config, multiboot && config.acpi, exit.clone())?;
    let mut events: EventManager<Subscriber> =
        EventManager::new().map_err(|e| Error::EventLoop(format!("{e:?}")))?;
    events.add_subscriber(Arc::new(Mutex::new(ExitWatcher { signal: exit.clone(), reset: legacy.reset, power_off: legacy.power_off })));
    events.add_subscriber(Arc::new(Mutex::new(ConsoleInput::new(legacy.serial.clone()))));
    let device_loops = crate::virtio::spawn_event_loops(virtio.subscribers)?;
    let api_calls = match api.as_mut() {
        Some(server) => {
            let (mailbox, inbox) = mailbox().map_err(|e| Error::EventLoop(e.to_string()))?;
            server.start(mailbox)?;
            Some(inbox)
        }
        None => None,
    };

    let _raw = RawMode::enter();
    let io = Arc::new(io);
    let vcpus = vcpus.into_iter().map(|v| v.start(&vm.fd, io.clone(), exit.clone())).collect::<Result<_, _>>()?;
    log::debug!("VM started in {:.1} ms", start.elapsed().as_secs_f64() * 1000.0);
    let facts = Facts { cpus: config.cpus, mem_bytes: config.mem_bytes, layer: host.layer.number(), nested: config.nested, started: start };
    let vmm = Vmm::new(Parts { vm, events, exit, vcpus, devices: device_loops, disks: virtio.disks, api: api_calls, facts })?;
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
        cpuid::shape_for_vcpu(&mut cpuid, id, config.cpus, tsc_deadline);
        nested::shape_cpuid(&mut cpuid, &host.vendor, config.nested)?;
        let vcpu = Vcpu::new(&vm.fd, id)?;
        vcpu.configure(&cpuid, &msrs)?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// The user's command line, plus the guest's layer when ours is known, so `nvmm check` inside the
/// guest can say which layer it runs at.
fn guest_cmdline(config: &VmConfig, host: &Host) -> String {
    let mut cmdline = config.linux_cmdline().to_string();
    if let Some(layer) = host.layer.number() {
        if !cmdline.split_whitespace().any(|w| w.starts_with(crate::host::LAYER_PARAM)) {
            cmdline.push_str(&format!(" {}={}", crate::host::LAYER_PARAM, layer + 1));
        }
    }
    cmdline
}
