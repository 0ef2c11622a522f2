pub mod acpi_pm;
pub mod boot_timer;
pub mod bus;
pub mod i8042;
pub mod ratelimit;
pub mod serial;
pub mod trigger;
pub mod virtio;

// For the rate-limited logging macros, which expand in other crates.
#[doc(hidden)]
pub use log as __log;
