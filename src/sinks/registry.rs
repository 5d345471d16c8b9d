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
//! ## Named instances
//! Besides the built-in `record` (the `[recorder]` settings) and the
//! `transcribe` sink of `transcribe=<backend>`, the configuration file can
//! name instances of any kind, which sessions then pick by name in `sinks=`:
//!
//! ```toml
//! [sinks.asr16k]
//! kind = "record"
//! sample_rate = 16000
//! channels = "mono"
//! ```
//!
//! Each `[sinks.<name>]` table is a [`SinkConfig`]: its `kind` picks the
//! variant, whose settings struct (a [`SinkKind`]) validates itself at
//! startup and makes the [`SinkSpec`] that [`Registry::new`] files under
//! the instance's name.
//!
//! ## Adding a sink kind
//! 1. A folder `src/sinks/<kind>/` with its [`Sink`], a settings struct
//!    (`#[serde(deny_unknown_fields)]`) that implements [`SinkKind`], and the
//!    [`SinkSpec`] that `SinkKind::spec` returns, with their tests (see
//!    `recorder/config.rs` and `transcriber/spec.rs`).
//! 2. The registry line: one line in the `sink_kinds!` list below,
//!    `Variant(super::<kind>::Settings),` (a `///` line above it documents
//!    it); the variant's snake_case name is the `kind` the file uses.
//! 3. Rust's module line, `pub mod <kind>;` in `src/sinks/mod.rs`.
//!
//! That is the folder plus two existing files, one line each (and a row in
//! the README's table of kinds). Nothing in the session, the config loader
//! or the validation changes: the new kind is parsed with its keys checked,
//! validated at startup, accepted by name in `sinks=` and `default_sinks`,
//! and fanned out to by what the plan says. Only a kind that needs a
//! service shared across sessions that [`SpecEnv`] does not yet carry adds
//! a field there.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use super::recorder::RecordFormat;
use super::recorder::{self, config::RecordSinkConfig};
use super::transcriber::spec::{TranscribeSinkConfig, TranscribeSpec};
use super::transcriber::{self, TranscriptionService};
use super::{Sink, SinkContext, SinkError, SinkEvent};
use crate::config::Config;
use crate::protocol::{Encoding, ServerMessage};
use crate::storage::upload::Uploader;

/// What a configured sink is, before any session uses it.
pub trait SinkSpec: Send + Sync {
    /// The name a client uses in `sinks=` (also shown in `started`).
    fn name(&self) -> &str;

    /// The sample rate this sink wants (`None`: the stream's own), known
    /// before it is built.
    fn sample_rate(&self) -> Option<u32>;

    /// True for a transcribing sink: a session that picks one by name
    /// does not also get the default backend's `transcribe` sink.
    fn transcribes(&self) -> bool {
        false
    }

    /// True if this sink, for a stream of `encoding`, takes the client's
    /// Opus packets rather than PCM (see [`Sink::takes_opus_packets`]);
    /// `record_format` is the session's choice of recording format.
    fn takes_opus_packets(&self, encoding: Encoding, record_format: Option<RecordFormat>) -> bool {
        let _ = (encoding, record_format);
        false
    }

    /// The same sink for a session that asked for partial transcripts
    /// (`interim=true`); `None`: this kind has none to give.
    fn with_interim(&self) -> Option<Arc<dyn SinkSpec>> {
        None
    }

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

    /// As [`Self::wanted_rates`], of the sinks that take PCM only: a sink
    /// that takes Opus packets does not make the decoder run faster.
    pub fn wanted_pcm_rates(
        &self,
        encoding: Encoding,
        record_format: Option<RecordFormat>,
    ) -> Vec<Option<u32>> {
        self.specs
            .iter()
            .filter(|s| !s.takes_opus_packets(encoding, record_format))
            .map(|s| s.sample_rate())
            .collect()
    }

    /// What the session's sinks take from a stream of `encoding`: `(pcm,
    /// packets)`. The pipeline decodes only if some sink takes PCM, or if
    /// none takes packets (a session without sinks still decodes, so that
    /// damaged audio is found and reported as before).
    pub fn wanted_inputs(
        &self,
        encoding: Encoding,
        record_format: Option<RecordFormat>,
    ) -> (bool, bool) {
        let packets = self
            .specs
            .iter()
            .filter(|s| s.takes_opus_packets(encoding, record_format))
            .count();
        let pcm = packets < self.specs.len() || packets == 0;
        (pcm, packets > 0)
    }

