//! The PC's CMOS real-time clock (the MC146818 that PC chipsets carry): the date and time in its
//! registers, set from the host's clock and run on a monotonic one, its alarm and interrupt flags,
//! and the rest of its 128 bytes as RAM. The guest selects a register on the index port and reads
//! or writes it on the data port. kvm-unit-tests' `s3` waits for the update-in-progress bit to rise
//! and fall, then sets an alarm for the next second to wake it from S3.
//!
//! Nothing runs between accesses: each access first accounts for the seconds that passed (the
//! update-ended and alarm flags, IRQ 8), and [`timer::RtcTimer`] does the same at the next time an
//! enabled interrupt is due, so the alarm fires while no vCPU looks at the clock (or none runs).
//! Not modelled: the periodic interrupt (PIE: the flag never rises), the square wave, daylight
//! saving, and writes to the weekday (it follows from the date).

mod calendar;
pub mod timer;

use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::trigger::EventFdTrigger;
use calendar::{DateTime, Format, SECONDS_PER_DAY};

/// The index port; the data port follows it.
pub const RTC_PORT: u64 = 0x70;
pub const PORT_COUNT: u64 = 2;
/// The ISA interrupt the alarm and update interrupts raise.
pub const RTC_IRQ: u32 = 8;
const INDEX: u64 = 0;
const DATA: u64 = 1;
/// What the write-only index port reads as (a floating bus, as under QEMU).
const INDEX_READ: u8 = 0xff;
/// Bit 7 of an index write masks NMIs on a PC; nvmm's NMIs do not go through it.
const INDEX_MASK: u8 = 0x7f;
const CMOS_BYTES: usize = 128;

// Register indexes.
const SECONDS: u8 = 0x00;
const SECONDS_ALARM: u8 = 0x01;
const MINUTES: u8 = 0x02;
const MINUTES_ALARM: u8 = 0x03;
const HOURS: u8 = 0x04;
const HOURS_ALARM: u8 = 0x05;
const WEEKDAY: u8 = 0x06;
const DAY: u8 = 0x07;
const MONTH: u8 = 0x08;
const YEAR: u8 = 0x09;
const REG_A: u8 = 0x0a;
const REG_B: u8 = 0x0b;
const REG_C: u8 = 0x0c;
const REG_D: u8 = 0x0d;
/// The century, in the RAM byte PC firmware keeps it in (the FADT's CENTURY field names it).
pub const CENTURY: u8 = 0x32;
const TIME_REGISTERS: [u8; 8] = [SECONDS, MINUTES, HOURS, WEEKDAY, DAY, MONTH, YEAR, CENTURY];

/// Register A: update in progress (read-only), then the time base and rate the guest writes.
const A_UIP: u8 = 0x80;
/// A 32.768 kHz time base and a 1024 Hz periodic rate, as PC firmware leaves it.
const A_DEFAULT: u8 = 0x26;
/// Register B: updates stopped while the guest sets the time, interrupt enables, encoding.
const B_SET: u8 = 0x80;
const B_AIE: u8 = 0x20;
const B_UIE: u8 = 0x10;
const B_BINARY: u8 = 0x04;
const B_24_HOUR: u8 = 0x02;
/// Register C: the interrupt flags, each at its enable bit's place in B, and their sum, IRQF.
const C_IRQF: u8 = 0x80;
const C_AF: u8 = 0x20;
const C_UF: u8 = 0x10;
const C_FLAGS: u8 = 0x70;
/// Register D: the RAM and time are valid (the battery is good).
const D_VRT: u8 = 0x80;
/// An alarm byte with both top bits set matches every value.
const ALARM_DONT_CARE: u8 = 0xc0;

const NS_PER_SECOND: i128 = 1_000_000_000;
/// UIP rises this long before each update: 8 periods of the 32.768 kHz time base (244 us), as in
/// the MC146818's datasheet and QEMU.
const UIP_LEAD_NS: i128 = 8 * NS_PER_SECOND / 32_768;

