//! The sink registry: which sinks a session can ask for, and how each is built.
//!
//! Every sink kind registers a [`SinkSpec`]: what the server's configuration
//! made of it (its settings, its name). A session asks for sinks by name
//! (`sinks=`, `transcribe=`); the registry checks the names and returns a
//! [`SinkPlan`], which says, before anything is built, at which rate each sink
//! wants its audio (a container's Opus decoder is made before the sinks can
//! be, and decodes straight at the rate they need). Once the stream's format
//! is known, the plan builds the sinks, each with an [`Emitter`] through
//! which it can report to the client at any time.
//!
//! ## Adding a sink kind
//! 1. A folder under `src/sinks/<kind>/` with its settings, its [`Sink`]
//!    implementation and a [`SinkSpec`] that builds it.
//! 2. One line in [`Registry::new`] (or in the config's `[sinks.<name>]`
//!    kinds) that registers the spec under its name.
//!
//! Nothing in the session changes: it fans audio out by what the plan says.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::recorder::{self, RecorderSettings};
use super::transcriber::backend::Backend;
use super::transcriber::{self, Transcriber, TranscriptionService};
use super::{Sink, SinkContext, SinkError, SinkEvent};
use crate::config::Config;
use crate::protocol::ServerMessage;

/// What a configured sink is, before any session uses it.
pub trait SinkSpec: Send + Sync {
    /// The name a client uses in `sinks=` (also shown in `started`).
    fn name(&self) -> &str;

    /// The sample rate this sink wants (`None`: the stream's own), known
    /// before it is built.
    fn sample_rate(&self) -> Option<u32>;

    /// Builds the sink(s) for one session: one, or one per channel for a
    /// recorder that splits channels. `emitters` hands out one [`Emitter`]
    /// per sink built.
    fn build(
        &self,
        context: &SinkContext,
        emitters: &mut Emitters,
    ) -> Result<Vec<Box<dyn Sink>>, SinkError>;
}

/// How a session's sinks report: results for the client, flush completions,
/// failures. Cheap to clone; a sink may hand clones to tasks it spawns.
#[derive(Clone, Debug)]
pub struct Emitter {
    index: usize,
    events: mpsc::UnboundedSender<SinkEvent>,
}

impl Emitter {
    pub fn new(index: usize, events: mpsc::UnboundedSender<SinkEvent>) -> Self {
        Self { index, events }
    }

    /// The sink's position in its session (in [`SinkEvent`]s).
    pub fn index(&self) -> usize {
        self.index
    }

    /// A result for the client; false once the session is gone.
    pub fn message(&self, message: ServerMessage) -> bool {
        self.events.send(SinkEvent::Message(message)).is_ok()
    }

    /// The sink failed and takes no more audio.
    pub fn failed(&self, error: SinkError) {
        let _ = self.events.send(SinkEvent::Failed {
            index: self.index,
            error,
        });
    }

    /// Any report (a flush or commit done off the session's thread).
    pub fn send(&self, event: SinkEvent) {
        let _ = self.events.send(event);
    }

    /// The raw event channel, for a sink's helper tasks.
    pub fn sender(&self) -> mpsc::UnboundedSender<SinkEvent> {
        self.events.clone()
    }
}

/// Hands out emitters in sink order while a plan builds.
pub struct Emitters {
    next: usize,
    events: mpsc::UnboundedSender<SinkEvent>,
}

impl Emitters {
    pub fn new(events: mpsc::UnboundedSender<SinkEvent>) -> Self {
        Self { next: 0, events }
    }

    pub fn next_emitter(&mut self) -> Emitter {
        let emitter = Emitter::new(self.next, self.events.clone());
        self.next += 1;
        emitter
    }
}

/// A built sink and the name it was asked for by.
pub type NamedSink = (String, Box<dyn Sink>);

/// The sinks one session will have, fixed when it starts.
#[derive(Clone, Default)]
pub struct SinkPlan {
    specs: Vec<Arc<dyn SinkSpec>>,
}

impl SinkPlan {
    pub fn new(specs: Vec<Arc<dyn SinkSpec>>) -> Self {
        Self { specs }
    }

    /// The rate each planned sink wants (`None`: the stream's own).
    pub fn wanted_rates(&self) -> Vec<Option<u32>> {
        self.specs.iter().map(|s| s.sample_rate()).collect()
    }

