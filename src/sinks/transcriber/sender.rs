//! The sender task and its request tasks: utterances to the backend as
//! request slots free up, each with a timeout and retries with backoff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::Instrument;

use super::backend::{Backend, UtteranceRequest};
use super::order::Outcome;
use super::queue::{wait_closed, Queue, Utterance};
use super::TranscriptionService;
use crate::protocol::{ServerMessage, TranscribeErrorInfo, Transcript};
use crate::telemetry::names;

/// Takes utterances off the queue as request slots free up.
pub(super) struct Sender {
    pub(super) queue: Arc<Queue>,
    pub(super) backend: Arc<Backend>,
    pub(super) service: Arc<TranscriptionService>,
    pub(super) session_requests: Arc<Semaphore>,
    pub(super) outcomes: mpsc::UnboundedSender<Outcome>,
    pub(super) session_id: String,
    pub(super) metadata: Arc<Map<String, Value>>,
    pub(super) stop_deadline: watch::Sender<Option<tokio::time::Instant>>,
}

impl Sender {
    pub(super) async fn run(self) {
        let config = &self.service.config;
        let stop_wait = Duration::from_millis(config.stop_wait_ms);
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            if deadline.is_none() && self.queue.is_closed() {
                let at = tokio::time::Instant::now() + stop_wait;
                deadline = Some(at);
                self.stop_deadline.send_replace(Some(at));
            }
            let work = match deadline {
                Some(at) => tokio::time::timeout_at(at, self.queue.wait_for_work())
                    .await
                    .unwrap_or(true),
                None => self.queue.wait_for_work().await,
            };
            if !work {
                // Closed and empty: requests still in flight get the rest
                // of the stop wait (receivers keep the last value after this
                // task ends).
                if deadline.is_none() {
                    self.stop_deadline
                        .send_replace(Some(tokio::time::Instant::now() + stop_wait));
                }
                break;
            }
            // Slots are taken only once there is work, so an idle session
            // holds no global slot.
            let permits = async {
                let session = self.session_requests.clone().acquire_owned().await.ok()?;
                let global = self
                    .service
                    .global_requests
                    .clone()
                    .acquire_owned()
                    .await
                    .ok()?;
                Some((session, global))
            };
            let permits = match deadline {
                Some(at) => tokio::time::timeout_at(at, permits).await.ok().flatten(),
                None => {
                    // The queue may close while we wait: then the deadline
                    // starts, so wake up to notice.
                    tokio::select! {
                        permits = permits => permits,
                        () = wait_closed(&self.queue) => continue,
                    }
                }
            };
            let Some(permits) = permits else {
                // Out of time after stop: what is left gets no transcript.
                while let Some(utterance) = self.queue.pop() {
                    self.fail(
                        &utterance,
                        "the session ended before a request slot was free",
                    );
                }
                break;
            };
            let Some(utterance) = self.queue.pop() else {
                continue;
            };
            let request = Request {
                backend: self.backend.clone(),
                service: self.service.clone(),
                outcomes: self.outcomes.clone(),
                session_id: self.session_id.clone(),
                metadata: self.metadata.clone(),
                stop_deadline: self.stop_deadline.subscribe(),
            };
            tokio::spawn(
                async move {
                    let _permits = permits;
                    request.run(utterance).await;
                }
                .in_current_span(),
            );
        }
    }

    fn fail(&self, utterance: &Utterance, reason: &str) {
        let _ = self.outcomes.send(Outcome::Done {
            id: utterance.id,
            channel: utterance.channel,
            message: failed_message(utterance, reason.to_owned()),
        });
    }
}

fn failed_message(utterance: &Utterance, reason: String) -> ServerMessage {
    ServerMessage::TranscribeError(TranscribeErrorInfo {
        code: "transcribe_failed",
        message: format!(
            "utterance {} (channel {}, {:.2}-{:.2} s): {reason}",
            utterance.id,
            utterance.channel,
            utterance.start_seconds(),
            utterance.end_seconds()
        ),
        fatal: false,
        channel: utterance.channel,
        utterance_id: Some(utterance.id),
        start: Some(utterance.start_seconds()),
        end: Some(utterance.end_seconds()),
        dropped: None,
    })
}

