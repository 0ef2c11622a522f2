//! A stock Debian 12 guest under nvmm in the lab (issue 11): Debian's own cloud kernel and
//! initramfs, a debootstrap root on virtio-blk (`tools/build-debian.sh`), systemd to
//! multi-user.target. Such a kernel finds virtio-mmio devices and CPUs only through ACPI (virtio is
//! built as modules, `VIRTIO_MMIO_CMDLINE_DEVICES` and `X86_MPPARSE` are off), and powers off only
//! through ACPI. The guest reports what it found on the serial console (`DEBIAN-*` lines), then
//! runs `systemctl poweroff`, which must end nvmm with status 0. Without ACPI tables the
//! initramfs waits for /dev/vda in vain, says "ALERT! /dev/vda does not exist" and reboots
//! (`panic=1`): the first test names that case in its failure.
//!
//! L1 runs nvmm inside a network namespace of its own holding the TAP; nothing in the guest
//! configures an address, and no traffic leaves the namespace.

use std::path::{Path, PathBuf};
use std::process::Command;

use nvmm_tests::{nvmm_bin, repo_root, scratch_dir, Lab, LabRun};

const GUEST_MAC: &str = "52:54:00:de:b1:12";
/// Wall-clock limits: nvmm in L1 (killed after this), and the whole lab run.
/// Measured in the lab: nvmm runs this guest from start to power-off in about 21 s (29 s with
/// --nested and one vCPU), QEMU microvm in about 25 s; the limits leave room for a loaded machine.
const NVMM_TIMEOUT_SECS: u64 = 600;
const LAB_TIMEOUT_SECS: u64 = 900;

/// The cached Debian image, kernel and initramfs.
struct Debian {
    root_img: PathBuf,
    vmlinuz: PathBuf,
    initrd: PathBuf,
}

/// Builds the Debian guest with `tools/build-debian.sh` (cached: about a second when nothing
/// changed). Panics with the script's output if it cannot.
fn debian() -> Debian {
    let script = repo_root().join("tools/build-debian.sh");
    let out = Command::new(&script)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        let lines: Vec<&str> = stderr.lines().collect();
        panic!(
            "the Debian image could not be built: {} exited with {}; its last output:\n{}",
            script.display(),
            out.status,
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let paths: Vec<PathBuf> = stdout.lines().map(PathBuf::from).collect();
    assert_eq!(
        paths.len(),
        3,
        "{} printed {stdout:?}, expected three paths",
        script.display()
    );
    for p in &paths {
        assert!(
            p.is_file(),
            "{} said it built {}, which is missing",
            script.display(),
            p.display()
        );
    }
    Debian {
        root_img: paths[0].clone(),
        vmlinuz: paths[1].clone(),
        initrd: paths[2].clone(),
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {text}",
        out.status
    );
    text
}

/// A writable copy of the cached image that only this test uses.
fn image_copy(src: &Path, test: &str) -> PathBuf {
    let dst = scratch_dir(test).join("root.img");
    let _ = std::fs::remove_file(&dst);
    run(Command::new("cp").arg("--sparse=always").arg(src).arg(&dst));
    dst
}

/// Puts the static nvmm at /usr/local/bin/nvmm in the (unmounted) ext4 image, mode 0755.
fn install_nvmm(image: &Path) {
    let bin = nvmm_bin();
    let cmds = image.with_extension("debugfs");
    std::fs::write(
        &cmds,
        format!(
            "cd /usr/local/bin\nrm nvmm\nwrite {} nvmm\nsif nvmm mode 0100755\nsif nvmm uid 0\nsif nvmm gid 0\n",
            bin.display()
        ),
    )
    .expect("write debugfs commands");
    run(Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&cmds)
        .arg(image));
    let stat = run(Command::new("debugfs")
        .arg("-R")
        .arg("stat /usr/local/bin/nvmm")
        .arg(image));
    let size = std::fs::metadata(&bin).expect("stat nvmm").len();
    assert!(
        stat.contains("Mode:  0755") && stat.contains(&format!("Size: {size}")),
        "nvmm did not land in the image as a 0755 file of {size} bytes:\n{stat}"
    );
}

/// L1: a namespace with the TAP, then nvmm booting Debian from the lab's /dev/vda.
/// iproute2's ip travels as /usr/local/sbin/ip2 (busybox's ip has no netns or tuntap).
fn l1_script(nvmm_flags: &str) -> String {
    format!(
        r#"IP=/usr/local/sbin/ip2
mkdir -p /var/run/netns /run/netns
$IP netns add debian || {{ echo L1-NETNS-FAILED; exit 1; }}
$IP -n debian tuntap add dev dtap0 mode tap || {{ echo L1-TUNTAP-FAILED; exit 1; }}
$IP -n debian link set dtap0 up
t0=$(cut -d' ' -f1 /proc/uptime)
$IP netns exec debian timeout -s KILL {NVMM_TIMEOUT_SECS} /lab/nvmm {nvmm_flags} --mem 1G \
    --kernel /lab/vmlinuz --initrd /lab/initrd.img --disk path=/dev/vda --net tap=dtap0,mac={GUEST_MAC} \
    --cmdline 'console=ttyS0 root=/dev/vda rw panic=1 reboot=k' </dev/null
echo "L1-NVMM-STATUS=$?"
echo "L1-SECONDS=$t0 $(cut -d' ' -f1 /proc/uptime)"
"#
    )
}

