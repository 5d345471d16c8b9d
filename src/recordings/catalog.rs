//! The in-memory index of recorded sessions, built from the store's
//! listing and the sidecars it holds.
//!
//! Why an index refreshed on demand, at most every [`REFRESH_INTERVAL`]:
//! the recorder (and, for S3, the uploader; perhaps another server writing
//! to the same bucket) creates files without telling this module, and a
//! listing is the one view that is right for every store. Re-listing is one
//! directory read (local) or one LIST per 1,000 objects (S3), and only
//! sidecars whose size, time or ETag changed since the last listing are read
//! again, so a request costs at most one listing every two seconds, not one
//! read per sidecar. A recording thus shows up in the list at most
//! [`REFRESH_INTERVAL`] after its sidecar is written; the routes that name a
//! session (detail, download, delete) read its sidecars fresh.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt};
use serde::Deserialize;
use serde_json::{json, Map, Value};

use super::names::{classify, FileKind, TRANSCRIPT_SUFFIX};
use super::{is_not_found, RecordingsError};
use crate::storage::Storage;

/// The oldest a listing may be for `GET /v1/recordings`.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(2);
/// The oldest a listing may be when a route names a session the index does
/// not know (it may have started since): a short bound, so that requests
/// for made-up ids cannot make the server list the store continuously.
pub const MISS_REFRESH_INTERVAL: Duration = Duration::from_millis(250);
/// Sidecars are a few kilobytes; anything far larger is not one of ours.
const MAX_SIDECAR_BYTES: u64 = 1 << 20;
/// Largest transcript `GET /v1/recordings/<id>` returns.
pub const MAX_TRANSCRIPT_BYTES: u64 = 16 << 20;
/// Sidecars read at once while (re)building the index.
const PARALLEL_READS: usize = 16;

/// The sidecar fields the index needs (src/sinks/recorder/sidecar.rs writes
/// them; other fields are kept in the file and returned by the detail route).
#[derive(Debug, Clone, Deserialize)]
pub struct SidecarFields {
    pub session_id: String,
    /// The audio file's name, beside the sidecar.
    pub recording: String,
    #[serde(default)]
    pub metadata: Map<String, Value>,
    pub started_at: String,
    #[serde(default)]
    pub ended_at: Option<String>,
    #[serde(default)]
    pub duration_seconds: Option<f64>,
    #[serde(default)]
    pub complete: bool,
    #[serde(default)]
    pub channel: Option<u16>,
    #[serde(default)]
    pub channels: Option<u16>,
    #[serde(default)]
    pub sample_rate: Option<u32>,
    #[serde(default)]
    pub error: Option<String>,
}

impl SidecarFields {
    /// Neither finished nor failed: the recorder is still writing.
    pub fn in_progress(&self) -> bool {
        !self.complete && self.ended_at.is_none()
    }
}

/// One listed object, as the index uses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    pub bytes: u64,
    pub modified_ms: u64,
    pub e_tag: Option<String>,
}

impl Listed {
    fn from_meta(meta: &ObjectMeta) -> Option<Self> {
        Some(Self {
            name: meta.location.filename()?.to_owned(),
            bytes: meta.size,
            modified_ms: u64::try_from(meta.last_modified.timestamp_millis()).unwrap_or(0),
            e_tag: meta.e_tag.clone(),
        })
    }
}

/// One audio file of a session, from its sidecar.
#[derive(Debug, Clone, PartialEq)]
pub struct FileSummary {
    pub name: String,
    pub sidecar: String,
    pub content_type: &'static str,
    /// From the listing; `None` when the audio object is not there.
    pub bytes: Option<u64>,
    pub complete: bool,
    pub in_progress: bool,
    pub channel: Option<u16>,
    pub channels: Option<u16>,
    pub sample_rate: Option<u32>,
    pub duration_seconds: Option<f64>,
    pub error: Option<String>,
    pub ended_at: Option<String>,
}

