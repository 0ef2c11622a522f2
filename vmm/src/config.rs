//! The VM's configuration as plain data, and the parsers for the values a user types.

use std::path::PathBuf;

/// Everything needed to build and boot one VM. Built by the CLI, consumed by the builder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The user's `--cmdline`, if given. A Linux kernel gets [`DEFAULT_CMDLINE`] without one, a
    /// Multiboot kernel an empty line (it would read each word as an argument of its own).
    pub cmdline: Option<String>,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Back guest RAM with transparent huge pages.
    pub thp: crate::memory::Thp,
    pub cpus: u8,
    /// Expose VMX/SVM to the guest.
    pub nested: bool,
    pub disks: Vec<DiskConfig>,
    pub nets: Vec<NetConfig>,
    /// How to enter an ELF vmlinux.
    pub entry: EntryChoice,
    /// Describe the machine with ACPI tables; without, the guest gets an MP table and its
    /// virtio devices on the command line.
    pub acpi: bool,
    /// Where to serve the control API (HTTP on a Unix socket), if anywhere.
    pub api_socket: Option<PathBuf>,
    /// Seccomp filters on every thread (off, log, on).
    pub seccomp: crate::seccomp::Mode,
    /// QEMU's isa-debug-exit on port 0xf4: a guest write of V ends nvmm with status (V << 1) | 1.
    pub debug_exit: bool,
}

impl VmConfig {
    /// The command line a Linux kernel gets, before nvmm's own additions.
    pub fn linux_cmdline(&self) -> &str {
        self.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE)
    }
}

/// `nvmm --restore DIR`: a VM saved by `PUT /vm/snapshot`, started again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RestoreConfig {
    pub dir: PathBuf,
    pub api_socket: Option<PathBuf>,
    /// Leave the VM paused (resume it through the API).
    pub paused: bool,
    /// Seccomp filters on every thread (off, log, on).
    pub seccomp: crate::seccomp::Mode,
}

/// Whether the guest should get ACPI tables: not when the user said `--no-acpi`, nor when the
/// kernel is told `acpi=off`, which would leave it with no way to find its virtio devices.
pub fn wants_acpi(no_acpi: bool, cmdline: &str) -> bool {
    !no_acpi && !cmdline.split_whitespace().any(|w| w == "acpi=off")
}

/// Entry protocol for an ELF vmlinux (a bzImage always uses the 64-bit boot protocol).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum EntryChoice {
    /// PVH when the kernel has the PVH ELF note, the 64-bit entry otherwise.
    #[default]
    Auto,
    /// PVH; an error if the kernel has no PVH note.
    Pvh,
    /// The 64-bit Linux boot protocol at the ELF entry point, even if a PVH note is present.
    #[value(name = "64bit")]
    Linux64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
    pub id: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    pub tap: String,
    pub mac: Option<String>,
}

pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 i8042.noaux i8042.nomux i8042.dumbkbd";
pub const MAX_CPUS: u8 = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("invalid size '{0}': expected a number with an optional K, M, G or T suffix (bare numbers are MiB)")]
    Size(String),
    #[error("--mem {0} is not a whole number of {1}-byte pages (KVM maps guest RAM by the page)")]
    Unaligned(String, u64),
    #[error("invalid --disk '{0}': {1}")]
    Disk(String, String),
    #[error("invalid --net '{0}': {1}")]
    Net(String, String),
}

/// Parses a memory size. A bare number is MiB (as Firecracker's `mem_size_mib`); K/M/G/T suffixes
/// (optionally followed by `iB` or `B`) are binary multiples.
pub fn parse_size(s: &str) -> Result<u64, Error> {
    let err = || Error::Size(s.to_string());
    let t = s.trim();
    let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits_end);
    let n: u64 = num.parse().map_err(|_| err())?;
    let shift = match unit.trim_end_matches("iB").trim_end_matches('B') {
        "" | "M" | "m" => 20,
        "K" | "k" => 10,
        "G" | "g" => 30,
        "T" | "t" => 40,
        _ => return Err(err()),
    };
    n.checked_mul(1u64 << shift).filter(|&v| v > 0).ok_or_else(err)
}

/// Parses `--mem`: a size (see [`parse_size`]) that is a whole number of host pages, which is
/// all KVM_SET_USER_MEMORY_REGION accepts.
pub fn parse_mem(s: &str) -> Result<u64, Error> {
    let bytes = parse_size(s)?;
    let page = host_page_size();
    if bytes % page != 0 {
        return Err(Error::Unaligned(s.to_string(), page));
    }
    Ok(bytes)
}

