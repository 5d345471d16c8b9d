//! The HTTP server: routes, admission, and graceful shutdown.
//!
//! `GET /v1/stream` upgrades to a WebSocket and spawns one session task
//! ([`session::run`]) on the worker that accepted it. `/healthz`, `/readyz`
//! and `/metrics` are plain HTTP.

pub mod close;
mod registry;
mod resume;
pub mod session;

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
use close::SessionError;
use registry::SessionRegistry;
use session::SessionEnv;

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot create recordings directory {path}: {source}")]
    RecordingsDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("server failed: {0}")]
    Io(#[from] std::io::Error),
}

struct AppState {
    env: SessionEnv,
    registry: Arc<SessionRegistry>,
    prometheus: PrometheusHandle,
    ready: Arc<AtomicBool>,
}

/// Runs the server until SIGINT or SIGTERM, then drains sessions and returns.
///
/// Prints one line, `cochlea listening on http://ADDR`, to stdout once bound,
/// with the real port when the configuration asked for port 0.
pub async fn run(config: Config, prometheus: PrometheusHandle) -> Result<(), ServerError> {
    // Fail at startup, not at the first session, if recordings cannot be kept.
    std::fs::create_dir_all(&config.recordings_dir).map_err(|source| {
        ServerError::RecordingsDir {
            path: config.recordings_dir.clone(),
            source,
        }
    })?;

    let config = Arc::new(config);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let registry = SessionRegistry::new(config.max_sessions);
    let ready = Arc::new(AtomicBool::new(true));
    let state = web::Data::new(AppState {
        env: SessionEnv {
            config: config.clone(),
            shutdown: shutdown_rx,
            resumes: Arc::new(resume::ResumeRegistry::default()),
        },
        registry: registry.clone(),
        prometheus: prometheus.clone(),
        ready: ready.clone(),
    });

    let workers = match config.workers {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    let server = HttpServer::new(move || {
        App::new()
            .app_data(state.clone())
            .route("/v1/stream", web::get().to(stream))
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(metrics_text))
    })
    .workers(workers)
    // Signals are ours: sessions must finish their sinks before workers stop.
    .disable_signals()
    .shutdown_timeout(config.shutdown_timeout().as_secs().max(1))
    // After the WebSocket closing handshake the server closes TCP at once
    // (RFC 6455 §7.1.1). actix's default waits 1 s for the client to hang up
    // first, which kept every client waiting a second after `closed`.
    .client_disconnect_timeout(Duration::ZERO)
    .bind(config.listen)
    .map_err(|source| ServerError::Bind {
        addr: config.listen,
        source,
    })?;

    // Handlers go in before the address is announced: a signal sent right
    // after the "listening" line must find them (found by a test that did).
    let signals = Signals::install()?;
    for addr in server.addrs() {
        tracing::info!(%addr, "listening");
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "cochlea listening on http://{addr}");
        let _ = stdout.flush();
    }

    let server = server.run();
    let handle = server.handle();

    let upkeep = prometheus.clone();
    actix_web::rt::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });

    let shutdown_timeout = config.shutdown_timeout();
    actix_web::rt::spawn(async move {
        let signal = signals.wait().await;
        tracing::info!(signal, "shutting down: finishing sessions");
        ready.store(false, Ordering::Release);
        handle.pause().await;
        let _ = shutdown_tx.send(true);
        if registry.wait_drained(shutdown_timeout).await {
            tracing::info!("all sessions finished");
        } else {
            tracing::warn!(
                left = registry.active(),
                "shutdown timeout: stopping with sessions still open"
            );
        }
        handle.stop(true).await;
    });

    server.await?;
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

fn parse_query(query: &str) -> Result<ConnectRequest, ProtocolError> {
    let pairs = web::Query::<Vec<(String, String)>>::from_query(query)
        .map_err(|e| ProtocolError::InvalidMessage(format!("query string: {e}")))?;
    parse_connect(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
}

async fn stream(
    req: HttpRequest,
    body: web::Payload,
    state: web::Data<AppState>,
) -> Result<HttpResponse, actix_web::Error> {
    let (response, ws, messages) = actix_ws::handle(&req, body)?;
    let config = &state.env.config;
    let messages = messages.max_frame_size(config.max_message_bytes);
    let id = uuid::Uuid::now_v7().to_string();

    let connect = parse_query(req.query_string());
    if session::is_shutting_down(&state.env.shutdown) {
        actix_web::rt::spawn(session::refuse(id, ws, SessionError::ShuttingDown));
    } else if let Ok(ConnectRequest::Resume { session_id, token }) = connect {
        // A resumed session already holds its admission slot.
        let env = state.env.clone();
        actix_web::rt::spawn(session::resume(ws, messages, session_id, token, env));
    } else if let Some(guard) = state.registry.try_admit() {
        let query = connect.map(|c| match c {
            ConnectRequest::New(request) => request,
            ConnectRequest::Resume { .. } => StartRequest::default(),
        });
        actix_web::rt::spawn(session::run(
            id,
            ws,
            messages,
            query,
            state.env.clone(),
            guard,
        ));
    } else {
        let error = SessionError::ServerFull {
            max_sessions: state.registry.max_sessions(),
        };
        actix_web::rt::spawn(session::refuse(id, ws, error));
    }
    Ok(response)
}

async fn healthz(state: web::Data<AppState>) -> HttpResponse {
    HttpResponse::Ok().json(json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "sessions_active": state.registry.active(),
        "max_sessions": state.registry.max_sessions(),
    }))
}

async fn readyz(state: web::Data<AppState>) -> HttpResponse {
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
