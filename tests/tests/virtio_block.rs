//! virtio-blk in the lab: the host builds ext4 images with known files, L1 hands them to nvmm as
//! `--disk` (one read-write, one `readonly=on`), and L2 mounts them, checks the files, writes new
//! ones and tries to write the read-only disk (mount, remount, raw `dd`). Afterwards the host reads the
//! images with `debugfs`: the new files must be there, byte for byte, and the read-only image
//! must not have changed at all. A second test kills nvmm with SIGKILL after L2 has flushed a
//! file: the file must be on the image all the same.

use std::path::{Path, PathBuf};
use std::process::Command;

use nvmm_tests::guest::{run_cmdline, GuestImage};
use nvmm_tests::{guest_dir, nvmm_bin, scratch_dir, Lab};

/// Deterministic pseudo-random bytes (xorshift64*), so the known files need no randomness.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
    out.truncate(len);
    out
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e} (e2fsprogs and coreutils are needed on the host)")
    });
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn sha256(path: &Path) -> String {
    let out = run(Command::new("sha256sum").arg(path));
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum prints a hash")
        .to_string()
}

fn sha256_bytes(dir: &Path, bytes: &[u8]) -> String {
    let f = dir.join("hash-input");
    std::fs::write(&f, bytes).expect("write hash input");
    let h = sha256(&f);
    std::fs::remove_file(&f).expect("remove hash input");
    h
}

/// An ext4 image of `size_mib` MiB holding the tree `dir` (`mkfs.ext4 -d`).
fn mkfs_ext4(image: &Path, dir: &Path, size_mib: u32) {
    let _ = std::fs::remove_file(image);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(dir)
        .arg(image)
        .arg(format!("{size_mib}M")));
}

/// A file's contents as the host's ext4 tools read them from the image (no kernel mount).
fn debugfs_read(image: &Path, path: &str) -> Vec<u8> {
    let out_file = image.with_extension(format!("dump{}", path.replace('/', "_")));
    let _ = std::fs::remove_file(&out_file);
    // debugfs exits 0 even when the file is missing; the dump is then absent.
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("dump {path} {}", out_file.display()))
        .arg(image));
    let bytes = std::fs::read(&out_file)
        .unwrap_or_else(|e| panic!("debugfs found no {path} on {}: {e}", image.display()));
    std::fs::remove_file(&out_file).expect("remove dump");
    bytes
}

/// `e2fsck -f` with `flags`; returns its exit status (0 clean, 1 errors corrected, 4+ not fixed).
fn e2fsck(image: &Path, flags: &str) -> i32 {
    let out = Command::new("e2fsck")
        .args(["-f", flags])
        .arg(image)
        .output()
        .expect("run e2fsck");
    eprintln!(
        "e2fsck {flags} {}:\n{}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.status.code().expect("e2fsck exited normally")
}

/// The command in L1 that boots L2 (/lab/bzImage, /lab/l2.cpio) under nvmm with `disks`.
fn l2_command(disks: &str) -> String {
    format!(
        "/lab/nvmm --kernel /lab/bzImage --initrd /lab/l2.cpio --mem 256M {disks} --cmdline '{}' </dev/null",
        run_cmdline("")
    )
}

/// L1's part: boot L2 with `disks` and report nvmm's status.
fn l1_script(disks: &str) -> String {
    format!("{}\necho L1-NVMM-STATUS=$?\n", l2_command(disks))
}

/// An empty directory at `path`, whatever an earlier run left there.
fn fresh_dir(path: PathBuf) -> PathBuf {
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).unwrap();
    path
}

/// What L2 does with the two disks. `sha256sum` lines are prefixed so the test can find them.
const L2_FILES: &str = r#"
mkdir -p /mnt/rw /mnt/ro
mount -t ext4 /dev/vda /mnt/rw && echo L2-MOUNTED-RW
cd /mnt/rw
sha256sum hello.txt data/random.bin deep/a/b/c/note.txt | sed 's/^/L2-SUM /'
echo "L2-EMPTY-SIZE=$(stat -c %s data/empty)"

# New files: text the host can predict, random bytes whose hash we print, and an append.
mkdir -p new
seq 1 20000 | sed 's/^/written by L2 /' > new/lines.txt
dd if=/dev/urandom of=new/random.bin bs=64k count=64 2>/dev/null
echo "appended by L2" >> hello.txt
echo "L2-NEW-RANDOM=$(sha256sum new/random.bin | cut -d' ' -f1)"
sync && echo L2-SYNCED
cd /
umount /mnt/rw && echo L2-UMOUNTED
# Read back from the device (the unmount dropped the cached pages).
mount -t ext4 /dev/vda /mnt/rw
echo "L2-REREAD-RANDOM=$(sha256sum /mnt/rw/new/random.bin | cut -d' ' -f1)"
umount /mnt/rw

