//! Streaming recordings from the spool into an object store.
//!
//! The recorder writes its file in the spool directory exactly as it does
//! for local storage, and tells its [`Upload`] how many bytes of it are on
//! disk ([`Upload::durable`]). The upload task sends the file to the bucket
//! as a multipart upload while the session runs, [`PART_BYTES`] at a time:
//!
//! - Parts 1, 2, … (`[k·PART, (k+1)·PART)`) go as soon as they are on disk.
//!   Recorders only ever rewrite the header at the start of their file
//!   (WAV sizes, FLAC's STREAMINFO), never past the first part.
//! - Part 0, which holds the header, goes at the end with the last part,
//!   when the header is final. Multipart uploads take parts in any order.
//! - A recording shorter than one part is one plain `PUT` at the end.
//!
//! Then the sidecar goes beside the object (with its `uri`), and the spool
//! files are deleted. Memory stays bounded: a part is read from the spool
//! when it is sent, and at most [`MAX_PARTS_IN_FLIGHT`] are in memory.
//!
//! When the store fails, the task retries with backoff while the audio
//! waits on disk; the session's client is told once per outage
//! (`storage_unavailable`, not fatal) and the socket is never held up.
//! What a killed server leaves in the spool is uploaded at the next start
//! ([`Uploader::recover_spool`]), its sidecar saying `"complete": false`.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use object_store::multipart::{MultipartStore, PartId};
use object_store::path::Path as ObjectPath;
use object_store::{MultipartId, ObjectStore, ObjectStoreExt, PutPayload};
use tokio::sync::{mpsc, oneshot, Semaphore};

use super::Storage;
use crate::sinks::transcriber::persist::TRANSCRIPT_SUFFIX;
use crate::telemetry::names;

/// Size of every part but the last: S3's smallest (5 MiB). Equal parts also
/// suit the stores that want them equal (R2).
pub const PART_BYTES: u64 = 5 * 1024 * 1024;

/// Parts being read or sent at once, over all recordings: the memory bound
/// of uploading (`MAX_PARTS_IN_FLIGHT × PART_BYTES`).
pub const MAX_PARTS_IN_FLIGHT: usize = 8;

/// Backoff between attempts while the store fails.
const RETRY_FIRST: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error("reading the spool file {path}: {source}")]
    Spool {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("object store: {0}")]
    Store(#[from] object_store::Error),
    #[error("the upload was stopped before it finished")]
    Stopped,
}

/// Tells a recording's client that the store is failing (once per outage).
/// Dropped when the recording ends, so that it never keeps a finished
/// session's event channel open.
pub type OutageNotice = Box<dyn Fn(&str) + Send + Sync>;

/// Uploads of every recording, on a runtime of their own: a slow store never
/// takes time from the session workers, and shutdown can wait for them.
pub struct Uploader {
    storage: Storage,
    multipart: Arc<dyn MultipartStore>,
    runtime: tokio::runtime::Handle,
    parts_in_flight: Arc<Semaphore>,
    /// Ends the upload runtime's thread.
    stop: std::sync::Mutex<Option<oneshot::Sender<()>>>,
    /// Uploads not yet finished (for shutdown).
    active: Arc<tokio::sync::watch::Sender<usize>>,
    /// The latest request to the store failed: sessions ending now do not
    /// wait for their uploads.
    store_down: Arc<AtomicBool>,
}

impl std::fmt::Debug for Uploader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uploader")
            .field("storage", &self.storage)
            .finish()
    }
}

