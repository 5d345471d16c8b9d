//! The sink itself: the audio path runs only the detector and copies
//! samples; it starts the sender and orderer tasks that do the waiting.

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch, Semaphore};
use tracing::Instrument;

use super::backend::Backend;
use super::detector::Earshot;
use super::interim::{Interim, InterimParts};
use super::order::{start_orderer, Outcome};
use super::queue::{Queue, Utterance};
use super::segment::{Segment, Segmenter};
use super::sender::Sender;
use super::{TranscriptionService, NAME, SAMPLE_RATE};
use crate::pipeline::convert::{Layout, OutputFormat};
use crate::pipeline::{AudioBlock, BlockSamples};
use crate::protocol::{ServerMessage, VadEvent, VadEventKind};
use crate::sinks::{Completion, Sink, SinkContext, SinkError, SinkEvent};
use crate::telemetry::names;

/// The sink.
pub struct Transcriber {
    channels: Vec<Segmenter<Earshot>>,
    /// One channel's samples, de-interleaved.
    scratch: Vec<f32>,
    segments: Vec<Segment>,
    /// The open utterance of each channel.
    current: Vec<Option<u64>>,
    next_id: u64,
    max_pending: usize,
    queue: Arc<Queue>,
    outcomes: mpsc::UnboundedSender<Outcome>,
    events: mpsc::UnboundedSender<SinkEvent>,
    utterances_total: metrics::Counter,
    /// `interim=true`: partials of open utterances.
    interim: Option<Interim>,
}

impl Transcriber {
    /// Starts the sender and orderer tasks (on the current runtime) and
    /// returns the sink that feeds them. With `interim`, open utterances
    /// also get partial transcripts.
    pub fn start(
        context: &SinkContext,
        service: &Arc<TranscriptionService>,
        backend: Arc<Backend>,
        events: mpsc::UnboundedSender<SinkEvent>,
        interim: bool,
    ) -> Self {
        let config = &service.config;
        let settings = config.segmenter_settings();
        let channels = usize::from(context.format.channels);
        let queue = Arc::new(Queue::new());
        let span = tracing::info_span!("transcribe", backend = %backend.name);
        let outcomes_tx = start_orderer(service, &context.session_id, &events, &span);
        let metadata = Arc::new(context.metadata.clone());
        let interim = interim.then(|| {
            Interim::new(InterimParts {
                channels,
                backend: backend.clone(),
                service: service.clone(),
                queue: queue.clone(),
                outcomes: outcomes_tx.clone(),
                session_id: context.session_id.clone(),
                metadata: metadata.clone(),
            })
        });
        let sender = Sender {
            queue: queue.clone(),
            backend,
            service: service.clone(),
            session_requests: Arc::new(Semaphore::new(config.max_concurrent_requests_per_session)),
            outcomes: outcomes_tx.clone(),
            session_id: context.session_id.clone(),
            metadata,
            stop_deadline: watch::channel(None).0,
        };
        tokio::spawn(sender.run().instrument(span));
        Self {
            channels: (0..channels)
                .map(|_| Segmenter::new(Earshot::new(), settings, config.vad.threshold))
                .collect(),
            scratch: Vec::new(),
            segments: Vec::new(),
            current: vec![None; channels],
            next_id: 0,
            max_pending: config.max_pending_utterances,
            queue,
            outcomes: outcomes_tx,
            events,
            utterances_total: metrics::counter!(names::TRANSCRIBE_UTTERANCES_TOTAL),
            interim,
        }
    }

    /// Offers the open utterance of `channel`, if any, for a partial.
    fn offer_partial(&mut self, channel: usize) {
        let (Some(interim), Some(Some(id))) = (self.interim.as_mut(), self.current.get(channel))
        else {
            return;
        };
        if let Some((start, samples)) = self.channels[channel].open_utterance() {
            interim.on_audio(channel as u16, *id, start, samples);
        }
    }

    /// Turns what the segmenter of `channel` found into events and queued
    /// utterances.
    fn take_segments(&mut self, channel: usize) {
        let channel_u16 = channel as u16;
        for segment in std::mem::take(&mut self.segments) {
            match segment {
                Segment::SpeechStarted { at } => {
                    let id = self.next_id;
                    self.next_id += 1;
                    self.current[channel] = Some(id);
                    let _ = self.outcomes.send(Outcome::Created {
                        id,
                        channel: channel_u16,
                    });
                    self.vad(VadEventKind::SpeechStarted, channel_u16, at, id);
                }
                Segment::SpeechEnded { at } => {
                    if let Some(id) = self.current[channel] {
                        self.vad(VadEventKind::SpeechEnded, channel_u16, at, id);
                    }
                }
                Segment::Utterance { start, samples } => {
                    let Some(id) = self.current[channel].take() else {
                        continue;
                    };
                    self.utterances_total.increment(1);
                    let utterance = Utterance {
                        id,
                        channel: channel_u16,
                        start,
                        samples,
                    };
                    for shed in self.queue.push(utterance, self.max_pending) {
                        metrics::counter!(names::TRANSCRIBE_UTTERANCES_SHED_TOTAL).increment(1);
                        tracing::warn!(
                            utterance_id = shed.id,
                            channel = shed.channel,
                            "transcription backlog full: oldest utterance dropped"
                        );
                        let _ = self.outcomes.send(Outcome::Shed {
                            id: shed.id,
                            channel: shed.channel,
                        });
                    }
                }
            }
        }
    }

    fn vad(&self, event: VadEventKind, channel: u16, at: u64, utterance_id: u64) {
        let message = ServerMessage::Vad(VadEvent {
            event,
            channel,
            time: at as f64 / f64::from(SAMPLE_RATE),
            utterance_id,
        });
        let _ = self.events.send(SinkEvent::Message(message));
    }

    fn end_all(&mut self, finish: bool) {
        for channel in 0..self.channels.len() {
            let mut segments = std::mem::take(&mut self.segments);
            if finish {
                self.channels[channel].finish(&mut segments);
            } else {
                self.channels[channel].force_end(&mut segments);
            }
            self.segments = segments;
            self.take_segments(channel);
        }
    }
}

impl Sink for Transcriber {
    fn name(&self) -> &'static str {
        NAME
    }

    fn output_format(&self) -> OutputFormat {
        OutputFormat {
            sample_rate: Some(SAMPLE_RATE),
            layout: Layout::Keep,
        }
    }

    fn write(&mut self, block: &AudioBlock, _now: Instant) -> Result<(), SinkError> {
        let channels = self.channels.len();
        for channel in 0..channels {
            self.scratch.clear();
            match &block.samples {
                BlockSamples::Audio(samples) => self.scratch.extend(
                    samples
                        .iter()
                        .skip(channel)
                        .step_by(usize::from(block.channels).max(1)),
                ),
                BlockSamples::Silence => self.scratch.resize(block.frames, 0.0),
            }
            let mut segments = std::mem::take(&mut self.segments);
            self.channels[channel].push(&self.scratch, &mut segments);
            self.segments = segments;
            self.take_segments(channel);
            self.offer_partial(channel);
        }
        Ok(())
    }

    /// `flush` sends each channel's open utterance at once.
    fn flush(&mut self, _now: Instant) -> Result<Completion, SinkError> {
        self.end_all(false);
        Ok(Completion::Done)
    }

    fn finish(mut self: Box<Self>) -> Result<Vec<ServerMessage>, SinkError> {
        self.end_all(true);
        self.queue.close();
        Ok(Vec::new())
    }

    fn abort(self: Box<Self>, _reason: &str) {
        self.queue.close();
    }
}
