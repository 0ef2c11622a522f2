//! Attaching virtio devices over MMIO: one page and one IRQ each, queue notifications through
//! ioeventfd, interrupts through irqfd, device work on an event loop of the device's own. The
//! kernel learns about them from `virtio_mmio.device=` entries on its command line.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use linux_loader::cmdline::Cmdline;
use nvmm_devices::virtio::{self, Block, BlockConfig, MmioTransport, Net, NetConfig, VirtioDevice, MMIO_LEN, QUEUE_NOTIFY};
use vm_memory::GuestAddress;

use crate::config::VmConfig;
use crate::device_loop::{self, DeviceLoop};
use crate::devices::Subscriber;
use crate::memory::layout::{VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
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

/// A device as the transport and as the event loop see it: the same object behind one mutex.
struct Opened {
    device: Arc<Mutex<dyn VirtioDevice>>,
    subscriber: Subscriber,
}

/// A block device, kept by the VMM to flush it at shutdown.
pub struct AttachedDisk {
    pub path: PathBuf,
    pub device: Arc<Mutex<Block>>,
}

/// What the VMM keeps of the virtio devices once they are on the bus.
pub struct Attached {
    /// One event-loop subscriber per device, in device order.
    pub subscribers: Vec<Subscriber>,
    pub disks: Vec<AttachedDisk>,
    /// The command line with the devices' `virtio_mmio.device=` entries appended.
    pub cmdline: String,
}

fn open_devices(config: &VmConfig, disks: &mut Vec<AttachedDisk>) -> Result<Vec<Opened>, Error> {
    let mut out = Vec::new();
    for d in &config.disks {
        let block = Arc::new(Mutex::new(Block::new(BlockConfig { path: d.path.clone(), read_only: d.read_only, id: d.id.clone() })?));
        disks.push(AttachedDisk { path: d.path.clone(), device: block.clone() });
        out.push(Opened { device: block.clone(), subscriber: block });
    }
    for n in &config.nets {
        let mac = n.mac.as_deref().map(virtio::parse_mac).transpose()?;
        let net = Arc::new(Mutex::new(Net::new(NetConfig { tap: n.tap.clone(), mac })?));
        out.push(Opened { device: net.clone(), subscriber: net });
    }
    Ok(out)
}

/// Opens every `--disk` and `--net` and places them on the MMIO bus.
pub fn attach(vm: &Vm, io: &mut IoBuses, config: &VmConfig, cmdline: &str) -> Result<Attached, Error> {
    let mut disks = Vec::new();
    let devices = open_devices(config, &mut disks)?;
    if devices.len() > (LAST_IRQ - FIRST_IRQ + 1) as usize {
        return Err(Error::TooMany(devices.len()));
    }
    let mut cl = Cmdline::try_from(cmdline, CMDLINE_CAPACITY).map_err(Error::Cmdline)?;
    let mut subscribers = Vec::with_capacity(devices.len());
    for (i, dev) in devices.into_iter().enumerate() {
        let base = VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE;
        let irq = FIRST_IRQ + i as u32;
        let transport = MmioTransport::new(vm.mem.clone(), dev.device);
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            vm.register_mmio_ioevent(evt, base + QUEUE_NOTIFY, queue as u32)?;
        }
        vm.register_irqfd(transport.interrupt_event(), irq)?;
        io.mmio.insert(base, MMIO_LEN, Arc::new(Mutex::new(transport)))?;
        cl.add_virtio_mmio_device(MMIO_LEN, GuestAddress(base), irq, None).map_err(Error::Cmdline)?;
        subscribers.push(dev.subscriber);
    }
    let cmdline = cl.as_cstring().map_err(Error::Cmdline)?.into_string().unwrap_or_default();
    Ok(Attached { subscribers, disks, cmdline })
}

/// Runs each device's queues and backend on a thread of its own, so that one device's slow I/O (a
/// flush that waits for the disk) never holds up another device or the console. The VMM parks
/// them when it pauses the VM.
pub fn spawn_event_loops(subscribers: Vec<Subscriber>) -> Result<Vec<DeviceLoop>, Error> {
    let mut loops = Vec::with_capacity(subscribers.len());
    for (index, subscriber) in subscribers.into_iter().enumerate() {
        loops.push(device_loop::spawn(&format!("nvmm-virtio{index}"), vec![subscriber])?);
    }
    Ok(loops)
}
