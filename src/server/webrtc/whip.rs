//! WHIP (RFC 9725): `POST /v1/whip` with an SDP offer creates a session and
//! answers `201 Created` with its resource in `Location`; `DELETE` on the
//! resource ends it as `stop` does; `PATCH` takes trickled candidates and
//! ICE restarts (`application/trickle-ice-sdpfrag`). Credentials and query
//! parameters are those of `/v1/stream`; CORS follows `allowed_origins`.

use std::time::{Duration, SystemTime};

use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse, HttpResponseBuilder};
use serde_json::json;
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use super::peer::PeerCommand;
use super::sdp::{self, MAX_SDP_BYTES};
use super::WebrtcError;
use crate::protocol::{ConnectRequest, ErrorCode, ProtocolError};
use crate::server::close::SessionError;
use crate::server::dialect::native::Native;
use crate::server::registry::Refusal;
use crate::server::{
    authenticate, header as header_str, parse_query, refuse_http, session, AppState,
};
use crate::session::{Output, SessionCore, SessionLimits};
use crate::telemetry::names;

const SDP: &str = "application/sdp";
const SDP_FRAGMENT: &str = "application/trickle-ice-sdpfrag";

pub fn routes(config: &mut web::ServiceConfig) {
    config
        .route("/v1/whip", web::post().to(create))
        .route(
            "/v1/whip",
            web::method(actix_web::http::Method::OPTIONS).to(preflight),
        )
        .route("/v1/whip/{id}", web::delete().to(delete))
        .route("/v1/whip/{id}", web::patch().to(patch))
        .route(
            "/v1/whip/{id}",
            web::method(actix_web::http::Method::OPTIONS).to(preflight),
        );
}

/// An error as WHIP clients get it: a status and the JSON body every other
/// route of cochlea answers errors with.
fn refuse(req: &HttpRequest, status: StatusCode, code: ErrorCode, message: String) -> HttpResponse {
    tracing::info!(%code, %message, "whip request refused");
    cors(req, HttpResponse::build(status))
        .json(json!({ "error": code.as_str(), "message": message }))
}

/// [`cors`] on a response already built.
fn with_cors(req: &HttpRequest, mut response: HttpResponse) -> HttpResponse {
    if let Some(origin) = req.headers().get(header::ORIGIN).cloned() {
        let headers = response.headers_mut();
        headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        headers.insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    response
}

/// CORS headers for a browser page on an allowed origin (every origin when
/// `allowed_origins` is empty): `Location` must be readable to `DELETE` it.
fn cors(req: &HttpRequest, mut response: HttpResponseBuilder) -> HttpResponseBuilder {
    if let Some(origin) = req.headers().get(header::ORIGIN).cloned() {
        response.insert_header((header::ACCESS_CONTROL_ALLOW_ORIGIN, origin));
        response.insert_header((header::VARY, "Origin"));
        response.insert_header((
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            "Location, ETag, Link",
        ));
    }
    response
}

async fn preflight(req: HttpRequest, state: web::Data<AppState>) -> HttpResponse {
    if let Err(error) = state.auth.check_origin(header_str(&req, header::ORIGIN)) {
        // No CORS headers: the browser refuses the page's request.
        return refuse_http(&error);
    }
    let mut response = cors(&req, HttpResponse::NoContent());
    response.insert_header((
        header::ACCESS_CONTROL_ALLOW_METHODS,
        "POST, DELETE, PATCH, OPTIONS",
    ));
    response.insert_header((
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        "Authorization, Content-Type, If-Match",
    ));
    response.insert_header((header::ACCESS_CONTROL_MAX_AGE, "600"));
    response.insert_header((header::ALLOW, "POST, DELETE, PATCH, OPTIONS"));
    response.finish()
}

fn content_type_is(req: &HttpRequest, wanted: &str) -> bool {
    header_str(req, header::CONTENT_TYPE)
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(wanted))
}

