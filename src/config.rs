//! Settings: command-line flags and `FHIRLOG_*` variables, parsed and checked once at
//! start-up into typed values.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use crate::export::ExportSettings;
use crate::fhir::canonical::DEFAULT_MAX_JSON_DEPTH;
use crate::sink::{
    AzureDestination, Destination, LocalDestination, S3Destination, StorageUrl, StorageUrlError,
};

/// Where the store lives.
#[derive(Debug, Clone, clap::Args)]
pub struct DataDirArgs {
    /// Directory holding the store (created if missing).
    #[arg(long, env = "FHIRLOG_DATA_DIR", default_value = "./fhirlog-data")]
    pub data_dir: PathBuf,
}

/// Limits on what one request may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct RequestLimits {
    /// Largest accepted request body, in bytes; larger bodies get 413.
    #[arg(long, env = "FHIRLOG_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Deepest accepted JSON nesting in a resource.
    #[arg(long, env = "FHIRLOG_MAX_JSON_DEPTH", default_value_t = DEFAULT_MAX_JSON_DEPTH)]
    pub max_json_depth: usize,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_body_bytes: 16 * 1024 * 1024,
            max_json_depth: DEFAULT_MAX_JSON_DEPTH,
        }
    }
}

/// A duration written as seconds or with a unit: `90`, `90s`, `10m`, `24h`, `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationArg(pub Duration);

impl std::str::FromStr for DurationArg {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let trimmed = text.trim();
        let split_at = trimmed
            .find(|character: char| !character.is_ascii_digit())
            .unwrap_or(trimmed.len());
        let (digits, unit) = trimmed.split_at(split_at);
        let amount: u64 = digits
            .parse()
            .map_err(|_| format!("'{text}' is not a duration like 90s, 10m, 24h or 7d"))?;
        let seconds_per_unit = match unit {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(format!("'{text}' has an unknown unit; use s, m, h or d")),
        };
        Ok(DurationArg(Duration::from_secs(
            amount.saturating_mul(seconds_per_unit),
        )))
    }
}

/// How exports run.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportArgs {
    /// Export worker threads (default: one per core).
    #[arg(long, env = "FHIRLOG_WORKERS")]
    pub workers: Option<usize>,
    /// Most resources in one output file.
    #[arg(long, env = "FHIRLOG_MAX_RESOURCES_PER_FILE", default_value_t = 5_000)]
    pub max_resources_per_file: u64,
    /// A job that makes no progress for this long is failed.
    #[arg(long, env = "FHIRLOG_JOB_TIMEOUT", default_value = "10m")]
    pub job_timeout: DurationArg,
    /// Most queued or running exports; more kick-offs get 429.
    #[arg(long, env = "FHIRLOG_MAX_JOBS", default_value_t = 16)]
    pub max_jobs: usize,
    /// How long finished exports and their files are kept.
    #[arg(long, env = "FHIRLOG_RETENTION", default_value = "24h")]
    pub retention: DurationArg,
}

/// Where export files go.
#[derive(Debug, Clone, clap::Args)]
pub struct StorageArgs {
    /// Create a `_container` that does not exist yet instead of refusing the export.
    #[arg(long, env = "FHIRLOG_CREATE_CONTAINERS")]
    pub create_containers: bool,
    /// Where exports go: file:///path (default {data-dir}/exports),
    /// s3://BUCKET?endpoint=…&region=…&allow_http=true, or az://CONTAINER?account=NAME
    /// (&emulator=true for Azurite).
    #[arg(long, env = "FHIRLOG_STORAGE")]
    pub storage: Option<String>,
    /// A destination failing for this long (transient errors retried with backoff) fails the job.
    #[arg(long, env = "FHIRLOG_DESTINATION_TIMEOUT", default_value = "2m")]
    pub destination_timeout: DurationArg,
    /// Put pre-signed S3 / SAS URLs valid this long in manifests instead of server URLs.
    #[arg(long, env = "FHIRLOG_SIGNED_URLS")]
    pub signed_urls: Option<DurationArg>,
}

impl ExportArgs {
    pub fn settings(&self) -> Result<ExportSettings, SettingsError> {
        if self.max_resources_per_file == 0 || self.max_jobs == 0 || self.workers == Some(0) {
            return Err(SettingsError::ZeroLimit);
        }
        let defaults = ExportSettings::default();
        Ok(ExportSettings {
            workers: self.workers.unwrap_or(defaults.workers),
            max_resources_per_file: self.max_resources_per_file,
            job_timeout: self.job_timeout.0,
            max_jobs: self.max_jobs,
            retention: self.retention.0,
            ..defaults
        })
    }
}

impl StorageArgs {
    /// The destination `--storage` names (the local `{data-dir}/exports` by default).
    pub fn storage_url(&self, data_dir: &std::path::Path) -> Result<StorageUrl, SettingsError> {
        match &self.storage {
            Some(text) => StorageUrl::parse(text).map_err(SettingsError::Storage),
            None => Ok(StorageUrl::File {
                root: data_dir.join("exports"),
            }),
        }
    }

