//! Partial transcripts with a batch backend (`interim=true`): while an
//! utterance is open, its audio so far is sent again every
//! `interim_interval_ms` of stream time, and each answer becomes a partial
//! `transcript` (the orderer adds its stable prefix, see `agreement.rs`).
//!
//! Cost grows with the square of an utterance's length (each partial sends
//! it all again), so partials are kept cheap and can never crowd out finals:
//! - one partial request in flight per session; a tick that finds one in
//!   flight is skipped, and the next write after it returns tries again;
//! - nothing is sent for less than `MIN_NEW_AUDIO_MS` of new audio, or for an
//!   utterance shorter than `MIN_AUDIO_MS` or longer than `MAX_AUDIO_MS`;
//! - a partial needs a slot of the server-wide interim budget and a free
//!   slot of the request limit, and takes neither by waiting: when either is
//!   used up the partial is shed (counted), never a final;
//! - no retries, and a partial in flight is abandoned when the session stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tracing::Instrument;

use super::backend::{Backend, UtteranceRequest};
use super::order::Outcome;
use super::queue::Queue;
use super::{TranscriptionService, SAMPLE_RATE};
use crate::protocol::Transcript;
use crate::telemetry::names;

/// Less new audio than this is not worth a request.
const MIN_NEW_AUDIO_MS: u64 = 250;
/// An utterance this short gets no partial: its final is near.
const MIN_AUDIO_MS: u64 = 500;
/// Longer utterances get no more partials (their final still comes): the
/// cap on what one partial sends.
pub(super) const MAX_AUDIO_MS: u64 = 30_000;

fn samples_of(ms: u64) -> u64 {
    ms.saturating_mul(u64::from(SAMPLE_RATE)) / 1000
}

/// When a partial is due. Pure: lengths are samples of the open utterance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Schedule {
    interval_samples: u64,
    min_audio_samples: u64,
    max_audio_samples: u64,
}

impl Schedule {
    pub(super) fn new(interval_ms: u64) -> Self {
        Self {
            interval_samples: samples_of(interval_ms.max(MIN_NEW_AUDIO_MS)),
            min_audio_samples: samples_of(MIN_AUDIO_MS),
            max_audio_samples: samples_of(MAX_AUDIO_MS),
        }
    }

    /// Whether to send the open utterance, now `length` samples long, whose
    /// last partial (if any) was taken at `last_sent` samples, when a
    /// partial of this session is (`in_flight`) or is not on its way.
    pub(super) fn due(&self, length: u64, last_sent: Option<u64>, in_flight: bool) -> bool {
        !in_flight
            && length >= self.min_audio_samples
            && length <= self.max_audio_samples
            && length.saturating_sub(last_sent.unwrap_or(0)) >= self.interval_samples
    }
}

/// The partials of one session.
pub(super) struct Interim {
    schedule: Schedule,
    /// Per channel: the open utterance and how long it was at its last
    /// partial (sent or shed).
    last_sent: Vec<Option<(u64, u64)>>,
    in_flight: Arc<AtomicBool>,
    backend: Arc<Backend>,
    service: Arc<TranscriptionService>,
    queue: Arc<Queue>,
    outcomes: mpsc::UnboundedSender<Outcome>,
    session_id: Arc<str>,
    metadata: Arc<Map<String, Value>>,
}

