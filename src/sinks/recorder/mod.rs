//! The crash-safe WAV recorder.
//!
//! One `<session_id>.wav` per session, beside a `<session_id>.json` sidecar.
//! The WAV header is rewritten whenever more than `flush_interval_ms` has
//! passed since the last rewrite and there is audio the header does not cover,
//! so a process killed at any moment leaves a valid file holding everything up
//! to about one interval before. The sidecar is written at start with
//! `"complete": false` and replaced atomically at the end. A named recorder
//! (`[sinks.<name>]`, see [`config`]) writes `<session_id>.<name>.wav`.

pub mod config;
mod sidecar;
mod wav;

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{Sink, SinkContext, SinkError};
use crate::pipeline::convert::{Layout, OutputFormat};
use crate::pipeline::{AudioBlock, BlockSamples};
use crate::protocol::{Encoding, RecordingInfo, ServerMessage};
use sidecar::Sidecar;
use wav::WavWriter;
pub use wav::{f32_to_i16, samples_to_i16};

pub const NAME: &str = "record";

/// Sample format of the WAV file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum SampleFormatSetting {
    /// 32-bit float for `pcm_f32le` streams, 16-bit integer otherwise: each
    /// keeps the client's samples exactly.
    #[default]
    Auto,
    S16,
    F32,
}

/// Which channels the recorder keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum ChannelsSetting {
    /// The stream's channels in one file.
    #[default]
    Keep,
    /// One mono file, the channels averaged.
    Mono,
    /// One mono file per channel (`<id>.ch0.wav`, `<id>.ch1.wav`): a stereo
    /// call with one speaker per side becomes one file per speaker.
    Split,
}

/// Recorder settings, resolved from the configuration.
#[derive(Debug, Clone)]
pub struct RecorderSettings {
    /// Rate of the WAV files; `None` keeps the stream's.
    pub sample_rate: Option<u32>,
    pub channels: ChannelsSetting,
    pub dir: PathBuf,
    pub flush_interval: Duration,
    /// `fsync` after each header rewrite: survives power loss, not only a
    /// killed process, at the cost of one disk sync per interval per session.
    pub fsync: bool,
    pub sample_format: SampleFormatSetting,
    /// The `[sinks.<name>]` instance this recorder is, which goes into its
    /// file names; `None` for the built-in `record`.
    pub instance: Option<String>,
}

impl RecorderSettings {
    /// The recordings to make for a stream with `channels` channels.
    pub fn outputs(&self, channels: u16) -> Vec<OutputFormat> {
        let format = |layout| OutputFormat {
            sample_rate: self.sample_rate,
            layout,
        };
        match self.channels {
            ChannelsSetting::Keep => vec![format(Layout::Keep)],
            ChannelsSetting::Mono => vec![format(Layout::Mono)],
            ChannelsSetting::Split if channels == 1 => vec![format(Layout::Keep)],
            ChannelsSetting::Split => (0..channels).map(|c| format(Layout::Channel(c))).collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WavFormat {
    S16,
    F32,
}

impl WavFormat {
    fn name(self) -> &'static str {
        match self {
            WavFormat::S16 => "s16",
            WavFormat::F32 => "f32",
        }
    }

    fn bytes_per_sample(self) -> u64 {
        match self {
            WavFormat::S16 => 2,
            WavFormat::F32 => 4,
        }
    }
}

/// The RIFF size fields are 32-bit: a WAV file cannot hold more data bytes
/// than this (the header is at most 68 bytes).
const MAX_WAV_DATA_BYTES: u64 = u32::MAX as u64 - 68;

/// Builds the mapper from an IO error on `path` to a [`SinkError`].
/// The path is copied only if there is an error: this runs once per block.
fn io_error<'a>(
    action: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> SinkError + 'a {
    move |source| SinkError::Io {
        sink: NAME,
        action,
        path: path.to_path_buf(),
        source,
    }
}

fn wav_error(source: hound::Error) -> SinkError {
    SinkError::Wav { sink: NAME, source }
}

pub struct Recorder {
    output: OutputFormat,
    /// The channel this file holds, when the stream is split per channel.
    channel: Option<u16>,
    wav: WavWriter,
    wav_path: PathBuf,
    sidecar: Sidecar,
    sidecar_path: PathBuf,
    format: WavFormat,
    channels: u16,
    sample_rate: u32,
    frames_written: u64,
    /// Frames written but not yet covered by the header.
    dirty: bool,
    last_flush: Instant,
    flush_interval: Duration,
    fsync: bool,
    write_seconds: metrics::Histogram,
    /// Why the session failed, if it did: the sidecar says so.
    session_error: Option<String>,
    instance: Option<String>,
}

impl Recorder {
    pub fn create(
        context: &SinkContext,
        settings: &RecorderSettings,
        output: OutputFormat,
    ) -> Result<Self, SinkError> {
        fs::create_dir_all(&settings.dir).map_err(io_error("creating directory", &settings.dir))?;
        let channel = match output.layout {
            Layout::Channel(c) => Some(c),
            Layout::Keep | Layout::Mono => None,
        };
        // Names come from the server-made session id and the configured
        // instance name only, never from client text.
        let mut stem = context.session_id.clone();
        if let Some(instance) = &settings.instance {
            stem = format!("{stem}.{instance}");
        }
        if let Some(c) = channel {
            stem = format!("{stem}.ch{c}");
        }
        let wav_path = settings.dir.join(format!("{stem}.wav"));
        let sidecar_path = settings.dir.join(format!("{stem}.json"));
        let channels = output.channels(context.format.channels);
        let sample_rate = output.rate(context.format.sample_rate);

        let format = match (settings.sample_format, context.format.encoding) {
            (SampleFormatSetting::F32, _) | (SampleFormatSetting::Auto, Encoding::PcmF32le) => {
                WavFormat::F32
            }
            _ => WavFormat::S16,
        };
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&wav_path)
            .map_err(io_error("creating", &wav_path))?;
        let wav = WavWriter::create(file, channels, sample_rate, format).map_err(wav_error)?;

