//! Speech-to-text backends: one HTTP request per utterance.
//!
//! - `openai`: multipart POST of a WAV file to an OpenAI-compatible
//!   `/v1/audio/transcriptions` (whisper.cpp's server, faster-whisper
//!   servers, vLLM, LocalAI and hosted providers speak it).
//! - `webhook`: POST to any URL, the body a WAV file (metadata in headers) or
//!   JSON with base64 audio and the metadata; the transcript is read from a
//!   configurable field of the JSON reply.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::sync::atomic::{AtomicU8, Ordering};
use std::time::Duration;

use base64::Engine;
use reqwest::Url;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::streaming::{self, StreamingKind};
use super::words;
use crate::protocol::Word;

/// How a backend is reached, as configured (`kind = "..."`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(try_from = "String", into = "String")]
pub enum BackendKind {
    /// One OpenAI-style HTTP request per utterance.
    #[default]
    Openai,
    /// One HTTP request per utterance to any endpoint.
    Webhook,
    /// One upstream WebSocket per session (per channel for a mono kind),
    /// audio as it comes, results as they come: the kinds of
    /// [`streaming::KINDS`].
    Streaming(&'static StreamingKind),
}

impl BackendKind {
    pub fn name(self) -> &'static str {
        match self {
            BackendKind::Openai => "openai",
            BackendKind::Webhook => "webhook",
            BackendKind::Streaming(kind) => kind.name,
        }
    }

    /// The kind called `name`: `openai`, `webhook` or a streaming one.
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "openai" => Some(BackendKind::Openai),
            "webhook" => Some(BackendKind::Webhook),
            _ => streaming::kind_named(name).map(BackendKind::Streaming),
        }
    }
}

impl TryFrom<String> for BackendKind {
    type Error = String;

    fn try_from(name: String) -> Result<Self, Self::Error> {
        BackendKind::named(&name).ok_or_else(|| {
            let mut names = vec!["openai", "webhook"];
            names.extend(streaming::KINDS.iter().map(|k| k.name));
            format!(
                "unknown backend kind '{name}' (known: {})",
                names.join(", ")
            )
        })
    }
}

impl From<BackendKind> for String {
    fn from(kind: BackendKind) -> Self {
        kind.name().to_owned()
    }
}

/// What a webhook receives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WebhookBody {
    /// `audio/wav`, with the utterance's metadata in `X-Cochlea-*` headers.
    #[default]
    Wav,
    /// `{"audio_base64": "<WAV>", "session_id", "utterance_id", ...}`.
    Json,
}

/// One `[transcription.backends.NAME]` table.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    pub kind: BackendKind,
    /// `openai`: the endpoint, or a base URL it is derived from (see
    /// [`openai_endpoint`]). `webhook`: the URL posted to.
    pub url: String,
    /// Sent as `Authorization: Bearer ...` when set.
    pub api_key: String,
    /// Read the API key from this environment variable instead.
    pub api_key_env: String,
    /// `openai`: the `model` field.
    pub model: String,
    /// `openai`: optional `language` (ISO-639-1) and `prompt` fields.
    pub language: String,
    pub prompt: String,
    /// `webhook`: WAV or JSON body.
    pub body: WebhookBody,
    /// `webhook`: dot-separated path of the transcript in the JSON reply.
    pub text_field: String,
    /// Extra request headers.
    pub headers: BTreeMap<String, String>,
    /// PEM file of CA certificates to trust for this backend besides the
    /// system's (a self-hosted engine behind a private CA).
    pub ca_cert_path: String,
    /// Streaming kinds: settings for the upstream (`deepgram`,
    /// `assemblyai`: query parameters passed through, such as `model`,
    /// `language`; `openai_realtime`: the session's `model`, `language`,
    /// `prompt` and voice detection); strings, numbers or booleans.
    pub query: BTreeMap<String, Value>,
    /// Streaming kinds: audio kept after it was sent, until a final result
    /// covers it, so that it can be sent again after a reconnect.
    pub replay_buffer_ms: u64,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self {
            kind: BackendKind::Openai,
            url: String::new(),
            api_key: String::new(),
            api_key_env: String::new(),
            model: "whisper-1".into(),
            language: String::new(),
            prompt: String::new(),
            body: WebhookBody::Wav,
            text_field: "text".into(),
            headers: BTreeMap::new(),
            ca_cert_path: String::new(),
            query: BTreeMap::new(),
            replay_buffer_ms: 10_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("backend '{name}': {message}")]
    Config { name: String, message: String },
    #[error("timed out after {0} ms")]
    Timeout(u64),
    #[error("HTTP {status}: {body}")]
    Status { status: u16, body: String },
    #[error("request failed: {0}")]
    Transport(String),
    #[error("unusable reply: {0}")]
    BadReply(String),
    #[error("encoding WAV: {0}")]
    Wav(#[from] hound::Error),
}

