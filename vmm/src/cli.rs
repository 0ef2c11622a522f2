//! The command line: flags with units and defaults, turned into a [`VmConfig`].

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::{self, VmConfig, DEFAULT_CMDLINE, MAX_CPUS};

#[derive(Parser, Debug)]
#[command(name = "nvmm", version, about = "A small VMM for Linux guests on KVM, at any nesting layer", args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub run: RunArgs,
    /// Log level: off, error, warn, info, debug or trace.
    #[arg(long, global = true, default_value = "warn", value_parser = parse_level)]
    pub log_level: log::LevelFilter,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Check that this host can run nvmm (and nested guests), one PASS/WARN/FAIL line per check.
    Check {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure this host's KVM with a built-in guest (no kernel needed).
    Bench {
        #[command(subcommand)]
        what: BenchCommand,
    },
    /// Talk to a running nvmm through its --api-socket: prints the JSON answer.
    Ctl {
        /// The socket given to that nvmm's --api-socket.
        socket: PathBuf,
        #[command(subcommand)]
        command: crate::api::client::Command,
    },
    /// Describe a snapshot directory as JSON: format version, machine, and per vCPU its RIP and
    /// nested state (flags, size, whether it was in guest mode).
    SnapshotInfo {
        dir: PathBuf,
    },
}

#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Round-trip cost of each kind of VM exit: cpuid, port I/O and MMIO (userspace and
    /// ioeventfd), MSRs, hlt, hypercall.
    Exits(crate::bench::ExitsArgs),
}

#[derive(Args, Debug, Default)]
pub struct RunArgs {
    /// Kernel to boot: a bzImage, or an ELF vmlinux (PVH entry if it has the note).
    #[arg(long, value_name = "PATH")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (cpio, optionally compressed as the kernel supports).
    #[arg(long, value_name = "PATH")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line; for Linux the default is "console=ttyS0 reboot=k panic=1 i8042.noaux
    /// i8042.nomux i8042.dumbkbd" and, with --no-acpi, virtio_mmio.device= entries for --disk/--net
    /// are appended. A Multiboot kernel gets exactly what is given (none by default).
    /// May start with '-' (kvm-unit-tests' `-test` exclusions do).
    #[arg(long, value_name = "STRING", allow_hyphen_values = true)]
    pub cmdline: Option<String>,
    /// Guest memory, e.g. 512M or 2G (a bare number is MiB; above 3 GiB RAM continues at 4 GiB).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = config::parse_mem)]
    pub mem: u64,
    /// Guest RAM on transparent huge pages: on (2 MiB-aligned and MADV_HUGEPAGE, so KVM can map
    /// it with 2 MiB entries; the host's THP setting must be madvise or always) or off.
    #[arg(long, value_name = "MODE", default_value = "on")]
    pub thp: crate::memory::Thp,
    /// Number of vCPUs, 1 to 64, one thread each.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=MAX_CPUS as i64))]
    pub cpus: u8,
    /// Entry protocol for an ELF vmlinux: auto (PVH if the kernel has the note), pvh, or 64bit.
    #[arg(long, value_name = "PROTOCOL", default_value = "auto")]
    pub entry: config::EntryChoice,
    /// Expose hardware virtualization (VMX on Intel, SVM on AMD) so the guest can run its own KVM.
    #[arg(long)]
    pub nested: bool,
    /// A virtio block disk: path=FILE[,readonly=on][,id=NAME]. Repeatable.
    #[arg(long, value_name = "OPTIONS", value_parser = config::parse_disk)]
    pub disk: Vec<config::DiskConfig>,
    /// A virtio net device on a TAP: tap=NAME[,mac=MAC]. The TAP is created if missing. Repeatable.
    #[arg(long, value_name = "OPTIONS", value_parser = config::parse_net)]
    pub net: Vec<config::NetConfig>,
    /// No ACPI tables: the guest finds its CPUs in an MP table and its virtio devices in
    /// virtio_mmio.device= entries on the command line (also implied by acpi=off there).
    #[arg(long)]
    pub no_acpi: bool,
    /// Serve the control API (HTTP/1.1, JSON) on this Unix socket, which must not exist yet.
    #[arg(long, value_name = "PATH")]
    pub api_socket: Option<PathBuf>,
    /// Seccomp filters, one per kind of thread: on (a forbidden call ends nvmm with one line),
    /// log (the kernel logs it and lets it through), or off.
    #[arg(long, value_name = "MODE", default_value = "on")]
    pub seccomp: crate::seccomp::Mode,
    /// Start the VM saved in DIR (by `PUT /vm/snapshot`) instead of booting one; the machine's
    /// shape, disks and TAPs come from the snapshot.
    #[arg(long, value_name = "DIR", conflicts_with_all = ["kernel", "initrd", "nested", "disk", "net", "no_acpi", "mem", "thp", "cpus", "cmdline", "entry"])]
    pub restore: Option<PathBuf>,
    /// With --restore: leave the VM paused until `PUT /vm/resume`.
    #[arg(long)]
    pub paused: bool,
    /// A guest write of V to port 0xf4 ends nvmm with exit status (V << 1) | 1, as QEMU's
    /// isa-debug-exit (kvm-unit-tests report pass, fail and skip this way).
    #[arg(long)]
    pub debug_exit: bool,
}