impl Uploader {
    /// Starts the upload runtime for a remote `storage`; `None` for local
    /// storage, where the recorder's files are the recordings.
    pub fn start(storage: &Storage) -> std::io::Result<Option<Arc<Self>>> {
        let Some(multipart) = storage.multipart().cloned() else {
            return Ok(None);
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("cochlea-upload")
            .enable_all()
            .build()?;
        let handle = runtime.handle().clone();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("cochlea-upload-main".into())
            .spawn(move || {
                let _ = runtime.block_on(stop_rx);
                // Whatever is still retrying stops here; its spool files stay
                // for the next start.
                runtime.shutdown_timeout(Duration::from_secs(1));
            })?;
        let (active, _) = tokio::sync::watch::channel(0usize);
        Ok(Some(Arc::new(Self {
            storage: storage.clone(),
            multipart,
            runtime: handle,
            parts_in_flight: Arc::new(Semaphore::new(MAX_PARTS_IN_FLIGHT)),
            stop: std::sync::Mutex::new(Some(stop_tx)),
            active: Arc::new(active),
            store_down: Arc::new(AtomicBool::new(false)),
        })))
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    /// Starts uploading the spool file `file_name` (which the recorder is
    /// about to write) as the object of the same name.
    pub fn begin(&self, file_name: &str, notice: OutageNotice) -> Upload {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = UploadTask::new(self, file_name, Some(notice));
        self.active.send_modify(|n| *n += 1);
        let active = self.active.clone();
        self.runtime.spawn(async move {
            task.run(rx).await;
            active.send_modify(|n| *n = n.saturating_sub(1));
        });
        Upload {
            commands: tx,
            store_down: self.store_down.clone(),
            whole_parts_told: 0,
        }
    }

    /// Uploads what a previous process left in the spool: every sidecar
    /// there, with its recording, then deletes them. Runs in the background;
    /// files another live server holds locked are left alone.
    pub fn recover_spool(self: &Arc<Self>) {
        let uploader = self.clone();
        self.active.send_modify(|n| *n += 1);
        self.runtime.spawn(async move {
            let dir = uploader.storage.spool_dir().to_path_buf();
            let leftovers = tokio::task::spawn_blocking(move || spool_leftovers(&dir))
                .await
                .unwrap_or_default();
            for (file, sidecar) in leftovers {
                tracing::info!(file = %file, "uploading a file left in the spool");
                uploader.upload_whole(&file, sidecar).await;
            }
            uploader.active.send_modify(|n| *n = n.saturating_sub(1));
        });
    }

    /// Uploads the finished spool file `file_name` (a session's kept
    /// transcripts, say) in the background, then deletes it from the spool.
    pub fn upload_file(self: &Arc<Self>, file_name: &str) {
        let uploader = self.clone();
        let file_name = file_name.to_owned();
        self.active.send_modify(|n| *n += 1);
        self.runtime.spawn(async move {
            uploader.upload_whole(&file_name, None).await;
            uploader.active.send_modify(|n| *n = n.saturating_sub(1));
        });
    }

    /// Uploads a spool file that is final, then its sidecar (if any), then
    /// deletes both; retries until it is done or the runtime stops.
    async fn upload_whole(&self, file_name: &str, sidecar: Option<String>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let task = UploadTask::new(self, file_name, None);
        let path = task.spool_path.clone();
        let len = tokio::task::spawn_blocking(move || std::fs::metadata(path))
            .await
            .ok()
            .and_then(Result::ok)
            .map_or(0, |m| m.len());
        let (done, _) = std::sync::mpsc::channel();
        let _ = tx.send(Command::Finish {
            final_len: len,
            sidecar,
            done,
        });
        task.run(rx).await;
    }

    /// Waits up to `timeout` for the uploads under way, then stops them
    /// (their spool files stay for the next start).
    pub async fn shutdown(&self, timeout: Duration) {
        let mut active = self.active.subscribe();
        let waited = tokio::time::timeout(timeout, active.wait_for(|n| *n == 0)).await;
        if waited.is_err() {
            tracing::warn!(
                unfinished = *self.active.borrow(),
                "uploads unfinished at shutdown stay in the spool for the next start"
            );
        }
        if let Some(stop) = self.stop.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = stop.send(());
        }
    }
}

/// What a previous process left in the spool `dir`: `(recording file name,
/// Some(sidecar file name))` for every sidecar whose recording is there and
/// not held by a live recorder, and `(file name, None)` for every kept
/// transcript file.
fn spool_leftovers(dir: &Path) -> Vec<(String, Option<String>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        if name.ends_with(TRANSCRIPT_SUFFIX) {
            found.push((name, None));
            continue;
        }
        if !name.ends_with(".json") {
            continue;
        }
        let Ok(bytes) = std::fs::read(entry.path()) else {
            continue;
        };
        let Some(recording) = serde_json::from_slice::<serde_json::Value>(&bytes)
            .ok()
            .and_then(|v| v["recording"].as_str().map(str::to_owned))
        else {
            continue;
        };
        // Only a plain file name beside the sidecar (written by us).
        if recording.contains('/') || recording.starts_with('.') {
            continue;
        }
        let path = dir.join(&recording);
        let Ok(file) = File::open(&path) else {
            // A session without audio has a sidecar only when it failed
            // before writing: nothing to upload but the sidecar itself.
            continue;
        };
        if file.try_lock().is_err() {
            continue;
        }
        found.push((recording, Some(name)));
    }
    found.sort();
    found
}