impl BackendError {
    /// Worth trying again: the backend may be fine in a moment. A 4xx or a
    /// reply we cannot read will not get better by repeating it.
    pub fn is_retryable(&self) -> bool {
        match self {
            BackendError::Timeout(_) | BackendError::Transport(_) => true,
            BackendError::Status { status, .. } => *status >= 500 || *status == 429,
            _ => false,
        }
    }
}

/// The utterance as a backend sees it.
pub struct UtteranceRequest<'a> {
    pub session_id: &'a str,
    pub utterance_id: u64,
    pub channel: u16,
    pub start_seconds: f64,
    pub end_seconds: f64,
    /// 16 kHz mono.
    pub samples: &'a [i16],
    pub metadata: &'a Map<String, Value>,
}

/// What a backend answered for one utterance.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendReply {
    pub text: String,
    /// In stream time; `None` when the backend gave no timings.
    pub words: Option<Vec<Word>>,
}

/// Whether an `openai` backend takes `response_format=verbose_json`, as
/// learnt from its answers (remembered for the backend, over all sessions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VerboseSupport {
    Unknown = 0,
    Yes = 1,
    No = 2,
}

impl VerboseSupport {
    fn from_u8(value: u8) -> Self {
        match value {
            1 => VerboseSupport::Yes,
            2 => VerboseSupport::No,
            _ => VerboseSupport::Unknown,
        }
    }
}

/// Whether a failed `verbose_json` request may be the format's fault, so
/// that one retry with plain `json` is worth it: a refusal of the request
/// (4xx other than auth, a missing route, a timeout or rate limit), a crash
/// on it (500), or a reply we cannot read. Overload (502-504), timeouts and
/// transport errors say nothing about the format.
pub fn verbose_may_be_refused(error: &BackendError) -> bool {
    match error {
        BackendError::Status { status, .. } => {
            matches!(*status, 400..=499 if !matches!(*status, 401 | 403 | 404 | 408 | 429))
                || *status == 500
        }
        BackendError::BadReply(_) => true,
        _ => false,
    }
}

/// A configured backend, ready to send requests.
pub struct Backend {
    pub name: String,
    kind: BackendKind,
    url: Url,
    /// `url` as logs may show it (see [`redacted_url`]).
    shown_url: String,
    /// What a reply or an error must not carry to a client or a log: the
    /// URL's user name, password and query values, the API key and the
    /// configured header values (see [`Backend::scrub`]).
    secrets: Vec<String>,
    api_key: Option<String>,
    model: String,
    language: String,
    prompt: String,
    body: WebhookBody,
    text_path: Vec<String>,
    headers: reqwest::header::HeaderMap,
    /// Its own HTTP client when it trusts extra CAs; else the shared one.
    client: Option<reqwest::Client>,
    /// Streaming kinds: the configured query, as text.
    query: Vec<(String, String)>,
    replay_buffer_ms: u64,
    /// A [`VerboseSupport`]: what `openai` requests for word timings learnt.
    verbose: AtomicU8,
}

/// `openai` URLs: a full `.../audio/transcriptions` endpoint is used as is;
/// a base ending in `/v1` gets `/audio/transcriptions`; anything else gets
/// `/v1/audio/transcriptions`. So the base URL an OpenAI SDK takes, the bare
/// server address, and the endpoint all work. Only the path changes: the
/// query (a key, Azure's `api-version`) stays the query.
pub fn openai_endpoint(mut url: Url) -> Url {
    let path = url.path().trim_end_matches('/').to_owned();
    let path = if path.ends_with("/audio/transcriptions") {
        path
    } else if path.ends_with("/v1") {
        format!("{path}/audio/transcriptions")
    } else {
        format!("{path}/v1/audio/transcriptions")
    };
    url.set_path(&path);
    url
}

