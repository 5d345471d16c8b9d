//! The JSON file beside each recording.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::SystemTime;

use serde::Serialize;
use serde_json::{Map, Value};

use super::{io_error, NAME};
use crate::protocol::StreamFormat;
use crate::sinks::{SinkContext, SinkError};

#[derive(Debug, Clone, Serialize)]
pub struct Sidecar {
    session_id: String,
    /// File name of the WAV, relative to the sidecar.
    recording: String,
    /// The stream as the client sent it.
    format: StreamFormat,
    /// The WAV file's own rate and channels (after any conversion).
    sample_rate: u32,
    channels: u16,
    /// Which channel of the stream this file holds, when split per channel.
    channel: Option<u16>,
    sample_format: &'static str,
    metadata: Map<String, Value>,
    started_at: String,
    ended_at: Option<String>,
    duration_seconds: Option<f64>,
    sample_frames: Option<u64>,
    sha256: Option<String>,
    /// False until the session ended cleanly: a crashed session's sidecar
    /// stays false, and its WAV holds what was checkpointed.
    complete: bool,
    /// Why the recording stopped early, if it did.
    error: Option<String>,
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

impl Sidecar {
    pub fn new(
        context: &SinkContext,
        wav_path: &Path,
        sample_format: &'static str,
        sample_rate: u32,
        channels: u16,
        channel: Option<u16>,
    ) -> Self {
        Self {
            session_id: context.session_id.clone(),
            recording: wav_path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            format: context.format,
            sample_rate,
            channels,
            channel,
            sample_format,
            metadata: context.metadata.clone(),
            started_at: rfc3339(context.started_at),
            ended_at: None,
            duration_seconds: None,
            sample_frames: None,
            sha256: None,
            complete: false,
            error: None,
        }
    }

    pub fn complete(
        &mut self,
        ended_at: SystemTime,
        sample_frames: u64,
        duration_seconds: f64,
        sha256: &str,
    ) {
        self.ended_at = Some(rfc3339(ended_at));
        self.sample_frames = Some(sample_frames);
        self.duration_seconds = Some(duration_seconds);
        self.sha256 = Some(sha256.to_owned());
        self.complete = true;
    }

    /// The file is whole, but the session it records ended in an error:
    /// audio the client sent may be missing from it.
    pub fn session_failed(&mut self, error: &str) {
        self.error = Some(error.to_owned());
        self.complete = false;
    }

    pub fn fail(&mut self, ended_at: SystemTime, sample_frames: u64, error: &str) {
        self.ended_at = Some(rfc3339(ended_at));
        self.sample_frames = Some(sample_frames);
        self.error = Some(error.to_owned());
        self.complete = false;
    }

    /// Writes to a temporary name and renames, so a reader never sees half a file.
    pub fn write(&self, path: &Path) -> Result<(), SinkError> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| SinkError::Failed {
            sink: NAME,
            message: format!("encoding sidecar: {e}"),
        })?;
        let tmp = path.with_extension("json.tmp");
        let mut file = fs::File::create(&tmp).map_err(io_error("creating", &tmp))?;
        file.write_all(&json).map_err(io_error("writing", &tmp))?;
        fs::rename(&tmp, path).map_err(io_error("renaming into", path))?;
        Ok(())
    }
}
