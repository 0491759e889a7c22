use std::fmt;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// A point in time with microsecond precision, as microseconds since the Unix epoch (UTC).
/// Formats as a FHIR `instant` with six fractional digits and `Z`.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Instant(i64);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "'{text}' is not a FHIR instant (expected e.g. 2024-01-31T12:00:00Z or 2024-01-31T12:00:00.123+01:00)"
)]
pub struct InstantParseError {
    pub text: String,
}

impl Instant {
    pub const fn from_micros_since_epoch(micros: i64) -> Instant {
        Instant(micros)
    }

    pub const fn micros_since_epoch(self) -> i64 {
        self.0
    }

    pub fn now() -> Instant {
        let now = OffsetDateTime::now_utc();
        Instant((now.unix_timestamp_nanos() / 1_000) as i64)
    }

    /// Parses a FHIR `instant`: full date, time to the second, optional fraction, and a
    /// zone (`Z` or `±hh:mm`). Precision beyond microseconds is truncated.
    pub fn parse(text: &str) -> Result<Instant, InstantParseError> {
        let error = || InstantParseError {
            text: text.chars().take(80).collect(),
        };
        let parsed = OffsetDateTime::parse(text, &Rfc3339).map_err(|_| error())?;
        let micros = parsed.unix_timestamp_nanos().div_euclid(1_000);
        i64::try_from(micros).map(Instant).map_err(|_| error())
    }

    /// The FHIR `instant` text, e.g. `2024-01-31T12:00:00.123456Z`.
    pub fn to_fhir_string(self) -> String {
        let nanos = i128::from(self.0) * 1_000;
        let moment =
            OffsetDateTime::from_unix_timestamp_nanos(nanos).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        let date = moment.date();
        let clock = moment.time();
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
            date.year(),
            u8::from(date.month()),
            date.day(),
            clock.hour(),
            clock.minute(),
            clock.second(),
            clock.microsecond()
        )
    }

    /// The HTTP-date form (RFC 9110 IMF-fixdate) used by `Last-Modified` and `Expires`.
    pub fn to_http_date(self) -> String {
        let seconds = self.0.div_euclid(1_000_000);
        let moment =
            OffsetDateTime::from_unix_timestamp(seconds).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        const WEEKDAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
        const MONTHS: [&str; 12] = [
            "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
        ];
        format!(
            "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
            WEEKDAYS[moment.weekday().number_days_from_monday() as usize],
            moment.day(),
            MONTHS[u8::from(moment.month()) as usize - 1],
            moment.year(),
            moment.hour(),
            moment.minute(),
            moment.second()
        )
    }
}

impl fmt::Display for Instant {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.to_fhir_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fhir_instants_with_zones_and_fractions() {
        let utc = Instant::parse("2024-01-31T12:00:00Z").unwrap();
        assert_eq!(utc.micros_since_epoch(), 1_706_702_400_000_000);
        assert_eq!(Instant::parse("2024-01-31T13:00:00+01:00").unwrap(), utc);
        let fractional = Instant::parse("2024-01-31T12:00:00.1234567Z").unwrap();
        assert_eq!(fractional.micros_since_epoch(), 1_706_702_400_123_456);
        assert_eq!(fractional.to_fhir_string(), "2024-01-31T12:00:00.123456Z");
        assert_eq!(
            Instant::parse(&fractional.to_fhir_string()).unwrap(),
            fractional
        );
    }

    #[test]
    fn rejects_partial_or_malformed_instants() {
        for text in [
            "2024-01-31",
            "2024-01-31T12:00Z",
            "2024-01-31T12:00:00",
            "yesterday",
            "",
        ] {
            assert!(Instant::parse(text).is_err(), "{text} should be rejected");
        }
    }

    #[test]
    fn formats_http_dates() {
        let instant = Instant::parse("2024-01-31T12:34:56.789Z").unwrap();
        assert_eq!(instant.to_http_date(), "Wed, 31 Jan 2024 12:34:56 GMT");
    }
}