/// Checks the streaming kinds' settings and renders `query` as text.
fn streaming_query(config: &BackendConfig) -> Result<Vec<(String, String)>, String> {
    let BackendKind::Streaming(kind) = config.kind else {
        if !config.query.is_empty() {
            return Err("query is only for the streaming kinds".into());
        }
        return Ok(Vec::new());
    };
    if !config.ca_cert_path.is_empty() {
        return Err(format!(
            "ca_cert_path is not supported for kind \"{}\" (it trusts the system's CAs)",
            kind.name
        ));
    }
    if !(1_000..=120_000).contains(&config.replay_buffer_ms) {
        return Err(format!(
            "replay_buffer_ms must be from 1000 to 120000, not {}",
            config.replay_buffer_ms
        ));
    }
    let mut query = Vec::new();
    for (key, value) in &config.query {
        if kind.own_query_keys.contains(&key.as_str()) {
            return Err(format!(
                "query.{key} is set by cochlea from the session (it sends {}); remove it",
                kind.own_query_keys.join(", ")
            ));
        }
        if let Some(known) = kind.query_keys {
            if !known.contains(&key.as_str()) {
                return Err(format!(
                    "query.{key} is not a setting of kind \"{}\" (it takes {})",
                    kind.name,
                    if known.is_empty() {
                        "none".to_owned()
                    } else {
                        known.join(", ")
                    }
                ));
            }
        }
        let text = match value {
            Value::String(s) => s.clone(),
            Value::Bool(b) => b.to_string(),
            Value::Number(n) => n.to_string(),
            _ => {
                return Err(format!(
                    "query.{key} must be a string, a number or a boolean"
                ))
            }
        };
        query.push((key.clone(), text));
    }
    Ok(query)
}

/// A URL as a log may show it: without user name and password, and with
/// the query, where keys and signatures travel, replaced by a marker.
pub fn redacted_url(url: &Url) -> String {
    let mut shown = url.clone();
    // Only URLs that cannot have credentials refuse these; they have none.
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_query(None);
    shown.set_fragment(None);
    let mut text = String::from(shown);
    if url.query().is_some() {
        text.push_str("?[redacted]");
    }
    text
}

/// Shorter strings are left alone when scrubbing: they are no credential,
/// and replacing, say, every `1` would make messages unreadable.
const MIN_SECRET_CHARS: usize = 8;
const REDACTED: &str = "[redacted]";

/// The parts of a backend's settings that must not reach a client or a log.
fn secrets_of(
    url: &Url,
    api_key: Option<&str>,
    headers: &reqwest::header::HeaderMap,
) -> Vec<String> {
    let mut secrets: Vec<String> = Vec::new();
    secrets.push(url.username().to_owned());
    if let Some(password) = url.password() {
        secrets.push(password.to_owned());
    }
    if let Some(query) = url.query() {
        // Raw, as a request line echoes it, and decoded, as a JSON reply may.
        secrets.push(query.to_owned());
        for pair in query.split('&') {
            secrets.push(pair.split_once('=').map_or(pair, |(_, v)| v).to_owned());
        }
        secrets.extend(url.query_pairs().map(|(_, value)| value.into_owned()));
    }
    secrets.extend(api_key.map(str::to_owned));
    secrets.extend(
        headers
            .values()
            .filter_map(|v| v.to_str().ok())
            .map(str::to_owned),
    );
    secrets.retain(|s| s.chars().count() >= MIN_SECRET_CHARS);
    secrets.sort_unstable();
    secrets.dedup();
    // Longest first, so a secret containing another is removed whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    secrets
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("url", &self.shown_url)
            .finish_non_exhaustive()
    }
}

