//! `GET /v1/sessions/<id>/events`: a session's events as Server-Sent Events,
//! from any node of a cluster. The stored ones first (JetStream keeps them
//! `cluster.events_max_age_s`), then live ones as they happen, until the
//! session's `closed`. Each event's `id` is its JetStream sequence: a client
//! that reconnects with `Last-Event-ID` (or `?after=`) gets what followed.
//!
//! Credentials as for `/v1/stream`. Without cluster mode there is no event
//! store: 404 `not_in_cluster_mode`.

use std::time::Duration;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use serde_json::json;

use super::AppState;
use crate::cluster::{check_session_id, events, ClusterError};

/// A comment line this often keeps proxies from closing a quiet stream.
const KEEPALIVE: Duration = Duration::from_secs(15);

pub fn routes(config: &mut web::ServiceConfig) {
    config.route("/v1/sessions/{id}/events", web::get().to(session_events));
}

fn error(status: actix_web::http::StatusCode, code: &str, message: String) -> HttpResponse {
    HttpResponse::build(status)
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .json(json!({ "error": code, "message": message }))
}

/// Where to start: after `Last-Event-ID`, else `?after=`, else from the first.
fn after(req: &HttpRequest) -> Result<u64, String> {
    let from_header = req
        .headers()
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let from_query = super::recordings::query_pairs(req)?
        .into_iter()
        .find(|(k, _)| k == "after")
        .map(|(_, v)| v);
    match from_header.or(from_query) {
        None => Ok(0),
        Some(text) => text.trim().parse::<u64>().map_err(|_| {
            format!("Last-Event-ID / after must be an event id (a number), not {text:?}")
        }),
    }
}

async fn session_events(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    use actix_web::http::StatusCode;
    if let Some(refusal) = super::recordings::refusal(&req, &state) {
        return refusal;
    }
    let Some(cluster) = state.env.cluster.clone() else {
        return error(
            StatusCode::NOT_FOUND,
            "not_in_cluster_mode",
            "session events are kept on NATS, in cluster mode only (cluster.nats_url)".into(),
        );
    };
    let id = path.into_inner();
    if let Err(e) = check_session_id(&id) {
        return error(StatusCode::BAD_REQUEST, "invalid_request", e.to_string());
    }
    let after = match after(&req) {
        Ok(after) => after,
        Err(message) => return error(StatusCode::BAD_REQUEST, "invalid_request", message),
    };
    match events::follow(cluster.jetstream(), &id, after).await {
        Ok(stored) => HttpResponse::Ok()
            .insert_header((header::CONTENT_TYPE, "text/event-stream"))
            .insert_header((header::CACHE_CONTROL, "no-store"))
            // nginx would otherwise hold the stream back.
            .insert_header(("x-accel-buffering", "no"))
            .streaming(sse(stored)),
        Err(e) => {
            tracing::warn!(error = %e, "session events unavailable");
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "events_unavailable",
                e.to_string(),
            )
        }
    }
}

/// The SSE body: `id`, `event` (the message's `type`) and `data` per event,
/// a comment when quiet, and the end after `closed`.
fn sse(
    stored: impl Stream<Item = Result<events::StoredEvent, ClusterError>> + Unpin + 'static,
) -> impl Stream<Item = Result<Bytes, actix_web::Error>> {
    futures_util::stream::unfold((stored, false), |(mut stored, done)| async move {
        if done {
            return None;
        }
        match tokio::time::timeout(KEEPALIVE, stored.next()).await {
            Err(_) => Some((Ok(Bytes::from_static(b": keepalive\n\n")), (stored, false))),
            Ok(None) => None,
            Ok(Some(Err(e))) => {
                tracing::warn!(error = %e, "session events stream failed");
                None
            }
            Ok(Some(Ok(event))) => {
                let kind = serde_json::from_slice::<serde_json::Value>(&event.json)
                    .ok()
                    .and_then(|v| v.get("type").and_then(|t| t.as_str()).map(str::to_owned))
                    .unwrap_or_else(|| "message".to_owned());
                let closed = kind == "closed";
                let mut frame =
                    format!("id: {}\nevent: {kind}\ndata: ", event.sequence).into_bytes();
                frame.extend_from_slice(&event.json);
                frame.extend_from_slice(b"\n\n");
                Some((Ok(Bytes::from(frame)), (stored, closed)))
            }
        }
    })
}
