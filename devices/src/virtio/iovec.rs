//! Guest buffers as iovecs for the readv/writev family of calls, so the kernel moves the bytes
//! between a file and guest memory without a copy of ours.

use vm_memory::{GuestAddress, GuestMemory, GuestMemoryError, GuestMemoryMmap, Permissions};

/// The most iovecs one readv/writev-family call takes (Linux's UIO_MAXIOV).
pub(crate) const IOV_MAX: usize = 1024;

/// Appends iovecs covering `len` bytes of guest memory at `addr`, one per memory region the range
/// spans. `access` is what the kernel will do to them: `Write` for reads into the guest.
///
/// The iovecs stay valid while `mem` is alive: it owns the mappings. (vm-memory's pointer guards
/// only pin memory with its Xen feature, which nvmm does not use.)
pub(crate) fn push_guest_iovecs(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: usize,
    access: Permissions,
    out: &mut Vec<libc::iovec>,
) -> Result<(), GuestMemoryError> {
    for slice in mem.get_slices(addr, len, access)? {
        let slice = slice?;
        let (base, len) = match access {
            Permissions::Write | Permissions::ReadWrite => {
                let g = slice.ptr_guard_mut();
                (g.as_ptr(), g.len())
            }
            _ => {
                let g = slice.ptr_guard();
                (g.as_ptr().cast_mut(), g.len())
            }
        };
        out.push(libc::iovec {
            iov_base: base.cast(),
            iov_len: len,
        });
    }
    Ok(())
}

/// Drops the first `done` bytes from `iov`: whole iovecs, then the front of a partial one.
pub(crate) fn advance(iov: &mut [libc::iovec], mut done: usize) -> &mut [libc::iovec] {
    let mut first = 0;
    while first < iov.len() && done >= iov[first].iov_len {
        done -= iov[first].iov_len;
        first += 1;
    }
    let rest = &mut iov[first..];
    if let Some(partial) = rest.first_mut() {
        // SAFETY: done < iov_len, so the pointer stays inside the same buffer.
        partial.iov_base = unsafe { partial.iov_base.cast::<u8>().add(done) }.cast();
        partial.iov_len -= done;
    }
    rest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advance_skips_whole_and_partial_iovecs() {
        let mut bufs = [[0u8; 10]; 3];
        let mut iov: Vec<libc::iovec> = bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        let base1 = iov[1].iov_base as usize;
        let rest = advance(&mut iov, 14);
        assert_eq!(rest.len(), 2);
        assert_eq!(rest[0].iov_base as usize, base1 + 4);
        assert_eq!(rest[0].iov_len, 6);
        assert_eq!(advance(rest, 16).len(), 0);
    }
}
