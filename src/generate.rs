//! Scale-data generator behind `fhirlog gen`: clones every patient's compartment N times with
//! new ids and consistently rewritten references, and writes everything else once.
//!
//! Two streaming passes over the source ndjson: the first collects the `Type/id` of every
//! resource to clone (a Patient, or anything in some patient's compartment); the second writes,
//! for each source resource, its N copies one after another. A copy is produced from a template
//! of the minified source line with holes where ids go, so no copy is re-serialised. Memory is
//! bounded by the set of cloned ids, not by the data.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, BufWriter, Write};
use std::ops::Range;
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;
use serde_json::Value;

use crate::fhir::compartment::{LiteralReference, PatientCompartment};
use crate::fhir::{LocalBase, ResourceId, ResourceIdParseError, ResourceType, UnknownResourceType};

/// Keys the hash that derives a copy's ids; changing it changes every generated id.
const COPY_ID_KEY: &[u8; 32] = b"fhirlog/gen/copy-id/version-0001";
const READ_BUFFER_BYTES: usize = 256 * 1024;
const WRITE_BUFFER_BYTES: usize = 1024 * 1024;

/// What `fhirlog gen` asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateOptions {
    /// Searched recursively for `*.ndjson` and `*.ndjson.gz` files.
    pub source_dir: PathBuf,
    /// How many copies of each patient's compartment to write (at least 1).
    pub copies: u32,
    /// Receives one `{Type}.ndjson` per resource type; created if missing.
    pub output_dir: PathBuf,
}

/// What a run wrote; `resources_by_type` is keyed by resource type name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GenerateSummary {
    pub resources_written: u64,
    pub patients_written: u64,
    pub bytes_written: u64,
    pub resources_by_type: BTreeMap<String, u64>,
}

/// Why a run failed. Source lines are all checked before any output file is created.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error("the number of copies must be at least 1")]
    ZeroCopies,
    #[error("no .ndjson or .ndjson.gz files under {}", path.display())]
    NoSourceFiles { path: PathBuf },
    #[error("the output directory {} is the source directory", path.display())]
    OutputIsSource { path: PathBuf },
    #[error("cannot read {}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cannot write {}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{}:{line}: invalid json", path.display())]
    InvalidJson {
        path: PathBuf,
        line: u64,
        source: serde_json::Error,
    },
    #[error("{}:{line}: {problem}", path.display())]
    InvalidResource {
        path: PathBuf,
        line: u64,
        problem: ResourceProblem,
    },
}

