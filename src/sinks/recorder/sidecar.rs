//! The JSON file beside each recording.
//!
//! It is replaced atomically (a temporary file, renamed), which needs free
//! space. On a full disk the last one is written over the first in place
//! instead: the first is written with room to spare at its end, as trailing
//! whitespace (which JSON allows), so the end fields and the error fit
//! without the disk giving a single byte more.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{io_error, NAME};
use crate::protocol::StreamFormat;
use crate::sinks::{SinkContext, SinkError};

/// Read back only by crash recovery ([`super::recover`]).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sidecar {
    session_id: String,
    /// File name of the recording, relative to the sidecar.
    recording: String,
    /// `wav`, `flac` or `ogg_opus` (older sidecars, without it: `wav`).
    #[serde(default = "wav_name")]
    file_format: String,
    /// The stream as the client sent it.
    format: StreamFormat,
    /// The WAV file's own rate and channels (after any conversion).
    sample_rate: u32,
    channels: u16,
    /// Which channel of the stream this file holds, when split per channel.
    channel: Option<u16>,
    sample_format: String,
    metadata: Map<String, Value>,
    started_at: String,
    ended_at: Option<String>,
    duration_seconds: Option<f64>,
    sample_frames: Option<u64>,
    sha256: Option<String>,
    /// False until the session ended cleanly: a crashed session's sidecar
    /// stays false, with no `ended_at`, until the next start repairs it
    /// (`recover.rs`).
    complete: bool,
    /// Why the recording stopped early, if it did.
    error: Option<String>,
}

/// Room left at the end of the first sidecar for the last one's end fields
/// and error message (see the module doc).
const END_FIELDS_ROOM_BYTES: usize = 1024;

fn wav_name() -> String {
    "wav".to_owned()
}

fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

