//! `switchboard run`: one process, the stages it was asked for, and the
//! things around them (metrics endpoint, matrix watcher, signals).
//!
//! Shutdown (SIGTERM, ctrl-c, or `--max-events` reached) sets one stop flag:
//! the stage finishes and commits the batch in hand, leaves its group, and
//! the process exits 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::route::{RouteStage, RouteSummary};
use crate::config::{Config, Stage};
use crate::decode::{Decoder, SchemaDir};
use crate::enrich::Directory;
use crate::http::{self, Health};
use crate::kafka::{KafkaStageError, ensure_topics};
use crate::matrix::MatrixError;
use crate::metrics::Metrics;
use crate::reload::{self, MatrixHandle};

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("invalid matrix: {0}")]
    Matrix(#[from] MatrixError),
    #[error("{0}")]
    Kafka(#[from] KafkaStageError),
    #[error("schemas: {0}")]
    Schemas(String),
    #[error("metrics endpoint {addr}: {source}")]
    Metrics { addr: String, source: std::io::Error },
    #[error("the {0} stage is not available in this build yet")]
    StageUnavailable(&'static str),
    #[error("stage thread failed: {0}")]
    Thread(String),
}

/// Runs the configured stages until a signal, `--max-events`, or a fatal error.
pub async fn run(config: Config, metrics: Metrics, stop: Arc<AtomicBool>) -> Result<RouteSummary, RunError> {
    if config.stage == Stage::Escalate {
        return Err(RunError::StageUnavailable("escalate"));
    }
    let config = Arc::new(config);
    let health = Health::new();
    let matrix = MatrixHandle::load(&config.matrix_path, metrics.clone())?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);

    if let Some(addr) = &config.metrics_addr {
        let listener = http::bind(addr).await.map_err(|source| RunError::Metrics {
            addr: addr.clone(),
            source,
        })?;
        tracing::info!(addr = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(), "metrics endpoint");
        let mut rx = shutdown_rx.clone();
        tokio::spawn(http::serve(
            listener,
            metrics.clone(),
            health.clone(),
            async move {
                let _ = rx.changed().await;
            },
        ));
    }

    ensure_topics(&config, &matrix.current()).await?;
    {
        let config = config.clone();
        tokio::spawn(reload::watch(
            matrix.clone(),
            move |m| {
                let config = config.clone();
                async move { ensure_topics(&config, &m).await.map_err(|e| e.to_string()) }
            },
            shutdown_rx.clone(),
        ));
    }

    let decoder = match &config.schemas_dir {
        Some(dir) => Decoder::new(
            Arc::new(SchemaDir::load(dir).map_err(|e| RunError::Schemas(e.to_string()))?),
            config.max_record_bytes,
        ),
        None => Decoder::new(Arc::new(SchemaDir::bundled()), config.max_record_bytes),
    };
    let stage = RouteStage {
        config: config.clone(),
        matrix,
        decoder,
        directory: Arc::new(Directory::default()),
        seen: Arc::new(Default::default()),
        metrics,
        health: health.clone(),
    };
    health.set_alive(true);
    let stage_stop = stop.clone();
    let mut worker = tokio::task::spawn_blocking(move || stage.run(stage_stop));

    let result = tokio::select! {
        r = &mut worker => r,
        _ = shutdown_signal() => {
            tracing::info!("shutting down: finishing the batch in hand");
            stop.store(true, Ordering::Relaxed);
            worker.await
        }
    };
    stop.store(true, Ordering::Relaxed);
    health.set_alive(false);
    let _ = shutdown_tx.send(true);
    match result {
        Ok(r) => Ok(r?),
        Err(e) => Err(RunError::Thread(e.to_string())),
    }
}

/// SIGTERM or ctrl-c.
async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
