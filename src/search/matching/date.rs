//! Dates as ranges: a FHIR date, dateTime or instant stands for every moment its precision
//! covers (`2020-03` is all of March 2020), a Period for the moments between its bounds, a
//! Timing for the span of its events. Ranges are half-open, in microseconds since the epoch.

use serde_json::Value;
use time::{Date, Month, PrimitiveDateTime, Time, UtcOffset};

use super::prefix::Prefix;
use crate::fhir::Instant;
use crate::search::fhirpath::TypedNode;

/// The moments `[start, end)`; an open bound is `i64::MIN` or `i64::MAX`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DateRange {
    pub start: Instant,
    pub end: Instant,
}

/// Why a date text is not a FHIR date, dateTime or instant.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("expected a FHIR date such as 2020, 2020-03, 2020-03-15 or 2020-03-15T10:30:00Z")]
pub struct MalformedDate;

/// One date search value: a prefix and the range of the value's precision.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct DateSearchValue {
    pub prefix: Prefix,
    pub range: DateRange,
}

const MICROS_PER_SECOND: i64 = 1_000_000;

impl DateRange {
    /// The range a FHIR date, dateTime or instant text covers. A time without a zone is read
    /// as UTC; a time may stop at the minute (search values do).
    pub fn parse(text: &str) -> Result<DateRange, MalformedDate> {
        let bytes = text.as_bytes();
        let digits = |range: std::ops::Range<usize>| -> Result<u32, MalformedDate> {
            let part = bytes.get(range).ok_or(MalformedDate)?;
            if part.is_empty() || !part.iter().all(u8::is_ascii_digit) {
                return Err(MalformedDate);
            }
            Ok(part
                .iter()
                .fold(0, |total, digit| total * 10 + u32::from(digit - b'0')))
        };
        let expect = |index: usize, byte: u8| -> Result<(), MalformedDate> {
            (bytes.get(index) == Some(&byte))
                .then_some(())
                .ok_or(MalformedDate)
        };
        let year = digits(0..4)? as i32;
        if bytes.len() == 4 {
            let start = date_start(calendar_date(year, 1, 1)?);
            let end = calendar_date(year + 1, 1, 1).map_or(i64::MAX, date_start);
            return Ok(DateRange::from_micros(start, end));
        }
        expect(4, b'-')?;
        let month = digits(5..7)? as u8;
        if bytes.len() == 7 {
            let start = date_start(calendar_date(year, month, 1)?);
            let end = if month == 12 {
                calendar_date(year + 1, 1, 1)
            } else {
                calendar_date(year, month + 1, 1)
            }
            .map_or(i64::MAX, date_start);
            return Ok(DateRange::from_micros(start, end));
        }
        expect(7, b'-')?;
        let day = calendar_date(year, month, digits(8..10)? as u8)?;
        if bytes.len() == 10 {
            let end = day.next_day().map_or(i64::MAX, date_start);
            return Ok(DateRange::from_micros(date_start(day), end));
        }
        expect(10, b'T')?;
        let hour = digits(11..13)? as u8;
        expect(13, b':')?;
        let minute = digits(14..16)? as u8;
        let mut position = 16;
        let mut second = 0;
        let mut micros = 0i64;
        let mut step = 60 * MICROS_PER_SECOND;
        if bytes.get(position) == Some(&b':') {
            second = digits(17..19)? as u8;
            position = 19;
            step = MICROS_PER_SECOND;
            if bytes.get(position) == Some(&b'.') {
                let fraction_start = position + 1;
                let fraction_end = bytes[fraction_start..]
                    .iter()
                    .position(|byte| !byte.is_ascii_digit())
                    .map_or(bytes.len(), |offset| fraction_start + offset);
                if fraction_end == fraction_start {
                    return Err(MalformedDate);
                }
                let kept = &bytes[fraction_start..fraction_end.min(fraction_start + 6)];
                let mut scale = MICROS_PER_SECOND;
                for digit in kept {
                    scale /= 10;
                    micros += i64::from(digit - b'0') * scale;
                }
                step = scale;
                position = fraction_end;
            }
        }
        let offset = match &bytes[position..] {
            [] => UtcOffset::UTC,
            [b'Z'] => UtcOffset::UTC,
            [sign @ (b'+' | b'-'), ..] if bytes.len() == position + 6 => {
                expect(position + 3, b':')?;
                let hours = digits(position + 1..position + 3)? as i8;
                let minutes = digits(position + 4..position + 6)? as i8;
                let (hours, minutes) = if *sign == b'-' {
                    (-hours, -minutes)
                } else {
                    (hours, minutes)
                };
                UtcOffset::from_hms(hours, minutes, 0).map_err(|_| MalformedDate)?
            }
            _ => return Err(MalformedDate),
        };
        let clock = Time::from_hms(hour, minute, second).map_err(|_| MalformedDate)?;
        let moment = PrimitiveDateTime::new(day, clock).assume_offset(offset);
        let start = moment.unix_timestamp() * MICROS_PER_SECOND + micros;
        Ok(DateRange::from_micros(start, start.saturating_add(step)))
    }

