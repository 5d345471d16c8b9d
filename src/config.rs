//! Configuration, in layers: defaults < TOML file (`--config`) < environment
//! (`COCHLEA_*`) < command-line flags.
//!
//! Each key is declared once, as a field of [`Config`] or of a section
//! struct ([`RecorderConfig`], [`TranscriptionConfig`] and its `vad`). The
//! field is the TOML key (serde), and its `#[arg]` attribute gives, beside
//! it, the flag (`--kebab-key`, with the section's prefix for a nested key),
//! the environment variable (`COCHLEA_` and the flag in capitals) and the
//! default; its doc comment is the `--help` text. `Default` is read from
//! those attributes ([`defaults_from_attributes`]). Environment and flags
//! are one clap layer, in which the flag wins. A unit test holds every flag
//! and variable to that naming.
//!
//! A key that only a file can set (a map of named tables such as
//! `transcription.backends` or `sinks`) is a field with `#[arg(skip)]`.
//!
//! The file is deserialized with unknown keys denied, so a typo is an error
//! that names the key. Units are in the names (`_ms`, `_bytes`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{ArgAction, ArgMatches, Args, Command, FromArgMatches};
use serde::{Deserialize, Serialize};

use crate::cluster::ClusterConfig;
use crate::sinks::recorder::config::check_opus_bitrate_bps;
use crate::sinks::recorder::config::{check_flush_interval_ms, check_sample_rate};
use crate::sinks::recorder::{
    ChannelsSetting, RecordFormat, RecorderSettings, SampleFormatSetting,
};
use crate::sinks::registry::{self, SinkConfig};
use crate::sinks::transcriber::backend::BackendKind;
use crate::sinks::transcriber::{TranscriptionConfig, DEFAULT_BACKEND};
use crate::storage::RecordingsUrl;

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
#[derive(Debug, Clone, Deserialize, Serialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address and port to listen on.
    #[arg(
        long,
        env = "COCHLEA_LISTEN",
        value_name = "ADDR:PORT",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: SocketAddr,
    /// Directory for WAV recordings and their JSON sidecars.
    #[arg(
        long,
        env = "COCHLEA_RECORDINGS_DIR",
        value_name = "DIR",
        default_value = "./recordings"
    )]
    pub recordings_dir: PathBuf,
    /// Where recordings are kept: `file:///path` (that directory instead of
    /// `recordings_dir`) or `s3://bucket/prefix` (uploaded while the stream
    /// runs; `recordings_dir` then holds the spool). Unset: `recordings_dir`.
    #[arg(long, env = "COCHLEA_RECORDINGS_URL", value_name = "URL")]
    pub recordings_url: Option<String>,
    /// HTTP worker threads; 0 means one per CPU core.
    #[arg(long, env = "COCHLEA_WORKERS", value_name = "N", default_value_t = 0)]
    pub workers: usize,
    /// Concurrent sessions before new ones are refused with close code 1013.
    #[arg(
        long,
        env = "COCHLEA_MAX_SESSIONS",
        value_name = "N",
        default_value_t = 5000
    )]
    pub max_sessions: usize,
    /// Largest WebSocket message accepted (after continuation frames are joined).
    #[arg(
        long,
        env = "COCHLEA_MAX_MESSAGE_BYTES",
        value_name = "BYTES",
        default_value_t = 64 * 1024
    )]
    pub max_message_bytes: usize,
    /// A session with neither audio nor keepalive for this long is closed.
    #[arg(
        long,
        env = "COCHLEA_IDLE_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 30_000
    )]
    pub idle_timeout_ms: u64,
    /// Close code for an idle session: 1000 (normal) or 1001 (going away).
    #[arg(
        long,
        env = "COCHLEA_IDLE_CLOSE_CODE",
        value_name = "1000|1001",
        default_value_t = 1000
    )]
    pub idle_close_code: u16,
    /// On SIGINT/SIGTERM, how long sessions get to finish their sinks.
    #[arg(
        long,
        env = "COCHLEA_SHUTDOWN_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 10_000
    )]
    pub shutdown_timeout_ms: u64,
    /// Largest timestamp gap one `framing=seq` message may open (filled with silence).
    #[arg(
        long,
        env = "COCHLEA_MAX_GAP_MS",
        value_name = "MS",
        default_value_t = 10_000
    )]
    pub max_gap_ms: u64,
    /// No longer used (sinks are called in place and queue their own slow
    /// work; `max_pending_bytes_per_sink` bounds it); accepted so that older
    /// config files still load.
    #[arg(
        long,
        env = "COCHLEA_SINK_QUEUE_BLOCKS",
        value_name = "N",
        default_value_t = 64
    )]
    pub sink_queue_blocks: usize,
    /// How long a dropped `framing=seq` session waits to be resumed; 0 disables resume.
    #[arg(
        long,
        env = "COCHLEA_RESUME_WINDOW_MS",
        value_name = "MS",
        default_value_t = 30_000
    )]
    pub resume_window_ms: u64,
    /// `framing=seq`: longest time between acks while there is something to ack.
    #[arg(
        long,
        env = "COCHLEA_ACK_INTERVAL_MS",
        value_name = "MS",
        default_value_t = 250
    )]
    pub ack_interval_ms: u64,
    /// Period of `stats` messages while audio flows; 0 disables them.
    #[arg(
        long,
        env = "COCHLEA_STATS_INTERVAL_MS",
        value_name = "MS",
        default_value_t = 5_000
    )]
    pub stats_interval_ms: u64,
    /// Sinks for sessions that do not name any (flag and environment:
    /// comma-separated; empty or `none` for no sink).
    #[arg(
        long,
        env = "COCHLEA_DEFAULT_SINKS",
        value_name = "LIST",
        value_delimiter = ',',
        default_value = "record"
    )]
    pub default_sinks: Vec<String>,
    /// Log lines on stderr: human-readable text or JSON.
    #[arg(
        long,
        env = "COCHLEA_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
    /// API keys; while empty, authentication is off. Repeat the flag for
    /// several (environment: comma-separated).
    #[arg(
        long = "api-key",
        env = "COCHLEA_API_KEYS",
        value_name = "KEY",
        value_delimiter = ','
    )]
    pub api_keys: Vec<String>,
    /// Secret for signing session tokens; empty: a random one per process.
    #[arg(
        long,
        env = "COCHLEA_TOKEN_SECRET",
        value_name = "SECRET",
        hide_env_values = true,
        default_value = ""
    )]
    pub token_secret: String,
    /// Browser origins allowed to connect (e.g. `https://app.example`),
    /// comma-separated; empty: any.
    #[arg(
        long,
        env = "COCHLEA_ALLOWED_ORIGINS",
        value_name = "LIST",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,
    /// Listen beyond loopback without API keys (refused unless set).
    #[arg(
        long,
        env = "COCHLEA_ALLOW_UNAUTHENTICATED",
        value_name = "BOOL",
        action = ArgAction::Set,
        default_value_t = false
    )]
    pub allow_unauthenticated: bool,
    /// Concurrent sessions per API key (1013 beyond); 0: no per-key limit.
    #[arg(
        long,
        env = "COCHLEA_MAX_SESSIONS_PER_KEY",
        value_name = "N",
        default_value_t = 0
    )]
    pub max_sessions_per_key: usize,
    /// Longest a session may last, in wall time; 0: unlimited.
    #[arg(
        long,
        env = "COCHLEA_MAX_SESSION_DURATION_MS",
        value_name = "MS",
        default_value_t = 0
    )]
    pub max_session_duration_ms: u64,
    /// Media time a client may send per wall second beyond the burst; 0: unlimited.
    /// On by default: a timestamp gap is media too, so without this limit a
    /// few bytes can make the server fill seconds of audio on disk.
    #[arg(
        long,
        env = "COCHLEA_MAX_REALTIME_FACTOR",
        value_name = "FACTOR",
        default_value_t = 4.0
    )]
    pub max_realtime_factor: f64,
    /// Media a client may send ahead of the real-time allowance: room for a
    /// short file sent at once, or for catching up after a stall.
    #[arg(
        long,
        env = "COCHLEA_REALTIME_BURST_MS",
        value_name = "MS",
        default_value_t = 10_000
    )]
    pub realtime_burst_ms: u64,
    /// Audio bytes queued for one sink before the session waits for it.
    #[arg(
        long,
        env = "COCHLEA_MAX_PENDING_BYTES_PER_SINK",
        value_name = "BYTES",
        default_value_t = 4 * 1024 * 1024
    )]
    pub max_pending_bytes_per_sink: usize,
    /// How long a session waits for a sink over its pending limit before
    /// giving up with `sink_overloaded`.
    #[arg(
        long,
        env = "COCHLEA_SINK_STALL_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 10_000
    )]
    pub sink_stall_timeout_ms: u64,
    /// Time a client has to send its whole HTTP request (upgrade included);
    /// slower ones get 408 and are disconnected.
    #[arg(
        long,
        env = "COCHLEA_REQUEST_TIMEOUT_MS",
        value_name = "MS",
        default_value_t = 5_000
    )]
    pub request_timeout_ms: u64,
    /// PEM certificate chain: serve `wss://` directly (with `tls_key_path`).
    #[arg(long, env = "COCHLEA_TLS_CERT_PATH", value_name = "PEM")]
    pub tls_cert_path: Option<PathBuf>,
    /// PEM private key of `tls_cert_path`.
    #[arg(long, env = "COCHLEA_TLS_KEY_PATH", value_name = "PEM")]
    pub tls_key_path: Option<PathBuf>,
    #[command(flatten)]
    pub recorder: RecorderConfig,
    #[command(flatten)]
    pub recordings: RecordingsConfig,
    #[command(flatten)]
    pub transcription: TranscriptionConfig,
    #[command(flatten)]
    pub cluster: ClusterConfig,
    #[command(flatten)]
    pub webrtc: crate::server::webrtc::WebrtcConfig,
    /// Named sink instances (`[sinks.<name>]`, tagged by `kind`), which
    /// sessions pick by name in `sinks=`. File only.
    #[arg(skip)]
    #[serde(deserialize_with = "registry::deserialize_sinks")]
    pub sinks: BTreeMap<String, SinkConfig>,
}

