//! The RTC's calendar: seconds since the UNIX epoch to a date and time of day and back, and the two
//! ways register B lets a guest encode a field (BCD or binary; hours in 24- or 12-hour form).

/// Days in 400 Gregorian years: the calendar repeats with this period.
const DAYS_PER_400_YEARS: i64 = 146_097;
/// 2000-01-01, where a 400-year period starts, in days since 1970-01-01.
const DAYS_1970_TO_2000: i64 = 10_957;
const FIRST_YEAR_OF_PERIOD: i64 = 2000;
pub const SECONDS_PER_DAY: i64 = 86_400;
/// 1970-01-01 was a Thursday, day 5 of the RTC's week (Sunday is 1).
const WEEKDAY_OF_EPOCH: i64 = 5;
/// The 12-hour form's PM flag, in the hours byte.
const HOUR_PM: u8 = 0x80;

/// A date and time of day, as the RTC's registers hold them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateTime {
    pub year: i64,
    /// 1 to 12.
    pub month: u8,
    /// 1 to the month's length.
    pub day: u8,
    /// 1 (Sunday) to 7 (Saturday).
    pub weekday: u8,
    pub hour: u8,
    pub minute: u8,
    pub second: u8,
}

fn is_leap(year: i64) -> bool {
    year % 4 == 0 && (year % 100 != 0 || year % 400 == 0)
}

fn days_in_year(year: i64) -> i64 {
    if is_leap(year) {
        366
    } else {
        365
    }
}

fn days_in_month(year: i64, month: u8) -> u8 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

impl DateTime {
    /// The date and time `secs` seconds after 1970-01-01 00:00:00. Whole 400-year periods are
    /// skipped at once, so the loops below run at most 400 and 12 times.
    pub fn from_unix(secs: i64) -> Self {
        let days = secs.div_euclid(SECONDS_PER_DAY);
        let time = secs.rem_euclid(SECONDS_PER_DAY);
        let since_2000 = days - DAYS_1970_TO_2000;
        let mut year = FIRST_YEAR_OF_PERIOD + 400 * since_2000.div_euclid(DAYS_PER_400_YEARS);
        let mut rest = since_2000.rem_euclid(DAYS_PER_400_YEARS);
        while rest >= days_in_year(year) {
            rest -= days_in_year(year);
            year += 1;
        }
        let mut month = 1;
        while rest >= i64::from(days_in_month(year, month)) {
            rest -= i64::from(days_in_month(year, month));
            month += 1;
        }
        Self {
            year,
            month,
            day: rest as u8 + 1,
            weekday: ((days + WEEKDAY_OF_EPOCH - 1).rem_euclid(7) + 1) as u8,
            hour: (time / 3600) as u8,
            minute: (time / 60 % 60) as u8,
            second: (time % 60) as u8,
        }
    }

    /// Seconds since 1970-01-01 00:00:00. A field out of its range (a guest may write anything) is
    /// taken as the nearest valid value; the weekday is not read (it follows from the date).
    pub fn to_unix(self) -> i64 {
        let month = self.month.clamp(1, 12);
        let day = self.day.clamp(1, days_in_month(self.year, month));
        let periods = (self.year - FIRST_YEAR_OF_PERIOD).div_euclid(400);
        let mut year = FIRST_YEAR_OF_PERIOD + 400 * periods;
        let mut days = DAYS_1970_TO_2000 + periods * DAYS_PER_400_YEARS;
        while year < self.year {
            days += days_in_year(year);
            year += 1;
        }
        days += (1..month).map(|m| i64::from(days_in_month(self.year, m))).sum::<i64>();
        days += i64::from(day) - 1;
        let time = i64::from(self.hour.min(23)) * 3600 + i64::from(self.minute.min(59)) * 60 + i64::from(self.second.min(59));
        days * SECONDS_PER_DAY + time
    }
}

pub fn to_bcd(value: u8) -> u8 {
    ((value / 10) << 4) | (value % 10)
}

/// Digits above 9 (a guest's garbage) count for what they are worth.
pub fn from_bcd(byte: u8) -> u8 {
    (byte >> 4) * 10 + (byte & 0x0f)
}

/// How register B says the time and alarm registers are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Format {
    pub binary: bool,
    pub hours_24: bool,
}

