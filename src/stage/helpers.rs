//! Helper threads that share a stage's per-batch work with its loop thread.
//!
//! They start once per run, inside a [`std::thread::scope`] (so the work may
//! borrow the stage), and sleep on a queue between batches. Starting threads
//! per batch cost more than their start: on a busy machine a new thread
//! waited ~1.4 ms for its first turn (Linux places a new thread behind the
//! running ones, and a woken one ahead), and a thread that lives on keeps
//! its allocator's pages warm.

use std::sync::mpsc;
use std::thread::Scope;

type Job<'scope> = Box<dyn FnOnce() + Send + 'scope>;

/// A fixed set of helper threads; dropping it lets them finish (the scope
/// then joins them).
pub struct Helpers<'scope> {
    queues: Vec<mpsc::Sender<Job<'scope>>>,
}

impl<'scope> Helpers<'scope> {
    /// Starts up to `n` helpers named `name-0`, `name-1`…; one the system
    /// refuses to start is left out (the loop thread does its share).
    pub fn start<'env>(scope: &'scope Scope<'scope, 'env>, n: usize, name: &str) -> Self {
        let queues = (0..n)
            .filter_map(|i| {
                let (queue, jobs) = mpsc::channel::<Job<'scope>>();
                let started = std::thread::Builder::new()
                    .name(format!("{name}-{i}"))
                    .spawn_scoped(scope, move || {
                        for job in jobs {
                            job();
                        }
                    });
                match started {
                    Ok(_) => Some(queue),
                    Err(e) => {
                        tracing::warn!(error = %e, "a helper thread did not start; working with fewer");
                        None
                    }
                }
            })
            .collect();
        Helpers { queues }
    }

    /// No helpers: everything on the calling thread.
    pub fn none() -> Self {
        Helpers { queues: Vec::new() }
    }

    /// Helpers for this machine: one per further core, at most `max`.
    pub fn per_core<'env>(scope: &'scope Scope<'scope, 'env>, max: usize, name: &str) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Helpers::start(scope, cores.saturating_sub(1).min(max), name)
    }

    pub fn len(&self) -> usize {
        self.queues.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queues.is_empty()
    }

    /// Runs `work` on helper `i` (modulo their number). Its result comes
    /// back through the receiver; the receiver reports a disconnect if the
    /// work panicked or the helper is gone.
    pub fn run<R: Send + 'scope>(
        &self,
        i: usize,
        work: impl FnOnce() -> R + Send + 'scope,
    ) -> mpsc::Receiver<R> {
        let (reply, result) = mpsc::sync_channel(1);
        if let Some(queue) = self.queues.get(i % self.queues.len().max(1)) {
            // A send fails only when the helper has gone; the receiver then
            // reports the disconnect, as for a panic.
            let _ = queue.send(Box::new(move || {
                let _ = reply.send(work());
            }));
        }
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn work_borrows_from_the_scope_and_runs_on_the_helpers() {
        let data: Vec<u64> = (1..=100).collect();
        let caller = std::thread::current().id();
        std::thread::scope(|scope| {
            let helpers = Helpers::start(scope, 3, "test-helper");
            assert_eq!(helpers.len(), 3);
            for round in 0..5u64 {
                let results: Vec<_> = (0..3)
                    .map(|i| {
                        let data = &data;
                        helpers.run(i, move || {
                            let on = std::thread::current().id();
                            (data[i * 30..(i + 1) * 30].iter().sum::<u64>() * round, on)
                        })
                    })
                    .collect();
                let sums: Vec<(u64, _)> = results.into_iter().map(|r| r.recv().expect("a result")).collect();
                assert_eq!(
                    sums.iter().map(|(s, _)| *s).sum::<u64>(),
                    (1..=90).sum::<u64>() * round
                );
                assert!(sums.iter().all(|(_, on)| *on != caller));
            }
        });
    }

    #[test]
    fn a_panicking_job_is_reported_as_a_disconnect_not_a_hang() {
        let outcome = std::panic::catch_unwind(|| {
            std::thread::scope(|scope| {
                let helpers = Helpers::start(scope, 1, "test-helper");
                let result = helpers.run(0, || -> u32 { panic!("on purpose") });
                assert!(result.recv().is_err());
            })
        });
        // The scope re-raises the helper's panic once it has joined it.
        assert!(outcome.is_err());
    }

    #[test]
    fn without_helpers_a_job_is_a_disconnect() {
        let helpers = Helpers::none();
        assert!(helpers.is_empty());
        assert!(helpers.run(0, || 1).recv().is_err());
    }
}