impl Backend {
    pub fn new(name: &str, config: &BackendConfig) -> Result<Self, BackendError> {
        let fail = |message: String| BackendError::Config {
            name: name.to_owned(),
            message,
        };
        if config.url.is_empty() {
            return Err(fail("url is required".into()));
        }
        // The URL is not repeated in these errors: it may hold a key.
        let url = Url::parse(&config.url).map_err(|e| fail(format!("url is not a URL: {e}")))?;
        let schemes: [&str; 2] = match config.kind {
            BackendKind::Streaming(_) => ["ws", "wss"],
            _ => ["http", "https"],
        };
        if !schemes.contains(&url.scheme()) {
            return Err(fail(format!(
                "url must be {}:// or {}:// for kind {}, not {}",
                schemes[0],
                schemes[1],
                config.kind.name(),
                url.scheme()
            )));
        }
        let url = match config.kind {
            BackendKind::Openai => openai_endpoint(url),
            BackendKind::Webhook | BackendKind::Streaming(_) => url,
        };
        let query = streaming_query(config).map_err(fail)?;
        let api_key = if !config.api_key_env.is_empty() {
            match std::env::var(&config.api_key_env) {
                Ok(key) if !key.is_empty() => Some(key),
                _ => {
                    return Err(fail(format!(
                        "api_key_env names {}, which is unset or empty",
                        config.api_key_env
                    )))
                }
            }
        } else {
            (!config.api_key.is_empty()).then(|| config.api_key.clone())
        };
        let mut headers = reqwest::header::HeaderMap::new();
        for (key, value) in &config.headers {
            let name = reqwest::header::HeaderName::from_bytes(key.as_bytes())
                .map_err(|e| fail(format!("header name '{key}': {e}")))?;
            let value = reqwest::header::HeaderValue::from_str(value)
                .map_err(|e| fail(format!("header '{key}' value: {e}")))?;
            headers.insert(name, value);
        }
        let text_path: Vec<String> = config
            .text_field
            .split('.')
            .filter(|p| !p.is_empty())
            .map(str::to_owned)
            .collect();
        if text_path.is_empty() {
            return Err(fail("text_field must name a field".into()));
        }
        let client = if config.ca_cert_path.is_empty() {
            None
        } else {
            let pem = std::fs::read(&config.ca_cert_path)
                .map_err(|e| fail(format!("ca_cert_path {}: {e}", config.ca_cert_path)))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| fail(format!("ca_cert_path {}: {e}", config.ca_cert_path)))?;
            if certs.is_empty() {
                return Err(fail(format!(
                    "ca_cert_path {} holds no PEM certificate",
                    config.ca_cert_path
                )));
            }
            Some(
                client_builder()
                    .tls_certs_merge(certs)
                    .build()
                    .map_err(|e| fail(format!("cannot build its HTTP client: {e}")))?,
            )
        };
        Ok(Self {
            name: name.to_owned(),
            kind: config.kind,
            shown_url: redacted_url(&url),
            secrets: secrets_of(&url, api_key.as_deref(), &headers),
            url,
            api_key,
            model: config.model.clone(),
            language: config.language.clone(),
            prompt: config.prompt.clone(),
            body: config.body,
            text_path,
            headers,
            client,
            verbose: AtomicU8::new(VerboseSupport::Unknown as u8),
            query,
            replay_buffer_ms: config.replay_buffer_ms,
        })
    }

    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// Streaming kinds: the endpoint with its configured query (secrets in it
    /// included: only for connecting, never for a log).
    pub(super) fn streaming_url(&self) -> &Url {
        &self.url
    }

    pub(super) fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref()
    }

    pub(super) fn headers(&self) -> &reqwest::header::HeaderMap {
        &self.headers
    }

    pub(super) fn streaming_query(&self) -> &[(String, String)] {
        &self.query
    }

    pub(super) fn replay_buffer_ms(&self) -> u64 {
        self.replay_buffer_ms
    }

    /// A message without this backend's secrets, for clients and logs.
    pub(super) fn scrub_text(&self, text: String) -> String {
        match self.scrub(BackendError::Transport(text)) {
            BackendError::Transport(text) => text,
            other => other.to_string(),
        }
    }

    /// What this backend has shown about `verbose_json`.
    pub fn verbose_support(&self) -> VerboseSupport {
        VerboseSupport::from_u8(self.verbose.load(Ordering::Relaxed))
    }

    fn remember(&self, support: VerboseSupport) {
        self.verbose.store(support as u8, Ordering::Relaxed);
    }

    /// Where requests go, for logs: no credentials or query in it.
    pub fn url(&self) -> &str {
        &self.shown_url
    }

    /// One attempt: sends the utterance, returns its text, and with
    /// `want_words` its word timings where the backend gives them. Errors
    /// carry no secret of the backend's settings: they reach clients and logs.
    ///
    /// For word timings an `openai` backend is asked for `verbose_json`; if
    /// it refuses that (see [`verbose_may_be_refused`]) the request is sent
    /// again at once with plain `json`, and which one worked is remembered.
    pub async fn transcribe(
        &self,
        client: &reqwest::Client,
        utterance: &UtteranceRequest<'_>,
        timeout: Duration,
        want_words: bool,
    ) -> Result<BackendReply, BackendError> {
        let verbose = want_words
            && self.kind == BackendKind::Openai
            && self.verbose_support() != VerboseSupport::No;
        if !verbose {
            return self
                .attempt(client, utterance, timeout, false)
                .await
                .map_err(|error| self.scrub(error));
        }
        match self.attempt(client, utterance, timeout, true).await {
            Ok(reply) => {
                self.remember(VerboseSupport::Yes);
                Ok(reply)
            }
            Err(error)
                if self.verbose_support() == VerboseSupport::Unknown
                    && verbose_may_be_refused(&error) =>
            {
                let error = self.scrub(error);
                tracing::info!(backend = %self.name, %error, "verbose_json refused: trying plain json");
                let plain = self
                    .attempt(client, utterance, timeout, false)
                    .await
                    .map_err(|error| self.scrub(error))?;
                tracing::warn!(
                    backend = %self.name,
                    "backend answers json but not verbose_json: its transcripts will have no word timings"
                );
                self.remember(VerboseSupport::No);
                Ok(plain)
            }
            Err(error) => Err(self.scrub(error)),
        }
    }

    /// Removes the backend's secrets from an error's text. A backend may echo
    /// the request target (Express's default 404 page does) and so the query.
    fn scrub(&self, error: BackendError) -> BackendError {
        let clean = |mut text: String| {
            for secret in &self.secrets {
                if text.contains(secret.as_str()) {
                    text = text.replace(secret.as_str(), REDACTED);
                }
            }
            text
        };
        match error {
            BackendError::Status { status, body } => BackendError::Status {
                status,
                body: clean(body),
            },
            BackendError::Transport(message) => BackendError::Transport(clean(message)),
            BackendError::BadReply(message) => BackendError::BadReply(clean(message)),
            other => other,
        }
    }

    async fn attempt(
        &self,
        client: &reqwest::Client,
        utterance: &UtteranceRequest<'_>,
        timeout: Duration,
        verbose: bool,
    ) -> Result<BackendReply, BackendError> {
        let wav = encode_wav(utterance.samples)?;
        let client = self.client.as_ref().unwrap_or(client);
        let mut request = client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .timeout(timeout);
        if let Some(key) = &self.api_key {
            request = request.bearer_auth(key);
        }
        request = match self.kind {
            BackendKind::Openai => {
                let file = reqwest::multipart::Part::bytes(wav)
                    .file_name(format!(
                        "{}-{}.wav",
                        utterance.session_id, utterance.utterance_id
                    ))
                    .mime_str("audio/wav")
                    .map_err(|e| BackendError::Transport(e.to_string()))?;
                let mut form = reqwest::multipart::Form::new()
                    .part("file", file)
                    .text("model", self.model.clone());
                form = if verbose {
                    form.text("response_format", "verbose_json")
                        .text("timestamp_granularities[]", "word")
                } else {
                    form.text("response_format", "json")
                };
                if !self.language.is_empty() {
                    form = form.text("language", self.language.clone());
                }
                if !self.prompt.is_empty() {
                    form = form.text("prompt", self.prompt.clone());
                }
                request.multipart(form)
            }
            BackendKind::Webhook | BackendKind::Streaming(_) => match self.body {
                WebhookBody::Wav => request
                    .header(reqwest::header::CONTENT_TYPE, "audio/wav")
                    .header("X-Cochlea-Session-Id", utterance.session_id)
                    .header("X-Cochlea-Utterance-Id", utterance.utterance_id)
                    .header("X-Cochlea-Channel", utterance.channel)
                    .header("X-Cochlea-Start", format!("{:.3}", utterance.start_seconds))
                    .header("X-Cochlea-End", format!("{:.3}", utterance.end_seconds))
                    .body(wav),
                WebhookBody::Json => {
                    let body = serde_json::json!({
                        "session_id": utterance.session_id,
                        "utterance_id": utterance.utterance_id,
                        "channel": utterance.channel,
                        "start": utterance.start_seconds,
                        "end": utterance.end_seconds,
                        "sample_rate": 16000,
                        "metadata": utterance.metadata,
                        "audio_base64": base64::engine::general_purpose::STANDARD.encode(&wav),
                    });
                    request
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .body(body.to_string())
                }
            },
        };
        let response = request.send().await.map_err(|e| classify(e, timeout))?;
        let status = response.status();
        let body = response.bytes().await.map_err(|e| classify(e, timeout))?;
        if !status.is_success() {
            return Err(BackendError::Status {
                status: status.as_u16(),
                body: excerpt(&body),
            });
        }
        let reply: Value = serde_json::from_slice(&body)
            .map_err(|e| BackendError::BadReply(format!("not JSON ({e}): {}", excerpt(&body))))?;
        let path: &[String] = match self.kind {
            BackendKind::Openai => &[],
            BackendKind::Webhook | BackendKind::Streaming(_) => &self.text_path,
        };
        let text = if path.is_empty() {
            reply.get("text")
        } else {
            path.iter().try_fold(&reply, |v, key| v.get(key))
        };
        match text {
            Some(Value::String(text)) => Ok(BackendReply {
                text: text.trim().to_owned(),
                words: if verbose {
                    let seconds = utterance.samples.len() as f64 / 16_000.0;
                    words::normalize(&reply, utterance.start_seconds, seconds)
                } else {
                    None
                },
            }),
            _ => Err(BackendError::BadReply(format!(
                "no string at '{}' in {}",
                if path.is_empty() {
                    "text".to_owned()
                } else {
                    path.join(".")
                },
                excerpt(&body)
            ))),
        }
    }
}