/// A recorded session: its files and transcript.
#[derive(Debug, Clone, PartialEq)]
pub struct Session {
    pub session_id: String,
    /// Unix milliseconds: the earliest `started_at` of its sidecars (or the
    /// transcript's time, for a session transcribed but not recorded).
    pub started_ms: u64,
    pub started_at: String,
    pub ended_at: Option<String>,
    pub metadata: Map<String, Value>,
    pub files: Vec<FileSummary>,
    /// The transcript file's name, if there is one.
    pub transcript: Option<String>,
}

impl Session {
    pub fn in_progress(&self) -> bool {
        self.files.iter().any(|f| f.in_progress)
    }

    pub fn complete(&self) -> bool {
        !self.files.is_empty() && self.files.iter().all(|f| f.complete)
    }

    /// The object names of everything the session holds.
    pub fn object_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .files
            .iter()
            .flat_map(|f| [f.name.clone(), f.sidecar.clone()])
            .collect();
        names.extend(self.transcript.clone());
        names
    }

    /// The JSON of `GET /v1/recordings` (proto/schemas/http/).
    pub fn summary_json(&self) -> Value {
        let id = &self.session_id;
        let duration = self
            .files
            .iter()
            .filter_map(|f| f.duration_seconds)
            .reduce(f64::max);
        let files: Vec<Value> = self
            .files
            .iter()
            .map(|f| {
                json!({
                    "name": f.name,
                    "url": super::file_url(id, &f.name),
                    "content_type": f.content_type,
                    "bytes": f.bytes,
                    "complete": f.complete,
                    "in_progress": f.in_progress,
                    "channel": f.channel,
                    "channels": f.channels,
                    "sample_rate": f.sample_rate,
                    "duration_seconds": f.duration_seconds,
                    "error": f.error,
                })
            })
            .collect();
        json!({
            "session_id": id,
            "url": format!("/v1/recordings/{id}"),
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "duration_seconds": duration,
            "complete": self.complete(),
            "in_progress": self.in_progress(),
            "metadata": self.metadata,
            "files": files,
            "transcript": self.transcript.is_some(),
        })
    }
}

fn rfc3339_ms(ms: u64) -> String {
    let time = std::time::UNIX_EPOCH + Duration::from_millis(ms);
    humantime::format_rfc3339_millis(time).to_string()
}

/// Unix milliseconds of an RFC 3339 time.
fn unix_ms(text: &str) -> Option<u64> {
    let time = humantime::parse_rfc3339_weak(text).ok()?;
    let since = time.duration_since(std::time::UNIX_EPOCH).ok()?;
    u64::try_from(since.as_millis()).ok()
}

