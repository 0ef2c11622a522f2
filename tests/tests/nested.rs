//! `--nested` in the lab: L1 (QEMU TCG with nested SVM) runs nvmm, whose guest L2 gets SVM and a
//! working KVM only with --nested, and can then run nvmm itself for L3.

use nvmm_tests::guest::{run_cmdline, GuestImage};
use nvmm_tests::{guest_dir, nvmm_bin, Lab, LabRun};

/// Boots L2 from L1 with `nvmm_flags`, running `l2_script` in L2 with nvmm and the kernel at hand.
fn l2_run(name: &str, nvmm_flags: &str, l2_script: &str, extra: Option<(&std::path::Path, &str)>) -> LabRun {
    let mut image = GuestImage::new(l2_script).file(nvmm_bin(), "/lab/nvmm").file(guest_dir().join("bzImage"), "/lab/bzImage");
    if let Some((src, dst)) = extra {
        image = image.file(src, dst);
    }
    let image = image.build(name);
    let script = format!(
        "/lab/nvmm {nvmm_flags} --kernel /lab/bzImage --initrd /lab/l2.cpio --mem 512M --cmdline '{}'\necho L1-NVMM-STATUS=$?\n",
        run_cmdline("")
    );
    Lab::new()
        .append("nvmm.layer=1")
        .file(nvmm_bin(), "/lab/nvmm")
        .file(guest_dir().join("bzImage"), "/lab/bzImage")
        .file(image, "/lab/l2.cpio")
        .run(&script)
}

/// Inspects L2. `nvmm --nested` is pointed at a missing kernel: the nested preflight runs first, so
/// its error (or, when nesting works, the missing-kernel error after it) is all that is checked,
/// without booting another layer.
const L2_INSPECT: &str = r#"
grep -qw svm /proc/cpuinfo && echo L2-SVM-FLAG
[ -c /dev/kvm ] && echo L2-DEV-KVM
echo "L2-NESTED-PARAM=$(cat /sys/module/kvm_amd/parameters/nested 2>/dev/null)"
/lab/nvmm check
echo "L2-CHECK-STATUS=$?"
/lab/nvmm --nested --kernel /nonexistent --mem 64M 2>/tmp/err
echo "L2-NESTED-STATUS=$?"
echo "L2-NESTED-ERR=$(cat /tmp/err)"
exit 0
"#;

#[test]
fn nested_guest_gets_svm_and_a_working_kvm() {
    let run = l2_run("nested-on", "--nested", L2_INSPECT, None);
    run.assert_marker("L2-SVM-FLAG");
    run.assert_marker("L2-DEV-KVM");
    run.assert_marker("L2-NESTED-PARAM=1");
    run.assert_marker("nvmm check: AMD CPU, kvm_amd, layer L2");
    run.assert_marker("PASS  nested virtualization: ready");
    run.assert_marker("L2-CHECK-STATUS=0");
    // The preflight passed: what stopped nvmm was the missing kernel.
    run.assert_marker("L2-NESTED-ERR=nvmm: error: cannot open kernel /nonexistent");
    run.assert_marker("L1-NVMM-STATUS=0");
    run.assert_status(0);
}

#[test]
fn without_nested_the_guest_has_no_svm_and_nvmm_nested_explains() {
    let run = l2_run("nested-off", "", L2_INSPECT, None);
    assert!(!run.has("L2-SVM-FLAG"), "svm must be hidden without --nested");
    assert!(!run.has("L2-DEV-KVM"), "/dev/kvm must be absent without --nested");
    run.assert_marker("L2-NESTED-STATUS=1");
    // No /dev/kvm in L2: the preflight says so in one line and names the fix.
    run.assert_marker("L2-NESTED-ERR=nvmm: error: /dev/kvm not found");
    run.assert_marker("L1-NVMM-STATUS=0");
    run.assert_status(0);
}

#[test]
fn three_layers_marker_comes_back_through_every_console() {
    let l3 = GuestImage::new("echo \"L3-USERSPACE-MARKER nproc=$(nproc)\"\n").build("l3");
    let l2_script = format!(
        "/lab/nvmm --kernel /lab/bzImage --initrd /lab/l3.cpio --mem 128M --cmdline '{}'\necho L2-NVMM-STATUS=$?\n",
        run_cmdline("")
    );
    let run = l2_run("three-layers", "--nested", &l2_script, Some((&l3, "/lab/l3.cpio")));
    run.assert_marker("L3-USERSPACE-MARKER nproc=1");
    run.assert_marker("L2-NVMM-STATUS=0");
    run.assert_marker("L1-NVMM-STATUS=0");
    run.assert_status(0);
}