/// `[recorder]`; flags and environment variables carry the `recorder` prefix.
#[derive(Debug, Clone, Deserialize, Serialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct RecorderConfig {
    /// Longest time written audio may stay outside the WAV header.
    #[arg(
        long = "recorder-flush-interval-ms",
        env = "COCHLEA_RECORDER_FLUSH_INTERVAL_MS",
        value_name = "MS",
        default_value_t = 1000
    )]
    pub flush_interval_ms: u64,
    /// Also fsync at each header update (power-loss safety; costs disk syncs).
    #[arg(
        long = "recorder-fsync",
        env = "COCHLEA_RECORDER_FSYNC",
        value_name = "BOOL",
        action = ArgAction::Set,
        default_value_t = false
    )]
    pub fsync: bool,
    /// `auto` (f32 for pcm_f32le, else s16), `s16` or `f32`.
    #[arg(
        long = "recorder-sample-format",
        env = "COCHLEA_RECORDER_SAMPLE_FORMAT",
        value_enum,
        default_value_t = SampleFormatSetting::Auto
    )]
    pub sample_format: SampleFormatSetting,
    /// Rate of the recordings in Hz; 0 keeps the stream's.
    #[arg(
        long = "recorder-sample-rate",
        env = "COCHLEA_RECORDER_SAMPLE_RATE",
        value_name = "HZ",
        default_value_t = 0
    )]
    pub sample_rate: u32,
    /// `keep`, `mono`, or `split` (one mono file per channel).
    #[arg(
        long = "recorder-channels",
        env = "COCHLEA_RECORDER_CHANNELS",
        value_enum,
        default_value_t = ChannelsSetting::Keep
    )]
    pub channels: ChannelsSetting,
    /// File format: `wav`, `flac` (lossless) or `ogg_opus` (Opus input kept
    /// as sent; other input encoded at `opus_bitrate_bps`).
    #[arg(
        long = "recorder-format",
        env = "COCHLEA_RECORDER_FORMAT",
        value_enum,
        default_value_t = RecordFormat::Wav
    )]
    pub format: RecordFormat,
    /// Bitrate of Ogg Opus recordings encoded from PCM (6000 to 510000).
    #[arg(
        long = "recorder-opus-bitrate-bps",
        env = "COCHLEA_RECORDER_OPUS_BITRATE_BPS",
        value_name = "BPS",
        default_value_t = 32_000
    )]
    pub opus_bitrate_bps: u32,
    /// Formats a client may choose with `record_format` (comma-separated;
    /// empty: the client may not choose).
    #[arg(
        long = "recorder-client-formats",
        env = "COCHLEA_RECORDER_CLIENT_FORMATS",
        value_enum,
        value_delimiter = ','
    )]
    pub client_formats: Vec<RecordFormat>,
}

