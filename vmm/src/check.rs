//! `nvmm check [--json]`: can this host run nvmm, and nested guests? One PASS/WARN/FAIL line per
//! pre-condition, in the spirit of libvirt's `virt-host-validate`.
//!
//! FAIL means nvmm cannot run a VM here; WARN means something optional is missing (nested
//! virtualization, vhost-net) or odd. The CLI exits 0 when [`Report::passed`].

use std::ffi::CString;
use std::fmt;
use std::os::unix::ffi::OsStrExt;

use kvm_ioctls::{Cap, Kvm};
use serde::Serialize;

use crate::host::{DeviceAccess, Host, KvmModule, Layer, Vendor, DEV_KVM};
use crate::nested::{self, NestedError, VirtOffer};

/// The KVM API version nvmm is written against (the only one Linux has had since 2.6.22).
pub const KVM_API_VERSION: i32 = 12;

/// How one check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Status {
    /// Fine.
    Pass,
    /// Optional, or odd: nvmm still runs.
    Warn,
    /// nvmm cannot run a VM.
    Fail,
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Status::Pass => "PASS",
            Status::Warn => "WARN",
            Status::Fail => "FAIL",
        })
    }
}

/// One pre-condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// What was checked.
    pub name: String,
    /// How it came out.
    pub status: Status,
    /// One line: what was found, and for WARN/FAIL what to do.
    pub detail: String,
}

impl Check {
    fn new(name: impl Into<String>, status: Status, detail: impl Into<String>) -> Check {
        Check {
            name: name.into(),
            status,
            detail: detail.into(),
        }
    }
}

/// The whole host report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// CPU vendor.
    pub vendor: Vendor,
    /// The KVM module serving /dev/kvm.
    pub kvm_module: KvmModule,
    /// Where in a stack of hypervisors this host is.
    pub layer: Layer,
    /// Whether `--nested` would pass its preflight here.
    pub nested_ready: bool,
    /// Every check, in order.
    pub checks: Vec<Check>,
}

impl Report {
    /// No check failed: nvmm can run VMs here.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.status != Status::Fail)
    }

    /// `--nested` would pass its preflight here.
    pub fn nested_ready(&self) -> bool {
        self.nested_ready
    }

    fn count(&self, status: Status) -> usize {
        self.checks.iter().filter(|c| c.status == status).count()
    }

    /// The report as text: a header line, one line per check, a summary line.
    pub fn render_text(&self) -> String {
        let mut out = format!(
            "nvmm check: {} CPU, {}, layer {}\n",
            self.vendor, self.kvm_module, self.layer
        );
        for c in &self.checks {
            out.push_str(&format!("{}  {}: {}\n", c.status, c.name, c.detail));
        }
        out.push_str(&format!(
            "result: {} PASS, {} WARN, {} FAIL; nvmm {}; nested virtualization {}\n",
            self.count(Status::Pass),
            self.count(Status::Warn),
            self.count(Status::Fail),
            if self.passed() {
                "can run here"
            } else {
                "cannot run here"
            },
            if self.nested_ready {
                "ready"
            } else {
                "unavailable"
            },
        ));
        out
    }

    /// The report as pretty-printed JSON.
    pub fn to_json(&self) -> String {
        // Serializing plain structs of strings, bools and enums cannot fail; say so if it does.
        serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\": \"cannot serialize the report: {e}\"}}"))
    }
}

/// What KVM itself answered; [`KvmFacts::probe`] asks, tests build it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvmFacts {
    /// KVM_GET_API_VERSION.
    pub api_version: i32,
    /// Each capability nvmm needs, by its KVM_CAP_ name, and whether KVM has it.
    pub caps: Vec<(&'static str, bool)>,
    /// KVM_CAP_NESTED_STATE on a VM fd: the largest nested state, 0 when missing.
    pub nested_state_size: i32,
    /// What KVM_GET_SUPPORTED_CPUID offers for nesting, or why not (one line).
    pub offer: Result<VirtOffer, String>,
    /// The nested preflight's answer (one line).
    pub nested: Result<(), String>,
}

