//! Order-preserving byte keys for every keyspace. Integers are big-endian; ids are followed
//! by a 0x00 separator (ids never contain it) wherever something comes after them.

use crate::fhir::{Instant, ResourceType};

pub const ID_TERMINATOR: u8 = 0x00;

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
    key.extend_from_slice(id.as_bytes());
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
    key.extend_from_slice(id.as_bytes());
    key.push(ID_TERMINATOR);
    key
}

/// `compartment`: patient id, 0x00, type, id.
pub fn compartment(patient_id: &str, resource_type: ResourceType, id: &str) -> Vec<u8> {
    let mut key = compartment_patient_prefix(patient_id);
    key.extend_from_slice(&resource_type.code().to_be_bytes());
    key.extend_from_slice(id.as_bytes());
    key
}

/// Every member of one patient's compartment.
pub fn compartment_patient_prefix(patient_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(patient_id.len() + 1 + 2 + 40);
    key.extend_from_slice(patient_id.as_bytes());
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
