use super::*;
use crate::fhir::canonical::{DEFAULT_MAX_JSON_DEPTH, ParsedResource};
use crate::fhir::{LocalBase, ResourceId, ResourceType};

fn prepared(text: &str) -> PreparedResource {
    let parsed = ParsedResource::parse_bytes(text.as_bytes(), DEFAULT_MAX_JSON_DEPTH).unwrap();
    let id = parsed.id.clone().unwrap();
    PreparedResource::new(
        parsed.resource_type,
        id,
        parsed.json,
        &LocalBase::relative_only(),
    )
}

fn update(text: &str) -> WriteOperation {
    WriteOperation::Update {
        resource: prepared(text),
        expected_version: None,
        unchanged: UnchangedContent::NewVersion,
    }
}

fn id(text: &str) -> ResourceId {
    ResourceId::parse(text).unwrap()
}

#[test]
fn versions_history_and_deletes_follow_the_log() {
    let directory = tempfile::tempdir().unwrap();
    let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
    let first = store
        .commit(vec![update(
            r#"{"resourceType":"Patient","id":"p1","active":true}"#,
        )])
        .unwrap();
    assert!(matches!(&first[0], WriteOutcome::Created { version } if version.version == 1));
    let second = store
        .commit(vec![update(
            r#"{"resourceType":"Patient","id":"p1","active":false}"#,
        )])
        .unwrap();
    assert!(matches!(&second[0], WriteOutcome::Updated { version } if version.version == 2));

    let current = store
        .read_current(ResourceType::PATIENT, &id("p1"))
        .unwrap()
        .unwrap();
    assert_eq!(current.version, 2);
    let body = current.body.unwrap();
    assert!(body.starts_with(
        r#"{"resourceType":"Patient","id":"p1","meta":{"versionId":"2","lastUpdated":""#
    ));
    assert!(body.ends_with(r#""active":false}"#));

    let deleted = store
        .commit(vec![WriteOperation::Delete {
            resource_type: ResourceType::PATIENT,
            id: id("p1"),
            expected_version: Some(2),
        }])
        .unwrap();
    assert!(matches!(&deleted[0], WriteOutcome::Deleted { version } if version.version == 3));
    let history = store.history(ResourceType::PATIENT, &id("p1")).unwrap();
    assert_eq!(
        history
            .iter()
            .map(|version| version.version)
            .collect::<Vec<_>>(),
        vec![3, 2, 1]
    );
    assert!(history[0].body.is_none());
    assert!(history[0].last_updated > history[1].last_updated);
    assert!(
        store
            .read_version(ResourceType::PATIENT, &id("p1"), 1)
            .unwrap()
            .unwrap()
            .body
            .unwrap()
            .contains("true")
    );
    assert_eq!(store.high_water_seq().unwrap(), 3);
}

#[test]
fn a_refused_request_changes_nothing() {
    let directory = tempfile::tempdir().unwrap();
    let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
    store
        .commit(vec![update(r#"{"resourceType":"Patient","id":"p1"}"#)])
        .unwrap();
    let before = store.dump_projections().unwrap();
    let refused = store.commit(vec![
        update(r#"{"resourceType":"Patient","id":"p2"}"#),
        WriteOperation::Update {
            resource: prepared(r#"{"resourceType":"Patient","id":"p1","active":true}"#),
            expected_version: Some(7),
            unchanged: UnchangedContent::NewVersion,
        },
    ]);
    assert!(matches!(
        refused,
        Err(StoreError::Rejected(WriteRejection::VersionConflict {
            expected_version: 7,
            current_version: Some(1),
            ..
        }))
    ));
    assert_eq!(store.dump_projections().unwrap(), before);
    assert!(
        store
            .read_current(ResourceType::PATIENT, &id("p2"))
            .unwrap()
            .is_none()
    );
}

/// Requests queued at once span several groups, and the committer stages a group while
/// the applier still commits the one before: each If-Match must see every earlier update.
#[test]
fn a_chain_of_if_match_updates_queued_at_once_sees_every_earlier_request() {
    let directory = tempfile::tempdir().unwrap();
    let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
    let updates = 3 * committer::MAX_REQUESTS_PER_GROUP as u64;
    let mut pending = vec![store.submit(vec![update(
        r#"{"resourceType":"Patient","id":"p1","birthDate":"1900-01-01"}"#,
    )])];
    for expected_version in 1..=updates {
        let text = format!(
            r#"{{"resourceType":"Patient","id":"p1","multipleBirthInteger":{expected_version}}}"#
        );
        pending.push(store.submit(vec![WriteOperation::Update {
            resource: prepared(&text),
            expected_version: Some(expected_version),
            unchanged: UnchangedContent::NewVersion,
        }]));
    }
    for (index, commit) in pending.into_iter().enumerate() {
        let outcomes = commit
            .wait()
            .unwrap_or_else(|error| panic!("request {index} failed: {error}"));
        let (WriteOutcome::Created { version } | WriteOutcome::Updated { version }) = &outcomes[0]
        else {
            panic!("request {index} answered {outcomes:?}");
        };
        assert_eq!(version.version, index as u64 + 1);
    }
    let current = store
        .read_current(ResourceType::PATIENT, &id("p1"))
        .unwrap();
    assert_eq!(current.unwrap().version, updates + 1);
}

#[test]
fn skip_unchanged_appends_nothing_for_identical_content() {
    let directory = tempfile::tempdir().unwrap();
    let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
    let skip = |text: &str| WriteOperation::Update {
        resource: prepared(text),
        expected_version: None,
        unchanged: UnchangedContent::Skip,
    };
    store
        .commit(vec![skip(
            r#"{"resourceType":"Patient","id":"p1","active":true}"#,
        )])
        .unwrap();
    let again = store
        .commit(vec![skip(
            r#"{"active":true,"id":"p1","resourceType":"Patient"}"#,
        )])
        .unwrap();
    assert!(matches!(
        &again[0],
        WriteOutcome::Unchanged { version: 1, .. }
    ));
    assert_eq!(store.high_water_seq().unwrap(), 1);
}

#[test]
fn data_survives_reopen_and_the_directory_lock_is_exclusive() {
    let directory = tempfile::tempdir().unwrap();
    {
        let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
        store
            .commit(vec![update(r#"{"resourceType":"Patient","id":"p1"}"#)])
            .unwrap();
        assert!(matches!(
            Store::open(directory.path(), &StoreOptions::default()),
            Err(StoreError::Locked { .. })
        ));
    }
    let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
    let written = store
        .commit(vec![update(
            r#"{"resourceType":"Patient","id":"p1","active":true}"#,
        )])
        .unwrap();
    assert!(
        matches!(&written[0], WriteOutcome::Updated { version } if version.version == 2 && version.seq == 2)
    );
}

#[test]
fn compartment_index_and_clock_are_maintained() {
    let directory = tempfile::tempdir().unwrap();
    let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
    let outcomes = store
        .commit(vec![
            update(r#"{"resourceType":"Patient","id":"p1"}"#),
            update(r#"{"resourceType":"Observation","id":"o1","status":"final","code":{},"subject":{"reference":"Patient/p1"}}"#),
        ])
        .unwrap();
    let WriteOutcome::Created { version } = &outcomes[1] else {
        panic!("{outcomes:?}")
    };
    let mut members = store.compartment_members("p1").unwrap();
    members.sort();
    assert_eq!(
        members,
        vec![
            (ResourceType::parse("Observation").unwrap(), "o1".to_owned()),
            (ResourceType::PATIENT, "p1".to_owned())
        ]
    );
    assert_eq!(store.seq_at_or_before(version.last_updated).unwrap(), 2);
    let before = crate::fhir::Instant::from_micros_since_epoch(
        version.last_updated.micros_since_epoch() - 1,
    );
    assert_eq!(store.seq_at_or_before(before).unwrap(), 0);
}

#[test]
fn rebuilt_projections_equal_incremental_ones() {
    let directory = tempfile::tempdir().unwrap();
    let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
    store
        .commit(vec![
            update(r#"{"resourceType":"Patient","id":"p1"}"#),
            update(r#"{"resourceType":"Patient","id":"p2"}"#),
        ])
        .unwrap();
    store.commit(vec![update(r#"{"resourceType":"Encounter","id":"e1","status":"finished","class":{},"subject":{"reference":"Patient/p1"}}"#)]).unwrap();
    store
        .commit(vec![update(
            r#"{"resourceType":"Patient","id":"p1","active":true}"#,
        )])
        .unwrap();
    store
        .commit(vec![WriteOperation::Delete {
            resource_type: ResourceType::PATIENT,
            id: id("p2"),
            expected_version: None,
        }])
        .unwrap();
    let incremental = store.dump_projections().unwrap();
    let summary = store.rebuild_projections().unwrap();
    assert_eq!(summary.events, 5);
    assert_eq!(store.dump_projections().unwrap(), incremental);
}

/// `events` keys are grouped in buckets of 2^14 seqs; scans, bounds, rebuild and recovery
/// must see one type's events across bucket boundaries as one seq-ordered sequence.
#[test]
fn scans_rebuild_and_recovery_span_event_buckets() {
    const PATIENTS: u64 = 17_000;
    const OBSERVATIONS: u64 = 20_000;
    const UPDATED_PATIENTS: u64 = 100;
    let observation = ResourceType::parse("Observation").unwrap();
    let directory = tempfile::tempdir().unwrap();
    let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
    store
        .commit(
            (0..PATIENTS)
                .map(|index| update(&format!(r#"{{"resourceType":"Patient","id":"p{index}"}}"#)))
                .collect(),
        )
        .unwrap();
    store
        .commit(
            (0..OBSERVATIONS)
                .map(|index| {
                    update(&format!(
                        r#"{{"resourceType":"Observation","id":"o{index}","status":"final","code":{{}}}}"#
                    ))
                })
                .collect(),
        )
        .unwrap();
    let before_updates = PATIENTS + OBSERVATIONS;
    store
        .commit(
            (0..UPDATED_PATIENTS)
                .map(|index| {
                    update(&format!(
                        r#"{{"resourceType":"Patient","id":"p{index}","active":true}}"#
                    ))
                })
                .collect(),
        )
        .unwrap();
    let high_water = before_updates + UPDATED_PATIENTS;
    assert_eq!(store.high_water_seq().unwrap(), high_water);
    let window = |after_seq, through_seq| SeqWindow {
        after_seq,
        through_seq,
    };
    let newest = |resource_type, scanned: SeqWindow, snapshot_seq| {
        let mut seen = Vec::new();
        store
            .scan_newest_in_window(resource_type, scanned, snapshot_seq, |event| {
                seen.push((event.seq, event.id.to_owned(), event.version));
                ScanControl::Continue
            })
            .unwrap();
        seen
    };

    let patients_now = newest(ResourceType::PATIENT, window(0, high_water), high_water);
    assert_eq!(patients_now.len() as u64, PATIENTS);
    assert!(patients_now.windows(2).all(|pair| pair[0].0 < pair[1].0));
    assert_eq!(
        patients_now[0],
        (UPDATED_PATIENTS + 1, format!("p{UPDATED_PATIENTS}"), 1)
    );
    assert_eq!(
        patients_now.last().unwrap(),
        &(high_water, format!("p{}", UPDATED_PATIENTS - 1), 2)
    );

    let patients_before_updates = newest(
        ResourceType::PATIENT,
        window(0, before_updates),
        before_updates,
    );
    assert_eq!(patients_before_updates.len() as u64, PATIENTS);
    assert_eq!(patients_before_updates[0], (1, "p0".to_owned(), 1));

    let across_first_boundary = newest(ResourceType::PATIENT, window(16_000, 17_000), high_water);
    assert_eq!(
        across_first_boundary
            .iter()
            .map(|event| event.0)
            .collect::<Vec<_>>(),
        (16_001..=17_000).collect::<Vec<_>>()
    );
    let across_second_boundary = newest(observation, window(30_000, 34_000), high_water);
    assert_eq!(across_second_boundary.len(), 4_000);
    assert_eq!(across_second_boundary[0].0, 30_001);

    assert_eq!(
        store
            .type_seq_bounds(ResourceType::PATIENT, window(0, high_water))
            .unwrap(),
        Some((1, high_water))
    );
    assert_eq!(
        store
            .type_seq_bounds(observation, window(0, high_water))
            .unwrap(),
        Some((PATIENTS + 1, before_updates))
    );
    assert_eq!(
        store
            .type_seq_bounds(ResourceType::PATIENT, window(PATIENTS, before_updates))
            .unwrap(),
        None
    );
    for seq in [16_384, 16_385, 32_767, 32_768] {
        assert_eq!(
            store
                .with_event(observation, seq, |event| event.seq)
                .unwrap(),
            (seq > PATIENTS).then_some(seq),
            "event {seq}"
        );
    }

    let incremental = store.dump_projections().unwrap();
    assert_eq!(store.rebuild_projections().unwrap().events, high_water);
    assert_eq!(store.dump_projections().unwrap(), incremental);

    drop(store);
    let reopened = Store::open(directory.path(), &StoreOptions::default()).unwrap();
    let outcome = reopened
        .commit(vec![update(r#"{"resourceType":"Patient","id":"late"}"#)])
        .unwrap();
    assert!(
        matches!(&outcome[0], WriteOutcome::Created { version } if version.seq == high_water + 1)
    );
}

#[test]
fn a_store_of_another_layout_is_refused_at_open() {
    let directory = tempfile::tempdir().unwrap();
    let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
    store
        .commit(vec![update(r#"{"resourceType":"Patient","id":"p1"}"#)])
        .unwrap();
    drop(store);
    let refused = reopen_after(directory.path(), |meta| {
        meta.insert(STORE_LAYOUT_KEY, 1u32.to_be_bytes()).unwrap()
    });
    assert!(refused.is_err_and(|error| error.to_string().contains("holds a store in layout 1")));

    let store = reopen_after(directory.path(), |meta| {
        meta.remove(STORE_LAYOUT_KEY).unwrap()
    });
    assert!(store.is_err_and(|error| error.to_string().contains("an unversioned layout")));

    let store = reopen_after(directory.path(), |meta| {
        meta.insert(STORE_LAYOUT_KEY, STORE_LAYOUT_VERSION.to_be_bytes())
            .unwrap()
    })
    .unwrap();
    assert!(
        store
            .read_current(ResourceType::PATIENT, &id("p1"))
            .unwrap()
            .is_some()
    );
}

/// Opens the raw database in `directory`, lets `change` edit the `meta` keyspace, and opens
/// the store again.
fn reopen_after(
    directory: &std::path::Path,
    change: impl FnOnce(&fjall::Keyspace),
) -> Result<Store, StoreError> {
    {
        let database = fjall::Database::builder(directory.join("store"))
            .open()
            .unwrap();
        let meta = database
            .keyspace("meta", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        change(&meta);
        database.persist(fjall::PersistMode::SyncAll).unwrap();
    }
    Store::open(directory, &StoreOptions::default())
}

/// A store holding, in two types, Patient p1 at versions 1-3 and Observation o1 at 1-2;
/// the newest event is of whichever of the two types sorts first in `events` keys, so the
/// newest seq is not the last key of its bucket.
fn store_whose_newest_event_is_not_the_last_key(directory: &std::path::Path) -> Store {
    let store = Store::open(directory, &StoreOptions::default()).unwrap();
    let observation = |version: u32| {
        update(&format!(
            r#"{{"resourceType":"Observation","id":"o1","status":"final","code":{{"text":"v{version}"}},"subject":{{"reference":"Patient/p1"}}}}"#
        ))
    };
    let patient = |version: u32| {
        update(&format!(
            r#"{{"resourceType":"Patient","id":"p1","name":[{{"family":"v{version}"}}]}}"#
        ))
    };
    let observation_sorts_first =
        ResourceType::parse("Observation").unwrap().code() < ResourceType::PATIENT.code();
    store.commit(vec![patient(1), observation(1)]).unwrap();
    store.commit(vec![patient(2), observation(2)]).unwrap();
    if observation_sorts_first {
        store.commit(vec![patient(3)]).unwrap();
        store.commit(vec![observation(3)]).unwrap();
    } else {
        store.commit(vec![observation(3)]).unwrap();
        store.commit(vec![patient(3)]).unwrap();
    }
    store
}

/// Every stored version of p1 and o1, by type, id and version.
fn every_version(store: &Store) -> Vec<StoredVersion> {
    let mut versions = store.history(ResourceType::PATIENT, &id("p1")).unwrap();
    versions.extend(
        store
            .history(ResourceType::parse("Observation").unwrap(), &id("o1"))
            .unwrap(),
    );
    versions
}

/// Empties `history` and `compartment`, drops `log`'s entries and adds one that names no
/// type, and writes a `current` entry that does not decode.
fn damage_projections(store: &Store) {
    let keyspaces = store.keyspaces();
    keyspaces.history.clear().unwrap();
    keyspaces.compartment.clear().unwrap();
    keyspaces.log.clear().unwrap();
    keyspaces
        .log
        .insert(keys::seq(u64::MAX >> 20), b"?")
        .unwrap();
    keyspaces
        .current
        .insert(keys::type_id(ResourceType::PATIENT, "p1"), b"not an entry")
        .unwrap();
    keyspaces
        .superseded
        .insert(keys::type_seq(ResourceType::PATIENT, 99), keys::seq(100))
        .unwrap();
    keyspaces
        .database
        .persist(fjall::PersistMode::SyncAll)
        .unwrap();
}

#[test]
fn recovery_numbers_after_the_newest_event_whatever_the_log_holds() {
    let directory = tempfile::tempdir().unwrap();
    let store = store_whose_newest_event_is_not_the_last_key(directory.path());
    let before = every_version(&store);
    let newest_seq = store.high_water_seq().unwrap();
    assert_eq!(newest_seq, 6);
    store.keyspaces().log.clear().unwrap();
    store
        .keyspaces()
        .database
        .persist(fjall::PersistMode::SyncAll)
        .unwrap();
    drop(store);

    let reopened = Store::open(directory.path(), &StoreOptions::default()).unwrap();
    let outcome = reopened
        .commit(vec![update(r#"{"resourceType":"Patient","id":"p9"}"#)])
        .unwrap();
    assert!(
        matches!(&outcome[0], WriteOutcome::Created { version } if version.seq == newest_seq + 1),
        "{outcome:?}"
    );
    assert_eq!(every_version(&reopened), before);
}

#[test]
fn rebuild_opens_and_repairs_damaged_and_emptied_projections() {
    let directory = tempfile::tempdir().unwrap();
    let store = store_whose_newest_event_is_not_the_last_key(directory.path());
    let before_damage = store.dump_projections().unwrap();
    let versions = every_version(&store);
    damage_projections(&store);
    drop(store);

    let store = Store::open_for_rebuild(directory.path(), &StoreOptions::default()).unwrap();
    assert_eq!(store.rebuild_projections().unwrap().events, 6);
    assert_eq!(store.dump_projections().unwrap(), before_damage);
    assert_eq!(every_version(&store), versions);
    drop(store);
    let reopened = Store::open(directory.path(), &StoreOptions::default()).unwrap();
    assert_eq!(reopened.dump_projections().unwrap(), before_damage);
}

#[test]
fn open_refuses_a_store_whose_rebuild_was_interrupted_until_a_rebuild_finishes() {
    let directory = tempfile::tempdir().unwrap();
    let store = store_whose_newest_event_is_not_the_last_key(directory.path());
    let before = store.dump_projections().unwrap();
    let keyspaces = store.keyspaces();
    keyspaces.meta.insert(REBUILD_IN_PROGRESS_KEY, []).unwrap();
    keyspaces.current.clear().unwrap();
    keyspaces.log.clear().unwrap();
    keyspaces
        .database
        .persist(fjall::PersistMode::SyncAll)
        .unwrap();
    drop(keyspaces);
    drop(store);

    let refused = Store::open(directory.path(), &StoreOptions::default());
    let message = match refused {
        Err(error @ StoreError::RebuildInterrupted { .. }) => error.to_string(),
        Err(other) => panic!("refused for another reason: {other}"),
        Ok(_) => panic!("a half-rebuilt store was opened for serving"),
    };
    assert!(message.contains("fhirlog rebuild --data-dir"), "{message}");
    assert_eq!(message.lines().count(), 1);

    let store = Store::open_for_rebuild(directory.path(), &StoreOptions::default()).unwrap();
    store.rebuild_projections().unwrap();
    drop(store);
    let reopened = Store::open(directory.path(), &StoreOptions::default()).unwrap();
    assert_eq!(reopened.dump_projections().unwrap(), before);
}

/// Bytes of journal the next open would replay: what precedes the zero padding of
/// fjall's preallocated journal files.
fn journal_content_bytes(data_dir: &std::path::Path) -> usize {
    std::fs::read_dir(data_dir.join("store"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|extension| extension == "jnl"))
        .map(|path| {
            let bytes = std::fs::read(path).unwrap();
            bytes.len() - bytes.iter().rev().take_while(|byte| **byte == 0).count()
        })
        .sum()
}

#[test]
fn flushing_memtables_retires_the_journal_the_next_open_would_replay() {
    let directory = tempfile::tempdir().unwrap();
    let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut incompressible_text = || {
        (0..64 << 10)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                char::from(b'a' + (state % 26) as u8)
            })
            .collect::<String>()
    };
    let padding = incompressible_text();
    for batch in 0..8 {
        let writes = (0..8)
            .map(|index| {
                let text = if (batch, index) == (7, 7) {
                    padding.clone()
                } else {
                    incompressible_text()
                };
                update(&format!(
                    r#"{{"resourceType":"Patient","id":"p{batch}-{index}","text":{{"div":"{text}"}}}}"#
                ))
            })
            .collect();
        store.commit(writes).unwrap();
    }
    store.flush_memtables().unwrap();
    drop(store);
    let journal_bytes = journal_content_bytes(directory.path());
    assert!(
        journal_bytes < 1 << 20,
        "{journal_bytes} bytes of journal left for the next open to replay after writing 4 MiB"
    );
    let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
    let patient = store
        .read_current(ResourceType::PATIENT, &id("p7-7"))
        .unwrap()
        .unwrap();
    assert!(patient.body.unwrap().contains(&padding));
}

/// The journal batch of `store`'s next commit, as a failed write: the key of its first
/// event (`seq`) at or after fjall's next batch seqno.
fn next_commit_as_failed_write(
    store: &Store,
    resource_type: ResourceType,
    seq: u64,
) -> FailedWrite {
    let keyspaces = store.keyspaces();
    FailedWrite {
        keyspace_id: keyspaces.events.id(),
        key: keys::event(resource_type, seq).to_vec(),
        min_batch_seqno: keyspaces.database.seqno(),
    }
}

#[test]
fn a_write_cut_from_the_journal_does_not_come_back_but_earlier_ones_do() {
    let directory = tempfile::tempdir().unwrap();
    let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
    store
        .commit(vec![update(r#"{"resourceType":"Patient","id":"kept"}"#)])
        .unwrap();
    store.job_put("job/a", b"first").unwrap();
    let failed_job = FailedWrite {
        keyspace_id: store.keyspaces().jobs.id(),
        key: b"job/a".to_vec(),
        min_batch_seqno: store.keyspaces().database.seqno(),
    };
    store.job_put("job/a", b"second").unwrap();
    let failed_event = next_commit_as_failed_write(&store, ResourceType::PATIENT, 2);
    store
        .commit(vec![update(r#"{"resourceType":"Patient","id":"cut"}"#)])
        .unwrap();
    drop(store);

    let store_dir = directory.path().join("store");
    let unrelated = FailedWrite {
        min_batch_seqno: u64::MAX,
        ..failed_event.clone()
    };
    assert_eq!(
        journal_cut::cut_failed_writes(&store_dir, &[unrelated]).unwrap(),
        None
    );
    let cut = journal_cut::cut_failed_writes(&store_dir, &[failed_event, failed_job])
        .unwrap()
        .expect("the failed batches were found");
    assert!(cut.length > 0);

    let reopened = Store::open(directory.path(), &StoreOptions::default()).unwrap();
    assert!(
        reopened
            .read_current(ResourceType::PATIENT, &id("kept"))
            .unwrap()
            .is_some()
    );
    assert!(
        reopened
            .read_current(ResourceType::PATIENT, &id("cut"))
            .unwrap()
            .is_none()
    );
    assert_eq!(
        reopened.job_get("job/a").unwrap().as_deref(),
        Some(&b"first"[..])
    );
    assert_eq!(reopened.high_water_seq().unwrap(), 1);
}

#[test]
fn after_a_failed_write_the_store_refuses_writes_then_reopens_itself_while_reads_and_a_scan_go_on()
{
    let directory = tempfile::tempdir().unwrap();
    let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
    let patients: Vec<WriteOperation> = (0..200)
        .map(|n| update(&format!(r#"{{"resourceType":"Patient","id":"p{n}"}}"#)))
        .collect();
    store.commit(patients).unwrap();

    let scanning_store = store.clone();
    let scan = std::thread::spawn(move || {
        let mut seqs = Vec::new();
        scanning_store
            .scan_newest_in_window(
                ResourceType::PATIENT,
                SeqWindow {
                    after_seq: 0,
                    through_seq: 200,
                },
                200,
                |event| {
                    seqs.push(event.seq);
                    std::thread::sleep(std::time::Duration::from_millis(10));
                    ScanControl::Continue
                },
            )
            .unwrap();
        seqs
    });
    let reading = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (store, reading) = (store.clone(), Arc::clone(&reading));
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while reading.load(std::sync::atomic::Ordering::SeqCst) {
                    let found = store
                        .read_current(ResourceType::PATIENT, &id("p7"))
                        .unwrap();
                    assert!(found.is_some());
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    std::thread::sleep(std::time::Duration::from_millis(100));
    let refused =
        store
            .shared
            .slot
            .health
            .note_failure(directory.path(), fjall::Error::Poisoned, None);
    assert!(matches!(refused, StoreError::Recovering), "{refused}");
    assert!(matches!(
        store.job_put("job/b", b"refused"),
        Err(StoreError::Recovering)
    ));
    let write = || store.commit(vec![update(r#"{"resourceType":"Patient","id":"after"}"#)]);
    assert!(matches!(write(), Err(StoreError::Recovering)));

    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match write() {
            Ok(_) => break,
            Err(StoreError::Recovering) => {
                assert!(std::time::Instant::now() < deadline, "never reopened");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(other) => panic!("refused for another reason: {other}"),
        }
    }
    assert!(
        !scan.is_finished(),
        "the store was reopened only after the scan"
    );
    reading.store(false, std::sync::atomic::Ordering::SeqCst);
    for reader in readers {
        assert!(reader.join().unwrap() > 0);
    }
    assert_eq!(scan.join().unwrap(), (1..=200).collect::<Vec<u64>>());
    assert!(
        store
            .read_current(ResourceType::PATIENT, &id("after"))
            .unwrap()
            .is_some()
    );
}

#[test]
fn journals_count_as_closed_only_once_the_database_is() {
    let directory = tempfile::tempdir().unwrap();
    let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
    let store_dir = directory.path().join("store");
    let still_open =
        journal_cut::wait_until_journals_closed(&store_dir, std::time::Duration::from_millis(50));
    assert!(still_open.is_err_and(|reason| reason.contains(".jnl")));
    drop(store);
    journal_cut::wait_until_journals_closed(&store_dir, std::time::Duration::from_millis(50))
        .unwrap();
}

#[test]
fn a_write_buffer_budget_below_one_memtable_still_lets_every_commit_through() {
    let directory = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        events_memtable_bytes: 16 << 10,
        index_memtable_bytes: 4 << 10,
        max_write_buffer_bytes: 1,
        ..StoreOptions::default()
    };
    let store = Store::open(directory.path(), &options).unwrap();
    let writer = store.clone();
    let (done_sender, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for commit in 0..40 {
            let operations = (0..10)
                .map(|index| {
                    update(&format!(
                        r#"{{"resourceType":"Patient","id":"p{commit}-{index}","active":true}}"#
                    ))
                })
                .collect();
            writer.commit(operations).unwrap();
        }
        done_sender.send(()).unwrap();
    });
    done.recv_timeout(std::time::Duration::from_secs(60))
        .expect("the commits finished instead of waiting for a flush nobody asked for");
    assert_eq!(store.high_water_seq().unwrap(), 400);
    assert!(
        store
            .read_current(ResourceType::PATIENT, &id("p39-9"))
            .unwrap()
            .is_some()
    );
}

#[test]
fn reads_of_a_resource_updated_meanwhile_see_every_version_below_the_newest() {
    let directory = tempfile::tempdir().unwrap();
    let store = Store::open(directory.path(), &StoreOptions::default()).unwrap();
    let patient_id = id("contended");
    let update_count = 1_000;
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || {
            for update_number in 0..update_count {
                store
                    .commit(vec![update(&format!(
                        r#"{{"resourceType":"Patient","id":"contended","birthDate":"{}"}}"#,
                        1000 + update_number
                    ))])
                    .unwrap();
            }
        })
    };
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let store = store.clone();
            let patient_id = patient_id.clone();
            std::thread::spawn(move || {
                let mut newest = 0;
                while newest < update_count {
                    let versions = store
                        .version_seqs(ResourceType::PATIENT, patient_id.as_str())
                        .unwrap();
                    let numbers: Vec<u64> = versions.iter().map(|(version, _)| *version).collect();
                    newest = numbers.first().copied().unwrap_or(0);
                    assert_eq!(numbers, (1..=newest).rev().collect::<Vec<u64>>());
                    if newest > 1 {
                        let below_newest = store
                            .read_version(ResourceType::PATIENT, &patient_id, newest - 1)
                            .unwrap();
                        assert!(below_newest.is_some(), "version {} is missing", newest - 1);
                    }
                }
            })
        })
        .collect();
    writer.join().unwrap();
    for reader in readers {
        reader.join().unwrap();
    }
}

/// Options under which a few thousand small writes seal dozens of index memtables.
fn options_with_tiny_index_memtables() -> StoreOptions {
    StoreOptions {
        events_memtable_bytes: 64 << 10,
        index_memtable_bytes: 4 << 10,
        ..StoreOptions::default()
    }
}

fn commit_patients(store: &Store, commit_number: usize, patients_per_commit: usize) {
    let operations = (0..patients_per_commit)
        .map(|index| {
            update(&format!(
                r#"{{"resourceType":"Patient","id":"p{commit_number}-{index}","active":true}}"#
            ))
        })
        .collect();
    store.commit(operations).unwrap();
}

/// Waits until the store's compaction thread has brought level 0 of `current` below the
/// compaction threshold with tables below it, or panics after a minute.
fn wait_until_current_is_compacted(store: &Store) {
    let keyspaces = store.keyspaces();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let level_zero = keyspaces.current.l0_table_count();
        let below_level_zero = keyspaces.current.table_count() - level_zero;
        if level_zero < usize::from(RANDOM_KEYED_L0_THRESHOLD) && below_level_zero > 0 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "`current` was not compacted: {level_zero} level-0 tables, {below_level_zero} below"
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

#[test]
fn the_store_compacts_its_id_keyed_indexes_on_its_own_thread() {
    let directory = tempfile::tempdir().unwrap();
    let store = Store::open(directory.path(), &options_with_tiny_index_memtables()).unwrap();
    let writer = store.clone();
    let (done_sender, done) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for commit_number in 0..120 {
            commit_patients(&writer, commit_number, 25);
        }
        writer.flush_memtables().unwrap();
        done_sender.send(()).unwrap();
    });
    done.recv_timeout(std::time::Duration::from_secs(120))
        .expect("the writes finished rather than halting for level-0 tables nobody compacts");
    wait_until_current_is_compacted(&store);
    for commit_number in [0, 59, 119] {
        let patient_id = id(&format!("p{commit_number}-24"));
        let read = store
            .read_current(ResourceType::PATIENT, &patient_id)
            .unwrap();
        assert_eq!(read.map(|version| version.version), Some(1));
    }
}

#[test]
fn a_snapshot_keeps_seeing_what_it_saw_while_the_store_compacts_newer_versions_over_it() {
    let directory = tempfile::tempdir().unwrap();
    let store = Store::open(directory.path(), &options_with_tiny_index_memtables()).unwrap();
    let keyspaces = store.keyspaces();
    let watched = r#"{"resourceType":"Patient","id":"watched","birthDate":"1000"}"#;
    store.commit(vec![update(watched)]).unwrap();
    let snapshot = keyspaces.snapshot();
    let seen_first = keyspaces
        .current_entry(&snapshot, ResourceType::PATIENT, "watched")
        .unwrap()
        .expect("the snapshot sees the first version");
    for commit_number in 0..120 {
        store
            .commit(vec![update(&format!(
                r#"{{"resourceType":"Patient","id":"watched","birthDate":"{}"}}"#,
                1001 + commit_number
            ))])
            .unwrap();
        commit_patients(&store, commit_number, 25);
    }
    store.flush_memtables().unwrap();
    wait_until_current_is_compacted(&store);
    let seen_after = keyspaces
        .current_entry(&snapshot, ResourceType::PATIENT, "watched")
        .unwrap();
    assert_eq!(
        seen_after.map(|entry| entry.version),
        Some(seen_first.version)
    );
    drop(snapshot);
    let newest = store
        .read_current(ResourceType::PATIENT, &id("watched"))
        .unwrap()
        .expect("the resource exists");
    assert_eq!(newest.version, 121);
}
