//! `fhirlog serve`: open the store, load what was asked, and serve until SIGINT/SIGTERM.

use anyhow::Context;

use std::sync::Arc;

use crate::config::ServeSettings;
use crate::export::ExportEngine;
use crate::http::ServerParts;
use crate::load::{LoadOptions, OnError, load};
use crate::sink::{ContainerName, StorageUrl};
use crate::store::{Store, StoreOptions};

/// How long open requests may take to finish after SIGINT/SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

pub fn run(settings: ServeSettings) -> anyhow::Result<()> {
    let store = Store::open(&settings.data_dir, &StoreOptions::default())
        .with_context(|| format!("opening the store in {}", settings.data_dir.display()))?;
    if !settings.load_paths.is_empty() {
        let options = LoadOptions {
            paths: settings.load_paths.clone(),
            on_error: OnError::Abort,
            max_json_depth: settings.limits.max_json_depth,
            show_progress: true,
            max_document_bytes: crate::load::DEFAULT_MAX_DOCUMENT_BYTES,
        };
        let summary = load(&store, &options).context("loading --load inputs")?;
        tracing::info!(
            written = summary.written(),
            unchanged = summary.unchanged(),
            seconds = summary.elapsed.as_secs_f64(),
            "loaded --load inputs"
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("fhirlog-http")
        .build()
        .context("starting the async runtime")?;
    if let StorageUrl::File { root } = &settings.storage {
        let default_folder = root.join(ContainerName::DEFAULT);
        std::fs::create_dir_all(&default_folder)
            .with_context(|| format!("creating {}", default_folder.display()))?;
    }
    let destination = Arc::clone(&settings.destination);
    let default_container = destination.default_container();
    destination
        .open_container(&default_container, runtime.handle())
        .with_context(|| {
            format!(
                "checking export storage {} (container '{default_container}')",
                destination.describe()
            )
        })?;
    let exports = Arc::new(
        ExportEngine::start(
            store.clone(),
            destination,
            settings.exports.clone(),
            runtime.handle().clone(),
        )
        .context("starting the export engine")?,
    );
    let parts = ServerParts {
        store,
        exports: Arc::clone(&exports),
        base_url: settings.base_url,
        limits: settings.limits,
        signed_url_ttl: settings.signed_url_ttl,
    };
    let listen = settings.listen;
    let served = runtime.block_on(async move {
        let (signalled, signal_seen) = tokio::sync::oneshot::channel();
        let shutdown = async move {
            shutdown_signal().await;
            let _ = signalled.send(());
        };
        let (bound, server) = crate::http::bind_parts(parts, listen, shutdown)
            .await
            .with_context(|| format!("listening on {listen}"))?;
        tracing::info!(address = %bound, "fhirlog is serving FHIR R4 at http://{bound}/fhir");
        let grace_expired = async {
            match signal_seen.await {
                Ok(()) => tokio::time::sleep(SHUTDOWN_GRACE).await,
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            () = server => {}
            () = grace_expired => tracing::warn!(
                "requests were still open {}s after the shutdown signal; stopping anyway",
                SHUTDOWN_GRACE.as_secs()
            ),
        }
        Ok::<_, anyhow::Error>(())
    });
    drop(exports);
    drop(runtime);
    served?;
    tracing::info!("shut down cleanly");
    Ok(())
}

/// Resolves on the first SIGINT or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(terminate) => terminate,
                Err(_) => {
                    let _ = interrupt.await;
                    return;
                }
            };
        tokio::select! {
            _ = interrupt => {},
            _ = terminate.recv() => {},
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
    tracing::info!("shutdown signal received; finishing open requests");
}
