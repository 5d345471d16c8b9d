//! Admission and counting of live sessions, shared by all workers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use crate::telemetry::names;

pub struct SessionRegistry {
    active: AtomicUsize,
    max_sessions: usize,
    /// Sessions per API key id, for `max_sessions_per_key` (0: unlimited).
    per_key: Mutex<HashMap<String, usize>>,
    max_per_key: usize,
    /// Cluster mode: each key's sessions on the other nodes, as their
    /// leases last said (refreshed every third of a lease).
    elsewhere: Mutex<HashMap<String, usize>>,
    /// Woken whenever the count drops to zero (graceful shutdown waits on it).
    drained: Notify,
}

/// Held by a session for its whole life; dropping it releases the slot.
pub struct SessionGuard {
    registry: Arc<SessionRegistry>,
    key_id: Option<String>,
}

/// A per-key count taken after admission ([`SessionRegistry::admit_key`]).
pub struct KeyGuard {
    registry: Arc<SessionRegistry>,
    key_id: Option<String>,
}

impl Drop for KeyGuard {
    fn drop(&mut self) {
        if let Some(key) = &self.key_id {
            self.registry.release_key(key);
        }
    }
}

/// Why a session was not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    ServerFull,
    KeyFull,
}

impl SessionRegistry {
    pub fn new(max_sessions: usize, max_per_key: usize) -> Arc<Self> {
        Arc::new(Self {
            active: AtomicUsize::new(0),
            max_sessions,
            per_key: Mutex::new(HashMap::new()),
            max_per_key,
            elsewhere: Mutex::new(HashMap::new()),
            drained: Notify::new(),
        })
    }

    pub fn active(&self) -> usize {
        self.active.load(Ordering::Acquire)
    }

    pub fn max_sessions(&self) -> usize {
        self.max_sessions
    }

    pub fn max_per_key(&self) -> usize {
        self.max_per_key
    }

    /// Sessions per key on this node, for the node's lease.
    pub fn per_key_counts(&self) -> HashMap<String, usize> {
        self.per_key
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Cluster mode: what the other nodes hold per key.
    pub fn set_elsewhere(&self, counts: HashMap<String, usize>) {
        *self.elsewhere.lock().unwrap_or_else(|e| e.into_inner()) = counts;
    }

    fn held_elsewhere(&self, key: &str) -> usize {
        self.elsewhere
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Takes a slot if one is free, globally and for the key.
    pub fn try_admit(self: &Arc<Self>, key_id: Option<&str>) -> Result<SessionGuard, Refusal> {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_sessions).then_some(n + 1)
            })
            .map_err(|_| Refusal::ServerFull)?;
        if let (Some(key), true) = (key_id, self.max_per_key > 0) {
            let elsewhere = self.held_elsewhere(key);
            let mut per_key = self.per_key.lock().unwrap_or_else(|e| e.into_inner());
            let count = per_key.entry(key.to_owned()).or_insert(0);
            if *count + elsewhere >= self.max_per_key {
                drop(per_key);
                self.active.fetch_sub(1, Ordering::AcqRel);
                return Err(Refusal::KeyFull);
            }
            *count += 1;
        }
        metrics::gauge!(names::SESSIONS_ACTIVE).increment(1.0);
        metrics::counter!(names::SESSIONS_TOTAL).increment(1);
        Ok(SessionGuard {
            registry: Arc::clone(self),
            key_id: key_id.filter(|_| self.max_per_key > 0).map(str::to_owned),
        })
    }

    /// Counts an already admitted session against its key once the key is
    /// known only after the upgrade (a Twilio stream authenticates in its
    /// `start` message). Dropping the guard releases the count.
    pub fn admit_key(self: &Arc<Self>, key_id: &str) -> Result<KeyGuard, Refusal> {
        if self.max_per_key == 0 {
            return Ok(KeyGuard {
                registry: Arc::clone(self),
                key_id: None,
            });
        }
        let elsewhere = self.held_elsewhere(key_id);
        let mut per_key = self.per_key.lock().unwrap_or_else(|e| e.into_inner());
        let count = per_key.entry(key_id.to_owned()).or_insert(0);
        if *count + elsewhere >= self.max_per_key {
            return Err(Refusal::KeyFull);
        }
        *count += 1;
        Ok(KeyGuard {
            registry: Arc::clone(self),
            key_id: Some(key_id.to_owned()),
        })
    }

    fn release_key(&self, key: &str) {
        let mut per_key = self.per_key.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = per_key.get_mut(key) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                per_key.remove(key);
            }
        }
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
        if let Some(key) = &self.key_id {
            self.registry.release_key(key);
        }
        metrics::gauge!(names::SESSIONS_ACTIVE).decrement(1.0);
        if self.registry.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.registry.drained.notify_waiters();
        }
    }
}