/// Where the RTC's time comes from: host time when the RTC is set, then a monotonic clock, so a
/// step of the host's wall clock does not move the guest's.
pub trait Clock: Send {
    /// Time since a fixed origin.
    fn monotonic(&self) -> Duration;
    /// Time since the UNIX epoch.
    fn wall(&self) -> Duration;
}

/// The host's clocks.
pub struct HostClock {
    origin: Instant,
}

impl HostClock {
    pub fn new() -> Self {
        Self { origin: Instant::now() }
    }
}

impl Default for HostClock {
    fn default() -> Self {
        Self::new()
    }
}

impl Clock for HostClock {
    fn monotonic(&self) -> Duration {
        self.origin.elapsed()
    }

    /// A host clock before 1970 reads as the epoch.
    fn wall(&self) -> Duration {
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default()
    }
}

/// What the RTC drives.
pub struct RtcLines {
    /// IRQ 8: an edge whenever IRQF rises (an enabled flag was set while none was pending).
    pub irq: EventFdTrigger,
    /// Written when the guest changes when the next interrupt is due, for [`timer::RtcTimer`].
    pub rearm: EventFdTrigger,
    /// Called at each alarm with AIE set, as a chipset sets RTC_STS and wakes from S3 on it.
    pub alarm: Box<dyn Fn() + Send>,
}

/// What a snapshot keeps of the RTC: the selected register, the 128 bytes (the time registers'
/// bytes matter only while SET holds the time still), and the time as an offset from the host's:
/// a restored RTC has kept time, as a battery-backed one would.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CmosRtcState {
    pub index: u8,
    pub cmos: Vec<u8>,
    pub offset_ns: i64,
}

pub struct CmosRtc {
    clock: Box<dyn Clock>,
    lines: RtcLines,
    index: u8,
    /// Registers A to D, the alarms and the RAM, by index. The time registers' bytes hold the time
    /// only while SET is on; otherwise the time is `base_ns` and runs on.
    cmos: [u8; CMOS_BYTES],
    /// The RTC's time, in ns since the UNIX epoch, at `base_mono` on the monotonic clock.
    base_ns: i128,
    base_mono: Duration,
    /// The last second whose update the flags account for.
    seen_second: i64,
    /// The first second after `seen_second` that matches the alarm bytes; `None` if none does.
    next_alarm: Option<i64>,
    /// A second and its date: a date is computed once per second, not once per read.
    date: Option<(i64, DateTime)>,
}

impl CmosRtc {
    /// An RTC set to the host's time (UTC), 24-hour BCD, no interrupt enabled.
    pub fn new(clock: Box<dyn Clock>, lines: RtcLines) -> Self {
        let mut cmos = [0u8; CMOS_BYTES];
        cmos[usize::from(REG_A)] = A_DEFAULT;
        cmos[usize::from(REG_B)] = B_24_HOUR;
        let mut rtc = Self { clock, lines, index: 0, cmos, base_ns: 0, base_mono: Duration::ZERO, seen_second: 0, next_alarm: None, date: None };
        rtc.set_time_ns(rtc.wall_ns());
        rtc
    }

    fn wall_ns(&self) -> i128 {
        self.clock.wall().as_nanos() as i128
    }

    fn register(&self, index: u8) -> u8 {
        self.cmos[usize::from(index)]
    }

    fn holding(&self) -> bool {
        self.register(REG_B) & B_SET != 0
    }

    fn format(&self) -> Format {
        let b = self.register(REG_B);
        Format { binary: b & B_BINARY != 0, hours_24: b & B_24_HOUR != 0 }
    }

    /// The time at `now`: it stands still while SET holds it.
    fn time_ns(&self, now: Duration) -> i128 {
        if self.holding() {
            return self.base_ns;
        }
        self.base_ns + now.saturating_sub(self.base_mono).as_nanos() as i128
    }

