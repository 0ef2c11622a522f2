//! ACPI in the lab with the project's own kernel: L1's nvmm boots L2 with two vCPUs and a disk,
//! once with ACPI tables (the default) and once with `--no-acpi`. With ACPI, L2 finds its CPUs
//! in the MADT and its disk in the DSDT (nvmm leaves `virtio_mmio.device=` off the command line),
//! Linux reports no ACPI errors, and `poweroff -f` ends nvmm with status 0 through the FADT's
//! sleep register. Without, the MP table and the command line do the same work, and a reboot
//! ends the run. Debian's own kernel, which needs ACPI, is booted in debian.rs.

use nvmm_tests::guest::{run_cmdline, GuestImage};
use nvmm_tests::{guest_dir, nvmm_bin, Lab};

/// What L2 reports, then how it ends: `poweroff -f` when it has ACPI, the initramfs's reboot
/// otherwise (a poweroff without ACPI halts the vCPUs forever).
const L2_REPORT: &str = r#"
tag=$(sed -n 's/.*acpi.tag=\([a-z]*\).*/\1/p' /proc/cmdline)
echo "L2-$tag-NPROC=$(nproc)"
[ -e /sys/firmware/acpi/tables/DSDT ] && echo "L2-$tag-DSDT=yes" || echo "L2-$tag-DSDT=no"
[ -b /dev/vda ] && echo "L2-$tag-VDA=yes" || echo "L2-$tag-VDA=no"
echo "L2-$tag-CMDLINE-DEVICES=$(grep -o 'virtio_mmio.device=' /proc/cmdline | wc -l)"
echo "L2-$tag-ACPI-ERRORS=$(dmesg | grep -ciE 'ACPI (BIOS )?(Error|Exception|Warning)')"
dmesg | grep -iE 'ACPI|smpboot|virtio' | sed "s/^/L2-$tag-DMESG /"
if [ "$tag" = acpi ]; then
    sync
    poweroff -f
fi
"#;

fn l1_boot(tag: &str, flags: &str) -> String {
    format!(
        "/lab/nvmm {flags} --kernel /lab/bzImage --initrd /lab/l2.cpio --mem 256M --cpus 2 \
         --disk path=/tmp/disk.img --log-level info --cmdline '{}' 2>/tmp/{tag}.err\n\
         echo L1-{tag}-STATUS=$?\n\
         sed 's/^/L1-{tag}-STDERR /' /tmp/{tag}.err\n",
        run_cmdline(&format!("acpi.tag={tag}"))
    )
}

#[test]
fn own_kernel_boots_with_and_without_acpi() {
    let image = GuestImage::new(L2_REPORT).build("acpi");
    let script = format!(
        "dd if=/dev/zero of=/tmp/disk.img bs=1M count=4 2>/dev/null\n{}{}",
        l1_boot("acpi", ""),
        l1_boot("noacpi", "--no-acpi")
    );
    let run = Lab::new()
        .file(nvmm_bin(), "/lab/nvmm")
        .file(guest_dir().join("bzImage"), "/lab/bzImage")
        .file(image, "/lab/l2.cpio")
        .run(&script);

    // With ACPI: everything found through the tables, and a clean power-off.
    assert_eq!(run.value("L2-acpi-NPROC"), "2", "CPUs from the MADT");
    assert_eq!(run.value("L2-acpi-DSDT"), "yes");
    assert_eq!(run.value("L2-acpi-VDA"), "yes", "the disk from the DSDT");
    assert_eq!(run.value("L2-acpi-CMDLINE-DEVICES"), "0", "devices must be described once, in the DSDT");
    assert_eq!(run.value("L2-acpi-ACPI-ERRORS"), "0", "Linux complained about the tables");
    run.assert_marker("L1-acpi-STDERR nvmm: info: the guest powered off");
    assert_eq!(run.value("L1-acpi-STATUS"), "0");

    // Without: the MP table and the command line, and a reboot.
    assert_eq!(run.value("L2-noacpi-NPROC"), "2", "CPUs from the MP table");
    assert_eq!(run.value("L2-noacpi-DSDT"), "no");
    assert_eq!(run.value("L2-noacpi-VDA"), "yes", "the disk from virtio_mmio.device=");
    assert_eq!(run.value("L2-noacpi-CMDLINE-DEVICES"), "1");
    run.assert_marker("L1-noacpi-STDERR nvmm: info: the guest reset");
    assert_eq!(run.value("L1-noacpi-STATUS"), "0");
    run.assert_status(0);
}