    /// The plan of a session that asked for partial transcripts: each sink
    /// that can give them does.
    pub fn with_interim(self) -> Self {
        Self {
            specs: self
                .specs
                .iter()
                .map(|spec| spec.with_interim().unwrap_or_else(|| spec.clone()))
                .collect(),
        }
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
            // A sink's reports carry its emitter's index, which must be its
            // place in the session: one emitter per sink, taken in order.
            if emitters.next != built.len() {
                return Err(SinkError::Failed {
                    sink: "registry",
                    message: format!(
                        "sink '{}' took {} emitters for {} sinks",
                        spec.name(),
                        emitters.next,
                        built.len()
                    ),
                });
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

/// Why the registry could not be built at startup.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// A `[sinks.<name>]` whose spec cannot be made.
    #[error("sinks.{name}: {message}")]
    Spec { name: String, message: String },
}

/// The settings of one kind of sink, as a `[sinks.<name>]` table holds them.
pub trait SinkKind {
    /// Checks the settings against the whole configuration, at startup.
    /// The message names the key; the caller puts the sink's name before it.
    fn validate(&self, config: &Config) -> Result<(), String>;

    /// The spec of instance `name`, built once when the server starts.
    fn spec(&self, name: &str, env: &SpecEnv<'_>) -> Result<Arc<dyn SinkSpec>, String>;
}

/// What a [`SinkKind`] may draw on to make its spec: the configuration, and
/// the services that sessions share.
pub struct SpecEnv<'a> {
    pub config: &'a Config,
    pub transcription: &'a Arc<TranscriptionService>,
    /// Uploads recordings to the object store (`None`: local storage).
    pub uploader: Option<&'a Arc<Uploader>>,
}

/// Declares [`SinkConfig`] from one line per kind, so that a kind's variant
/// and its dispatch cannot drift apart.
macro_rules! sink_kinds {
    ($($(#[$doc:meta])* $variant:ident($settings:ty),)+) => {
        /// One `[sinks.<name>]` table; `kind` (the variant in snake_case)
        /// says which.
        #[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
        #[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
        pub enum SinkConfig {
            $($(#[$doc])* $variant($settings),)+
        }

        impl SinkConfig {
            /// The kind's own settings, behind the trait they all share.
            pub fn kind(&self) -> &dyn SinkKind {
                match self {
                    $(Self::$variant(settings) => settings,)+
                }
            }
        }
    };
}

sink_kinds! {
    /// `kind = "record"`: a WAV recorder with its own `[recorder]` overrides.
    Record(RecordSinkConfig),
    /// `kind = "transcribe"`: a transcriber on one configured backend.
    Transcribe(TranscribeSinkConfig),
}

/// Reads the `[sinks.<name>]` tables, naming the sink in every error. Left
/// to the derive, an unknown `kind` is reported at its line alone, with no
/// word of which sink it is in; the price is that the file's snippet then
/// points at the `sinks` key rather than at the bad line.
pub fn deserialize_sinks<'de, D>(deserializer: D) -> Result<BTreeMap<String, SinkConfig>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    struct Tables;

    impl<'de> serde::de::Visitor<'de> for Tables {
        type Value = BTreeMap<String, SinkConfig>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a table of named sinks, `[sinks.<name>]`")
        }

        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> Result<Self::Value, A::Error> {
            use serde::de::Error;
            let mut sinks = BTreeMap::new();
            while let Some(name) = map.next_key::<String>()? {
                let sink = map
                    .next_value::<SinkConfig>()
                    .map_err(|e| A::Error::custom(format_args!("[sinks.{name}]: {e}")))?;
                sinks.insert(name, sink);
            }
            Ok(sinks)
        }
    }

    deserializer.deserialize_map(Tables)
}

/// Names a `[sinks.<name>]` cannot take: the built-in sinks' (`record`;
/// `transcribe`, which `started` lists for `transcribe=`), and `none`,
/// which means no sink in `sinks=`.
const RESERVED_NAMES: [&str; 3] = [recorder::NAME, transcriber::NAME, "none"];

/// Longest instance name: it goes into file names beside a 36-character id.
const MAX_NAME_CHARS: usize = 64;

fn check_instance_name(name: &str) -> Result<(), String> {
    if RESERVED_NAMES.contains(&name) {
        return Err(format!(
            "sinks.{name}: the name '{name}' is taken by a built-in sink (reserved: {}); pick another",
            RESERVED_NAMES.join(", ")
        ));
    }
    let allowed = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if name.is_empty() || name.len() > MAX_NAME_CHARS || !name.chars().all(allowed) {
        return Err(format!(
            "sink name '{name}' must be 1 to {MAX_NAME_CHARS} letters, digits, '-' or '_' (it goes into file names)"
        ));
    }
    // `<id>.ch0.wav` is the built-in recorder's file of channel 0.
    if name
        .strip_prefix("ch")
        .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(format!(
            "sinks.{name}: names of the form ch<N> are the files of split channels; pick another"
        ));
    }
    Ok(())
}

/// The names `sinks=` and `default_sinks` accept with this configuration:
/// the built-in `record` and every `[sinks.<name>]`, sorted.
pub fn sink_names(config: &Config) -> Vec<String> {
    let mut names: Vec<String> = std::iter::once(recorder::NAME.to_owned())
        .chain(config.sinks.keys().cloned())
        .collect();
    names.sort();
    names.dedup();
    names
}

/// Checks every `[sinks.<name>]` (its name and its settings) and
/// `default_sinks`; each message names the sink.
pub fn validate(config: &Config) -> Result<(), String> {
    for (name, sink) in &config.sinks {
        check_instance_name(name)?;
        sink.kind()
            .validate(config)
            .map_err(|e| format!("sinks.{name}: {e}"))?;
    }
    let names = sink_names(config);
    if let Some(unknown) = config.default_sinks.iter().find(|s| !names.contains(s)) {
        return Err(format!(
            "default_sinks names unknown sink '{unknown}'; available: {}",
            names.join(", ")
        ));
    }
    Ok(())
}

/// The server's sinks: the built-in recorder as `record`, every
/// `[sinks.<name>]` instance, and one transcriber per configured backend,
/// chosen with `transcribe=`.
pub struct Registry {
    named: BTreeMap<String, Arc<dyn SinkSpec>>,
    default_sinks: Vec<String>,
    transcription: Arc<TranscriptionService>,
}

impl Registry {
    /// Builds every spec once. `config` must have passed [`validate`];
    /// a spec that still cannot be made is an error naming its sink.
    pub fn new(
        config: &Config,
        transcription: Arc<TranscriptionService>,
        uploader: Option<&Arc<Uploader>>,
    ) -> Result<Self, RegistryError> {
        let env = SpecEnv {
            config,
            transcription: &transcription,
            uploader,
        };
        let config_error = |name: &str| {
            let name = name.to_owned();
            move |message| RegistryError::Spec { name, message }
        };
        let mut named: BTreeMap<String, Arc<dyn SinkSpec>> = BTreeMap::new();
        // `record` is a record instance with nothing overridden.
        named.insert(
            recorder::NAME.to_owned(),
            RecordSinkConfig::default()
                .spec(recorder::NAME, &env)
                .map_err(config_error(recorder::NAME))?,
        );
        for (name, sink) in &config.sinks {
            let spec = sink.kind().spec(name, &env).map_err(config_error(name))?;
            named.insert(name.clone(), spec);
        }
        Ok(Self {
            named,
            default_sinks: config.default_sinks.clone(),
            transcription,
        })
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
        // A session that picked a transcribing sink by name has chosen its
        // transcription: the default backend is added only when asked for.
        let backend = if transcribe.is_none() && specs.iter().any(|s| s.transcribes()) {
            None
        } else {
            self.transcription
                .select(transcribe)
                .map_err(SinkError::UnknownBackend)?
        };
        let transcribe = backend.as_ref().map(|b| b.name.clone());
        if let Some(backend) = backend {
            specs.push(Arc::new(TranscribeSpec::new(
                transcriber::NAME,
                self.transcription.clone(),
                backend,
            )));
        }
        Ok(Planned {
            plan: SinkPlan::new(specs),
            transcribe,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Two recorders and a transcriber, as in the README.
    const EXAMPLE: &str = r#"
[transcription.backends.default]
url = "http://127.0.0.1:1/v1"

[sinks.archive]
kind = "record"
sample_rate = 0
channels = "keep"

[sinks.asr16k]
kind = "record"
sample_rate = 16000
channels = "mono"

[sinks.notes]
kind = "transcribe"
backend = "default"
"#;

    fn parsed(text: &str) -> Result<Config, String> {
        Config::from_toml(text, Path::new("cochlea.toml")).map_err(|e| e.to_string())
    }

    fn refused(text: &str) -> String {
        let config = parsed(text).unwrap();
        validate(&config).unwrap_err()
    }

    fn registry(config: &Config) -> Registry {
        let service = TranscriptionService::new(&config.transcription).unwrap();
        Registry::new(config, Arc::new(service), None).unwrap()
    }

    fn plan(
        registry: &Registry,
        sinks: Option<&[&str]>,
        transcribe: Option<&str>,
    ) -> Result<Planned, SinkError> {
        let sinks: Option<Vec<String>> =
            sinks.map(|names| names.iter().map(|n| (*n).to_owned()).collect());
        registry.plan(sinks.as_deref(), transcribe)
    }

    #[test]
    fn named_instances_parse_into_their_kinds() {
        let config = parsed(EXAMPLE).unwrap();
        validate(&config).unwrap();
        assert_eq!(
            config.sinks["archive"],
            SinkConfig::Record(RecordSinkConfig {
                sample_rate: Some(0),
                channels: Some(recorder::ChannelsSetting::Keep),
                ..RecordSinkConfig::default()
            })
        );
        assert_eq!(
            config.sinks["asr16k"],
            SinkConfig::Record(RecordSinkConfig {
                sample_rate: Some(16_000),
                channels: Some(recorder::ChannelsSetting::Mono),
                ..RecordSinkConfig::default()
            })
        );
        assert_eq!(
            config.sinks["notes"],
            SinkConfig::Transcribe(TranscribeSinkConfig {
                backend: "default".into()
            })
        );
        assert_eq!(
            sink_names(&config),
            ["archive", "asr16k", "notes", "record"]
        );
        // `--print-config` prints them so that they parse back the same.
        let back = parsed(&config.to_toml()).unwrap();
        assert_eq!(back.sinks, config.sinks);
    }

    /// The README's "Named sinks" example is a valid configuration.
    #[test]
    fn the_readme_example_parses_and_validates() {
        let readme = include_str!("../../README.md");
        let section = &readme[readme.find("### Named sinks").unwrap()..];
        let start = section.find("```toml\n").unwrap() + "```toml\n".len();
        let example = &section[start..start + section[start..].find("```").unwrap()];
        let mut config = parsed(example).unwrap();
        assert_eq!(
            sink_names(&config),
            ["archive", "asr16k", "notes", "record"]
        );
        assert_eq!(config.default_sinks, ["archive"]);
        // Its transcriber needs the backend it names.
        config.transcription.backends = parsed(EXAMPLE).unwrap().transcription.backends;
        validate(&config).unwrap();
    }

    #[test]
    fn an_unknown_kind_is_refused_naming_it_the_sink_and_the_kinds() {
        let err = parsed("[sinks.tape1]\nkind = \"tape\"\n").unwrap_err();
        for part in ["tape", "[sinks.tape1]", "`record`", "`transcribe`"] {
            assert!(err.contains(part), "{part}: {err}");
        }
        let err = parsed("[sinks.tape1]\nsample_rate = 8000\n").unwrap_err();
        assert!(err.contains("missing field `kind`"), "{err}");
        assert!(err.contains("[sinks.tape1]"), "{err}");
    }

    #[test]
    fn an_unknown_key_is_refused_naming_it_and_the_sink() {
        let err = parsed("[sinks.asr]\nkind = \"record\"\nsample_rat = 16000\n").unwrap_err();
        for part in ["sample_rat`", "[sinks.asr]", "`sample_rate`"] {
            assert!(err.contains(part), "{part}: {err}");
        }
        let err = parsed("[sinks.notes]\nkind = \"transcribe\"\nbackend = \"a\"\nmodel = \"x\"\n")
            .unwrap_err();
        assert!(err.contains("unknown field `model`"), "{err}");
        // A key of the other kind is unknown to this one.
        let err = parsed("[sinks.notes]\nkind = \"transcribe\"\nbackend = \"a\"\nfsync = true\n")
            .unwrap_err();
        assert!(err.contains("unknown field `fsync`"), "{err}");
        let err = parsed("[sinks.asr]\nkind = \"record\"\nchannels = \"quad\"\n").unwrap_err();
        assert!(err.contains("quad") && err.contains("[sinks.asr]"), "{err}");
    }

    #[test]
    fn names_that_clash_or_cannot_be_file_names_are_refused() {
        for name in ["record", "transcribe", "none"] {
            let err = refused(&format!("[sinks.{name}]\nkind = \"record\"\n"));
            assert!(
                err.starts_with(&format!("sinks.{name}: the name '{name}' is taken")),
                "{err}"
            );
        }
        let long = "a".repeat(65);
        for name in [
            "\"a.b\"",
            "\"a b\"",
            "\"\"",
            "\"../x\"",
            "\"é\"",
            long.as_str(),
        ] {
            let err = refused(&format!("[sinks.{name}]\nkind = \"record\"\n"));
            assert!(
                err.contains("must be 1 to 64 letters, digits"),
                "{name}: {err}"
            );
        }
        for name in ["ch0", "ch1", "ch12"] {
            let err = refused(&format!("[sinks.{name}]\nkind = \"record\"\n"));
            assert!(err.contains("split channels"), "{name}: {err}");
        }
        let ok = "b".repeat(64);
        validate(
            &parsed(&format!(
                "[sinks.{ok}]\nkind = \"record\"\n[sinks.A-1_z]\nkind = \"record\"\n[sinks.ch]\nkind = \"record\"\n[sinks.chx1]\nkind = \"record\"\n"
            ))
            .unwrap(),
        )
        .unwrap();
    }

    #[test]
    fn bad_values_are_refused_naming_the_sink() {
        assert_eq!(
            refused("[sinks.asr]\nkind = \"record\"\nsample_rate = 4000\n"),
            "sinks.asr: sample_rate must be 0 (the stream's) or from 8000 to 48000, not 4000"
        );
        assert_eq!(
            refused("[sinks.asr]\nkind = \"record\"\nflush_interval_ms = 0\n"),
            "sinks.asr: flush_interval_ms must be from 10 to 60000, not 0"
        );
        assert_eq!(
            refused("[sinks.notes]\nkind = \"transcribe\"\nbackend = \"default\"\n"),
            "sinks.notes: unknown transcription backend 'default': none is configured"
        );
        // Through the whole load, as `cochlea serve` reports it.
        let err = parsed(
            EXAMPLE
                .replace("backend = \"default\"", "backend = \"crm\"")
                .as_str(),
        )
        .unwrap()
        .validate()
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "invalid configuration: sinks.notes: unknown transcription backend 'crm'; available: default"
        );
    }

    #[test]
    fn default_sinks_are_checked_against_the_registry_names() {
        let config = parsed(&format!(
            "default_sinks = [\"asr16k\", \"record\"]\n{EXAMPLE}"
        ))
        .unwrap();
        validate(&config).unwrap();
        let err = refused(&format!("default_sinks = [\"tape\"]\n{EXAMPLE}"));
        assert_eq!(
            err,
            "default_sinks names unknown sink 'tape'; available: archive, asr16k, notes, record"
        );
        let sessions = registry(&config);
        let planned = plan(&sessions, None, Some("none")).unwrap();
        assert_eq!(planned.plan.names(), ["asr16k", "record"]);
    }

    #[test]
    fn sessions_pick_instances_by_name() {
        let config = parsed(EXAMPLE).unwrap();
        let sessions = registry(&config);
        assert_eq!(sessions.names(), sink_names(&config));
        let planned = plan(&sessions, Some(&["archive", "asr16k"]), Some("none")).unwrap();
        assert_eq!(planned.plan.names(), ["archive", "asr16k"]);
        assert_eq!(planned.plan.wanted_rates(), [None, Some(16_000)]);
        assert_eq!(planned.transcribe, None);
        // Today's names keep their meaning: `record` is `[recorder]`, and
        // the default backend still joins a session that does not opt out.
        let planned = plan(&sessions, Some(&["record"]), None).unwrap();
        assert_eq!(planned.plan.names(), ["record", "transcribe"]);
        assert_eq!(planned.transcribe.as_deref(), Some("default"));
        let Err(err) = plan(&sessions, Some(&["tape"]), None) else {
            panic!("an unknown sink was planned");
        };
        assert_eq!(
            err.to_string(),
            "unknown sink 'tape'; available: archive, asr16k, notes, record"
        );
    }

    #[test]
    fn a_transcriber_picked_by_name_replaces_the_default_one() {
        let config = parsed(EXAMPLE).unwrap();
        let sessions = registry(&config);
        let planned = plan(&sessions, Some(&["archive", "notes"]), None).unwrap();
        assert_eq!(planned.plan.names(), ["archive", "notes"]);
        assert_eq!(planned.plan.wanted_rates(), [None, Some(16_000)]);
        assert_eq!(planned.transcribe, None);
        // Asked for explicitly, `transcribe=` still adds its own sink.
        let planned = plan(&sessions, Some(&["notes"]), Some("default")).unwrap();
        assert_eq!(planned.plan.names(), ["notes", "transcribe"]);
        assert_eq!(planned.transcribe.as_deref(), Some("default"));
    }
}
