//! Configuration, in layers: defaults < TOML file (`--config`) < environment
//! (`COCHLEA_*`) < command-line flags.
//!
//! The file is deserialized with unknown keys denied, so a typo is an error
//! that names the key. Environment and flags are one clap layer: every flag
//! has an environment variable, and clap lets the flag win. Units are in the
//! names (`_ms`, `_bytes`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::protocol::{MAX_SAMPLE_RATE, MIN_SAMPLE_RATE};
use crate::sinks::recorder::{ChannelsSetting, RecorderSettings, SampleFormatSetting};
use crate::sinks::transcriber::backend::BackendKind;
use crate::sinks::transcriber::{TranscriptionConfig, DEFAULT_BACKEND};
use crate::sinks::SINK_NAMES;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The effective configuration of `cochlea serve`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address and port to listen on.
    pub listen: SocketAddr,
    /// Directory for WAV recordings and their JSON sidecars.
    pub recordings_dir: PathBuf,
    /// HTTP worker threads; 0 means one per CPU core.
    pub workers: usize,
    /// Concurrent sessions before new ones are refused with close code 1013.
    pub max_sessions: usize,
    /// Largest WebSocket message accepted (after continuation frames are joined).
    pub max_message_bytes: usize,
    /// A session with neither audio nor keepalive for this long is closed.
    pub idle_timeout_ms: u64,
    /// Close code for an idle session: 1000 (normal) or 1001 (going away).
    pub idle_close_code: u16,
    /// On SIGINT/SIGTERM, how long sessions get to finish their sinks.
    pub shutdown_timeout_ms: u64,
    /// Largest timestamp gap one `framing=seq` message may open (filled with silence).
    pub max_gap_ms: u64,
    /// Blocks queued per sink before the session waits for it.
    pub sink_queue_blocks: usize,
    /// How long a dropped `framing=seq` session waits to be resumed; 0 disables resume.
    pub resume_window_ms: u64,
    /// `framing=seq`: longest time between acks while there is something to ack.
    pub ack_interval_ms: u64,
    /// Period of `stats` messages while audio flows; 0 disables them.
    pub stats_interval_ms: u64,
    /// Sinks for sessions that do not name any.
    pub default_sinks: Vec<String>,
    pub log_format: LogFormat,
    /// API keys; while empty, authentication is off.
    pub api_keys: Vec<String>,
    /// Secret for signing session tokens; empty: a random one per process.
    pub token_secret: String,
    /// Browser origins allowed to connect (e.g. `https://app.example`); empty: any.
    pub allowed_origins: Vec<String>,
    /// Listen beyond loopback without API keys (refused unless set).
    pub allow_unauthenticated: bool,
    /// Concurrent sessions per API key (1013 beyond); 0: no per-key limit.
    pub max_sessions_per_key: usize,
    /// Longest a session may last, in wall time; 0: unlimited.
    pub max_session_duration_ms: u64,
    /// Media time a client may send per wall second beyond the burst; 0: unlimited.
    pub max_realtime_factor: f64,
    /// Media a client may send ahead of the real-time allowance.
    pub realtime_burst_ms: u64,
    /// Audio bytes queued for one sink before the session waits for it.
    pub max_pending_bytes_per_sink: usize,
    /// How long a session waits for a sink over its pending limit before
    /// giving up with `sink_overloaded`.
    pub sink_stall_timeout_ms: u64,
    /// Time a client has to send its whole HTTP request (upgrade included);
    /// slower ones get 408 and are disconnected.
    pub request_timeout_ms: u64,
    /// PEM certificate chain and private key: serve `wss://` directly.
    pub tls_cert_path: Option<PathBuf>,
    pub tls_key_path: Option<PathBuf>,
    pub recorder: RecorderConfig,
    pub transcription: TranscriptionConfig,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecorderConfig {
    /// Longest time written audio may stay outside the WAV header.
    pub flush_interval_ms: u64,
    /// Also fsync at each header update (power-loss safety; costs disk syncs).
    pub fsync: bool,
    /// `auto` (f32 for pcm_f32le, else s16), `s16` or `f32`.
    pub sample_format: SampleFormatSetting,
    /// Rate of the recordings in Hz; 0 keeps the stream's.
    pub sample_rate: u32,
    /// `keep`, `mono`, or `split` (one mono file per channel).
    pub channels: ChannelsSetting,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            recordings_dir: PathBuf::from("./recordings"),
            workers: 0,
            max_sessions: 5000,
            max_message_bytes: 64 * 1024,
            idle_timeout_ms: 30_000,
            idle_close_code: 1000,
            shutdown_timeout_ms: 10_000,
            max_gap_ms: 10_000,
            sink_queue_blocks: 64,
            resume_window_ms: 30_000,
            ack_interval_ms: 250,
            stats_interval_ms: 5_000,
            default_sinks: vec!["record".into()],
            log_format: LogFormat::Text,
            api_keys: Vec::new(),
            token_secret: String::new(),
            allowed_origins: Vec::new(),
            allow_unauthenticated: false,
            max_sessions_per_key: 0,
            max_session_duration_ms: 0,
            max_realtime_factor: 0.0,
            realtime_burst_ms: 10_000,
            max_pending_bytes_per_sink: 4 * 1024 * 1024,
            sink_stall_timeout_ms: 10_000,
            request_timeout_ms: 5_000,
            tls_cert_path: None,
            tls_key_path: None,
            recorder: RecorderConfig::default(),
            transcription: TranscriptionConfig::default(),
        }
    }
}

