//! Attaching virtio devices over MMIO: one page and one IRQ each, queue notifications through
//! ioeventfd, interrupts through irqfd, device work on an event loop of the device's own. The
//! kernel learns about them from the ACPI DSDT (`acpi.rs`) or, without ACPI, from
//! `virtio_mmio.device=` entries on its command line; never both, or it would claim each twice.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use linux_loader::cmdline::Cmdline;
use nvmm_devices::virtio::{self, Block, BlockConfig, MmioTransport, Net, NetConfig, VirtioDevice, MMIO_LEN, QUEUE_NOTIFY};
use vm_memory::GuestAddress;

use crate::config::{self, DiskConfig};
use crate::device_loop::{self, DeviceLoop};
use crate::devices::Subscriber;
use crate::memory::layout::{VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::seccomp::ThreadKind;
use crate::vcpu::IoBuses;
use crate::vm::Vm;

/// IRQ of the first virtio device; COM1 has 4, and the IOAPIC's last pin is 23.
const FIRST_IRQ: u32 = 5;
const LAST_IRQ: u32 = 23;
/// Room for the command line while it is built; the kernel's own limit is checked at load.
const CMDLINE_CAPACITY: usize = 1 << 16;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Block(#[from] virtio::BlockError),
    #[error(transparent)]
    Net(#[from] virtio::NetError),
    #[error("too many virtio devices: {0} (at most {max})", max = LAST_IRQ - FIRST_IRQ + 1)]
    TooMany(usize),
    #[error("kernel command line: {0}")]
    Cmdline(linux_loader::cmdline::Error),
    #[error(transparent)]
    Vm(#[from] crate::vm::Error),
    #[error("device placement: {0}")]
    Bus(#[from] nvmm_devices::bus::BusError),
    #[error(transparent)]
    EventLoop(#[from] device_loop::Error),
}

/// Where a device sits in the guest's physical address space, and its IRQ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioWindow {
    pub base: u64,
    pub len: u64,
    pub irq: u32,
}

/// A device as the transport and as the event loop see it: the same object behind one mutex.
struct Opened {
    device: Arc<Mutex<dyn VirtioDevice>>,
    subscriber: Subscriber,
    kind: ThreadKind,
}

/// A block device, kept by the VMM to flush it at shutdown.
pub struct AttachedDisk {
    pub path: PathBuf,
    pub device: Arc<Mutex<Block>>,
}

/// What the VMM keeps of the virtio devices once they are on the bus.
pub struct Attached {
    /// One per device, in device order: what a snapshot saves and a restore loads.
    pub transports: Vec<Arc<Mutex<MmioTransport>>>,
    /// One event-loop subscriber per device, in device order, with the seccomp filter its
    /// thread gets.
    pub subscribers: Vec<(Subscriber, ThreadKind)>,
    pub disks: Vec<AttachedDisk>,
    /// Where the guest finds each device, in device order.
    pub windows: Vec<MmioWindow>,
}

fn open_devices(disk_configs: &[DiskConfig], nets: &[config::NetConfig], disks: &mut Vec<AttachedDisk>) -> Result<Vec<Opened>, Error> {
    let mut out = Vec::new();
    for d in disk_configs {
        let block = Arc::new(Mutex::new(Block::new(BlockConfig { path: d.path.clone(), read_only: d.read_only, id: d.id.clone() })?));
        disks.push(AttachedDisk { path: d.path.clone(), device: block.clone() });
        out.push(Opened { device: block.clone(), subscriber: block, kind: ThreadKind::Block });
    }
    for n in nets {
        let mac = n.mac.as_deref().map(virtio::parse_mac).transpose()?;
        let net = Arc::new(Mutex::new(Net::new(NetConfig { tap: n.tap.clone(), mac })?));
        out.push(Opened { device: net.clone(), subscriber: net, kind: ThreadKind::Net });
    }
    Ok(out)
}

/// Opens every disk and TAP and places them on the MMIO bus: disks first, then nets, one window
/// each in that order (a snapshot's devices are matched to their windows by it).
pub fn attach(vm: &Vm, io: &mut IoBuses, disk_configs: &[DiskConfig], nets: &[config::NetConfig]) -> Result<Attached, Error> {
    let mut disks = Vec::new();
    let devices = open_devices(disk_configs, nets, &mut disks)?;
    if devices.len() > (LAST_IRQ - FIRST_IRQ + 1) as usize {
        return Err(Error::TooMany(devices.len()));
    }
    let mut attached = Attached {
        transports: Vec::with_capacity(devices.len()),
        subscribers: Vec::with_capacity(devices.len()),
        disks,
        windows: Vec::with_capacity(devices.len()),
    };
    for (i, dev) in devices.into_iter().enumerate() {
        let window = MmioWindow { base: VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE, len: MMIO_LEN, irq: FIRST_IRQ + i as u32 };
        let transport = MmioTransport::new(vm.mem.clone(), dev.device);
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            vm.register_mmio_ioevent(evt, window.base + QUEUE_NOTIFY, queue as u32)?;
        }
        vm.register_irqfd(transport.interrupt_event(), window.irq)?;
        let transport = Arc::new(Mutex::new(transport));
        io.mmio.insert_named(window.base, window.len, &format!("virtio{i}"), transport.clone())?;
        attached.transports.push(transport);
        attached.subscribers.push((dev.subscriber, dev.kind));
        attached.windows.push(window);
    }
    Ok(attached)
}

/// `cmdline` with a `virtio_mmio.device=` entry per window, for a guest without ACPI.
pub fn cmdline_with_devices(cmdline: &str, windows: &[MmioWindow]) -> Result<String, Error> {
    let mut cl = Cmdline::try_from(cmdline, CMDLINE_CAPACITY).map_err(Error::Cmdline)?;
    for w in windows {
        cl.add_virtio_mmio_device(w.len, GuestAddress(w.base), w.irq, None).map_err(Error::Cmdline)?;
    }
    Ok(cl.as_cstring().map_err(Error::Cmdline)?.into_string().unwrap_or_default())
}

/// Runs each device's queues and backend on a thread of its own, so that one device's slow I/O (a
/// flush that waits for the disk) never holds up another device or the console. The VMM parks
/// them when it pauses the VM.
pub fn spawn_event_loops(subscribers: Vec<(Subscriber, ThreadKind)>) -> Result<Vec<DeviceLoop>, Error> {
    let mut loops = Vec::with_capacity(subscribers.len());
    for (index, (subscriber, kind)) in subscribers.into_iter().enumerate() {
        loops.push(device_loop::spawn_confined(&format!("nvmm-virtio{index}"), Some(kind), vec![subscriber])?);
    }
    Ok(loops)
}
