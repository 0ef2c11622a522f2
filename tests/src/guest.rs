//! Initramfs images for the guests nvmm boots inside the lab (L2, L3): the base initramfs plus one
//! archive holding a test script at /lab/run.sh and any files the guest needs (nvmm itself, the
//! next layer's kernel and initramfs). The guest's /init runs the script when the kernel command
//! line says `nvmm.run=/lab/run.sh`, prints `NVMM-EXIT <status>` and reboots, which ends nvmm.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{guest_dir, repo_root, scratch_dir};

/// The kernel command line for a guest that runs its test script; `extra` is appended.
pub fn run_cmdline(extra: &str) -> String {
    format!("console=ttyS0 reboot=k panic=1 quiet nvmm.run=/lab/run.sh {extra}").trim_end().to_string()
}

pub struct GuestImage {
    script: String,
    files: Vec<(PathBuf, String)>,
}

impl GuestImage {
    pub fn new(script: &str) -> Self {
        Self { script: script.to_string(), files: Vec::new() }
    }

    pub fn file(mut self, src: impl AsRef<Path>, dst: &str) -> Self {
        self.files.push((src.as_ref().to_path_buf(), dst.to_string()));
        self
    }

    /// Writes the image to a scratch file and returns its path.
    pub fn build(&self, name: &str) -> PathBuf {
        let dir = scratch_dir(&format!("guest-{name}"));
        let script = dir.join("run.sh");
        std::fs::write(&script, &self.script).expect("write guest script");
        let extra = dir.join("extra.cpio");
        let mut cmd = Command::new(repo_root().join("tools/mkcpio.sh"));
        cmd.arg(&extra).arg(format!("{}:/lab/run.sh", script.display()));
        for (src, dst) in &self.files {
            cmd.arg(format!("{}:{dst}", src.display()));
        }
        let status = cmd.status().expect("run tools/mkcpio.sh");
        assert!(status.success(), "tools/mkcpio.sh failed for guest image {name}");
        let mut image = std::fs::read(guest_dir().join("initramfs.cpio")).expect("read base initramfs");
        image.extend(std::fs::read(&extra).expect("read extra archive"));
        let out = dir.join("initramfs.cpio");
        std::fs::write(&out, image).expect("write guest image");
        out
    }
}
