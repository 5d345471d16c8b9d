//! The `transcribe` kind: `[sinks.<name>]` with `kind = "transcribe"`, and
//! the spec that starts a transcriber for each session (`transcribe=<backend>`
//! makes the same spec under the name `transcribe`).

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::backend::{Backend, BackendKind};
use super::streaming::StreamingTranscriber;
use super::{Transcriber, TranscriptionService, SAMPLE_RATE};
use crate::config::Config;
use crate::sinks::registry::{Emitters, SinkKind, SinkSpec, SpecEnv};
use crate::sinks::{Sink, SinkContext, SinkError};

/// Transcription by one configured backend, for the sessions that name
/// this sink in `sinks=`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TranscribeSinkConfig {
    /// A backend of `[transcription.backends.<name>]`.
    pub backend: String,
}

/// The refusal of a backend name that is not configured (`transcribe=`, or
/// a `[sinks.<name>]` of this kind).
pub(super) fn unknown_backend(name: &str, available: Vec<String>) -> String {
    if available.is_empty() {
        format!("unknown transcription backend '{name}': none is configured")
    } else {
        format!(
            "unknown transcription backend '{name}'; available: {}",
            available.join(", ")
        )
    }
}

impl SinkKind for TranscribeSinkConfig {
    fn validate(&self, config: &Config) -> Result<(), String> {
        let backends = &config.transcription.backends;
        if backends.contains_key(&self.backend) {
            Ok(())
        } else {
            Err(unknown_backend(
                &self.backend,
                backends.keys().cloned().collect(),
            ))
        }
    }

    fn spec(&self, name: &str, env: &SpecEnv<'_>) -> Result<Arc<dyn SinkSpec>, String> {
        let backend = env
            .transcription
            .backend(&self.backend)
            .ok_or_else(|| unknown_backend(&self.backend, env.transcription.backend_names()))?;
        Ok(Arc::new(TranscribeSpec::new(
            name,
            env.transcription.clone(),
            backend,
        )))
    }
}

/// A transcriber on one backend: voice activity and transcripts.
pub struct TranscribeSpec {
    name: String,
    service: Arc<TranscriptionService>,
    backend: Arc<Backend>,
    /// Partial transcripts too (the session asked with `interim=true`).
    interim: bool,
}

impl TranscribeSpec {
    pub fn new(name: &str, service: Arc<TranscriptionService>, backend: Arc<Backend>) -> Self {
        Self {
            name: name.to_owned(),
            service,
            backend,
            interim: false,
        }
    }
}

impl SinkSpec for TranscribeSpec {
    fn name(&self) -> &str {
        &self.name
    }

    fn sample_rate(&self) -> Option<u32> {
        Some(SAMPLE_RATE)
    }

    fn transcribes(&self) -> bool {
        true
    }

    fn with_interim(&self) -> Option<Arc<dyn SinkSpec>> {
        Some(Arc::new(Self {
            name: self.name.clone(),
            service: self.service.clone(),
            backend: self.backend.clone(),
            interim: true,
        }))
    }

    fn build(
        &self,
        context: &SinkContext,
        emitters: &mut Emitters,
    ) -> Result<Vec<Box<dyn Sink>>, SinkError> {
        let emitter = emitters.next_emitter();
        if let BackendKind::Streaming(kind) = self.backend.kind() {
            return Ok(vec![Box::new(StreamingTranscriber::start(
                context,
                &self.service,
                self.backend.clone(),
                kind,
                emitter.sender(),
                self.interim,
            ))]);
        }
        Ok(vec![Box::new(Transcriber::start(
            context,
            &self.service,
            self.backend.clone(),
            emitter.sender(),
            self.interim,
        ))])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::transcriber::backend::BackendConfig;

    fn config_with(backends: &[&str]) -> Config {
        let mut config = Config::default();
        for name in backends {
            config.transcription.backends.insert(
                (*name).to_owned(),
                BackendConfig {
                    url: "http://127.0.0.1:1".into(),
                    ..BackendConfig::default()
                },
            );
        }
        config
    }

    #[test]
    fn the_backend_must_be_configured() {
        let sink = TranscribeSinkConfig {
            backend: "crm".into(),
        };
        sink.validate(&config_with(&["crm"])).unwrap();
        assert_eq!(
            sink.validate(&config_with(&[])).unwrap_err(),
            "unknown transcription backend 'crm': none is configured"
        );
        assert_eq!(
            sink.validate(&config_with(&["default", "hook"]))
                .unwrap_err(),
            "unknown transcription backend 'crm'; available: default, hook"
        );
    }

    #[test]
    fn the_spec_carries_the_instance_name_and_wants_16_khz() {
        let config = config_with(&["crm"]);
        let service = Arc::new(TranscriptionService::new(&config.transcription).unwrap());
        let env = SpecEnv {
            config: &config,
            transcription: &service,
            uploader: None,
        };
        let spec = TranscribeSinkConfig {
            backend: "crm".into(),
        }
        .spec("notes", &env)
        .unwrap();
        assert_eq!(spec.name(), "notes");
        assert_eq!(spec.sample_rate(), Some(16_000));
        assert!(spec.transcribes());
    }
}
