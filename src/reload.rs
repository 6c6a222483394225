//! Hot reload: the live matrix, swapped atomically when its file changes.
//!
//! Workers take an `Arc<Matrix>` per batch, so each event is routed wholly
//! by one version and stamped with it. A reload parses and validates the new
//! file completely first; an invalid one is refused, logged and counted, and
//! the old matrix keeps serving. The file's directory is watched rather than
//! the file, so editors that replace the file and Kubernetes' ConfigMap
//! symlink swap are both seen.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::matrix::{Matrix, MatrixError};
use crate::metrics::Metrics;

pub struct MatrixHandle {
    current: ArcSwap<Matrix>,
    path: PathBuf,
    metrics: Metrics,
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq)]
pub enum Reloaded {
    /// A new version is live.
    Swapped { from: String, to: String },
    /// The file's content has the live version already.
    Unchanged,
}

impl MatrixHandle {
    /// Loads the first matrix; a process does not start on an invalid one.
    pub fn load(path: &Path, metrics: Metrics) -> Result<Arc<MatrixHandle>, MatrixError> {
        let matrix = Matrix::load(path)?;
        metrics.set_matrix_version(&matrix.version);
        metrics.prepare(&matrix);
        Ok(Arc::new(MatrixHandle {
            current: ArcSwap::from_pointee(matrix),
            path: path.to_path_buf(),
            metrics,
        }))
    }

    /// The live matrix.
    pub fn current(&self) -> Arc<Matrix> {
        self.current.load_full()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads and validates the file again: `Some` new matrix when it is valid
    /// and has another version, `None` when unchanged. A refusal is logged and
    /// counted here, and changes nothing.
    pub fn candidate(&self) -> Result<Option<Matrix>, MatrixError> {
        match Matrix::load(&self.path) {
            Ok(matrix) if matrix.version == self.current.load().version => Ok(None),
            Ok(matrix) => Ok(Some(matrix)),
            Err(e) => {
                self.metrics
                    .matrix_reloads_total
                    .with_label_values(&["error"])
                    .inc();
                tracing::error!(error = %e, "matrix reload refused; the previous matrix keeps serving");
                Err(e)
            }
        }
    }

    /// Makes `matrix` the live one, atomically.
    pub fn swap(&self, matrix: Matrix) -> Reloaded {
        let from = self.current.load().version.clone();
        let to = matrix.version.clone();
        self.metrics.prepare(&matrix);
        self.current.store(Arc::new(matrix));
        self.metrics.set_matrix_version(&to);
        self.metrics.matrix_reloads_total.with_label_values(&["ok"]).inc();
        tracing::info!(%from, %to, "matrix reloaded");
        Reloaded::Swapped { from, to }
    }

    /// Reloads without preparing anything for the new version.
    pub fn reload(&self) -> Result<Reloaded, MatrixError> {
        Ok(match self.candidate()? {
            Some(matrix) => self.swap(matrix),
            None => Reloaded::Unchanged,
        })
    }
}

/// Watches the matrix file's directory and SIGHUP until `shutdown`, and on
/// either loads the file again: `prepare` runs on a valid new matrix before it
/// goes live (to create its lane topics), and a failed `prepare` keeps the old
/// matrix.
pub async fn watch<F, Fut>(
    handle: Arc<MatrixHandle>,
    prepare: F,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) where
    F: Fn(Arc<Matrix>) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    use notify::{RecursiveMode, Watcher};
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let file_name = handle.path.file_name().map(|n| n.to_os_string());
    let watched = {
        let tx = tx.clone();
        notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
            // Any change in the directory may be ours (editors rename files,
            // Kubernetes swaps a `..data` symlink); reloading is idempotent.
            if let Ok(event) = event
                && (file_name.is_none() || !event.kind.is_access())
            {
                let _ = tx.send(());
            }
        })
    };
    let dir = handle
        .path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let _watcher = match watched {
        Ok(mut w) => match w.watch(dir, RecursiveMode::NonRecursive) {
            Ok(()) => Some(w),
            Err(e) => {
                tracing::warn!(error = %e, dir = %dir.display(), "cannot watch the matrix directory; SIGHUP still reloads");
                None
            }
        },
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the file watcher; SIGHUP still reloads");
            None
        }
    };
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(s) => s.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = shutdown.changed() => return,
            Some(()) = rx.recv() => {
                // Let a burst of file events settle into one reload.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                while rx.try_recv().is_ok() {}
            }
            _ = hangup => tracing::info!("SIGHUP: reloading the matrix"),
        }
        if let Ok(Some(matrix)) = handle.candidate() {
            let matrix = Arc::new(matrix);
            match prepare(matrix.clone()).await {
                Ok(()) => {
                    handle.swap(Arc::unwrap_or_clone(matrix));
                }
                Err(e) => {
                    handle
                        .metrics
                        .matrix_reloads_total
                        .with_label_values(&["error"])
                        .inc();
                    tracing::error!(error = %e, "new matrix not prepared; the previous matrix keeps serving");
                }
            }
        }
    }
}
