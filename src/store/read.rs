//! Point reads: current version, a given version, and a resource's history (`current`
//! holds the newest version, `history` the superseded ones).

use fjall::{Readable, Snapshot};

use super::compactor::RegisteredSnapshot;
use super::record::{self, CurrentEntry, EventOperation, EventRecord};
use super::{Keyspaces, Store, StoreError, keys};
use crate::fhir::{Instant, ResourceId, ResourceType};

/// One version of a resource as stored; `body` is `None` for a delete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredVersion {
    pub resource_type: ResourceType,
    pub id: ResourceId,
    pub version: u64,
    pub last_updated: Instant,
    pub seq: u64,
    pub body: Option<String>,
}

/// Whose history a bounded history read covers.
#[derive(Debug, Clone, Copy)]
pub enum HistoryScope<'a> {
    Instance(ResourceType, &'a ResourceId),
    Type(ResourceType),
    System,
}

/// One page of a history read over a fixed snapshot: the versions (deletes included)
/// with seq at most `snapshot_seq` and below `before_seq`, committed at or after `since`,
/// newest first, at most `count` of them.
#[derive(Debug, Clone, Copy)]
pub struct HistoryRead {
    pub snapshot_seq: u64,
    pub before_seq: Option<u64>,
    pub since: Option<Instant>,
    pub count: usize,
}

/// The versions of one history page, newest first; `more` when older ones follow.
#[derive(Debug)]
pub struct HistoryPage {
    pub versions: Vec<StoredVersion>,
    pub more: bool,
}

