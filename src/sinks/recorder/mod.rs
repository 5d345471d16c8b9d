//! The crash-safe WAV recorder.
//!
//! One `<session_id>.wav` per session, beside a `<session_id>.json` sidecar.
//! The session calls the recorder in place for every block; the recorder
//! only copies the samples into a batch. The file work (writing, header
//! checkpoints, `fsync`, the sidecars, finalizing) runs on tokio's blocking
//! pool through a per-recording queue ([`offthread`]), so a slow or full disk
//! holds up only its own recordings, never an async worker.
//!
//! Durability: before every `ack`, the header is patched to cover all audio
//! handed over (and synced with `recorder.fsync`), and the ack waits for it;
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
mod offthread;
pub mod recover;
mod sidecar;
mod wav;

use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use std::sync::Arc;

use super::registry::Emitter;
use super::{Completion, Sink, SinkContext, SinkError};
use crate::pipeline::convert::{Layout, OutputFormat};
use crate::pipeline::{AudioBlock, BlockSamples};
use crate::protocol::{Encoding, ErrorCode, RecordingInfo, ServerMessage};
use crate::storage::upload::{Upload, Uploader};
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
    /// With an object store: streams each recording there while it is
    /// written (`dir` is then the spool).
    pub uploader: Option<Arc<Uploader>>,
}

/// How long the end of a session waits for its recording's upload to
/// complete before it reports the recording as still uploading (the upload
/// goes on in the background).
const UPLOAD_WAIT: Duration = Duration::from_secs(10);

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

/// The last component of a path the recorder made (always a file name).
fn file_name(path: &Path) -> Option<String> {
    path.file_name().map(|n| n.to_string_lossy().into_owned())
}

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
    format: WavFormat,
    /// Frames handed over (queued or written).
    frames_queued: u64,
    /// Samples not yet queued.
    batch: Vec<f32>,
    /// Queued audio the header does not cover yet.
    dirty: bool,
    last_flush: Instant,
    flush_interval: Duration,
    io: OffThread<RecordingFile>,
    /// Why the session failed, if it did: the sidecar says so.
    session_error: Option<String>,
}

/// The file side of one recording, used only by its queue's drain job (or
/// by `finish`/`abort` on the blocking pool).
struct RecordingFile {
    channel: Option<u16>,
    /// `None` until the first block.
    wav: Option<WavWriter>,
    wav_path: PathBuf,
    sidecar: Sidecar,
    sidecar_path: PathBuf,
    format: WavFormat,
    channels: u16,
    sample_rate: u32,
    /// Frames written to the file.
    frames_written: u64,
    fsync: bool,
    /// The `[sinks.<name>]` instance, named in `recording`.
    instance: Option<String>,
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
        let sidecar = Sidecar::new(
            context,
            &wav_path,
            format.name(),
            sample_rate,
            channels,
            channel,
        );
        let file_name = format!("{stem}.wav");
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
            wav: None,
            wav_path,
            sidecar,
            sidecar_path,
            format,
            channels,
            sample_rate,
            frames_written: 0,
            fsync: settings.fsync,
            instance: settings.instance.clone(),
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
            format,
            frames_queued: 0,
            batch: Vec::new(),
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
        let jobs = batch.into_iter().chain(then);
        self.io.submit(jobs);
    }

    /// Queues a header checkpoint after everything handed over so far.
    fn checkpoint(&mut self, now: Instant, report: Report) {
        self.hand_over(Some(Job::Checkpoint(report)));
        self.dirty = false;
        self.last_flush = now;
    }
}

impl RecordingFile {
    /// Creates the WAV (header written) and the first sidecar. A recording
    /// that cannot be started (a full disk) leaves no file.
    fn open(&self) -> Result<WavWriter, SinkError> {
        let path = &self.wav_path;
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
        WavWriter::create(file, self.channels, self.sample_rate, self.format)
            .map_err(wav_error)
            .and_then(|wav| self.sidecar.write_first(&self.sidecar_path).map(|()| wav))
            .inspect_err(|_| {
                let _ = fs::remove_file(path);
            })
    }

    fn wav(&mut self) -> Result<&mut WavWriter, SinkError> {
        if self.wav.is_none() {
            self.wav = Some(self.open()?);
        }
        self.wav.as_mut().ok_or_else(|| SinkError::Failed {
            sink: NAME,
            message: "the recording could not be opened".into(),
        })
    }