/// The sessions `listing` holds, newest first, from their sidecars (read
/// already: `sidecars` by sidecar name). Pure. A sidecar is used only if it
/// names a server-made audio file of its own session.
pub fn build_sessions(
    listing: &[Listed],
    sidecars: &HashMap<String, SidecarFields>,
) -> Vec<Session> {
    let by_name: HashMap<&str, &Listed> = listing.iter().map(|l| (l.name.as_str(), l)).collect();
    let mut sessions: HashMap<&str, Session> = HashMap::new();
    let mut transcripts: Vec<(&str, &Listed)> = Vec::new();
    for listed in listing {
        let Some(file) = classify(&listed.name) else {
            continue;
        };
        match file.kind {
            FileKind::Transcript => transcripts.push((file.session_id, listed)),
            FileKind::Audio(_) => {}
            FileKind::Sidecar => {
                let Some(sidecar) = sidecars.get(&listed.name) else {
                    continue;
                };
                let audio = classify(&sidecar.recording);
                let Some((FileKind::Audio(kind), audio_stem)) = audio.map(|a| (a.kind, a.stem))
                else {
                    continue;
                };
                let Some(started_ms) = unix_ms(&sidecar.started_at) else {
                    continue;
                };
                if sidecar.session_id != file.session_id || audio_stem != file.stem {
                    continue;
                }
                let session = sessions.entry(file.session_id).or_insert_with(|| Session {
                    session_id: file.session_id.to_owned(),
                    started_ms,
                    started_at: sidecar.started_at.clone(),
                    ended_at: sidecar.ended_at.clone(),
                    metadata: sidecar.metadata.clone(),
                    files: Vec::new(),
                    transcript: None,
                });
                if started_ms < session.started_ms {
                    session.started_ms = started_ms;
                    session.started_at = sidecar.started_at.clone();
                }
                session.files.push(FileSummary {
                    name: sidecar.recording.clone(),
                    sidecar: listed.name.clone(),
                    content_type: kind.content_type(),
                    bytes: by_name.get(sidecar.recording.as_str()).map(|l| l.bytes),
                    complete: sidecar.complete,
                    in_progress: sidecar.in_progress(),
                    channel: sidecar.channel,
                    channels: sidecar.channels,
                    sample_rate: sidecar.sample_rate,
                    duration_seconds: sidecar.duration_seconds,
                    error: sidecar.error.clone(),
                    ended_at: sidecar.ended_at.clone(),
                });
            }
        }
    }
    for (id, listed) in transcripts {
        let session = sessions.entry(id).or_insert_with(|| Session {
            session_id: id.to_owned(),
            started_ms: listed.modified_ms,
            started_at: rfc3339_ms(listed.modified_ms),
            ended_at: Some(rfc3339_ms(listed.modified_ms)),
            metadata: Map::new(),
            files: Vec::new(),
            transcript: None,
        });
        session.transcript = Some(listed.name.clone());
    }
    let mut sessions: Vec<Session> = sessions.into_values().collect();
    for session in &mut sessions {
        session.files.sort_by(|a, b| a.name.cmp(&b.name));
        // The session ended when its last file did; unknown while any is
        // unfinished.
        if !session.files.is_empty() {
            session.ended_at = session
                .files
                .iter()
                .map(|f| f.ended_at.as_ref().and_then(|t| Some((unix_ms(t)?, t))))
                .collect::<Option<Vec<_>>>()
                .and_then(|ends| ends.into_iter().max().map(|(_, t)| t.clone()));
        }
    }
    sessions.sort_by(|a, b| (b.started_ms, &b.session_id).cmp(&(a.started_ms, &a.session_id)));
    sessions
}

/// The sessions, newest first, with a lookup by id.
#[derive(Debug, Default)]
pub struct Index {
    pub sessions: Vec<Session>,
    by_id: HashMap<String, usize>,
}

impl Index {
    fn new(sessions: Vec<Session>) -> Self {
        let by_id = sessions
            .iter()
            .enumerate()
            .map(|(i, s)| (s.session_id.clone(), i))
            .collect();
        Self { sessions, by_id }
    }

    pub fn get(&self, session_id: &str) -> Option<&Session> {
        self.by_id.get(session_id).map(|&i| &self.sessions[i])
    }
}

/// A sidecar as last listed and read.
struct Known {
    listed: Listed,
    sidecar: Option<SidecarFields>,
}

struct RefreshState {
    at: Option<Instant>,
    sidecars: HashMap<String, Known>,
}

/// The recordings the store holds, indexed; shared by every worker.
pub struct Catalog {
    storage: Storage,
    /// Held while listing: concurrent requests wait for one listing.
    refresh: tokio::sync::Mutex<RefreshState>,
    index: RwLock<Arc<Index>>,
}

