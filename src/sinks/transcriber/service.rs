//! What all transcribing sessions share.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{watch, Semaphore};

use super::backend::{self, Backend, BackendError};
use super::spec::unknown_backend;
use super::{TranscriptionConfig, DEFAULT_BACKEND};
use crate::storage::upload::Uploader;

/// What every transcribing session shares: the backends, one HTTP client
/// (pooled connections), and the global request limit.
pub struct TranscriptionService {
    pub(super) config: TranscriptionConfig,
    backends: BTreeMap<String, Arc<Backend>>,
    pub(super) client: reqwest::Client,
    pub(super) global_requests: Arc<Semaphore>,
    /// The server-wide budget of partial requests in flight.
    pub(super) interim_requests: Arc<Semaphore>,
    /// Set when the server shuts down: every pending transcript is given
    /// up by then, so that shutdown fits `shutdown_timeout_ms`.
    pub(super) shutdown_deadline: watch::Sender<Option<tokio::time::Instant>>,
    /// Where final transcripts are kept (`<session_id>.transcript.jsonl`,
    /// beside the recordings); `None`: not kept.
    transcripts_dir: Option<PathBuf>,
    uploader: Option<Arc<Uploader>>,
}

impl TranscriptionService {
    pub fn new(config: &TranscriptionConfig) -> Result<Self, BackendError> {
        let client = backend::client_builder()
            .build()
            .map_err(|e| BackendError::Config {
                name: "*".into(),
                message: format!("cannot build the HTTP client: {e}"),
            })?;
        let mut backends = BTreeMap::new();
        for (name, backend) in &config.backends {
            backends.insert(name.clone(), Arc::new(Backend::new(name, backend)?));
        }
        Ok(Self {
            config: config.clone(),
            backends,
            client,
            global_requests: Arc::new(Semaphore::new(config.max_concurrent_requests)),
            interim_requests: Arc::new(Semaphore::new(config.interim_max_concurrent_requests)),
            shutdown_deadline: watch::channel(None).0,
            transcripts_dir: None,
            uploader: None,
        })
    }

    /// Keeps every session's final transcripts in `dir` (the recordings'
    /// directory), where the recordings API reads them back.
    /// Keeps final transcripts in `dir`; with an `uploader` (an object
    /// store), `dir` is its spool and each session's file goes up at its end.
    pub fn with_transcripts(mut self, dir: &Path, uploader: Option<Arc<Uploader>>) -> Self {
        self.transcripts_dir = Some(dir.to_path_buf());
        self.uploader = uploader;
        self
    }

    pub(super) fn uploader(&self) -> Option<Arc<Uploader>> {
        self.uploader.clone()
    }

    pub(super) fn transcripts_dir(&self) -> Option<&Path> {
        self.transcripts_dir.as_deref()
    }

    /// The server is shutting down: transcripts not in by `at` are given
    /// up (and reported as `transcribe_failed`), whatever `stop_wait_ms`.
    pub fn begin_shutdown(&self, at: tokio::time::Instant) {
        self.shutdown_deadline.send_replace(Some(at));
    }

    pub fn backend(&self, name: &str) -> Option<Arc<Backend>> {
        self.backends.get(name).cloned()
    }

    pub fn backend_names(&self) -> Vec<String> {
        self.backends.keys().cloned().collect()
    }

    /// The backend for a session that asked for `requested` (`None`: did not
    /// say). `Ok(None)`: no transcription.
    pub fn select(&self, requested: Option<&str>) -> Result<Option<Arc<Backend>>, String> {
        match requested {
            None => Ok(self.backend(DEFAULT_BACKEND)),
            Some("none") => Ok(None),
            Some(name) => self
                .backend(name)
                .map(Some)
                .ok_or_else(|| unknown_backend(name, self.backend_names())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sinks::transcriber::backend::BackendConfig;

    fn service(names: &[&str]) -> TranscriptionService {
        let mut config = TranscriptionConfig::default();
        for name in names {
            config.backends.insert(
                (*name).to_owned(),
                BackendConfig {
                    url: "http://127.0.0.1:1".into(),
                    ..BackendConfig::default()
                },
            );
        }
        TranscriptionService::new(&config).unwrap()
    }

    fn selected(service: &TranscriptionService, requested: Option<&str>) -> Option<String> {
        service
            .select(requested)
            .unwrap()
            .map(|backend| backend.name.clone())
    }

    #[test]
    fn sessions_that_do_not_choose_get_the_default_backend_or_none() {
        let with_default = service(&["default", "fast"]);
        assert_eq!(selected(&with_default, None).as_deref(), Some("default"));
        let without_default = service(&["fast"]);
        assert_eq!(selected(&without_default, None), None);
    }

    #[test]
    fn a_session_picks_a_backend_by_name_or_opts_out_with_none() {
        let service = service(&["default", "fast"]);
        assert_eq!(selected(&service, Some("fast")).as_deref(), Some("fast"));
        assert_eq!(selected(&service, Some("none")), None);
        assert_eq!(service.backend_names(), ["default", "fast"]);
    }

    #[test]
    fn an_unknown_backend_is_refused_with_the_names_available() {
        let err = service(&["default", "fast"])
            .select(Some("slow"))
            .unwrap_err();
        assert_eq!(
            err,
            "unknown transcription backend 'slow'; available: default, fast"
        );
        let err = service(&[]).select(Some("slow")).unwrap_err();
        assert_eq!(
            err,
            "unknown transcription backend 'slow': none is configured"
        );
    }
}