/// What the command line asks to run.
pub enum Run {
    Boot(VmConfig),
    Restore(config::RestoreConfig),
}

fn parse_level(s: &str) -> Result<log::LevelFilter, String> {
    s.parse().map_err(|_| format!("unknown log level '{s}' (off, error, warn, info, debug, trace)"))
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    #[error("--kernel is required (see --help)")]
    NoKernel,
    #[error("--paused goes with --restore: a booting VM starts running")]
    PausedWithoutRestore,
}

/// What a command line that clap did not accept comes to.
#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// `--help` or `--version`: print this on stdout and exit 0.
    Print(String),
    /// A mistake: print this one line (without the `nvmm: error: ` prefix) and exit 1.
    Error(String),
}

/// Sorts a clap error into help or version text, printed as clap wrote it, or one line: the
/// first line of clap's message, which names the flag and the value, without its usage block.
pub fn refusal(err: &clap::Error) -> Refusal {
    use clap::error::ErrorKind;
    match err.kind() {
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => Refusal::Print(err.render().to_string()),
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => {
            Refusal::Error("a subcommand is required (see --help)".into())
        }
        _ => {
            let text = err.render().to_string();
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("invalid command line");
            let first = first.strip_prefix("error: ").unwrap_or(first);
            Refusal::Error(format!("{first} (see --help)"))
        }
    }
}

impl RunArgs {
    pub fn into_run(self) -> Result<Run, Error> {
        match self.restore {
            Some(dir) => Ok(Run::Restore(config::RestoreConfig { dir, api_socket: self.api_socket, paused: self.paused, seccomp: self.seccomp })),
            None if self.paused => Err(Error::PausedWithoutRestore),
            None => self.into_config().map(Run::Boot),
        }
    }

    pub fn into_config(self) -> Result<VmConfig, Error> {
        Ok(VmConfig {
            acpi: config::wants_acpi(self.no_acpi, self.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE)),
            kernel: self.kernel.ok_or(Error::NoKernel)?,
            initrd: self.initrd,
            cmdline: self.cmdline,
            mem_bytes: self.mem,
            thp: self.thp,
            cpus: self.cpus,
            nested: self.nested,
            disks: self.disk,
            nets: self.net,
            entry: self.entry,
            api_socket: self.api_socket,
            seccomp: self.seccomp,
            debug_exit: self.debug_exit,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("nvmm").chain(args.iter().copied()))
    }

    #[test]
    fn defaults() {
        let c = parse(&["--kernel", "/k"]).unwrap().run.into_config().unwrap();
        assert_eq!(c.mem_bytes, 256 << 20);
        assert_eq!(c.cpus, 1);
        assert_eq!(c.cmdline, None);
        assert_eq!(c.linux_cmdline(), DEFAULT_CMDLINE);
        assert!(!c.nested);
        assert_eq!(c.thp, crate::memory::Thp::On);
        assert!(c.acpi);
        assert_eq!(c.seccomp, crate::seccomp::Mode::On);
        assert!(!c.debug_exit);
        let c = parse(&["--kernel", "/k", "--cmdline", "-pause_filter_test -x", "--debug-exit"]).unwrap().run.into_config().unwrap();
        assert_eq!(c.cmdline.as_deref(), Some("-pause_filter_test -x"));
        assert!(parse(&["--kernel", "/k", "--debug-exit"]).unwrap().run.into_config().unwrap().debug_exit);
        let c = parse(&["--kernel", "/k", "--no-acpi"]).unwrap().run.into_config().unwrap();
        assert!(!c.acpi);
    }

