//! A session's journal: the client's audio messages, appended to the
//! JetStream subject `cochlea.audio.<session_id>` (stream `COCHLEA_AUDIO`)
//! before they are acknowledged. A node that takes a session over reads it
//! back and feeds it to a fresh session core, which rebuilds the recorder's
//! state exactly (decoders, jitter buffer and sinks are deterministic).
//!
//! Each JetStream message is a batch: per client message, its arrival time
//! (milliseconds since the stream's first message) and its bytes, each
//! behind a little-endian `u32` length. Appends state the subject's last
//! sequence (`Nats-Expected-Last-Subject-Sequence`): a node that lost the
//! session to another cannot append behind its back.

use async_nats::jetstream;
use bytes::{BufMut, Bytes, BytesMut};
use futures_util::StreamExt;

use super::{check_session_id, jetstream_error, ClusterError};

pub(super) const AUDIO_STREAM: &str = "COCHLEA_AUDIO";
pub(super) const AUDIO_SUBJECTS: &str = "cochlea.audio.>";
/// JetStream messages stay under NATS's default 1 MiB payload limit.
pub const MAX_BATCH_BYTES: usize = 512 * 1024;

pub fn subject(session_id: &str) -> String {
    format!("cochlea.audio.{session_id}")
}

/// One client message as journalled.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Milliseconds since the session's first journalled message arrived.
    pub arrival_ms: u32,
    pub bytes: Bytes,
}

pub fn encode(entries: &[Entry]) -> Bytes {
    let size: usize = entries.iter().map(|e| 8 + e.bytes.len()).sum();
    let mut out = BytesMut::with_capacity(size);
    for entry in entries {
        out.put_u32_le(entry.arrival_ms);
        // A WebSocket message is far below 4 GiB (max_message_bytes).
        out.put_u32_le(u32::try_from(entry.bytes.len()).unwrap_or(u32::MAX));
        out.put_slice(&entry.bytes);
    }
    out.freeze()
}

/// Reads a batch back; a batch cut short is an error, never a panic.
pub fn decode(batch: &Bytes) -> Result<Vec<Entry>, ClusterError> {
    let torn = || ClusterError::JetStream {
        what: "journal",
        message: "a journal batch is cut short".into(),
    };
    let mut entries = Vec::new();
    let mut at = 0usize;
    while at < batch.len() {
        let header = batch.get(at..at + 8).ok_or_else(torn)?;
        let arrival_ms = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let start = at + 8;
        let end = start
            .checked_add(len)
            .filter(|e| *e <= batch.len())
            .ok_or_else(torn)?;
        entries.push(Entry {
            arrival_ms,
            bytes: batch.slice(start..end),
        });
        at = end;
    }
    Ok(entries)
}

/// The appending end of one session's journal.
pub struct Journal {
    js: jetstream::Context,
    subject: String,
    /// The subject's last stream sequence as this node knows it (0: empty).
    last_sequence: u64,
}

impl Journal {
    pub fn new(js: jetstream::Context, session_id: &str, last_sequence: u64) -> Self {
        Self {
            js,
            subject: subject(session_id),
            last_sequence,
        }
    }

    /// Appends one batch. [`ClusterError::Fenced`] if another node appended
    /// since: the session is no longer this node's.
    pub async fn append(&mut self, batch: Bytes) -> Result<(), ClusterError> {
        use jetstream::context::PublishErrorKind;
        let fenced = |e: &jetstream::context::PublishError| {
            if e.kind() == PublishErrorKind::WrongLastSequence {
                ClusterError::Fenced
            } else {
                jetstream_error("journal append")(e)
            }
        };
        let publish = jetstream::message::PublishMessage::build()
            .payload(batch)
            .expected_last_subject_sequence(self.last_sequence);
        let ack = self
            .js
            .send_publish(self.subject.clone(), publish)
            .await
            .map_err(|e| fenced(&e))?
            .await
            .map_err(|e| fenced(&e))?;
        self.last_sequence = ack.sequence;
        Ok(())
    }
}

/// Drops a closed session's journal (its recording is in the store, or in
/// the node's spool until the store takes it): the stream holds live
/// sessions only, not a day of every call.
pub async fn purge(js: &jetstream::Context, session_id: &str) -> Result<(), ClusterError> {
    check_session_id(session_id)?;
    let stream = js
        .get_stream(AUDIO_STREAM)
        .await
        .map_err(|e| jetstream_error("journal")(&e))?;
    stream
        .purge()
        .filter(subject(session_id))
        .await
        .map(|_| ())
        .map_err(|e| jetstream_error("journal purge")(&e))
}

/// Everything a session's journal holds, in order, and its last sequence.
pub async fn read_all(
    js: &jetstream::Context,
    session_id: &str,
) -> Result<(Vec<Entry>, u64), ClusterError> {
    check_session_id(session_id)?;
    let stream = js
        .get_stream(AUDIO_STREAM)
        .await
        .map_err(|e| jetstream_error("journal")(&e))?;
    let subject = subject(session_id);
    let last = match stream.get_last_raw_message_by_subject(&subject).await {
        Ok(message) => message.sequence,
        // Nothing journalled yet.
        Err(_) => return Ok((Vec::new(), 0)),
    };
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject,
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| jetstream_error("journal read")(&e))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| jetstream_error("journal read")(&e))?;
    let mut entries = Vec::new();
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| jetstream_error("journal read")(&e))?;
        let sequence = message.info().map_or(0, |i| i.stream_sequence);
        entries.extend(decode(&message.payload)?);
        if sequence >= last {
            break;
        }
    }
    Ok((entries, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_round_trip_and_torn_ones_are_errors() {
        let entries = vec![
            Entry {
                arrival_ms: 0,
                bytes: Bytes::from_static(b"abc"),
            },
            Entry {
                arrival_ms: 20,
                bytes: Bytes::new(),
            },
        ];
        let batch = encode(&entries);
        assert_eq!(decode(&batch).unwrap(), entries);
        for cut in 1..batch.len() {
            assert!(
                decode(&batch.slice(..cut)).is_err() || cut == 11,
                "cut {cut}"
            );
        }
    }
}
