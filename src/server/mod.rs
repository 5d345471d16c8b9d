//! The HTTP server: routes, admission, and graceful shutdown.
//!
//! `GET /v1/stream` upgrades to a WebSocket and spawns one session task
//! ([`session::run`]) on the worker that accepted it. `/healthz`, `/readyz`
//! and `/metrics` are plain HTTP.

pub mod auth;
pub mod close;
pub mod dialect;
mod frame_limit;
mod journaling;
pub mod page;
mod recordings;
mod registry;
mod resume;
pub mod session;
mod session_events;
mod takeover;
mod tls;
pub mod webrtc;

use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use tokio::sync::watch;

use crate::config::Config;
use crate::protocol::{parse_connect, ConnectRequest, ProtocolError, StartRequest};
use crate::storage::upload::Uploader;
use crate::storage::Storage;
use actix_web::http::header;
use close::SessionError;
use dialect::DialectKind;
use registry::{Refusal, SessionRegistry};

use crate::telemetry::names;
use session::SessionEnv;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("recordings: {0}")]
    Storage(String),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("transcription: {0}")]
    Transcription(#[from] crate::sinks::transcriber::backend::BackendError),
    #[error(transparent)]
    Sinks(#[from] crate::sinks::registry::RegistryError),
    #[error("webrtc: {0}")]
    Webrtc(String),
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
}

struct AppState {
    env: SessionEnv,
    auth: Arc<auth::Auth>,
    registry: Arc<SessionRegistry>,
    prometheus: PrometheusHandle,
    ready: Arc<AtomicBool>,
    /// The recordings the store holds, for the routes that read them back.
    catalog: Arc<crate::recordings::Catalog>,
}

/// Runs the server until SIGINT or SIGTERM, then drains sessions and returns.
///
/// Prints one line, `cochlea listening on http://ADDR` (https with TLS), to stdout once bound,
/// with the real port when the configuration asked for port 0.
pub async fn run(config: Config, prometheus: PrometheusHandle) -> Result<(), ServerError> {
    // Fail at startup, not at the first session, if recordings cannot be kept.
    let storage = config
        .recordings_location()
        .map_err(|e| ServerError::Storage(e.to_string()))
        .and_then(|url| {
            Storage::open(url.as_ref(), &config.recorder_dir())
                .map_err(|e| ServerError::Storage(e.to_string()))
        })?;
    // Before any session can write there: repair what a crash left unfinished.
    crate::sinks::recorder::recover::recover_unfinished(storage.spool_dir());
    let uploader = Uploader::start(&storage)?;
    if let Some(uploader) = &uploader {
        tracing::info!(storage = ?storage, "recordings go to the object store");
        // What a killed server left in the spool goes up in the background.
        uploader.recover_spool();
    }

    // Final transcripts are kept beside the recordings, for the recordings API.
    let transcription = Arc::new(
        crate::sinks::transcriber::TranscriptionService::new(&config.transcription)?
            .with_transcripts(storage.spool_dir(), uploader.clone()),
    );
    for name in transcription.backend_names() {
        if let Some(backend) = transcription.backend(&name) {
            tracing::info!(backend = %name, url = backend.url(), "transcription backend");
        }
    }
    let catalog = Arc::new(crate::recordings::Catalog::new(storage));
    let config = Arc::new(config);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let registry = SessionRegistry::new(config.max_sessions, config.max_sessions_per_key);
    let auth = Arc::new(auth::Auth::new(
        &config.api_keys,
        &config.token_secret,
        &config.allowed_origins,
    ));
    if auth.required() {
        tracing::info!(keys = config.api_keys.len(), "authentication on");
    } else {
        tracing::warn!("authentication off: no API keys configured");
    }
    let cluster = match config.cluster.enabled() {
        true => {
            let cluster = crate::cluster::Cluster::start(&config.cluster).await?;
            let counted = registry.clone();
            cluster.count_sessions_with(move || counted.active());
            if config.max_sessions_per_key > 0 {
                let (mine, others) = (registry.clone(), registry.clone());
                cluster.share_key_counts(
                    move || mine.per_key_counts().into_iter().collect(),
                    move |elsewhere| others.set_elsewhere(elsewhere),
                );
            }
            Some(cluster)
        }
        false => None,
    };
    let cluster_handle = cluster.clone();
    let ready = Arc::new(AtomicBool::new(true));
    let webrtc_endpoint: Arc<std::sync::OnceLock<Arc<webrtc::Endpoint>>> = Arc::default();
    let handovers = cluster.clone();
    let state = web::Data::new(AppState {
        auth,
        env: SessionEnv {
            config: config.clone(),
            shutdown: shutdown_rx,
            resumes: Arc::new(resume::ResumeRegistry::default()),
            sinks: Arc::new(crate::sinks::registry::Registry::new(
                &config,
                transcription.clone(),
                uploader.as_ref(),
            )?),
            cluster,
            registry: registry.clone(),
            webrtc: webrtc_endpoint.clone(),
        },
        registry: registry.clone(),
        prometheus: prometheus.clone(),
        ready: ready.clone(),
        catalog: catalog.clone(),
    });

    if let Some(cluster) = handovers {
        actix_web::rt::spawn(takeover::serve_handovers(
            cluster.clone(),
            state.env.clone(),
        ));
        actix_web::rt::spawn(takeover::sweep_orphans(cluster, state.env.clone()));
    }
    let workers = match config.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/v1/stream", web::get().to(stream))
            .route("/twilio", web::get().to(twilio))
            .route("/vonage", web::get().to(vonage))
            .route("/audiofork", web::get().to(audiofork))
            .route("/v1/listen", web::get().to(deepgram))
            .route("/v1/tokens", web::post().to(mint_token))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics_text))
            .configure(page::routes)
            .configure(recordings::routes)
            .configure(session_events::routes)
            .configure(webrtc::whip::routes)
    })
    .workers(workers)
    // Signals are ours: sessions must finish their sinks before workers stop.
    .disable_signals()
    .shutdown_timeout(config.shutdown_timeout().as_secs().max(1))
    // After the WebSocket closing handshake the server closes TCP at once
    // (RFC 6455 §7.1.1). actix's default waits 1 s for the client to hang up
    // first, which kept every client waiting a second after `closed`.
    .client_disconnect_timeout(Duration::ZERO)
    // Slowloris: a client dribbling its request headers is cut off.
    .client_request_timeout(Duration::from_millis(config.request_timeout_ms));
    let tls = match (&config.tls_cert_path, &config.tls_key_path) {
        (Some(cert), Some(key)) => Some(tls::server_config(cert, key)?),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let server = match tls {
        Some(tls) => server.bind_rustls_0_23(config.listen, tls),
        None => server.bind(config.listen),
    }
    .map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;

    // The WebRTC socket, on the HTTP listener's address unless configured:
    // bound before the address is announced, so the first WHIP offer finds it.
    if let Some(http) = server.addrs().first().copied() {
        let endpoint = webrtc::Endpoint::start(&config.webrtc, http)
            .await
            .map_err(|e| ServerError::Webrtc(e.to_string()))?;
        if let Some(endpoint) = endpoint {
            let _ = webrtc_endpoint.set(endpoint);
        }
    }

    // Handlers go in before the address is announced: a signal sent right
    // after the "listening" line must find them (found by a test that did).
    let signals = Signals::install()?;
    for addr in server.addrs() {
        tracing::info!(%addr, "listening");
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "cochlea listening on {scheme}://{addr}");
        let _ = stdout.flush();
    }

    let server = server.run();
    let handle = server.handle();

    // The index is built once at start (the first list request need not
    // wait for it); with retention on, the sweep's first pass does that.
    match config.recordings.retention() {
        Some(retention) => {
            tracing::info!(
                days = config.recordings.retention_days,
                "recordings retention on"
            );
            actix_web::rt::spawn(crate::recordings::retention::run(catalog, retention));
        }
        None => {
            actix_web::rt::spawn(async move {
                if let Err(error) = catalog.index(Duration::ZERO).await {
                    tracing::warn!(%error, "cannot list recordings");
                }
            });
        }
    }

    let upkeep = prometheus.clone();
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });

    let shutdown_timeout = config.shutdown_timeout();
    let cluster_at_exit = cluster_handle;
    actix_web::rt::spawn(async move {
        let signal = signals.wait().await;
        tracing::info!(signal, "shutting down: finishing sessions");
        ready.store(false, Ordering::Release);
        let signalled = tokio::time::Instant::now();
        // Transcripts still pending are given up a little before the
        // timeout, so that their sessions can still report and close in it.
        let margin = (shutdown_timeout / 5).min(Duration::from_secs(1));
        transcription.begin_shutdown(signalled + shutdown_timeout.saturating_sub(margin));
        handle.pause().await;
        let _ = shutdown_tx.send(true);
        let left = shutdown_timeout.saturating_sub(signalled.elapsed());
        let drained = registry.wait_drained(left).await;
        if drained {
            tracing::info!("all sessions finished");
        } else {
            tracing::warn!(
                left = registry.active(),
                "shutdown timeout: stopping with sessions still open"
            );
        }
        if let Some(cluster) = &cluster_at_exit {
            cluster.leave().await;
        }
        // Graceful only when nothing is left to wait for: the whole
        // shutdown fits shutdown_timeout_ms.
        handle.stop(drained).await;
    });

    server.await?;
    if let Some(uploader) = uploader {
        // Sessions waited for their own uploads as they ended; this is for
        // recoveries and for uploads that were retrying.
        uploader
            .shutdown(shutdown_timeout.min(Duration::from_secs(5)))
            .await;
    }
    Ok(())
}

