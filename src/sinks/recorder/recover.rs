//! Repairs, at startup, the recordings a crash left unfinished.
//!
//! A killed server leaves each open recording as a WAV whose header covers
//! only the audio up to its last checkpoint (`recorder.flush_interval_ms`),
//! though more whole frames may be on disk, beside a sidecar that still says
//! `"complete": false` with no `ended_at` (a recorder that ended, well or
//! not, always sets it). For each such pair this makes the header cover every
//! whole sample frame on disk (a partial frame at the end is cut off) and
//! rewrites the sidecar with the true length, `ended_at` (the WAV's last
//! modification), `"complete": false` and `"error": "recovered after
//! crash"`. A crash between creating a WAV and its first sidecar leaves a WAV
//! without audio and without sidecar, and an interrupted sidecar write a
//! `.json.tmp`: both are removed.
//!
//! A live recorder holds an exclusive lock (`flock`) on its WAV, released by
//! the kernel when its process dies: a recording whose lock is taken belongs
//! to another server sharing the directory, and is left alone.
//!
//! FLAC and Ogg Opus recordings (named by the sidecar's `file_format`) need
//! no header patched to play: a torn frame or page at the end is cut off
//! (FLAC's STREAMINFO keeps its unknown length), and the sidecar is repaired
//! as for WAV. Leftovers without a sidecar are only looked for among WAVs.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use super::format::{flac, ogg, RecordFormat};
use super::sidecar::Sidecar;
use super::wav::{self, WavHead};
use crate::sinks::SinkError;

/// The sidecar's `error` after a repair.
pub const RECOVERED_ERROR: &str = "recovered after crash";

/// Bytes read to find the header: ours are 44 or 68 bytes.
const HEAD_BYTES: u64 = 4096;
/// Sidecars larger than this are not ours (client metadata is bounded by the
/// message size limit).
const MAX_SIDECAR_BYTES: u64 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a recording's sidecar: {reason}")]
    NotASidecar { path: PathBuf, reason: String },
    #[error("{path} is not a WAV file of ours: {reason}")]
    NotAWav { path: PathBuf, reason: &'static str },
    #[error("{path} is not a {format} file of ours: {reason}")]
    NotOurs {
        path: PathBuf,
        format: &'static str,
        reason: &'static str,
    },
    #[error(transparent)]
    Sidecar(#[from] SinkError),
}

fn io_error(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RecoverError {
    let path = path.to_path_buf();
    move |source| RecoverError::Io {
        action,
        path,
        source,
    }
}

/// What one pass did, for the log.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Recovery {
    /// Unfinished recordings repaired.
    pub repaired: usize,
    /// Leftovers removed: WAVs without audio or sidecar, `.json.tmp` files.
    pub removed: usize,
    /// Unfinished recordings another live process holds.
    pub live_elsewhere: usize,
    /// Files that could not be handled (each logged).
    pub failed: usize,
}

/// Repairs every unfinished recording in `dir` (see the module doc). Errors
/// are per file: logged, counted, and the rest goes on.
pub fn recover_unfinished(dir: &Path) -> Recovery {
    let started = Instant::now();
    let mut recovery = Recovery::default();
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) => {
            tracing::warn!(dir = %dir.display(), %error, "cannot look for unfinished recordings");
            recovery.failed += 1;
            return recovery;
        }
    };
    // Sidecars first: an orphan is a WAV or `.json.tmp` whose sidecar is
    // missing, which only holds once the sidecars have been seen.
    let mut orphans = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        let outcome = if let Some(stem) = name.strip_suffix(".json") {
            recover_one(dir, stem, &path)
        } else if name.ends_with(".wav") || name.ends_with(".json.tmp") {
            orphans.push(path);
            continue;
        } else {
            continue;
        };
        match outcome {
            Ok(Outcome::Repaired) => recovery.repaired += 1,
            Ok(Outcome::LiveElsewhere) => recovery.live_elsewhere += 1,
            Ok(Outcome::NothingToDo) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot recover a recording");
                recovery.failed += 1;
            }
        }
    }
    for path in orphans {
        match remove_orphan(&path) {
            Ok(true) => recovery.removed += 1,
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot remove a leftover recording file");
                recovery.failed += 1;
            }
        }
    }
    if recovery != Recovery::default() {
        tracing::info!(
            dir = %dir.display(),
            repaired = recovery.repaired,
            removed = recovery.removed,
            live_elsewhere = recovery.live_elsewhere,
            failed = recovery.failed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "unfinished recordings recovered"
        );
    }
    recovery
}

