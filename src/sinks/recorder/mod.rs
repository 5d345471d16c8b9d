//! The crash-safe recorder: WAV, FLAC or Ogg Opus ([`format`]).
//!
//! One `<session_id>.wav` (`.flac`, `.opus`) per session, beside a
//! `<session_id>.json` sidecar.
//! The session calls the recorder in place for every block; the recorder
//! only copies the samples into a batch. The file work (writing, header
//! checkpoints, `fsync`, the sidecars, finalizing) runs on tokio's blocking
//! pool through a per-recording queue ([`offthread`]), so a slow or full disk
//! holds up only its own recordings, never an async worker.
//!
//! Durability: before every `ack`, the header is patched to cover all audio
//! handed over (FLAC: pending samples encoded as a frame; Ogg: the page
//! completed), synced with `recorder.fsync`, and the ack waits for it;
//! otherwise the header is rewritten whenever more than `flush_interval_ms`
//! has passed with audio it does not cover. A process killed at any moment
//! leaves a valid file holding everything acknowledged (and, without acks,
//! everything up to about one interval plus one batch before); the next
//! start makes the header cover every whole frame on disk ([`recover`]). The
//! sidecar is written at start with `"complete": false` and replaced
//! atomically at the end.
//!
//! Both files are created with the first block of audio: a session that ends
//! without audio (1,000 idle connections) leaves no file, and holds no file
//! descriptor while it waits.
//!
//! A named recorder (`[sinks.<name>]`, see [`config`]) writes
//! `<session_id>.<name>.wav`.

pub mod config;
pub mod format;
mod offthread;
pub mod recover;
mod sidecar;
mod wav;

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::registry::Emitter;
use super::{Completion, Sink, SinkContext, SinkError};
use crate::pipeline::convert::{Layout, OutputFormat};
use crate::pipeline::{AudioBlock, BlockSamples, OpusPacket};
use crate::protocol::{Encoding, ErrorCode, RecordingInfo, ServerMessage};
use crate::storage::upload::{Upload, Uploader};
use format::flac::FlacWriter;
use format::ogg_opus::{OggOpusWriter, ENCODER_RATES_HZ};
pub use format::RecordFormat;
use format::{FormatError, FormatWriter};
use offthread::{FileSide, Job, OffThread, Report};
use sidecar::Sidecar;
pub use wav::{f32_to_i16, samples_to_i16};
use wav::{Unfinished, WavWriter};

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
    /// The file format, unless the session chose another.
    pub format: RecordFormat,
    /// Bitrate of Ogg Opus recordings made from PCM.
    pub opus_bitrate_bps: u32,
    /// With an object store: streams each recording there while it is
    /// written (`dir` is then the spool).
    pub uploader: Option<Arc<Uploader>>,
}

impl RecorderSettings {
    /// The format of a session's recordings: the client's choice (already
    /// checked against `recorder.client_formats`), else the configured one.
    pub fn format_for(&self, context: &SinkContext) -> RecordFormat {
        context.record_format.unwrap_or(self.format)
    }

    /// The rate of the PCM the recorder takes for a stream at
    /// `stream_rate_hz`: Ogg Opus is encoded at an Opus rate, so any other
    /// rate (44.1 kHz) is resampled to 48 kHz.
    fn pcm_rate(&self, format: RecordFormat, stream_rate_hz: u32) -> Option<u32> {
        let rate = self.sample_rate.unwrap_or(stream_rate_hz);
        if format == RecordFormat::OggOpus && !ENCODER_RATES_HZ.contains(&rate) {
            return Some(48_000);
        }
        self.sample_rate
    }

    /// Whether this recorder takes a stream of `encoding` as the client's
    /// Opus packets (no decoding): an Ogg Opus recording of Opus input that
    /// keeps the stream's channels. `record_format` is the session's choice.
    pub fn takes_opus_packets_for(
        &self,
        encoding: Encoding,
        record_format: Option<RecordFormat>,
    ) -> bool {
        self.channels == ChannelsSetting::Keep
            && record_format
                .unwrap_or(self.format)
                .takes_opus_packets(encoding)
    }

