//! Azure Blob containers (Azure Storage, ADLS Gen2 accounts, Azurite). The key comes from
//! `AZURE_STORAGE_ACCOUNT_KEY`; with the emulator, Azurite's well-known development
//! account is used and `AZURITE_BLOB_STORAGE_URL` overrides its endpoint.

use std::time::Duration;

use object_store::azure::{
    AzureAccessKey, AzureAuthorizer, AzureCredential, MicrosoftAzure, MicrosoftAzureBuilder,
};
use object_store::client::HttpRequestBody;

use super::s3::send_signed;
use super::{
    CloudContainerStores, ContainerName, Destination, OpenedContainer, SinkError, cloud_container,
    open_checked_container,
};

/// Azurite's published development account and key.
const EMULATOR_ACCOUNT: &str = "devstoreaccount1";
const EMULATOR_ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
const EMULATOR_DEFAULT_URL: &str = "http://127.0.0.1:10000";

pub struct AzureDestination {
    default_container: ContainerName,
    account: Option<String>,
    emulator: bool,
    create_containers: bool,
    destination_timeout: Duration,
}

impl AzureDestination {
    pub fn new(
        default_container: ContainerName,
        account: Option<String>,
        emulator: bool,
        create_containers: bool,
        destination_timeout: Duration,
    ) -> AzureDestination {
        AzureDestination {
            default_container,
            account,
            emulator,
            create_containers,
            destination_timeout,
        }
    }

    fn account_name(&self) -> String {
        match (&self.account, self.emulator) {
            (Some(account), _) => account.clone(),
            (None, _) => EMULATOR_ACCOUNT.to_owned(),
        }
    }

    fn account_key(&self) -> Result<String, String> {
        if self.emulator
            && self
                .account
                .as_deref()
                .is_none_or(|account| account == EMULATOR_ACCOUNT)
        {
            return Ok(EMULATOR_ACCOUNT_KEY.to_owned());
        }
        std::env::var("AZURE_STORAGE_ACCOUNT_KEY")
            .map_err(|_| "AZURE_STORAGE_ACCOUNT_KEY is not set".to_owned())
    }

    /// The emulator's blob endpoint: `AZURITE_BLOB_STORAGE_URL` or Azurite's default.
    fn emulator_url() -> String {
        std::env::var("AZURITE_BLOB_STORAGE_URL")
            .unwrap_or_else(|_| EMULATOR_DEFAULT_URL.to_owned())
            .trim_end_matches('/')
            .to_owned()
    }

    fn container_url(&self, container: &ContainerName) -> String {
        if self.emulator {
            format!(
                "{}/{}/{container}",
                Self::emulator_url(),
                self.account_name()
            )
        } else {
            format!(
                "https://{}.blob.core.windows.net/{container}",
                self.account_name()
            )
        }
    }

    /// The worker and interactive stores of `container`; nothing is contacted.
    fn stores(
        &self,
        container: &ContainerName,
    ) -> Result<CloudContainerStores<MicrosoftAzure>, SinkError> {
        let built = |client_options, retry| {
            let failure =
                |error| SinkError::from_object_store(container.as_str(), &self.describe(), error);
            self.builder(container, client_options, retry)
                .map_err(|reason| {
                    failure(object_store::Error::Generic {
                        store: "MicrosoftAzure",
                        source: reason.into(),
                    })
                })?
                .build()
                .map_err(failure)
        };
        CloudContainerStores::build(self.destination_timeout, built)
    }

    fn builder(
        &self,
        container: &ContainerName,
        client_options: object_store::ClientOptions,
        retry: object_store::RetryConfig,
    ) -> Result<MicrosoftAzureBuilder, String> {
        let builder = MicrosoftAzureBuilder::new()
            .with_client_options(client_options)
            .with_container_name(container.as_str())
            .with_account(self.account_name())
            .with_access_key(self.account_key()?)
            .with_retry(retry);
        Ok(if self.emulator {
            builder.with_use_emulator(true).with_allow_http(true)
        } else {
            builder
        })
    }

    /// `PUT /{container}?restype=container` signed with the account key.
    async fn create_container(&self, container: &ContainerName) -> Result<(), SinkError> {
        let destination = self.describe();
        let failure = |reason: String| {
            SinkError::storage_failure(container.as_str(), &destination, "MicrosoftAzure", reason)
        };
        let key = AzureAccessKey::try_new(&self.account_key().map_err(failure)?)
            .map_err(|error| failure(error.to_string()))?;
        let credential = AzureCredential::AccessKey(key);
        let account = self.account_name();
        let mut request = http::Request::builder()
            .method(http::Method::PUT)
            .uri(format!(
                "{}?restype=container",
                self.container_url(container)
            ))
            .header(http::header::CONTENT_LENGTH, "0")
            .body(HttpRequestBody::from(String::new()))
            .map_err(|error| failure(error.to_string()))?;
        AzureAuthorizer::new(&credential, &account)
            .try_authorize(&mut request)
            .map_err(|error| failure(error.to_string()))?;
        send_signed(request, String::new(), container, &destination).await
    }
}

impl Destination for AzureDestination {
    fn describe(&self) -> String {
        if self.emulator {
            format!(
                "azure emulator at {} account {}",
                Self::emulator_url(),
                self.account_name()
            )
        } else {
            format!("azure account {}", self.account_name())
        }
    }

    fn default_container(&self) -> ContainerName {
        self.default_container.clone()
    }

    fn open_container(
        &self,
        container: &ContainerName,
        runtime: &tokio::runtime::Handle,
    ) -> Result<OpenedContainer, SinkError> {
        open_checked_container(
            self.stores(container)?,
            container,
            self,
            self.create_containers,
            runtime,
            self.create_container(container),
        )
    }

    fn attach_container(&self, container: &ContainerName) -> Result<OpenedContainer, SinkError> {
        Ok(cloud_container(self.stores(container)?, self.describe()))
    }
}
