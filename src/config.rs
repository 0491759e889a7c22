//! Settings: command-line flags and `FHIRLOG_*` variables, parsed and checked once at
//! start-up into typed values.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::auth::{AuthArgs, AuthSettings, AuthSettingsError};
use crate::export::ExportSettings;
use crate::fhir::LocalBase;
use crate::fhir::canonical::{DEFAULT_MAX_JSON_DEPTH, MAX_SUPPORTED_JSON_DEPTH};
use crate::sink::{StorageUrl, StorageUrlError};

/// Where the store lives.
#[derive(Debug, Clone, clap::Args)]
pub struct DataDirArgs {
    /// Directory holding the store (`serve` and `load` create it; `export` and `rebuild` need it).
    #[arg(long, env = "FHIRLOG_DATA_DIR", default_value = "./fhirlog-data")]
    pub data_dir: PathBuf,
}

/// Limits on what one request may carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::Args)]
pub struct RequestLimits {
    /// Largest accepted request body, in bytes; larger bodies get 413.
    #[arg(long, env = "FHIRLOG_MAX_BODY_BYTES", default_value_t = RequestLimits::default().max_body_bytes)]
    pub max_body_bytes: usize,
    /// Deepest accepted JSON nesting in a resource.
    #[arg(long, env = "FHIRLOG_MAX_JSON_DEPTH", default_value_t = RequestLimits::default().max_json_depth)]
    pub max_json_depth: usize,
    /// A request body must arrive whole within this long; a slower one gets 408.
    #[arg(long, env = "FHIRLOG_BODY_TIMEOUT", default_value_t = RequestLimits::default().body_timeout)]
    pub body_timeout: DurationArg,
}

impl Default for RequestLimits {
    fn default() -> Self {
        RequestLimits {
            max_body_bytes: 16 * 1024 * 1024,
            max_json_depth: DEFAULT_MAX_JSON_DEPTH,
            body_timeout: DurationArg(Duration::from_secs(120)),
        }
    }
}

/// How the listener admits connections: `serve` flags.
#[derive(Debug, Clone, clap::Args)]
pub struct FrontDoorArgs {
    /// Most connections served at once; more wait until one closes.
    #[arg(long, env = "FHIRLOG_MAX_CONNECTIONS", default_value_t = FrontDoorSettings::default().max_connections)]
    pub max_connections: usize,
    /// A client must finish a TLS handshake and send each request's headers within this
    /// long, and is dropped when it stops reading a response for this long.
    #[arg(long, env = "FHIRLOG_HEADER_TIMEOUT", default_value_t = DurationArg(FrontDoorSettings::default().header_timeout))]
    pub header_timeout: DurationArg,
    /// PEM certificate chain: serve HTTPS (TLS 1.2 and 1.3) instead of HTTP.
    #[arg(long, env = "FHIRLOG_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "FHIRLOG_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
}

/// The certificate chain and private key files HTTPS is served with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub certificate_chain: PathBuf,
    pub private_key: PathBuf,
}

/// How the listener admits connections and how long it waits for request heads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontDoorSettings {
    pub max_connections: usize,
    pub header_timeout: Duration,
    /// `None` serves plain HTTP.
    pub tls: Option<TlsFiles>,
}

impl Default for FrontDoorSettings {
    fn default() -> Self {
        FrontDoorSettings {
            max_connections: 1024,
            header_timeout: Duration::from_secs(30),
            tls: None,
        }
    }
}

