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
pub mod snapshot;
pub mod terminal;
pub mod vcpu;
pub mod virtio;
pub mod vm;
pub mod vmm;
pub mod check;
pub mod host;
pub mod nested;