    fn second_at(&self, now: Duration) -> i64 {
        self.time_ns(now).div_euclid(NS_PER_SECOND) as i64
    }

    /// Sets the time to `ns` from now on; the jump is no update, and the alarm is looked for anew.
    fn set_time_ns(&mut self, ns: i128) {
        self.base_ns = ns;
        self.base_mono = self.clock.monotonic();
        self.seen_second = ns.div_euclid(NS_PER_SECOND) as i64;
        self.date = None;
        self.next_alarm = self.find_alarm(self.seen_second);
    }

    fn date_of(&mut self, second: i64) -> DateTime {
        match self.date {
            Some((s, date)) if s == second => date,
            _ => {
                let date = DateTime::from_unix(second);
                self.date = Some((second, date));
                date
            }
        }
    }

    /// Whether the alarm bytes match `second`'s time of day, byte for byte as the chip compares.
    fn alarm_matches(&self, second: i64) -> bool {
        let time = second.rem_euclid(SECONDS_PER_DAY);
        let f = self.format();
        let matches = |alarm: u8, value: u8| alarm & ALARM_DONT_CARE == ALARM_DONT_CARE || alarm == value;
        matches(self.register(SECONDS_ALARM), f.encode((time % 60) as u8))
            && matches(self.register(MINUTES_ALARM), f.encode((time / 60 % 60) as u8))
            && matches(self.register(HOURS_ALARM), f.encode_hour((time / 3600) as u8))
    }

    /// The first second after `after` whose update matches the alarm. Alarms repeat daily, so a
    /// day is enough; this runs when the alarm, the time or the encoding change and at each alarm,
    /// never per access.
    fn find_alarm(&self, after: i64) -> Option<i64> {
        (1..=SECONDS_PER_DAY).map(|d| after + d).find(|&s| self.alarm_matches(s))
    }

    /// Sets `flags` in register C; IRQF rises, with an edge on IRQ 8, when one of them is enabled.
    fn raise(&mut self, flags: u8) {
        let c = self.register(REG_C) | flags;
        self.cmos[usize::from(REG_C)] = c;
        self.update_irqf();
    }

    fn update_irqf(&mut self) {
        let c = self.register(REG_C);
        if c & C_IRQF == 0 && c & self.register(REG_B) & C_FLAGS != 0 {
            self.cmos[usize::from(REG_C)] = c | C_IRQF;
            if let Err(e) = self.lines.irq.write(1) {
                crate::error_limited!("RTC: IRQ {RTC_IRQ} could not be raised: {e}");
            }
        }
    }

    /// Accounts for the updates since the last access: UF at each, AF (and the alarm) when one
    /// matched the alarm. Seconds missed in between count as one update, as a guest that did not
    /// read register C in between cannot tell.
    fn catch_up(&mut self, now: Duration) {
        if self.holding() {
            return;
        }
        let second = self.second_at(now);
        if second <= self.seen_second {
            return;
        }
        let alarm = self.next_alarm.is_some_and(|a| a <= second);
        self.seen_second = second;
        let mut flags = C_UF;
        if alarm {
            flags |= C_AF;
            self.next_alarm = self.find_alarm(second);
        }
        self.raise(flags);
        if alarm && self.register(REG_B) & B_AIE != 0 {
            (self.lines.alarm)();
        }
    }

    /// Accounts for the time passed and says how long until the next enabled interrupt is due
    /// (`None`: none is enabled, or the time is held).
    pub fn tick(&mut self) -> Option<Duration> {
        let now = self.clock.monotonic();
        self.catch_up(now);
        if self.holding() {
            return None;
        }
        let b = self.register(REG_B);
        let update = (b & B_UIE != 0).then_some(self.seen_second + 1);
        let alarm = if b & B_AIE != 0 { self.next_alarm } else { None };
        let due = [update, alarm].into_iter().flatten().min()?;
        let wait = i128::from(due) * NS_PER_SECOND - self.time_ns(now);
        Some(Duration::from_nanos(wait.clamp(0, i128::from(u64::MAX)) as u64))
    }

