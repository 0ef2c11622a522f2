//! The PM1 event and control blocks of an ACPI platform with fixed hardware (not hardware-reduced),
//! as kvm-unit-tests find them on QEMU's PC through the FADT: a status and an enable register,
//! and a control register whose SLP_TYP and SLP_EN put the machine to sleep. nvmm offers S3
//! (suspend to RAM), woken by the RTC's alarm when RTC_EN is set, and S5 (power off).
//!
//! ACPI mode is always on: the FADT has no SMI command port, so SCI_EN reads as set. No SCI is
//! raised: the only event here, the RTC's, matters to a sleeping guest, which it wakes.

use serde::{Deserialize, Serialize};

use crate::acpi_pm::S5_SLEEP_TYPE;
use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;

/// First port of the blocks: after the PM timer (0x608-0x60b), next to the hardware-reduced sleep
/// and reset registers (0x600-0x602), which Linux guests keep.
pub const PM1_PORT: u64 = 0x60c;
/// The event block (status, then enable), then the control block.
pub const EVENT_BLOCK_LEN: u8 = 4;
pub const CONTROL_BLOCK_LEN: u8 = 2;
pub const PORT_COUNT: u64 = (EVENT_BLOCK_LEN + CONTROL_BLOCK_LEN) as u64;
/// Offsets of the three 16-bit registers in the block.
pub const STATUS: u64 = 0;
pub const ENABLE: u64 = 2;
pub const CONTROL: u64 = 4;
/// The sleep type of S3, as the DSDT's `_S3_` gives it (QEMU's value).
pub const S3_SLEEP_TYPE: u8 = 1;

/// PM1 status and enable bits (ACPI 6.5, 4.8.3.1): the RTC alarm, and (status only) waking.
pub const RTC_STS: u16 = 1 << 10;
pub const RTC_EN: u16 = 1 << 10;
pub const WAK_STS: u16 = 1 << 15;
/// PM1 control (4.8.3.2): SCI_EN, SLP_TYP in bits 10-12, SLP_EN (write-only).
const SCI_EN: u16 = 1 << 0;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0x7;
const SLP_EN: u16 = 1 << 13;
/// What the guest may set in the enable register: the one wake event nvmm has.
const ENABLE_BITS: u16 = RTC_EN;

/// What a snapshot keeps: the guest-visible registers. A snapshot is never taken asleep.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pm1State {
    pub status: u16,
    pub enable: u16,
    pub sleep_type: u8,
}

/// Where the blocks' requests go.
pub struct Pm1Lines {
    pub power_off: EventFdTrigger,
    /// The guest entered S3: its vCPUs must stop before they run another instruction.
    pub sleep: Box<dyn Fn() + Send>,
    /// A wake event came while asleep.
    pub wake: Box<dyn Fn() + Send>,
}

pub struct Pm1 {
    lines: Pm1Lines,
    status: u16,
    enable: u16,
    sleep_type: u8,
    asleep: bool,
    /// A sleep type nvmm does not offer is logged once.
    warned: bool,
}

impl Pm1 {
    pub fn new(lines: Pm1Lines) -> Self {
        Self { lines, status: 0, enable: 0, sleep_type: 0, asleep: false, warned: false }
    }

    /// Whether the RTC's alarm wakes the guest from S3.
    pub fn rtc_wakes(&self) -> bool {
        self.enable & RTC_EN != 0
    }

    /// The RTC's alarm: RTC_STS, and if the guest sleeps and enabled it, WAK_STS and a wake.
    pub fn rtc_alarm(&mut self) {
        self.status |= RTC_STS;
        if self.asleep && self.rtc_wakes() {
            self.asleep = false;
            self.status |= WAK_STS;
            (self.lines.wake)();
        }
    }

    fn control(&self) -> u16 {
        SCI_EN | (u16::from(self.sleep_type) << SLP_TYP_SHIFT)
    }

    fn register(&self, offset: u64) -> u16 {
        match offset {
            STATUS => self.status,
            ENABLE => self.enable,
            _ => self.control(),
        }
    }

