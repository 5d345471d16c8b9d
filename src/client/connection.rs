//! The client's connection: which URL to dial (the stream path when none is
//! given, the resume URL), the WebSocket handshake with the credential, and
//! the reader task that turns what the server sends into [`Incoming`].

use futures_util::stream::{SplitSink, StreamExt};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::header::{HeaderValue, AUTHORIZATION};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::stream::{StreamError, CONNECT_TIMEOUT};

pub(super) type Sink = SplitSink<WebSocketStream<MaybeTlsStream<TcpStream>>, Message>;

/// What the reader task passes on.
pub(super) enum Incoming {
    Text(Value),
    /// A close frame (code, reason), or none.
    Closed(Option<(u16, String)>),
    /// The connection failed or ended without a close frame.
    Lost(String),
}

pub(super) struct Connection {
    pub(super) sink: Sink,
    pub(super) rx: mpsc::UnboundedReceiver<Incoming>,
    pub(super) reader: tokio::task::JoinHandle<()>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// Where `cochlea serve` takes streams.
pub const STREAM_PATH: &str = "/v1/stream";

/// The URL to stream to: one without a path (`ws://host:8080`, or just `/`)
/// means the server's stream endpoint, since `/` is the microphone page,
/// which answers 200 and no upgrade. Any other path is kept as it is (a
/// proxy may publish the endpoint under its own path), and so is a URL that
/// does not parse, for `connect` to report.
pub fn with_stream_path(url: &str) -> String {
    let Ok(uri) = url.parse::<tungstenite::http::Uri>() else {
        return url.to_owned();
    };
    match (uri.scheme_str(), uri.authority()) {
        (Some(scheme), Some(authority)) if uri.path() == "/" => {
            let query = uri.query().map_or(String::new(), |q| format!("?{q}"));
            format!("{scheme}://{authority}{STREAM_PATH}{query}")
        }
        _ => url.to_owned(),
    }
}

/// The URL for a resume: the user's URL without its query (the session's
/// format is fixed), but keeping a `token` it may carry.
pub(super) fn resume_url(url: &str, session_id: &str, resume_token: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let mut resume = format!("{base}?resume={session_id}&resume_token={resume_token}");
    for pair in query.split('&').filter(|p| p.starts_with("token=")) {
        resume.push('&');
        resume.push_str(pair);
    }
    resume
}

/// The URL without its query, for messages: the query may hold a token or
/// a resume token, which do not belong in logs.
pub(super) fn without_query(url: &str) -> &str {
    url.split_once('?').map_or(url, |(base, _)| base)
}

pub(super) fn describe_refusal(response: &tungstenite::handshake::client::Response) -> StreamError {
    let status = response.status().as_u16();
    let body = response
        .body()
        .as_ref()
        .and_then(|b| serde_json::from_slice::<Value>(b).ok());
    let detail = match body {
        Some(body) => format!(
            " {}: {}",
            body["error"].as_str().unwrap_or("?"),
            body["message"].as_str().unwrap_or("")
        ),
        None if status == 404 => " (not found: is the URL's path /v1/stream?)".to_owned(),
        // A plain page where the upgrade was expected.
        None if status == 200 => {
            " (a web page, not the stream endpoint: is the URL's path /v1/stream?)".to_owned()
        }
        None => String::new(),
    };
    StreamError::Refused { status, detail }
}

pub(super) async fn connect(url: &str, token: Option<&str>) -> Result<Connection, StreamError> {
    let mut request = url.into_client_request().map_err(|e| StreamError::Url {
        url: without_query(url).to_owned(),
        message: e.to_string(),
    })?;
    if let Some(token) = token {
        let value =
            HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| StreamError::Url {
                url: without_query(url).to_owned(),
                message: "the token holds characters an HTTP header cannot".into(),
            })?;
        request.headers_mut().insert(AUTHORIZATION, value);
    }
    let connecting = tokio_tungstenite::connect_async_with_config(request, None, true);
    let ws = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Err(_) => {
            return Err(StreamError::Connect {
                url: without_query(url).to_owned(),
                message: format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
            })
        }
        Ok(Err(tungstenite::Error::Http(response))) => return Err(describe_refusal(&response)),
        Ok(Err(e)) => {
            return Err(StreamError::Connect {
                url: without_query(url).to_owned(),
                message: e.to_string(),
            })
        }
        Ok(Ok((ws, _))) => ws,
    };
    let (sink, mut stream) = ws.split();
    let (tx, rx) = mpsc::unbounded_channel();
    // Reading runs on its own so that acks are taken even while a send waits
    // on TCP back-pressure.
    let reader = tokio::spawn(async move {
        let end = loop {
            match stream.next().await {
                Some(Ok(Message::Text(text))) => {
                    // A message we cannot parse is skipped: clients ignore
                    // what they do not understand (PROTOCOL.md §10).
                    if let Ok(value) = serde_json::from_str::<Value>(&text) {
                        if tx.send(Incoming::Text(value)).is_err() {
                            return;
                        }
                    }
                }
                Some(Ok(Message::Close(frame))) => {
                    break Incoming::Closed(
                        frame.map(|f| (u16::from(f.code), f.reason.to_string())),
                    )
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break Incoming::Lost(e.to_string()),
                None => break Incoming::Lost("the connection ended".into()),
            }
        };
        let _ = tx.send(end);
    });
    Ok(Connection { sink, rx, reader })
}