    /// Builds the destination; nothing is contacted yet.
    pub fn destination(
        &self,
        data_dir: &std::path::Path,
    ) -> Result<Arc<dyn Destination>, SettingsError> {
        let timeout = self.destination_timeout.0;
        let create = self.create_containers;
        Ok(match self.storage_url(data_dir)? {
            StorageUrl::File { root } => Arc::new(LocalDestination::new(root, create)),
            StorageUrl::S3 {
                bucket,
                endpoint,
                region,
                allow_http,
            } => Arc::new(S3Destination::new(
                bucket, endpoint, region, allow_http, create, timeout,
            )),
            StorageUrl::Azure {
                container,
                account,
                emulator,
            } => Arc::new(AzureDestination::new(
                container, account, emulator, create, timeout,
            )),
        })
    }
}

/// `fhirlog serve` flags as given.
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    #[command(flatten)]
    pub data_dir: DataDirArgs,
    /// Address to listen on.
    #[arg(long, env = "FHIRLOG_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: String,
    /// Public base URL of the FHIR endpoint; default `http://{listen}/fhir`.
    #[arg(long, env = "FHIRLOG_BASE_URL")]
    pub base_url: Option<String>,
    /// Files or directories to load before serving (idempotent).
    #[arg(long, num_args = 1..)]
    pub load: Vec<PathBuf>,
    #[command(flatten)]
    pub limits: RequestLimits,
    #[command(flatten)]
    pub exports: ExportArgs,
    #[command(flatten)]
    pub storage: StorageArgs,
}

/// A base URL such as `http://127.0.0.1:8080/fhir`, without a trailing slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("--listen '{0}' is not an address like 127.0.0.1:8080")]
    BadListenAddress(String),
    #[error("--base-url '{0}' must be an absolute http:// or https:// URL")]
    BadBaseUrl(String),
    #[error("size, count and worker limits must be greater than zero")]
    ZeroLimit,
    #[error(transparent)]
    Storage(StorageUrlError),
}

impl BaseUrl {
    pub fn parse(text: &str) -> Result<BaseUrl, SettingsError> {
        let trimmed = text.trim_end_matches('/');
        let has_host = ["http://", "https://"].iter().any(|scheme| {
            trimmed
                .strip_prefix(scheme)
                .is_some_and(|rest| !rest.is_empty())
        });
        if !has_host || trimmed.chars().any(char::is_whitespace) {
            return Err(SettingsError::BadBaseUrl(text.to_owned()));
        }
        Ok(BaseUrl(trimmed.to_owned()))
    }

    pub fn for_listen_address(address: SocketAddr) -> BaseUrl {
        BaseUrl(format!("http://{address}/fhir"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Validated settings for `serve`.
#[derive(Clone)]
pub struct ServeSettings {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// `None` means derived from the bound address (so port 0 works).
    pub base_url: Option<BaseUrl>,
    pub load_paths: Vec<PathBuf>,
    pub limits: RequestLimits,
    pub exports: ExportSettings,
    pub storage: StorageUrl,
    pub destination: Arc<dyn Destination>,
    pub signed_url_ttl: Option<Duration>,
}

impl ServeArgs {
    pub fn into_settings(self) -> Result<ServeSettings, SettingsError> {
        let listen: SocketAddr = self
            .listen
            .parse()
            .map_err(|_| SettingsError::BadListenAddress(self.listen.clone()))?;
        let base_url = self.base_url.as_deref().map(BaseUrl::parse).transpose()?;
        if self.limits.max_body_bytes == 0 || self.limits.max_json_depth == 0 {
            return Err(SettingsError::ZeroLimit);
        }
        Ok(ServeSettings {
            exports: ExportSettings {
                destination_timeout: self.storage.destination_timeout.0,
                ..self.exports.settings()?
            },
            storage: self.storage.storage_url(&self.data_dir.data_dir)?,
            destination: self.storage.destination(&self.data_dir.data_dir)?,
            signed_url_ttl: self.storage.signed_urls.map(|ttl| ttl.0),
            data_dir: self.data_dir.data_dir,
            listen,
            base_url,
            load_paths: self.load,
            limits: self.limits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls_are_absolute_http_without_trailing_slash() {
        assert_eq!(
            BaseUrl::parse("http://example.org/fhir/").unwrap().as_str(),
            "http://example.org/fhir"
        );
        assert!(BaseUrl::parse("example.org/fhir").is_err());
        assert!(BaseUrl::parse("http://").is_err());
        assert!(BaseUrl::parse("ftp://example.org").is_err());
    }

    #[test]
    fn durations_take_units() {
        let parse = |text: &str| {
            text.parse::<DurationArg>()
                .map(|duration| duration.0.as_secs())
        };
        assert_eq!(parse("90"), Ok(90));
        assert_eq!(parse("10m"), Ok(600));
        assert_eq!(parse("24h"), Ok(86_400));
        assert_eq!(parse("2d"), Ok(172_800));
        assert!(parse("10 minutes").is_err());
        assert!(parse("m").is_err());
    }
}
