//! The vCPU's own count of VM exits, from KVM's binary statistics (`KVM_GET_STATS_FD`, Linux 5.14+).
//!
//! kvm-ioctls 0.25 has no wrapper for it, so the ioctl is made here. `nvmm bench exits` uses it to
//! tell a real exit from a measurement of something else (on a PVM host, `cpuid` at CPL 3 runs
//! natively and is answered by the hypervisor below), and `GET /vm` to report each vCPU's exits.
//! The file is opened before the vCPU thread starts: every vCPU ioctl, this one included, waits
//! for the vCPU's mutex, which a running `KVM_RUN` holds. Reading it later needs no ioctl.
//! The exit profile (`profile.rs`) reads the other per-vCPU statistics KVM names the same way, and
//! the VM's own (its fd has the same ioctl): how much guest memory KVM has mapped, by page size.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;

use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::ioctl;
use vmm_sys_util::ioctl_io_nr;

ioctl_io_nr!(KVM_GET_STATS_FD, kvm_bindings::KVMIO, 0xce);

/// The statistic [`ExitCounter`] reads: every exit KVM handles, whatever its reason.
const EXITS_STAT: &str = "exits";
/// The per-vCPU statistics the exit profile reports, when KVM has them (names as KVM spells
/// them; x86 KVM has all of these since 5.14, `nested_run` and `hypercalls` in every module).
pub const PROFILE_STATS: &[&str] = &[
    EXITS_STAT,
    "io_exits",
    "mmio_exits",
    "halt_exits",
    "irq_exits",
    "signal_exits",
    "request_irq_exits",
    "irq_window_exits",
    "nmi_window_exits",
    "hypercalls",
    "insn_emulation",
    "halt_wakeup",
    "pf_taken",
    "nested_run",
];
/// The VM-wide statistics the exit profile reports: the guest pages KVM maps now, by size (x86,
/// two-dimensional paging only). With guest RAM on huge pages (`--thp on`) most are 2 MiB.
pub const VM_PROFILE_STATS: &[&str] = &["pages_4k", "pages_2m", "pages_1g"];
/// `struct kvm_stats_header`: six u32 fields.
const HEADER_SIZE: usize = 24;
/// `struct kvm_stats_desc` without its name: flags u32, exponent i16, size u16, offset u32,
/// bucket_size u32.
const DESC_FIXED_SIZE: usize = 16;

/// Named one-value statistics of one vCPU.
pub struct KvmStats {
    file: File,
    /// Each statistic found, with the byte offset of its u64 in the stats file.
    at: Vec<(&'static str, u64)>,
}

impl KvmStats {
    /// Opens the statistics of a vCPU (or of the VM, given its fd) and finds those of `names` KVM
    /// has; `None` if it has none.
    pub fn open(kvm_fd: &impl AsRawFd, names: &[&'static str]) -> Option<KvmStats> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd (or -1), which we own.
        let fd = unsafe { ioctl(kvm_fd, KVM_GET_STATS_FD()) };
        if fd < 0 {
            return None;
        }
        // SAFETY: `fd` was just returned by the kernel and nothing else owns it.
        let file = unsafe { File::from_raw_fd(fd) };
        let mut header = [0u8; HEADER_SIZE];
        file.read_exact_at(&mut header, 0).ok()?;
        let field = |i: usize| u32::from_le_bytes([header[4 * i], header[4 * i + 1], header[4 * i + 2], header[4 * i + 3]]);
        let (name_size, num_desc, desc_offset, data_offset) = (field(1), field(2), field(4), field(5));
        let desc_size = DESC_FIXED_SIZE + name_size as usize;
        let mut descs = vec![0u8; desc_size.checked_mul(num_desc as usize)?];
        file.read_exact_at(&mut descs, u64::from(desc_offset)).ok()?;
        let at: Vec<_> = names
            .iter()
            .filter_map(|name| Some((*name, u64::from(data_offset) + u64::from(find_counter(&descs, desc_size, name)?))))
            .collect();
        log::debug!("KVM stats fd {}: {} of {} statistics found", file.as_raw_fd(), at.len(), names.len());
        (!at.is_empty()).then_some(KvmStats { file, at })
    }

    /// The current value of the statistic `name`, if KVM has it.
    pub fn get(&self, name: &str) -> Option<u64> {
        let (_, at) = self.at.iter().find(|(n, _)| *n == name)?;
        let mut v = [0u8; 8];
        self.file.read_exact_at(&mut v, *at).ok()?;
        Some(u64::from_le_bytes(v))
    }

    /// Every statistic found, by name (one that cannot be read now is left out).
    pub fn read(&self) -> BTreeMap<String, u64> {
        self.at.iter().filter_map(|(name, _)| Some((name.to_string(), self.get(name)?))).collect()
    }
}

/// One vCPU's exit counter.
pub struct ExitCounter(KvmStats);

impl ExitCounter {
    /// Opens the vCPU's statistics and finds the exit counter; `None` if KVM has neither.
    pub fn open(vcpu: &VcpuFd) -> Option<ExitCounter> {
        KvmStats::open(vcpu, &[EXITS_STAT]).map(ExitCounter)
    }

    /// The current count.
    pub fn read(&self) -> Option<u64> {
        self.0.get(EXITS_STAT)
    }
}

/// The data offset of the one-value statistic `name` among descriptors of `desc_size` bytes.
fn find_counter(descs: &[u8], desc_size: usize, name: &str) -> Option<u32> {
    descs.chunks_exact(desc_size).find_map(|d| {
        let size = u16::from_le_bytes([d[6], d[7]]);
        let offset = u32::from_le_bytes([d[8], d[9], d[10], d[11]]);
        let raw = &d[DESC_FIXED_SIZE..];
        let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
        (size == 1 && &raw[..end] == name.as_bytes()).then_some(offset)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(name: &str, size: u16, offset: u32, name_size: usize) -> Vec<u8> {
        let mut d = vec![0u8; DESC_FIXED_SIZE + name_size];
        d[6..8].copy_from_slice(&size.to_le_bytes());
        d[8..12].copy_from_slice(&offset.to_le_bytes());
        d[DESC_FIXED_SIZE..DESC_FIXED_SIZE + name.len()].copy_from_slice(name.as_bytes());
        d
    }

    #[test]
    fn finds_the_exits_counter_by_exact_name() {
        let mut descs = desc("halt_exits", 1, 0, 48);
        descs.extend(desc("exits", 1, 8, 48));
        descs.extend(desc("exits_hist", 32, 16, 48));
        assert_eq!(find_counter(&descs, DESC_FIXED_SIZE + 48, "exits"), Some(8));
        assert_eq!(find_counter(&descs, DESC_FIXED_SIZE + 48, "io_exits"), None);
    }
}