/// Why a well-formed json line is not a resource the generator can copy.
#[derive(Debug, thiserror::Error)]
pub enum ResourceProblem {
    #[error("no resourceType string")]
    MissingResourceType,
    #[error(transparent)]
    UnknownResourceType(#[from] UnknownResourceType),
    #[error("no id string")]
    MissingId,
    #[error(transparent)]
    InvalidId(#[from] ResourceIdParseError),
}

/// Writes `options.copies` copies of every patient's compartment found under
/// `options.source_dir`, and every other resource once, to `options.output_dir`.
pub fn generate(options: &GenerateOptions) -> Result<GenerateSummary, GenerateError> {
    if options.copies == 0 {
        return Err(GenerateError::ZeroCopies);
    }
    let canonical_source_dir =
        fs::canonicalize(&options.source_dir).map_err(|source| GenerateError::Read {
            path: options.source_dir.clone(),
            source,
        })?;
    let canonical_output_dir = fs::canonicalize(&options.output_dir).ok();
    if canonical_output_dir.as_ref() == Some(&canonical_source_dir) {
        return Err(GenerateError::OutputIsSource {
            path: options.output_dir.clone(),
        });
    }
    let mut source_files = Vec::new();
    collect_source_files(
        &options.source_dir,
        canonical_output_dir.as_deref(),
        &mut source_files,
    )?;
    if source_files.is_empty() {
        return Err(GenerateError::NoSourceFiles {
            path: options.source_dir.clone(),
        });
    }
    source_files.sort();

    let cloned_resources = collect_cloned_resources(&source_files)?;

    fs::create_dir_all(&options.output_dir).map_err(|source| GenerateError::Write {
        path: options.output_dir.clone(),
        source,
    })?;
    let mut output = TypedOutput::new(&options.output_dir);
    let mut template = ResourceTemplate::default();
    let mut copies_buffer = Vec::new();
    for source_file in &source_files {
        for_each_resource(source_file, |resource| {
            let is_cloned = cloned_resources.contains(resource.resource_type, resource.id);
            let rewrites = is_cloned.then_some(&cloned_resources);
            template
                .rebuild(resource.line, rewrites)
                .map_err(|source| GenerateError::InvalidJson {
                    path: source_file.clone(),
                    line: resource.line_number,
                    source,
                })?;
            copies_buffer.clear();
            let copies_written = if is_cloned {
                for copy_number in 1..=options.copies {
                    template.write_copy(copy_number, &mut copies_buffer);
                }
                options.copies
            } else {
                template.write_copy(0, &mut copies_buffer);
                1
            };
            output.write(resource.resource_type, &copies_buffer, copies_written)
        })?;
    }
    output.finish()
}

fn collect_source_files(
    directory: &Path,
    excluded_directory: Option<&Path>,
    source_files: &mut Vec<PathBuf>,
) -> Result<(), GenerateError> {
    let read_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| GenerateError::Read { path, source }
    };
    for entry in fs::read_dir(directory).map_err(read_error(directory))? {
        let entry = entry.map_err(read_error(directory))?;
        let path = entry.path();
        let file_type = entry.file_type().map_err(read_error(&path))?;
        if file_type.is_dir() {
            let is_excluded = excluded_directory.is_some_and(|excluded| {
                fs::canonicalize(&path).is_ok_and(|canonical| canonical == excluded)
            });
            if !is_excluded {
                collect_source_files(&path, excluded_directory, source_files)?;
            }
        } else if path
            .file_name()
            .and_then(OsStr::to_str)
            .is_some_and(|name| name.ends_with(".ndjson") || name.ends_with(".ndjson.gz"))
        {
            source_files.push(path);
        }
    }
    Ok(())
}

/// Pass 1: the ids, by type, of every Patient, every resource in some patient's
/// compartment, and every other resource that references a Patient (such as
/// `Device.patient`), so no copy points at another copy's patient.
fn collect_cloned_resources(source_files: &[PathBuf]) -> Result<ClonedResources, GenerateError> {
    let compartment = PatientCompartment::r4();
    let mut cloned_resources = ClonedResources::new();
    for source_file in source_files {
        for_each_resource(source_file, |resource| {
            if resource.resource_type == ResourceType::PATIENT
                || !compartment
                    .patient_ids(
                        resource.resource_type,
                        resource.value,
                        &LocalBase::relative_only(),
                    )
                    .is_empty()
                || references_a_patient(resource.value)
            {
                cloned_resources.insert(resource.resource_type, resource.id);
            }
            Ok(())
        })?;
    }
    Ok(cloned_resources)
}

/// Whether any `reference` anywhere in `value` is a literal reference to a Patient.
fn references_a_patient(value: &Value) -> bool {
    match value {
        Value::Object(fields) => fields.iter().any(|(key, field)| match field {
            Value::String(reference) if key == "reference" => LiteralReference::parse(reference)
                .is_some_and(|literal| literal.resource_type_name == "Patient"),
            other => references_a_patient(other),
        }),
        Value::Array(items) => items.iter().any(references_a_patient),
        _ => false,
    }
}

struct ClonedResources {
    ids_by_type_code: Vec<HashSet<Box<str>>>,
}

impl ClonedResources {
    fn new() -> ClonedResources {
        ClonedResources {
            ids_by_type_code: ResourceType::all().map(|_| HashSet::new()).collect(),
        }
    }

    fn insert(&mut self, resource_type: ResourceType, id: &str) {
        self.ids_by_type_code[usize::from(resource_type.code())].insert(id.into());
    }

    fn contains(&self, resource_type: ResourceType, id: &str) -> bool {
        self.ids_by_type_code[usize::from(resource_type.code())].contains(id)
    }

    fn contains_target_of(&self, reference: &LiteralReference) -> bool {
        ResourceType::parse(reference.resource_type_name)
            .is_ok_and(|resource_type| self.contains(resource_type, reference.id))
    }
}

/// One resource of a source file, parsed and identified.
struct SourceResource<'line> {
    resource_type: ResourceType,
    id: &'line str,
    value: &'line Value,
    /// The line without surrounding whitespace.
    line: &'line [u8],
    line_number: u64,
}