/// The capabilities nvmm needs: the VM builder's list, plus any this report adds.
fn caps_to_check() -> Vec<(Cap, &'static str)> {
    let extra = [(Cap::SetIdentityMapAddr, "KVM_CAP_SET_IDENTITY_MAP_ADDR")];
    let mut caps = crate::kvm::REQUIRED_CAPS.to_vec();
    for (cap, name) in extra {
        if !caps.iter().any(|(_, n)| *n == name) {
            caps.push((cap, name));
        }
    }
    caps
}

impl KvmFacts {
    /// Asks `kvm`, creating one scratch VM for the VM-level answers.
    pub fn probe(host: &Host, kvm: &Kvm) -> KvmFacts {
        let vm = kvm.create_vm().ok();
        let nested_state_size = match &vm {
            Some(vm) => vm.check_extension_int(Cap::NestedState),
            None => kvm.check_extension_int(Cap::NestedState),
        };
        KvmFacts {
            api_version: kvm.get_api_version(),
            caps: caps_to_check()
                .into_iter()
                .map(|(cap, name)| (name, kvm.check_extension(cap)))
                .collect(),
            nested_state_size,
            offer: nested::supported_cpuid_offers(kvm, &host.vendor).map_err(|e| e.to_string()),
            nested: nested::preflight(host, Some(kvm), vm.as_ref()).map_err(|e| e.to_string()),
        }
    }
}

/// Opens the host's /dev/kvm (under its root), if the host facts say it opens.
fn open_kvm(host: &Host) -> Result<Kvm, String> {
    if host.dev_kvm != DeviceAccess::ReadWrite {
        return Err("/dev/kvm does not open".to_string());
    }
    let path = CString::new(host.fs.path(DEV_KVM).as_os_str().as_bytes())
        .map_err(|e| format!("bad /dev/kvm path: {e}"))?;
    Kvm::new_with_path(&path).map_err(|e| format!("cannot open /dev/kvm: {e}"))
}

/// Runs every check against the host and its KVM.
pub fn run_checks(host: &Host) -> Report {
    let facts = open_kvm(host).map(|kvm| KvmFacts::probe(host, &kvm));
    build_report(host, facts)
}

/// Builds the report from the host facts and KVM's answers (or why KVM could not be asked).
pub fn build_report(host: &Host, kvm: Result<KvmFacts, String>) -> Report {
    let mut checks = vec![
        hardware_check(host),
        module_check(host),
        dev_kvm_check(&host.dev_kvm),
    ];
    match &kvm {
        Ok(facts) => checks.extend(kvm_checks(facts)),
        Err(why) => checks.push(Check::new(
            "kvm api",
            Status::Fail,
            format!("not checked: {why}"),
        )),
    }
    checks.push(nested_param_check(host));
    let nested = match &kvm {
        Ok(facts) => {
            checks.push(offer_check(facts));
            checks.push(nested_state_check(host.kvm_module, facts.nested_state_size));
            facts.nested.clone()
        }
        Err(why) => match nested::preflight(host, None, None) {
            Ok(()) => Err(format!("not checked: {why}")),
            Err(e) => Err(e.to_string()),
        },
    };
    checks.push(match &nested {
        Ok(()) => Check::new(
            "nested virtualization",
            Status::Pass,
            "ready: --nested will work",
        ),
        Err(why) => Check::new(
            "nested virtualization",
            Status::Warn,
            format!("unavailable: {why}"),
        ),
    });
    checks.push(thp_check(host.thp.as_deref()));
    checks.push(tun_check(&host.dev_tun));
    checks.push(vhost_net_check(&host.dev_vhost_net));
    Report {
        vendor: host.vendor.clone(),
        kvm_module: host.kvm_module,
        layer: host.layer.clone(),
        nested_ready: nested.is_ok(),
        checks,
    }
}

