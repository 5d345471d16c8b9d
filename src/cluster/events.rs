//! Session events on JetStream: published as they happen, read back by
//! `GET /v1/sessions/<id>/events` from any node.

use async_nats::jetstream;
use bytes::Bytes;
use futures_util::stream::FuturesUnordered;
use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;

use super::{check_session_id, jetstream_error, ClusterError, EVENTS_STREAM};

/// Events waiting for the publisher task; beyond it they are dropped (and
/// logged): a session never waits for NATS.
const QUEUE: usize = 65_536;
/// Publications awaiting JetStream's acknowledgement at once.
const IN_FLIGHT: usize = 1_024;

pub fn subject(session_id: &str) -> String {
    format!("cochlea.events.{session_id}")
}

/// Hands events to one task that publishes them in order.
pub(super) struct Publisher {
    queue: mpsc::Sender<(String, Bytes)>,
}

impl Publisher {
    pub(super) fn start(js: jetstream::Context) -> Self {
        let (queue, events) = mpsc::channel(QUEUE);
        tokio::spawn(publish_all(js, events));
        Self { queue }
    }

    pub(super) fn publish(&self, session_id: &str, json: String) {
        if self
            .queue
            .try_send((subject(session_id), Bytes::from(json)))
            .is_err()
        {
            tracing::warn!(session_id, "NATS event queue full: event not published");
        }
    }
}

/// Publishes in arrival order (one connection keeps it), collecting the
/// acknowledgements as they come.
async fn publish_all(js: jetstream::Context, mut events: mpsc::Receiver<(String, Bytes)>) {
    let mut acks = FuturesUnordered::new();
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some((subject, payload)) = event else { break };
                while acks.len() >= IN_FLIGHT {
                    let _ = acks.next().await;
                }
                match js.publish(subject, payload).await {
                    Ok(ack) => acks.push(async move {
                        if let Err(e) = ack.await {
                            tracing::warn!(error = %e, "event not stored by JetStream");
                        }
                    }),
                    Err(e) => tracing::warn!(error = %e, "event not published"),
                }
            }
            Some(()) = acks.next(), if !acks.is_empty() => {}
        }
    }
    while acks.next().await.is_some() {}
}

/// The session's events stored so far (none if NATS has none), in order.
pub async fn read_all(
    js: &jetstream::Context,
    session_id: &str,
) -> Result<Vec<Bytes>, ClusterError> {
    check_session_id(session_id)?;
    let stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|e| jetstream_error("events stream")(&e))?;
    let last = match stream
        .get_last_raw_message_by_subject(&subject(session_id))
        .await
    {
        Ok(message) => message.sequence,
        Err(_) => return Ok(Vec::new()),
    };
    let mut stored = std::pin::pin!(follow(js, session_id, 0).await?);
    let mut events = Vec::new();
    while let Some(event) = stored.next().await {
        let event = event?;
        events.push(event.json);
        if event.sequence >= last {
            break;
        }
    }
    Ok(events)
}

/// One stored event: its stream sequence (the SSE id) and its JSON.
pub struct StoredEvent {
    pub sequence: u64,
    pub json: Bytes,
}

/// The session's events after stream sequence `after` (0: from the first),
/// then live ones as they come.
pub async fn follow(
    js: &jetstream::Context,
    session_id: &str,
    after: u64,
) -> Result<impl Stream<Item = Result<StoredEvent, ClusterError>>, ClusterError> {
    check_session_id(session_id)?;
    let stream = js
        .get_stream(EVENTS_STREAM)
        .await
        .map_err(|e| jetstream_error("events stream")(&e))?;
    let deliver_policy = if after == 0 {
        jetstream::consumer::DeliverPolicy::All
    } else {
        jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: after.saturating_add(1),
        }
    };
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            filter_subject: subject(session_id),
            deliver_policy,
            ..Default::default()
        })
        .await
        .map_err(|e| jetstream_error("events consumer")(&e))?;
    let messages = consumer
        .messages()
        .await
        .map_err(|e| jetstream_error("events consumer")(&e))?;
    Ok(messages.map(|message| {
        let message = message.map_err(|e| jetstream_error("events")(&e))?;
        let sequence = message.info().map_or(0, |info| info.stream_sequence);
        Ok(StoredEvent {
            sequence,
            json: message.payload.clone(),
        })
    }))
}
