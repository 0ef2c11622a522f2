//! Facts about the host nvmm runs on: CPU vendor and flags, the loaded KVM module and its
//! `nested` parameter, the device nodes nvmm uses, and the virtualization layer we are at.
//!
//! Files are read through [`HostFs`], a root path ("/" on a real host), so tests can point it at
//! a fake tree. Nothing here panics on host input: a missing or unreadable file is a fact
//! ("unknown", "missing"), never an error.
//!
//! # The layer
//! L0 is bare metal: `/proc/cpuinfo` has no `hypervisor` flag and CPUID leaf 1 has no
//! hypervisor bit. Anything else is a guest, "L1+" unless the kernel command line says more:
//! nvmm puts `nvmm.layer=N` on the command line of the guests it boots (N = its own layer + 1,
//! so an nvmm on bare metal boots its guests with `nvmm.layer=1`). The kernel ignores the
//! parameter and leaves it in `/proc/cmdline`, where [`Host::probe`] reads it. nvmm guests show
//! KVM's CPUID signature ("KVMKVMKVM"), so without that parameter an nvmm guest cannot be told
//! from any other KVM guest.

use std::fmt;
use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

use serde::{Serialize, Serializer};

/// CPU description, with one `flags` line per CPU.
pub const PROC_CPUINFO: &str = "/proc/cpuinfo";
/// The kernel command line, where nvmm's `nvmm.layer=N` is looked for.
pub const PROC_CMDLINE: &str = "/proc/cmdline";
/// The KVM device node.
pub const DEV_KVM: &str = "/dev/kvm";
/// The TUN/TAP clone device, needed for TAP networking.
pub const DEV_TUN: &str = "/dev/net/tun";
/// The vhost-net device (nvmm does not use it; reported for information).
pub const DEV_VHOST_NET: &str = "/dev/vhost-net";
/// The host's transparent huge page setting: `always`, `madvise` or `never`, the bracketed one.
pub const SYS_THP_ENABLED: &str = "/sys/kernel/mm/transparent_hugepage/enabled";
/// Kernel command-line parameter naming the layer of an nvmm guest (see the module docs).
pub const LAYER_PARAM: &str = "nvmm.layer";

/// CPUID leaf 0: vendor string in EBX, EDX, ECX.
const CPUID_LEAF_VENDOR: u32 = 0;
/// CPUID leaf 1: feature flags.
const CPUID_LEAF_FEATURES: u32 = 1;
/// Leaf 1 ECX bit 31: set by hypervisors for their guests, never by hardware.
const CPUID_1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID leaf 0x4000_0000: the hypervisor's signature in EBX, ECX, EDX (only with bit 31 above).
const CPUID_LEAF_HYPERVISOR: u32 = 0x4000_0000;

/// The CPU vendor, as far as virtualization cares.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Vendor {
    /// "GenuineIntel": VMX, `kvm_intel`.
    Intel,
    /// "AuthenticAMD", and Hygon's "HygonGenuine" (an AMD licensee): SVM, `kvm_amd`.
    Amd,
    /// Any other vendor string, as read.
    Other(String),
}

impl Vendor {
    /// Reads the vendor from CPUID leaf 0 of the CPU we run on.
    pub fn detect() -> Vendor {
        let r = core::arch::x86_64::__cpuid(CPUID_LEAF_VENDOR);
        Vendor::from_cpuid_regs(r.ebx, r.edx, r.ecx)
    }

    /// Builds the vendor from CPUID leaf 0's registers (the string is EBX, EDX, ECX in that order).
    pub fn from_cpuid_regs(ebx: u32, edx: u32, ecx: u32) -> Vendor {
        Vendor::from_id(&regs_to_string(&[ebx, edx, ecx]))
    }

    /// Parses a 12-character vendor id such as "AuthenticAMD" (also `vendor_id` in /proc/cpuinfo).
    pub fn from_id(id: &str) -> Vendor {
        match id.trim() {
            "GenuineIntel" => Vendor::Intel,
            "AuthenticAMD" | "HygonGenuine" => Vendor::Amd,
            other => Vendor::Other(other.to_string()),
        }
    }

    /// The KVM module that serves this vendor's hardware virtualization.
    pub fn kvm_module(&self) -> Option<KvmModule> {
        match self {
            Vendor::Intel => Some(KvmModule::Intel),
            Vendor::Amd => Some(KvmModule::Amd),
            Vendor::Other(_) => None,
        }
    }