/// Every projection keyspace's entries, by name, for comparing two stores.
pub type ProjectionDump = Vec<(&'static str, Vec<(Vec<u8>, Vec<u8>)>)>;

impl Store {
    /// The newest version (possibly a delete); `None` if the resource never existed.
    pub fn read_current(
        &self,
        resource_type: ResourceType,
        id: &ResourceId,
    ) -> Result<Option<StoredVersion>, StoreError> {
        let keyspaces = self.keyspaces();
        let snapshot = keyspaces.snapshot();
        let Some(entry) = keyspaces.current_entry(&snapshot, resource_type, id.as_str())? else {
            return Ok(None);
        };
        self.read_event(resource_type, entry.seq).map(Some)
    }

    pub fn read_version(
        &self,
        resource_type: ResourceType,
        id: &ResourceId,
        version: u64,
    ) -> Result<Option<StoredVersion>, StoreError> {
        let keyspaces = self.keyspaces();
        let snapshot = keyspaces.snapshot();
        let Some(newest) = keyspaces.current_entry(&snapshot, resource_type, id.as_str())? else {
            return Ok(None);
        };
        let seq = if version == newest.version {
            newest.seq
        } else if version > newest.version {
            return Ok(None);
        } else {
            let Some(seq_bytes) = snapshot.get(
                &keyspaces.history,
                keys::history(resource_type, id.as_str(), version),
            )?
            else {
                return Ok(None);
            };
            keys::parse_seq(&seq_bytes)
                .ok_or_else(|| StoreError::Corrupt("bad history entry".to_owned()))?
        };
        self.read_event(resource_type, seq).map(Some)
    }

    /// One bounded page of history (see [`HistoryRead`]): reads at most `count + 1`
    /// versions whatever the size of the history.
    pub fn history_page(
        &self,
        scope: HistoryScope<'_>,
        read: HistoryRead,
    ) -> Result<HistoryPage, StoreError> {
        let upper_seq = match read.before_seq {
            Some(before_seq) => read.snapshot_seq.min(before_seq.saturating_sub(1)),
            None => read.snapshot_seq,
        };
        let mut versions = Vec::new();
        let mut more = false;
        let mut take = |version: StoredVersion| {
            if read.since.is_some_and(|since| version.last_updated < since) {
                return false;
            }
            if versions.len() == read.count {
                more = true;
                return false;
            }
            versions.push(version);
            true
        };
        let keyspaces = self.keyspaces();
        match scope {
            HistoryScope::Instance(resource_type, id) => {
                for (_, seq) in self.version_seqs(resource_type, id.as_str())? {
                    if seq > upper_seq {
                        continue;
                    }
                    if !take(self.read_event(resource_type, seq)?) {
                        break;
                    }
                }
            }
            HistoryScope::Type(resource_type) => {
                if upper_seq == 0 || !self.has_ever_stored(resource_type)? {
                    return Ok(HistoryPage { versions, more });
                }
                'ranges: for range in keys::event_ranges(resource_type, 1, upper_seq).rev() {
                    for entry in keyspaces.events.range(range).rev() {
                        let (_, value) = entry.into_inner()?;
                        let event: EventRecord = record::decode(&value)?;
                        if !take(stored_version_of(resource_type, &event)?) {
                            break 'ranges;
                        }
                    }
                }
            }
            HistoryScope::System => {
                for entry in keyspaces.log.range(..=keys::seq(upper_seq)).rev() {
                    let (seq_key, type_bytes) = entry.into_inner()?;
                    let seq = keys::parse_seq(&seq_key)
                        .ok_or_else(|| StoreError::Corrupt("bad log key".to_owned()))?;
                    let resource_type = resource_type_of_log_entry(&type_bytes)?;
                    if !take(self.read_event(resource_type, seq)?) {
                        break;
                    }
                }
            }
        }
        Ok(HistoryPage { versions, more })
    }

    /// How many versions of one resource have a seq at most `snapshot_seq` and were
    /// committed at or after `since`.
    pub fn instance_history_count(
        &self,
        resource_type: ResourceType,
        id: &ResourceId,
        snapshot_seq: u64,
        since: Option<Instant>,
    ) -> Result<u64, StoreError> {
        let mut count = 0;
        for (_, seq) in self.version_seqs(resource_type, id.as_str())? {
            if seq > snapshot_seq {
                continue;
            }
            if let Some(since) = since
                && self.read_event(resource_type, seq)?.last_updated < since
            {
                break;
            }
            count += 1;
        }
        Ok(count)
    }

    /// Every version, newest first (for tools and tests; requests read pages with
    /// [`Store::history_page`]).
    pub fn history(
        &self,
        resource_type: ResourceType,
        id: &ResourceId,
    ) -> Result<Vec<StoredVersion>, StoreError> {
        self.version_seqs(resource_type, id.as_str())?
            .into_iter()
            .map(|(_, seq)| self.read_event(resource_type, seq))
            .collect()
    }

    /// The seq of the newest event, 0 for an empty store.
    pub fn high_water_seq(&self) -> Result<u64, StoreError> {
        match self.keyspaces().log.last_key_value() {
            Some(entry) => {
                let key = entry.key()?;
                keys::parse_seq(&key).ok_or_else(|| StoreError::Corrupt("bad log key".to_owned()))
            }
            None => Ok(0),
        }
    }

    /// Ids of the resources in the compartment index under `patient_id`, as (type, id).
    pub fn compartment_members(
        &self,
        patient_id: &str,
    ) -> Result<Vec<(ResourceType, String)>, StoreError> {
        let prefix = keys::compartment_patient_prefix(patient_id);
        let mut members = Vec::new();
        for entry in self.keyspaces().compartment.prefix(&prefix) {
            let key = entry.key()?;
            let rest = &key[prefix.len()..];
            let (type_bytes, id_bytes) = rest
                .split_first_chunk::<2>()
                .ok_or_else(|| StoreError::Corrupt("bad compartment key".to_owned()))?;
            let resource_type = ResourceType::from_code(u16::from_be_bytes(*type_bytes))
                .ok_or_else(|| StoreError::Corrupt("bad compartment type".to_owned()))?;
            let id = keys::parse_id(id_bytes)
                .ok_or_else(|| StoreError::Corrupt("bad compartment id".to_owned()))?;
            members.push((resource_type, id));
        }
        Ok(members)
    }

    /// The seq of the last commit at or before `instant` (0 if none).
    pub fn seq_at_or_before(&self, instant: Instant) -> Result<u64, StoreError> {
        match self
            .keyspaces()
            .clock
            .range(..=keys::clock(instant))
            .next_back()
        {
            Some(entry) => {
                let (_, seq_bytes) = entry.into_inner()?;
                keys::parse_seq(&seq_bytes)
                    .ok_or_else(|| StoreError::Corrupt("bad clock entry".to_owned()))
            }
            None => Ok(0),
        }
    }

    /// A full copy of every projection keyspace, for tests that compare projections.
    pub fn dump_projections(&self) -> Result<ProjectionDump, StoreError> {
        let mut dump = Vec::new();
        for (name, keyspace) in self.keyspaces().projections() {
            let mut entries = Vec::new();
            for entry in keyspace.iter() {
                let (key, value) = entry.into_inner()?;
                entries.push((key.to_vec(), value.to_vec()));
            }
            dump.push((name, entries));
        }
        Ok(dump)
    }

    fn read_event(
        &self,
        resource_type: ResourceType,
        seq: u64,
    ) -> Result<StoredVersion, StoreError> {
        self.keyspaces()
            .with_event_record(resource_type, seq, |event| {
                stored_version_of(resource_type, event)
            })?
            .ok_or_else(|| {
                StoreError::Corrupt(format!("projection points at missing event {seq}"))
            })?
    }
}