# The read-only disk: the kernel learns it from the device, mounts end up read-only, and every
# write is refused; the host checks the image did not change.
echo "L2-VDB-RO=$(cat /sys/block/vdb/ro)"
mount -t ext4 /dev/vdb /mnt/ro
echo "L2-RO-MOUNT=$(awk '$2 == "/mnt/ro" { split($4, o, ","); print o[1] }' /proc/mounts)"
echo "L2-RO-KNOWN=$(sha256sum /mnt/ro/known.txt | cut -d' ' -f1)"
touch /mnt/ro/new 2>/dev/null; echo "L2-RO-TOUCH=$?"
mount -o remount,rw /mnt/ro 2>/dev/null; echo "L2-RO-REMOUNT-RW=$?"
umount /mnt/ro
dd if=/dev/zero of=/dev/vdb bs=4096 count=1 oflag=direct 2>/tmp/dd.err; echo "L2-RO-DD=$?"
echo "L2-RO-DD-ERR=$(grep -m 1 'dd:' /tmp/dd.err)"
echo L2-DONE
"#;

#[test]
fn ext4_files_survive_both_ways_and_the_read_only_disk_stays_unchanged() {
    let dir = scratch_dir("virtio-block-files");
    let tree = fresh_dir(dir.join("tree"));
    let hello = b"hello from the host\n".to_vec();
    let random = pattern(0x6e76_6d6d, 3 << 20);
    let note = b"three directories down\n".to_vec();
    std::fs::create_dir_all(tree.join("data")).unwrap();
    std::fs::create_dir_all(tree.join("deep/a/b/c")).unwrap();
    std::fs::write(tree.join("hello.txt"), &hello).unwrap();
    std::fs::write(tree.join("data/random.bin"), &random).unwrap();
    std::fs::write(tree.join("data/empty"), b"").unwrap();
    std::fs::write(tree.join("deep/a/b/c/note.txt"), &note).unwrap();
    let rw_image = dir.join("rw.img");
    mkfs_ext4(&rw_image, &tree, 64);

    let ro_tree = fresh_dir(dir.join("ro-tree"));
    let known = pattern(42, 100_000);
    std::fs::write(ro_tree.join("known.txt"), &known).unwrap();
    let ro_image = dir.join("ro.img");
    mkfs_ext4(&ro_image, &ro_tree, 16);
    let ro_before = sha256(&ro_image);

    let l2 = GuestImage::new(L2_FILES).build("virtio-block-files");
    let run = Lab::new()
        .timeout(1200)
        .file(nvmm_bin(), "/lab/nvmm")
        .file(guest_dir().join("bzImage"), "/lab/bzImage")
        .file(l2, "/lab/l2.cpio")
        .drive(&rw_image)
        .drive(&ro_image)
        .run(&l1_script(
            "--disk path=/dev/vda --disk path=/dev/vdb,readonly=on",
        ));

    // L2 read the host's files.
    run.assert_marker("L2-MOUNTED-RW");
    for (name, bytes) in [
        ("hello.txt", &hello),
        ("data/random.bin", &random),
        ("deep/a/b/c/note.txt", &note),
    ] {
        run.assert_marker(&format!("L2-SUM {}  {name}", sha256_bytes(&dir, bytes)));
    }
    assert_eq!(run.value("L2-EMPTY-SIZE"), "0");
    run.assert_marker("L2-SYNCED");
    run.assert_marker("L2-UMOUNTED");
    let new_random = run.value("L2-NEW-RANDOM");
    assert_eq!(
        run.value("L2-REREAD-RANDOM"),
        new_random,
        "L2 read back other bytes than it wrote"
    );

    // Read-only disk, as L2 saw it.
    assert_eq!(
        run.value("L2-VDB-RO"),
        "1",
        "the guest kernel must see /dev/vdb as read-only"
    );
    assert_eq!(run.value("L2-RO-MOUNT"), "ro");
    assert_eq!(
        run.value("L2-RO-KNOWN"),
        sha256_bytes(&dir, &known)
    );
    assert_ne!(
        run.value("L2-RO-TOUCH"),
        "0",
        "creating a file on the read-only disk succeeded"
    );
    assert_ne!(
        run.value("L2-RO-REMOUNT-RW"),
        "0",
        "the read-only disk could be remounted read-write"
    );
    // The guest kernel refuses the write itself (EPERM), since nvmm offered VIRTIO_BLK_F_RO; it never
    // sends a write request to such a disk, by any path (a shared writable mapping of the device is
    // refused too). nvmm's own refusal of such requests is unit-tested in devices/.../request.rs.
    assert_ne!(
        run.value("L2-RO-DD"),
        "0",
        "a raw write to the read-only disk succeeded"
    );
    let dd_err = run.value("L2-RO-DD-ERR");
    assert!(
        dd_err.contains("Operation not permitted") || dd_err.contains("I/O error"),
        "unexpected dd error: {dd_err}"
    );
    run.assert_marker("L2-DONE");
    run.assert_marker("L1-NVMM-STATUS=0");
    run.assert_status(0);

    // The host's view of the images.
    assert_eq!(sha256(&ro_image), ro_before, "the read-only image changed");
    assert_eq!(
        e2fsck(&rw_image, "-n"),
        0,
        "the read-write image is not clean after L2 unmounted it"
    );
    let mut hello_after = hello.clone();
    hello_after.extend_from_slice(b"appended by L2\n");
    assert_eq!(debugfs_read(&rw_image, "/hello.txt"), hello_after);
    let lines: String = (1..=20000)
        .map(|i| format!("written by L2 {i}\n"))
        .collect();
    assert!(
        debugfs_read(&rw_image, "/new/lines.txt") == lines.as_bytes(),
        "/new/lines.txt differs from what L2 wrote"
    );
    assert_eq!(
        sha256_bytes(&dir, &debugfs_read(&rw_image, "/new/random.bin")),
        new_random
    );
    assert_eq!(debugfs_read(&rw_image, "/data/random.bin"), random);
}