/// One utterance's request, with its retries.
struct Request {
    backend: Arc<Backend>,
    service: Arc<TranscriptionService>,
    outcomes: mpsc::UnboundedSender<Outcome>,
    session_id: String,
    metadata: Arc<Map<String, Value>>,
    /// Set once the session has stopped: when waiting for transcripts ends.
    stop_deadline: watch::Receiver<Option<tokio::time::Instant>>,
}

impl Request {
    async fn run(self, utterance: Utterance) {
        let inflight = metrics::gauge!(names::TRANSCRIBE_INFLIGHT_REQUESTS);
        inflight.increment(1.0);
        let result = tokio::select! {
            biased;
            result = self.attempts(&utterance) => result,
            () = stop_deadline(self.stop_deadline.clone()) => {
                Err("the session ended before the transcript arrived".to_owned())
            }
        };
        inflight.decrement(1.0);
        let message = match result {
            Ok((text, elapsed)) => ServerMessage::Transcript(Transcript {
                utterance_id: utterance.id,
                channel: utterance.channel,
                start: utterance.start_seconds(),
                end: utterance.end_seconds(),
                text,
                is_final: true,
                backend: self.backend.name.clone(),
                backend_ms: elapsed.as_millis() as u64,
            }),
            Err(reason) => failed_message(&utterance, reason),
        };
        let _ = self.outcomes.send(Outcome::Done {
            id: utterance.id,
            channel: utterance.channel,
            message,
        });
    }

    /// Tries until success, a failure not worth repeating, or the retries
    /// run out. Returns the text and the successful attempt's duration.
    async fn attempts(&self, utterance: &Utterance) -> Result<(String, Duration), String> {
        let config = &self.service.config;
        let backend_label = self.backend.name.clone();
        let request = UtteranceRequest {
            session_id: &self.session_id,
            utterance_id: utterance.id,
            channel: utterance.channel,
            start_seconds: utterance.start_seconds(),
            end_seconds: utterance.end_seconds(),
            samples: &utterance.samples,
            metadata: &self.metadata,
        };
        let timeout = Duration::from_millis(config.request_timeout_ms);
        let mut backoff = Duration::from_millis(config.retry_backoff_ms);
        let mut attempt = 0;
        loop {
            let started = Instant::now();
            let outcome = self
                .backend
                .transcribe(&self.service.client, &request, timeout)
                .await;
            let elapsed = started.elapsed();
            metrics::histogram!(names::TRANSCRIBE_REQUEST_SECONDS, "backend" => backend_label.clone())
                .record(elapsed.as_secs_f64());
            let error = match outcome {
                Ok(text) => {
                    metrics::counter!(names::TRANSCRIBE_REQUESTS_TOTAL, "backend" => backend_label.clone(), "outcome" => "ok").increment(1);
                    return Ok((text, elapsed));
                }
                Err(error) => error,
            };
            let retry = error.is_retryable() && attempt < config.max_retries;
            let outcome = if retry { "retried" } else { "failed" };
            metrics::counter!(names::TRANSCRIBE_REQUESTS_TOTAL, "backend" => backend_label.clone(), "outcome" => outcome).increment(1);
            tracing::warn!(
                utterance_id = utterance.id,
                attempt,
                %error,
                retry,
                "transcription request failed"
            );
            if !retry {
                let attempts = attempt + 1;
                return Err(format!(
                    "backend '{}' failed after {attempts} attempt{}: {error}",
                    self.backend.name,
                    if attempts == 1 { "" } else { "s" }
                ));
            }
            tokio::time::sleep(backoff).await;
            backoff = backoff.saturating_mul(2);
            attempt += 1;
        }
    }
}

/// Completes when the session has stopped and the wait for transcripts is
/// over; never while the session runs.
async fn stop_deadline(mut deadline: watch::Receiver<Option<tokio::time::Instant>>) {
    let at = loop {
        if let Some(at) = *deadline.borrow_and_update() {
            break at;
        }
        if deadline.changed().await.is_err() {
            // The sender task is gone without a stop: no deadline, ever.
            std::future::pending::<()>().await;
        }
    };
    tokio::time::sleep_until(at).await;
}
