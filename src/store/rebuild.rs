//! Rebuilding every projection from the `events` keyspace alone.

use fjall::PersistMode;

use super::projection::{CurrentOverlay, stage_projections};
use super::record::{self, EventRecord};
use super::sorted_writes::SortedWrites;
use super::{REBUILD_IN_PROGRESS_KEY, Store, StoreError, keys};
use crate::fhir::{Instant, ResourceType};

/// Events staged per batch while rebuilding.
const REBUILD_BATCH_EVENTS: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildSummary {
    pub events: u64,
    pub commits: u64,
}

impl Store {
    /// Clears every projection and replays `events` into them. Writes must not run
    /// concurrently (the CLI runs it on a store opened with [`Store::open_for_rebuild`]).
    /// A durable mark in `meta` spans the whole rebuild: if it is interrupted,
    /// [`Store::open`] refuses the store and the next rebuild starts over.
    pub fn rebuild_projections(&self) -> Result<RebuildSummary, StoreError> {
        let keyspaces = self.keyspaces();
        keyspaces.meta.insert(REBUILD_IN_PROGRESS_KEY, [])?;
        keyspaces.database.persist(PersistMode::SyncAll)?;
        for (_, keyspace) in keyspaces.projections() {
            keyspace.clear()?;
        }
        let mut summary = RebuildSummary {
            events: 0,
            commits: 0,
        };
        let mut overlay = CurrentOverlay::new();
        let mut writes = SortedWrites::new();
        let mut staged = 0usize;
        let mut clock_pending: std::collections::HashMap<Instant, u64> =
            std::collections::HashMap::new();
        for entry in keyspaces.events.iter() {
            let (_, value) = entry.into_inner()?;
            let event: EventRecord = record::decode(&value)?;
            let resource_type = ResourceType::from_code(event.resource_type_code)
                .ok_or_else(|| StoreError::Corrupt("bad event type".to_owned()))?;
            let previous = overlay.get(&keyspaces, resource_type, event.id)?;
            stage_projections(&keyspaces, &mut writes, &mut overlay, &event, previous)?;
            let instant = Instant::from_micros_since_epoch(event.instant_micros);
            let newest_seq = clock_pending.entry(instant).or_insert(event.seq);
            *newest_seq = (*newest_seq).max(event.seq);
            summary.events += 1;
            staged += 1;
            if staged >= REBUILD_BATCH_EVENTS {
                stage_clock(self, &mut writes, &mut clock_pending)?;
                commit(
                    &keyspaces.database,
                    std::mem::replace(&mut writes, SortedWrites::new()),
                )?;
                overlay.clear();
                staged = 0;
            }
        }
        stage_clock(self, &mut writes, &mut clock_pending)?;
        commit(&keyspaces.database, writes)?;
        keyspaces.database.persist(PersistMode::SyncAll)?;
        keyspaces.meta.remove(REBUILD_IN_PROGRESS_KEY)?;
        keyspaces.database.persist(PersistMode::SyncAll)?;
        summary.commits = keyspaces.clock.len()? as u64;
        Ok(summary)
    }
}

/// A commit's clock entry maps its instant to its newest seq; events of one commit can be
/// far apart in `events` key order, so merge with what earlier batches wrote.
fn stage_clock(
    store: &Store,
    writes: &mut SortedWrites,
    clock_pending: &mut std::collections::HashMap<Instant, u64>,
) -> Result<(), StoreError> {
    let keyspaces = store.keyspaces();
    for (instant, seq) in clock_pending.drain() {
        let already = match keyspaces.clock.get(keys::clock(instant))? {
            Some(bytes) => keys::parse_seq(&bytes).unwrap_or(0),
            None => 0,
        };
        writes.insert(
            &keyspaces.clock,
            keys::clock(instant),
            keys::seq(seq.max(already)),
        );
    }
    Ok(())
}

fn commit(database: &fjall::Database, writes: SortedWrites) -> Result<(), StoreError> {
    let mut batch = database.batch();
    writes.append_to(&mut batch);
    Ok(batch.commit()?)
}
