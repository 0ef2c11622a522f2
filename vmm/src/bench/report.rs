//! The bench's report: one row per kind of exit, as a table or as JSON.

use serde::Serialize;

use super::guest::{self, Hypercall, Kind};
use super::stats::Summary;
use crate::host::{KvmModule, Layer, Vendor};

/// Where an exit is completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum HandledIn {
    /// KVM, without returning from KVM_RUN.
    Kernel,
    /// The VMM process: KVM_RUN returns and is called again.
    Userspace,
}

/// Median, p99 and min in both units, after subtracting the loop's own cost.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Figures {
    pub median_ns: f64,
    pub p99_ns: f64,
    pub min_ns: f64,
    pub median_cycles: f64,
    pub p99_cycles: f64,
    pub min_cycles: f64,
}

impl Figures {
    pub fn new(cycles: Summary, tsc_khz: u32) -> Figures {
        let ns = cycles.to_ns(tsc_khz);
        Figures {
            median_ns: ns.median,
            p99_ns: ns.p99,
            min_ns: ns.min,
            median_cycles: cycles.median,
            p99_cycles: cycles.p99,
            min_cycles: cycles.min,
        }
    }
}

/// The measurement loop's own cost at one CPL (the quietest of its runs, one before each row),
/// subtracted from every row measured there.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Baseline {
    pub cpl: u8,
    /// CPL 0 on a PVM host: KVM's instruction emulator ran the loop.
    pub emulated: bool,
    #[serde(flatten)]
    pub figures: Figures,
}

/// One kind of exit.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Row {
    pub name: &'static str,
    /// What the guest did, in a few words.
    pub what: String,
    pub handled_in: HandledIn,
    /// `None` when the kind was not measured (see `note`).
    pub cpl: Option<u8>,
    pub emulated: bool,
    /// `None` when the kind was not measured: the JSON then has every figure as null.
    #[serde(flatten, serialize_with = "figures_or_nulls")]
    pub figures: Option<Figures>,
    /// Exits KVM counted per iteration (about 1 for a plain exit); `None` when KVM does not count.
    pub exits_per_iteration: Option<f64>,
    pub note: Option<String>,
}

/// The figures of a row, or the same keys with null values, so every row has every key.
fn figures_or_nulls<S: serde::Serializer>(figures: &Option<Figures>, s: S) -> Result<S::Ok, S::Error> {
    #[derive(Serialize)]
    struct Nulls {
        median_ns: Option<f64>,
        p99_ns: Option<f64>,
        min_ns: Option<f64>,
        median_cycles: Option<f64>,
        p99_cycles: Option<f64>,
        min_cycles: Option<f64>,
    }
    match figures {
        Some(f) => f.serialize(s),
        None => Nulls { median_ns: None, p99_ns: None, min_ns: None, median_cycles: None, p99_cycles: None, min_cycles: None }.serialize(s),
    }
}

/// The host-side view of the userspace port I/O exit.
pub const HOST_VIEW: &str = "pio-user-host";

/// What the row of `kind` measures and where it is handled.
pub fn describe(kind: Kind, hypercall: Hypercall) -> (String, HandledIn) {
    use HandledIn::*;
    match kind {
        Kind::Loop => ("lfence; rdtsc; ... lfence; rdtsc: the timing alone".into(), Kernel),
        Kind::Cpuid => ("cpuid leaf 0".into(), Kernel),
        Kind::PioUser => (format!("out to port {:#x}, handled by the VMM", guest::PORT_USER), Userspace),
        Kind::PioIoeventfd => (format!("out to port {:#x}, an ioeventfd", guest::PORT_IOEVENTFD), Kernel),
        Kind::MmioUser => (format!("32-bit write to {:#x}, handled by the VMM", guest::MMIO_USER), Userspace),
        Kind::MmioIoeventfd => (format!("32-bit write to {:#x}, an ioeventfd (virtio notify)", guest::MMIO_IOEVENTFD), Kernel),
        Kind::Rdmsr => (format!("rdmsr {:#x} (IA32_MISC_ENABLE)", guest::MSR_BENCH), Kernel),
        Kind::Wrmsr => (format!("wrmsr {:#x} (IA32_MISC_ENABLE), same value", guest::MSR_BENCH), Kernel),
        Kind::HltIrq => ("sti; hlt, woken by the LAPIC timer (TSC deadline); handler iretq".into(), Kernel),
        Kind::Hypercall => (format!("{} KVM_HC_VAPIC_POLL_IRQ (a no-op)", hypercall.mnemonic()), Kernel),
    }
}

