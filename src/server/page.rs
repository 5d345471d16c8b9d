//! The browser pages, compiled into the binary so they work from any
//! directory (sources in samples/web/): the microphone page (`/`) and the
//! recordings page (`/recordings`). Recordings themselves are served by the
//! recordings API (`server/recordings.rs`), which both pages call.
//!
//! The pages are public: they hold no secret, and a visitor still needs a
//! credential (the page's `?token=`) to stream or to see any recording.

use actix_web::http::header;
use actix_web::{web, HttpResponse};

const INDEX_HTML: &str = include_str!("../../samples/web/index.html");
const APP_JS: &str = include_str!("../../samples/web/app.js");
const WORKLET_JS: &str = include_str!("../../samples/web/worklet.js");
const STYLE_CSS: &str = include_str!("../../samples/web/style.css");
const RECORDINGS_HTML: &str = include_str!("../../samples/web/recordings.html");
const RECORDINGS_JS: &str = include_str!("../../samples/web/recordings.js");
const RECORDINGS_CSS: &str = include_str!("../../samples/web/recordings.css");

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
        .route("/recordings", web::get().to(recordings_html))
        .route("/recordings.js", web::get().to(recordings_js))
        .route("/recordings.css", web::get().to(recordings_css));
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

async fn recordings_html() -> HttpResponse {
    asset("text/html; charset=utf-8", RECORDINGS_HTML)
}

async fn recordings_js() -> HttpResponse {
    asset("text/javascript; charset=utf-8", RECORDINGS_JS)
}

async fn recordings_css() -> HttpResponse {
    asset("text/css; charset=utf-8", RECORDINGS_CSS)
}