/// SIGINT and SIGTERM listeners, registered at creation.
struct Signals {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Self> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{signal, SignalKind};
            Ok(Self {
                interrupt: signal(SignalKind::interrupt())?,
                terminate: signal(SignalKind::terminate())?,
            })
        }
        #[cfg(not(unix))]
        {
            Ok(Self {})
        }
    }

    async fn wait(mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.interrupt.recv() => "SIGINT",
                _ = self.terminate.recv() => "SIGTERM",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}

/// The query string: the credential (`token`) apart, the rest as a
/// connection request.
fn parse_query(query: &str) -> (Option<String>, Result<ConnectRequest, ProtocolError>) {
    let pairs = match web::Query::<Vec<(String, String)>>::from_query(query) {
        Ok(pairs) => pairs.into_inner(),
        Err(e) => {
            let error = ProtocolError::InvalidMessage(format!("query string: {e}"));
            return (None, Err(error));
        }
    };
    let token = pairs
        .iter()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.clone());
    let rest = pairs
        .iter()
        .filter(|(k, _)| k != "token")
        .map(|(k, v)| (k.as_str(), v.as_str()));
    (token, parse_connect(rest))
}

fn header(req: &HttpRequest, name: header::HeaderName) -> Option<&str> {
    req.headers().get(name).and_then(|v| v.to_str().ok())
}