/// The CPU, as CPUID names it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Cpu {
    pub vendor: Vendor,
    pub model: String,
}

/// The whole report.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The VMM that ran the guest: "nvmm", or the name given with --from-console.
    pub vmm: String,
    pub layer: Layer,
    /// "L0", "L1", ..., or "L1+" when the depth is unknown.
    pub layer_name: String,
    pub cpu: Cpu,
    pub kvm_module: KvmModule,
    /// "auto", "cpl0" or "cpl3": how CPLs were chosen ...
    pub mode: String,
    /// ... and what that meant here.
    pub mode_detail: String,
    pub iterations: u32,
    pub tsc_khz: u32,
    /// Where `tsc_khz` came from.
    pub tsc_source: String,
    pub hypercall: &'static str,
    pub baselines: Vec<Baseline>,
    pub exits: Vec<Row>,
}

impl Report {
    pub fn to_json(&self) -> String {
        // Plain structs of numbers and strings; should serde still fail, say so in the output.
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"cannot serialize the report: {e}\"}}"))
    }

    pub fn render_text(&self) -> String {
        let mut out = format!(
            "nvmm bench exits ({}): {} {}, {}, layer {}\n{} iterations per kind; TSC {:.3} MHz ({})\nmode {}: {}\n",
            self.vmm,
            self.cpu.vendor,
            self.cpu.model,
            self.kvm_module,
            self.layer_name,
            self.iterations,
            f64::from(self.tsc_khz) / 1000.0,
            self.tsc_source,
            self.mode,
            self.mode_detail,
        );
        for b in &self.baselines {
            out.push_str(&format!(
                "loop cost subtracted at {}: median {:.1} ns ({:.0} cycles)\n",
                cpl_label(Some(b.cpl), b.emulated),
                b.figures.median_ns,
                b.figures.median_cycles
            ));
        }
        out.push_str(&format!(
            "\n{:<15} {:<10} {:<13} {:>11} {:>11} {:>11} {:>12} {:>8}\n",
            "exit", "handled in", "CPL", "median ns", "p99 ns", "min ns", "median cyc", "exits/it"
        ));
        for r in &self.exits {
            let handled = match r.handled_in {
                HandledIn::Kernel => "kernel",
                HandledIn::Userspace => "userspace",
            };
            let exits = r.exits_per_iteration.map(|e| format!("{e:.2}")).unwrap_or_else(|| "-".into());
            let cpl = cpl_label(r.cpl, r.emulated);
            match &r.figures {
                Some(f) => out.push_str(&format!(
                    "{:<15} {:<10} {:<13} {:>11.1} {:>11.1} {:>11.1} {:>12.0} {:>8}\n",
                    r.name, handled, cpl, f.median_ns, f.p99_ns, f.min_ns, f.median_cycles, exits
                )),
                None => out.push_str(&format!("{:<15} {:<10} {:<13} {:>11}\n", r.name, handled, cpl, "not measured")),
            }
        }
        let notes: Vec<String> = self.exits.iter().filter_map(|r| r.note.as_ref().map(|n| format!("  {}: {n}\n", r.name))).collect();
        if !notes.is_empty() {
            out.push_str("\nnotes:\n");
            out.extend(notes);
        }
        out
    }
}