/// What a recorder says to its upload.
enum Command {
    /// The spool file holds this many bytes (written and handed to the OS).
    Durable(u64),
    /// The file is final at `final_len` bytes; upload the rest, then the
    /// sidecar (a file name in the spool), then delete both and report.
    Finish {
        final_len: u64,
        sidecar: Option<String>,
        done: std::sync::mpsc::Sender<Result<String, String>>,
    },
}

/// A finish under way.
struct Finish {
    final_len: u64,
    sidecar: Option<String>,
    done: std::sync::mpsc::Sender<Result<String, String>>,
}

/// A recorder's side of its upload.
#[derive(Debug)]
pub struct Upload {
    commands: mpsc::UnboundedSender<Command>,
    store_down: Arc<AtomicBool>,
    /// Whole parts on disk as last told to the task: it hears only when one
    /// more is complete, not at every checkpoint (four a second per stream).
    whole_parts_told: u64,
}

/// The end of an upload, to wait for.
pub struct Finishing {
    done: std::sync::mpsc::Receiver<Result<String, String>>,
    store_down: bool,
}

impl Finishing {
    /// Blocks up to `timeout` for the upload to complete: `Some(Ok(uri))`,
    /// `Some(Err(why))` if it gave up, `None` if it is still trying (it goes
    /// on in the background, and the spool keeps the file until it is done).
    /// While the store is known to be down, it does not wait at all.
    pub fn wait(&self, timeout: Duration) -> Option<Result<String, String>> {
        let timeout = if self.store_down {
            Duration::ZERO
        } else {
            timeout
        };
        match self.done.recv_timeout(timeout) {
            Ok(result) => Some(result),
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => None,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                Some(Err("the upload stopped".into()))
            }
        }
    }
}

impl Upload {
    /// The first `bytes` of the spool file are written. Only a new whole
    /// part is worth waking the upload task for.
    pub fn durable(&mut self, bytes: u64) {
        let whole_parts = bytes / PART_BYTES;
        if whole_parts > self.whole_parts_told {
            self.whole_parts_told = whole_parts;
            let _ = self.commands.send(Command::Durable(bytes));
        }
    }

    /// The file is final: uploads the rest and the sidecar `sidecar` (a
    /// file name in the spool), then deletes them from the spool.
    pub fn finish(self, final_len: u64, sidecar: Option<String>) -> Finishing {
        let (done, rx) = std::sync::mpsc::channel();
        let _ = self.commands.send(Command::Finish {
            final_len,
            sidecar,
            done,
        });
        Finishing {
            done: rx,
            store_down: self.store_down.load(Ordering::Relaxed),
        }
    }
}

/// The state of one recording's upload.
struct UploadTask {
    objects: Arc<dyn ObjectStore>,
    multipart: Arc<dyn MultipartStore>,
    parts_in_flight: Arc<Semaphore>,
    spool_dir: PathBuf,
    spool_path: PathBuf,
    key: ObjectPath,
    uri: String,
    storage: Storage,
    notice: Option<OutageNotice>,
    store_down: Arc<AtomicBool>,
    upload_id: Option<MultipartId>,
    /// Parts sent, by index.
    parts: BTreeMap<usize, PartId>,
    /// Bytes of the spool file on disk.
    durable: u64,
    /// The object is complete in the store (the sidecar may not be yet).
    object_done: bool,
    /// Whether the client has been told of the current outage.
    told: bool,
}