async fn create(req: HttpRequest, body: web::Bytes, state: web::Data<AppState>) -> HttpResponse {
    let (query_token, connect) = parse_query(req.query_string());
    let principal = match authenticate(&req, &state.auth, query_token.as_deref()) {
        Ok(principal) => principal,
        Err(error) => return with_cors(&req, refuse_http(&error)),
    };
    if !content_type_is(&req, SDP) {
        return refuse(
            &req,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::BadSdp,
            format!("a WHIP offer is sent as {SDP}"),
        );
    }
    if body.len() > MAX_SDP_BYTES {
        return refuse(
            &req,
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::BadSdp,
            format!("the offer is over the limit of {MAX_SDP_BYTES} bytes"),
        );
    }
    let Ok(offer_sdp) = std::str::from_utf8(&body) else {
        return refuse(
            &req,
            StatusCode::BAD_REQUEST,
            ErrorCode::BadSdp,
            "the offer is not UTF-8 text".into(),
        );
    };
    let request = match connect {
        Ok(ConnectRequest::New(request)) => request,
        Ok(ConnectRequest::Resume { .. }) => {
            return refuse(
                &req,
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidMessage,
                "a WHIP session cannot be resumed with resume=: restart ICE with PATCH".into(),
            )
        }
        Err(error) => return protocol_refusal(&req, &error),
    };
    let offer = match sdp::opus_offer(offer_sdp) {
        Ok(offer) => offer,
        Err(error) => {
            return refuse(
                &req,
                StatusCode::BAD_REQUEST,
                ErrorCode::BadSdp,
                error.to_string(),
            )
        }
    };
    let request = match request.for_webrtc(offer.channels) {
        Ok(request) => request,
        Err(error) => return protocol_refusal(&req, &error),
    };
    let env = &state.env;
    let Some(endpoint) = env.webrtc.get() else {
        return refuse(
            &req,
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::WebrtcUnavailable,
            WebrtcError::Disabled.to_string(),
        );
    };
    if session::is_shutting_down(&env.shutdown) {
        return refuse(
            &req,
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::ShuttingDown,
            "server is shutting down".into(),
        );
    }
    let key_id = principal.as_ref().map(|p| p.key_id.as_str());
    let guard = match state.registry.try_admit(key_id) {
        Ok(guard) => guard,
        Err(refusal) => {
            let (status, error) = match refusal {
                Refusal::ServerFull => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    SessionError::ServerFull {
                        max_sessions: state.registry.max_sessions(),
                    },
                ),
                Refusal::KeyFull => (
                    StatusCode::TOO_MANY_REQUESTS,
                    SessionError::KeyFull {
                        max_sessions_per_key: state.registry.max_per_key(),
                    },
                ),
            };
            return refuse(&req, status, error.codes().0, error.to_string());
        }
    };
    let id = uuid::Uuid::now_v7().to_string();
    let (events_tx, events) = mpsc::unbounded_channel();
    let now = std::time::Instant::now();
    let mut core = SessionCore::new(
        id.clone(),
        env.config.clone(),
        env.sinks.clone(),
        Box::new(Native),
        events_tx,
        SessionLimits {
            max_session_ms: principal.as_ref().and_then(|p| p.max_session_ms),
        },
        now,
        SystemTime::now(),
    );
    core.use_whip();
    core.open(Ok(request), now);
    // A request the core refuses (an unknown sink, a refused record
    // format) is answered here, before any media flows.
    if core.is_finishing() || core.is_ended() {
        while let Some(output) = core.poll_output() {
            if let Output::Text(text) = output {
                if let Ok(message) = serde_json::from_str::<serde_json::Value>(&text) {
                    if message["type"] == "error" {
                        return cors(&req, HttpResponse::BadRequest()).json(json!({
                            "error": message["code"],
                            "message": message["message"],
                        }));
                    }
                }
            }
        }
        return refuse(
            &req,
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidMessage,
            "the session could not start".into(),
        );
    }
    let span = tracing::info_span!("whip", id = %id);
    let negotiated = match span.in_scope(|| endpoint.negotiate(&id, offer_sdp, true)) {
        Ok(negotiated) => negotiated,
        Err(error) => {
            let (code, _) = SessionError::Webrtc(error).codes();
            return refuse(&req, StatusCode::BAD_REQUEST, code, format!("{}", code));
        }
    };
    metrics::counter!(names::WEBRTC_SESSIONS_TOTAL, "signalling" => "whip").increment(1);
    let location = format!("/v1/whip/{id}");
    actix_web::rt::spawn(
        session::run_whip(core, events, negotiated.link, env.clone(), guard).instrument(span),
    );
    let mut response = cors(&req, HttpResponse::Created());
    response.insert_header((header::CONTENT_TYPE, SDP));
    if let Ok(value) = HeaderValue::from_str(&location) {
        response.insert_header((header::LOCATION, value));
    }
    response.body(negotiated.answer)
}

