//! kvm-unit-tests under nvmm in the lab, a representative subset that fits the suite's time budget:
//! at L1 an exit test, an SMP test, a suspend to RAM and back (ACPI S3, woken by the CMOS RTC's
//! alarm), the NPT tests and svm.flat's core subtests; at L2
//! (nvmm --nested at L1 boots a Linux whose nvmm runs the test) the exit test and svm's core. The
//! whole suite, side by side with QEMU, is `tools/kvm-unit-tests.sh` (see the README).

use std::path::PathBuf;
use std::process::Command;

use nvmm_tests::guest::{run_cmdline, GuestImage};
use nvmm_tests::{guest_dir, nvmm_bin, repo_root, Lab, LabRun};

/// svm.flat's subtests run here: VMRUN itself, I/O and CR3 intercepts, event injection, ASIDs,
/// the TSC offset, and an intercepted SMI, which then enters SMM in the test itself (nvmm's SMRAM)
/// (the subtests TCG's SVM gets wrong or takes minutes over are never here).
const SVM_CORE: &str =
    "null vmrun ioio vmrun_intercept_check cr3_read_intercept dr_intercept_check asid_zero tsc_adjust mode_switch svm_intr_intercept_mix_smi";

/// Builds the suite (tools/kvm-unit-tests.sh --build-only) and returns its x86 directory.
fn suite() -> PathBuf {
    let out = Command::new(repo_root().join("tools/kvm-unit-tests.sh")).arg("--build-only").output().expect("run tools/kvm-unit-tests.sh");
    assert!(out.status.success(), "kvm-unit-tests did not build: {}", String::from_utf8_lossy(&out.stderr));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// A shell function for the lab that runs one test under nvmm and prints `KUT-<name>=<status>`
/// after the test's output (each line prefixed with its name).
const RUN_ONE: &str = r#"
kut() {
    name=$1 file=$2 cpus=$3 mem=$4; shift 4
    timeout 900 /lab/nvmm --nested --debug-exit --kernel /lab/kut/$file --cpus $cpus --mem $mem --cmdline="$*" \
        < /dev/null > /tmp/$name.log 2>&1
    status=$?
    sed "s/^/$name: /" /tmp/$name.log
    echo "KUT-$name=$status"
}
"#;

/// Asserts that `name` passed (status 1: no failure) and, when it prints a summary (vmexit does
/// not), that the summary begins with `summary`.
fn assert_passed(run: &LabRun, name: &str, summary: Option<&str>) {
    assert_eq!(run.value(&format!("KUT-{name}")), "1", "{name} did not pass; console tail:\n{}", run.tail(60));
    if let Some(summary) = summary {
        run.assert_marker(&format!("{name}: SUMMARY: {summary}"));
    }
}

#[test]
fn kvm_unit_tests_pass_at_l1() {
    let kut = suite();
    let script = format!(
        "{RUN_ONE}
kut vmexit_cpuid vmexit.flat 1 128M cpuid
kut smptest smptest.flat 2 128M
kut s3 s3.flat 1 128M
kut svm_npt svm_npt.flat 2 1024M
kut svm svm.flat 2 1024M {SVM_CORE}
exit 0
"
    );
    let run = Lab::new()
        .mem_mib(3072)
        .timeout(1500)
        .file(nvmm_bin(), "/lab/nvmm")
        .file(kut.join("vmexit.flat"), "/lab/kut/vmexit.flat")
        .file(kut.join("smptest.flat"), "/lab/kut/smptest.flat")
        .file(kut.join("s3.flat"), "/lab/kut/s3.flat")
        .file(kut.join("svm_npt.flat"), "/lab/kut/svm_npt.flat")
        .file(kut.join("svm.flat"), "/lab/kut/svm.flat")
        .run(&script);
    run.assert_status(0);
    // vmexit reports its cycle count; smptest needs fw_cfg's CPU count to see both CPUs.
    assert_passed(&run, "vmexit_cpuid", None);
    run.assert_marker("vmexit_cpuid: cpuid ");
    assert_passed(&run, "smptest", Some("1 tests"));
    run.assert_marker("smptest: found 2 cpus");
    // s3 passes from its resume code, which reports the word the code after the sleep request
    // would have set to 1. An nvmm error also exits 1: the test must have reached its sleep, and
    // nvmm must have said nothing of an error.
    assert_passed(&run, "s3", None);
    run.assert_marker("s3: resume vector addr is");
    run.assert_marker("s3: PM1a event registers at 60c");
    assert!(!run.has("s3: nvmm: error"), "nvmm failed in s3; console tail:\n{}", run.tail(60));
    assert_passed(&run, "svm_npt", Some("138 tests, 3 skipped"));
    assert_passed(&run, "svm", Some("11 tests"));
    for sub in ["null", "vmrun", "ioio", "asid_zero", "tsc_adjust", "svm_intr_intercept_mix_smi"] {
        run.assert_marker(&format!("svm: SVM test: {sub}"));
    }
}

#[test]
fn kvm_unit_tests_pass_at_l2() {
    let kut = suite();
    let l2_script = format!(
        "{RUN_ONE}
kut vmexit_cpuid vmexit.flat 1 128M cpuid
kut svm svm.flat 1 512M null vmrun ioio asid_zero
exit 0
"
    );
    let image = GuestImage::new(&l2_script)
        .file(nvmm_bin(), "/lab/nvmm")
        .file(kut.join("vmexit.flat"), "/lab/kut/vmexit.flat")
        .file(kut.join("svm.flat"), "/lab/kut/svm.flat")
        .build("kvm-unit-tests-l2");
    let script = format!(
        "/lab/nvmm --nested --kernel /lab/bzImage --initrd /lab/l2.cpio --mem 1024M --cmdline '{}' < /dev/null\necho L1-NVMM-STATUS=$?\n",
        run_cmdline("")
    );
    let run = Lab::new()
        .append("nvmm.layer=1")
        .timeout(1500)
        .file(nvmm_bin(), "/lab/nvmm")
        .file(guest_dir().join("bzImage"), "/lab/bzImage")
        .file(image, "/lab/l2.cpio")
        .run(&script);
    assert_passed(&run, "vmexit_cpuid", None);
    run.assert_marker("vmexit_cpuid: cpuid ");
    assert_passed(&run, "svm", Some("4 tests"));
    run.assert_marker("L1-NVMM-STATUS=0");
}