impl Default for Config {
    fn default() -> Self {
        defaults_from_attributes()
    }
}

impl Default for RecorderConfig {
    fn default() -> Self {
        defaults_from_attributes()
    }
}

/// `[recordings]`: what happens to recordings once written (the recordings
/// API, retention); flags and variables carry the `recordings` prefix.
#[derive(Debug, Clone, Deserialize, Serialize, clap::Args)]
#[serde(deny_unknown_fields, default)]
pub struct RecordingsConfig {
    /// Days a recording is kept, counted from its start; older ones (audio,
    /// sidecars, transcripts) are deleted. 0 keeps them forever.
    #[arg(
        long = "recordings-retention-days",
        env = "COCHLEA_RECORDINGS_RETENTION_DAYS",
        value_name = "DAYS",
        default_value_t = 0
    )]
    pub retention_days: u32,
}

impl Default for RecordingsConfig {
    fn default() -> Self {
        defaults_from_attributes()
    }
}

impl RecordingsConfig {
    /// The longest retention accepted: a century.
    pub const MAX_RETENTION_DAYS: u32 = 36_525;

    /// How long recordings are kept; `None`: forever.
    pub fn retention(&self) -> Option<std::time::Duration> {
        (self.retention_days > 0)
            .then(|| std::time::Duration::from_secs(u64::from(self.retention_days) * 86_400))
    }
}