    fn takes_opus_packets(&self, context: &SinkContext) -> bool {
        self.takes_opus_packets_for(context.format.encoding, context.record_format)
    }

    /// The recordings to make for a stream with `channels` channels.
    pub fn outputs(&self, channels: u16) -> Vec<OutputFormat> {
        self.outputs_at(self.sample_rate, channels)
    }

    /// The recordings to make for a session: as [`Self::outputs`], at the
    /// rate its format can take.
    pub fn outputs_for(&self, context: &SinkContext) -> Vec<OutputFormat> {
        let format = self.format_for(context);
        let rate = self.pcm_rate(format, context.format.sample_rate);
        self.outputs_at(rate, context.format.channels)
    }

    fn outputs_at(&self, sample_rate: Option<u32>, channels: u16) -> Vec<OutputFormat> {
        let format = |layout| OutputFormat {
            sample_rate,
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
pub enum WavFormat {
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

/// The last component of a path the recorder made (always a file name).
fn file_name(path: &Path) -> Option<String> {
    path.file_name().map(|n| n.to_string_lossy().into_owned())
}

/// How long the end of a session waits for its recording's upload to
/// complete before it reports the recording as still uploading (the upload
/// goes on in the background).
const UPLOAD_WAIT: Duration = Duration::from_secs(10);

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

/// A format writer's error as the sink's, naming the file.
fn format_error(path: &Path) -> impl FnOnce(FormatError) -> SinkError + '_ {
    move |error| match error {
        FormatError::Wav(source) => wav_error(source),
        FormatError::Io(source) => io_error("writing", path)(source),
    }
}

/// How many samples the recorder gathers before it hands them to its file
/// queue when nothing else (an ack, a flush, the header interval) does first.
/// 8192 samples: half a second of 16 kHz mono, the most a crash of a session
/// without acks can lose beyond the header interval (as the 16 KiB write
/// buffer of s16 samples was before).
const BATCH_SAMPLES: usize = 8_192;

/// The recorder as the session sees it: called in place for every block,
/// it only counts and copies; the file work is queued ([`offthread`]).
pub struct Recorder {
    output: OutputFormat,
    channels: u16,
    sample_rate: u32,
    wav_format: WavFormat,
    record_format: RecordFormat,
    /// Takes the client's Opus packets instead of PCM.
    takes_packets: bool,
    /// Frames handed over (queued or written).
    frames_queued: u64,
    /// Samples not yet queued.
    batch: Vec<f32>,
    /// Packets not yet queued.
    packets: Vec<OpusPacket>,
    packet_bytes: usize,
    /// Queued audio the header does not cover yet.
    dirty: bool,
    last_flush: Instant,
    flush_interval: Duration,
    io: OffThread<RecordingFile>,
    /// Why the session failed, if it did: the sidecar says so.
    session_error: Option<String>,
}

/// How the file is opened at the first audio.
#[derive(Debug, Clone, Copy)]
enum Opening {
    Wav(WavFormat),
    Flac,
    /// The client's Opus packets, with the input's pre-skip and rate.
    OpusPassthrough {
        pre_skip: u16,
        input_rate_hz: u32,
    },
    OpusEncode {
        bitrate_bps: u32,
    },
}

/// The file side of one recording, used only by its queue's drain job (or
/// by `finish`/`abort` on the blocking pool).
struct RecordingFile {
    channel: Option<u16>,
    /// `None` until the first block.
    writer: Option<FormatWriter>,
    path: PathBuf,
    sidecar: Sidecar,
    sidecar_path: PathBuf,
    opening: Opening,
    /// The `sample_format` reported: `s16`/`f32` for WAV, `s16` for FLAC,
    /// `opus` for Ogg Opus.
    sample_format: &'static str,
    record_format: RecordFormat,
    channels: u16,
    /// The file's rate (Ogg Opus: 48 kHz, the rate its lengths count).
    sample_rate: u32,
    /// Frames written to the file (Ogg Opus: added up at the end).
    frames_written: u64,
    fsync: bool,
    /// The `[sinks.<name>]` instance, named in `recording`.
    instance: Option<String>,
    /// Pre-skip of an Ogg Opus file, taken off its length.
    opus_pre_skip_48k: u64,
    /// The object store's side, if recordings are uploaded.
    upload: Option<Upload>,
    /// Where the upload puts the file (`s3://…`).
    uri: Option<String>,
    session_id: String,
}

impl Recorder {
    pub fn create(
        context: &SinkContext,
        settings: &RecorderSettings,
        output: OutputFormat,
        emitter: Emitter,
    ) -> Result<Self, SinkError> {
        // Checked at start (one syscall when it exists): a session whose
        // recordings cannot be kept is refused at once, not at its first audio.
        fs::create_dir_all(&settings.dir).map_err(io_error("creating directory", &settings.dir))?;
        let record_format = settings.format_for(context);
        let takes_packets = settings.takes_opus_packets(context);
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
        let path = settings
            .dir
            .join(format!("{stem}.{}", record_format.extension()));
        let sidecar_path = settings.dir.join(format!("{stem}.json"));
        let channels = output.channels(context.format.channels);
        let sample_rate = output.rate(context.format.sample_rate);

        let wav_format = match (settings.sample_format, context.format.encoding) {
            (SampleFormatSetting::F32, _) | (SampleFormatSetting::Auto, Encoding::PcmF32le) => {
                WavFormat::F32
            }
            _ => WavFormat::S16,
        };
        let (opening, sample_format, file_rate) = match record_format {
            RecordFormat::Wav => (Opening::Wav(wav_format), wav_format.name(), sample_rate),
            RecordFormat::Flac => (Opening::Flac, "s16", sample_rate),
            RecordFormat::OggOpus if takes_packets => (
                Opening::OpusPassthrough {
                    pre_skip: context.opus_pre_skip,
                    input_rate_hz: context.format.sample_rate,
                },
                "opus",
                48_000,
            ),
            RecordFormat::OggOpus => (
                Opening::OpusEncode {
                    bitrate_bps: settings.opus_bitrate_bps,
                },
                "opus",
                48_000,
            ),
        };
        let sidecar = Sidecar::new(
            context,
            &path,
            record_format.name(),
            sample_format,
            file_rate,
            channels,
            channel,
        );
        let file_name = format!("{stem}.{}", record_format.extension());
        let uri = settings
            .uploader
            .as_ref()
            .and_then(|uploader| uploader.storage().object_url(&file_name));
        let upload = settings.uploader.as_ref().map(|uploader| {
            let emitter = emitter.clone();
            uploader.begin(
                &file_name,
                Box::new(move |message: &str| {
                    emitter.message(ServerMessage::Error {
                        code: ErrorCode::StorageUnavailable,
                        message: message.to_owned(),
                        fatal: false,
                    });
                }),
            )
        });
        let file = RecordingFile {
            channel,
            writer: None,
            path,
            sidecar,
            sidecar_path,
            opening,
            sample_format,
            record_format,
            channels,
            sample_rate,
            frames_written: 0,
            fsync: settings.fsync,
            instance: settings.instance.clone(),
            opus_pre_skip_48k: 0,
            upload,
            uri,
            session_id: context.session_id.clone(),
        };
        let write_seconds =
            metrics::histogram!(crate::telemetry::names::SINK_WRITE_SECONDS, "sink" => NAME);
        Ok(Self {
            output,
            channels,
            sample_rate,
            wav_format,
            record_format,
            takes_packets,
            frames_queued: 0,
            batch: Vec::new(),
            packets: Vec::new(),
            packet_bytes: 0,
            dirty: false,
            last_flush: Instant::now(),
            flush_interval: settings.flush_interval,
            io: OffThread::new(file, emitter, write_seconds),
            session_error: None,
        })
    }

    /// Queues the batch, then `then` (if any).
    fn hand_over(&mut self, then: Option<Job>) {
        let batch = (!self.batch.is_empty()).then(|| {
            let next = Vec::with_capacity(self.batch.capacity());
            Job::Samples(std::mem::replace(&mut self.batch, next))
        });
        let packets = (!self.packets.is_empty()).then(|| {
            self.packet_bytes = 0;
            Job::Packets(std::mem::take(&mut self.packets))
        });
        let jobs = batch.into_iter().chain(packets).chain(then);
        self.io.submit(jobs);
    }

    /// Queues a header checkpoint after everything handed over so far.
    fn checkpoint(&mut self, now: Instant, report: Report) {
        self.hand_over(Some(Job::Checkpoint(report)));
        self.dirty = false;
        self.last_flush = now;
    }

    /// After new audio: the header interval, counted from the first audio.
    fn after_audio(&mut self, now: Instant) {
        self.dirty = true;
        if now.saturating_duration_since(self.last_flush) >= self.flush_interval {
            self.checkpoint(now, Report::Nothing);
        }
    }
}

impl RecordingFile {
    /// Creates the file (header written) and the first sidecar. A recording
    /// that cannot be started (a full disk) leaves no file.
    fn open(&self) -> Result<FormatWriter, SinkError> {
        let path = &self.path;
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_error("creating", path))?;
        // Held while the file is open: crash recovery in another server
        // sharing the directory leaves a live recording alone (recover.rs).
        if let Err(error) = file.try_lock() {
            tracing::debug!(%error, "cannot lock the recording");
        }
        // The Ogg stream's serial number: any value does for one stream.
        let serial = rand_serial(path);
        let writer = match self.opening {
            Opening::Wav(format) => {
                WavWriter::create(file, self.channels, self.sample_rate, format)
                    .map(FormatWriter::Wav)
                    .map_err(wav_error)
            }
            Opening::Flac => FlacWriter::create(file, self.channels, self.sample_rate)
                .map(|w| FormatWriter::Flac(Box::new(w)))
                .map_err(io_error("writing", path)),
            Opening::OpusPassthrough {
                pre_skip,
                input_rate_hz,
            } => OggOpusWriter::passthrough(file, self.channels, pre_skip, input_rate_hz, serial)
                .map(FormatWriter::OggOpus)
                .map_err(io_error("writing", path)),
            Opening::OpusEncode { bitrate_bps } => {
                OggOpusWriter::encoding(file, self.channels, self.sample_rate, bitrate_bps, serial)
                    .map(FormatWriter::OggOpus)
                    .map_err(io_error("writing", path))
            }
        };
        writer
            .and_then(|w| self.sidecar.write_first(&self.sidecar_path).map(|()| w))
            .inspect_err(|_| {
                let _ = fs::remove_file(path);
            })
    }

    fn writer(&mut self) -> Result<&mut FormatWriter, SinkError> {
        if self.writer.is_none() {
            self.writer = Some(self.open()?);
        }
        self.writer.as_mut().ok_or_else(|| SinkError::Failed {
            sink: NAME,
            message: "the recording could not be opened".into(),
        })
    }

    /// After a failed write: makes the header cover what is on disk;
    /// returns the frames it then covers (`written` if it cannot be patched).
    fn cover_frames_on_disk(unfinished: Option<&Unfinished>, written: u64) -> u64 {
        let Some(unfinished) = unfinished else {
            // FLAC and Ogg need no patching to play what is on disk.
            return written;
        };
        unfinished.cover_frames_on_disk().unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot patch the WAV header of a failed recording");
            written
        })
    }