impl UploadTask {
    fn new(uploader: &Uploader, file_name: &str, notice: Option<OutageNotice>) -> Self {
        let storage = &uploader.storage;
        Self {
            objects: storage.objects().clone(),
            multipart: uploader.multipart.clone(),
            parts_in_flight: uploader.parts_in_flight.clone(),
            spool_dir: storage.spool_dir().to_path_buf(),
            spool_path: storage.spool_dir().join(file_name),
            key: storage.key(file_name),
            uri: storage.object_url(file_name).unwrap_or_default(),
            storage: storage.clone(),
            notice,
            store_down: uploader.store_down.clone(),
            upload_id: None,
            parts: BTreeMap::new(),
            durable: 0,
            object_done: false,
            told: false,
        }
    }

    async fn run(mut self, mut commands: mpsc::UnboundedReceiver<Command>) {
        let mut backoff = RETRY_FIRST;
        let mut finish: Option<Finish> = None;
        let mut retry_at: Option<tokio::time::Instant> = None;
        loop {
            if let Some(at) = retry_at {
                // Backing off: take commands meanwhile (sizes only grow).
                tokio::select! {
                    command = commands.recv(), if finish.is_none() => match command {
                        Some(command) => self.take(command, &mut finish),
                        // Dropped unfinished: the spool keeps the file for
                        // the next start.
                        None => break,
                    },
                    () = tokio::time::sleep_until(at) => retry_at = None,
                }
                if retry_at.is_some() {
                    continue;
                }
            } else if finish.is_none() {
                match commands.recv().await {
                    Some(command) => self.take(command, &mut finish),
                    None => break,
                }
            }
            while let Ok(command) = commands.try_recv() {
                self.take(command, &mut finish);
            }
            let step = match &finish {
                None => self.send_full_parts(false).await,
                Some(finish) => {
                    self.durable = finish.final_len;
                    let sidecar = finish.sidecar.clone();
                    self.complete(finish.final_len, sidecar.as_deref()).await
                }
            };
            match step {
                Ok(()) => {
                    backoff = RETRY_FIRST;
                    self.store_down.store(false, Ordering::Relaxed);
                    if self.told {
                        self.told = false;
                        tracing::info!(uri = %self.uri, "object store reachable again");
                    }
                    if let Some(finish) = finish.take() {
                        let _ = finish.done.send(Ok(self.uri.clone()));
                        break;
                    }
                }
                Err(error) => {
                    self.store_down.store(true, Ordering::Relaxed);
                    metrics::counter!(names::UPLOAD_FAILURES_TOTAL).increment(1);
                    tracing::warn!(
                        uri = %self.uri,
                        %error,
                        retry_in_ms = backoff.as_millis() as u64,
                        "upload failed"
                    );
                    if !self.told {
                        self.told = true;
                        if let Some(notice) = &self.notice {
                            notice(&format!(
                                "the object store is unavailable ({error}); the audio is kept on the server's disk and the upload is retried"
                            ));
                        }
                    }
                    // Whoever waits for the end hears of the failure now,
                    // not at its timeout; the upload itself goes on.
                    if let Some(finish) = &finish {
                        let _ = finish.done.send(Err(error.to_string()));
                    }
                    retry_at = Some(tokio::time::Instant::now() + backoff);
                    backoff = (backoff * 2).min(RETRY_MAX);
                }
            }
        }
    }

    fn take(&mut self, command: Command, finish: &mut Option<Finish>) {
        match command {
            Command::Durable(bytes) => self.durable = self.durable.max(bytes),
            Command::Finish {
                final_len,
                sidecar,
                done,
            } => {
                // The session is ending: its event channel must be free to
                // close, whatever this upload still has to do.
                self.notice = None;
                *finish = Some(Finish {
                    final_len,
                    sidecar,
                    done,
                })
            }
        }
    }

    /// Sends every whole part after part 0 that is on disk; with `all`, also
    /// the last, partial one.
    async fn send_full_parts(&mut self, all: bool) -> Result<(), UploadError> {
        let total_parts = if all {
            self.durable.div_ceil(PART_BYTES)
        } else {
            self.durable / PART_BYTES
        };
        for index in 1..total_parts {
            let index = index as usize;
            if self.parts.contains_key(&index) {
                continue;
            }
            let upload_id = self.upload_id().await?;
            let start = index as u64 * PART_BYTES;
            let end = (start + PART_BYTES).min(self.durable);
            let part = self.put_part(&upload_id, index, start, end).await?;
            self.parts.insert(index, part);
        }
        Ok(())
    }

