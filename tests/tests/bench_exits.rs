//! `nvmm bench exits`: on this machine's own /dev/kvm (PVM: loops at CPL 3, privileged kinds at an
//! emulated CPL 0), in the lab at L1 (a real kvm_amd under QEMU TCG) and at L2 (nvmm --nested
//! inside it), and with bad input. The figures themselves say little under TCG; what must hold is
//! that every kind is measured, every figure is positive and finite, and a userspace exit costs
//! more than the measurement loop.

use std::process::Command;

use nvmm_tests::guest::{run_cmdline, GuestImage};
use nvmm_tests::{assert_one_line_error, guest_dir, nvmm_bin, run_nvmm, scratch_dir, Lab, NO_DEV_KVM, WITHOUT_DEV};
use serde_json::Value;

/// Iterations per kind in the lab: enough for a median and a p99, few enough for TCG and L2.
const LAB_ITERATIONS: u32 = 300;

/// Every exit kind the bench reports, in order.
const KINDS: [&str; 10] =
    ["cpuid", "pio-user", "pio-user-host", "pio-ioeventfd", "mmio-user", "mmio-ioeventfd", "rdmsr", "wrmsr", "hlt-irq", "hypercall"];
const TOP_FIELDS: [&str; 13] = [
    "vmm", "layer", "layer_name", "cpu", "kvm_module", "mode", "mode_detail", "iterations", "tsc_khz", "tsc_source", "hypercall",
    "baselines", "exits",
];
const FIGURES: [&str; 6] = ["median_ns", "p99_ns", "min_ns", "median_cycles", "p99_cycles", "min_cycles"];
const ROW_FIELDS: [&str; 7] = ["name", "what", "handled_in", "cpl", "emulated", "exits_per_iteration", "note"];

fn row<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["exits"].as_array().unwrap().iter().find(|r| r["name"] == name).unwrap_or_else(|| panic!("no row {name}: {report:#}"))
}

/// Medians and p99s are positive; a minimum may be 0 (the cheapest iteration cost no more than the
/// loop, as for a kind that rarely exits), never negative.
fn assert_positive_figures(what: &str, v: &Value) {
    for f in FIGURES {
        let x = v[f].as_f64().unwrap_or_else(|| panic!("{what}: {f} is not a number: {v:#}"));
        let ok = if f.starts_with("min") { x >= 0.0 } else { x > 0.0 };
        assert!(x.is_finite() && ok, "{what}: {f} = {x}: {v:#}");
    }
}

/// The checks every complete report must pass: every field, every kind measured with positive
/// finite figures, and the userspace port I/O exit costing more than the loop at its CPL.
fn assert_complete(report: &Value, iterations: u32) {
    for f in TOP_FIELDS {
        assert!(report.get(f).is_some(), "missing {f}: {report:#}");
    }
    assert_eq!(report["iterations"], iterations);
    assert!(report["tsc_khz"].as_u64().unwrap() > 0);
    assert!(report["cpu"]["vendor"].is_string() && report["cpu"]["model"].is_string());
    let baselines = report["baselines"].as_array().unwrap();
    assert!(!baselines.is_empty());
    for b in baselines {
        assert_positive_figures("baseline", b);
    }
    let names: Vec<&str> = report["exits"].as_array().unwrap().iter().map(|r| r["name"].as_str().unwrap()).collect();
    assert_eq!(names, KINDS);
    for r in report["exits"].as_array().unwrap() {
        for f in ROW_FIELDS.iter().chain(FIGURES.iter()) {
            assert!(r.get(*f).is_some(), "row {}: missing {f}", r["name"]);
        }
        assert!(r["handled_in"] == "kernel" || r["handled_in"] == "userspace", "{r:#}");
        assert_positive_figures(r["name"].as_str().unwrap(), r);
    }
    let pio = row(report, "pio-user");
    assert_eq!(pio["handled_in"], "userspace");
    let loop_ns = baselines.iter().find(|b| b["cpl"] == pio["cpl"]).expect("a baseline at pio-user's CPL")["median_ns"].as_f64().unwrap();
    assert!(pio["median_ns"].as_f64().unwrap() > loop_ns, "a userspace exit must cost more than the loop: {pio:#} vs {loop_ns} ns");
}

