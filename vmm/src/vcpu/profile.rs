//! The exit profile of one vCPU: how many exits of each kind reached nvmm (port I/O and MMIO by
//! the device on the bus, halts, interrupts, shutdowns, the rest), how long nvmm took to handle
//! them, when the vCPU first entered `KVM_RUN`, and KVM's own per-vCPU statistics.
//!
//! The counters are written by the vCPU thread alone, so each update is a relaxed load and store
//! (no locked read-modify-write on the hot path); any thread may read them at any time, and a
//! read sees every update the vCPU made before it, give or take the exit in hand.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::stats::KvmStats;
use crate::cpuid::TimerFacts;
use super::IoBuses;

/// What an access no device on the bus covers is counted under.
pub const UNCLAIMED: &str = "unclaimed";

/// How many distinct unclaimed ports a profile counts one by one (the rest only in `unclaimed`).
const UNCLAIMED_PORTS: usize = 8;

/// The kinds of exit the profile counts apart from port I/O and MMIO.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `KVM_EXIT_HLT`: only a guest that halts with interrupts off (the LAPIC is in the kernel).
    Halt,
    /// `KVM_EXIT_INTR` or `KVM_RUN` returning `EINTR`: a signal or an immediate-exit request.
    Interrupt,
    /// `KVM_EXIT_SHUTDOWN`: a triple fault, which is also how `reboot=t` resets.
    Shutdown,
    /// Anything else; each of them stops the VM.
    Other,
}

/// One vCPU's counters.
pub struct ExitProfile {
    started: Instant,
    /// One counter per port I/O bus entry, in [`nvmm_devices::bus::Bus::names`] order, then one
    /// for unclaimed ports.
    pio: Box<[AtomicU64]>,
    /// The same for MMIO.
    mmio: Box<[AtomicU64]>,
    /// The first unclaimed ports accessed (port + 1; 0 for a free entry), each with its count:
    /// which device the guest looks for and nvmm lacks.
    unclaimed_ports: [(AtomicU32, AtomicU64); UNCLAIMED_PORTS],
    halts: AtomicU64,
    interrupts: AtomicU64,
    shutdowns: AtomicU64,
    others: AtomicU64,
    /// Exits handled in userspace (every `KVM_RUN` that returned an exit), and the time spent.
    handled: AtomicU64,
    handle_ns: AtomicU64,
    handle_max_ns: AtomicU64,
    /// Nanoseconds from `started` to the first `KVM_RUN`, plus one; 0 until then.
    first_run: AtomicU64,
}

/// Adds one to a counter only its vCPU thread writes.
fn bump(c: &AtomicU64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(1), Ordering::Relaxed);
}

fn zeros(n: usize) -> Box<[AtomicU64]> {
    (0..n).map(|_| AtomicU64::new(0)).collect()
}

impl ExitProfile {
    /// Counters for the devices on `io`; `started` is when nvmm started.
    pub fn new(io: &IoBuses, started: Instant) -> Self {
        Self {
            started,
            pio: zeros(io.pio.names().len() + 1),
            mmio: zeros(io.mmio.names().len() + 1),
            unclaimed_ports: std::array::from_fn(|_| (AtomicU32::new(0), AtomicU64::new(0))),
            halts: AtomicU64::new(0),
            interrupts: AtomicU64::new(0),
            shutdowns: AtomicU64::new(0),
            others: AtomicU64::new(0),
            handled: AtomicU64::new(0),
            handle_ns: AtomicU64::new(0),
            handle_max_ns: AtomicU64::new(0),
            first_run: AtomicU64::new(0),
        }
    }

    /// An access to `port`, taken by the bus entry `slot`, or by none.
    pub fn port_io(&self, port: u16, slot: Option<usize>) {
        let last = self.pio.len() - 1;
        bump(&self.pio[slot.unwrap_or(last).min(last)]);
        if slot.is_none() {
            let key = u32::from(port) + 1;
            // A short scan, on the path of accesses no device takes (rare, and already slow).
            for (p, n) in &self.unclaimed_ports {
                let held = p.load(Ordering::Relaxed);
                if held == 0 {
                    p.store(key, Ordering::Relaxed);
                }
                if held == 0 || held == key {
                    bump(n);
                    return;
                }
            }
        }
    }

    /// An MMIO access taken by the bus entry `slot`, or by none.
    pub fn mmio(&self, slot: Option<usize>) {
        let last = self.mmio.len() - 1;
        bump(&self.mmio[slot.unwrap_or(last).min(last)]);
    }

