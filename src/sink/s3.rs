//! S3-compatible buckets (AWS S3, MinIO, moto, …). Credentials come from the standard
//! `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_SESSION_TOKEN` variables.

use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder, AwsAuthorizer, AwsCredential};
use object_store::client::HttpRequestBody;

use super::{
    CloudContainerStores, ContainerName, Destination, OpenedContainer, SinkError, cloud_container,
    open_checked_container, probe_http_client,
};

pub struct S3Destination {
    default_bucket: ContainerName,
    endpoint: Option<String>,
    region: String,
    allow_http: bool,
    create_containers: bool,
    destination_timeout: Duration,
}

impl S3Destination {
    pub fn new(
        default_bucket: ContainerName,
        endpoint: Option<String>,
        region: String,
        allow_http: bool,
        create_containers: bool,
        destination_timeout: Duration,
    ) -> S3Destination {
        S3Destination {
            default_bucket,
            endpoint,
            region,
            allow_http,
            create_containers,
            destination_timeout,
        }
    }

    /// The worker and interactive stores of `bucket`; nothing is contacted.
    fn stores(&self, bucket: &ContainerName) -> Result<CloudContainerStores<AmazonS3>, SinkError> {
        let built = |client_options, retry| {
            self.builder(bucket, client_options, retry)
                .build()
                .map_err(|error| {
                    SinkError::from_object_store(bucket.as_str(), &self.describe(), error)
                })
        };
        CloudContainerStores::build(self.destination_timeout, built)
    }

    fn builder(
        &self,
        bucket: &ContainerName,
        client_options: object_store::ClientOptions,
        retry: object_store::RetryConfig,
    ) -> AmazonS3Builder {
        let mut builder = AmazonS3Builder::from_env()
            .with_client_options(client_options)
            .with_bucket_name(bucket.as_str())
            .with_region(&self.region)
            .with_allow_http(self.allow_http)
            .with_retry(retry);
        if let Some(endpoint) = &self.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_virtual_hosted_style_request(false);
        }
        builder
    }

    fn bucket_url(&self, bucket: &ContainerName) -> String {
        match &self.endpoint {
            Some(endpoint) => format!("{}/{}", endpoint.trim_end_matches('/'), bucket),
            None => format!("https://{bucket}.s3.{}.amazonaws.com", self.region),
        }
    }

    /// `PUT /{bucket}` signed with SigV4.
    async fn create_bucket(&self, bucket: &ContainerName) -> Result<(), SinkError> {
        let destination = self.describe();
        let failure = |reason: String| {
            SinkError::storage_failure(bucket.as_str(), &destination, "S3", reason)
        };
        let credential = AwsCredential {
            key_id: std::env::var("AWS_ACCESS_KEY_ID")
                .map_err(|_| failure("AWS_ACCESS_KEY_ID is not set".to_owned()))?,
            secret_key: std::env::var("AWS_SECRET_ACCESS_KEY")
                .map_err(|_| failure("AWS_SECRET_ACCESS_KEY is not set".to_owned()))?,
            token: std::env::var("AWS_SESSION_TOKEN").ok(),
        };
        let body = if self.region == "us-east-1" {
            String::new()
        } else {
            format!(
                "<CreateBucketConfiguration><LocationConstraint>{}</LocationConstraint></CreateBucketConfiguration>",
                self.region
            )
        };
        let mut request = http::Request::builder()
            .method(http::Method::PUT)
            .uri(self.bucket_url(bucket))
            .body(HttpRequestBody::from(body.clone()))
            .map_err(|error| failure(error.to_string()))?;
        AwsAuthorizer::new(&credential, "s3", &self.region)
            .with_sign_payload(false)
            .try_authorize(&mut request, None)
            .map_err(|error| failure(error.to_string()))?;
        send_signed(request, body, bucket, &destination).await
    }
}

/// Sends a signed container-creation request with short timeouts; 2xx or "already
/// exists" is success.
pub(super) async fn send_signed(
    request: http::Request<HttpRequestBody>,
    body: String,
    container: &ContainerName,
    destination: &str,
) -> Result<(), SinkError> {
    let (parts, _) = request.into_parts();
    let client = probe_http_client(container, destination)?;
    let mut outgoing = client
        .request(parts.method, parts.uri.to_string())
        .body(body);
    for (name, value) in &parts.headers {
        outgoing = outgoing.header(name, value);
    }
    let response = outgoing
        .send()
        .await
        .map_err(|error| SinkError::from_http_client(container.as_str(), destination, error))?;
    let status = response.status();
    if status.is_success() || status == http::StatusCode::CONFLICT {
        return Ok(());
    }
    let text = response.text().await.unwrap_or_default();
    Err(SinkError::storage_failure(
        container.as_str(),
        destination,
        "container creation",
        format!(
            "creating the container answered {status}: {}",
            text.chars().take(300).collect::<String>()
        ),
    ))
}

impl Destination for S3Destination {
    fn describe(&self) -> String {
        match &self.endpoint {
            Some(endpoint) => format!("s3 at {endpoint}"),
            None => format!("s3 in {}", self.region),
        }
    }

    fn default_container(&self) -> ContainerName {
        self.default_bucket.clone()
    }

    fn open_container(
        &self,
        bucket: &ContainerName,
        runtime: &tokio::runtime::Handle,
    ) -> Result<OpenedContainer, SinkError> {
        open_checked_container(
            self.stores(bucket)?,
            bucket,
            self,
            self.create_containers,
            runtime,
            self.create_bucket(bucket),
        )
    }

    fn attach_container(&self, bucket: &ContainerName) -> Result<OpenedContainer, SinkError> {
        Ok(cloud_container(self.stores(bucket)?, self.describe()))
    }
}
