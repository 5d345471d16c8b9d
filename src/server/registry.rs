//! Admission and counting of live sessions, shared by all workers.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::telemetry::names;

pub struct SessionRegistry {
    active: AtomicUsize,
    max_sessions: usize,
    /// Woken whenever the count drops to zero (graceful shutdown waits on it).
    drained: Notify,
}

/// Held by a session for its whole life; dropping it releases the slot.
pub struct SessionGuard {
    registry: Arc<SessionRegistry>,
}

impl SessionRegistry {
    pub fn new(max_sessions: usize) -> Arc<Self> {
        Arc::new(Self {
            active: AtomicUsize::new(0),
            max_sessions,
            drained: Notify::new(),
        })
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    pub fn max_sessions(&self) -> usize {
        self.max_sessions
    }

    /// Takes a slot if one is free.
    pub fn try_admit(self: &Arc<Self>) -> Option<SessionGuard> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_sessions).then_some(n + 1)
            })
            .ok()?;
        metrics::gauge!(names::SESSIONS_ACTIVE).increment(1.0);
        metrics::counter!(names::SESSIONS_TOTAL).increment(1);
        Some(SessionGuard {
            registry: Arc::clone(self),
        })
    }

    /// Waits until no session is left, or `timeout` passes; true if drained.
    pub async fn wait_drained(&self, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.drained.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.active() == 0 {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        metrics::gauge!(names::SESSIONS_ACTIVE).decrement(1.0);
        if self.registry.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.registry.drained.notify_waiters();
        }
    }
}
