//! Running a [`SearchQuery`] over the store as of one snapshot: candidates from the `_id`
//! index or the Patient compartment index when the query allows, a type scan otherwise;
//! every candidate is re-checked with [`SearchQuery::matches`] on its version as of the
//! snapshot. Matches come in seq order of that version, so a page is "the next `count`
//! matches after seq `after_seq`", stable whatever is written after the snapshot.

use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;

use serde_json::Value;

use super::matching::Criterion;
use super::matching::date::DateSearchValue;
use super::matching::prefilter::RawBody;
use super::matching::prefix::Prefix;
use super::matching::reference::ReferenceSearchValue;
use super::query::{SearchClause, SearchQuery};
use crate::fhir::{Instant, ResourceType};
use crate::store::{EventView, ScanControl, SeqWindow, Store, StoreError};

const PATIENT_COMPARTMENT_JSON: &str =
    include_str!("../../data/r4/compartmentdefinition-patient.json");

/// Which page of matches to read.
#[derive(Debug, Clone, Copy)]
pub struct PageRequest {
    pub snapshot_seq: u64,
    /// Matches whose version has a seq at most this were on earlier pages.
    pub after_seq: u64,
    pub count: usize,
}

/// One matching resource, as of the snapshot.
#[derive(Debug)]
pub struct SearchMatch {
    pub seq: u64,
    pub id: String,
    pub resource: Value,
}

/// One page of matches plus the number of all matches.
#[derive(Debug)]
pub struct SearchPage {
    pub total: u64,
    pub matches: Vec<SearchMatch>,
    /// Matches follow this page.
    pub more: bool,
}

/// How candidates are found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CandidateSource {
    /// These ids (from `_id`).
    Ids(BTreeSet<String>),
    /// Members of these patients' compartments (from `patient`/`subject`).
    PatientCompartments(BTreeSet<String>),
    /// The type's events committed within these bounds (from `_lastUpdated`; open when the
    /// query has none).
    TypeScan(LastUpdatedBounds),
}

/// Commit instants every match was written within, both ends included; `None` is open.
/// The commit log orders instants like seqs, so the bounds narrow a type scan to a window.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LastUpdatedBounds {
    pub not_before: Option<Instant>,
    pub not_after: Option<Instant>,
}

impl LastUpdatedBounds {
    /// The bounds one `_lastUpdated` clause sets: for its OR-list, the widest of its values'.
    fn of_clause(clause: &SearchClause) -> Option<LastUpdatedBounds> {
        if clause.code() != "_lastUpdated" || clause.modifier().is_some() {
            return None;
        }
        let Criterion::Date(values) = clause.criterion() else {
            return None;
        };
        let bounds_of_each: Vec<LastUpdatedBounds> =
            values.iter().map(bounds_of_date_value).collect();
        let widest = |side: fn(&LastUpdatedBounds) -> Option<Instant>,
                      pick: fn(Instant, Instant) -> Instant| {
            bounds_of_each
                .iter()
                .map(side)
                .reduce(|widest, next| Some(pick(widest?, next?)))
                .flatten()
        };
        Some(LastUpdatedBounds {
            not_before: widest(|bounds| bounds.not_before, Instant::min),
            not_after: widest(|bounds| bounds.not_after, Instant::max),
        })
    }

    /// Both bounds' constraints at once (clauses are ANDed).
    fn narrowed_by(self, other: LastUpdatedBounds) -> LastUpdatedBounds {
        let tighter = |one: Option<Instant>,
                       two: Option<Instant>,
                       pick: fn(Instant, Instant) -> Instant| match (one, two)
        {
            (Some(one), Some(two)) => Some(pick(one, two)),
            (one, two) => one.or(two),
        };
        LastUpdatedBounds {
            not_before: tighter(self.not_before, other.not_before, Instant::max),
            not_after: tighter(self.not_after, other.not_after, Instant::min),
        }
    }

    /// The seqs of the commits within the bounds, up to `snapshot_seq`.
    fn seq_window(self, store: &Store, snapshot_seq: u64) -> Result<SeqWindow, StoreError> {
        let after_seq = match self.not_before {
            Some(not_before) => store.seq_at_or_before(Instant::from_micros_since_epoch(
                not_before.micros_since_epoch().saturating_sub(1),
            ))?,
            None => 0,
        };
        let through_seq = match self.not_after {
            Some(not_after) => store.seq_at_or_before(not_after)?.min(snapshot_seq),
            None => snapshot_seq,
        };
        Ok(SeqWindow {
            after_seq,
            through_seq,
        })
    }
}

/// A superset of the instants a `_lastUpdated` value with its prefix admits (each candidate
/// is checked against the query afterwards).
fn bounds_of_date_value(value: &DateSearchValue) -> LastUpdatedBounds {
    let start = (value.range.start.micros_since_epoch() != i64::MIN).then_some(value.range.start);
    let last = (value.range.end.micros_since_epoch() != i64::MAX)
        .then(|| Instant::from_micros_since_epoch(value.range.end.micros_since_epoch() - 1));
    let (not_before, not_after) = match value.prefix {
        Prefix::Eq => (start, last),
        Prefix::Ge | Prefix::Gt | Prefix::Sa => (start, None),
        Prefix::Le | Prefix::Lt | Prefix::Eb => (None, last),
        Prefix::Ne | Prefix::Ap => (None, None),
    };
    LastUpdatedBounds {
        not_before,
        not_after,
    }
}