impl Default for RecorderConfig {
    fn default() -> Self {
        Self {
            flush_interval_ms: 1000,
            fsync: false,
            sample_format: SampleFormatSetting::Auto,
            sample_rate: 0,
            channels: ChannelsSetting::Keep,
        }
    }
}

/// Flags of `cochlea serve`; each one can also come from its environment variable.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML configuration file.
    #[arg(long, env = "COCHLEA_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    #[arg(long, env = "COCHLEA_LISTEN", value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    #[arg(long, env = "COCHLEA_RECORDINGS_DIR", value_name = "DIR")]
    pub recordings_dir: Option<PathBuf>,
    #[arg(long, env = "COCHLEA_WORKERS", value_name = "N")]
    pub workers: Option<usize>,
    #[arg(long, env = "COCHLEA_MAX_SESSIONS", value_name = "N")]
    pub max_sessions: Option<usize>,
    #[arg(long, env = "COCHLEA_MAX_MESSAGE_BYTES", value_name = "BYTES")]
    pub max_message_bytes: Option<usize>,
    #[arg(long, env = "COCHLEA_IDLE_TIMEOUT_MS", value_name = "MS")]
    pub idle_timeout_ms: Option<u64>,
    #[arg(long, env = "COCHLEA_IDLE_CLOSE_CODE", value_name = "1000|1001")]
    pub idle_close_code: Option<u16>,
    #[arg(long, env = "COCHLEA_SHUTDOWN_TIMEOUT_MS", value_name = "MS")]
    pub shutdown_timeout_ms: Option<u64>,
    #[arg(long, env = "COCHLEA_MAX_GAP_MS", value_name = "MS")]
    pub max_gap_ms: Option<u64>,
    #[arg(long, env = "COCHLEA_SINK_QUEUE_BLOCKS", value_name = "N")]
    pub sink_queue_blocks: Option<usize>,
    #[arg(long, env = "COCHLEA_RESUME_WINDOW_MS", value_name = "MS")]
    pub resume_window_ms: Option<u64>,
    #[arg(long, env = "COCHLEA_ACK_INTERVAL_MS", value_name = "MS")]
    pub ack_interval_ms: Option<u64>,
    #[arg(long, env = "COCHLEA_STATS_INTERVAL_MS", value_name = "MS")]
    pub stats_interval_ms: Option<u64>,
    /// Comma-separated; empty for none.
    #[arg(
        long,
        env = "COCHLEA_DEFAULT_SINKS",
        value_name = "LIST",
        value_delimiter = ','
    )]
    pub default_sinks: Option<Vec<String>>,
    #[arg(long, env = "COCHLEA_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// An API key; repeat the flag for several (env: comma-separated).
    #[arg(
        long = "api-key",
        env = "COCHLEA_API_KEYS",
        value_name = "KEY",
        value_delimiter = ','
    )]
    pub api_keys: Option<Vec<String>>,
    #[arg(
        long,
        env = "COCHLEA_TOKEN_SECRET",
        value_name = "SECRET",
        hide_env_values = true
    )]
    pub token_secret: Option<String>,
    /// Comma-separated.
    #[arg(
        long,
        env = "COCHLEA_ALLOWED_ORIGINS",
        value_name = "LIST",
        value_delimiter = ','
    )]
    pub allowed_origins: Option<Vec<String>>,
    #[arg(long, env = "COCHLEA_ALLOW_UNAUTHENTICATED", value_name = "BOOL")]
    pub allow_unauthenticated: Option<bool>,
    #[arg(long, env = "COCHLEA_MAX_SESSIONS_PER_KEY", value_name = "N")]
    pub max_sessions_per_key: Option<usize>,
    #[arg(long, env = "COCHLEA_MAX_SESSION_DURATION_MS", value_name = "MS")]
    pub max_session_duration_ms: Option<u64>,
    #[arg(long, env = "COCHLEA_MAX_REALTIME_FACTOR", value_name = "FACTOR")]
    pub max_realtime_factor: Option<f64>,
    #[arg(long, env = "COCHLEA_REALTIME_BURST_MS", value_name = "MS")]
    pub realtime_burst_ms: Option<u64>,
    #[arg(long, env = "COCHLEA_MAX_PENDING_BYTES_PER_SINK", value_name = "BYTES")]
    pub max_pending_bytes_per_sink: Option<usize>,
    #[arg(long, env = "COCHLEA_SINK_STALL_TIMEOUT_MS", value_name = "MS")]
    pub sink_stall_timeout_ms: Option<u64>,
    #[arg(long, env = "COCHLEA_REQUEST_TIMEOUT_MS", value_name = "MS")]
    pub request_timeout_ms: Option<u64>,
    #[arg(long, env = "COCHLEA_TLS_CERT_PATH", value_name = "PEM")]
    pub tls_cert_path: Option<PathBuf>,
    #[arg(long, env = "COCHLEA_TLS_KEY_PATH", value_name = "PEM")]
    pub tls_key_path: Option<PathBuf>,
    #[arg(long, env = "COCHLEA_RECORDER_FLUSH_INTERVAL_MS", value_name = "MS")]
    pub recorder_flush_interval_ms: Option<u64>,
    #[arg(long, env = "COCHLEA_RECORDER_FSYNC", value_name = "BOOL")]
    pub recorder_fsync: Option<bool>,
    #[arg(long, env = "COCHLEA_RECORDER_SAMPLE_FORMAT", value_enum)]
    pub recorder_sample_format: Option<SampleFormatSetting>,
    #[arg(long, env = "COCHLEA_RECORDER_SAMPLE_RATE", value_name = "HZ")]
    pub recorder_sample_rate: Option<u32>,
    #[arg(long, env = "COCHLEA_RECORDER_CHANNELS", value_enum)]
    pub recorder_channels: Option<ChannelsSetting>,
    /// Quick start: an OpenAI-compatible speech-to-text endpoint (or its
    /// base URL) becomes the backend named `default`, used by every session
    /// that does not say `transcribe=none`.
    #[arg(long, env = "COCHLEA_TRANSCRIBE_URL", value_name = "URL")]
    pub transcribe_url: Option<String>,
    /// `model` field for the `default` backend.
    #[arg(long, env = "COCHLEA_TRANSCRIBE_MODEL", value_name = "NAME")]
    pub transcribe_model: Option<String>,
    /// Bearer key for the `default` backend.
    #[arg(
        long,
        env = "COCHLEA_TRANSCRIBE_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    pub transcribe_api_key: Option<String>,
    /// `language` field for the `default` backend (ISO-639-1).
    #[arg(long, env = "COCHLEA_TRANSCRIBE_LANGUAGE", value_name = "CODE")]
    pub transcribe_language: Option<String>,
    #[arg(
        long,
        env = "COCHLEA_TRANSCRIBE_MAX_CONCURRENT_REQUESTS",
        value_name = "N"
    )]
    pub transcribe_max_concurrent_requests: Option<usize>,
    #[arg(
        long,
        env = "COCHLEA_TRANSCRIBE_MAX_CONCURRENT_REQUESTS_PER_SESSION",
        value_name = "N"
    )]
    pub transcribe_max_concurrent_requests_per_session: Option<usize>,
    #[arg(
        long,
        env = "COCHLEA_TRANSCRIBE_MAX_PENDING_UTTERANCES",
        value_name = "N"
    )]
    pub transcribe_max_pending_utterances: Option<usize>,
    #[arg(long, env = "COCHLEA_TRANSCRIBE_REQUEST_TIMEOUT_MS", value_name = "MS")]
    pub transcribe_request_timeout_ms: Option<u64>,
    #[arg(long, env = "COCHLEA_TRANSCRIBE_MAX_RETRIES", value_name = "N")]
    pub transcribe_max_retries: Option<u32>,
    #[arg(long, env = "COCHLEA_TRANSCRIBE_RETRY_BACKOFF_MS", value_name = "MS")]
    pub transcribe_retry_backoff_ms: Option<u64>,
    #[arg(long, env = "COCHLEA_TRANSCRIBE_STOP_WAIT_MS", value_name = "MS")]
    pub transcribe_stop_wait_ms: Option<u64>,
    #[arg(long, env = "COCHLEA_VAD_THRESHOLD", value_name = "0..1")]
    pub vad_threshold: Option<f32>,
    #[arg(long, env = "COCHLEA_VAD_PRE_ROLL_MS", value_name = "MS")]
    pub vad_pre_roll_ms: Option<u64>,
    #[arg(long, env = "COCHLEA_VAD_HANGOVER_MS", value_name = "MS")]
    pub vad_hangover_ms: Option<u64>,
    #[arg(long, env = "COCHLEA_VAD_MIN_SPEECH_MS", value_name = "MS")]
    pub vad_min_speech_ms: Option<u64>,
    #[arg(long, env = "COCHLEA_VAD_MAX_UTTERANCE_MS", value_name = "MS")]
    pub vad_max_utterance_ms: Option<u64>,
}

