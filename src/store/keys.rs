//! Order-preserving byte keys for every keyspace. Integers are big-endian; ids are followed
//! by a 0x00 separator (ids never contain it) wherever something comes after them, and are
//! written compactly in the id-keyed indexes (see [`UUID_ID_TAG`]).

use crate::fhir::{Instant, ResourceType};

pub const ID_TERMINATOR: u8 = 0x00;

/// In `current`, `history` and `compartment`, an id that is a lowercase hyphenated UUID
/// (what servers assign and Synthea writes) is stored as this tag, which no id starts with,
/// and its 16 bytes; any other id as its own bytes. That halves those indexes, and keeps a
/// `current` key within the 20 bytes fjall compares without following a pointer. A tagged
/// id has a fixed length, so a separator after it still ends a unique prefix.
const UUID_ID_TAG: u8 = 0x01;

fn push_id(key: &mut Vec<u8>, id: &str) {
    match lowercase_uuid(id) {
        Some(uuid) => {
            key.push(UUID_ID_TAG);
            key.extend_from_slice(uuid.as_bytes());
        }
        None => key.extend_from_slice(id.as_bytes()),
    }
}

/// The UUID `id` spells, when it spells one exactly as [`uuid::Uuid::hyphenated`] does.
fn lowercase_uuid(id: &str) -> Option<uuid::Uuid> {
    if id.len() != uuid::fmt::Hyphenated::LENGTH || id.bytes().any(|byte| byte.is_ascii_uppercase())
    {
        return None;
    }
    uuid::Uuid::try_parse(id).ok()
}

/// Bytes [`push_id`] writes for `id`.
pub fn encoded_id_length(id: &str) -> usize {
    match lowercase_uuid(id) {
        Some(_) => 17,
        None => id.len(),
    }
}

/// The id [`push_id`] wrote as `bytes`, the rest of a key.
pub fn parse_id(bytes: &[u8]) -> Option<String> {
    match bytes.split_first() {
        Some((&UUID_ID_TAG, uuid)) => {
            Some(uuid::Uuid::from_slice(uuid).ok()?.hyphenated().to_string())
        }
        _ => String::from_utf8(bytes.to_vec()).ok(),
    }
}

/// Consecutive seqs grouped into one `events` bucket: 2^14 events, a few memtables' worth.
const EVENT_BUCKET_SEQ_BITS: u32 = 14;

/// `events`: bucket of the seq, type, seq. Seqs only grow, so a flushed table overlaps only
/// the newest bucket and compaction leaves older buckets in place (clustering by type
/// alone made every flush overlap the whole keyspace and rewrite it); inside a bucket a
/// type's events are contiguous, so a type scan reads one run per bucket.
pub fn event(resource_type: ResourceType, seq: u64) -> [u8; 14] {
    let mut key = [0u8; 14];
    key[..4].copy_from_slice(&event_bucket(seq).to_be_bytes());
    key[4..].copy_from_slice(&type_seq(resource_type, seq));
    key
}

/// The `events` keys of one type inside one seq bucket start with these six bytes.
pub fn event_bucket_type_prefix(bucket: u32, type_code: u16) -> [u8; 6] {
    let mut prefix = [0u8; 6];
    prefix[..4].copy_from_slice(&bucket.to_be_bytes());
    prefix[4..].copy_from_slice(&type_code.to_be_bytes());
    prefix
}

/// Splits an `events` key into (bucket, type code, seq).
pub fn parse_event(key: &[u8]) -> Option<(u32, u16, u64)> {
    let key: &[u8; 14] = key.try_into().ok()?;
    let (bucket, rest) = key.split_first_chunk::<4>()?;
    let (type_code, seq) = rest.split_first_chunk::<2>()?;
    Some((
        u32::from_be_bytes(*bucket),
        u16::from_be_bytes(*type_code),
        u64::from_be_bytes(seq.try_into().ok()?),
    ))
}

fn event_bucket(seq: u64) -> u32 {
    u32::try_from(seq >> EVENT_BUCKET_SEQ_BITS).expect("seqs stay below 2^46")
}

/// The `events` key ranges, one per bucket and in seq order, that hold the events of
/// `resource_type` with seqs in `first_seq..=last_seq`.
pub fn event_ranges(
    resource_type: ResourceType,
    first_seq: u64,
    last_seq: u64,
) -> impl DoubleEndedIterator<Item = std::ops::RangeInclusive<[u8; 14]>> {
    let buckets = (first_seq <= last_seq).then(|| event_bucket(first_seq)..=event_bucket(last_seq));
    buckets.into_iter().flatten().map(move |bucket| {
        let bucket_first_seq = u64::from(bucket) << EVENT_BUCKET_SEQ_BITS;
        let bucket_last_seq = bucket_first_seq | ((1 << EVENT_BUCKET_SEQ_BITS) - 1);
        event(resource_type, first_seq.max(bucket_first_seq))
            ..=event(resource_type, last_seq.min(bucket_last_seq))
    })
}

/// `superseded`: type, seq.
pub fn type_seq(resource_type: ResourceType, seq: u64) -> [u8; 10] {
    let mut key = [0u8; 10];
    key[..2].copy_from_slice(&resource_type.code().to_be_bytes());
    key[2..].copy_from_slice(&seq.to_be_bytes());
    key
}

pub fn type_prefix(resource_type: ResourceType) -> [u8; 2] {
    resource_type.code().to_be_bytes()
}

/// `log`: seq.
pub fn seq(seq: u64) -> [u8; 8] {
    seq.to_be_bytes()
}