    /// Whether an alarm will come: AIE set and alarm bytes that some time of day matches.
    pub fn alarm_armed(&self) -> bool {
        self.register(REG_B) & B_AIE != 0 && !self.holding() && self.next_alarm.is_some()
    }

    fn in_update(&self, now: Duration) -> bool {
        !self.holding() && self.time_ns(now).rem_euclid(NS_PER_SECOND) >= NS_PER_SECOND - UIP_LEAD_NS
    }

    /// A time register, in the encoding register B asks for.
    fn time_register(&mut self, index: u8, now: Duration) -> u8 {
        if self.holding() {
            return self.register(index);
        }
        let date = self.date_of(self.second_at(now));
        let f = self.format();
        match index {
            SECONDS => f.encode(date.second),
            MINUTES => f.encode(date.minute),
            HOURS => f.encode_hour(date.hour),
            WEEKDAY => date.weekday,
            DAY => f.encode(date.day),
            MONTH => f.encode(date.month),
            YEAR => f.encode(date.year.rem_euclid(100) as u8),
            // CENTURY, the last of TIME_REGISTERS.
            _ => f.encode(date.year.div_euclid(100).clamp(0, 99) as u8),
        }
    }

    /// `date` with the field at `index` replaced by the guest's `value`.
    fn with_field(&self, mut date: DateTime, index: u8, value: u8) -> DateTime {
        let f = self.format();
        let century = date.year.div_euclid(100) * 100;
        match index {
            SECONDS => date.second = f.decode(value),
            MINUTES => date.minute = f.decode(value),
            HOURS => date.hour = f.decode_hour(value),
            DAY => date.day = f.decode(value),
            MONTH => date.month = f.decode(value),
            YEAR => date.year = century + i64::from(f.decode(value).min(99)),
            CENTURY => date.year = i64::from(f.decode(value)) * 100 + date.year.rem_euclid(100),
            _ => {}
        }
        date
    }

    /// A running clock takes a written field at once and keeps its place within the second; a held
    /// one keeps the bytes, which count when SET is cleared.
    fn write_time(&mut self, index: u8, value: u8, now: Duration) {
        if self.holding() {
            self.cmos[usize::from(index)] = value;
            return;
        }
        let ns = self.time_ns(now);
        let date = self.date_of(ns.div_euclid(NS_PER_SECOND) as i64);
        let date = self.with_field(date, index, value);
        self.set_time_ns(i128::from(date.to_unix()) * NS_PER_SECOND + ns.rem_euclid(NS_PER_SECOND));
    }

    /// The time registers' bytes as the clock stands, for SET to hold.
    fn hold_time(&mut self, now: Duration) {
        self.base_ns = self.time_ns(now);
        for index in TIME_REGISTERS {
            self.cmos[usize::from(index)] = self.time_register(index, now);
        }
    }

    /// The held bytes as a time; the first update follows a second later.
    fn release_time(&mut self) {
        let mut date = DateTime::from_unix(0);
        for index in TIME_REGISTERS {
            date = self.with_field(date, index, self.register(index));
        }
        self.set_time_ns(i128::from(date.to_unix()) * NS_PER_SECOND);
    }

    /// SET holds the time (and clears UIE, as the chip does); a change of encoding changes what
    /// the alarm bytes match; enabling a flag that is already set raises IRQF.
    fn write_b(&mut self, value: u8, now: Duration) {
        let was_holding = self.holding();
        let value = if value & B_SET != 0 { value & !B_UIE } else { value };
        if value & B_SET != 0 && !was_holding {
            self.hold_time(now);
        }
        self.cmos[usize::from(REG_B)] = value;
        if value & B_SET == 0 && was_holding {
            self.release_time();
        } else {
            self.next_alarm = self.find_alarm(self.seen_second);
        }
        self.update_irqf();
    }