/// An HTTP error before any upgrade, with a JSON body a client can act on.
fn refuse_http(error: &auth::AuthError) -> HttpResponse {
    metrics::counter!(names::AUTH_FAILURES_TOTAL, "reason" => error.code()).increment(1);
    tracing::warn!(%error, "request refused");
    let status = actix_web::http::StatusCode::from_u16(error.http_status())
        .unwrap_or(actix_web::http::StatusCode::UNAUTHORIZED);
    let mut response = HttpResponse::build(status);
    if status == actix_web::http::StatusCode::UNAUTHORIZED {
        response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
    }
    response.json(json!({ "error": error.code(), "message": error.to_string() }))
}

/// Checks Origin and credentials; `Ok(None)` when authentication is off.
fn authenticate(
    req: &HttpRequest,
    auth: &auth::Auth,
    query_token: Option<&str>,
) -> Result<Option<auth::Principal>, auth::AuthError> {
    auth.check_origin(header(req, header::ORIGIN))?;
    let presented = auth::presented_credential(
        header(req, header::AUTHORIZATION),
        query_token,
        header(req, header::SEC_WEBSOCKET_PROTOCOL),
    );
    auth.check(presented, std::time::SystemTime::now())
}

async fn stream(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let (query_token, connect) = parse_query(req.query_string());
    // Refused before the upgrade: a bad credential never gets a socket.
    let principal = match authenticate(&req, &state.auth, query_token.as_deref()) {
        Ok(principal) => principal,
        Err(error) => return Ok(refuse_http(&error)),
    };
    let config = &state.env.config;
    let (response, ws, messages) =
        frame_limit::upgrade(&req, body, &[auth::SUBPROTOCOL], config.max_message_bytes).await?;
    let id = uuid::Uuid::now_v7().to_string();
    let key_id = principal.as_ref().map(|p| p.key_id.as_str());

    if session::is_shutting_down(&state.env.shutdown) {
        actix_web::rt::spawn(session::refuse(
            id,
            ws,
            messages,
            Box::new(dialect::native::Native),
            SessionError::ShuttingDown,
        ));
    } else if let Ok(ConnectRequest::Resume {
        session_id,
        token,
        request,
    }) = connect
    {
        // A resumed session already holds its admission slot.
        let env = state.env.clone();
        actix_web::rt::spawn(session::resume(
            ws,
            messages,
            session_id,
            token,
            request,
            env,
            key_id.map(str::to_owned),
        ));
    } else {
        match state.registry.try_admit(key_id) {
            Ok(guard) => {
                let query = connect.map(|c| match c {
                    ConnectRequest::New(request) => request,
                    ConnectRequest::Resume { .. } => StartRequest::default(),
                });
                let limits = session::SessionLimits {
                    max_session_ms: principal.as_ref().and_then(|p| p.max_session_ms),
                };
                actix_web::rt::spawn(session::run(
                    id,
                    ws,
                    messages,
                    query,
                    state.env.clone(),
                    guard,
                    limits,
                    Box::new(dialect::native::Native),
                ));
            }
            Err(refusal) => {
                let error = match refusal {
                    Refusal::ServerFull => SessionError::ServerFull {
                        max_sessions: state.registry.max_sessions(),
                    },
                    Refusal::KeyFull => SessionError::KeyFull {
                        max_sessions_per_key: state.registry.max_per_key(),
                    },
                };
                actix_web::rt::spawn(session::refuse(
                    id,
                    ws,
                    messages,
                    Box::new(dialect::native::Native),
                    error,
                ));
            }
        }
    }
    Ok(response)
}