    /// The /proc/cpuinfo flag of this vendor's hardware virtualization: "vmx" or "svm".
    pub fn virt_flag(&self) -> Option<&'static str> {
        match self {
            Vendor::Intel => Some("vmx"),
            Vendor::Amd => Some("svm"),
            Vendor::Other(_) => None,
        }
    }
}

impl fmt::Display for Vendor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Vendor::Intel => f.write_str("Intel"),
            Vendor::Amd => f.write_str("AMD"),
            Vendor::Other(id) => f.write_str(id),
        }
    }
}

impl Serialize for Vendor {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Little-endian register bytes as text, trailing NULs dropped.
fn regs_to_string(regs: &[u32]) -> String {
    let bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_le_bytes()).collect();
    String::from_utf8_lossy(&bytes)
        .trim_end_matches('\0')
        .to_string()
}

/// What CPUID says about the CPU we run on; [`CpuFacts::detect`] reads it, tests build it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuFacts {
    /// CPUID leaf 0.
    pub vendor: Vendor,
    /// CPUID leaf 0x4000_0000 signature (e.g. "KVMKVMKVM"), read only when leaf 1 ECX bit 31
    /// says a hypervisor is present; `None` on bare metal.
    pub hypervisor_signature: Option<String>,
}

impl CpuFacts {
    /// Reads the vendor and the hypervisor signature with the CPUID instruction.
    pub fn detect() -> CpuFacts {
        let features = core::arch::x86_64::__cpuid(CPUID_LEAF_FEATURES);
        let hypervisor_signature = if features.ecx & CPUID_1_ECX_HYPERVISOR != 0 {
            let r = core::arch::x86_64::__cpuid(CPUID_LEAF_HYPERVISOR);
            Some(regs_to_string(&[r.ebx, r.ecx, r.edx])).filter(|s| !s.is_empty())
        } else {
            None
        };
        CpuFacts {
            vendor: Vendor::detect(),
            hypervisor_signature,
        }
    }
}

/// The virtualization flags of the first `flags` line of /proc/cpuinfo.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct CpuFlags {
    /// Intel VMX, usable by KVM (Linux hides it when the firmware locks VMX off).
    pub vmx: bool,
    /// AMD SVM.
    pub svm: bool,
    /// We are a guest of some hypervisor.
    pub hypervisor: bool,
}

impl CpuFlags {
    /// Parses /proc/cpuinfo text; `None` when it has no `flags` line.
    pub fn parse_cpuinfo(text: &str) -> Option<CpuFlags> {
        let line = text
            .lines()
            .find(|l| l.split(':').next().is_some_and(|key| key.trim() == "flags"))?;
        let (_, flags) = line.split_once(':')?;
        let mut out = CpuFlags::default();
        for flag in flags.split_whitespace() {
            match flag {
                "vmx" => out.vmx = true,
                "svm" => out.svm = true,
                "hypervisor" => out.hypervisor = true,
                _ => {}
            }
        }
        Some(out)
    }

    /// Whether the flag named by [`Vendor::virt_flag`] (or either, for another vendor) is set.
    pub fn has_virt(&self, vendor: &Vendor) -> bool {
        match vendor {
            Vendor::Intel => self.vmx,
            Vendor::Amd => self.svm,
            Vendor::Other(_) => self.vmx || self.svm,
        }
    }
}

/// Which KVM vendor module serves /dev/kvm (only one can be loaded at a time).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvmModule {
    /// `kvm_intel`: hardware VMX.
    Intel,
    /// `kvm_amd`: hardware SVM.
    Amd,
    /// `kvm_pvm`: PVM, a software KVM (shadow paging, no VMX/SVM, no nested virtualization).
    Pvm,
    /// None of them is in /sys/module.
    None,
}

impl KvmModule {
    /// Every module, in the order they are looked for.
    const ALL: [KvmModule; 3] = [KvmModule::Intel, KvmModule::Amd, KvmModule::Pvm];

