//! A TAP device opened through `/dev/net/tun`, non-blocking, with a 12-byte vnet header.

use std::ffi::{c_int, c_short, c_uint, c_ulong, CString};
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use super::VNET_HDR_LEN;

const TUN_PATH: &str = "/dev/net/tun";
/// Interface names are at most IFNAMSIZ bytes with the terminating NUL.
pub const MAX_NAME_LEN: usize = libc::IFNAMSIZ - 1;

/// Errors from the TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name '{0}' is longer than {MAX_NAME_LEN} bytes")]
    NameTooLong(String),
    #[error("TAP name {0:?} is empty or contains a NUL byte")]
    InvalidName(String),
    #[error("cannot open {TUN_PATH}: {0}")]
    OpenTun(io::Error),
    #[error("cannot attach to TAP device '{name}': {err}")]
    SetIff { name: String, err: io::Error },
    #[error("cannot set the vnet header size of TAP device '{name}': {err}")]
    VnetHdrSize { name: String, err: io::Error },
    #[error("cannot set offloads {flags:#x} on TAP device '{name}': {err}")]
    SetOffload {
        name: String,
        flags: c_uint,
        err: io::Error,
    },
}

/// An attached TAP device. Reads and writes carry one frame each, vnet header first.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the TAP device `name`, creating it if it does not exist (a device created here
    /// goes away when the fd closes).
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.len() > MAX_NAME_LEN {
            return Err(TapError::NameTooLong(name.to_owned()));
        }
        let cname = CString::new(name)
            .ok()
            .filter(|c| !c.as_bytes().is_empty())
            .ok_or_else(|| TapError::InvalidName(name.to_owned()))?;
        let existed = interface_exists(&cname);

        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(TUN_PATH)
            .map_err(TapError::OpenTun)?;

        // SAFETY: ifreq is a plain C struct (bytes and a union of integers), valid when zeroed.
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, &src) in ifr.ifr_name.iter_mut().zip(cname.as_bytes()) {
            *dst = src as libc::c_char;
        }
        ifr.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as c_short;
        // SAFETY: TUNSETIFF reads and updates the ifreq, which lives for the whole call.
        if unsafe { ioctl_with_mut_ref(&file, libc::TUNSETIFF as c_ulong, &mut ifr) } < 0 {
            return Err(TapError::SetIff {
                name: name.to_owned(),
                err: io::Error::last_os_error(),
            });
        }
        // Said at the default log level: the user asked for a device that was not there.
        if !existed {
            crate::warn_limited!(
                "TAP device {name} did not exist: created it (it goes away when nvmm exits)"
            );
        }

        let hdr_len = VNET_HDR_LEN as c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int, which lives for the whole call.
        if unsafe { ioctl_with_ref(&file, libc::TUNSETVNETHDRSZ as c_ulong, &hdr_len) } < 0 {
            return Err(TapError::VnetHdrSize {
                name: name.to_owned(),
                err: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            file,
            name: name.to_owned(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the TAP which offloads the guest can receive (`TUN_F_*`): checksum-less and GSO
    /// frames are handed over only if allowed here.
    pub fn set_offload(&self, flags: c_uint) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is shared.
        if unsafe {
            ioctl_with_val(
                &self.file,
                libc::TUNSETOFFLOAD as c_ulong,
                c_ulong::from(flags),
            )
        } < 0
        {
            return Err(TapError::SetOffload {
                name: self.name.clone(),
                flags,
                err: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Reads one frame; `WouldBlock` when none is waiting.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Reads one frame into pieces, in order; `WouldBlock` when none is waiting. A frame longer
    /// than the pieces is cut, so callers pass room for the largest. The pieces must be mapped
    /// and the caller's to fill.
    pub fn readv(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.vectored(libc::readv, iov)
    }

    /// Writes one frame given in pieces (vnet header first), each a buffer the caller keeps
    /// mapped for the call.
    pub fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        self.vectored(libc::writev, iov)
    }

    fn vectored(
        &self,
        call: unsafe extern "C" fn(c_int, *const libc::iovec, c_int) -> libc::ssize_t,
        iov: &[libc::iovec],
    ) -> io::Result<usize> {
        let count =
            c_int::try_from(iov.len()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: the kernel touches only the iovecs and the buffers they describe, which the
        // callers above require to be mapped (and writable for readv); the fd is ours.
        let n = unsafe { call(self.file.as_raw_fd(), iov.as_ptr(), count) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n as usize)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Looked up in the calling thread's network namespace, unlike /sys/class/net, which shows the
/// namespace sysfs was mounted in.
fn interface_exists(name: &CString) -> bool {
    // SAFETY: `name` is a NUL-terminated string that outlives the call.
    unsafe { libc::if_nametoindex(name.as_ptr()) != 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_utils::in_new_netns;

    #[test]
    fn name_errors() {
        assert_eq!(
            Tap::open("a-very-long-tap-name").unwrap_err().to_string(),
            "TAP name 'a-very-long-tap-name' is longer than 15 bytes"
        );
        assert!(matches!(Tap::open(""), Err(TapError::InvalidName(_))));
        assert!(matches!(Tap::open("a\0b"), Err(TapError::InvalidName(_))));
    }

    #[test]
    fn create_attach_and_set_offloads_in_a_private_namespace() {
        let done = in_new_netns(|| {
            let name = "nvmmtap0";
            assert!(!interface_exists(&CString::new(name).unwrap()));
            let tap = Tap::open(name).unwrap();
            assert!(interface_exists(&CString::new(name).unwrap()));
            assert_eq!(tap.name(), name);
            tap.set_offload(libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6)
                .unwrap();
            tap.set_offload(0).unwrap();
            // Nothing to read yet: non-blocking.
            let mut buf = [0u8; 64];
            assert_eq!(
                tap.read(&mut buf).unwrap_err().kind(),
                io::ErrorKind::WouldBlock
            );
            assert!(matches!(
                tap.set_offload(0x1000),
                Err(TapError::SetOffload { .. })
            ));
        });
        if done.is_none() {
            crate::virtio::test_utils::skip("cannot create a network namespace here");
        }
    }
}
