//! Cluster mode: a resumable session's audio goes to its journal on NATS
//! before the client's ack says it is safe ([`crate::cluster::journal`]).
//!
//! The driver notes every binary message it hands to the core; when the
//! core wants an ack ([`Output::Persist`](crate::session::Output::Persist)),
//! what was noted goes up as one append (or a few, each under NATS's payload
//! limit), and the core hears [`Input::Durable`](crate::session::Input) once
//! JetStream has stored it. One append at a time per session, so each can
//! state the journal's last sequence (the fence against a node that lost
//! the session). The session's record in KV is created before the first
//! append. NATS being down delays acks (the client keeps its audio, and
//! resends it on resume); it never blocks the socket.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::cluster::journal::{self, Entry, Journal, MAX_BATCH_BYTES};
use crate::cluster::{Cluster, ClusterError, SessionRecord};

type Append = Pin<Box<dyn Future<Output = (Journal, Result<u32, ClusterError>)> + Send>>;

const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

pub struct Journaling {
    cluster: Arc<Cluster>,
    session_id: String,
    /// The record to create before the first append (`None` once it is).
    record: Option<SessionRecord>,
    /// `None` while an append holds it.
    journal: Option<Journal>,
    pending: Vec<Entry>,
    /// When the first noted message arrived (arrival times count from it).
    first_arrival: Option<std::time::Instant>,
    /// The highest `seq` an ack waits for, not yet in an append.
    wanted: Option<u32>,
    in_flight: Option<Append>,
}

impl Journaling {
    /// A new session: its record goes into KV with the first append.
    pub fn new(cluster: Arc<Cluster>, session_id: &str, record: SessionRecord) -> Self {
        let journal = cluster.journal(session_id, 0);
        Self {
            cluster,
            session_id: session_id.to_owned(),
            record: Some(record),
            journal: Some(journal),
            pending: Vec::new(),
            first_arrival: None,
            wanted: None,
            in_flight: None,
        }
    }

    /// A session taken over: its record is this node's, its journal holds
    /// what the client was acked, up to `last_sequence`.
    pub fn resumed(
        cluster: Arc<Cluster>,
        session_id: &str,
        last_sequence: u64,
        first_arrival: std::time::Instant,
    ) -> Self {
        let journal = cluster.journal(session_id, last_sequence);
        Self {
            cluster,
            session_id: session_id.to_owned(),
            record: None,
            journal: Some(journal),
            pending: Vec::new(),
            first_arrival: Some(first_arrival),
            wanted: None,
            in_flight: None,
        }
    }

    /// A binary message handed to the core at `now`.
    pub fn note(&mut self, bytes: &Bytes, now: std::time::Instant) {
        let first = *self.first_arrival.get_or_insert(now);
        let arrival_ms =
            u32::try_from(now.saturating_duration_since(first).as_millis()).unwrap_or(u32::MAX);
        self.pending.push(Entry {
            arrival_ms,
            bytes: bytes.clone(),
        });
    }

    /// The core wants an ack for `seq`: everything noted goes up.
    pub fn want(&mut self, seq: u32) {
        if self.wanted.is_none_or(|w| w < seq) {
            self.wanted = Some(seq);
        }
        self.kick();
    }

    pub fn busy(&self) -> bool {
        self.in_flight.is_some()
    }

    /// Starts the next append if none is running and an ack waits.
    fn kick(&mut self) {
        if self.in_flight.is_some() {
            return;
        }
        // Both are checked before either is taken: taking the journal for
        // nothing lost it, and every append after the first with it.
        if self.wanted.is_none() || self.journal.is_none() {
            return;
        }
        let (Some(seq), Some(mut journal)) = (self.wanted.take(), self.journal.take()) else {
            return;
        };
        let batches = split(std::mem::take(&mut self.pending));
        let record = self.record.take();
        let cluster = self.cluster.clone();
        let session_id = self.session_id.clone();
        self.in_flight = Some(Box::pin(async move {
            let result = append_all(&cluster, &session_id, record, &mut journal, batches).await;
            (journal, result.map(|()| seq))
        }));
    }

    /// Waits for the running append: the `seq` now durable. Pending forever
    /// when none runs (the caller polls it only while [`Self::busy`]).
    pub async fn next(&mut self) -> Result<u32, ClusterError> {
        let Some(append) = self.in_flight.as_mut() else {
            return std::future::pending().await;
        };
        let (journal, result) = append.await;
        self.in_flight = None;
        self.journal = Some(journal);
        if result.is_ok() {
            self.kick();
        }
        result
    }
}

/// Noted messages in batches under the payload limit (one message per batch
/// at least, whatever its size: a message is at most `max_message_bytes`).
fn split(entries: Vec<Entry>) -> Vec<Bytes> {
    let mut batches = Vec::new();
    let mut batch: Vec<Entry> = Vec::new();
    let mut size = 0usize;
    for entry in entries {
        let entry_size = 8 + entry.bytes.len();
        if !batch.is_empty() && size + entry_size > MAX_BATCH_BYTES {
            batches.push(journal::encode(&batch));
            batch.clear();
            size = 0;
        }
        size += entry_size;
        batch.push(entry);
    }
    if !batch.is_empty() {
        batches.push(journal::encode(&batch));
    }
    batches
}

/// Creates the record (first time), then appends each batch, retrying with
/// backoff while NATS is unreachable. Gives up only when fenced.
async fn append_all(
    cluster: &Cluster,
    session_id: &str,
    record: Option<SessionRecord>,
    journal: &mut Journal,
    batches: Vec<Bytes>,
) -> Result<(), ClusterError> {
    let mut wait = RETRY_FIRST;
    if let Some(record) = record {
        loop {
            match cluster.sessions().create(session_id, &record).await {
                Ok(_) => break,
                // An earlier attempt that timed out may have written it.
                Err(_)
                    if matches!(
                        cluster.sessions().get(session_id).await,
                        Ok(Some((ref found, _))) if *found == record
                    ) =>
                {
                    break
                }
                Err(e) => {
                    tracing::warn!(error = %e, "session record not written; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(RETRY_MAX);
                }
            }
        }
    }
    for batch in batches {
        loop {
            if cluster.fenced() {
                return Err(ClusterError::Fenced);
            }
            match journal.append(batch.clone()).await {
                Ok(()) => break,
                Err(ClusterError::Fenced) => return Err(ClusterError::Fenced),
                Err(e) => {
                    tracing::warn!(error = %e, "journal append failed; acks wait, retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(RETRY_MAX);
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(n: usize) -> Entry {
        Entry {
            arrival_ms: 0,
            bytes: Bytes::from(vec![0u8; n]),
        }
    }

    #[test]
    fn batches_stay_under_the_payload_limit_and_keep_every_message() {
        let entries: Vec<Entry> = (0..40).map(|_| entry(40_000)).collect();
        let batches = split(entries.clone());
        assert!(batches.len() > 1);
        assert!(batches.iter().all(|b| b.len() <= MAX_BATCH_BYTES));
        let back: Vec<Entry> = batches
            .iter()
            .flat_map(|b| journal::decode(b).unwrap())
            .collect();
        assert_eq!(back, entries);
    }
}