/// Calls `visit` for each non-blank line of an ndjson or gzipped ndjson file, in order.
fn for_each_resource(
    path: &Path,
    mut visit: impl FnMut(SourceResource<'_>) -> Result<(), GenerateError>,
) -> Result<(), GenerateError> {
    let read_error = |source| GenerateError::Read {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(read_error)?;
    let mut reader: Box<dyn BufRead> = if path.extension() == Some(OsStr::new("gz")) {
        Box::new(BufReader::with_capacity(
            READ_BUFFER_BYTES,
            MultiGzDecoder::new(BufReader::new(file)),
        ))
    } else {
        Box::new(BufReader::with_capacity(READ_BUFFER_BYTES, file))
    };
    let mut line_bytes = Vec::new();
    let mut line_number = 0;
    loop {
        line_bytes.clear();
        if reader
            .read_until(b'\n', &mut line_bytes)
            .map_err(read_error)?
            == 0
        {
            return Ok(());
        }
        line_number += 1;
        let line = line_bytes.trim_ascii();
        if line.is_empty() {
            continue;
        }
        let value: Value =
            serde_json::from_slice(line).map_err(|source| GenerateError::InvalidJson {
                path: path.to_path_buf(),
                line: line_number,
                source,
            })?;
        let (resource_type, id) =
            identify(&value).map_err(|problem| GenerateError::InvalidResource {
                path: path.to_path_buf(),
                line: line_number,
                problem,
            })?;
        visit(SourceResource {
            resource_type,
            id,
            value: &value,
            line,
            line_number,
        })?;
    }
}

fn identify(resource: &Value) -> Result<(ResourceType, &str), ResourceProblem> {
    let type_name = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .ok_or(ResourceProblem::MissingResourceType)?;
    let resource_type = ResourceType::parse(type_name)?;
    let id = resource
        .get("id")
        .and_then(Value::as_str)
        .ok_or(ResourceProblem::MissingId)?;
    ResourceId::parse(id)?;
    Ok((resource_type, id))
}

/// A resource as minified json with holes where the ids of cloned resources go: its own id and
/// the ids in references to cloned resources.
#[derive(Debug, Default)]
struct ResourceTemplate {
    literal_bytes: Vec<u8>,
    holes: Vec<IdHole>,
    original_ids: String,
    open_containers: Vec<JsonContainer>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct IdHole {
    /// Where the hole sits in `literal_bytes`.
    literal_offset: usize,
    /// The id it replaces, in `original_ids`.
    original_id: Range<usize>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum JsonContainer {
    Object,
    Array,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PropertyRole {
    Id,
    Reference,
    Other,
}

impl ResourceTemplate {
    /// Re-scans `line`, which must be valid json. With `rewrites`, the top-level `id` and every
    /// string under a `reference` key that is a literal reference to one of `rewrites` become
    /// holes; without, the template is the minified line.
    fn rebuild(
        &mut self,
        line: &[u8],
        rewrites: Option<&ClonedResources>,
    ) -> Result<(), serde_json::Error> {
        self.literal_bytes.clear();
        self.holes.clear();
        self.original_ids.clear();
        self.open_containers.clear();
        let mut expecting_key = false;
        let mut property_role = PropertyRole::Other;
        let mut index = 0;
        while index < line.len() {
            let byte = line[index];
            let innermost_container = self.open_containers.last().copied();
            match byte {
                b' ' | b'\t' | b'\n' | b'\r' => {
                    index += 1;
                    continue;
                }
                b'"' => {
                    let token_end = string_token_end(line, index);
                    let token = &line[index..token_end];
                    let in_object = innermost_container == Some(JsonContainer::Object);
                    if in_object && expecting_key {
                        property_role = match decode_string_token(token)?.as_ref() {
                            "id" => PropertyRole::Id,
                            "reference" => PropertyRole::Reference,
                            _ => PropertyRole::Other,
                        };
                        self.literal_bytes.extend_from_slice(token);
                    } else {
                        match (rewrites, in_object, property_role) {
                            (Some(_), true, PropertyRole::Id)
                                if self.open_containers.len() == 1 =>
                            {
                                let own_id = decode_string_token(token)?;
                                self.literal_bytes.push(b'"');
                                self.push_hole(&own_id);
                                self.literal_bytes.push(b'"');
                            }
                            (Some(cloned_resources), true, PropertyRole::Reference) => {
                                self.push_reference(token, cloned_resources)?;
                            }
                            _ => self.literal_bytes.extend_from_slice(token),
                        }
                    }
                    index = token_end;
                    continue;
                }
                b'{' => {
                    self.open_containers.push(JsonContainer::Object);
                    expecting_key = true;
                }
                b'[' => self.open_containers.push(JsonContainer::Array),
                b'}' | b']' => {
                    self.open_containers.pop();
                }
                b':' => expecting_key = false,
                b',' => expecting_key = innermost_container == Some(JsonContainer::Object),
                _ => {}
            }
            self.literal_bytes.push(byte);
            index += 1;
        }
        Ok(())
    }

    fn push_reference(
        &mut self,
        token: &[u8],
        cloned_resources: &ClonedResources,
    ) -> Result<(), serde_json::Error> {
        let reference = decode_string_token(token)?;
        let Some(literal_reference) = LiteralReference::parse(&reference)
            .filter(|parsed| cloned_resources.contains_target_of(parsed))
        else {
            self.literal_bytes.extend_from_slice(token);
            return Ok(());
        };
        let id_range =
            literal_reference.id_offset..literal_reference.id_offset + literal_reference.id.len();
        match reference {
            Cow::Borrowed(_) => {
                self.literal_bytes
                    .extend_from_slice(&token[..1 + id_range.start]);
                self.push_hole(literal_reference.id);
                self.literal_bytes
                    .extend_from_slice(&token[1 + id_range.end..]);
            }
            Cow::Owned(ref decoded) => {
                self.literal_bytes.push(b'"');
                self.push_escaped(&decoded[..id_range.start])?;
                self.push_hole(literal_reference.id);
                self.push_escaped(&decoded[id_range.end..])?;
                self.literal_bytes.push(b'"');
            }
        }
        Ok(())
    }

    fn push_hole(&mut self, original_id: &str) {
        let start = self.original_ids.len();
        self.original_ids.push_str(original_id);
        self.holes.push(IdHole {
            literal_offset: self.literal_bytes.len(),
            original_id: start..self.original_ids.len(),
        });
    }

    /// Appends `text` json-escaped, without quotes.
    fn push_escaped(&mut self, text: &str) -> Result<(), serde_json::Error> {
        let quoted = serde_json::to_string(text)?;
        self.literal_bytes
            .extend_from_slice(&quoted.as_bytes()[1..quoted.len() - 1]);
        Ok(())
    }

    /// Appends copy `copy_number` of the resource and a newline. A template built without
    /// rewrites has no holes: every copy number gives the minified source line.
    fn write_copy(&self, copy_number: u32, output: &mut Vec<u8>) {
        let mut literal_start = 0;
        for hole in &self.holes {
            output.extend_from_slice(&self.literal_bytes[literal_start..hole.literal_offset]);
            output.extend_from_slice(&copy_id(
                copy_number,
                &self.original_ids[hole.original_id.clone()],
            ));
            literal_start = hole.literal_offset;
        }
        output.extend_from_slice(&self.literal_bytes[literal_start..]);
        output.push(b'\n');
    }
}

/// The end (exclusive) of the json string token that opens at `start`.
fn string_token_end(line: &[u8], start: usize) -> usize {
    let mut index = start + 1;
    while index < line.len() {
        match line[index] {
            b'\\' => index += 2,
            b'"' => return index + 1,
            _ => index += 1,
        }
    }
    line.len()
}

/// The text of a json string token (quotes included in `token`).
fn decode_string_token(token: &[u8]) -> Result<Cow<'_, str>, serde_json::Error> {
    let content = token
        .get(1..token.len().saturating_sub(1))
        .unwrap_or_default();
    if !content.contains(&b'\\')
        && let Ok(text) = std::str::from_utf8(content)
    {
        return Ok(Cow::Borrowed(text));
    }
    serde_json::from_slice::<String>(token).map(Cow::Owned)
}

/// The id of copy `copy_number` of a resource: a UUID (version 8) made from a keyed blake3 hash
/// of the copy number and the original id, so copies never collide and reruns agree.
fn copy_id(copy_number: u32, original_id: &str) -> [u8; uuid::fmt::Hyphenated::LENGTH] {
    let mut hasher = blake3::Hasher::new_keyed(COPY_ID_KEY);
    hasher.update(&copy_number.to_le_bytes());
    hasher.update(original_id.as_bytes());
    let mut uuid_bytes = [0_u8; 16];
    uuid_bytes.copy_from_slice(&hasher.finalize().as_bytes()[..16]);
    let mut hyphenated = [0_u8; uuid::fmt::Hyphenated::LENGTH];
    uuid::Builder::from_custom_bytes(uuid_bytes)
        .into_uuid()
        .hyphenated()
        .encode_lower(&mut hyphenated);
    hyphenated
}

/// One `{Type}.ndjson` per resource type, opened on first use, with running counts.
struct TypedOutput<'directory> {
    output_dir: &'directory Path,
    writers_by_type_code: Vec<Option<BufWriter<File>>>,
    resources_by_type_code: Vec<u64>,
    bytes_written: u64,
}

impl<'directory> TypedOutput<'directory> {
    fn new(output_dir: &'directory Path) -> TypedOutput<'directory> {
        TypedOutput {
            output_dir,
            writers_by_type_code: ResourceType::all().map(|_| None).collect(),
            resources_by_type_code: ResourceType::all().map(|_| 0).collect(),
            bytes_written: 0,
        }
    }

    /// Appends `lines` (`resource_count` complete ndjson lines) to the file of `resource_type`.
    fn write(
        &mut self,
        resource_type: ResourceType,
        lines: &[u8],
        resource_count: u32,
    ) -> Result<(), GenerateError> {
        let type_index = usize::from(resource_type.code());
        let output_dir = self.output_dir;
        let write_error = |source| GenerateError::Write {
            path: output_path(output_dir, resource_type),
            source,
        };
        let writer = match &mut self.writers_by_type_code[type_index] {
            Some(writer) => writer,
            empty_slot => {
                let file =
                    File::create(output_path(output_dir, resource_type)).map_err(write_error)?;
                empty_slot.insert(BufWriter::with_capacity(WRITE_BUFFER_BYTES, file))
            }
        };
        writer.write_all(lines).map_err(write_error)?;
        self.resources_by_type_code[type_index] += u64::from(resource_count);
        self.bytes_written += lines.len() as u64;
        Ok(())
    }

    fn finish(self) -> Result<GenerateSummary, GenerateError> {
        let mut summary = GenerateSummary {
            bytes_written: self.bytes_written,
            ..GenerateSummary::default()
        };
        for (resource_type, writer) in ResourceType::all().zip(self.writers_by_type_code) {
            if let Some(writer) = writer {
                writer.into_inner().map_err(|source| GenerateError::Write {
                    path: output_path(self.output_dir, resource_type),
                    source: source.into_error(),
                })?;
            }
        }
        for (resource_type, count) in ResourceType::all().zip(self.resources_by_type_code) {
            if count > 0 {
                summary.resources_written += count;
                summary
                    .resources_by_type
                    .insert(resource_type.as_str().to_owned(), count);
            }
        }
        summary.patients_written = summary
            .resources_by_type
            .get(ResourceType::PATIENT.as_str())
            .copied()
            .unwrap_or(0);
        Ok(summary)
    }
}

fn output_path(output_dir: &Path, resource_type: ResourceType) -> PathBuf {
    output_dir.join(format!("{resource_type}.ndjson"))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use flate2::Compression;
    use flate2::write::GzEncoder;
    use serde_json::json;

    use super::*;

    fn write_ndjson(path: &Path, resources: &[Value]) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let text: String = resources
            .iter()
            .map(|resource| format!("{resource}\n"))
            .collect();
        fs::write(path, text).unwrap();
    }

    fn write_gzipped_ndjson(path: &Path, resources: &[Value]) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        let mut encoder = GzEncoder::new(File::create(path).unwrap(), Compression::fast());
        for resource in resources {
            writeln!(encoder, "{resource}").unwrap();
        }
        encoder.finish().unwrap();
    }

    fn read_output(output_dir: &Path) -> BTreeMap<String, Vec<Value>> {
        let mut resources_by_type = BTreeMap::new();
        for entry in fs::read_dir(output_dir).unwrap() {
            let path = entry.unwrap().path();
            let type_name = path
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .strip_suffix(".ndjson")
                .unwrap()
                .to_owned();
            let resources: Vec<Value> = fs::read_to_string(&path)
                .unwrap()
                .lines()
                .map(|line| serde_json::from_str(line).unwrap())
                .collect();
            resources_by_type.insert(type_name, resources);
        }
        resources_by_type
    }

    fn references_in(value: &Value, references: &mut Vec<String>) {
        match value {
            Value::Object(object) => {
                for (key, child) in object {
                    match (key.as_str(), child) {
                        ("reference", Value::String(reference)) => {
                            references.push(reference.clone())
                        }
                        _ => references_in(child, references),
                    }
                }
            }
            Value::Array(items) => items
                .iter()
                .for_each(|item| references_in(item, references)),
            _ => {}
        }
    }

    /// Two patients, each with an Encounter (gzipped, in a subfolder) and an Observation; a
    /// Device of the first patient (outside the compartment but referencing it); one
    /// shared Organization and Practitioner; files that are not ndjson.
    fn write_two_patient_source(source_dir: &Path) {
        write_ndjson(
            &source_dir.join("Patient.ndjson"),
            &[
                json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "One"}]}),
                json!({"resourceType": "Patient", "id": "p2", "managingOrganization": {"reference": "Organization/org"}}),
            ],
        );
        write_gzipped_ndjson(
            &source_dir.join("nested/Encounter.ndjson.gz"),
            &[
                json!({"resourceType": "Encounter", "id": "e1", "subject": {"reference": "Patient/p1"},
                   "serviceProvider": {"reference": "Organization/org"}}),
                json!({"resourceType": "Encounter", "id": "e2", "subject": {"reference": "Patient/p2"},
                   "serviceProvider": {"reference": "Organization/org"}}),
            ],
        );
        write_ndjson(
            &source_dir.join("Observation.ndjson"),
            &[
                json!({"resourceType": "Observation", "id": "o1", "subject": {"reference": "Patient/p1"},
                   "encounter": {"reference": "Encounter/e1"}, "performer": [{"reference": "Practitioner/dr"}]}),
                json!({"resourceType": "Observation", "id": "o2", "subject": {"reference": "Patient/p2"},
                   "encounter": {"reference": "Encounter/e2"}}),
            ],
        );
        fs::write(
            source_dir.join("Organization.ndjson"),
            "{\"resourceType\": \"Organization\", \"id\": \"org\", \"name\": \"Shared  Hospital\"}\n\n",
        )
        .unwrap();
        write_ndjson(
            &source_dir.join("Practitioner.ndjson"),
            &[json!({"resourceType": "Practitioner", "id": "dr"})],
        );
        write_ndjson(
            &source_dir.join("Device.ndjson"),
            &[
                json!({"resourceType": "Device", "id": "pump", "patient": {"reference": "Patient/p1"}}),
            ],
        );
        fs::write(source_dir.join("README.txt"), "not data").unwrap();
        fs::write(source_dir.join("Bundle.json"), "{ not json").unwrap();
    }

    fn options(source_dir: &Path, copies: u32, output_dir: &Path) -> GenerateOptions {
        GenerateOptions {
            source_dir: source_dir.to_path_buf(),
            copies,
            output_dir: output_dir.to_path_buf(),
        }
    }

    #[test]
    fn clones_each_patient_compartment_and_writes_shared_resources_once() {
        let source = tempfile::tempdir().unwrap();
        let output = tempfile::tempdir().unwrap();
        write_two_patient_source(source.path());
        let output_dir = output.path().join("generated");

        let summary = generate(&options(source.path(), 3, &output_dir)).unwrap();

        let expected_counts: BTreeMap<String, u64> = [
            ("Device", 3),
            ("Encounter", 6),
            ("Observation", 6),
            ("Organization", 1),
            ("Patient", 6),
            ("Practitioner", 1),
        ]
        .into_iter()
        .map(|(type_name, count)| (type_name.to_owned(), count))
        .collect();
        assert_eq!(summary.resources_by_type, expected_counts);
        assert_eq!(summary.resources_written, 23);
        assert_eq!(summary.patients_written, 6);
        let bytes_on_disk: u64 = fs::read_dir(&output_dir)
            .unwrap()
            .map(|entry| entry.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(summary.bytes_written, bytes_on_disk);

        let output_resources = read_output(&output_dir);
        let mut ids_by_type: HashMap<&str, HashSet<&str>> = HashMap::new();
        for (type_name, resources) in &output_resources {
            for resource in resources {
                assert_eq!(resource["resourceType"], type_name.as_str());
                let id = resource["id"].as_str().unwrap();
                assert!(ResourceId::parse(id).is_ok(), "{id}");
                assert!(
                    ids_by_type.entry(type_name).or_default().insert(id),
                    "{type_name}/{id} repeats"
                );
            }
        }
        for original_id in ["p1", "p2", "e1", "e2", "o1", "o2", "pump"] {
            assert!(
                ids_by_type.values().all(|ids| !ids.contains(original_id)),
                "{original_id}"
            );
        }
        for resources in output_resources.values() {
            for resource in resources {
                let mut references = Vec::new();
                references_in(resource, &mut references);
                for reference in references {
                    let (type_name, id) = reference.split_once('/').unwrap();
                    assert!(ids_by_type[type_name].contains(id), "{reference} dangles");
                }
            }
        }

        let subject_of_encounter: HashMap<String, Value> = output_resources["Encounter"]
            .iter()
            .map(|encounter| {
                (
                    format!("Encounter/{}", encounter["id"].as_str().unwrap()),
                    encounter["subject"].clone(),
                )
            })
            .collect();
        for observation in &output_resources["Observation"] {
            let encounter_reference = observation["encounter"]["reference"].as_str().unwrap();
            assert_eq!(
                subject_of_encounter[encounter_reference],
                observation["subject"]
            );
        }
        let patients_with_observations: HashSet<&str> = output_resources["Observation"]
            .iter()
            .map(|observation| observation["subject"]["reference"].as_str().unwrap())
            .collect();
        assert_eq!(patients_with_observations.len(), 6);
        assert_eq!(
            fs::read_to_string(output_dir.join("Organization.ndjson")).unwrap(),
            "{\"resourceType\":\"Organization\",\"id\":\"org\",\"name\":\"Shared  Hospital\"}\n"
        );
        let observations_by_practitioner = output_resources["Observation"]
            .iter()
            .filter(|observation| observation["performer"][0]["reference"] == "Practitioner/dr")
            .count();
        assert_eq!(observations_by_practitioner, 3);
        assert!(output_resources["Patient"].iter().all(|patient| {
            patient
                .get("managingOrganization")
                .is_none_or(|organization| organization["reference"] == "Organization/org")
        }));
    }

    #[test]
    fn generated_ids_are_deterministic() {
        let source = tempfile::tempdir().unwrap();
        let output = tempfile::tempdir().unwrap();
        write_two_patient_source(source.path());
        let first = output.path().join("first");
        let second = output.path().join("second");
        generate(&options(source.path(), 2, &first)).unwrap();
        generate(&options(source.path(), 2, &second)).unwrap();
        for type_name in [
            "Patient",
            "Encounter",
            "Observation",
            "Organization",
            "Practitioner",
        ] {
            let file_name = format!("{type_name}.ndjson");
            assert_eq!(
                fs::read(first.join(&file_name)).unwrap(),
                fs::read(second.join(&file_name)).unwrap(),
                "{type_name}"
            );
        }
    }

    #[test]
    fn an_output_folder_inside_the_source_is_not_read_back() {
        let source = tempfile::tempdir().unwrap();
        write_two_patient_source(source.path());
        let output_dir = source.path().join("generated");
        generate(&options(source.path(), 2, &output_dir)).unwrap();
        let summary = generate(&options(source.path(), 2, &output_dir)).unwrap();
        assert_eq!(summary.patients_written, 4);
        assert_eq!(summary.resources_written, 16);
    }

    #[test]
    fn bad_json_is_reported_with_file_and_line() {
        let source = tempfile::tempdir().unwrap();
        let output = tempfile::tempdir().unwrap();
        let bad_file = source.path().join("bad.ndjson");
        fs::write(
            &bad_file,
            "{\"resourceType\":\"Patient\",\"id\":\"p1\"}\n{\"resourceType\":\n",
        )
        .unwrap();
        let error = generate(&options(source.path(), 1, output.path())).unwrap_err();
        assert!(
            matches!(&error, GenerateError::InvalidJson { path, line: 2, .. } if *path == bad_file),
            "{error:?}"
        );
        assert_eq!(
            error.to_string(),
            format!("{}:2: invalid json", bad_file.display())
        );
        assert!(fs::read_dir(output.path()).unwrap().next().is_none());
    }

    #[test]
    fn lines_that_are_not_resources_are_reported() {
        let source = tempfile::tempdir().unwrap();
        let output = tempfile::tempdir().unwrap();
        let file = source.path().join("odd.ndjson");
        for (line, expected_message) in [
            ("{\"id\":\"x\"}", "no resourceType string"),
            (
                "{\"resourceType\":\"Spaceship\",\"id\":\"x\"}",
                "'Spaceship' is not a FHIR R4 resource type",
            ),
            ("{\"resourceType\":\"Patient\"}", "no id string"),
            ("[1,2]", "no resourceType string"),
        ] {
            fs::write(&file, format!("\n{line}\n")).unwrap();
            let error = generate(&options(source.path(), 1, output.path())).unwrap_err();
            assert_eq!(
                error.to_string(),
                format!("{}:2: {expected_message}", file.display())
            );
        }
        fs::write(&file, "{\"resourceType\":\"Patient\",\"id\":\"a b\"}\n").unwrap();
        let error = generate(&options(source.path(), 1, output.path())).unwrap_err();
        assert!(matches!(
            error,
            GenerateError::InvalidResource {
                line: 1,
                problem: ResourceProblem::InvalidId(_),
                ..
            }
        ));
    }

    #[test]
    fn options_that_cannot_work_are_rejected() {
        let source = tempfile::tempdir().unwrap();
        let output = tempfile::tempdir().unwrap();
        assert!(matches!(
            generate(&options(source.path(), 1, output.path())),
            Err(GenerateError::NoSourceFiles { .. })
        ));
        write_two_patient_source(source.path());
        assert!(matches!(
            generate(&options(source.path(), 0, output.path())),
            Err(GenerateError::ZeroCopies)
        ));
        assert!(matches!(
            generate(&options(source.path(), 1, source.path())),
            Err(GenerateError::OutputIsSource { .. })
        ));
        assert!(matches!(
            generate(&options(&source.path().join("missing"), 1, output.path())),
            Err(GenerateError::Read { .. })
        ));
    }

    fn cloned(keys: &[(&str, &str)]) -> ClonedResources {
        let mut cloned_resources = ClonedResources::new();
        for (type_name, id) in keys {
            cloned_resources.insert(ResourceType::parse(type_name).unwrap(), id);
        }
        cloned_resources
    }

    fn first_copy(line: &str, cloned_resources: &ClonedResources) -> String {
        let mut template = ResourceTemplate::default();
        template
            .rebuild(line.as_bytes(), Some(cloned_resources))
            .unwrap();
        let mut output = Vec::new();
        template.write_copy(1, &mut output);
        String::from_utf8(output).unwrap()
    }

    fn id_of_first_copy(original_id: &str) -> String {
        String::from_utf8(copy_id(1, original_id).to_vec()).unwrap()
    }

    #[test]
    fn templates_rewrite_every_literal_form_of_a_cloned_reference() {
        let cloned_resources = cloned(&[
            ("Patient", "p1"),
            ("Encounter", "e1"),
            ("Observation", "o1"),
        ]);
        let new_p1 = id_of_first_copy("p1");
        let new_e1 = id_of_first_copy("e1");
        let new_o1 = id_of_first_copy("o1");
        let line = r##"{ "resourceType" : "Observation", "id" : "o1",
            "contained": [{"resourceType": "Patient", "id": "p1"}],
            "subject": {"reference": "Patient\/p1", "display": "reference Patient/p1"},
            "focus": [{"reference": "#p1"}, {"reference": "https://x.org/fhir/Patient/p1/_history/2"},
                      {"reference": "Patient/p2"}, {"reference": "Organization/p1"}, {"id": "e1"}],
            "encounter": {"reference": "Encounter/e1"},
            "note": [{"text": "id"}, {"text": "reference"}],
            "component": [{"reference": ["Patient/p1"]}]
        }"##;
        let expected = format!(
            concat!(
                r#"{{"resourceType":"Observation","id":"{o1}","#,
                r#""contained":[{{"resourceType":"Patient","id":"p1"}}],"#,
                r#""subject":{{"reference":"Patient/{p1}","display":"reference Patient/p1"}},"#,
                r##""focus":[{{"reference":"#p1"}},{{"reference":"https://x.org/fhir/Patient/{p1}/_history/2"}},"##,
                r#"{{"reference":"Patient/p2"}},{{"reference":"Organization/p1"}},{{"id":"e1"}}],"#,
                r#""encounter":{{"reference":"Encounter/{e1}"}},"#,
                r#""note":[{{"text":"id"}},{{"text":"reference"}}],"#,
                r#""component":[{{"reference":["Patient/p1"]}}]}}"#,
                "\n"
            ),
            o1 = new_o1,
            p1 = new_p1,
            e1 = new_e1
        );
        assert_eq!(first_copy(line, &cloned_resources), expected);
    }

    #[test]
    fn templates_without_rewrites_are_the_minified_line() {
        let line = "{ \"resourceType\": \"Organization\",\n \"id\": \"org\", \"alias\": [ \"a \\\"b\\\"\" , \"\\u00e9\" ],\t\"active\": true }";
        let mut template = ResourceTemplate::default();
        template.rebuild(line.as_bytes(), None).unwrap();
        assert!(template.holes.is_empty());
        let mut output = Vec::new();
        template.write_copy(7, &mut output);
        assert_eq!(
            String::from_utf8(output).unwrap(),
            "{\"resourceType\":\"Organization\",\"id\":\"org\",\"alias\":[\"a \\\"b\\\"\",\"\\u00e9\"],\"active\":true}\n"
        );
    }

    #[test]
    fn copy_ids_are_valid_distinct_and_stable() {
        let first = id_of_first_copy("85c63cf3-278e-454c-b5ba-df5889815eb7");
        let second =
            String::from_utf8(copy_id(2, "85c63cf3-278e-454c-b5ba-df5889815eb7").to_vec()).unwrap();
        assert_ne!(first, second);
        assert_ne!(
            first,
            id_of_first_copy("85c63cf3-278e-454c-b5ba-df5889815eb8")
        );
        assert_eq!(
            first,
            id_of_first_copy("85c63cf3-278e-454c-b5ba-df5889815eb7")
        );
        for id in [&first, &second] {
            assert!(ResourceId::parse(id).is_ok());
            let parsed = uuid::Uuid::parse_str(id).unwrap();
            assert_eq!(parsed.get_version_num(), 8);
        }
    }
}