    pub const fn from_micros(start: i64, end: i64) -> DateRange {
        DateRange {
            start: Instant::from_micros_since_epoch(start),
            end: Instant::from_micros_since_epoch(end),
        }
    }

    fn start_micros(self) -> i64 {
        self.start.micros_since_epoch()
    }

    fn end_micros(self) -> i64 {
        self.end.micros_since_epoch()
    }

    /// The range of a date-like node, or `None` for a node that is not one or cannot be read.
    pub fn of_node(node: &TypedNode<'_>) -> Option<DateRange> {
        match node.fhir_type {
            "date" | "dateTime" | "instant" => DateRange::parse(node.value.as_str()?).ok(),
            "Period" => {
                let bound = |name: &str| node.value.get(name).and_then(Value::as_str);
                let start = match bound("start") {
                    Some(text) => DateRange::parse(text).ok()?.start_micros(),
                    None => i64::MIN,
                };
                let end = match bound("end") {
                    Some(text) => DateRange::parse(text).ok()?.end_micros(),
                    None => i64::MAX,
                };
                (bound("start").is_some() || bound("end").is_some())
                    .then_some(DateRange::from_micros(start, end))
            }
            "Timing" => node
                .value
                .get("event")?
                .as_array()?
                .iter()
                .filter_map(|event| DateRange::parse(event.as_str()?).ok())
                .reduce(|left, right| {
                    DateRange::from_micros(
                        left.start_micros().min(right.start_micros()),
                        left.end_micros().max(right.end_micros()),
                    )
                }),
            _ => None,
        }
    }
}

fn calendar_date(year: i32, month: u8, day: u8) -> Result<Date, MalformedDate> {
    let month = Month::try_from(month).map_err(|_| MalformedDate)?;
    Date::from_calendar_date(year, month, day).map_err(|_| MalformedDate)
}

fn date_start(date: Date) -> i64 {
    PrimitiveDateTime::new(date, Time::MIDNIGHT)
        .assume_utc()
        .unix_timestamp()
        * MICROS_PER_SECOND
}

impl DateSearchValue {
    /// Whether a resource value covering `target` satisfies this value (R4 search, 3.1.1.4.2:
    /// ranges compared by prefix). `ap` widens the search range by a tenth of its distance
    /// from `now`, and by at least a day.
    pub fn matches(&self, target: DateRange, now: Instant) -> bool {
        let (search_start, search_end) = (self.range.start_micros(), self.range.end_micros());
        let (target_start, target_end) = (target.start_micros(), target.end_micros());
        let contained = search_start <= target_start && target_end <= search_end;
        match self.prefix {
            Prefix::Eq => contained,
            Prefix::Ne => !contained,
            Prefix::Gt => target_end > search_end,
            Prefix::Lt => target_start < search_start,
            Prefix::Ge => target_end > search_end || contained,
            Prefix::Le => target_start < search_start || contained,
            Prefix::Sa => target_start >= search_end,
            Prefix::Eb => target_end <= search_start,
            Prefix::Ap => {
                let distance = now.micros_since_epoch().abs_diff(search_start) / 10;
                let widening = i64::try_from(distance)
                    .unwrap_or(i64::MAX)
                    .max(86_400 * MICROS_PER_SECOND);
                target_start < search_end.saturating_add(widening)
                    && target_end > search_start.saturating_sub(widening)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(text: &str) -> (i64, i64) {
        let parsed = DateRange::parse(text).unwrap();
        (parsed.start_micros(), parsed.end_micros())
    }

    fn micros(instant: &str) -> i64 {
        Instant::parse(instant).unwrap().micros_since_epoch()
    }

    #[test]
    fn precision_is_a_range() {
        assert_eq!(
            range("2020"),
            (
                micros("2020-01-01T00:00:00Z"),
                micros("2021-01-01T00:00:00Z")
            )
        );
        assert_eq!(
            range("2020-12"),
            (
                micros("2020-12-01T00:00:00Z"),
                micros("2021-01-01T00:00:00Z")
            )
        );
        assert_eq!(
            range("2020-02-29"),
            (
                micros("2020-02-29T00:00:00Z"),
                micros("2020-03-01T00:00:00Z")
            )
        );
        assert_eq!(
            range("2020-02-29T10:30"),
            (
                micros("2020-02-29T10:30:00Z"),
                micros("2020-02-29T10:31:00Z")
            )
        );
        assert_eq!(
            range("2020-02-29T10:30:05+02:00"),
            (
                micros("2020-02-29T08:30:05Z"),
                micros("2020-02-29T08:30:06Z")
            )
        );
        assert_eq!(
            range("2020-02-29T10:30:05.12Z"),
            (
                micros("2020-02-29T10:30:05.12Z"),
                micros("2020-02-29T10:30:05.13Z")
            )
        );
    }

    #[test]
    fn rejects_malformed_dates() {
        for text in [
            "",
            "20",
            "2020-13",
            "2021-02-29",
            "2020-01-01T",
            "2020-01-01T25:00",
            "2020-1-01",
            "2020-01-01T10:00:00.Z",
            "2020-01-01T10:00:00+0100",
            "yesterday",
            "2020-01-01Z",
        ] {
            assert!(DateRange::parse(text).is_err(), "{text}");
        }
    }
}
