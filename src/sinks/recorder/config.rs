//! The `record` kind: `[sinks.<name>]` with `kind = "record"`, and the spec
//! that builds a recorder for each session (the built-in `record` sink is
//! this kind with no overrides).

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ChannelsSetting, RecordFormat, Recorder, RecorderSettings, SampleFormatSetting, NAME};
use crate::config::Config;
use crate::protocol::Encoding;
use crate::protocol::{MAX_SAMPLE_RATE, MIN_SAMPLE_RATE};
use crate::sinks::registry::{Emitters, SinkKind, SinkSpec, SpecEnv};
use crate::sinks::{Sink, SinkContext, SinkError};

/// A recorder of its own. Each key left out takes the value of `[recorder]`
/// (after environment and flags); where its files go is `recordings_dir`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RecordSinkConfig {
    /// Rate of the WAV files in Hz; `0` keeps the stream's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_rate: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channels: Option<ChannelsSetting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample_format: Option<SampleFormatSetting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fsync: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush_interval_ms: Option<u64>,
    /// `wav`, `flac` or `ogg_opus`; a session's `record_format` overrides it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<RecordFormat>,
}

/// libopus takes 500 to 512000 b/s; below 6 kb/s even speech falls apart,
/// and above 510 kb/s (stereo fullband at its best) nothing is gained.
pub fn check_opus_bitrate_bps(bitrate_bps: u32) -> Result<(), String> {
    if !(6_000..=510_000).contains(&bitrate_bps) {
        return Err(format!(
            "opus_bitrate_bps must be from 6000 to 510000, not {bitrate_bps}"
        ));
    }
    Ok(())
}