    fn read_register(&mut self, index: u8) -> u8 {
        let now = self.clock.monotonic();
        self.catch_up(now);
        match index {
            _ if TIME_REGISTERS.contains(&index) => self.time_register(index, now),
            REG_A if self.in_update(now) => self.register(REG_A) | A_UIP,
            REG_C => std::mem::take(&mut self.cmos[usize::from(REG_C)]),
            REG_D => D_VRT,
            _ => self.register(index),
        }
    }

    fn write_register(&mut self, index: u8, value: u8) {
        let now = self.clock.monotonic();
        self.catch_up(now);
        match index {
            _ if TIME_REGISTERS.contains(&index) => self.write_time(index, value, now),
            SECONDS_ALARM | MINUTES_ALARM | HOURS_ALARM => {
                self.cmos[usize::from(index)] = value;
                self.next_alarm = self.find_alarm(self.seen_second);
            }
            REG_A => self.cmos[usize::from(REG_A)] = value & !A_UIP,
            REG_B => self.write_b(value, now),
            // Read-only.
            REG_C | REG_D => return,
            _ => {
                self.cmos[usize::from(index)] = value;
                return;
            }
        }
        // The next interrupt may be due at another time now.
        if let Err(e) = self.lines.rearm.write(1) {
            crate::error_limited!("RTC: its timer could not be told of a change: {e}");
        }
    }

    pub fn save(&mut self) -> CmosRtcState {
        let now = self.clock.monotonic();
        self.catch_up(now);
        let offset = self.time_ns(now) - self.wall_ns();
        let offset_ns = offset.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64;
        CmosRtcState { index: self.index, cmos: self.cmos.to_vec(), offset_ns }
    }

    /// Loads `state`; the time goes on from the host's time plus the saved offset.
    pub fn restore(&mut self, state: &CmosRtcState) {
        self.index = state.index & INDEX_MASK;
        let n = state.cmos.len().min(CMOS_BYTES);
        self.cmos[..n].copy_from_slice(&state.cmos[..n]);
        let ns = self.wall_ns() + i128::from(state.offset_ns);
        if self.holding() {
            self.base_ns = ns;
            self.next_alarm = None;
        } else {
            self.set_time_ns(ns);
        }
    }
}

