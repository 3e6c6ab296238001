//! Billing periods: where a month starts and ends, and how long until it resets.
//!
//! Today every period is the calendar month in UTC; the id (`2026-11`) is part of every
//! counter key, so a new month starts from zero without any reset job.

use chrono::{DateTime, Datelike, Timelike, Utc};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BillingPeriod {
    /// Stable name of the period, used in Redis keys and events: `2026-11`.
    pub id: String,
    pub start: DateTime<Utc>,
    /// Exclusive: the first instant of the next period.
    pub end: DateTime<Utc>,
}

impl BillingPeriod {
    /// The calendar month (UTC) holding `now`.
    pub fn calendar_month(now: DateTime<Utc>) -> Self {
        let (year, month) = (now.year(), now.month());
        let (next_year, next_month) = if month == 12 {
            (year + 1, 1)
        } else {
            (year, month + 1)
        };
        Self {
            id: format!("{year:04}-{month:02}"),
            start: month_start(year, month),
            end: month_start(next_year, next_month),
        }
    }

    /// Whole seconds until the period resets, rounded up so a client that waits that long is
    /// always in the new period (`Retry-After`).
    pub fn seconds_until_end(&self, now: DateTime<Utc>) -> u64 {
        let millis = (self.end - now).num_milliseconds().max(0) as u64;
        millis.div_ceil(1000)
    }

    /// `resets_at` in 429 bodies: RFC 3339, second precision, `Z`.
    pub fn resets_at(&self) -> String {
        rfc3339(self.end, false)
    }

    /// "December 1": the day the period resets, for messages.
    pub fn resets_on(&self) -> String {
        const MONTHS: [&str; 12] = [
            "January",
            "February",
            "March",
            "April",
            "May",
            "June",
            "July",
            "August",
            "September",
            "October",
            "November",
            "December",
        ];
        let month = MONTHS.get(self.end.month0() as usize).unwrap_or(&"");
        format!("{month} {}", self.end.day())
    }
}

/// RFC 3339 in UTC (`2026-11-30T23:59:59Z`, or `...59.999Z` with `millis`). Written out here
/// because chrono's formatting machinery would double the size of the `.wasm`.
/// `2026-11-29`: a UTC day, as daily counters are named.
pub fn date(t: DateTime<Utc>) -> String {
    format!("{:04}-{:02}-{:02}", t.year(), t.month(), t.day())
}

pub fn rfc3339(t: DateTime<Utc>, millis: bool) -> String {
    let date = format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        t.year(),
        t.month(),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    if millis {
        format!("{date}.{:03}Z", t.timestamp_subsec_millis().min(999))
    } else {
        format!("{date}Z")
    }
}

/// Midnight UTC of the first of the month (the end of time past chrono's last year, which no
/// clock reaches).
fn month_start(year: i32, month: u32) -> DateTime<Utc> {
    chrono::NaiveDate::from_ymd_opt(year, month, 1)
        .and_then(|day| day.and_hms_opt(0, 0, 0))
        .map(|midnight| midnight.and_utc())
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Host clocks give nanoseconds since the epoch.
pub fn from_unix_nanos(nanos: u64) -> DateTime<Utc> {
    DateTime::from_timestamp_nanos(i64::try_from(nanos).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn the_last_millisecond_of_a_month_belongs_to_it() {
        let period = BillingPeriod::calendar_month(at("2026-11-30T23:59:59.999Z"));
        assert_eq!(period.id, "2026-11");
        assert_eq!(period.resets_at(), "2026-12-01T00:00:00Z");
        assert_eq!(period.seconds_until_end(at("2026-11-30T23:59:59.999Z")), 1);
    }

    #[test]
    fn midnight_starts_the_next_month() {
        let period = BillingPeriod::calendar_month(at("2026-12-01T00:00:00Z"));
        assert_eq!(period.id, "2026-12");
        assert_eq!(period.start, at("2026-12-01T00:00:00Z"));
    }

    #[test]
    fn december_rolls_into_january() {
        let period = BillingPeriod::calendar_month(at("2026-12-15T10:00:00Z"));
        assert_eq!(period.resets_at(), "2027-01-01T00:00:00Z");
    }

    #[test]
    fn february_of_a_leap_year_has_29_days() {
        let period = BillingPeriod::calendar_month(at("2028-02-10T00:00:00Z"));
        assert_eq!(
            period.seconds_until_end(at("2028-02-28T00:00:00Z")),
            2 * 24 * 3600
        );
    }

    #[test]
    fn times_are_written_as_rfc3339() {
        let t = at("2026-11-30T23:59:59.999Z");
        assert_eq!(rfc3339(t, true), "2026-11-30T23:59:59.999Z");
        assert_eq!(rfc3339(t, false), "2026-11-30T23:59:59Z");
        assert_eq!(
            rfc3339(at("0999-01-02T03:04:05.006Z"), true),
            "0999-01-02T03:04:05.006Z"
        );
        assert_eq!(BillingPeriod::calendar_month(t).resets_on(), "December 1");
    }

    #[test]
    fn host_nanoseconds_convert_exactly() {
        let t = from_unix_nanos(1_796_083_199_999_000_000);
        assert_eq!(t, at("2026-11-30T23:59:59.999Z"));
    }

    proptest::proptest! {
        #[test]
        fn every_instant_lies_in_its_period(secs in 0i64..4_102_444_800, ms in 0u32..1000) {
            let now = DateTime::from_timestamp(secs, ms * 1_000_000).unwrap();
            let period = BillingPeriod::calendar_month(now);
            proptest::prop_assert!(period.start <= now && now < period.end);
            let wait = period.seconds_until_end(now);
            proptest::prop_assert!((1..=31 * 24 * 3600).contains(&wait));
            let written = rfc3339(now, true);
            proptest::prop_assert_eq!(DateTime::parse_from_rfc3339(&written).unwrap(), now);
        }
    }
}
