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
use std::time::Duration;

use base64::Engine;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// How a backend is reached, as configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BackendKind {
    #[default]
    Openai,
    Webhook,
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

/// A configured backend, ready to send requests.
#[derive(Debug)]
pub struct Backend {
    pub name: String,
    kind: BackendKind,
    url: reqwest::Url,
    api_key: Option<String>,
    model: String,
    language: String,
    prompt: String,
    body: WebhookBody,
    text_path: Vec<String>,
    headers: reqwest::header::HeaderMap,
    /// Its own HTTP client when it trusts extra CAs; else the shared one.
    client: Option<reqwest::Client>,
}

/// `openai` URLs: a full `.../audio/transcriptions` endpoint is used as is;
/// a base ending in `/v1` gets `/audio/transcriptions`; anything else gets
/// `/v1/audio/transcriptions`. So the base URL an OpenAI SDK takes, the bare
/// server address, and the endpoint all work.
pub fn openai_endpoint(url: &str) -> String {
    let trimmed = url.trim_end_matches('/');
    if trimmed.ends_with("/audio/transcriptions") {
        trimmed.to_owned()
    } else if trimmed.ends_with("/v1") {
        format!("{trimmed}/audio/transcriptions")
    } else {
        format!("{trimmed}/v1/audio/transcriptions")
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
        let url_text = match config.kind {
            BackendKind::Openai => openai_endpoint(&config.url),
            BackendKind::Webhook => config.url.clone(),
        };
        let url = reqwest::Url::parse(&url_text)
            .map_err(|e| fail(format!("url '{url_text}' is not a URL: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(fail(format!(
                "url must be http:// or https://, not {}",
                url.scheme()
            )));
        }
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
            url,
            api_key,
            model: config.model.clone(),
            language: config.language.clone(),
            prompt: config.prompt.clone(),
            body: config.body,
            text_path,
            headers,
            client,
        })
    }

    /// Where requests go (for logs; no credentials in it).
    pub fn url(&self) -> &str {
        self.url.as_str()
    }

    /// One attempt: sends the utterance, returns its text.
    pub async fn transcribe(
        &self,
        client: &reqwest::Client,
        utterance: &UtteranceRequest<'_>,
        timeout: Duration,
    ) -> Result<String, BackendError> {
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
                    .text("model", self.model.clone())
                    .text("response_format", "json");
                if !self.language.is_empty() {
                    form = form.text("language", self.language.clone());
                }
                if !self.prompt.is_empty() {
                    form = form.text("prompt", self.prompt.clone());
                }
                request.multipart(form)
            }
            BackendKind::Webhook => match self.body {
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
            BackendKind::Webhook => &self.text_path,
        };
        let text = if path.is_empty() {
            reply.get("text")
        } else {
            path.iter().try_fold(&reply, |v, key| v.get(key))
        };
        match text {
            Some(Value::String(text)) => Ok(text.trim().to_owned()),
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
            assert_eq!(openai_endpoint(given), expected);
        }
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