impl BusDevice for CmosRtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (port, byte) in (offset..).zip(data.iter_mut()) {
            *byte = match port {
                DATA => self.read_register(self.index),
                _ => INDEX_READ,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (port, &byte) in (offset..).zip(data) {
            match port {
                INDEX => self.index = byte & INDEX_MASK,
                DATA => self.write_register(self.index, byte),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
    use std::sync::Arc;

    use vmm_sys_util::eventfd::EventFd;

    use super::*;

    /// 2024-12-31 23:59:58 UTC, a Tuesday, two seconds before a new year, day, hour and minute.
    const START: u64 = 1_735_689_598;
    const SECOND: u64 = 1_000_000_000;

    /// A clock the test moves: monotonic time from 0, wall time from `START`.
    #[derive(Clone, Default)]
    struct FakeClock(Arc<AtomicU64>);

    impl FakeClock {
        fn advance_ns(&self, ns: u64) {
            self.0.fetch_add(ns, Ordering::SeqCst);
        }
    }

    impl Clock for FakeClock {
        fn monotonic(&self) -> Duration {
            Duration::from_nanos(self.0.load(Ordering::SeqCst))
        }
        fn wall(&self) -> Duration {
            Duration::from_secs(START) + self.monotonic()
        }
    }

    struct Rig {
        rtc: CmosRtc,
        clock: FakeClock,
        irq: EventFd,
        rearm: EventFd,
        alarms: Arc<AtomicU32>,
    }

    fn rig() -> Rig {
        let clock = FakeClock::default();
        let (irq, rearm) = (EventFd::new(libc::EFD_NONBLOCK).unwrap(), EventFd::new(libc::EFD_NONBLOCK).unwrap());
        let alarms = Arc::new(AtomicU32::new(0));
        let counted = alarms.clone();
        let lines = RtcLines {
            irq: EventFdTrigger(irq.try_clone().unwrap()),
            rearm: EventFdTrigger(rearm.try_clone().unwrap()),
            alarm: Box::new(move || {
                counted.fetch_add(1, Ordering::SeqCst);
            }),
        };
        Rig { rtc: CmosRtc::new(Box::new(clock.clone()), lines), clock, irq, rearm, alarms }
    }

    impl Rig {
        fn get(&mut self, reg: u8) -> u8 {
            self.rtc.write(INDEX, &[reg]);
            let mut b = [0u8];
            self.rtc.read(DATA, &mut b);
            b[0]
        }
        fn set(&mut self, reg: u8, value: u8) {
            self.rtc.write(INDEX, &[reg]);
            self.rtc.write(DATA, &[value]);
        }
        fn time(&mut self) -> [u8; 8] {
            TIME_REGISTERS.map(|r| self.get(r))
        }
        fn irqs(&self) -> u64 {
            self.irq.read().unwrap_or(0)
        }
        fn alarms(&self) -> u32 {
            self.alarms.load(Ordering::SeqCst)
        }
    }

    #[test]
    fn time_registers_read_the_host_time_in_bcd_and_roll_over() {
        let mut r = rig();
        // Seconds, minutes, hours, weekday, day, month, year, century.
        assert_eq!(r.time(), [0x58, 0x59, 0x23, 3, 0x31, 0x12, 0x24, 0x20]);
        r.clock.advance_ns(2 * SECOND);
        assert_eq!(r.time(), [0x00, 0x00, 0x00, 4, 0x01, 0x01, 0x25, 0x20]);
    }

    #[test]
    fn binary_and_12_hour_encodings_follow_register_b() {
        let mut r = rig();
        r.set(REG_B, B_BINARY);
        // 23:59:58 is 11 PM: 11 with the PM bit.
        assert_eq!((r.get(SECONDS), r.get(MINUTES), r.get(HOURS)), (58, 59, 0x80 | 11));
        r.set(REG_B, B_24_HOUR);
        assert_eq!(r.get(HOURS), 0x23);
    }

    #[test]
    fn uip_is_set_for_the_244_us_before_each_update() {
        let mut r = rig();
        assert_eq!(UIP_LEAD_NS, 244_140);
        assert_eq!(r.get(REG_A), A_DEFAULT);
        r.clock.advance_ns(SECOND - 244_141);
        assert_eq!(r.get(REG_A), A_DEFAULT, "UIP before its window");
        r.clock.advance_ns(1);
        assert_eq!(r.get(REG_A), A_DEFAULT | A_UIP, "UIP at the start of its window");
        // The time registers still show the second before the update.
        assert_eq!(r.get(SECONDS), 0x58);
        r.clock.advance_ns(244_139);
        assert_eq!(r.get(REG_A), A_DEFAULT | A_UIP, "UIP at the end of its window");
        r.clock.advance_ns(1);
        assert_eq!((r.get(REG_A), r.get(SECONDS)), (A_DEFAULT, 0x59), "the update done");
        // Register A's rate bits are the guest's; UIP is not.
        r.set(REG_A, 0xff);
        assert_eq!(r.get(REG_A), 0x7f);
    }

    #[test]
    fn register_c_collects_flags_until_read_and_irq_8_follows_the_enables() {
        let mut r = rig();
        // Off the default alarm (00:00:00), which the clock passes in two seconds.
        r.set(HOURS_ALARM, 0x12);
        r.clock.advance_ns(SECOND);
        assert_eq!(r.get(REG_C), C_UF, "an update sets UF");
        assert_eq!(r.get(REG_C), 0, "reading C clears it");
        assert_eq!(r.irqs(), 0, "UF without UIE raises no interrupt");
        r.set(REG_B, B_24_HOUR | B_UIE);
        r.clock.advance_ns(3 * SECOND);
        assert_eq!(r.get(REG_C), C_IRQF | C_UF, "three updates missed read as one");
        assert_eq!(r.irqs(), 1);
        // IRQF stays set until C is read: a second update raises no second edge.
        r.clock.advance_ns(SECOND);
        r.rtc.tick();
        r.clock.advance_ns(SECOND);
        r.rtc.tick();
        assert_eq!(r.irqs(), 1);
        assert_eq!(r.get(REG_C), C_IRQF | C_UF);
    }

    /// What kvm-unit-tests' s3.c does: wait for an update, clear C, set every alarm byte to "don't
    /// care" and enable AIE; the alarm then comes at the next update.
    #[test]
    fn a_dont_care_alarm_fires_at_the_next_update() {
        let mut r = rig();
        r.clock.advance_ns(SECOND / 2);
        r.get(REG_C);
        for reg in [SECONDS_ALARM, MINUTES_ALARM, HOURS_ALARM] {
            r.set(reg, ALARM_DONT_CARE);
        }
        let b = r.get(REG_B);
        r.set(REG_B, b | B_AIE);
        assert!(r.rearm.read().unwrap() >= 1, "the timer is told the alarm changed");
        assert!(r.rtc.alarm_armed());
        assert_eq!(r.rtc.tick(), Some(Duration::from_nanos(SECOND / 2)), "due at the next update");
        assert_eq!((r.irqs(), r.alarms()), (0, 0));
        r.clock.advance_ns(SECOND / 2);
        assert_eq!(r.rtc.tick(), Some(Duration::from_nanos(SECOND)), "and again a second later");
        assert_eq!((r.irqs(), r.alarms()), (1, 1));
        assert_eq!(r.get(REG_C), C_IRQF | C_AF | C_UF);
    }

    #[test]
    fn an_alarm_matches_only_its_time_of_day() {
        let mut r = rig();
        // 00:00:05, in 7 seconds.
        r.set(SECONDS_ALARM, 0x05);
        r.set(MINUTES_ALARM, 0x00);
        r.set(HOURS_ALARM, 0x00);
        r.set(REG_B, B_24_HOUR | B_AIE);
        assert_eq!(r.rtc.tick(), Some(Duration::from_secs(7)));
        r.clock.advance_ns(6 * SECOND);
        assert_eq!(r.get(REG_C), C_UF);
        assert_eq!(r.alarms(), 0);
        r.clock.advance_ns(SECOND);
        assert_eq!(r.get(REG_C), C_IRQF | C_AF | C_UF);
        assert_eq!(r.alarms(), 1);
        // Next due a day later.
        assert_eq!(r.rtc.tick(), Some(Duration::from_secs(86_400)));
        // Don't-care hours: every hour at minute 0, second 5.
        r.set(HOURS_ALARM, 0xff);
        assert_eq!(r.rtc.tick(), Some(Duration::from_secs(3600)));
        // A byte no time has (60 seconds) never matches: no alarm will come.
        r.set(SECONDS_ALARM, 0x60);
        assert!(!r.rtc.alarm_armed());
        assert_eq!(r.rtc.tick(), None);
    }

    #[test]
    fn the_alarm_wakes_only_with_aie_and_aie_on_a_pending_flag_raises_irq_8() {
        let mut r = rig();
        for reg in [SECONDS_ALARM, MINUTES_ALARM, HOURS_ALARM] {
            r.set(reg, ALARM_DONT_CARE);
        }
        assert!(!r.rtc.alarm_armed());
        r.clock.advance_ns(SECOND);
        r.rtc.tick();
        assert_eq!((r.irqs(), r.alarms()), (0, 0), "AF without AIE");
        r.set(REG_B, B_24_HOUR | B_AIE);
        assert_eq!(r.irqs(), 1, "AF already set: enabling AIE raises IRQF");
        assert_eq!(r.get(REG_C), C_IRQF | C_AF | C_UF);
    }

    #[test]
    fn set_holds_the_time_and_the_written_time_counts_on_release() {
        let mut r = rig();
        r.set(REG_B, B_24_HOUR | B_SET | B_UIE);
        assert_eq!(r.get(REG_B), B_24_HOUR | B_SET, "SET clears UIE");
        r.clock.advance_ns(5 * SECOND - 1000);
        assert_eq!(r.get(SECONDS), 0x58, "held");
        assert_eq!(r.get(REG_A), A_DEFAULT, "no update in progress while held");
        assert_eq!(r.get(REG_C), 0, "no update while held");
        // 2030-06-15 12:34:56, a Saturday; the day before the month, as Linux writes them.
        for (reg, value) in [(SECONDS, 0x56), (MINUTES, 0x34), (HOURS, 0x12), (DAY, 0x15), (MONTH, 0x06), (YEAR, 0x30)] {
            r.set(reg, value);
        }
        r.set(REG_B, B_24_HOUR);
        assert_eq!(r.time(), [0x56, 0x34, 0x12, 7, 0x15, 0x06, 0x30, 0x20]);
        r.clock.advance_ns(SECOND);
        assert_eq!(r.get(SECONDS), 0x57);
    }

    #[test]
    fn a_running_clock_takes_a_written_field_at_once() {
        let mut r = rig();
        r.clock.advance_ns(SECOND / 2);
        r.set(MINUTES, 0x10);
        r.set(CENTURY, 0x21);
        assert_eq!(r.time(), [0x58, 0x10, 0x23, 1, 0x31, 0x12, 0x24, 0x21], "2124-12-31 is a Sunday");
        // It keeps its place within the second: the update comes half a second on.
        r.clock.advance_ns(SECOND / 2);
        assert_eq!(r.get(SECONDS), 0x59);
    }

    #[test]
    fn register_d_ram_and_the_index_port() {
        let mut r = rig();
        assert_eq!(r.get(REG_D), D_VRT);
        r.set(REG_D, 0);
        r.set(REG_C, 0xff);
        assert_eq!((r.get(REG_D), r.get(REG_C)), (D_VRT, 0), "C and D are read-only");
        r.set(0x40, 0xa5);
        r.set(0x7f, 0x5a);
        assert_eq!((r.get(0x40), r.get(0x7f)), (0xa5, 0x5a));
        // Bit 7 of the index is the NMI mask, not part of the index.
        r.rtc.write(INDEX, &[0x80 | REG_D]);
        let mut b = [0u8; 2];
        r.rtc.read(INDEX, &mut b);
        assert_eq!(b, [INDEX_READ, D_VRT], "a word read: the index port, then the data port");
        assert_eq!(r.rearm.read().ok(), None, "RAM writes change no interrupt");
    }

    #[test]
    fn a_restored_rtc_keeps_its_registers_and_its_offset_from_the_host() {
        let mut r = rig();
        r.set(YEAR, 0x30);
        r.set(SECONDS_ALARM, 0x30);
        r.set(0x50, 0x42);
        r.set(REG_B, B_24_HOUR | B_AIE);
        r.set(MINUTES_ALARM, ALARM_DONT_CARE);
        let state = r.rtc.save();
        assert_eq!(state.cmos.len(), CMOS_BYTES);
        assert_eq!(state.index, MINUTES_ALARM);
        let mut back = rig();
        // The host's clock has moved on by 10 s since the save.
        back.clock.advance_ns(10 * SECOND);
        back.rtc.restore(&state);
        assert_eq!(back.time(), [0x08, 0x00, 0x00, 4, 0x01, 0x01, 0x31, 0x20], "2030-12-31 23:59:58 plus 10 s");
        assert_eq!((back.get(SECONDS_ALARM), back.get(0x50), back.get(REG_B)), (0x30, 0x42, B_24_HOUR | B_AIE));
        // The alarm is looked for again: xx:xx:30, 22 s on.
        assert_eq!(back.rtc.tick(), Some(Duration::from_secs(22)));
    }
}
