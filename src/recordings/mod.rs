//! Recordings read back: the catalog of what the store holds, the list
//! query, downloads' byte ranges, deletion and retention.
//!
//! Everything here reads the store through [`Storage::objects`] (an
//! `object_store` for a local directory or an S3 bucket alike), never the
//! file system, so the same code serves both. The HTTP side is thin
//! (`server/recordings.rs`); the pure parts (names, query, ranges, the
//! retention schedule) take their inputs, time included, as arguments.
//!
//! | file           | job                                                      |
//! |----------------|----------------------------------------------------------|
//! | `names.rs`     | which object names are a session's files (pure)          |
//! | `catalog.rs`   | the in-memory index of sessions, refreshed from listings |
//! | `query.rs`     | list parameters, the cursor, filters and pages (pure)    |
//! | `range.rs`     | HTTP byte ranges (pure)                                  |
//! | `retention.rs` | the retention schedule (pure) and its sweep task         |
//!
//! [`Storage::objects`]: crate::storage::Storage::objects

pub mod catalog;
pub mod names;
pub mod query;
pub mod range;
pub mod retention;

pub use catalog::{Catalog, Session};
pub use query::{ListQuery, QueryError};
pub use range::ByteRange;

/// The recordings API's download route of the file `name` of session `id`.
pub fn file_url(id: &str, name: &str) -> String {
    format!("/v1/recordings/{id}/files/{name}")
}

/// What the recordings routes can fail with; each has an error code and an
/// HTTP status (proto/PROTOCOL.md, "Recordings API").
#[derive(Debug, thiserror::Error)]
pub enum RecordingsError {
    #[error("no such recording")]
    NotFound,
    #[error("the session is still recording: try again after it ends")]
    InProgress,
    #[error("the recording is not finished yet (or its session failed); try again after `closed`")]
    Unfinished,
    #[error("{0}")]
    Query(#[from] QueryError),
    #[error("the range is outside the file ({size} bytes)")]
    RangeNotSatisfiable { size: u64 },
    #[error("the transcript is too large to return ({bytes} bytes, at most {max})")]
    TooLarge { bytes: u64, max: u64 },
    #[error("recordings store: {0}")]
    Store(#[from] object_store::Error),
}

impl RecordingsError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::InProgress => "recording_in_progress",
            Self::Unfinished => "recording_unfinished",
            Self::Query(_) => "invalid_query",
            Self::RangeNotSatisfiable { .. } => "range_not_satisfiable",
            Self::TooLarge { .. } => "too_large",
            Self::Store(_) => "storage_failed",
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            Self::NotFound => 404,
            Self::InProgress | Self::Unfinished => 409,
            Self::Query(_) => 400,
            Self::RangeNotSatisfiable { .. } => 416,
            Self::TooLarge { .. } | Self::Store(_) => 500,
        }
    }
}

/// A store error that means the object is not there.
pub(crate) fn is_not_found(error: &object_store::Error) -> bool {
    matches!(error, object_store::Error::NotFound { .. })
}