    pub fn names(&self) -> Vec<String> {
        self.specs.iter().map(|s| s.name().to_owned()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.specs.is_empty()
    }

    /// Builds every sink, in plan order. The built sinks carry the spec's
    /// name alongside (a split recorder yields several sinks of one name).
    pub fn build(
        &self,
        context: &SinkContext,
        events: mpsc::UnboundedSender<SinkEvent>,
    ) -> Result<Vec<NamedSink>, SinkError> {
        let mut emitters = Emitters::new(events);
        let mut built = Vec::new();
        for spec in &self.specs {
            for sink in spec.build(context, &mut emitters)? {
                built.push((spec.name().to_owned(), sink));
            }
        }
        Ok(built)
    }
}

/// What a session's request must be checked against.
pub trait SinkFactory: Send + Sync {
    /// The plan for `sinks` (`None`: the configured defaults) and
    /// `transcribe` (`None`: the default backend, if any; `Some("none")`:
    /// none). Fails on an unknown name, before anything is created.
    fn plan(
        &self,
        sinks: Option<&[String]>,
        transcribe: Option<&str>,
    ) -> Result<Planned, SinkError>;
}

/// A plan, with the transcription backend it selected (named in `started`).
pub struct Planned {
    pub plan: SinkPlan,
    pub transcribe: Option<String>,
}

/// The server's sinks: the recorder as `record`, and one transcriber per
/// configured backend, chosen with `transcribe=`.
pub struct Registry {
    named: BTreeMap<String, Arc<dyn SinkSpec>>,
    default_sinks: Vec<String>,
    transcription: Arc<TranscriptionService>,
}

impl Registry {
    pub fn new(config: &Config, transcription: Arc<TranscriptionService>) -> Self {
        let mut named: BTreeMap<String, Arc<dyn SinkSpec>> = BTreeMap::new();
        named.insert(
            recorder::NAME.to_owned(),
            Arc::new(RecordSpec {
                name: recorder::NAME.to_owned(),
                settings: config.recorder_settings(),
            }),
        );
        Self {
            named,
            default_sinks: config.default_sinks.clone(),
            transcription,
        }
    }

    /// The names a client may put in `sinks=`.
    pub fn names(&self) -> Vec<String> {
        self.named.keys().cloned().collect()
    }
}

impl SinkFactory for Registry {
    fn plan(
        &self,
        sinks: Option<&[String]>,
        transcribe: Option<&str>,
    ) -> Result<Planned, SinkError> {
        let names = sinks.unwrap_or(&self.default_sinks);
        let mut specs: Vec<Arc<dyn SinkSpec>> = Vec::with_capacity(names.len() + 1);
        for name in names {
            let Some(spec) = self.named.get(name) else {
                return Err(SinkError::UnknownSink {
                    name: name.clone(),
                    available: self.names().join(", "),
                });
            };
            if !specs.iter().any(|s| s.name() == name) {
                specs.push(spec.clone());
            }
        }
        let backend = self
            .transcription
            .select(transcribe)
            .map_err(SinkError::UnknownBackend)?;
        let transcribe = backend.as_ref().map(|b| b.name.clone());
        if let Some(backend) = backend {
            specs.push(Arc::new(TranscribeSpec {
                service: self.transcription.clone(),
                backend,
            }));
        }
        Ok(Planned {
            plan: SinkPlan::new(specs),
            transcribe,
        })
    }
}

/// `record`: a WAV file (or one per channel) with a JSON sidecar.
struct RecordSpec {
    name: String,
    settings: RecorderSettings,
}

impl SinkSpec for RecordSpec {
    fn name(&self) -> &str {
        &self.name
    }

    fn sample_rate(&self) -> Option<u32> {
        self.settings.sample_rate
    }

    fn build(
        &self,
        context: &SinkContext,
        emitters: &mut Emitters,
    ) -> Result<Vec<Box<dyn Sink>>, SinkError> {
        let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
        for output in self.settings.outputs(context.format.channels) {
            sinks.push(Box::new(recorder::Recorder::create(
                context,
                &self.settings,
                output,
                emitters.next_emitter(),
            )?));
        }
        Ok(sinks)
    }
}

/// `transcribe=<backend>`: voice activity and transcripts.
struct TranscribeSpec {
    service: Arc<TranscriptionService>,
    backend: Arc<Backend>,
}

impl SinkSpec for TranscribeSpec {
    fn name(&self) -> &str {
        transcriber::NAME
    }

    fn sample_rate(&self) -> Option<u32> {
        Some(transcriber::SAMPLE_RATE)
    }

    fn build(
        &self,
        context: &SinkContext,
        emitters: &mut Emitters,
    ) -> Result<Vec<Box<dyn Sink>>, SinkError> {
        let emitter = emitters.next_emitter();
        Ok(vec![Box::new(Transcriber::start(
            context,
            &self.service,
            self.backend.clone(),
            emitter.sender(),
        ))])
    }
}