/// A configuration section with every key at the default its `#[arg]`
/// attribute declares (and `#[arg(skip)]` keys at `Default::default()` or
/// their `skip = value`). No environment variable is read: those are a
/// layer of their own, above the file.
pub(crate) fn defaults_from_attributes<T: Args + FromArgMatches>() -> T {
    let command = T::augment_args(Command::new("defaults")).mut_args(|arg| arg.env(None));
    match command
        .try_get_matches_from(["defaults"])
        .and_then(|matches| T::from_arg_matches(&matches))
    {
        Ok(defaults) => defaults,
        // Only a typo in this crate's attributes gets here, and every unit
        // test that builds a configuration would show it.
        Err(e) => panic!("a configuration default does not parse: {e}"),
    }
}

/// `cochlea serve`'s command line: the file, `--print-config`, the
/// transcription quick start, and every key of [`Config`] as a flag with its
/// environment variable.
#[derive(Debug, Clone, Default)]
pub struct ServeArgs {
    /// TOML configuration file.
    pub config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    pub print_config: bool,
    quick_start: TranscribeQuickStart,
    /// The keys an environment variable or a flag set, and only those: the
    /// [`Config`] arguments are parsed without their defaults, so that they
    /// go over the file's values and leave the others alone.
    overrides: ArgMatches,
}

#[derive(Debug, Clone, Default, clap::Args)]
struct ServeOptions {
    /// TOML configuration file.
    #[arg(long, env = "COCHLEA_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    print_config: bool,
    #[command(flatten)]
    quick_start: TranscribeQuickStart,
}

/// Flags for `[transcription.backends.default]`. A named table in a map has
/// no flag of its own, so these four are the only keys applied by hand.
#[derive(Debug, Clone, Default, clap::Args)]
struct TranscribeQuickStart {
    /// Quick start: an OpenAI-compatible speech-to-text endpoint (or its
    /// base URL) becomes the backend named `default`, used by every session
    /// that does not say `transcribe=none`.
    #[arg(long, env = "COCHLEA_TRANSCRIBE_URL", value_name = "URL")]
    transcribe_url: Option<String>,
    /// `model` field for the `default` backend.
    #[arg(long, env = "COCHLEA_TRANSCRIBE_MODEL", value_name = "NAME")]
    transcribe_model: Option<String>,
    /// Bearer key for the `default` backend.
    #[arg(
        long,
        env = "COCHLEA_TRANSCRIBE_API_KEY",
        value_name = "KEY",
        hide_env_values = true
    )]
    transcribe_api_key: Option<String>,
    /// `language` field for the `default` backend (ISO-639-1).
    #[arg(long, env = "COCHLEA_TRANSCRIBE_LANGUAGE", value_name = "CODE")]
    transcribe_language: Option<String>,
}