/// Clears the session's in-flight flag however the request task ends.
struct InFlight(Arc<AtomicBool>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

pub(super) struct InterimParts {
    pub(super) channels: usize,
    pub(super) backend: Arc<Backend>,
    pub(super) service: Arc<TranscriptionService>,
    pub(super) queue: Arc<Queue>,
    pub(super) outcomes: mpsc::UnboundedSender<Outcome>,
    pub(super) session_id: String,
    pub(super) metadata: Arc<Map<String, Value>>,
}

impl Interim {
    pub(super) fn new(parts: InterimParts) -> Self {
        Self {
            schedule: Schedule::new(parts.service.config.interim_interval_ms),
            last_sent: vec![None; parts.channels],
            in_flight: Arc::new(AtomicBool::new(false)),
            backend: parts.backend,
            service: parts.service,
            queue: parts.queue,
            outcomes: parts.outcomes,
            session_id: parts.session_id.into(),
            metadata: parts.metadata,
        }
    }

    /// Called after each write with the open utterance of `channel`
    /// (`id`, its first sample `start`, its audio so far).
    pub(super) fn on_audio(&mut self, channel: u16, id: u64, start: u64, samples: &[i16]) {
        let Some(slot) = self.last_sent.get_mut(usize::from(channel)) else {
            return;
        };
        let last = slot.filter(|(open, _)| *open == id).map(|(_, at)| at);
        let length = samples.len() as u64;
        if !self
            .schedule
            .due(length, last, self.in_flight.load(Ordering::Acquire))
        {
            return;
        }
        // Counted as taken whether it is sent or shed: the next try comes
        // an interval later, not on every write of a busy server.
        *slot = Some((id, length));
        let permits = self
            .service
            .interim_requests
            .clone()
            .try_acquire_owned()
            .ok()
            .zip(
                self.service
                    .global_requests
                    .clone()
                    .try_acquire_owned()
                    .ok(),
            );
        let Some(permits) = permits else {
            metrics::counter!(names::TRANSCRIBE_PARTIALS_SHED_TOTAL).increment(1);
            tracing::debug!(
                utterance_id = id,
                "partial shed: the interim budget is used up"
            );
            return;
        };
        self.in_flight.store(true, Ordering::Release);
        let request = PartialRequest {
            id,
            channel,
            start,
            samples: samples.to_vec(),
            backend: self.backend.clone(),
            service: self.service.clone(),
            outcomes: self.outcomes.clone(),
            session_id: self.session_id.clone(),
            metadata: self.metadata.clone(),
        };
        let queue = self.queue.clone();
        let in_flight = InFlight(self.in_flight.clone());
        tokio::spawn(
            async move {
                let _permits = permits;
                let _in_flight = in_flight;
                tokio::select! {
                    () = request.run() => {}
                    // The session stopped: its final matters, this does not.
                    () = queue.wait_closed() => {}
                }
            }
            .in_current_span(),
        );
    }
}

struct PartialRequest {
    id: u64,
    channel: u16,
    start: u64,
    samples: Vec<i16>,
    backend: Arc<Backend>,
    service: Arc<TranscriptionService>,
    outcomes: mpsc::UnboundedSender<Outcome>,
    session_id: Arc<str>,
    metadata: Arc<Map<String, Value>>,
}

impl PartialRequest {
    async fn run(self) {
        let rate = f64::from(SAMPLE_RATE);
        let start_seconds = self.start as f64 / rate;
        let end_seconds = (self.start + self.samples.len() as u64) as f64 / rate;
        let utterance = UtteranceRequest {
            session_id: &self.session_id,
            utterance_id: self.id,
            channel: self.channel,
            start_seconds,
            end_seconds,
            samples: &self.samples,
            metadata: &self.metadata,
        };
        let timeout = Duration::from_millis(self.service.config.request_timeout_ms);
        let started = Instant::now();
        let result = self
            .backend
            .transcribe(&self.service.client, &utterance, timeout, false)
            .await;
        let outcome = if result.is_ok() {
            "partial"
        } else {
            "partial_failed"
        };
        metrics::counter!(names::TRANSCRIBE_REQUESTS_TOTAL, "backend" => self.backend.name.clone(), "outcome" => outcome).increment(1);
        match result {
            Ok(reply) => {
                let _ = self.outcomes.send(Outcome::Partial(Transcript {
                    utterance_id: self.id,
                    channel: self.channel,
                    start: start_seconds,
                    end: end_seconds,
                    text: reply.text,
                    stable_text: None,
                    is_final: false,
                    words: None,
                    backend: self.backend.name.clone(),
                    backend_ms: started.elapsed().as_millis() as u64,
                }));
            }
            // A lost partial costs nothing the final will not bring.
            Err(error) => {
                tracing::debug!(utterance_id = self.id, %error, "partial request failed")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 16;

    #[test]
    fn a_partial_is_due_every_interval_of_new_audio() {
        let schedule = Schedule::new(1_000);
        assert!(!schedule.due(999 * MS, None, false));
        assert!(schedule.due(1_000 * MS, None, false));
        assert!(!schedule.due(1_900 * MS, Some(1_000 * MS), false));
        assert!(schedule.due(2_000 * MS, Some(1_000 * MS), false));
    }

    #[test]
    fn a_tick_is_skipped_while_a_partial_is_in_flight_and_caught_up_after() {
        let schedule = Schedule::new(1_000);
        assert!(!schedule.due(2_000 * MS, Some(1_000 * MS), true));
        // The answer came back late: the next write sends at once.
        assert!(schedule.due(2_600 * MS, Some(1_000 * MS), false));
    }

    #[test]
    fn short_intervals_still_wait_for_new_audio_and_a_minimum_length() {
        let schedule = Schedule::new(100);
        // Never less than 250 ms of new audio, never under 500 ms in all.
        assert!(!schedule.due(400 * MS, None, false));
        assert!(schedule.due(500 * MS, None, false));
        assert!(!schedule.due(700 * MS, Some(500 * MS), false));
        assert!(schedule.due(750 * MS, Some(500 * MS), false));
    }

    #[test]
    fn very_long_utterances_get_no_more_partials() {
        let schedule = Schedule::new(1_000);
        assert!(schedule.due(MAX_AUDIO_MS * MS, Some(0), false));
        assert!(!schedule.due((MAX_AUDIO_MS + 1_000) * MS, Some(MAX_AUDIO_MS * MS), false));
    }
}