impl Config {
    /// Parses a TOML document; unknown keys are errors that name the key.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string(),
        })
    }

    /// Builds the effective configuration from all layers and validates it.
    pub fn load(args: &ServeArgs) -> Result<Self, ConfigError> {
        let mut config = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Self::from_toml(&text, path)?
            }
            None => Config::default(),
        };
        config.apply(args);
        config.validate()?;
        Ok(config)
    }

    /// Overlays the environment-and-flags layer.
    fn apply(&mut self, args: &ServeArgs) {
        fn set<T: Clone>(target: &mut T, value: &Option<T>) {
            if let Some(v) = value {
                *target = v.clone();
            }
        }
        set(&mut self.listen, &args.listen);
        set(&mut self.recordings_dir, &args.recordings_dir);
        set(&mut self.workers, &args.workers);
        set(&mut self.max_sessions, &args.max_sessions);
        set(&mut self.max_message_bytes, &args.max_message_bytes);
        set(&mut self.idle_timeout_ms, &args.idle_timeout_ms);
        set(&mut self.idle_close_code, &args.idle_close_code);
        set(&mut self.shutdown_timeout_ms, &args.shutdown_timeout_ms);
        set(&mut self.max_gap_ms, &args.max_gap_ms);
        set(&mut self.sink_queue_blocks, &args.sink_queue_blocks);
        set(&mut self.resume_window_ms, &args.resume_window_ms);
        set(&mut self.ack_interval_ms, &args.ack_interval_ms);
        set(&mut self.stats_interval_ms, &args.stats_interval_ms);
        set(&mut self.log_format, &args.log_format);
        set(&mut self.token_secret, &args.token_secret);
        set(&mut self.allow_unauthenticated, &args.allow_unauthenticated);
        set(&mut self.max_sessions_per_key, &args.max_sessions_per_key);
        set(
            &mut self.max_session_duration_ms,
            &args.max_session_duration_ms,
        );
        set(&mut self.max_realtime_factor, &args.max_realtime_factor);
        set(&mut self.realtime_burst_ms, &args.realtime_burst_ms);
        set(
            &mut self.max_pending_bytes_per_sink,
            &args.max_pending_bytes_per_sink,
        );
        set(&mut self.sink_stall_timeout_ms, &args.sink_stall_timeout_ms);
        set(&mut self.request_timeout_ms, &args.request_timeout_ms);
        if args.tls_cert_path.is_some() {
            self.tls_cert_path = args.tls_cert_path.clone();
        }
        if args.tls_key_path.is_some() {
            self.tls_key_path = args.tls_key_path.clone();
        }
        let list = |items: &Vec<String>| -> Vec<String> {
            items
                .iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        };
        if let Some(keys) = &args.api_keys {
            self.api_keys = list(keys);
        }
        if let Some(origins) = &args.allowed_origins {
            self.allowed_origins = list(origins);
        }
        set(
            &mut self.recorder.flush_interval_ms,
            &args.recorder_flush_interval_ms,
        );
        set(&mut self.recorder.fsync, &args.recorder_fsync);
        set(
            &mut self.recorder.sample_format,
            &args.recorder_sample_format,
        );
        set(&mut self.recorder.sample_rate, &args.recorder_sample_rate);
        set(&mut self.recorder.channels, &args.recorder_channels);
        let t = &mut self.transcription;
        set(
            &mut t.max_concurrent_requests,
            &args.transcribe_max_concurrent_requests,
        );
        set(
            &mut t.max_concurrent_requests_per_session,
            &args.transcribe_max_concurrent_requests_per_session,
        );
        set(
            &mut t.max_pending_utterances,
            &args.transcribe_max_pending_utterances,
        );
        set(
            &mut t.request_timeout_ms,
            &args.transcribe_request_timeout_ms,
        );
        set(&mut t.max_retries, &args.transcribe_max_retries);
        set(&mut t.retry_backoff_ms, &args.transcribe_retry_backoff_ms);
        set(&mut t.stop_wait_ms, &args.transcribe_stop_wait_ms);
        set(&mut t.vad.threshold, &args.vad_threshold);
        set(&mut t.vad.pre_roll_ms, &args.vad_pre_roll_ms);
        set(&mut t.vad.hangover_ms, &args.vad_hangover_ms);
        set(&mut t.vad.min_speech_ms, &args.vad_min_speech_ms);
        set(&mut t.vad.max_utterance_ms, &args.vad_max_utterance_ms);
        if let Some(url) = &args.transcribe_url {
            // The quick-start flag defines (or repoints) the `default`
            // backend; a file may have given it more settings.
            let backend = t.backends.entry(DEFAULT_BACKEND.to_owned()).or_default();
            backend.kind = BackendKind::Openai;
            backend.url = url.clone();
        }
        if let Some(backend) = t.backends.get_mut(DEFAULT_BACKEND) {
            set(&mut backend.model, &args.transcribe_model);
            set(&mut backend.api_key, &args.transcribe_api_key);
            set(&mut backend.language, &args.transcribe_language);
        }
        if let Some(sinks) = &args.default_sinks {
            self.default_sinks = sinks
                .iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty() && s != "none")
                .collect();
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.api_keys.is_empty()
            && !self.listen.ip().is_loopback()
            && !self.allow_unauthenticated
        {
            return invalid(format!(
                "refusing to listen on {} without API keys: set api_keys (COCHLEA_API_KEYS) or allow_unauthenticated = true",
                self.listen
            ));
        }
        if let Some(short) = self.api_keys.iter().find(|k| k.len() < 16) {
            return invalid(format!(
                "API keys must be at least 16 characters; one has {}",
                short.len()
            ));
        }
        if self.tls_cert_path.is_some() != self.tls_key_path.is_some() {
            return invalid("tls_cert_path and tls_key_path go together".into());
        }
        if !(self.max_realtime_factor >= 0.0 && self.max_realtime_factor.is_finite()) {
            return invalid(format!(
                "max_realtime_factor must be 0 (off) or positive, not {}",
                self.max_realtime_factor
            ));
        }
        if self.max_pending_bytes_per_sink < 64 * 1024 {
            return invalid(format!(
                "max_pending_bytes_per_sink must be at least 65536, not {}",
                self.max_pending_bytes_per_sink
            ));
        }
        if !matches!(self.idle_close_code, 1000 | 1001) {
            return invalid(format!(
                "idle_close_code must be 1000 or 1001, not {}",
                self.idle_close_code
            ));
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.max_message_bytes) {
            return invalid(format!(
                "max_message_bytes must be from 1024 to 16777216, not {}",
                self.max_message_bytes
            ));
        }
        if self.max_sessions == 0 {
            return invalid("max_sessions must be at least 1".into());
        }
        if !(10..=500).contains(&self.ack_interval_ms) {
            return invalid(format!(
                "ack_interval_ms must be from 10 to 500 (clients rely on an ack at least every 500 ms), not {}",
                self.ack_interval_ms
            ));
        }
        if self.idle_timeout_ms == 0 {
            return invalid("idle_timeout_ms must be at least 1".into());
        }
        if !(10..=60_000).contains(&self.recorder.flush_interval_ms) {
            return invalid(format!(
                "recorder.flush_interval_ms must be from 10 to 60000, not {}",
                self.recorder.flush_interval_ms
            ));
        }
        let rate = self.recorder.sample_rate;
        if rate != 0 && !(MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&rate) {
            return invalid(format!(
                "recorder.sample_rate must be 0 (the stream's) or from {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE}, not {rate}"
            ));
        }
        self.transcription
            .validate()
            .map_err(ConfigError::Invalid)?;
        if let Some(unknown) = self
            .default_sinks
            .iter()
            .find(|s| !SINK_NAMES.contains(&s.as_str()))
        {
            return invalid(format!(
                "default_sinks names unknown sink '{unknown}'; available: {}",
                SINK_NAMES.join(", ")
            ));
        }
        Ok(())
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot render configuration: {e}\n"))
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_millis(self.idle_timeout_ms)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_millis(self.shutdown_timeout_ms)
    }

    pub fn recorder_settings(&self) -> RecorderSettings {
        RecorderSettings {
            dir: self.recordings_dir.clone(),
            flush_interval: Duration::from_millis(self.recorder.flush_interval_ms),
            fsync: self.recorder.fsync,
            sample_format: self.recorder.sample_format,
            sample_rate: (self.recorder.sample_rate != 0).then_some(self.recorder.sample_rate),
            channels: self.recorder.channels,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml("lsten = \"0.0.0.0:1\"\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("lsten"), "{err}");
        let err = Config::from_toml("[recorder]\nflush_ms = 5\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("flush_ms"), "{err}");
    }

    #[test]
    fn file_then_flags() {
        let mut config = Config::from_toml(
            "listen = \"127.0.0.1:9000\"\nmax_sessions = 3\n[recorder]\nfsync = true\n",
            Path::new("c.toml"),
        )
        .unwrap();
        assert_eq!(config.listen.port(), 9000);
        assert!(config.recorder.fsync);
        assert_eq!(
            config.idle_timeout_ms, 30_000,
            "untouched keys keep defaults"
        );
        config.apply(&ServeArgs {
            max_sessions: Some(7),
            default_sinks: Some(vec!["none".into()]),
            ..ServeArgs::default()
        });
        assert_eq!(config.max_sessions, 7);
        assert_eq!(config.listen.port(), 9000);
        assert!(config.default_sinks.is_empty());
        config.validate().unwrap();
    }

    #[test]
    fn validation_rejects_bad_values() {
        let config = Config {
            idle_close_code: 1011,
            ..Config::default()
        };
        assert!(config.validate().is_err());
        let config = Config {
            default_sinks: vec!["tape".into()],
            ..Config::default()
        };
        assert!(config.validate().unwrap_err().to_string().contains("tape"));
    }

    #[test]
    fn printed_config_parses_back() {
        let text = Config::default().to_toml();
        let back = Config::from_toml(&text, Path::new("printed.toml")).unwrap();
        assert_eq!(back.listen, Config::default().listen);
    }
}