impl TranscribeQuickStart {
    fn apply(&self, t: &mut TranscriptionConfig) {
        if let Some(url) = &self.transcribe_url {
            // The quick-start flag defines (or repoints) the `default`
            // backend; a file may have given it more settings.
            let backend = t.backends.entry(DEFAULT_BACKEND.to_owned()).or_default();
            backend.kind = BackendKind::Openai;
            backend.url = url.clone();
        }
        if let Some(backend) = t.backends.get_mut(DEFAULT_BACKEND) {
            let set = |target: &mut String, value: &Option<String>| {
                if let Some(v) = value {
                    target.clone_from(v);
                }
            };
            set(&mut backend.model, &self.transcribe_model);
            set(&mut backend.api_key, &self.transcribe_api_key);
            set(&mut backend.language, &self.transcribe_language);
        }
    }
}

impl FromArgMatches for ServeArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let options = ServeOptions::from_arg_matches(matches)?;
        Ok(Self {
            config: options.config,
            print_config: options.print_config,
            quick_start: options.quick_start,
            overrides: matches.clone(),
        })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl Args for ServeArgs {
    fn augment_args(command: Command) -> Command {
        // Defaults are the bottom layer, under the file: here they would
        // land in the matches and hide the file's values.
        let command = Config::augment_args(command).mut_args(|arg| arg.default_value(None));
        ServeOptions::augment_args(command)
    }

    fn augment_args_for_update(command: Command) -> Command {
        Self::augment_args(command)
    }
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
        config.apply(args)?;
        config.validate()?;
        Ok(config)
    }

    /// Overlays the environment-and-flags layer.
    fn apply(&mut self, args: &ServeArgs) -> Result<(), ConfigError> {
        let overrides = &args.overrides;
        // clap has parsed every value already; this only moves them.
        self.update_from_arg_matches(overrides)
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        // Comma-separated lists typed in a shell: items trimmed, empty ones
        // dropped, and `none` spelled out for no default sink.
        let clean = |items: &mut Vec<String>, none: Option<&str>| {
            *items = items
                .iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty() && Some(s.as_str()) != none)
                .collect();
        };
        if overrides.contains_id("api_keys") {
            clean(&mut self.api_keys, None);
        }
        if overrides.contains_id("allowed_origins") {
            clean(&mut self.allowed_origins, None);
        }
        if overrides.contains_id("default_sinks") {
            clean(&mut self.default_sinks, Some("none"));
        }
        args.quick_start.apply(&mut self.transcription);
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.recordings_location()?;
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        self.cluster.validate().map_err(ConfigError::Invalid)?;
        if self.cluster.enabled() && self.recordings_url.is_none() {
            return invalid(
                "cluster mode (nats_url) needs recordings_url: every node must reach the recordings (s3://bucket/prefix, or file:// on a shared file system)".into(),
            );
        }
        if self.recordings.retention_days > RecordingsConfig::MAX_RETENTION_DAYS {
            return invalid(format!(
                "recordings.retention_days = {} is more than {} (a century); 0 keeps recordings forever",
                self.recordings.retention_days,
                RecordingsConfig::MAX_RETENTION_DAYS
            ));
        }
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
        check_flush_interval_ms(self.recorder.flush_interval_ms)
            .and_then(|()| check_sample_rate(self.recorder.sample_rate))
            .and_then(|()| check_opus_bitrate_bps(self.recorder.opus_bitrate_bps))
            .map_err(|e| ConfigError::Invalid(format!("recorder.{e}")))?;
        self.transcription
            .validate()
            .map_err(ConfigError::Invalid)?;
        // `[sinks.<name>]` and `default_sinks`, against the registry's names.
        registry::validate(self).map_err(ConfigError::Invalid)
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

    /// `recordings_url`, parsed; `None` when unset.
    pub fn recordings_location(&self) -> Result<Option<RecordingsUrl>, ConfigError> {
        self.recordings_url
            .as_deref()
            .map(RecordingsUrl::parse)
            .transpose()
            .map_err(|e| ConfigError::Invalid(e.to_string()))
    }

    /// The directory the recorder writes into: `recordings_url`'s when it is
    /// a `file://` URL, else `recordings_dir` (the recordings themselves, or
    /// the spool of an object store).
    pub fn recorder_dir(&self) -> PathBuf {
        match self.recordings_location() {
            Ok(Some(RecordingsUrl::File(dir))) => dir,
            _ => self.recordings_dir.clone(),
        }
    }

    pub fn recorder_settings(&self) -> RecorderSettings {
        RecorderSettings {
            dir: self.recorder_dir(),
            flush_interval: Duration::from_millis(self.recorder.flush_interval_ms),
            fsync: self.recorder.fsync,
            sample_format: self.recorder.sample_format,
            sample_rate: (self.recorder.sample_rate != 0).then_some(self.recorder.sample_rate),
            channels: self.recorder.channels,
            instance: None,
            uploader: None,
            format: self.recorder.format,
            opus_bitrate_bps: self.recorder.opus_bitrate_bps,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tests that parse a command line read the process environment: they
    /// take turns, and each starts from an environment without `COCHLEA_*`.
    static ENV_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

    fn clean_env() -> std::sync::MutexGuard<'static, ()> {
        let guard = ENV_LOCK.lock().unwrap_or_else(|e| e.into_inner());
        for (key, _) in std::env::vars() {
            if key.starts_with("COCHLEA_") {
                std::env::remove_var(key);
            }
        }
        guard
    }

    fn serve_args(argv: &[&str]) -> ServeArgs {
        let command = ServeArgs::augment_args(Command::new("serve"));
        let matches = command
            .try_get_matches_from(std::iter::once("serve").chain(argv.iter().copied()))
            .unwrap();
        ServeArgs::from_arg_matches(&matches).unwrap()
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = Config::from_toml("lsten = \"0.0.0.0:1\"\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("lsten"), "{err}");
        let err = Config::from_toml("[recorder]\nflush_ms = 5\n", Path::new("c.toml")).unwrap_err();
        assert!(err.to_string().contains("flush_ms"), "{err}");
        let err = Config::from_toml(
            "[transcription.vad]\nthreshhold = 0.4\n",
            Path::new("c.toml"),
        )
        .unwrap_err();
        assert!(err.to_string().contains("threshhold"), "{err}");
        // Through the whole load: the file and the key are both named.
        let _env = clean_env();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("typo.toml");
        std::fs::write(&path, "max_sesions = 3\n").unwrap();
        let err = Config::load(&serve_args(&["--config", path.to_str().unwrap()])).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("max_sesions"), "{message}");
        assert!(message.contains("typo.toml"), "{message}");
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
    }

    #[test]
    fn precedence_is_default_then_file_then_env_then_flag() {
        let _env = clean_env();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cochlea.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:9000\"\nmax_sessions = 3\nidle_timeout_ms = 1234\n\
             [recorder]\nfsync = true\nsample_rate = 8000\n\
             [transcription.vad]\nhangover_ms = 500\ncut_search_ms = 1500\n\
             [transcription.backends.crm]\nkind = \"webhook\"\nurl = \"http://127.0.0.1:1/hook\"\n",
        )
        .unwrap();
        std::env::set_var("COCHLEA_CONFIG", &path);
        std::env::set_var("COCHLEA_MAX_SESSIONS", "4");
        std::env::set_var("COCHLEA_IDLE_TIMEOUT_MS", "999");
        std::env::set_var("COCHLEA_RECORDER_SAMPLE_RATE", "16000");
        std::env::set_var("COCHLEA_VAD_HANGOVER_MS", "600");
        let loaded = Config::load(&serve_args(&[
            "--idle-timeout-ms",
            "777",
            "--vad-hangover-ms",
            "700",
            "--transcribe-max-retries",
            "5",
        ]));
        for key in [
            "COCHLEA_CONFIG",
            "COCHLEA_MAX_SESSIONS",
            "COCHLEA_IDLE_TIMEOUT_MS",
            "COCHLEA_RECORDER_SAMPLE_RATE",
            "COCHLEA_VAD_HANGOVER_MS",
        ] {
            std::env::remove_var(key);
        }
        let config = loaded.unwrap();
        let defaults = Config::default();
        // Default: set nowhere.
        assert_eq!(config.max_message_bytes, defaults.max_message_bytes);
        assert_eq!(config.recorder.flush_interval_ms, 1000);
        // File over default, at the top level and in sections, and a
        // file-only table that no flag touches.
        assert_eq!(config.listen.port(), 9000);
        assert!(config.recorder.fsync);
        assert_eq!(config.transcription.vad.cut_search_ms, 1500);
        assert_eq!(
            config.transcription.backends["crm"].url,
            "http://127.0.0.1:1/hook"
        );
        // Environment over file.
        assert_eq!(config.max_sessions, 4);
        assert_eq!(config.recorder.sample_rate, 16000);
        // Flag over environment (and over file).
        assert_eq!(config.idle_timeout_ms, 777);
        assert_eq!(config.transcription.vad.hangover_ms, 700);
        // Flag over default.
        assert_eq!(config.transcription.max_retries, 5);
    }

    #[test]
    fn flag_lists_and_the_transcription_quick_start() {
        let _env = clean_env();
        let config = Config::load(&serve_args(&[
            "--default-sinks",
            "none",
            "--api-key",
            " key-one-0123456789 ",
            "--api-key",
            "key-two-0123456789",
            "--allowed-origins",
            "https://a.example, ,https://b.example",
            "--transcribe-url",
            "http://127.0.0.1:1/v1",
            "--transcribe-model",
            "small",
        ]))
        .unwrap();
        assert!(config.default_sinks.is_empty());
        assert_eq!(
            config.api_keys,
            ["key-one-0123456789", "key-two-0123456789"]
        );
        assert_eq!(
            config.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
        let backend = &config.transcription.backends[DEFAULT_BACKEND];
        assert_eq!(backend.url, "http://127.0.0.1:1/v1");
        assert_eq!(backend.model, "small");
        // Nothing set: the defaults, untouched.
        let config = Config::load(&serve_args(&[])).unwrap();
        assert_eq!(config.default_sinks, ["record"]);
        assert!(config.transcription.backends.is_empty());
    }

    #[test]
    fn defaults_come_from_the_attributes() {
        let config = Config::default();
        assert_eq!(config.listen, SocketAddr::from(([127, 0, 0, 1], 8080)));
        assert_eq!(config.recordings_dir, PathBuf::from("./recordings"));
        assert_eq!(config.max_message_bytes, 65_536);
        assert_eq!(config.max_pending_bytes_per_sink, 4 * 1024 * 1024);
        assert_eq!(config.default_sinks, ["record"]);
        assert_eq!(config.log_format, LogFormat::Text);
        assert!(config.api_keys.is_empty() && config.token_secret.is_empty());
        assert!(!config.allow_unauthenticated);
        assert_eq!(config.max_realtime_factor, 4.0);
        assert_eq!(config.realtime_burst_ms, 10_000);
        assert_eq!(config.tls_cert_path, None);
        assert_eq!(config.recorder.sample_format, SampleFormatSetting::Auto);
        assert_eq!(config.recorder.channels, ChannelsSetting::Keep);
        assert_eq!(config.transcription.request_timeout_ms, 30_000);
        assert_eq!(config.transcription.vad.threshold, 0.5);
        assert_eq!(config.transcription.vad.cut_search_ms, 2_000);
        config.validate().unwrap();
    }

    /// One rule for every key: the flag is the TOML key in kebab case (with
    /// its section's prefix), the variable is `COCHLEA_` and the flag in
    /// capitals. `--api-key` is singular because it is repeated.
    #[test]
    fn every_key_has_a_flag_and_variable_named_after_it() {
        let command = Config::augment_args(Command::new("serve"));
        let mut count = 0;
        for arg in command.get_arguments() {
            let id = arg.get_id().as_str();
            let long = arg.get_long().unwrap_or_else(|| panic!("{id} has no flag"));
            let env = arg
                .get_env()
                .unwrap_or_else(|| panic!("--{long} has no variable"))
                .to_string_lossy();
            let plural = if long == "api-key" { "S" } else { "" };
            assert_eq!(
                env,
                format!("COCHLEA_{}{plural}", long.to_uppercase().replace('-', "_")),
                "--{long}"
            );
            let key = id.replace('_', "-");
            assert!(
                long.ends_with(&key) || format!("{long}s") == key,
                "--{long} does not name the key {id}"
            );
            count += 1;
        }
        // Every key of the README's table but the four quick-start flags.
        assert_eq!(count, 60);
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
