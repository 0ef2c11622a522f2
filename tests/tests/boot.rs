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
echo "L2-PACKAGES=$(cat /sys/devices/system/cpu/cpu*/topology/physical_package_id | sort -u | wc -l)"
if dmesg | grep -q "TSCs unsynchronized"; then echo "L2-TSC=unsynchronized"; else echo "L2-TSC=synchronized"; fi
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
    // Every vCPU is a core of one package (the topology leaf's core level, which nvmm adds): as
    // separate packages, an AMD guest would mark its TSC unstable.
    run.assert_marker("L2-PACKAGES=1");
    run.assert_marker("L2-TSC=synchronized");
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

/// Guest RAM on transparent huge pages (`--thp on`, the default; the lab's kernel has THP in
/// madvise mode) is mapped by KVM with 2 MiB entries: the exit profile's count of the pages KVM
/// maps shows some. With `--thp off` it shows none, so the count tells the two apart.
#[test]
fn bzimage_guest_ram_is_mapped_with_2mib_pages() {
    let image = GuestImage::new(REPORT).build("boot-thp");
    let run_one = |thp: &str| {
        format!(
            "echo THP-{thp}
/lab/nvmm --log-level info --thp {thp} --kernel /lab/bzImage --initrd /lab/l2.cpio --mem 256M --cmdline '{}'
             echo L1-NVMM-STATUS-{thp}=$?
",
            run_cmdline("")
        )
    };
    let run = Lab::new()
        .mem_mib(2048)
        .file(nvmm_bin(), "/lab/nvmm")
        .file(guest_dir().join("bzImage"), "/lab/bzImage")
        .file(image, "/lab/l2.cpio")
        .run(&(run_one("on") + &run_one("off")));
    run.assert_marker("L1-NVMM-STATUS-on=0");
    run.assert_marker("L1-NVMM-STATUS-off=0");
    run.assert_status(0);
    let (on, off) = run.output.split_once("THP-off").unwrap_or_else(|| panic!("no second run; tail:\n{}", run.tail(40)));
    let pages_2m = |log: &str| {
        let line = log.lines().find(|l| l.contains("KVM maps guest memory now in")).unwrap_or_else(|| panic!("no KVM page counts in:\n{log}"));
        let n = line.split("pages_2m ").nth(1).and_then(|r| r.split(|c: char| !c.is_ascii_digit()).next()).and_then(|n| n.parse::<u64>().ok());
        n.unwrap_or_else(|| panic!("no pages_2m in {line:?}"))
    };
    assert!(on.contains("guest RAM: 256 MiB, --thp on (host THP: madvise)"), "{}", run.tail(60));
    let (with, without) = (pages_2m(on), pages_2m(off));
    // The boot's prefault alone (about 30 MiB, much of it in whole 2 MiB pages) gives several.
    assert!(with >= 4, "--thp on: KVM maps {with} 2 MiB pages");
    assert_eq!(without, 0, "--thp off: KVM maps {without} 2 MiB pages");
}

/// 4.5 GiB: 3 GiB below the MMIO gap, the rest from 4 GiB up. The guest must see all of it.
#[test]
fn memory_above_4gib() {
    assert_booted(&boot("bzImage", 2, "4608M", 6144), 2, 4608);
}
