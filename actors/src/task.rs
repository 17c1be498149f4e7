//! Tasks with an owner: no task outlives the actor (or state) that spawned it, and a task
//! that ends on its own is reported to that owner.
//!
//! * [`AbortOnDrop`] — a task's [`JoinHandle`] that aborts the task when dropped. An actor
//!   keeps its tasks (and its ractor timers, as [`Timer`]s) in its state, so a stop, a
//!   failure and a kill (which skips `post_stop`) all end them with the state.
//! * [`spawn`] — starts a named task in its owner's span and returns its [`AbortOnDrop`].
//!   When the task returns or panics, it calls the owner's `report` with an [`Ended`]
//!   first; the owner decides what that end means (a pump that already told its actor,
//!   a server that stopped serving, a panic that must fail the actor). A task its owner
//!   aborts is not reported: the owner already knows.
//! * [`watched`] — the same report for a future the owner spawns itself, in a `JoinSet`.
//!
//! The task runs in the span its owner passes (for an actor, its `actor` span), so what the
//! task logs carries the owner's `actor.kind` and `actor.path`; its name is in its report.

use std::any::Any;
use std::fmt;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures_util::FutureExt;
use tokio::task::{JoinError, JoinHandle};
use tracing::Instrument;

/// A task's handle that aborts the task when dropped. Await it to join the task.
#[derive(Debug)]
#[must_use = "dropping an AbortOnDrop aborts its task"]
pub struct AbortOnDrop<T = ()>(JoinHandle<T>);

/// A pending ractor timer (`send_after`, `send_interval`) of an actor taking `M`, cancelled
/// when dropped.
pub type Timer<M> = AbortOnDrop<Result<(), ractor::MessagingErr<M>>>;

impl<T> AbortOnDrop<T> {
    /// Aborts the task now (dropping the handle does the same).
    pub fn abort(&self) {
        self.0.abort();
    }

    /// Whether the task has ended, in any way.
    pub fn is_finished(&self) -> bool {
        self.0.is_finished()
    }
}

impl<T> From<JoinHandle<T>> for AbortOnDrop<T> {
    fn from(handle: JoinHandle<T>) -> Self {
        Self(handle)
    }
}

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl<T> Future for AbortOnDrop<T> {
    type Output = Result<T, JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

/// How a task ended on its own, as told to its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ended {
    /// The name it was spawned with.
    pub task: &'static str,
    /// The panic's message, if it panicked; `None` if it returned.
    pub panic: Option<String>,
}

impl Ended {
    /// Whether the task panicked.
    pub fn panicked(&self) -> bool {
        self.panic.is_some()
    }
}

impl fmt::Display for Ended {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.panic {
            Some(message) => write!(f, "the {} task panicked: {message}", self.task),
            None => write!(f, "the {} task returned", self.task),
        }
    }
}

/// Spawns `future` as task `name` in `span`, owned by the returned handle. When the task
/// returns or panics, `report` is called first (in the task, in `span`); a panic then goes
/// on to the handle as usual.
pub fn spawn<F, R>(
    name: &'static str,
    span: tracing::Span,
    future: F,
    report: R,
) -> AbortOnDrop<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
    R: FnOnce(Ended) + Send + 'static,
{
    tokio::spawn(watched(name, future, report).instrument(span)).into()
}

/// `future`, calling `report` when it returns or panics (then panicking on): for a task its
/// owner spawns into a `JoinSet` (instrument it with the owner's span).
pub async fn watched<F, R>(name: &'static str, future: F, report: R) -> F::Output
where
    F: Future,
    R: FnOnce(Ended),
{
    match AssertUnwindSafe(future).catch_unwind().await {
        Ok(output) => {
            report(Ended {
                task: name,
                panic: None,
            });
            output
        }
        Err(payload) => {
            report(Ended {
                task: name,
                panic: Some(panic_message(payload.as_ref())),
            });
            std::panic::resume_unwind(payload)
        }
    }
}

/// The text of a panic's payload (`panic!` with a literal or a format string).
fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a non-string panic payload".to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::*;

    fn recorder() -> (Arc<Mutex<Vec<Ended>>>, impl FnOnce(Ended) + Send + 'static) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let report = move |ended| sink.lock().expect("lock").push(ended);
        (seen, report)
    }

    #[tokio::test]
    async fn a_returning_task_is_reported_and_joined() {
        let (seen, report) = recorder();
        let task = spawn("adder", tracing::Span::none(), async { 1 + 1 }, report);
        assert_eq!(task.await.expect("joined"), 2);
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(
            seen,
            vec![Ended {
                task: "adder",
                panic: None
            }]
        );
        assert_eq!(seen[0].to_string(), "the adder task returned");
    }

    #[tokio::test]
    async fn a_panicking_task_is_reported_with_its_message_and_still_panics() {
        let (seen, report) = recorder();
        let task = spawn(
            "pump",
            tracing::Span::none(),
            async { panic!("boom {}", 7) },
            report,
        );
        assert!(task.await.is_err_and(|e| e.is_panic()));
        let seen = seen.lock().expect("lock").clone();
        assert_eq!(seen.len(), 1);
        assert!(seen[0].panicked());
        assert_eq!(seen[0].to_string(), "the pump task panicked: boom 7");
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_handle_aborts_the_task_unreported() {
        let (seen, report) = recorder();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = spawn(
            "sleeper",
            tracing::Span::none(),
            async move {
                let _tx = tx;
                tokio::time::sleep(Duration::from_secs(3600)).await;
            },
            report,
        );
        drop(task);
        // The sender is dropped with the aborted task.
        assert!(rx.await.is_err());
        assert!(seen.lock().expect("lock").is_empty());
    }
}
