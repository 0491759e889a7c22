//! On-disk records: postcard behind a leading format-version byte.

use serde::{Deserialize, Serialize};

use super::StoreError;

pub const RECORD_FORMAT_VERSION: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EventOperation {
    Put,
    Delete,
}

/// One immutable entry of the log. `body` is the exported JSON (empty for a delete);
/// `digest` is the content digest of the body without server metadata;
/// `compartment_patients` are the patients whose compartment this version is in.
/// `body` is UTF-8 (checked when it was written) but read back as bytes, so a scan that
/// copies bodies out does not validate every one again; postcard stores bytes and strings
/// alike (a length, then the bytes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord<'a> {
    pub seq: u64,
    pub instant_micros: i64,
    pub resource_type_code: u16,
    pub id: &'a str,
    pub version: u64,
    pub operation: EventOperation,
    pub digest: [u8; 32],
    pub compartment_patients: Vec<&'a str>,
    #[serde(with = "serde_bytes")]
    pub body: &'a [u8],
}

/// The `current` projection of one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CurrentEntry {
    pub seq: u64,
    pub version: u64,
    pub deleted: bool,
    /// See [`digest_prefix`].
    pub digest_prefix: [u8; CURRENT_DIGEST_PREFIX_BYTES],
}

/// How much of a version's content digest `current` keeps: 128 bits of BLAKE3 tell a changed
/// body from an unchanged one as surely as 256 (the event keeps all of it), and `current`,
/// written and compacted once per resource with random keys, is a quarter smaller.
pub const CURRENT_DIGEST_PREFIX_BYTES: usize = 16;

/// The part of `digest` that `current` keeps.
pub fn digest_prefix(digest: &[u8; 32]) -> [u8; CURRENT_DIGEST_PREFIX_BYTES] {
    let mut prefix = [0; CURRENT_DIGEST_PREFIX_BYTES];
    prefix.copy_from_slice(&digest[..CURRENT_DIGEST_PREFIX_BYTES]);
    prefix
}

/// Encodes any record the store keeps: the format byte, then postcard.
pub fn encode<T: Serialize>(record: &T) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(64);
    encode_into(record, &mut bytes);
    bytes
}

/// [`encode`] into `bytes`, replacing what it held: a writer of many records reuses one
/// buffer.
pub fn encode_into<T: Serialize>(record: &T, bytes: &mut Vec<u8>) {
    bytes.clear();
    bytes.push(RECORD_FORMAT_VERSION);
    postcard::to_io(record, &mut *bytes).expect("writing postcard to a Vec cannot fail");
}

/// Decodes what [`encode`] wrote; another format byte is `StoreError::Corrupt`.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, StoreError> {
    match bytes.split_first() {
        Some((&RECORD_FORMAT_VERSION, payload)) => postcard::from_bytes(payload)
            .map_err(|error| StoreError::Corrupt(format!("undecodable record: {error}"))),
        Some((other, _)) => Err(StoreError::Corrupt(format!(
            "record format version {other} is not supported (this build reads {RECORD_FORMAT_VERSION})"
        ))),
        None => Err(StoreError::Corrupt("empty record".to_owned())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_records_round_trip_and_reject_unknown_versions() {
        let record = EventRecord {
            seq: 42,
            instant_micros: 1_700_000_000_000_000,
            resource_type_code: 7,
            id: "abc",
            version: 3,
            operation: EventOperation::Put,
            digest: [9; 32],
            compartment_patients: vec!["p1", "p2"],
            body: b"{\"resourceType\":\"Patient\"}",
        };
        let bytes = encode(&record);
        assert_eq!(bytes[0], RECORD_FORMAT_VERSION);
        assert_eq!(decode::<EventRecord>(&bytes).unwrap(), record);
        let mut body_as_strings_were_stored = vec![26u8];
        body_as_strings_were_stored.extend_from_slice(br#"{"resourceType":"Patient"}"#);
        assert!(
            bytes.ends_with(&body_as_strings_were_stored),
            "a body is stored as its length, then its bytes, as when it was a string"
        );
        let mut future = bytes.clone();
        future[0] = 99;
        assert!(matches!(
            decode::<EventRecord>(&future),
            Err(StoreError::Corrupt(_))
        ));
    }
}
