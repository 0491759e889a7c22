//! `fhirlog serve`: open the store, load what was asked, and serve until SIGINT/SIGTERM.

use anyhow::Context;

use crate::app::App;
use crate::config::ServeSettings;
use crate::load::{LoadOptions, OnError, load};
use crate::store::{Store, StoreOptions};

/// How long open requests may take to finish after SIGINT/SIGTERM.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

pub fn run(settings: ServeSettings) -> anyhow::Result<()> {
    let app_settings = settings.app;
    let store = Store::open(&app_settings.data_dir, &StoreOptions::default())
        .with_context(|| format!("opening the store in {}", app_settings.data_dir.display()))?;
    if !settings.load_paths.is_empty() {
        let options = LoadOptions {
            paths: settings.load_paths,
            on_error: OnError::Abort,
            max_json_depth: app_settings.limits.max_json_depth,
            show_progress: true,
            max_document_bytes: crate::load::DEFAULT_MAX_DOCUMENT_BYTES,
            local_base: app_settings
                .public_base_url(app_settings.listen)
                .local_base(),
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
    let served = runtime.block_on(async move {
        let app = App::build_on_store(store, app_settings).await?;
        let bound = app.address();
        tracing::info!(address = %bound, "fhirlog is serving FHIR R4 at {}", app.base_url().as_str());
        let (signalled, signal_seen) = tokio::sync::oneshot::channel();
        let shutdown = async move {
            shutdown_signal().await;
            let _ = signalled.send(());
        };
        let grace_expired = async {
            match signal_seen.await {
                Ok(()) => tokio::time::sleep(SHUTDOWN_GRACE).await,
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            () = app.run_until(shutdown) => {}
            () = grace_expired => tracing::warn!(
                "requests were still open {}s after the shutdown signal; stopping anyway",
                SHUTDOWN_GRACE.as_secs()
            ),
        }
        Ok::<_, anyhow::Error>(())
    });
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