enum Outcome {
    Repaired,
    LiveElsewhere,
    NothingToDo,
}

/// Opens `path` for repair and takes its lock; `None` if a live process
/// holds it.
fn open_locked(path: &Path) -> Result<Option<File>, RecoverError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .map_err(io_error("opening", path))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Ok(None),
        // A file system without locks: no other server can be told apart.
        Err(TryLockError::Error(error)) => {
            tracing::debug!(path = %path.display(), %error, "cannot lock; recovering anyway");
            Ok(Some(file))
        }
    }
}

fn read_head(file: &File, path: &Path) -> Result<(WavHead, u64), RecoverError> {
    let len = file
        .metadata()
        .map_err(io_error("reading size of", path))?
        .len();
    let mut head = Vec::new();
    file.take(HEAD_BYTES)
        .read_to_end(&mut head)
        .map_err(io_error("reading", path))?;
    let head = wav::parse_head(&head).map_err(|reason| RecoverError::NotAWav {
        path: path.to_path_buf(),
        reason,
    })?;
    Ok((head, len))
}

/// Repairs the recording whose sidecar is `sidecar_path` (`<stem>.json`),
/// if it is unfinished.
fn recover_one(dir: &Path, stem: &str, sidecar_path: &Path) -> Result<Outcome, RecoverError> {
    let mut bytes = Vec::new();
    File::open(sidecar_path)
        .map_err(io_error("opening", sidecar_path))?
        .take(MAX_SIDECAR_BYTES)
        .read_to_end(&mut bytes)
        .map_err(io_error("reading", sidecar_path))?;
    let mut sidecar: Sidecar =
        serde_json::from_slice(&bytes).map_err(|e| RecoverError::NotASidecar {
            path: sidecar_path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if !sidecar.is_unfinished() {
        return Ok(Outcome::NothingToDo);
    }
    // The file name comes from the sidecar's own name (and one of our
    // extensions), never its contents.
    let format = RecordFormat::parse(sidecar.file_format()).unwrap_or_default();
    let wav_path = dir.join(format!("{stem}.{}", format.extension()));
    let Some(file) = open_locked(&wav_path)? else {
        return Ok(Outcome::LiveElsewhere);
    };
    let ended_at = file
        .metadata()
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| SystemTime::now());
    let (frames, sample_rate) = match format {
        RecordFormat::Wav => {
            let (head, _) = read_head(&file, &wav_path)?;
            let frames = wav::cover_frames_on_disk(&file, head.layout)
                .map_err(io_error("patching the header of", &wav_path))?;
            (frames, head.sample_rate)
        }
        RecordFormat::Flac | RecordFormat::OggOpus => {
            let frames = cut_to_whole_units(&file, &wav_path, format)?;
            (frames, sidecar.sample_rate().max(1))
        }
    };
    let duration_seconds = frames as f64 / f64::from(sample_rate);
    sidecar.fail(ended_at, frames, duration_seconds, RECOVERED_ERROR);
    sidecar.write(sidecar_path)?;
    remove_if_present(&sidecar_path.with_extension("json.tmp"))?;
    tracing::info!(
        recording = %wav_path.display(),
        sample_frames = frames,
        duration_seconds,
        "recovered a recording left unfinished by a crash"
    );
    Ok(Outcome::Repaired)
}

/// Cuts a FLAC or Ogg Opus file after its last whole frame or page (a torn
/// one, the write a crash cut short, goes); returns the sample frames it
/// then holds (Ogg Opus: 48 kHz samples after the pre-skip).
fn cut_to_whole_units(file: &File, path: &Path, format: RecordFormat) -> Result<u64, RecoverError> {
    let mut bytes = Vec::new();
    let mut reader = file;
    reader
        .read_to_end(&mut bytes)
        .map_err(io_error("reading", path))?;
    let not_ours = |reason| RecoverError::NotOurs {
        path: path.to_path_buf(),
        format: format.name(),
        reason,
    };
    let (keep, frames) = match format {
        RecordFormat::Flac => {
            flac::whole_frames(&bytes).ok_or_else(|| not_ours("no FLAC header"))?
        }
        _ => {
            let keep = ogg::whole_pages_len(&bytes);
            if keep == 0 {
                return Err(not_ours("no whole Ogg page"));
            }
            // OpusHead's pre-skip: bytes 10..12 of the first page's packet.
            let pre_skip = bytes
                .get(28 + 10..28 + 12)
                .map_or(0, |b| u64::from(u16::from_le_bytes([b[0], b[1]])));
            let granule = ogg::last_granule(&bytes[..keep]).unwrap_or(0);
            (keep, granule.saturating_sub(pre_skip))
        }
    };
    if (keep as u64) < bytes.len() as u64 {
        file.set_len(keep as u64)
            .map_err(io_error("truncating", path))?;
    }
    Ok(frames)
}

/// Removes `path`, a WAV or `.json.tmp`, if it is a crash's leftover: its
/// sidecar is missing, and (a WAV) it holds no audio and no process holds
/// it. Returns whether it was removed.
fn remove_orphan(path: &Path) -> Result<bool, RecoverError> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let (stem, is_wav) = match name.strip_suffix(".wav") {
        Some(stem) => (stem, true),
        None => (name.strip_suffix(".json.tmp").unwrap_or(name), false),
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    // Gone already: a `.json.tmp` removed with its WAV.
    if !path.exists() || dir.join(format!("{stem}.json")).exists() {
        return Ok(false);
    }
    let wav_path = dir.join(format!("{stem}.wav"));
    if is_wav {
        let Some(file) = open_locked(path)? else {
            return Ok(false);
        };
        let (head, len) = read_head(&file, path)?;
        let audio_bytes = len.saturating_sub(head.layout.data_start);
        if audio_bytes >= head.layout.frame_bytes {
            tracing::warn!(path = %path.display(), "a WAV with audio but no sidecar: left as it is");
            return Ok(false);
        }
    } else if wav_path.exists() {
        // Its WAV decides (it is seen on its own).
        return Ok(false);
    }
    remove_if_present(path)?;
    if is_wav {
        remove_if_present(&dir.join(format!("{stem}.json.tmp")))?;
    }
    tracing::info!(path = %path.display(), "removed a crash's leftover recording file");
    Ok(true)
}

fn remove_if_present(path: &Path) -> Result<(), RecoverError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("removing", path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Encoding, Framing, StreamFormat};
    use crate::sinks::SinkContext;
    use serde_json::Value;

    const RATE: u32 = 16_000;

    fn sidecar(dir: &Path, stem: &str) -> Sidecar {
        let context = SinkContext {
            session_id: stem.to_owned(),
            format: StreamFormat {
                encoding: Encoding::PcmS16le,
                sample_rate: RATE,
                channels: 2,
                framing: Framing::Raw,
            },
            metadata: serde_json::Map::new(),
            started_at: SystemTime::now(),
            record_format: None,
            opus_pre_skip: 0,
        };
        Sidecar::new(
            &context,
            &dir.join(format!("{stem}.wav")),
            "wav",
            "s16",
            RATE,
            2,
            None,
        )
    }

    /// A stereo s16 WAV of `frames` frames whose header counts only
    /// `covered`, followed by `extra` stray bytes, as a crash leaves it.
    fn crashed_wav(path: &Path, frames: u32, covered: u32, extra: usize) -> Vec<i16> {
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: RATE,
            bits_per_sample: 16,
            sample_format: hound::SampleFormat::Int,
        };
        let samples: Vec<i16> = (0..frames as i32 * 2)
            .map(|i| (i * 7 % 3000) as i16)
            .collect();
        let mut w = hound::WavWriter::create(path, spec).unwrap();
        for &s in &samples {
            w.write_sample(s).unwrap();
        }
        w.finalize().unwrap();
        let mut bytes = fs::read(path).unwrap();
        bytes[4..8].copy_from_slice(&(36 + covered * 4).to_le_bytes());
        bytes[40..44].copy_from_slice(&(covered * 4).to_le_bytes());
        bytes.extend(std::iter::repeat_n(0x55, extra));
        fs::write(path, bytes).unwrap();
        samples
    }

    fn json(path: &Path) -> Value {
        serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
    }

    #[test]
    fn unfinished_recordings_are_repaired_and_the_rest_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();

        // Unfinished: 1000 frames on disk, the header covers 200, and 3
        // bytes of a frame the crash cut short; a `.json.tmp` beside it.
        let samples = crashed_wav(&d.join("a.wav"), 1000, 200, 3);
        sidecar(d, "a").write_first(&d.join("a.json")).unwrap();
        fs::write(d.join("a.json.tmp"), b"").unwrap();

        // Finished and failed recordings: not touched, whatever their WAVs say.
        crashed_wav(&d.join("done.wav"), 100, 50, 0);
        let mut done = sidecar(d, "done");
        done.complete(SystemTime::now(), 50, 50.0 / f64::from(RATE), "00");
        done.write(&d.join("done.json")).unwrap();
        crashed_wav(&d.join("failed.wav"), 100, 50, 0);
        let mut failed = sidecar(d, "failed");
        failed.fail(SystemTime::now(), 50, 0.0, "disk on fire");
        failed.write(&d.join("failed.json")).unwrap();

        // Held by a live recorder elsewhere (its lock is taken).
        crashed_wav(&d.join("live.wav"), 100, 50, 0);
        sidecar(d, "live")
            .write_first(&d.join("live.json"))
            .unwrap();
        let live_lock = File::open(d.join("live.wav")).unwrap();
        live_lock.lock().unwrap();

        // A crash between the WAV and its first sidecar: a header, no audio.
        crashed_wav(&d.join("orphan.wav"), 0, 0, 1);
        fs::write(d.join("orphan.json.tmp"), b"{").unwrap();
        // A WAV with audio but no sidecar, a stray `.json.tmp`, a damaged
        // sidecar and a stranger's file.
        crashed_wav(&d.join("stranger.wav"), 10, 0, 0);
        fs::write(d.join("stray.json.tmp"), b"").unwrap();
        fs::write(d.join("broken.json"), b"{\"complete\": fal").unwrap();
        fs::write(d.join("notes.txt"), b"hello").unwrap();

        let untouched = [
            "done.wav",
            "done.json",
            "failed.wav",
            "failed.json",
            "live.wav",
        ]
        .map(|n| (n, fs::read(d.join(n)).unwrap()));
        let live_sidecar = fs::read(d.join("live.json")).unwrap();

        let recovery = recover_unfinished(d);
        assert_eq!(
            recovery,
            Recovery {
                repaired: 1,
                removed: 2,
                live_elsewhere: 1,
                failed: 1,
            }
        );

        // The header covers all 1000 whole frames; the partial one is gone.
        let wav = fs::read(d.join("a.wav")).unwrap();
        assert_eq!(wav.len(), 44 + 1000 * 4);
        let mut reader = hound::WavReader::open(d.join("a.wav")).unwrap();
        let read: Vec<i16> = reader.samples::<i16>().map(|s| s.unwrap()).collect();
        assert!(read == samples);
        let a = json(&d.join("a.json"));
        assert_eq!(a["complete"], false);
        assert_eq!(a["error"], RECOVERED_ERROR);
        assert_eq!(a["sample_frames"], 1000);
        assert_eq!(a["duration_seconds"], 1000.0 / f64::from(RATE));
        assert!(a["ended_at"].is_string());
        assert_eq!(a["session_id"], "a");
        assert!(!d.join("a.json.tmp").exists());

        for (name, before) in &untouched {
            assert!(fs::read(d.join(name)).unwrap() == *before, "{name} changed");
        }
        assert_eq!(fs::read(d.join("live.json")).unwrap(), live_sidecar);
        assert!(!d.join("orphan.wav").exists() && !d.join("orphan.json.tmp").exists());
        assert!(!d.join("stray.json.tmp").exists());
        assert!(d.join("stranger.wav").exists() && d.join("broken.json").exists());
        assert!(d.join("notes.txt").exists());

        // Once the live one's process is gone, the next start repairs it;
        // after that, a start has nothing left to do.
        drop(live_lock);
        let again = recover_unfinished(d);
        assert_eq!((again.repaired, again.removed, again.failed), (1, 0, 1));
        assert_eq!(json(&d.join("live.json"))["sample_frames"], 100);
        let a_before = fs::read(d.join("a.json")).unwrap();
        let third = recover_unfinished(d);
        assert_eq!((third.repaired, third.removed, third.failed), (0, 0, 1));
        assert_eq!(fs::read(d.join("a.json")).unwrap(), a_before);
    }

    #[test]
    fn a_missing_directory_is_reported_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let recovery = recover_unfinished(&dir.path().join("nope"));
        assert_eq!(recovery.failed, 1);
    }
}