/// Boots the Debian image copy `image` under nvmm with `nvmm_flags` in the lab.
fn boot(debian: &Debian, image: &Path, nvmm_flags: &str) -> LabRun {
    let run = Lab::new()
        .timeout(LAB_TIMEOUT_SECS)
        .mem_mib(2048)
        .append("nvmm.layer=1")
        .bin("/sbin/ip:/usr/local/sbin/ip2")
        .file(nvmm_bin(), "/lab/nvmm")
        .file(&debian.vmlinuz, "/lab/vmlinuz")
        .file(&debian.initrd, "/lab/initrd.img")
        .drive(image)
        .run(&l1_script(nvmm_flags));
    let seconds = run.output.lines().find_map(|l| {
        let (t0, t1) = l.trim().strip_prefix("L1-SECONDS=")?.split_once(' ')?;
        Some(t1.parse::<f64>().ok()? - t0.parse::<f64>().ok()?)
    });
    if let Some(s) = seconds {
        eprintln!("Debian under nvmm {nvmm_flags}: {s:.1} s from start to exit, in L1 (TCG)");
    }
    run
}

/// What every Debian boot must show: the root disk found, multi-user reached, powered off.
fn assert_booted_and_powered_off(run: &LabRun) {
    if run.has("ALERT!  /dev/vda does not exist") || run.has("ALERT! /dev/vda does not exist") {
        panic!(
            "Debian's initramfs found no /dev/vda: its kernel saw no virtio-mmio device (they are \
             only described to it through ACPI); console tail:\n{}",
            run.tail(60)
        );
    }
    run.assert_marker("DEBIAN-MULTI-USER");
    assert_eq!(
        run.value("DEBIAN-VDA"),
        "root",
        "the root filesystem is not /dev/vda"
    );
    let net = run.value("DEBIAN-NET");
    let ifaces: Vec<&str> = net.split_whitespace().collect();
    assert!(
        ifaces.len() == 1 && ifaces[0].ends_with(&format!("@{GUEST_MAC}")),
        "expected one virtio-net interface with MAC {GUEST_MAC}, got {net:?}"
    );
    assert_eq!(
        run.value("DEBIAN-ACPI-ERRORS"),
        "0",
        "the kernel logged ACPI errors"
    );
    // "degraded" would mean a unit failed (listed as DEBIAN-FAILED-UNIT lines).
    assert_eq!(
        run.value("DEBIAN-SYSTEM-STATE"),
        "running",
        "systemd did not come up cleanly"
    );
    run.assert_marker("DEBIAN-DONE");
    // The kernel's last words on an ACPI power-off (a halt or a reboot would say otherwise).
    run.assert_marker("reboot: Power down");
    run.assert_marker("L1-NVMM-STATUS=0");
    run.assert_status(0);
}

#[test]
fn stock_debian_boots_with_two_cpus_its_root_on_virtio_blk_and_powers_off() {
    let debian = debian();
    let image = image_copy(&debian.root_img, "debian-boot");
    let run = boot(&debian, &image, "--cpus 2");
    assert_booted_and_powered_off(&run);
    assert_eq!(
        run.value("DEBIAN-CPUS"),
        "2",
        "Debian's kernel did not bring up both vCPUs"
    );
    assert_eq!(
        run.value("DEBIAN-KVM"),
        "no",
        "/dev/kvm in a guest booted without --nested"
    );
}

#[test]
fn stock_debian_with_nested_has_kvm_and_nvmm_check_passes() {
    let debian = debian();
    let image = image_copy(&debian.root_img, "debian-nested");
    install_nvmm(&image);
    let run = boot(&debian, &image, "--nested --cpus 1");
    assert_booted_and_powered_off(&run);
    assert_eq!(run.value("DEBIAN-CPUS"), "1");
    assert_eq!(
        run.value("DEBIAN-KVM"),
        "yes",
        "no /dev/kvm in Debian booted with --nested"
    );
    run.assert_marker("nvmm check: AMD CPU, kvm_amd, layer L2");
    run.assert_marker("PASS  nested virtualization: ready");
    assert_eq!(
        run.value("DEBIAN-NVMM-CHECK"),
        "0",
        "nvmm check failed in the Debian guest"
    );
}
