//! The checks run before a nested VM starts: the first one that fails is the cause, and its
//! error says in one line why and what to do.

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm, VmFd};

use super::{offered, NestedError, VirtOffer};
use crate::host::{DeviceAccess, Host, KvmModule, Layer, Vendor};

/// Checks that nested virtualization can work on this host.
///
/// The host facts are checked first, from the most basic cause to the most specific: a PVM
/// KVM, a vendor without VMX/SVM, the missing CPU flag, the vendor module and /dev/kvm, access
/// to /dev/kvm, the `nested` module parameter. Then, given `kvm`, that
/// `KVM_GET_SUPPORTED_CPUID` offers VMX/SVM; given `vm` (or else `kvm`), that
/// `KVM_CAP_NESTED_STATE` is there. With `kvm` and `vm` both `None` only the host facts are
/// checked, so call it again once KVM is open.
pub fn preflight(host: &Host, kvm: Option<&Kvm>, vm: Option<&VmFd>) -> Result<(), NestedError> {
    check_host(host)?;
    if let Some(kvm) = kvm {
        supported_cpuid_offers(kvm, &host.vendor)?;
    }
    let nested_state_size = match (vm, kvm) {
        (Some(vm), _) => Some(vm.check_extension_int(Cap::NestedState)),
        (None, Some(kvm)) => Some(kvm.check_extension_int(Cap::NestedState)),
        (None, None) => None,
    };
    match nested_state_size {
        Some(size) => check_nested_state_size(size),
        None => Ok(()),
    }
}

/// Reads `KVM_GET_SUPPORTED_CPUID` and checks it offers the vendor's VMX/SVM.
pub fn supported_cpuid_offers(kvm: &Kvm, vendor: &Vendor) -> Result<VirtOffer, NestedError> {
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(NestedError::SupportedCpuid)?;
    offered(&cpuid, vendor)
}

/// The fix for a CPU that does not show VMX/SVM, which depends on who could turn it on.
fn flag_fix(vendor: &Vendor, layer: &Layer) -> &'static str {
    match (layer, vendor) {
        (Layer::Guest { .. }, _) => {
            "this host is a guest; enable nested virtualization in the hypervisor that runs it"
        }
        (Layer::L0, Vendor::Intel) => "enable VT-x in the firmware setup",
        (Layer::L0, _) => "enable SVM (AMD-V) in the firmware setup",
    }
}

/// The checks that need only the host facts.
fn check_host(host: &Host) -> Result<(), NestedError> {
    if host.kvm_module == KvmModule::Pvm {
        return Err(NestedError::KvmPvm);
    }
    let (Some(module), Some(flag)) = (host.vendor.kvm_module(), host.vendor.virt_flag()) else {
        return Err(NestedError::UnsupportedVendor {
            vendor: host.vendor.to_string(),
        });
    };
    if host.cpu_flags.is_some_and(|f| !f.has_virt(&host.vendor)) {
        return Err(NestedError::NoCpuFlag {
            flag,
            fix: flag_fix(&host.vendor, &host.layer),
        });
    }
    // /sys/module may be hidden (a container) while /dev/kvm works: then only KVM can tell.
    let sysfs_blind = host.kvm_module == KvmModule::None && host.dev_kvm == DeviceAccess::ReadWrite;
    if host.kvm_module != module && !sysfs_blind {
        return Err(match host.dev_kvm {
            DeviceAccess::Missing => NestedError::NoDevKvm,
            _ => NestedError::ModuleNotLoaded {
                module: module.name(),
            },
        });
    }
    match &host.dev_kvm {
        DeviceAccess::ReadWrite => {}
        DeviceAccess::Missing => {
            return Err(NestedError::NoDevKvmNode {
                module: module.name(),
            })
        }
        DeviceAccess::NoAccess(error) => {
            return Err(NestedError::NoKvmAccess {
                error: error.clone(),
            })
        }
    }
    if host.nested_param == Some(false) {
        return Err(NestedError::NestedParamOff {
            module: module.name(),
            path: module.nested_param_path().unwrap_or_default(),
        });
    }
    Ok(())
}

