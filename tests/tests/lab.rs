//! Smoke tests of the lab itself (tools/lab.sh, the guest kernel and initramfs), independent
//! of nvmm: if these fail, every nvmm integration test would fail for reasons not its own.

use std::process::Command;

use nvmm_tests::{guest_dir, Lab};

#[test]
fn lab_guest_has_nested_kvm() {
    let run = Lab::new().timeout(300).run(
        r#"
grep -qw svm /proc/cpuinfo && echo LAB-SVM-OK
[ -c /dev/kvm ] && echo LAB-DEVKVM-OK
nested=$(cat /sys/module/kvm_amd/parameters/nested)
echo "nested=$nested"
case "$nested" in 1|Y) echo LAB-NESTED-OK ;; esac
"#,
    );
    run.assert_marker("NVMM-USERSPACE");
    run.assert_marker("LAB-SVM-OK");
    run.assert_marker("LAB-DEVKVM-OK");
    run.assert_marker("LAB-NESTED-OK");
    run.assert_status(0);
}

#[test]
fn lab_reports_the_script_status() {
    let run = Lab::new().timeout(300).run("echo LAB-BEFORE-EXIT\nexit 3\n");
    run.assert_marker("LAB-BEFORE-EXIT");
    assert_eq!(run.status, Some(3), "console:\n{}", run.tail(20));
}

/// The lab carries nvmm's guest images in its initramfs: files added with `.file()` must
/// arrive intact, and `--drive` images appear as /dev/vda, /dev/vdb in order.
#[test]
fn lab_files_and_drives_arrive_intact() {
    let guest = guest_dir();
    let sum = |p: &std::path::Path| {
        let out = Command::new("sha256sum").arg(p).output().expect("sha256sum");
        String::from_utf8(out.stdout).unwrap().split(' ').next().unwrap().to_string()
    };
    let kernel_sum = sum(&guest.join("bzImage"));
    let initramfs_sum = sum(&guest.join("initramfs.cpio"));

    let dir = std::env::temp_dir().join(format!("nvmm-lab-drives-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("a.img"), dir.join("b.img"));
    for (path, tag) in [(&a, "DRIVE-A"), (&b, "DRIVE-B")] {
        let mut data = tag.as_bytes().to_vec();
        data.resize(1 << 20, 0);
        std::fs::write(path, data).unwrap();
    }

    let run = Lab::new()
        .timeout(300)
        .file(guest.join("bzImage"), "/lab/guest/bzImage")
        .file(guest.join("initramfs.cpio"), "/lab/guest/initramfs.cpio")
        .drive(&a)
        .drive(&b)
        .run(&format!(
            r#"
[ "$(sha256sum /lab/guest/bzImage | cut -d' ' -f1)" = {kernel_sum} ] && echo LAB-KERNEL-OK
[ "$(sha256sum /lab/guest/initramfs.cpio | cut -d' ' -f1)" = {initramfs_sum} ] && echo LAB-INITRAMFS-OK
[ "$(head -c 7 /dev/vda)" = DRIVE-A ] && echo LAB-VDA-OK
[ "$(head -c 7 /dev/vdb)" = DRIVE-B ] && echo LAB-VDB-OK
"#
        ));
    let _ = std::fs::remove_dir_all(&dir);
    run.assert_marker("LAB-KERNEL-OK");
    run.assert_marker("LAB-INITRAMFS-OK");
    run.assert_marker("LAB-VDA-OK");
    run.assert_marker("LAB-VDB-OK");
    run.assert_status(0);
}

#[test]
fn lab_reports_a_timeout_as_no_status() {
    let run = Lab::new().timeout(20).run("echo LAB-SLEEPING\nsleep 600\n");
    assert_eq!(run.status, None, "console:\n{}", run.tail(20));
    run.assert_marker("lab: no exit status: timed out");
}
