//! What all transcribing sessions share.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::Semaphore;

use super::backend::{self, Backend, BackendError};
use super::{TranscriptionConfig, DEFAULT_BACKEND};

/// What every transcribing session shares: the backends, one HTTP client
/// (pooled connections), and the global request limit.
pub struct TranscriptionService {
    pub(super) config: TranscriptionConfig,
    backends: BTreeMap<String, Arc<Backend>>,
    pub(super) client: reqwest::Client,
    pub(super) global_requests: Arc<Semaphore>,
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
        })
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
            Some(name) => self.backend(name).map(Some).ok_or_else(|| {
                let names = self.backend_names();
                if names.is_empty() {
                    format!("unknown transcription backend '{name}': none is configured")
                } else {
                    format!(
                        "unknown transcription backend '{name}'; available: {}",
                        names.join(", ")
                    )
                }
            }),
        }
    }
}
