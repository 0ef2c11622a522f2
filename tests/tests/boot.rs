//! nvmm boots the project's Linux kernel to userspace inside the lab (L1 runs nvmm on a real KVM):
//! bzImage and ELF vmlinux, 1 and 2 vCPUs, and memory above the 4 GiB MMIO gap. The guest reports
//! what it sees; nvmm must exit 0 when the guest reboots.
//!
//! The vmlinux boots through its 64-bit entry (`--entry 64bit`): through PVH, the lab's L2 stalls
//! before its first early-console line with QEMU as the L1 VMM just as with nvmm (nested SVM under
//! TCG), so PVH is tested on this machine's own /dev/kvm instead (host_kvm.rs).

use nvmm_tests::guest::{run_cmdline, GuestImage};
use nvmm_tests::{guest_dir, nvmm_bin, Lab, LabRun};

const REPORT: &str = r#"
echo "L2-NPROC=$(nproc)"
echo "L2-MEMKB=$(awk '/MemTotal/ {print $2}' /proc/meminfo)"
"#;

fn boot(kernel: &str, cpus: u32, mem: &str, lab_mem_mib: u32) -> LabRun {
    let entry = if kernel == "vmlinux" { "--entry 64bit" } else { "" };
    let image = GuestImage::new(REPORT).build(&format!("boot-{kernel}-{cpus}-{mem}"));
    let script = format!(
        "/lab/nvmm --kernel /lab/{kernel} {entry} --initrd /lab/l2.cpio --cpus {cpus} --mem {mem} --cmdline '{}'\n\
         echo L1-NVMM-STATUS=$?\n",
        run_cmdline("")
    );
    Lab::new()
        .mem_mib(lab_mem_mib)
        .file(nvmm_bin(), "/lab/nvmm")
        .file(guest_dir().join(kernel), &format!("/lab/{kernel}"))
        .file(image, "/lab/l2.cpio")
        .run(&script)
}

fn mem_kib(run: &LabRun) -> u64 {
    run.value("L2-MEMKB").parse().expect("MemTotal is a number")
}

fn assert_booted(run: &LabRun, cpus: u32, mem_mib: u64) {
    run.assert_marker(&format!("L2-NPROC={cpus}"));
    let kib = mem_kib(run);
    // MemTotal excludes the kernel's own image and reservations: within 15% below what we gave.
    assert!(kib <= mem_mib * 1024 && kib > mem_mib * 1024 * 85 / 100, "guest MemTotal {kib} KiB for --mem {mem_mib}M");
    run.assert_marker("L1-NVMM-STATUS=0");
    run.assert_status(0);
}

#[test]
fn bzimage_one_vcpu() {
    assert_booted(&boot("bzImage", 1, "256M", 2048), 1, 256);
}

#[test]
fn bzimage_two_vcpus() {
    assert_booted(&boot("bzImage", 2, "256M", 2048), 2, 256);
}

#[test]
fn vmlinux_one_vcpu() {
    assert_booted(&boot("vmlinux", 1, "256M", 2048), 1, 256);
}

#[test]
fn vmlinux_two_vcpus() {
    assert_booted(&boot("vmlinux", 2, "256M", 2048), 2, 256);
}

/// 4.5 GiB: 3 GiB below the MMIO gap, the rest from 4 GiB up. The guest must see all of it.
#[test]
fn memory_above_4gib() {
    assert_booted(&boot("bzImage", 2, "4608M", 6144), 2, 4608);
}
