//! Sessions that can be resumed after a dropped connection.
//!
//! A `framing=seq` session is registered here when it starts. While its
//! client is connected the entry is `Attached`; when the connection drops,
//! the session's whole state (pipeline, sink handles, counters) is parked
//! here, and a new connection with the right token takes it over, possibly
//! on another worker thread. Only the state moves: the new connection's
//! socket stays on its own worker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::Notify;
use tokio::time::Instant;

use super::auth::constant_time_eq;
use super::registry::SessionGuard;
use super::session::Suspended;
use crate::protocol::StartRequest;

/// Why a resume was refused (close code 1008 in every case).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResumeError {
    /// An unknown id and a wrong token are one refusal, word for word: a
    /// different answer would tell whoever guesses ids which sessions are
    /// live. The server's log says which it was (`claim`).
    #[error("no resumable session {0} for this resume_token: it never existed, has ended, its resume window expired, or the token is not its own")]
    NotResumable(String),
    #[error("session {0} is still attached to another connection that did not let go")]
    Busy(String),
    /// The resuming connection repeated a stream parameter with another value.
    #[error("{0}")]
    Conflict(String),
}

/// A session waiting for its client, with the slot it holds.
pub struct Parked {
    pub session: Box<Suspended>,
    pub guard: SessionGuard,
    /// Each park has its own generation, so a stale expiry timer cannot end
    /// a session that was resumed and parked again since.
    pub generation: u64,
}

enum State {
    /// A connection drives the session; `takeover` asks it to let go.
    Attached {
        takeover: Arc<Notify>,
    },
    Parked(Parked),
    /// Between a takeover request and the old connection parking the state.
    Releasing,
}

struct Entry {
    token: String,
    state: State,
}

#[derive(Default)]
pub struct ResumeRegistry {
    entries: Mutex<HashMap<String, Entry>>,
}

impl ResumeRegistry {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding this lock cannot leave an entry half-made
        // (every update is a single insert or replace), so poison is harmless.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a new attached session; returns its takeover signal.
    pub fn attach_new(&self, id: &str, token: &str) -> Arc<Notify> {
        let takeover = Arc::new(Notify::new());
        self.lock().insert(
            id.to_owned(),
            Entry {
                token: token.to_owned(),
                state: State::Attached {
                    takeover: takeover.clone(),
                },
            },
        );
        takeover
    }

    /// Parks a session whose connection dropped.
    pub fn park(&self, id: &str, parked: Parked) {
        if let Some(entry) = self.lock().get_mut(id) {
            entry.state = State::Parked(parked);
        }
    }

    /// Takes a parked session back for ending (window expired, shutdown),
    /// if it is still the same park.
    pub fn take_expired(&self, id: &str, generation: u64) -> Option<Parked> {
        let mut entries = self.lock();
        match entries.get(id).map(|e| &e.state) {
            Some(State::Parked(p)) if p.generation == generation => {}
            _ => return None,
        }
        match entries.remove(id).map(|e| e.state) {
            Some(State::Parked(p)) => Some(p),
            _ => None,
        }
    }

    /// Forgets a session that ended.
    pub fn remove(&self, id: &str) {
        self.lock().remove(id);
    }

    /// Claims a session for a resuming connection. If the old connection
    /// still holds it (a half-open TCP connection the server has not noticed
    /// yet), asks it to let go and waits up to `wait` for the state.
    pub async fn claim(
        &self,
        id: &str,
        token: &str,
        request: &StartRequest,
        wait: std::time::Duration,
    ) -> Result<(Parked, Arc<Notify>), ResumeError> {
        let deadline = Instant::now() + wait;
        loop {
            {
                let mut entries = self.lock();
                let Some(entry) = entries.get_mut(id) else {
                    tracing::info!(reason = "unknown_session", "resume refused");
                    return Err(ResumeError::NotResumable(id.to_owned()));
                };
                if !constant_time_eq(entry.token.as_bytes(), token.as_bytes()) {
                    // A live session's id with someone else's token: worth
                    // an operator's look, so above the unknown id's level.
                    tracing::warn!(reason = "wrong_token", "resume refused");
                    return Err(ResumeError::NotResumable(id.to_owned()));
                }
                if let State::Parked(parked) = &entry.state {
                    // Checked before the session changes hands: a refused
                    // resume leaves it parked as it was.
                    parked
                        .session
                        .check_resume_request(request)
                        .map_err(|e| ResumeError::Conflict(e.to_string()))?;
                }
                match std::mem::replace(&mut entry.state, State::Releasing) {
                    State::Parked(parked) => {
                        let takeover = Arc::new(Notify::new());
                        entry.state = State::Attached {
                            takeover: takeover.clone(),
                        };
                        return Ok((parked, takeover));
                    }
                    State::Attached { takeover } => {
                        // notify_one stores a permit, so the old connection
                        // sees it even if it is not waiting right now.
                        takeover.notify_one();
                    }
                    State::Releasing => {}
                }
            }
            if Instant::now() >= deadline {
                return Err(ResumeError::Busy(id.to_owned()));
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }

    /// Parked sessions, for shutdown.
    pub fn take_all_parked(&self) -> Vec<(String, Parked)> {
        let mut entries = self.lock();
        let ids: Vec<String> = entries
            .iter()
            .filter(|(_, e)| matches!(e.state, State::Parked(_)))
            .map(|(id, _)| id.clone())
            .collect();
        ids.into_iter()
            .filter_map(|id| match entries.remove(&id).map(|e| e.state) {
                Some(State::Parked(p)) => Some((id, p)),
                _ => None,
            })
            .collect()
    }
}
