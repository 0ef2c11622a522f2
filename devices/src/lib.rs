pub mod acpi_pm;
pub mod boot_timer;
pub mod bus;
pub mod i8042;
pub mod serial;
pub mod trigger;
pub mod virtio;