impl CandidateSource {
    /// The narrowest index the query's clauses allow.
    pub fn for_query(query: &SearchQuery) -> CandidateSource {
        let clauses = query.clauses();
        if let Some(ids) = clauses.iter().find_map(ids_of_clause) {
            return CandidateSource::Ids(ids);
        }
        if let Some(patients) = clauses
            .iter()
            .find_map(|clause| patients_of_clause(query.resource_type(), clause))
        {
            return CandidateSource::PatientCompartments(patients);
        }
        CandidateSource::TypeScan(
            clauses
                .iter()
                .filter_map(LastUpdatedBounds::of_clause)
                .fold(LastUpdatedBounds::default(), LastUpdatedBounds::narrowed_by),
        )
    }
}

/// Reads one page of `query`'s matches as of `page.snapshot_seq`.
pub fn search_page(
    store: &Store,
    query: &SearchQuery,
    page: PageRequest,
) -> Result<SearchPage, StoreError> {
    let resource_type = query.resource_type();
    let mut collector = PageCollector::new(page);
    match CandidateSource::for_query(query) {
        CandidateSource::TypeScan(last_updated) => {
            let window = last_updated.seq_window(store, page.snapshot_seq)?;
            store.scan_newest_in_window(resource_type, window, page.snapshot_seq, |view| {
                if let Some(resource) = matching_resource(query, view) {
                    collector.offer(view.seq, view.id, resource);
                }
                ScanControl::Continue
            })?;
        }
        CandidateSource::Ids(ids) => {
            collect_candidates(store, query, page, ids.into_iter(), &mut collector)?;
        }
        CandidateSource::PatientCompartments(patients) => {
            let mut ids = BTreeSet::new();
            for patient_id in patients {
                for (member_type, id) in store.compartment_members(&patient_id)? {
                    if member_type == resource_type {
                        ids.insert(id);
                    }
                }
            }
            collect_candidates(store, query, page, ids.into_iter(), &mut collector)?;
        }
    }
    Ok(collector.finish())
}

/// Re-checks each candidate id on its version as of the snapshot.
fn collect_candidates(
    store: &Store,
    query: &SearchQuery,
    page: PageRequest,
    ids: impl Iterator<Item = String>,
    collector: &mut PageCollector,
) -> Result<(), StoreError> {
    let resource_type = query.resource_type();
    let mut found = Vec::new();
    for id in ids {
        let Some((_, seq)) = store
            .version_seqs(resource_type, &id)?
            .into_iter()
            .find(|(_, seq)| *seq <= page.snapshot_seq)
        else {
            continue;
        };
        if let Some(Some(resource)) =
            store.with_event(resource_type, seq, |view| matching_resource(query, view))?
        {
            found.push((seq, id, resource));
        }
    }
    found.sort_by_key(|(seq, _, _)| *seq);
    for (seq, id, resource) in found {
        collector.offer(seq, &id, resource);
    }
    Ok(())
}

/// The parsed body of a live version that matches the query.
fn matching_resource(query: &SearchQuery, view: &EventView<'_>) -> Option<Value> {
    if view.deleted || !query.may_match_body(&RawBody::new(view.body)) {
        return None;
    }
    let resource: Value = serde_json::from_slice(view.body).ok()?;
    query.matches(&resource).then_some(resource)
}

/// Counts every match and keeps the page's.
struct PageCollector {
    page: PageRequest,
    total: u64,
    matches: Vec<SearchMatch>,
    more: bool,
}

impl PageCollector {
    fn new(page: PageRequest) -> PageCollector {
        PageCollector {
            page,
            total: 0,
            matches: Vec::new(),
            more: false,
        }
    }

    /// A match, offered in seq order.
    fn offer(&mut self, seq: u64, id: &str, resource: Value) {
        self.total += 1;
        if seq <= self.page.after_seq {
            return;
        }
        if self.matches.len() < self.page.count {
            self.matches.push(SearchMatch {
                seq,
                id: id.to_owned(),
                resource,
            });
        } else {
            self.more = true;
        }
    }

    fn finish(self) -> SearchPage {
        SearchPage {
            total: self.total,
            matches: self.matches,
            more: self.more,
        }
    }
}

/// `_id=a,b` (no modifier): the ids a match must have.
fn ids_of_clause(clause: &SearchClause) -> Option<BTreeSet<String>> {
    if clause.code() != "_id" || clause.modifier().is_some() {
        return None;
    }
    let Criterion::Token(_) = clause.criterion() else {
        return None;
    };
    Some(
        clause
            .values()
            .iter()
            .map(|value| value.rsplit('|').next().unwrap_or(value).to_owned())
            .collect(),
    )
}