impl Format {
    pub fn encode(self, value: u8) -> u8 {
        if self.binary {
            value
        } else {
            to_bcd(value)
        }
    }

    pub fn decode(self, byte: u8) -> u8 {
        if self.binary {
            byte
        } else {
            from_bcd(byte)
        }
    }

    /// An hour from 0 to 23 as the hours register holds it: in 12-hour form 12 AM is 12, and PM
    /// sets the top bit.
    pub fn encode_hour(self, hour: u8) -> u8 {
        if self.hours_24 {
            return self.encode(hour);
        }
        let pm = if hour >= 12 { HOUR_PM } else { 0 };
        let twelve = match hour % 12 {
            0 => 12,
            h => h,
        };
        self.encode(twelve) | pm
    }

    pub fn decode_hour(self, byte: u8) -> u8 {
        if self.hours_24 {
            return self.decode(byte);
        }
        let pm = if byte & HOUR_PM != 0 { 12 } else { 0 };
        self.decode(byte & !HOUR_PM) % 12 + pm
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BCD_24H: Format = Format { binary: false, hours_24: true };

    #[test]
    fn dates_convert_both_ways_across_leap_days_and_centuries() {
        for (secs, (year, month, day, weekday)) in [
            (0, (1970, 1, 1, 5)),
            // 2000-02-29, a leap day of a year divisible by 400; a Tuesday.
            (951_782_400, (2000, 2, 29, 3)),
            // 2024-12-31 23:59:59, the last second of a leap year; a Tuesday.
            (1_735_689_599, (2024, 12, 31, 3)),
            // 2100-03-01: 2100 is not a leap year; a Monday.
            (4_107_542_400, (2100, 3, 1, 2)),
            // 1969-12-31, before the epoch; a Wednesday.
            (-86_400, (1969, 12, 31, 4)),
        ] {
            let d = DateTime::from_unix(secs);
            assert_eq!((d.year, d.month, d.day, d.weekday), (year, month, day, weekday), "{secs}");
            assert_eq!(d.to_unix(), secs, "{d:?}");
        }
        let d = DateTime::from_unix(1_735_689_599);
        assert_eq!((d.hour, d.minute, d.second), (23, 59, 59));
    }

    #[test]
    fn out_of_range_fields_are_taken_as_the_nearest_valid_value() {
        let feb_31 = DateTime { year: 2023, month: 2, day: 31, weekday: 0, hour: 99, minute: 0, second: 0 };
        let feb_28 = DateTime { day: 28, hour: 23, ..feb_31 };
        assert_eq!(feb_31.to_unix(), feb_28.to_unix());
        let month_0 = DateTime { month: 0, day: 0, hour: 0, ..feb_31 };
        assert_eq!(DateTime::from_unix(month_0.to_unix()), DateTime { year: 2023, month: 1, day: 1, weekday: 1, hour: 0, minute: 0, second: 0 });
    }

    #[test]
    fn bcd_and_binary_encodings() {
        assert_eq!((to_bcd(0), to_bcd(9), to_bcd(10), to_bcd(59), to_bcd(99)), (0x00, 0x09, 0x10, 0x59, 0x99));
        for v in 0..100 {
            assert_eq!(from_bcd(to_bcd(v)), v);
        }
        let binary = Format { binary: true, hours_24: true };
        assert_eq!((binary.encode(59), binary.decode(59)), (59, 59));
        assert_eq!((BCD_24H.encode(59), BCD_24H.decode(0x59)), (0x59, 59));
    }

    #[test]
    fn hours_in_24_and_12_hour_form() {
        let bcd_12h = Format { binary: false, hours_24: false };
        for (hour, h24, h12) in [(0, 0x00, 0x12), (1, 0x01, 0x01), (11, 0x11, 0x11), (12, 0x12, 0x92), (13, 0x13, 0x81), (23, 0x23, 0x91)] {
            assert_eq!(BCD_24H.encode_hour(hour), h24, "{hour}");
            assert_eq!(bcd_12h.encode_hour(hour), h12, "{hour}");
            assert_eq!(BCD_24H.decode_hour(h24), hour);
            assert_eq!(bcd_12h.decode_hour(h12), hour);
        }
    }
}
