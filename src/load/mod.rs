//! The loader behind `fhirlog load` and `serve --load`: ndjson (`.ndjson`, `.ndjson.gz`)
//! and FHIR JSON files (a Bundle, Synthea style, or one resource), directories
//! recursively. Reading, parsing and canonicalising run on worker threads; commits keep
//! file order and are counted only once durable. Content equal to the current version
//! appends nothing, so loading the same files twice is a no-op.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant as WallClock};

use crossbeam_channel::{Receiver, Sender, bounded};
use serde_json::Value;

use crate::fhir::canonical::{BodyId, ParsedResource, ResourceFields};
use crate::fhir::references::rewrite_references;
use crate::fhir::{LocalBase, ResourceId, ResourceType};
use crate::store::{
    PendingCommit, PreparedResource, Store, StoreError, UnchangedContent, WriteOperation,
    WriteOutcome,
};

/// Most resources per commit (and per fsync, unless commits are grouped further).
const LINES_PER_CHUNK: usize = 1_000;
/// Most input bytes per commit: a chunk ends at whichever limit comes first, so files of
/// very large resources (Synthea Provenance lines are ~150 KB) keep memory bounded: each
/// such resource is copied a few times on its way into the store, and at 1 MiB per chunk
/// those copies lifted peak RSS by ~90 MB at the end of a 3.4M-resource load.
const BYTES_PER_CHUNK: usize = 256 * 1024;
/// Commits in flight at once, so parsing and fsync overlap: with small resources, enough
/// to keep a few thousand resources per group commit.
const MAX_COMMITS_IN_FLIGHT: usize = 16;
/// Default for [`LoadOptions::max_document_bytes`].
pub const DEFAULT_MAX_DOCUMENT_BYTES: usize = 64 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnError {
    /// Report the bad line and load the rest.
    Skip,
    /// Stop at the first bad line; nothing from its batch is committed.
    Abort,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub paths: Vec<PathBuf>,
    pub on_error: OnError,
    pub max_json_depth: usize,
    pub show_progress: bool,
    /// Longest ndjson line, and largest `.json` document, in bytes after decompression.
    /// Reading stops at this many bytes, so a gzip bomb is never inflated further: the
    /// line or document is reported and the rest of its file is not read.
    pub max_document_bytes: usize,
    /// Which absolute references name resources of this server (`--base-url`); they and
    /// relative references place resources in patients' compartments.
    pub local_base: LocalBase,
}

/// Where a bad input was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProblemLocation {
    Line(u64),
    BundleEntry(usize),
    WholeFile,
}

/// One bad input, displayed as `file:line: reason`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadProblem {
    pub file: PathBuf,
    pub location: ProblemLocation,
    pub reason: String,
}

impl fmt::Display for LoadProblem {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            ProblemLocation::Line(line) => {
                write!(formatter, "{}:{line}: {}", self.file.display(), self.reason)
            }
            ProblemLocation::BundleEntry(index) => {
                write!(
                    formatter,
                    "{}: entry[{index}]: {}",
                    self.file.display(),
                    self.reason
                )
            }
            ProblemLocation::WholeFile => {
                write!(formatter, "{}: {}", self.file.display(), self.reason)
            }
        }
    }
}

/// Counts for one resource type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TypeCounts {
    /// New versions appended.
    pub written: u64,
    /// Resources whose content equalled the current version.
    pub unchanged: u64,
}

#[derive(Debug, Clone, Default)]
pub struct LoadSummary {
    pub by_type: BTreeMap<ResourceType, TypeCounts>,
    pub skipped: Vec<LoadProblem>,
    pub elapsed: Duration,
}

impl LoadSummary {
    /// How many bad inputs were skipped in each file that had any.
    pub fn skipped_by_file(&self) -> BTreeMap<&Path, usize> {
        let mut counts = BTreeMap::new();
        for problem in &self.skipped {
            *counts.entry(problem.file.as_path()).or_default() += 1;
        }
        counts
    }

    pub fn written(&self) -> u64 {
        self.by_type.values().map(|counts| counts.written).sum()
    }

    pub fn unchanged(&self) -> u64 {
        self.by_type.values().map(|counts| counts.unchanged).sum()
    }

