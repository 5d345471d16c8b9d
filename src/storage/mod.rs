//! Where finished recordings live: a local directory (`file://`, the
//! default) or an object store (`s3://bucket/prefix`).
//!
//! The recorder always writes into `recordings_dir`. With local storage that
//! file is the recording; with an object store it is the spool, which the
//! [`upload`] side streams to the bucket as a multipart upload while the
//! session runs and deletes once the object is complete. Everything that
//! reads recordings back (the recordings API, downloads, retention) goes
//! through [`Storage::objects`], an [`ObjectStore`] for either case, so it
//! does not care where the bytes are.
//!
//! Remote stores are built from the standard `AWS_*` environment variables
//! (endpoint, keys, region, `AWS_ALLOW_HTTP`) by the `object_store` crate.

pub mod upload;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use object_store::local::LocalFileSystem;
use object_store::multipart::MultipartStore;
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("recordings_url '{url}': {message}")]
    BadUrl { url: String, message: String },
    #[error("recordings_url '{url}': cannot set up the object store: {source}")]
    Store {
        url: String,
        source: object_store::Error,
    },
    #[error("cannot use recordings directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Where recordings go, parsed from `recordings_url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordingsUrl {
    /// A local directory: the recordings are the recorder's own files.
    File(PathBuf),
    /// An S3-compatible bucket and key prefix (no leading or trailing `/`).
    S3 { bucket: String, prefix: String },
}

impl RecordingsUrl {
    /// Parses `file:///abs/path` or `s3://bucket[/prefix]`.
    pub fn parse(url: &str) -> Result<Self, StorageError> {
        let bad = |message: &str| StorageError::BadUrl {
            url: url.to_owned(),
            message: message.to_owned(),
        };
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(bad(
                    "a file URL needs an absolute path: file:///srv/recordings",
                ));
            }
            return Ok(Self::File(PathBuf::from(path)));
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("an S3 URL names its bucket: s3://bucket/prefix"));
            }
            let prefix = prefix.trim_matches('/');
            if prefix.split('/').any(|part| part == "." || part == "..") {
                return Err(bad("the prefix may not hold '.' or '..' segments"));
            }
            return Ok(Self::S3 {
                bucket: bucket.to_owned(),
                prefix: prefix.to_owned(),
            });
        }
        Err(bad("expected file:///path or s3://bucket/prefix"))
    }
}

/// The recordings' store, as the server uses it.
#[derive(Clone)]
pub struct Storage {
    /// Where the recorder writes: the recordings themselves (local), or the
    /// spool of what is not uploaded yet (remote).
    spool_dir: PathBuf,
    objects: Arc<dyn ObjectStore>,
    /// The recordings' key prefix inside `objects`.
    prefix: ObjectPath,
    remote: Option<Remote>,
}

#[derive(Clone)]
struct Remote {
    /// `s3://bucket/prefix`, to name objects in messages and sidecars.
    base_url: String,
    multipart: Arc<dyn MultipartStore>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("spool_dir", &self.spool_dir)
            .field("remote", &self.remote.as_ref().map(|r| &r.base_url))
            .finish()
    }
}

