//! Random operation sequences, with restarts and rebuilds, run against the store and the
//! model.

use fhirlog::fhir::{ResourceId, ResourceType};
use fhirlog::store::{Store, StoreOptions, UnchangedContent, WriteOperation};
use proptest::prelude::*;
use proptest::sample::select;

use crate::store_harness::{StoreStep, run_store_scenario, scenario_directory};
use crate::store_model::{
    BodyChoice, IfMatch, PATIENT_IDS, RequestOperation, ResourceContent, ResourceTarget,
    SubjectReference, TargetKind, Transmission, every_resource_target, prepare_resource_from_text,
};

const STORE_SCENARIO_CASES: u32 = 64;
const MAX_STEPS_PER_SCENARIO: usize = 40;

fn subject_reference_strategy() -> impl Strategy<Value = SubjectReference> {
    let patient_id = || select(PATIENT_IDS.to_vec());
    prop_oneof![
        8 => patient_id().prop_map(SubjectReference::Patient),
        1 => (patient_id(), 1u8..4)
            .prop_map(|(patient_id, version)| SubjectReference::PatientVersion(patient_id, version)),
        1 => patient_id().prop_map(SubjectReference::PatientIdWithNul),
        1 => Just(SubjectReference::Group),
    ]
}

fn resource_content_strategy(kind: TargetKind) -> BoxedStrategy<ResourceContent> {
    match kind {
        TargetKind::Patient => (
            select(vec!["true", "false"]),
            proptest::option::of(select(vec![r#""male""#, r#""female""#])),
            proptest::option::weighted(0.3, Just(r#"[{"family":"Chalmers"}]"#)),
            proptest::bool::weighted(0.2),
        )
            .prop_map(|(active, gender, name, has_client_profile)| {
                let mut scalar_fields = vec![("active", active)];
                scalar_fields.extend(gender.map(|gender| ("gender", gender)));
                scalar_fields.extend(name.map(|name| ("name", name)));
                ResourceContent {
                    scalar_fields,
                    subject: None,
                    has_client_profile,
                }
            })
            .boxed(),
        TargetKind::Observation => (
            select(vec![r#""final""#, r#""amended""#]),
            proptest::option::weighted(0.85, subject_reference_strategy()),
            proptest::option::of(select(vec![
                r#"{"value":1.50,"unit":"kg"}"#,
                r#"{"value":72}"#,
            ])),
            proptest::bool::weighted(0.2),
        )
            .prop_map(|(status, subject, value_quantity, has_client_profile)| {
                let mut scalar_fields = vec![("status", status), ("code", r#"{"text":"weight"}"#)];
                scalar_fields.extend(value_quantity.map(|value| ("valueQuantity", value)));
                ResourceContent {
                    scalar_fields,
                    subject,
                    has_client_profile,
                }
            })
            .boxed(),
        TargetKind::Encounter => (
            select(vec![r#""planned""#, r#""finished""#]),
            proptest::option::weighted(0.85, subject_reference_strategy()),
            proptest::bool::weighted(0.2),
        )
            .prop_map(|(status, subject, has_client_profile)| ResourceContent {
                scalar_fields: vec![("status", status), ("class", r#"{"code":"AMB"}"#)],
                subject,
                has_client_profile,
            })
            .boxed(),
    }
}

fn transmission_strategy() -> impl Strategy<Value = Transmission> {
    (proptest::bool::weighted(0.3), any::<u64>()).prop_map(
        |(sends_server_metadata, key_order_seed)| Transmission {
            sends_server_metadata,
            key_order_seed,
        },
    )
}

fn if_match_strategy() -> impl Strategy<Value = IfMatch> {
    prop_oneof![
        6 => Just(IfMatch::Absent),
        3 => Just(IfMatch::CurrentVersion),
        1 => (1u64..5).prop_map(IfMatch::Version),
    ]
}

fn unchanged_content_strategy() -> impl Strategy<Value = UnchangedContent> {
    prop_oneof![
        Just(UnchangedContent::NewVersion),
        Just(UnchangedContent::Skip)
    ]
}

fn request_operation_strategy() -> impl Strategy<Value = RequestOperation> {
    select(every_resource_target()).prop_flat_map(|target: ResourceTarget| {
        let body_choice = prop_oneof![
            3 => resource_content_strategy(target.kind).prop_map(BodyChoice::Fresh),
            1 => Just(BodyChoice::RepeatCurrent),
        ];
        prop_oneof![
            6 => (
                body_choice,
                transmission_strategy(),
                if_match_strategy(),
                unchanged_content_strategy(),
            )
                .prop_map(move |(body, transmission, if_match, unchanged)| {
                    RequestOperation::Update {
                        target,
                        body,
                        transmission,
                        if_match,
                        unchanged,
                    }
                }),
            1 => (resource_content_strategy(target.kind), transmission_strategy()).prop_map(
                move |(content, transmission)| RequestOperation::Create {
                    target,
                    content,
                    transmission,
                }
            ),
            2 => if_match_strategy()
                .prop_map(move |if_match| RequestOperation::Delete { target, if_match }),
        ]
    })
}

fn store_step_strategy() -> impl Strategy<Value = StoreStep> {
    prop_oneof![
        10 => proptest::collection::vec(request_operation_strategy(), 1..=1)
            .prop_map(StoreStep::Commit),
        4 => proptest::collection::vec(request_operation_strategy(), 2..=4)
            .prop_map(StoreStep::Commit),
        2 => proptest::collection::vec(
            proptest::collection::vec(request_operation_strategy(), 1..=3),
            2..=4
        )
        .prop_map(StoreStep::SubmitTogether),
        2 => Just(StoreStep::Restart),
        1 => Just(StoreStep::Rebuild),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: STORE_SCENARIO_CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn store_agrees_with_the_model_across_restarts_and_rebuilds(
        steps in proptest::collection::vec(store_step_strategy(), 1..=MAX_STEPS_PER_SCENARIO)
    ) {
        run_store_scenario(&steps);
    }
}

const BULK_PATIENT_COUNT: usize = 6_000;
const BULK_PATIENTS_UPDATED_AGAIN: usize = 2_500;
const BULK_PATIENTS_DELETED: usize = 500;

fn bulk_patient_id(index: usize) -> String {
    format!("bulk-p{index}")
}

/// Rebuild commits a batch every 10,000 events; a store with more events than that, where
/// versions of one resource fall into different batches, must rebuild to the same bytes.
#[test]
fn rebuild_spanning_several_batches_equals_incremental_projections() {
    let directory = scenario_directory();
    let store = Store::open(directory.path(), &StoreOptions::default()).expect("opening");
    let update_from_text = |text: String| WriteOperation::Update {
        resource: prepare_resource_from_text(&text),
        expected_version: None,
        unchanged: UnchangedContent::NewVersion,
    };
    let patient_creates = (0..BULK_PATIENT_COUNT)
        .map(|index| {
            update_from_text(format!(
                r#"{{"resourceType":"Patient","id":"{}","active":true}}"#,
                bulk_patient_id(index)
            ))
        })
        .collect();
    store.commit(patient_creates).expect("committing patients");
    let observations = (0..BULK_PATIENT_COUNT).map(|index| {
        update_from_text(format!(
            r#"{{"resourceType":"Observation","id":"bulk-o{index}","status":"final","subject":{{"reference":"Patient/{}"}}}}"#,
            bulk_patient_id(index)
        ))
    });
    let patient_updates = (0..BULK_PATIENTS_UPDATED_AGAIN).map(|index| {
        update_from_text(format!(
            r#"{{"resourceType":"Patient","id":"{}","active":false}}"#,
            bulk_patient_id(index)
        ))
    });
    let patient_deletes = (BULK_PATIENTS_UPDATED_AGAIN
        ..BULK_PATIENTS_UPDATED_AGAIN + BULK_PATIENTS_DELETED)
        .map(|index| WriteOperation::Delete {
            resource_type: ResourceType::PATIENT,
            id: ResourceId::parse(&bulk_patient_id(index)).expect("valid id"),
            expected_version: Some(1),
        });
    store
        .commit(
            observations
                .chain(patient_updates)
                .chain(patient_deletes)
                .collect(),
        )
        .expect("committing observations, updates and deletes");
    let incremental_projections = store.dump_projections().expect("dumping projections");
    let summary = store.rebuild_projections().expect("rebuilding");
    assert_eq!(
        summary.events,
        (2 * BULK_PATIENT_COUNT + BULK_PATIENTS_UPDATED_AGAIN + BULK_PATIENTS_DELETED) as u64
    );
    assert_eq!(summary.commits, 2);
    assert_eq!(
        store.dump_projections().expect("dumping projections"),
        incremental_projections
    );
    drop(store);
    let reopened = Store::open(directory.path(), &StoreOptions::default()).expect("reopening");
    assert_eq!(
        reopened.dump_projections().expect("dumping projections"),
        incremental_projections
    );
    let deleted_patient_id =
        ResourceId::parse(&bulk_patient_id(BULK_PATIENTS_UPDATED_AGAIN)).expect("valid id");
    let deleted_patient_history = reopened
        .history(ResourceType::PATIENT, &deleted_patient_id)
        .expect("reading history");
    let versions_and_presence: Vec<(u64, bool)> = deleted_patient_history
        .iter()
        .map(|stored| (stored.version, stored.body.is_some()))
        .collect();
    assert_eq!(versions_and_presence, vec![(2, false), (1, true)]);
}