    /// Resources acknowledged (written or unchanged) per second.
    pub fn resources_per_second(&self) -> f64 {
        (self.written() + self.unchanged()) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for LoadSummary {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            formatter,
            "{:<28} {:>12} {:>12}",
            "type", "written", "unchanged"
        )?;
        for (resource_type, counts) in &self.by_type {
            writeln!(
                formatter,
                "{:<28} {:>12} {:>12}",
                resource_type.as_str(),
                counts.written,
                counts.unchanged
            )?;
        }
        writeln!(
            formatter,
            "{:<28} {:>12} {:>12}",
            "total",
            self.written(),
            self.unchanged()
        )?;
        write!(
            formatter,
            "{} resources in {:.1}s ({:.0} resources/s), {} bad inputs skipped",
            self.written() + self.unchanged(),
            self.elapsed.as_secs_f64(),
            self.resources_per_second(),
            self.skipped.len()
        )?;
        for (file, count) in self.skipped_by_file() {
            write!(formatter, "\n  {count} skipped in {}", file.display())?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0} is not an .ndjson, .ndjson.gz or .json file")]
    UnsupportedFile(PathBuf),
    #[error("{problem} (aborted; rerun with --on-error skip to load the rest)")]
    BadInput {
        problem: LoadProblem,
        loaded_before_abort: Box<LoadSummary>,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

enum ChunkPayload {
    Lines {
        first_line: u64,
        lines: ChunkLines,
    },
    JsonDocument(Vec<u8>),
    /// The file could not be read (further) from this point.
    Unreadable {
        location: ProblemLocation,
        reason: String,
    },
}

/// A chunk's lines, one after another in one buffer: one allocation per chunk rather than
/// per line, and the reader's bytes are copied once.
struct ChunkLines {
    text: Vec<u8>,
    /// Where each line ends in `text`; the next line starts there.
    line_ends: Vec<usize>,
}

impl ChunkLines {
    fn len(&self) -> usize {
        self.line_ends.len()
    }

    fn is_empty(&self) -> bool {
        self.line_ends.is_empty()
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        let starts = std::iter::once(0).chain(self.line_ends.iter().copied());
        starts
            .zip(&self.line_ends)
            .map(|(start, &end)| &self.text[start..end])
    }
}

struct RawChunk {
    index: u64,
    file: Arc<Path>,
    payload: ChunkPayload,
}

struct PreparedChunk {
    index: u64,
    resources: Vec<PreparedResource>,
    problems: Vec<LoadProblem>,
}

/// Loads every input into `store`. On success every counted resource is durable.
pub fn load(store: &Store, options: &LoadOptions) -> Result<LoadSummary, LoadError> {
    let started = WallClock::now();
    let files = input_files(&options.paths)?;
    let worker_count = std::thread::available_parallelism().map_or(2, |count| count.get());
    let (raw_sender, raw_receiver) = bounded::<RawChunk>(worker_count * 2);
    let (prepared_sender, prepared_receiver) = bounded::<PreparedChunk>(worker_count * 2);
    let progress = progress_bar(options.show_progress);
    std::thread::scope(|scope| {
        let max_document_bytes = options.max_document_bytes;
        scope.spawn(move || read_files(files, raw_sender, max_document_bytes));
        for _ in 0..worker_count {
            let raw_receiver = raw_receiver.clone();
            let prepared_sender = prepared_sender.clone();
            let max_json_depth = options.max_json_depth;
            let local_base = options.local_base.clone();
            scope.spawn(move || {
                prepare_chunks(raw_receiver, prepared_sender, max_json_depth, &local_base)
            });
        }
        drop(raw_receiver);
        drop(prepared_sender);
        let result = commit_in_order(
            store,
            prepared_receiver,
            options.on_error,
            &progress,
            started,
        );
        progress.finish_and_clear();
        result
    })
}

fn progress_bar(show: bool) -> indicatif::ProgressBar {
    if !show {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} {elapsed_precise} {human_pos} resources ({per_sec})",
    ) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

/// Expands directories recursively (sorted) into the loadable files below them.
fn input_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, LoadError> {
    let mut files = Vec::new();
    for path in paths {
        let metadata = std::fs::metadata(path).map_err(|source| LoadError::Io {
            path: path.clone(),
            source,
        })?;
        if metadata.is_dir() {
            collect_directory(path, &mut files)?;
        } else if is_loadable(path) {
            files.push(path.clone());
        } else {
            return Err(LoadError::UnsupportedFile(path.clone()));
        }
    }
    Ok(files)
}

fn collect_directory(directory: &Path, files: &mut Vec<PathBuf>) -> Result<(), LoadError> {
    let io_error = |source| LoadError::Io {
        path: directory.to_path_buf(),
        source,
    };
    let mut entries: Vec<PathBuf> = std::fs::read_dir(directory)
        .map_err(io_error)?
        .map(|entry| entry.map(|entry| entry.path()))
        .collect::<Result<_, _>>()
        .map_err(io_error)?;
    entries.sort();
    for entry in entries {
        if entry.is_dir() {
            collect_directory(&entry, files)?;
        } else if is_loadable(&entry) {
            files.push(entry);
        }
    }
    Ok(())
}

fn is_loadable(path: &Path) -> bool {
    let name = path
        .file_name()
        .and_then(|name| name.to_str())
        .unwrap_or_default();
    [".ndjson", ".ndjson.gz", ".json", ".json.gz"]
        .iter()
        .any(|suffix| name.ends_with(suffix))
}

fn open_decoded(path: &Path) -> std::io::Result<Box<dyn Read + Send>> {
    let file = File::open(path)?;
    if path.extension().is_some_and(|extension| extension == "gz") {
        Ok(Box::new(flate2::read::MultiGzDecoder::new(
            BufReader::with_capacity(1 << 20, file),
        )))
    } else {
        Ok(Box::new(file))
    }
}

/// Why reading a line stopped.
enum LineEnd {
    /// A whole line is in the buffer, without its `\n` (or the file ended after it).
    Complete,
    /// The line is longer than the cap; the reader stopped inside it.
    TooLong,
    /// Nothing was left to read.
    EndOfFile,
}

/// Appends the next line to `text` as raw bytes, without its `\n` (and `\r`), keeping at
/// most `max_bytes` of it in memory. Only a complete line stays appended.
fn read_capped_line(
    reader: &mut impl BufRead,
    text: &mut Vec<u8>,
    max_bytes: usize,
) -> std::io::Result<LineEnd> {
    let start = text.len();
    loop {
        let available = match reader.fill_buf() {
            Ok(available) => available,
            Err(error) => {
                text.truncate(start);
                return Err(error);
            }
        };
        if available.is_empty() {
            return Ok(if text.len() == start {
                LineEnd::EndOfFile
            } else {
                LineEnd::Complete
            });
        }
        let newline = memchr::memchr(b'\n', available);
        let content = &available[..newline.unwrap_or(available.len())];
        if text.len() - start + content.len() > max_bytes {
            text.truncate(start);
            return Ok(LineEnd::TooLong);
        }
        text.extend_from_slice(content);
        let consumed = content.len() + usize::from(newline.is_some());
        reader.consume(consumed);
        if newline.is_some() {
            if text.len() > start && text.last() == Some(&b'\r') {
                text.pop();
            }
            return Ok(LineEnd::Complete);
        }
    }
}

/// Reads a whole document, refusing one larger than `max_bytes` without reading past it.
fn read_capped_document(reader: impl Read, max_bytes: usize) -> ChunkPayload {
    let mut bytes = Vec::new();
    let limit = u64::try_from(max_bytes)
        .unwrap_or(u64::MAX)
        .saturating_add(1);
    match BufReader::new(reader).take(limit).read_to_end(&mut bytes) {
        Ok(_) if bytes.len() > max_bytes => ChunkPayload::Unreadable {
            location: ProblemLocation::WholeFile,
            reason: format!(
                "the document is larger than the limit of {max_bytes} bytes; it was not loaded"
            ),
        },
        Ok(_) => ChunkPayload::JsonDocument(bytes),
        Err(error) => ChunkPayload::Unreadable {
            location: ProblemLocation::WholeFile,
            reason: error.to_string(),
        },
    }
}

fn read_files(files: Vec<PathBuf>, chunks: Sender<RawChunk>, max_document_bytes: usize) {
    let mut index = 0u64;
    for path in files {
        let file: Arc<Path> = Arc::from(path.as_path());
        let mut send = |payload| {
            let chunk = RawChunk {
                index,
                file: Arc::clone(&file),
                payload,
            };
            index += 1;
            chunks.send(chunk).is_ok()
        };
        let reader = match open_decoded(&path) {
            Ok(reader) => reader,
            Err(error) => {
                let unreadable = ChunkPayload::Unreadable {
                    location: ProblemLocation::WholeFile,
                    reason: error.to_string(),
                };
                if !send(unreadable) {
                    return;
                }
                continue;
            }
        };
        let name = path.to_string_lossy();
        let is_ndjson = name.ends_with(".ndjson") || name.ends_with(".ndjson.gz");
        if !is_ndjson {
            if !send(read_capped_document(reader, max_document_bytes)) {
                return;
            }
            continue;
        }
        if !read_ndjson(reader, max_document_bytes, &mut send) {
            return;
        }
    }
}

/// Sends the lines of one ndjson file in chunks; a line that cannot be read, or is longer
/// than `max_line_bytes`, ends the file with an `Unreadable` payload. Returns false once
/// nobody receives chunks any more.
fn read_ndjson(
    reader: impl Read,
    max_line_bytes: usize,
    send: &mut impl FnMut(ChunkPayload) -> bool,
) -> bool {
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    let mut line_number = 0u64;
    loop {
        let first_line = line_number + 1;
        let mut batch = ChunkLines {
            text: Vec::with_capacity(BYTES_PER_CHUNK + BYTES_PER_CHUNK / 4),
            line_ends: Vec::with_capacity(LINES_PER_CHUNK),
        };
        let mut stopped = None;
        while batch.len() < LINES_PER_CHUNK && batch.text.len() < BYTES_PER_CHUNK {
            match read_capped_line(&mut reader, &mut batch.text, max_line_bytes) {
                Ok(LineEnd::Complete) => {
                    line_number += 1;
                    batch.line_ends.push(batch.text.len());
                }
                Ok(LineEnd::EndOfFile) => {
                    stopped = Some(None);
                    break;
                }
                Ok(LineEnd::TooLong) => {
                    stopped = Some(Some(format!(
                        "the line is longer than the limit of {max_line_bytes} bytes; \
                         the rest of the file was not read"
                    )));
                    break;
                }
                Err(error) => {
                    stopped = Some(Some(format!("{error}; the rest of the file was not read")));
                    break;
                }
            }
        }
        if !batch.is_empty()
            && !send(ChunkPayload::Lines {
                first_line,
                lines: batch,
            })
        {
            return false;
        }
        if let Some(problem) = stopped {
            return match problem {
                None => true,
                Some(reason) => send(ChunkPayload::Unreadable {
                    location: ProblemLocation::Line(line_number + 1),
                    reason,
                }),
            };
        }
    }
}

/// How much lower than the store's threads a preparing thread runs (its nice value).
#[cfg(target_os = "linux")]
const PREPARING_THREAD_NICENESS: libc::c_int = 5;

/// Lowers the calling thread's priority. A load's rate is bounded by the committer and
/// the applier, one thread each, and on 2 cores they shared the CPU evenly with the
/// preparing threads, which mostly wait for them anyway. Loading 2.25M resources (7 runs
/// each, alternated) took 31.4–35.2 s, 33.7 s on average, against 30.8–41.8 s, 35.6 s,
/// with the CPU idle less often.
fn yield_the_cpu_to_the_store_threads() {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: setpriority only sets the nice value of the thread `gettid` names (on
        // Linux `PRIO_PROCESS` with a thread id applies to that thread alone).
        let result = unsafe {
            libc::setpriority(
                libc::PRIO_PROCESS,
                libc::gettid() as libc::id_t,
                PREPARING_THREAD_NICENESS,
            )
        };
        if result != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "could not lower a preparing thread's priority"
            );
        }
    }
}

fn prepare_chunks(
    raw_chunks: Receiver<RawChunk>,
    prepared: Sender<PreparedChunk>,
    max_json_depth: usize,
    local_base: &LocalBase,
) {
    yield_the_cpu_to_the_store_threads();
    for chunk in raw_chunks {
        let mut resources = Vec::new();
        let mut problems = Vec::new();
        let problem = |location, reason: String| LoadProblem {
            file: chunk.file.to_path_buf(),
            location,
            reason,
        };
        match chunk.payload {
            ChunkPayload::Lines { first_line, lines } => {
                for (offset, line) in lines.iter().enumerate() {
                    if line.trim_ascii().is_empty() {
                        continue;
                    }
                    let line_number = first_line + offset as u64;
                    match prepare_line(line, max_json_depth, local_base) {
                        Ok(resource) => resources.push(resource),
                        Err(reason) => {
                            problems.push(problem(ProblemLocation::Line(line_number), reason))
                        }
                    }
                }
            }
            ChunkPayload::JsonDocument(bytes) => {
                match prepare_document(&bytes, max_json_depth, local_base) {
                    Ok((document_resources, entry_problems)) => {
                        resources = document_resources;
                        problems.extend(entry_problems.into_iter().map(|(index, reason)| {
                            problem(ProblemLocation::BundleEntry(index), reason)
                        }));
                    }
                    Err(reason) => problems.push(problem(ProblemLocation::WholeFile, reason)),
                }
            }
            ChunkPayload::Unreadable { location, reason } => {
                problems.push(problem(location, reason))
            }
        }
        let ready = PreparedChunk {
            index: chunk.index,
            resources,
            problems,
        };
        if prepared.send(ready).is_err() {
            return;
        }
    }
}

/// Prepares one ndjson line: in one pass without a JSON tree when it opens with its
/// `resourceType`, as bulk-data ndjson does; otherwise, and for every line that pass
/// refuses (so that the reported reason is the same either way), through the tree.
fn prepare_line(
    line: &[u8],
    max_json_depth: usize,
    local_base: &LocalBase,
) -> Result<PreparedResource, String> {
    let prepared_in_one_pass = leading_resource_type(line).and_then(|resource_type| {
        let fields = ResourceFields::read(
            line,
            resource_type,
            BodyId::Validate,
            max_json_depth,
            local_base,
        )
        .ok()?;
        let id = fields.id.clone()?;
        Some(PreparedResource::from_fields(fields, id))
    });
    if let Some(resource) = prepared_in_one_pass {
        return Ok(resource);
    }
    if let Err(error) = std::str::from_utf8(line) {
        return Err(format!(
            "the line is not valid UTF-8 (at byte {})",
            error.valid_up_to()
        ));
    }
    let parsed =
        ParsedResource::parse_bytes(line, max_json_depth).map_err(|error| error.to_string())?;
    let id = parsed.id.clone().ok_or_else(|| {
        format!(
            "{} has no id; loaded resources need one",
            parsed.resource_type
        )
    })?;
    Ok(PreparedResource::new(
        parsed.resource_type,
        id,
        parsed.json,
        local_base,
    ))
}

/// The type a line names in its first member, when that member is `resourceType` with a
/// string value free of escapes.
fn leading_resource_type(line: &[u8]) -> Option<ResourceType> {
    let after_brace = line.trim_ascii_start().strip_prefix(b"{")?;
    let after_name = after_brace
        .trim_ascii_start()
        .strip_prefix(b"\"resourceType\"")?;
    let after_colon = after_name.trim_ascii_start().strip_prefix(b":")?;
    let value = after_colon.trim_ascii_start().strip_prefix(b"\"")?;
    let end = value.iter().position(|byte| matches!(byte, b'"' | b'\\'))?;
    if value[end] != b'"' {
        return None;
    }
    ResourceType::parse(std::str::from_utf8(&value[..end]).ok()?).ok()
}

/// A JSON document: a Bundle (entries loaded, `urn:uuid:` and absolute fullUrls rewritten
/// to `Type/id`) or a single resource. Entry problems are returned by entry index.
#[allow(clippy::type_complexity)]
fn prepare_document(
    bytes: &[u8],
    max_json_depth: usize,
    local_base: &LocalBase,
) -> Result<(Vec<PreparedResource>, Vec<(usize, String)>), String> {
    let parsed =
        ParsedResource::parse_bytes(bytes, max_json_depth).map_err(|error| error.to_string())?;
    if parsed.resource_type.as_str() != "Bundle" {
        let id = parsed
            .id
            .clone()
            .ok_or_else(|| format!("{} has no id", parsed.resource_type))?;
        return Ok((
            vec![PreparedResource::new(
                parsed.resource_type,
                id,
                parsed.json,
                local_base,
            )],
            Vec::new(),
        ));
    }
    let mut json = parsed.json;
    let entries = match json.remove("entry") {
        Some(Value::Array(entries)) => entries,
        None => Vec::new(),
        Some(_) => return Err("Bundle.entry is not an array".to_owned()),
    };
    let mut problems = Vec::new();
    let mut identified: Vec<(usize, ResourceType, ResourceId, Value)> = Vec::new();
    let mut full_url_targets: HashMap<String, String> = HashMap::new();
    for (index, entry) in entries.into_iter().enumerate() {
        match identify_entry(entry) {
            Ok((full_url, resource_type, id, resource)) => {
                if let Some(full_url) = full_url {
                    full_url_targets.insert(full_url, format!("{resource_type}/{id}"));
                }
                identified.push((index, resource_type, id, resource));
            }
            Err(reason) => problems.push((index, reason)),
        }
    }
    let mut resources = Vec::with_capacity(identified.len());
    for (index, resource_type, id, mut resource) in identified {
        rewrite_references(&mut resource, &full_url_targets);
        match ParsedResource::from_value(resource, max_json_depth) {
            Ok(parsed) => resources.push(PreparedResource::new(
                resource_type,
                id,
                parsed.json,
                local_base,
            )),
            Err(error) => problems.push((index, error.to_string())),
        }
    }
    Ok((resources, problems))
}

fn identify_entry(
    entry: Value,
) -> Result<(Option<String>, ResourceType, ResourceId, Value), String> {
    let Value::Object(mut entry) = entry else {
        return Err("entry is not an object".to_owned());
    };
    let full_url = entry
        .get("fullUrl")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let resource = entry.remove("resource").ok_or("entry has no resource")?;
    let resource_type = resource
        .get("resourceType")
        .and_then(Value::as_str)
        .ok_or("entry resource has no resourceType")?;
    let resource_type = ResourceType::parse(resource_type).map_err(|error| error.to_string())?;
    let id_text = match resource.get("id").and_then(Value::as_str) {
        Some(id) => id.to_owned(),
        None => full_url
            .as_deref()
            .and_then(|full_url| full_url.strip_prefix("urn:uuid:"))
            .ok_or("entry resource has no id and no urn:uuid fullUrl")?
            .to_owned(),
    };
    let id = ResourceId::parse(&id_text).map_err(|error| error.to_string())?;
    Ok((full_url, resource_type, id, resource))
}

fn commit_in_order(
    store: &Store,
    prepared: Receiver<PreparedChunk>,
    on_error: OnError,
    progress: &indicatif::ProgressBar,
    started: WallClock,
) -> Result<LoadSummary, LoadError> {
    let mut summary = LoadSummary::default();
    let mut waiting: BTreeMap<u64, PreparedChunk> = BTreeMap::new();
    let mut in_flight: std::collections::VecDeque<PendingCommit> =
        std::collections::VecDeque::new();
    let mut next_index = 0u64;
    let mut abort_problem = None;
    'receive: for chunk in prepared {
        waiting.insert(chunk.index, chunk);
        while let Some(chunk) = waiting.remove(&next_index) {
            next_index += 1;
            if let Some(problem) = chunk.problems.first() {
                if on_error == OnError::Abort {
                    abort_problem = Some(problem.clone());
                    break 'receive;
                }
                for problem in &chunk.problems {
                    tracing::warn!(%problem, "skipped bad input");
                }
                summary.skipped.extend(chunk.problems);
            }
            if chunk.resources.is_empty() {
                continue;
            }
            let operations = chunk
                .resources
                .into_iter()
                .map(|resource| WriteOperation::Update {
                    resource,
                    expected_version: None,
                    unchanged: UnchangedContent::Skip,
                })
                .collect();
            in_flight.push_back(store.submit(operations));
            if in_flight.len() >= MAX_COMMITS_IN_FLIGHT
                && let Some(oldest) = in_flight.pop_front()
            {
                count_outcomes(&mut summary, oldest.wait()?, progress);
            }
        }
    }
    for pending in in_flight {
        count_outcomes(&mut summary, pending.wait()?, progress);
    }
    summary.elapsed = started.elapsed();
    match abort_problem {
        Some(problem) => Err(LoadError::BadInput {
            problem,
            loaded_before_abort: Box::new(summary),
        }),
        None => Ok(summary),
    }
}

fn count_outcomes(
    summary: &mut LoadSummary,
    outcomes: Vec<WriteOutcome>,
    progress: &indicatif::ProgressBar,
) {
    progress.inc(outcomes.len() as u64);
    for outcome in outcomes {
        match outcome {
            WriteOutcome::Created { version } | WriteOutcome::Updated { version } => {
                summary
                    .by_type
                    .entry(version.resource_type)
                    .or_default()
                    .written += 1;
            }
            WriteOutcome::Unchanged { resource_type, .. } => {
                summary.by_type.entry(resource_type).or_default().unchanged += 1;
            }
            WriteOutcome::Deleted { .. } | WriteOutcome::NothingToDelete => {}
        }
    }
}

#[cfg(test)]
mod tests;
