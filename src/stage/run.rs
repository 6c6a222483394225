//! `switchboard run`: one process, the stages it was asked for, and the
//! things around them (metrics endpoint, matrix watcher, signals).
//!
//! Shutdown (SIGTERM, ctrl-c, or `--max-events` reached) sets one stop flag:
//! the stage finishes and commits the batch in hand, leaves its group, and
//! the process exits 0.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::escalate::{EscalateStage, EscalateSummary};
use super::route::{RouteStage, RouteSummary};
use crate::clock::{Clock, SystemClock};
use crate::config::{Config, Stage};
use crate::decode::{Decoder, SchemaDir, SchemaSource};
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
    #[error("stage thread failed: {0}")]
    Thread(String),
}

/// What a run did, per stage.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RunSummary {
    pub route: Option<RouteSummary>,
    pub escalate: Option<EscalateSummary>,
}

/// Runs the configured stages until a signal, `--max-events`, or a fatal
/// error, on the system clock.
pub async fn run(config: Config, metrics: Metrics, stop: Arc<AtomicBool>) -> Result<RunSummary, RunError> {
    run_with_clock(config, metrics, stop, Arc::new(SystemClock)).await
}

/// [`run`] with the clock of the caller's choosing (tests drive SLAs with it).
pub async fn run_with_clock(
    config: Config,
    metrics: Metrics,
    stop: Arc<AtomicBool>,
    clock: Arc<dyn Clock>,
) -> Result<RunSummary, RunError> {
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

    let schemas: Arc<dyn SchemaSource> = match &config.schemas_dir {
        Some(dir) => Arc::new(SchemaDir::load(dir).map_err(|e| RunError::Schemas(e.to_string()))?),
        None => Arc::new(SchemaDir::bundled()),
    };
    // Before anything decodes Avro: the bound is process-wide and set once.
    crate::decode::bound_avro_allocations(config.max_record_bytes);
    health.set_alive(true);
    let mut workers = tokio::task::JoinSet::new();
    if matches!(config.stage, Stage::Route | Stage::All) {
        let stage = RouteStage {
            config: config.clone(),
            matrix: matrix.clone(),
            decoder: Decoder::new(schemas.clone(), config.max_record_bytes),
            directory: Arc::new(Directory::default()),
            seen: Arc::new(Default::default()),
            metrics: metrics.clone(),
            health: health.clone(),
            clock: clock.clone(),
        };
        let stop = stop.clone();
        workers.spawn_blocking(move || {
            stage.run(stop).map(|s| RunSummary {
                route: Some(s),
                escalate: None,
            })
        });
    }
    if matches!(config.stage, Stage::Escalate | Stage::All) {
        let stage = EscalateStage {
            config: config.clone(),
            matrix: matrix.clone(),
            schemas: schemas.clone(),
            clock: clock.clone(),
            metrics: metrics.clone(),
            // With both stages in one process, readiness is the route
            // stage's; the escalation stage reports into its own.
            health: if config.stage == Stage::All {
                Health::new()
            } else {
                health.clone()
            },
        };
        let stop = stop.clone();
        workers.spawn_blocking(move || {
            stage.run(stop).map(|s| RunSummary {
                route: None,
                escalate: Some(s),
            })
        });
    }

    // The first stage to finish (max-events, a fatal error) or a signal
    // stops them all; each finishes and commits the batch in hand.
    let mut summary = RunSummary::default();
    let mut first_error = None;
    let mut signalled = false;
    loop {
        tokio::select! {
            next = workers.join_next() => {
                let Some(done) = next else { break };
                stop.store(true, Ordering::Relaxed);
                match done {
                    Ok(Ok(s)) => {
                        summary.route = summary.route.or(s.route);
                        summary.escalate = summary.escalate.or(s.escalate);
                    }
                    Ok(Err(e)) => first_error = first_error.or(Some(RunError::Kafka(e))),
                    Err(e) => first_error = first_error.or(Some(RunError::Thread(e.to_string()))),
                }
            }
            _ = shutdown_signal(), if !signalled => {
                tracing::info!("shutting down: finishing the batch in hand");
                signalled = true;
                stop.store(true, Ordering::Relaxed);
            }
        }
    }
    health.set_alive(false);
    let _ = shutdown_tx.send(true);
    match first_error {
        Some(e) => Err(e),
        None => Ok(summary),
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
