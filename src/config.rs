//! Settings: command-line flags and `FHIRLOG_*` variables, parsed and checked once at
//! start-up into typed values.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::fhir::canonical::DEFAULT_MAX_JSON_DEPTH;

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
    #[error("--max-body-bytes and --max-json-depth must be greater than zero")]
    ZeroLimit,
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
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// `None` means derived from the bound address (so port 0 works).
    pub base_url: Option<BaseUrl>,
    pub load_paths: Vec<PathBuf>,
    pub limits: RequestLimits,
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
}
