//! Date search prefixes against a model: every date text is the set of whole seconds its
//! precision covers, computed with a plain calendar walk, and each prefix is read literally
//! from R4 search (3.1.1.4.2) as a statement about those sets. `ap` depends on the clock and
//! is left to the unit tests.

use fhirlog::fhir::Instant;
use fhirlog::search::fhirpath::TypedNode;
use fhirlog::search::matching::Criterion;
use fhirlog::search::matching::date::{DateRange, DateSearchValue};
use fhirlog::search::matching::prefix::Prefix;
use proptest::prelude::*;
use serde_json::{Value, json};

const DATE_CASES: u32 = 2048;

/// A date, dateTime or instant written at one of five precisions, in 2019–2021.
#[derive(Clone, Debug)]
pub struct ModelDate {
    year: i64,
    month: i64,
    day: i64,
    hour: i64,
    minute: i64,
    second: i64,
    precision: Precision,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    Year,
    Month,
    Day,
    Minute,
    Second,
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

fn days_in_month(year: i64, month: i64) -> i64 {
    match month {
        2 if is_leap(year) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Seconds from 1970-01-01T00:00:00Z, walking the calendar.
fn seconds_at(year: i64, month: i64, day: i64, hour: i64, minute: i64, second: i64) -> i64 {
    let mut days = 0;
    for earlier_year in 1970..year {
        days += if is_leap(earlier_year) { 366 } else { 365 };
    }
    for earlier_month in 1..month {
        days += days_in_month(year, earlier_month);
    }
    days += day - 1;
    ((days * 24 + hour) * 60 + minute) * 60 + second
}

impl ModelDate {
    fn text(&self) -> String {
        let ModelDate {
            year,
            month,
            day,
            hour,
            minute,
            second,
            ..
        } = self;
        match self.precision {
            Precision::Year => format!("{year:04}"),
            Precision::Month => format!("{year:04}-{month:02}"),
            Precision::Day => format!("{year:04}-{month:02}-{day:02}"),
            Precision::Minute => format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}"),
            Precision::Second => {
                format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}Z")
            }
        }
    }

    /// The first and last second the text covers.
    fn seconds(&self) -> (i64, i64) {
        let ModelDate {
            year,
            month,
            day,
            hour,
            minute,
            second,
            ..
        } = *self;
        let (first, after) = match self.precision {
            Precision::Year => (
                seconds_at(year, 1, 1, 0, 0, 0),
                seconds_at(year + 1, 1, 1, 0, 0, 0),
            ),
            Precision::Month => (
                seconds_at(year, month, 1, 0, 0, 0),
                seconds_at(year, month, 1, 0, 0, 0) + days_in_month(year, month) * 86_400,
            ),
            Precision::Day => {
                let first = seconds_at(year, month, day, 0, 0, 0);
                (first, first + 86_400)
            }
            Precision::Minute => {
                let first = seconds_at(year, month, day, hour, minute, 0);
                (first, first + 60)
            }
            Precision::Second => {
                let first = seconds_at(year, month, day, hour, minute, second);
                (first, first + 1)
            }
        };
        (first, after - 1)
    }
}

fn model_date() -> impl Strategy<Value = ModelDate> {
    (
        2019i64..=2021,
        1i64..=12,
        1i64..=31,
        0i64..24,
        0i64..60,
        0i64..60,
        prop_oneof![
            Just(Precision::Year),
            Just(Precision::Month),
            Just(Precision::Day),
            Just(Precision::Minute),
            Just(Precision::Second),
        ],
    )
        .prop_map(
            |(year, month, day, hour, minute, second, precision)| ModelDate {
                year,
                month,
                day: day.min(days_in_month(year, month)),
                hour,
                minute,
                second,
                precision,
            },
        )
}

/// A resource's date element: a date-like value, or a Period with either bound open.
#[derive(Clone, Debug)]
pub enum ModelTarget {
    Moment(ModelDate),
    Period {
        start: Option<ModelDate>,
        end: Option<ModelDate>,
    },
}

impl ModelTarget {
    fn node_value(&self) -> (Value, &'static str) {
        match self {
            ModelTarget::Moment(date) => (json!(date.text()), "dateTime"),
            ModelTarget::Period { start, end } => {
                let mut period = serde_json::Map::new();
                if let Some(start) = start {
                    period.insert("start".into(), json!(start.text()));
                }
                if let Some(end) = end {
                    period.insert("end".into(), json!(end.text()));
                }
                (Value::Object(period), "Period")
            }
        }
    }

    /// The first and last second covered; an open bound is unbounded.
    fn seconds(&self) -> (i64, i64) {
        match self {
            ModelTarget::Moment(date) => date.seconds(),
            ModelTarget::Period { start, end } => (
                start.as_ref().map_or(i64::MIN, |start| start.seconds().0),
                end.as_ref().map_or(i64::MAX, |end| end.seconds().1),
            ),
        }
    }
}

fn model_target() -> impl Strategy<Value = ModelTarget> {
    prop_oneof![
        model_date().prop_map(ModelTarget::Moment),
        (model_date(), model_date())
            .prop_map(|(first, second)| {
                if first.seconds().0 <= second.seconds().1 {
                    (first, second)
                } else {
                    (second, first)
                }
            })
            .prop_map(|(start, end)| ModelTarget::Period {
                start: Some(start),
                end: Some(end),
            }),
        model_date().prop_map(|start| ModelTarget::Period {
            start: Some(start),
            end: None,
        }),
        model_date().prop_map(|end| ModelTarget::Period {
            start: None,
            end: Some(end),
        }),
    ]
}

fn prefix() -> impl Strategy<Value = Prefix> {
    proptest::sample::select(
        Prefix::ALL
            .into_iter()
            .filter(|prefix| *prefix != Prefix::Ap)
            .collect::<Vec<_>>(),
    )
}

/// The prefix read as a statement about the target's seconds `[first, last]` and the search
/// value's seconds `[search_first, search_last]`.
pub fn model_matches(prefix: Prefix, target: (i64, i64), search: (i64, i64)) -> bool {
    let (first, last) = target;
    let (search_first, search_last) = search;
    let within = search_first <= first && last <= search_last;
    let some_second_after = last > search_last;
    let some_second_before = first < search_first;
    match prefix {
        Prefix::Eq => within,
        Prefix::Ne => !within,
        Prefix::Gt => some_second_after,
        Prefix::Lt => some_second_before,
        Prefix::Ge => some_second_after || within,
        Prefix::Le => some_second_before || within,
        Prefix::Sa => first > search_last,
        Prefix::Eb => last < search_first,
        Prefix::Ap => unreachable!("ap is not modelled"),
    }
}

pub fn implementation_matches(prefix: Prefix, target: &ModelTarget, search: &ModelDate) -> bool {
    let range = DateRange::parse(&search.text()).expect("generated dates parse");
    let criterion = Criterion::Date(vec![DateSearchValue { prefix, range }]);
    let (value, fhir_type) = target.node_value();
    criterion.matches(
        &[TypedNode {
            value: &value,
            fhir_type,
        }],
        Instant::from_micros_since_epoch(0),
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(DATE_CASES))]

    #[test]
    fn date_prefixes_agree_with_the_range_model(
        prefix in prefix(),
        target in model_target(),
        search in model_date(),
    ) {
        prop_assert_eq!(
            implementation_matches(prefix, &target, &search),
            model_matches(prefix, target.seconds(), search.seconds()),
            "{}{} against {:?}", prefix.as_str(), search.text(), target.node_value().0
        );
    }
}
