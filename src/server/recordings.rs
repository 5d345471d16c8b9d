//! The recordings API over HTTP: thin handlers over [`crate::recordings`].
//!
//! - `GET /v1/recordings`: a page of sessions, newest first, filtered;
//! - `GET /v1/recordings/<id>`: a session's sidecars and transcript;
//! - `GET /v1/recordings/<id>/files/<name>`: one audio file, with Range
//!   requests, streamed from the store;
//! - `GET /v1/recordings/<name>`: the same file by its name alone (the
//!   microphone page's links, kept);
//! - `DELETE /v1/recordings/<id>`.
//!
//! Every route takes the credentials of `/v1/stream` (`Authorization:
//! Bearer`, `?token=`), checked before anything else, so a caller without
//! them learns nothing, not even whether a recording exists. Client names
//! are checked against the server's own formats ([`names::classify`])
//! before any key is built. Statuses and codes: proto/PROTOCOL.md.

use std::time::{Duration, UNIX_EPOCH};

use actix_web::http::header::{self, HttpDate};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use object_store::{GetOptions, GetRange, ObjectStoreExt};
use serde_json::json;

use super::AppState;
use crate::recordings::catalog::{SidecarFields, REFRESH_INTERVAL};
use crate::recordings::names::{self, FileKind};
use crate::recordings::{is_not_found, ByteRange, ListQuery, QueryError, RecordingsError};

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/v1/recordings", web::get().to(list))
        .route("/v1/recordings/{name}", web::get().to(get_named))
        .route("/v1/recordings/{name}", web::delete().to(delete))
        .route("/v1/recordings/{id}/files/{name}", web::get().to(file));
}

pub(super) fn query_pairs(req: &HttpRequest) -> Result<Vec<(String, String)>, String> {
    web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| format!("query string: {e}"))
}

/// The `/v1/stream` credentials, from a header or `?token=`; the refusal
/// if they do not hold.
pub(super) fn refusal(req: &HttpRequest, state: &AppState) -> Option<HttpResponse> {
    let token = query_pairs(req).ok().and_then(|pairs| {
        pairs
            .into_iter()
            .find(|(k, _)| k == "token")
            .map(|(_, v)| v)
    });
    super::authenticate(req, &state.auth, token.as_deref())
        .err()
        .map(|error| super::refuse_http(&error))
}

fn error_response(error: &RecordingsError) -> HttpResponse {
    if let RecordingsError::Store(_) | RecordingsError::TooLarge { .. } = error {
        tracing::warn!(%error, "recordings request failed");
    }
    let status =
        StatusCode::from_u16(error.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = HttpResponse::build(status);
    response.insert_header((header::CACHE_CONTROL, "no-store"));
    if let RecordingsError::RangeNotSatisfiable { size } = error {
        response.insert_header((header::CONTENT_RANGE, format!("bytes */{size}")));
    }
    response.json(json!({ "error": error.code(), "message": error.to_string() }))
}

fn json_ok(body: serde_json::Value) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(body)
}

/// `GET /v1/recordings`.
async fn list(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Some(refused) = refusal(&req, &state) {
        return refused;
    }
    let query = match query_pairs(&req) {
        Ok(pairs) => ListQuery::parse(&pairs),
        Err(message) => Err(QueryError::Unknown(message)),
    };
    let query = match query {
        Ok(query) => query,
        Err(error) => return error_response(&error.into()),
    };
    let index = match state.catalog.index(REFRESH_INTERVAL).await {
        Ok(index) => index,
        Err(error) => return error_response(&error),
    };
    let (page, next_cursor) = query.page(&index.sessions);
    json_ok(json!({
        "recordings": page.iter().map(|s| s.summary_json()).collect::<Vec<_>>(),
        "next_cursor": next_cursor,
    }))
}

/// `GET /v1/recordings/<id>` (the session) or `/v1/recordings/<file name>`.
async fn get_named(
    req: HttpRequest,
    name: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    if let Some(refused) = refusal(&req, &state) {
        return refused;
    }
    if names::is_session_id(&name) {
        return match state.catalog.fresh(&name).await {
            Ok(Some(fresh)) => json_ok(fresh.detail_json()),
            Ok(None) => error_response(&RecordingsError::NotFound),
            Err(error) => error_response(&error),
        };
    }
    download(&req, &state, &name).await
}

/// `GET /v1/recordings/<id>/files/<name>`.
async fn file(
    req: HttpRequest,
    path: web::Path<(String, String)>,
    state: web::Data<AppState>,
) -> HttpResponse {
    if let Some(refused) = refusal(&req, &state) {
        return refused;
    }
    let (id, name) = path.into_inner();
    match names::classify(&name) {
        Some(file) if file.session_id == id => download(&req, &state, &name).await,
        _ => error_response(&RecordingsError::NotFound),
    }
}