fn hardware_check(host: &Host) -> Check {
    const NAME: &str = "hardware virtualization";
    let flag = host.vendor.virt_flag().unwrap_or("vmx or svm");
    match host.cpu_flags {
        None => Check::new(NAME, Status::Warn, "cannot read the flags in /proc/cpuinfo"),
        Some(f) if f.has_virt(&host.vendor) => {
            Check::new(NAME, Status::Pass, format!("{flag} flag in /proc/cpuinfo"))
        }
        Some(_) if host.kvm_module == KvmModule::Pvm => Check::new(
            NAME,
            Status::Warn,
            format!("no {flag} flag in /proc/cpuinfo; kvm_pvm runs guests without it"),
        ),
        Some(_) => Check::new(
            NAME,
            Status::Fail,
            format!("no {flag} flag in /proc/cpuinfo: enable virtualization in the firmware, or nested virtualization in the hypervisor this host runs under"),
        ),
    }
}

fn module_check(host: &Host) -> Check {
    const NAME: &str = "kvm module";
    match host.kvm_module {
        KvmModule::Intel => Check::new(NAME, Status::Pass, "kvm_intel (hardware VMX)"),
        KvmModule::Amd => Check::new(NAME, Status::Pass, "kvm_amd (hardware SVM)"),
        KvmModule::Pvm => Check::new(
            NAME,
            Status::Warn,
            "kvm_pvm: software KVM (no VMX/SVM); Linux guests may not boot, nested unavailable",
        ),
        KvmModule::None if host.dev_kvm == DeviceAccess::ReadWrite => Check::new(
            NAME,
            Status::Warn,
            "none of kvm_intel, kvm_amd, kvm_pvm in /sys/module (is sysfs hidden?), but /dev/kvm opens",
        ),
        KvmModule::None => match host.vendor.kvm_module() {
            Some(m) => Check::new(
                NAME,
                Status::Fail,
                NestedError::ModuleNotLoaded { module: m.name() }.to_string(),
            ),
            None => Check::new(NAME, Status::Fail, "none of kvm_intel, kvm_amd, kvm_pvm is loaded"),
        },
    }
}

fn dev_kvm_check(access: &DeviceAccess) -> Check {
    const NAME: &str = "kvm device";
    match access {
        DeviceAccess::ReadWrite => Check::new(NAME, Status::Pass, "/dev/kvm opens read-write"),
        DeviceAccess::Missing => Check::new(NAME, Status::Fail, NestedError::NoDevKvm.to_string()),
        DeviceAccess::NoAccess(error) => Check::new(
            NAME,
            Status::Fail,
            NestedError::NoKvmAccess {
                error: error.clone(),
            }
            .to_string(),
        ),
    }
}

fn kvm_checks(facts: &KvmFacts) -> Vec<Check> {
    let api = if facts.api_version == KVM_API_VERSION {
        Check::new(
            "kvm api",
            Status::Pass,
            format!("version {KVM_API_VERSION}"),
        )
    } else {
        Check::new(
            "kvm api",
            Status::Fail,
            format!(
                "version {}, nvmm needs {KVM_API_VERSION}",
                facts.api_version
            ),
        )
    };
    let caps = facts.caps.iter().map(|&(name, present)| {
        if present {
            Check::new(name, Status::Pass, "present")
        } else {
            Check::new(name, Status::Fail, "missing: nvmm needs it")
        }
    });
    std::iter::once(api).chain(caps).collect()
}

fn nested_param_check(host: &Host) -> Check {
    const NAME: &str = "nested parameter";
    let Some(path) = host.kvm_module.nested_param_path() else {
        let detail = match host.kvm_module {
            KvmModule::Pvm => "kvm_pvm has none: a software KVM cannot offer nested virtualization",
            _ => "no kvm_intel or kvm_amd module to have one",
        };
        return Check::new(NAME, Status::Warn, detail);
    };
    let module = host.kvm_module.name();
    match host.nested_param {
        Some(true) => Check::new(NAME, Status::Pass, format!("on in {path}")),
        Some(false) => Check::new(
            NAME,
            Status::Warn,
            NestedError::NestedParamOff { module, path }.to_string(),
        ),
        None => Check::new(NAME, Status::Warn, format!("cannot read {path}")),
    }
}