/// `patient=`/`subject=` naming only local patients, on a type whose Patient-compartment
/// membership covers that parameter: the patients a match must reference, so that each
/// match is in one of their compartments.
fn patients_of_clause(
    resource_type: ResourceType,
    clause: &SearchClause,
) -> Option<BTreeSet<String>> {
    let code = clause.code();
    let membership = compartment_parameters().get(&resource_type)?;
    let covered = membership.iter().any(|parameter| parameter == code)
        || (code == "patient" && membership.iter().any(|parameter| parameter == "subject"));
    if !covered {
        return None;
    }
    let Criterion::Reference(values) = clause.criterion() else {
        return None;
    };
    values
        .iter()
        .map(|value| match value {
            ReferenceSearchValue::Local {
                resource_type: ResourceType::PATIENT,
                id,
            } => Some(id.clone()),
            ReferenceSearchValue::AnyTypeId(id) if code == "patient" => Some(id.clone()),
            _ => None,
        })
        .collect()
}

/// For each type in the Patient compartment, the search parameters that put a resource
/// of that type in a patient's compartment.
fn compartment_parameters() -> &'static HashMap<ResourceType, Vec<String>> {
    static PARAMETERS: OnceLock<HashMap<ResourceType, Vec<String>>> = OnceLock::new();
    PARAMETERS.get_or_init(|| {
        let definition: Value = serde_json::from_str(PATIENT_COMPARTMENT_JSON)
            .expect("the shipped Patient CompartmentDefinition is JSON");
        definition["resource"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|entry| {
                let resource_type = ResourceType::parse(entry["code"].as_str()?).ok()?;
                let parameters = entry["param"]
                    .as_array()?
                    .iter()
                    .filter_map(|parameter| Some(parameter.as_str()?.to_owned()))
                    .collect();
                Some((resource_type, parameters))
            })
            .collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn source(resource_type: &str, query: &str) -> CandidateSource {
        let query = SearchQuery::parse(ResourceType::parse(resource_type).unwrap(), query).unwrap();
        CandidateSource::for_query(&query)
    }

    fn set(values: &[&str]) -> BTreeSet<String> {
        values.iter().map(|value| (*value).to_owned()).collect()
    }

    fn micros(text: &str) -> Option<i64> {
        Some(Instant::parse(text).unwrap().micros_since_epoch())
    }

    fn bounds(query: &str) -> (Option<i64>, Option<i64>) {
        let CandidateSource::TypeScan(bounds) = source("Patient", query) else {
            panic!("{query} is no type scan");
        };
        (
            bounds.not_before.map(Instant::micros_since_epoch),
            bounds.not_after.map(Instant::micros_since_epoch),
        )
    }

    #[test]
    fn last_updated_clauses_bound_the_type_scan() {
        let year_2020 = micros("2020-01-01T00:00:00Z");
        let last_of_2020 = micros("2021-01-01T00:00:00Z").map(|micros| micros - 1);
        assert_eq!(bounds("_lastUpdated=2020"), (year_2020, last_of_2020));
        assert_eq!(bounds("_lastUpdated=ge2020"), (year_2020, None));
        assert_eq!(bounds("_lastUpdated=lt2020"), (None, last_of_2020));
        assert_eq!(bounds("_lastUpdated=ne2020"), (None, None));
        assert_eq!(
            bounds("_lastUpdated=ge2020&_lastUpdated=le2020-06"),
            (
                year_2020,
                micros("2020-07-01T00:00:00Z").map(|micros| micros - 1)
            ),
            "repeated clauses narrow"
        );
        assert_eq!(
            bounds("_lastUpdated=2020,ge2022"),
            (year_2020, None),
            "an OR-list is as wide as its widest value"
        );
        assert_eq!(bounds("family=x"), (None, None));
        assert_eq!(bounds("_lastUpdated:missing=false"), (None, None));
    }

    #[test]
    fn queries_use_the_narrowest_index_they_allow() {
        assert_eq!(
            source("Observation", "code=8302-2&_id=a,b"),
            CandidateSource::Ids(set(&["a", "b"]))
        );
        assert_eq!(
            source("Observation", "patient=Patient/p1,p2&code=x"),
            CandidateSource::PatientCompartments(set(&["p1", "p2"]))
        );
        assert_eq!(
            source("Observation", "subject=Patient/p1"),
            CandidateSource::PatientCompartments(set(&["p1"]))
        );
        assert_eq!(
            source("Observation", "subject=p1"),
            CandidateSource::TypeScan(LastUpdatedBounds::default()),
            "a bare subject id may name a Group"
        );
        assert_eq!(
            source("Observation", "subject=Group/g1"),
            CandidateSource::TypeScan(LastUpdatedBounds::default())
        );
        assert_eq!(
            source("Patient", "family=x"),
            CandidateSource::TypeScan(LastUpdatedBounds::default())
        );
        assert_eq!(
            source("Observation", "_id:not=a"),
            CandidateSource::TypeScan(LastUpdatedBounds::default())
        );
    }
}
