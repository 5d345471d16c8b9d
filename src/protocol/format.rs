//! The stream format a client declares: encoding, rate, channels, framing.

use serde::{Deserialize, Serialize};

use super::ProtocolError;

pub const MIN_SAMPLE_RATE: u32 = 8_000;
pub const MAX_SAMPLE_RATE: u32 = 48_000;
pub const MAX_CHANNELS: u16 = 2;
/// Decode rates libopus supports.
pub const OPUS_SAMPLE_RATES: [u32; 5] = [8_000, 12_000, 16_000, 24_000, 48_000];

/// How audio bytes are encoded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Encoding {
    /// Signed 16-bit little-endian PCM.
    PcmS16le,
    /// 32-bit IEEE float little-endian PCM, nominal range [-1, 1].
    PcmF32le,
    /// G.711 μ-law, one byte per sample.
    Mulaw,
    /// G.711 A-law, one byte per sample.
    Alaw,
    /// One Opus packet per binary message.
    Opus,
    /// An Ogg/Opus byte stream, cut anywhere.
    OggOpus,
    /// A WebM/Opus byte stream (browser MediaRecorder), cut anywhere.
    WebmOpus,
}

impl Encoding {
    pub const ALL: [Encoding; 7] = [
        Encoding::PcmS16le,
        Encoding::PcmF32le,
        Encoding::Mulaw,
        Encoding::Alaw,
        Encoding::Opus,
        Encoding::OggOpus,
        Encoding::WebmOpus,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::PcmS16le => "pcm_s16le",
            Encoding::PcmF32le => "pcm_f32le",
            Encoding::Mulaw => "mulaw",
            Encoding::Alaw => "alaw",
            Encoding::Opus => "opus",
            Encoding::OggOpus => "ogg_opus",
            Encoding::WebmOpus => "webm_opus",
        }
    }

    pub fn parse(text: &str) -> Result<Self, ProtocolError> {
        Self::ALL
            .into_iter()
            .find(|e| e.as_str() == text)
            .ok_or_else(|| ProtocolError::UnsupportedEncoding(text.to_owned()))
    }

    /// Bytes per sample of the sample-frame encodings; `None` for Opus,
    /// whose packets have no fixed size.
    pub fn bytes_per_sample(self) -> Option<usize> {
        match self {
            Encoding::PcmS16le => Some(2),
            Encoding::PcmF32le => Some(4),
            Encoding::Mulaw | Encoding::Alaw => Some(1),
            Encoding::Opus | Encoding::OggOpus | Encoding::WebmOpus => None,
        }
    }

    /// Telephony codecs have one obvious rate; PCM has none, and guessing one
    /// is the classic source of chipmunk audio, so PCM must say its rate. For
    /// Opus the rate is one libopus decodes at, 48 kHz unless asked
    /// otherwise; it is the unit of timestamps and durations, while the
    /// server may decode at a lower rate when no sink needs this one.
    pub fn default_sample_rate(self) -> Option<u32> {
        match self {
            Encoding::Mulaw | Encoding::Alaw => Some(8_000),
            Encoding::PcmS16le | Encoding::PcmF32le => None,
            Encoding::Opus | Encoding::OggOpus | Encoding::WebmOpus => Some(48_000),
        }
    }

    /// Container streams carry their own format (channels, pre-skip) and
    /// arrive cut at arbitrary points, so they take neither `channels` nor
    /// `framing=seq`.
    pub fn is_container(self) -> bool {
        matches!(self, Encoding::OggOpus | Encoding::WebmOpus)
    }

    pub fn is_opus(self) -> bool {
        matches!(
            self,
            Encoding::Opus | Encoding::OggOpus | Encoding::WebmOpus
        )
    }
}

/// How binary messages are framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Framing {
    /// The whole payload is audio.
    #[default]
    Raw,
    /// A 12-byte header (u32 seq, u64 timestamp in sample frames) precedes the audio.
    Seq,
}

impl Framing {
    pub fn as_str(self) -> &'static str {
        match self {
            Framing::Raw => "raw",
            Framing::Seq => "seq",
        }
    }

    pub fn parse(text: &str) -> Result<Self, ProtocolError> {
        match text {
            "raw" => Ok(Framing::Raw),
            "seq" => Ok(Framing::Seq),
            other => Err(ProtocolError::UnsupportedFraming(other.to_owned())),
        }
    }
}

/// The effective, validated format of a stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamFormat {
    pub encoding: Encoding,
    pub sample_rate: u32,
    pub channels: u16,
    pub framing: Framing,
}

impl StreamFormat {
    /// Bytes in one sample frame (one sample for every channel), for the
    /// sample-frame encodings.
    pub fn bytes_per_frame(&self) -> Option<usize> {
        self.encoding
            .bytes_per_sample()
            .map(|b| b * usize::from(self.channels))
    }
}

/// Parses a sample rate given as text (query string) and checks its range.
pub fn parse_sample_rate(text: &str) -> Result<u32, ProtocolError> {
    text.trim()
        .parse::<u32>()
        .ok()
        .filter(|r| (MIN_SAMPLE_RATE..=MAX_SAMPLE_RATE).contains(r))
        .ok_or_else(|| ProtocolError::UnsupportedSampleRate(text.to_owned()))
}

/// Parses a channel count given as text (query string) and checks its range.
pub fn parse_channels(text: &str) -> Result<u16, ProtocolError> {
    text.trim()
        .parse::<u16>()
        .ok()
        .filter(|c| (1..=MAX_CHANNELS).contains(c))
        .ok_or_else(|| ProtocolError::UnsupportedChannels(text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodings_round_trip_through_their_names() {
        for e in Encoding::ALL {
            assert_eq!(Encoding::parse(e.as_str()), Ok(e));
        }
        assert!(matches!(
            Encoding::parse("mp3"),
            Err(ProtocolError::UnsupportedEncoding(_))
        ));
    }

    #[test]
    fn sample_rate_bounds_are_inclusive() {
        assert_eq!(parse_sample_rate("8000"), Ok(8000));
        assert_eq!(parse_sample_rate("48000"), Ok(48000));
        assert!(parse_sample_rate("7999").is_err());
        assert!(parse_sample_rate("48001").is_err());
        assert!(parse_sample_rate("16k").is_err());
    }

    #[test]
    fn channels_are_one_or_two() {
        assert_eq!(parse_channels("1"), Ok(1));
        assert_eq!(parse_channels("2"), Ok(2));
        assert!(parse_channels("0").is_err());
        assert!(parse_channels("3").is_err());
    }
}