    /// Frames the file holds, at its rate: for Ogg Opus, the 48 kHz
    /// samples decoded from it after the pre-skip.
    fn frames_in(&self, writer: &FormatWriter) -> u64 {
        match writer {
            FormatWriter::OggOpus(w) => w.granule().saturating_sub(self.opus_pre_skip_48k),
            _ => self.frames_written,
        }
    }

    /// Marks the sidecar failed: the error, the end time, and the length.
    fn record_failure(
        mut sidecar: Sidecar,
        path: &Path,
        frames: u64,
        sample_rate: u32,
        reason: &str,
    ) {
        let duration_seconds = frames as f64 / f64::from(sample_rate);
        sidecar.fail(SystemTime::now(), frames, duration_seconds, reason);
        if let Err(e) = sidecar.write(path) {
            tracing::warn!(error = %e, "cannot write the sidecar of a failed recording");
        }
    }

    fn file_rate(&self) -> u32 {
        match self.record_format {
            RecordFormat::OggOpus => 48_000,
            _ => self.sample_rate,
        }
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

    /// Closes a recording whose session failed, or that failed itself:
    /// the header covers what reached the disk, the sidecar says why.
    fn close_failed(mut self, reason: &str) {
        // No audio, no file (or it could not be made): nothing to mark.
        let Some(writer) = self.writer.take() else {
            return;
        };
        let frames_before = self.frames_in(&writer);
        let frames = match writer.finalize() {
            // The header covers every sample written.
            Ok(_) => frames_before,
            Err((error, unfinished)) => {
                tracing::warn!(%error, "cannot finalize a failed recording");
                Self::cover_frames_on_disk(unfinished.as_ref(), frames_before)
            }
        };
        let rate = self.file_rate();
        Self::record_failure(self.sidecar, &self.sidecar_path, frames, rate, reason);
        // What was kept goes to the store too (not waited for: the session
        // has failed and reports no recording).
        if let Some(upload) = self.upload {
            let len = fs::metadata(&self.path).map_or(0, |m| m.len());
            let _ = upload.finish(len, file_name(&self.sidecar_path));
        }
    }

    /// The end of a recording: the header final, the hash, the sidecar, and
    /// the `recording` message.
    fn close(mut self, session_error: Option<&str>) -> Result<Vec<ServerMessage>, SinkError> {
        // No audio: no file, and no `recording` to report.
        let Some(writer) = self.writer.take() else {
            return Ok(Vec::new());
        };
        let rate = self.file_rate();
        let path = self.path.clone();
        let sidecar_path = self.sidecar_path.clone();
        let fail = |sidecar, frames, error: SinkError| {
            let reason = error.to_string();
            Self::record_failure(sidecar, &sidecar_path, frames, rate, &reason);
            Err(error)
        };
        let frames_before = self.frames_in(&writer);
        let is_opus = matches!(writer, FormatWriter::OggOpus(_));
        let granule_end = match &writer {
            FormatWriter::OggOpus(_) => None,
            _ => Some(self.frames_written),
        };
        let file = match writer.finalize() {
            Ok(file) => file,
            Err((error, unfinished)) => {
                let frames = Self::cover_frames_on_disk(unfinished.as_ref(), frames_before);
                return fail(self.sidecar, frames, format_error(&path)(error));
            }
        };
        // An encoding Ogg Opus writer's end granule is only known now.
        let frames = match granule_end {
            Some(frames) => frames,
            None if is_opus => self.opus_frames_after_finalize(frames_before),
            None => frames_before,
        };
        let summary = (|| {
            if self.fsync {
                file.sync_data().map_err(io_error("syncing", &path))?;
            }
            let bytes = fs::metadata(&path)
                .map_err(io_error("reading size of", &path))?
                .len();
            let sha256 = Self::sha256_of(&path).map_err(io_error("hashing", &path))?;
            Ok((bytes, sha256))
        })();
        let (bytes, sha256) = match summary {
            Ok(summary) => summary,
            Err(error) => return fail(self.sidecar, frames, error),
        };
        let duration_seconds = frames as f64 / f64::from(rate);

        let mut sidecar = self.sidecar;
        sidecar.complete(SystemTime::now(), frames, duration_seconds, &sha256);
        if let Some(error) = session_error {
            sidecar.session_failed(error);
        }
        sidecar.write(&self.sidecar_path)?;

        // With an object store: the rest of the file and the sidecar go up
        // now; the message says where the object is, and whether it is
        // there yet (if the store is slow or down, the upload goes on from
        // the spool in the background).
        let uploaded = self.upload.take().map(|upload| {
            let finishing = upload.finish(bytes, file_name(&self.sidecar_path));
            match finishing.wait(UPLOAD_WAIT) {
                Some(Ok(_)) => true,
                Some(Err(error)) => {
                    tracing::warn!(%error, "recording not uploaded yet");
                    false
                }
                None => false,
            }
        });

        Ok(vec![ServerMessage::Recording(Box::new(RecordingInfo {
            path: path.display().to_string(),
            sidecar_path: self.sidecar_path.display().to_string(),
            duration_seconds,
            sample_frames: frames,
            sample_rate: rate,
            channels: self.channels,
            format: self.record_format.name(),
            sample_format: self.sample_format,
            channel: self.channel,
            sink: self.instance,
            bytes,
            sha256,
            url: crate::recordings::file_url(
                &self.session_id,
                &file_name(&path).unwrap_or_default(),
            ),
            uri: self.uri,
            uploaded,
        }))])
    }

    /// The decoded length of a finished Ogg Opus file: passthrough, what
    /// the packets held; encoded, exactly the PCM given.
    fn opus_frames_after_finalize(&self, passthrough_frames: u64) -> u64 {
        match self.opening {
            Opening::OpusEncode { .. } => {
                self.frames_written * 48_000 / u64::from(self.sample_rate.max(1))
            }
            _ => passthrough_frames,
        }
    }
}

/// A serial number for an Ogg stream, from its path and the clock: unique
/// enough for one logical stream per file (RFC 3533 asks no more).
fn rand_serial(path: &Path) -> u32 {
    let mut hasher = Sha256::new();
    hasher.update(path.as_os_str().as_encoded_bytes());
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    hasher.update(now.as_nanos().to_le_bytes());
    let digest = hasher.finalize();
    u32::from_le_bytes([digest[0], digest[1], digest[2], digest[3]])
}

impl FileSide for RecordingFile {
    fn write_samples(&mut self, samples: &[f32]) -> Result<(), SinkError> {
        let path = self.path.clone();
        self.writer()?.write(samples).map_err(format_error(&path))?;
        self.frames_written += (samples.len() / usize::from(self.channels).max(1)) as u64;
        Ok(())
    }

