//! Order-preserving byte keys for every keyspace. Integers are big-endian; ids are followed
//! by a 0x00 separator (ids never contain it) wherever something comes after them.

use crate::fhir::{Instant, ResourceType};

pub const ID_TERMINATOR: u8 = 0x00;

/// `events` and `superseded`: type, seq.
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
