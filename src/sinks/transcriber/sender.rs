//! The sender task and its request tasks: utterances to the backend as
//! request slots free up, each with a timeout and retries with backoff.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch, Semaphore};
use tracing::Instrument;

use super::backend::{Backend, BackendReply, UtteranceRequest};
use super::order::Outcome;
use super::queue::{Queue, Utterance};
use super::TranscriptionService;
use crate::protocol::{ErrorCode, ServerMessage, TranscribeErrorInfo, Transcript};
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
                let mut at = tokio::time::Instant::now() + stop_wait;
                if let Some(shutdown) = *self.service.shutdown_deadline.borrow() {
                    at = at.min(shutdown);
                }
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
                        () = self.queue.wait_closed() => continue,
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
                shutdown_deadline: self.service.shutdown_deadline.subscribe(),
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
        code: ErrorCode::TranscribeFailed,
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
    /// Set when the server shuts down (see `TranscriptionService::begin_shutdown`).
    shutdown_deadline: watch::Receiver<Option<tokio::time::Instant>>,
}

impl Request {
    async fn run(self, utterance: Utterance) {
        let inflight = metrics::gauge!(names::TRANSCRIBE_INFLIGHT_REQUESTS);
        inflight.increment(1.0);
        let result = tokio::select! {
            biased;
            result = self.attempts(&utterance) => result,
            () = stop_deadline(self.stop_deadline.clone(), self.shutdown_deadline.clone()) => {
                Err("the session ended before the transcript arrived".to_owned())
            }
        };
        inflight.decrement(1.0);
        let message = match result {
            Ok((reply, elapsed)) => ServerMessage::Transcript(Transcript {
                utterance_id: utterance.id,
                channel: utterance.channel,
                start: utterance.start_seconds(),
                end: utterance.end_seconds(),
                text: reply.text,
                stable_text: None,
                is_final: true,
                words: reply.words,
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
    /// run out. Returns the reply and the successful attempt's duration.
    async fn attempts(&self, utterance: &Utterance) -> Result<(BackendReply, Duration), String> {
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
        let mut retries = Retries::new(
            config.max_retries,
            Duration::from_millis(config.retry_backoff_ms),
        );
        loop {
            let started = Instant::now();
            let outcome = self
                .backend
                .transcribe(&self.service.client, &request, timeout, true)
                .await;
            let elapsed = started.elapsed();
            metrics::histogram!(names::TRANSCRIBE_REQUEST_SECONDS, "backend" => backend_label.clone())
                .record(elapsed.as_secs_f64());
            let error = match outcome {
                Ok(reply) => {
                    metrics::counter!(names::TRANSCRIBE_REQUESTS_TOTAL, "backend" => backend_label.clone(), "outcome" => "ok").increment(1);
                    return Ok((reply, elapsed));
                }
                Err(error) => error,
            };
            let attempt = retries.failed_attempts();
            let wait = retries.after_failure(error.is_retryable());
            let retry = wait.is_some();
            let outcome = if retry { "retried" } else { "failed" };
            metrics::counter!(names::TRANSCRIBE_REQUESTS_TOTAL, "backend" => backend_label.clone(), "outcome" => outcome).increment(1);
            tracing::warn!(
                utterance_id = utterance.id,
                attempt,
                %error,
                retry,
                "transcription request failed"
            );
            let Some(wait) = wait else {
                let attempts = retries.failed_attempts();
                return Err(format!(
                    "backend '{}' failed after {attempts} attempt{}: {error}",
                    self.backend.name,
                    if attempts == 1 { "" } else { "s" }
                ));
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// When a failed request is tried again: after a failure that may recover,
/// while retries remain, with a backoff that doubles each time.
struct Retries {
    max_retries: u32,
    failed_attempts: u32,
    next_backoff: Duration,
}

impl Retries {
    fn new(max_retries: u32, first_backoff: Duration) -> Self {
        Self {
            max_retries,
            failed_attempts: 0,
            next_backoff: first_backoff,
        }
    }

    fn failed_attempts(&self) -> u32 {
        self.failed_attempts
    }

    /// Counts a failed attempt; returns how long to wait before the next
    /// one, or `None` when this failure is final.
    fn after_failure(&mut self, retryable: bool) -> Option<Duration> {
        let retry = retryable && self.failed_attempts < self.max_retries;
        self.failed_attempts = self.failed_attempts.saturating_add(1);
        if !retry {
            return None;
        }
        let wait = self.next_backoff;
        self.next_backoff = self.next_backoff.saturating_mul(2);
        Some(wait)
    }
}

/// Completes when the session has stopped and the wait for transcripts is
/// over, or at the server's shutdown deadline, whichever is first; never
/// while the session runs and the server does.
async fn stop_deadline(
    mut deadline: watch::Receiver<Option<tokio::time::Instant>>,
    mut shutdown: watch::Receiver<Option<tokio::time::Instant>>,
) {
    // A sender gone (the sender task ended, or a test's) leaves its last
    // value in place: stop watching it for changes.
    let mut watch_session = true;
    let mut watch_shutdown = true;
    loop {
        let at = match (*deadline.borrow_and_update(), *shutdown.borrow_and_update()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let sleep = async {
            match at {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            () = sleep => return,
            changed = deadline.changed(), if watch_session => watch_session = changed.is_ok(),
            changed = shutdown.changed(), if watch_shutdown => watch_shutdown = changed.is_ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_doubling_until_they_run_out() {
        let mut retries = Retries::new(2, Duration::from_millis(250));
        assert_eq!(
            retries.after_failure(true),
            Some(Duration::from_millis(250))
        );
        assert_eq!(
            retries.after_failure(true),
            Some(Duration::from_millis(500))
        );
        assert_eq!(retries.after_failure(true), None);
        assert_eq!(retries.failed_attempts(), 3);
    }

    #[test]
    fn a_failure_that_will_not_recover_is_final_at_once() {
        let mut retries = Retries::new(2, Duration::from_millis(250));
        assert_eq!(retries.after_failure(false), None);
        assert_eq!(retries.failed_attempts(), 1);
        // After a retry too.
        let mut retries = Retries::new(5, Duration::from_millis(10));
        assert!(retries.after_failure(true).is_some());
        assert_eq!(retries.after_failure(false), None);
        assert_eq!(retries.failed_attempts(), 2);
        // No retries configured: the first failure is the last.
        let mut retries = Retries::new(0, Duration::from_millis(10));
        assert_eq!(retries.after_failure(true), None);
    }

    #[test]
    fn a_huge_backoff_saturates_instead_of_overflowing() {
        let mut retries = Retries::new(u32::MAX, Duration::MAX / 2 + Duration::from_secs(1));
        assert!(retries.after_failure(true).is_some());
        assert_eq!(retries.after_failure(true), Some(Duration::MAX));
        assert_eq!(retries.after_failure(true), Some(Duration::MAX));
    }

    #[test]
    fn a_failure_names_the_utterance_its_channel_and_media_times() {
        let utterance = Utterance {
            id: 4,
            channel: 1,
            start: 16_000,
            samples: vec![0; 8_000],
        };
        let ServerMessage::TranscribeError(error) =
            failed_message(&utterance, "HTTP 503: busy".into())
        else {
            panic!("a transcription error");
        };
        assert_eq!(error.code, ErrorCode::TranscribeFailed);
        assert_eq!(
            error.message,
            "utterance 4 (channel 1, 1.00-1.50 s): HTTP 503: busy"
        );
        assert!(!error.fatal);
        assert_eq!(
            (error.channel, error.utterance_id, error.start, error.end),
            (1, Some(4), Some(1.0), Some(1.5))
        );
        assert_eq!(error.dropped, None);
    }

    /// Whether `stop_deadline` completes within `ms` milliseconds.
    async fn stops_within(
        deadline: watch::Receiver<Option<tokio::time::Instant>>,
        ms: u64,
    ) -> bool {
        let (_keep, shutdown) = watch::channel(None);
        tokio::time::timeout(Duration::from_millis(ms), stop_deadline(deadline, shutdown))
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn requests_are_cut_only_after_a_stop_and_its_wait() {
        // The session runs: no deadline.
        let (sender, receiver) = watch::channel(None);
        assert!(!stops_within(receiver.clone(), 50).await);
        // Stopped: the wait ends at the deadline, not before.
        sender.send_replace(Some(
            tokio::time::Instant::now() + Duration::from_millis(300),
        ));
        assert!(!stops_within(receiver.clone(), 50).await);
        assert!(stops_within(receiver.clone(), 1_000).await);
        // The sender task ends after setting it: later requests still see it.
        drop(sender);
        assert!(stops_within(receiver, 50).await);
    }

    #[tokio::test]
    async fn without_a_stop_a_gone_sender_task_never_cuts_a_request() {
        let (sender, receiver) = watch::channel(None);
        drop(sender);
        assert!(!stops_within(receiver, 100).await);
    }
}
