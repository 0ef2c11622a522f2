//! nvmm on this machine's own /dev/kvm, with the tiny guest (Linux cannot boot on a
//! PVM host; see ENVIRONMENT.md). Exercises the vCPU loop, port I/O, MMIO and the reset path.

use std::process::Command;

use nvmm_tests::{nvmm_bin, run_nvmm, scratch_dir, tiny};

#[test]
fn tiny_guest_runs_port_io_and_mmio_and_exits_zero_on_reset() {
    let dir = scratch_dir("tiny");
    let elf = dir.join("tiny.elf");
    tiny::write_elf(&elf);
    let (code, stdout, stderr) = run_nvmm(&[], &["--kernel", elf.to_str().unwrap(), "--log-level", "info"]);
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    // No device at the window: the MMIO reads come back as zeros, device ID '0'.
    assert_eq!(stdout, format!("{}\0\0\0\00\n", tiny::BANNER));
    assert!(stderr.contains("guest boot time:"), "{stderr}");
}

#[test]
fn tiny_guest_reads_the_virtio_mmio_registers_of_a_disk() {
    let dir = scratch_dir("tiny-disk");
    let elf = dir.join("tiny.elf");
    tiny::write_elf(&elf);
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk).unwrap().set_len(1 << 20).unwrap();
    let (code, stdout, stderr) =
        run_nvmm(&[], &["--kernel", elf.to_str().unwrap(), "--disk", &format!("path={}", disk.display()), "--log-level", "info"]);
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    // Magic "virt" and device ID 2 (block), read through MMIO exits from the first window.
    assert_eq!(stdout, format!("{}virt2\n", tiny::BANNER));
    // The exit profile names each device the guest touched, with exactly its count of accesses:
    // one serial write per byte written, the boot-timer and i8042 writes, the two window reads.
    let serial = stdout.len();
    let want = format!("port I/O: boot-timer 1, i8042 1, serial {serial}; MMIO: virtio0 2; halts 0");
    assert!(stderr.lines().any(|l| l.starts_with("nvmm: info: profile: vcpu0: ") && l.contains(&want)), "want {want:?} in:\n{stderr}");
    assert!(stderr.contains("profile: start-up (nvmm's start to the first KVM_RUN) "), "{stderr}");
}

#[test]
fn missing_tap_is_created_and_announced() {
    let dir = scratch_dir("tiny-net");
    let elf = dir.join("tiny.elf");
    tiny::write_elf(&elf);
    // A network namespace of nvmm's own: the TAP cannot exist there beforehand, nor outlive it.
    let net = ["--kernel", elf.to_str().unwrap(), "--net", "tap=nvmmtiny0,mac=52:54:00:00:00:01"];
    let (code, stdout, stderr) = run_nvmm(&["unshare", "--net", "--"], &net);
    assert_eq!(code, Some(0), "stdout: {stdout}\nstderr: {stderr}");
    // Magic "virt" and device ID 1 (network) from the first virtio-mmio window.
    assert_eq!(stdout, format!("{}virt1\n", tiny::BANNER));
    assert_eq!(
        stderr.trim_end(),
        "nvmm: warn: TAP device nvmmtiny0 did not exist: created it (it goes away when nvmm exits)"
    );
}

/// The PVH entry of the project's vmlinux, on this machine's /dev/kvm: Linux cannot finish booting on
/// PVM (ENVIRONMENT.md), but its early console shows that it entered through PVH and read the
/// command line and memory map nvmm put in `hvm_start_info`.
#[test]
fn vmlinux_enters_through_pvh_and_reads_start_info() {
    use std::io::{BufRead, BufReader};
    let vmlinux = nvmm_tests::guest_dir().join("vmlinux");
    let mut child = Command::new(nvmm_bin())
        .args(["--kernel", vmlinux.to_str().unwrap(), "--entry", "pvh", "--mem", "256M"])
        .args(["--cmdline", "earlyprintk=ttyS0 console=ttyS0 noxsave nvmm-pvh-test"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line.unwrap_or_default();
        seen.push(line.clone());
        if line.contains("found SMP MP-table") || seen.len() > 200 {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let text = seen.join("\n");
    assert!(text.contains("Command line: earlyprintk=ttyS0 console=ttyS0 noxsave nvmm-pvh-test"), "{text}");
    assert!(text.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"), "{text}");
    assert!(text.contains("found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]"), "{text}");
}

/// On this development machine the host KVM is PVM: `nvmm check` must say so, pass (nvmm runs here),
/// and report nested virtualization as unavailable; `--nested` must refuse with the reason.
#[test]
fn check_reports_this_host_honestly() {
    let pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    let (code, text, _) = run_nvmm(&[], &["check"]);
    assert_eq!(code, Some(0), "{text}");
    assert!(text.contains("PASS  kvm device: /dev/kvm opens read-write"), "{text}");
    let (_, json, _) = run_nvmm(&[], &["check", "--json"]);
    let report: serde_json::Value = serde_json::from_str(&json).expect("check --json is JSON");
    for key in ["vendor", "kvm_module", "layer", "nested_ready", "checks"] {
        assert!(report.get(key).is_some(), "missing {key} in {report}");
    }
    let (nested_code, _, err) = run_nvmm(&[], &["--nested", "--kernel", "/nonexistent"]);
    if pvm {
        assert!(text.contains("WARN  kvm module: kvm_pvm: software KVM"), "{text}");
        assert!(text.contains("nested virtualization unavailable"), "{text}");
        assert_eq!(report["kvm_module"], "kvm_pvm");
        assert_eq!(report["nested_ready"], false);
        assert_eq!(nested_code, Some(1));
        assert_eq!(err.trim(), "nvmm: error: the host KVM is kvm_pvm, a software KVM without VMX/SVM that cannot offer nested virtualization: run nvmm --nested on a host with kvm_intel or kvm_amd");
    } else {
        // On a hardware host the same command must at least agree with the report.
        assert_eq!(report["nested_ready"] == true, !err.contains("nested"), "{text}\n{err}");
    }
}
