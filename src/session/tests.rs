//! Unit tests of [`SessionCore`]: no server, no socket, no runtime. Time is a
//! fixed `Instant` advanced by hand, the sinks are fakes that log every call,
//! and the driver's part (finishing the sinks, forwarding what they report,
//! aborting a failed one) is done by [`Harness`] the way
//! `server::session` does it.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TryRecvError;

use super::{Input, Output, SessionCore, SessionLimits};
use crate::config::Config;
use crate::pipeline::convert::{Layout, OutputFormat};
use crate::pipeline::{AudioBlock, BlockSamples};
use crate::protocol::{
    Encoding, Framing, ProtocolError, RecordingInfo, SeqHeader, ServerMessage, StartRequest,
    StreamFormat, VadEvent, VadEventKind,
};
use crate::server::close::SessionError;
use crate::server::dialect::native::Native;
use crate::sinks::registry::{Emitter, Emitters, Planned, SinkFactory, SinkPlan, SinkSpec};
use crate::sinks::{Completion, Sink, SinkContext, SinkError, SinkEvent};

// ───────────────────────────── the test kit ─────────────────────────────

/// Everything a fake sink was asked to do, in order, across all sinks.
#[derive(Debug, Clone, PartialEq)]
enum Call {
    Built {
        sink: &'static str,
        format: StreamFormat,
        metadata: Map<String, Value>,
    },
    Write {
        sink: &'static str,
        block: Written,
    },
    Flush {
        sink: &'static str,
    },
    Commit {
        sink: &'static str,
    },
    Deadline {
        sink: &'static str,
    },
    Finish {
        sink: &'static str,
    },
    Abort {
        sink: &'static str,
        reason: String,
    },
}

/// One block as a sink received it (`samples` empty for silence).
#[derive(Debug, Clone, PartialEq)]
struct Written {
    start_frame: u64,
    frames: usize,
    channels: u16,
    silence: bool,
    samples: Vec<f32>,
}

impl From<&AudioBlock> for Written {
    fn from(block: &AudioBlock) -> Self {
        let (silence, samples) = match &block.samples {
            BlockSamples::Audio(samples) => (false, samples.clone()),
            BlockSamples::Silence => (true, Vec::new()),
        };
        Self {
            start_frame: block.start_frame,
            frames: block.frames,
            channels: block.channels,
            silence,
            samples,
        }
    }
}

/// State the fakes share with the test: the call log, and knobs the test
/// turns while the session runs.
#[derive(Default)]
struct Shared {
    calls: Mutex<Vec<Call>>,
    /// When a sink wants `on_deadline` (cleared once called).
    deadlines: Mutex<HashMap<&'static str, Instant>>,
    /// Sinks whose next write fails.
    fail_next_write: Mutex<HashSet<&'static str>>,
    /// Bytes a sink says it has not written yet.
    pending_bytes: Mutex<HashMap<&'static str, usize>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Shared {
    fn log(&self, call: Call) {
        lock(&self.calls).push(call);
    }

    fn calls(&self) -> Vec<Call> {
        lock(&self.calls).clone()
    }

    /// The blocks `sink` received, in order.
    fn writes(&self, sink: &str) -> Vec<Written> {
        self.calls()
            .into_iter()
            .filter_map(|call| match call {
                Call::Write { sink: s, block } if s == sink => Some(block),
                _ => None,
            })
            .collect()
    }

    fn frames_written(&self, sink: &str) -> u64 {
        self.writes(sink).iter().map(|w| w.frames as u64).sum()
    }

    fn count(&self, wanted: impl Fn(&Call) -> bool) -> usize {
        lock(&self.calls).iter().filter(|c| wanted(c)).count()
    }
}

/// How one configured fake sink behaves.
#[derive(Debug, Clone, Copy)]
struct Fake {
    name: &'static str,
    /// The rate it wants its audio at (`None`: the stream's).
    rate: Option<u32>,
    /// Fail the Nth write (1-based), returning the error.
    fail_on_write: Option<usize>,
    /// After the Nth write succeeds, report the failure through the emitter
    /// instead (a sink whose own writer thread failed).
    fail_via_emitter_after_write: Option<usize>,
    /// After the Nth write, report a `vad` event through the emitter.
    emit_after_write: Option<usize>,
    /// `finish` fails instead of reporting a recording.
    fail_finish: bool,
    /// Flushes and commits complete later (reported through the emitter),
    /// as a sink that writes off the session's thread does.
    deferred: bool,
}

impl Fake {
    const fn named(name: &'static str) -> Self {
        Self {
            name,
            rate: None,
            fail_on_write: None,
            fail_via_emitter_after_write: None,
            emit_after_write: None,
            fail_finish: false,
            deferred: false,
        }
    }

    const fn at_rate(mut self, rate: u32) -> Self {
        self.rate = Some(rate);
        self
    }
}

struct FakeSpec {
    fake: Fake,
    shared: Arc<Shared>,
}

impl SinkSpec for FakeSpec {
    fn name(&self) -> &str {
        self.fake.name
    }

    fn sample_rate(&self) -> Option<u32> {
        self.fake.rate
    }

    fn build(
        &self,
        context: &SinkContext,
        emitters: &mut Emitters,
    ) -> Result<Vec<Box<dyn Sink>>, SinkError> {
        self.shared.log(Call::Built {
            sink: self.fake.name,
            format: context.format,
            metadata: context.metadata.clone(),
        });
        Ok(vec![Box::new(FakeSink {
            fake: self.fake,
            shared: self.shared.clone(),
            emitter: emitters.next_emitter(),
            rate: self.fake.rate.unwrap_or(context.format.sample_rate),
            channels: context.format.channels,
            writes: 0,
            frames: 0,
        })])
    }
}

impl FakeSink {
    fn completion(&self) -> Completion {
        if self.fake.deferred {
            Completion::Later
        } else {
            Completion::Done
        }
    }
}

struct FakeSink {
    fake: Fake,
    shared: Arc<Shared>,
    emitter: Emitter,
    rate: u32,
    channels: u16,
    writes: usize,
    frames: u64,
}

impl Sink for FakeSink {
    fn name(&self) -> &'static str {
        self.fake.name
    }

    fn output_format(&self) -> OutputFormat {
        OutputFormat {
            sample_rate: self.fake.rate,
            layout: Layout::Keep,
        }
    }

    fn write(&mut self, block: &AudioBlock, _now: Instant) -> Result<(), SinkError> {
        self.writes += 1;
        let fail_now = lock(&self.shared.fail_next_write).remove(self.fake.name);
        if fail_now || self.fake.fail_on_write == Some(self.writes) {
            return Err(SinkError::Failed {
                sink: self.fake.name,
                message: format!("write {} refused", self.writes),
            });
        }
        self.frames += block.frames as u64;
        self.shared.log(Call::Write {
            sink: self.fake.name,
            block: block.into(),
        });
        if self.fake.emit_after_write == Some(self.writes) {
            self.emitter.message(ServerMessage::Vad(VadEvent {
                event: VadEventKind::SpeechStarted,
                channel: 0,
                time: block.start_frame as f64 / f64::from(self.rate),
                utterance_id: 0,
            }));
        }
        if self.fake.fail_via_emitter_after_write == Some(self.writes) {
            self.emitter.failed(SinkError::Failed {
                sink: self.fake.name,
                message: "the writer thread failed".into(),
            });
        }
        Ok(())
    }

    fn flush(&mut self, _now: Instant) -> Result<Completion, SinkError> {
        self.shared.log(Call::Flush {
            sink: self.fake.name,
        });
        Ok(self.completion())
    }

    fn commit(&mut self, _now: Instant) -> Result<Completion, SinkError> {
        self.shared.log(Call::Commit {
            sink: self.fake.name,
        });
        Ok(self.completion())
    }

    fn pending_bytes(&self) -> usize {
        lock(&self.shared.pending_bytes)
            .get(self.fake.name)
            .copied()
            .unwrap_or(0)
    }

    fn next_deadline(&self) -> Option<Instant> {
        lock(&self.shared.deadlines).get(self.fake.name).copied()
    }

    fn on_deadline(&mut self, _now: Instant) -> Result<(), SinkError> {
        lock(&self.shared.deadlines).remove(self.fake.name);
        self.shared.log(Call::Deadline {
            sink: self.fake.name,
        });
        Ok(())
    }

    fn finish(self: Box<Self>) -> Result<Vec<ServerMessage>, SinkError> {
        self.shared.log(Call::Finish {
            sink: self.fake.name,
        });
        if self.fake.fail_finish {
            return Err(SinkError::Failed {
                sink: self.fake.name,
                message: "could not finalize".into(),
            });
        }
        Ok(vec![ServerMessage::Recording(Box::new(RecordingInfo {
            path: format!("/recordings/{}.wav", self.fake.name),
            sidecar_path: format!("/recordings/{}.json", self.fake.name),
            duration_seconds: self.frames as f64 / f64::from(self.rate),
            sample_frames: self.frames,
            sample_rate: self.rate,
            channels: self.channels,
            format: "wav",
            sample_format: "s16",
            channel: None,
            sink: None,
            bytes: 44 + self.frames * 2 * u64::from(self.channels),
            sha256: "0".repeat(64),
            url: String::new(),
            uri: None,
            uploaded: None,
        }))])
    }

    fn abort(self: Box<Self>, reason: &str) {
        self.shared.log(Call::Abort {
            sink: self.fake.name,
            reason: reason.to_owned(),
        });
    }
}

/// The sinks a server knows, by name; `default` when the client names none.
struct FakeFactory {
    specs: Vec<Arc<FakeSpec>>,
    default: Vec<String>,
}

