//! Block requests from arbitrary descriptor chains against a real 64 KiB disk image. The first
//! input byte picks read-only (bit 0); the rest is the shape and contents of guest memory (see
//! `nvmm_fuzz::guest`).

#![no_main]

use std::fs::File;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nvmm_devices::virtio::block::{process_queue, Disk};

const DISK_LEN: u64 = 0x1_0000;

/// One image for the whole run, created once and unlinked at once; each input gets a dup of it.
fn image() -> &'static File {
    static IMAGE: OnceLock<File> = OnceLock::new();
    IMAGE.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("nvmm-fuzz-disk-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .expect("cannot create the disk image");
        let _ = std::fs::remove_file(&path);
        file.set_len(DISK_LEN).expect("cannot size the disk image");
        file
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, memory)) = data.split_first() else {
        return;
    };
    let file = image().try_clone().expect("cannot dup the disk image");
    let mut disk = Disk::from_file(file, flags & 1 != 0, *b"nvmm-fuzz-serial\0\0\0\0")
        .expect("cannot open the disk image");
    let (mem, mut queue) = nvmm_fuzz::guest(memory);
    process_queue(&mem, &mut queue, &mut disk);
    let len = image().metadata().map(|m| m.len()).ok();
    assert_eq!(len, Some(DISK_LEN), "requests never grow the image");
});