    fn write_silence(&mut self, samples: usize) -> Result<(), SinkError> {
        let path = self.path.clone();
        self.writer()?
            .write_silence(samples)
            .map_err(format_error(&path))?;
        self.frames_written += (samples / usize::from(self.channels).max(1)) as u64;
        Ok(())
    }

    fn write_packets(&mut self, packets: &[OpusPacket]) -> Result<(), SinkError> {
        let path = self.path.clone();
        if let Opening::OpusPassthrough { pre_skip, .. } = self.opening {
            self.opus_pre_skip_48k = u64::from(pre_skip);
        }
        self.writer()?
            .write_packets(packets)
            .map_err(format_error(&path))
    }

    fn checkpoint(&mut self) -> Result<(), SinkError> {
        let Some(writer) = &mut self.writer else {
            return Ok(());
        };
        writer.checkpoint().map_err(format_error(&self.path))?;
        if self.fsync {
            writer
                .file()
                .sync_data()
                .map_err(io_error("syncing", &self.path))?;
        }
        if let Some(upload) = &mut self.upload {
            // Past the header region, the file only grows: what is on disk
            // now can go up in whole parts.
            if let Ok(bytes) = writer.durable_bytes() {
                upload.durable(bytes);
            }
        }
        Ok(())
    }

    fn failed(self, reason: &str) {
        self.close_failed(reason);
    }
}

impl Sink for Recorder {
    fn name(&self) -> &'static str {
        NAME
    }