async fn twilio(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    dialect_stream(req, body, state, DialectKind::Twilio).await
}

async fn vonage(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    dialect_stream(req, body, state, DialectKind::Vonage).await
}

async fn audiofork(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    dialect_stream(req, body, state, DialectKind::AudioFork).await
}

async fn deepgram(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    dialect_stream(req, body, state, DialectKind::Deepgram).await
}

/// A dialect endpoint: the same authentication, admission and limits as
/// `/v1/stream`, with the credential read from where that platform can put
/// it, and a session that speaks the platform's protocol.
async fn dialect_stream(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
    kind: DialectKind,
) -> Result<HttpResponse, actix_web::Error> {
    let pairs = web::Query::<Vec<(String, String)>>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| ProtocolError::InvalidMessage(format!("query string: {e}")));
    let query_token = pairs
        .as_ref()
        .ok()
        .and_then(|p| p.iter().find(|(k, _)| k == "token").map(|(_, v)| v.clone()));
    if let Err(error) = state.auth.check_origin(header(&req, header::ORIGIN)) {
        return Ok(refuse_http(&error));
    }
    let presented = dialect::presented_credential(
        kind,
        header(&req, header::AUTHORIZATION),
        query_token.as_deref(),
        header(&req, header::SEC_WEBSOCKET_PROTOCOL),
    );
    // Twilio drops query strings and sets no headers: without a credential
    // here, the stream must show one in its start message.
    let deferred = presented.is_none() && kind == DialectKind::Twilio && state.auth.required();
    let principal = if deferred {
        None
    } else {
        match state
            .auth
            .check(presented.as_deref(), std::time::SystemTime::now())
        {
            Ok(principal) => principal,
            Err(error) => return Ok(refuse_http(&error)),
        }
    };
    let config = &state.env.config;
    let (response, ws, messages) =
        frame_limit::upgrade(&req, body, kind.subprotocols(), config.max_message_bytes).await?;
    let id = uuid::Uuid::now_v7().to_string();
    metrics::counter!(names::DIALECT_SESSIONS_TOTAL, "dialect" => kind.name()).increment(1);
    let deferred = deferred.then(|| dialect::DeferredAuth {
        auth: state.auth.clone(),
        registry: state.registry.clone(),
    });
    let prepared = match pairs {
        Ok(pairs) => {
            let rest: Vec<(String, String)> =
                pairs.into_iter().filter(|(k, _)| k != "token").collect();
            dialect::prepare(kind, &id, &rest, deferred)
        }
        Err(error) => dialect::Prepared {
            query: Err(error),
            ..dialect::prepare(kind, &id, &[], deferred)
        },
    };
    let key_id = principal.as_ref().map(|p| p.key_id.as_str());
    if session::is_shutting_down(&state.env.shutdown) {
        actix_web::rt::spawn(session::refuse(
            id,
            ws,
            messages,
            prepared.dialect,
            SessionError::ShuttingDown,
        ));
        return Ok(response);
    }
    match state.registry.try_admit(key_id) {
        Ok(guard) => {
            let limits = session::SessionLimits {
                max_session_ms: principal.as_ref().and_then(|p| p.max_session_ms),
            };
            actix_web::rt::spawn(session::run(
                id,
                ws,
                messages,
                prepared.query,
                state.env.clone(),
                guard,
                limits,
                prepared.dialect,
            ));
        }
        Err(refusal) => {
            let error = match refusal {
                Refusal::ServerFull => SessionError::ServerFull {
                    max_sessions: state.registry.max_sessions(),
                },
                Refusal::KeyFull => SessionError::KeyFull {
                    max_sessions_per_key: state.registry.max_per_key(),
                },
            };
            actix_web::rt::spawn(session::refuse(id, ws, messages, prepared.dialect, error));
        }
    }
    Ok(response)
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct TokenRequest {
    /// Lifetime of the token; default 300, at most 3600.
    ttl_seconds: Option<u64>,
    /// Caps the length of any session opened with the token.
    max_session_seconds: Option<u64>,
}