impl Store {
    /// The instant of the commit that wrote `seq`; `None` for seq 0 or an unknown seq.
    pub fn commit_instant(&self, seq: u64) -> Result<Option<Instant>, StoreError> {
        let Some(type_bytes) = self.keyspaces().log.get(keys::seq(seq))? else {
            return Ok(None);
        };
        let resource_type = resource_type_of_log_entry(&type_bytes)?;
        Ok(Some(self.read_event(resource_type, seq)?.last_updated))
    }
}

impl Keyspaces {
    /// Every keyspace as of the last batch fjall has finished applying, for reads that
    /// combine keyspaces: a plain read also sees the entries of a batch being applied, so
    /// `current` could show a version whose predecessor's `history` entry is not there yet.
    pub(super) fn snapshot(&self) -> RegisteredSnapshot {
        self.snapshots.open(&self.database)
    }

    /// The `current` entry of a resource as of `snapshot`; `None` if it never existed.
    pub(super) fn current_entry(
        &self,
        snapshot: &Snapshot,
        resource_type: ResourceType,
        id: &str,
    ) -> Result<Option<CurrentEntry>, StoreError> {
        match snapshot.get(&self.current, keys::type_id(resource_type, id))? {
            Some(bytes) => Ok(Some(record::decode(&bytes)?)),
            None => Ok(None),
        }
    }

    /// Calls `visit` with the decoded event `seq` of `resource_type`; `None` if there is no
    /// such event.
    pub(super) fn with_event_record<R>(
        &self,
        resource_type: ResourceType,
        seq: u64,
        visit: impl FnOnce(&EventRecord<'_>) -> R,
    ) -> Result<Option<R>, StoreError> {
        let Some(bytes) = self.events.get(keys::event(resource_type, seq))? else {
            return Ok(None);
        };
        let event: EventRecord = record::decode(&bytes)?;
        Ok(Some(visit(&event)))
    }
}

/// An event record as a [`StoredVersion`].
fn stored_version_of(
    resource_type: ResourceType,
    event: &EventRecord<'_>,
) -> Result<StoredVersion, StoreError> {
    let id = ResourceId::parse(event.id).map_err(|error| StoreError::Corrupt(error.to_string()))?;
    let body = match event.operation {
        EventOperation::Put => Some(String::from_utf8(event.body.to_vec()).map_err(|_| {
            StoreError::Corrupt(format!(
                "event {} holds a body that is not UTF-8",
                event.seq
            ))
        })?),
        EventOperation::Delete => None,
    };
    Ok(StoredVersion {
        resource_type,
        id,
        version: event.version,
        last_updated: Instant::from_micros_since_epoch(event.instant_micros),
        seq: event.seq,
        body,
    })
}

/// The type of the event a `log` entry (seq → type code) points at.
pub(super) fn resource_type_of_log_entry(value: &[u8]) -> Result<ResourceType, StoreError> {
    value
        .try_into()
        .ok()
        .map(u16::from_be_bytes)
        .and_then(ResourceType::from_code)
        .ok_or_else(|| StoreError::Corrupt("bad log entry".to_owned()))
}

/// `(type, seq)` of the newest event, read from `events` alone so that recovery never
/// trusts a projection (one a rebuild cleared, or a damaged one). Only the last seq bucket
/// can hold the newest seq; inside it, the newest seq is the last key of one of its types.
pub(super) fn newest_event(
    keyspaces: &Keyspaces,
) -> Result<Option<(ResourceType, u64)>, StoreError> {
    let Some(last_entry) = keyspaces.events.last_key_value() else {
        return Ok(None);
    };
    let bad_key = || StoreError::Corrupt("bad events key".to_owned());
    let (bucket, _, _) = keys::parse_event(&last_entry.key()?).ok_or_else(bad_key)?;
    let mut newest: Option<(ResourceType, u64)> = None;
    let mut next_type_code = Some(0u16);
    while let Some(type_code) = next_type_code {
        let Some(first_of_type) = keyspaces
            .events
            .range(keys::event_bucket_type_prefix(bucket, type_code)..)
            .next()
        else {
            break;
        };
        let (found_bucket, found_type_code, _) =
            keys::parse_event(&first_of_type.key()?).ok_or_else(bad_key)?;
        if found_bucket != bucket {
            break;
        }
        let last_of_type = keyspaces
            .events
            .prefix(keys::event_bucket_type_prefix(bucket, found_type_code))
            .next_back()
            .ok_or_else(bad_key)?;
        let (_, _, seq) = keys::parse_event(&last_of_type.key()?).ok_or_else(bad_key)?;
        let resource_type = ResourceType::from_code(found_type_code).ok_or_else(|| {
            StoreError::Corrupt(format!("unknown type code {found_type_code} in events"))
        })?;
        if newest.is_none_or(|(_, newest_seq)| seq > newest_seq) {
            newest = Some((resource_type, seq));
        }
        next_type_code = found_type_code.checked_add(1);
    }
    Ok(newest)
}
