//! The browser page (`/`, sources in samples/web/, compiled into the binary
//! so it works from any directory) and finished recordings over HTTP
//! (`/v1/recordings/<session_id>.wav`), which the page links to.
//!
//! The page is public: it holds no secret, and a visitor still needs a
//! credential (its `?token=`) to stream. Recordings take exactly the
//! credentials `/v1/stream` takes, and their names are checked against the
//! server's own session-id format before any path is built, so no request
//! can name another file.

use actix_web::http::header::{self, ContentType};
use actix_web::{web, HttpRequest, HttpResponse};
use serde_json::json;

use super::AppState;

const INDEX_HTML: &str = include_str!("../../samples/web/index.html");
const APP_JS: &str = include_str!("../../samples/web/app.js");
const WORKLET_JS: &str = include_str!("../../samples/web/worklet.js");
const STYLE_CSS: &str = include_str!("../../samples/web/style.css");

/// The page may talk to its own server only, run only its own scripts, and
/// play recordings from its own server; nothing from elsewhere.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
     connect-src 'self' ws: wss:; media-src 'self'; img-src 'self' data:; \
     base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/", web::get().to(index))
        .route("/app.js", web::get().to(app_js))
        .route("/worklet.js", web::get().to(worklet_js))
        .route("/style.css", web::get().to(style_css))
        .route("/v1/recordings/{name}", web::get().to(recording));
}

fn asset(content_type: &'static str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, content_type))
        // Always revalidated: a new server version serves a new page.
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .insert_header((header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY))
        .insert_header((header::REFERRER_POLICY, "no-referrer"))
        .body(body)
}

async fn index() -> HttpResponse {
    asset("text/html; charset=utf-8", INDEX_HTML)
}

async fn app_js() -> HttpResponse {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn worklet_js() -> HttpResponse {
    asset("text/javascript; charset=utf-8", WORKLET_JS)
}

async fn style_css() -> HttpResponse {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

/// True for a session id exactly as the server makes them: a UUID,
/// lowercase and hyphenated (36 characters).
pub fn is_session_id(text: &str) -> bool {
    text.len() == 36
        && uuid::Uuid::parse_str(text).is_ok_and(|id| id.hyphenated().to_string() == text)
}

/// The recording a file name stands for: `<id>.wav`, or `<id>.ch0.wav` /
/// `<id>.ch1.wav` with `recorder.channels = "split"`. Returns the WAV and
/// sidecar file names.
pub fn recording_files(name: &str) -> Option<(String, String)> {
    let stem = name.strip_suffix(".wav")?;
    let (id, channel) = match stem.split_once('.') {
        Some((id, channel @ ("ch0" | "ch1"))) => (id, Some(channel)),
        Some(_) => return None,
        None => (stem, None),
    };
    if !is_session_id(id) {
        return None;
    }
    let base = match channel {
        Some(channel) => format!("{id}.{channel}"),
        None => id.to_owned(),
    };
    Some((format!("{base}.wav"), format!("{base}.json")))
}

fn not_found(message: &str) -> HttpResponse {
    HttpResponse::NotFound()
        .content_type(ContentType::json())
        .json(json!({ "error": "not_found", "message": message }))
}

/// `GET /v1/recordings/<session_id>.wav`: a finished recording, with the
/// same authentication as `/v1/stream` (`Authorization: Bearer`, `?token=`).
async fn recording(
    req: HttpRequest,
    name: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let token = web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .ok()
        .and_then(|pairs| {
            pairs
                .into_inner()
                .into_iter()
                .find(|(k, _)| k == "token")
                .map(|(_, v)| v)
        });
    if let Err(error) = super::authenticate(&req, &state.auth, token.as_deref()) {
        return super::refuse_http(&error);
    }
    let Some((wav, sidecar)) = recording_files(&name) else {
        return not_found(
            "a recording is named <session_id>.wav (or <session_id>.ch0.wav / .ch1.wav)",
        );
    };
    let dir = state.storage.spool_dir();
    // Only finished recordings: the sidecar says so once the WAV is final.
    let complete = match std::fs::read(dir.join(&sidecar)) {
        Ok(bytes) => serde_json::from_slice::<serde_json::Value>(&bytes)
            .map(|v| v["complete"] == true)
            .unwrap_or(false),
        Err(_) => return not_found("no such recording"),
    };
    if !complete {
        return HttpResponse::Conflict().json(json!({
            "error": "recording_unfinished",
            "message": "the recording is not finished yet (or its session failed); try again after `closed`",
        }));
    }
    let path = dir.join(&wav);
    match web::block(move || actix_files::NamedFile::open(path)).await {
        Ok(Ok(file)) => file
            .set_content_type(
                "audio/wav"
                    .parse()
                    .unwrap_or(actix_web::mime::APPLICATION_OCTET_STREAM),
            )
            .use_etag(true)
            .into_response(&req),
        Ok(Err(_)) | Err(_) => not_found("no such recording"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_server_made_names_are_recordings() {
        let id = "01a1fe8b-654d-72fd-99f9-7c0fa87dd94a";
        assert_eq!(
            recording_files(&format!("{id}.wav")),
            Some((format!("{id}.wav"), format!("{id}.json")))
        );
        assert_eq!(
            recording_files(&format!("{id}.ch1.wav")),
            Some((format!("{id}.ch1.wav"), format!("{id}.ch1.json")))
        );
        for bad in [
            format!("{id}.json"),
            format!("{id}.ch2.wav"),
            id.to_string(),
            format!("../{id}.wav"),
            format!("{}.wav", id.to_uppercase()),
            format!("{}.wav", id.replace('-', "")),
            format!("{{{id}}}.wav"),
            "..%2F..%2Fetc%2Fpasswd.wav".into(),
            "/etc/passwd".into(),
            ".wav".into(),
            format!("{id}.wav.wav"),
            format!("{id}.x.ch0.wav"),
        ] {
            assert_eq!(recording_files(&bad), None, "{bad}");
        }
    }
}