fn offer_check(facts: &KvmFacts) -> Check {
    const NAME: &str = "VMX/SVM for guests";
    match &facts.offer {
        Ok(offer) => Check::new(
            NAME,
            Status::Pass,
            format!("KVM_GET_SUPPORTED_CPUID offers {offer}"),
        ),
        Err(why) => Check::new(NAME, Status::Warn, why.clone()),
    }
}

fn nested_state_check(module: KvmModule, size: i32) -> Check {
    const NAME: &str = "KVM_CAP_NESTED_STATE";
    if size > 0 {
        Check::new(NAME, Status::Pass, format!("present, up to {size} bytes"))
    } else if module == KvmModule::Pvm {
        Check::new(
            NAME,
            Status::Warn,
            "missing: kvm_pvm has no nested virtualization",
        )
    } else {
        Check::new(NAME, Status::Warn, NestedError::NoNestedState.to_string())
    }
}

/// Whether guest RAM gets the 2 MiB pages `--thp on` asks for. Without them nvmm still runs,
/// but KVM maps the guest 4 KiB at a time, which costs most in nested guests.
fn thp_check(mode: Option<&str>) -> Check {
    const NAME: &str = "huge pages";
    const FIX: &str = "`echo madvise > /sys/kernel/mm/transparent_hugepage/enabled`";
    match mode {
        Some(m @ ("always" | "madvise")) => Check::new(NAME, Status::Pass, format!("transparent huge pages {m}: guest RAM gets 2 MiB pages (--thp on)")),
        Some(m) => Check::new(NAME, Status::Warn, format!("transparent huge pages {m}: guest RAM stays on 4 KiB pages; {FIX}")),
        None => Check::new(NAME, Status::Warn, "no transparent huge pages in this kernel (CONFIG_TRANSPARENT_HUGEPAGE): guest RAM stays on 4 KiB pages"),
    }
}

fn tun_check(access: &DeviceAccess) -> Check {
    const NAME: &str = "tap networking";
    match access {
        DeviceAccess::ReadWrite => Check::new(NAME, Status::Pass, "/dev/net/tun opens read-write"),
        DeviceAccess::Missing => Check::new(
            NAME,
            Status::Fail,
            "/dev/net/tun not found: run `modprobe tun` (virtio-net needs a TAP device)",
        ),
        DeviceAccess::NoAccess(e) => Check::new(
            NAME,
            Status::Fail,
            format!("cannot open /dev/net/tun read-write ({e}): run as root or give the user CAP_NET_ADMIN"),
        ),
    }
}