/// On hardware KVM (the lab) every kind runs at CPL 0 and exits about once per iteration (hlt-irq
/// also counts its arming wrmsr and EOI).
fn assert_hardware_layer(report: &Value, layer: &str) {
    assert_eq!(report["layer_name"], layer, "{report:#}");
    assert_eq!(report["kvm_module"], "kvm_amd");
    assert_eq!(report["mode"], "auto");
    assert_eq!(report["hypercall"], "vmmcall");
    for r in report["exits"].as_array().unwrap() {
        assert_eq!(r["cpl"], 0, "{r:#}");
        assert_eq!(r["emulated"], false, "{r:#}");
        if r["name"] != "pio-user-host" {
            let e = r["exits_per_iteration"].as_f64().unwrap_or_else(|| panic!("KVM counts exits: {r:#}"));
            assert!(e >= 0.9, "{} exits only {e} times per iteration", r["name"]);
        }
    }
}

/// The JSON the script printed with `echo "BENCH-JSON <tag> $(tr -d '\n' < FILE)"`.
fn json_from_console(output: &str, tag: &str) -> Value {
    let prefix = format!("BENCH-JSON {tag} ");
    let line = output.lines().find_map(|l| l.trim().strip_prefix(&prefix)).unwrap_or_else(|| panic!("no {prefix:?} line in the console"));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{tag}: bad JSON ({e}): {line}"))
}

/// A shell line that runs the bench and prints its JSON on one tagged line.
fn bench_line(tag: &str) -> String {
    format!(
        "/lab/nvmm bench exits --json --iterations {LAB_ITERATIONS} > /tmp/bench.json; echo \"BENCH-STATUS {tag} $?\"; \
         echo \"BENCH-JSON {tag} $(tr -d '\\n' < /tmp/bench.json)\"\n"
    )
}

// ---- this machine's own /dev/kvm ----

#[test]
fn host_kvm_every_kind_is_measured() {
    let (code, stdout, stderr) = run_nvmm(&[], &["bench", "exits", "--json", "--iterations", "2000"]);
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let report: Value = serde_json::from_str(&stdout).expect("JSON on stdout");
    assert_complete(&report, 2000);
    if report["kvm_module"] == "kvm_pvm" {
        // Port I/O and MMIO run natively at CPL 3 and exit to kvm_pvm once per iteration; what
        // needs CPL 0 runs in its emulator, and says so.
        for name in ["pio-user", "pio-ioeventfd", "mmio-user", "mmio-ioeventfd"] {
            let r = row(&report, name);
            assert_eq!((r["cpl"].as_u64(), r["emulated"].as_bool()), (Some(3), Some(false)), "{r:#}");
            assert!(r["exits_per_iteration"].as_f64().unwrap() >= 0.9, "{r:#}");
        }
        for name in ["cpuid", "rdmsr", "wrmsr", "hlt-irq"] {
            assert_eq!(row(&report, name)["emulated"], true, "{name}");
        }
        assert_eq!(report["baselines"].as_array().unwrap().len(), 2, "a loop cost at CPL 3 and at CPL 0");
    }
}

#[test]
fn host_kvm_text_table_names_the_mode_and_each_row_cpl() {
    let (code, stdout, stderr) = run_nvmm(&[], &["bench", "exits", "--iterations", "500"]);
    assert_eq!(code, Some(0), "stderr: {stderr}");
    assert!(stdout.starts_with("nvmm bench exits (nvmm): "), "{stdout}");
    assert!(stdout.contains("\nmode auto: "), "{stdout}");
    for kind in KINDS {
        assert!(stdout.lines().any(|l| l.starts_with(&format!("{kind} "))), "no row for {kind}: {stdout}");
    }
}