    pub fn count(&self, kind: Kind) {
        bump(match kind {
            Kind::Halt => &self.halts,
            Kind::Interrupt => &self.interrupts,
            Kind::Shutdown => &self.shutdowns,
            Kind::Other => &self.others,
        });
    }

    /// Marks the first `KVM_RUN` (later calls change nothing).
    pub fn entering(&self) {
        if self.first_run.load(Ordering::Relaxed) == 0 {
            let ns = u64::try_from(self.started.elapsed().as_nanos()).unwrap_or(u64::MAX - 1);
            self.first_run.store(ns + 1, Ordering::Relaxed);
        }
    }

    /// One exit handled in userspace, in `took`.
    pub fn handled(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        bump(&self.handled);
        self.handle_ns.store(self.handle_ns.load(Ordering::Relaxed).saturating_add(ns), Ordering::Relaxed);
        if ns > self.handle_max_ns.load(Ordering::Relaxed) {
            self.handle_max_ns.store(ns, Ordering::Relaxed);
        }
    }

    /// Time from nvmm's start to this vCPU's first `KVM_RUN`, once it has run.
    pub fn first_run(&self) -> Option<Duration> {
        self.first_run.load(Ordering::Relaxed).checked_sub(1).map(Duration::from_nanos)
    }

    /// The counters now, with the devices named from `io` and KVM's statistics if it has them.
    pub fn report(&self, id: u8, io: &IoBuses, kvm: Option<&KvmStats>, cpuid: Option<TimerFacts>) -> VcpuProfile {
        VcpuProfile {
            id,
            port_io: by_name(io.pio.names(), &self.pio),
            mmio: by_name(io.mmio.names(), &self.mmio),
            unclaimed_ports: self
                .unclaimed_ports
                .iter()
                .filter_map(|(p, n)| {
                    let port = p.load(Ordering::Relaxed).checked_sub(1)?;
                    Some((format!("{port:#x}"), n.load(Ordering::Relaxed)))
                })
                .collect(),
            halts: self.halts.load(Ordering::Relaxed),
            interrupts: self.interrupts.load(Ordering::Relaxed),
            shutdowns: self.shutdowns.load(Ordering::Relaxed),
            others: self.others.load(Ordering::Relaxed),
            userspace_exits: self.handled.load(Ordering::Relaxed),
            handle_us_total: self.handle_ns.load(Ordering::Relaxed) as f64 / 1000.0,
            handle_us_max: self.handle_max_ns.load(Ordering::Relaxed) as f64 / 1000.0,
            first_run_ms: self.first_run().map(|d| d.as_secs_f64() * 1000.0),
            kvm: kvm.map(KvmStats::read),
            cpuid,
        }
    }
}

/// Non-zero counters by device name; entries of the same name add up.
fn by_name(names: &[String], counts: &[AtomicU64]) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (i, c) in counts.iter().enumerate() {
        let n = c.load(Ordering::Relaxed);
        if n > 0 {
            let name = names.get(i).map_or(UNCLAIMED, String::as_str);
            *out.entry(name.to_string()).or_insert(0) += n;
        }
    }
    out
}

/// One vCPU's profile, as `GET /vm` and the exit log show it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VcpuProfile {
    pub id: u8,
    /// Port I/O exits by device (`serial`, `i8042`, `boot-timer`, `acpi-pm`, `unclaimed`).
    pub port_io: BTreeMap<String, u64>,
    /// MMIO exits by device (`virtio0`, `virtio1`, ..., `unclaimed`).
    pub mmio: BTreeMap<String, u64>,
    /// The first 8 distinct unclaimed ports (`0x80`) with their counts.
    pub unclaimed_ports: BTreeMap<String, u64>,
    pub halts: u64,
    pub interrupts: u64,
    pub shutdowns: u64,
    pub others: u64,
    /// Every exit that reached nvmm, and the time nvmm spent handling them (the exit's own
    /// round trip through KVM excluded).
    pub userspace_exits: u64,
    pub handle_us_total: f64,
    pub handle_us_max: f64,
    /// nvmm's start to this vCPU's first `KVM_RUN`.
    pub first_run_ms: Option<f64>,
    /// KVM's per-vCPU statistics by name (every exit, those KVM handles itself included);
    /// `null` without `KVM_GET_STATS_FD`.
    pub kvm: Option<BTreeMap<String, u64>>,
    /// What the vCPU's CPUID tells the guest about its timers (`null` if it could not be read).
    pub cpuid: Option<TimerFacts>,
}