impl Sidecar {
    pub fn new(
        context: &SinkContext,
        wav_path: &Path,
        file_format: &'static str,
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
            file_format: file_format.to_owned(),
            format: context.format,
            sample_rate,
            channels,
            channel,
            sample_format: sample_format.to_owned(),
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

    /// The rate the sidecar's lengths count (the file's).
    pub fn sample_rate(&self) -> u32 {
        self.sample_rate
    }

    /// The recording's format, as its name.
    pub fn file_format(&self) -> &str {
        &self.file_format
    }

    /// Neither finished nor failed: its recorder never ended (the process died).
    pub fn is_unfinished(&self) -> bool {
        !self.complete && self.ended_at.is_none()
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

    /// `sample_frames`: the frames the WAV header covers.
    pub fn fail(
        &mut self,
        ended_at: SystemTime,
        sample_frames: u64,
        duration_seconds: f64,
        error: &str,
    ) {
        self.ended_at = Some(rfc3339(ended_at));
        self.sample_frames = Some(sample_frames);
        self.duration_seconds = Some(duration_seconds);
        self.error = Some(error.to_owned());
        self.complete = false;
    }

    fn json(&self) -> Result<Vec<u8>, SinkError> {
        serde_json::to_vec_pretty(self).map_err(|e| SinkError::Failed {
            sink: NAME,
            message: format!("encoding sidecar: {e}"),
        })
    }

    /// Writes the first sidecar, with room at its end for the last one
    /// (see the module doc). Leaves no file behind if it fails.
    pub fn write_first(&self, path: &Path) -> Result<(), SinkError> {
        let mut json = self.json()?;
        json.push(b'\n');
        json.resize(json.len() + END_FIELDS_ROOM_BYTES, b' ');
        replace_atomically(path, &json)
    }

    /// Replaces the sidecar atomically; when that fails (a full disk), writes
    /// over the old one in place, the error message shortened if it must be
    /// to fit the old one's length.
    pub fn write(&self, path: &Path) -> Result<(), SinkError> {
        let json = self.json()?;
        let Err(error) = replace_atomically(path, &json) else {
            return Ok(());
        };
        let fits = fs::metadata(path)
            .ok()
            .and_then(|m| usize::try_from(m.len()).ok())
            .and_then(|room| self.json_within(room));
        let Some(json) = fits else {
            return Err(error);
        };
        match overwrite_in_place(path, &json) {
            Ok(()) => {
                tracing::warn!(%error, "sidecar written in place instead");
                Ok(())
            }
            Err(_) => Err(error),
        }
    }

    /// The JSON, padded with spaces to exactly `room` bytes; the error
    /// message is shortened (at a character boundary, marked with `…`) as
    /// far as needed. `None` if it cannot be made to fit.
    fn json_within(&self, room: usize) -> Option<Vec<u8>> {
        let mut json = serde_json::to_vec_pretty(self).ok()?;
        if json.len() > room {
            let error = self.error.as_deref()?;
            let mut shorter = self.clone();
            let mut keep = error.len();
            while json.len() > room {
                // JSON escapes make the excess an upper bound of what to cut
                // only roughly: cut, measure again.
                if keep == 0 {
                    return None;
                }
                let excess = json.len() - room;
                keep = keep.saturating_sub(excess);
                while !error.is_char_boundary(keep) {
                    keep -= 1;
                }
                shorter.error = Some(format!("{}…", &error[..keep]));
                json = serde_json::to_vec_pretty(&shorter).ok()?;
            }
        }
        json.resize(room, b' ');
        Some(json)
    }
}

/// Writes to a temporary name and renames, so a reader never sees half a
/// file; the temporary file is removed if that fails.
fn replace_atomically(path: &Path, json: &[u8]) -> Result<(), SinkError> {
    let tmp = path.with_extension("json.tmp");
    let written = (|| {
        let mut file = fs::File::create(&tmp).map_err(io_error("creating", &tmp))?;
        file.write_all(json).map_err(io_error("writing", &tmp))?;
        fs::rename(&tmp, path).map_err(io_error("renaming into", path))
    })();
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written
}

/// Writes `json` over the start of the file at `path`, which is at least as
/// long: no new space is needed. Not atomic; only for when nothing else works.
fn overwrite_in_place(path: &Path, json: &[u8]) -> io::Result<()> {
    let mut file = OpenOptions::new().write(true).open(path)?;
    file.write_all(json)?;
    file.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Encoding, Framing, StreamFormat};
    use crate::sinks::SinkContext;

    fn sidecar(dir: &Path) -> Sidecar {
        let context = SinkContext {
            session_id: "s1".into(),
            format: StreamFormat {
                encoding: Encoding::PcmS16le,
                sample_rate: 16_000,
                channels: 1,
                framing: Framing::Raw,
            },
            metadata: Map::new(),
            started_at: SystemTime::now(),
            record_format: None,
            opus_pre_skip: 0,
        };
        Sidecar::new(&context, &dir.join("s1.wav"), "wav", "s16", 16_000, 1, None)
    }

    fn read(path: &Path) -> Value {
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn the_last_sidecar_is_written_in_place_when_a_new_file_cannot_be() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s1.json");
        let mut sidecar = sidecar(dir.path());
        sidecar.write_first(&path).unwrap();
        let first_len = fs::metadata(&path).unwrap().len();
        assert_eq!(read(&path)["ended_at"], Value::Null);

        // The temporary file cannot be made (as on a full disk).
        let tmp = path.with_extension("json.tmp");
        fs::create_dir(&tmp).unwrap();
        let long_error = format!("record: writing WAV: {}", "é".repeat(2_000));
        sidecar.fail(SystemTime::now(), 4_000, 0.25, &long_error);
        sidecar.write(&path).unwrap();

        let written = read(&path);
        assert_eq!(fs::metadata(&path).unwrap().len(), first_len, "grew");
        assert_eq!(written["complete"], false);
        assert_eq!(written["sample_frames"], 4_000);
        assert_eq!(written["duration_seconds"], 0.25);
        assert!(written["ended_at"].is_string());
        let error = written["error"].as_str().unwrap();
        assert!(error.starts_with("record: writing WAV: é"), "{error}");
        assert!(error.ends_with('…') && error.len() < long_error.len());
    }

    #[test]
    fn a_sidecar_that_cannot_be_written_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        // A directory in the way: the rename fails after the write.
        let path = dir.path().join("s1.json");
        fs::create_dir(&path).unwrap();
        fs::write(path.join("x"), b"x").unwrap();
        assert!(sidecar(dir.path()).write_first(&path).is_err());
        assert!(!path.with_extension("json.tmp").exists());
    }
}
