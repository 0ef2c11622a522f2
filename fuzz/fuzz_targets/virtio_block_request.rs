//! Block requests from arbitrary descriptor chains against a real 64 KiB disk image. The first
//! input byte picks read-only (bit 0); the rest is the shape and contents of guest memory (see
//! `nvmm_fuzz::guest`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use nvmm_devices::virtio::block::{process_queue, Disk};
use nvmm_fuzz::{disk_image, DISK_LEN};

fuzz_target!(|data: &[u8]| {
    let Some((&flags, memory)) = data.split_first() else {
        return;
    };
    let file = disk_image().try_clone().expect("cannot dup the disk image");
    let mut disk = Disk::from_file(file, flags & 1 != 0, *b"nvmm-fuzz-serial\0\0\0\0")
        .expect("cannot open the disk image");
    let (mem, mut queue) = nvmm_fuzz::guest(memory);
    process_queue(&mem, &mut queue, &mut disk);
    let len = disk_image().metadata().map(|m| m.len()).ok();
    assert_eq!(len, Some(DISK_LEN), "requests never grow the image");
});
