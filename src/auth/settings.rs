//! The `--auth` flags and what they load at start-up.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::clients::{ClientRegistry, ClientsFileError};
use super::tokens_file::{StaticTokens, TokensFileError};
use crate::sink::{ContainerName, InvalidContainerName};

/// Who may use the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AuthMode {
    /// No access control: only on a loopback address unless `--insecure`.
    None,
    /// Static bearer tokens from `--tokens`.
    Token,
    /// SMART Backend Services: clients from `--clients` get tokens at `/auth/token`.
    Smart,
}

/// Access-control flags of `serve`.
#[derive(Debug, Clone, clap::Args)]
pub struct AuthArgs {
    /// none (loopback only unless --insecure), token (--tokens) or smart (--clients).
    #[arg(long, env = "FHIRLOG_AUTH", value_enum, default_value_t = AuthMode::None)]
    pub auth: AuthMode,
    /// Serve without access control on a non-loopback address (a warning is logged).
    #[arg(long, env = "FHIRLOG_INSECURE")]
    pub insecure: bool,
    /// For --auth token: lines of `TOKEN [expires=INSTANT] SCOPE…`.
    #[arg(long, env = "FHIRLOG_TOKENS")]
    pub tokens: Option<PathBuf>,
    /// For --auth smart: a JSON array of
    /// {"client_id", "scope", "jwks": {"keys": [...]}, "containers": [...]}.
    #[arg(long, env = "FHIRLOG_CLIENTS")]
    pub clients: Option<PathBuf>,
    /// Containers `_container` may name (comma-separated); a client's own "containers"
    /// replace this list. Without either: any name under --auth none, none otherwise.
    #[arg(long, env = "FHIRLOG_CONTAINERS", value_delimiter = ',')]
    pub containers: Vec<String>,
}

/// Who may use the server, loaded and checked.
#[derive(Clone)]
pub enum AuthSettings {
    None {
        /// Serve without access control on a non-loopback address.
        insecure: bool,
        containers: Option<Vec<ContainerName>>,
    },
    Token {
        tokens: std::sync::Arc<StaticTokens>,
        containers: Option<Vec<ContainerName>>,
    },
    Smart {
        clients: std::sync::Arc<ClientRegistry>,
        containers: Option<Vec<ContainerName>>,
    },
}

impl std::fmt::Debug for AuthSettings {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mode = match self {
            AuthSettings::None { .. } => "none",
            AuthSettings::Token { .. } => "token",
            AuthSettings::Smart { .. } => "smart",
        };
        formatter.write_str(mode)
    }
}

/// Why the access-control settings were refused; one line each.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthSettingsError {
    #[error(
        "--auth none would let anyone on the network read every record: listen on a loopback address, use --auth token or smart, or pass --insecure"
    )]
    OpenOnNetwork,
    #[error("--auth {mode} needs {flag} FILE")]
    MissingFile {
        mode: &'static str,
        flag: &'static str,
    },
    #[error("{flag} is only used with --auth {mode}")]
    UnusedFile {
        flag: &'static str,
        mode: &'static str,
    },
    #[error("reading {flag} {path}: {message}")]
    Unreadable {
        flag: &'static str,
        path: String,
        message: String,
    },
    #[error("--tokens {path}: {source}")]
    Tokens {
        path: String,
        source: TokensFileError,
    },
    #[error("--clients {path}: {source}")]
    Clients {
        path: String,
        source: ClientsFileError,
    },
    #[error("--containers: {0}")]
    Container(InvalidContainerName),
}

impl AuthSettings {
    /// No access control, any container (what tests and local use start with).
    pub fn open() -> AuthSettings {
        AuthSettings::None {
            insecure: false,
            containers: None,
        }
    }

    /// Refuses `--auth none` on an address other hosts can reach, unless `--insecure`;
    /// `Ok(true)` when it is allowed only because of `--insecure`.
    pub fn check_exposure(&self, listen: SocketAddr) -> Result<bool, AuthSettingsError> {
        match self {
            AuthSettings::None { .. } if listen.ip().is_loopback() => Ok(false),
            AuthSettings::None { insecure: true, .. } => Ok(true),
            AuthSettings::None {
                insecure: false, ..
            } => Err(AuthSettingsError::OpenOnNetwork),
            AuthSettings::Token { .. } | AuthSettings::Smart { .. } => Ok(false),
        }
    }
}