    /// The module's name ("none" for [`KvmModule::None`]).
    pub fn name(self) -> &'static str {
        match self {
            KvmModule::Intel => "kvm_intel",
            KvmModule::Amd => "kvm_amd",
            KvmModule::Pvm => "kvm_pvm",
            KvmModule::None => "none",
        }
    }

    /// The sysfs file of the module's `nested` parameter (only kvm_intel and kvm_amd have one).
    pub fn nested_param_path(self) -> Option<String> {
        match self {
            KvmModule::Intel | KvmModule::Amd => {
                Some(format!("/sys/module/{}/parameters/nested", self.name()))
            }
            KvmModule::Pvm | KvmModule::None => None,
        }
    }

    fn sysfs_dir(self) -> String {
        format!("/sys/module/{}", self.name())
    }
}

impl fmt::Display for KvmModule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Serialize for KvmModule {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

/// Whether a device node can be opened read-write.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "error", rename_all = "snake_case")]
pub enum DeviceAccess {
    /// Opened read-write.
    ReadWrite,
    /// The node does not exist.
    Missing,
    /// The node exists but could not be opened read-write; the OS error text.
    NoAccess(String),
}

/// How deep in a stack of hypervisors we run; see the module docs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Layer {
    /// Bare metal: no sign of a hypervisor.
    L0,
    /// A guest.
    Guest {
        /// From `nvmm.layer=N` on the kernel command line (set by nvmm when it boots a guest);
        /// `None`: a guest at an unknown depth, L1 or deeper.
        level: Option<u32>,
        /// The hypervisor's CPUID signature, e.g. "KVMKVMKVM" (nvmm shows KVM's).
        signature: Option<String>,
    },
}

impl Layer {
    /// Decides the layer from the cpuinfo flags, the CPUID signature and the kernel command line.
    pub fn detect(
        flags: Option<&CpuFlags>,
        signature: Option<&str>,
        cmdline: Option<&str>,
    ) -> Layer {
        let level = cmdline.and_then(parse_layer_param);
        let flagged = flags.is_some_and(|f| f.hypervisor) || signature.is_some();
        if level.is_none() && !flagged {
            return Layer::L0;
        }
        Layer::Guest {
            level,
            signature: signature.map(str::to_string),
        }
    }

    /// The layer number when known: 0 on bare metal, N from `nvmm.layer=N`.
    pub fn number(&self) -> Option<u32> {
        match self {
            Layer::L0 => Some(0),
            Layer::Guest { level, .. } => *level,
        }
    }

    /// Whether the command line says nvmm booted us (`nvmm.layer=N` present).
    pub fn booted_by_nvmm(&self) -> bool {
        matches!(self, Layer::Guest { level: Some(_), .. })
    }
}

impl fmt::Display for Layer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layer::L0 => f.write_str("L0 (bare metal)"),
            Layer::Guest { level, signature } => {
                match level {
                    Some(n) => write!(f, "L{n} (nvmm guest, {LAYER_PARAM}={n}")?,
                    None => f.write_str("L1+ (guest")?,
                }
                match signature {
                    Some(sig) => write!(f, "; hypervisor signature \"{sig}\")"),
                    None => f.write_str(")"),
                }
            }
        }
    }
}

/// Finds `nvmm.layer=N` (N >= 1) among the kernel's own parameters (those before `--`).
fn parse_layer_param(cmdline: &str) -> Option<u32> {
    cmdline
        .split_whitespace()
        .take_while(|word| *word != "--")
        .filter_map(|word| word.strip_prefix(LAYER_PARAM)?.strip_prefix('='))
        .filter_map(|n| n.parse::<u32>().ok())
        .filter(|n| *n >= 1)
        .last()
}

/// Parses a boolean module parameter: "1"/"Y" on, "0"/"N" off, anything else unknown.
fn parse_param_bool(text: &str) -> Option<bool> {
    match text.trim() {
        "1" | "Y" | "y" => Some(true),
        "0" | "N" | "n" => Some(false),
        _ => None,
    }
}

/// The host's files, under a root directory ("/" on a real host).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostFs {
    root: PathBuf,
}

impl Default for HostFs {
    fn default() -> Self {
        HostFs::real()
    }
}

impl HostFs {
    /// The real host: root "/".
    pub fn real() -> HostFs {
        HostFs::at("/")
    }