fn protocol_refusal(req: &HttpRequest, error: &ProtocolError) -> HttpResponse {
    let code = crate::server::close::protocol_error_code(error);
    refuse(req, StatusCode::BAD_REQUEST, code, error.to_string())
}

/// The peer of `id` for a `DELETE` or `PATCH` with the stream credentials.
fn peer_of(
    req: &HttpRequest,
    state: &AppState,
    id: &str,
) -> Result<mpsc::Sender<PeerCommand>, Box<HttpResponse>> {
    let (query_token, _) = parse_query(req.query_string());
    if let Err(error) = authenticate(req, &state.auth, query_token.as_deref()) {
        return Err(Box::new(with_cors(req, refuse_http(&error))));
    }
    state
        .env
        .webrtc
        .get()
        .and_then(|endpoint| endpoint.whip_peer(id))
        .ok_or_else(|| {
            Box::new(refuse(
                req,
                StatusCode::NOT_FOUND,
                ErrorCode::InvalidMessage,
                "no WHIP session with that id on this server".into(),
            ))
        })
}

async fn delete(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> HttpResponse {
    let peer = match peer_of(&req, &state, &path) {
        Ok(peer) => peer,
        Err(response) => return *response,
    };
    if peer.send(PeerCommand::Stop).await.is_err() {
        return refuse(
            &req,
            StatusCode::NOT_FOUND,
            ErrorCode::InvalidMessage,
            "the session has ended".into(),
        );
    }
    cors(&req, HttpResponse::Ok()).finish()
}

async fn patch(
    req: HttpRequest,
    path: web::Path<String>,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> HttpResponse {
    let peer = match peer_of(&req, &state, &path) {
        Ok(peer) => peer,
        Err(response) => return *response,
    };
    if !content_type_is(&req, SDP_FRAGMENT) {
        return refuse(
            &req,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ErrorCode::BadSdp,
            format!("PATCH takes {SDP_FRAGMENT}"),
        );
    }
    let Some(fragment) = std::str::from_utf8(&body)
        .ok()
        .filter(|f| f.len() <= MAX_SDP_BYTES)
    else {
        return refuse(
            &req,
            StatusCode::BAD_REQUEST,
            ErrorCode::BadSdp,
            format!("the fragment must be UTF-8 text of at most {MAX_SDP_BYTES} bytes"),
        );
    };
    let candidates: Vec<String> = sdp::candidates(fragment).map(str::to_owned).collect();
    if let Some((ufrag, pwd)) = sdp::restart_credentials(fragment) {
        // An ICE restart (RFC 9725 §4.4): new credentials both ways.
        let (reply, answer) = oneshot::channel();
        let command = PeerCommand::RestartIce {
            ufrag: ufrag.to_owned(),
            pwd: pwd.to_owned(),
            reply,
        };
        if peer.send(command).await.is_err() {
            return refuse(
                &req,
                StatusCode::NOT_FOUND,
                ErrorCode::InvalidMessage,
                "the session has ended".into(),
            );
        }
        let answer = match tokio::time::timeout(Duration::from_secs(5), answer).await {
            Ok(Ok(Ok(answer))) => answer,
            Ok(Ok(Err(error))) => {
                return refuse(
                    &req,
                    StatusCode::BAD_REQUEST,
                    ErrorCode::BadSdp,
                    error.to_string(),
                )
            }
            _ => {
                return refuse(
                    &req,
                    StatusCode::NOT_FOUND,
                    ErrorCode::InvalidMessage,
                    "the session has ended".into(),
                )
            }
        };
        let _ = peer.send(PeerCommand::Candidates(candidates)).await;
        let mut body = String::new();
        for line in answer.lines().map(str::trim_end) {
            if line.starts_with("a=ice-ufrag:") || line.starts_with("a=ice-pwd:") {
                if !body.contains(line.split(':').next().unwrap_or_default()) {
                    body.push_str(line);
                    body.push_str("\r\n");
                }
            } else if line.starts_with("a=candidate:") && !body.contains(line) {
                body.push_str(line);
                body.push_str("\r\n");
            }
        }
        let mut response = cors(&req, HttpResponse::Ok());
        response.insert_header((header::CONTENT_TYPE, SDP_FRAGMENT));
        return response.body(body);
    }
    if peer
        .send(PeerCommand::Candidates(candidates))
        .await
        .is_err()
    {
        return refuse(
            &req,
            StatusCode::NOT_FOUND,
            ErrorCode::InvalidMessage,
            "the session has ended".into(),
        );
    }
    cors(&req, HttpResponse::NoContent()).finish()
}
