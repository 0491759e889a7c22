//! `fhirlog`: parse the command line and hand over to the library.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use fhirlog::config::{BaseUrl, DataDirArgs, ExportRunArgs, ServeArgs, validate_export_settings};
use fhirlog::export::{ExportLevel, ExportParameters, ExportRequest};
use fhirlog::fhir::canonical::DEFAULT_MAX_JSON_DEPTH;
use fhirlog::fhir::{Instant, LocalBase, ResourceId, ResourceType};
use fhirlog::generate::{GenerateOptions, generate};
use fhirlog::load::{LoadOptions, OnError, load};
use fhirlog::store::{Store, StoreOptions};

/// mimalloc instead of glibc malloc: with one arena per thread glibc's RSS grew past the
/// memory budget on large loads (fragmentation), and a single arena halved throughput.
#[global_allocator]
static GLOBAL_ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_purge_delay` in mimalloc v2's `mi_option_e` (mimalloc.h); libmimalloc-sys
/// does not name it.
const MIMALLOC_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Milliseconds mimalloc keeps freed pages before returning them to the OS. Its default,
/// 10, kept the bodies of large resources (Synthea's ~270 KB Provenance lines), freed by
/// another thread than the one that allocated them, resident long enough to set a load's
/// peak: loading the last 300-copy quarter peaked at 296–299 MB with 10, 263–269 MB with
/// 3 at the same rate, and 224–237 MB with 0 but ~15% slower (twice the system time).
const ALLOCATOR_PURGE_DELAY_MILLISECONDS: std::ffi::c_long = 3;

fn shorten_allocator_purge_delay() {
    // SAFETY: mi_option_set only stores the value; mimalloc reads it when it next purges.
    unsafe {
        libmimalloc_sys::mi_option_set(
            MIMALLOC_OPTION_PURGE_DELAY,
            ALLOCATOR_PURGE_DELAY_MILLISECONDS,
        )
    };
}

#[derive(Parser)]
#[command(
    name = "fhirlog",
    version,
    about = "A FHIR R4 server built around Bulk Data $export"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve the FHIR REST API.
    Serve(Box<ServeArgs>),
    /// Load ndjson files and FHIR Bundles into the store.
    Load {
        /// Files or directories (.ndjson, .ndjson.gz, .json).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[command(flatten)]
        data_dir: DataDirArgs,
        /// What to do with a bad line.
        #[arg(long, value_enum, default_value_t = OnError::Abort)]
        on_error: OnError,
        /// Longest accepted ndjson line or .json document, in bytes (after decompression).
        #[arg(long, env = "FHIRLOG_MAX_DOCUMENT_BYTES", default_value_t = fhirlog::load::DEFAULT_MAX_DOCUMENT_BYTES)]
        max_document_bytes: usize,
        /// The public base URL the server will have: absolute references under it count
        /// as references to resources of this store (others never do).
        #[arg(long, env = "FHIRLOG_BASE_URL")]
        base_url: Option<String>,
    },
    /// Write scale data: every patient's compartment cloned N times.
    Gen {
        #[arg(long)]
        from: PathBuf,
        #[arg(long)]
        copies: u32,
        #[arg(long)]
        out: PathBuf,
    },
    /// Run a Bulk Data export of an existing store without HTTP: write its files and
    /// manifest.json into --out and print the manifest.
    Export {
        #[command(flatten)]
        data_dir: DataDirArgs,
        /// Directory the files and manifest.json are written into (created if missing).
        #[arg(long)]
        out: PathBuf,
        /// Replace the export files (*.ndjson, manifest.json) already in --out.
        #[arg(long)]
        force: bool,
        /// system, patient, or group:ID.
        #[arg(long, default_value = "system", value_parser = parse_level)]
        level: ExportLevel,
        /// Resource types, comma-separated or repeated.
        #[arg(long = "type", value_delimiter = ',', value_parser = parse_resource_type)]
        types: Vec<ResourceType>,
        /// A `_typeFilter` query such as `Observation?category=laboratory`; repeat for more
        /// (queries for one type are ORed; types without one are exported whole).
        #[arg(long = "type-filter")]
        type_filters: Vec<String>,
        /// Only resources changed after this FHIR instant.
        #[arg(long, value_parser = parse_instant)]
        since: Option<Instant>,
        /// The store as it was at this FHIR instant.
        #[arg(long, alias = "till", value_parser = parse_instant)]
        until: Option<Instant>,
        /// Keep only these top-level elements (`code` for every type that has it,
        /// `Observation.code` for one type), comma-separated or repeated.
        #[arg(long = "elements")]
        elements: Vec<String>,
        /// The store's public base URL: absolute references under it are followed like
        /// relative ones (Group members, referenced resources).
        #[arg(long, env = "FHIRLOG_BASE_URL")]
        base_url: Option<String>,
        #[command(flatten)]
        run: ExportRunArgs,
    },
    /// Rebuild every projection from the event log.
    Rebuild {
        #[command(flatten)]
        data_dir: DataDirArgs,
    },
}

fn main() {
    shorten_allocator_purge_delay();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new(
                    "info,fjall=warn,lsm_tree=warn,object_store=warn",
                )
            }),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Err(error) = run(Cli::parse()) {
        eprintln!("fhirlog: {error:#}");
        std::process::exit(1);
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(arguments) => fhirlog::serve::run((*arguments).into_settings()?),
        Command::Load {
            paths,
            data_dir,
            on_error,
            max_document_bytes,
            base_url,
        } => {
            if max_document_bytes == 0 {
                anyhow::bail!("--max-document-bytes must be greater than zero");
            }
            let local_base = match base_url.as_deref() {
                Some(text) => BaseUrl::parse(text)?.local_base(),
                None => LocalBase::relative_only(),
            };
            let store = Store::open(&data_dir.data_dir, &StoreOptions::default())?;
            let options = LoadOptions {
                paths,
                on_error,
                max_json_depth: DEFAULT_MAX_JSON_DEPTH,
                show_progress: true,
                max_document_bytes,
                local_base,
            };
            let summary = load(&store, &options)?;
            store.flush_memtables()?;
            for problem in &summary.skipped {
                eprintln!("skipped {problem}");
            }
            println!("{summary}");
            Ok(())
        }
        Command::Gen { from, copies, out } => {
            let summary = generate(&GenerateOptions {
                source_dir: from,
                copies,
                output_dir: out.clone(),
            })?;
            for (resource_type, count) in &summary.resources_by_type {
                println!("{resource_type:<28} {count:>12}");
            }
            println!(
                "wrote {} resources ({} patients, {} bytes) to {}",
                summary.resources_written,
                summary.patients_written,
                summary.bytes_written,
                out.display()
            );
            Ok(())
        }
        Command::Export {
            data_dir,
            out,
            force,
            level,
            types,
            type_filters,
            since,
            until,
            elements,
            base_url,
            run,
        } => {
            let base_url = base_url.as_deref().map(BaseUrl::parse).transpose()?;
            let settings = run.one_shot_settings(base_url.as_ref());
            validate_export_settings(&settings)?;
            let mut parameters = ExportParameters::new(level);
            parameters.since = since;
            parameters.until = until;
            parameters.type_filters = type_filters;
            for value in &elements {
                parameters.elements.add_value(value)?;
            }
            if !types.is_empty() {
                parameters.types = Some(types.into_iter().collect());
            }
            let request = ExportRequest::new(parameters, Instant::now())?;
            let store = Store::open_existing(&data_dir.data_dir, &StoreOptions::default())?;
            let manifest = fhirlog::export::cli::run_export(store, request, &out, force, settings)?;
            println!("{}", serde_json::to_string_pretty(&manifest)?);
            Ok(())
        }
        Command::Rebuild { data_dir } => {
            let store = Store::open_for_rebuild(&data_dir.data_dir, &StoreOptions::default())?;
            let summary = store.rebuild_projections()?;
            println!(
                "rebuilt every projection from {} events ({} commits)",
                summary.events, summary.commits
            );
            Ok(())
        }
    }
}

fn parse_level(text: &str) -> Result<ExportLevel, String> {
    match text {
        "system" => Ok(ExportLevel::System),
        "patient" => Ok(ExportLevel::AllPatients),
        other => match other.strip_prefix("group:") {
            Some(group_id) => ResourceId::parse(group_id)
                .map(ExportLevel::Group)
                .map_err(|error| error.to_string()),
            None => Err(format!("'{other}' is not system, patient or group:ID")),
        },
    }
}

fn parse_resource_type(text: &str) -> Result<ResourceType, String> {
    ResourceType::parse(text.trim()).map_err(|error| error.to_string())
}

fn parse_instant(text: &str) -> Result<Instant, String> {
    Instant::parse(text).map_err(|error| error.to_string())
}
