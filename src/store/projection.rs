//! How one event becomes projection entries. The committer and `rebuild` both go through
//! here, so incrementally maintained and rebuilt projections cannot drift apart.

use std::collections::HashMap;

use super::record::{self, CurrentEntry, EventOperation, EventRecord};
use super::sorted_writes::SortedWrites;
use super::{Keyspaces, StoreError, keys};
use crate::fhir::ResourceType;

/// Tracks `current` for a batch that is not committed yet: reads see the batch's own
/// writes first, then the keyspace. Keyed by the `current` key bytes, which every lookup
/// builds anyway.
pub(super) struct CurrentOverlay {
    pending: HashMap<Vec<u8>, CurrentEntry>,
}

impl CurrentOverlay {
    pub fn new() -> CurrentOverlay {
        CurrentOverlay {
            pending: HashMap::new(),
        }
    }

    pub fn get(
        &self,
        keyspaces: &Keyspaces,
        resource_type: ResourceType,
        id: &str,
    ) -> Result<Option<CurrentEntry>, StoreError> {
        current_through_overlays(keyspaces, [self], resource_type, id)
    }

    /// The entry this overlay holds for `current` key `key`, without reading the keyspace.
    pub fn pending_entry(&self, key: &[u8]) -> Option<CurrentEntry> {
        self.pending.get(key).copied()
    }

    pub fn clear(&mut self) {
        self.pending.clear();
    }
}

/// The `current` entry of a resource as the first of `overlays` (newest first) that holds
/// one has it, else as committed.
pub(super) fn current_through_overlays<'overlay>(
    keyspaces: &Keyspaces,
    overlays: impl IntoIterator<Item = &'overlay CurrentOverlay>,
    resource_type: ResourceType,
    id: &str,
) -> Result<Option<CurrentEntry>, StoreError> {
    current_under_key_through_overlays(keyspaces, overlays, &keys::type_id(resource_type, id))
}

/// [`current_through_overlays`] for the `current` key `key`.
pub(super) fn current_under_key_through_overlays<'overlay>(
    keyspaces: &Keyspaces,
    overlays: impl IntoIterator<Item = &'overlay CurrentOverlay>,
    key: &[u8],
) -> Result<Option<CurrentEntry>, StoreError> {
    match overlays
        .into_iter()
        .find_map(|overlay| overlay.pending_entry(key))
    {
        Some(entry) => Ok(Some(entry)),
        None => read_current(keyspaces, key),
    }
}

/// The committed `current` entry under `key`.
fn read_current(keyspaces: &Keyspaces, key: &[u8]) -> Result<Option<CurrentEntry>, StoreError> {
    match keyspaces.current.get(key)? {
        Some(bytes) => Ok(Some(record::decode(&bytes)?)),
        None => Ok(None),
    }
}

/// Writes the projections of `event` (but not the event itself, nor `clock`) to `writes`,
/// given the entry `current` held before it.
pub(super) fn stage_projections(
    keyspaces: &Keyspaces,
    writes: &mut SortedWrites,
    overlay: &mut CurrentOverlay,
    event: &EventRecord<'_>,
    previous: Option<CurrentEntry>,
) -> Result<(), StoreError> {
    let resource_type = ResourceType::from_code(event.resource_type_code).ok_or_else(|| {
        StoreError::Corrupt(format!("unknown type code {}", event.resource_type_code))
    })?;
    writes.insert(
        &keyspaces.log,
        keys::seq(event.seq),
        event.resource_type_code.to_be_bytes(),
    );
    if let Some(previous) = previous {
        writes.insert(
            &keyspaces.superseded,
            keys::type_seq(resource_type, previous.seq),
            keys::seq(event.seq),
        );
        writes.insert(
            &keyspaces.history,
            keys::history(resource_type, event.id, previous.version),
            keys::seq(previous.seq),
        );
    }
    let entry = CurrentEntry {
        seq: event.seq,
        version: event.version,
        deleted: event.operation == EventOperation::Delete,
        digest_prefix: record::digest_prefix(&event.digest),
    };
    let current_key = keys::type_id(resource_type, event.id);
    overlay.pending.insert(current_key.clone(), entry);
    writes.insert(&keyspaces.current, current_key, record::encode(&entry));
    for patient_id in &event.compartment_patients {
        writes.insert(
            &keyspaces.compartment,
            keys::compartment(patient_id, resource_type, event.id),
            [],
        );
    }
    Ok(())
}
