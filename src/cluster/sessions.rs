//! Session records in the KV bucket `cochlea_sessions`: who owns each
//! resumable session, the hash of its resume token, and what it was started
//! with. Ownership moves only by compare-and-swap on the record's revision,
//! so two nodes can never both take a session.

use async_nats::jetstream;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{check_session_id, jetstream_error, ClusterError};
use crate::protocol::StartRequest;

pub(super) const SESSIONS_BUCKET: &str = "cochlea_sessions";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionRecord {
    /// The node that holds the session now.
    pub owner: String,
    /// That node's process: a restarted node with the same id is another.
    pub owner_instance: String,
    /// SHA-256 of the resume token, hex: the token itself is not stored.
    pub token_sha256: String,
    /// What the stream was started with.
    pub request: StartRequest,
    /// Resumes so far (the core's counter, carried across nodes).
    pub resumes: u32,
    pub started_at: String,
    /// The session has ended (its owner finished it). Kept, not deleted,
    /// so that a node which lost the session while paused sees that
    /// another owner finished it, rather than no owner at all.
    #[serde(default)]
    pub closed: bool,
}

pub fn token_hash(token: &str) -> String {
    let digest = Sha256::digest(token.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The bucket's handle.
#[derive(Clone)]
pub struct Sessions {
    kv: jetstream::kv::Store,
}

impl Sessions {
    pub(super) fn new(kv: jetstream::kv::Store) -> Self {
        Self { kv }
    }

    /// Records a new session; its revision.
    pub async fn create(&self, id: &str, record: &SessionRecord) -> Result<u64, ClusterError> {
        check_session_id(id)?;
        let value = serde_json::to_vec(record).unwrap_or_default();
        self.kv
            .create(id, value.into())
            .await
            .map_err(|e| jetstream_error("session record")(&e))
    }

    /// The record and its revision, if the session is known.
    pub async fn get(&self, id: &str) -> Result<Option<(SessionRecord, u64)>, ClusterError> {
        check_session_id(id)?;
        let entry = self
            .kv
            .entry(id)
            .await
            .map_err(|e| jetstream_error("session record")(&e))?;
        let Some(entry) = entry else { return Ok(None) };
        if entry.operation != jetstream::kv::Operation::Put {
            return Ok(None);
        }
        Ok(serde_json::from_slice(&entry.value)
            .ok()
            .map(|record| (record, entry.revision)))
    }

    /// Every session not closed, with its record.
    pub async fn open_records(&self) -> Result<Vec<(String, SessionRecord)>, ClusterError> {
        use futures_util::StreamExt;
        let mut keys = self
            .kv
            .keys()
            .await
            .map_err(|e| jetstream_error("session records")(&e))?;
        let mut ids = Vec::new();
        while let Some(key) = keys.next().await {
            if let Ok(key) = key {
                ids.push(key);
            }
        }
        let mut open = Vec::new();
        for id in ids {
            if let Ok(Some((record, _))) = self.get(&id).await {
                if !record.closed {
                    open.push((id, record));
                }
            }
        }
        Ok(open)
    }

    /// Writes `record` if the record is still at `revision` (taking the
    /// session over, or updating it as its owner); the new revision.
    pub async fn swap(
        &self,
        id: &str,
        record: &SessionRecord,
        revision: u64,
    ) -> Result<u64, ClusterError> {
        check_session_id(id)?;
        let value = serde_json::to_vec(record).unwrap_or_default();
        self.kv
            .update(id, value.into(), revision)
            .await
            .map_err(|e| jetstream_error("session record")(&e))
    }

    /// The owner leaves the session for another node to take at once (a
    /// node shutting down): the record keeps no owner.
    pub async fn release(&self, id: &str, owner: &str, instance: &str) -> Result<(), ClusterError> {
        let Some((mut record, revision)) = self.get(id).await? else {
            return Ok(());
        };
        if record.owner != owner || record.owner_instance != instance {
            return Ok(());
        }
        record.owner.clear();
        record.owner_instance.clear();
        self.swap(id, &record, revision).await.map(|_| ())
    }

    /// The session has ended here: it can no longer be resumed anywhere.
    /// Only its owner marks it (compare-and-swap on the revision read).
    pub async fn close(&self, id: &str, owner: &str, instance: &str) -> Result<(), ClusterError> {
        let Some((mut record, revision)) = self.get(id).await? else {
            return Ok(());
        };
        if record.owner != owner || record.owner_instance != instance {
            return Ok(());
        }
        record.closed = true;
        self.swap(id, &record, revision).await.map(|_| ())
    }
}
