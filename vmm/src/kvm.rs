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
    check(kvm.get_api_version(), |cap| kvm.check_extension(cap))?;
    Ok(kvm)
}

/// Checks an API version and capability set against what nvmm needs.
pub fn check(version: i32, has: impl Fn(Cap) -> bool) -> Result<(), Error> {
    if version != KVM_API_VERSION {
        return Err(Error::ApiVersion(version));
    }
    match REQUIRED_CAPS.iter().find(|(cap, _)| !has(*cap)) {
        Some((_, name)) => Err(Error::MissingCap(name)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_version_and_caps_are_named() {
        assert!(check(12, |_| true).is_ok());
        assert_eq!(check(11, |_| true).unwrap_err().to_string(), "KVM API version 11 is not supported (nvmm needs 12)");
        let e = check(12, |c| !matches!(c, Cap::Irqfd)).unwrap_err();
        assert_eq!(e.to_string(), "the host KVM lacks KVM_CAP_IRQFD, which nvmm needs");
    }
}
