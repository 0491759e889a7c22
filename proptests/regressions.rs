//! Shrunk failures of the property tests, and bugs found while writing them, each kept as
//! a named test with a one-line post-mortem. None of the store property so far: 2,500
//! cases of `store_agrees_with_the_model_across_restarts_and_rebuilds` passed when it was
//! written.

use fhirlog::fhir::ResourceType;

use crate::export_model::{ExportContent, ExportTarget, ExportTargetKind, ORGANIZATION_IDS};
use crate::export_properties::{
    EngineChoice, ExportChoice, ExportScenarioRun, HistoryOperation, InstantChoice, LevelChoice,
};

/// More seqs than one work unit spans (`UNIT_SEQ_SPAN` in `src/export/plan.rs`).
const SEQS_BEYOND_ONE_WORK_UNIT: usize = 100_000;

fn patient_target(id: &'static str) -> ExportTarget {
    ExportTarget {
        kind: ExportTargetKind::Patient,
        id,
    }
}

/// Post-mortem: `run_unit` skips versions superseded by the *unit's* last seq, not the
/// snapshot's, so a version superseded in a later unit of its type is exported as well.
#[test]
fn a_resource_updated_more_than_a_work_unit_span_later_is_exported_once() {
    let mut run = ExportScenarioRun::new(EngineChoice {
        workers: 2,
        max_resources_per_file: 3,
    });
    let patient_versions = |active| {
        ["p1", "p2"].map(|id| HistoryOperation::Put {
            target: patient_target(id),
            content: ExportContent::Patient {
                active,
                gender: None,
                linked_patient: None,
            },
        })
    };
    run.commit(&patient_versions(true), "the first patient versions");
    let organization_filler: Vec<HistoryOperation> = (0..SEQS_BEYOND_ONE_WORK_UNIT)
        .map(|_| HistoryOperation::Put {
            target: ExportTarget {
                kind: ExportTargetKind::Organization,
                id: ORGANIZATION_IDS[0],
            },
            content: ExportContent::Organization {
                name: "Acme Health",
            },
        })
        .collect();
    run.commit(&organization_filler, "the filler versions");
    run.commit(&patient_versions(false), "the second patient versions");
    run.commit(
        &[HistoryOperation::Delete {
            target: patient_target("p2"),
        }],
        "the delete of Patient/p2",
    );
    run.run_export_choice(
        &ExportChoice {
            level: LevelChoice::System,
            types: Some(vec![ResourceType::PATIENT]),
            since: Some(InstantChoice::JustBeforeTheFirstCommit),
            until: None,
            patients: None,
            interruption: None,
        },
        "a system export of Patients since before the first commit",
    );
}