/// `POST /v1/tokens` with an API key: a short-lived token a web page can use
/// instead of the key.
async fn mint_token(
    req: HttpRequest,
    body: web::Bytes,
    state: web::Data<AppState>,
) -> HttpResponse {
    // First, as on every other route with a credential: a page on an
    // unlisted site gets no token, whatever key it holds.
    if let Err(error) = state.auth.check_origin(header(&req, header::ORIGIN)) {
        return refuse_http(&error);
    }
    if !state.auth.required() {
        return HttpResponse::BadRequest().json(json!({
            "error": "auth_disabled",
            "message": "no API keys are configured, so there is nothing to mint tokens from"
        }));
    }
    let presented = header(&req, header::AUTHORIZATION).and_then(|h| {
        h.strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
    });
    let principal = match presented.map(|key| state.auth.check_key(key.trim())) {
        Some(Ok(principal)) => principal,
        Some(Err(error)) => return refuse_http(&error),
        None => return refuse_http(&auth::AuthError::Missing),
    };
    let request: TokenRequest = if body.is_empty() {
        TokenRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(request) => request,
            Err(e) => {
                return HttpResponse::BadRequest().json(json!({
                    "error": "invalid_request",
                    "message": format!("token request: {e}")
                }))
            }
        }
    };
    let ttl = Duration::from_secs(request.ttl_seconds.unwrap_or(300).clamp(1, 3600));
    let now = std::time::SystemTime::now();
    let max_session_ms = request.max_session_seconds.map(|s| s.saturating_mul(1000));
    let (token, claims) = state.auth.mint(&principal, ttl, max_session_ms, now);
    HttpResponse::Ok().json(json!({
        "token": token,
        "expires_at": humantime::format_rfc3339_seconds(now + ttl).to_string(),
        "expires_in_seconds": ttl.as_secs(),
        "key_id": claims.kid,
    }))
}

async fn healthz(state: web::Data<AppState>) -> HttpResponse {
    let mut health = json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "sessions_active": state.registry.active(),
        "max_sessions": state.registry.max_sessions(),
    });
    if let Some(cluster) = &state.env.cluster {
        let nodes = match cluster.view().await {
            Ok(nodes) => json!(nodes),
            Err(e) => json!({ "error": e.to_string() }),
        };
        health["cluster"] = json!({
            "node_id": cluster.node_id(),
            "fenced": cluster.fenced(),
            "nodes": nodes,
        });
    }
    HttpResponse::Ok().json(health)
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
    if state.env.cluster.as_ref().is_some_and(|c| c.fenced()) {
        return HttpResponse::ServiceUnavailable()
            .json(json!({ "ready": false, "reason": "another process holds this node id" }));
    }
    if state.ready.load(Ordering::Acquire) {
        HttpResponse::Ok().json(json!({ "ready": true }))
    } else {
        HttpResponse::ServiceUnavailable()
            .json(json!({ "ready": false, "reason": "shutting down" }))
    }
}

async fn metrics_text(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.prometheus.render())
}
