//! Every object name an export uses inside its container: the job's folder, staged parts,
//! final `{Type}-{n}.ndjson` files, deletions and the error file.

use super::job::FileKind;
use crate::fhir::ResourceType;

/// The folder (object prefix) holding everything of one job.
pub fn job_folder(job_id: &str) -> &str {
    job_id
}

/// The staging object of part `part_number` (from 1) of a unit's stream; finals are named
/// only when the job completes, so numbering is deterministic whatever order units ran in.
/// Staged parts sit in the job's own folder (no subfolder), so deleting a job's objects
/// leaves no empty directories behind on a filesystem.
pub fn staged_part(job_id: &str, kind: FileKind, unit_index: usize, part_number: usize) -> String {
    let stream = match kind {
        FileKind::Output => "output",
        FileKind::Deleted => "deleted",
        FileKind::Error => "error",
    };
    format!(
        "{}/staging-{stream}-{unit_index:08}-{part_number:08}.ndjson",
        job_folder(job_id)
    )
}

/// The object behind a file a manifest lists as `file_name`.
pub fn final_object(job_id: &str, file_name: &str) -> String {
    format!("{}/{file_name}", job_folder(job_id))
}

/// The manifest name of the `number`th (from 1) output file of `resource_type`.
pub fn output_file_name(resource_type: ResourceType, number: usize) -> String {
    format!("{resource_type}-{number}.ndjson")
}

/// The manifest name of the `number`th (from 1) file of deletions.
pub fn deleted_file_name(number: usize) -> String {
    format!("deleted-{number}.ndjson")
}

/// The manifest name of the file of warnings.
pub const ERROR_FILE_NAME: &str = "error-1.ndjson";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_stay_inside_the_job_folder_and_sort_in_unit_order() {
        let first = staged_part("job", FileKind::Output, 2, 10);
        let second = staged_part("job", FileKind::Output, 10, 1);
        assert!(first.starts_with("job/") && second.starts_with("job/"));
        assert!(first < second);
        assert_eq!(
            final_object("job", &output_file_name(ResourceType::PATIENT, 3)),
            "job/Patient-3.ndjson"
        );
        assert_eq!(deleted_file_name(1), "deleted-1.ndjson");
    }
}
