//! Everything `--nested` touches, in one place: the CPUID bits that expose VMX/SVM to the guest
//! ([`shape_cpuid`]), the VMX capability MSRs an Intel guest needs ([`vcpu_msrs`]), the checks
//! run before a nested VM starts ([`preflight`]), and the nested state a snapshot carries
//! ([`get_nested_state`], [`set_nested_state`]).
//!
//! The order the VMM calls these in, per VM:
//! 1. `preflight(&host, Some(&kvm), Some(&vm))` once, before any vCPU exists (only with --nested);
//! 2. per vCPU: `shape_cpuid(&mut cpuid, &host.vendor, nested)` on the CPUID that came from
//!    `KVM_GET_SUPPORTED_CPUID`, then `KVM_SET_CPUID2`;
//! 3. per vCPU, after `KVM_SET_CPUID2` (KVM re-derives some VMX MSRs from CPUID) and before the
//!    first `KVM_RUN`: `vcpu.set_msrs` with [`vcpu_msrs`] (empty unless Intel with --nested).

mod cpuid;
mod msrs;
mod preflight;
mod state;

pub use cpuid::{
    offered, shape_cpuid, VirtOffer, EXT1_ECX_SVM, LEAF1_ECX_VMX, LEAF_EXT_FEATURES, LEAF_FEATURES,
    LEAF_SVM, SVM_EDX_NPT,
};
pub use msrs::{vcpu_msrs, vmx_capability_msrs, vmx_msr_indices, VMX_CAPABILITY_MSRS};
pub use preflight::{preflight, supported_cpuid_offers};
pub use state::{get_nested_state, set_nested_state};

/// Why nested virtualization cannot be set up. Each message is one line: the cause, then the fix.
#[derive(Debug, thiserror::Error)]
pub enum NestedError {
    /// The supported CPUID lacks a feature nested virtualization needs.
    #[error("KVM_GET_SUPPORTED_CPUID does not offer {what}: the host CPU or its KVM cannot give it to guests")]
    NotOffered {
        /// "VMX", "SVM", ...
        what: &'static str,
    },
    /// Neither Intel nor AMD.
    #[error(
        "nested virtualization needs an Intel (VMX) or AMD (SVM) CPU, and this one is {vendor}"
    )]
    UnsupportedVendor {
        /// The CPUID vendor string.
        vendor: String,
    },
    /// /dev/kvm is PVM.
    #[error("the host KVM is kvm_pvm, a software KVM without VMX/SVM that cannot offer nested virtualization: run nvmm --nested on a host with kvm_intel or kvm_amd")]
    KvmPvm,
    /// The CPU does not show its virtualization flag.
    #[error("no {flag} flag in /proc/cpuinfo: {fix}")]
    NoCpuFlag {
        /// "vmx" or "svm".
        flag: &'static str,
        /// What to do, which depends on whether we are a guest.
        fix: &'static str,
    },
    /// Neither /dev/kvm nor the vendor module.
    #[error(
        "/dev/kvm not found: load kvm_intel or kvm_amd, or enable virtualization in the firmware"
    )]
    NoDevKvm,
    /// The module is loaded but the node is missing (a container, or no devtmpfs).
    #[error("{module} is loaded but /dev/kvm is missing: create it with `mknod /dev/kvm c 10 232`, or pass it into this container")]
    NoDevKvmNode {
        /// kvm_intel or kvm_amd.
        module: &'static str,
    },
    /// /dev/kvm exists but the vendor module is not loaded.
    #[error("{module} is not loaded: run `modprobe {module}` (if it fails, `dmesg` says why)")]
    ModuleNotLoaded {
        /// kvm_intel or kvm_amd.
        module: &'static str,
    },
    /// /dev/kvm cannot be opened read-write.
    #[error(
        "cannot open /dev/kvm read-write ({error}): run as root or add the user to the kvm group"
    )]
    NoKvmAccess {
        /// The OS error text.
        error: String,
    },
    /// The module's `nested` parameter is off.
    #[error("nested virtualization is off in {path}: run `echo \"options {module} nested=1\" > /etc/modprobe.d/kvm.conf`, then reload the module (`modprobe -r {module} && modprobe {module}`)")]
    NestedParamOff {
        /// kvm_intel or kvm_amd.
        module: &'static str,
        /// /sys/module/<module>/parameters/nested.
        path: String,
    },
    /// KVM lists no VMX capability MSRs.
    #[error("KVM_GET_MSR_FEATURE_INDEX_LIST lists no VMX capability MSRs: the host KVM has no nested VMX (load kvm_intel with nested=1)")]
    NoVmxMsrs,
    /// KVM_CAP_NESTED_STATE is 0.
    #[error("KVM_CAP_NESTED_STATE is missing: this host kernel cannot save or restore nested guests; use a newer one (Linux 4.19+ for VMX, 5.8+ for SVM)")]
    NoNestedState,
    /// KVM_GET_SUPPORTED_CPUID failed.
    #[error("KVM_GET_SUPPORTED_CPUID failed: {0}")]
    SupportedCpuid(kvm_ioctls::Error),
    /// KVM_GET_MSR_FEATURE_INDEX_LIST failed.
    #[error("KVM_GET_MSR_FEATURE_INDEX_LIST failed: {0}")]
    MsrFeatureList(kvm_ioctls::Error),
    /// Too many MSRs for one `kvm_msrs`.
    #[error("cannot build the VMX MSR list: {0}")]
    MsrList(vmm_sys_util::fam::Error),
    /// KVM_GET_MSRS on the system fd failed.
    #[error("KVM_GET_MSRS (feature MSRs) failed: {0}")]
    GetFeatureMsrs(kvm_ioctls::Error),
    /// KVM_GET_MSRS stopped early.
    #[error(
        "KVM_GET_MSRS read {read} of {wanted} VMX capability MSRs, stopping at {first_unread:#x}"
    )]
    ShortMsrRead {
        /// MSRs read.
        read: usize,
        /// MSRs asked for.
        wanted: usize,
        /// Index of the first MSR not read.
        first_unread: u32,
    },
    /// KVM_GET_NESTED_STATE failed.
    #[error("KVM_GET_NESTED_STATE failed: {0}")]
    GetNestedState(kvm_ioctls::Error),
    /// KVM_SET_NESTED_STATE failed.
    #[error("KVM_SET_NESTED_STATE failed: {0}")]
    SetNestedState(kvm_ioctls::Error),
    /// A saved nested state that cannot be what KVM_GET_NESTED_STATE returned.
    #[error("saved nested state of {len} bytes is malformed: {why}")]
    BadNestedState {
        /// Its length.
        len: usize,
        /// What is wrong.
        why: &'static str,
    },
}