    #[test]
    fn full_run_line() {
        let c = parse(&["--kernel", "/k", "--initrd", "/i", "--mem", "1G", "--cpus", "32", "--nested",
            "--disk", "path=/a.img", "--disk", "path=/b.img,readonly=on", "--net", "tap=t0"])
            .unwrap()
            .run
            .into_config()
            .unwrap();
        assert_eq!((c.mem_bytes, c.cpus, c.nested, c.disks.len(), c.nets.len()), (1 << 30, 32, true, 2, 1));
        assert!(c.disks[1].read_only);
        let c = parse(&["--kernel", "/k", "--thp", "off"]).unwrap().run.into_config().unwrap();
        assert_eq!(c.thp, crate::memory::Thp::Off);
    }

    #[test]
    fn bad_values_are_refused() {
        assert!(parse(&["--kernel", "/k", "--cpus", "0"]).is_err());
        assert!(parse(&["--kernel", "/k", "--cpus", "65"]).is_err());
        assert!(parse(&["--kernel", "/k", "--mem", "lots"]).is_err());
        assert!(parse(&["--kernel", "/k", "--thp", "maybe"]).is_err());
        assert!(parse(&["--kernel", "/k", "--disk", "readonly=on"]).is_err());
        assert_eq!(parse(&[]).unwrap().run.into_config(), Err(Error::NoKernel));
    }

    #[test]
    fn api_socket_and_ctl() {
        let c = parse(&["--kernel", "/k", "--api-socket", "/run/nvmm.sock"]).unwrap().run.into_config().unwrap();
        assert_eq!(c.api_socket, Some(PathBuf::from("/run/nvmm.sock")));
        let c = parse(&["ctl", "/run/nvmm.sock", "pause"]).unwrap();
        assert!(matches!(c.command, Some(Command::Ctl { command: crate::api::client::Command::Pause, .. })));
        assert!(parse(&["ctl", "/run/nvmm.sock", "explode"]).is_err());
        assert!(parse(&["ctl", "/run/nvmm.sock"]).is_err());
        let c = parse(&["ctl", "/run/nvmm.sock", "snapshot", "/snap"]).unwrap();
        assert!(matches!(c.command, Some(Command::Ctl { command: crate::api::client::Command::Snapshot { .. }, .. })));
        assert!(parse(&["ctl", "/run/nvmm.sock", "snapshot"]).is_err());
    }

    #[test]
    fn restore_takes_only_what_a_snapshot_does_not_record() {
        let run = parse(&["--restore", "/s", "--api-socket", "/a.sock", "--paused"]).unwrap().run.into_run().unwrap();
        let Run::Restore(r) = run else { panic!("not a restore") };
        assert_eq!((r.dir, r.api_socket, r.paused), ("/s".into(), Some("/a.sock".into()), true));
        assert!(parse(&["--restore", "/s", "--kernel", "/k"]).is_err());
        assert!(parse(&["--restore", "/s", "--mem", "1G"]).is_err());
        assert!(matches!(parse(&["--kernel", "/k", "--paused"]).unwrap().run.into_run(), Err(Error::PausedWithoutRestore)));
        assert!(matches!(parse(&["--kernel", "/k"]).unwrap().run.into_run(), Ok(Run::Boot(_))));
    }

    #[test]
    fn clap_errors_become_one_line_and_help_is_printed() {
        for args in [&["--kernel", "/k", "--mem", "0"][..], &["--kernel", "/k", "--cpus", "65"], &["--bogus"],
            &["--kernel", "/k", "--disk", "path=/a,readonly=maybe"], &["bench"]] {
            match refusal(&parse(args).unwrap_err()) {
                Refusal::Error(line) => {
                    assert!(!line.contains('\n') && !line.starts_with("error"), "{args:?}: {line}");
                    assert!(line.ends_with("(see --help)"), "{line}");
                }
                other => panic!("{args:?}: {other:?}"),
            }
        }
        let Refusal::Error(line) = refusal(&parse(&["--kernel", "/k", "--cpus", "65"]).unwrap_err()) else { panic!() };
        assert!(line.contains("--cpus") && line.contains("65"), "{line}");
        assert!(matches!(refusal(&parse(&["--help"]).unwrap_err()), Refusal::Print(t) if t.contains("--kernel")));
        assert!(matches!(refusal(&parse(&["--version"]).unwrap_err()), Refusal::Print(t) if t.starts_with("nvmm ")));
    }

    #[test]
    fn check_subcommand() {
        let c = parse(&["check", "--json"]).unwrap();
        assert!(matches!(c.command, Some(Command::Check { json: true })));
    }
}