impl Storage {
    /// Opens the store `url` names (`None`: `recordings_dir` itself), with
    /// `recordings_dir` as the spool, which is created if missing.
    pub fn open(url: Option<&RecordingsUrl>, recordings_dir: &Path) -> Result<Self, StorageError> {
        let local = |dir: &Path| -> Result<Self, StorageError> {
            std::fs::create_dir_all(dir).map_err(|source| StorageError::Dir {
                path: dir.to_path_buf(),
                source,
            })?;
            let objects =
                LocalFileSystem::new_with_prefix(dir).map_err(|source| StorageError::Store {
                    url: format!("file://{}", dir.display()),
                    source,
                })?;
            Ok(Self {
                spool_dir: dir.to_path_buf(),
                objects: Arc::new(objects),
                prefix: ObjectPath::default(),
                remote: None,
            })
        };
        match url {
            None => local(recordings_dir),
            Some(RecordingsUrl::File(dir)) => local(dir),
            Some(RecordingsUrl::S3 { bucket, prefix }) => {
                let base_url = if prefix.is_empty() {
                    format!("s3://{bucket}")
                } else {
                    format!("s3://{bucket}/{prefix}")
                };
                std::fs::create_dir_all(recordings_dir).map_err(|source| StorageError::Dir {
                    path: recordings_dir.to_path_buf(),
                    source,
                })?;
                // reqwest is built without a crypto provider and takes the
                // process default: ring, as everywhere else (installing it
                // twice is refused harmlessly). object_store signs with ring
                // too: no aws-lc in the build.
                let _ = rustls::crypto::ring::default_provider().install_default();
                // Few quick retries inside object_store: the upload task
                // retries for as long as it takes, with its own backoff,
                // and tells the client while the store is down.
                let retry = object_store::RetryConfig {
                    max_retries: 2,
                    retry_timeout: Duration::from_secs(20),
                    ..Default::default()
                };
                // Timeouts as configuration keys: `with_client_options`
                // would replace what the environment set (AWS_ALLOW_HTTP).
                use object_store::aws::AmazonS3ConfigKey::Client;
                use object_store::ClientConfigKey::{ConnectTimeout, Timeout};
                let s3 = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry)
                    .with_config(Client(ConnectTimeout), "5s")
                    .with_config(Client(Timeout), "60s")
                    .build()
                    .map_err(|source| StorageError::Store {
                        url: base_url.clone(),
                        source,
                    })?;
                let s3 = Arc::new(s3);
                Ok(Self {
                    spool_dir: recordings_dir.to_path_buf(),
                    objects: s3.clone(),
                    prefix: ObjectPath::from(prefix.as_str()),
                    remote: Some(Remote {
                        base_url,
                        multipart: s3,
                    }),
                })
            }
        }
    }

    /// The directory the recorder writes into.
    pub fn spool_dir(&self) -> &Path {
        &self.spool_dir
    }

    /// Every recording and sidecar, under [`Storage::key`] names.
    pub fn objects(&self) -> &Arc<dyn ObjectStore> {
        &self.objects
    }

    /// The key of the recording file `file_name` (a server-made name).
    pub fn key(&self, file_name: &str) -> ObjectPath {
        self.prefix.clone().join(file_name)
    }

    /// The prefix every recording's key starts with.
    pub fn prefix(&self) -> &ObjectPath {
        &self.prefix
    }

    /// Whether recordings are uploaded (the spool is not their home).
    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// The multipart side of a remote store.
    pub fn multipart(&self) -> Option<&Arc<dyn MultipartStore>> {
        self.remote.as_ref().map(|r| &r.multipart)
    }

    /// Where `file_name` is, as a URL (`s3://…`) for a remote store.
    pub fn object_url(&self, file_name: &str) -> Option<String> {
        self.remote
            .as_ref()
            .map(|r| format!("{}/{file_name}", r.base_url))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_into_a_directory_or_a_bucket_and_prefix() {
        assert_eq!(
            RecordingsUrl::parse("file:///srv/rec").unwrap(),
            RecordingsUrl::File(PathBuf::from("/srv/rec"))
        );
        assert_eq!(
            RecordingsUrl::parse("s3://calls/2026/eu/").unwrap(),
            RecordingsUrl::S3 {
                bucket: "calls".into(),
                prefix: "2026/eu".into()
            }
        );
        assert_eq!(
            RecordingsUrl::parse("s3://calls").unwrap(),
            RecordingsUrl::S3 {
                bucket: "calls".into(),
                prefix: String::new()
            }
        );
        for bad in [
            "file://relative",
            "s3:///x",
            "http://x",
            "s3://b/../x",
            "/srv",
        ] {
            assert!(RecordingsUrl::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn local_storage_keys_files_by_name_under_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let storage = Storage::open(None, dir.path()).unwrap();
        assert!(!storage.is_remote());
        assert_eq!(storage.key("a.wav").as_ref(), "a.wav");
        assert_eq!(storage.object_url("a.wav"), None);
    }
}