/// L2 flushes a file, says so, and keeps writing; the host kills the whole lab (QEMU) as soon as
/// it sees the marker, a power cut for L1 with nothing synced there. What L2 flushed must be on
/// the image: only nvmm's flush (an fsync of /dev/vda in L1) can have moved it out of L1's page
/// cache in time, so a FLUSH that did nothing fails this test.
const L2_FLUSH_THEN_WRITE: &str = r#"
mkdir -p /mnt/rw
mount -t ext4 /dev/vda /mnt/rw || exit 1
dd if=/dev/urandom of=/mnt/rw/flushed.bin bs=64k count=64 conv=fsync 2>/dev/null || exit 1
sync
echo "L2-FLUSHED=$(sha256sum /mnt/rw/flushed.bin | cut -d' ' -f1)"
i=0
while :; do
    i=$((i + 1))
    dd if=/dev/urandom of=/mnt/rw/busy.$((i % 4)) bs=64k count=16 2>/dev/null
    echo "L2-STILL-WRITING $i"
done
"#;

/// L1's part after the command that starts L2 in the background: show L2's console as it comes,
/// and nothing else until nvmm ends (it should not: the host kills the lab first). No sync: L1
/// never writes its page cache out on purpose.
const L1_RELAY: &str = r#"
pid=$!
tail -f /tmp/l2.log | while read -r line; do echo "L2: $line"; done &
wait $pid
echo "L1-NVMM-STATUS=$?"
sleep 1
"#;

#[test]
fn data_flushed_before_the_lab_is_killed_is_on_the_image() {
    let dir = scratch_dir("virtio-block-kill");
    let tree = fresh_dir(dir.join("tree"));
    std::fs::write(tree.join("before.txt"), b"present before the run\n").unwrap();
    let image = dir.join("disk.img");
    mkfs_ext4(&image, &tree, 64);

    let l2 = GuestImage::new(L2_FLUSH_THEN_WRITE).build("virtio-block-kill");
    let run = Lab::new()
        .timeout(1200)
        .file(nvmm_bin(), "/lab/nvmm")
        .file(guest_dir().join("bzImage"), "/lab/bzImage")
        .file(l2, "/lab/l2.cpio")
        .drive(&image)
        .kill_on("L2-FLUSHED=")
        .run(&format!(": >/tmp/l2.log\n{} >>/tmp/l2.log 2>&1 &{L1_RELAY}", l2_command("--disk path=/dev/vda")));

    let flushed = run.value("L2: L2-FLUSHED");
    assert!(run.has(nvmm_tests::KILLED), "the lab was not killed after the flush");
    assert_eq!(run.status, None, "the lab ended on its own");

    // The guest never unmounted: replay the journal as a reboot would, then read.
    let fsck = e2fsck(&image, "-y");
    assert!(
        fsck <= 1,
        "e2fsck could not repair the image after the kill (status {fsck})"
    );
    assert_eq!(
        sha256_bytes(&dir, &debugfs_read(&image, "/flushed.bin")),
        flushed,
        "flushed data lost"
    );
    assert_eq!(
        debugfs_read(&image, "/before.txt"),
        b"present before the run\n"
    );
}