impl Catalog {
    pub fn new(storage: Storage) -> Self {
        Self {
            storage,
            refresh: tokio::sync::Mutex::new(RefreshState {
                at: None,
                sidecars: HashMap::new(),
            }),
            index: RwLock::new(Arc::new(Index::default())),
        }
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    fn objects(&self) -> &Arc<dyn ObjectStore> {
        self.storage.objects()
    }

    fn current(&self) -> Arc<Index> {
        match self.index.read() {
            Ok(index) => index.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn replace(&self, index: Index) -> Arc<Index> {
        let index = Arc::new(index);
        match self.index.write() {
            Ok(mut slot) => *slot = index.clone(),
            Err(poisoned) => *poisoned.into_inner() = index.clone(),
        }
        index
    }

    /// The index, listed again first if the last listing is older than
    /// `max_age`.
    pub async fn index(&self, max_age: Duration) -> Result<Arc<Index>, RecordingsError> {
        let mut state = self.refresh.lock().await;
        if state.at.is_some_and(|at| at.elapsed() < max_age) {
            return Ok(self.current());
        }
        let started = Instant::now();
        let listing = self.list().await?;
        // Read the sidecars that are new or changed since the last listing.
        let changed: Vec<Listed> = listing
            .iter()
            .filter(|l| classify(&l.name).is_some_and(|f| f.kind == FileKind::Sidecar))
            .filter(|l| state.sidecars.get(&l.name).is_none_or(|k| k.listed != **l))
            .cloned()
            .collect();
        let reads = futures_util::stream::iter(changed)
            .map(|listed| async move {
                let sidecar = if listed.bytes > MAX_SIDECAR_BYTES {
                    None
                } else {
                    self.read_sidecar(&listed.name).await
                };
                (listed, sidecar)
            })
            .buffer_unordered(PARALLEL_READS)
            .collect::<Vec<_>>()
            .await;
        let present: std::collections::HashSet<&str> =
            listing.iter().map(|l| l.name.as_str()).collect();
        state
            .sidecars
            .retain(|name, _| present.contains(name.as_str()));
        for (listed, sidecar) in reads {
            state
                .sidecars
                .insert(listed.name.clone(), Known { listed, sidecar });
        }
        let sidecars: HashMap<String, SidecarFields> = state
            .sidecars
            .iter()
            .filter_map(|(name, known)| Some((name.clone(), known.sidecar.clone()?)))
            .collect();
        let index = self.replace(Index::new(build_sessions(&listing, &sidecars)));
        state.at = Some(Instant::now());
        tracing::debug!(
            objects = listing.len(),
            sessions = index.sessions.len(),
            ms = started.elapsed().as_millis() as u64,
            "recordings listed"
        );
        Ok(index)
    }

    /// The session `session_id` from the index. If the index does not know
    /// it yet (it may have started since the last listing), the store is
    /// asked for its usual files: if one is there, the store is listed again
    /// at once; if not (only named recorders' files, or no such session), at
    /// most every [`MISS_REFRESH_INTERVAL`], so made-up ids cannot make the
    /// server list the store continuously.
    pub async fn session(&self, session_id: &str) -> Result<Option<Session>, RecordingsError> {
        let index = self.index(REFRESH_INTERVAL).await?;
        if let Some(session) = index.get(session_id) {
            return Ok(Some(session.clone()));
        }
        let mut max_age = MISS_REFRESH_INTERVAL;
        for suffix in [".json", ".ch0.json", TRANSCRIPT_SUFFIX] {
            match self
                .objects()
                .head(&self.key(&format!("{session_id}{suffix}")))
                .await
            {
                Ok(_) => {
                    max_age = Duration::ZERO;
                    break;
                }
                Err(error) if is_not_found(&error) => {}
                Err(error) => return Err(error.into()),
            }
        }
        let index = self.index(max_age).await?;
        Ok(index.get(session_id).cloned())
    }

    /// Every object directly under the prefix (the recordings are flat).
    async fn list(&self) -> Result<Vec<Listed>, RecordingsError> {
        let prefix = self.storage.prefix();
        let prefix = (!prefix.as_ref().is_empty()).then_some(prefix);
        let listing = self.objects().list_with_delimiter(prefix).await?;
        Ok(listing
            .objects
            .iter()
            .filter_map(Listed::from_meta)
            .collect())
    }

    fn key(&self, name: &str) -> ObjectPath {
        self.storage.key(name)
    }

    /// A sidecar's raw JSON, read now; `None` if it is gone or not JSON.
    pub async fn read_sidecar_json(&self, name: &str) -> Result<Option<Value>, RecordingsError> {
        let bytes = match self.objects().get(&self.key(name)).await {
            Ok(result) => {
                if result.meta.size > MAX_SIDECAR_BYTES {
                    return Ok(None);
                }
                result.bytes().await?
            }
            Err(error) if is_not_found(&error) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        Ok(serde_json::from_slice::<Value>(&bytes)
            .ok()
            .filter(Value::is_object))
    }

    async fn read_sidecar(&self, name: &str) -> Option<SidecarFields> {
        match self.read_sidecar_json(name).await {
            Ok(value) => serde_json::from_value(value?).ok(),
            Err(error) => {
                tracing::warn!(name, %error, "cannot read a sidecar");
                None
            }
        }
    }

    /// The session as its sidecars say now (read fresh, with each audio
    /// file's current size), with the raw sidecars; `None` if the store no
    /// longer holds any of it.
    pub async fn fresh(&self, session_id: &str) -> Result<Option<Fresh>, RecordingsError> {
        let Some(known) = self.session(session_id).await? else {
            return Ok(None);
        };
        let mut listing = Vec::new();
        let mut sidecars = HashMap::new();
        let mut raw = Vec::new();
        for file in &known.files {
            let Some(json) = self.read_sidecar_json(&file.sidecar).await? else {
                continue;
            };
            let Ok(fields) = serde_json::from_value::<SidecarFields>(json.clone()) else {
                continue;
            };
            match self.objects().head(&self.key(&fields.recording)).await {
                Ok(meta) => listing.extend(Listed::from_meta(&meta)),
                Err(error) if is_not_found(&error) => {}
                Err(error) => return Err(error.into()),
            }
            listing.push(Listed {
                name: file.sidecar.clone(),
                bytes: 0,
                modified_ms: 0,
                e_tag: None,
            });
            sidecars.insert(file.sidecar.clone(), fields);
            raw.push(json);
        }
        let transcript_name = format!("{session_id}{TRANSCRIPT_SUFFIX}");
        let transcript = self.read_transcript(&transcript_name).await?;
        if let Some((listed, _)) = &transcript {
            listing.push(listed.clone());
        }
        let session = build_sessions(&listing, &sidecars).into_iter().next();
        Ok(session.map(|session| Fresh {
            session,
            sidecars: raw,
            transcript: transcript.map(|(_, lines)| lines).unwrap_or_default(),
        }))
    }

    /// The transcript's lines (whole JSON objects; a line cut short by a
    /// crash is skipped).
    async fn read_transcript(
        &self,
        name: &str,
    ) -> Result<Option<(Listed, Vec<Value>)>, RecordingsError> {
        let result = match self.objects().get(&self.key(name)).await {
            Ok(result) => result,
            Err(error) if is_not_found(&error) => return Ok(None),
            Err(error) => return Err(error.into()),
        };
        if result.meta.size > MAX_TRANSCRIPT_BYTES {
            return Err(RecordingsError::TooLarge {
                bytes: result.meta.size,
                max: MAX_TRANSCRIPT_BYTES,
            });
        }
        let Some(listed) = Listed::from_meta(&result.meta) else {
            return Ok(None);
        };
        let bytes = result.bytes().await?;
        let lines = bytes
            .split(|&b| b == b'\n')
            .filter_map(|line| serde_json::from_slice::<Value>(line).ok())
            .filter(Value::is_object)
            .collect();
        Ok(Some((listed, lines)))
    }

    /// Deletes every file of the session: audio and transcript first, the
    /// sidecars last (a delete cut short leaves the sidecars, so the session
    /// is still listed and the delete can be repeated). Refused while the
    /// session is recording. Returns the names deleted.
    pub async fn delete(&self, session_id: &str) -> Result<Vec<String>, RecordingsError> {
        let Some(fresh) = self.fresh(session_id).await? else {
            return Err(RecordingsError::NotFound);
        };
        if fresh.session.in_progress() {
            return Err(RecordingsError::InProgress);
        }
        let session = &fresh.session;
        let mut order: Vec<String> = session.files.iter().map(|f| f.name.clone()).collect();
        order.extend(session.transcript.clone());
        order.extend(session.files.iter().map(|f| f.sidecar.clone()));
        let mut deleted = Vec::new();
        for name in order {
            match self.objects().delete(&self.key(&name)).await {
                Ok(()) => deleted.push(name),
                Err(error) if is_not_found(&error) => {}
                Err(error) => return Err(error.into()),
            }
        }
        self.forget(session_id);
        Ok(deleted)
    }

    /// Drops a deleted session from the index at once.
    fn forget(&self, session_id: &str) {
        let current = self.current();
        if current.get(session_id).is_none() {
            return;
        }
        let sessions = current
            .sessions
            .iter()
            .filter(|s| s.session_id != session_id)
            .cloned()
            .collect();
        self.replace(Index::new(sessions));
    }
}

/// A session read fresh from the store.
#[derive(Debug)]
pub struct Fresh {
    pub session: Session,
    /// Its sidecars as stored.
    pub sidecars: Vec<Value>,
    /// Its kept transcript lines (`transcript` messages as sent).
    pub transcript: Vec<Value>,
}

impl Fresh {
    /// The JSON of `GET /v1/recordings/<id>` (proto/schemas/http/).
    pub fn detail_json(&self) -> Value {
        let mut detail = self.session.summary_json();
        detail["sidecars"] = Value::Array(self.sidecars.clone());
        detail["transcript"] = Value::Array(self.transcript.clone());
        detail
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "01a1fe8b-654d-72fd-99f9-7c0fa87dd94a";
    const B: &str = "01a1fe8b-654d-72fd-99f9-7c0fa87dd94b";

    fn listed(name: &str, bytes: u64) -> Listed {
        Listed {
            name: name.into(),
            bytes,
            modified_ms: 1_000,
            e_tag: None,
        }
    }

    fn sidecar(id: &str, recording: &str, started: &str, complete: bool) -> SidecarFields {
        serde_json::from_value(json!({
            "session_id": id,
            "recording": recording,
            "metadata": {"agent": "ada"},
            "started_at": started,
            "ended_at": complete.then_some("2026-05-01T12:01:00.000Z"),
            "duration_seconds": 60.0,
            "complete": complete,
            "channels": 1,
            "sample_rate": 8000,
            "a_field_the_index_does_not_use": [1, 2],
        }))
        .unwrap()
    }

    #[test]
    fn sessions_gather_their_files_newest_first() {
        let listing = vec![
            listed(&format!("{A}.ch0.wav"), 100),
            listed(&format!("{A}.ch0.json"), 1),
            listed(&format!("{A}.ch1.wav"), 100),
            listed(&format!("{A}.ch1.json"), 1),
            listed(&format!("{A}.transcript.jsonl"), 1),
            listed(&format!("{B}.json"), 1),
            listed(&format!("{B}.json.tmp"), 1),
            listed("notes.txt", 1),
        ];
        let sidecars = HashMap::from([
            (
                format!("{A}.ch0.json"),
                sidecar(A, &format!("{A}.ch0.wav"), "2026-05-01T12:00:00.000Z", true),
            ),
            (
                format!("{A}.ch1.json"),
                sidecar(A, &format!("{A}.ch1.wav"), "2026-05-01T12:00:00.000Z", true),
            ),
            (
                format!("{B}.json"),
                sidecar(B, &format!("{B}.wav"), "2026-05-02T12:00:00.000Z", false),
            ),
        ]);
        let sessions = build_sessions(&listing, &sidecars);
        assert_eq!(sessions.len(), 2);
        assert_eq!(sessions[0].session_id, B, "newest first");
        assert!(sessions[0].in_progress() && !sessions[0].complete());
        assert_eq!(sessions[0].files[0].bytes, None, "no audio object yet");
        let a = &sessions[1];
        assert_eq!(a.started_ms, 1_777_636_800_000);
        assert!(a.complete() && !a.in_progress());
        assert_eq!(a.files.len(), 2);
        assert_eq!(a.files[1].name, format!("{A}.ch1.wav"));
        assert_eq!(a.files[1].bytes, Some(100));
        assert_eq!(
            a.transcript.as_deref(),
            Some(&*format!("{A}.transcript.jsonl"))
        );
        assert_eq!(a.ended_at.as_deref(), Some("2026-05-01T12:01:00.000Z"));
        let summary = a.summary_json();
        assert_eq!(
            summary["files"][0]["url"],
            format!("/v1/recordings/{A}/files/{A}.ch0.wav")
        );
        assert_eq!(summary["metadata"]["agent"], "ada");
        assert_eq!(summary["transcript"], true);
        assert_eq!(a.object_names().len(), 5);
    }

    #[test]
    fn sidecars_that_name_other_files_are_ignored() {
        let listing = vec![
            listed(&format!("{A}.json"), 1),
            listed(&format!("{B}.json"), 1),
        ];
        let sidecars = HashMap::from([
            // Names another session's file.
            (
                format!("{A}.json"),
                sidecar(A, &format!("{B}.wav"), "2026-05-01T12:00:00Z", true),
            ),
            // Names a file outside the directory.
            (
                format!("{B}.json"),
                sidecar(B, "../../etc/passwd", "2026-05-01T12:00:00Z", true),
            ),
        ]);
        assert!(build_sessions(&listing, &sidecars).is_empty());
    }

    #[tokio::test]
    async fn the_catalog_lists_reads_and_deletes_through_the_object_store() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(None, dir.path()).unwrap();
        let write = |name: String, value: &Value| {
            std::fs::write(dir.path().join(name), serde_json::to_vec(value).unwrap()).unwrap()
        };
        let mut side = json!({
            "session_id": A, "recording": format!("{A}.wav"), "metadata": {},
            "started_at": "2026-05-01T12:00:00.000Z", "ended_at": null, "complete": false,
        });
        write(format!("{A}.json"), &side);
        std::fs::write(dir.path().join(format!("{A}.wav")), [0u8; 44]).unwrap();
        let catalog = Catalog::new(storage);
        let index = catalog.index(Duration::ZERO).await.unwrap();
        assert_eq!(index.sessions.len(), 1);
        assert!(matches!(
            catalog.delete(A).await,
            Err(RecordingsError::InProgress)
        ));
        side["complete"] = json!(true);
        side["ended_at"] = json!("2026-05-01T12:00:05.000Z");
        write(format!("{A}.json"), &side);
        std::fs::write(
            dir.path().join(format!("{A}.transcript.jsonl")),
            "{\"type\":\"transcript\",\"text\":\"hi\"}\n{\"cut sh",
        )
        .unwrap();
        let fresh = catalog.fresh(A).await.unwrap().unwrap();
        assert!(fresh.session.complete());
        assert_eq!(fresh.session.files[0].bytes, Some(44));
        assert_eq!(fresh.transcript.len(), 1, "the cut line is skipped");
        assert_eq!(
            fresh.detail_json()["sidecars"][0]["ended_at"],
            "2026-05-01T12:00:05.000Z"
        );
        let mut deleted = catalog.delete(A).await.unwrap();
        deleted.sort();
        assert_eq!(deleted.len(), 3, "{deleted:?}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(catalog.current().sessions.is_empty());
        assert!(matches!(
            catalog.delete(A).await,
            Err(RecordingsError::NotFound)
        ));
    }
}