    /// A tree rooted at `root` (a fake host in tests).
    pub fn at(root: impl Into<PathBuf>) -> HostFs {
        HostFs { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the absolute host path `abs` (e.g. "/dev/kvm") is under the root.
    pub fn path(&self, abs: &str) -> PathBuf {
        self.root.join(abs.trim_start_matches('/'))
    }

    /// The file's text, or `None` if it is missing or unreadable.
    pub fn read(&self, abs: &str) -> Option<String> {
        std::fs::read(self.path(abs))
            .ok()
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
    }

    /// Whether `abs` is a directory.
    pub fn is_dir(&self, abs: &str) -> bool {
        self.path(abs).is_dir()
    }

    /// Tries to open `abs` read-write (and closes it again).
    pub fn device_access(&self, abs: &str) -> DeviceAccess {
        match OpenOptions::new()
            .read(true)
            .write(true)
            .open(self.path(abs))
        {
            Ok(_) => DeviceAccess::ReadWrite,
            Err(e) if e.kind() == io::ErrorKind::NotFound => DeviceAccess::Missing,
            Err(e) => DeviceAccess::NoAccess(e.to_string()),
        }
    }
}

/// Everything nvmm wants to know about the host, read once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Host {
    /// Where the facts were read from; KVM is opened at `fs.path(DEV_KVM)`.
    pub fs: HostFs,
    /// CPU vendor (CPUID leaf 0).
    pub vendor: Vendor,
    /// Flags from /proc/cpuinfo; `None` if it is unreadable or has no `flags` line.
    pub cpu_flags: Option<CpuFlags>,
    /// The KVM vendor module in /sys/module.
    pub kvm_module: KvmModule,
    /// The `nested` parameter of kvm_intel/kvm_amd; `None` if no such module or unreadable.
    pub nested_param: Option<bool>,
    /// /dev/kvm.
    pub dev_kvm: DeviceAccess,
    /// /dev/net/tun.
    pub dev_tun: DeviceAccess,
    /// /dev/vhost-net.
    pub dev_vhost_net: DeviceAccess,
    /// Where in a stack of hypervisors we are.
    pub layer: Layer,
    /// The transparent huge page setting (`always`, `madvise`, `never`); `None` without THP.
    pub thp: Option<String>,
}

/// The bracketed word of a `transparent_hugepage/enabled` file: "always [madvise] never".
pub fn parse_thp_mode(text: &str) -> Option<String> {
    let start = text.find('[')? + 1;
    let end = start + text[start..].find(']')?;
    Some(text[start..end].to_string())
}

impl Host {
    /// Probes the real host.
    pub fn real() -> Host {
        Host::probe(HostFs::real(), CpuFacts::detect())
    }

    /// Probes the tree under `fs`, with CPUID facts given by the caller.
    pub fn probe(fs: HostFs, cpu: CpuFacts) -> Host {
        let cpu_flags = fs
            .read(PROC_CPUINFO)
            .and_then(|t| CpuFlags::parse_cpuinfo(&t));
        // A kernel may have both vendor modules built in (the lab's does), and both then show in
        // /sys/module; the one matching the CPU is the one that works.
        let kvm_module = cpu
            .vendor
            .kvm_module()
            .into_iter()
            .chain(KvmModule::ALL)
            .find(|m| fs.is_dir(&m.sysfs_dir()))
            .unwrap_or(KvmModule::None);
        let nested_param = kvm_module
            .nested_param_path()
            .and_then(|p| fs.read(&p))
            .and_then(|t| parse_param_bool(&t));
        let cmdline = fs.read(PROC_CMDLINE);
        let layer = Layer::detect(
            cpu_flags.as_ref(),
            cpu.hypervisor_signature.as_deref(),
            cmdline.as_deref(),
        );
        Host {
            vendor: cpu.vendor,
            cpu_flags,
            kvm_module,
            nested_param,
            dev_kvm: fs.device_access(DEV_KVM),
            dev_tun: fs.device_access(DEV_TUN),
            dev_vhost_net: fs.device_access(DEV_VHOST_NET),
            layer,
            thp: fs.read(SYS_THP_ENABLED).and_then(|t| parse_thp_mode(&t)),
            fs,
        }
    }
}

/// Builds fake host trees in a temporary directory, for this crate's tests.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A fake host root, removed on drop.
    pub struct FakeHost {
        pub root: PathBuf,
    }