    /// A write of `value` to the register at `offset`, of which `mask` says which bytes were
    /// written (a guest may write either byte alone).
    fn write_register(&mut self, offset: u64, value: u16, mask: u16) {
        match offset {
            // Status bits are cleared by writing 1s.
            STATUS => self.status &= !(value & mask),
            ENABLE => self.enable = (self.enable & !mask) | (value & mask & ENABLE_BITS),
            _ => {
                let control = (self.control() & !mask) | (value & mask);
                self.sleep_type = ((control >> SLP_TYP_SHIFT) & SLP_TYP_MASK) as u8;
                if value & mask & SLP_EN != 0 {
                    self.enter(self.sleep_type);
                }
            }
        }
    }

    fn enter(&mut self, sleep_type: u8) {
        match sleep_type {
            S3_SLEEP_TYPE => {
                self.asleep = true;
                (self.lines.sleep)();
            }
            S5_SLEEP_TYPE => {
                if let Err(e) = self.lines.power_off.write(1) {
                    crate::error_limited!("ACPI power-off could not be signalled: {e}");
                }
            }
            _ if !self.warned => {
                self.warned = true;
                crate::warn_limited!("guest asked for ACPI sleep type {sleep_type}; only S3 ({S3_SLEEP_TYPE}) and S5 ({S5_SLEEP_TYPE}) are offered");
            }
            _ => {}
        }
    }

    pub fn save(&self) -> Pm1State {
        Pm1State { status: self.status, enable: self.enable, sleep_type: self.sleep_type }
    }

    pub fn restore(&mut self, state: &Pm1State) {
        self.status = state.status;
        self.enable = state.enable & ENABLE_BITS;
        self.sleep_type = state.sleep_type & SLP_TYP_MASK as u8;
    }
}

/// The 16-bit register that holds the byte at `port` (an offset in the block), and that byte's
/// place in it.
fn locate(port: u64) -> (u64, u32) {
    (port & !1, (port & 1) as u32 * 8)
}