impl SinkFactory for FakeFactory {
    fn plan(
        &self,
        sinks: Option<&[String]>,
        transcribe: Option<&str>,
    ) -> Result<Planned, SinkError> {
        let names = sinks.unwrap_or(&self.default);
        let mut specs: Vec<Arc<dyn SinkSpec>> = Vec::new();
        for name in names {
            let Some(spec) = self.specs.iter().find(|s| s.fake.name == name) else {
                return Err(SinkError::UnknownSink {
                    name: name.clone(),
                    available: self
                        .specs
                        .iter()
                        .map(|s| s.fake.name)
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            };
            specs.push(spec.clone());
        }
        if let Some(backend) = transcribe.filter(|b| *b != "none") {
            return Err(SinkError::UnknownBackend(format!(
                "unknown transcription backend '{backend}': none is configured"
            )));
        }
        Ok(Planned {
            plan: SinkPlan::new(specs),
            transcribe: None,
        })
    }
}

/// Short intervals, so that a test's clock moves by milliseconds.
fn config() -> Config {
    Config {
        idle_timeout_ms: 5_000,
        idle_close_code: 1000,
        ack_interval_ms: 100,
        stats_interval_ms: 1_000,
        resume_window_ms: 1_000,
        max_gap_ms: 100,
        max_session_duration_ms: 0,
        max_realtime_factor: 0.0,
        default_sinks: vec!["rec".into()],
        ..Config::default()
    }
}

/// A query string as the server hands it to the core.
fn query(text: &str) -> Result<StartRequest, ProtocolError> {
    StartRequest::from_query(
        text.split('&')
            .filter(|pair| !pair.is_empty())
            .map(|pair| pair.split_once('=').unwrap_or((pair, ""))),
    )
}

/// What the core asked the driver to do, in a form tests can compare.
#[derive(Debug, Clone, PartialEq)]
enum Ev {
    Msg(Value),
    /// Cluster mode: an event for NATS.
    Event(Value),
    /// Cluster mode: journal what arrived, for the ack of this seq.
    Persist(u32),
    Resumable(String),
    AnswerClose,
    CloseSuperseded,
    /// The sinks handed over to be finished, by name.
    FinishSinks(Vec<&'static str>),
    AbortSink(&'static str),
    Park,
    /// `transport: webrtc`: the offer to negotiate.
    Negotiate(String),
    Close {
        code: u16,
        reason: String,
        drain: bool,
    },
}

type Finishing = (
    Vec<(usize, Box<dyn Sink>)>,
    mpsc::UnboundedSender<SinkEvent>,
);

/// One session core, its fakes, and the driver's part of the work.
struct Harness {
    core: SessionCore,
    events: mpsc::UnboundedReceiver<SinkEvent>,
    shared: Arc<Shared>,
    t0: Instant,
    now: Instant,
    finishing: Option<Finishing>,
}

const REC: Fake = Fake::named("rec");
const TX: Fake = Fake::named("tx");

impl Harness {
    /// The test config and two plain sinks, `rec` (the default) and `tx`,
    /// opened with `query_text`.
    fn new(query_text: &str) -> Self {
        Self::with(config(), &[REC, TX], SessionLimits::default(), query_text)
    }

    fn with_config(config: Config, query_text: &str) -> Self {
        Self::with(config, &[REC, TX], SessionLimits::default(), query_text)
    }

    fn with_sinks(fakes: &[Fake], query_text: &str) -> Self {
        Self::with(config(), fakes, SessionLimits::default(), query_text)
    }

    fn with(config: Config, fakes: &[Fake], limits: SessionLimits, query_text: &str) -> Self {
        let shared = Arc::new(Shared::default());
        let factory = FakeFactory {
            specs: fakes
                .iter()
                .map(|&fake| {
                    Arc::new(FakeSpec {
                        fake,
                        shared: shared.clone(),
                    })
                })
                .collect(),
            default: config.default_sinks.clone(),
        };
        let (events_tx, events) = mpsc::unbounded_channel();
        let t0 = Instant::now();
        let mut core = SessionCore::new(
            "0193a7c4-5e2f-7d31-8b6a-4c2e9f0a1b3d".into(),
            Arc::new(config),
            Arc::new(factory),
            Box::new(Native),
            events_tx,
            limits,
            t0,
            SystemTime::UNIX_EPOCH,
        );
        core.open(query(query_text), t0);
        Self {
            core,
            events,
            shared,
            t0,
            now: t0,
            finishing: None,
        }
    }

    fn ms(&self, ms: u64) -> Instant {
        self.t0 + Duration::from_millis(ms)
    }

    /// Moves the clock to `ms` after the connection was made.
    fn at(&mut self, ms: u64) -> &mut Self {
        let to = self.ms(ms);
        assert!(to >= self.now, "the clock only moves forward");
        self.now = to;
        self
    }

    fn input(&mut self, input: Input<'_>) -> Vec<Ev> {
        self.core.handle_input(input, self.now);
        self.drain()
    }

    fn text(&mut self, text: &str) -> Vec<Ev> {
        self.input(Input::Text(text))
    }

    fn audio(&mut self, bytes: Vec<u8>) -> Vec<Ev> {
        let bytes = Bytes::from(bytes);
        self.input(Input::Binary(&bytes))
    }

    fn timeout(&mut self) -> Vec<Ev> {
        self.input(Input::Timeout)
    }

    /// Feeds what the sinks reported through their emitters, as the driver does.
    fn pump(&mut self) -> Vec<Ev> {
        while let Ok(event) = self.events.try_recv() {
            self.core.handle_input(Input::Sink(event), self.now);
        }
        self.drain()
    }

    /// The core's outputs, doing the driver's part for sinks: a failed sink
    /// is aborted at once, finishing sinks are kept for [`Self::finish_sinks`].
    fn drain(&mut self) -> Vec<Ev> {
        let mut out = Vec::new();
        while let Some(output) = self.core.poll_output() {
            out.push(match output {
                Output::Text(text) => Ev::Msg(
                    serde_json::from_str(&text)
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {text}")),
                ),
                Output::Event(json) => Ev::Event(
                    serde_json::from_str(&json)
                        .unwrap_or_else(|e| panic!("not JSON ({e}): {json}")),
                ),
                Output::Persist { seq } => Ev::Persist(seq),
                Output::Negotiate { offer } => Ev::Negotiate(offer),
                Output::Resumable { token } => Ev::Resumable(token),
                Output::AnswerClose => Ev::AnswerClose,
                Output::CloseSuperseded => Ev::CloseSuperseded,
                Output::FinishSinks { sinks, events } => {
                    assert!(self.finishing.is_none(), "sinks handed over twice");
                    let names = sinks.iter().map(|(_, s)| s.name()).collect();
                    self.finishing = Some((sinks, events));
                    Ev::FinishSinks(names)
                }
                Output::AbortSink { sink, reason } => {
                    let name = sink.name();
                    sink.abort(&reason);
                    Ev::AbortSink(name)
                }
                Output::Park => Ev::Park,
                Output::Close {
                    code,
                    reason,
                    drain,
                } => Ev::Close {
                    code,
                    reason,
                    drain,
                },
            });
        }
        out
    }

    /// The driver's finishing step: `finish()` on each sink handed over,
    /// their messages (or failure) fed back, the channel closed, then
    /// `SinksFinished`.
    fn finish_sinks(&mut self) -> Vec<Ev> {
        let (sinks, events) = self
            .finishing
            .take()
            .expect("the core handed the sinks over to be finished");
        for (index, sink) in sinks {
            match sink.finish() {
                Ok(messages) => {
                    for message in messages {
                        let event = SinkEvent::Message(message);
                        self.core.handle_input(Input::Sink(event), self.now);
                    }
                }
                Err(error) => {
                    let event = SinkEvent::Failed { index, error };
                    self.core.handle_input(Input::Sink(event), self.now);
                }
            }
        }
        drop(events);
        let mut out = self.pump();
        // The driver learns that the sinks are done only when every sender
        // is gone: one kept anywhere would hang the session forever.
        assert!(
            matches!(self.events.try_recv(), Err(TryRecvError::Disconnected)),
            "a sender of the sinks' channel outlived the sinks"
        );
        self.core.handle_input(Input::SinksFinished, self.now);
        out.extend(self.drain());
        out
    }

    fn calls(&self) -> Vec<Call> {
        self.shared.calls()
    }

    fn writes(&self, sink: &str) -> Vec<Written> {
        self.shared.writes(sink)
    }
}

/// A short name for each output, for order checks: the message `type`
/// (`error:<code>` / `warning:<code>` for errors), or the output's name.
fn kinds(evs: &[Ev]) -> Vec<String> {
    evs.iter()
        .map(|ev| match ev {
            Ev::Msg(m) => {
                let kind = m["type"].as_str().unwrap_or("?");
                if kind == "error" {
                    let severity = if m["fatal"] == json!(true) {
                        "error"
                    } else {
                        "warning"
                    };
                    format!("{severity}:{}", m["code"].as_str().unwrap_or("?"))
                } else {
                    kind.to_owned()
                }
            }
            Ev::Event(m) => format!("Event {}", m["type"].as_str().unwrap_or("?")),
            Ev::Persist(seq) => format!("Persist {seq}"),
            Ev::Resumable(_) => "Resumable".into(),
            Ev::AnswerClose => "AnswerClose".into(),
            Ev::CloseSuperseded => "CloseSuperseded".into(),
            Ev::FinishSinks(_) => "FinishSinks".into(),
            Ev::AbortSink(name) => format!("AbortSink {name}"),
            Ev::Park => "Park".into(),
            Ev::Negotiate(_) => "Negotiate".into(),
            Ev::Close { code, reason, .. } => format!("Close {code} {reason}"),
        })
        .collect()
}

/// The messages of type `kind`.
fn messages<'a>(evs: &'a [Ev], kind: &str) -> Vec<&'a Value> {
    evs.iter()
        .filter_map(|ev| match ev {
            Ev::Msg(m) if m["type"] == kind => Some(m),
            _ => None,
        })
        .collect()
}

fn only<'a>(evs: &'a [Ev], kind: &str) -> &'a Value {
    let found = messages(evs, kind);
    assert_eq!(found.len(), 1, "one {kind} in {:?}", kinds(evs));
    found[0]
}

