//! nvmm: a small VMM for Linux guests on KVM, built to run at any nesting layer.

pub mod acpi;
pub mod api;
pub mod bench;
pub mod boot;
pub mod builder;
pub mod cli;
pub mod config;
pub mod cpuid;
pub mod device_loop;
pub mod devices;
pub mod kvm;
pub mod logger;
pub mod mailbox;
pub mod memory;
pub mod mptable;
pub mod prefault;
pub mod seccomp;
pub mod signals;
pub mod sleep;
pub mod smram;
pub mod snapshot;
pub mod terminal;
pub mod vcpu;
pub mod virtio;
pub mod vm;
pub mod vmm;
pub mod check;
pub mod host;
pub mod nested;

/// A unit test that cannot run here says so; under CI (`CI` set, and not to `false` or `0`) that
/// is a failure, never a silent pass.
#[cfg(test)]
pub(crate) fn skip_test(why: &str) {
    let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0");
    assert!(!ci, "test skipped under CI: {why}");
    eprintln!("skipped: {why}");
}

#[cfg(test)]
mod tests {
    /// Skips only when asked to by `a_skip_fails_under_ci_and_passes_elsewhere`, which runs it.
    #[test]
    fn skip_probe() {
        if std::env::var_os("NVMM_SKIP_PROBE").is_some() {
            crate::skip_test("probe");
        }
    }

    #[test]
    fn a_skip_fails_under_ci_and_passes_elsewhere() {
        let run = |ci: Option<&str>| {
            let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
            cmd.args(["--exact", "tests::skip_probe"]).env("NVMM_SKIP_PROBE", "1").env_remove("CI");
            if let Some(v) = ci {
                cmd.env("CI", v);
            }
            let out = cmd.output().unwrap();
            (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let (passed, out) = run(Some("true"));
        assert!(!passed && out.contains("test skipped under CI: probe"), "{out}");
        assert!(run(None).0);
        assert!(run(Some("false")).0);
    }
}