impl BusDevice for Pm1 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (port, byte) in (offset..).zip(data.iter_mut()) {
            let (register, shift) = locate(port);
            *byte = if port < PORT_COUNT { (self.register(register) >> shift) as u8 } else { 0 };
        }
    }

    /// The bytes of one access that fall in one register are written together: a word write of
    /// SLP_TYP and SLP_EN is one request, as it is on hardware.
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut port = offset;
        let mut bytes = data.iter();
        while let Some(&first) = bytes.next() {
            let (register, shift) = locate(port);
            let (mut value, mut mask) = (u16::from(first) << shift, 0xffu16 << shift);
            port += 1;
            if shift == 0 {
                if let Some(&second) = bytes.next() {
                    value |= u16::from(second) << 8;
                    mask |= 0xff00;
                    port += 1;
                }
            }
            if register < PORT_COUNT {
                self.write_register(register, value, mask);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;
    use vmm_sys_util::eventfd::EventFd;

    struct Rig {
        pm1: Pm1,
        off: EventFd,
        sleeps: Arc<AtomicU32>,
        wakes: Arc<AtomicU32>,
    }

    fn rig() -> Rig {
        let off = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let (sleeps, wakes) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)));
        let (s, w) = (sleeps.clone(), wakes.clone());
        let pm1 = Pm1::new(Pm1Lines {
            power_off: EventFdTrigger(off.try_clone().unwrap()),
            sleep: Box::new(move || {
                s.fetch_add(1, Ordering::SeqCst);
            }),
            wake: Box::new(move || {
                w.fetch_add(1, Ordering::SeqCst);
            }),
        });
        Rig { pm1, off, sleeps, wakes }
    }

    impl Rig {
        fn counts(&self) -> (u32, u32) {
            (self.sleeps.load(Ordering::SeqCst), self.wakes.load(Ordering::SeqCst))
        }
        fn word(&mut self, offset: u64) -> u16 {
            let mut b = [0u8; 2];
            self.pm1.read(offset, &mut b);
            u16::from_le_bytes(b)
        }
    }

    /// What kvm-unit-tests' s3.c writes: RTC_EN, then SLP_TYP=1 | SLP_EN in one word.
    #[test]
    fn s3_sleeps_and_the_rtc_alarm_wakes_it_when_enabled() {
        let mut r = rig();
        r.pm1.write(ENABLE, &0x400u16.to_le_bytes());
        assert!(r.pm1.rtc_wakes());
        r.pm1.write(CONTROL, &0x2400u16.to_le_bytes());
        assert_eq!(r.counts(), (1, 0));
        assert_eq!(r.word(CONTROL), SCI_EN | (1 << SLP_TYP_SHIFT), "SLP_EN reads as 0, SCI_EN as 1");
        r.pm1.rtc_alarm();
        assert_eq!(r.counts(), (1, 1));
        assert_eq!(r.word(STATUS), WAK_STS | RTC_STS);
        // A second alarm, awake, wakes nothing.
        r.pm1.rtc_alarm();
        assert_eq!(r.counts(), (1, 1));
        // Status bits clear when written with 1s, one at a time.
        r.pm1.write(STATUS, &WAK_STS.to_le_bytes());
        assert_eq!(r.word(STATUS), RTC_STS);
        r.pm1.write(STATUS, &[0xff]);
        assert_eq!(r.word(STATUS), RTC_STS, "the low byte holds no set bit");
        r.pm1.write(STATUS + 1, &[0xff]);
        assert_eq!(r.word(STATUS), 0);
        assert!(r.off.read().is_err());
    }

    #[test]
    fn an_alarm_without_rtc_en_sets_rtc_sts_and_does_not_wake() {
        let mut r = rig();
        r.pm1.write(CONTROL, &0x2400u16.to_le_bytes());
        r.pm1.rtc_alarm();
        assert_eq!(r.counts(), (1, 0));
        assert_eq!(r.word(STATUS), RTC_STS);
        // Enabled later, the next alarm wakes it.
        r.pm1.write(ENABLE, &[0x00, 0x04]);
        r.pm1.rtc_alarm();
        assert_eq!(r.counts(), (1, 1));
    }

    #[test]
    fn byte_writes_of_sleep_type_and_sleep_enable_and_s5() {
        let mut r = rig();
        // SLP_TYP and SLP_EN are both in the high byte.
        r.pm1.write(CONTROL + 1, &[(S3_SLEEP_TYPE << 2) | 0x20]);
        assert_eq!(r.counts(), (1, 0));
        // SLP_TYP first without SLP_EN does nothing; then S5 powers off.
        r.pm1.write(CONTROL, &(u16::from(S5_SLEEP_TYPE) << SLP_TYP_SHIFT).to_le_bytes());
        assert!(r.off.read().is_err());
        r.pm1.write(CONTROL, &((u16::from(S5_SLEEP_TYPE) << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes());
        assert_eq!(r.off.read().unwrap(), 1);
        // Other sleep types do nothing (and log once).
        for typ in [0u16, 2, 3, 4, 6, 7] {
            r.pm1.write(CONTROL, &((typ << SLP_TYP_SHIFT) | SLP_EN).to_le_bytes());
        }
        assert_eq!(r.counts(), (1, 0));
        assert!(r.off.read().is_err());
    }

    #[test]
    fn enable_keeps_only_rtc_en_and_the_state_round_trips() {
        let mut r = rig();
        r.pm1.write(ENABLE, &0xffffu16.to_le_bytes());
        assert_eq!(r.word(ENABLE), RTC_EN);
        r.pm1.rtc_alarm();
        r.pm1.write(CONTROL, &(1u16 << SLP_TYP_SHIFT).to_le_bytes());
        let state = r.pm1.save();
        assert_eq!(state, Pm1State { status: RTC_STS, enable: RTC_EN, sleep_type: 1 });
        let mut back = rig();
        back.pm1.restore(&state);
        assert_eq!((back.word(STATUS), back.word(ENABLE), back.word(CONTROL)), (RTC_STS, RTC_EN, SCI_EN | 1 << SLP_TYP_SHIFT));
        // Past the block reads as zero and takes nothing.
        let mut b = [0xffu8; 2];
        back.pm1.read(PORT_COUNT, &mut b);
        assert_eq!(b, [0, 0]);
        back.pm1.write(PORT_COUNT - 1, &[0xff, 0xff]);
        assert_eq!(back.counts(), (0, 0));
    }
}