/// `sample_rate` is 0 (the stream's) or a rate the pipeline converts to.
/// The message starts with the key, for the caller to put its section before.
pub fn check_sample_rate(rate: u32) -> Result<(), String> {
    if rate != 0 && !(MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(&rate) {
        return Err(format!(
            "sample_rate must be 0 (the stream's) or from {MIN_SAMPLE_RATE} to {MAX_SAMPLE_RATE}, not {rate}"
        ));
    }
    Ok(())
}

/// Below 10 ms the header rewrites cost more than the audio; above a minute
/// a crash loses too much.
pub fn check_flush_interval_ms(interval_ms: u64) -> Result<(), String> {
    if !(10..=60_000).contains(&interval_ms) {
        return Err(format!(
            "flush_interval_ms must be from 10 to 60000, not {interval_ms}"
        ));
    }
    Ok(())
}

impl RecordSinkConfig {
    /// `base` (the `[recorder]` settings) with this instance's overrides.
    /// An instance other than the built-in `record` puts its name in its
    /// files' names, so that two recorders of one session never share a file.
    pub fn settings(&self, base: &RecorderSettings, name: &str) -> RecorderSettings {
        RecorderSettings {
            sample_rate: match self.sample_rate {
                Some(0) => None,
                Some(rate) => Some(rate),
                None => base.sample_rate,
            },
            channels: self.channels.unwrap_or(base.channels),
            dir: base.dir.clone(),
            flush_interval: self
                .flush_interval_ms
                .map_or(base.flush_interval, Duration::from_millis),
            fsync: self.fsync.unwrap_or(base.fsync),
            sample_format: self.sample_format.unwrap_or(base.sample_format),
            instance: (name != NAME).then(|| name.to_owned()),
            uploader: base.uploader.clone(),
            format: self.format.unwrap_or(base.format),
            opus_bitrate_bps: base.opus_bitrate_bps,
        }
    }
}

impl SinkKind for RecordSinkConfig {
    fn validate(&self, _config: &Config) -> Result<(), String> {
        if let Some(rate) = self.sample_rate {
            check_sample_rate(rate)?;
        }
        if let Some(interval_ms) = self.flush_interval_ms {
            check_flush_interval_ms(interval_ms)?;
        }
        Ok(())
    }

    fn spec(&self, name: &str, env: &SpecEnv<'_>) -> Result<Arc<dyn SinkSpec>, String> {
        Ok(Arc::new(RecordSpec {
            name: name.to_owned(),
            settings: self.settings(
                &RecorderSettings {
                    uploader: env.uploader.cloned(),
                    ..env.config.recorder_settings()
                },
                name,
            ),
        }))
    }
}

/// A recorder, as configured: a WAV file (or one per channel) with a JSON
/// sidecar per session.
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

    fn takes_opus_packets(&self, encoding: Encoding, record_format: Option<RecordFormat>) -> bool {
        self.settings
            .takes_opus_packets_for(encoding, record_format)
    }

    fn build(
        &self,
        context: &SinkContext,
        emitters: &mut Emitters,
    ) -> Result<Vec<Box<dyn Sink>>, SinkError> {
        let mut sinks: Vec<Box<dyn Sink>> = Vec::new();
        for output in self.settings.outputs_for(context) {
            sinks.push(Box::new(Recorder::create(
                context,
                &self.settings,
                output,
                emitters.next_emitter(),
            )?));
        }
        Ok(sinks)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> RecorderSettings {
        RecorderSettings {
            sample_rate: Some(8_000),
            channels: ChannelsSetting::Split,
            dir: "/recordings".into(),
            flush_interval: Duration::from_millis(1_000),
            fsync: true,
            sample_format: SampleFormatSetting::F32,
            instance: None,
            uploader: None,
            format: RecordFormat::Wav,
            opus_bitrate_bps: 32_000,
        }
    }

    #[test]
    fn keys_left_out_take_the_recorder_section() {
        let settings = RecordSinkConfig::default().settings(&base(), "archive");
        assert_eq!(settings.sample_rate, Some(8_000));
        assert_eq!(settings.channels, ChannelsSetting::Split);
        assert_eq!(settings.flush_interval, Duration::from_millis(1_000));
        assert!(settings.fsync);
        assert_eq!(settings.sample_format, SampleFormatSetting::F32);
        assert_eq!(settings.instance.as_deref(), Some("archive"));
    }

    #[test]
    fn overrides_win_and_a_rate_of_zero_keeps_the_streams() {
        let config = RecordSinkConfig {
            sample_rate: Some(0),
            channels: Some(ChannelsSetting::Mono),
            sample_format: Some(SampleFormatSetting::S16),
            fsync: Some(false),
            flush_interval_ms: Some(250),
            format: Some(RecordFormat::Flac),
        };
        let settings = config.settings(&base(), "asr16k");
        assert_eq!(settings.sample_rate, None);
        assert_eq!(settings.channels, ChannelsSetting::Mono);
        assert_eq!(settings.sample_format, SampleFormatSetting::S16);
        assert!(!settings.fsync);
        assert_eq!(settings.flush_interval, Duration::from_millis(250));
        assert_eq!(settings.format, RecordFormat::Flac);
        let config = RecordSinkConfig {
            sample_rate: Some(16_000),
            ..RecordSinkConfig::default()
        };
        assert_eq!(config.settings(&base(), "x").sample_rate, Some(16_000));
    }

    #[test]
    fn the_built_in_recorder_keeps_the_plain_file_names() {
        let settings = RecordSinkConfig::default().settings(&base(), NAME);
        assert_eq!(settings.instance, None);
    }

    #[test]
    fn out_of_range_values_are_refused_naming_the_key_and_value() {
        let config = Config::default();
        for (sink, key, value) in [
            (
                RecordSinkConfig {
                    sample_rate: Some(7_999),
                    ..RecordSinkConfig::default()
                },
                "sample_rate",
                "7999",
            ),
            (
                RecordSinkConfig {
                    sample_rate: Some(48_001),
                    ..RecordSinkConfig::default()
                },
                "sample_rate",
                "48001",
            ),
            (
                RecordSinkConfig {
                    flush_interval_ms: Some(9),
                    ..RecordSinkConfig::default()
                },
                "flush_interval_ms",
                "not 9",
            ),
            (
                RecordSinkConfig {
                    flush_interval_ms: Some(60_001),
                    ..RecordSinkConfig::default()
                },
                "flush_interval_ms",
                "60001",
            ),
        ] {
            let err = sink.validate(&config).unwrap_err();
            assert!(err.starts_with(key) && err.contains(value), "{err}");
        }
        for rate in [0, 8_000, 48_000] {
            let sink = RecordSinkConfig {
                sample_rate: Some(rate),
                flush_interval_ms: Some(10),
                ..RecordSinkConfig::default()
            };
            sink.validate(&config).unwrap();
        }
    }
}
