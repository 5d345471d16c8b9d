//! A WebSocket client for the dialect endpoints (`/twilio`, `/vonage`,
//! `/audiofork`, `/v1/listen`): their messages are the platforms' shapes,
//! not cochlea's, so nothing here is checked against proto/schemas; the
//! tests check each shape themselves. Also: finding a session's recording
//! from its sidecar, since most platforms get no `recording` message.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;

use crate::harness::{read_wav_i16, Server, Wav, Ws, WAIT};

pub struct DialectClient {
    pub ws: Ws,
    /// The subprotocol the server selected, if any.
    pub protocol: Option<String>,
    pub texts: Vec<String>,
}

/// What the client saw until the connection ended.
#[derive(Debug)]
pub struct Frames {
    pub texts: Vec<String>,
    pub close: Option<(u16, String)>,
}

impl Frames {
    /// The text frames as JSON (panics on one that is not).
    pub fn json(&self) -> Vec<Value> {
        self.texts
            .iter()
            .map(|t| serde_json::from_str(t).unwrap_or_else(|e| panic!("not JSON ({e}): {t}")))
            .collect()
    }

    /// Asserts the close frame's code and reason (the error code).
    pub fn assert_closed(&self, code: u16, reason: &str) {
        assert_eq!(
            self.close.as_ref().map(|(c, r)| (*c, r.as_str())),
            Some((code, reason)),
            "texts: {:#?}",
            self.texts
        );
    }
}

impl DialectClient {
    /// Connects to `path_and_query` (e.g. `/twilio`), or returns the HTTP
    /// status of a refused upgrade.
    pub async fn try_connect(
        server: &Server,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> Result<DialectClient, u16> {
        let url = format!("ws://{}{path_and_query}", server.addr);
        let mut request = url.into_client_request().expect("request");
        for (name, value) in headers {
            let name: tokio_tungstenite::tungstenite::http::HeaderName =
                name.parse().expect("header name");
            request
                .headers_mut()
                .insert(name, value.parse().expect("header value"));
        }
        let connected = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
            .await
            .expect("connect timeout");
        match connected {
            Ok((ws, response)) => Ok(DialectClient {
                ws,
                protocol: response
                    .headers()
                    .get("sec-websocket-protocol")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned),
                texts: Vec::new(),
            }),
            Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
                Err(response.status().as_u16())
            }
            Err(other) => panic!("connect to {path_and_query}: {other}"),
        }
    }

    pub async fn connect(
        server: &Server,
        path_and_query: &str,
        headers: &[(&str, &str)],
    ) -> DialectClient {
        Self::try_connect(server, path_and_query, headers)
            .await
            .unwrap_or_else(|status| panic!("{path_and_query}: upgrade refused with HTTP {status}"))
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::text(text)).await.expect("send text");
    }

    pub async fn send_json(&mut self, value: &Value) {
        self.send_text(&value.to_string()).await;
    }

    /// Sends unless the server has already closed; false once it has.
    pub async fn try_send_json(&mut self, value: &Value) -> bool {
        self.ws.send(Message::text(value.to_string())).await.is_ok()
    }

    pub async fn send_binary(&mut self, bytes: &[u8]) {
        self.ws
            .send(Message::binary(bytes.to_vec()))
            .await
            .expect("send binary");
    }

    /// The next text frame; panics on the end of the connection or a timeout.
    pub async fn next_text(&mut self) -> String {
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for a text frame");
            match next {
                Some(Ok(Message::Text(text))) => {
                    self.texts.push(text.to_string());
                    return text.to_string();
                }
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                other => panic!("expected a text frame, got {other:?}"),
            }
        }
    }

    /// Reads until the connection ends.
    pub async fn finish(mut self) -> Frames {
        let mut close = None;
        loop {
            let next = tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("timed out waiting for the connection to end");
            match next {
                Some(Ok(Message::Text(text))) => self.texts.push(text.to_string()),
                Some(Ok(Message::Close(frame))) => {
                    close = frame.map(|f| (u16::from(f.code), f.reason.to_string()));
                }
                Some(Ok(_)) => {}
                Some(Err(_)) | None => break,
            }
        }
        Frames {
            texts: self.texts,
            close,
        }
    }

    /// Closes as the platform does when a call ends (a Close frame, 1000),
    /// then reads to the end.
    pub async fn hang_up(mut self) -> Frames {
        let _ = self
            .ws
            .send(Message::Close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "".into(),
            })))
            .await;
        self.finish().await
    }
}

/// A finished recording: its sidecar and its WAV.
pub struct Recorded {
    pub sidecar: Value,
    pub wav: PathBuf,
}

impl Recorded {
    pub fn samples(&self) -> Wav {
        read_wav_i16(&self.wav)
    }
}

/// Waits until `count` recordings of the server are complete (the sidecar
/// says so), and returns them; platforms that hang up get no `recording`
/// message, so this is how a test finds the file.
pub fn wait_recordings(server: &Server, count: usize) -> Vec<Recorded> {
    let deadline = Instant::now() + WAIT;
    loop {
        let done = complete_recordings(&server.recordings_dir());
        if done.len() >= count {
            return done;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {count} recordings complete; server log:\n{}",
            done.len(),
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn complete_recordings(dir: &Path) -> Vec<Recorded> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) != Some("json") {
            continue;
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let Ok(sidecar) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        if sidecar["complete"] != true {
            continue;
        }
        let wav = dir.join(sidecar["recording"].as_str().expect("recording name"));
        found.push(Recorded { sidecar, wav });
    }
    found
}

/// Speech with silence around it, for the voice detector: 0.5 s, then
/// `copies` times the speech followed by `gap_seconds` of silence.
pub fn padded(speech: &[i16], rate: usize, copies: usize, gap_seconds: f64) -> Vec<i16> {
    let mut samples = vec![0i16; rate / 2];
    for _ in 0..copies {
        samples.extend_from_slice(speech);
        samples.extend(std::iter::repeat_n(
            0i16,
            (gap_seconds * rate as f64) as usize,
        ));
    }
    samples
}