    /// After a failed write: makes the header cover what is on disk;
    /// returns the frames it then covers (`written` if it cannot be patched).
    fn cover_frames_on_disk(unfinished: &Unfinished, written: u64) -> u64 {
        unfinished.cover_frames_on_disk().unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot patch the WAV header of a failed recording");
            written
        })
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
    fn close_failed(self, reason: &str) {
        // No audio, no file (or it could not be made): nothing to mark.
        let Some(wav) = self.wav else {
            return;
        };
        let frames = match wav.finalize() {
            // The header covers every sample written.
            Ok(_) => self.frames_written,
            Err((error, unfinished)) => {
                tracing::warn!(%error, "cannot finalize the WAV of a failed recording");
                Self::cover_frames_on_disk(&unfinished, self.frames_written)
            }
        };
        Self::record_failure(
            self.sidecar,
            &self.sidecar_path,
            frames,
            self.sample_rate,
            reason,
        );
        // What was kept goes to the store too (not waited for: the session
        // has failed and reports no recording).
        if let Some(upload) = self.upload {
            let len = fs::metadata(&self.wav_path).map_or(0, |m| m.len());
            let _ = upload.finish(len, file_name(&self.sidecar_path));
        }
    }

    /// The end of a recording: the header final, the hash, the sidecar, and
    /// the `recording` message.
    fn close(self, session_error: Option<&str>) -> Result<Vec<ServerMessage>, SinkError> {
        // No audio: no file, and no `recording` to report.
        let Some(wav) = self.wav else {
            return Ok(Vec::new());
        };
        let path = &self.wav_path;
        let upload = self.upload;
        let fail = |sidecar, frames, error: SinkError| {
            let reason = error.to_string();
            Self::record_failure(
                sidecar,
                &self.sidecar_path,
                frames,
                self.sample_rate,
                &reason,
            );
            Err(error)
        };
        let file = match wav.finalize() {
            Ok(file) => file,
            Err((error, unfinished)) => {
                let frames = Self::cover_frames_on_disk(&unfinished, self.frames_written);
                return fail(self.sidecar, frames, wav_error(error));
            }
        };
        let summary = (|| {
            if self.fsync {
                file.sync_data().map_err(io_error("syncing", path))?;
            }
            let bytes = fs::metadata(path)
                .map_err(io_error("reading size of", path))?
                .len();
            let sha256 = Self::sha256_of(path).map_err(io_error("hashing", path))?;
            Ok((bytes, sha256))
        })();
        let (bytes, sha256) = match summary {
            Ok(summary) => summary,
            Err(error) => return fail(self.sidecar, self.frames_written, error),
        };
        let duration_seconds = self.frames_written as f64 / f64::from(self.sample_rate);

        let mut sidecar = self.sidecar;
        sidecar.complete(
            SystemTime::now(),
            self.frames_written,
            duration_seconds,
            &sha256,
        );
        if let Some(error) = session_error {
            sidecar.session_failed(error);
        }
        sidecar.write(&self.sidecar_path)?;

        // With an object store: the rest of the file and the sidecar go up
        // now; the message says where the object is, and whether it is
        // there yet (if the store is slow or down, the upload goes on from
        // the spool in the background).
        let uploaded = upload.map(|upload| {
            let finishing = upload.finish(bytes, file_name(&self.sidecar_path));
            match finishing.wait(UPLOAD_WAIT) {
                Some(Ok(_)) => true,
                Some(Err(error)) => {
                    tracing::warn!(%error, "recording not uploaded");
                    false
                }
                None => false,
            }
        });

        Ok(vec![ServerMessage::Recording(RecordingInfo {
            path: self.wav_path.display().to_string(),
            sidecar_path: self.sidecar_path.display().to_string(),
            duration_seconds,
            sample_frames: self.frames_written,
            sample_rate: self.sample_rate,
            channels: self.channels,
            sample_format: self.format.name(),
            channel: self.channel,
            sink: self.instance,
            bytes,
            sha256,
            url: crate::recordings::file_url(
                &self.session_id,
                &file_name(&self.wav_path).unwrap_or_default(),
            ),
            uri: self.uri,
            uploaded,
        })])
    }
}

impl FileSide for RecordingFile {
    fn write_samples(&mut self, samples: &[f32]) -> Result<(), SinkError> {
        self.wav()?.write(samples).map_err(wav_error)?;
        self.frames_written += (samples.len() / usize::from(self.channels).max(1)) as u64;
        Ok(())
    }

    fn write_silence(&mut self, samples: usize) -> Result<(), SinkError> {
        self.wav()?.write_silence(samples).map_err(wav_error)?;
        self.frames_written += (samples / usize::from(self.channels).max(1)) as u64;
        Ok(())
    }

    fn checkpoint(&mut self) -> Result<(), SinkError> {
        let Some(wav) = &mut self.wav else {
            return Ok(());
        };
        wav.checkpoint().map_err(wav_error)?;
        if self.fsync {
            wav.file()
                .sync_data()
                .map_err(io_error("syncing", &self.wav_path))?;
        }
        if let Some(upload) = &self.upload {
            // Past the header, the file only grows: what is on disk now can
            // go up in whole parts.
            if let Ok(meta) = wav.file().metadata() {
                upload.durable(meta.len());
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

    fn write(&mut self, block: &AudioBlock, now: Instant) -> Result<(), SinkError> {
        let new_bytes =
            block.frames as u64 * u64::from(self.channels) * self.format.bytes_per_sample();
        let have_bytes =
            self.frames_queued * u64::from(self.channels) * self.format.bytes_per_sample();
        if have_bytes + new_bytes > MAX_WAV_DATA_BYTES {
            return Err(SinkError::Failed {
                sink: NAME,
                message: format!(
                    "recording reached the 4 GiB limit of the WAV format after {} s",
                    self.frames_queued / u64::from(self.sample_rate)
                ),
            });
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
        self.dirty = true;
        if now.saturating_duration_since(self.last_flush) >= self.flush_interval {
            self.checkpoint(now, Report::Nothing);
        }
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
        self.io.pending_bytes() + std::mem::size_of_val(self.batch.as_slice())
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
