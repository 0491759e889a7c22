//! The composition root: the one place that builds the store, the export destination, the
//! export engine and the routes, and binds the listener. `serve`, `fhirlog export`, the
//! tests and the benches all start the app through here.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use crate::auth::Authorizer;
use crate::config::{AppSettings, BaseUrl, SettingsError, StorageSettings};
use crate::export::{ExportEngine, ExportError, ExportSettings};
use crate::http::AppState;
use crate::http::front_door::{FrontDoor, TlsSetupError, tls_acceptor};
use crate::search::registry::SearchParameterRegistry;
use crate::sink::{ContainerName, StorageUrl};
use crate::store::{Store, StoreError, StoreOptions};

/// Why the app could not start.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Settings(#[from] SettingsError),
    #[error("opening the store in {}", data_dir.display())]
    Store {
        data_dir: PathBuf,
        source: StoreError,
    },
    #[error("creating the export folder {}", folder.display())]
    ExportFolder {
        folder: PathBuf,
        source: std::io::Error,
    },
    /// The default container could not be opened; the message names the destination,
    /// the container and the cause.
    #[error("{}", .0.operator_message())]
    ExportStorage(ExportError),
    #[error("starting the export engine")]
    Exports(#[source] ExportError),
    #[error(transparent)]
    Tls(#[from] TlsSetupError),
    #[error("listening on {address}")]
    Listen {
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("a start-up task stopped")]
    StartUpTask(#[from] tokio::task::JoinError),
}

/// The store and the export engine writing to the configured destination: what the
/// server and `fhirlog export` share.
pub struct ExportServices {
    pub store: Store,
    pub exports: Arc<ExportEngine>,
}

impl ExportServices {
    /// Builds the destination, checks its default container (a local one is always
    /// created, others only when allowed) and starts the engine, which resumes unfinished
    /// persisted jobs. Blocking: call from a blocking thread; `runtime` drives the
    /// destination's I/O.
    pub fn start(
        store: Store,
        storage: &StorageSettings,
        exports: ExportSettings,
        runtime: tokio::runtime::Handle,
    ) -> Result<ExportServices, AppError> {
        if let StorageUrl::File { root } = &storage.url {
            let folder = root.join(ContainerName::DEFAULT);
            std::fs::create_dir_all(&folder)
                .map_err(|source| AppError::ExportFolder { folder, source })?;
        }
        let destination = storage
            .url
            .clone()
            .into_destination(storage.create_containers, exports.destination_timeout);
        let engine = ExportEngine::start(store.clone(), destination, exports, runtime)
            .map_err(AppError::Exports)?;
        engine
            .open_default_container()
            .map_err(AppError::ExportStorage)?;
        Ok(ExportServices {
            store,
            exports: Arc::new(engine),
        })
    }
}

/// A built server: the listener is bound, nothing is served until [`App::run_until`].
pub struct App {
    state: Arc<AppState>,
    front_door: FrontDoor,
    address: SocketAddr,
}

impl App {
    /// Validates `settings`, opens (or creates) the store in `settings.data_dir` and builds
    /// the app over it. Call inside a tokio runtime; blocking steps run on blocking threads.
    pub async fn build(settings: AppSettings) -> Result<App, AppError> {
        settings.validate()?;
        let data_dir = settings.data_dir.clone();
        let store = tokio::task::spawn_blocking(move || {
            Store::open(&data_dir, &StoreOptions::default())
                .map_err(|source| AppError::Store { data_dir, source })
        })
        .await??;
        App::build_on_store(store, settings).await
    }

    /// Builds the app over an open `store` (`settings.data_dir` is not opened again).
    pub async fn build_on_store(store: Store, settings: AppSettings) -> Result<App, AppError> {
        settings.validate()?;
        tokio::task::spawn_blocking(|| SearchParameterRegistry::r4().compile_every_expression());
        let tls = match settings.front_door.tls.clone() {
            Some(files) => Some(tokio::task::spawn_blocking(move || tls_acceptor(&files)).await??),
            None => None,
        };
        let listener = tokio::net::TcpListener::bind(settings.listen)
            .await
            .map_err(|source| AppError::Listen {
                address: settings.listen,
                source,
            })?;
        let address = listener.local_addr().map_err(|source| AppError::Listen {
            address: settings.listen,
            source,
        })?;
        if settings
            .auth
            .check_exposure(address)
            .map_err(SettingsError::from)?
        {
            tracing::warn!(%address, "--insecure: serving without access control on a non-loopback address; anyone who can reach it can read and export every record");
        }
        let base_url = settings.public_base_url(address);
        let runtime = tokio::runtime::Handle::current();
        let storage = settings.storage.clone();
        let mut exports = settings.exports.clone();
        exports.local_base = base_url.local_base();
        let services = tokio::task::spawn_blocking(move || {
            ExportServices::start(store, &storage, exports, runtime)
        })
        .await??;
        let auth = Authorizer::new(settings.auth, base_url.token_endpoint());
        let state = Arc::new(AppState {
            store: services.store,
            exports: services.exports,
            local_base: base_url.local_base(),
            base_url,
            limits: settings.limits,
            signed_url_ttl: settings.storage.signed_url_ttl,
            auth,
        });
        Ok(App {
            state,
            front_door: FrontDoor::new(listener, &settings.front_door, tls),
            address,
        })
    }

    /// The address the listener is bound to (the real port when port 0 was asked for).
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// The public base URL of the FHIR endpoint, such as `http://127.0.0.1:8080/fhir`.
    pub fn base_url(&self) -> &BaseUrl {
        &self.state.base_url
    }

    pub fn store(&self) -> &Store {
        &self.state.store
    }

    pub fn exports(&self) -> &Arc<ExportEngine> {
        &self.state.exports
    }

    /// Serves until `shutdown` resolves and open requests finish, then stops the export
    /// engine on a blocking thread (unless a caller still holds it).
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let exports = Arc::clone(&self.state.exports);
        self.front_door.serve(self.state, shutdown).await;
        let _ = tokio::task::spawn_blocking(move || drop(exports)).await;
    }
}