fn close_of(evs: &[Ev]) -> (u16, String, bool) {
    match evs.last() {
        Some(Ev::Close {
            code,
            reason,
            drain,
        }) => (*code, reason.clone(), *drain),
        _ => panic!("the last output is not the close: {:?}", kinds(evs)),
    }
}

/// Ends the session as the driver would, and checks the order the protocol
/// gives to a session that ends on error (§6.6): the `error` (fatal, with
/// its code), the sinks finished, their results, `closed` with reason
/// `error` and the close code, and the close frame with the code as its
/// reason text, after draining what the client still sends.
fn assert_ends_with_error(h: &mut Harness, mut evs: Vec<Ev>, code: &str, close_code: u16) {
    evs.extend(h.finish_sinks());
    let k = kinds(&evs);
    let errors: Vec<_> = k.iter().filter(|k| k.starts_with("error:")).collect();
    assert_eq!(errors, [&format!("error:{code}")], "in {k:?}");
    let error = only(&evs, "error");
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "a message for humans: {error}"
    );
    let position = |name: &str| k.iter().position(|x| x.starts_with(name));
    let (error_at, finish_at, closed_at) = (
        position("error:").expect("error"),
        position("FinishSinks").expect("FinishSinks"),
        position("closed").expect("closed"),
    );
    assert!(
        error_at < finish_at && finish_at < closed_at,
        "order: {k:?}"
    );
    assert_eq!(closed_at, k.len() - 2, "closed comes just before the close");
    let closed = only(&evs, "closed");
    let reason = if code == "idle_timeout" {
        "idle_timeout"
    } else {
        "error"
    };
    assert_eq!(closed["reason"], reason);
    assert_eq!(closed["close_code"], close_code);
    assert_eq!(close_of(&evs), (close_code, code.to_owned(), true));
    assert!(h.core.is_ended());
}

/// `frames` mono s16 samples counting up from `first`.
fn ramp(first: i16, frames: usize) -> Vec<i16> {
    (0..frames).map(|i| first.wrapping_add(i as i16)).collect()
}