    fn output_format(&self) -> OutputFormat {
        self.output
    }

    fn takes_opus_packets(&self) -> bool {
        self.takes_packets
    }

    fn write(&mut self, block: &AudioBlock, now: Instant) -> Result<(), SinkError> {
        if self.record_format == RecordFormat::Wav {
            let bytes_per_sample = self.wav_format.bytes_per_sample();
            let new_bytes = block.frames as u64 * u64::from(self.channels) * bytes_per_sample;
            let have_bytes = self.frames_queued * u64::from(self.channels) * bytes_per_sample;
            if have_bytes + new_bytes > MAX_WAV_DATA_BYTES {
                return Err(SinkError::Failed {
                    sink: NAME,
                    message: format!(
                        "recording reached the 4 GiB limit of the WAV format after {} s",
                        self.frames_queued / u64::from(self.sample_rate)
                    ),
                });
            }
        }
        if self.frames_queued == 0 {
            // The header interval counts from the first audio.
            self.last_flush = now;
        }
        match &block.samples {
            BlockSamples::Audio(samples) => {
                if self.batch.capacity() == 0 {
                    self.batch.reserve_exact(BATCH_SAMPLES);
                }
                self.batch.extend_from_slice(samples);
                if self.batch.len() >= BATCH_SAMPLES {
                    self.hand_over(None);
                }
            }
            BlockSamples::Silence => {
                let samples = block.frames * usize::from(self.channels);
                self.hand_over(Some(Job::Silence(samples)));
            }
        }
        self.frames_queued += block.frames as u64;
        self.after_audio(now);
        Ok(())
    }

