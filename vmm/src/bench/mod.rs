//! `nvmm bench exits`: the round-trip cost of each kind of VM exit, measured by a tiny built-in
//! guest, at whatever layer nvmm runs (the same command inside an nvmm guest gives L2 figures).
//!
//! - `guest.rs`: the guest (assembled with iced-x86), one timing routine per kind of exit;
//! - `exits.rs`: the runner, a one-vCPU VM that runs each routine at the chosen CPL;
//! - `stats.rs`: median, p99, min; KVM's own exit count (`vcpu::stats`) checks that each kind exits;
//! - `report.rs`: the table and the JSON; `console.rs`: results printed by the standalone image.
//!
//! # CPL
//! On a PVM host (`kvm_pvm`) the guest's CPL 0 runs in KVM's instruction emulator, about a
//! thousand times slower than CPL 3, which runs natively. A loop at CPL 0 there would time the
//! emulator, so by default ("auto") the loops run at CPL 3 with IOPL 3 (port I/O allowed) on PVM,
//! and at CPL 0 on hardware KVM. rdmsr, wrmsr and hlt are privileged: on PVM they run at CPL 0,
//! emulated, and their rows say so. `--cpl 0|3` forces one level (with 3 they are not measured).
//!
//! # TSC
//! Cycles become nanoseconds at the guest's TSC frequency from KVM_GET_TSC_KHZ; if KVM does not
//! answer, at the host TSC's frequency calibrated against CLOCK_MONOTONIC. The report says which.

pub mod console;
pub mod exits;
pub mod guest;
pub mod report;
pub mod stats;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};

use exits::{Cpl, Runner};
use guest::{Hypercall, Kind};
use report::{Baseline, Cpu, Figures, HandledIn, Report, Row};
use stats::Summary;

use crate::host::{Host, KvmModule, Vendor};
use crate::kvm;

/// The most iterations per kind: 40 MB of results in guest memory, and minutes per kind on a slow
/// (emulated or nested) KVM.
pub const MAX_ITERATIONS: u64 = 10_000_000;

/// `nvmm bench exits` options.
#[derive(Args, Debug, Clone)]
pub struct ExitsArgs {
    /// Iterations of each measurement loop, 1 to 10000000.
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    pub iterations: u64,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Privilege level of the loops: auto (CPL 3 with IOPL 3 on a PVM host, whose CPL 0 is
    /// emulated; CPL 0 on hardware KVM), 0, or 3 (privileged kinds are then not measured).
    #[arg(long, value_enum, default_value_t = CplChoice::Auto)]
    pub cpl: CplChoice,
    /// Write the bench guest as a standalone PVH ELF to PATH and exit. Any VMM that boots PVH
    /// kernels runs it (e.g. QEMU -kernel); it prints its raw results on COM1 for --from-console.
    #[arg(long, value_name = "PATH", conflicts_with = "from_console")]
    pub emit_guest: Option<PathBuf>,
    /// Summarize FILE, the console output of the --emit-guest image run under some VMM on this
    /// host, instead of running the bench.
    #[arg(long, value_name = "FILE")]
    pub from_console: Option<PathBuf>,
    /// With --from-console: the name of the VMM that ran the image, for the report.
    #[arg(long, value_name = "NAME", default_value = "unknown", requires = "from_console")]
    pub vmm: String,
}

/// `--cpl`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum CplChoice {
    Auto,
    #[value(name = "0")]
    Zero,
    #[value(name = "3")]
    Three,
}