    /// cpuinfo `flags` lines as an AMD EPYC guest with SVM shows them.
    pub const AMD_FLAGS: &str = "fpu vme msr pae cx8 apic syscall nx lm cx16 hypervisor svm npt";
    /// The same for an Intel guest with VMX.
    pub const INTEL_FLAGS: &str = "fpu vme msr pae cx8 apic syscall nx lm cx16 hypervisor vmx ept";

    impl FakeHost {
        /// An empty tree.
        pub fn empty() -> FakeHost {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let root =
                std::env::temp_dir().join(format!("nvmm-fakehost-{}-{n}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            std::fs::create_dir_all(&root).expect("create fake host root");
            FakeHost { root }
        }

        /// A healthy host of `vendor` with nested on: cpuinfo flags, kvm_amd/kvm_intel with
        /// nested=1 (written as Y for Intel, as the kernel does), /dev/kvm and /dev/net/tun.
        pub fn nested_ready(vendor: &Vendor) -> FakeHost {
            let host = FakeHost::empty();
            let (id, flags, module, nested) = match vendor {
                Vendor::Intel => ("GenuineIntel", INTEL_FLAGS, "kvm_intel", "Y"),
                _ => ("AuthenticAMD", AMD_FLAGS, "kvm_amd", "1"),
            };
            host.file(
                PROC_CPUINFO,
                &format!("processor\t: 0\nvendor_id\t: {id}\nflags\t\t: {flags}\n\n"),
            );
            host.file(
                &format!("/sys/module/{module}/parameters/nested"),
                &format!("{nested}\n"),
            );
            host.file(DEV_KVM, "");
            host.file(DEV_TUN, "");
            host.file(PROC_CMDLINE, "console=ttyS0 quiet\n");
            host.file(SYS_THP_ENABLED, "always [madvise] never\n");
            host
        }

        /// Writes a file (creating parents).
        pub fn file(&self, abs: &str, text: &str) -> &FakeHost {
            let p = self.fs().path(abs);
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir).expect("create fake dir");
            }
            std::fs::write(&p, text).expect("write fake file");
            self
        }

        /// Creates a directory.
        pub fn dir(&self, abs: &str) -> &FakeHost {
            std::fs::create_dir_all(self.fs().path(abs)).expect("create fake dir");
            self
        }

        /// Removes a file or directory tree.
        pub fn remove(&self, abs: &str) -> &FakeHost {
            let p = self.fs().path(abs);
            if p.is_dir() {
                std::fs::remove_dir_all(&p).expect("remove fake dir");
            } else {
                std::fs::remove_file(&p).expect("remove fake file");
            }
            self
        }

        pub fn fs(&self) -> HostFs {
            HostFs::at(&self.root)
        }

        /// Probes the tree as a host of `vendor`, a guest of KVM.
        pub fn probe(&self, vendor: Vendor) -> Host {
            Host::probe(
                self.fs(),
                CpuFacts {
                    vendor,
                    hypervisor_signature: Some("KVMKVMKVM".to_string()),
                },
            )
        }
    }

    impl Drop for FakeHost {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::*;
    use super::*;

    #[test]
    fn vendor_from_id_and_regs() {
        assert_eq!(Vendor::from_id("GenuineIntel"), Vendor::Intel);
        assert_eq!(Vendor::from_id("AuthenticAMD"), Vendor::Amd);
        assert_eq!(Vendor::from_id("HygonGenuine"), Vendor::Amd);
        assert_eq!(
            Vendor::from_id("CentaurHauls"),
            Vendor::Other("CentaurHauls".into())
        );
        // "AuthenticAMD" as CPUID leaf 0 returns it: EBX "Auth", EDX "enti", ECX "cAMD".
        let (ebx, edx, ecx) = (0x6874_7541, 0x6974_6e65, 0x444d_4163);
        assert_eq!(Vendor::from_cpuid_regs(ebx, edx, ecx), Vendor::Amd);
        // "GenuineIntel": EBX "Genu", EDX "ineI", ECX "ntel".
        let (ebx, edx, ecx) = (0x756e_6547, 0x4965_6e69, 0x6c65_746e);
        assert_eq!(Vendor::from_cpuid_regs(ebx, edx, ecx), Vendor::Intel);
        assert_eq!(Vendor::Amd.to_string(), "AMD");
        assert_eq!(serde_json::to_string(&Vendor::Intel).unwrap(), "\"Intel\"");
    }