        let sidecar = Sidecar::new(
            context,
            &wav_path,
            format.name(),
            sample_rate,
            channels,
            channel,
        );
        sidecar.write(&sidecar_path)?;

        Ok(Self {
            output,
            channel,
            wav,
            wav_path,
            sidecar,
            sidecar_path,
            format,
            channels,
            sample_rate,
            frames_written: 0,
            dirty: false,
            last_flush: Instant::now(),
            flush_interval: settings.flush_interval,
            fsync: settings.fsync,
            write_seconds: metrics::histogram!(crate::telemetry::names::SINK_WRITE_SECONDS, "sink" => NAME),
            session_error: None,
            instance: settings.instance.clone(),
        })
    }

    fn checkpoint(&mut self, now: Instant) -> Result<(), SinkError> {
        self.wav.checkpoint().map_err(wav_error)?;
        if self.fsync {
            self.wav
                .file()
                .sync_data()
                .map_err(io_error("syncing", &self.wav_path))?;
        }
        self.dirty = false;
        self.last_flush = now;
        Ok(())
    }

    fn sha256_of(path: &Path) -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect())
    }
}

impl Sink for Recorder {
    fn name(&self) -> &'static str {
        NAME
    }

    fn output_format(&self) -> OutputFormat {
        self.output
    }

    fn write(&mut self, block: &AudioBlock, now: Instant) -> Result<(), SinkError> {
        let new_bytes =
            block.frames as u64 * u64::from(self.channels) * self.format.bytes_per_sample();
        let have_bytes =
            self.frames_written * u64::from(self.channels) * self.format.bytes_per_sample();
        if have_bytes + new_bytes > MAX_WAV_DATA_BYTES {
            return Err(SinkError::Failed {
                sink: NAME,
                message: format!(
                    "recording reached the 4 GiB limit of the WAV format after {} s",
                    self.frames_written / u64::from(self.sample_rate)
                ),
            });
        }
        let started = Instant::now();
        match &block.samples {
            BlockSamples::Audio(samples) => self.wav.write(samples).map_err(wav_error)?,
            BlockSamples::Silence => self
                .wav
                .write_silence(block.frames * usize::from(self.channels))
                .map_err(wav_error)?,
        }
        self.write_seconds.record(started.elapsed().as_secs_f64());
        self.frames_written += block.frames as u64;
        self.dirty = true;
        if now.saturating_duration_since(self.last_flush) >= self.flush_interval {
            self.checkpoint(now)?;
        }
        Ok(())
    }

    fn flush(&mut self, now: Instant) -> Result<(), SinkError> {
        self.checkpoint(now)
    }

    fn session_failed(&mut self, error: &str) {
        self.session_error = Some(error.to_owned());
    }

    /// The header is patched to cover what was written (and with
    /// `recorder.fsync`, synced): a crash after the ack loses none of it.
    fn commit(&mut self, now: Instant) -> Result<(), SinkError> {
        if self.dirty {
            self.checkpoint(now)?;
        }
        Ok(())
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.dirty.then(|| self.last_flush + self.flush_interval)
    }

    fn on_deadline(&mut self, now: Instant) -> Result<(), SinkError> {
        if self.dirty {
            self.checkpoint(now)?;
        }
        Ok(())
    }

    fn abort(self: Box<Self>, reason: &str) {
        let this = *self;
        // The header then covers every sample that reached the file.
        if let Err(e) = this.wav.finalize() {
            tracing::warn!(error = %e, "cannot finalize the WAV of a failed recording");
        }
        let mut sidecar = this.sidecar;
        sidecar.fail(SystemTime::now(), this.frames_written, reason);
        if let Err(e) = sidecar.write(&this.sidecar_path) {
            tracing::warn!(error = %e, "cannot write the sidecar of a failed recording");
        }
    }

    fn finish(self: Box<Self>) -> Result<Vec<ServerMessage>, SinkError> {
        let this = *self;
        let file = this.wav.finalize().map_err(wav_error)?;
        let path = &this.wav_path;
        if this.fsync {
            file.sync_data().map_err(io_error("syncing", path))?;
        }
        let bytes = fs::metadata(path)
            .map_err(io_error("reading size of", path))?
            .len();
        let sha256 = Self::sha256_of(path).map_err(io_error("hashing", path))?;
        let duration_seconds = this.frames_written as f64 / f64::from(this.sample_rate);

        let mut sidecar = this.sidecar;
        sidecar.complete(
            SystemTime::now(),
            this.frames_written,
            duration_seconds,
            &sha256,
        );
        if let Some(error) = &this.session_error {
            sidecar.session_failed(error);
        }
        sidecar.write(&this.sidecar_path)?;

        Ok(vec![ServerMessage::Recording(RecordingInfo {
            path: this.wav_path.display().to_string(),
            sidecar_path: this.sidecar_path.display().to_string(),
            duration_seconds,
            sample_frames: this.frames_written,
            sample_rate: this.sample_rate,
            channels: this.channels,
            sample_format: this.format.name(),
            channel: this.channel,
            sink: this.instance,
            bytes,
            sha256,
        })])
    }
}