impl CplChoice {
    fn name(self) -> &'static str {
        match self {
            CplChoice::Auto => "auto",
            CplChoice::Zero => "cpl0",
            CplChoice::Three => "cpl3",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--iterations must be between 1 and {MAX_ITERATIONS} (got {0})")]
    Iterations(u64),
    #[error(transparent)]
    Kvm(#[from] kvm::Error),
    #[error(transparent)]
    Run(#[from] exits::Error),
    #[error(transparent)]
    Guest(#[from] guest::Error),
    #[error("cannot write {0}: {1}")]
    Write(PathBuf, #[source] std::io::Error),
    #[error("cannot read {0}: {1}")]
    Read(PathBuf, #[source] std::io::Error),
    #[error("{0}: {1}")]
    Console(PathBuf, #[source] console::Error),
    #[error("{0}: no '{1}' samples")]
    MissingKind(PathBuf, &'static str),
}

/// Runs `nvmm bench exits` and prints its report; errors come back as one line.
pub fn exits(args: ExitsArgs) -> Result<(), String> {
    run(args).map_err(|e| e.to_string())
}

fn run(args: ExitsArgs) -> Result<(), Error> {
    let iterations = check_iterations(args.iterations)?;
    let host = Host::real();
    let hypercall = Hypercall::for_vendor(&host.vendor);
    if let Some(path) = &args.emit_guest {
        std::fs::write(path, guest::pvh_image(iterations, hypercall)?).map_err(|e| Error::Write(path.clone(), e))?;
        println!("wrote {}: the bench guest as a PVH ELF, {iterations} iterations per kind", path.display());
        return Ok(());
    }
    let report = match &args.from_console {
        Some(path) => from_console(path, &args.vmm, &host, hypercall)?,
        None => measure(&host, args.cpl, iterations, hypercall)?,
    };
    if args.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.render_text());
    }
    Ok(())
}

fn check_iterations(n: u64) -> Result<u32, Error> {
    match n {
        1..=MAX_ITERATIONS => Ok(n as u32),
        _ => Err(Error::Iterations(n)),
    }
}

/// One row of the plan: the CPL a kind runs at, or why it cannot run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Step {
    pub kind: Kind,
    pub cpl: Result<Cpl, &'static str>,
}

/// Why privileged kinds are skipped with `--cpl 3`.
const PRIVILEGED: &str = "privileged instruction: #GP at CPL 3 (use --cpl 0 or auto)";
/// Why the hypercall is skipped with `--cpl 0` on PVM.
const NO_EMULATED_HYPERCALL: &str = "not measurable at CPL 0 on kvm_pvm: KVM's instruction emulator never completes a \
     hypercall (it re-executes it, expecting a hardware intercept), so the vCPU would spin";

/// Why hlt-irq is skipped without TSC-deadline mode.
const NO_TSC_DEADLINE: &str = "not measurable: KVM lacks KVM_CAP_TSC_DEADLINE_TIMER, which the LAPIC timer that wakes hlt needs";

/// The CPL of every kind but `Loop`, which runs at each CPL the others use.
pub fn plan(choice: CplChoice, pvm: bool) -> Vec<Step> {
    Kind::ALL.into_iter().filter(|k| *k != Kind::Loop).map(|kind| Step { kind, cpl: cpl_for(kind, choice, pvm) }).collect()
}

fn cpl_for(kind: Kind, choice: CplChoice, pvm: bool) -> Result<Cpl, &'static str> {
    match (choice, pvm) {
        (CplChoice::Three, _) if kind.needs_cpl0() => Err(PRIVILEGED),
        (CplChoice::Three, _) => Ok(Cpl::Three),
        (CplChoice::Zero, true) if kind == Kind::Hypercall => Err(NO_EMULATED_HYPERCALL),
        (CplChoice::Zero, _) | (CplChoice::Auto, false) => Ok(Cpl::Zero),
        // PVM: CPL 3 wherever the instruction reaches kvm_pvm from there. cpuid at CPL 3 does not
        // (no CPUID faulting: the CPU or the hypervisor below answers it), so it runs at CPL 0,
        // emulated. The hypercall cannot run at CPL 0 (see NO_EMULATED_HYPERCALL): CPL 3, where its
        // row shows it was answered below kvm_pvm.
        (CplChoice::Auto, true) => match kind {
            Kind::Cpuid => Ok(Cpl::Zero),
            k if k.needs_cpl0() => Ok(Cpl::Zero),
            _ => Ok(Cpl::Three),
        },
    }
}

fn mode_detail(choice: CplChoice, pvm: bool) -> String {
    match (choice, pvm) {
        (CplChoice::Auto, true) => "kvm_pvm runs CPL 3 natively and emulates CPL 0: port I/O (IOPL 3), MMIO and the hypercall \
             at CPL 3; cpuid (which kvm_pvm does not intercept at CPL 3), rdmsr, wrmsr and hlt-irq at CPL 0, emulated"
            .into(),
        (CplChoice::Auto, false) => "hardware KVM: every loop at CPL 0".into(),
        (CplChoice::Zero, true) => "every loop at CPL 0 (--cpl 0), run by kvm_pvm's instruction emulator".into(),
        (CplChoice::Zero, false) => "every loop at CPL 0 (--cpl 0)".into(),
        (CplChoice::Three, _) => "loops at CPL 3 with IOPL 3 (--cpl 3); rdmsr, wrmsr and hlt-irq are privileged and not measured".into(),
    }
}

/// Runs the plan in a bench VM and builds the report.
fn measure(host: &Host, choice: CplChoice, iterations: u32, hypercall: Hypercall) -> Result<Report, Error> {
    let kvm = kvm::open()?;
    let pvm = host.kvm_module == KvmModule::Pvm;
    let mut runner = Runner::new(&kvm, &host.vendor, iterations)?;
    let (tsc_khz, tsc_source) = match runner.tsc_khz() {
        Some(k) => (k, "KVM_GET_TSC_KHZ".to_string()),
        None => (calibrate_tsc_khz(), "host TSC calibrated against CLOCK_MONOTONIC (KVM_GET_TSC_KHZ failed)".to_string()),
    };
    let steps = plan(choice, pvm);
    // The raw (loop cost included) wrmsr median at each CPL: hlt-irq's timer must fire well after
    // its arming wrmsr and the hlt exit (see `guest::hlt_routine`).
    let mut wrmsr_cycles: BTreeMap<Cpl, f64> = BTreeMap::new();
    // The loop's own cost at each CPL: timed again just before every row, and the lowest median
    // is the one subtracted. Timed once only, a loop that ran while the host was busy read more
    // than an emulated rdmsr on a quiet host, and the row came out 0.
    let mut baselines: BTreeMap<Cpl, Summary> = BTreeMap::new();
    // Each row with its raw figures, the loop cost subtracted once every loop has been timed.
    let mut measured: Vec<(Row, Option<Cpl>, Option<Summary>)> = Vec::new();
    for step in &steps {
        let (what, handled_in) = report::describe(step.kind, hypercall);
        let cpl = match step.cpl {
            Ok(_) if step.kind == Kind::HltIrq && !runner.has_tsc_deadline() => Err(NO_TSC_DEADLINE),
            other => other,
        };
        let cpl = match cpl {
            Ok(cpl) => cpl,
            Err(why) => {
                let row = Row { name: step.kind.name(), what, handled_in, cpl: None, emulated: false, figures: None, exits_per_iteration: None, note: Some(why.into()) };
                measured.push((row, None, None));
                continue;
            }
        };
        time_loop(&mut runner, cpl, &mut baselines)?;
        let emulated = pvm && cpl == Cpl::Zero;
        if step.kind == Kind::HltIrq {
            runner.set_hlt_delay(hlt_delay(wrmsr_cycles.get(&cpl).copied(), tsc_khz));
        }
        let mut result = runner.run(step.kind, cpl)?;
        let per_iteration = result.exits.map(|e| e as f64 / f64::from(iterations));
        // hlt-irq iterations whose interrupt came before the hlt measured no halt: drop them.
        let before = result.samples.len();
        if step.kind == Kind::HltIrq {
            result.samples.retain(|s| *s != guest::EARLY_WAKE);
        }
        let early = before - result.samples.len();
        let summary = Summary::of(&mut result.samples);
        if let (Kind::Wrmsr, Some(s)) = (step.kind, summary) {
            wrmsr_cycles.insert(cpl, s.median);
        }
        let note = row_note(step.kind, cpl, emulated, per_iteration, early);
        let row = Row { name: step.kind.name(), what, handled_in, cpl: Some(cpl.number()), emulated, figures: None, exits_per_iteration: per_iteration, note };
        measured.push((row, Some(cpl), summary));
        if let Some(host) = result.host.as_mut() {
            measured.push((host_view(cpl, emulated), Some(cpl), Summary::of(host)));
        }
    }
    let rows = measured
        .into_iter()
        .map(|(mut row, cpl, raw)| {
            let base = cpl.and_then(|c| baselines.get(&c)).map(|b| b.median).unwrap_or(0.0);
            row.figures = raw.map(|s| Figures::new(s.minus(base), tsc_khz));
            row
        })
        .collect();
    Ok(Report {
        vmm: "nvmm".into(),
        layer_name: report::layer_name(&host.layer),
        layer: host.layer.clone(),
        cpu: cpu(&host.vendor),
        kvm_module: host.kvm_module,
        mode: choice.name().into(),
        mode_detail: mode_detail(choice, pvm),
        iterations,
        tsc_khz,
        tsc_source,
        hypercall: hypercall.mnemonic(),
        baselines: baselines
            .iter()
            .map(|(cpl, s)| Baseline { cpl: cpl.number(), emulated: pvm && *cpl == Cpl::Zero, figures: Figures::new(*s, tsc_khz) })
            .collect(),
        exits: rows,
    })
}

/// hlt-irq's timer delay: eight times the arming wrmsr's cost (which includes the loop, hence
/// also the rdtsc), and at least 20 µs; 1 ms when wrmsr was not measured.
fn hlt_delay(wrmsr_cycles: Option<f64>, tsc_khz: u32) -> u64 {
    let floor = 20 * u64::from(tsc_khz) / 1000;
    match wrmsr_cycles {
        Some(c) => ((8.0 * c) as u64).max(floor),
        None => u64::from(tsc_khz), // 1 ms
    }
}

/// The userspace port I/O exit as nvmm saw it: from one KVM_RUN return to the next. Between the two
/// the guest ran one loop iteration besides the exit, so the loop cost is subtracted here too.
fn host_view(cpl: Cpl, emulated: bool) -> Row {
    Row {
        name: report::HOST_VIEW,
        what: "pio-user timed by nvmm: KVM_RUN return to KVM_RUN return".into(),
        handled_in: HandledIn::Userspace,
        cpl: Some(cpl.number()),
        emulated,
        figures: None,
        exits_per_iteration: None,
        note: None,
    }
}

/// Times the measurement loop at `cpl` and keeps, per CPL, the run with the lowest median.
fn time_loop(runner: &mut Runner, cpl: Cpl, baselines: &mut BTreeMap<Cpl, Summary>) -> Result<(), Error> {
    let mut run = runner.run(Kind::Loop, cpl)?;
    if let Some(s) = Summary::of(&mut run.samples) {
        baselines.entry(cpl).and_modify(|b| if s.median < b.median { *b = s }).or_insert(s);
    }
    Ok(())
}

/// What a row's reader must know: emulation, exits that did not reach this KVM, odd counts, and
/// (hlt-irq) how many iterations were dropped because their interrupt came before the hlt.
fn row_note(kind: Kind, cpl: Cpl, emulated: bool, exits_per_iteration: Option<f64>, early: usize) -> Option<String> {
    let mut notes = Vec::new();
    // The emulator completes instructions inside KVM_RUN without a VM exit: no count to check.
    if let Some(e) = exits_per_iteration.filter(|e| *e < 0.5 && !emulated) {
        notes.push(format!(
            "KVM counted {e:.2} exits per iteration: this did not exit to this KVM (it ran natively or the hypervisor below answered)"
        ));
    }
    if emulated {
        notes.push("CPL 0 on kvm_pvm: KVM's instruction emulator ran it; the figure includes the emulator's cost".into());
    }
    if kind == Kind::Hypercall && cpl == Cpl::Three {
        notes.push("at CPL 3 KVM refuses the call (-KVM_EPERM) after the exit".into());
    }
    if kind == Kind::HltIrq {
        notes.push("from the timer's deadline to the guest running after hlt; exits/it also counts the untimed arming wrmsr and EOI".into());
        if early > 0 {
            notes.push(format!("{early} iterations dropped: their timer fired before the hlt (a slow arming wrmsr)"));
        }
    }
    (!notes.is_empty()).then(|| notes.join("; "))
}

/// The report of the standalone image's console output, as run by `vmm` on this host.
fn from_console(path: &PathBuf, vmm: &str, host: &Host, hypercall: Hypercall) -> Result<Report, Error> {
    let text = std::fs::read(path).map_err(|e| Error::Read(path.clone(), e))?;
    let blocks = console::parse(&String::from_utf8_lossy(&text)).map_err(|e| Error::Console(path.clone(), e))?;
    let get = |kind: Kind| {
        blocks.iter().find(|(k, _)| *k == kind).map(|(_, v)| v.clone()).ok_or_else(|| Error::MissingKind(path.clone(), kind.name()))
    };
    let (mut loop_samples, mut pio) = (get(Kind::Loop)?, get(Kind::PioUser)?);
    let iterations = pio.len() as u32;
    let (tsc_khz, tsc_source) = host_tsc_khz();
    // Whether the VMM's CPL 0 was emulated depends on its accelerator, which the console does not
    // say; the report names the VMM and this host's KVM module instead.
    let emulated = false;
    let base = Summary::of(&mut loop_samples).unwrap_or(Summary { median: 0.0, p99: 0.0, min: 0.0 });
    let (what, handled_in) = report::describe(Kind::PioUser, hypercall);
    let row = Row {
        name: Kind::PioUser.name(),
        what,
        handled_in,
        cpl: Some(0),
        emulated,
        figures: Summary::of(&mut pio).map(|s| Figures::new(s.minus(base.median), tsc_khz)),
        exits_per_iteration: None,
        note: None,
    };
    Ok(Report {
        vmm: vmm.into(),
        layer_name: report::layer_name(&host.layer),
        layer: host.layer.clone(),
        cpu: cpu(&host.vendor),
        kvm_module: host.kvm_module,
        mode: "cpl0".into(),
        mode_detail: format!("the --emit-guest image as run by {vmm} on this host: its loops run at CPL 0"),
        iterations,
        tsc_khz,
        tsc_source,
        hypercall: hypercall.mnemonic(),
        baselines: vec![Baseline { cpl: 0, emulated, figures: Figures::new(base, tsc_khz) }],
        exits: vec![row],
    })
}

/// This host's guest TSC frequency for the console mode: KVM's answer for a scratch vCPU, or a
/// calibration of the host TSC.
fn host_tsc_khz() -> (u32, String) {
    let from_kvm = kvm::open().ok().and_then(|kvm| {
        let vm = kvm.create_vm().ok()?;
        let vcpu = vm.create_vcpu(0).ok()?;
        vcpu.get_tsc_khz().ok().filter(|k| *k > 0)
    });
    match from_kvm {
        Some(k) => (k, "KVM_GET_TSC_KHZ (a scratch vCPU on this host)".into()),
        None => (calibrate_tsc_khz(), "host TSC calibrated against CLOCK_MONOTONIC".into()),
    }
}

/// The host TSC's frequency: TSC cycles over 100 ms of the monotonic clock.
fn calibrate_tsc_khz() -> u32 {
    let (t0, c0) = (Instant::now(), exits::rdtsc());
    std::thread::sleep(Duration::from_millis(100));
    let (cycles, elapsed) = (exits::rdtsc().wrapping_sub(c0), t0.elapsed());
    (cycles as f64 / elapsed.as_secs_f64() / 1000.0).round().max(1.0) as u32
}

/// Vendor and the CPUID brand string (leaves 0x8000_0002..4); failing that, /proc/cpuinfo's
/// `model name`; failing that, "unknown".
fn cpu(vendor: &Vendor) -> Cpu {
    let model = Some(brand_string()).filter(|m| !m.is_empty()).or_else(cpuinfo_model).unwrap_or_else(|| "unknown".into());
    Cpu { vendor: vendor.clone(), model }
}

fn cpuinfo_model() -> Option<String> {
    let text = std::fs::read_to_string(crate::host::PROC_CPUINFO).ok()?;
    let line = text.lines().find(|l| l.split(':').next().is_some_and(|k| k.trim() == "model name"))?;
    Some(line.split_once(':')?.1.trim().to_string()).filter(|m| !m.is_empty())
}

fn brand_string() -> String {
    let max_ext = core::arch::x86_64::__cpuid(0x8000_0000).eax;
    if max_ext >= 0x8000_0004 {
        let bytes: Vec<u8> = (0x8000_0002..=0x8000_0004u32)
            .flat_map(|leaf| {
                let r = core::arch::x86_64::__cpuid(leaf);
                [r.eax, r.ebx, r.ecx, r.edx].into_iter().flat_map(u32::to_le_bytes)
            })
            .collect();
        String::from_utf8_lossy(&bytes).trim_matches(|c: char| c == '\0' || c.is_whitespace()).to_string()
    } else {
        String::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpl_of(steps: &[Step], kind: Kind) -> Result<Cpl, &'static str> {
        steps.iter().find(|s| s.kind == kind).unwrap().cpl
    }

    #[test]
    fn auto_plan_uses_cpl3_on_pvm_except_privileged_kinds() {
        let p = plan(CplChoice::Auto, true);
        assert_eq!(p.len(), Kind::ALL.len() - 1);
        assert_eq!(cpl_of(&p, Kind::PioUser), Ok(Cpl::Three));
        assert_eq!(cpl_of(&p, Kind::MmioIoeventfd), Ok(Cpl::Three));
        assert_eq!(cpl_of(&p, Kind::Hypercall), Ok(Cpl::Three));
        assert_eq!(cpl_of(&p, Kind::Cpuid), Ok(Cpl::Zero));
        assert_eq!(cpl_of(&p, Kind::Rdmsr), Ok(Cpl::Zero));
        assert_eq!(cpl_of(&p, Kind::HltIrq), Ok(Cpl::Zero));
        assert!(plan(CplChoice::Auto, false).iter().all(|s| s.cpl == Ok(Cpl::Zero)));
        assert!(plan(CplChoice::Zero, false).iter().all(|s| s.cpl == Ok(Cpl::Zero)));
        let forced0 = plan(CplChoice::Zero, true);
        assert_eq!(cpl_of(&forced0, Kind::Hypercall), Err(NO_EMULATED_HYPERCALL));
        assert_eq!(cpl_of(&forced0, Kind::PioUser), Ok(Cpl::Zero));
    }

    #[test]
    fn forced_cpl3_skips_privileged_kinds_with_a_reason() {
        let p = plan(CplChoice::Three, false);
        assert_eq!(cpl_of(&p, Kind::Wrmsr), Err(PRIVILEGED));
        assert_eq!(cpl_of(&p, Kind::MmioIoeventfd), Ok(Cpl::Three));
    }

    #[test]
    fn iterations_are_bounded() {
        assert!(matches!(check_iterations(0), Err(Error::Iterations(0))));
        assert!(matches!(check_iterations(MAX_ITERATIONS + 1), Err(Error::Iterations(_))));
        assert_eq!(check_iterations(MAX_ITERATIONS).unwrap(), 10_000_000);
        assert_eq!(Error::Iterations(0).to_string(), "--iterations must be between 1 and 10000000 (got 0)");
    }

    #[test]
    fn notes_flag_what_did_not_exit() {
        let n = row_note(Kind::Cpuid, Cpl::Three, false, Some(0.0), 0).unwrap();
        assert!(n.contains("did not exit to this KVM"), "{n}");
        assert!(row_note(Kind::Cpuid, Cpl::Zero, false, Some(1.0), 0).is_none());
        assert!(row_note(Kind::HltIrq, Cpl::Zero, false, Some(3.0), 2).unwrap().contains("2 iterations dropped"));
        let emulated = row_note(Kind::Rdmsr, Cpl::Zero, true, Some(0.01), 0).unwrap();
        assert!(emulated.contains("emulator") && !emulated.contains("did not exit"), "{emulated}");
    }

    #[test]
    fn hlt_delay_is_well_past_the_arming_wrmsr() {
        assert_eq!(hlt_delay(Some(10_000.0), 3_000_000), 80_000);
        assert_eq!(hlt_delay(Some(100.0), 3_000_000), 60_000, "20 µs floor");
        assert_eq!(hlt_delay(None, 3_000_000), 3_000_000);
    }

    #[test]
    fn calibration_is_plausible() {
        let khz = calibrate_tsc_khz();
        assert!((100_000..20_000_000).contains(&khz), "{khz}");
    }
}
