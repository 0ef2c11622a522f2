pub mod acpi_pm;
pub mod acpi_pm1;
pub mod boot_timer;
pub mod bus;
pub mod cmos_rtc;
pub mod debug_exit;
pub mod fw_cfg;
pub mod i8042;
pub mod ratelimit;
pub mod pm_timer;
pub mod serial;
pub mod trigger;
pub mod virtio;

// For the rate-limited logging macros, which expand in other crates.
#[doc(hidden)]
pub use log as __log;