fn vhost_net_check(access: &DeviceAccess) -> Check {
    const NAME: &str = "vhost-net";
    match access {
        DeviceAccess::ReadWrite => Check::new(
            NAME,
            Status::Pass,
            "/dev/vhost-net opens read-write (nvmm does not use it)",
        ),
        DeviceAccess::Missing => Check::new(
            NAME,
            Status::Warn,
            "/dev/vhost-net not found (nvmm does not use it)",
        ),
        DeviceAccess::NoAccess(e) => Check::new(
            NAME,
            Status::Warn,
            format!("cannot open /dev/vhost-net read-write ({e}) (nvmm does not use it)"),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;
    use crate::host::{DEV_TUN, PROC_CPUINFO};

    /// KVM answers of a healthy nested-capable AMD host.
    fn amd_facts() -> KvmFacts {
        KvmFacts {
            api_version: 12,
            caps: caps_to_check()
                .into_iter()
                .map(|(_, n)| (n, true))
                .collect(),
            nested_state_size: 4224,
            offer: Ok(VirtOffer::Svm {
                npt: true,
                asids: 8,
            }),
            nested: Ok(()),
        }
    }

    /// KVM answers of this PVM host.
    fn pvm_facts() -> KvmFacts {
        KvmFacts {
            nested_state_size: 0,
            offer: Err(NestedError::NotOffered { what: "SVM" }.to_string()),
            nested: Err(NestedError::KvmPvm.to_string()),
            ..amd_facts()
        }
    }

    fn pvm_host() -> FakeHost {
        let t = FakeHost::nested_ready(&Vendor::Amd);
        t.remove("/sys/module/kvm_amd")
            .dir("/sys/module/kvm_pvm/parameters")
            .file(PROC_CPUINFO, "flags\t: fpu lm hypervisor\n");
        t
    }

    fn find<'a>(r: &'a Report, name: &str) -> &'a Check {
        r.checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check {name}"))
    }

    #[test]
    fn cap_list_has_what_nvmm_needs_once() {
        let names: Vec<_> = caps_to_check().into_iter().map(|(_, n)| n).collect();
        for want in [
            "KVM_CAP_IRQCHIP",
            "KVM_CAP_PIT2",
            "KVM_CAP_IOEVENTFD",
            "KVM_CAP_IRQFD",
            "KVM_CAP_USER_MEMORY",
            "KVM_CAP_IMMEDIATE_EXIT",
            "KVM_CAP_EXT_CPUID",
            "KVM_CAP_SET_TSS_ADDR",
            "KVM_CAP_SET_IDENTITY_MAP_ADDR",
        ] {
            assert_eq!(names.iter().filter(|n| **n == want).count(), 1, "{want}");
        }
    }

    #[test]
    fn healthy_amd_host_renders() {
        let t = FakeHost::nested_ready(&Vendor::Amd);
        let r = build_report(&t.probe(Vendor::Amd), Ok(amd_facts()));
        assert!(r.passed());
        assert!(r.nested_ready());
        let text = r.render_text();
        let caps: String = caps_to_check()
            .into_iter()
            .map(|(_, n)| format!("PASS  {n}: present\n"))
            .collect();
        let want = format!(
            "nvmm check: AMD CPU, kvm_amd, layer L1+ (guest; hypervisor signature \"KVMKVMKVM\")\n\
             PASS  hardware virtualization: svm flag in /proc/cpuinfo\n\
             PASS  kvm module: kvm_amd (hardware SVM)\n\
             PASS  kvm device: /dev/kvm opens read-write\n\
             PASS  kvm api: version 12\n\
             {caps}\
             PASS  nested parameter: on in /sys/module/kvm_amd/parameters/nested\n\
             PASS  VMX/SVM for guests: KVM_GET_SUPPORTED_CPUID offers SVM with NPT, 8 ASIDs\n\
             PASS  KVM_CAP_NESTED_STATE: present, up to 4224 bytes\n\
             PASS  nested virtualization: ready: --nested will work\n\
             PASS  huge pages: transparent huge pages madvise: guest RAM gets 2 MiB pages (--thp on)\n\
             PASS  tap networking: /dev/net/tun opens read-write\n\
             WARN  vhost-net: /dev/vhost-net not found (nvmm does not use it)\n\
             result: {} PASS, 1 WARN, 0 FAIL; nvmm can run here; nested virtualization ready\n",
            r.checks.len() - 1
        );
        assert_eq!(text, want);
    }

    #[test]
    fn pvm_host_is_honest() {
        let t = pvm_host();
        let r = build_report(&t.probe(Vendor::Amd), Ok(pvm_facts()));
        assert!(r.passed(), "nvmm runs on PVM:\n{}", r.render_text());
        assert!(!r.nested_ready());
        assert_eq!(
            find(&r, "kvm module").detail,
            "kvm_pvm: software KVM (no VMX/SVM); Linux guests may not boot, nested unavailable"
        );
        assert_eq!(find(&r, "kvm module").status, Status::Warn);
        let hw = find(&r, "hardware virtualization");
        assert_eq!(
            (hw.status, hw.detail.as_str()),
            (
                Status::Warn,
                "no svm flag in /proc/cpuinfo; kvm_pvm runs guests without it"
            )
        );
        let n = find(&r, "nested virtualization");
        assert_eq!(n.status, Status::Warn);
        assert!(
            n.detail
                .starts_with("unavailable: the host KVM is kvm_pvm, a software KVM"),
            "{}",
            n.detail
        );
        let ns = find(&r, "KVM_CAP_NESTED_STATE");
        assert_eq!(
            (ns.status, ns.detail.as_str()),
            (
                Status::Warn,
                "missing: kvm_pvm has no nested virtualization"
            )
        );
        assert!(find(&r, "VMX/SVM for guests")
            .detail
            .contains("does not offer SVM"));
        assert!(find(&r, "nested parameter")
            .detail
            .starts_with("kvm_pvm has none"));
        assert!(r
            .render_text()
            .ends_with("nvmm can run here; nested virtualization unavailable\n"));
    }

    #[test]
    fn no_dev_kvm_fails() {
        let t = FakeHost::nested_ready(&Vendor::Intel);
        t.remove(DEV_KVM).remove("/sys/module/kvm_intel");
        let h = t.probe(Vendor::Intel);
        let r = run_checks(&h);
        assert!(!r.passed());
        assert!(!r.nested_ready());
        let dev = find(&r, "kvm device");
        assert_eq!(dev.status, Status::Fail);
        assert_eq!(
            dev.detail,
            "/dev/kvm not found: load kvm_intel or kvm_amd, or enable virtualization in the firmware"
        );
        assert_eq!(
            find(&r, "kvm module").detail,
            "kvm_intel is not loaded: run `modprobe kvm_intel` (if it fails, `dmesg` says why)"
        );
        assert_eq!(
            find(&r, "kvm api").detail,
            "not checked: /dev/kvm does not open"
        );
        assert!(find(&r, "nested virtualization")
            .detail
            .starts_with("unavailable: /dev/kvm not found"));
        assert!(r
            .render_text()
            .contains("FAIL  kvm device: /dev/kvm not found"));
    }

    #[test]
    fn missing_cap_and_bad_api_fail() {
        let t = FakeHost::nested_ready(&Vendor::Amd);
        let mut facts = amd_facts();
        facts.api_version = 11;
        facts
            .caps
            .iter_mut()
            .filter(|(n, _)| *n == "KVM_CAP_IRQFD")
            .for_each(|c| c.1 = false);
        let r = build_report(&t.probe(Vendor::Amd), Ok(facts));
        assert!(!r.passed());
        assert_eq!(find(&r, "kvm api").detail, "version 11, nvmm needs 12");
        let c = find(&r, "KVM_CAP_IRQFD");
        assert_eq!(
            (c.status, c.detail.as_str()),
            (Status::Fail, "missing: nvmm needs it")
        );
    }

    #[test]
    fn nested_off_only_warns() {
        let t = FakeHost::nested_ready(&Vendor::Amd);
        t.file("/sys/module/kvm_amd/parameters/nested", "0\n");
        let h = t.probe(Vendor::Amd);
        let facts = KvmFacts {
            nested: nested::preflight(&h, None, None).map_err(|e| e.to_string()),
            ..amd_facts()
        };
        let r = build_report(&h, Ok(facts));
        assert!(r.passed());
        assert!(!r.nested_ready());
        let p = find(&r, "nested parameter");
        assert_eq!(p.status, Status::Warn);
        assert!(p.detail.contains("/sys/module/kvm_amd/parameters/nested"));
        assert!(p.detail.contains("options kvm_amd nested=1"));
    }

    #[test]
    fn old_kernel_without_nested_state_warns() {
        let t = FakeHost::nested_ready(&Vendor::Intel);
        let facts = KvmFacts {
            nested_state_size: 0,
            offer: Ok(VirtOffer::Vmx),
            nested: Err(NestedError::NoNestedState.to_string()),
            ..amd_facts()
        };
        let r = build_report(&t.probe(Vendor::Intel), Ok(facts));
        assert!(r.passed());
        assert!(!r.nested_ready());
        let ns = find(&r, "KVM_CAP_NESTED_STATE");
        assert_eq!(ns.status, Status::Warn);
        assert!(ns.detail.contains("Linux 4.19+ for VMX"), "{}", ns.detail);
        assert_eq!(
            find(&r, "VMX/SVM for guests").detail,
            "KVM_GET_SUPPORTED_CPUID offers VMX"
        );
        assert_eq!(
            find(&r, "hardware virtualization").detail,
            "vmx flag in /proc/cpuinfo"
        );
        assert_eq!(
            find(&r, "nested parameter").detail,
            "on in /sys/module/kvm_intel/parameters/nested"
        );
    }

    #[test]
    fn huge_pages_never_or_missing_only_warn() {
        let t = FakeHost::nested_ready(&Vendor::Amd);
        t.file(crate::host::SYS_THP_ENABLED, "always madvise [never]\n");
        let r = build_report(&t.probe(Vendor::Amd), Ok(amd_facts()));
        assert!(r.passed());
        let c = find(&r, "huge pages");
        assert_eq!(c.status, Status::Warn);
        assert!(c.detail.starts_with("transparent huge pages never: guest RAM stays on 4 KiB pages; `echo madvise >"), "{}", c.detail);
        t.remove(crate::host::SYS_THP_ENABLED);
        let r = build_report(&t.probe(Vendor::Amd), Ok(amd_facts()));
        assert_eq!(find(&r, "huge pages").status, Status::Warn);
        assert!(find(&r, "huge pages").detail.contains("CONFIG_TRANSPARENT_HUGEPAGE"));
        t.file(crate::host::SYS_THP_ENABLED, "[always] madvise never\n");
        let r = build_report(&t.probe(Vendor::Amd), Ok(amd_facts()));
        assert_eq!(find(&r, "huge pages").status, Status::Pass);
    }

    #[test]
    fn tun_missing_fails_vhost_only_warns() {
        let t = FakeHost::nested_ready(&Vendor::Amd);
        t.remove(DEV_TUN);
        let r = build_report(&t.probe(Vendor::Amd), Ok(amd_facts()));
        assert!(!r.passed());
        assert_eq!(find(&r, "tap networking").status, Status::Fail);
        assert_eq!(find(&r, "vhost-net").status, Status::Warn);
    }

    #[test]
    fn json_shape() {
        let t = pvm_host();
        let r = build_report(&t.probe(Vendor::Amd), Ok(pvm_facts()));
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["vendor"], "AMD");
        assert_eq!(v["kvm_module"], "kvm_pvm");
        assert_eq!(v["nested_ready"], false);
        assert_eq!(v["layer"]["kind"], "guest");
        assert_eq!(v["layer"]["signature"], "KVMKVMKVM");
        assert_eq!(v["layer"]["level"], serde_json::Value::Null);
        let checks = v["checks"].as_array().unwrap();
        assert_eq!(checks.len(), r.checks.len());
        let module = checks.iter().find(|c| c["name"] == "kvm module").unwrap();
        assert_eq!(module["status"], "WARN");
        assert!(module["detail"]
            .as_str()
            .unwrap()
            .starts_with("kvm_pvm: software KVM"));
        assert!(checks
            .iter()
            .all(|c| ["PASS", "WARN", "FAIL"].contains(&c["status"].as_str().unwrap())));
    }

    #[test]
    fn fake_tree_kvm_node_does_not_panic() {
        // The fake /dev/kvm is a regular file: it opens, and every ioctl on it fails.
        let t = FakeHost::nested_ready(&Vendor::Amd);
        let r = run_checks(&t.probe(Vendor::Amd));
        assert!(!r.passed());
        assert_eq!(find(&r, "kvm api").detail, "version -1, nvmm needs 12");
        assert!(!r.nested_ready());
    }

    #[test]
    fn empty_tree_does_not_panic() {
        let t = FakeHost::empty();
        let r = run_checks(&t.probe(Vendor::Other("Nobody".into())));
        assert!(!r.passed());
        assert!(!r.render_text().is_empty());
        assert_eq!(find(&r, "hardware virtualization").status, Status::Warn);
    }

    /// `nvmm check` on this machine: `cargo test -p nvmm real_host_report -- --nocapture`.
    #[test]
    fn real_host_report() {
        let r = run_checks(&Host::real());
        println!("{}", r.render_text());
        println!("{}", r.to_json());
        if r.kvm_module == KvmModule::Pvm {
            assert!(!r.nested_ready());
            assert_eq!(find(&r, "kvm module").status, Status::Warn);
            assert_ne!(find(&r, "nested virtualization").status, Status::Pass);
        }
    }
}