fn s16(samples: &[i16]) -> Vec<u8> {
    samples.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// A `framing=seq` message.
fn seq(seq: u32, timestamp: u64, samples: &[i16]) -> Vec<u8> {
    let mut message = SeqHeader { seq, timestamp }.encode().to_vec();
    message.extend(s16(samples));
    message
}

/// 20 ms at 16 kHz.
const F: usize = 320;

const PCM16K: &str = "encoding=pcm_s16le&sample_rate=16000";
const SEQ16K: &str = "encoding=pcm_s16le&sample_rate=16000&framing=seq";

// ───────────────────────────── lifecycle ─────────────────────────────

#[test]
fn query_with_encoding_starts_the_stream_with_everything_in_started() {
    let mut h = Harness::new(&format!("{PCM16K}&sinks=rec,tx"));
    let evs = h.drain();
    assert_eq!(kinds(&evs), ["started"], "raw framing registers no token");
    let started = only(&evs, "started");
    assert_eq!(started["protocol_version"], 1);
    assert_eq!(
        started["session_id"],
        "0193a7c4-5e2f-7d31-8b6a-4c2e9f0a1b3d"
    );
    assert_eq!(
        started["format"],
        json!({"encoding":"pcm_s16le","sample_rate":16000,"channels":1,"framing":"raw"})
    );
    assert_eq!(started["sinks"], json!(["rec", "tx"]));
    assert_eq!(started["metadata"], json!({}));
    assert_eq!(started["idle_timeout_ms"], 5_000);
    assert_eq!(
        started["max_message_bytes"],
        Config::default().max_message_bytes
    );
    assert!(started.get("resume_token").is_none(), "{started}");
    assert!(started.get("resume_from_seq").is_none(), "{started}");
    assert!(!h.core.resumable());
    let format = StreamFormat {
        encoding: Encoding::PcmS16le,
        sample_rate: 16000,
        channels: 1,
        framing: Framing::Raw,
    };
    assert_eq!(
        h.calls(),
        [
            Call::Built {
                sink: "rec",
                format,
                metadata: Map::new()
            },
            Call::Built {
                sink: "tx",
                format,
                metadata: Map::new()
            },
        ]
    );
}

#[test]
fn start_message_starts_the_stream_over_the_query_and_echoes_metadata() {
    let mut h = Harness::new("sample_rate=8000&sinks=tx");
    assert!(h.drain().is_empty(), "no start yet: nothing said");
    // Allowed before start, and answered.
    assert_eq!(
        kinds(&h.text(r#"{"type":"keepalive"}"#)),
        Vec::<String>::new()
    );
    assert_eq!(kinds(&h.text(r#"{"type":"flush"}"#)), ["flushed"]);
    assert!(h.calls().is_empty(), "no sink is built before start");

    let evs = h.text(
        r#"{"type":"start","encoding":"mulaw","channels":2,"sinks":["rec"],"metadata":{"call_id":"42"}}"#,
    );
    let started = only(&evs, "started");
    assert_eq!(
        started["format"],
        json!({"encoding":"mulaw","sample_rate":8000,"channels":2,"framing":"raw"}),
        "the query's sample_rate, the message's encoding and channels"
    );
    assert_eq!(started["sinks"], json!(["rec"]), "the message's sinks win");
    assert_eq!(started["metadata"], json!({"call_id":"42"}));
    let Call::Built { sink, metadata, .. } = &h.calls()[0] else {
        panic!("{:?}", h.calls());
    };
    assert_eq!(
        (*sink, metadata.get("call_id")),
        ("rec", Some(&json!("42")))
    );
}

#[test]
fn seq_framing_registers_a_resume_token_and_shows_it_in_started() {
    let mut h = Harness::new(SEQ16K);
    let evs = h.drain();
    assert_eq!(kinds(&evs), ["Resumable", "started"]);
    let Ev::Resumable(token) = &evs[0] else {
        unreachable!()
    };
    assert_eq!(token.len(), 32);
    assert!(token.chars().all(|c| c.is_ascii_hexdigit()), "{token}");
    assert_eq!(only(&evs, "started")["resume_token"], json!(token));
    assert_eq!(h.core.resume_token(), Some(token.as_str()));
    assert!(h.core.resumable());
    assert_eq!(h.core.resume_from_seq(), 0);
}

#[test]
fn no_resume_token_when_resume_is_disabled() {
    let mut h = Harness::with_config(
        Config {
            resume_window_ms: 0,
            ..config()
        },
        SEQ16K,
    );
    let evs = h.drain();
    assert_eq!(kinds(&evs), ["started"]);
    assert!(only(&evs, "started").get("resume_token").is_none());
    assert!(!h.core.resumable());
}

#[test]
fn audio_before_start_is_refused_with_1002() {
    let mut h = Harness::new("");
    let evs = h.audio(s16(&ramp(0, F)));
    assert_ends_with_error(&mut h, evs, "audio_before_start", 1002);
    assert!(h.calls().is_empty());
}

#[test]
fn a_second_start_is_already_started() {
    let mut h = Harness::new("");
    let started = h.text(r#"{"type":"start","encoding":"mulaw"}"#);
    assert_eq!(kinds(&started), ["started"]);
    let evs = h.text(r#"{"type":"start","encoding":"mulaw"}"#);
    assert_ends_with_error(&mut h, evs, "already_started", 1002);
}

#[test]
fn start_when_the_query_had_the_format_is_already_started() {
    let mut h = Harness::new("encoding=mulaw");
    h.drain();
    let evs = h.text(r#"{"type":"start"}"#);
    assert_ends_with_error(&mut h, evs, "already_started", 1002);
    assert_eq!(
        h.shared.count(|c| matches!(c, Call::Built { .. })),
        1,
        "the sinks were built once"
    );
}

#[test]
fn in_cluster_mode_every_event_but_acks_goes_to_nats_without_the_resume_token() {
    let mut config = config();
    config.cluster.nats_url = Some("nats://127.0.0.1:4222".into());
    let mut h = Harness::with_config(config, &format!("{SEQ16K}&sinks=rec,tx"));
    let evs = h.drain();
    assert_eq!(kinds(&evs), ["Resumable", "started", "Event started"]);
    let Ev::Event(started) = &evs[2] else {
        unreachable!()
    };
    assert!(only(&evs, "started")["resume_token"].is_string());
    assert_eq!(started.get("resume_token"), None, "{started}");
    assert_eq!(started["session_id"], only(&evs, "started")["session_id"]);
    h.audio(seq(0, 0, &ramp(0, F)));
    let evs = h.at(20).text(r#"{"type":"stop"}"#);
    // The last ack waits for the journal (it would go out before `closed`).
    assert_eq!(
        kinds(&evs),
        ["Persist 0", "stats", "Event stats", "FinishSinks"]
    );
}

#[test]
fn in_cluster_mode_an_ack_waits_until_the_journal_holds_its_audio() {
    let mut config = config();
    config.cluster.nats_url = Some("nats://127.0.0.1:4222".into());
    let mut h = Harness::with_config(config, &format!("{SEQ16K}&sinks=rec"));
    h.drain();
    assert_eq!(
        h.core.journal_request().and_then(|r| r.sample_rate),
        Some(16_000)
    );
    assert!(kinds(&h.audio(seq(0, 0, &ramp(0, F)))).is_empty());
    // The ack interval (100 ms) has passed: the sinks committed, but the
    // ack waits for the journal.
    let evs = h.at(150).audio(seq(1, F as u64, &ramp(0, F)));
    assert_eq!(kinds(&evs), ["Persist 1"]);
    let evs = h.input(Input::Durable { seq: 0 });
    assert!(kinds(&evs).is_empty(), "seq 1 is not durable yet: {evs:?}");
    let evs = h.input(Input::Durable { seq: 1 });
    assert_eq!(kinds(&evs), ["ack"]);
    assert_eq!(only(&evs, "ack")["seq"], 1);
}

#[test]
fn without_cluster_mode_acks_do_not_wait_for_a_journal() {
    let mut h = Harness::new(&format!("{SEQ16K}&sinks=rec"));
    h.drain();
    assert_eq!(h.core.journal_request(), None);
    h.audio(seq(0, 0, &ramp(0, F)));
    let evs = h.at(150).audio(seq(1, F as u64, &ramp(0, F)));
    assert_eq!(kinds(&evs), ["ack"]);
}

#[test]
fn stop_with_pending_sinks_closes_only_after_they_finished_and_reported() {
    let mut h = Harness::new(&format!("{SEQ16K}&sinks=rec,tx"));
    h.drain();
    h.audio(seq(0, 0, &ramp(0, F)));
    h.at(10).audio(seq(1, F as u64, &ramp(0, F)));
    let evs = h.at(20).text(r#"{"type":"stop"}"#);
    assert_eq!(kinds(&evs), ["ack", "stats", "FinishSinks"]);
    assert_eq!(only(&evs, "ack")["seq"], 1, "the final ack covers all");
    assert_eq!(evs[2], Ev::FinishSinks(vec!["rec", "tx"]));
    assert!(h.core.is_finishing() && !h.core.is_ended());
    assert_eq!(h.core.next_deadline(), None, "no timer while finishing");

    // While the sinks finish, the client's messages and timers do nothing.
    assert!(h.audio(seq(2, 2 * F as u64, &ramp(0, F))).is_empty());
    assert!(h.text(r#"{"type":"flush"}"#).is_empty());
    assert!(h.at(10_000).timeout().is_empty());
    assert_eq!(h.shared.count(|c| matches!(c, Call::Finish { .. })), 0);
    assert_eq!(h.writes("rec").len(), 2);

    let evs = h.finish_sinks();
    assert_eq!(
        kinds(&evs),
        ["recording", "recording", "closed", "Close 1000 stop"]
    );
    let closed = only(&evs, "closed");
    assert_eq!(closed["reason"], "stop");
    assert_eq!(closed["close_code"], 1000);
    assert_eq!(closed["sample_frames"], 2 * F);
    assert_eq!(closed["duration_seconds"], 0.04);
    assert_eq!(closed["audio_messages"], 2);
    assert_eq!(closed["audio_bytes"], 2 * (12 + 2 * F));
    assert_eq!(closed["gap_frames"], 0);
    assert_eq!(close_of(&evs), (1000, "stop".into(), false));
    assert_eq!(messages(&evs, "recording")[0]["sample_frames"], 2 * F);
    assert!(h.core.is_ended());
    assert_eq!(h.shared.count(|c| matches!(c, Call::Finish { .. })), 2);
    assert!(h.at(20_000).text(r#"{"type":"stop"}"#).is_empty());
}

// ─────────────────────── the bad-input table (§7) ───────────────────────

#[test]
fn malformed_json_is_1007() {
    let mut h = Harness::new(PCM16K);
    h.drain();
    let evs = h.text("{not json");
    assert_ends_with_error(&mut h, evs, "malformed_json", 1007);
}

#[test]
fn invalid_messages_are_1002() {
    for text in [
        "[1,2]",
        r#"{"type":"start","encoding":"mulaw","samplerate":8000}"#,
        r#"{"type":"start","sample_rate":"16000"}"#,
        r#"{"type":"keepalive","id":1}"#,
        // A start with no encoding, and none in the query.
        r#"{"type":"start","sample_rate":16000}"#,
    ] {
        let mut h = Harness::new("");
        let evs = h.text(text);
        assert_ends_with_error(&mut h, evs, "invalid_message", 1002);
        assert!(h.calls().is_empty(), "{text}: no sink built");
    }
}

#[test]
fn unknown_message_type_is_1002() {
    let mut h = Harness::new(PCM16K);
    h.drain();
    let evs = h.text(r#"{"type":"dance"}"#);
    assert_ends_with_error(&mut h, evs, "unknown_message_type", 1002);
}

#[test]
fn bad_query_strings_end_the_session_at_open() {
    for (text, code, close_code) in [
        ("samplerate=16000", "unknown_parameter", 1002),
        (
            "encoding=mulaw&sample_rate=16k",
            "unsupported_sample_rate",
            1003,
        ),
        (
            "encoding=mulaw&sample_rate=7999",
            "unsupported_sample_rate",
            1003,
        ),
        ("encoding=mulaw&channels=3", "unsupported_channels", 1003),
        ("encoding=mp3", "unsupported_encoding", 1003),
        ("encoding=mulaw&framing=rtp", "unsupported_framing", 1003),
        ("encoding=pcm_s16le", "missing_sample_rate", 1002),
    ] {
        let mut h = Harness::new(text);
        let evs = h.drain();
        assert!(messages(&evs, "started").is_empty(), "{text}");
        assert_ends_with_error(&mut h, evs, code, close_code);
        assert!(h.calls().is_empty(), "{text}: no sink built");
    }
}

#[test]
fn bad_formats_in_start_are_refused_with_their_codes() {
    for (text, code, close_code) in [
        (
            r#"{"type":"start","encoding":"mp3"}"#,
            "unsupported_encoding",
            1003,
        ),
        (
            r#"{"type":"start","encoding":"pcm_s16le","sample_rate":96000}"#,
            "unsupported_sample_rate",
            1003,
        ),
        (
            r#"{"type":"start","encoding":"mulaw","channels":0}"#,
            "unsupported_channels",
            1003,
        ),
        (
            r#"{"type":"start","encoding":"mulaw","framing":"rtp"}"#,
            "unsupported_framing",
            1003,
        ),
        (
            r#"{"type":"start","encoding":"pcm_f32le"}"#,
            "missing_sample_rate",
            1002,
        ),
    ] {
        let mut h = Harness::new("");
        let evs = h.text(text);
        assert!(messages(&evs, "started").is_empty(), "{text}");
        assert_ends_with_error(&mut h, evs, code, close_code);
    }
}

#[test]
fn partial_frame_is_1007_and_what_follows_is_not_acted_on() {
    let mut h = Harness::new(PCM16K);
    h.drain();
    h.audio(s16(&ramp(0, F)));
    let mut bytes = s16(&ramp(0, F));
    bytes.push(0);
    let evs = h.at(10).audio(bytes);
    assert_eq!(
        h.writes("rec").len(),
        1,
        "nothing of the bad message is kept"
    );
    // Messages after the failing one are not acted on.
    h.audio(s16(&ramp(0, F)));
    h.text(r#"{"type":"flush"}"#);
    assert_eq!(h.writes("rec").len(), 1);
    assert_eq!(h.shared.count(|c| matches!(c, Call::Flush { .. })), 0);
    let mut evs = evs;
    evs.extend(h.drain());
    assert_ends_with_error(&mut h, evs, "partial_frame", 1007);
}

#[test]
fn seq_header_truncated_is_1002() {
    let mut h = Harness::new(SEQ16K);
    h.drain();
    let evs = h.audio(vec![0; 8]);
    assert_ends_with_error(&mut h, evs, "seq_header_truncated", 1002);
}

#[test]
fn timestamp_backwards_is_1002() {
    let mut h = Harness::new(SEQ16K);
    h.drain();
    h.audio(seq(0, 0, &ramp(0, F)));
    // Overlaps the previous message by one frame.
    let evs = h.audio(seq(1, F as u64 - 1, &ramp(0, F)));
    assert_ends_with_error(&mut h, evs, "timestamp_backwards", 1002);
}

#[test]
fn a_gap_of_max_gap_ms_is_filled_and_one_frame_more_is_gap_too_large() {
    // max_gap_ms 100 at 16 kHz: 1600 frames.
    let mut h = Harness::new(SEQ16K);
    h.drain();
    h.audio(seq(0, 0, &ramp(0, F)));
    assert!(!kinds(&h.audio(seq(1, (F + 1600) as u64, &ramp(0, F))))
        .iter()
        .any(|k| k.starts_with("error")));
    let next = (2 * F + 1600) as u64;
    let evs = h.audio(seq(2, next + 1601, &ramp(0, F)));
    assert_ends_with_error(&mut h, evs, "gap_too_large", 1008);
}

#[test]
fn unknown_sink_is_1003_before_any_sink_is_built() {
    let mut h = Harness::new(&format!("{PCM16K}&sinks=rec,tape"));
    let evs = h.drain();
    assert!(messages(&evs, "started").is_empty());
    let message = only(&evs, "error")["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(
        message.contains("tape") && message.contains("rec, tx"),
        "{message}"
    );
    assert_ends_with_error(&mut h, evs, "unknown_sink", 1003);
    assert!(h.calls().is_empty(), "{:?}", h.calls());

    let mut h = Harness::new("");
    let evs = h.text(r#"{"type":"start","encoding":"mulaw","sinks":["tape"]}"#);
    assert_ends_with_error(&mut h, evs, "unknown_sink", 1003);
}

#[test]
fn unknown_backend_is_1003() {
    let mut h = Harness::new(&format!("{PCM16K}&transcribe=nope"));
    let evs = h.drain();
    assert_ends_with_error(&mut h, evs, "unknown_backend", 1003);
    assert!(h.calls().is_empty());
}

#[test]
fn transport_failures_close_with_their_codes() {
    for (error, code, close_code) in [
        (
            ProtocolError::MessageTooBig { max_bytes: 65536 },
            "message_too_big",
            1009,
        ),
        (ProtocolError::InvalidUtf8, "invalid_utf8", 1007),
        (
            ProtocolError::WebSocket("continuation frame out of sequence".into()),
            "websocket_protocol",
            1002,
        ),
    ] {
        let mut h = Harness::new(PCM16K);
        h.drain();
        let evs = h.input(Input::Failed(SessionError::Protocol(error)));
        assert_ends_with_error(&mut h, evs, code, close_code);
    }
}

// ───────────────────────────── audio to the sinks ─────────────────────────────

#[test]
fn raw_audio_reaches_every_sink_exactly_in_order() {
    let mut h = Harness::new(&format!("{PCM16K}&sinks=rec,tx"));
    h.drain();
    for (i, first) in [0i16, -100, 32_000].into_iter().enumerate() {
        let evs = h.at(20 * i as u64).audio(s16(&ramp(first, F)));
        assert!(evs.is_empty(), "raw audio is not answered: {evs:?}");
    }
    let rec = h.writes("rec");
    assert_eq!(rec, h.writes("tx"), "both sinks get the same blocks");
    assert_eq!(
        rec.iter()
            .map(|w| (w.start_frame, w.frames, w.channels, w.silence))
            .collect::<Vec<_>>(),
        [(0, F, 1, false), (320, F, 1, false), (640, F, 1, false)]
    );
    let expected: Vec<f32> = ramp(-100, F)
        .into_iter()
        .map(|s| f32::from(s) / 32768.0)
        .collect();
    assert_eq!(rec[1].samples, expected, "s16 decoded exactly");
    assert_eq!(
        rec[2].samples[F - 1],
        f32::from(32_000i16.wrapping_add(F as i16 - 1)) / 32768.0
    );
}

#[test]
fn a_seq_gap_reaches_the_sinks_as_a_silence_block_and_is_counted() {
    let mut h = Harness::new(SEQ16K);
    h.drain();
    h.audio(seq(0, 0, &ramp(1, F)));
    // seq 1 never comes: seq 2 starts where it would have ended.
    h.at(40).audio(seq(2, 2 * F as u64, &ramp(2, F)));
    let rec = h.writes("rec");
    assert_eq!(
        rec.iter()
            .map(|w| (w.start_frame, w.frames, w.silence))
            .collect::<Vec<_>>(),
        [(0, F, false), (320, F, true), (640, F, false)]
    );
    assert_eq!(rec[2].samples[0], 2.0 / 32768.0);
    let mut evs = h.at(50).text(r#"{"type":"stop"}"#);
    evs.extend(h.finish_sinks());
    assert_eq!(only(&evs, "stats")["packets_lost"], 1);
    let closed = only(&evs, "closed");
    assert_eq!(closed["gap_frames"], F);
    assert_eq!(closed["sample_frames"], 3 * F);
    assert_eq!(only(&evs, "recording")["sample_frames"], 3 * F);
}

#[test]
fn a_duplicate_seq_is_dropped_and_counted_not_an_error() {
    let mut h = Harness::new(SEQ16K);
    h.drain();
    h.audio(seq(0, 0, &ramp(0, F)));
    h.audio(seq(1, F as u64, &ramp(0, F)));
    let evs = h.audio(seq(1, F as u64, &ramp(0, F)));
    assert!(
        !kinds(&evs).iter().any(|k| k.starts_with("error")),
        "{evs:?}"
    );
    assert_eq!(h.writes("rec").len(), 2);
    let mut evs = h.text(r#"{"type":"stop"}"#);
    evs.extend(h.finish_sinks());
    let closed = only(&evs, "closed");
    assert_eq!(closed["duplicate_messages"], 1);
    assert_eq!(closed["audio_messages"], 3, "duplicates included");
    assert_eq!(closed["sample_frames"], 2 * F);
    assert_eq!(closed["close_code"], 1000);
}

#[test]
fn each_sink_gets_the_rate_it_declares_with_the_exact_length() {
    let low = Fake::named("low").at_rate(8000);
    let mut h = Harness::with_sinks(&[REC, low], &format!("{PCM16K}&sinks=rec,low"));
    h.drain();
    for i in 0..10u64 {
        h.at(20 * i).audio(s16(&ramp(0, F)));
    }
    let mut evs = h.at(200).text(r#"{"type":"stop"}"#);
    evs.extend(h.finish_sinks());
    assert_eq!(h.shared.frames_written("rec"), 10 * F as u64);
    assert_eq!(
        h.shared.frames_written("low"),
        5 * F as u64,
        "half the frames at half the rate, resampler tail included"
    );
    let low_writes = h.writes("low");
    for pair in low_writes.windows(2) {
        assert_eq!(
            pair[0].start_frame + pair[0].frames as u64,
            pair[1].start_frame
        );
    }
    let recordings = messages(&evs, "recording");
    assert_eq!(recordings[1]["sample_rate"], 8000);
}

// ───────────────────────────── acks and stats ─────────────────────────────

#[test]
fn acks_come_every_ack_interval_while_there_is_something_new() {
    let mut h = Harness::new(SEQ16K);
    h.drain();
    assert!(h.audio(seq(0, 0, &ramp(0, F))).is_empty(), "not due yet");
    assert_eq!(h.core.next_deadline(), Some(h.ms(100)), "ack_interval_ms");
    assert!(h.at(50).audio(seq(1, F as u64, &ramp(0, F))).is_empty());
    assert!(h.at(99).timeout().is_empty());
    let evs = h.at(100).timeout();
    assert_eq!(kinds(&evs), ["ack"]);
    assert_eq!(only(&evs, "ack")["seq"], 1);
    // Nothing new: no ack timer, and nothing at the next interval.
    assert_eq!(
        h.core.next_deadline(),
        Some(h.ms(1_000)),
        "the stats are next"
    );
    assert!(h
        .at(150)
        .audio(seq(2, 2 * F as u64, &ramp(0, F)))
        .is_empty());
    // Due on the message path, without a timer.
    let evs = h.at(200).audio(seq(3, 3 * F as u64, &ramp(0, F)));
    assert_eq!(only(&evs, "ack")["seq"], 3);
    assert!(messages(&h.at(300).timeout(), "ack").is_empty());
}

#[test]
fn raw_framing_is_never_acked() {
    let mut h = Harness::new(PCM16K);
    h.drain();
    h.audio(s16(&ramp(0, F)));
    assert!(messages(&h.at(500).timeout(), "ack").is_empty());
    let mut evs = h.text(r#"{"type":"stop"}"#);
    evs.extend(h.finish_sinks());
    assert!(messages(&evs, "ack").is_empty(), "{:?}", kinds(&evs));
}

#[test]
fn stats_come_every_stats_interval_while_audio_flows_and_not_when_idle() {
    let mut h = Harness::new(PCM16K);
    h.drain();
    assert_eq!(h.core.next_deadline(), Some(h.ms(5_000)), "only idleness");
    h.audio(s16(&ramp(0, F)));
    assert_eq!(h.core.next_deadline(), Some(h.ms(1_000)));
    assert!(h.at(999).timeout().is_empty());
    let evs = h.at(1_000).timeout();
    let stats = only(&evs, "stats");
    assert_eq!(stats["media_seconds"], 0.02);
    assert_eq!(stats["packets_received"], 1);
    assert_eq!(stats["resumes"], 0);
    // No audio since: no stats timer, and none at the next tick.
    assert_eq!(h.core.next_deadline(), Some(h.ms(5_000)));
    assert!(h.at(2_000).timeout().is_empty());
    // Audio again, with the interval long past: stats on the message path.
    let evs = h.at(2_500).audio(s16(&ramp(0, F)));
    assert_eq!(only(&evs, "stats")["packets_received"], 2);
}

#[test]
fn stats_interval_zero_sends_no_stats_not_even_at_the_end() {
    let mut h = Harness::with_config(
        Config {
            stats_interval_ms: 0,
            ..config()
        },
        PCM16K,
    );
    h.drain();
    h.audio(s16(&ramp(0, F)));
    assert_eq!(h.core.next_deadline(), Some(h.ms(5_000)));
    let mut evs = h.at(3_000).timeout();
    evs.extend(h.text(r#"{"type":"stop"}"#));
    evs.extend(h.finish_sinks());
    assert!(messages(&evs, "stats").is_empty(), "{:?}", kinds(&evs));
}

// ───────────────────────────── idleness and limits ─────────────────────────────

#[test]
fn idle_timeout_closes_with_the_configured_idle_close_code() {
    let mut h = Harness::with_config(
        Config {
            idle_timeout_ms: 500,
            idle_close_code: 1001,
            ..config()
        },
        PCM16K,
    );
    h.drain();
    assert_eq!(h.core.next_deadline(), Some(h.ms(500)));
    assert!(h.at(499).timeout().is_empty());
    let evs = h.at(500).timeout();
    assert_ends_with_error(&mut h, evs, "idle_timeout", 1001);
}

#[test]
fn idleness_counts_before_start_too() {
    let mut h = Harness::with_config(
        Config {
            idle_timeout_ms: 500,
            ..config()
        },
        "",
    );
    assert_eq!(h.core.next_deadline(), Some(h.ms(500)));
    let evs = h.at(500).timeout();
    assert_ends_with_error(&mut h, evs, "idle_timeout", 1000);
}

#[test]
fn keepalive_flush_and_audio_reset_idleness() {
    let mut h = Harness::with_config(
        Config {
            idle_timeout_ms: 500,
            ..config()
        },
        PCM16K,
    );
    h.drain();
    h.at(300).text(r#"{"type":"keepalive"}"#);
    assert!(h.at(500).timeout().is_empty(), "active 200 ms ago");
    assert_eq!(h.core.next_deadline(), Some(h.ms(800)));
    h.at(700).text(r#"{"type":"flush"}"#);
    assert!(h.at(800).timeout().is_empty());
    h.at(1_100).audio(s16(&ramp(0, F)));
    assert!(h.at(1_200).timeout().is_empty());
    assert!(kinds(&h.at(1_500).timeout()).is_empty());
    let evs = h.at(1_600).timeout();
    assert_ends_with_error(&mut h, evs, "idle_timeout", 1000);
}

#[test]
fn next_deadline_is_the_session_end_when_nothing_else_is_due() {
    let mut h = Harness::with_config(
        Config {
            max_session_duration_ms: 2_000,
            stats_interval_ms: 0,
            ..config()
        },
        PCM16K,
    );
    h.drain();
    assert_eq!(h.core.next_deadline(), Some(h.ms(2_000)));
    h.at(1_000).audio(s16(&ramp(0, F)));
    assert_eq!(h.core.next_deadline(), Some(h.ms(2_000)));
    assert!(h.at(1_999).timeout().is_empty());
    let evs = h.at(2_000).timeout();
    let recording_before = h.shared.frames_written("rec");
    assert_ends_with_error(&mut h, evs, "max_duration_reached", 1008);
    assert_eq!(recording_before, F as u64, "the audio so far is kept");
}

#[test]
fn a_credential_cap_shorter_than_the_config_wins() {
    let capped = |config_ms, credential_ms| {
        let h = Harness::with(
            Config {
                max_session_duration_ms: config_ms,
                stats_interval_ms: 0,
                ..config()
            },
            &[REC],
            SessionLimits {
                max_session_ms: credential_ms,
            },
            PCM16K,
        );
        h.core.next_deadline().map(|at| at - h.t0)
    };
    let ms = Duration::from_millis;
    assert_eq!(capped(2_000, Some(1_000)), Some(ms(1_000)));
    assert_eq!(capped(1_000, Some(2_000)), Some(ms(1_000)));
    assert_eq!(capped(0, Some(1_500)), Some(ms(1_500)));
    assert_eq!(capped(0, None), Some(ms(5_000)), "idleness only");
}

fn rate_limited() -> Config {
    Config {
        max_realtime_factor: 2.0,
        realtime_burst_ms: 200,
        stats_interval_ms: 0,
        ..config()
    }
}

/// One second of 16 kHz mono s16 (32000 bytes).
fn one_second() -> Vec<u8> {
    s16(&ramp(0, 16_000))
}

#[test]
fn too_fast_is_warned_once_then_closed_1008_a_second_later() {
    let mut h = Harness::with_config(rate_limited(), PCM16K);
    h.drain();
    // 1 s of media at once: over 0.2 s of burst.
    let evs = h.audio(one_second());
    assert_eq!(kinds(&evs), ["warning:audio_too_fast"]);
    assert!(!h.core.is_finishing(), "a warning only");
    assert!(h.at(500).audio(one_second()).is_empty(), "warned once");
    assert!(h.at(999).audio(one_second()).is_empty());
    let evs = h.at(1_000).audio(one_second());
    assert_eq!(h.shared.frames_written("rec"), 4 * 16_000, "all audio kept");
    assert_ends_with_error(&mut h, evs, "audio_too_fast", 1008);
}

#[test]
fn a_client_that_slows_down_after_the_warning_is_not_closed() {
    let mut h = Harness::with_config(rate_limited(), PCM16K);
    h.drain();
    assert_eq!(kinds(&h.audio(one_second())), ["warning:audio_too_fast"]);
    // Back under 2x: 1.1 s of media after 1 s (limit 0.2 + 2.0).
    assert!(h.at(1_000).audio(s16(&ramp(0, 1_600))).is_empty());
    assert!(h.at(2_100).audio(s16(&ramp(0, 1_600))).is_empty());
    assert!(!h.core.is_finishing());
    // A new burst is a new warning, not a close.
    let evs = h.at(2_200).audio(one_second().repeat(5));
    assert_eq!(kinds(&evs), ["warning:audio_too_fast"]);
    let mut evs = h.at(2_300).text(r#"{"type":"stop"}"#);
    evs.extend(h.finish_sinks());
    assert_eq!(close_of(&evs), (1000, "stop".into(), false));
}

#[test]
fn a_warned_client_going_a_limit_second_further_is_closed_at_once() {
    let mut h = Harness::with_config(rate_limited(), PCM16K);
    h.drain();
    assert_eq!(kinds(&h.audio(one_second())), ["warning:audio_too_fast"]);
    // At 0.1 s the allowance is 0.4 s, and the grace second's ceiling 2.4 s
    // (what a 2x limit lets through in it): 2 s of media is still a warned
    // client slowing down, 2.5 s is not. Waiting out the second would let
    // any amount of media (or of timestamp gaps) in.
    assert!(h.at(100).audio(one_second()).is_empty());
    let evs = h.at(100).audio(s16(&ramp(0, 8_000)));
    assert_ends_with_error(&mut h, evs, "audio_too_fast", 1008);
}

#[test]
fn one_message_far_past_the_allowance_is_closed_without_a_warning_first() {
    let mut h = Harness::with_config(rate_limited(), PCM16K);
    h.drain();
    // 2.3 s in one message: over 0.2 s of burst + 2 s of grace.
    let evs = h.audio(s16(&ramp(0, 36_800)));
    assert_ends_with_error(&mut h, evs, "audio_too_fast", 1008);
}

// ───────────────────────────── flush ─────────────────────────────

#[test]
fn flush_is_answered_once_every_sink_has_flushed_what_came_before() {
    let mut h = Harness::new(&format!("{PCM16K}&sinks=rec,tx"));
    h.drain();
    h.audio(s16(&ramp(0, F)));
    let evs = h.text(r#"{"type":"flush"}"#);
    assert_eq!(kinds(&evs), ["flushed"]);
    let write = |sink| Call::Write {
        sink,
        block: h.writes(sink)[0].clone(),
    };
    assert_eq!(
        h.calls()[2..],
        [
            write("rec"),
            write("tx"),
            Call::Flush { sink: "rec" },
            Call::Flush { sink: "tx" }
        ]
    );
    // One answer per flush, in order.
    let mut evs = h.text(r#"{"type":"flush"}"#);
    evs.extend(h.text(r#"{"type":"flush"}"#));
    assert_eq!(kinds(&evs), ["flushed", "flushed"]);
}

// ───────────────────────────── sinks reporting and failing ─────────────────────────────

#[test]
fn a_sink_reports_mid_stream_through_its_emitter() {
    let talker = Fake {
        emit_after_write: Some(2),
        ..Fake::named("tx")
    };
    let mut h = Harness::with_sinks(&[REC, talker], &format!("{PCM16K}&sinks=rec,tx"));
    h.drain();
    h.audio(s16(&ramp(0, F)));
    h.audio(s16(&ramp(0, F)));
    let evs = h.pump();
    assert_eq!(kinds(&evs), ["vad"]);
    assert_eq!(
        evs[0],
        Ev::Msg(json!({
            "type":"vad","event":"speech_started","channel":0,"time":0.02,"utterance_id":0
        }))
    );
}

#[test]
fn a_sink_failing_on_write_is_aborted_and_the_session_ends_with_sink_failed_1011() {
    let bad = Fake {
        fail_on_write: Some(2),
        ..Fake::named("rec")
    };
    let mut h = Harness::with_sinks(&[bad, TX], &format!("{PCM16K}&sinks=rec,tx"));
    h.drain();
    h.audio(s16(&ramp(0, F)));
    let evs = h.at(20).audio(s16(&ramp(0, F)));
    assert_eq!(kinds(&evs)[..2], ["AbortSink rec", "error:sink_failed"]);
    assert_eq!(
        evs.iter().find(|e| matches!(e, Ev::FinishSinks(_))),
        Some(&Ev::FinishSinks(vec!["tx"])),
        "the failed sink is not finished"
    );
    assert!(matches!(
        h.calls().last(),
        Some(Call::Abort { sink: "rec", reason }) if reason.contains("write 2 refused")
    ));
    assert_ends_with_error(&mut h, evs, "sink_failed", 1011);
    assert_eq!(
        h.shared
            .count(|c| matches!(c, Call::Finish { sink: "rec" })),
        0
    );
}

#[test]
fn the_other_sinks_still_get_the_audio_a_failing_sink_refused() {
    // rec fails on its second block, which is the silence of a seq gap:
    // tx (same format) and low (another converter) must still get it, and
    // the audio after it, since the final ack says all of it arrived.
    let bad = Fake {
        fail_on_write: Some(2),
        ..Fake::named("rec")
    };
    let low = Fake::named("low").at_rate(8000);
    let mut h = Harness::with_sinks(&[bad, TX, low], &format!("{SEQ16K}&sinks=rec,tx,low"));
    h.drain();
    h.audio(seq(0, 0, &ramp(0, F)));
    let mut evs = h.at(20).audio(seq(1, 2 * F as u64, &ramp(0, F)));
    evs.extend(h.finish_sinks());
    assert_eq!(only(&evs, "ack")["seq"], 1);
    assert_eq!(
        h.writes("tx")
            .iter()
            .map(|w| (w.start_frame, w.frames, w.silence))
            .collect::<Vec<_>>(),
        [(0, F, false), (320, F, true), (640, F, false)]
    );
    assert_eq!(h.shared.frames_written("low"), 3 * F as u64 / 2);
    let recordings = messages(&evs, "recording");
    assert_eq!(recordings.len(), 2, "the failed sink reports none");
    assert_eq!(recordings[0]["sample_frames"], 3 * F);
    assert_eq!(
        h.shared
            .count(|c| matches!(c, Call::Abort { sink: "rec", .. })),
        1
    );
    assert_eq!(close_of(&evs).0, 1011);
}

#[test]
fn a_sink_failing_through_its_emitter_ends_the_session_with_sink_failed_1011() {
    let bad = Fake {
        fail_via_emitter_after_write: Some(1),
        ..Fake::named("rec")
    };
    let mut h = Harness::with_sinks(&[bad, TX], &format!("{PCM16K}&sinks=rec,tx"));
    h.drain();
    assert!(h.audio(s16(&ramp(0, F))).is_empty());
    let evs = h.pump();
    assert_eq!(kinds(&evs)[..2], ["AbortSink rec", "error:sink_failed"]);
    assert!(evs.contains(&Ev::FinishSinks(vec!["tx"])));
    assert_ends_with_error(&mut h, evs, "sink_failed", 1011);
}

#[test]
fn a_sink_failing_to_finish_turns_the_close_into_1011_keeping_the_reason() {
    let bad = Fake {
        fail_finish: true,
        ..Fake::named("rec")
    };
    let mut h = Harness::with_sinks(&[bad, TX], &format!("{PCM16K}&sinks=rec,tx"));
    h.drain();
    h.audio(s16(&ramp(0, F)));
    let mut evs = h.text(r#"{"type":"stop"}"#);
    evs.extend(h.finish_sinks());
    assert_eq!(
        kinds(&evs),
        [
            "stats",
            "FinishSinks",
            "error:sink_failed",
            "recording",
            "closed",
            "Close 1011 sink_failed"
        ]
    );
    let closed = only(&evs, "closed");
    assert_eq!(
        (closed["reason"].clone(), closed["close_code"].clone()),
        (json!("stop"), json!(1011))
    );
    assert!(!close_of(&evs).2, "a stop needs no drain");
}

#[test]
fn a_sink_failing_on_its_last_write_at_stop_is_reported() {
    // The 8 kHz sink gets the resampler's tail when the stream ends.
    let low = Fake::named("low").at_rate(8000);
    let mut h = Harness::with_sinks(&[REC, low], &format!("{PCM16K}&sinks=rec,low"));
    h.drain();
    for i in 0..5u64 {
        h.at(20 * i).audio(s16(&ramp(0, F)));
    }
    let streamed = h.shared.frames_written("low");
    assert!(
        streamed < 5 * F as u64 / 2,
        "the resampler holds a tail back"
    );
    lock(&h.shared.fail_next_write).insert("low");
    let mut evs = h.at(100).text(r#"{"type":"stop"}"#);
    evs.extend(h.finish_sinks());
    let k = kinds(&evs);
    assert!(k.contains(&"AbortSink low".to_owned()), "{k:?}");
    assert_eq!(only(&evs, "error")["code"], "sink_failed", "{k:?}");
    let closed = only(&evs, "closed");
    assert_eq!(closed["reason"], "stop");
    assert_eq!(
        closed["close_code"], 1011,
        "§6.9: a sink failing while finishing"
    );
    assert_eq!(close_of(&evs).0, 1011);
    assert_eq!(messages(&evs, "recording").len(), 1, "only rec reports");
}

#[test]
fn a_sink_deadline_joins_next_deadline_and_on_deadline_is_called_when_due() {
    let mut h = Harness::new(PCM16K);
    h.drain();
    lock(&h.shared.deadlines).insert("rec", h.ms(300));
    assert_eq!(h.core.next_deadline(), Some(h.ms(300)));
    h.at(299).timeout();
    assert_eq!(h.shared.count(|c| matches!(c, Call::Deadline { .. })), 0);
    h.at(300).timeout();
    assert_eq!(
        h.shared
            .count(|c| matches!(c, Call::Deadline { sink: "rec" })),
        1
    );
    assert_eq!(h.core.next_deadline(), Some(h.ms(5_000)));
}

#[test]
fn a_packet_held_by_the_jitter_buffer_is_released_by_timeout() {
    let mut h = Harness::with_config(
        Config {
            ack_interval_ms: 1_000,
            stats_interval_ms: 0,
            ..config()
        },
        SEQ16K,
    );
    h.drain();
    let f = F as u64;
    h.audio(seq(0, 0, &ramp(0, F)));
    h.audio(seq(2, 2 * f, &ramp(0, F)));
    // seq 1 turns up 40 ms after its hole was filled: the buffer learns to
    // hold holes open for 1.25 x 40 ms.
    h.at(40).audio(seq(1, f, &ramp(0, F)));
    h.audio(seq(3, 3 * f, &ramp(0, F)));
    assert_eq!(h.shared.frames_written("rec"), 4 * f);
    h.at(60).audio(seq(5, 5 * f, &ramp(5, F)));
    assert_eq!(h.shared.frames_written("rec"), 4 * f, "seq 5 is held");
    assert_eq!(h.core.next_deadline(), Some(h.ms(110)));
    h.at(109).timeout();
    assert_eq!(h.shared.frames_written("rec"), 4 * f);
    h.at(110).timeout();
    let tail: Vec<_> = h.writes("rec")[4..]
        .iter()
        .map(|w| (w.start_frame, w.frames, w.silence))
        .collect();
    assert_eq!(tail, [(4 * f, F, true), (5 * f, F, false)]);
    assert_eq!(h.core.resume_from_seq(), 6);
}

// ─────────────────────── dropped connections, resume, shutdown ───────────────────────

#[test]
fn client_gone_on_a_resumable_session_parks_it() {
    let mut h = Harness::new(SEQ16K);
    h.drain();
    h.audio(seq(0, 0, &ramp(0, F)));
    let evs = h.at(10).input(Input::ClientGone { close_frame: false });
    assert_eq!(evs, [Ev::Park]);
    assert!(!h.core.is_finishing());
    assert!(h.calls().iter().all(|c| !matches!(c, Call::Finish { .. })));
}

#[test]
fn client_gone_on_a_raw_session_answers_the_close_and_finishes_without_drain() {
    let mut h = Harness::new(PCM16K);
    h.drain();
    h.audio(s16(&ramp(0, F)));
    let mut evs = h.at(10).input(Input::ClientGone { close_frame: true });
    assert_eq!(kinds(&evs)[0], "AnswerClose", "answered at once");
    assert!(messages(&evs, "error").is_empty());
    evs.extend(h.finish_sinks());
    let closed = only(&evs, "closed");
    assert_eq!(closed["reason"], "client_gone");
    assert_eq!(close_of(&evs), (1000, "client_gone".into(), false));
    assert_eq!(only(&evs, "recording")["sample_frames"], F);
}

#[test]
fn client_gone_on_seq_without_resume_finishes_with_no_final_ack() {
    let mut h = Harness::with_config(
        Config {
            resume_window_ms: 0,
            ..config()
        },
        SEQ16K,
    );
    h.drain();
    h.audio(seq(0, 0, &ramp(0, F)));
    let mut evs = h.input(Input::ClientGone { close_frame: false });
    evs.extend(h.finish_sinks());
    assert!(!evs.contains(&Ev::Park));
    assert!(messages(&evs, "ack").is_empty(), "nobody to read it");
    assert_eq!(close_of(&evs), (1000, "client_gone".into(), false));
}

#[test]
fn takeover_closes_the_superseded_connection_then_parks() {
    let mut h = Harness::new(SEQ16K);
    h.drain();
    h.audio(seq(0, 0, &ramp(0, F)));
    assert_eq!(h.input(Input::TakenOver), [Ev::CloseSuperseded, Ev::Park]);
    assert!(!h.core.is_finishing());
}

#[test]
fn reattach_says_started_again_with_resume_from_seq_and_the_stream_goes_on() {
    let mut h = Harness::new(SEQ16K);
    let first = h.drain();
    let token = only(&first, "started")["resume_token"].clone();
    for s in 0..3u32 {
        h.at(20 * u64::from(s))
            .audio(seq(s, u64::from(s) * F as u64, &ramp(0, F)));
    }
    assert_eq!(
        h.at(60).input(Input::ClientGone { close_frame: false }),
        [Ev::Park]
    );
    h.at(300);
    h.core.reattach(h.now);
    let evs = h.drain();
    let started = only(&evs, "started");
    assert_eq!(
        started["session_id"],
        "0193a7c4-5e2f-7d31-8b6a-4c2e9f0a1b3d"
    );
    assert_eq!(started["resume_token"], token);
    assert_eq!(started["resume_from_seq"], 3);
    assert_eq!(started["format"]["framing"], "seq");
    assert_eq!(h.core.resumes(), 1);
    assert!(
        h.core.next_deadline().is_some_and(|at| at <= h.now),
        "the new connection is told what arrived at once"
    );
    assert_eq!(only(&h.timeout(), "ack")["seq"], 2);

    h.at(320).audio(seq(3, 3 * F as u64, &ramp(0, F)));
    assert_eq!(h.writes("rec")[3].start_frame, 3 * F as u64);
    let mut evs = h.at(330).text(r#"{"type":"stop"}"#);
    evs.extend(h.finish_sinks());
    assert_eq!(only(&evs, "stats")["resumes"], 1);
    assert_eq!(only(&evs, "closed")["sample_frames"], 4 * F);
    assert_eq!(
        h.shared.count(|c| matches!(c, Call::Built { .. })),
        1,
        "one recording across both connections"
    );
}

#[test]
fn reattach_restarts_the_idle_timer() {
    let mut h = Harness::with_config(
        Config {
            idle_timeout_ms: 500,
            stats_interval_ms: 0,
            ..config()
        },
        SEQ16K,
    );
    h.drain();
    h.audio(seq(0, 0, &ramp(0, F)));
    h.at(100).input(Input::ClientGone { close_frame: false });
    h.at(450);
    h.core.reattach(h.now);
    h.drain();
    h.timeout();
    assert!(h.at(600).timeout().is_empty(), "idle since 450 only");
    assert_eq!(h.core.next_deadline(), Some(h.ms(950)));
    let evs = h.at(950).timeout();
    assert_ends_with_error(&mut h, evs, "idle_timeout", 1000);
}

#[test]
fn a_resume_repeating_the_sessions_own_parameters_is_accepted_and_a_conflict_is_named() {
    let mut h = Harness::new(&format!("{SEQ16K}&sinks=rec"));
    h.drain();
    let check = |text: &str| h.core.check_resume_request(&query(text).expect(text));
    assert_eq!(check(""), Ok(()));
    assert_eq!(check(&format!("{SEQ16K}&sinks=rec")), Ok(()));
    assert_eq!(
        check("channels=1&transcribe=none"),
        Ok(()),
        "defaults repeated"
    );
    for (text, name) in [
        ("encoding=mulaw", "encoding"),
        ("sample_rate=8000", "sample_rate"),
        ("channels=2", "channels"),
        ("framing=raw", "framing"),
        ("sinks=tx", "sinks"),
        ("sinks=none", "sinks"),
        ("transcribe=whisper", "transcribe"),
    ] {
        match check(text) {
            Err(ProtocolError::InvalidMessage(message)) => {
                assert!(message.contains(&format!("{name}=")), "{text}: {message}");
            }
            other => panic!("{text}: {other:?}"),
        }
    }
}

#[test]
fn a_parked_session_nobody_resumes_is_finished_as_if_stopped() {
    let mut h = Harness::new(SEQ16K);
    h.drain();
    h.audio(seq(0, 0, &ramp(0, F)));
    assert_eq!(
        h.input(Input::ClientGone { close_frame: false }),
        [Ev::Park]
    );
    let mut evs = h.at(1_000).input(Input::ResumeExpired);
    assert!(messages(&evs, "ack").is_empty(), "nobody to read it");
    evs.extend(h.finish_sinks());
    assert_eq!(only(&evs, "recording")["sample_frames"], F);
    let closed = only(&evs, "closed");
    assert_eq!(closed["reason"], "resume_expired");
    assert_eq!(close_of(&evs), (1000, "resume_expired".into(), false));
    assert!(messages(&evs, "error").is_empty());
}

#[test]
fn shutdown_finishes_the_sinks_and_closes_1001_after_draining() {
    let mut h = Harness::new(SEQ16K);
    h.drain();
    h.audio(seq(0, 0, &ramp(0, F)));
    let mut evs = h.at(10).input(Input::Shutdown);
    evs.extend(h.finish_sinks());
    assert_eq!(
        kinds(&evs),
        [
            "ack",
            "stats",
            "FinishSinks",
            "recording",
            "closed",
            "Close 1001 shutdown"
        ]
    );
    let closed = only(&evs, "closed");
    assert_eq!(closed["reason"], "shutdown");
    assert_eq!(closed["close_code"], 1001);
    assert!(close_of(&evs).2, "the client may still be sending");
}

// ─────────── sinks that write off the session's thread (issue 14 part 3) ───────────

const DEFERRED: Fake = Fake {
    deferred: true,
    ..Fake::named("rec")
};

#[test]
fn an_ack_waits_until_every_sink_has_committed_what_it_covers() {
    let mut h = Harness::with_sinks(&[DEFERRED], SEQ16K);
    h.drain();
    h.audio(seq(0, 0, &ramp(0, F)));
    let evs = h.at(100).timeout();
    assert!(messages(&evs, "ack").is_empty(), "{:?}", kinds(&evs));
    assert_eq!(
        h.shared.count(|c| matches!(c, Call::Commit { .. })),
        1,
        "the sink was asked to commit"
    );
    // No busy timer while the commit is out, and no second commit.
    assert!(h.core.next_deadline() > Some(h.ms(100)));
    h.at(150).audio(seq(1, F as u64, &ramp(0, F)));
    assert_eq!(h.shared.count(|c| matches!(c, Call::Commit { .. })), 1);
    // The commit lands: the ack covers what was handed over when it began.
    let evs = h.input(Input::Sink(SinkEvent::Committed { index: 0 }));
    assert_eq!(only(&evs, "ack")["seq"], 0);
    // The next round covers seq 1.
    let evs = h.at(250).timeout();
    assert!(messages(&evs, "ack").is_empty());
    let evs = h.input(Input::Sink(SinkEvent::Committed { index: 0 }));
    assert_eq!(only(&evs, "ack")["seq"], 1);
}

#[test]
fn a_stray_commit_report_acknowledges_nothing_early() {
    let mut h = Harness::with_sinks(&[DEFERRED], SEQ16K);
    h.drain();
    let evs = h.input(Input::Sink(SinkEvent::Committed { index: 0 }));
    assert!(messages(&evs, "ack").is_empty());
    h.audio(seq(0, 0, &ramp(0, F)));
    let evs = h.at(100).timeout();
    assert!(messages(&evs, "ack").is_empty(), "the stray report counted");
}

#[test]
fn flushed_waits_for_a_sink_that_flushes_later() {
    let mut h = Harness::with_sinks(&[DEFERRED, TX], PCM16K);
    h.drain();
    h.audio(s16(&ramp(0, F)));
    let evs = h.text(r#"{"type":"flush"}"#);
    assert!(messages(&evs, "flushed").is_empty(), "{:?}", kinds(&evs));
    let evs = h.input(Input::Sink(SinkEvent::Flushed { index: 0 }));
    assert_eq!(kinds(&evs), ["flushed"]);
}

#[test]
fn the_final_ack_of_a_deferred_sink_comes_once_it_has_finished_before_closed() {
    let mut h = Harness::with_sinks(&[DEFERRED], SEQ16K);
    h.drain();
    h.audio(seq(0, 0, &ramp(0, F)));
    let evs = h.text(r#"{"type":"stop"}"#);
    assert!(messages(&evs, "ack").is_empty(), "{:?}", kinds(&evs));
    let evs = h.finish_sinks();
    let kinds = kinds(&evs);
    let ack = kinds.iter().position(|k| k == "ack").expect("a final ack");
    let closed = kinds.iter().position(|k| k == "closed").expect("closed");
    assert!(ack < closed, "{kinds:?}");
    assert_eq!(only(&evs, "ack")["seq"], 0);
}

#[test]
fn a_backlogged_sink_stops_the_reading_then_ends_the_session_after_the_stall() {
    let config = Config {
        max_pending_bytes_per_sink: 1000,
        sink_stall_timeout_ms: 300,
        ..config()
    };
    let mut h = Harness::with(config, &[REC], SessionLimits::default(), PCM16K);
    h.drain();
    assert!(h.core.wants_input());
    lock(&h.shared.pending_bytes).insert("rec", 1001);
    h.audio(s16(&ramp(0, F)));
    assert!(!h.core.wants_input(), "over budget: the socket is not read");
    // Only a short look-again timer, not the idle timeout.
    assert!(h.core.next_deadline() <= Some(h.ms(10)));
    // Catching up lets the reading go on.
    lock(&h.shared.pending_bytes).insert("rec", 0);
    h.at(5).timeout();
    assert!(h.core.wants_input());
    assert_eq!(h.core.next_deadline(), Some(h.ms(1_000)), "stats next");
    // Stuck over budget for the whole stall: sink_overloaded, 1011.
    lock(&h.shared.pending_bytes).insert("rec", 5000);
    h.at(10).audio(s16(&ramp(0, F)));
    assert!(h.at(200).timeout().is_empty());
    let mut evs = h.at(310).timeout();
    evs.extend(h.finish_sinks());
    assert_eq!(only(&evs, "error")["code"], "sink_overloaded");
    assert!(evs.contains(&Ev::Close {
        code: 1011,
        reason: "sink_overloaded".into(),
        drain: true
    }));
}

// ───────────────────────────── webrtc ─────────────────────────────

const WEBRTC_OFFER: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=ice-ufrag:abcd\r\na=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10;stereo=1;useinbandfec=1\r\n";

#[test]
fn transport_webrtc_starts_opus_seq_from_the_offer_negotiates_and_sends_no_acks() {
    let mut h = Harness::new("sinks=tx");
    let start = json!({"type": "start", "transport": "webrtc", "sdp": WEBRTC_OFFER});
    let evs = h.text(&start.to_string());
    assert_eq!(kinds(&evs), ["Resumable", "started", "Negotiate"]);
    let started = only(&evs, "started");
    assert_eq!(
        started["format"],
        json!({"encoding":"opus","sample_rate":48000,"channels":2,"framing":"seq"}),
        "stereo=1 in the offer's Opus fmtp line"
    );
    let Some(Ev::Negotiate(offer)) = evs.last() else {
        panic!("no Negotiate");
    };
    assert_eq!(offer, WEBRTC_OFFER);
    let evs = h.input(Input::WebrtcAnswer("v=0 answer".into()));
    assert_eq!(only(&evs, "webrtc_answer")["sdp"], "v=0 answer");
    // Media as the peer hands it: seq-framed Opus packets. A damaged
    // packet is fine here; what matters is that no ack ever goes out.
    let packet = Bytes::from(
        [
            SeqHeader {
                seq: 0,
                timestamp: 0,
            }
            .encode()
            .to_vec(),
            vec![0xfc, 0xff, 0xfe],
        ]
        .concat(),
    );
    h.input(Input::Media(&packet));
    h.input(Input::TransportStats(crate::protocol::WebrtcStats {
        packets_received: 1,
        loss_fraction: Some(0.25),
        jitter_ms: 2.0,
        rtt_ms: None,
        nacks_sent: 0,
    }));
    let mut evs = Vec::new();
    for ms in [300, 600, 1200, 2400, 4000] {
        evs.extend(h.at(ms).timeout());
    }
    assert!(messages(&evs, "ack").is_empty(), "{:?}", kinds(&evs));
    let stats = messages(&evs, "stats");
    assert!(!stats.is_empty(), "{:?}", kinds(&evs));
    assert_eq!(stats[0]["webrtc"]["loss_fraction"], 0.25);
    // An ICE restart is one more negotiation on the same session.
    let evs = h.text(&json!({"type": "webrtc_offer", "sdp": WEBRTC_OFFER}).to_string());
    assert_eq!(kinds(&evs), ["Negotiate"]);
    // The peer asking to stop (WHIP DELETE) ends it as `stop` does.
    let mut evs = h.input(Input::Stop);
    evs.extend(h.finish_sinks());
    assert_eq!(only(&evs, "closed")["reason"], "stop");
}

#[test]
fn transport_webrtc_refuses_a_format_and_needs_an_offer() {
    for (start, code) in [
        (
            json!({"type": "start", "transport": "webrtc"}),
            "invalid_message",
        ),
        (
            json!({"type": "start", "transport": "webrtc", "sdp": WEBRTC_OFFER, "framing": "raw"}),
            "invalid_message",
        ),
        (
            json!({"type": "start", "transport": "webrtc", "sdp": "v=0\r\nm=video 9 RTP 96\r\n"}),
            "bad_sdp",
        ),
    ] {
        let mut h = Harness::new("sinks=tx");
        let evs = h.text(&start.to_string());
        assert_eq!(only(&evs, "error")["code"], code, "{start}");
    }
}