impl FrontDoorArgs {
    pub fn into_settings(self) -> FrontDoorSettings {
        FrontDoorSettings {
            max_connections: self.max_connections,
            header_timeout: self.header_timeout.0,
            tls: self
                .tls_cert
                .zip(self.tls_key)
                .map(|(certificate_chain, private_key)| TlsFiles {
                    certificate_chain,
                    private_key,
                }),
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

/// The largest whole unit: `600s` shows as `10m`, so `--help` prints the defaults as written.
impl fmt::Display for DurationArg {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let seconds = self.0.as_secs();
        for (unit, unit_seconds) in [("d", 86_400), ("h", 3600), ("m", 60)] {
            if seconds > 0 && seconds.is_multiple_of(unit_seconds) {
                return write!(formatter, "{}{unit}", seconds / unit_seconds);
            }
        }
        write!(formatter, "{seconds}s")
    }
}

/// How one export runs: the flags `serve` and `fhirlog export` share.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportRunArgs {
    /// Export worker threads (default: one per core).
    #[arg(long, env = "FHIRLOG_WORKERS")]
    pub workers: Option<usize>,
    /// Most resources in one output file.
    #[arg(long, env = "FHIRLOG_MAX_RESOURCES_PER_FILE", default_value_t = ExportSettings::default().max_resources_per_file)]
    pub max_resources_per_file: u64,
    /// Patient and Group exports also hold the resources outside the Patient compartment
    /// that their records reference (includeAssociatedData=_referenced), unless a kick-off
    /// names its own includeAssociatedData.
    #[arg(long, env = "FHIRLOG_INCLUDE_REFERENCED")]
    pub include_referenced: bool,
}

/// How the server keeps export jobs: `serve` only.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportJobArgs {
    /// A job that makes no progress for this long is failed.
    #[arg(long, env = "FHIRLOG_JOB_TIMEOUT", default_value_t = DurationArg(ExportSettings::default().job_timeout))]
    pub job_timeout: DurationArg,
    /// Most queued or running exports; more kick-offs get 429.
    #[arg(long, env = "FHIRLOG_MAX_JOBS", default_value_t = ExportSettings::default().max_jobs)]
    pub max_jobs: usize,
    /// How long finished exports and their files are kept (at most 10 years).
    #[arg(long, env = "FHIRLOG_RETENTION", default_value_t = DurationArg(ExportSettings::default().retention))]
    pub retention: DurationArg,
    /// Most completed exports kept at once; more kick-offs get 429 until one is deleted
    /// or expires.
    #[arg(long, env = "FHIRLOG_MAX_RETAINED_EXPORTS", default_value_t = ExportSettings::default().max_retained_exports)]
    pub max_retained_exports: usize,
    /// Most bytes of completed exports kept at once (no limit unless given); more
    /// kick-offs get 507 until an export is deleted or expires.
    #[arg(long, env = "FHIRLOG_MAX_EXPORT_BYTES")]
    pub max_export_bytes: Option<u64>,
    /// Most queued or running exports of one client (--auth token or smart).
    #[arg(long, env = "FHIRLOG_MAX_JOBS_PER_CLIENT", default_value_t = ExportSettings::default().max_jobs_per_client)]
    pub max_jobs_per_client: usize,
    /// Most completed exports of one client kept at once.
    #[arg(long, env = "FHIRLOG_MAX_RETAINED_EXPORTS_PER_CLIENT", default_value_t = ExportSettings::default().max_retained_exports_per_client)]
    pub max_retained_exports_per_client: usize,
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
    #[arg(long, env = "FHIRLOG_DESTINATION_TIMEOUT", default_value_t = DurationArg(ExportSettings::default().destination_timeout))]
    pub destination_timeout: DurationArg,
    /// Put pre-signed S3 / SAS URLs valid this long (at most 7 days) in manifests instead of
    /// server URLs.
    #[arg(long, env = "FHIRLOG_SIGNED_URLS")]
    pub signed_urls: Option<DurationArg>,
}