    fn write_packets(&mut self, packets: &[OpusPacket], now: Instant) -> Result<(), SinkError> {
        if packets.is_empty() {
            return Ok(());
        }
        if self.frames_queued == 0 {
            self.last_flush = now;
        }
        for packet in packets {
            let (bytes, frames) = match packet {
                OpusPacket::Data {
                    data, frames_48k, ..
                } => (data.len(), u64::from(*frames_48k)),
                OpusPacket::Lost { frames_48k } => (0, *frames_48k),
            };
            self.packet_bytes += bytes;
            self.frames_queued += frames;
            self.packets.push(packet.clone());
        }
        // About as much as a batch of samples holds back.
        if self.packet_bytes >= BATCH_SAMPLES {
            self.hand_over(None);
        }
        self.after_audio(now);
        Ok(())
    }

    /// `flushed` once the file's header covers everything before the flush.
    fn flush(&mut self, now: Instant) -> Result<Completion, SinkError> {
        self.checkpoint(now, Report::Flushed);
        Ok(Completion::Later)
    }

    fn session_failed(&mut self, error: &str) {
        self.session_error = Some(error.to_owned());
    }

    /// The header is patched to cover what was handed over (and with
    /// `recorder.fsync`, synced) before the ack goes out: a crash after the
    /// ack loses none of it.
    fn commit(&mut self, now: Instant) -> Result<Completion, SinkError> {
        if !self.dirty {
            return Ok(Completion::Done);
        }
        self.checkpoint(now, Report::Committed);
        Ok(Completion::Later)
    }

    fn pending_bytes(&self) -> usize {
        self.io.pending_bytes() + std::mem::size_of_val(self.batch.as_slice()) + self.packet_bytes
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.dirty.then(|| self.last_flush + self.flush_interval)
    }

    fn on_deadline(&mut self, now: Instant) -> Result<(), SinkError> {
        if self.dirty {
            self.checkpoint(now, Report::Nothing);
        }
        Ok(())
    }

    fn abort(mut self: Box<Self>, reason: &str) {
        self.hand_over(None);
        if let Some(file) = self.io.into_file() {
            file.close_failed(reason);
        }
    }

    fn finish(mut self: Box<Self>) -> Result<Vec<ServerMessage>, SinkError> {
        self.hand_over(None);
        match self.io.into_file() {
            Some(file) => file.close(self.session_error.as_deref()),
            // The file failed: that was reported, and it was closed then.
            None => Ok(Vec::new()),
        }
    }
}