/// `KVM_CAP_NESTED_STATE` answers the largest nested state in bytes; 0 means no nested state.
fn check_nested_state_size(size: i32) -> Result<(), NestedError> {
    if size > 0 {
        Ok(())
    } else {
        Err(NestedError::NoNestedState)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::fake::FakeHost;
    use crate::host::{DEV_KVM, PROC_CPUINFO};

    /// The preflight error of the tree, checking host facts only.
    fn error_of(tree: &FakeHost, vendor: Vendor) -> String {
        preflight(&tree.probe(vendor), None, None)
            .expect_err("preflight should fail")
            .to_string()
    }

    #[test]
    fn healthy_trees_pass() {
        for vendor in [Vendor::Amd, Vendor::Intel] {
            let t = FakeHost::nested_ready(&vendor);
            preflight(&t.probe(vendor), None, None).unwrap();
        }
    }

    #[test]
    fn no_dev_kvm() {
        let t = FakeHost::nested_ready(&Vendor::Amd);
        t.remove("/sys/module/kvm_amd").remove(DEV_KVM);
        assert_eq!(
            error_of(&t, Vendor::Amd),
            "/dev/kvm not found: load kvm_intel or kvm_amd, or enable virtualization in the firmware"
        );
    }

    #[test]
    fn module_loaded_but_no_node() {
        let t = FakeHost::nested_ready(&Vendor::Amd);
        t.remove(DEV_KVM);
        let e = error_of(&t, Vendor::Amd);
        assert!(
            e.starts_with("kvm_amd is loaded but /dev/kvm is missing"),
            "{e}"
        );
        assert!(e.contains("mknod /dev/kvm c 10 232"), "{e}");
    }

    #[test]
    fn no_access() {
        // A directory where /dev/kvm should be: it exists but does not open read-write.
        let t = FakeHost::nested_ready(&Vendor::Intel);
        t.remove(DEV_KVM).dir(DEV_KVM);
        let e = error_of(&t, Vendor::Intel);
        assert!(e.starts_with("cannot open /dev/kvm read-write ("), "{e}");
        assert!(
            e.ends_with("run as root or add the user to the kvm group"),
            "{e}"
        );
        // The same for a permission error, which root cannot produce in a tree.
        let mut h = t.probe(Vendor::Intel);
        h.dev_kvm = DeviceAccess::NoAccess("Permission denied (os error 13)".into());
        assert_eq!(
            preflight(&h, None, None).unwrap_err().to_string(),
            "cannot open /dev/kvm read-write (Permission denied (os error 13)): run as root or add the user to the kvm group"
        );
    }

    /// A static /dev/kvm node (udev's `static_node=kvm`) without the vendor module: opening it
    /// fails with ENODEV.
    fn static_node_without(vendor: Vendor) -> Host {
        let t = FakeHost::nested_ready(&vendor);
        let module = vendor.kvm_module().unwrap().name();
        t.remove(&format!("/sys/module/{module}"));
        let mut h = t.probe(vendor);
        h.dev_kvm = DeviceAccess::NoAccess("No such device (os error 19)".into());
        h
    }

    #[test]
    fn amd_module_not_loaded() {
        assert_eq!(
            preflight(&static_node_without(Vendor::Amd), None, None)
                .unwrap_err()
                .to_string(),
            "kvm_amd is not loaded: run `modprobe kvm_amd` (if it fails, `dmesg` says why)"
        );
    }

    #[test]
    fn intel_module_not_loaded() {
        let e = preflight(&static_node_without(Vendor::Intel), None, None).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("kvm_intel is not loaded: run `modprobe kvm_intel`"),
            "{e}"
        );
    }

    #[test]
    fn hidden_sysfs_defers_to_kvm() {
        let t = FakeHost::nested_ready(&Vendor::Amd);
        t.remove("/sys/module/kvm_amd");
        let mut h = t.probe(Vendor::Amd);
        assert_eq!(h.kvm_module, KvmModule::None);
        h.dev_kvm = DeviceAccess::ReadWrite;
        preflight(&h, None, None).unwrap();
    }

    #[test]
    fn pvm_host() {
        let t = FakeHost::nested_ready(&Vendor::Amd);
        t.remove("/sys/module/kvm_amd")
            .dir("/sys/module/kvm_pvm/parameters")
            .file(PROC_CPUINFO, "flags\t: fpu hypervisor\n");
        assert_eq!(
            error_of(&t, Vendor::Amd),
            "the host KVM is kvm_pvm, a software KVM without VMX/SVM that cannot offer nested virtualization: run nvmm --nested on a host with kvm_intel or kvm_amd"
        );
    }

    #[test]
    fn amd_nested_param_off() {
        let t = FakeHost::nested_ready(&Vendor::Amd);
        t.file("/sys/module/kvm_amd/parameters/nested", "0\n");
        assert_eq!(
            error_of(&t, Vendor::Amd),
            "nested virtualization is off in /sys/module/kvm_amd/parameters/nested: run `echo \"options kvm_amd nested=1\" > /etc/modprobe.d/kvm.conf`, then reload the module (`modprobe -r kvm_amd && modprobe kvm_amd`)"
        );
    }

    #[test]
    fn intel_nested_param_off() {
        let t = FakeHost::nested_ready(&Vendor::Intel);
        t.file("/sys/module/kvm_intel/parameters/nested", "N\n");
        let e = error_of(&t, Vendor::Intel);
        assert!(
            e.starts_with(
                "nested virtualization is off in /sys/module/kvm_intel/parameters/nested"
            ),
            "{e}"
        );
        assert!(
            e.contains("\"options kvm_intel nested=1\" > /etc/modprobe.d/kvm.conf"),
            "{e}"
        );
        assert!(
            e.contains("modprobe -r kvm_intel && modprobe kvm_intel"),
            "{e}"
        );
    }

    #[test]
    fn no_svm_flag_in_a_guest() {
        let t = FakeHost::nested_ready(&Vendor::Amd);
        t.file(PROC_CPUINFO, "flags\t: fpu lm hypervisor\n");
        assert_eq!(
            error_of(&t, Vendor::Amd),
            "no svm flag in /proc/cpuinfo: this host is a guest; enable nested virtualization in the hypervisor that runs it"
        );
    }

    #[test]
    fn no_vmx_flag_on_bare_metal() {
        let t = FakeHost::nested_ready(&Vendor::Intel);
        t.file(PROC_CPUINFO, "flags\t: fpu lm\n");
        let mut h = t.probe(Vendor::Intel);
        h.layer = Layer::L0;
        assert_eq!(
            preflight(&h, None, None).unwrap_err().to_string(),
            "no vmx flag in /proc/cpuinfo: enable VT-x in the firmware setup"
        );
        h.vendor = Vendor::Amd;
        h.kvm_module = KvmModule::Amd;
        assert_eq!(
            preflight(&h, None, None).unwrap_err().to_string(),
            "no svm flag in /proc/cpuinfo: enable SVM (AMD-V) in the firmware setup"
        );
    }

    #[test]
    fn other_vendor() {
        let t = FakeHost::nested_ready(&Vendor::Amd);
        assert_eq!(
            error_of(&t, Vendor::from_id("VIA VIA VIA ")),
            "nested virtualization needs an Intel (VMX) or AMD (SVM) CPU, and this one is VIA VIA VIA"
        );
    }

    #[test]
    fn first_failure_is_the_cause() {
        // Everything is wrong at once: no flag, no module, no /dev/kvm. The flag is the cause.
        let t = FakeHost::nested_ready(&Vendor::Amd);
        t.remove("/sys/module/kvm_amd")
            .remove(DEV_KVM)
            .file(PROC_CPUINFO, "flags\t: fpu hypervisor\n");
        assert!(error_of(&t, Vendor::Amd).starts_with("no svm flag"));
        // With the flag back, the module/node is next.
        t.file(PROC_CPUINFO, "flags\t: fpu svm hypervisor\n");
        assert!(error_of(&t, Vendor::Amd).starts_with("/dev/kvm not found"));
        // Module loaded, nested off, node unopenable: access comes before the parameter.
        t.dir("/sys/module/kvm_amd/parameters")
            .file("/sys/module/kvm_amd/parameters/nested", "0\n")
            .dir(DEV_KVM);
        assert!(error_of(&t, Vendor::Amd).starts_with("cannot open /dev/kvm"));
        // And PVM trumps everything.
        t.dir("/sys/module/kvm_pvm");
        let mut h = t.probe(Vendor::Amd);
        h.kvm_module = KvmModule::Pvm;
        assert_eq!(
            preflight(&h, None, None).unwrap_err().to_string(),
            NestedError::KvmPvm.to_string()
        );
    }

    #[test]
    fn unreadable_cpuinfo_is_not_a_failure() {
        let t = FakeHost::nested_ready(&Vendor::Amd);
        t.remove(PROC_CPUINFO);
        preflight(&t.probe(Vendor::Amd), None, None).unwrap();
    }

    #[test]
    fn nested_state_size() {
        check_nested_state_size(4224).unwrap();
        check_nested_state_size(8320).unwrap();
        for size in [0, -1] {
            assert_eq!(
                check_nested_state_size(size).unwrap_err().to_string(),
                "KVM_CAP_NESTED_STATE is missing: this host kernel cannot save or restore nested guests; use a newer one (Linux 4.19+ for VMX, 5.8+ for SVM)"
            );
        }
    }

    /// With the real /dev/kvm behind a fake nested-ready host tree, the KVM-level checks run
    /// for real: on a KVM without SVM/VMX in its supported CPUID (this PVM host) they must say
    /// so. Skipped when /dev/kvm cannot be opened.
    #[test]
    fn real_kvm_behind_fake_tree() {
        let Ok(kvm) = Kvm::new() else {
            crate::skip_test("/dev/kvm cannot be opened");
            return;
        };
        let vm = kvm.create_vm().ok();
        for (vendor, what) in [(Vendor::Amd, "SVM"), (Vendor::Intel, "VMX")] {
            let t = FakeHost::nested_ready(&vendor);
            let h = t.probe(vendor.clone());
            let supported = supported_cpuid_offers(&kvm, &vendor);
            let result = preflight(&h, Some(&kvm), vm.as_ref());
            println!("{vendor}: supported: {supported:?}; preflight: {result:?}");
            match supported {
                Err(NestedError::NotOffered { what: w }) => {
                    assert_eq!(w, what);
                    let e = result.unwrap_err().to_string();
                    assert!(
                        e.starts_with(&format!("KVM_GET_SUPPORTED_CPUID does not offer {what}"))
                    );
                }
                Ok(_) => {
                    let cap = kvm.check_extension_int(Cap::NestedState);
                    assert_eq!(result.is_ok(), cap > 0);
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// The real host and its real KVM.
    #[test]
    fn real_host() {
        let host = Host::real();
        let kvm = Kvm::new().ok();
        let vm = kvm.as_ref().and_then(|k| k.create_vm().ok());
        let result = preflight(&host, kvm.as_ref(), vm.as_ref());
        println!("preflight on this host: {result:?}");
        if host.kvm_module == KvmModule::Pvm {
            assert!(matches!(result, Err(NestedError::KvmPvm)));
        }
    }
}