impl VcpuProfile {
    /// Two lines for the log at exit.
    pub fn lines(&self) -> [String; 2] {
        let list = |m: &BTreeMap<String, u64>| {
            if m.is_empty() {
                "none".to_string()
            } else {
                m.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")
            }
        };
        let mean = if self.userspace_exits > 0 { self.handle_us_total / self.userspace_exits as f64 } else { 0.0 };
        let first = format!(
            "vcpu{}: {} exits to nvmm, handled in {:.1} ms (mean {:.2} us, max {:.1} us); port I/O: {}; MMIO: {}; halts {}, interrupts {}, shutdowns {}, others {}; unclaimed ports: {}",
            self.id,
            self.userspace_exits,
            self.handle_us_total / 1000.0,
            mean,
            self.handle_us_max,
            list(&self.port_io),
            list(&self.mmio),
            self.halts,
            self.interrupts,
            self.shutdowns,
            self.others,
            list(&self.unclaimed_ports)
        );
        let mut kvm = match &self.kvm {
            Some(m) => format!("vcpu{}: KVM: {}", self.id, list(m)),
            None => format!("vcpu{}: KVM: no binary statistics", self.id),
        };
        if let Some(c) = &self.cpuid {
            let khz = |v: Option<u32>| v.map_or("none".to_string(), |k| format!("{k} kHz"));
            kvm += &format!(
                "; CPUID: TSC {}, APIC bus {}, invariant TSC {}, TSC deadline {}, x2APIC {}, CPUs per package {}",
                khz(c.tsc_khz),
                khz(c.apic_bus_khz),
                c.invariant_tsc,
                c.tsc_deadline,
                c.x2apic,
                c.package_cpus.map_or("unknown".to_string(), |n| n.to_string())
            );
        }
        [first, kvm]
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use nvmm_devices::bus::BusDevice;

    use super::*;

    struct Nothing;
    impl BusDevice for Nothing {
        fn read(&mut self, _: u64, _: &mut [u8]) {}
        fn write(&mut self, _: u64, _: &[u8]) {}
    }

    #[test]
    fn counts_by_device_name_and_keeps_the_maximum() {
        let mut io = IoBuses::default();
        io.pio.insert_named(0x3f8, 8, "serial", Arc::new(Mutex::new(Nothing))).unwrap();
        io.mmio.insert_named(0xd000_0000, 0x1000, "virtio0", Arc::new(Mutex::new(Nothing))).unwrap();
        let p = ExitProfile::new(&io, Instant::now());
        p.port_io(0x3f8, Some(0));
        p.port_io(0x3f9, Some(0));
        p.port_io(0x80, None);
        p.mmio(Some(0));
        p.count(Kind::Halt);
        p.count(Kind::Interrupt);
        p.handled(Duration::from_micros(3));
        p.handled(Duration::from_micros(7));
        assert_eq!(p.first_run(), None);
        p.entering();
        let r = p.report(2, &io, None, None);
        assert_eq!(r.port_io, BTreeMap::from([("serial".into(), 2), (UNCLAIMED.into(), 1)]));
        assert_eq!(r.mmio, BTreeMap::from([("virtio0".into(), 1)]));
        assert_eq!((r.halts, r.interrupts, r.shutdowns, r.others), (1, 1, 0, 0));
        assert_eq!(r.userspace_exits, 2);
        assert_eq!((r.handle_us_total, r.handle_us_max), (10.0, 7.0));
        assert!(r.first_run_ms.is_some());
        assert_eq!(r.unclaimed_ports, BTreeMap::from([("0x80".into(), 1)]));
        assert!(r.lines()[0].contains("port I/O: serial 2, unclaimed 1; MMIO: virtio0 1"), "{}", r.lines()[0]);
        assert!(r.lines()[0].ends_with("; unclaimed ports: 0x80 1"), "{}", r.lines()[0]);
    }

    #[test]
    fn unclaimed_ports_are_counted_one_by_one_up_to_a_bound() {
        let p = ExitProfile::new(&IoBuses::default(), Instant::now());
        for port in 0..(UNCLAIMED_PORTS as u16 + 3) {
            p.port_io(port, None);
            p.port_io(0, None);
        }
        let r = p.report(0, &IoBuses::default(), None, None);
        assert_eq!(r.port_io[UNCLAIMED], 2 * (UNCLAIMED_PORTS as u64 + 3), "every access counts in the total");
        assert_eq!(r.unclaimed_ports.len(), UNCLAIMED_PORTS);
        assert_eq!(r.unclaimed_ports["0x0"], UNCLAIMED_PORTS as u64 + 4);
        assert_eq!(r.unclaimed_ports["0x7"], 1);
        assert!(!r.unclaimed_ports.contains_key("0x8"), "ports past the bound only count in the total");
    }
}