#[test]
fn host_kvm_forced_cpl3_leaves_privileged_kinds_unmeasured_with_a_reason() {
    let (code, stdout, stderr) = run_nvmm(&[], &["bench", "exits", "--json", "--iterations", "300", "--cpl", "3"]);
    assert_eq!(code, Some(0), "stderr: {stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["mode"], "cpl3");
    for name in ["rdmsr", "wrmsr", "hlt-irq"] {
        let r = row(&report, name);
        assert!(r["median_ns"].is_null() && r["cpl"].is_null(), "{r:#}");
        assert!(r["note"].as_str().unwrap().contains("#GP at CPL 3"), "{r:#}");
    }
    assert_eq!(row(&report, "pio-user")["cpl"], 3);
    assert_positive_figures("pio-user", row(&report, "pio-user"));
}

/// The standalone image (what QEMU runs in tools/bench-exits.sh) under nvmm itself, read back.
#[test]
fn host_kvm_emitted_image_runs_and_its_console_reads_back() {
    let dir = scratch_dir("bench-exits-image");
    let (elf, console) = (dir.join("exits.elf"), dir.join("console.txt"));
    let (code, _, stderr) = run_nvmm(&[], &["bench", "exits", "--iterations", "300", "--emit-guest", elf.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    let out = Command::new(nvmm_bin()).args(["--kernel", elf.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "the image ends with an i8042 reset: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&console, &out.stdout).unwrap();
    let (code, stdout, stderr) = run_nvmm(&[], &["bench", "exits", "--json", "--from-console", console.to_str().unwrap(), "--vmm", "nvmm"]);
    assert_eq!(code, Some(0), "{stderr}");
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!((report["vmm"].as_str(), report["iterations"].as_u64()), (Some("nvmm"), Some(300)));
    assert_eq!(report["exits"].as_array().unwrap().len(), 1);
    let pio = row(&report, "pio-user");
    assert_positive_figures("pio-user", pio);
    assert!(pio["median_ns"].as_f64().unwrap() > report["baselines"][0]["median_ns"].as_f64().unwrap());
}

// ---- the lab ----

#[test]
fn lab_l1_every_kind_exits_and_json_is_complete() {
    let run = Lab::new().timeout(300).append("nvmm.layer=1").file(nvmm_bin(), "/lab/nvmm").run(&bench_line("L1"));
    run.assert_marker("BENCH-STATUS L1 0");
    let report = json_from_console(&run.output, "L1");
    assert_complete(&report, LAB_ITERATIONS);
    assert_hardware_layer(&report, "L1");
    run.assert_status(0);
}

#[test]
fn lab_l2_nested_every_kind_exits_and_json_is_complete() {
    let image = GuestImage::new(&bench_line("L2")).file(nvmm_bin(), "/lab/nvmm").build("bench-exits-l2");
    // L2 needs no console input: stdin from /dev/null.
    let script = format!(
        "/lab/nvmm --nested --kernel /lab/bzImage --initrd /lab/l2.cpio --mem 512M --cmdline '{}' < /dev/null\n\
         echo L1-NVMM-STATUS=$?\n",
        run_cmdline("")
    );
    let run = Lab::new()
        .timeout(400)
        .append("nvmm.layer=1")
        .file(nvmm_bin(), "/lab/nvmm")
        .file(guest_dir().join("bzImage"), "/lab/bzImage")
        .file(image, "/lab/l2.cpio")
        .run(&script);
    run.assert_marker("BENCH-STATUS L2 0");
    let report = json_from_console(&run.output, "L2");
    assert_complete(&report, LAB_ITERATIONS);
    assert_hardware_layer(&report, "L2");
    run.assert_marker("L1-NVMM-STATUS=0");
    run.assert_status(0);
}

// ---- bad input ----

#[test]
fn zero_or_absurd_iterations_are_refused_before_any_vm() {
    let msg = "--iterations must be between 1 and 10000000";
    assert_one_line_error(&[], &["bench", "exits", "--iterations", "0"], &format!("{msg} (got 0)"));
    assert_one_line_error(&[], &["bench", "exits", "--iterations", "10000001"], &format!("{msg} (got 10000001)"));
    assert_one_line_error(&[], &["bench", "exits", "--iterations", "99999999999999"], msg);
    // Not a number: clap's own error, one line and status 1 like every other.
    assert_one_line_error(&[], &["bench", "exits", "--iterations", "lots"], "invalid value 'lots' for '--iterations <N>'");
}

#[test]
fn no_kvm_device_is_the_usual_message() {
    let (code, _, stderr) = run_nvmm(WITHOUT_DEV, &["bench", "exits", "--iterations", "10"]);
    assert_eq!(code, Some(1));
    assert_eq!(stderr.trim(), NO_DEV_KVM);
}

#[test]
fn bad_paths_and_consoles_are_named() {
    assert_one_line_error(&[], &["bench", "exits", "--emit-guest", "/nonexistent/dir/exits.elf"], "cannot write /nonexistent/dir/exits.elf");
    assert_one_line_error(&[], &["bench", "exits", "--from-console", "/nonexistent/console.txt"], "cannot read /nonexistent/console.txt");
    assert_one_line_error(&[], &["bench", "exits", "--from-console", "/etc/passwd"], "/etc/passwd: no 'nvmm-bench-raw end' line");
}