impl ExportRunArgs {
    /// The engine settings for a one-shot `fhirlog export`: these flags over the defaults;
    /// absolute references under `base_url` name resources of the store.
    pub fn one_shot_settings(&self, base_url: Option<&BaseUrl>) -> ExportSettings {
        let defaults = ExportSettings::default();
        ExportSettings {
            workers: self.workers.unwrap_or(defaults.workers),
            max_resources_per_file: self.max_resources_per_file,
            max_jobs: 1,
            include_referenced: self.include_referenced,
            local_base: base_url.map_or_else(LocalBase::relative_only, BaseUrl::local_base),
            ..defaults
        }
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
    pub front_door: FrontDoorArgs,
    #[command(flatten)]
    pub export_run: ExportRunArgs,
    #[command(flatten)]
    pub export_jobs: ExportJobArgs,
    #[command(flatten)]
    pub storage: StorageArgs,
    #[command(flatten)]
    pub auth: AuthArgs,
}

/// A base URL such as `http://127.0.0.1:8080/fhir`, without a trailing slash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseUrl(String);

/// Why the settings were refused at start-up; each is one line naming the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SettingsError {
    #[error("--listen '{0}' is not an address like 127.0.0.1:8080")]
    BadListenAddress(String),
    #[error("--base-url '{0}' must be an absolute http:// or https:// URL")]
    BadBaseUrl(String),
    #[error("size, count and worker limits must be greater than zero")]
    ZeroLimit,
    #[error("{flag} must be longer than zero")]
    ZeroDuration { flag: &'static str },
    #[error("{flag} {given} is more than the most allowed, {limit}")]
    LimitTooLarge {
        flag: &'static str,
        given: usize,
        limit: usize,
    },
    #[error("{flag} {given} is longer than the most allowed, {limit}")]
    DurationTooLong {
        flag: &'static str,
        given: DurationArg,
        limit: DurationArg,
    },
    #[error("--max-json-depth {given} is deeper than the most supported, {limit}")]
    JsonDepthTooDeep { given: usize, limit: usize },
    #[error(transparent)]
    Storage(StorageUrlError),
    #[error(transparent)]
    Auth(#[from] AuthSettingsError),
}

/// Most `--max-connections`: each holds a socket and buffers.
pub const MAX_CONNECTIONS_LIMIT: usize = 1_000_000;
/// Longest `--retention`: beyond it an expiry instant is no longer meaningful.
pub const MAX_RETENTION: Duration = Duration::from_secs(10 * 366 * 86_400);
/// Longest `--signed-urls`: S3 refuses pre-signed URLs valid for more than 7 days.
pub const MAX_SIGNED_URL_VALIDITY: Duration = Duration::from_secs(7 * 86_400);

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

    /// `http://{address}/fhir`, or `https://…` when served over TLS.
    pub fn for_listen_address(address: SocketAddr, tls: bool) -> BaseUrl {
        let scheme = if tls { "https" } else { "http" };
        BaseUrl(format!("{scheme}://{address}/fhir"))
    }

    /// References under this base name resources of this server.
    pub fn local_base(&self) -> LocalBase {
        LocalBase::at(&self.0)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The token endpoint `/auth/token` beside the FHIR base: the base without its
    /// `/fhir` path, or the origin when the base ends otherwise.
    pub fn token_endpoint(&self) -> String {
        let root = self.0.strip_suffix("/fhir").unwrap_or_else(|| {
            let after_scheme = self.0.find("://").map_or(0, |index| index + 3);
            self.0[after_scheme..]
                .find('/')
                .map_or(&self.0[..], |slash| &self.0[..after_scheme + slash])
        });
        format!("{root}/auth/token")
    }
}

/// Where export files go, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageSettings {
    pub url: StorageUrl,
    /// Create a missing container (the default one included) instead of refusing.
    pub create_containers: bool,
    /// When set, manifests carry pre-signed storage URLs valid this long.
    pub signed_url_ttl: Option<Duration>,
}

impl StorageSettings {
    /// Local folders under `{data_dir}/exports`, created as needed; no signed URLs.
    pub fn local_under(data_dir: &Path) -> StorageSettings {
        StorageSettings {
            url: StorageUrl::File {
                root: data_dir.join("exports"),
            },
            create_containers: true,
            signed_url_ttl: None,
        }
    }
}

/// Everything the app root needs to build a server.
#[derive(Debug, Clone)]
pub struct AppSettings {
    pub data_dir: PathBuf,
    /// Port 0 picks a free port.
    pub listen: SocketAddr,
    /// `None` means derived from the bound address (so port 0 works).
    pub base_url: Option<BaseUrl>,
    pub limits: RequestLimits,
    pub front_door: FrontDoorSettings,
    pub exports: ExportSettings,
    pub storage: StorageSettings,
    pub auth: AuthSettings,
}

impl AppSettings {
    /// A server on a free local port over the store in `data_dir`, with default limits and
    /// export settings, writing exports under `{data_dir}/exports`.
    pub fn local(data_dir: &Path) -> AppSettings {
        AppSettings {
            data_dir: data_dir.to_path_buf(),
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            base_url: None,
            limits: RequestLimits::default(),
            front_door: FrontDoorSettings::default(),
            exports: ExportSettings::default(),
            storage: StorageSettings::local_under(data_dir),
            auth: AuthSettings::open(),
        }
    }