/// The settings every backend client shares. reqwest is built without a
/// crypto provider and takes the process default: ring, as for the server's
/// own TLS (installing it twice is refused harmlessly).
pub fn client_builder() -> reqwest::ClientBuilder {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("cochlea/", env!("CARGO_PKG_VERSION")))
}

fn classify(error: reqwest::Error, timeout: Duration) -> BackendError {
    // reqwest names the URL, query included, in its message.
    let error = error.without_url();
    if error.is_timeout() {
        BackendError::Timeout(timeout.as_millis() as u64)
    } else {
        // The chain carries the useful part (connection refused, TLS...).
        let mut message = error.to_string();
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            message.push_str(": ");
            message.push_str(&cause.to_string());
            source = cause.source();
        }
        BackendError::Transport(message)
    }
}

/// At most 200 characters of a reply, for error messages.
fn excerpt(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let mut cut: String = text.chars().take(200).collect();
    if text.chars().count() > 200 {
        cut.push('…');
    }
    cut
}

/// A 16 kHz mono 16-bit WAV file in memory.
pub fn encode_wav(samples: &[i16]) -> Result<Vec<u8>, hound::Error> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: 16_000,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut bytes = Vec::with_capacity(44 + samples.len() * 2);
    {
        let mut writer = hound::WavWriter::new(Cursor::new(&mut bytes), spec)?;
        let mut fast = writer.get_i16_writer(samples.len() as u32);
        for &s in samples {
            fast.write_sample(s);
        }
        fast.flush()?;
        writer.finalize()?;
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_from_base_urls() {
        for (given, expected) in [
            (
                "http://127.0.0.1:8000",
                "http://127.0.0.1:8000/v1/audio/transcriptions",
            ),
            (
                "http://127.0.0.1:8000/v1/",
                "http://127.0.0.1:8000/v1/audio/transcriptions",
            ),
            (
                "https://api.example/v1/audio/transcriptions",
                "https://api.example/v1/audio/transcriptions",
            ),
            (
                "http://h/inference",
                "http://h/inference/v1/audio/transcriptions",
            ),
        ] {
            let url = Url::parse(given).unwrap();
            assert_eq!(openai_endpoint(url).as_str(), expected);
        }
    }

    /// Issue 15 item 8: the query (a key, Azure's `api-version`) stays the
    /// query; the path goes before it.
    #[test]
    fn endpoints_keep_the_query_of_the_url() {
        for (given, expected) in [
            (
                "http://h/v1/audio/transcriptions?api_key=SECRET",
                "http://h/v1/audio/transcriptions?api_key=SECRET",
            ),
            (
                "https://r.openai.azure.com/openai/deployments/w/audio/transcriptions?api-version=2024-06-01",
                "https://r.openai.azure.com/openai/deployments/w/audio/transcriptions?api-version=2024-06-01",
            ),
            (
                "http://h/v1?api-version=2024-06-01",
                "http://h/v1/audio/transcriptions?api-version=2024-06-01",
            ),
            (
                "http://h:8000/?api-version=1&x=%2F",
                "http://h:8000/v1/audio/transcriptions?api-version=1&x=%2F",
            ),
            (
                "http://user:pw@h/base/?q=1",
                "http://user:pw@h/base/v1/audio/transcriptions?q=1",
            ),
        ] {
            let url = Url::parse(given).unwrap();
            assert_eq!(openai_endpoint(url).as_str(), expected);
        }
    }

    #[test]
    fn urls_are_shown_without_credentials_or_query() {
        for (given, shown) in [
            (
                "http://user:pa55word@h:8000/v1/audio/transcriptions?api_key=SECRET#x",
                "http://h:8000/v1/audio/transcriptions?[redacted]",
            ),
            ("https://token@h/hook", "https://h/hook"),
            ("http://[::1]:9/a?", "http://[::1]:9/a?[redacted]"),
            ("http://h/plain", "http://h/plain"),
        ] {
            assert_eq!(redacted_url(&Url::parse(given).unwrap()), shown);
        }
        let config = BackendConfig {
            url: "http://user:pa55word@h/v1?api-version=2024-06-01&api_key=SECRET".into(),
            api_key: "bearer-key-1234".into(),
            ..BackendConfig::default()
        };
        let backend = Backend::new("stt", &config).unwrap();
        assert_eq!(backend.url(), "http://h/v1/audio/transcriptions?[redacted]");
        let debug = format!("{backend:?}");
        for secret in ["pa55word", "SECRET", "bearer-key-1234"] {
            assert!(!debug.contains(secret), "{debug}");
        }
    }

    #[test]
    fn errors_are_scrubbed_of_the_backend_s_secrets() {
        let mut headers = BTreeMap::new();
        headers.insert("api-key".to_owned(), "azure-header-key".to_owned());
        headers.insert("x-short".to_owned(), "1".to_owned());
        let config = BackendConfig {
            url: "http://tok3n-user:pa55word-x@h/v1/audio/transcriptions?api-version=2024-06-01&sig=a%2Fb%2Bsignature".into(),
            api_key: "bearer-key-1234".into(),
            headers,
            ..BackendConfig::default()
        };
        let backend = Backend::new("stt", &config).unwrap();
        let echo =
            "Cannot POST /v1/audio/transcriptions?api-version=2024-06-01&sig=a%2Fb%2Bsignature";
        let BackendError::Status { status, body } = backend.scrub(BackendError::Status {
            status: 404,
            body: echo.into(),
        }) else {
            panic!("still a status error");
        };
        assert_eq!(status, 404);
        assert_eq!(body, "Cannot POST /v1/audio/transcriptions?[redacted]");
        // Each value alone, raw or decoded, and every other kind of secret.
        let reply = "bad sig a/b+signature (raw a%2Fb%2Bsignature) for tok3n-user:pa55word-x \
                     with bearer-key-1234 and azure-header-key, version 2024-06-01, 1 try";
        let scrubbed = backend
            .scrub(BackendError::BadReply(reply.into()))
            .to_string();
        assert_eq!(
            scrubbed,
            "unusable reply: bad sig [redacted] (raw [redacted]) for [redacted]:[redacted] \
             with [redacted] and [redacted], version [redacted], 1 try"
        );
        let transport = backend
            .scrub(BackendError::Transport("refused: pa55word-x".into()))
            .to_string();
        assert_eq!(transport, "request failed: refused: [redacted]");
    }

    #[test]
    fn a_url_that_does_not_parse_is_not_repeated_in_the_error() {
        let config = BackendConfig {
            url: "http://h:99999/v1?api_key=SECRET".into(),
            ..BackendConfig::default()
        };
        let err = Backend::new("stt", &config).unwrap_err().to_string();
        assert!(err.contains("'stt'") && err.contains("not a URL"), "{err}");
        assert!(!err.contains("SECRET"), "{err}");
    }

    #[test]
    fn wav_round_trips() {
        let samples: Vec<i16> = (0..1000).map(|i| (i * 37 % 65536 - 32768) as i16).collect();
        let bytes = encode_wav(&samples).unwrap();
        let mut reader = hound::WavReader::new(Cursor::new(bytes)).unwrap();
        assert_eq!(reader.spec().sample_rate, 16_000);
        let back: Vec<i16> = reader.samples::<i16>().map(Result::unwrap).collect();
        assert_eq!(back, samples);
    }

    #[test]
    fn config_errors_name_the_backend() {
        let config = BackendConfig {
            url: "ftp://x".into(),
            ..BackendConfig::default()
        };
        let err = Backend::new("stt", &config).unwrap_err().to_string();
        assert!(err.contains("'stt'") && err.contains("ftp"), "{err}");
        let config = BackendConfig {
            api_key_env: "COCHLEA_TEST_UNSET_KEY_VARIABLE".into(),
            url: "http://127.0.0.1:1".into(),
            ..BackendConfig::default()
        };
        let err = Backend::new("stt", &config).unwrap_err().to_string();
        assert!(err.contains("COCHLEA_TEST_UNSET_KEY_VARIABLE"), "{err}");
    }

    #[test]
    fn verbose_json_falls_back_only_on_what_may_be_the_format_s_fault() {
        let status = |status| BackendError::Status {
            status,
            body: "unknown response_format".into(),
        };
        for refused in [400, 415, 422, 500] {
            assert!(verbose_may_be_refused(&status(refused)), "{refused}");
        }
        assert!(verbose_may_be_refused(&BackendError::BadReply(
            "no string at 'text'".into()
        )));
        for other in [401, 403, 404, 408, 429, 502, 503, 504] {
            assert!(!verbose_may_be_refused(&status(other)), "{other}");
        }
        assert!(!verbose_may_be_refused(&BackendError::Timeout(5)));
        assert!(!verbose_may_be_refused(&BackendError::Transport(
            "refused".into()
        )));
    }

    /// The fallback against a real local HTTP server: the first request asks
    /// for verbose_json and is refused, the same utterance is sent again
    /// with json at once, and the backend then asks for json only.
    #[tokio::test]
    async fn a_backend_that_refuses_verbose_json_is_asked_for_json_from_then_on() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let formats = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
        let seen = formats.clone();
        let server = tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                // One request per connection (Connection: close).
                let mut request = Vec::new();
                let mut buffer = [0u8; 65536];
                let body_len = loop {
                    let n = socket.read(&mut buffer).await.unwrap();
                    request.extend_from_slice(&buffer[..n]);
                    let text = String::from_utf8_lossy(&request).to_string();
                    if let Some(head_end) = text.find("\r\n\r\n") {
                        let length: usize = text[..head_end]
                            .lines()
                            .find_map(|l| {
                                l.to_ascii_lowercase()
                                    .strip_prefix("content-length:")
                                    .map(|v| v.trim().parse().unwrap())
                            })
                            .unwrap();
                        if request.len() >= head_end + 4 + length {
                            break length;
                        }
                    }
                };
                let text = String::from_utf8_lossy(&request).to_string();
                let verbose = text.contains("verbose_json");
                assert!(body_len > 0);
                seen.lock()
                    .unwrap()
                    .push(if verbose { "verbose_json" } else { "json" }.into());
                let (status, body) = if verbose {
                    (
                        "400 Bad Request",
                        r#"{"error":{"message":"unsupported response_format"}}"#,
                    )
                } else {
                    ("200 OK", r#"{"text":"plain words"}"#)
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
                    body.len()
                );
                socket.write_all(response.as_bytes()).await.unwrap();
            }
        });
        let backend = Backend::new(
            "plain",
            &BackendConfig {
                url: format!("http://127.0.0.1:{port}"),
                ..BackendConfig::default()
            },
        )
        .unwrap();
        let client = client_builder().build().unwrap();
        let metadata = Map::new();
        let samples = vec![0i16; 1600];
        let utterance = UtteranceRequest {
            session_id: "s",
            utterance_id: 0,
            channel: 0,
            start_seconds: 1.0,
            end_seconds: 1.1,
            samples: &samples,
            metadata: &metadata,
        };
        let timeout = Duration::from_secs(5);
        assert_eq!(backend.verbose_support(), VerboseSupport::Unknown);
        let reply = backend
            .transcribe(&client, &utterance, timeout, true)
            .await
            .unwrap();
        assert_eq!(
            reply,
            BackendReply {
                text: "plain words".into(),
                words: None
            }
        );
        assert_eq!(backend.verbose_support(), VerboseSupport::No);
        backend
            .transcribe(&client, &utterance, timeout, true)
            .await
            .unwrap();
        assert_eq!(*formats.lock().unwrap(), ["verbose_json", "json", "json"]);
        server.abort();
    }

    #[test]
    fn retry_only_what_may_recover() {
        assert!(BackendError::Timeout(1).is_retryable());
        assert!(BackendError::Status {
            status: 503,
            body: String::new()
        }
        .is_retryable());
        assert!(!BackendError::Status {
            status: 400,
            body: String::new()
        }
        .is_retryable());
        assert!(!BackendError::BadReply(String::new()).is_retryable());
    }
}