/// "3", "0", "0 (emulated)", or "-".
pub fn cpl_label(cpl: Option<u8>, emulated: bool) -> String {
    match (cpl, emulated) {
        (Some(c), true) => format!("{c} (emulated)"),
        (Some(c), false) => c.to_string(),
        (None, _) => "-".into(),
    }
}

/// "L0", "L2", or "L1+" when only "some guest" is known.
pub fn layer_name(layer: &Layer) -> String {
    match layer.number() {
        Some(n) => format!("L{n}"),
        None => "L1+".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_report() -> Report {
        let f = Figures::new(Summary { median: 3000.0, p99: 6000.0, min: 2500.0 }, 3_000_000);
        Report {
            vmm: "nvmm".into(),
            layer: Layer::Guest { level: Some(1), signature: Some("KVMKVMKVM".into()) },
            layer_name: "L1".into(),
            cpu: Cpu { vendor: Vendor::Amd, model: "AMD EPYC".into() },
            kvm_module: KvmModule::Amd,
            mode: "auto".into(),
            mode_detail: "CPL 0 throughout".into(),
            iterations: 1000,
            tsc_khz: 3_000_000,
            tsc_source: "KVM_GET_TSC_KHZ".into(),
            hypercall: "vmmcall",
            baselines: vec![Baseline { cpl: 0, emulated: false, figures: f }],
            exits: vec![
                Row { name: "cpuid", what: "cpuid leaf 0".into(), handled_in: HandledIn::Kernel, cpl: Some(0), emulated: false, figures: Some(f), exits_per_iteration: Some(1.0), note: None },
                Row { name: "rdmsr", what: "rdmsr".into(), handled_in: HandledIn::Kernel, cpl: None, emulated: false, figures: None, exits_per_iteration: None, note: Some("privileged".into()) },
            ],
        }
    }

    #[test]
    fn json_has_every_field_flat_per_row() {
        let v: serde_json::Value = serde_json::from_str(&sample_report().to_json()).unwrap();
        for key in ["vmm", "layer", "layer_name", "cpu", "kvm_module", "mode", "iterations", "tsc_khz", "tsc_source", "baselines", "exits"] {
            assert!(v.get(key).is_some(), "{key}");
        }
        assert_eq!(v["cpu"]["vendor"], "AMD");
        assert_eq!(v["kvm_module"], "kvm_amd");
        assert_eq!(v["layer"]["level"], 1);
        let row = &v["exits"][0];
        assert_eq!(row["handled_in"], "kernel");
        assert_eq!(row["median_ns"], 1000.0);
        assert_eq!(row["p99_cycles"], 6000.0);
        assert_eq!(row["cpl"], 0);
        assert_eq!(v["baselines"][0]["min_ns"].as_f64().unwrap(), 2500.0 / 3.0);
        // An unmeasured row has every key, with nulls; the note says why.
        let unmeasured = v["exits"][1].as_object().unwrap();
        assert_eq!(unmeasured.len(), v["exits"][0].as_object().unwrap().len());
        assert!(unmeasured["cpl"].is_null() && unmeasured["median_ns"].is_null());
        assert_eq!(v["exits"][1]["note"], "privileged");
    }

    #[test]
    fn text_table_names_mode_and_cpl_per_row() {
        let text = sample_report().render_text();
        assert!(text.contains("mode auto: CPL 0 throughout"), "{text}");
        assert!(text.lines().any(|l| l.starts_with("cpuid") && l.contains("kernel") && l.contains("1000.0")), "{text}");
        assert!(text.lines().any(|l| l.starts_with("rdmsr") && l.contains("not measured")), "{text}");
        assert!(text.contains("notes:\n  rdmsr: privileged"), "{text}");
        assert_eq!(cpl_label(Some(0), true), "0 (emulated)");
        assert_eq!(layer_name(&Layer::Guest { level: None, signature: None }), "L1+");
        assert_eq!(layer_name(&Layer::L0), "L0");
    }
}
