//! Billing periods: where a month starts and ends, and how long until it resets.
//!
//! A period is a month from a subscription's anchor day (1 to 31, from billing's record or
//! the token; the calendar month, anchor 1, by default), in UTC. Its id (`2026-11`, or
//! `2026-11-15` for an anchor other than 1) is part of every counter key, so a new period
//! starts from zero without any reset job.

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

    /// The period holding `now` of a subscription renewed on day `anchor` of each month, from
    /// midnight UTC. A day the month lacks is its last day: anchor 31 renews on January 31,
    /// February 28 (29 in a leap year), March 31, April 30. Anchor 1 (or 0, or none) is the
    /// calendar month.
    pub fn anchored(now: DateTime<Utc>, anchor: u32) -> Self {
        if anchor <= 1 {
            return Self::calendar_month(now);
        }
        let anchor = anchor.min(31);
        let (year, month) = (now.year(), now.month());
        let (year, month) = if now >= renewal(year, month, anchor) {
            (year, month)
        } else {
            previous_month(year, month)
        };
        let start = renewal(year, month, anchor);
        let (next_year, next_month) = next_month(year, month);
        Self {
            id: format!("{year:04}-{month:02}-{:02}", start.day()),
            start,
            end: renewal(next_year, next_month, anchor),
        }
    }

    /// The period of a subscription renewed on day `anchor` that starts in `month` of `year`
    /// (`None`: no such month).
    pub fn starting_in(year: i32, month: u32, anchor: u32) -> Option<Self> {
        chrono::NaiveDate::from_ymd_opt(year, month, 1)?;
        Some(Self::anchored(renewal(year, month, anchor.max(1)), anchor))
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
    use std::fmt::Write;
    // One allocation and one formatting pass: every settlement carries its time.
    let mut out = String::with_capacity(24);
    let date = t.date_naive();
    let _ = write!(
        out,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
        date.year(),
        date.month(),
        date.day(),
        t.hour(),
        t.minute(),
        t.second()
    );
    if millis {
        let _ = write!(out, ".{:03}", t.timestamp_subsec_millis().min(999));
    }
    out.push('Z');
    out
}

/// Midnight UTC of the first of the month (the end of time past chrono's last year, which no
/// clock reaches).
fn month_start(year: i32, month: u32) -> DateTime<Utc> {
    chrono::NaiveDate::from_ymd_opt(year, month, 1)
        .and_then(|day| day.and_hms_opt(0, 0, 0))
        .map(|midnight| midnight.and_utc())
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// Midnight UTC of day `anchor` of the month, or of its last day if it has fewer.
fn renewal(year: i32, month: u32, anchor: u32) -> DateTime<Utc> {
    let (next_year, next_month) = next_month(year, month);
    let days = (month_start(next_year, next_month) - month_start(year, month)).num_days();
    let day = anchor.min(u32::try_from(days).unwrap_or(28));
    chrono::NaiveDate::from_ymd_opt(year, month, day)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map(|midnight| midnight.and_utc())
        .unwrap_or(DateTime::<Utc>::MAX_UTC)
}

fn next_month(year: i32, month: u32) -> (i32, u32) {
    if month == 12 {
        (year + 1, 1)
    } else {
        (year, month + 1)
    }
}

fn previous_month(year: i32, month: u32) -> (i32, u32) {
    if month == 1 {
        (year - 1, 12)
    } else {
        (year, month - 1)
    }
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
    fn an_anchor_past_a_months_end_renews_on_its_last_day() {
        let jan = BillingPeriod::anchored(at("2027-02-15T10:00:00Z"), 31);
        assert_eq!(
            (jan.id.as_str(), jan.resets_at()),
            ("2027-01-31", "2027-02-28T00:00:00Z".into())
        );
        let feb = BillingPeriod::anchored(at("2027-02-28T00:00:00Z"), 31);
        assert_eq!(
            (feb.id.as_str(), feb.resets_at()),
            ("2027-02-28", "2027-03-31T00:00:00Z".into())
        );
        let leap = BillingPeriod::anchored(at("2028-02-29T23:59:59.999Z"), 31);
        assert_eq!(
            (leap.id.as_str(), leap.resets_at()),
            ("2028-02-29", "2028-03-31T00:00:00Z".into())
        );
        let apr = BillingPeriod::anchored(at("2027-04-30T00:00:00Z"), 31);
        assert_eq!(apr.resets_at(), "2027-05-31T00:00:00Z");
        assert_eq!(
            BillingPeriod::anchored(at("2027-01-01T00:00:00Z"), 31).id,
            "2026-12-31"
        );
    }

    #[test]
    fn an_anchored_period_turns_at_midnight_utc() {
        let before = BillingPeriod::anchored(at("2026-11-14T23:59:59.999Z"), 15);
        let after = BillingPeriod::anchored(at("2026-11-15T00:00:00Z"), 15);
        assert_eq!(
            (before.id.as_str(), after.id.as_str()),
            ("2026-10-15", "2026-11-15")
        );
        assert_eq!(before.end, after.start);
        assert_eq!(before.seconds_until_end(at("2026-11-14T23:59:59.999Z")), 1);
        // Anchor 1 is the calendar month.
        assert_eq!(
            BillingPeriod::anchored(at("2026-11-14T00:00:00Z"), 1).id,
            "2026-11"
        );
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

        #[test]
        fn every_instant_lies_in_its_anchored_period(
            secs in 0i64..4_102_444_800,
            anchor in 1u32..=31,
        ) {
            let now = DateTime::from_timestamp(secs, 0).unwrap();
            let period = BillingPeriod::anchored(now, anchor);
            proptest::prop_assert!(period.start <= now && now < period.end);
            let days = (period.end - period.start).num_days();
            proptest::prop_assert!((28..=31).contains(&days), "{} days", days);
            // Its end is the next period's start.
            let next = BillingPeriod::anchored(period.end, anchor);
            proptest::prop_assert_eq!(next.start, period.end);
        }
    }
}