impl AuthArgs {
    /// Reads and checks the tokens or clients file the mode needs.
    pub fn into_settings(self) -> Result<AuthSettings, AuthSettingsError> {
        let containers = if self.containers.is_empty() {
            None
        } else {
            Some(
                self.containers
                    .iter()
                    .map(|name| ContainerName::parse(name.trim()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(AuthSettingsError::Container)?,
            )
        };
        let unused = |flag, mode| Err(AuthSettingsError::UnusedFile { flag, mode });
        match self.auth {
            AuthMode::None => {
                if self.tokens.is_some() {
                    return unused("--tokens", "token");
                }
                if self.clients.is_some() {
                    return unused("--clients", "smart");
                }
                Ok(AuthSettings::None {
                    insecure: self.insecure,
                    containers,
                })
            }
            AuthMode::Token => {
                if self.clients.is_some() {
                    return unused("--clients", "smart");
                }
                let path = self.tokens.ok_or(AuthSettingsError::MissingFile {
                    mode: "token",
                    flag: "--tokens",
                })?;
                let text = read("--tokens", &path)?;
                let tokens =
                    StaticTokens::parse(&text).map_err(|source| AuthSettingsError::Tokens {
                        path: path.display().to_string(),
                        source,
                    })?;
                Ok(AuthSettings::Token {
                    tokens: std::sync::Arc::new(tokens),
                    containers,
                })
            }
            AuthMode::Smart => {
                if self.tokens.is_some() {
                    return unused("--tokens", "token");
                }
                let path = self.clients.ok_or(AuthSettingsError::MissingFile {
                    mode: "smart",
                    flag: "--clients",
                })?;
                let text = read("--clients", &path)?;
                let clients =
                    ClientRegistry::parse(&text).map_err(|source| AuthSettingsError::Clients {
                        path: path.display().to_string(),
                        source,
                    })?;
                Ok(AuthSettings::Smart {
                    clients: std::sync::Arc::new(clients),
                    containers,
                })
            }
        }
    }
}

fn read(flag: &'static str, path: &std::path::Path) -> Result<String, AuthSettingsError> {
    std::fs::read_to_string(path).map_err(|error| AuthSettingsError::Unreadable {
        flag,
        path: path.display().to_string(),
        message: error.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arguments(auth: AuthMode) -> AuthArgs {
        AuthArgs {
            auth,
            insecure: false,
            tokens: None,
            clients: None,
            containers: Vec::new(),
        }
    }

    #[test]
    fn each_mode_needs_its_file_and_no_other() {
        assert_eq!(
            arguments(AuthMode::Token).into_settings().unwrap_err(),
            AuthSettingsError::MissingFile {
                mode: "token",
                flag: "--tokens"
            }
        );
        assert_eq!(
            arguments(AuthMode::Smart).into_settings().unwrap_err(),
            AuthSettingsError::MissingFile {
                mode: "smart",
                flag: "--clients"
            }
        );
        let mut open_with_tokens = arguments(AuthMode::None);
        open_with_tokens.tokens = Some(PathBuf::from("tokens"));
        assert!(matches!(
            open_with_tokens.into_settings(),
            Err(AuthSettingsError::UnusedFile { .. })
        ));
        let mut missing_file = arguments(AuthMode::Token);
        missing_file.tokens = Some(PathBuf::from("/nonexistent/tokens"));
        assert!(matches!(
            missing_file.into_settings(),
            Err(AuthSettingsError::Unreadable { .. })
        ));
        let mut bad_container = arguments(AuthMode::None);
        bad_container.containers = vec!["Not_A_Bucket".to_owned()];
        assert!(matches!(
            bad_container.into_settings(),
            Err(AuthSettingsError::Container(_))
        ));
    }

    #[test]
    fn no_access_control_only_on_loopback_unless_insecure() {
        let loopback: SocketAddr = "127.0.0.1:8080".parse().unwrap();
        let ipv6_loopback: SocketAddr = "[::1]:8080".parse().unwrap();
        let network: SocketAddr = "0.0.0.0:8080".parse().unwrap();
        let open = arguments(AuthMode::None).into_settings().unwrap();
        assert_eq!(open.check_exposure(loopback), Ok(false));
        assert_eq!(open.check_exposure(ipv6_loopback), Ok(false));
        assert_eq!(
            open.check_exposure(network),
            Err(AuthSettingsError::OpenOnNetwork)
        );
        let mut insecure = arguments(AuthMode::None);
        insecure.insecure = true;
        let insecure = insecure.into_settings().unwrap();
        assert_eq!(insecure.check_exposure(network), Ok(true));
    }
}