pub fn parse_seq(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

/// `current`: type, id.
pub fn type_id(resource_type: ResourceType, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + id.len());
    key.extend_from_slice(&resource_type.code().to_be_bytes());
    push_id(&mut key, id);
    key
}

/// `history`: type, id, 0x00, version.
pub fn history(resource_type: ResourceType, id: &str, version: u64) -> Vec<u8> {
    let mut key = history_prefix(resource_type, id);
    key.extend_from_slice(&version.to_be_bytes());
    key
}

/// Every version of one resource in `history`.
pub fn history_prefix(resource_type: ResourceType, id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(2 + id.len() + 1 + 8);
    key.extend_from_slice(&resource_type.code().to_be_bytes());
    push_id(&mut key, id);
    key.push(ID_TERMINATOR);
    key
}

/// `compartment`: patient id, 0x00, type, id.
pub fn compartment(patient_id: &str, resource_type: ResourceType, id: &str) -> Vec<u8> {
    let mut key = compartment_patient_prefix(patient_id);
    key.extend_from_slice(&resource_type.code().to_be_bytes());
    push_id(&mut key, id);
    key
}

/// Every member of one patient's compartment.
pub fn compartment_patient_prefix(patient_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(patient_id.len() + 1 + 2 + 40);
    push_id(&mut key, patient_id);
    key.push(ID_TERMINATOR);
    key
}

/// `clock`: instant.
pub fn clock(instant: Instant) -> [u8; 8] {
    (instant.micros_since_epoch() as u64 ^ (1 << 63)).to_be_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_sort_like_the_values_they_encode() {
        let patient = ResourceType::PATIENT;
        assert!(type_seq(patient, 2) < type_seq(patient, 256));
        assert!(event(patient, 2) < event(patient, 256));
        assert!(event(patient, 5) < event(ResourceType::GROUP, 1 << 20));
        assert!(history(patient, "a", 2) < history(patient, "a", 10));
        assert!(history(patient, "a", u64::MAX) < history(patient, "a.b", 1));
        assert!(
            clock(Instant::from_micros_since_epoch(-5))
                < clock(Instant::from_micros_since_epoch(3))
        );
        assert!(compartment("p1", patient, "p1").starts_with(&compartment_patient_prefix("p1")));
        assert!(!compartment("p10", patient, "x").starts_with(&compartment_patient_prefix("p1")));
    }

    #[test]
    fn ids_round_trip_and_only_lowercase_hyphenated_uuids_are_packed() {
        let uuid = "9e4000be-2dd9-807b-abde-0123456789ab";
        let patient = ResourceType::PATIENT;
        assert_eq!(type_id(patient, uuid).len(), 2 + 17);
        assert_eq!(encoded_id_length(uuid), 17);
        for id in [
            uuid,
            "9E4000BE-2DD9-807B-ABDE-0123456789AB",
            "9e4000be2dd9807babde0123456789ab",
            "{9e4000be-2dd9-807b-abde-0123456789ab}",
            "p1",
            "a.b-C",
        ] {
            let key = type_id(patient, id);
            assert_eq!(parse_id(&key[2..]).as_deref(), Some(id));
            assert_eq!(encoded_id_length(id), key.len() - 2, "{id}");
        }
        assert_eq!(type_id(patient, "p1").len(), 4);
    }

    #[test]
    fn packed_ids_still_end_unique_prefixes() {
        let patient = ResourceType::PATIENT;
        let first = "00000000-0000-0000-0000-000000000000";
        let second = "00000000-0000-0000-0000-000000000001";
        let history_of_first = history_prefix(patient, first);
        assert!(history(patient, first, 7).starts_with(&history_of_first));
        assert!(!history(patient, second, 7).starts_with(&history_of_first));
        assert!(history(patient, first, 2) < history(patient, first, 10));
        let compartment_of_first = compartment_patient_prefix(first);
        assert!(compartment(first, patient, second).starts_with(&compartment_of_first));
        assert!(!compartment(second, patient, first).starts_with(&compartment_of_first));
        assert!(!compartment("x", patient, first).starts_with(&compartment_of_first));
    }
}

#[cfg(test)]
mod event_range_tests {
    use super::*;

    fn seqs_of(
        ranges: impl Iterator<Item = std::ops::RangeInclusive<[u8; 14]>>,
    ) -> Vec<(u64, u64)> {
        ranges
            .map(|range| {
                let seq_of = |key: &[u8; 14]| u64::from_be_bytes(key[6..].try_into().unwrap());
                (seq_of(range.start()), seq_of(range.end()))
            })
            .collect()
    }

    #[test]
    fn event_ranges_split_a_seq_window_at_bucket_boundaries() {
        let bucket = 1u64 << EVENT_BUCKET_SEQ_BITS;
        let patient = ResourceType::PATIENT;
        assert_eq!(seqs_of(event_ranges(patient, 3, 9)), vec![(3, 9)]);
        assert_eq!(
            seqs_of(event_ranges(patient, 5, 2 * bucket + 1)),
            vec![
                (5, bucket - 1),
                (bucket, 2 * bucket - 1),
                (2 * bucket, 2 * bucket + 1)
            ]
        );
        assert!(seqs_of(event_ranges(patient, 9, 3)).is_empty());
        for range in event_ranges(patient, 1, 3 * bucket) {
            assert!(range.start() <= range.end());
            assert_eq!(range.start()[4..6], patient.code().to_be_bytes());
        }
    }
}
