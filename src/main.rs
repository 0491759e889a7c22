//! `fhirlog`: parse the command line and hand over to the library.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

use fhirlog::config::{DataDirArgs, ExportArgs, ServeArgs};
use fhirlog::export::ExportRequest;
use fhirlog::fhir::canonical::DEFAULT_MAX_JSON_DEPTH;
use fhirlog::generate::{GenerateOptions, generate};
use fhirlog::load::{LoadOptions, OnError, load};
use fhirlog::store::{Store, StoreOptions};

/// mimalloc instead of glibc malloc: with one arena per thread glibc's RSS grew past the
/// memory budget on large loads (fragmentation), and a single arena halved throughput.
#[global_allocator]
static GLOBAL_ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    Serve(ServeArgs),
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
    /// Run a Bulk Data export without HTTP and print its manifest.
    Export {
        #[command(flatten)]
        data_dir: DataDirArgs,
        /// Directory the files are written under.
        #[arg(long)]
        out: PathBuf,
        /// system, patient, or group:ID.
        #[arg(long, default_value = "system")]
        level: String,
        /// Resource types, comma-separated or repeated.
        #[arg(long = "type")]
        types: Vec<String>,
        /// Only resources changed after this FHIR instant.
        #[arg(long)]
        since: Option<String>,
        /// The store as it was at this FHIR instant.
        #[arg(long, alias = "till")]
        until: Option<String>,
        #[command(flatten)]
        exports: ExportArgs,
    },
    /// Rebuild every projection from the event log.
    Rebuild {
        #[command(flatten)]
        data_dir: DataDirArgs,
    },
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
                tracing_subscriber::EnvFilter::new("info,fjall=warn,lsm_tree=warn")
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
        Command::Serve(arguments) => fhirlog::serve::run(arguments.into_settings()?),
        Command::Load {
            paths,
            data_dir,
            on_error,
        } => {
            let store = Store::open(&data_dir.data_dir, &StoreOptions::default())?;
            let options = LoadOptions {
                paths,
                on_error,
                max_json_depth: DEFAULT_MAX_JSON_DEPTH,
                show_progress: true,
                max_document_bytes: fhirlog::load::DEFAULT_MAX_DOCUMENT_BYTES,
            };
            let summary = load(&store, &options)?;
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
            level,
            types,
            since,
            until,
            exports,
        } => {
            let request = export_request(&level, &types, since.as_deref(), until.as_deref())?;
            let store = Store::open(&data_dir.data_dir, &StoreOptions::default())?;
            let manifest =
                fhirlog::export::cli::run_export(store, request, &out, exports.settings()?)?;
            println!("{}", serde_json::to_string_pretty(&manifest)?);
            Ok(())
        }
        Command::Rebuild { data_dir } => {
            let store = Store::open_for_rebuild(&data_dir.data_dir, &StoreOptions::default())
                .with_context(|| format!("opening {}", data_dir.data_dir.display()))?;
            let summary = store.rebuild_projections()?;
            println!(
                "rebuilt every projection from {} events ({} commits)",
                summary.events, summary.commits
            );
            Ok(())
        }
    }
}

/// Builds the request the CLI flags describe, through the same parser HTTP kick-offs use.
fn export_request(
    level: &str,
    types: &[String],
    since: Option<&str>,
    until: Option<&str>,
) -> anyhow::Result<ExportRequest> {
    use fhirlog::export::{ExportLevel, KickOff};
    use fhirlog::fhir::{Instant, ResourceId};
    let level = match level {
        "system" => ExportLevel::System,
        "patient" => ExportLevel::AllPatients,
        other => match other.strip_prefix("group:") {
            Some(group_id) => ExportLevel::Group(ResourceId::parse(group_id)?),
            None => anyhow::bail!("--level must be system, patient or group:ID, not '{other}'"),
        },
    };
    let mut query = form_urlencoded::Serializer::new(String::new());
    for resource_type in types {
        query.append_pair("_type", resource_type);
    }
    if let Some(since) = since {
        query.append_pair("_since", since);
    }
    if let Some(until) = until {
        query.append_pair("_until", until);
    }
    let query = query.finish();
    let request = ExportRequest::parse(&KickOff {
        level,
        is_post: false,
        query: &query,
        accept: Some("application/fhir+json"),
        prefer: vec!["respond-async"],
        body: b"",
        now: Instant::now(),
    })?;
    Ok(request)
}