/// The host's page size; 4 KiB if sysconf cannot say.
pub fn host_page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the system and touches no memory of ours.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(n).ok().filter(|&n| n > 0).unwrap_or(4096)
}

/// Splits `key=value,key=value` option strings.
fn options(s: &str) -> Vec<(&str, &str)> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect()
}

fn on_off(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" | "1" | "" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Parses `path=FILE[,readonly=on][,id=NAME]`.
pub fn parse_disk(s: &str) -> Result<DiskConfig, Error> {
    let err = |m: &str| Error::Disk(s.to_string(), m.to_string());
    let (mut path, mut read_only, mut id) = (None, false, None);
    for (k, v) in options(s) {
        match k {
            "path" if !v.is_empty() => path = Some(PathBuf::from(v)),
            "readonly" | "ro" => read_only = on_off(v).ok_or_else(|| err("readonly takes on or off"))?,
            "id" if v.len() <= 20 && !v.is_empty() => id = Some(v.to_string()),
            "id" => return Err(err("id must be 1 to 20 bytes (virtio-blk serial)")),
            _ => return Err(err(&format!("unknown or empty option '{k}'"))),
        }
    }
    let path = path.ok_or_else(|| err("path=FILE is required"))?;
    Ok(DiskConfig { path, read_only, id })
}

/// Parses `tap=NAME[,mac=MAC]`. The MAC and the name's length are checked by the net device.
pub fn parse_net(s: &str) -> Result<NetConfig, Error> {
    let err = |m: &str| Error::Net(s.to_string(), m.to_string());
    let (mut tap, mut mac) = (None, None);
    for (k, v) in options(s) {
        match k {
            "tap" if !v.is_empty() => tap = Some(v.to_string()),
            "mac" if !v.is_empty() => mac = Some(v.to_string()),
            _ => return Err(err(&format!("unknown or empty option '{k}'"))),
        }
    }
    Ok(NetConfig { tap: tap.ok_or_else(|| err("tap=NAME is required"))?, mac })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256"), Ok(256 << 20));
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("512k"), Ok(512 << 10));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        for bad in ["", "0", "M", "12X", "-1", "1.5G", "99999999999999999999G", "16777216T"] {
            assert_eq!(parse_size(bad), Err(Error::Size(bad.into())), "{bad}");
        }
    }

    #[test]
    fn memory_must_be_whole_pages() {
        assert_eq!(parse_mem("256M"), Ok(256 << 20));
        assert_eq!(parse_mem("8K"), Ok(8 << 10));
        assert_eq!(parse_mem("1025K"), Err(Error::Unaligned("1025K".into(), host_page_size())));
        assert!(Error::Unaligned("1025K".into(), 4096).to_string().contains("4096-byte pages"));
        assert_eq!(parse_mem("0"), Err(Error::Size("0".into())));
    }

    #[test]
    fn disks() {
        let d = parse_disk("path=/a.img,readonly=on,id=root").unwrap();
        assert_eq!(d, DiskConfig { path: "/a.img".into(), read_only: true, id: Some("root".into()) });
        assert!(!parse_disk("path=/a.img").unwrap().read_only);
        assert!(parse_disk("readonly=on").is_err());
        assert!(parse_disk("path=/a,readonly=maybe").is_err());
        assert!(parse_disk("path=/a,id=123456789012345678901").is_err());
        assert!(parse_disk("path=/a,bogus=1").is_err());
    }

    #[test]
    fn acpi_unless_refused() {
        assert!(wants_acpi(false, DEFAULT_CMDLINE));
        assert!(!wants_acpi(true, DEFAULT_CMDLINE));
        assert!(!wants_acpi(false, "console=ttyS0 acpi=off"));
        assert!(wants_acpi(false, "console=ttyS0 acpi=force noacpi=off"));
    }

    #[test]
    fn nets() {
        assert_eq!(
            parse_net("tap=tap0,mac=02:00:00:00:00:01").unwrap(),
            NetConfig { tap: "tap0".into(), mac: Some("02:00:00:00:00:01".into()) }
        );
        assert!(parse_net("mac=02:00:00:00:00:01").is_err());
        assert!(parse_net("tap=").is_err());
    }
}