    #[test]
    fn vendor_maps_to_module_and_flag() {
        assert_eq!(Vendor::Intel.kvm_module(), Some(KvmModule::Intel));
        assert_eq!(Vendor::Amd.virt_flag(), Some("svm"));
        assert_eq!(Vendor::Other("x".into()).kvm_module(), None);
    }

    #[test]
    fn signature_from_regs_drops_nuls() {
        // "KVMKVMKVM\0\0\0" as leaf 0x4000_0000 returns it in EBX, ECX, EDX.
        let s = regs_to_string(&[0x4b4d_564b, 0x564b_4d56, 0x0000_004d]);
        assert_eq!(s, "KVMKVMKVM");
    }

    #[test]
    fn cpuinfo_flags() {
        let text = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu svm hypervisor\n\n\
                    processor\t: 1\nflags\t\t: fpu\n";
        let f = CpuFlags::parse_cpuinfo(text).unwrap();
        assert_eq!(
            f,
            CpuFlags {
                vmx: false,
                svm: true,
                hypervisor: true
            }
        );
        assert!(f.has_virt(&Vendor::Amd));
        assert!(!f.has_virt(&Vendor::Intel));
        // "vmx flags" (a later kernel line) must not be taken for "flags".
        let f = CpuFlags::parse_cpuinfo("vmx flags\t: ept vpid\nflags\t: vmx\n").unwrap();
        assert!(f.vmx && !f.hypervisor);
        assert_eq!(CpuFlags::parse_cpuinfo("processor: 0\n"), None);
        assert_eq!(CpuFlags::parse_cpuinfo(""), None);
    }

    #[test]
    fn layer_param_parsing() {
        assert_eq!(
            parse_layer_param("console=ttyS0 nvmm.layer=2 quiet"),
            Some(2)
        );
        assert_eq!(parse_layer_param("nvmm.layer=1 nvmm.layer=3"), Some(3));
        assert_eq!(parse_layer_param("nvmm.layer=0"), None);
        assert_eq!(parse_layer_param("nvmm.layer=x nvmm.layers=2"), None);
        // After "--" the words belong to init, not to the kernel.
        assert_eq!(parse_layer_param("quiet -- nvmm.layer=2"), None);
    }

    #[test]
    fn layer_detection() {
        let bare = CpuFlags::default();
        let guest = CpuFlags {
            hypervisor: true,
            ..CpuFlags::default()
        };
        assert_eq!(Layer::detect(Some(&bare), None, Some("quiet")), Layer::L0);
        assert_eq!(Layer::detect(None, None, None), Layer::L0);
        let l = Layer::detect(Some(&guest), Some("KVMKVMKVM"), Some("quiet"));
        assert_eq!(
            l.to_string(),
            "L1+ (guest; hypervisor signature \"KVMKVMKVM\")"
        );
        assert_eq!(l.number(), None);
        assert!(!l.booted_by_nvmm());
        let l = Layer::detect(Some(&guest), Some("KVMKVMKVM"), Some("nvmm.layer=2"));
        assert_eq!(l.number(), Some(2));
        assert!(l.booted_by_nvmm());
        assert_eq!(
            l.to_string(),
            "L2 (nvmm guest, nvmm.layer=2; hypervisor signature \"KVMKVMKVM\")"
        );
        // The signature alone (cpuinfo unreadable) is enough to be a guest.
        let l = Layer::detect(None, Some("TCGTCGTCGTCG"), None);
        assert!(matches!(l, Layer::Guest { level: None, .. }));
        let l = Layer::detect(Some(&guest), None, None);
        assert_eq!(l.to_string(), "L1+ (guest)");
        assert_eq!(
            serde_json::to_value(Layer::L0).unwrap(),
            serde_json::json!({"kind": "l0"})
        );
    }

    #[test]
    fn param_bool() {
        assert_eq!(parse_param_bool("1\n"), Some(true));
        assert_eq!(parse_param_bool("Y\n"), Some(true));
        assert_eq!(parse_param_bool("N\n"), Some(false));
        assert_eq!(parse_param_bool("0"), Some(false));
        assert_eq!(parse_param_bool(""), None);
    }