    /// The public base URL when serving on `bound`: `--base-url`, or derived from `bound`.
    pub fn public_base_url(&self, bound: SocketAddr) -> BaseUrl {
        self.base_url
            .clone()
            .unwrap_or_else(|| BaseUrl::for_listen_address(bound, self.front_door.tls.is_some()))
    }

    /// Refuses limits of zero, zero durations and durations past their maximum.
    pub fn validate(&self) -> Result<(), SettingsError> {
        if self.limits.max_body_bytes == 0
            || self.limits.max_json_depth == 0
            || self.front_door.max_connections == 0
        {
            return Err(SettingsError::ZeroLimit);
        }
        if self.front_door.max_connections > MAX_CONNECTIONS_LIMIT {
            return Err(SettingsError::LimitTooLarge {
                flag: "--max-connections",
                given: self.front_door.max_connections,
                limit: MAX_CONNECTIONS_LIMIT,
            });
        }
        check_duration("--body-timeout", self.limits.body_timeout.0, Duration::MAX)?;
        check_duration(
            "--header-timeout",
            self.front_door.header_timeout,
            Duration::MAX,
        )?;
        if self.limits.max_json_depth > MAX_SUPPORTED_JSON_DEPTH {
            return Err(SettingsError::JsonDepthTooDeep {
                given: self.limits.max_json_depth,
                limit: MAX_SUPPORTED_JSON_DEPTH,
            });
        }
        validate_export_settings(&self.exports)?;
        self.auth.check_exposure(self.listen)?;
        if let Some(ttl) = self.storage.signed_url_ttl {
            check_duration("--signed-urls", ttl, MAX_SIGNED_URL_VALIDITY)?;
        }
        Ok(())
    }
}

/// Refuses what would make the engine misbehave: zero limits, zero timeouts, and a
/// retention so long that expiry instants overflow.
pub fn validate_export_settings(settings: &ExportSettings) -> Result<(), SettingsError> {
    if settings.workers == 0
        || settings.max_resources_per_file == 0
        || settings.max_jobs == 0
        || settings.max_retained_exports == 0
        || settings.max_export_bytes == Some(0)
        || settings.max_jobs_per_client == 0
        || settings.max_retained_exports_per_client == 0
    {
        return Err(SettingsError::ZeroLimit);
    }
    check_duration("--job-timeout", settings.job_timeout, Duration::MAX)?;
    check_duration("--retention", settings.retention, MAX_RETENTION)?;
    check_duration(
        "--destination-timeout",
        settings.destination_timeout,
        Duration::MAX,
    )
}

fn check_duration(
    flag: &'static str,
    given: Duration,
    limit: Duration,
) -> Result<(), SettingsError> {
    if given.is_zero() {
        return Err(SettingsError::ZeroDuration { flag });
    }
    if given > limit {
        return Err(SettingsError::DurationTooLong {
            flag,
            given: DurationArg(given),
            limit: DurationArg(limit),
        });
    }
    Ok(())
}

/// Validated settings for `serve`.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub app: AppSettings,
    pub load_paths: Vec<PathBuf>,
}