    /// The multipart upload, begun on first use.
    async fn upload_id(&mut self) -> Result<MultipartId, UploadError> {
        if let Some(id) = &self.upload_id {
            return Ok(id.clone());
        }
        let id = self.multipart.create_multipart(&self.key).await?;
        self.upload_id = Some(id.clone());
        Ok(id)
    }

    async fn put_part(
        &self,
        upload_id: &MultipartId,
        index: usize,
        start: u64,
        end: u64,
    ) -> Result<PartId, UploadError> {
        let _permit = self
            .parts_in_flight
            .acquire()
            .await
            .map_err(|_| UploadError::Stopped)?;
        let bytes = self.read_spool(start, end).await?;
        let len = bytes.len() as u64;
        let part = self
            .multipart
            .put_part(&self.key, upload_id, index, PutPayload::from(bytes))
            .await?;
        metrics::counter!(names::UPLOAD_BYTES_TOTAL).increment(len);
        Ok(part)
    }

    async fn read_spool(&self, start: u64, end: u64) -> Result<Vec<u8>, UploadError> {
        let path = self.spool_path.clone();
        tokio::task::spawn_blocking(move || {
            let file = File::open(&path)?;
            let len = usize::try_from(end.saturating_sub(start)).unwrap_or(0);
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, start)?;
            Ok(buf)
        })
        .await
        .map_err(|_| UploadError::Stopped)?
        .map_err(|source| UploadError::Spool {
            path: self.spool_path.clone(),
            source,
        })
    }

    /// Finishes the object at `final_len` bytes, then the sidecar, then
    /// clears the spool. Safe to repeat after a failure: what was sent is
    /// not sent again.
    async fn complete(&mut self, final_len: u64, sidecar: Option<&str>) -> Result<(), UploadError> {
        if !self.object_done {
            if self.upload_id.is_none() && final_len <= PART_BYTES {
                // Small: one PUT.
                let _permit = self
                    .parts_in_flight
                    .acquire()
                    .await
                    .map_err(|_| UploadError::Stopped)?;
                let bytes = self.read_spool(0, final_len).await?;
                self.objects.put(&self.key, PutPayload::from(bytes)).await?;
                metrics::counter!(names::UPLOAD_BYTES_TOTAL).increment(final_len);
            } else {
                self.send_full_parts(true).await?;
                let upload_id = self.upload_id().await?;
                if !self.parts.contains_key(&0) {
                    let part = self
                        .put_part(&upload_id, 0, 0, PART_BYTES.min(final_len))
                        .await?;
                    self.parts.insert(0, part);
                }
                let parts: Vec<PartId> = self.parts.values().cloned().collect();
                self.multipart
                    .complete_multipart(&self.key, &upload_id, parts)
                    .await?;
            }
            self.object_done = true;
        }
        if let Some(sidecar) = sidecar {
            self.put_sidecar(sidecar).await?;
        }
        let spool = self.spool_path.clone();
        let sidecar_path = sidecar.map(|s| self.spool_dir.join(s));
        let _ = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_file(&spool);
            if let Some(path) = sidecar_path {
                let _ = std::fs::remove_file(path);
            }
        })
        .await;
        metrics::counter!(names::UPLOADS_TOTAL).increment(1);
        Ok(())
    }

    /// The sidecar, with where its recording now is, beside the object.
    async fn put_sidecar(&self, sidecar: &str) -> Result<(), UploadError> {
        let path = self.spool_dir.join(sidecar);
        let bytes = tokio::fs::read(&path)
            .await
            .map_err(|source| UploadError::Spool {
                path: path.clone(),
                source,
            })?;
        let body = match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(serde_json::Value::Object(mut fields)) => {
                fields.insert("uri".into(), serde_json::Value::String(self.uri.clone()));
                serde_json::to_vec_pretty(&fields).unwrap_or(bytes)
            }
            _ => bytes,
        };
        self.objects
            .put(&self.storage.key(sidecar), PutPayload::from(body))
            .await?;
        Ok(())
    }
}
