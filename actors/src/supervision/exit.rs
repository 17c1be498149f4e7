//! The process-exit request: how a child whose policy says `exit` asks the program to stop.
//!
//! The kernel never calls `std::process::exit`. A supervisor that gives up with
//! [`Action::Exit`](super::Action::Exit) records an [`ExitRequest`] here; the program waits
//! on [`ExitHandle::requested`], shuts the whole tree down in order, then exits with the
//! request's code. Tests read the request instead of losing their process.

use std::sync::Arc;

use tokio::sync::watch;

/// A request to end the process once the tree has shut down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitRequest {
    /// The process exit code: 75 (budget spent) or 78 (fatal failure).
    pub code: i32,
    /// The path of the child that gave up.
    pub path: String,
    /// Why it gave up.
    pub reason: String,
}

/// Shared by every supervisor of one tree; the first request wins.
#[derive(Debug, Clone)]
pub struct ExitHandle(Arc<watch::Sender<Option<ExitRequest>>>);

impl Default for ExitHandle {
    fn default() -> Self {
        Self(Arc::new(watch::channel(None).0))
    }
}

impl ExitHandle {
    /// A handle with no request yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records `request` unless an earlier one is already recorded.
    pub fn request(&self, request: ExitRequest) {
        self.0.send_if_modified(|slot| {
            if slot.is_some() {
                return false;
            }
            *slot = Some(request);
            true
        });
    }

    /// The recorded request, if any.
    pub fn get(&self) -> Option<ExitRequest> {
        self.0.borrow().clone()
    }

    /// Waits until a request is recorded.
    pub async fn requested(&self) -> ExitRequest {
        let mut rx = self.0.subscribe();
        loop {
            if let Some(request) = rx.borrow_and_update().clone() {
                return request;
            }
            // The sender lives in `self`, so `changed` cannot fail while we wait.
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}
