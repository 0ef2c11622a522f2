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
    boot_with(kernel, cpus, mem, lab_mem_mib, "")
}

/// [`boot`] with more nvmm flags.
fn boot_with(kernel: &str, cpus: u32, mem: &str, lab_mem_mib: u32, flags: &str) -> LabRun {
    let entry = if kernel == "vmlinux" { "--entry 64bit" } else { "" };
    let image = GuestImage::new(REPORT).build(&format!("boot-{kernel}-{cpus}-{mem}"));
    let script = format!(
        "/lab/nvmm {flags} --kernel /lab/{kernel} {entry} --initrd /lab/l2.cpio --cpus {cpus} --mem {mem} --cmdline '{}'\n\
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

/// The first number after `key` on the first line that has `key` (nvmm's log lines).
fn number_after(run: &LabRun, key: &str) -> u64 {
    let line = run.output.lines().find(|l| l.contains(key)).unwrap_or_else(|| panic!("no {key:?} on the console; tail:\n{}", run.tail(40)));
    let rest = &line[line.find(key).unwrap_or(0) + key.len()..];
    rest.split(|c: char| !c.is_ascii_digit()).find(|w| !w.is_empty()).and_then(|w| w.parse().ok()).unwrap_or_else(|| panic!("no number after {key:?} in {line:?}"))
}

/// nvmm maps the boot's memory (low memory, the bzImage, the buffer it decompresses into, the
/// initrd) in KVM's page tables before the first KVM_RUN. Without that the guest takes a nested
/// page fault for every page of it that it touches, which is nearly all of it; with it, KVM's
/// count of page faults (pages, 4 KiB each) stays below what was mapped.
#[test]
fn bzimage_boot_memory_is_mapped_before_the_guest_runs() {
    let run = boot_with("bzImage", 1, "256M", 2048, "--log-level info");
    assert_booted(&run, 1, 256);
    let mapped_kib = number_after(&run, "nvmm: info: prefault: ");
    assert!(mapped_kib >= 14 << 10, "the kernel's decompression buffer alone is 14 MiB; mapped {mapped_kib} KiB");
    let faults = number_after(&run, " pf_taken ");
    assert!(faults * 4 < mapped_kib, "{faults} page faults (4 KiB each) for {mapped_kib} KiB mapped in advance");
}

/// 4.5 GiB: 3 GiB below the MMIO gap, the rest from 4 GiB up. The guest must see all of it.
#[test]
fn memory_above_4gib() {
    assert_booted(&boot("bzImage", 2, "4608M", 6144), 2, 4608);
}