/// `DELETE /v1/recordings/<id>`.
async fn delete(
    req: HttpRequest,
    id: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    if let Some(refused) = refusal(&req, &state) {
        return refused;
    }
    if !names::is_session_id(&id) {
        return error_response(&RecordingsError::NotFound);
    }
    match state.catalog.delete(&id).await {
        Ok(deleted) => {
            tracing::info!(session_id = %id, files = deleted.len(), "recording deleted");
            json_ok(json!({ "session_id": *id, "deleted": deleted }))
        }
        Err(error) => error_response(&error),
    }
}

fn quoted(e_tag: &str) -> String {
    if e_tag.starts_with('"') || e_tag.starts_with("W/") {
        e_tag.to_owned()
    } else {
        format!("\"{e_tag}\"")
    }
}

/// One finished audio file, streamed from the store (never read whole into
/// memory), with a single byte range if asked for.
async fn download(req: &HttpRequest, state: &AppState, name: &str) -> HttpResponse {
    match try_download(req, state, name).await {
        Ok(response) => response,
        Err(error) => error_response(&error),
    }
}

async fn try_download(
    req: &HttpRequest,
    state: &AppState,
    name: &str,
) -> Result<HttpResponse, RecordingsError> {
    let Some(file) = names::classify(name) else {
        return Err(RecordingsError::NotFound);
    };
    let FileKind::Audio(kind) = file.kind else {
        return Err(RecordingsError::NotFound);
    };
    // Only finished recordings: the sidecar says so once the file is final.
    let sidecar = state
        .catalog
        .read_sidecar_json(&format!("{}.json", file.stem))
        .await?
        .and_then(|json| serde_json::from_value::<SidecarFields>(json).ok())
        .filter(|s| s.recording == name && s.session_id == file.session_id)
        .ok_or(RecordingsError::NotFound)?;
    if !sidecar.complete {
        return Err(RecordingsError::Unfinished);
    }
    let objects = state.catalog.storage().objects();
    let key = state.catalog.storage().key(name);
    let meta = match objects.head(&key).await {
        Ok(meta) => meta,
        Err(error) if is_not_found(&error) => return Err(RecordingsError::NotFound),
        Err(error) => return Err(error.into()),
    };
    let e_tag = meta.e_tag.as_deref().map(quoted);
    let last_modified = u64::try_from(meta.last_modified.timestamp())
        .ok()
        .map(|s| HttpDate::from(UNIX_EPOCH + Duration::from_secs(s)));
    if let (Some(e_tag), Some(wanted)) = (&e_tag, super::header(req, header::IF_NONE_MATCH)) {
        if wanted
            .split(',')
            .any(|w| w.trim() == e_tag || w.trim() == "*")
        {
            return Ok(HttpResponse::NotModified()
                .insert_header((header::ETAG, e_tag.clone()))
                .finish());
        }
    }
    // If-Range: a range only if the file is still the one the client has.
    let range_header = super::header(req, header::RANGE).filter(|_| {
        super::header(req, header::IF_RANGE)
            .is_none_or(|if_range| e_tag.as_deref() == Some(if_range.trim()))
    });
    let size = meta.size;
    let (status, start, end) = match ByteRange::parse(range_header, size) {
        ByteRange::Unsatisfiable => return Err(RecordingsError::RangeNotSatisfiable { size }),
        ByteRange::Full => (StatusCode::OK, 0, size),
        ByteRange::Partial { start, end } => (StatusCode::PARTIAL_CONTENT, start, end + 1),
    };
    let mut response = HttpResponse::build(status);
    response
        .insert_header((header::CONTENT_TYPE, kind.content_type()))
        .insert_header((header::ACCEPT_RANGES, "bytes"))
        .insert_header((header::CACHE_CONTROL, "private, no-cache"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"));
    if let Some(e_tag) = e_tag {
        response.insert_header((header::ETAG, e_tag));
    }
    if let Some(date) = last_modified {
        response.insert_header((header::LAST_MODIFIED, date));
    }
    if status == StatusCode::PARTIAL_CONTENT {
        response.insert_header((
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{size}", end - 1),
        ));
    }
    if start == end {
        return Ok(response.finish());
    }
    let options = GetOptions {
        range: Some(GetRange::Bounded(start..end)),
        ..GetOptions::default()
    };
    let result = match objects.get_opts(&key, options).await {
        Ok(result) => result,
        Err(error) if is_not_found(&error) => return Err(RecordingsError::NotFound),
        Err(error) => return Err(error.into()),
    };
    let body = result.into_stream().map(|chunk| {
        chunk.map_err(|error| {
            tracing::warn!(%error, "recording download cut short");
            std::io::Error::other(error)
        })
    });
    Ok(response.no_chunking(end - start).streaming(body))
}