impl ServeArgs {
    pub fn into_settings(self) -> Result<ServeSettings, SettingsError> {
        let listen: SocketAddr = self
            .listen
            .parse()
            .map_err(|_| SettingsError::BadListenAddress(self.listen.clone()))?;
        let base_url = self.base_url.as_deref().map(BaseUrl::parse).transpose()?;
        let data_dir = self.data_dir.data_dir;
        let url = match &self.storage.storage {
            Some(text) => StorageUrl::parse(text).map_err(SettingsError::Storage)?,
            None => StorageUrl::File {
                root: data_dir.join("exports"),
            },
        };
        let app = AppSettings {
            listen,
            base_url,
            limits: self.limits,
            front_door: self.front_door.into_settings(),
            exports: ExportSettings {
                workers: self
                    .export_run
                    .workers
                    .unwrap_or(ExportSettings::default().workers),
                max_resources_per_file: self.export_run.max_resources_per_file,
                job_timeout: self.export_jobs.job_timeout.0,
                max_jobs: self.export_jobs.max_jobs,
                retention: self.export_jobs.retention.0,
                destination_timeout: self.storage.destination_timeout.0,
                max_retained_exports: self.export_jobs.max_retained_exports,
                max_export_bytes: self.export_jobs.max_export_bytes,
                max_jobs_per_client: self.export_jobs.max_jobs_per_client,
                max_retained_exports_per_client: self.export_jobs.max_retained_exports_per_client,
                local_base: LocalBase::relative_only(),
                include_referenced: self.export_run.include_referenced,
            },
            storage: StorageSettings {
                url,
                create_containers: self.storage.create_containers,
                signed_url_ttl: self.storage.signed_urls.map(|ttl| ttl.0),
            },
            auth: self.auth.into_settings()?,
            data_dir,
        };
        app.validate()?;
        Ok(ServeSettings {
            app,
            load_paths: self.load,
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
    fn the_token_endpoint_sits_beside_the_fhir_base() {
        let endpoint = |base: &str| BaseUrl::parse(base).unwrap().token_endpoint();
        assert_eq!(
            endpoint("http://127.0.0.1:8080/fhir"),
            "http://127.0.0.1:8080/auth/token"
        );
        assert_eq!(
            endpoint("https://example.org/r4/fhir/"),
            "https://example.org/r4/auth/token"
        );
        assert_eq!(
            endpoint("https://example.org/r4"),
            "https://example.org/auth/token"
        );
        assert_eq!(
            endpoint("https://example.org"),
            "https://example.org/auth/token"
        );
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

    #[test]
    fn durations_display_as_they_parse() {
        for text in ["90s", "10m", "2h", "1d", "0s"] {
            assert_eq!(text.parse::<DurationArg>().unwrap().to_string(), text);
        }
        assert_eq!("24h".parse::<DurationArg>().unwrap().to_string(), "1d");
    }

    #[test]
    fn zero_and_absurd_durations_are_refused_naming_the_flag() {
        let data_dir = Path::new("/tmp/fhirlog-settings-test");
        let refusal = |change: &dyn Fn(&mut AppSettings)| {
            let mut settings = AppSettings::local(data_dir);
            change(&mut settings);
            settings.validate().unwrap_err().to_string()
        };
        assert!(AppSettings::local(data_dir).validate().is_ok());
        let zero = Duration::ZERO;
        assert_eq!(
            refusal(&|settings| settings.exports.job_timeout = zero),
            "--job-timeout must be longer than zero"
        );
        assert_eq!(
            refusal(&|settings| settings.exports.retention = zero),
            "--retention must be longer than zero"
        );
        assert_eq!(
            refusal(&|settings| settings.exports.destination_timeout = zero),
            "--destination-timeout must be longer than zero"
        );
        let century = Duration::from_secs(100 * 365 * 86_400);
        let too_long = refusal(&|settings| settings.exports.retention = century);
        assert!(
            too_long.starts_with("--retention 36500d is longer than"),
            "{too_long}"
        );
        let eight_days = Duration::from_secs(8 * 86_400);
        let signed = refusal(&|settings| settings.storage.signed_url_ttl = Some(eight_days));
        assert_eq!(
            signed,
            "--signed-urls 8d is longer than the most allowed, 7d"
        );
        assert_eq!(
            refusal(&|settings| settings.exports.max_jobs = 0),
            SettingsError::ZeroLimit.to_string()
        );
        assert_eq!(
            refusal(&|settings| settings.front_door.max_connections = 0),
            SettingsError::ZeroLimit.to_string()
        );
        assert_eq!(
            refusal(&|settings| settings.front_door.max_connections = usize::MAX),
            format!(
                "--max-connections {} is more than the most allowed, 1000000",
                usize::MAX
            )
        );
        assert_eq!(
            refusal(&|settings| settings.front_door.header_timeout = zero),
            "--header-timeout must be longer than zero"
        );
        assert_eq!(
            refusal(&|settings| settings.limits.body_timeout = DurationArg(zero)),
            "--body-timeout must be longer than zero"
        );
        assert_eq!(
            refusal(&|settings| settings.limits.max_json_depth = 128),
            "--max-json-depth 128 is deeper than the most supported, 127"
        );
    }
}
