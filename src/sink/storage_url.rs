//! `--storage URL`: which destination exports go to.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use super::{AzureDestination, ContainerName, Destination, LocalDestination, S3Destination};

/// A parsed `--storage` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageUrl {
    /// `file:///path`: containers are directories under `path`.
    File { root: PathBuf },
    /// `s3://BUCKET?endpoint=…&region=…&allow_http=true`.
    S3 {
        bucket: ContainerName,
        endpoint: Option<String>,
        region: String,
        allow_http: bool,
    },
    /// `az://CONTAINER?account=NAME` or `az://CONTAINER?emulator=true`.
    Azure {
        container: ContainerName,
        account: Option<String>,
        emulator: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--storage '{url}': {reason}")]
pub struct StorageUrlError {
    pub url: String,
    pub reason: String,
}

impl StorageUrl {
    pub fn parse(text: &str) -> Result<StorageUrl, StorageUrlError> {
        let fail = |reason: String| StorageUrlError {
            url: text.to_owned(),
            reason,
        };
        let (scheme, rest) = text.split_once("://").ok_or_else(|| {
            fail("expected file:///path, s3://bucket?… or az://container?…".to_owned())
        })?;
        let (authority, query) = rest.split_once('?').unwrap_or((rest, ""));
        let mut options: Vec<(String, String)> = form_urlencoded::parse(query.as_bytes())
            .map(|(name, value)| (name.into_owned(), value.into_owned()))
            .collect();
        let mut take = |name: &str| {
            options
                .iter()
                .position(|(option, _)| option == name)
                .map(|index| options.remove(index).1)
        };
        let flag = |value: Option<String>, name: &str| match value.as_deref() {
            None | Some("false") => Ok(false),
            Some("true") => Ok(true),
            Some(other) => Err(fail(format!("{name} must be true or false, not '{other}'"))),
        };
        let storage = match scheme {
            "file" => {
                if authority.is_empty() || !authority.starts_with('/') {
                    return Err(fail(
                        "a file URL needs an absolute path: file:///path".to_owned(),
                    ));
                }
                StorageUrl::File {
                    root: PathBuf::from(authority),
                }
            }
            "s3" => StorageUrl::S3 {
                bucket: ContainerName::parse(authority).map_err(|error| fail(error.to_string()))?,
                endpoint: take("endpoint"),
                region: take("region").unwrap_or_else(|| "us-east-1".to_owned()),
                allow_http: flag(take("allow_http"), "allow_http")?,
            },
            "az" => {
                let account = take("account");
                let emulator = flag(take("emulator"), "emulator")?;
                if account.is_none() && !emulator {
                    return Err(fail(
                        "an az:// URL needs ?account=NAME (or ?emulator=true for Azurite)"
                            .to_owned(),
                    ));
                }
                StorageUrl::Azure {
                    container: ContainerName::parse(authority)
                        .map_err(|error| fail(error.to_string()))?,
                    account,
                    emulator,
                }
            }
            other => {
                return Err(fail(format!(
                    "unknown scheme '{other}'; use file, s3 or az"
                )));
            }
        };
        if let Some((unknown, _)) = options.first() {
            return Err(fail(format!("unknown option '{unknown}'")));
        }
        Ok(storage)
    }

    /// The destination this URL names; nothing is contacted yet. `create_containers`
    /// lets an export create a missing container; `destination_timeout` bounds the retries
    /// of a cloud client.
    pub fn into_destination(
        self,
        create_containers: bool,
        destination_timeout: Duration,
    ) -> Arc<dyn Destination> {
        match self {
            StorageUrl::File { root } => Arc::new(LocalDestination::new(root, create_containers)),
            StorageUrl::S3 {
                bucket,
                endpoint,
                region,
                allow_http,
            } => Arc::new(S3Destination::new(
                bucket,
                endpoint,
                region,
                allow_http,
                create_containers,
                destination_timeout,
            )),
            StorageUrl::Azure {
                container,
                account,
                emulator,
            } => Arc::new(AzureDestination::new(
                container,
                account,
                emulator,
                create_containers,
                destination_timeout,
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_backend_and_rejects_mistakes() {
        assert_eq!(
            StorageUrl::parse("file:///var/exports").unwrap(),
            StorageUrl::File {
                root: PathBuf::from("/var/exports")
            }
        );
        assert_eq!(
            StorageUrl::parse(
                "s3://bulk-out?endpoint=http://127.0.0.1:9000&region=us-east-1&allow_http=true"
            )
            .unwrap(),
            StorageUrl::S3 {
                bucket: ContainerName::parse("bulk-out").unwrap(),
                endpoint: Some("http://127.0.0.1:9000".to_owned()),
                region: "us-east-1".to_owned(),
                allow_http: true,
            }
        );
        assert_eq!(
            StorageUrl::parse("az://exports?emulator=true").unwrap(),
            StorageUrl::Azure {
                container: ContainerName::parse("exports").unwrap(),
                account: None,
                emulator: true,
            }
        );
        let local = StorageUrl::parse("file:///var/exports")
            .unwrap()
            .into_destination(false, Duration::from_secs(1));
        assert_eq!(local.describe(), "file:///var/exports");
        for bad in [
            "exports",
            "file://relative",
            "s3://Bad_Bucket",
            "s3://bucket?allow_http=yes",
            "az://exports",
            "gs://bucket",
            "s3://bucket?endpont=http://x",
        ] {
            assert!(StorageUrl::parse(bad).is_err(), "{bad}");
        }
    }
}
