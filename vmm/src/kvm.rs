//! Opening `/dev/kvm` and checking that it offers what nvmm needs, with errors that name the cause.

use kvm_ioctls::{Cap, Kvm};

pub const KVM_PATH: &str = "/dev/kvm";
const KVM_API_VERSION: i32 = 12;

/// Capabilities the VM builder relies on, with the name a user can look up.
pub const REQUIRED_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::ImmediateExit, "KVM_CAP_IMMEDIATE_EXIT"),
];

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{KVM_PATH} not found: load kvm_intel or kvm_amd (and enable virtualization in the firmware)")]
    Missing,
    #[error("no permission to open {KVM_PATH}: run as root or add this user to the 'kvm' group")]
    Permission,
    #[error("cannot open {KVM_PATH}: {0}")]
    Open(#[source] kvm_ioctls::Error),
    #[error("KVM API version {0} is not supported (nvmm needs {KVM_API_VERSION})")]
    ApiVersion(i32),
    #[error("the host KVM lacks {0}, which nvmm needs")]
    MissingCap(&'static str),
}

/// Opens `/dev/kvm` and checks the API version and every capability in [`REQUIRED_CAPS`].
pub fn open() -> Result<Kvm, Error> {
    let kvm = Kvm::new().map_err(|e| match e.errno() {
        libc::ENOENT => Error::Missing,
        libc::EACCES | libc::EPERM => Error::Permission,
        _ => Error::Open(e),
    })?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(Error::ApiVersion(version));
    }
    if let Some((_, name)) = REQUIRED_CAPS.iter().find(|(cap, _)| !kvm.check_extension(*cap)) {
        return Err(Error::MissingCap(name));
    }
    Ok(kvm)
}