    #[test]
    fn probe_healthy_amd_tree() {
        let t = FakeHost::nested_ready(&Vendor::Amd);
        let h = t.probe(Vendor::Amd);
        assert_eq!(h.kvm_module, KvmModule::Amd);
        assert_eq!(h.nested_param, Some(true));
        assert_eq!(h.dev_kvm, DeviceAccess::ReadWrite);
        assert_eq!(h.dev_tun, DeviceAccess::ReadWrite);
        assert_eq!(h.dev_vhost_net, DeviceAccess::Missing);
        assert!(h.cpu_flags.unwrap().svm);
        assert!(matches!(h.layer, Layer::Guest { level: None, .. }));
    }

    #[test]
    fn both_vendor_modules_built_in_picks_the_cpus_own() {
        let t = FakeHost::nested_ready(&Vendor::Amd);
        t.dir("/sys/module/kvm_intel/parameters");
        t.file("/sys/module/kvm_intel/parameters/nested", "Y\n");
        assert_eq!(t.probe(Vendor::Amd).kvm_module, KvmModule::Amd);
        let t = FakeHost::nested_ready(&Vendor::Intel);
        t.dir("/sys/module/kvm_amd/parameters");
        assert_eq!(t.probe(Vendor::Intel).kvm_module, KvmModule::Intel);
    }

    #[test]
    fn probe_healthy_intel_tree() {
        let t = FakeHost::nested_ready(&Vendor::Intel);
        let h = t.probe(Vendor::Intel);
        assert_eq!(h.kvm_module, KvmModule::Intel);
        assert_eq!(h.nested_param, Some(true));
        assert!(h.cpu_flags.unwrap().vmx);
    }

    #[test]
    fn probe_pvm_tree() {
        let t = FakeHost::empty();
        t.file(PROC_CPUINFO, "flags\t: fpu hypervisor\n")
            .dir("/sys/module/kvm_pvm/parameters")
            .file(DEV_KVM, "")
            .file(PROC_CMDLINE, "console=ttyS0 nvmm.layer=3\n");
        let h = t.probe(Vendor::Amd);
        assert_eq!(h.kvm_module, KvmModule::Pvm);
        assert_eq!(h.nested_param, None);
        assert_eq!(h.layer.number(), Some(3));
    }

    #[test]
    fn probe_empty_tree_does_not_panic() {
        let t = FakeHost::empty();
        let h = t.probe(Vendor::Other("Weird".into()));
        assert_eq!(h.kvm_module, KvmModule::None);
        assert_eq!(h.cpu_flags, None);
        assert_eq!(h.nested_param, None);
        assert_eq!(h.dev_kvm, DeviceAccess::Missing);
        // A signature was given, so this is a guest even without cpuinfo.
        assert!(matches!(h.layer, Layer::Guest { .. }));
    }

    #[test]
    fn device_that_cannot_be_opened() {
        // Root can open any regular file, so a directory stands in for an unopenable node.
        let t = FakeHost::empty();
        t.dir(DEV_KVM);
        match t.fs().device_access(DEV_KVM) {
            DeviceAccess::NoAccess(e) => assert!(e.contains("directory"), "{e}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn nested_param_unreadable_is_unknown() {
        let t = FakeHost::nested_ready(&Vendor::Amd);
        t.file("/sys/module/kvm_amd/parameters/nested", "maybe\n");
        assert_eq!(t.probe(Vendor::Amd).nested_param, None);
        t.remove("/sys/module/kvm_amd/parameters/nested");
        assert_eq!(t.probe(Vendor::Amd).nested_param, None);
        t.file("/sys/module/kvm_amd/parameters/nested", "0\n");
        assert_eq!(t.probe(Vendor::Amd).nested_param, Some(false));
    }

    #[test]
    fn hostfs_paths() {
        let fs = HostFs::at("/tmp/x");
        assert_eq!(fs.path("/dev/kvm"), PathBuf::from("/tmp/x/dev/kvm"));
        assert_eq!(HostFs::real().path(DEV_KVM), PathBuf::from("/dev/kvm"));
        assert_eq!(
            KvmModule::Amd.nested_param_path().as_deref(),
            Some("/sys/module/kvm_amd/parameters/nested")
        );
        assert_eq!(KvmModule::Pvm.nested_param_path(), None);
    }

    #[test]
    fn real_host_probe_does_not_panic() {
        let h = Host::real();
        println!("{h:#?}");
        // The real host: if KVM is served by PVM, there is no nested parameter.
        if h.kvm_module == KvmModule::Pvm {
            assert_eq!(h.nested_param, None);
        }
    }
}
